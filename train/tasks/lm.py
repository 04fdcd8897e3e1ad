"""Causal language modelling (GPT): next-token cross-entropy, perplexity, bits per token.

The text sample written after training is the `sample` evaluator (train/evaluators/text.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from train.data import text as text_data
from train.tasks import common
from train.tasks.base import CrossEntropyTask


class LanguageModelTask(CrossEntropyTask):
    """batch {"tokens": int[B, L+1]} -> inputs tokens[:, :-1], targets tokens[:, 1:]."""

    name = "lm"
    collects_model_losses = True
    default_evals = ("sample",)

    def init_args(self, batch):
        return (batch["tokens"][:, :-1],), {}

    def predict(self, params, model_state, batch, rng, train: bool):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, extras = self.apply_capturing({"params": params, **model_state}, inputs,
                                              train=train, rngs={"dropout": rng})
        weights = jnp.broadcast_to(
            common.example_weights(batch, tokens.shape[0])[:, None], targets.shape)
        return {"logits": logits, "targets": targets, "weights": weights, **extras}, \
            model_state

    def derived_metrics(self, metrics: dict) -> dict:
        """Bits per token: the corpus is byte-level, so this is bits per byte."""
        return {"perplexity": common.perplexity(metrics["loss"]),
                "bits_per_token": metrics["loss"] / np.log(2.0)}

    def report(self, params, model_state, workdir: str) -> dict:
        """The add-one unigram baseline's validation perplexity (token-array datasets)."""
        train_ds, val_ds = self.data["train"], self.data["validation"]
        if not (isinstance(train_ds, text_data.LMDataset)
                and isinstance(val_ds, text_data.LMDataset)):
            return {}
        return {"baseline/unigram_perplexity": float(text_data.unigram_perplexity(
            train_ds.tokens, val_ds.tokens, train_ds.vocab_size))}
