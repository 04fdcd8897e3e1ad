"""Embedded text classification: which standard-library module a window of source is from.

Every CPython installation ships these files (see ``text.py``), so the task needs no
download. Class k is module ``classes[k]``; its text is the first ``class_bytes`` bytes
of that file (equal for every class, so classes are exactly balanced). Each class text
is split by position: the first 70% train, the next 10% validation, the last 20% test
(``fractions``), so validation and test windows are text the model never saw, not
shifted copies of training windows. (Files do repeat themselves a little: on CPython 3.11
6 of the 516 test windows, and 0 of 252 validation windows, also occur verbatim in their
class's training text, from parallel code such as ipaddress's IPv4/IPv6 classes.)

An example is a window of W = seq_len - 1 consecutive bytes of one class's split
segment, tokenized as BOS + bytes (``ByteTokenizer``; windows are always full, so rows
never need PAD). The label is the class index.

The default 12 modules mix easy classes with confusable groups (argparse / optparse
both parse command lines; doctest / inspect / pydoc all introspect code). Every default
file has >= 60,369 bytes on CPython 3.10-3.13, above the default 56,000 bytes per class,
so sizes are the same on every supported version (content differs slightly). Measured on
CPython 3.11 with seq_len 256 (test split, 516 windows): chance 1/12 = 8.3%; a bag-of-
bytes logistic regression 46%; naive Bayes on byte unigrams 35%
(``byte_naive_bayes_accuracy``; 41% on validation), bigrams 74%, trigrams 82%. A small
bi-LSTM (embed 64, 2 x 128 units, mean+max pooling, AdamW 2e-3, batch 64) reached 61%
test / 61-66% validation after 5 minutes (1030 steps) on 2 CPU cores: a model must read
words to do well, and there is room above that.

Training (``batch``): epoch e shifts every class's windows by one random offset in
[0, W) and visits the K * per_class windows in a random order (both from
``default_rng([seed, e])``, as ``LMDataset`` does). Evaluation (``eval_batches``):
windows at offsets 0, W, 2W, ... of every class, ordered window-major (window 0 of each
class, then window 1, ...), so any prefix of the pass is class-balanced.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from train.data import checks, text
from train.data.base import RandomAccessDataset, Source
from train.data.tokenizers import BOS

SPLITS = ("train", "validation", "test")
DEFAULT_CLASSES = (
    "argparse.py", "asyncio/base_events.py", "difflib.py", "doctest.py", "inspect.py",
    "ipaddress.py", "logging/__init__.py", "mailbox.py", "optparse.py", "pydoc.py",
    "subprocess.py", "tarfile.py",
)
DEFAULT_CLASS_BYTES = 56_000
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def class_name(path: str) -> str:
    """"logging/__init__.py" -> "logging", "asyncio/base_events.py" -> "asyncio.base_events"."""
    name = path[:-3] if path.endswith(".py") else path
    name = name[: -len("/__init__")] if name.endswith("/__init__") else name
    return name.replace("/", ".")


def file_sizes(classes: Sequence[str]) -> dict[str, int]:
    """Bytes of each class file under ``text.stdlib_dir()`` (-1 if it does not exist)."""
    root = text.stdlib_dir()
    return {c: (os.path.getsize(os.path.join(root, c))
                if os.path.isfile(os.path.join(root, c)) else -1) for c in classes}


@functools.lru_cache(maxsize=4)
def load_class_texts(classes: tuple[str, ...] = DEFAULT_CLASSES,
                     class_bytes: int = DEFAULT_CLASS_BYTES) -> tuple[bytes, ...]:
    """The first ``class_bytes`` bytes of each file (cached). Raises FileNotFoundError or
    ValueError naming the config key if a file is missing or shorter."""
    for path, size in file_sizes(classes).items():
        if size < 0:
            raise FileNotFoundError(f"data.text_classification.text_classes: {path!r} is not "
                                    f"a file under {text.stdlib_dir()}")
        if size < class_bytes:
            raise ValueError(f"data.text_classification.text_class_bytes={class_bytes} is too "
                             f"large: {path!r} has {size} bytes on this Python")
    root, out = text.stdlib_dir(), []
    for path in classes:
        with open(os.path.join(root, path), "rb") as f:
            out.append(f.read(class_bytes))
    return tuple(out)


def split_segments(class_bytes: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
                   ) -> dict[str, tuple[int, int]]:
    """{"train", "validation", "test"} -> [start, end) byte range within every class text
    (rounded fractions; test takes the rest)."""
    n1 = int(round(class_bytes * fractions[0]))
    n2 = n1 + int(round(class_bytes * fractions[1]))
    return {"train": (0, n1), "validation": (n1, n2), "test": (n2, class_bytes)}


def windows_per_class(segment_bytes: int, window: int, random_offset: bool) -> int:
    """Whole windows of ``window`` bytes in a segment; with a random offset (< window)
    the last window must still fit for the largest offset."""
    return (segment_bytes - (window - 1 if random_offset else 0)) // window


class TextClassificationDataset(RandomAccessDataset):
    """Random-access module-classification windows of one split; see the module docstring.

    Args:
      split: "train" | "validation" | "test".
      seq_len: tokens per row L (BOS + L - 1 bytes; >= 2).
      batch_size: training batch size.
      seed: run seed; ``batch(step)`` is a pure function of (data, seed, step).
      classes: stdlib-relative file paths, one per class (K = len(classes)).
      class_bytes: bytes of text per class (from the start of each file).
      fractions: (train, validation, test) fractions of each class text.

    Batches are {"tokens": int32[B, L], "label": int32[B]}; ``eval_batches`` adds
    "weights" float32[B] (1.0 real, 0.0 padded tail).
    """

    def __init__(self, split: str, seq_len: int, batch_size: int, seed: int, *,
                 classes: Sequence[str] = DEFAULT_CLASSES,
                 class_bytes: int = DEFAULT_CLASS_BYTES,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS + text), got {seq_len}")
        self.split, self.seq_len = split, seq_len
        self.classes = tuple(classes)
        self.class_names = tuple(class_name(c) for c in self.classes)
        self.num_classes = len(self.classes)
        self.window = seq_len - 1
        self.segment = split_segments(class_bytes, fractions)[split]
        a, b = self.segment
        self.segment_bytes = b - a
        texts = load_class_texts(self.classes, class_bytes)
        # One stream: class k's segment occupies [k * n, (k + 1) * n), n = segment_bytes.
        self.stream = self.tokenizer.encode_bytes(b"".join(t[a:b] for t in texts))
        self.per_class = windows_per_class(self.segment_bytes, self.window, True)
        self.per_class_eval = windows_per_class(self.segment_bytes, self.window, False)
        if self.per_class < 1:
            raise ValueError(f"data.text_classification.seq_len={seq_len} is too long: the "
                             f"{split} segment of each class has {self.segment_bytes} bytes, "
                             f"and a window with a random offset needs {2 * self.window - 1}")
        self.num_windows = self.num_classes * self.per_class
        self.num_eval_windows = self.num_classes * self.per_class_eval
        # Window-major eval order: position i -> class i % K, window i // K.
        i = np.arange(self.num_eval_windows, dtype=np.int64)
        self.eval_starts = ((i % self.num_classes) * self.segment_bytes
                            + (i // self.num_classes) * self.window)
        self._span = np.arange(self.window, dtype=np.int64)
        super().__init__(self.num_windows, batch_size, seed, self.num_eval_windows)

    def draw_epoch(self, rng: np.random.Generator) -> np.ndarray:
        """Stream offsets: one random offset < W for the epoch, windows in random order."""
        offset = int(rng.integers(self.window))
        ids = rng.permutation(self.num_windows)
        cls, k = np.divmod(ids, self.per_class)
        return cls * self.segment_bytes + offset + k * self.window

    def eval_ids(self, positions: np.ndarray) -> np.ndarray:
        return self.eval_starts[positions]

    def window_starts(self, epoch: int) -> np.ndarray:
        """int64[num_windows]: stream offsets of the training windows of ``epoch``."""
        return self.epoch_ids(epoch)

    def label_of(self, starts: np.ndarray) -> np.ndarray:
        """int32 class of stream offsets ``starts``."""
        return (np.asarray(starts) // self.segment_bytes).astype(np.int32)

    def text_offset(self, starts: np.ndarray) -> np.ndarray:
        """int64 byte offset within the class file of stream offsets ``starts``."""
        return np.asarray(starts) % self.segment_bytes + self.segment[0]

    def examples(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """{"tokens": int32[B, L], "label": int32[B]} of stream offsets ``starts``."""
        starts = np.asarray(starts, np.int64)
        tokens = np.empty((len(starts), self.seq_len), np.int32)
        tokens[:, 0] = BOS
        tokens[:, 1:] = self.stream[starts[:, None] + self._span]
        return {"tokens": tokens, "label": self.label_of(starts)}

    gather = examples  # item ids are stream offsets (training) / eval_starts (evaluation)


def byte_naive_bayes_accuracy(train: TextClassificationDataset,
                              evaluate: TextClassificationDataset, smoothing: float = 0.1
                              ) -> float:
    """Bag-of-bytes baseline: accuracy on ``evaluate``'s eval windows of multinomial naive
    Bayes over byte counts, fit on every byte of ``train``'s class segments (uniform
    class prior, since classes are balanced). The number a model must clearly beat."""
    k, vocab = train.num_classes, train.vocab_size
    counts = np.stack([np.bincount(train.stream[c * train.segment_bytes:
                                                 (c + 1) * train.segment_bytes],
                                   minlength=vocab) for c in range(k)]) + smoothing
    log_p = np.log(counts) - np.log(counts.sum(axis=1, keepdims=True))   # [K, V]
    correct = 0.0
    for b in evaluate.eval_batches(256):
        # Per-row byte histograms [B, V] (BOS included: the same for every class).
        hist = np.stack([np.bincount(row, minlength=vocab) for row in b["tokens"]])
        pred = np.argmax(hist @ log_p.T, axis=1)
        correct += float(((pred == b["label"]) * b["weights"]).sum())
    return correct / evaluate.num_eval_windows


# ---- Source "text_classification": config.data.text_classification --------------------
def default_config() -> ml_collections.ConfigDict:
    """``config.data.text_classification``: which stdlib module a window comes from."""
    c = ml_collections.ConfigDict()
    c.seq_len = 256                # tokens per row: BOS + seq_len - 1 bytes
    # One class per stdlib file (K = len), the first text_class_bytes bytes of each,
    # split by position (see the module docstring).
    c.text_classes = DEFAULT_CLASSES
    c.text_class_bytes = DEFAULT_CLASS_BYTES
    c.text_split_fractions = ml_collections.ConfigDict(dict(zip(SPLITS, DEFAULT_FRACTIONS)))
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.text_classification") -> None:
    checks.check_int(c, prefix, "seq_len", 2)
    checks.check_int(c, prefix, "text_class_bytes", 1)
    classes, key = c.text_classes, f"{prefix}.text_classes"
    if isinstance(classes, str) or not all(isinstance(p, str) and p for p in classes):
        checks.fail(key, classes, "expected a tuple of stdlib-relative file paths such as "
                    "'argparse.py'")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        checks.fail(key, classes, "expected at least 2 distinct files")
    for path, size in file_sizes(classes).items():
        if size < 0:
            checks.fail(key, classes, f"{path!r} is not a file under {text.stdlib_dir()}")
        if size < c.text_class_bytes:
            checks.fail(f"{prefix}.text_class_bytes", c.text_class_bytes,
                        f"expected <= {size}: {path!r} has {size} bytes on this Python")
    fractions = checks.check_split_fractions(c, prefix, "text_split_fractions")
    for split, (start, end) in split_segments(c.text_class_bytes, fractions).items():
        # A window with a random offset (< W = seq_len - 1) needs 2 W - 1 bytes.
        if windows_per_class(end - start, c.seq_len - 1, True) < 1:
            checks.fail(f"{prefix}.seq_len", c.seq_len, f"expected <= "
                        f"{(end - start + 1) // 2 + 1}: the {split} segment of each class "
                        f"has {end - start} bytes")


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
         ) -> TextClassificationDataset:
    return TextClassificationDataset(
        split, c.seq_len, batch_size, seed, classes=tuple(c.text_classes),
        class_bytes=c.text_class_bytes,
        fractions=tuple(c.text_split_fractions[s] for s in SPLITS))


SOURCE = Source(default_config, validate, make)
