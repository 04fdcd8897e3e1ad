"""Contrastive image-text objectives and their evaluation: InfoNCE (CLIP), sigmoid (SigLIP),
zero-shot classification with prompt ensembling, retrieval recall@k.

Embeddings are L2-normalized [N, D] arrays; row i of the image and text embeddings is a
matching pair. Under jit with a batch sharded over devices these functions see the GLOBAL
batch (XLA gathers what the similarity matrix needs), so every device contrasts against
every example -- the "gather across the data axis" of the papers, without manual
collectives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9  # finite: masked logits stay NaN-free under softmax and log-sigmoid


def similarity_logits(image_emb, text_emb, logit_scale, logit_bias=None):
    """logits[i, j] = scale * <image_i, text_j> (+ bias), float32 [N, N]."""
    logits = logit_scale * jnp.einsum("id,jd->ij", image_emb.astype(jnp.float32),
                                      text_emb.astype(jnp.float32))
    return logits if logit_bias is None else logits + logit_bias


def true_caption_pairs(image_facts, caption_facts, caption_stated):
    """bool [N, M]: caption j is true of image i, from the examples' facts.

    image_facts int [N, K]: the attribute values of each image (e.g. class, count, size);
    caption_facts int [M, K], caption_stated bool [M, K]: those of each caption's own
    image, and which of them the caption states. Caption j is true of image i when every
    fact it states holds for image i. Works on NumPy and JAX arrays.
    """
    same = image_facts[:, None, :] == caption_facts[None, :, :]
    return (same | ~caption_stated[None, :, :]).all(axis=-1)


def _pair_targets(n, weights, positives):
    """(real-example weights w [N], positives P bool [N, N]): P defaults to the diagonal;
    a padded example is nobody's positive."""
    w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    real = w > 0
    pos = jnp.eye(n, dtype=bool) if positives is None else positives.astype(bool)
    pos = pos | jnp.eye(n, dtype=bool)  # every pair is its own positive
    return w, pos & real[:, None] & real[None, :]


def infonce_loss(image_emb, text_emb, logit_scale, weights=None, positives=None):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3):
    0.5 * (CE(logits, diag) over rows + CE(logits^T, diag) over columns).

    weights [N] (1 real, 0 padding): padded examples are neither anchors nor negatives.
    positives bool [N, N] (optional): positives[i, j] = caption j is true of image i. Each
    row's (and column's) target is then uniform over its positives, as in UniCL's
    bidirectional loss (Yang et al. 2022, eq. 2-3): a caption that also describes another
    image of the batch is no longer that image's negative. None (or the identity) gives
    CLIP's loss exactly.
    Returns (mean loss over real examples, per-example row+column losses [N]).
    """
    logits = similarity_logits(image_emb, text_emb, logit_scale)
    n = logits.shape[0]
    w, pos = _pair_targets(n, weights, positives)
    real = w > 0
    logits = jnp.where(real[:, None] & real[None, :], logits, NEG_INF)
    pos = pos.astype(jnp.float32)
    # -mean over positives of log softmax = logsumexp - mean positive logit.
    mean_pos_row = jnp.sum(pos * logits, 1) / jnp.maximum(jnp.sum(pos, 1), 1.0)
    mean_pos_col = jnp.sum(pos * logits, 0) / jnp.maximum(jnp.sum(pos, 0), 1.0)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - mean_pos_row
    text_to_image = jax.nn.logsumexp(logits, axis=0) - mean_pos_col
    per_example = 0.5 * (image_to_text + text_to_image) * real
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0), per_example


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, weights=None, positives=None):
    """Sigmoid loss of SigLIP (Zhai et al. 2023, Alg. 1): every pair is a binary problem,
    label +1 on the diagonal and -1 elsewhere; -sum log sigmoid(label * logit) / N.

    weights [N]: a pair counts when both of its examples are real; normalized by the
    number of real examples, as the paper normalizes by the batch size.
    positives bool [N, N] (optional): pairs labelled +1 besides the diagonal (caption j
    true of image i).
    """
    logits = similarity_logits(image_emb, text_emb, logit_scale, logit_bias)
    n = logits.shape[0]
    w, pos = _pair_targets(n, weights, positives)
    labels = 2.0 * pos.astype(jnp.float32) - 1.0
    pair_w = w[:, None] * w[None, :]
    nll = -jax.nn.log_sigmoid(labels * logits)
    return jnp.sum(nll * pair_w) / jnp.maximum(jnp.sum(w), 1.0), jnp.sum(nll * pair_w, 1)


def l2_normalize(x, axis=-1, eps=1e-6):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def zero_shot_classifier(class_prompt_embeddings):
    """Prompt ensembling (CLIP 3.1.4): per class, the mean of its L2-normalized prompt
    embeddings [C, T, D], normalized again -> class weights [C, D]."""
    return l2_normalize(jnp.mean(l2_normalize(class_prompt_embeddings), axis=1))


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores. scores [N, C]."""
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                          ridge: float = 1e-2) -> float:
    """Top-1 accuracy of a linear classifier fit on frozen features (the linear probe of
    CLIP 3.2), here closed-form ridge regression onto one-hot targets -- deterministic and
    a few milliseconds -- on standardized features. x [N, D] float, y int [N]."""
    x = np.asarray(train_x, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    targets = np.eye(num_classes)[np.asarray(train_y)]
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    w = np.linalg.solve(gram, x.T @ targets)
    xt = (np.asarray(test_x, np.float64) - mean) / std
    xt = np.concatenate([xt, np.ones((len(xt), 1))], axis=1)
    return float(np.mean(np.argmax(xt @ w, axis=1) == np.asarray(test_y)))


def retrieval_recall(similarity: np.ndarray, matches: np.ndarray | None = None,
                     ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways for similarity [N images, N texts].

    matches: bool [N, N], which captions are true of which image (default: only the
    diagonal, pair i = (image i, caption i)). Where captions repeat or under-describe
    (several images fit "a red circle"), any true caption or image counts as a hit.
    image_to_text R@k: some true caption ranks in the top k of the image's row;
    text_to_image R@k: some true image ranks in the top k of the caption's column.
    """
    sim = np.asarray(similarity, np.float64)
    n = sim.shape[0]
    matches = np.eye(n, dtype=bool) if matches is None else np.asarray(matches, bool)
    # Best true candidate's score; its rank = candidates strictly better (ties favour it).
    best_i2t = np.where(matches, sim, -np.inf).max(axis=1)
    best_t2i = np.where(matches, sim, -np.inf).max(axis=0)
    rank_i2t = np.sum(sim > best_i2t[:, None], axis=1)
    rank_t2i = np.sum(sim > best_t2i[None, :], axis=0)
    out = {}
    for k in ks:
        out[f"image_to_text_r@{k}"] = float(np.mean(rank_i2t < k))
        out[f"text_to_image_r@{k}"] = float(np.mean(rank_t2i < k))
    return out
