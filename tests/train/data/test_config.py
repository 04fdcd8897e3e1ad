"""default_config / validate / make_dataset."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train import data
from train.data import seq2seq, shapes, text
from train.data.tfds_source import ClassificationDataset


SPLIT3 = {"train": "train", "validation": "validation", "test": "test"}
# Every image source's augmentation section (train/data/augment.py): all off.
AUGMENT_OFF = {"crop_area_min": 1.0, "crop_aspect": 4 / 3, "rotate": 0.0, "flip": 0.0,
               "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
               "randaugment_ops": 0, "randaugment_magnitude": 0.5, "mixup": 0.0,
               "cutmix": 0.0, "fill": 0.5}


def test_default_config_keys_and_values():
    c = data.default_config()
    assert c.to_dict() == {
        "source": "stdlib_text", "batch_size": 32, "eval_batch_size": 64,
        "stdlib_text": {"seq_len": 256, "train_fraction": 0.9, "validation_fraction": 0.05,
                        "test_fraction": 0.05, "max_bytes": 3_000_000, "tokenizer": ""},
        "numbers_to_words": {"max_number": 999_999, "max_input_len": 8, "max_target_len": 72,
                             "train_fraction": 0.9, "validation_fraction": 0.05,
                             "test_fraction": 0.05, "max_eval_examples": 0},
        "tfds": {"tfds_name": "lm1b", "tfds_splits": SPLIT3, "data_dir": None,
                 "label_key": "", "max_eval_examples": 0, "text_key": "text",
                 "seq_len": 256, "max_bytes": 3_000_000},
        "shapes": {"image_size": 32, "max_caption_len": 48,
                   "heldout_classes": ("red square", "green cross", "blue triangle",
                                       "yellow circle"), "heldout_fold": -1,
                   "exclude_heldout_from_train": True,
                   "shapes_split_sizes": {"train": 50_000, "validation": 2_000, "test": 2_000,
                                          "zero_shot": 2_000},
                   "tokenizer": "", "image_mean": (0.0, 0.0, 0.0),
                   "image_std": (1.0, 1.0, 1.0), "augment": AUGMENT_OFF},
        "tfds_images": {"tfds_name": "mnist", "tfds_splits": SPLIT3, "data_dir": None,
                        "label_key": "", "max_eval_examples": 0, "image_key": "image",
                        "caption_key": "", "image_size": 32, "max_caption_len": 48,
                        "augment": AUGMENT_OFF},
        "synthetic_series": {"lookback": 96, "horizon": 24,
                             "series_split_fractions": {"train": 0.7, "validation": 0.1,
                                                        "test": 0.2},
                             "series_eval_stride": 1, "series_length": 20_000,
                             "series_channels": 5, "series_data_seed": 0},
        "real_series": {"lookback": 96, "horizon": 24,
                        "series_split_fractions": {"train": 0.7, "validation": 0.1,
                                                   "test": 0.2},
                        "series_eval_stride": 1, "real_series": "goog"},
        "text_classification": {
            "seq_len": 256,
            "text_classes": ("argparse.py", "asyncio/base_events.py", "difflib.py",
                             "doctest.py", "inspect.py", "ipaddress.py",
                             "logging/__init__.py", "mailbox.py", "optparse.py", "pydoc.py",
                             "subprocess.py", "tarfile.py"),
            "text_class_bytes": 56_000,
            "text_split_fractions": {"train": 0.7, "validation": 0.1, "test": 0.2}}}
    # One registry: every source has its section, and each default validates.
    assert tuple(data.SOURCES) == (
        "stdlib_text", "numbers_to_words", "tfds", "shapes", "tfds_images",
        "synthetic_series", "real_series", "text_classification")
    for source in data.SOURCES:
        c.source = source
        data.validate(c)
    c.tfds.data_dir = "/some/dir"  # placeholder(str) accepts a path


def test_only_the_selected_source_section_is_validated():
    c = data.default_config()
    c.shapes.image_size = 8          # invalid for shapes, unused by stdlib_text
    data.validate(c)
    c.source = "shapes"
    with pytest.raises(ValueError, match=r"^data.shapes.image_size=8 is invalid: "
                                         r"expected an integer >= 16$"):
        data.validate(c)


def test_run_config_checks_data_keys_against_every_section():
    """train.config.validate: all sections are in the reference, so switching the source
    of any config works, and a flat (pre-section) key is an unknown key."""
    import configs.gpt as gpt
    from train import config as run_config

    c = gpt.get_config("tiny")
    c.data.source = "shapes"
    run_config.validate(c)
    c.data.shapes.image_size = 8
    with pytest.raises(ValueError, match=r"^data.shapes.image_size=8 is invalid"):
        run_config.validate(c)
    c = gpt.get_config("tiny")
    c.data.seq_len = 64
    with pytest.raises(ValueError, match=r"^unknown config key 'data.seq_len'; allowed here: "
                                         r"batch_size, eval_batch_size, numbers_to_words"):
        run_config.validate(c)


def test_make_dataset_reads_its_source_section():
    c = data.default_config()
    c.stdlib_text.seq_len = 16
    c.tfds.seq_len = 99              # another source's seq_len: ignored
    ds = data.make_dataset(c, "validation", seed=0)
    assert ds.batch(0)["tokens"].shape == (32, 17)
    assert ds.num_eval_windows == (150_000 - 1) // 16


def test_stdlib_text_datasets():
    c = data.default_config()
    sizes = {}
    for split in data.SPLITS:
        ds = data.make_dataset(c, split, seed=0)
        assert isinstance(ds, text.LMDataset) and ds.vocab_size == 260
        assert ds.batch(0)["tokens"].shape == (32, 257)
        assert ds.data_info() == {"vocab_size": 260}
        sizes[split] = len(ds.tokens)
    assert sizes == {"train": 2_700_000, "validation": 150_000, "test": 150_000}


def test_numbers_to_words_datasets():
    c = data.default_config()
    c.source = "numbers_to_words"
    c.batch_size = 4
    c.numbers_to_words.max_eval_examples = 5
    ds = data.make_dataset(c, "validation", seed=0)
    assert isinstance(ds, seq2seq.Seq2SeqDataset) and ds.vocab_size == 260
    # What the seq2seq task reads from the dataset instead of the config.
    assert (ds.max_input_len, ds.max_target_len) == (8, 72)
    b = ds.batch(0)
    assert b["inputs"].shape == (4, 8) and b["targets"].shape == (4, 72)
    assert ds.data_info() == {"vocab_size": 260}
    assert sum(x["weights"].sum() for x in ds.eval_batches(64)) == 5


def test_shapes_datasets():
    c = data.default_config()
    c.source = "shapes"
    c.batch_size = 4
    assert data.SHAPES_SPLITS == data.SPLITS + ("zero_shot",)
    for split in data.SHAPES_SPLITS:
        ds = data.make_dataset(c, split, seed=0)
        assert isinstance(ds, shapes.ShapesDataset)
        assert ds.num_examples == c.shapes.shapes_split_sizes[split]
        assert ds.batch(0)["image"].shape == (4, 32, 32, 3)
        assert ds.data_info()["num_classes"] == 16


def test_make_dataset_rejects_unknown_split():
    with pytest.raises(ValueError, match="split='valid'"):
        data.make_dataset(data.default_config(), "valid", seed=0)
    with pytest.raises(ValueError, match="split='zero_shot'"):  # shapes only
        data.make_dataset(data.default_config(), "zero_shot", seed=0)


def _with(source="stdlib_text", **changes):
    """The default config with ``source`` selected and ``changes`` in its section
    (``batch_size`` / ``eval_batch_size`` are the shared keys)."""
    c = data.default_config()
    c.source = source
    for k, v in changes.items():
        if k in ("batch_size", "eval_batch_size"):
            c[k] = v
        else:
            c[source][k] = v
    return c


@pytest.mark.parametrize("changes,message", [
    ({"source": "wikipedia"}, r"^data.source='wikipedia' is invalid: .*stdlib_text"),
    ({"batch_size": -2}, r"^data.batch_size=-2"),
    ({"eval_batch_size": 0}, r"^data.eval_batch_size=0"),
    ({"seq_len": 0}, r"^data.stdlib_text.seq_len=0 .*>= 1"),
    ({"train_fraction": 0.8}, r"^data.stdlib_text.test_fraction=.*sum to 1"),
    ({"validation_fraction": 1.5}, r"^data.stdlib_text.validation_fraction=1.5 .*\[0, 1\]"),
    ({"train_fraction": 0.0, "validation_fraction": 0.95},
     r"^data.stdlib_text.train_fraction=0.0"),
    ({"max_bytes": 0}, r"^data.stdlib_text.max_bytes=0"),
    ({"seq_len": 100_000}, r"^data.stdlib_text.seq_len=100000 .*validation split"),
    ({"source": "numbers_to_words", "max_eval_examples": -1},
     r"^data.numbers_to_words.max_eval_examples=-1"),
    ({"source": "numbers_to_words", "train_fraction": 0.8},
     r"^data.numbers_to_words.test_fraction=.*sum to 1"),
    ({"source": "numbers_to_words", "max_number": 10**7},
     r"^data.numbers_to_words.max_number=10000000"),
    ({"source": "numbers_to_words", "max_input_len": 6},
     r"^data.numbers_to_words.max_input_len=6 .*>= 7"),
    ({"source": "numbers_to_words", "max_target_len": 64},
     r"^data.numbers_to_words.max_target_len=64 .*>= 65"),
    ({"source": "tfds", "tfds_name": ""}, r"^data.tfds.tfds_name=''"),
    ({"source": "tfds", "text_key": ""}, r"^data.tfds.text_key=''"),
    ({"source": "tfds", "max_bytes": -1}, r"^data.tfds.max_bytes=-1"),
    ({"source": "tfds", "max_eval_examples": -1}, r"^data.tfds.max_eval_examples=-1"),
    ({"source": "tfds", "label_key": "label", "seq_len": 1}, r"^data.tfds.seq_len=1 .*>= 2"),
    ({"source": "tfds", "tfds_splits": {"train": "train", "validation": 3, "test": "test"}},
     r"^data.tfds.tfds_splits.validation=3"),
    ({"source": "shapes", "image_size": 8}, r"^data.shapes.image_size=8 .*>= 16"),
    ({"source": "shapes", "max_caption_len": 40}, r"^data.shapes.max_caption_len=40 .*>= 44"),
    ({"source": "shapes", "heldout_classes": ("red squares",)},
     r"^data.shapes.heldout_classes=.*'red squares' is not one of"),
    ({"source": "shapes", "heldout_classes": ("red square", 3)},
     r"^data.shapes.heldout_classes=.*tuple of class names"),
    ({"source": "shapes", "heldout_classes": ("red square", "red square")},
     r"^data.shapes.heldout_classes=.*duplicates"),
    ({"source": "shapes", "heldout_classes": ("red circle", "green circle", "blue circle",
                                               "yellow circle")},
     r"^data.shapes.heldout_classes=.*every class with 'circle'"),
    ({"source": "shapes", "heldout_fold": 4},
     r"^data.shapes.heldout_fold=4 .*-1 \(heldout_classes\) or a fold 0..3"),
    ({"source": "shapes", "heldout_fold": 1, "heldout_classes": ("red circle",)},
     r"^data.shapes.heldout_fold=1 .*and so does heldout_classes: set one of them"),
    ({"source": "shapes", "shapes_split_sizes": {"train": 0, "validation": 1, "test": 1,
                                                  "zero_shot": 1}},
     r"^data.shapes.shapes_split_sizes.train=0"),
    ({"tokenizer": "/no/such/dir"},
     r"^data.stdlib_text.tokenizer='/no/such/dir' is invalid: no tokenizer.json in"),
    ({"source": "shapes", "image_std": (0.5, 0.0, 0.5)},
     r"^data.shapes.image_std=.*3 numbers \(R, G, B\), each > 0"),
    ({"source": "shapes", "image_mean": (0.5, 0.5)}, r"^data.shapes.image_mean=.*3 numbers"),
    ({"source": "tfds_images", "image_key": ""}, r"^data.tfds_images.image_key=''"),
    ({"source": "tfds_images", "image_size": -1}, r"^data.tfds_images.image_size=-1 .*>= 0"),
    ({"source": "tfds_images", "caption_key": "c", "max_caption_len": 2},
     r"^data.tfds_images.max_caption_len=2 .*>= 3"),
])
def test_validate_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        data.validate(_with(**changes))


def test_validate_smaller_number_range_needs_shorter_targets():
    data.validate(_with(source="numbers_to_words", max_number=999, max_input_len=4,
                        max_target_len=len("seven hundred seventy-seven") + 1))


def test_shapes_heldout_everything_allowed_for_classification():
    held = tuple(n for n in shapes.CLASS_NAMES if n.endswith("circle"))
    data.validate(_with(source="shapes", heldout_classes=held,
                        exclude_heldout_from_train=False))


def test_classification_dataset():
    tokens = np.arange(30, dtype=np.int32).reshape(10, 3)
    labels = np.arange(10) % 2
    ds = ClassificationDataset(tokens, labels, batch_size=4, seed=0, num_classes=2,
                               max_eval_examples=9)
    seen = np.concatenate([ds.batch(t)["tokens"][:, 0] for t in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(0, 30, 3))  # epoch 0 covers each once
    b = ds.batch(0)
    np.testing.assert_array_equal(b["label"], (b["tokens"][:, 0] // 3) % 2)
    ev = list(ds.eval_batches(4))
    np.testing.assert_array_equal(np.concatenate([e["weights"] for e in ev]),
                                  [1] * 9 + [0] * 3)
    assert ds.data_info() == {"vocab_size": 260, "num_classes": 2}


def test_embedded_sources_never_import_tensorflow():
    code = ("import sys; from train import data; c = data.default_config();"
            "data.make_dataset(c, 'validation', 0).batch(0);"
            "c.source = 'numbers_to_words'; data.make_dataset(c, 'test', 0).batch(0);"
            "c.source = 'shapes'; data.make_dataset(c, 'zero_shot', 0).batch(0);"
            "bad = [m for m in sys.modules if m.split('.')[0] in"
            " ('tensorflow', 'tensorflow_datasets')]; assert not bad, bad")
    repo_root = pathlib.Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
