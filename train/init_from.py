"""`config.init_from`: start any run from the matching parameters of a trained run.

    python -m train.main --config=configs/gpt.py --workdir=runs/gpt_untied \
        --config.init_from.workdir=runs/gpt --config.model.tie_embeddings=False \
        --config.init_from.allow_new="('unembed/*',)"

(the untied model's new output projection `unembed/logits/kernel` starts fresh; every
other parameter comes from runs/gpt's best checkpoint).

Keys (the `init_from` section):

  workdir    "" = off; else the workdir of a run (its checkpoints/ and config.json)
  step       "best" (the checkpoint its config ranked best; its latest when none is
             ranked) | "latest" | an integer step as a string, e.g. "1200"
  include    patterns over this model's parameter paths, e.g.
             "decoder/layers_0/mlp/fc1/kernel"; () = every parameter
  exclude    patterns never loaded (they keep their fresh initialization)
  allow_new  patterns of this model's parameters that may start fresh because the source
             lacks them or holds them at another shape (a new head, another vocabulary)
  inherit    "" = off; else weight inheritance (TinyCLIP): the source is first shrunk to
             this model's depth, heads, MLP width and residual width -- its most important
             layers / units by weight norm (models/compress/inherit.py), layers chosen
             uniform | first | last | importance -- so a smaller student starts from its
             teacher: --config.init_from.workdir=runs/teacher --config.init_from.inherit=uniform

A pattern matches a path when, as a glob (`fnmatch`; `*` crosses "/") or as a regular
expression (`re.fullmatch`), it matches the whole path or a leading part of it that ends
at a "/": "unembed/*", "unembed" and r"decoder/layers_\\d+/self_attention" each cover
every parameter below them. Patterns are anchored at the root and name this model's layout.
Model state (batch_stats, ...) is matched the same way, by its path with or without the
collection name ("batch_stats/BatchNorm_0/mean" or "BatchNorm_0/mean").

Semantics: each selected parameter (matches include, not exclude) is loaded from the
source when the source has it at the same shape (cast to this model's dtype); one that the
source lacks or holds at another shape is an error listing every such path, unless it
matches allow_new -- then it keeps its fresh initialization and the log lists it. Source
parameters this model does not have are listed in the log as ignored. Layer stacks convert
between the unrolled (`layers_0..layers_{n-1}`) and the scanned (`layers`, leading axis n)
layouts of models/transformer.py before matching. A source trained with LoRA gives its
merged parameters. The optimizer state is never loaded: this is an initialization, and a
run that resumes from its own checkpoint does not apply init_from again (the trainer's
`compression.initial_state` owns that decision).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from models import transformer
from models.compress import common, inherit, lora
from models.layers import gates

STEP_NAMES = ("best", "latest")
# Training-only parameters -- automatic inheritance's gates and multipliers
# (models/layers/gates.py), a distillation hint regressor -- start fresh from any source.
TRAINING_ONLY = (gates.PARAM, gates.LAGRANGE, f"{transformer.HINT}/kernel",
                 f"{transformer.HINT}/bias")
PATTERN_KEYS = ("include", "exclude", "allow_new")
_LISTED = 50  # paths listed in one log line or error before "... and N more"
_LAYER_KEY = re.compile(r"^layers_\d+$")  # an unrolled layer of models/transformer.py


def default_config() -> ml_collections.ConfigDict:
    """The `init_from` section; off (workdir "") by default."""
    c = ml_collections.ConfigDict()
    c.workdir = ""        # workdir of a trained run whose matching parameters start this one
    c.step = "best"       # best | latest | an integer step, as a string ("1200")
    c.include = ()        # patterns of parameter paths to load; () = all
    c.exclude = ()        # patterns never loaded
    c.allow_new = ()      # patterns that may start fresh (absent or reshaped in the source)
    # Weight inheritance (TinyCLIP): "" = off; else the source is first shrunk to this
    # model's layers, heads, MLP units and width, the most important by weight norm
    # (models/compress/inherit.py), choosing layers by: uniform (every n/k-th, DistilBERT)
    # | first | last | importance.
    c.inherit = ""
    return c


def enabled(c: ml_collections.ConfigDict) -> bool:
    return bool(c.workdir)


def check_step(step, key: str) -> None:
    """ValueError unless `step` (config key `key`) is "best", "latest" or digits."""
    if not isinstance(step, str) or not (step in STEP_NAMES or step.isdigit()):
        raise ValueError(f"{key}={step!r} must be 'best', 'latest' or an integer step, "
                         "e.g. '1200'")


def validate(c: ml_collections.ConfigDict) -> None:
    """ValueError naming the `init_from.*` key and what is allowed."""
    check_step(c.step, "init_from.step")
    for key in PATTERN_KEYS:
        value = c[key]
        if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) and p
                                                           for p in value):
            raise ValueError(f"init_from.{key}={value!r} must be a tuple of non-empty "
                             "patterns, e.g. ('unembed/*',)")
    if c.inherit and c.inherit not in inherit.LAYER_CHOICES:
        raise ValueError(f"init_from.inherit={c.inherit!r}; allowed: '' (off), "
                         f"{', '.join(inherit.LAYER_CHOICES)}")
    if not c.workdir:
        changed = [k for k in ("step",) + PATTERN_KEYS if c[k] != default_config()[k]]
        if changed:
            raise ValueError(f"init_from.{changed[0]}={c[changed[0]]!r} has no effect "
                             "without init_from.workdir (the trained run to start from)")
        return
    checkpoints = os.path.join(c.workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ValueError(f"init_from.workdir={c.workdir!r}: {checkpoints} is not a "
                         "directory; give the workdir of a trained run")


# ----------------------------------------------------------------------------------------
# Patterns.
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _regex(pattern: str):
    try:
        return re.compile(pattern)
    except re.error:
        return None  # a glob only, e.g. "*embed*"


def matches(patterns, path: str) -> bool:
    """Whether any pattern matches `path` ("a/b/c") or one of its leading parts ("a/b")."""
    parts = path.split("/")
    heads = ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for pattern in patterns:
        regex = _regex(pattern)
        for head in heads:
            if fnmatch.fnmatchcase(head, pattern) or (regex and regex.fullmatch(head)):
                return True
    return False


def _any_matches(patterns, names) -> bool:
    return any(matches(patterns, n) for n in names)


# ----------------------------------------------------------------------------------------
# Matching a source tree onto this model's tree (pure; no files).
# ----------------------------------------------------------------------------------------
def align_layers(source, template):
    """`source` with its layer stacks in `template`'s layout, level by level.

    Where the template has a scanned `layers` entry (leading axis n) and the source the
    unrolled `layers_0..layers_{n-1}`, those are stacked (models.transformer.stack_layers);
    the other way round they are split (unstack_layers). Everything else is unchanged.
    """
    if not isinstance(source, dict) or not isinstance(template, dict):
        return source
    src = dict(source)

    def unrolled(tree):
        return [k for k in tree if _LAYER_KEY.match(k)]
    if "layers" in template and "layers" not in src and unrolled(src):
        src.update(transformer.stack_layers({k: src.pop(k) for k in unrolled(src)}))
    elif unrolled(template) and "layers" in src and not unrolled(src):
        src.update(transformer.unstack_layers({"layers": src.pop("layers")}))
    return {k: align_layers(v, template.get(k)) for k, v in src.items()}


@dataclasses.dataclass
class Report:
    """Paths of one tree's fit, one list per outcome (model-state paths start with their
    collection); `state` is the model state's report next to the params'."""
    loaded: list[str] = dataclasses.field(default_factory=list)
    fresh_allowed: list[str] = dataclasses.field(default_factory=list)
    fresh_unselected: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    misfits: list[str] = dataclasses.field(default_factory=list)  # "path: why" (errors)
    total: int = 0
    state: Report | None = None


def _flat(tree) -> dict[str, Any]:
    return {common.path_str(p): x for p, x in jax.tree.flatten_with_path(tree)[0]}


def _fit_tree(source, template, c, names_of, report: Report):
    """`template` with the selected leaves that fit replaced by the source's (cast)."""
    src = _flat(align_layers(source, template))
    leaves, treedef = jax.tree.flatten_with_path(template)
    out = []
    for key_path, fresh in leaves:
        path = common.path_str(key_path)
        names = names_of(path)
        report.total += 1
        if (c.include and not _any_matches(c.include, names)) or _any_matches(c.exclude,
                                                                              names):
            report.fresh_unselected.append(path)
            out.append(fresh)
            continue
        got = src.get(path)
        if got is not None and tuple(np.shape(got)) == tuple(fresh.shape):
            report.loaded.append(path)
            out.append(jnp.asarray(got, fresh.dtype))
            continue
        why = ("absent from the source" if got is None else
               f"source {tuple(np.shape(got))} vs model {tuple(fresh.shape)}")
        if _any_matches(c.allow_new, names) or path.endswith(TRAINING_ONLY):
            report.fresh_allowed.append(f"{path} ({why})")
        else:
            report.misfits.append(f"{path}: {why}")
        out.append(fresh)
    template_paths = {common.path_str(p) for p, _ in leaves}
    report.ignored += [p for p in sorted(src) if p not in template_paths]
    return jax.tree.unflatten(treedef, out)


def fit(source_params, source_state, params, model_state, c, where: str = "the source"):
    """(params, model_state, report): this model's trees with the source's matching values.

    source_params / source_state: the trained run's trees (nested dicts of arrays; any
    layer layout); params / model_state: this model's freshly initialized trees, whose
    structure, shapes and dtypes the result has. c: the `init_from` section (include,
    exclude, allow_new). Raises ValueError listing every selected parameter that the
    source lacks or holds at another shape and that allow_new does not cover.
    """
    report, state_report = Report(), Report()
    params = _fit_tree(source_params, params, c, lambda p: (p,), report)

    def state_names(path):  # with and without the collection name
        return (path, path.split("/", 1)[-1])
    model_state = _fit_tree(source_state or {}, model_state, c, state_names, state_report)
    misfits = report.misfits + state_report.misfits
    if misfits:
        raise ValueError(
            f"init_from: {len(misfits)} parameters of this model do not fit {where}: "
            + "; ".join(_capped(misfits)) + "; allow them to start fresh with "
            "init_from.allow_new (or leave them out with init_from.exclude)")
    report.state = state_report
    return params, model_state, report


def _capped(items: list[str]) -> list[str]:
    more = [f"... and {len(items) - _LISTED} more"] if len(items) > _LISTED else []
    return items[:_LISTED] + more


# ----------------------------------------------------------------------------------------
# Reading a trained run.
# ----------------------------------------------------------------------------------------
def _saved_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from.workdir={workdir!r} has no config.json (it "
                                "names the metric that ranks the checkpoints); give the "
                                "workdir of a run made by train.main")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def select_step(ckpt, step: str, workdir: str) -> int:
    """The checkpoint step that `step` ("best" | "latest" | "N") names in `ckpt`."""
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"init_from.workdir={workdir!r} holds no checkpoint")
    if step == "latest":
        return int(ckpt.latest_step())
    if step == "best":
        best = ckpt.best_step()
        if best is None:
            logging.info("init_from: %s has no ranked checkpoint; using its latest", workdir)
            return int(ckpt.latest_step())
        return int(best)
    if int(step) not in steps:
        raise ValueError(f"init_from.step={step!r}: {workdir} has no checkpoint at step "
                         f"{int(step)}; its steps: {steps}")
    return int(step)


def load_variables(workdir: str, step: str = "best") -> tuple[Any, Any, int]:
    """(params, model_state, step) of a trained run's checkpoint `step` (see select_step).

    The run's config.json says which metric ranks its checkpoints; a run trained with
    LoRA gives its merged params ({"base", "lora"} -> base + alpha/rank B A).
    """
    from train import checkpoint as ckpt_lib  # noqa: PLC0415 -- orbax only when needed

    saved = _saved_config(workdir)
    ck = saved.get("checkpoint", {})
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                               best_metric=ck.get("best_metric") or None,
                               best_mode=ck.get("best_mode", "min")) as ckpt:
        chosen = select_step(ckpt, step, workdir)
        state = ckpt.restore_raw(chosen)
    params, model_state = state["params"], state.get("model_state") or {}
    if isinstance(params, dict) and set(params) == {"base", "lora"}:
        alpha = float(saved.get("compress", {}).get("lora", {}).get("alpha", 16.0))
        params = lora.merge(params["base"], params["lora"], alpha)
    return params, model_state, chosen


def load_into(c: ml_collections.ConfigDict, params, model_state):
    """(params, model_state) a run starts from: its freshly initialized trees (arrays;
    kept wherever nothing is loaded) with the matching values of checkpoint `c.step` of
    `c.workdir`, same structure, shapes and dtypes; logs what was loaded, kept fresh and
    ignored."""
    src_params, src_state, step = load_variables(c.workdir, c.step)
    where = f"{c.workdir} step {step}"
    if c.inherit:
        src_params = inherit.shrink_to(jax.device_get(src_params), jax.device_get(params),
                                       c.inherit)
        logging.info("init_from: inherited %s into this model's sizes (layers: %s)", where,
                     c.inherit)
    params, model_state, report = fit(src_params, src_state, params, model_state, c, where)
    log_report(report, where)
    return params, model_state


def log_report(report: Report, where: str) -> None:
    logging.info("init_from: loaded %d of %d parameters from %s", len(report.loaded),
                 report.total, where)
    state = report.state
    if state is not None and state.total:
        logging.info("init_from: loaded %d of %d model state arrays from %s",
                     len(state.loaded), state.total, where)
    for r in (report, state) if state is not None else (report,):
        for label, paths in (("kept fresh (allow_new)", r.fresh_allowed),
                             ("kept fresh (not in include, or in exclude)",
                              r.fresh_unselected),
                             ("ignored (not in this model)", r.ignored)):
            if paths:
                logging.info("init_from: %s: %s", label, ", ".join(_capped(paths)))
