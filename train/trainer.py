"""The one training loop: config -> trained, evaluated, checkpointed, resumable run.

    summary = train_and_evaluate(config, workdir)

Sections below: workdir, mesh, input, model + task, state, steps, checkpoint, loop, final.
Determinism: params come from `seed`, the batch of step s is `data.batch(s)` (augmented on
device by the step's key), the dropout key of step s is fold_in(key, s) -- so a run resumed
from step s computes exactly what an uninterrupted run computes (checked to the bit on CPU).

Nothing is written to the workdir until the run has validated its config, built its
data (every split), model and state, restored its checkpoint and checked its metric
names (train/workdir.py: the lock, the resume policy, the commit); a start that fails
before that leaves the workdir as it was. User errors are train.errors.FlaxlabError
subclasses (a ValueError before the commit is a ConfigError).

Multi-process runs (train/distributed.py) run this same loop in every process: each builds
only its rows of every batch, process 0 alone writes the workdir's files (the others write
theirs into a scratch directory that is deleted at the end), every process writes its
shards of each checkpoint, and a preemption stops all of them at one agreed step.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax.core import meta as flax_meta
from jax.sharding import NamedSharding, PartitionSpec as P

from train import checkpoint as ckpt_lib
from train import compression as compression_lib
from train import distill as distill_lib
from train import config as config_lib
from train import evaluators as evaluators_lib
from train import distributed, families, optim, sharding
from train import workdir as workdir_lib
from train.data import augment as augment_lib
from train.errors import ConfigError, FlaxlabError, NonFiniteError
from train.metrics_log import MetricsLog, plot_loss_curve, write_json
from train.preemption import PreemptionGuard
from train.run_data import RunData
from train.state import TrainState
from train.tasks import common, get_task_class, make_task


class NonFiniteLossError(NonFiniteError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


class NonFiniteMetricError(NonFiniteError):
    """An evaluation metric is NaN/Inf; the run stops, the last good checkpoint is kept."""


def _param_count_and_bytes(params) -> tuple[int, int]:
    leaves = jax.tree.leaves(params)
    return (int(sum(x.size for x in leaves)),
            int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)))


def make_init_state(model, tx, init_key, init_args, init_kwargs):
    """() -> TrainState before step 0: the model's variables from init_key, tx's state.

    Non-parameter collections (batch_stats, ...) become model_state; sown intermediates
    are dropped; logical-axis boxes (nn.with_logical_partitioning) are removed, so the
    state holds plain arrays (their names drive the shardings, train/sharding.py).
    """
    def init_state():
        variables = dict(flax_meta.unbox(model.init({"params": init_key, "dropout": init_key},
                                               *init_args, **init_kwargs)))
        params = variables.pop("params")
        variables.pop("intermediates", None)
        return TrainState.create(params, tx.init(params), variables)
    return init_state


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int | None = None,
                       restart_from_step: int | str | None = None,
                       on_evaluation=None) -> dict:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); return the summary.

    stop_after_steps: stop (with a checkpoint) after this many steps of *this* invocation,
      as a preemption would; used by tests to prove resume == uninterrupted.
    restart_from_step: continue the workdir's run from this checkpoint step ("latest":
      the newest intact one) under `config` although its identity keys differ (a new
      lineage; train/workdir.py), e.g. with a lower learning rate after a NaN.
    on_evaluation: on_evaluation(step, {"validation/<metric>": value}) after each validation
      pass before the end; a true result stops the run there (checkpointed) with status
      "pruned": train/search.py's pruning. Staged runs (distill.stages) ignore it.

    Raises train.errors.FlaxlabError subclasses for what the user can fix (config,
    workdir, checkpoint, non-finite values); summary["status"] is "preempted" after a
    SIGTERM/SIGINT (checkpointed; the same call resumes).
    """
    try:
        config = config_lib.with_seed_in_paths(config)   # "runs/seeds/gpt/seed={seed}"
        config_lib.validate(config)
        if config.distill.stages:  # progressive distillation: one run per stage
            from train import stages  # noqa: PLC0415

            stages.stage_configs(config, workdir)  # every stage checked before any runs
            if restart_from_step is not None:
                raise ValueError("--restart_from_step applies to one run; rerun the stage's "
                                 "own workdir (<workdir>/stage_<i>) with it")
    except ValueError as e:
        raise (e if isinstance(e, FlaxlabError) else ConfigError(str(e))) from e
    if config.distill.stages:
        return stages.run(config, workdir, stop_after_steps)
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    with workdir_lib.Workdir(workdir, primary=distributed.is_primary()) as wd:
        defaults = config_lib.base_config(config.task.name, config.model.variant,
                                          config.model.family)
        changed = wd.check_resume(current, restart_from_step,
                                  json.loads(defaults.to_json_best_effort(sort_keys=True)))
        mesh = sharding.mesh_from_config(config.sharding)
        try:
            # Every jitted model call traces inside the rules: the models' activation
            # constraints (logical axis names) map onto this mesh (config.sharding.rules).
            with sharding.use_rules(mesh, config.sharding):
                return _train_and_evaluate(config, wd, current, mesh, stop_after_steps,
                                           _Restart(restart_from_step, changed),
                                           on_evaluation)
        except (ValueError, FileNotFoundError) as e:
            if wd.committed or isinstance(e, FlaxlabError):
                raise
            # Before the commit every check is of the user's input (a split fraction, a
            # sequence longer than max_length, an init_from path, a dataset name).
            raise ConfigError(str(e)) from e


class _Restart:
    """--restart_from_step: which step (None: no restart) and the identity keys changed."""

    def __init__(self, step: int | str | None, changed: list[str]):
        self.step, self.changed = step, changed


def _train_and_evaluate(config, wd: workdir_lib.Workdir, current: dict, mesh,
                        stop_after_steps: int | None, restart: _Restart,
                        on_evaluation=None) -> dict:
    # Where this process writes the run's files: the workdir in process 0, a scratch
    # directory (deleted at the end) in the others. Checkpoints go to the workdir from all.
    workdir = wd.path if wd.primary else tempfile.mkdtemp(
        prefix=f"flaxlab-process-{jax.process_index()}-")
    try:
        return _run(config, wd, workdir, current, mesh, stop_after_steps, restart,
                    on_evaluation)
    finally:
        if not wd.primary:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(config, wd: workdir_lib.Workdir, workdir: str, current: dict, mesh,
         stop_after_steps: int | None, restart: _Restart, on_evaluation=None) -> dict:
    t_cfg, num_steps = config.train, config.train.num_steps
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    # The rows of every training / evaluation batch this process gathers (all of them in
    # a single process), and the global arrays assembled from them.
    rows = sharding.process_rows(mesh, config.data.batch_size)
    eval_rows = sharding.process_rows(mesh, config.data.eval_batch_size)

    def train_batch(step: int):
        return sharding.shard_batch(train_ds.batch(step, rows), mesh, config.data.batch_size)

    # ---- Input, model and task ------------------------------------------------------------
    data = RunData(config.data, config.seed)
    train_ds = data.train
    for split in ("validation", "test"):  # every split now: a bad one fails before writing
        data[split]
    compression = compression_lib.Compression(config.compress, num_steps,
                                              init_from=config.init_from)
    model, _ = families.build(config.model, config.task.name, **data.info,
                              **compression.model_code(for_export=False))
    distillation = distill_lib.Distillation(config, data)
    task = compression.wrap_task(distillation.wrap_task(make_task(config, model, data)))
    base_tx = task.make_optimizer(config.optim, optim.schedule_steps(config.optim, num_steps))
    tx = compression.wrap_optimizer(base_tx)

    # ---- Checkpoint ---------------------------------------------------------------------
    ck = config.checkpoint
    ckpt = ckpt_lib.Checkpointer(wd.file("checkpoints"), save_every=ck.every,
                                 keep=ck.keep, best_metric=ck.best_metric or None,
                                 best_mode=ck.best_mode)

    # ---- State --------------------------------------------------------------------------
    init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    example = train_ds.batch(0, slice(0, 1))
    init_args, init_kwargs = task.init_args(example)
    plain_init = make_init_state(model, base_tx, init_key, init_args, init_kwargs)
    init_state, init_inputs = compression.initial_state(
        make_init_state(model, tx, init_key, init_args, init_kwargs), plain_init, base_tx,
        tx, init_key, resuming=ckpt.latest_step() is not None)
    abstract_state = jax.eval_shape(init_state, *init_inputs)
    # Logical axis names of the params (nn.with_logical_partitioning boxes) -> shardings of
    # every state leaf that mirrors a param; the shape rule for the rest.
    logical_params = jax.eval_shape(lambda: model.init(
        {"params": init_key, "dropout": init_key}, *init_args, **init_kwargs))["params"]
    state_sh = sharding.state_sharding(abstract_state, mesh, config.sharding, logical_params)
    state = jax.jit(init_state, out_shardings=state_sh)(*init_inputs)
    # A distillation teacher's variables, replicated ({} without one).
    frozen_sh = jax.tree.map(lambda _: replicated, distillation.frozen())
    state_sh = state_sh.replace(frozen=frozen_sh)
    state = state.replace(frozen=jax.device_put(distillation.frozen(), frozen_sh))
    n_params, n_bytes = _param_count_and_bytes(state.params)
    logging.info("model %s/%s for %s: %d parameters, %.2f MB", config.model.family,
                 config.model.variant, config.task.name, n_params, n_bytes / 1e6)

    # ---- Steps --------------------------------------------------------------------------
    # config.data.<source>.augment runs inside the jitted step (off: the task's own step).
    augmenter = augment_lib.for_run(config.data, get_task_class(config.task.name).augment_keys,
                                    data.info)
    train_step = augment_lib.wrap_train_step(task.make_train_step(tx, train_key, config.optim),
                                             augmenter, train_key)
    p_train_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, replicated), donate_argnums=0)

    def make_eval_step(loss_task):
        def eval_step(params, model_state, batch, rng):
            return loss_task.loss_fn(params, model_state, batch, rng, False)[1][0]
        return jax.jit(eval_step, out_shardings=replicated)  # inputs arrive sharded
    p_eval_step = make_eval_step(task)

    def evaluate(split: str, params, model_state, *, step_fn=None, key=None,
                 max_batches: int = 0) -> dict:
        """{metric: mean} of `params` on `split` through `step_fn` (default: the task's
        loss); batch i gets the PRNG key fold_in(key or eval_key, i)."""
        step_fn, key = step_fn or p_eval_step, eval_key if key is None else key
        totals = None
        size = config.data.eval_batch_size
        for i, batch in enumerate(data[split].eval_batches(size, eval_rows)):
            if max_batches and i >= max_batches:
                break
            sums = step_fn(params, model_state, sharding.shard_batch(batch, mesh, size),
                           jax.random.fold_in(key, i))
            totals = common.add_metrics(totals, sums)
        means = common.finalize(jax.device_get(totals))
        means.update(task.derived_metrics(means))
        return means

    def evaluate_state(split: str, max_batches: int = 0) -> dict:
        means = evaluate(split, state.params, state.model_state, max_batches=max_batches)
        return {f"{split}/{k}": v for k, v in means.items()}

    # Evaluators apply the model to model-form params (a compressed run's adapted ones)
    # through the task without its training-time transform.
    inner_task = compression_lib.uncompressed_task(task)
    p_model_eval_step = p_eval_step if inner_task is task else make_eval_step(inner_task)

    def init_variables():
        plain = jax.jit(plain_init)()
        return plain.params, plain.model_state
    ctx = evaluators_lib.EvalContext(
        config=config, model=model, task=task, data=data, workdir=workdir,
        evaluate=functools.partial(evaluate, step_fn=p_model_eval_step),
        init_variables=init_variables, eval_key=eval_key)
    evaluators = evaluators_lib.make_evaluators(config.evals, ctx)

    def run_evaluators(step: int, final: bool) -> dict:
        """Evaluators due after `step` (all enabled ones when final): their metrics."""
        out = {}
        params = task.model_params(state.params)
        for ev in evaluators:
            if final or ev.due(step, num_steps):
                metrics = ev.run(step, params, state.model_state, final)
                numbers = {k: v for k, v in metrics.items() if not isinstance(v, str)}
                if numbers:
                    log.write(step, ev.name, numbers)
                out.update({f"{ev.name}/{k}": v for k, v in metrics.items()})
        return out

    def check_finite(step: int) -> None:
        bad = int(state.nonfinite_step)
        if bad >= 0:
            ckpt.wait_until_finished()  # the steps being written count as good
            latest = ckpt.latest_step()
            raise NonFiniteLossError(
                f"loss or gradients became NaN/Inf at step {bad} (detected at step {step}); "
                f"no checkpoint was written after it, the last good one is step {latest}. "
                "Lower optim.learning_rate, set optim.grad_clip_norm or use "
                "model.dtype=float32, and continue from it with the same command plus "
                f"--restart_from_step={latest}" if latest is not None else
                f"loss or gradients became NaN/Inf at step {bad} (detected at step {step}), "
                "before any checkpoint. Lower optim.learning_rate, set optim.grad_clip_norm "
                "or use model.dtype=float32 (the same --workdir is fine)")

    def check_finite_metrics(step: int, metrics: dict) -> None:
        bad = sorted(k for k, v in metrics.items()
                     if isinstance(v, (int, float, np.number)) and not np.isfinite(v))
        if bad:
            ckpt.wait_until_finished()
            raise NonFiniteMetricError(
                f"evaluation metric {', '.join(f'{k}={metrics[k]}' for k in bad)} at step "
                f"{step}; the run stops, no checkpoint was written after it (last good: "
                f"step {ckpt.latest_step()}). Evaluate in float32 (model.dtype=float32) or "
                "lower optim.learning_rate")

    # ---- Resume ---------------------------------------------------------------------------
    es = t_cfg.early_stopping
    meta = {"best_value": None, "bad_evals": 0, "stopped_early": False}
    wanted = _wanted_step(restart, ck.restore_step, ckpt)
    corrupt = []
    if ckpt.all_steps():
        restored, meta, from_step, skipped = ckpt.restore_newest_intact(state.to_dict(),
                                                                        step=wanted)
        for bad_step, why in skipped:
            logging.warning("%s; resuming from step %d instead", why, from_step)
        corrupt = [bad_step for bad_step, _ in skipped]
        state = TrainState.from_dict(restored, frozen=state.frozen)
        logging.info("resumed from step %d in %s", from_step, ckpt.directory)
        if from_step > num_steps:
            raise ConfigError(f"train.num_steps={num_steps} is below step {from_step} of "
                              f"the checkpoint in {ckpt.directory}: a run can be extended, "
                              "not shortened")
    check_metric_names(config, task, data, p_eval_step, state, eval_key, eval_rows)
    if distillation.enabled:  # the teacher's fit to the student is checked while tracing
        jax.eval_shape(p_train_step, state, train_batch(0))

    # ---- Commit: from here on the run writes to its workdir --------------------------------
    wd.commit(current, resume_step=int(state.step), corrupt_steps=corrupt,
              restart=None if restart.step is None else
              {"after_step": int(state.step), "changed": restart.changed})
    ckpt.reload()

    def save(step: int, metrics: dict | None = None, force: bool = False) -> None:
        check_finite(step)
        ranking = metrics if metrics and ck.best_metric in metrics else None
        ckpt.save(step, state.to_dict(), meta, metrics=ranking, force=force)

    # ---- Loop ---------------------------------------------------------------------------
    log = MetricsLog(workdir, num_steps)
    start = int(state.step)
    # Throughput counts training steps only: the clock starts after compilation (the first
    # step of this invocation) and pauses for evaluations and checkpoints.
    timer = _StepTimer()
    status, step, pruned = "finished", start, False
    try:
        with PreemptionGuard(multi_process=distributed.is_multi_process()) as guard:
            while step < num_steps and not meta["stopped_early"]:
                state, scalars = p_train_step(state, train_batch(step))
                step += 1
                if step == start + 1:
                    jax.block_until_ready(scalars)
                else:
                    timer.steps += 1
                if step % t_cfg.log_every == 0 or step == num_steps:
                    scalars = jax.device_get(scalars)  # waits for the step
                    timer.pause()
                    check_finite(step)
                    scalars["learning_rate"] = optim.current_learning_rate(
                        config.optim, num_steps, step - 1)
                    log.write(step, "train", scalars)
                    log.progress(step, float(scalars["loss"]), timer.rate())
                eval_metrics = None
                if step % t_cfg.eval_every == 0 and step < num_steps:
                    timer.pause(scalars)
                    check_finite(step)
                    eval_metrics = evaluate_state("validation", t_cfg.eval_max_batches)
                    log.write(step, "validation", _strip(eval_metrics, "validation/"))
                    check_finite_metrics(step, eval_metrics)
                    _update_early_stopping(meta, eval_metrics, es)
                    pruned = bool(on_evaluation and on_evaluation(step, eval_metrics))
                    task.after_evaluation(step, task.model_params(state.params),
                                          state.model_state, workdir)
                if any(ev.due(step, num_steps) for ev in evaluators):
                    timer.pause(scalars)
                    check_finite(step)
                    run_evaluators(step, final=False)
                interrupted = guard.stop_at(step) or pruned or (
                    stop_after_steps is not None and step - start >= stop_after_steps)
                force = interrupted or bool(meta["stopped_early"])
                # The last step is saved after the final evaluation.
                if step < num_steps and (force or ckpt.should_save(step)):
                    timer.pause(scalars)
                    save(step, eval_metrics, force=force)
                timer.resume()
                if interrupted and step < num_steps:
                    status = ("preempted" if guard.requested else "pruned" if pruned
                              else "stopped")
                    break
        if status != "finished":
            logging.info("stopped at step %d (%s); run the same command to resume", step,
                         status)
            return {"status": status, "step": step}

        # ---- Final evaluation -------------------------------------------------------------
        check_finite(step)
        final = {**evaluate_state("validation"), **evaluate_state("test")}
        for split in ("validation", "test"):
            log.write(step, split, _strip(final, f"{split}/"))
        check_finite_metrics(step, final)
        save(step, final, force=True)
        final.update(compression_lib.evaluate_export(
            compression, config, state.params, state.model_state, data, evaluate))
        final.update(run_evaluators(step, final=True))
    finally:
        # Whatever happens (NaN, Ctrl-C, a bug), pending checkpoint writes complete.
        ckpt.wait_until_finished()
        ckpt.close()
        log.close()

    report = task.report(state.params, state.model_state, workdir)
    steps_per_second = timer.rate() or float("nan")
    summary = {
        **{k: v for k, v in final.items() if not isinstance(v, str)},
        **{k: v for k, v in report.items() if not isinstance(v, str)},
        "train/steps": step,
        "train/stopped_early": bool(meta["stopped_early"]),
        "train/steps_per_second": steps_per_second,
        "train/examples_per_second": steps_per_second * config.data.batch_size,
        "params/count": n_params,
        "params/bytes": n_bytes,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_loss_curve(workdir)
    summary.update({k: v for k, v in {**final, **report}.items() if isinstance(v, str)})
    return summary


def _wanted_step(restart: _Restart, restore_step: int, ckpt) -> int | None:
    """The checkpoint step to restore exactly, or None for the newest intact one."""
    if restart.step is None:
        return restore_step or None
    if restart.step == "latest":
        return None
    try:
        return int(restart.step)
    except ValueError:
        raise ConfigError(f"--restart_from_step={restart.step!r} must be a step number or "
                          f"'latest'; steps here: {ckpt.all_steps()}") from None


def check_metric_names(config, task, data, eval_step, state, eval_key,
                       rows: slice | None = None) -> None:
    """ConfigError unless checkpoint.best_metric and (when on) early_stopping.metric are
    metrics a validation pass produces: traced (jax.eval_shape) on this process's `rows`
    of a batch, nothing compiles."""
    ck, es = config.checkpoint, config.train.early_stopping
    wanted = [(key, name) for key, name, on in (
        ("checkpoint.best_metric", ck.best_metric, bool(ck.best_metric)),
        ("train.early_stopping.metric", es.metric, es.patience > 0)) if on]
    if not wanted:
        return
    batch = next(iter(data["validation"].eval_batches(config.data.eval_batch_size, rows)))
    shapes = jax.eval_shape(eval_step, state.params, state.model_state, batch, eval_key)
    names = set(shapes) | set(task.derived_metrics({k: 1.0 for k in shapes}))
    allowed = sorted(f"validation/{k}" for k in names)
    for key, name in wanted:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}={name!r} is not a metric of this run; {hint}allowed: "
                              f"{', '.join(allowed)}")


class _StepTimer:
    """Seconds spent in training steps only (pause() around evals and checkpoints)."""

    def __init__(self):
        self.steps, self.seconds, self._t0 = 0, 0.0, None

    def resume(self):
        """Start the clock unless it is running."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def pause(self, pending=None):
        """Stop the clock once `pending` (the last step's outputs) is computed."""
        jax.block_until_ready(pending)
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def _strip(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def _update_early_stopping(meta: dict, metrics: dict, es) -> None:
    """Count evaluations without an improvement larger than min_delta; stop at patience."""
    if not es.patience or es.metric not in metrics:
        return
    value = metrics[es.metric]
    best = meta["best_value"]
    improved = best is None or (value < best - es.min_delta if es.mode == "min"
                                else value > best + es.min_delta)
    if improved:
        meta["best_value"], meta["bad_evals"] = float(value), 0
    else:
        meta["bad_evals"] += 1
        if meta["bad_evals"] >= es.patience:
            meta["stopped_early"] = True
            logging.info("early stopping: %s did not improve on %.5f for %d evaluations",
                         es.metric, best, es.patience)
