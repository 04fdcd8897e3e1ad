"""Learnable unit gates for automatic weight inheritance: hard-concrete L0 gates.

Louizos, Welling & Kingma 2018 ("Learning sparse neural networks through L0
regularization"), as structured pruning uses them (Wang et al. 2020; CoFi, Xia et al.
2022) and TinyCLIP's automatic inheritance (Wu et al. 2023, sec. 3.2): each unit (an
attention head, an MLP neuron) has a gate z in [0, 1] with a learned log_alpha,

  training   u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
             z = clip(s * (r - l) + l, 0, 1)           (a stretched, clipped concrete)
  evaluation z = clip(sigmoid(log_alpha) * (r - l) + l, 0, 1)
  P(z > 0) = sigmoid(log_alpha - beta * log(-l / r))   (differentiable: the expected L0)

with beta = 2/3, (l, r) = (-0.1, 1.1). The stretch makes exact zeros and ones reachable,
so after training most gates are exactly 0 or 1. `UnitGate` gates its input; `GateValues`
returns z itself, for a gate shared by several places (a residual channel's gate acts in
every layer, CoFi's hidden-dimension mask). The parameter is named `gate_log_alpha` so the
sparsity objective (train/tasks/distill_losses.py) and `models/compress/inherit.py` find
every gate by name.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

BETA, LIMIT_L, LIMIT_R = 2.0 / 3.0, -0.1, 1.1
PARAM = "gate_log_alpha"
LAGRANGE = "gate_lagrange"  # [1] per gated stack: the sparsity constraint's multiplier
INIT_LOG_ALPHA = 2.5  # P(z > 0) = 0.98, the deterministic gate 1: the inherited model


def deterministic_gate(log_alpha):
    """The evaluation-time gate values, [..., units] in [0, 1]."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


def sampled_gate(log_alpha, rng):
    """One training-time sample of the gates (reparameterized: differentiable in
    log_alpha)."""
    u = jax.random.uniform(rng, log_alpha.shape, minval=1e-6, maxval=1.0 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


def prob_open(log_alpha):
    """P(z > 0) per unit: the expected L0 norm's terms."""
    return jax.nn.sigmoid(log_alpha - BETA * jnp.log(-LIMIT_L / LIMIT_R))


def _gate(module: nn.Module, units: int, deterministic: bool):
    log_alpha = module.param(PARAM, nn.initializers.constant(INIT_LOG_ALPHA), (units,),
                             jnp.float32)
    if deterministic:
        return deterministic_gate(log_alpha)
    return sampled_gate(log_alpha, module.make_rng("dropout"))


class UnitGate(nn.Module):
    """x [..., units] -> x * z (z sampled with the "dropout" rng in training, the
    deterministic value otherwise)."""
    units: int

    @nn.compact
    def __call__(self, x, deterministic: bool):
        return x * _gate(self, self.units, deterministic).astype(x.dtype)


class GateValues(nn.Module):
    """() -> z [units] float32: one draw of the gates (the deterministic values in
    evaluation), for the caller to apply wherever the units occur."""
    units: int

    @nn.compact
    def __call__(self, deterministic: bool):
        return _gate(self, self.units, deterministic)
