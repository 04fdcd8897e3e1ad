"""The sweep's grammar: dotted config keys, typed values, run names and the runs' configs.

train/sweep.py's module docstring describes the forms a sweep takes; this module turns one
into typed override dicts (`parse_sweep`), names a run after its overrides (`run_name`),
applies them (`apply_overrides`) and builds and validates every run's config before any run
starts (`plan_runs`). train/search_space.py types a search space's values with the same
rules (`_field`, `_coerce`, `_parse_text`).
"""
from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from numbers import Integral, Real

import ml_collections

from train import config as config_lib

_TYPE_NAMES = {bool: "a bool (true/false)", int: "an integer", float: "a number",
               str: "a string", list: "a list", tuple: "a tuple", dict: "a dict"}


def _field(config: ml_collections.ConfigDict, key: str):
    """(section, leaf name, field type, optional) of the dotted `key`; errors name it."""
    parts = key.split(".")
    parent, section = None, config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if not isinstance(section, ml_collections.ConfigDict):
            raise ValueError(f"sweep key {key!r}: {where} is a value, not a section")
        if part not in section:
            raise ValueError(f"unknown sweep key {key!r}: {where} has no key {part!r}; "
                             f"allowed: {', '.join(sorted(section.keys()))}")
        parent, section = section, section[part]
    if isinstance(section, ml_collections.ConfigDict):
        raise ValueError(f"sweep key {key!r} is a section; sweep one of its keys: "
                         f"{', '.join(sorted(section.keys()))}")
    if section is None:  # a typed placeholder, e.g. model.num_kv_heads (None = default)
        # ConfigDict keeps the placeholder's type only on its FieldReference.
        ref = parent._fields.get(parts[-1])  # pylint: disable=protected-access
        kind = ref.get_type() if hasattr(ref, "get_type") else type(None)
        return parent, parts[-1], kind, True
    return parent, parts[-1], type(section), False


def _coerce(key: str, value, config: ml_collections.ConfigDict):
    """`value` (a command-line string or a Python value) as the type of field `key`."""
    _, _, kind, optional = _field(config, key)
    if optional and (value is None or (isinstance(value, str)
                                       and value.strip().lower() == "none")):
        return None
    if kind is tuple and isinstance(value, list):  # get_sweep() may write lists
        value = tuple(value)
    if isinstance(value, str) and kind is not str:
        if kind in (list, dict):
            raise ValueError(f"sweep key {key!r} holds {_TYPE_NAMES.get(kind, kind)}; "
                             "sweep it from get_sweep() in the config file, not --sweep")
        value = _parse_text(key, value, kind)
    if kind is float and isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if kind is int:  # bool is an int subclass, and NumPy integers are not int
        ok = isinstance(value, Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"sweep value {value!r} for {key} must be "
                         f"{_TYPE_NAMES.get(kind, kind.__name__)}")
    return int(value) if kind is int else value


def _parse_text(key: str, text: str, kind: type):
    t = text.strip()
    try:
        if kind is tuple:
            value = ast.literal_eval(t)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if kind is bool and t.lower() in ("true", "false", "1", "0", "yes", "no"):
            return t.lower() in ("true", "1", "yes")
        if kind is int:
            number = float(t)  # accepts "1e4" and "2.0" as long as they are integers
            if number.is_integer():
                return int(t) if t.lstrip("+-").isdigit() else int(number)
        if kind is float:
            return float(t)
    except (ValueError, SyntaxError):
        pass
    raise ValueError(f"sweep value {text!r} for {key} is not "
                     f"{_TYPE_NAMES.get(kind, kind.__name__)}")


def _top_level_split(text: str) -> list[str]:
    """`text` split at the commas outside parentheses and brackets: "(8,16),(16,32)"."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _axes_from_text(spec: str) -> list[tuple[str, list[str]]]:
    axes = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        values = [v.strip() for v in _top_level_split(values)]
        if not sep or not key.strip() or not all(values):
            raise ValueError(f"sweep axis {part!r} must look like key=value1,value2")
        axes.append((key.strip(), values))
    return axes


def parse_sweep(spec, base_config: ml_collections.ConfigDict) -> list[dict]:
    """The runs of `spec` (see the module docstring) as typed override dicts, in order."""
    if isinstance(spec, str):
        if not spec.strip():  # --sweep="": the base config alone (with --seeds: K runs)
            return [{}]
        spec = _axes_from_text(spec)
    spec = list(spec or [])
    if not spec:
        raise ValueError("the sweep is empty: give --sweep=key=v1,v2;... or get_sweep()")
    if all(isinstance(run, Mapping) for run in spec):
        runs = [dict(run) for run in spec]
    else:
        for axis in spec:
            if (isinstance(axis, Mapping) or not isinstance(axis, (tuple, list))
                    or len(axis) != 2 or isinstance(axis[1], (str, Mapping))
                    or not axis[1]):
                raise ValueError(f"sweep axis {axis!r} must be (key, [value, ...]) with at "
                                 "least one value (or give only run dicts)")
        points = [[dict(v) if isinstance(v, Mapping) else {key: v} for v in values]
                  for key, values in spec]
        runs = []
        for combo in itertools.product(*points):
            run = {}
            for part in combo:
                for key in set(run) & set(part):
                    raise ValueError(f"sweep key {key!r} is set by two axes")
                run.update(part)
            runs.append(run)
    return [{k: _coerce(k, v, base_config) for k, v in run.items()} for run in runs]


def _format_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def run_name(overrides: dict) -> str:
    """A readable, filesystem-safe directory name: 'optim.name=sgd,model.num_layers=2'.

    Characters outside [A-Za-z0-9._+-] (and ',' or '=' inside a value) become '_'; when
    that loses information, or the name would be too long, a hash of the exact overrides
    is appended so that distinct overrides always get distinct names. (Only values of the
    same type are told apart -- True and "True" are not -- which parse_sweep ensures.)
    """
    if not overrides:
        return "base"
    parts, lossy = [], False
    for key, value in overrides.items():
        text = _format_value(value)
        safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))
        safe_text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
        lossy |= safe_key != str(key) or safe_text != text
        parts.append(f"{safe_key}={safe_text}")
    name = ",".join(parts)
    if lossy or len(name) > 200:  # 255 bytes is the usual limit of one path component
        exact = json.dumps([[str(k), _format_value(v)] for k, v in overrides.items()])
        name = f"{name[:180]}~{hashlib.sha1(exact.encode()).hexdigest()[:8]}"
    return name


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict
                    ) -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted-key `overrides` set (typed like parse_sweep)."""
    config = copy.deepcopy(config)  # deep: sections must not be shared between runs
    for key, value in overrides.items():
        section, leaf, _, _ = _field(config, key)
        section[leaf] = _coerce(key, value, config)
    return config


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def plan_runs(base_config, runs: list[dict]) -> list[tuple[str, dict, object]]:
    """[(name, overrides, config)]: every run's config built and validated, else ValueError."""
    plan = {}
    for overrides in runs:
        name = run_name(overrides)
        if name in plan:
            raise ValueError(f"the sweep has the run {name!r} twice")
        try:
            plan[name] = apply_overrides(base_config, overrides)
            config_lib.validate(plan[name])
        except ValueError as e:
            raise ValueError(f"run {name}: {e}") from None
    return [(name, overrides, config) for (name, config), overrides in zip(plan.items(), runs)]
