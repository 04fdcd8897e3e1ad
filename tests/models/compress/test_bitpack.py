"""Dense b-bit packing: layout, round trips at odd and even sizes, sign extension."""
import jax.numpy as jnp
import numpy as np
import pytest

from models.compress import bitpack


def test_four_bit_layout_is_two_values_a_byte_low_nibble_first():
    codes = jnp.array([1, 2, 15, 0, 7], jnp.uint8)
    packed = bitpack.pack(codes, 4)
    np.testing.assert_array_equal(packed, [1 | 2 << 4, 15 | 0 << 4, 7])
    assert packed.dtype == jnp.uint8 and bitpack.packed_nbytes(5, 4) == 3


def test_three_bit_values_straddle_bytes_little_endian():
    # 3-bit values 5, 3, 7: bits 101 | 011 | 111 -> stream (LSB first) 1,0,1, 1,1,0, 1,1,1
    # byte0 = bits 0..7 = 0b11011101 = 221, byte1 = bit 8 = 1.
    np.testing.assert_array_equal(bitpack.pack(jnp.array([5, 3, 7], jnp.uint8), 3), [221, 1])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13])
def test_round_trip(bits, n):
    codes = np.random.default_rng(bits * 100 + n).integers(0, 2 ** bits, n).astype(np.uint8)
    packed = bitpack.pack(jnp.asarray(codes), bits)
    assert packed.shape == (bitpack.packed_nbytes(n, bits),) == (-(-n * bits // 8),)
    np.testing.assert_array_equal(bitpack.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_signed_values_round_trip_through_twos_complement(bits):
    q = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))
    codes = bitpack.to_unsigned(jnp.asarray(q), bits)
    assert int(codes.max()) < 2 ** bits
    np.testing.assert_array_equal(bitpack.from_unsigned(codes, bits), q)


def test_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="1..8"):
        bitpack.pack(jnp.zeros(4, jnp.uint8), 9)
    with pytest.raises(ValueError, match="pack into 2 bytes, got 3"):
        bitpack.unpack(jnp.zeros(3, jnp.uint8), 4, 4)
