"""Sampling filters, generation and beam search vs. brute-force references.

References never use the KV cache: they re-run the full (teacher-forced) forward pass on a
fixed-size buffer and read the logits at the current position (causality -- tested in
test_transformer.py -- makes whatever sits after that position irrelevant, and a fixed
shape means one compilation per reference).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding as D
from models import transformer as T

V = 13
NEG = np.float32(D.NEG_INF)  # as stored in float32 logits
# On CPU, XLA compile time dominates these tests; backend optimization level 0 roughly
# halves it. Used for the references (`_jit`) and, through jax's ahead-of-time API, for the
# already-jitted functions under test (`_run`): same program, fewer LLVM passes.
_OPTS = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=_OPTS)


def _run(fn, model, *args, **static):
    """fn(model, *args, **static) for a jitted decoding function (model and the keyword
    arguments static): lowered and compiled with _OPTS, then called on the array args."""
    return fn.lower(model, *args, **static).compile(_OPTS)(*args)


def _random_params(model, *args, seed=0, **kwargs):
    """Random N(0, 0.2^2) kernels/embeddings, N(0, 0.1^2) biases, 1 + N(0, 0.1^2) scales:
    a model whose greedy outputs vary (the 0.02-std init emits one token forever)."""
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


def _kept(logits):
    return [set(np.flatnonzero(row > NEG / 2)) for row in np.asarray(logits)]


def _pick_eos(greedy_rows, avoid=(0, 1)):
    """A token that some row emits first at step >= 1, so generation really stops there
    (after at least one other token), preferring one that another row never emits."""
    best = None
    for r, row in enumerate(greedy_rows):
        for step in range(1, len(row)):
            tok = int(row[step])
            if tok in avoid or tok in row[:step]:
                continue
            others_free = any(tok not in other for o, other in enumerate(greedy_rows) if o != r)
            if others_free:
                return tok
            best = tok if best is None else best
    assert best is not None, "no usable EOS candidate; change the seed"
    return best


def _truncate_at_eos(rows, eos, pad=0):
    """Expected (tokens, lengths): everything after the first EOS is pad."""
    rows = np.array(rows)
    lengths = []
    for row in rows:
        hits = np.flatnonzero(row == eos)
        n = int(hits[0]) + 1 if hits.size else len(row)
        row[n:] = pad
        lengths.append(n)
    return rows, np.array(lengths)


# ----------------------------------------------------------------------------------------
# filter_logits / sample_logits.
# ----------------------------------------------------------------------------------------
def test_top_k_exact_sets_and_ties():
    logits = jnp.array([[1.0, 3.0, 2.0, 3.0, 0.0],
                        [0.5, -1.0, 4.0, 2.0, 2.5]])
    assert _kept(D.filter_logits(logits, top_k=1)) == [{1, 3}, {2}]  # tie at the cut: both
    assert _kept(D.filter_logits(logits, top_k=2)) == [{1, 3}, {2, 4}]
    assert _kept(D.filter_logits(logits, top_k=3)) == [{1, 2, 3}, {2, 3, 4}]
    out = np.asarray(D.filter_logits(logits, top_k=3))
    np.testing.assert_array_equal(out[0], [NEG, 3.0, 2.0, 3.0, NEG])  # kept values untouched
    for k in (0, 5, 9):  # off, or >= vocab: identity
        np.testing.assert_array_equal(D.filter_logits(logits, top_k=k), logits)


def test_top_p_exact_sets():
    # Row 0: probabilities 0.5, 0.3, 0.15, 0.05 in shuffled order; row 1: a tie.
    p0 = np.array([0.15, 0.5, 0.05, 0.3])
    p1 = np.array([0.2, 0.4, 0.2, 0.2])
    logits = jnp.asarray(np.log(np.stack([p0, p1])), jnp.float32)
    # Smallest set with mass >= top_p: token j is kept iff the mass before it is < top_p.
    assert _kept(D.filter_logits(logits, top_p=0.6)) == [{1, 3}, {0, 1, 2, 3}]
    assert _kept(D.filter_logits(logits, top_p=0.85)) == [{0, 1, 3}, {0, 1, 2, 3}]
    assert _kept(D.filter_logits(logits, top_p=0.99)) == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    # Tiny top_p: the most likely token is always kept (mass before it is 0 < top_p)...
    assert _kept(D.filter_logits(logits, top_p=0.01)) == [{1}, {1}]
    # ...and row 1 at 0.5: 0.4 alone is not enough, the next (0.2) is tied with two
    # others -- ties at the cut are all kept, so all four survive.
    assert _kept(D.filter_logits(logits, top_p=0.5))[1] == {0, 1, 2, 3}
    out = np.asarray(D.filter_logits(logits, top_p=0.6))
    np.testing.assert_array_equal(out[0], np.where([0, 1, 0, 1], np.asarray(logits[0]), NEG))
    # Exactly at the boundary: if the two best tokens' mass (as float32 computes it) equals
    # top_p, those two already reach top_p and the third is not needed.
    sorted_p = jax.nn.softmax(jnp.sort(logits[:1], axis=-1)[..., ::-1], axis=-1)
    top2 = float((jnp.cumsum(sorted_p, axis=-1) - sorted_p)[0, 2])
    assert abs(top2 - 0.8) < 1e-6
    assert _kept(D.filter_logits(logits[:1], top_p=top2)) == [{1, 3}]


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    logits = jnp.asarray(np.log([[0.5, 0.3, 0.15, 0.05]]), jnp.float32)
    # Alone: mass before 0.15 is 0.80 < 0.82, so three tokens are kept.
    assert _kept(D.filter_logits(logits, top_p=0.82)) == [{0, 1, 2}]
    # After top_k=3 the masses are renormalized by 0.95: before 0.15 it is 0.842 >= 0.82.
    assert _kept(D.filter_logits(logits, top_k=3, top_p=0.82)) == [{0, 1}]


def test_sample_greedy_cases_equal_argmax():
    logits = jax.random.normal(jax.random.key(0), (8, 50)) * 3
    argmax = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(D.sample_logits(jax.random.key(1), logits, temperature=0.0),
                                  argmax)
    for seed, temp in [(0, 1.0), (1, 0.7), (2, 5.0)]:
        np.testing.assert_array_equal(
            D.sample_logits(jax.random.key(seed), logits, temperature=temp, top_k=1), argmax)
    # Plain sampling at temperature 5 does not always return the argmax (it is random).
    draws = D.sample_logits(jax.random.key(3), logits, temperature=5.0)
    assert np.any(np.asarray(draws) != argmax)


@pytest.mark.parametrize("temperature,expected", [
    # p = [.4, .25, .2, .1, .05], top_p 0.7: mass before = [0, .4, .65, .85, .95] -> 3 kept.
    (1.0, np.array([0.4, 0.25, 0.2, 0, 0]) / 0.85),
    # Temperature first: p^2 normalized = [.582, .227, .145, .036, .009] -> 2 kept.
    (0.5, np.array([0.16, 0.0625, 0, 0, 0]) / 0.2225),
])
def test_top_p_sampling_frequencies(temperature, expected):
    n = 20_000
    logits = jnp.tile(jnp.log(jnp.array([0.4, 0.25, 0.2, 0.1, 0.05])), (n, 1))
    sample = _jit(functools.partial(D.sample_logits, temperature=temperature, top_p=0.7))
    draws = np.asarray(sample(jax.random.key(42), logits))
    counts = np.bincount(draws, minlength=5)
    kept = expected > 0
    assert np.all(counts[~kept] == 0)  # outside the nucleus: never
    exp = n * expected[kept]
    chi2 = float(((counts[kept] - exp) ** 2 / exp).sum())
    # 99.9% quantiles of chi-square with 2 and 1 degrees of freedom: 13.8 and 10.8.
    assert chi2 < (13.8 if kept.sum() == 3 else 10.8), (counts, exp)


# ----------------------------------------------------------------------------------------
# Decoder-only generation.
# ----------------------------------------------------------------------------------------
DEC = T.Decoder(T.make_config("tiny", vocab_size=V, max_length=16))
LENGTHS, P, N = [2, 5, 4], 5, 6


@functools.cache
def _decoder_setup():
    r = np.random.default_rng(5)
    prompts = [r.integers(1, V, n).astype(np.int32) for n in LENGTHS]
    padded = np.zeros((3, P), np.int32)
    valid = np.zeros((3, P), bool)
    for i, pr in enumerate(prompts):
        padded[i, P - len(pr):] = pr
        valid[i, P - len(pr):] = True
    params = _random_params(DEC, jnp.asarray(padded), seed=6)
    fwd = _jit(lambda p, t: DEC.apply({"params": p}, t))
    greedy = []
    for pr in prompts:  # each prompt alone, full forward (no cache, no padding) per token
        buf = np.zeros((1, P + N), np.int32)
        buf[0, :len(pr)] = pr
        for j in range(N):
            logits = np.asarray(fwd(params, jnp.asarray(buf)))[0, len(pr) - 1 + j]
            buf[0, len(pr) + j] = np.argmax(logits)
        greedy.append(buf[0, len(pr):len(pr) + N].copy())
    return params, jnp.asarray(padded), jnp.asarray(valid), np.stack(greedy)


def test_generate_greedy_with_eos_equals_manual_loop():
    params, prompts, valid, greedy = _decoder_setup()
    assert len({tuple(g) for g in greedy}) == 3  # rows differ: padding is not ignored
    eos = _pick_eos(greedy)
    want, want_len = _truncate_at_eos(greedy, eos)
    assert want_len.min() < N  # some row stops early...
    tokens, lengths = _run(D.generate, DEC, params, prompts, valid, max_new_tokens=N,
                           temperature=0.0, eos_id=eos)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(lengths, want_len)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new_tokens=12), "prompt length 5 \\+ max_new_tokens 12 exceeds model.max_length 16"),
])
def test_generate_errors(kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        D.generate(DEC, {}, jnp.ones((3, P), jnp.int32), **kwargs)


# ----------------------------------------------------------------------------------------
# Encoder-decoder: greedy and beam search.
# ----------------------------------------------------------------------------------------
ENCDEC = T.EncoderDecoder(T.make_config("tiny", vocab_size=V, max_length=16))
BOS, L = 1, 6


@functools.cache
def _encdec_setup():
    inputs = np.random.default_rng(7).integers(1, V, (2, 6)).astype(np.int32)
    inputs[1, 4:] = 0  # padded encoder input
    inputs = jnp.asarray(inputs)
    params = _random_params(ENCDEC, inputs, jnp.ones((2, L), jnp.int32), seed=19)
    return inputs, params


@functools.cache
def _teacher_forced():
    """Jitted log-probs of a full teacher-forced forward, with the padding mask given
    explicitly (the decoders under test rely on the default inputs != pad_id)."""
    return _jit(lambda p, inputs, dec: jax.nn.log_softmax(ENCDEC.apply(
        {"params": p}, inputs, dec, inputs_valid=inputs != 0)))


def _tf_logp(params, inputs, dec):
    """log P [n, T, V] for inputs [n, S], decoder tokens [n, T] (n <= 13, T <= L): rows
    and columns are padded to one [13, L] shape (extra columns hold BOS; by causality
    they change nothing before them), so every reference shares one compilation."""
    n, t = dec.shape
    rows = np.arange(13) % n
    dec_full = np.full((13, L), BOS, np.int32)
    dec_full[:, :t] = np.asarray(dec)[rows]
    out = _teacher_forced()(params, jnp.asarray(np.asarray(inputs)[rows]),
                            jnp.asarray(dec_full))
    return np.asarray(out, np.float64)[:n, :t]


def _sequence_logp(params, inputs, hyps, eos):
    """Sum of log P(token) over each hypothesis [n, T] up to and including its first EOS
    (all T tokens if none), and the lengths: float64 sums of a full forward's log-probs."""
    dec_in = np.concatenate([np.full((len(hyps), 1), BOS), hyps[:, :-1]], axis=1)
    logp = _tf_logp(params, inputs, dec_in)
    _, lengths = _truncate_at_eos(hyps, eos)
    per_token = np.take_along_axis(logp, hyps[..., None], axis=-1)[..., 0]
    return np.array([per_token[i, :n].sum() for i, n in enumerate(lengths)]), lengths


@functools.cache
def _manual_greedy():
    inputs, params = _encdec_setup()
    buf = np.full((2, L), BOS, np.int32)  # [BOS, y0, ..., y4]; position j predicts y_j
    out = np.zeros((2, L), np.int32)
    for j in range(L):
        out[:, j] = np.argmax(_tf_logp(params, inputs, buf)[:, j], axis=-1)
        if j + 1 < L:
            buf[:, j + 1] = out[:, j]
    return out, _pick_eos(out)


def test_greedy_decode_equals_manual_loop():
    inputs, params = _encdec_setup()
    greedy, eos = _manual_greedy()
    want, want_len = _truncate_at_eos(greedy, eos)
    assert want_len.min() < L
    tokens, lengths = _run(D.greedy_decode, ENCDEC, params, inputs, max_length=L, eos_id=eos)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(lengths, want_len)


def test_beam_size_one_is_greedy():
    inputs, params = _encdec_setup()
    greedy, eos = _manual_greedy()
    want, want_len = _truncate_at_eos(greedy, eos)
    tokens, scores = _run(D.beam_search, ENCDEC, params, inputs, beam_size=1, max_length=L,
                          alpha=0.0, eos_id=eos)
    assert tokens.shape == (2, 1, L) and scores.shape == (2, 1)
    np.testing.assert_array_equal(tokens[:, 0], want)
    logp, _ = _sequence_logp(params, inputs, want, eos)
    np.testing.assert_allclose(scores[:, 0], logp, rtol=1e-5)  # alpha=0: plain log P(Y)


def test_beam_scores_are_length_normalized_log_probs_scanned():
    """Beam search on the scanned-layers model: its KV cache is stacked [layers,
    batch*beams, ...] and must be reordered along axis 1. Each returned hypothesis's score
    must equal log P(Y) / ((5 + |Y|) / 6)^alpha recomputed by the (unrolled, uncached)
    teacher-forced forward -- a cache gathered along the wrong axis would condition later
    tokens on another beam's history and break the equality."""
    inputs, params = _encdec_setup()
    greedy, eos = _manual_greedy()
    k, alpha = 3, 0.6
    scanned = T.EncoderDecoder(ENCDEC.cfg.replace(scan_layers=True))
    tokens, scores = _run(D.beam_search, scanned, T.stack_layers(params), inputs,
                          beam_size=k, max_length=L, alpha=alpha, eos_id=eos)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert tokens.shape == (2, k, L) and scores.shape == (2, k)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    real = scores > NEG / 2  # slots no hypothesis filled keep -1e30
    assert real.sum() >= 4 and np.any(tokens[real] == eos)  # finished ones among them
    logp, lengths = _sequence_logp(params, np.repeat(np.asarray(inputs), k, axis=0),
                                   tokens.reshape(-1, L), eos)
    want = (logp / ((5.0 + lengths) / 6.0) ** alpha).reshape(2, k)
    np.testing.assert_allclose(scores[real], want[real], rtol=1e-5)
    for hyp, n in zip(tokens.reshape(-1, L), lengths):
        assert np.all(hyp[n:] == 0)  # pad after EOS
    # The best beam scores at least as well as the greedy output (where that finished).
    g_tokens, g_len = _truncate_at_eos(greedy, eos)
    g_score = _sequence_logp(params, inputs, g_tokens, eos)[0] / ((5.0 + g_len) / 6.0) ** alpha
    for b in range(2):
        if g_len[b] < L:
            assert scores[b, 0] >= g_score[b] - 1e-5


def test_beam_search_exhaustive_against_brute_force():
    """max_length 2 and beam_size 156 = 12 live beams x 13 tokens: nothing is ever pruned,
    so the finished hypotheses must be exactly all sequences [EOS] and [t, EOS] (t != EOS),
    scored log P / lp and sorted -- a brute-force enumeration."""
    inputs, params = _encdec_setup()
    _, eos = _manual_greedy()
    # alpha=4 makes the length penalty strong enough to reorder [EOS] against [t, EOS].
    alpha, k = 4.0, (V - 1) * V
    tokens, scores = _run(D.beam_search, ENCDEC, params, inputs, beam_size=k, max_length=2,
                          alpha=alpha, eos_id=eos)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    cands = np.array([[eos, 0]] + [[t, eos] for t in range(V) if t != eos], np.int32)
    reordered = []
    for b in range(2):
        rep = np.repeat(np.asarray(inputs)[b:b + 1], len(cands), axis=0)
        logp, lengths = _sequence_logp(params, rep, cands, eos)
        want = logp / ((5.0 + lengths) / 6.0) ** alpha
        order = np.argsort(-want, kind="stable")
        real = scores[b] > NEG / 2
        assert real.sum() == len(cands) == V
        np.testing.assert_array_equal(tokens[b, :V], cands[order])
        np.testing.assert_allclose(scores[b, :V], want[order], rtol=1e-5)
        reordered.append(list(order) != list(np.argsort(-logp, kind="stable")))
    assert any(reordered)  # the penalty changes the ranking: lengths are really used


def test_beam_search_rejects_bad_beam_size():
    inputs, params = _encdec_setup()
    with pytest.raises(ValueError, match="beam_size must be >= 1, got 0"):
        D.beam_search(ENCDEC, params, inputs, beam_size=0, max_length=L)
