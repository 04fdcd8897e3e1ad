"""Greedy decoding with the KV cache: ms per token of bf16 vs int8 weight-only weights.

    python benchmarks/decode_step.py                       # GPT-2 small, batch 1, on a GPU
    python benchmarks/decode_step.py --variant=tiny --vocab=256 --prompt_len=8 \
        --new_tokens=4 --windows=2 --peer_device=cpu --peer_mode=eager   # CPU smoke run
    python benchmarks/decode_step.py --compare=bf16,int8 --batch=8
    python benchmarks/decode_step.py --variant=gpt2_medium   # 355M: 0.7 GB of bf16 a token

Batch-1 decoding is bound by memory bandwidth: each token reads every weight once, so
int8 weights (half of bf16's bytes) should decode up to twice as fast -- if the matmuls
read the int8 arrays themselves (models/compress/weight_only.py: int8 kernels + per-output
scales in the params, `dot_general(x, q.astype(x.dtype)) * s` in every matmul).

The model is configs/gpt.py:gpt2_small's (bf16 compute, fused attention, fused QKV) with
vocab 50304 and unrolled layers (`--scan_layers` to scan), its params the random init
(float32, std 0.02); every configuration decodes the same random prompt of --prompt_len
tokens:

  float32       float32 weights and compute (the reference)
  bf16          bfloat16 weights and compute
  int8          int8 weight-only (weight_only.weight_only_int8, impl "dot"), bf16 compute
  int8_reduce   the same weights, one-row matmuls as multiply + sum (impl "reduce")

Timing (harness.py's method): a window is a prefill of the prompt (the first token; not
timed), then --new_tokens calls of the jitted one-token step (`weight_only.decode_step`
+ argmax, the cache donated), timed up to `jax.block_until_ready`; --warmup untimed
windows first, --windows timed ones, the median is the headline. `--loop=generate` (or
both, the default) also times `models.decoding.generate` (the whole loop in one program):
its ms per token is (generate - prefill) / new_tokens, both medians.

Reported per configuration: ms per token, tokens/s (batch / ms), the parameter bytes one
step reads (`weight_only.bytes_per_token`: every kernel and the tied table whole, scales,
biases and norms, one row of the position table), the achieved GB/s of those reads, the
speedup over bf16, XLA's temp bytes of the compiled step and, for int8, how its int8
parameters are read (`weight_only.int8_operand_report`: inside the fusion that consumes
them, or first converted into a weight-sized float buffer), and whether its greedy tokens
equal bf16's.

The PyTorch peer (benchmarks/peers/decode.py: the same GPT, a KV cache, bf16 vs int8
weight-only by torchao / torch._weight_int8pack_mm / an explicit matmul, torch.compile)
runs first in a subprocess (--peer_device=cpu on the CPU, --peer='' not at all).
"""
from __future__ import annotations

import argparse
import functools
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

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "decode_step.json")
GPT2_VOCAB = 50257
PADDED_VOCAB = 50304
# name -> (weights, compute dtype, weight_only impl or None)
PRESETS = {"float32": ("float32", "float32", None), "bf16": ("bfloat16", "bfloat16", None),
           "int8": ("int8", "bfloat16", "dot"), "int8_reduce": ("int8", "bfloat16", "reduce")}
DEFAULT_COMPARE = ("bf16", "int8", "int8_reduce", "float32")
LOOPS = ("step", "generate", "both")
PEER_SIZES = ("tiny", "gpt2_small", "gpt2_medium")     # benchmarks/peers/decode.py's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="gpt2_small",
                   help="models.transformer.VARIANTS name (tiny: CPU smoke run)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128,
                   help="decoding steps per timed window (after the prompt's prefill)")
    p.add_argument("--vocab", type=int, default=PADDED_VOCAB)
    p.add_argument("--attention_impl", default="fused", choices=("fused", "reference"))
    p.add_argument("--fused_qkv", type=harness.bool_flag, nargs="?", const=True, default=True)
    p.add_argument("--scan_layers", type=harness.bool_flag, nargs="?", const=True,
                   default=False, help="scanned layers (one while loop over the stack)")
    p.add_argument("--loop", default="both", choices=LOOPS,
                   help="time the jitted per-token step, models.decoding.generate, or both")
    p.add_argument("--windows", type=int, default=5, help="timed windows")
    p.add_argument("--warmup", type=int, default=1, help="untimed windows first")
    p.add_argument("--seed", type=int, default=0, help="seed of the params and the prompt")
    p.add_argument("--compare", default="default",
                   help=f"comma-separated configurations from {', '.join(PRESETS)}; "
                        f"'all'; 'default' = {','.join(DEFAULT_COMPARE)}")
    harness.add_peer_flags(p, "decode")
    p.add_argument("--peer_mode", default="compile",
                   choices=("eager", "compile", "reduce-overhead"),
                   help="the peer's model: eager, torch.compile'd, or with CUDA graphs")
    p.add_argument("--peer_int8_impl", default="auto",
                   choices=("auto", "torchao", "int8pack_mm", "explicit"))
    p.add_argument("--peer_threads", type=int, default=0,
                   help="the peer's torch threads on the CPU (0: torch's default)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' = none)")
    args = p.parse_args(argv)
    harness.require_at_least(p, args, ("batch", "prompt_len", "new_tokens", "vocab",
                                       "windows"))
    harness.require_at_least(p, args, ("warmup",), low=0)
    return args


# ----------------------------------------------------------------------------------------
# Model, params, the PyTorch peer.
# ----------------------------------------------------------------------------------------
def build(args, dtype: str):
    """(Decoder, cfg) of configs/gpt.py:gpt2_small's model section for --variant, with
    the compute dtype and the flags' attention / QKV / scan."""
    from configs import gpt
    from models import transformer
    from train import families

    if args.variant not in transformer.VARIANTS:
        raise SystemExit(f"--variant={args.variant!r}; allowed: "
                         f"{', '.join(transformer.VARIANTS)}")
    base = gpt.get_config("gpt2_small").model
    max_length = max(transformer.VARIANTS[args.variant].get("max_length", 0),
                     args.prompt_len + args.new_tokens)
    section = families.model_section(
        "transformer", args.variant, max_length=max_length, dtype=dtype, param_dtype=dtype,
        attention_impl=args.attention_impl, fused_qkv=args.fused_qkv,
        scan_layers=args.scan_layers, remat_policy=base.remat_policy)
    return families.build(section, "lm", vocab_size=args.vocab)


def run_peer(args) -> dict | None:
    """benchmarks/peers/decode.py at this shape; its figures, or why not."""
    if args.variant not in PEER_SIZES:
        return {"skipped": f"the peer has the {', '.join(PEER_SIZES)} sizes only"}
    configs = sorted({"int8" if PRESETS[n][2] else "bf16" for n in
                      harness.select(args.compare, PRESETS, DEFAULT_COMPARE)
                      if n != "float32"} or {"bf16"})
    peer = harness.run_peer(
        args, ["decode", f"--size={args.variant}", f"--vocab={args.vocab}",
               f"--batch={args.batch}", f"--prompt_len={args.prompt_len}",
               f"--steps={args.new_tokens}", f"--windows={args.windows}",
               f"--warmup={args.warmup}", f"--seed={args.seed}", f"--mode={args.peer_mode}",
               f"--int8_impl={args.peer_int8_impl}", f"--configs={','.join(configs)}",
               f"--threads={args.peer_threads}"],
        prefix="torch_decode_", required=peer_metric(args, configs[0], "ms_per_token"),
        record={"mode": args.peer_mode, "configs": configs})
    for line in (peer or {}).get("stdout", "").splitlines():
        if line.startswith("peer_int8_impl "):
            peer["int8_impl"] = line.split()[1]
    return peer


def peer_metric(args, config: str, what: str) -> str:
    return f"torch_decode_{config}_{args.peer_mode}_{what}"


# ----------------------------------------------------------------------------------------
# One configuration.
# ----------------------------------------------------------------------------------------
def make_params(args, name: str, float_params):
    """(model, params) of a configuration from the shared float32 init."""
    from models.compress import weight_only

    weights, dtype, impl = PRESETS[name]
    model, _ = build(args, dtype)
    if impl is not None:
        return weight_only.weight_only_int8(model, float_params, impl=impl, dtype=dtype)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))
    return model, cast(float_params)


def _time_calls(fn, windows: int) -> list[float]:
    """ms of `windows` calls of fn() (each synchronized)."""
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_config(args, name: str, float_params, prompt) -> dict:
    from models import decoding
    from models.compress import weight_only

    weights, dtype, impl = PRESETS[name]
    print(f"[{name}] {weights} weights, {dtype} compute"
          + (f", impl {impl}" if impl else "") + " ...", flush=True)
    model, params = make_params(args, name, float_params)
    cfg = model.cfg
    max_len = args.prompt_len + args.new_tokens
    nbytes = weight_only.bytes_per_token(params, tied=cfg.tie_embeddings)
    result = {"name": name, "weights": weights, "dtype": dtype, "impl": impl,
              "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "bytes_per_token": nbytes,
              "model": {"variant": args.variant, "num_layers": cfg.num_layers,
                        "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
                        "attention_impl": cfg.attention_impl, "fused_qkv": cfg.fused_qkv,
                        "scan_layers": cfg.scan_layers}}

    def fresh_cache():
        return decoding.init_decoder_cache(model, args.batch, max_len)

    prefill = jax.jit(lambda p, c, t: weight_only.decode_step(model, p, c, t))

    def step(state, p):       # state = (cache, token [B]) -> (next state, token)
        logits, cache = weight_only.decode_step(model, p, state[0], state[1][:, None])
        token = jax.numpy.argmax(logits, -1).astype(jax.numpy.int32)
        return (cache, token), token

    def start():              # untimed: a fresh cache and the prompt -> the step's state
        logits, cache = prefill(params, fresh_cache(), prompt)
        return jax.block_until_ready((cache, jax.numpy.argmax(logits, -1).astype("int32")))

    state = start()
    _, compiled, times = harness.lower_and_compile(jax.jit(step, donate_argnums=0), state,
                                                   params)
    result.update(times)
    result["memory"] = harness.memory_report(compiled, jax.devices()[0])
    if impl is not None:
        result["int8_operands"] = weight_only.int8_operand_report(compiled.as_text())
    for _ in range(args.warmup):
        harness.time_windows(compiled, start(), [params], windows=1, steps=args.new_tokens)
    window_ms = []
    for _ in range(args.windows):
        window_ms += harness.time_windows(compiled, start(), [params], windows=1,
                                          steps=args.new_tokens)[2]
    # One window's greedy tokens [B, 1 + new_tokens], for the agreement with bf16.
    state = start()
    out = [np.asarray(state[1])]
    for _ in range(args.new_tokens):
        state, token = compiled(state, params)
        out.append(np.asarray(token))
    tokens = np.stack(out, 1)
    stats = harness.window_stats(window_ms)
    med = stats["ms_median"]
    result.update(stats)
    result["tokens"] = tokens.tolist()
    result["ms_per_token"] = med
    result["tokens_per_s"] = args.batch * 1e3 / med
    result["weight_GBps"] = nbytes["total"] / (med / 1e3) / 1e9

    if args.loop in ("generate", "both"):
        gen = jax.jit(functools.partial(decoding.generate, model,
                                        max_new_tokens=args.new_tokens, temperature=0.0))
        _, gen_c, gen_times = harness.lower_and_compile(gen, params, prompt)
        for _ in range(args.warmup):
            jax.block_until_ready(gen_c(params, prompt))
        gen_ms = _time_calls(lambda: gen_c(params, prompt), args.windows)
        cache = fresh_cache()
        prefill_ms = _time_calls(lambda: prefill(params, cache, prompt), args.windows)
        g = harness.window_stats(gen_ms)
        per_token = (g["ms_median"] - harness.window_stats(prefill_ms)["ms_median"]) / \
            args.new_tokens
        result["generate"] = {**g, "compile_s": gen_times["compile_s"],
                              "prefill_ms": prefill_ms, "ms_per_token": per_token,
                              "tokens_per_s": args.batch * 1e3 / per_token}
    print(f"[{name}] {med:.3f} ms/token (median of {args.windows} x {args.new_tokens}), "
          f"{nbytes['total'] / 1e6:.1f} MB read per token, "
          f"{result['weight_GBps']:.1f} GB/s", flush=True)
    return result


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
COLUMNS = [("config", "<12"), ("weights", "<8"), ("ms/tok", "8.3f"), ("tok/s", "9.1f"),
           ("gen ms/tok", "10.3f"), ("MB/tok", "8.2f"), ("GB/s", "7.1f"), ("x bf16", "7.2f"),
           ("spread", ">6"), ("temp MiB", "8.2f"), ("int8 fused", ">10"), ("same tok", ">8"),
           ("torch ms", "8.3f")]


def row_values(r: dict, peer: dict, args) -> tuple:
    gen = r.get("generate", {}).get("ms_per_token", float("nan"))
    temp = r["memory"].get("temp_size_in_bytes")
    ops = r.get("int8_operands")
    fused = f"{ops['fused']}/{ops['int8_params']}" if ops else "-"
    same = r.get("tokens_match_bf16")
    torch_ms = float("nan")
    if r["weights"] != "float32":
        torch_ms = peer.get(peer_metric(args, "int8" if r["impl"] else "bf16",
                                        "ms_per_token"), float("nan"))
    return (r["name"], r["weights"], r["ms_per_token"], r["tokens_per_s"], gen,
            r["bytes_per_token"]["total"] / 1e6, r["weight_GBps"],
            r.get("speedup_vs_bf16", float("nan")), f"{r['spread_pct']:5.1f}%",
            temp / 2**20 if temp is not None else float("nan"), fused,
            "-" if same is None else f"{same:.2f}", torch_ms)


def format_table(report: dict, args) -> str:
    env, peer = report["environment"], report.get("peer") or {}
    lines = [f"flaxlab greedy decoding ({report['variant']}, B={report['batch']}, prompt "
             f"{report['prompt_len']}, {report['new_tokens']} tokens a window, vocab "
             f"{report['vocab']}) on {env['device']} [{env['platform']}], jax {env['jax']}"]
    head = harness.table_header(COLUMNS)
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(harness.table_row(COLUMNS, row_values(r, peer, args)))
        ops = r.get("int8_operands")
        if ops and ops["materialized"]:
            lines.append(f"  NOTE {r['name']}: {ops['materialized']} of {ops['int8_params']} "
                         "int8 kernels are converted into a weight-sized float buffer "
                         "before their matmul (see int8_operands)")
    lines.append("x bf16 = bf16 ms / this ms (step loop); gen ms/tok = (generate - prefill) "
                 "/ tokens; int8 fused = int8 params read inside their consuming fusion")
    if peer.get("skipped"):
        lines.append(f"torch peer skipped: {peer['skipped']}")
    elif peer:
        mode = peer.get("mode")
        bits = [f"{c} {peer[peer_metric(args, c, 'ms_per_token')]:.3f} ms/token"
                for c in ("bf16", "int8") if peer_metric(args, c, "ms_per_token") in peer]
        speed = peer.get(f"torch_decode_int8_{mode}_speedup")
        lines.append(f"torch peer ({mode}, {peer.get('device')}, int8 "
                     f"{peer.get('int8_impl', '-')}): {', '.join(bits)}"
                     + (f"; int8 x bf16 {speed:.2f}" if speed else "")
                     + f" ({peer.get('torch', 'torch')})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = harness.select(args.compare, PRESETS, DEFAULT_COMPARE)
    # The peer runs before JAX initializes its backend: JAX preallocates most of the GPU.
    peer = run_peer(args)
    report = harness.new_report(
        "decode_step", argv, variant=args.variant, batch=args.batch,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, vocab=args.vocab,
        windows=args.windows, warmup=args.warmup, loop=args.loop,
        environment=harness.environment(), results=[])
    if peer is not None:
        report["peer"] = peer

    from models.layers import partitioning
    model, _ = build(args, "float32")
    rng = np.random.default_rng(args.seed)
    prompt = jax.numpy.asarray(rng.integers(0, min(args.vocab, GPT2_VOCAB),
                                            (args.batch, args.prompt_len)), np.int32)
    float_params = jax.jit(lambda k: partitioning.unboxed_init(model, k, prompt))(
        jax.random.key(args.seed))["params"]
    total, _ = harness.count_params(float_params)
    report["params"] = total
    harness.run_each(names, lambda n: run_config(args, n, float_params, prompt), report,
                     args.out)
    by_name = {r["name"]: r for r in report["results"]}
    bf16 = by_name.get("bf16")
    for r in report["results"]:
        if bf16 is not None:
            r["speedup_vs_bf16"] = bf16["ms_per_token"] / r["ms_per_token"]
            r["tokens_match_bf16"] = float(np.mean(np.asarray(r["tokens"]) ==
                                                   np.asarray(bf16["tokens"])))
            if "generate" in r and "generate" in bf16:
                r["generate"]["speedup_vs_bf16"] = (bf16["generate"]["ms_per_token"] /
                                                    r["generate"]["ms_per_token"])
    return harness.print_and_write(report, format_table(report, args), args.out)


if __name__ == "__main__":
    main()
