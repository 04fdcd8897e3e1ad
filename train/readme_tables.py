"""README's results tables, written from the sweeps that measured them.

    python -m train.readme_tables --collect    # sweep outputs -> docs/results/<table>.csv
    python -m train.readme_tables              # docs/results/*.csv -> README.md's tables
    python -m train.readme_tables --check      # exit 1 if README.md is not what they give

`docs/results/tables.toml` lists the tables. A table has `columns`, optionally `right` (the
columns aligned right) and `rows`; a row gives a text for every column, a `command`
(rendered as code, in a command column) and, when it is measured over seeds, the `workdir`
its command writes (a sweep directory, usually `--sweep="" --seeds=3`) and optionally
`where` = {swept key: value} selecting some of the sweep's runs. A table whose rows are one
sweep's gives that sweep's `command` once instead (README shows it above the table; no
command column). Its texts hold placeholders

    {metric|spec}       over the row's finished runs: "mean ± std" with the format spec
                        (".3f", ".1%": a percentage, "81.5 ± 3.2%"), then " (min-max)"
                        where the spread is large (max - min above LARGE_RANGE of |mean|);
                        one value alone where every run agrees (a baseline, a count)
    {metric|spec|MODE}  one part of it: mean (the mean alone), std (the standard deviation
                        alone, in points for a percentage), range ("min-max") or each
                        (every run's value, ascending: "81.4, 86.3 and 92.0%")
    {metric|vs=ROW}     this row against row ROW of the same table by Welch's t-test
                        (train/sweep_stats.py), two-sided at 5%: "differs from ROW (p=0.01)"
                        or "ties with ROW (p=0.43)" (ROW's id alone where it is named
                        TABLE.ROW) -- claims are stated only where the difference
                        exceeds the seed noise
    {metric|paired=ROW} the paired t-test instead, over the seeds both rows have -- for
                        rows built on the same per-seed bases (train/config.py's "{seed}" in
                        init_from.workdir / distill.teacher): "differs from ROW (paired,
                        p=0.003)"
    {metric|spec|diff=ROW}, {metric|spec|change=ROW}
                        per seed both rows have, this row's value minus ROW's (diff) or
                        over ROW's, minus 1 (change), then "mean ± std" of those as above;
                        "+.2%" shows the sign: "+0.01 ± 0.00%"
    ROW:METRIC          in vs=, paired=, diff= and change=: METRIC of ROW instead of the
                        same metric -- a row's own id compares two of its metrics seed by
                        seed (a compressed model's perplexity with its float model's)
    {metric|share=PART} for a row with mean_over: the share of the spread of its seed x
                        value table (sweep_stats.two_way_shares) between the seeds (PART
                        "seed"), between the values (PART = the mean_over key) or in their
                        interaction ("interaction"), as "44%"
    {ROW:metric|...}    any of these over another row of the same table; TABLE.ROW names a
                        row of any table (and vs=TABLE.ROW compares with one)

and a table's `seeds` column says how many runs each row has. A row with `mean_over = KEY`
(a swept key, e.g. "data.shapes.heldout_fold") first averages each seed's runs over KEY's
values -- one run per value, e.g. one per held-out fold -- so its statistics are over seeds
of that mean (a seed missing one of the values is left out, as a failed run is). A row
without a workdir is a single run's text as it stands (its `seeds` cell says 1) until it is
re-measured; its placeholders, if any, name other rows.

`[texts.NAME] text = '''...'''` (a TOML multi-line string) is a paragraph of README's prose
whose numbers come from the tables' rows: its placeholders name their row,
{TABLE.ROW:metric|spec}, and it is written between `<!-- results:NAME -->` and
`<!-- /results:NAME -->`, wrapped at TEXT_WIDTH columns (a blank line in it starts a new
paragraph).

`--collect` (train/readme_data.py) reads each row's `<workdir>/results.csv` and `sweep.json`
(train/sweep.py), and its reach.json where `python -m train.sweep_reach` wrote one (metrics
reach/steps and METRIC@STEP), and keeps every numeric metric of the row's finished runs in
`docs/results/<table>.csv` (one line per run and metric, values as repr: they read back
exactly), so the tables can be rewritten and checked without the runs. It refuses a sweep
run with fewer seeds than MIN_SEEDS, or whose `--seeds` differs from the row's command. Rows whose workdir is absent
keep what was collected before. README.md's table NAME lies between the lines
`<!-- results:NAME -->` and `<!-- /results:NAME -->`; the rest of README is left alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import textwrap

import numpy as np
from absl import app, flags

from train.readme_data import (REPO, SPEC, TableError, collect, load_spec, load_texts,
                               read_data)

TEXT_WIDTH = 92            # README's prose
LARGE_RANGE = 0.02          # show min-max when max - min exceeds 2% of |mean|
PLACEHOLDER = re.compile(r"\{(?:(?P<ref>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)?):)?"
                         r"(?P<metric>[^{}|:]+)\|(?P<spec>[^{}|]+)"
                         r"(?:\|(?P<mode>mean|std|range|each|(?:diff|change)="
                         r"[A-Za-z0-9_.-]+(?::[^{}|:]+)?))?\}")
# vs=ROW / paired=ROW / diff=ROW / change=ROW, and ROW:METRIC for another metric of ROW
COMPARE = re.compile(r"(vs|paired)=([A-Za-z0-9_.-]+)(?::([^{}|:]+))?")
AGAINST = re.compile(r"(diff|change)=([A-Za-z0-9_.-]+)(?::([^{}|:]+))?")
SHARE = re.compile(r"share=(.+)")


# ---- Render: data -> markdown --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Measured:
    """A measured row's runs, {run: {metric: value}}: `runs` as its statistics see them
    (per seed, averaged over the values of `mean_over` where the row says so), `raw` as
    collected."""
    runs: dict[str, dict[str, float]]
    raw: dict[str, dict[str, float]]
    mean_over: str | None = None


def format_stat(values, spec: str, mode: str | None = None) -> str:
    """`values` in format `spec`: "mean ± std" or one of the modes (module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    percent = spec.endswith("%")
    scale, fmt, unit = (100.0, spec[:-1] + "f", "%") if percent else (1.0, spec, "")
    mean = float(x.mean())

    def show(v, signed=True):   # a spread has no sign, though "+.3f" asks for one
        return format(float(v) * scale, fmt if signed else fmt.replace("+", ""))

    if mode == "std":
        return show(x.std(ddof=1) if x.size > 1 else 0.0, signed=False)
    dash = " to " if x.min() < 0 or "+" in fmt else "-"   # "-0.25 to -0.20", "78.0-96.8%"
    if mode == "range":
        return f"{show(x.min())}{dash}{show(x.max())}{unit}"
    if mode == "each":
        shown = [show(v) for v in np.sort(x)]
        return (", ".join(shown[:-1]) + " and " if len(shown) > 1 else "") + shown[-1] + unit
    if mode == "mean" or x.size == 1 or show(x.max()) == show(x.min()):
        return show(mean) + unit
    text = f"{show(mean)} ± {show(x.std(ddof=1), signed=False)}{unit}"
    if x.max() - x.min() > LARGE_RANGE * abs(mean):
        text += f" ({show(float(x.min()))}{dash}{show(float(x.max()))}{unit})"
    return text


def _metric_values(runs: dict[str, dict[str, float]], metric: str, where: str) -> list:
    values = [m[metric] for m in runs.values() if math.isfinite(m.get(metric, math.nan))]
    if len(values) != len(runs):
        raise TableError(f"{where}: {len(runs) - len(values)} of {len(runs)} runs have no "
                         f"metric {metric!r}")
    return values


def compare(a: list[float], b: list[float], other: str, paired: bool = False) -> str:
    """The verdict on a vs b: "differs from OTHER (p=...)" or "ties with OTHER (p=...)", by
    Welch's t-test, or by the paired t-test ("(paired, p=...)") over a[i], b[i] of one seed."""
    from train.sweep_stats import ALPHA, paired_p, welch_p  # noqa: PLC0415 -- SciPy

    p = paired_p(a, b) if paired else welch_p(a, b)
    if math.isnan(p):
        raise TableError(f"comparing with {other} needs 2 or more runs on each side")
    return (f"{'differs from' if p < ALPHA else 'ties with'} {other} "
            f"({'paired, ' if paired else ''}p={p:.2g})")


def pairs(a: Measured, b: Measured, metric: str, where: str,
          b_metric: str | None = None) -> tuple[list, list]:
    """(a's values of `metric`, b's of `b_metric` (default: the same)) over the seeds both
    rows have, in seed order."""
    from train.sweep_stats import SEED_KEY  # noqa: PLC0415

    def by_seed(runs):
        out = {}
        for name, m in runs.items():
            if SEED_KEY not in m or m[SEED_KEY] in out:
                raise TableError(f"{where}: pairing needs one run per {SEED_KEY}; run {name!r} "
                                 f"has {'none' if SEED_KEY not in m else 'a repeated one'}")
            out[m[SEED_KEY]] = m
        return out

    x, y = by_seed(a.runs), by_seed(b.runs)
    seeds = sorted(set(x) & set(y))
    if len(seeds) < 2:
        raise TableError(f"{where}: pairing needs 2 or more seeds both rows have; they share "
                         f"{[f'{s:g}' for s in seeds]}")
    return tuple(_metric_values({f"{s:g}": runs[s] for s in seeds}, m, where)
                 for runs, m in ((x, metric), (y, b_metric or metric)))


def share(row: Measured, metric: str, part: str, where: str) -> str:
    """The share of the spread of `metric` over a mean_over row's seed x value table that
    lies between the seeds ("seed"), between the values (the mean_over key) or in their
    interaction ("interaction"), as a whole percentage: see sweep_stats.two_way_shares."""
    from train.sweep_stats import SEED_KEY, two_way_shares  # noqa: PLC0415

    parts = (SEED_KEY, row.mean_over, "interaction")
    if row.mean_over is None or part not in parts:
        raise TableError(f"{where}: share={part}: needs a row with mean_over and one of "
                         f"{', '.join(map(str, parts[::2] if row.mean_over is None else parts))}")
    groups = _complete_seeds(row.raw, row.mean_over, where)
    table = [[_metric_values({str(v): runs[v]}, metric, where)[0] for v in sorted(runs)]
             for runs in groups.values()]
    try:
        shares = dict(zip(parts, two_way_shares(table)))
    except ValueError as e:
        raise TableError(f"{where}: share={part}: {e}") from None
    return f"{100 * shares[part]:.0f}%"


def _row_named(ref: str, table: dict[str, Measured] | None,
               results: dict[str, dict[str, Measured]], where: str) -> Measured:
    """The measured row `ref`: "ROW" of the same table or "TABLE.ROW" of any."""
    name, _, row_id = ref.rpartition(".")
    rows = results.get(name) if name else table
    if rows is None:
        raise TableError(f"{where}: {ref}: no such table (a text names rows TABLE.ROW); "
                         f"tables: {', '.join(results)}")
    if row_id not in rows:
        raise TableError(f"{where}: {ref}: no such measured row; rows: {', '.join(rows)}")
    return rows[row_id]


def fill(text: str, row: Measured | None, where: str,
         table: dict[str, Measured] | None = None,
         results: dict[str, dict[str, Measured]] | None = None) -> str:
    """`text` with every placeholder replaced by its statistic over the runs of `row` (None:
    an unmeasured row or a text, whose placeholders must name their row); `table`: this
    table's measured rows (vs=ROW, ROW:metric), `results`: every table's (TABLE.ROW)."""
    def one(match):
        ref, metric, spec, mode = match.group("ref", "metric", "spec", "mode")
        if ref is not None:
            source = _row_named(ref, table, results or {}, where)
        elif row is None:
            raise TableError(f"{where}: {match.group(0)}: placeholders without a row name "
                             "need a workdir to fill them from")
        else:
            source = row
        if (part := SHARE.fullmatch(spec)) is not None:
            return share(source, metric, part.group(1), where)
        if (vs := COMPARE.fullmatch(spec)) is not None:
            kind, other, other_metric = vs.groups()
            against = _row_named(other, table, results or {}, where)
            a, b = (pairs(source, against, metric, where, other_metric) if kind == "paired"
                    else (_metric_values(source.runs, metric, where),
                          _metric_values(against.runs, other_metric or metric,
                                         f"{where} vs {other}")))
            # The row's id alone: in a text "TABLE.ROW" reads as code, the prose names it.
            row_id = other.rpartition(".")[2]
            label = (row_id if other_metric is None else other_metric if against is source
                     else f"{row_id}'s {other_metric}")   # a row's own metric: its name
            return compare(a, b, label, paired=kind == "paired")
        if mode is not None and (against := AGAINST.fullmatch(mode)) is not None:
            kind, other, other_metric = against.groups()
            a, b = (np.asarray(v) for v in pairs(
                source, _row_named(other, table, results or {}, where), metric, where,
                other_metric))
            values, mode = (a - b if kind == "diff" else a / b - 1), None
        else:
            values = _metric_values(source.runs, metric, where)
        try:
            return format_stat(values, spec, mode)
        except ValueError as e:
            raise TableError(f"{where}: bad format {spec!r} for {metric}: {e}") from None

    return PLACEHOLDER.sub(one, text)


def _complete_seeds(runs: dict[str, dict[str, float]], key: str, where: str
                    ) -> dict[float, dict[float, dict[str, float]]]:
    """{seed: {value of key: the run's metrics}} of the seeds that have a run for every
    value of `key` any seed has, in seed order."""
    from train.sweep_stats import SEED_KEY  # noqa: PLC0415 -- it imports the trainer

    groups: dict[float, dict[float, dict]] = {}
    for name, metrics in runs.items():
        if SEED_KEY not in metrics or key not in metrics:
            raise TableError(f"{where}: mean_over={key!r}: run {name!r} has no numeric "
                             f"{SEED_KEY!r} or {key!r}")
        group = groups.setdefault(metrics[SEED_KEY], {})
        if metrics[key] in group:
            raise TableError(f"{where}: mean_over={key!r}: two runs of seed "
                             f"{metrics[SEED_KEY]:g} with {key}={metrics[key]:g}; select "
                             "one sweep axis's runs with where")
        group[metrics[key]] = metrics
    values = set().union(*(set(g) for g in groups.values()))
    complete = {seed: group for seed, group in sorted(groups.items()) if set(group) == values}
    if not complete:
        raise TableError(f"{where}: mean_over={key!r}: no seed has a run for every value "
                         f"{sorted(values)}")
    return complete


def mean_over(runs: dict[str, dict[str, float]], key: str, where: str
              ) -> dict[str, dict[str, float]]:
    """{"seed=S": {metric: mean over the seed's runs}} of the seeds that have a run for
    every value of `key` any seed has (the metrics every one of those runs has)."""
    from train.sweep_stats import SEED_KEY  # noqa: PLC0415

    means = {}
    for seed, group in _complete_seeds(runs, key, where).items():
        common = set.intersection(*(set(m) for m in group.values())) - {key}
        means[f"{SEED_KEY}={seed:g}"] = {m: float(np.mean([r[m] for r in group.values()]))
                                         for m in sorted(common)}
    return means


def measured(table: dict, data: dict) -> dict[str, Measured]:
    """{row id: Measured} of the table's measured rows (`data`: read_data's)."""
    rows = {row["id"]: row for row in table.get("rows", [])}
    out = {}
    for row_id, runs in data.items():
        key = rows.get(row_id, {}).get("mean_over")
        out[row_id] = Measured(mean_over(runs, key, f"row {row_id!r}") if key else runs,
                               runs, key)
    return out


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(name: str, table: dict, results: dict[str, dict[str, Measured]]) -> str:
    """The markdown of table `name`: its columns, then command and seeds (`results`:
    every table's measured rows, as from `measured`)."""
    texts = [c for c in table["columns"] if c != "command"]
    shown = "command" not in table     # a command column: as code, last by default
    header = [*(table["columns"] if shown else texts),
              *(["command"] if shown and "command" not in table["columns"] else []), "seeds"]
    right = set(table.get("right", [])) | {"seeds"}   # right-aligned columns
    lines = ["| " + " | ".join(header) + " |",
             "|" + "".join("---:|" if c in right else "---|" for c in header)]
    data = results.get(name, {})
    for row in table.get("rows", []):
        where = f"table {name!r} row {row['id']!r}"
        own = data.get(row["id"])
        if "workdir" in row and own is None:
            raise TableError(f"{where}: nothing collected from {row['workdir']}; run its "
                             "command, then python -m train.readme_tables --collect")
        cells = {c: _escape(fill(str(row[c]), own, where, data, results)) for c in texts}
        cells["seeds"] = str(len(own.runs)) if own is not None else "1"
        if shown:
            cells["command"] = f"`{_escape(row['command'])}`"
        lines.append("| " + " | ".join(cells[c] for c in header) + " |")
    return "\n".join(lines) + "\n"


def render_text(name: str, template: str, results: dict[str, dict[str, Measured]]) -> str:
    """A text's paragraphs, filled, each wrapped at TEXT_WIDTH columns."""
    filled = fill(template.strip(), None, f"text {name!r}", None, results)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", filled)]
    return "\n\n".join(textwrap.fill(p, TEXT_WIDTH, break_long_words=False,
                                     break_on_hyphens=False) for p in paragraphs) + "\n"


def render_readme(readme: str, tables: dict, repo: str = REPO,
                  texts: dict[str, str] | None = None) -> str:
    """`readme` with every table and text between its markers rewritten."""
    results = {name: measured(table, read_data(repo, name)) for name, table in tables.items()}
    for name in [*tables, *(texts or {})]:
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
        if len(pattern.findall(readme)) != 1:
            raise TableError(f"README.md needs exactly one {start} ... {end} block for "
                             f"{'table' if name in tables else 'text'} {name!r}")
        body = (render_table(name, tables[name], results) if name in tables else
                render_text(name, texts[name], results))
        readme = pattern.sub(lambda _, body=body: f"{start}\n{body}{end}", readme)
    return readme


# ---- Command line --------------------------------------------------------------------------
def run(repo: str = REPO, do_collect: bool = False, check: bool = False,
        spec: str = SPEC) -> int:
    """The command line's work; returns its exit status (1: README.md is stale)."""
    if do_collect:
        for done in collect(repo, spec):
            print(f"collected {done}")
    tables, texts = load_spec(repo, spec), load_texts(repo, spec)
    path = os.path.join(repo, "README.md")
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    new = render_readme(readme, tables, repo, texts)
    if check:
        if new != readme:
            print("flaxlab: README.md's results tables differ from docs/results: run "
                  "python -m train.readme_tables", file=sys.stderr)
            return 1
        return 0
    if new != readme:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"rewrote {', '.join([*tables, *texts])} in README.md")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        return run(flags.FLAGS.repo, flags.FLAGS.collect, flags.FLAGS.check)
    except TableError as e:
        print(f"flaxlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    flags.DEFINE_bool("collect", False, "First read every row's sweep into docs/results/.")
    flags.DEFINE_bool("check", False, "Only check that README.md is up to date (exit 1).")
    flags.DEFINE_string("repo", REPO, "The repository root (README.md, docs/results/).")
    app.run(lambda argv: sys.exit(main(argv)))
