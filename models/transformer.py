"""The transformer family: BERT-style encoder, GPT-style decoder, encoder-decoder.

One `TransformerConfig` describes all three; named size variants (`VARIANTS`) fill it in.

  Encoder         tokens [B, L] -> MLM logits [B, L, vocab] | class logits [B, classes] |
                  pooled [B, d] | hidden [B, L, d]   (bidirectional, padding ignored)
  Decoder         tokens [B, L] -> next-token logits [B, L, vocab] (causal; KV cache with
                  `decode=True`, see models/decoding.py for generation)
  EncoderDecoder  (inputs [B, S], decoder tokens [B, T]) -> logits [B, T, vocab]
                  ("Attention Is All You Need": decoder blocks cross-attend to the encoder)

Blocks are pre-norm (x + f(norm(x)), GPT-2) or post-norm (norm(x + f(x)), the original
paper). Layers can be unrolled (params `layers_0..layers_{n-1}`) or scanned with `nn.scan`
(params stacked under `layers` with a leading [num_layers] axis; `stack_layers` /
`unstack_layers` convert), optionally rematerialized with a named checkpoint policy.
Logits are float32 whatever the compute dtype. Token id `pad_id` marks padding.

Every parameter carries logical axis names (models/layers/partitioning.py): kernels
("embed", "mlp"), ("embed", "heads", "kv"), ..., scanned layers a leading "layers" axis;
the hidden states are constrained to ("batch", "length", "activation_embed") after the
embedding and each block (a no-op outside `partitioning.axis_rules`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import gates, initializers, partitioning
from models.layers.attention import IMPLEMENTATIONS, MultiHeadAttention
from models.layers.embedding import POSITION_KINDS, Embed, PositionEmbedding
from models.layers.mlp import ACTIVATIONS, MlpBlock, get_activation
from models.layers.moe import MoeBlock, MoeConfig
from models.layers.normalization import NORMS, ChannelWeightedNorm, make_norm

# Logical axes of the hidden states [batch, length, d_model].
_HIDDEN = ("batch", "length", "activation_embed")

REMAT_POLICIES: dict[str, Any] = {
    "none": None,                                   # no rematerialization
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters shared by the encoder, decoder and encoder-decoder."""
    vocab_size: int = 260
    num_layers: int = 2
    num_decoder_layers: int | None = None   # encoder-decoder only; default num_layers
    num_heads: int = 2
    num_kv_heads: int | None = None         # < num_heads: grouped-query attention
    head_dim: int | None = None             # None: d_model // num_heads (a model with
                                            # heads removed keeps its head width)
    unit_gates: bool = False                # learnable L0 gates on every self-attention
                                            # head and MLP unit, and on each layer's
                                            # attention and MLP (automatic inheritance)
    channel_gates: bool = False             # a learnable L0 gate per residual channel,
                                            # shared by all layers (automatic width)
    hint_dim: int = 0                       # > 0: a linear regressor from the stack's
                                            # output to this width (FitNets' hint layer:
                                            # distill.hidden_weight to a wider teacher)
    d_model: int = 64
    mlp_dim: int = 256
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)  # moe.every > 0: sparse
                                            # mixture-of-experts MLPs (models/layers/moe.py)
    max_length: int = 128                   # learned position table size / longest input
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_position: str = "pre"              # "pre" (GPT-2) or "post" (Vaswani et al.)
    norm_epsilon: float = 1e-5
    position: str = "learned"               # "learned" | "sinusoidal" | "none"
    scale_embeddings: bool = False          # multiply token embeddings by sqrt(d_model)
    tie_embeddings: bool = True             # unembedding = token embedding transposed
    type_vocab_size: int = 0                # BERT's token-type (segment) table; 0 = none
    embed_norm: bool = False                # a norm over the summed embeddings (BERT)
    fused_qkv: bool = False
    use_bias: bool = True
    kernel_init: str = "normal"
    init_stddev: float = 0.02
    attention_impl: str = "reference"       # "reference" | "fused"
    dtype: str = "float32"                  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    pad_id: int = 0
    num_classes: int = 0                    # encoder classification head
    dot_general: Callable = lax.dot_general  # every matmul goes through this hook

    def __post_init__(self):
        for key, allowed in (("attention_impl", IMPLEMENTATIONS), ("norm", NORMS),
                             ("norm_position", ("pre", "post")), ("position", POSITION_KINDS),
                             ("remat_policy", REMAT_POLICIES),
                             ("kernel_init", initializers.NAMES), ("activation", ACTIVATIONS),
                             ("dtype", variants.DTYPES), ("param_dtype", variants.DTYPES)):
            variants.check_one_of("model", key, getattr(self, key), allowed)
        for key in ("vocab_size", "num_layers", "num_heads", "d_model", "mlp_dim",
                    "max_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                             f"model.num_heads ({self.num_heads}), or set model.head_dim")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"model.head_dim must be positive (or None), got {self.head_dim}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.num_kv_heads ({kv})")
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError("model.num_decoder_layers must be positive (or None = "
                             f"num_layers), got {self.num_decoder_layers}")
        if self.scan_layers and self.moe.every > 1:
            raise ValueError(f"model.moe.every={self.moe.every} mixes dense and MoE layers, "
                             "which a scanned stack cannot (its layers are one function); "
                             "allowed with model.scan_layers: moe.every 0 or 1")
        if self.moe.every and (self.unit_gates or self.channel_gates):
            raise ValueError("model.unit_gates / channel_gates size a dense MLP's units for "
                             "weight inheritance; allowed with model.moe.every > 0: both "
                             "False")
        if self.hint_dim < 0:
            raise ValueError(f"model.hint_dim must be >= 0 (0 = no hint regressor), got "
                             f"{self.hint_dim}")
        if self.type_vocab_size < 0:
            raise ValueError(f"model.type_vocab_size must be >= 0 (0 = no token types), "
                             f"got {self.type_vocab_size}")
        for key in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.attention_impl == "fused" and self.attention_dropout_rate > 0:
            raise ValueError(f"model.attention_dropout_rate={self.attention_dropout_rate} needs "
                             "model.attention_impl='reference' (the fused kernels have no "
                             "dropout); or set model.attention_dropout_rate=0")

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def init(self) -> Callable:
        return initializers.get(self.kernel_init, self.init_stddev)


# Named sizes. gpt2_small is GPT-2 "small" (124M with its 50257-token vocabulary).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_length=64),
    "mini": dict(num_layers=4, num_heads=4, d_model=128, mlp_dim=512, max_length=256),
    "small": dict(num_layers=6, num_heads=8, d_model=512, mlp_dim=2048, max_length=512),
    "base": dict(num_layers=12, num_heads=12, d_model=768, mlp_dim=3072, max_length=512),
    "gpt2_small": dict(num_layers=12, num_heads=12, d_model=768, mlp_dim=3072,
                       max_length=1024, vocab_size=50257, activation="gelu_tanh"),
    "gpt2_medium": dict(num_layers=24, num_heads=16, d_model=1024, mlp_dim=4096,
                        max_length=1024, vocab_size=50257, activation="gelu_tanh"),
}


def make_config(variant: str, **overrides) -> TransformerConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(TransformerConfig, VARIANTS, variant, overrides,
                                 "transformer")


# The fields a bare TransformerStack never reads (token / position tables, heads, decoder
# depth) plus the matmul hook: a model that nests a TransformerConfig as the encoder over
# its own embeddings (ViT, PatchTST) sets these itself (`stack_config`), so they are its
# nested field's metadata["derived"] and are left out of the config section.
STACK_DERIVED = ("vocab_size", "max_length", "position", "num_decoder_layers",
                 "scale_embeddings", "tie_embeddings", "type_vocab_size", "embed_norm",
                 "pad_id", "num_classes", "dot_general")


def stack_config(cfg: TransformerConfig, num_tokens: int,
                 dot_general: Callable) -> TransformerConfig:
    """`cfg` as the config of a stack over `num_tokens` embedded tokens: no vocabulary
    (vocab_size=1), no position table (the parent adds its own), max_length=num_tokens,
    the parent's matmul hook, and the rest of STACK_DERIVED at their defaults."""
    return cfg.replace(vocab_size=1, max_length=num_tokens, position="none",
                       num_decoder_layers=None, scale_embeddings=False, tie_embeddings=True,
                       type_vocab_size=0, embed_norm=False, pad_id=0, num_classes=0,
                       dot_general=dot_general)


# ----------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------
def _attention(cfg: TransformerConfig, name: str, decode: bool = False,
               cross: bool = False) -> MultiHeadAttention:
    # fused_qkv applies to self-attention only: cross-attention projects the query and the
    # keys/values from different inputs, so it always keeps separate projections.
    return MultiHeadAttention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        fused_qkv=cfg.fused_qkv and not cross, head_gates=cfg.unit_gates and not cross,
        use_bias=cfg.use_bias, dropout_rate=cfg.attention_dropout_rate,
        implementation=cfg.attention_impl, decode=decode, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, kernel_init=cfg.init, dot_general=cfg.dot_general,
        name=name)


def _stack_norm(cfg: TransformerConfig, name: str, channels=None) -> Callable:
    """x -> the stack's norm of x (a submodule `name` of the calling module); with the
    channel gates' values `channels` [d], statistics over the open channels
    (ChannelWeightedNorm)."""
    kwargs = dict(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                  param_dtype=cfg.weight_dtype, name=name)
    if channels is None:
        return make_norm(cfg.norm, **kwargs)
    weighted = ChannelWeightedNorm(cfg.norm, **kwargs)
    return lambda x: weighted(x, channels)


class _Sublayer(nn.Module):
    """Residual wrapper: pre-norm x + drop(f(norm(x))) or post-norm norm(x + drop(f(x))).

    Gated (automatic inheritance, models/layers/gates.py): with `cfg.unit_gates` f's output
    is scaled by the sublayer's own gate (`layer_gate`: CoFi's whole-MHA / whole-FFN masks,
    Xia et al. 2022), and with `channels` z [d] (the stack's channel gates) the norm's
    statistics are over the open channels and the norm's and f's outputs are multiplied
    by z, so closed channels stay 0 in the residual stream (CoFi's hidden mask)."""
    cfg: TransformerConfig
    deterministic: bool
    gated: bool = True      # False: cross-attention, which the gates leave alone

    @nn.compact
    def __call__(self, x, fn, channels=None):
        cfg = self.cfg
        norm = _stack_norm(cfg, "norm", channels)
        drop = nn.Dropout(cfg.dropout_rate)

        def branch(h):
            out = fn(h)
            if cfg.unit_gates and self.gated:
                out = gates.UnitGate(1, name="layer_gate")(out, self.deterministic)
            if channels is not None:
                out = out * channels.astype(out.dtype)
            return drop(out, deterministic=self.deterministic)

        if cfg.norm_position == "pre":
            return x + branch(norm(x))
        return norm(x + branch(x))


class TransformerBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP, each a residual sublayer.

    x [B, L, d] -> [B, L, d]. `causal` selects decoder self-attention; `cross_attention`
    adds attention to `encoded` [B, S, d] (keys masked by `encoded_valid` [B, S]).
    With `scanned=True` the block returns (x, None), the carry/output pair nn.scan wants.
    `deterministic` and `decode` are Python bools (static under nn.remat / nn.scan).
    """
    cfg: TransformerConfig
    causal: bool = False
    cross_attention: bool = False
    scanned: bool = False
    moe: bool = False          # its MLP is a mixture of experts (cfg.moe)

    @nn.compact
    def __call__(self, x, valid=None, encoded=None, encoded_valid=None, channels=None,
                 deterministic: bool = True, decode: bool = False):
        cfg, det = self.cfg, deterministic
        self_attn = _attention(cfg, "self_attention", decode=decode)
        x = _Sublayer(cfg, det, name="attention_sublayer")(
            x, lambda h: self_attn(h, is_causal=self.causal, key_valid=valid,
                                   deterministic=det), channels)
        if self.cross_attention:
            cross_attn = _attention(cfg, "cross_attention", cross=True)
            x = _Sublayer(cfg, det, gated=False, name="cross_attention_sublayer")(
                x, lambda h: cross_attn(h, encoded, key_valid=encoded_valid,
                                        deterministic=det))
        if self.moe:
            experts = MoeBlock(cfg.moe, cfg.moe.mlp_dim or cfg.mlp_dim,
                               activation=cfg.activation, use_bias=cfg.use_bias,
                               dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                               kernel_init=cfg.init, dot_general=cfg.dot_general, name="moe")

            def mlp_fn(h):
                y, stats = experts(h, valid, deterministic=det)
                if not self.is_initializing():  # init's variables stay params only
                    self.sow(MOE_STATS, "stats", stats)  # the task adds the losses
                return y
        else:
            mlp = MlpBlock(cfg.mlp_dim, activation=cfg.activation,
                           dropout_rate=cfg.dropout_rate, use_bias=cfg.use_bias,
                           dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                           kernel_init=cfg.init, dot_general=cfg.dot_general,
                           unit_gates=cfg.unit_gates, name="mlp")

            def mlp_fn(h):
                return mlp(h, deterministic=det)
        x = _Sublayer(cfg, det, name="mlp_sublayer")(x, mlp_fn, channels)
        x = partitioning.constrain(x, _HIDDEN)
        return (x, None) if self.scanned else x


class TransformerStack(nn.Module):
    """`num_layers` blocks (unrolled or scanned) and, for pre-norm, a final norm. With
    `cfg.channel_gates` one gate per residual channel (`channel_gate`) masks the stack's
    input, every sublayer and the output."""
    cfg: TransformerConfig
    num_layers: int
    causal: bool = False
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, valid=None, encoded=None, encoded_valid=None, *,
                 deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        block_cls = TransformerBlock
        if cfg.remat_policy != "none":
            # static_argnums count `self` as 0: (deterministic, decode) are args 6 and 7.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=not cfg.scan_layers, static_argnums=(6, 7))
        kwargs = dict(cfg=cfg, causal=self.causal, cross_attention=self.cross_attention)
        channels = None
        if cfg.channel_gates:
            channels = gates.GateValues(x.shape[-1], name=CHANNEL_GATE)(deterministic)
            x = x * channels.astype(x.dtype)
        args = (valid, encoded, encoded_valid, channels, deterministic, decode)
        if cfg.scan_layers:
            scanned = nn.scan(block_cls,
                              variable_axes={"params": 0, "cache": 0, "intermediates": 0,
                                             MOE_STATS: 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=nn.broadcast, length=self.num_layers,
                              # the stacked axis of every boxed parameter is "layers"
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(**kwargs, scanned=True, moe=cfg.moe.every == 1,
                           name="layers")(x, *args)
        else:
            for i in range(self.num_layers):
                x = block_cls(**kwargs, moe=cfg.moe.in_layer(i), name=f"layers_{i}")(x, *args)
        if cfg.norm_position == "pre":
            x = _stack_norm(cfg, "final_norm", channels)(x)
        if cfg.unit_gates or cfg.channel_gates:  # the sparsity multiplier (distill_losses)
            self.param(gates.LAGRANGE, nn.initializers.zeros_init(), (1,), jnp.float32)
        if cfg.hint_dim:  # declared here, applied by the distillation loss to the output
            nn.Dense(cfg.hint_dim, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                     name=HINT)(x)
        return x


HINT = "hint"  # the hint regressor's module name inside a stack
MOE_STATS = "moe_stats"  # the collection MoE layers sow their routing statistics into
CHANNEL_GATE = "channel_gate"  # the residual channels' gates inside a stack
# The module names of the transformer stacks a Decoder / Encoder (or a tower) holds: code
# outside this file (inheritance, hidden-state distillation) finds a stack by them.
STACK_NAMES = ("decoder", "encoder")


def moe_config(model) -> MoeConfig | None:
    """The MoE fields of a Decoder / Encoder / EncoderDecoder whose layers have experts,
    else None."""
    if isinstance(model, (Decoder, Encoder, EncoderDecoder)) and model.cfg.moe.every:
        return model.cfg.moe
    return None


def stack_name(params: dict) -> str | None:
    """The key of the transformer stack among a model's top-level params, or None."""
    return next((k for k in STACK_NAMES if isinstance(params.get(k), dict)), None)


class Embedder(nn.Module):
    """Token + position (+ token-type) embedding, optionally normalized (BERT: LayerNorm
    over the sum, before dropout), and the tied unembedding, for one vocabulary."""
    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.tokens = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype,
                            embedding_init=initializers.get("normal", cfg.init_stddev),
                            dot_general=cfg.dot_general)
        if cfg.position != "none":
            self.positions = PositionEmbedding(
                cfg.position, cfg.max_length, cfg.d_model, dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
                embedding_init=initializers.get("normal", cfg.init_stddev))
        if cfg.type_vocab_size:
            self.token_types = Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                     param_dtype=cfg.weight_dtype,
                                     embedding_init=initializers.get("normal", cfg.init_stddev),
                                     dot_general=cfg.dot_general)
        if cfg.embed_norm:
            self.norm = make_norm(cfg.norm, epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.weight_dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, tokens, positions, deterministic: bool, token_types=None):
        """tokens, positions, token_types (default all 0) int [B, L] -> [B, L, d_model]."""
        x = self.tokens(tokens)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
        if self.cfg.position != "none":
            x = x + self.positions(positions)
        if self.cfg.type_vocab_size:
            x = x + self.token_types(jnp.zeros_like(tokens) if token_types is None
                                     else token_types)
        elif token_types is not None:
            raise ValueError("token_types given to a model with model.type_vocab_size=0")
        if self.cfg.embed_norm:
            x = self.norm(x)
        return partitioning.constrain(self.dropout(x, deterministic=deterministic), _HIDDEN)

    def attend(self, x):
        return self.tokens.attend(x)


def _check_tokens(tokens, cfg: TransformerConfig, what: str = "tokens"):
    if tokens.ndim != 2:
        raise ValueError(f"{what} must be int [batch, length], got shape {tokens.shape}")
    if cfg.position == "learned" and tokens.shape[1] > cfg.max_length:
        raise ValueError(f"{what} length {tokens.shape[1]} exceeds model.max_length "
                         f"{cfg.max_length} (the learned position table)")


class DecodePosition(nn.Module):
    """Per-example count of tokens already decoded, kept in the `cache` collection."""

    @nn.compact
    def __call__(self, num_new):
        """num_new int [B] tokens appended now -> their first position [B] (then advance)."""
        counter = self.variable("cache", "next_position", jnp.zeros, num_new.shape, jnp.int32)
        first = counter.value
        counter.value = first + num_new.astype(jnp.int32)
        return first


def _positions_from_valid(valid):
    """Position of each token counting only real tokens (left padding shifts nothing)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


class _Unembed(nn.Module):
    """Final projection to the vocabulary: tied (x E^T, no bias) or its own Dense (no bias)."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, embedder: Embedder):
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = embedder.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype,
                              kernel_init=partitioning.boxed(cfg.init, ("embed", "vocab")),
                              dot_general=cfg.dot_general, name="logits")(x)
        logits = partitioning.constrain(logits, ("batch", "length", "activation_vocab"))
        return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Decoder-only (GPT).
# ----------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """GPT-style causal language model: tokens [B, L] -> logits [B, L, vocab] (float32).

    `valid` (bool [B, L], default all True) masks padding keys -- needed for left-padded
    prompts; positions count real tokens only. With `decode=True` every call appends its
    tokens to the KV cache (create it with `models.decoding.init_decoder_cache`), and positions
    continue from the cached `next_position`.
    """
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens, *, valid=None, positions=None, train: bool = False,
                 decode: bool = False):
        cfg = self.cfg
        _check_tokens(tokens, cfg)
        valid_or_ones = jnp.ones(tokens.shape, bool) if valid is None else valid
        if positions is None:
            positions = _positions_from_valid(valid_or_ones)
            if decode:
                first = DecodePosition(name="position")(valid_or_ones.sum(axis=1))
                positions = positions + first[:, None]
        embedder = Embedder(cfg, name="embed")
        x = embedder(tokens, positions, deterministic=not train)
        x = TransformerStack(cfg, cfg.num_layers, causal=True, name="decoder")(
            x, valid, deterministic=not train, decode=decode)
        self.sow("intermediates", "final_hidden", x)
        return _Unembed(cfg, name="unembed")(x, embedder)


# ----------------------------------------------------------------------------------------
# Encoder (BERT).
# ----------------------------------------------------------------------------------------
ENCODER_HEADS = ("mlm", "classify", "pooled", "hidden")


class Encoder(nn.Module):
    """BERT-style bidirectional encoder.

    tokens [B, L] (padding = cfg.pad_id unless `valid` is given) -> by `head`:
      "mlm":      logits [B, L, vocab] (dense + activation + norm, tied unembedding + bias)
      "classify": logits [B, num_classes] from the pooled [CLS] (first) token
      "pooled":   [B, d_model], tanh(dense(h[:, 0])) as in BERT
      "hidden":   [B, L, d_model], the final hidden states
    Padded positions never influence real ones (their keys are masked).
    """
    cfg: TransformerConfig
    head: str = "mlm"

    @nn.compact
    def __call__(self, tokens, *, valid=None, token_types=None, train: bool = False):
        """token_types int [B, L] (BERT's segments; default 0) need model.type_vocab_size."""
        cfg = self.cfg
        if self.head not in ENCODER_HEADS:
            raise ValueError(f"unknown encoder head {self.head!r}; allowed: "
                             f"{', '.join(ENCODER_HEADS)}")
        _check_tokens(tokens, cfg)
        valid = tokens != cfg.pad_id if valid is None else valid
        embedder = Embedder(cfg, name="embed")
        x = embedder(tokens, _positions_from_valid(jnp.ones_like(valid)),
                     deterministic=not train, token_types=token_types)
        x = TransformerStack(cfg, cfg.num_layers, name="encoder")(
            x, valid, deterministic=not train)
        self.sow("intermediates", "final_hidden", x)
        def dense(n, name, out_axis=None):
            # The square transforms keep their output axis unnamed: "embed" may name one
            # dimension of an array only.
            return nn.Dense(n, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                            kernel_init=partitioning.boxed(cfg.init, ("embed", out_axis)),
                            bias_init=partitioning.boxed(nn.initializers.zeros_init(),
                                                         (out_axis,)),
                            dot_general=cfg.dot_general, name=name)
        if self.head == "hidden":
            return x
        if self.head == "mlm":
            h = get_activation(cfg.activation)(dense(cfg.d_model, "mlm_transform")(x))
            h = make_norm(cfg.norm, epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype, name="mlm_norm")(h)
            bias = self.param("mlm_bias", partitioning.boxed(nn.initializers.zeros, ("vocab",)),
                              (cfg.vocab_size,), cfg.weight_dtype)
            return _Unembed(cfg, name="unembed")(h, embedder) + bias.astype(jnp.float32)
        pooled = jnp.tanh(dense(cfg.d_model, "pooler")(x[:, 0]))
        if self.head == "pooled":
            return pooled
        if cfg.num_classes <= 0:
            raise ValueError("head='classify' needs model.num_classes > 0")
        pooled = nn.Dropout(cfg.dropout_rate)(pooled, deterministic=not train)
        return dense(cfg.num_classes, "classifier", "classes")(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Encoder-decoder ("Attention Is All You Need").
# ----------------------------------------------------------------------------------------
class EncoderDecoder(nn.Module):
    """Transformer for sequence-to-sequence; one shared vocabulary and embedding table.

    __call__(inputs [B, S], decoder_tokens [B, T]) -> logits [B, T, vocab]: teacher forcing,
    where decoder_tokens are the targets shifted right (BOS first). `encode` and `decode`
    are exposed for generation (models/decoding.py); `decode(..., decode=True)` uses the KV
    cache for the decoder's self-attention.
    """
    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        if cfg.channel_gates:  # two stacks and a shared table: one width, two gate sets
            raise ValueError("model.channel_gates is for one stack (decoder, encoder, a ViT "
                             "or CLIP tower), not an encoder-decoder; allowed: False")
        self.embedder = Embedder(cfg, name="embed")
        self.encoder = TransformerStack(cfg, cfg.num_layers, name="encoder")
        self.decoder = TransformerStack(cfg, cfg.decoder_layers,
                                        causal=True, cross_attention=True, name="decoder")
        self.unembed = _Unembed(cfg, name="unembed")
        self.position = DecodePosition(name="position")

    def encode(self, inputs, *, inputs_valid=None, train: bool = False):
        """inputs [B, S] -> encoded [B, S, d_model]."""
        cfg = self.cfg
        _check_tokens(inputs, cfg, "inputs")
        inputs_valid = inputs != cfg.pad_id if inputs_valid is None else inputs_valid
        x = self.embedder(inputs, _positions_from_valid(jnp.ones_like(inputs_valid)),
                          deterministic=not train)
        return self.encoder(x, inputs_valid, deterministic=not train)

    def decode(self, encoded, decoder_tokens, *, inputs_valid, positions=None,
               train: bool = False, decode: bool = False):
        """encoded [B, S, d], decoder_tokens [B, T] -> logits [B, T, vocab]."""
        cfg = self.cfg
        _check_tokens(decoder_tokens, cfg, "decoder_tokens")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(decoder_tokens.shape[1]),
                                         decoder_tokens.shape)
            if decode:
                counts = jnp.full(decoder_tokens.shape[:1], decoder_tokens.shape[1])
                positions = positions + self.position(counts)[:, None]
        x = self.embedder(decoder_tokens, positions, deterministic=not train)
        x = self.decoder(x, None, encoded, inputs_valid, deterministic=not train,
                         decode=decode)
        return self.unembed(x, self.embedder)

    def __call__(self, inputs, decoder_tokens, *, inputs_valid=None, train: bool = False):
        inputs_valid = inputs != self.cfg.pad_id if inputs_valid is None else inputs_valid
        encoded = self.encode(inputs, inputs_valid=inputs_valid, train=train)
        return self.decode(encoded, decoder_tokens, inputs_valid=inputs_valid, train=train)


# ----------------------------------------------------------------------------------------
# Scanned <-> unrolled parameter layouts.
# ----------------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(tree):
    """Unrolled params (`layers_0..layers_{n-1}`) -> scanned layout (`layers`, axis 0)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_KEY.match(k)}
    layer_keys = sorted((k for k in tree if _LAYER_KEY.match(k)),
                        key=lambda k: int(_LAYER_KEY.match(k).group(1)))
    if layer_keys:
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[tree[k] for k in layer_keys])
    return out


def unstack_layers(tree):
    """Scanned params (`layers` with leading axis) -> unrolled `layers_i` entries."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != "layers"}
    if "layers" in tree:
        n = jax.tree.leaves(tree["layers"])[0].shape[0]
        for i in range(n):
            out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
    return out

