"""LoRA: low-rank adapters on chosen kernels, as pure functions on parameter pytrees.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight
W0 [in, out] (here `x @ W`, flax's layout) is adapted by a rank-r product,

    h = x W0 + (alpha / r) x (B A)^T,      A [r, in],  B [out, r],

i.e. W = W0 + (alpha / r) (B A)^T. A is random and B is zero at initialization, so the
adapted model *is* the base model until the first update (paper section 4.1). Only A and B
are trained; `merge` folds them into W0 for export, so inference costs nothing extra.

The model code never changes: `apply_lora` returns a params tree of the base's structure,
shapes and dtypes, to be built inside the jitted loss,

    lora = init_lora(params, key, rank=4, targets=("attention/(query|value)/kernel$",))
    logits = model.apply({"params": apply_lora(params, lora, alpha=8.0)}, tokens)

Kernels of any layout in `common.kernel_layout` are adapted as the matrix
[prod(in axes), prod(out axes)] (a 3-D attention kernel [d_model, heads, head_dim] as
[d_model, heads * head_dim], a conv HWIO kernel as its im2col matrix [kh*kw*in, out]),
once per stacked layer when a path component is "layers" (nn.scan stacks).

The LoRA tree. A nested dict mirroring `params` that holds only the adapted kernels, each
replaced by {"lora_a": A [*stack, r, in_flat], "lora_b": B [*stack, out_flat, r]} (float32;
leading `stack` axes for scanned stacks). Plain nested dicts because orbax saves and
restores them with no custom node registration and paths like
"decoder/layers_0/self_attention/query/kernel/lora_a" work with the same regex
conventions as `optim.freeze` / optax masks. alpha is *not* a leaf (an optimizer would
train it): pass it to `apply_lora` / `merge`; the rank is read from A's shape.

Training only the adapters. The train state's params are {"base": params, "lora": lora}
(`train_params`); `lora_optimizer(tx)` runs `tx` on "lora" and `optax.set_to_zero()` (no
state) on "base"; `lora_value_and_grad` differentiates the loss with respect to "lora"
only, so the base may hold integers (QLoRA: a quantized base with
`dequantize=quantize.dequantize_tree`), and fills "base" with zero updates:

    state = train_params(qbase, lora)
    tx = lora_optimizer(optax.adam(1e-3)); opt_state = tx.init(state)
    def loss(p, batch):
        w = apply_lora(p["base"], p["lora"], alpha, dequantize=quantize.dequantize_tree)
        return cross_entropy(model.apply({"params": w}, batch))
    value, grads = lora_value_and_grad(loss)(state, batch)
    updates, opt_state = tx.update(grads, opt_state, state)
    state = optax.apply_updates(state, updates)     # "base" unchanged bit for bit

(Bit for bit, except that a float -0.0 in the base becomes +0.0, equal in value: optax's
zero update is +0.0. An integer (quantized) base is untouched.)

Everything here follows the paper and its reference implementation (microsoft/LoRA,
`loralib`); QLoRA is Dettmers et al. 2023 with this module's int8 / sub-byte base in place
of their 4-bit NormalFloat.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.compress import common

PyTree = Any

LORA_A, LORA_B = "lora_a", "lora_b"      # leaf names of one adapter
BASE, LORA = "base", "lora"              # top-level keys of the train state's params
A_INITS = ("kaiming_uniform", "gaussian")
_LISTED = 8                              # kernel paths listed in a "nothing matched" error


# ---------------------------------------------------------------------------------------
# Shapes: a kernel as a (stack of) [in_flat, out_flat] matrices.
# ---------------------------------------------------------------------------------------

def _matrix_shape(path: str, shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """(stack_shape, in_flat, out_flat) of the kernel at `path` with `shape`.

    Every layout of `common.kernel_layout` orders its axes as stack, then input, then
    output, so the kernel is a plain reshape of [*stack, in_flat, out_flat].
    """
    layout = common.kernel_layout(path, shape)
    if layout.stack_axes + layout.in_axes + layout.out_axes != tuple(range(len(shape))):
        raise ValueError(f"{path}: LoRA needs axes ordered (stack, in, out); the layout "
                         f"of shape {tuple(shape)} is {layout}")
    stack = tuple(shape[a] for a in layout.stack_axes)
    return (stack, math.prod(shape[a] for a in layout.in_axes),
            math.prod(shape[a] for a in layout.out_axes))


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def _check_targets(targets) -> tuple[re.Pattern, ...]:
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise ValueError("targets must be a non-empty list/tuple of regexes matched with "
                         f"re.search on 'a/b/c' kernel paths, got {targets!r}")
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except (re.error, TypeError) as e:
            raise ValueError(f"targets: invalid regex {t!r}: {e}") from None
    return tuple(compiled)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return int(rank)


def _check_alpha(alpha) -> float:
    if (isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, np.ndarray, jax.Array))
            or np.ndim(alpha) != 0):
        raise ValueError(f"alpha must be a real number > 0, got {alpha!r}")
    try:
        value = float(alpha)
    except jax.errors.ConcretizationTypeError:
        raise ValueError("alpha must be a static number > 0 (it sets a Python-level scale), "
                         "got a traced value; pass it outside jit") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"alpha must be a finite real number > 0, got {alpha!r}")
    return value


# ---------------------------------------------------------------------------------------
# Init, apply, merge, count.
# ---------------------------------------------------------------------------------------

def init_lora(params: PyTree, rng: jax.Array, rank: int,
              targets: Sequence[str] = (".*",), include_embeddings: bool = False,
              a_init: str = "kaiming_uniform") -> dict:
    """Adapters for every kernel of `params` whose path matches one of `targets`.

    Args:
      params: the inner params dict (`variables["params"]`); only its kernels (and, with
        `include_embeddings`, its [vocab, dim] embedding tables) are candidates.
      rng: a jax.random key; each adapted kernel gets its own split.
      rank: r >= 1, at most min(in_flat, out_flat) of every matched kernel.
      targets: regexes, `re.search`ed on "a/b/c" kernel paths ("attention/(query|value)/
        kernel$" as in the paper's experiments; ".*" for all kernels).
      include_embeddings: also adapt embedding tables matched by `targets` (loralib's
        `Embedding`); with tied embeddings this adapts the output projection too.
      a_init: A's initializer for kernels. "kaiming_uniform": U(-1/sqrt(in), 1/sqrt(in)),
        what loralib does (torch's kaiming_uniform_(a=sqrt(5)) on A [r, in]); "gaussian":
        N(0, 1/r^2), the paper's "random Gaussian" with HF PEFT's std 1/r (the paper gives
        no std).

    Returns:
      The LoRA tree (module docstring): per adapted kernel {"lora_a": A [*stack, r, in],
      "lora_b": B [*stack, out, r]}, float32, B = 0. For embeddings the roles swap as in
      loralib (A = 0, B ~ N(0, 1)): the product is zero either way.

    Raises:
      ValueError: bad rank / targets / a_init, no kernel matched (the message lists some
        kernel paths), or rank > min(in, out) of a matched kernel (named).
    """
    rank = _check_rank(rank)
    patterns = _check_targets(targets)
    if a_init not in A_INITS:
        raise ValueError(f"a_init must be one of {A_INITS}, got {a_init!r}")
    leaves = {common.path_str(p): leaf for p, leaf in
              jax.tree_util.tree_leaves_with_path(params)}
    candidates = [p for p, leaf in leaves.items()
                  if common.is_kernel(p, leaf, include_embeddings)]
    chosen = [p for p in candidates if any(pat.search(p) for pat in patterns)]
    if not chosen:
        listed = ", ".join(candidates[:_LISTED]) + (" ..." if len(candidates) > _LISTED else "")
        raise ValueError(f"no kernel path matches targets {list(targets)}; "
                         f"{len(candidates)} kernels available, e.g. {listed or '(none)'}")

    lora: dict = {}
    keys = jax.random.split(rng, len(chosen))
    for path, key in zip(chosen, keys):
        stack, d_in, d_out = _matrix_shape(path, leaves[path].shape)
        if rank > min(d_in, d_out):
            raise ValueError(f"rank {rank} > min(in, out) = min({d_in}, {d_out}) of {path}: "
                             "a larger rank is not low-rank; lower it or drop this target")
        a_shape, b_shape = (*stack, rank, d_in), (*stack, d_out, rank)
        batch = tuple(range(len(stack)))
        if _is_embedding(path):
            a = jnp.zeros(a_shape, jnp.float32)
            b = jax.random.normal(key, b_shape, jnp.float32)
        else:
            if a_init == "kaiming_uniform":
                # variance scale/fan_in with scale 1/3 -> bound sqrt(3 * scale / in) = 1/sqrt(in)
                init = jax.nn.initializers.variance_scaling(
                    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2, batch_axis=batch)
            else:
                init = jax.nn.initializers.normal(stddev=1.0 / rank)
            a = init(key, a_shape, jnp.float32)
            b = jnp.zeros(b_shape, jnp.float32)
        node = lora
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update({LORA_A: a, LORA_B: b})
    return lora


def _adapters(lora: PyTree) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (A, B)} of a LoRA tree; ValueError if an adapter is incomplete."""
    found: dict[str, dict[str, jax.Array]] = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(lora):
        path = common.path_str(p)
        parent, _, name = path.rpartition("/")
        if name not in (LORA_A, LORA_B) or not parent:
            raise ValueError(f"LoRA tree leaf {path!r}: expected '<kernel path>/{LORA_A}' or "
                             f"'<kernel path>/{LORA_B}' (a tree from init_lora)")
        found.setdefault(parent, {})[name] = leaf
    missing = [p for p, ab in found.items() if len(ab) != 2]
    if missing:
        raise ValueError(f"LoRA adapters need both {LORA_A} and {LORA_B}; incomplete: {missing}")
    return {p: (ab[LORA_A], ab[LORA_B]) for p, ab in found.items()}


def lora_delta(path: str, a: jax.Array, b: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The unscaled update (B A)^T of the kernel at `path`, reshaped to its `shape`.

    a: [*stack, r, in_flat], b: [*stack, out_flat, r] -> [*shape], float32 (or wider).
    """
    stack, d_in, d_out = _matrix_shape(path, shape)
    r = a.shape[-2]
    if a.shape != (*stack, r, d_in) or b.shape != (*stack, d_out, r):
        raise ValueError(f"{path}: adapter shapes A {a.shape}, B {b.shape} do not fit the "
                         f"kernel {tuple(shape)}: expected A {(*stack, r, d_in)}, "
                         f"B {(*stack, d_out, r)}")
    # HIGHEST: on TPU/GPU the default f32 matmul may round through bf16/tf32, and this
    # product is tiny (r terms per entry) next to the model's own matmuls.
    delta = jnp.einsum("...or,...ri->...io", b, a, precision=jax.lax.Precision.HIGHEST)
    return delta.reshape(shape)


def apply_lora(params: PyTree, lora: PyTree, alpha: float,
               dequantize: Optional[Callable[[PyTree], PyTree]] = None) -> PyTree:
    """params with W0 + (alpha / r) (B A)^T on every adapted kernel; a pure function.

    Args:
      params: the base params tree, or (with `dequantize`) a quantized tree.
      lora: a tree from `init_lora` (paths must exist in the dequantized base).
      alpha: the LoRA alpha (a static Python/NumPy number > 0); r is each adapter's rank.
      dequantize: optional, e.g. `quantize.dequantize_tree`: the base is dequantized first
        (QLoRA); the adapters stay in float32.

    Returns:
      A tree of the (dequantized) base's structure, shapes and dtypes: the sum is formed in
      float32 (or the kernel's wider float dtype) and cast back to the kernel's dtype.
      Call it inside the jitted loss; the model code needs no change.
    """
    alpha = _check_alpha(alpha)
    base = dequantize(params) if dequantize is not None else params
    adapters = _adapters(lora)
    kernels = {common.path_str(p): leaf for p, leaf in
               jax.tree_util.tree_leaves_with_path(base)}
    unknown = sorted(set(adapters) - set(kernels))
    if unknown:
        raise ValueError(f"LoRA adapters for paths absent from params: {unknown[:_LISTED]}")

    def adapt(p, w):
        path = common.path_str(p)
        if path not in adapters:
            return w
        a, b = adapters[path]
        scale = alpha / a.shape[-2]
        dtype = jnp.promote_types(w.dtype, jnp.float32)
        delta = lora_delta(path, a.astype(dtype), b.astype(dtype), w.shape)
        return (w.astype(dtype) + scale * delta).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(adapt, base)


def merge(params: PyTree, lora: PyTree, alpha: float,
          dequantize: Optional[Callable[[PyTree], PyTree]] = None) -> PyTree:
    """The adapted weights as a new float base for export (same result as `apply_lora`).

    Serve the merged tree with the unchanged model: no adapter cost at inference (paper
    section 4.1). With a quantized base the merged tree is float; re-quantize it if wanted.
    """
    return apply_lora(params, lora, alpha, dequantize)


def lora_param_count(lora: PyTree) -> int:
    """Number of adapter parameters: r * (in_flat + out_flat) per adapted matrix."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(lora)))


# ---------------------------------------------------------------------------------------
# Training only the adapters.
# ---------------------------------------------------------------------------------------

def train_params(base: PyTree, lora: PyTree) -> dict:
    """The train state's params {"base": base, "lora": lora}; checks that they fit.

    Every adapter's kernel path must be a leaf of `base`, or (a quantized base, whose
    kernels are pytree nodes such as values + scale) the prefix of some of its leaves.
    """
    paths = [common.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(base)]
    unknown = sorted(k for k in _adapters(lora)
                     if not any(p == k or p.startswith(k + "/") for p in paths))
    if unknown:
        raise ValueError(f"LoRA adapters for paths absent from the base: {unknown[:_LISTED]}")
    return {BASE: base, LORA: lora}


def _check_layout(tree: PyTree, what: str) -> None:
    if not isinstance(tree, dict) or set(tree) != {BASE, LORA}:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{what} must be the dict {{'{BASE}': params, '{LORA}': lora}} "
                         f"(see train_params), got {keys}")


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the "lora" subtree, zero updates and no optimizer state on "base".

    optax.partition (multi_transform's current name) with optax.set_to_zero() for the
    base: its state is EmptyState, so Adam's moments exist only for the adapters.
    """
    def labels(tree):
        _check_layout(tree, "the optimizer's params")
        return {BASE: jax.tree.map(lambda _: "frozen", tree[BASE]),
                LORA: jax.tree.map(lambda _: "train", tree[LORA])}
    return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def lora_value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False):
    """`jax.value_and_grad` of loss_fn(state_params, *args) with respect to "lora" only.

    The returned grads have the full {"base", "lora"} structure (what `lora_optimizer`
    expects): zeros of the base's dtypes on "base" -- no backward pass through the base
    is asked for, and an integer (quantized) base is fine, which plain jax.grad refuses.
    """
    def wrapped(state_params, *args, **kwargs):
        _check_layout(state_params, "state_params")
        base = state_params[BASE]

        def of_lora(lora):
            return loss_fn({BASE: base, LORA: lora}, *args, **kwargs)
        value, g = jax.value_and_grad(of_lora, has_aux=has_aux)(state_params[LORA])
        return value, {BASE: jax.tree.map(jnp.zeros_like, base), LORA: g}
    return wrapped
