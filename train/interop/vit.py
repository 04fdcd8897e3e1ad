"""ViT (Dosovitskiy et al. 2021) checkpoints <-> flaxlab's `models.vit.ViT`.

The Hugging Face layout (`ViTForImageClassification`: names under "vit."; `ViTModel`: the
same names without the prefix) and how it lands here (D = hidden_size, H heads of hd,
F = intermediate_size, P = patch_size, C = num_channels, T = (image_size / P)^2 + 1):

  embeddings.patch_embeddings.projection   embedding/kernel [P, P, C, D], bias [D]: the
    weight [D, C, P, P] (Conv2d, OIHW)      stride-P conv on NCHW pixel_values; flaxlab
                                            patchifies NHWC images in (row, column, channel)
                                            order, the kernel's HWIO layout, so the weight is
                                            transposed (2, 3, 1, 0). Patches run row-major in
                                            both (Conv2d output flattened over H/P, W/P).
  embeddings.cls_token [1, 1, D]            cls [1, 1, D] (eq. 1's x_class)
  embeddings.position_embeddings [1, T, D]  pos_embedding [1, T, D] (row 0: the class token)
  encoder.layer.i.layernorm_before / _after encoder/layers_i/{attention,mlp}_sublayer/norm:
                                            pre-norm, eps `layer_norm_eps`
  encoder.layer.i.attention.attention.      self_attention/{query,key,value}/kernel
    {query,key,value} [H*hd, D]             [D, H, hd], bias [H, hd] (separate projections,
                                            fused_qkv=False); nn.Linear keeps [out, in], so
                                            every kernel is the transposed weight
  encoder.layer.i.attention.output.dense    self_attention/out/kernel [H, hd, D]
  encoder.layer.i.intermediate.dense,       mlp/fc1 [D, F], mlp/fc2 [F, D]; exact GELU
    encoder.layer.i.output.dense            ("gelu" in both)
  layernorm                                 encoder/final_norm (the LN of eq. 4)
  classifier [classes, D]                   head/kernel [D, classes] on the class token
  pooler.dense [R, D] (ViTModel)            representation/kernel [D, R]: tanh(Dense) of the
                                            class token, flaxlab's pre-logits layer; skipped
                                            (logged) without representation_size, as
                                            ViTForImageClassification leaves it unread

transformers >= 5 names the layers `layers.i.attention.q_proj`, `mlp.fc1`, ... in memory
and still writes the names above (its checkpoint conversion mapping); both are read, the
file names are written. A ViTForImageClassification with num_labels=0 (an identity head)
is flaxlab's num_classes=0 without a representation layer. Attention is scaled by
1/sqrt(hd) in both. Checkpoints this model cannot compute exactly (no qkv bias, another
head_dim, non-square images or patches, a non-tanh pooler, the masked-image-modeling head)
are refused rather than approximated.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
from absl import logging

from models import transformer
from models import vit as vit_models
from train.interop import hf as hf_lib
from train.interop.hf import ConversionError

FAMILY = "vit"           # the flaxlab model family
TASK = "classify"         # the flaxlab task of the converted model
CONFIG = "vit:default"    # configs/<file>.py:<variant> of its workdir
CLASSIFIER, BACKBONE = "ViTForImageClassification", "ViTModel"
DATA_FIELDS = ("num_classes", "image_size", "channels")  # the vit family's, from the dataset

# transformers >= 5 in-memory names -> the checkpoint-file names (its conversion mapping
# for ViTModel, inverted), applied to names that start with "layers.".
_RENAMES = tuple((re.compile(rf"^layers\.(\d+)\.{ours}\."), rf"encoder.layer.\1.{theirs}.")
                 for ours, theirs in (("attention.q_proj", "attention.attention.query"),
                                      ("attention.k_proj", "attention.attention.key"),
                                      ("attention.v_proj", "attention.attention.value"),
                                      ("attention.o_proj", "attention.output.dense"),
                                      ("mlp.fc1", "intermediate.dense"),
                                      ("mlp.fc2", "output.dense"),
                                      (r"(layernorm_before|layernorm_after)", r"\2")))
_BOTH = ("a flaxlab ViT with both a representation layer and a head has no Hugging Face ViT "
         "counterpart (ViTForImageClassification classifies the class token directly)")


def _square(hf: dict, key: str) -> int:
    value = hf.get(key, {"image_size": 224, "patch_size": 16}[key])
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"config.json {key}={list(value)}: flaxlab's ViT takes "
                                  f"square images and patches (one {key})")
        value = value[0]
    return int(value)


def _num_labels(hf: dict) -> int:
    """PretrainedConfig's rule: len(id2label) when given, else num_labels (default 2)."""
    if hf.get("id2label") is not None:
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def model_overrides(hf: dict) -> dict[str, Any]:
    """flaxlab `model` fields of a ViT config.json: models.vit.ViTConfig fields with the
    transformer's under `encoder` (make_config("tiny/4", **fields) builds the model).

    ViTForImageClassification: num_classes = its number of labels; ViTModel (or no
    `architectures`): num_classes=0 and representation_size = pooler_output_size (its
    pooler; a ViTModel saved without one converts with representation_size=None)."""
    if hf.get("model_type") != "vit":
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; "
                              "--arch=vit reads model_type 'vit'")
    archs = hf.get("architectures") or [BACKBONE]
    if len(archs) != 1 or archs[0] not in (CLASSIFIER, BACKBONE):
        raise ConversionError(f"config.json architectures={archs}; supported: {CLASSIFIER}, "
                              f"{BACKBONE}")
    if not hf.get("qkv_bias", True):
        raise ConversionError("config.json qkv_bias=False: flaxlab's attention has biases on "
                              "all projections or none; this checkpoint cannot be converted "
                              "exactly")
    d, heads = int(hf.get("hidden_size", 768)), int(hf.get("num_attention_heads", 12))
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        raise ConversionError(f"config.json head_dim={hf.get('head_dim')}: flaxlab's heads "
                              f"are hidden_size / num_attention_heads ({d}/{heads})")
    act = hf_lib.activation(hf, "hidden_act", "gelu")
    classifier = archs[0] == CLASSIFIER
    if not classifier and hf.get("pooler_act", "tanh") != "tanh":
        raise ConversionError(f"config.json pooler_act={hf['pooler_act']!r}: flaxlab's "
                              "representation layer is tanh(Dense)")
    image, patch = _square(hf, "image_size"), _square(hf, "patch_size")
    encoder = dict(d_model=d, num_layers=int(hf.get("num_hidden_layers", 12)),
                   num_heads=heads, num_kv_heads=None,
                   mlp_dim=int(hf.get("intermediate_size", 3072)),
                   activation=act, norm="layernorm", norm_position="pre",
                   norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)), fused_qkv=False,
                   use_bias=True, dropout_rate=float(hf.get("hidden_dropout_prob", 0.0)),
                   attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.0)))
    return dict(image_size=image, patch_size=patch, channels=int(hf.get("num_channels", 3)),
                pool="cls", num_classes=_num_labels(hf) if classifier else 0,
                representation_size=None if classifier
                else int(hf.get("pooler_output_size") or d),
                encoder=encoder)


def _resolved(m: Mapping) -> tuple[dict, dict]:
    """(ViTConfig fields, encoder fields) of `m` (model_overrides' dict, or a run's `model`
    section with `data_fields` added), missing ones at flaxlab's defaults -- except the
    data fields, which no default describes."""
    missing = [k for k in DATA_FIELDS if k not in m]
    if missing:
        raise ConversionError(f"the model fields lack {', '.join(missing)}: a run's model "
                              "section leaves them to the dataset; add "
                              "train.interop.vit.data_fields(params)")
    top = {f.name: f.default for f in dataclasses.fields(vit_models.ViTConfig)
           if f.default is not dataclasses.MISSING}
    top.update({k: v for k, v in m.items() if k != "encoder"})
    base = vit_models.encoder_config()
    enc = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    enc.update(dict(m.get("encoder", {}).items()))
    return top, enc


def _dims(m: Mapping):
    top, enc = _resolved(m)
    d, heads = enc["d_model"], enc["num_heads"]
    p, c = top["patch_size"], top["channels"]
    tokens = (top["image_size"] // p) ** 2 + 1
    return top, enc, d, heads, d // heads, enc["mlp_dim"], p, c, tokens


def data_fields(params: Mapping) -> dict[str, int]:
    """The fields a run's `model` section leaves to the dataset (num_classes, image_size,
    channels), read off a ViT's params: head/kernel [D, classes], embedding/kernel
    [P, P, C, D], pos_embedding [1, (image_size / P)^2 + 1, D]."""
    p, _, c, _ = np.shape(params["embedding"]["kernel"])
    grid = int(round((np.shape(params["pos_embedding"])[1] - 1) ** 0.5))
    classes = np.shape(params["head"]["kernel"])[1] if "head" in params else 0
    return dict(num_classes=int(classes), image_size=int(grid * p), channels=int(c))


def params_from_hf(tensors: dict[str, np.ndarray], m: dict) -> dict:
    """The ViT's params tree from a ViTForImageClassification / ViTModel state dict (names
    with or without the "vit." prefix, file or transformers-5 in-memory layout; a pooler is
    read only with representation_size, else left out as the classifier leaves it);
    ConversionError naming a missing, misshapen or unknown tensor."""
    renamed = {}
    for name, value in tensors.items():
        name = name.removeprefix("vit.")
        for pattern, repl in _RENAMES:
            name, n = pattern.subn(repl, name)
            if n:
                break
        renamed[name] = value
    t = hf_lib.Tensors(renamed)
    top, enc, d, heads, hd, ff, p, c, tokens = _dims(m)
    if top["pool"] != "cls":
        raise ConversionError(f"model.pool={top['pool']!r}: Hugging Face's ViT reads the "
                              "class token (pool='cls')")
    if top["num_classes"] and top["representation_size"]:
        raise ConversionError(_BOTH)
    get, linear = t.get, t.linear

    def norm(name):
        return t.norm(name, d)

    encoder = {}
    for i in range(enc["num_layers"]):
        q = f"encoder.layer.{i}."
        attention = {}
        for name in ("query", "key", "value"):
            kernel, bias = linear(f"{q}attention.attention.{name}", d, d)
            attention[name] = {"kernel": kernel.reshape(d, heads, hd),
                               "bias": bias.reshape(heads, hd)}
        kernel, bias = linear(q + "attention.output.dense", d, d)
        attention["out"] = {"kernel": kernel.reshape(heads, hd, d), "bias": bias}
        (k1, b1), (k2, b2) = linear(q + "intermediate.dense", d, ff), linear(
            q + "output.dense", ff, d)
        encoder[f"layers_{i}"] = {
            "attention_sublayer": {"norm": norm(q + "layernorm_before")},
            "self_attention": attention,
            "mlp_sublayer": {"norm": norm(q + "layernorm_after")},
            "mlp": {"fc1": {"kernel": k1, "bias": b1}, "fc2": {"kernel": k2, "bias": b2}}}
    encoder["final_norm"] = norm("layernorm")
    patch = "embeddings.patch_embeddings.projection"
    params = {"embedding": {"kernel": get(f"{patch}.weight", (d, c, p, p)).transpose(2, 3, 1, 0),
                            "bias": get(f"{patch}.bias", (d,))},
              "cls": get("embeddings.cls_token", (1, 1, d)),
              "pos_embedding": get("embeddings.position_embeddings", (1, tokens, d)),
              "encoder": encoder}
    if top["representation_size"]:
        if "pooler.dense.weight" not in t:
            raise ConversionError("checkpoint tensor 'pooler.dense.weight' is missing (a "
                                  "ViTModel saved with add_pooling_layer=False converts "
                                  "with representation_size=None)")
        kernel, bias = linear("pooler.dense", d, top["representation_size"])
        params["representation"] = {"kernel": kernel, "bias": bias}
    else:
        # ViTForImageClassification builds ViTModel(add_pooling_layer=False): a pooler some
        # checkpoints still carry is never read by its logits (transformers drops it on load).
        skipped = sorted(k for k in t.tensors if k.startswith("pooler.dense."))
        if skipped:
            logging.info("vit: the classifier does not read the pooler, skipped: %s",
                         ", ".join(skipped))
        t.mark_read(*skipped)
    if top["num_classes"]:
        kernel, bias = linear("classifier", d, top["num_classes"])
        params["head"] = {"kernel": kernel, "bias": bias}
    t.check_all_read("this ViT")
    return params


def params_to_hf(params: dict, m: dict) -> dict[str, np.ndarray]:
    """The state dict (checkpoint-file names) of the ViT's params: ViTForImageClassification
    ("vit." names + classifier) without a representation layer, else ViTModel (pooler)."""
    top, enc, d, *_ = _dims(m)
    if "representation" in params and "head" in params:
        raise ConversionError(_BOTH)
    got = data_fields(params)
    wrong = [f"{k}={top[k]} (the params: {got[k]})" for k in DATA_FIELDS if top[k] != got[k]]
    if wrong:
        raise ConversionError(f"the model fields do not fit the params: {', '.join(wrong)}")
    prefix = "" if "representation" in params else "vit."
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {}

    def linear(name, kernel, bias):  # flax kernel [in, out] -> nn.Linear weight [out, in]
        out[f"{name}.weight"] = np.ascontiguousarray(a(kernel).T)
        out[f"{name}.bias"] = a(bias).reshape(-1)

    def norm(name, tree):
        out[f"{name}.weight"], out[f"{name}.bias"] = a(tree["scale"]), a(tree["bias"])

    patch, e = params["embedding"], prefix + "embeddings."
    out[e + "patch_embeddings.projection.weight"] = np.ascontiguousarray(
        a(patch["kernel"]).transpose(3, 2, 0, 1))  # [P, P, C, D] -> OIHW [D, C, P, P]
    out[e + "patch_embeddings.projection.bias"] = a(patch["bias"])
    out[e + "cls_token"] = a(params["cls"])
    out[e + "position_embeddings"] = a(params["pos_embedding"])
    encoder = transformer.unstack_layers(params["encoder"])  # scan_layers=True runs too
    for i in range(enc["num_layers"]):
        layer, q = encoder[f"layers_{i}"], f"{prefix}encoder.layer.{i}."
        att, mlp = layer["self_attention"], layer["mlp"]
        for name in ("query", "key", "value"):  # [D, H, hd] -> [D, H*hd]
            linear(f"{q}attention.attention.{name}", a(att[name]["kernel"]).reshape(d, d),
                   att[name]["bias"])
        linear(q + "attention.output.dense", a(att["out"]["kernel"]).reshape(d, d),
               att["out"]["bias"])  # [H, hd, D] -> [H*hd, D]
        linear(q + "intermediate.dense", mlp["fc1"]["kernel"], mlp["fc1"]["bias"])
        linear(q + "output.dense", mlp["fc2"]["kernel"], mlp["fc2"]["bias"])
        norm(q + "layernorm_before", layer["attention_sublayer"]["norm"])
        norm(q + "layernorm_after", layer["mlp_sublayer"]["norm"])
    norm(prefix + "layernorm", encoder["final_norm"])
    if "representation" in params:
        linear("pooler.dense", params["representation"]["kernel"],
               params["representation"]["bias"])
    if "head" in params:
        linear("classifier", params["head"]["kernel"], params["head"]["bias"])
    return out


def hf_config(m: dict, base: dict | None = None) -> dict:
    """A ViTConfig dict for `m` (flaxlab model fields with num_classes, image_size and
    channels set: a run's section leaves those to the dataset, see `data_fields`); `base`
    (the source config.json, when converting back) keeps its other keys (label names when
    their number still fits, image-processor settings)."""
    top, enc, d, heads, hd, ff, p, c, tokens = _dims(m)
    act = hf_lib.HF_ACTIVATIONS
    if enc["activation"] not in act or enc["norm"] != "layernorm" \
            or enc["norm_position"] != "pre" or not enc["use_bias"] or top["pool"] != "cls" \
            or enc["num_kv_heads"] not in (None, heads):
        raise ConversionError("this flaxlab ViT is not a Hugging Face ViT: it needs the class "
                              "token (pool='cls'), layernorm, pre-norm, biases, full multi-head "
                              "attention and a gelu/gelu_tanh/relu activation")
    classes, rep = top["num_classes"], top["representation_size"]
    if classes and rep:
        raise ConversionError(_BOTH)
    out = {k: v for k, v in (base or {}).items() if k not in ("num_labels", "pooler_output_size")}
    if rep:  # ViTModel: tanh(pooler(class token)) = flaxlab's pre-logits features
        out.update(architectures=[BACKBONE], pooler_output_size=rep, pooler_act="tanh")
    else:  # num_labels=0: the identity head, logits = the class token's features
        if len(out.get("id2label") or {}) != classes:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
        out["architectures"] = [CLASSIFIER]
    return {**out, "model_type": "vit", "hidden_size": d,
            "num_hidden_layers": enc["num_layers"], "num_attention_heads": heads,
            "intermediate_size": ff, "hidden_act": act[enc["activation"]],
            "layer_norm_eps": enc["norm_epsilon"], "image_size": top["image_size"],
            "patch_size": p, "num_channels": c, "qkv_bias": True,
            "hidden_dropout_prob": enc["dropout_rate"],
            "attention_probs_dropout_prob": enc["attention_dropout_rate"]}
