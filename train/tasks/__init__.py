"""Objectives: one file per task (loss + metrics + evaluation extras).

A task object has:
  init_args(batch) -> (args, kwargs)      model.init inputs for a host batch
  loss_fn(params, model_state, batch, rng, train) -> (loss, (metrics, model_state))
                                          metrics are (sum, weight) pairs (tasks/common.py)
  derived_metrics(means) -> dict          extra metrics from averaged ones (host side)
  report(params, model_state, workdir) -> dict
                                          after training: baselines, samples, BLEU, ...
Optional:
  needs_step = True                       loss_fn(..., train=True, step=step) gets the
                                          optimizer step (schedules inside the objective,
                                          e.g. a KL warm-up); evaluation passes no step
  make_optimizer(optim_cfg, num_steps)    -> the object whose init(params) is the
                                          opt_state (default: train.optim.make_optimizer)
  make_train_step(tx, train_key, optim_cfg) -> (state, batch) -> (state, scalars), for
                                          objectives updated in phases (GAN); the default
                                          is train.trainer.make_train_step
  after_evaluation(step, params, model_state, workdir)
                                          called after each periodic validation pass
                                          (sample grids, diagnostics written to workdir)
"""
from __future__ import annotations

from train.tasks.classify import ClassificationTask
from train.tasks.contrastive import ContrastiveTask
from train.tasks.forecast import ForecastTask
from train.tasks.gan import GANTask
from train.tasks.lm import LanguageModelTask
from train.tasks.mlm import MaskedLanguageModelTask
from train.tasks.segment import SegmentationTask
from train.tasks.seq2seq import Seq2SeqTask
from train.tasks.vae import VAETask

TASKS = {
    "lm": LanguageModelTask,
    "mlm": MaskedLanguageModelTask,
    "seq2seq": Seq2SeqTask,
    "classify": ClassificationTask,
    "contrastive": ContrastiveTask,
    "forecast": ForecastTask,
    "vae": VAETask,
    "segment": SegmentationTask,
    "gan": GANTask,
}


def make_task(config, model, datasets):
    return TASKS[config.task.name](config, model, datasets)
