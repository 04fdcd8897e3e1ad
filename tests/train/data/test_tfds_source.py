"""TFDS sources on ``tfds.testing.mock_data`` (skipped without tensorflow-datasets)."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from train import data  # noqa: E402
from train.data import tfds_source  # noqa: E402
from train.data.tokenizers import BOS, EOS, PAD, ByteTokenizer  # noqa: E402

NUM = 12


@pytest.fixture
def mock():
    # Mock examples are generated from the feature spec (same texts for every split);
    # no files, no download, no TensorFlow.
    with tfds.testing.mock_data(num_examples=NUM):
        yield


def _texts(name, split, key="text"):
    src = tfds.data_source(name, split=split)
    return [tfds_source._as_bytes(src[i][key], key) for i in range(len(src))]


def test_lm_stream_is_eos_separated_examples(mock):
    texts = _texts("lm1b", "train")
    assert len(texts) == NUM
    stream = tfds_source.text_token_stream(tfds.data_source("lm1b", split="train"), "text")
    tok = ByteTokenizer()
    expected = np.concatenate([tok.encode_bytes(t, add_eos=True) for t in texts])
    np.testing.assert_array_equal(stream, expected)
    assert (stream == EOS).sum() == NUM
    capped = tfds_source.text_token_stream(
        tfds.data_source("lm1b", split="train"), "text", max_bytes=20)
    np.testing.assert_array_equal(capped, expected[:20])


def test_make_dataset_lm(mock):
    c = data.default_config()
    c.source, c.tfds.seq_len, c.batch_size = "tfds", 8, 3
    c.tfds.tfds_splits.validation = "test"  # lm1b has no validation split
    ds = data.make_dataset(c, "train", seed=0)
    assert ds.vocab_size == 260
    b = ds.batch(0)["tokens"]
    assert b.shape == (3, 9) and b.dtype == np.int32
    np.testing.assert_array_equal(b, data.make_dataset(c, "train", seed=0).batch(0)["tokens"])
    ev = data.make_dataset(c, "validation", seed=0)
    w = np.concatenate([x["weights"] for x in ev.eval_batches(4)])
    assert w.sum() == ev.num_eval_windows > 0


def test_make_dataset_classification(mock):
    c = data.default_config()
    c.update(source="tfds", batch_size=5)
    c.tfds.update(tfds_name="imdb_reviews", label_key="label", seq_len=16)
    ds = data.make_dataset(c, "train", seed=0)
    assert isinstance(ds, tfds_source.ClassificationDataset) and ds.num_classes == 2
    src = tfds.data_source("imdb_reviews", split="train")
    labels = [int(src[i]["label"]) for i in range(NUM)]
    np.testing.assert_array_equal(ds.labels, labels)
    first = tfds_source._as_bytes(src[0]["text"], "text")[:15]
    row = ds.tokens[0]
    assert row[0] == BOS and ds.tokenizer.decode(row) == first.decode()
    assert (row[1 + len(first):] == PAD).all()
    b = ds.batch(2)
    assert b["tokens"].shape == (5, 16) and b["label"].shape == (5,)
    ev = list(ds.eval_batches(5))
    np.testing.assert_array_equal(np.concatenate([e["label"] for e in ev])[:NUM], labels)
    assert np.concatenate([e["weights"] for e in ev]).sum() == NUM


def test_wrong_text_key_is_reported(mock):
    with pytest.raises(TypeError, match="'label'"):
        tfds_source.text_token_stream(tfds.data_source("imdb_reviews", split="train"),
                                      "label")
