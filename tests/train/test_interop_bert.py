"""BERT masked-LM checkpoints in and out, proven against `transformers`: equal logits with
padding and token types, bit-exact round trips, clear refusals (random small models, no
network)."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import transformer  # noqa: E402
from train.interop import bert, hf  # noqa: E402

VOCAB = 89


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=24, type_vocab_size=2)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("bert") / "hf"
    model.save_pretrained(path)
    return model, str(path)


def converted(path):
    config, tensors = hf.read_checkpoint(path)
    fields = bert.model_overrides(config)
    encoder = transformer.Encoder(transformer.make_config("tiny", **fields), head="mlm")
    return config, fields, encoder, bert.params_from_hf(tensors, fields)


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (3, 10))
    mask = np.ones_like(tokens)
    mask[0, 6:], mask[2, 3:] = 0, 0          # right padding (pad id 0)
    tokens = tokens * mask
    types = (np.arange(10)[None] >= rng.integers(2, 8, (3, 1))).astype(np.int64)
    return tokens, mask, types


def torch_logits(model, tokens, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).logits.numpy()


def test_mlm_logits_equal_transformers_with_padding_and_token_types(checkpoint):
    model, path = checkpoint
    _, _, encoder, params = converted(path)
    tokens, mask, types = batch()
    ours = np.asarray(encoder.apply({"params": params}, jnp.asarray(tokens),
                                    valid=jnp.asarray(mask, bool),
                                    token_types=jnp.asarray(types)))
    theirs = torch_logits(model, tokens, mask, types)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4
    assert (ours[real].argmax(-1) == theirs[real].argmax(-1)).all()


def test_round_trips(tmp_path, checkpoint, interop):
    model, path = checkpoint
    config, fields, _, params = converted(path)
    back = bert.params_from_hf(bert.params_to_hf(params, fields), fields)
    interop.assert_trees_equal(params, back)
    hf.write_checkpoint(str(tmp_path / "out"), bert.hf_config(fields, config),
                        bert.params_to_hf(params, fields))
    reloaded = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens, mask, types = batch()
    np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask, types),
                                  torch_logits(model, tokens, mask, types))


def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor(checkpoint):
    _, path = checkpoint
    config, tensors = hf.read_checkpoint(path)
    fields = bert.model_overrides(config)
    name = "bert.encoder.layer.1.attention.self.key.bias"
    with pytest.raises(hf.ConversionError, match="'encoder.layer.1.attention.self.key.bias' "
                       "is missing"):
        bert.params_from_hf({k: v for k, v in tensors.items() if k != name}, fields)
    with pytest.raises(hf.ConversionError, match=r"has shape \(3, 32\), the config implies "
                       r"\(2, 32\)"):
        bert.params_from_hf(dict(tensors, **{
            "bert.embeddings.token_type_embeddings.weight": np.zeros((3, 32))}), fields)
    with pytest.raises(hf.ConversionError, match="position_embedding_type='relative_key'"):
        bert.model_overrides(dict(config, position_embedding_type="relative_key"))
    with pytest.raises(hf.ConversionError, match="model_type 'gpt2'"):
        bert.model_overrides(dict(config, model_type="gpt2"))


def test_command_line_into_a_workdir_and_back_out(tmp_path, checkpoint, interop):
    model, path = checkpoint
    out = interop.convert_in_and_out("bert", path, tmp_path, converted(path)[-1])
    reloaded = transformers.BertForMaskedLM.from_pretrained(out).eval()
    tokens, mask, types = batch()
    np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask, types),
                                  torch_logits(model, tokens, mask, types))
