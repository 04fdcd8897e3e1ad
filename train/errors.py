"""User errors: one line on stderr, a documented exit code, no traceback.

Everything a person can fix (a config key, a value, a workdir, a checkpoint, the disk) is a
subclass of `FlaxlabError` carrying its exit code; `train.main` prints it as

    flaxlab: error: <what is wrong and what is allowed>

and exits with that code. Anything else is a crash: a bug, printed with its traceback.
`--traceback` prints the traceback of user errors too.

Exit codes of `python -m train.main`:
"""
from __future__ import annotations

import errno
import sys
import traceback

EXIT_OK = 0
EXIT_CRASH = 1         # a bug: the traceback is printed
EXIT_CONFIG = 2        # config file, variant, key, type or value; dataset name
EXIT_WORKDIR = 3       # not a directory / not writable / held by another process /
                       # holds a different run
EXIT_CHECKPOINT = 4    # does not fit the model; corrupt with no intact step to fall back to
EXIT_NONFINITE = 5     # NaN/Inf loss, gradients or evaluation metric
EXIT_DISK_FULL = 6     # no space left on device
EXIT_PREEMPTED = 75    # SIGTERM/SIGINT: checkpointed; rerun the same command to resume
                       # (sysexits' EX_TEMPFAIL: a scheduler may requeue)

EXIT_CODES = {
    EXIT_OK: "finished (or stopped early)",
    EXIT_CRASH: "crash (a bug; traceback printed)",
    EXIT_CONFIG: "config error",
    EXIT_WORKDIR: "workdir error",
    EXIT_CHECKPOINT: "checkpoint error",
    EXIT_NONFINITE: "non-finite loss, gradients or evaluation metric",
    EXIT_DISK_FULL: "no space left on device",
    EXIT_PREEMPTED: "preempted: checkpointed, rerun to resume",
}
__doc__ += "\n" + "\n".join(f"  {code:<3} {what}" for code, what in EXIT_CODES.items()) + "\n"


class FlaxlabError(Exception):
    """An error the user can fix; `exit_code` is what train.main exits with."""

    exit_code = EXIT_CRASH


class ConfigError(FlaxlabError, ValueError):
    exit_code = EXIT_CONFIG


class WorkdirError(FlaxlabError):
    exit_code = EXIT_WORKDIR


class CheckpointError(FlaxlabError):
    exit_code = EXIT_CHECKPOINT


class NonFiniteError(FlaxlabError, FloatingPointError):
    exit_code = EXIT_NONFINITE


class DiskFullError(FlaxlabError, OSError):
    exit_code = EXIT_DISK_FULL


def _chain(exc: BaseException):
    """exc, its __cause__ / __context__, theirs, ... (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """An ENOSPC anywhere in the chain (orbax / tensorstore wrap it, sometimes as text)."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
               or "No space left on device" in str(e) for e in _chain(exc))


def user_error(exc: BaseException) -> FlaxlabError | None:
    """The FlaxlabError `exc` is or wraps (disk full included); None for a crash."""
    for e in _chain(exc):
        if isinstance(e, FlaxlabError):
            return e
    if is_disk_full(exc):
        return DiskFullError(f"no space left on device ({first_line(exc)}); free space and "
                             "rerun the same command: the run resumes from its last "
                             "committed checkpoint")
    return None


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def report(exc: BaseException, show_traceback: bool = False) -> int | None:
    """For a command's `except`: print a user error's one `flaxlab: error:` line (and its
    traceback when asked) and return its exit code; None for a crash (re-raise it)."""
    error = user_error(exc)
    if error is None:
        return None
    if show_traceback:
        traceback.print_exception(exc)
    print(f"flaxlab: error: {error}", file=sys.stderr, flush=True)
    return error.exit_code
