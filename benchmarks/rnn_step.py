"""RNN training-step benchmark: a stacked LSTM / GRU (models.layers.recurrent), forward +
backward + SGD update, lax.scan vs cuDNN, float32 and bfloat16, against the PyTorch peer.

    python benchmarks/rnn_step.py                 # 2 layers, B=64, T=256, I=512, H=1024
    python benchmarks/rnn_step.py --batch=4 --seq_len=16 --input=32 --hidden=64 --steps=3
    python benchmarks/rnn_step.py --peer_device=cpu   # the peer on the CPU (else GPU only)

Each configuration (cell x dtype x implementation) times exactly the step of the PyTorch
peer (benchmarks/peers/rnn.py step: nn.LSTM / nn.GRU, cuDNN on a GPU): y = RNN(x) over a fixed random x [B, T, I], loss = mean(y^2) in
float32, gradients, params -= lr * grads; params in the compute dtype as the peer's
`.to(dtype)` (--param_dtype=float32 for mixed precision). The step is jitted with the
params donated; `--num_batches` distinct inputs sit on the device and are used in turn.

"cudnn" is models.layers.recurrent's cuDNN path (jax.experimental.rnn): LSTM, float32,
NVIDIA GPU only. Where it does not apply (GRU, bfloat16, CPU) the layer would silently run
the scan, so that configuration is reported as skipped with the reason instead of timed
twice. The `kernel` column says what the compiled step really holds: `cudnn` when the HLO
calls the cuDNN RNN custom call, else `scan`.

Timing, the peer subprocess, the environment and the JSON/table plumbing are
benchmarks/harness.py's (the method: benchmarks/README.md). TFLOP/s counts the matmuls only:
forward 2 B T sum_layers D (I_l + H) G H, training 3x forward (G gates, D directions).
The peer runs every cell and dtype first (JAX has not touched the GPU yet; on a machine
with an NVIDIA GPU, or `--peer_device=cpu`) and the table reports flaxlab ms / torch cuDNN
ms (`/torch`, < 1: flaxlab faster) for the same cell and dtype.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

# Runnable as a plain script from any directory, without `pip install -e .`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402 -- timing, peer, reports

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "rnn_step.json")
PEER_PREFIX = "torch_cudnn_"   # its lines: torch_cudnn_{lstm,gru}_{float32,bfloat16}_step_ms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm, gru, rnn")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
    p.add_argument("--impls", default="scan,cudnn", help="comma-separated: scan, cudnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--input", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--unroll", type=int, default=1, help="lax.scan unroll (scan path)")
    p.add_argument("--param_dtype", default="same", choices=("same", "float32"),
                   help="'same' = the compute dtype, as the peer's .to(dtype)")
    p.add_argument("--lr", type=float, default=1e-3)
    harness.add_timing_flags(p)
    p.add_argument("--seed", type=int, default=0)
    harness.add_peer_flags(p, "rnn")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' = none)")
    args = p.parse_args(argv)
    harness.require_at_least(p, args, ("batch", "seq_len", "input", "hidden", "layers",
                                       "steps", "windows", "num_batches", "warmup", "unroll"))
    return args


def _names(args) -> list[str]:
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    return [f"{c}/{d}/{i}" for c in split(args.cells) for d in split(args.dtypes)
            for i in split(args.impls)]


def train_flops(cfg, input_size: int, batch: int, seq_len: int) -> float:
    """3 x the forward matmul FLOPs (see the module docstring)."""
    fwd, size = 0, input_size
    for _ in range(cfg.num_layers):
        fwd += 2 * batch * seq_len * len(cfg.directions) * (size + cfg.hidden) * cfg.gates \
            * cfg.hidden
        size = cfg.output_size
    return 3.0 * fwd


def run_config(args, name: str) -> dict:
    """Build, compile, warm up and time one cell/dtype/implementation."""
    from models.layers import recurrent as R
    cell, dtype, impl = name.split("/")
    cfg = R.RecurrentConfig(cell=cell, hidden=args.hidden, num_layers=args.layers,
                            dtype=dtype, implementation=impl, unroll=args.unroll,
                            param_dtype=dtype if args.param_dtype == "same" else "float32")
    result = {"name": name, "cell": cell, "dtype": dtype, "impl": impl,
              "param_dtype": cfg.param_dtype, "batch": args.batch, "seq_len": args.seq_len,
              "input": args.input, "hidden": args.hidden, "layers": args.layers}
    if impl == "cudnn" and (reason := R.cudnn_unsupported_reason(cfg)):
        print(f"[{name}] skipped: {reason}", flush=True)
        return {**result, "skipped": reason}
    model = R.Recurrent(cfg)
    shape = (args.batch, args.seq_len, args.input)
    params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros(shape, dtype))["params"]
    rng = np.random.default_rng(args.seed)
    batches = [jax.device_put(jnp.asarray(rng.normal(size=shape), dtype))
               for _ in range(args.num_batches)]

    def loss_fn(p, x):
        y, _ = model.apply({"params": p}, x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    def step(p, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        p = jax.tree.map(lambda w, g: (w - args.lr * g.astype(jnp.float32)).astype(w.dtype),
                         p, grads)
        return p, {"loss": loss}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "cudnn falls back" is reported via `kernel`
        lowered, compiled, times = harness.lower_and_compile(
            jax.jit(step, donate_argnums=0), params, batches[0])
    hlo = harness.hlo_text(lowered, compiled)
    result.update(times, kernel="cudnn" if "dnn_rnn" in hlo else "scan",
                  params=harness.count_params(params)[0],
                  flops_per_step=train_flops(cfg, args.input, args.batch, args.seq_len))
    if result["params"] != R.param_count(cfg, args.input):
        raise AssertionError(f"{result['params']} params, expected "
                             f"{R.param_count(cfg, args.input)}")
    del lowered
    params, aux, first, info = harness.warm_up(compiled, params, batches, args.warmup,
                                               probe=jax.tree.leaves(params)[0])
    result.update(info, first_loss=float(first["loss"]))
    params, aux, window_ms = harness.time_windows(compiled, params, batches,
                                                  windows=args.windows, steps=args.steps,
                                                  start=args.warmup)
    stats = harness.window_stats(window_ms)
    result.update(stats, last_loss=float(jax.device_get(aux)["loss"]),
                  tflops=result["flops_per_step"] / (stats["ms_median"] / 1e3) / 1e12,
                  memory=harness.memory_report(compiled, jax.devices()[0]))
    if not (math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])):
        result["warning"] = "non-finite loss"
    print(f"[{name}] {stats['ms_median']:.2f} ms/step (median of {args.windows} x "
          f"{args.steps}), kernel {result['kernel']}, compile "
          f"{times['lower_s'] + times['compile_s']:.1f} s", flush=True)
    return result


def run_peer(args) -> dict | None:
    """benchmarks/peers/rnn.py's cuDNN step for every cell and dtype (one failure each)."""
    return harness.run_peer(
        args, ["step", f"--cells={args.cells}", f"--dtypes={args.dtypes}",
               f"--batch={args.batch}", f"--seq_len={args.seq_len}", f"--input={args.input}",
               f"--hidden={args.hidden}", f"--layers={args.layers}", f"--steps={args.steps}",
               f"--windows={args.windows}"], prefix=PEER_PREFIX)


COLUMNS = [("config", "<22"), ("kernel", "<6"), ("ms med", "8.2f"), ("ms mean", "8.2f"),
           ("ms min", "8.2f"), ("spread", ">6"), ("TFLOP/s", "7.1f"), ("compile", ">7"),
           ("loss0", "8.4f"), ("/torch", ">6")]


def format_table(report: dict) -> str:
    env, peer = report["environment"], report.get("peer") or {}
    lines = [f"flaxlab RNN train step ({report['layers']} layers, B={report['batch']}, "
             f"T={report['seq_len']}, I={report['input']}, H={report['hidden']}; fwd+bwd+SGD) "
             f"on {env['device']} [{env['platform']}], jax {env['jax']}, flax {env['flax']}"]
    head = harness.table_header(COLUMNS)
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"{r['name']:<22} skipped: {r['skipped']}")
            continue
        ratio = r.get("ratio_to_torch")
        lines.append(harness.table_row(COLUMNS, (
            r["name"], r["kernel"], r["ms_median"], r["ms_mean"], r["ms_min"],
            f"{r['spread_pct']:5.1f}%", r["tflops"], f"{r['lower_s'] + r['compile_s']:6.1f}s",
            r["first_loss"], "-" if ratio is None else f"{ratio:6.2f}")))
        if r.get("warning"):
            lines.append(f"  WARNING {r['name']}: {r['warning']}")
        if not r.get("state_donated", True):
            lines.append(f"  WARNING {r['name']}: the params were not donated")
    figures = {k: v for k, v in peer.items() if k.startswith(PEER_PREFIX)}
    if figures:
        lines.append(f"torch peer (cuDNN on {peer.get('device')}, median of its windows): "
                     + ", ".join(
            f"{k[len(PEER_PREFIX):-len('_step_ms')]} {v:.2f} ms" for k, v in figures.items())
            + f" ({peer.get('torch', 'torch')}); /torch = flaxlab median / torch")
    elif peer:
        lines.append(f"torch peer skipped: {peer.get('skipped', 'no figures')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = _names(args)
    peer = run_peer(args)   # before JAX initializes the GPU
    report = harness.new_report(
        "rnn_step", argv, batch=args.batch, seq_len=args.seq_len, input=args.input,
        hidden=args.hidden, layers=args.layers, steps=args.steps, windows=args.windows,
        warmup=args.warmup, environment=harness.environment(),
        results=[])
    if peer is not None:
        report["peer"] = peer
    harness.run_each(names, lambda name: run_config(args, name), report, args.out)
    for r in report["results"]:
        torch_ms = (peer or {}).get(f"{PEER_PREFIX}{r['cell']}_{r['dtype']}_step_ms")
        if torch_ms and "ms_median" in r:
            r["ratio_to_torch"] = r["ms_median"] / torch_ms
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
