"""The VAE task: schedules, evaluation semantics, config errors, and a tiny end-to-end run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vae as vae_configs
from train import config as config_lib
from train import data as data_lib
from train import families, trainer
from train.tasks import make_task
from train.tasks import vae as vae_task


def test_beta_warmup_and_temperature_annealing_schedules():
    steps = np.array([0, 50, 100, 400])
    np.testing.assert_allclose(vae_task.beta_schedule(2.0, 100, steps), [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(vae_task.beta_schedule(2.0, 0, 7), 2.0)
    tau = vae_task.temperature_schedule(1.0, 0.5, 1e-3, steps)
    np.testing.assert_allclose(tau, np.maximum(0.5, np.exp(-1e-3 * steps)), rtol=1e-6)
    assert float(vae_task.temperature_schedule(1.0, 0.5, 1e-3, 10_000)) == 0.5


@pytest.mark.parametrize("key,value,message", [
    ("beta", -1.0, "task.beta=-1.0 is invalid: must be >= 0"),
    ("temperature_min", 2.0, "task.temperature_min=2.0 is invalid: must be in \\(0, "
                             "temperature_start=1.0\\]"),
    ("temperature_start", 0.0, "task.temperature_start=0.0 is invalid"),
    ("kl_warmup_steps", -5, "task.kl_warmup_steps=-5"),
    ("evals.iwae.samples", 0, "evals.iwae.samples=0 must be >= 1"),
    ("evals.vae_pictures.images", 1, "evals.vae_pictures.images=1 must be >= 2"),
])
def test_bad_task_and_evaluator_values_raise(key, value, message):
    c = vae_configs.get_config("tiny")
    section, name = (c.task, key) if "." not in key else (
        c.evals[key.split(".")[1]], key.split(".")[2])
    section[name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


def test_unknown_config_variant_and_non_image_data_raise():
    with pytest.raises(ValueError, match="unknown vae variant 'big'; allowed: default, mlp"):
        vae_configs.get_config("big")
    c = vae_configs.get_config("tiny")
    c.data.source = "stdlib_text"
    ds = {"train": data_lib.make_dataset(c.data, "train", 0)}
    with pytest.raises(ValueError, match="task.name='vae' needs images"):
        make_task(c, None, ds)


def _task(latent: str, **task_overrides):
    c = vae_configs.get_config("tiny")
    c.model.latent = latent
    c.model.architecture = "mlp"   # the fastest to compile; the objective is the same
    c.task.update(task_overrides)
    config_lib.validate(c)
    datasets = {s: data_lib.make_dataset(c.data, s, c.seed) for s in data_lib.SPLITS}
    model, _ = families.build(c.model, "vae", **datasets["train"].data_info())
    return make_task(c, model, datasets), datasets


def test_train_objective_is_annealed_and_eval_is_the_discrete_elbo():
    task, datasets = _task("categorical", kl_warmup_steps=10, beta=3.0)
    batch = datasets["validation"].batch(0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.1, size=a.shape), a.dtype),
                          jax.eval_shape(task.model.init, jax.random.key(0),
                                         batch["image"])["params"])
    key = jax.random.key(1)
    loss_fn = jax.jit(task.loss_fn, static_argnums=(4,))

    def means(train, step=None):
        kwargs = {} if step is None else {"step": step}
        loss, (metrics, _) = loss_fn(params, {}, batch, key, train, **kwargs)
        return float(loss), {k: float(s / w) for k, (s, w) in metrics.items()}

    loss, m = means(True, 0)                 # beta_0 = 0: reconstruction only
    np.testing.assert_allclose(loss, -m["recon"], rtol=1e-6)
    loss, m = means(True, 5)                 # beta_5 = 3 * 5 / 10
    np.testing.assert_allclose(loss, -(m["recon"] - 1.5 * m["kl"]), rtol=1e-5)
    np.testing.assert_allclose(m["elbo"], m["recon"] - m["kl"], rtol=1e-5)
    loss, m = means(False)                   # evaluation: beta = 1, loss = -ELBO
    np.testing.assert_allclose(loss, -m["elbo"], rtol=1e-6)
    bpd = task.derived_metrics(m)["bits_per_dim"]
    np.testing.assert_allclose(bpd, -m["elbo"] / (32 * 32 * 3 * math.log(2)), rtol=1e-6)
    # Evaluation decodes hard one-hot codes (exact samples of q), whatever the temperature.
    out = task.model.apply({"params": params}, batch["image"], key, temperature=0.5,
                           hard=True)
    np.testing.assert_array_equal(np.asarray(out["z"]).max(-1), 1.0)


def test_tiny_run_writes_pictures_and_a_finite_test_elbo(tmp_path):
    c = vae_configs.get_config("tiny")
    # MLP: compiling the conv tower's random initializers twice (trainer, then the fresh
    # model of at_init/test_elbo) would triple this test's time; convs are covered in
    # tests/models/test_vae.py and by the configs' own runs.
    c.model.architecture = "mlp"
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["train/steps"] == 4
    for key in ("test/elbo", "at_init/test_elbo", "test/kl", "iwae/nll_bound",
                "validation/bits_per_dim"):
        assert np.isfinite(summary[key]), key
    np.testing.assert_allclose(summary["test/loss"], -summary["test/elbo"], rtol=1e-6)
    assert summary["test/elbo"] > summary["at_init/test_elbo"]      # 4 steps already help
    assert summary["test/kl"] >= 0.0
    # The importance-weighted bound is at least as tight as the ELBO (Burda et al.).
    assert summary["iwae/nll_bound"] <= -summary["test/elbo"] + 1.0
    for name in ("reconstructions.png", "samples.png", "interpolation.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
