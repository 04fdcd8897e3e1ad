"""RandomAccessDataset: batch / eval_batches / steps_per_epoch / data_info, written once."""
import numpy as np
import pytest

from train.data.base import RandomAccessDataset
from train.data.tokenizers import ByteTokenizer


class Toy(RandomAccessDataset):
    """Item i is the row [i, 10 i]; evaluation uses every other item."""

    def __init__(self, n, batch_size, seed, num_eval=None, stride=1):
        self.stride = stride
        super().__init__(n, batch_size, seed, num_eval)

    def gather(self, ids):
        ids = np.asarray(ids, np.int64)
        return {"x": np.stack([ids, 10 * ids], axis=1)}

    def eval_ids(self, positions):
        return positions * self.stride


def test_batches_walk_per_epoch_permutations_of_seed_and_epoch():
    ds = Toy(7, batch_size=3, seed=5)
    # The reference stream: epoch e is default_rng([seed, e]).permutation(n), concatenated.
    stream = np.concatenate([np.random.default_rng([5, e]).permutation(7) for e in range(4)])
    for step in range(8):
        np.testing.assert_array_equal(ds.batch(step)["x"][:, 0], stream[3 * step:3 * step + 3])
    np.testing.assert_array_equal(ds.batch(2)["x"][:, 1], 10 * stream[6:9])  # straddles epochs
    np.testing.assert_array_equal(ds.epoch_ids(1), stream[7:14])
    assert ds.steps_per_epoch == 7 / 3
    # Pure function of (seed, step): a fresh dataset, steps in any order, same batches.
    fresh = Toy(7, batch_size=3, seed=5)
    np.testing.assert_array_equal(fresh.batch(7)["x"], ds.batch(7)["x"])


def test_eval_pads_the_last_batch_with_item_zero_and_weights():
    ds = Toy(9, batch_size=2, seed=0, num_eval=5, stride=2)
    ev = list(ds.eval_batches(2))
    assert [sorted(b) for b in ev] == [["weights", "x"]] * 3
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in ev]),
                                  [0, 2, 4, 6, 8, 0])
    np.testing.assert_array_equal(np.concatenate([b["weights"] for b in ev]),
                                  [1, 1, 1, 1, 1, 0])
    assert ev[0]["weights"].dtype == np.float32
    with pytest.raises(ValueError, match="eval batch_size must be > 0"):
        next(ds.eval_batches(0))


def test_draw_epoch_override_and_defaults():
    class Shifted(Toy):
        def draw_epoch(self, rng):
            return 100 + rng.permutation(self.num_examples)

    ds = Shifted(4, batch_size=4, seed=1)
    np.testing.assert_array_equal(ds.batch(0)["x"][:, 0],
                                  100 + np.random.default_rng([1, 0]).permutation(4))
    assert ds.data_info() == {"vocab_size": 260}
    assert isinstance(ds.tokenizer, ByteTokenizer) and ds.vocab_size == 260
    ds.num_classes = 3
    assert ds.data_info() == {"vocab_size": 260, "num_classes": 3}
    with pytest.raises(ValueError, match="num_items=0"):
        Toy(0, batch_size=2, seed=0)
