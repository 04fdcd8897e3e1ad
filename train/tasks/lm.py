"""Causal language modelling (GPT): next-token cross-entropy, perplexity, a text sample."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from train.data import text as text_data
from train.tasks import common


class LanguageModelTask:
    """batch {"tokens": int[B, L+1]} -> inputs tokens[:, :-1], targets tokens[:, 1:]."""

    def __init__(self, config, model, datasets):
        self.config, self.model, self.datasets = config, model, datasets

    def init_args(self, batch):
        return (batch["tokens"][:, :-1],), {}

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = self.model.apply({"params": params, **model_state}, inputs, train=train,
                                  rngs={"dropout": rng})
        weights = jnp.broadcast_to(
            common.example_weights(batch, tokens.shape[0])[:, None], targets.shape)
        loss, metrics = common.token_metrics(logits, targets, weights,
                                             self.config.task.label_smoothing)
        return loss, (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        """Bits per token: the corpus is byte-level, so this is bits per byte."""
        return {"perplexity": common.perplexity(metrics["loss"]),
                "bits_per_token": metrics["loss"] / np.log(2.0)}

    def report(self, params, model_state, workdir: str) -> dict:
        """Unigram baseline perplexity and a sampled continuation (written to sample.txt)."""
        out = {}
        train_ds, val_ds = self.datasets["train"], self.datasets["validation"]
        if hasattr(train_ds, "tokens") and hasattr(val_ds, "tokens"):
            out["baseline/unigram_perplexity"] = float(text_data.unigram_perplexity(
                train_ds.tokens, val_ds.tokens, train_ds.vocab_size))
        t = self.config.task
        tok = train_ds.tokenizer
        prompt = tok.encode(t.sample_prompt)[None] if t.sample_prompt else np.array(
            [[tok.bos_id]], np.int32)
        n = min(t.sample_tokens, self.model.cfg.max_length - prompt.shape[1])
        tokens, _ = decoding.generate(
            self.model, params, jnp.asarray(prompt), rng=jax.random.key(self.config.seed),
            max_new_tokens=n, temperature=t.sample_temperature, top_k=t.sample_top_k,
            top_p=t.sample_top_p, eos_id=tok.eos_id)
        sample = t.sample_prompt + tok.decode(np.asarray(tokens[0]))
        with open(os.path.join(workdir, "sample.txt"), "w", encoding="utf-8") as f:
            f.write(sample + "\n")
        out["sample"] = sample
        return out
