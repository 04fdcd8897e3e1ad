"""Entry point of every run:

    python -m train.main --config=configs/<family>.py[:variant] --workdir=DIR \
        [--config.section.key=value ...]

Running the same command on the same workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import config as config_lib
from train.metrics_log import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with a variant: configs/gpt.py:tiny",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def format_summary(summary: dict) -> str:
    """The run's results as an aligned two-column table (strings such as samples last)."""
    numbers = {k: v for k, v in summary.items() if not isinstance(v, str)}
    width = max(map(len, numbers), default=10)
    lines = [f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
             for k, v in sorted(numbers.items())]
    for key, text in summary.items():
        if isinstance(text, str):
            lines += ["", f"{key}:", text]
    return "\n".join(lines)


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        config_lib.validate(config)  # before anything compiles
    except ValueError as e:
        sys.exit(f"flaxlab: invalid config: {e}")
    from train import trainer  # noqa: PLC0415 -- keeps --help and config errors fast

    summary = trainer.train_and_evaluate(config, _WORKDIR.value)
    logging.info("done: %s", summary.get("status", "finished"))
    print(format_summary(summary))


if __name__ == "__main__":
    app.run(main)
