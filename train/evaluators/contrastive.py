"""Evaluators of image-text models (CLIP / ALIGN / SigLIP, models/clip.py).

  zero_shot     classification by prompt-ensembled class embeddings (Radford et al. 2021,
                3.1.4) of the held-out attribute combinations (classes never seen in
                training), over all classes and among the held-out ones; and of the test
                split's seen classes (test_top1)
  retrieval     image->text and text->image recall@1/5 on the test split
  linear_probe  a ridge probe on frozen image-tower features: fit on training batches,
                scored on the test split
  heatmap       cosine similarities of the first test images and captions ->
                similarity_heatmap.png
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.evaluators.base import Evaluator, check_positive
from train.tasks import contrastive_losses as losses


def compiled_encoders(model):
    """Jitted (variables, x) -> encode_image / encode_text / image_features of `model`."""
    def encode(method):
        return jax.jit(lambda variables, x: model.apply(variables, x, method=method))
    return encode(model.encode_image), encode(model.encode_text), encode(model.image_features)


def bind(compiled, params, model_state):
    """compiled_encoders(...) bound to these params: x -> embeddings, each."""
    variables = {"params": params, **model_state}
    return tuple(lambda x, f=f: f(variables, x) for f in compiled)


def embed_split(ds, batch_size: int, encode_image, encode_text):
    """Embeddings of a whole eval split: images, captions [N, E], labels, indices [N]."""
    parts = {"image": [], "text": [], "label": [], "index": []}
    for batch in ds.eval_batches(batch_size):
        keep = batch["weights"] > 0
        parts["image"].append(np.asarray(encode_image(batch["image"]))[keep])
        parts["text"].append(np.asarray(encode_text(batch["caption"]))[keep])
        parts["label"].append(batch["label"][keep])
        parts["index"].append(batch["index"][keep])
    return [np.concatenate(parts[k]) for k in ("image", "text", "label", "index")]


class _ImageText(Evaluator):
    """Shared: the encoders and the embedded test split."""

    def _encoders(self, params, model_state):
        shared = self.ctx.shared
        if "clip_encoders" not in shared:  # the four evaluators compile them once
            shared["clip_encoders"] = compiled_encoders(self.ctx.model)
        return bind(shared["clip_encoders"], params, model_state)

    def _embed(self, split: str, encode_image, encode_text):
        return embed_split(self.ctx.data[split], self.ctx.config.data.eval_batch_size,
                           encode_image, encode_text)


class ZeroShot(_ImageText):
    name = "zero_shot"

    def _class_weights(self, ds, encode_text):
        """[num_classes, E] zero-shot classifier: every class's prompts, ensembled."""
        prompts = ds.class_prompts()                 # [class][template] strings
        flat = [p for per_class in prompts for p in per_class]
        emb = np.asarray(encode_text(ds.tokenize_prompts(flat)))
        emb = emb.reshape(len(prompts), len(prompts[0]), -1)
        return np.asarray(losses.zero_shot_classifier(jnp.asarray(emb)))

    def run(self, step, params, model_state, final):
        encode_image, encode_text, _ = self._encoders(params, model_state)
        zero_shot = self.ctx.data["zero_shot"]
        weights = self._class_weights(zero_shot, encode_text)
        held = np.asarray(zero_shot.heldout_labels)
        out = {"num_classes": len(zero_shot.class_names),
               "chance": 1.0 / len(zero_shot.class_names),
               "chance_among_heldout": 1.0 / len(held)}
        for split, prefix in (("zero_shot", ""), ("test", "test_")):
            img, _, labels, _ = self._embed(split, encode_image, encode_text)
            scores = img @ weights.T
            out[prefix + "top1"] = losses.topk_accuracy(scores, labels, 1)
            out[prefix + "top5"] = losses.topk_accuracy(scores, labels, 5)
            if split == "zero_shot":  # among the held-out classes only
                remap = {c: i for i, c in enumerate(held)}
                sub = np.array([remap[int(y)] for y in labels])
                out["top1_among_heldout"] = losses.topk_accuracy(scores[:, held], sub, 1)
                # Per held-out class: the among-4 accuracy moves by whole classes between
                # seeds (a class's images mostly right or mostly taken for a sibling).
                predicted = np.argmax(np.asarray(scores)[:, held], axis=1)
                for i, c in enumerate(held):
                    name = zero_shot.class_names[c].replace(" ", "_")
                    mine = sub == i
                    out[f"heldout_top1/{name}"] = (float(np.mean(predicted[mine] == i))
                                                   if mine.any() else float("nan"))
        return out


class Retrieval(_ImageText):
    name = "retrieval"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.examples = 1000          # test examples for recall@k (0 = the whole split)
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "examples", 0, " (0 = the whole split)")

    def run(self, step, params, model_state, final):
        encode_image, encode_text, _ = self._encoders(params, model_state)
        img, txt, _, index = self._embed("test", encode_image, encode_text)
        n = self.cfg.examples or len(img)
        matches = self.ctx.data["test"].caption_matches(index[:n], index[:n])
        return losses.retrieval_recall(img[:n] @ txt[:n].T, matches)


class LinearProbe(_ImageText):
    name = "linear_probe"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.examples = 4096          # training examples the ridge probe is fit on
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "examples")

    def run(self, step, params, model_state, final):
        _, _, image_features = self._encoders(params, model_state)
        train_ds, test_ds = self.ctx.data["train"], self.ctx.data["test"]
        xs, ys = [], []
        for s in range(-(-self.cfg.examples // train_ds.batch_size)):
            batch = train_ds.batch(s)
            xs.append(np.asarray(image_features(batch["image"])))
            ys.append(batch["label"])
        tx, ty = [], []
        for batch in test_ds.eval_batches(self.ctx.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            tx.append(np.asarray(image_features(batch["image"]))[keep])
            ty.append(batch["label"][keep])
        return {"accuracy": losses.linear_probe_accuracy(
            np.concatenate(xs), np.concatenate(ys), np.concatenate(tx), np.concatenate(ty),
            train_ds.num_classes)}


class Heatmap(_ImageText):
    name = "heatmap"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.size = 8                 # images x captions in similarity_heatmap.png
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "size")

    def run(self, step, params, model_state, final):
        encode_image, encode_text, _ = self._encoders(params, model_state)
        ds, n = self.ctx.data["test"], self.cfg.size
        batch = next(iter(ds.eval_batches(n)))
        keep = batch["weights"] > 0
        img = np.asarray(encode_image(batch["image"]))[keep]
        txt = np.asarray(encode_text(batch["caption"]))[keep]
        captions = ds.tokenizer.decode_batch(batch["caption"][keep])
        name = "similarity_heatmap.png" if final else f"similarity_heatmap_{step}.png"
        plot_heatmap(img @ txt.T, captions, os.path.join(self.ctx.workdir, name))
        return {}


def plot_heatmap(sim: np.ndarray, captions: list[str], path: str) -> None:
    """Cosine similarities of images (rows) and their captions (columns)."""
    import matplotlib  # noqa: PLC0415 -- lazy: plotting only when asked
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = sim.shape[0]
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
