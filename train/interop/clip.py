"""CLIP (Radford et al. 2021) checkpoints <-> flaxlab's `models.clip.ClipModel` (ViT image
tower, causal text tower).

The Hugging Face layout (`CLIPModel`) and how it lands here:

  vision_model.embeddings.patch_embedding [D, C, p, p]  image_tower/embedding/kernel
                                 [p, p, C, D] (PyTorch's OIHW conv -> flaxlab's patch
                                 matmul); CLIP's conv has no bias, so the bias is 0
  vision_model.embeddings.class_embedding [D], position_embedding [T, D]
                                 image_tower/cls [1, 1, D], pos_embedding [1, T, D]
  vision_model.pre_layrnorm      image_tower/pre_norm (ViTConfig.pre_norm)
  vision_model.post_layernorm    the image tower's final norm (every token, then the class
                                 token is taken: the same numbers as normalizing it alone)
  text_model.embeddings.{token,position}_embedding   text_tower/embed/{tokens,positions}
  text_model.final_layer_norm    text_tower/encoder/final_norm; pooled at the end-of-text
                                 token (the first `eos_token_id`; the legacy id 2 means
                                 "the largest id", which is EOT in CLIP's vocabulary)
  *.encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2}
                                 pre-norm layers; nn.Linear [out, in] kernels transposed;
                                 quick-GELU x * sigmoid(1.702 x)
  visual_projection, text_projection [E, D] (no bias)   image_projection, text_projection
  logit_scale                    logit_scale (log of the scale, as in CLIP)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from train.interop import hf as hf_lib
from train.interop.hf import ConversionError

FAMILY = "clip"           # the flaxlab model family
TASK = "contrastive"      # the flaxlab task of the converted model
CONFIG = "clip:default"   # configs/<file>.py:<variant> of its workdir
_BUFFERS = ("embeddings.position_ids",)


def _tower(hf: dict, what: str) -> dict[str, Any]:
    act = hf_lib.activation(hf, "hidden_act", "quick_gelu", f"config.json {what}")
    return dict(d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                activation=act, norm="layernorm", norm_position="pre",
                norm_epsilon=float(hf.get("layer_norm_eps", 1e-5)), fused_qkv=False,
                use_bias=True, dropout_rate=0.0,
                attention_dropout_rate=float(hf.get("attention_dropout", 0.0)))


def model_overrides(hf: dict) -> dict[str, Any]:
    """flaxlab `model` fields (models.clip.ClipConfig, nested tower dicts) of a CLIP
    config, with the dataset fields (vocab_size, image_size, channels) too."""
    if hf.get("model_type") != "clip":
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; "
                              "--arch=clip reads model_type 'clip'")
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    vocab = text["vocab_size"]
    eos = int(text.get("eos_token_id", 2))
    return dict(
        image_tower="vit", text_causal=True, text_pooling="eot",
        eos_id=vocab - 1 if eos == 2 else eos,  # transformers' legacy rule for id 2
        embed_dim=hf.get("projection_dim", 512),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
        logit_scale_max=100.0, logit_bias_init=None,
        vocab_size=vocab, image_size=vision["image_size"],
        channels=vision.get("num_channels", 3),
        vit=dict(patch_size=vision["patch_size"], pool="cls", representation_size=None,
                 pre_norm=True, encoder=_tower(vision, "vision_config")),
        text=dict(_tower(text, "text_config"), max_length=text["max_position_embeddings"],
                  position="learned", pad_id=int(text.get("pad_token_id", 1))))


def _dims(m: dict):
    v, t = m["vit"], m["text"]
    ve, te = v["encoder"], t
    tokens = (m["image_size"] // v["patch_size"]) ** 2 + 1
    return v, ve, te, tokens


def _layers_from(t: hf_lib.Tensors, prefix: str, enc: dict) -> dict:
    """Pre-norm CLIP layers `prefix`layers.i.* -> flaxlab layers_i (+ nothing else)."""
    d, heads, ff = enc["d_model"], enc["num_heads"], enc["mlp_dim"]
    hd = d // heads
    linear = t.linear

    def norm(name):
        return t.norm(name, d)

    out = {}
    for i in range(enc["num_layers"]):
        p = f"{prefix}layers.{i}."
        attention = {}
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            k, b = linear(f"{p}self_attn.{theirs}", d, d)
            attention[ours] = {"kernel": k.reshape(d, heads, hd), "bias": b.reshape(heads, hd)}
        k, b = linear(p + "self_attn.out_proj", d, d)
        attention["out"] = {"kernel": k.reshape(heads, hd, d), "bias": b}
        (k1, b1), (k2, b2) = linear(p + "mlp.fc1", d, ff), linear(p + "mlp.fc2", ff, d)
        out[f"layers_{i}"] = {
            "attention_sublayer": {"norm": norm(p + "layer_norm1")},
            "self_attention": attention,
            "mlp_sublayer": {"norm": norm(p + "layer_norm2")},
            "mlp": {"fc1": {"kernel": k1, "bias": b1}, "fc2": {"kernel": k2, "bias": b2}}}
    return out


def _layers_to(out: dict, layers: dict, prefix: str, enc: dict) -> None:
    d = enc["d_model"]
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    for i in range(enc["num_layers"]):
        layer, p = layers[f"layers_{i}"], f"{prefix}layers.{i}."
        att = layer["self_attention"]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                             ("out", "out_proj")):
            # [D, H, hd] (q, k, v) and [H, hd, D] (out) are [in, out] once flattened
            out[f"{p}self_attn.{theirs}.weight"] = a(att[ours]["kernel"]).reshape(d, d).T.copy()
            out[f"{p}self_attn.{theirs}.bias"] = a(att[ours]["bias"]).reshape(d)
        for name, norm in (("layer_norm1", layer["attention_sublayer"]["norm"]),
                           ("layer_norm2", layer["mlp_sublayer"]["norm"])):
            out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = a(norm["scale"]), a(norm["bias"])
        for name in ("fc1", "fc2"):
            out[f"{p}mlp.{name}.weight"] = a(layer["mlp"][name]["kernel"]).T.copy()
            out[f"{p}mlp.{name}.bias"] = a(layer["mlp"][name]["bias"])


def params_from_hf(tensors: dict[str, np.ndarray], m: dict) -> dict:
    """ClipModel params from a CLIPModel state dict; ConversionError naming a missing,
    misshapen or unknown tensor."""
    v, ve, te, tokens = _dims(m)
    dv, dt, p, c = ve["d_model"], te["d_model"], v["patch_size"], m["channels"]
    t = hf_lib.Tensors(tensors)
    get, norm = t.get, t.norm

    vision = {
        "embedding": {"kernel": get("vision_model.embeddings.patch_embedding.weight",
                                    (dv, c, p, p)).transpose(2, 3, 1, 0),
                      "bias": np.zeros((dv,), np.float32)},
        "cls": get("vision_model.embeddings.class_embedding", (dv,)).reshape(1, 1, dv),
        "pos_embedding": get("vision_model.embeddings.position_embedding.weight",
                             (tokens, dv))[None],
        "pre_norm": norm("vision_model.pre_layrnorm", dv),
        "encoder": {**_layers_from(t, "vision_model.encoder.", ve),
                    "final_norm": norm("vision_model.post_layernorm", dv)}}
    text = {
        "embed": {"tokens": {"embedding": get("text_model.embeddings.token_embedding.weight",
                                              (m["vocab_size"], dt))},
                  "positions": {"embedding": get(
                      "text_model.embeddings.position_embedding.weight",
                      (te["max_length"], dt))}},
        "encoder": {**_layers_from(t, "text_model.encoder.", te),
                    "final_norm": norm("text_model.final_layer_norm", dt)}}
    e = m["embed_dim"]
    params = {"image_tower": vision, "text_tower": text,
              "image_projection": {"kernel": get("visual_projection.weight", (e, dv)).T},
              "text_projection": {"kernel": get("text_projection.weight", (e, dt)).T},
              "logit_scale": get("logit_scale", ())}
    t.check_all_read("CLIP", buffers=_BUFFERS)
    return params


def params_to_hf(params: dict, m: dict) -> dict[str, np.ndarray]:
    """The CLIPModel state dict of ClipModel params (a ViT image tower)."""
    v, ve, te, _ = _dims(m)
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    vis, txt = params["image_tower"], params["text_tower"]
    if np.any(a(vis["embedding"]["bias"])):
        raise ConversionError("image_tower/embedding/bias is not 0: CLIP's patch "
                              "convolution has no bias, so this model does not convert")
    out = {"vision_model.embeddings.patch_embedding.weight":
           a(vis["embedding"]["kernel"]).transpose(3, 2, 0, 1).copy(),
           "vision_model.embeddings.class_embedding": a(vis["cls"]).reshape(-1),
           "vision_model.embeddings.position_embedding.weight": a(vis["pos_embedding"])[0],
           "text_model.embeddings.token_embedding.weight": a(txt["embed"]["tokens"]["embedding"]),
           "text_model.embeddings.position_embedding.weight":
               a(txt["embed"]["positions"]["embedding"]),
           "visual_projection.weight": a(params["image_projection"]["kernel"]).T.copy(),
           "text_projection.weight": a(params["text_projection"]["kernel"]).T.copy(),
           "logit_scale": a(params["logit_scale"])}
    for name, norm in (("vision_model.pre_layrnorm", vis["pre_norm"]),
                       ("vision_model.post_layernorm", vis["encoder"]["final_norm"]),
                       ("text_model.final_layer_norm", txt["encoder"]["final_norm"])):
        out[f"{name}.weight"], out[f"{name}.bias"] = a(norm["scale"]), a(norm["bias"])
    _layers_to(out, vis["encoder"], "vision_model.encoder.", ve)
    _layers_to(out, txt["encoder"], "text_model.encoder.", te)
    return out


def data_fields(params: dict) -> dict[str, int]:
    """vocab_size, image_size and channels, read off the params."""
    p, _, c, _ = np.shape(params["image_tower"]["embedding"]["kernel"])
    grid = int(round((np.shape(params["image_tower"]["pos_embedding"])[1] - 1) ** 0.5))
    return {"vocab_size": int(np.shape(params["text_tower"]["embed"]["tokens"]["embedding"])[0]),
            "image_size": int(grid * p), "channels": int(c)}


def hf_config(m: dict, base: dict | None = None) -> dict:
    """A CLIPConfig dict for `m` (flaxlab model fields); `base` keeps the source's keys."""
    act = hf_lib.HF_ACTIVATIONS
    v, ve, te, _ = _dims(m)
    if m.get("image_tower") != "vit" or not v.get("pre_norm") or v.get("pool") != "cls" \
            or not m.get("text_causal") or m.get("text_pooling") != "eot" \
            or m.get("logit_bias_init") is not None:
        raise ConversionError("this flaxlab model is not a CLIP: it needs a ViT image tower "
                              "with pre_norm and the class token, a causal text tower pooled "
                              "at the end of text, and no logit bias (SigLIP)")

    def tower(enc):
        return {"hidden_size": enc["d_model"], "num_hidden_layers": enc["num_layers"],
                "num_attention_heads": enc["num_heads"], "intermediate_size": enc["mlp_dim"],
                "hidden_act": act[enc["activation"]], "layer_norm_eps": enc["norm_epsilon"]}
    base = dict(base or {})
    text = {**base.get("text_config", {}), **tower(te), "vocab_size": m["vocab_size"],
            "max_position_embeddings": te["max_length"], "pad_token_id": te["pad_id"],
            "eos_token_id": m["eos_id"]}
    vision = {**base.get("vision_config", {}), **tower(ve), "image_size": m["image_size"],
              "patch_size": v["patch_size"], "num_channels": m["channels"]}
    return {**base, "model_type": "clip", "architectures": ["CLIPModel"],
            "projection_dim": m["embed_dim"], "text_config": text, "vision_config": vision}
