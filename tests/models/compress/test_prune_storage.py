"""Compressed storage of pruned trees: exact round trips and byte counts done by hand."""
import jax
import ml_dtypes
import numpy as np
import pytest

from models.compress import prune


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"),
                                  b.view(f"u{b.dtype.itemsize}"))


def test_relative_index_hand_example_with_filler_zeros():
    """Deep Compression fig. 2 style, 2-bit gaps (at most 3 zeros skipped per entry)."""
    w = np.zeros((4, 5), np.float32)
    flat = w.reshape(-1)
    flat[[0, 1, 6, 15]] = [1.5, -2.0, 3.0, 4.0]
    bias = np.arange(3, dtype=np.float32)
    tree = {"d": {"kernel": w, "bias": bias}}
    sparse = prune.to_sparse(tree, index_bits=2)
    k = sparse["d"]["kernel"]
    # gaps 0, 0, 4, 8 -> entries: 1.5 | -2.0 | filler(3), 3.0 (0) | filler(3), filler(3), 4.0
    np.testing.assert_array_equal(k.values, [1.5, -2.0, 0, 3.0, 0, 0, 4.0])
    # codes 0,0,3,0,3,3,0 packed 2 bits each, little-endian: 0b00110000, 0b00001111
    np.testing.assert_array_equal(k.codes, [48, 15])
    assert prune.sparse_nbytes(sparse) == 7 * 4 + 2 + 3 * 4
    _bits_equal(prune.from_sparse(sparse)["d"]["kernel"], w)
    _bits_equal(prune.from_sparse(sparse)["d"]["bias"], bias)


@pytest.mark.parametrize("bits", [5, 8])
def test_relative_index_round_trip_and_size_of_a_pruned_tree(bits):
    r = np.random.default_rng(0)
    params = {"a": {"kernel": r.normal(size=(64, 48)).astype(np.float32),
                    "bias": r.normal(size=48).astype(np.float32)},
              "layers": {"b": {"kernel": r.normal(size=(2, 3, 3, 8, 16)).astype(
                  ml_dtypes.bfloat16)}},
              "norm": {"scale": np.ones(48, np.float32)}}
    pruned, _ = prune.magnitude(params, sparsity=0.97)      # long gaps -> fillers
    sparse = prune.to_sparse(pruned, index_bits=bits)
    restored = prune.from_sparse(sparse)
    jax.tree.map(_bits_equal, restored, pruned)
    expected = 48 * 4 + 48 * 4                               # bias and scale stay dense
    for w in (pruned["a"]["kernel"], pruned["layers"]["b"]["kernel"]):
        pos = np.flatnonzero(np.asarray(w).ravel() != 0)
        gaps = np.diff(pos, prepend=-1) - 1
        entries = len(pos) + int((gaps // 2 ** bits).sum())
        expected += entries * np.asarray(w).dtype.itemsize + -(-entries * bits // 8)
    assert prune.sparse_nbytes(sparse) == expected
    assert prune.sparse_nbytes(sparse) < 0.2 * prune.sparse_nbytes(params)


def test_two_four_hand_example():
    w = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 2.0], [7.0, 0.0]], np.float32)   # [in=4, 2]
    sparse = prune.to_sparse({"k": {"kernel": w}}, n_m=(2, 4))
    k = sparse["k"]["kernel"]
    # Column 0 keeps slots 1, 3; column 1 has one nonzero (slot 2), padded with slot 0.
    np.testing.assert_array_equal(k.values, [[[5.0, 7.0]], [[0.0, 2.0]]])
    np.testing.assert_array_equal(k.codes, [1 | 3 << 2 | 0 << 4 | 2 << 6])
    assert prune.sparse_nbytes(sparse) == 4 * 4 + 1
    _bits_equal(prune.from_sparse(sparse)["k"]["kernel"], w)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_two_four_round_trip_and_size_on_every_layout(dtype):
    r = np.random.default_rng(1)
    n = lambda *s: r.normal(size=s).astype(dtype)  # noqa: E731
    params = {"dense": {"kernel": n(8, 6), "bias": n(6)},
              "attn": {"query": {"kernel": n(8, 2, 4)}, "out": {"kernel": n(2, 4, 8)}},
              "conv": {"kernel": n(3, 3, 4, 2)},
              "layers": {"fc": {"kernel": n(2, 8, 4)}}}
    pruned, _ = prune.n_m(params, n=2, m=4)
    sparse = prune.to_sparse(pruned, n_m=(2, 4))
    jax.tree.map(_bits_equal, prune.from_sparse(sparse), pruned)
    item = np.dtype(dtype).itemsize
    kernel_sizes = [48, 64, 64, 72, 64]
    # Each kept value: itemsize bytes + 2 bits of metadata; half the weights are kept.
    expected = 6 * item + sum(s // 2 * item + -(-(s // 2) * 2 // 8) for s in kernel_sizes)
    assert prune.sparse_nbytes(sparse) == expected


def test_n_m_storage_rejects_what_is_not_n_m():
    w = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match=r"k/kernel: 4 group\(s\) of 4 along axis 0 have more "
                                         r"than 2 nonzeros"):
        prune.to_sparse({"k": {"kernel": w}}, n_m=(2, 4))
    odd = {"k": {"kernel": np.ones((6, 2), np.float32)}}
    with pytest.raises(ValueError, match=r"k/kernel: shape \(6, 2\) .* not divisible by m=4"):
        prune.to_sparse(odd, n_m=(2, 4))
    kept = prune.to_sparse(odd, n_m=(2, 4), skip_indivisible=True)
    assert prune.sparse_nbytes(kept) == 48
    with pytest.raises(ValueError, match="index_bits must be an int in 1..8"):
        prune.to_sparse(odd, index_bits=12)
