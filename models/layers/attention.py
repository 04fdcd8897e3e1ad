"""Scaled dot-product attention, masks and the multi-head attention module.

Shapes (one convention throughout flaxlab):
  query  [batch, q_length,  heads,    head_dim]
  key    [batch, kv_length, kv_heads, head_dim]     kv_heads divides heads (GQA/MQA)
  value  [batch, kv_length, kv_heads, value_dim]
  mask   bool, broadcastable to [batch, heads, q_length, kv_length]; True = may attend
  output [batch, q_length,  heads,    value_dim]

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V  (Vaswani et al. 2017, eq. 1), where d_k is
the per-head key dimension. (A popular explanation divides the scores by the square root of
the *embedding* dimension; the paper divides by sqrt(d_k), the head dimension (sec. 3.2.1;
d_k = d_model / h in sec. 3.2.2), and so do we.)

Two implementations share this contract:
  "reference": explicit matmuls routed through an injectable `dot_general` (so quantization can
               replace them) and a float32 softmax; it can return the attention weights.
  "fused":     `jax.nn.dot_product_attention`: cuDNN flash attention on GPU when dtype and
               shapes allow, XLA otherwise. Falls back to XLA silently where cuDNN can't run.

Fully masked rows. A query that may attend no key (every key masked: a padded query under a
query-and-key padding mask, a left-padded position under causal + key padding) gets an
all-zero output and all-zero attention weights, in both implementations, with finite
gradients (zero through that row). A plain softmax over such a row is uniform (flax,
jax.nn.dot_product_attention: the mean of the values) or NaN (softmax of all -inf);
PyTorch's F.scaled_dot_product_attention returns zeros since 2.5 (its `_safe_softmax`).
Rows with a visible key are unchanged.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models.layers import gates, initializers, partitioning

Array = jax.Array
DotGeneral = Callable[..., Array]

IMPLEMENTATIONS = ("reference", "fused")
# Logical axes of query / key / value / attention output activations [b, l, heads, d].
_HEADS_ACTIVATION = ("batch", "length", "activation_heads", "activation_kv")


# ----------------------------------------------------------------------------------------
# Masks: boolean, True = attend, shaped to broadcast against [batch, heads, q_len, kv_len].
# ----------------------------------------------------------------------------------------
def causal_mask(q_length: int, kv_length: int | None = None, offset: int = 0) -> Array:
    """Lower-triangular mask [1, 1, q_length, kv_length].

    Query i (absolute position offset + i) may attend key j iff j <= offset + i. `offset` is
    the number of keys that precede the first query (e.g. cached tokens when decoding).
    """
    kv_length = q_length if kv_length is None else kv_length
    q_pos = offset + jnp.arange(q_length)[:, None]
    k_pos = jnp.arange(kv_length)[None, :]
    return (k_pos <= q_pos)[None, None]


def padding_mask(query_valid: Array | None, key_valid: Array) -> Array:
    """Mask [batch, 1, q_len, kv_len] from per-token validity (True = real token).

    With `query_valid=None` only keys are masked ([batch, 1, 1, kv_len]): padded queries then
    still produce (ignored) outputs, which is what an encoder needs and avoids all-masked rows.
    """
    key_valid = jnp.asarray(key_valid, bool)
    if query_valid is None:
        return key_valid[:, None, None, :]
    return jnp.logical_and(jnp.asarray(query_valid, bool)[:, None, :, None],
                           key_valid[:, None, None, :])


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (None entries are skipped; all None -> None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    return functools.reduce(jnp.logical_and, [jnp.asarray(m, bool) for m in masks])


# ----------------------------------------------------------------------------------------
# Scaled dot-product attention.
# ----------------------------------------------------------------------------------------
def _check_shapes(query, key, value, mask):
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "dot_product_attention expects query, key and value shaped "
            "[batch, length, heads, head_dim]; got ndim "
            f"query={query.ndim}, key={key.ndim}, value={value.ndim}")
    b, _, h, d = query.shape
    bk, lk, hk, dk = key.shape
    if dk != d:
        raise ValueError(f"query head_dim {d} != key head_dim {dk}: the scores Q K^T need "
                         "equal head dimensions")
    if bk != b or value.shape[0] != b:
        raise ValueError(f"batch sizes differ: query {b}, key {bk}, value {value.shape[0]}")
    if value.shape[1] != lk or value.shape[2] != hk:
        raise ValueError(f"key {key.shape} and value {value.shape} must share "
                         "[batch, kv_length, kv_heads]")
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if mask is not None:
        want = (b, h, query.shape[1], lk)
        if mask.ndim != 4 or any(m not in (1, w) for m, w in zip(mask.shape, want)):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[batch, heads, q_length, kv_length] = {want}")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")


def _visible(mask: Array, is_causal: bool, q_length: int, kv_length: int) -> Array:
    """bool [b|1, h|1, q|1, 1]: True where a query may attend at least one key."""
    if is_causal:
        mask = combine_masks(mask, causal_mask(q_length, kv_length))
    return jnp.any(mask, axis=-1, keepdims=True)


def _rows_to_output(visible: Array) -> Array:
    """[b, h, q, 1] row flags -> [b, q, h, 1], broadcastable to the output [b, q, h, d]."""
    return jnp.transpose(visible, (0, 2, 1, 3))


def _repeat_kv(x: Array, heads: int) -> Array:
    """[b, l, kv_heads, d] -> [b, l, heads, d] by repeating each kv head (GQA)."""
    reps = heads // x.shape[2]
    return x if reps == 1 else jnp.repeat(x, reps, axis=2)


def _reference_attention(query, key, value, mask, *, scale, dropout_rate, dropout_rng,
                         deterministic, dot_general, precision):
    heads = query.shape[2]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    # scores[b, h, q, k] = sum_d query[b, q, h, d] * key[b, k, h, d]
    scores = dot_general(query * jnp.asarray(scale, query.dtype), key,
                         (((3,), (3,)), ((0, 2), (0, 2))), precision=precision)
    # Softmax in (at least) float32 whatever the compute dtype.
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if mask is not None:  # a query with no visible key: zero weights (module docstring)
        weights = jnp.where(_visible(mask, False, *scores.shape[2:]), weights, 0.0)
    probs = weights
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    # out[b, h, q, d] = sum_k probs[b, h, q, k] * value[b, k, h, d]
    out = dot_general(probs.astype(value.dtype), value,
                      (((3,), (1,)), ((0, 1), (0, 2))), precision=precision)
    return jnp.transpose(out, (0, 2, 1, 3)), weights


# The platform a trace is for: None = the default backend's. `lowering_for("gpu")` traces
# the fused path as for a GPU on any host (jax.export(..., platforms=("cuda",)) from a CPU
# machine), so a CPU test can check that a model's lowered step keeps the cuDNN kernel.
_TARGET_PLATFORM: list[str] = []


@contextlib.contextmanager
def lowering_for(platform: str):
    """Trace attention as for `platform` ("gpu", "cpu", ...) whatever this host has."""
    _TARGET_PLATFORM.append(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.pop()


def _cudnn_eligible(query: Array, key: Array) -> bool:
    """cuDNN flash attention needs a GPU, half precision and head_dim % 8 == 0, <= 256."""
    platform = _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()
    if platform != "gpu":
        return False
    d = query.shape[-1]
    return (query.dtype in (jnp.bfloat16, jnp.float16) and key.dtype == query.dtype
            and d % 8 == 0 and d <= 256)


def _fused_attention(query, key, value, mask, *, scale, is_causal):
    if mask is None:  # causal alone always shows key 0: no fully masked row
        return _fused_kernel(query, key, value, mask, scale=scale, is_causal=is_causal)
    # A query with no visible key attends every (causally allowed) key inside the kernel,
    # so no kernel sees an empty row (NaN-free forward and backward), and is zeroed after.
    visible = _visible(mask, is_causal, query.shape[1], key.shape[1])
    out = _fused_kernel(query, key, value, jnp.logical_or(mask, ~visible), scale=scale,
                        is_causal=is_causal)
    return jnp.where(_rows_to_output(visible), out, jnp.zeros((), out.dtype))


def _fused_kernel(query, key, value, mask, *, scale, is_causal):
    if _cudnn_eligible(query, key):
        try:
            return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                                is_causal=is_causal, implementation="cudnn")
        except Exception:  # noqa: BLE001 -- cuDNN rejects some shapes/versions at trace time
            pass
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                        is_causal=is_causal, implementation="xla")


def dot_product_attention(query: Array, key: Array, value: Array, mask: Array | None = None,
                          *, is_causal: bool = False, scale: float | None = None,
                          implementation: str = "reference", return_weights: bool = False,
                          dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                          deterministic: bool = True,
                          dot_general: DotGeneral = lax.dot_general,
                          precision: Any = None):
    """softmax(Q K^T * scale + mask) V over [batch, length, heads, head_dim] arrays.

    Args:
      query: [batch, q_length, heads, head_dim].
      key: [batch, kv_length, kv_heads, head_dim]; kv_heads must divide heads.
      value: [batch, kv_length, kv_heads, value_dim].
      mask: optional bool, broadcastable to [batch, heads, q_length, kv_length]; a query
        with no True key (after `is_causal`) gets a zero output row and zero weights.
      is_causal: also apply `causal_mask(q_length, kv_length)` (query i sees keys <= i). The
        fused path passes it to cuDNN, which then skips the masked blocks entirely.
      scale: score scale, default 1/sqrt(head_dim).
      implementation: "reference" (matmuls through `dot_general`, weights available) or
        "fused" (`jax.nn.dot_product_attention`: cuDNN when eligible, else XLA).
      return_weights: also return the attention weights [batch, heads, q_length, kv_length]
        (reference implementation only; the fused kernels never materialize them).
      dropout_rate, dropout_rng, deterministic: dropout on the attention weights
        (reference implementation only).
      dot_general: the matmul used for both products (same signature as lax.dot_general).

    Returns:
      output [batch, q_length, heads, value_dim] in value's dtype, or (output, weights).
    """
    _check_shapes(query, key, value, mask)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is unknown; "
                         f"allowed: {IMPLEMENTATIONS}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    use_dropout = not deterministic and dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
        raise ValueError("attention dropout needs a dropout_rng when deterministic=False")
    if implementation == "fused":
        if return_weights:
            raise ValueError("return_weights=True needs implementation='reference': fused "
                             "kernels never materialize the attention weights")
        if use_dropout:
            raise ValueError("attention dropout needs implementation='reference' "
                             "(jax.nn.dot_product_attention has no dropout)")
        return _fused_attention(query, key, value, mask, scale=scale, is_causal=is_causal)
    if is_causal:
        mask = combine_masks(mask, causal_mask(query.shape[1], key.shape[1]))
    out, weights = _reference_attention(
        query, key, value, mask, scale=scale, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, deterministic=deterministic, dot_general=dot_general,
        precision=precision)
    out = out.astype(value.dtype)
    return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------------------
# Multi-head attention with an optional KV cache.
# ----------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Multi-head (self or cross) attention: projections, attention, output projection.

    Parameters (per projection, DenseGeneral kernels keep the head axis explicit):
      query/kernel [features, heads, head_dim], key|value/kernel [features, kv_heads, head_dim]
      or, with `fused_qkv`, qkv/kernel [features, heads + 2 * kv_heads, head_dim];
      out/kernel [heads, head_dim, out_features].

    With `decode=True` (self-attention only) keys and values are appended to a cache in the
    flax `cache` collection: `cached_key`/`cached_value` [batch, max_length, kv_heads,
    head_dim], `cache_valid` [batch, max_length] and `cache_index`. The cache is created by
    `init` with the full-length input (its length is the maximum decode length); each later
    call appends a chunk of one or more tokens, so a prompt can be pre-filled in one call.
    """
    num_heads: int
    head_dim: int | None = None           # default: features // num_heads
    num_kv_heads: int | None = None       # default: num_heads (plain multi-head attention)
    out_features: int | None = None       # default: input features
    fused_qkv: bool = False
    use_bias: bool = True
    dropout_rate: float = 0.0
    implementation: str = "reference"
    decode: bool = False
    dtype: Any = jnp.float32              # compute dtype
    param_dtype: Any = jnp.float32
    kernel_init: Callable = initializers.get("xavier_uniform")
    dot_general: DotGeneral = lax.dot_general
    head_gates: bool = False              # a learnable L0 gate per head (layers/gates.py)

    def _dense(self, features, names, axis=-1, name=None):
        """DenseGeneral whose kernel axes are called `names` (its bias: the output axes)."""
        out_names = names[-len(features):] if isinstance(features, tuple) else names[-1:]
        return nn.DenseGeneral(
            features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioning.boxed(self.kernel_init, names),
            bias_init=partitioning.boxed(nn.initializers.zeros_init(), out_names),
            dot_general=self.dot_general, name=name)

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array | None = None,
                 mask: Array | None = None, *, is_causal: bool = False,
                 key_valid: Array | None = None, deterministic: bool = True) -> Array:
        """Attend from inputs_q [batch, q_len, features] to inputs_kv (default: inputs_q).

        mask: bool broadcastable to [batch, heads, q_len, kv_len] (True = attend).
        is_causal: causal self-attention (when decoding, relative to the cached tokens).
        key_valid: bool [batch, kv_len], False for padding keys; in decode mode it is stored
          in the cache so padded prompt positions stay masked for all later tokens.
        Returns [batch, q_len, out_features]; the attention weights are sown into the
        `intermediates` collection (reference implementation).
        """
        features = inputs_q.shape[-1]
        head_dim = self.head_dim or features // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        if head_dim * self.num_heads != features and self.head_dim is None:
            raise ValueError(f"features ({features}) is not divisible by num_heads "
                             f"({self.num_heads}); set head_dim explicitly")
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({kv_heads})")
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if self.decode and not self_attention:
            raise ValueError("decode=True caches self-attention only; cross-attention "
                             "recomputes keys from the (fixed) encoder output")

        if self.fused_qkv:
            if not self_attention:
                raise ValueError("fused_qkv projects one input; cross-attention needs "
                                 "separate projections (fused_qkv=False)")
            qkv = self._dense((self.num_heads + 2 * kv_heads, head_dim),
                              ("embed", "qkv", "kv"), name="qkv")(inputs_q)
            query, key, value = jnp.split(qkv, [self.num_heads, self.num_heads + kv_heads],
                                          axis=-2)
        else:
            query = self._dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                name="query")(inputs_q)
            key = self._dense((kv_heads, head_dim), ("embed", "kv_heads", "kv"),
                              name="key")(inputs_kv)
            value = self._dense((kv_heads, head_dim), ("embed", "kv_heads", "kv"),
                                name="value")(inputs_kv)
        query = partitioning.constrain(query, _HEADS_ACTIVATION)
        key = partitioning.constrain(key, _HEADS_ACTIVATION)
        value = partitioning.constrain(value, _HEADS_ACTIVATION)

        if self.decode:
            key, value, mask = self._update_cache(key, value, mask, is_causal, key_valid)
            is_causal = False  # folded into the cache mask
        elif key_valid is not None:
            mask = combine_masks(mask, padding_mask(None, key_valid))

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        result = dot_product_attention(
            query, key, value, mask, is_causal=is_causal, implementation=self.implementation,
            return_weights=self.implementation == "reference", dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng, deterministic=deterministic,
            dot_general=self.dot_general)
        if self.implementation == "reference":
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        out_features = self.out_features or features
        result = partitioning.constrain(result, _HEADS_ACTIVATION)
        if self.head_gates:  # [batch, length, heads, head_dim] * z[heads]
            result = gates.UnitGate(self.num_heads, name="head_gate")(
                jnp.swapaxes(result, -1, -2), deterministic).swapaxes(-1, -2)
        return self._dense(out_features, ("heads", "kv", "embed"), axis=(-2, -1),
                           name="out")(result)

    def _update_cache(self, key, value, mask, is_causal, key_valid):
        """Write this chunk's keys/values at cache_index; return the whole cache and mask."""
        batch, chunk = key.shape[:2]
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                     value.dtype)
        cache_valid = self.variable("cache", "cache_valid", jnp.zeros, key.shape[:2], bool)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:
            # `init` call: the input length defines the cache length; attend normally.
            valid = jnp.ones((batch, chunk), bool) if key_valid is None else key_valid
            full_mask = padding_mask(None, valid)
            if is_causal:
                full_mask = combine_masks(full_mask, causal_mask(chunk))
            return key, value, combine_masks(mask, full_mask)
        max_length = cached_key.value.shape[1]
        if cached_key.value.shape[0] != batch:
            raise ValueError(f"KV cache was initialized for batch {cached_key.value.shape[0]}"
                             f", got batch {batch}")
        index = cache_index.value
        valid = jnp.ones((batch, chunk), bool) if key_valid is None else key_valid
        cached_key.value = lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
        cached_value.value = lax.dynamic_update_slice(cached_value.value, value,
                                                      (0, index, 0, 0))
        cache_valid.value = lax.dynamic_update_slice(cache_valid.value, valid, (0, index))
        cache_index.value = index + chunk
        # Unwritten cache slots are still False in cache_valid, so they are never attended.
        full_mask = padding_mask(None, cache_valid.value)
        if is_causal:
            full_mask = combine_masks(full_mask, causal_mask(chunk, max_length, offset=index))
        return cached_key.value, cached_value.value, combine_masks(mask, full_mask)
