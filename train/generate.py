r"""Continue a prompt with the language model of a workdir (greedy or sampled):

    python -m train.generate --workdir=runs/gpt --prompt="def main(" [--max_new_tokens=64] \
        [--temperature=0] [--top_k=0] [--top_p=1] [--step=best] [--seed=0]

The prompt is tokenized with the workdir's own tokenizer: `<workdir>/tokenizer/` for a
converted checkpoint (train.convert copies it; the `interop` extra), else the byte
tokenizer of flaxlab's embedded data. Prints the prompt and its continuation.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags, logging

from train import errors
from train.data.tokenizers import WORKDIR_TOKENIZER, ByteTokenizer


def define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Workdir of a language-model run (task lm).",
                        flag_values=fv)
    flags.DEFINE_string("prompt", "", "Text to continue.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0 = all).",
                         flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=fv)
    flags.DEFINE_string("step", "best", "Checkpoint: best | latest | a step.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    return fv


def run_tokenizer(workdir: str, saved: dict):
    """The tokenizer a workdir's model reads: its own tokenizer/ (train.convert copies a
    checkpoint's there), else the one its config's data source names (a run fine-tuned
    from a converted checkpoint), else the byte tokenizer."""
    from train.data.tokenizers import make_tokenizer  # noqa: PLC0415

    if os.path.isdir(os.path.join(workdir, WORKDIR_TOKENIZER)):
        return make_tokenizer(os.path.join(workdir, WORKDIR_TOKENIZER))
    data = saved.get("data", {})
    return make_tokenizer(data.get(data.get("source", ""), {}).get("tokenizer", ""))


def continuation(workdir: str, prompt: str, max_new_tokens: int, *, temperature=0.0,
                 top_k=0, top_p=1.0, step="best", seed=0) -> str:
    """The text the workdir's model generates after `prompt`."""
    import jax  # noqa: PLC0415 -- keeps --help fast
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from models import decoding  # noqa: PLC0415
    from train import families, init_from  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise errors.WorkdirError(f"{workdir} has no config.json: not a flaxlab workdir")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("task", {}).get("name") != "lm":
        raise errors.ConfigError(f"{workdir} holds a {saved.get('task', {}).get('name')!r} "
                                 "run; generation needs a language model (task lm)")
    params, _, _ = init_from.load_variables(workdir, step)
    vocab = int(params["embed"]["tokens"]["embedding"].shape[0])
    model, _ = families.build(ml_collections.ConfigDict(saved["model"]), "lm",
                              vocab_size=vocab)
    tok = run_tokenizer(workdir, saved)
    # flaxlab's byte models read BOS + prompt and stop at EOS; a checkpoint tokenizer's
    # prompt is its plain tokens, as transformers' generate reads them.
    byte_level = isinstance(tok, ByteTokenizer)
    ids = list(tok.encode(prompt, add_bos=byte_level))
    eos = tok.eos_id if byte_level else None
    if not ids:
        raise errors.ConfigError("--prompt is empty after tokenization; give some text")
    if len(ids) + max_new_tokens > model.cfg.max_length:
        raise errors.ConfigError(f"--prompt ({len(ids)} tokens) + --max_new_tokens="
                                 f"{max_new_tokens} exceeds model.max_length "
                                 f"{model.cfg.max_length}")
    tokens, _ = decoding.generate(model, params, jnp.asarray([ids]), rng=jax.random.key(seed),
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_id=eos)
    return tok.decode(list(jax.device_get(tokens)[0]))


def run(argv: list[str]) -> int:
    fv = define_flags()
    try:
        try:
            fv(argv)
        except flags.Error as e:
            raise errors.ConfigError(errors.first_line(e)) from e
        if not fv.workdir:
            raise errors.ConfigError("--workdir is required: " + __doc__.split("\n\n")[1])
        text = continuation(fv.workdir, fv.prompt, fv.max_new_tokens,
                            temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p,
                            step=fv.step, seed=fv.seed)
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and crashes
        code = errors.report(e)
        if code is None:
            raise  # a crash: the traceback is the report
        return code
    print(fv.prompt + text, flush=True)
    return errors.EXIT_OK


if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)
    sys.exit(run(sys.argv))
