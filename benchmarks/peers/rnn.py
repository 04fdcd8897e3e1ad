"""PyTorch peers of flaxlab's recurrent models: the RNN step of benchmarks/rnn_step.py and
a twin of the default LSTM seq2seq model (configs/lstm.py) with its training step.

    python benchmarks/peers/rnn.py step --cells=lstm,gru --dtypes=float32,bfloat16 \\
        [--batch=64 --seq_len=256 --input=512 --hidden=1024 --layers=2]
    python benchmarks/peers/rnn.py seq2seq --batch=64 --mode=eager|compile

`step`: nn.LSTM / nn.GRU (cuDNN on an NVIDIA GPU), params in the dtype, over a fixed
random x [B, T, I]: y = RNN(x), loss = mean(y^2) in float32, backward, SGD (lr 1e-3) --
exactly benchmarks/rnn_step.py's step. One line per cell x dtype:
`torch_cudnn_<cell>_<dtype>_step_ms <ms> ms kernel=...` (rnn_step.py reads these names;
they keep them where the kernel, read from the autograd graph, is not cuDNN: the CPU's
oneDNN LSTM `mkldnn` or ATen's `native` cell loop), or
`torch_cudnn_<cell>_<dtype> failed: <why>` and the next combination runs.

`seq2seq`: `build_seq2seq` is models.rnn.Seq2SeqRNN with configs/lstm.py's default
(cell lstm, bahdanau attention, concat bidirectional encoder, no residuals), equation for
equation (Bahdanau et al. 2015 with flaxlab's two simplifications, see models/rnn.py):
  encoder     annotations h_j = [h->_j; h<-_j] of a bi-LSTM over E x_j, padding inert: the
              sequences are packed, so the backward direction starts at each row's true
              end and the annotations are zero at padding (flaxlab's `lengths`)
  bridge      s_0^l = tanh(W_b [h->_last; h<-_1] + b_b)^l (one slice per decoder layer),
              c_0 = 0
  attention   e_ij = v^T tanh(W_q s_{i-1} + U h_j) scored from the PREVIOUS top state,
              softmax over the real positions only
  decoder     LSTM cells; layer 0 reads [E y_{i-1}; c_i] (the context fed in)
  output      o_i = tanh(W_o [s_i; c_i; E y_{i-1}] + b_o), logits = W o_i + b (untied
              from the embedding), dropout on the embeddings, between layers and on o_i
flaxlab's LSTMs have one bias per gate; PyTorch's have b_ih and b_hh, so b_hh is held at
zero and frozen (requires_grad False): the same function, parameter count, gradient norm
and AdamW updates. `make_seq2seq_step` trains it as train/tasks/seq2seq.py and
configs/lstm.py do: teacher forcing (BOS + targets[:-1]), token cross-entropy averaged
over the non-PAD target tokens, AdamW (lr 2e-3, betas (0.9, 0.999), eps 1e-8, weight decay
0 with flaxlab's exclusions), gradient clipping at global norm 1 and the warm-up + cosine
LR (100 of 2000 steps) as a LambdaLR: one Python call per step.

`--mode=compile` compiles one decoder step -- the attention and the LSTM cells --
(torch.compile(fullgraph=True), inductor; its backward through AOTAutograd) and runs it
T times: the step has the same shapes every time, so it compiles once, whereas compiling
the whole decoder unrolls the T-step loop into one graph whose compile grows with T (at
T = 72 it had not finished after 18 minutes on 2 busy CPU cores). The encoder, the bridge
and the output layer run eagerly in both modes (Dynamo graph-breaks on nn.LSTM by
default: `torch._dynamo.config.allow_rnn`), so the encoder is the cuDNN kernel on a GPU
either way.

Batch format of train/data/seq2seq.py: {"inputs" int [B, S], "targets" int [B, T]},
EOS-terminated, right-padded with PAD = 0 (BOS = 1, EOS = 2, byte b -> b + 4: the byte
tokenizer, 260 ids); `random_batches` makes ones of that format. Rows need at least one
real input token (pack_padded_sequence's rule).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import rnn as rnn_utils

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:   # `from common import ...` from any directory
    sys.path.insert(0, _HERE)

from common import add_common_flags, emit, setup, synchronize, time_step  # noqa: E402

PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 4   # train/data/tokenizers.py's ByteTokenizer
VOCAB = 256 + BYTE_OFFSET
NEG_INF = -1.0e30                          # models/rnn.py's masked-softmax fill
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


# ----------------------------------------------------------------------------------------
# `step`: benchmarks/rnn_step.py's step.
# ----------------------------------------------------------------------------------------
def make_rnn_step(cell: str, dtype: str, *, batch: int, seq_len: int, input_size: int,
                  hidden: int, layers: int, lr: float = 1e-3, device="cpu", seed: int = 0
                  ) -> tuple[Callable[[], torch.Tensor], nn.Module, torch.Tensor]:
    """(step, rnn, x): each `step()` is y = RNN(x) for the fixed x [batch, seq_len,
    input_size], loss = mean(y^2) in float32, backward, SGD(lr); returns the loss.
    Params and x are in `dtype` ("float32" | "bfloat16" | "float16")."""
    if cell not in CELLS or dtype not in DTYPES:
        raise ValueError(f"cell {cell!r} / dtype {dtype!r}: allowed {sorted(CELLS)} / "
                         f"{sorted(DTYPES)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True)
    model = model.to(device=device, dtype=DTYPES[dtype])
    x = torch.randn(batch, seq_len, input_size, generator=gen).to(device, DTYPES[dtype])
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> torch.Tensor:
        y, _ = model(x)
        loss = y.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step, model, x


def rnn_kernel(y: torch.Tensor, depth: int = 4) -> str:
    """What computed y = RNN(x), read from its autograd graph: "cudnn" (CudnnRnnBackward),
    "mkldnn" (the CPU's oneDNN LSTM) or "native" (ATen's cell loop)."""
    frontier = [y.grad_fn]
    for _ in range(depth):
        names = [f.name() for f in frontier if f is not None]
        for kernel in ("Cudnn", "Mkldnn"):
            if any(kernel in n for n in names):
                return kernel.lower()
        frontier = [g for f in frontier if f is not None for g, _ in f.next_functions]
    return "native"


def run_step_benchmarks(args, device: torch.device) -> int:
    """Every cell x dtype of the flags; a failure prints `... failed: why`. -> failures."""
    failures = 0
    for cell in _split(args.cells):
        for dtype in _split(args.dtypes):
            name = f"torch_cudnn_{cell}_{dtype}"
            try:
                step, rnn, x = make_rnn_step(cell, dtype, batch=args.batch,
                                             seq_len=args.seq_len,
                                             input_size=args.input, hidden=args.hidden,
                                             layers=args.layers, lr=args.lr,
                                             device=device, seed=args.seed)
                t = time_step(step, device, warmup=args.warmup, windows=args.windows,
                              steps=args.steps)
                loss = float(t["last"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss}")
            except Exception as e:  # noqa: BLE001 -- report it, run the others
                print(f"{name} failed: {type(e).__name__}: {e}".replace("\n", " "),
                      flush=True)
                failures += 1
                step = rnn = x = None   # noqa: F841 -- free a failed one's memory first
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            kernel = rnn_kernel(rnn(x)[0])
            emit(f"{name}_step_ms", t["ms"], "ms",
                 f"kernel={kernel} B={args.batch} T={args.seq_len} I={args.input} "
                 f"H={args.hidden} L={args.layers} spread={t['spread_pct']:.1f}% "
                 f"loss={loss:.6g}")
    return failures


# ----------------------------------------------------------------------------------------
# The seq2seq twin.
# ----------------------------------------------------------------------------------------
def _trunc_normal_fan_in_(w: torch.Tensor, fan_in: int) -> None:
    """flaxlab's lecun_normal: variance 1 / fan_in from a normal truncated at +-2 std
    (std corrected by the truncation's 0.8796)."""
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def _init_lstm_(weights: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]], hidden: int) -> None:
    """(weight_ih [4H, I], weight_hh [4H, H], bias_ih, bias_hh) per cell, initialized as
    models.layers.recurrent: lecun-normal input kernel, one orthogonal block per gate,
    bias 0 with the forget slice at 1; b_hh = 0 and frozen (flaxlab has one bias)."""
    with torch.no_grad():
        for w_ih, w_hh, b_ih, b_hh in weights:
            _trunc_normal_fan_in_(w_ih, w_ih.shape[1])
            for g in range(4):
                nn.init.orthogonal_(w_hh[g * hidden:(g + 1) * hidden])
            b_ih.zero_()
            b_ih[hidden:2 * hidden] = 1.0
            b_hh.zero_()
            b_hh.requires_grad_(False)


def _dense_(layer: nn.Linear) -> None:
    """xavier_uniform kernel, zero bias (flaxlab's dense_init)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class BahdanauDecoder(nn.Module):
    """The decoder of models.rnn.Seq2SeqRNN (attention "bahdanau"), bridge included.

    forward(emb [B, T, E] (embedded decoder tokens), encoded [B, S, 2H] (zero at padding),
    summary [B, 2H] = [h->_last; h<-_1], valid bool [B, S]) -> logits [B, T, V] float32.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int,
                 attention_dim: int, dropout: float):
        super().__init__()
        d_enc = 2 * hidden
        self.hidden, self.layers = hidden, layers
        self.bridge = nn.Linear(d_enc, layers * hidden)
        self.attn_query = nn.Linear(hidden, attention_dim, bias=False)   # W_q
        self.attn_key = nn.Linear(d_enc, attention_dim, bias=False)      # U
        self.attn_v = nn.Linear(attention_dim, 1, bias=False)            # v
        self.cells = nn.ModuleList(nn.LSTMCell(embed_dim + d_enc if i == 0 else hidden,
                                               hidden) for i in range(layers))
        self.combine = nn.Linear(hidden + d_enc + embed_dim, hidden)      # [s; c; Ey]
        self.logits = nn.Linear(hidden, vocab_size)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.bridge, self.attn_query, self.attn_key, self.combine,
                      self.logits):
            _dense_(layer)
        nn.init.normal_(self.attn_v.weight, std=attention_dim ** -0.5)
        _init_lstm_([(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in self.cells],
                    hidden)

    def attend(self, query, keys, encoded, valid):
        """query [B, H], keys = U h [B, S, A] -> (context [B, 2H], weights [B, S])."""
        scores = self.attn_v(torch.tanh(self.attn_query(query)[:, None] + keys))[..., 0]
        weights = torch.softmax(scores.masked_fill(~valid, NEG_INF), dim=-1)
        weights = weights * valid   # rows with nothing valid -> 0, as flaxlab
        return torch.bmm(weights[:, None], encoded)[:, 0], weights

    def step(self, emb_t, states, keys, encoded, valid):
        """One step: c_i from the previous top state s_{i-1}, then the cells on
        [E y_{i-1}; c_i]. states: ((h, c) per layer) -> (new states, top h, c_i)."""
        context, _ = self.attend(states[-1][0], keys, encoded, valid)
        x, new = torch.cat([emb_t, context], -1), []
        for i, cell in enumerate(self.cells):
            h, c = cell(x, states[i])
            new.append((h, c))
            x = self.dropout(h) if i < self.layers - 1 else h
        return tuple(new), x, context

    def forward(self, emb, encoded, summary, valid, step=None):
        """step: a compiled self.step (None: self.step)."""
        step = self.step if step is None else step
        s0 = torch.tanh(self.bridge(summary)).split(self.hidden, dim=-1)
        # c_0 = 0, written 0 * s_0 so that the carry requires grad at every step alike
        # (a compiled step would otherwise compile a second time for t = 0).
        states = tuple((s, 0.0 * s) for s in s0)
        keys = self.attn_key(encoded)        # query-independent: once, not per step
        tops, contexts = [], []
        for t in range(emb.shape[1]):
            states, top, context = step(emb[:, t], states, keys, encoded, valid)
            tops.append(top)
            contexts.append(context)
        # The output layer after the loop: one matmul over all steps.
        o = torch.tanh(self.combine(torch.cat([torch.stack(tops, 1),
                                               torch.stack(contexts, 1), emb], -1)))
        return self.logits(self.dropout(o)).float()


class Seq2SeqLSTM(nn.Module):
    """Bi-LSTM encoder + BahdanauDecoder sharing one embedding table.

    forward(inputs int [B, S], decoder_tokens int [B, T], lengths int [B] (CPU; None: the
    non-PAD count of `inputs`), step=None (a compiled self.decoder.step)) -> logits
    [B, T, V] float32. Params: embed.weight, encoder.* (nn.LSTM), decoder.*.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, num_layers: int,
                 decoder_layers: int, attention_dim: int, dropout: float, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=embed_dim ** -0.5)
        self.encoder = nn.LSTM(embed_dim, hidden, num_layers, batch_first=True,
                               bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        enc = self.encoder
        _init_lstm_([tuple(getattr(enc, f"{w}_l{k}{sfx}") for w in
                           ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                     for k in range(num_layers) for sfx in ("", "_reverse")], hidden)
        self.decoder = BahdanauDecoder(vocab_size, embed_dim, hidden, decoder_layers,
                                       attention_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def encode(self, inputs, lengths=None):
        """inputs [B, S] -> (annotations [B, S, 2H] zero at padding, summary [B, 2H],
        valid [B, S])."""
        valid = inputs != self.pad_id
        if lengths is None:
            lengths = valid.sum(1)
        x = self.dropout(self.embed(inputs))
        packed = rnn_utils.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                enforce_sorted=False)
        out, (h_n, _) = self.encoder(packed)
        encoded, _ = rnn_utils.pad_packed_sequence(out, batch_first=True,
                                                   total_length=inputs.shape[1])
        # h_n: the top layer's forward state after each row's last real token and its
        # backward state after position 0 (= flaxlab's [h->_last; h<-_1]).
        return encoded, torch.cat([h_n[-2], h_n[-1]], -1), valid

    def forward(self, inputs, decoder_tokens, lengths=None, step=None):
        encoded, summary, valid = self.encode(inputs, lengths)
        emb = self.dropout(self.embed(decoder_tokens))
        return self.decoder(emb, encoded, summary, valid, step)


def build_seq2seq(vocab_size: int = VOCAB, embed_dim: int = 64, hidden: int = 128,
                  num_layers: int = 1, decoder_layers: int | None = None,
                  attention_dim: int | None = None, dropout: float = 0.0,
                  pad_id: int = PAD, seed: int | None = None) -> Seq2SeqLSTM:
    """The twin of models.rnn.Seq2SeqRNN (its defaults: configs/lstm.py's `default`).

    decoder_layers None = num_layers and attention_dim None = hidden, as RNNConfig.
    seed: torch.manual_seed first (None: the global generator as it is).
    """
    if seed is not None:
        torch.manual_seed(seed)
    return Seq2SeqLSTM(vocab_size, embed_dim, hidden, num_layers,
                       decoder_layers or num_layers, attention_dim or hidden, dropout, pad_id)


def trainable_parameters(model: nn.Module) -> int:
    """The count flaxlab reports (the frozen zero b_hh are not parameters there)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def no_decay(name: str) -> bool:
    """flaxlab's default optim.weight_decay_exclude ('(^|/|_)bias$', '(^|/|_)scale$',
    'embed', '(^|/)cls$') on the flaxlab path of each twin parameter: the embedding and every
    bias (the LSTMs', the bridge's, the logits' and `combine_bias`, the output layer's) are
    not decayed; every weight matrix is."""
    return (name.startswith("embed.") or ".bias_ih" in name or ".bias_hh" in name
            or name in ("decoder.bridge.bias", "decoder.logits.bias", "decoder.combine.bias"))


def seq2seq_loss(logits, targets, weights, label_smoothing: float = 0.0):
    """Token cross-entropy (Szegedy et al. 2016 label smoothing) averaged over the
    weighted tokens: sum(loss * w) / max(sum(w), 1), as train/tasks/common.token_metrics."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                           label_smoothing=label_smoothing)
    w = weights.flatten()
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def shift_right(targets: np.ndarray, bos_id: int = BOS) -> np.ndarray:
    """Decoder inputs: BOS then targets[:, :-1] (teacher forcing)."""
    return np.concatenate([np.full_like(targets[:, :1], bos_id), targets[:, :-1]], 1)


def prepare_batch(batch: dict[str, np.ndarray], device="cpu", pad_id: int = PAD) -> dict:
    """A numpy batch {"inputs", "targets"[, "weights" [B]]} -> tensors on `device`:
    inputs, decoder_tokens, targets, weights [B, T] (non-PAD targets x example weight)
    and lengths (CPU, for packing)."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    w = (targets != PAD).astype(np.float32)
    if batch.get("weights") is not None:
        w = w * np.asarray(batch["weights"], np.float32)[:, None]
    as_long = lambda a: torch.as_tensor(a.astype(np.int64)).to(device)  # noqa: E731
    return {"inputs": as_long(inputs), "decoder_tokens": as_long(shift_right(targets)),
            "targets": as_long(targets), "weights": torch.as_tensor(w).to(device),
            "lengths": torch.as_tensor((inputs != pad_id).sum(1).astype(np.int64))}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int,
                  end_fraction: float = 0.0) -> float:
    """LR multiplier at 0-based step: t / W while warming up, then cosine from 1 to
    end_fraction at total_steps, held after (optax.warmup_cosine_decay_schedule)."""
    if step < warmup_steps:
        return step / warmup_steps
    t = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps -
                                                                    warmup_steps, 1)
    return end_fraction + (1 - end_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def make_seq2seq_step(model: Seq2SeqLSTM, batches: list[dict[str, np.ndarray]],
                      mode: str = "eager", device="cpu", *, lr: float = 2e-3,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      weight_decay: float = 0.0, grad_clip_norm: float = 1.0,
                      warmup_steps: int = 100, total_steps: int = 2000,
                      end_lr_fraction: float = 0.0, label_smoothing: float = 0.0
                      ) -> Callable[[], torch.Tensor]:
    """configs/lstm.py's training step (defaults: its `default`) for the twin.

    Each call trains one step on the next of `batches` in turn (teacher forcing, loss of
    `seq2seq_loss`, backward, clip_grad_norm_ when grad_clip_norm > 0, AdamW, LR
    schedule) and returns the loss tensor (before the update; not synchronized).
    mode "compile" compiles one decoder step (see the module docstring). The model moves to
    `device` in train mode; the batches are put there once.
    """
    model.to(device).train()
    prepared = [prepare_batch(b, device, model.pad_id) for b in batches]
    if not prepared:
        raise ValueError("make_seq2seq_step needs at least one batch")
    if mode not in ("eager", "compile"):
        raise ValueError(f"mode {mode!r}; allowed: eager, compile")
    # One decoder step, compiled once and run T times (its backward too): compiling the
    # whole unrolled T-step loop instead costs minutes of inductor time per T.
    step_fn = torch.compile(model.decoder.step, fullgraph=True) if mode == "compile" \
        else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(   # opt.step() t uses multiplier(t)
        opt, lambda t: warmup_cosine(t, warmup_steps, total_steps, end_lr_fraction))
    params = [p for _, p in named]
    count = 0

    def step() -> torch.Tensor:
        nonlocal count
        b = prepared[count % len(prepared)]
        count += 1
        logits = model(b["inputs"], b["decoder_tokens"], b["lengths"], step=step_fn)
        loss = seq2seq_loss(logits, b["targets"], b["weights"], label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        opt.step()
        schedule.step()
        return loss.detach()
    return step


def random_batches(num: int, batch: int, *, max_input_len: int = 8,
                   max_target_len: int = 72, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of the numbers_to_words format: inputs = the digits of a random number in
    0..999999 (fewer digits when max_input_len < 7) + EOS, targets = 20..64 random
    lowercase letters + EOS (the task's target lengths; at most max_target_len - 1),
    right-padded with PAD, int32."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        inputs = np.zeros((batch, max_input_len), np.int32)
        targets = np.zeros((batch, max_target_len), np.int32)
        for r in range(batch):
            digits = str(int(rng.integers(0, 10 ** min(6, max_input_len - 1)))).encode()
            inputs[r, :len(digits)] = np.frombuffer(digits, np.uint8) + BYTE_OFFSET
            inputs[r, len(digits)] = EOS
            top = min(64, max_target_len - 1)
            n = int(rng.integers(min(20, top), top + 1))
            targets[r, :n] = rng.integers(ord("a"), ord("z") + 1, n) + BYTE_OFFSET
            targets[r, n] = EOS
        out.append({"inputs": inputs, "targets": targets})
    return out


def run_seq2seq_benchmark(args, device: torch.device) -> None:
    model = build_seq2seq(embed_dim=args.embed_dim, hidden=args.hidden,
                          num_layers=args.layers, seed=args.seed)
    step = make_seq2seq_step(model, random_batches(args.num_batches, args.batch,
                                                   seed=args.seed), args.mode, device)
    name = f"torch_lstm_seq2seq_{args.mode}"
    t0 = time.perf_counter()
    first = float(step())           # compiles in compile mode
    synchronize(device)
    first_s = time.perf_counter() - t0
    t = time_step(step, device, warmup=max(args.warmup - 1, 0), windows=args.windows,
                  steps=args.steps)
    emit(f"{name}_step_ms", t["ms"], "ms",
         f"B={args.batch} S=8 T=72 E={args.embed_dim} H={args.hidden} L={args.layers} "
         f"spread={t['spread_pct']:.1f}% loss {first:.4f} -> {float(t['last']):.4f}")
    emit(f"{name}_first_step_s", first_s, "s", "(the first step; compile mode compiles)")
    emit("torch_lstm_seq2seq_params", trainable_parameters(model), "params")


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------
def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="benchmarks/rnn_step.py's LSTM / GRU step")
    s.add_argument("--cells", "--cell", dest="cells", default="lstm",
                   help="comma-separated: lstm, gru, rnn")
    s.add_argument("--dtypes", "--dtype", dest="dtypes", default="float32",
                   help="comma-separated: float32, bfloat16, float16")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--seq_len", type=int, default=256)
    s.add_argument("--input", type=int, default=512)
    s.add_argument("--hidden", type=int, default=1024)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--lr", type=float, default=1e-3)
    add_common_flags(s)
    q = sub.add_parser("seq2seq", help="configs/lstm.py default's training step")
    q.add_argument("--mode", default="eager", choices=("eager", "compile"))
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--embed_dim", type=int, default=64)
    q.add_argument("--hidden", type=int, default=128)
    q.add_argument("--layers", type=int, default=1)
    q.add_argument("--num_batches", type=int, default=4, help="distinct batches, in turn")
    add_common_flags(q, steps=10, windows=5, warmup=3)
    args = p.parse_args(argv)
    for key in ("batch", "hidden", "layers", "steps", "windows"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup(args)
    if args.what == "step":
        failures = run_step_benchmarks(args, device)
        n = len(_split(args.cells)) * len(_split(args.dtypes))
        return 1 if failures == n else 0   # some figures came: the harness takes them
    run_seq2seq_benchmark(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
