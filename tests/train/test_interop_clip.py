"""CLIP checkpoints in and out, proven against `transformers`: equal image and text
embeddings and logits per image, bit-exact round trips, clear refusals (random small
models, no network)."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import clip as clip_model  # noqa: E402
from train.interop import clip, hf  # noqa: E402

VOCAB, EOS, PAD = 71, 70, 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16, eos_token_id=EOS,
                pad_token_id=PAD)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, image_size=16, patch_size=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # biases, norms and the scale away from their init, so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name == "logit_scale":
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("clip") / "hf"
    model.save_pretrained(path)
    return model, str(path)


def converted(path):
    config, tensors = hf.read_checkpoint(path)
    fields = clip.model_overrides(config)
    model = clip_model.ClipModel(clip_model.make_config("clip_tiny", **fields))
    return config, fields, model, clip.params_from_hf(tensors, fields)


def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    texts = rng.integers(2, EOS, (3, 9))
    texts[0, 5], texts[1, 8], texts[2, 3] = EOS, EOS, EOS   # end of text, then padding
    texts[0, 6:], texts[2, 4:] = PAD, PAD
    return pixels, texts


def theirs(model, pixels, texts):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(texts),
                    attention_mask=torch.tensor((texts != PAD).astype(np.int64)))
    image = out.image_embeds.numpy()
    text = out.text_embeds.numpy()
    return image, text, out.logits_per_image.numpy()


def ours(model, params, pixels, texts):
    out = model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                      jnp.asarray(texts))
    image, text = np.asarray(out["image"]), np.asarray(out["text"])
    return image, text, float(out["logit_scale"]) * image @ text.T


def test_embeddings_and_logits_equal_transformers(checkpoint):
    model, path = checkpoint
    _, _, flax_model, params = converted(path)
    pixels, texts = inputs()
    for a, b in zip(ours(flax_model, params, pixels, texts), theirs(model, pixels, texts)):
        assert np.abs(a - b).max() < 1e-4
    logits = ours(flax_model, params, pixels, texts)[2]
    assert (logits.argmax(-1) == theirs(model, pixels, texts)[2].argmax(-1)).all()


def test_round_trips(tmp_path, checkpoint, interop):
    model, path = checkpoint
    config, fields, _, params = converted(path)
    back = clip.params_from_hf(clip.params_to_hf(params, fields), fields)
    interop.assert_trees_equal(params, back)
    hf.write_checkpoint(str(tmp_path / "out"), clip.hf_config(fields, config),
                        clip.params_to_hf(params, fields))
    reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    pixels, texts = inputs()
    for a, b in zip(theirs(reloaded, pixels, texts), theirs(model, pixels, texts)):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor(checkpoint):
    _, path = checkpoint
    config, tensors = hf.read_checkpoint(path)
    fields = clip.model_overrides(config)
    name = "vision_model.pre_layrnorm.bias"
    with pytest.raises(hf.ConversionError, match=f"'{name}' is missing"):
        clip.params_from_hf({k: v for k, v in tensors.items() if k != name}, fields)
    with pytest.raises(hf.ConversionError, match=r"'visual_projection.weight' has shape "
                       r"\(24, 47\)"):
        clip.params_from_hf(dict(tensors, **{"visual_projection.weight": np.zeros((24, 47))}),
                            fields)
    with pytest.raises(hf.ConversionError, match="model_type 'siglip'"):
        clip.model_overrides(dict(config, model_type="siglip"))


def test_command_line_into_a_workdir_and_back_out(tmp_path, checkpoint, interop):
    model, path = checkpoint
    out = interop.convert_in_and_out("clip", path, tmp_path, converted(path)[-1])
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    pixels, texts = inputs()
    for a, b in zip(theirs(reloaded, pixels, texts), theirs(model, pixels, texts)):
        np.testing.assert_array_equal(a, b)
