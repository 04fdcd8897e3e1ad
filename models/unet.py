"""U-Net for semantic segmentation (Ronneberger, Fischer & Brox 2015).

    images [B, H, W, C_in] -> logits [B, H, W, num_classes] float32

    encoder     level i = 0..depth-1: (3x3 conv -> norm -> ReLU) x 2 at base_channels * 2^i
                channels, kept as skip_i, then 2x2 max pooling (H, W halve)
    bottleneck  (3x3 conv -> norm -> ReLU) x 2 at base_channels * 2^depth channels, on
                [H / 2^depth, W / 2^depth]
    decoder     level i = depth-1..0: upsample x2 to base_channels * 2^i channels
                ("transpose": 2x2 stride-2 transposed conv; "bilinear": jax.image.resize
                then a 3x3 conv), concatenate skip_i on the channel axis, then
                (3x3 conv -> norm -> ReLU) x 2 at base_channels * 2^i channels
    head        1x1 conv (a per-pixel Dense) to num_classes logits

Differences from the paper, on purpose:
  * 3x3 convs are zero-padded ("same"), so the output keeps the input's size and skips
    need no cropping (the paper's unpadded convs shrink 572 -> 388 and crop the skips).
    Every side must then be divisible by 2^depth, or pooling would drop pixels and the
    skip and the upsampled map would disagree; the model raises a ValueError otherwise.
  * A norm layer after each conv ("batch" | "group" | "none"); the paper has none (it
    predates batch norm's wide use).
  * "bilinear" upsampling (resize-convolution, Odena et al. 2016) is the ablation of the
    paper's 2x2 "up-convolution"; both halve the channels as the paper does.
Kept from the paper (fig. 1): pooling with doubling channels, upsampling with halving
channels, and skip connections from each encoder level to its decoder level.

Batch norm keeps running statistics in the `batch_stats` collection, exactly as
models/cnn.py: `train=True` normalizes with the batch's statistics and updates them
(`mutable=["batch_stats"]`); `train=False` uses the running averages. Both norms use the
two-pass variance; `bn_running_variance` picks flax's biased or PyTorch's unbiased running
variance (models/layers/normalization.py).

Every conv, the transposed one included (written as a conv with input dilation 2, which is
what lax.conv_transpose computes), goes through the `conv_general_dilated` hook and the
1x1 head through `dot_general`: the compression transforms plug in there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import initializers, normalization

DTYPES = variants.DTYPES
UPSAMPLING = ("transpose", "bilinear")
NORMS = ("batch", "group", "none")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters (defaults: "small")."""
    depth: int = 3                      # poolings; the bottleneck is 2^depth times smaller
    base_channels: int = 16             # level 0 width; level i has base * 2^i
    upsampling: str = "transpose"       # "transpose" (2x2 stride 2) | "bilinear" (+ conv)
    norm: str = "batch"                 # "batch" | "group" | "none"
    group_norm_groups: int = 8          # norm="group": groups per layer (Wu & He 2018)
    num_classes: int = 5                # logits per pixel (the dataset fills this in)
    bn_momentum: float = 0.9            # running = m * running + (1 - m) * batch
    bn_epsilon: float = 1e-5
    bn_running_variance: str = "biased"  # "biased" (flax) | "unbiased" (PyTorch)
    kernel_init: str = "he_normal"      # He et al. 2015, as the paper (std sqrt(2 / N))
    dtype: str = "float32"              # compute dtype; logits are float32 regardless
    param_dtype: str = "float32"
    dot_general: Callable = lax.dot_general                    # the 1x1 head
    conv_general_dilated: Callable = lax.conv_general_dilated  # every other conv

    def __post_init__(self):
        for key, allowed in (("upsampling", UPSAMPLING), ("norm", NORMS),
                             ("kernel_init", initializers.NAMES), ("dtype", DTYPES),
                             ("param_dtype", DTYPES),
                             ("bn_running_variance", normalization.RUNNING_VARIANCES)):
            variants.check_one_of("model", key, getattr(self, key), allowed)
        for key in ("depth", "base_channels", "num_classes", "group_norm_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.norm == "group" and self.base_channels % self.group_norm_groups:
            # Every width is base_channels * 2^i, so dividing the base suffices.
            raise ValueError(f"model.norm='group' needs model.base_channels "
                             f"({self.base_channels}) divisible by model.group_norm_groups "
                             f"({self.group_norm_groups})")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"model.bn_momentum must be in [0, 1), got {self.bn_momentum}")

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)

    def channels(self, level: int) -> int:
        """Width of encoder/decoder level `level` (level `depth` is the bottleneck)."""
        return self.base_channels * 2 ** level


VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, base_channels=8),     # tests: seconds
    "small": dict(depth=3, base_channels=16),   # 0.48M params (5 classes)
    # The paper's widths: 64 .. 512, bottleneck 1024 (31M params with batch norm).
    "base": dict(depth=4, base_channels=64),
}


def make_config(variant: str, **overrides) -> UNetConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(UNetConfig, VARIANTS, variant, overrides, "unet")


def check_spatial_size(height: int, width: int, depth: int) -> None:
    """ValueError unless both sides are divisible by 2^depth (see the module docstring)."""
    factor = 2 ** depth
    if height % factor or width % factor:
        raise ValueError(
            f"U-Net input of size {height}x{width} with depth={depth} cannot keep its size: "
            f"both sides must be multiples of 2^depth = {factor} (e.g. {factor}, "
            f"{2 * factor}, {4 * factor}, ...); resize or pad the images, or lower "
            "model.depth")


class ConvBlock(nn.Module):
    """(3x3 conv -> norm -> ReLU) x 2: [B, H, W, C] -> [B, H, W, features].

    Convs carry a bias only without a norm layer (a norm's shift replaces it).
    """
    cfg: UNetConfig
    features: int
    train: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        for i in range(2):
            x = _conv(cfg, self.features, 3, use_bias=cfg.norm == "none",
                      name=f"conv{i}")(x)
            x = nn.relu(_norm(cfg, self.train, name=f"norm{i}")(x))
        return x


def _conv(cfg: UNetConfig, features: int, kernel: int, use_bias: bool, name: str,
          padding: Any = "SAME", **kwargs) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding=padding, use_bias=use_bias,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                   kernel_init=initializers.get(cfg.kernel_init),
                   conv_general_dilated=cfg.conv_general_dilated, name=name, **kwargs)


def _norm(cfg: UNetConfig, train: bool, name: str) -> Callable:
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.norm == "batch":
        return normalization.BatchNorm(
            use_running_average=not train, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon,
            running_variance=cfg.bn_running_variance, dtype=dtype, param_dtype=pdtype,
            name=name)
    if cfg.norm == "group":  # per example: train and eval compute the same thing
        return normalization.group_norm(num_groups=cfg.group_norm_groups, dtype=dtype,
                                        param_dtype=pdtype, name=name)
    return lambda x: x


def upsample(cfg: UNetConfig, x, features: int, name: str):
    """[B, H, W, C] -> [B, 2H, 2W, features] (linear: no norm, no activation, as the
    paper's up-convolution).

    transpose: out[2i + a, 2j + b] = x[i, j] @ W[1 - a, 1 - b] + bias, a 2x2 stride-2
      transposed conv (each input pixel paints a 2x2 block; no overlap). Computed as a
      2x2 conv over x dilated by 2 (zeros between pixels) and padded by 1: exactly
      lax.conv_transpose(x, W, (2, 2), "VALID") (= flax nn.ConvTranspose; PyTorch's
      ConvTranspose2d stores the kernel flipped), and the conv hook stays in the path.
    bilinear: jax.image.resize (half-pixel centers, PyTorch's align_corners=False), then
      a 3x3 conv to `features` channels.
    """
    b, h, w, c = x.shape
    if cfg.upsampling == "transpose":
        return _conv(cfg, features, 2, use_bias=True, name=name, padding=((1, 1), (1, 1)),
                     input_dilation=(2, 2))(x)
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")
    return _conv(cfg, features, 3, use_bias=True, name=name)(x)


class UNet(nn.Module):
    """images [B, H, W, C_in] -> logits [B, H, W, num_classes] float32.

    H and W must be multiples of 2^depth (ValueError otherwise). Sows the bottleneck
    features [B, H / 2^depth, W / 2^depth, base * 2^depth] as intermediates/bottleneck.
    Params (and batch_stats for norm="batch"): down{i}/{conv0, norm0, conv1, norm1},
    bottleneck/..., up{i} (the upsampling conv), dec{i}/..., head.
    dec{i}/conv0's kernel [3, 3, 2 * base * 2^i, base * 2^i] sees the skip on its first
    half of input channels and the upsampled map on the second.
    """
    cfg: UNetConfig

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        cfg = self.cfg
        if images.ndim != 4:
            raise ValueError(f"U-Net expects images [B, H, W, C], got shape {images.shape}")
        check_spatial_size(images.shape[1], images.shape[2], cfg.depth)
        x = images.astype(jnp.dtype(cfg.dtype))
        skips = []
        for i in range(cfg.depth):
            x = ConvBlock(cfg, cfg.channels(i), train, name=f"down{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(cfg, cfg.channels(cfg.depth), train, name="bottleneck")(x)
        self.sow("intermediates", "bottleneck", x)
        for i in reversed(range(cfg.depth)):
            x = upsample(cfg, x, cfg.channels(i), name=f"up{i}")
            # The skip brings back the spatial detail pooling removed (Ronneberger et al.
            # 2015, sec. 1: high-resolution features from the contracting path help
            # localize); channels: 2 * base * 2^i.
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = ConvBlock(cfg, cfg.channels(i), train, name=f"dec{i}")(x)
        logits = nn.Dense(cfg.num_classes, dtype=jnp.dtype(cfg.dtype),
                          param_dtype=jnp.dtype(cfg.param_dtype),
                          dot_general=cfg.dot_general, name="head")(x)
        return logits.astype(jnp.float32)
