"""Stdlib corpus, splits, unigram baseline and LMDataset."""
import math
import os

import numpy as np
import pytest

from train.data import text
from train.data.tokenizers import ByteTokenizer


def test_file_list_is_sorted_and_corpus_has_default_size():
    assert list(text.STDLIB_FILES) == sorted(text.STDLIB_FILES)
    corpus = text.load_corpus()
    assert len(corpus) == text.DEFAULT_MAX_BYTES == 3_000_000
    with open(os.path.join(text.stdlib_dir(), "argparse.py"), "rb") as f:
        first = f.read()
    assert corpus.startswith(first)  # files in list order, unmodified
    assert text.load_corpus(1000) == corpus[:1000]


def test_missing_files_are_skipped(tmp_path, monkeypatch):
    (tmp_path / "ast.py").write_bytes(b"B" * 5)
    (tmp_path / "argparse.py").write_bytes(b"A" * 3)
    monkeypatch.setattr(text, "stdlib_dir", lambda: str(tmp_path))
    text.load_corpus.cache_clear()
    try:
        assert text.load_corpus(100) == b"AAABBBBB"
        assert text.load_corpus(4) == b"AAAB"
        monkeypatch.setattr(text, "stdlib_dir", lambda: str(tmp_path / "none"))
        text.load_corpus.cache_clear()
        with pytest.raises(FileNotFoundError):
            text.load_corpus(100)
    finally:
        text.load_corpus.cache_clear()


def test_splits_are_contiguous_disjoint_and_match_fractions():
    splits = text.corpus_splits()
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 2_700_000, "validation": 150_000, "test": 150_000}
    whole = ByteTokenizer().encode_bytes(text.load_corpus())
    np.testing.assert_array_equal(
        np.concatenate([splits["train"], splits["validation"], splits["test"]]), whole)
    again = text.corpus_splits()
    for k in splits:
        assert splits[k].dtype == np.int32
        np.testing.assert_array_equal(splits[k], again[k])
    small = text.corpus_splits(10_000, 0.8, 0.15, 0.05)
    assert [len(small[k]) for k in ("train", "validation", "test")] == [8000, 1500, 500]


def test_unigram_baseline_matches_hand_computation():
    # counts [2, 1, 0] -> add-one p = [3/6, 2/6, 1/6]; eval tokens 0 and 2:
    # mean NLL = -(ln 1/2 + ln 1/6) / 2 = ln(12) / 2, perplexity sqrt(12).
    train, held_out = np.array([0, 0, 1]), np.array([0, 2])
    assert text.unigram_perplexity(train, held_out, 3) == pytest.approx(math.sqrt(12))
    assert text.unigram_bits_per_byte(train, held_out, 3) == pytest.approx(
        math.log2(12) / 2)


def test_unigram_baseline_on_stdlib_validation():
    s = text.corpus_splits()
    ppl = text.unigram_perplexity(s["train"], s["validation"], 260)
    # Measured 21.9 (4.45 bits/byte) on CPython 3.11; a trained LM must do far better.
    assert 15.0 < ppl < 30.0
    assert text.unigram_bits_per_byte(s["train"], s["validation"], 260) == pytest.approx(
        math.log2(ppl))


def _epoch_starts(ds, epochs):
    steps = int(np.ceil(epochs * ds.num_windows / ds.batch_size))
    starts = np.concatenate([ds.batch(t)["tokens"][:, 0] for t in range(steps)])
    return [starts[e * ds.num_windows:(e + 1) * ds.num_windows] for e in range(epochs)]


def test_lm_training_windows_cover_each_epoch_once():
    tokens = np.arange(1000, dtype=np.int32)  # token value == position
    ds = text.LMDataset(tokens, seq_len=10, batch_size=7, seed=0)
    assert ds.num_windows == 99 and ds.num_eval_windows == 99
    b = ds.batch(0)["tokens"]
    assert b.shape == (7, 11) and b.dtype == np.int32
    np.testing.assert_array_equal(b, b[:, :1] + np.arange(11))  # contiguous windows
    offsets = set()
    for e, starts in enumerate(_epoch_starts(ds, 3)):
        offset = starts.min()
        assert 0 <= offset < 10
        offsets.add(int(offset))
        assert sorted(starts.tolist()) == (offset + 10 * np.arange(99)).tolist()
        np.testing.assert_array_equal(starts, ds.window_starts(e))
    assert len(offsets) > 1  # window boundaries move between epochs

    fixed = text.LMDataset(tokens, 10, 7, seed=0, random_offset=False)
    assert sorted(fixed.window_starts(0).tolist()) == list(range(0, 990, 10))


def test_lm_batches_are_seeded_and_resume_safe():
    tokens = np.random.default_rng(0).integers(4, 260, 5000).astype(np.int32)
    a, b = text.LMDataset(tokens, 16, 4, seed=5), text.LMDataset(tokens, 16, 4, seed=5)
    other = text.LMDataset(tokens, 16, 4, seed=6)
    for t in [0, 1, 77, 500]:
        np.testing.assert_array_equal(a.batch(t)["tokens"], b.batch(t)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], other.batch(0)["tokens"])
    fresh = text.LMDataset(tokens, 16, 4, seed=5)
    for t in [900, 2, 3, 400, 1]:  # scramble a's history
        a.batch(t)
    for t in [3, 150, 0]:
        np.testing.assert_array_equal(a.batch(t)["tokens"], fresh.batch(t)["tokens"])


def test_lm_eval_pass_covers_every_window_once_with_weights():
    tokens = np.arange(1000, dtype=np.int32)
    ds = text.LMDataset(tokens, seq_len=10, batch_size=7, seed=0)
    batches = list(ds.eval_batches(8))
    assert len(batches) == 13  # ceil(99 / 8)
    toks = np.concatenate([b["tokens"] for b in batches])
    w = np.concatenate([b["weights"] for b in batches])
    assert w.sum() == 99 and w.dtype == np.float32
    np.testing.assert_array_equal(w, (np.arange(104) < 99).astype(np.float32))
    np.testing.assert_array_equal(toks[:99, 0], np.arange(0, 990, 10))
    # Consecutive windows share a boundary token: each token after the first is a
    # target exactly once.
    np.testing.assert_array_equal(toks[:98, -1], toks[1:99, 0])
    assert [b["tokens"].shape for b in batches[-1:]] == [(8, 11)]
    # Identical on every call.
    np.testing.assert_array_equal(
        np.concatenate([b["tokens"] for b in ds.eval_batches(8)]), toks)


def test_lm_rejects_too_long_seq_len():
    with pytest.raises(ValueError, match="seq_len=50"):
        text.LMDataset(np.arange(60, dtype=np.int32), 50, 2, seed=0)
