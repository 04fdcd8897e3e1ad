"""Semantic segmentation: per-pixel cross-entropy + soft Dice; pixel accuracy, IoU, Dice.

    batch {"image": float[B, H, W, C_in], "mask": int[B, H, W] in 0..K-1}
    model(image) -> logits [B, H, W, K]

Objective = mean per-pixel cross-entropy + task.dice_weight * soft Dice loss, where the
soft Dice loss is Milletari et al. 2016 (V-Net, eq. 1) made multi-class by averaging the
per-class coefficient over all K classes (background included):

    D_k = (2 sum_i w_i p_ik g_ik + eps) / (sum_i w_i p_ik^2 + sum_i w_i g_ik^2 + eps)
    dice_loss = 1 - mean_k D_k

p = softmax(logits), g = one-hot mask, w = pixel weights (0 for padded examples), sums
over every pixel of the batch. task.dice_squared=True is V-Net's squared denominator;
False is the plain sum (sum p + sum g: Sudre et al. 2017's soft Dice, without their class
weights). eps (task.dice_eps, default 1) keeps D_k defined for a class absent from both
target and prediction, where it gives D_k = 1 (nothing to penalize).

Metrics are (sum, weight) pairs (tasks/common.py), so the split-level numbers are exact:
pixel accuracy; and per class k the intersection |pred = k and mask = k| and the union
|pred = k or mask = k| as integer pixel counts over the whole split (each divided by the
split's pixel count, which cancels in the ratios). derived_metrics then gives
    iou_k  = I_k / U_k,   dice_k = 2 I_k / (I_k + U_k)   (= 2 I / (|pred| + |mask|))
for every class with U_k > 0 (present in the target or the prediction: a predicted but
absent class scores 0), and their means over those classes: miou / mean_dice over all K
classes, miou_foreground over classes 1..K-1 (background 0 excluded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.tasks import common
from train.tasks.base import CrossEntropyTask, apply_model


def soft_dice_loss(logits, labels, weights, *, squared: bool = True, eps: float = 1.0):
    """Multi-class soft Dice loss (see the module docstring) -> (loss scalar, D [K]).

    logits [..., K], labels int [...], weights [...] per-pixel (0 = ignored).
    """
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # bf16 logits: f32 sums
    probs = jax.nn.softmax(logits.astype(dtype), axis=-1)
    target = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
    w = weights.astype(dtype)[..., None]
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(w * probs * target, axis=axes)
    power = 2 if squared else 1
    denominator = jnp.sum(w * probs ** power, axis=axes) + jnp.sum(w * target, axis=axes)
    dice = (2.0 * intersection + eps) / (denominator + eps)  # one-hot: g^2 = g
    return 1.0 - jnp.mean(dice), dice


def confusion_counts(logits, labels, weights) -> tuple[jax.Array, jax.Array]:
    """Per-class (intersection, union) int32 pixel counts [K] of argmax(logits) vs labels
    over the pixels with weight > 0 (eval padding has weight 0; weights act as a mask)."""
    num_classes = logits.shape[-1]
    valid = (weights > 0)[..., None]
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.bool_)
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(pred & true & valid, axis=axes, dtype=jnp.int32)
    union = jnp.sum((pred | true) & valid, axis=axes, dtype=jnp.int32)
    return intersection, union


def iou_and_dice(intersection, union) -> dict[str, float]:
    """Per-class iou_k, dice_k for classes with union > 0, and miou, miou_foreground,
    mean_dice over them (class 0 = background). Inputs: counts or fractions [K]."""
    out, ious, dices = {}, {}, {}
    for k, (i, u) in enumerate(zip(np.asarray(intersection, np.float64),
                                   np.asarray(union, np.float64))):
        if u > 0:
            ious[k], dices[k] = i / u, 2.0 * i / (i + u)
            out[f"iou_{k}"], out[f"dice_{k}"] = ious[k], dices[k]
    foreground = [v for k, v in ious.items() if k > 0]
    for key, values in (("miou", list(ious.values())), ("miou_foreground", foreground),
                        ("mean_dice", list(dices.values()))):
        if values:
            out[key] = float(np.mean(values))
    return out


class SegmentationTask(CrossEntropyTask):
    """Per-pixel classification of batch["image"] into batch["mask"]'s K classes. The
    picture of test predictions is the `segmentation_plot` evaluator."""

    name = "segment"
    default_evals = ("segmentation_plot",)
    augment_keys = ("image", "mask")  # geometric ops move the mask with its image

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.dice_weight = 1.0        # objective: CE + dice_weight * soft Dice; 0 = CE only
        c.dice_squared = True      # V-Net's sum p^2 + sum g^2 denominator; False: sum p + g
        c.dice_eps = 1.0           # smoothing in numerator and denominator
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        t = config.task
        super().validate_config(config)
        if t.dice_weight < 0:
            raise ValueError(f"task.dice_weight={t.dice_weight} must be >= 0 (0 = "
                             "cross-entropy only)")
        if t.dice_eps <= 0:
            raise ValueError(f"task.dice_eps={t.dice_eps} must be > 0 (Dice smoothing)")

    def __init__(self, config, model, data):
        super().__init__(config, model, data)
        self.num_classes = data["train"].data_info().get("num_mask_classes")
        if self.num_classes is None:
            raise ValueError(f"task.name='segment' needs a dataset with per-pixel masks "
                             f"(batch['mask'] and num_mask_classes), e.g. "
                             f"data.source='shapes'; data.source={config.data.source!r} "
                             "has none")

    def init_args(self, batch):
        return (batch["image"],), {}

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        t = self.config.task
        logits, model_state = apply_model(self.model, params, model_state, batch["image"],
                                          rng, train)
        labels = batch["mask"]
        w = common.example_weights(batch, labels.shape[0])
        pixel_w = jnp.broadcast_to(w[:, None, None], labels.shape)
        n_pixels = jnp.sum(pixel_w)
        loss, nll = common.cross_entropy(logits, labels, t.label_smoothing)
        ce = jnp.sum(loss * pixel_w) / jnp.maximum(n_pixels, 1.0)
        dice_loss, _ = soft_dice_loss(logits, labels, pixel_w, squared=t.dice_squared,
                                      eps=t.dice_eps)
        objective = ce + t.dice_weight * dice_loss
        n_examples = jnp.sum(w)
        valid = pixel_w > 0
        count = jnp.sum(valid, dtype=jnp.int32)
        correct = (jnp.argmax(logits, axis=-1) == labels) & valid
        intersection, union = confusion_counts(logits, labels, pixel_w)
        metrics = {
            # The objective and Dice loss are per batch (Dice is not a sum over pixels):
            # their split values are example-weighted means of batch values. Everything
            # below them is exact at split level.
            "loss": (objective * n_examples, n_examples),
            "dice_loss": (dice_loss * n_examples, n_examples),
            "cross_entropy": (jnp.sum(nll * pixel_w), n_pixels),
            "pixel_accuracy": (jnp.sum(correct, dtype=jnp.int32), count),
        }
        for k in range(logits.shape[-1]):
            metrics[f"intersection_{k}"] = (intersection[k], count)
            metrics[f"union_{k}"] = (union[k], count)
        return objective, (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        """Per-class IoU / Dice and their means from the split's intersection / union
        fractions (both over the same pixel count, so the ratios are exact)."""
        k = range(self.num_classes)
        return iou_and_dice([metrics[f"intersection_{c}"] for c in k],
                            [metrics[f"union_{c}"] for c in k])
