"""Image augmentation primitives: pure jax.numpy functions of one example and its drawn
parameters (no randomness here; train/data/augment.py draws the parameters and vmaps
these over a batch).

    image  float32[H, W, C] in [0, 1] (C = 3, or 1 for grayscale sources)
    mask   int32[H, W] class per pixel (segmentation)

Geometry. Every geometric op is a 3x3 affine matrix M mapping an OUTPUT pixel's centered
coordinates (x right, y down, in pixels, (0, 0) at the image center) to the SOURCE point
it is sampled from: ops compose by matrix product (``M_first @ M_second``: content is
transformed by the first op, then the second), and ``warp`` samples once -- bilinear
for images, nearest for masks, from the same coordinates, so a mask stays aligned with
its image by construction. Points outside the source read ``fill`` (masks: 0).

Color. Each op blends with a reference image, ``blend(x, y, f) = f x + (1 - f) y``, the
form of PIL's ImageEnhance (and torchvision's ColorJitter), then clips to [0, 1]; at its
neutral parameter (f = 1, hue 0, threshold 1) each op returns its input bit for bit. Sums
over channels are written out elementwise, not as matmuls: an accelerator may run a
float32 matmul at reduced (TF32) precision, which would break that identity.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

# ITU-R 601-2 luma (PIL's convert("L"), torchvision's rgb_to_grayscale).
GRAY = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC); hue rotation turns the (I, Q) chroma plane and keeps the luma Y. In
# RGB the turn by angle a is I + (cos a - 1) _HUE_COS + sin a _HUE_SIN (constants, float64
# NumPy): T^-1 (R(a) - I) T with R(a) the rotation of (I, Q).
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_HUE_COS = np.linalg.inv(_YIQ) @ np.diag([0.0, 1.0, 1.0]) @ _YIQ
_HUE_SIN = np.linalg.inv(_YIQ) @ np.array([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]]) @ _YIQ


# ---- Geometry -----------------------------------------------------------------------
def identity_matrix() -> jax.Array:
    return jnp.eye(3, dtype=jnp.float32)


def compose(*matrices: jax.Array) -> jax.Array:
    """M_1 @ M_2 @ ...: content transformed by op 1 first (full float32 precision)."""
    out = matrices[0]
    for m in matrices[1:]:
        out = jnp.matmul(out, m, precision=jax.lax.Precision.HIGHEST)
    return out


def flip_matrix(flip) -> jax.Array:
    """Horizontal mirror where ``flip`` (bool scalar) is true, else the identity."""
    sx = jnp.where(flip, -1.0, 1.0).astype(jnp.float32)
    return jnp.diag(jnp.stack([sx, jnp.float32(1.0), jnp.float32(1.0)]))


def rotation_matrix(degrees) -> jax.Array:
    """Content rotated counter-clockwise on screen by ``degrees`` about the center."""
    t = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    c, s, z, o = jnp.cos(t), jnp.sin(t), jnp.float32(0.0), jnp.float32(1.0)
    return jnp.stack([jnp.stack([c, -s, z]), jnp.stack([s, c, z]), jnp.stack([z, z, o])])


def crop_matrix(cx, cy, cw, ch, height: int, width: int) -> jax.Array:
    """The crop of center (cx, cy) and size (cw, ch) -- fractions of the width / height
    -- resized to the full image (random resized crop)."""
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    z, o = jnp.float32(0.0), jnp.float32(1.0)
    return jnp.stack([jnp.stack([f(cw), z, (f(cx) - 0.5) * width]),
                      jnp.stack([z, f(ch), (f(cy) - 0.5) * height]),
                      jnp.stack([z, z, o])])


def shear_matrix(sx, sy) -> jax.Array:
    """Shear as PIL's affine transform: source x = x + sx y, source y = y + sy x."""
    z, o = jnp.float32(0.0), jnp.float32(1.0)
    sx, sy = jnp.asarray(sx, jnp.float32), jnp.asarray(sy, jnp.float32)
    return jnp.stack([jnp.stack([o, sx, z]), jnp.stack([sy, o, z]), jnp.stack([z, z, o])])


def translate_matrix(tx, ty, height: int, width: int) -> jax.Array:
    """Content moved right by tx and down by ty (fractions of the width / height)."""
    z, o = jnp.float32(0.0), jnp.float32(1.0)
    return jnp.stack([jnp.stack([o, z, -jnp.asarray(tx, jnp.float32) * width]),
                      jnp.stack([z, o, -jnp.asarray(ty, jnp.float32) * height]),
                      jnp.stack([z, z, o])])


def source_coordinates(matrix: jax.Array, height: int, width: int
                       ) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) float32[H, W]: the source pixel coordinates each output pixel reads.

    Centered coordinates are half-integers or integers, so the identity matrix maps every
    pixel exactly onto itself (and bilinear sampling returns the input bit for bit)."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                        jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")
    m = matrix
    src_x = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    src_y = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    return src_y + cy, src_x + cx


def warp(image: jax.Array, matrix: jax.Array, *, order: int, fill=0.0) -> jax.Array:
    """``image`` [H, W] or [H, W, C] resampled through ``matrix`` (see the module doc):
    order 1 = bilinear (images), 0 = nearest (masks; keeps the dtype)."""
    rows, cols = source_coordinates(matrix, image.shape[0], image.shape[1])

    def sample(plane):
        return ndimage.map_coordinates(plane, [rows, cols], order=order, mode="constant",
                                       cval=fill)
    if image.ndim == 2:
        return sample(image)
    return jax.vmap(sample, in_axes=2, out_axes=2)(image)


# ---- Color --------------------------------------------------------------------------
def blend(x, y, f):
    """f x + (1 - f) y: x at f = 1 exactly, y at f = 0, extrapolated beyond 1."""
    return f * x + (1.0 - f) * y


def _weighted_channels(x: jax.Array, weights) -> jax.Array:
    """sum_c weights[c] x[..., c] -> [..., 1] (elementwise: no reduced-precision matmul)."""
    out = weights[0] * x[..., 0:1]
    for c in range(1, len(weights)):
        out = out + weights[c] * x[..., c:c + 1]
    return out


def grayscale(x: jax.Array) -> jax.Array:
    """[H, W, 1] luma (the image itself when it has one channel)."""
    return _weighted_channels(x, GRAY) if x.shape[-1] == 3 else jnp.mean(x, -1, keepdims=True)


def adjust_brightness(x: jax.Array, f) -> jax.Array:
    """Blend with black (PIL Brightness): f x."""
    return jnp.clip(blend(x, 0.0, f), 0.0, 1.0)


def adjust_contrast(x: jax.Array, f) -> jax.Array:
    """Blend with the image's mean luma (PIL Contrast, torchvision adjust_contrast)."""
    return jnp.clip(blend(x, jnp.mean(grayscale(x)), f), 0.0, 1.0)


def adjust_saturation(x: jax.Array, f) -> jax.Array:
    """Blend with the per-pixel luma (PIL Color): 0 = grayscale (a no-op on gray)."""
    return jnp.clip(blend(x, grayscale(x), f), 0.0, 1.0)


def rotate_hue(x: jax.Array, turns) -> jax.Array:
    """Turn every color's hue by ``turns`` of the color circle: a rotation of the YIQ
    chroma plane (the hue-rotate of image editors; luma kept, close to an HSV hue shift).
    A no-op on one-channel images. The matrix is I + (cos a - 1) C + sin a S, exactly the
    identity at 0 turns."""
    if x.shape[-1] != 3:
        return x
    a = 2.0 * math.pi * jnp.asarray(turns, jnp.float32)
    m = (jnp.eye(3, dtype=jnp.float32) + (jnp.cos(a) - 1.0) * _HUE_COS.astype(np.float32)
         + jnp.sin(a) * _HUE_SIN.astype(np.float32))
    out = jnp.concatenate([_weighted_channels(x, m[c]) for c in range(3)], axis=-1)
    return jnp.clip(out, 0.0, 1.0)


def sharpen(x: jax.Array, f) -> jax.Array:
    """PIL Sharpness: blend with the 3x3 smoothed image (kernel 1 1 1 / 1 5 1 / 1 1 1,
    over 13), border pixels kept; f = 0 smooths, f > 1 sharpens."""
    h, w = x.shape[:2]
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = 4.0 * x  # centre weight 5 = 1 (in the 3x3 sum below) + 4
    for dy in range(3):
        for dx in range(3):
            total = total + p[dy:dy + h, dx:dx + w]
    smooth = total / 13.0
    border = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    smooth = jnp.where(border, smooth, x)
    return jnp.clip(blend(x, smooth, f), 0.0, 1.0)


def solarize(x: jax.Array, threshold) -> jax.Array:
    """Invert the values above ``threshold`` (1 = none of an image in [0, 1])."""
    return jnp.where(x > threshold, 1.0 - x, x)


# ---- Mixing (batch level) -------------------------------------------------------------
def mixup(x: jax.Array, partner: jax.Array, lam) -> jax.Array:
    """Mixup (Zhang et al. 2018): lam x + (1 - lam) partner."""
    return blend(x, partner, lam)


def cutmix_box(height: int, width: int, lam, cx, cy) -> tuple[jax.Array, jax.Array]:
    """CutMix's box (Yun et al. 2019): sides sqrt(1 - lam) of the image's, centered at
    (cx, cy) (fractions of the width / height), clipped to the image.

    Returns (inside bool[H, W], lam') where lam' = 1 - box pixels / image pixels, the
    area actually kept from the example (the box's share goes to its partner)."""
    cut = jnp.sqrt(1.0 - lam)
    half_w, half_h = width * cut / 2, height * cut / 2
    x1 = jnp.clip(jnp.round(cx * width - half_w), 0, width).astype(jnp.int32)
    x2 = jnp.clip(jnp.round(cx * width + half_w), 0, width).astype(jnp.int32)
    y1 = jnp.clip(jnp.round(cy * height - half_h), 0, height).astype(jnp.int32)
    y2 = jnp.clip(jnp.round(cy * height + half_h), 0, height).astype(jnp.int32)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    area = ((x2 - x1) * (y2 - y1)).astype(jnp.float32)
    return inside, 1.0 - area / (height * width)


def soft_labels(labels: jax.Array, partner_labels: jax.Array, lam: jax.Array,
                num_classes: int) -> jax.Array:
    """float32[B, K]: lam one_hot(labels) + (1 - lam) one_hot(partner_labels)."""
    lam = lam.astype(jnp.float32)[:, None]
    return (lam * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
            + (1.0 - lam) * jax.nn.one_hot(partner_labels, num_classes, dtype=jnp.float32))
