"""Model families: how a run config's `model` section becomes a flax module.

A family is a hyper-parameter dataclass (defined with its modules in `models/`), its named
size variants, the fields the dataset provides instead of the config (vocabulary size,
number of classes), and one builder per task it can be trained on. The `model` section of a
run config is `family`, `variant`, then every other field of the dataclass, resolved from
the variant -- so `--config.model.num_layers=6` works for any field, and an unknown key is
an error rather than a silent no-op. A nested config dataclass is a nested section (a ViT's
encoder: `--config.model.encoder.num_layers=6`), without the fields its parent derives.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from models import clip, cnn, patchtst, rnn, transformer, variants, vit
from models import vae as vae_models
from models import unet as unet_models
from models import gan as gan_models

# Fields that are code, not configuration (hooks injected by the compression transforms).
CODE_FIELDS = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class Family:
    config_cls: type                                  # frozen dataclass of hyper-parameters
    make_config: Callable[..., Any]                   # (variant, **overrides) -> config_cls
    variants: tuple[str, ...]                         # the named sizes (documentation, errors)
    builders: dict[str, Callable[[Any], nn.Module]]   # task name -> module from a config
    data_fields: tuple[str, ...] = ()                 # filled from the dataset
    # data_info key -> the data field it fills, over a same-named key (a U-Net's
    # num_classes are the dataset's num_mask_classes, not its image labels)
    data_aliases: dict[str, str] = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "transformer": Family(
        config_cls=transformer.TransformerConfig,
        make_config=transformer.make_config,
        variants=tuple(transformer.VARIANTS),
        builders={"lm": transformer.Decoder,
                  "mlm": lambda cfg: transformer.Encoder(cfg, head="mlm"),
                  "seq2seq": transformer.EncoderDecoder},
        data_fields=("vocab_size",)),
    "vit": Family(
        config_cls=vit.ViTConfig, make_config=vit.make_config, variants=vit.VARIANTS,
        builders={"classify": vit.ViT},
        data_fields=("num_classes", "image_size", "channels")),
    "resnet": Family(
        config_cls=cnn.ResNetConfig, make_config=cnn.make_resnet_config,
        variants=tuple(cnn.RESNET_VARIANTS), builders={"classify": cnn.ResNet},
        data_fields=("num_classes",)),
    "efficientnet": Family(
        config_cls=cnn.EfficientNetConfig, make_config=cnn.make_efficientnet_config,
        variants=tuple(cnn.EFFICIENTNET_VARIANTS), builders={"classify": cnn.EfficientNet},
        data_fields=("num_classes",)),
    "rnn": Family(
        config_cls=rnn.RNNConfig, make_config=rnn.make_config,
        variants=tuple(rnn.VARIANTS),
        builders={"classify": rnn.SequenceClassifier, "seq2seq": rnn.Seq2SeqRNN,
                  "forecast": rnn.LSTMForecaster},
        data_fields=("vocab_size", "num_classes", "channels", "horizon")),
    "patchtst": Family(
        config_cls=patchtst.PatchTSTConfig, make_config=patchtst.make_config,
        variants=tuple(patchtst.VARIANTS), builders={"forecast": patchtst.PatchTST},
        data_fields=("channels", "horizon", "lookback")),
    "clip": Family(
        config_cls=clip.ClipConfig, make_config=clip.make_config,
        variants=tuple(clip.VARIANTS), builders={"contrastive": clip.ClipModel},
        data_fields=("vocab_size", "image_size", "channels")),
    "vae": Family(
        config_cls=vae_models.VAEConfig, make_config=vae_models.make_config,
        variants=tuple(vae_models.VARIANTS), builders={"vae": vae_models.VAE},
        data_fields=("image_size", "channels")),
    "unet": Family(
        config_cls=unet_models.UNetConfig, make_config=unet_models.make_config,
        variants=tuple(unet_models.VARIANTS), builders={"segment": unet_models.UNet},
        data_fields=("num_classes",), data_aliases={"num_mask_classes": "num_classes"}),
    "gan": Family(
        config_cls=gan_models.GANConfig, make_config=gan_models.make_config,
        variants=tuple(gan_models.VARIANTS), builders={"gan": gan_models.GAN},
        data_fields=("image_size", "channels")),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _builder_key(task: str) -> str:
    """The builder a task's model comes from (Task.model_kind; default its name)."""
    from train import tasks  # noqa: PLC0415 -- tasks import models; families only maps
    return tasks.get_task_class(task).builder()


def check_task(family_name: str, task: str) -> None:
    family = get_family(family_name)
    if _builder_key(task) not in family.builders:
        raise ValueError(f"model.family={family_name!r} cannot be trained on task {task!r}; "
                         f"its tasks: {', '.join(family.builders)}")


def _placeholder(annotation: Any):
    """A typed None for Optional fields, so command-line overrides keep their type."""
    for kind in (int, float, str, bool):
        if kind in typing.get_args(annotation):
            return ml_collections.config_dict.placeholder(kind)
    raise TypeError(f"cannot store None for a field annotated {annotation}")


def _to_section(config, skip: tuple[str, ...]) -> ml_collections.ConfigDict:
    """A dataclass instance as a ConfigDict; nested dataclasses become nested sections
    (minus the fields their parent derives, named in the field's metadata["derived"])."""
    hints = typing.get_type_hints(type(config))
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(config):
        if field.name in CODE_FIELDS or field.name in skip:
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            section[field.name] = _to_section(value, field.metadata.get("derived", ()))
        elif isinstance(value, tuple):
            # A tuple, so --config.model.<field>="(8, 16)" overrides it (ml_collections
            # overrides tuples, not lists); config.json stores it as a JSON list.
            section[field.name] = tuple(value)
        else:
            section[field.name] = _placeholder(hints[field.name]) if value is None else value
    return section


def _from_section(config_cls, section: ml_collections.ConfigDict, **extra):
    """Inverse of _to_section: nested sections become their dataclasses again."""
    defaults = config_cls()
    fields = {}
    for field in dataclasses.fields(config_cls):
        if field.name not in section:
            continue
        value = section[field.name]
        if isinstance(value, ml_collections.ConfigDict):
            with variants.nested_errors(field.name):  # "model.encoder.d_model ..." errors
                value = _from_section(type(getattr(defaults, field.name)), value)
        elif isinstance(value, list):
            value = tuple(value)
        fields[field.name] = value
    return config_cls(**fields, **extra)


def model_section(family_name: str, variant: str, **overrides) -> ml_collections.ConfigDict:
    """`model` config section: family, variant and every config field of the dataclass."""
    family = get_family(family_name)
    resolved = family.make_config(variant, **overrides)  # raises on unknown variant / keys
    section = ml_collections.ConfigDict({"family": family_name, "variant": variant})
    section.update(_to_section(resolved, family.data_fields))
    return section


def resolve(section: ml_collections.ConfigDict, **data_info) -> Any:
    """The dataclass a model section describes; data_info supplies the data fields."""
    family = get_family(section.family)
    body = ml_collections.ConfigDict(
        {k: v for k, v in section.items() if k not in ("family", "variant")})
    data_info = {**data_info, **{field: data_info[key] for key, field
                                 in family.data_aliases.items() if key in data_info}}
    fields = {f.name for f in dataclasses.fields(family.config_cls)}
    for name in CODE_FIELDS:  # compression hooks (dot_general, ...) the caller injects
        if name in data_info and name not in fields:
            raise ValueError(f"model.family={section.family!r} has no {name!r} hook, so "
                             "compress.quantize.activations cannot reach its matmuls")
    return _from_section(family.config_cls, body,
                         **{k: v for k, v in data_info.items()
                            if k in family.data_fields or k in CODE_FIELDS})


def build(section: ml_collections.ConfigDict, task: str, **data_info) -> tuple[nn.Module, Any]:
    """(flax module, its resolved config) for training `section` on `task`."""
    check_task(section.family, task)
    cfg = resolve(section, **data_info)
    return get_family(section.family).builders[_builder_key(task)](cfg), cfg
