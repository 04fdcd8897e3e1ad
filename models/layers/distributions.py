"""Latent-variable pieces of a VAE as pure functions: samplers, KLs, log-likelihoods, bounds.

Every function reduces over the event dimensions and returns one value per example [B]
(nats), so an objective is `mean(-(log_lik - beta * kl))` over a batch. Shapes: images
x [B, H, W, C] (or any [B, ...]), Gaussian latents [B, D], categorical latents [B, N, K]
(N variables with K categories each).

  reparameterize     z = mu + sigma * eps, eps ~ N(0, I)       (Kingma & Welling 2014)
  gumbel_softmax     softmax((logits + g) / tau), g ~ Gumbel(0, 1); `hard` = straight-
                     through one-hot forward, relaxed gradient  (Jang et al. 2017;
                     Maddison et al. 2017 call the relaxation "Concrete")
  gaussian_kl        KL(N(mu, sigma^2) || N(0, I)), closed form
  categorical_kl     KL(Cat(softmax(logits)) || uniform), exact
  *_log_likelihood   log p(x | decoder output): Bernoulli(logits), Gaussian(mean, scale)
  elbo               E_q[log p(x|z)] - beta * KL
  iwae_bound         log (1/S) sum_s w_s from log importance weights [S, B]  (Burda et al.
                     2016): a lower bound on log p(x) that tightens as S grows (S=1: ELBO)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.scipy import stats


def _sum_events(x: jax.Array) -> jax.Array:
    """[B, ...] -> [B]: sum over everything but the batch axis."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------------------
def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); z has mean's shape.

    The noise is an input rather than a function of the parameters, so dz/dmean = 1 and
    dz/dlogvar = sigma * eps / 2: gradients reach the encoder through the sample.
    """
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def gumbel_softmax(rng: jax.Array, logits: jax.Array, temperature: float | jax.Array,
                   hard: bool = False) -> jax.Array:
    """A relaxed one-hot sample [..., K] of Cat(softmax(logits)) over the last axis.

    y = softmax((logits + g) / tau), g ~ Gumbel(0, 1). argmax(logits + g) is an exact
    categorical sample (the Gumbel-max trick); the softmax replaces the argmax so the sample
    is differentiable, and tends to the one-hot of that argmax as tau -> 0 (at the price of
    higher-variance gradients). hard=True returns the one-hot argmax in the forward pass
    and the relaxed sample's gradient in the backward pass (straight-through, Jang et al.
    sec. 2.2), so a decoder only ever sees discrete codes.
    """
    g = jax.random.gumbel(rng, logits.shape, logits.dtype)
    soft = jax.nn.softmax((logits + g) / temperature, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return soft + jax.lax.stop_gradient(one_hot - soft)


def categorical_sample(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """An exact one-hot sample [..., K] of Cat(softmax(logits)) (no gradient)."""
    k = logits.shape[-1]
    return jax.nn.one_hot(jax.random.categorical(rng, logits, axis=-1), k, dtype=logits.dtype)


# ----------------------------------------------------------------------------------------
# KL divergences to the prior.
# ----------------------------------------------------------------------------------------
def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) per example [B] from [B, D]:

        0.5 * sum_d (sigma_d^2 + mu_d^2 - 1 - log sigma_d^2)   (Kingma & Welling, app. B)
    """
    return 0.5 * _sum_events(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def categorical_kl(logits: jax.Array) -> jax.Array:
    """KL(q || uniform) per example [B] from logits [B, N, K]: sum_n sum_k q log(K q).

    The KL of the categorical posterior, not of its Gumbel-softmax relaxation: Jang et al.
    (2017) use this one in their ELBO (Maddison et al. use a relaxed KL instead).
    """
    k = logits.shape[-1]
    log_q = jax.nn.log_softmax(logits, axis=-1)
    log_uniform = jnp.full_like(log_q, -math.log(k))
    return _sum_events(optax.losses.kl_divergence_with_log_targets(log_uniform, log_q))


def gaussian_log_prob(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """log N(z; mean, diag(exp(logvar))) per example [B] (for importance weights)."""
    return _sum_events(stats.norm.logpdf(z, mean, jnp.exp(0.5 * logvar)))


def categorical_log_prob(one_hot: jax.Array, logits: jax.Array) -> jax.Array:
    """log Cat(one_hot; softmax(logits)) per example [B] from [B, N, K] one-hot codes."""
    return _sum_events(one_hot * jax.nn.log_softmax(logits, axis=-1))


# ----------------------------------------------------------------------------------------
# Likelihoods of the decoder.
# ----------------------------------------------------------------------------------------
def bernoulli_log_likelihood(logits: jax.Array, x: jax.Array) -> jax.Array:
    """sum x log p + (1 - x) log(1 - p), p = sigmoid(logits), per example [B].

    For x in {0, 1} this is a log-probability. For gray values in (0, 1), the common
    practice followed here, it is a cross-entropy whose maximum is below 0 and whose
    density is unnormalized (Loaiza-Ganem & Cunningham 2019): compare such "ELBOs" only
    with each other, never with a Gaussian decoder's.
    """
    return -_sum_events(optax.sigmoid_binary_cross_entropy(logits, x))


def gaussian_log_likelihood(mean: jax.Array, log_scale: jax.Array, x: jax.Array
                            ) -> jax.Array:
    """sum log N(x; mean, exp(log_scale)^2) per example [B]; log_scale broadcasts to x.

    With a fixed scale sigma this is -||x - mean||^2 / (2 sigma^2) + const: the "MSE loss"
    of popular explanations, up to that 1/(2 sigma^2) weight and the constant -- which is
    what sets the balance between reconstruction and KL (beta-VAE in disguise; Rybkin et
    al. 2021 learn sigma instead).
    """
    return _sum_events(stats.norm.logpdf(x, mean, jnp.exp(log_scale)))


# ----------------------------------------------------------------------------------------
# Bounds.
# ----------------------------------------------------------------------------------------
def elbo(log_likelihood: jax.Array, kl: jax.Array, beta: float | jax.Array = 1.0
         ) -> jax.Array:
    """E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)); a lower bound on log p(x) at beta=1."""
    return log_likelihood - beta * kl


def iwae_bound(log_weights: jax.Array) -> jax.Array:
    """log (1/S) sum_s exp(log_weights[s]) per example, from log_weights [S, B] where
    log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), z_s ~ q(z|x) independently.

    E[bound] <= log p(x) for every S and increases with S (Burda et al. 2016, thm. 1);
    with S = 1 it is the ELBO estimate. The log-sum-exp keeps it finite when the weights
    are e^-5000.
    """
    return jax.nn.logsumexp(log_weights, axis=0) - math.log(log_weights.shape[0])
