"""TFDS image sources on ``tfds.testing.mock_data`` (skipped without tensorflow-datasets)."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from train import data  # noqa: E402
from train.data import tfds_images  # noqa: E402
from train.data.tokenizers import BOS, EOS, PAD  # noqa: E402

NUM = 10


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=NUM):
        yield


def _cfg(**changes):
    c = data.default_config()
    c.update(source="tfds_images", batch_size=4)
    c.tfds_images.update(**changes)
    return c


@pytest.mark.parametrize("name,image_size,shape", [
    ("mnist", 0, (28, 28, 1)), ("mnist", 32, (32, 32, 1)), ("cifar10", 32, (32, 32, 3)),
    ("cifar10", 16, (16, 16, 3))])
def test_classification(mock, name, image_size, shape):
    c = _cfg(tfds_name=name, label_key="label", image_size=image_size)
    c.tfds_images.tfds_splits.validation = "test"  # neither has a validation split
    ds = data.make_dataset(c, "train", seed=0)
    src = tfds.data_source(name, split="train")
    assert ds.images.shape == (NUM, *shape) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.labels, [int(src[i]["label"]) for i in range(NUM)])
    b = ds.batch(1)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "image": ((4, *shape), np.float32), "label": ((4,), np.int32),
        "index": ((4,), np.int32)}
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.05
    np.testing.assert_allclose(b["image"] * 255, ds.images[b["index"]], atol=1e-4)
    if np.asarray(src[3]["image"]).shape == shape:  # native size: stored unchanged
        np.testing.assert_array_equal(ds.images[3], src[3]["image"])
    np.testing.assert_array_equal(b["label"], ds.labels[b["index"]])
    np.testing.assert_array_equal(b["image"], data.make_dataset(c, "train", 0).batch(1)["image"])
    assert ds.data_info() == {"vocab_size": 260, "num_classes": 10,
                              "image_size": shape[0], "channels": shape[2]}
    ev = data.make_dataset(c, "validation", seed=0)
    batches = list(ev.eval_batches(4))
    w = np.concatenate([e["weights"] for e in batches])
    np.testing.assert_array_equal(w, [1.0] * NUM + [0.0] * 2)
    np.testing.assert_array_equal(np.concatenate([e["index"] for e in batches])[:NUM],
                                  np.arange(NUM))


def test_single_caption(mock):
    # ai2dcaption: variable-size image + one caption string (coco_captions needs TensorFlow
    # to build even its mock; see test_coco_captions_layout for its record layout).
    c = _cfg(tfds_name="ai2dcaption", caption_key="caption", max_caption_len=12)
    ds = data.make_dataset(c, "train", seed=0)
    src = tfds.data_source("ai2dcaption", split="train")
    assert ds.images.shape == (NUM, 32, 32, 3) and ds.captions.shape == (NUM, 12)
    assert ds.data_info()["max_caption_len"] == 12 and ds.data_info()["num_classes"] == 0
    for i in range(NUM):
        text = src[i]["caption"]
        assert ds.caption_text(i) == text[:10]  # cut to max_caption_len - 2 bytes
        row = ds.captions[i]
        end = min(len(text), 10) + 2
        assert row[0] == BOS and row[end - 1] == EOS and (row[end:] == PAD).all()
    b = ds.batch(0)
    assert set(b) == {"image", "caption", "index"} and b["caption"].dtype == np.int32
    np.testing.assert_array_equal(b["caption"], ds.captions[b["index"]])


def test_nested_caption_list_is_chosen_deterministically(mock):
    # "entities/label" is a Sequence of texts, laid out like coco's "captions/text".
    kw = dict(caption_key="entities/label", image_size=16, max_caption_len=64)
    ds = tfds_images.tfds_image_dataset("ai2dcaption", "train", 4, 0, **kw)
    again = tfds_images.tfds_image_dataset("ai2dcaption", "train", 4, 5, **kw)
    np.testing.assert_array_equal(ds.captions, again.captions)  # run seed: order only
    src = tfds.data_source("ai2dcaption", split="train")
    for i in range(NUM):
        options = [str(t) for t in src[i]["entities"]["label"]]
        assert ds.caption_text(i) in options


def test_coco_captions_layout(monkeypatch):
    """The coco_captions record layout end to end, on a fake source (no TensorFlow)."""
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8),
                "image/id": np.int64(i),
                "captions": {"text": np.array([f"caption {i}.{k} of a scene" for k in range(5)],
                                              dtype=object),
                             "id": np.arange(5)}} for i in range(6)]

    class Fake(list):
        dataset_info = None

    monkeypatch.setattr(tfds_images, "data_source", lambda name, split, data_dir: Fake(records))
    c = _cfg(tfds_name="coco_captions", caption_key="captions/text", image_size=24)
    ds = data.make_dataset(c, "train", seed=0)
    assert ds.images.shape == (6, 24, 24, 3) and ds.captions.shape == (6, 48)
    picks = [ds.caption_text(i) for i in range(6)]
    assert all(p.startswith(f"caption {i}.") for i, p in enumerate(picks))
    assert len({p.split(".")[1][0] for p in picks}) > 1  # not always the first caption
    np.testing.assert_array_equal(ds.images[2], tfds_images.resize_image(records[2]["image"], 24))


def test_coco_captions_mock(mock):
    pytest.importorskip("tensorflow")  # the coco builder itself needs TensorFlow
    c = _cfg(tfds_name="coco_captions", caption_key="captions/text", image_size=32)
    ds = data.make_dataset(c, "train", seed=0)
    b = ds.batch(0)
    assert b["image"].shape == (4, 32, 32, 3) and b["caption"].shape == (4, 48)


def test_resize_image():
    x = np.arange(4 * 6 * 1, dtype=np.uint8).reshape(4, 6, 1) * 10
    crop = x[:, 1:5]  # center crop to 4x4
    down = tfds_images.resize_image(x, 2)  # area: mean of 2x2 blocks
    expect = crop.reshape(2, 2, 2, 2, 1).mean((1, 3))
    np.testing.assert_array_equal(down, np.round(expect).astype(np.uint8))
    up = tfds_images.resize_image(crop, 8)  # nearest: each pixel repeated 2x2
    np.testing.assert_array_equal(up, crop.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(tfds_images.resize_image(crop, 4), crop)
    odd = tfds_images.resize_image(np.full((7, 7, 3), 200, np.uint8), 3)  # uneven bins
    assert odd.shape == (3, 3, 3) and (odd == 200).all()


def test_errors(mock):
    with pytest.raises(KeyError, match="'picture' not found"):
        tfds_images.tfds_image_dataset("mnist", "train", 4, 0, image_key="picture")
    with pytest.raises(TypeError, match="image_key"):
        tfds_images.tfds_image_dataset("mnist", "train", 4, 0, image_key="label")
    with pytest.raises(ValueError, match="image_size=0"):
        tfds_images.tfds_image_dataset("ai2dcaption", "train", 4, 0)
