"""config.init_from: the matching rules on hand-made trees (no training), then one trained
tiny GPT loaded into a new head and vocabulary, into its scanned form (same logits), by
step, and through the trainer (evaluate-only, no second load on resume)."""
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta as flax_meta

from configs import gan, gpt
from models.compress import common
from train import config as config_lib, families, init_from, trainer

VOCAB = 260  # the byte tokenizer's


def _section(workdir="src", **keys):
    c = init_from.default_config()
    c.workdir = workdir
    for key, value in keys.items():
        c[key] = value
    return c


def _flat(tree):
    return {common.path_str(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(tree)[0]}


def _fit(source, template, state=None, template_state=None, **keys):
    return init_from.fit(source, state or {}, template, template_state or {},
                         _section(**keys), where="src step 5")


# ---- the rules on hand-made trees --------------------------------------------------------
def test_patterns_are_globs_or_regexes_over_the_path_or_a_leading_part():
    m = init_from.matches
    assert m(("unembed/*",), "unembed/logits/kernel")
    assert m(("unembed",), "unembed/logits/kernel")          # a leading part covers a subtree
    assert m((r"decoder/layers_\d+/mlp",), "decoder/layers_1/mlp/fc1/kernel")  # a regex
    assert m(("*/kernel",), "decoder/layers_0/mlp/fc1/kernel")
    assert m(("*embed*",), "embed/tokens/embedding")        # not a valid regex: glob only
    assert not m(("layers_0",), "decoder/layers_0/mlp/fc1/kernel")  # anchored at the root
    assert not m(("decoder/layers_1",), "decoder/layers_10/mlp/fc1/kernel")
    assert not m((), "a/b")


def test_include_and_exclude_choose_what_is_loaded():
    source = {"a": {"bias": np.full(3, 1.0), "kernel": np.full((2, 3), 2.0)},
              "b": {"kernel": np.full((3, 3), 3.0)}}
    template = jax.tree.map(jnp.zeros_like, source)
    params, _, report = _fit(source, template, include=("a",), exclude=("a/bias",))
    got = _flat(params)
    assert (got["a/kernel"] == 2.0).all() and (got["a/bias"] == 0).all()
    assert (got["b/kernel"] == 0).all()
    assert report.loaded == ["a/kernel"] and report.total == 3
    assert report.fresh_unselected == ["a/bias", "b/kernel"]
    params, _, report = _fit(source, template, include=(r"(a|b)/kernel",))
    assert report.loaded == ["a/kernel", "b/kernel"]
    _, _, report = _fit(source, template)                    # () = everything
    assert len(report.loaded) == 3 and not report.fresh_unselected


def test_misfits_are_one_error_naming_them_unless_allowed_new(caplog):
    source = {"a": {"kernel": np.ones((2, 3))}, "old": {"w": np.ones(4)},
              "c": {"w": np.ones(2)}}
    template = {"a": {"kernel": jnp.zeros((4, 3))}, "head": {"kernel": jnp.zeros((3, 5))},
                "c": {"w": jnp.zeros(2)}}
    with pytest.raises(ValueError) as e:
        _fit(source, template)
    assert str(e.value) == (
        "init_from: 2 parameters of this model do not fit src step 5: a/kernel: source "
        "(2, 3) vs model (4, 3); head/kernel: absent from the source; allow them to start "
        "fresh with init_from.allow_new (or leave them out with init_from.exclude)")
    params, _, report = _fit(source, template, allow_new=("a/*", "head"))
    got = _flat(params)
    assert (got["a/kernel"] == 0).all() and (got["head/kernel"] == 0).all()
    assert (got["c/w"] == 1).all()
    assert report.fresh_allowed == ["a/kernel (source (2, 3) vs model (4, 3))",
                                    "head/kernel (absent from the source)"]
    assert report.ignored == ["old/w"]
    caplog.set_level(logging.INFO, logger="absl")
    init_from.log_report(report, "src step 5")
    text = caplog.text
    assert "init_from: loaded 1 of 3 parameters from src step 5" in text
    assert "init_from: kept fresh (allow_new): a/kernel (source (2, 3) vs model (4, 3)), " \
           "head/kernel (absent from the source)" in text
    assert "init_from: ignored (not in this model): old/w" in text
    # excluded parameters are never a misfit
    _, _, report = _fit(source, template, exclude=("a", "head"))
    assert report.loaded == ["c/w"]


def test_values_are_cast_to_the_model_dtype_and_model_state_loads_alike():
    source = {"bn": {"scale": np.array([1.5, 2.25], np.float32)}}
    state = {"batch_stats": {"bn": {"mean": np.array([3.0, 4.0], np.float32)}}}
    template = {"bn": {"scale": jnp.zeros(2, jnp.bfloat16)}}
    template_state = {"batch_stats": {"bn": {"mean": jnp.zeros(2, jnp.float32)}}}
    params, model_state, report = _fit(source, template, state, template_state)
    assert params["bn"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["bn"]["scale"], np.float32), [1.5, 2.25])
    np.testing.assert_array_equal(model_state["batch_stats"]["bn"]["mean"], [3.0, 4.0])
    assert report.state.loaded == ["batch_stats/bn/mean"]
    # A pattern names the state with or without its collection.
    for pattern in ("bn", "batch_stats/bn"):
        _, model_state, report = _fit(source, template, state, template_state,
                                      exclude=(pattern,))
        assert (np.asarray(model_state["batch_stats"]["bn"]["mean"]) == 0).all(), pattern
    with pytest.raises(ValueError, match="batch_stats/bn/mean: absent from the source"):
        _fit(source, template, {}, template_state)


def test_unrolled_and_scanned_layer_stacks_convert_both_ways():
    a0, a1 = np.arange(3.0), np.arange(3.0) + 10
    unrolled = {"dec": {"layers_0": {"w": a0}, "layers_1": {"w": a1}}, "emb": np.ones(2)}
    scanned = {"dec": {"layers": {"w": np.stack([a0, a1])}}, "emb": np.ones(2)}
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    params, _, report = _fit(unrolled, zeros(scanned))
    np.testing.assert_array_equal(params["dec"]["layers"]["w"], scanned["dec"]["layers"]["w"])
    assert report.loaded == ["dec/layers/w", "emb"] and not report.ignored
    params, _, _ = _fit(scanned, zeros(unrolled))
    assert _flat(params).keys() == _flat(unrolled).keys()
    for k, v in _flat(unrolled).items():
        np.testing.assert_array_equal(_flat(params)[k], v, err_msg=k)
    deeper = {"dec": {"layers": {"w": jnp.zeros((3, 3))}}, "emb": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"dec/layers/w: source \(2, 3\) vs model \(3, 3\)"):
        _fit(unrolled, deeper)


@pytest.mark.parametrize("keys,message", [
    ({"step": "bets"}, "init_from.step='bets' must be 'best', 'latest' or an integer step"),
    ({"step": "-3"}, "init_from.step='-3' must be"),
    ({"workdir": "/nonexistent"},
     "init_from.workdir='/nonexistent': /nonexistent/checkpoints is not a directory"),
    ({"include": ("",)}, "init_from.include=('',) must be a tuple of non-empty patterns"),
    ({"workdir": "", "allow_new": ("head/*",)},
     "init_from.allow_new=('head/*',) has no effect without init_from.workdir"),
])
def test_bad_sections_are_refused_naming_the_key(keys, message):
    c = gpt.get_config("tiny")
    c.init_from.update(keys)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(c)


def test_init_from_alone_is_allowed_with_tasks_that_have_their_own_train_step(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    c = gan.get_config("tiny")
    c.init_from.workdir, c.init_from.allow_new = str(tmp_path), ("discriminator",)
    config_lib.validate(c)


# ---- a trained source ------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(workdir, summary, validation loss by step, params of step 6) of a 6-step tiny GPT
    with checkpoints at 2, 4, 6; its config ranks the *highest* validation loss best, so
    that "best" and "latest" name different checkpoints."""
    workdir = str(tmp_path_factory.mktemp("source"))
    c = gpt.get_config("tiny")
    c.train.update(num_steps=6, log_every=2, eval_every=2)
    c.checkpoint.update(every=2, keep=2, best_mode="max")
    c.evals.sample.every = -1
    summary = trainer.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f)
                  if r["split"] == "validation"}
    return workdir, summary, losses, init_from.load_variables(workdir, "latest")[0]


def _model(vocab_size=VOCAB, abstract=False, **model):
    """(module, fresh params, tokens [2, 16]) of the tiny GPT with `model` overrides;
    abstract: ShapeDtypeStruct params (enough where every parameter is loaded)."""
    c = gpt.get_config("tiny")
    c.model.update(model)
    m, _ = families.build(c.model, "lm", vocab_size=vocab_size)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 4, VOCAB)
    init = jax.eval_shape if abstract else lambda f, *a: jax.jit(f)(*a)
    params = flax_meta.unbox(init(m.init, jax.random.key(0), tokens))["params"]
    return m, params, tokens


def test_step_selects_best_latest_or_a_number(source):
    workdir, _, losses, _ = source
    assert init_from.load_variables(workdir, "latest")[2] == 6
    assert init_from.load_variables(workdir, "4")[2] == 4
    best = init_from.load_variables(workdir, "best")[2]
    assert best == max(losses, key=losses.get) and best != 6
    four, six = (_flat(init_from.load_variables(workdir, s)[0]) for s in ("4", "6"))
    assert any((four[k] != six[k]).any() for k in four)
    with pytest.raises(ValueError, match=r"init_from.step='3': .* no checkpoint at step 3; "
                                         r"its steps: \[.*4, 6\]"):
        init_from.load_variables(workdir, "3")


def test_a_new_head_and_vocabulary_start_fresh_only_where_allowed(source):
    workdir = source[0]
    _, fresh, _ = _model(vocab_size=300, tie_embeddings=False)
    with pytest.raises(ValueError) as e:
        init_from.load_into(_section(workdir, step="latest"), fresh, {})
    assert (f"init_from: 2 parameters of this model do not fit {workdir} step 6: "
            "embed/tokens/embedding: source (260, 32) vs model (300, 32); "
            "unembed/logits/kernel: absent from the source; allow them") in str(e.value)
    c = _section(workdir, step="latest", allow_new=("embed/tokens", "unembed/*"))
    params, _ = init_from.load_into(c, fresh, {})
    src, got, new = (_flat(t) for t in (source[3], params, fresh))
    renewed = {"embed/tokens/embedding", "unembed/logits/kernel"}
    assert set(got) == set(src) | {"unembed/logits/kernel"}
    for k in got:
        np.testing.assert_array_equal(got[k], new[k] if k in renewed else src[k], err_msg=k)


def test_the_scanned_form_gives_the_same_logits(source):
    workdir = source[0]
    c = _section(workdir, step="latest")
    unrolled_model, unrolled_fresh, tokens = _model(abstract=True)
    src = source[3]
    scanned_model, fresh, _ = _model(scan_layers=True, abstract=True)
    scanned, _ = init_from.load_into(c, fresh, {})
    assert "layers" in scanned["decoder"] and "layers_0" not in scanned["decoder"]
    np.testing.assert_allclose(jax.jit(scanned_model.apply)({"params": scanned}, tokens),
                               jax.jit(unrolled_model.apply)({"params": src}, tokens),
                               rtol=1e-5, atol=1e-5)
    back, _, _ = init_from.fit(scanned, {}, unrolled_fresh, {}, c)   # and back, exactly
    for k, v in _flat(src).items():
        np.testing.assert_array_equal(_flat(back)[k], v, err_msg=k)


# ---- through the trainer -----------------------------------------------------------------
def _run_config(workdir, **model):
    c = gpt.get_config("tiny")
    c.model.update(model)
    c.train.num_steps = 0   # evaluate the loaded params
    c.evals.sample.every = -1
    c.init_from.update(workdir=workdir, step="latest")
    return c


def test_an_evaluate_only_scanned_run_reproduces_the_source(tmp_path, source):
    summary = trainer.train_and_evaluate(_run_config(source[0], scan_layers=True),
                                         str(tmp_path))
    for key in ("validation/loss", "test/loss"):
        assert summary[key] == pytest.approx(source[1][key], rel=1e-5), key


def test_trainer_loads_a_new_head_once_and_not_on_resume(tmp_path, source, monkeypatch,
                                                         caplog):
    c = _run_config(source[0], tie_embeddings=False)
    with pytest.raises(ValueError, match="unembed/logits/kernel: absent from the source"):
        trainer.train_and_evaluate(c, str(tmp_path / "refused"))
    c.init_from.allow_new = ("unembed/*",)
    caplog.set_level(logging.INFO, logger="absl")
    workdir = str(tmp_path / "run")
    first = trainer.train_and_evaluate(c, workdir)
    assert f"init_from: loaded 36 of 37 parameters from {source[0]} step 6" in caplog.text
    assert "init_from: kept fresh (allow_new): unembed/logits/kernel" in caplog.text
    from train import checkpoint as ckpt_lib
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1) as ckpt:
        saved = _flat(ckpt.restore_raw(0)["params"])
    src = _flat(source[3])
    assert set(saved) == set(src) | {"unembed/logits/kernel"}
    for k, v in src.items():
        np.testing.assert_array_equal(saved[k], v, err_msg=k)

    def no_second_load(*args, **kwargs):
        raise AssertionError("init_from applied to a resumed run")
    monkeypatch.setattr(init_from, "load_variables", no_second_load)
    again = trainer.train_and_evaluate(c, workdir)   # resumes from its own step 0
    assert again["validation/loss"] == first["validation/loss"]


def test_a_seed_field_in_the_workdir_names_the_base_of_the_runs_own_seed(tmp_path, source):
    """init_from.workdir=".../seed={seed}": each seed of a --seeds sweep starts from the
    base run of its own seed (config.with_seed_in_paths), recorded resolved."""
    bases = tmp_path / "bases"
    bases.mkdir()
    os.symlink(source[0], bases / "seed=3")
    c = _run_config(str(bases / "seed={seed}"))
    c.seed = 3
    workdir = tmp_path / "run"
    summary = trainer.train_and_evaluate(c, str(workdir))
    assert summary["validation/loss"] == pytest.approx(source[1]["validation/loss"],
                                                       rel=1e-6)
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["init_from"]["workdir"] == str(bases / "seed=3")
    assert c.init_from.workdir.endswith("seed={seed}")   # the caller's config is untouched
    config_lib.validate(c)                                 # checked as the run reads it
    c.seed = 4
    with pytest.raises(ValueError, match=re.escape(str(bases / "seed=4"))):
        trainer.train_and_evaluate(c, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    c.distill.teacher = "runs/seeds/teacher/seed={seed}"
    resolved = config_lib.with_seed_in_paths(c)
    assert resolved.init_from.workdir == str(bases / "seed=4")
    assert resolved.distill.teacher == "runs/seeds/teacher/seed=4"
    c.distill.teacher = ""
    c.init_from.workdir = "runs/gpt"
    assert config_lib.with_seed_in_paths(c) is c          # nothing to replace: no copy


def test_a_seeds_sweep_over_seeded_bases_runs_and_reads_back(tmp_path, source, monkeypatch):
    """--seeds=2 with init_from.workdir=".../seed={seed}": each run evaluates its own
    seed's base; a second invocation reads the finished runs back (their recorded config
    holds the resolved path) instead of refusing them as another config's."""
    from train import sweep  # noqa: PLC0415

    bases = tmp_path / "bases"
    bases.mkdir()
    for seed in (0, 1):
        os.symlink(source[0], bases / f"seed={seed}")
    monkeypatch.setattr(sweep, "plot_results", lambda *a, **k: None)
    c = _run_config(str(bases / "seed={seed}"))
    workdir = str(tmp_path / "sweep")
    for _ in range(2):
        records = sweep.run_sweep(c, sweep.parse_sweep("", c), workdir, seeds=2)
        assert [r["status"] for r in records] == ["finished", "finished"]
    for seed, r in enumerate(records):
        recorded = json.loads((tmp_path / "sweep" / f"seed={seed}" / "config.json").read_text())
        assert recorded["init_from"]["workdir"] == str(bases / f"seed={seed}")
        assert r["metrics"]["validation/loss"] == pytest.approx(
            source[1]["validation/loss"], rel=1e-6)
