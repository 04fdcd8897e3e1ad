"""Objectives: one file per task; the contract is train/tasks/base.py.

TASKS is the one list of tasks: `config.task.name` is a key of it, and the `task` section
of a run config is {"name", **TASKS[name].default_config()}.
"""
from __future__ import annotations

from train.tasks.base import Task
from train.tasks.classify import ClassificationTask
from train.tasks.contrastive import ContrastiveTask
from train.tasks.forecast import ForecastTask
from train.tasks.gan import GANTask
from train.tasks.lm import LanguageModelTask
from train.tasks.mlm import MaskedLanguageModelTask
from train.tasks.segment import SegmentationTask
from train.tasks.seq2seq import Seq2SeqTask
from train.tasks.vae import VAETask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    LanguageModelTask,
    MaskedLanguageModelTask,
    Seq2SeqTask,
    ClassificationTask,
    ContrastiveTask,
    ForecastTask,
    VAETask,
    SegmentationTask,
    GANTask,
)}


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is unknown; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(config, model, data) -> Task:
    """The task of `config.task.name` for `model`; data: the run's datasets."""
    return get_task_class(config.task.name)(config, model, data)
