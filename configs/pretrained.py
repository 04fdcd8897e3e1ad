r"""Evaluate or fine-tune a converted checkpoint on the embedded data, in its own tokens.

    python -m train.convert --from=hf --arch=gpt2 --checkpoint=HF_DIR --workdir=CONVERTED
    python -m train.main --config=configs/pretrained.py:CONVERTED --workdir=RUN \
        [--config.train.num_steps=N --config.optim.learning_rate=...]

The variant is the workdir `train.convert` wrote. The config is the architecture's own
(`configs/gpt.py:gpt2_small`, `bert.py`, `vit.py`, `clip.py`: task, data source,
evaluators) with:
  model         the checkpoint's fields (float32, layers unrolled, as converted; a GPU run
                may override model.dtype / model.scan_layers: init_from converts)
  init_from     workdir=CONVERTED (its step 0); a ViT whose classifier does not fit the
                shapes classes starts its head fresh (init_from.allow_new=("head",))
  data          the checkpoint's tokenizer (CONVERTED/tokenizer, when it has one) for the
                corpus (GPT-2, BERT) or the shapes captions and zero-shot prompts (CLIP);
                shapes images rendered at the checkpoint's resolution and normalized with
                its image processor's mean and std (preprocessor_config.json), captions
                padded to the text tower's context; LM windows capped at its context
  train         num_steps=0: evaluation only (validation and test loss / perplexity, the
                sample; CLIP's zero-shot accuracy); give num_steps to fine-tune.

E.g. zero-shot classification of the held-out shapes with a converted CLIP:
    python -m train.main --config=configs/pretrained.py:/tmp/clip --workdir=/tmp/clip_eval
"""
from __future__ import annotations

import importlib
import json
import os

import ml_collections

TOKENIZER = "tokenizer"  # <converted workdir>/tokenizer (train.convert copies it there)


def _update(section: ml_collections.ConfigDict, values: dict) -> None:
    """section <- values, nested, JSON lists back to the tuples the config holds."""
    for key, value in values.items():
        if key not in section:
            continue  # a field the dataset fills in: the params hold it
        if isinstance(value, dict):
            _update(section[key], value)
        else:
            section[key] = tuple(value) if isinstance(section[key], tuple) else value


def _image_processor(workdir: str) -> dict:
    path = os.path.join(workdir, TOKENIZER, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    workdir = variant
    path = os.path.join(workdir, "config.json")
    if not workdir or not os.path.isfile(path):
        raise ValueError(f"configs/pretrained.py:{workdir} needs a workdir written by "
                         "python -m train.convert --from=hf (configs/pretrained.py:DIR); "
                         f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    source = saved.get("converted_from")
    if not source or "config" not in source:
        raise ValueError(f"{workdir} was not written by train.convert --from=hf; start from "
                         "a trained run with --config.init_from.workdir instead")
    config_file, arch_variant = source["config"].split(":")
    c = importlib.import_module(f"configs.{config_file}").get_config(arch_variant)
    _update(c.model, saved["model"])
    c.init_from.workdir = workdir
    c.train.num_steps = 0
    c.optim.schedule.warmup_steps = 0
    fields, model = source.get("data_fields", {}), saved["model"]
    tokenizer = os.path.join(workdir, TOKENIZER)
    has_tokenizer = os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))
    data = c.data[c.data.source]
    if "tokenizer" in data and has_tokenizer:
        data.tokenizer = tokenizer
    if c.data.source == "stdlib_text":
        data.seq_len = min(data.seq_len, model["max_length"])
    if c.data.source == "shapes":
        data.image_size = fields.get("image_size", data.image_size)
        processor = _image_processor(workdir)
        for key in ("image_mean", "image_std"):
            if key in processor:
                data[key] = tuple(float(x) for x in processor[key])
        if "text" in model and has_tokenizer:
            data.max_caption_len = model["text"]["max_length"]
        if config_file == "vit":
            from train.data.shapes import NUM_CLASSES  # noqa: PLC0415

            if fields.get("num_classes") != NUM_CLASSES:  # ImageNet's 1000, or no head
                c.init_from.allow_new = ("head",)
    return c
