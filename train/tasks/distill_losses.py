"""Distillation losses (pure functions; the teacher's inputs arrive stop-gradiented).

  kd_loss            Hinton et al. 2015: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)),
                     averaged over weighted positions (tokens or examples)
  cosine_loss        DistilBERT (Sanh et al. 2019): 1 - cos(h_s, h_t) of hidden states,
                     averaged over weighted positions (torch's CosineEmbeddingLoss, target 1)
  hidden_mse_loss    FitNets-style (Romero et al. 2015) mean squared error of hidden states
                     (the student's through a learned projection where widths differ)
  affinity_loss      TinyCLIP (Wu et al. 2023, eq. 1-3): cross-entropy between the teacher's
                     and the student's image-to-text and text-to-image affinity
                     distributions over the (global) batch, L_I2T + L_T2I

Every loss returns (mean, (sum, weight)) so a task reports it as a (sum, weight) metric.
Why T^2: the gradient of the softened KL with respect to the student logits is
(softmax(z_s/T) - softmax(z_t/T)) / T, so multiplying by T^2 keeps the soft term's gradient
scale ~T, comparable across temperatures as Hinton et al. recommend (a common misreading
drops the factor and then needs a different weight per temperature).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models.compress import gated_size
from models.layers import gates
from train.tasks.contrastive_losses import l2_normalize


def _weighted_mean(per_position, weights):
    weights = jnp.broadcast_to(weights, per_position.shape).astype(jnp.float32)
    total, weight = jnp.sum(per_position * weights), jnp.sum(weights)
    return total / jnp.maximum(weight, 1e-9), (total, weight)


def kd_loss(student_logits, teacher_logits, temperature: float, weights):
    """student_logits, teacher_logits [..., V]; weights [...] (0 = padding) ->
    (T^2 * mean KL(p_t || p_s), (sum, weight)), p = softmax(logits / T) in float32."""
    t = float(temperature)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t,
                                 axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return _weighted_mean(kl * t * t, weights)


def cosine_loss(student_hidden, teacher_hidden, weights):
    """[..., D] hidden states of equal width -> (mean of 1 - cos, (sum, weight))."""
    s = l2_normalize(student_hidden.astype(jnp.float32))
    t = l2_normalize(jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32))
    return _weighted_mean(1.0 - jnp.sum(s * t, axis=-1), weights)


def hidden_mse_loss(student_hidden, teacher_hidden, weights):
    """[..., D] (the student's already projected to the teacher's width) -> (mean over
    positions of the mean squared difference per channel, (sum, weight))."""
    diff = student_hidden.astype(jnp.float32) - jax.lax.stop_gradient(
        teacher_hidden).astype(jnp.float32)
    return _weighted_mean(jnp.mean(diff * diff, axis=-1), weights)


def _affinity_log_probs(image, text, scale, valid):
    """Row-wise log-softmax of scale * image @ text.T over valid columns, both ways."""
    logits = scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T
    masked = lambda x: jnp.where(valid[None, :], x, -jnp.inf)  # noqa: E731
    return (jax.nn.log_softmax(masked(logits), axis=-1),
            jax.nn.log_softmax(masked(logits.T), axis=-1))


def affinity_loss(student_image, student_text, student_scale, teacher_image, teacher_text,
                  teacher_scale, weights):
    """TinyCLIP's affinity mimicking over one (global) batch.

    Args:
      student_image, student_text [B, E_s]; teacher_image, teacher_text [B, E_t]: the
        L2-normalized embeddings (the widths may differ: only affinities are compared).
      student_scale, teacher_scale: the logit scales (exp of CLIP's learned log scale).
      weights [B]: 1 real, 0 padding (padded rows and columns take no part).
    Returns (L_I2T + L_T2I, (sum, weight)), L_I2T = mean_i CE(A_t[i], A_s[i]) with
    A = softmax(scale * I T^T) per image row; L_T2I the same per text row. It is minimal,
    equal to the teacher's affinity entropy, when the student's affinities equal its own.
    """
    valid = weights > 0
    s_i2t, s_t2i = _affinity_log_probs(student_image, student_text, student_scale, valid)
    t_i2t, t_t2i = _affinity_log_probs(*jax.lax.stop_gradient(
        (teacher_image, teacher_text, teacher_scale)), valid)

    def cross_entropy(log_p_t, log_p_s):
        p_t = jnp.exp(log_p_t)
        # 0 * log 0 at masked columns: both are -inf there; count them as 0.
        return -jnp.sum(jnp.where(valid[None, :], p_t * log_p_s, 0.0), axis=-1)

    per_row = cross_entropy(t_i2t, s_i2t) + cross_entropy(t_t2i, s_t2i)
    return _weighted_mean(per_row, weights)


# ---- Automatic inheritance: the sparsity constraint on the L0 gates -------------------------
def _reverse_gradient(x):
    """Identity forward, negated gradient: descending the loss ascends the multipliers."""
    return jax.lax.stop_gradient(2.0 * x) - x


def _gated_stacks(tree, path=()):
    """(path, stack params) of every transformer stack holding gate multipliers."""
    if not isinstance(tree, dict):
        return []
    if gates.LAGRANGE in tree:
        return [(path, tree)]
    return [found for key, sub in tree.items() for found in _gated_stacks(sub, path + (key,))]


def gate_penalty(params, target, quadratic: float):
    """The sparsity constraint s = t of every gated stack of `params` as an augmented
    Lagrangian (Hestenes 1969): lambda (s - t) + mu (s - t)^2, s its expected sparsity, t
    `target`, mu = `quadratic` fixed, lambda learned. Wang et al. 2020 / CoFi learn both
    coefficients; with a learned quadratic one the multiplier winds up while the gates lag
    behind a rising target and the sparsity overshoots it (measured: 0.90 for a target
    of 0.5 in a 60-step run), while a fixed mu restores in proportion to the gap at once
    and lambda only removes the remaining bias. lambda (the stack's gate_lagrange[0])
    receives a reversed gradient, so the one optimizer ascends it while it descends the
    model. Returns (penalty, {"gate_sparsity": the mean s, "gate_lambda"})."""
    stacks = _gated_stacks(params)
    if not stacks:
        raise ValueError("distill.gate_target needs gated stacks: set model.unit_gates=True "
                         "and/or model.channel_gates=True (for CLIP: under model.vit.encoder "
                         "and model.text)")
    penalty, sparsity, lams = 0.0, [], []
    for _, stack in stacks:
        s = gated_size.expected_sparsity(stack)
        lam = _reverse_gradient(stack[gates.LAGRANGE][0])
        gap = s - target
        penalty = penalty + lam * gap + quadratic * gap * gap
        sparsity.append(s)
        lams.append(stack[gates.LAGRANGE][0])
    return penalty, {"gate_sparsity": jnp.mean(jnp.stack(sparsity)),
                     "gate_lambda": jnp.mean(jnp.stack(lams))}
