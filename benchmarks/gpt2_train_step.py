"""GPT-2 small training-step benchmark: the train step `train.main` runs, timed on one device.

    python benchmarks/gpt2_train_step.py                        # GPT-2 small, B=16, T=1024
    python benchmarks/gpt2_train_step.py --variant=tiny --batch=8 --seq_len=64 --steps=5
    python benchmarks/gpt2_train_step.py --dry_run              # shapes + parameter count only
    python benchmarks/gpt2_train_step.py --compare=base,unrolled,reference

What is timed is built exactly as `train.trainer.train_and_evaluate` builds it for
`configs/gpt.py:gpt2_small`: the run config from `configs.gpt.get_config("gpt2_small")`
(AdamW, weight decay 0.1 with its exclusion mask, grad clip 1.0, warmup-cosine schedule),
`LanguageModelTask.loss_fn`, `trainer.make_init_state` / `task.make_train_step`, and
`jax.jit` with the trainer's shardings and `donate_argnums=0`. Only the model section is
changed by the flags (variant, compute dtype, attention implementation, fused QKV, scan,
remat) and the vocabulary is 50304 (GPT-2's 50257 padded to a multiple of 64, as the
PyTorch peer does); params stay float32. Batches are random tokens in [0, 50257), several
distinct ones placed on the device before timing and used in turn.

Timing, the peer subprocess, the environment and the JSON/table plumbing are
`benchmarks/harness.py`'s (shared by all benchmarks; the method: benchmarks/README.md).

MFU uses nanoGPT's count: flops per token = 6 N + 12 L H Q T, with N the parameters
excluding the position embeddings, L layers, H heads, Q head dim, T sequence length;
MFU = flops per token * tokens per second / --peak_flops (989e12: H100 dense bf16).

The PyTorch peer (benchmarks/peers/gpt.py: the same model, nanoGPT style, torch.compile,
SDPA flash attention, bf16 autocast, fused AdamW) runs first in a subprocess on a machine
with an NVIDIA GPU (`--peer_device=cpu` runs it on the CPU, `--peer=''` not at all); the
table's `x torch` is its ms per step over flaxlab's (> 1: flaxlab is faster).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Runnable as a plain script from any directory, without `pip install -e .`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402 -- timing, peer, reports

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "gpt2_train_step.json")
GPT2_VOCAB = 50257        # real GPT-2 vocabulary: random tokens are drawn below this
PADDED_VOCAB = 50304      # 50257 rounded up to a multiple of 64 (nanoGPT / the peer)
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
    p.add_argument("--fused_qkv", type=harness.bool_flag, nargs="?", const=True, default=True)
    p.add_argument("--scan_layers", type=harness.bool_flag, nargs="?", const=True, default=None,
                   help="default: configs/gpt.py:gpt2_small's value (True)")
    p.add_argument("--remat_policy", default="none",
                   choices=("none", "full", "dots", "dots_no_batch"))
    harness.add_timing_flags(p)
    p.add_argument("--num_devices", type=int, default=0, help="0 = all (as the trainer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token data")
    p.add_argument("--peak_flops", type=float, default=harness.H100_BF16_PEAK,
                   help="peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    p.add_argument("--compare", default="",
                   help="comma-separated configurations to run in one invocation, from "
                        f"{', '.join(PRESETS)}; 'all' = every one; 'default' = "
                        f"{','.join(DEFAULT_COMPARE)}. Empty: the flags' configuration only")
    harness.add_peer_flags(p, "gpt")
    p.add_argument("--peer_mode", default="compile", choices=("compile", "eager"),
                   help="the peer's model: torch.compile'd (nanoGPT's) or eager")
    p.add_argument("--out", default=None,
                   help=f"JSON results path ('' = none; default {DEFAULT_OUT}, or none for "
                        "--dry_run so a dry run never replaces measured results)")
    p.add_argument("--dry_run", action="store_true",
                   help="build, count parameters, trace and lower the train step "
                        "(jax.eval_shape, jit.lower); no compilation, no execution")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "" if args.dry_run else DEFAULT_OUT
    harness.require_at_least(p, args, ("batch", "seq_len", "vocab", "steps", "windows",
                                       "num_batches"))
    harness.require_at_least(p, args, ("warmup",),
                             why=" (the first step is the sanity check)")
    return args


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


def build_run_config(args, settings: dict, sharding_overrides: dict | None = None):
    """configs/gpt.py:gpt2_small with the model section re-made for variant + settings
    (and config.sharding updated by `sharding_overrides`)."""
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
    c.data[c.data.source].seq_len = args.seq_len   # the source's own section
    c.sharding.num_devices = args.num_devices
    c.sharding.update(sharding_overrides or {})
    config_lib.validate(c)
    return c


class Setup:
    """Everything `train_and_evaluate` builds before its loop, for one configuration."""

    def __init__(self, args, settings: dict, sharding_overrides: dict | None = None):
        from train import families, sharding, trainer
        from train.tasks import make_task
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.config = c = build_run_config(args, settings, sharding_overrides)
        self.mesh = mesh = sharding.mesh_from_config(c.sharding)
        self.batch_sh = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        self.model, self.model_cfg = families.build(c.model, "lm", vocab_size=args.vocab)
        # LanguageModelTask uses its datasets only in report() (after training).
        self.task = make_task(c, self.model, None)
        self.tx = self.task.make_optimizer(c.optim, c.train.num_steps)
        init_key, train_key, _ = jax.random.split(jax.random.key(c.seed), 3)
        example = {"tokens": np.zeros((1, args.seq_len + 1), np.int32)}
        init_args, init_kwargs = self.task.init_args(example)
        self.init_state = trainer.make_init_state(self.model, self.tx, init_key, init_args,
                                                  init_kwargs)
        self.abstract_state = jax.eval_shape(self.init_state)
        logical_params = jax.eval_shape(lambda: self.model.init(
            {"params": init_key, "dropout": init_key}, *init_args, **init_kwargs))["params"]
        self.state_sh = sharding.state_sharding(self.abstract_state, mesh, c.sharding,
                                                logical_params)
        # The trainer traces its step inside the sharding rules (activation constraints).
        self.rules = lambda: sharding.use_rules(mesh, c.sharding)
        self.train_step = self.task.make_train_step(self.tx, train_key, c.optim)
        self.p_train_step = jax.jit(self.train_step, in_shardings=(self.state_sh, self.batch_sh),
                                    out_shardings=(self.state_sh, replicated),
                                    donate_argnums=0)
        self.abstract_batch = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq_len + 1),
                                                              np.int32)}


# ----------------------------------------------------------------------------------------
# Counting, and the PyTorch peer's figures.
# ----------------------------------------------------------------------------------------
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


def run_peer(args) -> dict | None:
    """Run benchmarks/peers/gpt.py's train step at this shape (--peer_mode: torch.compile
    by default); its parsed figures, or why not (None: --peer='')."""
    if args.variant not in ("gpt2_small", "tiny"):
        return {"skipped": "the peer has the gpt2_small and tiny sizes only"}
    return harness.run_peer(
        args, ["train", f"--size={args.variant}", f"--batch={args.batch}",
               f"--seq_len={args.seq_len}", f"--vocab={args.vocab}", f"--mode={args.peer_mode}",
               f"--steps={args.steps}", f"--windows={args.windows}",
               f"--peak_flops={args.peak_flops}"],
        prefix="torch_gpt_", required=peer_metric(args, "step_ms"),
        record={"batch": args.batch, "seq_len": args.seq_len, "mode": args.peer_mode})


def peer_metric(args, what: str) -> str:
    return f"torch_gpt_{args.peer_mode}_{what}"


# ----------------------------------------------------------------------------------------
# One configuration.
# ----------------------------------------------------------------------------------------
def random_batches(args, setup: Setup) -> list:
    from train import sharding
    rng = np.random.default_rng(args.seed)
    high = min(args.vocab, GPT2_VOCAB)
    return [sharding.shard_batch(
        {"tokens": rng.integers(0, high, (args.batch, args.seq_len + 1), dtype=np.int32)},
        setup.mesh) for _ in range(args.num_batches)]


def run_config(args, name: str) -> dict:
    """Build, count, then trace (--dry_run) or compile, warm up and time one preset."""
    settings = model_settings(args, PRESETS[name])
    print(f"[{name}] {settings} ...", flush=True)
    setup = Setup(args, settings)
    cfg = setup.model_cfg
    total, no_pos = harness.count_params(setup.abstract_state.params, exclude="positions")
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
        with setup.rules():
            lowered = setup.p_train_step.lower(setup.abstract_state, setup.abstract_batch)
        result["trace_s"] = time.perf_counter() - t0
        result["attention_kernel"] = harness.attention_kernel(lowered.as_text(),
                                                               settings["attention_impl"])
        result.update(dry_run=True, scalars=sorted(scalars))
        return result

    batches = random_batches(args, setup)
    state = jax.jit(setup.init_state, out_shardings=setup.state_sh)()
    jax.block_until_ready(state)

    with setup.rules():
        lowered, compiled, times = harness.lower_and_compile(setup.p_train_step, state,
                                                             batches[0])
    result.update(times)
    result["attention_kernel"] = harness.attention_kernel(harness.hlo_text(lowered, compiled),
                                                          settings["attention_impl"])
    result["xla_cost_flops_per_step"] = harness.cost_flops(compiled)
    del lowered

    # Warm-up; the first step's loss is the sanity check (random tokens: ~ln(vocab)).
    state, scalars, first, info = harness.warm_up(compiled, state, batches, args.warmup,
                                                  probe=jax.tree.leaves(state.params)[0])
    result.update(info)
    result["first_loss"] = float(first["loss"])
    state, scalars, window_ms = harness.time_windows(compiled, state, batches,
                                                     windows=args.windows, steps=args.steps,
                                                     start=args.warmup)

    result["last_loss"] = float(jax.device_get(scalars)["loss"])
    result["nonfinite_step"] = int(state.nonfinite_step)
    result["steps_run"] = int(state.step)
    stats = harness.window_stats(window_ms)
    med = stats["ms_median"]
    result.update({
        **stats,
        "tokens_per_s": tokens / (med / 1e3),
        "mfu": harness.mfu(fpt * tokens, med, args.peak_flops),
        "memory": harness.memory_report(compiled, jax.devices()[0]),
    })
    if not (math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])):
        result["warning"] = "non-finite loss"
    del state, scalars, batches, compiled
    print(f"[{name}] {med:.2f} ms/step (median of {args.windows} x {args.steps}), compile "
          f"{result['lower_s'] + result['compile_s']:.1f} s, attention "
          f"{result['attention_kernel']}", flush=True)
    return result


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    env, peer = report["environment"], report.get("peer") or {}
    lines = [f"flaxlab GPT-2 train step ({report['variant']}, B={report['batch']}, "
             f"T={report['seq_len']}, vocab {report['vocab']}) on {env['device']} "
             f"[{env['platform']}], jax {env['jax']}, flax {env['flax']}; "
             f"MFU peak {env['peak_flops']:.3g} FLOP/s"]
    r0 = report["results"][0]
    lines.append(f"params {r0['params']:,} ({r0['params_no_position']:,} without position "
                 f"embeddings); {r0['flops_per_token'] / 1e6:.1f} MFLOP/token (6N+12LHQT)")
    if r0.get("param_check"):
        lines.append(r0["param_check"])
    mode = peer.get("mode", "compile")
    torch_ms = peer.get(f"torch_gpt_{mode}_step_ms")
    lines += harness.train_step_rows(
        report, ("tok/s", "9.0f", "tokens_per_s"),
        (lambda r: torch_ms / r["ms_median"]) if torch_ms else None)
    if report.get("dry_run"):
        return "\n".join(lines)
    if torch_ms:
        lines.append(f"torch peer ({mode}, {peer.get('device')}): {torch_ms:.1f} ms/step, "
                     f"{peer.get(f'torch_gpt_{mode}_tokens_per_s', float('nan')):.0f} tok/s, "
                     f"MFU {peer.get(f'torch_gpt_{mode}_mfu', float('nan')):.1f}% "
                     f"({peer.get('torch', 'torch')}); x torch = torch ms / flaxlab ms "
                     "(tokens/s ratio; > 1: flaxlab faster), both medians of their windows")
    elif peer:
        lines.append(f"torch peer skipped: {peer.get('skipped')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = harness.select(args.compare, PRESETS, DEFAULT_COMPARE)
    # The peer runs before JAX initializes its backend: JAX preallocates most of the GPU.
    peer = None if args.dry_run else run_peer(args)

    report = harness.new_report(
        "gpt2_train_step", argv,
        variant=args.variant, batch=args.batch, seq_len=args.seq_len, vocab=args.vocab,
        steps=args.steps, windows=args.windows, warmup=args.warmup, dry_run=args.dry_run,
        environment=harness.environment(args.peak_flops), results=[])
    if peer is not None:
        report["peer"] = peer
    harness.run_each(names, lambda name: run_config(args, name), report, args.out)
    torch_ms = (peer or {}).get(peer_metric(args, "step_ms"))
    if torch_ms:
        for r in report["results"]:
            r["speedup_vs_torch"] = torch_ms / r["ms_median"]
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
