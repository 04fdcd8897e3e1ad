"""Deep Compression weight sharing (k-means) and Huffman-coded sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.compress import cluster as C
from models.compress import quantize as Q


def test_clustering_is_lossless_when_codebook_covers_the_distinct_values():
    rng = np.random.default_rng(0)
    values = np.float32([-0.5, 0.0, 0.01, 0.3, 2.0])        # 0.0 and 0.01 would share a
    w = rng.choice(values, size=(12, 6)).astype(np.float32)  # centroid under plain Lloyd
    ctree = C.cluster_tree({"dense": {"kernel": jnp.asarray(w)}}, bits=3)
    np.testing.assert_array_equal(Q.dequantize_tree(ctree)["dense"]["kernel"], w)
    four = np.repeat(values[:4], 3).reshape(6, 2)            # 4 distinct values, 2 bits
    two = C.cluster_tree({"kernel": jnp.asarray(four)}, bits=2)
    np.testing.assert_array_equal(Q.dequantize_tree(two)["kernel"], four)


def test_lloyd_starts_linear_and_converges_to_a_fixed_point():
    x = np.random.default_rng(1).standard_t(3, size=300).astype(np.float32)
    init, _ = C.lloyd_1d(jnp.asarray(x), 4, iters=0)
    np.testing.assert_allclose(init, np.linspace(x.min(), x.max(), 4), rtol=1e-6)
    c, idx = C.lloyd_1d(jnp.asarray(x), 4, iters=60)
    c, idx = np.asarray(c, np.float64), np.asarray(idx)
    assert np.all(np.diff(c) >= 0)
    dist = np.abs(x[:, None].astype(np.float64) - c[None])
    np.testing.assert_array_equal(idx, dist.argmin(1))                 # nearest centroid
    for j in np.unique(idx):                                           # centroid = mean
        np.testing.assert_allclose(c[j], x[idx == j].astype(np.float64).mean(), rtol=1e-5)


def test_huffman_code_lengths_and_size_of_a_hand_example():
    # counts a:5 b:2 c:1 d:1 -> merge c+d (2), then b+(cd) (4), then a+(bcd) (9):
    # lengths a 1, b 2, c 3, d 3; payload 5*1 + 2*2 + 3 + 3 = 15 bits = 2 bytes.
    idx = np.array([0] * 5 + [1] * 2 + [2, 3])
    assert C.huffman_code_lengths(np.bincount(idx)) == {0: 1, 1: 2, 2: 3, 3: 3}
    assert C.huffman_nbytes(idx) == 2 + 4                         # + a 4-byte length table
    assert C.huffman_nbytes(idx, codebook=np.zeros(4, np.float32)) == 2 + 4 + 16
    assert C.huffman_nbytes(np.zeros(10, int), num_symbols=4) == 2 + 4   # 1 bit a symbol
    # Kraft equality: an optimal (full) prefix code has sum 2^-len = 1.
    counts = np.random.default_rng(2).integers(1, 1000, 32)
    lengths = C.huffman_code_lengths(counts)
    assert sum(2.0 ** -n for n in lengths.values()) == 1.0
    assert sum(counts[s] * n for s, n in lengths.items()) <= 5 * counts.sum()   # <= fixed


def test_cluster_tree_sizes_and_structure():
    rng = np.random.default_rng(3)
    params = {"decoder": {"layers": {"mlp": {"kernel": jnp.asarray(
                  rng.normal(size=(2, 8, 5)), jnp.float32)}}},
              "bias": jnp.ones(5, jnp.bfloat16)}
    ctree = C.cluster_tree(params, bits=3)
    leaf = ctree["decoder"]["layers"]["mlp"]["kernel"]
    assert isinstance(leaf, C.ClusteredArray) and leaf.codebook.shape == (2, 8)  # per layer
    assert Q.tree_nbytes(ctree) == 2 * 8 * 5 * 3 // 8 + 2 * 8 * 4 + 5 * 2
    restored = Q.dequantize_tree(ctree)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), restored) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), params)
    w = np.asarray(params["decoder"]["layers"]["mlp"]["kernel"])
    for layer in range(2):                 # every weight is one of its layer's centroids
        assert np.isin(np.asarray(restored["decoder"]["layers"]["mlp"]["kernel"][layer]),
                       np.asarray(leaf.codebook[layer])).all()
    assert np.abs(np.asarray(restored["decoder"]["layers"]["mlp"]["kernel"]) - w).max() < \
        (w.max() - w.min()) / 8
    per_layer = np.asarray(leaf.indices()).reshape(2, -1)
    assert C.tree_huffman_nbytes(ctree) == 5 * 2 + sum(
        C.huffman_nbytes(per_layer[i], np.asarray(leaf.codebook[i])) for i in range(2))


def test_cluster_bits_errors():
    for bits in (0, 9, 2.5):
        with pytest.raises(ValueError, match="allowed: integers 1..8"):
            C.cluster_tree({"kernel": jnp.ones((4, 4))}, bits=bits)
