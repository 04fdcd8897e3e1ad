"""train.sweep_stats: --seeds=K runs, and results.md / results_grouped.csv statistics equal
to NumPy's (the t quantiles in closed form, Welch's p-values equal to SciPy's ttest_ind)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from train import sweep, sweep_stats, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# validation/loss of (model.num_layers, seed): layers 2 is within the noise of layers 1,
# layers 3 clearly worse; layers 2's seed 1 fails, so it has 2 of its 3 runs.
LOSSES = {(1, 0): 2.10, (1, 1): 2.13, (1, 2): 2.08,
          (2, 0): 2.11, (2, 1): None, (2, 2): 2.125,
          (3, 0): 2.40, (3, 1): 2.45, (3, 2): 2.38}


def t_975(df: int) -> float:
    """Student's t 0.975 quantile in closed form: df=1 is Cauchy's tan(pi (p - 1/2)); for
    df=2, F(t) = 1/2 + t / (2 sqrt(2 + t^2)) gives t = a sqrt(2 / (1 - a^2)), a = 2p - 1."""
    return {1: math.tan(math.pi * 0.475), 2: 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))}[df]


def fake_train(config, workdir, **kwargs):
    loss = LOSSES[config.model.num_layers, config.seed]
    if loss is None:
        raise RuntimeError("boom")
    os.makedirs(workdir, exist_ok=True)
    summary = {"validation/loss": loss, "validation/accuracy": 1 - loss / 4}
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    return summary




def test_seeds_repeat_every_run_with_seed_parts_in_the_names(base):
    runs = sweep.parse_sweep("model.num_layers=1,2", base)
    seeded = sweep_stats.with_seeds(runs, base, 3)
    assert seeded == [{"model.num_layers": n, "seed": s} for n in (1, 2) for s in (0, 1, 2)]
    assert [sweep.run_name(r) for r in seeded[:2]] == ["model.num_layers=1,seed=0",
                                                       "model.num_layers=1,seed=1"]
    other = sweep.apply_overrides(base, {"seed": 40})
    assert [r["seed"] for r in sweep_stats.with_seeds(runs, other, 2)] == [40, 41, 40, 41]
    assert sweep_stats.with_seeds(runs, base, 1) == runs  # names unchanged without --seeds
    with pytest.raises(ValueError, match="--seeds=2 sets seed, and so does the run seed=1"):
        sweep_stats.with_seeds(sweep.parse_sweep("seed=1,2", base), base, 2)
    with pytest.raises(ValueError, match="--seeds=0 must be an integer of at least 1"):
        sweep_stats.with_seeds(runs, base, 0)


def test_grouped_statistics_equal_numpy(base, tmp_path, monkeypatch, sweep_files):
    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
    monkeypatch.setattr(sweep, "plot_results", lambda *a, **k: None)
    workdir = str(tmp_path)
    records = sweep.run_sweep(base, sweep.parse_sweep("model.num_layers=3,1,2", base),
                              workdir, seeds=3)
    assert [r["group"] for r in records[:4]] == ["model.num_layers=3"] * 3 + [
        "model.num_layers=1"]
    # results.csv: still one row per run, with its seed.
    rows = sweep_files.read_csv(os.path.join(workdir, "results.csv"))
    assert [(row["model.num_layers"], row["seed"]) for row in rows] == [
        (str(n), str(s)) for n in (3, 1, 2) for s in (0, 1, 2)]
    values = {n: np.array([LOSSES[n, s] for s in range(3) if LOSSES[n, s] is not None])
              for n in (1, 2, 3)}

    # results_grouped.csv: exact (repr) statistics, best mean first.
    grouped = sweep_files.read_csv(os.path.join(workdir, "results_grouped.csv"))
    assert [row["model.num_layers"] for row in grouped] == ["1", "2", "3"]
    for row in grouped:
        x = values[int(row["model.num_layers"])]
        mean, std = x.mean(), x.std(ddof=1)
        half = t_975(x.size - 1) * std / math.sqrt(x.size)
        assert (int(row["runs"]), int(row["n"])) == (3, x.size)
        for key, want in (("mean", mean), ("std", std), ("ci_low", mean - half),
                          ("ci_high", mean + half)):
            assert float(row[f"validation/loss/{key}"]) == pytest.approx(want, rel=1e-12)
        assert float(row["validation/accuracy/mean"]) == pytest.approx(np.mean(1 - x / 4),
                                                                       rel=1e-12)
    # Welch's test against the best row (layers 1): SciPy's p-values.
    for row, n in zip(grouped[1:], (2, 3)):
        p = stats.ttest_ind(values[n], values[1], equal_var=False).pvalue
        assert float(row["p_vs_best"]) == pytest.approx(p, rel=1e-9)
        assert row["differs_from_best"] == str(p < 0.05)
    assert [row["differs_from_best"] for row in grouped] == ["False", "False", "True"]

    # results.md: the groups first (4 significant digits), then every run.
    groups, runs = sweep_files.md_tables(os.path.join(workdir, "results.md"))
    assert len(runs) == 9 and list(groups[0])[:3] == ["#", "model.num_layers", "n"]
    for row, n in zip(groups, (1, 2, 3)):
        x = values[n]
        mean, std = x.mean(), x.std(ddof=1)
        half = t_975(x.size - 1) * std / math.sqrt(x.size)
        assert row["validation/loss mean ± std"] == f"{mean:.4g} ± {std:.4g}"
        assert row["95% interval"] == f"[{mean - half:.4g}, {mean + half:.4g}]"
    assert [row["n"] for row in groups] == ["3", "2 of 3", "3"]
    assert groups[0]["vs best"] == "best"
    assert groups[1]["vs best"].startswith("noise (p=0.")
    assert groups[2]["vs best"].startswith("differs (p=")
    p = stats.ttest_ind(values[3], values[1], equal_var=False).pvalue
    assert groups[2]["vs best"] == f"differs (p={p:.2g})"

    # Rerun: read back (the failed run is retried), same tables.
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda c, w: sweep_files.must_not_train(c, w)
                        if LOSSES[c.model.num_layers, c.seed] else fake_train(c, w))
    text = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
    sweep.run_sweep(base, sweep.parse_sweep("model.num_layers=3,1,2", base), workdir, seeds=3)
    assert open(os.path.join(workdir, "results.md"), encoding="utf-8").read() == text


def test_small_groups_and_ties():
    one = sweep_stats.summarize([2.0])
    assert one["n"] == 1 and one["mean"] == 2.0 and math.isnan(one["std"])
    assert math.isnan(one["ci_low"]) and math.isnan(sweep_stats.welch_p([1.0], [1.0, 2.0]))
    assert sweep_stats.welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert sweep_stats.welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0
    x, y = [0.3, 0.1, 0.4, 0.15], [0.5, 0.9, 0.2]  # unequal sizes and variances
    assert sweep_stats.welch_p(x, y) == pytest.approx(
        stats.ttest_ind(x, y, equal_var=False).pvalue, rel=1e-12)
    assert sweep_stats.t_quantile(0.975, 2) == pytest.approx(t_975(2), rel=1e-12)


def test_paired_p_is_scipys_paired_t_test():
    a, b = [5.10, 5.16, 5.13, 5.20], [5.00, 5.11, 5.12, 5.05]
    assert sweep_stats.paired_p(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue,
                                                       rel=1e-12)
    assert sweep_stats.paired_p([1.0, 2.0], [0.5, 1.5]) == 0.0    # every pair +0.5
    assert sweep_stats.paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert math.isnan(sweep_stats.paired_p([1.0], [2.0]))


def test_two_way_shares_closed_forms():
    """Seed x fold spread: an additive table has no interaction, a checkerboard is all
    interaction, and a random table's shares are its sums of squares."""
    assert sweep_stats.two_way_shares([[0.0, 2.0], [2.0, 4.0]]) == (0.5, 0.5, 0.0)
    assert sweep_stats.two_way_shares([[1.0, -1.0], [-1.0, 1.0]]) == (0.0, 0.0, 1.0)
    rows, cols, inter = sweep_stats.two_way_shares([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    # grand mean 3; row means 3, 3; column means 2, 2.5, 4.5; total SS 4+1+9 = 14
    assert rows == 0.0 and cols == pytest.approx(2 * (1 + 0.25 + 2.25) / 14)
    assert inter == pytest.approx(1 - 7 / 14)
    x = np.random.default_rng(0).normal(size=(3, 4))
    total = ((x - x.mean()) ** 2).sum()
    got = sweep_stats.two_way_shares(x)
    assert got[0] == pytest.approx(4 * x.mean(axis=1).var() * 3 / total)
    assert got[1] == pytest.approx(3 * x.mean(axis=0).var() * 4 / total)
    assert sum(got) == pytest.approx(1.0)
    assert all(math.isnan(v) for v in sweep_stats.two_way_shares(np.ones((2, 2))))
    with pytest.raises(ValueError, match="2\\+ rows and 2\\+ columns, got shape \\(1, 3\\)"):
        sweep_stats.two_way_shares([[1.0, 2.0, 3.0]])


def test_a_search_with_seeds_is_valued_by_the_mean(base, tmp_path, monkeypatch,
                                                   sweep_files):
    pytest.importorskip("optuna")
    from train import search  # noqa: PLC0415

    def train(config, workdir, **kwargs):
        os.makedirs(workdir, exist_ok=True)
        loss = (math.log10(config.optim.learning_rate) + 2.5) ** 2 + 0.1 * config.seed
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"validation/loss": loss}, f)
        return {"validation/loss": loss}
    monkeypatch.setattr(trainer, "train_and_evaluate", train)
    for module, name in ((sweep, "plot_results"), (search, "plot_history"),
                         (search, "importances")):
        monkeypatch.setattr(module, name, lambda *a, **k: {})
    records = search.run_search(base, "optim.learning_rate=loguniform(1e-3,1e-2)",
                                str(tmp_path), trials=3, sampler="random", seeds=2)
    assert [(r["trial"], r["overrides"]["seed"]) for r in records] == [
        (t, s) for t in range(3) for s in (0, 1)]
    import optuna  # noqa: PLC0415
    study = optuna.load_study(study_name=search.STUDY_NAME,
                              storage=f"sqlite:///{tmp_path / 'study.db'}")
    for trial in study.trials:
        losses = [r["metrics"]["validation/loss"] for r in records if r["trial"] == trial.number]
        assert trial.value == pytest.approx(np.mean(losses), rel=1e-12)
    grouped = sweep_files.read_csv(tmp_path / "results_grouped.csv")
    assert sorted(int(row["trial"]) for row in grouped) == [0, 1, 2]
    assert all(row["n"] == "2" for row in grouped)
    with pytest.raises(ValueError, match="seeds"):  # --seeds is the study's identity
        search.run_search(base, "optim.learning_rate=loguniform(1e-3,1e-2)", str(tmp_path),
                          trials=3, sampler="random", seeds=3)


def test_command_line_seeds(tmp_path):
    """--seeds=2 through python -m train.sweep: both runs' workdirs hold another config, so
    the trainer refuses them at once; the grouped table and run names still come out."""
    for seed in (0, 1):
        os.makedirs(tmp_path / f"model.num_layers=1,seed={seed}")
        (tmp_path / f"model.num_layers=1,seed={seed}" / "config.json").write_text(
            '{"seed": 7}')
    result = subprocess.run(
        [sys.executable, "-m", "train.sweep", "--config=configs/gpt.py:tiny",
         f"--workdir={tmp_path}", "--sweep=model.num_layers=1", "--seeds=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 configurations x 2 seeds" in result.stdout
    assert "| 1 | 1 | 0 of 2 |" in result.stdout
    assert ("2 of 2 runs did not finish: model.num_layers=1,seed=0, "
            "model.num_layers=1,seed=1") in result.stderr
    with open(tmp_path / "sweep.json") as f:
        assert json.load(f)["seeds"] == 2
