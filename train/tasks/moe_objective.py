"""A mixture-of-experts model's auxiliary objective and routing metrics.

MoE layers (models/layers/moe.py) sow their statistics into the `moe_stats` collection;
`layer_stats` reads them back per layer (unrolled `layers_i` or a scanned stack's leading
layer axis), and `objective` turns them into the loss terms and (sum, weight) metrics:

  penalty = switch_weight * sum over MoE layers of the Switch loss
          + z_weight * sum over MoE layers of the router z-loss

(each layer has its own balancing term, as in Switch and ST-MoE). Metrics: moe_switch_loss,
moe_z_loss and moe_dropped (the layers' mean), and moe_load/<layer>/expert_<i> (the
fraction of routed choices that picked each expert), weighted by the routed tokens.
"""
from __future__ import annotations

import jax.numpy as jnp

from models.layers.moe import MoeConfig


def layer_stats(tree, path=()) -> list[tuple[str, dict]]:
    """[(layer name, stats)] of a `moe_stats` collection, in layer order."""
    out = []
    for key in sorted(tree, key=_layer_order):
        sub = tree[key]
        if key == "stats":
            (stats,) = sub          # one call per layer per forward
            name = "/".join(path)
            if path and path[-1] == "layers":  # scanned: [L, ...] per statistic
                for i in range(stats["weighted"].shape[0]):
                    out.append((f"{'/'.join(path[:-1])}/layers_{i}",
                                {k: v[i] for k, v in stats.items()}))
            else:
                out.append((name, stats))
        elif isinstance(sub, dict):
            out.extend(layer_stats(sub, path + (key,)))
    return out


def _layer_order(key: str):
    head, _, tail = key.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (key, -1)


def objective(tree, cfg: MoeConfig):
    """(penalty, metrics) of a model's sown MoE statistics (see the module docstring)."""
    layers = layer_stats(tree)
    if not layers:
        raise ValueError("no MoE statistics were sown (is model.moe.every > 0?)")
    weight = layers[0][1]["weighted"]
    mean = {key: sum(s[key] for _, s in layers) / len(layers)
            for key in ("switch_loss", "z_loss", "dropped")}
    penalty = len(layers) * (cfg.switch_weight * mean["switch_loss"]
                             + cfg.z_weight * mean["z_loss"])
    metrics = {f"moe_{key}": (value * weight, weight) for key, value in mean.items()}
    for name, stats in layers:
        for i in range(stats["load"].shape[0]):
            metrics[f"moe_load/{name}/expert_{i}"] = (stats["load"][i] * stats["weighted"],
                                                      stats["weighted"])
    return jnp.asarray(penalty, jnp.float32), metrics
