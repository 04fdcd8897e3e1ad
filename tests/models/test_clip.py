"""CLIP / ALIGN / SigLIP model: normalized embeddings, the clipped temperature, pooling at
the end-of-text or [CLS] token, padding invariance, and the configurations."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import clip

EOS, PAD = 2, 0


def _texts():
    # BOS(1) a b c EOS PAD ... ; second row shorter
    return jnp.array([[1, 10, 11, 12, EOS, PAD, PAD, PAD],
                      [1, 20, 21, EOS, PAD, PAD, PAD, PAD]], jnp.int32)


def _init(cfg, images, texts):
    model = clip.ClipModel(cfg)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, texts))  # plain
    return model, variables


@pytest.fixture(scope="module")
def clip_tiny():
    cfg = clip.make_config("clip_tiny", image_size=16, vit=clip.vit.make_config(
        "tiny/4", image_size=16))
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    model, variables = _init(cfg, images, _texts())
    return cfg, model, variables, images


def test_outputs_are_unit_vectors_and_scale_starts_at_one_over_0_07(clip_tiny):
    cfg, model, variables, images = clip_tiny
    out = model.apply(variables, images, _texts())
    assert out["image"].shape == (2, cfg.embed_dim) and out["text"].shape == (2, cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out["image"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert out["logit_bias"] is None


def test_logit_scale_is_clipped_at_100(clip_tiny):
    _, model, variables, images = clip_tiny
    params = jax.tree.map(lambda x: x, variables["params"])
    params["logit_scale"] = jnp.asarray(10.0)  # exp(10) = 22026 without the clip
    out = model.apply({"params": params}, images, _texts())
    np.testing.assert_allclose(out["logit_scale"], 100.0, rtol=1e-6)
    grad = jax.grad(lambda p: model.apply({"params": p}, images, _texts())["logit_scale"])(
        params)["logit_scale"]
    assert grad == 0.0  # beyond the clip the temperature gets no gradient


def test_eot_pooling_ignores_tokens_after_eos(clip_tiny):
    _, model, variables, _ = clip_tiny
    texts = _texts()
    changed = texts.at[0, 5:].set(7)  # garbage after EOS in row 0 (now "real" tokens)
    a = model.apply(variables, texts, method=model.encode_text)
    b = model.apply(variables, changed, method=model.encode_text)
    # causal tower: the EOS position's hidden state cannot see later tokens
    np.testing.assert_allclose(a, b, atol=1e-6)
    # but a token before EOS matters
    c = model.apply(variables, texts.at[0, 2].set(30), method=model.encode_text)
    assert not np.allclose(a[0], c[0], atol=1e-4)
    np.testing.assert_allclose(a[1], c[1], atol=1e-6)


def test_align_cls_pooling_bidirectional_text_and_batch_norm_tower():
    cfg = clip.make_config("align_tiny", image_size=16)
    assert cfg.image_tower == "efficientnet" and not cfg.text_causal
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    model, variables = _init(cfg, images, _texts())
    assert "batch_stats" in variables
    # Jitted applies: the EfficientNet tower op by op costs half a minute of CPU.
    apply = jax.jit(model.apply, static_argnames=("method", "train", "mutable"))
    np.testing.assert_allclose(apply(variables, images, _texts())["logit_scale"],
                               1 / 0.07, rtol=1e-5)
    # bidirectional + CLS pooling: a token after position 0 changes the embedding, padding
    # (masked keys) does not
    texts = _texts()
    a = apply(variables, texts, method=model.encode_text)
    padded_changed = apply(variables, texts.at[1, 6].set(PAD), method=model.encode_text)
    np.testing.assert_allclose(a, padded_changed, atol=1e-6)
    b = apply(variables, texts.at[0, 3].set(40), method=model.encode_text)
    assert not np.allclose(a[0], b[0], atol=1e-4)
    _, updates = apply(variables, images, texts, train=True, mutable="batch_stats")
    changed = jax.tree.map(lambda x, y: bool(np.any(x != y)), variables["batch_stats"],
                           updates["batch_stats"])
    assert any(jax.tree.leaves(changed))


def test_siglip_has_bias_and_scale_ten():
    cfg = clip.make_config("siglip_tiny", image_size=16, vit=clip.vit.make_config(
        "tiny/4", image_size=16))
    images = jnp.ones((2, 16, 16, 3))
    model, variables = _init(cfg, images, _texts())
    out = model.apply(variables, images, _texts())
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="allowed: clip_tiny"):
        clip.make_config("clip_huge")
    with pytest.raises(ValueError, match="image_tower='mlp'"):
        clip.make_config("clip_tiny", image_tower="mlp")
    with pytest.raises(ValueError, match="unknown clip config keys"):
        clip.make_config("clip_tiny", temperature=0.1)
    with pytest.raises(ValueError, match="logit_scale_init"):
        clip.make_config("clip_tiny", logit_scale_init=math.log(1000.0))
    # Errors inside the nested towers name the full key.
    with pytest.raises(ValueError, match=r"^model.vit.encoder.d_model \(30\) must be "
                                         r"divisible by model.vit.encoder.num_heads \(4\), or set "
                                         r"model.vit.encoder.head_dim$"):
        clip.make_config("clip_tiny", vit=dict(encoder=dict(d_model=30, num_heads=4)))
    with pytest.raises(ValueError, match=r"^model.vit keys \['channels'\] are set by the "
                                         "clip config itself"):
        clip.make_config("clip_tiny", vit=dict(channels=1))


def test_nested_overrides_update_the_variant_towers():
    cfg = clip.make_config("clip_b16", vit=dict(pool="gap", encoder=dict(num_layers=3)))
    assert (cfg.vit.pool, cfg.vit.patch_size, cfg.vit.encoder.d_model,
            cfg.vit.encoder.num_layers) == ("gap", 16, 768, 3)     # B/16 kept, then updated
    image = cfg.image_config                                       # the data fields copied
    assert (image.image_size, image.num_classes, image.encoder.max_length) == (224, 0, 196)
    assert cfg.replace(text=dict(num_layers=1)).text.num_layers == 1


def test_mean_pooling_averages_real_tokens_only():
    from models import transformer
    cfg = transformer.make_config("tiny", vocab_size=64, max_length=8)
    mean = clip.TextTower(cfg, causal=False, pooling="mean", eos_id=EOS)
    cls = clip.TextTower(cfg, causal=False, pooling="cls", eos_id=EOS)
    params = mean.init(jax.random.key(0), _texts())
    texts = _texts()
    pooled = mean.apply(params, texts)
    # changing a padding id changes nothing (masked keys, excluded from the mean) ...
    np.testing.assert_allclose(mean.apply(params, texts.at[1, 7].set(PAD)), pooled, atol=1e-6)
    # ... and the mean is not the first token's state, which cls pooling returns
    first = cls.apply(params, texts)
    assert not np.allclose(pooled, first, atol=1e-3)
    # a single real token: the mean of one state is that state
    one = jnp.array([[5, PAD, PAD, PAD]], jnp.int32)
    np.testing.assert_allclose(mean.apply(params, one), cls.apply(params, one), atol=1e-6)
