"""Norms at a large mean (two-pass vs flax's one-pass variance) against float64 NumPy,
BatchNorm's running statistics (biased | unbiased), its equality with flax's nn.BatchNorm,
cross-device statistics, and that no model builds a flax norm directly.

Inputs have mean 1000 and std 1 (std 0.1 for the collapse case) in float32: there
E[x^2] - E[x]^2 loses ~0.3 of a unit variance, the two-pass variance ~1e-4.
"""
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import normalization as N

MEAN, TOL, FAST_OFF_BY = 1000.0, 1e-3, 0.05


def _large_mean(shape, std=1.0, seed=0):
    return (MEAN + std * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _standardize64(x, axes, eps):
    x = np.asarray(x, np.float64)
    return ((x - x.mean(axes, keepdims=True))
            / np.sqrt(x.var(axes, keepdims=True) + eps))


def _max_err(module, x, expected, **apply_kw):
    variables = module.init(jax.random.key(0), x)
    out = module.apply(variables, x, **apply_kw)
    out = out[0] if isinstance(out, tuple) else out
    return float(np.abs(np.asarray(out, np.float64) - expected).max())


# ----------------------------------------------------------------------------------------
# LayerNorm / GroupNorm / RMSNorm (per example; init scale 1, bias 0).
# ----------------------------------------------------------------------------------------
def test_layernorm_two_pass_at_mean_1000_and_the_fast_variance_fails():
    x = _large_mean((8, 64))
    expected = _standardize64(x, -1, 1e-6)
    assert _max_err(N.make_norm("layernorm"), x, expected) < TOL
    assert _max_err(N.layer_norm(), x, expected) < TOL
    assert _max_err(nn.LayerNorm(), x, expected) > FAST_OFF_BY  # flax default: ~0.3


def test_layernorm_over_feature_maps_as_the_gan_uses_it():
    x = _large_mean((2, 4, 4, 8))
    expected = _standardize64(x, (1, 2, 3), 1e-5)
    kw = dict(epsilon=1e-5, reduction_axes=(-3, -2, -1))
    assert _max_err(N.layer_norm(**kw), x, expected) < TOL
    assert _max_err(nn.LayerNorm(**kw), x, expected) > FAST_OFF_BY


def test_groupnorm_two_pass_at_mean_1000():
    x = _large_mean((4, 4, 4, 16))
    groups = np.asarray(x, np.float64).reshape(4, 4, 4, 4, 4)   # 4 groups of 4 channels
    expected = _standardize64(groups, (1, 2, 4), 1e-6).reshape(x.shape)
    assert _max_err(N.group_norm(num_groups=4), x, expected) < TOL
    assert _max_err(nn.GroupNorm(num_groups=4), x, expected) > FAST_OFF_BY


def test_rmsnorm_has_no_mean_so_the_variance_choice_does_not_arise():
    x = _large_mean((8, 64))
    x64 = np.asarray(x, np.float64)
    expected = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6)
    assert _max_err(N.make_norm("rmsnorm"), x, expected) < 1e-5
    v = nn.RMSNorm().init(jax.random.key(0), x)
    np.testing.assert_array_equal(nn.RMSNorm(use_fast_variance=True).apply(v, x),
                                  nn.RMSNorm(use_fast_variance=False).apply(v, x))


@pytest.mark.parametrize("kind", N.NORMS)
def test_channel_weighted_norm_is_the_plain_norm_of_the_open_channels(kind):
    """z in {0, 1}: exactly the norm of the open channels alone (closed ones 0); z = 1:
    make_norm's; fractional z: the weighted statistics of float64 NumPy; differentiable
    in x and z."""
    from jax.test_util import check_grads  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, (3, 10)).astype(np.float32)
    z = (rng.permutation(10) < 6).astype(np.float32)
    norm = N.ChannelWeightedNorm(kind, epsilon=1e-5)
    variables = nn.unbox(norm.init(jax.random.key(0), x, z))
    variables = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32),
                             variables)
    plain = N.make_norm(kind, epsilon=1e-5)
    keep = z > 0
    sub = jax.tree.map(lambda p: p[keep], variables)
    np.testing.assert_allclose(np.asarray(norm.apply(variables, x, z))[:, keep],
                               np.asarray(plain.apply(sub, x[:, keep])), atol=1e-5)
    assert np.all(np.asarray(norm.apply(variables, x, z))[:, ~keep] == 0)
    ones = np.ones(10, np.float32)
    np.testing.assert_allclose(np.asarray(norm.apply(variables, x, ones)),
                               np.asarray(plain.apply(variables, x)), atol=1e-5)
    w = rng.uniform(0.1, 1.0, 10)
    x64 = np.asarray(x, np.float64)
    mean = (x64 * w).sum(-1, keepdims=True) / w.sum() if kind == "layernorm" else 0.0
    var = (np.square(x64 - mean) * w).sum(-1, keepdims=True) / w.sum()
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)["params"]
    want = (x64 - mean) / np.sqrt(var + 1e-5) * p64["scale"] + p64.get("bias", 0.0)
    np.testing.assert_allclose(np.asarray(norm.apply(variables, x, w.astype(np.float32))),
                               want * w, atol=1e-5)
    check_grads(lambda x_, z_: norm.apply(variables, x_, z_), (x, w.astype(np.float32)),
                order=1, modes=("rev",), atol=2e-2, rtol=2e-2)



# ----------------------------------------------------------------------------------------
# BatchNorm.
# ----------------------------------------------------------------------------------------
X_SHAPE = (6, 3, 3, 5)            # n = 6 * 3 * 3 = 54 values per channel
N_REDUCED = 54


def _train_step(module, x):
    variables = module.init(jax.random.key(0), x)
    out, upd = module.apply(variables, x, mutable=["batch_stats"])
    return variables, out, upd["batch_stats"]


@pytest.mark.parametrize("running_variance", N.RUNNING_VARIANCES)
def test_batchnorm_training_step_equals_float64(running_variance):
    """Output from the biased batch variance; running mean / var after one step:
    m * (0, 1) + (1 - m) * (mean, var * c), c = 1 | n / (n - 1)."""
    x = _large_mean(X_SHAPE)
    x64, m = np.asarray(x, np.float64), 0.9
    bn = N.BatchNorm(use_running_average=False, momentum=m, running_variance=running_variance)
    _, out, stats = _train_step(bn, x)
    np.testing.assert_allclose(out, _standardize64(x64, (0, 1, 2), 1e-5), atol=TOL)
    c = N_REDUCED / (N_REDUCED - 1) if running_variance == "unbiased" else 1.0
    np.testing.assert_allclose(stats["mean"], (1 - m) * x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], m + (1 - m) * x64.var((0, 1, 2)) * c,
                               rtol=1e-5)
    np.testing.assert_allclose(stats["var"],
                               m + (1 - m) * x64.var((0, 1, 2), ddof=int(c != 1.0)),
                               rtol=1e-5)  # numpy's ddof=1 is PyTorch's running_var
    # flax's default (one-pass variance) at the same input:
    _, fast_out, _ = _train_step(nn.BatchNorm(use_running_average=False, momentum=m), x)
    assert np.abs(np.asarray(fast_out) - _standardize64(x64, (0, 1, 2), 1e-5)).max() \
        > FAST_OFF_BY


def test_batchnorm_variance_at_std_0_1_where_the_fast_one_is_0_or_far_off():
    x = _large_mean(X_SHAPE, std=0.1)
    var64 = np.asarray(x, np.float64).var((0, 1, 2))
    _, _, stats = _train_step(N.BatchNorm(use_running_average=False, momentum=0.0), x)
    np.testing.assert_allclose(stats["var"], var64, rtol=TOL)
    _, _, fast = _train_step(nn.BatchNorm(use_running_average=False, momentum=0.0), x)
    # E[x^2] - E[x]^2 is a multiple of 2^-4 here: 0 (clipped) or several times var64 (~0.01).
    fast = np.asarray(fast["var"])
    assert np.all(fast % 2.0 ** -4 == 0) and np.all(np.abs(fast - var64) > 0.5 * var64)
    assert np.any(fast == 0.0)


def test_batchnorm_eval_uses_the_running_statistics():
    x = _large_mean(X_SHAPE)
    bn = N.BatchNorm(use_running_average=True)
    v = bn.init(jax.random.key(0), x)
    r = np.random.default_rng(1)
    v = {"params": {"scale": jnp.asarray(1 + 0.1 * r.normal(size=5), jnp.float32),
                    "bias": jnp.asarray(r.normal(size=5), jnp.float32)},
         "batch_stats": {"mean": jnp.full(5, MEAN, jnp.float32),
                         "var": jnp.asarray(r.uniform(0.5, 1.5, 5), jnp.float32)}}
    out, upd = bn.apply(v, x, mutable=["batch_stats"])
    p, s = jax.tree.map(lambda a: np.asarray(a, np.float64), (v["params"], v["batch_stats"]))
    expected = (np.asarray(x, np.float64) - s["mean"]) / np.sqrt(s["var"] + 1e-5) \
        * p["scale"] + p["bias"]
    np.testing.assert_allclose(out, expected, atol=TOL)
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_equals_flax_two_pass_bit_for_bit(dtype, train):
    """Same variable names, shapes and dtypes as nn.BatchNorm(use_fast_variance=False),
    same outputs and updates bit for bit (the default running_variance="biased")."""
    x = jnp.asarray(np.random.default_rng(2).normal(1.0, 2.0, X_SHAPE), dtype)
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
              scale_init=nn.initializers.zeros)
    ours, flax_bn = N.BatchNorm(**kw), nn.BatchNorm(use_fast_variance=False, **kw)
    v = ours.init(jax.random.key(0), x)
    v_flax = flax_bn.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), v_flax)
    v = jax.tree.map(lambda a: a + 0.25, v)       # non-trivial scale / stats
    a, a_upd = ours.apply(v, x, mutable=["batch_stats"])
    b, b_upd = flax_bn.apply(v, x, mutable=["batch_stats"])
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    jax.tree.map(np.testing.assert_array_equal, a_upd, b_upd)


@pytest.mark.parametrize("running_variance", N.RUNNING_VARIANCES)
def test_batchnorm_axis_name_gives_the_global_batch_statistics(running_variance):
    """vmap over 2 shards with axis_name: the statistics (and n) of the whole batch."""
    x = np.random.default_rng(3).normal(1.0, 2.0, X_SHAPE).astype(np.float32)
    kw = dict(use_running_average=False, momentum=0.5, running_variance=running_variance)
    _, whole, whole_stats = _train_step(N.BatchNorm(**kw), x)
    sharded = N.BatchNorm(axis_name="shards", **kw)
    v = sharded.init(jax.random.key(0), x[:3])
    out, upd = jax.vmap(lambda s: sharded.apply(v, s, mutable=["batch_stats"]),
                        axis_name="shards")(x.reshape(2, 3, *X_SHAPE[1:]))
    np.testing.assert_allclose(out.reshape(X_SHAPE), whole, atol=1e-5)
    for shard in range(2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[shard], b, rtol=1e-6),
                     upd["batch_stats"], whole_stats)


def test_batchnorm_init_updates_nothing_and_errors():
    x = _large_mean(X_SHAPE)
    v = N.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(5))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(5))
    with pytest.raises(ValueError, match="running_variance='pytorch' is not allowed; "
                                         "allowed: biased, unbiased"):
        N.BatchNorm(use_running_average=False, running_variance="pytorch").init(
            jax.random.key(0), x)
    one = N.BatchNorm(use_running_average=False, running_variance="unbiased")
    v = one.init(jax.random.key(0), x[:1, :1, :1])
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        one.apply(v, x[:1, :1, :1], mutable=["batch_stats"])


def test_no_model_builds_a_flax_norm_directly():
    """Every norm goes through models/layers/normalization.py (two-pass variance)."""
    root = pathlib.Path(N.__file__).resolve().parents[1]
    pattern = re.compile(r"\bnn\.(LayerNorm|BatchNorm|GroupNorm|InstanceNorm)\b")
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py"))
                 if p.name != "normalization.py" and pattern.search(p.read_text())]
    assert offenders == []
