"""Contrastive image-text training (CLIP / ALIGN / SigLIP) and its evaluation.

Training: batch {"image": [B, H, W, C], "caption": int [B, L]} -> InfoNCE or sigmoid loss
over the (global) batch. After training (`report`):
  zero-shot classification of the held-out attribute combinations (classes never seen in
  training) with prompt ensembling, top-1 over all classes (and over the held-out ones);
  the same on the test split (seen combinations); image->text and text->image recall@1/5;
  a cosine-similarity heat map (images x captions) written to the workdir.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib  # the zero-shot split
from train.tasks import common
from train.tasks import contrastive_losses as losses

LOSSES = ("infonce", "siglip")


class ContrastiveTask:
    """Needs a model with __call__(images, texts, train) -> {"image", "text",
    "logit_scale", "logit_bias"} and methods encode_image / encode_text (models/clip.py)."""

    def __init__(self, config, model, datasets):
        self.config, self.model, self.datasets = config, model, datasets
        self.loss_name = config.task.loss
        if self.loss_name not in LOSSES:
            raise ValueError(f"task.loss={self.loss_name!r}; allowed: {', '.join(LOSSES)}")
        if self.loss_name == "siglip" and model.cfg.logit_bias_init is None:
            raise ValueError("task.loss='siglip' needs a logit bias: set "
                             "model.logit_bias_init (e.g. -10, with logit_scale_init log 10)")

    def init_args(self, batch):
        return (batch["image"], batch["caption"]), {}

    def _apply(self, params, model_state, batch, rng, train):
        variables = {"params": params, **model_state}
        kwargs = dict(train=train, rngs={"dropout": rng})
        if train and model_state:  # batch norm in a CNN image tower
            out, updates = self.model.apply(variables, batch["image"], batch["caption"],
                                            mutable=list(model_state), **kwargs)
            return out, {**model_state, **updates}
        return self.model.apply(variables, batch["image"], batch["caption"], **kwargs), \
            model_state

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        out, model_state = self._apply(params, model_state, batch, rng, train)
        w = common.example_weights(batch, batch["image"].shape[0])
        if self.loss_name == "infonce":
            loss, _ = losses.infonce_loss(out["image"], out["text"], out["logit_scale"], w)
        else:
            loss, _ = losses.siglip_loss(out["image"], out["text"], out["logit_scale"],
                                         out["logit_bias"], w)
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
        return loss, (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        return {}

    # ---- Evaluation after training ------------------------------------------------------
    def _encoders(self, params, model_state):
        variables = {"params": params, **model_state}
        encode = lambda method: jax.jit(  # noqa: E731
            lambda x: self.model.apply(variables, x, method=method))
        m = self.model
        return encode(m.encode_image), encode(m.encode_text), encode(m.image_features)

    def _linear_probe(self, image_features) -> float:
        """Ridge probe on frozen image-tower features: fit on training batches, score on
        the test split, classes = the dataset's labels."""
        t, train_ds, test_ds = self.config.task, self.datasets["train"], self.datasets["test"]
        xs, ys = [], []
        for step in range(-(-t.linear_probe_examples // train_ds.batch_size)):
            batch = train_ds.batch(step)
            xs.append(np.asarray(image_features(batch["image"])))
            ys.append(batch["label"])
        tx, ty = [], []
        for batch in test_ds.eval_batches(self.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            tx.append(np.asarray(image_features(batch["image"]))[keep])
            ty.append(batch["label"][keep])
        return losses.linear_probe_accuracy(np.concatenate(xs), np.concatenate(ys),
                                            np.concatenate(tx), np.concatenate(ty),
                                            train_ds.num_classes)

    def _embed_split(self, ds, encode_image, encode_text):
        """Embeddings of a whole eval split: images, captions [N, E], labels, indices [N]."""
        parts = {"image": [], "text": [], "label": [], "index": []}
        for batch in ds.eval_batches(self.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            parts["image"].append(np.asarray(encode_image(batch["image"]))[keep])
            parts["text"].append(np.asarray(encode_text(batch["caption"]))[keep])
            parts["label"].append(batch["label"][keep])
            parts["index"].append(batch["index"][keep])
        return [np.concatenate(parts[k]) for k in ("image", "text", "label", "index")]

    def _class_weights(self, ds, encode_text):
        """[num_classes, E] zero-shot classifier: every class's prompts, ensembled."""
        prompts = ds.class_prompts()                 # [class][template] strings
        flat = [p for per_class in prompts for p in per_class]
        emb = np.asarray(encode_text(ds.tokenize_prompts(flat)))
        emb = emb.reshape(len(prompts), len(prompts[0]), -1)
        return np.asarray(losses.zero_shot_classifier(jnp.asarray(emb)))

    def report(self, params, model_state, workdir: str) -> dict:
        encode_image, encode_text, image_features = self._encoders(params, model_state)
        t = self.config.task
        zero_shot = data_lib.make_dataset(self.config.data, "zero_shot", self.config.seed)
        weights = self._class_weights(zero_shot, encode_text)
        out = {"zero_shot/num_classes": len(zero_shot.class_names),
               "zero_shot/chance": 1.0 / len(zero_shot.class_names)}
        for name, ds in (("zero_shot", zero_shot), ("test", self.datasets["test"])):
            img, txt, labels, index = self._embed_split(ds, encode_image, encode_text)
            scores = img @ weights.T
            prefix = "zero_shot/" if name == "zero_shot" else "test/zero_shot_"
            out[prefix + "top1"] = losses.topk_accuracy(scores, labels, 1)
            out[prefix + "top5"] = losses.topk_accuracy(scores, labels, 5)
            if name == "zero_shot":  # among the held-out classes only
                held = np.asarray(zero_shot.heldout_labels)
                remap = {c: i for i, c in enumerate(held)}
                sub = np.array([remap[int(y)] for y in labels])
                out["zero_shot/top1_among_heldout"] = losses.topk_accuracy(
                    scores[:, held], sub, 1)
                out["zero_shot/chance_among_heldout"] = 1.0 / len(held)
            else:
                n = t.retrieval_examples or len(img)
                sim = img[:n] @ txt[:n].T
                matches = ds.caption_matches(index[:n], index[:n])
                out.update({f"test/{k}": v
                            for k, v in losses.retrieval_recall(sim, matches).items()})
                _heatmap(sim[:t.heatmap_size, :t.heatmap_size], ds,
                         os.path.join(workdir, "similarity_heatmap.png"))
        if t.linear_probe_examples:
            out["test/linear_probe_accuracy"] = self._linear_probe(image_features)
        return out


def _heatmap(sim: np.ndarray, ds, path: str) -> None:
    """Cosine similarities of the first images (rows) and their captions (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sim.shape[0]
    batch = next(iter(ds.eval_batches(max(n, 1))))
    captions = ds.tokenizer.decode_batch(batch["caption"][:n])
    fig, ax = plt.subplots(figsize=(4 + 0.45 * n, 2 + 0.45 * n))
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xticks(range(n), captions, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if sim[i, j] < sim.max() - 0.3 * np.ptp(sim) else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("cosine similarity: images x captions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

