"""ShapesDataset: determinism, captions vs pixels, held-out classes, eval pass, speed."""
import re

import numpy as np
import pytest
from scipy import ndimage  # a jax dependency; only the tests use it

from train import data
from train.data import shapes
from train.data.tokenizers import BOS, EOS, PAD
from train.tasks import contrastive_losses as C

B = 32


def _ds(split="train", seed=0, **kw):
    kw.setdefault("num_examples", 1000)
    return shapes.ShapesDataset(split, B, seed, **kw)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_keys_shapes_dtypes():
    ds = _ds()
    b = ds.batch(0)
    expect = {"image": ((B, 32, 32, 3), np.float32), "mask": ((B, 32, 32), np.int32),
              "caption": ((B, 48), np.int32)}
    expect.update({k: ((B,), np.int32) for k in ("label", "shape_label", "color_label",
                                                 "size_label", "position_label", "count",
                                                 "index")})
    expect.update(facts=((B, 4), np.int32), facts_stated=((B, 4), np.bool_))
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == expect
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert set(np.unique(b["mask"])) <= set(range(5)) and 0 < (b["mask"] > 0).mean() < 0.5
    assert (b["caption"][:, 0] == BOS).all() and ((b["caption"] == EOS).sum(1) == 1).all()
    assert ds.data_info() == {"vocab_size": 260, "num_classes": 16, "image_size": 32,
                              "channels": 3, "max_caption_len": 48, "num_mask_classes": 5}
    assert ds.image_shape == (32, 32, 3) and ds.vocab_size == ds.tokenizer.vocab_size == 260
    big = _ds(image_size=64).batch(0)
    assert big["image"].shape == (B, 64, 64, 3) and big["mask"].shape == (B, 64, 64)


def test_random_access_and_seeds():
    ds, fresh = _ds(), _ds()
    for t in (40, 3, 0, 31):  # history: other steps, several epochs
        ds.batch(t)
    for t in (0, 7, 31, 40):
        _same(ds.batch(t), fresh.batch(t))
    # A batch is exactly the examples its indices name.
    b = ds.batch(5)
    _same(b, ds.examples(b["index"]))
    # Epoch 0 visits every example once.
    seen = np.concatenate([ds.batch(t)["index"] for t in range(1000 // B)])
    assert len(np.unique(seen)) == len(seen) == 1000 // B * B
    # The run seed changes the order, never the content of example i.
    other = _ds(seed=1)
    assert not np.array_equal(ds.batch(0)["index"], other.batch(0)["index"])
    idx = np.array([0, 17, 999])
    _same(ds.examples(idx), other.examples(idx))
    # Content does not depend on the split size either (example i is a hash of i).
    _same(ds.examples(idx[:2]), _ds(num_examples=20).examples(idx[:2]))
    # Splits differ; data_seed changes the data.
    assert not np.array_equal(_ds("test").examples(idx)["image"], ds.examples(idx)["image"])
    assert not np.array_equal(_ds(data_seed=1).examples(idx)["image"],
                              ds.examples(idx)["image"])
    with pytest.raises(IndexError):
        ds.examples([1000])


_CAPTION_RE = re.compile(
    r"^(?:a photo of |an image of )?(a|two|three) (?:(small|large) )?(red|green|blue|yellow) "
    r"(circle|square|triangle|cross)(?:s|es)?(?: (on the left|on the right|at the top|"
    r"at the bottom|in the center))?$")
_WHERE = {"on the left": "left", "on the right": "right", "at the top": "top",
          "at the bottom": "bottom", "in the center": "center"}
# Width and height of one object in units of r (see shapes._inside).
_EXTENT = {"circle": (2, 2), "square": (1.7, 1.7), "triangle": (2, 1.8), "cross": (2, 2)}


@pytest.mark.parametrize("split", ["train", "zero_shot"])
def test_captions_agree_with_pixels(split):
    ds = _ds(split)
    b = ds.examples(np.arange(0, 1000, 5))  # 200 examples
    texts = ds.decode_captions(b["caption"])
    assert texts[:3] == [ds.caption_text(i) for i in (0, 5, 10)]
    s = ds.image_size
    for i, text in enumerate(texts):
        m = _CAPTION_RE.match(text)
        assert m, text
        count, size, color, shape, where = m.groups()
        count = {"a": 1, "two": 2, "three": 3}[count]
        # The caption states the labels...
        assert count == b["count"][i]
        assert shapes.COLORS[b["color_label"][i]] == color
        assert shapes.SHAPES[b["shape_label"][i]] == shape
        assert ds.class_names[b["label"][i]] == f"{color} {shape}"
        size = size or shapes.SIZES[b["size_label"][i]]
        where = _WHERE[where] if where else shapes.POSITIONS[b["position_label"][i]]
        assert size == shapes.SIZES[b["size_label"][i]]
        assert where == shapes.POSITIONS[b["position_label"][i]]
        # ...and the pixels show them. Mask value = the shape.
        mask, image = b["mask"][i], b["image"][i]
        assert set(np.unique(mask)) == {0, shapes.SHAPES.index(shape) + 1}
        obj = mask > 0
        # Color: the mean RGB of the masked pixels is nearest to the caption's color.
        mean = image[obj].mean(0)
        assert np.argmin(((shapes.COLOR_RGB - mean) ** 2).sum(1)) == shapes.COLORS.index(color)
        # The mask is exactly where color is: objects are saturated, background gray.
        spread = image.max(-1) - image.min(-1)
        assert spread[obj].min() > 0.2 and spread[~obj].max() <= 0.08 + 1e-6
        # Count: separate components; size: each component's bounding box is nearest to
        # the nominal box of that shape at the caption's size.
        labels, n = ndimage.label(obj)
        assert n == count, (text, n)
        for k, box in enumerate(ndimage.find_objects(labels)):
            hw = np.array([box[1].stop - box[1].start, box[0].stop - box[0].start])
            errs = [np.abs(np.log(hw / (np.array(_EXTENT[shape]) * r * s))).sum()
                    for r in shapes._RADIUS]
            assert np.argmin(errs) == shapes.SIZES.index(size), (text, hw)
        # Position: the centroid of the group.
        y, x = (np.argwhere(obj).mean(0) + 0.5) / s
        ok = {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
              "center": 0.35 < x < 0.65 and 0.35 < y < 0.65}[where]
        assert ok, (text, x, y)


def test_the_heldout_folds_partition_the_classes_and_each_is_a_latin_transversal():
    held = [shapes.class_index(n) for fold in shapes.HELDOUT_FOLDS for n in fold]
    assert sorted(held) == list(range(16)) and shapes.HELDOUT_FOLDS[0] == shapes.DEFAULT_HELDOUT
    for k, fold in enumerate(shapes.HELDOUT_FOLDS):
        labels = [shapes.class_index(n) for n in fold]
        assert sorted(c // 4 for c in labels) == sorted(c % 4 for c in labels) == [0, 1, 2, 3]
        zs = data.make_dataset(_shapes_cfg(heldout_fold=k), "zero_shot", seed=0)
        assert set(zs.heldout_classes) == set(fold)
        assert set(np.concatenate([e["label"] for e in zs.eval_batches(500)])) == set(labels)
        train = data.make_dataset(_shapes_cfg(heldout_fold=k), "train", seed=0)
        assert not set(train.batch(0)["label"].tolist()) & set(labels)


def test_heldout_classes_by_split():
    held = {shapes.class_index(n) for n in shapes.DEFAULT_HELDOUT}
    assert len(held) == 4
    # Latin square: each color and each shape is held out exactly once.
    assert sorted(c // 4 for c in held) == sorted(c % 4 for c in held) == [0, 1, 2, 3]
    ds = data.make_dataset(_shapes_cfg(), "train", seed=0)
    assert ds.heldout_classes == shapes.DEFAULT_HELDOUT
    labels = np.concatenate([ds.batch(t)["label"] for t in range(20)])  # 20 x 128
    assert not held & set(labels.tolist())
    assert set(labels.tolist()) == set(range(16)) - held
    assert set(labels % 4) == {0, 1, 2, 3} and set(labels // 4) == {0, 1, 2, 3}
    # Roughly uniform over the 12 training classes.
    counts = np.bincount(labels, minlength=16)[sorted(set(range(16)) - held)]
    assert counts.min() > 0.6 * len(labels) / 12
    for split in ("validation", "test"):
        ev = data.make_dataset(_shapes_cfg(), split, seed=0)
        lab = np.concatenate([e["label"] for e in ev.eval_batches(500)])
        assert set(lab.tolist()) == set(range(16)) - held
    zs = data.make_dataset(_shapes_cfg(), "zero_shot", seed=0)
    lab = np.concatenate([e["label"] for e in zs.eval_batches(500)])
    assert set(lab.tolist()) == held
    # Classification runs: every class everywhere.
    cfg = _shapes_cfg(exclude_heldout_from_train=False)
    for split in ("train", "test"):
        ds = data.make_dataset(cfg, split, seed=0)
        assert set(np.concatenate([ds.batch(t)["label"] for t in range(5)])) == set(range(16))
    cfg = _shapes_cfg(heldout_classes=())
    data.make_dataset(cfg, "train", seed=0)
    with pytest.raises(ValueError, match="^data.shapes.heldout_classes=.*zero_shot"):
        data.make_dataset(cfg, "zero_shot", seed=0)


def test_class_names_and_prompts():
    ds = _ds()
    assert len(ds.class_names) == ds.num_classes == 16
    assert ds.class_names[:5] == ("red circle", "red square", "red triangle", "red cross",
                                  "green circle")
    assert all(ds.class_names[shapes.class_index(n)] == n for n in ds.class_names)
    prompts = ds.class_prompts()
    assert len(prompts) == 16 and prompts[6] == ["a photo of a green triangle",
                                                 "a green triangle",
                                                 "an image of a green triangle"]
    assert ds.class_prompts(ds.heldout_classes)[0][1] == "a red square"
    # Every prompt is a caption the dataset produces (count 1, no size/position).
    table = set(shapes._caption_table())
    assert all(p in table for row in prompts for p in row)
    tokens = ds.tokenize_prompts(prompts[0])
    assert tokens.shape == (3, 48) and tokens[0, 0] == BOS
    assert ds.decode_captions(tokens) == prompts[0]
    # all_caption_texts: every template, all true, one of them the example's caption.
    alts = ds.all_caption_texts(3)
    assert len(alts) == len(shapes.CAPTION_TEMPLATES) and ds.caption_text(3) in alts
    assert all(_CAPTION_RE.match(t) for t in alts)


def test_caption_matches():
    ds = _ds("test")
    idx = np.arange(300)
    m = ds.caption_matches(idx, idx)
    assert m.shape == (300, 300) and m.diagonal().all()
    texts = [ds.caption_text(i) for i in idx]
    b = ds.examples(idx)
    for j in range(0, 300, 7):  # caption j is true of image i <=> its stated words match
        count, size, color, shape, where = _CAPTION_RE.match(texts[j]).groups()
        expect = ((b["count"] == {"a": 1, "two": 2, "three": 3}[count])
                  & (b["label"] == shapes.class_index(f"{color} {shape}")))
        if size:
            expect &= b["size_label"] == shapes.SIZES.index(size)
        if where:
            expect &= b["position_label"] == shapes.POSITIONS.index(_WHERE[where])
        np.testing.assert_array_equal(m[:, j], expect)
    assert 1.0 < m.sum(0).mean() < 300  # duplicates exist, but captions discriminate
    # The batch's facts say the same (the contrastive task's positives="true_captions").
    assert b["facts"].shape == (300, 4) and b["facts_stated"].dtype == bool
    np.testing.assert_array_equal(
        C.true_caption_pairs(b["facts"], b["facts"], b["facts_stated"]), m)


def test_caption_lengths():
    assert shapes.longest_caption_len() == 42
    row = _ds().batch(0)["caption"]
    assert ((row == EOS).argmax(1) <= 43).all() and (row[:, 44:] == PAD).all()
    with pytest.raises(ValueError, match="max_caption_len=43"):
        _ds(max_caption_len=43)


def test_eval_pass_covers_split_once():
    ds = _ds("validation", num_examples=70)
    batches = list(ds.eval_batches(32))
    assert len(batches) == 3
    idx = np.concatenate([b["index"] for b in batches])
    w = np.concatenate([b["weights"] for b in batches])
    np.testing.assert_array_equal(w, [1.0] * 70 + [0.0] * 26)
    np.testing.assert_array_equal(idx[:70], np.arange(70))
    assert w.dtype == np.float32 and batches[-1]["image"].shape == (32, 32, 32, 3)
    other_seed = list(_ds("validation", seed=9, num_examples=70).eval_batches(32))
    _same(batches[1], other_seed[1])  # fixed order and content, whatever the run seed


def _shapes_cfg(**changes):
    c = data.default_config()
    c.source = "shapes"
    c.batch_size = 128
    c.shapes.shapes_split_sizes.update(validation=500, test=500, zero_shot=500)
    for k, v in changes.items():
        c.shapes[k] = v
    return c
