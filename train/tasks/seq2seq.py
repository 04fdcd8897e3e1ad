"""Sequence-to-sequence (encoder-decoder): teacher-forced cross-entropy; greedy and beam
decoding scored by exact match and BLEU (sacrebleu, the standard corpus BLEU)."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import sacrebleu

from models import decoding
from train.data.tokenizers import BOS, EOS, PAD
from train.tasks import common


def shift_right(targets, bos_id: int = BOS):
    """Decoder inputs: BOS followed by targets[:, :-1] (teacher forcing)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], bos_id), targets[:, :-1]], axis=1)


def bleu_and_exact_match(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (0-100) and the fraction of exact string matches."""
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return {"bleu": float(bleu), "exact_match": exact}


class Seq2SeqTask:
    """batch {"inputs": int[B, S], "targets": int[B, T]} (EOS-terminated, PAD-padded)."""

    def __init__(self, config, model, datasets):
        self.config, self.model, self.datasets = config, model, datasets

    def init_args(self, batch):
        return (batch["inputs"], shift_right(batch["targets"])), {}

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        inputs, targets = batch["inputs"], batch["targets"]
        logits = self.model.apply({"params": params, **model_state}, inputs,
                                  shift_right(targets), train=train, rngs={"dropout": rng})
        weights = (targets != PAD) * common.example_weights(batch, targets.shape[0])[:, None]
        loss, metrics = common.token_metrics(logits, targets, weights,
                                             self.config.task.label_smoothing)
        return loss, (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        return {"perplexity": common.perplexity(metrics["loss"])}

    def decode_split(self, params, split: str, beam_size: int = 1) -> dict:
        """Decode up to task.decode_max_examples of `split`; BLEU and exact match."""
        ds = self.datasets[split]
        limit = self.config.task.decode_max_examples
        max_len = self.config.data.max_target_len
        hyps, refs = [], []
        for batch in ds.eval_batches(self.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            inputs = jnp.asarray(batch["inputs"])
            if beam_size > 1:
                seqs, _ = decoding.beam_search(self.model, params, inputs, beam_size=beam_size,
                                               max_length=max_len,
                                               alpha=self.config.task.length_penalty,
                                               bos_id=BOS, eos_id=EOS, pad_id=PAD)
                tokens = seqs[:, 0]
            else:
                tokens, _ = decoding.greedy_decode(self.model, params, inputs,
                                                   max_length=max_len, bos_id=BOS,
                                                   eos_id=EOS, pad_id=PAD)
            hyps += [h for h, k in zip(ds.decode_targets(np.asarray(tokens)), keep) if k]
            refs += [r for r, k in zip(ds.decode_targets(batch["targets"]), keep) if k]
            if limit and len(hyps) >= limit:
                break
        if limit:
            hyps, refs = hyps[:limit], refs[:limit]
        return {**bleu_and_exact_match(hyps, refs), "examples": hyps[:5], "references":
                refs[:5]}

    def report(self, params, model_state, workdir: str) -> dict:
        out, lines = {}, []
        beam = self.config.task.beam_size
        runs = [("validation", 1), ("test", 1)] + ([("test", beam)] if beam > 1 else [])
        for split, beam_size in runs:
            res = self.decode_split(params, split, beam_size)
            suffix = "" if beam_size == 1 else f"_beam{beam_size}"
            out[f"{split}/bleu{suffix}"] = res["bleu"]
            out[f"{split}/exact_match{suffix}"] = res["exact_match"]
            lines += [f"[{split}{suffix}] {h!r} (reference {r!r})"
                      for h, r in zip(res["examples"], res["references"])]
        with open(os.path.join(workdir, "decodes.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return out
