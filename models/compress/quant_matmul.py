"""Activation quantization through the models' `dot_general` hook, and its calibration.

Every matmul of the model zoo (Dense, attention scores and values, tied unembedding)
calls a config field `dot_general` with `lax.dot_general`'s signature, lhs = the
activation, rhs = the weight (or, in attention, the keys / values). `make_dot_general`
returns a drop-in replacement:

  "none"     lax.dot_general itself.
  "fake"     QAT: both operands fake-quantized with straight-through gradients
             (`affine.fake_quant`), then a float matmul. Trainable.
  "dynamic"  dynamic-range quantization: both operands to integers with ranges measured on
             the current batch, one int8 x int8 matmul accumulated in int32
             (`preferred_element_type`), then a float rescale. Inference only (no gradient).
  "static"   the same integer path, with the activation's range fixed by `calibrate`.

Granularity: the activation (lhs) gets one scale per tensor (symmetric or with a zero
point); the rhs is symmetric with one scale per output (reduced over its contracting dims
only), so every scale factors out of the contraction:

  sum_k S_a (q_a - Z_a) S_w q_w  =  S_a S_w [ sum_k q_a q_w  -  Z_a sum_k q_w ]

which is Jacob et al. 2018 eq. 7 with the weight zero point 0. An asymmetric activation
code (0..2^b-1) is shifted by 2^(b-1) into the signed int8 container first (q - Z is
unchanged), so the hardware-friendly product is always int8 x int8 -> int32.

Calibration (static ranges). `calibrate(apply_fn, batches, observer)` runs
`apply_fn(recording_dot_general, batch)` per batch. The recorder numbers its calls in
order *at trace time* (call site i = the i-th dot_general the forward pass traces) and
sends each call's activation to a host observer with `jax.debug.callback`, so the forward
pass may be jitted or not. `make_dot_general("static", calibration=c)` numbers its calls
the same way (modulo the number of sites, so re-tracing a whole forward pass starts over)
and checks each call's dimension numbers and contracted sizes against the recorded site.
Limits: the forward pass must make the same calls in the same order as during calibration
(same model and options; a model that skips a matmul breaks the numbering, which the
signature check catches only when shapes differ); under nn.scan (scan_layers) one traced
call site serves every layer, so the layers share a range (the min/max observer takes
their union; the moving average and percentile observers see them in arbitrary order).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.compress import affine

Array = jax.Array
MODES = ("none", "fake", "dynamic", "static")
OBSERVERS = ("minmax", "moving_average", "percentile")


# ----------------------------------------------------------------------------------------
# The integer matmul.
# ----------------------------------------------------------------------------------------
def _rhs_to_output(t: Array, dims, lhs_ndim: int) -> Array:
    """A rhs-shaped array with its contracting dims reduced to size 1 -> broadcastable to
    dot_general's output [batch..., lhs free..., rhs free...]."""
    (lc, rc), (lb, rb) = dims
    rhs_free = [d for d in range(t.ndim) if d not in rc and d not in rb]
    t = jnp.transpose(t, tuple(rb) + tuple(rhs_free) + tuple(rc))
    n_lhs_free = lhs_ndim - len(lc) - len(lb)
    nb = len(rb)
    return t.reshape(t.shape[:nb] + (1,) * n_lhs_free + t.shape[nb:nb + len(rhs_free)])


def quantize_rhs(rhs: Array, dims, bits: int) -> tuple[Array, Array]:
    """Symmetric per-output quantization of the rhs: (int32 q, float32 scale keepdims)."""
    rc = tuple(dims[0][1])
    r = lax.stop_gradient(rhs)
    amax = jnp.max(jnp.abs(r), axis=rc, keepdims=True) if rc else jnp.abs(r)
    scale, _ = affine.scale_and_zero_point(-amax, amax, bits, True)
    return affine.quantize_with(r, scale, None, bits, True), scale


def int_dot_general(lhs: Array, rhs: Array, dims, lhs_range: tuple[Any, Any], bits: int = 8,
                    symmetric: bool = True, out_dtype: Any = jnp.float32) -> Array:
    """Quantize lhs (range `lhs_range`, per tensor) and rhs (per output), multiply in
    int8 with int32 accumulation, rescale to `out_dtype`. Same result shape as
    lax.dot_general(lhs, rhs, dims)."""
    if bits > 8:
        raise ValueError(f"integer matmul needs bits <= 8 (int8 operands), got {bits}")
    s_l, z_l = affine.scale_and_zero_point(*lhs_range, bits, symmetric)
    q_l = affine.quantize_with(lax.stop_gradient(lhs), s_l, z_l, bits, symmetric)
    if not symmetric:                         # 0..2^b-1 -> signed, keeping q - Z
        shift = 2 ** (bits - 1)
        q_l, z_l = q_l - shift, z_l - shift
    q_r, s_r = quantize_rhs(rhs, dims, bits)
    acc = lax.dot_general(q_l.astype(jnp.int8), q_r.astype(jnp.int8), dims,
                          preferred_element_type=jnp.int32)
    if not symmetric:                         # - Z_a sum_k q_w (Jacob et al. eq. 7)
        col = jnp.sum(q_r, axis=tuple(dims[0][1]), keepdims=True, dtype=jnp.int32)
        acc = acc - z_l * _rhs_to_output(col, dims, lhs.ndim)
    scale = s_l * _rhs_to_output(s_r, dims, lhs.ndim)
    return (acc.astype(jnp.float32) * scale).astype(out_dtype)


# ----------------------------------------------------------------------------------------
# Call sites and calibration.
# ----------------------------------------------------------------------------------------
def _signature(lhs, rhs, dims) -> tuple:
    """What identifies a call site across batches: dimension numbers and contracted sizes."""
    (lc, rc), (lb, rb) = dims
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)),
            tuple(rhs.shape[d] for d in rc))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Static activation ranges: one (lo, hi) per dot_general call site, in call order."""
    observer: str
    ranges: tuple[tuple[float, float], ...]
    sites: tuple[tuple, ...]          # each site's `_signature`


class _SiteCounter:
    """Numbers dot_general calls in trace order; `check` matches them to known sites."""

    def __init__(self, sites: Sequence[tuple] | None = None):
        self.sites = list(sites or [])
        self.count = 0
        self.frozen = sites is not None

    def next(self, signature: tuple) -> int:
        if self.frozen:
            site = self.count % len(self.sites)
            if self.sites[site] != signature:
                raise ValueError(
                    f"dot_general call #{self.count} (site {site}) has signature "
                    f"{signature}, but the calibration recorded {self.sites[site]} there: "
                    "the model or its call order differs from the calibrated one")
        else:
            site = self.count
            if site < len(self.sites) and self.sites[site] != signature:
                raise ValueError(f"call site {site} changed between calibration batches: "
                                 f"{self.sites[site]} then {signature}")
            if site == len(self.sites):
                self.sites.append(signature)
        self.count += 1
        return site


class MinMaxObserver:
    """Running min and max over every value seen."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MovingAverageObserver:
    """Exponential moving average of each batch's min and max: m <- m + c (batch - m),
    initialized with the first batch (c = 0.01 like PyTorch's
    MovingAverageMinMaxObserver; TF's QAT uses the same EMA form)."""

    def __init__(self, averaging_constant: float = 0.01):
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant
        self.lo = self.hi = None

    def update(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class PercentileObserver:
    """Clip the tails: symmetric -> +-(the p-th percentile of |x|); asymmetric -> the
    (100-p)-th and p-th percentiles of x; over all values of all batches (kept on the
    host, so meant for a few small calibration batches)."""

    def __init__(self, percentile: float = 99.99, symmetric: bool = True):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.p, self.symmetric, self.values = percentile, symmetric, []

    def update(self, x: np.ndarray) -> None:
        self.values.append(np.asarray(x, np.float32).reshape(-1))

    def range(self) -> tuple[float, float]:
        x = np.concatenate(self.values)
        if self.symmetric:
            a = float(np.percentile(np.abs(x), self.p))
            return -a, a
        return float(np.percentile(x, 100.0 - self.p)), float(np.percentile(x, self.p))


_OBSERVER_CLASSES = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver,
                     "percentile": PercentileObserver}


class RecordingDotGeneral:
    """lax.dot_general that also hands each call's lhs to a per-site observer."""

    def __init__(self, observer: str = "minmax", **observer_kwargs):
        if observer not in _OBSERVER_CLASSES:
            raise ValueError(f"observer={observer!r} is not supported; allowed: "
                             f"{', '.join(OBSERVERS)}")
        cls = _OBSERVER_CLASSES[observer]
        allowed = tuple(inspect.signature(cls).parameters)
        unknown = sorted(set(observer_kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"observer {observer!r} has no option(s) {unknown}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
        self.observer = observer
        self.make_observer = functools.partial(cls, **observer_kwargs)
        self.make_observer()                              # validate the values now
        self.counter = _SiteCounter()
        self.observers: dict[int, Any] = {}

    def _observe(self, site: int, x) -> None:
        if site not in self.observers:
            self.observers[site] = self.make_observer()
        self.observers[site].update(np.asarray(x))

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, **kwargs):
        site = self.counter.next(_signature(lhs, rhs, dimension_numbers))
        jax.debug.callback(functools.partial(self._observe, site), lhs)
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)

    def result(self) -> Calibration:
        missing = [i for i in range(len(self.counter.sites)) if i not in self.observers]
        if not self.counter.sites or missing:
            raise ValueError(f"no activations were recorded for call sites {missing or 'any'}"
                             ": did apply_fn run the model with the dot_general it was given?")
        return Calibration(self.observer,
                           tuple(self.observers[i].range() for i in range(len(self.observers))),
                           tuple(self.counter.sites))


def calibrate(apply_fn: Callable[[Callable, Any], Any], batches: Iterable[Any],
              observer: str = "minmax", **observer_kwargs) -> Calibration:
    """Static activation ranges per dot_general call site.

    Args:
      apply_fn: (dot_general, batch) -> outputs; runs the model's forward pass with that
        dot_general in its config (jitted or not; see the module docstring).
      batches: a few representative inputs.
      observer: "minmax" | "moving_average" (averaging_constant=0.01) | "percentile"
        (percentile=99.99, symmetric=True).
    """
    rec = RecordingDotGeneral(observer, **observer_kwargs)
    for batch in batches:
        rec.counter.count = 0           # each batch is one forward pass: sites from 0
        jax.block_until_ready(apply_fn(rec, batch))
        jax.effects_barrier()           # every callback of this batch has run
    return rec.result()


# ----------------------------------------------------------------------------------------
# The drop-in dot_general.
# ----------------------------------------------------------------------------------------
class QuantDotGeneral:
    """A quantizing lax.dot_general (see `make_dot_general`)."""

    def __init__(self, mode: str, bits: int, symmetric: bool,
                 calibration: Calibration | None):
        self.mode, self.bits, self.symmetric = mode, bits, symmetric
        self.calibration = calibration
        self.counter = None if calibration is None else _SiteCounter(calibration.sites)

    def __repr__(self):
        return (f"QuantDotGeneral(mode={self.mode!r}, bits={self.bits}, "
                f"symmetric={self.symmetric}, calibrated={self.calibration is not None})")

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, **kwargs):
        floating = all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in (lhs, rhs))
        if self.mode == "none" or not floating:
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
        bounds = None
        if self.counter is not None:
            site = self.counter.next(_signature(lhs, rhs, dimension_numbers))
            bounds = tuple(jnp.float32(v) for v in self.calibration.ranges[site])
        if self.mode == "fake":
            rc = tuple(dimension_numbers[0][1])
            lhs = affine.fake_quant(lhs, self.bits, self.symmetric, bounds=bounds)
            rhs = affine.fake_quant(rhs, self.bits, True, axes=rc) if rc else rhs
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
        if bounds is None:              # dynamic: this batch's range, per tensor
            x = lax.stop_gradient(lhs)
            bounds = (jnp.min(x), jnp.max(x))
        out_dtype = preferred_element_type
        if out_dtype is None or not jnp.issubdtype(out_dtype, jnp.floating):
            out_dtype = jnp.result_type(lhs, rhs)
        return int_dot_general(lhs, rhs, dimension_numbers, bounds, self.bits,
                               self.symmetric, out_dtype)


def make_dot_general(mode: str, bits: int = 8, symmetric: bool = True,
                     calibration: Calibration | None = None) -> Callable:
    """A drop-in lax.dot_general that quantizes its operands.

    Args:
      mode: "none" | "fake" (QAT, trainable) | "dynamic" | "static" (integer matmul).
      bits: 2..8 for both operands.
      symmetric: the activation's scheme (the rhs is always symmetric per output).
      calibration: `calibrate`'s result; required for "static", optional for "fake"
        (static ranges with clipping-aware straight-through gradients).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {', '.join(MODES)}")
    bits = affine.check_bits(bits)
    if mode == "static" and calibration is None:
        raise ValueError("mode='static' needs calibration=calibrate(...) (the activation "
                         "ranges); use mode='dynamic' to measure them per batch")
    if calibration is not None and mode in ("none", "dynamic"):
        raise ValueError(f"mode={mode!r} does not use a calibration; allowed with one: "
                         "fake, static")
    if mode == "none":
        return lax.dot_general
    return QuantDotGeneral(mode, bits, bool(symmetric), calibration)
