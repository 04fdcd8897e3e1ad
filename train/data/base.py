"""The random-access dataset base class, and what a data source registers.

A dataset (in the spirit of Grain's ``MapDataset``) is a fixed set of ``num_examples``
training items and ``num_eval_examples`` evaluation items. A subclass says how to build
a batch from item ids (``gather``); this class writes once what every dataset shares:

  batch(step)               training batch ``step``: the ids at positions
                            [step * B, (step + 1) * B) of the per-epoch permutations drawn
                            from (seed, epoch) (``sampling.EpochSampler``), so a batch is a
                            pure function of (data, seed, step) and a resumed run needs
                            only the step
  batch(step, rows)         only the rows ``rows`` (a slice) of that batch: one process
                            of a multi-process run gathers its own share and nothing else
  eval_batches(batch_size)  one pass in fixed order; the last batch is padded with item 0
                            and "weights" float32[B] is 1.0 on real rows, 0.0 on padding
                            (``rows``: the same share of each batch)
  steps_per_epoch           num_examples / batch_size
  data_info()               the fields the trainer copies into the model config
  vocab_size, tokenizer     the shared ``ByteTokenizer`` (every text source uses it)

Hooks a subclass overrides where it differs:

  draw_epoch(rng)        -> int64[num_examples], the ids one epoch visits, in order
                            (default ``rng.permutation(num_examples)``; the LM dataset
                            returns window starts shifted by a random per-epoch offset)
  eval_ids(positions)    -> the ids of eval positions 0..num_eval_examples-1 (default:
                            the positions themselves; e.g. every k-th forecast window)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from train.data.sampling import EpochSampler, eval_index_batches
from train.data.tokenizers import VOCAB_SIZE, ByteTokenizer

SPLITS = ("train", "validation", "test")  # what the trainer builds


class RandomAccessDataset:
    """Base class of every dataset; see the module docstring.

    Args:
      num_examples: training items per epoch (> 0).
      batch_size: training batch size B (> 0).
      seed: run seed; only the training order depends on it.
      num_eval_examples: items of the evaluation pass (default ``num_examples``).
    """

    tokenizer = ByteTokenizer()   # stateless: one instance serves every dataset
    vocab_size = VOCAB_SIZE
    num_classes: int | None = None  # set by labelled datasets; data_info() reports it

    def __init__(self, num_examples: int, batch_size: int, seed: int,
                 num_eval_examples: int | None = None):
        self.num_examples = num_examples
        self.num_eval_examples = (num_examples if num_eval_examples is None
                                  else num_eval_examples)
        self.batch_size, self.seed = batch_size, seed
        self._sampler = EpochSampler(num_examples, batch_size, seed, self.draw_epoch)

    # ---- What a subclass provides -------------------------------------------------------
    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict of item ids int64[B] (vectorised: one call per batch)."""
        raise NotImplementedError

    def draw_epoch(self, rng: np.random.Generator) -> np.ndarray:
        """int64[num_examples]: the ids one epoch visits, in order, from its ``rng``."""
        return rng.permutation(self.num_examples)

    def eval_ids(self, positions: np.ndarray) -> np.ndarray:
        """Item ids of evaluation positions int64[B] (in 0..num_eval_examples-1)."""
        return positions

    # ---- Written once for every dataset ---------------------------------------------------
    @property
    def steps_per_epoch(self) -> float:
        return self._sampler.steps_per_epoch

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """int64[num_examples]: the ids ``epoch`` visits, in order (``draw_epoch``)."""
        return self._sampler.epoch_order(epoch)

    def data_info(self) -> dict:
        """Fields the trainer copies into the model config."""
        info = {"vocab_size": self.vocab_size}
        if self.num_classes is not None:
            info["num_classes"] = self.num_classes
        return info

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """Training batch ``step`` (>= 0): ``gather`` of its B ids (of ``ids[rows]`` when
        given: rows [start, stop) of the batch, the same values the full batch has)."""
        _, ids = self._sampler.indices(step)
        return self.gather(ids if rows is None else ids[rows])

    def eval_batches(self, batch_size: int, rows: slice | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the eval positions in order: ``gather`` of their ids plus
        "weights" float32[batch_size] (0.0 on the padded tail of the last batch); with
        ``rows``, those rows of every batch."""
        for positions, weights in eval_index_batches(self.num_eval_examples, batch_size):
            if rows is not None:
                positions, weights = positions[rows], weights[rows]
            yield {**self.gather(self.eval_ids(positions)), "weights": weights}


@dataclasses.dataclass(frozen=True)
class Source:
    """A data source as ``train.data.SOURCES`` registers it under its name.

    default_config: () -> ConfigDict, the keys of ``config.data.<name>``.
    validate: (section, key prefix "data.<name>") -> None; raises ValueError naming the
      full key. Called only for the selected source.
    make: (section, split, batch_size, seed) -> the split's ``RandomAccessDataset``.
    splits: the split names ``make`` accepts.
    """

    default_config: Callable[[], ml_collections.ConfigDict]
    validate: Callable[[ml_collections.ConfigDict, str], None]
    make: Callable[[ml_collections.ConfigDict, str, int, int], RandomAccessDataset]
    splits: tuple[str, ...] = SPLITS
