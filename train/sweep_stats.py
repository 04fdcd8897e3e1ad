"""Repeated seeds: every configuration K times, and which differences exceed the noise.

    python -m train.sweep --config=configs/gpt.py --workdir=DIR --sweep=... --seeds=3

Run i of a configuration (a grid point, or a trial of train/search.py) sets `seed` = the
base config's seed + i, its one source of randomness (train/config.py): the parameter
initialization, the dropout keys and the order of the training data; the data splits stay
the same. The runs of one configuration form a group, and over a group's finished runs
every numeric metric gets

  mean, standard deviation   the sample standard deviation (ddof=1) over the seeds
  95% interval               of the mean: mean +- t(0.975, n-1) * std / sqrt(n) (Student's
                             t; the quantile from SciPy, which JAX depends on)

The sort metric's best group (best mean) is compared with every other group by Welch's
unequal-variances t-test (Welch 1947), two-sided at 5%: a row "differs" from the best when
p < 0.05, else its difference is "noise". There is no correction for multiple comparisons:
among many rows that are truly equal, about one in twenty still reads "differs".

results.md opens with one row per group (mean +- std, interval, verdict); results.csv keeps
one row per run, and results_grouped.csv one row per group with <metric>/mean, /std,
/ci_low and /ci_high for every numeric metric and p_vs_best / differs_from_best for the
sort metric (floats as repr: they read back exactly).
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from train.sweep import _cell, run_name, sort_direction, sort_records

SEED_KEY = "seed"
LEVEL = 0.95   # of the interval of the mean
ALPHA = 0.05   # of Welch's test against the best row


def with_seeds(runs: list[dict], base_config, seeds: int) -> list[dict]:
    """Every run of `runs` `seeds` times with seed = base seed + i (unchanged for 1)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds={seeds!r} must be an integer of at least 1")
    if seeds == 1:
        return [dict(run) for run in runs]
    for run in runs:
        if SEED_KEY in run:
            raise ValueError(f"--seeds={seeds} sets seed, and so does the run "
                             f"{run_name(run)}: sweep seed or give --seeds, not both")
    first = int(base_config[SEED_KEY])
    return [{**run, SEED_KEY: first + i} for run in runs for i in range(seeds)]


def mark_groups(records: list[dict], seeds: int) -> None:
    """With seeds > 1, record["group"]: the run name of its overrides without the seed."""
    if seeds > 1:
        for r in records:
            r["group"] = run_name({k: v for k, v in r["overrides"].items() if k != SEED_KEY})


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t distribution with `df` degrees of freedom."""
    from scipy import stats  # noqa: PLC0415 -- only sweeps with seeds need it

    return float(stats.t.ppf(probability, df))


def summarize(values) -> dict:
    """{n, mean, std (ddof=1), ci_low, ci_high}: NaN where n is too small (std: n < 2)."""
    x = np.asarray(list(values), dtype=np.float64)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test of equal means; NaN unless both have 2+ values.

    t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b) with the Welch-Satterthwaite
    degrees of freedom. Two groups without variance differ exactly when their means do.
    """
    from scipy import stats  # noqa: PLC0415

    a, b = (np.asarray(list(v), dtype=np.float64) for v in (a, b))
    if a.size < 2 or b.size < 2:
        return math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = float(a.mean() - b.mean())
    if va + vb == 0:
        return 1.0 if diff == 0 else 0.0
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(2 * stats.t.sf(abs(diff) / math.sqrt(va + vb), df))


def paired_p(a, b) -> float:
    """Two-sided p-value of the paired t-test of equal means (a[i] and b[i] share seed i:
    e.g. a compressed model and the float model it was made from); NaN under 2 pairs.

    SciPy's `ttest_rel` (t = mean(d) / (std(d) / sqrt(n)) over d = a - b, n - 1 degrees of
    freedom), except that pairs which all differ by the same amount differ exactly when it
    is not 0 (SciPy gives NaN there).
    """
    from scipy import stats  # noqa: PLC0415

    a, b = (np.asarray(list(v), dtype=np.float64) for v in (a, b))
    d = a - b
    if d.size < 2:
        return math.nan
    if d.std(ddof=1) == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def two_way_shares(table) -> tuple[float, float, float]:
    """How the spread of a complete two-way table (rows x columns, one value per cell: e.g.
    seeds x held-out folds) divides: the shares of its total sum of squares between the row
    means, between the column means and in their interaction (what is left; two-way ANOVA
    without replication). They add up to 1; NaN where every cell is equal.

        SS_rows = C * sum_i (mean_i. - mean)^2,  SS_cols = R * sum_j (mean_.j - mean)^2,
        SS_total = sum_ij (x_ij - mean)^2,       SS_interaction = the rest
    """
    x = np.asarray(table, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) < 2:
        raise ValueError(f"a two-way table needs 2+ rows and 2+ columns, got shape {x.shape}")
    grand = x.mean()
    total = float(((x - grand) ** 2).sum())
    if total == 0:
        return math.nan, math.nan, math.nan
    rows = x.shape[1] * float(((x.mean(axis=1) - grand) ** 2).sum()) / total
    cols = x.shape[0] * float(((x.mean(axis=0) - grand) ** 2).sum()) / total
    return rows, cols, 1.0 - rows - cols


def _values(group: dict, metric: str) -> list[float]:
    return [r["metrics"][metric] for r in group["runs"] if r["status"] == "finished"
            and math.isfinite(r["metrics"].get(metric, math.nan))]


def group_stats(records: list[dict], metric: str, sort_mode: str = "auto") -> list[dict]:
    """One dict per group, best mean of `metric` first: {"name", "settings" (without the
    seed), "runs" (its records), "stats" ({metric: summarize()} over finished runs),
    "metrics" (the means), "p" (Welch vs the best group; NaN for the best), "differs"}."""
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["group"], []).append(r)
    groups = []
    for name, runs in by_name.items():
        group = {"name": name, "runs": runs,
                 "settings": {k: v for k, v in runs[0]["settings"].items() if k != SEED_KEY}}
        names = sorted({k for r in runs if r["status"] == "finished" for k in r["metrics"]})
        group["stats"] = {m: summarize(_values(group, m)) for m in names}
        group["metrics"] = {m: s["mean"] for m, s in group["stats"].items() if s["n"]}
        groups.append(group)
    ranked = sort_records(groups, metric, sort_mode)
    best = _values(ranked[0], metric) if ranked else []
    for i, group in enumerate(ranked):
        group["p"] = math.nan if i == 0 or not best else welch_p(_values(group, metric), best)
        group["differs"] = bool(group["p"] < ALPHA)  # NaN compares False
    return ranked


def _verdict(rank: int, group: dict, metric: str) -> str:
    if metric not in group["metrics"]:
        return ""
    if rank == 1:
        return "best"
    if math.isnan(group["p"]):
        return "n < 2"
    return f"{'differs' if group['differs'] else 'noise'} (p={group['p']:.2g})"


def write_grouped(records: list[dict], workdir: str, metric: str,
                  sort_mode: str = "auto") -> str:
    """Write results_grouped.csv; return results.md's table of the groups."""
    groups = group_stats(records, metric, sort_mode)
    settings = list(dict.fromkeys(k for g in groups for k in g["settings"]))
    metrics = sorted({m for g in groups for m in g["stats"]})
    columns = [f"{m}/{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]
    with open(os.path.join(workdir, "results_grouped.csv"), "w", newline="",
              encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", *settings, "runs", "n", *columns, "p_vs_best",
                         "differs_from_best"])
        for g in groups:
            n = g["stats"].get(metric, {"n": 0})["n"]
            cells = [g["stats"][m][s] if m in g["stats"] else ""
                     for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]
            writer.writerow([g["name"], *(g["settings"].get(k, "") for k in settings),
                             len(g["runs"]), n, *cells, g["p"], g["differs"]])

    direction = sort_direction(metric, sort_mode)
    seeds = max((len(g["runs"]) for g in groups), default=0)
    header = ["#", *settings, "n", f"{metric} mean ± std", "95% interval", "vs best",
              "status"]
    lines = [f"{len(groups)} configurations x {seeds} seeds, sorted by the mean of {metric} "
             f"({'lowest' if direction == 'min' else 'highest'} first). ± is the standard "
             "deviation over the seeds (ddof=1); the interval is the mean's 95% Student-t "
             "interval; vs best: Welch's t-test against the best row, two-sided at 5% "
             "(differs | noise). Per group: results_grouped.csv", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in settings or h in ("vs best", "status") else "---:"
                            for h in header) + "|"]
    for rank, g in enumerate(groups, 1):
        s = g["stats"].get(metric, summarize([]))
        n = s["n"] if s["n"] == len(g["runs"]) else f"{s['n']} of {len(g['runs'])}"
        spread = f"{_cell(s['mean'])} ± {_cell(s['std'])}" if s["n"] else ""
        interval = f"[{_cell(s['ci_low'])}, {_cell(s['ci_high'])}]" if s["n"] > 1 else ""
        lines.append("| " + " | ".join([
            _cell(rank), *(_cell(g["settings"].get(k, ""), False) for k in settings),
            _cell(n), spread, interval, _verdict(rank, g, metric),
            ", ".join(dict.fromkeys(r["status"] for r in g["runs"]))]) + " |")
    return "\n".join(lines) + "\n"
