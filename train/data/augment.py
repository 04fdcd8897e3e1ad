"""Training-time image augmentation as configuration, run on device inside the train step.

Configured per image source, ``config.data.<source>.augment`` (shapes, tfds_images);
every strength 0 (the default) is off, and with everything off the trainer's step is the
one it always was, so existing runs are unchanged bit for bit. Per example, in order:

  random resized crop  crop_area_min < 1: a crop of area fraction U[crop_area_min, 1] and
                       aspect ratio log-uniform in [1 / crop_aspect, crop_aspect] (sides
                       clipped to the image), resized to the full image (Szegedy et al.
                       2015, as torchvision's RandomResizedCrop; a crop only zooms in)
  rotation             rotate > 0: U[-rotate, rotate] degrees about the center
  horizontal flip      with probability flip
  RandAugment          randaugment_ops = N > 0: N ops drawn uniformly (with replacement)
                       from RANDAUGMENT_OPS, each at magnitude randaugment_magnitude = M
                       in [0, 1] of its range with a random sign (Cubuk et al. 2020)
  color jitter         factors U[1 - s, 1 + s] of brightness, contrast, saturation (in
                       that order; torchvision's ColorJitter draws an order) and a hue
                       turn U[-hue, hue] (hue changes the color, which is part of the
                       shapes' class: leave it 0 there)

The geometric ops of one example (crop, rotation, flip and RandAugment's rotate / shear /
translate) compose into ONE affine map sampled once (augment_ops.warp: bilinear for the
image, nearest for a segmentation mask, points outside read ``fill`` / class 0), so the
image is interpolated once and the mask stays aligned with it; the color ops follow.
Then, across the batch (classification only), example i is mixed with example B-1-i
(the batch order is already random; timm's "elem" mode):

  mixup   mixup = alpha > 0: lam ~ Beta(alpha, alpha), x = lam x_i + (1 - lam) x_p
          (Zhang et al. 2018)
  cutmix  cutmix = alpha > 0: a box of area ~(1 - lam) pasted from x_p, lam recomputed
          from the box's pixels (Yun et al. 2019); with both on, each example uses one of
          them with probability 1/2

and the batch gains "label_probs" float32[B, K] = lam one_hot(y_i) + (1 - lam)
one_hot(y_p), the target of the classification loss (train/tasks/classify.py); the
accuracy metrics stay on the hard "label".

Keys. Example i of step s uses fold_in(fold_in(fold_in(train_key, s), STREAM), i) --
the step's dropout key (train/tasks/base.py) folded into its own stream, then the
example's position in the global batch -- each op reading its own slots of that key's
uniform draws, so the augmented batch is a pure function of (seed, step, example): a
resumed run is bit-exact and a multi-device run equals one device. Evaluation never
augments.

What a task accepts is its class's ``augment_keys`` (train/tasks/base.py): "image"
(every per-example op), "mask" (the geometric ops, nearest), "label" (mixup / cutmix).
Images normalized by the source ((x - mean) / std, data.shapes.image_mean / image_std)
are augmented in [0, 1] and normalized again.
"""
from __future__ import annotations

import dataclasses
import math
from numbers import Real

import jax
import jax.numpy as jnp
import ml_collections

from train.data import augment_ops as ops
from train.data import checks

# fold_in constant of the augmentation stream (distinct from the dropout key's own use).
STREAM = 0x41554731
# An example's uniform draws: one vector U[0, 1) of _FIXED + 2 N values per example (one
# random-bits call: each call is a threefry block the compiler must build), each op
# reading its own fixed slots (a new op appends slots, never moves the others);
# RandAugment's N (op, sign) pairs come last. Mixing's Beta draws use fold_in(key, _MIX).
_CROP, _ROTATE, _FLIP, _COLOR, _MIX_MODE, _BOX, _FIXED = 0, 4, 5, 6, 10, 11, 13
_MIX = 1

# RandAugment's ops: every one has a magnitude and is the identity at magnitude 0 (so the
# magnitude-free autocontrast, equalize and invert, and posterize, are left out). Ranges
# at M = 1 are AutoAugment's maxima (Cubuk et al. 2019): rotate 30 degrees, shear 0.3,
# translate 0.45 of the side, enhance factors 1 +- 0.9, solarize threshold 1 - M.
RANDAUGMENT_OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
                   "brightness", "contrast", "saturation", "sharpness", "solarize")
_N_GEOMETRIC = 6  # RANDAUGMENT_OPS[:6] are geometric (identity counts as one)


def default_config() -> ml_collections.ConfigDict:
    """``config.data.<source>.augment``: every op off (0 / 1 for the crop)."""
    c = ml_collections.ConfigDict()
    c.crop_area_min = 1.0          # random resized crop: area in [this, 1]; 1 = off
    c.crop_aspect = 4.0 / 3.0      # crop aspect ratio in [1 / this, this] (>= 1)
    c.rotate = 0.0                 # max degrees; 0 = off
    c.flip = 0.0                   # horizontal flip probability
    c.brightness = 0.0             # color jitter: factor in [1 - s, 1 + s]; 0 = off
    c.contrast = 0.0
    c.saturation = 0.0
    c.hue = 0.0                    # hue turn in [-h, h] of the color circle (<= 0.5)
    c.randaugment_ops = 0          # RandAugment's N; 0 = off
    c.randaugment_magnitude = 0.5  # RandAugment's M as a fraction of each op's range
    c.mixup = 0.0                  # Beta(alpha, alpha) of mixup; 0 = off (classify only)
    c.cutmix = 0.0                 # Beta(alpha, alpha) of CutMix; 0 = off (classify only)
    c.fill = 0.5                   # image value where a geometric op reads outside
    return c


def _check_number(c, prefix: str, key: str, low: float, high: float | None,
                  low_open: bool = False) -> None:
    v = c[key]
    ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and (
        v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        allowed = f"expected a number in {lo}, {high}]" if high is not None else \
            f"expected a number {'>' if low_open else '>='} {low}"
        checks.fail(f"{prefix}.{key}", v, allowed)


def validate(c: ml_collections.ConfigDict, prefix: str) -> None:
    """One-line ValueError naming the full key (``prefix`` = "data.<source>.augment")."""
    _check_number(c, prefix, "crop_area_min", 0.0, 1.0, low_open=True)
    _check_number(c, prefix, "crop_aspect", 1.0, None)
    _check_number(c, prefix, "rotate", 0.0, 180.0)
    _check_number(c, prefix, "flip", 0.0, 1.0)
    for key in ("brightness", "contrast", "saturation", "randaugment_magnitude", "fill"):
        _check_number(c, prefix, key, 0.0, 1.0)
    _check_number(c, prefix, "hue", 0.0, 0.5)
    for key in ("mixup", "cutmix"):
        _check_number(c, prefix, key, 0.0, None)
    checks.check_int(c, prefix, "randaugment_ops", 0, 10)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The ``augment`` section as static numbers (see default_config for each field)."""

    crop_area_min: float = 1.0
    crop_aspect: float = 4.0 / 3.0
    rotate: float = 0.0
    flip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    fill: float = 0.5

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> Policy:
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})

    @property
    def geometric(self) -> bool:
        return (self.crop_area_min < 1.0 or self.rotate > 0 or self.flip > 0
                or self.randaugment_ops > 0)

    @property
    def color(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue
                    or self.randaugment_ops)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.color or self.mixes


# ---- One example ------------------------------------------------------------------------
def draws(policy: Policy, key) -> jax.Array:
    """float32[_FIXED + 2 N]: the uniform draws of the example with ``key``."""
    return jax.random.uniform(key, (_FIXED + 2 * policy.randaugment_ops,))


def _between(u, low: float, high: float):
    return low + u * (high - low)


def _crop(policy: Policy, u, height: int, width: int) -> jax.Array:
    area = _between(u[0], policy.crop_area_min, 1.0)
    log_r = math.log(policy.crop_aspect)
    ratio = jnp.exp(_between(u[1], -log_r, log_r))
    cw = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
    ch = jnp.minimum(jnp.sqrt(area / ratio), 1.0)
    cx = cw / 2 + u[2] * (1.0 - cw)
    cy = ch / 2 + u[3] * (1.0 - ch)
    return ops.crop_matrix(cx, cy, cw, ch, height, width)


def _randaugment(policy: Policy, u) -> tuple[jax.Array, jax.Array]:
    """(op indices int32[N], signed magnitudes float32[N] in [-M, M])."""
    n = policy.randaugment_ops
    pairs = u[_FIXED:_FIXED + 2 * n].reshape(n, 2)
    which = jnp.minimum((pairs[:, 0] * len(RANDAUGMENT_OPS)).astype(jnp.int32),
                        len(RANDAUGMENT_OPS) - 1)
    sign = jnp.where(pairs[:, 1] < 0.5, 1.0, -1.0)
    return which, (sign * policy.randaugment_magnitude).astype(jnp.float32)


def _randaugment_matrix(which, m, height: int, width: int) -> jax.Array:
    """The affine matrix of RandAugment draw (which, signed magnitude m); identity for
    its color ops."""
    branches = [
        lambda m: ops.identity_matrix(),
        lambda m: ops.rotation_matrix(30.0 * m),
        lambda m: ops.shear_matrix(0.3 * m, 0.0),
        lambda m: ops.shear_matrix(0.0, 0.3 * m),
        lambda m: ops.translate_matrix(0.45 * m, 0.0, height, width),
        lambda m: ops.translate_matrix(0.0, 0.45 * m, height, width),
    ]
    return jax.lax.switch(jnp.minimum(which, _N_GEOMETRIC), branches
                          + [lambda m: ops.identity_matrix()], m)


def _randaugment_color(which, m, x: jax.Array) -> jax.Array:
    """RandAugment draw (which, m) on the colors of x; identity for its geometric ops."""
    branches = [
        lambda m, x: x,
        lambda m, x: ops.adjust_brightness(x, 1.0 + 0.9 * m),
        lambda m, x: ops.adjust_contrast(x, 1.0 + 0.9 * m),
        lambda m, x: ops.adjust_saturation(x, 1.0 + 0.9 * m),
        lambda m, x: ops.sharpen(x, 1.0 + 0.9 * m),
        lambda m, x: ops.solarize(x, 1.0 - jnp.abs(m)),
    ]
    return jax.lax.switch(jnp.maximum(which - _N_GEOMETRIC + 1, 0), branches, m, x)


def geometry(policy: Policy, u, height: int, width: int) -> jax.Array:
    """The affine matrix (output -> source, augment_ops) of one example's geometric ops,
    from its ``draws``."""
    parts = []
    if policy.crop_area_min < 1.0:
        parts.append(_crop(policy, u[_CROP:_CROP + 4], height, width))
    if policy.rotate > 0:
        parts.append(ops.rotation_matrix(_between(u[_ROTATE], -policy.rotate, policy.rotate)))
    if policy.flip > 0:
        parts.append(ops.flip_matrix(u[_FLIP] < policy.flip))
    if policy.randaugment_ops:
        which, mags = _randaugment(policy, u)
        parts += [_randaugment_matrix(which[n], mags[n], height, width)
                  for n in range(policy.randaugment_ops)]
    return ops.compose(*parts) if parts else ops.identity_matrix()


def augment_example(policy: Policy, u, image: jax.Array, mask: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array | None]:
    """One example: image float32[H, W, C] in [0, 1] (and mask int[H, W]) -> the same,
    augmented by ``policy`` with the example's ``draws`` u (module docstring, in order)."""
    h, w = image.shape[:2]
    if policy.geometric:
        m = geometry(policy, u, h, w)
        image = jnp.clip(ops.warp(image, m, order=1, fill=policy.fill), 0.0, 1.0)
        if mask is not None:
            mask = ops.warp(mask, m, order=0, fill=0)
    if policy.randaugment_ops:
        which, mags = _randaugment(policy, u)
        for n in range(policy.randaugment_ops):
            image = _randaugment_color(which[n], mags[n], image)
    c = u[_COLOR:_COLOR + 4]
    for i, (strength, adjust) in enumerate((
            (policy.brightness, ops.adjust_brightness), (policy.contrast, ops.adjust_contrast),
            (policy.saturation, ops.adjust_saturation))):
        if strength:
            image = adjust(image, _between(c[i], max(0.0, 1.0 - strength), 1.0 + strength))
    if policy.hue:
        image = ops.rotate_hue(image, _between(c[3], -policy.hue, policy.hue))
    return image, mask


# ---- The batch --------------------------------------------------------------------------
def example_keys(key, batch_size: int) -> jax.Array:
    """Keys [B]: fold_in(key, i) for every position i of the global batch."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def _symmetric_beta(key, alphas: tuple[float, ...]) -> jax.Array:
    """float32[len(alphas)]: Beta(a, a) draws, as G_1 / (G_1 + G_2) of two Gamma(a) draws,
    computed from their logs (small alphas underflow a plain gamma draw to 0)."""
    a = jnp.asarray(alphas, jnp.float32)[:, None] * jnp.ones((1, 2), jnp.float32)
    log_g = jax.random.loggamma(key, a)
    return jax.nn.sigmoid(log_g[:, 0] - log_g[:, 1])


def mix(policy: Policy, keys, u, images: jax.Array, labels: jax.Array, num_classes: int
        ) -> tuple[jax.Array, jax.Array]:
    """Mixup / CutMix of example i with example B-1-i (keys [B] and draws u [B, ...] of
    the examples) -> (images [B, H, W, C], label_probs float32[B, K], rows summing to 1)."""
    h, w = images.shape[1:3]
    partners, partner_labels = images[::-1], labels[::-1]
    alphas = tuple(a for a in (policy.mixup, policy.cutmix) if a)

    def one(key, u, x, xp):
        lams = _symmetric_beta(jax.random.fold_in(key, _MIX), alphas)
        choices = []  # (image, lam) of each mixing that is on
        if policy.mixup:
            choices.append((ops.mixup(x, xp, lams[0]), lams[0]))
        if policy.cutmix:
            inside, lam = ops.cutmix_box(h, w, lams[-1], u[_BOX], u[_BOX + 1])
            choices.append((jnp.where(inside[..., None], xp, x), lam))
        if len(choices) == 1:
            return choices[0]
        use_cutmix = u[_MIX_MODE] < 0.5
        return tuple(jnp.where(use_cutmix, c, m) for m, c in zip(*choices))

    images, lam = jax.vmap(one)(keys, u, images, partners)
    return images, ops.soft_labels(labels, partner_labels, lam, num_classes)


class Augmenter:
    """``policy`` applied to a batch: (batch, key) -> batch (jit-able).

    Args:
      policy: the ops and strengths.
      keys: the batch keys the task accepts (its class's augment_keys).
      num_classes: K of "label_probs" (mixing only).
      mean, std: the source's per-channel normalization, or None ([0, 1] images).
    """

    def __init__(self, policy: Policy, keys: tuple[str, ...], num_classes: int = 0,
                 mean=None, std=None):
        self.policy, self.keys, self.num_classes = policy, tuple(keys), num_classes
        self.normalization = None if mean is None else (
            jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))

    def __call__(self, batch: dict, key) -> dict:
        """The batch with "image" (and "mask" when the task takes it) augmented and, when
        mixing, "label_probs" added; ``key`` is the step's augmentation key."""
        p, out = self.policy, dict(batch)
        images = batch["image"]
        if self.normalization is not None:
            images = images * self.normalization[1] + self.normalization[0]
        keys = example_keys(key, images.shape[0])
        u = jax.vmap(lambda k: draws(p, k))(keys)
        if p.geometric or p.color:
            if "mask" in self.keys and "mask" in batch:
                images, out["mask"] = jax.vmap(lambda u, x, m: augment_example(p, u, x, m))(
                    u, images, batch["mask"])
            else:
                images = jax.vmap(lambda u, x: augment_example(p, u, x)[0])(u, images)
        if p.mixes:
            images, out["label_probs"] = mix(p, keys, u, images, batch["label"],
                                             self.num_classes)
        images = jnp.clip(images, 0.0, 1.0)
        if self.normalization is not None:
            images = (images - self.normalization[0]) / self.normalization[1]
        out["image"] = images.astype(batch["image"].dtype)
        return out


# ---- The run: config checks and the trainer's hook ----------------------------------------
def section(data_cfg) -> ml_collections.ConfigDict | None:
    """The selected source's ``augment`` section (None for sources without images)."""
    return data_cfg[data_cfg.source].get("augment")


def check_task(data_cfg, task_name: str, task_keys: tuple[str, ...],
               image_tasks: tuple[str, ...]) -> None:
    """ValueError unless the run's task accepts what its augmentation changes."""
    c = section(data_cfg)
    if c is None:
        return
    policy, prefix = Policy.from_config(c), f"data.{data_cfg.source}.augment"
    if policy.enabled and "image" not in task_keys:
        raise ValueError(f"{prefix} is on, but task.name={task_name!r} takes no augmented "
                         f"images; allowed with task.name in {image_tasks} (or set every "
                         f"{prefix} strength to 0)")
    if policy.mixes and "label" not in task_keys:
        key = "mixup" if policy.mixup else "cutmix"
        checks.fail(f"{prefix}.{key}", c[key], "mixup / CutMix make soft class labels, "
                    f"which only task.name='classify' uses (this run: {task_name!r}); 0 = off")


def for_run(data_cfg, task_keys: tuple[str, ...], data_info: dict) -> Augmenter | None:
    """The run's Augmenter, or None when its source has no augmentation or all is off."""
    c = section(data_cfg)
    if c is None or not Policy.from_config(c).enabled:
        return None
    src = data_cfg[data_cfg.source]
    mean = tuple(src.get("image_mean", (0.0, 0.0, 0.0)))
    std = tuple(src.get("image_std", (1.0, 1.0, 1.0)))
    plain = mean == (0.0,) * len(mean) and std == (1.0,) * len(std)
    return Augmenter(Policy.from_config(c), task_keys, data_info.get("num_classes") or 0,
                     None if plain else mean, None if plain else std)


def step_key(train_key, step) -> jax.Array:
    """The augmentation key of step ``step`` (the dropout key's own stream)."""
    return jax.random.fold_in(jax.random.fold_in(train_key, step), STREAM)


def wrap_train_step(step_fn, augmenter: Augmenter | None, train_key):
    """(state, batch) -> step_fn(state, augmented batch); ``step_fn`` itself when off."""
    if augmenter is None:
        return step_fn

    def augmented_step(state, batch):
        return step_fn(state, augmenter(batch, step_key(train_key, state.step)))
    return augmented_step
