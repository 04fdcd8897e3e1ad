"""ViT: patchify, patch embedding == conv, the paper's equations 1-4, pooling, parameter
counts of the published sizes, variant decoding, mixed precision, hooks and errors.

The forward is checked against an assembly of eqs. 1-4 written out here (patchify @ E,
class token, E_pos, the shared TransformerStack, token 0 / mean, head), so a wrong token
order, a position table added to the wrong tokens, a missing final LayerNorm or pooling the
wrong token all change the numbers. Parameters are random (not the init, whose zero class
token, zero head and 0.02-std tables hide mistakes).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as T
from models import vit

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)


def _cfg(encoder=(), **kw):
    """tiny/4 at 16x16, width 32; `encoder` updates the nested TransformerConfig."""
    return vit.make_config("tiny/4", **{**dict(image_size=16, num_classes=5), **kw},
                           encoder={**dict(d_model=32, mlp_dim=64), **dict(encoder)})


def _random_params(model, images, seed=0):
    """Params with the model's shapes: N(0, 0.2^2) kernels/tables, N(0, 0.1^2) biases,
    LayerNorm scales 1 + N(0, 0.1^2)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * r.normal(size=s.shape), s.dtype)
        std = 0.1 if name == "bias" else 0.2
        return jnp.asarray(std * r.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _fwd(model):
    return _jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------
# patchify and the patch embedding.
# ----------------------------------------------------------------------------------------
def test_patchify_round_trip_and_exact_pixel_blocks():
    x = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)
    patches = np.asarray(vit.patchify(jnp.asarray(x), 4))
    assert patches.shape == (2, 6, 48)  # (8/4) * (12/4) patches of 4*4*3 pixels
    for n in range(6):
        i, j = divmod(n, 3)  # row-major over the 2 x 3 patch grid
        np.testing.assert_array_equal(patches[:, n],
                                      x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1))
    np.testing.assert_array_equal(vit.unpatchify(jnp.asarray(patches), 4, 8, 12), x)
    with pytest.raises(ValueError, match="not divisible by the patch size 5"):
        vit.patchify(jnp.asarray(x), 5)


def test_patch_embedding_is_the_strided_convolution():
    emb = vit.PatchEmbedding(patch=4, features=7)
    x = IMAGES
    p = _random_params(emb, x)
    kernel, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    assert kernel.shape == (4, 4, 3, 7)  # conv layout [P, P, C, D]
    out = np.asarray(emb.apply({"params": p}, x))
    # patchify @ the reshaped kernel, in float64...
    ref = np.asarray(vit.patchify(x, 4), np.float64) @ kernel.reshape(48, 7) + bias
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # ...and the P x P, stride-P convolution it stands for.
    conv = jax.lax.conv_general_dilated(x, p["kernel"], (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    np.testing.assert_allclose(out, np.asarray(conv).reshape(2, 16, 7) + bias, atol=1e-5)


# ----------------------------------------------------------------------------------------
# The forward pass: eqs. 1-4, "cls" vs "gap", pre-logits.
# ----------------------------------------------------------------------------------------
def _reference(cfg, p, images):
    """Eqs. 1-4 assembled by hand around the shared encoder -> (head input, logits)."""
    tokens = vit.patchify(images, cfg.patch_size) @ p["embedding"]["kernel"].reshape(
        -1, cfg.encoder.d_model) + p["embedding"]["bias"]            # x_p E (+ bias)
    if cfg.pool == "cls":
        cls = jnp.broadcast_to(p["cls"], (images.shape[0], 1, cfg.encoder.d_model))
        tokens = jnp.concatenate([cls, tokens], axis=1)             # [x_class; x_p E]
    z0 = tokens + p["pos_embedding"]                                 # + E_pos  (eq. 1)
    stack = T.TransformerStack(cfg.encoder, cfg.encoder.num_layers)  # eqs. 2, 3 + LN
    zl = stack.apply({"params": p["encoder"]}, z0)
    y = zl[:, 0] if cfg.pool == "cls" else zl.mean(axis=1)           # eq. 4 / GAP
    if cfg.representation_size:
        y = jnp.tanh(y @ p["representation"]["kernel"] + p["representation"]["bias"])
    return y, y @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("pool,rep", [("cls", None), ("gap", None), ("cls", 24)])
def test_forward_matches_the_paper_equations(pool, rep):
    cfg = _cfg(pool=pool, representation_size=rep)
    model = vit.ViT(cfg)
    p = _random_params(model, IMAGES)
    logits, state = _fwd(model)(p, IMAGES)
    pre, expected = _reference(cfg, p, IMAGES)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.abs(np.asarray(expected)).max() > 0.5  # O(1) logits: the tolerance means it
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    inter = state["intermediates"]
    np.testing.assert_allclose(inter["pre_logits"][0], pre, atol=1e-5)
    tokens = 16 + (pool == "cls")
    assert inter["encoded"][0].shape == (2, tokens, 32)
    assert p["pos_embedding"].shape == (1, tokens, 32)  # E_pos covers the class token too
    assert ("cls" in p) == (pool == "cls")


def test_cls_pools_token_zero_and_gap_pools_the_mean():
    """cls: the head sees exactly encoded[:, 0] (not the mean); gap: exactly the mean."""
    for pool in ("cls", "gap"):
        model = vit.ViT(_cfg(pool=pool))
        p = _random_params(model, IMAGES, seed=3)
        _, state = _fwd(model)(p, IMAGES)
        enc, pre = state["intermediates"]["encoded"][0], state["intermediates"]["pre_logits"][0]
        pooled, other = (enc[:, 0], enc.mean(1)) if pool == "cls" else (enc.mean(1), enc[:, 0])
        np.testing.assert_allclose(pre, pooled, atol=1e-6)
        assert np.abs(np.asarray(pre - other)).max() > 1e-2


def test_features_without_head_and_head_zero_init():
    feats_model = vit.ViT(_cfg(num_classes=0))
    p = _random_params(feats_model, IMAGES)
    feats, _ = _fwd(feats_model)(p, IMAGES)
    assert feats.shape == (2, 32) and feats.dtype == jnp.float32 and "head" not in p
    assert vit.make_config("B/16", representation_size=768).feature_dim == 768
    init = nn.unbox(vit.ViT(_cfg()).init(jax.random.key(0), IMAGES)["params"])
    assert not np.any(np.asarray(init["head"]["kernel"]))  # logits start at exactly 0
    assert abs(float(np.std(init["pos_embedding"])) - 0.02) < 0.005


def test_dropout_is_active_in_training_only():
    model = vit.ViT(_cfg(encoder=dict(dropout_rate=0.3)))
    p = _random_params(model, IMAGES)
    ev = model.apply({"params": p}, IMAGES)
    np.testing.assert_array_equal(ev, model.apply({"params": p}, IMAGES, train=False))
    tr = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(tr - ev)).max() > 1e-3


# ----------------------------------------------------------------------------------------
# Published sizes: parameter counts via eval_shape (nothing allocated or compiled).
# ----------------------------------------------------------------------------------------
def _formula(width, depth, mlp, patch, image=224, channels=3, classes=1000, cls=True):
    n = (image // patch) ** 2 + cls
    per_layer = (2 * width                    # LayerNorm before attention
                 + 4 * (width * width + width)  # q, k, v, out projections with biases
                 + 2 * width                  # LayerNorm before the MLP
                 + width * mlp + mlp + mlp * width + width)
    return (patch * patch * channels * width + width   # patch embedding
            + cls * width + n * width                  # class token, E_pos
            + depth * per_layer + 2 * width            # encoder + final LayerNorm
            + width * classes + classes)               # head


@pytest.mark.parametrize("variant,expected", [
    ("B/16", 86_567_656), ("Ti/16", 5_717_416), ("B/32", 88_224_232)])
def test_parameter_counts(variant, expected):
    cfg = vit.make_config(variant, num_classes=1000)
    shapes = nn.unbox(jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 224, 224, 3)))["params"])
    enc = cfg.encoder
    assert _count(shapes) == _formula(enc.d_model, enc.num_layers, enc.mlp_dim, cfg.patch_size)
    assert _count(shapes) == expected  # timm's vit_{base,tiny}_patch{16,32}_224
    assert shapes["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].shape == (enc.d_model,
                                                                           4 * enc.d_model)


def test_gap_large_variant_shapes_and_scan():
    cfg = vit.make_config("L/16", pool="gap", num_classes=0,
                          encoder=dict(scan_layers=True, remat_policy="full"))
    x = jnp.zeros((2, 224, 224, 3))
    shapes = nn.unbox(jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), x)["params"])
    assert shapes["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (24, 1024, 4096)
    assert _count(shapes) == _formula(1024, 24, 4096, 16, classes=0, cls=False)
    out = jax.eval_shape(lambda p: vit.ViT(cfg).apply({"params": p}, x), shapes)
    assert out.shape == (2, 1024) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------------------
# Variants, precision, hooks, errors.
# ----------------------------------------------------------------------------------------
def test_variant_decoding():
    cfg = vit.make_config("S/32")
    enc = cfg.encoder
    assert (enc.d_model, enc.num_layers, enc.num_heads, enc.mlp_dim, cfg.patch_size,
            cfg.image_size) == (384, 12, 6, 1536, 32, 224)
    for size, (w, d, h) in {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12),
                            "L": (1024, 24, 16)}.items():
        c = vit.make_config(f"{size}/16").encoder
        assert (c.d_model, c.num_layers, c.num_heads, c.mlp_dim) == (w, d, h, 4 * w)
    assert vit.make_config("tiny/4").image_size == 32
    assert vit.make_config("B/16", image_size=384).num_patches == 24 * 24


def test_encoder_is_a_nested_transformer_config_the_vit_completes():
    cfg = vit.make_config("S/16", pool="gap", encoder=dict(dropout_rate=0.1))
    enc = cfg.encoder
    assert (enc.d_model, enc.num_layers, enc.dropout_rate) == (384, 12, 0.1)  # merged
    # The reference code's block: pre-norm, exact GELU, LayerNorm eps 1e-6, Xavier kernels.
    assert (enc.norm, enc.norm_position, enc.norm_epsilon, enc.activation,
            enc.kernel_init) == ("layernorm", "pre", 1e-6, "gelu", "xavier_uniform")
    # Derived: no token / position table, max_length = the 14 * 14 patch tokens.
    assert (enc.vocab_size, enc.position, enc.max_length) == (1, "none", 196)
    assert cfg.replace(pool="cls").encoder.max_length == 197        # re-derived
    assert cfg.replace(encoder=dict(num_layers=3)).encoder == enc.replace(num_layers=3)
    hook = functools.partial(jax.lax.dot_general)
    assert vit.make_config("tiny/4", dot_general=hook).encoder.dot_general is hook


def test_bf16_compute_with_f32_params_is_finite_float32():
    model = vit.ViT(_cfg(encoder=dict(dtype="bfloat16"), pool="gap"))
    p = _random_params(model, IMAGES)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    logits, state = _fwd(model)(p, IMAGES)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert state["intermediates"]["encoded"][0].dtype == jnp.bfloat16
    ref, _ = _fwd(vit.ViT(_cfg(pool="gap")))(p, IMAGES)
    np.testing.assert_allclose(logits, ref, atol=0.15)  # bf16: ~3 significant digits


def test_dot_general_hook_sees_every_matmul():
    calls = []

    def hook(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    model = vit.ViT(_cfg(dot_general=hook, representation_size=8))
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    # patch embedding 1; per layer q, k, v, scores, weights @ V, out, fc1, fc2 = 8;
    # pre-logits 1; head 1
    assert len(calls) == 1 + 2 * 8 + 1 + 1


@pytest.mark.parametrize("make,match", [
    (lambda: vit.make_config("X/16"), r"unknown ViT size 'X' in variant 'X/16'; allowed "
                                      r"sizes: tiny, Ti, S, B, L, H"),
    (lambda: vit.make_config("B16"), r"'B16' is not of the form '<size>/<patch>'"),
    (lambda: vit.make_config("B/16", heads=4), r"unknown vit config keys \['heads'\]"),
    (lambda: vit.make_config("B/16", pool="max"),
     "model.pool='max' is not allowed; allowed: cls, gap"),
    (lambda: vit.make_config("B/16", image_size=200),
     r"model.image_size \(200\) must be divisible by model.patch_size \(16\)"),
    (lambda: vit.make_config("B/16", width=768), r"unknown vit config keys \['width'\]"),
    (lambda: vit.make_config("tiny/4", encoder=dict(d_model=33)),
     r"^model.encoder.d_model \(33\) must be divisible by model.encoder.num_heads \(2\), "
     r"or set model.encoder.head_dim$"),
    (lambda: vit.make_config("tiny/4", encoder=dict(dropout_rate=1.0)),
     r"^model.encoder.dropout_rate must be in \[0, 1\), got 1.0$"),
    (lambda: vit.make_config("tiny/4", encoder=dict(attention_impl="flash")),
     "^model.encoder.attention_impl='flash' is not allowed; allowed: reference, fused$"),
    (lambda: vit.make_config("tiny/4", encoder=dict(depth=3)),
     r"unknown vit.encoder config keys \['depth'\]; allowed: activation, "),
    (lambda: vit.make_config("tiny/4", encoder=dict(max_length=8)),
     r"model.encoder keys \['max_length'\] are set by the vit config itself"),
    (lambda: _cfg().replace(encoder=dict(num_heads=5)),
     r"model.encoder.d_model \(32\) must be divisible by model.encoder.num_heads \(5\)"),
    (lambda: jax.eval_shape(vit.ViT(_cfg()).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3))),
     r"images must be \[batch, 16, 16, 3\] \(model.image_size, model.channels\)"),
])
def test_errors_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()
