"""The GPU suite's last table: every measured ratio beside the target it is held to.

    python benchmarks/suite_summary.py --dir=benchmarks/results/gpu_suite/NVIDIA_H200

Reads the JSON reports the suite's parts wrote into `--dir` (and the GPU tests' JUnit XML),
prints one row per target -- measured value, target, met or not, or why it is missing --
and writes `<dir>/gpu_suite.json`. A part that did not run (crashed, timed out, skipped)
shows as `missing`; nothing is estimated.

The targets (one H100 / H200 class GPU):
  GPT-2 small train step (B 16 x T 1024, bf16)   >= 1.15x the torch.compile peer's tokens/s,
                                                 >= 45% MFU, cuDNN attention compiled
  CLIP ViT-B/16 train step                       >= 1.2x the peer's samples/s
  LSTM / GRU step (2 x 1024, B 64, T 256)        bf16 <= 0.85x, f32 <= 1.0x the cuDNN
                                                 peer's time (flaxlab's faster implementation)
  GPT-2 small decoding at batch 1                int8 weight-only >= 1.5x bf16's tokens/s
  GPU tests (pytest -m gpu)                      all pass
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import harness  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    source: str                               # file in --dir
    value: Callable[[dict], float | None]     # the measured number from that report
    op: str                                   # ">=" | "<=" | "=="
    threshold: float
    unit: str = "x"


def _first(report: dict, name: str | None = None) -> dict:
    results = report.get("results") or [{}]
    for r in results:
        if name is None or r.get("name") == name:
            return r
    return {}


def _rnn_ratio(cell: str, dtype: str) -> Callable[[dict], float | None]:
    """flaxlab's faster implementation (scan or cuDNN) over the cuDNN peer, one cell x dtype."""
    def value(report):
        ratios = [r["ratio_to_torch"] for r in report.get("results", [])
                  if r.get("cell") == cell and r.get("dtype") == dtype and "ratio_to_torch" in r]
        return min(ratios) if ratios else None
    return value


def _kernel_is_cudnn(report: dict) -> float | None:
    kernel = _first(report, "base").get("attention_kernel")
    return None if kernel is None else float(kernel == "cudnn")


TARGETS = (
    Target("GPT-2 small step: tokens/s vs torch.compile", "gpt2_train_step.json",
           lambda r: _first(r, "base").get("speedup_vs_torch"), ">=", 1.15),
    Target("GPT-2 small step: MFU", "gpt2_train_step.json",
           lambda r: _first(r, "base").get("mfu"), ">=", 0.45, "frac"),
    Target("GPT-2 small step: cuDNN attention compiled", "gpt2_train_step.json",
           _kernel_is_cudnn, "==", 1.0, "bool"),
    Target("CLIP B/16 step: samples/s vs the peer", "clip_train_step.json",
           lambda r: _first(r).get("speedup_vs_torch"), ">=", 1.2),
    Target("LSTM bf16 step: time vs cuDNN peer", "rnn_step.json",
           _rnn_ratio("lstm", "bfloat16"), "<=", 0.85),
    Target("LSTM f32 step: time vs cuDNN peer", "rnn_step.json",
           _rnn_ratio("lstm", "float32"), "<=", 1.0),
    Target("GRU bf16 step: time vs cuDNN peer", "rnn_step.json",
           _rnn_ratio("gru", "bfloat16"), "<=", 0.85),
    Target("GRU f32 step: time vs cuDNN peer", "rnn_step.json",
           _rnn_ratio("gru", "float32"), "<=", 1.0),
    Target("Decode batch 1: int8 weight-only vs bf16", "decode_step.json",
           lambda r: _first(r, "int8").get("speedup_vs_bf16"), ">=", 1.5),
)


def junit_counts(path: str) -> dict | None:
    """{"tests", "failures", "errors", "skipped"} of a pytest --junitxml file."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def met(value: float, op: str, threshold: float) -> bool:
    return {">=": value >= threshold, "<=": value <= threshold,
            "==": value == threshold}[op]


def summarize(directory: str) -> dict:
    rows, device = [], None
    tests = junit_counts(os.path.join(directory, "gpu_tests.xml"))
    if tests is None:
        rows.append({"target": "GPU tests (pytest -m gpu)", "status": "missing"})
    else:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        ok = tests["failures"] == tests["errors"] == 0 and passed > 0
        rows.append({"target": "GPU tests (pytest -m gpu)", "value": passed,
                     "goal": f"all {tests['tests']} pass", "met": ok, **tests,
                     "status": "met" if ok else "NOT met"})
    for t in TARGETS:
        path = os.path.join(directory, t.source)
        row = {"target": t.name, "source": t.source, "goal": f"{t.op} {t.threshold:g}"}
        if not os.path.exists(path):
            rows.append({**row, "status": "missing", "why": f"no {t.source}"})
            continue
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        device = device or report.get("environment", {}).get("device")
        value = t.value(report)
        if value is None:
            why = (report.get("peer") or {}).get("skipped") or "no such figure in the report"
            rows.append({**row, "status": "missing", "why": why})
            continue
        ok = met(value, t.op, t.threshold)
        rows.append({**row, "value": value, "met": ok, "status": "met" if ok else "NOT met"})
    return {"benchmark": "gpu_suite", "device": device, "dir": directory, "rows": rows,
            "all_met": all(r.get("met") for r in rows)}


def format_table(summary: dict) -> str:
    lines = [f"flaxlab GPU suite on {summary['device'] or 'an unknown device'}"]
    width = max(len(r["target"]) for r in summary["rows"])
    for r in summary["rows"]:
        value = r.get("value")
        shown = "-" if value is None else (f"{value:.3f}" if isinstance(value, float)
                                           else str(value))
        lines.append(f"{r['target']:<{width}}  {shown:>8}  {r.get('goal', ''):>12}  "
                     f"{r['status']}" + (f" ({r['why']})" if r.get("why") else ""))
    lines.append("all targets met" if summary["all_met"] else "some targets not met or "
                 "not measured")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="the suite's output directory")
    args = p.parse_args(argv)
    summary = summarize(args.dir)
    print(format_table(summary))
    harness.write_json(os.path.join(args.dir, "gpu_suite.json"), summary)
    return summary


if __name__ == "__main__":
    main()
