"""Evaluators as configuration: `config.evals.<name>`; the contract is base.py.

EVALUATORS is the registry: every key of `config.evals` is a name here.
"""
from __future__ import annotations

import ml_collections

from train.evaluators.attention_maps import Alignment, AttentionRollout
from train.evaluators.base import EvalContext, Evaluator
from train.evaluators.confusion import ConfusionMatrix
from train.evaluators.contrastive import Heatmap, LinearProbe, Retrieval, ZeroShot
from train.evaluators.embeddings import Embeddings
from train.evaluators.experts import ExpertLoad
from train.evaluators.generative import AtInit, GANSamples, GANScore, IWAEBound, VAEPictures
from train.evaluators.images import SegmentationPlot
from train.evaluators.text import Decode, LMSample

EVALUATORS: dict[str, type[Evaluator]] = {cls.name: cls for cls in (
    LMSample,
    Decode,
    ZeroShot,
    Retrieval,
    LinearProbe,
    Heatmap,
    AtInit,
    GANSamples,
    GANScore,
    IWAEBound,
    VAEPictures,
    SegmentationPlot,
    ExpertLoad,
    Embeddings,
    AttentionRollout,
    Alignment,
    ConfusionMatrix,
)}


def get_evaluator_class(name: str) -> type[Evaluator]:
    if name not in EVALUATORS:
        raise ValueError(f"evals.{name} is not an evaluator; allowed: "
                         f"{', '.join(EVALUATORS)}")
    return EVALUATORS[name]


def evals_config(names) -> ml_collections.ConfigDict:
    """The `evals` section holding `names` with their default options."""
    c = ml_collections.ConfigDict()
    for name in names:
        c[name] = get_evaluator_class(name).default_config()
    return c


def validate(evals_cfg) -> None:
    """ValueError naming an unknown evaluator, a bad schedule or option."""
    for name in evals_cfg.keys():
        cls = get_evaluator_class(name)
        every = evals_cfg[name].every
        if every < -1:
            raise ValueError(f"evals.{name}.every={every} must be >= -1 (-1 = off, 0 = at "
                             "the end only, N = every N steps and at the end)")
        cls.validate_config(evals_cfg[name])


def make_evaluators(evals_cfg, ctx: EvalContext) -> list[Evaluator]:
    """The enabled evaluators of `evals_cfg`, in config order."""
    out = [get_evaluator_class(name)(evals_cfg[name], ctx) for name in evals_cfg.keys()]
    return [e for e in out if e.enabled]
