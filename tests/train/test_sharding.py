"""Mesh, batch and parameter sharding on the 8 virtual CPU devices from tests/conftest.py.

The central check: one MLP regression train step gives the same loss and updated
parameters on 1 device, 8-way data parallel, and a 2x4 data x fsdp mesh with FSDP.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from train import sharding

BATCH, IN, HIDDEN, OUT = 32, 16, 64, 4


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # [batch, IN] -> [batch, OUT]
        h = nn.relu(nn.Dense(HIDDEN)(x))  # Dense_0: kernel (IN, HIDDEN)
        return nn.Dense(OUT)(h)           # Dense_1: kernel (HIDDEN, OUT)


def host_batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, :OUT] * 2.0).astype(np.float32)}


def run_training(tx, mesh=None, strategy="replicate", steps=3):
    """Loss per step and final params; mesh=None runs plain jit on one device."""
    model = MLP()
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, IN)))  # noqa: E731

    def train_step(params, opt_state, batch):
        def loss_fn(p):
            return jnp.mean((model.apply(p, batch["x"]) - batch["y"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        params = jax.jit(init)()
        opt_state = tx.init(params)
        step, put = jax.jit(train_step), lambda b: b
    else:
        p_sh = sharding.param_sharding(jax.eval_shape(init), mesh, strategy,
                                       min_size_to_shard=256)
        o_sh = sharding.param_sharding(jax.eval_shape(tx.init, jax.eval_shape(init)), mesh,
                                       strategy, min_size_to_shard=256)
        params = jax.jit(init, out_shardings=p_sh)()
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        replicated = NamedSharding(mesh, P())
        step = jax.jit(train_step, in_shardings=(p_sh, o_sh, sharding.batch_sharding(mesh)),
                       out_shardings=(p_sh, o_sh, replicated))
        put = lambda b: sharding.shard_batch(b, mesh)  # noqa: E731
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, put(host_batch(i)))
        losses.append(float(loss))
    return np.array(losses), params


@pytest.mark.parametrize("tx", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_train_step_matches_across_meshes(tx):
    ref_losses, ref_params = run_training(tx)
    for mesh_shape, strategy in [((8, 1), "replicate"), ((2, 4), "fsdp")]:
        mesh = sharding.make_mesh(*mesh_shape)
        losses, params = run_training(tx, mesh, strategy)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
        for ref, got in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
        if strategy == "fsdp":  # the updated params stay FSDP-sharded
            kernel = params["params"]["Dense_0"]["kernel"]
            assert kernel.sharding.spec == P(None, "fsdp")
            assert {s.data.shape for s in kernel.addressable_shards} == {(IN, HIDDEN // 4)}
            assert params["params"]["Dense_1"]["kernel"].sharding.spec == P("fsdp", None)
            assert params["params"]["Dense_0"]["bias"].sharding.spec == P()  # 64 < 256


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(sharding.make_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    assert sharding.make_mesh(1, 1, devices=jax.devices()[:1]).size == 1
    with pytest.raises(ValueError, match=r"data=3 x fsdp=2 needs 6 devices, but 8"):
        sharding.make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match=r"8 devices are not divisible by 3"):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="At most one"):
        sharding.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="fsdp must be >= 1"):
        sharding.make_mesh(8, 0)


def test_shard_batch_splits_examples_over_all_devices():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    batch = sharding.shard_batch({"x": np.arange(16 * 3).reshape(16, 3)}, mesh)
    x = batch["x"]
    assert x.sharding == sharding.batch_sharding(mesh)
    assert x.sharding.spec == P(("data", "fsdp"))
    rows = sorted(int(s.data[0, 0]) // 3 for s in x.addressable_shards)
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14]  # 8 devices, 2 distinct examples each
    with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 batch shards"):
        sharding.shard_batch({"x": np.zeros((12, 3))}, mesh)


def test_model_axis_replicates_the_batch_within_a_group():
    mesh = sharding.make_mesh(data=2, fsdp=1, model=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
    assert dict(sharding.make_mesh(fsdp=2, expert=2, model=2).shape) == {
        "data": 1, "fsdp": 2, "expert": 2, "model": 2}
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_shards(mesh) == 2
    # One process holds every row; with 2 batch shards, 6 rows split 3 + 3.
    assert sharding.process_rows(mesh, 6) == slice(0, 6)
    x = sharding.shard_batch({"x": np.arange(6)}, mesh, 6)["x"]
    assert sorted(s.data.tolist() for s in x.addressable_shards) == (
        [[0, 1, 2]] * 4 + [[3, 4, 5]] * 4)
    with pytest.raises(ValueError, match="sharding.model=3 must be >= 1 and divide"):
        sharding.make_mesh(model=3)
    with pytest.raises(ValueError, match="expert=4 x sharding.model=4 must divide"):
        sharding.make_mesh(expert=4, model=4)
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by the 2 batch"):
        sharding.process_rows(mesh, 5)


def test_param_sharding_specs():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    params = {
        "embed": jax.ShapeDtypeStruct((1000, 64), jnp.float32),  # 1000 % 4 == 0 -> largest
        "kernel": jax.ShapeDtypeStruct((64, 512), jnp.float32),
        "odd": jax.ShapeDtypeStruct((63, 255), jnp.float32),     # nothing divisible by 4
        "square": jax.ShapeDtypeStruct((128, 128), jnp.float32),  # tie -> first axis
        "conv": jax.ShapeDtypeStruct((3, 3, 64, 130), jnp.float32),  # 130 % 4 != 0 -> 64
        "bias": jax.ShapeDtypeStruct((512,), jnp.float32),        # small -> replicated
        "count": jnp.zeros((), jnp.int32),                        # concrete arrays work too
    }
    specs = jax.tree.map(lambda s: s.spec,
                         sharding.param_sharding(params, mesh, "fsdp", min_size_to_shard=1024))
    assert specs == {"embed": P("fsdp", None), "kernel": P(None, "fsdp"), "odd": P(),
                     "square": P("fsdp", None), "conv": P(None, None, "fsdp", None),
                     "bias": P(), "count": P()}
    replicated = sharding.param_sharding(params, mesh, "replicate")
    assert all(s.spec == P() and s.mesh is mesh for s in jax.tree.leaves(replicated))
    fsdp_1 = sharding.param_sharding(params, sharding.make_mesh(), "fsdp", min_size_to_shard=1)
    assert all(s.spec == P() for s in jax.tree.leaves(fsdp_1))  # fsdp axis of size 1
    with pytest.raises(ValueError, match="strategy"):
        sharding.param_sharding(params, mesh, "zero3")


def test_config_validation():
    cfg = sharding.default_config()
    assert sharding.validate(cfg, global_batch_size=64, num_devices=8) == (8, 1)
    cfg.fsdp, cfg.strategy = 4, "fsdp"
    assert sharding.validate(cfg, 64, 8) == (2, 4)
    with pytest.raises(ValueError, match="data.batch_size=60 is not divisible by the 8 device groups"):
        sharding.validate(cfg, 60, 8)
    with pytest.raises(ValueError, match="needs 12 devices, but 8"):
        cfg.data = 3
        sharding.validate(cfg, 64, 8)
    cfg.data, cfg.fsdp, cfg.model = -1, 1, 4  # 2 groups of 4: the batch splits in two
    assert sharding.validate(cfg, 6, 8) == (2, 1)
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 device"):
        sharding.validate(cfg, 5, 8)
    cfg.model = 1
    cfg.data, cfg.strategy = -1, "tensor"
    with pytest.raises(ValueError, match="strategy"):
        sharding.validate(cfg, 64, 8)
