"""GPT-2 (Radford et al. 2019) checkpoints <-> flaxlab's `models.transformer.Decoder`.

The Hugging Face layout (`GPT2LMHeadModel`) and how it lands here:

  wte [V, D], wpe [P, D]            embed/tokens/embedding, embed/positions/embedding
  h.i.ln_1 / ln_2 (weight, bias)    layers_i/{attention,mlp}_sublayer/norm (scale, bias):
                                    pre-norm, eps `layer_norm_epsilon`
  h.i.attn.c_attn [D, 3D]           self_attention/qkv/kernel [D, 3H, hd]: GPT-2's Conv1D
                                    keeps kernels as [in, out] (flax's layout; nn.Linear
                                    would be [out, in]), and the 3D outputs are q, k, v,
                                    each H heads of hd -- the fused layout flaxlab uses
  h.i.attn.c_proj [D, D]            self_attention/out/kernel [H, hd, D]
  h.i.mlp.c_fc [D, F], c_proj [F, D]  mlp/fc1, mlp/fc2; GELU's tanh approximation
                                    ("gelu_new" = flaxlab's "gelu_tanh")
  ln_f                              decoder/final_norm
  lm_head [V, D]                    tied to wte (tie_word_embeddings); untied: the
                                    transpose is unembed/logits/kernel [D, V]

Attention is scaled by 1/sqrt(hd) (scale_attn_weights); the checkpoints that scale by the
inverse layer index, or carry cross-attention, are refused rather than approximated.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from train.interop import hf as hf_lib
from train.interop.hf import ConversionError

FAMILY = "transformer"    # the flaxlab model family
TASK = "lm"              # the flaxlab task of the converted model
CONFIG = "gpt:gpt2_small"  # configs/<file>.py:<variant> of its workdir
# Buffers some checkpoints carry (the causal mask) that hold no weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def data_fields(params: dict) -> dict[str, int]:
    """The dataset-filled model fields, read off the params: {"vocab_size": V}."""
    return {"vocab_size": int(np.shape(params["embed"]["tokens"]["embedding"])[0])}


def model_overrides(hf: dict) -> dict[str, Any]:
    """flaxlab `model` fields (models.transformer.TransformerConfig) of a GPT-2 config."""
    if hf.get("model_type") != "gpt2":
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; "
                              "--arch=gpt2 reads model_type 'gpt2'")
    refused = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True,
               "scale_attn_weights": False}
    for key, bad in refused.items():
        if hf.get(key, not bad) == bad:
            raise ConversionError(f"config.json {key}={bad}: flaxlab's decoder has no such "
                                  "attention; this checkpoint cannot be converted exactly")
    act = hf_lib.activation(hf, "activation_function", "gelu_new")
    d = hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], max_length=hf["n_positions"], d_model=d,
                num_layers=hf["n_layer"], num_heads=hf["n_head"],
                mlp_dim=hf.get("n_inner") or 4 * d, activation=act,
                norm="layernorm", norm_position="pre",
                norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
                scale_embeddings=False, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                fused_qkv=True, use_bias=True,
                dropout_rate=float(hf.get("resid_pdrop", 0.1)),
                attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)))


def _dims(m: dict) -> tuple[int, int, int, int, int, int]:
    return (m["vocab_size"], m["max_length"], m["d_model"], m["num_heads"],
            m["d_model"] // m["num_heads"], m["mlp_dim"])


def params_from_hf(tensors: dict[str, np.ndarray], m: dict) -> dict:
    """The Decoder's params tree from a GPT-2 state dict (names with or without the
    "transformer." prefix); ConversionError naming a missing, misshapen or unknown tensor."""
    t = hf_lib.Tensors({k.removeprefix("transformer."): v for k, v in tensors.items()})
    vocab, positions, d, heads, hd, ff = _dims(m)
    get = t.get

    def norm(name):
        return t.norm(name, d)

    decoder = {}
    for i in range(m["num_layers"]):
        p = f"h.{i}."
        decoder[f"layers_{i}"] = {
            "attention_sublayer": {"norm": norm(p + "ln_1")},
            "self_attention": {
                "qkv": {"kernel": get(p + "attn.c_attn.weight", (d, 3 * d)).reshape(
                            d, 3 * heads, hd),
                        "bias": get(p + "attn.c_attn.bias", (3 * d,)).reshape(3 * heads, hd)},
                "out": {"kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(heads, hd, d),
                        "bias": get(p + "attn.c_proj.bias", (d,))}},
            "mlp_sublayer": {"norm": norm(p + "ln_2")},
            "mlp": {"fc1": {"kernel": get(p + "mlp.c_fc.weight", (d, ff)),
                            "bias": get(p + "mlp.c_fc.bias", (ff,))},
                    "fc2": {"kernel": get(p + "mlp.c_proj.weight", (ff, d)),
                            "bias": get(p + "mlp.c_proj.bias", (d,))}}}
    decoder["final_norm"] = norm("ln_f")
    params = {"embed": {"tokens": {"embedding": get("wte.weight", (vocab, d))},
                        "positions": {"embedding": get("wpe.weight", (positions, d))}},
              "decoder": decoder}
    if m["tie_embeddings"]:
        if "lm_head.weight" in t and not np.array_equal(t.tensors["lm_head.weight"],
                                                        t.tensors["wte.weight"]):
            raise ConversionError("checkpoint tensor 'lm_head.weight' differs from "
                                  "'transformer.wte.weight' though tie_word_embeddings is set")
        t.mark_read("lm_head.weight")
    else:
        params["unembed"] = {"logits": {"kernel": get("lm_head.weight", (vocab, d)).T}}
    t.check_all_read("GPT-2", buffers=_BUFFERS)
    return params


def params_to_hf(params: dict, m: dict) -> dict[str, np.ndarray]:
    """The GPT2LMHeadModel state dict ("transformer." names) of the Decoder's params."""
    vocab, positions, d, heads, hd, ff = _dims(m)
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {"transformer.wte.weight": a(params["embed"]["tokens"]["embedding"]),
           "transformer.wpe.weight": a(params["embed"]["positions"]["embedding"])}
    dec = params["decoder"]
    for i in range(m["num_layers"]):
        layer, p = dec[f"layers_{i}"], f"transformer.h.{i}."
        att, mlp = layer["self_attention"], layer["mlp"]
        for hf_name, norm in (("ln_1", layer["attention_sublayer"]["norm"]),
                              ("ln_2", layer["mlp_sublayer"]["norm"])):
            out[f"{p}{hf_name}.weight"], out[f"{p}{hf_name}.bias"] = (a(norm["scale"]),
                                                                      a(norm["bias"]))
        out[p + "attn.c_attn.weight"] = a(att["qkv"]["kernel"]).reshape(d, 3 * d)
        out[p + "attn.c_attn.bias"] = a(att["qkv"]["bias"]).reshape(3 * d)
        out[p + "attn.c_proj.weight"] = a(att["out"]["kernel"]).reshape(d, d)
        out[p + "attn.c_proj.bias"] = a(att["out"]["bias"])
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = (a(mlp["fc1"]["kernel"]),
                                                                a(mlp["fc1"]["bias"]))
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = (a(mlp["fc2"]["kernel"]),
                                                                    a(mlp["fc2"]["bias"]))
    out["transformer.ln_f.weight"] = a(dec["final_norm"]["scale"])
    out["transformer.ln_f.bias"] = a(dec["final_norm"]["bias"])
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = a(params["unembed"]["logits"]["kernel"]).T.copy()
    return out


def hf_config(m: dict, base: dict | None = None) -> dict:
    """A GPT2Config dict for `m` (flaxlab model fields); `base` (the source config.json,
    when converting back) keeps its other keys (token ids, task params)."""
    act = hf_lib.HF_ACTIVATIONS
    if m["activation"] not in act or m["norm"] != "layernorm" or m["position"] != "learned" \
            or m["norm_position"] != "pre" or m["scale_embeddings"] or not m["use_bias"]:
        raise ConversionError("this flaxlab decoder is not a GPT-2: it needs layernorm, "
                              "pre-norm, learned positions, biases and an activation of "
                              f"{', '.join(act)}")
    return {**(base or {}), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": m["vocab_size"], "n_positions": m["max_length"],
            "n_embd": m["d_model"], "n_layer": m["num_layers"], "n_head": m["num_heads"],
            "n_inner": m["mlp_dim"], "activation_function": act[m["activation"]],
            "layer_norm_epsilon": m["norm_epsilon"], "tie_word_embeddings": m["tie_embeddings"],
            "resid_pdrop": m["dropout_rate"], "embd_pdrop": m["dropout_rate"],
            "attn_pdrop": m["attention_dropout_rate"]}
