"""Sequence-to-sequence (encoder-decoder): teacher-forced cross-entropy and perplexity.

Greedy and beam decoding scored by exact match and BLEU is the `decode` evaluator
(train/evaluators/text.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import sacrebleu

from train.data.tokenizers import BOS, PAD
from train.tasks import common
from train.tasks.base import CrossEntropyTask


def shift_right(targets, bos_id: int = BOS):
    """Decoder inputs: BOS followed by targets[:, :-1] (teacher forcing)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], bos_id), targets[:, :-1]], axis=1)


def bleu_and_exact_match(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (0-100, sacrebleu: the standard corpus BLEU) and the fraction of exact
    string matches.

    BLEU is the geometric mean of the 1- to 4-gram precisions (Papineni et al. 2002), so a
    corpus with no 4-gram at all (every hypothesis under 4 tokens) scores 0 even when every
    decode is right; exact match is reported beside it for that reason.
    """
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return {"bleu": float(bleu), "exact_match": exact}


class Seq2SeqTask(CrossEntropyTask):
    """batch {"inputs": int[B, S], "targets": int[B, T]} (EOS-terminated, PAD-padded)."""

    name = "seq2seq"
    collects_model_losses = True
    default_evals = ("decode",)

    def init_args(self, batch):
        return (batch["inputs"], shift_right(batch["targets"])), {}

    def predict(self, params, model_state, batch, rng, train: bool):
        inputs, targets = batch["inputs"], batch["targets"]
        logits, extras = self.apply_capturing({"params": params, **model_state}, inputs,
                                              shift_right(targets), train=train,
                                              rngs={"dropout": rng})
        weights = (targets != PAD) * common.example_weights(batch, targets.shape[0])[:, None]
        return {"logits": logits, "targets": targets, "weights": weights, **extras}, \
            model_state

    def derived_metrics(self, metrics: dict) -> dict:
        return {"perplexity": common.perplexity(metrics["loss"])}
