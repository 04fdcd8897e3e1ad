"""Optimizers, learning-rate schedules and explicit regularization from `config.optim`.

Everything optax already implements is taken from optax; this module only maps the
config onto optax transformations and writes the closed forms optax lacks.

Path convention (used by every pattern: `weight_decay_exclude`, `layer_lr`, `freeze`):
a parameter's path is its dict keys joined by '/' (see `path_str`), relative to the tree
handed to the optimizer. The trainer passes the *inner* params dict
(`variables['params']`), so a pattern sees e.g. "decoder/layers_0/attention/query/kernel"
and never a leading "params/". Patterns are Python regexes matched with `re.search`
(anywhere in the path), so anchor them ('^encoder/', '(^|/)bias$') when that matters.

Steps are 0-based optimizer steps: the first update uses schedule(0). `total_steps` (T)
is the number of optimizer steps of the whole run.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "nadam")
SCHEDULES = ("constant", "step", "exponential", "cosine", "warmup_cosine",
             "slanted_triangular")


def default_config() -> ml_collections.ConfigDict:
    """Every key of the `optim` section with its default; configs override from here."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"              # one of OPTIMIZERS
    # Two differ from PyTorch's class of the same name (README, "Numerics"):
    #   nadam: optax.nadam, Dozat 2016 with a constant momentum b1. PyTorch's NAdam decays
    #     it, mu_t = b1 (1 - 0.5 * 0.96^(0.004 t)) (momentum_decay=0.004): another update
    #     from the first step on.
    #   rmsprop with momentum: optax's buffer accumulates lr_t * g / (sqrt(v) + eps) (the
    #     LR before the momentum); PyTorch's accumulates g / (sqrt(v) + eps) and the
    #     update is the current lr times it. Equal for a constant LR; under a schedule
    #     optax's buffer keeps each past step's LR.
    c.learning_rate = 1e-3        # peak / base LR; schedules and layer_lr scale it
    c.b1 = 0.9                    # adam, adamw, nadam: first-moment decay
    c.b2 = 0.999                  # adam, adamw, nadam: second-moment decay
    # Denominator epsilon, always *outside* the square root: sqrt(v_hat) + eps for the
    # Adam family (as in the paper) and sqrt(v) + eps for rmsprop (as in PyTorch).
    c.eps = 1e-8
    c.momentum = 0.0              # sgd, rmsprop: heavy-ball momentum; 0 = none (no state)
    c.nesterov = False            # sgd only: PyTorch-style Nesterov (needs momentum > 0)
    c.decay = 0.9                 # rmsprop: squared-gradient EMA decay (PyTorch "alpha")
    # Weight decay, 0 = off (optax.adamw defaults to 1e-4, PyTorch AdamW to 1e-2: set it
    # explicitly). adamw: decoupled, update -= lr * wd * w (Loshchilov & Hutter).
    # Every other optimizer: classic L2-style, wd * w is added to the gradient before the
    # optimizer (so Adam's moments see it, exactly as PyTorch's `weight_decay=`).
    c.weight_decay = 0.0
    # Param-path regexes never decayed (and never L1/L2-penalized): biases (also named ones:
    # logit_bias, mlm_bias, recurrent_bias, ...), norm scales and CLIP's logit_scale,
    # embeddings and ViT's class token -- the exclusions of open_clip (biases, gains,
    # logit_scale), timm (pos_embed, cls_token) and Hugging Face (bias, LayerNorm.weight).
    # Sequences are tuples: --config.optim.weight_decay_exclude="('bias', 'scale')".
    c.weight_decay_exclude = ("(^|/|_)bias$", "(^|/|_)scale$", "embed", "(^|/)cls$")
    c.grad_clip_norm = 0.0        # clip the global gradient norm to this; 0 = off
    # Explicit penalties added to the LOSS by the trainer, see regularization_penalty:
    # l1 * sum|w| + l2 * sum w^2 (no 0.5 factor), over params not in weight_decay_exclude.
    c.l1 = 0.0
    c.l2 = 0.0
    # Discriminative learning rates (ULMFiT): [(regex, multiplier), ...]; a param gets
    # lr * multiplier of the FIRST regex its path matches, 1.0 when none matches.
    c.layer_lr = ()
    # Regexes of params that are never updated (zero updates, no optimizer state).
    c.freeze = ()

    s = c.schedule = ml_collections.ConfigDict()
    s.name = "constant"           # one of SCHEDULES
    s.step_size = 1000            # step: lr * gamma ** floor(t / step_size)
    # step and exponential: decay factor. step: per step_size steps (typ. 0.1);
    # exponential: per optimizer step, lr * gamma ** t (typ. close to 1, e.g. 0.9999).
    s.gamma = 0.1
    s.t_max = 0                   # cosine: period T_max in steps; 0 = total_steps
    s.eta_min = 0.0               # cosine: minimum LR (absolute, not a fraction)
    s.warmup_steps = 0            # warmup_cosine: linear warmup 0 -> lr over these steps
    s.end_lr_fraction = 0.0       # warmup_cosine: final LR = end_lr_fraction * lr at T
    s.cut_frac = 0.1              # slanted_triangular: fraction of T spent increasing
    s.ratio = 32.0                # slanted_triangular: lr_max / lr_min
    return c


def path_str(path: Sequence[Any]) -> str:
    """A jax tree path (from `jax.tree.flatten_with_path`) as "a/b/c".

    Dict keys are used as-is, sequence indices as their number, attribute names
    (dataclass / namedtuple fields) by name.
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _matches_any(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def _unmatched_mask(patterns: Sequence[str]):
    """Callable tree -> bool tree, True for leaves whose path matches NO pattern.

    Used as an optax mask, so it must accept trees containing optax.MaskedNode (inside
    optax.partition); those are empty nodes and tree.map_with_path keeps them as they are.
    """
    patterns = tuple(patterns)

    def mask_fn(tree):
        return jax.tree.map_with_path(
            lambda p, _: not _matches_any(path_str(p), patterns), tree)
    return mask_fn


def regularization_penalty(params, l1: float, l2: float,
                           exclude_patterns: Sequence[str] = ()) -> jax.Array:
    """Explicit penalty to ADD TO THE LOSS: l1 * sum|w| + l2 * sum w^2.

    No 0.5 factor on the L2 term: its gradient is 2 * l2 * w, so `l2 = wd / 2` equals
    (SGD-style) coupled weight decay `wd`. Sums run over every leaf whose path does not
    match `exclude_patterns` (normally `optim.weight_decay_exclude`), in float32.

    Args:
      params: the inner params dict (see module docstring for paths).
      l1, l2: non-negative Python floats (static: they decide which terms are built);
        both 0 returns 0 without touching params.
      exclude_patterns: regexes of leaves not penalized.
    Returns:
      float32 scalar.
    """
    total = jnp.zeros((), jnp.float32)
    if l1 == 0 and l2 == 0:
        return total
    for path, w in jax.tree.leaves_with_path(params):
        if _matches_any(path_str(path), exclude_patterns):
            continue
        w = jnp.asarray(w, jnp.float32)
        if l1:
            total = total + l1 * jnp.sum(jnp.abs(w))
        if l2:
            total = total + l2 * jnp.sum(jnp.square(w))
    return total


def _cosine_closed_form(base_lr: float, eta_min: float, t_max: int) -> optax.Schedule:
    # PyTorch CosineAnnealingLR closed form. Written out (not optax.cosine_decay_schedule)
    # because optax holds eta_min after t_max whereas the closed form is periodic: with
    # t_max < total_steps the LR rises again, as in PyTorch.
    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        return eta_min + (base_lr - eta_min) * (1 + jnp.cos(jnp.pi * t / t_max)) / 2
    return schedule


def _slanted_triangular(base_lr: float, total_steps: int, cut_frac: float,
                        ratio: float) -> optax.Schedule:
    # ULMFiT (Howard & Ruder 2018), eq. 3, with one guard: p is clamped at 0, i.e. the LR
    # never goes below the paper's minimum lr_max / ratio. Without it, when T * cut_frac is
    # not an integer the decay phase (cut * (1/cut_frac - 1) < T - cut steps) ends before
    # T and the formula goes on falling, even negative (e.g. T=55, cut_frac=0.1, ratio=32
    # gives lr_T < 0). When T * cut_frac is an integer, p reaches exactly 0 at t = T, so
    # the guard changes nothing for t <= T, and it holds lr_max / ratio after T.
    cut = math.floor(total_steps * cut_frac)
    decay_len = cut * (1 / cut_frac - 1)   # float, exactly as in the paper

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        p = jnp.where(t < cut, t / cut, 1 - (t - cut) / decay_len)
        return base_lr * (1 + jnp.maximum(p, 0) * (ratio - 1)) / ratio
    return schedule


def make_schedule(schedule_cfg: ml_collections.ConfigDict, base_lr: float,
                  total_steps: int) -> optax.Schedule:
    """The LR schedule: 0-based step count (int or int array) -> float32 LR.

    constant:           lr
    step:               lr * gamma ** floor(t / step_size)                  (StepLR)
    exponential:        lr * gamma ** t                                     (ExponentialLR)
    cosine:             eta_min + (lr - eta_min) * (1 + cos(pi t / T_max)) / 2
    warmup_cosine:      lr * t / W for t < W, then cosine from lr to end_lr_fraction * lr
                        at t = T (held after T)
    slanted_triangular: ULMFiT eq. 3 with cut_frac, ratio (peak lr at t = floor(T cut_frac)),
                        never below lr / ratio
    """
    s = schedule_cfg
    if s.name == "constant":
        return optax.constant_schedule(base_lr)
    if s.name == "step":
        return optax.exponential_decay(base_lr, transition_steps=s.step_size,
                                       decay_rate=s.gamma, staircase=True)
    if s.name == "exponential":
        return optax.exponential_decay(base_lr, transition_steps=1, decay_rate=s.gamma)
    if s.name == "cosine":
        return _cosine_closed_form(base_lr, s.eta_min, s.t_max or total_steps)
    if s.name == "warmup_cosine":
        end_lr = s.end_lr_fraction * base_lr
        if s.warmup_steps == total_steps:
            # optax's cosine part needs >= 1 decay step; with none left it is pure warmup.
            return optax.linear_schedule(0.0, base_lr, transition_steps=total_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=base_lr, warmup_steps=s.warmup_steps,
            decay_steps=total_steps, end_value=end_lr)
    if s.name == "slanted_triangular":
        return _slanted_triangular(base_lr, total_steps, s.cut_frac, s.ratio)
    raise ValueError(f"optim.schedule.name must be one of {SCHEDULES}, got {s.name!r}")


def current_learning_rate(optim_cfg: ml_collections.ConfigDict, total_steps: int,
                          step: int) -> float:
    """The base LR (layer_lr multiplier 1) applied by the update at 0-based `step`.

    For logging: evaluates the same schedule make_optimizer uses (one tiny host op).
    """
    schedule = make_schedule(optim_cfg.schedule, optim_cfg.learning_rate, total_steps)
    return float(schedule(step))


def _base_optimizer(cfg: ml_collections.ConfigDict,
                    lr: optax.Schedule) -> optax.GradientTransformation:
    momentum = cfg.momentum or None   # None: optax allocates no momentum buffer
    if cfg.name == "sgd":
        # optax's trace with nesterov=True is PyTorch's: b = mu b + g; u = -lr (g + mu b).
        return optax.sgd(lr, momentum=momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "nadam":
        # Dozat 2016 with constant momentum: no PyTorch-style momentum decay (see above).
        return optax.nadam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=_unmatched_mask(cfg.weight_decay_exclude))
    if cfg.name == "rmsprop":
        # PyTorch's RMSprop: v starts at 0, eps outside the sqrt, no bias correction.
        # Momentum: optax scales by the LR *before* the momentum trace (the buffer holds
        # lr * g / (sqrt(v) + eps)), PyTorch after it; identical for a constant LR only.
        return optax.rmsprop(lr, decay=cfg.decay, eps=cfg.eps, initial_scale=0.0,
                             eps_in_sqrt=False, momentum=momentum)
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")


def _scale_by_layer_lr(layer_lr: Sequence[tuple[str, float]]
                       ) -> optax.GradientTransformation:
    """Multiplies each leaf's final update by the multiplier of its first matching regex.

    Every optimizer here ends in (something linear in) the LR, so scaling the final update
    by m is the same as running that leaf with LR lr * m, and keeps one optimizer state.
    """
    rules = tuple((pattern, float(mult)) for pattern, mult in layer_lr)

    def multiplier(path: str) -> float:
        return next((m for p, m in rules if re.search(p, path)), 1.0)

    def scale(path, update):
        m = multiplier(path_str(path))
        return update if m == 1.0 else update * m

    def update_fn(updates, params=None):
        del params
        return jax.tree.map_with_path(scale, updates)
    return optax.stateless(update_fn)


def make_optimizer(optim_cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
    """The full optimizer for the inner params dict: validates `optim_cfg` first.

    Per trainable leaf, in order: global-norm clipping (over trainable leaves only),
    L2-style weight decay (non-adamw), the optimizer with the LR schedule (adamw adds its
    decoupled decay here), the layer_lr multiplier. Frozen leaves get zero updates via
    optax.partition (the current name of optax.multi_transform) with no optimizer state.
    """
    validate(optim_cfg, total_steps)
    cfg = optim_cfg
    lr = make_schedule(cfg.schedule, cfg.learning_rate, total_steps)
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.weight_decay > 0 and cfg.name != "adamw":
        # Before the optimizer (and so before the LR scaling): the decay term goes through
        # momentum / Adam moments like a gradient, i.e. an L2 penalty of wd/2 * w^2.
        parts.append(optax.add_decayed_weights(
            cfg.weight_decay, mask=_unmatched_mask(cfg.weight_decay_exclude)))
    parts.append(_base_optimizer(cfg, lr))
    if cfg.layer_lr:
        parts.append(_scale_by_layer_lr(cfg.layer_lr))
    tx = optax.chain(*parts)
    if not cfg.freeze:
        return tx
    freeze = tuple(cfg.freeze)

    def labels(tree):
        return jax.tree.map_with_path(
            lambda p, _: "frozen" if _matches_any(path_str(p), freeze) else "train", tree)
    return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _check_regexes(key: str, patterns) -> None:
    if isinstance(patterns, str):
        raise ValueError(f"{key} must be a list of regexes, got the string {patterns!r}")
    for p in patterns:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            raise ValueError(f"{key}: invalid regex {p!r}: {e}") from None


def schedule_steps(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> int:
    """The total steps the schedule is built for: num_steps, or for an evaluate-only run
    (0 steps, the optimizer never steps) the shortest length the schedule allows."""
    return num_steps if num_steps > 0 else optim_cfg.schedule.warmup_steps + 1


def validate(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> None:
    """Raises ValueError naming the offending key ("optim.<key>") and what is allowed.

    Only the keys the chosen optimizer / schedule uses are range-checked (a sweep may leave
    e.g. schedule.gamma at any value while using cosine); names and regexes always are.
    Unknown keys are the config validator's job (it compares against default_config()).
    """
    c, s = optim_cfg, optim_cfg.schedule

    def need(ok: bool, key: str, allowed: str, value) -> None:
        if not ok:
            raise ValueError(f"optim.{key} must be {allowed}, got {value!r}")

    def is_int(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not (is_int(total_steps) and total_steps >= 1):
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    need(c.name in OPTIMIZERS, "name", f"one of {OPTIMIZERS}", c.name)
    need(s.name in SCHEDULES, "schedule.name", f"one of {SCHEDULES}", s.name)
    need(c.learning_rate > 0, "learning_rate", "> 0", c.learning_rate)
    for key in ("weight_decay", "l1", "l2", "grad_clip_norm"):
        need(c[key] >= 0, key, ">= 0 (0 = off)", c[key])
    if c.name != "sgd":
        need(c.eps > 0, "eps", "> 0 (it guards a division)", c.eps)
    if c.name in ("adam", "adamw", "nadam"):
        need(0 <= c.b1 < 1, "b1", "in [0, 1)", c.b1)
        need(0 <= c.b2 < 1, "b2", "in [0, 1)", c.b2)
    if c.name in ("sgd", "rmsprop"):
        need(0 <= c.momentum < 1, "momentum", "in [0, 1)", c.momentum)
    if c.name == "rmsprop":
        need(0 <= c.decay < 1, "decay", "in [0, 1)", c.decay)
    if c.nesterov:
        need(c.name == "sgd", "nesterov",
             "False unless name='sgd' (use name='nadam' for Nesterov Adam)", c.nesterov)
        need(c.momentum > 0, "momentum", "> 0 when nesterov=True", c.momentum)

    _check_regexes("optim.weight_decay_exclude", c.weight_decay_exclude)
    _check_regexes("optim.freeze", c.freeze)
    for rule in c.layer_lr:
        ok = (isinstance(rule, (tuple, list)) and len(rule) == 2
              and isinstance(rule[0], str) and isinstance(rule[1], numbers.Real)
              and rule[1] >= 0)
        need(ok, "layer_lr", "a list of (regex, multiplier >= 0) pairs; bad entry", rule)
    _check_regexes("optim.layer_lr", [rule[0] for rule in c.layer_lr])

    if s.name == "step":
        need(is_int(s.step_size) and s.step_size >= 1, "schedule.step_size", "an int >= 1",
             s.step_size)
    if s.name in ("step", "exponential"):
        need(s.gamma > 0, "schedule.gamma", "> 0", s.gamma)
    if s.name == "cosine":
        need(is_int(s.t_max) and s.t_max >= 0, "schedule.t_max",
             "an int >= 0 (0 = total_steps)", s.t_max)
        need(s.eta_min >= 0, "schedule.eta_min", ">= 0", s.eta_min)
    if s.name == "warmup_cosine":
        need(is_int(s.warmup_steps) and 0 <= s.warmup_steps <= total_steps,
             "schedule.warmup_steps", f"an int in [0, total_steps={total_steps}]",
             s.warmup_steps)
        need(0 <= s.end_lr_fraction <= 1, "schedule.end_lr_fraction", "in [0, 1]",
             s.end_lr_fraction)
    if s.name == "slanted_triangular":
        need(0 < s.cut_frac < 1, "schedule.cut_frac", "in (0, 1)", s.cut_frac)
        need(s.ratio >= 1, "schedule.ratio", ">= 1", s.ratio)
        need(math.floor(total_steps * s.cut_frac) >= 1, "schedule.cut_frac",
             f"large enough that floor(total_steps * cut_frac) >= 1 with total_steps="
             f"{total_steps}", s.cut_frac)
