"""CLIP ViT-B/16 training-step benchmark: the train step `train.main` runs, timed on one device.

    python benchmarks/clip_train_step.py                       # ViT-B/16 towers, B=256, + peer
    python benchmarks/clip_train_step.py --towers=tiny --batch=8 --dtype=float32 --steps=2 \
        --windows=2 --warmup=1 --peer_device=cpu             # CPU smoke run (seconds)
    python benchmarks/clip_train_step.py --dry_run --compare=all   # count, trace, lower only

What is timed is built exactly as `train.trainer.train_and_evaluate` builds it for
`configs/clip.py` (CLIP, Radford et al. 2021): `configs.clip.get_config("default")` (AdamW,
weight decay 0.1 with its exclusion mask, grad clip 1.0, warmup-cosine schedule),
`ContrastiveTask.loss_fn` (InfoNCE, learnable temperature), `trainer.make_init_state`,
`task.make_train_step`, `jax.jit` with the trainer's shardings and a donated state. The
model section is re-made with the towers of `--towers` (both pre-LN, exact GELU,
LayerNorm eps 1e-5, CLIP's LayerNorm before the image encoder: `vit.pre_norm`):

  b16   open_clip's ViT-B-16 (model_configs/ViT-B-16.json): ViT-B/16 at 224 (12 x 768,
        12 heads, MLP 3072, class token, learned positions); text 12 x 512, 8 heads, MLP
        2048, context 77, vocabulary 49408, causal, pooled at end-of-text (49407); embed 512;
  tiny  configs/clip.py's default sizes (ViT tiny/4 on 32x32, 2 x 64; text 2 x 32,
        context 16, vocabulary 260; embed 64): CPU smoke runs.

The flags set both towers' compute dtype (params stay float32), attention, fused QKV (on
by default like open_clip's in_proj; the config's default is separate), scan and remat.
flaxlab's patch embedding has a bias that open_clip's conv1 lacks: 149,621,505 parameters
against open_clip's 149,620,737 (both asserted via the closed form `param_count`). Inputs
are synthetic, `--num_batches` device batches used in turn: images uniform in [0, 1) (the
shapes images' range), captions laid out as open_clip's tokenizer does.

MFU counts matmul FLOPs analytically (`forward_flops`: 2 x multiply-adds of the patch
embedding, every block's projections, MLP and unmasked attention, the output projections,
both towers; a step is 3 x forward). For ViT-B/16 that forward count is open_clip's
published 41.09 GFLOP per sample (docs/model_profile.csv; asserted). The loss's B x B
similarity matmul is left out (< 0.01%).

The PyTorch peer (benchmarks/peers/clip.py: open_clip's model and ClipLoss when importable,
else the same architecture written out; torch.compile, bf16 autocast, fused AdamW) runs
first in a subprocess where there is an NVIDIA GPU (`--peer_device=cpu`: on the CPU, eager;
`--peer=''`: none); `x torch` = flaxlab's samples/s / the peer's. Target: >= 1.2x open_clip.
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

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "clip_train_step.json")
# Tower sizes (benchmarks/peers/clip.py's TOWERS is the same table, torch side); the
# dicts are TransformerConfig fields.
TOWERS: dict[str, dict] = {
    "b16": dict(variant="clip_b16", image_size=224, patch=16, context=77, vocab=49408,
                embed=512, image=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
                text=dict(d_model=512, num_layers=12, num_heads=8, mlp_dim=2048)),
    "tiny": dict(variant="clip_tiny", image_size=32, patch=4, context=16, vocab=260,
                 embed=64, image=dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256),
                 text=dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64)),
}
CHANNELS = 3
OPEN_CLIP_B16_PARAMS = 149_620_737  # open_clip ViT-B-16: flaxlab's b16 less the patch bias
OPEN_CLIP_B16_GFLOPS = 41.09        # open_clip docs/model_profile.csv, forward per sample
TARGET_SPEEDUP = 1.2                # the issue: >= 1.2x open_clip's samples/s

PRESETS: dict[str, dict] = {
    "base": {},                                              # exactly the flags
    "scan": {"scan_layers": True},
    "unrolled": {"scan_layers": False},                      # the config's default
    "reference": {"attention_impl": "reference"},            # explicit matmuls + softmax
    "separate_qkv": {"fused_qkv": False},                    # query/key/value projections
    "remat_dots": {"remat_policy": "dots"},
    "remat_full": {"remat_policy": "full"},
    "float32": {"dtype": "float32"},
}
DEFAULT_COMPARE = ("base", "scan", "reference", "separate_qkv")


# ----------------------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--towers", default="b16", choices=tuple(TOWERS),
                   help="b16: open_clip's ViT-B-16 sizes; tiny: CPU smoke runs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0, help="0 = the towers' (224 | 32)")
    p.add_argument("--patch", type=int, default=0, help="0 = the towers' (16 | 4)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype of both towers (params are always float32)")
    p.add_argument("--attention_impl", default="fused", choices=("fused", "reference"))
    p.add_argument("--fused_qkv", type=harness.bool_flag, nargs="?", const=True, default=True)
    p.add_argument("--scan_layers", type=harness.bool_flag, nargs="?", const=True, default=None,
                   help="default: configs/clip.py's value (False)")
    p.add_argument("--remat_policy", default="none",
                   choices=("none", "full", "dots", "dots_no_batch"))
    harness.add_timing_flags(p)
    p.add_argument("--num_devices", type=int, default=1,
                   help="data-parallel devices (1: one chip, as the peer; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batches")
    p.add_argument("--peak_flops", type=float, default=harness.H100_BF16_PEAK,
                   help="peak FLOP/s for MFU (H100 / H200 dense bf16: 989e12)")
    p.add_argument("--compare", default="",
                   help="comma-separated configurations to run in one invocation, from "
                        f"{', '.join(PRESETS)}; 'all' = every one; 'default' = "
                        f"{','.join(DEFAULT_COMPARE)}. Empty: the flags' configuration only")
    harness.add_peer_flags(p, "clip")
    p.add_argument("--peer_mode", default="auto", choices=("auto", "compile", "eager"),
                   help="auto: torch.compile on a GPU, eager on the CPU")
    p.add_argument("--peer_impl", default="auto", choices=("auto", "open_clip", "equivalent"),
                   help="auto: open_clip where importable, else the equivalent module")
    p.add_argument("--peer_threads", type=int, default=0,
                   help="the peer's CPU threads (0: torch's default, every core)")
    p.add_argument("--out", default=None,
                   help=f"JSON results path ('' = none; default {DEFAULT_OUT}, or none for "
                        "--dry_run so a dry run never replaces measured results)")
    p.add_argument("--dry_run", action="store_true",
                   help="build, count parameters, trace and lower the train step "
                        "(jax.eval_shape, jit.lower); no compilation, no execution")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "" if args.dry_run else DEFAULT_OUT
    harness.require_at_least(p, args, ("steps", "windows", "num_batches"))
    harness.require_at_least(p, args, ("batch",), low=2,
                             why=" (a contrastive loss needs negatives)")
    harness.require_at_least(p, args, ("warmup",),
                             why=" (the first step is the sanity check)")
    t = TOWERS[args.towers]
    args.image_size, args.patch = args.image_size or t["image_size"], args.patch or t["patch"]
    # The nested ViT config checks the patch against its variant's own image size too.
    for size in {args.image_size, t["image_size"]}:
        if args.patch <= 0 or size % args.patch:
            p.error(f"--patch={args.patch} must divide the image size {size} (--image_size "
                    f"and the {args.towers} towers' {t['image_size']})")
    return args


# ----------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------
def _block_params(d: int, mlp: int) -> int:
    """One pre-LN block: QKV + output projections with biases (4 d^2 + 4 d), MLP
    (2 d mlp + mlp + d), two LayerNorms (4 d)."""
    return 4 * d * d + 2 * d * mlp + 9 * d + mlp


def param_count(t: dict, image_size: int, patch: int) -> dict:
    """The closed form of ClipModel's parameter count for the towers `t`."""
    w, e, tokens = t["image"]["d_model"], t["embed"], (image_size // patch) ** 2 + 1
    image = (patch * patch * CHANNELS * w + w      # patch embedding kernel + bias
             + w + tokens * w + 2 * w              # class token, positions, pre-LayerNorm
             + t["image"]["num_layers"] * _block_params(w, t["image"]["mlp_dim"])
             + 2 * w + w * e)                      # final LayerNorm, projection
    d = t["text"]["d_model"]
    text = (t["vocab"] * d + t["context"] * d
            + t["text"]["num_layers"] * _block_params(d, t["text"]["mlp_dim"])
            + 2 * d + d * e)
    return {"image": image, "text": text, "total": image + text + 1}   # + logit scale


def _tower_flops(tokens: int, tower: dict) -> int:
    """Forward FLOPs (2 x multiply-adds) of a tower's blocks for one sample: QKV, output
    and MLP matmuls, 2 T d (4 d + 2 mlp), and attention QK^T + AV, 4 T^2 d (unmasked)."""
    d, mlp = tower["d_model"], tower["mlp_dim"]
    return tower["num_layers"] * (2 * tokens * d * (4 * d + 2 * mlp) + 4 * tokens ** 2 * d)


def forward_flops(t: dict, image_size: int, patch: int) -> dict:
    """Model forward FLOPs per sample, by tower (patch embedding and projections
    included; embedding lookups, norms and the loss are not)."""
    w, n = t["image"]["d_model"], (image_size // patch) ** 2
    image = (2 * n * patch * patch * CHANNELS * w + _tower_flops(n + 1, t["image"])
             + 2 * w * t["embed"])
    text = _tower_flops(t["context"], t["text"]) + 2 * t["text"]["d_model"] * t["embed"]
    return {"image": image, "text": text, "total": image + text}


def check_counts(args, total: int) -> dict:
    """The counts of this shape: the closed form (asserted against the model), and for
    ViT-B/16 at 224 open_clip's parameter count and published forward FLOPs."""
    t = TOWERS[args.towers]
    closed = param_count(t, args.image_size, args.patch)
    if total != closed["total"]:
        raise AssertionError(f"ClipModel has {total:,} parameters; the closed form says "
                             f"{closed['total']:,}")
    flops = forward_flops(t, args.image_size, args.patch)
    out = {"params_closed_form": closed, "forward_flops_per_sample": flops}
    if args.towers == "b16" and (args.image_size, args.patch) == (224, 16):
        gflops = flops["total"] / 1e9
        if total != OPEN_CLIP_B16_PARAMS + 768 or abs(gflops / OPEN_CLIP_B16_GFLOPS - 1) > 1e-3:
            raise AssertionError(f"b16: {total:,} parameters, {gflops:.3f} GFLOP/sample; "
                                 f"open_clip's ViT-B-16 + the patch bias: "
                                 f"{OPEN_CLIP_B16_PARAMS + 768:,}, {OPEN_CLIP_B16_GFLOPS}")
        out["open_clip_params"] = OPEN_CLIP_B16_PARAMS
        out["open_clip_gflops_per_sample"] = OPEN_CLIP_B16_GFLOPS
    return out


# ----------------------------------------------------------------------------------------
# The run config and the trainer's pieces.
# ----------------------------------------------------------------------------------------
def model_settings(args, preset: dict) -> dict:
    """The towers' overrides of one configuration (flags, then the preset)."""
    s = {"dtype": args.dtype, "attention_impl": args.attention_impl,
         "fused_qkv": args.fused_qkv, "remat_policy": args.remat_policy}
    if args.scan_layers is not None:
        s["scan_layers"] = args.scan_layers
    s.update(preset)
    return s


def build_run_config(args, settings: dict):
    """configs/clip.py's default with the model section re-made for the towers."""
    from configs import clip as clip_config
    from train import config as config_lib, families

    t = TOWERS[args.towers]
    c = clip_config.get_config("default")
    c.model = families.model_section(
        "clip", t["variant"], embed_dim=t["embed"], eos_id=t["vocab"] - 1,
        vit=dict(patch_size=args.patch, pre_norm=True,
                 encoder=dict(t["image"], norm_epsilon=1e-5, **settings)),
        text=dict(t["text"], max_length=t["context"], **settings))
    c.data.batch_size = args.batch
    c.sharding.num_devices = args.num_devices
    config_lib.validate(c)
    return c


def build_model(args, config):
    """(ClipModel, its ClipConfig) of the run config, with the fields train.main takes
    from the dataset (vocabulary, image size, channels)."""
    from train import families
    return families.build(config.model, "contrastive", vocab_size=TOWERS[args.towers]["vocab"],
                          image_size=args.image_size, channels=CHANNELS)


class Setup:
    """Everything `train_and_evaluate` builds before its loop, for one configuration."""

    def __init__(self, args, settings: dict):
        from jax.sharding import NamedSharding, PartitionSpec as P
        from train import sharding, trainer
        from train.tasks import make_task

        t = TOWERS[args.towers]
        self.config = c = build_run_config(args, settings)
        self.mesh = mesh = sharding.mesh_from_config(c.sharding)
        self.batch_sh = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        self.model, self.model_cfg = build_model(args, c)
        self.task = make_task(c, self.model, None)   # no datasets: training only
        self.tx = self.task.make_optimizer(c.optim, c.train.num_steps)
        init_key, train_key, _ = jax.random.split(jax.random.key(c.seed), 3)
        image_shape = (args.image_size, args.image_size, CHANNELS)
        example = {"image": np.zeros((1, *image_shape), np.float32),
                   "caption": np.zeros((1, t["context"]), np.int32)}
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
        self.abstract_batch = {
            "image": jax.ShapeDtypeStruct((args.batch, *image_shape), np.float32),
            "caption": jax.ShapeDtypeStruct((args.batch, t["context"]), np.int32)}


def random_batches(args, setup: Setup) -> list:
    """`--num_batches` device batches: images uniform in [0, 1); captions as open_clip's
    tokenizer lays them out (start-of-text vocab - 2, random ids in [1, vocab - 2), the
    end-of-text vocab - 1 at a random position in [2, L), zeros after; the peer's too)."""
    from train import sharding
    t = TOWERS[args.towers]
    rng, b, ctx, v = np.random.default_rng(args.seed), args.batch, t["context"], t["vocab"]
    out = []
    for _ in range(args.num_batches):
        ids = rng.integers(1, v - 2, (b, ctx), dtype=np.int32)
        eot = rng.integers(2, ctx, b)
        ids = np.where(np.arange(ctx)[None] < eot[:, None], ids, 0).astype(np.int32)
        ids[:, 0], ids[np.arange(b), eot] = v - 2, v - 1
        images = rng.random((b, args.image_size, args.image_size, CHANNELS), np.float32)
        out.append(sharding.shard_batch({"image": images, "caption": ids}, setup.mesh))
    return out


def cudnn_attention_calls(hlo: str) -> int:
    """cuDNN fused-attention calls in the compiled step's HLO (forward and backward, both
    towers; a scanned loop body counts once): 0 with cuDNN in neither tower."""
    return hlo.count('custom_call_target="__cudnn$fmha')


# ----------------------------------------------------------------------------------------
# One configuration.
# ----------------------------------------------------------------------------------------
def run_config(args, name: str) -> dict:
    """Build, count, then trace (--dry_run) or compile, warm up and time one preset."""
    settings = model_settings(args, PRESETS[name])
    print(f"[{name}] {settings} ...", flush=True)
    setup = Setup(args, settings)
    cfg = setup.model_cfg
    total, _ = harness.count_params(setup.abstract_state.params)
    counts = check_counts(args, total)
    flops_per_step = 3 * args.batch * counts["forward_flops_per_sample"]["total"]
    result = {
        "name": name, "settings": {**settings, "scan_layers": cfg.text.scan_layers},
        "model": {**TOWERS[args.towers], "towers": args.towers, "image_size": args.image_size,
                  "patch": args.patch, "eos_id": cfg.eos_id, "param_dtype": cfg.text.param_dtype},
        "batch": args.batch, "params": total, **counts, "flops_per_step": flops_per_step,
        "ln_batch": math.log(args.batch),
    }

    if args.dry_run:
        t0 = time.perf_counter()
        new_state, scalars = jax.eval_shape(setup.train_step, setup.abstract_state,
                                            setup.abstract_batch)
        assert jax.tree.structure(new_state) == jax.tree.structure(setup.abstract_state)
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
    hlo = harness.hlo_text(lowered, compiled)
    result["attention_kernel"] = harness.attention_kernel(hlo, settings["attention_impl"])
    result["cudnn_attention_calls"] = cudnn_attention_calls(hlo)
    result["xla_cost_flops_per_step"] = harness.cost_flops(compiled)
    del lowered

    # Warm-up; the first step's loss is the sanity check (random pairs: about ln B).
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
    result.update({**stats, "samples_per_s": args.batch / (med / 1e3),
                   "mfu": harness.mfu(flops_per_step, med, args.peak_flops),
                   "memory": harness.memory_report(compiled, jax.devices()[0])})
    if not (math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])):
        result["warning"] = "non-finite loss"
    del state, scalars, batches, compiled
    print(f"[{name}] {med:.2f} ms/step (median of {args.windows} x {args.steps}), "
          f"{result['samples_per_s']:.0f} samples/s, compile "
          f"{result['lower_s'] + result['compile_s']:.1f} s, attention "
          f"{result['attention_kernel']}", flush=True)
    return result


# ----------------------------------------------------------------------------------------
# The PyTorch peer.
# ----------------------------------------------------------------------------------------
def peer_mode(args) -> str:
    auto = "compile" if harness.peer_device(args.peer_device) == "cuda" else "eager"
    return auto if args.peer_mode == "auto" else args.peer_mode


def peer_metric(towers: str, mode: str, what: str) -> str:
    """The name of one of the peer's result lines (benchmarks/peers/clip.py)."""
    return f"torch_clip_{towers}_{mode}_{what}"


def run_peer(args) -> dict | None:
    """Run benchmarks/peers/clip.py's train step at this shape; its parsed figures and
    `impl` (open_clip <version> | equivalent), or why not (None: --peer='')."""
    mode = peer_mode(args)
    peer = harness.run_peer(
        args, ["train", f"--towers={args.towers}", f"--batch={args.batch}",
               f"--image_size={args.image_size}", f"--patch={args.patch}", f"--mode={mode}",
               f"--dtype={args.dtype}", f"--impl={args.peer_impl}", f"--steps={args.steps}",
               f"--windows={args.windows}", f"--warmup={args.warmup}",
               f"--num_batches={args.num_batches}", f"--seed={args.seed}"]
        + ([f"--threads={args.peer_threads}"] if args.peer_threads else []),
        prefix="torch_clip_", required=peer_metric(args.towers, mode, "samples_per_s"),
        record={"towers": args.towers, "batch": args.batch, "mode": mode})
    for line in (peer or {}).get("stdout", "").splitlines():
        if line.startswith("peer_impl "):
            peer["impl"] = line[len("peer_impl "):].strip()
    return peer


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    env, peer, r0 = report["environment"], report.get("peer") or {}, report["results"][0]
    fl = r0["forward_flops_per_sample"]
    # ViT-B/16 at 224 (check_counts): open_clip's published figures beside ours.
    oc_params, oc_flops = ((f"; open_clip ViT-B-16: {OPEN_CLIP_B16_PARAMS:,}, no patch bias",
                            f"; open_clip's: {OPEN_CLIP_B16_GFLOPS}")
                           if "open_clip_params" in r0 else ("", ""))
    lines = [f"flaxlab CLIP train step (towers {report['towers']}, {report['image_size']}/"
             f"{report['patch']}, B={report['batch']}) on {env['device']} [{env['platform']}], "
             f"jax {env['jax']}, flax {env['flax']}; MFU peak {env['peak_flops']:.3g} FLOP/s",
             f"params {r0['params']:,} (= the closed form{oc_params})",
             f"forward {fl['total'] / 1e9:.2f} GFLOP/sample (image {fl['image'] / 1e9:.2f} + "
             f"text {fl['text'] / 1e9:.2f}{oc_flops}); step = 3 x forward = "
             f"{r0['flops_per_step'] / 1e12:.2f} TFLOP"]
    towers, mode = report["towers"], peer.get("mode")
    torch_sps = peer.get(peer_metric(towers, mode, "samples_per_s"))
    lines += harness.train_step_rows(
        report, ("samples/s", "9.1f", "samples_per_s"),
        (lambda r: r["samples_per_s"] / torch_sps) if torch_sps else None)
    if report.get("dry_run"):
        return "\n".join(lines)
    if torch_sps:
        lines.append(f"torch peer ({peer.get('impl', '?')}, {mode}, {peer.get('device')}): "
                     f"{peer.get(peer_metric(towers, mode, 'step_ms'), 0):.2f} ms/step, "
                     f"{torch_sps:.1f} samples/s, {peer.get(f'torch_clip_{towers}_params', 0):,.0f}"
                     f" params ({peer.get('torch', 'torch')}); x torch = flaxlab samples/s / "
                     "torch samples/s, both medians of their windows")
        best = max(r["samples_per_s"] for r in report["results"]) / torch_sps
        if (towers == "b16" and str(peer.get("impl", "")).startswith("open_clip")
                and peer.get("device") == "cuda"):
            lines.append(f"target >= {TARGET_SPEEDUP}x open_clip: "
                         f"{'met' if best >= TARGET_SPEEDUP else 'NOT met'} ({best:.2f}x, "
                         "the best configuration)")
    elif peer:
        lines.append(f"torch peer skipped: {peer.get('skipped')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = harness.select(args.compare, PRESETS, DEFAULT_COMPARE)
    # The peer runs before JAX initializes its backend: JAX preallocates most of the GPU.
    peer = None if args.dry_run else run_peer(args)

    report = harness.new_report(
        "clip_train_step", argv, towers=args.towers, batch=args.batch,
        image_size=args.image_size, patch=args.patch, steps=args.steps, windows=args.windows,
        warmup=args.warmup, dry_run=args.dry_run,
        environment=harness.environment(args.peak_flops), results=[])
    if peer is not None:
        report["peer"] = peer
    harness.run_each(names, lambda name: run_config(args, name), report, args.out)
    torch_sps = (peer or {}).get(peer_metric(args.towers, peer_mode(args), "samples_per_s"))
    if torch_sps:
        for r in report["results"]:
            r["speedup_vs_torch"] = r["samples_per_s"] / torch_sps
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
