"""Checks the sources' ``validate`` functions share; each error is one ValueError line
naming the full key (``prefix`` is the section, e.g. "data.shapes") and what is allowed."""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

SPLITS = ("train", "validation", "test")


def fail(key: str, value, allowed: str):
    """Raise the ValueError every data check uses: "<key>=<value> is invalid: <allowed>"."""
    raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def check_int(c, prefix: str, key: str, low: int, high: int | None = None) -> None:
    """``c[key]`` is an integer (not a bool) in [low, high] (no upper bound if None)."""
    v = c[key]
    if not isinstance(v, Integral) or isinstance(v, bool) or v < low or (
            high is not None and v > high):
        fail(f"{prefix}.{key}", v,
             f"expected an integer >= {low}" + (f" and <= {high}" if high else ""))


def check_str(c, prefix: str, key: str, nonempty: bool = False) -> None:
    """``c[key]`` is a string (non-empty if ``nonempty``)."""
    v = c[key]
    if not isinstance(v, str) or (nonempty and not v):
        fail(f"{prefix}.{key}", v,
             "expected a non-empty string" if nonempty else "expected a string ('' = not used)")


def check_tokenizer(c, prefix: str) -> None:
    """``c.tokenizer``: "" (bytes) or a directory holding a saved tokenizer.json (or a
    workdir whose tokenizer/ does)."""
    from train.data.tokenizers import tokenizer_dir  # noqa: PLC0415

    check_str(c, prefix, "tokenizer")
    if c.tokenizer:
        try:
            tokenizer_dir(c.tokenizer)
        except ValueError as e:
            fail(f"{prefix}.tokenizer", c.tokenizer, str(e))


def check_flat_fractions(c, prefix: str) -> tuple[float, float, float]:
    """The keys train_fraction, validation_fraction, test_fraction: each in [0, 1],
    train > 0, summing to 1. Returns them in that order."""
    keys = ("train_fraction", "validation_fraction", "test_fraction")
    for key in keys:
        v = c[key]
        if not isinstance(v, Real) or not 0.0 <= v <= 1.0:
            fail(f"{prefix}.{key}", v, "expected a number in [0, 1]")
    if c.train_fraction <= 0.0:
        fail(f"{prefix}.train_fraction", c.train_fraction, "expected > 0")
    total = sum(c[k] for k in keys)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        fail(f"{prefix}.test_fraction", c.test_fraction,
             f"train_fraction + validation_fraction + test_fraction must sum to 1, got {total}")
    return tuple(float(c[k]) for k in keys)


def check_split_fractions(c, prefix: str, key: str) -> tuple[float, float, float]:
    """(train, validation, test) of the section ``c[key]``: every split needs a positive
    share (each is a separate evaluation set) and the shares sum to 1."""
    values = []
    for split in SPLITS:
        v = c[key].get(split)
        if not isinstance(v, Real) or isinstance(v, bool) or not 0.0 < v <= 1.0:
            fail(f"{prefix}.{key}.{split}", v, "expected a number in (0, 1]")
        values.append(float(v))
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        fail(f"{prefix}.{key}", c[key].to_dict(),
             f"the fractions must sum to 1, got {sum(values)}")
    return tuple(values)


def check_tfds(c, prefix: str, nonempty: Sequence[str]) -> None:
    """The ``nonempty`` string keys and ``tfds_splits.{train,validation,test}``."""
    for key in nonempty:
        check_str(c, prefix, key, nonempty=True)
    for split in SPLITS:
        if not isinstance(c.tfds_splits.get(split), str):
            fail(f"{prefix}.tfds_splits.{split}", c.tfds_splits.get(split),
                 "expected a TFDS split string such as 'train' or 'train[:5%]'")
