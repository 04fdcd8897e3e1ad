"""train.search: the space parser, samplers seeded and resumed, median pruning (the rule
checked with NumPy, and the trainer's on_evaluation stop in a real tiny GPT run), the
results files, and the command line. Searches train a fake trainer (a closed-form loss of
the sampled learning rate), so the tests time the search, not training."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from configs import gpt  # noqa: E402
from train import search, sweep, trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SPACE = "optim.learning_rate=loguniform(1e-3,1e-2);optim.schedule.warmup_steps=int(0,10)"
# The figures and importances, which the `fake` fixture turns off.
FIGURES = {(sweep, "plot_results"): sweep.plot_results,
           (search, "plot_history"): search.plot_history,
           (search, "importances"): search.importances}


def _loss(config) -> float:
    """The fake run's final validation loss: best at learning rate 10**-2.5."""
    return 10 * (math.log10(config.optim.learning_rate) + 2.5) ** 2 + 0.01 * config.seed


class FakeTrainer:
    """trainer.train_and_evaluate's contract without training: validation passes at steps
    5 and 10 (loss + 1/step) reported to on_evaluation, metrics.jsonl, summary.json.
    `preempt_call`: that call (1-based) returns the preempted status instead."""

    def __init__(self, preempt_call: int | None = None):
        self.calls, self.preempt_call = [], preempt_call

    def __call__(self, config, workdir, on_evaluation=None):
        self.calls.append(os.path.basename(workdir))
        if len(self.calls) == self.preempt_call:
            return {"status": "preempted", "step": 5}
        os.makedirs(workdir, exist_ok=True)
        loss = _loss(config)
        with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            for step in (5, 10):
                f.write(json.dumps({"step": step, "split": "validation",
                                    "loss": loss + 1 / step}) + "\n")
                if on_evaluation and on_evaluation(step, {"validation/loss": loss + 1 / step}):
                    return {"status": "pruned", "step": step}
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"validation/loss": loss, "train/steps": 10}, f)
        return {"validation/loss": loss}


@pytest.fixture
def fake(monkeypatch):
    """A FakeTrainer in place of the trainer; figures and importances off (seconds each)."""
    fake = FakeTrainer()
    monkeypatch.setattr(trainer, "train_and_evaluate", fake)
    for module, name in FIGURES:
        monkeypatch.setattr(module, name, lambda *a, **k: {})
    return fake


def _study(workdir):
    return optuna.load_study(study_name=search.STUDY_NAME,
                             storage=f"sqlite:///{os.path.join(workdir, 'study.db')}")


def _proposals(records):
    return [(r["trial"], r["overrides"]["optim.learning_rate"],
             r["overrides"]["optim.schedule.warmup_steps"]) for r in records]






# ---- The space ---------------------------------------------------------------------------
def test_space_text_and_dict_forms_parse_to_typed_dimensions(base):
    dims = search.parse_space(SPACE + ";model.num_layers=categorical(1,2);"
                              "optim.weight_decay_exclude=categorical(('bias',),('bias$','scale'))",
                              base)
    assert [(d.key, d.kind, d.low, d.high) for d in dims[:2]] == [
        ("optim.learning_rate", "loguniform", 1e-3, 1e-2),
        ("optim.schedule.warmup_steps", "int", 0, 10)]
    assert type(dims[1].low) is int and dims[2].choices == (1, 2)
    assert dims[3].choices == (("bias",), ("bias$", "scale"))
    # Tuples go to Optuna as their repr and come back as the tuples.
    dist = dims[3].distribution(optuna)
    assert dims[3].value(dist.choices[1]) == ("bias$", "scale")
    assert dims[0].distribution(optuna).log and not search.parse_space(
        "optim.learning_rate=uniform(0.1,0.2)", base)[0].distribution(optuna).log
    as_dict = {"optim.learning_rate": ("loguniform", 1e-3, 1e-2),
               "optim.schedule.warmup_steps": "int(0,10)"}
    assert search.parse_space(as_dict, base) == dims[:2]
    assert [d.text() for d in search.parse_space(gpt.get_search_space("tiny"), base)] == [
        "optim.learning_rate=loguniform(0.001,0.01)", "optim.schedule.warmup_steps=int(0,10)"]
    default = gpt.get_config()
    assert len(search.parse_space(gpt.get_search_space(), default)) == 3


@pytest.mark.parametrize("spec, words", [
    ("optim.lr=loguniform(1e-4,1e-2)", ["'optim.lr'", "learning_rate"]),
    ("optim.learning_rate=normal(0,1)", ["'normal'", "loguniform, uniform, int, categorical"]),
    ("optim.learning_rate=loguniform(0,1e-2)", ["0 < low"]),
    ("optim.learning_rate=uniform(1e-2,1e-3)", ["low < high"]),
    ("optim.learning_rate=uniform(-1,1)", ["optim.learning_rate must be > 0"]),
    ("model.num_layers=uniform(1,3)", ["model.num_layers holds an integer", "int(low,high)"]),
    ("optim.learning_rate=int(1,3)", ["holds a number", "loguniform(low,high)"]),
    ("optim.name=loguniform(1,2)", ["holds a string", "categorical"]),
    ("optim.learning_rate=loguniform(1e-4)", ["(low,high)", "1 arguments"]),
    ("model.num_layers=int(1,2.5)", ["'2.5'", "integer"]),
    ("optim.learning_rate", ["key=kind(arguments)"]),
    ("optim.name=categorical(adam,adam)", ["twice"]),
    ("optim.name=categorical()", ["at least one value"]),
    ("seed=int(0,3);seed=int(0,4)", ["'seed' is given twice"]),
    ("", ["empty"]),
])
def test_bad_spaces_name_the_key_and_what_is_allowed(base, spec, words):
    with pytest.raises(ValueError) as e:
        search.parse_space(spec, base)
    for word in words:
        assert word in str(e.value)


# ---- Samplers ----------------------------------------------------------------------------
def test_a_random_search_with_a_fixed_seed_proposes_the_same_trials(base, tmp_path, fake):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[name] = _proposals(search.run_search(base, SPACE, str(tmp_path / name), trials=4,
                                                  sampler="random", search_seed=seed))
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    rates = np.array([lr for _, lr, _ in runs["a"]])
    assert np.all((rates >= 1e-3) & (rates <= 1e-2)) and len(set(rates)) == 4
    assert all(type(w) is int and 0 <= w <= 10 for _, _, w in runs["a"])
    # Each trial is an ordinary run in DIR/<run_name>, trained once, with its summary's loss.
    assert len(fake.calls) == 12 and sorted(fake.calls[:4]) == sorted(
        d for d in os.listdir(tmp_path / "a") if os.path.isdir(tmp_path / "a" / d))
    study = _study(str(tmp_path / "a"))
    for trial, record in zip(study.trials, search.run_search(
            base, SPACE, str(tmp_path / "a"), trials=4, sampler="random", search_seed=3)):
        config = sweep.apply_overrides(base, record["overrides"])
        assert trial.value == record["metrics"]["validation/loss"] == _loss(config)
    assert len(fake.calls) == 12  # the rerun read every trial back


def test_an_interrupted_tpe_study_resumes_without_repeating_finished_trials(
        base, tmp_path, fake, monkeypatch, sweep_files):
    # TPE fits its model after startup_trials(7) = 3 random trials: 4 proposals use it.
    whole = search.run_search(base, SPACE, str(tmp_path / "whole"), trials=7, sampler="tpe")
    assert search.startup_trials(7) == 3

    broken = FakeTrainer(preempt_call=4)  # SIGTERM in the 4th trial, the first TPE one
    monkeypatch.setattr(trainer, "train_and_evaluate", broken)
    workdir = str(tmp_path / "resumed")
    first = search.run_search(base, SPACE, workdir, trials=7, sampler="tpe")
    assert [r["status"] for r in first] == ["finished"] * 3 + ["preempted"]
    assert [t.state.name for t in _study(workdir).trials] == ["COMPLETE"] * 3 + ["RUNNING"]

    again = FakeTrainer()
    monkeypatch.setattr(trainer, "train_and_evaluate", again)
    records = search.run_search(base, SPACE, workdir, trials=7, sampler="tpe")
    # The finished trials were read back; the interrupted one ran again (its own run dir,
    # so a real run resumes its checkpoint), then the rest: 3 + 4 trainings in all.
    assert again.calls[0] == broken.calls[3] and len(again.calls) == 4
    assert not set(again.calls) & set(broken.calls[:3])
    states = [(t.state.name, t.user_attrs.get("retry_of")) for t in _study(workdir).trials]
    assert states == [("COMPLETE", None)] * 3 + [("FAIL", None), ("COMPLETE", 3)] + [
        ("COMPLETE", None)] * 3
    # The same proposals as the uninterrupted study, each trial seeded by its index.
    strip = [(lr, w) for _, lr, w in _proposals(whole)]
    assert [(lr, w) for _, lr, w in _proposals(records)] == strip
    assert [r["status"] for r in records] == ["finished"] * 7

    # Finished: a rerun trains nothing and writes the same tables.
    outputs = {n: open(os.path.join(workdir, n), "rb").read() for n in ("results.csv",
                                                                       "results.md")}
    monkeypatch.setattr(trainer, "train_and_evaluate", sweep_files.must_not_train)
    assert search.run_search(base, SPACE, workdir, trials=7, sampler="tpe") == records
    for name, content in outputs.items():
        assert open(os.path.join(workdir, name), "rb").read() == content
    # Its identity is the space, the metric and the seeds.
    with pytest.raises(ValueError, match="another space"):
        search.run_search(base, "optim.learning_rate=loguniform(1e-3,1e-1)", workdir,
                          trials=7)


def test_gp_search_proposes_inside_the_space(base, tmp_path, fake):
    pytest.importorskip("torch")
    records = search.run_search(base, SPACE, str(tmp_path), trials=4, sampler="gp")
    assert len(records) == 4 and all(r["status"] == "finished" for r in records)
    assert all(1e-3 <= lr <= 1e-2 and 0 <= w <= 10 for _, lr, w in _proposals(records))


# ---- Pruning -----------------------------------------------------------------------------
def test_pruned_trials_are_recorded_as_pruned_by_the_median_rule(base, tmp_path, fake,
                                                                  monkeypatch, sweep_files):
    workdir = str(tmp_path)
    records = search.run_search(base, SPACE, workdir, trials=12, sampler="random",
                                prune="median", search_seed=1)
    study = _study(workdir)
    states = [t.state.name for t in study.trials]
    assert states[:5] == ["COMPLETE"] * 5 and "PRUNED" in states and states.count(
        "COMPLETE") > 5
    # The median stopping rule (Golovin et al. 2017) checked with NumPy: a trial is pruned
    # at the first step where its best value so far is above the median of the trials
    # completed before it at that step; a completed one never was.
    for i, trial in enumerate(study.trials):
        done = [t for t in study.trials[:i] if t.state.name == "COMPLETE"]
        above = [step for step in sorted(trial.intermediate_values) if len(done) >= 5 and
                 min(v for s, v in trial.intermediate_values.items() if s <= step)
                 > np.median([t.intermediate_values[step] for t in done])]
        if trial.state.name == "PRUNED":
            assert above and max(trial.intermediate_values) == above[0]
            assert trial.user_attrs["pruned_at_step"] == above[0]
        else:
            assert not above
    # Recorded as pruned in results.csv, results.md and sweep.json, never trained again.
    pruned = {r["name"]: study.trials[r["trial"]] for r in records if r["status"] == "pruned"}
    assert len(pruned) == states.count("PRUNED")
    rows = {row["run"]: row
            for row in sweep_files.read_csv(os.path.join(workdir, "results.csv"))}
    assert {n for n, row in rows.items() if row["status"] == "pruned"} == set(pruned)
    for name, trial in pruned.items():  # the step it stopped at, no final metrics
        assert rows[name]["train/steps"] == str(trial.user_attrs["pruned_at_step"])
        assert rows[name]["validation/loss"] == ""
    table = sweep_files.md_tables(os.path.join(workdir, "results.md"))[0]
    assert [row["status"] for row in table[-len(pruned):]] == ["pruned"] * len(pruned)
    with open(os.path.join(workdir, "sweep.json")) as f:
        recorded = json.load(f)
    assert {r["name"] for r in recorded["runs"] if r["status"] == "pruned"} == set(pruned)
    assert recorded["search"]["prune"] == "median"
    for name in pruned:
        assert not os.path.exists(os.path.join(workdir, name, "summary.json"))
    monkeypatch.setattr(trainer, "train_and_evaluate", sweep_files.must_not_train)
    again = search.run_search(base, SPACE, workdir, trials=12, sampler="random",
                              prune="median", search_seed=1)
    assert [r["status"] for r in again] == [r["status"] for r in records]


def test_pruning_stops_a_real_run_with_a_checkpoint(base, tmp_path):
    """The trainer's on_evaluation hook: the tiny GPT stops after its first validation pass
    (step 2 of 4), checkpointed (resumable, as after a preemption), status "pruned"."""
    config = sweep.apply_overrides(base, {
        "train.num_steps": 4, "train.eval_every": 2, "train.log_every": 2,
        "checkpoint.every": 4, "train.eval_max_batches": 1, "evals.sample.every": -1,
        "model.num_layers": 1})
    seen = []

    def on_evaluation(step, metrics):
        seen.append((step, sorted(metrics)))
        return True
    summary = trainer.train_and_evaluate(config, str(tmp_path), on_evaluation=on_evaluation)
    assert summary == {"status": "pruned", "step": 2}
    assert seen[0][0] == 2 and "validation/loss" in seen[0][1] and len(seen) == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert not os.path.exists(tmp_path / "summary.json")
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert max(m["step"] for m in lines) == 2
    assert [m["split"] for m in lines if m["step"] == 2] == ["train", "validation"]


# ---- Results -----------------------------------------------------------------------------
def test_results_show_the_best_trial_importances_and_history(base, tmp_path, fake,
                                                            monkeypatch, sweep_files):
    workdir = str(tmp_path)
    search.run_search(base, SPACE, workdir, trials=8, sampler="random")
    for (module, name), function in FIGURES.items():  # drawn once, by the read-back
        monkeypatch.setattr(module, name, function)
    records = search.run_search(base, SPACE, workdir, trials=8, sampler="random")
    values = [r["metrics"]["validation/loss"] for r in records]
    best = records[int(np.argmin(values))]
    text = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
    assert (f"Best: trial {best['trial']}, validation/loss {min(values):.5g}: "
            f"optim.learning_rate={best['overrides']['optim.learning_rate']!r}") in text
    assert "8 of 8 trials: 8 finished, 0 pruned, 0 failed" in text
    # fANOVA importances sum to 1; the loss depends on the learning rate only.
    importance = {row["parameter"]: row["importance"] for row in sweep_files.md_tables(
        os.path.join(workdir, "results.md"))[1]}
    assert sum(map(float, importance.values())) == pytest.approx(1, abs=2e-3)
    assert float(importance["optim.learning_rate"]) > 0.8
    for name in ("results.png", "history.png", "importances.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = sweep_files.md_tables(os.path.join(workdir, "results.md"))[0]
    assert [float(row["validation/loss"]) for row in table] == [
        float(f"{v:.4g}") for v in sorted(values)]


def test_failed_trials_count_and_are_not_retried(base, tmp_path, fake, monkeypatch, sweep_files):
    def flaky(config, workdir, **kwargs):
        if config.optim.learning_rate > 5e-3:
            raise RuntimeError("diverged")
        return fake(config, workdir, **kwargs)
    monkeypatch.setattr(trainer, "train_and_evaluate", flaky)
    records = search.run_search(base, SPACE, str(tmp_path), trials=6, sampler="random")
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and len(records) == 6
    assert all(r["error"] == "RuntimeError: diverged" for r in failed)
    assert [t.state.name == "FAIL" for t in _study(str(tmp_path)).trials] == [
        r["status"] == "failed" for r in records]
    monkeypatch.setattr(trainer, "train_and_evaluate", sweep_files.must_not_train)
    assert search.run_search(base, SPACE, str(tmp_path), trials=6, sampler="random") == records


# ---- Command line ------------------------------------------------------------------------
class _Flags:
    """The flag values check_flags reads, `given` as if on the command line."""

    def __init__(self, **given):
        self.values = {"search": "grid", "trials": None, "space": None, "search_seed": 0,
                       "prune": "none", "seeds": 1, "sweep": None, **given}
        self.given = given

    def __getattr__(self, name):
        return self.values[name]

    def __getitem__(self, name):
        return type("Flag", (), {"present": int(name in self.given)})()


@pytest.mark.parametrize("given, words", [
    ({"search": "bayes"}, ["--search='bayes'", "grid, random, tpe, gp"]),
    ({"search": "tpe", "prune": "hyperband", "trials": 4}, ["--prune", "none, median"]),
    ({"trials": 4}, ["--trials belong to a search", "--search=random|tpe|gp"]),
    ({"prune": "median"}, ["--prune belong to a search"]),
    ({"search": "tpe"}, ["needs --trials=N"]),
    ({"search": "tpe", "trials": 4, "sweep": "seed=1,2"}, ["--sweep is a grid"]),
    ({"seeds": 0}, ["--seeds=0"]),
])
def test_flags_that_do_not_belong_together(given, words):
    with pytest.raises(ValueError) as e:
        search.check_flags(_Flags(**given))
    for word in words:
        assert word in str(e.value)
    assert search.check_flags(_Flags(search="random", trials=2)) is True
    assert search.check_flags(_Flags(seeds=3)) is False


def test_run_search_checks_its_arguments(base, tmp_path):
    for kwargs, words in (({"trials": 0}, "--trials=0"), ({"sampler": "grid"}, "--search"),
                          ({"prune": "median", "sort_metric": "test/loss"}, "validation/"),
                          ({"seeds": 2, "space": "seed=int(0,3)"}, "--seeds=2 sets seed")):
        args = {"trials": 2, "space": SPACE, **kwargs}
        with pytest.raises(ValueError, match=words):
            search.run_search(base, args.pop("space"), str(tmp_path / "x"), **args)
    assert not os.path.exists(tmp_path / "x")


def test_command_line_search(base, tmp_path, fake):
    """python -m train.sweep --search: flags, the printed table, the exit status. The only
    trial's run directory holds another config, so the trainer refuses it at once."""
    proposed = search.run_search(base, SPACE, str(tmp_path / "dry"), trials=1,
                                 sampler="random", search_seed=7)[0]["name"]
    workdir = tmp_path / "cli"
    os.makedirs(workdir / proposed)
    (workdir / proposed / "config.json").write_text('{"seed": 7}')
    command = [sys.executable, "-m", "train.sweep", "--config=configs/gpt.py:tiny",
               f"--workdir={workdir}", "--search=random", "--trials=1", "--search_seed=7",
               f"--space={SPACE}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "## Search: random (--search_seed=7, --prune=none), 1 of 1 trials: 0 finished, " \
           "0 pruned, 1 failed" in result.stdout and "failed: WorkdirError" in result.stdout
    assert f"1 of 1 runs did not finish: {proposed}" in result.stderr
    assert _study(str(workdir)).trials[0].state.name == "FAIL"


def test_a_bad_space_is_one_error_line(base, tmp_path, capsys):
    fl = _Flags(search="tpe", trials=2, space="optim.lr=int(1,2)", sort="validation/loss",
                sort_mode="auto", config=base, workdir=str(tmp_path))
    with pytest.raises(SystemExit) as e:
        search.main(fl)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flaxlab: error: unknown sweep key 'optim.lr'") and len(
        err.strip().splitlines()) == 1
