"""Image grids, and the segmentation evaluator's picture of test predictions."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.evaluators.base import Evaluator, check_positive
from train.tasks.base import apply_model


def image_grid(images, rows: int) -> np.ndarray:
    """images [N, H, W, C] in [0, 1] -> one [rows (H + 1) + 1, cols (W + 1) + 1, C] image
    with 1-pixel white borders; cols = ceil(N / rows), empty cells white."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):(r + 1) * (h + 1), 1 + q * (w + 1):(q + 1) * (w + 1)] = images[i]
    return grid


def save_grid(images, rows: int, path: str) -> None:
    """`images` [N, H, W, C] in [0, 1] as a PNG of `rows` rows (image_grid)."""
    import matplotlib  # noqa: PLC0415 -- lazy: plotting only when asked
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    plt.imsave(path, image_grid(images, rows))


def save_rows(rows: list[np.ndarray], path: str, scale: int = 3, gap: int = 2) -> None:
    """Save rows of images ([n, H, W, C] in [0, 1], equal n) as one PNG, white gaps,
    each pixel scale x scale."""
    import matplotlib.image  # noqa: PLC0415 -- lazy: plotting only when asked

    n, h, w, c = rows[0].shape
    grid = np.ones((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), np.float32)
    for r, row in enumerate(rows):
        for i, img in enumerate(np.clip(np.asarray(row, np.float32), 0.0, 1.0)):
            y, x = gap + r * (h + gap), gap + i * (w + gap)
            grid[y:y + h, x:x + w] = img if c == 3 else img[..., :1]
    matplotlib.image.imsave(path, np.kron(grid, np.ones((scale, scale, 1), np.float32)))


class SegmentationPlot(Evaluator):
    """segmentation.png: test image | ground truth | prediction (+ its pixel accuracy)
    for the first `examples` test examples."""

    name = "segmentation_plot"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.examples = 6             # rows of the picture
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "examples")

    def run(self, step, params, model_state, final):
        ds, model = self.ctx.data["test"], self.ctx.model
        batch = next(iter(ds.eval_batches(self.cfg.examples)))

        @jax.jit  # one compile instead of one per primitive
        def classes(params, model_state, images):
            logits, _ = apply_model(model, params, model_state, images, jax.random.key(0),
                                    False)
            return jnp.argmax(logits, axis=-1)
        pred = np.asarray(classes(params, model_state, jnp.asarray(batch["image"])))
        names = ds.mask_class_names   # the datasets with masks name their classes
        name = "segmentation.png" if final else f"segmentation_{step}.png"
        plot_segmentations(batch["image"], batch["mask"], pred, names,
                           os.path.join(self.ctx.workdir, name))
        return {}


def plot_segmentations(images, masks, preds, class_names, path: str) -> None:
    """One row per example: image | ground truth | prediction (+ its pixel accuracy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    num = len(class_names)
    colors = plt.get_cmap("tab10")(np.arange(num) % 10)
    colors[0] = (0.1, 0.1, 0.1, 1.0)   # background: near black
    cmap = ListedColormap(colors)
    fig, axes = plt.subplots(len(images), 3, figsize=(6.6, 2.2 * len(images)),
                             squeeze=False)
    for row, (image, mask, pred) in enumerate(zip(images, masks, preds)):
        accuracy = float(np.mean(mask == pred))
        panels = ((np.clip(image, 0, 1), "image", {}),
                  (mask, "ground truth", dict(cmap=cmap, vmin=0, vmax=num - 1)),
                  (pred, f"prediction ({accuracy:.1%} px)",
                   dict(cmap=cmap, vmin=0, vmax=num - 1)))
        for ax, (panel, title, kwargs) in zip(axes[row], panels):
            ax.imshow(panel, interpolation="nearest", **kwargs)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(handles=[Patch(color=colors[k], label=class_names[k]) for k in range(num)],
               loc="lower center", ncol=min(num, 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
