"""The expert_load evaluator: how evenly a mixture of experts' router spreads the tokens.

Reads the per-expert load (the fraction of routed choices per expert, `moe_load/<layer>/
expert_<i>`, train/tasks/moe_objective.py) from metrics.jsonl: the training rows give
expert_load.png (one panel per MoE layer, a line per expert against the step), the last
validation row the numbers -- per layer max / min load (the balance an auxiliary loss buys:
1 is perfectly even) and the coefficient of variation; the worst layer's are reported.
An expert that received nothing has load 0, which would make the ratio infinite: the min
is floored at MIN_LOAD = 1e-4 (so the ratio is capped at 1e4 x max), and `idle_experts`
counts such experts.
"""
from __future__ import annotations

import os
import re

import numpy as np

from train import metrics_log
from train.evaluators.base import Evaluator

_KEY = re.compile(r"^moe_load/(.+)/expert_(\d+)$")
MIN_LOAD = 1e-4   # the floor under a load of 0 in max / min


def loads(record: dict) -> dict[str, np.ndarray]:
    """{layer: [N] loads} of one metrics.jsonl record."""
    table: dict[str, dict[int, float]] = {}
    for key, value in record.items():
        match = _KEY.match(key)
        if match:
            table.setdefault(match.group(1), {})[int(match.group(2))] = value
    return {layer: np.array([experts[i] for i in sorted(experts)])
            for layer, experts in sorted(table.items())}


def balance(load: np.ndarray) -> dict[str, float]:
    """max / min (min floored at MIN_LOAD), coefficient of variation, idle experts."""
    return {"max_over_min": float(load.max() / max(load.min(), MIN_LOAD)),
            "cv": float(load.std() / max(load.mean(), MIN_LOAD)),
            "idle_experts": float(np.sum(load <= 0))}


class ExpertLoad(Evaluator):
    """expert_load.png and the worst MoE layer's balance (see the module docstring)."""

    name = "expert_load"

    def run(self, step, params, model_state, final):
        records = metrics_log.read_metrics(self.ctx.workdir)
        train = [(r["step"], loads(r)) for r in records if r["split"] == "train"]
        train = [(s, l) for s, l in train if l]
        evaluated = [loads(r) for r in records if r["split"] == "validation"]
        evaluated = [l for l in evaluated if l]
        if not evaluated:
            raise ValueError("evals.expert_load: no moe_load metrics in metrics.jsonl (is "
                             "model.moe.every > 0?)")
        per_layer = {layer: balance(load) for layer, load in evaluated[-1].items()}
        worst = max(per_layer.values(), key=lambda b: b["max_over_min"])
        if train:
            self._plot(train)
        return {**worst, "layers": float(len(per_layer))}

    def _plot(self, train):
        import matplotlib  # noqa: PLC0415 -- lazy: plotting only when asked
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        layers = list(train[-1][1])
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
        steps = [s for s, _ in train]
        for ax, layer in zip(axes[0], layers):
            series = np.array([l[layer] for _, l in train])        # [steps, N]
            for i in range(series.shape[1]):
                ax.plot(steps, series[:, i], label=f"expert {i}", linewidth=1)
            ax.axhline(1.0 / series.shape[1], color="k", linestyle=":", linewidth=1)
            ax.set_title(layer)
            ax.set_xlabel("step")
            ax.set_ylabel("fraction of routed choices")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(os.path.join(self.ctx.workdir, "expert_load.png"), dpi=100)
        plt.close(fig)
