"""Classification: cross-entropy on class logits, top-1 (and top-5) accuracy.

Works for any model mapping an input batch to logits [B, num_classes]: images
(batch["image"], ViT / ResNet / EfficientNet) or token sequences (batch["tokens"]).
Models with batch statistics (batch norm) update them in training and use them frozen in
evaluation: the task passes the non-parameter collections as mutable only when training.
A training batch mixed by mixup / CutMix (config.data.<source>.augment, train/data/
augment.py) carries "label_probs" [B, num_classes]: the loss is then the cross-entropy
with that distribution (label smoothing mixes it with the uniform one), while accuracy
stays on the hard "label" (each example's own, unmixed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from train.tasks import common
from train.tasks.base import CrossEntropyTask, apply_model

INPUT_KEYS = ("image", "tokens")


def topk_correct(logits, labels, k: int):
    """1.0 where the label is among the k largest logits, per example [B]."""
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


class ClassificationTask(CrossEntropyTask):
    """batch {input_key: [B, ...], "label": int[B]} -> logits [B, num_classes]."""

    name = "classify"
    augment_keys = ("image", "label")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.input_key = "image"      # batch key fed to the model ("image" | "tokens")
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        if config.task.input_key not in INPUT_KEYS:
            raise ValueError(f"task.input_key={config.task.input_key!r}; allowed: "
                             f"{', '.join(INPUT_KEYS)}")

    def __init__(self, config, model, data):
        super().__init__(config, model, data)
        self.input_key = config.task.input_key

    def init_args(self, batch):
        return (batch[self.input_key],), {}

    def predict(self, params, model_state, batch, rng, train: bool):
        logits, model_state = apply_model(self.model, params, model_state,
                                          batch[self.input_key], rng, train)
        labels = batch["label"]
        return {"logits": logits, "targets": labels,
                "weights": common.example_weights(batch, labels.shape[0])}, model_state

    def metrics_of(self, outputs: dict, batch) -> tuple:
        logits, labels, w = outputs["logits"], outputs["targets"], outputs["weights"]
        if "label_probs" in batch:  # mixup / CutMix targets (training only)
            loss, nll = common.soft_cross_entropy(logits, batch["label_probs"],
                                                  self.config.task.label_smoothing)
        else:
            loss, nll = common.cross_entropy(logits, labels, self.config.task.label_smoothing)
        total = jnp.sum(w)
        metrics = {"loss": (jnp.sum(nll * w), total),
                   "accuracy": (jnp.sum(topk_correct(logits, labels, 1) * w), total)}
        if logits.shape[-1] > 5:
            metrics["top5_accuracy"] = (jnp.sum(topk_correct(logits, labels, 5) * w), total)
        return jnp.sum(loss * w) / jnp.maximum(total, 1.0), metrics
