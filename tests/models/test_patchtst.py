"""PatchTST: patching, channel independence, RevIN equivariances, the forward against a
hand assembly, mixed precision, the paper variant's parameter count, config errors.

Parameters are random (not the init) so that a wrong flatten order, a missing position
table or a channel leak changes the numbers.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import patchtst
from models import transformer as T

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, L, C, H = 2, 32, 3, 8
INPUTS = jnp.asarray(np.random.default_rng(0).normal(size=(B, L, C)).cumsum(1), jnp.float32)


def _cfg(**kw):
    return patchtst.make_config("tiny", **{**dict(lookback=L, horizon=H, channels=C), **kw})


def _random_params(model, x, seed=0):
    """Params with the model's shapes: N(0, 0.2^2) kernels/tables, N(0, 0.1^2) biases,
    norm scales and RevIN weights 1 + N(0, 0.1^2)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name in ("scale", "revin_weight"):
            return jnp.asarray(1.0 + 0.1 * r.normal(size=s.shape), s.dtype)
        std = 0.1 if "bias" in name else 0.2
        return jnp.asarray(std * r.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _fwd(model):
    return _jit(lambda p, x: model.apply({"params": p}, x))


def _model_and_params(**kw):
    model = patchtst.PatchTST(_cfg(**kw))
    return model, _random_params(model, INPUTS)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------
# Patching.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [22, 21, 23])   # S | L - P, and two that leave a tail
def test_patches_are_strided_slices_and_padding_repeats_the_last_value(length):
    P, S = 6, 4
    x = np.random.default_rng(1).normal(size=(2, 3, length)).astype(np.float32)
    n = (length - P) // S + 1
    patches = np.asarray(patchtst.patchify(jnp.asarray(x), P, S))
    assert patches.shape == (2, 3, n, P) and n == patchtst.num_patches(length, P, S, False)
    for i in range(n):
        np.testing.assert_array_equal(patches[..., i, :], x[..., i * S:i * S + P])
    padded = np.asarray(patchtst.patchify(jnp.asarray(x), P, S, pad_end=True))
    assert padded.shape[-2] == n + 1 == patchtst.num_patches(length, P, S, True)
    np.testing.assert_array_equal(padded[..., :n, :], patches)   # same patches, one more
    tail = np.concatenate([x, np.repeat(x[..., -1:], S, -1)], -1)[..., n * S:n * S + P]
    np.testing.assert_array_equal(padded[..., n, :], tail)
    # Plain patches stop short of the end when S does not divide L - P (length 21: step
    # 20 is in no patch); the padded patch starts at n*S <= L - 1, so it holds step L - 1.
    assert ((n - 1) * S + P == length) == ((length - P) % S == 0)
    assert n * S <= length - 1 and padded[..., n, length - 1 - n * S].tolist() == \
        x[..., -1].tolist()


def test_paper_patch_counts():
    # PatchTST/42 and /64 are named after N: L=336 and L=512 with P=16, S=8, end padding.
    assert patchtst.make_config("paper", lookback=336).num_patches == 42
    assert patchtst.make_config("paper", lookback=512).num_patches == 64
    assert patchtst.make_config("paper", lookback=336, pad_end=False).num_patches == 41


def test_encoder_is_a_nested_transformer_config_patchtst_completes():
    cfg = patchtst.make_config("paper", lookback=336, encoder=dict(num_layers=4))
    enc = cfg.encoder
    assert (enc.d_model, enc.num_heads, enc.num_layers, enc.mlp_dim,
            enc.dropout_rate) == (128, 16, 4, 256, 0.2)               # variant + override
    # The reference code's post-norm block; derived: no tables, max_length = N.
    assert (enc.norm_position, enc.kernel_init) == ("post", "xavier_uniform")
    assert (enc.vocab_size, enc.position, enc.max_length) == (1, "none", 42)
    assert cfg.replace(pad_end=False).encoder.max_length == 41          # re-derived


# ----------------------------------------------------------------------------------------
# The forward pass.
# ----------------------------------------------------------------------------------------
def test_forward_matches_hand_assembly():
    """RevIN -> patches @ W_p + b + W_pos -> the shared TransformerStack -> D-major flatten
    @ W_head + b -> RevIN inverse, per channel with one set of weights."""
    model, p = _model_and_params(revin_affine=True)
    cfg = model.cfg
    out = np.asarray(_fwd(model)(p, INPUTS))
    assert out.shape == (B, H, C) and out.dtype == np.float32
    x = np.asarray(INPUTS, np.float64)
    mean, std = x.mean(1, keepdims=True), np.sqrt(x.var(1, keepdims=True) + cfg.revin_eps)
    w, b = np.asarray(p["revin_weight"], np.float64), np.asarray(p["revin_bias"], np.float64)
    xn = (x - mean) / std * w + b
    series = xn.transpose(0, 2, 1).reshape(B * C, L)                   # channel c of b
    series = np.concatenate([series, np.repeat(series[:, -1:], cfg.stride, 1)], 1)
    n = cfg.num_patches
    tok = np.stack([series[:, i * cfg.stride:i * cfg.stride + cfg.patch_len]
                    for i in range(n)], 1)
    emb = (tok @ np.asarray(p["embedding"]["kernel"], np.float64) + p["embedding"]["bias"]
           + np.asarray(p["pos_embedding"], np.float64))
    enc = T.TransformerStack(cfg.encoder, cfg.encoder.num_layers).apply(
        {"params": p["encoder"]}, jnp.asarray(emb, jnp.float32))
    flat = np.asarray(enc, np.float64).transpose(0, 2, 1).reshape(B * C, -1)   # [D, N]
    y = flat @ np.asarray(p["head"]["kernel"], np.float64) + p["head"]["bias"]
    y = y.reshape(B, C, H).transpose(0, 2, 1)
    ref = (y - b) / (w + cfg.revin_eps ** 2) * std + mean
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_channel_independence():
    model, p = _model_and_params()
    fwd = _fwd(model)
    out = np.asarray(fwd(p, INPUTS))
    # Permuting the input channels permutes the forecasts the same way.
    perm = np.array([2, 0, 1])
    np.testing.assert_allclose(np.asarray(fwd(p, INPUTS[..., perm])), out[..., perm],
                               rtol=1e-6, atol=1e-6)
    # Channel 0's forecast depends on channel 0 only: changing channels 1, 2 changes nothing
    # there, and changes their own forecasts.
    other = INPUTS.at[..., 1:].set(jnp.asarray(np.random.default_rng(2).normal(
        size=(B, L, C - 1)) * 5.0, jnp.float32))
    changed = np.asarray(fwd(p, other))
    np.testing.assert_allclose(changed[..., 0], out[..., 0], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[..., 1:] - out[..., 1:]).min() > 1e-3
    # One shared model: the same weights applied to channel c alone, as a C=1 series.
    single = patchtst.PatchTST(_cfg(channels=1))
    for c in range(C):
        alone = np.asarray(_fwd(single)(p, INPUTS[..., c:c + 1]))
        np.testing.assert_allclose(alone[..., 0], out[..., c], rtol=1e-6, atol=1e-6)


def test_channel_mixing_ablation_does_mix():
    model, p = _model_and_params(channel_independence=False)
    d = model.cfg.encoder.d_model
    assert p["embedding"]["kernel"].shape == (C * model.cfg.patch_len, d)
    assert p["head"]["kernel"].shape == (d * model.cfg.num_patches, H * C)
    out = np.asarray(_fwd(model)(p, INPUTS))
    changed = np.asarray(_fwd(model)(p, INPUTS.at[..., 1].multiply(-1.0)))
    assert out.shape == (B, H, C) and np.abs(changed[..., 0] - out[..., 0]).max() > 1e-3


@pytest.mark.parametrize("affine", [False, True])
def test_revin_shift_and_scale_equivariance(affine):
    model, p = _model_and_params(revin_affine=affine)
    fwd = _fwd(model)
    out = np.asarray(fwd(p, INPUTS), np.float64)
    shift = jnp.asarray([[[10.0, -3.0, 0.5]]])                          # per channel
    np.testing.assert_allclose(np.asarray(fwd(p, INPUTS + shift)), out + np.asarray(shift),
                               rtol=1e-5, atol=2e-4)
    # Scaling by a > 0 scales the forecast by a. Not bit-exact: eps sits inside the sqrt
    # (std = sqrt(var + eps)), a relative error ~ eps / var, far below the tolerance.
    for a in (0.5, 3.0):
        np.testing.assert_allclose(np.asarray(fwd(p, INPUTS * a)), a * out, rtol=1e-4,
                                   atol=1e-4)
    # Without RevIN neither holds (the same weights see raw values).
    raw = patchtst.PatchTST(_cfg(revin=False, revin_affine=False))
    q = {k: v for k, v in p.items() if not k.startswith("revin")}
    base = np.asarray(_fwd(raw)(q, INPUTS))
    assert np.abs(np.asarray(_fwd(raw)(q, INPUTS + shift)) - base - shift).max() > 1e-2


def test_bfloat16_compute_float32_output_and_train_mode():
    model, p = _model_and_params(encoder=dict(dtype="bfloat16", dropout_rate=0.2),
                                 head_dropout=0.1)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))    # param_dtype
    out = model.apply({"params": p}, INPUTS)
    assert out.shape == (B, H, C) and out.dtype == jnp.float32
    ref = patchtst.PatchTST(model.cfg.replace(encoder=dict(dtype="float32"))).apply(
        {"params": p}, INPUTS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0.1, atol=0.1)
    # train=True draws dropout masks from the "dropout" rng; eval is deterministic.
    drop = model.apply({"params": p}, INPUTS, train=True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(drop) - np.asarray(out)).max() > 1e-3


def test_paper_parameter_count_by_hand():
    cfg = patchtst.make_config("paper", lookback=336, horizon=96, channels=7)
    shapes = jax.eval_shape(patchtst.PatchTST(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 336, 7)))["params"]
    D, F, P, Hz, layers = 128, 256, 16, 96, 3
    N = (336 - 16) // 8 + 1 + 1                       # 42 with the end padding
    embedding = P * D + D + N * D                     # W_p, b_p, W_pos
    attention = 4 * (D * D + D)                       # query, key, value, out
    mlp = (D * F + F) + (F * D + D)
    norms = 2 * 2 * D                                 # post-norm: 2 LayerNorms / block,
    head = D * N * Hz + Hz                            # no final norm
    assert N == 42
    assert _count(shapes) == embedding + layers * (attention + mlp + norms) + head == 921_184
    assert _count(shapes["head"]) == 516_192          # the head is over half the model
    # Channel independence: the count does not depend on C (RevIN affine adds 2C).
    with_affine = jax.eval_shape(patchtst.PatchTST(cfg.replace(revin_affine=True)).init,
                                 jax.random.key(0), jnp.zeros((1, 336, 7)))["params"]
    assert _count(with_affine) == 921_184 + 2 * 7


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(patch_len=40), r"model.patch_len \(40\) must be <= model.lookback \(32\)"),
    (dict(stride=0), "model.stride must be positive, got 0"),
    (dict(stride=-2), "model.stride must be positive, got -2"),
    (dict(encoder=dict(d_model=30, num_heads=4)),
     r"^model.encoder.d_model \(30\) must be divisible by model.encoder.num_heads \(4\), "
     r"or set model.encoder.head_dim$"),
    (dict(head_dropout=1.0), r"model.head_dropout must be in \[0, 1\)"),
    (dict(encoder=dict(norm="batchnorm")),
     "^model.encoder.norm='batchnorm' is not allowed; allowed: layernorm, rmsnorm$"),
    (dict(encoder=dict(dtype="int8")),
     "^model.encoder.dtype='int8' is not allowed; allowed: float32, bfloat16, float16$"),
    (dict(encoder=dict(remat_policy="x")), "^model.encoder.remat_policy='x' is not allowed"),
    (dict(encoder=dict(max_length=4)),
     r"model.encoder keys \['max_length'\] are set by the patchtst config itself"),
    (dict(d_model=32), r"unknown patchtst config keys \['d_model'\]"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)


def test_variant_and_input_errors():
    with pytest.raises(ValueError, match="unknown patchtst variant 'huge'"):
        patchtst.make_config("huge")
    with pytest.raises(ValueError, match=r"unknown patchtst config keys \['patch'\]"):
        patchtst.make_config("tiny", patch=4)
    model = patchtst.PatchTST(_cfg())
    with pytest.raises(ValueError, match=r"inputs must be \[batch, 32, 3\]"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 3)))
