"""Token embeddings (with tied unembedding) and position embeddings.

Token embedding E [vocab, features]: ids -> E[ids]; the tied unembedding computes logits
x E^T (Press & Wolf 2017), through the same injectable `dot_general` as every other matmul.
Positions: learned (a [max_length, features] table) or sinusoidal (Vaswani et al. 2017, 3.5):
  PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models.layers import initializers, partitioning

POSITION_KINDS = ("learned", "sinusoidal", "none")


class Embed(nn.Module):
    """Token embedding table with `__call__` (lookup) and `attend` (tied unembedding).

    embedding: [num_embeddings, features] in param_dtype, logical axes ("vocab", "embed");
    outputs are cast to `dtype`.
    """
    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = initializers.get("normal", stddev=0.02)
    dot_general: Callable = lax.dot_general

    def setup(self):
        self.embedding = self.param("embedding",
                                    partitioning.boxed(self.embedding_init, ("vocab", "embed")),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> [..., features]."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., features] -> logits [..., num_embeddings] = x E^T."""
        emb = self.embedding.astype(self.dtype)
        return self.dot_general(x.astype(self.dtype), emb,
                                (((x.ndim - 1,), (1,)), ((), ())))


def sinusoidal_position_encoding(positions: jax.Array, features: int,
                                 max_timescale: float = 10_000.0) -> jax.Array:
    """positions int [...] -> float32 [..., features], sin on even and cos on odd channels."""
    if features % 2:
        raise ValueError(f"sinusoidal position encoding needs an even feature size, "
                         f"got {features}")
    i = jnp.arange(features // 2, dtype=jnp.float32)
    inv_freq = max_timescale ** (-2.0 * i / features)          # 1 / 10000^(2i/d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., d/2, 2]
    return enc.reshape(*positions.shape, features)


class PositionEmbedding(nn.Module):
    """positions int [batch, length] -> [batch, length, features] ("learned"/"sinusoidal").

    The learned table is [max_length, features], logical axes ("position", "embed").
    """
    kind: str
    max_length: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = initializers.get("normal", stddev=0.02)

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        if self.kind == "sinusoidal":
            return sinusoidal_position_encoding(positions, self.features).astype(self.dtype)
        if self.kind == "learned":
            table = self.param("embedding",
                               partitioning.boxed(self.embedding_init, ("position", "embed")),
                               (self.max_length, self.features), self.param_dtype)
            # Callers check lengths statically (transformer._check_tokens, generate); under
            # jit a position past the table cannot raise, so it is clamped to the last row.
            return jnp.take(table, positions, axis=0, mode="clip").astype(self.dtype)
        raise ValueError(f"unknown position embedding {self.kind!r}; allowed here: learned, "
                         "sinusoidal (a model with position='none' has no PositionEmbedding)")
