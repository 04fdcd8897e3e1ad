"""The task contract: every hook the trainer calls, with its default.

A task is the objective of a run: it turns a batch into a loss and (sum, weight) metrics
(train/tasks/common.py) and says what its model is initialized with. Subclass `Task`,
override what differs, and register the class in `train/tasks/__init__.TASKS`:

  name                        the registry key, `config.task.name`
  model_kind                  which family builder makes its model (default: name)
  default_config()            the task's options: `config.task` is {"name", **these}
  validate_config(config)     ValueError naming a bad `task.*` key (before anything
                              compiles; gets the whole run config)
  default_evals               evaluators a run of this task gets (train/evaluators/)
  augment_keys                the batch keys training-time augmentation may change
                              (train/data/augment.py): "image" (every op), "mask" (its
                              geometric ops), "label" (mixup / CutMix: "label_probs")
  init_args(batch)            -> (args, kwargs) of model.init for a host batch [1, ...]
  loss_fn(params, model_state, batch, rng, train[, step])
                              -> (loss, (metrics, model_state)); jitted, traced once
  predict(params, model_state, batch, rng, train)
                              -> (outputs, model_state): the model's outputs that the loss
                              is computed from ({"logits", "targets", "weights"} for the
                              cross-entropy tasks; the embeddings for contrastive), and
  metrics_of(outputs, batch)  -> (loss, metrics) from them; a task with both gets
                              loss_fn for free and can be distilled (train/distill.py
                              applies the same predict to the teacher)
  derived_metrics(means)      extra metrics from split means (host side): perplexity, IoU
  report(params, model_state, workdir)
                              cheap after-training numbers without an evaluation loop
                              (e.g. the unigram baseline); loops belong in evaluators
Optional, for objectives that need more than one loss and one optimizer:
  needs_step                  True: loss_fn(..., train=True, step=step) gets the step
                              (schedules inside the objective, e.g. a KL warm-up)
  make_optimizer(optim_cfg, num_steps)
                              -> an object whose init(params) is the opt_state
  make_train_step(tx, train_key, optim_cfg)
                              -> (TrainState, batch) -> (TrainState, scalars); a GAN's
                              phased updates. The default is `train_step` below.
  model_params(params)        the parameters the model is applied with (a compressed
                              run's adapted / fake-quantized ones); evaluators use it
  after_evaluation(step, params, model_state, workdir)
                              after each periodic validation pass

`CrossEntropyTask` is a Task with the `label_smoothing` option, for classifier-style
losses; subclasses extend its default_config / validate_config through super().

Tasks with several models (a GAN's generator and discriminator; a student and its
teacher) keep them in one params tree with one key per model and use the same hooks.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from models import transformer
from train import optim
from train.tasks import common, moe_objective
from train.state import TrainState


class Task:
    """Defaults of every hook; see the module docstring."""

    name: ClassVar[str] = ""
    # The family builder the model comes from (train/families.py; "" = the task's own
    # name): a new objective for an existing model, e.g. "lm" for any decoder task.
    model_kind: ClassVar[str] = ""
    needs_step: ClassVar[bool] = False
    # True: the train step passes loss_fn(..., frozen=state.frozen) (a distillation
    # teacher's variables; train/distill.py).
    needs_frozen: ClassVar[bool] = False
    default_evals: ClassVar[tuple[str, ...]] = ()
    # What config.data.<source>.augment may change in a training batch (() = nothing: an
    # augmented run of this task is refused by train.config.validate).
    augment_keys: ClassVar[tuple[str, ...]] = ()
    # True: predict applies the model through apply_capturing, so a mixture of experts'
    # routing statistics reach model_losses (its balancing terms join the objective).
    collects_model_losses: ClassVar[bool] = False

    @classmethod
    def builder(cls) -> str:
        """The key of the model builder in train.families.FAMILIES[...].builders."""
        return cls.model_kind or cls.name

    # ---- configuration ---------------------------------------------------------------
    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's options (without `name`)."""
        return ml_collections.ConfigDict()

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raise ValueError naming a bad `task.*` value and what is allowed."""

    def __init__(self, config, model, data):
        """config: the run config; model: the flax module; data: the run's datasets
        (train.run_data.RunData, or a {split: dataset} dict in unit tests)."""
        self.config, self.model, self.data = config, model, data
        if transformer.moe_config(model) is not None and not self.collects_model_losses:
            raise ValueError(f"model.moe: task {self.name!r} does not add a mixture of "
                             "experts' balancing losses; allowed with model.moe.every > 0: "
                             "tasks lm, mlm, seq2seq")

    # ---- the objective ----------------------------------------------------------------
    def init_args(self, batch) -> tuple[tuple, dict]:
        raise NotImplementedError(f"{type(self).__name__} must define init_args")

    def loss_fn(self, params, model_state, batch, rng, train: bool, **step_kwargs):
        """predict, then metrics_of (a task defines both, or overrides loss_fn)."""
        outputs, model_state = self.predict(params, model_state, batch, rng, train)
        loss, metrics = self.metrics_of(outputs, batch)
        loss = loss + self.model_losses(outputs, metrics)
        return loss, (metrics, model_state)

    def predict(self, params, model_state, batch, rng, train: bool):
        raise NotImplementedError(f"{type(self).__name__} defines neither loss_fn nor "
                                  "predict")

    def metrics_of(self, outputs: dict, batch) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} defines predict without metrics_of")

    # Set by distillation (distill.cosine_weight): predict adds outputs["hidden"], the
    # output of the model's transformer stack [B, L, D] (tasks that call apply_capturing).
    capture_hidden: bool = False

    def apply_capturing(self, variables, *args, **kwargs):
        """(model.apply(variables, *args, **kwargs), extras): extras has "hidden" (the
        output of the model's "decoder" / "encoder" stack) when capture_hidden, and "moe"
        (the MoE layers' sown statistics, for model_losses) when the model has any."""
        moe = transformer.moe_config(self.model) is not None
        if not self.capture_hidden and not moe:
            return self.model.apply(variables, *args, **kwargs), {}
        mutable = ["intermediates"] * self.capture_hidden + [transformer.MOE_STATS] * moe
        capture = (lambda m, method: m.name in transformer.STACK_NAMES
                   and method == "__call__") if self.capture_hidden else False
        out, captured = self.model.apply(variables, *args, capture_intermediates=capture,
                                         mutable=mutable, **kwargs)
        extras = {"moe": captured[transformer.MOE_STATS]} if moe else {}
        if not self.capture_hidden:
            return out, extras
        for name in transformer.STACK_NAMES:
            if name in captured["intermediates"]:
                hidden = captured["intermediates"][name]["__call__"][0]
                return out, {**extras, "hidden": hidden}
        raise ValueError(f"{type(self.model).__name__} has no transformer stack whose hidden "
                         "states distill.cosine_weight could compare")

    def model_losses(self, outputs: dict, metrics: dict):
        """The model's own weighted auxiliary losses (a mixture of experts' balancing and
        router z-losses: train/tasks/moe_objective.py), their metrics added to `metrics`;
        0 for a model without any."""
        if "moe" not in outputs:
            return 0.0
        penalty, moe_metrics = moe_objective.objective(outputs["moe"],
                                                       transformer.moe_config(self.model))
        metrics.update(moe_metrics)
        return penalty

    @classmethod
    def has_predict(cls) -> bool:
        """Whether the task splits its loss into predict + metrics_of (distillable)."""
        return cls.predict is not Task.predict

    def derived_metrics(self, means: dict) -> dict:
        return {}

    def report(self, params, model_state, workdir: str) -> dict:
        return {}

    def model_params(self, params):
        return params

    def after_evaluation(self, step: int, params, model_state, workdir: str) -> None:
        return None

    # ---- optimization -------------------------------------------------------------------
    def make_optimizer(self, optim_cfg, num_steps: int):
        return optim.make_optimizer(optim_cfg, num_steps)

    def make_train_step(self, tx, train_key, optim_cfg):
        return train_step(self, tx, train_key, optim_cfg)

    @classmethod
    def has_own_train_step(cls) -> bool:
        """Whether the task replaces the generic train step (a GAN's phased updates)."""
        return cls.make_train_step is not Task.make_train_step


class CrossEntropyTask(Task):
    """A task whose loss is a cross-entropy: it has the `label_smoothing` option (epsilon
    of uniform label smoothing, Szegedy et al. 2016; 0 = off)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.label_smoothing = 0.0
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        if not 0.0 <= config.task.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing={config.task.label_smoothing} must be in "
                             "[0, 1)")

    def metrics_of(self, outputs: dict, batch) -> tuple:
        """Token cross-entropy of outputs {"logits" [..., V], "targets" [...], "weights"
        [...]} (label smoothing applied to the loss, not to the reported metric)."""
        return common.token_metrics(outputs["logits"], outputs["targets"], outputs["weights"],
                                    self.config.task.label_smoothing)


def apply_model(model, params, model_state, inputs, rng, train: bool, *extra_inputs,
                **kwargs):
    """model.apply with the model's extra collections (batch_stats, ...) -> (outputs,
    model_state); the collections are mutable (and updated) in training only."""
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng}
    if train and model_state:
        out, updates = model.apply(variables, inputs, *extra_inputs, train=True, rngs=rngs,
                                   mutable=list(model_state), **kwargs)
        return out, {**model_state, **updates}
    return model.apply(variables, inputs, *extra_inputs, train=train, rngs=rngs,
                       **kwargs), model_state


def train_step(task: Task, tx, train_key, optim_cfg):
    """(TrainState, batch) -> (TrainState, scalars): loss, gradients, optimizer update.

    The dropout key of step s is fold_in(train_key, s), so any step can be recomputed
    from a checkpoint. Scalars: the task's metric means plus objective and grad_norm.
    """
    o = optim_cfg

    def step_fn(state: TrainState, batch):
        step = state.step
        rng = jax.random.fold_in(train_key, step)
        step_kwargs: dict[str, Any] = {"step": step} if task.needs_step else {}
        if task.needs_frozen:
            step_kwargs["frozen"] = state.frozen

        def loss_of(params):
            loss, (metrics, model_state) = task.loss_fn(params, state.model_state, batch,
                                                        rng, True, **step_kwargs)
            if o.l1 or o.l2:
                loss = loss + optim.regularization_penalty(params, o.l1, o.l2,
                                                           o.weight_decay_exclude)
            return loss, (metrics, model_state)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        new_state = state.advance(jnp.isfinite(loss) & jnp.isfinite(grad_norm),
                                  params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        scalars = {k: s / jnp.maximum(w, 1.0) for k, (s, w) in metrics.items()}
        return new_state, {**scalars, "objective": loss, "grad_norm": grad_norm}
    return step_fn
