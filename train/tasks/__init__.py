"""Objectives: one file per task (loss + metrics + evaluation extras).

A task object has:
  init_args(batch) -> (args, kwargs)      model.init inputs for a host batch
  loss_fn(params, model_state, batch, rng, train) -> (loss, (metrics, model_state))
                                          metrics are (sum, weight) pairs (tasks/common.py)
  derived_metrics(means) -> dict          extra metrics from averaged ones (host side)
  report(params, workdir) -> dict         after training: baselines, samples, BLEU, ...
"""
from __future__ import annotations

from models import transformer
from train.tasks.lm import LanguageModelTask
from train.tasks.mlm import MaskedLanguageModelTask
from train.tasks.seq2seq import Seq2SeqTask

TASKS = {"lm": LanguageModelTask, "mlm": MaskedLanguageModelTask, "seq2seq": Seq2SeqTask}


def build_model(model_cfg, transformer_cfg: transformer.TransformerConfig):
    """The flax module for a model section (family "transformer": kind picks the class)."""
    kind = model_cfg.kind
    if kind == "decoder":
        return transformer.Decoder(transformer_cfg)
    if kind == "encoder":
        return transformer.Encoder(transformer_cfg, head="mlm")
    if kind == "encoder_decoder":
        return transformer.EncoderDecoder(transformer_cfg)
    raise ValueError(f"model.kind={kind!r} is unknown")


def make_task(config, model, datasets):
    return TASKS[config.task.name](config, model, datasets)
