"""Evaluators of generative models: GAN sample grids and score, VAE pictures and the
importance-weighted bound, and the freshly initialized model as a baseline (any task)."""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import vae as vae_lib
from models.layers import distributions as dist
from train.evaluators.base import Evaluator, check_positive
from train.evaluators.images import save_grid, save_rows

SCORE_KEY = 0x6A5  # fold_in constant of the scorer evaluation's noise


class AtInit(Evaluator):
    """The model freshly initialized from the config seed (the trainer's own init),
    evaluated on `split` through the task's loss: `<split>_<metric>`, the baseline that
    training must beat (e.g. a VAE's test ELBO at init)."""

    name = "at_init"
    SPLITS = ("validation", "test")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.split = "test"           # "validation" | "test"
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.split not in cls.SPLITS:
            raise ValueError(f"evals.at_init.split={cfg.split!r}; allowed: "
                             f"{', '.join(cls.SPLITS)}")

    def run(self, step, params, model_state, final):
        init_params, init_state = self.ctx.init_variables()
        split = self.cfg.split
        means = self.ctx.evaluate(split, init_params, init_state)
        return {f"{split}_{k}": v for k, v in means.items()}


class GANSamples(Evaluator):
    """The fixed-noise sample grid (the same z every time): samples_<step>.png, and
    samples_final.png at the end."""

    name = "gan_samples"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.grid = 8                 # grid x grid samples
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "grid")

    def run(self, step, params, model_state, final):
        task, grid = self.ctx.task, self.cfg.grid
        images = task.generate(params, model_state, task.fixed_noise(grid * grid))
        name = "samples_final.png" if final else f"samples_{step}.png"
        save_grid(images, grid, os.path.join(self.ctx.workdir, name))
        return {}


class GANScore(Evaluator):
    """The final test evaluation again with other noise: the scorer's test accuracy and
    its classifier-based score of the test images vs as many generated images
    (train/tasks/gan.py): test_accuracy, real_test_score, fake_test_score."""

    name = "scorer"

    def run(self, step, params, model_state, final):
        if self.ctx.task.scorer is None:
            return {}
        key = jax.random.fold_in(jax.random.key(self.ctx.config.seed), SCORE_KEY)
        means = self.ctx.evaluate("test", params, model_state, key=key)
        return {"test_accuracy": means["scorer_accuracy"],
                "real_test_score": means["real_score"],
                "fake_test_score": means["fake_score"]}


class IWAEBound(Evaluator):
    """-mean importance-weighted bound (Burda et al. 2016) on the test NLL in nats per
    image (nll_bound) and bits per dim, with `samples` importance samples per example."""

    name = "iwae"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.samples = 16             # importance samples k
        c.examples = 0             # test examples (0 = the whole split)
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "samples")
        check_positive(cfg, cls.name, "examples", 0, " (0 = the whole split)")

    def run(self, step, params, model_state, final):
        cfg, model = self.ctx.model.cfg, self.ctx.model
        if cfg.latent == "none":     # the autoencoder has no prior: no bound
            return {}
        num_samples, max_examples = self.cfg.samples, self.cfg.examples

        @jax.jit
        def bound(params, images, rng):
            variables = {"params": params}
            posterior = model.apply(variables, images, method="encode")
            log_scale = (model.apply(variables, method="decoder_log_scale")
                         if cfg.likelihood == "gaussian" else None)

            def log_w(key):   # one z per example; categorical: exact one-hot samples
                z = (dist.reparameterize(key, posterior["mean"], posterior["logvar"])
                     if cfg.latent == "gaussian" else
                     dist.categorical_sample(key, posterior["logits"]))
                out = {**posterior, "z": z, "log_scale": log_scale,
                       "recon": model.apply(variables, z, method="decode")}
                return vae_lib.log_importance_weights(cfg, out, images)
            # lax.map: one decoder pass at a time keeps memory at one batch's.
            return dist.iwae_bound(jax.lax.map(log_w, jax.random.split(rng, num_samples)))

        sums, count = 0.0, 0.0
        for i, batch in enumerate(self.ctx.data["test"].eval_batches(
                self.ctx.config.data.eval_batch_size)):
            w = batch["weights"]
            if max_examples:
                w = w * (batch["index"] < max_examples)
            if not w.any():
                break
            b = np.asarray(bound(params, batch["image"],
                                 jax.random.fold_in(self.ctx.eval_key, 10_000 + i)))
            sums, count = sums + float(np.sum(b * w)), count + float(np.sum(w))
        nll = -sums / count
        return {"nll_bound": nll, "nll_bound_bits_per_dim": nll / (cfg.num_dims * math.log(2)),
                "samples": num_samples}


class VAEPictures(Evaluator):
    """reconstructions.png (test inputs over their reconstructions), samples.png
    (decoded prior draws; the autoencoder: draws from a Gaussian fitted to its test
    codes, as in Ghosh et al. 2020), interpolation.png (rows: test image A, decoded
    latents from A to B, image B)."""

    name = "vae_pictures"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.images = 12              # columns of each picture
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "images", 2)

    def run(self, step, params, model_state, final):
        cols, rows_of_samples = self.cfg.images, 6
        batch = next(iter(self.ctx.data["test"].eval_batches(max(256, 2 * cols))))
        n = int(batch["weights"].sum())
        images, labels = batch["image"][:n], batch["label"][:n]
        cols = max(2, min(cols, n // 2))   # a tiny test split: narrower grids
        # Up to 3 pairs of test images of different classes: A = example k, B = the next
        # example of another class.
        pairs = [(a, next((j for j in range(a + 1, n) if labels[j] != labels[a]),
                          (a + 1) % n)) for a in range(min(3, n))]
        ends = images[np.array(pairs).reshape(-1)]                   # [2 * pairs, H, W, C]
        rng = jax.random.fold_in(jax.random.key(self.ctx.config.seed), 7)
        recon, samples, between = jax.device_get(_picture_arrays(
            self.ctx.model, params, images, ends, rng, cols, rows_of_samples * cols))
        suffix = "" if final else f"_{step}"
        path = lambda name: os.path.join(self.ctx.workdir, f"{name}{suffix}.png")  # noqa: E731
        save_rows([images[:cols], recon[:cols], images[cols:2 * cols], recon[cols:2 * cols]],
                  path("reconstructions"))
        save_rows([samples[r * cols:(r + 1) * cols] for r in range(rows_of_samples)],
                  path("samples"))
        save_rows([np.concatenate([ends[2 * r][None], between[r], ends[2 * r + 1][None]])
                   for r in range(len(pairs))], path("interpolation"))
        return {}


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _picture_arrays(model, params, images, ends, rng, cols: int, num_samples: int):
    """One compiled pass for the three pictures: (reconstructions of images[:2 cols],
    num_samples samples, [pairs, cols - 2] interpolated images between `ends`)."""
    cfg, variables = model.cfg, {"params": params}
    recon = vae_lib.mean_image(cfg, model.apply(variables, images[:2 * cols])["recon"])
    if cfg.latent != "none":
        samples = model.apply(variables, rng, num_samples, method="sample")
    else:  # no prior: a full-covariance Gaussian fitted to the codes of `images`
        codes = model.apply(variables, images, method="encode")["code"]
        z = jax.random.multivariate_normal(rng, codes.mean(0), jnp.cov(codes.T),
                                           (num_samples,), method="svd")
        samples = vae_lib.mean_image(cfg, model.apply(variables, z, method="decode"))
    post = model.apply(variables, ends, method="encode")
    pairs = ends.shape[0] // 2
    post = jax.tree.map(lambda v: v.reshape(pairs, 2, *v.shape[1:]), post)
    z = jax.vmap(lambda p: interpolate_latents(cfg, p, cols - 2))(post)
    between = model.apply(variables, z.reshape(-1, *z.shape[2:]), method="decode")
    between = vae_lib.mean_image(cfg, between).reshape(pairs, cols - 2, *cfg.image_shape)
    return recon, samples, between


def interpolate_latents(cfg: vae_lib.VAEConfig, posterior: dict, steps: int) -> jax.Array:
    """`steps` latents from example 0's to example 1's of `posterior` (batch of 2).

    Gaussian: the posterior means, linearly; autoencoder: the codes, linearly; categorical:
    a path of discrete codes -- at step s the first round(s / (steps-1) * N) variables take
    B's mode, the rest keep A's (a mixture of one-hots would be no code of the prior).
    """
    frac = jnp.linspace(0.0, 1.0, steps)
    if cfg.latent == "categorical":
        modes = jax.nn.one_hot(jnp.argmax(posterior["logits"], -1), cfg.num_categories)
        switched = jnp.arange(cfg.num_latents)[None, :] < jnp.round(
            frac * cfg.num_latents)[:, None]                       # [steps, N]
        return jnp.where(switched[..., None], modes[1], modes[0])
    z = posterior["mean"] if cfg.latent == "gaussian" else posterior["code"]
    return z[0] + frac[:, None] * (z[1] - z[0])
