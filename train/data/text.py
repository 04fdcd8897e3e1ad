"""Embedded offline text corpus (Python standard-library source) and the LM dataset.

Every CPython installation ships its standard library as ``.py`` source, so a
few megabytes of real, varied text (code, docstrings, comments) are available with no
download. ``STDLIB_FILES`` is a fixed, sorted list of modules present in CPython
3.10-3.13 (where a module became a package, e.g. ``zipfile``, both spellings are
listed and whichever exists is read). The files are concatenated in list order and cut
at ``max_bytes``. The default 3,000,000 bytes is below the list's total on every
supported version (3.15-3.38 MB), so the corpus and its split sizes have the same
length everywhere (its content differs slightly between Python versions).

Splits are contiguous fractions of that stream: train first, then validation, then
test. Because the stream is whole files in sorted order, validation and test are
(apart from the one file straddling each boundary) files the model never trained on,
which measures generalization rather than memorization, while the split sizes still
match the fractions exactly. (A split by whole files cannot match fractions with only
~60 files of very different sizes.)
"""
from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np

from train.data import checks
from train.data.base import RandomAccessDataset, Source
from train.data.tokenizers import make_tokenizer

DEFAULT_MAX_BYTES = 3_000_000

# Sorted; paths relative to the standard-library directory. Do not reorder or edit
# without need: the corpus (and every result measured on it) depends on this list.
STDLIB_FILES = (
    "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py", "bdb.py",
    "calendar.py", "codecs.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py", "doctest.py",
    "email/message.py", "enum.py", "fractions.py", "ftplib.py", "functools.py",
    "gettext.py", "gzip.py", "heapq.py", "http/client.py", "http/server.py",
    "imaplib.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "locale.py", "logging/__init__.py", "mailbox.py", "optparse.py", "os.py",
    "pathlib.py", "pathlib/__init__.py", "pdb.py", "pickle.py", "platform.py",
    "pprint.py", "pydoc.py", "random.py", "shutil.py", "smtplib.py", "socket.py",
    "ssl.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
    "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py",
    "typing.py", "unittest/case.py", "urllib/parse.py", "urllib/request.py", "uuid.py",
    "zipfile.py", "zipfile/__init__.py",
)


def stdlib_dir() -> str:
    """The directory holding the running interpreter's standard-library source."""
    return os.path.dirname(os.__file__)


@functools.lru_cache(maxsize=4)
def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The first ``max_bytes`` bytes of the ``STDLIB_FILES`` present, concatenated.

    Missing files are skipped (installations differ); raises FileNotFoundError if none
    is present. Cached: train and eval datasets share one read.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    root, parts, total = stdlib_dir(), [], 0
    for rel in STDLIB_FILES:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            parts.append(f.read(max_bytes - total))
        total += len(parts[-1])
        if total >= max_bytes:
            break
    if not parts:
        raise FileNotFoundError(f"none of the corpus files was found under {root}")
    return b"".join(parts)


def split_sizes(num_tokens: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Token counts of (train, validation, test): rounded fractions, test takes the rest."""
    n_train = int(round(num_tokens * fractions[0]))
    n_val = int(round(num_tokens * fractions[1]))
    return n_train, n_val, num_tokens - n_train - n_val


@functools.lru_cache(maxsize=4)
def corpus_splits(max_bytes: int = DEFAULT_MAX_BYTES, train_fraction: float = 0.9,
                  validation_fraction: float = 0.05, test_fraction: float = 0.05,
                  tokenizer: str = "") -> dict[str, np.ndarray]:
    """{"train", "validation", "test"} -> int32[n] token streams (contiguous, disjoint, in
    that order; see the module docstring).

    The corpus bytes are split first, then each split is tokenized (``tokenizer``: "" =
    bytes, else a saved tokenizer's directory, ``tokenizers.make_tokenizer``), so every
    tokenizer sees the same validation and test text. Cached; do not modify the arrays.
    """
    corpus = load_corpus(max_bytes)
    n_train, n_val, _ = split_sizes(
        len(corpus), (train_fraction, validation_fraction, test_fraction))
    tok = make_tokenizer(tokenizer)
    parts = {"train": corpus[:n_train], "validation": corpus[n_train:n_train + n_val],
             "test": corpus[n_train + n_val:]}
    return {split: tok.encode_bytes(data) for split, data in parts.items()}


def _unigram_nll(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Mean negative log-likelihood (nats/token) of ``eval_tokens`` under the add-one
    smoothed unigram model p(v) = (count_train(v) + 1) / (len(train) + vocab_size)."""
    counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size)
    if counts.size > vocab_size:
        raise ValueError(f"train tokens contain ids >= vocab_size={vocab_size}")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-log_p[np.asarray(eval_tokens).ravel()].mean())


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray,
                       vocab_size: int) -> float:
    """exp(mean NLL) of ``eval_tokens`` under the add-one smoothed unigram model fit on
    ``train_tokens``: the baseline perplexity a trained language model must beat."""
    return float(np.exp(_unigram_nll(train_tokens, eval_tokens, vocab_size)))


def unigram_bits_per_byte(train_tokens: np.ndarray, eval_tokens: np.ndarray,
                          vocab_size: int) -> float:
    """The same baseline in bits per token, i.e. bits per byte for a byte-token stream
    without special tokens (such as the stdlib corpus)."""
    return _unigram_nll(train_tokens, eval_tokens, vocab_size) / np.log(2.0)


class LMDataset(RandomAccessDataset):
    """Language-modelling windows over one token stream.

    A window is ``seq_len + 1`` consecutive tokens; consecutive windows start
    ``seq_len`` apart, i.e. share one boundary token, so the model inputs
    ``tokens[:, :-1]`` never overlap and every token after the first is a target
    ``tokens[:, 1:]`` exactly once per pass.

    Training: epoch ``e`` shifts all windows by a random offset in ``[0, seq_len)``
    (so window boundaries differ between epochs) and visits its ``num_windows`` windows
    in a random order; both come from ``default_rng([seed, e])``. Item ids are window
    start offsets into ``tokens``.

    Evaluation: windows starting at 0, seq_len, 2 * seq_len, ... (the < seq_len tokens
    after the last full window are not scored).

    Batches: {"tokens": int32[B, seq_len + 1]}; ``eval_batches`` adds "weights".

    Args:
      tokens: int32[n] token stream.
      seq_len: model sequence length (> 0).
      batch_size: training batch size (> 0).
      seed: run seed; ``batch(step)`` is a pure function of (tokens, seed, step).
      random_offset: shift windows per epoch (default True).
      tokenizer: what made ``tokens`` (default the byte tokenizer); its ``vocab_size``
        is the dataset's.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 random_offset: bool = True, tokenizer=None):
        if tokenizer is not None:
            self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.seq_len = seq_len
        self.random_offset = random_offset
        n = len(self.tokens)
        # The last window must end inside the stream for the largest offset
        # (seq_len - 1 when random): start + seq_len + 1 <= n.
        max_offset = seq_len - 1 if random_offset else 0
        self.num_windows = (n - 1 - max_offset) // seq_len
        self.num_eval_windows = (n - 1) // seq_len
        if self.num_windows <= 0:
            raise ValueError(f"seq_len={seq_len} is too long for a split of {n} tokens")
        self._window = np.arange(seq_len + 1, dtype=np.int64)
        super().__init__(self.num_windows, batch_size, seed, self.num_eval_windows)

    def draw_epoch(self, rng: np.random.Generator) -> np.ndarray:
        offset = int(rng.integers(self.seq_len)) if self.random_offset else 0
        return offset + self.seq_len * rng.permutation(self.num_windows)

    def eval_ids(self, positions: np.ndarray) -> np.ndarray:
        return positions * self.seq_len

    def window_starts(self, epoch: int) -> np.ndarray:
        """int64[num_windows]: token offsets of the windows of ``epoch``, in visit order."""
        return self.epoch_ids(epoch)

    def gather(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """{"tokens": int32[B, seq_len + 1]} of the windows at offsets ``starts``."""
        return {"tokens": self.tokens[starts[:, None] + self._window]}


# ---- Source "stdlib_text": config.data.stdlib_text -------------------------------------
def default_config() -> ml_collections.ConfigDict:
    """``config.data.stdlib_text``: LM windows of the stdlib corpus."""
    c = ml_collections.ConfigDict()
    c.seq_len = 256                # tokens per example (model inputs)
    # Contiguous split fractions of the corpus stream (see the module docstring).
    c.train_fraction = 0.9
    c.validation_fraction = 0.05
    c.test_fraction = 0.05
    c.max_bytes = DEFAULT_MAX_BYTES  # corpus cap before splitting
    # "" = bytes (ids 0..259); else a directory with a saved tokenizer.json, such as a
    # workdir train.convert wrote (its tokenizer/): a converted GPT-2 / BERT reads the
    # corpus in its own tokens. Split sizes then count bytes, not tokens.
    c.tokenizer = ""
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.stdlib_text") -> None:
    checks.check_int(c, prefix, "seq_len", 1)
    fractions = checks.check_flat_fractions(c, prefix)
    checks.check_int(c, prefix, "max_bytes", 1)
    checks.check_tokenizer(c, prefix)
    for split, n in zip(checks.SPLITS, split_sizes(c.max_bytes, fractions)):
        # A training-style window set (random offset < seq_len) needs 2 * seq_len.
        if n and n < 2 * c.seq_len:
            checks.fail(f"{prefix}.seq_len", c.seq_len, f"expected <= {n // 2}: the {split} "
                        f"split of max_bytes={c.max_bytes} has {n} tokens")


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int) -> LMDataset:
    tokens = corpus_splits(c.max_bytes, c.train_fraction, c.validation_fraction,
                           c.test_fraction, c.tokenizer)[split]
    return LMDataset(tokens, c.seq_len, batch_size, seed,
                     tokenizer=make_tokenizer(c.tokenizer))


SOURCE = Source(default_config, validate, make)
