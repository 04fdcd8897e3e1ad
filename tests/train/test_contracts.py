"""The extension contracts: a toy task and a toy evaluator, each one file plus a registry
line (tests/train/toys/), train end to end; evaluator schedules; the TrainState."""
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt
from configs.common import add_eval
from train import config as config_lib
from train import evaluators, tasks, trainer
from train.state import TrainState

TOYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toys")


def _load(filename: str, cls: str):
    spec = importlib.util.spec_from_file_location(filename[:-3], os.path.join(TOYS, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, cls)


@pytest.fixture
def toys(monkeypatch):
    """The registry lines WORKSPACE.md asks for, undone after the test."""
    copy_task = _load("copy_task.py", "CopyTask")
    calls = _load("calls_evaluator.py", "CallsEvaluator")
    monkeypatch.setitem(tasks.TASKS, copy_task.name, copy_task)
    monkeypatch.setitem(evaluators.EVALUATORS, calls.name, calls)
    return copy_task, calls


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _toy_config(num_steps: int, every: int):
    c = gpt.get_config("tiny")
    c.task = config_lib.task_config("copy")
    c.evals = evaluators.evals_config(())
    add_eval(c, "calls", every=every)
    c.train.update(num_steps=num_steps, log_every=num_steps, eval_every=num_steps)
    c.checkpoint.every = num_steps
    return c


def test_toy_task_and_evaluator_train_end_to_end(toys, tmp_path):
    c = _toy_config(num_steps=20, every=10)
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    # Copying the visible token is learnable in a few steps; chance is 1/260.
    assert summary["validation/accuracy"] > 0.5
    # The evaluator ran at 10 and at the end (20, once), under its own name.
    assert [r["step"] for r in _records(tmp_path, "calls")] == [10, 20]
    assert [r["final"] for r in _records(tmp_path, "calls")] == [0.0, 1.0]
    assert summary["calls/step"] == 20 and summary["calls/final"] == 1.0
    # Its evaluation is the trainer's: the same loop, params and loss as validation/loss.
    assert summary["calls/loss"] == pytest.approx(summary["validation/loss"], rel=1e-6)
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["calls/step"] == 20


def test_evaluator_schedules(toys, tmp_path, monkeypatch):
    """One 10-step run, four copies of the toy evaluator on four schedules."""
    _, calls = toys
    schedules = {"every3": (3, [3, 6, 9, 10]),   # N, 2N, ... and the end
                 "every5": (5, [5, 10]),         # the end coincides with 2N: once
                 "at_end": (0, [10]),            # 0: at the end only
                 "off": (-1, [])}                # -1: off
    c = _toy_config(num_steps=10, every=-1)
    del c.evals["calls"]
    for name, (every, _) in schedules.items():
        monkeypatch.setitem(evaluators.EVALUATORS, name, type(name, (calls,), {"name": name}))
        add_eval(c, name, every=every)
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    for name, (_, steps) in schedules.items():
        assert [r["step"] for r in _records(tmp_path, name)] == steps, name
        assert (f"{name}/step" in summary) == bool(steps), name


def test_unknown_evaluator_and_bad_schedule_are_refused(toys):
    c = _toy_config(4, 1)
    c.evals.calls.every = -2
    with pytest.raises(ValueError, match=r"evals.calls.every=-2 must be >= -1"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="evals.nope is not an evaluator; allowed: sample"):
        add_eval(c, "nope")
    with pytest.raises(ValueError, match="evals.calls has no option 'splt'"):
        add_eval(c, "calls", splt="test")


def test_train_state_records_the_first_nonfinite_step():
    s = TrainState.create({"w": jnp.ones(2)}, opt_state=(), model_state=None)
    assert int(s.step) == 0 and int(s.nonfinite_step) == -1 and s.model_state == {}
    s = s.advance(jnp.array(True), params={"w": jnp.zeros(2)})
    assert int(s.step) == 1 and int(s.nonfinite_step) == -1
    np.testing.assert_array_equal(s.params["w"], [0.0, 0.0])
    s = s.advance(jnp.array(False)).advance(jnp.array(False))
    assert int(s.step) == 3 and int(s.nonfinite_step) == 1   # the first bad step is kept
    assert set(s.to_dict()) == {"step", "params", "opt_state", "model_state",
                                "nonfinite_step"}
    assert TrainState.from_dict(s.to_dict()) == s
