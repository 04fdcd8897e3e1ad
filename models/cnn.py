"""Convolutional image towers: ResNet (He et al. 2016) and EfficientNet (Tan & Le 2019).

  ResNet        images [B, H, W, C] -> stem -> stages of residual blocks -> global average
                pool -> features [B, widths[-1] * expansion] -> Dense -> logits [B, classes]
  EfficientNet  images [B, H, W, C] -> 3x3/2 stem -> MBConv stages (depthwise separable
                convs + squeeze-and-excitation, swish) -> 1x1 head conv -> global average
                pool -> features [B, head width] -> dropout -> Dense -> logits

Both use batch norm with running statistics in the `batch_stats` collection: with
`train=True` the batch's statistics normalize and the running averages are updated
(`model.apply(variables, x, train=True, mutable=["batch_stats"])` returns them); with
`train=False` the running averages normalize and nothing is updated, so each example's
output is independent of the rest of the batch. Under jit with a batch-sharded input the
batch statistics are those of the global batch (GSPMD inserts the reduction).

Outputs (logits, or the pooled features when num_classes == 0) are float32 whatever the
compute dtype. Every conv goes through the injectable `conv_general_dilated` hook (flax
nn.Conv's attribute) and every Dense through `dot_general`.

Where popular explanations differ from the papers:
  * A popular explanation credits ResNet with an "identity mapping" (no non-linearity on
    the main path). That is the follow-up paper (He et al. 2016b, pre-activation "v2").
    This is the original ResNet (He et al. 2016a, fig. 2): ReLU after the addition, BN
    after each conv -- whose ImageNet ResNet-50 has 25,557,032 parameters.
  * Batch norm at inference: Ioffe & Szegedy 2015 (sec. 3.1, alg. 2) define population
    statistics over the training set; like the common frameworks, this estimates them
    with running averages updated with momentum (new = m * old + (1 - m) * batch), not a
    pass over the whole dataset. The running variance averages the biased batch variance
    (flax) unless bn_running_variance="unbiased" (PyTorch's n / (n - 1), alg. 2's
    m / (m - 1)); training always normalizes with the biased one
    (models/layers/normalization.py).
  * A popular explanation makes squeeze-and-excitation's "excitation" an arbitrary FC
    network; Hu et al. 2018 (sec. 3.2) use two FC layers (a bottleneck of ratio r, then a
    sigmoid gate).
  * A popular explanation calls MobileNetV2 MobileNet plus residuals; Sandler et al. 2018
    (sec. 3.2-3.3) use *inverted* residuals (expand 1x1 -> depthwise -> project 1x1)
    whose projection is linear (no activation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import initializers, normalization, partitioning


# ----------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------
def _check_common(cfg, choices: dict[str, tuple]):
    """Checks shared by ResNet and EfficientNet, plus `choices` {key: allowed values}."""
    choices = {**choices, "kernel_init": initializers.NAMES, "dtype": variants.DTYPES,
               "param_dtype": variants.DTYPES,
               "bn_running_variance": normalization.RUNNING_VARIANCES}
    for key, allowed in choices.items():
        variants.check_one_of("model", key, getattr(cfg, key), allowed)
    if cfg.num_classes < 0:
        raise ValueError(f"model.num_classes must be >= 0 (0 = no head), got "
                         f"{cfg.num_classes}")
    if not 0.0 <= cfg.bn_momentum < 1.0:
        raise ValueError(f"model.bn_momentum must be in [0, 1), got {cfg.bn_momentum}")


# Logical axes of conv kernels [kh, kw, in / groups, out] (models/layers/partitioning.py);
# batch-norm statistics and scales carry none (the shape rule keeps them replicated).
_CONV_AXES = (None, None, "conv_in", "conv_out")
_IMAGE_ACTIVATION = ("batch", None, None, None)  # [batch, height, width, channels]


class _Layers:
    """Conv / BN / Dense factories bound to a config (dtypes, init, hooks)."""

    def __init__(self, cfg, train: bool):
        self.cfg, self.train = cfg, train
        self.dtype, self.pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def conv(self, features, kernel, strides=1, groups=1, name=None):
        # Symmetric (k-1)/2 padding as in the papers' code (torchvision / timm); output size
        # ceil(H / stride) like "SAME". No bias: the following BN's shift replaces it.
        pad = (kernel - 1) // 2
        return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                       padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                       use_bias=False, dtype=self.dtype, param_dtype=self.pdtype,
                       kernel_init=partitioning.boxed(initializers.get(self.cfg.kernel_init),
                                                      _CONV_AXES),
                       conv_general_dilated=self.cfg.conv_general_dilated, name=name)

    def norm(self, zero_scale=False, name=None):
        return normalization.BatchNorm(
            use_running_average=not self.train, momentum=self.cfg.bn_momentum,
            epsilon=self.cfg.bn_epsilon, running_variance=self.cfg.bn_running_variance,
            dtype=self.dtype, param_dtype=self.pdtype,
            scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
            name=name)

    def dense(self, features, names=("conv_in", "conv_out"), kernel_init=None, name=None):
        """Dense whose kernel axes are called `names` (squeeze-excite: like a 1x1 conv)."""
        init = kernel_init or nn.initializers.lecun_normal()
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.pdtype,
                        kernel_init=partitioning.boxed(init, names),
                        bias_init=partitioning.boxed(nn.initializers.zeros_init(), names[-1:]),
                        dot_general=self.cfg.dot_general, name=name)

    def head(self, x, name="head"):
        """Pooled features -> float32 logits, or the features themselves (num_classes=0)."""
        if self.cfg.num_classes == 0:
            return x.astype(jnp.float32)
        init = nn.initializers.zeros if self.cfg.head_zero_init else None
        return self.dense(self.cfg.num_classes, ("conv_in", "classes"), init,
                          name=name)(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# ResNet.
# ----------------------------------------------------------------------------------------
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """ResNet hyper-parameters (defaults: "resnet_tiny", the CIFAR-style test model)."""
    stage_sizes: tuple[int, ...] = (1, 1, 1)   # residual blocks per stage
    widths: tuple[int, ...] = (16, 32, 64)     # per stage; bottleneck outputs are 4x
    block: str = "basic"                       # "basic" (3x3, 3x3) | "bottleneck" (1, 3, 1)
    stem: str = "cifar"                        # "imagenet": 7x7/2 conv + 3x3/2 max-pool;
                                               # "cifar": 3x3/1 conv, no pool (small images)
    num_classes: int = 0                       # 0: no head, return pooled features
    bn_momentum: float = 0.9                   # running = m * running + (1 - m) * batch
    bn_epsilon: float = 1e-5
    bn_running_variance: str = "biased"        # "biased" (flax) | "unbiased" (PyTorch)
    zero_init_residual: bool = True            # last BN scale of each block = 0 (Goyal et
                                               # al. 2017): blocks start as identities
    head_zero_init: bool = True
    kernel_init: str = "he_normal"             # He et al. 2015: Var = 2 / fan_in for ReLU
    dtype: str = "float32"                     # compute dtype
    param_dtype: str = "float32"
    dot_general: Callable = lax.dot_general    # the head's matmul
    conv_general_dilated: Callable = lax.conv_general_dilated  # every conv

    def __post_init__(self):
        # Lists (from a config file / command line) become tuples: the config stays hashable.
        for key in ("stage_sizes", "widths"):
            object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        _check_common(self, {"block": BLOCKS, "stem": STEMS})
        if not self.stage_sizes or len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"model.stage_sizes {self.stage_sizes} and model.widths "
                             f"{self.widths} must be non-empty and of equal length")
        if min(self.stage_sizes) <= 0 or min(self.widths) <= 0:
            raise ValueError("model.stage_sizes and model.widths must be positive, got "
                             f"{self.stage_sizes} and {self.widths}")

    def replace(self, **changes) -> "ResNetConfig":
        return dataclasses.replace(self, **changes)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * (4 if self.block == "bottleneck" else 1)


_IMAGENET_WIDTHS = (64, 128, 256, 512)
RESNET_VARIANTS: dict[str, dict[str, Any]] = {
    "resnet_tiny": dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), block="basic",
                        stem="cifar"),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), widths=_IMAGENET_WIDTHS, block="basic",
                     stem="imagenet"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), widths=_IMAGENET_WIDTHS, block="basic",
                     stem="imagenet"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), widths=_IMAGENET_WIDTHS, block="bottleneck",
                     stem="imagenet"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), widths=_IMAGENET_WIDTHS,
                      block="bottleneck", stem="imagenet"),
}


def make_resnet_config(variant: str, **overrides) -> ResNetConfig:
    """The named variant's config with `overrides` applied (unknown names raise).
    For CIFAR-sized images use e.g. make_resnet_config("resnet18", stem="cifar")."""
    return variants.from_variant(ResNetConfig, RESNET_VARIANTS, variant, overrides, "resnet")


class ResidualBlock(nn.Module):
    """x [B, H, W, C_in] -> relu(F(x) + shortcut(x)) [B, H/s, W/s, C_out].

    basic:      F = BN(conv3x3(relu(BN(conv3x3/s(x)))))               C_out = width
    bottleneck: F = BN(conv1x1(relu(BN(conv3x3/s(relu(BN(conv1x1(x))))))))  C_out = 4 width
    shortcut: identity, or BN(conv1x1/s(x)) when the shape changes ("option B").
    The bottleneck strides its 3x3 conv (torchvision's "v1.5"); the paper strides the first
    1x1, which skips 3/4 of its input. Same parameters, slightly better accuracy.
    """
    cfg: ResNetConfig
    width: int
    strides: int
    train: bool

    @nn.compact
    def __call__(self, x):
        L = _Layers(self.cfg, self.train)
        zero = self.cfg.zero_init_residual
        if self.cfg.block == "basic":
            out = self.width
            y = nn.relu(L.norm(name="bn1")(L.conv(self.width, 3, self.strides, name="conv1")(x)))
            y = L.norm(zero, name="bn2")(L.conv(self.width, 3, name="conv2")(y))
        else:
            out = 4 * self.width
            y = nn.relu(L.norm(name="bn1")(L.conv(self.width, 1, name="conv1")(x)))
            y = nn.relu(L.norm(name="bn2")(L.conv(self.width, 3, self.strides,
                                                  name="conv2")(y)))
            y = L.norm(zero, name="bn3")(L.conv(out, 1, name="conv3")(y))
        if self.strides != 1 or x.shape[-1] != out:
            x = L.norm(name="shortcut_bn")(L.conv(out, 1, self.strides, name="shortcut")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """images [B, H, W, C] -> logits [B, num_classes] float32 (num_classes=0: features
    [B, cfg.feature_dim] float32, also sown as intermediates/pre_logits).

    Params/batch_stats: stem_conv, stem_bn, stage{i}_block{j}/{conv1, bn1, ...}, head.
    """
    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        cfg = self.cfg
        L = _Layers(cfg, train)
        x = images.astype(L.dtype)
        if cfg.stem == "imagenet":
            x = nn.relu(L.norm(name="stem_bn")(L.conv(cfg.widths[0], 7, 2,
                                                      name="stem_conv")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:  # the paper's CIFAR-10 networks (section 4.2): one 3x3 conv, no pooling
            x = nn.relu(L.norm(name="stem_bn")(L.conv(cfg.widths[0], 3, name="stem_conv")(x)))
        for i, (n, width) in enumerate(zip(cfg.stage_sizes, cfg.widths)):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1  # downsample entering stages 2..
                x = ResidualBlock(cfg, width, strides, train, name=f"stage{i}_block{j}")(x)
            x = partitioning.constrain(x, _IMAGE_ACTIVATION)  # each stage's output
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(L.dtype)  # global avg pool
        self.sow("intermediates", "pre_logits", x)
        return L.head(x)


# ----------------------------------------------------------------------------------------
# EfficientNet: MBConv blocks (depthwise separable convolutions + squeeze-and-excitation).
# ----------------------------------------------------------------------------------------
# Depthwise separable convolution (MobileNet, Howard et al. 2017, sec. 3.1): a k x k conv
# from C_in to C_out channels costs k*k*C_in*C_out multiply-adds per output pixel. Splitting
# it into a depthwise k x k conv (one filter per channel: feature_group_count = C_in, k*k*C_in)
# and a pointwise 1x1 conv mixing channels (C_in*C_out) costs k*k*C_in + C_in*C_out, i.e.
# a fraction 1/C_out + 1/k^2 of the full conv: ~8-9x fewer for 3x3 kernels (same factor
# for parameters).
class SeparableConv(nn.Module):
    """Depthwise k x k (stride s) then pointwise 1x1: [B, H, W, C] -> [B, H/s, W/s, features].

    Kernels: depthwise [k, k, 1, C], pointwise [1, 1, C, features]; no bias, no activation
    (MobileNet puts BN + ReLU after each; MBConv below interleaves them itself).
    """
    features: int
    kernel_size: int = 3
    strides: int = 1
    cfg: Any = None  # EfficientNetConfig (dtypes, init, hooks); None = float32 defaults

    @nn.compact
    def __call__(self, x):
        L = _Layers(self.cfg or EfficientNetConfig(), train=False)
        x = L.conv(x.shape[-1], self.kernel_size, self.strides, groups=x.shape[-1],
                   name="depthwise")(x)
        return L.conv(self.features, 1, name="pointwise")(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): x [B, H, W, C] -> x * gate [B, 1, 1, C],
    gate = sigmoid(W2 act(W1 mean_hw(x) + b1) + b2), W1: C -> reduced, W2: reduced -> C.

    SENet uses ReLU for `act`; EfficientNet uses swish. Dense layers on the pooled vector
    are the 1x1 convs of the reference code (same parameters).
    """
    reduced: int
    activation: Callable = nn.silu
    cfg: Any = None

    @nn.compact
    def __call__(self, x):
        L = _Layers(self.cfg or EfficientNetConfig(), train=False)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)   # squeeze
        s = self.activation(L.dense(self.reduced, name="reduce")(s))        # excitation
        s = nn.sigmoid(L.dense(x.shape[-1], name="expand")(s))
        return x * s[:, None, None, :]                                       # scale


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2 / EfficientNet): [B, H, W, C_in] -> [B, H/s,
    W/s, C_out]:  expand 1x1 (C_in -> e*C_in, skipped for e=1) -> BN -> swish ->
    depthwise k x k /s -> BN -> swish -> SE -> project 1x1 -> BN (linear: no activation,
    MobileNetV2's "linear bottleneck") -> + x (stochastic depth) when s=1 and C_in = C_out.
    """
    cfg: Any
    features: int
    expand_ratio: int
    kernel_size: int
    strides: int
    drop_path: float
    train: bool

    @nn.compact
    def __call__(self, x):
        cfg, L = self.cfg, _Layers(self.cfg, self.train)
        c_in = x.shape[-1]
        hidden = c_in * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.silu(L.norm(name="expand_bn")(L.conv(hidden, 1, name="expand_conv")(y)))
        y = L.conv(hidden, self.kernel_size, self.strides, groups=hidden,
                   name="depthwise_conv")(y)
        y = nn.silu(L.norm(name="depthwise_bn")(y))
        if cfg.se_ratio > 0:  # the SE bottleneck is sized from the block's *input* width
            y = SqueezeExcite(max(1, int(c_in * cfg.se_ratio)), cfg=cfg, name="se")(y)
        y = L.norm(name="project_bn")(L.conv(self.features, 1, name="project_conv")(y))
        if self.strides != 1 or c_in != self.features:
            return y
        if self.train and self.drop_path > 0:
            # Stochastic depth (Huang et al. 2016): drop the residual branch per example.
            keep = 1.0 - self.drop_path
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
            y = jnp.where(mask, y / keep, 0).astype(y.dtype)
        return x + y


# EfficientNet-B0 (Tan & Le 2019, Table 1), one row per stage:
# (expand_ratio, kernel, stride of the first block, output channels, repeats).
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet hyper-parameters (defaults: B0). Compound scaling (the paper's sec. 3.3)
    multiplies channels by width_mult (rounded to multiples of 8) and repeats by depth_mult
    (rounded up); the resolution is the input's (B0 224, B1 240, B2 260, B3 300)."""
    width_mult: float = 1.0
    depth_mult: float = 1.0
    stem_width: int = 32                 # before width scaling
    head_width: int = 1280               # 1x1 conv before pooling; 0 = none (features are
                                         # then the last block's output)
    se_ratio: float = 0.25               # SE bottleneck = se_ratio * block input channels
    dropout: float = 0.2                 # before the classifier
    drop_path: float = 0.2               # stochastic depth, linearly increasing per block
    num_classes: int = 0                 # 0: no head, return pooled features
    bn_momentum: float = 0.99            # the paper's TF setting (PyTorch momentum 0.01)
    bn_epsilon: float = 1e-3
    bn_running_variance: str = "biased"  # "biased" (flax) | "unbiased" (PyTorch)
    head_zero_init: bool = True
    kernel_init: str = "he_normal"
    dtype: str = "float32"               # compute dtype
    param_dtype: str = "float32"
    dot_general: Callable = lax.dot_general                    # SE and head matmuls
    conv_general_dilated: Callable = lax.conv_general_dilated  # every conv

    def __post_init__(self):
        _check_common(self, {})
        for key in ("width_mult", "depth_mult", "stem_width"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.head_width < 0:
            raise ValueError(f"model.head_width must be >= 0 (0 = no head conv), got "
                             f"{self.head_width}")
        for key in ("se_ratio", "dropout", "drop_path"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")

    def replace(self, **changes) -> "EfficientNetConfig":
        return dataclasses.replace(self, **changes)

    def channels(self, filters: int) -> int:
        """The reference's round_filters: filters * width_mult to a multiple of 8, never
        more than 10% below the unrounded value."""
        f = filters * self.width_mult
        rounded = max(8, int(f + 4) // 8 * 8)
        return int(rounded + 8 if rounded < 0.9 * f else rounded)

    def repeats(self, n: int) -> int:
        return int(math.ceil(self.depth_mult * n))

    @property
    def feature_dim(self) -> int:
        return self.channels(self.head_width if self.head_width else B0_STAGES[-1][3])


EFFICIENTNET_VARIANTS: dict[str, dict[str, Any]] = {
    # tiny: B0's layout at 1/4 width, one block per stage, no stochastic regularization.
    "tiny": dict(width_mult=0.25, depth_mult=0.25, dropout=0.0, drop_path=0.0,
                 bn_momentum=0.9),
    "b0": dict(width_mult=1.0, depth_mult=1.0, dropout=0.2),
    "b1": dict(width_mult=1.0, depth_mult=1.1, dropout=0.2),
    "b2": dict(width_mult=1.1, depth_mult=1.2, dropout=0.3),
    "b3": dict(width_mult=1.2, depth_mult=1.4, dropout=0.3),
}


def make_efficientnet_config(variant: str, **overrides) -> EfficientNetConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(EfficientNetConfig, EFFICIENTNET_VARIANTS, variant, overrides,
                                 "efficientnet")


class EfficientNet(nn.Module):
    """images [B, H, W, C] -> logits [B, num_classes] float32 (num_classes=0: features
    [B, cfg.feature_dim] float32, also sown as intermediates/pre_logits).

    Params/batch_stats: stem_conv, stem_bn, block{k}/{expand_conv, depthwise_conv, se,
    project_conv, *_bn}, head_conv, head_bn, head.
    """
    cfg: EfficientNetConfig

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        cfg = self.cfg
        L = _Layers(cfg, train)
        x = images.astype(L.dtype)
        x = nn.silu(L.norm(name="stem_bn")(L.conv(cfg.channels(cfg.stem_width), 3, 2,
                                                  name="stem_conv")(x)))
        blocks = [(e, k, s if r == 0 else 1, cfg.channels(c))
                  for e, k, s, c, n in B0_STAGES for r in range(cfg.repeats(n))]
        for i, (e, k, s, c) in enumerate(blocks):
            x = MBConv(cfg, c, e, k, s, cfg.drop_path * i / len(blocks), train,
                       name=f"block{i}")(x)
            x = partitioning.constrain(x, _IMAGE_ACTIVATION)
        if cfg.head_width:
            x = nn.silu(L.norm(name="head_bn")(L.conv(cfg.channels(cfg.head_width), 1,
                                                      name="head_conv")(x)))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(L.dtype)
        self.sow("intermediates", "pre_logits", x)
        if cfg.num_classes:
            x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
        return L.head(x)

