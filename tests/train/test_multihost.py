"""Multi-process runs on one machine: 2 processes x 4 virtual CPU devices on 127.0.0.1, their
collectives over Gloo, launched and stopped by the test (tests/train/multihost/worker.py).

One uninterrupted 2-process run, and one that gets SIGTERM in process 1 only and is rerun,
are compared with in-process runs of the same config on 8 devices and on 1 device:
  - the same loss curve and final parameters (float tolerance: a different reduction
    order), and the resumed 2-process run equal to the uninterrupted one to the bit;
  - each process gathered only its rows of every training and evaluation batch;
  - both processes saved the same step and exited with the preemption status;
  - the 2-process checkpoint restores in 1 process on 8 devices and on 1 device, and the
    run continues to the same parameters;
  - only process 0 wrote the workdir's files (process 1: only its checkpoint shards);
  - a start refused in process 0 (a workdir held by another run) stops both processes
    with the workdir error and leaves the workdir as it was.
"""
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import errors
from train import main as train_main

WORKER = os.path.join(os.path.dirname(__file__), "multihost", "worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, BATCH, EVAL_BATCH = 10, 8, 32
ARGS = [f"--config={REPO}/configs/gpt.py:tiny", f"--config.train.num_steps={STEPS}",
        f"--config.data.batch_size={BATCH}", f"--config.data.eval_batch_size={EVAL_BATCH}",
        "--config.train.log_every=2", "--config.train.eval_every=100",
        "--config.checkpoint.every=100", "--config.data.stdlib_text.max_bytes=40000"]
NO_SAMPLE = "--config.evals.sample.every=-1"  # one run writes sample.txt, the others skip it
LAUNCH_TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Gloo over loopback")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, record_dir, *extra, slow_s: float = 0.0, stop_process_1_at: int = -1,
            allowed=(0, errors.EXIT_PREEMPTED)):
    """Runs the 2 processes to their end; SIGTERM to process 1 once it gathered batch
    `stop_process_1_at`. Returns their exit codes and outputs."""
    os.makedirs(record_dir, exist_ok=True)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, WORKER, str(record_dir), "4", str(slow_s), "--", *ARGS, *extra,
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        if stop_process_1_at >= 0:
            progress = os.path.join(record_dir, "process_1.steps")
            while time.monotonic() < deadline and procs[1].poll() is None:
                if os.path.exists(progress) and str(stop_process_1_at) in open(
                        progress).read().split():
                    procs[1].terminate()  # SIGTERM, as a scheduler's preemption
                    break
                time.sleep(0.05)
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                   for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert all(c in allowed for c in codes), "\n".join(o[-3000:] for o in outputs)
    return codes, outputs


def _record(record_dir, process):
    with open(os.path.join(record_dir, f"process_{process}.json")) as f:
        return json.load(f)


def _params(workdir, step):
    state = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1).restore_raw(step)
    return state["params"]


def _train_losses(workdir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if r["split"] == "train"]


def _run_here(workdir, *extra):
    assert train_main.run(["train.main", *ARGS, f"--workdir={workdir}", *extra]) == 0


def _close(a, b, atol=1e-4):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol), a, b)


def _runs(root):
    """Workdirs: whole (2 processes), preempted at step ~4 then rerun (2 processes), the
    preempted checkpoint resumed here on 8 and on 1 device, a reference on 1 device."""
    d = {name: str(root / name) for name in ("whole", "preempted", "on8", "on1", "ref1")}
    d["whole_codes"] = _launch(d["whole"], root / "rec_whole")[0]
    d["stop_codes"] = _launch(d["preempted"], root / "rec_stop", NO_SAMPLE, slow_s=0.3,
                              stop_process_1_at=3)[0]
    d["stop_steps"] = sorted(int(s) for s in os.listdir(os.path.join(d["preempted"],
                                                                     "checkpoints")))
    for name in ("on8", "on1"):
        shutil.copytree(d["preempted"], d[name])
    d["stop_records"] = [_record(root / "rec_stop", i) for i in range(2)]
    d["resume_codes"] = _launch(d["preempted"], root / "rec_resume", NO_SAMPLE)[0]
    d["records"] = [_record(root / "rec_whole", i) for i in range(2)]
    _run_here(d["on8"], NO_SAMPLE)
    _run_here(d["on1"], NO_SAMPLE, "--config.sharding.num_devices=1")
    _run_here(d["ref1"], NO_SAMPLE, "--config.sharding.num_devices=1")
    return d


def _two_processes_match_one_process_on_8_and_on_1_device(runs):
    """1 device: the whole run; 8 devices: the steps after the preemption (on8)."""
    assert runs["whole_codes"] == [0, 0]
    whole, saved = _params(runs["whole"], STEPS), runs["stop_steps"][0]
    np.testing.assert_allclose(_train_losses(runs["whole"]), _train_losses(runs["ref1"]),
                               rtol=1e-5)
    _close(whole, _params(runs["ref1"], STEPS))
    np.testing.assert_allclose(_train_losses(runs["on8"])[saved // 2:],
                               _train_losses(runs["whole"])[saved // 2:], rtol=1e-5)
    summary, ref = (json.load(open(os.path.join(runs[name], "summary.json")))
                    for name in ("whole", "ref1"))
    for key in ("validation/loss", "test/loss", "validation/accuracy"):
        assert summary[key] == pytest.approx(ref[key], rel=1e-5)


def _each_process_gathers_only_its_rows(runs):
    half, eval_half = BATCH // 2, EVAL_BATCH // 2
    for p, record in enumerate(runs["records"]):
        train = [r for r in record["train"] if r[0] == BATCH and r[3] - r[2] > 1]
        assert sorted(r[1] for r in train) == list(range(STEPS))
        assert {tuple(r[2:]) for r in train} == {(p * half, (p + 1) * half, half)}
        assert {tuple(r[1:]) for r in record["eval"] if r[0] == EVAL_BATCH} == {
            (p * eval_half, (p + 1) * eval_half, eval_half)}


def _sigterm_to_one_process_stops_both_at_one_step_and_resumes_to_the_bit(runs):
    assert runs["stop_codes"] == [errors.EXIT_PREEMPTED] * 2
    (saved,) = runs["stop_steps"]  # one agreed step, saved by both
    assert 3 < saved < STEPS
    last = [max(r[1] for r in rec["train"] if r[0] == BATCH) for rec in runs["stop_records"]]
    assert last == [saved - 1, saved - 1]  # both trained exactly up to it
    assert runs["resume_codes"] == [0, 0]
    jax.tree.map(np.testing.assert_array_equal, _params(runs["preempted"], STEPS),
                 _params(runs["whole"], STEPS))
    assert _train_losses(runs["preempted"]) == _train_losses(runs["whole"])


def _two_process_checkpoint_resumes_in_one_process_on_8_and_on_1_device(runs):
    saved = runs["stop_steps"][0]
    whole = _params(runs["whole"], STEPS)
    for name in ("on8", "on1"):
        # The restored step is the 2-process one, exactly; the continuation agrees.
        jax.tree.map(np.testing.assert_array_equal, _params(runs[name], saved),
                     _params(runs["preempted"], saved))
        _close(_params(runs[name], STEPS), whole)


def _only_process_0_writes_the_workdir_files(runs):
    writes = [set(record["writes"]) for record in runs["records"]]
    for name in ("config.json.tmp", "metrics.jsonl", "summary.json.tmp", "loss_curve.png",
                 "sample.txt", "lock"):
        assert name in writes[0]
    assert writes[1] and all(w.startswith("checkpoints" + os.sep) for w in writes[1])


def test_two_processes_of_four_devices(tmp_path):
    """One test, so that the launches run once (pytest-xdist would build a module-scoped
    fixture once per worker): each check below is a function of the runs."""
    runs = _runs(tmp_path)
    _two_processes_match_one_process_on_8_and_on_1_device(runs)
    _each_process_gathers_only_its_rows(runs)
    _sigterm_to_one_process_stops_both_at_one_step_and_resumes_to_the_bit(runs)
    _two_process_checkpoint_resumes_in_one_process_on_8_and_on_1_device(runs)
    _only_process_0_writes_the_workdir_files(runs)


def test_a_start_refused_in_process_0_stops_both_and_writes_nothing(tmp_path):
    workdir = tmp_path / "held"
    workdir.mkdir()
    holder = '{"pid": 1, "host": "elsewhere", "started": "earlier"}'
    with open(workdir / "lock", "w") as held:  # another run holds the workdir
        held.write(holder)
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        codes, outputs = _launch(str(workdir), tmp_path / "rec", NO_SAMPLE,
                                 allowed=(errors.EXIT_WORKDIR,))
    assert codes == [errors.EXIT_WORKDIR] * 2
    assert "is in use by another run (pid 1 on elsewhere" in outputs[0]
    assert "opening the workdir failed in process 0 of 2" in outputs[1]
    assert sorted(os.listdir(workdir)) == ["lock"]
    assert (workdir / "lock").read_text() == holder  # the holder's record untouched
