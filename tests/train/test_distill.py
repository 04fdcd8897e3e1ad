"""config.distill: a frozen teacher inside the jitted step. The objective is the hard loss
plus the weighted KD term; the teacher gets no gradient and never changes; a distilled run
resumed mid-way equals an uninterrupted one; the affinity loss on 8 devices equals one
device; bad teachers are one error line."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import gpt
from train import errors, init_from, main, trainer
from train.tasks import distill_losses

STEPS = 4


def tiny_lm(num_steps=STEPS, **model):
    c = gpt.get_config("tiny")
    c.train.update(num_steps=num_steps, eval_every=num_steps, log_every=1)
    c.checkpoint.every = 2
    c.evals.sample.every = -1
    c.model.update(model)
    return c


@pytest.fixture(scope="module")
def teacher(tiny_lm_workdir):
    return tiny_lm_workdir


def student(teacher_dir, **distill):
    c = tiny_lm(num_layers=1)
    c.distill.update({"teacher": teacher_dir, "temperature": 2.0, "kd_weight": 0.5,
                      **distill})
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def checkpoint_bytes(workdir):
    out = {}
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.join(root, name)] = f.read()
    return out


def qat_student(teacher_dir):
    """Distillation composed with quantization-aware training (int8 fake-quant)."""
    c = student(teacher_dir)
    c.compress.quantize.mode = "qat"
    return c


def test_objective_is_hard_plus_weighted_kd_and_the_teacher_untouched(tmp_path, teacher):
    """With QAT in the same run: the distilled loss sees the fake-quantized student."""
    before = checkpoint_bytes(teacher)
    whole = str(tmp_path / "whole")
    summary = trainer.train_and_evaluate(qat_student(teacher), whole)
    train_lines = [m for m in read_metrics(whole) if m["split"] == "train"]
    assert len(train_lines) == STEPS
    for m in train_lines:  # objective = hard loss + 0.5 * T^2 KL (no smoothing, no L2)
        assert abs(m["objective"] - (m["loss"] + 0.5 * m["distill_kd"])) < 1e-5
        assert m["distill_kd"] > 0
    assert "validation/distill_kd" not in summary  # evaluation: the task's own metrics
    assert "compressed/validation/loss" in summary  # and the int8 export is evaluated
    assert checkpoint_bytes(teacher) == before     # the teacher is never written

    # Resuming a distilled run bit-exactly: the multi-stage test below (every stage is a
    # distilled run, one of them killed mid-way).


def test_the_teacher_gets_no_gradient(teacher):
    from train import distill, families, run_data  # noqa: PLC0415
    from train.tasks import TASKS  # noqa: PLC0415

    config = student(teacher)
    data = run_data.RunData(config.data, config.seed)
    model, _ = families.build(config.model, "lm", **data.info)
    d = distill.Distillation(config, data)
    task = d.wrap_task(TASKS["lm"](config, model, data))
    batch = jax.tree.map(lambda x: x[:4], data.train.batch(0))
    params = model.init(jax.random.key(0), batch["tokens"][:, :-1])["params"]
    frozen = jax.tree.map(jnp.asarray, d.frozen())

    def loss_of(p, f):
        return task.loss_fn(p, {}, batch, jax.random.key(1), True, frozen=f)[0]

    g_student, g_teacher = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(params, frozen)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(g_teacher))
    assert any(np.asarray(g).any() for g in jax.tree.leaves(g_student))
    evaluate = jax.jit(lambda p, f: (task.loss_fn(p, {}, batch, jax.random.key(1), False,
                                                  frozen=f)[0],
                                     task.inner.loss_fn(p, {}, batch, jax.random.key(1),
                                                        False)[0]))
    distilled, plain = evaluate(params, frozen)  # evaluation: the task's own loss
    assert float(distilled) == float(plain)


def test_affinity_loss_on_8_devices_equals_one_device():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    si, st, ti, tt = (unit(rng.normal(size=(16, d)).astype(np.float32)) for d in (6, 6, 9, 9))
    w = np.ones(16, np.float32)
    w[-3:] = 0.0
    f = jax.jit(lambda *a: distill_losses.affinity_loss(a[0], a[1], 10.0, a[2], a[3], 20.0,
                                                        a[4])[0])
    one = float(f(si, st, ti, tt, w))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, rows) for x in (si, st, ti, tt, w)]
    assert float(f(*sharded)) == pytest.approx(one, rel=1e-6)


def test_bad_teachers_are_one_line(tmp_path, teacher, capsys):
    config_file = os.path.join(os.path.dirname(gpt.__file__), "gpt.py")
    clip_file = os.path.join(os.path.dirname(gpt.__file__), "clip.py")
    runs = [[f"--config={config_file}:tiny", f"--config.distill.teacher={tmp_path}/none"],
            [f"--config={clip_file}:tiny", f"--config.distill.teacher={teacher}"],
            [f"--config={config_file}:tiny", f"--config.distill.teacher={teacher}",
             "--config.distill.temperature=0"]]
    for args in runs:
        assert main.run(["main", *args, f"--workdir={tmp_path}/run"]) == errors.EXIT_CONFIG
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flaxlab:")]
    assert len(lines) == 3 and "config.json does not exist" in lines[0]
    assert "is a 'lm' run; this run's task is 'contrastive'" in lines[1]
    assert "distill.temperature=0" in lines[2]
    assert not os.path.exists(tmp_path / "run")


def test_init_from_inherit_starts_a_smaller_student_from_its_teacher(teacher):
    """--config.init_from.inherit: the teacher's params shrunk to the student's sizes (its
    kept layers, heads, units and channels) are the student's start."""
    from flax import linen as nn  # noqa: PLC0415

    from models import transformer  # noqa: PLC0415
    from models.compress import inherit  # noqa: PLC0415

    c = student(teacher)
    c.model.update(num_heads=1, head_dim=16, mlp_dim=40, d_model=24)
    c.init_from.update(workdir=teacher, inherit="uniform")
    cfg = transformer.make_config(c.model.variant, **{
        k: c.model[k] for k in ("num_layers", "num_heads", "head_dim", "mlp_dim", "d_model",
                                "max_length")}, vocab_size=260)
    fresh = nn.unbox(jax.jit(transformer.Decoder(cfg).init)(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params, _ = init_from.load_into(c.init_from, fresh, {})
    want = inherit.shrink_to(init_from.load_variables(teacher)[0], jax.device_get(fresh))
    jax.tree.map(np.testing.assert_array_equal, params, want)
    c.init_from.inherit = "biggest"
    with pytest.raises(ValueError, match="init_from.inherit='biggest'; allowed: '' \\(off\\), "
                                         "first, last, uniform, importance"):
        init_from.validate(c.init_from)


def staged(teacher_dir):
    """2 stages of 2 steps: 2 layers of width 24, then the 1-layer student of width 16."""
    c = student(teacher_dir)
    c.model.update(num_heads=1, head_dim=16, mlp_dim=32, d_model=16)
    c.distill.stages = ("model.num_layers=2;model.d_model=24;model.mlp_dim=48",)
    c.evals.sample.every = -1  # nothing here reads a sample
    return c


def test_multi_stage_run_killed_mid_stage_resumes_bit_exactly(tmp_path, teacher):
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    summary = trainer.train_and_evaluate(staged(teacher), whole)
    assert "stage_0/validation/loss" in summary and "validation/loss" in summary
    with open(os.path.join(whole, "stage_1", "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["init_from"]["workdir"] == os.path.join(whole, "stage_0")
    assert saved["init_from"]["inherit"] == "uniform" and saved["train"]["num_steps"] == 2
    assert saved["distill"]["teacher"] == teacher
    # A finished stage is skipped: the resumed run starts with whole's stage 0 in place.
    shutil.copytree(os.path.join(whole, "stage_0"), os.path.join(resumed, "stage_0"))
    stopped = trainer.train_and_evaluate(staged(teacher), resumed, stop_after_steps=1)
    assert stopped["status"] == "stopped" and stopped["stage"] == 1
    trainer.train_and_evaluate(staged(teacher), resumed)
    for name in ("stage_0", "stage_1"):
        for a, b in zip(jax.tree.leaves(init_from.load_variables(f"{whole}/{name}")[0]),
                        jax.tree.leaves(init_from.load_variables(f"{resumed}/{name}")[0]),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_cosine_term_compares_the_stacks_last_hidden_states(teacher):
    """distill.cosine_weight: the captured hidden states are the decoder stack's output,
    and the logged term is 1 - cos against the teacher's on every real token."""
    from train import distill, families, run_data  # noqa: PLC0415
    from train.tasks import TASKS  # noqa: PLC0415

    config = student(teacher, cosine_weight=1.0, kd_weight=0.0)
    config.model.num_layers = 2  # the teacher's own shape: start from its weights
    data = run_data.RunData(config.data, config.seed)
    model, _ = families.build(config.model, "lm", **data.info)
    task = distill.Distillation(config, data).wrap_task(TASKS["lm"](config, model, data))
    frozen = jax.tree.map(jnp.asarray, distill.Distillation(config, data).frozen())
    batch = jax.tree.map(lambda x: x[:4], data.train.batch(0))
    out, _ = task.inner.predict(frozen["params"], {}, batch, jax.random.key(0), False)
    assert out["hidden"].shape == (4, batch["tokens"].shape[1] - 1, config.model.d_model)
    # the last hidden state: the tied unembedding of it is the logits
    embedding = np.asarray(frozen["params"]["embed"]["tokens"]["embedding"])
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(out["hidden"]) @ embedding.T,
                               atol=1e-4)
    step = jax.jit(lambda p, f: task.loss_fn(p, {}, batch, jax.random.key(0), True,
                                             frozen=f)[1][0])
    metrics = step(frozen["params"], frozen)   # the student is the teacher: cosine 1
    total, weight = metrics["distill_cosine"]
    assert float(weight) == out["hidden"].shape[0] * out["hidden"].shape[1]
    assert abs(float(total) / float(weight)) < 1e-5


def test_gates_reach_the_target_sparsity_and_a_student_inherits_by_them(tmp_path, teacher):
    """Automatic inheritance: L0 gates (layers, heads, units, channels) on the
    teacher-size model, trained with the
    distillation loss under the augmented Lagrangian, end within 1% of the target
    expected sparsity; a smaller student then inherits the units the gates kept."""
    from flax import linen as nn  # noqa: PLC0415

    from models import transformer  # noqa: PLC0415
    from models.compress import inherit  # noqa: PLC0415
    from models.layers import gates  # noqa: PLC0415

    c = tiny_lm(num_steps=100)
    c.train.update(log_every=10, eval_every=100)
    c.checkpoint.every = 100
    c.model.update(unit_gates=True, channel_gates=True)   # every gate kind
    c.init_from.workdir = teacher
    c.distill.update(teacher=teacher, gate_target=0.5, gate_warmup_steps=50)
    gated = str(tmp_path / "gated")
    trainer.train_and_evaluate(c, gated)
    last = [m for m in read_metrics(gated) if m["split"] == "train"][-1]
    assert last["step"] == 100 and abs(last["gate_sparsity"] - 0.5) < 0.01
    assert last["gate_target"] == pytest.approx(0.5)

    params = init_from.load_variables(gated)[0]
    layer = params["decoder"]["layers_1"]
    cfg = transformer.make_config("tiny", vocab_size=260, max_length=c.model.max_length,
                                  num_heads=1, head_dim=16, mlp_dim=32)
    fresh = nn.unbox(jax.jit(transformer.Decoder(cfg).init)(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    c.init_from.update(workdir=gated, inherit="importance")
    student_params, _ = init_from.load_into(c.init_from, fresh, {})
    opened = np.asarray(gates.prob_open(layer["self_attention"]["head_gate"][gates.PARAM]))
    best = int(np.argmax(opened))    # the kept head of layer 1 is its most open one
    z = np.asarray(gates.deterministic_gate(layer["self_attention"]["head_gate"][gates.PARAM]))
    z_layer = np.asarray(gates.deterministic_gate(    # the layer's whole-attention gate
        layer["attention_sublayer"]["layer_gate"][gates.PARAM]))[0]
    z_channels = np.asarray(gates.deterministic_gate(  # and the residual channels' gates
        params["decoder"][transformer.CHANNEL_GATE][gates.PARAM]))
    np.testing.assert_allclose(
        student_params["decoder"]["layers_1"]["self_attention"]["out"]["kernel"][0],
        np.asarray(layer["self_attention"]["out"]["kernel"][best]) * z[best] * z_layer
        * z_channels, rtol=1e-6)
    assert inherit.count_params(student_params) == inherit.count_params(fresh)


def test_hidden_mse_through_the_hint_regressor_to_a_wider_teacher(teacher):
    """distill.hidden_weight with model.hint_dim: the student's (24 wide) last hidden
    states through its learned regressor against the teacher's (32 wide); the regressor
    gets gradients from that term, the MSE equals NumPy's."""
    from flax import linen as nn  # noqa: PLC0415

    from train import distill, families, run_data  # noqa: PLC0415
    from train.tasks import TASKS  # noqa: PLC0415

    config = student(teacher, hidden_weight=1.0, kd_weight=0.0, hard_weight=0.0)
    config.model.update(num_heads=1, head_dim=16, d_model=24, mlp_dim=40, hint_dim=32)
    data = run_data.RunData(config.data, config.seed)
    model, _ = families.build(config.model, "lm", **data.info)
    d = distill.Distillation(config, data)
    task = d.wrap_task(TASKS["lm"](config, model, data))
    frozen = jax.tree.map(jnp.asarray, d.frozen())
    batch = jax.tree.map(lambda x: x[:4], data.train.batch(0))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["tokens"][:, :-1])[
        "params"])
    rng = jax.random.key(1)

    def loss_of(p):
        loss, (metrics, _) = task.loss_fn(p, {}, batch, rng, True, frozen=frozen)
        return loss, metrics
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
    assert np.asarray(grads["decoder"]["hint"]["kernel"]).any()
    student_out, _ = jax.jit(lambda p: task.inner.predict(p, {}, batch, rng, True))(params)
    teacher_out, _ = jax.jit(lambda f: task.teacher_task.predict(
        f["params"], {}, batch, rng, False))(frozen)
    hint = params["decoder"]["hint"]
    h = np.asarray(student_out["hidden"], np.float64) @ np.asarray(hint["kernel"]) + np.asarray(
        hint["bias"])
    want = np.mean((h - np.asarray(teacher_out["hidden"], np.float64)) ** 2)
    total, weight = metrics["distill_hidden"]
    assert float(total) / float(weight) == pytest.approx(want, rel=1e-4)
    assert float(loss) == pytest.approx(want, rel=1e-4)   # the only term on
