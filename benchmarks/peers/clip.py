"""The PyTorch peer of flaxlab's CLIP benchmark: open_clip's ViT-B-16 training step.

    python benchmarks/peers/clip.py train --towers=b16 --batch=256 --mode=compile \
        --device=cuda                           # the GPU benchmark's peer
    python benchmarks/peers/clip.py train --towers=tiny --batch=8 --mode=eager \
        --device=cpu --steps=2 --windows=2      # the CPU smoke run's

The model (Radford et al. 2021) is open_clip's (Ilharco et al. 2021) when `open_clip`
is importable (`--impl=auto`, the default, or `--impl=open_clip`): `create_model("ViT-B-16")`
(random init, no weights are loaded) for `--towers=b16`, `open_clip.CLIP` with the tiny
sizes below for `--towers=tiny`, and `open_clip.ClipLoss`. Otherwise (`--impl=equivalent`)
it is `Clip` below, the same architecture written out:

  image  a P x P stride-P patch convolution, a class token and learned positions,
         LayerNorm (open_clip's ln_pre), pre-LN blocks (fused QKV projection with biases,
         `F.scaled_dot_product_attention`, exact-GELU MLP of 4x the width), LayerNorm of
         the class token (ln_post), a [width, embed] projection;
  text   token + learned position embeddings, the same blocks under a causal mask,
         LayerNorm (ln_final), the hidden state at the end-of-text token (the largest
         id, as open_clip's argmax pooling), a [width, embed] projection;
  loss   L2-normalized embeddings, logits = exp(t) <image_i, text_j> with a learnable t
         (init log(1/0.07)), symmetric InfoNCE (open_clip's ClipLoss on one device).

Sizes (`--towers`): b16 = open_clip's model_configs/ViT-B-16.json (image 224, patch 16,
12 x 768, 12 heads; text context 77, vocabulary 49408, 12 x 512, 8 heads; embed 512;
nn.GELU, not QuickGELU; LayerNorm eps 1e-5); tiny = the JAX benchmark's --towers=tiny.
How these differ from flaxlab's `models.clip.ClipModel` as the JAX benchmark builds it:
flaxlab's patch embedding has a bias (768 parameters for b16) that open_clip's conv1 has
not -- the equivalent module keeps it, so its parameter count is flaxlab's (149,621,505
for b16; open_clip's is 149,620,737) --; flaxlab applies the final image LayerNorm to
every token before taking the class token (same numbers) and clips the logit scale at 100
in the forward, where open_clip's training loop clamps the parameter after each step
(done here too). open_clip's blocks attend through `nn.MultiheadAttention` (SDPA inside;
the text tower's causal mask an explicit additive [L, L] tensor), the equivalent module
calls SDPA directly (`is_causal=True`).

The step is the one the JAX benchmark times: forward, loss, backward, global gradient-norm
clip 1.0, AdamW (lr 1e-3, betas 0.9 / 0.999, eps 1e-8, weight decay 0.1 on matrices only:
open_clip's rule excludes norms, biases, the logit scale and every tensor of < 2 dims;
flaxlab's also spares the embedding tables, which costs nothing either way). The learning
rate is constant (a host-side float: a schedule would not change the device work). On a
GPU: `--dtype=bfloat16` autocast (params float32), fused AdamW; TF32 matmuls
(benchmarks/peers/common.py). `--mode=compile` runs model + loss under `torch.compile`
(inductor) and the optimizer eagerly.

Result lines: torch_clip_<towers>_<mode>_step_ms, _samples_per_s, _loss (the last step's),
torch_clip_<towers>_params; and the info line `peer_impl open_clip <version>` or
`peer_impl equivalent`.
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
class Towers:
    """Both towers' sizes (the JAX benchmark's TOWERS holds the same table)."""
    image_size: int
    patch: int
    image_width: int
    image_layers: int
    image_heads: int
    image_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    context: int
    vocab: int
    embed: int
    channels: int = 3


TOWERS = {
    "b16": Towers(image_size=224, patch=16, image_width=768, image_layers=12, image_heads=12,
                  image_mlp=3072, text_width=512, text_layers=12, text_heads=8, text_mlp=2048,
                  context=77, vocab=49408, embed=512),
    # configs/clip.py's default sizes (ViT tiny/4, the tiny text transformer), context 16.
    "tiny": Towers(image_size=32, patch=4, image_width=64, image_layers=2, image_heads=2,
                   image_mlp=256, text_width=32, text_layers=2, text_heads=2, text_mlp=64,
                   context=16, vocab=260, embed=64),
}
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): pre-LN, fused QKV, exact GELU."""

    def __init__(self, width: int, heads: int, mlp: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.c_fc = nn.Linear(width, mlp)
        self.c_proj = nn.Linear(mlp, width)

    def forward(self, x):                                     # x [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in (q, k, v))                        # [B, H, T, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ImageTower(nn.Module):
    """images [B, C, S, S] -> [B, embed]."""

    def __init__(self, s: Towers):
        super().__init__()
        w, tokens = s.image_width, (s.image_size // s.patch) ** 2 + 1
        # bias=True: flaxlab's patch embedding has one (open_clip's conv1 has not).
        self.conv1 = nn.Conv2d(s.channels, w, kernel_size=s.patch, stride=s.patch)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=1e-5)
        self.blocks = nn.ModuleList(Block(w, s.image_heads, s.image_mlp, causal=False)
                                    for _ in range(s.image_layers))
        self.ln_post = nn.LayerNorm(w, eps=1e-5)
        self.proj = nn.Parameter(w ** -0.5 * torch.randn(w, s.embed))

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)     # [B, N, W], row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    """tokens int [B, L] (end-of-text = the largest id) -> [B, embed]."""

    def __init__(self, s: Towers):
        super().__init__()
        w = s.text_width
        self.token_embedding = nn.Embedding(s.vocab, w)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(s.context, w))
        self.blocks = nn.ModuleList(Block(w, s.text_heads, s.text_mlp, causal=True)
                                    for _ in range(s.text_layers))
        self.ln_final = nn.LayerNorm(w, eps=1e-5)
        self.text_projection = nn.Parameter(w ** -0.5 * torch.randn(w, s.embed))

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return pooled @ self.text_projection


class Clip(nn.Module):
    """(images [B, C, S, S], tokens int [B, L]) -> open_clip's output dict: normalized
    "image_features" / "text_features" [B, embed] and "logit_scale" = exp(t)."""

    def __init__(self, s: Towers):
        super().__init__()
        self.visual = ImageTower(s)
        self.text = TextTower(s)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def forward(self, images, tokens):
        return {"image_features": F.normalize(self.visual(images), dim=-1),
                "text_features": F.normalize(self.text(tokens), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE (Radford et al. 2021, Fig. 3), open_clip's ClipLoss on one device."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class Objective(nn.Module):
    """model + loss in one module, so torch.compile sees both."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, tokens):
        out = self.model(images, tokens)
        return self.loss(out["image_features"], out["text_features"], out["logit_scale"])


def sizes(towers: str, image_size: int = 0, patch: int = 0) -> Towers:
    """TOWERS[towers] with image_size / patch replaced where given (0 = the towers')."""
    if towers not in TOWERS:
        raise SystemExit(f"peer: --towers={towers!r}; allowed: {', '.join(TOWERS)}")
    s = TOWERS[towers]
    return dataclasses.replace(s, image_size=image_size or s.image_size,
                               patch=patch or s.patch)


def import_open_clip():
    """(the open_clip module, "") or (None, why it cannot be imported here)."""
    try:
        import open_clip  # noqa: PLC0415 -- optional
    except Exception as e:  # noqa: BLE001 -- also a broken install (torchvision mismatch)
        return None, f"{type(e).__name__}: {e}"
    return open_clip, ""


def build(s: Towers, impl: str, device: str = "cpu"):
    """(model, loss function, "open_clip <version>" | "equivalent [why]") on `device`
    ("meta": shapes only, nothing allocated)."""
    oc, why = import_open_clip() if impl in ("auto", "open_clip") else (None, "")
    if impl == "open_clip" and oc is None:
        raise SystemExit(f"peer: --impl=open_clip but open_clip is not importable ({why}; "
                         "pip install open_clip_torch); allowed: auto, equivalent")
    with torch.device(device):
        if oc is None:
            return Clip(s), clip_loss, "equivalent" + (f" (no open_clip: {why})" if why
                                                       else "")
        if s == TOWERS["b16"]:
            model = oc.create_model("ViT-B-16", device=device, output_dict=True)
        else:
            model = oc.CLIP(s.embed, output_dict=True, vision_cfg=dict(
                image_size=s.image_size, patch_size=s.patch, width=s.image_width,
                layers=s.image_layers, head_width=s.image_width // s.image_heads,
                mlp_ratio=s.image_mlp / s.image_width), text_cfg=dict(
                context_length=s.context, vocab_size=s.vocab, width=s.text_width,
                heads=s.text_heads, layers=s.text_layers,
                mlp_ratio=s.text_mlp / s.text_width))
    return model, oc.ClipLoss(), f"open_clip {getattr(oc, '__version__', '?')}"


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.1,
                   fused: bool = False) -> torch.optim.AdamW:
    """AdamW with open_clip's decay rule: no decay for < 2-dim tensors, norms ("ln"),
    biases and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        excluded = (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                    or "logit_scale" in name)
        (no_decay if excluded else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def random_batches(s: Towers, batch: int, n: int, seed: int) -> list:
    """`n` (images float32 [B, C, S, S] uniform in [0, 1), tokens int64 [B, L]) pairs.

    Tokens as open_clip's tokenizer lays them out: start-of-text (vocab - 2), random ids
    in [1, vocab - 2), end-of-text (vocab - 1, the largest id) at a random position in
    [2, L), zeros (padding) after it.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        images = rng.random((batch, s.channels, s.image_size, s.image_size), np.float32)
        ids = rng.integers(1, s.vocab - 2, (batch, s.context))
        eot = rng.integers(2, s.context, batch)
        ids = np.where(np.arange(s.context)[None] < eot[:, None], ids, 0)
        ids[:, 0] = s.vocab - 2
        ids[np.arange(batch), eot] = s.vocab - 1
        out.append((images, ids))
    return out


def make_train_step(model: nn.Module, loss, batches: list, *, device: torch.device,
                    mode: str, dtype: str, grad_clip: float = 1.0):
    """A function that trains one step on the next of `batches` (placed on `device` once)
    and returns the loss tensor (not synchronized)."""
    model = model.to(device)
    objective = compiled_or_eager(Objective(model, loss), mode)
    opt = make_optimizer(model, fused=device.type == "cuda")
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    data = [(torch.as_tensor(i, device=device), torch.as_tensor(t, device=device))
            for i, t in batches]
    params = list(model.parameters())
    counter = [0]

    def step():
        images, tokens = data[counter[0] % len(data)]
        counter[0] += 1
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            value = objective(images, tokens)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():   # open_clip's training loop clamps the scale after a step
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return value

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train",))
    p.add_argument("--towers", default="b16", choices=tuple(TOWERS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0, help="0: the towers'")
    p.add_argument("--patch", type=int, default=0, help="0: the towers'")
    p.add_argument("--mode", default="compile", choices=("eager", "compile"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="autocast dtype (params stay float32)")
    p.add_argument("--impl", default="auto", choices=("auto", "open_clip", "equivalent"),
                   help="auto: open_clip when importable, else the equivalent module")
    p.add_argument("--num_batches", type=int, default=4, help="distinct batches in turn")
    add_common_flags(p)
    args = p.parse_args(argv)
    if args.batch < 2:
        p.error("--batch must be >= 2 (a contrastive loss needs negatives)")
    device = setup(args)
    s = sizes(args.towers, args.image_size, args.patch)
    model, loss, impl = build(s, args.impl)
    print("peer_impl", impl, flush=True)
    batches = random_batches(s, args.batch, args.num_batches, args.seed)
    step = make_train_step(model, loss, batches, device=device, mode=args.mode,
                           dtype=args.dtype)
    timing = time_step(step, device, warmup=args.warmup, windows=args.windows,
                       steps=args.steps)
    tag = f"torch_clip_{args.towers}_{args.mode}"
    emit(f"torch_clip_{args.towers}_params", param_count(model), "params",
         impl.split(" (")[0])
    emit(tag + "_step_ms", timing["ms"], "ms",
         f"(median of {args.windows} x {args.steps}; spread {timing['spread_pct']:.1f}%; "
         f"B={args.batch} {s.image_size}/{s.patch} {args.dtype})")
    emit(tag + "_samples_per_s", args.batch / (timing["ms"] / 1e3), "samples/s")
    emit(tag + "_loss", timing["last"].item(), "nats", "(the last step's)")


if __name__ == "__main__":
    main()
