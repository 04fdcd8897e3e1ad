"""train.sweep: parsing and typing a sweep, run names, and a real sweep of the tiny GPT
(results tables equal to each run's summary.json, skip on rerun, failed runs, exit status)."""
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest

from configs import gpt
from train import sweep, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = "optim.name=adam,sgd;optim.learning_rate=1e-3,3e-3;model.num_layers=1,2"


# ---- Parsing ---------------------------------------------------------------------------
def test_grid_is_the_product_of_the_axes_first_axis_slowest(base):
    runs = sweep.parse_sweep(GRID, base)
    assert len(runs) == 8
    assert runs[0] == {"optim.name": "adam", "optim.learning_rate": 0.001,
                       "model.num_layers": 1}
    assert [(r["optim.name"], r["optim.learning_rate"], r["model.num_layers"])
            for r in runs[:4]] == [("adam", 1e-3, 1), ("adam", 1e-3, 2),
                                   ("adam", 3e-3, 1), ("adam", 3e-3, 2)]
    assert runs[-1] == {"optim.name": "sgd", "optim.learning_rate": 0.003,
                        "model.num_layers": 2}
    assert list(runs[0]) == ["optim.name", "optim.learning_rate", "model.num_layers"]
    # The get_sweep form of the same grid gives the same runs.
    axes = [("optim.name", ["adam", "sgd"]), ("optim.learning_rate", [1e-3, 3e-3]),
            ("model.num_layers", [1, 2])]
    assert sweep.parse_sweep(axes, base) == runs


def test_values_take_the_type_of_the_config_field(base):
    runs = sweep.parse_sweep("train.num_steps=7,1e2;optim.learning_rate=1e-3,2;"
                             "optim.nesterov=true,False;optim.name=sgd;"
                             "model.num_kv_heads=1,none", base)
    assert len(runs) == 16
    steps = {r["train.num_steps"] for r in runs}
    assert steps == {7, 100} and all(type(s) is int for s in steps)
    rates = {r["optim.learning_rate"] for r in runs}
    assert rates == {0.001, 2.0} and all(type(x) is float for x in rates)
    assert [r["optim.nesterov"] for r in runs[:4]] == [True, True, False, False]
    assert {r["optim.name"] for r in runs} == {"sgd"}
    assert {r["model.num_kv_heads"] for r in runs} == {1, None}  # a typed placeholder
    config = sweep.apply_overrides(base, runs[-1])
    assert config.train.num_steps == 100 and config.optim.learning_rate == 2.0
    assert config.optim.nesterov is False and base.optim.nesterov is False
    assert base.train.num_steps == 20  # the base config is not touched


def test_tuple_axes_from_the_command_line(base):
    runs = sweep.parse_sweep("optim.weight_decay_exclude=('bias',),('bias$', 'scale');"
                             "optim.learning_rate=1e-3", base)
    assert [r["optim.weight_decay_exclude"] for r in runs] == [("bias",), ("bias$", "scale")]
    config = sweep.apply_overrides(base, runs[1])
    assert config.optim.weight_decay_exclude == ("bias$", "scale")
    assert sweep.parse_sweep([("optim.freeze", [["head"], []])], base)[0] == {
        "optim.freeze": ("head",)}  # get_sweep() lists become tuples
    assert len({sweep.run_name(r) for r in runs}) == 2


@pytest.mark.parametrize("spec, words", [
    ("optim.lr=1e-3", ["'optim.lr'", "learning_rate", "momentum"]),
    ("optimizer.name=sgd", ["'optimizer.name'", "optim", "train"]),
    ("optim.learning_rate=fast", ["'fast'", "optim.learning_rate", "number"]),
    ("model.num_layers=2,1.5", ["'1.5'", "model.num_layers", "integer"]),
    ("optim.nesterov=maybe", ["optim.nesterov", "bool"]),
    ("optim=sgd", ["'optim' is a section", "learning_rate"]),
    ("optim.weight_decay_exclude=bias", ["'bias'", "optim.weight_decay_exclude", "tuple"]),
    ("optim.name", ["key=value1,value2"]),
    ("model.num_layers=1;model.num_layers=2", ["'model.num_layers' is set by two axes"]),
    (";", ["empty"]),
    ([], ["empty"]),
])
def test_bad_sweeps_name_the_key_and_what_is_allowed(base, spec, words):
    with pytest.raises(ValueError) as e:
        sweep.parse_sweep(spec, base)
    for word in words:
        assert word in str(e.value)


def test_an_empty_sweep_text_is_the_base_config_alone(base):
    """--sweep="": one run, "base" (with --seeds=K, the K seeds of the base config)."""
    assert sweep.parse_sweep("", base) == sweep.parse_sweep("  ", base) == [{}]
    assert [name for name, _, _ in sweep.plan_runs(base, [{}])] == ["base"]


def test_python_values_are_checked_too(base):
    with pytest.raises(ValueError, match="model.num_layers.*integer"):
        sweep.parse_sweep([("model.num_layers", [1, 2.5])], base)
    with pytest.raises(ValueError, match="optim.nesterov.*bool"):
        sweep.parse_sweep([{"optim.nesterov": 1}], base)


def test_run_dicts_and_linked_axis_values(base):
    runs = sweep.parse_sweep([{"optim.name": "sgd", "optim.learning_rate": 1},
                              {"model.num_layers": 3}], base)
    assert runs == [{"optim.name": "sgd", "optim.learning_rate": 1.0},
                    {"model.num_layers": 3}]
    linked = [("optimizer", [{"optim.name": "sgd", "optim.momentum": 0.9},
                             {"optim.name": "adamw"}]), ("model.num_layers", [1, 2])]
    runs = sweep.parse_sweep(linked, base)
    assert runs == [{"optim.name": "sgd", "optim.momentum": 0.9, "model.num_layers": 1},
                    {"optim.name": "sgd", "optim.momentum": 0.9, "model.num_layers": 2},
                    {"optim.name": "adamw", "model.num_layers": 1},
                    {"optim.name": "adamw", "model.num_layers": 2}]
    # The config file's sweeps: every run of the default sweep is a valid config.
    default = gpt.get_config()
    plan = sweep.plan_runs(default, sweep.parse_sweep(gpt.get_sweep(), default))
    assert len(plan) == 8 and len(sweep.parse_sweep(gpt.get_sweep("tiny"), base)) == 2


def test_invalid_run_configs_stop_the_sweep_before_any_run(base, tmp_path, monkeypatch,
                                                          sweep_files):
    monkeypatch.setattr(trainer, "train_and_evaluate", sweep_files.must_not_train)
    runs = sweep.parse_sweep("optim.learning_rate=1e-3,-1", base)
    with pytest.raises(ValueError, match="run optim.learning_rate=-1.0: optim.learning_rate"):
        sweep.run_sweep(base, runs, str(tmp_path / "sweep"))
    assert not os.path.exists(tmp_path / "sweep")
    with pytest.raises(ValueError, match="twice"):
        sweep.plan_runs(base, [{"seed": 1}, {"seed": 1}])


def test_run_names_are_readable_filesystem_safe_and_unique(tmp_path):
    assert sweep.run_name({"optim.name": "adam", "optim.learning_rate": 1e-3}) == (
        "optim.name=adam,optim.learning_rate=0.001")
    # Distinct values of one (typed) key, and distinct sets of keys. (True and "True"
    # never meet: parse_sweep gives every value of a key the type of its config field.)
    overrides = [{"a": v} for v in ("x/y", "x_y", "x y", "../..", "", ",=", "x" * 300,
                                    "x" * 301, "1,b=2", "é")]
    overrides += [{"a": v} for v in (1e-3, 1e-5, 0.1, 1.0, -2.0)]
    overrides += [{"a": 1, "b": 2}, {"b": 2, "a": 1}, {"a": None}, {"a": True}, {}]
    names = [sweep.run_name(o) for o in overrides]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._+=,~-]+", name) and len(name) <= 200
        os.mkdir(tmp_path / name)  # a single, new path component
    assert sorted(os.listdir(tmp_path)) == sorted(names)


# ---- A real sweep ----------------------------------------------------------------------


def _md_rows(path):
    """The markdown table as dicts (header cells as keys), in table order."""
    lines = [line for line in open(path, encoding="utf-8") if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_sweep_of_the_tiny_gpt_end_to_end(base, tmp_path, monkeypatch, sweep_files):
    fast = sweep.apply_overrides(base, {"train.num_steps": 4, "train.log_every": 2,
                                        "train.eval_every": 2, "checkpoint.every": 4})
    runs = sweep.parse_sweep(gpt.get_sweep("tiny"), fast)
    workdir = str(tmp_path)
    records = sweep.run_sweep(fast, runs, workdir, spec=gpt.get_sweep("tiny"))
    assert [r["status"] for r in records] == ["finished", "finished"]

    # results.csv: one row per run, override values, status, every numeric summary key.
    rows = sweep_files.read_csv(os.path.join(workdir, "results.csv"))
    assert [row["run"] for row in rows] == ["model.num_layers=1", "model.num_layers=2"]
    for row, layers in zip(rows, (1, 2)):
        with open(os.path.join(workdir, row["run"], "summary.json")) as f:
            summary = json.load(f)
        numeric = {k: v for k, v in summary.items() if not isinstance(v, (bool, str))}
        assert list(row)[:3] == ["run", "model.num_layers", "status"]
        assert set(row) == {"run", "model.num_layers", "status", "error", *numeric}
        assert (row["model.num_layers"], row["status"], row["error"]) == (
            str(layers), "finished", "")
        for key, value in numeric.items():  # exactly, not rounded
            assert float(row[key]) == value or math.isnan(value) and row[key] == "nan"
    assert "validation/loss" in rows[0] and "params/count" in rows[0]

    # results.md: key metrics only, best validation loss first; results.png; sweep.json.
    table = _md_rows(os.path.join(workdir, "results.md"))
    losses = {r["settings"]["model.num_layers"]: r["metrics"]["validation/loss"]
              for r in records}
    assert [row["model.num_layers"] for row in table] == [
        str(k) for k in sorted(losses, key=losses.get)]
    assert list(table[0])[:3] == ["#", "model.num_layers", "validation/loss"]
    assert "test/perplexity" in table[0] and "train/objective" not in table[0]
    with open(os.path.join(workdir, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, "sweep.json")) as f:
        recorded = json.load(f)
    assert recorded["base_config"]["train"]["num_steps"] == 4
    assert [r["name"] for r in recorded["runs"]] == [row["run"] for row in rows]

    # Rerun: both runs are read back, not trained, and the tables come out identical.
    outputs = {name: open(os.path.join(workdir, name), "rb").read()
               for name in ("results.csv", "results.md")}
    monkeypatch.setattr(trainer, "train_and_evaluate", sweep_files.must_not_train)
    again = sweep.run_sweep(fast, runs, workdir)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    for name, content in outputs.items():
        assert open(os.path.join(workdir, name), "rb").read() == content

    # Another sort metric: accuracy ranks highest first.
    sweep.write_results(again, workdir, "validation/accuracy")
    table = _md_rows(os.path.join(workdir, "results.md"))
    accuracy = [float(row["validation/accuracy"]) for row in table]
    assert accuracy == sorted(accuracy, reverse=True)
    assert list(table[0])[2] == "validation/accuracy"


def test_a_failing_run_is_recorded_and_the_others_complete(base, tmp_path, monkeypatch,
                                                            sweep_files):
    def fake_train(config, workdir):  # what the trainer leaves behind, without training
        if config.model.num_layers == 2:
            raise RuntimeError("boom\nsecond line")
        os.makedirs(workdir, exist_ok=True)
        loss = 5.0 - config.model.num_layers
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step, split in ((1, "train"), (2, "train"), (2, "validation")):
                f.write(json.dumps({"step": step, "split": split, "loss": loss + 1 / step})
                        + "\n")
        summary = {"validation/loss": loss, "params/count": 10 * config.model.num_layers}
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return {**summary, "sample": "text"}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
    runs = sweep.parse_sweep("model.num_layers=1,2,3", base)
    records = sweep.run_sweep(base, runs, str(tmp_path))
    assert [r["status"] for r in records] == ["finished", "failed", "finished"]
    assert records[1]["error"] == "RuntimeError: boom\nsecond line"
    rows = sweep_files.read_csv(tmp_path / "results.csv")
    assert [(r["status"], r["validation/loss"]) for r in rows] == [
        ("finished", "4.0"), ("failed", ""), ("finished", "2.0")]
    assert rows[1]["error"] == "RuntimeError: boom\nsecond line"
    table = _md_rows(tmp_path / "results.md")  # failed runs last, first error line shown
    assert [(r["model.num_layers"], r["status"]) for r in table] == [
        ("3", "finished"), ("1", "finished"), ("2", "failed: RuntimeError: boom")]


def test_a_preempted_run_stops_the_sweep(base, tmp_path, monkeypatch, sweep_files):
    # SIGTERM/SIGINT inside a run: the trainer checkpoints and returns this status.
    monkeypatch.setattr(trainer, "train_and_evaluate",
                        lambda config, workdir: {"status": "preempted", "step": 3})
    records = sweep.run_sweep(base, sweep.parse_sweep("seed=1,2", base), str(tmp_path))
    assert [r["status"] for r in records] == ["preempted", "pending"]
    assert [r["status"] for r in sweep_files.read_csv(tmp_path / "results.csv")] == [
        "preempted", "pending"]


@pytest.mark.parametrize("metric, mode, direction", [
    ("validation/loss", "auto", "min"), ("test/perplexity", "auto", "min"),
    ("validation/accuracy", "auto", "max"), ("test/bleu", "auto", "max"),
    ("test/exact_match", "auto", "max"), ("validation/accuracy", "min", "min"),
    ("validation/loss", "max", "max"), ("decode/test_bleu", "auto", "max"),
    ("zero_shot/top1_among_heldout", "auto", "max"), ("retrieval/image_to_text_r@1", "auto",
                                                      "max"),
    ("validation/miou", "auto", "max"), ("validation/fake_score", "auto", "max"),
    ("validation/dice_loss", "auto", "min"), ("iwae/nll_bound", "auto", "min")])
def test_sort_direction(metric, mode, direction):
    assert sweep.sort_direction(metric, mode) == direction


def test_command_line_prints_the_table_and_fails_when_a_run_fails(tmp_path):
    # The only run's workdir holds another config, so the trainer refuses it at once.
    os.makedirs(tmp_path / "seed=1")
    (tmp_path / "seed=1" / "config.json").write_text('{"seed": 7}')
    result = subprocess.run(
        [sys.executable, "-m", "train.sweep", "--config=configs/gpt.py:tiny",
         f"--workdir={tmp_path}", "--sweep=seed=1", "--config.train.num_steps=5"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "| 1 | 1 |" in result.stdout and "failed: WorkdirError" in result.stdout
    assert "1 of 1 runs did not finish: seed=1" in result.stderr
    with open(tmp_path / "sweep.json") as f:
        assert json.load(f)["base_config"]["train"]["num_steps"] == 5


def test_pareto_front_keeps_only_undominated_runs():
    from train.sweep_plots import pareto_front, pareto_points
    records = [{"name": n, "metrics": m} for n, m in [
        ("float", {"params/bytes": 100, "validation/ppl": 5.0}),
        ("int8", {"params/bytes": 100, "compressed/bytes": 26, "validation/ppl": 5.0,
                  "compressed/validation/ppl": 5.05}),
        ("int4", {"params/bytes": 100, "compressed/bytes": 14, "compressed/validation/ppl": 6.0}),
        ("bad", {"params/bytes": 100, "compressed/bytes": 30, "compressed/validation/ppl": 7.0}),
    ]]
    points = pareto_points(records, "validation/ppl")
    assert ("int8", 26.0, 5.05) in points and ("float", 100.0, 5.0) in points
    assert [p[0] for p in pareto_front(points, "min")] == ["int4", "int8", "float"]
    assert [p[0] for p in pareto_front(points, "max")] == ["int4", "bad"]


def test_the_distillation_sweeps_parse_into_their_rows():
    """configs/clip.py:student's TinyCLIP ablation (5 rows), configs/gpt.py:distill's (3
    rows) and configs/bert.py:distill's (2): every override is a key of the base config,
    and the rows are distinct."""
    from configs import bert, clip  # noqa: PLC0415

    for module, variant, rows in ((clip, "student", 5), (gpt, "distill", 3),
                                  (bert, "distill", 2)):
        base = module.get_config(variant)
        runs = sweep.parse_sweep(module.get_sweep(variant), base)
        assert len(runs) == rows and len({sweep.run_name(r) for r in runs}) == rows
        for run in runs:
            sweep.apply_overrides(base, run)
    teacher, student = clip.get_config("teacher"), clip.get_config("student")
    assert teacher.model.vit.encoder.d_model == 2 * clip.get_config().model.vit.encoder.d_model
    assert student.model.text.num_layers == 1 and student.train.num_steps == 1000
    base = bert.get_config("distill")   # the sweep's DistilBERT row is the variant
    distilbert = sweep.apply_overrides(base, sweep.parse_sweep(bert.get_sweep("distill"),
                                                               base)[1])
    assert distilbert.to_dict() == bert.get_config("distilbert").to_dict()
    # every distilled row reads, and inherits from, the teacher of its own seed
    from train.config import with_seed_in_paths  # noqa: PLC0415
    for module, variant in ((clip, "student"), (gpt, "distill"), (bert, "distill")):
        base = module.get_config(variant)
        for run in sweep.parse_sweep(module.get_sweep(variant), base):
            config = sweep.apply_overrides(base, {**run, "seed": 2})
            config = with_seed_in_paths(config)
            for path in (config.distill.teacher, config.init_from.workdir):
                assert path in ("", module.DISTILL_TEACHER.replace("{seed}", "2")), path


def test_steps_to_reach_a_reference_including_staged_runs(tmp_path):
    """train.sweep_reach: the first evaluation at the reference's final value; a staged
    run's later stage counts after its earlier ones."""
    from train import sweep_reach  # noqa: PLC0415

    def lines(path, points):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
            for step, value in points:
                f.write(json.dumps({"step": step, "split": "zero_shot", "top1": value}) + "\n")
                f.write(json.dumps({"step": step, "split": "train", "top1": 9.0}) + "\n")
    lines(tmp_path / "a", [(10, 0.2), (20, 0.5)])
    lines(tmp_path / "b", [(10, 0.6), (20, 0.7)])
    lines(tmp_path / "c" / "stage_0", [(10, 0.1)])
    lines(tmp_path / "c" / "stage_1", [(5, 0.4), (10, 0.55)])
    with open(tmp_path / "c" / "stages.json", "w", encoding="utf-8") as f:
        json.dump({"workdirs": ["stage_0", "stage_1"], "steps_per_stage": 10}, f)
    with open(tmp_path / "sweep.json", "w", encoding="utf-8") as f:
        json.dump({"runs": [{"name": n} for n in "abc"]}, f)
    rows = sweep_reach.reach_table(str(tmp_path), "zero_shot/top1")
    assert [(r["final"], r["steps_to_reach"]) for r in rows] == [(0.5, 20), (0.7, 10),
                                                                   (0.55, 20)]


def test_steps_to_reach_compare_each_seed_with_the_reference_of_its_seed(tmp_path):
    """--seeds: a run's target is the final value of the reference point's run of the same
    seed (seed 1's reference ends higher, so seed 1's student needs longer); a run that
    never reaches it has no step."""
    from train import sweep_reach  # noqa: PLC0415

    curves = {"scratch,seed=0": [(10, 0.2), (20, 0.4)], "scratch,seed=1": [(10, 0.3), (20, 0.6)],
              "kd,seed=0": [(10, 0.45), (20, 0.7)], "kd,seed=1": [(10, 0.5), (20, 0.65)],
              "bad,seed=0": [(10, 0.1), (20, 0.2)], "bad,seed=1": [(10, 0.7), (20, 0.8)]}
    runs = []
    for name, points in curves.items():
        row, seed = name.split(",seed=")
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w", encoding="utf-8") as f:
            for step, value in points:
                f.write(json.dumps({"step": step, "split": "zero_shot", "top1": value,
                                    "top5": 0.9}) + "\n")
        runs.append({"name": name, "overrides": {"row": row, "seed": int(seed)}})
    with open(tmp_path / "sweep.json", "w", encoding="utf-8") as f:
        json.dump({"runs": runs, "seeds": 2}, f)
    rows = sweep_reach.reach_table(str(tmp_path), "zero_shot/top1")
    assert [(r["name"], r["target"], r["steps_to_reach"]) for r in rows] == [
        ("scratch,seed=0", 0.4, 20), ("scratch,seed=1", 0.6, 20), ("kd,seed=0", 0.4, 10),
        ("kd,seed=1", 0.6, 20), ("bad,seed=0", 0.4, None), ("bad,seed=1", 0.6, 10)]
    rows = sweep_reach.reach_table(str(tmp_path), "zero_shot/top1", reference=1, at=(10, 15),
                                   also=("zero_shot/top5",))
    assert [r["target"] for r in rows] == [0.7, 0.65] * 3
    assert rows[1]["at"] == {"zero_shot/top1@10": 0.3, "zero_shot/top1@15": None,
                             "zero_shot/top5@10": 0.9, "zero_shot/top5@15": None}
    with pytest.raises(ValueError, match="3 points"):
        sweep_reach.reach_table(str(tmp_path), "zero_shot/top1", reference=3)


@pytest.mark.parametrize("family, variants", [("gan", ("minimax", "k2")),
                                              ("unet", ("bilinear", None))])
def test_the_ablation_sweeps_are_the_default_and_its_variants(family, variants):
    """configs/gan.py's and configs/unet.py's ablations: the default first (no overrides),
    then one row per ablation that changes the default; a row named after a variant gives
    exactly that variant's config (one definition: they cannot drift apart)."""
    module = importlib.import_module(f"configs.{family}")
    base = module.get_config()
    runs = sweep.parse_sweep(module.get_sweep(), base)
    assert len(runs) == 3 and runs[0] == {}
    assert len({sweep.run_name(r) for r in runs}) == 3
    for run, variant in zip(runs[1:], variants):
        changed = sweep.apply_overrides(base, run)
        assert changed.to_json(sort_keys=True) != base.to_json(sort_keys=True), run
        if variant is not None:
            assert (changed.to_json(sort_keys=True)
                    == module.get_config(variant).to_json(sort_keys=True)), variant
    with pytest.raises(ValueError, match="allowed: default"):
        module.get_sweep("tiny")
