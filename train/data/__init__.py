"""Input pipelines: embedded offline datasets, tokenizers and TFDS adapters.

Every dataset is a ``base.RandomAccessDataset``: ``ds.batch(step)`` is a pure function
of (data, seed, step), so a resumed run needs only the step as iterator state, and
``ds.eval_batches(batch_size)`` is one fixed-order pass with a ``weights`` array
(1.0 real, 0.0 padding). Each dataset has ``vocab_size``, ``tokenizer`` and
``data_info()`` (the fields the trainer copies into the model config, e.g.
{"vocab_size": 260, "num_classes": 16, "image_size": 32, "channels": 3}), plus the
attributes its tasks need (e.g. ``max_target_len`` of numbers_to_words).

The config section ``config.data`` holds the keys every source shares -- ``source``,
``batch_size``, ``eval_batch_size`` -- and one sub-section per source,
``config.data.<source>`` (e.g. ``config.data.shapes.image_size``), owned by the source's
module (its ``default_config``, ``validate`` and ``make``, registered in ``SOURCES``).
Only the selected source's section is validated and used; every section is always
present, so ``--config.data.source=shapes`` works on any config. The image sources'
sections hold ``augment`` (``data.shapes.augment.flip=0.5``, ...): training-time
augmentation that runs on device inside the train step (augment.py; all off by default).

Sources (``config.data.source``):
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

import ml_collections

from train.data import (checks, seq2seq, shapes, text, text_classification, tfds_images,
                        tfds_source, timeseries)
from train.data.base import SPLITS, RandomAccessDataset, Source
from train.data.tokenizers import BOS, EOS, MASK, PAD, VOCAB_SIZE, ByteTokenizer

# The one registry: name -> (default_config, validate, make, splits). The TFDS modules
# import tensorflow_datasets only when a dataset is made.
SOURCES: dict[str, Source] = {
    "stdlib_text": text.SOURCE,
    "numbers_to_words": seq2seq.SOURCE,
    "tfds": tfds_source.SOURCE,
    "shapes": shapes.SOURCE,
    "tfds_images": tfds_images.SOURCE,
    "synthetic_series": timeseries.SYNTHETIC_SOURCE,
    "real_series": timeseries.REAL_SOURCE,
    "text_classification": text_classification.SOURCE,
}
SERIES_SOURCES = ("synthetic_series", "real_series")
SHAPES_SPLITS = shapes.SPLITS              # SPLITS + "zero_shot" (held-out classes only)


def default_config() -> ml_collections.ConfigDict:
    """All data keys with their defaults (a run's config nests this as ``config.data``)."""
    c = ml_collections.ConfigDict()
    c.source = "stdlib_text"       # one of SOURCES
    c.batch_size = 32              # training examples per step
    c.eval_batch_size = 64         # examples per eval batch (last one padded, weights 0)
    for name, source in SOURCES.items():
        c[name] = source.default_config()
    return c


def validate(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending key (``data.<source>.<key>``) and its allowed
    values. Checks the shared keys and the selected source's section."""
    c = data_cfg
    if c.source not in SOURCES:
        checks.fail("data.source", c.source, f"expected one of {tuple(SOURCES)}")
    for key in ("batch_size", "eval_batch_size"):
        checks.check_int(c, "data", key, 1)
    SOURCES[c.source].validate(c[c.source], f"data.{c.source}")


def make_dataset(data_cfg: ml_collections.ConfigDict, split: str, seed: int
                 ) -> RandomAccessDataset:
    """The ``split`` ("train" | "validation" | "test"; shapes also "zero_shot") dataset of
    ``data_cfg.source``, built from ``data_cfg[source]``.

    Returns an ``LMDataset``, ``Seq2SeqDataset``, ``ClassificationDataset``,
    ``ShapesDataset``, ``ImageDataset``, ``ForecastDataset`` or
    ``TextClassificationDataset``; ``batch_size`` comes from ``data_cfg.batch_size``
    (evaluation passes its own).
    """
    validate(data_cfg)
    source = SOURCES[data_cfg.source]
    if split not in source.splits:
        raise ValueError(f"split={split!r} is invalid: expected one of {source.splits}")
    return source.make(data_cfg[data_cfg.source], split, data_cfg.batch_size, seed)


__all__ = ["BOS", "EOS", "MASK", "PAD", "SERIES_SOURCES", "SHAPES_SPLITS", "SOURCES", "SPLITS",
           "VOCAB_SIZE", "ByteTokenizer", "RandomAccessDataset", "Source", "default_config",
           "make_dataset", "validate"]
