"""DCGAN (Radford et al. 2016): a convolutional generator and discriminator in one module.

  generate      z [B, latent_dim] -> Dense -> [B, 4, 4, C0] -> (norm, ReLU, transposed
                4x4 conv, stride 2, doubling the side, halving the channels) x n -> images
                [B, S, S, channels] in [0, 1], S = 4 * 2^n
  discriminate  images [B, S, S, channels] in [0, 1] -> (strided 4x4 conv halving the
                side, doubling the channels, norm except on the first, LeakyReLU 0.2) x n
                -> flatten -> Dense -> logits [B] float32 (D(x) = sigmoid(logit))

params = {"generator": ..., "discriminator": ...}: the two groups a GAN updates in turn;
call the halves with `model.apply(variables, z, method="generate")` and
`model.apply(variables, images, method="discriminate")`.

Image range. Both halves speak the data's [0, 1]. Inside, the discriminator sees 2 x - 1
and the generator's "tanh" output is (tanh(h) + 1) / 2, so the discriminator sees exactly
DCGAN's tanh(h) in [-1, 1]. "sigmoid" returns sigmoid(h) instead; since
sigmoid(h) = (tanh(h / 2) + 1) / 2 the two differ only by a factor 2 on the last layer.

Normalization (`g_norm`, `d_norm`): "batch" (DCGAN), "layer" (over each example's H, W, C,
as in WGAN-GP critics) or "none". Batch norm keeps running statistics in the
`batch_stats` collection ({"generator": ..., "discriminator": ...}); with train=True the
batch's statistics normalize and the running averages are updated (pass
`mutable=["batch_stats"]`), with train=False the running averages normalize. Both norms use
the two-pass variance; `bn_running_variance` picks flax's biased or PyTorch's unbiased
running variance (models/layers/normalization.py).

Every Dense goes through the `dot_general` hook and every conv through
`conv_general_dilated` (the compression hooks). The generator's transposed convolutions
(`UpConv`, PyTorch's ConvTranspose2d(k=4, s=2, p=1)) are computed as their sub-pixel
equivalent: one 3x3 conv with 4 x C_out outputs (each output phase uses 2 x 2 of the 16
taps) and a depth-to-space shuffle. That is exact and ~5x faster on CPU than the
dilated-input form XLA gives lax.conv_transpose / nn.ConvTranspose, and, unlike
nn.ConvTranspose, it goes through the conv hook (which sees the rearranged 3x3 kernel,
zeros included).

Weights start from N(0, 0.02^2) (`init_std`, the paper's section 4), biases from 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import variants
from models.layers import normalization

NORMS = ("batch", "layer", "none")
OUTPUTS = ("tanh", "sigmoid")
DTYPES = variants.DTYPES


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """DCGAN hyper-parameters (defaults: the "small" variant)."""
    image_size: int = 32                 # data field: side S, a power of 2 >= 8
    channels: int = 3                    # data field: image channels
    latent_dim: int = 64                 # z ~ N(0, I) (DCGAN: 100)
    g_width: int = 32                    # generator channels before the last upsampling;
                                         # doubled toward the 4x4 start: C0 = g_width 2^(n-1)
    d_width: int = 32                    # discriminator channels after its first conv;
                                         # doubled after every further strided conv
    g_norm: str = "batch"                # "batch" | "layer" | "none"
    d_norm: str = "batch"                # never on the discriminator's first layer
    output: str = "tanh"                 # "tanh" | "sigmoid" (see module docstring)
    leaky_slope: float = 0.2             # discriminator LeakyReLU slope
    init_std: float = 0.02               # N(0, init_std^2) kernels
    bn_momentum: float = 0.9             # running = m * running + (1 - m) * batch
    bn_epsilon: float = 1e-5
    bn_running_variance: str = "biased"  # "biased" (flax) | "unbiased" (PyTorch)
    dtype: str = "float32"               # compute dtype (logits / images are float32)
    param_dtype: str = "float32"
    dot_general: Callable = lax.dot_general                      # every Dense
    conv_general_dilated: Callable = lax.conv_general_dilated    # every conv

    def __post_init__(self):
        for key, allowed in (("g_norm", NORMS), ("d_norm", NORMS), ("output", OUTPUTS),
                             ("dtype", DTYPES), ("param_dtype", DTYPES),
                             ("bn_running_variance", normalization.RUNNING_VARIANCES)):
            variants.check_one_of("model", key, getattr(self, key), allowed)
        n = self.image_size
        if n < 8 or n & (n - 1):
            raise ValueError(f"model.image_size={n} must be a power of 2 >= 8 (the "
                             "generator doubles a 4x4 start); e.g. data.shapes.image_size=32")
        for key in ("channels", "latent_dim", "g_width", "d_width"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.init_std <= 0 or self.leaky_slope < 0:
            raise ValueError(f"model.init_std={self.init_std} must be > 0 and "
                             f"model.leaky_slope={self.leaky_slope} >= 0")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"model.bn_momentum must be in [0, 1), got {self.bn_momentum}")

    def replace(self, **changes) -> "GANConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_upsamplings(self) -> int:
        """n: stride-2 layers in each half (S = 4 * 2^n)."""
        return int(math.log2(self.image_size)) - 2


VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(latent_dim=16, g_width=8, d_width=8),     # tests
    "small": dict(latent_dim=64, g_width=32, d_width=32),  # minutes on a CPU
    "dcgan": dict(latent_dim=100, g_width=64, d_width=64),  # the paper's widths
}


def make_config(variant: str, **overrides) -> GANConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(GANConfig, VARIANTS, variant, overrides, "gan")


class _Layers:
    """Conv / Dense / norm factories bound to a config (dtypes, init, hooks)."""

    def __init__(self, cfg: GANConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.dtype, self.pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.init = nn.initializers.normal(cfg.init_std)

    def conv(self, features, *, use_bias: bool, name: str) -> nn.Conv:
        """4x4 conv, stride 2, padding 1: halves the side."""
        return nn.Conv(features, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                       use_bias=use_bias, dtype=self.dtype, param_dtype=self.pdtype,
                       kernel_init=self.init,
                       conv_general_dilated=self.cfg.conv_general_dilated, name=name)

    def up_conv(self, features, *, use_bias: bool, name: str) -> "UpConv":
        return UpConv(features, use_bias, self.cfg, name=name)

    def dense(self, features, *, use_bias: bool, name: str) -> nn.Dense:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype,
                        param_dtype=self.pdtype, kernel_init=self.init,
                        dot_general=self.cfg.dot_general, name=name)

    def norm(self, kind: str, x, name: str):
        if kind == "batch":
            return normalization.BatchNorm(
                use_running_average=not self.train, momentum=self.cfg.bn_momentum,
                epsilon=self.cfg.bn_epsilon, running_variance=self.cfg.bn_running_variance,
                dtype=self.dtype, param_dtype=self.pdtype, name=name)(x)
        if kind == "layer":  # over each example's whole feature map
            return normalization.layer_norm(
                epsilon=self.cfg.bn_epsilon, reduction_axes=(-3, -2, -1), dtype=self.dtype,
                param_dtype=self.pdtype, name=name)(x)
        return x


# _PHASE_TAPS[r, d, a] = 1 where output phase r (out = 2 j + r) takes kernel tap a from
# input x[j + d - 1]: out[2j] = w[1] x[j] + w[3] x[j-1], out[2j+1] = w[2] x[j] + w[0] x[j+1]
# (from out[2 i - 1 + a] += w[a] x[i]).
_PHASE_TAPS = np.zeros((2, 3, 4), np.float32)
_PHASE_TAPS[0, 0, 3] = _PHASE_TAPS[0, 1, 1] = _PHASE_TAPS[1, 1, 2] = _PHASE_TAPS[1, 2, 0] = 1


class UpConv(nn.Module):
    """Transposed 4x4 conv, stride 2, padding 1: x [B, H, W, C_in] -> [B, 2H, 2W, features].

    out[2 i - 1 + a, 2 j - 1 + b] += x[i, j] @ kernel[a, b] (PyTorch ConvTranspose2d(4, 2,
    1) with its kernel as [4, 4, C_in, C_out]), computed as a 3x3 sub-pixel conv.
    Params: kernel [4, 4, C_in, features], bias [features] (if use_bias).
    """
    features: int
    use_bias: bool
    cfg: GANConfig

    @nn.compact
    def __call__(self, x):
        c_in, c_out = x.shape[-1], self.features
        dtype = jnp.dtype(self.cfg.dtype)
        kernel = self.param("kernel", nn.initializers.normal(self.cfg.init_std),
                            (4, 4, c_in, c_out), jnp.dtype(self.cfg.param_dtype))
        # [3, 3, C_in, (phase_h, phase_w, C_out)]: each phase's 2 x 2 taps, zeros elsewhere.
        k3 = jnp.einsum("rda,sec,acio->deirso", _PHASE_TAPS, _PHASE_TAPS,
                        kernel.astype(dtype)).reshape(3, 3, c_in, 4 * c_out)
        x = x.astype(dtype)
        dn = lax.conv_dimension_numbers(x.shape, k3.shape, ("NHWC", "HWIO", "NHWC"))
        y = self.cfg.conv_general_dilated(x, k3, (1, 1), ((1, 1), (1, 1)),
                                          lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                                          dimension_numbers=dn, feature_group_count=1,
                                          precision=None)
        b, h, w, _ = y.shape  # depth to space: (h, phase_h, w, phase_w)
        y = y.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, 2 * h, 2 * w, c_out)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c_out,),
                               jnp.dtype(self.cfg.param_dtype)).astype(dtype)
        return y


class Generator(nn.Module):
    """z [B, latent_dim] -> images [B, S, S, channels] float32 in [0, 1].

    Params: project (Dense to 4*4*C0), norm0, up{i} (i = 1..n), norm{i} (i < n).
    """
    cfg: GANConfig

    @nn.compact
    def __call__(self, z, train: bool = False):
        cfg, n = self.cfg, self.cfg.num_upsamplings
        L = _Layers(cfg, train)
        c0 = cfg.g_width * 2 ** (n - 1)
        # A norm right after a layer makes its bias redundant (the norm's shift replaces it).
        biased = cfg.g_norm == "none"
        x = L.dense(4 * 4 * c0, use_bias=biased, name="project")(z.astype(L.dtype))
        x = nn.relu(L.norm(cfg.g_norm, x.reshape(z.shape[0], 4, 4, c0), "norm0"))
        for i in range(1, n + 1):
            last = i == n
            features = cfg.channels if last else c0 // 2 ** i
            x = L.up_conv(features, use_bias=last or biased, name=f"up{i}")(x)
            if not last:
                x = nn.relu(L.norm(cfg.g_norm, x, f"norm{i}"))
        x = x.astype(jnp.float32)
        return (jnp.tanh(x) + 1.0) / 2.0 if cfg.output == "tanh" else nn.sigmoid(x)


class Discriminator(nn.Module):
    """images [B, S, S, channels] in [0, 1] -> logits [B] float32.

    Params: down{i} (i = 1..n), norm{i} (i >= 2), logit (Dense on the flat 4x4 map: the
    paper's final 4x4 valid conv).
    """
    cfg: GANConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg = self.cfg
        L = _Layers(cfg, train)
        x = 2.0 * images.astype(L.dtype) - 1.0   # [0, 1] data -> DCGAN's [-1, 1]
        for i in range(1, cfg.num_upsamplings + 1):
            first = i == 1
            normed = not first and cfg.d_norm != "none"
            x = L.conv(cfg.d_width * 2 ** (i - 1), use_bias=not normed, name=f"down{i}")(x)
            if normed:
                x = L.norm(cfg.d_norm, x, f"norm{i}")
            x = nn.leaky_relu(x, cfg.leaky_slope)
        logits = L.dense(1, use_bias=True, name="logit")(x.reshape(x.shape[0], -1))
        return logits[:, 0].astype(jnp.float32)


class GAN(nn.Module):
    """Generator and discriminator as submodules "generator" and "discriminator".

    __call__(z, images, train) -> (generate(z), discriminate(images)) initializes both.
    """
    cfg: GANConfig

    def setup(self):
        self.generator = Generator(self.cfg)
        self.discriminator = Discriminator(self.cfg)

    def __call__(self, z, images, train: bool = False):
        return self.generate(z, train), self.discriminate(images, train)

    def generate(self, z, train: bool = False):
        """z [B, latent_dim] -> images [B, S, S, channels] in [0, 1]."""
        if z.ndim != 2 or z.shape[-1] != self.cfg.latent_dim:
            raise ValueError(f"z must be [batch, latent_dim={self.cfg.latent_dim}], got "
                             f"shape {z.shape}")
        return self.generator(z, train)

    def discriminate(self, images, train: bool = False):
        """images [B, S, S, channels] in [0, 1] -> logits [B] (D = sigmoid(logit))."""
        want = (self.cfg.image_size, self.cfg.image_size, self.cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                             f"(model.image_size, model.channels), got {images.shape}")
        return self.discriminator(images, train)
