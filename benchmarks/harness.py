"""What every flaxlab benchmark shares: timing, the PyTorch peer, environment, reports.

A benchmark script (e.g. `gpt2_train_step.py`) builds its own step and configuration
and uses this module for the parts that must be done the same way everywhere, so that
numbers from different benchmarks are comparable (the method is benchmarks/README.md's):

* `lower_and_compile` compiles ahead of time and times lowering and compilation apart,
  so compilation never lands in a timed window;
* `warm_up`, then `time_windows` + `window_stats`: windows of steps with no host
  synchronization inside, each closed by `jax.block_until_ready`; median / mean / min;
* `run_peer` runs the benchmark's PyTorch peer (`benchmarks/peers/<name>.py`, or any
  script with the same command line: `--peer=PATH`) in a subprocess and parses its
  `NAME value unit` lines (`torch_gpt_step_ms 95.1 ms ...`);
* `select` + `run_each`: several named configurations in one process (--compare);
* `count_params`, `mfu`, `environment`, `new_report`, `write_json`, `table_header` /
  `table_row`, and the flags every benchmark has (`add_timing_flags`, `add_peer_flags`).

It imports only jax at module level, so a script can import it before deciding whether
JAX may touch the GPU (the peer must run first: JAX preallocates most device memory).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Sequence

import jax

H100_BF16_PEAK = 989e12   # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet figure)


def bool_flag(text: str) -> bool:
    """argparse type for `--flag=false` style booleans (use with nargs="?", const=True)."""
    low = str(text).lower()
    if low in ("1", "true", "t", "yes", "y", "on"):
        return True
    if low in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_timing_flags(p: argparse.ArgumentParser) -> None:
    """--steps / --windows / --warmup / --num_batches, for `warm_up` and `time_windows`."""
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    p.add_argument("--num_batches", type=int, default=4,
                   help="distinct random batches on the device, used in turn")


def require_at_least(p: argparse.ArgumentParser, args, keys: Sequence[str], low: int = 1,
                     why: str = "") -> None:
    """p.error (exit 2, one line) unless every flag in `keys` is >= low."""
    for key in keys:
        if getattr(args, key) < low:
            p.error(f"--{key} must be >= {low}{why}")


PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")


def peer_script(name: str) -> str:
    """The path of this repository's peer `benchmarks/peers/<name>.py`."""
    return os.path.join(PEERS_DIR, name + ".py")


def add_peer_flags(p: argparse.ArgumentParser, name: str) -> None:
    """--peer / --peer_device / --peer_python / --peer_timeout for the peer `name`
    (benchmarks/peers/<name>.py)."""
    p.add_argument("--peer", default=peer_script(name),
                   help="PyTorch peer script run first in a subprocess (default: this "
                        "repository's; another script must take the same command line); "
                        "'' = no peer")
    p.add_argument("--peer_device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: the GPU when there is an NVIDIA one, else no peer; cpu: "
                        "the peer on the CPU (smoke runs, CPU comparisons)")
    p.add_argument("--peer_python", default=sys.executable,
                   help="interpreter with PyTorch for the peer")
    p.add_argument("--peer_timeout", type=float, default=420.0, help="seconds")


# ----------------------------------------------------------------------------------------
# Compilation and timing.
# ----------------------------------------------------------------------------------------
def lower_and_compile(jitted, *args) -> tuple[Any, Any, dict]:
    """(lowered, compiled, {"lower_s", "compile_s"}) for a `jax.jit` function: ahead of
    time, so compilation stays out of the timed windows (lowering is Python, compiling XLA).
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return lowered, compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def hlo_text(lowered, compiled=None) -> str:
    """Lowered + compiled module text: XLA's custom calls (cuDNN attention) show only in
    the compiled one, which not every backend gives."""
    text = lowered.as_text()
    if compiled is not None:
        try:
            text += compiled.as_text()
        except Exception:  # noqa: BLE001 -- not every backend/version provides it
            pass
    return text


def attention_kernel(hlo: str, implementation: str) -> str:
    """The attention kernel a step was compiled with, read from its HLO text (`hlo_text`):
    "cudnn" when it calls cuDNN's fused attention (`__cudnn$fmha...`), else "xla" for
    implementation "fused" (the model falls back from cuDNN to XLA silently) or
    "reference" (explicit matmuls + softmax)."""
    if "cudnn$fmha" in hlo:
        return "cudnn"
    return "xla" if implementation == "fused" else "reference"


def warm_up(step: Callable, state, inputs: Sequence, n: int, probe=None
            ) -> tuple[Any, Any, Any, dict]:
    """`n` untimed calls of `state, aux = step(state, inputs[i])` after compilation.

    Returns the state, the last outputs, the first call's outputs fetched to the host (a
    sanity check, e.g. the initial loss) and {"first_step_s", "state_donated"}: `probe`,
    a buffer of the input state, must be deleted by a donating step, else every step
    copies the whole state.
    """
    t0 = time.perf_counter()
    state, aux = step(state, inputs[0])
    first = jax.device_get(aux)
    info = {"first_step_s": time.perf_counter() - t0}
    if probe is not None:
        info["state_donated"] = bool(probe.is_deleted())
        del probe
    for i in range(1, n):
        state, aux = step(state, inputs[i % len(inputs)])
    jax.block_until_ready((state, aux))
    return state, aux, first, info


def time_windows(step: Callable, state, inputs: Sequence, *, windows: int, steps: int,
                 start: int = 0) -> tuple[Any, Any, list[float]]:
    """`windows` windows of `steps` calls `state, aux = step(state, inputs[i])`, timed.

    `inputs` (distinct device-resident batches) are used in turn from index `start`.
    A window is timed on the host clock up to `jax.block_until_ready`; nothing inside it
    waits on the device, so dispatch overlaps execution as in a training loop.
    Returns the final state, the last outputs and the ms per step of each window.
    """
    window_ms, i, aux = [], start, None
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, aux = step(state, inputs[i % len(inputs)])
            i += 1
        jax.block_until_ready((state, aux))
        window_ms.append((time.perf_counter() - t0) / steps * 1e3)
    return state, aux, window_ms


def window_stats(window_ms: list[float]) -> dict:
    """Median (the headline), mean, min, max and spread (max - min, % of the median)."""
    med = statistics.median(window_ms)
    return {"window_ms": window_ms, "ms_median": med, "ms_mean": statistics.fmean(window_ms),
            "ms_min": min(window_ms), "ms_max": max(window_ms),
            "spread_pct": (max(window_ms) - min(window_ms)) / med * 100}


def count_params(params, exclude: str = "") -> tuple[int, int]:
    """(all parameters, those whose tree path does not contain `exclude`).

    MFU conventions leave some tables out of N, e.g. nanoGPT's learned positions.
    """
    total = kept = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        n = math.prod(leaf.shape)
        total += n
        if not (exclude and exclude in jax.tree_util.keystr(path)):
            kept += n
    return total, kept


def mfu(flops_per_step: float, ms_per_step: float, peak_flops: float) -> float:
    """Model FLOP utilization: the model's own FLOP count (not XLA's) per second / peak."""
    return flops_per_step / (ms_per_step / 1e3) / peak_flops


def cost_flops(compiled) -> float | None:
    """XLA's FLOP estimate for a compiled step (informational: it counts what XLA runs)."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 -- informational only
        return None


def memory_report(compiled, device) -> dict:
    """XLA's memory analysis of the compiled step, and the allocator's process peak."""
    out = {}
    try:
        ma = compiled.memory_analysis()
        for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                    "alias_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(ma, key):
                out[key] = int(getattr(ma, key))
    except Exception:  # noqa: BLE001
        pass
    try:
        stats = device.memory_stats() or {}
        # The allocator's peak is the process's so far (earlier configurations too).
        for key in ("peak_bytes_in_use", "bytes_limit"):
            if key in stats:
                out["process_" + key] = int(stats[key])
    except Exception:  # noqa: BLE001
        pass
    return out


# ----------------------------------------------------------------------------------------
# The PyTorch peer.
# ----------------------------------------------------------------------------------------
# `NAME value unit...`: the peer's result lines. The value must parse as a float, which
# excludes e.g. `torch 2.5.1 NVIDIA H100` and `torch_cudnn_gru_float32 failed: ...`.
_METRIC_LINE = re.compile(r"^([A-Za-z_]\w*)\s+([0-9.eE+-]+)")


def metric_line(line: str) -> tuple[str, float] | None:
    """(NAME, value) of a `NAME value unit...` line, else None."""
    m = _METRIC_LINE.match(line.strip())
    if not m:
        return None
    try:
        return m.group(1), float(m.group(2))
    except ValueError:
        return None


def nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def peer_device(requested: str) -> str | None:
    """The device a peer runs on for --peer_device: None = no peer here (auto without an
    NVIDIA GPU)."""
    if requested == "auto":
        return "cuda" if nvidia_gpu_present() else None
    return requested


def run_peer(args, argv: Sequence[str], *, prefix: str = "", required: str | None = None,
             record: dict | None = None) -> dict | None:
    """Run the peer script of `args.peer` with `argv` (+ `--device`) in a subprocess.

    None when there is no peer (`--peer=''`). Otherwise `record` extended with `script`,
    `device`, `wall_s`, the stdout tail, every metric line whose name starts with
    `prefix` (NAME: value), `torch` (its version line) and `skipped` (a reason) when it
    could not run here or printed no `required` metric. Output is echoed as `peer| ...`.
    Call this before JAX initializes a GPU: JAX preallocates most of its memory.
    """
    if not args.peer:
        return None
    out = {"script": args.peer, **(record or {})}
    device = peer_device(args.peer_device)
    if device is None:
        return {**out, "skipped": "no NVIDIA GPU on this machine (--peer_device=cpu runs "
                                  "the peer on the CPU)"}
    out["device"] = device
    if not os.path.exists(args.peer):
        return {**out, "skipped": f"{args.peer} does not exist"}
    if device == "cuda" and not nvidia_gpu_present():
        return {**out, "skipped": "no NVIDIA GPU on this machine"}
    cmd = [args.peer_python, args.peer, *map(str, argv), f"--device={device}"]
    print(f"peer: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        return {**out, "skipped": f"timed out after {args.peer_timeout:.0f} s"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["stdout"] = proc.stdout[-4000:]
    for line in proc.stdout.splitlines():
        print(f"  peer| {line}")
        metric = metric_line(line)
        if metric and metric[0].startswith(prefix):
            out[metric[0]] = metric[1]
        if line.startswith("torch "):
            out["torch"] = line.strip()
    if proc.returncode != 0:
        out["skipped"] = f"exit code {proc.returncode}"
        out["stderr"] = proc.stderr[-4000:]
        print(textwrap.indent(proc.stderr[-2000:], "  peer! "))
    elif required and required not in out:
        out["skipped"] = f"no {required} line in its output"
    return out


# ----------------------------------------------------------------------------------------
# Several configurations in one process (--compare).
# ----------------------------------------------------------------------------------------
def select(spec: str, presets: dict, default: Sequence[str]) -> list[str]:
    """Names from a --compare value: '' = ["base"], 'all', 'default' or 'a,b,...'."""
    if not spec:
        return ["base"]
    if spec == "all":
        return list(presets)
    if spec == "default":
        return list(default)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise SystemExit(f"--compare: unknown configuration(s) {unknown}; "
                         f"allowed: {', '.join(presets)}, all, default")
    return names


def run_each(names: Sequence[str], run_one: Callable[[str], dict], report: dict,
             out: str) -> None:
    """Append `run_one(name)` to report["results"] for each name, writing `out` after each.

    Writing after every configuration means a run cut off by a time limit keeps what
    finished. A configuration that fails (e.g. out of memory) is recorded under
    report["failed"] and the others go on, unless it is the only one; an AssertionError
    (a wrong result, e.g. a parameter count) always stops the run.
    """
    for name in names:
        try:
            result = run_one(name)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 -- one failing configuration (e.g. OOM)
            if len(names) == 1:
                raise
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
            report.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[:2000]}"
            continue
        finally:
            gc.collect()   # free this configuration's device buffers before the next
        report["results"].append(result)
        if out:
            write_json(out, report)
    if not report["results"]:
        raise SystemExit(f"every configuration failed: {report.get('failed')}")


# ----------------------------------------------------------------------------------------
# Environment and reports.
# ----------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def environment(peak_flops: float | None = None) -> dict:
    """Device, library versions and XLA_FLAGS: what a number depends on besides the code
    (and the peak FLOP/s an MFU was computed against, for benchmarks that report one)."""
    import flax
    import optax
    device = jax.devices()[0]
    env = {
        "device": getattr(device, "device_kind", str(device)), "platform": device.platform,
        "num_devices": len(jax.devices()), "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if peak_flops is not None:
        env["peak_flops"] = peak_flops
    try:
        from jax._src.lib import cuda_versions  # noqa: PLC0415 -- private, best effort
        if cuda_versions is not None:
            env["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001
        pass
    return env


def new_report(benchmark: str, argv: Sequence[str] | None, **fields) -> dict:
    """The report's head: name, UTC time, the command line (argv None = sys.argv), fields."""
    return {
        "benchmark": benchmark,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(
            sys.argv[1:] if argv is None else argv)),
        **fields,
    }


def print_and_write(report: dict, table: str, out: str | None) -> dict:
    """The end of every benchmark: the table on stdout, the JSON report to `out`."""
    print()
    print(table)
    if out:
        write_json(out, report)
        print(f"wrote {out}")
    return report


def write_json(path: str, report: dict) -> None:
    """Write atomically (temp file + rename): a run killed mid-write keeps the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def table_header(columns: Sequence[tuple[str, str]]) -> str:
    """Column titles, each aligned and padded as its values will be.

    `columns` are (title, format spec of the values): "<13" for text, "8.2f" for numbers
    (right-aligned), ">6" for text pre-formatted with a unit ("2.6%").
    """
    def title(text, spec):
        align, width = re.match(r"([<>^]?)(\d*)", spec).groups()
        return f"{text:{align or '>'}{width}}"
    return " ".join(title(text, spec) for text, spec in columns)


def table_row(columns: Sequence[tuple[str, str]], values: Sequence) -> str:
    """One row: `values` formatted with the columns' specs, lining up with the header."""
    return " ".join(f"{v:{spec}}" for v, (_, spec) in zip(values, columns, strict=True))


# The train-step benchmarks' table (gpt2_train_step, clip_train_step): a row per config,
# its throughput column named by the benchmark.
_STEP_COLUMNS = [("config", "<13"), ("attn", "<9"), ("qkv", "<5"), ("scan", "<5"),
                 ("remat", "<6"), ("dtype", "<8"), ("ms med", "8.2f"), ("ms mean", "8.2f"),
                 ("ms min", "8.2f"), ("spread", ">6")]
_STEP_TAIL = [("MFU%", "5.1f"), ("compile", ">7"), ("temp GiB", "8.2f"), ("loss0", "6.3f"),
              ("lossN", "6.3f")]


def train_step_rows(report: dict, throughput: tuple[str, str, str],
                    ratio: Callable[[dict], float] | None = None) -> list[str]:
    """The lines of a train-step benchmark's table, one config a row, with its warnings
    (non-finite loss, state not donated, fused attention that fell back to XLA on a GPU).

    throughput: (column title, format, result key), e.g. ("tok/s", "9.0f", "tokens_per_s");
    ratio: each result's "x torch" value, or None without a peer. In a dry run: what each
    config traced and lowered instead.
    """
    if report.get("dry_run"):
        return [f"[dry run] {r['name']}: train step traced and lowered in {r['trace_s']:.1f} s"
                f", attention {r['attention_kernel']} (scalars: {', '.join(r['scalars'])}); "
                f"{r['settings']}" for r in report["results"]]
    title, spec, key = throughput
    columns = [*_STEP_COLUMNS, (title, spec), *_STEP_TAIL, *([("x torch", "7.2f")] if ratio
                                                             else [])]
    head = table_header(columns)
    lines = [head, "-" * len(head)]
    gpu = report["environment"]["platform"] == "gpu"
    for r in report["results"]:
        s, mem = r["settings"], r["memory"].get("temp_size_in_bytes")
        values = (r["name"], r["attention_kernel"], "fused" if s["fused_qkv"] else "sep",
                  str(s["scan_layers"]), s["remat_policy"], s["dtype"], r["ms_median"],
                  r["ms_mean"], r["ms_min"], f"{r['spread_pct']:5.1f}%", r[key],
                  r["mfu"] * 100, f"{r['lower_s'] + r['compile_s']:6.1f}s",
                  mem / 2**30 if mem else float("nan"), r["first_loss"], r["last_loss"])
        lines.append(table_row(columns, values + ((ratio(r),) if ratio else ())))
        if r.get("warning"):
            lines.append(f"  WARNING {r['name']}: {r['warning']}")
        if not r.get("state_donated", True):
            lines.append(f"  WARNING {r['name']}: the train state was not donated")
        if (gpu and s["attention_impl"] == "fused" and s["dtype"] != "float32"
                and r["attention_kernel"] != "cudnn"):
            lines.append(f"  WARNING {r['name']}: fused attention fell back to XLA (no cuDNN)")
    return lines

