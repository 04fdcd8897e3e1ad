"""A mixture-of-experts decoder keeps the transformer's invariants: causal (capacity is
filled in token order, so a later token never takes an earlier one's slot), KV-cache
decoding equals the full forward, scanned equals unrolled; and the compression
transforms reach every expert (each expert's kernel its own [in, out])."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from models import decoding
from models import transformer as T
from models.compress import prune, quantize

V = 13
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def moe_decoder(**moe):
    cfg = T.make_config("tiny", vocab_size=V, max_length=16, num_layers=2,
                        moe={"every": 1, "num_experts": 4, "top_k": 2, **moe})
    return T.Decoder(cfg)


def params_of(model, tokens, seed=0):
    params = nn.unbox(_jit(model.init)(jax.random.key(seed), tokens)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: np.asarray(p) + 0.2 * rng.normal(size=p.shape).astype(
        np.float32), params)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 8)))


def forward(model):
    return _jit(lambda p, t: model.apply({"params": p}, t))


def test_moe_decoder_is_causal_with_a_binding_capacity():
    model = moe_decoder(capacity_factor=0.5)       # C = 2 slots per expert per row
    p = params_of(model, TOKENS)
    _, sown = model.apply({"params": p}, TOKENS, mutable=[T.MOE_STATS])
    stats = sown[T.MOE_STATS]["decoder"]["layers_0"]["stats"][0]
    assert float(stats["dropped"]) > 0.2            # tokens do overflow
    t = 3
    changed = TOKENS.at[:, t + 1:].set((TOKENS[:, t + 1:] + 5) % V)
    a, b = forward(model)(p, TOKENS), forward(model)(p, changed)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert np.abs(np.asarray(a[:, t + 1:] - b[:, t + 1:])).max() > 1e-2


def test_moe_kv_cache_decoding_equals_the_full_forward():
    model = moe_decoder(capacity_factor=0.0)        # per-step decoding never drops
    p = params_of(model, TOKENS)
    full = forward(model)(p, TOKENS)
    cache = decoding.init_decoder_cache(model, 2, 8)
    step = _jit(lambda p, c, t, v: model.apply({"params": p, "cache": c}, t, valid=v,
                                               decode=True, mutable=["cache"]))
    outs = []
    for i in range(8):
        logits, updated = step(p, cache, TOKENS[:, i:i + 1], jnp.ones((2, 1), bool))
        cache = updated["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_scanned_moe_stack_equals_unrolled():
    model = moe_decoder()
    p = params_of(model, TOKENS)
    scanned = T.Decoder(model.cfg.replace(scan_layers=True))
    np.testing.assert_allclose(forward(scanned)(T.stack_layers(p), TOKENS),
                               forward(model)(p, TOKENS), atol=1e-5)
    with pytest.raises(ValueError, match="mixes dense and MoE layers"):
        model.cfg.replace(scan_layers=True, moe=model.cfg.moe.__class__(every=2))


def test_compression_reaches_every_expert():
    """int8 per-channel PTQ gives each expert its own scales (the expert axis is a stack
    axis) and the quantized model stays close; 50% magnitude pruning per layer prunes
    each expert's kernel by half."""
    model = moe_decoder(capacity_factor=0.0)
    p = params_of(model, TOKENS)
    q = quantize.quantize_tree(p)
    kernel = q["decoder"]["layers_0"]["moe"]["fc1"]["kernel"]
    assert isinstance(kernel, quantize.QuantizedArray)
    assert kernel.scale.shape == (4, 1, p["decoder"]["layers_0"]["moe"]["fc1"]["kernel"].shape[-1])
    assert not isinstance(q["decoder"]["layers_0"]["moe"]["router"]["kernel"],
                          quantize.QuantizedArray)        # the router stays float
    # The last layer's experts int8, everything else float (so no routing decision
    # upstream moves): the outputs move by the experts' rounding only.
    back = jax.tree.map(np.asarray, p)
    back["decoder"]["layers_1"]["moe"] = quantize.dequantize_tree(
        q["decoder"]["layers_1"]["moe"])
    ref = np.asarray(forward(model)(p, TOKENS))
    err = np.abs(np.asarray(forward(model)(back, TOKENS)) - ref).max()
    assert 0 < err < 0.02 * np.abs(ref).max()
    pruned, _ = prune.magnitude(p, 0.5)
    w = np.asarray(pruned["decoder"]["layers_1"]["moe"]["fc2"]["kernel"])
    np.testing.assert_allclose((w == 0).reshape(4, -1).mean(1), 0.5, atol=0.02)
