"""Structured pruning: whole output neurons / conv channels, whole attention heads.

Weight pruning zeroes single connections; neuron pruning removes a unit.
Here a removed unit is expressed as masks (bool, True = kept, same structure and shapes as
params, all-True for untouched leaves, as in prune.py), so the model keeps its shapes and the
optax wrapper `prune.keep_pruned` keeps the unit removed while fine-tuning. Physically
shrinking the layers (and the next layer's inputs) is weight inheritance's job.

A removed unit's bias is masked too (the sibling "bias" leaf of the same module): its
pre-activation is then exactly 0 for every input, so with act(0) = 0 (ReLU, GELU) the unit
outputs 0 -- it is removed, not turned into a constant. That is the one place where pruning
touches a non-kernel leaf. Norms are L2 norms of the unit's incoming weights; per layer
(each stacked layer on its own); ties go to the lower index (it is removed first).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from models.compress.common import is_kernel, kernel_layout, path_str


def _num_removed(fraction, count, units: int, what: str) -> int:
    """How many of `units` to remove, from exactly one of fraction / count."""
    if (fraction is None) == (count is None):
        raise ValueError(f"{what}: pass exactly one of fraction (0..1) or count (an int), "
                         f"got fraction={fraction!r}, count={count!r}")
    if fraction is not None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"{what}: fraction must be in [0, 1], got {fraction}")
        return int(round(float(fraction) * units))
    if not (isinstance(count, (int, np.integer)) and 0 <= count <= units):
        raise ValueError(f"{what}: count must be an int in [0, {units}], got {count!r}")
    return int(count)


def _lowest(scores, k: int):
    """bool [rows, units]: True for the k lowest scores per row (ties: lower index)."""
    order = jnp.argsort(scores, axis=-1, stable=True)
    rows, units = scores.shape
    ranks = jnp.zeros(scores.shape, jnp.int32).at[jnp.arange(rows)[:, None], order].set(
        jnp.arange(units, dtype=jnp.int32)[None, :])
    return ranks < k


def _assemble(params, kernel_masks: dict, unit_masks: dict):
    """Masks tree: kernel_masks by path; unit_masks (path of a sibling bias -> bool of its
    shape); all-True elsewhere."""
    def one(p, leaf):
        path = path_str(p)
        m = kernel_masks.get(path, unit_masks.get(path))
        return jnp.ones(jnp.shape(leaf), bool) if m is None else m
    masks = jax.tree_util.tree_map_with_path(one, params)
    pruned = jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), jnp.result_type(x))),
                          params, masks)
    return pruned, masks


# Jitted whole (arguments other than params are static): one compile, not op-by-op dispatch.
@functools.partial(jax.jit, static_argnames=("fraction", "count", "paths", "include_embeddings"))
def neurons(params, fraction: float | None = None, count: int | None = None,
            paths: str = ".*", include_embeddings: bool = False):
    """Remove whole output units with the smallest L2 norm of their incoming weights.

    A unit is one index of a kernel's output axes: an output column of a Dense [in, out], an
    output channel of a conv [kh, kw, in, out] (norm over kh, kw, in), one (head, dim) output
    of an attention q/k/v projection. `paths`: a regex (re.search) selecting the kernels by
    path -- exclude the output head (e.g. "mlp/fc1") unless removing classes is intended.
    Per kernel (per stacked layer) round(fraction * units) or `count` units are removed.
    Returns (pruned, masks); the unit's bias entries are masked as well.
    """
    pattern = re.compile(paths)
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    kernel_masks, bias_masks = {}, {}
    for path, w in flat.items():
        if not (is_kernel(path, w, include_embeddings) and pattern.search(path)):
            continue
        layout = kernel_layout(path, w.shape)
        stack = [w.shape[a] for a in layout.stack_axes]
        out = [w.shape[a] for a in layout.out_axes]
        units = int(np.prod(out))
        k = _num_removed(fraction, count, units, path)
        # [*stack, *in, *out] -> [rows, in, units] (axes are already in that order).
        w3 = jnp.asarray(w, jnp.float32).reshape(int(np.prod(stack)), -1, units)
        removed = _lowest(jnp.sum(w3 * w3, axis=1), k)           # [rows, units]
        keep = ~removed
        kernel_masks[path] = jnp.broadcast_to(keep[:, None, :], w3.shape).reshape(w.shape)
        bias = path.rsplit("/", 1)[0] + "/bias"
        if bias in flat and tuple(flat[bias].shape) == tuple(stack + out):
            bias_masks[bias] = keep.reshape(flat[bias].shape)
    if not kernel_masks:
        raise ValueError(f"neurons: no kernel path matches {paths!r}")
    return _assemble(params, kernel_masks, bias_masks)


def _attention_modules(flat: dict) -> list[str]:
    """Prefixes P with P/out/kernel and P/query/kernel (or P/qkv/kernel): attention blocks
    of models/layers/attention.py."""
    return [p[:-len("/out/kernel")] for p in flat if p.endswith("/out/kernel")
            and (p[:-len("out/kernel")] + "query/kernel" in flat
                 or p[:-len("out/kernel")] + "qkv/kernel" in flat)]


@functools.partial(jax.jit, static_argnames=("fraction", "count", "paths"))
def heads(params, fraction: float | None = None, count: int | None = None,
          paths: str = ".*"):
    """Remove whole attention heads with the smallest norm (per attention block and layer).

    Layouts (models/layers/attention.py, with an optional leading stacked-layers axis):
    query [in, H, D], key/value [in, KV, D] (KV divides H: grouped-query attention), or fused
    qkv [in, H + 2 KV, D]; out [H, D, out]. Head h's score is the L2 norm of everything it
    uses: query[:, h], out[h], and key[:, g], value[:, g] of its group g = h // (H / KV).
    Removing h masks query[:, h] (and its bias) and out[h]; a key/value head (and bias) is
    masked only when every query head of its group is removed. The out bias (shared) stays.
    `paths`: a regex selecting attention blocks by their path prefix. Returns (pruned, masks).
    """
    pattern = re.compile(paths)
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    prefixes = [p for p in _attention_modules(flat) if pattern.search(p)]
    if not prefixes:
        raise ValueError(f"heads: no attention block (…/out/kernel with …/query/kernel or "
                         f"…/qkv/kernel) matches {paths!r}")
    masks = {}
    for prefix in prefixes:
        out_path = prefix + "/out/kernel"
        wo = jnp.asarray(flat[out_path], jnp.float32)
        n_stack = len(kernel_layout(out_path, wo.shape).stack_axes)
        stack, (h, d) = wo.shape[:n_stack], wo.shape[n_stack:n_stack + 2]
        rows = int(np.prod(stack))
        fused = prefix + "/qkv/kernel" in flat
        if fused:
            wqkv = jnp.asarray(flat[prefix + "/qkv/kernel"], jnp.float32)
            kv = (wqkv.shape[-2] - h) // 2
            wq, wk, wv = jnp.split(wqkv, [h, h + kv], axis=-2)
        else:
            wq, wk, wv = (jnp.asarray(flat[f"{prefix}/{n}/kernel"], jnp.float32)
                          for n in ("query", "key", "value"))
            kv = wk.shape[-2]
        if kv < 1 or h % kv:
            raise ValueError(f"{prefix}: {h} query heads are not a multiple of {kv} "
                             "key/value heads")
        group = np.arange(h) // (h // kv)                       # query head -> kv head
        sq = lambda w: jnp.sum(w.reshape(rows, -1, w.shape[-2], w.shape[-1]) ** 2, (1, 3))
        score = (sq(wq) + jnp.sum(wo.reshape(rows, h, -1) ** 2, -1)
                 + (sq(wk) + sq(wv))[:, group])                  # [rows, H]
        removed = _lowest(score, _num_removed(fraction, count, h, prefix))
        keep_q = ~removed                                        # [rows, H]
        keep_kv = ~jnp.all(removed.reshape(rows, kv, h // kv), axis=-1)   # [rows, KV]

        def head_mask(shape, keep):
            # shape [*stack, ..., heads, D]: broadcast keep [rows, heads] over the rest.
            k = keep.reshape(tuple(stack) + (1,) * (len(shape) - n_stack - 2)
                             + (keep.shape[-1], 1))
            return jnp.broadcast_to(k, shape)

        masks[out_path] = jnp.broadcast_to(keep_q.reshape(tuple(stack) + (h, 1, 1)),
                                           wo.shape)
        if fused:
            keep_all = jnp.concatenate([keep_q, keep_kv, keep_kv], axis=-1)
            parts = {"qkv": keep_all}
        else:
            parts = {"query": keep_q, "key": keep_kv, "value": keep_kv}
        for name, keep in parts.items():
            for leaf in ("kernel", "bias"):
                path = f"{prefix}/{name}/{leaf}"
                if path in flat:
                    masks[path] = head_mask(tuple(flat[path].shape), keep)
    return _assemble(params, masks, {})
