"""Tokenizers of the text datasets: the byte-level default, and a checkpoint's own.

``ByteTokenizer`` (every embedded dataset's default):

Ids 0..3 are special tokens and byte ``b`` maps to ``b + 4``, so any UTF-8 text (any
language, any code) round-trips without an out-of-vocabulary case and without a
vocabulary file:

    PAD=0  padding (targets with id PAD are ignored by the losses)
    BOS=1  beginning of sequence (decoder start token, classification prefix)
    EOS=2  end of sequence
    MASK=3 masked-LM corruption token
    4..259 bytes 0..255

``FileTokenizer``: a converted checkpoint's ``tokenizer.json`` (GPT-2 / CLIP BPE, BERT
WordPiece) with the same interface, selected by a source's ``tokenizer`` key (e.g.
``data.stdlib_text.tokenizer=<converted workdir>``); ``make_tokenizer`` picks one.
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
    special_ids = (PAD, BOS, EOS, MASK)
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


def pad_batch(seqs: Sequence[np.ndarray], length: int, name: str = "length",
              pad_id: int = PAD) -> np.ndarray:
    """Right-pads 1-D int sequences with ``pad_id`` into int32[len(seqs), length].

    Raises ValueError (mentioning ``name``, the config key that set ``length``) if a
    sequence is longer: silently truncating a target would corrupt the task.
    """
    out = np.full((len(seqs), length), pad_id, dtype=np.int32)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"{name}={length} is too short: a sequence needs {len(seq)} "
                             "tokens (including EOS)")
        out[i, : len(seq)] = seq
    return out


# ---- A checkpoint's own tokenizer ---------------------------------------------------------
TOKENIZER_FILE = "tokenizer.json"   # what a fast `transformers` tokenizer saves
WORKDIR_TOKENIZER = "tokenizer"     # <workdir>/tokenizer/: train.convert copies it there


def tokenizer_dir(path: str) -> str:
    """The directory holding ``tokenizer.json`` for a config's tokenizer key: ``path``
    itself or its ``tokenizer/`` (a converted workdir); ValueError naming both."""
    import os  # noqa: PLC0415

    for candidate in (path, os.path.join(path, WORKDIR_TOKENIZER)):
        if os.path.isfile(os.path.join(candidate, TOKENIZER_FILE)):
            return candidate
    raise ValueError(f"no {TOKENIZER_FILE} in {path} or {os.path.join(path, WORKDIR_TOKENIZER)}"
                     " (expected a directory a fast transformers tokenizer was saved to, or "
                     "a workdir train.convert wrote)")


class FileTokenizer:
    """A saved ``tokenizer.json`` (GPT-2 / CLIP byte-level BPE, BERT WordPiece, ...) through
    the ``tokenizers`` library (the ``interop`` extra), with ByteTokenizer's interface.

    Special tokens come from ``tokenizer_config.json`` (written beside it by
    ``transformers``): bos = ``bos_token`` else ``cls_token`` (BERT's [CLS]), eos =
    ``eos_token`` else ``sep_token`` ([SEP]), pad = ``pad_token`` else eos (GPT-2 has no
    padding token: padded positions are masked by id, so any id works), mask =
    ``mask_token`` (None where the tokenizer has none). ``special_ids`` are every special
    token's id: masked-LM corruption never selects them. Unlike ByteTokenizer, id 0 can be
    a real token (GPT-2's "!"), so padding is ``pad_id``, never a constant.
    """

    def __init__(self, path: str):
        import json  # noqa: PLC0415
        import os  # noqa: PLC0415

        from tokenizers import Tokenizer  # noqa: PLC0415 -- the interop extra

        self.path = tokenizer_dir(path)
        self._tok = Tokenizer.from_file(os.path.join(self.path, TOKENIZER_FILE))
        config_file = os.path.join(self.path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)

        def token_id(*keys):
            for key in keys:
                value = config.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and self._tok.token_to_id(value) is not None:
                    return self._tok.token_to_id(value)
            return None

        self.bos_id = token_id("bos_token", "cls_token")
        self.eos_id = token_id("eos_token", "sep_token")
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id or 0)
        self.mask_id = token_id("mask_token")
        added = [i for i, t in self._tok.get_added_tokens_decoder().items() if t.special]
        named = [token_id(k) for k in ("bos_token", "eos_token", "pad_token", "mask_token",
                                       "cls_token", "sep_token", "unk_token")]
        self.special_ids = tuple(sorted({i for i in added + named if i is not None}))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Text -> int32[n + add_bos + add_eos] (no template: bos / eos only when asked)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        for wanted, token, name in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if wanted and token is None:
                raise ValueError(f"the tokenizer in {self.path} has no {name} token "
                                 f"(tokenizer_config.json names none)")
        ids = ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])
        return np.asarray(ids, np.int32)

    def encode_bytes(self, data: bytes, add_bos: bool = False,
                     add_eos: bool = False) -> np.ndarray:
        """UTF-8 bytes -> ids (a byte sequence cut mid-character keeps U+FFFD there)."""
        return self.encode(data.decode("utf-8", errors="replace"), add_bos, add_eos)

    def decode(self, ids: Iterable[int] | np.ndarray, stop_at_eos: bool = True) -> str:
        """1-D ids -> text, special tokens dropped; with ``stop_at_eos`` everything from the
        first eos on too. Ids outside the vocabulary (a padded embedding) are dropped."""
        ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size],
                                skip_special_tokens=True)

    def decode_batch(self, ids: np.ndarray, stop_at_eos: bool = True) -> list[str]:
        """int[batch, length] -> list of ``batch`` strings."""
        return [self.decode(row, stop_at_eos=stop_at_eos) for row in np.asarray(ids)]


def make_tokenizer(path: str):
    """``ByteTokenizer()`` for "" (flaxlab's embedded data), else ``FileTokenizer(path)``."""
    return FileTokenizer(path) if path else ByteTokenizer()
