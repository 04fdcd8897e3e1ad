"""Recurrent models: attention pooling vs its equations and padding, Seq2SeqRNN decoding
through models.decoding vs a brute-force argmax loop, cached vs teacher-forced decoding,
RevIN shift equivariance of the forecaster, config errors.

Parameters are random (not the init): the small init makes greedy decoding emit one
token forever and attention nearly uniform, which would hide mistakes.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding as D
from models import rnn

_OPTS = {"xla_backend_optimization_level": 0}   # CPU compile time dominates these tests
_jit = functools.partial(jax.jit, compiler_options=_OPTS)
V, BOS = 13, 1
INPUTS = jnp.asarray([[5, 6, 7, 8, 2, 0], [9, 3, 2, 0, 0, 0], [4, 4, 10, 11, 12, 2]])


def _random_params(model, *args, seed=11, **kwargs):
    """Kernels N(0, 1.5^2 / fan_in), tables N(0, 1), biases N(0, 0.2^2). Seed 11 makes every
    seq2seq case below greedily emit 2-5 distinct tokens per row, in sequences that differ
    from those of a decoder restarted at every step (many seeds settle on one token forever,
    which would let a stale or reset decoder state pass unnoticed)."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, **kwargs),
                                     jax.random.key(0), *args)["params"])
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        std = 1.5 / s.shape[0] ** 0.5   # kernels (and 1-D vectors) by their fan-in
        std = 0.2 if "bias" in name else 1.0 if name == "embedding" else std
        return jnp.asarray(std * r.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _run(fn, model, *args, **static):
    """A jitted models.decoding function, compiled with _OPTS."""
    return fn.lower(model, *args, **static).compile(_OPTS)(*args)


# ----------------------------------------------------------------------------------------
# Classifier.
# ----------------------------------------------------------------------------------------
def test_attention_pool_matches_its_equations():
    cfg = rnn.make_config("tiny", attention_dim=4)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6)), jnp.float32)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    pool = rnn.AttentionPool(cfg)
    params = _random_params(pool, h, valid)
    got = pool.apply({"params": params}, h, valid)
    p = jax.tree.map(np.asarray, params)
    for b in range(2):
        hb = np.asarray(h[b], np.float64)[np.asarray(valid[b])]
        u = np.tanh(hb @ p["projection"]["kernel"] + p["projection"]["bias"])
        a = np.exp(u @ p["query"])
        np.testing.assert_allclose(got[b], (a / a.sum()) @ hb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling,cell", [("attention", "gru"), ("last", "lstm")])
def test_classifier_ignores_padding(pooling, cell):
    cfg = rnn.make_config("tiny", vocab_size=V, num_classes=3, pooling=pooling, cell=cell,
                          num_layers=2)
    model = rnn.SequenceClassifier(cfg)
    params = _random_params(model, INPUTS)
    fwd = _jit(lambda p, t: model.apply({"params": p}, t, mutable="intermediates"))
    logits, inter = fwd(params, INPUTS)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    longer, _ = fwd(params, jnp.pad(INPUTS, ((0, 0), (0, 4))))   # more padding
    np.testing.assert_allclose(longer, logits, atol=1e-5)
    for row in range(3):   # each row alone, unpadded
        n = int((INPUTS[row] != 0).sum())
        alone, _ = _jit(lambda p, t: model.apply({"params": p}, t, mutable="intermediates"))(
            params, INPUTS[row:row + 1, :n])
        np.testing.assert_allclose(alone[0], logits[row], atol=1e-5)
    if pooling == "attention":
        w = np.asarray(inter["intermediates"]["pool"]["attention_weights"][0])
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
        assert not np.any(w[np.asarray(INPUTS) == 0])


# ----------------------------------------------------------------------------------------
# Sequence to sequence.
# ----------------------------------------------------------------------------------------
SEQ2SEQ_CASES = {
    "bahdanau": dict(attention="bahdanau", decoder_layers=2, residual=True),
    "luong_general": dict(attention="luong_general", input_feeding=True),
    "luong_dot_gru": dict(attention="luong_dot", merge="sum", cell="gru", input_feeding=False),
}


@functools.cache
def _seq2seq(case):
    cfg = rnn.make_config("tiny", vocab_size=V, hidden=16, embed_dim=8, **SEQ2SEQ_CASES[case])
    model = rnn.Seq2SeqRNN(cfg)
    params = _random_params(model, INPUTS, INPUTS[:, :4])
    forward = _jit(lambda p, dec: model.apply({"params": p}, INPUTS, dec))
    return model, params, forward


def _argmax_rows(forward, params, steps):
    """Brute force: a full teacher-forced forward per step on a fixed [B, steps] buffer
    (causality makes what follows position t irrelevant); no EOS handling."""
    buf = np.zeros((INPUTS.shape[0], steps + 1), np.int32)
    buf[:, 0] = BOS
    for t in range(steps):
        logits = forward(params, jnp.asarray(buf[:, :-1]))[:, t]
        buf[:, t + 1] = np.argmax(np.asarray(logits), -1)
    return buf[:, 1:]


def _pick_eos(rows):
    """The token whose earliest emission (in rows that emit it) is latest but >= 1: the
    comparison covers most of each row and at least one row really stops."""
    best, best_at = 2, 0
    for tok in set(rows.ravel().tolist()) - {0, BOS}:
        at = min(int(np.flatnonzero(r == tok)[0]) for r in rows if tok in r)
        if at > best_at:
            best, best_at = tok, at
    return best


def _cut_at_eos(rows, eos):
    out = rows.copy()
    for r in out:
        hits = np.flatnonzero(r == eos)
        if hits.size:
            r[hits[0] + 1:] = 0
    return out


@pytest.mark.parametrize("case", list(SEQ2SEQ_CASES))
def test_greedy_and_beam1_equal_argmax_over_teacher_forced_forwards(case):
    model, params, forward = _seq2seq(case)
    steps = 6
    rows = _argmax_rows(forward, params, steps)
    eos = _pick_eos(rows)
    want = _cut_at_eos(rows, eos)
    got, _ = _run(D.greedy_decode, model, params, INPUTS, max_length=steps, bos_id=BOS,
                  eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), want)
    beams, _ = _run(D.beam_search, model, params, INPUTS, beam_size=1, max_length=steps,
                    alpha=0.0, bos_id=BOS, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(np.asarray(beams[:, 0]), want)


def test_cached_decoding_in_chunks_equals_teacher_forcing():
    """decode=True over 3 tokens, then 1, then 2 (the cache carries the state) == one
    teacher-forced pass; and a beam-4 search runs on the same cache layout."""
    model, params, forward = _seq2seq("bahdanau")
    dec = jnp.asarray(np.random.default_rng(1).integers(3, V, size=(3, 6)), jnp.int32)
    want = forward(params, dec)
    valid = INPUTS != 0
    encoded = model.apply({"params": params}, INPUTS, inputs_valid=valid, method=model.encode)
    cache = D.init_encdec_cache(model, encoded, valid, 6)
    assert all(x.shape[0] == 3 for x in jax.tree.leaves(cache))   # leading batch axis
    step = _jit(lambda c, toks: model.apply({"params": params, "cache": c}, encoded, toks,
                                            inputs_valid=valid, decode=True,
                                            mutable=["cache"], method=model.decode))
    got = []
    for lo, hi in ((0, 3), (3, 4), (4, 6)):
        logits, variables = step(cache, dec[:, lo:hi])
        cache = variables["cache"]
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), want, atol=1e-4)
    seqs, scores = _run(D.beam_search, model, params, INPUTS, beam_size=4, max_length=5,
                        bos_id=BOS, eos_id=2, pad_id=0)
    assert seqs.shape == (3, 4, 5) and np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)


def test_seq2seq_source_padding_is_ignored():
    model, params, forward = _seq2seq("luong_general")
    dec = jnp.asarray(np.random.default_rng(2).integers(3, V, size=(3, 4)), jnp.int32)
    fwd = _jit(lambda p, x, d: model.apply({"params": p}, x, d))
    full = fwd(params, INPUTS, dec)
    for row in (0, 1):   # the padded rows, alone and unpadded
        n = int((INPUTS[row] != 0).sum())
        alone = fwd(params, INPUTS[row:row + 1, :n], dec[row:row + 1])
        np.testing.assert_allclose(alone[0], full[row], atol=1e-5)


def test_seq2seq_bfloat16_and_config_errors():
    cfg = rnn.make_config("tiny", vocab_size=V, dtype="bfloat16")
    model = rnn.Seq2SeqRNN(cfg)
    params = _random_params(model, INPUTS, INPUTS[:, :3])
    logits = _jit(lambda p: model.apply({"params": p}, INPUTS, INPUTS[:, :3]))(params)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="luong_dot"):
        rnn.make_config("tiny", attention="luong_dot")   # concat bidirectional: 2H != H
    with pytest.raises(ValueError, match="unknown rnn config keys"):
        rnn.make_config("tiny", hiden=3)
    with pytest.raises(ValueError, match="recurrent.cell"):
        rnn.make_config("tiny", cell="transformer")


# ----------------------------------------------------------------------------------------
# Forecaster.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel_independent", [False, True])
def test_forecaster_revin_shift_equivariance(channel_independent):
    cfg = rnn.make_config("tiny", channels=3, horizon=5, num_layers=2,
                          channel_independent=channel_independent)
    model = rnn.LSTMForecaster(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 3)).cumsum(1), jnp.float32)
    params = _random_params(model, x)
    fwd = _jit(lambda p, x: model.apply({"params": p}, x))
    y = fwd(params, x)
    assert y.shape == (2, 5, 3) and y.dtype == jnp.float32
    shift = jnp.zeros((2, 1, 3)).at[1, 0, 2].set(7.5)   # example 1, channel 2 only
    moved = fwd(params, x + shift)
    np.testing.assert_allclose(moved, y + shift, atol=2e-5 * 10)
    scaled = fwd(params, 3.0 * x)                        # and scale equivariance
    np.testing.assert_allclose(scaled, 3.0 * y, rtol=1e-4, atol=1e-4)
    if not channel_independent:   # without RevIN, a shift is not simply passed through
        plain = rnn.LSTMForecaster(cfg.replace(revin=False))
        d = plain.apply({"params": params}, x + shift) - plain.apply({"params": params}, x)
        assert not np.allclose(d, shift, atol=1e-2)
