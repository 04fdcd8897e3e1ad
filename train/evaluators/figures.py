"""What the picture evaluators share: file names, the lazy matplotlib import, the images'
display range, and the PNGs' copies in TensorBoard.

A picture evaluator writes `<name>.png` into the workdir after the final evaluation and
`<name>_<step>.png` on a periodic run (as the heatmap and VAE pictures do), then `publish`es
the same PNGs as TensorBoard images tagged `<evaluator>/<name>` at that step.
"""
from __future__ import annotations

import os
import time

import numpy as np


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported only when plotting)."""
    import matplotlib  # noqa: PLC0415 -- lazy: plotting only when asked
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def picture_path(workdir: str, name: str, step: int, final: bool) -> str:
    """<workdir>/<name>.png after the final evaluation, <name>_<step>.png before."""
    return os.path.join(workdir, f"{name}.png" if final else f"{name}_{step}.png")


def save(fig, path: str, dpi: int = 100) -> str:
    """Write `fig` to `path` (PNG, its empty margins cropped) and close it; returns
    `path`."""
    plt = pyplot()
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path


def displayable(images) -> np.ndarray:
    """images [N, H, W, C] -> float32 in [0, 1] for display: as they are when already in
    [0, 1] (the embedded datasets), else each image min-max scaled (a pretrained tower's
    mean / std normalized inputs)."""
    x = np.asarray(images, np.float32)
    if x.min() >= 0.0 and x.max() <= 1.0:
        return x
    low = x.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(x.max(axis=(1, 2, 3), keepdims=True) - low, 1e-8)
    return (x - low) / span


def publish(workdir: str, evaluator: str, step: int, paths: dict[str, str]) -> None:
    """The PNGs `paths` ({name: path}) as TensorBoard images `<evaluator>/<name>` at `step`,
    in <workdir>/tensorboard beside the run's scalars.

    Its own event file: the trainer's writer is not the evaluators' to use, and a unique
    file-name suffix keeps a writer opened in the same second from reusing the trainer's
    file name (tensorboardX names files by the second and the host).
    """
    import matplotlib.image  # noqa: PLC0415 -- lazy: plotting only when asked
    from tensorboardX import SummaryWriter  # noqa: PLC0415 -- importing it costs ~1 s

    writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"),
                           filename_suffix=f".{evaluator}.{os.getpid()}.{time.time_ns()}")
    try:
        for name, path in paths.items():
            image = matplotlib.image.imread(path)[..., :3]   # PNG: float [H, W, 3 | 4]
            writer.add_image(f"{evaluator}/{name}", (image * 255).astype(np.uint8),
                             global_step=int(step), dataformats="HWC")
    finally:
        writer.close()
