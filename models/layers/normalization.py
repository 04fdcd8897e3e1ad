"""LayerNorm and RMSNorm by name (flax's implementations; statistics in float32).

LayerNorm (Ba et al. 2016) normalizes over the hidden units of each example -- unlike batch
norm it does not depend on the batch, which is why it suits sequence models (Ba et al. sec. 3.1:
recurrent networks).
RMSNorm (Zhang & Sennrich 2019) drops the mean-centring and the bias.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import partitioning

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, *, epsilon: float = 1e-6, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """A normalization module over the last axis: "layernorm" or "rmsnorm".

    scale (and LayerNorm's bias) [features] carry the logical axis ("embed",).
    """
    scale_init = partitioning.boxed(nn.initializers.ones_init(), ("embed",))
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                            scale_init=scale_init,
                            bias_init=partitioning.boxed(nn.initializers.zeros_init(),
                                                         ("embed",)))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                          scale_init=scale_init)
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")
