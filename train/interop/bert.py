"""BERT (Devlin et al. 2019) masked-LM checkpoints <-> flaxlab's `models.transformer.Encoder`
(head "mlm").

The Hugging Face layout (`BertForMaskedLM`) and how it lands here:

  embeddings.{word,position,token_type}_embeddings   embed/{tokens,positions,token_types}
  embeddings.LayerNorm                 embed/norm (model.embed_norm: the sum is normalized)
  encoder.layer.i.attention.self.{query,key,value} [D, D]   self_attention/{query,key,value}
                                       /kernel [D, H, hd]: nn.Linear keeps [out, in], so
                                       every kernel is transposed
  encoder.layer.i.attention.output.dense        self_attention/out/kernel [H, hd, D]
  encoder.layer.i.attention.output.LayerNorm    attention_sublayer/norm (post-norm:
                                       LN(x + attention(x)), Vaswani et al.'s order)
  encoder.layer.i.intermediate.dense / output.dense   mlp/fc1, mlp/fc2 (exact GELU)
  encoder.layer.i.output.LayerNorm     mlp_sublayer/norm
  cls.predictions.transform.{dense,LayerNorm}   mlm_transform, mlm_norm
  cls.predictions.decoder (tied to the word embeddings) + cls.predictions.bias   the tied
                                       unembedding + mlm_bias

Norms use `layer_norm_eps` (1e-12 in BERT). A pre-training checkpoint's pooler and
next-sentence head are not part of the masked LM and are skipped (logged).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from train.interop import hf as hf_lib
from train.interop.hf import ConversionError

FAMILY = "transformer"    # the flaxlab model family
TASK = "mlm"              # the flaxlab task of the converted model
CONFIG = "bert:default"   # configs/<file>.py:<variant> of its workdir
# Buffers (no weights) and the parts of a pre-training checkpoint the masked LM lacks.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_SKIPPED = ("pooler.", "cls.seq_relationship.")


def data_fields(params: dict) -> dict[str, int]:
    """The dataset-filled model fields, read off the params: {"vocab_size": V}."""
    return {"vocab_size": int(np.shape(params["embed"]["tokens"]["embedding"])[0])}


def model_overrides(hf: dict) -> dict[str, Any]:
    """flaxlab `model` fields (models.transformer.TransformerConfig) of a BERT config."""
    if hf.get("model_type") != "bert":
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; "
                              "--arch=bert reads model_type 'bert'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"config.json position_embedding_type="
                              f"{hf['position_embedding_type']!r}: only 'absolute' converts")
    act = hf_lib.activation(hf, "hidden_act", "gelu")
    return dict(vocab_size=hf["vocab_size"], max_length=hf["max_position_embeddings"],
                d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                activation=act, norm="layernorm", norm_position="post",
                norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)), position="learned",
                scale_embeddings=False, tie_embeddings=True,
                type_vocab_size=int(hf.get("type_vocab_size", 2)), embed_norm=True,
                fused_qkv=False, use_bias=True, pad_id=int(hf.get("pad_token_id") or 0),
                dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
                attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)))


def _strip(name: str) -> str:
    return name.removeprefix("bert.")


def params_from_hf(tensors: dict[str, np.ndarray], m: dict) -> dict:
    """The Encoder's (head "mlm") params from a BERT state dict; ConversionError naming a
    missing, misshapen or unknown tensor."""
    t = hf_lib.Tensors({_strip(k): v for k, v in tensors.items()})
    d, heads, ff, vocab = m["d_model"], m["num_heads"], m["mlp_dim"], m["vocab_size"]
    hd = d // heads
    get = t.get

    def linear(name, d_in, d_out):
        kernel, bias = t.linear(name, d_in, d_out)
        return {"kernel": kernel, "bias": bias}

    def norm(name):
        return t.norm(name, d)

    def heads_in(name):  # [D, D] Linear -> [D, H, hd]
        w = linear(name, d, d)
        return {"kernel": w["kernel"].reshape(d, heads, hd), "bias": w["bias"].reshape(heads, hd)}

    encoder = {}
    for i in range(m["num_layers"]):
        p = f"encoder.layer.{i}."
        out = linear(p + "attention.output.dense", d, d)
        encoder[f"layers_{i}"] = {
            "self_attention": {**{k: heads_in(p + f"attention.self.{k}")
                                  for k in ("query", "key", "value")},
                               "out": {"kernel": out["kernel"].reshape(heads, hd, d),
                                       "bias": out["bias"]}},
            "attention_sublayer": {"norm": norm(p + "attention.output.LayerNorm")},
            "mlp": {"fc1": linear(p + "intermediate.dense", d, ff),
                    "fc2": linear(p + "output.dense", ff, d)},
            "mlp_sublayer": {"norm": norm(p + "output.LayerNorm")}}
    emb = "embeddings."
    params = {
        "embed": {"tokens": {"embedding": get(emb + "word_embeddings.weight", (vocab, d))},
                  "positions": {"embedding": get(emb + "position_embeddings.weight",
                                                 (m["max_length"], d))},
                  "token_types": {"embedding": get(emb + "token_type_embeddings.weight",
                                                   (m["type_vocab_size"], d))},
                  "norm": norm(emb + "LayerNorm")},
        "encoder": encoder,
        "mlm_transform": linear("cls.predictions.transform.dense", d, d),
        "mlm_norm": norm("cls.predictions.transform.LayerNorm"),
        "mlm_bias": get("cls.predictions.bias", (vocab,))}
    for tied, to in (("cls.predictions.decoder.weight", emb + "word_embeddings.weight"),
                     ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if tied in t and not np.array_equal(t.tensors[tied], t.tensors[to]):
            raise ConversionError(f"checkpoint tensor {tied!r} differs from {to!r}: an "
                                  "untied MLM decoder does not convert")
        t.mark_read(tied)
    skipped = sorted(k for k in t.tensors if k.startswith(_SKIPPED))
    if skipped:
        logging.info("bert: not part of the masked LM, skipped: %s", ", ".join(skipped))
        t.mark_read(*skipped)
    t.check_all_read("BERT", buffers=_BUFFERS)
    return params


def params_to_hf(params: dict, m: dict) -> dict[str, np.ndarray]:
    """The BertForMaskedLM state dict of the Encoder's (head "mlm") params."""
    d = m["d_model"]
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {}

    def put_linear(name, p, kernel=None):
        k = a(p["kernel"] if kernel is None else kernel)
        out[f"{name}.weight"], out[f"{name}.bias"] = k.T.copy(), a(p["bias"]).reshape(-1)

    def put_norm(name, p):
        out[f"{name}.weight"], out[f"{name}.bias"] = a(p["scale"]), a(p["bias"])

    e = params["embed"]
    out["bert.embeddings.word_embeddings.weight"] = a(e["tokens"]["embedding"])
    out["bert.embeddings.position_embeddings.weight"] = a(e["positions"]["embedding"])
    out["bert.embeddings.token_type_embeddings.weight"] = a(e["token_types"]["embedding"])
    put_norm("bert.embeddings.LayerNorm", e["norm"])
    for i in range(m["num_layers"]):
        layer, p = params["encoder"][f"layers_{i}"], f"bert.encoder.layer.{i}."
        att = layer["self_attention"]
        for k in ("query", "key", "value"):
            put_linear(p + f"attention.self.{k}", att[k], a(att[k]["kernel"]).reshape(d, d))
        put_linear(p + "attention.output.dense", att["out"],
                   a(att["out"]["kernel"]).reshape(d, d))
        put_norm(p + "attention.output.LayerNorm", layer["attention_sublayer"]["norm"])
        put_linear(p + "intermediate.dense", layer["mlp"]["fc1"])
        put_linear(p + "output.dense", layer["mlp"]["fc2"])
        put_norm(p + "output.LayerNorm", layer["mlp_sublayer"]["norm"])
    put_linear("cls.predictions.transform.dense", params["mlm_transform"])
    put_norm("cls.predictions.transform.LayerNorm", params["mlm_norm"])
    out["cls.predictions.bias"] = a(params["mlm_bias"])
    return out


def hf_config(m: dict, base: dict | None = None) -> dict:
    """A BertConfig dict for `m` (flaxlab model fields); `base` keeps the source's other
    keys."""
    act = hf_lib.HF_ACTIVATIONS
    if m["activation"] not in act or m["norm_position"] != "post" or not m["embed_norm"] \
            or m["position"] != "learned" or not m["type_vocab_size"]:
        raise ConversionError("this flaxlab encoder is not a BERT: it needs post-norm, "
                              "learned positions, token types and a normalized embedding")
    return {**(base or {}), "model_type": "bert", "architectures": ["BertForMaskedLM"],
            "vocab_size": m["vocab_size"], "max_position_embeddings": m["max_length"],
            "hidden_size": m["d_model"], "num_hidden_layers": m["num_layers"],
            "num_attention_heads": m["num_heads"], "intermediate_size": m["mlp_dim"],
            "hidden_act": act[m["activation"]], "layer_norm_eps": m["norm_epsilon"],
            "type_vocab_size": m["type_vocab_size"], "pad_token_id": m["pad_id"],
            "hidden_dropout_prob": m["dropout_rate"],
            "attention_probs_dropout_prob": m["attention_dropout_rate"],
            "tie_word_embeddings": True}
