"""Recurrent layers against float64 NumPy equations, padding against unpadded rows run
alone, hoisted vs in-scan projection, residual stacks by hand, gradients, cuDNN packing.

Parameters are random N(0, 0.5^2) (not the init), so a swapped gate, a misplaced reset
gate or a bias in the wrong slice changes the numbers.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from models.layers import recurrent as R

_OPTS = {"xla_backend_optimization_level": 0}   # CPU compile time dominates these tests
_jit = functools.partial(jax.jit, compiler_options=_OPTS, static_argnames=("cfg",))
B, T, I, H = 4, 6, 5, 3
LENGTHS = np.array([6, 4, 1, 0])
X = np.random.default_rng(0).normal(size=(B, T, I)).astype(np.float32)
GPU = jax.default_backend() == "gpu"
# "gru_before" = Cho et al. 2014 (reset before the recurrent matmul).
CELL_CASES = ["rnn", "lstm", "gru", "gru_before"]


def _cfg(cell="lstm", **kw):
    extra = {"cell": cell}
    if cell == "gru_before":
        extra = {"cell": "gru", "gru_reset_after": False}
    return R.RecurrentConfig(**{**dict(hidden=H, implementation="scan"), **extra, **kw})


def _params(cfg, input_size=I, seed=0, dtype=np.float32):
    shapes = jax.eval_shape(R.Recurrent(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 2, input_size)))["params"]
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * r.normal(size=s.shape), dtype), shapes)


def _state(cfg, seed=1, dtype=np.float32):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda z: jnp.asarray(0.5 * r.normal(size=z.shape), dtype),
                        R.zero_state(cfg, B))


@_jit
def _stack(params, x, lengths, state, cfg):
    return R.scan_stack(params, x, cfg, lengths=lengths, initial_state=state)


# ----------------------------------------------------------------------------------------
# Cells vs NumPy (float64), written gate by gate.
# ----------------------------------------------------------------------------------------
def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np_step(cell, p, carry, x):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    W, U, b = p["input_kernel"], p["recurrent_kernel"], p["bias"]
    gate = lambda k, h: x @ W[:, k * H:(k + 1) * H] + h @ U[:, k * H:(k + 1) * H] \
        + b[k * H:(k + 1) * H]  # noqa: E731
    if cell == "rnn":
        h = np.tanh(gate(0, carry))
        return h, h
    if cell == "lstm":
        h, c = carry
        i, f, g, o = _sig(gate(0, h)), _sig(gate(1, h)), np.tanh(gate(2, h)), _sig(gate(3, h))
        c = f * c + i * g
        h = o * np.tanh(c)
        return (h, c), h
    h = carry
    r, z = _sig(gate(0, h)), _sig(gate(1, h))
    xn = x @ W[:, 2 * H:] + b[2 * H:]
    if cell == "gru":   # cuDNN: r * (h U_n + b_hn)
        n = np.tanh(xn + r * (h @ U[:, 2 * H:] + p["recurrent_bias"]))
    else:               # Cho et al. 2014: (r * h) U_n
        n = np.tanh(xn + (r * h) @ U[:, 2 * H:])
    h = z * h + (1 - z) * n   # Cho et al. eq. 7: z keeps the old state
    return h, h


def _np_sequence(cell, p, carry, x, length):
    """One row, forward: outputs [T, H] (zero past `length`) and the final carry."""
    outs = np.zeros((x.shape[0], H))
    for t in range(length):
        carry, outs[t] = _np_step(cell, p, carry, x[t])
    return outs, carry


def _np_carry(cfg, carry, row):
    if cfg.cell == "lstm":
        return (np.asarray(carry.h[row], np.float64), np.asarray(carry.c[row], np.float64))
    return np.asarray(carry[row], np.float64)


@pytest.mark.parametrize("cell", CELL_CASES)
def test_one_step_matches_numpy(cell):
    cfg = _cfg(cell)
    p = _params(cfg)["layers_0"]["fwd"]
    carry = _state(cfg)[0][0]
    new, h = R.cell_step(p, carry, R.project_inputs(p, jnp.asarray(X[:, 0]), cfg), cfg)
    for row in range(B):
        want_carry, want_h = _np_step(cfg.cell if cell != "gru_before" else cell, p,
                                      _np_carry(cfg, carry, row), X[row, 0].astype(np.float64))
        np.testing.assert_allclose(np.asarray(h[row]), want_h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(jax.tree.leaves(new)[-1][row]),
                                   jax.tree.leaves(want_carry)[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELL_CASES)
def test_sequence_with_padding_and_initial_state_matches_numpy(cell):
    """Forward and backward directions, every row against NumPy within its length; the
    backward direction is NumPy's forward pass over the row reversed WITHIN its length."""
    cfg = _cfg(cell, bidirectional=True)
    params, state = _params(cfg), _state(cfg)
    y, final = _stack(params, jnp.asarray(X), jnp.asarray(LENGTHS), state, cfg)
    name = cell if cell == "gru_before" else cfg.cell
    for row, n in enumerate(LENGTHS):
        x = X[row].astype(np.float64)
        fwd, fwd_last = _np_sequence(name, params["layers_0"]["fwd"],
                                     _np_carry(cfg, state[0][0], row), x, n)
        rev = np.concatenate([x[:n][::-1], x[n:]])
        bwd, bwd_last = _np_sequence(name, params["layers_0"]["bwd"],
                                     _np_carry(cfg, state[0][1], row), rev, n)
        bwd[:n] = bwd[:n][::-1]
        np.testing.assert_allclose(np.asarray(y[row]), np.concatenate([fwd, bwd], -1),
                                   rtol=1e-5, atol=1e-5)
        for got, want in ((final[0][0], fwd_last), (final[0][1], bwd_last)):
            for g, w in zip(jax.tree.leaves(_np_carry(cfg, got, row)), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Length 0: the initial state comes back untouched and every output is zero.
    assert not np.any(np.asarray(y[3]))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(final)[0][3]),
                                  np.asarray(jax.tree.leaves(state)[0][3]))


def test_initial_state_is_used():
    cfg = _cfg("lstm")
    params = _params(cfg)
    y0, _ = _stack(params, jnp.asarray(X), None, None, cfg)
    y1, _ = _stack(params, jnp.asarray(X), None, _state(cfg), cfg)
    assert np.abs(np.asarray(y0 - y1))[:, 0].min() > 1e-4


def test_forget_bias_starts_at_one_and_recurrent_blocks_are_orthogonal():
    cfg = R.RecurrentConfig(cell="lstm", hidden=H)
    p = _jit(R.Recurrent(cfg).init)(jax.random.key(0), jnp.zeros((1, 2, I)))
    p = p["params"]["layers_0"]
    np.testing.assert_array_equal(p["fwd"]["bias"], np.r_[np.zeros(H), np.ones(H),
                                                          np.zeros(2 * H)])
    u = np.asarray(p["fwd"]["recurrent_kernel"])
    for k in range(4):
        blk = u[:, k * H:(k + 1) * H]
        np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Padding, bidirectional, hoisting, stacks.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_batch_equals_each_sequence_alone(cell):
    """2-layer bidirectional: the padded batch vs every row run alone, unpadded."""
    cfg = _cfg(cell, num_layers=2, bidirectional=True)
    params, state = _params(cfg), _state(cfg)
    y, final = _stack(params, jnp.asarray(X), jnp.asarray(LENGTHS), state, cfg)
    for row, n in enumerate(LENGTHS[:3]):
        one = jax.tree.map(lambda a, r=row: a[r:r + 1], state)
        y1, f1 = _stack(params, jnp.asarray(X[row:row + 1, :n]), None, one, cfg)
        np.testing.assert_allclose(np.asarray(y[row, :n]), np.asarray(y1[0]), atol=1e-5)
        assert not np.any(np.asarray(y[row, n:]))
        for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(f1)):
            np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[0]), atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru_before"])
def test_hoisted_equals_in_scan_projection(cell):
    cfg = _cfg(cell, num_layers=2, bidirectional=True)
    params, state = _params(cfg), _state(cfg)
    a = _stack(params, jnp.asarray(X), jnp.asarray(LENGTHS), state, cfg)
    b = _stack(params, jnp.asarray(X), jnp.asarray(LENGTHS), state,
               cfg.replace(hoist_input_projection=False))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_residual_stack_equals_layers_by_hand(merge):
    cfg = _cfg("gru", num_layers=3, bidirectional=True, merge=merge, residual=True)
    params, lengths = _params(cfg), jnp.asarray(LENGTHS)
    y, final = _stack(params, jnp.asarray(X), lengths, None, cfg)
    width = 2 * H if merge == "concat" else H
    assert y.shape == (B, T, width) and len(final) == 3 and len(final[0]) == 2
    mask = (np.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    h = jnp.asarray(X)
    zero = R.zero_state(cfg, B)
    layer = _jit(R.scan_layer, static_argnums=2)
    for i in range(3):
        outs, _ = layer(params[f"layers_{i}"], h, cfg, zero[i], lengths)
        out = jnp.concatenate(outs, -1) if merge == "concat" else outs[0] + outs[1]
        h = (out + h if i >= 1 else out) * mask   # GNMT: no residual into layer 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(h), atol=1e-5)


def test_module_dropout_and_shapes():
    cfg = R.RecurrentConfig(cell="lstm", hidden=H, num_layers=2, dropout=0.5)
    m = R.Recurrent(cfg)
    v = _jit(m.init)(jax.random.key(0), jnp.asarray(X))
    apply = jax.jit(lambda v, rng, train: m.apply(v, jnp.asarray(X), train=train,
                                                  rngs={"dropout": rng}),
                    static_argnums=2, compiler_options=_OPTS)
    y_eval, _ = apply(v, jax.random.key(1), False)
    y_a, _ = apply(v, jax.random.key(1), True)
    y_b, _ = apply(v, jax.random.key(1), True)
    np.testing.assert_array_equal(np.asarray(y_a), np.asarray(y_b))
    assert y_eval.shape == (B, T, H) and not np.allclose(np.asarray(y_a), np.asarray(y_eval))
    assert R.param_count(cfg, I) == sum(x.size for x in jax.tree.leaves(v))


def test_gradients_float64():
    with jax.enable_x64(True):
        cfg = _cfg("lstm", num_layers=2, bidirectional=True, dtype="float64",
                   param_dtype="float64", hidden=2)
        params = _params(cfg, input_size=2, dtype=np.float64)
        x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 2)))
        lengths = jnp.asarray([3, 2])
        gcfg = _cfg("gru", dtype="float64", param_dtype="float64", hidden=2)
        gparams = _params(gcfg, input_size=2, dtype=np.float64)

        def loss(p, x, c):
            y, final = R.scan_stack(p, x, c, lengths=lengths)
            return jnp.sum(y ** 2) + jnp.sum(jax.tree.leaves(final)[0])
        for c, p in ((cfg, params), (gcfg, gparams)):
            check_grads(jax.jit(functools.partial(loss, c=c)), (p, x), order=1, modes=["rev"])


# ----------------------------------------------------------------------------------------
# cuDNN: packing, jax's reference LSTM, fallback, and (on a GPU) the kernel itself.
# ----------------------------------------------------------------------------------------
def test_cudnn_packing_round_trips_and_matches_jax_layout():
    from jax.experimental import rnn as jrnn
    cfg = _cfg("lstm", num_layers=2, bidirectional=True)
    params = _params(cfg)
    flat = R.to_cudnn_weights(params, cfg)
    assert flat.shape == (jrnn.get_num_params_in_lstm(I, H, 2, True),)
    back = R.from_cudnn_weights(flat, cfg, I)
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    w_ih, w_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(flat, I, H, 2, True)
    for k, (i, d) in enumerate([(0, "fwd"), (0, "bwd"), (1, "fwd"), (1, "bwd")]):
        p = params[f"layers_{i}"][d]
        np.testing.assert_array_equal(w_ih[k], np.asarray(p["input_kernel"]).T)
        np.testing.assert_array_equal(w_hh[k], np.asarray(p["recurrent_kernel"]).T)
        np.testing.assert_array_equal(b_ih[k], p["bias"])
        assert not np.any(np.asarray(b_hh[k]))


def test_scan_equals_jax_reference_of_cudnn_lstm():
    """jax.experimental.rnn.lstm_ref (its CPU model of the cuDNN kernel, variable lengths,
    bidirectional, initial states) on our packed weights == our scan."""
    from jax.experimental import rnn as jrnn
    cfg = _cfg("lstm", num_layers=2, bidirectional=True)
    params, state = _params(cfg), _state(cfg)
    lengths = jnp.asarray([6, 4, 1, 2], jnp.int32)   # lstm_ref cannot take length 0
    y, final = _stack(params, jnp.asarray(X), lengths, state, cfg)
    carries = [c for layer in state for c in layer]
    h0, c0 = jnp.stack([c.h for c in carries]), jnp.stack([c.c for c in carries])
    unpacked = jrnn.unpack_lstm_weights(R.to_cudnn_weights(params, cfg), I, H, 2, True)
    y_ref, h_n, c_n = jrnn.lstm_ref(jnp.asarray(X), h0, c0, *unpacked, lengths, I, H, 2,
                                    0.0, True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    finals = [c for layer in final for c in layer]
    np.testing.assert_allclose(np.stack([c.h for c in finals]), h_n, atol=1e-5)
    np.testing.assert_allclose(np.stack([c.c for c in finals]), c_n, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(residual=True, merge="sum")])
def test_cudnn_stack_wiring_with_jax_reference_as_the_kernel(monkeypatch, kw):
    """cudnn_stack's plumbing (packing, state order, the fused call or one call per layer,
    zero-length rows, masking) on CPU, with jax's reference standing in for the kernel."""
    from jax.experimental import rnn as jrnn

    def fake_lstm(x, h0, c0, w, seq, *, input_size, hidden_size, num_layers, dropout,
                  bidirectional, precision=None):
        assert int(seq.min()) >= 1   # cuDNN cannot take length 0 (jax-ml/jax#17966)
        unpacked = jrnn.unpack_lstm_weights(w, input_size, hidden_size, num_layers,
                                            bidirectional)
        return jrnn.lstm_ref(x, h0, c0, *unpacked, seq, input_size, hidden_size, num_layers,
                             dropout, bidirectional)
    monkeypatch.setattr(jrnn, "lstm", fake_lstm)
    cfg = _cfg("lstm", num_layers=2, bidirectional=True, **kw)
    params, state, lengths = _params(cfg), _state(cfg), jnp.asarray(LENGTHS)
    want = _stack(params, jnp.asarray(X), lengths, state, cfg)
    got = R.cudnn_stack(params, jnp.asarray(X), cfg, lengths=lengths, initial_state=state)
    for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5)


@pytest.mark.skipif(GPU, reason="checks the CPU fallback")
def test_cudnn_falls_back_to_scan_without_a_gpu():
    auto = R.RecurrentConfig(hidden=H)
    assert R.resolve_implementation(auto) == "scan"
    assert "no NVIDIA GPU" in R.cudnn_unsupported_reason(auto)
    assert "only the LSTM" in R.cudnn_unsupported_reason(auto.replace(cell="gru"))
    assert "float32" in R.cudnn_unsupported_reason(auto.replace(dtype="bfloat16"))
    m = R.Recurrent(auto.replace(implementation="cudnn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = m.init(jax.random.key(0), jnp.asarray(X))
        y, _ = m.apply(v, jnp.asarray(X), lengths=jnp.asarray(LENGTHS))
    assert any("falls back to the scan" in str(w.message) for w in caught)
    y_scan, _ = R.Recurrent(auto.replace(implementation="scan")).apply(
        v, jnp.asarray(X), lengths=jnp.asarray(LENGTHS))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_scan))


@pytest.mark.skipif(not GPU or R.cudnn_unsupported_reason(R.RecurrentConfig()) is not None,
                    reason="needs an NVIDIA GPU with cuDNN")
@pytest.mark.parametrize("residual", [False, True])   # fused call / one call per layer
def test_cudnn_equals_scan_on_gpu(residual):
    cfg = _cfg("lstm", num_layers=2, bidirectional=True, residual=residual)
    params, state, lengths = _params(cfg), _state(cfg), jnp.asarray(LENGTHS)

    def loss(p, stack):
        y, final = stack(p, jnp.asarray(X), cfg, lengths=lengths, initial_state=state)
        return jnp.sum(y ** 2) + sum(jnp.sum(a) for a in jax.tree.leaves(final)), (y, final)
    with jax.default_matmul_precision("highest"):
        (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda p: loss(p, R.scan_stack),
                                                     has_aux=True))(params)
        (_, got), g_got = jax.jit(jax.value_and_grad(lambda p: loss(p, R.cudnn_stack),
                                                     has_aux=True))(params)
    for u, v in zip(jax.tree.leaves((ref, g_ref)), jax.tree.leaves((got, g_got))):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-4)
