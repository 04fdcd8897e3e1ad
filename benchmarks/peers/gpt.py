"""The PyTorch peer of flaxlab's GPT: the same decoder, its training step, nanoGPT style.

    python benchmarks/peers/gpt.py train --size=gpt2_small --batch=16 --seq_len=1024 \
        --mode=compile --device=cuda            # the GPU benchmark's peer
    python benchmarks/peers/gpt.py train --size=default --batch=32 --seq_len=128 \
        --mode=eager --device=cpu               # configs/gpt.py's default model on a CPU

The model is flaxlab's `models.transformer.Decoder` as configured by `configs/gpt.py`
(pre-LayerNorm blocks with biases, learned positions, tied unembedding, GELU; eps 1e-5)
written the way nanoGPT writes GPT-2 (Karpathy 2022): one fused QKV projection and
`F.scaled_dot_product_attention(is_causal=True)` (flash attention on a GPU). The step is
the one `train.main` runs: mean next-token cross-entropy in float32, backward, global
gradient-norm clip 1.0, AdamW with decoupled weight decay on every matrix but not on
biases, norm scales or the embeddings (flaxlab's `optim.weight_decay_exclude`), and the
config's warmup-cosine learning rate. On a GPU: bf16 autocast (params stay float32) and
fused AdamW, as nanoGPT; on the CPU: float32 and AdamW's fused CPU kernel.

`--mode=compile` wraps the model in `torch.compile` (inductor); the optimizer step runs
eagerly, as in nanoGPT. `make_train_step` is the importable form (benchmarks/cpu_peer.py
alternates it with flaxlab's step in one process).

Result lines (benchmarks/peers/common.py): torch_gpt_<mode>_step_ms, _tokens_per_s,
_mfu (GPU only; nanoGPT's 6N + 12 L H Q T flops per token against --peak_flops) and
torch_gpt_params.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_flags, compiled_or_eager, emit, setup, time_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 260
    max_length: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_model: int = 128
    mlp_dim: int = 512
    gelu_approximate: str = "none"   # "none" (exact erf GELU) | "tanh" (GPT-2's)
    norm_epsilon: float = 1e-5


# models.transformer.VARIANTS (+ the vocabulary each benchmark uses).
SIZES = {
    "tiny": GPTConfig(vocab_size=260, max_length=64, num_layers=2, num_heads=2, d_model=32,
                      mlp_dim=64),
    "default": GPTConfig(),          # configs/gpt.py default: "mini" on the byte corpus
    "gpt2_small": GPTConfig(vocab_size=50304, max_length=1024, num_layers=12, num_heads=12,
                            d_model=768, mlp_dim=3072, gelu_approximate="tanh"),
}


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)): flaxlab's pre-norm TransformerBlock."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.approximate = cfg.num_heads, cfg.gelu_approximate
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_epsilon)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_epsilon)
        self.fc = nn.Linear(d, cfg.mlp_dim)
        self.out = nn.Linear(cfg.mlp_dim, d)

    def forward(self, x):                                    # x [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for z in (q, k, v))                       # [B, H, T, Q]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate=self.approximate))


class GPT(nn.Module):
    """tokens [B, T+1] -> mean next-token cross-entropy (float32) of tokens[:, 1:]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_length, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lnf = nn.LayerNorm(cfg.d_model, eps=cfg.norm_epsilon)
        for name, p in self.named_parameters():   # flaxlab's init: normal(0.02), zero bias
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(inputs.shape[1], device=tokens.device)
        x = self.wte(inputs) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lnf(x) @ self.wte.weight.T            # tied unembedding
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def param_count(model: GPT, include_positions: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    return n if include_positions else n - model.wpe.weight.numel()


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int,
                  end_lr_fraction: float) -> float:
    """flaxlab's warmup_cosine schedule as a factor of the peak learning rate (optax's
    warmup_cosine_decay_schedule: linear from 0, then cosine down to the end value)."""
    if step < warmup_steps:
        return step / max(warmup_steps, 1)
    frac = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return end_lr_fraction + (1 - end_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(model: GPT, *, lr: float, weight_decay: float, b1: float, b2: float,
                   eps: float, fused: bool) -> torch.optim.AdamW:
    """AdamW; no decay on biases, norm scales and the embedding tables (as flaxlab's
    weight_decay_exclude = bias, scale, embed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        excluded = name.endswith("bias") or ".ln" in name or name.startswith(
            ("ln", "wte", "wpe"))
        (no_decay if excluded else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, fused=fused)


def make_train_step(model: GPT, batches: list[np.ndarray], *, mode: str = "eager",
                    device: str = "cpu", lr: float = 3e-3, weight_decay: float = 0.01,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    grad_clip: float = 1.0, warmup_steps: int = 50, total_steps: int = 600,
                    end_lr_fraction: float = 0.1):
    """A function that trains one step on the next of `batches` (int [B, T+1] each, placed
    on `device` once) and returns the loss tensor (not synchronized). The defaults are
    configs/gpt.py's default run."""
    device = torch.device(device)
    model = model.to(device)
    fwd = compiled_or_eager(model, mode)
    on_gpu = device.type == "cuda"
    opt = make_optimizer(model, lr=lr, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
                         fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
        s, warmup_steps=warmup_steps, total_steps=total_steps,
        end_lr_fraction=end_lr_fraction))
    data = [torch.as_tensor(b, dtype=torch.long, device=device) for b in batches]
    counter = [0]

    def step():
        tokens = data[counter[0] % len(data)]
        counter[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = fwd(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def flops_per_token(cfg: GPTConfig, n_no_pos: int, seq_len: int) -> int:
    """nanoGPT / PaLM: 6 N + 12 L H Q T (the JAX benchmark's count)."""
    return 6 * n_no_pos + 12 * cfg.num_layers * cfg.d_model * seq_len


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train",))
    p.add_argument("--size", default="gpt2_small", choices=tuple(SIZES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=0, help="0: the size's vocabulary")
    p.add_argument("--mode", default="compile", choices=("eager", "compile"))
    p.add_argument("--num_batches", type=int, default=4, help="distinct batches in turn")
    p.add_argument("--peak_flops", type=float, default=989e12,
                   help="for MFU on a GPU (H100 / H200 dense bf16: 989e12)")
    add_common_flags(p)
    args = p.parse_args(argv)
    device = setup(args)
    cfg = SIZES[args.size]
    cfg = dataclasses.replace(cfg, vocab_size=args.vocab or cfg.vocab_size,
                              max_length=max(cfg.max_length, args.seq_len))
    model = GPT(cfg)
    rng = np.random.default_rng(args.seed)
    # Random tokens below GPT-2's 50257 real entries (the JAX benchmark's batches).
    high = min(cfg.vocab_size, 50257)
    batches = [rng.integers(4, high, (args.batch, args.seq_len + 1)) for _ in
               range(args.num_batches)]
    step = make_train_step(model, batches, mode=args.mode, device=device.type)
    timing = time_step(step, device, warmup=args.warmup, windows=args.windows,
                       steps=args.steps)
    n_no_pos = param_count(model, include_positions=False)
    tag = f"torch_gpt_{args.mode}"
    tokens_per_s = args.batch * args.seq_len / (timing["ms"] / 1e3)
    emit("torch_gpt_params", param_count(model), "params", f"({n_no_pos} without positions)")
    emit(tag + "_step_ms", timing["ms"], "ms",
         f"(median of {args.windows} x {args.steps}; spread {timing['spread_pct']:.1f}%; "
         f"B={args.batch} T={args.seq_len} {args.size}; loss {timing['last'].item():.3f})")
    emit(tag + "_tokens_per_s", tokens_per_s, "tok/s")
    if device.type == "cuda":
        mfu = flops_per_token(cfg, n_no_pos, args.seq_len) * tokens_per_s / args.peak_flops
        emit(tag + "_mfu", 100 * mfu, "%")


if __name__ == "__main__":
    main()
