"""Compressed storage of pruned parameter trees, its true size in bytes, sparsity report.

`to_sparse(params)` replaces each kernel by one of two encodings (NumPy, host side: the
number of stored entries depends on the data); every other leaf stays a dense array.

Relative index (unstructured; Han et al. 2016, "Deep Compression", section 2 and fig. 2)
  The kernel is flattened in row-major order (stacked layers included). For each nonzero,
  store its value (in the kernel's dtype) and the number of zeros skipped since the previous
  stored entry, as an unsigned `index_bits`-bit code. A gap longer than 2**bits - 1 zeros
  gets filler entries: a stored 0.0 with code 2**bits - 1, each advancing 2**bits positions.
  Trailing zeros are implied by the shape. Codes are bit-packed (bitpack.py's
  little-endian bit stream).
    bytes = entries * itemsize + ceil(entries * index_bits / 8),
    entries = nonzeros + fillers, fillers = sum over gaps g of floor(g / 2**bits).
  The paper uses 8 bits for conv layers and 5 for fully connected ones; the default here is
  8 for all, pass index_bits to choose. (Its values are then also quantized; that is
  quantize.py's job -- here values keep their float dtype.)

N:M (Mishra et al. 2021, NVIDIA's 2:4 sparse tensor cores)
  The kernel is viewed as groups of m consecutive entries along `group_axis` (the last
  input axis). Each group stores exactly n values (the nonzeros, padded with its
  lowest-index zeros when it has fewer) and, per stored value, its position in the group as
  a ceil(log2 m)-bit code (2 bits for 2:4, as NVIDIA's metadata), bit-packed the same way.
    bytes = groups * n * itemsize + ceil(groups * n * ceil(log2 m) / 8).
  A group with more than n nonzeros is not N:M: ValueError.

`sparse_nbytes(tree)` is the sum of `nbytes` of every array leaf: the values and packed
codes of encoded kernels, the dense size of everything else. Shapes, dtypes and the small
static fields (entry counts, n, m, bits) are metadata and not counted. `from_sparse` inverts
`to_sparse` exactly (bit for bit, except that -0.0 in an unstructured kernel comes back as
+0.0: zeros are not stored).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.compress import bitpack
from models.compress.common import is_kernel, kernel_layout, path_str


def group_axis(path: str, shape) -> int:
    """The axis N:M groups run along: the last (fastest-varying) input axis.

    That is axis 0 of a Dense [in, out] and of attention q/k/v [in, heads, head_dim]; `in`
    of a conv HWIO kernel; head_dim of the attention output [heads, head_dim, out]. In each
    case a group is m consecutive entries of the flattened contraction dimension (row-major
    im2col order, or heads*head_dim), which is what sparse tensor cores need. (common.py's
    docstring calls it "the first input axis"; for HWIO and attention-out the consecutive
    contraction entries lie along the last input axis, so that is the one used.)
    """
    return kernel_layout(path, shape).in_axes[-1]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes < 2**bits -> uint8 bytes, little-endian bit stream (bitpack.py's layout)."""
    if bits == 0:                                            # m = 1: nothing to say
        return np.zeros(0, np.uint8)
    return np.asarray(bitpack.pack(np.asarray(codes, np.uint8), bits))


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `_pack`: `count` codes as int64."""
    if bits == 0:
        return np.zeros(count, np.int64)
    return np.asarray(bitpack.unpack(packed, bits, count)).astype(np.int64)


@flax.struct.dataclass
class RelativeIndexKernel:
    """values [entries] (kernel dtype), codes uint8 [ceil(entries * index_bits / 8)]."""
    values: np.ndarray
    codes: np.ndarray
    shape: tuple = flax.struct.field(pytree_node=False)
    index_bits: int = flax.struct.field(pytree_node=False)
    entries: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class NMKernel:
    """values [*other axes, groups, n] (kernel dtype, group axis moved last), codes uint8
    [ceil(values.size * ceil(log2 m) / 8)]: each value's position in its group."""
    values: np.ndarray
    codes: np.ndarray
    shape: tuple = flax.struct.field(pytree_node=False)
    axis: int = flax.struct.field(pytree_node=False)
    n: int = flax.struct.field(pytree_node=False)
    m: int = flax.struct.field(pytree_node=False)


def _encode_relative(w: np.ndarray, bits: int) -> RelativeIndexKernel:
    flat = w.ravel()
    pos = np.flatnonzero(flat != 0)                         # NaN != 0: kept
    gaps = np.diff(pos, prepend=-1) - 1                      # zeros skipped before each
    span = 1 << bits
    fillers = gaps // span
    reps = fillers + 1
    n = int(reps.sum())
    # Entry j of nonzero i: fillers first (code span - 1, value 0), then the nonzero.
    last = np.cumsum(reps) - 1
    codes = np.full(n, span - 1, np.int64)
    codes[last] = gaps % span
    values = np.zeros(n, w.dtype)
    values[last] = flat[pos]
    return RelativeIndexKernel(values, _pack(codes, bits), tuple(w.shape), bits, n)


def _decode_relative(k: RelativeIndexKernel) -> np.ndarray:
    codes = _unpack(k.codes, k.index_bits, k.entries)
    pos = np.cumsum(codes + 1) - 1
    out = np.zeros(int(np.prod(k.shape)), k.values.dtype)
    out[pos] = k.values
    return out.reshape(k.shape)


def _meta_bits(m: int) -> int:
    return (m - 1).bit_length()                             # ceil(log2 m); 2 for m = 4


def _encode_n_m(w: np.ndarray, path: str, axis: int, n: int, m: int) -> NMKernel:
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    nonzero = groups != 0
    bad = int((nonzero.sum(-1) > n).sum())
    if bad:
        raise ValueError(f"{path}: {bad} group(s) of {m} along axis {axis} have more than "
                         f"{n} nonzeros: shape {w.shape} is not {n}:{m} sparse")
    # Nonzeros first, then zeros, each in index order; keep n, then sort by position.
    slots = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :n], axis=-1)
    values = np.take_along_axis(groups, slots, axis=-1)
    return NMKernel(values, _pack(slots.ravel(), _meta_bits(m)), tuple(w.shape), axis, n, m)


def _decode_n_m(k: NMKernel) -> np.ndarray:
    slots = _unpack(k.codes, _meta_bits(k.m), k.values.size).reshape(k.values.shape)
    groups = np.zeros(k.values.shape[:-1] + (k.m,), k.values.dtype)
    np.put_along_axis(groups, slots, k.values, axis=-1)
    moved_shape = tuple(np.delete(k.shape, k.axis)) + (k.shape[k.axis],)
    return np.moveaxis(groups.reshape(moved_shape), -1, k.axis)


def _is_encoded(x) -> bool:
    return isinstance(x, (RelativeIndexKernel, NMKernel))


def to_sparse(params, n_m: tuple[int, int] | None = None, index_bits: int = 8,
              include_embeddings: bool = False, skip_indivisible: bool = False):
    """Compressed form of a pruned params tree (see the module docstring).

    n_m=None: every kernel in the relative-index form. n_m=(n, m): every kernel in the N:M
    form; a kernel whose group axis is not divisible by m raises ValueError, or with
    `skip_indivisible=True` stays a dense array (as `prune.n_m` leaves it). Non-kernel leaves
    stay dense (as NumPy arrays).
    """
    if not (isinstance(index_bits, int) and 1 <= index_bits <= 8):
        raise ValueError(f"index_bits must be an int in 1..8 (Deep Compression uses 5 and 8),"
                         f" got {index_bits!r}")
    if n_m is not None:
        n, m = n_m
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m <= 256):
            raise ValueError(f"n_m must be (n, m) ints with 1 <= n <= m <= 256, got {n_m!r}")

    def one(p, leaf):
        path, w = path_str(p), np.asarray(leaf)
        if not is_kernel(path, w, include_embeddings):
            return w
        if n_m is None:
            return _encode_relative(w, index_bits)
        axis = group_axis(path, w.shape)
        if w.shape[axis] % m:
            if skip_indivisible:
                return w
            raise ValueError(f"{path}: shape {w.shape} has {w.shape[axis]} entries along the "
                             f"N:M group axis {axis}, not divisible by m={m}")
        return _encode_n_m(w, path, axis, n, m)

    return jax.tree_util.tree_map_with_path(one, params)


def from_sparse(tree):
    """The dense params tree (jax arrays) that `to_sparse` encoded."""
    def one(x):
        if isinstance(x, RelativeIndexKernel):
            return jnp.asarray(_decode_relative(x))
        if isinstance(x, NMKernel):
            return jnp.asarray(_decode_n_m(x))
        return jnp.asarray(x)
    return jax.tree.map(one, tree, is_leaf=_is_encoded)


def sparse_nbytes(tree) -> int:
    """True storage bytes: the sum of the array leaves' nbytes (see the module docstring).
    Works on dense trees too (their float size)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------
# Sparsity report (per kernel and total).
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """rows: (path, shape, zeros, size) per kernel, tree order. From params, zeros are
    entries == 0; from bool masks, entries that are False. `other_params`: the size of the
    leaves that are not kernels (never pruned; from masks, the size of their masks)."""
    rows: tuple[tuple[str, tuple[int, ...], int, int], ...]
    other_params: int

    @property
    def zeros(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def size(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of kernel entries that are zero."""
        return self.zeros / self.size if self.size else 0.0

    @property
    def overall_sparsity(self) -> float:
        """Fraction of all parameters (kernels and the rest) that are zero."""
        total = self.size + self.other_params
        return self.zeros / total if total else 0.0

    def per_kernel(self) -> dict[str, float]:
        return {path: zeros / size for path, _, zeros, size in self.rows}

    def to_markdown(self) -> str:
        lines = ["| kernel | shape | zeros | size | sparsity |", "|---|---|---:|---:|---:|"]
        for path, shape, zeros, size in self.rows:
            lines.append(f"| {path} | {'x'.join(map(str, shape))} | {zeros} | {size} | "
                         f"{zeros / size:.2%} |")
        lines.append(f"| **kernels** | | {self.zeros} | {self.size} | {self.sparsity:.2%} |")
        lines.append(f"| **all params** | | {self.zeros} | {self.size + self.other_params} | "
                     f"{self.overall_sparsity:.2%} |")
        return "\n".join(lines)


def sparsity_report(tree, include_embeddings: bool = False) -> SparsityReport:
    """Per-kernel and total sparsity of a params tree or of a bool masks tree."""
    rows, other = [], 0
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        path, arr = path_str(p), np.asarray(leaf)
        if not is_kernel(path, arr, include_embeddings):
            other += arr.size
            continue
        zeros = int((~arr).sum()) if arr.dtype == bool else int((arr == 0).sum())
        rows.append((path, tuple(arr.shape), zeros, int(arr.size)))
    return SparsityReport(tuple(rows), other)
