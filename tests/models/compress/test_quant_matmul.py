"""Activation quantization through dot_general: integer path, fake quant, calibration."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models.compress import quant_matmul as QM
from models.compress import quantize as Q

DENSE = (((2,), (0,)), ((), ()))                  # x [b, s, k] @ w [k, n]
SCORES = (((3,), (3,)), ((0, 2), (0, 2)))         # attention: q [b, q, h, d] . k [b, k, h, d]


def test_int32_accumulation_is_exact_for_int8_inputs():
    rng = np.random.default_rng(0)
    a = rng.choice([-127, 127], size=(3, 4096)).astype(np.int8)
    b = np.sign(a.T[:, :2]).astype(np.int8) * 127        # sum = 4096 * 127^2 = 66e6 > 2^24
    b = np.concatenate([b, rng.integers(-127, 128, (4096, 1)).astype(np.int8)], axis=1)
    out = lax.dot_general(jnp.asarray(a), jnp.asarray(b), (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    assert out.dtype == jnp.int32
    ref = a.astype(np.int64) @ b.astype(np.int64)
    assert abs(ref).max() > 2 ** 24                    # beyond float32's exact integers
    np.testing.assert_array_equal(out, ref)


def _dequantized_reference(x, w, dims, bits, symmetric):
    """float64 matmul of the dequantized operands (lhs per tensor, rhs per output)."""
    xq = np.asarray(Q.quantize(x, bits, symmetric).dequantize(), np.float64)
    wq = np.asarray(Q.quantize(w, bits, True, axes=dims[0][1]).dequantize(), np.float64)
    spec = "bsk,kn->bsn" if dims == DENSE else "bqhd,bkhd->bhqk"
    return np.einsum(spec, xq, wq)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_dynamic_int_matmul_equals_float_matmul_of_dequantized_operands(symmetric, bits):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 3, 16)) + 0.7).astype(np.float32)
    w = (rng.normal(size=(16, 5)) * [0.1, 1, 3, 0.01, 1]).astype(np.float32)
    q, k = rng.normal(size=(2, 2, 3, 2, 8)).astype(np.float32)     # [b, len, heads, d]
    dg = QM.make_dot_general("dynamic", bits, symmetric)
    for a, b, dims in ((x, w, DENSE), (q, k, SCORES)):
        ref = _dequantized_reference(a, b, dims, bits, symmetric)
        out = jax.jit(lambda a, b, dims=dims: dg(a, b, dims))(a, b)
        assert out.shape == ref.shape and out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def _power_of_two_operands(symmetric):
    """lhs with per-tensor scale 2^-4 (zero point 10 when asymmetric), rhs column j with
    scale 2^-(j+1): every product and partial sum is exact in float32."""
    rng = np.random.default_rng(2)
    lo, hi = (-127, 127) if symmetric else (-10, 245)   # asymmetric: 255 steps, Z = 10
    x = rng.uniform(lo, hi, (2, 3, 16))
    x.flat[0], x.flat[1] = lo, hi
    w = rng.integers(-127, 128, (16, 4)).astype(np.float64)
    w[0] = 127
    return ((x * 2.0 ** -4).astype(np.float32),
            (w * 2.0 ** -np.arange(1, 5)).astype(np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_equals_the_integer_path_exactly_with_power_of_two_scales(symmetric):
    x, w = _power_of_two_operands(symmetric)
    s_l, z_l = Q.scale_and_zero_point(x.min(), x.max(), 8, symmetric)
    assert float(s_l) == 2 ** -4 and (z_l is None or int(z_l) == 10)
    fake = jax.jit(lambda a, b: QM.make_dot_general("fake", 8, symmetric)(a, b, DENSE))(x, w)
    integer = jax.jit(lambda a, b: QM.make_dot_general("dynamic", 8, symmetric)(a, b, DENSE))(
        x, w)
    np.testing.assert_array_equal(fake, integer)


def test_fake_mode_gradients_are_straight_through():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = rng.normal(size=(8, 5)).astype(np.float32)
    dg = QM.make_dot_general("fake", 4)
    gx, gw = jax.grad(lambda a, b: jnp.sum(dg(a, b, DENSE)), argnums=(0, 1))(x, w)
    wq = np.asarray(Q.fake_quant(w, 4, axes=0), np.float64)
    xq = np.asarray(Q.fake_quant(x, 4), np.float64)
    np.testing.assert_allclose(gx, np.broadcast_to(wq.sum(1), x.shape), rtol=1e-6)
    np.testing.assert_allclose(gw, np.broadcast_to(xq.sum((0, 1))[:, None], w.shape),
                               rtol=1e-6)


def _two_layer(dg, x, w1, w2):
    h = dg(x, w1, DENSE)
    return dg(jnp.tanh(h), w2, DENSE), h


def _calibration_data():
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(6, 4)).astype(np.float32)
    w2 = rng.normal(size=(4, 3)).astype(np.float32)
    batches = [rng.normal(size=(2, 5, 6)).astype(np.float32) * (i + 1) + i for i in range(3)]
    return w1, w2, batches


def _recorded(w1, w2, batches):
    """Each batch's activations at the two call sites, computed in NumPy."""
    sites = [[], []]
    for x in batches:
        h = x.astype(np.float64) @ w1
        sites[0].append(x.astype(np.float64))
        sites[1].append(np.tanh(h))
    return sites


@pytest.mark.parametrize("jit", [False, True])
def test_observers_equal_numpy_references(jit):
    w1, w2, batches = _calibration_data()
    sites = _recorded(w1, w2, batches)

    def apply_fn(dg, x):
        return _two_layer(dg, x, w1, w2)[0]
    apply_fn = jax.jit(apply_fn, static_argnums=0) if jit else apply_fn

    cal = QM.calibrate(apply_fn, batches, "minmax")
    assert len(cal.ranges) == 2 and cal.observer == "minmax"
    for got, acts in zip(cal.ranges, sites):
        np.testing.assert_allclose(got, (min(a.min() for a in acts),
                                         max(a.max() for a in acts)), rtol=1e-5)

    cal = QM.calibrate(apply_fn, batches, "moving_average", averaging_constant=0.25)
    for got, acts in zip(cal.ranges, sites):
        lo, hi = acts[0].min(), acts[0].max()
        for a in acts[1:]:
            lo, hi = lo + 0.25 * (a.min() - lo), hi + 0.25 * (a.max() - hi)
        np.testing.assert_allclose(got, (lo, hi), rtol=1e-5)

    for symmetric in (True, False):
        cal = QM.calibrate(apply_fn, batches, "percentile", percentile=90.0,
                           symmetric=symmetric)
        for got, acts in zip(cal.ranges, sites):
            allv = np.concatenate([a.reshape(-1) for a in acts])
            want = ((-np.percentile(np.abs(allv), 90), np.percentile(np.abs(allv), 90))
                    if symmetric else (np.percentile(allv, 10), np.percentile(allv, 90)))
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_static_mode_uses_the_calibrated_ranges_and_checks_call_sites():
    w1, w2, batches = _calibration_data()
    cal = QM.calibrate(lambda dg, x: _two_layer(dg, x, w1, w2)[0], batches[:1], "minmax")
    x = batches[2]                                    # wider than the calibrated range
    static = QM.make_dot_general("static", 8, calibration=cal)
    out, h = jax.jit(lambda x: _two_layer(static, x, w1, w2))(x)
    # Site 0 clips x to the range seen on batch 0; site 1 sees tanh(h) within its range.
    lo, hi = cal.ranges[0]
    want_h = QM.int_dot_general(jnp.asarray(x), w1, DENSE, (lo, hi))
    np.testing.assert_allclose(h, want_h, rtol=1e-6)
    assert np.abs(np.asarray(x)).max() > max(abs(lo), abs(hi))   # clipping happened
    with pytest.raises(ValueError, match="calibration recorded"):
        jax.jit(lambda x: static(x, w1.T, (((2,), (1,)), ((), ()))))(x)
    # fake mode with a calibration: same ranges, float matmul, trainable.
    fake = QM.make_dot_general("fake", 8, calibration=cal)
    g = jax.grad(lambda x: jnp.sum(_two_layer(fake, x, w1, w2)[0]))(x)
    assert np.all(np.isfinite(g)) and np.any(g == 0)          # clipped inputs get no gradient


def test_make_dot_general_errors():
    with pytest.raises(ValueError, match="allowed: none, fake, dynamic, static"):
        QM.make_dot_general("int8")
    with pytest.raises(ValueError, match="needs calibration"):
        QM.make_dot_general("static")
    with pytest.raises(ValueError, match="allowed: integers 2..8"):
        QM.make_dot_general("dynamic", bits=16)
    with pytest.raises(ValueError, match="allowed: minmax, moving_average, percentile"):
        QM.calibrate(lambda dg, x: x, [1.0], "histogram")
    with pytest.raises(ValueError, match="allowed: averaging_constant"):
        QM.calibrate(lambda dg, x: x, [1.0], "moving_average", percentile=99)
    with pytest.raises(ValueError, match="percentile must be in"):
        QM.calibrate(lambda dg, x: x, [1.0], "percentile", percentile=120)
    assert QM.make_dot_general("none") is lax.dot_general
    assert Q.make_dot_general is QM.make_dot_general


def test_gpt_with_quantized_matmuls(tiny_gpt):
    from models import transformer
    model, cfg, params, tokens = tiny_gpt
    ref = jax.jit(model.apply)({"params": params}, tokens)

    def with_dg(dg):
        return transformer.Decoder(dataclasses.replace(cfg, dot_general=dg))

    def rel_err(logits):
        return float(jnp.abs(logits - ref).max() / jnp.abs(ref).max())

    dyn = jax.jit(lambda p, t: with_dg(QM.make_dot_general("dynamic")).apply({"params": p}, t))
    assert rel_err(dyn(params, tokens)) < 0.05

    batches = [jax.random.randint(jax.random.key(i), (2, 16), 4, 260) for i in (2, 3)]
    compiled = {}

    def apply_fn(dg, t):                      # one jit for the recorder, reused per batch
        if dg not in compiled:
            compiled[dg] = jax.jit(with_dg(dg).apply)
        return compiled[dg]({"params": params}, t)

    cal = QM.calibrate(apply_fn, batches, "minmax")
    # 2 layers x (q, k, v, scores, probs @ v, out, fc1, fc2) + the tied unembedding.
    assert len(cal.ranges) == 17
    static = with_dg(QM.make_dot_general("static", calibration=cal))
    assert rel_err(jax.jit(static.apply)({"params": params}, tokens)) < 0.05
