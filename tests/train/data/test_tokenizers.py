"""ByteTokenizer: id layout, UTF-8 round trips, decode edge cases, padding."""
import numpy as np
import pytest

from train.data import tokenizers
from train.data.tokenizers import BOS, EOS, MASK, PAD, ByteTokenizer, pad_batch


def test_special_ids_and_vocab():
    assert (PAD, BOS, EOS, MASK) == (0, 1, 2, 3)
    assert tokenizers.VOCAB_SIZE == ByteTokenizer.vocab_size == 260
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)


def test_encode_is_utf8_bytes_plus_four():
    ids = ByteTokenizer().encode("Aé", add_bos=True, add_eos=True)
    assert ids.dtype == np.int32
    # "A" = 0x41, "é" = 0xC3 0xA9 in UTF-8.
    np.testing.assert_array_equal(ids, [1, 0x41 + 4, 0xC3 + 4, 0xA9 + 4, 2])
    np.testing.assert_array_equal(ByteTokenizer().encode(""), np.zeros(0, np.int32))


@pytest.mark.parametrize("text", ["", "hello, world\n", "naïve café — Grüße",
                                  "日本語のテキスト", "emoji 🙂🚀 mixed\tÅ\x00end",
                                  "".join(chr(c) for c in range(1, 0x800, 7))])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.min(initial=4) >= 4 and ids.max(initial=4) < 260
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_round_trip_random_unicode():
    rng = np.random.default_rng(0)
    # Random code points outside the surrogate range, which UTF-8 cannot encode.
    cps = rng.integers(1, 0x10FFFF, size=2000)
    text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_decode_stops_at_eos_drops_specials_and_replaces_bad_bytes():
    tok = ByteTokenizer()
    ids = [BOS, ord("a") + 4, MASK, ord("b") + 4, PAD, EOS, ord("c") + 4]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, stop_at_eos=False) == "abc"
    assert tok.decode([0xFF + 4, ord("x") + 4]) == "\ufffdx"  # invalid UTF-8 byte
    assert tok.decode([ord("x") + 4, 260, 1000]) == "x"        # out-of-vocab ids dropped
    batch = np.array([[ord("h") + 4, EOS, 7], [ord("i") + 4, PAD, PAD]])
    assert tok.decode_batch(batch) == ["h", "i"]


def test_pad_batch_pads_and_refuses_to_truncate():
    out = pad_batch([np.array([5, 6]), np.array([7])], 3)
    np.testing.assert_array_equal(out, [[5, 6, 0], [7, 0, 0]])
    assert out.dtype == np.int32
    with pytest.raises(ValueError, match="max_target_len=1"):
        pad_batch([np.array([5, 6])], 1, "max_target_len")
