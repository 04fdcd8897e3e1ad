"""Named configurations: a config dataclass built from a variant's fields plus overrides,
with errors that name the unknown variant or key and list what is allowed.

Configs nest: a field whose default is itself a config dataclass (ViT's `encoder`, CLIP's
towers) takes either a whole instance or a mapping of changes to the nested config so far
(`make_config("S/16", encoder=dict(dropout_rate=0.1))`). The nested field's
`metadata["derived"]` names the nested fields the parent sets itself; those cannot be
changed here (and train/families.py leaves them out of the config section). Errors raised
inside a nested config name its full key (`model.encoder.d_model`, not `model.d_model`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

DTYPES = ("float32", "bfloat16", "float16")  # compute / parameter dtypes by name


def check_one_of(prefix: str, key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ValueError("<prefix>.<key>=<value!r> is not allowed; allowed: a, b, c") unless
    `value` is one of `allowed` (prefix: "model" for a run config's model section)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{prefix}.{key}={value!r} is not allowed; allowed: "
                         f"{', '.join(map(str, allowed))}")


def check_fields(config_cls: type, overrides: Mapping[str, Any], family: str,
                 derived: Iterable[str] = ()) -> None:
    """Raise ValueError if `overrides` names a field `config_cls` does not have (or one of
    the `derived` fields its parent sets)."""
    fields = {f.name for f in dataclasses.fields(config_cls)} - set(derived)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {family} config keys {unknown}; allowed: "
                         f"{', '.join(sorted(fields))}")


_MODEL_KEY = re.compile(r"\bmodel\.")


@contextlib.contextmanager
def nested_errors(name: str):
    """Re-raise a nested config's ValueError with its keys under `name`: "model.d_model"
    from the config in field `encoder` becomes "model.encoder.d_model"."""
    try:
        yield
    except ValueError as e:
        raise ValueError(_MODEL_KEY.sub(f"model.{name}.", str(e))) from None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _update_nested(field: dataclasses.Field, current: Any, changes: Any, family: str) -> Any:
    """The value for `field` given `changes`: a mapping updates the nested config `current`;
    anything else (a whole config instance, a plain value) replaces it."""
    if not (isinstance(changes, Mapping) and dataclasses.is_dataclass(current)):
        return changes
    derived = sorted(set(changes) & set(field.metadata.get("derived", ())))
    if derived:
        raise ValueError(f"model.{field.name} keys {derived} are set by the {family} config "
                         "itself and cannot be overridden")
    with nested_errors(field.name):
        return replace(current, changes, f"{family}.{field.name}",
                       field.metadata.get("derived", ()))


def replace(config: Any, changes: Mapping[str, Any], family: str,
            derived: Iterable[str] = ()) -> Any:
    """dataclasses.replace(config, **changes), where a mapping for a nested-config field
    updates that nested config (recursively) instead of replacing it; `derived` fields (set
    by the parent config) cannot be changed."""
    check_fields(type(config), changes, family, derived)
    fields = {f.name: _update_nested(f, getattr(config, f.name), changes[f.name], family)
              for f in dataclasses.fields(config) if f.name in changes}
    return dataclasses.replace(config, **fields)


def build(config_cls: type, layers: Sequence[Mapping[str, Any]], family: str) -> Any:
    """config_cls(**fields) from successive layers of fields (a variant's, then overrides):
    a later layer's mapping for a nested-config field updates the nested config so far."""
    by_name = {f.name: f for f in dataclasses.fields(config_cls)}
    fields: dict[str, Any] = {}
    for layer in layers:
        check_fields(config_cls, layer, family)
        for key, value in layer.items():
            current = fields[key] if key in fields else _field_default(by_name[key])
            fields[key] = _update_nested(by_name[key], current, value, family)
    return config_cls(**fields)


def from_variant(config_cls: type, variants: Mapping[str, Mapping[str, Any]], variant: str,
                 overrides: Mapping[str, Any], family: str):
    """config_cls(**variants[variant], **overrides) (nested mappings merged, see `build`),
    checking both names first."""
    if variant not in variants:
        raise ValueError(f"unknown {family} variant {variant!r}; allowed: "
                         f"{', '.join(variants)}")
    return build(config_cls, [variants[variant], overrides], family)
