"""Input-pipeline benchmark: host milliseconds per training batch, `ds.batch(step)`.

    python benchmarks/data_batch.py                              # every offline source
    python benchmarks/data_batch.py --sources=shapes --batch=128 # rendered shapes, 32x32
    python benchmarks/data_batch.py --sources=shapes --batch=8 --steps=2 --windows=2 --out=''

Each source of `train.data.SOURCES` that needs no download is built as a run builds it
(`train.data.make_dataset` on `train.data.default_config()` with `source` and
`batch_size` set, split "train"), then `ds.batch(step)` is called for steps 1, 2, ...:
`--warmup` untimed calls, then `--windows` windows of `--steps` calls on the host clock.
Batches are NumPy arrays, so nothing waits on a device; the numbers say whether the input
pipeline can keep up with a train step (compare the ms per batch with the train step's
ms from gpt2_train_step.py or a run's steps/s). Reported per source: build seconds,
median / mean / min ms per batch over the windows and their spread, examples/s, the
batch's bytes and its arrays' shapes.

The table is printed last; the JSON report goes to `--out` (default
benchmarks/results/data_batch.json; '' writes none).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable as a plain script from any directory (no install needed).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402 -- timing statistics, reports

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "data_batch.json")
# The sources that ship with the code (no TFDS download).
OFFLINE_SOURCES = ("stdlib_text", "numbers_to_words", "shapes", "synthetic_series",
                   "real_series", "text_classification")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sources", default=",".join(OFFLINE_SOURCES),
                   help="comma-separated train.data.SOURCES names")
    p.add_argument("--batch", type=int, default=128, help="training examples per batch")
    p.add_argument("--steps", type=int, default=20, help="batches per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' = none)")
    args = p.parse_args(argv)
    harness.require_at_least(p, args, ("batch", "steps", "windows"))
    harness.require_at_least(p, args, ("warmup",), low=0)
    return args


def run_source(args, name: str) -> dict:
    """Build the train split of `name` and time its batch(step) calls."""
    from train import data
    if name not in data.SOURCES:
        raise SystemExit(f"--sources: unknown source {name!r}; allowed: "
                         f"{', '.join(data.SOURCES)}")
    c = data.default_config()
    c.source, c.batch_size = name, args.batch
    t0 = time.perf_counter()
    ds = data.make_dataset(c, "train", args.seed)
    build_s = time.perf_counter() - t0
    first = ds.batch(0)
    for step in range(1, 1 + args.warmup):
        ds.batch(step)
    step, window_ms = 1 + args.warmup, []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            ds.batch(step)
            step += 1
        window_ms.append((time.perf_counter() - t0) / args.steps * 1e3)
    stats = harness.window_stats(window_ms)
    result = {"name": name, "batch": args.batch, "build_s": build_s, **stats,
              "examples_per_s": args.batch / (stats["ms_median"] / 1e3),
              "batch_bytes": int(sum(np.asarray(v).nbytes for v in first.values())),
              "arrays": {k: [list(np.shape(v)), str(np.asarray(v).dtype)]
                         for k, v in first.items()}}
    print(f"[{name}] {stats['ms_median']:.2f} ms per batch of {args.batch} (median of "
          f"{args.windows} x {args.steps}), built in {build_s:.1f} s", flush=True)
    return result


COLUMNS = [("source", "<20"), ("ms med", "8.2f"), ("ms mean", "8.2f"), ("ms min", "8.2f"),
           ("spread", ">6"), ("examples/s", "10.0f"), ("KiB", "8.1f"), ("build", ">6"),
           ("arrays", "")]


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"flaxlab input pipeline: ds.batch(step), train split, batch {report['batch']} "
             f"(host: Python {env['python']}, numpy {np.__version__})"]
    head = harness.table_header(COLUMNS)
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        arrays = " ".join(f"{k}{tuple(shape)}" for k, (shape, _) in r["arrays"].items())
        lines.append(harness.table_row(COLUMNS, (
            r["name"], r["ms_median"], r["ms_mean"], r["ms_min"], f"{r['spread_pct']:5.1f}%",
            r["examples_per_s"], r["batch_bytes"] / 1024, f"{r['build_s']:5.1f}s", arrays)))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    report = harness.new_report(
        "data_batch", argv, batch=args.batch, steps=args.steps, windows=args.windows,
        warmup=args.warmup, environment=harness.environment(),
        results=[])
    harness.run_each(names, lambda name: run_source(args, name), report, args.out)
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
