"""Int8 weight-only inference: integer kernels read by the matmul, one scale per output.

Batch-1 decoding is bound by memory bandwidth: every token reads every weight once, and
the activations are a single row. Storing the weights as int8 halves the bytes of bf16
-- but only when each matmul reads the int8 array itself, not a float copy dequantized
per step. This is the weight-only setting of GPTQ's inference kernels (Frantar et al.
2022; LLM.int8(), Dettmers et al. 2022, quantizes the activations too): activations stay
in the compute dtype, weights are int8 with one symmetric scale per output channel (Jacob
et al. 2018 eq. 1 with Z = 0, `affine`), and the scale leaves the contraction:

  y_j = sum_k x_k (q_kj s_j) = s_j sum_k x_k q_kj      (exact algebra: s_j is constant in k)

so each matmul is `dot_general(x, q.astype(x.dtype)) * s` -- the int8 -> float convert is
an elementwise producer of the dot's operand, which XLA can fuse into the operand read,
and the rescale is an epilogue on the (small) output. |q| <= 127 is exact in bf16.

Params (`quantize_params`): every matmul kernel becomes int8 `kernel` plus a float32
`kernel_scale` beside it (`quantize.quantize_tree`'s per-output-channel QuantizedArray,
its values and scales stored as two leaves); a tied token table becomes int8 `embedding`
plus `embedding_scale` [vocab, 1] (one scale per row: the output channel of x E^T and the
unit a lookup reads). Everything else (biases, norms, the position table, a distillation
hint regressor) stays float.

Model (`WeightOnlyDecoder`): a `transformer.Decoder` whose `dot_general` hook is a
`WeightOnlyDotGeneral`. Flax's Dense casts the int8 kernel to the compute dtype and calls
the hook; the hook alone cannot see the scale, so the decoder runs under a flax method
interceptor (`nn.intercept_methods`) that, around each Dense / DenseGeneral / Embed call
whose module holds a `*_scale` param, hands that scale to the hook (a trace-time stack),
and rescales the rows an Embed lookup returns. `weight_only_int8(model, params)` builds
both; `models.decoding.generate(wo_model, wo_params, ...)` then decodes as usual.

The matmul (`impl`): "dot" is `lax.dot_general` on the converted operand. Whether XLA
fuses the convert into the dot is the backend's choice: on GPU it can become a Triton gemm
fusion that converts in registers, or a cuBLAS call behind a separate convert fusion (not
measured here: `int8_operand_report` on the compiled step says which); XLA:CPU (jax 0.10)
materializes every converted kernel in a temp buffer before its dot. "reduce" computes a
few-row product (batch-1 decoding: one row) as multiply + sum, a reduction fusion that
can read the int8 kernel directly (XLA:CPU does for every kernel of a d_model 64 decoder
and larger; on smaller kernels its heuristics may write the product out first); more rows
fall back to the dot. `int8_operand_report` reads a compiled program's HLO and says which
of its int8 parameters are read inside a fusion and which are first converted into a
weight-sized float buffer.
"""
from __future__ import annotations

import re
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import transformer
from models.compress import common, quantize
from models.compress.quant_matmul import _rhs_to_output
from models.layers.embedding import Embed

Array = jax.Array
IMPLS = ("dot", "reduce")
SCALE_SUFFIX = "_scale"          # "kernel" -> "kernel_scale", "embedding" -> "embedding_scale"
TIED_TABLE = "embed/tokens/embedding"   # the Decoder's token table (read by x E^T when tied)


# ----------------------------------------------------------------------------------------
# The matmul.
# ----------------------------------------------------------------------------------------
def _reduce_dot(lhs: Array, rhs: Array, dims) -> Array:
    """dot_general (no batch dims) as multiply + sum, in float32 [lhs free..., rhs free...].

    The rhs keeps its own layout (the lhs, a row or a few, is broadcast into it), so XLA
    can fuse the rhs's convert, the product and the sum into one reduction that reads the
    rhs once and writes nothing of its size (no transpose of the rhs to materialize).
    """
    (lc, rc), _ = dims
    lf = [d for d in range(lhs.ndim) if d not in lc]
    pairs = sorted(zip(rc, lc))                  # the contracted dims in the rhs's order
    lhs_t = jnp.transpose(lhs, tuple(lf) + tuple(l for _, l in pairs))
    rows = int(np.prod([lhs.shape[d] for d in lf], dtype=np.int64))
    expand = tuple(rhs.shape[d] if d in rc else 1 for d in range(rhs.ndim))
    lhs_b = lhs_t.reshape((rows,) + expand).astype(jnp.float32)
    out = jnp.sum(lhs_b * rhs.astype(jnp.float32)[None], axis=tuple(1 + d for d in rc))
    return out.reshape(tuple(lhs.shape[d] for d in lf) + out.shape[1:])


def weight_only_dot_general(lhs: Array, q: Array, scale: Array, dims, *, impl: str = "dot",
                            max_reduce_rows: int = 1, precision=None,
                            out_dtype: Any = None) -> Array:
    """`lax.dot_general(lhs, q * scale, dims)` with the scale factored out of the sum.

    Args:
      lhs: activations [...], float (the compute dtype).
      q: the integer kernel (int8, or already cast to lhs's dtype: exact for |q| <= 127).
      scale: float32, q's shape with the contracting dims kept as size 1 (per output).
      dims: lax.dot_general dimension numbers (lhs first).
      impl: "dot" (dot_general on q cast to lhs's dtype, float32 accumulation) or
        "reduce" (multiply + sum while lhs has at most `max_reduce_rows` rows, else "dot").
      out_dtype: the result's dtype (default lhs's).
    Returns: [batch..., lhs free..., rhs free...] as lax.dot_general, in out_dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(IMPLS)}")
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    (lc, _), (lb, _) = dims
    rows = int(np.prod([lhs.shape[d] for d in range(lhs.ndim) if d not in lc],
                       dtype=np.int64))
    if impl == "reduce" and rows <= max_reduce_rows and not lb:
        acc = _reduce_dot(lhs, q, dims)
    else:
        acc = lax.dot_general(lhs, q.astype(lhs.dtype), dims, precision=precision,
                              preferred_element_type=jnp.float32)
    return (acc * _rhs_to_output(scale.astype(jnp.float32), dims, lhs.ndim)).astype(out_dtype)


class WeightOnlyDotGeneral:
    """The models' `dot_general` hook for weight-only int8 (see the module docstring).

    A call whose rhs has the shape of the kernel a surrounding Dense announced (`scaled`)
    is that Dense's matmul: `weight_only_dot_general` with the announced scale. Every other
    call (attention scores and values, float kernels) is plain `lax.dot_general`.
    """

    def __init__(self, impl: str = "dot", max_reduce_rows: int = 1):
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(IMPLS)}")
        self.impl, self.max_reduce_rows = impl, int(max_reduce_rows)
        self._local = threading.local()

    def __repr__(self):
        return f"WeightOnlyDotGeneral(impl={self.impl!r})"

    def _pending(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, **kwargs):
        stack = self._pending()
        if stack and stack[-1] is not None and stack[-1][1] == tuple(rhs.shape):
            scale = stack[-1][0]
            stack[-1] = None                     # consumed: one matmul per module call
            out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
            return weight_only_dot_general(lhs, rhs, scale, dimension_numbers,
                                           impl=self.impl, precision=precision,
                                           max_reduce_rows=self.max_reduce_rows,
                                           out_dtype=out_dtype)
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)

    def scaled(self, scale, shape, call):
        """Run `call()` with (scale, kernel shape) announced to the hook; it must be used."""
        stack = self._pending()
        stack.append((scale, tuple(shape)))
        try:
            out = call()
            if stack[-1] is not None:
                raise ValueError(f"an int8 kernel of shape {tuple(shape)} was not multiplied "
                                 "through the dot_general hook (its module bypasses it)")
            return out
        finally:
            stack.pop()

    def intercept(self, next_fun, args, kwargs, context):
        """nn.intercept_methods interceptor: scales for Dense / DenseGeneral / Embed."""
        module, method = context.module, context.method_name
        if isinstance(module, (nn.Dense, nn.DenseGeneral)) and method == "__call__" and \
                module.has_variable("params", "kernel" + SCALE_SUFFIX):
            kernel = module.get_variable("params", "kernel")
            scale = module.get_variable("params", "kernel" + SCALE_SUFFIX)
            return self.scaled(scale, kernel.shape, lambda: next_fun(*args, **kwargs))
        if isinstance(module, Embed) and method in ("__call__", "attend") and \
                module.has_variable("params", "embedding" + SCALE_SUFFIX):
            table = module.get_variable("params", "embedding")
            scale = module.get_variable("params", "embedding" + SCALE_SUFFIX)   # [V, 1]
            if method == "attend":
                return self.scaled(scale, table.shape, lambda: next_fun(*args, **kwargs))
            rows = next_fun(*args, **kwargs)     # q[ids] in the compute dtype (exact)
            row_scale = jnp.take(scale, args[0], axis=0)          # [..., 1]
            return (rows.astype(jnp.float32) * row_scale).astype(rows.dtype)
        return next_fun(*args, **kwargs)


class WeightOnlyDecoder(transformer.Decoder):
    """A `transformer.Decoder` that reads int8 kernels + scales (`quantize_params`).

    Its cfg.dot_general must be a `WeightOnlyDotGeneral`; params without scales (e.g.
    `init`) run as the float Decoder does. Same params paths, same call signature.
    """

    def __call__(self, *args, **kwargs):
        hook = self.cfg.dot_general
        if not isinstance(hook, WeightOnlyDotGeneral):
            raise ValueError("WeightOnlyDecoder needs cfg.dot_general=WeightOnlyDotGeneral(); "
                             f"got {hook!r} (use weight_only_int8(model, params))")
        with nn.intercept_methods(hook.intercept):
            return super().__call__(*args, **kwargs)


# ----------------------------------------------------------------------------------------
# Params.
# ----------------------------------------------------------------------------------------
def _check_supported(params: Any) -> None:
    for path in jax.tree_util.tree_leaves_with_path(params):
        p = common.path_str(path[0])
        if f"/{common.EXPERTS_COMPONENT}/" in f"/{p}":
            raise ValueError(f"{p}: weight-only int8 covers Dense / DenseGeneral / Embed "
                             "matmuls; a mixture of experts' kernels are not (model.moe."
                             "every must be 0)")


def quantize_params(params: Any, *, tied: bool = True, float_dtype: Any = None) -> Any:
    """Float Decoder params -> weight-only int8 params (same tree, `*_scale` leaves added).

    Args:
      params: the Decoder's `variables["params"]` (plain arrays, float32 ideally: the
        scales come from the full-precision weights).
      tied: the model ties its unembedding to the token table (cfg.tie_embeddings): the
        table is then int8 with per-row scales; untied, it is only looked up (one row a
        token) and stays float, while the `logits` kernel is quantized like any kernel.
      float_dtype: cast the leaves that stay float (biases, norms, positions) to this
        dtype (e.g. the compute dtype); None keeps theirs. Scales stay float32.
    """
    _check_supported(params)
    qtree = quantize.quantize_tree(params, bits=8, symmetric=True, per_channel=True,
                                   include_embeddings=tied)

    def convert(tree, prefix):
        out = {}
        for key, leaf in tree.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(leaf, quantize.QuantizedArray):
                if _stays_float(path):
                    leaf = _at(params, path)
                else:
                    out[key], out[key + SCALE_SUFFIX] = leaf.values, leaf.scale
                    continue
            if isinstance(leaf, dict):
                out[key] = convert(leaf, path)
            else:
                out[key] = leaf if float_dtype is None else jnp.asarray(leaf, float_dtype)
        return out
    return convert(qtree, "")


def _stays_float(path: str) -> bool:
    """Lookup-only tables (one row a token: int8 saves no reads) and a distillation hint
    regressor (its Dense bypasses the hook, and decoding discards its output)."""
    parts = path.split("/")
    return (parts[-1] == "embedding" and path != TIED_TABLE) or transformer.HINT in parts[:-1]


def _at(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def dequantize_params(wo_params: Any, dtype: Any = jnp.float32) -> Any:
    """Weight-only params -> the float params they stand for: q * s (the reference the
    int8 model must reproduce up to float rounding), `*_scale` leaves removed."""
    def convert(tree):
        out = {}
        for key, leaf in tree.items():
            if key.endswith(SCALE_SUFFIX) and key[:-len(SCALE_SUFFIX)] in tree:
                continue
            if isinstance(leaf, dict):
                out[key] = convert(leaf)
            elif key + SCALE_SUFFIX in tree:
                out[key] = (leaf.astype(jnp.float32) * tree[key + SCALE_SUFFIX]).astype(dtype)
            else:
                out[key] = leaf
        return out
    return convert(wo_params)


def weight_only_int8(model: transformer.Decoder, params: Any, *, impl: str = "dot",
                     dtype: str | None = "bfloat16") -> tuple[WeightOnlyDecoder, Any]:
    """(model, params) of a trained Decoder -> its weight-only int8 (model, params).

    dtype: the compute dtype of the int8 model (and of its float leaves); None keeps
    the model's. The result decodes with `models.decoding.generate(model, params, ...)`.
    """
    if not isinstance(model, transformer.Decoder):
        raise ValueError(f"weight_only_int8 takes a transformer.Decoder, got "
                         f"{type(model).__name__}")
    cfg = model.cfg
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    cfg = cfg.replace(dot_general=WeightOnlyDotGeneral(impl))
    wo_params = _quantize_params_jit(params, tied=cfg.tie_embeddings, float_dtype=dtype)
    return WeightOnlyDecoder(cfg), wo_params


# One program for the whole tree (quantize_tree alone compiles one per kernel shape).
_quantize_params_jit = jax.jit(quantize_params, static_argnames=("tied", "float_dtype"))


def decode_step(model: transformer.Decoder, params: Any, cache: Any, tokens: Array
                ) -> tuple[Array, Any]:
    """One cached decoding call, as `models.decoding.generate`'s loop makes it: tokens
    int [B, T] appended to the KV cache -> (last position's logits [B, V], new cache)."""
    logits, variables = model.apply({"params": params, "cache": cache}, tokens,
                                    decode=True, mutable=["cache"])
    return logits[:, -1], variables["cache"]


# ----------------------------------------------------------------------------------------
# What a step reads, and what its compiled program does with the int8 operands.
# ----------------------------------------------------------------------------------------
def _nbytes(leaf) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def bytes_per_token(params: Any, *, tied: bool = True) -> dict:
    """Parameter bytes one decoding step reads, by kind (float or weight-only params).

    A step reads every leaf whole except the lookup-only tables -- the position table,
    and the token table when untied -- of which it reads one row per sequence (counted
    as one row here: batch 1). Returns {"matmul": kernels (+ the tied table) in their
    storage dtype, "scales", "other": biases, norms, "lookup_rows", "total",
    "storage": every leaf whole}.
    """
    out = dict(matmul=0, scales=0, other=0, lookup_rows=0, storage=0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = common.path_str(path)
        n = _nbytes(leaf)
        out["storage"] += n
        name = p.rsplit("/", 1)[-1]
        if name.startswith("embedding") and not (tied and p.startswith(TIED_TABLE)):
            out["lookup_rows"] += n // leaf.shape[0]
        elif name.endswith(SCALE_SUFFIX):
            out["scales"] += n
        elif common.is_kernel(p, leaf, include_embeddings=tied):
            out["matmul"] += n
        else:
            out["other"] += n
    out["total"] = out["matmul"] + out["scales"] + out["other"] + out["lookup_rows"]
    return out


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_FLOATS = ("f16", "bf16", "f32", "f64")
_PASS_THROUGH = ("bitcast", "copy", "reshape", "transpose")


def _arrays(type_text: str) -> list[tuple[str, int]]:
    return [(d, int(np.prod([int(x) for x in dims.split(",") if x], dtype=np.int64)))
            for d, dims in _ARRAY.findall(type_text)]


_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines} of an HLO module's text, and the entry's
    name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m and current is None:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif current is not None and line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _parse(lines: list[str]) -> tuple[dict[str, tuple[str, list[str], str]], dict[int, str]]:
    """({name: (result type, operand names, opcode + attributes)}, {index: parameter})."""
    instrs, params = {}, {}
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, opcode, rest = m.groups()
        if opcode == "parameter":
            params[int(re.match(r"(\d+)", rest).group(1))] = name
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0])
        instrs[name] = (type_text, operands, opcode + " " + rest)
    return instrs, params


def int8_operand_report(hlo: str) -> dict:
    """How a compiled HLO module reads the int8 parameters of its entry computation.

    For each s8 entry parameter (a weight-only kernel), its users are classified --
    through bitcasts, copies, reshapes and transposes that stay int8, and into `call`ed
    computations (XLA:GPU wraps kernels in command-buffer calls) -- as "materialized"
    when a user's result holds a float array at least as large as the parameter (a
    dequantized copy written to memory before the matmul reads it), "fused" otherwise
    (the int8 values are read inside the fusion or dot that consumes them), "opaque" for
    loops, conditionals and tuples (not followed: a scanned stack's kernels). Returns
    {"int8_params", "fused", "materialized", "opaque" (counts), "materialized_params"
    (names), "all_fused"}.
    """
    comps, entry = _computations(hlo)
    parsed = {name: _parse(lines) for name, lines in comps.items()}
    users: dict[tuple[str, str], list[str]] = {}
    for comp, (instrs, _) in parsed.items():
        for name, (_, operands, _) in instrs.items():
            for operand in operands:
                users.setdefault((comp, operand), []).append(name)

    def classify(comp: str, name: str, numel: int, depth: int = 0) -> set:
        kinds = set()
        instrs = parsed[comp][0]
        for user in users.get((comp, name), []):
            type_text, operands, rest = instrs[user]
            arrays, opcode = _arrays(type_text), rest.split(" ", 1)[0]
            callee = re.search(r"to_apply=%([\w.\-]+)", rest)
            if opcode in _PASS_THROUGH and arrays and arrays[0][0] == "s8" and depth < 32:
                kinds |= classify(comp, user, numel, depth + 1)
            elif opcode == "call" and callee and callee.group(1) in parsed and depth < 32:
                callee_params = parsed[callee.group(1)][1]
                for i, operand in enumerate(operands):
                    if operand == name and i in callee_params:
                        kinds |= classify(callee.group(1), callee_params[i], numel, depth + 1)
            elif opcode in ("while", "conditional", "call", "tuple"):
                kinds.add("opaque")
            elif any(d in _FLOATS and n >= numel for d, n in arrays):
                kinds.add("materialized")
            else:
                kinds.add("fused")
        return kinds

    report = {"int8_params": 0, "fused": 0, "materialized": 0, "opaque": 0,
              "materialized_params": []}
    instrs, params = parsed.get(entry, ({}, {}))
    for name in params.values():
        arrays = _arrays(instrs[name][0])
        if len(arrays) != 1 or arrays[0][0] != "s8":
            continue
        report["int8_params"] += 1
        kinds = classify(entry, name, arrays[0][1])
        kind = ("materialized" if "materialized" in kinds else
                "opaque" if "opaque" in kinds or not kinds else "fused")
        report[kind] += 1
        if kind == "materialized":
            report["materialized_params"].append(name)
    report["all_fused"] = report["int8_params"] > 0 and report["fused"] == report[
        "int8_params"]
    return report
