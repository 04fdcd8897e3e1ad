"""Ablation sweeps: one base config, a grid of overrides, one ordinary trained run each.

    python -m train.sweep --config=configs/<family>.py[:variant] --workdir=DIR \
        [--sweep="optim.name=adamw,sgd;optim.learning_rate=1e-3,3e-3"] \
        [--sort=validation/loss] [--sort_mode=auto|min|max] [--config.section.key=value ...]

`--config.*` flags change the base config of every run. The sweep is --sweep or, without
it, `get_sweep(variant)` of the config file, in one of three forms:

  "k1=a,b;k2=c,d"           --sweep: axes split by ';', values by ','; each value is parsed
                            with the type of the field it replaces: int, float (1e-3), bool
                            (true/false), str (so a string cannot hold ',' or ';'), tuple as
                            a Python literal in parentheses: "model.widths=(8,16),(16,32)".
  [(key, [values]), ...]    the same axes as Python values. A value may also be a dict of
                            linked overrides forming one grid point together (the key is then
                            just a label): ("optimizer", [{"optim.name": "sgd",
                            "optim.momentum": 0.9, "optim.learning_rate": 0.1}, ...]).
  [{key: value, ...}, ...]  explicit runs, for sweeps that are not grids.
  ""                        --sweep="": the base config alone, one run ("base"); with
                            --seeds=K its K seeds (train/sweep_stats.py).

Axes combine as a Cartesian product, first axis slowest. Unknown keys, wrong value types and
invalid run configs stop the sweep before any run starts.

DIR holds sweep.json (base config, sweep, runs), one trainer workdir per run (`run_name`:
"optim.name=sgd,model.num_layers=2"), results.csv (every run in sweep order with every
numeric summary.json key), results.md (key metrics, best first by --sort) and results.png
(the sort metric per run; all runs' loss curves), rewritten after every trained run.
Rerunning resumes: runs with a summary.json are read back, an interrupted run resumes from
its checkpoint, failed runs are retried. A run that raises is recorded as failed and the
sweep goes on; the exit status is 1 unless every run finished.

--seeds=K runs every grid point K times, `seed` = the config's seed + i (a `seed=` part in
the run names); results.md then opens with each point's mean +- std, 95% interval and
whether it differs from the best beyond the noise (train/sweep_stats.py). --search=random|
tpe|gp --trials=N searches a space instead of a grid (train/search.py).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
import time
from numbers import Real

from absl import app, flags, logging
from ml_collections import config_flags

from train import errors
from train import main as main_lib
from train.evaluators import EVALUATORS
from train.metrics_log import format_duration, quiet_library_logs, write_json
from train.sweep_plots import plot_pareto, plot_results
# The grammar (train/sweep_spec.py); parse_sweep, run_name, apply_overrides are this
# module's API too.
from train.sweep_spec import (_format_value, _get, apply_overrides, parse_sweep,  # noqa: F401
                              plan_runs, run_name)

# Metrics whose larger values are better (matched against the metric's name); any other
# metric (loss, perplexity, bits_per_token, ...) is sorted smallest first.
HIGHER_IS_BETTER = ("accuracy", "bleu", "exact_match", "f1", "per_second", "top1", "top5",
                    "r@", "miou", "mean_dice", "score", "skill")
# results.md shows these metrics (results.csv has every numeric key of summary.json):
# the splits', the compressed form's and every evaluator's (`<name>/<metric>`).
KEY_METRIC_PREFIXES = ("validation/", "test/", "compressed/validation/") + tuple(
    f"{name}/" for name in EVALUATORS)
KEY_METRICS = ("train/steps_per_second", "params/count", "params/bytes", "compressed/bytes",
               "compressed/fraction_of_float", "compressed/sparsity")

# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------
def _finished_summary(run_dir: str, config) -> dict | None:
    """summary.json of a finished run of `config` in run_dir, None if not finished."""
    from train.config import with_seed_in_paths  # noqa: PLC0415 -- the trainer's
    from train.workdir import config_differences  # noqa: PLC0415

    path, config_path = (os.path.join(run_dir, f) for f in ("summary.json", "config.json"))
    if not os.path.exists(path):
        return None
    # A finished run of another config (the base config changed since) must not be
    # reported as this one; the trainer refuses such a workdir for unfinished runs alike.
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved = {k: v for k, v in json.load(f).items() if k != "lineage"}
            diffs = config_differences(
                saved, json.loads(with_seed_in_paths(config).to_json_best_effort(
                    sort_keys=True)))   # as the trainer recorded it: "{seed}" resolved
        if diffs:
            raise ValueError(f"{run_dir} holds a finished run of a different config (keys "
                             f"differ: {', '.join(diffs)}); move it away or use another "
                             "--workdir")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def train_run(config, run_dir: str, record: dict, label: str, **train_kwargs) -> bool:
    """Train `config` in run_dir, or read its finished summary back, into `record`'s
    status, metrics and error; True when it trained. `train_kwargs` go to the trainer
    (train/search.py's pruning callback). A run that raises is recorded as failed."""
    from train import trainer  # noqa: PLC0415 -- parse/validation errors stay fast

    t0, trained = time.time(), False
    try:
        summary = _finished_summary(run_dir, config)
        if summary is None:
            logging.info("sweep run %s", label)
            trained = True
            summary = trainer.train_and_evaluate(config, run_dir, **train_kwargs)
            # Report what summary.json holds, so a rerun reads back identical values.
            summary = _finished_summary(run_dir, config) or summary
        else:
            logging.info("sweep run %s finished already, skipped", label)
        record["status"] = summary.get("status", "finished")
        record["metrics"] = {k: v for k, v in summary.items()
                             if isinstance(v, Real) and not isinstance(v, bool)}
    except Exception as e:  # noqa: BLE001 -- one broken run must not end the sweep
        logging.exception("sweep run %s failed", label)
        record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
    if trained:
        logging.info("sweep run %s: %s in %s", label, record["status"],
                     format_duration(time.time() - t0))
    return trained


def run_sweep(base_config, runs: list[dict], workdir: str,
              sort_metric: str = "validation/loss", sort_mode: str = "auto",
              spec=None, seeds: int = 1) -> list[dict]:
    """Train every run in `workdir/<run_name>` (skipping finished ones); write the results.

    Returns one record per run, in sweep order: {"name", "overrides" (the run's own),
    "settings" (its value of every swept key), "status" ("finished", "failed", a trainer
    status such as "preempted", or "pending" when the sweep stopped first), "metrics"
    (numeric summary.json values), "error"} (+ "group" with seeds > 1: every run of `runs`
    K = seeds times, train/sweep_stats.py). `spec` is only recorded in sweep.json.
    """
    from train import sweep_stats  # noqa: PLC0415 -- it imports this module

    runs = sweep_stats.with_seeds(runs, base_config, seeds)
    plan = plan_runs(base_config, runs)
    sort_direction(sort_metric, sort_mode)  # a bad sort_mode must not wait for the runs
    swept = list(dict.fromkeys(k for _, overrides, _ in plan for k in overrides))
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "sweep.json"), {
        "base_config": json.loads(base_config.to_json_best_effort(sort_keys=True)),
        "sweep": spec, "seeds": seeds,
        "runs": [{"name": n, "overrides": o} for n, o, _ in plan]})
    records = [{"name": name, "overrides": overrides, "status": "pending", "metrics": {},
                "error": "", "settings": {k: _get(config, k) for k in swept}}
               for name, overrides, config in plan]
    sweep_stats.mark_groups(records, seeds)
    start = time.time()
    for i, ((name, _, config), record) in enumerate(zip(plan, records)):
        trained = train_run(config, os.path.join(workdir, name), record,
                            f"{i + 1}/{len(plan)}: {name}")
        if trained and i + 1 < len(plan):  # progress for a long sweep; the last write below
            write_results(records, workdir, sort_metric, sort_mode)
        if record["status"] not in ("finished", "failed"):
            # Preempted (SIGTERM/Ctrl-C caught by the trainer): stop; a rerun resumes here.
            logging.warning("sweep stopped at run %s (%s)", name, record["status"])
            break
    write_results(records, workdir, sort_metric, sort_mode)
    logging.info("sweep of %d runs took %s", len(plan), format_duration(time.time() - start))
    return records


# ----------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------
def sort_direction(metric: str, sort_mode: str = "auto") -> str:
    """'min' or 'max': sort_mode itself, or for 'auto' what `metric`'s name implies."""
    if sort_mode in ("min", "max"):
        return sort_mode
    if sort_mode != "auto":
        raise ValueError(f"sort_mode={sort_mode!r}; allowed: auto, min, max")
    return "max" if any(word in metric for word in HIGHER_IS_BETTER) else "min"


def sort_records(records: list[dict], metric: str, sort_mode: str = "auto") -> list[dict]:
    """Best first; runs without a finite value of `metric` last, in sweep order."""
    sign = 1.0 if sort_direction(metric, sort_mode) == "min" else -1.0

    def key(record):
        value = record["metrics"].get(metric)
        missing = value is None or not math.isfinite(value)
        return (missing, 0.0 if missing else sign * value)
    return sorted(records, key=key)  # stable: ties keep sweep order


def _cell(value, digits: bool = True) -> str:
    if isinstance(value, float) and digits:  # metrics; swept values are shown exactly
        return f"{value:.4g}"
    return _format_value(value).replace("|", "\\|").replace("\n", " ")


def write_results(records: list[dict], workdir: str, sort_metric: str = "validation/loss",
                  sort_mode: str = "auto") -> str:
    """Write results.csv, results.md and results.png in `workdir`; return the markdown."""
    swept = list(dict.fromkeys(k for r in records for k in r["settings"]))
    metrics = sorted({k for r in records for k in r["metrics"]})
    with open(os.path.join(workdir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *swept, "status", *metrics, "error"])
        for r in records:  # floats as repr(): they read back exactly
            writer.writerow([r["name"], *(r["settings"].get(k, "") for k in swept),
                             r["status"], *(r["metrics"].get(k, "") for k in metrics),
                             r["error"]])

    key_metrics = [m for prefix in KEY_METRIC_PREFIXES for m in metrics
                   if m.startswith(prefix)]
    key_metrics += [m for m in KEY_METRICS if m in metrics]
    if sort_metric in key_metrics:
        key_metrics.remove(sort_metric)
    key_metrics.insert(0, sort_metric)  # first, even when no run reports it (yet)
    if metrics and sort_metric not in metrics:  # most likely a typo in --sort
        logging.warning("no run reports %s; the summaries have: %s", sort_metric,
                        ", ".join(metrics))
    ranked = sort_records(records, sort_metric, sort_mode)
    direction = sort_direction(sort_metric, sort_mode)
    header = ["#", *swept, *key_metrics, "status"]
    lines = [f"{len(records)} runs, sorted by {sort_metric} "
             f"({'lowest' if direction == 'min' else 'highest'} first); "
             "every metric: results.csv", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in key_metrics or h == "#" else "---"
                            for h in header) + "|"]
    for rank, r in enumerate(ranked, 1):
        status = r["status"]
        if r["error"]:
            first_line = r["error"].splitlines()[0]
            status += ": " + (first_line[:100] + "..." if len(first_line) > 100
                              else first_line)
        cells = [_cell(rank), *(_cell(r["settings"].get(k, ""), False) for k in swept),
                 *(_cell(r["metrics"].get(m, "")) for m in key_metrics), _cell(status)]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    if any("group" in r for r in records):  # --seeds=K: the statistics of each group first
        from train import sweep_stats  # noqa: PLC0415 -- it imports this module
        markdown = sweep_stats.write_grouped(records, workdir, sort_metric, sort_mode) + (
            "\nEvery run:\n\n" + markdown)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    plot_results(ranked, workdir, sort_metric)
    if any("compressed/bytes" in r["metrics"] for r in records):
        plot_pareto(records, workdir, sort_metric, direction)
    return markdown


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------
def define_flags() -> None:
    """The command-line flags. Defined when run, not on import: train.main defines the same
    --config and --workdir, and one process (pytest) may import both modules."""
    config_flags.DEFINE_config_file(
        "config", None, "Base config file, optionally with a variant: configs/gpt.py:tiny",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory a run).")
    flags.DEFINE_string("sweep", None, 'Grid, e.g. "optim.name=adamw,sgd;model.num_layers=2,4"'
                        '; "" = the base config alone (for --seeds); default: '
                        "get_sweep(variant) of the config file.")
    flags.DEFINE_string("sort", "validation/loss", "Summary metric ranking the runs.")
    flags.DEFINE_enum("sort_mode", "auto", ["auto", "min", "max"],
                      "auto: highest first for accuracy/bleu/exact_match/..., lowest first "
                      "otherwise.")
    from train import search  # noqa: PLC0415 -- it imports this module
    search.define_flags()  # --search, --trials, --space, --search_seed, --prune, --seeds
    flags.mark_flags_as_required(["config", "workdir"])


def sweep_from_config_file(config_arg: str, function: str = "get_sweep",
                           flag: str = "--sweep"):
    """get_sweep(variant) (or `function`) of the config file named by a --config value."""
    path, _, variant = config_arg.partition(":")
    module_spec = importlib.util.spec_from_file_location("flaxlab_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ValueError(f"no {flag} given and {path} defines no {function}(variant)")
    return getattr(module, function)(*([variant] if variant else []))


def main(argv):
    from train import search, sweep_stats  # noqa: PLC0415 -- they import this module

    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    base = fl.config
    try:
        if search.check_flags(fl):  # --search=random|tpe|gp: train/search.py runs it
            return search.main(fl)
        spec = (fl.sweep if fl.sweep is not None
                else sweep_from_config_file(fl["config"].config_filename))
        runs = parse_sweep(spec, base)
        plan_runs(base, sweep_stats.with_seeds(runs, base, fl.seeds))  # errors before runs
    except ValueError as e:
        sys.exit(errors.report(errors.ConfigError(str(e))))
    records = run_sweep(base, runs, fl.workdir, fl.sort, fl.sort_mode, spec=spec,
                        seeds=fl.seeds)
    finish(records, fl.workdir)


def finish(records: list[dict], workdir: str, done=("finished",)) -> None:
    """Print results.md; exit with status 1 naming the runs whose status is not in `done`."""
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    unfinished = [r["name"] for r in records if r["status"] not in done]
    if unfinished:
        sys.exit(f"flaxlab sweep: {len(unfinished)} of {len(records)} runs did not finish: "
                 f"{', '.join(unfinished)}")


if __name__ == "__main__":
    try:  # the config file, variant and --config.* keys, named in one line
        main_lib.check_config_arguments(sys.argv, "python -m train.sweep --config=FILE[:variant]"
                                        " --workdir=DIR [--sweep=...]")
    except errors.ConfigError as e:
        sys.exit(errors.report(e))
    define_flags()
    app.run(main)
