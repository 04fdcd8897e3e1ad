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


def read_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
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


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """tensors[name], checked to have `shape`; ConversionError naming the tensor."""
    if name not in tensors:
        raise ConversionError(f"checkpoint tensor {name!r} is missing")
    value = np.asarray(tensors[name])
    if value.shape != tuple(shape):
        raise ConversionError(f"checkpoint tensor {name!r} has shape {value.shape}, the "
                              f"config implies {tuple(shape)}")
    return value
