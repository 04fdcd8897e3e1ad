"""Sharding by logical axis names on the 8 virtual CPU devices from tests/conftest.py.

The central checks: with the default rules, a few jitted Adam steps of a tiny GPT and of a
tiny ResNet (batch norm) give the same losses and parameters on one device, 8-way data
parallel, and a 2x4 data x fsdp mesh; the FSDP kernels are split as the rules say. And
tensor parallelism: the GPT default's model (configs/gpt.py) on a `model` axis of 2 and
of 4 (with data and with fsdp) trains as on one device, its kernels split Megatron style.
"""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import gpt
from models import cnn
from models import transformer as T
from models.layers import partitioning
from train import families, sharding

BATCH, LENGTH, VOCAB = 16, 8, 64
MESHES = [((8, 1), "replicate"), ((2, 4), "fsdp")]


def _config(mesh_shape, strategy, **overrides):
    cfg = sharding.default_config()
    cfg.data, cfg.fsdp = mesh_shape
    cfg.strategy, cfg.min_size_to_shard = strategy, 256
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _gpt_setup(model=None):
    model = model or T.Decoder(T.make_config("tiny", vocab_size=VOCAB, max_length=LENGTH))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH + 1))

    def loss_fn(params, model_state, batch):
        logits = model.apply({"params": params}, batch["x"][:, :-1])
        labels = batch["x"][:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}
    init_args = (jnp.zeros((1, LENGTH), jnp.int32),)
    return model, init_args, loss_fn, [{"x": tokens}] * 3  # one batch: the loss must fall


def _resnet_setup():
    model = cnn.ResNet(cnn.ResNetConfig(widths=(8, 16, 32), num_classes=4,
                                        head_zero_init=False, zero_init_residual=False))
    r = np.random.default_rng(1)
    batches = [{"x": r.normal(size=(BATCH, 8, 8, 3)).astype(np.float32),
                "y": r.integers(0, 4, BATCH)}] * 3

    def loss_fn(params, model_state, batch):
        logits, updates = model.apply({"params": params, **model_state}, batch["x"],
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, updates
    return model, (jnp.zeros((1, 8, 8, 3)),), loss_fn, batches


def _gpt_default_setup():
    """The GPT default's model (4 layers, d_model 128, 4 heads, MLP 512) on short windows."""
    return _gpt_setup(families.build(gpt.get_config().model, "lm", vocab_size=VOCAB)[0])


def run_training(setup, mesh_shape=None, strategy="replicate", tx=None,
                 **sharding_overrides):
    """Losses of 3 steps of `tx` (default Adam, lr 1e-2) and the final state;
    mesh_shape=None: plain jit, 1 device."""
    model, init_args, loss_fn, batches = setup()
    tx = tx or optax.adam(1e-2)

    def init():
        variables = partitioning.unboxed_init(model, jax.random.key(0), *init_args)
        params = variables.pop("params")
        return {"params": params, "opt_state": tx.init(params), "model_state": variables}

    def train_step(state, batch):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["model_state"], batch)
        new, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], new), "opt_state": opt_state,
                "model_state": {**state["model_state"], **updates}}, loss

    if mesh_shape is None:
        state, step, put = jax.jit(init)(), jax.jit(train_step), lambda b: b
        rules = contextlib.nullcontext()
    else:
        cfg = _config(mesh_shape, strategy, **sharding_overrides)
        mesh = sharding.mesh_from_config(cfg)
        boxed = jax.eval_shape(model.init, jax.random.key(0), *init_args)["params"]
        state_sh = sharding.state_sharding(jax.eval_shape(init), mesh, cfg, boxed)
        state = jax.jit(init, out_shardings=state_sh)()
        step = jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sh, NamedSharding(mesh, P())))
        put = lambda b: sharding.shard_batch(b, mesh)  # noqa: E731
        rules = sharding.use_rules(mesh, cfg)
    losses = []
    with rules:
        for batch in batches:
            state, loss = step(state, put(batch))
            losses.append(float(loss))
    return np.array(losses), state


@pytest.mark.parametrize("setup", [_gpt_setup, _resnet_setup], ids=["gpt", "resnet"])
def test_training_matches_across_meshes_with_default_rules(setup):
    ref_losses, ref = run_training(setup)
    assert np.all(np.isfinite(ref_losses)) and ref_losses[-1] < ref_losses[0]
    for mesh_shape, strategy in MESHES:
        losses, state = run_training(setup, mesh_shape, strategy)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-6)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                                jax.tree.leaves(state)):
            # softmax(q.k + q.b) does not depend on the key bias b: its gradient is
            # rounding noise, which Adam scales up to full-size steps. Skip it.
            if "['key']['bias']" not in jax.tree_util.keystr(path):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        if strategy == "fsdp":
            _check_fsdp_layout(state, setup)
        else:
            assert all(x.sharding.spec == P() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("mesh_shape,strategy,model", [
    ((4, 1), "replicate", 2), ((1, 2), "fsdp", 4)])
def test_tensor_parallel_gpt_default_matches_one_device(mesh_shape, strategy, model):
    ref_losses, ref = _gpt_default_reference()
    losses, state = run_training(_gpt_default_setup, mesh_shape, strategy, _SGD(),
                                 model=model)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-6)
    # SGD, whose update is the gradient itself: Adam's normalization would turn the
    # rounding of near-zero gradients into full-size steps (see above).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state["params"], ref["params"])
    layer, fsdp = state["params"]["decoder"]["layers_0"], "fsdp" if strategy == "fsdp" else None
    attention, mlp = layer["self_attention"], layer["mlp"]
    # Megatron: QKV and fc1 split by columns (heads, MLP units), out and fc2 by rows.
    assert attention["query"]["kernel"].sharding.spec == P(fsdp, "model", None)
    assert attention["out"]["kernel"].sharding.spec == P("model", None, fsdp)
    assert mlp["fc1"]["kernel"].sharding.spec == P(fsdp, "model")
    assert mlp["fc2"]["kernel"].sharding.spec == P("model", fsdp)
    assert {s.data.shape for s in mlp["fc1"]["kernel"].addressable_shards} == {
        (128 // (2 if fsdp else 1), 512 // model)}
    assert state["params"]["embed"]["tokens"]["embedding"].sharding.spec == P(
        "model", fsdp)  # the vocabulary split over "model", rows of width over "fsdp"


_REFERENCE = {}


def _SGD():
    return optax.sgd(0.5)


def _gpt_default_reference():
    if "gpt" not in _REFERENCE:  # one single-device run for both meshes
        _REFERENCE["gpt"] = run_training(_gpt_default_setup, tx=_SGD())
    return _REFERENCE["gpt"]


def _check_fsdp_layout(state, setup):
    params, mu = state["params"], state["opt_state"][0].mu
    if setup is _gpt_setup:
        layer = params["decoder"]["layers_0"]
        fc1 = layer["mlp"]["fc1"]["kernel"]                          # (embed 32, mlp 64)
        assert fc1.sharding.spec == P("fsdp", None)
        assert {s.data.shape for s in fc1.addressable_shards} == {(8, 64)}
        assert layer["mlp"]["fc2"]["kernel"].sharding.spec == P(None, "fsdp")
        assert layer["self_attention"]["out"]["kernel"].sharding.spec == P(None, None, "fsdp")
        assert layer["self_attention"]["query"]["kernel"].sharding.spec == P("fsdp", None,
                                                                             None)
        # (vocab 64, embed 32): split by rows (vocab before embed), as the shape rule did.
        assert params["embed"]["tokens"]["embedding"].sharding.spec == P("fsdp", None)
        assert params["embed"]["positions"]["embedding"].sharding.spec == P(None, "fsdp")
        assert layer["mlp"]["fc1"]["bias"].sharding.spec == P()      # 64 < 256 elements
        assert mu["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(
            "fsdp", None)
    else:
        # (3, 3, in 16, out 32): conv_in first, where the shape rule took the larger out.
        conv = params["stage2_block0"]["conv1"]["kernel"]
        assert conv.sharding.spec == P(None, None, "fsdp", None)
        assert {s.data.shape for s in conv.addressable_shards} == {(3, 3, 4, 32)}
        assert params["stage0_block0"]["conv1"]["kernel"].sharding.spec == P(None, None,
                                                                             "fsdp", None)
        assert params["head"]["kernel"].sharding.spec == P()         # (32, 4): 128 < 256
        assert params["stem_conv"]["kernel"].sharding.spec == P()    # (3, 3, 3, 8): 216
        # batch norm carries no names: the shape rule, replicated below 256 elements.
        assert state["model_state"]["batch_stats"]["stem_bn"]["mean"].sharding.spec == P()


def test_activation_constraints_only_inside_rules():
    model, init_args, loss_fn, batches = _gpt_setup()
    params = partitioning.unboxed_init(model, jax.random.key(0), *init_args)["params"]
    x = jnp.zeros((BATCH, LENGTH), jnp.int32)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    count = lambda x: forward.lower(params, x).as_text().count("sdy.sharding_constraint")  # noqa
    assert count(x) == 0
    cfg = _config((2, 4), "fsdp")
    mesh = sharding.mesh_from_config(cfg)
    with sharding.use_rules(mesh, cfg):
        # Traced again although traced above (the context mesh is in jax's cache key).
        # Per layer: q, k, v, attention output, mlp hidden, block output (2 layers); the
        # embedding output and the logits. Only the batch axis is pinned.
        assert count(x) == 2 * 6 + 2
        text = forward.lower(params, x).as_text()
        assert 'sdy.sharding_constraint %' in text and '[{"data", "fsdp"}, {?}, {?}]' in text
        # A batch the mesh does not divide is left to propagation: no constraint at all.
        assert count(x[:3]) == 0
    assert partitioning.current_rules() is None and count(x) == 0


def test_logical_to_spec_priority_divisibility_and_replication():
    mesh = {"data": 2, "fsdp": 4}
    rules = sharding.DEFAULT_RULES
    spec = partitioning.logical_to_spec
    assert spec(("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp", None)
    assert spec(("mlp", "embed"), (64, 32), rules, mesh) == P(None, "fsdp")
    # embed 30 % 4 != 0: the next rule (mlp) takes the fsdp axis.
    assert spec(("embed", "mlp"), (30, 64), rules, mesh) == P(None, "fsdp")
    assert spec(("embed", "mlp"), (30, 62), rules, mesh) == P()
    assert spec(("batch", "length", "activation_embed"), (16, 8, 32), rules, mesh) == P(
        ("data", "fsdp"), None, None)
    assert spec(("batch", None), (4, 8), rules, mesh) == P()      # 4 % 8 != 0
    assert spec(("layers", "embed", "mlp"), (2, 32, 64), rules, mesh) == P(None, "fsdp", None)
    # An explicit None settles the dimension; size-1 mesh axes split nothing.
    assert spec(("embed", "mlp"), (32, 64), (("embed", None),) + rules, mesh) == P(None,
                                                                                    "fsdp")
    assert spec(("embed", "mlp"), (32, 64), rules, {"data": 8, "fsdp": 1}) == P()
    with pytest.raises(ValueError, match=r"repeat \['embed'\]"):
        spec(("embed", "embed"), (4, 4), rules, mesh)
    with pytest.raises(ValueError, match="do not match the shape"):
        spec(("embed",), (4, 4), rules, mesh)
    with pytest.raises(ValueError, match="do not match the activation shape"):
        partitioning.constrain(jnp.zeros((2, 3)), ("batch",))
    x = jnp.zeros((2, 3))
    assert partitioning.constrain(x, ("batch", None)) is x  # no rules: the array itself


def test_state_sharding_mirrors_params_and_falls_back_to_the_shape_rule():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    cfg = _config((2, 4), "fsdp", min_size_to_shard=64)
    boxed = {"dense": {"kernel": nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((16, 64), jnp.float32), ("embed", "mlp"))},
        "table": jax.ShapeDtypeStruct((100, 8), jnp.float32)}   # no names
    kernel = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    table = jax.ShapeDtypeStruct((100, 8), jnp.float32)
    params = {"dense": {"kernel": kernel}, "table": table}
    state = {"params": {"base": params, "lora": {"dense": {"kernel": {
                 "a": jax.ShapeDtypeStruct((16, 4), jnp.float32),
                 "b": jax.ShapeDtypeStruct((4, 64), jnp.float32)}}}},
             "opt_state": {"mu": params, "mask": {"dense": {"kernel": kernel}}},
             "other": {"kernel": jax.ShapeDtypeStruct((64, 16), jnp.float32)},  # other shape
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    specs = jax.tree.map(lambda s: s.spec, sharding.state_sharding(state, mesh, cfg, boxed))
    named, shape_rule = P("fsdp", None), P("fsdp", None)   # table: 100 rows % 4 == 0
    assert specs["params"]["base"] == {"dense": {"kernel": named}, "table": shape_rule}
    assert specs["opt_state"] == {"mu": {"dense": {"kernel": named}, "table": shape_rule},
                                  "mask": {"dense": {"kernel": named}}}
    # LoRA adapters (64 elements: shape rule on the largest divisible axis).
    assert specs["params"]["lora"]["dense"]["kernel"] == {"a": P("fsdp", None),
                                                          "b": P(None, "fsdp")}
    assert specs["other"] == {"kernel": P("fsdp", None)} and specs["step"] == P()
    # replicate: nothing split; without logical params: exactly param_sharding.
    cfg.strategy = "replicate"
    assert all(s.spec == P() for s in jax.tree.leaves(
        sharding.state_sharding(state, mesh, cfg, boxed)))
    cfg.strategy = "fsdp"
    assert (jax.tree.map(lambda s: s.spec, sharding.state_sharding(state, mesh, cfg))
            == jax.tree.map(lambda s: s.spec, sharding.param_sharding(state, mesh, "fsdp", 64)))


def test_bad_rules_raise_one_clear_error():
    def check(rules, match):
        cfg = sharding.default_config()
        cfg.rules = rules
        with pytest.raises(ValueError, match=match):
            sharding.validate(cfg, global_batch_size=64, num_devices=8)
    check([["embd", "fsdp"]], r"sharding.rules\[0\]: unknown logical axis 'embd'; allowed: "
                              r"\[logical_name, mesh_axes\] with logical_name one of embed, mlp")
    check([["batch", ["data", "fsdp"]], ["mlp", "tensor"]],
          r"sharding.rules\[1\]: mesh axes 'tensor' for 'mlp' are not allowed.*'data', 'fsdp'")
    check([["mlp", ["fsdp", "fsdp"]]], r"rules\[0\]: mesh axes \['fsdp', 'fsdp'\]")
    check([["mlp"]], r"sharding.rules\[0\]=\['mlp'\] is not a pair")
    cfg = sharding.default_config()
    assert sharding.validate(cfg, 64, 8) == (8, 1)
    assert sharding.rules_from_config(cfg) == sharding.DEFAULT_RULES
