"""U-Net: float64 NumPy forward reference (both upsamplings, batch / group / no norm),
spatial sizes and their errors, skip connections, the transposed conv against flax's,
parameter counts in closed form, batch-norm state, hooks and config errors.

Parameters and running statistics are random (not the init), so a wrong wiring cannot
hide behind zero biases or unit variances.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import unet



def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------------------
# NumPy float64 reference (NHWC, kernels HWIO).
# ----------------------------------------------------------------------------------------
def _np_conv3x3(x, p):
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(xp[:, di:di + h, dj:dj + w] @ p["kernel"][di, dj]
              for di in range(3) for dj in range(3))
    return out + p.get("bias", 0.0)


def _np_norm(x, cfg, p, s):
    if cfg.norm == "batch":   # evaluation: running statistics
        return (x - s["mean"]) / np.sqrt(s["var"] + cfg.bn_epsilon) * p["scale"] + p["bias"]
    if cfg.norm == "group":   # statistics per example and group of C / G channels
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, cfg.group_norm_groups, c // cfg.group_norm_groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = g.var(axis=(1, 2, 4), keepdims=True)
        g = (g - mean) / np.sqrt(var + 1e-6)                  # flax GroupNorm's epsilon
        return g.reshape(x.shape) * p["scale"] + p["bias"]
    return x


def _np_block(x, cfg, p, s):
    for i in range(2):
        x = np.maximum(_np_norm(_np_conv3x3(x, p[f"conv{i}"]), cfg, p.get(f"norm{i}"),
                                s.get(f"norm{i}")), 0.0)
    return x


def _np_transpose2x2(x, p):
    """out[2i + a, 2j + b] = x[i, j] @ W[1 - a, 1 - b] + bias (lax.conv_transpose)."""
    b, h, w, _ = x.shape
    out = np.zeros((b, 2 * h, 2 * w, p["kernel"].shape[-1]))
    for a in range(2):
        for c in range(2):
            out[:, a::2, c::2] = x @ p["kernel"][1 - a, 1 - c]
    return out + p["bias"]


def _np_bilinear2x(x):
    """Half-pixel-center bilinear x2 (edge-clamped): output 2i is 0.75 x[i] + 0.25 x[i-1],
    output 2i+1 is 0.75 x[i] + 0.25 x[i+1], per axis."""
    def along(x, axis):
        prev = np.concatenate([np.take(x, [0], axis), np.take(x, range(x.shape[axis] - 1),
                                                              axis)], axis)
        nxt = np.concatenate([np.take(x, range(1, x.shape[axis]), axis),
                              np.take(x, [-1], axis)], axis)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        return np.stack([even, odd], axis + 1).reshape(
            x.shape[:axis] + (2 * x.shape[axis],) + x.shape[axis + 1:])
    return along(along(x, 1), 2)


def _np_unet(x, cfg, params, stats):
    skips = []
    for i in range(cfg.depth):
        x = _np_block(x, cfg, params[f"down{i}"], stats.get(f"down{i}", {}))
        skips.append(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = _np_block(x, cfg, params["bottleneck"], stats.get("bottleneck", {}))
    for i in reversed(range(cfg.depth)):
        up = params[f"up{i}"]
        x = (_np_transpose2x2(x, up) if cfg.upsampling == "transpose"
             else _np_conv3x3(_np_bilinear2x(x), up))
        x = _np_block(np.concatenate([skips[i], x], -1), cfg, params[f"dec{i}"],
                      stats.get(f"dec{i}", {}))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.mark.parametrize("upsampling,norm,depth", [
    ("transpose", "batch", 2), ("bilinear", "batch", 2), ("transpose", "none", 1),
    ("bilinear", "group", 1)])
def test_forward_equals_float64_numpy(upsampling, norm, depth, random_variables, jit):
    cfg = unet.UNetConfig(depth=depth, base_channels=4, upsampling=upsampling, norm=norm,
                          group_norm_groups=2, num_classes=3)
    model = unet.UNet(cfg)
    x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    v = random_variables(model, x, kernel_gain=np.sqrt(2.0))
    got = jit(model.apply)(v, x)
    assert got.dtype == jnp.float32 and got.shape == (2, 8, 8, 3)
    want = _np_unet(x.astype(np.float64), cfg, _f64(v["params"]),
                    _f64(v.get("batch_stats", {})))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_transposed_conv_equals_flax_conv_transpose(random_variables, jit):
    cfg = unet.UNetConfig(depth=1, base_channels=4)
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 6)).astype(np.float32)

    class Up(nn.Module):
        @nn.compact
        def __call__(self, x):
            return unet.upsample(cfg, x, 4, name="up")

    v = random_variables(Up(), x, kernel_gain=np.sqrt(2.0))
    ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
    got = jit(Up().apply)(v, x)
    assert got.shape == (2, 6, 10, 4)
    np.testing.assert_allclose(got, jit(ref.apply)({"params": v["params"]["up"]}, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upsampling", unet.UPSAMPLING)
@pytest.mark.parametrize("depth,size", [(1, (6, 10)), (2, (8, 8)), (2, (12, 20)),
                                        (3, (16, 8))])
def test_output_keeps_spatial_size(upsampling, depth, size):
    cfg = unet.UNetConfig(depth=depth, base_channels=4, upsampling=upsampling, num_classes=7)
    model = unet.UNet(cfg)
    x = jnp.zeros((3, *size, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, v, x)
    assert out.shape == (3, *size, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize("upsampling", unet.UPSAMPLING)
@pytest.mark.parametrize("size", [(12, 12), (16, 20), (30, 32)])
def test_size_not_divisible_by_two_to_the_depth_raises(upsampling, size):
    model = unet.UNet(unet.UNetConfig(depth=3, base_channels=4, upsampling=upsampling))
    with pytest.raises(ValueError) as err:
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *size, 3)))
    msg = str(err.value)
    assert f"{size[0]}x{size[1]}" in msg and "depth=3" in msg
    assert "multiples of 2^depth = 8" in msg and "8, 16, 32" in msg


def test_skip_connections_feed_the_decoder(random_variables, jit):
    """dec{i}/conv0 sees [skip_i, upsampled]: zeroing the kernel rows that read the skip
    (= feeding a zero skip) changes the output, and the skip's gradient is non-zero."""
    cfg = unet.UNetConfig(depth=2, base_channels=4, norm="none", num_classes=3)
    model = unet.UNet(cfg)
    x = np.random.default_rng(3).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    v = random_variables(model, x, kernel_gain=np.sqrt(2.0))
    apply = jit(model.apply)
    base = apply(v, x)
    grad = jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(v["params"])
    for level in range(cfg.depth):
        kernel = v["params"][f"dec{level}"]["conv0"]["kernel"]
        c = cfg.channels(level)
        assert kernel.shape == (3, 3, 2 * c, c)    # skip (c) + upsampled (c) channels
        no_skip = jax.tree.map(lambda a: a, v)
        no_skip["params"][f"dec{level}"]["conv0"]["kernel"] = kernel.at[:, :, :c].set(0)
        assert float(jnp.max(jnp.abs(apply(no_skip, x) - base))) > 1e-2, level
        assert float(jnp.abs(grad[f"dec{level}"]["conv0"]["kernel"][:, :, :c]).max()) > 0


def _count_closed_form(depth, base, c_in, classes, upsampling):
    """Parameters with batch norm: conv3x3 (no bias) + BN (scale, bias) per conv."""
    def block(i, o):
        return 9 * i * o + 2 * o + 9 * o * o + 2 * o
    w = [base * 2 ** i for i in range(depth + 1)]
    n = block(c_in, w[0]) + sum(block(w[i - 1], w[i]) for i in range(1, depth + 1))
    up_k = 4 if upsampling == "transpose" else 9
    n += sum(up_k * w[i + 1] * w[i] + w[i] + block(2 * w[i], w[i]) for i in range(depth))
    return n + w[0] * classes + classes


@pytest.mark.parametrize("variant,upsampling", [("base", "transpose"), ("base", "bilinear"),
                                                ("small", "transpose"), ("tiny", "bilinear")])
def test_parameter_count_closed_form(variant, upsampling):
    cfg = unet.make_config(variant, upsampling=upsampling, num_classes=2)
    v = jax.eval_shape(unet.UNet(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
    assert count == _count_closed_form(cfg.depth, cfg.base_channels, 3, 2, upsampling)
    if variant == "base" and upsampling == "transpose":
        assert count == 31_037_698   # the paper's widths (64 .. 1024) with batch norm


def test_batch_norm_updates_running_stats_only_in_training(forward, jit):
    model = unet.UNet(unet.make_config("tiny", depth=1))
    x = np.random.default_rng(4).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    v = jit(model.init)(jax.random.key(0), x)
    _, updates = forward(model, True)(v, x)
    mean = updates["batch_stats"]["down0"]["norm0"]["mean"]
    assert float(jnp.abs(mean).max()) > 0              # moved from its zero init
    # Evaluation (no mutable collections: an update would raise) normalizes with the
    # running averages, so each example is independent of the rest of the batch.
    np.testing.assert_allclose(forward(model)(v, x)[0][:1], forward(model)(v, x[:1])[0], atol=1e-5)


def test_group_and_no_norm_have_no_batch_stats_and_no_norm_has_biases():
    x = jnp.zeros((1, 8, 8, 3))
    for norm, biased in (("group", False), ("none", True)):
        v = jax.eval_shape(unet.UNet(unet.make_config("tiny", norm=norm)).init,
                           jax.random.key(0), x)
        assert "batch_stats" not in v
        assert ("bias" in v["params"]["down0"]["conv0"]) == biased


def test_hooks_see_every_conv_and_the_head():
    calls = {"conv": 0, "dot": 0}

    def conv(*args, **kwargs):
        calls["conv"] += 1
        return lax.conv_general_dilated(*args, **kwargs)

    def dot(*args, **kwargs):
        calls["dot"] += 1
        return lax.dot_general(*args, **kwargs)

    for upsampling in unet.UPSAMPLING:
        calls.update(conv=0, dot=0)
        cfg = unet.make_config("tiny", upsampling=upsampling, conv_general_dilated=conv,
                               dot_general=dot)
        x = jnp.zeros((1, 8, 8, 3))
        v = jax.eval_shape(unet.UNet(cfg).init, jax.random.key(0), x)
        calls.update(conv=0, dot=0)
        jax.eval_shape(unet.UNet(cfg).apply, v, x)
        # 2 convs per encoder level, bottleneck and decoder level, + 1 per upsampling.
        assert calls == {"conv": 2 * (2 * cfg.depth + 1) + cfg.depth, "dot": 1}


def test_bfloat16_compute_gives_float32_logits():
    cfg = unet.make_config("tiny", dtype="bfloat16")
    x = jnp.zeros((1, 8, 8, 3))
    v = jax.eval_shape(unet.UNet(cfg).init, jax.random.key(0), x)
    assert jax.eval_shape(unet.UNet(cfg).apply, v, x).dtype == jnp.float32


@pytest.mark.parametrize("overrides,words", [
    (dict(upsampling="nearest"), ["model.upsampling", "transpose, bilinear"]),
    (dict(norm="layer"), ["model.norm", "batch, group, none"]),
    (dict(depth=0), ["model.depth", ">= 1"]),
    (dict(norm="group", base_channels=12, group_norm_groups=8), ["divisible", "12", "8"]),
    (dict(bn_momentum=1.0), ["bn_momentum"]),
    (dict(bn_running_variance="torch"), ["model.bn_running_variance", "biased, unbiased"]),
    (dict(widths=3), ["unknown unet config keys", "base_channels"]),
])
def test_config_errors_name_the_key_and_what_is_allowed(overrides, words):
    with pytest.raises(ValueError) as err:
        unet.make_config("small", **overrides)
    for w in words:
        assert w in str(err.value)


def test_unknown_variant_lists_variants():
    with pytest.raises(ValueError, match="tiny, small, base"):
        unet.make_config("huge")
