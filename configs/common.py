"""Blocks the experiment configs share: the step cadence, the optimizer recipe, the
shapes-classification and forecasting setups, and adding an evaluator.

Each helper sets values of an existing `base_config(...)`; `add_eval` (from train.config)
adds a registered evaluator's section with its defaults.
"""
from __future__ import annotations

from train.config import add_eval

__all__ = ["add_eval", "cadence", "series_forecasting", "shapes_augment",
           "shapes_classification", "warmup_cosine"]


def cadence(c, num_steps: int, every: int) -> None:
    """num_steps, and a validation pass and a checkpoint every `every` steps."""
    c.train.num_steps = num_steps
    c.train.eval_every = every
    c.checkpoint.every = every


def warmup_cosine(c, learning_rate: float, warmup_steps: int, grad_clip_norm: float = 1.0,
                  weight_decay: float | None = None) -> None:
    """The default recipe: linear warm-up to `learning_rate`, cosine decay, gradient
    clipping by global norm (and weight decay when given)."""
    c.optim.learning_rate = learning_rate
    c.optim.grad_clip_norm = grad_clip_norm
    c.optim.schedule.name = "warmup_cosine"
    c.optim.schedule.warmup_steps = warmup_steps
    if weight_decay is not None:
        c.optim.weight_decay = weight_decay


def shapes_classification(c, batch_size: int = 64, eval_batch_size: int = 128) -> None:
    """Classify the embedded shapes: every one of the 16 color x shape classes is in
    train / validation / test (no held-out zero-shot classes)."""
    c.data.source = "shapes"
    c.data.shapes.exclude_heldout_from_train = False
    c.data.batch_size = batch_size
    c.data.eval_batch_size = eval_batch_size


def shapes_augment(c) -> None:
    """The shapes classifiers' augmentation (data.shapes.augment, train/data/augment.py):
    random resized crops of at least half the area, flips, rotations up to 15 degrees,
    brightness / contrast / saturation jitter of 0.2 -- no hue turn, since the color is
    half the class -- and mixup (alpha 0.2) or CutMix (alpha 1), one per example."""
    a = c.data.shapes.augment
    a.crop_area_min, a.flip, a.rotate = 0.5, 0.5, 15.0
    a.brightness = a.contrast = a.saturation = 0.2
    a.mixup, a.cutmix = 0.2, 1.0


def series_forecasting(c, learning_rate: float) -> None:
    """Forecast the generated seasonal series: batches of 64 windows, 1000 steps,
    warm-up + cosine (50 steps), evaluations every 250 steps."""
    c.data.source = "synthetic_series"
    c.data.batch_size = 64
    c.data.eval_batch_size = 256
    warmup_cosine(c, learning_rate, warmup_steps=50)
    cadence(c, 1000, 250)
