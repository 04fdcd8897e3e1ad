"""Model families: how a run config's `model` section becomes a flax module.

A family is a hyper-parameter dataclass (defined with its modules in `models/`), its named
size variants, the fields the dataset provides instead of the config (vocabulary size,
number of classes), and one builder per task it can be trained on. The `model` section of a
run config is `family`, `variant`, then every other field of the dataclass, resolved from
the variant -- so `--config.model.num_layers=6` works for any field, and an unknown key is
an error rather than a silent no-op.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from models import transformer

# Fields that are code, not configuration (hooks injected by the compression transforms).
CODE_FIELDS = ("dot_general",)


@dataclasses.dataclass(frozen=True)
class Family:
    config_cls: type                                  # frozen dataclass of hyper-parameters
    make_config: Callable[..., Any]                   # (variant, **overrides) -> config_cls
    variants: tuple[str, ...]                         # the named sizes (documentation, errors)
    builders: dict[str, Callable[[Any], nn.Module]]   # task name -> module from a config
    data_fields: tuple[str, ...] = ()                 # filled from the dataset


FAMILIES: dict[str, Family] = {
    "transformer": Family(
        config_cls=transformer.TransformerConfig,
        make_config=transformer.make_config,
        variants=tuple(transformer.VARIANTS),
        builders={"lm": transformer.Decoder,
                  "mlm": lambda cfg: transformer.Encoder(cfg, head="mlm"),
                  "seq2seq": transformer.EncoderDecoder},
        data_fields=("vocab_size",)),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def check_task(family_name: str, task: str) -> None:
    family = get_family(family_name)
    if task not in family.builders:
        raise ValueError(f"model.family={family_name!r} cannot be trained on task {task!r}; "
                         f"its tasks: {', '.join(family.builders)}")


def _placeholder(annotation: Any):
    """A typed None for Optional fields, so command-line overrides keep their type."""
    for kind in (int, float, str, bool):
        if kind in typing.get_args(annotation):
            return ml_collections.config_dict.placeholder(kind)
    raise TypeError(f"cannot store None for a field annotated {annotation}")


def model_section(family_name: str, variant: str, **overrides) -> ml_collections.ConfigDict:
    """`model` config section: family, variant and every config field of the dataclass."""
    family = get_family(family_name)
    resolved = family.make_config(variant, **overrides)  # raises on unknown variant / keys
    hints = typing.get_type_hints(family.config_cls)
    section = ml_collections.ConfigDict()
    section.family, section.variant = family_name, variant
    for field in dataclasses.fields(family.config_cls):
        if field.name in CODE_FIELDS or field.name in family.data_fields:
            continue
        value = getattr(resolved, field.name)
        section[field.name] = _placeholder(hints[field.name]) if value is None else value
    return section


def resolve(section: ml_collections.ConfigDict, **data_info) -> Any:
    """The dataclass a model section describes; data_info supplies the data fields."""
    family = get_family(section.family)
    fields = {k: v for k, v in section.items() if k not in ("family", "variant")}
    fields.update({k: v for k, v in data_info.items() if k in family.data_fields})
    return family.config_cls(**fields)


def build(section: ml_collections.ConfigDict, task: str, **data_info) -> tuple[nn.Module, Any]:
    """(flax module, its resolved config) for training `section` on `task`."""
    check_task(section.family, task)
    cfg = resolve(section, **data_info)
    return get_family(section.family).builders[task](cfg), cfg
