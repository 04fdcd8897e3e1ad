"""Pruning as pure functions on parameter pytrees: magnitude, N:M, gradual, masks in optax.

Every entry point takes the inner params dict (`variables["params"]`) and returns
`(pruned, masks)`:

  pruned  the params with pruned entries set to +0.0 (same structure, shapes and dtypes).
  masks   a tree with the same structure and leaf shapes as params, dtype bool, True = kept.
          Leaves that are not pruned (biases, norms, embeddings unless
          `include_embeddings=True`) get all-True masks, so `jax.tree.map(f, params, masks)`
          needs no special cases and the masks can live in an optax state (and checkpoint
          with it). They cost one byte per parameter.

Which leaves are kernels, and their axes, is decided by `models.compress.common`
(`is_kernel`, `kernel_layout`): only matmul kernels are pruned or counted in sparsity. A
leading stacked-layers axis (`nn.scan`, a path component "layers") is a batch of
independent kernels: layer-scope pruning treats each stacked layer on its own.

Contents
  magnitude(params, sparsity, scope)   unstructured, |w| ranking (Han et al. 2015)
  n_m(params, n, m)                    N:M structured along the input axis (Mishra et al. 2021)
  apply_masks(params, masks)
  polynomial_sparsity / GradualSchedule / update_masks   gradual pruning (Zhu & Gupta 2017)
  keep_pruned(tx, ...)                 optax wrapper holding the masks
  neurons, heads                       structured (prune_structured.py), re-exported
  to_sparse, from_sparse, sparse_nbytes, sparsity_report   storage and accounting
                                       (sparse_storage.py), re-exported

Where popular explanations differ from the papers:
  * A popular explanation of 2:4 says "for each block of 4 consecutive values only 2 are
    allowed to be 0". The NVIDIA 2:4 pattern (Mishra et al. 2021) is the other way round:
    at most 2 of every 4 may be NON-zero. We keep the n largest |w| of each group of m (so
    exactly m - n zeros).
  * A popular explanation of magnitude pruning is "the lowest X% in each layer"; Han et al.
    2015 ("Learning both Weights and Connections") remove weights below a threshold (a
    quality parameter times the layer's std). We prune to an exact target sparsity by rank, per layer or globally, which
    is what the gradual schedule of Zhu & Gupta (2017) needs.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.compress.common import is_kernel, kernel_layout, path_str
# Re-exported so that `prune.<name>` is the one namespace for pruning.
from models.compress.prune_structured import heads, neurons  # noqa: F401
from models.compress.sparse_storage import (  # noqa: F401
    NMKernel, RelativeIndexKernel, SparsityReport, from_sparse, group_axis, sparse_nbytes,
    sparsity_report, to_sparse)

SCOPES = ("layer", "global")
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Helpers shared by the transforms.
# ----------------------------------------------------------------------------------------
def _static_float(x) -> float | None:
    """x as a Python float, or None when it is traced (inside jit)."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except (TypeError, ValueError) as e:   # after the above: they subclass TypeError
        raise ValueError(f"expected a scalar number, got {x!r}") from e


def _check_sparsity(sparsity, name: str = "sparsity") -> float | None:
    value = _static_float(sparsity)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {sparsity}")
    return value


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _num_pruned(sparsity, static: float | None, size: int):
    """round(sparsity * size): exact in Python when static, float32 (jnp.round) when traced.

    Both round half to even. The traced form is exact while sparsity * size < 2**24.
    """
    if static is not None:
        return int(round(static * size))
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _ranks(scores):
    """Rank of each entry along the last axis, ascending; ties by lower index first.

    scores: [rows, n] -> int32 [rows, n], a permutation of 0..n-1 per row.
    """
    order = jnp.argsort(scores, axis=-1, stable=True)
    rows, n = scores.shape
    return jnp.zeros(scores.shape, jnp.int32).at[
        jnp.arange(rows)[:, None], order].set(jnp.arange(n, dtype=jnp.int32)[None, :])


def _scores(w, mask):
    """|w| (at least float32); entries already masked out score -inf: pruned first."""
    w = jnp.asarray(w)
    s = jnp.abs(w).astype(jnp.promote_types(w.dtype, jnp.float32))
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _num_stacked(path: str, shape) -> int:
    """How many independent kernels a leaf holds (the product of its stacked axes)."""
    layout = kernel_layout(path, shape)
    return int(np.prod([shape[a] for a in layout.stack_axes], dtype=np.int64))


def all_true_masks(params):
    """Masks that keep everything: bool all-True with each leaf's shape."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def apply_masks(params, masks):
    """params with masked-out (False) entries set to +0.0; dtypes and shapes unchanged."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))),
                        params, masks)


# ----------------------------------------------------------------------------------------
# Magnitude pruning (unstructured).
# ----------------------------------------------------------------------------------------
def magnitude_masks(params, sparsity, scope: str = "layer", include_embeddings: bool = False,
                    masks=None):
    """Bool masks that prune exactly round(sparsity * size) smallest-|w| kernel entries.

    scope "layer": each kernel (each stacked layer of a stacked kernel) to the target.
    scope "global": one ranking over all kernels, round(sparsity * total) pruned overall.
    Ties are broken deterministically: equal |w| are pruned in tree order, then row-major
    (C) index order. `sparsity` may be traced (jit); then the count is computed in float32.
    `masks`: current masks; entries they prune score -inf, so they stay pruned as long as
    the new count is not smaller (the gradual schedule only increases it).
    """
    _check_scope(scope)
    static = _check_sparsity(sparsity)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    old = [None] * len(flat) if masks is None else treedef.flatten_up_to(masks)
    paths = [path_str(p) for p, _ in flat]
    kern = [is_kernel(p, leaf, include_embeddings) for p, (_, leaf) in zip(paths, flat)]
    out = [jnp.ones(jnp.shape(leaf), bool) for _, leaf in flat]

    if scope == "layer":
        for i, (path, (_, leaf)) in enumerate(zip(paths, flat)):
            if not kern[i]:
                continue
            rows = _num_stacked(path, leaf.shape)
            s = _scores(leaf, old[i]).reshape(rows, -1)
            k = _num_pruned(sparsity, static, s.shape[1])
            out[i] = (_ranks(s) >= k).reshape(leaf.shape)
    else:
        idx = [i for i in range(len(flat)) if kern[i]]
        if idx:
            s = jnp.concatenate([_scores(flat[i][1], old[i]).ravel() for i in idx])
            k = _num_pruned(sparsity, static, s.size)
            keep = _ranks(s[None])[0] >= k
            offsets = np.cumsum([0] + [flat[i][1].size for i in idx])
            for j, i in enumerate(idx):
                out[i] = keep[offsets[j]:offsets[j + 1]].reshape(flat[i][1].shape)
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("sparsity", "scope", "include_embeddings"))
def _magnitude_jit(params, sparsity: float, scope: str, include_embeddings: bool):
    # One compiled program instead of dozens of op-by-op dispatches (much faster on CPU).
    masks = magnitude_masks(params, sparsity, scope, include_embeddings)
    return apply_masks(params, masks), masks


def magnitude(params, sparsity: float = 0.5, scope: str = "layer",
              include_embeddings: bool = False):
    """One-shot magnitude pruning: (pruned params, bool masks). See `magnitude_masks`."""
    _check_scope(scope)
    static = _check_sparsity(sparsity)
    if static is None:                      # traced sparsity: we are inside a jit already
        masks = magnitude_masks(params, sparsity, scope, include_embeddings)
        return apply_masks(params, masks), masks
    return _magnitude_jit(params, static, scope, include_embeddings)


# ----------------------------------------------------------------------------------------
# N:M structured sparsity.
# ----------------------------------------------------------------------------------------
def _n_m_mask(w, axis: int, n: int, m: int):
    """Keep the n largest |w| in each group of m along `axis` (ties: lower index kept)."""
    moved = jnp.moveaxis(_scores(w, None), axis, -1)
    groups = moved.reshape(-1, m)
    keep = _ranks(-groups) < n          # rank by descending |w|
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def _check_n_m(n, m) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))
            and 1 <= n <= m):
        raise ValueError(f"N:M needs Python ints with 1 <= n <= m, got n={n!r}, m={m!r}")


def _check_divisible(params, n: int, m: int, include_embeddings: bool,
                     skip_indivisible: bool) -> None:
    """Shapes only, before any compile: raise for (or log) kernels m does not divide."""
    _check_n_m(n, m)
    skipped = []
    for p, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = path_str(p)
        if not is_kernel(path, leaf, include_embeddings):
            continue
        axis = group_axis(path, leaf.shape)
        if leaf.shape[axis] % m:
            if not skip_indivisible:
                raise ValueError(
                    f"{path}: N:M pruning groups m={m} entries along axis {axis}, but shape "
                    f"{tuple(leaf.shape)} has {leaf.shape[axis]} there (not divisible by "
                    f"{m}); pass skip_indivisible=True to leave such kernels dense")
            skipped.append(path)
    if skipped:
        _log.warning("N:M %d:%d left %d kernel(s) dense (group axis not divisible by %d): %s",
                     n, m, len(skipped), m, ", ".join(skipped))


@functools.partial(jax.jit, static_argnames=("n", "m", "include_embeddings"))
def _n_m_jit(params, n: int, m: int, include_embeddings: bool):
    def one(p, leaf):
        path = path_str(p)
        if not is_kernel(path, leaf, include_embeddings):
            return jnp.ones(jnp.shape(leaf), bool)
        axis = group_axis(path, leaf.shape)
        if leaf.shape[axis] % m:                # skip_indivisible (checked before)
            return jnp.ones(leaf.shape, bool)
        return _n_m_mask(leaf, axis, n, m)

    masks = jax.tree_util.tree_map_with_path(one, params)
    return apply_masks(params, masks), masks


def n_m(params, n: int = 2, m: int = 4, include_embeddings: bool = False,
        skip_indivisible: bool = False):
    """N:M structured pruning: (pruned params, bool masks).

    Masks have exactly n True in every group of m consecutive entries along `group_axis` of
    each kernel (the n largest |w|; ties keep the lower index). A kernel whose group axis m
    does not divide raises ValueError naming its path, shape and m, or with
    `skip_indivisible=True` stays dense (logged as a warning; 0% in `sparsity_report`).
    """
    _check_divisible(params, n, m, include_embeddings, skip_indivisible)
    return _n_m_jit(params, n, m, include_embeddings)


# ----------------------------------------------------------------------------------------
# Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune").
# ----------------------------------------------------------------------------------------
def _check_schedule(initial_sparsity, final_sparsity, begin_step, end_step, frequency):
    si = _check_sparsity(initial_sparsity, "initial_sparsity")
    sf = _check_sparsity(final_sparsity, "final_sparsity")
    if si is not None and sf is not None and si > sf:
        raise ValueError(f"initial_sparsity ({si}) must not exceed final_sparsity ({sf}): "
                         "masks only ever prune more")
    if not (isinstance(frequency, (int, np.integer)) and frequency >= 1):
        raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
    if not (isinstance(begin_step, (int, np.integer)) and isinstance(end_step, (int, np.integer))
            and 0 <= begin_step < end_step):
        raise ValueError(f"need ints 0 <= begin_step < end_step, got begin_step={begin_step!r}"
                         f", end_step={end_step!r}")
    if (end_step - begin_step) % frequency:
        raise ValueError(f"end_step - begin_step ({end_step - begin_step}) must be a multiple "
                         f"of frequency ({frequency}): pruning happens at begin_step + k * "
                         "frequency and the last pruning step must be end_step")


def polynomial_sparsity(step, initial_sparsity: float, final_sparsity: float,
                        begin_step: int, end_step: int, frequency: int, power: float = 3.0):
    """Target sparsity at `step` (Zhu & Gupta 2017, eq. 1), float32 scalar, jit-friendly.

      s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power,  t in {t0, t0 + dt, ...,
      t0 + n * dt}, with t0 = begin_step, dt = frequency, t0 + n * dt = end_step.

    The sparsity changes only at those pruning steps: between them it holds the value of the
    last pruning step. Before begin_step it is s_i (nothing is pruned then: `update_masks`
    does not touch the masks before t0), after end_step s_f.
    """
    _check_schedule(initial_sparsity, final_sparsity, begin_step, end_step, frequency)
    t = jnp.clip(jnp.asarray(step, jnp.int32), begin_step, end_step)
    t_last = begin_step + (t - begin_step) // frequency * frequency   # last pruning step
    progress = (t_last - begin_step).astype(jnp.float32) / (end_step - begin_step)
    return (final_sparsity + (initial_sparsity - final_sparsity)
            * (1.0 - progress) ** power).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class GradualSchedule:
    """Configuration of gradual magnitude pruning (Zhu & Gupta 2017; power 3 in the paper)."""
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: float = 3.0
    scope: str = "layer"
    include_embeddings: bool = False

    def __post_init__(self):
        _check_schedule(self.initial_sparsity, self.final_sparsity, self.begin_step,
                        self.end_step, self.frequency)
        _check_scope(self.scope)

    def sparsity(self, step):
        return polynomial_sparsity(step, self.initial_sparsity, self.final_sparsity,
                                   self.begin_step, self.end_step, self.frequency, self.power)

    def is_pruning_step(self, step):
        """bool scalar: step in {begin_step, begin_step + frequency, ..., end_step}."""
        step = jnp.asarray(step, jnp.int32)
        return ((step >= self.begin_step) & (step <= self.end_step)
                & ((step - self.begin_step) % self.frequency == 0))


def _as_schedule(schedule) -> GradualSchedule:
    if isinstance(schedule, GradualSchedule):
        return schedule
    if isinstance(schedule, Mapping) or hasattr(schedule, "to_dict"):
        items = dict(schedule.to_dict() if hasattr(schedule, "to_dict") else schedule)
        allowed = {f.name for f in dataclasses.fields(GradualSchedule)}
        unknown = sorted(set(items) - allowed)
        if unknown:
            raise ValueError(f"unknown gradual-pruning keys {unknown}; allowed: {sorted(allowed)}")
        return GradualSchedule(**items)
    raise ValueError(f"schedule must be a GradualSchedule or a mapping of its fields, got "
                     f"{type(schedule).__name__}")


def update_masks(params, masks, step, schedule):
    """Masks for `step`: recomputed by magnitude at the schedule's sparsity on a pruning
    step, else `masks` unchanged. Jit-friendly (`step` may be traced; lax.cond picks the
    branch, so the sort runs only on pruning steps). Entries `masks` already prunes stay
    pruned. `schedule`: a GradualSchedule or a mapping (dict / ConfigDict) of its fields.
    """
    schedule = _as_schedule(schedule)

    def recompute(_):
        return magnitude_masks(params, schedule.sparsity(step), schedule.scope,
                               schedule.include_embeddings, masks=masks)

    masks = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
    return jax.lax.cond(schedule.is_pruning_step(step), recompute, lambda _: masks, None)


# ----------------------------------------------------------------------------------------
# Keeping pruned weights at zero through optimizer updates.
# ----------------------------------------------------------------------------------------
class KeepPrunedState(NamedTuple):
    """count: int32 updates seen (the gradual schedule's step); masks: bool tree like
    params (True = kept); inner_state: the wrapped optimizer's state."""
    count: jax.Array
    masks: Any
    inner_state: Any


def keep_pruned(inner: optax.GradientTransformation, masks=None,
                schedule: GradualSchedule | Mapping | None = None
                ) -> optax.GradientTransformationExtraArgs:
    """Wrap an optimizer so pruned weights stay exactly zero; optionally prune gradually.

    Design: the masks live in this transformation's state (so they checkpoint with the
    optimizer state; read them with `optax.tree_utils.tree_get(opt_state, "masks")`). On
    each update:
      1. with a `schedule`, the masks are recomputed from the current params on pruning
         steps (`update_masks` at the state's `count`), else kept;
      2. the gradients of pruned entries are zeroed before the inner optimizer sees them, so
         its moments (momentum, Adam's m and v) never accumulate there;
      3. the inner update of a pruned entry is replaced by -param, so `apply_updates` gives
         param + (-param) = +0.0 exactly. That also zeroes newly pruned weights on the step
         their mask turns False, and cancels anything the inner optimizer adds there on its
         own (decoupled weight decay, momentum from before the prune).
    `masks`: initial masks (e.g. from `magnitude` or `n_m`; one-shot prune then fine-tune);
    default all True. `update` needs `params`. The step counter counts the `update` calls
    that reach this wrapper: put it inside optax.MultiSteps (which calls its inner
    transformation once per accumulated step) for a schedule in optimizer steps.
    """
    schedule = None if schedule is None else _as_schedule(schedule)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        m = all_true_masks(params) if masks is None else jax.tree.map(
            lambda p, k: jnp.broadcast_to(jnp.asarray(k, bool), jnp.shape(p)), params, masks)
        return KeepPrunedState(jnp.zeros([], jnp.int32), m, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("keep_pruned needs the params: call tx.update(grads, state, "
                             "params)")
        m = state.masks
        if schedule is not None:
            m = update_masks(params, m, state.count, schedule)
        updates, inner_state = inner.update(apply_masks(updates, m), state.inner_state,
                                            params, **extra_args)
        updates = jax.tree.map(lambda u, p, k: jnp.where(k, u, -p).astype(jnp.result_type(u)),
                               updates, params, m)
        return updates, KeepPrunedState(optax.safe_increment(state.count), m, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
