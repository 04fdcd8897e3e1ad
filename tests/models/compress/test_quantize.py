"""Integer quantization: textbook formulas, error bounds, storage, STE, trees, a real GPT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.compress import quantize as Q


def _columns(seed=0, shape=(6, 5)):
    """A kernel whose columns have very different ranges (per-channel matters)."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return x * np.float32([0.01, 0.1, 1.0, 10.0, 3.0])[: shape[-1]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_at_most_half_a_step_per_channel_and_values_in_range(bits, symmetric):
    x = _columns()
    qa = Q.quantize(x, bits, symmetric, per_channel=True)
    assert qa.scale.shape == (1, 5) and qa.scale.dtype == jnp.float32
    err = np.abs(np.asarray(qa.dequantize(), np.float64) - x)
    step = np.asarray(qa.scale, np.float64)
    assert np.all(err <= step / 2 * (1 + 1e-6))
    qmin, qmax = Q.qrange(bits, symmetric)
    q = np.asarray(qa.integers())
    assert q.min() >= qmin and q.max() <= qmax
    assert (qmin, qmax) == ((-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric
                            else (0, 2 ** bits - 1))


def test_scales_zero_points_and_integers_match_the_formulas():
    x = _columns(1)
    lo, hi = np.minimum(x.min(0), 0).astype(np.float64), np.maximum(x.max(0), 0)
    sym = Q.quantize(x, 8, True, axes=0)
    np.testing.assert_allclose(sym.scale[0], np.abs(x).max(0) / 127, rtol=1e-6)
    s = np.asarray(sym.scale)    # float32 division, as the implementation does it
    np.testing.assert_array_equal(sym.integers(), np.clip(np.round(x / s), -127, 127))
    assert sym.values.dtype == jnp.int8 and sym.zero_point is None

    asym = Q.quantize(x, 8, False, axes=0)
    np.testing.assert_allclose(asym.scale[0], (hi - lo) / 255, rtol=1e-6)
    s = np.asarray(asym.scale)
    z = np.round(-lo.astype(np.float32) / s[0])
    np.testing.assert_array_equal(asym.zero_point[0], z)
    np.testing.assert_array_equal(asym.integers(), np.clip(np.round(x / s) + z, 0, 255))
    assert asym.values.dtype == jnp.uint8 and asym.zero_point.dtype == jnp.uint8


@pytest.mark.parametrize("offset", [-3.0, 0.0, 2.0])   # all negative, mixed, all positive
def test_zero_maps_exactly_to_zero_with_zero_points(offset):
    x = np.random.default_rng(2).uniform(0.5, 2.0, (8, 4)).astype(np.float32)
    x = x + np.float32(offset)
    x[::3] = 0.0
    for bits in (8, 4, 3):
        qa = Q.quantize(x, bits, symmetric=False, per_channel=True)
        restored = np.asarray(qa.dequantize())
        assert np.all(restored[::3] == 0.0)
        np.testing.assert_array_equal(qa.integers()[::3], np.broadcast_to(qa.zero_point, (3, 4)))


def test_all_zero_channel_stays_exactly_zero():
    x = _columns(3)
    x[:, 2] = 0.0
    for symmetric in (True, False):
        qa = Q.quantize(x, 4, symmetric, per_channel=True)
        restored = np.asarray(qa.dequantize())
        assert np.all(np.isfinite(restored)) and np.all(restored[:, 2] == 0.0)
        assert float(qa.scale[0, 2]) == 1.0


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
    x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.49, 1.0, 1.01, 5.0])
    for symmetric in (True, False):
        g = jax.grad(lambda v: jnp.sum(Q.fake_quant(v, 4, symmetric, bounds=(-1.0, 1.0))))(x)
        np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 0, 0])
    # Chain rule through the STE: d/dx sum(c * fq(x)) = c inside.
    c = jnp.arange(1.0, 9.0)
    g = jax.grad(lambda v: jnp.sum(c * Q.fake_quant(v, 8, per_channel=False)))(x)
    np.testing.assert_array_equal(g, c)     # own range: every element inside


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fake_quant_forward_is_exactly_the_integer_path(bits):
    x = _columns(4)
    for symmetric in (True, False):
        fq = Q.fake_quant(x, bits, symmetric, per_channel=True)
        np.testing.assert_array_equal(fq, Q.quantize(x, bits, symmetric,
                                                     per_channel=True).dequantize())
    # Clipped values land on the range's ends.
    fq = Q.fake_quant(jnp.array([-9.0, 0.5, 9.0]), 8, True, bounds=(-1.0, 1.0))
    np.testing.assert_allclose(fq, [-1.0, round(0.5 * 127) / 127, 1.0], rtol=1e-6)


def _tree():
    rng = np.random.default_rng(5)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return {"dense": {"kernel": f(64, 32), "bias": f(32)},
            "norm": {"scale": f(32)},
            "decoder": {"layers": {"mlp": {"kernel": f(3, 4, 5)}}},
            "attn": {"query": {"kernel": f(32, 2, 16)}, "out": {"kernel": f(2, 16, 32)}},
            "embed": {"embedding": f(10, 32)}}


def test_tree_nbytes_matches_hand_counts():
    params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}}
    assert Q.tree_nbytes(params) == (64 * 32 + 32) * 4
    bias = 32 * 4
    assert Q.tree_nbytes(Q.quantize_tree(params, 8)) == 64 * 32 + 32 * 4 + bias
    assert Q.tree_nbytes(Q.quantize_tree(params, 8, symmetric=False)) == \
        64 * 32 + 32 * 4 + 32 + bias
    assert Q.tree_nbytes(Q.quantize_tree(params, 4)) == 64 * 32 // 2 + 32 * 4 + bias
    assert Q.tree_nbytes(Q.quantize_tree(params, 8, per_channel=False)) == 64 * 32 + 4 + bias
    odd = {"kernel": jnp.ones((5, 3))}
    assert Q.tree_nbytes(Q.quantize_tree(odd, 3)) == -(-15 * 3 // 8) + 3 * 4   # 6 + 12
    assert Q.tree_nbytes(jax.eval_shape(lambda: params)) == (64 * 32 + 32) * 4


def test_tree_scales_follow_the_kernel_layouts():
    qt = Q.quantize_tree(_tree(), 8)
    assert qt["dense"]["kernel"].scale.shape == (1, 32)
    assert qt["decoder"]["layers"]["mlp"]["kernel"].scale.shape == (3, 1, 5)  # per layer
    assert qt["attn"]["query"]["kernel"].scale.shape == (1, 2, 16)           # per feature
    assert qt["attn"]["out"]["kernel"].scale.shape == (1, 1, 32)
    assert isinstance(qt["embed"]["embedding"], jax.Array)      # embeddings not asked for
    assert isinstance(qt["dense"]["bias"], jax.Array)
    per_tensor = Q.quantize_tree(_tree(), 8, per_channel=False, include_embeddings=True)
    assert per_tensor["decoder"]["layers"]["mlp"]["kernel"].scale.shape == (3, 1, 1)
    assert per_tensor["embed"]["embedding"].scale.shape == (1, 1)
    with_emb = Q.quantize_tree(_tree(), 8, include_embeddings=True)
    assert with_emb["embed"]["embedding"].scale.shape == (10, 1)            # one per row


def test_fake_quant_tree_equals_the_dequantized_integer_tree_and_passes_gradients():
    params = _tree()
    def loss(p):
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(Q.fake_quant_tree(p, 4)))

    # One compiled program for the forward tree and the straight-through gradient.
    fq, g = jax.jit(lambda p: (Q.fake_quant_tree(p, 4), jax.grad(loss)(p)))(params)
    ref = Q.dequantize_tree(Q.quantize_tree(params, 4))
    jax.tree.map(np.testing.assert_array_equal, fq, ref)
    jax.tree.map(lambda l: np.testing.assert_array_equal(l, np.ones_like(l)), g)


def test_bad_input_errors_name_what_is_allowed():
    x = jnp.ones((4, 3))
    for bits in (1, 9, 16, 8.0, True):
        with pytest.raises(ValueError, match="allowed: integers 2..8"):
            Q.quantize(x, bits)
    with pytest.raises(ValueError, match="allowed: integers 2..8"):
        Q.quantize_tree({"kernel": x}, bits=12)
    with pytest.raises(ValueError, match="per-channel quantization needs >= 2 dims"):
        Q.quantize(jnp.ones(4), 8, per_channel=True)
    with pytest.raises(ValueError, match="allowed: -2..1"):
        Q.quantize(x, 8, axes=2)
    with pytest.raises(ValueError, match="not both"):
        Q.quantize(x, 8, axes=0, per_channel=True)
    with pytest.raises(ValueError, match="floating-point"):
        Q.quantize(jnp.ones((4, 3), jnp.int32), 8)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_gpt_weight_only_quantization(tiny_gpt, bits, symmetric):
    model, _, params, tokens = tiny_gpt
    qtree = Q.quantize_tree(params, bits=bits, symmetric=symmetric, per_channel=True)
    restored = Q.dequantize_tree(qtree)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, restored, params)
    assert all(jax.tree.leaves(same))
    # Weight-only inference: only integers cross the jit boundary for the kernels.
    kernel_dtypes = {str(l.values.dtype) for l in jax.tree.leaves(
        qtree, is_leaf=lambda l: isinstance(l, Q.QuantizedArray))
        if isinstance(l, Q.QuantizedArray)}
    assert kernel_dtypes == ({"int8"} if bits == 8 else {"uint8"})
    fwd = jax.jit(lambda q, x: model.apply({"params": Q.dequantize_tree(q)}, x))
    logits = fwd(qtree, tokens)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(logits, apply({"params": restored}, tokens),
                               rtol=1e-5, atol=1e-6)
    float_logits = apply({"params": params}, tokens)
    rel = float(jnp.abs(logits - float_logits).max() / jnp.abs(float_logits).max())
    assert rel < (0.02 if bits == 8 else 0.3)
    # Sizes: kernels at `bits` bits a weight (packed) + float32 scales (+ uint8 zero
    # points); embeddings, norms and biases at their float32 size.
    quantized = [l for l in jax.tree.leaves(qtree, is_leaf=lambda l: isinstance(
        l, Q.QuantizedArray)) if isinstance(l, Q.QuantizedArray)]
    kernels = [l for p, l in jax.tree_util.tree_leaves_with_path(params)
               if jax.tree_util.keystr(p).endswith("['kernel']")]
    assert len(quantized) == len(kernels) == 12
    floats = Q.tree_nbytes(params) - 4 * sum(k.size for k in kernels)
    packed = sum(-(-k.size * bits // 8) for k in kernels)
    side = sum(l.scale.size * (4 if symmetric else 5) for l in quantized)
    assert Q.tree_nbytes(qtree) == floats + packed + side


def test_dequantize_tree_keeps_bfloat16():
    half = jax.tree.map(lambda l: l.astype(jnp.bfloat16), _tree())
    restored = Q.dequantize_tree(Q.quantize_tree(half, 8))
    assert {l.dtype for l in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
