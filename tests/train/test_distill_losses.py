"""Distillation losses against float64 NumPy references, their minima, and the T scaling
of the KD gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.tasks import distill_losses as dl


def softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_equals_numpy_and_respects_padding(temperature):
    zs, zt = rng_arrays((3, 5, 11), (3, 5, 11))
    w = np.ones((3, 5), np.float32)
    w[1, 3:] = 0.0
    ps, pt = softmax64(zs / temperature), softmax64(zt / temperature)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    want = temperature ** 2 * (kl * w).sum() / w.sum()
    got, (total, weight) = dl.kd_loss(jnp.asarray(zs), jnp.asarray(zt), temperature, w)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    assert float(weight) == w.sum() and abs(float(total) / float(weight) - want) < 1e-4
    assert float(dl.kd_loss(jnp.asarray(zt), jnp.asarray(zt), temperature, w)[0]) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_gradient_is_t_times_the_softened_difference(temperature):
    """d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / N, p = softmax(z / T): the T^2 factor
    keeps the soft term's gradient scale ~T (Hinton et al. 2015, sec. 2)."""
    zs, zt = rng_arrays((4, 7), (4, 7), seed=1)
    grad = jax.grad(lambda z: dl.kd_loss(z, jnp.asarray(zt), temperature, jnp.ones(4))[0])(
        jnp.asarray(zs))
    want = temperature * (softmax64(zs / temperature) - softmax64(zt / temperature)) / 4
    np.testing.assert_allclose(np.asarray(grad), want, atol=2e-6)
    teacher_grad = jax.grad(lambda z: dl.kd_loss(jnp.asarray(zs), z, temperature,
                                                 jnp.ones(4))[0])(jnp.asarray(zt))
    assert not np.asarray(teacher_grad).any()  # the teacher receives no gradient


def test_cosine_and_hidden_mse_losses_equal_numpy():
    hs, ht = rng_arrays((2, 6, 8), (2, 6, 8), seed=2)
    w = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], np.float32)
    cos = (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
    np.testing.assert_allclose(float(dl.cosine_loss(hs, ht, w)[0]),
                               ((1 - cos) * w).sum() / w.sum(), rtol=1e-5)
    mse = ((hs.astype(np.float64) - ht) ** 2).mean(-1)
    np.testing.assert_allclose(float(dl.hidden_mse_loss(hs, ht, w)[0]),
                               (mse * w).sum() / w.sum(), rtol=1e-5)
    assert float(dl.cosine_loss(ht, ht, w)[0]) < 1e-6


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def affinity_reference(si, st, ss, ti, tt, ts, w):
    """float64: sum over both directions of mean_i CE(A_t[i], A_s[i]) on valid rows/cols."""
    keep = w > 0
    si, st, ti, tt = (np.asarray(a, np.float64)[keep] for a in (si, st, ti, tt))
    total = 0.0
    for s, t in ((ss * si @ st.T, ts * ti @ tt.T), (ss * st @ si.T, ts * tt @ ti.T)):
        total += -(softmax64(t) * np.log(softmax64(s))).sum(-1).mean()
    return total


def test_affinity_loss_equals_numpy_and_is_minimal_at_the_teachers_affinities():
    si, st = (unit(a) for a in rng_arrays((6, 5), (6, 5), seed=3))
    ti, tt = (unit(a) for a in rng_arrays((6, 9), (6, 9), seed=4))   # another width
    w = np.array([1, 1, 1, 1, 1, 0], np.float32)
    got = float(dl.affinity_loss(si, st, 10.0, ti, tt, 20.0, w)[0])
    assert abs(got - affinity_reference(si, st, 10.0, ti, tt, 20.0, w)) < 1e-5
    at_teacher = float(dl.affinity_loss(ti, tt, 20.0, ti, tt, 20.0, w)[0])
    assert at_teacher < got
    for seed in range(3):  # any move away from the teacher's affinities costs
        noise = rng_arrays((6, 9), (6, 9), seed=10 + seed)
        moved = float(dl.affinity_loss(unit(ti + 0.1 * noise[0]), unit(tt + 0.1 * noise[1]),
                                       20.0, ti, tt, 20.0, w)[0])
        assert moved > at_teacher
    # the minimum is the teacher's affinity entropy (CE of a distribution with itself)
    ref = affinity_reference(ti, tt, 20.0, ti, tt, 20.0, w)
    assert abs(at_teacher - ref) < 1e-5

