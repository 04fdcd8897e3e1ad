"""The affine integer scheme on single tensors: ranges, scales, zero points, fake quant.

The affine map of Jacob et al. 2018 ("Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", eq. 1): real r = S (q - Z), with a float32
scale S and an integer zero point Z, one pair per tensor or per channel.

  symmetric, b bits   S = max|x| / (2^(b-1) - 1),  Z = 0,
                      q = clip(round(x / S), -(2^(b-1) - 1), 2^(b-1) - 1).
                      The *restricted* range: -2^(b-1) is never used, so the grid is
                      symmetric about 0 and -q cannot overflow (int8 in [-127, 127]).
  asymmetric          the range [min, max] is first widened to contain 0, then
                      S = (max - min) / (2^b - 1),  Z = round(-min / S),
                      q = clip(round(x / S) + Z, 0, 2^b - 1)  (stored unsigned: uint8).
                      Real 0 maps exactly to the integer Z (Jacob et al. sec. 2.1: zero
                      padding and ReLU outputs must be exact).

`round` is jnp.round (half to even). Every element inside the range is reconstructed to
within S / 2. An all-zero channel would give S = 0; it gets S = 1 instead, which maps it to
q = 0 and back to exactly 0.

This module is the shared base of the weight side (`quantize`: stored integer tensors and
trees) and the activation side (`quant_matmul`: the models' `dot_general` hook); it
imports neither, so imports run one way: quantize -> quant_matmul -> affine.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
BITS = tuple(range(2, 9))   # integer widths quantize supports


def check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: integers 2..8")
    return int(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range (qmin, qmax): restricted signed or full unsigned."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def reduction_axes(ndim: int, axes: int | Sequence[int] | None = None,
                   per_channel: bool = False) -> tuple[int, ...]:
    """The axes reduced to one range: `axes`, or all but the last (per_channel), or all.

    Raises ValueError for both at once, per-channel on a <2-D tensor, or bad axes.
    """
    if per_channel:
        if axes is not None:
            raise ValueError("give either axes (the axes one scale covers) or "
                             "per_channel=True (one scale per last-axis index), not both")
        if ndim < 2:
            raise ValueError(f"per-channel quantization needs >= 2 dims (channels on the "
                             f"last axis); got a {ndim}-D tensor: use per_channel=False")
        return tuple(range(ndim - 1))
    if axes is None:
        return tuple(range(ndim))
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    norm = tuple(int(a) % ndim if -ndim <= a < ndim else None for a in axes)
    if None in norm or len(set(norm)) != len(norm):
        raise ValueError(f"axes={axes} is not a set of distinct axes of a {ndim}-D tensor; "
                         f"allowed: -{ndim}..{ndim - 1}, each once")
    return tuple(sorted(norm))


def clip_range(lo: Array, hi: Array, symmetric: bool) -> tuple[Array, Array]:
    """The real interval the grid covers: [-max|.|, max|.|] or [min(lo, 0), max(hi, 0)]."""
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if symmetric:
        amax = jnp.maximum(-lo, hi)
        return -amax, amax
    return lo, hi


def scale_and_zero_point(lo: Array, hi: Array, bits: int,
                         symmetric: bool) -> tuple[Array, Array | None]:
    """float32 scale and int32 zero point (None when symmetric) for the range [lo, hi]."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = clip_range(lo, hi, symmetric)
    scale = (hi - lo) / (qmax - qmin) if not symmetric else hi / qmax
    scale = jnp.where(scale > 0, scale, 1.0)        # all-zero channel -> q = 0 exactly
    if symmetric:
        return scale, None
    return scale, jnp.clip(jnp.round(-lo / scale), qmin, qmax).astype(jnp.int32)


def quantize_with(x: Array, scale: Array, zero_point: Array | None, bits: int,
                  symmetric: bool) -> Array:
    """x [...] -> int32 q [...] = clip(round(x / scale) + zero_point, qmin, qmax)."""
    qmin, qmax = qrange(bits, symmetric)
    q = jnp.round(jnp.asarray(x, jnp.float32) / scale)
    if zero_point is not None:
        q = q + zero_point
    return jnp.clip(q, qmin, qmax).astype(jnp.int32)


def dequantize_with(q: Array, scale: Array, zero_point: Array | None) -> Array:
    """int q [...] -> float32 scale * (q - zero_point)."""
    q = jnp.asarray(q, jnp.int32)
    if zero_point is not None:
        q = q - zero_point.astype(jnp.int32)
    return q.astype(jnp.float32) * scale


@jax.custom_vjp
def _straight_through(x: Array, y: Array) -> Array:
    """Forward y; backward the incoming gradient goes to x unchanged (identity)."""
    return y


_straight_through.defvjp(lambda x, y: (y, None),
                         lambda _, g: (g, None))


def fake_quant(x: Array, bits: int = 8, symmetric: bool = True,
               axes: int | Sequence[int] | None = None, *, per_channel: bool = False,
               bounds: tuple[Any, Any] | None = None) -> Array:
    """Quantize-dequantize in float, with a straight-through gradient (for QAT).

    Forward: exactly `dequantize(quantize(x))` (the integer path's values). Backward: the
    straight-through estimator of Bengio et al. 2013 in its clipped form (Courbariaux /
    Hubara et al. 2016; Jacob et al. sec. 3): d out / d x = 1 where x lies in the clipping
    range [lo, hi] and 0 outside (there the output is constant). The range itself is not
    learned (no gradient reaches it).

    Args:
      x: float array [...]; the result has its shape and dtype.
      bits, symmetric, axes, per_channel: as `quantize.quantize`.
      bounds: a fixed (lo, hi) range, e.g. from calibration (broadcastable to the reduced
        shape); default: x's own min/max over the reduced axes.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"fake_quant expects a floating-point array, got {x.dtype}")
    red = None if bounds is not None else reduction_axes(x.ndim, axes, per_channel)
    return _fake_quant(x, bounds, check_bits(bits), bool(symmetric), red)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _fake_quant(x, bounds, bits, symmetric, red):
    xs = jax.lax.stop_gradient(x)
    if bounds is None:
        lo, hi = jnp.min(xs, axis=red, keepdims=True), jnp.max(xs, axis=red, keepdims=True)
    else:
        lo, hi = bounds
    scale, zp = scale_and_zero_point(lo, hi, bits, symmetric)
    y = dequantize_with(quantize_with(xs, scale, zp, bits, symmetric), scale, zp)
    y = y.astype(x.dtype)
    lo, hi = clip_range(lo, hi, symmetric)
    inside = (xs >= lo) & (xs <= hi)
    return jnp.where(inside, _straight_through(x, y), y)
