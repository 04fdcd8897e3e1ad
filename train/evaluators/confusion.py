"""The confusion_matrix evaluator: which classes a classifier mistakes for which.

  confusion_matrix  the test split through the task's predict (argmax of the logits):
                    confusion_matrix.png (rows: true class, columns: predicted; each row
                    as fractions of its class, the counts written in the cells) and
                    accuracy (the trace over the total: the task's test/accuracy again),
                    balanced_accuracy (the mean per-class recall) and min_recall (the
                    worst class's).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from train.evaluators import figures
from train.evaluators.base import SampleEvaluator


def confusion_matrix(labels, predictions, num_classes: int, weights=None) -> np.ndarray:
    """int64 [C, C]: [i, j] = examples of true class i predicted as j; examples with
    weight 0 (padding) left out. labels, predictions int [N] in [0, C)."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    keep = np.ones(labels.shape, bool) if weights is None else np.asarray(weights) > 0
    labels, predictions = labels[keep], predictions[keep]
    if labels.size and (min(labels.min(), predictions.min()) < 0
                        or max(labels.max(), predictions.max()) >= num_classes):
        raise ValueError(f"labels and predictions must lie in [0, {num_classes})")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    return flat.reshape(num_classes, num_classes)


def confusion_stats(counts: np.ndarray) -> dict:
    """accuracy, balanced_accuracy and min_recall of a confusion matrix (classes with no
    true example are left out of the recalls)."""
    per_class = counts.sum(axis=1)
    present = per_class > 0
    recall = np.diag(counts)[present] / per_class[present]
    return {"accuracy": float(np.trace(counts) / max(counts.sum(), 1)),
            "balanced_accuracy": float(recall.mean()) if recall.size else 0.0,
            "min_recall": float(recall.min()) if recall.size else 0.0}


class ConfusionMatrix(SampleEvaluator):
    """confusion_matrix.png and its accuracies (see the module docstring) over the split's
    first `examples` examples (0 = the whole split)."""

    name = "confusion_matrix"
    SAMPLE_KEY, SAMPLE_DEFAULT, SAMPLE_ALL = "examples", 0, True

    def run(self, step, params, model_state, final):
        ctx, task = self.ctx, self.ctx.task
        if "confusion_matrix" not in ctx.shared:   # compiled once per run
            def classes(params, model_state, batch):
                outputs, _ = task.predict(params, model_state, batch, jax.random.key(0),
                                          False)
                return jnp.argmax(outputs["logits"], axis=-1)
            ctx.shared["confusion_matrix"] = jax.jit(classes)
        classes = ctx.shared["confusion_matrix"]
        ds, limit = ctx.data[self.cfg.split], self.cfg.examples
        labels, predictions = [], []
        for batch in ds.eval_batches(ctx.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
            predictions.append(np.asarray(classes(params, model_state, arrays))[keep])
            labels.append(np.asarray(batch["label"])[keep])
            if limit and sum(map(len, labels)) >= limit:
                break
        labels = np.concatenate(labels)[:limit or None]
        predictions = np.concatenate(predictions)[:limit or None]
        num_classes = int(getattr(ds, "num_classes", 0)) or int(
            max(labels.max(), predictions.max()) + 1)
        counts = confusion_matrix(labels, predictions, num_classes)
        path = figures.picture_path(ctx.workdir, "confusion_matrix", step, final)
        plot_confusion(counts, getattr(ds, "class_names", None), path)
        figures.publish(ctx.workdir, self.name, step, {"confusion_matrix": path})
        return confusion_stats(counts)


def plot_confusion(counts: np.ndarray, class_names, path: str) -> str:
    """The row-normalized matrix (true class down, predicted across) with its counts."""
    plt = figures.pyplot()
    c = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.32 * c
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(c):
        for j in range(c):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=5,
                        color="white" if rates[i, j] > 0.6 else "black")
    stats = confusion_stats(counts)
    ax.set_title(f"confusion matrix: accuracy {stats['accuracy']:.1%}, balanced "
                 f"{stats['balanced_accuracy']:.1%}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.tight_layout()
    return figures.save(fig, path, dpi=100)
