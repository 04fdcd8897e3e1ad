"""A run's datasets: every split of `config.data`, built once, on first use.

Tasks and evaluators receive this object and never build datasets themselves:

    data["train"]                      the training split (data.batch_size)
    data["zero_shot"]                  any other split the source has
    data.split("train", batch_size=64)  the same split at another training batch size
                                       (e.g. a GAN's scorer, trained on its own batches)
    data.info                          the fields the model config takes from the data
"""
from __future__ import annotations

from typing import Any

from train import data as data_lib


class RunData:
    """Datasets of one run: `config.data` with `seed`."""

    def __init__(self, data_cfg, seed: int):
        self.config, self.seed = data_cfg, seed
        self._cache: dict[tuple[str, int], Any] = {}

    def split(self, name: str, batch_size: int | None = None):
        """The `name` split; batch(step) draws `batch_size` (default data.batch_size)."""
        size = self.config.batch_size if batch_size is None else batch_size
        key = (name, size)
        if key not in self._cache:
            cfg = self.config
            if size != cfg.batch_size:
                cfg = cfg.copy_and_resolve_references()
                cfg.batch_size = size
            self._cache[key] = data_lib.make_dataset(cfg, name, self.seed)
        return self._cache[key]

    def __getitem__(self, name: str):
        return self.split(name)

    @property
    def train(self):
        return self.split("train")

    @property
    def info(self) -> dict:
        """data_info() of the training split: vocab_size, num_classes, image_size, ..."""
        return self.train.data_info()
