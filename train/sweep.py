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

import ast
import copy
import csv
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from numbers import Integral, Real

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from train import config as config_lib
from train import errors
from train import main as main_lib
from train.evaluators import EVALUATORS
from train.metrics_log import format_duration, quiet_library_logs, write_json
from train.sweep_plots import plot_pareto, plot_results

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

_TYPE_NAMES = {bool: "a bool (true/false)", int: "an integer", float: "a number",
               str: "a string", list: "a list", tuple: "a tuple", dict: "a dict"}


# ----------------------------------------------------------------------------------------
# The sweep: parsing, typing, naming.
# ----------------------------------------------------------------------------------------
def _field(config: ml_collections.ConfigDict, key: str):
    """(section, leaf name, field type, optional) of the dotted `key`; errors name it."""
    parts = key.split(".")
    parent, section = None, config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if not isinstance(section, ml_collections.ConfigDict):
            raise ValueError(f"sweep key {key!r}: {where} is a value, not a section")
        if part not in section:
            raise ValueError(f"unknown sweep key {key!r}: {where} has no key {part!r}; "
                             f"allowed: {', '.join(sorted(section.keys()))}")
        parent, section = section, section[part]
    if isinstance(section, ml_collections.ConfigDict):
        raise ValueError(f"sweep key {key!r} is a section; sweep one of its keys: "
                         f"{', '.join(sorted(section.keys()))}")
    if section is None:  # a typed placeholder, e.g. model.num_kv_heads (None = default)
        # ConfigDict keeps the placeholder's type only on its FieldReference.
        ref = parent._fields.get(parts[-1])  # pylint: disable=protected-access
        kind = ref.get_type() if hasattr(ref, "get_type") else type(None)
        return parent, parts[-1], kind, True
    return parent, parts[-1], type(section), False


def _coerce(key: str, value, config: ml_collections.ConfigDict):
    """`value` (a command-line string or a Python value) as the type of field `key`."""
    _, _, kind, optional = _field(config, key)
    if optional and (value is None or (isinstance(value, str)
                                       and value.strip().lower() == "none")):
        return None
    if kind is tuple and isinstance(value, list):  # get_sweep() may write lists
        value = tuple(value)
    if isinstance(value, str) and kind is not str:
        if kind in (list, dict):
            raise ValueError(f"sweep key {key!r} holds {_TYPE_NAMES.get(kind, kind)}; "
                             "sweep it from get_sweep() in the config file, not --sweep")
        value = _parse_text(key, value, kind)
    if kind is float and isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if kind is int:  # bool is an int subclass, and NumPy integers are not int
        ok = isinstance(value, Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"sweep value {value!r} for {key} must be "
                         f"{_TYPE_NAMES.get(kind, kind.__name__)}")
    return int(value) if kind is int else value


def _parse_text(key: str, text: str, kind: type):
    t = text.strip()
    try:
        if kind is tuple:
            value = ast.literal_eval(t)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if kind is bool and t.lower() in ("true", "false", "1", "0", "yes", "no"):
            return t.lower() in ("true", "1", "yes")
        if kind is int:
            number = float(t)  # accepts "1e4" and "2.0" as long as they are integers
            if number.is_integer():
                return int(t) if t.lstrip("+-").isdigit() else int(number)
        if kind is float:
            return float(t)
    except (ValueError, SyntaxError):
        pass
    raise ValueError(f"sweep value {text!r} for {key} is not "
                     f"{_TYPE_NAMES.get(kind, kind.__name__)}")


def _top_level_split(text: str) -> list[str]:
    """`text` split at the commas outside parentheses and brackets: "(8,16),(16,32)"."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _axes_from_text(spec: str) -> list[tuple[str, list[str]]]:
    axes = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        values = [v.strip() for v in _top_level_split(values)]
        if not sep or not key.strip() or not all(values):
            raise ValueError(f"sweep axis {part!r} must look like key=value1,value2")
        axes.append((key.strip(), values))
    return axes


def parse_sweep(spec, base_config: ml_collections.ConfigDict) -> list[dict]:
    """The runs of `spec` (see the module docstring) as typed override dicts, in order."""
    if isinstance(spec, str):
        if not spec.strip():  # --sweep="": the base config alone (with --seeds: K runs)
            return [{}]
        spec = _axes_from_text(spec)
    spec = list(spec or [])
    if not spec:
        raise ValueError("the sweep is empty: give --sweep=key=v1,v2;... or get_sweep()")
    if all(isinstance(run, Mapping) for run in spec):
        runs = [dict(run) for run in spec]
    else:
        for axis in spec:
            if (isinstance(axis, Mapping) or not isinstance(axis, (tuple, list))
                    or len(axis) != 2 or isinstance(axis[1], (str, Mapping))
                    or not axis[1]):
                raise ValueError(f"sweep axis {axis!r} must be (key, [value, ...]) with at "
                                 "least one value (or give only run dicts)")
        points = [[dict(v) if isinstance(v, Mapping) else {key: v} for v in values]
                  for key, values in spec]
        runs = []
        for combo in itertools.product(*points):
            run = {}
            for part in combo:
                for key in set(run) & set(part):
                    raise ValueError(f"sweep key {key!r} is set by two axes")
                run.update(part)
            runs.append(run)
    return [{k: _coerce(k, v, base_config) for k, v in run.items()} for run in runs]


def _format_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def run_name(overrides: dict) -> str:
    """A readable, filesystem-safe directory name: 'optim.name=sgd,model.num_layers=2'.

    Characters outside [A-Za-z0-9._+-] (and ',' or '=' inside a value) become '_'; when
    that loses information, or the name would be too long, a hash of the exact overrides
    is appended so that distinct overrides always get distinct names. (Only values of the
    same type are told apart -- True and "True" are not -- which parse_sweep ensures.)
    """
    if not overrides:
        return "base"
    parts, lossy = [], False
    for key, value in overrides.items():
        text = _format_value(value)
        safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))
        safe_text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
        lossy |= safe_key != str(key) or safe_text != text
        parts.append(f"{safe_key}={safe_text}")
    name = ",".join(parts)
    if lossy or len(name) > 200:  # 255 bytes is the usual limit of one path component
        exact = json.dumps([[str(k), _format_value(v)] for k, v in overrides.items()])
        name = f"{name[:180]}~{hashlib.sha1(exact.encode()).hexdigest()[:8]}"
    return name


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict
                    ) -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted-key `overrides` set (typed like parse_sweep)."""
    config = copy.deepcopy(config)  # deep: sections must not be shared between runs
    for key, value in overrides.items():
        section, leaf, _, _ = _field(config, key)
        section[leaf] = _coerce(key, value, config)
    return config


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def plan_runs(base_config, runs: list[dict]) -> list[tuple[str, dict, object]]:
    """[(name, overrides, config)]: every run's config built and validated, else ValueError."""
    plan = {}
    for overrides in runs:
        name = run_name(overrides)
        if name in plan:
            raise ValueError(f"the sweep has the run {name!r} twice")
        try:
            plan[name] = apply_overrides(base_config, overrides)
            config_lib.validate(plan[name])
        except ValueError as e:
            raise ValueError(f"run {name}: {e}") from None
    return [(name, overrides, config) for (name, config), overrides in zip(plan.items(), runs)]


# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------
def _finished_summary(run_dir: str, config) -> dict | None:
    """summary.json of a finished run of `config` in run_dir, None if not finished."""
    from train.workdir import config_differences  # noqa: PLC0415 -- the trainer's

    path, config_path = (os.path.join(run_dir, f) for f in ("summary.json", "config.json"))
    if not os.path.exists(path):
        return None
    # A finished run of another config (the base config changed since) must not be
    # reported as this one; the trainer refuses such a workdir for unfinished runs alike.
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved = {k: v for k, v in json.load(f).items() if k != "lineage"}
            diffs = config_differences(
                saved, json.loads(config.to_json_best_effort(sort_keys=True)))
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
