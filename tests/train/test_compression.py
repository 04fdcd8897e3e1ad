"""config.compress end to end: PTQ of a trained run, QAT, pruning (one-shot, N:M, gradual),
LoRA / QLoRA, activation quantization -- each through train.trainer on the tiny GPT."""
import json
import os

import jax
import numpy as np
import pytest

from configs import gpt
from models.compress import common, prune, quantize
from train import config as config_lib, init_from, trainer


def _config(source=None, **compress):
    c = gpt.get_config("tiny")
    c.train.num_steps = 2
    c.init_from.workdir = source or ""
    for key, value in compress.items():
        section, name = key.split("__") if "__" in key else (None, key)
        (c.compress[section] if section else c.compress)[name] = value
    return c


@pytest.fixture(scope="module")
def source_run(tiny_lm_workdir):
    """A trained float run to compress (the session's 4-step tiny GPT): (workdir,
    summary)."""
    with open(os.path.join(tiny_lm_workdir, "summary.json"), encoding="utf-8") as f:
        return tiny_lm_workdir, json.load(f)


def _run(tmp_path, source, num_steps=2, name="run", **compress):
    c = _config(source[0], **compress)
    c.train.num_steps = num_steps
    workdir = str(tmp_path / name)
    return workdir, trainer.train_and_evaluate(c, workdir)


def _kernels(params):
    return {k: np.asarray(v) for k, v in
            ((common.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params))
            if k.endswith("/kernel")}


def test_ptq_of_a_trained_run_evaluates_the_integer_form(tmp_path, source_run):
    _, s = _run(tmp_path, source_run, num_steps=0, quantize__mode="ptq")
    params, _, _ = init_from.load_variables(source_run[0])
    # Zero steps: the float metrics are the source run's own, to the bit.
    assert s["validation/loss"] == source_run[1]["validation/loss"]
    assert s["compressed/bytes"] == quantize.tree_nbytes(quantize.quantize_tree(params))
    assert s["compressed/float_bytes"] == quantize.tree_nbytes(params)
    assert s["compressed/fraction_of_float"] == pytest.approx(
        s["compressed/bytes"] / s["compressed/float_bytes"])
    assert s["compressed/validation/loss"] == pytest.approx(s["validation/loss"], rel=1e-2)


def test_qat_export_equals_the_fake_quantized_training_forward(tmp_path, source_run):
    _, s = _run(tmp_path, source_run, quantize__mode="qat", quantize__bits=4)
    # The training forward (fake quant) and the exported integers give the same model.
    assert s["compressed/validation/loss"] == pytest.approx(s["validation/loss"], rel=1e-5)
    assert s["compressed/test/loss"] == pytest.approx(s["test/loss"], rel=1e-5)
    # Stored bytes depend on the shapes only: the source run's tree at 4 bits.
    params, _, _ = init_from.load_variables(source_run[0])
    int4 = quantize.tree_nbytes(quantize.quantize_tree(params, bits=4))
    assert s["compressed/bytes"] == int4
    assert s["compressed/fraction_of_float"] == int4 / quantize.tree_nbytes(params)


def test_activation_quantization_dynamic_and_static(tmp_path, source_run):
    _, dyn = _run(tmp_path, source_run, num_steps=0, name="dyn", quantize__mode="ptq",
                  quantize__activations="dynamic")
    _, sta = _run(tmp_path, source_run, num_steps=0, name="static", quantize__mode="ptq",
                  quantize__activations="static", quantize__calibration_batches=2)
    for s in (dyn, sta):
        assert s["compressed/validation/loss"] == pytest.approx(s["validation/loss"], rel=0.05)
        assert s["compressed/validation/loss"] != s["validation/loss"]  # integers were used


@pytest.mark.parametrize("method", ["magnitude", "n_m"])
def test_pruned_fine_tuning_keeps_the_sparsity_exactly(tmp_path, source_run, method):
    workdir, s = _run(tmp_path, source_run, prune__method=method)
    assert s["compressed/sparsity"] == 0.5
    assert s["compressed/validation/loss"] == s["validation/loss"]
    params, _, _ = init_from.load_variables(workdir)
    for path, w in _kernels(params).items():
        if method == "magnitude":
            assert np.mean(w == 0) == 0.5, path
        else:  # 2 of every 4 consecutive weights along the input axis survive
            groups = np.moveaxis(w, prune.group_axis(path, w.shape), -1).reshape(-1, 4)
            assert np.all(np.count_nonzero(groups, axis=-1) <= 2), path
    assert s["compressed/bytes"] == prune.sparse_nbytes(
        prune.to_sparse(params, n_m=(2, 4) if method == "n_m" else None))


def test_structured_pruning_exports_and_evaluates_the_shrunken_model(tmp_path, source_run):
    """Heads pruning of the 2-head tiny GPT: the export is the 1-head model (weight
    inheritance's shrink_pruned), evaluated through itself, equal to the masked model."""
    workdir, s = _run(tmp_path, source_run, prune__method="heads", prune__sparsity=0.5,
                      prune__paths="self_attention")
    per_head = 4 * 32 * 16 + 3 * 16  # q, k, v, out kernels and q, k, v biases of one
    #                                  16-wide head of the 32-wide model, in each of 2 layers
    assert s["compressed/shrunken_params"] == s["params/count"] - 2 * per_head
    assert s["compressed/validation/loss"] == pytest.approx(s["validation/loss"], abs=1e-5)


def test_pruned_run_resumes_to_the_same_result(tmp_path, source_run):
    _, full = _run(tmp_path, source_run, num_steps=3, name="full", prune__method="magnitude")
    c = _config(source_run[0], prune__method="magnitude")
    c.train.num_steps = 3
    workdir = str(tmp_path / "resumed")
    assert trainer.train_and_evaluate(c, workdir, stop_after_steps=1)["status"] == "stopped"
    resumed = trainer.train_and_evaluate(c, workdir)
    assert resumed["compressed/validation/loss"] == full["compressed/validation/loss"]
    assert resumed["compressed/sparsity"] == 0.5


def test_gradual_pruning_reaches_the_final_sparsity(tmp_path, source_run):
    _, s = _run(tmp_path, source_run, num_steps=4, prune__method="magnitude",
                prune__gradual=True, prune__sparsity=0.75, prune__frequency=1,
                prune__end_step=2)
    assert s["compressed/sparsity"] == 0.75


def test_qlora_trains_adapters_on_a_frozen_quantized_base(tmp_path, source_run):
    workdir, s = _run(tmp_path, source_run, lora__rank=2, quantize__mode="ptq")
    assert s["compressed/validation/loss"] == pytest.approx(s["validation/loss"], rel=1e-5)
    from train import checkpoint as ckpt_lib
    with ckpt_lib.Checkpointer(f"{workdir}/checkpoints", save_every=1) as ckpt:
        state = ckpt.restore_raw()
    source, _, _ = init_from.load_variables(source_run[0])
    # Rank 2 on every kernel: 2 * (in_flat + out_flat) per matrix and stacked layer (Hu et
    # al. 2021: A [r, in], B [out, r]); stored = int8 base + float32 adapters.
    adapters = state["params"]["lora"]
    assert s["compressed/lora_params"] == sum(np.size(x) for x in jax.tree.leaves(adapters))

    def rank2_count(path, w):
        layout, size = common.kernel_layout(path, w.shape), lambda axes: int(
            np.prod([w.shape[a] for a in axes]))
        return size(layout.stack_axes) * 2 * (size(layout.in_axes) + size(layout.out_axes))
    assert s["compressed/lora_params"] == sum(
        rank2_count(path, w) for path, w in _kernels(source).items())
    stored = quantize.tree_nbytes(quantize.quantize_tree(source)) + 4 * s[
        "compressed/lora_params"]
    assert s["compressed/bytes"] == stored
    assert s["compressed/fraction_of_float"] == stored / quantize.tree_nbytes(source)
    for path, w in _kernels(state["params"]["base"]).items():   # the base never moved
        np.testing.assert_array_equal(w, _kernels(source)[path], err_msg=path)


def test_init_from_a_deeper_model_is_refused(tmp_path, source_run):
    c = _config(source_run[0])
    c.model.num_layers = 3  # decoder/layers_2 is not in the 2-layer source
    with pytest.raises(ValueError, match="do not fit .* decoder/layers_2/"):
        trainer.train_and_evaluate(c, str(tmp_path / "x"))


@pytest.mark.parametrize("change,message", [
    ({"quantize__mode": "int3"}, "compress.quantize.mode='int3'; allowed: none, ptq"),
    ({"quantize__bits": 9}, "compress.quantize.bits=9; allowed: 2..8"),
    ({"lora__rank": 2, "prune__method": "magnitude"}, "not supported"),
    ({"prune__gradual": True, "prune__method": "n_m"}, "compress.prune.gradual"),
])
def test_bad_compress_values_are_refused_before_anything_runs(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_lib.validate(_config(**change))


def test_zero_steps_needs_a_trained_run():
    c = _config()
    c.train.num_steps = 0
    with pytest.raises(ValueError, match="init_from.workdir"):
        config_lib.validate(c)
