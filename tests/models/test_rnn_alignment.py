"""Seq2SeqRNN's sown alignment (models/rnn.py): each output step's attention weights over
the source -- distributions over the real source tokens, the ones cached (greedy) decoding
uses, and Bahdanau's first row equal to its equation in float64."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding as D
from models import rnn

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
V = 13
INPUTS = jnp.asarray([[5, 6, 7, 8, 2, 0], [9, 3, 2, 0, 0, 0], [4, 4, 10, 11, 12, 2]])
DEC = jnp.asarray(np.random.default_rng(3).integers(3, V, size=(3, 5)), jnp.int32)
CASES = {
    "bahdanau": dict(attention="bahdanau", decoder_layers=2),
    "luong_general": dict(attention="luong_general", input_feeding=True),
}


@functools.cache
def _model(case):
    """A small Seq2SeqRNN with random parameters at scales that make attention far from
    uniform (kernels N(0, 2^2 / fan_in), tables N(0, 1), biases N(0, 0.2^2))."""
    model = rnn.Seq2SeqRNN(rnn.make_config("tiny", vocab_size=V, hidden=16, embed_dim=8,
                                           **CASES[case]))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), INPUTS, DEC)["params"])
    r = np.random.default_rng(5)

    def leaf(path, s):
        name = path[-1].key
        std = 2.0 / s.shape[0] ** 0.5          # kernels (and 1-D vectors) by their fan-in
        std = 0.2 if "bias" in name else 1.0 if name == "embedding" else std
        return jnp.asarray(std * r.normal(size=s.shape), s.dtype)
    return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def _teacher_forced(model, params):
    _, state = _jit(lambda p: model.apply({"params": p}, INPUTS, DEC,
                                          mutable=["intermediates"]))(params)
    return np.asarray(state["intermediates"]["alignment"][0])


@pytest.mark.parametrize("case", list(CASES))
def test_alignment_rows_are_distributions_over_the_real_source_tokens(case):
    model, params = _model(case)
    a = _teacher_forced(model, params)
    assert a.shape == (3, 5, 6)                       # [B, T, S]
    valid = np.asarray(INPUTS != 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    assert np.all(a[~np.broadcast_to(valid[:, None], a.shape)] == 0.0)
    assert a.max() > 0.5 and a[valid[:, None].repeat(5, 1)].min() < 0.1  # not uniform


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_sows_the_teacher_forced_alignment(case):
    """Step by step through the decode cache (as greedy decoding runs), the weights sown at
    each step are the teacher-forced rows: the alignment evaluator's teacher-forced pass
    over a decode shows what decoding attended to."""
    model, params = _model(case)
    valid = INPUTS != 0
    encoded = model.apply({"params": params}, INPUTS, inputs_valid=valid, method=model.encode)
    cache = D.init_encdec_cache(model, encoded, valid, DEC.shape[1])
    step = _jit(lambda c, toks: model.apply({"params": params, "cache": c}, encoded, toks,
                                            inputs_valid=valid, decode=True,
                                            mutable=["cache", "intermediates"],
                                            method=model.decode))
    rows = []
    for t in range(DEC.shape[1]):
        _, variables = step(cache, DEC[:, t:t + 1])
        cache = variables["cache"]
        rows.append(np.asarray(variables["intermediates"]["alignment"][0]))
    np.testing.assert_allclose(np.concatenate(rows, 1), _teacher_forced(model, params),
                               atol=1e-5)


def test_bahdanau_first_row_equals_its_equation():
    """Row 0: a_j = softmax_j(v . tanh(W s_0 + U h_j)) over the real tokens, with s_0 the
    top decoder layer's bridged state tanh(W_s [h->_last; h<-_1] + b) (float64)."""
    model, params = _model("bahdanau")
    a = _teacher_forced(model, params)[:, 0]
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h = np.asarray(model.apply({"params": params}, INPUTS, method=model.encode), np.float64)
    valid = np.asarray(INPUTS != 0)
    hidden = 16
    for b in range(3):
        n = int(valid[b].sum())
        summary = np.concatenate([h[b, n - 1, :hidden], h[b, 0, hidden:]])
        s0 = np.tanh(summary @ p["bridge"]["kernel"] + p["bridge"]["bias"])[hidden:]  # top
        keys = h[b, :n] @ p["attn_key_kernel"]
        e = np.tanh(s0 @ p["attn_query_kernel"] + keys) @ p["attn_v"]
        want = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        np.testing.assert_allclose(a[b, :n], want, atol=1e-5)
