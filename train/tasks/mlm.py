"""Masked language modelling (BERT): predict 15% of tokens from their bidirectional context.

Of the selected positions, 80% become [MASK], 10% a random token and 10% stay unchanged
(Devlin et al. 2019, 3.1); the loss is the cross-entropy at the selected positions only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from train.data.tokenizers import MASK, NUM_SPECIAL, ByteTokenizer
from train.tasks import common
from train.tasks.base import CrossEntropyTask


def mask_tokens(rng, tokens, *, mask_probability: float, mask_token_fraction: float,
                random_token_fraction: float, vocab_size: int, mask_id: int = MASK,
                first_regular_id: int = NUM_SPECIAL, special_ids: tuple[int, ...] = ()):
    """tokens int [B, L] -> (corrupted inputs [B, L], selected bool [B, L]).

    Special tokens (ids < first_regular_id: PAD, BOS, EOS, MASK of the byte tokenizer;
    and any of ``special_ids``: a checkpoint tokenizer's [CLS], [SEP], [PAD], [MASK], ...)
    are never selected; random replacements are drawn from [first_regular_id, vocab_size)
    (a checkpoint tokenizer passes 0: the whole vocabulary, as BERT's data collator does).
    """
    k_select, k_kind, k_random = jax.random.split(rng, 3)
    regular = tokens >= first_regular_id
    if special_ids:
        regular = jnp.logical_and(regular, ~jnp.isin(tokens, jnp.asarray(special_ids)))
    selected = jnp.logical_and(jax.random.uniform(k_select, tokens.shape) < mask_probability,
                               regular)
    kind = jax.random.uniform(k_kind, tokens.shape)
    random_ids = jax.random.randint(k_random, tokens.shape, first_regular_id, vocab_size)
    corrupted = jnp.where(kind < mask_token_fraction, mask_id,
                          jnp.where(kind < mask_token_fraction + random_token_fraction,
                                    random_ids, tokens))
    return jnp.where(selected, corrupted, tokens).astype(tokens.dtype), selected


class MaskedLanguageModelTask(CrossEntropyTask):
    """batch {"tokens": int[B, L+1]} (LM windows; the last token is dropped)."""

    name = "mlm"
    collects_model_losses = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.mask_probability = 0.15  # BERT: 15% of tokens, then 80% [MASK] / 10% random /
        c.mask_token_fraction = 0.8  # 10% unchanged
        c.random_token_fraction = 0.1
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        t = config.task
        super().validate_config(config)
        if not 0.0 < t.mask_probability <= 1.0:
            raise ValueError(f"task.mask_probability={t.mask_probability} must be in (0, 1]")
        if min(t.mask_token_fraction, t.random_token_fraction) < 0 or (
                t.mask_token_fraction + t.random_token_fraction > 1.0):
            raise ValueError(f"task.mask_token_fraction={t.mask_token_fraction} and "
                             f"task.random_token_fraction={t.random_token_fraction} must be "
                             ">= 0 and sum to at most 1 (the rest stay unchanged)")

    def init_args(self, batch):
        return (batch["tokens"][:, :-1],), {}

    def _corruption_ids(self) -> dict:
        """mask_id, first_regular_id and special_ids of the training data's tokenizer."""
        tok = self.data["train"].tokenizer
        if isinstance(tok, ByteTokenizer):
            return {"mask_id": MASK, "first_regular_id": NUM_SPECIAL}
        if tok.mask_id is None:
            raise ValueError(f"the tokenizer in {tok.path} has no mask token: the mlm task "
                             "needs one (tokenizer_config.json mask_token)")
        return {"mask_id": tok.mask_id, "first_regular_id": 0,
                "special_ids": tok.special_ids}

    def predict(self, params, model_state, batch, rng, train: bool):
        """The corruption depends on `rng` only, so a teacher given the same rng sees the
        same masked inputs."""
        t = self.config.task
        targets = batch["tokens"][:, :-1]
        mask_rng, dropout_rng = jax.random.split(rng)
        inputs, selected = mask_tokens(
            mask_rng, targets, mask_probability=t.mask_probability,
            mask_token_fraction=t.mask_token_fraction,
            random_token_fraction=t.random_token_fraction, vocab_size=self.model.cfg.vocab_size,
            **self._corruption_ids())
        logits, extras = self.apply_capturing({"params": params, **model_state}, inputs,
                                              train=train, valid=jnp.ones(inputs.shape, bool),
                                              rngs={"dropout": dropout_rng})
        weights = selected * common.example_weights(batch, targets.shape[0])[:, None]
        return {"logits": logits, "targets": targets, "weights": weights, **extras}, \
            model_state

    def derived_metrics(self, metrics: dict) -> dict:
        return {"perplexity": common.perplexity(metrics["loss"])}
