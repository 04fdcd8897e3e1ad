"""Input pipelines: embedded offline datasets, tokenizers and TFDS adapters.

Every dataset is random-access: ``ds.batch(step)`` is a pure function of
(data, seed, step), so a resumed run needs only the step as iterator state, and
``ds.eval_batches(batch_size)`` is one fixed-order pass with a ``weights`` array
(1.0 real, 0.0 padding). Each dataset has ``vocab_size``, ``tokenizer`` and
``data_info()`` (the fields the trainer copies into the model config, e.g.
{"vocab_size": 260, "num_classes": 16, "image_size": 32, "channels": 3}).

Sources (``data_cfg.source``):
  "stdlib_text"       byte-level LM on Python standard-library source  -> {"tokens"}
  "numbers_to_words"  "1234" -> "one thousand two hundred thirty-four" -> {"inputs", "targets"}
  "tfds"              a TensorFlow Datasets text split: LM, or classification when
                      ``label_key`` is set -> {"tokens", "label"}
  "shapes"            rendered shapes with captions, labels and masks (no download)
                      -> {"image", "mask", "caption", "label", ...}; splits add "zero_shot"
  "tfds_images"       a TFDS image split (mnist, cifar10, coco_captions, ...)
                      -> {"image", ["label"], ["caption"]}
  "synthetic_series"  generated multivariate series (trend + daily/weekly seasons + noise)
                      -> forecasting windows {"inputs", "targets", "start"}
  "real_series"       a real series shipped with matplotlib (Google daily OHLCV, logs)
                      -> the same forecasting windows
  "text_classification"  which standard-library module a window of source comes from
                      -> {"tokens", "label"}
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import ml_collections

from train.data import seq2seq, shapes, text, text_classification, timeseries
from train.data.tokenizers import BOS, EOS, MASK, PAD, VOCAB_SIZE, ByteTokenizer

SOURCES = ("stdlib_text", "numbers_to_words", "tfds", "shapes", "tfds_images",
           "synthetic_series", "real_series", "text_classification")
SERIES_SOURCES = ("synthetic_series", "real_series")
SPLITS = ("train", "validation", "test")   # what the trainer builds
SHAPES_SPLITS = shapes.SPLITS              # SPLITS + "zero_shot" (held-out classes only)


def default_config() -> ml_collections.ConfigDict:
    """All data keys with their defaults (a run's config nests this as ``config.data``)."""
    c = ml_collections.ConfigDict()
    c.source = "stdlib_text"       # one of SOURCES
    c.seq_len = 256                # LM / classification tokens per example (model inputs)
    c.batch_size = 32              # training examples per step
    c.eval_batch_size = 64         # examples per eval batch (last one padded, weights 0)
    # Split fractions: contiguous for stdlib_text, by number hash for numbers_to_words.
    c.train_fraction = 0.9
    c.validation_fraction = 0.05
    c.test_fraction = 0.05
    # stdlib_text: corpus cap before splitting; tfds LM: token cap per split (0 = all).
    c.max_bytes = text.DEFAULT_MAX_BYTES
    # numbers_to_words: numbers 0..max_number; lengths include EOS (defaults fit
    # 6 digits + EOS and the longest 999_999-range target, 64 characters + EOS).
    c.max_number = seq2seq.MAX_DATASET_NUMBER
    c.max_input_len = 8
    c.max_target_len = 72
    # numbers_to_words / tfds classification: evaluate on the first N examples (0 = all).
    c.max_eval_examples = 0
    # tfds: dataset name, our split -> TFDS split string (slices like "train[:5%]" work).
    c.tfds_name = "lm1b"
    c.tfds_splits = ml_collections.ConfigDict(
        {"train": "train", "validation": "validation", "test": "test"})
    c.text_key = "text"
    c.label_key = ""               # "" = language modelling; e.g. "label" = classification
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
    # Images (shapes, tfds_images): side in pixels; tfds_images: 0 = native size.
    c.image_size = 32
    # Caption tokens BOS + text + EOS, PAD-padded; shapes needs >= 44 (longest caption 42
    # bytes); tfds captions longer than max_caption_len - 2 bytes are cut.
    c.max_caption_len = 48
    # shapes: (color, shape) classes such as "red square" that the zero_shot split holds;
    # () disables zero_shot. Default: one per color and per shape (a Latin square).
    c.heldout_classes = shapes.DEFAULT_HELDOUT
    # shapes: True keeps heldout_classes out of train/validation/test (contrastive runs
    # with zero-shot evaluation); False puts all 16 classes there (classification runs).
    c.exclude_heldout_from_train = True
    # shapes: examples per split (each split is a fixed set; the seed only reorders).
    c.shapes_split_sizes = ml_collections.ConfigDict(dict(shapes.DEFAULT_SIZES))
    # tfds_images (name, splits, data_dir and max_eval_examples as for tfds): feature keys;
    # "" = none; "a/b" = nested, e.g. caption_key="captions/text" for coco_captions.
    c.image_key = "image"
    c.caption_key = ""
    # Series (synthetic_series, real_series): windows of `lookback` input steps and
    # `horizon` target steps; splits are chronological by target time.
    c.lookback = 96
    c.horizon = 24
    c.series_split_fractions = ml_collections.ConfigDict(
        dict(zip(SPLITS, timeseries.DEFAULT_FRACTIONS)))
    c.series_eval_stride = 1       # eval every k-th window (1 = all; horizon = no overlap)
    c.series_length = timeseries.DEFAULT_LENGTH      # synthetic_series: steps N
    c.series_channels = timeseries.DEFAULT_CHANNELS  # synthetic_series: channels C
    c.series_data_seed = 0         # synthetic_series: changes the series, not the run seed
    c.real_series = "goog"         # real_series: one of timeseries.REAL_SERIES
    # text_classification: one class per stdlib file (K = len), the first text_class_bytes
    # bytes of each, split by position; windows are BOS + seq_len - 1 bytes.
    c.text_classes = text_classification.DEFAULT_CLASSES
    c.text_class_bytes = text_classification.DEFAULT_CLASS_BYTES
    c.text_split_fractions = ml_collections.ConfigDict(
        dict(zip(SPLITS, text_classification.DEFAULT_FRACTIONS)))
    return c


def _fail(key: str, value, allowed: str):
    raise ValueError(f"data.{key}={value!r} is invalid: {allowed}")


def _check_int(cfg, key: str, low: int, high: int | None = None):
    v = cfg[key]
    if not isinstance(v, Integral) or isinstance(v, bool) or v < low or (
            high is not None and v > high):
        _fail(key, v, f"expected an integer >= {low}" + (f" and <= {high}" if high else ""))


def validate(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending key and its allowed values."""
    c = data_cfg
    if c.source not in SOURCES:
        _fail("source", c.source, f"expected one of {SOURCES}")
    for key in ("seq_len", "batch_size", "eval_batch_size"):
        _check_int(c, key, 1)
    _check_int(c, "max_eval_examples", 0)
    fractions = {k: c[k] for k in ("train_fraction", "validation_fraction", "test_fraction")}
    for key, v in fractions.items():
        if not isinstance(v, Real) or not 0.0 <= v <= 1.0:
            _fail(key, v, "expected a number in [0, 1]")
    if c.train_fraction <= 0.0:
        _fail("train_fraction", c.train_fraction, "expected > 0")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        _fail("test_fraction", c.test_fraction,
              f"train_fraction + validation_fraction + test_fraction must sum to 1, "
              f"got {sum(fractions.values())}")

    if c.source == "stdlib_text":
        _check_int(c, "max_bytes", 1)
        sizes = text.split_sizes(c.max_bytes, tuple(fractions.values()))
        for split, n in zip(SPLITS, sizes):
            # A training-style window set (random offset < seq_len) needs 2 * seq_len.
            if n and n < 2 * c.seq_len:
                _fail("seq_len", c.seq_len, f"expected <= {n // 2}: the {split} split of "
                      f"max_bytes={c.max_bytes} has {n} tokens")
    elif c.source == "numbers_to_words":
        _check_int(c, "max_number", 1, seq2seq.MAX_DATASET_NUMBER)
        need_in = len(str(c.max_number)) + 1
        _check_int(c, "max_input_len", need_in)
        need_out = seq2seq.longest_target_len(c.max_number) + 1
        if c.max_target_len < need_out:
            _fail("max_target_len", c.max_target_len, f"expected >= {need_out} (longest "
                  f"target for max_number={c.max_number} plus EOS)")
    elif c.source == "shapes":
        _validate_shapes(c)
    elif c.source in SERIES_SOURCES:
        _validate_series(c)
    elif c.source == "text_classification":
        _validate_text_classification(c)
    elif c.source == "tfds_images":
        _check_int(c, "image_size", 0)
        _check_tfds(c, ("tfds_name", "image_key"))
        for key in ("label_key", "caption_key"):
            if not isinstance(c[key], str):
                _fail(key, c[key], "expected a string ('' = not used)")
        if c.caption_key:
            _check_int(c, "max_caption_len", 3)
    else:  # tfds
        _check_int(c, "max_bytes", 0)
        _check_tfds(c, ("tfds_name", "text_key"))
        if c.label_key and c.seq_len < 2:
            _fail("seq_len", c.seq_len, "expected >= 2 for classification (BOS + text)")


def _check_tfds(c, nonempty: tuple[str, ...]) -> None:
    for key in nonempty:
        if not isinstance(c[key], str) or not c[key]:
            _fail(key, c[key], "expected a non-empty string")
    for split in SPLITS:
        if not isinstance(c.tfds_splits.get(split), str):
            _fail(f"tfds_splits.{split}", c.tfds_splits.get(split),
                  "expected a TFDS split string such as 'train' or 'train[:5%]'")


def _split_fractions(c, key: str) -> tuple[float, float, float]:
    """(train, validation, test) of the ConfigDict ``c[key]``, checked like the flat keys;
    every split needs a positive share (each is a separate evaluation set)."""
    values = []
    for split in SPLITS:
        v = c[key].get(split)
        if not isinstance(v, Real) or isinstance(v, bool) or not 0.0 < v <= 1.0:
            _fail(f"{key}.{split}", v, "expected a number in (0, 1]")
        values.append(float(v))
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        _fail(key, c[key].to_dict(), f"the fractions must sum to 1, got {sum(values)}")
    return tuple(values)


def _validate_series(c) -> None:
    for key in ("lookback", "horizon", "series_eval_stride"):
        _check_int(c, key, 1)
    fractions = _split_fractions(c, "series_split_fractions")
    if c.source == "synthetic_series":
        _check_int(c, "series_length", 2)
        _check_int(c, "series_channels", 1)
        _check_int(c, "series_data_seed", 0)
        length = c.series_length
    else:
        if c.real_series not in timeseries.REAL_SERIES:
            _fail("real_series", c.real_series, f"expected one of {timeseries.REAL_SERIES}")
        length = timeseries.REAL_SERIES_LENGTHS[c.real_series]
    for split, (start, end) in timeseries.split_bounds(length, fractions).items():
        # Same rule as ForecastDataset: first target row t in [max(start, L), end - H].
        if end - c.horizon < max(start, c.lookback):
            key = "horizon" if end - start < c.horizon else "lookback"
            _fail(key, c[key], f"the {split} split of the {length}-step series (rows "
                  f"{start}..{end}) holds no window of lookback={c.lookback} + "
                  f"horizon={c.horizon}")


def _validate_text_classification(c) -> None:
    _check_int(c, "seq_len", 2)
    _check_int(c, "text_class_bytes", 1)
    classes = c.text_classes
    if isinstance(classes, str) or not all(isinstance(p, str) and p for p in classes):
        _fail("text_classes", classes, "expected a tuple of stdlib-relative file paths "
              "such as 'argparse.py'")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        _fail("text_classes", classes, "expected at least 2 distinct files")
    for path, size in text_classification.file_sizes(classes).items():
        if size < 0:
            _fail("text_classes", classes, f"{path!r} is not a file under "
                  f"{text.stdlib_dir()}")
        if size < c.text_class_bytes:
            _fail("text_class_bytes", c.text_class_bytes,
                  f"expected <= {size}: {path!r} has {size} bytes on this Python")
    fractions = _split_fractions(c, "text_split_fractions")
    for split, (start, end) in text_classification.split_segments(
            c.text_class_bytes, fractions).items():
        # A window with a random offset (< W = seq_len - 1) needs 2 W - 1 bytes.
        if text_classification.windows_per_class(end - start, c.seq_len - 1, True) < 1:
            _fail("seq_len", c.seq_len, f"expected <= {(end - start + 1) // 2 + 1}: the "
                  f"{split} segment of each class has {end - start} bytes")


def _validate_shapes(c) -> None:
    _check_int(c, "image_size", 16)
    _check_int(c, "max_caption_len", shapes.longest_caption_len() + 2)
    held = c.heldout_classes
    if isinstance(held, str) or not all(isinstance(n, str) for n in held):
        _fail("heldout_classes", held, "expected a tuple of class names such as 'red square'")
    for name in held:
        if name not in shapes.CLASS_NAMES:
            _fail("heldout_classes", held, f"{name!r} is not one of {shapes.CLASS_NAMES}")
    if len(set(held)) != len(held):
        _fail("heldout_classes", held, "expected no duplicates")
    if c.exclude_heldout_from_train:
        # Zero-shot transfer composes attributes seen in training: each color and each
        # shape must still occur in some training class.
        seen = [n.split() for n in shapes.CLASS_NAMES if n not in held]
        for i, values in ((0, shapes.COLORS), (1, shapes.SHAPES)):
            missing = sorted(set(values) - {n[i] for n in seen})
            if missing:
                _fail("heldout_classes", held, f"holds out every class with {missing[0]!r}, "
                      "so training never shows it")
    sizes = c.shapes_split_sizes
    for split in shapes.SPLITS:
        v = sizes.get(split)
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            _fail(f"shapes_split_sizes.{split}", v, "expected an integer >= 1")


def make_dataset(data_cfg: ml_collections.ConfigDict, split: str, seed: int):
    """The ``split`` ("train" | "validation" | "test"; shapes also "zero_shot") dataset of
    ``data_cfg.source``.

    Returns an ``LMDataset``, ``Seq2SeqDataset``, ``ClassificationDataset``,
    ``ShapesDataset``, ``ImageDataset``, ``ForecastDataset`` or
    ``TextClassificationDataset``; ``batch_size`` comes from ``data_cfg.batch_size``
    (evaluation passes its own).
    """
    validate(data_cfg)
    c = data_cfg
    allowed = SHAPES_SPLITS if c.source == "shapes" else SPLITS
    if split not in allowed:
        raise ValueError(f"split={split!r} is invalid: expected one of {allowed}")
    if c.source == "shapes":
        if split == "zero_shot" and not c.heldout_classes:
            _fail("heldout_classes", c.heldout_classes,
                  "the zero_shot split needs at least one held-out class")
        return shapes.ShapesDataset(
            split, c.batch_size, seed, image_size=c.image_size,
            max_caption_len=c.max_caption_len, heldout_classes=tuple(c.heldout_classes),
            exclude_heldout_from_train=c.exclude_heldout_from_train,
            num_examples=c.shapes_split_sizes[split])
    if c.source == "tfds_images":
        from train.data import tfds_images  # tensorflow_datasets is imported lazily
        return tfds_images.tfds_image_dataset(
            c.tfds_name, c.tfds_splits[split], c.batch_size, seed, image_key=c.image_key,
            label_key=c.label_key, caption_key=c.caption_key, image_size=c.image_size,
            max_caption_len=c.max_caption_len, data_dir=c.data_dir,
            max_eval_examples=c.max_eval_examples)
    if c.source in SERIES_SOURCES:
        return timeseries.series_dataset(
            c.source, split, c.batch_size, seed, lookback=c.lookback, horizon=c.horizon,
            fractions=tuple(c.series_split_fractions[s] for s in SPLITS),
            eval_stride=c.series_eval_stride, length=c.series_length,
            channels=c.series_channels, data_seed=c.series_data_seed,
            real_name=c.real_series)
    if c.source == "text_classification":
        return text_classification.TextClassificationDataset(
            split, c.seq_len, c.batch_size, seed, classes=tuple(c.text_classes),
            class_bytes=c.text_class_bytes,
            fractions=tuple(c.text_split_fractions[s] for s in SPLITS))
    if c.source == "stdlib_text":
        tokens = text.corpus_splits(c.max_bytes, c.train_fraction, c.validation_fraction,
                                    c.test_fraction)[split]
        return text.LMDataset(tokens, c.seq_len, c.batch_size, seed)
    if c.source == "numbers_to_words":
        return seq2seq.numbers_to_words_dataset(
            split, seed, c.batch_size, max_number=c.max_number,
            train_fraction=c.train_fraction, validation_fraction=c.validation_fraction,
            max_input_len=c.max_input_len, max_target_len=c.max_target_len,
            max_eval_examples=c.max_eval_examples)
    from train.data import tfds_source  # its tensorflow_datasets import is lazy anyway
    tfds_split = c.tfds_splits[split]
    if c.label_key:
        return tfds_source.tfds_classification_dataset(
            c.tfds_name, tfds_split, c.text_key, c.label_key, c.seq_len, c.batch_size,
            seed, data_dir=c.data_dir, max_eval_examples=c.max_eval_examples)
    return tfds_source.tfds_lm_dataset(c.tfds_name, tfds_split, c.text_key, c.seq_len,
                                       c.batch_size, seed, data_dir=c.data_dir,
                                       max_bytes=c.max_bytes)


__all__ = ["BOS", "EOS", "MASK", "PAD", "SERIES_SOURCES", "SHAPES_SPLITS", "SOURCES", "SPLITS",
           "VOCAB_SIZE", "ByteTokenizer", "default_config", "make_dataset", "validate"]
