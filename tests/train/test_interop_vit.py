"""ViT checkpoints in and out, proven against `transformers`: equal logits (classifier) and
features (ViTModel's pooler), bit-exact round trips both ways, clear refusals. Checkpoints
are made here from small random `transformers` models (no network)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import vit as vit_models  # noqa: E402
from train.interop import hf, vit  # noqa: E402

SIZE = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64)


def perturbed(model):
    """`model` with biases, norms and the class token away from their 0 / 1 init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "layernorm_before.weight", "layernorm_after.weight",
                              "layernorm.weight", "cls_token")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = perturbed(transformers.ViTForImageClassification(
        transformers.ViTConfig(**SIZE, num_labels=5)))
    path = tmp_path_factory.mktemp("vit") / "hf"
    model.save_pretrained(path)
    return model, str(path)


def converted(path):
    config, tensors = hf.read_checkpoint(path)
    fields = vit.model_overrides(config)
    model = vit_models.ViT(vit_models.make_config("tiny/4", **fields))
    return config, tensors, fields, model, vit.params_from_hf(tensors, fields)


def param_shapes(model):
    """The model's params as jax.ShapeDtypeStructs (nothing computed)."""
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return nn.unbox(init["params"])


def images(seed, n=3):
    """Random pixel_values [n, C, H, W] (NCHW, as transformers takes them)."""
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def ours(model, params, pixels, **kwargs):
    return model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), **kwargs)


def theirs(model, pixels):
    with torch.no_grad():
        return model(pixel_values=torch.tensor(pixels))


def test_logits_equal_transformers(classifier, interop):
    model, path = classifier
    _, _, fields, flax_model, params = converted(path)
    assert fields["num_classes"] == 5 and fields["encoder"]["norm_epsilon"] == 1e-12
    shape = lambda x: np.shape(x)  # noqa: E731 -- the converted tree is the model's own
    assert jax.tree.map(shape, params) == jax.tree.map(shape, param_shapes(flax_model))
    pixels = images(0)
    got, want = np.asarray(ours(flax_model, params, pixels)), theirs(model, pixels).logits.numpy()
    assert got.shape == (3, 5) and np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # transformers >= 5's in-memory names (layers.i.attention.q_proj, ...) read the same.
    live = vit.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, fields)
    interop.assert_trees_equal(params, live)


def test_round_trips(tmp_path, classifier, interop):
    model, path = classifier
    config, _, fields, flax_model, params = converted(path)
    back = vit.params_from_hf(vit.params_to_hf(params, fields), fields)  # flaxlab->hf->flaxlab
    interop.assert_trees_equal(params, back)
    out = tmp_path / "out"  # hf -> flaxlab -> hf, loaded by transformers
    hf.write_checkpoint(str(out), vit.hf_config(fields, config), vit.params_to_hf(params, fields))
    reloaded = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == model.config.id2label
    pixels = images(1)
    np.testing.assert_array_equal(theirs(reloaded, pixels).logits.numpy(),
                                  theirs(model, pixels).logits.numpy())


def test_a_flaxlab_vit_out_to_transformers(tmp_path, interop):
    """A flaxlab-initialized ViT (a run's section: num_classes / image_size / channels are
    the dataset's, read off the params) -> a checkpoint transformers computes the same."""
    section = dict(patch_size=4, pool="cls", head_zero_init=False,
                   encoder=dict(d_model=32, num_heads=4, mlp_dim=64, num_layers=2))
    cfg = vit_models.make_config("tiny/4", **section, image_size=16, num_classes=5)
    flax_model = vit_models.ViT(cfg)
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          param_shapes(flax_model))
    fields = {**section, **vit.data_fields(params)}
    assert vit.data_fields(params) == dict(num_classes=5, image_size=16, channels=3)
    back = vit.params_from_hf(vit.params_to_hf(params, fields), fields)
    interop.assert_trees_equal(params, back)
    config = vit.hf_config(fields)
    assert config["layer_norm_eps"] == 1e-6 and config["architectures"] == [vit.CLASSIFIER]
    hf.write_checkpoint(str(tmp_path / "out"), config, vit.params_to_hf(params, fields))
    reloaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "out"))
    pixels = images(2)
    got = np.asarray(ours(flax_model, params, pixels))
    assert np.abs(got - theirs(reloaded.eval(), pixels).logits.numpy()).max() < 1e-4
    with pytest.raises(hf.ConversionError, match="pool='cls'"):
        vit.hf_config(dict(fields, pool="gap"))  # configs/vit.py's mean pooling
    with pytest.raises(hf.ConversionError, match="lack num_classes.*data_fields"):
        vit.hf_config(section)
    with pytest.raises(hf.ConversionError, match=r"num_classes=4 \(the params: 5\)"):
        vit.params_to_hf(params, dict(fields, num_classes=4))


def test_vit_model_pooler_is_the_representation_layer(tmp_path):
    torch.manual_seed(1)
    model = perturbed(transformers.ViTModel(transformers.ViTConfig(**SIZE,
                                                                   pooler_output_size=24)))
    model.save_pretrained(tmp_path / "hf")
    config, tensors, fields, flax_model, params = converted(str(tmp_path / "hf"))
    assert fields["num_classes"] == 0 and fields["representation_size"] == 24
    pixels = images(3)
    features, state = ours(flax_model, params, pixels, mutable="intermediates")
    out = theirs(model, pixels)
    assert np.abs(np.asarray(features) - out.pooler_output.numpy()).max() < 1e-4
    encoded = np.asarray(state["intermediates"]["encoded"][0])
    assert np.abs(encoded - out.last_hidden_state.numpy()).max() < 1e-4
    hf.write_checkpoint(str(tmp_path / "out"), vit.hf_config(fields, config),
                        vit.params_to_hf(params, fields))
    reloaded = transformers.ViTModel.from_pretrained(str(tmp_path / "out")).eval()
    again = theirs(reloaded, pixels)
    np.testing.assert_array_equal(again.pooler_output.numpy(), out.pooler_output.numpy())
    # Without the representation layer the pooler is not read: the class-token features.
    no_pooler = vit.params_from_hf(tensors, dict(fields, representation_size=None))
    assert "representation" not in no_pooler
    bare = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    with pytest.raises(hf.ConversionError, match="'pooler.dense.weight' is missing.*"
                       "representation_size=None"):
        vit.params_from_hf(bare, fields)


def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor(classifier):
    _, path = classifier
    config, tensors = hf.read_checkpoint(path)
    fields = vit.model_overrides(config)
    name = "vit.encoder.layer.1.attention.attention.value.bias"
    with pytest.raises(hf.ConversionError, match="'encoder.layer.1.attention.attention.value"
                       ".bias' is missing"):
        vit.params_from_hf({k: v for k, v in tensors.items() if k != name}, fields)
    conv = "vit.embeddings.patch_embeddings.projection.weight"
    with pytest.raises(hf.ConversionError, match=r"'embeddings.patch_embeddings.projection."
                       r"weight' has shape \(32, 3, 4, 5\), the config implies \(32, 3, 4, 4\)"):
        vit.params_from_hf(dict(tensors, **{conv: np.zeros((32, 3, 4, 5))}), fields)
    with pytest.raises(hf.ConversionError, match=r"'classifier.weight' has shape \(5, 32\), "
                       r"the config implies \(7, 32\)"):
        vit.params_from_hf(tensors, dict(fields, num_classes=7))
    with pytest.raises(hf.ConversionError, match="'embeddings.mask_token' is not part of"):
        vit.params_from_hf(dict(tensors, **{"vit.embeddings.mask_token": np.zeros((1, 1, 32))}),
                           fields)
    with pytest.raises(hf.ConversionError, match="model_type 'deit'"):
        vit.model_overrides(dict(config, model_type="deit"))
    for bad, match in ((dict(qkv_bias=False), "qkv_bias"),
                       (dict(image_size=[16, 32]), "square"),
                       (dict(hidden_act="silu"), "hidden_act"),
                       (dict(architectures=["ViTForMaskedImageModeling"]), "architectures")):
        with pytest.raises(hf.ConversionError, match=match):
            vit.model_overrides(dict(config, **bad))
    with pytest.raises(hf.ConversionError, match="both a representation layer and a head"):
        vit.hf_config(dict(fields, representation_size=8))


def test_command_line_into_a_workdir_and_back_out(tmp_path, classifier, interop):
    model, path = classifier
    out = interop.convert_in_and_out("vit", path, tmp_path, converted(path)[-1])
    reloaded = transformers.ViTForImageClassification.from_pretrained(out).eval()
    pixels = images(5)
    np.testing.assert_array_equal(theirs(reloaded, pixels).logits.numpy(),
                                  theirs(model, pixels).logits.numpy())
