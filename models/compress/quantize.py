"""Integer quantization of tensors and parameter pytrees: PTQ, weight-only inference, QAT.

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
q = 0 and back to exactly 0. The notes (000, 004) describe the same scheme in words only.

Storage (`QuantizedArray`): 8-bit values as int8 (symmetric) or uint8 (asymmetric); 2..7
bits packed densely into a uint8 byte stream (`bitpack`: 4 bits = two values a byte, low
nibble first; signed values as two's complement), so a tensor of n values takes
ceil(n b / 8) bytes. Scales are float32; zero points uint8 (asymmetric only).

Trees: only matmul kernels (and embeddings when asked) are quantized, per output channel as
`common.kernel_layout` defines it (one scale per output feature and per stacked layer; the
contracted input axes are reduced). Embedding tables [vocab, dim] get one scale per row,
which is the output channel of a tied `x @ E^T` and the unit a lookup reads.

    qtree = quantize_tree(params, bits=8)                     # PTQ, integer storage
    logits = jax.jit(lambda q, x: model.apply({"params": dequantize_tree(q)}, x))(qtree, x)
    loss(fake_quant_tree(params, bits=4))                      # QAT (straight-through)

Activation quantization (the models' `dot_general` hook, calibration) is in
`quant_matmul`; k-means weight sharing and Huffman sizes (Deep Compression) in `cluster`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.compress import bitpack, common
from models.compress.cluster import ClusteredArray, cluster_tree, huffman_nbytes  # noqa: F401

Array = jax.Array
BITS = tuple(range(2, 9))   # integer widths quantize supports


# ----------------------------------------------------------------------------------------
# Tensor level.
# ----------------------------------------------------------------------------------------
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


@struct.dataclass
class QuantizedArray:
    """A quantized tensor: integer values, float32 scales, zero points (asymmetric).

    values      int8 | uint8 [*shape] at 8 bits; uint8 [ceil(n * bits / 8)] packed below.
    scale       float32, `shape` with the reduced axes kept as size 1 (broadcasts to x).
    zero_point  uint8 like `scale` (asymmetric), or None (symmetric).
    """
    values: Array
    scale: Array
    zero_point: Array | None
    bits: int = struct.field(pytree_node=False)
    symmetric: bool = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)       # the float dtype it came from

    def integers(self) -> Array:
        """int32 [*shape]: the quantized integers q (signed, or unsigned with Z)."""
        if self.bits == 8:
            return self.values.astype(jnp.int32).reshape(self.shape)
        codes = bitpack.unpack(self.values, self.bits, int(np.prod(self.shape)))
        q = bitpack.from_unsigned(codes, self.bits) if self.symmetric else codes
        return q.astype(jnp.int32).reshape(self.shape)

    def dequantize(self) -> Array:
        return dequantize_with(self.integers(), self.scale,
                               self.zero_point).astype(self.dtype)

    @property
    def nbytes(self) -> int:
        """True storage: values (packed) + scales + zero points."""
        return sum(_nbytes(a) for a in (self.values, self.scale, self.zero_point)
                   if a is not None)


def _store(q: Array, bits: int, symmetric: bool) -> Array:
    if bits == 8:
        return q.astype(jnp.int8 if symmetric else jnp.uint8)
    codes = bitpack.to_unsigned(q, bits) if symmetric else q.astype(jnp.uint8)
    return bitpack.pack(codes, bits)


def quantize(x: Array, bits: int = 8, symmetric: bool = True,
             axes: int | Sequence[int] | None = None, *,
             per_channel: bool = False) -> QuantizedArray:
    """Quantize a float tensor with its own min/max range.

    Args:
      x: float array [...].
      bits: 2..8.
      symmetric: zero point 0 and the restricted signed range, or affine with a zero point.
      axes: the axes one (scale, zero point) covers; None = all (per-tensor). E.g. (0,)
        for a [in, out] kernel gives one scale per output column.
      per_channel: shorthand for one scale per index of the last axis.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize expects a floating-point array, got {x.dtype}")
    return _quantize(x, check_bits(bits), bool(symmetric),
                     reduction_axes(x.ndim, axes, per_channel))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: Array, bits: int, symmetric: bool, red: tuple[int, ...]) -> QuantizedArray:
    # One compiled program per (shape, options): eager PTQ of a tree would otherwise
    # dispatch (and compile) a dozen tiny ops per leaf.
    lo = jnp.min(x, axis=red, keepdims=True)
    hi = jnp.max(x, axis=red, keepdims=True)
    scale, zp = scale_and_zero_point(lo, hi, bits, symmetric)
    q = quantize_with(x, scale, zp, bits, symmetric)
    return QuantizedArray(values=_store(q, bits, symmetric), scale=scale,
                          zero_point=None if zp is None else zp.astype(jnp.uint8),
                          bits=bits, symmetric=bool(symmetric), shape=tuple(x.shape),
                          dtype=jnp.dtype(x.dtype).name)


@jax.jit
def dequantize(qa: QuantizedArray) -> Array:
    """QuantizedArray -> float array of the original shape and dtype."""
    return qa.dequantize()


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
    learned (no gradient reaches it). Note 004 says "no quant gradient": the same thing.

    Args:
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


# ----------------------------------------------------------------------------------------
# Tree level.
# ----------------------------------------------------------------------------------------
def _nbytes(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        leaf = np.asarray(leaf)
        shape, dtype = leaf.shape, leaf.dtype
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _is_compressed(leaf: Any) -> bool:
    return isinstance(leaf, (QuantizedArray, ClusteredArray))


def leaf_reduction_axes(path: str, shape: Sequence[int], per_channel: bool) -> tuple[int, ...]:
    """Axes one scale covers for the kernel (or embedding) at `path`.

    per_channel: the contracted input axes (one scale per output feature and stacked
    layer); embeddings [vocab, dim]: the feature axis (one scale per row). Otherwise all
    axes but the stacked-layer ones (per-tensor, per layer).
    """
    if path.rsplit("/", 1)[-1] == "embedding":
        return (len(shape) - 1,) if per_channel else tuple(range(len(shape)))
    layout = common.kernel_layout(path, shape)
    if per_channel:
        return layout.in_axes
    return tuple(a for a in range(len(shape)) if a not in layout.stack_axes)


def _map_kernels(fn, params, include_embeddings: bool):
    def visit(path, leaf):
        p = common.path_str(path)
        return fn(p, leaf) if common.is_kernel(p, leaf, include_embeddings) else leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def quantize_tree(params: Any, bits: int = 8, symmetric: bool = True,
                  per_channel: bool = True, include_embeddings: bool = False) -> Any:
    """Kernels -> QuantizedArray (per output channel by default); other leaves unchanged."""
    bits = check_bits(bits)
    return _map_kernels(
        lambda p, w: quantize(w, bits, symmetric,
                              axes=leaf_reduction_axes(p, w.shape, per_channel)),
        params, include_embeddings)


def dequantize_tree(tree: Any) -> Any:
    """Compressed leaves (quantized or clustered) -> float arrays; same structure, shapes
    and dtypes as the tree they came from. Jit-safe: call it inside the jitted forward so
    only the integer form crosses the jit boundary (weight-only inference)."""
    return jax.tree.map(lambda leaf: _dequantize_leaf(leaf) if _is_compressed(leaf) else leaf,
                        tree, is_leaf=_is_compressed)


@jax.jit
def _dequantize_leaf(leaf):
    return leaf.dequantize()


def tree_nbytes(tree: Any) -> int:
    """True storage bytes: compressed leaves count their packed values, scales, zero
    points (or codebooks); every other leaf its own nbytes. Works on float trees and on
    abstract trees (jax.ShapeDtypeStruct leaves)."""
    return sum(leaf.nbytes if _is_compressed(leaf) else _nbytes(leaf)
               for leaf in jax.tree.leaves(tree, is_leaf=_is_compressed))


def fake_quant_tree(params: Any, bits: int = 8, symmetric: bool = True,
                    per_channel: bool = True, include_embeddings: bool = False) -> Any:
    """Kernels fake-quantized (float, straight-through gradient) for QAT: train on
    loss(fake_quant_tree(params)); `quantize_tree` of the result's source params then
    gives exactly the integers the forward pass used."""
    bits = check_bits(bits)
    return _map_kernels(
        lambda p, w: fake_quant(w, bits, symmetric,
                                axes=leaf_reduction_axes(p, w.shape, per_channel)),
        params, include_embeddings)


def __getattr__(name: str):
    # The activation side lives in quant_matmul (which imports this module); forward its
    # entry points lazily so `quantize.make_dot_general` works without an import cycle.
    if name in ("make_dot_general", "calibrate", "Calibration", "OBSERVERS"):
        from models.compress import quant_matmul
        return getattr(quant_matmul, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
