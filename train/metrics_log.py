"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events, progress lines,
summary.json and the loss-curve plot.

metrics.jsonl has one JSON object per logged step and split:
  {"step": 200, "split": "validation", "wall_time": 1732.1, "loss": 1.93, ...}
TensorBoard event files are written with tensorboardX (no TensorFlow needed), tags
"<split>/<metric>".
"""
from __future__ import annotations

import json
import logging as pylogging
import math
import os
import sys
import time

import numpy as np
from absl import logging


class MetricsLog:
    """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard; prints progress."""

    def __init__(self, workdir: str, total_steps: int):
        from tensorboardX import SummaryWriter  # lazy: importing it costs ~1 s

        self.workdir, self.total_steps = workdir, total_steps
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        record = {"step": int(step), "split": split, "wall_time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"{split}/{name}", value, global_step=int(step))
        self._tb.flush()

    def progress(self, step: int, loss: float, steps_per_second: float) -> str:
        """One progress line: step, loss, speed and the time left at that speed."""
        left = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else 0
        line = (f"step {step}/{self.total_steps} | loss {loss:.4f} | "
                f"{steps_per_second:.2f} steps/s | ETA {format_duration(left)}")
        logging.info(line)
        return line

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


class _QuietLibraries(pylogging.Filter):
    """Drop orbax's per-save INFO chatter (dozens of lines a checkpoint); keep warnings.

    Unless `tracebacks`, orbax's and asyncio's errors lose their tracebacks: a failed
    background save (a full disk) is logged by each of its threads and tasks, and then
    raised in the main thread, where train.main reports it in one line.
    """

    def __init__(self, tracebacks: bool):
        super().__init__()
        self.tracebacks = tracebacks

    def filter(self, record: pylogging.LogRecord) -> bool:
        library = "/orbax/" in record.pathname or "/asyncio/" in record.pathname
        if not library:
            return True
        if record.levelno < pylogging.WARNING:
            return False
        if not self.tracebacks:
            if "exception was never retrieved" in record.getMessage():
                return False  # the same error, once per pending write task
            record.exc_info, record.exc_text = None, None
        return True


def quiet_library_logs(tracebacks: bool = False) -> None:
    """For command-line entry points: keep library INFO logs out of the progress output
    (and, unless `tracebacks`, library tracebacks out of error reports)."""
    pylogging.getLogger("absl").addFilter(_QuietLibraries(tracebacks))
    pylogging.getLogger("asyncio").addFilter(_QuietLibraries(tracebacks))
    if not tracebacks:  # tensorstore callbacks firing into orbax's closed event loops
        previous_unraisable = sys.unraisablehook

        def quiet_unraisable(info):
            if not (info.exc_type is RuntimeError and "Event loop is closed"
                    in str(info.exc_value)):
                previous_unraisable(info)
        sys.unraisablehook = quiet_unraisable


def _is_number(v) -> bool:
    """Python or NumPy real scalars (0-d arrays from jax.device_get included), finite."""
    if isinstance(v, bool) or np.ndim(v) != 0:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir: str, filename: str = "loss_curve.png") -> str | None:
    """Train and validation loss against step, from metrics.jsonl; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = sorted({r["step"]: r["loss"] for r in records
                         if r["split"] == split and "loss" in r}.items())
        if points:
            ax.plot(*zip(*points), style, label=split, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file
