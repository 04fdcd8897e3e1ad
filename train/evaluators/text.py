"""Evaluators of text models: a sampled continuation (LM) and decoding + BLEU (seq2seq)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import decoding
from train.data.tokenizers import BOS, EOS, PAD
from train.evaluators.base import Evaluator, check_positive
from train.tasks.seq2seq import bleu_and_exact_match


class LMSample(Evaluator):
    """A continuation of `prompt` (greedy when temperature is 0) -> sample.txt (periodic
    runs: sample_<step>.txt); the text is printed with the summary."""

    name = "sample"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.prompt = "def "          # "" = start from BOS
        c.tokens = 200             # new tokens (capped by the model's max_length)
        c.temperature = 1.0
        c.top_k = 0                # 0 = no top-k filter
        c.top_p = 0.9              # nucleus sampling (Holtzman et al. 2020); 1 = off
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "tokens")
        check_positive(cfg, cls.name, "top_k", 0)
        if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
            raise ValueError(f"evals.sample.temperature={cfg.temperature} must be >= 0 and "
                             f"evals.sample.top_p={cfg.top_p} in (0, 1]")

    def run(self, step, params, model_state, final):
        c, model = self.cfg, self.ctx.model
        tok = self.ctx.data["train"].tokenizer
        prompt = tok.encode(c.prompt)[None] if c.prompt else np.array([[tok.bos_id]],
                                                                      np.int32)
        n = min(c.tokens, model.cfg.max_length - prompt.shape[1])
        tokens, _ = decoding.generate(
            model, params, jnp.asarray(prompt), rng=jax.random.key(self.ctx.config.seed),
            max_new_tokens=n, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
            eos_id=tok.eos_id)
        sample = c.prompt + tok.decode(np.asarray(tokens[0]))
        name = "sample.txt" if final else f"sample_{step}.txt"
        with open(os.path.join(self.ctx.workdir, name), "w", encoding="utf-8") as f:
            f.write(sample + "\n")
        return {"text": sample}


class Decode(Evaluator):
    """Greedy decoding of the validation and test splits, and beam search on test, scored
    by corpus BLEU (sacrebleu) and exact match; a few decodes -> decodes.txt.

    Metrics: {validation,test}_bleu, {validation,test}_exact_match and, with beam_size > 1,
    test_bleu_beam<k>, test_exact_match_beam<k>. Corpus BLEU is 0 for a corpus without
    4-grams (every hypothesis shorter than 4 tokens) however right the decodes are: read
    exact match beside it (train.tasks.seq2seq.bleu_and_exact_match).
    """

    name = "decode"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.max_examples = 500       # examples decoded per split (0 = the whole split)
        c.beam_size = 4            # beam search on the test split (1 = greedy only)
        c.length_penalty = 0.6     # GNMT's alpha (Wu et al. 2016)
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        check_positive(cfg, cls.name, "max_examples", 0, " (0 = the whole split)")
        check_positive(cfg, cls.name, "beam_size")

    def decode_split(self, params, split: str, beam_size: int = 1) -> dict:
        """BLEU and exact match of up to max_examples decodes of `split`."""
        ds = self.ctx.data[split]
        limit, model = self.cfg.max_examples, self.ctx.model
        max_len = ds.max_target_len
        hyps, refs = [], []
        for batch in ds.eval_batches(self.ctx.config.data.eval_batch_size):
            keep = batch["weights"] > 0
            inputs = jnp.asarray(batch["inputs"])
            if beam_size > 1:
                seqs, _ = decoding.beam_search(model, params, inputs, beam_size=beam_size,
                                               max_length=max_len,
                                               alpha=self.cfg.length_penalty,
                                               bos_id=BOS, eos_id=EOS, pad_id=PAD)
                tokens = seqs[:, 0]
            else:
                tokens, _ = decoding.greedy_decode(model, params, inputs, max_length=max_len,
                                                   bos_id=BOS, eos_id=EOS, pad_id=PAD)
            hyps += [h for h, k in zip(ds.decode_targets(np.asarray(tokens)), keep) if k]
            refs += [r for r, k in zip(ds.decode_targets(batch["targets"]), keep) if k]
            if limit and len(hyps) >= limit:
                break
        if limit:
            hyps, refs = hyps[:limit], refs[:limit]
        return {**bleu_and_exact_match(hyps, refs), "examples": hyps[:5],
                "references": refs[:5]}

    def run(self, step, params, model_state, final):
        out, lines = {}, []
        beam = self.cfg.beam_size
        runs = [("validation", 1), ("test", 1)] + ([("test", beam)] if beam > 1 else [])
        for split, beam_size in runs:
            res = self.decode_split(params, split, beam_size)
            suffix = "" if beam_size == 1 else f"_beam{beam_size}"
            out[f"{split}_bleu{suffix}"] = res["bleu"]
            out[f"{split}_exact_match{suffix}"] = res["exact_match"]
            lines += [f"[{split}{suffix}] {h!r} (reference {r!r})"
                      for h, r in zip(res["examples"], res["references"])]
        with open(os.path.join(self.ctx.workdir, "decodes.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return out
