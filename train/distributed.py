"""Multi-process runs: jax.distributed set-up, one writer, and agreement between processes.

A scheduler (Slurm's srun, mpirun, a TPU pod's or GKE's launcher, or a person with two
shells) starts the same `python -m train.main ...` on every host. Each process calls
`initialize` before anything touches a device; from then on `jax.devices()` lists the
devices of every process, one global mesh spans them, and jit runs one SPMD program in
every process (JAX's multi-controller model). flaxlab's side of it:

  initialize(...)        jax.distributed.initialize from flags (--coordinator_address,
                         --num_processes, --process_id) or, with none given, when the
                         environment is a multi-process launch (`detect_launcher`: Slurm,
                         Open MPI, a multi-host TPU slice, JAX_COORDINATOR_ADDRESS); a
                         single-process run calls nothing and is unchanged. CPU processes
                         exchange their collectives over Gloo (TCP).
  is_primary()           process 0: the one writer of config.json, metrics.jsonl,
                         TensorBoard, plots and summary.json. Every process writes its
                         own shards of a checkpoint (orbax; process 0 commits).
  agree(code, what)      every process says how a phase ended (0 = fine, else its exit
                         code); a process whose peer failed raises PeerFailedError, so no
                         process waits forever in a collective that a failed peer never
                         joins.
  log_with_process_index()  every log line starts with [process i/n].

Input per process, the global batch assembled from process-local rows, lives in
train/sharding.py (`process_rows`, `shard_batch`); the agreed preemption step in
train/preemption.py (`PreemptionGuard`).
"""
from __future__ import annotations

import logging as pylogging
import os

import jax
import numpy as np
from absl import logging

from train import errors

MODES = ("auto", "on", "off")


def detect_launcher(environ=None) -> str | None:
    """The multi-process launcher this process runs under, from its environment, or None.

    slurm: srun with more than one task (SLURM_NTASKS > 1, SLURM_PROCID set);
    openmpi: mpirun with more than one rank (OMPI_COMM_WORLD_SIZE > 1);
    tpu: a TPU slice of several hosts (TPU_WORKER_HOSTNAMES lists more than one, or a
    Multislice coordinator, MEGASCALE_COORDINATOR_ADDRESS); jax: JAX_COORDINATOR_ADDRESS
    set by hand (jax.distributed reads it). A single task of any of them is not a
    multi-process launch.
    """
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1
    if "SLURM_PROCID" in env and count("SLURM_NTASKS") > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 \
            or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "jax"
    return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               initialization_timeout: int = 300) -> bool:
    """Joins the processes of a multi-process run; True if jax.distributed was initialized.

    mode "auto": when the three explicit arguments are given, or `detect_launcher` names
    a launcher (jax.distributed then reads the rest from it); "on": always (the
    launcher's environment or the arguments must tell jax everything); "off": never.
    Call it before anything touches a device (jax.devices(), an array, a jit call).

    Raises:
      ConfigError: an unknown mode, explicit arguments given only in part or out of
        range, or a process that cannot reach the coordinator in time.
    """
    if mode not in MODES:
        raise errors.ConfigError(f"--distributed={mode!r}; allowed: {', '.join(MODES)}")
    explicit = [coordinator_address, num_processes, process_id]
    given = [x is not None for x in explicit]
    if any(given) and not all(given):
        raise errors.ConfigError(
            "--coordinator_address, --num_processes and --process_id go together (all "
            "three, or none to let the launcher's environment tell them)")
    if all(given) and not 0 <= process_id < num_processes:
        raise errors.ConfigError(f"--process_id={process_id} must be in [0, "
                                 f"--num_processes={num_processes})")
    launcher = detect_launcher()
    if mode == "off" or (mode == "auto" and not all(given) and launcher is None):
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU devices of different processes reduce over Gloo (no effect on GPU / TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id) if all(given) else {}
    try:
        jax.distributed.initialize(initialization_timeout=initialization_timeout, **kwargs)
    except (RuntimeError, ValueError) as e:
        where = coordinator_address or f"the {launcher or 'launcher'} environment"
        raise errors.ConfigError(f"jax.distributed.initialize failed ({where}): "
                                 f"{errors.first_line(e)}") from e
    log_with_process_index()
    logging.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 launcher or "flags")
    return True


def is_multi_process() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one process that writes the run's files (not its checkpoints)."""
    return jax.process_index() == 0


class PeerFailedError(errors.FlaxlabError):
    """Another process of the run failed; this one stops too (its log says nothing new)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def agree(code: int, what: str) -> None:
    """Every process reports how `what` ended (0: fine, else its exit code); raises
    PeerFailedError on the processes that were fine when another was not.

    Every process must call it once per phase, the failed ones included (a collective).
    Single process: returns at once.
    """
    if not is_multi_process():
        return
    from jax.experimental import multihost_utils  # noqa: PLC0415

    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    failed = [p for p, c in enumerate(codes) if c]
    if failed and not code:
        raise PeerFailedError(
            f"{what} failed in process {', '.join(map(str, failed))} of {len(codes)} (its "
            "log names why); this process stops too", int(codes[failed[0]]))


def exit_code_of(exc: BaseException) -> int:
    """The exit code a process reports to `agree` for the exception it is leaving with."""
    error = errors.user_error(exc)
    return error.exit_code if error is not None else errors.EXIT_CRASH


def barrier(name: str) -> None:
    """Waits until every process reached `name` (no-op in a single process)."""
    if is_multi_process():
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


class _ProcessPrefix(pylogging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: pylogging.LogRecord) -> bool:
        if not getattr(record, "_process_prefixed", False):
            record.msg = f"{self.prefix} {record.msg}"
            record._process_prefixed = True
        return True


def log_with_process_index() -> None:
    """Every absl log line of this process starts with [process i/n] (once)."""
    logger = logging.get_absl_logger()
    if not any(isinstance(f, _ProcessPrefix) for f in logger.filters):
        logger.addFilter(_ProcessPrefix(f"[process {jax.process_index()}/"
                                        f"{jax.process_count()}]"))
