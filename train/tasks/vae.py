"""Variational autoencoders (and the plain autoencoder): negative ELBO, annealed, on images.

    loss = mean_b -(E_q[log p(x_b|z)] - beta_t * KL(q(z|x_b) || p(z)))     nats per image
    beta_t = task.beta * min(1, step / task.kl_warmup_steps)   KL warm-up (Bowman et al.
             2016; Sonderby et al. 2016): the decoder learns to use z before the KL
             pulls q to the prior (0 steps = no warm-up)
    tau_t  = max(task.temperature_min, task.temperature_start * exp(-task.temperature_decay
             * step))   the Gumbel-softmax temperature schedule of Jang et al. (2017), who
             anneal from 1 to 0.5 with r = 1e-5 (here every step; short runs need more)

Evaluation (validation / test, and the trainer's checkpoint ranking by validation/loss)
uses beta = 1, so `loss` = -ELBO there, and categorical latents use hard one-hot samples
(straight-through forward) at temperature_min: the ELBO of the discrete model whose prior
`samples.png` draws from, a true lower bound on log p(x). Training metrics are of the
annealed objective (relaxed codes, beta_t).

Metrics ((sum, weight) per example, nats per image): loss, elbo, recon (E_q log p(x|z),
higher is better), kl, mse (per pixel, of the decoder's mean image); derived: bits_per_dim
= -elbo / (H W C ln 2) -- of a continuous density on [0, 1]^D, so it is not comparable with
the 8-bit discrete bits/dim of the literature (and with a Bernoulli decoder on gray values,
not a normalized density at all: see models.layers.distributions). The autoencoder
(latent "none") has no prior: only loss = -recon, recon and mse.

report() writes reconstructions.png (test inputs over their reconstructions),
samples.png (decoded prior draws; the autoencoder: draws from a Gaussian fitted to its test
codes, as in Ghosh et al. 2020), interpolation.png (rows: test image A, decoded latents
from A to B, image B), and returns test/elbo_at_init (the same model freshly initialized
from the config seed, so summary.json shows the gain) and the importance-weighted bound
test/nll_bound (Burda et al. 2016, task.iwae_samples samples).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import vae as vae_lib
from models.layers import distributions as dist
from train.tasks import common


def validate_task_config(t) -> None:
    """Raise ValueError naming the bad task.* key and what is allowed."""
    checks = (("beta", t.beta >= 0, ">= 0"),
              ("kl_warmup_steps", t.kl_warmup_steps >= 0, ">= 0 (0 = no warm-up)"),
              ("temperature_start", t.temperature_start > 0, "> 0"),
              ("temperature_min", 0 < t.temperature_min <= t.temperature_start,
               f"in (0, temperature_start={t.temperature_start}]"),
              ("temperature_decay", t.temperature_decay >= 0, ">= 0 (0 = constant)"),
              ("iwae_samples", t.iwae_samples >= 0, ">= 0 (0 = no bound)"),
              ("iwae_examples", t.iwae_examples >= 0, ">= 0 (0 = the whole test split)"),
              ("report_images", t.report_images >= 2, ">= 2"))
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"task.{key}={t[key]!r} is invalid: must be {allowed}")


def beta_schedule(beta: float, warmup_steps: int, step) -> jax.Array:
    """beta * min(1, step / warmup_steps); beta itself when warmup_steps is 0."""
    if warmup_steps == 0:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def temperature_schedule(start: float, minimum: float, decay: float, step) -> jax.Array:
    """max(minimum, start * exp(-decay * step)) (Jang et al. 2017, sec. 4)."""
    return jnp.maximum(minimum, start * jnp.exp(-decay * jnp.asarray(step, jnp.float32)))


class VAETask:
    """batch {"image": float[B, H, W, C] in [0, 1]} -> negative ELBO; see module docstring."""

    needs_step = True  # beta warm-up and temperature annealing follow the optimizer step

    def __init__(self, config, model, datasets):
        validate_task_config(config.task)
        if "image_size" not in datasets["train"].data_info():
            raise ValueError(f"task.name='vae' needs images; data.source="
                             f"{config.data.source!r} has none (use 'shapes' or "
                             "'tfds_images')")
        self.config, self.model, self.datasets = config, model, datasets
        self.cfg: vae_lib.VAEConfig = model.cfg
        self.has_prior = self.cfg.latent != "none"

    def init_args(self, batch):
        return (batch["image"],), {}

    # ---- Objective ----------------------------------------------------------------------
    def loss_fn(self, params, model_state, batch, rng, train: bool, step=None):
        t = self.config.task
        if train:                            # hard=None: the model's own setting
            beta, temperature, hard = t.beta, t.temperature_min, None
            if step is not None:             # the trainer passes it (needs_step)
                beta = beta_schedule(t.beta, t.kl_warmup_steps, step)
                temperature = temperature_schedule(t.temperature_start, t.temperature_min,
                                                   t.temperature_decay, step)
        else:                                # evaluation: the bound of the discrete model
            beta, temperature, hard = 1.0, t.temperature_min, True
        images = batch["image"]
        out = self.model.apply({"params": params}, images, rng, temperature=temperature,
                               hard=hard)
        recon = vae_lib.log_likelihood(self.cfg, out, images)
        kl = vae_lib.kl_divergence(self.cfg, out)
        per_example = -dist.elbo(recon, kl, beta)
        w = common.example_weights(batch, images.shape[0])
        total = jnp.sum(w)
        sq = jnp.square(vae_lib.mean_image(self.cfg, out["recon"]) - images)
        metrics = {"loss": (jnp.sum(per_example * w), total),
                   "recon": (jnp.sum(recon * w), total),
                   "mse": (jnp.sum(jnp.mean(sq.reshape(sq.shape[0], -1), -1) * w), total)}
        if self.has_prior:
            metrics["elbo"] = (jnp.sum(dist.elbo(recon, kl) * w), total)
            metrics["kl"] = (jnp.sum(kl * w), total)
        return jnp.sum(per_example * w) / jnp.maximum(total, 1.0), (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        if "elbo" not in metrics:
            return {}
        return {"bits_per_dim": -metrics["elbo"] / (self.cfg.num_dims * math.log(2))}

    # ---- Report -------------------------------------------------------------------------
    def _keys(self):
        # The trainer's split of the config seed (train.trainer.train_and_evaluate).
        init_key, _, eval_key = jax.random.split(jax.random.key(self.config.seed), 3)
        return init_key, eval_key

    def evaluate(self, params, split: str = "test") -> dict:
        """Means of the eval metrics over `split`, computed as the trainer computes them."""
        _, eval_key = self._keys()
        step = jax.jit(lambda p, b, r: self.loss_fn(p, {}, b, r, False)[1][0])
        totals = None
        for i, batch in enumerate(self.datasets[split].eval_batches(
                self.config.data.eval_batch_size)):
            totals = common.add_metrics(totals, step(params, batch,
                                                     jax.random.fold_in(eval_key, i)))
        means = common.finalize(jax.device_get(totals))
        return {**means, **self.derived_metrics(means)}

    def iwae_nll(self, params, num_samples: int, max_examples: int = 0) -> float:
        """-mean IWAE bound (nats per image) over the test split (first max_examples)."""
        _, eval_key = self._keys()
        cfg, model = self.cfg, self.model

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
        for i, batch in enumerate(self.datasets["test"].eval_batches(
                self.config.data.eval_batch_size)):
            w = batch["weights"]
            if max_examples:
                w = w * (batch["index"] < max_examples)
            if not w.any():
                break
            b = np.asarray(bound(params, batch["image"],
                                 jax.random.fold_in(eval_key, 10_000 + i)))
            sums, count = sums + float(np.sum(b * w)), count + float(np.sum(w))
        return -sums / count

    def report(self, params, model_state, workdir: str) -> dict:
        t, cfg = self.config.task, self.cfg
        init_key, _ = self._keys()
        example = next(iter(self.datasets["test"].eval_batches(1)))["image"]
        init_params = jax.jit(self.model.init)({"params": init_key, "dropout": init_key},
                                               example)["params"]
        at_init = self.evaluate(init_params)
        out = {"test/loss_at_init": at_init["loss"]}
        if self.has_prior:
            out["test/elbo_at_init"] = at_init["elbo"]
            if t.iwae_samples:
                nll = self.iwae_nll(params, t.iwae_samples, t.iwae_examples)
                out["test/nll_bound"] = nll
                out["test/nll_bound_bits_per_dim"] = nll / (cfg.num_dims * math.log(2))
                out["test/iwae_samples"] = t.iwae_samples
        self.write_pictures(params, workdir)
        return out

    def write_pictures(self, params, workdir: str) -> None:
        """reconstructions.png, samples.png, interpolation.png (see module docstring)."""
        cols, rows_of_samples = self.config.task.report_images, 6
        batch = next(iter(self.datasets["test"].eval_batches(max(256, 2 * cols))))
        n = int(batch["weights"].sum())
        images, labels = batch["image"][:n], batch["label"][:n]
        cols = max(2, min(cols, n // 2))   # a tiny test split: narrower grids
        # Up to 3 pairs of test images of different classes: A = example k, B = the next
        # example of another class.
        pairs = [(a, next((j for j in range(a + 1, n) if labels[j] != labels[a]),
                          (a + 1) % n)) for a in range(min(3, n))]
        ends = images[np.array(pairs).reshape(-1)]                   # [2 * pairs, H, W, C]
        rng = jax.random.fold_in(jax.random.key(self.config.seed), 7)
        recon, samples, between = jax.device_get(self._picture_arrays(
            params, images, ends, rng, cols, rows_of_samples * cols))

        save_grid([images[:cols], recon[:cols], images[cols:2 * cols], recon[cols:2 * cols]],
                  os.path.join(workdir, "reconstructions.png"))
        save_grid([samples[r * cols:(r + 1) * cols] for r in range(rows_of_samples)],
                  os.path.join(workdir, "samples.png"))
        save_grid([np.concatenate([ends[2 * r][None], between[r], ends[2 * r + 1][None]])
                   for r in range(len(pairs))], os.path.join(workdir, "interpolation.png"))

    @functools.partial(jax.jit, static_argnums=(0, 5, 6))
    def _picture_arrays(self, params, images, ends, rng, cols: int, num_samples: int):
        """One compiled pass for the three pictures: (reconstructions of images[:2 cols],
        num_samples samples, [pairs, cols - 2] interpolated images between `ends`)."""
        model, cfg, variables = self.model, self.cfg, {"params": params}
        recon = vae_lib.mean_image(cfg, model.apply(variables, images[:2 * cols])["recon"])
        if self.has_prior:
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


def save_grid(rows: list[np.ndarray], path: str, scale: int = 3, gap: int = 2) -> None:
    """Save rows of images ([n, H, W, C] in [0, 1], equal n) as one PNG, white gaps,
    each pixel scale x scale."""
    import matplotlib.image  # noqa: PLC0415 -- lazy, as in train.metrics_log

    n, h, w, c = rows[0].shape
    grid = np.ones((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), np.float32)
    for r, row in enumerate(rows):
        for i, img in enumerate(np.clip(np.asarray(row, np.float32), 0.0, 1.0)):
            y, x = gap + r * (h + gap), gap + i * (w + gap)
            grid[y:y + h, x:x + w] = img if c == 3 else img[..., :1]
    matplotlib.image.imsave(path, np.kron(grid, np.ones((scale, scale, 1), np.float32)))
