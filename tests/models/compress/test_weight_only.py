"""Weight-only int8 decoding (models/compress/weight_only.py) against float64 references,
the float model, closed-form byte counts and the compiled program's buffers."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import decoding as D
from models import transformer as T
from models.compress import weight_only as W

EPS32 = np.finfo(np.float32).eps
V = 96
# d_model 64, MLP 256, 4 heads: big enough that XLA:CPU's fusion heuristics keep every
# int8 kernel of the "reduce" decode step inside its reduction (smaller kernels may be
# multiplied out first; `int8_operand_report` says so either way).
SHAPE = dict(d_model=64, mlp_dim=256, num_heads=4, max_length=24)


def _random_params(model, tokens, seed=0):
    """N(0, 0.2^2) kernels / tables, N(0, 0.1^2) biases, 1 + N(0, 0.1^2) norm scales: a
    model whose greedy tokens vary (the 0.02-std init emits one token forever)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * r.normal(size=s.shape), s.dtype)
        return jnp.asarray((0.1 if name == "bias" else 0.2) * r.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def _model(scan=False, tie=True, vocab=V):
    """(Decoder, random params, tokens int [2, 6])."""
    cfg = T.make_config("tiny", vocab_size=vocab, scan_layers=scan, tie_embeddings=tie,
                        **SHAPE)
    model = T.Decoder(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (2, 6)), jnp.int32)
    return model, _random_params(model, tokens), tokens


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens):
    return model.apply({"params": params}, tokens)


def _generate(model, params, tokens, steps):
    return D.generate(model, params, tokens, max_new_tokens=steps, temperature=0.0)


# ----------------------------------------------------------------------------------------
# The matmul.
# ----------------------------------------------------------------------------------------
# (lhs shape, rhs shape, dims): Dense, q/k/v DenseGeneral, attention out, tied x E^T.
LAYOUTS = [((1, 1, 24), (24, 40), (((2,), (0,)), ((), ()))),
           ((2, 3, 24), (24, 40), (((2,), (0,)), ((), ()))),
           ((1, 1, 24), (24, 2, 8), (((2,), (0,)), ((), ()))),
           ((1, 1, 2, 8), (2, 8, 24), (((2, 3), (0, 1)), ((), ()))),
           ((1, 1, 24), (40, 24), (((2,), (1,)), ((), ())))]


@pytest.mark.parametrize("impl", W.IMPLS)
@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", LAYOUTS)
def test_matmul_equals_float64_reference_within_float32_rounding(impl, lhs_shape, rhs_shape,
                                                                 dims):
    r = np.random.default_rng(0)
    x = r.normal(size=lhs_shape).astype(np.float32)
    q = r.integers(-127, 128, rhs_shape).astype(np.int8)
    keep = tuple(1 if d in dims[0][1] else n for d, n in enumerate(rhs_shape))
    s = r.uniform(0.001, 0.02, keep).astype(np.float32)
    out = W.weight_only_dot_general(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), dims,
                                    impl=impl)
    assert out.dtype == jnp.float32
    w64 = q.astype(np.float64) * s.astype(np.float64)
    (lc, rc), _ = dims
    ref = np.tensordot(x.astype(np.float64), w64, axes=(lc, rc))
    mag = np.tensordot(np.abs(x).astype(np.float64), np.abs(w64), axes=(lc, rc))
    k = int(np.prod([lhs_shape[d] for d in lc]))
    # A float32 dot of length k: |error| <= k eps sum|x w| (plus the rescale's rounding).
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - ref),
                                 (k + 2) * EPS32 * mag + 1e-30)
    assert np.abs(ref).max() > 10 * (k + 2) * EPS32 * mag.max()   # not a vacuous bound


def test_bf16_matmul_keeps_the_integers_exact_and_rounds_once():
    r = np.random.default_rng(1)
    x = jnp.asarray(r.normal(size=(1, 64)), jnp.bfloat16)
    q = jnp.asarray(r.integers(-127, 128, (64, 32)), jnp.int8)
    s = jnp.asarray(r.uniform(0.001, 0.02, (1, 32)), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    out = W.weight_only_dot_general(x, q, s, dims)
    assert out.dtype == jnp.bfloat16
    # q is exact in bf16 and the product accumulates in float32: the only bf16 rounding
    # is the output's, half an ulp (2^-8 relative) of the float64 result.
    ref = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64))
    rel = np.abs(np.asarray(out, np.float64) - ref) / np.abs(ref)
    assert rel.max() <= 2.0 ** -8 + 1e-6


# ----------------------------------------------------------------------------------------
# Params.
# ----------------------------------------------------------------------------------------
def test_quantize_params_stores_int8_and_per_channel_scales_within_half_a_step():
    model, params, _ = _model()
    wo = W.quantize_params(params)
    layer = wo["decoder"]["layers_0"]
    assert layer["mlp"]["fc1"]["kernel"].dtype == jnp.int8
    assert layer["mlp"]["fc1"]["kernel_scale"].shape == (1, 256)          # [in, out]
    assert layer["self_attention"]["query"]["kernel_scale"].shape == (1, 4, 16)
    assert layer["self_attention"]["out"]["kernel_scale"].shape == (1, 1, 64)
    assert wo["embed"]["tokens"]["embedding"].dtype == jnp.int8          # tied: x E^T
    assert wo["embed"]["tokens"]["embedding_scale"].shape == (V, 1)      # one per row
    # Lookup-only tables and non-kernels stay float and unchanged.
    np.testing.assert_array_equal(wo["embed"]["positions"]["embedding"],
                                  params["embed"]["positions"]["embedding"])
    np.testing.assert_array_equal(layer["mlp"]["fc1"]["bias"],
                                  params["decoder"]["layers_0"]["mlp"]["fc1"]["bias"])
    # Symmetric int8: s = max|w| / 127 per output, |w - q s| <= s / 2.
    w = np.asarray(params["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"], np.float64)
    s = np.asarray(layer["mlp"]["fc1"]["kernel_scale"], np.float64)
    np.testing.assert_allclose(s, np.abs(w).max(0, keepdims=True) / 127, rtol=1e-6)
    deq = np.asarray(W.dequantize_params(wo)["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
    assert np.all(np.abs(deq - w) <= s / 2 * (1 + 1e-5))
    assert "kernel_scale" not in W.dequantize_params(wo)["decoder"]["layers_0"]["mlp"]["fc1"]
    # Untied: the token table is only looked up (float), the logits kernel is int8.
    _, untied, _ = _model(tie=False)
    wo_untied = W.quantize_params(untied, tied=False)
    assert wo_untied["embed"]["tokens"]["embedding"].dtype == jnp.float32
    assert wo_untied["unembed"]["logits"]["kernel"].dtype == jnp.int8


def test_bytes_per_token_closed_forms():
    model, params, _ = _model()
    cfg = model.cfg
    d, m, L = cfg.d_model, cfg.mlp_dim, cfg.num_layers
    n_matmul = L * (4 * d * d + 2 * d * m) + V * d           # kernels + tied table
    n_out = L * (4 * d + m + d) + V                           # output channels (scales)
    n_other = L * (4 * d + m + d + 4 * d) + 2 * d             # biases, 2 norms a layer, final
    f32, wo = W.bytes_per_token(params), W.bytes_per_token(W.quantize_params(params))
    bf16 = W.bytes_per_token(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert f32["matmul"] == 4 * n_matmul and bf16["matmul"] == 2 * n_matmul
    assert wo["matmul"] == n_matmul == bf16["matmul"] // 2
    assert wo["scales"] == 4 * n_out and f32["scales"] == 0
    assert f32["other"] == wo["other"] == 4 * n_other
    assert f32["lookup_rows"] == 4 * d                        # one position row
    assert wo["total"] == n_matmul + 4 * n_out + 4 * n_other + 4 * d
    assert f32["storage"] == 4 * (n_matmul + n_other + cfg.max_length * d)


def test_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="impl='int4'"):
        W.WeightOnlyDotGeneral("int4")
    with pytest.raises(ValueError, match="mixture of experts"):
        W.quantize_params({"decoder": {"layers_1": {"moe": {"fc1": {
            "kernel": jnp.ones((4, 8, 8))}}}}})
    model, params, tokens = _model()
    with pytest.raises(ValueError, match="WeightOnlyDotGeneral"):
        _apply(W.WeightOnlyDecoder(model.cfg), params, tokens)
    # A Dense that bypasses the hook (the distillation hint) stays float; forced to int8,
    # the decoder refuses rather than multiply unscaled integers.
    hinted = T.Decoder(model.cfg.replace(hint_dim=8))
    hinted_params = _random_params(hinted, tokens)
    wo_model, wo = W.weight_only_int8(hinted, hinted_params, dtype=None)
    assert wo["decoder"]["hint"]["kernel"].dtype == jnp.float32
    wo["decoder"]["hint"] = {"kernel": jnp.ones((64, 8), jnp.int8), "bias": jnp.zeros(8),
                             "kernel_scale": jnp.ones((1, 8))}
    with pytest.raises(ValueError, match="not multiplied through the dot_general hook"):
        _apply(wo_model, wo, tokens)


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _kernel_error_bound(params, wo) -> float:
    """Sum over the quantized matmuls of ||W - Q S||_F / ||W||_F, each bounded in closed
    form by its scales: every element is within s_j / 2, so ||W - Q S||_F^2 <=
    (numel / outputs) sum_j (s_j / 2)^2."""
    total = 0.0

    def visit(f, q):
        nonlocal total
        for key, leaf in q.items():
            if isinstance(leaf, dict):
                visit(f[key], leaf)
            elif key + W.SCALE_SUFFIX in q:
                s = np.asarray(q[key + W.SCALE_SUFFIX], np.float64)
                per_scale = np.asarray(leaf).size / s.size
                total += np.sqrt(per_scale * np.sum((s / 2) ** 2)) / np.linalg.norm(
                    np.asarray(f[key], np.float64))
    visit(params, wo)
    return total


@pytest.mark.parametrize("scan", [False, True])
def test_logits_equal_the_dequantized_model_and_stay_within_the_quantization_bound(scan):
    model, params, tokens = _model(scan=scan)
    # (Whole sequences: 12 rows a matmul, the "dot" path of either impl.)
    wo_model, wo = W.weight_only_int8(model, params, dtype=None)
    logits = _apply(wo_model, wo, tokens)
    # Every kernel is scaled exactly once: the float model on q * s, up to float32 rounding.
    ref = _apply(model, W.dequantize_params(wo), tokens)
    assert _rel(logits, ref) < 1e-5
    if scan:            # the scanned stack reads the same scales (one slice a layer)
        return
    # Against the float weights: first order, each matmul adds at most its kernel's
    # relative error (bounded by the scales) to the logits' relative error.
    exact = _apply(model, params, tokens)
    err, bound = _rel(logits, exact), _kernel_error_bound(params, wo)
    assert 0 < err < bound < 0.5, (err, bound)


def test_generate_gives_the_float_models_greedy_tokens():
    # A 32-token vocabulary: with these params every greedy pick below wins by a margin
    # the quantization error cannot close (checked), so the tokens must agree.
    model, params, tokens = _model(vocab=32)
    steps = 6
    float_out, _ = _generate(model, params, tokens, steps)
    # Teacher-forced logits of the float continuation: the margin of each greedy pick.
    seq = jnp.concatenate([tokens, float_out[:, :-1]], axis=1)
    exact = np.asarray(_apply(model, params, seq))[:, tokens.shape[1] - 1:]
    top2 = np.sort(exact, axis=-1)[..., -2:]
    # "reduce": the prompt's matmuls (12 rows) take the dot, each new token (1 row) the
    # multiply + sum -- both paths feed the tokens ("dot" alone is the prompt's path).
    for impl in ("reduce",):
        wo_model, wo = W.weight_only_int8(model, params, impl=impl, dtype=None)
        wo_out, lengths = _generate(wo_model, wo, tokens, steps)
        quant = np.asarray(_apply(wo_model, wo, seq))[:, tokens.shape[1] - 1:]
        gap = np.abs(quant - exact).max(axis=-1)                  # [B, steps]
        assert 0 < gap.max() < 0.05 * np.abs(exact).max()
        # Each pick wins by more than twice that step's largest logit error: it survives.
        assert np.all(top2[..., 1] - top2[..., 0] > 2 * gap), impl
        np.testing.assert_array_equal(wo_out, float_out)
        np.testing.assert_array_equal(lengths, [steps, steps])
    assert len(np.unique(np.asarray(float_out))) > 2      # the tokens do vary


# ----------------------------------------------------------------------------------------
# What the compiled program reads.
# ----------------------------------------------------------------------------------------
def _compiled_step(impl):
    model, params, tokens = _model()
    wo_model, wo = W.weight_only_int8(model, params, impl=impl, dtype=None)
    cache = D.init_decoder_cache(wo_model, 1, 8)
    step = jax.jit(functools.partial(W.decode_step, wo_model))
    compiled = step.lower(wo, cache, tokens[:1, :1]).compile()
    kernels = [np.asarray(x) for x in jax.tree.leaves(wo) if x.dtype == jnp.int8]
    return compiled, kernels


def test_operand_report_reads_dots_and_reductions_of_int8_weights():
    x = jnp.ones((1, 64), jnp.float32)
    w = jnp.ones((64, 128), jnp.int8)
    dims = (((1,), (0,)), ((), ()))
    via_dot = jax.jit(lambda x, w: lax.dot_general(x, w.astype(x.dtype), dims))
    via_reduce = jax.jit(lambda x, w: W.weight_only_dot_general(
        x, w, jnp.ones((1, 128)), dims, impl="reduce"))
    fused = W.int8_operand_report(via_reduce.lower(x, w).compile().as_text())
    assert fused["int8_params"] == fused["fused"] == 1 and fused["all_fused"]
    if jax.default_backend() == "cpu":     # XLA:CPU converts a dot's operand in a buffer
        mat = W.int8_operand_report(via_dot.lower(x, w).compile().as_text())
        assert mat["materialized"] == 1 and not mat["all_fused"]


_HAND_WRITTEN_HLO = """HloModule m

%fused_convert (p0: s8[64,128]) -> f32[64,128] {
  %p0 = s8[64,128]{1,0} parameter(0)
  ROOT %c0 = f32[64,128]{1,0} convert(%p0)
}

%command_buffer (a.1: s8[64,128], x.1: f32[1,64], b.1: s8[64,128]) -> (f32[64,128], f32[1,128]) {
  %a.1 = s8[64,128]{1,0} parameter(0)
  %x.1 = f32[1,64]{1,0} parameter(1)
  %b.1 = s8[64,128]{1,0} parameter(2)
  %wrapped = f32[64,128]{1,0} fusion(%a.1), kind=kLoop, calls=%fused_convert
  %gemm = bf16[1,128]{1,0} fusion(%x.1, %b.1), kind=kCustom, calls=%fused_gemm
  ROOT %t = (f32[64,128]{1,0}, bf16[1,128]{1,0}) tuple(%wrapped, %gemm)
}

ENTRY %main (a: s8[64,128], b: s8[64,128], c: s8[8,8], x: f32[1,64]) -> bf16[1,128] {
  %a = s8[64,128]{1,0} parameter(0)
  %b = s8[64,128]{1,0} parameter(1)
  %c = s8[8,8]{1,0} parameter(2)
  %x = f32[1,64]{1,0} parameter(3)
  %bc = s8[8,8]{1,0} bitcast(%c)
  %loop = s8[8,8]{1,0} while(%bc), condition=%cond, body=%body
  %call = (f32[64,128]{1,0}, bf16[1,128]{1,0}) call(%a, %x, %b), to_apply=%command_buffer
  ROOT %r = bf16[1,128]{1,0} get-tuple-element(%call), index=1
}
"""


def test_operand_report_follows_calls_and_stops_at_loops():
    # a: converted to a float copy inside a command-buffer call; b: read by the gemm
    # fusion there; c: (through a bitcast) into a while loop, not followed.
    report = W.int8_operand_report(_HAND_WRITTEN_HLO)
    assert (report["int8_params"], report["fused"], report["materialized"],
            report["opaque"]) == (3, 1, 1, 1)
    assert report["materialized_params"] == ["a"] and not report["all_fused"]


def test_decode_step_reads_the_int8_kernels_without_a_dequantized_copy():
    compiled, kernels = _compiled_step("reduce")
    report = W.int8_operand_report(compiled.as_text())
    assert report["int8_params"] == len(kernels) == 13 and report["all_fused"], report
    # Temp memory below even one kernel dequantized to float32, let alone all of them.
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * max(k.size for k in kernels) < 4 * sum(k.size for k in kernels)
    if jax.default_backend() == "cpu":
        dot, _ = _compiled_step("dot")
        dot_report = W.int8_operand_report(dot.as_text())
        assert dot_report["materialized"] == 13
        assert dot.memory_analysis().temp_size_in_bytes >= 4 * max(k.size for k in kernels)
