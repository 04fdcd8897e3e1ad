"""Contrastive language-image models: CLIP, ALIGN and SigLIP as configurations of one module.

  CLIP   (Radford et al. 2021): ViT image tower, causal transformer text tower pooled at
         the end-of-text token, linear projections, learnable temperature.
  ALIGN  (Jia et al. 2021): EfficientNet image tower with global pooling, BERT-style
         bidirectional text tower pooled at the [CLS] (first) token.
  SigLIP (Zhai et al. 2023): the same towers with a sigmoid loss, which adds a learnable
         bias and starts the scale at 10 and the bias at -10.

`ClipModel(cfg)(images [B, H, W, C], texts int [B, L], train=False)` returns
  {"image": [B, E], "text": [B, E]}  L2-normalized float32 embeddings,
  "logit_scale": exp(t) clipped at logit_scale_max (CLIP: 100), "logit_bias": b or None.
`encode_image` / `encode_text` embed one side (zero-shot classification, retrieval).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import cnn, transformer, variants, vit
from models.layers import partitioning

IMAGE_TOWERS = ("vit", "resnet", "efficientnet")
TEXT_POOLING = ("eot", "cls", "mean")


def _derived(*names):
    """Field metadata: these fields of the nested config are set by ClipConfig itself."""
    return {"derived": names}


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Both towers' configs plus the joint-space settings.

    vocab_size, image_size and channels come from the dataset and are copied into the
    towers (text.vocab_size, vit.image_size/channels); the towers' num_classes is 0.
    The ViT tower nests its own encoder: `model.vit.encoder.num_layers` in a run config,
    `make_config("clip_tiny", vit=dict(encoder=dict(num_layers=4)))` in Python.
    """
    image_tower: str = "vit"
    vit: vit.ViTConfig = dataclasses.field(
        default_factory=lambda: vit.make_config("tiny/4"),
        metadata=_derived("image_size", "channels", "num_classes"))
    resnet: cnn.ResNetConfig = dataclasses.field(
        default_factory=lambda: cnn.make_resnet_config("resnet_tiny"),
        metadata=_derived("num_classes"))
    efficientnet: cnn.EfficientNetConfig = dataclasses.field(
        default_factory=lambda: cnn.make_efficientnet_config("tiny"),
        metadata=_derived("num_classes"))
    text: transformer.TransformerConfig = dataclasses.field(
        default_factory=lambda: transformer.make_config("tiny", max_length=48),
        metadata=_derived("vocab_size"))
    text_causal: bool = True       # CLIP: causal mask; ALIGN/BERT: bidirectional
    text_pooling: str = "eot"      # "eot": hidden state at the first eos_id; "cls": token 0;
                                   # "mean": average over the real (non-pad) tokens
    eos_id: int = 2
    embed_dim: int = 64            # joint embedding width
    logit_scale_init: float = math.log(1 / 0.07)   # CLIP: temperature 0.07
    logit_scale_max: float = 100.0                 # CLIP clips the scale at 100
    logit_bias_init: float | None = None           # SigLIP: -10 (None: no bias)
    vocab_size: int = 260
    image_size: int = 32
    channels: int = 3

    def __post_init__(self):
        variants.check_one_of("model", "image_tower", self.image_tower, IMAGE_TOWERS)
        variants.check_one_of("model", "text_pooling", self.text_pooling, TEXT_POOLING)
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.logit_scale_max <= 0 or math.log(self.logit_scale_max) < self.logit_scale_init:
            raise ValueError(f"model.logit_scale_init={self.logit_scale_init} must be <= "
                             f"log(model.logit_scale_max={self.logit_scale_max})")

    def replace(self, **changes) -> "ClipConfig":
        """dataclasses.replace, where a dict for a tower updates that tower's fields."""
        return variants.replace(self, changes, "clip")

    @property
    def text_config(self) -> transformer.TransformerConfig:
        return self.text.replace(vocab_size=self.vocab_size)

    @property
    def image_config(self):
        if self.image_tower == "vit":
            return dataclasses.replace(self.vit, image_size=self.image_size,
                                       channels=self.channels, num_classes=0)
        return dataclasses.replace(getattr(self, self.image_tower), num_classes=0)


# Named configurations (model.variant). "tiny" sizes train on 2 CPU cores in minutes.
VARIANTS: dict[str, dict[str, Any]] = {
    "clip_tiny": dict(),
    "siglip_tiny": dict(logit_scale_init=math.log(10.0), logit_bias_init=-10.0),
    # ALIGN learns its temperature too; starting it at 1.0 (scale 1) was measured to leave
    # the scale at 2.3 after 1500 steps with zero-shot at chance level, so it starts where
    # CLIP's does (0.07).
    "align_tiny": dict(image_tower="efficientnet", text_causal=False, text_pooling="cls"),
    "clip_resnet_tiny": dict(image_tower="resnet"),
    "clip_b16": dict(vit=vit.make_config("B/16"), embed_dim=512, image_size=224,
                     text=transformer.make_config("base", max_length=77)),
}


def make_config(variant: str, **overrides) -> ClipConfig:
    return variants.from_variant(ClipConfig, VARIANTS, variant, overrides, "clip")


class TextTower(nn.Module):
    """tokens int [B, L] (pad_id padding) -> pooled hidden state [B, d_model]."""
    cfg: transformer.TransformerConfig
    causal: bool
    pooling: str
    eos_id: int

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        cfg = self.cfg
        valid = tokens != cfg.pad_id
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = transformer.Embedder(cfg, name="embed")(tokens, positions,
                                                    deterministic=not train)
        # A causal tower needs no key padding mask: right padding follows every real token,
        # so no real position attends to it. Without the mask, a checkpoint whose
        # pad_token_id is a real token (CLIP's config says 1, a quote mark, while its
        # tokenizer pads with end-of-text) reads every token as transformers does. And no
        # mask at all (not an all-ones one) gives the fused path cuDNN's plain causal kernel.
        attend = None if self.causal else valid
        x = transformer.TransformerStack(cfg, cfg.num_layers, causal=self.causal,
                                         name="encoder")(x, attend, deterministic=not train)
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "mean":
            w = valid[..., None].astype(x.dtype)
            return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        # CLIP pools at the end-of-text token; rows without one use their last real token.
        is_eos = tokens == self.eos_id
        last_real = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        index = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), last_real)
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def _image_tower(cfg: ClipConfig) -> nn.Module:
    tower_cls = {"vit": vit.ViT, "resnet": cnn.ResNet, "efficientnet": cnn.EfficientNet}
    return tower_cls[cfg.image_tower](cfg.image_config, name="image_tower")


def _l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class ClipModel(nn.Module):
    """Two towers, linear projections to a shared space, temperature (and bias)."""
    cfg: ClipConfig

    def setup(self):
        cfg = self.cfg
        text_cfg = cfg.text_config
        self.image_tower = _image_tower(cfg)
        self.text_tower = TextTower(text_cfg, cfg.text_causal, cfg.text_pooling, cfg.eos_id)
        # Projections [tower features, embed_dim]: the tower's width is the named axis.
        dense = lambda name: nn.Dense(cfg.embed_dim, use_bias=False,  # noqa: E731
                                      kernel_init=partitioning.boxed(
                                          nn.initializers.lecun_normal(), ("embed", None)),
                                      dot_general=text_cfg.dot_general, name=name)
        self.image_projection = dense("image_projection")
        self.text_projection = dense("text_projection")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(
            cfg.logit_scale_init), ())
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(
                cfg.logit_bias_init), ())

    def encode_image(self, images, *, train: bool = False):
        """images [B, H, W, C] -> L2-normalized [B, embed_dim] float32."""
        return _l2_normalize(self.image_projection(self.image_tower(images, train=train)))

    def image_features(self, images, *, train: bool = False):
        """The image tower's pooled features [B, feature_dim] (before the projection)."""
        return self.image_tower(images, train=train)

    def encode_text(self, texts, *, train: bool = False):
        """tokens int [B, L] -> L2-normalized [B, embed_dim] float32."""
        return _l2_normalize(self.text_projection(self.text_tower(texts, train=train)))

    def scales(self):
        """(logit_scale, logit_bias or None): exp(t) clipped at logit_scale_max."""
        scale = jnp.exp(jnp.minimum(self.logit_scale, math.log(self.cfg.logit_scale_max)))
        bias = self.logit_bias if self.cfg.logit_bias_init is not None else None
        return scale, bias

    def __call__(self, images, texts, *, train: bool = False):
        scale, bias = self.scales()
        return {"image": self.encode_image(images, train=train),
                "text": self.encode_text(texts, train=train),
                "logit_scale": scale, "logit_bias": bias}
