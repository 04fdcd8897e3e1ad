"""train.readme_tables: README's results tables written from a sweep's runs (mean, std,
min-max range, the command), and this repository's README equal to what its data give."""
import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from train import readme_data, readme_tables, sweep, trainer
from train.config import base_config

# (model.num_layers, seed) -> (validation/perplexity, validation/accuracy, baseline)
METRICS = {(1, 0): (5.10, 0.80), (1, 1): (5.16, 0.70), (1, 2): (5.13, 0.90),
           (2, 0): (4.90, 0.61), (2, 1): (4.91, 0.62), (2, 2): None}
BASELINE = 21.9
SPEC = """
[tables.demo]
columns = ["config", "result", "command"]

[[tables.demo.rows]]
id = "one_layer"
config = "one layer"
workdir = "runs/fixture"
where = {"model.num_layers" = 1}
command = "python -m train.sweep --config=configs/gpt.py --workdir=runs/fixture --sweep=model.num_layers=1,2 --seeds=3"
result = "perplexity **{validation/perplexity|.3f}** vs {validation/baseline|.2f}; accuracy {validation/accuracy|.1%}, mean {validation/accuracy|.1%|mean}"

[[tables.demo.rows]]
id = "two_layers"
config = "two layers"
workdir = "runs/fixture"
where = {"model.num_layers" = 2}
command = "python -m train.sweep --config=configs/gpt.py --workdir=runs/fixture --sweep=model.num_layers=1,2 --seeds=3"
result = "perplexity {validation/perplexity|.3f}: {validation/perplexity|vs=one_layer}; accuracy {validation/accuracy|vs=one_layer}"

[[tables.demo.rows]]
id = "layers_mean"
config = "mean over both depths"
workdir = "runs/fixture"
mean_over = "model.num_layers"
command = "python -m train.sweep --config=configs/gpt.py --workdir=runs/fixture --sweep=model.num_layers=1,2 --seeds=3"
result = "perplexity {validation/perplexity|.3f}: {validation/perplexity|vs=one_layer}"

[[tables.demo.rows]]
id = "legacy"
config = "measured once"
command = "python -m train.main --config=configs/gpt.py --workdir=runs/gpt"
result = "perplexity 5.13 | one run; over seeds {one_layer:validation/perplexity|.3f|mean}"

[texts.prose]
text = '''
One layer reaches {demo.one_layer:validation/perplexity|.3f} (std
{demo.one_layer:validation/accuracy|.1%|std} points of accuracy, range
{demo.one_layer:validation/accuracy|.1%|range}, each {demo.one_layer:validation/accuracy|.1%|each});
two layers {demo.two_layers:validation/perplexity|vs=demo.one_layer}; seed by seed
{demo.two_layers:validation/perplexity|+.3f|diff=demo.one_layer}
({demo.two_layers:validation/perplexity|+.1%|change=demo.one_layer}):
{demo.two_layers:validation/perplexity|paired=demo.one_layer}.

Of the depth mean's spread {demo.layers_mean:validation/perplexity|share=seed} is the seeds',
{demo.layers_mean:validation/perplexity|share=model.num_layers} the depths' and
{demo.layers_mean:validation/perplexity|share=interaction} their interaction.
'''
"""
README = ("# Title\n\nbefore\n\n<!-- results:demo -->\nstale\n<!-- /results:demo -->\n\n"
          "<!-- results:prose -->\nstale\n<!-- /results:prose -->\n\nafter\n")


def fake_train(config, workdir, **kwargs):
    values = METRICS[config.model.num_layers, config.seed]
    if values is None:
        raise RuntimeError("this seed fails")
    os.makedirs(workdir, exist_ok=True)
    summary = {"validation/perplexity": values[0], "validation/accuracy": values[1],
               "validation/baseline": BASELINE}
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    return summary


@pytest.fixture(scope="module")
def fixture_repo(tmp_path_factory):
    """A repository with README markers, a spec and a real 2 x 3-seed sweep's outputs."""
    repo = str(tmp_path_factory.mktemp("repo"))
    os.makedirs(os.path.join(repo, "docs", "results"))
    with open(os.path.join(repo, readme_tables.SPEC), "w", encoding="utf-8") as f:
        f.write(SPEC)
    with open(os.path.join(repo, "README.md"), "w", encoding="utf-8") as f:
        f.write(README)
    base = base_config("lm", "mini", family="transformer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train_and_evaluate", fake_train)
        mp.setattr(sweep, "plot_results", lambda *a, **k: None)
        sweep.run_sweep(base, sweep.parse_sweep("model.num_layers=1,2", base),
                        os.path.join(repo, "runs", "fixture"), seeds=3)
    return repo


def _table(readme: str) -> list[list[str]]:
    body = readme.split("<!-- results:demo -->\n")[1].split("<!-- /results:demo -->")[0]
    return [[c.strip() for c in line.strip().strip("|").split(" | ")]
            for line in body.strip().splitlines()]


def test_tables_are_written_from_the_sweep_with_mean_std_range_and_command(fixture_repo):
    assert readme_tables.run(fixture_repo, do_collect=True) == 0
    with open(os.path.join(fixture_repo, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert readme.startswith("# Title\n\nbefore\n\n") and readme.endswith("\n\nafter\n")
    header, rule, one, two, mean, legacy = _table(readme)
    assert header == ["config", "result", "command", "seeds"] and rule == ["---|---|---|---:"]

    ppl = np.array([5.10, 5.16, 5.13])
    acc = np.array([0.80, 0.70, 0.90])
    assert f"{ppl.mean():.3f} ± {ppl.std(ddof=1):.3f}" == "5.130 ± 0.030"
    assert f"{100 * acc.mean():.1f} ± {100 * acc.std(ddof=1):.1f}%" == "80.0 ± 10.0%"
    # The perplexity's range (1.2% of the mean) is small: no min-max; the accuracy's
    # (25%) is large: its min-max follows. A value every run shares is shown once.
    assert one == ["one layer",
                   "perplexity **5.130 ± 0.030** vs 21.90; accuracy 80.0 ± 10.0% "
                   "(70.0-90.0%), mean 80.0%",
                   "`python -m train.sweep --config=configs/gpt.py --workdir=runs/fixture "
                   "--sweep=model.num_layers=1,2 --seeds=3`", "3"]
    # Two layers: the failed seed is left out, and the seeds cell says 2.
    # Claims against another row: Welch's t-test, SciPy's p-values.
    p_ppl = stats.ttest_ind([4.90, 4.91], ppl, equal_var=False).pvalue
    p_acc = stats.ttest_ind([0.61, 0.62], acc, equal_var=False).pvalue
    assert p_ppl < 0.05 < p_acc
    assert two[1] == (f"perplexity {np.mean([4.90, 4.91]):.3f} ± "
                      f"{np.std([4.90, 4.91], ddof=1):.3f}: differs from one_layer "
                      f"(p={p_ppl:.2g}); accuracy ties with one_layer (p={p_acc:.2g})")
    assert two[1].startswith("perplexity 4.905 ± 0.007: differs") and two[3] == "2"
    # mean_over: each seed's runs averaged over the depths first; seed 2 (its two-layer
    # run failed) is left out, so two seeds, each the mean of one- and two-layer runs.
    per_seed = np.array([(5.10 + 4.90) / 2, (5.16 + 4.91) / 2])
    p_mean = stats.ttest_ind(per_seed, ppl, equal_var=False).pvalue
    assert p_mean < 0.05   # the fold-style mean (5.018) differs from one layer's (5.130)
    assert mean[1] == (f"perplexity {per_seed.mean():.3f} ± {per_seed.std(ddof=1):.3f}: "
                       f"differs from one_layer (p={p_mean:.2g})") and mean[3] == "2"
    assert mean[1].startswith("perplexity 5.018 ± 0.025: differs")
    # An unmeasured row may quote a measured one.
    assert legacy[1] == "perplexity 5.13 \\| one run; over seeds 5.130" and legacy[3] == "1"

    # A text: placeholders naming TABLE.ROW, re-wrapped at TEXT_WIDTH, paragraphs kept.
    prose = readme.split("<!-- results:prose -->\n")[1].split("<!-- /results:prose -->")[0]
    assert max(len(line) for line in prose.splitlines()) <= readme_tables.TEXT_WIDTH
    first, second = (" ".join(p.split()) for p in prose.split("\n\n"))
    # Paired over the seeds both rows have (0 and 1): differences -0.20 and -0.25,
    # relative -3.92% and -4.84%.
    p_paired = stats.ttest_rel([4.90, 4.91], [5.10, 5.16]).pvalue
    assert p_paired == pytest.approx(0.0704, abs=1e-4)   # 2 pairs: 1 degree of freedom
    assert first == ("One layer reaches 5.130 ± 0.030 (std 10.0 points of accuracy, range "
                     "70.0-90.0%, each 70.0, 80.0 and 90.0%); two layers differs from "
                     f"one_layer (p={p_ppl:.2g}); seed by seed -0.225 ± 0.035 (-0.250 "
                     f"to -0.200) (-4.4 ± 0.7% (-4.8 to -3.9%)): ties with "
                     f"one_layer (paired, p={p_paired:.2g}).")
    # The seed x depth table of the seeds with both depths (seed 2's second failed):
    # two-way sums of squares by hand.
    x = np.array([[5.10, 4.90], [5.16, 4.91]])
    total = ((x - x.mean()) ** 2).sum()
    seed_ss = 2 * ((x.mean(axis=1) - x.mean()) ** 2).sum()
    depth_ss = 2 * ((x.mean(axis=0) - x.mean()) ** 2).sum()
    shares = [f"{100 * v:.0f}%" for v in (seed_ss / total, depth_ss / total,
                                          1 - (seed_ss + depth_ss) / total)]
    # 0.001225, 0.050625 and 0.000625 of 0.052475
    assert shares == ["2%", "96%", "1%"]
    assert second == (f"Of the depth mean's spread {shares[0]} is the seeds', {shares[1]} the "
                      f"depths' and {shares[2]} their interaction.")
    assert readme_tables.run(fixture_repo, check=True) == 0

    # The collected data alone rewrite the same tables, without the runs.
    runs = os.path.join(fixture_repo, "runs")
    shutil.move(runs, runs + ".moved")
    try:
        with open(os.path.join(fixture_repo, "README.md"), "w", encoding="utf-8") as f:
            f.write(README)
        assert readme_tables.run(fixture_repo, check=True) == 1   # stale README
        assert readme_tables.run(fixture_repo, do_collect=True) == 0   # keeps the old data
        with open(os.path.join(fixture_repo, "README.md"), encoding="utf-8") as f:
            assert f.read() == readme
    finally:
        shutil.move(runs + ".moved", runs)
    data = readme_tables.read_data(fixture_repo, "demo")
    assert sorted(data) == ["layers_mean", "one_layer", "two_layers"]
    assert data["one_layer"]["model.num_layers=1,seed=1"]["validation/perplexity"] == 5.16


def test_refuses_too_few_seeds_a_command_that_disagrees_and_missing_markers(
        fixture_repo, tmp_path):
    row = {"id": "r", "workdir": "runs/fixture", "command": "python -m train.sweep --seeds=5"}
    with pytest.raises(readme_tables.TableError, match="--seeds=3; its command must say "
                                                       "--seeds=3"):
        readme_data.runs_of_row(fixture_repo, row)
    with open(os.path.join(fixture_repo, "runs", "fixture", "sweep.json"),
              encoding="utf-8") as f:
        recorded = json.load(f)
    few = tmp_path / "runs" / "two_seeds"
    few.mkdir(parents=True)
    (few / "sweep.json").write_text(json.dumps({**recorded, "seeds": 2}))
    shutil.copy(os.path.join(fixture_repo, "runs", "fixture", "results.csv"), few)
    row = {"id": "r", "workdir": "runs/two_seeds", "command": "x --seeds=2"}
    with pytest.raises(readme_tables.TableError, match="must be at least 3"):
        readme_data.runs_of_row(str(tmp_path), row)
    row = {"id": "r", "workdir": "runs/fixture", "where": {"model.num_layers": 7},
           "command": "x --seeds=3"}
    with pytest.raises(readme_tables.TableError, match="no finished run .* with"):
        readme_data.runs_of_row(fixture_repo, row)
    with pytest.raises(readme_tables.TableError, match="exactly one <!-- results:demo -->"):
        readme_tables.render_readme("no markers\n", readme_tables.load_spec(fixture_repo),
                                    fixture_repo)
    row = readme_tables.Measured({"a": {"x/y": 1.0}}, {"a": {"x/y": 1.0}})
    with pytest.raises(readme_tables.TableError, match="nope: no such measured row; rows: a"):
        readme_tables.fill("{x/y|vs=nope}", row, "row", {"a": row})
    runs = {"a": {"seed": 0.0, "k": 1.0, "x/y": 1.0}, "b": {"seed": 0.0, "k": 1.0}}
    with pytest.raises(readme_tables.TableError, match="two runs of seed 0 with k=1"):
        readme_tables.mean_over(runs, "k", "row")
    with pytest.raises(readme_tables.TableError, match="run 'a' has no numeric 'seed' or 'j'"):
        readme_tables.mean_over(runs, "j", "row")
    with pytest.raises(readme_tables.TableError, match="share=seed: needs a row with "
                                                       "mean_over"):
        readme_tables.fill("{x/y|share=seed}", row, "row")
    seeded = {f"s{i}": {"seed": float(i), "x/y": 1.0 + i} for i in range(3)}
    a = readme_tables.Measured(seeded, seeded)
    b = readme_tables.Measured({"s2": seeded["s2"], "s5": {**seeded["s2"], "seed": 5.0}}, {})
    with pytest.raises(readme_tables.TableError, match=r"2 or more seeds both rows have; "
                                                       r"they share \['2'\]"):
        readme_tables.fill("{x/y|paired=b}", a, "row", {"a": a, "b": b})
    with pytest.raises(readme_tables.TableError, match="one run per seed; run 'a' has none"):
        readme_tables.fill("{x/y|.1f|diff=a}", a, "row", {"a": row})
    assert readme_tables.fill("{x/y|+.1f|diff=a}", a, "row", {"a": a}) == "+0.0"
    # ROW:METRIC pairs two metrics, here of the row itself: z = 2 x/y + 1 seed by seed.
    both = {k: {**m, "z": 2 * m["x/y"] + 1} for k, m in seeded.items()}
    a2 = readme_tables.Measured(both, both)
    assert readme_tables.fill("{z|+.1f|diff=a:x/y}", a2, "row", {"a": a2}) == (
        "+3.0 ± 1.0 (+2.0 to +4.0)")
    p_z = stats.ttest_rel([3.0, 5.0, 7.0], [1.0, 2.0, 3.0]).pvalue
    assert p_z == pytest.approx(0.0351, abs=1e-4)    # differences 2, 3, 4: t = 5.2, 2 dof
    assert readme_tables.fill("{z|paired=a:x/y}", a2, "row", {"a": a2}) == (
        f"differs from x/y (paired, p={p_z:.2g})")      # the row's own metric: its name
    with pytest.raises(readme_tables.TableError, match="need a workdir"):
        readme_tables.fill("{x/y|.3f}", None, "text 't'")
    with pytest.raises(readme_tables.TableError, match="nope.r: no such table"):
        readme_tables.fill("{nope.r:x/y|.3f}", None, "text 't'", None, {"demo": {}})
    spec = tmp_path / readme_tables.SPEC
    spec.parent.mkdir(parents=True)
    spec.write_text('[tables.demo]\ncolumns = ["c"]\n[texts.demo]\ntext = "x"\n')
    with pytest.raises(readme_tables.TableError, match="'demo' is both a table and a text"):
        readme_tables.load_texts(str(tmp_path))
    with pytest.raises(readme_tables.TableError, match="2 of 3 runs have no metric 'x/y'"):
        three = {"a": {"x/y": 1.0}, "b": {}, "c": {}}
        readme_tables.fill("{x/y|.3f}", readme_tables.Measured(three, three), "row")


def test_collect_adds_the_steps_to_reach_of_the_sweeps_reach_json(fixture_repo, tmp_path):
    """A sweep with reach.json (train/sweep_reach.py): its runs' steps_to_reach become the
    metric reach/steps and their values at --at steps METRIC@STEP; a run that never reached
    its target (or has no value at a step) has none."""
    shutil.copytree(os.path.join(fixture_repo, "runs", "fixture"), tmp_path / "runs" / "f")
    reach = [{"name": "model.num_layers=1,seed=0", "steps_to_reach": 250,
              "at": {"v/acc@50": 0.5}},
             {"name": "model.num_layers=1,seed=1", "steps_to_reach": None,
              "at": {"v/acc@50": None}}]
    (tmp_path / "runs" / "f" / "reach.json").write_text(
        json.dumps({"rows": reach}))
    row = {"id": "r", "workdir": "runs/f", "where": {"model.num_layers": 1},
           "command": "x --seeds=3"}
    runs = readme_data.runs_of_row(str(tmp_path), row)
    assert {name: (m.get("reach/steps"), m.get("v/acc@50")) for name, m in runs.items()} == {
        "model.num_layers=1,seed=0": (250.0, 0.5), "model.num_layers=1,seed=1": (None, None),
        "model.num_layers=1,seed=2": (None, None)}
    assert runs["model.num_layers=1,seed=0"]["validation/perplexity"] == 5.10


def test_this_readme_is_what_its_collected_results_give():
    """README.md's results tables are docs/results/ rendered (python -m train.readme_tables)."""
    assert readme_tables.run(readme_tables.REPO, check=True) == 0
