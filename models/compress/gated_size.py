"""The size of a gated transformer stack (automatic inheritance, models/layers/gates.py).

One formula counts a layer's attention (q, k, v and out per head) and MLP (fc1, fc2 and a
bias per unit) parameters:

  size = p_att * heads * 4 * head_dim * width + p_mlp * units * (2 * width + 1)

With every gate open it is the layer's real size; with the gates' P(open) in place of the
counts (the expected open heads, units, residual channels, and the whole-branch gates'
probabilities) it is the expected size, the product of the expected counts, as CoFi's
expected model size (Xia et al. 2022, eq. 4). `expected_sparsity` (differentiable: the
distillation's sparsity constraint) and inheritance's layer ranking
(models/compress/inherit.py) both use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models import transformer
from models.layers import gates


def layer_size(heads, head_dim, units, width, p_att=1.0, p_mlp=1.0):
    """Parameters of one layer's attention and MLP (see the module docstring); any argument
    may be an expected count or an array of them (NumPy or jax)."""
    return p_att * heads * 4 * head_dim * width + p_mlp * units * (2 * width + 1)


def _open(sub: dict, name: str, default):
    """Sum over the last axis of P(gate open) of gate `name` in `sub` ([L] for a scanned
    stack, a scalar unrolled), or `default` where there is no such gate."""
    if name not in sub:
        return default
    return jnp.sum(gates.prob_open(sub[name][gates.PARAM]), axis=-1)


def expected_sparsity(stack) -> jax.Array:
    """The expected fraction of a gated stack's attention and MLP parameters that its
    gates remove: 1 - E[size] / size over its layers (unrolled `layers_i` or scanned
    `layers`), from P(z > 0) of every layer, head, unit and residual-channel gate
    (Louizos et al.'s expected L0, weighted by size)."""
    layers = [stack["layers"]] if "layers" in stack else [
        v for k, v in stack.items() if k.startswith("layers_")]
    kept = total = 0.0
    for layer in layers:
        att, mlp = layer["self_attention"], layer["mlp"]
        heads, head_dim, d = att["out"]["kernel"].shape[-3:]          # [.., H, hd, D]
        units = mlp["fc2"]["kernel"].shape[-2]                        # [.., F, D]
        count = att["out"]["kernel"].shape[0] if att["out"]["kernel"].ndim == 4 else 1
        expected = layer_size(
            _open(att, "head_gate", heads), head_dim, _open(mlp, "unit_gate", units),
            _open(stack, transformer.CHANNEL_GATE, d),
            _open(layer["attention_sublayer"], "layer_gate", 1.0),
            _open(layer["mlp_sublayer"], "layer_gate", 1.0))
        kept = kept + jnp.sum(expected)
        total = total + count * layer_size(heads, head_dim, units, d)
    return 1.0 - kept / total
