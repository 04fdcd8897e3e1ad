"""One process of a multi-process test run: `train.main` on CPU, with a record of what it did.

    python tests/train/multihost/worker.py RECORD_DIR DEVICES [SLOW_S] -- <train.main argv>

RECORD_DIR/process_<i>.json gets, when the process ends, the rows of every batch it asked
its datasets for ("train": [[batch_size, step, start, stop, rows gathered], ...], "eval":
[[batch_size, start, stop, rows gathered], ...]) and every file it opened for writing
under the run's workdir ("writes"), caught with an audit hook (PEP 578) so nothing in
flaxlab needs to cooperate. DEVICES: virtual CPU devices of
this process. SLOW_S: seconds each training batch waits (so a test can signal a process
in the middle of a run); RECORD_DIR/process_<i>.steps gets each training step it
gathers as it goes. The process exits with train.main's exit code.
"""
import json
import os
import sys
import time

record_dir, devices = sys.argv[1], int(sys.argv[2])
slow = float(sys.argv[3]) if sys.argv[3] != "--" else 0.0
argv = ["train.main"] + sys.argv[sys.argv.index("--") + 1:]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                           "--xla_backend_optimization_level=0")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

# tensorboardX imports torch when it can (2-3 s a process); nothing here needs it.
sys.modules["torch"] = None

# No persistent compilation cache: jax misses it for multi-process CPU programs.
from absl import logging  # noqa: E402

from train import main  # noqa: E402
from train.data import base  # noqa: E402

logging.use_absl_handler()  # INFO lines with times: shown when a test fails
logging.set_verbosity(logging.INFO)

workdir = os.path.abspath(next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")))
process = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--process_id=")))
record = {"train": [], "eval": [], "writes": []}
progress = os.path.join(record_dir, f"process_{process}.steps")


def audit(event, args):
    if event == "open" and isinstance(args[0], str):
        mode, flags = args[1] or "", args[2] or 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        path = os.path.abspath(args[0])
        if writing and path.startswith(workdir + os.sep):
            record["writes"].append(os.path.relpath(path, workdir))


sys.addaudithook(audit)
batch, eval_batches = base.RandomAccessDataset.batch, base.RandomAccessDataset.eval_batches


def recorded_batch(self, step, rows=None):
    out = batch(self, step, rows)
    rows = rows or slice(0, self.batch_size)
    record["train"].append([self.batch_size, step, rows.start, rows.stop,
                            len(next(iter(out.values())))])
    with open(progress, "a") as f:  # the test watches it to signal mid-run
        f.write(f"{step}\n")
    time.sleep(slow)
    return out


def recorded_eval_batches(self, batch_size, rows=None):
    for b in eval_batches(self, batch_size, rows):
        rows = rows or slice(0, batch_size)
        record["eval"].append([batch_size, rows.start, rows.stop, len(b["weights"])])
        yield b


base.RandomAccessDataset.batch = recorded_batch
base.RandomAccessDataset.eval_batches = recorded_eval_batches
try:
    code = main.run(argv)
finally:
    with open(os.path.join(record_dir, f"process_{process}.json"), "w") as f:
        json.dump(record, f)
sys.exit(code)
