"""train/distributed.py in one process: launcher detection, argument checks, and the
single-process no-ops (the multi-process behaviour: tests/train/test_multihost.py)."""
import pytest

from train import distributed, errors


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),     # one task: a plain run
    ({"SLURM_NTASKS": "16"}, None),                         # sbatch's shell, not srun
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),                 # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "jax"),
])
def test_detect_launcher(env, expected):
    assert distributed.detect_launcher(env) == expected


def test_single_process_runs_initialize_nothing_and_agree_at_once(monkeypatch):
    for name in ("SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize("auto") is False
    assert distributed.initialize("off", "127.0.0.1:1", 2, 0) is False
    assert distributed.is_primary() and not distributed.is_multi_process()
    distributed.agree(0, "a phase")
    distributed.agree(3, "a phase")   # alone, nobody else to tell
    distributed.barrier("nothing to wait for")


@pytest.mark.parametrize("args,message", [
    (("sometimes",), "--distributed='sometimes'; allowed: auto, on, off"),
    (("auto", "127.0.0.1:1", None, 0), "go together"),
    (("auto", "127.0.0.1:1", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
])
def test_bad_arguments_are_one_config_error(args, message):
    with pytest.raises(errors.ConfigError, match=message):
        distributed.initialize(*args)


def test_exit_codes_reported_for_what_a_process_leaves_with():
    assert distributed.exit_code_of(errors.WorkdirError("held")) == errors.EXIT_WORKDIR
    assert distributed.exit_code_of(RuntimeError("a bug")) == errors.EXIT_CRASH
