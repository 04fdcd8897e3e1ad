"""TFDS image sources: classification (mnist, cifar10, ...) and image-caption (coco_captions).

Read by name with ``tfds.data_source`` through ``tfds_source.data_source`` (lazy
``tensorflow_datasets`` import, no TensorFlow at read time; see tfds_source.py for how to
prepare the ArrayRecord files). A split is read once into NumPy at construction:

* images: uint8[n, S, S, C], resized to ``image_size`` (0 = keep the native size,
  which must then be the same for every example). Resizing center-crops to a square,
  then averages source pixels per output pixel (area) when shrinking and repeats them
  (nearest) when enlarging. C is the dataset's channel count (1 for mnist).
* labels: ``record[label_key]`` (a ClassLabel) when ``label_key`` is set.
* captions: ``record[caption_key]`` when ``caption_key`` is set; "a/b" reads a nested
  feature, e.g. "captions/text" for coco_captions (5 captions per image). With several
  captions, one is chosen per example by a hash of its index (fixed, independent of the
  run seed). Tokens: BOS + text + EOS, PAD-padded to ``max_caption_len``; longer
  texts are cut to ``max_caption_len - 2`` bytes (EOS is kept).

Batches use the same keys as ``ShapesDataset`` where they overlap:
{"image": float32[B, S, S, C] in [0, 1], "label": int32[B], "caption": int32[B, L],
"index": int32[B]}, plus "weights" in ``eval_batches``. Memory: n * S * S * C bytes
(coco_captions train at S = 64: 113k * 12 KiB = 1.4 GB); slice big splits ("train[:20%]").
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from train.data import augment, checks
from train.data.base import RandomAccessDataset, Source
from train.data.tfds_source import _as_bytes, _records, data_source, tfds_config
from train.data.tokenizers import ByteTokenizer, pad_batch

_CAPTION_CHOICE_SEED = 20_240_917  # fixed: the chosen caption must not depend on the run seed


def _resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Area average (shrinking) or nearest repeat (enlarging) along one axis; float64."""
    n = x.shape[axis]
    if n == size:
        return x.astype(np.float64)
    if n < size:
        return np.take(x, ((np.arange(size) + 0.5) * n / size).astype(np.int64), axis)
    edges = np.round(np.linspace(0, n, size + 1)).astype(np.int64)  # >= 1 pixel per bin
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    csum = np.pad(np.cumsum(x, axis=axis, dtype=np.float64), pad)
    sums = np.take(csum, edges[1:], axis) - np.take(csum, edges[:-1], axis)
    shape = [1] * x.ndim
    shape[axis] = size
    return sums / np.diff(edges).reshape(shape)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, C] -> uint8[size, size, C]: center crop to a square, then area/nearest."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    out = _resize_axis(_resize_axis(square, 0, size), 1, size)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _feature(record: dict, key: str) -> Any:
    """``record[key]``, where "a/b" means ``record["a"]["b"]`` (nested features)."""
    value = record
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"feature {key!r} not found; record features: {sorted(record)}")
        value = value[part]
    return value


def choose_caption(value: Any, index: int, key: str) -> bytes:
    """One caption of example ``index``: the only one, or a fixed hash choice of several."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        if len(value) == 0:
            raise ValueError(f"example {index} has no {key!r} caption")
        pick = int(np.random.default_rng([_CAPTION_CHOICE_SEED, index]).integers(len(value)))
        value = value[pick]
    return _as_bytes(value, key)


def encode_caption(text: bytes, max_caption_len: int) -> np.ndarray:
    """int32[<= max_caption_len]: BOS + text (cut to fit) + EOS."""
    tok = ByteTokenizer()
    return tok.encode_bytes(text[: max_caption_len - 2], add_bos=True, add_eos=True)


class ImageDataset(RandomAccessDataset):
    """Random-access batches of in-memory images with optional labels and captions.

    Args:
      images: uint8[n, S, S, C].
      batch_size, seed: training batch size and run seed (order only).
      labels: int32[n] or None; num_classes: label count (0 without labels).
      captions: int32[n, L] caption tokens or None.
      max_eval_examples: evaluate on the first this-many examples (0 = all).
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, *,
                 labels: np.ndarray | None = None, num_classes: int = 0,
                 captions: np.ndarray | None = None, max_eval_examples: int = 0):
        self.images = np.asarray(images, np.uint8)
        if self.images.ndim != 4 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"need images uint8[n, S, S, C], got {self.images.shape}")
        n = len(self.images)
        for name, arr in (("labels", labels), ("captions", captions)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} rows for {n} images")
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.captions = None if captions is None else np.asarray(captions, np.int32)
        self.num_classes = num_classes
        self.num_eval = min(max_eval_examples, n) if max_eval_examples > 0 else n
        self.image_size, self.channels = self.images.shape[1], self.images.shape[3]
        self.image_shape = self.images.shape[1:]
        super().__init__(n, batch_size, seed, self.num_eval)

    def data_info(self) -> dict:
        info = {"vocab_size": self.vocab_size, "num_classes": self.num_classes,
                "image_size": self.image_size, "channels": self.channels}
        if self.captions is not None:
            info["max_caption_len"] = self.captions.shape[1]
        return info

    def examples(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """{"image": float32[B, S, S, C] in [0, 1], "index", ["label"], ["caption"]}."""
        out = {"image": self.images[idx].astype(np.float32) * np.float32(1 / 255),
               "index": np.asarray(idx, np.int32)}
        if self.labels is not None:
            out["label"] = self.labels[idx]
        if self.captions is not None:
            out["caption"] = self.captions[idx]
        return out

    gather = examples  # item ids are example indices; evaluation takes the first num_eval

    def caption_text(self, idx: int) -> str:
        """The (possibly cut) caption of example ``idx``."""
        if self.captions is None:
            raise ValueError("this dataset has no captions (caption_key is empty)")
        return self.tokenizer.decode(self.captions[idx])

    def decode_captions(self, ids: np.ndarray) -> list[str]:
        return self.tokenizer.decode_batch(ids)


def tfds_image_dataset(name: str, split: str, batch_size: int, seed: int, *,
                       image_key: str = "image", label_key: str = "", caption_key: str = "",
                       image_size: int = 0, max_caption_len: int = 48,
                       data_dir: str | None = None, max_eval_examples: int = 0
                       ) -> ImageDataset:
    """``ImageDataset`` of TFDS split ``name``/``split``; see the module docstring."""
    source = data_source(name, split, data_dir)
    images, labels, captions = [], [], []
    for i, record in enumerate(_records(source)):
        image = np.asarray(_feature(record, image_key))
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.dtype != np.uint8:
            raise TypeError(f"feature {image_key!r} is {image.dtype}{list(image.shape)}, not a "
                            "uint8 image; check image_key")
        if image_size:
            image = resize_image(image, image_size)
        elif images and image.shape != images[0].shape:
            raise ValueError(f"image_size=0 keeps native sizes, but {name} images differ "
                             f"({images[0].shape} vs {image.shape}); set image_size")
        images.append(image)
        if label_key:
            labels.append(int(_feature(record, label_key)))
        if caption_key:
            captions.append(encode_caption(
                choose_caption(_feature(record, caption_key), i, caption_key), max_caption_len))
    if not images:
        raise ValueError(f"TFDS split {name}/{split} is empty")
    num_classes = 0
    if label_key:
        try:  # a ClassLabel knows its class count; else count the labels seen
            feature = source.dataset_info.features[label_key]
        except (KeyError, TypeError, AttributeError):
            feature = None
        num_classes = getattr(feature, "num_classes", None) or max(labels) + 1
    return ImageDataset(
        np.stack(images), batch_size, seed, labels=np.array(labels) if label_key else None,
        num_classes=num_classes,
        captions=pad_batch(captions, max_caption_len, "max_caption_len") if caption_key else None,
        max_eval_examples=max_eval_examples)



# ---- Source "tfds_images": config.data.tfds_images -----------------------------------------
def default_config() -> ml_collections.ConfigDict:
    """``config.data.tfds_images``: a TFDS image split (mnist, cifar10, coco_captions, ...)."""
    c = tfds_config("mnist")
    # Feature keys ("" = none; "a/b" = nested, e.g. caption_key="captions/text" for
    # coco_captions); label_key comes from tfds_config.
    c.image_key = "image"
    c.caption_key = ""
    c.image_size = 32              # side in pixels (0 = native size)
    # Caption tokens BOS + text + EOS, PAD-padded; longer captions are cut to fit.
    c.max_caption_len = 48
    # Training-time augmentation on device (train/data/augment.py); all off by default.
    c.augment = augment.default_config()
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.tfds_images") -> None:
    checks.check_int(c, prefix, "max_eval_examples", 0)
    checks.check_int(c, prefix, "image_size", 0)
    checks.check_tfds(c, prefix, ("tfds_name", "image_key"))
    for key in ("label_key", "caption_key"):
        checks.check_str(c, prefix, key)
    if c.caption_key:
        checks.check_int(c, prefix, "max_caption_len", 3)
    augment.validate(c.augment, f"{prefix}.augment")


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
         ) -> ImageDataset:
    return tfds_image_dataset(
        c.tfds_name, c.tfds_splits[split], batch_size, seed, image_key=c.image_key,
        label_key=c.label_key, caption_key=c.caption_key, image_size=c.image_size,
        max_caption_len=c.max_caption_len, data_dir=c.data_dir,
        max_eval_examples=c.max_eval_examples)


SOURCE = Source(default_config, validate, make)


__all__ = ["ImageDataset", "choose_caption", "encode_caption", "resize_image",
           "tfds_image_dataset"]
