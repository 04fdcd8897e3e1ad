"""A run's workdir: one process at a time, a resume policy, and nothing written before the
run commits.

    with Workdir(path) as wd:                      # the lock: WorkdirError naming the holder
        wd.check_resume(config_json, restart_from_step)  # refuses a different run
        ... validate, build data, model and state, restore a checkpoint ...
        wd.commit(config_json, set_aside=..., restart=...)  # config.json; from here on the
        ... train ...                                       # run writes

A start that fails or is refused before `commit` leaves the workdir as it found it: the
lock file (and any directory the run created for it) is removed again.

The lock is `<workdir>/lock`, held with flock(2) for the life of the process, holding
{pid, host, started, command} of its holder. The kernel releases a flock when its process
dies, however it dies, so the lock of a killed run is stale as soon as it is dead: the next
run takes it over (and logs whose it was). flock works on local disks and most network
file systems; where it does not (some NFS setups), every start gets the lock.

In a multi-process run (train/distributed.py) only process 0 (`primary`) locks, creates
and writes; every process reads the same config.json and checkpoints and makes the same
resume decision. The processes agree twice: after opening (process 0 got the lock) and at
the commit (every process built its run); a process that failed reports its exit code
there, the others stop with PeerFailedError, and the workdir stays as it was.

Resume policy (`check_resume`): a workdir holds one run, identified by every key except
those in RESUMABLE (run length, cadence, evaluation, layout). Those may change between
invocations and are logged; changing any other key is refused unless the invocation
restarts from a checkpoint on purpose (`restart_from_step`), which starts a new lineage:
the previous config and the changed keys are recorded under "lineage" in config.json, and
the checkpoints, metrics and summary after that step move to `superseded/<n>/`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from absl import logging

from train import distributed
from train.errors import ConfigError, WorkdirError
from train.metrics_log import write_json

LOCK = "lock"
CONFIG = "config.json"
# Keys (dotted prefixes) a resumed run may change: how long it runs, how often it logs,
# evaluates and checkpoints, what the evaluators do, and how the state is laid out over
# devices. None of them changes the trained weights of the steps already taken.
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every",
             "train.eval_max_batches", "train.early_stopping.", "checkpoint.", "evals.",
             "data.eval_batch_size", "sharding.")


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (JSON) configs, sorted."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(prefix + key)
    return diffs


_ABSENT = object()


def _flatten(config: dict, prefix: str = "") -> dict:
    """{dotted key: leaf value} of a nested (JSON) config; empty sections are leaves."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _value(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return "(absent)"
        config = config[part]
    return config


def _resumable(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE)


def _changes(saved: dict, current: dict, keys: list[str]) -> str:
    return ", ".join(f"{k} {_value(saved, k)!r} -> {_value(current, k)!r}" for k in keys)


class Workdir:
    """The workdir of one invocation: its lock, its resume check and its commit.

    primary: False in processes 1.. of a multi-process run: no lock, nothing written.
    """

    def __init__(self, path: str, primary: bool = True):
        if not path or not path.strip():
            raise WorkdirError("--workdir is empty; give the directory of the run (it is "
                               "created if missing)")
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise WorkdirError(f"--workdir={path} is a file, not a directory; give a "
                               "directory (it is created if missing)")
        self.committed = False
        self.primary = primary
        self._agreed = False   # the start's outcome was reported to the other processes
        self._created: list[str] = []     # directories this invocation made, deepest last
        self._fd: int | None = None
        self._previous_lock: bytes | None = None
        self.saved_config: dict | None = None   # config.json of the run found here

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # -- lock ------------------------------------------------------------------------------
    def __enter__(self) -> Workdir:
        try:
            if self.primary:
                self._make_dirs()
                self._lock()
        except BaseException as e:
            self._undo()
            distributed.agree(distributed.exit_code_of(e), "opening the workdir")
            raise
        distributed.agree(0, "opening the workdir")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            if not self._agreed:  # a failed start: the other processes learn of it
                self._agreed = True
                distributed.agree(distributed.exit_code_of(exc) if exc is not None
                                  else 0, "starting the run")
            self._undo()
        else:
            self._unlock(remove=True)

    def _make_dirs(self) -> None:
        missing, d = [], self.path
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except OSError as e:
                raise WorkdirError(f"cannot create workdir {self.path}: {e.strerror} "
                                   f"({d})") from e
            self._created.append(d)

    def _lock(self) -> None:
        path = self.file(LOCK)
        for _ in range(10):  # a holder may unlink the file between our open and flock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WorkdirError(f"cannot write to workdir {self.path} ({e.strerror}); "
                                   "give a writable directory") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirError(f"cannot lock {path}: {e.strerror}") from e
                raise WorkdirError(f"{self.path} is in use by another run ({_holder(holder)});"
                                   " wait for it to finish or stop it, or use another "
                                   "--workdir") from None
            if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
            os.close(fd)
        else:
            raise WorkdirError(f"cannot lock {path}: it keeps being replaced")
        self._fd = fd
        previous = _read(fd)
        self._previous_lock = previous or None
        if previous:
            logging.warning("took over the stale lock of %s (that process is gone)",
                            _holder(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv)[:500]}
        _write(fd, json.dumps(info).encode())

    def _unlock(self, remove: bool) -> None:
        if self._fd is None:
            return
        if remove:  # unlink while still holding it, so no one locks the dying file
            try:
                os.unlink(self.file(LOCK))
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

    def _undo(self) -> None:
        """Leave the workdir as it was found: the lock file and made directories go."""
        if self._fd is not None and self._previous_lock is not None:
            _write(self._fd, self._previous_lock)  # a stale lock stays what it was
            os.close(self._fd)
            self._fd = None
        self._unlock(remove=True)
        for d in reversed(self._created):
            try:
                os.rmdir(d)
            except OSError:
                break
        self._created = []

    # -- resume policy -----------------------------------------------------------------------
    def check_resume(self, current: dict, restart_from_step: int | str | None,
                     defaults: dict | None = None) -> list[str]:
        """The identity keys changed on purpose ([] for a fresh or same-identity run).

        `defaults` (the JSON of the config's base_config) tells keys added to flaxlab since
        the run was written: at their default they are no change. Keys flaxlab no longer
        has are logged and ignored.

        Raises WorkdirError when the workdir holds a run of another identity and no
        restart was asked for, ConfigError for a restart without a run to restart.
        """
        path = self.file(CONFIG)
        if not os.path.exists(path):
            if restart_from_step is not None:
                raise ConfigError(f"--restart_from_step={restart_from_step}: {self.path} "
                                  "holds no run to restart (no config.json)")
            return []
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"{path} is unreadable ({e}); it is the record of the run "
                               "in this workdir: restore it or use another --workdir") from e
        self.saved_config = saved
        saved = {k: v for k, v in saved.items() if k != "lineage"}
        flat_saved, flat_current = _flatten(saved), _flatten(current)
        flat_defaults = _flatten(defaults or {})
        diffs = sorted(k for k in flat_saved.keys() | flat_current.keys()
                       if flat_saved.get(k, _ABSENT) != flat_current.get(k, _ABSENT))
        added = [k for k in diffs if k not in flat_saved and k in flat_defaults
                 and flat_current[k] == flat_defaults[k]]
        removed = [k for k in diffs if k not in flat_current]
        if added or removed:
            logging.warning("config keys new since this run was written (at their defaults):"
                            " %s; keys no longer in flaxlab: %s", ", ".join(added) or "none",
                            _changes(saved, current, removed) or "none")
        diffs = [k for k in diffs if k not in added and k not in removed]
        cadence = [k for k in diffs if _resumable(k)]
        identity = [k for k in diffs if not _resumable(k)]
        if identity and restart_from_step is None:
            raise WorkdirError(
                f"{self.path} holds a different run ({_changes(saved, current, identity)}); "
                "resuming would mix two runs. Use the same values, another --workdir, or "
                "--restart_from_step=STEP to continue from that checkpoint with the new "
                "values (a new lineage, recorded in config.json)")
        if cadence:
            logging.info("resuming with changed run length / cadence: %s",
                         _changes(saved, current, cadence))
        if "train.num_steps" in cadence:
            logging.warning("train.num_steps changed: the learning-rate schedule is rebuilt "
                            "for the new length (README: extending a run)")
        return identity

    # -- commit ------------------------------------------------------------------------------
    def commit(self, current: dict, *, resume_step: int = 0, corrupt_steps: list[int] = (),
               restart: dict | None = None) -> None:
        """The run starts writing: corrupt checkpoint steps move to corrupt_checkpoints/,
        a restart's later steps (restart["after_step"]) to superseded/<n>/, and
        config.json is written (with the lineage). A resumed run's metrics.jsonl loses the
        lines after resume_step (logged after its last checkpoint, they are logged again).

        Every process calls it (after every process built its run); only the primary
        writes, and the others wait until it has."""
        self._agreed = True
        distributed.agree(0, "starting the run")
        if not self.primary:
            distributed.barrier("workdir committed")
            self.committed = True
            return
        for step in corrupt_steps:
            target = self.file("corrupt_checkpoints", str(step))
            if os.path.exists(target):
                target += time.strftime(".%Y%m%d-%H%M%S")
            _move(self.file("checkpoints", str(step)), target)
            logging.warning("moved the corrupt checkpoint step %d to %s", step, target)
        lineage = list((self.saved_config or {}).get("lineage", []))
        if restart is not None:
            lineage.append(self._set_aside_after(restart["after_step"], len(lineage) + 1,
                                                 restart["changed"], current))
        if restart is None and resume_step:
            _split_metrics(self.file("metrics.jsonl"), resume_step, None)
        record = dict(current, lineage=lineage) if lineage else current
        write_json(self.file(CONFIG), record)  # atomic: never half a file
        self.committed = True
        distributed.barrier("workdir committed")

    def _set_aside_after(self, step: int, number: int, changed: list[str],
                         current: dict) -> dict:
        saved = {k: v for k, v in self.saved_config.items() if k != "lineage"}
        target = self.file("superseded", str(number))
        ckpts = self.file("checkpoints")
        later = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit() and int(s) > step) \
            if os.path.isdir(ckpts) else []
        for s in later:
            _move(os.path.join(ckpts, str(s)), os.path.join(target, "checkpoints", str(s)))
        if os.path.exists(self.file("summary.json")):
            _move(self.file("summary.json"), os.path.join(target, "summary.json"))
        _split_metrics(self.file("metrics.jsonl"), step, os.path.join(target, "metrics.jsonl"))
        logging.info("restart from step %d (lineage %d): %s; the previous run's later "
                     "checkpoints %s and metrics are in %s", step, number,
                     _changes(saved, current, changed), later, target)
        return {"restarted_from_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "changed": {k: [_value(saved, k), _value(current, k)] for k in changed},
                "superseded": os.path.relpath(target, self.path), "previous_config": saved}


def _split_metrics(path: str, step: int, later_path: str | None) -> None:
    """Lines of metrics.jsonl after `step` move to later_path (None: dropped); the rest
    stay."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep, later = [], []
    for line in lines:
        try:
            (later if json.loads(line)["step"] > step else keep).append(line)
        except (ValueError, KeyError, TypeError):
            keep.append(line)
    if not later:
        return
    if later_path is not None:
        os.makedirs(os.path.dirname(later_path), exist_ok=True)
        with open(later_path, "w", encoding="utf-8") as f:
            f.writelines(later)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _move(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _write(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _holder(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that has not written its name yet"
