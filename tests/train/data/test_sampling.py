"""EpochSampler / eval_index_batches: the random-access ordering every dataset uses."""
import numpy as np
import pytest

from train.data.sampling import EpochSampler, eval_index_batches


@pytest.mark.parametrize("num_items,batch_size", [(10, 3), (12, 4), (5, 7)])
def test_each_epoch_visits_every_item_once(num_items, batch_size):
    s = EpochSampler(num_items, batch_size, seed=3)
    steps = int(np.ceil(4 * num_items / batch_size))
    epochs, ids = zip(*(s.indices(t) for t in range(steps)))
    epochs, ids = np.concatenate(epochs), np.concatenate(ids)
    for e in range(4):  # first 4 epochs are complete
        assert sorted(ids[epochs == e].tolist()) == list(range(num_items))
        np.testing.assert_array_equal(ids[epochs == e], s.epoch_order(e))
    # Epochs are consecutive blocks of the stream (a batch may straddle two).
    np.testing.assert_array_equal(epochs, np.arange(len(epochs)) // num_items)


def test_orders_are_seeded_and_differ_between_epochs():
    a, b, c = (EpochSampler(100, 8, seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    np.testing.assert_array_equal(a.epoch_order(0),
                                  np.random.default_rng([1, 0]).permutation(100))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))


def test_indices_do_not_depend_on_history():
    fresh = EpochSampler(37, 5, seed=0)
    used = EpochSampler(37, 5, seed=0)
    for t in [100, 3, 0, 55, 8, 8, 7]:
        used.indices(t)
    for t in [8, 0, 100, 31]:
        np.testing.assert_array_equal(fresh.indices(t)[1], used.indices(t)[1])
    with pytest.raises(ValueError):
        fresh.indices(-1)


def test_eval_index_batches_pad_tail_with_zero_weight():
    batches = list(eval_index_batches(7, 3))
    assert len(batches) == 3
    idx = np.concatenate([i for i, _ in batches])
    w = np.concatenate([w for _, w in batches])
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(w, [1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert w.dtype == np.float32
    assert [len(i) for i, _ in eval_index_batches(6, 3)] == [3, 3]
