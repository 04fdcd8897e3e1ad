"""Converted checkpoints on the embedded data in their own tokens (configs/pretrained.py):
a fine-tuned GPT-2's evaluation loss equals transformers' on the same corpus windows, and
it exports and generates like transformers; a BERT (WordPiece) fine-tunes its masked LM;
a CLIP's zero-shot accuracy on the held-out shapes equals the accuracy transformers'
embeddings give (random small checkpoints, no network)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from train.data import shapes, text  # noqa: E402
from train.data.tokenizers import FileTokenizer  # noqa: E402

MAX_BYTES = 200_000   # the corpus cap of these runs (splits of 180 kB, 10 kB, 10 kB)
SEQ = 32


def corpus_texts(n: int = 200):
    data = text.load_corpus(MAX_BYTES).decode("utf-8", "replace")
    return [data[i:i + 1000] for i in range(0, len(data), len(data) // n)]


def save_random(model, path, bias_noise=True):
    torch.manual_seed(0)
    if bias_noise:
        with torch.no_grad():  # biases and norms away from their init, so they count
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or "ln_" in name:
                    p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    return model


def lm_loss(model, tokens: np.ndarray) -> float:
    """transformers' mean next-token cross-entropy of LM windows int[N, SEQ + 1]."""
    tokens = np.asarray(tokens, np.int64)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens[:, :-1])).logits
        return float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(tokens[:, 1:]).reshape(-1)))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, interop):
    """A random GPT-2 with a BPE tokenizer of the corpus, converted into a workdir."""
    from train import convert  # noqa: PLC0415

    root = tmp_path_factory.mktemp("gpt2_pretrained")
    tok = interop.bpe_tokenizer(corpus_texts(), 400, bos="<|endoftext|>", eos="<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_random(model, root / "hf")
    tok.save_pretrained(root / "hf")
    assert convert.run(["convert", "--from=hf", "--arch=gpt2", f"--checkpoint={root}/hf",
                        f"--workdir={root}/converted"]) == 0
    return model, tok, root


def test_gpt2_fine_tunes_evaluates_like_transformers_and_exports(gpt2, interop):
    """train.main on a converted GPT-2 (3 steps): its validation loss is transformers' on
    the same corpus windows in the same tokens (of the exported weights), below the
    converted model's; train.generate on the run (its data's tokenizer) and the export
    give the same greedy text."""
    from train import convert, generate  # noqa: PLC0415

    model, tok, root = gpt2
    converted, run = str(root / "converted"), str(root / "tuned")
    tuned = interop.pretrained_run(
        converted, run, f"--config.data.stdlib_text.max_bytes={MAX_BYTES}",
        "--config.data.batch_size=8", "--config.evals.sample.every=-1",
        "--config.train.num_steps=3", "--config.optim.learning_rate=1e-3")
    # The corpus in the checkpoint's tokens: every full validation window.
    tokens = text.corpus_splits(MAX_BYTES, 0.9, 0.05, 0.05,
                                f"{converted}/tokenizer")["validation"]
    assert (tokens == np.asarray(tok(text.load_corpus(MAX_BYTES)[180_000:190_000].decode(
        "utf-8", "replace"))["input_ids"])).all()
    windows = np.stack([tokens[i:i + SEQ + 1] for i in range(0, len(tokens) - SEQ, SEQ)])
    assert convert.run(["convert", "--to=hf", f"--workdir={run}",
                        f"--checkpoint={root}/tuned_hf"]) == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(root / "tuned_hf").eval()
    assert exported.config.eos_token_id == tok.eos_token_id  # the original config's keys
    assert abs(lm_loss(exported, windows) - tuned["validation/loss"]) < 1e-4
    assert tuned["validation/loss"] < lm_loss(model, windows) - 0.01
    ids = torch.tensor([tok("def main")["input_ids"]])
    with torch.no_grad():
        new = exported.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert generate.continuation(run, "def main", max_new_tokens=10) == tok.decode(
        new[0, ids.shape[1]:], skip_special_tokens=True)


def test_wordpiece_tokenizer_matches_transformers_and_a_bert_fine_tunes(tmp_path, interop):
    from train import convert  # noqa: PLC0415

    tok = interop.wordpiece_tokenizer(corpus_texts(), 300)
    tok.save_pretrained(tmp_path / "hf")
    ours = FileTokenizer(str(tmp_path / "hf"))
    sample = "def main(argv):\n    return os.path.join(argv[0], 'x')  # Done."
    assert ours.encode(sample, add_bos=True, add_eos=True).tolist() == tok(sample)["input_ids"]
    assert ours.decode(ours.encode(sample)) == tok.decode(tok(sample)["input_ids"],
                                                          skip_special_tokens=True)
    vocab = tok.get_vocab()
    assert (ours.mask_id, ours.pad_id, ours.bos_id, ours.eos_id) == (
        vocab["[MASK]"], vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"])
    assert set(ours.special_ids) == {vocab[t] for t in tok.all_special_tokens}
    torch.manual_seed(0)
    save_random(transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=SEQ)), tmp_path / "hf")
    assert convert.run(["convert", "--from=hf", "--arch=bert", f"--checkpoint={tmp_path}/hf",
                        f"--workdir={tmp_path}/converted"]) == 0
    summary = interop.pretrained_run(
        str(tmp_path / "converted"), str(tmp_path / "tuned"), "--config.train.num_steps=1",
        f"--config.data.stdlib_text.max_bytes={MAX_BYTES}", "--config.data.batch_size=8")
    assert np.isfinite(summary["validation/loss"]) and summary["validation/loss"] < np.log(
        len(tok)) + 1.0
    with open(tmp_path / "tuned" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["data"]["stdlib_text"]["tokenizer"] == str(
            tmp_path / "converted" / "tokenizer")


def test_clip_zero_shot_accuracy_equals_transformers_embeddings(tmp_path, interop):
    from train import convert  # noqa: PLC0415

    captions = [shapes.caption_string(t, c, s, p, n) for t in range(6) for c in range(16)
                for s in range(2) for p in range(5) for n in (1, 2, 3)]
    tok = interop.bpe_tokenizer(captions, 500, bos="<|startoftext|>", eos="<|endoftext|>",
                                pad="<|endoftext|>", template=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = save_random(transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=24, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=4),
        projection_dim=24)), tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transformers.CLIPImageProcessor(image_mean=list(mean), image_std=list(std)).save_pretrained(
        tmp_path / "hf")
    assert convert.run(["convert", "--from=hf", "--arch=clip", f"--checkpoint={tmp_path}/hf",
                        f"--workdir={tmp_path}/converted"]) == 0
    sizes = [f"--config.data.shapes.shapes_split_sizes.{s}=48"
             for s in ("train", "validation", "test", "zero_shot")]
    off = [f"--config.evals.{e}.every=-1" for e in ("retrieval", "linear_probe", "heatmap")]
    summary = interop.pretrained_run(str(tmp_path / "converted"), str(tmp_path / "eval"),
                                     *sizes, *off)
    # transformers: the same images, normalized by its image processor's mean and std, and
    # the prompts tokenized by the saved tokenizer itself.
    ds = shapes.ShapesDataset("zero_shot", 8, 0, image_size=16, num_examples=48)
    images = ds.examples(np.arange(48))
    pixels = (images["image"] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    prompts = [p for per_class in ds.class_prompts() for p in per_class]
    ids = tok(prompts, padding="max_length", max_length=24)["input_ids"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.tensor(
            pixels.transpose(0, 3, 1, 2)))
        prompt = model.get_text_features(input_ids=torch.tensor(ids))
    image = getattr(image, "pooler_output", image).numpy()
    prompt = getattr(prompt, "pooler_output", prompt).numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    weights = unit(unit(prompt.reshape(16, len(ds.prompt_templates), -1)).mean(1))
    top1 = float(np.mean((unit(image) @ weights.T).argmax(-1) == images["label"]))
    assert summary["zero_shot/top1"] == pytest.approx(top1, abs=1e-9)


def test_special_tokens_are_never_masked():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from train.tasks.mlm import mask_tokens  # noqa: PLC0415

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (64, 32)))
    inputs, selected = mask_tokens(jax.random.key(0), tokens, mask_probability=0.5,
                                   mask_token_fraction=1.0, random_token_fraction=0.0,
                                   vocab_size=50, mask_id=7, first_regular_id=0,
                                   special_ids=(3, 7, 11))
    special = np.isin(np.asarray(tokens), (3, 7, 11))
    assert not np.asarray(selected)[special].any() and np.asarray(selected)[~special].mean() > 0.4
    assert (np.asarray(inputs)[np.asarray(selected)] == 7).all()


def test_refusals_are_one_line(tmp_path, gpt2, capsys):
    """configs/pretrained.py needs a converted workdir; the mlm task needs a mask token."""
    import configs  # noqa: PLC0415
    from train import errors, main  # noqa: PLC0415

    config_dir = os.path.dirname(configs.__file__)
    converted = gpt2[2] / "converted"
    runs = [[f"--config={config_dir}/pretrained.py:{tmp_path}/none"],
            [f"--config={config_dir}/pretrained.py:{gpt2[2]}/tuned"],  # a run, not converted
            [f"--config={config_dir}/bert.py:tiny",
             f"--config.data.stdlib_text.tokenizer={converted}"]]      # GPT-2's: no [MASK]
    for args in runs:
        assert main.run(["main", *args, f"--workdir={tmp_path}/run"]) == errors.EXIT_CONFIG
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flaxlab:")]
    assert len(lines) == 3 and "needs a workdir written by python -m train.convert" in lines[0]
    assert "was not written by train.convert" in lines[1] and "no mask token" in lines[2]
    assert not os.path.exists(tmp_path / "run")
