"""The embeddings evaluator: where a model puts its images, as PCA and t-SNE pictures.

  embeddings   test images embedded by the model -- a contrastive model's joint-space
               image embeddings (encode_image, what zero-shot classifies), else a
               classifier's pooled features (its sown `pre_logits`, the head's input: ViT,
               ResNet, EfficientNet) -- projected to 2-D and colored by class:
               embeddings_pca.png (the first two principal components) and
               embeddings_tsne.png (t-SNE, van der Maaten & Hinton 2008). With
               `heldout_split` (CLIP: "zero_shot") that split's images join the picture as
               crosses: classes the model never saw in training, placed by it anyway.

PCA is the SVD of the centered embeddings in float64 (`pca`); t-SNE is scikit-learn's
(the `research` extra), imported only when asked for, and checked for when the config is.
Numbers: pca_variance_2d (the fraction of the variance the picture shows), tsne_kl (the
Kullback-Leibler divergence t-SNE ended at), points, heldout_points.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.evaluators import figures
from train.evaluators.base import Evaluator, check_positive
from train.evaluators.contrastive import compiled_encoders

METHODS = ("pca", "tsne")
RESEARCH_EXTRA = "pip install -e \".[research]\""


def pca(x, k: int = 2):
    """Principal component analysis of the rows of x [N, D] (float64 throughout).

    Returns (scores [N, k] = (x - mean) @ components.T, components [k, D] with orthonormal
    rows, the direction of largest variance first, explained_variance_ratio [k]: each
    component's share of the total variance). From the SVD x - mean = U S V^T: the
    components are V's first k rows and component i explains S_i^2 / sum S^2. The sign of
    a component is arbitrary; it is fixed so that its largest-magnitude entry is positive.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or min(x.shape) < k:
        raise ValueError(f"pca needs points [N, D] with N, D >= {k}, got shape {x.shape}")
    centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    components = vt[:k]
    largest = np.argmax(np.abs(components), axis=1)
    components = components * np.sign(components[np.arange(k), largest])[:, None]
    variance = s ** 2
    ratio = variance[:k] / max(float(variance.sum()), np.finfo(np.float64).tiny)
    return centered @ components.T, components, ratio


def tsne(x, perplexity: float, seed: int):
    """t-SNE (van der Maaten & Hinton 2008) of x [N, D] to [N, 2] with scikit-learn
    (PCA initialization, its automatic learning rate); returns (points, final KL
    divergence). The perplexity is capped at (N - 1) / 3: the neighbors it asks for must
    exist."""
    try:
        from sklearn.manifold import TSNE  # noqa: PLC0415 -- the research extra, lazily
    except ImportError:
        raise ImportError("evals.embeddings: t-SNE needs scikit-learn; "
                          f"{RESEARCH_EXTRA}, or set evals.embeddings.methods=('pca',)"
                          ) from None
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 -- scikit-learn's own

    x = np.asarray(x, np.float64)
    model = TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3.0),
                 init="pca", learning_rate="auto", random_state=seed)
    # One OpenMP thread: beside XLA's threads in this process, scikit-learn's busy-waiting
    # OpenMP team was measured 4x (1300 points) to 50x (96 points) slower on 2 cores.
    with threadpool_limits(limits=1, user_api="openmp"):
        points = model.fit_transform(x)
    return points, float(model.kl_divergence_)


def image_embedder(model, shared: dict):
    """(variables, images [B, H, W, C]) -> [B, E] float32, jitted once per run (kept in
    `shared`): a contrastive model's encode_image (the contrastive evaluators' compiled
    encoders), else the `pre_logits` a classifier sows (ValueError when it sows none)."""
    if hasattr(model, "encode_image"):
        if "clip_encoders" not in shared:
            shared["clip_encoders"] = compiled_encoders(model)
        return shared["clip_encoders"][0]
    if "pre_logits" in shared:
        return shared["pre_logits"]

    @jax.jit
    def features(variables, images):
        _, state = model.apply(variables, images, mutable=["intermediates"])
        sown = state.get("intermediates", {})
        if "pre_logits" not in sown:
            raise ValueError(f"evals.embeddings: {type(model).__name__} neither encodes "
                             "images (encode_image) nor sows pre_logits (the ViT and CNN "
                             "classifiers do)")
        return sown["pre_logits"][0].astype(jnp.float32)
    shared["pre_logits"] = features
    return features


def embed_examples(ds, limit: int, batch_size: int, embed) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` examples of an eval split through embed(images): ([n, E] float64,
    labels [n]), n = min(limit, the split's size); padded rows dropped."""
    parts, labels, count = [], [], 0
    for batch in ds.eval_batches(min(batch_size, limit)):
        keep = batch["weights"] > 0
        parts.append(np.asarray(embed(batch["image"]), np.float64)[keep])
        labels.append(np.asarray(batch["label"])[keep])
        count += int(keep.sum())
        if count >= limit:
            break
    return np.concatenate(parts)[:limit], np.concatenate(labels)[:limit]


class Embeddings(Evaluator):
    """embeddings_pca.png, embeddings_tsne.png (see the module docstring)."""

    name = "embeddings"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.split = "test"           # the split whose images are embedded
        c.examples = 1000          # points from it
        c.heldout_split = ""       # "" = none; e.g. "zero_shot": its classes never trained
        c.heldout_examples = 300   # points from heldout_split (marked as crosses)
        c.methods = METHODS        # any of "pca", "tsne" (t-SNE: the research extra)
        c.perplexity = 30.0        # t-SNE's (van der Maaten & Hinton 2008: 5 to 50)
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "examples", 4)
        check_positive(cfg, cls.name, "heldout_examples", 0)
        methods = tuple(cfg.methods)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"evals.embeddings.methods={methods!r}; allowed: a non-empty "
                             f"tuple of {', '.join(METHODS)}")
        if "tsne" in methods and importlib.util.find_spec("sklearn") is None:
            raise ValueError(f"evals.embeddings.methods={methods!r}: 'tsne' needs "
                             f"scikit-learn ({RESEARCH_EXTRA}); without it allowed: ('pca',)")
        if cfg.perplexity <= 0:
            raise ValueError(f"evals.embeddings.perplexity={cfg.perplexity} must be > 0")
        if cfg.heldout_split == cfg.split:
            raise ValueError(f"evals.embeddings.heldout_split={cfg.heldout_split!r} must "
                             "differ from evals.embeddings.split ('' = no held-out points)")

    def run(self, step, params, model_state, final):
        c, ctx = self.cfg, self.ctx
        embed = image_embedder(ctx.model, ctx.shared)
        variables = {"params": params, **model_state}
        bound = lambda images: embed(variables, images)  # noqa: E731
        batch_size = ctx.config.data.eval_batch_size
        ds = ctx.data[c.split]
        x, labels = embed_examples(ds, c.examples, batch_size, bound)
        heldout = np.zeros(len(x), bool)
        if c.heldout_split and c.heldout_examples:
            xh, lh = embed_examples(ctx.data[c.heldout_split], c.heldout_examples, batch_size,
                                    bound)
            x, labels = np.concatenate([x, xh]), np.concatenate([labels, lh])
            heldout = np.concatenate([heldout, np.ones(len(xh), bool)])
        names = getattr(ds, "class_names", None)
        what = f"{c.split} + {c.heldout_split}" if heldout.any() else c.split
        out = {"points": float(len(x)), "heldout_points": float(heldout.sum())}
        paths = {}
        if "pca" in c.methods:
            points, _, ratio = pca(x)
            out["pca_variance_2d"] = float(ratio.sum())
            paths["pca"] = plot_embedding(
                points, labels, heldout, names,
                f"PCA of {what} embeddings ({ratio.sum():.0%} of the variance)",
                figures.picture_path(ctx.workdir, "embeddings_pca", step, final))
        if "tsne" in c.methods:
            points, kl = tsne(x, c.perplexity, ctx.config.seed)
            out["tsne_kl"] = kl
            paths["tsne"] = plot_embedding(
                points, labels, heldout, names, f"t-SNE of {what} embeddings (KL {kl:.2f})",
                figures.picture_path(ctx.workdir, "embeddings_tsne", step, final))
        figures.publish(ctx.workdir, self.name, step, paths)
        return out


def plot_embedding(points, labels, heldout, class_names, title: str, path: str) -> str:
    """2-D points [N, 2] colored by class (labels [N]); heldout [N] bool points drawn as
    crosses and their legend entries marked "(held out)". Returns `path`."""
    plt = figures.pyplot()
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for flag in (False, True):      # the held-out crosses on top
        for label in np.unique(labels[heldout == flag]):
            sel = (labels == label) & (heldout == flag)
            name = class_names[label] if class_names is not None else f"class {label}"
            ax.scatter(points[sel, 0], points[sel, 1], s=22 if flag else 9, alpha=0.8,
                       color=cmap(int(label) % 20), marker="X" if flag else "o",
                       edgecolors="black" if flag else "none", linewidths=0.4,
                       label=f"{name} (held out)" if flag else name)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
              markerscale=1.4)
    fig.tight_layout()
    return figures.save(fig, path)
