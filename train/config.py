"""The run config: its sections, their defaults, and validation before anything compiles.

A run config (an `ml_collections.ConfigDict`) has these sections; every config file in
`configs/` starts from `base_config(...)` and overrides values, never adds keys:

  seed        int, the one source of randomness (params, dropout, data order)
  task        the objective: name (a key of train.tasks.TASKS) and the task's options
              (its default_config())
  evals       evaluators by name (train.evaluators.EVALUATORS), each with `every` and its
              options; the task's default_evals unless the config file adds others
  model       the architecture: family, variant and every field of the family's config
              dataclass (train/families.py)
  data        train.data.default_config()
  optim       train.optim.default_config()
  train       steps, logging, evaluation, early stopping
  checkpoint  cadence, retention, best metric
  sharding    train.sharding.default_config()
  compress    train.compression.default_config(): quantization, pruning, LoRA
  init_from   train.init_from.default_config(): start from (or, with 0 steps, evaluate)
              the matching parameters of a trained run
  distill     train.distill.default_config(): a frozen teacher workdir and the weights of
              the distillation terms (off without a teacher)

`validate(config)` raises ValueError naming the key and what is allowed: unknown keys
(typos a config file could add), wrong types, impossible values, a task/model mismatch.

The workdirs a run reads (`init_from.workdir`, `distill.teacher`: SEEDED_PATHS) may hold
"{seed}", which the run replaces by its own `seed` (`with_seed_in_paths`) before anything
else: each seed of a `--seeds=K` sweep then compresses, fine-tunes or learns from the run
of the same seed, e.g. `--config.init_from.workdir="runs/seeds/gpt/seed={seed}"` after
`python -m train.sweep --config=configs/gpt.py --workdir=runs/seeds/gpt --sweep="" --seeds=K`,
so the seed spread of such a row includes its base's, and two rows built on the same bases
pair seed by seed.
"""
from __future__ import annotations

import difflib
from numbers import Integral, Real

import ml_collections

from train import compression, distill, optim, sharding
from train import data as data_lib
from train.data import augment
from train import evaluators as evaluators_lib
from train import families
from train import init_from as init_from_lib
from train import tasks as tasks_lib

def task_config(name: str) -> ml_collections.ConfigDict:
    """The `task` section: its name and the task's own options (its default_config())."""
    t = ml_collections.ConfigDict()
    t.name = name
    t.update(tasks_lib.get_task_class(name).default_config())
    return t


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
    c.restore_step = 0             # resume from exactly this step; 0 = the newest intact one
    return c


def base_config(task: str, variant: str, family: str = "transformer",
                **model_overrides) -> ml_collections.ConfigDict:
    """A complete run config for `task` with model `family` at size `variant`."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = task_config(task)
    c.evals = evaluators_lib.evals_config(tasks_lib.get_task_class(task).default_evals)
    families.check_task(family, task)
    c.model = families.model_section(family, variant, **model_overrides)
    c.data = data_lib.default_config()
    c.optim = optim.default_config()
    c.train = train_config()
    c.checkpoint = checkpoint_config()
    c.sharding = sharding.default_config()
    c.compress = compression.default_config()
    c.init_from = init_from_lib.default_config()
    c.distill = distill.default_config()
    return c


def add_eval(c: ml_collections.ConfigDict, name: str, **options) -> None:
    """Add evaluator `name` (train/evaluators) with its defaults, then `options`."""
    section = evaluators_lib.get_evaluator_class(name).default_config()
    for key, value in options.items():
        if key not in section:
            raise ValueError(f"evals.{name} has no option {key!r}; allowed: "
                             f"{', '.join(sorted(section.keys()))}")
        section[key] = value
    c.evals[name] = section


def shrink_for_smoke_test(c: ml_collections.ConfigDict, *, num_steps: int, batch_size: int,
                          eval_batch_size: int, log_every: int, eval_every: int) -> None:
    """Make `c` a seconds-long run (the configs' "tiny" variants, used by tests): few
    steps, small batches, evaluations and checkpoints every `eval_every` steps."""
    c.train.num_steps, c.train.log_every, c.train.eval_every = num_steps, log_every, eval_every
    c.checkpoint.every = eval_every
    c.data.batch_size, c.data.eval_batch_size = batch_size, eval_batch_size
    c.optim.schedule.warmup_steps = min(c.optim.schedule.warmup_steps, num_steps // 2)


def select_best_by(c: ml_collections.ConfigDict, metric: str, mode: str) -> None:
    """Rank checkpoints and stop early by the same validation metric."""
    c.checkpoint.best_metric, c.checkpoint.best_mode = metric, mode
    c.train.early_stopping.metric, c.train.early_stopping.mode = metric, mode


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


SEEDED_PATHS = (("init_from", "workdir"), ("distill", "teacher"))
SEED_FIELD = "{seed}"


def with_seed_in_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with SEED_FIELD in SEEDED_PATHS replaced by `config.seed` (a copy; `config`
    itself when no path holds it)."""
    seeded = [(section, key) for section, key in SEEDED_PATHS
              if SEED_FIELD in str(config.get(section, {}).get(key, ""))]
    if not seeded:
        return config
    config = config.copy_and_resolve_references()
    for section, key in seeded:
        config[section][key] = config[section][key].replace(SEED_FIELD, str(config.seed))
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad key; returns None when the config is sound
    (its "{seed}" paths checked as the run will read them)."""
    config = with_seed_in_paths(config)
    for section in ("task", "model"):
        if section not in config or "name" not in config.get("task", {}):
            raise ValueError(f"config has no {section} section (see train/config.py)")
    task = config.task.name
    task_cls = tasks_lib.get_task_class(task)
    families.check_task(config.model.get("family"), task)
    # base_config raises on an unknown variant, naming the family's variants.
    reference = base_config(task, config.model.get("variant"), config.model.family)
    if "evals" in config:  # a config file may add evaluators beyond the task's defaults
        reference.evals = evaluators_lib.evals_config(config.evals.keys())
    for key, allowed in _unknown_keys(config, reference):
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
        hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}" \
               f"{close[0]}? " if close else ""
        raise ValueError(f"unknown config key {key!r}; {hint}allowed here: "
                         f"{', '.join(allowed)}")
    _check_types(config, reference)
    families.resolve(config.model)  # the model config's own checks (dataset fields default)

    if not 0 <= config.seed < 2**32:
        raise ValueError(f"seed={config.seed} must be in [0, 2**32)")
    t = config.train
    for key in ("log_every", "eval_every"):
        if t[key] < 1:
            raise ValueError(f"train.{key}={t[key]} must be >= 1")
    if t.num_steps < 0 or (t.num_steps == 0 and not config.init_from.workdir):
        raise ValueError(f"train.num_steps={t.num_steps} must be >= 1 (0 = evaluate "
                         "init_from.workdir's trained params without training)")
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
    if ck.restore_step < 0:
        raise ValueError(f"checkpoint.restore_step={ck.restore_step} must be >= 0 (0 = the "
                         "newest intact step)")
    if ck.best_mode not in ("min", "max"):
        raise ValueError(f"checkpoint.best_mode={ck.best_mode!r}; allowed: min, max")
    for key, metric in (("checkpoint.best_metric", ck.best_metric),
                        ("train.early_stopping.metric", es.metric)):
        if metric and not metric.startswith("validation/"):
            raise ValueError(f"{key}={metric!r} must name a validation metric, e.g. "
                             "'validation/loss'")
    data_lib.validate(config.data)
    task_cls.validate_config(config)
    augment.check_task(config.data, task, task_cls.augment_keys,
                       tuple(n for n, cls in tasks_lib.TASKS.items() if cls.augment_keys))
    evaluators_lib.validate(config.evals)
    if compression.enabled(config.compress) and task_cls.has_own_train_step():
        raise ValueError(f"compress.* with task.name={task!r} is not supported: the task "
                         "brings its own train step, which the compression transforms do "
                         "not reach")
    optim.validate(config.optim, optim.schedule_steps(config.optim, t.num_steps))
    compression.validate(config.compress, t.num_steps)
    init_from_lib.validate(config.init_from)
    distill.validate(config.distill)
    if distill.enabled(config.distill) and not task_cls.has_predict():
        raise ValueError(f"distill.teacher with task.name={task!r} is not supported: the "
                         "task has no predict/metrics_of split; distillable: lm, mlm, "
                         "classify, seq2seq, contrastive")
    sharding.validate(config.sharding, config.data.batch_size)
    num_devices = len(sharding.devices_for(config.sharding))
    if config.data.eval_batch_size % num_devices:
        raise ValueError(f"data.eval_batch_size={config.data.eval_batch_size} must be "
                         f"divisible by the {num_devices} devices")
