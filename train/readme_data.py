"""README's results data: the tables spec (docs/results/tables.toml) and the runs each
measured row collects from its sweep into docs/results/<table>.csv. train/readme_tables.py
renders them into README.md; its docstring describes the spec.
"""
from __future__ import annotations

import csv
import json
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join("docs", "results", "tables.toml")
MIN_SEEDS = 3
SEEDS_FLAG = re.compile(r"--seeds=(\d+)")
DATA_HEADER = ["row", "run", "metric", "value"]
REACH_METRIC = "reach/steps"   # sweep_reach.py's steps_to_reach, where reach.json is


class TableError(ValueError):
    """A spec, sweep or README that cannot give a table: one line saying what and where."""


# ---- Spec ---------------------------------------------------------------------------------
def _read_spec(repo: str, spec: str) -> dict:
    path = os.path.join(repo, spec)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TableError(f"cannot read the tables spec {path}: {e}") from None


def load_spec(repo: str = REPO, spec: str = SPEC) -> dict:
    """{table name: {"columns": [...], "rows": [{id, command, workdir?, where?, <column>}]}}"""
    tables = _read_spec(repo, spec).get("tables", {})
    for name, table in tables.items():
        columns = table.get("columns")
        if not columns or not isinstance(columns, list):
            raise TableError(f"{spec}: table {name!r} needs columns = [...]")
        ids = [row.get("id") for row in table.get("rows", [])]
        needs = ("id", *([] if "command" in table else ["command"]), *columns)
        for row, row_id in zip(table.get("rows", []), ids):
            missing = [c for c in needs if c not in row]
            if missing:
                raise TableError(f"{spec}: table {name!r} row {row_id!r} has no "
                                 f"{', '.join(missing)}")
        if len(set(ids)) != len(ids):
            raise TableError(f"{spec}: table {name!r} repeats a row id: {ids}")
    return tables


def load_texts(repo: str = REPO, spec: str = SPEC) -> dict[str, str]:
    """{text name: its template}: the spec's [texts.NAME] text = "..." paragraphs."""
    raw = _read_spec(repo, spec)
    texts = {}
    for name, entry in raw.get("texts", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise TableError(f"{spec}: text {name!r} needs text = \"...\"")
        if name in raw.get("tables", {}):
            raise TableError(f"{spec}: {name!r} is both a table and a text")
        texts[name] = entry["text"]
    return texts


def _data_path(repo: str, name: str) -> str:
    return os.path.join(repo, os.path.dirname(SPEC), f"{name}.csv")


# ---- Collect: sweep outputs -> docs/results/<table>.csv ------------------------------------
def runs_of_row(repo: str, row: dict, command: str = "") -> dict[str, dict[str, float]] | None:
    """{run name: {metric: value}} of the row's finished runs; None without its workdir.
    `command`: the table's, for a row without its own."""
    command = row.get("command", command)
    workdir = os.path.join(repo, row["workdir"])
    results = os.path.join(workdir, "results.csv")
    if not os.path.exists(results):
        return None
    with open(os.path.join(workdir, "sweep.json"), encoding="utf-8") as f:
        seeds = int(json.load(f).get("seeds", 1))
    flag = SEEDS_FLAG.search(command)
    if seeds < MIN_SEEDS or flag is None or int(flag.group(1)) != seeds:
        raise TableError(f"row {row['id']!r}: {row['workdir']} was swept with --seeds={seeds}"
                         f"; its command must say --seeds={seeds} and that must be at least "
                         f"{MIN_SEEDS}: {command}")
    with open(results, newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    where = {k: str(v) for k, v in row.get("where", {}).items()}
    runs = {}
    for line in lines:
        if line["status"] != "finished" or any(line.get(k) != v for k, v in where.items()):
            continue
        metrics = {}
        for key, text in line.items():
            try:
                metrics[key] = float(text)
            except (TypeError, ValueError):
                continue
        runs[line["run"]] = metrics
    for name, metrics in _reach_metrics(workdir).items():
        if name in runs:
            runs[name].update(metrics)
    if not runs:
        raise TableError(f"row {row['id']!r}: no finished run in {results}"
                         + (f" with {where}" if where else ""))
    return runs


def _reach_metrics(workdir: str) -> dict[str, dict[str, float]]:
    """{run: {"reach/steps": the first step it reached its target, "METRIC@STEP": its value
    there}} from the sweep's reach.json (train/sweep_reach.py), if there is one; a run that
    never reached its target, or was not evaluated at STEP, has no such metric."""
    path = os.path.join(workdir, "reach.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        reach = json.load(f)
    out = {}
    for r in reach["rows"]:
        metrics = {key: float(v) for key, v in r.get("at", {}).items() if v is not None}
        if r["steps_to_reach"] is not None:
            metrics[REACH_METRIC] = float(r["steps_to_reach"])
        out[r["name"]] = metrics
    return out


def read_data(repo: str, name: str) -> dict[str, dict[str, dict[str, float]]]:
    """{row id: {run: {metric: value}}} as collected for table `name` ({} if none yet)."""
    path = _data_path(repo, name)
    if not os.path.exists(path):
        return {}
    data: dict = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line in csv.DictReader(f):
            data.setdefault(line["row"], {}).setdefault(line["run"], {})[line["metric"]] = (
                float(line["value"]))
    return data


def collect(repo: str = REPO, spec: str = SPEC) -> list[str]:
    """Refresh every table's data from the sweeps present; return the ids collected."""
    collected = []
    for name, table in load_spec(repo, spec).items():
        data = read_data(repo, name)
        ids = {row["id"] for row in table.get("rows", [])}
        data = {k: v for k, v in data.items() if k in ids}   # rows removed from the spec
        for row in table.get("rows", []):
            runs = (runs_of_row(repo, row, table.get("command", "")) if "workdir" in row
                    else None)
            if runs is not None:
                data[row["id"]] = runs
                collected.append(f"{name}/{row['id']}")
        if data:
            os.makedirs(os.path.dirname(_data_path(repo, name)), exist_ok=True)
            with open(_data_path(repo, name), "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(DATA_HEADER)
                for row_id, runs in data.items():
                    for run, metrics in runs.items():
                        for metric, value in sorted(metrics.items()):
                            writer.writerow([row_id, run, metric, repr(value)])
    return collected
