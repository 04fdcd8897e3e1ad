"""A checkpoint's own tokenizer, through the `tokenizers` library (GPT-2 byte-level BPE,
BERT WordPiece, ...): the files `transformers` saves beside a model travel into the
converted workdir's `tokenizer/` and encode / decode there with the same ids.
"""
from __future__ import annotations

import os
import shutil

from train.interop.hf import ConversionError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
         "merges.txt", "vocab.txt")
DIRECTORY = "tokenizer"  # inside a workdir


def copy_files(checkpoint: str, workdir: str) -> list[str]:
    """Copy the tokenizer files of `checkpoint` into <workdir>/tokenizer/; their names."""
    present = [f for f in FILES if os.path.isfile(os.path.join(checkpoint, f))]
    if present:
        os.makedirs(os.path.join(workdir, DIRECTORY), exist_ok=True)
        for name in present:
            shutil.copy2(os.path.join(checkpoint, name), os.path.join(workdir, DIRECTORY, name))
    return present


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text with a saved `tokenizer.json`."""

    def __init__(self, path: str):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ConversionError(f"{path} has no tokenizer.json (the file a fast "
                                  "transformers tokenizer saves)")
        from tokenizers import Tokenizer as _Tokenizer  # noqa: PLC0415 -- the interop extra

        self._tok = _Tokenizer.from_file(file)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
