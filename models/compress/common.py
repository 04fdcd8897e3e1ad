"""What the compression transforms agree on: which leaves are matmul kernels, and their axes.

Every transform in `models/compress` (quantize, prune, LoRA) walks a parameter pytree (the
inner `variables["params"]` dict) and touches only matmul kernels; biases, norm scales and
(unless asked) embeddings stay in float. A leaf's path is its dict keys joined by "/", e.g.
"decoder/layers_0/self_attention/query/kernel" -- the same convention as train/optim.py.

Kernel layouts in this codebase (flax Dense / DenseGeneral / Conv, `x @ W` with W [in, out]):

  Dense                 [in, out]                  in (0,),      out (1,)
  attention q / k / v   [in, heads, head_dim]      in (0,),      out (1, 2)
  attention out         [heads, head_dim, out]     in (0, 1),    out (2,)   (module "out")
  Conv (HWIO)           [kh, kw, in, out]          in (0, 1, 2), out (3,)
  scanned stacks        a leading layer axis when a path component is exactly "layers"
                        (nn.scan over blocks, models/transformer.py): it is a stack axis,
                        each layer is compressed on its own.
  mixture of experts    ".../moe/fc1/kernel" [experts, in, out] (models/layers/moe.py):
                        the expert axis is a stack axis too, each expert its own [in, out].

"Per output channel" means one scale per output feature: per index of the output axes
(the last axis of [in, out] and HWIO kernels; (head, head_dim) of q/k/v kernels), and per
stacked layer. N:M groups run along the last input axis: axis 0 of [in, out] and of q/k/v,
`in` of HWIO, head_dim of the attention output kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

STACK_COMPONENT = "layers"   # nn.scan's module name for stacked blocks
EXPERTS_COMPONENT = "moe"    # a mixture of experts' module: its kernels stack the experts


def path_str(path: Sequence[Any]) -> str:
    """A tree_util key path as "a/b/c" (dict keys, attribute names or sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Axis roles of a kernel leaf: stacked-layer axes, contracted (input), output."""
    stack_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]


def _is_expert_kernel(components: Sequence[str]) -> bool:
    return len(components) >= 3 and components[-3] == EXPERTS_COMPONENT and \
        components[-2] in ("fc1", "fc2")


def kernel_layout(path: str, shape: Sequence[int]) -> KernelLayout:
    """The axes of the kernel at `path` with `shape` (see the module docstring).

    Raises ValueError for a kernel rank this codebase never creates, naming the path.
    """
    components = path.split("/")
    stack = (STACK_COMPONENT in components[:-1]) + _is_expert_kernel(components)
    rank = len(shape) - stack
    s = tuple(range(stack))
    if rank == 2:
        return KernelLayout(s, (stack,), (stack + 1,))
    if rank == 3:
        module = components[-2] if len(components) >= 2 else ""
        if module == "out":
            return KernelLayout(s, (stack, stack + 1), (stack + 2,))
        return KernelLayout(s, (stack,), (stack + 1, stack + 2))
    if rank == 4:
        return KernelLayout(s, (stack, stack + 1, stack + 2), (stack + 3,))
    if rank == 1:  # a depthwise/1-D weight named "kernel" would be odd: refuse loudly
        raise ValueError(f"{path}: a kernel of shape {tuple(shape)} has no input/output axes")
    raise ValueError(f"{path}: kernel rank {len(shape)} (shape {tuple(shape)}) is not a "
                     "layout this codebase creates (2-D dense, 3-D attention, 4-D conv)")


def is_kernel(path: str, leaf: Any, include_embeddings: bool = False) -> bool:
    """Whether a leaf is a matmul weight the transforms compress.

    Kernels are leaves named "kernel" with at least 2 dims; embedding tables ("embedding",
    [vocab, dim]) only when `include_embeddings` (they are gathered, not multiplied, except
    when tied to the output projection). A mixture of experts' router stays float: its
    logits pick the experts, and ST-MoE (Zoph et al. 2022, sec. 3) keeps it in float32.
    """
    components = path.split("/")
    name = components[-1]
    ndim = getattr(leaf, "ndim", 0)
    if len(components) >= 3 and components[-3] == EXPERTS_COMPONENT and \
            components[-2].startswith("router"):
        return False
    if name == "kernel":
        return ndim >= 2
    return include_embeddings and name == "embedding" and ndim == 2
