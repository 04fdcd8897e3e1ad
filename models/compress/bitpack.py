"""Packing b-bit integers (1 <= b <= 8) densely into bytes, and back.

Layout: a little-endian bit stream. Value j of the flattened input occupies bits
[j*b, (j+1)*b) of the stream, and bit i of the stream is bit (i % 8) of byte i // 8. For
widths that divide 8 this means value j sits in byte j // (8/b) at bit offset
b * (j % (8/b)); at 4 bits, byte = v[2i] | v[2i+1] << 4 (low nibble first, the int4 order
of XLA and of most int4 kernels). A tensor of n values takes ceil(n * b / 8) bytes.

Inputs are non-negative codes < 2^b in uint8. Signed values are packed as their low b bits
(two's complement) and sign-extended on unpack (`to_unsigned` / `from_unsigned`). Every
function is jnp and jit-safe (shapes are static), so unpacking can run inside the jitted
forward pass of a weight-only quantized model.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that n b-bit values take once packed: ceil(n * bits / 8)."""
    return math.ceil(n * bits / 8)


def _check(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack(codes: Array, bits: int) -> Array:
    """codes uint8 [...] with values < 2^bits -> uint8 [ceil(n * bits / 8)] (flattened)."""
    _check(bits)
    codes = jnp.asarray(codes, jnp.uint8).reshape(-1)
    n = codes.size
    if bits == 8:
        return codes
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, a few shifts and ors
        per = 8 // bits
        padded = jnp.pad(codes, (0, (-n) % per)).reshape(-1, per)
        shifts = jnp.arange(per, dtype=jnp.uint8) * bits
        # The fields do not overlap, so a sum is an or.
        return jnp.sum(padded << shifts, axis=1, dtype=jnp.uint8)
    # 3, 5, 6, 7 bits: values straddle bytes; go through an explicit bit stream.
    stream = jnp.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    stream = jnp.pad(stream, (0, (-stream.size) % 8))
    return jnp.packbits(stream, bitorder="little")


def unpack(packed: Array, bits: int, n: int) -> Array:
    """Inverse of `pack`: uint8 [ceil(n * bits / 8)] -> uint8 [n]."""
    _check(bits)
    packed = jnp.asarray(packed, jnp.uint8).reshape(-1)
    if packed.size != packed_nbytes(n, bits):
        raise ValueError(f"{n} values of {bits} bits pack into {packed_nbytes(n, bits)} "
                         f"bytes, got {packed.size}")
    if bits == 8:
        return packed
    if 8 % bits == 0:
        per = 8 // bits
        shifts = jnp.arange(per, dtype=jnp.uint8) * bits
        fields = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
        return fields.reshape(-1)[:n]
    stream = jnp.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    stream = jnp.pad(stream, ((0, 0), (0, 8 - bits)))
    return jnp.packbits(stream, axis=1, bitorder="little").reshape(n)


def to_unsigned(q: Array, bits: int) -> Array:
    """Signed integers in [-2^(b-1), 2^(b-1)) -> their low b bits as uint8 codes."""
    return (jnp.asarray(q, jnp.int32) & ((1 << bits) - 1)).astype(jnp.uint8)


def from_unsigned(codes: Array, bits: int) -> Array:
    """Inverse of `to_unsigned`: sign-extend b-bit codes -> int32."""
    c = jnp.asarray(codes, jnp.int32)
    return jnp.where(c >= (1 << (bits - 1)), c - (1 << bits), c)
