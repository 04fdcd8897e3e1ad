"""The trainer end to end on tiny configs: learning, the workdir contract, bit-exact resume,
preemption, the NaN guard, data parallel == one device, and config errors."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import gpt
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import trainer
from train.data import text as text_data
from train.errors import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEED_KEYS = ("train/steps_per_second", "train/examples_per_second")


def tiny_config(**train):
    c = gpt.get_config("tiny")
    for k, v in train.items():
        c.train[k] = v
    return c


def _final_params(workdir):
    """Params of the latest checkpoint, restored without knowing the model."""
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return step, restored["state"]["params"]


def _without_speed(summary):
    return {k: v for k, v in summary.items() if k not in SPEED_KEYS}


def test_loss_falls_below_unigram_baseline_and_workdir_contract(tmp_path):
    c = tiny_config(num_steps=150, log_every=25, eval_every=75)
    c.data.batch_size = 16
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    # The stated baseline: an add-one unigram model of the training bytes (~20 on this
    # 200 KB slice), p(v) = (count_train(v) + 1) / (n_train + V), float64 reference below.
    # 150 steps of a 26K-parameter GPT must beat it clearly.
    from train import data as data_lib
    train_ds, val_ds = (data_lib.make_dataset(c.data, split, c.seed)
                        for split in ("train", "validation"))
    counts = np.bincount(train_ds.tokens, minlength=train_ds.vocab_size).astype(np.float64)
    log_p = np.log((counts + 1) / (counts.sum() + train_ds.vocab_size))
    baseline = summary["baseline/unigram_perplexity"]
    assert baseline == pytest.approx(np.exp(-log_p[val_ds.tokens].mean()), rel=1e-12)
    assert summary["validation/perplexity"] < 0.75 * baseline
    assert summary["test/perplexity"] < 0.75 * baseline
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert [r["step"] for r in records if r["split"] == "train"] == [25, 50, 75, 100, 125, 150]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert {r["step"] for r in records if r["split"] == "validation"} == {75, 150}
    # The workdir contract.
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss_curve.png",
                 "sample.txt"):
        assert (tmp_path / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["params/count"] == 26496 and saved["params/bytes"] == 4 * 26496
    assert saved["train/steps"] == 150 and saved["train/steps_per_second"] > 0
    assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "tiny"
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [140, 150]


def test_resume_after_preemption_equals_uninterrupted_run(tmp_path, monkeypatch):
    c = tiny_config(num_steps=20, log_every=5, eval_every=10)
    full = trainer.train_and_evaluate(c, str(tmp_path / "full"))

    # SIGTERM arrives while step 7's batch is prepared: the trainer finishes that step,
    # saves step 8 and stops; the same call again resumes and finishes.
    original = text_data.LMDataset.batch

    def batch_with_preemption(self, step, rows=None):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, rows)

    monkeypatch.setattr(text_data.LMDataset, "batch", batch_with_preemption)
    first = trainer.train_and_evaluate(c, str(tmp_path / "resumed"))
    assert first == {"status": "preempted", "step": 8}
    assert _final_params(tmp_path / "resumed")[0] == 8
    monkeypatch.setattr(text_data.LMDataset, "batch", original)
    resumed = trainer.train_and_evaluate(c, str(tmp_path / "resumed"))

    assert _without_speed(resumed) == _without_speed(full)
    step_a, params_a = _final_params(tmp_path / "full")
    step_b, params_b = _final_params(tmp_path / "resumed")
    assert step_a == step_b == 20
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)  # to the bit


def test_stop_and_resume_with_different_config_is_refused(tmp_path):
    c = tiny_config(num_steps=10)
    assert trainer.train_and_evaluate(c, str(tmp_path), stop_after_steps=3)["step"] == 3
    before = (tmp_path / "config.json").read_bytes()
    c.optim.learning_rate = 1e-2
    with pytest.raises(WorkdirError, match="optim.learning_rate 0.003 -> 0.01"):
        trainer.train_and_evaluate(c, str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before  # the writer's config stays


def test_nan_stops_with_clear_error_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    make_optimizer = trainer.optim.make_optimizer

    def poisoned(optim_cfg, total_steps):  # the 13th update (step index 12) writes NaN
        def update(updates, state, params=None):
            nan = jnp.where(state.count >= 12, jnp.nan, 0.0)
            return jax.tree.map(lambda u: u + nan, updates), optax.ScaleByScheduleState(
                count=state.count + 1)
        inject = optax.GradientTransformation(
            lambda p: optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32)), update)
        return optax.chain(make_optimizer(optim_cfg, total_steps), inject)

    monkeypatch.setattr(trainer.optim, "make_optimizer", poisoned)
    c = tiny_config(num_steps=20, log_every=1, eval_every=100)
    c.checkpoint.every = 5
    with pytest.raises(trainer.NonFiniteLossError, match=r"NaN/Inf at step 13 .*step 10"):
        trainer.train_and_evaluate(c, str(tmp_path))
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [5, 10]
    _, params = _final_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """(summary, workdir) of the 6-step tiny run on one device."""
    one = tiny_config(num_steps=6, eval_every=100)
    one.sharding.num_devices = 1
    workdir = tmp_path_factory.mktemp("one_device") / "one"
    return trainer.train_and_evaluate(one, str(workdir)), workdir


@pytest.mark.parametrize("mesh", [dict(num_devices=8), dict(fsdp=2, model=2, strategy="fsdp",
                                                            min_size_to_shard=0)])
def test_data_fsdp_and_tensor_parallel_equal_one_device(tmp_path, mesh, one_device_run):
    """Through the trainer, with config.sharding's default logical-axis rules (the
    state's shardings from the params' logical names, activation constraints inside
    train.sharding.use_rules): the same run as one device, 8-way data parallel and on
    data 2 x fsdp 2 x model 2 (tensor parallel: a batch row on 2 devices)."""
    assert jax.device_count() == 8
    single, one_dir = one_device_run
    many = tiny_config(num_steps=6, eval_every=100)
    for k, v in mesh.items():
        many.sharding[k] = v
    sharded = trainer.train_and_evaluate(many, str(tmp_path / "many"))
    for key in ("validation/loss", "test/loss", "validation/accuracy"):
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_final_params(one_dir)[1]),
                    jax.tree.leaves(_final_params(tmp_path / "many")[1])):
        # Adam normalizes tiny gradients to ~lr-sized steps, so reduction-order rounding
        # can move a weight by a few 1e-5 after 6 steps of lr 3e-3; 1e-4 is 3% of a step.
        np.testing.assert_allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Config errors: each names the key and what is allowed.
# ----------------------------------------------------------------------------------------
def _unlocked_tiny():
    return gpt.get_config("tiny")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c.optim, "learing_rate", 0.1), "unknown config key 'optim.learing_rate'"),
    (lambda c: setattr(c.train, "num_steps", "10"), "num_steps"),  # ConfigDict's type check
    (lambda c: setattr(c.optim, "learning_rate", -0.1), "learning_rate"),
    (lambda c: setattr(c.data, "batch_size", 12), "data.batch_size=12 is not divisible by the 8"),
    (lambda c: setattr(c.model, "variant", "huge"), "unknown transformer variant 'huge'"),
    (lambda c: setattr(c.task, "name", "mlm"), "config key task.mask_probability is missing"),
    (lambda c: setattr(c.model, "family", "mlp"), "model.family='mlp' is unknown"),
    (lambda c: setattr(c.model, "family", "resnet"), "cannot be trained on task 'lm'"),
    (lambda c: setattr(c.model, "num_heads", 3), "divisible by model.num_heads"),
    (lambda c: setattr(c.train, "eval_every", 0), "train.eval_every=0 must be >= 1"),
    (lambda c: setattr(c.checkpoint, "best_metric", "loss"), "must name a validation metric"),
    (lambda c: setattr(c.sharding, "fsdp", 3), "fsdp=3"),
])
def test_validation_errors_name_the_key(mutate, message):
    c = _unlocked_tiny()
    with pytest.raises((ValueError, TypeError), match=message):
        mutate(c)
        config_lib.validate(c)


def test_unknown_variant_lists_the_allowed():
    with pytest.raises(ValueError, match="allowed: default, compress, distill, moe, moe_tiny, "
                                         "tiny, gpt2_small"):
        gpt.get_config("huge")


@pytest.mark.parametrize("flag,message", [
    ("--config.optim.learning_rate=-1", "optim.learning_rate"),
    ("--config.optim.learing_rate=1", "learing_rate"),
])
def test_command_line_rejects_bad_overrides_before_compiling(tmp_path, flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "--config=configs/gpt.py:tiny",
         f"--workdir={tmp_path}", flag], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_mock_tfds_source_runs_one_step_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = tiny_config(num_steps=1, log_every=1, eval_every=1)
    c.data.source = "tfds"
    c.data.tfds.update(tfds_name="lm1b", seq_len=8, max_bytes=0)
    c.data.tfds.tfds_splits.validation = "test"  # lm1b has no validation split
    c.model.max_length = 8
    c.evals.sample.tokens = 4
    c.evals.sample.prompt = ""
    with tfds.testing.mock_data(num_examples=64):
        summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["train/steps"] == 1 and np.isfinite(summary["validation/loss"])
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=1).latest_step() == 1


def test_early_stopping_stops_and_checkpoints(tmp_path):
    c = tiny_config(num_steps=20, eval_every=2, log_every=2)
    c.train.early_stopping.update(patience=2, min_delta=10.0)  # nothing improves by 10 nats
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    # evals at steps 2 (sets the best), 4 and 6 (no improvement): stop after step 6
    assert summary["train/stopped_early"] is True and summary["train/steps"] == 6
    assert _final_params(tmp_path)[0] == 6
    again = trainer.train_and_evaluate(c, str(tmp_path))  # a rerun does not train on
    assert again["train/steps"] == 6


def test_mixed_precision_keeps_float32_master_weights(tmp_path):
    c = tiny_config(num_steps=3, eval_every=100)
    c.model.dtype = "bfloat16"
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(summary["validation/loss"])
    assert summary["params/bytes"] == 4 * summary["params/count"]
    _, params = _final_params(tmp_path)
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_contrastive_task_loss_sees_the_global_batch_on_8_devices():
    """The task's loss_fn, jitted on a batch sharded 8 ways, equals one device's."""
    from configs import clip
    from train import data as data_lib, families, sharding
    from train.tasks import make_task
    c = clip.get_config("tiny")
    ds = data_lib.make_dataset(c.data, "validation", 0)
    model, _ = families.build(c.model, "contrastive", **ds.data_info())
    task = make_task(c, model, {"validation": ds})
    batch = next(ds.eval_batches(32))
    params = model.init(jax.random.key(0), batch["image"][:1], batch["caption"][:1])["params"]
    loss = jax.jit(lambda p, b: task.loss_fn(p, {}, b, jax.random.key(1), False)[0])
    single = loss(params, jax.tree.map(jnp.asarray, batch))
    mesh = sharding.make_mesh(data=8)
    sharded = loss(params, sharding.shard_batch(batch, mesh))
    assert jax.tree.leaves(sharding.shard_batch(batch, mesh))[0].sharding.num_devices == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_mock_tfds_images_train_a_classifier_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from configs import resnet
    c = resnet.get_config("tiny")
    c.train.num_steps = 2
    c.data.source = "tfds_images"
    c.data.tfds_images.update(tfds_name="mnist", label_key="label", image_size=16)
    c.data.tfds_images.tfds_splits.validation = "test"  # mnist has no validation split
    with tfds.testing.mock_data(num_examples=64):
        summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["train/steps"] == 2 and 0.0 <= summary["test/accuracy"] <= 1.0


def test_evaluate_only_run_of_a_warmup_config_is_valid(tmp_path):
    """0 steps (post-training compression of a trained run): the optimizer never steps,
    so a warm-up longer than the run is no error; its schedule is built for warmup + 1."""
    (tmp_path / "checkpoints").mkdir()
    c = gpt.get_config("default")
    assert c.optim.schedule.warmup_steps == 50
    c.train.num_steps = 0
    c.init_from.workdir = str(tmp_path)
    c.compress.quantize.mode = "ptq"
    config_lib.validate(c)
    assert trainer.optim.schedule_steps(c.optim, 0) == 51
    assert trainer.optim.schedule_steps(c.optim, 600) == 600
