"""Attention: a worked toy example, a float64 NumPy reference, masks, grads, errors."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from models.layers import attention as A

# ----------------------------------------------------------------------------------------
# A popular worked example ("the brown fox"): 3 tokens, d_model 4, d_k = d_v = 2.
# ----------------------------------------------------------------------------------------
X = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
WQ1 = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], np.float32)
WK1 = np.array([[0, 1], [1, 0], [0, 0], [0, 0]], np.float32)
WV1 = WQ1
WQ2, WK2, WV2 = WK1, WQ1, WK1  # head 2 of the example

# Softmax([0, 1/sqrt(2), 0]) exactly. The popular write-up prints [0.244, 0.512, 0.244]: that
# is what e^0.707 ~= 2.1 would give (2.1 / 4.1 = 0.512); e^(1/sqrt 2) is 2.0281, so the true
# weights are 1/(2+e^(1/sqrt 2)) = 0.248255 and e^(1/sqrt 2)/(2+e^(1/sqrt 2)) = 0.503490. The
# test asserts the exact values (the rounded rows still sum to 1, so the error is easy to
# miss).
E = math.exp(1 / math.sqrt(2))
LO, HI, THIRD = 1 / (2 + E), E / (2 + E), 1 / 3
EXPECTED_WEIGHTS = np.array([[LO, HI, LO], [HI, LO, LO], [THIRD, THIRD, THIRD]])
EXPECTED_HEAD1 = np.array([[LO, HI], [HI, LO], [THIRD, THIRD]])
EXPECTED_HEAD2 = np.array([[HI, LO], [LO, HI], [THIRD, THIRD]])


def test_toy_example_single_head():
    q, k, v = X @ WQ1, X @ WK1, X @ WV1
    np.testing.assert_array_equal(q, [[1, 0], [0, 1], [0, 0]])  # step 1: Q = X W_Q
    np.testing.assert_array_equal(k, [[0, 1], [1, 0], [0, 0]])
    as4d = lambda a: jnp.asarray(a)[None, :, None, :]  # noqa: E731 [1, 3, 1, 2]
    out, weights = A.dot_product_attention(as4d(q), as4d(k), as4d(v), return_weights=True)
    np.testing.assert_allclose(weights[0, 0], EXPECTED_WEIGHTS, atol=1e-6)
    np.testing.assert_allclose(out[0, :, 0], EXPECTED_HEAD1, atol=1e-6)


def test_toy_example_two_heads_module():
    """MultiHeadAttention with the example's W_Q, W_K, W_V per head and W_O = I (no biases)."""
    mha = A.MultiHeadAttention(num_heads=2, use_bias=False)
    stack = lambda w1, w2: np.stack([w1, w2], axis=1)  # [4, heads=2, head_dim=2]  # noqa
    params = {"query": {"kernel": stack(WQ1, WQ2)}, "key": {"kernel": stack(WK1, WK2)},
              "value": {"kernel": stack(WV1, WV2)},
              "out": {"kernel": np.eye(4, dtype=np.float32).reshape(2, 2, 4)}}
    shapes = nn.unbox(jax.eval_shape(mha.init, jax.random.key(0), jnp.asarray(X)[None])["params"])
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, params)
    out, state = mha.apply({"params": params}, jnp.asarray(X)[None],
                           mutable=["intermediates"])
    expected = np.concatenate([EXPECTED_HEAD1, EXPECTED_HEAD2], axis=1)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    # Token 1 = [0.248, 0.503, 0.503, 0.248] (rounded write-up: [0.244, 0.512, 0.512, 0.244]).
    np.testing.assert_allclose(out[0, 0], [LO, HI, HI, LO], atol=1e-6)
    weights = state["intermediates"]["attention_weights"][0]  # [1, heads, 3, 3]
    np.testing.assert_allclose(weights[0, 1], EXPECTED_WEIGHTS, atol=1e-6)  # head 2 = head 1


# ----------------------------------------------------------------------------------------
# Float64 NumPy reference.
# ----------------------------------------------------------------------------------------
def reference_attention(q, k, v, mask=None):
    """float64: q [b, lq, h, d], k/v [b, lk, hk, d]; mask broadcastable to [b, h, lq, lk]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    reps = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, reps, axis=2), np.repeat(v, reps, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v), w


def _random_qkv(seed, b=2, lq=5, lk=7, h=4, hk=4, d=8, dv=8):
    r = np.random.default_rng(seed)
    return (r.normal(size=(b, lq, h, d)).astype(np.float32),
            r.normal(size=(b, lk, hk, d)).astype(np.float32),
            r.normal(size=(b, lk, hk, dv)).astype(np.float32))


def _masks(b=2, lq=5, lk=7):
    key_valid = np.ones((b, lk), bool)
    key_valid[0, 5:] = False
    key_valid[1, 3:] = False
    causal = np.asarray(A.causal_mask(lq, lk))
    padding = np.asarray(A.padding_mask(None, key_valid))
    return {"none": None, "causal": causal, "padding": padding,
            "causal+padding": np.asarray(A.combine_masks(causal, padding))}


@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal+padding"])
@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_matches_float64_reference(mask_name, implementation):
    q, k, v = _random_qkv(0)
    mask = _masks()[mask_name]
    expected, expected_w = reference_attention(q, k, v, mask)
    out = A.dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask),
                                  implementation=implementation)
    assert out.shape == (2, 5, 4, 8)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    if implementation == "reference":
        _, w = A.dot_product_attention(q, k, v, mask, return_weights=True)
        np.testing.assert_allclose(w, expected_w, atol=1e-6)
        if mask is not None:  # masked keys get exactly zero weight
            assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] == 0.0)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_is_causal_flag_equals_explicit_mask_and_gqa(implementation):
    q, k, v = _random_qkv(1, lq=6, lk=6, h=4, hk=2)  # grouped-query: 2 kv heads for 4 heads
    expected, _ = reference_attention(q, k, v, np.asarray(A.causal_mask(6)))
    out = A.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_causal_mask_with_offset():
    m = np.asarray(A.causal_mask(2, 5, offset=2))[0, 0]
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):  # float64 so finite differences are meaningful
        q, k, v = (jnp.asarray(a, jnp.float64)
                   for a in _random_qkv(2, b=1, lq=3, lk=4, h=2, hk=2, d=4, dv=4))
        mask = jnp.asarray(A.causal_mask(3, 4))
        f = lambda q, k, v: A.dot_product_attention(q, k, v, mask)  # noqa: E731
        check_grads(f, (q, k, v), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)
        fused = lambda q, k, v: A.dot_product_attention(  # noqa: E731
            q, k, v, mask, implementation="fused")
        loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
        g_ref = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
        g_fused = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g_ref, g_fused):
            np.testing.assert_allclose(a, b, atol=1e-6)  # fused softmax is float32


# ----------------------------------------------------------------------------------------
# Fully masked rows: a query with no visible key gets a zero output (module docstring).
# ----------------------------------------------------------------------------------------
def _fully_masked_cases():
    r = np.random.default_rng(7)
    query_valid, key_valid = np.ones((2, 5), bool), np.ones((2, 7), bool)
    query_valid[0, 3:] = query_valid[1, 0] = False           # padded queries
    key_valid[1, 5:] = False
    per_head = r.uniform(size=(2, 4, 5, 7)) < 0.6
    per_head[0, 1, 2] = per_head[1, :, 4] = False            # one head's row, all heads' row
    left_padded = np.ones((2, 7), bool)
    left_padded[1, :2] = False   # causal: query 0 (and 1) of example 1 sees only padding
    return {"query+key padding": (np.asarray(A.padding_mask(query_valid, key_valid)), False),
            "per-head": (per_head, False),
            "causal+left padding": (np.asarray(A.padding_mask(None, left_padded)), True)}


@pytest.mark.parametrize("case", list(_fully_masked_cases()))
def test_fully_masked_rows_are_zero_and_both_implementations_agree(case):
    mask, is_causal = _fully_masked_cases()[case]
    q, k, v = _random_qkv(8, h=4, hk=2)
    full = A.combine_masks(mask, A.causal_mask(5, 7)) if is_causal else mask
    full = np.broadcast_to(np.asarray(full), (2, 4, 5, 7))
    empty = ~full.any(-1)                                    # [b, h, q]
    assert 2 <= empty.sum() < empty.size
    ref, w = A.dot_product_attention(q, k, v, jnp.asarray(mask), is_causal=is_causal,
                                     return_weights=True)
    fused = A.dot_product_attention(q, k, v, jnp.asarray(mask), is_causal=is_causal,
                                    implementation="fused")
    rows = empty.transpose(0, 2, 1)                          # [b, q, h] of the output
    for out in (ref, fused):
        assert np.all(np.asarray(out)[rows] == 0.0) and np.all(np.isfinite(out))
    assert np.all(np.asarray(w)[empty] == 0.0)
    np.testing.assert_allclose(fused, ref, atol=1e-6)
    # The other rows: the float64 softmax over their visible keys, as before.
    expected, expected_w = reference_attention(q, k, v, full | empty[..., None])
    np.testing.assert_allclose(np.asarray(ref)[~rows], expected[~rows], atol=2e-5)
    np.testing.assert_allclose(np.asarray(w)[~empty], expected_w[~empty], atol=1e-6)


def test_fully_masked_rows_have_finite_zero_gradients():
    mask, _ = _fully_masked_cases()["per-head"]
    empty_rows = ~mask.any(-1).transpose(0, 2, 1)            # [b, q, h]
    q, k, v = (jnp.asarray(a) for a in _random_qkv(9, h=4, hk=2))
    attend = {impl: lambda q, k, v, impl=impl: A.dot_product_attention(
        q, k, v, jnp.asarray(mask), implementation=impl) for impl in A.IMPLEMENTATIONS}
    grads = {impl: jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(
        q, k, v) for impl, f in attend.items()}
    for g in grads.values():
        assert all(np.all(np.isfinite(x)) for x in g)
        assert np.all(np.asarray(g[0])[empty_rows] == 0.0)  # nothing flows into those queries
    for a, b in zip(grads["reference"], grads["fused"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with jax.enable_x64(True):  # float64 finite differences (the fused softmax is float32)
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v))
        check_grads(attend["reference"], args, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_dot_general_hook_is_used_for_both_products():
    calls = []

    def counting_dot_general(*args, **kwargs):
        calls.append(args[2])
        return jax.lax.dot_general(*args, **kwargs)

    q, k, v = _random_qkv(3)
    A.dot_product_attention(q, k, v, dot_general=counting_dot_general)
    assert len(calls) == 2


def test_dropout_on_weights():
    q, k, v = _random_qkv(4)
    kw = dict(dropout_rate=0.5, deterministic=False)
    a = A.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), **kw)
    b = A.dot_product_attention(q, k, v, dropout_rng=jax.random.key(1), **kw)
    plain = A.dot_product_attention(q, k, v)
    assert not np.allclose(a, b) and not np.allclose(a, plain)
    with pytest.raises(ValueError, match="dropout_rng"):
        A.dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("kwargs,shapes,message", [
    ({}, dict(d=8, dk=4), "head_dim"),
    ({}, dict(hk=3), "multiple of key/value heads"),
    ({}, dict(lv=6), "must share"),
    ({"mask": np.ones((2, 1, 5, 6), bool)}, {}, "does not broadcast"),
    ({"mask": np.ones((2, 1, 5, 7), np.float32)}, {}, "boolean"),
    ({"implementation": "flash"}, {}, "allowed"),
    ({"implementation": "fused", "return_weights": True}, {}, "reference"),
])
def test_bad_inputs_name_the_problem(kwargs, shapes, message):
    r = np.random.default_rng(0)
    d, dk, hk, lv = shapes.get("d", 8), shapes.get("dk", 8), shapes.get("hk", 4), shapes.get(
        "lv", 7)
    q = r.normal(size=(2, 5, 4, d)).astype(np.float32)
    k = r.normal(size=(2, 7, hk, dk)).astype(np.float32)
    v = r.normal(size=(2, lv, hk, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        A.dot_product_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------------------
# MultiHeadAttention: fused QKV, cross-attention, KV cache.
# ----------------------------------------------------------------------------------------
def test_fused_qkv_equals_separate_projections():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    sep = A.MultiHeadAttention(num_heads=4)
    fused = A.MultiHeadAttention(num_heads=4, fused_qkv=True)
    p = nn.unbox(sep.init(jax.random.key(1), x)["params"])
    qkv = {n: jnp.concatenate([p[k][n] for k in ("query", "key", "value")], axis=-2)
           for n in ("kernel", "bias")}
    pf = {"qkv": qkv, "out": p["out"]}
    np.testing.assert_allclose(fused.apply({"params": pf}, x, is_causal=True),
                               sep.apply({"params": p}, x, is_causal=True), atol=1e-6)


def test_cross_attention_shapes_and_key_padding():
    mha = A.MultiHeadAttention(num_heads=2, out_features=6)
    xq = jax.random.normal(jax.random.key(0), (2, 3, 8))
    xkv = jax.random.normal(jax.random.key(1), (2, 5, 8))
    p = mha.init(jax.random.key(2), xq, xkv)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = mha.apply(p, xq, xkv, key_valid=valid)
    assert out.shape == (2, 3, 6)
    changed = xkv.at[0, 3:].set(100.0)  # padded keys of example 0 changed
    np.testing.assert_allclose(mha.apply(p, xq, changed, key_valid=valid), out, atol=1e-6)


@pytest.mark.parametrize("chunks", [[1] * 6, [4, 1, 1], [3, 3]])
def test_kv_cache_matches_full_causal_attention(chunks):
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    mha = A.MultiHeadAttention(num_heads=4, num_kv_heads=2)
    params = mha.init(jax.random.key(1), x)["params"]
    full = mha.apply({"params": params}, x, is_causal=True)
    dec = mha.clone(decode=True)
    cache = jax.tree.map(jnp.zeros_like, dec.init(jax.random.key(1), x)["cache"])
    outs, start = [], 0
    for n in chunks:
        out, vars_ = dec.apply({"params": params, "cache": cache}, x[:, start:start + n],
                               is_causal=True, mutable=["cache"])
        cache, start = vars_["cache"], start + n
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    assert int(cache["cache_index"]) == 6
