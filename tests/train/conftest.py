"""Shared checks of the interop tests (tests/train/test_interop_*.py) and readers of a
sweep's results files (the sweep, search and seeds tests)."""
import csv
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest


def assert_trees_equal(a, b) -> None:
    """Same structure, every leaf bit-equal."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def convert_in_and_out(arch: str, checkpoint: str, tmp_path, params) -> str:
    """`python -m train.convert` from `checkpoint` into a workdir (whose params init_from
    loads bit-equal to `params`) and back out; the directory written back."""
    from train import convert, init_from  # noqa: PLC0415

    workdir, out = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "again")
    assert convert.run(["convert", "--from=hf", f"--arch={arch}", f"--checkpoint={checkpoint}",
                        f"--workdir={workdir}"]) == 0
    assert_trees_equal(params, init_from.load_variables(workdir)[0])
    assert convert.run(["convert", "--to=hf", f"--workdir={workdir}",
                        f"--checkpoint={out}"]) == 0
    return out


def bpe_tokenizer(texts, vocab_size: int, bos: str | None = None, eos: str | None = None,
                  pad: str | None = None, template: bool = False):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` (GPT-2's and CLIP's kind)
    trained on `texts`; with `template`, it wraps every text in bos and eos (CLIP's)."""
    import transformers  # noqa: PLC0415
    from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # noqa: PLC0415
                            processors, trainers)

    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(t, tok.token_to_id(t)) for t in
                                                      (bos, eos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                                eos_token=eos, pad_token=pad)


def wordpiece_tokenizer(texts, vocab_size: int):
    """A BERT WordPiece `transformers.BertTokenizerFast` trained on `texts`."""
    import transformers  # noqa: PLC0415
    from tokenizers import (Tokenizer, decoders, models, normalizers,  # noqa: PLC0415
                            pre_tokenizers, processors, trainers)

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                          sep_token="[SEP]", pad_token="[PAD]",
                                          cls_token="[CLS]", mask_token="[MASK]")


def pretrained_run(converted: str, workdir: str, *overrides: str) -> dict:
    """`python -m train.main --config=configs/pretrained.py:<converted>` (exit 0): its
    summary.json."""
    import json  # noqa: PLC0415

    import configs  # noqa: PLC0415
    from train import main  # noqa: PLC0415

    config = os.path.join(os.path.dirname(configs.__file__), "pretrained.py")
    assert main.run(["main", f"--config={config}:{converted}", f"--workdir={workdir}",
                     *overrides]) == 0
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_lm_workdir(tmp_path_factory):
    """A finished 4-step run of configs/gpt.py:tiny (checkpoints at 2 and 4, no sample):
    shared by the generation and distillation tests."""
    from configs import gpt  # noqa: PLC0415
    from train import trainer  # noqa: PLC0415

    c = gpt.get_config("tiny")
    c.train.update(num_steps=4, eval_every=4, log_every=1)
    c.checkpoint.every = 2
    c.evals.sample.every = -1
    workdir = str(tmp_path_factory.mktemp("tiny_lm") / "run")
    trainer.train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="session")
def interop():
    return SimpleNamespace(assert_trees_equal=assert_trees_equal,
                           convert_in_and_out=convert_in_and_out, bpe_tokenizer=bpe_tokenizer,
                           wordpiece_tokenizer=wordpiece_tokenizer,
                           pretrained_run=pretrained_run)


def read_csv(path) -> list[dict]:
    """A results.csv / results_grouped.csv as one dict per row (header cells as keys)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def md_tables(path) -> list[list[dict]]:
    """Every markdown table of the file as a list of dicts (header cells as keys)."""
    tables, lines = [], []
    for line in [*open(path, encoding="utf-8"), ""]:
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif lines:
            tables.append([dict(zip(lines[0], row)) for row in lines[2:]])
            lines = []
    return tables


def must_not_train(config, workdir, **kwargs):
    """A train_and_evaluate stand-in for reruns that must read every run back."""
    raise AssertionError(f"trained {workdir} again")


@pytest.fixture(scope="session")
def sweep_files():
    return SimpleNamespace(read_csv=read_csv, md_tables=md_tables, must_not_train=must_not_train)


@pytest.fixture(scope="module")
def base():
    """The sweep, search and seeds tests' base config: configs/gpt.py:tiny, locked as the
    command line's config flag locks it (values change, keys don't)."""
    from configs import gpt  # noqa: PLC0415

    config = gpt.get_config("tiny")
    config.lock()
    return config
