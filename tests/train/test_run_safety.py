"""Runs a user can trust: a damaged checkpoint is detected and the run falls back to an
intact one (bit-equal to an uninterrupted run), a failed or refused start leaves the
workdir byte-identical, one process per workdir, extending and restarting runs, and one
`flaxlab: error:` line with a documented exit code for every user error."""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import gpt
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import errors, families, trainer
from train import main as main_lib
from train import workdir as workdir_lib
from train.data import text as text_data
from train.tasks import lm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location("damage", os.path.join(HERE, "toys", "damage.py"))
damage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(damage)

# 12 steps, an evaluation and a checkpoint every 4 (the tiny GPT: seconds).
FLAGS = ("--config.train.num_steps=12", "--config.train.eval_every=4",
         "--config.train.log_every=4", "--config.checkpoint.every=4",
         "--config.checkpoint.keep=3", "--config.evals.sample.every=-1")


def tiny(num_steps: int = 12):
    c = gpt.get_config("tiny")
    c.train.update(num_steps=num_steps, eval_every=4, log_every=4)
    c.checkpoint.update(every=4, keep=3)
    c.evals.sample.every = -1
    return c


def argv(workdir, *flags, variant="tiny"):
    return ["train.main", f"--config={REPO}/configs/gpt.py:{variant}", f"--workdir={workdir}",
            *FLAGS, *flags]


def run_cli(capsys, args) -> tuple[int, list[str]]:
    """(exit code, the stderr lines starting 'flaxlab: error:'); no traceback allowed."""
    code = main_lib.run(list(map(str, args)))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("flaxlab: error:")]


def snapshot(path) -> dict:
    """{relative path: bytes} of every file under `path` ({} when it does not exist)."""
    return {os.path.relpath(os.path.join(root, f), path): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(path) for f in files}


def final_params(workdir):
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1) as ckpt:
        return ckpt.latest_step(), ckpt.restore_raw()["params"]


def assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    trainer.train_and_evaluate(tiny(), str(workdir))
    return final_params(workdir)


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory):
    """A workdir stopped (as by preemption) after step 8: checkpoints 4 and 8."""
    workdir = tmp_path_factory.mktemp("stopped")
    assert trainer.train_and_evaluate(tiny(), str(workdir), stop_after_steps=8)["step"] == 8
    return workdir


def copy_of(src, dst):
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
    return dst


# ----------------------------------------------------------------------------------------
# Integrity.
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage_step_8", [damage.flip_a_bit, damage.truncate],
                         ids=["flipped_bit", "truncated"])
def test_damaged_newest_step_falls_back_to_an_intact_one(tmp_path, stopped_at_8,
                                                         uninterrupted, damage_step_8):
    workdir = copy_of(stopped_at_8, tmp_path)
    damage_step_8(workdir / "checkpoints" / "8")
    summary = trainer.train_and_evaluate(tiny(), str(workdir))  # resumes from step 4
    assert summary["train/steps"] == 12 and np.isfinite(summary["test/loss"])
    step, params = final_params(workdir)
    assert step == uninterrupted[0] == 12
    assert_bit_equal(params, uninterrupted[1])
    assert (workdir / "corrupt_checkpoints" / "8" / "state").is_dir()  # kept, not deleted
    assert 8 in ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=4).all_steps()


def test_restore_step_picks_one_and_a_missing_one_is_named(tmp_path, capsys, stopped_at_8):
    workdir = copy_of(stopped_at_8, tmp_path)
    before = snapshot(workdir)
    code, lines = run_cli(capsys, argv(workdir, "--config.checkpoint.restore_step=6"))
    assert code == errors.EXIT_CHECKPOINT and len(lines) == 1
    assert "restore_step=6" in lines[0] and "[4, 8]" in lines[0]
    assert snapshot(workdir) == before
    # A half-deleted step (a kill during orbax's cleanup) is not a checkpoint.
    os.remove(workdir / "checkpoints" / "8" / "_CHECKPOINT_METADATA")
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=4).all_steps() == [4]


# ----------------------------------------------------------------------------------------
# A failed or refused start changes nothing on disk.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_flag, words", [
    ("--config.data.stdlib_text.validation_fraction=0.5", "must sum to 1"),
    ("--config.data.stdlib_text.seq_len=64", "model.max_length 32"),
    ("--config.seed=-1", "seed=-1"),
])
def test_failed_starts_leave_the_workdir_byte_identical(tmp_path, capsys, stopped_at_8,
                                                        bad_flag, words):
    fresh = tmp_path / "fresh"
    code, lines = run_cli(capsys, argv(fresh, bad_flag))
    assert code in (errors.EXIT_CONFIG, errors.EXIT_WORKDIR) and len(lines) == 1
    assert not fresh.exists() and words in lines[0]  # not even the directory
    used = copy_of(stopped_at_8, tmp_path / "used")
    before = snapshot(used)
    code, lines = run_cli(capsys, argv(used, bad_flag))  # the resume check may come first
    assert code in (errors.EXIT_CONFIG, errors.EXIT_WORKDIR) and len(lines) == 1
    assert snapshot(used) == before


def test_corrected_command_then_runs(tmp_path, capsys):
    code, _ = run_cli(capsys, argv(tmp_path, "--config.data.stdlib_text.seq_len=64"))
    assert code == errors.EXIT_CONFIG and not tmp_path.exists() or not os.listdir(tmp_path)
    code, lines = run_cli(capsys, argv(tmp_path, "--config.train.num_steps=4"))
    assert code == 0 and not lines
    assert json.load(open(tmp_path / "summary.json"))["train/steps"] == 4
    assert not (tmp_path / workdir_lib.LOCK).exists()


# ----------------------------------------------------------------------------------------
# One process per workdir.
# ----------------------------------------------------------------------------------------
HOLD = ("import sys, time; from train.workdir import Workdir; w = Workdir(sys.argv[1]); "
        "w.__enter__(); w.committed = True; print('held', flush=True); time.sleep(120)")


def test_a_held_workdir_is_refused_naming_the_holder_until_it_dies(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        code, lines = run_cli(capsys, argv(tmp_path, "--config.train.num_steps=4"))
        assert time.monotonic() - start < 10
        assert code == errors.EXIT_WORKDIR and len(lines) == 1
        assert f"pid {holder.pid} on " in lines[0] and "in use by another run" in lines[0]
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert (tmp_path / workdir_lib.LOCK).exists()
    code, lines = run_cli(capsys, argv(tmp_path, "--config.train.num_steps=4"))
    assert code == 0 and not lines  # the stale lock was taken over
    assert not (tmp_path / workdir_lib.LOCK).exists()


# ----------------------------------------------------------------------------------------
# Extending and restarting.
# ----------------------------------------------------------------------------------------
def test_extending_a_finished_run_and_restarting_with_a_new_learning_rate(tmp_path, capsys):
    c = tiny(num_steps=8)
    trainer.train_and_evaluate(c, str(tmp_path))
    c.train.num_steps = 12  # run length: may change
    assert trainer.train_and_evaluate(c, str(tmp_path))["train/steps"] == 12
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12]
    # An identity key: refused with one line, the workdir untouched ...
    before = snapshot(tmp_path)
    flags = ("--config.train.num_steps=16", "--config.optim.learning_rate=0.001")
    code, lines = run_cli(capsys, argv(tmp_path, *flags))
    assert code == errors.EXIT_WORKDIR and len(lines) == 1
    assert "optim.learning_rate 0.003 -> 0.001" in lines[0] and "--restart_from_step" in lines[0]
    assert snapshot(tmp_path) == before
    # ... and accepted as a new lineage from an explicit step.
    code, lines = run_cli(capsys, argv(tmp_path, *flags, "--restart_from_step=8"))
    assert code == 0 and not lines
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["optim"]["learning_rate"] == 0.001 and saved["train"]["num_steps"] == 16
    (entry,) = saved["lineage"]
    assert entry["restarted_from_step"] == 8
    assert entry["changed"] == {"optim.learning_rate": [0.003, 0.001]}
    assert entry["previous_config"]["optim"]["learning_rate"] == 0.003
    superseded = tmp_path / entry["superseded"]
    assert sorted(os.listdir(superseded / "checkpoints")) == ["12"]
    assert json.load(open(superseded / "summary.json"))["train/steps"] == 12
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert max(steps) == 16 and 12 in steps  # the new lineage's steps 9..16
    old = [json.loads(line)["step"] for line in open(superseded / "metrics.jsonl")]
    assert old and min(old) > 8
    assert final_params(tmp_path)[0] == 16
    # The restarted run resumes as itself.
    code, lines = run_cli(capsys, argv(tmp_path, *flags))
    assert code == 0 and not lines


# ----------------------------------------------------------------------------------------
# Every user error: one line, its exit code.
# ----------------------------------------------------------------------------------------
def _poison_validation_perplexity(monkeypatch):
    monkeypatch.setattr(lm.LanguageModelTask, "derived_metrics",
                        lambda self, m: {"perplexity": float("nan")})


def _full_disk(monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", no_space)


def _read_only(monkeypatch):
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith(os.sep + workdir_lib.LOCK):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(workdir_lib.os, "open", refuse)


@pytest.mark.parametrize("flags, setup, code, words", [
    (["--config.optim.learing_rate=1"], None, errors.EXIT_CONFIG,
     "did you mean 'optim.learning_rate'?"),
    (["--config.optim.learning_rate=-1"], None, errors.EXIT_CONFIG, "optim.learning_rate"),
    (["--config.train.num_steps=abc"], None, errors.EXIT_CONFIG, "num_steps=abc"),
    (["--config.checkpoint.best_metric=validation/losss"], None, errors.EXIT_CONFIG,
     "did you mean 'validation/loss'?"),
    (["--config.train.early_stopping.patience=2",
      "--config.train.early_stopping.metric=validation/acuracy"], None, errors.EXIT_CONFIG,
     "did you mean 'validation/accuracy'?"),
    (["--config.data.source=stdlib_txt"], None, errors.EXIT_CONFIG, "stdlib_txt"),
    (["VARIANT=huge"], None, errors.EXIT_CONFIG, "unknown gpt variant 'huge'; allowed"),
    (["CONFIG=configs/gtp.py"], None, errors.EXIT_CONFIG, "configs/gpt.py?"),
    (["WORKDIR=file"], None, errors.EXIT_WORKDIR, "is a file, not a directory"),
    (["WORKDIR="], None, errors.EXIT_WORKDIR, "--workdir is empty"),
    ([], _read_only, errors.EXIT_WORKDIR, "cannot write to workdir"),
    ([], _full_disk, errors.EXIT_DISK_FULL, "no space left on device"),
    ([], _poison_validation_perplexity, errors.EXIT_NONFINITE,
     "validation/perplexity=nan at step 4"),
    (["--config.optim.learning_rate=1e30", "--config.optim.name=sgd"], None,
     errors.EXIT_NONFINITE, "NaN/Inf at step"),
], ids=lambda v: v if isinstance(v, int) else None)
def test_every_user_error_is_one_line_with_its_exit_code(tmp_path, capsys, monkeypatch, flags,
                                                        setup, code, words):
    args, workdir, variant = [], tmp_path / "run", "tiny"
    for flag in flags:
        if flag.startswith("VARIANT="):
            variant = flag.split("=", 1)[1]
        elif flag.startswith("WORKDIR="):
            name = flag.split("=", 1)[1]
            workdir = tmp_path / name if name else ""
            if name:
                workdir.write_text("not a directory")
        elif flag.startswith("CONFIG="):
            args.append(f"--config={REPO}/{flag.split('=', 1)[1]}:tiny")
        else:
            args.append(flag)
    if setup is not None:
        setup(monkeypatch)
    full = argv(workdir, *args, variant=variant)
    if any(a.startswith("--config=") for a in args):
        full = [a for a in full if not a.startswith("--config=") or a in args]
    got, lines = run_cli(capsys, full)
    assert (got, len(lines)) == (code, 1), lines
    assert words in lines[0]


def test_unknown_tfds_name_is_one_line(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    code, lines = run_cli(capsys, argv(tmp_path, "--config.data.source=tfds",
                                       "--config.data.tfds.tfds_name=lm1bb"))
    assert code == errors.EXIT_CONFIG and len(lines) == 1
    assert "tfds_name='lm1bb'" in lines[0] and "did you mean lm1b" in lines[0]


def test_checkpoint_of_another_model_and_no_intact_step(tmp_path, capsys, stopped_at_8):
    workdir = copy_of(stopped_at_8, tmp_path / "a")
    code, lines = run_cli(capsys, argv(workdir, "--config.model.d_model=48",
                                       "--restart_from_step=8"))
    assert code == errors.EXIT_CHECKPOINT and len(lines) == 1
    assert "does not fit the model" in lines[0]
    workdir = copy_of(stopped_at_8, tmp_path / "b")
    for step in ("4", "8"):
        damage.truncate(workdir / "checkpoints" / step)
    before = snapshot(workdir)
    code, lines = run_cli(capsys, argv(workdir))
    assert code == errors.EXIT_CHECKPOINT and len(lines) == 1
    assert "no intact checkpoint" in lines[0]
    assert snapshot(workdir) == before


def test_traceback_on_request_and_preemption_exit_code(tmp_path, capsys, monkeypatch):
    code = main_lib.run(argv(tmp_path, "--config.optim.learing_rate=1", "--traceback"))
    err = capsys.readouterr().err
    assert code == errors.EXIT_CONFIG and "Traceback" in err and "flaxlab: error:" in err
    original = text_data.LMDataset.batch

    def batch_with_preemption(self, step, rows=None):  # SIGTERM arrives while training
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, rows)
    monkeypatch.setattr(text_data.LMDataset, "batch", batch_with_preemption)
    code, lines = run_cli(capsys, argv(tmp_path / "p"))
    assert code == errors.EXIT_PREEMPTED and not lines
    assert final_params(tmp_path / "p")[0] == 3


def test_tuple_fields_are_overridden_from_the_command_line(tmp_path):
    fv = main_lib.parse(["train.main", f"--config={REPO}/configs/resnet.py:tiny",
                         f"--workdir={tmp_path}", "--config.model.widths=(8, 16, 24)",
                         "--config.optim.weight_decay_exclude=('bias$', 'scale$')",
                         "--config.optim.layer_lr=(('stage_0', 0.1),)"])
    c = fv.config
    assert c.model.widths == (8, 16, 24)
    assert c.optim.weight_decay_exclude == ("bias$", "scale$")
    assert c.optim.layer_lr == (("stage_0", 0.1),)
    config_lib.validate(c)
    assert families.resolve(c.model).widths == (8, 16, 24)  # the model sees them
    with pytest.raises(errors.ConfigError, match="model.widths"):
        main_lib.parse(["train.main", f"--config={REPO}/configs/resnet.py:tiny",
                        f"--workdir={tmp_path}", "--config.model.widths=(8,"])


def test_a_run_written_before_new_keys_existed_resumes(tmp_path, capsys, stopped_at_8):
    """config.json of an older flaxlab: without a key added since (at its default) and with
    one removed since; the run resumes, a non-default new key is still a change."""
    workdir = copy_of(stopped_at_8, tmp_path)
    saved = json.load(open(workdir / "config.json"))
    del saved["init_from"]  # a section added later
    saved["compress"]["init_from"] = ""  # a key removed later
    (workdir / "config.json").write_text(json.dumps(saved))
    code, lines = run_cli(capsys, argv(workdir, "--config.init_from.step=latest",
                                       "--config.init_from.workdir=" + str(stopped_at_8)))
    assert code == errors.EXIT_WORKDIR and "init_from.workdir" in lines[0]
    code, lines = run_cli(capsys, argv(workdir))
    assert code == 0 and not lines
    assert "init_from" in json.load(open(workdir / "config.json"))  # the record is current
