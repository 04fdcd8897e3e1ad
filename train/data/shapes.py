"""Embedded image-caption dataset: rendered shapes with attributes (no download).

Each example is 1-3 identical objects on a noisy gray background, drawn with NumPy
from a handful of attributes, together with masks, labels and an English caption:

    shape     circle | square | triangle | cross       (mask value = shape index + 1)
    color     red | green | blue | yellow              (per-image brightness/hue jitter)
    size      small | large                            (radius ~0.09 / ~0.14 of the side)
    position  left | right | top | bottom | center     (where the group sits)
    count     one | two | three                        (same shape, color and size)

e.g. "a photo of a small red circle", "two blue squares on the left",
"a large yellow triangle at the top", "three green crosses". A count > 1 lays the
objects out along a line through the position's anchor (a column for left/right, a
row for top/bottom/center), so objects never overlap and the mask is unambiguous.

Classes. The class of an example is its (color, shape) combination:
``label = color * 4 + shape``, ``CLASS_NAMES[label]`` = "red circle", ... (16).
``heldout_classes`` (default one per color and per shape, a Latin-square choice) are
kept out of training when ``exclude_heldout_from_train`` (contrastive runs, zero-shot
evaluation) and kept in otherwise (classification runs):

    train, validation, test  the same combinations: all 16, or the 12 not held out
    zero_shot                only the held-out combinations (evaluation only)

Determinism. Every attribute and jitter value of example ``i`` of a split is a hash of
(data_seed, split, i, field), and so is its choice among the split's 256 fixed noise
fields; examples are random-access and independent of the run seed, which only
changes the training order (``EpochSampler``). Images are float32 in [0, 1].
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from numbers import Integral

import ml_collections
import numpy as np

from train.data import augment, checks
from train.data.base import RandomAccessDataset, Source
from train.data.tokenizers import make_tokenizer, pad_batch
from train.tasks.contrastive_losses import true_caption_pairs

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = ("a", "two", "three")  # count 1 reads "a red circle", not "one red circle"
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # label = color * 4 + shape
NUM_CLASSES = len(CLASS_NAMES)
# Latin square: each shape and each color is held out exactly once, so every color and
# every shape still appears in training (in 3 of its 4 combinations).
DEFAULT_HELDOUT = ("red square", "green cross", "blue triangle", "yellow circle")
# The 16 classes as 4 disjoint Latin-square transversals: each fold holds every color and
# every shape once, and together they hold every class once (fold 0 is DEFAULT_HELDOUT).
# Holding out each fold in turn (data.shapes.heldout_fold=0..3, one run each) measures
# zero-shot transfer on all 16 combinations, not on one arbitrary choice of 4.
HELDOUT_FOLDS = (DEFAULT_HELDOUT,
                 ("red circle", "green triangle", "blue cross", "yellow square"),
                 ("red triangle", "green circle", "blue square", "yellow cross"),
                 ("red cross", "green square", "blue circle", "yellow triangle"))
SPLITS = ("train", "validation", "test", "zero_shot")
DEFAULT_SIZES = {"train": 50_000, "validation": 2_000, "test": 2_000, "zero_shot": 2_000}

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "cross": "crosses"}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}
# Every template only states true attributes; some leave out size or position.
CAPTION_TEMPLATES = (
    "a photo of {n} {color} {shape}",
    "a photo of {n} {size} {color} {shape}",
    "{n} {color} {shape} {where}",
    "{n} {size} {color} {shape} {where}",
    "{n} {color} {shape}",
    "an image of {n} {color} {shape}",
)
# Zero-shot prompts for a class name ("red circle"): exactly the count-1 captions of
# templates 0, 4 and 5, so a prompt is a caption the text encoder has seen the form of.
PROMPT_TEMPLATES = ("a photo of a {}", "a {}", "an image of a {}")
# Which templates state size / position (the others are true whatever those are).
_STATES_SIZE = np.array(["{size}" in t for t in CAPTION_TEMPLATES])
_STATES_WHERE = np.array(["{where}" in t for t in CAPTION_TEMPLATES])

# RGB in [0, 1] before jitter; far apart so the mean color of an object identifies it.
COLOR_RGB = np.array([[0.90, 0.12, 0.10], [0.12, 0.72, 0.18],
                      [0.15, 0.30, 0.95], [0.95, 0.85, 0.12]], np.float32)
_RADIUS = np.array([0.09, 0.14])  # half-extent / image side, by size; +-5% jitter
_ANCHOR = np.array([[0.22, 0.5], [0.78, 0.5], [0.5, 0.22], [0.5, 0.78], [0.5, 0.5]])
_ALONG_X = np.array([False, False, True, True, True])  # groups: row (x) or column (y)
_SLOTS = {1: [0.5], 2: [0.3, 0.7], 3: [0.16, 0.5, 0.84]}  # along-line centers by count
# Least gap between neighbours (1.3 px at 32 px, so a pixel center always falls in it:
# objects of a group are separate connected components of the mask).
_MIN_GAP = 0.04
_NOISE = 0.04  # uniform per-pixel noise amplitude
_NOISE_FIELDS = 256  # noise fields per split; an example uses one (hashing every pixel
                     # of every batch would cost more than the rest of rendering)


def caption_string(template: int, label: int, size: int, position: int, count: int) -> str:
    """The caption of attribute indices (count is 1..3)."""
    color, shape = COLORS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    return CAPTION_TEMPLATES[template].format(
        n=COUNT_WORDS[count - 1], size=SIZES[size], color=color,
        shape=shape if count == 1 else _PLURAL[shape], where=_WHERE[POSITIONS[position]])


def _caption_code(template, label, size, position, count):
    """Index into ``_caption_table`` (vectorized; count is 1..3)."""
    return (((template * NUM_CLASSES + label) * len(SIZES) + size) * len(POSITIONS)
            + position) * 3 + (count - 1)


@functools.lru_cache(maxsize=None)
def _caption_table() -> tuple[str, ...]:
    """Every possible caption (6 * 16 * 2 * 5 * 3 = 2880), in ``_caption_code`` order."""
    return tuple(caption_string(t, c, s, p, n)
                 for t in range(len(CAPTION_TEMPLATES)) for c in range(NUM_CLASSES)
                 for s in range(len(SIZES)) for p in range(len(POSITIONS)) for n in (1, 2, 3))


def longest_caption_len() -> int:
    """Bytes of the longest caption, excluding BOS/EOS (max_caption_len needs + 2)."""
    return max(len(c) for c in _caption_table())


@functools.lru_cache(maxsize=4)
def _caption_tokens(max_caption_len: int, tokenizer: str = "") -> np.ndarray:
    """int32[2880, max_caption_len]: BOS + caption + EOS, padded, by caption code
    (``tokenizer``: "" = bytes, else a saved tokenizer's directory)."""
    tok = make_tokenizer(tokenizer)
    return pad_batch([tok.encode(c, add_bos=True, add_eos=True) for c in _caption_table()],
                     max_caption_len, "data.shapes.max_caption_len", tok.pad_id)


def _hash_u64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: uint64 -> well-mixed uint64."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(key: int, idx: np.ndarray, n: int) -> np.ndarray:
    """float64[B, n] in [0, 1): value j of example idx[b] under ``key``; a pure function
    of (key, idx, j), which is what makes examples random-access."""
    ctr = idx.astype(np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
    bits = _hash_u64(ctr ^ _hash_u64(np.uint64(key)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def class_index(name: str) -> int:
    """"red circle" -> its label (ValueError for an unknown name)."""
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown class {name!r}; classes: {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name)


def split_classes(split: str, heldout: Sequence[str], exclude_heldout_from_train: bool
                  ) -> np.ndarray:
    """int64 labels an example of ``split`` is drawn from (uniformly); see module doc."""
    held = sorted({class_index(n) for n in heldout})
    if split == "zero_shot":
        if not held:
            raise ValueError("the zero_shot split needs at least one held-out class")
        return np.array(held, np.int64)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
    keep = [c for c in range(NUM_CLASSES) if not (exclude_heldout_from_train and c in held)]
    return np.array(keep, np.int64)


def sample_attributes(key: int, idx: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Attributes and jitter of examples ``idx`` (int64[B]) of the split with hash ``key``.

    Returns int64[B] "label", "shape", "color", "size", "position", "count" (1..3),
    "template", "noise" (noise field); float64 "radius" [B], "centers" [B, 3, 2] (x, y
    in [0, 1]; rows >= count unused), "rgb" [B, 3], "background" [B].
    """
    u = _uniform(key, idx, 13)
    label = classes[(u[:, 0] * len(classes)).astype(np.int64)]
    size = (u[:, 1] * 2).astype(np.int64)
    position = (u[:, 2] * 5).astype(np.int64)
    count = 1 + (u[:, 3] * 3).astype(np.int64)
    template = (u[:, 4] * len(CAPTION_TEMPLATES)).astype(np.int64)
    radius = _RADIUS[size] * (0.95 + 0.1 * u[:, 5])
    # Group layout: slots along the line through the anchor. Along-line jitter is
    # capped so neighbours keep _MIN_GAP apart and objects stay inside the image.
    slots = np.array([(_SLOTS[n] + [0.5] * 3)[:3] for n in (1, 2, 3)])[count - 1]
    spacing = np.where(count == 1, np.inf, slots[:, 1] - slots[:, 0])
    room = np.minimum((spacing - 2 * radius - _MIN_GAP) / 2, slots[:, 0] - radius)
    amp = np.clip(room, 0.0, 0.05)
    along = slots + amp[:, None] * (2 * u[:, 6:9] - 1)
    across = _ANCHOR[position, np.where(_ALONG_X[position], 1, 0)] + 0.04 * (2 * u[:, 9] - 1)
    row = _ALONG_X[position][:, None]
    across = np.broadcast_to(across[:, None], along.shape)
    centers = np.stack([np.where(row, along, across), np.where(row, across, along)], -1)
    # Color: brightness in [0.8, 1.05] and per-channel shifts of +-0.06 (hue jitter).
    color = label // len(SHAPES)
    shift = 0.06 * (2 * _uniform(key + 1, idx, 3) - 1)
    rgb = np.clip(COLOR_RGB[color] * (0.8 + 0.25 * u[:, 10:11]) + shift, 0.0, 1.0)
    return {"label": label, "shape": label % len(SHAPES), "color": color, "size": size,
            "position": position, "count": count, "template": template, "radius": radius,
            "centers": centers, "rgb": rgb, "background": 0.05 + 0.25 * u[:, 11],
            "noise": (u[:, 12] * _NOISE_FIELDS).astype(np.int64)}


def caption_facts(attrs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(facts int64[B, 4], stated bool[B, 4]) of examples' attributes: the image's class,
    count, size and position, and which of them the example's caption states (class and
    count always; size and position as its template does). The contrastive task's
    ``positives="true_captions"`` and `ShapesDataset.caption_matches` read captions' truth
    from these (train/tasks/contrastive_losses.py:true_caption_pairs)."""
    facts = np.stack([attrs["label"], attrs["count"], attrs["size"], attrs["position"]], 1)
    t = attrs["template"]
    always = np.ones_like(t, dtype=bool)
    return facts, np.stack([always, always, _STATES_SIZE[t], _STATES_WHERE[t]], 1)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean: offsets (u, v) in radius units (v points down) lie inside ``shape``."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:    # circle, area pi r^2
        return u * u + v * v <= 1.0
    if shape == 1:    # square of side 1.7 r (area close to the circle's)
        return np.maximum(au, av) <= 0.85
    if shape == 2:    # triangle pointing up: apex at v = -1, base at v = 0.8, width 2 r
        return (v >= -1.0) & (v <= 0.8) & (au <= (v + 1.0) / 1.8)
    return ((au <= 0.4) & (av <= 1.0)) | ((av <= 0.4) & (au <= 1.0))  # cross (plus)


@functools.lru_cache(maxsize=16)
def _noise_fields(key: int, image_size: int) -> np.ndarray:
    """float32[_NOISE_FIELDS, S, S, 3] uniform in [-_NOISE, _NOISE), hashed from ``key``."""
    n = image_size * image_size * 3
    bits = _uniform(key, np.arange(_NOISE_FIELDS), n).astype(np.float32)
    fields = ((2 * bits - 1) * _NOISE).reshape(_NOISE_FIELDS, image_size, image_size, 3)
    fields.flags.writeable = False  # cached and shared: read-only
    return fields


def render(attrs: dict[str, np.ndarray], image_size: int, key: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """-> (image float32[B, S, S, 3] in [0, 1], mask int32[B, S, S]) for ``attrs``.

    Pixel (row i, column j) is sampled at its center ((j + .5) / S, (i + .5) / S);
    no anti-aliasing, so the mask is exactly where the object color was painted.
    """
    b, s = len(attrs["label"]), image_size
    grid = ((np.arange(s) + 0.5) / s).astype(np.float32)
    covered = np.zeros((b, s, s), bool)
    for shape in range(len(SHAPES)):  # one shape at a time: each pixel test runs once
        sel = np.flatnonzero(attrs["shape"] == shape)
        if not sel.size:
            continue
        r = attrs["radius"][sel].astype(np.float32)[:, None, None, None]
        c = attrs["centers"][sel].astype(np.float32)
        u = (grid[None, None, None, :] - c[:, :, 0, None, None]) / r  # [b, 3, 1, S]
        v = (grid[None, None, :, None] - c[:, :, 1, None, None]) / r  # [b, 3, S, 1]
        hit = _inside(shape, u, v)
        used = np.arange(3)[None, :] < attrs["count"][sel][:, None]   # [b, 3]
        covered[sel] = (hit & used[:, :, None, None]).any(axis=1)
    mask = np.where(covered, (attrs["shape"] + 1)[:, None, None], 0).astype(np.int32)
    bg = attrs["background"].astype(np.float32)[:, None, None, None]
    image = np.where(covered[..., None], attrs["rgb"].astype(np.float32)[:, None, None, :], bg)
    image += _noise_fields(key + 2, s)[attrs["noise"]]
    return np.clip(image, 0.0, 1.0, out=image), mask


def split_key(split: str, data_seed: int = 0) -> int:
    """Hash key of a split's examples; sub-streams use key + 0, 1, 2 (so keys step by 8)."""
    return 8 * (len(SPLITS) * data_seed + SPLITS.index(split))


class ShapesDataset(RandomAccessDataset):
    """Random-access rendered shapes of one split; see the module docstring.

    Args:
      split: one of ``SPLITS``.
      batch_size: training batch size.
      seed: run seed; only the training order depends on it.
      image_size: rendered side S in pixels (>= 16; geometry is relative to S).
      max_caption_len: caption tokens L (>= ``longest_caption_len() + 2``).
      heldout_classes: class names such as "red square"; see ``split_classes``.
      exclude_heldout_from_train: keep the held-out classes out of
        train/validation/test (True: contrastive / zero-shot runs; False: classification).
      num_examples: examples in the split (default ``DEFAULT_SIZES[split]``).
      data_seed: changes every example (default 0); independent of the run seed.
      tokenizer: "" (bytes) or a saved tokenizer's directory (a converted CLIP's): the
        captions and zero-shot prompts are its tokens.
      image_mean, image_std: per-channel (R, G, B); images become (x - mean) / std (a
        pretrained tower's preprocessing; default (0, 0, 0) and (1, 1, 1): [0, 1]).

    Batches (``batch`` and ``eval_batches``) are dicts of NumPy arrays:
      "image"    float32[B, S, S, 3]: in [0, 1], then (x - image_mean) / image_std
      "mask"     int32[B, S, S], 0 = background, k = shape k - 1 (SHAPES order)
      "caption"  int32[B, L]: bos + caption tokens + eos, padded with the tokenizer's
                 pad_id (ByteTokenizer: BOS + bytes + EOS, PAD)
      "label"    int32[B] (color, shape) class, color * 4 + shape, into CLASS_NAMES
      "shape_label", "color_label", "size_label", "position_label" int32[B] (indices into
                 SHAPES, COLORS, SIZES, POSITIONS); "count" int32[B] in 1..3
      "facts"    int32[B, 4] (label, count, size, position) and "facts_stated" bool[B, 4]:
                 which of them the caption states (`caption_facts`)
      "index"    int32[B] example index within the split
    ``eval_batches`` adds "weights" float32[B] (1.0 real, 0.0 padded tail).
    """

    def __init__(self, split: str, batch_size: int, seed: int, *, image_size: int = 32,
                 max_caption_len: int = 48, heldout_classes: Sequence[str] = DEFAULT_HELDOUT,
                 exclude_heldout_from_train: bool = True, num_examples: int | None = None,
                 data_seed: int = 0, tokenizer: str = "",
                 image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0)):
        self.split = split
        self.tokenizer = make_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self._normalize = None if (tuple(image_mean), tuple(image_std)) == (
            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) else (np.asarray(image_mean, np.float32),
                                                    np.asarray(image_std, np.float32))
        # Labels this split draws from (uniformly).
        self.split_labels = split_classes(split, heldout_classes, exclude_heldout_from_train)
        self.image_size, self.max_caption_len = image_size, max_caption_len
        self.num_examples = DEFAULT_SIZES[split] if num_examples is None else num_examples
        self.key = split_key(split, data_seed)
        self.num_classes = NUM_CLASSES
        self.class_names = CLASS_NAMES
        self.heldout_classes = tuple(n for n in CLASS_NAMES if n in set(heldout_classes))
        self.heldout_labels = np.array([class_index(n) for n in self.heldout_classes], np.int64)
        self.prompt_templates = PROMPT_TEMPLATES
        self.image_shape = (image_size, image_size, 3)
        self.num_mask_classes = len(SHAPES) + 1
        self.mask_class_names = ("background",) + tuple(SHAPES)
        self._captions = _caption_tokens(max_caption_len, tokenizer)  # checks the length
        super().__init__(self.num_examples, batch_size, seed)

    def data_info(self) -> dict:
        """Fields the trainer copies into the model config."""
        return {"vocab_size": self.vocab_size, "num_classes": self.num_classes,
                "image_size": self.image_size, "channels": 3,
                "max_caption_len": self.max_caption_len,
                "num_mask_classes": self.num_mask_classes}

    def attributes(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """``sample_attributes`` of examples ``idx`` of this split."""
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
            raise IndexError(f"example index out of range 0..{self.num_examples - 1}")
        return sample_attributes(self.key, idx, self.split_labels)

    def examples(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict (see the class docstring) of examples ``idx`` int[B]."""
        idx = np.asarray(idx, np.int64)
        a = self.attributes(idx)
        image, mask = render(a, self.image_size, self.key)
        if self._normalize is not None:
            image = (image - self._normalize[0]) / self._normalize[1]
        code = _caption_code(a["template"], a["label"], a["size"], a["position"], a["count"])
        facts, stated = caption_facts(a)
        i32 = lambda x: x.astype(np.int32)  # noqa: E731
        return {"image": image, "mask": mask, "caption": self._captions[code],
                "label": i32(a["label"]), "shape_label": i32(a["shape"]),
                "color_label": i32(a["color"]), "size_label": i32(a["size"]),
                "position_label": i32(a["position"]), "count": i32(a["count"]),
                "facts": i32(facts), "facts_stated": stated, "index": i32(idx)}

    gather = examples  # item ids are example indices, for training and evaluation

    def caption_text(self, idx: int) -> str:
        """The caption of example ``idx`` (the one its "caption" tokens encode)."""
        a = self.attributes(np.array([idx]))
        code = _caption_code(a["template"], a["label"], a["size"], a["position"], a["count"])
        return _caption_table()[int(code[0])]

    def all_caption_texts(self, idx: int) -> list[str]:
        """Every template's caption of example ``idx`` (all true; for retrieval/debug)."""
        a = {k: int(v[0]) for k, v in self.attributes(np.array([idx])).items()
             if k in ("label", "size", "position", "count")}
        return [caption_string(t, **a) for t in range(len(CAPTION_TEMPLATES))]

    def caption_matches(self, image_idx: np.ndarray, caption_idx: np.ndarray) -> np.ndarray:
        """bool[len(image_idx), len(caption_idx)]: the caption of example caption_idx[j]
        is true of the image of example image_idx[i] (same count, color and shape, and
        size / position where its template states them). Captions repeat across
        examples, so retrieval should count any true caption (or image) as a hit."""
        im, cap = self.attributes(image_idx), self.attributes(caption_idx)
        return true_caption_pairs(caption_facts(im)[0], *caption_facts(cap))

    def decode_captions(self, ids: np.ndarray) -> list[str]:
        """int[B, L] caption tokens -> strings."""
        return self.tokenizer.decode_batch(ids)

    def class_prompts(self, class_names: Sequence[str] | None = None) -> list[list[str]]:
        """[class][template] prompt strings for zero-shot classification (default: all
        classes in label order; pass ``heldout_classes`` for the held-out-only task)."""
        names = CLASS_NAMES if class_names is None else class_names
        return [[t.format(n) for t in self.prompt_templates] for n in names]

    def tokenize_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """int32[len(prompts), L]: prompts tokenized exactly like captions."""
        return pad_batch([self.tokenizer.encode(p, add_bos=True, add_eos=True)
                          for p in prompts], self.max_caption_len, "data.shapes.max_caption_len",
                         self.tokenizer.pad_id)


# ---- Source "shapes": config.data.shapes ------------------------------------------------
def default_config() -> ml_collections.ConfigDict:
    """``config.data.shapes``: the rendered shapes (images, captions, labels, masks)."""
    c = ml_collections.ConfigDict()
    c.image_size = 32              # side in pixels
    # Caption tokens BOS + text + EOS, PAD-padded; needs >= longest_caption_len() + 2 = 44.
    c.max_caption_len = 48
    # (color, shape) classes such as "red square" that the zero_shot split holds;
    # () disables zero_shot. Default: one per color and per shape (a Latin square).
    c.heldout_classes = DEFAULT_HELDOUT
    # 0..3: hold out HELDOUT_FOLDS[k] instead (heldout_classes left at its default);
    # -1: heldout_classes as given.
    c.heldout_fold = -1
    # True keeps heldout_classes out of train/validation/test (contrastive runs with
    # zero-shot evaluation); False puts all 16 classes there (classification runs).
    c.exclude_heldout_from_train = True
    # Examples per split (each split is a fixed set; the seed only reorders).
    c.shapes_split_sizes = ml_collections.ConfigDict(dict(DEFAULT_SIZES))
    # "" = bytes; else a directory with a saved tokenizer.json, such as a workdir
    # train.convert wrote from a CLIP checkpoint: captions and prompts in its tokens.
    c.tokenizer = ""
    # Per-channel normalization (x - mean) / std of the [0, 1] images: a pretrained
    # image tower's (CLIP: (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)).
    c.image_mean = (0.0, 0.0, 0.0)
    c.image_std = (1.0, 1.0, 1.0)
    # Training-time augmentation on device (train/data/augment.py); all off by default.
    c.augment = augment.default_config()
    return c


def validate(c: ml_collections.ConfigDict, prefix: str = "data.shapes") -> None:
    checks.check_int(c, prefix, "image_size", 16)
    # Bytes bound the byte tokenizer's captions; a checkpoint tokenizer's are counted when
    # they are tokenized (an error naming max_caption_len if one does not fit).
    checks.check_int(c, prefix, "max_caption_len",
                     3 if c.tokenizer else longest_caption_len() + 2)
    fold = c.heldout_fold
    if not isinstance(fold, Integral) or isinstance(fold, bool) or not (
            -1 <= fold < len(HELDOUT_FOLDS)):
        checks.fail(f"{prefix}.heldout_fold", fold,
                    f"expected -1 (heldout_classes) or a fold 0..{len(HELDOUT_FOLDS) - 1}")
    if fold >= 0 and tuple(c.heldout_classes) != DEFAULT_HELDOUT:
        checks.fail(f"{prefix}.heldout_fold", fold, "chooses the held-out classes, and so "
                    "does heldout_classes: set one of them")
    held, key = heldout_classes(c), f"{prefix}.heldout_classes"
    if isinstance(held, str) or not all(isinstance(n, str) for n in held):
        checks.fail(key, held, "expected a tuple of class names such as 'red square'")
    for name in held:
        if name not in CLASS_NAMES:
            checks.fail(key, held, f"{name!r} is not one of {CLASS_NAMES}")
    if len(set(held)) != len(held):
        checks.fail(key, held, "expected no duplicates")
    if c.exclude_heldout_from_train:
        # Zero-shot transfer composes attributes seen in training: each color and each
        # shape must still occur in some training class.
        seen = [n.split() for n in CLASS_NAMES if n not in held]
        for i, values in ((0, COLORS), (1, SHAPES)):
            missing = sorted(set(values) - {n[i] for n in seen})
            if missing:
                checks.fail(key, held, f"holds out every class with {missing[0]!r}, so "
                            "training never shows it")
    checks.check_tokenizer(c, prefix)
    for key in ("image_mean", "image_std"):
        v = c[key]
        if isinstance(v, str) or len(v) != 3 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or (
                key == "image_std" and min(v) <= 0):
            checks.fail(f"{prefix}.{key}", v, "expected 3 numbers (R, G, B)"
                        + (", each > 0" if key == "image_std" else ""))
    augment.validate(c.augment, f"{prefix}.augment")
    for split in SPLITS:
        v = c.shapes_split_sizes.get(split)
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            checks.fail(f"{prefix}.shapes_split_sizes.{split}", v, "expected an integer >= 1")


def heldout_classes(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The class names config.data.shapes holds out: its fold's, or heldout_classes."""
    fold = c.heldout_fold
    return HELDOUT_FOLDS[fold] if fold >= 0 else tuple(c.heldout_classes)


def make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
         ) -> ShapesDataset:
    held = heldout_classes(c)
    if split == "zero_shot" and not held:
        checks.fail("data.shapes.heldout_classes", c.heldout_classes,
                    "the zero_shot split needs at least one held-out class")
    return ShapesDataset(
        split, batch_size, seed, image_size=c.image_size, max_caption_len=c.max_caption_len,
        heldout_classes=held,
        exclude_heldout_from_train=c.exclude_heldout_from_train,
        num_examples=c.shapes_split_sizes[split], tokenizer=c.tokenizer,
        image_mean=tuple(c.image_mean), image_std=tuple(c.image_std))


SOURCE = Source(default_config, validate, make, splits=SPLITS)
