"""The evaluator contract: what runs besides the loss, when, and with which options.

An evaluator is a small class that measures a trained (or training) model in a way the
task's loss cannot: decoding and BLEU, zero-shot classification, a linear probe, samples,
pictures. Each is configured in `config.evals.<name>` with its own options beside the
schedule, as in big_vision's `config.evals`:

    every   0: once, after the final evaluation (the default)
            N > 0: also after steps N, 2N, ... (before the final step)
            -1: off

Its numbers go to metrics.jsonl (split = its name) and TensorBoard at the step it ran,
and the final run's to summary.json as `<name>/<metric>`; text values (a sample) are
printed with the summary. Files it writes go into the workdir.

Subclass `Evaluator`, set `name`, extend `default_config()` with the options, implement
`run`, and register the class in `train/evaluators/__init__.EVALUATORS`. Tasks name the
evaluators their runs get by default (`Task.default_evals`); a config adds others with
`configs.common.add_eval`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import ml_collections


@dataclasses.dataclass
class EvalContext:
    """What an evaluator may use: the run, never its own training loop."""
    config: ml_collections.ConfigDict  # the run config
    model: Any                          # the flax module the task trains
    task: Any                           # the train.tasks.base.Task of the run
    data: Any                           # train.run_data.RunData: splits by name
    workdir: str
    # evaluate(split, params, model_state, key=None) -> {metric: mean} over the whole
    # split through the task's loss_fn (derived metrics included), as the trainer's own
    # validation; params as `run` gets them (the form the model is applied with); key:
    # the PRNG key batch i folds in (default: the run's eval key).
    evaluate: Callable[..., dict]
    # () -> (params, model_state) of the model freshly initialized from the config seed
    # (the trainer's own initialization, before any compression transform).
    init_variables: Callable[[], tuple]
    eval_key: Any = None                # the run's evaluation PRNG key
    # Compiled functions evaluators share within a run (e.g. the CLIP encoders), by name.
    shared: dict = dataclasses.field(default_factory=dict)


class Evaluator:
    """Defaults of the contract; see the module docstring."""

    name: ClassVar[str] = ""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.every = 0                # 0: at the end only; N: also every N steps; -1: off
        return c

    @classmethod
    def validate_config(cls, cfg: ml_collections.ConfigDict) -> None:
        """Raise ValueError naming a bad `evals.<name>.*` value (the schedule is checked
        by the trainer's config validation)."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        self.cfg, self.ctx = cfg, ctx

    def due(self, step: int, num_steps: int) -> bool:
        """Whether the periodic schedule runs this evaluator after `step` (< num_steps)."""
        return self.cfg.every > 0 and step % self.cfg.every == 0 and step < num_steps

    @property
    def enabled(self) -> bool:
        return self.cfg.every >= 0

    def run(self, step: int, params, model_state, final: bool) -> dict:
        """Metrics (numbers; text values allowed) of the model after `step`; `final`: the
        run's last call, after the final evaluation. params are the ones the model is
        applied with (Task.model_params)."""
        raise NotImplementedError(f"{type(self).__name__} must define run")


class SampleEvaluator(Evaluator):
    """An evaluator of the first examples of one split: `evals.<name>.split` (default
    "test") and the count `evals.<name>.<SAMPLE_KEY>` (default SAMPLE_DEFAULT, at least 1;
    with SAMPLE_ALL, 0 means the whole split)."""

    SAMPLE_KEY: ClassVar[str] = "examples"
    SAMPLE_DEFAULT: ClassVar[int] = 4
    SAMPLE_ALL: ClassVar[bool] = False

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.split = "test"
        c[cls.SAMPLE_KEY] = cls.SAMPLE_DEFAULT
        return c

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cls.SAMPLE_ALL:
            check_positive(cfg, cls.name, cls.SAMPLE_KEY, 0, " (0 = the whole split)")
        else:
            check_positive(cfg, cls.name, cls.SAMPLE_KEY)


def check_positive(cfg, name: str, key: str, low: int = 1, note: str = "") -> None:
    """ValueError unless evals.<name>.<key> >= low."""
    if cfg[key] < low:
        raise ValueError(f"evals.{name}.{key}={cfg[key]} must be >= {low}{note}")
