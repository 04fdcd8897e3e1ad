"""Normalization layers, built here only, so every model computes its statistics alike.

  make_norm(kind)   "layernorm" | "rmsnorm" over the last axis (the transformer stacks)
  ChannelWeightedNorm  the same norms with statistics over weighted channels (a stack
                    whose residual channels are gated: automatic width inheritance)
  layer_norm(...)   flax nn.LayerNorm with the two-pass variance
  group_norm(...)   flax nn.GroupNorm with the two-pass variance
  BatchNorm         batch norm with running statistics (flax's names: params scale, bias;
                    batch_stats mean, var) and a biased | unbiased running variance

LayerNorm (Ba et al. 2016) normalizes over the hidden units of each example -- unlike batch
norm it does not depend on the batch, which is why it suits sequence models (Ba et al. sec. 3.1:
recurrent networks).
RMSNorm (Zhang & Sennrich 2019) drops the mean-centring and the bias.

Variance. flax's norms default to the one-pass variance E[x^2] - E[x]^2
(`use_fast_variance=True`), which cancels catastrophically in float32 when a row's mean is
large against its spread: at mean 1000 and std 1, E[x^2] ~ 1e6 is stored to ~0.06, so
LayerNorm's output is off by ~0.3 and a batch variance is a multiple of ~0.06 (at std 0.1:
0, flax clips negative ones, or several times too large). Every norm here uses the two-pass
variance E[(x - E[x])^2] (`use_fast_variance=False`; what PyTorch and NumPy compute),
accurate to ~1e-4 there. Statistics are float32 (or wider) whatever the compute dtype.
RMSNorm has no mean: its statistic is E[x^2] itself, so the choice does not arise.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

from models.layers import partitioning

NORMS = ("layernorm", "rmsnorm")
RUNNING_VARIANCES = ("biased", "unbiased")  # BatchNorm.running_variance


def layer_norm(**kwargs) -> nn.LayerNorm:
    """flax nn.LayerNorm(**kwargs) with the two-pass variance (see the module docstring)."""
    return nn.LayerNorm(use_fast_variance=False, **kwargs)


def group_norm(**kwargs) -> nn.GroupNorm:
    """flax nn.GroupNorm(**kwargs) (Wu & He 2018) with the two-pass variance."""
    return nn.GroupNorm(use_fast_variance=False, **kwargs)


def make_norm(kind: str, *, epsilon: float = 1e-6, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """A normalization module over the last axis: "layernorm" or "rmsnorm".

    scale (and LayerNorm's bias) [features] carry the logical axis ("embed",).
    """
    scale_init = partitioning.boxed(nn.initializers.ones_init(), ("embed",))
    if kind == "layernorm":
        return layer_norm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                          scale_init=scale_init,
                          bias_init=partitioning.boxed(nn.initializers.zeros_init(),
                                                       ("embed",)))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                          scale_init=scale_init)
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


class ChannelWeightedNorm(nn.Module):
    """make_norm's LayerNorm / RMSNorm, x [..., D] -> [..., D], with the statistics taken
    over channels weighted by z [D] in [0, 1] and the output multiplied by z:

      mean = sum(z x) / sum(z),  var = sum(z (x - mean)^2) / sum(z)   (RMSNorm: no mean)
      y = z * ((x - mean) / sqrt(var + eps) * scale + bias)

    With z in {0, 1} this is exactly the plain norm of the open channels alone, the closed
    ones held at 0: a model with gated channels then equals the narrower model that keeps
    only the open channels (models/compress/inherit.py). With z = 1 it is make_norm's.
    Params `scale` (and `bias`) [D], named as make_norm's, so the two load each other."""
    kind: str = "layernorm"
    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, z):
        if self.kind not in NORMS:
            raise ValueError(f"unknown norm {self.kind!r}; allowed: {', '.join(NORMS)}")
        features = x.shape[-1]
        scale = self.param("scale", partitioning.boxed(nn.initializers.ones_init(), ("embed",)),
                           (features,), self.param_dtype)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        h, z = x.astype(stat_dtype), z.astype(stat_dtype)
        count = jnp.maximum(jnp.sum(z), 1e-6)  # all channels closed: an all-zero output
        if self.kind == "layernorm":
            bias = self.param("bias", partitioning.boxed(nn.initializers.zeros_init(),
                                                         ("embed",)),
                              (features,), self.param_dtype)
            h = h - jnp.sum(h * z, axis=-1, keepdims=True) / count   # two-pass variance
        var = jnp.sum(jnp.square(h) * z, axis=-1, keepdims=True) / count
        y = h * lax.rsqrt(var + self.epsilon) * scale.astype(stat_dtype)
        if self.kind == "layernorm":
            y = y + bias.astype(stat_dtype)
        return (y * z).astype(self.dtype or x.dtype)


class BatchNorm(nn.Module):
    """Batch norm (Ioffe & Szegedy 2015): x [..., C] -> [..., C] (feature axis `axis`).

    train (use_running_average=False): normalizes with the batch's mean and *biased*
      variance over every axis but `axis` (two-pass, float32), and updates the running
      averages in `batch_stats`:
        mean <- momentum * mean + (1 - momentum) * batch_mean
        var  <- momentum * var  + (1 - momentum) * batch_var * c
      with c = 1 for running_variance="biased" (flax's nn.BatchNorm) and c = n / (n - 1),
      n the number of reduced elements per feature (B*H*W, times the devices of
      `axis_name`), for "unbiased" (PyTorch's running_var).
    eval (use_running_average=True): normalizes with the running averages; nothing changes.
    `init` creates mean = 0, var = 1 and updates nothing.

    Momentum: `momentum` is the weight of the OLD value (flax / TensorFlow); PyTorch's
    `momentum` is the weight of the NEW batch statistic, so PyTorch's 0.1 is 0.9 here.

    Variables: params scale, bias [C]; batch_stats mean, var [C] float32 -- the names and
    arithmetic of flax's nn.BatchNorm(use_fast_variance=False), so checkpoints load either
    way. `axis_name` (pmap / shard_map) averages the statistics across devices as flax does;
    under jit with a batch-sharded input the reduction is global without it.
    """
    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    running_variance: str = "biased"     # "biased" | "unbiased", see above
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        if self.running_variance not in RUNNING_VARIANCES:
            raise ValueError(f"BatchNorm running_variance={self.running_variance!r} is not "
                             f"allowed; allowed: {', '.join(RUNNING_VARIANCES)}")
        use_running_average = nn.merge_param("use_running_average",
                                             self.use_running_average, use_running_average)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        feature_axes = tuple(sorted({a % x.ndim for a in axes}))
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        feature_shape = [x.shape[a] for a in feature_axes]
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, jnp.float32), feature_shape)
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, jnp.float32), feature_shape)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axis_name = None if self.is_initializing() else self.axis_name
            mean, var = self._batch_stats(x, reduction_axes, axis_name)
            if not self.is_initializing():
                update = var
                if self.running_variance == "unbiased":
                    n = math.prod(x.shape[a] for a in reduction_axes)
                    if axis_name is not None:
                        n = n * lax.psum(1, axis_name,
                                         axis_index_groups=self.axis_index_groups)
                    elif n < 2:
                        raise ValueError("BatchNorm running_variance='unbiased' needs more "
                                         f"than 1 value per feature, got input {x.shape}")
                    update = var * (n / (n - 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * update
        return self._normalize(x, mean, var, reduction_axes, feature_axes)

    def _batch_stats(self, x, reduction_axes, axis_name):
        """Two-pass mean and biased variance [C] in (at least) float32."""
        dtype = jnp.promote_types(self.dtype or jnp.result_type(x), jnp.float32)
        x = x.astype(dtype)

        def mean_over(v):
            m = v.mean(reduction_axes)
            if axis_name is None:
                return m
            return lax.pmean(m, axis_name, axis_index_groups=self.axis_index_groups)

        mean = mean_over(x)
        var = mean_over(lax.square(x - jnp.expand_dims(mean, reduction_axes)))
        return mean, var

    def _normalize(self, x, mean, var, reduction_axes, feature_axes):
        """(x - mean) * rsqrt(var + eps) * scale + bias, as flax's normalization."""
        shape = [1] * x.ndim
        for a in feature_axes:
            shape[a] = x.shape[a]
        features = [x.shape[a] for a in feature_axes]
        y = x - jnp.expand_dims(mean, reduction_axes)
        mul = lax.rsqrt(jnp.expand_dims(var, reduction_axes) + self.epsilon)
        args = [x]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
            mul *= scale.reshape(shape)
            args.append(scale)
        y *= mul
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y += bias.reshape(shape)
            args.append(bias)
        return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))
