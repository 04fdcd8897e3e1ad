"""GPT-2 small training-step benchmark: the train step `train.main` runs, timed on one device.

    python benchmarks/gpt2_train_step.py                        # GPT-2 small, B=16, T=1024
    python benchmarks/gpt2_train_step.py --variant=tiny --batch=8 --seq_len=64 --steps=5
    python benchmarks/gpt2_train_step.py --dry_run              # shapes + parameter count only
    python benchmarks/gpt2_train_step.py --compare=base,unrolled,reference --peer=PATH

What is timed is built exactly as `train.trainer.train_and_evaluate` builds it for
`configs/gpt.py:gpt2_small`: the run config from `configs.gpt.get_config("gpt2_small")`
(AdamW, weight decay 0.1 with its exclusion mask, grad clip 1.0, warmup-cosine schedule),
`LanguageModelTask.loss_fn`, `trainer.make_init_state` / `trainer.make_train_step`, and
`jax.jit` with the trainer's shardings and `donate_argnums=0`. Only the model section is
changed by the flags (variant, compute dtype, attention implementation, fused QKV, scan,
remat) and the vocabulary is 50304 (GPT-2's 50257 padded to a multiple of 64, as the
PyTorch peer does); params stay float32. Batches are random tokens in [0, 50257), several
distinct ones placed on the device before timing and used in turn.

Timing (see .library/device/METHOD.md): the step is compiled ahead of time (lower +
compile, both timed and reported), run `--warmup` times, then `--windows` windows of
`--steps` steps each; a window is timed on the host clock after `jax.block_until_ready`
on the state, with no host synchronization inside it. Reported: median / mean / min
ms per step over the windows, tokens/s and MFU from the median.

MFU uses nanoGPT's count: flops per token = 6 N + 12 L H Q T, with N the parameters
excluding the position embeddings, L layers, H heads, Q head dim, T sequence length;
MFU = flops per token * tokens per second / --peak_flops (989e12: H100 dense bf16).

`--peer=torch_peers.py` runs the PyTorch peer's `bench_gpt(B, T)` in a subprocess
*before* JAX touches the GPU (JAX preallocates most of the device memory), parses its
`torch_gpt2_124M_*` lines and reports flaxlab_ms / torch_ms. It is skipped (and said so)
without an NVIDIA GPU.
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

# Runnable as a plain script from any directory (the GPU machine has no editable install).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "gpt2_train_step.json")
GPT2_VOCAB = 50257        # real GPT-2 vocabulary: random tokens are drawn below this
PADDED_VOCAB = 50304      # 50257 rounded up to a multiple of 64 (nanoGPT / the peer)
H100_BF16_PEAK = 989e12   # dense bf16 FLOP/s, H100 SXM (the peer's figure)
# GPT-2 small (12 x 768, 1024 positions, tied embeddings) with vocab 50304.
GPT2_SMALL_PARAMS = 124_475_904
GPT2_SMALL_PARAMS_NO_POS = 123_689_472

# Named configurations for --compare: overrides applied on top of the flags.
PRESETS: dict[str, dict] = {
    "base": {},                                              # exactly the flags
    "unrolled": {"scan_layers": False},                      # layers_0..layers_11
    "scan": {"scan_layers": True},
    "reference": {"attention_impl": "reference"},            # explicit matmuls + softmax
    "separate_qkv": {"fused_qkv": False},                    # query/key/value projections
    "remat_dots": {"remat_policy": "dots"},
    "remat_full": {"remat_policy": "full"},
    "float32": {"dtype": "float32"},
}
DEFAULT_COMPARE = ("base", "unrolled", "reference", "separate_qkv")


# ----------------------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "t", "yes", "y", "on"):
        return True
    if low in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="gpt2_small",
                   help="models.transformer.VARIANTS name (tiny: CPU smoke run)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=1024,
                   help="tokens per example fed to the model (the batch holds seq_len+1)")
    p.add_argument("--vocab", type=int, default=PADDED_VOCAB)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype (params are always float32)")
    p.add_argument("--attention_impl", default="fused", choices=("fused", "reference"))
    p.add_argument("--fused_qkv", type=_bool, nargs="?", const=True, default=True)
    p.add_argument("--scan_layers", type=_bool, nargs="?", const=True, default=None,
                   help="default: configs/gpt.py:gpt2_small's value (True)")
    p.add_argument("--remat_policy", default="none",
                   choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    p.add_argument("--num_batches", type=int, default=4,
                   help="distinct random batches on the device, used in turn")
    p.add_argument("--num_devices", type=int, default=0, help="0 = all (as the trainer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token data")
    p.add_argument("--peak_flops", type=float, default=H100_BF16_PEAK,
                   help="peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    p.add_argument("--compare", default="",
                   help="comma-separated configurations to run in one invocation, from "
                        f"{', '.join(PRESETS)}; 'all' = every one; 'default' = "
                        f"{','.join(DEFAULT_COMPARE)}. Empty: the flags' configuration only")
    p.add_argument("--peer", default="",
                   help="path to torch_peers.py: run its GPT-2 benchmark first (NVIDIA GPU only)")
    p.add_argument("--peer_python", default=sys.executable,
                   help="interpreter with PyTorch for the peer")
    p.add_argument("--peer_timeout", type=float, default=420.0, help="seconds")
    p.add_argument("--out", default=None,
                   help=f"JSON results path ('' = none; default {DEFAULT_OUT}, or none for "
                        "--dry_run so a dry run never replaces measured results)")
    p.add_argument("--dry_run", action="store_true",
                   help="build, count parameters, trace and lower the train step "
                        "(jax.eval_shape, jit.lower); no compilation, no execution")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "" if args.dry_run else DEFAULT_OUT
    for key in ("batch", "seq_len", "vocab", "steps", "windows", "num_batches"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step is the sanity check)")
    return args


def compare_names(spec: str) -> list[str]:
    if not spec:
        return ["base"]
    if spec == "all":
        return list(PRESETS)
    if spec == "default":
        return list(DEFAULT_COMPARE)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"--compare: unknown configuration(s) {unknown}; "
                         f"allowed: {', '.join(PRESETS)}, all, default")
    return names


# ----------------------------------------------------------------------------------------
# The run config and the trainer's pieces.
# ----------------------------------------------------------------------------------------
def model_settings(args, preset: dict) -> dict:
    """The model-section overrides of one configuration (flags, then the preset)."""
    s = {"dtype": args.dtype, "attention_impl": args.attention_impl,
         "fused_qkv": args.fused_qkv, "remat_policy": args.remat_policy}
    if args.scan_layers is not None:
        s["scan_layers"] = args.scan_layers
    s.update(preset)
    return s


def build_run_config(args, settings: dict):
    """configs/gpt.py:gpt2_small with the model section re-made for variant + settings."""
    from configs import gpt
    from models import transformer
    from train import config as config_lib, families

    c = gpt.get_config("gpt2_small")
    if args.variant not in transformer.VARIANTS:
        raise SystemExit(f"--variant={args.variant!r}; allowed: "
                         f"{', '.join(transformer.VARIANTS)}")
    overrides = dict(settings)
    overrides.setdefault("scan_layers", bool(c.model.scan_layers))
    max_length = max(transformer.VARIANTS[args.variant].get("max_length", 0), args.seq_len)
    c.model = families.model_section("transformer", args.variant, max_length=max_length,
                                     **overrides)
    c.data.batch_size = args.batch
    c.data.seq_len = args.seq_len
    c.sharding.num_devices = args.num_devices
    config_lib.validate(c)
    return c


class Setup:
    """Everything `train_and_evaluate` builds before its loop, for one configuration."""

    def __init__(self, args, settings: dict):
        from train import config as config_lib, optim, sharding, trainer
        from train import families
        from train.tasks import make_task
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.config = c = build_run_config(args, settings)
        self.mesh = mesh = sharding.mesh_from_config(c.sharding)
        self.batch_sh = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        self.model, self.model_cfg = families.build(c.model, "lm", vocab_size=args.vocab)
        # LanguageModelTask uses its datasets only in report() (after training).
        self.task = make_task(c, self.model, datasets=None)
        self.tx = optim.make_optimizer(c.optim, c.train.num_steps)
        init_key, train_key, _ = jax.random.split(jax.random.key(c.seed), 3)
        example = {"tokens": np.zeros((1, args.seq_len + 1), np.int32)}
        init_args, init_kwargs = self.task.init_args(example)
        self.init_state = trainer.make_init_state(self.model, self.tx, init_key, init_args,
                                                  init_kwargs)
        self.abstract_state = jax.eval_shape(self.init_state)
        self.state_sh = sharding.param_sharding(self.abstract_state, mesh, c.sharding.strategy,
                                                c.sharding.min_size_to_shard)
        self.train_step = trainer.make_train_step(self.task, self.tx, train_key, c.optim)
        self.p_train_step = jax.jit(self.train_step, in_shardings=(self.state_sh, self.batch_sh),
                                    out_shardings=(self.state_sh, replicated),
                                    donate_argnums=0)
        self.abstract_batch = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq_len + 1),
                                                              jnp.int32)}


# ----------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------
def count_params(abstract_params) -> tuple[int, int]:
    """(all parameters, parameters excluding the learned position table)."""
    total = pos = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        n = math.prod(leaf.shape)
        total += n
        if "positions" in jax.tree_util.keystr(path):
            pos += n
    return total, total - pos


def flops_per_token(n_no_pos: int, cfg, seq_len: int) -> int:
    """nanoGPT / PaLM: 6 N + 12 L H Q T (forward + backward, attention unmasked)."""
    head_dim = cfg.d_model // cfg.num_heads
    return 6 * n_no_pos + 12 * cfg.num_layers * cfg.num_heads * head_dim * seq_len


def check_gpt2_small_count(args, total: int, no_pos: int) -> str | None:
    """For the canonical shape, the count must be GPT-2 small's; returns a status line."""
    if args.variant != "gpt2_small" or args.vocab != PADDED_VOCAB or args.seq_len > 1024:
        return None
    if (total, no_pos) != (GPT2_SMALL_PARAMS, GPT2_SMALL_PARAMS_NO_POS):
        raise AssertionError(f"GPT-2 small parameter count {total:,} ({no_pos:,} without "
                             f"positions); expected {GPT2_SMALL_PARAMS:,} "
                             f"({GPT2_SMALL_PARAMS_NO_POS:,})")
    return (f"parameter count OK: {total:,} = GPT-2 small with vocab {PADDED_VOCAB} "
            f"({no_pos:,} without position embeddings)")


# ----------------------------------------------------------------------------------------
# The peer.
# ----------------------------------------------------------------------------------------
_PEER_DRIVER = textwrap.dedent("""
    import importlib.util, sys
    path, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import torch
    if not torch.cuda.is_available():
        print("peer_skipped torch sees no CUDA device"); sys.exit(0)
    spec = importlib.util.spec_from_file_location("torch_peers", path)
    peers = importlib.util.module_from_spec(spec); spec.loader.exec_module(peers)
    torch.backends.cuda.matmul.allow_tf32 = True   # as torch_peers.py's __main__
    torch.backends.cudnn.allow_tf32 = True
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    peers.bench_gpt(B=B, T=T)
""")
_PEER_LINE = re.compile(r"^(torch_gpt2_124M_(?:step_ms|tokens_per_s|mfu))\s+([0-9.eE+-]+)")


def nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def run_peer(args) -> dict:
    """Run the peer's GPT-2 benchmark in a subprocess; its parsed figures or why not."""
    out = {"path": args.peer, "batch": args.batch, "seq_len": args.seq_len}
    if args.variant != "gpt2_small":
        return {**out, "skipped": "the peer is GPT-2 small only (--variant=gpt2_small)"}
    if not os.path.exists(args.peer):
        return {**out, "skipped": f"{args.peer} does not exist"}
    if not nvidia_gpu_present():
        return {**out, "skipped": "no NVIDIA GPU on this machine"}
    print(f"peer: running bench_gpt(B={args.batch}, T={args.seq_len}) of {args.peer} ...",
          flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([args.peer_python, "-c", _PEER_DRIVER, args.peer,
                               str(args.batch), str(args.seq_len)],
                              capture_output=True, text=True, timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        return {**out, "skipped": f"timed out after {args.peer_timeout:.0f} s"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["stdout"] = proc.stdout[-4000:]
    for line in proc.stdout.splitlines():
        print(f"  peer| {line}")
        m = _PEER_LINE.match(line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
        if line.startswith("torch "):
            out["torch"] = line.strip()
        if line.startswith("peer_skipped"):
            out["skipped"] = line[len("peer_skipped "):]
    if proc.returncode != 0:
        out["skipped"] = f"exit code {proc.returncode}"
        out["stderr"] = proc.stderr[-4000:]
        print(textwrap.indent(proc.stderr[-2000:], "  peer! "))
    elif "torch_gpt2_124M_step_ms" not in out and "skipped" not in out:
        out["skipped"] = "no torch_gpt2_124M_step_ms line in its output"
    return out


# ----------------------------------------------------------------------------------------
# One configuration.
# ----------------------------------------------------------------------------------------
def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 -- informational only
        return None


def _memory(compiled, device) -> dict:
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
        # The allocator's peak is the process's so far (all earlier --compare runs too).
        for key in ("peak_bytes_in_use", "bytes_limit"):
            if key in stats:
                out["process_" + key] = int(stats[key])
    except Exception:  # noqa: BLE001
        pass
    return out


def attention_kernel(hlo_text: str, settings: dict) -> str:
    if "__cudnn$fmha" in hlo_text or "cudnn$fmha" in hlo_text:
        return "cudnn"
    return "xla" if settings["attention_impl"] == "fused" else "reference"


def random_batches(args, setup: Setup) -> list:
    from train import sharding
    rng = np.random.default_rng(args.seed)
    high = min(args.vocab, GPT2_VOCAB)
    return [sharding.shard_batch(
        {"tokens": rng.integers(0, high, (args.batch, args.seq_len + 1), dtype=np.int32)},
        setup.mesh) for _ in range(args.num_batches)]


def run_config(args, name: str, settings: dict) -> dict:
    device = jax.devices()[0]
    setup = Setup(args, settings)
    cfg = setup.model_cfg
    total, no_pos = count_params(setup.abstract_state["params"])
    fpt = flops_per_token(no_pos, cfg, args.seq_len)
    tokens = args.batch * args.seq_len
    result = {
        "name": name,
        "settings": {**settings, "scan_layers": cfg.scan_layers},
        "model": {"variant": args.variant, "num_layers": cfg.num_layers,
                  "num_heads": cfg.num_heads, "d_model": cfg.d_model, "mlp_dim": cfg.mlp_dim,
                  "vocab_size": cfg.vocab_size, "max_length": cfg.max_length,
                  "dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
        "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "params": total, "params_no_position": no_pos, "flops_per_token": fpt,
        "flops_per_step": fpt * tokens,
    }
    check = check_gpt2_small_count(args, total, no_pos)
    if check:
        result["param_check"] = check

    if args.dry_run:
        t0 = time.perf_counter()
        new_state, scalars = jax.eval_shape(setup.train_step, setup.abstract_state,
                                            setup.abstract_batch)
        assert jax.tree.structure(new_state) == jax.tree.structure(setup.abstract_state)
        # Lowering (no compilation) also checks the jit shardings and donation, and shows
        # which attention kernel the step would use on this backend.
        lowered = setup.p_train_step.lower(setup.abstract_state, setup.abstract_batch)
        result["trace_s"] = time.perf_counter() - t0
        result["attention_kernel"] = attention_kernel(lowered.as_text(), settings)
        result["dry_run"] = True
        result["scalars"] = sorted(scalars)
        return result

    batches = random_batches(args, setup)
    state = jax.jit(setup.init_state, out_shardings=setup.state_sh)()
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    lowered = setup.p_train_step.lower(state, batches[0])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result["lower_s"], result["compile_s"] = t1 - t0, t2 - t1
    hlo = lowered.as_text()
    try:
        hlo += compiled.as_text()
    except Exception:  # noqa: BLE001
        pass
    result["attention_kernel"] = attention_kernel(hlo, settings)
    result["xla_cost_flops_per_step"] = _cost_flops(compiled)
    del hlo, lowered

    # Warm-up; the first step's loss is the sanity check (random tokens: ~ln(vocab)).
    probe = jax.tree.leaves(state["params"])[0]
    t0 = time.perf_counter()
    state, scalars = compiled(state, batches[0])
    first = jax.device_get(scalars)
    result["first_step_s"] = time.perf_counter() - t0
    result["state_donated"] = bool(probe.is_deleted())
    del probe
    for i in range(1, args.warmup):
        state, scalars = compiled(state, batches[i % args.num_batches])
    jax.block_until_ready((state, scalars))
    result["first_loss"] = float(first["loss"])

    window_ms = []
    i = args.warmup
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, scalars = compiled(state, batches[i % args.num_batches])
            i += 1
        jax.block_until_ready((state, scalars))
        window_ms.append((time.perf_counter() - t0) / args.steps * 1e3)

    last = jax.device_get(scalars)
    result["last_loss"] = float(last["loss"])
    result["nonfinite_step"] = int(state["nonfinite_step"])
    result["steps_run"] = int(state["step"])
    med = statistics.median(window_ms)
    result.update({
        "window_ms": window_ms,
        "ms_median": med, "ms_mean": statistics.fmean(window_ms), "ms_min": min(window_ms),
        "ms_max": max(window_ms),
        "spread_pct": (max(window_ms) - min(window_ms)) / med * 100,
        "tokens_per_s": tokens / (med / 1e3),
        "mfu": fpt * tokens / (med / 1e3) / args.peak_flops,
        "memory": _memory(compiled, device),
    })
    if not (math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])):
        result["warning"] = "non-finite loss"
    del state, scalars, batches, compiled
    return result


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
def environment(args) -> dict:
    import flax
    import optax
    device = jax.devices()[0]
    env = {
        "device": getattr(device, "device_kind", str(device)), "platform": device.platform,
        "num_devices": len(jax.devices()), "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "peak_flops": args.peak_flops,
    }
    try:
        from jax._src.lib import cuda_versions  # noqa: PLC0415 -- private, best effort
        if cuda_versions is not None:
            env["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001
        pass
    return env


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def format_table(report: dict) -> str:
    env, peer = report["environment"], report.get("peer")
    lines = [f"flaxlab GPT-2 train step ({report['variant']}, B={report['batch']}, "
             f"T={report['seq_len']}, vocab {report['vocab']}) on {env['device']} "
             f"[{env['platform']}], jax {env['jax']}, flax {env['flax']}; "
             f"MFU peak {env['peak_flops']:.3g} FLOP/s"]
    r0 = report["results"][0]
    lines.append(f"params {r0['params']:,} ({r0['params_no_position']:,} without position "
                 f"embeddings); {r0['flops_per_token'] / 1e6:.1f} MFLOP/token (6N+12LHQT)")
    if r0.get("param_check"):
        lines.append(r0["param_check"])
    if report.get("dry_run"):
        for r in report["results"]:
            lines.append(f"[dry run] {r['name']}: train step traced and lowered in "
                         f"{r['trace_s']:.1f} s, attention {r['attention_kernel']} "
                         f"(scalars: {', '.join(r['scalars'])}); {r['settings']}")
        return "\n".join(lines)
    torch_ms = (peer or {}).get("torch_gpt2_124M_step_ms")
    head = (f"{'config':<13} {'attn':<9} {'qkv':<5} {'scan':<5} {'remat':<6} {'dtype':<8} "
            f"{'ms med':>8} {'ms mean':>8} {'ms min':>8} {'spread':>6} {'tok/s':>9} "
            f"{'MFU%':>5} {'compile':>7} {'temp GiB':>8} {'loss0':>6} {'lossN':>6}")
    if torch_ms:
        head += f" {'/torch':>6}"
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        s, mem = r["settings"], r["memory"].get("temp_size_in_bytes")
        row = (f"{r['name']:<13} {r['attention_kernel']:<9} "
               f"{'fused' if s['fused_qkv'] else 'sep':<5} {str(s['scan_layers']):<5} "
               f"{s['remat_policy']:<6} {s['dtype']:<8} {r['ms_median']:8.2f} "
               f"{r['ms_mean']:8.2f} {r['ms_min']:8.2f} {r['spread_pct']:5.1f}% "
               f"{r['tokens_per_s']:9.0f} {r['mfu'] * 100:5.1f} "
               f"{r['lower_s'] + r['compile_s']:6.1f}s "
               f"{(mem / 2**30 if mem else float('nan')):8.2f} {r['first_loss']:6.3f} "
               f"{r['last_loss']:6.3f}")
        if torch_ms:
            row += f" {r['ms_median'] / torch_ms:6.2f}"
        lines.append(row)
        if r.get("warning"):
            lines.append(f"  WARNING {r['name']}: {r['warning']}")
        if not r.get("state_donated", True):
            lines.append(f"  WARNING {r['name']}: the train state was not donated")
        if (env["platform"] == "gpu" and s["attention_impl"] == "fused"
                and s["dtype"] != "float32" and r["attention_kernel"] != "cudnn"):
            lines.append(f"  WARNING {r['name']}: fused attention fell back to XLA (no cuDNN)")
    if peer:
        if torch_ms:
            lines.append(f"torch peer: {torch_ms:.1f} ms/step, "
                         f"{peer.get('torch_gpt2_124M_tokens_per_s', float('nan')):.0f} tok/s, "
                         f"MFU {peer.get('torch_gpt2_124M_mfu', float('nan')):.1f}% "
                         f"({peer.get('torch', 'torch')}); /torch = flaxlab median / torch "
                         "(the peer times one 30-step window, mean)")
        else:
            lines.append(f"torch peer skipped: {peer.get('skipped')}")
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = compare_names(args.compare)
    # The peer runs before JAX initializes its backend: JAX preallocates most of the GPU.
    peer = run_peer(args) if args.peer and not args.dry_run else None

    report = {
        "benchmark": "gpt2_train_step",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(
            sys.argv[1:] if argv is None else argv)),
        "variant": args.variant, "batch": args.batch, "seq_len": args.seq_len,
        "vocab": args.vocab, "steps": args.steps, "windows": args.windows,
        "warmup": args.warmup, "dry_run": args.dry_run,
        "environment": environment(args),
        "results": [],
    }
    if peer is not None:
        report["peer"] = peer
    for name in names:
        settings = model_settings(args, PRESETS[name])
        print(f"[{name}] {settings} ...", flush=True)
        try:
            result = run_config(args, name, settings)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 -- one failing configuration (e.g. OOM)
            if len(names) == 1:
                raise
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
            report.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[:2000]}"
            continue
        finally:
            gc.collect()
        report["results"].append(result)
        if args.out:  # after every configuration: a run cut off by a time limit keeps these
            write_json(args.out, report)
        if not args.dry_run:
            print(f"[{name}] {result['ms_median']:.2f} ms/step (median of {args.windows} x "
                  f"{args.steps}), compile {result['lower_s'] + result['compile_s']:.1f} s, "
                  f"attention {result['attention_kernel']}", flush=True)
    if peer is not None:
        torch_ms = peer.get("torch_gpt2_124M_step_ms")
        if torch_ms:
            for r in report["results"]:
                r["ratio_to_torch"] = r["ms_median"] / torch_ms
                r["ratio_to_torch_mean"] = r["ms_mean"] / torch_ms
    if not report["results"]:
        raise SystemExit(f"every configuration failed: {report.get('failed')}")
    print()
    print(format_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
