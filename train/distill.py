"""Knowledge distillation as configuration: `config.distill` on any distillable task.

A frozen teacher -- any flaxlab workdir of the same task (a trained run, or a checkpoint
`train.convert` wrote), built from its own config.json -- runs in eval mode inside the
jitted train step on the student's batch, and the student's loss becomes

    hard_weight * (the task's own loss)                       ground truth
  + kd_weight * T^2 KL(softmax(z_t/T) || softmax(z_s/T))      logit tasks: lm, mlm,
                                                              classify, seq2seq (padding
                                                              and MLM's unselected
                                                              positions excluded)
  + cosine_weight * (1 - cos(h_s, h_t))                       lm, mlm: DistilBERT's cosine
                                                              between the stacks' last
                                                              hidden states (equal widths)
  + hidden_weight * MSE(W h_s + b, h_t)                       lm, mlm: FitNets' hint loss,
                                                              W the student's learned
                                                              regressor (model.hint_dim)
                                                              where the widths differ
  + affinity_weight * (L_I2T + L_T2I)                         contrastive: TinyCLIP's
                                                              affinity mimicking over the
                                                              global batch

(train/tasks/distill_losses.py; Hinton et al. 2015, Wu et al. 2023). Each term is off at
weight 0, so an ablation is one override. The teacher sees exactly the student's inputs:
the same batch and, for MLM, the same masked positions (the corruption comes from the
step's rng, which both share). Evaluation reports the task's own metrics only, so
distilled and undistilled runs compare directly; training logs `distill_kd` /
`distill_affinity` beside the loss.

The teacher's variables live in `TrainState.frozen`: an argument of the jitted step (never
a constant baked into the program), outside the gradient (only `params` are
differentiated) and outside checkpoints (reloaded, fingerprint-verified, from the teacher's
workdir on every start, so a resumed run sees the same teacher).

    python -m train.main --config=configs/gpt.py:tiny --workdir=runs/student \
        --config.distill.teacher=runs/teacher --config.distill.temperature=2
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from models import transformer
from models.layers import gates
from train import families
from train import init_from as init_from_lib
from train.tasks import common, distill_losses
from train.tasks.base import Task


def default_config() -> ml_collections.ConfigDict:
    """The `distill` section; off while `teacher` is ""."""
    c = ml_collections.ConfigDict()
    c.teacher = ""             # the teacher's workdir ("" = no distillation)
    c.teacher_step = "best"    # best | latest | a step, as a string
    c.temperature = 2.0        # softmax temperature T of the KD term
    c.hard_weight = 1.0        # the task's own (ground-truth) loss
    c.kd_weight = 1.0          # soft targets (tasks with logits)
    c.affinity_weight = 1.0    # affinity mimicking (contrastive)
    # DistilBERT's cosine embedding loss between the last hidden states (lm, mlm; student
    # and teacher of the same width). 0 = off.
    c.cosine_weight = 0.0
    # Mean squared error between the last hidden states (lm, mlm), the student's through
    # its learned hint regressor (model.hint_dim = the teacher's width) where the widths
    # differ (FitNets). 0 = off.
    c.hidden_weight = 0.0
    # Automatic inheritance (TinyCLIP sec. 3.2): with model.unit_gates, learn L0 gates on
    # every head and MLP unit under the constraint "expected sparsity = gate_target" (a
    # Lagrangian, its multipliers learned by gradient ascent), ramped linearly from 0 over
    # gate_warmup_steps. A later run inherits by the gates (init_from.inherit). 0 = off.
    c.gate_target = 0.0
    c.gate_warmup_steps = 0
    c.gate_quadratic = 100.0   # the augmented Lagrangian's fixed mu (distill_losses)
    # Learning-rate multipliers of the gates' log_alpha and of the multiplier (prepended
    # to optim.layer_lr): the gates must move ~5 logits within the run.
    c.gate_lr = 50.0
    c.gate_lagrange_lr = 5.0
    # Multi-stage progressive distillation (train/stages.py): intermediate models as
    # "key=value;key=value" overrides, largest first; the run's own model is the last stage.
    c.stages = ()
    return c


def enabled(c: ml_collections.ConfigDict) -> bool:
    return bool(c.teacher)


def validate(c: ml_collections.ConfigDict) -> None:
    """ValueError naming the `distill.*` key and what is allowed (files are checked when
    the teacher is loaded)."""
    if not enabled(c):
        return
    init_from_lib.check_step(c.teacher_step, "distill.teacher_step")
    if not c.temperature > 0:
        raise ValueError(f"distill.temperature={c.temperature} must be > 0")
    weights = {k: c[k] for k in ("hard_weight", "kd_weight", "affinity_weight",
                                 "cosine_weight", "hidden_weight")}
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"distill.{key}={value} must be >= 0 (0 = the term is off)")
    if not any(weights.values()):
        raise ValueError("distill: every weight is 0; at least one term must be on")
    if not 0.0 <= c.gate_target < 1.0:
        raise ValueError(f"distill.gate_target={c.gate_target} must be in [0, 1) (the "
                         "fraction of gated parameters removed; 0 = off)")
    for key in ("gate_quadratic", "gate_lr", "gate_lagrange_lr"):
        if c[key] < 0:
            raise ValueError(f"distill.{key}={c[key]} must be >= 0")
    if c.gate_warmup_steps < 0:
        raise ValueError(f"distill.gate_warmup_steps={c.gate_warmup_steps} must be >= 0")
    if isinstance(c.stages, str) or not all(isinstance(s, str) for s in c.stages):
        raise ValueError(f"distill.stages={c.stages!r} must be a tuple of 'key=value;...' "
                         "strings, one per intermediate model")


def _teacher_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"distill.teacher={workdir!r}: {path} does not exist (expected a "
                         "flaxlab workdir: a trained run or a train.convert output)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Distillation:
    """`config.distill` bound to one run (inactive when no teacher is given). The trainer
    calls, unconditionally: wrap_task(task), frozen() (the teacher's variables for
    TrainState.frozen; {} when off)."""

    def __init__(self, config, data):
        self.cfg, self.config, self.data = config.distill, config, data
        self.enabled = enabled(self.cfg)
        self._frozen = {}
        if not self.enabled:
            return
        saved = _teacher_config(self.cfg.teacher)
        task_name = saved.get("task", {}).get("name")
        if task_name != config.task.name:
            raise ValueError(f"distill.teacher={self.cfg.teacher!r} is a {task_name!r} run; "
                             f"this run's task is {config.task.name!r} (a teacher must solve "
                             "the same task)")
        model_cfg = ml_collections.ConfigDict(saved["model"])
        self.teacher_model, _ = families.build(model_cfg, config.task.name, **data.info)
        params, model_state, step = init_from_lib.load_variables(self.cfg.teacher,
                                                                 self.cfg.teacher_step)
        self._frozen = {"params": params, "model_state": model_state}
        logging.info("distill: teacher %s step %d (%s/%s), T=%g, weights hard %g, kd %g, "
                     "affinity %g", self.cfg.teacher, step, model_cfg.family,
                     model_cfg.get("variant", "?"), self.cfg.temperature,
                     self.cfg.hard_weight, self.cfg.kd_weight, self.cfg.affinity_weight)

    def wrap_task(self, task: Task) -> Task:
        if not self.enabled:
            return task
        if not task.has_predict():
            raise ValueError(f"distill: task {task.name!r} cannot be distilled (it has no "
                             "predict/metrics_of split); distillable: lm, mlm, classify, "
                             "seq2seq, contrastive")
        teacher_task = type(task)(self.config, self.teacher_model, self.data)
        task.capture_hidden = teacher_task.capture_hidden = bool(
            self.cfg.cosine_weight or self.cfg.hidden_weight)
        return DistilledTask(task, teacher_task, self.cfg)

    def frozen(self):
        """The teacher's {"params", "model_state"} (host arrays; the trainer places them)."""
        return self._frozen


class DistilledTask(Task):
    """The student task with the distillation terms added to its training loss; every
    other hook (evaluation included) is the student task's own."""

    needs_frozen = True

    def __init__(self, task: Task, teacher_task: Task, cfg):
        self.inner, self.teacher_task, self.cfg = task, teacher_task, cfg
        self.name, self.default_evals = task.name, task.default_evals
        self.config, self.model, self.data = task.config, task.model, task.data
        self.needs_step = task.needs_step or cfg.gate_target > 0

    def init_args(self, batch):
        return self.inner.init_args(batch)

    def predict(self, params, model_state, batch, rng, train):
        return self.inner.predict(params, model_state, batch, rng, train)

    def metrics_of(self, outputs, batch):
        return self.inner.metrics_of(outputs, batch)

    def derived_metrics(self, means):
        return self.inner.derived_metrics(means)

    def report(self, params, model_state, workdir):
        return self.inner.report(params, model_state, workdir)

    def model_params(self, params):
        return self.inner.model_params(params)

    def after_evaluation(self, step, params, model_state, workdir):
        return self.inner.after_evaluation(step, params, model_state, workdir)

    def _hidden_terms(self, params, out, teacher, batch, metrics):
        """cosine_weight * (1 - cos) + hidden_weight * MSE of the last hidden states, over
        every real token (as DistilBERT: not only MLM's selected positions)."""
        c = self.cfg
        if "hidden" not in out:
            raise ValueError(f"distill.cosine_weight / hidden_weight need hidden states; "
                             f"task {self.name!r} gives none (lm and mlm do)")
        hidden, target = out["hidden"], teacher["hidden"]
        tokens = common.example_weights(batch, hidden.shape[0]).reshape(
            (-1,) + (1,) * (hidden.ndim - 2)) * jnp.ones(hidden.shape[:-1])
        total = 0.0
        if c.cosine_weight:
            if hidden.shape != target.shape:
                raise ValueError(f"distill.cosine_weight compares hidden states of equal "
                                 f"width: the student's are {hidden.shape}, the teacher's "
                                 f"{target.shape} (distill.hidden_weight with "
                                 "model.hint_dim handles other widths)")
            cos, metrics["distill_cosine"] = distill_losses.cosine_loss(hidden, target,
                                                                        tokens)
            total = total + c.cosine_weight * cos
        if c.hidden_weight:
            hint = _hint_params(params)
            if hint is not None:  # FitNets' regressor, trained by this term only
                hidden = hidden @ hint["kernel"] + hint["bias"]
            if hidden.shape != target.shape:
                raise ValueError(f"distill.hidden_weight: the student's hidden states "
                                 f"{out['hidden'].shape} do not match the teacher's "
                                 f"{target.shape}; set model.hint_dim={target.shape[-1]} "
                                 "(a learned projection to the teacher's width)")
            mse, metrics["distill_hidden"] = distill_losses.hidden_mse_loss(hidden, target,
                                                                            tokens)
            total = total + c.hidden_weight * mse
        return total

    def make_optimizer(self, optim_cfg, num_steps: int):
        c = self.cfg
        if c.gate_target > 0:
            optim_cfg = copy.deepcopy(optim_cfg)
            optim_cfg.layer_lr = ((gates.PARAM, c.gate_lr), (gates.LAGRANGE, c.gate_lagrange_lr)
                                  ) + tuple(optim_cfg.layer_lr)
        return self.inner.make_optimizer(optim_cfg, num_steps)

    def _target(self, step):
        c = self.cfg
        if not c.gate_warmup_steps:
            return c.gate_target
        return c.gate_target * jnp.minimum(1.0, step / c.gate_warmup_steps)

    def loss_fn(self, params, model_state, batch, rng, train, frozen=None, **step_kwargs):
        step = step_kwargs.pop("step", None) if not self.inner.needs_step else \
            step_kwargs.get("step")
        if not train or not frozen:
            return self.inner.loss_fn(params, model_state, batch, rng, train, **step_kwargs)
        c = self.cfg
        out, model_state = self.inner.predict(params, model_state, batch, rng, True)
        hard, metrics = self.inner.metrics_of(out, batch)
        teacher, _ = self.teacher_task.predict(frozen["params"], frozen["model_state"], batch,
                                               rng, False)
        teacher = jax.lax.stop_gradient(teacher)
        loss = c.hard_weight * hard + self.inner.model_losses(out, metrics)  # MoE terms
        if "logits" in out:
            if out["logits"].shape != teacher["logits"].shape:
                raise ValueError(f"distill: the student's logits {out['logits'].shape} and "
                                 f"the teacher's {teacher['logits'].shape} differ (a teacher "
                                 "needs the same vocabulary / classes)")
            if c.kd_weight:
                kd, metrics["distill_kd"] = distill_losses.kd_loss(
                    out["logits"], teacher["logits"], c.temperature, out["weights"])
                loss = loss + c.kd_weight * kd
        if c.cosine_weight or c.hidden_weight:
            loss = loss + self._hidden_terms(params, out, teacher, batch, metrics)
        if "image" in out and c.affinity_weight:
            aff, metrics["distill_affinity"] = distill_losses.affinity_loss(
                out["image"], out["text"], out["logit_scale"], teacher["image"],
                teacher["text"], teacher["logit_scale"], out["weights"])
            loss = loss + c.affinity_weight * aff
        if c.gate_target > 0:
            penalty, values = distill_losses.gate_penalty(params, self._target(step),
                                                          c.gate_quadratic)
            loss = loss + penalty
            one = jnp.ones((), jnp.float32)
            metrics.update({k: (v, one) for k, v in values.items()})
            metrics["gate_target"] = (self._target(step) * one, one)
        return loss, (metrics, model_state)


def _hint_params(params):
    """The hint regressor's {"kernel", "bias"} of the model's stack, or None."""
    key = transformer.stack_name(params)
    return params[key].get(transformer.HINT) if key else None
