"""Weight inheritance: a physically smaller transformer from a trained one (pure functions).

TinyCLIP (Wu et al. 2023, sec. 3.2) starts a student from the teacher's most important
weights instead of from scratch: whole layers (the text tower is redundant in depth),
attention heads and MLP neurons, and residual-stream channels (the image tower is
redundant in width). The functions here take a params tree and return the smaller tree and
the model-config fields that build it, so the result runs as an ordinary model with fewer
FLOPs (it is not a mask; `prune_structured` masks, this removes).

  inherit_stack(stack, ...)      a transformer stack (`layers_i` or scanned `layers`, plus
                                 its final_norm): keep k layers (first | last | uniform, i.e.
                                 every n/k-th as DistilBERT does | importance), then per kept
                                 layer the most important heads and MLP neurons
  channel_scores / inherit_channels(tree, keep)
                                 the residual width: slice every leaf along its d_model axis
                                 (CHANNEL_RULES, by parameter path), embeddings and heads
                                 included
  shrink(params, cfg, ...)       all of it for a model whose config is a TransformerConfig
                                 or nests one (ViT's `encoder`): -> (params, overrides)
  shrink_to(params, template)    into the sizes of a smaller model's params (each tower of
                                 a CLIP on its own): what `init_from.inherit` does

Importance is the squared L2 norm of a unit's weights (Li et al. 2017 for channels; heads
and neurons by the weights that read and write them), or a score array the caller gives
(e.g. learned masks). Ties go to the lower index. Kept units stay in their original order,
so keeping everything reproduces the model exactly; a head keeps its width (`head_dim`) when
other heads go. A narrower residual stream is not exact -- LayerNorm then normalizes over
the kept channels only -- which is why inheritance is followed by distillation.
"""
from __future__ import annotations

import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from models import transformer
from models.compress import gated_size
from models.layers import gates

LAYER_CHOICES = ("first", "last", "uniform", "importance")
_LAYER = re.compile(r"^layers_(\d+)$")
_QKV = ("query", "key", "value")

# Which axes of a leaf run along the residual stream (d_model), by its path ("/"-joined);
# the first matching rule wins. A leaf no rule matches has no d_model axis.
CHANNEL_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|/)[a-z_]*norm/(scale|bias)$", (0,)),                  # every LayerNorm / RMSNorm
    (r"_attention/(query|key|value|qkv)/kernel$", (0,)),        # [D, H, hd]
    (r"_attention/out/kernel$", (-1,)),                         # [H, hd, D]
    (r"_attention/out/bias$", (0,)),
    (r"mlp/fc1[^/]*/kernel$", (0,)),                            # [D, F] (and a GLU gate)
    (r"mlp/fc2/kernel$", (-1,)),                                # [F, D]
    (r"mlp/fc2/bias$", (0,)),
    (r"(^|/)embed/[a-z_]+/embedding$", (-1,)),                  # tokens, positions, types
    (r"(^|/)unembed/logits/kernel$", (0,)),                     # [D, V]
    (r"^embedding/kernel$", (-1,)), (r"^embedding/bias$", (0,)),  # ViT's patch projection
    (r"^(cls|pos_embedding)$", (-1,)),
    (r"^(head|pre_logits)/kernel$", (0,)),                       # classifier [D, classes]
    (r"^(mlm_transform|pooler)/kernel$", (0, 1)),               # BERT's [D, D] heads
    (r"^(mlm_transform|pooler)/bias$", (0,)),
)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores (ties: the lower index), in ascending order."""
    scores = np.asarray(scores, np.float64)
    if not 0 < k <= scores.shape[0]:
        raise ValueError(f"cannot keep {k} of {scores.shape[0]} units (1..{scores.shape[0]})")
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return np.sort(order[:k])


def _sq(x, axes) -> np.ndarray:
    return np.sum(np.square(np.asarray(x, np.float64)), axis=axes)


def _layers(stack: dict) -> list[dict]:
    names = sorted((k for k in stack if _LAYER.match(k)), key=lambda k: int(k.split("_")[1]))
    if not names:
        raise ValueError("no layers_i entries in this stack (is it a transformer stack?)")
    return [stack[k] for k in names]


def _attention(layer: dict) -> dict:
    return layer["self_attention"]


# ---- Importance -------------------------------------------------------------------------
def head_scores(attention: dict) -> np.ndarray:
    """[H] squared norms of each head's query, key, value and output weights."""
    if "qkv" in attention:
        kernel = np.asarray(attention["qkv"]["kernel"])  # [D, 3H, hd]
        h = attention["out"]["kernel"].shape[0]
        if kernel.shape[1] != 3 * h:
            raise ValueError("head selection of grouped-query (fused) attention is not "
                             "supported: query and key/value head counts differ")
        qkv = _sq(kernel, (0, 2)).reshape(3, h).sum(0)
    else:
        if attention["key"]["kernel"].shape[1] != attention["query"]["kernel"].shape[1]:
            raise ValueError("head selection of grouped-query attention is not supported")
        qkv = sum(_sq(attention[n]["kernel"], (0, 2)) for n in _QKV)
    return qkv + _sq(attention["out"]["kernel"], (1, 2))


def neuron_scores(mlp: dict) -> np.ndarray:
    """[F] squared norms of each hidden unit's input (fc1, and a gate) and output weights."""
    score = _sq(mlp["fc2"]["kernel"], 1)
    for name, sub in mlp.items():
        if name.startswith("fc1"):
            score = score + _sq(sub["kernel"], 0)
    return score


def layer_scores(stack: dict) -> np.ndarray:
    """[L] squared norms of what each layer writes to the residual stream (attention out
    and MLP fc2 kernels): a layer that writes little is the first to go."""
    return np.array([_sq(_attention(l)["out"]["kernel"], None) + _sq(l["mlp"]["fc2"]["kernel"],
                                                                      None)
                     for l in _layers(stack)])


def choose_layers(num_layers: int, keep: int, how: str = "uniform",
                  scores: np.ndarray | None = None) -> list[int]:
    """Indices of `keep` of `num_layers` layers: first | last | uniform (i * n // k: every
    other layer for half, as DistilBERT's student) | importance (top `scores`)."""
    if how not in LAYER_CHOICES:
        raise ValueError(f"layer choice {how!r}; allowed: {', '.join(LAYER_CHOICES)}")
    if not 0 < keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers")
    if how == "first":
        return list(range(keep))
    if how == "last":
        return list(range(num_layers - keep, num_layers))
    if how == "uniform":
        return [i * num_layers // keep for i in range(keep)]
    if scores is None or len(scores) != num_layers:
        raise ValueError("importance layer choice needs one score per layer")
    return [int(i) for i in _top(scores, keep)]


# ---- Selection ---------------------------------------------------------------------------
def select_heads(attention: dict, keep: np.ndarray) -> dict:
    """The attention params with only heads `keep` (query/key/value [D, H, hd] and their
    biases [H, hd] on axis 1 / 0, out [H, hd, D] on axis 0)."""
    keep = np.asarray(keep)
    out = dict(attention)
    if "qkv" in attention:
        h = attention["out"]["kernel"].shape[0]
        idx = np.concatenate([keep, keep + h, keep + 2 * h])
        out["qkv"] = {k: np.asarray(v)[:, idx] if k == "kernel" else np.asarray(v)[idx]
                      for k, v in attention["qkv"].items()}
    else:
        for n in _QKV:
            out[n] = {k: np.asarray(v)[:, keep] if k == "kernel" else np.asarray(v)[keep]
                      for k, v in attention[n].items()}
    out["out"] = {**attention["out"], "kernel": np.asarray(attention["out"]["kernel"])[keep]}
    return out


def select_neurons(mlp: dict, keep: np.ndarray) -> dict:
    """The MLP params with only hidden units `keep` (fc1* [D, F] columns and biases, fc2
    [F, D] rows)."""
    out = dict(mlp)
    for name, sub in mlp.items():
        if name.startswith("fc1"):
            out[name] = {k: np.asarray(v)[..., keep] for k, v in sub.items()}
    out["fc2"] = {**mlp["fc2"], "kernel": np.asarray(mlp["fc2"]["kernel"])[keep]}
    return out


def _scaled(sub: dict, z, **axes_of) -> dict:
    """`sub` with leaves `name` multiplied by z along their axis axes_of[name] (0 or -1)."""
    out = dict(sub)
    for name, axis in axes_of.items():
        if name in sub:
            x = np.asarray(sub[name])
            out[name] = x * (np.reshape(z, (-1,) + (1,) * (x.ndim - 1)) if axis == 0 else z)
    return out


def _pop_gate(sub: dict, name: str):
    """(sub without gate `name`, its (deterministic z, P(open))) or (sub, None)."""
    if name not in sub:
        return sub, None
    sub = dict(sub)
    log_alpha = np.asarray(sub.pop(name)[gates.PARAM], np.float32)
    return sub, (np.asarray(gates.deterministic_gate(log_alpha)),
                 np.asarray(gates.prob_open(log_alpha)))


def fold_gates(stack: dict) -> tuple[dict, dict | None]:
    """A gated stack (models/layers/gates.py: automatic inheritance) -> (the same function
    without gates, the gates' P(open) as scores). Each gate's deterministic value is
    multiplied into the weights it scales: a head's output rows, an MLP unit's fc2 row, a
    layer's attention or MLP output (CoFi's layer masks), and a residual channel's norm
    scale and bias and every write to it (attention out, fc2). The stack's input masking
    by the channel gates cannot be folded (the embeddings lie outside the stack), nor can
    the norms' statistics over the open channels: the folded stack is exact once the
    closed channels are removed (inherit_channels) and the open ones' gates are 1, which
    hard-concrete gates reach. Scores: {"heads", "neurons": per layer [H] / [F];
    "attention", "mlp": [L] P(layer open); "channels": [D] or None}. An ungated stack
    comes back as it is, scores None."""
    layers = _layers(stack)
    first = layers[0]
    if not any(("head_gate" in _attention(first), "unit_gate" in first["mlp"],
                "layer_gate" in first["attention_sublayer"],
                transformer.CHANNEL_GATE in stack)):
        return stack, None
    out = {k: v for k, v in stack.items() if not _LAYER.match(k) and k != gates.LAGRANGE}
    out, channel = _pop_gate(out, transformer.CHANNEL_GATE)
    z_c = 1.0 if channel is None else channel[0]
    if "final_norm" in out:
        out["final_norm"] = _scaled(out["final_norm"], z_c, scale=0, bias=0)
    scores = {"heads": [], "neurons": [], "attention": [], "mlp": [],
              "channels": None if channel is None else channel[1]}
    d = np.shape(_attention(first)["out"]["kernel"])[-1]
    for i, layer in enumerate(layers):
        layer = dict(layer)
        att, heads = _pop_gate(_attention(layer), "head_gate")
        mlp, units = _pop_gate(layer["mlp"], "unit_gate")
        h, f = np.shape(att["out"]["kernel"])[0], np.shape(mlp["fc2"]["kernel"])[0]
        for sub, weights, unit in (("attention_sublayer", "att", heads),
                                   ("mlp_sublayer", "mlp", units)):
            layer[sub], gate = _pop_gate(layer[sub], "layer_gate")
            layer[sub] = {**layer[sub], "norm": _scaled(layer[sub]["norm"], z_c, scale=0,
                                                        bias=0)}
            z_layer, p_layer = (1.0, 1.0) if gate is None else (float(gate[0][0]),
                                                                  float(gate[1][0]))
            scores["attention" if weights == "att" else "mlp"].append(p_layer)
            if weights == "att":
                z_rows = np.ones(h) if unit is None else unit[0]
                att["out"] = _scaled(att["out"], z_rows, kernel=0)
                att["out"] = _scaled(att["out"], z_layer * np.broadcast_to(z_c, d), kernel=-1,
                                     bias=0)
                scores["heads"].append(np.ones(h) if unit is None else unit[1])
            else:
                z_rows = np.ones(f) if unit is None else unit[0]
                mlp["fc2"] = _scaled(mlp["fc2"], z_rows, kernel=0)
                mlp["fc2"] = _scaled(mlp["fc2"], z_layer * np.broadcast_to(z_c, d), kernel=-1,
                                     bias=0)
                scores["neurons"].append(np.ones(f) if unit is None else unit[1])
        layer["self_attention"], layer["mlp"] = att, mlp
        out[f"layers_{i}"] = layer
    scores["attention"], scores["mlp"] = np.array(scores["attention"]), np.array(scores["mlp"])
    return out, scores


def _expected_layer_sizes(stack: dict, scores: dict) -> np.ndarray:
    """[L] parameters each layer's open gates are expected to keep."""
    sizes = []
    for layer, h, f, p_att, p_mlp in zip(_layers(stack), scores["heads"], scores["neurons"],
                                         scores["attention"], scores["mlp"]):
        _, head_dim, d = np.shape(_attention(layer)["out"]["kernel"])    # [H, hd, D]
        sizes.append(gated_size.layer_size(np.sum(h), head_dim, np.sum(f), d, p_att, p_mlp))
    return np.array(sizes)


def inherit_stack(stack: dict, *, num_layers: int | None = None, layers: str = "uniform",
                  num_heads: int | None = None, mlp_dim: int | None = None,
                  layer_score: np.ndarray | None = None,
                  head_score: list[np.ndarray] | None = None,
                  neuron_score: list[np.ndarray] | None = None) -> tuple[dict, dict]:
    """A transformer stack's params (unrolled `layers_i` or scanned `layers`, plus
    final_norm etc.) -> (smaller stack in the same layout, {"kept_layers", "kept_heads",
    "kept_neurons"}). None keeps everything of that kind; scores (per layer of the
    source, for layers, heads and neurons) default to the learned gates' P(open) where
    the stack has gates (fold_gates), else to the weight norms."""
    scanned = "layers" in stack
    stack = transformer.unstack_layers(stack) if scanned else stack
    stack, learned = fold_gates(stack)   # learned gates: the scores
    if learned is not None:
        head_score = learned["heads"] if head_score is None else head_score
        neuron_score = learned["neurons"] if neuron_score is None else neuron_score
        if layer_score is None and layers == "importance":
            layer_score = _expected_layer_sizes(stack, learned)
    old = _layers(stack)
    keep = choose_layers(len(old), num_layers or len(old), layers,
                         layer_scores(stack) if layer_score is None and layers == "importance"
                         else layer_score)
    out = {k: v for k, v in stack.items() if not _LAYER.match(k)}
    head_score = None if head_score is None else [head_score[i] for i in keep]
    neuron_score = None if neuron_score is None else [neuron_score[i] for i in keep]
    info = {"kept_layers": keep, "kept_heads": [], "kept_neurons": []}
    for j, i in enumerate(keep):
        layer = dict(old[i])
        att = _attention(layer)
        h = att["out"]["kernel"].shape[0]
        heads = _top(head_scores(att) if head_score is None else head_score[j],
                     num_heads or h)
        layer["self_attention"] = select_heads(att, heads)
        f = layer["mlp"]["fc2"]["kernel"].shape[0]
        neurons = _top(neuron_scores(layer["mlp"]) if neuron_score is None else
                       neuron_score[j], mlp_dim or f)
        layer["mlp"] = select_neurons(layer["mlp"], neurons)
        out[f"layers_{j}"] = layer
        info["kept_heads"].append(heads.tolist())
        info["kept_neurons"].append(neurons.tolist())
    return (transformer.stack_layers(out) if scanned else out), info


def _channel_axes(path: str):
    for pattern, axes in CHANNEL_RULES:
        if re.search(pattern, path):
            return axes
    return ()


def channel_scores(tree: dict, d_model: int) -> np.ndarray:
    """[d_model] squared norms of every weight on each residual channel (CHANNEL_RULES)."""
    score = np.zeros(d_model)
    for path, leaf in flatten_dict(transformer.unstack_layers(tree)).items():
        for axis in _channel_axes("/".join(path)):
            x = np.moveaxis(np.asarray(leaf, np.float64), axis, 0)
            if x.shape[0] != d_model:
                raise ValueError(f"{'/'.join(path)}: axis {axis} has {x.shape[0]} entries, "
                                 f"not d_model={d_model}")
            score += np.sum(np.square(x.reshape(d_model, -1)), axis=1)
    return score


def _channel_importance(tower: dict, key: str, d_model: int) -> np.ndarray:
    """[d_model] scores of the residual channels: the channel gates' P(open) where the
    stack `tower[key]` has them, else the weight norms (channel_scores)."""
    gate = tower[key].get(transformer.CHANNEL_GATE)
    if gate is not None:
        return np.asarray(gates.prob_open(np.asarray(gate[gates.PARAM], np.float32)))
    return channel_scores(tower, d_model)


def inherit_channels(tree: dict, keep: np.ndarray) -> dict:
    """`tree` with every d_model axis (CHANNEL_RULES) cut to channels `keep`."""
    scanned_paths = {p for p in flatten_dict(tree) if "layers" in p}
    flat = flatten_dict(transformer.unstack_layers(tree) if scanned_paths else tree)
    out = {}
    for path, leaf in flat.items():
        x = np.asarray(leaf)
        for axis in _channel_axes("/".join(path)):
            x = np.take(x, keep, axis=axis)
        out[path] = x
    tree = unflatten_dict(out)
    return transformer.stack_layers(tree) if scanned_paths else tree


# ---- Whole models ------------------------------------------------------------------------
def _stack_key(params: dict) -> str:
    key = transformer.stack_name(params)
    if key is None:
        raise ValueError(f"no transformer stack {transformer.STACK_NAMES} among "
                         f"{sorted(params)}")
    return key


def shrink(params: dict, cfg, *, num_layers: int | None = None, layers: str = "uniform",
           num_heads: int | None = None, mlp_dim: int | None = None,
           d_model: int | None = None) -> tuple[dict, dict]:
    """A smaller model from `params` of a model whose config `cfg` is a TransformerConfig
    (Decoder, Encoder) or holds one as `cfg.encoder` (ViT). Returns (params, overrides):
    the config fields of the smaller model (for ViT nested under "encoder"), e.g.
    {"num_layers": 2, "num_heads": 2, "head_dim": 16, "mlp_dim": 128, "d_model": 32}."""
    nested = not isinstance(cfg, transformer.TransformerConfig)
    stack_cfg = cfg.encoder if nested else cfg
    key = _stack_key(params)
    keep = (_top(_channel_importance(params, key, stack_cfg.d_model), d_model)
            if d_model and d_model != stack_cfg.d_model else None)
    stack, _ = inherit_stack(params[key], num_layers=num_layers, layers=layers,
                             num_heads=num_heads, mlp_dim=mlp_dim)
    out = {**params, key: stack}
    head_dim = stack_cfg.head_dim or stack_cfg.d_model // stack_cfg.num_heads
    fields = {"num_layers": num_layers or stack_cfg.num_layers,
              "num_heads": num_heads or stack_cfg.num_heads,
              "mlp_dim": mlp_dim or stack_cfg.mlp_dim, "d_model": d_model or stack_cfg.d_model}
    if fields["num_heads"] * head_dim != fields["d_model"]:
        fields["head_dim"] = head_dim
    if keep is not None:
        out = inherit_channels(out, keep)
    return out, ({"encoder": fields} if nested else fields)


def _has_stack(tree) -> bool:
    return isinstance(tree, dict) and any(
        k in tree and isinstance(tree[k], dict) and (
            "layers" in tree[k] or any(_LAYER.match(n) for n in tree[k]))
        for k in transformer.STACK_NAMES)


def _stack_sizes(stack: dict) -> dict:
    """num_layers, num_heads, mlp_dim, d_model of a stack's params (either layout)."""
    stack = transformer.unstack_layers(stack) if "layers" in stack else stack
    layers = _layers(stack)
    out_kernel = np.shape(_attention(layers[0])["out"]["kernel"])   # [H, hd, D]
    return {"num_layers": len(layers), "num_heads": out_kernel[0], "head_dim": out_kernel[1],
            "mlp_dim": np.shape(layers[0]["mlp"]["fc2"]["kernel"])[0], "d_model": out_kernel[-1]}


def shrink_to(source: dict, template: dict, layers: str = "uniform") -> dict:
    """`source` params inherited into the sizes of `template` (a smaller model's params of
    the same family, e.g. a fresh init): every transformer stack -- the model's own, or
    each tower's (CLIP's image_tower / text_tower, whose `<tower>_projection` rows follow
    the tower's channels) -- keeps the template's number of layers (chosen by `layers`),
    heads, MLP units and residual channels, the most important by weight norm."""
    towers = [""] if _has_stack(source) else [k for k, v in source.items() if _has_stack(v)]
    if not towers:
        raise ValueError("weight inheritance needs a transformer (a decoder or encoder "
                         "stack, or towers holding one)")
    out = dict(source)
    for name in towers:
        tower, target = (source, template) if not name else (source[name], template[name])
        key = _stack_key(tower)
        have, want = _stack_sizes(tower[key]), _stack_sizes(target[key])
        if want["head_dim"] != have["head_dim"]:
            raise ValueError(f"weight inheritance keeps each head's width: this model"
                             f"{' ' + name if name else ''} has head_dim {want['head_dim']}, "
                             f"its source {have['head_dim']} (set head_dim="
                             f"{have['head_dim']} in its model config)")
        larger = [f"{k} {want[k]} > {have[k]}" for k in want if want[k] > have[k]]
        if larger:
            raise ValueError(f"weight inheritance shrinks; this model{' ' + name if name else ''}"
                             f" is larger than its source: {', '.join(larger)}")
        # Channel importance is read off the whole source tower, before units go.
        keep = (_top(_channel_importance(tower, key, have["d_model"]), want["d_model"])
                if want["d_model"] != have["d_model"] else None)
        stack, _ = inherit_stack(tower[key], num_layers=want["num_layers"], layers=layers,
                                 num_heads=want["num_heads"], mlp_dim=want["mlp_dim"])
        tower = {**tower, key: stack}
        if keep is not None:
            tower = inherit_channels(tower, keep)
            projection = f"{name.removesuffix('_tower')}_projection"
            if name and projection in out:
                out[projection] = {k: np.asarray(v)[keep] for k, v in out[projection].items()}
        if name:
            out[name] = tower
        else:
            out = tower
    return out


def shrink_pruned(params: dict, cfg) -> tuple[dict, dict]:
    """The physically smaller form of a structurally pruned model (`prune_structured`:
    whole heads, or hidden MLP units -- paths "mlp/fc1"): the units whose weights are all
    zero -- a head's output rows, a unit's fc1 column -- are removed, every layer keeping
    the same number. Returns (params, overrides) like `shrink`; the outputs are the pruned
    model's. ValueError when a layer's count differs or nothing was removed."""
    nested = not isinstance(cfg, transformer.TransformerConfig)
    key = _stack_key(params)
    stack = params[key]
    scanned = "layers" in stack
    layers = _layers(transformer.unstack_layers(stack) if scanned else stack)
    heads = [np.any(np.asarray(_attention(l)["out"]["kernel"]) != 0, axis=(1, 2))
             for l in layers]
    units = [np.any(np.asarray(l["mlp"]["fc1"]["kernel"]) != 0, axis=0) for l in layers]
    counts = {"heads": {int(h.sum()) for h in heads}, "units": {int(u.sum()) for u in units}}
    for what, kept in counts.items():
        if len(kept) > 1:
            raise ValueError(f"the layers keep different numbers of {what} ({sorted(kept)}); "
                             "one model config cannot hold them")
    h, f = counts["heads"].pop(), counts["units"].pop()
    stack_cfg = cfg.encoder if nested else cfg
    if h == stack_cfg.num_heads and f == stack_cfg.mlp_dim:
        raise ValueError("nothing to shrink: no whole head or MLP unit is zero")
    small, _ = inherit_stack(stack, num_heads=h, mlp_dim=f,
                             head_score=[x.astype(float) for x in heads],
                             neuron_score=[x.astype(float) for x in units])
    fields = {"num_heads": h, "mlp_dim": f}
    head_dim = stack_cfg.head_dim or stack_cfg.d_model // stack_cfg.num_heads
    if h * head_dim != stack_cfg.d_model:
        fields["head_dim"] = head_dim
    return {**params, key: small}, ({"encoder": fields} if nested else fields)


def count_params(params) -> int:
    return int(sum(np.size(x) for x in flatten_dict(params).values()))
