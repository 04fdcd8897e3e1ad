"""The one training loop: config -> trained, evaluated, checkpointed, resumable run.

    summary = train_and_evaluate(config, workdir)

Sections below: workdir, mesh, input, model + task, state, steps, checkpoint, loop, final.
Determinism: params come from `seed`, the batch of step s is `data.batch(s)` and the
dropout key of step s is fold_in(key, s) -- so a run resumed from step s computes exactly
what an uninterrupted run computes (the test suite checks it to the bit on CPU).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from train import checkpoint as ckpt_lib
from train import compression as compression_lib
from train import config as config_lib
from train import data as data_lib
from train import optim, sharding
from train.metrics_log import MetricsLog, plot_loss_curve, write_json
from train import families
from train.tasks import common, make_task


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


def _check_workdir_config(config, workdir: str) -> None:
    """Write config.json, or refuse to resume a workdir made by a different config."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        diffs = config_differences(saved, current)
        if diffs:
            raise ValueError(
                f"{workdir} holds a run with a different config (keys differ: "
                f"{', '.join(diffs)}). Resuming would not reproduce either run; use a new "
                "--workdir, or the same config.")
    write_json(path, current)


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (JSON) configs, sorted."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(prefix + key)
    return diffs


def _param_count_and_bytes(params) -> tuple[int, int]:
    leaves = jax.tree.leaves(params)
    return (int(sum(x.size for x in leaves)),
            int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)))


def make_init_state(model, tx, init_key, init_args, init_kwargs):
    """() -> train state {"step", "params", "opt_state", "model_state", "nonfinite_step"}.

    model_state holds non-parameter collections (e.g. batch_stats); nonfinite_step is the
    first step whose loss or gradients were NaN/Inf (-1: none), checked on the host.
    """
    def init_state():
        variables = dict(model.init({"params": init_key, "dropout": init_key},
                                    *init_args, **init_kwargs))
        params = variables.pop("params")
        variables.pop("intermediates", None)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params), "model_state": variables,
                "nonfinite_step": jnp.full((), -1, jnp.int32)}
    return init_state


def make_train_step(task, tx, train_key, optim_cfg):
    """(state, batch) -> (state, scalars): loss, gradients, optimizer update.

    The dropout key of step s is fold_in(train_key, s), so any step can be recomputed
    from a checkpoint. Scalars: the task's metric means plus objective and grad_norm.
    """
    o = optim_cfg

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(train_key, step)

        # Tasks whose objective depends on the step (e.g. a KL warm-up) ask for it.
        step_kwargs = {"step": step} if getattr(task, "needs_step", False) else {}

        def loss_of(params):
            loss, (metrics, model_state) = task.loss_fn(params, state["model_state"], batch,
                                                        rng, True, **step_kwargs)
            if o.l1 or o.l2:
                loss = loss + optim.regularization_penalty(params, o.l1, o.l2,
                                                           o.weight_decay_exclude)
            return loss, (metrics, model_state)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        first_bad = jnp.where((state["nonfinite_step"] < 0) & ~finite, step,
                              state["nonfinite_step"])
        new_state = {"step": step + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "model_state": model_state,
                     "nonfinite_step": first_bad}
        scalars = {k: s / jnp.maximum(w, 1.0) for k, (s, w) in metrics.items()}
        return new_state, {**scalars, "objective": loss, "grad_norm": grad_norm}
    return train_step


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int | None = None) -> dict:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); return the summary.

    stop_after_steps: stop (with a checkpoint) after this many steps of *this* invocation,
      as a preemption would; used by tests to prove resume == uninterrupted.
    """
    # ---- Workdir and config -------------------------------------------------------------
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(config, workdir)
    t_cfg, num_steps = config.train, config.train.num_steps

    # ---- Mesh ---------------------------------------------------------------------------
    mesh = sharding.mesh_from_config(config.sharding)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    # ---- Input ----------------------------------------------------------------------------
    datasets = {split: data_lib.make_dataset(config.data, split, config.seed)
                for split in data_lib.SPLITS}
    train_ds = datasets["train"]

    # ---- Model and task -----------------------------------------------------------------
    compression = compression_lib.Compression(config.compress, num_steps)
    model, model_cfg = families.build(config.model, config.task.name, **train_ds.data_info(),
                                      **compression.model_code(for_export=False))
    task = compression.wrap_task(make_task(config, model, datasets))
    # A task with several parameter groups updated in phases (a GAN) brings its own
    # optimizer and train step; every other task uses the generic ones below.
    make_tx = getattr(task, "make_optimizer", optim.make_optimizer)
    base_tx = make_tx(config.optim, max(num_steps, 1))  # 0 steps: evaluate only
    tx = compression.wrap_optimizer(base_tx)

    # ---- Checkpoint ---------------------------------------------------------------------
    ck = config.checkpoint
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=ck.every,
                                 keep=ck.keep, best_metric=ck.best_metric or None,
                                 best_mode=ck.best_mode)

    # ---- State --------------------------------------------------------------------------
    init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    example = jax.tree.map(lambda x: x[:1], train_ds.batch(0))
    init_args, init_kwargs = task.init_args(example)

    init_state = make_init_state(model, tx, init_key, init_args, init_kwargs)
    init_inputs = ()
    if compression.changes_initial_params:
        # Start from a trained run and/or pruned / adapted params (host side, eagerly).
        plain_init = make_init_state(model, base_tx, init_key, init_args, init_kwargs)
        init_state, init_inputs = _compressed_init_state(
            compression, plain_init, base_tx, tx, init_key,
            resuming=ckpt.latest_step() is not None)

    abstract_state = jax.eval_shape(init_state, *init_inputs)
    state_sh = sharding.param_sharding(abstract_state, mesh, config.sharding.strategy,
                                       config.sharding.min_size_to_shard)
    state = jax.jit(init_state, out_shardings=state_sh)(*init_inputs)
    n_params, n_bytes = _param_count_and_bytes(state["params"])
    logging.info("model %s/%s for %s: %d parameters, %.2f MB", config.model.family,
                 config.model.variant, config.task.name, n_params, n_bytes / 1e6)

    # ---- Steps --------------------------------------------------------------------------
    o = config.optim
    train_step = (task.make_train_step(tx, train_key, o) if hasattr(task, "make_train_step")
                  else make_train_step(task, tx, train_key, o))

    def eval_step(params, model_state, batch, rng):
        _, (metrics, _) = task.loss_fn(params, model_state, batch, rng, False)
        return metrics

    p_train_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, replicated), donate_argnums=0)
    p_eval_step = jax.jit(eval_step, out_shardings=replicated)  # inputs arrive sharded

    def evaluate(split: str, max_batches: int = 0, step_fn=None, params=None) -> dict:
        """Metrics of `params` (default: the state's) on `split` through `step_fn`."""
        step_fn = step_fn or p_eval_step
        params = state["params"] if params is None else params
        totals = None
        for i, batch in enumerate(datasets[split].eval_batches(config.data.eval_batch_size)):
            if max_batches and i >= max_batches:
                break
            sums = step_fn(params, state["model_state"], sharding.shard_batch(batch, mesh),
                           jax.random.fold_in(eval_key, i))
            totals = common.add_metrics(totals, sums)
        means = common.finalize(jax.device_get(totals))
        means.update(task.derived_metrics(means))
        return {f"{split}/{k}": v for k, v in means.items()}

    def check_finite(step: int) -> None:
        bad = int(state["nonfinite_step"])
        if bad >= 0:
            latest = ckpt.latest_step()
            raise NonFiniteLossError(
                f"loss or gradients became NaN/Inf at step {bad} (detected at step {step}); "
                f"training stopped and no checkpoint was written after it. The last good "
                f"checkpoint is step {latest} in {ckpt.directory}. Lower optim.learning_rate,"
                " set optim.grad_clip_norm, or use model.dtype=float32.")

    # ---- Resume ---------------------------------------------------------------------------
    es = t_cfg.early_stopping
    meta = {"best_value": None, "bad_evals": 0, "stopped_early": False}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        logging.info("resumed from step %d in %s", int(state["step"]), ckpt.directory)

    def save(step: int, metrics: dict | None = None, force: bool = False) -> None:
        check_finite(step)
        ranking = metrics if metrics and ck.best_metric in metrics else None
        ckpt.save(step, state, meta, metrics=ranking, force=force)

    # ---- Loop ---------------------------------------------------------------------------
    log = MetricsLog(workdir, num_steps)
    start = int(state["step"])
    # Throughput counts training steps only: the clock starts after compilation (the first
    # step of this invocation) and pauses for evaluations and checkpoints.
    timer = _StepTimer()
    status, step = "finished", start
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            while step < num_steps and not meta["stopped_early"]:
                batch = sharding.shard_batch(train_ds.batch(step), mesh)
                state, scalars = p_train_step(state, batch)
                step += 1
                if step == start + 1:
                    jax.block_until_ready(scalars)
                else:
                    timer.steps += 1
                if step % t_cfg.log_every == 0 or step == num_steps:
                    scalars = jax.device_get(scalars)  # waits for the step
                    timer.pause()
                    check_finite(step)
                    scalars["learning_rate"] = optim.current_learning_rate(o, num_steps,
                                                                           step - 1)
                    log.write(step, "train", scalars)
                    log.progress(step, float(scalars["loss"]), timer.rate())
                eval_metrics = None
                if step % t_cfg.eval_every == 0 and step < num_steps:
                    timer.pause(scalars)
                    check_finite(step)
                    eval_metrics = evaluate("validation", t_cfg.eval_max_batches)
                    log.write(step, "validation", _strip(eval_metrics, "validation/"))
                    _update_early_stopping(meta, eval_metrics, es)
                    if hasattr(task, "after_evaluation"):  # e.g. a GAN's sample grid
                        task.after_evaluation(step, state["params"], state["model_state"],
                                              workdir)
                interrupted = guard.requested or (
                    stop_after_steps is not None and step - start >= stop_after_steps)
                force = interrupted or bool(meta["stopped_early"])
                # The last step is saved after the final evaluation.
                if step < num_steps and (force or ckpt.should_save(step)):
                    timer.pause(scalars)
                    save(step, eval_metrics, force=force)
                timer.resume()
                if interrupted and step < num_steps:
                    status = "preempted" if guard.requested else "stopped"
                    break
        if status != "finished":
            logging.info("stopped at step %d (%s); run the same command to resume", step,
                         status)
            return {"status": status, "step": step}

        # ---- Final evaluation -------------------------------------------------------------
        check_finite(step)
        final = {**evaluate("validation"), **evaluate("test")}
        save(step, final, force=True)
        for split in ("validation", "test"):
            log.write(step, split, _strip(final, f"{split}/"))
        if compression.enabled:  # the compressed form, evaluated through itself
            final.update(_evaluate_compressed(config, compression, state, datasets,
                                              train_ds, task, evaluate))
    finally:
        # Whatever happens (NaN, Ctrl-C, a bug), pending checkpoint writes complete.
        ckpt.wait_until_finished()
        ckpt.close()
        log.close()

    report = task.report(state["params"], state["model_state"], workdir)
    steps_per_second = timer.rate() or float("nan")
    summary = {
        **final,
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
    summary.update({k: v for k, v in report.items() if isinstance(v, str)})
    return summary


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


# ----------------------------------------------------------------------------------------
# Compression (config.compress): initial params and the evaluation of the compressed form.
# ----------------------------------------------------------------------------------------
def _compressed_init_state(compression, plain_init, base_tx, tx, init_key, resuming: bool):
    """(init_state(params, model_state, masks), its inputs) for a compressed start.

    The plain init gives the architecture; `compress.init_from` replaces its values with
    a trained run's (unless this run resumes from its own checkpoint); pruning and LoRA
    are applied on the host, then the state (optimizer included) is built around them.
    """
    plain = jax.jit(plain_init)()
    params, model_state = plain["params"], plain["model_state"]
    pretrained = None
    if compression.c.init_from and not resuming:
        loaded, loaded_state, step = compression_lib.load_trained_variables(
            compression.c.init_from)
        compression_lib.check_same_structure(loaded, params, f"params of "
                                             f"{compression.c.init_from} (step {step})")
        compression_lib.check_same_structure(loaded_state, model_state, "model state of "
                                             f"{compression.c.init_from}")
        pretrained = (jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype), params, loaded),
                      jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype), model_state,
                                   loaded_state))
        logging.info("params from %s (step %d)", compression.c.init_from, step)
    params, model_state, masks = compression.prepare(
        params, model_state, pretrained, jax.random.fold_in(init_key, 1))

    def compressed_init(params, model_state, masks):
        return {**plain, "params": params, "model_state": model_state,
                "opt_state": compression.init_opt_state(base_tx, tx, params, masks)}
    # Host copies: the jitted init places them with the state's shardings (any mesh).
    return compressed_init, jax.device_get((params, model_state, masks))


def _evaluate_compressed(config, compression, state, datasets, train_ds, task,
                         evaluate) -> dict:
    """summary entries of the exported (quantized / pruned / merged) model."""
    stored, decode, stats = compression.export(jax.device_get(state["params"]))
    inner = compression_lib.uncompressed_task(task)  # no training-time transform
    data_info = train_ds.data_info()
    code = compression.model_code(for_export=True)
    if config.compress.quantize.activations == "static":
        # Static activation ranges: a recording forward pass over a few training batches.
        params = decode(stored)

        def apply_fn(dot_general, batch):
            model, _ = families.build(config.model, config.task.name, **data_info,
                                      dot_general=dot_general)
            return make_task(config, model, datasets).loss_fn(
                params, state["model_state"], batch, jax.random.key(0), False)[0]
        calibration = compression_lib.calibrate_activations(apply_fn, train_ds,
                                                            config.compress.quantize)
        code = compression.model_code(for_export=True, calibration=calibration)
    if code:
        model, _ = families.build(config.model, config.task.name, **data_info, **code)
        inner = make_task(config, model, datasets)

    def compressed_eval_step(stored, model_state, batch, rng):
        _, (metrics, _) = inner.loss_fn(decode(stored), model_state, batch, rng, False)
        return metrics
    step_fn = jax.jit(compressed_eval_step)
    metrics = {**evaluate("validation", step_fn=step_fn, params=stored),
               **evaluate("test", step_fn=step_fn, params=stored)}
    logging.info("compressed model: %d bytes (%.1f%% of float32): %s", stats["bytes"],
                 100 * stats["fraction_of_float"],
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "loss" in k))
    return compression_lib.summary_entries(stats, metrics)
