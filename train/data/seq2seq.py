"""Generated translation-like task: integers in digits -> English words.

    "1234" -> "one thousand two hundred thirty-four"

American style without "and" ("one hundred one"), hyphenated tens ("twenty-one").
Examples are byte-level with the shared ``ByteTokenizer``. Numbers ``0..max_number``
are split into train/validation/test by a fixed integer hash of the number (not of the
run seed), so a held-out number never appears in training under any seed, and the
split of a number does not change when ``max_number`` does.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from train.data import checks
from train.data.base import RandomAccessDataset, Source
from train.data.tokenizers import pad_batch

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
MAX_SUPPORTED = 10**12 - 1
MAX_DATASET_NUMBER = 999_999  # longest_target_len's closed form covers up to here
SPLITS = ("train", "validation", "test")


def _below_thousand(n: int) -> str:
    """1 <= n <= 999 -> words."""
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest >= 20:
        words.append(_TENS[rest // 10] + (f"-{_ONES[rest % 10]}" if rest % 10 else ""))
    elif rest:
        words.append(_ONES[rest])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """0 <= n <= 999_999_999_999 -> English words, e.g. 110 -> "one hundred ten"."""
    n = int(n)
    if not 0 <= n <= MAX_SUPPORTED:
        raise ValueError(f"number_to_words supports 0..{MAX_SUPPORTED}, got {n}")
    if n == 0:
        return "zero"
    words = []
    for scale, name in _SCALES:
        count, n = divmod(n, scale)
        if count:
            words.append(f"{_below_thousand(count)} {name}")
    if n:
        words.append(_below_thousand(n))
    return " ".join(words)


def longest_target_len(max_number: int) -> int:
    """Characters (= bytes) of the longest ``number_to_words(n)`` for 0 <= n <= max_number
    (<= 999_999), excluding EOS. Closed form over n = 1000 * a + b instead of encoding
    up to a million strings."""
    if not 0 <= max_number <= MAX_DATASET_NUMBER:
        raise ValueError(f"max_number must be in 0..{MAX_DATASET_NUMBER}, got {max_number}")
    small = np.array([len(number_to_words(i)) for i in range(1000)])
    a, b = np.divmod(np.arange(max_number + 1), 1000)
    # "<a> thousand" plus " <b>" unless b == 0; below 1000 just "<b>".
    lens = np.where(a == 0, small[b],
                    small[a] + len(" thousand") + np.where(b > 0, 1 + small[b], 0))
    return int(lens.max())


def _hash_unit(numbers: np.ndarray) -> np.ndarray:
    """Fixed pseudo-random float64 in [0, 1) per number (splitmix64 finalizer)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = numbers.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def number_splits(max_number: int, train_fraction: float = 0.9,
                  validation_fraction: float = 0.05) -> dict[str, np.ndarray]:
    """{"train", "validation", "test"} -> int64 numbers of 0..max_number in that split.

    A number is in train if its hash u < train_fraction, in validation if
    u < train_fraction + validation_fraction, else in test; sizes match the fractions
    up to sampling noise. Each split is ordered by hash: a fixed, shuffled-looking
    order, so a capped eval set (the first k) is a uniform sample, not the smallest
    numbers.
    """
    numbers = np.arange(max_number + 1, dtype=np.int64)
    u = _hash_unit(numbers)
    which = (u >= train_fraction).astype(np.int8) + (u >= train_fraction + validation_fraction)
    out = {}
    for i, name in enumerate(SPLITS):
        sel = which == i
        out[name] = numbers[sel][np.argsort(u[sel], kind="stable")]
    return out


class Seq2SeqDataset(RandomAccessDataset):
    """Random-access (digits -> words) batches over a fixed list of numbers.

    Item ids index ``numbers``; evaluation walks ``eval_numbers`` (its first
    ``max_eval_examples``) in order.

    Args:
      numbers: int64[n] the split's numbers (eval order = this order).
      max_input_len: padded source length, >= digits + 1 (EOS).
      max_target_len: padded target length, >= longest words + 1 (EOS).
      batch_size: training batch size.
      seed: run seed; ``batch(step)`` is a pure function of (numbers, seed, step).
      max_eval_examples: evaluate on the first this-many numbers only (0 = all).
    """

    def __init__(self, numbers: np.ndarray, max_input_len: int, max_target_len: int,
                 batch_size: int, seed: int, max_eval_examples: int = 0):
        self.numbers = np.asarray(numbers, dtype=np.int64)
        self.max_input_len, self.max_target_len = max_input_len, max_target_len
        self.eval_numbers = (self.numbers[:max_eval_examples] if max_eval_examples > 0
                             else self.numbers)
        super().__init__(len(self.numbers), batch_size, seed, len(self.eval_numbers))

    def examples(self, numbers: np.ndarray) -> dict[str, np.ndarray]:
        """-> {"inputs": int32[len, max_input_len], "targets": int32[len, max_target_len]}:
        digits + EOS and words + EOS, right-padded with PAD (the task adds BOS/shift)."""
        enc = self.tokenizer.encode
        return {
            "inputs": pad_batch([enc(str(int(n)), add_eos=True) for n in numbers],
                                self.max_input_len, "max_input_len"),
            "targets": pad_batch([enc(number_to_words(n), add_eos=True) for n in numbers],
                                 self.max_target_len, "max_target_len"),
        }

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """``examples`` of ``numbers[ids]`` (eval ids < max_eval_examples index the same
        prefix, so ``eval_numbers[i] == numbers[i]``)."""
        return self.examples(self.numbers[ids])

    def decode_inputs(self, ids: np.ndarray) -> list[str]:
        """int[B, L] source ids -> digit strings (up to the first EOS)."""
        return self.tokenizer.decode_batch(ids)

    def decode_targets(self, ids: np.ndarray) -> list[str]:
        """int[B, L] target or predicted ids -> word strings (up to the first EOS),
        for exact match and BLEU against ``decode_targets(batch["targets"])``."""
        return self.tokenizer.decode_batch(ids)


def numbers_to_words_dataset(split: str, seed: int, batch_size: int,
                             max_number: int = MAX_DATASET_NUMBER,
                             train_fraction: float = 0.9, validation_fraction: float = 0.05,
                             max_input_len: int = 8, max_target_len: int = 72,
                             max_eval_examples: int = 0) -> Seq2SeqDataset:
    """The ``split`` ("train" | "validation" | "test") of the numbers task."""
    numbers = number_splits(max_number, train_fraction, validation_fraction)[split]
    if len(numbers) == 0:
        raise ValueError(f"split {split!r} of 0..{max_number} is empty; raise max_number "
                         "or that split's fraction")
    return Seq2SeqDataset(numbers, max_input_len, max_target_len, batch_size, seed,
                          max_eval_examples)


# ---- Source "numbers_to_words": config.data.numbers_to_words -----------------------------
def default_config() -> ml_collections.ConfigDict:
    """``config.data.numbers_to_words``: digits -> English words."""
    c = ml_collections.ConfigDict()
    c.max_number = MAX_DATASET_NUMBER  # numbers 0..max_number
    # Padded lengths including EOS; the defaults fit 6 digits + EOS and the longest
    # 999_999-range target (64 characters) + EOS.
    c.max_input_len = 8
    c.max_target_len = 72
    # Split fractions by number hash (test takes the rest; see number_splits).
    c.train_fraction = 0.9
    c.validation_fraction = 0.05
    c.test_fraction = 0.05
    c.max_eval_examples = 0        # evaluate on the first N numbers of a split (0 = all)
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.numbers_to_words") -> None:
    checks.check_int(c, prefix, "max_eval_examples", 0)
    checks.check_flat_fractions(c, prefix)
    checks.check_int(c, prefix, "max_number", 1, MAX_DATASET_NUMBER)
    checks.check_int(c, prefix, "max_input_len", len(str(c.max_number)) + 1)
    need_out = longest_target_len(c.max_number) + 1
    if c.max_target_len < need_out:
        checks.fail(f"{prefix}.max_target_len", c.max_target_len, f"expected >= {need_out} "
                    f"(longest target for max_number={c.max_number} plus EOS)")


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
         ) -> Seq2SeqDataset:
    return numbers_to_words_dataset(
        split, seed, batch_size, max_number=c.max_number, train_fraction=c.train_fraction,
        validation_fraction=c.validation_fraction, max_input_len=c.max_input_len,
        max_target_len=c.max_target_len, max_eval_examples=c.max_eval_examples)


SOURCE = Source(default_config, validate, make)
