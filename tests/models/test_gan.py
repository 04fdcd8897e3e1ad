"""DCGAN module: shapes and ranges, the transposed conv against a float64 NumPy scatter
reference, batch-norm collections, parameter counts in closed form, hooks and errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gan


def _init(cfg, batch=2):
    model = gan.GAN(cfg)
    z = jnp.zeros((batch, cfg.latent_dim))
    x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels))
    return model, jax.jit(model.init)(jax.random.key(0), z, x)


@pytest.mark.parametrize("image_size,channels,norm,output", [
    (32, 3, "batch", "tanh"), (16, 1, "layer", "sigmoid")])
def test_output_shapes_and_ranges(image_size, channels, norm, output):
    cfg = gan.make_config("tiny", image_size=image_size, channels=channels, g_norm=norm,
                          d_norm=norm, output=output)
    model, v = _init(cfg)
    z = jax.random.normal(jax.random.key(1), (5, cfg.latent_dim))
    images = jax.jit(functools.partial(model.apply, method="generate"))(v, z)
    assert images.shape == (5, image_size, image_size, channels)
    assert images.dtype == jnp.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    logits = jax.jit(functools.partial(model.apply, method="discriminate"))(v, images)
    assert logits.shape == (5,) and logits.dtype == jnp.float32
    assert set(v["params"]) == {"generator", "discriminator"}
    assert ("batch_stats" in v) == (norm == "batch")
    n = cfg.num_upsamplings
    assert n == int(np.log2(image_size)) - 2
    assert set(v["params"]["generator"]) >= {"project", *(f"up{i}" for i in range(1, n + 1))}
    # No norm on the discriminator's first layer (DCGAN), so it keeps its bias.
    assert "norm1" not in v["params"]["discriminator"]
    assert "bias" in v["params"]["discriminator"]["down1"]


def _transposed_conv_numpy(x, w, bias):
    """PyTorch ConvTranspose2d(k=4, s=2, p=1): out[2i - 1 + a, 2j - 1 + b] += x[i, j] w[a, b]."""
    b, h, wd, _ = x.shape
    out = np.zeros((b, 2 * h + 2, 2 * wd + 2, w.shape[-1]))  # 1-pixel margin = the padding
    for i in range(h):
        for j in range(wd):
            for a in range(4):
                for c in range(4):
                    out[:, 2 * i + a, 2 * j + c] += x[:, i, j] @ w[a, c]
    return out[:, 1:-1, 1:-1] + bias


def test_up_conv_equals_numpy_transposed_convolution():
    cfg = gan.make_config("tiny")
    layer = gan.UpConv(5, True, cfg)
    r = np.random.default_rng(0)
    x = r.normal(size=(2, 3, 4, 6)).astype(np.float32)
    params = {"params": {"kernel": r.normal(size=(4, 4, 6, 5)).astype(np.float32),
                         "bias": r.normal(size=(5,)).astype(np.float32)}}
    assert jax.tree.map(np.shape, layer.init(jax.random.key(0), x)) == jax.tree.map(
        np.shape, params)
    got = np.asarray(layer.apply(params, x))
    want = _transposed_conv_numpy(x.astype(np.float64), params["params"]["kernel"]
                                  .astype(np.float64), params["params"]["bias"])
    assert got.shape == (2, 6, 8, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ... which is lax.conv_transpose with the kernel stored [4, 4, C_out, C_in].
    ref = jax.lax.conv_transpose(x, np.swapaxes(params["params"]["kernel"], 2, 3), (2, 2),
                                 ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 transpose_kernel=True)
    np.testing.assert_allclose(got, np.asarray(ref) + params["params"]["bias"], rtol=1e-5,
                               atol=1e-5)


def test_parameter_count_closed_form():
    cfg = gan.make_config("small")  # batch norm in both halves, S = 32, n = 3
    variables = jax.eval_shape(lambda: _init(cfg)[1])   # shapes only, no compute
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa
    z, w = cfg.latent_dim, cfg.g_width
    c0 = 4 * w                      # 128 channels at 4x4
    g = (z * 16 * c0 + 2 * c0       # project (no bias: BN follows) + norm0
         + 16 * c0 * 2 * w + 2 * 2 * w + 16 * 2 * w * w + 2 * w  # up1 + norm1, up2 + norm2
         + 16 * w * 3 + 3)          # up3 (+ bias: no norm after the output layer)
    d = cfg.d_width
    disc = (16 * 3 * d + d          # down1 with bias
            + 16 * d * 2 * d + 2 * 2 * d + 16 * 2 * d * 4 * d + 2 * 4 * d  # down2/3 + norms
            + 16 * 4 * d + 1)       # logit: Dense on the flat 4x4x4d map
    assert count(variables["params"]["generator"]) == g == 296_899
    assert count(variables["params"]["discriminator"]) == disc == 167_841


def test_batch_norm_train_updates_only_the_called_half_and_eval_is_per_example():
    cfg = gan.make_config("tiny")
    model, v = _init(cfg)
    z = jax.random.normal(jax.random.key(1), (6, cfg.latent_dim))
    _, upd = model.apply(v, z, train=True, method="generate", mutable=["batch_stats"])
    new, old = upd["batch_stats"], v["batch_stats"]
    assert not np.allclose(new["generator"]["norm0"]["mean"], old["generator"]["norm0"]["mean"])
    for a, b in zip(jax.tree.leaves(new["discriminator"]), jax.tree.leaves(old["discriminator"])):
        np.testing.assert_array_equal(a, b)
    # Eval uses running averages: an example's output does not depend on the batch.
    full = model.apply(v, z, method="generate")
    np.testing.assert_allclose(model.apply(v, z[:1], method="generate"), full[:1], atol=1e-6)


def test_every_dense_and_conv_goes_through_the_hooks():
    calls = {"dot": 0, "conv": 0}

    def dot(*a, **k):
        calls["dot"] += 1
        return jax.lax.dot_general(*a, **k)

    def conv(*a, **k):
        calls["conv"] += 1
        return jax.lax.conv_general_dilated(*a, **k)

    cfg = gan.make_config("tiny", image_size=8, g_norm="none", d_norm="none",
                          dot_general=dot, conv_general_dilated=conv)
    model, v = _init(cfg)
    assert "batch_stats" not in v and "bias" in v["params"]["generator"]["project"]
    calls.update(dot=0, conv=0)
    model.apply(v, jnp.zeros((2, cfg.latent_dim)), jnp.zeros((2, 8, 8, 3)))
    n = cfg.num_upsamplings
    assert calls == {"dot": 2, "conv": 2 * n}  # project + logit; up1..n + down1..n


@pytest.mark.parametrize("overrides,message", [
    (dict(image_size=24), "model.image_size=24 must be a power of 2"),
    (dict(image_size=4), "model.image_size=4"),
    (dict(g_norm="group"), "model.g_norm='group' is not allowed; allowed: batch, layer, none"),
    (dict(output="relu"), "allowed: tanh, sigmoid"),
    (dict(latent_dim=0), "model.latent_dim must be positive"),
    (dict(bn_momentum=1.0), "model.bn_momentum"),
    (dict(bn_running_variance="torch"), "allowed: biased, unbiased"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gan.make_config("tiny", **overrides)


def test_unknown_variant_and_bad_inputs():
    with pytest.raises(ValueError, match="unknown gan variant 'huge'; allowed: tiny, small, "
                                         "dcgan"):
        gan.make_config("huge")
    cfg = gan.make_config("tiny")
    model, v = _init(cfg)
    with pytest.raises(ValueError, match=r"z must be \[batch, latent_dim=16\]"):
        model.apply(v, jnp.zeros((2, 8)), method="generate")
    with pytest.raises(ValueError, match=r"images must be \[batch, 32, 32, 3\]"):
        model.apply(v, jnp.zeros((2, 16, 16, 3)), method="discriminate")
