"""What every PyTorch peer shares: flags, device choice, timing and the result lines.

A peer is a plain script (`python benchmarks/peers/<name>.py <what> --flags`) that imports
only PyTorch (and, where installed, the library it stands for: open_clip, torchao), so it
runs in any Python with torch. It prints one line per figure:

    NAME value unit [free text]

(`benchmarks/harness.py` reads these; other lines are echoed and otherwise ignored).

Timing: `--warmup` untimed steps (torch.compile compiles in the first), then `--windows`
windows of `--steps` steps; a window ends with `torch.cuda.synchronize()` on a GPU; the
headline is the median window's ms per step, as in the JAX benchmarks (harness.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch


def add_common_flags(p: argparse.ArgumentParser, *, steps: int = 20, windows: int = 5,
                     warmup: int = 5) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--steps", type=int, default=steps, help="steps per timed window")
    p.add_argument("--windows", type=int, default=windows, help="timed windows (median)")
    p.add_argument("--warmup", type=int, default=warmup,
                   help="untimed steps first (torch.compile compiles in the first)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads on the CPU (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)


def setup(args) -> torch.device:
    """The device of the flags, with TF32 matmuls on a GPU (what nanoGPT and open_clip's
    training scripts run with) and the CPU thread count; prints the `torch` version line."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("peer: --device=cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    print("torch", torch.__version__, name, flush=True)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step: Callable[[], object], device: torch.device, *, warmup: int,
              windows: int, steps: int) -> dict:
    """Warm-up, then `windows` timed windows of `steps` calls of `step()`.

    Returns {"ms": median ms per step, "window_ms": [...], "spread_pct", "last": the
    last call's result} (the result is whatever `step` returns, e.g. the loss tensor).
    """
    out = None
    for _ in range(warmup):
        out = step()
    synchronize(device)
    window_ms = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step()
        synchronize(device)
        window_ms.append((time.perf_counter() - t0) / steps * 1e3)
    med = statistics.median(window_ms)
    return {"ms": med, "window_ms": window_ms, "last": out,
            "spread_pct": (max(window_ms) - min(window_ms)) / med * 100}


def emit(name: str, value: float, unit: str, note: str = "") -> None:
    """One result line: `NAME value unit [note]`."""
    print(f"{name} {value:.6g} {unit}" + (f" {note}" if note else ""), flush=True)


def compiled_or_eager(module: torch.nn.Module, mode: str):
    """`mode` "eager" | "compile" (torch.compile with its defaults: inductor)."""
    if mode == "eager":
        return module
    if mode == "compile":
        return torch.compile(module)
    raise SystemExit(f"peer: unknown mode {mode!r}; allowed: eager, compile")


def here_on_path() -> None:
    """Lets a peer script import its siblings (`from common import ...`) from anywhere."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
