"""Autoencoders with latent variables: VAE (Kingma & Welling 2014), its discrete Gumbel-softmax
version (Jang et al. 2017) and the plain deterministic autoencoder, MLP or convolutional.

  images x [B, H, W, C] -> encoder -> posterior q(z|x)            latent=
        "gaussian"     mean, logvar [B, D]; z = mean + exp(logvar/2) * eps     [B, D]
        "categorical"  logits [B, N, K]; z = gumbel_softmax(logits, tau)       [B, N, K]
                       (straight_through: one-hot forward, relaxed gradient)
        "none"         code [B, D]; z = code (deterministic: a plain autoencoder)
  z -> decoder -> recon [B, H, W, C]: Bernoulli logits, or Gaussian means whose scale
                  exp(log_scale) [C] is fixed (decoder_std) or learned, one per channel
  prior p(z): N(0, I), or uniform over the K^N codes.

  architecture "mlp"   flatten -> Dense(hidden_dims...) -> head; the decoder mirrors it
               "conv"  stride-2 3x3 convs (conv_features, H -> H / 2^n) -> flatten -> head;
                       decoder: Dense -> [H/2^n, W/2^n, F] -> n x (2x nearest upsample ->
                       conv) -> 3x3 conv to C. Resize-convolution rather than transposed
                       convs: no checkerboard artifacts (Odena et al. 2016), and every
                       layer goes through the `conv_general_dilated` hook.

`VAE.__call__(x, rng)` samples z with `rng` (no rng: the posterior mean / mode) and returns
{"recon", "z", posterior params, ["log_scale"]}; `encode`, `decode`, `sample` (decoded prior
draws) work with `model.apply(variables, ..., method=...)`. `log_likelihood`, `kl_divergence`
and `mean_image` turn that dict into the ELBO's terms and pictures (models.layers.
distributions holds the math). Every Dense goes through `dot_general` and every conv through
`conv_general_dilated` (the compression hooks); outputs are float32 whatever the dtype.

Where popular explanations differ from the papers:
  * A popular explanation says a deterministic bottleneck "needs stochasticity to learn the
    latent space well". What the VAE adds (Kingma & Welling 2014, eq. 3) is a *prior* and
    the KL that pulls q(z|x) towards it: that makes decoded prior samples and
    interpolations meaningful; noise alone would not.
  * A popular explanation calls the reconstruction term "a simple MSE loss" for a Gaussian
    decoder. Only for a fixed variance, and then weighted by 1 / (2 sigma^2) against the
    KL: sigma sets the reconstruction/KL balance. The default learns sigma (Rybkin et al.
    2021, "Simple and Effective VAE Training with Calibrated Decoders", the sigma-VAE)
    instead of hand-tuning it.
  * A popular explanation describes Gumbel-softmax as "softmax instead of argmax". Jang et
    al. 2017 (eq. 2) take the softmax of (logits + Gumbel noise) / temperature: the noise
    makes it a sample, the temperature trades bias (relaxed codes) against gradient
    variance, and is annealed (task side).
  * "Like PCA but with nonlinearity, spans the same space" is a fact about *linear*
    autoencoders with squared error (Baldi & Hornik 1989), not about VAEs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import distributions as dist
from models.layers import initializers

ARCHITECTURES = ("mlp", "conv")
LATENTS = ("gaussian", "categorical", "none")
LIKELIHOODS = ("bernoulli", "gaussian")
DECODER_SCALES = ("fixed", "learned")
DTYPES = variants.DTYPES
ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu,
                                    "elu": nn.elu, "leaky_relu": nn.leaky_relu}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of VAE (defaults: the convolutional Gaussian VAE of configs/vae.py)."""
    image_size: int = 32                   # H = W (data field)
    channels: int = 3                      # C (data field)
    architecture: str = "conv"             # "mlp" | "conv"
    latent: str = "gaussian"               # "gaussian" | "categorical" | "none" (autoencoder)
    latent_dim: int = 32                   # D: gaussian / none
    num_latents: int = 32                  # N: categorical variables
    num_categories: int = 8                # K: categories per variable
    straight_through: bool = False         # categorical: one-hot forward (Jang sec. 2.2)
    likelihood: str = "gaussian"           # "bernoulli" (logits) | "gaussian" (means)
    decoder_scale: str = "learned"         # gaussian: "fixed" | "learned" (per channel)
    decoder_std: float = 0.1               # gaussian: the fixed sigma / the learned one's init
    hidden_dims: tuple[int, ...] = (512, 256)      # mlp: encoder widths; decoder reversed
    conv_features: tuple[int, ...] = (16, 32, 64)  # conv: stride-2 stages; decoder reversed
    activation: str = "relu"
    kernel_init: str = "lecun_normal"
    dtype: str = "float32"                 # compute dtype; outputs are float32
    param_dtype: str = "float32"
    dot_general: Callable = lax.dot_general                    # every Dense
    conv_general_dilated: Callable = lax.conv_general_dilated  # every conv

    def __post_init__(self):
        for key, allowed in (("architecture", ARCHITECTURES), ("latent", LATENTS),
                             ("likelihood", LIKELIHOODS), ("decoder_scale", DECODER_SCALES),
                             ("activation", tuple(ACTIVATIONS)),
                             ("kernel_init", initializers.NAMES),
                             ("dtype", DTYPES), ("param_dtype", DTYPES)):
            variants.check_one_of("model", key, getattr(self, key), allowed)
        for key in ("image_size", "channels", "latent_dim", "num_latents", "num_categories"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.latent == "categorical" and self.num_categories < 2:
            raise ValueError(f"model.num_categories must be >= 2 for a categorical latent, "
                             f"got {self.num_categories}")
        if not self.decoder_std > 0:
            raise ValueError(f"model.decoder_std must be positive, got {self.decoder_std}")
        for key in ("hidden_dims", "conv_features"):
            widths = getattr(self, key)
            if not widths or any(w <= 0 for w in widths):
                raise ValueError(f"model.{key}={list(widths)} must be a non-empty list of "
                                 "positive widths")
        if self.architecture == "conv" and self.image_size % 2 ** len(self.conv_features):
            raise ValueError(
                f"model.image_size={self.image_size} must be divisible by 2^"
                f"{len(self.conv_features)} (one halving per entry of model.conv_features="
                f"{list(self.conv_features)}); use fewer stages or another image size")

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def num_dims(self) -> int:
        """Pixels x channels: what bits per dimension divide by."""
        return self.image_size * self.image_size * self.channels

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one example's z: (D,) or (N, K)."""
        if self.latent == "categorical":
            return (self.num_latents, self.num_categories)
        return (self.latent_dim,)


VARIANTS: dict[str, dict[str, Any]] = {
    "conv": dict(architecture="conv"),
    "mlp": dict(architecture="mlp"),
    "tiny": dict(architecture="conv", conv_features=(8, 16), latent_dim=8,
                 hidden_dims=(32,)),
}


def make_config(variant: str, **overrides) -> VAEConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(VAEConfig, VARIANTS, variant, overrides, "vae")


# ----------------------------------------------------------------------------------------
# Encoder and decoder.
# ----------------------------------------------------------------------------------------
def _dense(cfg: VAEConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=initializers.get(cfg.kernel_init),
                    dot_general=cfg.dot_general, name=name)


def _conv(cfg: VAEConfig, features: int, strides: int, name: str) -> nn.Conv:
    # SAME padding: a stride-2 conv halves H exactly (H is divisible by 2^stages).
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding="SAME",
                   dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernel_init=initializers.get(cfg.kernel_init),
                   conv_general_dilated=cfg.conv_general_dilated, name=name)


class Encoder(nn.Module):
    """images [B, H, W, C] -> posterior parameters (float32), by cfg.latent:
    {"mean", "logvar"} [B, D] | {"logits"} [B, N, K] | {"code"} [B, D]."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        cfg, act = self.cfg, ACTIVATIONS[self.cfg.activation]
        x = images.astype(cfg.dtype)
        if cfg.architecture == "conv":
            for i, f in enumerate(cfg.conv_features):
                x = act(_conv(cfg, f, 2, f"conv_{i}")(x))
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.reshape(x.shape[0], -1)
            for i, h in enumerate(cfg.hidden_dims):
                x = act(_dense(cfg, h, f"dense_{i}")(x))
        b = x.shape[0]
        if cfg.latent == "gaussian":
            mean, logvar = jnp.split(_dense(cfg, 2 * cfg.latent_dim, "head")(x), 2, axis=-1)
            return {"mean": mean.astype(jnp.float32), "logvar": logvar.astype(jnp.float32)}
        if cfg.latent == "categorical":
            logits = _dense(cfg, cfg.num_latents * cfg.num_categories, "head")(x)
            return {"logits": logits.reshape(b, *cfg.latent_shape).astype(jnp.float32)}
        return {"code": _dense(cfg, cfg.latent_dim, "head")(x).astype(jnp.float32)}


class Decoder(nn.Module):
    """z [B, D] or [B, N, K] -> recon [B, H, W, C] float32 (Bernoulli logits / Gaussian
    means)."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, act = self.cfg, ACTIVATIONS[self.cfg.activation]
        x = z.reshape(z.shape[0], -1).astype(cfg.dtype)
        if cfg.architecture == "conv":
            widths = cfg.conv_features[::-1]
            side = cfg.image_size // 2 ** len(widths)
            x = act(_dense(cfg, side * side * widths[0], "project")(x))
            x = x.reshape(x.shape[0], side, side, widths[0])
            # Stage i upsamples to the resolution of encoder stage n-1-i's input and has
            # its width (the last, full-resolution stage: the first encoder width).
            for i, f in enumerate(widths[1:] + widths[-1:]):
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                x = act(_conv(cfg, f, 1, f"conv_{i}")(x))
            x = _conv(cfg, cfg.channels, 1, "out")(x)
        else:
            for i, h in enumerate(cfg.hidden_dims[::-1]):
                x = act(_dense(cfg, h, f"dense_{i}")(x))
            x = _dense(cfg, cfg.num_dims, "out")(x).reshape(-1, *cfg.image_shape)
        return x.astype(jnp.float32)


class VAE(nn.Module):
    """The autoencoder family; see the module docstring."""
    cfg: VAEConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        if self.cfg.likelihood == "gaussian" and self.cfg.decoder_scale == "learned":
            self.log_scale = self.param(
                "log_scale", nn.initializers.constant(math.log(self.cfg.decoder_std)),
                (self.cfg.channels,), jnp.float32)

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> posterior parameters (see Encoder)."""
        return self.encoder(images)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, *latent_shape] -> recon [B, H, W, C] (logits or means)."""
        return self.decoder(z)

    def decoder_log_scale(self) -> jax.Array:
        """log sigma [C] of the Gaussian decoder (fixed or learned)."""
        if self.cfg.decoder_scale == "learned":
            return self.log_scale
        return jnp.full((self.cfg.channels,), math.log(self.cfg.decoder_std), jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None, *,
                 temperature: float | jax.Array = 1.0, hard: bool | None = None
                 ) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> {"recon", "z", posterior params, ["log_scale"]}.

        rng: key of the latent sample; None decodes the posterior mean (Gaussian), mode
          (categorical: one-hot argmax) or the code (autoencoder).
        temperature, hard: Gumbel-softmax settings (hard None = cfg.straight_through).
        """
        posterior = self.encode(images)
        z = latent_sample(self.cfg, posterior, rng, temperature, hard)
        out = {**posterior, "z": z, "recon": self.decode(z)}
        if self.cfg.likelihood == "gaussian":
            out["log_scale"] = self.decoder_log_scale()
        return out

    def sample(self, rng: jax.Array, num_samples: int) -> jax.Array:
        """num_samples draws from p(z) p(x|z), as images [n, H, W, C]: the decoder's mean
        (Bernoulli probabilities / Gaussian means clipped to [0, 1]), the usual picture."""
        if self.cfg.latent == "none":
            raise ValueError("model.latent='none' (a plain autoencoder) has no prior to "
                             "sample from; use latent='gaussian' or 'categorical'")
        shape = (num_samples, *self.cfg.latent_shape)
        if self.cfg.latent == "gaussian":
            z = jax.random.normal(rng, shape, jnp.float32)
        else:
            z = dist.categorical_sample(rng, jnp.zeros(shape, jnp.float32))
        return mean_image(self.cfg, self.decode(z))


# ----------------------------------------------------------------------------------------
# The ELBO's terms from a VAE output dict (pure functions of cfg and arrays).
# ----------------------------------------------------------------------------------------
def latent_sample(cfg: VAEConfig, posterior: dict, rng: jax.Array | None,
                  temperature: float | jax.Array = 1.0, hard: bool | None = None
                  ) -> jax.Array:
    """z from the posterior parameters; rng None = deterministic (mean / mode / code)."""
    if cfg.latent == "none":
        return posterior["code"]
    if cfg.latent == "gaussian":
        if rng is None:
            return posterior["mean"]
        return dist.reparameterize(rng, posterior["mean"], posterior["logvar"])
    logits = posterior["logits"]
    if rng is None:
        return jax.nn.one_hot(jnp.argmax(logits, -1), cfg.num_categories, dtype=logits.dtype)
    hard = cfg.straight_through if hard is None else hard
    return dist.gumbel_softmax(rng, logits, temperature, hard)


def log_likelihood(cfg: VAEConfig, out: dict, images: jax.Array) -> jax.Array:
    """log p(x | z) [B] in nats for the decoder output `out` (a VAE output dict)."""
    x = images.astype(jnp.float32)
    if cfg.likelihood == "bernoulli":
        return dist.bernoulli_log_likelihood(out["recon"], x)
    return dist.gaussian_log_likelihood(out["recon"], out["log_scale"], x)


def kl_divergence(cfg: VAEConfig, out: dict) -> jax.Array:
    """KL(q(z|x) || p(z)) [B]; zero for the plain autoencoder (it has no prior)."""
    if cfg.latent == "gaussian":
        return dist.gaussian_kl(out["mean"], out["logvar"])
    if cfg.latent == "categorical":
        return dist.categorical_kl(out["logits"])
    return jnp.zeros((out["code"].shape[0],), jnp.float32)


def log_importance_weights(cfg: VAEConfig, out: dict, images: jax.Array) -> jax.Array:
    """log p(x|z) + log p(z) - log q(z|x) [B] for the z in `out`, drawn from q(z|x).

    Categorical z must be hard one-hot samples (a relaxed z has no probability under the
    discrete q and p): call the model with hard=True.
    """
    ll = log_likelihood(cfg, out, images)
    z = out["z"]
    if cfg.latent == "gaussian":
        zeros = jnp.zeros_like(z)
        return (ll + dist.gaussian_log_prob(z, zeros, zeros)
                - dist.gaussian_log_prob(z, out["mean"], out["logvar"]))
    if cfg.latent == "categorical":
        log_prior = -cfg.num_latents * math.log(cfg.num_categories)
        return ll + log_prior - dist.categorical_log_prob(z, out["logits"])
    raise ValueError("model.latent='none' has no posterior: importance weights need a "
                     "VAE (latent='gaussian' or 'categorical')")


def mean_image(cfg: VAEConfig, recon: jax.Array) -> jax.Array:
    """Decoder output -> the mean of p(x|z) as an image in [0, 1] [B, H, W, C]."""
    if cfg.likelihood == "bernoulli":
        return jax.nn.sigmoid(recon)
    return jnp.clip(recon, 0.0, 1.0)
