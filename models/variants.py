"""Named configurations: a config dataclass built from a variant's fields plus overrides,
with errors that name the unknown variant or key and list what is allowed."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def check_fields(config_cls: type, overrides: Mapping[str, Any], family: str) -> None:
    """Raise ValueError if `overrides` names a field `config_cls` does not have."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {family} config keys {unknown}; allowed: "
                         f"{', '.join(sorted(fields))}")


def from_variant(config_cls: type, variants: Mapping[str, Mapping[str, Any]], variant: str,
                 overrides: Mapping[str, Any], family: str):
    """config_cls(**variants[variant], **overrides), checking both names first."""
    if variant not in variants:
        raise ValueError(f"unknown {family} variant {variant!r}; allowed: "
                         f"{', '.join(variants)}")
    check_fields(config_cls, overrides, family)
    return config_cls(**{**variants[variant], **overrides})
