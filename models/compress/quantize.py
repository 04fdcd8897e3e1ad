"""Integer quantization of tensors and parameter pytrees: PTQ, weight-only inference, QAT.

The affine scheme of Jacob et al. 2018 (eq. 1: real r = S (q - Z), symmetric with the
restricted range or asymmetric with a zero point) is in `affine`; this module stores its
integers and applies it to parameter trees.

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
`quant_matmul` (re-exported here: `make_dot_general`, `calibrate`, `Calibration`,
`OBSERVERS`); k-means weight sharing and Huffman sizes (Deep Compression) in `cluster`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.compress import bitpack, common
# The tensor-level scheme (shared with quant_matmul) and the activation side, re-exported
# so that `quantize` is the one module callers need: quantize.fake_quant,
# quantize.make_dot_general, quantize.OBSERVERS, ...
from models.compress.affine import (  # noqa: F401
    BITS, check_bits, clip_range, dequantize_with, fake_quant, qrange, quantize_with,
    reduction_axes, scale_and_zero_point)
from models.compress.cluster import ClusteredArray
from models.compress.quant_matmul import (  # noqa: F401
    OBSERVERS, Calibration, calibrate, make_dot_general)

Array = jax.Array


# ----------------------------------------------------------------------------------------
# Tensor level.
# ----------------------------------------------------------------------------------------
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

