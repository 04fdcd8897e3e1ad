"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

  images [B, H, W, C] -> patches [B, N, P*P*C]            N = (H/P) * (W/P), row-major
        -> patch embedding [B, N, D]                      x_p E + b (a P x P / stride P conv)
        -> [x_class; ...] + E_pos  [B, N+1, D]            eq. 1 (no class token: [B, N, D])
        -> pre-norm transformer encoder (L blocks) + LN   eqs. 2-4, models.transformer
        -> pool: token 0 ("cls", eq. 4) or mean over tokens ("gap")   [B, D]
        -> optional pre-logits tanh(Dense(representation_size))        [B, R]
        -> head Dense(num_classes) -> logits [B, num_classes] float32
           (num_classes=0: no head, the pooled features [B, D or R] float32 are returned)

The encoder is `models.transformer.TransformerStack` (bidirectional, pre-norm, exact GELU,
LayerNorm eps 1e-6 as in the reference code) configured by the nested `ViTConfig.encoder`
(`model.encoder.num_layers`, `model.encoder.d_model`, ... in a run config).
Variants are decoded from big_vision-style strings: "<size>/<patch>", e.g. "B/16".
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import transformer, variants
from models.layers import normalization, partitioning

POOLS = ("cls", "gap")


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """images [B, H, W, C] -> patches [B, (H/P)*(W/P), P*P*C].

    Patch n = i * (W/P) + j is the pixel block images[:, iP:(i+1)P, jP:(j+1)P, :] flattened
    in (row, column, channel) order -- the order of a conv kernel [P, P, C, D] reshaped to
    [P*P*C, D], so `patchify(x) @ kernel.reshape(-1, D)` is the stride-P convolution.
    """
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)                 # [B, H/P, W/P, P, P, C]
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: [B, N, P*P*C] -> images [B, height, width, C]."""
    b, n, d = patches.shape
    gh, gw = height // patch, width // patch
    if gh * gw != n or d % (patch * patch):
        raise ValueError(f"{n} patches of size {d} do not tile a {height}x{width} image "
                         f"with patch size {patch}")
    c = d // (patch * patch)
    x = patches.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def encoder_config(**fields) -> transformer.TransformerConfig:
    """The ViT encoder's TransformerConfig: bidirectional pre-norm blocks with exact GELU,
    LayerNorm eps 1e-6 and Xavier-uniform kernels as in the reference code, at the "tiny"
    size unless `fields` say otherwise (ViTConfig sets the STACK_DERIVED fields)."""
    return transformer.TransformerConfig(**{
        **dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256, activation="gelu",
               norm="layernorm", norm_position="pre", norm_epsilon=1e-6, use_bias=True,
               kernel_init="xavier_uniform", position="none", vocab_size=1), **fields})


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT hyper-parameters (defaults: the "tiny/4" test model on 32x32 images).

    `encoder` is the transformer's config: d_model is D (the token width), num_layers L,
    dropout_rate applies after the embeddings too, and dtype / param_dtype / kernel_init /
    init_stddev also serve the patch embedding, pre-logits and head. Its STACK_DERIVED fields
    (no token or position table: ViT adds its own learned E_pos; max_length = num_tokens;
    the matmul hook = `dot_general`) are set here.
    """
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    pool: str = "cls"                       # "cls" (class token, eq. 4) | "gap" (mean)
    num_classes: int = 0                    # 0: no head, return pooled features
    representation_size: int | None = None  # pre-logits tanh layer (paper: pre-training)
    head_zero_init: bool = True             # logits start at 0 (paper, fine-tuning)
    pre_norm: bool = False                  # CLIP: a LayerNorm over the embedded tokens
                                            # before the encoder (its "pre_layrnorm")
    encoder: transformer.TransformerConfig = dataclasses.field(
        default_factory=encoder_config, metadata={"derived": transformer.STACK_DERIVED})
    dot_general: Callable = lax.dot_general  # every matmul (patch embedding included)

    def __post_init__(self):
        variants.check_one_of("model", "pool", self.pool, POOLS)
        for key in ("image_size", "patch_size", "channels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size ({self.image_size}) must be divisible by "
                             f"model.patch_size ({self.patch_size})")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0 (0 = no head), got "
                             f"{self.num_classes}")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError("model.representation_size must be positive or None, got "
                             f"{self.representation_size}")
        # Frozen, so set through object.__setattr__; replace() re-derives (e.g. num_tokens).
        object.__setattr__(self, "encoder", transformer.stack_config(
            self.encoder, self.num_tokens, self.dot_general))

    def replace(self, **changes) -> "ViTConfig":
        """dataclasses.replace, where a dict for `encoder` updates the encoder's fields."""
        return variants.replace(self, changes, "vit")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pool == "cls")

    @property
    def feature_dim(self) -> int:
        """Width of the features returned with num_classes=0 (and sown as pre_logits)."""
        return self.representation_size or self.encoder.d_model


# Encoder sizes from the paper (Table 1: width D = d_model, depth L = num_layers) and
# big_vision (Ti, S). mlp_dim = 4 * d_model throughout.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256),   # tests / CPU runs
    "Ti": dict(d_model=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S": dict(d_model=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "H": dict(d_model=1280, num_layers=32, num_heads=16, mlp_dim=5120),
}
# Default input resolution per size: ImageNet's 224 except the CPU-sized test model.
_IMAGE_SIZE = {"tiny": 32}
# Documentation / error messages; any "<size>/<patch>" decodes (e.g. "S/8").
VARIANTS = ("tiny/4", "Ti/16", "S/16", "S/32", "B/16", "B/32", "L/16", "L/32", "H/14")


def decode_variant(variant: str) -> dict[str, Any]:
    """"B/16" -> dict(encoder=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
    patch_size=16, image_size=224)."""
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
    if not match:
        raise ValueError(f"ViT variant {variant!r} is not of the form '<size>/<patch>'; "
                         f"e.g. {', '.join(VARIANTS)}")
    size, patch = match.group(1), int(match.group(2))
    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r} in variant {variant!r}; allowed sizes: "
                         f"{', '.join(SIZES)} (variants like {', '.join(VARIANTS)})")
    return dict(encoder=dict(SIZES[size]), patch_size=patch,
                image_size=_IMAGE_SIZE.get(size, 224))


def make_config(variant: str, **overrides) -> ViTConfig:
    """The decoded variant's config with `overrides` applied (unknown names raise); a dict
    for `encoder` updates the variant's encoder, e.g. encoder=dict(dropout_rate=0.1)."""
    return variants.build(ViTConfig, [decode_variant(variant), overrides], "vit")


class PatchEmbedding(nn.Module):
    """images [B, H, W, C] -> [B, N, features]: the stride-P, P x P convolution, computed as
    patchify + one matmul through `dot_general` (so quantization hooks see it).

    The kernel keeps the conv layout [P, P, C, features] (as in the reference checkpoints);
    lecun_normal is flax's nn.Conv default, used by the reference implementation.
    """
    patch: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = images.shape[-1]
        kernel = self.param("kernel", partitioning.boxed(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")),
                            (self.patch, self.patch, c, self.features), self.param_dtype)
        bias = self.param("bias", partitioning.boxed(nn.initializers.zeros, ("embed",)),
                          (self.features,), self.param_dtype)
        x = patchify(images.astype(self.dtype), self.patch)
        w = kernel.reshape(-1, self.features).astype(self.dtype)
        y = self.dot_general(x, w, (((2,), (0,)), ((), ())))
        return y + bias.astype(self.dtype)


class ViT(nn.Module):
    """images [B, H, W, C] -> logits [B, num_classes] float32, or features [B, D] float32
    when cfg.num_classes == 0 (D = representation_size or encoder.d_model; see module
    docstring).

    Sown into `intermediates`: "encoded" [B, T, encoder.d_model] (after the final LayerNorm) and
    "pre_logits" [B, D] (the head's input).
    """
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        cfg, enc = self.cfg, self.cfg.encoder
        dtype, pdtype, width = jnp.dtype(enc.dtype), jnp.dtype(enc.param_dtype), enc.d_model
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            # The learned position table has one row per patch of an image_size image.
            raise ValueError(f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                             f"(model.image_size, model.channels), got {images.shape}")
        x = PatchEmbedding(cfg.patch_size, width, dtype=dtype, param_dtype=pdtype,
                           dot_general=cfg.dot_general, name="embedding")(images)
        if cfg.pool == "cls":
            # Eq. 1: a learnable token z_0^0 = x_class prepended to the patch sequence; its
            # final state is the image representation (eq. 4). Zero init as in the reference.
            cls = self.param("cls", partitioning.boxed(nn.initializers.zeros,
                                                       (None, None, "embed")),
                             (1, 1, width), pdtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1,
                                                                      width)), x], 1)
        # Eq. 1: E_pos has one row per token (the class token included), 1-D and learned.
        pos = self.param("pos_embedding",
                         partitioning.boxed(nn.initializers.normal(stddev=0.02),
                                            (None, "position", "embed")),
                         (1, cfg.num_tokens, width), pdtype)
        x = nn.Dropout(enc.dropout_rate)(x + pos.astype(dtype), deterministic=not train)
        if cfg.pre_norm:
            x = normalization.make_norm(enc.norm, epsilon=enc.norm_epsilon, dtype=dtype,
                                        param_dtype=pdtype, name="pre_norm")(x)
        # The stack's final LayerNorm is the LN of eq. 4 (applied to every token; for "gap"
        # the mean is taken after it, as in big_vision).
        x = transformer.TransformerStack(enc, enc.num_layers, name="encoder")(
            x, deterministic=not train)
        self.sow("intermediates", "encoded", x)
        x = x[:, 0] if cfg.pool == "cls" else jnp.mean(x, axis=1)
        if cfg.representation_size:
            x = nn.Dense(cfg.representation_size, dtype=dtype, param_dtype=pdtype,
                         kernel_init=partitioning.boxed(enc.init, ("embed", None)),
                         bias_init=partitioning.boxed(nn.initializers.zeros_init(), (None,)),
                         dot_general=cfg.dot_general, name="representation")(x)
            x = jnp.tanh(x)
        self.sow("intermediates", "pre_logits", x)
        if cfg.num_classes == 0:
            return x.astype(jnp.float32)
        head_init = nn.initializers.zeros if cfg.head_zero_init else enc.init
        logits = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=pdtype,
                          kernel_init=partitioning.boxed(head_init, ("embed", "classes")),
                          bias_init=partitioning.boxed(nn.initializers.zeros_init(),
                                                       ("classes",)),
                          dot_general=cfg.dot_general, name="head")(x)
        return logits.astype(jnp.float32)
