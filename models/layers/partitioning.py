"""Logical axis names for parameters and activations, and the rules that map them to a mesh.

Models name the axes of what they create and never see a device mesh (the GSPMD style of
Xu et al. 2021, as in the flax lm1b example and MaxText):

  parameters   nn.Dense(..., kernel_init=partitioning.boxed(init, ("embed", "mlp")))
               `model.init` then returns `nn.LogicallyPartitioned` boxes. Everything that
               stores parameters keeps plain arrays: `nn.unbox(variables)` (or
               `unboxed_init`); the names are read once, from `jax.eval_shape(model.init)`,
               to build the shardings (train/sharding.py).
  activations  x = partitioning.constrain(x, ("batch", "length", "activation_embed"))
               a sharding constraint inside `axis_rules(rules, mesh)`, `x` itself outside
               (model tests and plain jit run without a mesh).

Rules are (logical_name, mesh_axes) pairs in priority order, mesh_axes a mesh axis name, a
tuple of them, or None (replicated). As in flax's `logical_to_mesh_axes`, the first rule
that applies to a dimension wins and a mesh axis shards at most one dimension of an array;
unlike flax, a rule whose mesh axes do not divide the dimension is skipped (a later rule
may still shard it), and so is one left with no mesh axis once those of size 1 (which
split nothing) are dropped. A spec therefore never needs padding.

Parameter axes keep apart what a later tensor / expert mesh axis splits differently:
  embed     model width d_model (every kernel has it; the default FSDP axis)
  mlp       feed-forward hidden units          heads / kv_heads  query / key-value heads
  kv        per-head dimension                 qkv               fused q|k|v head axis
  vocab     token table rows                   position          position table rows
  layers    the stacked axis of scanned layers classes           classifier outputs
  conv_in / conv_out   convolution input / output channels
  expert    a mixture of experts' expert axis (split over the "expert" mesh axis)
Activation axes: batch, length, and activation_{embed,mlp,heads,kv,vocab} (separate from
the parameter names so that sharding a kernel's embed axis over "fsdp" does not shard the
activations' width too; the MaxText convention).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

PARAM_AXES = ("embed", "mlp", "heads", "kv_heads", "kv", "qkv", "vocab", "position",
              "layers", "classes", "conv_in", "conv_out", "expert")
ACTIVATION_AXES = ("batch", "length", "activation_embed", "activation_mlp",
                   "activation_heads", "activation_kv", "activation_vocab")
AXIS_NAMES = PARAM_AXES + ACTIVATION_AXES

Names = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]


def boxed(initializer: Callable, names: Names) -> Callable:
    """`initializer` whose result carries logical axis `names` (one per dimension)."""
    return nn.with_logical_partitioning(initializer, tuple(names))


def unboxed_init(model: nn.Module, *args, **kwargs) -> Any:
    """`model.init(*args, **kwargs)` with the logical boxes removed: plain arrays."""
    return nn.unbox(model.init(*args, **kwargs))


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(names: Names, shape: Sequence[int], rules: Rules,
                    mesh_shape: Mapping[str, int]) -> P:
    """PartitionSpec for an array of `shape` whose dimensions are called `names`.

    Args:
      names: one logical name (or None: never sharded) per dimension.
      shape: the array's shape.
      rules: (logical_name, mesh_axes) in priority order (see the module docstring).
      mesh_shape: mesh axis name -> size.

    Returns:
      P() when nothing is sharded, else a spec with one entry per dimension.

    Raises:
      ValueError: `names` and `shape` differ in length, or a name occurs twice.
    """
    names, shape = tuple(names), tuple(shape)
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {names} do not match the shape {shape}")
    dups = {n for n in names if n is not None and names.count(n) > 1}
    if dups:
        raise ValueError(f"logical axis names {names} repeat {sorted(dups)}")
    spec: list[Any] = [None] * len(shape)
    decided = [n is None for n in names]
    used: set[str] = set()
    for name, entry in rules:
        if name not in names:
            continue
        dim = names.index(name)
        if decided[dim]:
            continue
        if entry is None:  # an explicit "replicated" rule settles this dimension
            decided[dim] = True
            continue
        axes = tuple(a for a in _mesh_axes(entry) if mesh_shape.get(a, 1) > 1)
        if (not axes or used.intersection(axes)
                or shape[dim] % math.prod(mesh_shape[a] for a in axes)):
            continue  # nothing to split over, axis taken, or no even split: try later rules
        spec[dim] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        decided[dim] = True
    return P(*spec) if any(s is not None for s in spec) else P()


# The rules and mesh that `constrain` uses; thread-local like flax's own axis_rules, and
# separate from it so flax's LogicallyPartitioned.unbox never applies constraints itself.
_CONTEXT = threading.local()


@contextlib.contextmanager
def axis_rules(rules: Rules, mesh: jax.sharding.Mesh):
    """Within the block, `constrain` maps logical names to `mesh` through `rules`.

    Enter it around the jit *calls* (tracing happens at the first call). It also makes
    `mesh` the abstract mesh of the context: jax keys its trace cache on that, so a
    function traced outside the block is traced again inside (the rules themselves are
    not part of the key: one set of rules per mesh).
    """
    previous = getattr(_CONTEXT, "value", None)
    _CONTEXT.value = (tuple((name, entry) for name, entry in rules), mesh)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _CONTEXT.value = previous


def current_rules() -> tuple[Rules, jax.sharding.Mesh] | None:
    """(rules, mesh) of the innermost `axis_rules` block, or None outside one."""
    return getattr(_CONTEXT, "value", None)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Sharding constraint on activation `x` by logical `names`; `x` outside `axis_rules`.

    Only the sharded dimensions are pinned; the others (no rule, or mesh axes that do not
    divide them, e.g. an evaluation or decoding batch smaller than the device count) are
    left UNCONSTRAINED for XLA's propagation, so a constraint never forces a gather.
    """
    if len(names) != x.ndim:  # checked without a mesh too, so model tests catch it
        raise ValueError(f"logical axis names {tuple(names)} do not match the activation "
                         f"shape {x.shape}")
    context = current_rules()
    if context is None:
        return x
    rules, mesh = context
    spec = logical_to_spec(names, x.shape, rules, dict(mesh.shape))
    if spec == P():
        return x
    pinned = P(*(P.UNCONSTRAINED if s is None else s for s in spec))
    return lax.with_sharding_constraint(x, NamedSharding(mesh, pinned))
