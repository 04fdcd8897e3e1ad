"""Weights in and out of the PyTorch / Hugging Face ecosystem (the `interop` extra).

One module per architecture maps a Hugging Face checkpoint (config.json + tensors) onto a
flaxlab model config and parameter tree and back; `hf.py` reads and writes the files
(safetensors; pickled `pytorch_model.bin` only when explicitly allowed).
ARCHITECTURES is the registry; each module gives FAMILY, TASK and CONFIG (the flaxlab
model family, task and config file:variant a converted checkpoint's workdir records),
model_overrides, params_from_hf, params_to_hf, hf_config and data_fields (the
dataset-filled model fields, read off the params).
"""
from train.interop import bert, clip, gpt2, vit

ARCHITECTURES = {"gpt2": gpt2, "bert": bert, "vit": vit, "clip": clip}
