"""Random-access ordering of examples: step -> example indices, a pure function.

A training dataset holds ``num_items`` examples (windows, sentence pairs, ...). Its
training order is the infinite concatenation of per-epoch permutations, where epoch
``e``'s permutation is drawn from ``np.random.default_rng([seed, e])``. Batch ``step``
takes positions ``[step * B, (step + 1) * B)`` of that stream, so

* a resumed run needs only the step number as iterator state (no RNG state to save);
* each epoch visits every item exactly once, even when ``num_items % B != 0`` (a batch
  may straddle two epochs rather than dropping a remainder).

Evaluation instead walks the items once in fixed order; the last partial batch is
padded and ``weights`` marks real rows (1.0) versus padding (0.0).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator for everything random in one epoch (permutation, offsets)."""
    return np.random.default_rng([seed, epoch])


class EpochSampler:
    """Maps a training step to item indices; see the module docstring.

    Args:
      num_items: items per epoch (> 0).
      batch_size: items per step (> 0).
      seed: run seed.
      epoch_order: optional ``(rng) -> int64[num_items]``, the ids visited in one
        epoch, in order. Default ``rng.permutation(num_items)`` (ids are item indices).
        A dataset with more per-epoch randomness passes its own so that everything
        comes from the one ``epoch_rng(seed, epoch)``; e.g. the LM dataset returns
        window start offsets, shifted by a random per-epoch offset.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int,
                 epoch_order: Callable[[np.random.Generator], np.ndarray] | None = None):
        if num_items <= 0:
            raise ValueError(f"need at least one item per epoch, got num_items={num_items}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self._draw = epoch_order or (lambda rng: rng.permutation(num_items))
        # Consecutive steps hit the same epoch; caching its order avoids redrawing
        # it every step. The cache only memoizes a pure function, so results never depend
        # on which steps were requested before.
        self._cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        return self.num_items / self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64[num_items]: the ids visited in ``epoch``, in order."""
        order = self._cache.get(epoch)
        if order is None:
            order = np.asarray(self._draw(epoch_rng(self.seed, epoch)), dtype=np.int64)
            # Keep this epoch and the one before: consecutive steps use the same or the next.
            # (Returning the local ``order`` keeps this safe for a prefetch thread.)
            self._cache = {e: o for e, o in self._cache.items() if e == epoch - 1}
            self._cache[epoch] = order
        return order

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (epochs int64[B], ids int64[B]) for training step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pos = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, within = np.divmod(pos, self.num_items)
        ids = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self.epoch_order(int(e))[within[sel]]
        return epochs, ids


def eval_index_batches(num_items: int, batch_size: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over ``range(num_items)`` in order.

    Yields (items int64[batch_size], weights float32[batch_size]); the last batch is
    padded by repeating item 0 (any valid item keeps the model's input well-formed)
    with weight 0.0, so a weighted mean over all batches is the exact split average.
    """
    if batch_size <= 0:
        raise ValueError(f"eval batch_size must be > 0, got {batch_size}")
    for start in range(0, num_items, batch_size):
        real = min(batch_size, num_items - start)
        items = np.zeros(batch_size, np.int64)
        items[:real] = np.arange(start, start + real)
        weights = np.zeros(batch_size, np.float32)
        weights[:real] = 1.0
        yield items, weights
