"""Deep Compression's weight sharing: k-means codebooks per kernel and Huffman-coded sizes.

Han, Mao & Dally 2016 ("Deep Compression", sec. 3): the weights of a layer are clustered
into k = 2^bits shared values (1-D k-means); the layer stores a float codebook of k
centroids plus a `bits`-bit index per weight. Centroids start *linearly* spaced over
[min, max] (the paper's fig. 4/5: linear initialization keeps the rare large weights, which
matter most, while density-based and random initialization cluster them away), then a few
Lloyd iterations (assign each weight to its nearest centroid, move each centroid to the
mean of its weights). The paper fine-tunes the centroids afterwards; this module is the
post-training part. Sec. 4 then Huffman-codes the indices, whose distribution is far from
uniform.

Where popular explanations differ: one says Huffman coding stores "the more common symbols
with more bits"; it is the opposite (Huffman 1952: frequent symbols get the *shorter*
codes), as implemented here. Another explains the paper's 8-bit conv / 5-bit FC choice by
conv filters being "already sparse"; Han et al. report it as an empirical finding (fig. 6:
accuracy vs bits per layer type). Here `bits` is one number for every kernel.

Storage (`ClusteredArray`): indices packed at `bits` bits (`bitpack`), codebook float32
[*stack, k] (one codebook per kernel and per stacked layer). `huffman_nbytes` is an
*estimate* of the variable-length size: it builds the optimal code lengths from the index
histogram (heapq) and counts payload bits, a canonical-Huffman table of one length byte per
codebook entry, and the codebook; no bitstream is written.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.compress import bitpack, common

Array = jax.Array
CLUSTER_BITS = tuple(range(1, 9))


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
            or bits not in CLUSTER_BITS:
        raise ValueError(f"cluster bits={bits!r} is not supported; allowed: integers 1..8 "
                         "(2..256 shared values)")
    return int(bits)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def lloyd_1d(x: Array, k: int, iters: int = 10) -> tuple[Array, Array]:
    """1-D k-means of x [n] from a linear initialization.

    Returns (centroids float32 [k] sorted ascending, indices int32 [n] of the nearest
    centroid). An empty cluster keeps its previous centroid.
    """
    x = x.astype(jnp.float32)
    centroids = jnp.linspace(jnp.min(x), jnp.max(x), k, dtype=jnp.float32)

    def assign(c):
        # With sorted centroids, nearest = which interval between midpoints x falls in:
        # O(n log k) rather than an [n, k] distance matrix.
        return jnp.searchsorted((c[1:] + c[:-1]) / 2, x).astype(jnp.int32)

    def step(c, _):
        c = jnp.sort(c)
        idx = assign(c)
        sums = jax.ops.segment_sum(x, idx, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones_like(x), idx, num_segments=k)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c), None

    centroids, _ = jax.lax.scan(step, centroids, None, length=iters)
    centroids = jnp.sort(centroids)
    return centroids, assign(centroids)


def cluster_vector(x: Any, bits: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One codebook for the values x [n]: (codebook float32 [2^bits], indices uint8 [n]).

    With at most 2^bits distinct values the codebook is those values (zero distortion,
    which Lloyd from a linear initialization need not find: two nearby values can share a
    centroid while another centroid stays empty); the codebook is padded with its last
    entry. Otherwise Lloyd's algorithm from the linear initialization.
    """
    bits = _check_bits(bits)
    k = 2 ** bits
    x = np.asarray(x, np.float32).reshape(-1)
    distinct = np.unique(x)
    if distinct.size <= k:
        codebook = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
        return codebook.astype(np.float32), np.searchsorted(distinct, x).astype(np.uint8)
    centroids, idx = lloyd_1d(jnp.asarray(x), k, iters)
    return np.asarray(centroids), np.asarray(idx).astype(np.uint8)


@struct.dataclass
class ClusteredArray:
    """A weight-shared tensor: packed indices into per-(stacked-)layer codebooks.

    values    uint8 [ceil(n * bits / 8)]: the indices, packed (`bitpack`).
    codebook  float32 [num_stacked, 2^bits] (num_stacked = 1 for an unstacked kernel).
    """
    values: Array
    codebook: Array
    bits: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)

    def indices(self) -> Array:
        """uint8 [*shape]: each weight's codebook index."""
        n = int(np.prod(self.shape))
        return bitpack.unpack(self.values, self.bits, n).reshape(self.shape)

    def dequantize(self) -> Array:
        idx = self.indices().reshape(self.codebook.shape[0], -1).astype(jnp.int32)
        w = jnp.take_along_axis(self.codebook, idx, axis=1)
        return w.reshape(self.shape).astype(self.dtype)

    @property
    def nbytes(self) -> int:
        return (bitpack.packed_nbytes(int(np.prod(self.shape)), self.bits)
                + int(np.prod(self.codebook.shape)) * np.dtype(self.codebook.dtype).itemsize)


def cluster_array(w: Any, bits: int, stack_axes: tuple[int, ...] = (),
                  iters: int = 10) -> ClusteredArray:
    """k-means weight sharing of w, one codebook per index of the (leading) stack axes."""
    bits = _check_bits(bits)
    w = np.asarray(w)
    if stack_axes != tuple(range(len(stack_axes))):
        raise ValueError(f"stack axes must lead the shape, got {stack_axes}")
    num = int(np.prod(w.shape[:len(stack_axes)], dtype=np.int64))
    books, idx = zip(*(cluster_vector(s, bits, iters) for s in w.reshape(num, -1)))
    codes = np.stack(idx).reshape(w.shape)
    return ClusteredArray(values=bitpack.pack(jnp.asarray(codes), bits),
                          codebook=jnp.asarray(np.stack(books)), bits=bits,
                          shape=tuple(w.shape), dtype=w.dtype.name)


def cluster_tree(params: Any, bits: int, iters: int = 10,
                 include_embeddings: bool = False) -> Any:
    """Kernels -> ClusteredArray (2^bits shared values per kernel and stacked layer).

    `quantize.dequantize_tree` turns the result back into floats; `quantize.tree_nbytes`
    counts fixed-width indices + codebooks; `tree_huffman_nbytes` the Huffman estimate.
    Runs on the host (numpy + a jitted Lloyd per kernel): a post-training transform.
    """
    bits = _check_bits(bits)

    def visit(path, leaf):
        p = common.path_str(path)
        if not common.is_kernel(p, leaf, include_embeddings):
            return leaf
        embedding = p.rsplit("/", 1)[-1] == "embedding"
        stack = () if embedding else common.kernel_layout(p, leaf.shape).stack_axes
        return cluster_array(leaf, bits, stack, iters)
    return jax.tree_util.tree_map_with_path(visit, params)


# ----------------------------------------------------------------------------------------
# Huffman coding (sizes only).
# ----------------------------------------------------------------------------------------
def huffman_code_lengths(counts: Any) -> dict[int, int]:
    """Optimal prefix-code length in bits for each symbol with a nonzero count.

    Huffman's construction: repeatedly merge the two least frequent subtrees; every merge
    adds one bit to the codes of all symbols below it. A lone symbol still needs 1 bit.
    """
    counts = np.asarray(counts).reshape(-1)
    tie = itertools.count()   # breaks count ties deterministically (heapq compares tuples)
    heap = [(int(c), next(tie), [s]) for s, c in enumerate(counts) if c > 0]
    lengths = {s: 0 for _, _, (s,) in heap}
    if len(heap) == 1:
        return {heap[0][2][0]: 1}
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, next(tie), s1 + s2))
    return lengths


def huffman_nbytes(indices: Any, codebook: Any = None, num_symbols: int | None = None) -> int:
    """Estimated bytes of Huffman-coded `indices` (+ its table and codebook).

    payload: ceil(sum_s count_s * len_s / 8); table: one code-length byte per symbol of
    the alphabet (canonical Huffman codes are rebuilt from lengths alone); codebook: its
    nbytes when given. The alphabet is `num_symbols` (default codebook's last dim, else
    max index + 1). A ClusteredArray may be passed as `indices`.
    """
    if isinstance(indices, ClusteredArray):
        indices, codebook = indices.indices(), indices.codebook
    idx = np.asarray(indices).reshape(-1).astype(np.int64)
    if num_symbols is None:
        num_symbols = (np.shape(codebook)[-1] if codebook is not None
                       else int(idx.max(initial=-1)) + 1)
    counts = np.bincount(idx, minlength=num_symbols)
    lengths = huffman_code_lengths(counts)
    payload_bits = sum(int(counts[s]) * n for s, n in lengths.items())
    books = 0 if codebook is None else np.asarray(codebook).nbytes
    return math.ceil(payload_bits / 8) + num_symbols + books


def tree_huffman_nbytes(tree: Any) -> int:
    """Huffman-estimated bytes of a `cluster_tree` result: clustered kernels coded per
    stacked layer (one code per codebook); every other leaf at its own nbytes."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda l: isinstance(l, ClusteredArray)):
        if isinstance(leaf, ClusteredArray):
            per_layer = np.asarray(leaf.indices()).reshape(leaf.codebook.shape[0], -1)
            total += sum(huffman_nbytes(i, b) for i, b in
                         zip(per_layer, np.asarray(leaf.codebook)))
        else:
            total += np.asarray(leaf).nbytes
    return total
