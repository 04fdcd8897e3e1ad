"""GAN task: losses and diagnostics against float64 NumPy, the Inception-Score-like score's
closed forms, phase isolation (each phase moves only its own parameter group), k
discriminator updates per step, the NaN bookkeeping, and a tiny end-to-end run that
writes sample grids and resumes bit-exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gan as gan_config
from train import data as data_lib
from train import config as config_lib
from train import families, trainer
from train.evaluators import images as image_evals
from train.tasks import common, make_task
from train.tasks import gan as gan_task


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_discriminator_and_generator_losses_equal_numpy():
    r = np.random.default_rng(0)
    real, fake = r.normal(size=7) * 3, r.normal(size=7) * 3
    w = np.array([1, 1, 1, 1, 1, 0, 0], np.float64)
    d_real, d_fake = _sigmoid(real), _sigmoid(fake)
    for eps in (0.0, 0.1):
        t = 1.0 - eps   # one-sided: only the real targets are smoothed
        bce_real = -(t * np.log(d_real) + (1 - t) * np.log(1 - d_real))
        want = (bce_real * w).sum() / w.sum() + (-np.log(1 - d_fake) * w).sum() / w.sum()
        got = gan_task.discriminator_loss(jnp.asarray(real, jnp.float32),
                                          jnp.asarray(fake, jnp.float32), t,
                                          jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(gan_task.generator_loss(jnp.asarray(fake))),
                               np.mean(-np.log(d_fake)), rtol=1e-5)
    np.testing.assert_allclose(float(gan_task.generator_loss(jnp.asarray(fake), "minimax")),
                               np.mean(np.log(1 - d_fake)), rtol=1e-5)
    # At D = 1/2 everywhere the discriminator's loss is 2 log 2.
    zeros = jnp.zeros(3)
    np.testing.assert_allclose(float(gan_task.discriminator_loss(zeros, zeros)),
                               2 * np.log(2), rtol=1e-6)
    with pytest.raises(ValueError, match="task.loss='wgan'; allowed: non_saturating, minimax"):
        gan_task.generator_loss(zeros, "wgan")


def test_pairwise_distances_equal_numpy():
    r = np.random.default_rng(1)
    x = r.uniform(size=(6, 4, 4, 3))
    w = np.array([1, 1, 1, 1, 0, 1], np.float64)
    flat = x.reshape(6, -1)
    total = count = 0.0
    for i in range(6):
        for j in range(i + 1, 6):
            total += w[i] * w[j] * np.sqrt(np.mean((flat[i] - flat[j]) ** 2))
            count += w[i] * w[j]
    s, n = gan_task.pairwise_distance_sums(jnp.asarray(x, jnp.float32),
                                           jnp.asarray(w, jnp.float32))
    assert float(n) == count == 10
    np.testing.assert_allclose(float(s), total, rtol=1e-5)
    s, _ = gan_task.pairwise_distance_sums(jnp.ones((4, 8)), jnp.ones(4))  # collapse
    assert float(s) == 0.0


def _score_from_batches(task, batches):
    """The score assembled from (sum, weight) metrics of several batches."""
    totals = None
    for probs, w in batches:
        totals = common.add_metrics(totals, gan_task.class_probability_sums(
            jnp.asarray(probs, jnp.float32), jnp.asarray(w, jnp.float32), "fake"))
    means = common.finalize(jax.device_get(totals))
    return task.derived_metrics(means), means


class _Scored:
    """derived_metrics without building a model (it only needs num_classes)."""
    num_classes = 5
    derived_metrics = gan_task.GANTask.derived_metrics


def test_inception_like_score_equals_numpy_and_its_closed_forms():
    r = np.random.default_rng(2)
    p = r.dirichlet(np.full(5, 0.3), size=11)
    w = np.ones(11)
    w[-2:] = 0.0                                    # padded tail rows
    keep = p[:9]
    marginal = keep.mean(0)
    want = np.exp(np.mean(np.sum(keep * np.log(keep / marginal), -1)))  # exp E KL(p || p_y)
    got, means = _score_from_batches(_Scored(), [(p[:4], w[:4]), (p[4:], w[4:])])
    np.testing.assert_allclose(got["fake_score"], want, rtol=1e-5)
    np.testing.assert_allclose(got["fake_classes"],
                               np.exp(-np.sum(marginal * np.log(marginal))), rtol=1e-5)
    np.testing.assert_allclose(means["fake_confidence"], keep.max(-1).mean(), rtol=1e-5)
    # Identical predictions: 1 (the marginal equals every p(y|x)).
    same, _ = _score_from_batches(_Scored(), [(np.tile(p[:1], (8, 1)), np.ones(8))])
    np.testing.assert_allclose(same["fake_score"], 1.0, rtol=1e-5)
    # Confident predictions covering the 5 classes equally: 5.
    onehot = np.eye(5)[np.arange(20) % 5]
    full, _ = _score_from_batches(_Scored(), [(onehot, np.ones(20))])
    np.testing.assert_allclose(full["fake_score"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(full["fake_classes"], 5.0, rtol=1e-6)


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (0.25, 0.5, 0.75)])
    grid = image_evals.image_grid(images, rows=2)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 1:4, 0], 0.25)
    np.testing.assert_array_equal(grid[1:3, 5:8, 0], 0.5)
    np.testing.assert_array_equal(grid[4:6, 1:4, 0], 0.75)
    np.testing.assert_array_equal(grid[4:6, 5:8, 0], 1.0)   # empty cell
    assert grid[0].min() == 1.0 and grid[:, 4].min() == 1.0  # borders


# ----------------------------------------------------------------------------------------
# Train steps on the tiny config (no scorer: these tests exercise the updates).
# ----------------------------------------------------------------------------------------
def _tiny(**task):
    c = gan_config.get_config("tiny")
    c.task.scorer_steps = 0
    for k, v in task.items():
        c.task[k] = v
    return c


def _setup(c):
    config_lib.validate(c)   # the task's options are checked with the config
    datasets = {s: data_lib.make_dataset(c.data, s, c.seed) for s in data_lib.SPLITS}
    model, _ = families.build(c.model, "gan", **datasets["train"].data_info())
    task = make_task(c, model, datasets)
    tx = task.make_optimizer(c.optim, c.train.num_steps)
    example = jax.tree.map(lambda x: x[:1], datasets["train"].batch(0))
    args, kwargs = task.init_args(example)
    state = jax.jit(trainer.make_init_state(model, tx, jax.random.key(0), args, kwargs))()
    return task, tx, state, datasets["train"].batch(0)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _differs(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def k1():
    """(config, task, tx, initial state, batch, jitted train step) with d_steps = 1."""
    c = _tiny()
    task, tx, state, batch = _setup(c)
    return c, task, tx, state, batch, jax.jit(task.make_train_step(tx, jax.random.key(5),
                                                                   c.optim))


def test_train_step_scalars_are_finite(k1):
    _, _, _, state, batch, step = k1
    new, scalars = step(state, batch)
    assert int(new.step) == 1 and int(new.nonfinite_step) == -1
    for name in ("loss", "d_loss", "g_loss", "d_real_accuracy", "d_fake_accuracy",
                 "fake_diversity", "real_diversity", "diversity_ratio", "d_grad_norm",
                 "g_grad_norm"):
        assert np.isfinite(scalars[name]), name
    assert scalars["loss"] == scalars["d_loss"]
    # The unsmoothed BCE of a D near 1/2 at init: close to 2 log 2.
    assert abs(float(scalars["d_loss"]) - 2 * np.log(2)) < 0.3


def test_phases_leave_the_other_group_bit_identical(k1):
    c, task, tx, state, batch, _ = k1
    rng = jax.random.key(3)

    @jax.jit
    def d_phase(state):
        p, o = state.params, state.opt_state
        d, d_opt, ms, _ = task.discriminator_update(tx, c.optim, p, o["discriminator"],
                                                    state.model_state, batch["image"], rng)
        return state.replace(params={**p, "discriminator": d},
                             opt_state={**o, "discriminator": d_opt}, model_state=ms)

    @jax.jit
    def g_phase(state):
        p, o = state.params, state.opt_state
        g, g_opt, ms, _ = task.generator_update(tx, c.optim, p, o["generator"],
                                                state.model_state, 8, rng)
        return state.replace(params={**p, "generator": g},
                             opt_state={**o, "generator": g_opt}, model_state=ms)

    after_d = d_phase(state)
    _assert_same(after_d.params["generator"], state.params["generator"])
    _assert_same(after_d.opt_state["generator"], state.opt_state["generator"])
    assert _differs(after_d.params["discriminator"], state.params["discriminator"])
    assert _differs(after_d.opt_state["discriminator"], state.opt_state["discriminator"])
    after_g = g_phase(after_d)
    _assert_same(after_g.params["discriminator"], after_d.params["discriminator"])
    _assert_same(after_g.opt_state["discriminator"], after_d.opt_state["discriminator"])
    assert _differs(after_g.params["generator"], after_d.params["generator"])
    assert _differs(after_g.opt_state["generator"], after_d.opt_state["generator"])


def _adam_counts(opt_state):
    """{group: the Adam step count} from the optax state."""
    out = {}
    for group, tree in opt_state.items():
        counts = [int(x) for path, x in jax.tree.leaves_with_path(tree)
                  if "count" in jax.tree_util.keystr(path)]
        assert len(set(counts)) == 1, counts
        out[group] = counts[0]
    return out


def test_k_discriminator_updates_per_trainer_step(k1):
    state, batch, step = k1[3], k1[4], k1[5]
    for _ in range(2):
        state, _ = step(state, batch)
    assert _adam_counts(state.opt_state) == {"generator": 2, "discriminator": 2}
    c = _tiny(d_steps=2)   # 2 x 8 real images a step
    task, tx, state, batch = _setup(c)
    state, _ = jax.jit(task.make_train_step(tx, jax.random.key(5), c.optim))(state, batch)
    assert _adam_counts(state.opt_state) == {"generator": 1, "discriminator": 2}


def test_nonfinite_step_records_the_first_bad_step(k1):
    state, batch, step = k1[3], k1[4], k1[5]
    state, _ = step(state, batch)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state, scalars = step(state, bad)
    assert int(state.nonfinite_step) == 1 and not np.isfinite(scalars["d_loss"])
    state, _ = step(state, batch)
    assert int(state.nonfinite_step) == 1   # the first bad step is kept


@pytest.mark.parametrize("key,value,message", [
    ("d_steps", 3, "task.d_steps=3 must be an integer >= 1 dividing data.batch_size=16"),
    ("loss", "wgan", "task.loss='wgan'; allowed: non_saturating, minimax"),
    ("d_b1", 1.0, r"task.d_b1=1.0 must be in \[0, 1\)"),
    ("g_learning_rate", 0.0, "task.g_learning_rate=0.0 must be > 0"),
])
def test_bad_options_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        _setup(_tiny(**{key: value}))


# ----------------------------------------------------------------------------------------
# End to end through the trainer.
# ----------------------------------------------------------------------------------------
def _without_speed(summary):
    return {k: v for k, v in summary.items() if "per_second" not in k}


def test_tiny_run_writes_samples_and_resumes_bit_exactly(tmp_path):
    c = gan_config.get_config("tiny")   # 4 steps, eval every 2, a 3-step scorer
    c.task.d_steps = 2  # on the 8 test devices: the batch split in 2 slices of 8, sharded
    full = trainer.train_and_evaluate(c, str(tmp_path / "full"))
    for name in ("samples_2.png", "samples_final.png", "summary.json", "metrics.jsonl"):
        assert (tmp_path / "full" / name).is_file(), name
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    evals = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in records:
        assert all(np.isfinite(v) for k, v in r.items() if k != "split"), r
    for key in ("fake_score", "real_score", "fake_classes", "d_real_accuracy",
                "diversity_ratio"):
        assert key in evals[0], key
    assert 1.0 - 1e-4 <= full["test/real_score"] <= 16.0
    for key in ("scorer/test_accuracy", "scorer/real_test_score", "scorer/fake_test_score"):
        assert np.isfinite(full[key]), key

    stopped = trainer.train_and_evaluate(c, str(tmp_path / "resumed"), stop_after_steps=1)
    assert stopped == {"status": "stopped", "step": 1}
    resumed = trainer.train_and_evaluate(c, str(tmp_path / "resumed"))
    assert _without_speed(resumed) == _without_speed(full)
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "full"))
