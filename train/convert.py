r"""Checkpoints between the Hugging Face format and flaxlab workdirs (the `interop` extra).

    python -m train.convert --from=hf --arch=gpt2 --checkpoint=HF_DIR --workdir=OUT \
        [--allow_pickle]
    python -m train.convert --to=hf --workdir=RUN --checkpoint=HF_OUT [--step=best]

--arch: gpt2 (GPT2LMHeadModel -> the `lm` decoder) | bert (BertForMaskedLM -> the `mlm`
encoder). --from=hf reads HF_DIR (config.json + model.safetensors; a pickled
pytorch_model.bin only with --allow_pickle) and writes a flaxlab workdir: config.json (the
architecture's config, e.g. configs/gpt.py:gpt2_small, with the checkpoint's model
fields), checkpoints/0 with the params and tokenizer/ with the checkpoint's tokenizer
files (train.generate uses them).
Evaluate or fine-tune it with --config=configs/pretrained.py:OUT (the embedded data in
the checkpoint's own tokens and image preprocessing); any other run starts from it with
--config.init_from.workdir=OUT and the same model fields.
--to=hf writes config.json + model.safetensors of a run's checkpoint (--step: best |
latest | N) that transformers' from_pretrained loads.
Errors are one `flaxlab: error:` line (train/errors.py exit codes).
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags, logging

from train import errors

USAGE = __doc__.split("\n\n")[1]


def define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_enum("from", None, ["hf"], "Convert from this format into --workdir.",
                      flag_values=fv)
    flags.DEFINE_enum("to", None, ["hf"], "Convert --workdir's checkpoint to this format.",
                      flag_values=fv)
    flags.DEFINE_string("arch", None, "Architecture of the checkpoint (--from=hf).",
                        flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "The Hugging Face checkpoint directory.",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "The flaxlab workdir.", flag_values=fv)
    flags.DEFINE_string("step", "best", "--to=hf: best | latest | a step.", flag_values=fv)
    flags.DEFINE_boolean("allow_pickle", False, "Read a pickled pytorch_model.bin "
                         "(can run code: only for trusted files).", flag_values=fv)
    return fv


def _architecture(name: str):
    from train.interop import ARCHITECTURES  # noqa: PLC0415 -- the interop extra

    if name not in ARCHITECTURES:
        raise errors.ConfigError(f"--arch={name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _as_stored(section) -> None:
    """The model as the converted params are: float32, layers unrolled (init_from turns
    them into a scanned or mixed-precision run's layout); reference attention where the
    checkpoint has attention dropout (the fused kernels have none)."""
    for key, value in (("dtype", "float32"), ("param_dtype", "float32"),
                       ("scan_layers", False)):
        if key in section:
            section[key] = value
    if section.get("attention_dropout_rate", 0) > 0 and "attention_impl" in section:
        section.attention_impl = "reference"  # the checkpoint's attention dropout trains
    for value in section.values():
        if hasattr(value, "keys"):  # a nested model config (ViT's encoder)
            _as_stored(value)


def from_hf(arch: str, checkpoint: str, workdir: str, allow_pickle: bool = False) -> None:
    """A flaxlab workdir (config.json + checkpoints/0) from a Hugging Face checkpoint."""
    import importlib  # noqa: PLC0415

    from train import checkpoint as ckpt_lib  # noqa: PLC0415
    from train.interop import hf  # noqa: PLC0415
    from train.metrics_log import write_json  # noqa: PLC0415

    module = _architecture(arch)
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise errors.WorkdirError(f"{workdir} already holds checkpoints; convert into a "
                                  "new --workdir")
    hf_config, tensors = hf.read_checkpoint(checkpoint, allow_pickle)
    fields = module.model_overrides(hf_config)
    params = module.params_from_hf(tensors, fields)
    config_file, variant = module.CONFIG.split(":")
    config = importlib.import_module(f"configs.{config_file}").get_config(variant)
    for key, value in fields.items():
        if key not in config.model:
            continue  # a dataset field (vocab_size, num_classes, ...): the params hold it
        if isinstance(value, dict):
            config.model[key].update(value)  # a nested model config (ViT's encoder)
        else:
            config.model[key] = value
    _as_stored(config.model)
    config.train.num_steps = 0  # a converted run has taken no steps here
    config.checkpoint.best_metric = ""  # nothing ranks it: init_from takes its step 0
    os.makedirs(workdir, exist_ok=True)
    state = {"step": np.int32(0), "params": params, "model_state": {},
             "nonfinite_step": np.int32(-1)}
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1) as ckpt:
        ckpt.save(0, state, {"converted_from": os.path.abspath(checkpoint),
                             "hf_config": hf_config}, force=True)
    from train.interop import tokenizer  # noqa: PLC0415

    copied = tokenizer.copy_files(checkpoint, workdir)
    if copied:
        logging.info("tokenizer files copied to %s/tokenizer: %s", workdir, ", ".join(copied))
    write_json(os.path.join(workdir, "config.json"),
               {**config.to_dict(), "converted_from": {
                   "format": "hf", "arch": arch, "config": module.CONFIG,
                   "data_fields": module.data_fields(params), "hf_config": hf_config}})
    logging.info("wrote %s: %d tensors of %s", workdir, len(tensors), checkpoint)


def _conversion_of(saved: dict) -> dict:
    """The `converted_from` record of a run or of the run it started from (init_from,
    followed back): a fine-tuned conversion exports with the original config.json's other
    keys (token ids, task parameters)."""
    import json  # noqa: PLC0415

    for _ in range(16):  # an init_from chain; a cycle cannot be longer than this
        if "converted_from" in saved:
            return saved["converted_from"]
        parent = saved.get("init_from", {}).get("workdir")
        path = os.path.join(parent, "config.json") if parent else ""
        if not path or not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    return {}


def to_hf(workdir: str, checkpoint: str, step: str = "best") -> None:
    """config.json + model.safetensors of `workdir`'s checkpoint `step`."""
    import json  # noqa: PLC0415

    from train import init_from  # noqa: PLC0415
    from train.interop import hf  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise errors.WorkdirError(f"{workdir} has no config.json: not a flaxlab workdir")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    from train.interop import ARCHITECTURES  # noqa: PLC0415

    source = _conversion_of(saved)
    task, family = saved.get("task", {}).get("name"), saved["model"]["family"]
    kinds = {(m.FAMILY, m.TASK): name for name, m in ARCHITECTURES.items()}
    if (family, task) not in kinds:
        raise errors.ConfigError(f"{workdir} is a {family} model for task {task!r}; --to=hf "
                                 "converts: " + ", ".join(f"{f} for {t} ({a})" for (f, t), a
                                                         in sorted(kinds.items())))
    module = _architecture(source.get("arch", kinds[(family, task)]))
    params, _, chosen = init_from.load_variables(workdir, step)
    params = {k: v for k, v in params.items()}
    fields = dict(saved["model"])
    fields.update(module.data_fields(params))  # dataset fields: the params know them
    hf.write_checkpoint(checkpoint, module.hf_config(fields, source.get("hf_config")),
                        module.params_to_hf(params, fields))
    logging.info("wrote %s from %s step %d", checkpoint, workdir, chosen)


def run(argv: list[str]) -> int:
    fv = define_flags()
    try:
        try:
            fv(argv)
        except flags.Error as e:
            raise errors.ConfigError(f"{errors.first_line(e)}\n{USAGE}") from e
        if (fv["from"].value is None) == (fv.to is None) or not fv.workdir \
                or not fv.checkpoint or (fv["from"].value and not fv.arch):
            raise errors.ConfigError(f"give --from=hf with --arch, --checkpoint and "
                                     f"--workdir, or --to=hf with --workdir and --checkpoint:"
                                     f"\n{USAGE}")
        if fv["from"].value:
            from_hf(fv.arch, fv.checkpoint, fv.workdir, fv.allow_pickle)
        else:
            to_hf(fv.workdir, fv.checkpoint, fv.step)
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and crashes
        code = errors.report(e)
        if code is None:
            raise  # a crash: the traceback is the report
        return code
    return errors.EXIT_OK


if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    sys.exit(run(sys.argv))
