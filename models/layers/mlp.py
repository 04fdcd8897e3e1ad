"""The transformer feed-forward block: Dense -> activation -> dropout -> Dense.

FFN(x) = act(x W1 + b1) W2 + b2 (Vaswani et al. 2017, eq. 2), with a ReLU in the original
paper; GELU (Hendrycks & Gimpel 2016) is the default here, as in
BERT and GPT-2. The residual connection around it belongs to the transformer block.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.layers import gates, initializers, partitioning

def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (Hendrycks & Gimpel 2016), PyTorch's form.

    `jax.nn.gelu(approximate=False)` is the same function written with erfc(-x / sqrt 2),
    which XLA's CPU backend evaluates about 2x slower than erf (and its gradient likewise).
    The two differ by rounding: the erf form loses relative precision only in the far
    negative tail, where gelu(x) ~ 0 (absolute error below 1e-7 |x| in float32).
    """
    return x * (0.5 * (1.0 + lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype))))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu_exact,                                         # exact, x * Phi(x) (BERT)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's approximation
    "relu": jax.nn.relu,
    # CLIP's x * sigmoid(1.702 x) (Radford et al. 2021, their released code), a cheaper
    # approximation of GELU its checkpoints were trained with.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MlpBlock(nn.Module):
    """[..., features] -> [..., out_features or features] through a hidden layer.

    Parameters: fc1/kernel [features, hidden_dim], fc2/kernel [hidden_dim, out_features],
    logical axes ("embed", "mlp") and ("mlp", "embed"); the hidden activations are
    [..., "activation_mlp"].
    """
    hidden_dim: int
    out_features: int | None = None
    activation: str = "gelu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = initializers.get("xavier_uniform")
    dot_general: Callable = lax.dot_general
    unit_gates: bool = False       # a learnable L0 gate per hidden unit (layers/gates.py)

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        act = get_activation(self.activation)
        def dense(features, names, name):
            return nn.Dense(
                features, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioning.boxed(self.kernel_init, names),
                bias_init=partitioning.boxed(nn.initializers.zeros_init(), names[-1:]),
                dot_general=self.dot_general, name=name)
        h = act(dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x))
        if h.ndim >= 2:  # [batch, ..., mlp]: [batch, length, mlp] inside a transformer
            names = ("batch",) + (None,) * (h.ndim - 2) + ("activation_mlp",)
            h = partitioning.constrain(h, names)
        if self.unit_gates:
            h = gates.UnitGate(self.hidden_dim, name="unit_gate")(h, deterministic)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(self.out_features or x.shape[-1], ("mlp", "embed"), "fc2")(h)
