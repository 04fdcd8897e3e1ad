"""Losses and metric plumbing shared by the tasks.

Metrics inside jit are (sum, weight) pairs, so evaluation over many batches (and padded
tail batches with weight 0) averages exactly: mean = sum(sums) / sum(weights).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-token (training loss, negative log-likelihood); logits [..., V], targets [...].

    With label smoothing eps the target distribution is (1 - eps) one_hot + eps / V
    (Szegedy et al. 2016), so loss = (1 - eps) nll + eps * mean_v(-log p_v). Computed from
    the log-sum-exp, never materializing a one-hot [..., V] array (V = 50257 for GPT-2).
    (Label smoothing is sometimes explained as "giving random false labels to a few
    examples"; the method mixes every target with the uniform distribution instead.)
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    if label_smoothing == 0.0:
        return nll, nll
    smooth = lse - jnp.mean(logits, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth, nll


def soft_cross_entropy(logits: jax.Array, probs: jax.Array, label_smoothing: float = 0.0
                       ) -> tuple[jax.Array, jax.Array]:
    """Per-example (training loss, cross-entropy) against target distributions: logits
    [..., V], probs [..., V] (rows summing to 1, e.g. mixup / CutMix labels).

    cross-entropy = -sum_v p_v log q_v with q = softmax(logits); label smoothing eps
    takes the target (1 - eps) p + eps / V, as ``cross_entropy`` does for a one-hot p.
    """
    if probs.shape[-1] != logits.shape[-1]:
        raise ValueError(f"soft targets have {probs.shape[-1]} classes, the logits "
                         f"{logits.shape[-1]} (model.num_classes must be the dataset's)")
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.sum(probs.astype(jnp.float32) * log_q, axis=-1)
    if label_smoothing == 0.0:
        return ce, ce
    return (1.0 - label_smoothing) * ce - label_smoothing * jnp.mean(log_q, axis=-1), ce


def token_metrics(logits, targets, weights, label_smoothing: float = 0.0
                  ) -> tuple[jax.Array, Metrics]:
    """Mean training loss over weighted tokens, and (sum, weight) metrics.

    logits [B, L, V], targets int [B, L], weights float [B, L] (0 = ignore).
    Metrics: loss (the unsmoothed NLL, so perplexity = exp(loss)) and accuracy.
    """
    loss, nll = cross_entropy(logits, targets, label_smoothing)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    mean_loss = jnp.sum(loss * weights) / jnp.maximum(total, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return mean_loss, {"loss": (jnp.sum(nll * weights), total),
                       "accuracy": (jnp.sum(correct * weights), total)}


def example_weights(batch: Mapping[str, np.ndarray], batch_size: int) -> jax.Array:
    """Per-example weights [B]: the eval batch's `weights`, or ones for training."""
    w = batch.get("weights")
    return jnp.ones((batch_size,), jnp.float32) if w is None else w.astype(jnp.float32)


def finalize(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """(sum, weight) pairs -> means."""
    return {k: float(s) / max(float(w), 1e-12) for k, (s, w) in sums.items()}


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), capped to stay finite for diverged models."""
    return float(np.exp(min(mean_nll, 50.0)))


def add_metrics(total: Metrics | None, new: Metrics) -> Metrics:
    if total is None:
        return dict(new)
    return {k: (total[k][0] + new[k][0], total[k][1] + new[k][1]) for k in new}
