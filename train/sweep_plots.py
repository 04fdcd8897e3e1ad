"""Sweep figures: results.png (metric per run, loss curves), pareto.png (metric vs
stored bytes for compression sweeps, with the Pareto front), and a search's history.png
(trial values, best so far) and importances.png (train/search.py)."""
from __future__ import annotations

import math
import os

from train.metrics_log import read_metrics


def pareto_points(records: list[dict], metric: str) -> list[tuple[str, float, float]]:
    """(run, bytes, metric) per finished run: a compressed run's stored bytes and its
    compressed model's metric (`compressed/<metric>`), else the float model's."""
    points = []
    for r in records:
        m = r["metrics"]
        size = m.get("compressed/bytes", m.get("params/bytes"))
        value = m.get(f"compressed/{metric}", m.get(metric))
        if size is not None and value is not None and math.isfinite(value):
            points.append((r["name"], float(size), float(value)))
    return points


def pareto_front(points, direction: str) -> list[tuple[str, float, float]]:
    """The points no other point beats on both size (smaller) and metric, by size."""
    better = (lambda a, b: a < b) if direction == "min" else (lambda a, b: a > b)
    front, best = [], None
    for point in sorted(points, key=lambda p: (p[1], p[2] if direction == "min" else -p[2])):
        if best is None or better(point[2], best):
            front.append(point)
            best = point[2]
    return front


def plot_pareto(records: list[dict], workdir: str, metric: str, direction: str) -> str:
    """pareto.png: the metric of every run against its stored bytes, front highlighted."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    points = pareto_points(records, metric)
    front = pareto_front(points, direction)
    # Run names are long: number the points and list the names under the axes.
    fig, ax = plt.subplots(figsize=(8, 5 + 0.18 * len(points)), layout="constrained")
    ax.scatter([p[1] / 1e6 for p in points], [p[2] for p in points], color="tab:blue")
    for i, (_, size, value) in enumerate(points, 1):
        ax.annotate(str(i), (size / 1e6, value), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_title("accuracy vs size\n" + "\n".join(
        f"{i}: {name}" for i, (name, _, _) in enumerate(points, 1)), fontsize=7, loc="left")
    ax.plot([p[1] / 1e6 for p in front], [p[2] for p in front], "-o", color="tab:red",
            label="Pareto front")
    ax.set_xlabel("stored bytes (MB; compressed form where compressed)")
    ax.set_ylabel(metric + " (compressed model where compressed)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, "pareto.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_results(ranked: list[dict], workdir: str, sort_metric: str,
                 filename: str = "results.png") -> str:
    """(a) `sort_metric` per run as bars, best on top; (b) every run's loss curves."""
    import matplotlib  # noqa: PLC0415 -- lazy, like metrics_log
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    colors = plt.get_cmap("tab10" if len(ranked) <= 10 else "tab20").colors
    color = {r["name"]: colors[i % len(colors)] for i, r in enumerate(ranked)}
    # Run names are long: widen the figure for them rather than squeeze the axes.
    width = 6 + 0.065 * max((len(r["name"]) for r in ranked), default=0)
    fig = plt.figure(figsize=(width, 7 + 0.5 * len(ranked)), layout="constrained")
    # Subfigures lay out independently: the bar labels' margin is not forced on the curves.
    top, bottom = fig.subfigures(2, 1, height_ratios=[1 + 0.3 * len(ranked),
                                                      4 + 0.2 * len(ranked)])
    bars, curves = top.subplots(), bottom.subplots()

    shown = [r for r in ranked if math.isfinite(r["metrics"].get(sort_metric, math.nan))]
    drawn = bars.barh(range(len(shown)), [r["metrics"][sort_metric] for r in shown],
                      color=[color[r["name"]] for r in shown])
    bars.bar_label(drawn, fmt="%.4g", fontsize=7, padding=2)
    bars.set_yticks(range(len(shown)), [r["name"] for r in shown], fontsize=8)
    bars.invert_yaxis()  # best on top
    bars.set_xlabel(sort_metric)
    missing = len(ranked) - len(shown)
    bars.set_title(f"{sort_metric} per run"
                   + (f" (not reported by {missing} of the runs)" if missing else ""))
    bars.grid(axis="x", alpha=0.3)

    for r in ranked:
        records = read_metrics(os.path.join(workdir, r["name"]))
        for split, style in (("train", "-"), ("validation", "o--")):
            # By step, last record wins: a resumed run may have logged a step twice.
            points = sorted({m["step"]: m["loss"] for m in records
                             if m["split"] == split and "loss" in m}.items())
            if points:
                curves.plot(*zip(*points), style, color=color[r["name"]], markersize=3,
                            label=r["name"] if split == "train" else None)
    handles, _ = curves.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", linestyle="-", label="train"),
                Line2D([], [], color="gray", linestyle="--", marker="o", markersize=3,
                       label="validation")]
    curves.legend(handles=handles, fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.12), ncol=2 if len(handles) > 8 else 1)
    curves.set_xlabel("step")
    curves.set_ylabel("loss")
    curves.set_title("loss curves")
    curves.grid(alpha=0.3)
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_history(points: list[tuple[int, float, str]], workdir: str, metric: str,
                 direction: str) -> str:
    """history.png: each search trial's value by trial number (pruned trials at their last
    intermediate value, as crosses) and the best finished value so far."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for state, label, style in (
            ("finished", "finished trial", dict(marker="o", color="tab:blue")),
            ("pruned", "pruned trial (its last validation value)",
             dict(marker="x", color="tab:gray"))):
        shown = [(n, v) for n, v, s in points if s == state and math.isfinite(v)]
        if shown:
            ax.scatter(*zip(*shown), label=label, **style)
    best, steps = None, []
    for number, value, state in points:
        if state == "finished" and math.isfinite(value):
            best = value if best is None else (min if direction == "min" else max)(best, value)
        if best is not None:
            steps.append((number, best))
    if steps:
        ax.step(*zip(*steps), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"optimization history ({'lower' if direction == 'min' else 'higher'} "
                 "is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, "history.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_importances(importances: dict[str, float], workdir: str, method: str) -> str:
    """importances.png: each searched key's importance, largest on top."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = sorted(importances, key=importances.get, reverse=True)
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(names)), layout="constrained")
    bars = ax.barh(range(len(names)), [importances[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"importance ({method}; sums to 1)")
    ax.set_title("parameter importances")
    ax.grid(axis="x", alpha=0.3)
    path = os.path.join(workdir, "importances.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
