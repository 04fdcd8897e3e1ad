"""Objectives: one file per task (loss + metrics + evaluation extras).

A task object has:
  init_args(batch) -> (args, kwargs)      model.init inputs for a host batch
  loss_fn(params, model_state, batch, rng, train) -> (loss, (metrics, model_state))
                                          metrics are (sum, weight) pairs (tasks/common.py)
  derived_metrics(means) -> dict          extra metrics from averaged ones (host side)
  report(params, model_state, workdir) -> dict
                                          after training: baselines, samples, BLEU, ...
"""
from __future__ import annotations

from train.tasks.classify import ClassificationTask
from train.tasks.contrastive import ContrastiveTask
from train.tasks.forecast import ForecastTask
from train.tasks.lm import LanguageModelTask
from train.tasks.mlm import MaskedLanguageModelTask
from train.tasks.seq2seq import Seq2SeqTask

TASKS = {"lm": LanguageModelTask, "mlm": MaskedLanguageModelTask, "seq2seq": Seq2SeqTask,
         "classify": ClassificationTask, "contrastive": ContrastiveTask,
         "forecast": ForecastTask}


def make_task(config, model, datasets):
    return TASKS[config.task.name](config, model, datasets)
