"""Hugging Face checkpoint files: a directory with config.json and model.safetensors
(or, only with allow_pickle, pytorch_model.bin), read into {name: numpy array}.

safetensors reads tensors without executing anything; a `.bin` is a pickle, which can run
code when loaded, so it is refused unless the caller allows it (then torch.load with
weights_only=True, which unpickles tensors and plain containers only).
"""
from __future__ import annotations

import json
import os

import numpy as np

from train.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint that does not fit: unknown architecture, missing tensor, wrong shape."""


def read_checkpoint(path: str, allow_pickle: bool = False
                    ) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: array}) of a checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{path}: no config.json (a Hugging Face checkpoint directory "
                              "holds config.json and model.safetensors)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    safe = os.path.join(path, "model.safetensors")
    pickled = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(safe):
        from safetensors.numpy import load_file  # noqa: PLC0415 -- the interop extra

        return config, dict(load_file(safe))
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise ConversionError(f"{pickled} is a pickle, which can run code when loaded; "
                                  "convert it to safetensors, or pass --allow_pickle if you "
                                  "trust its source")
        import torch  # noqa: PLC0415

        state = torch.load(pickled, map_location="cpu", weights_only=True)
        return config, {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                        for k, v in state.items()}
    raise ConversionError(f"{path}: neither model.safetensors nor pytorch_model.bin")


def write_checkpoint(path: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """config.json + model.safetensors that `transformers` loads (from_pretrained)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    # np.require keeps 0-d tensors (CLIP's logit_scale) 0-d; ascontiguousarray makes 1-d.
    save_file({k: np.require(v, requirements="C") for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# Hugging Face `hidden_act` / `activation_function` names -> flaxlab's (models/layers/mlp.py),
# and the name each flaxlab activation is written back as.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "quick_gelu": "quick_gelu"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu",
                  "quick_gelu": "quick_gelu"}


def activation(config: dict, key: str, default: str, where: str = "config.json") -> str:
    """flaxlab's name of config[key]; ConversionError naming the key and what converts."""
    name = config.get(key, default)
    if name not in ACTIVATIONS:
        raise ConversionError(f"{where} {key}={name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Tensors:
    """A state dict being read: every tensor taken is checked (shape) and remembered, so
    `check_all_read` can refuse the ones no mapping read (a model this is not)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.read = tensors, set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self.read.add(name)
        return take(self.tensors, name, shape)

    def linear(self, name: str, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        """(kernel [d_in, d_out], bias [d_out]) of an nn.Linear, which keeps [out, in]."""
        return (self.get(f"{name}.weight", (d_out, d_in)).T,
                self.get(f"{name}.bias", (d_out,)))

    def norm(self, name: str, d: int) -> dict[str, np.ndarray]:
        """A LayerNorm's weight / bias as flax's scale / bias."""
        return {"scale": self.get(f"{name}.weight", (d,)),
                "bias": self.get(f"{name}.bias", (d,))}

    def mark_read(self, *names: str) -> None:
        """Names a mapping accounts for without loading them (tied copies, skipped heads)."""
        self.read.update(names)

    def check_all_read(self, model: str, buffers: tuple[str, ...] = ()) -> None:
        """ConversionError naming the first tensor nothing read (`buffers`: name endings of
        weightless buffers, e.g. position ids)."""
        unknown = sorted(k for k in self.tensors
                         if k not in self.read and not k.endswith(buffers))
        if unknown:
            raise ConversionError(f"checkpoint tensor {unknown[0]!r} is not part of {model} "
                                  f"({len(unknown)} unknown: {', '.join(unknown[:5])})")


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """tensors[name], checked to have `shape`; ConversionError naming the tensor."""
    if name not in tensors:
        raise ConversionError(f"checkpoint tensor {name!r} is missing")
    value = np.asarray(tensors[name])
    if value.shape != tuple(shape):
        raise ConversionError(f"checkpoint tensor {name!r} has shape {value.shape}, the "
                              f"config implies {tuple(shape)}")
    return value
