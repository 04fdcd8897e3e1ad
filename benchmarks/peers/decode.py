"""The PyTorch peer of benchmarks/decode_step.py: greedy decoding with a KV cache, bf16 vs
int8 weight-only weights.

    python benchmarks/peers/decode.py decode --size=gpt2_small --batch=1 --prompt_len=32 \
        --steps=128 --mode=compile --device=cuda     # the GPU benchmark's peer
    python benchmarks/peers/decode.py decode --size=tiny --vocab=256 --prompt_len=8 \
        --steps=4 --windows=2 --warmup=1 --mode=eager --device=cpu   # a CPU smoke run

The model is benchmarks/peers/gpt.py's GPT (flaxlab's Decoder written nanoGPT's way),
untouched; `CachedGPT` runs its modules one position at a time with a KV cache of
`prompt_len + steps` positions per layer, attending over the whole cache with a mask of
the positions written so far -- as flaxlab's decoder does, so a step's work does not
depend on its position. The tied unembedding is an `nn.Linear` sharing the token table's
weight (so int8 schemes, which replace Linear weights, quantize it as flaxlab does; the
lookup keeps the float table: one row a token).

A timed window is a prefill of the prompt (untimed: it gives the first token) and then
`--steps` cached forward calls, a greedy token each, the argmax staying on the device;
`--warmup` untimed windows first (torch.compile compiles in the first); the headline is
the median window's ms per token.

Weights (`--configs`): bf16 (the model cast to bfloat16; float32 on request with
--dtype), and int8 weight-only with one symmetric scale per output channel (s = max|w| /
127, the scheme of flaxlab's models/compress/weight_only.py) by the first of
(`--int8_impl=auto`): torchao's `quantize_(model, Int8WeightOnlyConfig())` when torchao
is importable; `torch._weight_int8pack_mm` (int8 [N, K] weights, per-row scales: CPU
kernel, and a CUDA one in recent torch) when it runs here; else an explicit matmul on the
int8 weight converted to the activations' dtype, times the scales.

`--mode`: eager | compile (torch.compile, inductor) | reduce-overhead (torch.compile with
CUDA graphs, the gpt-fast setting).

Result lines (benchmarks/peers/common.py): torch_decode_<bf16|int8>_<mode>_ms_per_token,
_tokens_per_s, torch_decode_int8_<mode>_speedup (bf16 ms / int8 ms),
torch_decode_tokens_match (the fraction of int8 greedy tokens equal to bf16's),
torch_decode_params; and the text line `peer_int8_impl torchao|int8pack_mm|explicit`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_flags, emit, setup, synchronize  # noqa: E402
from gpt import GPT, SIZES as TRAIN_SIZES, GPTConfig, param_count  # noqa: E402

# gpt.py's sizes, and GPT-2 medium (models.transformer.VARIANTS["gpt2_medium"], vocab
# 50304): at 355M parameters a token reads ~0.7 GB of bf16 weights, far more bound by
# bandwidth than by kernel launches than GPT-2 small's 0.25 GB.
SIZES = {**TRAIN_SIZES, "gpt2_medium": GPTConfig(
    vocab_size=50304, max_length=1024, num_layers=24, num_heads=16, d_model=1024,
    mlp_dim=4096, gelu_approximate="tanh")}
INT8_IMPLS = ("torchao", "int8pack_mm", "explicit")
MODES = ("eager", "compile", "reduce-overhead")


class CachedGPT(nn.Module):
    """A GPT's modules run incrementally: tokens [B, T] at positions pos..pos+T-1 ->
    the last position's logits [B, V] (float32), keys and values appended to the cache."""

    def __init__(self, gpt: GPT, batch: int, max_length: int):
        super().__init__()
        cfg = gpt.cfg
        self.wte, self.wpe, self.blocks, self.lnf = gpt.wte, gpt.wpe, gpt.blocks, gpt.lnf
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = gpt.wte.weight               # tied, as GPT.forward's x E^T
        self.num_heads, self.d_model = cfg.num_heads, cfg.d_model
        shape = (batch, cfg.num_heads, max_length, cfg.d_model // cfg.num_heads)
        for i in range(cfg.num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape), persistent=False)
        self.register_buffer("slots", torch.arange(max_length), persistent=False)

    def forward(self, tokens, positions):                  # tokens [B, T], positions [T]
        b, t = tokens.shape
        d, h = self.d_model, self.num_heads
        x = self.wte(tokens) + self.wpe(positions)
        mask = self.slots[None, :] <= positions[:, None]   # [T, max_length]: written, causal
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
            x = x + blk.proj(y.transpose(1, 2).reshape(b, t, d))
            x = x + blk.out(F.gelu(blk.fc(blk.ln2(x)), approximate=blk.approximate))
        return self.lm_head(self.lnf(x[:, -1])).float()


# ----------------------------------------------------------------------------------------
# Int8 weight-only linears.
# ----------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], float32 scales [N]): symmetric per output row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = (x @ q^T) * s + b with int8 q [N, K]: `torch._weight_int8pack_mm`, or explicit
    (q converted to x's dtype, then the scales)."""

    def __init__(self, linear: nn.Linear, impl: str, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.impl = impl
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x):
        if self.impl == "int8pack_mm":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def _replace_linears(module: nn.Module, impl: str, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, impl, dtype))
        else:
            _replace_linears(child, impl, dtype)


def int8pack_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._weight_int8pack_mm runs here and agrees with the explicit product."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 64, generator=g).to(device, dtype)
        q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(32, generator=g) + 0.5).to(device, dtype)
        y = torch._weight_int8pack_mm(x, q, s).float()
        ref = (x.float() @ q.float().T) * s.float()
        return bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()))
    except (RuntimeError, NotImplementedError):
        return False


def _torchao_quantize():
    """torchao's int8 weight-only entry point, or None when torchao is not installed."""
    try:
        from torchao.quantization import quantize_
    except ImportError:
        return None
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        return lambda m: quantize_(m, Int8WeightOnlyConfig())
    except ImportError:                      # older torchao: the function-style API
        from torchao.quantization import int8_weight_only
        return lambda m: quantize_(m, int8_weight_only())


def make_int8(model: CachedGPT, requested: str, device: torch.device,
              dtype: torch.dtype) -> str:
    """Quantize every Linear of `model` in place; returns the implementation used."""
    torchao = _torchao_quantize() if requested in ("auto", "torchao") else None
    if requested == "torchao" and torchao is None:
        raise SystemExit("peer: --int8_impl=torchao but torchao is not importable")
    if torchao is not None:
        torchao(model)
        return "torchao"
    impl = requested
    if requested == "auto":
        impl = "int8pack_mm" if int8pack_mm_works(device, dtype) else "explicit"
    elif requested == "int8pack_mm" and not int8pack_mm_works(device, dtype):
        raise SystemExit(f"peer: torch._weight_int8pack_mm does not run on {device} here")
    _replace_linears(model, impl, dtype)
    return impl


# ----------------------------------------------------------------------------------------
# Decoding and timing.
# ----------------------------------------------------------------------------------------
def make_decoder(model: CachedGPT, prompt: torch.Tensor, steps: int, mode: str):
    """A function that decodes one window: prefill `prompt` [B, P] (its first token),
    synchronize, then `steps` cached forward calls (a greedy token each); it returns the
    tokens [B, steps + 1] (not synchronized) and the time the steps started."""
    device = prompt.device
    fwd = model if mode == "eager" else torch.compile(
        model, mode="reduce-overhead" if mode == "reduce-overhead" else None)
    p = prompt.shape[1]
    prefill_pos = torch.arange(p, device=device)
    step_pos = [torch.tensor([p + i], device=device) for i in range(steps)]

    @torch.inference_mode()
    def window():
        token = fwd(prompt, prefill_pos).argmax(-1)
        synchronize(device)
        t0 = time.perf_counter()
        out = [token]
        for i in range(steps):
            token = fwd(token[:, None], step_pos[i]).argmax(-1)
            out.append(token)
        return torch.stack(out, 1), t0

    return window


def time_decoding(window, device, *, warmup: int, windows: int, steps: int) -> dict:
    """`warmup` untimed windows, then `windows` timed ones: ms per token of each (the
    prefill excluded), their median, and the first window's tokens."""
    tokens = None
    for _ in range(warmup):
        tokens, _ = window()
    synchronize(device)
    ms = []
    for _ in range(windows):
        out, t0 = window()
        synchronize(device)
        ms.append((time.perf_counter() - t0) / steps * 1e3)
        tokens = out if tokens is None else tokens
    med = statistics.median(ms)
    return {"ms": med, "window_ms": ms, "tokens": tokens.cpu(),
            "spread_pct": (max(ms) - min(ms)) / med * 100}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("decode",))
    p.add_argument("--size", default="gpt2_small", choices=tuple(SIZES))
    p.add_argument("--vocab", type=int, default=0, help="0: the size's vocabulary")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--configs", default="bf16,int8", help="comma-separated: bf16, int8")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the float weights' and activations' dtype")
    p.add_argument("--int8_impl", default="auto", choices=("auto",) + INT8_IMPLS)
    p.add_argument("--mode", default="compile", choices=MODES)
    # --steps: tokens per timed window; --warmup: untimed windows.
    add_common_flags(p, steps=128, windows=5, warmup=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.windows < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --windows >= 1, --warmup >= 0")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or set(configs) - {"bf16", "int8"}:
        p.error(f"--configs={args.configs!r}; allowed: bf16, int8")
    device = setup(args)
    dtype = getattr(torch, args.dtype)
    cfg = SIZES[args.size]
    cfg = dataclasses.replace(cfg, vocab_size=args.vocab or cfg.vocab_size,
                              max_length=max(cfg.max_length, args.prompt_len + args.steps))
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(4, min(cfg.vocab_size, 50257), (args.batch, args.prompt_len),
                           generator=g).to(device)
    results = {}
    for name in configs:
        torch.manual_seed(args.seed)            # the same random weights for every config
        gpt = GPT(cfg)
        if not results:
            emit("torch_decode_params", param_count(gpt), "params")
        model = CachedGPT(gpt, args.batch, args.prompt_len + args.steps)
        model = model.to(device=device, dtype=dtype)   # then quantize, as torchao's docs
        impl = None
        if name == "int8":
            impl = make_int8(model, args.int8_impl, device, dtype)
            print("peer_int8_impl", impl, flush=True)
        model.eval()
        window = make_decoder(model, prompt, args.steps, args.mode)
        r = time_decoding(window, device, warmup=args.warmup, windows=args.windows,
                          steps=args.steps)
        results[name] = r
        tag = f"torch_decode_{name}_{args.mode}"
        emit(tag + "_ms_per_token", r["ms"], "ms",
             f"(median of {args.windows} windows of {args.steps} tokens; spread "
             f"{r['spread_pct']:.1f}%; B={args.batch} prompt {args.prompt_len} {args.size}"
             + (f"; int8 {impl}" if impl else "") + ")")
        emit(tag + "_tokens_per_s", args.batch * 1e3 / r["ms"], "tok/s")
        del model, gpt, window
    if "bf16" in results and "int8" in results:
        emit(f"torch_decode_int8_{args.mode}_speedup", results["bf16"]["ms"] /
             results["int8"]["ms"], "x", "(bf16 ms per token / int8 ms per token)")
        same = (results["bf16"]["tokens"] == results["int8"]["tokens"]).float().mean()
        emit("torch_decode_tokens_match", same.item(), "fraction",
             "(int8 greedy tokens equal to bf16's, first timed window)")


if __name__ == "__main__":
    main()
