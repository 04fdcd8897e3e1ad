"""The run config: its sections, their defaults, and validation before anything compiles.

A run config (an `ml_collections.ConfigDict`) has these sections; every config file in
`configs/` starts from `base_config(...)` and overrides values, never adds keys:

  seed        int, the one source of randomness (params, dropout, data order)
  task        the objective: name ("lm" | "mlm" | "seq2seq") and its options
  model       the architecture: family/kind/variant and every TransformerConfig field
  data        train.data.default_config()
  optim       train.optim.default_config()
  train       steps, logging, evaluation, early stopping
  checkpoint  cadence, retention, best metric
  sharding    train.sharding.default_config()

`validate(config)` raises ValueError naming the key and what is allowed: unknown keys
(typos a config file could add), wrong types, impossible values, a task/model mismatch.
"""
from __future__ import annotations

import dataclasses
from numbers import Integral, Real

import ml_collections

from models import transformer
from train import data as data_lib
from train import optim, sharding

TASK_MODEL_KINDS = {"lm": "decoder", "mlm": "encoder", "seq2seq": "encoder_decoder"}
MODEL_KINDS = ("decoder", "encoder", "encoder_decoder")
# TransformerConfig fields that are not config values (code hooks, or set by the trainer).
_MODEL_FIELDS_NOT_IN_CONFIG = ("dot_general", "vocab_size")


def task_config(name: str) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.name = name
    t.label_smoothing = 0.0        # epsilon of uniform label smoothing (Szegedy et al.)
    if name == "lm":
        t.sample_prompt = "def "   # text sample written to the workdir after training
        t.sample_tokens = 200
        t.sample_temperature = 1.0
        t.sample_top_k = 0
        t.sample_top_p = 0.9
    elif name == "mlm":
        t.mask_probability = 0.15  # BERT: 15% of tokens, then 80% [MASK] / 10% random /
        t.mask_token_fraction = 0.8  # 10% unchanged
        t.random_token_fraction = 0.1
    elif name == "seq2seq":
        t.decode_max_examples = 500  # examples greedily decoded for exact match / BLEU
        t.beam_size = 4              # beam search on the test split (1 = greedy only)
        t.length_penalty = 0.6       # GNMT alpha
    else:
        raise ValueError(f"task.name={name!r} is unknown; allowed: "
                         f"{', '.join(TASK_MODEL_KINDS)}")
    return t


def model_config(variant: str, kind: str, **overrides) -> ml_collections.ConfigDict:
    """Model section: family/kind/variant plus every TransformerConfig field, filled in."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r} is unknown; allowed: {', '.join(MODEL_KINDS)}")
    resolved = transformer.make_config(variant, **overrides)  # raises on unknown variant
    m = ml_collections.ConfigDict()
    m.family = "transformer"
    m.kind = kind
    m.variant = variant
    for field in dataclasses.fields(transformer.TransformerConfig):
        if field.name in _MODEL_FIELDS_NOT_IN_CONFIG:
            continue
        value = getattr(resolved, field.name)
        if field.name == "num_decoder_layers":  # Optional[int]: keep the type for overrides
            value = ml_collections.config_dict.placeholder(int) if value is None else value
        elif field.name == "num_kv_heads":
            value = ml_collections.config_dict.placeholder(int) if value is None else value
        setattr(m, field.name, value)
    return m


def train_config() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.num_steps = 1000
    t.log_every = 50               # train metrics to metrics.jsonl / TensorBoard / stdout
    t.eval_every = 250             # validation pass (and early-stopping check)
    t.eval_max_batches = 0         # 0 = the whole validation split
    es = t.early_stopping = ml_collections.ConfigDict()
    es.metric = "validation/loss"
    es.mode = "min"                # "min" | "max"
    es.patience = 0                # evaluations without improvement before stopping; 0 = off
    es.min_delta = 0.0             # an improvement must beat the best by more than this
    return t


def checkpoint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 250                  # steps between checkpoints (and at the end, always)
    c.keep = 2                     # most recent checkpoints kept ...
    c.best_metric = "validation/loss"  # ... plus the best by this metric ("" = none)
    c.best_mode = "min"
    return c


def base_config(task: str, variant: str, **model_overrides) -> ml_collections.ConfigDict:
    """A complete run config for `task` with the transformer `variant`."""
    if task not in TASK_MODEL_KINDS:
        raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASK_MODEL_KINDS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = task_config(task)
    c.model = model_config(variant, TASK_MODEL_KINDS[task], **model_overrides)
    c.data = data_lib.default_config()
    c.optim = optim.default_config()
    c.train = train_config()
    c.checkpoint = checkpoint_config()
    c.sharding = sharding.default_config()
    return c


# ----------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------
def _unknown_keys(config, reference, prefix=""):
    """Yield (dotted key, allowed keys) for keys of `config` that `reference` lacks."""
    for key in config.keys():
        if key not in reference:
            yield prefix + key, sorted(reference.keys())
        elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
                reference[key], ml_collections.ConfigDict):
            yield from _unknown_keys(config[key], reference[key], f"{prefix}{key}.")


def _check_types(config, reference, prefix=""):
    for key in reference.keys():
        if key not in config:
            raise ValueError(f"config key {prefix}{key} is missing")
        got, want = config[key], reference[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                raise ValueError(f"{prefix}{key} must be a section, got {got!r}")
            _check_types(got, want, f"{prefix}{key}.")
        elif isinstance(want, bool):
            if not isinstance(got, bool):
                raise ValueError(f"{prefix}{key}={got!r} must be a bool")
        elif isinstance(want, Integral):
            if not isinstance(got, Integral) or isinstance(got, bool):
                raise ValueError(f"{prefix}{key}={got!r} must be an integer")
        elif isinstance(want, Real):
            if not isinstance(got, Real) or isinstance(got, bool):
                raise ValueError(f"{prefix}{key}={got!r} must be a number")
        elif isinstance(want, str) and not isinstance(got, str):
            raise ValueError(f"{prefix}{key}={got!r} must be a string")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad key; returns None when the config is sound."""
    for section in ("task", "model"):
        if section not in config or "name" not in config.get("task", {}):
            raise ValueError(f"config has no {section} section (see train/config.py)")
    task = config.task.name
    if task not in TASK_MODEL_KINDS:
        raise ValueError(f"task.name={task!r} is unknown; allowed: "
                         f"{', '.join(TASK_MODEL_KINDS)}")
    if config.model.get("variant") not in transformer.VARIANTS:
        raise ValueError(f"model.variant={config.model.get('variant')!r} is unknown; "
                         f"allowed: {', '.join(transformer.VARIANTS)}")
    reference = base_config(task, config.model.variant)
    for key, allowed in _unknown_keys(config, reference):
        raise ValueError(f"unknown config key {key!r}; allowed here: {', '.join(allowed)}")
    _check_types(config, reference)
    if config.model.kind != TASK_MODEL_KINDS[task]:
        raise ValueError(f"model.kind={config.model.kind!r} does not fit task {task!r}; "
                         f"it needs model.kind={TASK_MODEL_KINDS[task]!r}")
    model_fields(config.model, vocab_size=1)  # TransformerConfig's own checks

    t = config.train
    for key in ("num_steps", "log_every", "eval_every"):
        if t[key] < 1:
            raise ValueError(f"train.{key}={t[key]} must be >= 1")
    if t.eval_max_batches < 0:
        raise ValueError(f"train.eval_max_batches={t.eval_max_batches} must be >= 0 "
                         "(0 = whole split)")
    es = t.early_stopping
    if es.mode not in ("min", "max"):
        raise ValueError(f"train.early_stopping.mode={es.mode!r}; allowed: min, max")
    if es.patience < 0 or es.min_delta < 0:
        raise ValueError("train.early_stopping.patience and min_delta must be >= 0")
    ck = config.checkpoint
    if ck.every < 1 or ck.keep < 1:
        raise ValueError(f"checkpoint.every={ck.every} and checkpoint.keep={ck.keep} "
                         "must be >= 1")
    if ck.best_mode not in ("min", "max"):
        raise ValueError(f"checkpoint.best_mode={ck.best_mode!r}; allowed: min, max")
    for key, metric in (("checkpoint.best_metric", ck.best_metric),
                        ("train.early_stopping.metric", es.metric)):
        if metric and not metric.startswith("validation/"):
            raise ValueError(f"{key}={metric!r} must name a validation metric, e.g. "
                             "'validation/loss'")
    if config.task.label_smoothing < 0 or config.task.label_smoothing >= 1:
        raise ValueError(f"task.label_smoothing={config.task.label_smoothing} must be in "
                         "[0, 1)")
    data_lib.validate(config.data)
    optim.validate(config.optim, t.num_steps)
    sharding.validate(config.sharding, config.data.batch_size)
    num_devices = len(sharding.devices_for(config.sharding))
    if config.data.eval_batch_size % num_devices:
        raise ValueError(f"data.eval_batch_size={config.data.eval_batch_size} must be "
                         f"divisible by the {num_devices} devices")


def model_fields(model_cfg: ml_collections.ConfigDict, vocab_size: int
                 ) -> transformer.TransformerConfig:
    """The TransformerConfig a model section describes (vocab from the dataset)."""
    fields = {k: v for k, v in model_cfg.items() if k not in ("family", "kind", "variant")}
    return transformer.TransformerConfig(**fields, vocab_size=vocab_size)
