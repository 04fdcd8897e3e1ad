"""Decoder / Encoder / EncoderDecoder: causality, KV cache, padding, scan/remat, variants.

A float64 NumPy decoder pins the numbers (block structure, norms, positions); the other
tests check properties against it or against each other: causality, cache == no cache,
left padding == no padding, scanned == unrolled, each variant == its equivalent baseline.

Parameters are random (not the 0.02-std init, under which every logit is ~0 and a leak
through a mask would move outputs by less than the tolerances); every leaf, biases and
norm parameters included, is non-trivial. Forward passes are jitted and shared between
tests (`_fwd`, `_step`) so the file compiles each shape once.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding
from models import transformer as T

V = 13  # vocabulary

# On CPU, XLA's compile time dominates this file; backend optimization level 0 halves it
# (the numbers agree with the optimized build to float reassociation, far inside the
# tolerances used here).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _cfg(**kw):
    return T.make_config("tiny", vocab_size=V, max_length=16, **kw)


def _random_params(model, *args, seed=0, **kwargs):
    """Parameters with the model's shapes (via eval_shape, nothing compiled): kernels and
    embeddings N(0, 0.2^2), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2)."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, **kwargs),
                                     jax.random.key(0), *args)["params"])
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * r.normal(size=s.shape), s.dtype)
        std = 0.1 if "bias" in name else 0.2
        return jnp.asarray(std * r.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _fwd(model):
    """Jitted apply({'params': p}, *args, **kwargs), one per (hashable) model."""
    return _jit(lambda p, *args, **kw: model.apply({"params": p}, *args, **kw))


@functools.cache
def _step(model):
    """Jitted decode step of a Decoder: (params, cache, tokens, valid) -> (logits, cache)."""
    def step(p, cache, tokens, valid):
        logits, v = model.apply({"params": p, "cache": cache}, tokens, valid=valid,
                                decode=True, mutable=["cache"])
        return logits, v["cache"]
    return _jit(step)


def _tokens(shape, seed, low=1):
    """Random non-pad ids as a writable NumPy int32 array."""
    return np.random.default_rng(seed).integers(low, V, shape).astype(np.int32)


def _max_diff(a, b, axis):
    return np.abs(np.asarray(a) - np.asarray(b)).max(axis=axis)


DEC = T.Decoder(_cfg())
DEC_TOKENS = jnp.asarray(_tokens((2, 8), seed=0))


@functools.cache
def _dec_params():
    return _random_params(DEC, DEC_TOKENS, seed=1)


# ----------------------------------------------------------------------------------------
# A float64 NumPy decoder: pins the block structure (what is normalized where, the causal
# mask, the 1/sqrt(head_dim) scale, exact GELU, tied unembedding), which the
# self-consistency tests below (cache vs. no cache, scan vs. unrolled) cannot see.
# ----------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf)


def _np_norm(x, p, kind, eps=1e-5):
    if kind == "rmsnorm":  # no mean-centring, no bias
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_sinusoidal(length, d):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    angle = np.arange(length)[:, None] / 10000 ** (2 * np.arange(d // 2)[None, :] / d)
    pe = np.zeros((length, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe


def _np_causal_attention(x, p):
    proj = lambda name: (np.einsum("bld,dhk->blhk", x, p[name]["kernel"])  # noqa: E731
                         + p[name]["bias"])
    q, k, v = proj("query"), proj("key"), proj("value")
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v)
    return np.einsum("bqhd,hdf->bqf", out, p["out"]["kernel"]) + p["out"]["bias"]


def _np_mlp(x, p):
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))  # exact GELU
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _np_decoder(params, tokens, *, norm="layernorm", position="learned", post_norm=False):
    """logits [B, L, V] of the default `Decoder` (or the named variant) in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    table = p["embed"]["tokens"]["embedding"]
    tokens = np.asarray(tokens)
    length = tokens.shape[1]
    pe = (p["embed"]["positions"]["embedding"][:length] if position == "learned"
          else _np_sinusoidal(length, table.shape[1]))
    x = table[tokens] + pe
    for i in range(sum(k.startswith("layers_") for k in p["decoder"])):
        layer = p["decoder"][f"layers_{i}"]
        for sub, fn in [("attention_sublayer", functools.partial(
                _np_causal_attention, p=layer["self_attention"])),
                ("mlp_sublayer", functools.partial(_np_mlp, p=layer["mlp"]))]:
            n = layer[sub]["norm"]
            x = _np_norm(x + fn(x), n, norm) if post_norm else x + fn(_np_norm(x, n, norm))
    if not post_norm:
        x = _np_norm(x, p["decoder"]["final_norm"], norm)
    return x @ table.T  # tied unembedding


def test_decoder_matches_float64_numpy_reference():
    logits = _fwd(DEC)(_dec_params(), DEC_TOKENS)
    expected = _np_decoder(_dec_params(), DEC_TOKENS)
    assert np.abs(expected).max() > 1.0  # logits of size O(1): the tolerance is meaningful
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Decoder: causality and the KV cache.
# ----------------------------------------------------------------------------------------
def test_decoder_is_causal():
    p, t = _dec_params(), 3
    changed = DEC_TOKENS.at[:, t + 1:].set(_tokens((2, 8 - t - 1), seed=2))
    assert np.all(np.asarray(changed[:, t + 1:] != DEC_TOKENS[:, t + 1:]).any(axis=0))
    a, b = _fwd(DEC)(p, DEC_TOKENS), _fwd(DEC)(p, changed)
    assert a.shape == (2, 8, V) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    # ...and the later positions do see the change (otherwise this test could not fail).
    assert np.all(_max_diff(a[:, t + 1:], b[:, t + 1:], axis=-1) > 1e-2)


@pytest.mark.parametrize("scan,chunks", [(False, [1] * 8), (False, [3, 1, 1, 1, 1, 1]),
                                         (True, [1] * 8)],
                         ids=["unrolled-1x8", "unrolled-prefill3", "scanned-1x8"])
def test_decoder_kv_cache_matches_full_forward(scan, chunks):
    p = _dec_params()
    full = _fwd(DEC)(p, DEC_TOKENS)
    model = T.Decoder(_cfg(scan_layers=scan))
    if scan:
        p = T.stack_layers(p)
    cache = decoding.init_decoder_cache(model, 2, 8)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(cache))
    outs, start = [], 0
    for n in chunks:
        logits, cache = _step(model)(p, cache, DEC_TOKENS[:, start:start + n],
                                     jnp.ones((2, n), bool))
        outs.append(logits)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    np.testing.assert_array_equal(cache["position"]["next_position"], [8, 8])
    index = cache["decoder"]["layers" if scan else "layers_1"]["self_attention"]["cache_index"]
    np.testing.assert_array_equal(index, [8, 8] if scan else 8)  # scan: one per layer


def test_decoder_left_padded_batch_matches_each_prompt_alone():
    """Prompts of lengths 2, 5, 4, left-padded to 5 (pad slots hold random non-pad ids, so
    only `valid` can hide them), prefilled in one chunk, then 3 tokens one at a time."""
    p = _dec_params()
    lengths, P, N = [2, 5, 4], 5, 3
    seqs = [_tokens((n + N,), seed=10 + i) for i, n in enumerate(lengths)]
    batch = _tokens((3, P + N), seed=20)  # junk in the padded slots
    valid = np.ones((3, P + N), bool)
    for i, n in enumerate(lengths):
        batch[i, P - n:] = seqs[i]
        valid[i, :P - n] = False
    batch, valid = jnp.asarray(batch), jnp.asarray(valid)

    cache = decoding.init_decoder_cache(DEC, 3, P + N)
    outs = []
    logits, cache = _step(DEC)(p, cache, batch[:, :P], valid[:, :P])
    outs.append(logits)
    for j in range(P, P + N):
        logits, cache = _step(DEC)(p, cache, batch[:, j:j + 1], valid[:, j:j + 1])
        outs.append(logits)
    cached = np.asarray(jnp.concatenate(outs, axis=1))
    np.testing.assert_array_equal(cache["position"]["next_position"],
                                  [n + N for n in lengths])
    full = np.asarray(_fwd(DEC)(p, batch, valid=valid))  # no cache, same valid mask

    for i, n in enumerate(lengths):
        # Each prompt alone, unpadded, starting at position 0. (A fixed [1, 8] buffer with
        # junk after the sequence: causality -- tested above -- makes the junk irrelevant,
        # and every row then shares one compiled shape.)
        alone_in = _tokens((1, P + N), seed=30)
        alone_in[0, :n + N] = seqs[i]
        alone = np.asarray(_fwd(DEC)(p, jnp.asarray(alone_in)))[0, :n + N]
        np.testing.assert_allclose(cached[i, P - n:], alone, atol=1e-5)
        np.testing.assert_allclose(full[i, P - n:], alone, atol=1e-5)
    # Without the valid mask the padded rows would differ (the junk is attended to).
    no_mask = np.asarray(_fwd(DEC)(p, batch, valid=jnp.ones_like(valid)))
    assert _max_diff(no_mask[0, P - 2:], full[0, P - 2:], axis=None) > 1e-2


# ----------------------------------------------------------------------------------------
# Encoder: padding is invisible to real positions, for every head.
# ----------------------------------------------------------------------------------------
ENC_TOKENS = _tokens((2, 8), seed=40)
ENC_TOKENS[0, 5:] = 0   # row 0: 5 real tokens, row 1: 3, right-padded with pad_id 0
ENC_TOKENS[1, 3:] = 0
ENC_VALID = ENC_TOKENS != 0


@pytest.mark.parametrize("head", ["hidden", "mlm", "pooled", "classify"])
def test_encoder_ignores_padding(head):
    model = T.Encoder(_cfg(num_classes=3), head=head)
    tokens = jnp.asarray(ENC_TOKENS)
    p = _random_params(model, tokens, seed=41)
    altered = jnp.asarray(np.where(ENC_VALID, ENC_TOKENS, _tokens((2, 8), 42)))
    assert np.all(np.asarray(altered)[~ENC_VALID] != 0)
    f = _fwd(model)
    base = np.asarray(f(p, tokens, valid=jnp.asarray(ENC_VALID)))
    same = np.asarray(f(p, altered, valid=jnp.asarray(ENC_VALID)))
    leaky = np.asarray(f(p, altered, valid=jnp.ones((2, 8), bool)))  # padding unmasked
    want = {"hidden": (2, 8, 32), "mlm": (2, 8, V), "pooled": (2, 32), "classify": (2, 3)}
    assert base.shape == want[head] and base.dtype == np.float32
    if head in ("hidden", "mlm"):
        for i, n in enumerate([5, 3]):
            np.testing.assert_allclose(same[i, :n], base[i, :n], atol=1e-5)
            assert _max_diff(leaky[i, :n], base[i, :n], axis=None) > 1e-2
    else:  # from the first ([CLS]) token, which is real
        np.testing.assert_allclose(same, base, atol=1e-5)
        assert np.all(_max_diff(leaky, base, axis=-1) > 1e-3)
    if head == "mlm":  # default valid = tokens != pad_id gives the same thing
        np.testing.assert_allclose(f(p, tokens), base, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Scanned vs unrolled layers; rematerialization.
# ----------------------------------------------------------------------------------------
def test_stack_unstack_round_trip():
    # 12 layers: layers_10 must land at index 10 (numeric, not lexicographic, order).
    tree = {"emb": np.ones(2), "stack": {f"layers_{i}": {"w": np.full((2, 3), i)}
                                         for i in range(12)}}
    stacked = T.stack_layers(tree)
    assert set(stacked["stack"]) == {"layers"}
    np.testing.assert_array_equal(stacked["stack"]["layers"]["w"][:, 0, 0], np.arange(12))
    back = T.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    # Real decoder params: stacked layout == the scanned model's own, and exact round trip.
    p = _dec_params()
    scanned_shapes = nn.unbox(jax.eval_shape(T.Decoder(_cfg(scan_layers=True)).init,
                                             jax.random.key(0), DEC_TOKENS)["params"])
    assert (jax.tree.map(np.shape, T.stack_layers(p))
            == jax.tree.map(lambda s: s.shape, scanned_shapes))
    back = T.unstack_layers(T.stack_layers(p))
    assert jax.tree.structure(back) == jax.tree.structure(p)
    jax.tree.map(np.testing.assert_array_equal, back, p)


@functools.cache
def _value_and_grad(model):
    """Jitted (loss, logits), grads of a fixed random functional of the outputs."""
    def loss(p, *args):
        out = model.apply({"params": p}, *args)
        w = jax.random.normal(jax.random.key(7), out.shape)  # every output gets a gradient
        return jnp.sum(jnp.sin(out) * w), out
    return _jit(jax.value_and_grad(loss, has_aux=True))


def _encdec_args():
    inputs = _tokens((2, 6), seed=50)
    inputs[1, 4:] = 0
    return jnp.asarray(inputs), jnp.asarray(_tokens((2, 5), seed=51))


KINDS = {
    "decoder": (lambda cfg: T.Decoder(cfg), lambda: (DEC_TOKENS,)),
    "encoder": (lambda cfg: T.Encoder(cfg, head="mlm"), lambda: (jnp.asarray(ENC_TOKENS),)),
    "encdec": (lambda cfg: T.EncoderDecoder(cfg), _encdec_args),
}


@pytest.mark.parametrize("kind,variant", [
    ("decoder", dict(scan_layers=True, remat_policy="dots")),
    ("encoder", dict(scan_layers=True)),
    ("encdec", dict(scan_layers=True, remat_policy="full")),
], ids=["decoder-scan-remat_dots", "encoder-scan", "encdec-scan-remat_full"])
def test_scan_and_remat_match_unrolled(kind, variant):
    """Same outputs, loss and gradients (params converted with stack_layers) as the plain
    unrolled, non-rematerialized model. Rematerialization only changes the backward pass,
    so both policies are checked through gradients (combined with scanning: each compile
    costs ~1-2 s here). The encoder-decoder has 2 encoder and 1 decoder layer, so its two
    stacks are scanned over different lengths, and its gradients reach the encoder through
    the scanned decoder's broadcast `encoded` input. The Encoder's stack is the same module
    as the encoder-decoder's encoder, so for it (MLM head) only outputs are compared."""
    make, args = KINDS[kind]
    args = args()
    base_cfg = _cfg(num_decoder_layers=1 if kind == "encdec" else None)
    base = make(base_cfg)
    p = _random_params(base, *args, seed=60)
    model = make(base_cfg.replace(**variant))
    conv = T.stack_layers  # every variant here is scanned
    if kind == "encoder":
        np.testing.assert_allclose(_fwd(model)(conv(p), *args), _fwd(base)(p, *args),
                                   atol=1e-5)
        return
    (loss0, out0), g0 = _value_and_grad(base)(p, *args)
    (loss1, out1), g1 = _value_and_grad(model)(conv(p), *args)
    np.testing.assert_allclose(out1, out0, atol=1e-5)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(conv(g0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 g1, conv(g0))
    # The gradients are O(1) everywhere in the first layers -- except the key biases:
    # adding q.b_k to every score of a query is a softmax no-op, so d loss / d b_k = 0.
    for stack in ("encoder", "decoder"):
        for path, g in jax.tree_util.tree_leaves_with_path(g0.get(stack, {}).get("layers_0")):
            name = stack + jax.tree_util.keystr(path)
            if name.endswith("['key']['bias']"):
                assert np.abs(np.asarray(g)).max() < 1e-5, name
            else:
                assert np.abs(np.asarray(g)).max() > 1e-2, name
    # Equal gradients would also come out if remat were silently dropped: check that the
    # traced program really checkpoints each scanned stack's body with the named policy.
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *args))(conv(p)).jaxpr
    stacks = 2 if kind == "encdec" else 1
    assert _remat_policies(jaxpr) == [T.REMAT_POLICIES[variant["remat_policy"]]] * stacks
    assert _remat_policies(jax.make_jaxpr(lambda p: base.apply({"params": p}, *args))(
        p).jaxpr) == []


def _remat_policies(jaxpr):
    """Policies of all remat (checkpoint) equations in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _remat_policies(sub)
    return found


# ----------------------------------------------------------------------------------------
# Encoder-decoder (teacher forcing).
# ----------------------------------------------------------------------------------------
def test_encoder_decoder_causal_conditional_and_padding():
    model = T.EncoderDecoder(_cfg())
    inputs, dec = _encdec_args()
    valid = inputs != 0
    p = _random_params(model, inputs, dec, seed=70)
    f = _fwd(model)
    base = np.asarray(f(p, inputs, dec, inputs_valid=valid))
    assert base.shape == (2, 5, V) and base.dtype == np.float32
    # Causal in the decoder tokens: changing tokens after t leaves positions <= t alone.
    t = 2
    later = dec.at[:, t + 1:].set((dec[:, t + 1:] % (V - 1)) + 1)
    out = np.asarray(f(p, inputs, later, inputs_valid=valid))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert np.all(_max_diff(out[:, t + 1:], base[:, t + 1:], axis=-1) > 1e-2)
    # Conditional on the encoder: one real input token changed moves every position.
    other = inputs.at[:, 1].set((inputs[:, 1] % (V - 1)) + 1)
    out = np.asarray(f(p, other, dec, inputs_valid=valid))
    assert np.all(_max_diff(out, base, axis=-1) > 1e-3)
    # Padded encoder inputs (row 1, slots 4-5) are ignored whatever their ids.
    junk = inputs.at[1, 4:].set(jnp.array([5, 9]))
    np.testing.assert_allclose(f(p, junk, dec, inputs_valid=valid), base, atol=1e-5)
    # (The default inputs_valid = inputs != pad_id is what greedy_decode / beam_search use;
    # test_decoding.py checks them against the same default here.)


def test_encoder_decoder_fused_qkv_is_self_attention_only():
    """fused_qkv fuses the self-attention projections; cross-attention (query and keys from
    different inputs) keeps separate ones. Same numbers as the unfused model."""
    inputs, dec = _encdec_args()
    base = T.EncoderDecoder(_cfg())
    fused = T.EncoderDecoder(_cfg(fused_qkv=True))
    p = _random_params(base, inputs, dec, seed=71)
    layer = jax.eval_shape(fused.init, jax.random.key(0), inputs, dec)["params"]["decoder"][
        "layers_0"]
    assert set(layer["self_attention"]) == {"qkv", "out"}
    assert set(layer["cross_attention"]) == {"query", "key", "value", "out"}
    pf = jax.tree.map(lambda x: x, p)
    for stack in ("encoder", "decoder"):
        for i in range(2):
            sa = pf[stack][f"layers_{i}"]["self_attention"]
            qkv = [sa.pop(k) for k in ("query", "key", "value")]
            sa["qkv"] = {n: jnp.concatenate([x[n] for x in qkv], axis=-2)
                         for n in ("kernel", "bias")}
    valid = inputs != 0
    np.testing.assert_allclose(_fwd(fused)(pf, inputs, dec, inputs_valid=valid),
                               _fwd(base)(p, inputs, dec, inputs_valid=valid), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Variants: each runs, has float32 logits, and equals the baseline where it should.
# ----------------------------------------------------------------------------------------
def _sa(p, i=0):
    return p["decoder"][f"layers_{i}"]["self_attention"]


@pytest.mark.parametrize("variant", ["post_norm", "rmsnorm", "sinusoidal", "fused_qkv",
                                     "mqa", "untied", "bf16"])
def test_decoder_variants(variant):
    overrides = {"post_norm": dict(norm_position="post"), "rmsnorm": dict(norm="rmsnorm"),
                 "sinusoidal": dict(position="sinusoidal"), "fused_qkv": dict(fused_qkv=True),
                 "mqa": dict(num_kv_heads=1), "untied": dict(tie_embeddings=False),
                 "bf16": dict(dtype="bfloat16")}[variant]
    model = T.Decoder(_cfg(**overrides))
    p = _random_params(model, DEC_TOKENS, seed=80)
    # One compilation per variant: logits and the sown final hidden state together.
    run = _jit(lambda p: model.apply({"params": p}, DEC_TOKENS, mutable=["intermediates"]))
    logits, state = run(p)
    assert logits.shape == (2, 8, V) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    base_p = _dec_params()
    base = np.asarray(_fwd(DEC)(base_p, DEC_TOKENS))
    if variant == "post_norm":   # norm(x + f(x)): no final norm, rows of the last block's
        assert "final_norm" not in p["decoder"]  # output are normalized
        hidden = state["intermediates"]["final_hidden"][0]
        ln = p["decoder"]["layers_1"]["mlp_sublayer"]["norm"]
        z = (np.asarray(hidden) - ln["bias"]) / ln["scale"]
        np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.var(-1), 1.0, atol=1e-3)
        np.testing.assert_allclose(logits, _np_decoder(p, DEC_TOKENS, post_norm=True),
                                   atol=2e-4, rtol=1e-4)
    elif variant == "rmsnorm":
        assert set(p["decoder"]["final_norm"]) == {"scale"}
        np.testing.assert_allclose(logits, _np_decoder(p, DEC_TOKENS, norm="rmsnorm"),
                                   atol=2e-4, rtol=1e-4)
    elif variant == "sinusoidal":
        assert set(p["embed"]) == {"tokens"}   # no position table
        np.testing.assert_allclose(logits, _np_decoder(p, DEC_TOKENS, position="sinusoidal"),
                                   atol=2e-4, rtol=1e-4)
    elif variant == "fused_qkv":  # same numbers as separate projections
        assert _sa(p)["qkv"]["kernel"].shape == (32, 6, 16)
        pf = jax.tree.map(lambda x: x, base_p)
        for i in range(2):
            sa = _sa(pf, i)
            qkv = [sa.pop(k) for k in ("query", "key", "value")]
            sa["qkv"] = {n: jnp.concatenate([x[n] for x in qkv], axis=-2)
                         for n in ("kernel", "bias")}
        np.testing.assert_allclose(run(pf)[0], base, atol=1e-5)
    elif variant == "mqa":  # one kv head == two identical kv heads
        assert _sa(p)["key"]["kernel"].shape == (32, 1, 16)
        pm = jax.tree.map(lambda x: x, p)
        for i in range(2):
            for k in ("key", "value"):
                _sa(pm, i)[k] = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=-2), _sa(p, i)[k])
        mha = T.Decoder(_cfg())
        np.testing.assert_allclose(_fwd(mha)(pm, DEC_TOKENS), logits, atol=1e-5)
    elif variant == "untied":  # own [d, vocab] matrix; = tied when set to E^T
        assert p["unembed"]["logits"]["kernel"].shape == (32, V)
        pu = jax.tree.map(lambda x: x, base_p)
        pu["unembed"] = {"logits": {"kernel": base_p["embed"]["tokens"]["embedding"].T}}
        np.testing.assert_allclose(run(pu)[0], base, atol=1e-5)
    elif variant == "bf16":  # bf16 matmuls: close to float32, but not bit-identical
        assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
        out = np.asarray(run(base_p)[0])
        err = np.abs(out - base).max()
        assert 0 < err < 0.05 * np.abs(base).max()


# ----------------------------------------------------------------------------------------
# GPT-2 small and the dot_general hook.
# ----------------------------------------------------------------------------------------
def test_gpt2_small_parameter_count():
    cfg = T.make_config("gpt2_small")
    shapes = jax.eval_shape(T.Decoder(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    d, ff, vocab, ctx = 768, 3072, 50257, 1024
    per_layer = (2 * d            # ln_1
                 + 3 * (d * d + d)  # q, k, v (GPT-2's c_attn: [768, 2304] + bias)
                 + d * d + d        # attention output projection
                 + 2 * d            # ln_2
                 + d * ff + ff + ff * d + d)  # MLP
    assert per_layer == 7_087_872
    assert count == vocab * d + ctx * d + 12 * per_layer + 2 * d == 124_439_808
    assert "unembed" not in shapes  # tied: no separate output matrix


def test_dot_general_hook_sees_every_matmul():
    calls = []

    def hook(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    dec = T.Decoder(_cfg(dot_general=hook))
    jax.eval_shape(dec.init, jax.random.key(0), DEC_TOKENS)
    calls.clear()
    jax.eval_shape(lambda p: dec.apply({"params": p}, DEC_TOKENS), _dec_params())
    # per layer: q, k, v, scores, weights @ V, out, fc1, fc2 = 8; + tied unembedding
    assert len(calls) == 2 * 8 + 1
    encdec = T.EncoderDecoder(_cfg(dot_general=hook))
    calls.clear()
    jax.eval_shape(encdec.init, jax.random.key(0), *_encdec_args())
    # encoder 2 x 8; decoder 2 x (8 + 6 cross-attention); unembedding 1
    assert len(calls) == 2 * 8 + 2 * 14 + 1


# ----------------------------------------------------------------------------------------
# Errors name the problem.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: T.make_config("huge"), "unknown transformer variant 'huge'; allowed: tiny, mini, "
                                     "small, base, gpt2_small, gpt2_medium"),
    (lambda: T.make_config("tiny", num_layer=3), r"unknown transformer config keys "
                                                 r"\['num_layer'\]"),
    (lambda: T.make_config("tiny", d_model=30, num_heads=4),
     r"d_model \(30\) must be divisible by model.num_heads \(4\)"),
    (lambda: T.make_config("tiny", attention_impl="flash"),
     "model.attention_impl='flash' is not allowed; allowed: reference, fused"),
    (lambda: T.make_config("tiny", dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    (lambda: T.make_config("tiny", attention_dropout_rate=-0.1),
     r"attention_dropout_rate must be in \[0, 1\)"),
    (lambda: T.make_config("tiny", attention_impl="fused", attention_dropout_rate=0.1),
     r"attention_dropout_rate=0.1 needs model.attention_impl='reference'"),
    (lambda: T.make_config("tiny", num_heads=4, num_kv_heads=3),
     r"num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"),
    (lambda: jax.eval_shape(DEC.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32)),
     "tokens length 17 exceeds model.max_length 16"),
    (lambda: jax.eval_shape(T.Encoder(_cfg(), head="classify").init, jax.random.key(0),
                            jnp.ones((1, 4), jnp.int32)), "num_classes > 0"),
    (lambda: jax.eval_shape(T.Encoder(_cfg(), head="ner").init, jax.random.key(0),
                            jnp.ones((1, 4), jnp.int32)), "unknown encoder head 'ner'"),
])
def test_errors_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()
