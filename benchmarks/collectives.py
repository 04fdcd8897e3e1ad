"""Communication of the GPT-2 small train step under data parallel, FSDP and tensor parallel,
read from the compiled HLO on 8 devices and extrapolated to more with a stated model.

    python benchmarks/collectives.py                                # GPT-2 small, 8 devices
    python benchmarks/collectives.py --devices=64,512 --inter_gbps=50
    python benchmarks/collectives.py --variant=tiny --batch=8 --seq_len=32 --vocab=256

No accelerator is needed: the step is compiled ahead of time (never run) for 8 virtual CPU
devices, which is the SPMD program a multi-device run gets, built exactly as
`benchmarks/gpt2_train_step.py` (and so `train.trainer`) builds it, with the layers
unrolled so that every collective appears once per execution. Strategies (the meshes of
`config.sharding`): dp (data=8, replicated parameters), fsdp (fsdp=8, parameters split),
tp (data=2 x model=4: Megatron tensor parallelism inside groups of 4, data parallel
across them).

Measured, per strategy: every all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute of the optimized HLO, its size S (the full array: an all-gather's
output, a reduce-scatter's input) and its group (which mesh axes its devices differ in).
XLA's CPU pipeline keeps a gradient reduce-scatter as an all-reduce and a slice (the GPU
and TPU pipelines form the reduce-scatter), so fsdp's gradient traffic is counted as an
all-reduce's: up to 2x the reduce-scatter it becomes on an accelerator.

The communication model (alpha-beta, ring algorithms; Thakur et al. 2005): per device an
all-reduce sends 2 (n-1)/n S bytes in 2 (n-1) steps, an all-gather or reduce-scatter or
all-to-all (n-1)/n S in n-1 steps, a collective-permute S in 1; an operation takes
steps * alpha + bytes / beta, with (alpha, beta) of the node's links when its n devices fit
in one node (--devices_per_node) and of the network otherwise (a ring across nodes runs at
its slowest link). Defaults: 450 GB/s and 3 us inside a node (H100 NVLink 4, one
direction), 50 GB/s and 10 us across (one 400 Gb/s NIC per GPU).

Extrapolation to N devices is weak scaling: the per-device batch stays as measured, so
compute per device stays (the compiled program's FLOPs per device at --device_flops)
while groups grow. dp and fsdp groups over data / fsdp become N devices wide with the
same S (parameters and gradients do not shrink); tp keeps its groups of 4 over `model`
(activations of a fixed per-group batch) and grows data to N / 4. The table's last
column, communication over compute, says when a step can no longer hide its
communication behind its arithmetic (> 1; XLA overlaps at best the two).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

# Before jax is imported: 8 virtual CPU devices (the compiled program is what matters).
if "--platform=default" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import gpt2_train_step, harness  # noqa: E402

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "collectives.json")
MEASURED_DEVICES = 8
TP = 4
STRATEGIES = {  # config.sharding of each strategy on the 8 measured devices
    "dp": {"data": 8, "fsdp": 1, "model": 1, "strategy": "replicate"},
    "fsdp": {"data": 1, "fsdp": 8, "model": 1, "strategy": "fsdp"},
    "tp": {"data": 2, "fsdp": 1, "model": TP, "strategy": "replicate"},
}
# tp with separate query / key / value kernels: the fused kernel's one axis of heads +
# 2 kv_heads (models/layers/attention.py) is not split over "model", and resharding its
# output costs collective-permutes and all-to-alls of activations besides Megatron's
# all-reduces (measured: 84 + 48 more collectives, 6.9 GB more a step at these shapes).
MODEL_SETTINGS = {"tp": {"fused_qkv": False}}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="gpt2_small")
    p.add_argument("--batch", type=int, default=128,
                   help="global batch on the 8 measured devices (16 per data shard)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=gpt2_train_step.PADDED_VOCAB)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--devices", default="8,64,512", help="device counts of the table")
    p.add_argument("--devices_per_node", type=int, default=8)
    p.add_argument("--intra_gbps", type=float, default=450.0, help="GB/s inside a node")
    p.add_argument("--inter_gbps", type=float, default=50.0, help="GB/s across nodes")
    p.add_argument("--intra_alpha_us", type=float, default=3.0)
    p.add_argument("--inter_alpha_us", type=float, default=10.0)
    p.add_argument("--device_flops", type=float, default=400e12,
                   help="achieved FLOP/s per device (an H100 at ~40%% of its bf16 peak)")
    p.add_argument("--min_size_to_shard", type=int, default=2**14,
                   help="fsdp: parameters with fewer elements stay replicated (the "
                        "trainer's sharding.min_size_to_shard)")
    p.add_argument("--platform", default="cpu", choices=("cpu", "default"),
                   help="cpu: 8 virtual CPU devices; default: jax's own (8 or more)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON path ('' = none)")
    args = p.parse_args(argv)
    harness.require_at_least(p, args, ("batch", "seq_len", "vocab", "devices_per_node"))
    args.strategies = harness.select(args.strategies, STRATEGIES, list(STRATEGIES))
    args.devices = [int(n) for n in args.devices.split(",")]
    return args


# ----------------------------------------------------------------------------------------
# Reading the collectives of a compiled program.
# ----------------------------------------------------------------------------------------
def _shapes_bytes(text: str, arrays_only: bool = False) -> list[int]:
    """Bytes of every shape in an HLO result type (a tuple lists several); arrays_only
    leaves out rank-0 ones (an async op's u32[] contexts)."""
    return [_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _SHAPE.findall(text) if dims or not arrays_only]


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The replica groups of one HLO instruction: explicit {{0,1},{2,3}}, iota
    [G,S]<=[dims]T(perm), a mesh's axes mesh['axis_0'=2,'axis_1'=4] {'axis_1'} (devices
    in row-major order, each group along the listed axes), or a collective-permute's
    source_target_pairs; none given is one group of every device."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:
        sizes = [(k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", named.group(1))]
        spanned = re.findall(r"'(\w+)'", named.group(2))
        order = [i for i, (k, _) in enumerate(sizes) if k not in spanned] + [
            i for i, (k, _) in enumerate(sizes) if k in spanned]
        ids = np.arange(math.prod(n for _, n in sizes)).reshape([n for _, n in sizes])
        size = math.prod(n for k, n in sizes if k in spanned)
        return ids.transpose(order).reshape(-1, size).tolist()
    explicit = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)\}", line)
    if explicit:
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        groups, size = int(iota.group(1)), int(iota.group(2))
        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(d) for d in iota.group(4).split(",")])
        return ids.reshape(groups, size).tolist()
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    return [list(range(num_devices))]


def collectives(hlo: str, mesh) -> list[dict]:
    """One record per collective instruction of `hlo` (a compiled module's text):
    kind, full size S in bytes, group size n, and the mesh axes its groups span."""
    shape = dict(mesh.shape)
    names = list(shape)
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:  # (an async op's -done carries no new data)
            continue
        result, kind, is_async = m.group(1), m.group(2), bool(m.group(3))
        sizes = _shapes_bytes(result, arrays_only=is_async)
        if is_async and kind != "all-reduce":  # the result is (operands..., outputs...)
            sizes = sizes[len(sizes) // 2:]
        groups = _groups(line, mesh.size)
        n = len(groups[0])
        # A tuple result is several arrays combined into one op: their sizes add up. A
        # reduce-scatter's result is one device's 1/n of the array it reduces.
        full = sum(sizes) * (n if kind == "reduce-scatter" else 1)
        coords = np.array(np.unravel_index(groups[0], tuple(shape.values()))).T
        spans = [names[a] for a in range(len(names)) if len(set(coords[:, a])) > 1]
        out.append({"kind": kind, "bytes": int(full), "group": n, "axes": spans})
    return out


# ----------------------------------------------------------------------------------------
# The communication model.
# ----------------------------------------------------------------------------------------
def ring_cost(kind: str, full_bytes: float, n: int) -> tuple[float, int]:
    """(bytes each device sends, sequential steps) of one ring collective over n devices."""
    if n <= 1:
        return 0.0, 0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * full_bytes, 2 * (n - 1)
    if kind == "collective-permute":
        return float(full_bytes), 1
    return (n - 1) / n * full_bytes, n - 1


def scaled_group(record: dict, strategy: str, devices: int) -> int:
    """The group size of a measured collective on `devices` devices (weak scaling): data-
    like axes grow to fill the devices, tp's `model` groups stay TP wide."""
    if strategy != "tp":
        return devices if record["axes"] else 1
    sizes = {"data": devices // TP, "fsdp": 1, "model": TP}
    return math.prod(sizes.get(a, 1) for a in record["axes"])


def model_time(records: list[dict], strategy: str, devices: int, args) -> dict:
    """Bytes sent per device and seconds per step of `records` on `devices` devices."""
    sent = seconds = 0.0
    for r in records:
        n = scaled_group(r, strategy, devices)
        nbytes, steps = ring_cost(r["kind"], r["bytes"], n)
        inside = n <= args.devices_per_node
        alpha = (args.intra_alpha_us if inside else args.inter_alpha_us) * 1e-6
        beta = (args.intra_gbps if inside else args.inter_gbps) * 1e9
        sent += nbytes
        seconds += steps * alpha + nbytes / beta
    return {"bytes_per_device": sent, "comm_ms": 1e3 * seconds}


# ----------------------------------------------------------------------------------------
# Compiling each strategy.
# ----------------------------------------------------------------------------------------
def measure(args, strategy: str) -> dict:
    """Compile the train step of `strategy` on the 8 devices; its collectives and FLOPs."""
    step_args = gpt2_train_step.parse_args([
        f"--variant={args.variant}", f"--batch={args.batch}", f"--seq_len={args.seq_len}",
        f"--vocab={args.vocab}", f"--dtype={args.dtype}", "--scan_layers=false",
        f"--num_devices={MEASURED_DEVICES}", "--out="])
    settings = gpt2_train_step.model_settings(step_args, MODEL_SETTINGS.get(strategy, {}))
    setup = gpt2_train_step.Setup(step_args, settings, {
        **STRATEGIES[strategy], "min_size_to_shard": args.min_size_to_shard})
    with setup.rules():
        _, compiled, times = harness.lower_and_compile(
            setup.p_train_step, setup.abstract_state, setup.abstract_batch)
    records = collectives(compiled.as_text(), setup.mesh)
    by_kind = {k: {"count": sum(r["kind"] == k for r in records),
                   "bytes": sum(r["bytes"] for r in records if r["kind"] == k)}
               for k in KINDS}
    flops = harness.cost_flops(compiled)
    params, _ = harness.count_params(setup.abstract_state.params)
    print(f"[{strategy}] {len(records)} collectives, compile {times['compile_s']:.1f} s",
          flush=True)
    return {"strategy": strategy, "mesh": dict(setup.mesh.shape), "params": params,
            "model_settings": MODEL_SETTINGS.get(strategy, {}),
            "flops_per_device": flops, "collectives": records, "by_kind": by_kind, **times}


def extrapolate(measured: dict, args) -> list[dict]:
    rows = []
    compute_ms = (1e3 * measured["flops_per_device"] / args.device_flops
                  if measured["flops_per_device"] else float("nan"))
    for n in args.devices:
        t = model_time(measured["collectives"], measured["strategy"], n, args)
        rows.append({"strategy": measured["strategy"], "devices": n, **t,
                     "compute_ms": compute_ms,
                     "comm_over_compute": t["comm_ms"] / compute_ms})
    return rows


COLUMNS = [("strategy", "<8"), ("devices", "7d"), ("collectives", "11d"),
           ("MB/device/step", "14.1f"), ("comm ms", "9.2f"), ("compute ms", "10.2f"),
           ("comm/compute", "12.2f")]


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"GPT-2 train step communication ({report['variant']}, batch "
             f"{report['batch']} on {MEASURED_DEVICES} devices, seq {report['seq_len']}); "
             f"jax {env['jax']}; model: {report['model']}",
             harness.table_header(COLUMNS)]
    counts = {m["strategy"]: len(m["collectives"]) for m in report["measured"]}
    for r in report["rows"]:
        lines.append(harness.table_row(COLUMNS, (
            r["strategy"], r["devices"], counts[r["strategy"]], r["bytes_per_device"] / 1e6,
            r["comm_ms"], r["compute_ms"], r["comm_over_compute"])))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.device_count() < MEASURED_DEVICES:
        raise SystemExit(f"needs {MEASURED_DEVICES} devices, jax sees {jax.device_count()} "
                         "(run with --platform=cpu)")
    model = (f"ring alpha-beta, {args.intra_gbps:g} GB/s + {args.intra_alpha_us:g} us in a "
             f"node of {args.devices_per_node}, {args.inter_gbps:g} GB/s + "
             f"{args.inter_alpha_us:g} us across; {args.device_flops:.3g} FLOP/s per device")
    report = harness.new_report("collectives", argv, variant=args.variant, batch=args.batch,
                                seq_len=args.seq_len, model=model,
                                environment=harness.environment())
    report["measured"] = [measure(args, s) for s in args.strategies]
    report["rows"] = [row for m in report["measured"] for row in extrapolate(m, args)]
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
