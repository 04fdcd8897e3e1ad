"""TensorFlow Datasets sources, read with ``tfds.data_source`` (random access, NumPy).

``tensorflow_datasets`` is imported inside the functions that need it, so a run on
the embedded data never imports it (nor TensorFlow). ``tfds.data_source`` reads
ArrayRecord files directly and does not need TensorFlow at all; the dataset must
have been prepared in that format (``tfds build NAME --file_format=array_record``,
which may itself need TensorFlow for some datasets, on any machine). Records are read
once into NumPy and then served by the same random-access datasets as the embedded
data:

* language modelling: each example's text is byte-tokenized and followed by EOS, the
  examples are concatenated in split order (capped at ``max_bytes`` tokens), and an
  ``LMDataset`` serves windows of that stream;
* classification: ``ClassificationDataset`` serves
  {"tokens": int32[B, seq_len] (BOS + bytes, truncated, PAD-padded), "label": int32[B]}.

Install with ``pip install -e ".[tfds]"``.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from train.data import checks, text
from train.data.base import RandomAccessDataset, Source
from train.data.text import LMDataset
from train.data.tokenizers import ByteTokenizer, pad_batch
from train.errors import ConfigError, first_line


def data_source(name: str, split: str, data_dir: str | None = None) -> Any:
    """``tfds.data_source(name, split=split, data_dir=data_dir)``: a random-access
    sequence of feature dicts. ``split`` may be a slice such as "train[:90%]"."""
    try:
        import tensorflow_datasets as tfds  # lazy: see the module docstring
    except ImportError as e:
        raise ConfigError('data source "tfds" needs tensorflow-datasets: '
                          'pip install -e ".[tfds]"') from e
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # an unknown name, not prepared, a bad split, a bad data_dir
        if type(e).__name__ == "DatasetNotFoundError":  # its message lists every name
            close = difflib.get_close_matches(name.split("/")[0], _tfds_names(tfds), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"data.tfds.tfds_name={name!r}: TFDS has no such dataset{hint}"
                              " (all names: tfds.list_builders())") from e
        raise ConfigError(f"TFDS dataset {name!r} split {split!r} cannot be read "
                          f"(data_dir={data_dir}): {first_line(e)}") from e


def _tfds_names(tfds) -> list[str]:
    """Every registered TFDS name; [] where listing them needs TensorFlow."""
    try:
        return list(tfds.list_builders(with_community_datasets=False))
    except Exception:  # noqa: BLE001 -- only a hint
        return []


def _as_bytes(text: Any, key: str) -> bytes:
    # Text features decode to bytes from real files and to str from mock data.
    if isinstance(text, np.ndarray) and text.ndim == 0:
        text = text.item()
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, bytes):
        return text
    raise TypeError(f"feature {key!r} is {type(text).__name__}, not text; check text_key")


def _records(source: Any) -> Iterator[dict]:
    for i in range(len(source)):  # one at a time: mock sources break __getitems__
        yield source[i]


def text_token_stream(source: Any, text_key: str, max_bytes: int = 0) -> np.ndarray:
    """int32[n]: encode(text) + EOS for each example of ``source`` in order, stopping
    once ``max_bytes`` tokens are collected (0 = read everything); the last example is
    cut so that n == max_bytes exactly when the split is longer."""
    tok, parts, total = ByteTokenizer(), [], 0
    for record in _records(source):
        parts.append(tok.encode_bytes(_as_bytes(record[text_key], text_key), add_eos=True))
        total += len(parts[-1])
        if 0 < max_bytes <= total:
            break
    if not parts:
        raise ValueError("the TFDS split is empty")
    stream = np.concatenate(parts)
    return stream[:max_bytes] if max_bytes > 0 else stream


def tfds_lm_dataset(name: str, split: str, text_key: str, seq_len: int, batch_size: int,
                    seed: int, data_dir: str | None = None, max_bytes: int = 0) -> LMDataset:
    """``LMDataset`` over the EOS-separated byte stream of a TFDS text split."""
    stream = text_token_stream(data_source(name, split, data_dir), text_key, max_bytes)
    return LMDataset(stream, seq_len, batch_size, seed)


class ClassificationDataset(RandomAccessDataset):
    """Random-access batches of fixed-length token rows with integer labels.

    Args:
      tokens: int32[n, seq_len] rows (BOS + bytes, PAD-padded).
      labels: int32[n].
      batch_size: training batch size.
      seed: run seed; ``batch(step)`` is a pure function of (data, seed, step).
      num_classes: number of label values.
      max_eval_examples: evaluate on the first this-many rows only (0 = all).
    """

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 num_classes: int, max_eval_examples: int = 0):
        self.tokens = np.asarray(tokens, np.int32)
        self.labels = np.asarray(labels, np.int32)
        if self.tokens.ndim != 2 or len(self.tokens) != len(self.labels):
            raise ValueError(f"need tokens[n, seq_len] and labels[n], got shapes "
                             f"{self.tokens.shape} and {self.labels.shape}")
        self.num_classes = num_classes
        self.num_eval = (min(max_eval_examples, len(self.labels)) if max_eval_examples > 0
                         else len(self.labels))
        super().__init__(len(self.labels), batch_size, seed, self.num_eval)

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """{"tokens": int32[B, seq_len], "label": int32[B]} of rows ``ids``."""
        return {"tokens": self.tokens[ids], "label": self.labels[ids]}


def tfds_classification_dataset(name: str, split: str, text_key: str, label_key: str,
                                seq_len: int, batch_size: int, seed: int,
                                data_dir: str | None = None,
                                max_eval_examples: int = 0) -> ClassificationDataset:
    """``ClassificationDataset`` of a TFDS split: BOS + the first ``seq_len - 1`` bytes
    of ``record[text_key]``, label ``record[label_key]`` (a ClassLabel feature)."""
    source = data_source(name, split, data_dir)
    tok, rows, labels = ByteTokenizer(), [], []
    for record in _records(source):
        rows.append(tok.encode_bytes(_as_bytes(record[text_key], text_key)[: seq_len - 1],
                                     add_bos=True))
        labels.append(int(record[label_key]))
    if not rows:
        raise ValueError(f"TFDS split {name}/{split} is empty")
    num_classes = getattr(source.dataset_info.features[label_key], "num_classes", None)
    return ClassificationDataset(pad_batch(rows, seq_len, "seq_len"), np.array(labels),
                                 batch_size, seed, num_classes or max(labels) + 1,
                                 max_eval_examples)


# ---- Source "tfds": config.data.tfds -----------------------------------------------------
def tfds_config(tfds_name: str) -> ml_collections.ConfigDict:
    """The keys the TFDS sources share (tfds and tfds_images)."""
    c = ml_collections.ConfigDict()
    c.tfds_name = tfds_name        # dataset name
    # Our split -> TFDS split string (slices like "train[:5%]" work).
    c.tfds_splits = ml_collections.ConfigDict(
        {"train": "train", "validation": "validation", "test": "test"})
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
    c.label_key = ""               # feature of the class label ("" = none)
    c.max_eval_examples = 0        # evaluate on the first N examples of a split (0 = all)
    return c


def default_config() -> ml_collections.ConfigDict:
    """``config.data.tfds``: a TFDS text split, LM or (with label_key) classification."""
    c = tfds_config("lm1b")
    c.text_key = "text"
    c.seq_len = 256                # LM / classification tokens per example
    c.max_bytes = text.DEFAULT_MAX_BYTES  # LM: token cap per split (0 = all)
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.tfds") -> None:
    checks.check_int(c, prefix, "seq_len", 1)
    checks.check_int(c, prefix, "max_eval_examples", 0)
    checks.check_int(c, prefix, "max_bytes", 0)
    checks.check_tfds(c, prefix, ("tfds_name", "text_key"))
    if c.label_key and c.seq_len < 2:
        checks.fail(f"{prefix}.seq_len", c.seq_len, "expected >= 2 for classification "
                    "(BOS + text)")


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int):
    """``ClassificationDataset`` when ``label_key`` is set, else ``LMDataset``."""
    tfds_split = c.tfds_splits[split]
    if c.label_key:
        return tfds_classification_dataset(
            c.tfds_name, tfds_split, c.text_key, c.label_key, c.seq_len, batch_size, seed,
            data_dir=c.data_dir, max_eval_examples=c.max_eval_examples)
    return tfds_lm_dataset(c.tfds_name, tfds_split, c.text_key, c.seq_len, batch_size, seed,
                           data_dir=c.data_dir, max_bytes=c.max_bytes)


SOURCE = Source(default_config, validate, make)
