"""Numbers-to-words task: the converter, the hash split and Seq2SeqDataset."""
import numpy as np
import pytest

from train.data import seq2seq
from train.data.seq2seq import number_to_words
from train.data.tokenizers import EOS, PAD

TRICKY = {
    0: "zero", 7: "seven", 10: "ten", 13: "thirteen", 19: "nineteen", 20: "twenty",
    21: "twenty-one", 40: "forty", 99: "ninety-nine", 100: "one hundred",
    101: "one hundred one", 110: "one hundred ten", 115: "one hundred fifteen",
    999: "nine hundred ninety-nine", 1000: "one thousand", 1001: "one thousand one",
    1010: "one thousand ten", 1234: "one thousand two hundred thirty-four",
    12_000: "twelve thousand", 20_019: "twenty thousand nineteen",
    100_000: "one hundred thousand", 100_100: "one hundred thousand one hundred",
    999_999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
    1_000_000: "one million", 2_000_017: "two million seventeen",
    1_000_000_001: "one billion one",
}


@pytest.mark.parametrize("n,words", sorted(TRICKY.items()))
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_number_to_words_range():
    with pytest.raises(ValueError):
        number_to_words(-1)
    with pytest.raises(ValueError):
        number_to_words(10**12)


def test_longest_target_len_matches_brute_force():
    for m in (0, 9, 999, 1000, 23_456):
        assert seq2seq.longest_target_len(m) == max(
            len(number_to_words(n)) for n in range(m + 1))
    # "three hundred seventy-three thousand three hundred seventy-three"
    assert seq2seq.longest_target_len(999_999) == 64


def test_splits_are_disjoint_fixed_and_sized_by_fraction():
    s = seq2seq.number_splits(999_999)
    total = sum(len(v) for v in s.values())
    assert total == 1_000_000
    assert np.array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(1_000_000))
    # Hash split: sizes within sampling noise of 0.9 / 0.05 / 0.05 (std ~ 220).
    assert abs(len(s["train"]) - 900_000) < 2000
    assert abs(len(s["validation"]) - 50_000) < 1000
    # A number's split does not depend on max_number.
    small = seq2seq.number_splits(9_999)
    for k in s:
        np.testing.assert_array_equal(np.sort(small[k]), np.sort(s[k][s[k] <= 9_999]))


def test_held_out_numbers_never_in_training_batches():
    train = seq2seq.numbers_to_words_dataset("train", seed=0, batch_size=256)
    held_out = set(seq2seq.number_splits(999_999)["test"].tolist()) | set(
        seq2seq.number_splits(999_999)["validation"].tolist())
    seen = set()
    for step in range(0, 2000, 50):
        seen.update(int(x) for x in train.decode_inputs(train.batch(step)["inputs"]))
    assert len(seen) > 9000 and not seen & held_out


def test_batches_are_padded_eos_terminated_and_decodable():
    ds = seq2seq.numbers_to_words_dataset("train", seed=1, batch_size=8)
    b = ds.batch(3)
    assert b["inputs"].shape == (8, 8) and b["targets"].shape == (8, 72)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    for key in ("inputs", "targets"):
        lengths = (b[key] != PAD).sum(1)
        np.testing.assert_array_equal(b[key][np.arange(8), lengths - 1], EOS)
    for digits, words in zip(ds.decode_inputs(b["inputs"]), ds.decode_targets(b["targets"])):
        assert number_to_words(int(digits)) == words
    assert ds.vocab_size == 260 and ds.tokenizer.decode(ds.tokenizer.encode("x")) == "x"


def test_seeded_and_resume_safe():
    a = seq2seq.numbers_to_words_dataset("train", seed=1, batch_size=8)
    b = seq2seq.numbers_to_words_dataset("train", seed=1, batch_size=8)
    c = seq2seq.numbers_to_words_dataset("train", seed=2, batch_size=8)
    for t in [5, 0, 10_000]:
        np.testing.assert_array_equal(a.batch(t)["inputs"], b.batch(t)["inputs"])
    assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])


def test_eval_pass_with_cap_and_weights():
    ds = seq2seq.numbers_to_words_dataset("test", seed=0, batch_size=8, max_eval_examples=10)
    batches = list(ds.eval_batches(4))
    assert len(batches) == 3
    w = np.concatenate([x["weights"] for x in batches])
    np.testing.assert_array_equal(w, [1] * 10 + [0] * 2)
    digits = sum((ds.decode_inputs(x["inputs"]) for x in batches), [])
    assert [int(d) for d in digits[:10]] == ds.numbers[:10].tolist()
    # Numbers in hash order, not the 10 smallest.
    assert max(int(d) for d in digits[:10]) > 100_000


def test_too_short_target_len_names_the_key():
    ds = seq2seq.Seq2SeqDataset(np.array([777_777]), 8, 20, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="max_target_len=20"):
        ds.batch(0)
