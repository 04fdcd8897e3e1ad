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

The evaluators of a VAE run (train/evaluators/vae.py): `vae_pictures` writes
reconstructions.png, samples.png and interpolation.png; `iwae` the importance-weighted
bound on the test NLL (Burda et al. 2016); `at_init` the same model freshly initialized
from the config seed, evaluated on the test split, so summary.json shows the gain.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from models import vae as vae_lib
from models.layers import distributions as dist
from train.tasks import common
from train.tasks.base import Task


def beta_schedule(beta: float, warmup_steps: int, step) -> jax.Array:
    """beta * min(1, step / warmup_steps); beta itself when warmup_steps is 0."""
    if warmup_steps == 0:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def temperature_schedule(start: float, minimum: float, decay: float, step) -> jax.Array:
    """max(minimum, start * exp(-decay * step)) (Jang et al. 2017, sec. 4)."""
    return jnp.maximum(minimum, start * jnp.exp(-decay * jnp.asarray(step, jnp.float32)))


class VAETask(Task):
    """batch {"image": float[B, H, W, C] in [0, 1]} -> negative ELBO; see module docstring."""

    name = "vae"
    needs_step = True  # beta warm-up and temperature annealing follow the optimizer step
    default_evals = ("vae_pictures", "iwae", "at_init")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.beta = 1.0               # KL weight (beta-VAE, Higgins et al. 2017); 1 = the ELBO
        c.kl_warmup_steps = 0      # beta ramps linearly 0 -> beta over these steps; 0 = off
        c.temperature_start = 1.0  # Gumbel-softmax tau at step 0 (categorical latents)
        c.temperature_min = 0.5    # ... floor of the annealing, and the eval temperature
        c.temperature_decay = 1e-3  # tau_t = max(min, start * exp(-decay * t))
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        t = config.task
        checks = (("beta", t.beta >= 0, ">= 0"),
                  ("kl_warmup_steps", t.kl_warmup_steps >= 0, ">= 0 (0 = no warm-up)"),
                  ("temperature_start", t.temperature_start > 0, "> 0"),
                  ("temperature_min", 0 < t.temperature_min <= t.temperature_start,
                   f"in (0, temperature_start={t.temperature_start}]"),
                  ("temperature_decay", t.temperature_decay >= 0, ">= 0 (0 = constant)"))
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"task.{key}={t[key]!r} is invalid: must be {allowed}")

    def __init__(self, config, model, data):
        super().__init__(config, model, data)
        if "image_size" not in data["train"].data_info():
            raise ValueError(f"task.name='vae' needs images; data.source="
                             f"{config.data.source!r} has none (use 'shapes' or "
                             "'tfds_images')")
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
