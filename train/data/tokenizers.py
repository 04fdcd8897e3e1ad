"""Byte-level tokenizer shared by every text dataset.

Ids 0..3 are special tokens and byte ``b`` maps to ``b + 4``, so any UTF-8 text (any
language, any code) round-trips without an out-of-vocabulary case and without a
vocabulary file:

    PAD=0  padding (targets with id PAD are ignored by the losses)
    BOS=1  beginning of sequence (decoder start token, classification prefix)
    EOS=2  end of sequence
    MASK=3 masked-LM corruption token
    4..259 bytes 0..255
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0
BOS = 1
EOS = 2
MASK = 3
NUM_SPECIAL = 4
VOCAB_SIZE = NUM_SPECIAL + 256


class ByteTokenizer:
    """UTF-8 bytes <-> int32 ids; see the module docstring for the id layout."""

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS
    mask_id = MASK
    vocab_size = VOCAB_SIZE

    def encode_bytes(self, data: bytes, add_bos: bool = False,
                     add_eos: bool = False) -> np.ndarray:
        """Raw bytes -> int32[len(data) + add_bos + add_eos]."""
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_SPECIAL
        parts = ([np.array([BOS], np.int32)] if add_bos else []) + [ids] + (
            [np.array([EOS], np.int32)] if add_eos else [])
        return np.concatenate(parts) if len(parts) > 1 else ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Text -> int32[num_utf8_bytes + add_bos + add_eos]."""
        return self.encode_bytes(text.encode("utf-8"), add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int] | np.ndarray, stop_at_eos: bool = True) -> str:
        """1-D ids -> text. Special ids are dropped; with ``stop_at_eos`` (the default)
        everything from the first EOS on is dropped too. Invalid UTF-8 (a model can emit
        any byte sequence) becomes U+FFFD rather than raising."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if stop_at_eos:
            eos = np.flatnonzero(ids == EOS)
            if eos.size:
                ids = ids[: eos[0]]
        # Ids >= VOCAB_SIZE cannot come from this tokenizer; dropping them keeps decode
        # total for any model output (e.g. a padded vocabulary).
        ids = ids[(ids >= NUM_SPECIAL) & (ids < VOCAB_SIZE)]
        return (ids - NUM_SPECIAL).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def decode_batch(self, ids: np.ndarray, stop_at_eos: bool = True) -> list[str]:
        """int[batch, length] -> list of ``batch`` strings."""
        return [self.decode(row, stop_at_eos=stop_at_eos) for row in np.asarray(ids)]


def pad_batch(seqs: Sequence[np.ndarray], length: int, name: str = "length") -> np.ndarray:
    """Right-pads 1-D int sequences with PAD into int32[len(seqs), length].

    Raises ValueError (mentioning ``name``, the config key that set ``length``) if a
    sequence is longer: silently truncating a target would corrupt the task.
    """
    out = np.full((len(seqs), length), PAD, dtype=np.int32)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"{name}={length} is too short: a sequence needs {len(seq)} "
                             "tokens (including EOS)")
        out[i, : len(seq)] = seq
    return out
