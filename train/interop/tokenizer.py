"""A checkpoint's own tokenizer files travel into the converted workdir's `tokenizer/`,
where `train.data.tokenizers.FileTokenizer` (the `tokenizers` library) reads them: a
converted GPT-2 / BERT / CLIP then encodes and decodes with its own ids. The image
processor's `preprocessor_config.json` (normalization mean and std) travels with them.
"""
from __future__ import annotations

import os
import shutil

from train.data.tokenizers import WORKDIR_TOKENIZER

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
         "merges.txt", "vocab.txt", "preprocessor_config.json")


def copy_files(checkpoint: str, workdir: str) -> list[str]:
    """Copy the tokenizer files of `checkpoint` into <workdir>/tokenizer/; their names."""
    present = [f for f in FILES if os.path.isfile(os.path.join(checkpoint, f))]
    if present:
        os.makedirs(os.path.join(workdir, WORKDIR_TOKENIZER), exist_ok=True)
        for name in present:
            shutil.copy2(os.path.join(checkpoint, name),
                         os.path.join(workdir, WORKDIR_TOKENIZER, name))
    return present
