"""Contrastive image-text training (CLIP / ALIGN / SigLIP).

Training: batch {"image": [B, H, W, C], "caption": int [B, L]} -> InfoNCE or sigmoid loss
over the (global) batch, and in-batch image->text accuracy. Zero-shot classification,
retrieval, the linear probe and the similarity heat map are evaluators
(train/evaluators/contrastive.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from train.tasks import common
from train.tasks import contrastive_losses as losses
from train.tasks.base import Task, apply_model

LOSSES = ("infonce", "siglip")
# Which in-batch pairs are positives: "pair" -- example i's own caption only (CLIP,
# SigLIP); "true_captions" -- every caption of the batch that is true of the image, read
# from the batch's "facts" / "facts_stated" (train/data/shapes.py:caption_facts), so that
# "a red circle" is not a negative of every other red circle's image (UniCL, Yang et al.
# 2022).
POSITIVES = ("pair", "true_captions")


class ContrastiveTask(Task):
    """Needs a model with __call__(images, texts, train) -> {"image", "text",
    "logit_scale", "logit_bias"} and methods encode_image / encode_text / image_features
    (models/clip.py)."""

    name = "contrastive"
    default_evals = ("zero_shot", "retrieval", "linear_probe", "heatmap")
    augment_keys = ("image",)  # the image side only; captions stay as they are

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.loss = "infonce"         # "infonce" (CLIP, ALIGN) | "siglip"
        c.positives = "pair"       # see POSITIVES
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        if config.task.loss not in LOSSES:
            raise ValueError(f"task.loss={config.task.loss!r}; allowed: {', '.join(LOSSES)}")
        if config.task.positives not in POSITIVES:
            raise ValueError(f"task.positives={config.task.positives!r}; allowed: "
                             f"{', '.join(POSITIVES)}")
        if config.task.loss == "siglip" and config.model.get("logit_bias_init") is None:
            raise ValueError("task.loss='siglip' needs a logit bias: set "
                             "model.logit_bias_init (e.g. -10, with logit_scale_init log 10)")

    def init_args(self, batch):
        return (batch["image"], batch["caption"]), {}

    def predict(self, params, model_state, batch, rng, train: bool):
        """{"image", "text" (normalized embeddings), "logit_scale", "logit_bias",
        "weights"} of the batch."""
        out, model_state = apply_model(self.model, params, model_state, batch["image"], rng,
                                       train, batch["caption"])
        return {**out, "weights": common.example_weights(batch, batch["image"].shape[0])}, \
            model_state

    def positives(self, batch):
        """bool [B, B] in-batch positives (None: the diagonal alone)."""
        if self.config.task.positives == "pair":
            return None
        if "facts" not in batch or "facts_stated" not in batch:
            raise ValueError("task.positives='true_captions' needs batches with \"facts\" "
                             "and \"facts_stated\" (data.source='shapes' has them); this "
                             f"batch has {', '.join(sorted(batch))}")
        return losses.true_caption_pairs(batch["facts"], batch["facts"],
                                         batch["facts_stated"])

    def metrics_of(self, out: dict, batch) -> tuple:
        w, pos = out["weights"], self.positives(batch)
        if self.config.task.loss == "infonce":
            loss, _ = losses.infonce_loss(out["image"], out["text"], out["logit_scale"], w,
                                          pos)
        else:
            loss, _ = losses.siglip_loss(out["image"], out["text"], out["logit_scale"],
                                         out["logit_bias"], w, pos)
        # In-batch retrieval: the best caption is a hit when its text equals the image's own
        # caption (captions repeat across examples, so exact duplicates count as correct).
        logits = losses.similarity_logits(out["image"], out["text"], 1.0)
        logits = jnp.where(w[None, :] > 0, logits, -jnp.inf)
        captions = batch["caption"]
        best = jnp.take(captions, jnp.argmax(logits, axis=1), axis=0)
        hit = jnp.all(best == captions, axis=1).astype(jnp.float32)
        total = jnp.sum(w)
        metrics = {"loss": (loss * total, total),
                   "batch_image_to_text_accuracy": (jnp.sum(hit * w), total),
                   "logit_scale": (out["logit_scale"] * total, total)}
        return loss, metrics
