r"""How fast each run of a sweep reaches a reference run's final value of a metric:

    python -m train.sweep_reach --workdir=runs/seeds/clip_distill \
        --metric=zero_shot/test_top1 [--reference=0] [--mode=max] \
        [--at=250,500 [--also=zero_shot/top1_among_heldout]]

Reads every run of the sweep in DIR (sweep.json) from its metrics.jsonl -- the evaluator
or split lines of the metric, e.g. "zero_shot/test_top1" is the key "test_top1" of the
lines with "split": "zero_shot" -- and prints, per run, its final value and the first
step at which it reached the reference run's final value (`--reference`: the run's index
in sweep order). A sweep over seeds (--seeds=N) compares each run with the reference's run
of the same seed: `--reference` then counts the sweep's points without their seeds (0: the
first row), so "steps to (a)'s final value" is measured seed by seed. A multi-stage run
(train/stages.py) counts the steps of its earlier stages before those of its later ones.
`--at`: also each run's value of the metric (and of the `--also` metrics) at those steps, its
evaluation there, to show how metrics move during training. Writes reach.json beside
results.csv, which `python -m train.readme_tables --collect` reads as the runs' metrics
reach/steps (a run that never reaches its target has none) and METRIC@STEP
(zero_shot/test_top1@250; none where the run has no evaluation at STEP).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from train.metrics_log import write_json
from train.sweep_stats import SEED_KEY


def curve(run_dir: str, metric: str) -> list[tuple[int, float]]:
    """[(global step, value)] of `metric` in a run's (or a staged run's) metrics.jsonl."""
    split, _, key = metric.partition("/")
    stages = os.path.join(run_dir, "stages.json")
    if os.path.isfile(stages):
        with open(stages, encoding="utf-8") as f:
            info = json.load(f)
        out = []
        for i, name in enumerate(info["workdirs"]):
            offset = i * info["steps_per_stage"]
            out += [(offset + s, v) for s, v in curve(os.path.join(run_dir, name), metric)]
        return out
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    points = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if m.get("split") == split and key in m:
                points.append((int(m["step"]), float(m[key])))
    return points


def first_reaching(points, target: float, mode: str = "max") -> int | None:
    """The first step whose value is at least (max) / at most (min) `target`."""
    for step, value in points:
        if (value >= target) if mode == "max" else (value <= target):
            return step
    return None


def reach_table(workdir: str, metric: str, reference: int = 0, mode: str = "max",
                at: tuple[int, ...] = (), also: tuple[str, ...] = ()) -> list:
    """[{"name", "final", "steps_to_reach", "target", "at"}] of every run of the sweep in
    `workdir`, each against the final value of the reference point's run of its own seed;
    "at": {"METRIC@STEP": the value evaluated at that (global) step, None without one} for
    `metric` and the `also` metrics at the steps `at`."""
    with open(os.path.join(workdir, "sweep.json"), encoding="utf-8") as f:
        runs = json.load(f)["runs"]
    # A run's sweep point: its overrides without the seed (its name where it lists none).
    seed_of, points = {}, {}
    for run in runs:
        overrides = dict(run.get("overrides", {"name": run["name"]}))
        seed_of[run["name"]] = overrides.pop(SEED_KEY, None)
        point = json.dumps(overrides, sort_keys=True, default=str)
        points.setdefault(point, {})[seed_of[run["name"]]] = run["name"]
    if not 0 <= reference < len(points):
        raise ValueError(f"--reference={reference}: the sweep has {len(points)} points "
                         f"(0-{len(points) - 1})")
    references = list(points.values())[reference]
    # {metric: {run: its curve}}: the reached metric's, and the --also ones' where --at asks.
    curves_of = {m: {r["name"]: curve(os.path.join(workdir, r["name"]), m) for r in runs}
                 for m in dict.fromkeys((metric, *(also if at else ())))}
    curves = curves_of[metric]
    rows = []
    for name, c in curves.items():
        own = references.get(seed_of[name])
        if own is None or not curves[own]:
            raise ValueError(f"--reference={reference}: no {metric} curve in run "
                             f"{own or '?'} (the reference for {name})")
        target = curves[own][-1][1]
        rows.append({"name": name, "final": c[-1][1] if c else None,
                     "steps_to_reach": first_reaching(c, target, mode), "target": target,
                     "at": {f"{m}@{step}": dict(of[name]).get(step)
                            for m, of in curves_of.items() for step in at}})
    return rows


def main(argv):
    del argv
    fv = flags.FLAGS
    at = tuple(int(step) for step in fv.at)
    rows = reach_table(fv.workdir, fv.metric, fv.reference, fv.mode, at, tuple(fv.also))
    print(f"{fv.metric}: the first step at the final value of reference point "
          f"{fv.reference}'s run of the same seed")
    show = lambda v: "-" if v is None else f"{v:.4g}"   # noqa: E731
    print(f"{'':>3} {'target':>8} {'final':>8} {'steps':>8}"
          + "".join(f" {'@' + str(step):>8}" for step in at) + "  run")
    for i, r in enumerate(rows):
        print(f"{i:>3} {r['target']:>8.4g} {show(r['final']):>8} "
              f"{str(r['steps_to_reach']):>8}"
              + "".join(f" {show(r['at'][f'{fv.metric}@{step}']):>8}" for step in at)
              + f"  {r['name']}")
    write_json(os.path.join(fv.workdir, "reach.json"), {"metric": fv.metric, "rows": rows})


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The sweep's workdir.", required=True)
    flags.DEFINE_string("metric", None, "split/key, e.g. zero_shot/test_top1.", required=True)
    flags.DEFINE_integer("reference", 0, "The reference point's index in sweep order "
                         "(runs of one point that differ only in seed count once).")
    flags.DEFINE_enum("mode", "max", ["max", "min"], "Larger (max) or smaller is better.")
    flags.DEFINE_list("at", [], "Steps at which to report each run's value too.")
    flags.DEFINE_list("also", [], "More metrics whose values --at the steps to report.")
    sys.exit(app.run(main))
