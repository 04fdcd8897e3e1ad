"""ResNet / EfficientNet: float64 NumPy references (ResNet forward, depthwise separable conv,
squeeze-and-excitation, MBConv), batch-norm train/eval semantics, published parameter
counts (torchvision / timm) via eval_shape, mixed precision, hooks and errors.

Parameters and running statistics are random (kernels N(0, 1/fan_in), BN scales 1 +
N(0, 0.1^2), running variances in [0.5, 1.5]), not the init, whose zero residual-BN scales,
zero head and unit running variances would hide mistakes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import cnn

X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------------------
# NumPy float64 building blocks (symmetric (k-1)/2 padding, NHWC, kernels HWIO).
# ----------------------------------------------------------------------------------------
def _np_conv(x, w, stride=1, groups=1):
    k, pad = w.shape[0], (w.shape[0] - 1) // 2
    b, h, wd, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    cin, cout = c // groups, w.shape[-1] // groups
    out = np.zeros((b, ho, wo, w.shape[-1]))
    for g in range(groups):
        for di in range(k):
            for dj in range(k):
                patch = xp[:, di:di + stride * ho:stride, dj:dj + stride * wo:stride,
                           g * cin:(g + 1) * cin]
                out[..., g * cout:(g + 1) * cout] += patch @ w[di, dj, :, g * cout:(g + 1) * cout]
    return out


def _np_bn(x, p, s, eps):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _np_maxpool3x3s2(x):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    return np.max([xp[:, i:i + 2 * ho:2, j:j + 2 * wo:2] for i in range(3) for j in range(3)],
                  axis=0)


relu = lambda x: np.maximum(x, 0)  # noqa: E731
sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
swish = lambda x: x * sigmoid(x)  # noqa: E731


def _np_resnet(cfg, variables, x):
    """Eval-mode logits of the original (post-activation) ResNet."""
    p, s = _f64(variables["params"]), _f64(variables["batch_stats"])
    eps = cfg.bn_epsilon

    def conv_bn(y, name, blk, stride=1):
        bn = name.replace("conv", "bn") if "conv" in name else name + "_bn"
        return _np_bn(_np_conv(y, p[blk][name]["kernel"] if blk else p[name]["kernel"],
                               stride), p[blk][bn] if blk else p[bn],
                      s[blk][bn] if blk else s[bn], eps)
    if cfg.stem == "imagenet":
        y = _np_maxpool3x3s2(relu(conv_bn(x, "stem_conv", None, 2)))
    else:
        y = relu(conv_bn(x, "stem_conv", None))
    for i, n in enumerate(cfg.stage_sizes):
        for j in range(n):
            blk, stride = f"stage{i}_block{j}", 2 if i > 0 and j == 0 else 1
            if cfg.block == "basic":
                h = relu(conv_bn(y, "conv1", blk, stride))
                h = conv_bn(h, "conv2", blk)
            else:
                h = relu(conv_bn(y, "conv1", blk))
                h = relu(conv_bn(h, "conv2", blk, stride))
                h = conv_bn(h, "conv3", blk)
            sc = conv_bn(y, "shortcut", blk, stride) if "shortcut" in p[blk] else y
            y = relu(h + sc)  # ReLU after the addition (v1)
    return y.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


# ----------------------------------------------------------------------------------------
# ResNet.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,size", [
    (dict(), 8),
    (dict(block="bottleneck", stem="imagenet", stage_sizes=(2, 1), widths=(4, 8)), 16)],
    ids=["basic-cifar", "bottleneck-imagenet"])
def test_resnet_matches_float64_numpy_reference(overrides, size, random_variables, forward):
    cfg = cnn.make_resnet_config("resnet_tiny", num_classes=5, **overrides)
    model = cnn.ResNet(cfg)
    x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    v = random_variables(model, x)
    logits, _ = forward(model)(v, x)
    expected = _np_resnet(cfg, v, np.asarray(x, np.float64))
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.abs(expected).max() > 0.3
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_batch_norm_updates_running_statistics_in_training_only(random_variables, forward):
    cfg = cnn.make_resnet_config("resnet_tiny", num_classes=5)
    model = cnn.ResNet(cfg)
    v = random_variables(model, X)
    old = v["batch_stats"]
    _, ev = model.apply(v, X, mutable=["batch_stats"])  # eval: unchanged even if mutable
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ev["batch_stats"]),
                                                    jax.tree.leaves(old)))
    _, tr = forward(model, train=True)(v, X)
    tr = tr["batch_stats"]
    # Stem BN: new = 0.9 old + 0.1 batch statistic (mean and biased variance over B, H, W).
    h = _np_conv(np.asarray(X, np.float64), np.asarray(v["params"]["stem_conv"]["kernel"],
                                                       np.float64))
    for key, batch in (("mean", h.mean((0, 1, 2))), ("var", h.var((0, 1, 2)))):
        np.testing.assert_allclose(tr["stem_bn"][key],
                                   0.9 * np.asarray(old["stem_bn"][key]) + 0.1 * batch,
                                   rtol=1e-5, atol=1e-6)
    # Every BN layer moved.
    for a, b in zip(jax.tree.leaves(tr), jax.tree.leaves(old)):
        assert np.abs(np.asarray(a) - np.asarray(b)).min() > 0


def test_unbiased_running_variance_is_pytorch_s(random_variables, forward):
    """bn_running_variance="unbiased": var <- m var + (1 - m) batch_var n / (n - 1), n = B H W
    of each layer; the outputs (biased batch variance) are those of the default."""
    model = cnn.ResNet(cnn.make_resnet_config("resnet_tiny", num_classes=5))
    unbiased = cnn.ResNet(model.cfg.replace(bn_running_variance="unbiased"))
    v = random_variables(model, X)
    (out_b, upd_b), (out_u, upd_u) = forward(model, True)(v, X), forward(unbiased, True)(v, X)
    np.testing.assert_array_equal(out_b, out_u)
    flat = jax.tree_util.tree_flatten_with_path
    old = dict(flat(v["batch_stats"])[0])
    for (path, biased), (_, unb) in zip(flat(upd_b["batch_stats"])[0],
                                        flat(upd_u["batch_stats"])[0]):
        if path[-1].key != "var":
            continue
        stage = int(path[0].key[5]) if path[0].key.startswith("stage") else 0
        n = X.shape[0] * (X.shape[1] // 2 ** stage) ** 2       # 4 x 8x8, 4x4, 2x2
        batch_term = np.asarray(biased, np.float64) - 0.9 * np.asarray(old[path], np.float64)
        np.testing.assert_allclose(unb, 0.9 * np.asarray(old[path], np.float64)
                                   + batch_term * n / (n - 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: cnn.ResNet(cnn.make_resnet_config("resnet_tiny", num_classes=5)),
    lambda: cnn.EfficientNet(cnn.make_efficientnet_config("tiny", num_classes=5))],
    ids=["resnet", "efficientnet"])
def test_eval_is_per_example_and_train_depends_on_the_batch(make, random_variables, forward, jit):
    model = make()
    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    other = x.copy()
    other[1:] = np.random.default_rng(3).normal(size=(3, 32, 32, 3))
    v = random_variables(model, x)
    for train in (False, True):
        a, b = forward(model, train)(v, x)[0], forward(model, train)(v, other)[0]
        diff = np.abs(np.asarray(a[0] - b[0])).max()
        assert (diff > 1e-3) if train else (diff < 1e-5), (train, diff)
    alone = jit(lambda v, x: model.apply(v, x))(v, x[:1])
    np.testing.assert_allclose(alone[0], forward(model)(v, x)[0][0], atol=1e-5)


@pytest.mark.parametrize("variant,params,stats", [
    ("resnet50", 25_557_032, 53_120), ("resnet18", 11_689_512, 9_600),
    ("resnet34", 21_797_672, 17_024), ("resnet101", 44_549_160, 105_344)])
def test_resnet_parameter_counts_match_torchvision(variant, params, stats):
    """torchvision counts conv kernels (no bias), BN weight + bias and the fc layer; its
    BN running_mean + running_var buffers are our batch_stats (mean + var)."""
    cfg = cnn.make_resnet_config(variant, num_classes=1000)
    v = nn.unbox(jax.eval_shape(cnn.ResNet(cfg).init, jax.random.key(0),
                                jnp.zeros((1, 224, 224, 3))))
    assert _count(v["params"]) == params
    bn_channels = sum(int(np.prod(s.shape)) for path, s in
                      jax.tree_util.tree_leaves_with_path(v["params"])
                      if path[-1].key == "scale")
    assert _count(v["batch_stats"]) == 2 * bn_channels == stats
    feats = jax.eval_shape(lambda p: cnn.ResNet(cfg.replace(num_classes=0)).apply(
        p, jnp.zeros((2, 64, 64, 3))), {"params": {k: w for k, w in v["params"].items()
                                                   if k != "head"},
                                        "batch_stats": v["batch_stats"]})
    assert feats.shape == (2, cfg.feature_dim) and feats.dtype == jnp.float32
    assert cfg.feature_dim == (2048 if cfg.block == "bottleneck" else 512)


# ----------------------------------------------------------------------------------------
# EfficientNet building blocks.
# ----------------------------------------------------------------------------------------
def test_depthwise_separable_conv_matches_numpy(random_variables):
    x = np.random.default_rng(4).normal(size=(2, 9, 9, 6)).astype(np.float32)
    layer = cnn.SeparableConv(features=5, kernel_size=3, strides=2)
    v = random_variables(layer, x)
    p = _f64(v["params"])
    assert p["depthwise"]["kernel"].shape == (3, 3, 1, 6)   # one 3x3 filter per channel
    assert p["pointwise"]["kernel"].shape == (1, 1, 6, 5)
    xd = np.asarray(x, np.float64)
    # The depthwise conv written out per channel (no grouping machinery).
    dw = np.stack([_np_conv(xd[..., c:c + 1], p["depthwise"]["kernel"][..., c:c + 1], 2)[..., 0]
                   for c in range(6)], axis=-1)
    expected = dw @ p["pointwise"]["kernel"][0, 0]
    out = layer.apply(v, x)
    assert out.shape == (2, 5, 5, 5)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(expected, _np_conv(_np_conv(xd, p["depthwise"]["kernel"], 2,
                                                           groups=6),
                                                  p["pointwise"]["kernel"]), atol=1e-12)


@pytest.mark.parametrize("act,np_act", [(jax.nn.silu, swish), (jax.nn.relu, relu)])
def test_squeeze_excite_matches_numpy(act, np_act, random_variables):
    r = np.random.default_rng(5)  # per-channel offsets: pooled inputs of size O(1)
    x = (r.normal(size=(2, 4, 4, 8)) + 2 * r.normal(size=(2, 1, 1, 8))).astype(np.float32)
    se = cnn.SqueezeExcite(reduced=3, activation=act)
    v = random_variables(se, x)
    p, xd = _f64(v["params"]), np.asarray(x, np.float64)
    s = np_act(xd.mean((1, 2)) @ p["reduce"]["kernel"] + p["reduce"]["bias"])
    gate = sigmoid(s @ p["expand"]["kernel"] + p["expand"]["bias"])          # [B, C]
    assert gate.std() > 0.05  # the gate differs across channels and examples
    np.testing.assert_allclose(se.apply(v, x), xd * gate[:, None, None, :], atol=1e-6)


@pytest.mark.parametrize("c_out,strides", [(8, 1), (12, 2)], ids=["residual", "strided"])
def test_mbconv_matches_numpy(c_out, strides, random_variables):
    cfg = cnn.make_efficientnet_config("tiny")
    block = cnn.MBConv(cfg, c_out, expand_ratio=4, kernel_size=5, strides=strides,
                       drop_path=0.0, train=False)
    x = np.random.default_rng(6).normal(size=(2, 6, 6, 8)).astype(np.float32)
    v = random_variables(block, x)
    p, s, xd, eps = _f64(v["params"]), _f64(v["batch_stats"]), np.asarray(x, np.float64), 1e-3
    h = swish(_np_bn(_np_conv(xd, p["expand_conv"]["kernel"]), p["expand_bn"],
                     s["expand_bn"], eps))                                   # 8 -> 32
    h = swish(_np_bn(_np_conv(h, p["depthwise_conv"]["kernel"], strides, groups=32),
                     p["depthwise_bn"], s["depthwise_bn"], eps))
    assert p["se"]["reduce"]["kernel"].shape == (32, 2)  # 0.25 * 8 input channels
    g = swish(h.mean((1, 2)) @ p["se"]["reduce"]["kernel"] + p["se"]["reduce"]["bias"])
    h = h * sigmoid(g @ p["se"]["expand"]["kernel"] + p["se"]["expand"]["bias"])[:, None, None]
    h = _np_bn(_np_conv(h, p["project_conv"]["kernel"]), p["project_bn"], s["project_bn"],
               eps)                                                          # linear
    expected = h + xd if strides == 1 else h
    np.testing.assert_allclose(block.apply(v, x), expected, atol=1e-4, rtol=1e-4)


def test_stochastic_depth_drops_whole_residual_branches(random_variables):
    cfg = cnn.make_efficientnet_config("tiny")
    x = np.random.default_rng(7).normal(size=(16, 4, 4, 8)).astype(np.float32)
    make = lambda rate: cnn.MBConv(cfg, 8, 1, 3, 1, rate, True)  # noqa: E731
    v = random_variables(make(0.0), x)
    full, _ = make(0.0).apply(v, x, mutable=["batch_stats"])
    out, _ = make(0.5).apply(v, x, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    branch = np.asarray(full - x)
    kept = [np.allclose(out[b], x[b] + branch[b] / 0.5, atol=1e-5) for b in range(16)]
    dropped = [np.allclose(out[b], x[b], atol=1e-6) for b in range(16)]
    assert all(k != d for k, d in zip(kept, dropped)) and 0 < sum(kept) < 16


def test_efficientnet_parameter_counts_and_structure():
    """B0 with a 1000-class head: 5,288,548 parameters (timm efficientnet_b0, Keras'
    trainable count); 16 MBConv blocks; depthwise kernels [k, k, 1, C]."""
    cfg = cnn.make_efficientnet_config("b0", num_classes=1000)
    v = nn.unbox(jax.eval_shape(cnn.EfficientNet(cfg).init, jax.random.key(0),
                                jnp.zeros((1, 224, 224, 3))))
    p = v["params"]
    assert _count(p) == 5_288_548 and _count(v["batch_stats"]) == 42_016
    blocks = [k for k in p if k.startswith("block")]
    assert len(blocks) == 16
    assert p["block0"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 32)   # MBConv1
    assert p["block15"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 1152)
    assert p["block3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)  # 24 * 6
    assert p["block3"]["se"]["reduce"]["kernel"].shape == (144, 6)          # 24 * 0.25
    b1 = cnn.make_efficientnet_config("b1", num_classes=1000)
    assert _count(jax.eval_shape(cnn.EfficientNet(b1).init, jax.random.key(0),
                                 jnp.zeros((1, 240, 240, 3)))["params"]) == 7_794_184
    assert cfg.feature_dim == 1280 and cfg.replace(head_width=0).feature_dim == 320


# ----------------------------------------------------------------------------------------
# Every model: mixed precision, hooks, errors.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda **kw: cnn.ResNet(cnn.make_resnet_config("resnet_tiny", **kw)),
    lambda **kw: cnn.EfficientNet(cnn.make_efficientnet_config("tiny", **kw))],
    ids=["resnet", "efficientnet"])
def test_bf16_compute_with_f32_params_is_finite_float32(make, random_variables, forward):
    x = np.random.default_rng(8).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model = make(num_classes=5, dtype="bfloat16")
    v = random_variables(model, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    for train in (False, True):
        logits, state = forward(model, train)(v, x)
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))  # stats stay f32
    ref, _ = forward(make(num_classes=5))(v, x)
    np.testing.assert_allclose(forward(model)(v, x)[0], ref, atol=0.1, rtol=0.05)
    feats = jax.eval_shape(make(num_classes=0).apply, v, x)
    assert feats.shape == (2, model.cfg.feature_dim) and feats.dtype == jnp.float32


def test_hooks_see_every_conv_and_matmul():
    convs, dots = [], []

    def conv_hook(*a, **k):
        convs.append(1)
        return jax.lax.conv_general_dilated(*a, **k)

    def dot_hook(*a, **k):
        dots.append(1)
        return jax.lax.dot_general(*a, **k)

    for model in (cnn.ResNet(cnn.make_resnet_config("resnet_tiny", num_classes=3,
                                                    conv_general_dilated=conv_hook,
                                                    dot_general=dot_hook)),
                  cnn.EfficientNet(cnn.make_efficientnet_config(
                      "tiny", num_classes=3, conv_general_dilated=conv_hook,
                      dot_general=dot_hook))):
        convs.clear(), dots.clear()
        p = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                    jnp.zeros((1, 32, 32, 3)))["params"])
        kernels = [path for path, _ in jax.tree_util.tree_leaves_with_path(p)
                   if path[-1].key == "kernel"]
        n_dense = sum(path[-2].key in ("head", "reduce", "expand") for path in kernels)
        assert len(convs) == len(kernels) - n_dense and len(dots) == n_dense
    assert n_dense == 1 + 2 * 7  # EfficientNet tiny: head + SE reduce/expand in 7 blocks


@pytest.mark.parametrize("make,match", [
    (lambda: cnn.make_resnet_config("resnet152"), "unknown resnet variant 'resnet152'; "
     "allowed: resnet_tiny, resnet18, resnet34, resnet50, resnet101"),
    (lambda: cnn.make_efficientnet_config("b7"), "unknown efficientnet variant 'b7'; "
     "allowed: tiny, b0, b1, b2, b3"),
    (lambda: cnn.make_resnet_config("resnet18", depth=3), r"unknown resnet config keys "
                                                          r"\['depth'\]"),
    (lambda: cnn.make_resnet_config("resnet18", block="wide"),
     "model.block='wide' is not allowed; allowed: basic, bottleneck"),
    (lambda: cnn.make_resnet_config("resnet18", stem="tiny"),
     "model.stem='tiny' is not allowed; allowed: imagenet, cifar"),
    (lambda: cnn.make_resnet_config("resnet18", widths=(64, 128)),
     "must be non-empty and of equal length"),
    (lambda: cnn.make_resnet_config("resnet18", kernel_init="he"),
     "model.kernel_init='he' is not allowed"),
    (lambda: cnn.make_efficientnet_config("b0", se_ratio=1.5), r"se_ratio must be in \[0, 1\)"),
    (lambda: cnn.make_efficientnet_config("b0", num_classes=-1), "num_classes must be >= 0"),
    (lambda: cnn.make_efficientnet_config("b0", dtype="int8"), "model.dtype='int8'"),
    (lambda: cnn.make_efficientnet_config("b0", bn_running_variance="torch"),
     "model.bn_running_variance='torch' is not allowed; allowed: biased, unbiased"),
])
def test_errors_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_list_fields_become_tuples():
    cfg = cnn.ResNetConfig(stage_sizes=[1, 2], widths=[8, 16])
    assert cfg.stage_sizes == (1, 2) and hash(cfg) == hash(cnn.ResNetConfig((1, 2), (8, 16)))
