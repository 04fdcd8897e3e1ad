"""Weight inheritance: keeping everything reproduces the model bit-exactly; k of n layers
is the model built from those layers; dropped heads / neurons equal zeroing their output
weights in the full model; parameter counts equal the hand count; widths shrink for the
decoder and ViT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from models import transformer as T
from models import vit
from models.compress import inherit

V, P, D, L, H, F = 40, 16, 32, 4, 4, 48


def decoder(**overrides):
    cfg = T.make_config("tiny", vocab_size=V, max_length=P, d_model=D, num_layers=L,
                        num_heads=H, mlp_dim=F, **overrides)
    return T.Decoder(cfg), cfg


@pytest.fixture(scope="module")
def trained_like():
    """A decoder with random (not init-scale) weights, so every unit's norm differs."""
    model, cfg = decoder()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 12)))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(
        np.float32), params)
    return model, cfg, params, tokens


def logits(cfg, params, tokens):
    return np.asarray(jax.jit(T.Decoder(cfg).apply)({"params": params}, tokens))


def test_keeping_everything_is_the_same_model(trained_like):
    model, cfg, params, tokens = trained_like
    same, fields = inherit.shrink(params, cfg)
    jax.tree.map(np.testing.assert_array_equal, same, params)
    assert fields == {"num_layers": L, "num_heads": H, "mlp_dim": F, "d_model": D}
    scanned = T.stack_layers(jax.tree.map(np.asarray, params))
    again, _ = inherit.inherit_stack(scanned["decoder"])   # the scanned layout too
    jax.tree.map(np.testing.assert_array_equal, again, scanned["decoder"])


def test_k_of_n_layers_is_the_model_built_from_those_layers(trained_like):
    _, cfg, params, tokens = trained_like
    small, fields = inherit.shrink(params, cfg, num_layers=2)   # uniform: layers 0 and 2
    by_hand = {**params, "decoder": {"layers_0": params["decoder"]["layers_0"],
                                     "layers_1": params["decoder"]["layers_2"],
                                     "final_norm": params["decoder"]["final_norm"]}}
    small_cfg = cfg.replace(**fields)
    np.testing.assert_array_equal(logits(small_cfg, small, tokens),
                                  logits(small_cfg, by_hand, tokens))
    assert inherit.choose_layers(12, 6) == [0, 2, 4, 6, 8, 10]   # DistilBERT's student
    assert inherit.choose_layers(6, 2, "last") == [4, 5]
    assert inherit.choose_layers(3, 2, "importance", np.array([1.0, 0.5, 2.0])) == [0, 2]


def zeroed(params, heads=None, neurons=None):
    """The full model with the dropped heads' output rows / neurons' fc2 rows zeroed."""
    out = jax.tree.map(np.array, params)
    for i in range(L):
        layer = out["decoder"][f"layers_{i}"]
        if heads is not None:
            drop = np.setdiff1d(np.arange(H), heads[i])
            layer["self_attention"]["out"]["kernel"][drop] = 0.0
        if neurons is not None:
            drop = np.setdiff1d(np.arange(F), neurons[i])
            layer["mlp"]["fc2"]["kernel"][drop] = 0.0
    return out


def test_dropped_heads_and_neurons_equal_zeroing_their_outputs(trained_like):
    _, cfg, params, tokens = trained_like
    stack, info = inherit.inherit_stack(params["decoder"], num_heads=2, mlp_dim=20)
    small_cfg = cfg.replace(num_heads=2, head_dim=D // H, mlp_dim=20)
    ours = logits(small_cfg, {**params, "decoder": stack}, tokens)
    reference = logits(cfg, zeroed(params, info["kept_heads"], info["kept_neurons"]), tokens)
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    # the kept heads are the largest by weight norm, in their original order
    att = params["decoder"]["layers_1"]["self_attention"]
    scores = inherit.head_scores(att)
    assert info["kept_heads"][1] == sorted(np.argsort(-scores)[:2].tolist())


def hand_count(v, p, d, layers, heads, hd, f):
    layer = 2 * 2 * d + 3 * (d * heads * hd + heads * hd) + heads * hd * d + d \
        + d * f + f + f * d + d
    return v * d + p * d + layers * layer + 2 * d


def test_parameter_counts_equal_the_hand_count_and_widths_shrink(trained_like):
    _, cfg, params, tokens = trained_like
    small, fields = inherit.shrink(params, cfg, num_layers=2, num_heads=2, mlp_dim=24,
                                   d_model=24)
    assert fields == {"num_layers": 2, "num_heads": 2, "mlp_dim": 24, "d_model": 24,
                      "head_dim": 8}
    small_cfg = cfg.replace(**fields)
    expected = jax.eval_shape(T.Decoder(small_cfg).init, jax.random.key(0), tokens)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), b.shape), small,
                 nn.unbox(expected))
    assert inherit.count_params(small) == hand_count(V, P, 24, 2, 2, 8, 24)
    assert inherit.count_params(params) == hand_count(V, P, D, L, H, D // H, F)
    assert np.isfinite(logits(small_cfg, small, tokens)).all()
    keep_all = inherit.inherit_channels(params, np.arange(D))     # all channels: identity
    jax.tree.map(np.testing.assert_array_equal, keep_all, jax.tree.map(np.asarray, params))


def test_a_vit_shrinks_in_depth_and_width():
    cfg = vit.make_config("tiny/4", image_size=16, num_classes=3)
    images = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
    params = nn.unbox(jax.jit(vit.ViT(cfg).init)(jax.random.key(0), images)["params"])
    small, fields = inherit.shrink(params, cfg, num_layers=1, d_model=cfg.encoder.d_model // 2)
    small_cfg = vit.make_config("tiny/4", image_size=16, num_classes=3, **{
        "encoder": {**fields["encoder"]}})
    expected = nn.unbox(jax.eval_shape(vit.ViT(small_cfg).init, jax.random.key(0),
                                       images)["params"])
    jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), b.shape), small, expected)
    assert np.isfinite(np.asarray(jax.jit(vit.ViT(small_cfg).apply)({"params": small},
                                                                     images))).all()


def test_shrink_to_a_clip_template_inherits_each_tower():
    """TinyCLIP's manual recipe in small: the text tower loses layers, the image tower
    width; the image projection's rows follow the image tower's kept channels."""
    from models import clip  # noqa: PLC0415

    images, texts = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 48), jnp.int32)
    teacher_cfg = clip.make_config("clip_tiny")
    teacher = nn.unbox(jax.eval_shape(clip.ClipModel(teacher_cfg).init, jax.random.key(0),
                                      images, texts)["params"])
    rng = np.random.default_rng(0)   # random values at the init's shapes (no forward here)
    teacher = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), teacher)
    student_cfg = clip.make_config("clip_tiny", text={"num_layers": 1},
                                   vit={"encoder": {"d_model": 32, "mlp_dim": 64,
                                                    "head_dim": 32}})
    template = nn.unbox(jax.eval_shape(clip.ClipModel(student_cfg).init, jax.random.key(1),
                                       images, texts)["params"])
    student = inherit.shrink_to(teacher, template)
    jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), student,
                 template)
    np.testing.assert_array_equal(student["text_tower"]["encoder"]["layers_0"]["mlp"]["fc1"][
        "kernel"], teacher["text_tower"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
    keep = inherit._top(inherit.channel_scores(teacher["image_tower"], 64), 32)
    np.testing.assert_array_equal(student["image_projection"]["kernel"],
                                  np.asarray(teacher["image_projection"]["kernel"])[keep])
    with pytest.raises(ValueError, match="image_tower is larger than its source: mlp_dim "
                                         "256 > 64, d_model 64 > 32"):
        inherit.shrink_to(student, teacher)


def test_shrink_to_refuses_another_head_width(trained_like):
    """Heads are kept whole: a template whose heads are narrower (d_model 24 over 2 heads
    where the source's are 8 wide) is refused, naming the setting that fixes it."""
    _, cfg, params, tokens = trained_like
    narrow = T.Decoder(cfg.replace(d_model=24, num_heads=2, mlp_dim=F // 2))
    template = nn.unbox(jax.eval_shape(narrow.init, jax.random.key(0), tokens)["params"])
    with pytest.raises(ValueError, match="keeps each head's width: this model has head_dim "
                                         "12, its source 8 \\(set head_dim=8"):
        inherit.shrink_to(params, template)


def gated_like(trained_like, channel_open=None):
    """The trained-like decoder with every gate kind: per layer 2 closed, 1 half-open and 1
    open head, half the MLP units closed, fractional layer gates; residual channels open
    where `channel_open` [D] (all by default). Returns (gated cfg, gated params)."""
    from models.layers import gates  # noqa: PLC0415

    _, cfg, params, tokens = trained_like
    gated_cfg = cfg.replace(unit_gates=True, channel_gates=True)
    gated = jax.tree.map(np.array, nn.unbox(jax.jit(T.Decoder(gated_cfg).init)(
        jax.random.key(0), tokens)["params"]))
    rng = np.random.default_rng(5)

    def gate(log_alpha):
        return {gates.PARAM: np.asarray(log_alpha, np.float32)}

    for i in range(L):
        layer = gated["decoder"][f"layers_{i}"]
        src = params["decoder"][f"layers_{i}"]
        for key, log_alpha in (("attention_sublayer", 0.5 + 0.2 * i), ("mlp_sublayer", -0.3)):
            layer[key] = {**src[key], "layer_gate": gate([log_alpha])}
        layer["self_attention"] = {**src["self_attention"], "head_gate": gate(
            rng.permutation(np.array([-9.0, -9.0, 0.3, 6.0])))}
        neuron_alpha = np.full(F, 6.0)
        neuron_alpha[rng.permutation(F)[:F // 2]] = -9.0
        layer["mlp"] = {**src["mlp"], "unit_gate": gate(neuron_alpha)}
    channel_open = np.ones(D, bool) if channel_open is None else channel_open
    gated["decoder"][T.CHANNEL_GATE] = gate(np.where(channel_open, 9.0, -9.0))
    gated["embed"], gated["decoder"]["final_norm"] = params["embed"], params["decoder"]["final_norm"]
    return gated_cfg, gated


def test_learned_gates_fold_into_the_inherited_model_exactly(trained_like):
    """A gated model's evaluation forward (deterministic gates: heads, MLP units, each
    layer's attention and MLP, residual channels) equals the ungated model inherited from
    it: fold_gates alone when every channel is open, and removing exactly the closed
    heads, units and channels changes nothing."""
    _, cfg, params, tokens = trained_like
    gated_cfg, gated = gated_like(trained_like)
    reference = logits(gated_cfg, gated, tokens)
    folded, scores = inherit.fold_gates(gated["decoder"])
    np.testing.assert_allclose(logits(cfg, {**gated, "decoder": folded}, tokens), reference,
                               atol=1e-5)
    assert scores["attention"].shape == (L,) and scores["channels"].shape == (D,)
    # A layer gate is no unit gate: its value scales the branch (it is not 0 or 1 here).
    assert 0.1 < float(np.asarray(T.gates.deterministic_gate(
        gated["decoder"]["layers_0"]["mlp_sublayer"]["layer_gate"]["gate_log_alpha"]))[0]) < 0.9
    open_channels = np.random.default_rng(6).permutation(D) < D * 3 // 4
    gated_cfg, gated = gated_like(trained_like, open_channels)
    reference = logits(gated_cfg, gated, tokens)
    small = inherit.shrink_to(gated, inherit.shrink(params, cfg, num_heads=2, mlp_dim=F // 2,
                                                    d_model=D * 3 // 4)[0])
    small_cfg = cfg.replace(num_heads=2, head_dim=D // H, mlp_dim=F // 2, d_model=D * 3 // 4)
    np.testing.assert_allclose(logits(small_cfg, small, tokens), reference, atol=1e-5)
    np.testing.assert_array_equal(small["embed"]["tokens"]["embedding"],
                                  params["embed"]["tokens"]["embedding"][:, open_channels])


def test_structured_pruning_exports_to_the_shrunken_model(trained_like):
    """Heads and MLP units removed by prune_structured (masks) -> the smaller model with
    the same outputs."""
    from models.compress import prune_structured  # noqa: PLC0415

    _, cfg, params, tokens = trained_like
    pruned, _ = prune_structured.heads(params, count=2)
    pruned, _ = prune_structured.neurons(jax.device_get(pruned), count=16, paths="mlp/fc1")
    pruned = jax.device_get(pruned)
    small, fields = inherit.shrink_pruned(pruned, cfg)
    assert fields == {"num_heads": 2, "mlp_dim": F - 16, "head_dim": D // H}
    np.testing.assert_allclose(logits(cfg.replace(**fields), small, tokens),
                               logits(cfg, pruned, tokens), atol=2e-5)
    assert inherit.count_params(small) < inherit.count_params(params)
    with pytest.raises(ValueError, match="nothing to shrink"):
        inherit.shrink_pruned(params, cfg)
