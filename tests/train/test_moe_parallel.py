"""Expert parallelism: a MoE decoder's loss and gradients on an 8-device mesh (expert=4 x
data=2: each device holds 2 of the 8 experts, token slots exchanged by all-to-all) equal
one device's, and with a tensor-parallel `model` axis beside it (expert=4 x model=2); the
expert kernels are split over the "expert" axis."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from models import transformer
from train import sharding
from train.tasks import moe_objective


def _loss_and_grads(model, params, tokens):
    def loss(p):
        logits, sown = model.apply({"params": p}, tokens[:, :-1], mutable=[transformer.MOE_STATS])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        aux, _ = moe_objective.objective(sown[transformer.MOE_STATS], model.cfg.moe)
        return nll + aux
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("dispatch,mesh_axes", [
    ("dense", {"data": 2, "expert": 4}), ("sorted", {"data": 1, "expert": 4, "model": 2})])
def test_expert_parallel_equals_one_device(dispatch, mesh_axes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    cfg = transformer.make_config("tiny", vocab_size=40, max_length=16, num_layers=2,
                                  moe={"every": 1, "num_experts": 8, "top_k": 2,
                                       "capacity_factor": 1.0, "dispatch": dispatch})
    model = transformer.Decoder(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (8, 13)))
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1])["params"]
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"])
    want_loss, want_grads = jax.jit(lambda p, t: _loss_and_grads(model, p, t))(params, tokens)

    cfg_sh = ml_collections.ConfigDict(sharding.default_config())
    cfg_sh.update(**mesh_axes)
    mesh = sharding.mesh_from_config(cfg_sh)
    assert dict(mesh.shape) == {"fsdp": 1, **mesh_axes}
    p_sh = sharding.state_sharding(jax.eval_shape(lambda: params), mesh, cfg_sh, boxed)
    kernel = p_sh["decoder"]["layers_0"]["moe"]["fc1"]["kernel"]
    # (expert, embed, mlp): experts over "expert", with a model axis the MLP units too
    # (the all-to-all's shard_map gathers them over "model" inside).
    assert kernel.spec == jax.sharding.PartitionSpec(
        "expert", None, "model" if "model" in mesh_axes else None)
    step = jax.jit(lambda p, t: _loss_and_grads(model, p, t),
                   in_shardings=(p_sh, sharding.batch_sharding(mesh)))
    with sharding.use_rules(mesh, cfg_sh):
        placed = jax.device_put(params, p_sh)
        batch = sharding.shard_batch(np.asarray(tokens), mesh)
        assert "all-to-all" in step.lower(placed, batch).compile().as_text()
        loss, grads = step(placed, batch)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-6), grads, want_grads)


def test_experts_must_split_over_the_expert_axis():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    cfg = transformer.make_config("tiny", vocab_size=40, max_length=16, num_layers=1,
                                  moe={"every": 1, "num_experts": 6})
    model = transformer.Decoder(cfg)
    tokens = jnp.zeros((8, 8), jnp.int32)
    cfg_sh = ml_collections.ConfigDict(sharding.default_config())
    cfg_sh.update(data=2, expert=4)
    mesh = sharding.mesh_from_config(cfg_sh)
    with sharding.use_rules(mesh, cfg_sh), pytest.raises(
            ValueError, match="num_experts=6 does not split over the 4 devices"):
        jax.jit(model.init)(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="sharding.expert=3 must be >= 1 and divide"):
        sharding.make_mesh(expert=3)


def test_moe_run_logs_the_routing_and_plots_it(tmp_path):
    """configs/gpt.py:moe_tiny for 4 steps, expert-parallel over 4 devices: the objective
    is the cross-entropy plus the weighted balancing and z losses, the per-expert loads
    are logged, and expert_load writes its picture and the worst layer's balance."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from configs import gpt  # noqa: PLC0415
    from train import trainer  # noqa: PLC0415

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = gpt.get_config("moe_tiny")
    c.train.update(num_steps=4, eval_every=4, log_every=2)
    c.evals.sample.every = -1
    c.sharding.expert = 4
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"][-1]
    loads = [v for k, v in train.items() if k.startswith("moe_load/decoder/layers_1/")]
    assert len(loads) == 4 and abs(sum(loads) - 1.0) < 1e-5
    moe = c.model.moe
    # one MoE layer of the two: its losses are the logged means
    extra = moe.switch_weight * train["moe_switch_loss"] + moe.z_weight * train["moe_z_loss"]
    assert train["objective"] == pytest.approx(train["loss"] + extra, rel=1e-5)
    assert summary["expert_load/layers"] == 1 and summary["expert_load/max_over_min"] >= 1
    assert os.path.exists(tmp_path / "expert_load.png")


def test_a_task_that_cannot_add_the_balancing_losses_refuses_a_moe_model():
    from train.tasks import TASKS  # noqa: PLC0415

    cfg = transformer.make_config("tiny", vocab_size=40, max_length=16, num_classes=3,
                                  moe={"every": 1, "num_experts": 2})
    with pytest.raises(ValueError, match="task 'classify' does not add a mixture of experts' "
                                         "balancing losses; allowed .* tasks lm, mlm, seq2seq"):
        TASKS["classify"](ml_collections.ConfigDict(), transformer.Encoder(cfg, head="cls"), {})


def test_expert_load_reads_the_logged_loads_and_floors_an_idle_expert():
    from train.evaluators import experts  # noqa: PLC0415

    record = {"step": 4, "split": "validation", "loss": 1.0,
              "moe_load/decoder/layers_1/expert_1": 0.3,
              "moe_load/decoder/layers_1/expert_0": 0.5,
              "moe_load/decoder/layers_1/expert_2": 0.2,
              "moe_load/decoder/layers_3/expert_0": 1.0,
              "moe_load/decoder/layers_3/expert_1": 0.0}
    loads = experts.loads(record)
    assert list(loads) == ["decoder/layers_1", "decoder/layers_3"]
    np.testing.assert_array_equal(loads["decoder/layers_1"], [0.5, 0.3, 0.2])  # by index
    even = experts.balance(loads["decoder/layers_1"])
    assert even["max_over_min"] == pytest.approx(2.5) and even["idle_experts"] == 0
    assert even["cv"] == pytest.approx(np.std([0.5, 0.3, 0.2]) / (1 / 3))
    idle = experts.balance(loads["decoder/layers_3"])
    assert idle == {"max_over_min": pytest.approx(1e4), "cv": pytest.approx(1.0),
                    "idle_experts": 1.0}
