"""Hyper-parameter search: sampled configurations instead of a grid, as ordinary sweep runs.

    python -m train.sweep --config=configs/gpt.py --workdir=DIR --search=tpe --trials=16 \
        [--space="optim.learning_rate=loguniform(1e-4,1e-2);model.num_layers=categorical(2,4)"] \
        [--search_seed=0] [--prune=median] [--seeds=K] [--sort=validation/loss] [--config.*]

The space is --space or, without it, `get_search_space(variant)` of the config file:
dimensions split by ';', each `key=kind(arguments)`:

  loguniform(low,high)   a float, uniform in log space (0 < low < high): rates, decays
  uniform(low,high)      a float, uniform
  int(low,high)          an integer, uniform in [low, high] (both included)
  categorical(a,b,...)   one of the values, each parsed like a --sweep value (the type of
                         the field it replaces; tuples as "(8,16)")

train/search_space.py: the dict form of get_search_space, and the checks that stop a bad
space before any trial.

Samplers (SAMPLERS), seeded by --search_seed:
  random  independent uniform draws (Bergstra & Bengio 2012)
  tpe     the Tree-structured Parzen Estimator (Bergstra et al. 2011), multivariate as
          Optuna 5's always is (Falkner et al. 2018)
  gp      Gaussian-process Bayesian optimization (Snoek et al. 2012): Optuna's GPSampler,
          Matern-5/2 kernel, log expected improvement (Ament et al. 2023); needs PyTorch
tpe and gp draw their first min(10, max(3, trials // 3)) trials at random (Optuna's 10 would
leave 6 of 16 trials to the model).

Every trial is one configuration: K = --seeds ordinary sweep runs in DIR/<run_name> (seed
= config seed + i, train/sweep_stats.py), and its value is the mean of --sort over them. So
results.csv, results.md and results.png are a sweep's (a `trial` column added; with K > 1
the grouped statistics first), and results.md ends with the search: the best trial, the
parameter importances (fANOVA: Hutter et al. 2014, Optuna's evaluator with --search_seed;
importances.png), history.png (each trial's value and the best so far). sweep.json holds
the space and every run's trial and status.

--prune=median: the median stopping rule (Golovin et al. 2017, Vizier; Optuna's
MedianPruner, its defaults): every validation pass during training reports the --sort value
(a validation/ metric) at its step, and once 5 trials have finished, a trial whose best
value so far is worse than the finished trials' median at that step stops there, with a
checkpoint, recorded as "pruned". With --seeds > 1 only a trial's first run reports; the
rest are skipped when it is pruned. It favours configurations that learn fast early:
long warm-ups are at a disadvantage.

DIR/study.db (Optuna's RDB storage on SQLite) holds the study: rerunning the same command
continues it to --trials in all. Finished, pruned and failed trials are read back, never
rerun (unlike a grid's failed runs: a NaN at a large learning rate is an answer too); a
trial that was interrupted (preempted, killed) is tried again with the same parameters, so
its run resumes from its checkpoint and it does not count twice. Trial i's
sampler is seeded from (--search_seed, i), so a resumed search proposes what an
uninterrupted one would. The space, --sort (and its direction) and --seeds are the study's
identity: other values on the same DIR are an error; the sampler and pruning may change.
One search process at a time per DIR. The exit status is 1 unless every trial finished or
was pruned.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import numpy as np
from absl import flags, logging

from train import errors, sweep, sweep_spec, sweep_stats
from train.metrics_log import write_json
from train.search_space import parse_space
from train.sweep_plots import plot_history, plot_importances

STUDY_NAME = "search"


def _import_optuna():
    """Optuna, quiet (this module logs the trials); one error line when it is missing."""
    try:
        optuna = importlib.import_module("optuna")
    except ImportError:
        raise ValueError("--search needs Optuna: pip install -e '.[research]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def startup_trials(trials: int) -> int:
    """Random trials before tpe / gp fit their model: a third of the budget, 3 to 10."""
    return min(10, max(3, trials // 3))


def _gp_sampler(optuna, seed: int, trials: int):
    for module in ("torch", "scipy"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--search=gp needs {module} (Optuna's GPSampler): pip install "
                             "-e '.[interop]' (PyTorch), or use --search=tpe")
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(trials))


# name -> (optuna, seed, trials) -> sampler
SAMPLERS = {
    "random": lambda optuna, seed, trials: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda optuna, seed, trials: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup_trials(trials)),
    "gp": _gp_sampler,
}
# name -> (optuna) -> pruner
PRUNERS = {
    "none": lambda optuna: optuna.pruners.NopPruner(),
    "median": lambda optuna: optuna.pruners.MedianPruner(),
}


def _check_choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {flag}={value!r}; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------
# The study.
# ----------------------------------------------------------------------------------------
def _trial_seed(search_seed: int, index: int) -> int:
    """The sampler seed of the index-th proposal: independent streams per (seed, index)."""
    return int(np.random.SeedSequence([search_seed, index]).generate_state(1)[0])


def _counts(trial) -> bool:
    """Whether a trial counts toward --trials: it finished, was pruned, or failed with an
    error (a FAIL without one was interrupted, and retried as another trial)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and "error" in trial.user_attrs)


def open_study(optuna, workdir: str, identity: dict, pruner: str):
    """DIR/study.db's study (created on the first call); interrupted trials re-enqueued."""
    storage = "sqlite:///" + os.path.abspath(os.path.join(workdir, "study.db"))
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, load_if_exists=True,
        direction="minimize" if identity["direction"] == "min" else "maximize",
        pruner=PRUNERS[pruner](optuna))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        diffs = [f"{k} (study: {stored.get(k)!r}, now: {identity[k]!r})" for k in identity
                 if stored.get(k) != identity[k]]
        raise ValueError(f"{workdir}/study.db holds a search with another {', '.join(diffs)}; "
                         "use another --workdir")
    for trial in study.get_trials(deepcopy=False,
                                  states=(optuna.trial.TrialState.RUNNING,)):
        logging.info("search trial %d was interrupted: trying its parameters again",
                     trial.number)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return study


def _trial_records(number: int, params: dict, dims, base_config, seeds: int):
    """(records, plan) of a trial's runs; plan None when its config is invalid."""
    overrides = {d.key: d.value(params[d.key]) for d in dims}
    runs = sweep_stats.with_seeds([overrides], base_config, seeds)
    group = sweep.run_name({"trial": number, **overrides})
    records = [{"name": sweep.run_name(o), "overrides": o, "status": "pending", "metrics": {},
                "error": "", "settings": {"trial": number, **o}, "trial": number,
                **({"group": group} if seeds > 1 else {})} for o in runs]
    try:
        return records, sweep.plan_runs(base_config, runs)
    except ValueError as e:
        for r in records:
            r["status"], r["error"] = "failed", f"ConfigError: {e}"
        return records, None


def _pruning_callback(trial, metric: str):
    """The trainer's on_evaluation: report `metric`, stop when the pruner says so."""
    def on_evaluation(step: int, metrics: dict) -> bool:
        if metric not in metrics:
            raise ValueError(f"--prune: --sort={metric} is not reported by the validation "
                             f"pass; it reports: {', '.join(sorted(metrics))}")
        trial.report(float(metrics[metric]), step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", int(step))
            return True
        return False
    return on_evaluation


def _run_trial(trial, records, plan, workdir: str, label: str, prune: str, metric: str):
    """Train the trial's runs in order into `records`; (state, value), state None when a
    run was preempted (the trial stays RUNNING: the next start retries it)."""
    for i, ((name, _, config), record) in enumerate(zip(plan, records)):
        kwargs = {"on_evaluation": _pruning_callback(trial, metric)} if (
            prune != "none" and i == 0) else {}
        sweep.train_run(config, os.path.join(workdir, name), record, f"{label}: {name}",
                        **kwargs)
        if record["status"] == "pruned":
            record["metrics"] = {"train/steps": record["metrics"].get("step", math.nan)}
        if record["status"] not in ("finished", "failed", "pruned"):
            return None, None
        if record["status"] != "finished":
            for rest in records[i + 1:]:
                rest["status"] = "skipped"
            return ("PRUNED", None) if record["status"] == "pruned" else ("FAIL", None)
    values = [r["metrics"].get(metric, math.nan) for r in records]
    if not all(math.isfinite(v) for v in values):
        have = sorted({k for r in records for k in r["metrics"]})
        trial.set_user_attr("error", f"no finite {metric} in the runs' summaries; they "
                                     f"have: {', '.join(have)}")
        return "FAIL", None
    return "COMPLETE", sweep_stats.summarize(values)["mean"]


def _save_trial(trial, records) -> None:
    """What a rerun reads back without training: each run's status and error."""
    trial.set_user_attr("runs", [{"name": r["name"], "status": r["status"],
                                  "error": r["error"], "metrics": {} if r["status"] in
                                  ("finished", "failed") else r["metrics"]} for r in records])
    errors_ = [r["error"] for r in records if r["error"]]
    if errors_ and "error" not in trial.user_attrs:
        trial.set_user_attr("error", errors_[0])


def _read_back(trial, dims, base_config, seeds: int, workdir: str) -> list[dict]:
    """The records of a counted trial: finished runs' summaries, the rest as stored."""
    records, plan = _trial_records(trial.number, trial.params, dims, base_config, seeds)
    stored = {r["name"]: r for r in trial.user_attrs.get("runs", [])}
    for i, record in enumerate(records):
        saved = stored.get(record["name"], {"status": "failed",
                                            "error": trial.user_attrs.get("error", "")})
        if saved["status"] == "finished" and plan is not None:
            sweep.train_run(plan[i][2], os.path.join(workdir, record["name"]), record,
                            f"trial {trial.number}: {record['name']}")
        else:
            record.update(status=saved["status"], error=saved.get("error", ""),
                          metrics=dict(saved.get("metrics", {})))
    return records


def run_search(base_config, space, workdir: str, *, trials: int, sampler: str = "tpe",
               search_seed: int = 0, prune: str = "none", seeds: int = 1,
               sort_metric: str = "validation/loss", sort_mode: str = "auto") -> list[dict]:
    """Search `space` for the best `sort_metric` in `workdir` (resuming its study) until
    `trials` trials count; write the results. Returns the records of every run (as
    train.sweep.run_sweep's, plus "trial"), by trial number."""
    optuna = _import_optuna()
    _check_choice("--search", sampler, SAMPLERS)
    _check_choice("--prune", prune, PRUNERS)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials={trials!r} must be an integer of at least 1")
    direction = sweep.sort_direction(sort_metric, sort_mode)
    if prune != "none" and not sort_metric.startswith("validation/"):
        raise ValueError(f"--prune={prune} compares --sort at every validation pass; "
                         f"--sort={sort_metric} is not a validation/ metric")
    dims = parse_space(space, base_config)
    sweep_stats.with_seeds([{d.key: None for d in dims}], base_config, seeds)
    SAMPLERS[sampler](optuna, search_seed, trials)  # a missing dependency fails here
    os.makedirs(workdir, exist_ok=True)
    identity = {"space": ";".join(d.text() for d in dims), "sort": sort_metric,
                "direction": direction, "seeds": seeds}
    study = open_study(optuna, workdir, identity, prune)
    settings = {**identity, "sampler": sampler, "search_seed": search_seed, "prune": prune,
                "trials": trials}
    records = []
    for trial in sorted(filter(_counts, study.get_trials(deepcopy=False)),
                        key=lambda t: t.number):
        records += _read_back(trial, dims, base_config, seeds, workdir)
    distributions = {d.key: d.distribution(optuna) for d in dims}
    while (done := sum(map(_counts, study.get_trials(deepcopy=False)))) < trials:
        study.sampler = SAMPLERS[sampler](optuna, _trial_seed(search_seed, done), trials)
        trial = study.ask(distributions)
        trial_records, plan = _trial_records(trial.number, trial.params, dims, base_config,
                                             seeds)
        records += trial_records
        label = f"trial {trial.number} ({done + 1}/{trials})"
        state, value = ("FAIL", None) if plan is None else _run_trial(
            trial, trial_records, plan, workdir, label, prune, sort_metric)
        if state is None:
            logging.warning("search stopped in %s (preempted); rerun to resume", label)
            break
        _save_trial(trial, trial_records)
        study.tell(trial, value, state=getattr(optuna.trial.TrialState, state))
        logging.info("search %s: %s%s", label, state.lower(),
                     "" if value is None else f", {sort_metric} {value:.5g}")
        write_search_results(optuna, study, records, workdir, base_config, settings)
    write_search_results(optuna, study, records, workdir, base_config, settings)
    return records


# ----------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------
def importances(optuna, study, seed: int) -> dict[str, float]:
    """fANOVA importances (Hutter et al. 2014) of the searched keys; {} with fewer than two
    finished trials or values that do not vary."""
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len({t.value for t in finished}) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ImportError, RuntimeError, ValueError) as e:  # scikit-learn missing, no variance
        logging.warning("no parameter importances: %s", e)
        return {}


def write_search_results(optuna, study, records: list[dict], workdir: str, base_config,
                         settings: dict) -> str:
    """The sweep's results files, then the search's section of results.md, history.png,
    importances.png and sweep.json; returns the markdown."""
    metric, direction = settings["sort"], settings["direction"]
    markdown = sweep.write_results(records, workdir, metric, settings["direction"])
    trials = sorted(filter(_counts, study.get_trials(deepcopy=False)), key=lambda t: t.number)
    states = [t.state.name for t in trials]
    lines = [f"## Search: {settings['sampler']} (--search_seed={settings['search_seed']}, "
             f"--prune={settings['prune']}), {len(trials)} of {settings['trials']} trials: "
             f"{states.count('COMPLETE')} finished, {states.count('PRUNED')} pruned, "
             f"{states.count('FAIL')} failed", "", f"Space: `{settings['space']}`", ""]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete:
        best = (min if direction == "min" else max)(complete, key=lambda t: t.value)
        found = ", ".join(f"{k}={sweep_spec._format_value(v)}" for k, v in best.params.items())
        lines += [f"Best: trial {best.number}, {metric} {best.value:.5g}"
                  f"{' (mean of the seeds)' if settings['seeds'] > 1 else ''}: {found}", ""]
    found = importances(optuna, study, settings["search_seed"])
    if found:
        plot_importances(found, workdir, "fANOVA")
        lines += ["Parameter importances (fANOVA, Hutter et al. 2014; importances.png):", "",
                  "| parameter | importance |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in found.items()] + [""]
    points = []
    for t in trials:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values \
            else math.nan
        points.append((t.number, t.value if t.state.name == "COMPLETE" else last,
                       {"COMPLETE": "finished", "PRUNED": "pruned"}.get(t.state.name, "failed")))
    plot_history(points, workdir, metric, direction)
    lines.append("history.png: each trial's value and the best so far.")
    markdown += "\n" + "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    write_json(os.path.join(workdir, "sweep.json"), {
        "base_config": json.loads(base_config.to_json_best_effort(sort_keys=True)),
        "search": settings,
        "runs": [{"name": r["name"], "overrides": r["overrides"], "trial": r["trial"],
                  "status": r["status"]} for r in records]})
    return markdown


# ----------------------------------------------------------------------------------------
# Command line (python -m train.sweep: train/sweep.py defines --config, --workdir, --sort).
# ----------------------------------------------------------------------------------------
def define_flags() -> None:
    """The search's and the seeds' flags of train.sweep."""
    flags.DEFINE_string("search", "grid", "grid (--sweep / get_sweep) or a sampler: "
                        + ", ".join(SAMPLERS))
    flags.DEFINE_integer("trials", None, "--search: trials in all (a rerun continues to it).")
    flags.DEFINE_string("space", None, '--search: e.g. "optim.learning_rate=loguniform(1e-4,'
                        '1e-2);model.num_layers=categorical(2,4)"; default: '
                        "get_search_space(variant) of the config file.")
    flags.DEFINE_integer("search_seed", 0, "--search: seeds the sampler.")
    flags.DEFINE_string("prune", "none", "--search: stop bad trials early: "
                        + ", ".join(PRUNERS))
    flags.DEFINE_integer("seeds", 1, "Runs of every configuration (seed = config seed + i).")


def check_flags(fl) -> bool:
    """Whether the flags ask for a search (else a grid); ValueError for flags that do not
    belong together."""
    _check_choice("--search", fl.search, ("grid", *SAMPLERS))
    _check_choice("--prune", fl.prune, PRUNERS)
    if fl.seeds < 1:
        raise ValueError(f"--seeds={fl.seeds} must be at least 1")
    if fl.search == "grid":
        given = [f"--{name}" for name in ("trials", "space", "search_seed", "prune")
                 if fl[name].present]
        if given:
            raise ValueError(f"{', '.join(given)} belong to a search: add --search="
                             f"{'|'.join(SAMPLERS)} (a grid runs every point of --sweep)")
        return False
    if fl.sweep is not None:
        raise ValueError("--sweep is a grid; a search samples --space (or the config file's "
                         "get_search_space): give one of them")
    if fl.trials is None or fl.trials < 1:
        raise ValueError(f"--search={fl.search} needs --trials=N (N >= 1): trials in all")
    return True


def main(fl) -> None:
    """python -m train.sweep --search=...: run the search, print results.md, exit status."""
    try:
        spec = fl.space if fl.space is not None else sweep.sweep_from_config_file(
            fl["config"].config_filename, "get_search_space", "--space")
        records = run_search(fl.config, spec, fl.workdir, trials=fl.trials, sampler=fl.search,
                             search_seed=fl.search_seed, prune=fl.prune, seeds=fl.seeds,
                             sort_metric=fl.sort, sort_mode=fl.sort_mode)
    except ValueError as e:
        sys.exit(errors.report(errors.ConfigError(str(e))))
    sweep.finish(records, fl.workdir, done=("finished", "pruned", "skipped"))
