"""GPT-2 checkpoints in and out, proven against `transformers` itself: the same logits
(with padding), the same greedy tokens, bit-exact round trips, and clear refusals.
Checkpoints are made here from small random `transformers` models (no network)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import decoding, transformer  # noqa: E402
from train.interop import gpt2, hf  # noqa: E402

VOCAB, POSITIONS = 97, 40


def hf_model(tmp_path, **overrides):
    """A random GPT2LMHeadModel saved as a checkpoint directory (safetensors)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_positions=POSITIONS,
                                               n_embd=32, n_layer=2, n_head=4), **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so they count
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model, str(tmp_path / "hf")


def converted(path):
    config, tensors = hf.read_checkpoint(path)
    fields = gpt2.model_overrides(config)
    cfg = transformer.make_config("tiny", **fields)
    return config, fields, transformer.Decoder(cfg), gpt2.params_from_hf(tensors, fields)


def torch_logits(model, tokens, mask=None, positions=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens)),
                    attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
                    position_ids=None if positions is None else torch.tensor(positions))
    return out.logits.numpy()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return hf_model(tmp_path_factory.mktemp("tied"))


@pytest.mark.parametrize("untied", [False, True])
def test_logits_equal_transformers_with_and_without_padding(tmp_path, tied, untied):
    model, path = hf_model(tmp_path, tie_word_embeddings=False) if untied else tied
    _, _, decoder, params = converted(path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 12))
    ours = np.asarray(decoder.apply({"params": params}, jnp.asarray(tokens)))
    theirs = torch_logits(model, tokens)
    assert np.abs(ours - theirs).max() < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    # Left padding: positions count real tokens only, in both.
    mask = np.ones_like(tokens)
    mask[0, :4], mask[1, :1] = 0, 0
    ours = np.asarray(decoder.apply({"params": params}, jnp.asarray(tokens),
                                    valid=jnp.asarray(mask, bool)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    theirs = torch_logits(model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_greedy_generation_equals_transformers_generate(tied):
    model, path = tied
    _, _, decoder, params = converted(path)
    prompts = np.random.default_rng(1).integers(0, VOCAB, (2, 5))
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompts), max_new_tokens=20, do_sample=False,
                                attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                pad_token_id=0)[:, 5:].numpy()
    ours, _ = decoding.generate(decoder, params, jnp.asarray(prompts), max_new_tokens=20,
                                temperature=0.0)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_round_trips(tmp_path, tied, interop):
    model, path = tied
    config, fields, decoder, params = converted(path)
    back = gpt2.params_from_hf(gpt2.params_to_hf(params, fields), fields)  # flaxlab->hf->flaxlab
    interop.assert_trees_equal(params, back)
    out = tmp_path / "out"  # hf -> flaxlab -> hf, loaded by transformers
    hf.write_checkpoint(str(out), gpt2.hf_config(fields, config), gpt2.params_to_hf(params, fields))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))


def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor(tmp_path, tied):
    _, path = tied
    config, tensors = hf.read_checkpoint(path)
    fields = gpt2.model_overrides(config)
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(hf.ConversionError, match="'h.1.mlp.c_fc.bias' is missing"):
        gpt2.params_from_hf(missing, fields)
    reshaped = dict(tensors, **{"transformer.h.0.attn.c_attn.weight": np.zeros((32, 95))})
    with pytest.raises(hf.ConversionError, match=r"'h.0.attn.c_attn.weight' has shape "
                       r"\(32, 95\), the config implies \(32, 96\)"):
        gpt2.params_from_hf(reshaped, fields)
    with pytest.raises(hf.ConversionError, match="'h.0.attn.rotary.weight' is not part of"):
        gpt2.params_from_hf(dict(tensors, **{"transformer.h.0.attn.rotary.weight":
                                             np.zeros(3)}), fields)
    with pytest.raises(hf.ConversionError, match="model_type 'bert'"):
        gpt2.model_overrides(dict(config, model_type="bert"))
    with pytest.raises(hf.ConversionError, match="scale_attn_by_inverse_layer_idx"):
        gpt2.model_overrides(dict(config, scale_attn_by_inverse_layer_idx=True))
    os.rename(os.path.join(path, "model.safetensors"), tmp_path / "moved")
    try:
        torch.save({"x": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))
        with pytest.raises(hf.ConversionError, match="is a pickle"):
            hf.read_checkpoint(path)
        assert set(hf.read_checkpoint(path, allow_pickle=True)[1]) == {"x"}
    finally:
        os.remove(os.path.join(path, "pytorch_model.bin"))
        os.rename(tmp_path / "moved", os.path.join(path, "model.safetensors"))


def test_command_line_into_a_workdir_and_back_out(tmp_path, tied, capsys, interop):
    from train import convert, errors, init_from  # noqa: PLC0415

    model, path = tied
    out = interop.convert_in_and_out("gpt2", path, tmp_path, converted(path)[-1])
    workdir = tmp_path / "run"
    assert init_from.load_variables(str(workdir))[2] == 0  # the step init_from loads
    args = ["convert", "--from=hf", "--arch=gpt2", f"--checkpoint={path}", f"--workdir={workdir}"]
    assert convert.run(args) == errors.EXIT_WORKDIR  # never over an existing workdir
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 7))
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))
    capsys.readouterr()
    assert convert.run(args[:2] + ["--arch=llama"] + args[3:4] + [f"--workdir={tmp_path}/x"]) \
        == errors.EXIT_CONFIG
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flaxlab: error:")]
    assert len(lines) == 1 and "--arch='llama'; supported: gpt2" in lines[0]


def test_generation_with_the_checkpoint_s_own_tokenizer(tmp_path):
    """A byte-level BPE tokenizer (GPT-2's kind) saved beside the model travels into the
    workdir; train.generate's greedy continuation equals transformers' decoded one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    from train import convert, generate  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "def main():"] * 20,
                            trainers.BpeTrainer(vocab_size=300,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    model, path = hf_model(tmp_path, vocab_size=tok.get_vocab_size())
    hf_tok.save_pretrained(path)
    workdir = tmp_path / "run"
    assert convert.run(["convert", "--from=hf", "--arch=gpt2", f"--checkpoint={path}",
                        f"--workdir={workdir}"]) == 0
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    prompt = "the cat"
    ours = generate.continuation(str(workdir), prompt, max_new_tokens=12)
    ids = torch.tensor([hf_tok(prompt)["input_ids"]])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    assert ours == hf_tok.decode(new) and len(ours) > 0
