"""PatchTST (Nie et al. 2023, "A Time Series is Worth 64 Words"), supervised forecasting.

  inputs [B, L, C] -> RevIN: per (example, channel) (x - mean) / std over time  (float32)
        -> channel independence: [B*C, L], every channel a univariate series, one shared model
        -> patches [B*C, N, P]: length-P windows every S steps           N = (L - P) // S + 1
           (pad_end, the paper's default: the last value repeated S times first, N + 1)
        -> x_p W_p + W_pos  [B*C, N, D]        linear patch embedding + learned positions
        -> TransformerStack (bidirectional)   models.transformer, no mask (no padding tokens),
                                              configured by PatchTSTConfig.encoder
        -> flatten [B*C, D*N] -> Linear -> [B*C, H] -> [B, H, C] -> RevIN inverse (float32)

channel_independence=False is channel mixing, the paper's ablation baseline (a token embeds
all channels, as in the usual multivariate Transformer input); here a token is the C patches
of one time span, [C*P] -> D, and the head predicts all H*C values at once.

Where popular explanations differ from the paper (Nie et al. 2023, sec. 3.1):
  * A popular explanation describes patches as the series "grouped by stride period"; the
    paper's patches are length P taken every S steps, overlapping when S < P (P=16, S=8 in
    the supervised setting), and the end padding gives one more patch.
  * A popular explanation credits the memory/compute saving to channel-independent
    attention. In the paper it comes from the token count, L -> N ~ L/S, attention cost
    falling by ~S^2; channel independence by itself multiplies the batch by C.
  * "Variables influence each other through one shared model" holds only through
    training: at inference no value crosses channels (tests/models/test_patchtst.py).
  * Popular explanations leave out instance normalization; the paper uses RevIN (Kim et
    al. 2022).
  * TST (Zerveas et al. 2021) credits batch norm for robustness to outliers and
    PatchTST's reference code uses
    BatchNorm1d over D. The shared TransformerStack only has layernorm | rmsnorm
    (models.layers.normalization.make_norm, which takes no train flag and has no
    `batch_stats`), so the default is LayerNorm (model.encoder.norm: layernorm | rmsnorm).
  * The reference code adds residual attention scores across layers (RealFormer,
    res_attention=True); the paper does not describe it and it is not done here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import transformer, variants
from models.layers import partitioning


def num_patches(lookback: int, patch_len: int, stride: int, pad_end: bool) -> int:
    """N = floor((L - P) / S) + 1, plus one when the end is padded with S copies."""
    return (lookback - patch_len) // stride + 1 + int(pad_end)


def patchify(x: jax.Array, patch_len: int, stride: int, pad_end: bool = False) -> jax.Array:
    """x [..., L] -> patches [..., N, P], patch n = x[..., n*S : n*S + P].

    pad_end repeats the last value S times first (ReplicationPad1d((0, S)) in the reference
    code), so the final time steps, which a stride not dividing L - P would drop, get a patch.
    """
    if pad_end:
        x = jnp.concatenate([x, jnp.repeat(x[..., -1:], stride, axis=-1)], axis=-1)
    n = (x.shape[-1] - patch_len) // stride + 1
    index = stride * jnp.arange(n)[:, None] + jnp.arange(patch_len)[None, :]   # [N, P]
    return x[..., index]


def encoder_config(**fields) -> transformer.TransformerConfig:
    """The PatchTST encoder's TransformerConfig: the reference code's post-norm blocks
    (pre_norm=False) with GELU and LayerNorm (the paper's batch norm is not available, see
    the module docstring), Xavier-uniform kernels, at the "tiny" size unless `fields` say
    otherwise (PatchTSTConfig sets the STACK_DERIVED fields)."""
    return transformer.TransformerConfig(**{
        **dict(d_model=32, num_heads=2, num_layers=2, mlp_dim=64, activation="gelu",
               norm="layernorm", norm_position="post", use_bias=True,
               kernel_init="xavier_uniform", position="none", vocab_size=1), **fields})


@dataclasses.dataclass(frozen=True)
class PatchTSTConfig:
    """PatchTST hyper-parameters (defaults: the "tiny" test model).

    `encoder` is the transformer's config: d_model is D, mlp_dim F; dropout_rate also drops
    the patch embeddings; dtype / param_dtype / kernel_init / init_stddev also serve the
    patch embedding and the head (RevIN and the output stay float32). Its STACK_DERIVED
    fields (no token or position table: PatchTST adds its own W_pos; max_length =
    num_patches; the matmul hook = `dot_general`) are set here.
    """
    lookback: int = 32                      # L, look-back window (data field)
    horizon: int = 8                        # H, forecast steps (data field)
    channels: int = 1                       # C, variables (data field)
    patch_len: int = 8                      # P
    stride: int = 4                         # S
    pad_end: bool = True                    # repeat the last value S times: N + 1 patches
    head_dropout: float = 0.0               # on the flattened features before the head
    revin: bool = True                      # instance normalization in, its inverse out
    revin_affine: bool = False              # learnable per-channel scale/shift (ref.: off)
    revin_eps: float = 1e-5
    channel_independence: bool = True       # False: the channel-mixing ablation
    encoder: transformer.TransformerConfig = dataclasses.field(
        default_factory=encoder_config, metadata={"derived": transformer.STACK_DERIVED})
    dot_general: Callable = lax.dot_general  # every matmul (embedding and head included)

    def __post_init__(self):
        for key in ("lookback", "horizon", "channels", "patch_len", "stride"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.patch_len > self.lookback:
            raise ValueError(f"model.patch_len ({self.patch_len}) must be <= model.lookback "
                             f"({self.lookback}): no patch fits in the look-back window")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"model.head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.revin_eps <= 0:
            raise ValueError(f"model.revin_eps must be positive, got {self.revin_eps}")
        # Frozen, so set through object.__setattr__; replace() re-derives (num_patches).
        object.__setattr__(self, "encoder", transformer.stack_config(
            self.encoder, self.num_patches, self.dot_general))

    def replace(self, **changes) -> "PatchTSTConfig":
        """dataclasses.replace, where a dict for `encoder` updates the encoder's fields."""
        return variants.replace(self, changes, "patchtst")

    @property
    def num_patches(self) -> int:
        return num_patches(self.lookback, self.patch_len, self.stride, self.pad_end)


# "paper": the supervised PatchTST/42 (L=336, N=42) of Section 4.1 / Appendix A.1.4, used
# for the large data sets; "paper_small" is its reduced size for ILI, ETTh1, ETTh2.
# lookback, horizon and channels are data fields: a run takes them from the dataset.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(lookback=32, horizon=8, patch_len=8, stride=4,
                 encoder=dict(d_model=32, num_heads=2, num_layers=2, mlp_dim=64)),
    "paper": dict(lookback=336, horizon=96, patch_len=16, stride=8, head_dropout=0.0,
                  encoder=dict(d_model=128, num_heads=16, num_layers=3, mlp_dim=256,
                               dropout_rate=0.2)),
    "paper_small": dict(lookback=336, horizon=96, patch_len=16, stride=8, head_dropout=0.0,
                        encoder=dict(d_model=16, num_heads=4, num_layers=3, mlp_dim=128,
                                     dropout_rate=0.3)),
}


def make_config(variant: str, **overrides) -> PatchTSTConfig:
    """The named variant's config with `overrides` applied (unknown names raise); a dict
    for `encoder` updates the variant's encoder, e.g. encoder=dict(num_layers=3)."""
    return variants.from_variant(PatchTSTConfig, VARIANTS, variant, overrides, "patchtst")


def _stats(x: jax.Array, eps: float):
    """Per-(example, channel) mean and std over time of x [B, L, C] -> [B, 1, C] each.

    Biased variance, eps inside the sqrt, and no gradient through the statistics: as the
    reference RevIN (they describe the input, they are not something to learn through).
    """
    mean = jnp.mean(x, axis=1, keepdims=True)
    std = jnp.sqrt(jnp.var(x, axis=1, keepdims=True) + eps)
    return lax.stop_gradient(mean), lax.stop_gradient(std)


def _uniform_init(limit: float) -> Callable:
    """U(-limit, limit) (flax's nn.initializers.uniform is U(0, scale))."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -limit, limit)


class PatchTST(nn.Module):
    """inputs [B, lookback, channels] -> forecasts [B, horizon, channels] float32.

    Params: revin_weight/revin_bias [C] (revin_affine), embedding/{kernel [P, D] (or
    [C*P, D] mixing), bias [D]}, pos_embedding [N, D], encoder/... (TransformerStack),
    head/{kernel [D*N, H] (or [D*N, H*C] mixing), bias}. Sown into `intermediates`:
    "encoded" [B*C, N, D] (or [B, N, D] when mixing).
    """
    cfg: PatchTSTConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
        cfg, enc = self.cfg, self.cfg.encoder
        dtype, pdtype = jnp.dtype(enc.dtype), jnp.dtype(enc.param_dtype)
        want = (cfg.lookback, cfg.channels)
        if inputs.ndim != 3 or tuple(inputs.shape[1:]) != want:
            # The position table and the head are sized by N, i.e. by the lookback.
            raise ValueError(f"inputs must be [batch, {want[0]}, {want[1]}] (model.lookback, "
                             f"model.channels), got {inputs.shape}")
        b, c, n = inputs.shape[0], cfg.channels, cfg.num_patches
        x = inputs.astype(jnp.float32)       # statistics in float32 whatever the compute dtype
        if cfg.revin:
            mean, std = _stats(x, cfg.revin_eps)
            x = (x - mean) / std
            if cfg.revin_affine:
                w = self.param("revin_weight", nn.initializers.ones, (c,), pdtype)
                bias = self.param("revin_bias", nn.initializers.zeros, (c,), pdtype)
                x = x * w.astype(jnp.float32) + bias.astype(jnp.float32)

        patches = patchify(x.transpose(0, 2, 1), cfg.patch_len, cfg.stride,
                           cfg.pad_end)                                  # [B, C, N, P]
        if cfg.channel_independence:
            tokens = patches.reshape(b * c, n, cfg.patch_len)            # a batch of series
        else:
            tokens = patches.transpose(0, 2, 1, 3).reshape(b, n, c * cfg.patch_len)
        def dense(feat, names, name):
            return nn.Dense(
                feat, dtype=dtype, param_dtype=pdtype, dot_general=cfg.dot_general,
                name=name, kernel_init=partitioning.boxed(enc.init, names),
                bias_init=partitioning.boxed(nn.initializers.zeros_init(), names[-1:]))
        h = dense(enc.d_model, (None, "embed"), "embedding")(tokens.astype(dtype))  # [., N, D]
        # W_pos ~ U(-0.02, 0.02): the reference code's learned ("zeros", learn_pe) table.
        pos = self.param("pos_embedding",
                         partitioning.boxed(_uniform_init(0.02), ("position", "embed")),
                         (n, enc.d_model), pdtype)
        h = h + pos.astype(dtype)
        h = nn.Dropout(enc.dropout_rate)(h, deterministic=not train)
        # No padding tokens, so no mask; bidirectional (causal=False).
        h = transformer.TransformerStack(enc, enc.num_layers,
                                         name="encoder")(h, deterministic=not train)
        self.sow("intermediates", "encoded", h)

        # Flatten head. Features are flattened D-major ([D, N] -> D*N) like the reference
        # Flatten_Head (it flattens z [.., D, N]), so its head weights load without a shuffle.
        h = h.transpose(0, 2, 1).reshape(h.shape[0], enc.d_model * n)
        h = nn.Dropout(cfg.head_dropout)(h, deterministic=not train)
        if cfg.channel_independence:
            # The flattened [D * N] features are named (and split) like the model width.
            y = dense(cfg.horizon, ("embed", None), "head")(h).astype(jnp.float32)  # [B*C, H]
            y = y.reshape(b, c, cfg.horizon).transpose(0, 2, 1)          # [B, H, C]
        else:
            y = dense(cfg.horizon * c, ("embed", None), "head")(h).astype(jnp.float32)
            y = y.reshape(b, cfg.horizon, c)

        if cfg.revin:
            if cfg.revin_affine:
                # eps^2 keeps the division finite if a weight reaches 0 (reference RevIN).
                y = (y - bias.astype(jnp.float32)) / (w.astype(jnp.float32)
                                                      + cfg.revin_eps ** 2)
            y = y * std + mean
        return y
