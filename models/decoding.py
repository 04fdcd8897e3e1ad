"""Autoregressive decoding with the KV cache: sampling, greedy and beam search.

  generate(decoder, params, prompts, ...)        GPT-style continuation of a batch of
                                                   left-padded prompts: greedy (temperature
                                                   0), temperature, top-k and top-p sampling
  greedy_decode(encdec, params, inputs, ...)     encoder-decoder greedy decoding
  beam_search(encdec, params, inputs, ...)       beam search with the GNMT length penalty

All loops run inside `lax.while_loop` (jit-compiled once per shape) and stop when every
sequence has produced `eos_id` or the length budget is spent. After a sequence ends, its
remaining tokens are `pad_id`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1.0e30  # finite "minus infinity": keeps arithmetic NaN-free


def _zeros_like_shapes(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def init_decoder_cache(model, batch_size: int, max_length: int):
    """Zeroed KV cache for a `transformer.Decoder` holding `max_length` tokens per row."""
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
    return _zeros_like_shapes(shapes["cache"])


def init_encdec_cache(model, encoded, inputs_valid, max_length: int):
    """Zeroed decoder KV cache for a `transformer.EncoderDecoder` (encoded [B, S, d])."""
    tokens = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), encoded, tokens, inputs_valid=inputs_valid, decode=True,
        method=model.decode))
    return _zeros_like_shapes(shapes["cache"])


# ----------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------
def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to NEG_INF.  logits [B, V].

    top-p keeps the smallest set of most likely tokens whose probability sums to >= top_p
    (Holtzman et al. 2020); the most likely token is always kept. Ties at the cut are kept.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def sample_logits(rng, logits, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draw token ids [B] from logits [B, V]; temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _decode_loop(step_fn: Callable, cache, first_logits, rng, *, num_tokens: int,
                 sampler: Callable, eos_id: int | None, pad_id: int):
    """Sample up to num_tokens tokens; step_fn(tokens [B, 1], valid [B, 1], cache)."""
    batch = first_logits.shape[0]
    out = jnp.full((batch, num_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(state):
        i, _, _, _, done, _ = state
        return jnp.logical_and(i < num_tokens, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, cache, logits, out, done, rng = state
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_id, sampler(key, logits))
        out = out.at[:, i].set(token)
        finished = done if eos_id is None else jnp.logical_or(done, token == eos_id)
        logits, cache = step_fn(token[:, None], jnp.logical_not(done)[:, None], cache)
        return i + 1, cache, logits, out, finished, rng

    state = (jnp.array(0), cache, first_logits, out, done, rng)
    _, _, _, out, done, _ = lax.while_loop(cond, body, state)
    if eos_id is None:
        return out, jnp.full((batch,), num_tokens, jnp.int32)
    return out, _lengths(out, eos_id, num_tokens)


def _lengths(tokens, eos_id, num_tokens):
    """Tokens up to and including the first EOS (num_tokens if none)."""
    is_eos = tokens == eos_id
    first = jnp.argmax(is_eos, axis=1)
    return jnp.where(jnp.any(is_eos, axis=1), first + 1, num_tokens)


# ----------------------------------------------------------------------------------------
# Decoder-only generation.
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "pad_id"))
def generate(model, params, prompts, prompt_valid=None, rng=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0):
    """Continue a batch of prompts with a `transformer.Decoder`.

    Args:
      prompts: int [B, P], LEFT-padded so every prompt ends at the last column.
      prompt_valid: bool [B, P], False on padding (default: all True).
      rng: PRNG key (unused when temperature == 0).
      max_new_tokens: number of tokens to generate at most.
      temperature / top_k / top_p: sampling controls (temperature 0 = greedy).
      eos_id: stop a row once it emits this token (it is kept in the output).
    Returns:
      tokens int [B, max_new_tokens] (pad_id after EOS) and lengths int [B].
    """
    _check_sampling(temperature, top_k, top_p)
    batch, prompt_len = prompts.shape
    if prompt_len + max_new_tokens > model.cfg.max_length:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                         f"exceeds model.max_length {model.cfg.max_length}")
    valid = jnp.ones(prompts.shape, bool) if prompt_valid is None else prompt_valid
    rng = jax.random.key(0) if rng is None else rng
    cache = init_decoder_cache(model, batch, prompt_len + max_new_tokens)

    def step_fn(tokens, tokens_valid, cache):
        logits, variables = model.apply({"params": params, "cache": cache}, tokens,
                                        valid=tokens_valid, decode=True, mutable=["cache"])
        return logits[:, -1], variables["cache"]

    first_logits, cache = step_fn(prompts, valid, cache)  # pre-fill with the whole prompt
    sampler = functools.partial(sample_logits, temperature=temperature, top_k=top_k,
                                top_p=top_p)
    return _decode_loop(step_fn, cache, first_logits, rng, num_tokens=max_new_tokens,
                        sampler=sampler, eos_id=eos_id, pad_id=pad_id)


# ----------------------------------------------------------------------------------------
# Encoder-decoder: greedy and beam search.
# ----------------------------------------------------------------------------------------
def _encode(model, params, inputs, inputs_valid):
    inputs_valid = inputs != model.cfg.pad_id if inputs_valid is None else inputs_valid
    encoded = model.apply({"params": params}, inputs, inputs_valid=inputs_valid,
                          method=model.encode)
    return encoded, inputs_valid


def _encdec_step_fn(model, params, encoded, inputs_valid):
    def step_fn(tokens, tokens_valid, cache):
        del tokens_valid  # the decoder's own tokens are never padding while alive
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, tokens, inputs_valid=inputs_valid,
            decode=True, mutable=["cache"], method=model.decode)
        return logits[:, -1], variables["cache"]
    return step_fn


@functools.partial(jax.jit, static_argnames=("model", "max_length", "bos_id", "eos_id",
                                             "pad_id"))
def greedy_decode(model, params, inputs, inputs_valid=None, *, max_length: int,
                  bos_id: int = 1, eos_id: int = 2, pad_id: int = 0):
    """inputs [B, S] -> (tokens [B, max_length] without BOS, lengths [B]) by argmax."""
    encoded, inputs_valid = _encode(model, params, inputs, inputs_valid)
    batch = inputs.shape[0]
    cache = init_encdec_cache(model, encoded, inputs_valid, max_length)
    step_fn = _encdec_step_fn(model, params, encoded, inputs_valid)
    bos = jnp.full((batch, 1), bos_id, jnp.int32)
    first_logits, cache = step_fn(bos, None, cache)
    sampler = lambda key, logits: jnp.argmax(logits, -1).astype(jnp.int32)  # noqa: E731
    return _decode_loop(step_fn, cache, first_logits, jax.random.key(0),
                        num_tokens=max_length, sampler=sampler, eos_id=eos_id, pad_id=pad_id)


def length_penalty(length, alpha: float):
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, beam_indices, batch: int, beams: int):
    """Reorder the beam axis of every leaf; leaves are [B*K, ...] or scanned [L, B*K, ...].

    beam_indices int [B, K] (which old beam each new beam continues).
    """
    flat = (jnp.arange(batch)[:, None] * beams + beam_indices).reshape(-1)

    def gather(path, x):
        names = [getattr(p, "key", None) for p in path]
        if names[-1] == "cache_index" or x.ndim == 0:
            return x
        axis = 1 if "layers" in names else 0  # nn.scan stacks layers in front
        return jnp.take(x, flat, axis=axis)
    return jax.tree_util.tree_map_with_path(gather, tree)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_length", "alpha",
                                             "bos_id", "eos_id", "pad_id"))
def beam_search(model, params, inputs, inputs_valid=None, *, beam_size: int,
                max_length: int, alpha: float = 0.6, bos_id: int = 1, eos_id: int = 2,
                pad_id: int = 0):
    """Beam search for a `transformer.EncoderDecoder`.

    Each step extends every live beam by every token, keeps the 2K best candidates, and
    (as fairseq does) finalizes an EOS candidate only when it ranks within the top K --
    so beam_size=1 is exactly greedy decoding. A finished hypothesis Y scores
    log P(Y) / lp(|Y|) with the GNMT penalty (alpha=0: no normalization). The search stops
    once no live beam can beat the K-th finished one, or at max_length.

    Returns (tokens [B, K, max_length] without BOS, best first; scores [B, K]).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    encoded, inputs_valid = _encode(model, params, inputs, inputs_valid)
    batch, k = inputs.shape[0], beam_size
    repeat = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [B, ...] -> [B*K, ...]
    encoded, inputs_valid = repeat(encoded), repeat(inputs_valid)
    cache = init_encdec_cache(model, encoded, inputs_valid, max_length)
    step_fn = _encdec_step_fn(model, params, encoded, inputs_valid)

    alive_seqs = jnp.full((batch, k, max_length + 1), pad_id, jnp.int32).at[:, :, 0].set(
        bos_id)
    # Only beam 0 is live at the start, so the first step does not pick K copies.
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
    fin_seqs = jnp.full_like(alive_seqs, pad_id)
    fin_scores = jnp.full((batch, k), NEG_INF)

    def cond(state):
        i, _, alive_logp, _, fin_scores, _ = state
        best_possible = alive_logp[:, 0] / length_penalty(max_length, alpha)
        can_improve = jnp.any(best_possible > fin_scores[:, -1])
        return jnp.logical_and(i < max_length, can_improve)

    def body(state):
        i, alive_seqs, alive_logp, fin_seqs, fin_scores, cache = state
        tokens = lax.dynamic_slice_in_dim(alive_seqs, i, 1, axis=2).reshape(batch * k, 1)
        logits, cache = step_fn(tokens, None, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
        vocab = logp.shape[-1]
        cand = (alive_logp[..., None] + logp).reshape(batch, k * vocab)
        top_logp, top_idx = lax.top_k(cand, 2 * k)            # [B, 2K]
        top_beam, top_token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(alive_seqs, top_beam[..., None], axis=1)
        top_seqs = lax.dynamic_update_slice_in_dim(top_seqs, top_token[..., None], i + 1, 2)
        is_eos = top_token == eos_id
        # Finished candidates: EOS within the top K ranks.
        rank_ok = jnp.arange(2 * k)[None, :] < k
        new_scores = jnp.where(is_eos & rank_ok,
                               top_logp / length_penalty(i + 1.0, alpha), NEG_INF)
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        fin_scores, keep = lax.top_k(all_scores, k)
        fin_seqs = jnp.take_along_axis(all_seqs, keep[..., None], axis=1)
        # Live beams: the K best non-EOS candidates.
        live_logp = jnp.where(is_eos, NEG_INF, top_logp)
        alive_logp, keep = lax.top_k(live_logp, k)
        alive_seqs = jnp.take_along_axis(top_seqs, keep[..., None], axis=1)
        cache = _gather_beams(cache, jnp.take_along_axis(top_beam, keep, axis=1), batch, k)
        return i + 1, alive_seqs, alive_logp, fin_seqs, fin_scores, cache

    state = (jnp.array(0), alive_seqs, alive_logp, fin_seqs, fin_scores, cache)
    _, alive_seqs, alive_logp, fin_seqs, fin_scores, _ = lax.while_loop(cond, body, state)
    # Rows where nothing finished (max_length reached) fall back to the live beams.
    none_finished = fin_scores[:, 0] <= NEG_INF / 2
    alive_scores = alive_logp / length_penalty(max_length, alpha)
    seqs = jnp.where(none_finished[:, None, None], alive_seqs, fin_seqs)
    scores = jnp.where(none_finished[:, None], alive_scores, fin_scores)
    return seqs[:, :, 1:], scores
