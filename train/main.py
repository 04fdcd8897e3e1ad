r"""Entry point of every run:

    python -m train.main --config=configs/<family>.py[:variant] --workdir=DIR \
        [--config.section.key=value ...] [--restart_from_step=STEP] [--traceback]

Several processes (one per host, or per GPU) make one run when the launcher says so
(Slurm's srun, mpirun, a multi-host TPU slice: detected from the environment) or when the
same command is given --coordinator_address=HOST:PORT --num_processes=N --process_id=I
in each (train/distributed.py; README: multi-host runs). --distributed=off runs alone.

Running the same command on the same workdir resumes from its newest intact checkpoint
(with a larger --config.train.num_steps it extends a finished run). A user error (config
file, variant, key, type, value, dataset, workdir, checkpoint, NaN, disk full) is one line
on stderr, `flaxlab: error: ...`, and an exit code of its kind (train/errors.py):
0 finished, 1 crash (a bug: traceback), 2 config, 3 workdir, 4 checkpoint, 5 non-finite,
6 disk full, 75 preempted (checkpointed: rerun to resume). --traceback prints the
traceback of user errors too.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from train import errors
from train.metrics_log import quiet_library_logs

USAGE = ("python -m train.main --config=configs/<family>.py[:variant] --workdir=DIR "
         "[--config.section.key=value ...]")


def define_flags(argv: list[str]) -> flags.FlagValues:
    """This command's flags, on their own FlagValues (so `run` can be called repeatedly,
    as the tests do); config overrides are read from `argv`."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file, optionally with a variant: "
        "configs/gpt.py:tiny", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.",
                        flag_values=fv)
    flags.DEFINE_string("restart_from_step", None,
                        "Continue the workdir's run from this checkpoint step ('latest' = "
                        "the newest intact one) with changed identity keys (e.g. a lower "
                        "learning rate): a new lineage, recorded in config.json.",
                        flag_values=fv)
    flags.DEFINE_boolean("traceback", False, "Print the traceback of user errors too.",
                         flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "Join a multi-process run: auto = when the three flags below are "
                      "given or the environment is a multi-process launch (Slurm, Open MPI, "
                      "a multi-host TPU slice); on = always; off = never.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator "
                        "(jax.distributed).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Processes of the run.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.",
                         flag_values=fv)
    return fv


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


# ----------------------------------------------------------------------------------------
# Command-line problems, named.
# ----------------------------------------------------------------------------------------
def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """get_config(variant) of `path[:variant]`; ConfigError naming what is wrong."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        here = os.path.dirname(path) or "."
        known = sorted(f for f in os.listdir(here) if f.endswith(".py")) \
            if os.path.isdir(here) else []
        close = difflib.get_close_matches(os.path.basename(path), known, n=1)
        hint = (f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close
                else f"; config files there: {', '.join(known)}" if known else "")
        raise errors.ConfigError(f"--config={spec}: no such config file{hint}")
    try:
        module_spec = importlib.util.spec_from_file_location("_flaxlab_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:  # configs raise ValueError for an unknown variant
        raise errors.ConfigError(f"--config={spec}: {errors.first_line(e)}") from e
    except Exception as e:
        raise errors.ConfigError(f"--config={spec} fails to load: {type(e).__name__}: "
                                 f"{errors.first_line(e)}") from e


def unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """'unknown config key ...; did you mean ...' for the first --config.a.b naming a key
    the config lacks, else None."""
    for arg in argv:
        if not arg.startswith(("--config.", "--noconfig.")):
            continue
        dotted = arg.split("=", 1)[0].split(".", 1)[1]
        node, parts = config, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i])
                keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) \
                    else []
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"did you mean {'.'.join(parts[:i] + close[:1])!r}? " if close else ""
                return (f"unknown config key {dotted!r} (in {arg}); {hint}allowed in "
                        f"{where or 'the config'}: {', '.join(keys)}")
            node = node[part]
    return None


def check_config_arguments(argv: list[str], usage: str = USAGE) -> None:
    """ConfigError naming a missing --config / --workdir, a missing config file, an
    unknown variant or an unknown --config.* key (absl would print a traceback)."""
    spec = _flag_value(argv, "config")
    if not spec or _flag_value(argv, "workdir") is None:
        raise errors.ConfigError(f"--config and --workdir are required: {usage}")
    problem = unknown_override(load_config_file(spec), argv)
    if problem:
        raise errors.ConfigError(problem)


def parse(argv: list[str]) -> flags.FlagValues:
    """The parsed flags of `argv`; ConfigError (one line) for any problem with them."""
    check_config_arguments(argv)
    fv = define_flags(argv)
    try:
        rest = fv(argv)
    except Exception as e:  # absl / ml_collections: a bad value or an unknown flag
        raise errors.ConfigError(errors.first_line(e)) from e
    if len(rest) > 1:
        raise errors.ConfigError(f"unexpected arguments {rest[1:]}: {USAGE}")
    return fv


# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------
def run(argv: list[str]) -> int:
    """Parse `argv`, train, print the results; the exit code (train/errors.py)."""
    show_traceback = "--traceback" in argv
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(__doc__ + "\n" + define_flags(argv).main_module_help())
        return errors.EXIT_OK
    try:
        fv = parse(argv)
        from train import distributed  # noqa: PLC0415 -- keeps --help and config errors fast

        # Before anything touches a device: the devices of every process form the mesh.
        distributed.initialize(fv.distributed, fv.coordinator_address, fv.num_processes,
                               fv.process_id)
        from train import trainer  # noqa: PLC0415

        summary = trainer.train_and_evaluate(fv.config, fv.workdir,
                                             restart_from_step=fv.restart_from_step)
    except KeyboardInterrupt:
        print("flaxlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and crashes
        code = errors.report(e, show_traceback)
        if code is None:
            raise  # a crash: the traceback is the report
        return code
    status = summary.get("status", "finished")
    logging.info("done: %s", status)
    print(format_summary(summary), flush=True)
    return errors.EXIT_PREEMPTED if status == "preempted" else errors.EXIT_OK


def main() -> None:
    # absl's own flags (--verbosity, ...) first; the rest are this command's.
    argv = flags.FLAGS(sys.argv, known_only=True)
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    quiet_library_logs(tracebacks="--traceback" in argv)
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
