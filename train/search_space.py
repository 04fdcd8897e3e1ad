"""The search space of train/search.py: `key=kind(arguments);...` -> typed dimensions.

Kinds (KINDS): loguniform(low,high) and uniform(low,high) for float fields, int(low,high)
for integer fields (both ends included), categorical(a,b,...) for any field, each value
parsed like a --sweep value. A config file's get_search_space(variant) may return the same
text or {key: "kind(arguments)" or (kind, *arguments)}. Keys are checked as --sweep keys are
(train/sweep_spec.py), each kind against its field's type, and both ends of every range (every
categorical value) must make a valid run config, so a bad space stops before any trial.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from numbers import Real

from train import sweep_spec

KINDS = {"loguniform": float, "uniform": float, "int": int, "categorical": None}
# Optuna keeps categorical values of these types; others (tuples) go in as their repr.
_OPTUNA_TYPES = (type(None), bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` (a key of KINDS) over [low, high] or over `choices`."""
    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def text(self) -> str:
        """The canonical `key=kind(arguments)` (the study's identity, sweep.json)."""
        args = self.choices if self.kind == "categorical" else (self.low, self.high)
        return f"{self.key}={self.kind}({','.join(sweep_spec._format_value(a) for a in args)})"

    def _plain(self) -> bool:
        return all(type(c) in _OPTUNA_TYPES for c in self.choices)

    def distribution(self, optuna):
        d = optuna.distributions
        if self.kind == "categorical":
            return d.CategoricalDistribution(
                self.choices if self._plain() else [repr(c) for c in self.choices])
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high)
        return d.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def value(self, suggested):
        """The override value (typed like the field) of Optuna's suggestion."""
        if self.kind == "categorical":
            return suggested if self._plain() else {repr(c): c for c in self.choices}[suggested]
        return int(suggested) if self.kind == "int" else float(suggested)


_DIMENSION = re.compile(r"\s*([^=\s]+)\s*=\s*(\w+)\s*\((.*)\)\s*$", re.DOTALL)


def _items(spec) -> list[tuple[str, str, list]]:
    """(key, kind, [arguments]) of a space given as text or as a dict."""
    if isinstance(spec, str):
        parts = [p for p in (p.strip() for p in spec.split(";")) if p]
        texts = [(None, p) for p in parts]
    elif isinstance(spec, Mapping):
        texts = []
        for key, value in spec.items():
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], str):
                texts.append((key, (value[0], list(value[1:]))))
            elif isinstance(value, str):
                texts.append((key, f"{key}={value}"))
            else:
                raise ValueError(f"search dimension {key!r}: {value!r} must be "
                                 "'kind(arguments)' or (kind, *arguments)")
    else:
        raise ValueError(f"the search space must be 'key=kind(arguments);...' or a dict "
                         f"{{key: 'kind(arguments)'}}; got {type(spec).__name__}")
    items = []
    for key, text in texts:
        if isinstance(text, tuple):
            items.append((key, *text))
            continue
        match = _DIMENSION.match(text)
        if not match:
            raise ValueError(f"search dimension {text!r} must look like key=kind(arguments), "
                             f"kind one of {', '.join(KINDS)}: "
                             "optim.learning_rate=loguniform(1e-4,1e-2)")
        if key is not None and match.group(1) != key:
            raise ValueError(f"search dimension {key!r}: {text!r} names another key")
        args = [a.strip() for a in sweep_spec._top_level_split(match.group(3))]
        items.append((match.group(1), match.group(2), [] if args == [""] else args))
    return items


def _number(key: str, kind: str, arg, want: type):
    if isinstance(arg, str):
        return sweep_spec._parse_text(key, arg, want)
    if isinstance(arg, Real) and not isinstance(arg, bool) and (
            want is float or float(arg).is_integer()):
        return want(arg)
    raise ValueError(f"search dimension {key}={kind}(...): {arg!r} is not "
                     f"{'an integer' if want is int else 'a number'}")


def _dimension(key: str, kind: str, args: list, base_config) -> Dimension:
    _, _, field_type, _ = sweep_spec._field(base_config, key)  # unknown keys: the sweep's error
    if kind not in KINDS:
        raise ValueError(f"search dimension {key}={kind}(...): unknown kind {kind!r}; "
                         f"allowed: {', '.join(KINDS)}")
    if kind == "categorical":
        if not args:
            raise ValueError(f"search dimension {key}=categorical() needs at least one value")
        choices = tuple(sweep_spec._coerce(key, a, base_config) for a in args)
        if len({repr(c) for c in choices}) < len(choices):
            raise ValueError(f"search dimension {key}: a categorical value is given twice")
        return Dimension(key, kind, choices=choices)
    want = KINDS[kind]
    if field_type is not want:
        suggestion = {int: "int(low,high)", float: "loguniform(low,high) or uniform(low,high)"
                      }.get(field_type, "categorical(a,b,...)")
        raise ValueError(f"search dimension {key}={kind}(...): {key} holds "
                         f"{sweep_spec._TYPE_NAMES.get(field_type, field_type.__name__)}, "
                         f"{kind} draws {sweep_spec._TYPE_NAMES[want]}; use {suggestion}")
    if len(args) != 2:
        raise ValueError(f"search dimension {key}={kind}(...) takes (low,high); got "
                         f"{len(args)} arguments")
    low, high = (_number(key, kind, a, want) for a in args)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"search dimension {key}={kind}({low},{high}): needs finite "
                         "low < high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"search dimension {key}=loguniform({low},{high}): needs 0 < low")
    return Dimension(key, kind, low, high)


def parse_space(spec, base_config) -> list[Dimension]:
    """The dimensions of `spec` (see the module docstring), each end of every range checked
    to give a valid run config; ValueError naming what is wrong and what is allowed."""
    if isinstance(spec, (list, tuple)) and all(isinstance(d, Dimension) for d in spec):
        return list(spec)
    dims, seen = [], set()
    for key, kind, args in _items(spec):
        if key in seen:
            raise ValueError(f"search key {key!r} is given twice")
        seen.add(key)
        dim = _dimension(key, kind, args, base_config)
        corners = dim.choices if kind == "categorical" else (dim.low, dim.high)
        try:
            sweep_spec.plan_runs(base_config, [{key: v} for v in corners])
        except ValueError as e:
            raise ValueError(f"search dimension {dim.text()}: {e}") from None
        dims.append(dim)
    if not dims:
        raise ValueError("the search space is empty: give --space='key=kind(arguments);...' "
                         "or get_search_space(variant) in the config file")
    return dims
