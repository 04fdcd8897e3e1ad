"""The recurrent family: models on models.layers.recurrent.

  SequenceClassifier  tokens [B, L] -> logits [B, num_classes]: embedding -> (bi-)RNN ->
                      attention pooling (Yang et al. 2016, "word context" query) or the
                      final states -> linear classifier
  Seq2SeqRNN          (inputs [B, S], decoder tokens [B, T]) -> logits [B, T, vocab]:
                      (bi-)RNN encoder, RNN decoder with additive (Bahdanau et al. 2015) or
                      multiplicative (Luong et al. 2015) attention; `encode` / `decode` as
                      transformer.EncoderDecoder, so models.decoding's greedy_decode and
                      beam_search run it unchanged (the recurrent state is the `cache`)
  LSTMForecaster      inputs [B, L, C] -> forecasts [B, H, C]: RevIN -> RNN -> linear head

One `RNNConfig` serves the three; `cell` picks LSTM (default), GRU or simple RNN. Logits and
forecasts are float32 whatever the compute dtype. Token id `pad_id` marks padding, which
must be at the END of each row (the recurrent layers take lengths).

Where popular explanations differ from the papers:
  * A popular explanation gives the Bahdanau encoder as an LSTM whose last vector is the
    context c. Bahdanau et al. 2015 (sec. 3 and appendix A) do the opposite: a
    BIDIRECTIONAL encoder (gated units, i.e. a GRU there)
    whose annotations h_j are all attended, with e_ij = v^T tanh(W s_{i-1} + U h_j) scored
    from the PREVIOUS decoder state, c_i fed into the recurrence, and s_0 = tanh(W_s h<-_1).
    We do exactly that, with two simplifications: an LSTM decoder (c_0 = 0) and a tanh
    output layer on [s_i; c_i; E y_{i-1}] instead of the paper's maxout.
  * Luong et al. score the CURRENT top state: score(h_t, h_s) = h_t . h_s ("dot") or
    h_t^T W_a h_s ("general"); h~_t = tanh(W_c [c_t; h_t]) predicts y_t and, with input
    feeding (sec. 3.3), joins the next step's input.
  * GNMT's residual connections are `residual` (layers >= 1; models.layers.recurrent).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import variants
from models.layers import initializers
from models.layers import recurrent as rec
from models.layers.embedding import Embed

POOLINGS = ("attention", "last")
ATTENTIONS = ("bahdanau", "luong_dot", "luong_general")
NEG_INF = -1.0e30


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """Hyper-parameters of the three recurrent models."""
    vocab_size: int = 260                  # data field (classify, seq2seq)
    num_classes: int = 2                   # data field (classify)
    channels: int = 1                      # data field (forecast)
    horizon: int = 24                      # data field (forecast): steps predicted
    embed_dim: int = 64
    cell: str = "lstm"                     # "lstm" | "gru" | "rnn"
    hidden: int = 128                      # per direction
    num_layers: int = 1                    # encoder (classifier, forecaster) layers
    decoder_layers: int | None = None      # seq2seq decoder; None = num_layers
    bidirectional: bool = True             # encoder / classifier / forecaster
    merge: str = "concat"                  # bidirectional outputs: "concat" | "sum"
    residual: bool = False                 # GNMT residuals between stacked layers
    dropout: float = 0.0                   # embeddings, between layers, before the output
    pooling: str = "attention"             # classifier: "attention" | "last"
    attention: str = "bahdanau"            # seq2seq: bahdanau | luong_dot | luong_general
    attention_dim: int | None = None       # additive attention / pooling width; None = hidden
    input_feeding: bool = True             # Luong: feed h~_{t-1} into step t
    revin: bool = True                     # forecaster: instance norm in, inverse out
    revin_eps: float = 1e-5
    channel_independent: bool = False      # forecaster: each channel its own series
    gru_reset_after: bool = True           # see models.layers.recurrent
    hoist_input_projection: bool = True
    implementation: str = "auto"           # "scan" | "cudnn" | "auto"
    unroll: int = 1
    kernel_init: str = "lecun_normal"      # recurrent input kernels
    recurrent_init: str = "orthogonal"
    dense_init: str = "xavier_uniform"     # embeddings-to-output projections
    dtype: str = "float32"                 # compute dtype
    param_dtype: str = "float32"
    pad_id: int = 0
    dot_general: Callable = lax.dot_general  # every matmul goes through this hook

    def __post_init__(self):
        for key, allowed in (("pooling", POOLINGS), ("attention", ATTENTIONS),
                             ("dense_init", initializers.NAMES)):
            variants.check_one_of("model", key, getattr(self, key), allowed)
        for key in ("vocab_size", "channels", "horizon", "embed_dim", "hidden"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.decoder_layers is not None and self.decoder_layers <= 0:
            raise ValueError(f"model.decoder_layers must be positive or None, got "
                             f"{self.decoder_layers}")
        self.recurrent()  # validates cell, merge, dropout, dtypes, inits, implementation
        if self.attention == "luong_dot" and self.recurrent().output_size != self.hidden:
            raise ValueError("attention='luong_dot' needs encoder outputs of the decoder's "
                             f"width ({self.hidden}); a concat bidirectional encoder gives "
                             f"{2 * self.hidden}: use merge='sum' or 'luong_general'")

    def replace(self, **changes) -> "RNNConfig":
        return dataclasses.replace(self, **changes)

    def recurrent(self, **changes) -> rec.RecurrentConfig:
        """The encoder's RecurrentConfig (the decoder: bidirectional=False, its layers)."""
        fields = {f.name for f in dataclasses.fields(rec.RecurrentConfig)}
        base = {k: getattr(self, k) for k in fields if hasattr(self, k)}
        return rec.RecurrentConfig(**{**base, **changes})

    @property
    def attn_dim(self) -> int:
        return self.attention_dim or self.hidden


VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=32, hidden=32, num_layers=1),
    "small": dict(embed_dim=128, hidden=256, num_layers=2, dropout=0.1),
    "base": dict(embed_dim=512, hidden=1024, num_layers=2, dropout=0.2),
    # GNMT-like: 4 layers with residual connections (Wu et al. 2016 use 8 and 1024 units).
    "gnmt": dict(embed_dim=512, hidden=512, num_layers=4, residual=True, dropout=0.2),
}


def make_config(variant: str, **overrides) -> RNNConfig:
    """The named variant's config with `overrides` applied (unknown names raise)."""
    return variants.from_variant(RNNConfig, VARIANTS, variant, overrides, "rnn")


# ----------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------
def _dense(cfg: RNNConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=initializers.get(cfg.dense_init),
                    dot_general=cfg.dot_general, name=name)


def _embed(cfg: RNNConfig, name: str = "embed") -> Embed:
    return Embed(cfg.vocab_size, cfg.embed_dim, dtype=jnp.dtype(cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype),
                 embedding_init=initializers.get("normal", 1.0 / cfg.embed_dim ** 0.5),
                 dot_general=cfg.dot_general, name=name)


def _check_tokens(tokens, what: str = "tokens"):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{what} must be int [batch, length], got {tokens.dtype} "
                         f"{tokens.shape}")


def final_hidden(final_state, cfg: rec.RecurrentConfig):
    """The top layer's final h per direction, concatenated: [B, D*H] (float32)."""
    return jnp.concatenate([c.h if cfg.cell == "lstm" else c for c in final_state[-1]], -1)


def masked_softmax(scores, valid):
    """Softmax over the last axis restricted to `valid`; rows with nothing valid -> 0."""
    weights = jax.nn.softmax(jnp.where(valid, scores.astype(jnp.float32), NEG_INF), axis=-1)
    return jnp.where(valid, weights, 0.0)


def _bdot(a, b, contract: tuple[int, int], cfg: RNNConfig):
    """Batched (axis 0) contraction of a's axis contract[0] with b's contract[1]."""
    dt = jnp.dtype(cfg.dtype)
    return cfg.dot_general(a.astype(dt), b.astype(dt),
                           (((contract[0],), (contract[1],)), ((0,), (0,))))


class AttentionPool(nn.Module):
    """Yang et al. 2016 (eq. 5-7): u_t = tanh(W h_t + b), a_t = softmax_t(u_t . u_w) over
    real positions, s = sum_t a_t h_t.  h [B, L, D], valid [B, L] -> s [B, D]."""
    cfg: RNNConfig

    @nn.compact
    def __call__(self, h, valid):
        cfg = self.cfg
        u = jnp.tanh(_dense(cfg, cfg.attn_dim, "projection")(h))
        query = self.param("query", nn.initializers.normal(1.0 / cfg.attn_dim ** 0.5),
                           (cfg.attn_dim,), jnp.dtype(cfg.param_dtype))  # the "word context"
        weights = masked_softmax(rec._dot(u, query[:, None], cfg.recurrent())[..., 0], valid)
        self.sow("intermediates", "attention_weights", weights)
        return _bdot(weights, h, (1, 1), cfg)


# ----------------------------------------------------------------------------------------
# Classifier.
# ----------------------------------------------------------------------------------------
class SequenceClassifier(nn.Module):
    """tokens [B, L] (right-padded with cfg.pad_id) -> class logits [B, num_classes] f32."""
    cfg: RNNConfig

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        cfg = self.cfg
        _check_tokens(tokens)
        if cfg.num_classes <= 0:
            raise ValueError("SequenceClassifier needs model.num_classes > 0")
        valid = tokens != cfg.pad_id
        x = nn.Dropout(cfg.dropout)(_embed(cfg)(tokens), deterministic=not train)
        rcfg = cfg.recurrent()
        h, final = rec.Recurrent(rcfg, name="encoder")(x, lengths=valid.sum(1), train=train)
        if cfg.pooling == "attention":
            pooled = AttentionPool(cfg, name="pool")(h, valid)
        else:   # the final state of each direction: fwd at the true end, bwd at t = 0
            pooled = final_hidden(final, rcfg).astype(cfg.dtype)
        pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=not train)
        return _dense(cfg, cfg.num_classes, "classifier")(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Sequence to sequence.
# ----------------------------------------------------------------------------------------
def attend(p, kind: str, query, keys, memory, valid, cfg: RNNConfig):
    """Global attention. query [B, Hq], keys [B, S, K] (the query-independent part,
    precomputed), memory [B, S, D], valid [B, S] -> (context [B, D] f32, weights [B, S]).

    bahdanau: e_s = v^T tanh(q W_q + keys_s), keys = memory U
    luong_*:  e_s = keys_s . q,  keys = memory (dot) or memory W_a^T (general)
    """
    rcfg = cfg.recurrent()
    if kind == "bahdanau":
        hidden = jnp.tanh((rec._dot(query, p["query_kernel"], rcfg)[:, None] + keys)
                          .astype(jnp.float32))
        scores = rec._dot(hidden, p["v"][:, None], rcfg)[..., 0]
    else:
        scores = _bdot(keys, query, (2, 1), cfg)
    weights = masked_softmax(scores, valid)
    return _bdot(weights, memory, (1, 1), cfg).astype(jnp.float32), weights


class _DecodeCache(nn.Module):
    """Keeps the decoder carry in the `cache` collection between `decode=True` calls.

    Every leaf has a leading batch axis (beam search gathers them); `steps` [B] counts the
    tokens consumed, and a row at 0 starts from `fresh` (the state bridged from the encoder).
    """

    @nn.compact
    def __call__(self, fresh, run: Callable, num_new: int):
        leaves, tree = jax.tree.flatten(fresh)
        slots = [self.variable("cache", f"carry_{i}", jnp.zeros, x.shape, x.dtype)
                 for i, x in enumerate(leaves)]
        steps = self.variable("cache", "steps", jnp.zeros, leaves[0].shape[:1], jnp.int32)
        started = steps.value > 0
        start = [jnp.where(started.reshape((-1,) + (1,) * (x.ndim - 1)), s.value, x)
                 for x, s in zip(leaves, slots)]
        out, final = run(jax.tree.unflatten(tree, start))
        for s, x in zip(slots, jax.tree.leaves(final)):
            s.value = x
        steps.value = steps.value + num_new
        return out


class Seq2SeqRNN(nn.Module):
    """RNN encoder-decoder with attention; one vocabulary and embedding table.

    __call__(inputs [B, S], decoder_tokens [B, T], *, inputs_valid, train) -> logits
    [B, T, vocab] f32 by teacher forcing (decoder_tokens = targets shifted right, BOS first).
    encode(inputs) -> encoded [B, S, D] (zero at padding). decode(encoded, tokens,
    inputs_valid=, decode=True) continues from the carry in the `cache` collection (create
    it with models.decoding.init_encdec_cache), consuming the given tokens. Sown into
    `intermediates` by decode: "alignment" [B, T, S], each output step's attention weights
    over the source (zero at padding; rows sum to 1).
    """
    cfg: RNNConfig

    def setup(self):
        cfg = self.cfg
        enc = cfg.recurrent()
        self.dec_cfg = cfg.recurrent(bidirectional=False,
                                     num_layers=cfg.decoder_layers or cfg.num_layers)
        d_enc, h, e = enc.output_size, cfg.hidden, cfg.embed_dim
        luong = cfg.attention != "bahdanau"
        self.feed_dim = (h if cfg.input_feeding else 0) if luong else d_enc
        self.embed = _embed(cfg)
        self.encoder = rec.Recurrent(enc, name="encoder")
        self.decoder = [rec.CellParams(self.dec_cfg, e + self.feed_dim if i == 0 else h,
                                       name=f"decoder_{i}")
                        for i in range(self.dec_cfg.num_layers)]
        self.bridge = _dense(cfg, self.dec_cfg.num_layers * h, "bridge")
        init, pdt = initializers.get(cfg.dense_init), jnp.dtype(cfg.param_dtype)
        attn = {}
        if cfg.attention == "bahdanau":
            a = cfg.attn_dim
            attn["query_kernel"] = self.param("attn_query_kernel", init, (h, a), pdt)
            attn["key_kernel"] = self.param("attn_key_kernel", init, (d_enc, a), pdt)
            attn["v"] = self.param("attn_v", nn.initializers.normal(cfg.attn_dim ** -0.5),
                                   (cfg.attn_dim,), pdt)
        elif cfg.attention == "luong_general":
            attn["key_kernel"] = self.param("attn_key_kernel", init, (d_enc, h), pdt)
        self.attn = attn
        # Output layer: Luong h~ = tanh(W_c [c; h]) (no bias); Bahdanau tanh(W [s; c; Ey] + b).
        combine_in = d_enc + h + (0 if luong else e)
        self.combine_kernel = self.param("combine_kernel", init, (combine_in, h), pdt)
        self.combine_bias = None if luong else self.param("combine_bias",
                                                          nn.initializers.zeros, (h,), pdt)
        self.logits = _dense(cfg, cfg.vocab_size, "logits")
        self.cache = _DecodeCache(name="decoder_state")
        self.dropout = nn.Dropout(cfg.dropout)

    def encode(self, inputs, *, inputs_valid=None, train: bool = False):
        """inputs [B, S] -> encoded [B, S, D_enc] (cfg.dtype, zero at padding)."""
        _check_tokens(inputs, "inputs")
        valid = inputs != self.cfg.pad_id if inputs_valid is None else inputs_valid
        x = self.dropout(self.embed(inputs), deterministic=not train)
        return self.encoder(x, lengths=valid.sum(1), train=train)[0]

    def _fresh_carry(self, encoded, valid):
        """Decoder carry before the first token: s_0^l = tanh(W_l summary + b_l), c_0 = 0,
        summary = the encoder's final states [h->_last; h<-_1] (Bahdanau: s_0 = tanh(W_s
        h<-_1)); for merge="sum" the directions are not separable: the mean annotation."""
        cfg, h = self.cfg, self.cfg.hidden
        lengths = valid.sum(1)
        last_index = jnp.maximum(lengths - 1, 0)[:, None, None]
        last = jnp.take_along_axis(encoded, last_index, axis=1)[:, 0]
        if cfg.bidirectional and cfg.merge == "concat":
            summary = jnp.concatenate([last[:, :h], encoded[:, 0, h:]], -1)
        elif cfg.bidirectional:
            summary = encoded.sum(1) / jnp.maximum(lengths, 1)[:, None].astype(encoded.dtype)
        else:
            summary = last
        s0 = jnp.tanh(self.bridge(summary).astype(jnp.float32))
        states = tuple(
            rec.LSTMState(s, jnp.zeros_like(s)) if cfg.cell == "lstm" else s
            for s in jnp.split(s0, self.dec_cfg.num_layers, axis=-1))
        feed = None
        if cfg.attention != "bahdanau" and cfg.input_feeding:
            feed = jnp.zeros((encoded.shape[0], h), jnp.float32)
        return states, feed

    def _step(self, cells, ctx_args, carry, xs):
        """One decoder step (pure; inside lax.scan). xs: hoisted layer-0 input projection
        [B, G*H], hoisted embedding part of the output layer [B, H] (Bahdanau) and
        between-layer dropout keep-masks [L-1, B, H] (or None)."""
        cfg, dcfg, h_dim = self.cfg, self.dec_cfg, self.cfg.hidden
        states, feed = carry
        x0, out_emb, drop = xs
        top = lambda s: s.h if cfg.cell == "lstm" else s  # noqa: E731
        if cfg.attention == "bahdanau":   # c_i from s_{i-1}, fed into the recurrence
            ctx, weights = attend(self.attn, cfg.attention, top(states[-1]), *ctx_args, cfg)
            feed_in = ctx
        else:
            feed_in = feed
        xw = x0
        if feed_in is not None:
            xw = xw + rec._dot(feed_in, cells[0]["input_kernel"][cfg.embed_dim:], dcfg)
        new_states, below = [], None
        for i, p in enumerate(cells):
            if i > 0:
                xw = rec.project_inputs(p, below, dcfg)
            s, out = rec.cell_step(p, states[i], xw, dcfg)
            if cfg.residual and i >= 1:
                out = out + below
            if drop is not None and i < len(cells) - 1:
                out = out * drop[i]
            new_states.append(s)
            below = out
        if cfg.attention == "bahdanau":
            o = rec._dot(jnp.concatenate([below, ctx], -1),
                         self.combine_kernel[:h_dim + ctx.shape[-1]], dcfg) + out_emb
        else:             # Luong: attend with the current top state h_t
            ctx, weights = attend(self.attn, cfg.attention, below, *ctx_args, cfg)
            o = rec._dot(jnp.concatenate([ctx, below], -1), self.combine_kernel, dcfg)
        o = jnp.tanh(o.astype(jnp.float32))
        return (tuple(new_states), None if feed is None else o), (o, weights)

    def decode(self, encoded, decoder_tokens, *, inputs_valid, train: bool = False,
               decode: bool = False):
        """encoded [B, S, D], decoder_tokens [B, T] -> logits [B, T, vocab] (float32)."""
        cfg, dcfg = self.cfg, self.dec_cfg
        _check_tokens(decoder_tokens, "decoder_tokens")
        batch, steps = decoder_tokens.shape
        emb = self.dropout(self.embed(decoder_tokens), deterministic=not train)
        cells = [c() for c in self.decoder]
        # Hoisted out of the scan: the embedding's share of layer 0's input projection, the
        # attention keys and (Bahdanau) the embedding's share of the output layer.
        x0 = rec.project_inputs({"input_kernel": cells[0]["input_kernel"][:cfg.embed_dim],
                                 "bias": cells[0]["bias"]}, emb, dcfg)
        keys = encoded
        if "key_kernel" in self.attn:
            keys = rec._dot(encoded, self.attn["key_kernel"], dcfg)
        out_emb = jnp.zeros((batch, steps, 0))
        if cfg.attention == "bahdanau":
            out_emb = (rec._dot(emb, self.combine_kernel[-cfg.embed_dim:], dcfg)
                       + self.combine_bias.astype(cfg.dtype))
        drop = None
        if train and cfg.dropout > 0 and dcfg.num_layers > 1:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.dropout,
                                        (steps, dcfg.num_layers - 1, batch, cfg.hidden))
            drop = keep / (1.0 - cfg.dropout)
        ctx_args = (keys, encoded, inputs_valid)
        xs = (jnp.swapaxes(x0, 0, 1), jnp.swapaxes(out_emb, 0, 1), drop)

        def run(carry):
            final, (outs, weights) = lax.scan(lambda c, x: self._step(cells, ctx_args, c, x),
                                              carry, xs, unroll=cfg.unroll)
            return (jnp.swapaxes(outs, 0, 1), jnp.swapaxes(weights, 0, 1)), final

        fresh = self._fresh_carry(encoded, inputs_valid)
        outs, weights = self.cache(fresh, run, steps) if decode else run(fresh)[0]
        # The alignment (Bahdanau et al. 2015, fig. 3): weights [B, T, S] of output step t
        # over the source positions (a scan output far smaller than the [B, T, H] states).
        self.sow("intermediates", "alignment", weights)
        outs = self.dropout(outs.astype(cfg.dtype), deterministic=not train)
        return self.logits(outs).astype(jnp.float32)

    def __call__(self, inputs, decoder_tokens, *, inputs_valid=None, train: bool = False):
        inputs_valid = inputs != self.cfg.pad_id if inputs_valid is None else inputs_valid
        encoded = self.encode(inputs, inputs_valid=inputs_valid, train=train)
        return self.decode(encoded, decoder_tokens, inputs_valid=inputs_valid, train=train)


# ----------------------------------------------------------------------------------------
# Forecaster.
# ----------------------------------------------------------------------------------------
class LSTMForecaster(nn.Module):
    """inputs [B, L, C] -> forecasts [B, horizon, C] float32.

    RevIN (Kim et al. 2022; `revin`, default on): each (example, channel) series is
    normalized by its window's mean and std (biased, eps inside the sqrt, no gradient
    through the statistics -- as models.patchtst) and the forecast is mapped back, so a
    constant added to an input series shifts exactly its forecast by that constant.
    The RNN reads all C channels at each step (multivariate) and a linear head maps its
    final states to all H*C values; `channel_independent` instead runs every channel as a
    univariate series through the same RNN and a head to H (PatchTST's channel independence).
    """
    cfg: RNNConfig

    @nn.compact
    def __call__(self, inputs, *, train: bool = False):
        cfg = self.cfg
        x = inputs.astype(jnp.float32)
        if x.ndim != 3 or x.shape[-1] != cfg.channels:
            raise ValueError(f"inputs must be [batch, lookback, {cfg.channels}], got "
                             f"{x.shape}")
        batch, _, channels = x.shape
        if cfg.revin:
            mean = lax.stop_gradient(x.mean(1, keepdims=True))
            std = lax.stop_gradient(jnp.sqrt(x.var(1, keepdims=True) + cfg.revin_eps))
            x = (x - mean) / std
        if cfg.channel_independent:   # [B, L, C] -> [B*C, L, 1]
            x = jnp.swapaxes(x, 1, 2).reshape(batch * channels, -1, 1)
        rcfg = cfg.recurrent()
        _, final = rec.Recurrent(rcfg, name="encoder")(x.astype(cfg.dtype), train=train)
        features = nn.Dropout(cfg.dropout)(final_hidden(final, rcfg).astype(cfg.dtype),
                                           deterministic=not train)
        per_row = cfg.horizon * (1 if cfg.channel_independent else channels)
        y = _dense(cfg, per_row, "head")(features).astype(jnp.float32)
        if cfg.channel_independent:
            y = jnp.swapaxes(y.reshape(batch, channels, cfg.horizon), 1, 2)
        else:
            y = y.reshape(batch, cfg.horizon, channels)
        return y * std + mean if cfg.revin else y
