"""Recurrent layers: simple RNN, LSTM and GRU cells scanned over time; stacked,
bidirectional, variable-length; the LSTM through cuDNN on NVIDIA GPUs.

Cells (x_t input [B, I], h_{t-1} state [B, H], s = sigmoid, * elementwise). Every cell's
input projection x W + b is one [I, G*H] kernel for its G gates, the recurrent one a
[H, G*H] kernel, so a sequence's input projection is ONE matmul [B, T, I] x [I, G*H]
before the scan (`hoist_input_projection`), and only h U runs inside it.
  rnn   h_t = tanh(x_t W + b + h_{t-1} U)                                 (Elman 1990)
  lstm  gates in cuDNN / PyTorch order (i, f, g, o), no peepholes (as cuDNN):
        i, f, o = s(.), g = tanh(.);  c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)
        (Hochreiter & Schmidhuber 1997 with the forget gate of Gers et al. 2000; the forget
        bias starts at 1, Gers et al. 2000 / Jozefowicz et al. 2015.)
  gru   gates (r, z, n) as cuDNN / PyTorch:  r, z = s(.)
        h_t = z * h_{t-1} + (1 - z) * n_t       -- Cho et al. 2014, eq. 7 (and PyTorch/cuDNN):
        z is the share KEPT from the old state. Popular explanations (after Yang et al.
        2016; colah's blog) write (1 - z) h_{t-1} + z n_t; the same family under z -> 1 - z.
        We follow the GRU paper, so PyTorch/cuDNN weights port unchanged.
        Where r acts: `gru_reset_after=False` is Cho et al.: n = tanh(x W_n + b_n +
        (r * h_{t-1}) U_n), r before the recurrent matmul. True (default) is cuDNN/PyTorch
        (and Yang et al. 2016, eq. 3): n = tanh(x W_n + b_n + r * (h_{t-1} U_n + b_hn)),
        r after it -- one [H, 3H] recurrent matmul per step instead of two dependent ones.

Sequences are batch-major [B, T, I]. `lengths` [B] (RIGHT-padded: position t is real iff
t < length) makes padding inert: the state is carried unchanged over it, outputs there are
zero, and the backward direction reverses each sequence within its own length, so it
starts at the sequence's true end. States are float32 whatever the compute dtype (the LSTM
cell state accumulates over the whole sequence; float64 for a float64 config, used by the
gradient checks); matmul operands are cast to `dtype`.

`implementation`: "scan" (lax.scan), "cudnn" or "auto". cuDNN (jax.experimental.rnn) is
used for LSTMs in float32 on an NVIDIA GPU with the default dot_general; anything else runs
the scan ("auto" silently, "cudnn" with a warning), never an error. Both run from the SAME
parameters (`to_cudnn_weights` / `from_cudnn_weights`).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import initializers

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
MERGES = ("concat", "sum")
IMPLEMENTATIONS = ("scan", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: gradient checks
DIRECTIONS = ("fwd", "bwd")


class LSTMState(NamedTuple):
    h: jax.Array   # [B, H] hidden state (the output)
    c: jax.Array   # [B, H] cell state


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """A stack of recurrent layers (see the module docstring)."""
    cell: str = "lstm"                     # "rnn" | "lstm" | "gru"
    hidden: int = 128                      # H, per direction
    num_layers: int = 1
    bidirectional: bool = False
    merge: str = "concat"                  # directions: "concat" (2H) | "sum" (H)
    dropout: float = 0.0                   # between layers (not after the last), training
    residual: bool = False                 # GNMT: layer i >= 1 adds its input to its output
    hoist_input_projection: bool = True    # x W + b for all steps as one matmul
    implementation: str = "auto"           # "scan" | "cudnn" | "auto"
    gru_reset_after: bool = True           # r after (cuDNN) or before (Cho 2014) h U_n
    forget_bias: float = 1.0               # LSTM forget-gate bias at initialization
    unroll: int = 1                        # lax.scan unroll (steps per loop iteration)
    dtype: str = "float32"                 # matmul compute dtype
    param_dtype: str = "float32"
    kernel_init: str = "lecun_normal"      # input kernels (fan-in only: gate-count free)
    recurrent_init: str = "orthogonal"     # recurrent kernels: one orthogonal block per gate
    dot_general: Callable = lax.dot_general  # every matmul of the scan path goes through it

    def __post_init__(self):
        inits = initializers.NAMES + ("orthogonal",)   # see _init
        for key, allowed in (("cell", CELLS), ("merge", MERGES),
                             ("implementation", IMPLEMENTATIONS), ("dtype", DTYPES),
                             ("param_dtype", DTYPES), ("kernel_init", inits),
                             ("recurrent_init", inits)):
            variants.check_one_of("recurrent", key, getattr(self, key), allowed)
        for key in ("hidden", "num_layers", "unroll"):
            if getattr(self, key) <= 0:
                raise ValueError(f"recurrent.{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"recurrent.dropout must be in [0, 1), got {self.dropout}")

    def replace(self, **changes) -> "RecurrentConfig":
        return dataclasses.replace(self, **changes)

    @property
    def state_dtype(self):
        """Carries and gate arithmetic: float32 (float64 for a float64 config)."""
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.bidirectional else DIRECTIONS[:1]

    @property
    def output_size(self) -> int:
        """Features per position out of every layer: 2H for concat bidirectional, else H."""
        return self.hidden * (2 if self.bidirectional and self.merge == "concat" else 1)


# ----------------------------------------------------------------------------------------
# Parameters.
# ----------------------------------------------------------------------------------------
def _init(name: str, gates: int) -> Callable:
    if name != "orthogonal":
        return initializers.get(name)

    def init(key, shape, dtype=jnp.float32):   # [H, G*H]: G independent orthogonal blocks
        # QR in float32 (XLA has no bfloat16 QR), then cast.
        blocks = [jax.nn.initializers.orthogonal()(k, (shape[0], shape[0]), jnp.float32)
                  for k in jax.random.split(key, gates)]
        return jnp.concatenate(blocks, axis=1).astype(dtype)
    return init


class CellParams(nn.Module):
    """One cell's parameters, returned as a dict of arrays (the scan is a pure function).

    input_kernel [I, G*H], recurrent_kernel [H, G*H], bias [G*H] (the LSTM's forget slice
    starts at cfg.forget_bias) and, for a reset-after GRU, recurrent_bias [H] (b_hn, which
    r multiplies; the recurrent biases of r and z would duplicate `bias`).
    """
    cfg: RecurrentConfig
    input_size: int

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        cfg, h, g = self.cfg, self.cfg.hidden, self.cfg.gates
        pdt = jnp.dtype(cfg.param_dtype)

        def bias_init(key, shape, dtype):
            b = jnp.zeros(shape, dtype)
            return b.at[h:2 * h].set(cfg.forget_bias) if cfg.cell == "lstm" else b
        p = {"input_kernel": self.param("input_kernel", _init(cfg.kernel_init, g),
                                        (self.input_size, g * h), pdt),
             "recurrent_kernel": self.param("recurrent_kernel", _init(cfg.recurrent_init, g),
                                            (h, g * h), pdt),
             "bias": self.param("bias", bias_init, (g * h,), pdt)}
        if cfg.cell == "gru" and cfg.gru_reset_after:
            p["recurrent_bias"] = self.param("recurrent_bias", nn.initializers.zeros, (h,),
                                             pdt)
        return p


class _LayerParams(nn.Module):
    """{"fwd": CellParams, ["bwd": CellParams]} of one layer."""
    cfg: RecurrentConfig
    input_size: int

    @nn.compact
    def __call__(self):
        cfg, size = self.cfg, self.input_size
        return {d: CellParams(cfg, size, name=d)() for d in cfg.directions}


# ----------------------------------------------------------------------------------------
# Cells: pure step functions on projected inputs xw_t = x_t W + b.
# ----------------------------------------------------------------------------------------
def _dot(x, w, cfg: RecurrentConfig):
    """x [..., K] @ w [K, N] in the compute dtype, through cfg.dot_general."""
    dt = jnp.dtype(cfg.dtype)
    return cfg.dot_general(x.astype(dt), w.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))


def project_inputs(p, x, cfg: RecurrentConfig):
    """x [..., I] -> x W + b [..., G*H] (compute dtype)."""
    return _dot(x, p["input_kernel"], cfg) + p["bias"].astype(cfg.dtype)


def cell_step(p, carry, xw, cfg: RecurrentConfig):
    """One step from the projected input xw [B, G*H]: (new carry, output h [B, H] f32).

    carry: h [B, H] (rnn, gru) or LSTMState(h, c), float32.
    """
    f32, sig = cfg.state_dtype, jax.nn.sigmoid
    xw = xw.astype(f32)
    h = carry.h if cfg.cell == "lstm" else carry
    if cfg.cell == "rnn":
        h = jnp.tanh(xw + _dot(h, p["recurrent_kernel"], cfg).astype(f32))
        return h, h
    if cfg.cell == "lstm":
        gates = xw + _dot(h, p["recurrent_kernel"], cfg).astype(f32)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = sig(f) * carry.c + sig(i) * jnp.tanh(g)
        h = sig(o) * jnp.tanh(c)
        return LSTMState(h, c), h
    size = h.shape[-1]
    u = p["recurrent_kernel"]
    x_r, x_z, x_n = jnp.split(xw, 3, axis=-1)
    if cfg.gru_reset_after:   # cuDNN / PyTorch: r * (h U_n + b_hn), one fused matmul
        h_r, h_z, h_n = jnp.split(_dot(h, u, cfg).astype(f32), 3, axis=-1)
        r, z = sig(x_r + h_r), sig(x_z + h_z)
        n = jnp.tanh(x_n + r * (h_n + p["recurrent_bias"].astype(f32)))
    else:                     # Cho et al. 2014: (r * h) U_n, after r is known
        h_r, h_z = jnp.split(_dot(h, u[:, :2 * size], cfg).astype(f32), 2, axis=-1)
        r, z = sig(x_r + h_r), sig(x_z + h_z)
        n = jnp.tanh(x_n + _dot(r * h, u[:, 2 * size:], cfg).astype(f32))
    h = z * h + (1.0 - z) * n
    return h, h


def zero_carry(cfg: RecurrentConfig, batch: int):
    h = jnp.zeros((batch, cfg.hidden), cfg.state_dtype)
    return LSTMState(h, h) if cfg.cell == "lstm" else h


def zero_state(cfg: RecurrentConfig, batch: int):
    """Initial state of a whole stack: tuple over layers of tuple over directions."""
    return tuple(tuple(zero_carry(cfg, batch) for _ in cfg.directions)
                 for _ in range(cfg.num_layers))


# ----------------------------------------------------------------------------------------
# The scan path.
# ----------------------------------------------------------------------------------------
def reverse_within_length(x, lengths):
    """x [B, T, ...]: each row's first `length` steps reversed, padding left in place.

    An involution; with lengths=None the whole time axis is reversed.
    """
    if lengths is None:
        return x[:, ::-1]
    t = jnp.arange(x.shape[1])[None, :]
    idx = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scan_direction(p, x, cfg: RecurrentConfig, carry, mask=None):
    """One forward pass over time. x [B, T, I] (or [B, T, G*H] already projected when
    cfg.hoist_input_projection), mask bool [B, T] or None -> (outputs [B, T, H] in cfg.dtype
    (zero where masked), final carry: the carry after each row's last real step)."""
    def body(carry, inputs):
        x_t, m_t = inputs
        xw = x_t if cfg.hoist_input_projection else project_inputs(p, x_t, cfg)
        new, h = cell_step(p, carry, xw, cfg)
        if m_t is not None:   # padding: keep the state, emit zeros
            new = jax.tree.map(lambda n, o: jnp.where(m_t[:, None], n, o), new, carry)
            h = jnp.where(m_t[:, None], h, 0.0)
        return new, h.astype(cfg.dtype)

    xs = (jnp.swapaxes(x, 0, 1), None if mask is None else jnp.swapaxes(mask, 0, 1))
    carry, hs = lax.scan(body, carry, xs, unroll=cfg.unroll)
    return jnp.swapaxes(hs, 0, 1), carry


def scan_layer(layer_params, x, cfg: RecurrentConfig, carries, lengths=None):
    """One (bi)directional layer: x [B, T, I] -> (per-direction outputs, final carries)."""
    mask = None if lengths is None else jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    outs, finals = [], []
    for d, carry in zip(cfg.directions, carries):
        p = layer_params[d]
        # Hoisting: ONE [B, T, I] x [I, G*H] matmul (+ bias) for every step at once.
        xin = project_inputs(p, x, cfg) if cfg.hoist_input_projection else x
        if d == "bwd":
            xin = reverse_within_length(xin, lengths)
        y, final = scan_direction(p, xin, cfg, carry, mask)
        outs.append(reverse_within_length(y, lengths) if d == "bwd" else y)
        finals.append(final)
    return outs, tuple(finals)


def _merge(outs, cfg: RecurrentConfig):
    if len(outs) == 1:
        return outs[0]
    return jnp.concatenate(outs, -1) if cfg.merge == "concat" else outs[0] + outs[1]


def _between_layers(y, layer_input, i, cfg, mask, dropout_rng):
    """Residual x_{i+1} = RNN_i(x_i) + x_i (Wu et al. 2016, GNMT) on every layer i >= 1,
    whose input has the output's width (GNMT starts at the third layer of its 8), padding
    back to zero, and dropout on what feeds the next layer (Zaremba et al. 2014: not on the
    recurrent connections)."""
    if cfg.residual and i >= 1:
        y = y + layer_input
    if mask is not None:
        y = jnp.where(mask[..., None], y, 0.0)
    if dropout_rng is not None and cfg.dropout > 0 and i < cfg.num_layers - 1:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), 1.0 - cfg.dropout,
                                    y.shape)
        y = jnp.where(keep, y / (1.0 - cfg.dropout), 0.0)
    return y.astype(cfg.dtype)


def scan_stack(params, x, cfg: RecurrentConfig, *, lengths=None, initial_state=None,
               dropout_rng=None):
    """The stack through lax.scan. params: {"layers_i": {"fwd": .., "bwd": ..}}.

    x [B, T, I] -> (outputs [B, T, cfg.output_size] in cfg.dtype, final state: tuple over
    layers of tuple over directions of carries). dropout_rng None = no dropout.
    """
    state = zero_state(cfg, x.shape[0]) if initial_state is None else initial_state
    mask = None if lengths is None else jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    finals, y = [], x
    for i in range(cfg.num_layers):
        outs, final = scan_layer(params[f"layers_{i}"], y, cfg, state[i], lengths)
        y = _between_layers(_merge(outs, cfg), y, i, cfg, mask, dropout_rng)
        finals.append(final)
    return y, tuple(finals)


# ----------------------------------------------------------------------------------------
# cuDNN (jax.experimental.rnn): packing and the call.
# ----------------------------------------------------------------------------------------
# cuDNN's packed LSTM weights (see jax/experimental/rnn.py): for every pseudo-layer
# (fwd 0, bwd 0, fwd 1, ...) W_ih [4H, I_l] then W_hh [4H, H]; after all of them, for every
# pseudo-layer b_ih [4H] then b_hh [4H]. Gate order (i, f, g, o) -- ours. Our single bias is
# b_ih, b_hh is zero; unpacking sums the two, so ours -> cuDNN -> ours is exact.
def to_cudnn_weights(params, cfg: RecurrentConfig) -> jax.Array:
    """Our LSTM stack params -> cuDNN's flat float32 weight vector."""
    if cfg.cell != "lstm":
        raise ValueError(f"cuDNN weights exist for the LSTM only, not {cfg.cell!r}")
    cells = [params[f"layers_{i}"][d] for i in range(cfg.num_layers) for d in cfg.directions]
    f32 = lambda a: a.astype(jnp.float32).T.reshape(-1)  # noqa: E731  [in, 4H] -> [4H, in]
    mats = [m for p in cells for m in (f32(p["input_kernel"]), f32(p["recurrent_kernel"]))]
    biases = [b for p in cells for b in (p["bias"].astype(jnp.float32),
                                         jnp.zeros_like(p["bias"], jnp.float32))]
    return jnp.concatenate(mats + biases)


def from_cudnn_weights(flat, cfg: RecurrentConfig, input_size: int):
    """cuDNN's flat LSTM weights -> our params tree (bias = b_ih + b_hh), param_dtype."""
    h, pdt, offset = cfg.hidden, jnp.dtype(cfg.param_dtype), 0

    def take(rows, cols=1):
        nonlocal offset
        offset += rows * cols
        return flat[offset - rows * cols:offset].reshape(rows, cols)
    cells = [(i, d, input_size if i == 0 else cfg.output_size)
             for i in range(cfg.num_layers) for d in cfg.directions]
    kernels = [(take(4 * h, size), take(4 * h, h)) for _, _, size in cells]
    out = {}
    for (i, d, _), (w_ih, w_hh) in zip(cells, kernels):
        bias = (take(4 * h) + take(4 * h))[:, 0]
        out.setdefault(f"layers_{i}", {})[d] = {
            "input_kernel": w_ih.T.astype(pdt), "recurrent_kernel": w_hh.T.astype(pdt),
            "bias": bias.astype(pdt)}
    if offset != flat.shape[0]:
        raise ValueError(f"cuDNN weights hold {flat.shape[0]} values, the config {offset}")
    return out


def cudnn_unsupported_reason(cfg: RecurrentConfig) -> str | None:
    """Why the cuDNN path cannot run `cfg` here (None: it can)."""
    if cfg.cell != "lstm":
        return f"jax.experimental.rnn has no cuDNN {cfg.cell.upper()}, only the LSTM"
    if cfg.dtype != "float32" or cfg.param_dtype != "float32":
        return "jax.experimental.rnn's cuDNN LSTM supports float32 only"
    if cfg.dot_general is not lax.dot_general:
        return "a custom dot_general cannot reach inside cuDNN"
    device = jax.devices()[0]
    if device.platform != "gpu" or "rocm" in str(
            getattr(device.client, "platform_version", "")).lower():
        return f"no NVIDIA GPU (backend {device.platform})"
    try:
        from jax.experimental import rnn  # noqa: F401,PLC0415
    except ImportError as e:
        return f"jax.experimental.rnn unavailable: {e}"
    return None


def resolve_implementation(cfg: RecurrentConfig) -> str:
    """"scan" or "cudnn": what `Recurrent` will run for this config on this backend."""
    if cfg.implementation == "scan":
        return "scan"
    reason = cudnn_unsupported_reason(cfg)
    if reason is None:
        return "cudnn"
    if cfg.implementation == "cudnn":
        warnings.warn(f"recurrent implementation 'cudnn' falls back to the scan: {reason}",
                      stacklevel=2)
    return "scan"


def _cudnn_call(flat, x, lengths, carries, cfg, num_layers, input_size):
    """One jax.experimental.rnn.lstm call over `num_layers` layers; carries are LSTMStates
    in pseudo-layer order. -> (y [B, T, D*H] f32, final LSTMStates)."""
    from jax.experimental import rnn  # noqa: PLC0415 -- GPU only, import on use
    h0 = jnp.stack([c.h for c in carries]).astype(jnp.float32)
    c0 = jnp.stack([c.c for c in carries]).astype(jnp.float32)
    # cuDNN fails on zero-length sequences (jax-ml/jax#17966): run those for one step and
    # restore their initial state below (their outputs are masked to zero anyway).
    seq = jnp.maximum(lengths, 1).astype(jnp.int32)
    y, hn, cn = rnn.lstm(x.astype(jnp.float32), h0, c0, flat, seq, input_size=input_size,
                         hidden_size=cfg.hidden, num_layers=num_layers, dropout=0.0,
                         bidirectional=cfg.bidirectional)
    empty = (lengths == 0)[None, :, None]
    hn, cn = jnp.where(empty, h0, hn), jnp.where(empty, c0, cn)
    return y, [LSTMState(hn[k], cn[k]) for k in range(len(carries))]


def cudnn_stack(params, x, cfg: RecurrentConfig, *, lengths=None, initial_state=None,
                dropout_rng=None):
    """`scan_stack` through cuDNN (same params, same returns; NVIDIA GPU, float32 LSTM).

    All layers go into one cuDNN call (cuDNN overlaps them) unless something must happen
    between layers -- residuals, dropout, merge="sum" -- then one call per layer.
    """
    batch, steps, size = x.shape
    state = zero_state(cfg, batch) if initial_state is None else initial_state
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths
    mask = jnp.arange(steps)[None, :] < lengths[:, None]
    fused = (not cfg.residual and (dropout_rng is None or cfg.dropout == 0)
             and (not cfg.bidirectional or cfg.merge == "concat"))
    if fused:
        flat = to_cudnn_weights(params, cfg)
        y, finals = _cudnn_call(flat, x, lengths, [c for layer in state for c in layer],
                                cfg, cfg.num_layers, size)
        y = jnp.where(mask[..., None], y, 0.0).astype(cfg.dtype)
        nd = len(cfg.directions)
        return y, tuple(tuple(finals[i * nd:(i + 1) * nd]) for i in range(cfg.num_layers))
    one = cfg.replace(num_layers=1)
    finals, y = [], x
    for i in range(cfg.num_layers):
        flat = to_cudnn_weights({"layers_0": params[f"layers_{i}"]}, one)
        out, final = _cudnn_call(flat, y, lengths, list(state[i]), cfg, 1, y.shape[-1])
        outs = jnp.split(out, len(cfg.directions), axis=-1)
        y = _between_layers(_merge(outs, cfg), y, i, cfg, mask, dropout_rng)
        finals.append(tuple(final))
    return y, tuple(finals)


# ----------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------
class Recurrent(nn.Module):
    """A stack of (bi)directional recurrent layers.

    __call__(x [B, T, I], *, lengths int [B] | None, initial_state, train) ->
      (outputs [B, T, cfg.output_size] in cfg.dtype, zero at padding;
       final state: tuple over layers of tuple over directions ("fwd"[, "bwd"]) of the
       carry after each row's last real step -- h [B, H] or LSTMState(h, c), float32).
    Params: layers_{i}/{fwd,bwd}/{input_kernel, recurrent_kernel, bias[, recurrent_bias]}.
    """
    cfg: RecurrentConfig

    @nn.compact
    def __call__(self, x, *, lengths=None, initial_state=None, train: bool = False):
        cfg = self.cfg
        if x.ndim != 3:
            raise ValueError(f"recurrent inputs must be [batch, time, features], got "
                             f"{x.shape}")
        params, size = {}, x.shape[-1]
        for i in range(cfg.num_layers):
            params[f"layers_{i}"] = _LayerParams(cfg, size, name=f"layers_{i}")()
            size = cfg.output_size
        use_dropout = train and cfg.dropout > 0 and cfg.num_layers > 1
        rng = self.make_rng("dropout") if use_dropout else None
        if lengths is not None:
            lengths = jnp.clip(lengths.astype(jnp.int32), 0, x.shape[1])
        stack = cudnn_stack if resolve_implementation(cfg) == "cudnn" else scan_stack
        return stack(params, x, cfg, lengths=lengths, initial_state=initial_state,
                     dropout_rng=rng)


def param_count(cfg: RecurrentConfig, input_size: int) -> int:
    """Parameters of a stack (for benchmarks / sanity checks)."""
    g, h = cfg.gates, cfg.hidden
    extra = h if cfg.cell == "gru" and cfg.gru_reset_after else 0
    total, size = 0, input_size
    for _ in range(cfg.num_layers):
        total += len(cfg.directions) * (size * g * h + h * g * h + g * h + extra)
        size = cfg.output_size
    return total
