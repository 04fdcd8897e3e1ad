"""LoRA (models/compress/lora.py): exact at init, adapters-only training, merge, ranks, counts."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import gpt
from models.compress import common, lora as lora_lib, quantize
from train import families

VOCAB = 260
QV = ("attention/(query|value)/kernel$",)


def _tiny_gpt(scan_layers: bool):
    c = gpt.get_config("tiny")
    c.model.scan_layers = scan_layers
    model, _ = families.build(c.model, "lm", vocab_size=VOCAB)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 4, VOCAB)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1]))["params"]
    return model, params, tokens


@pytest.fixture(scope="module")
def gpt_unscanned():
    return _tiny_gpt(False)


@pytest.fixture(scope="module")
def gpt_scanned():
    return _tiny_gpt(True)


def _lm_loss(model):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss


def _paths(tree):
    return {common.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _randomize_b(lora, seed=0):
    """Nonzero B factors (trained-looking adapters) so the update is visible."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape) if common.path_str(p).endswith("lora_b") else x
           for (p, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, new)


# --- exactness at init and the initializers ---------------------------------------------

@pytest.mark.parametrize("scanned", [False, True])
def test_output_unchanged_at_init(scanned, gpt_unscanned, gpt_scanned):
    model, params, tokens = gpt_scanned if scanned else gpt_unscanned
    lora = lora_lib.init_lora(params, jax.random.key(2), rank=4, targets=(".*",),
                              include_embeddings=True)
    adapted = lora_lib.apply_lora(params, lora, alpha=8.0)
    assert jax.tree.structure(adapted) == jax.tree.structure(params)
    for w, w0 in zip(jax.tree.leaves(adapted), jax.tree.leaves(params)):
        assert w.shape == w0.shape and w.dtype == w0.dtype
    x = tokens[:, :-1]
    np.testing.assert_array_equal(model.apply({"params": adapted}, x),
                                  model.apply({"params": params}, x))


def test_initializers_follow_loralib():
    params = {"dense": {"kernel": jnp.ones((256, 8))}, "emb": {"embedding": jnp.ones((50, 8))}}
    lora = lora_lib.init_lora(params, jax.random.key(0), rank=4, targets=(".*",),
                              include_embeddings=True)
    a, b = lora["dense"]["kernel"]["lora_a"], lora["dense"]["kernel"]["lora_b"]
    assert a.shape == (4, 256) and b.shape == (8, 4) and a.dtype == b.dtype == jnp.float32
    bound = 1 / np.sqrt(256)          # torch kaiming_uniform_(a=sqrt(5)) on A [r, in]
    assert np.all(b == 0) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    ea, eb = lora["emb"]["embedding"]["lora_a"], lora["emb"]["embedding"]["lora_b"]
    assert ea.shape == (4, 50) and eb.shape == (8, 4)
    assert np.all(ea == 0) and np.std(eb) > 0.3     # loralib Embedding: A = 0, B ~ N(0, 1)
    g = lora_lib.init_lora({"d": {"kernel": jnp.ones((512, 64))}}, jax.random.key(0),
                           rank=4, a_init="gaussian")["d"]["kernel"]["lora_a"]
    np.testing.assert_allclose(np.std(g), 1 / 4, rtol=0.05)


# --- the update itself ------------------------------------------------------------------

def test_scaling_matches_float64_reference():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    lora = {"fc": {"kernel": {"lora_a": rng.normal(size=(2, 6)).astype(np.float32),
                              "lora_b": rng.normal(size=(5, 2)).astype(np.float32)}}}
    got = lora_lib.apply_lora({"fc": {"kernel": jnp.asarray(w0)}, "b": jnp.ones(3)},
                              lora, alpha=3.0)
    a, b = (lora["fc"]["kernel"][k].astype(np.float64) for k in ("lora_a", "lora_b"))
    want = w0.astype(np.float64) + (3.0 / 2) * (b @ a).T
    np.testing.assert_allclose(got["fc"]["kernel"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["b"], np.ones(3))
    x = rng.normal(size=(4, 6))                     # h = x W0 + (alpha/r) x A^T B^T
    np.testing.assert_allclose(x @ np.asarray(got["fc"]["kernel"], np.float64),
                               x @ w0 + 1.5 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


def test_delta_has_rank_at_most_r(gpt_unscanned):
    _, params, _ = gpt_unscanned
    lora = _randomize_b(lora_lib.init_lora(params, jax.random.key(0), rank=3, targets=QV))
    merged = lora_lib.merge(params, lora, alpha=6.0)
    path = ("decoder", "layers_1", "self_attention", "value", "kernel")   # [32, 2, 16]
    w, w0 = merged, params
    for k in path:
        w, w0 = w[k], w0[k]
    delta = np.asarray(w, np.float64) - np.asarray(w0, np.float64)
    assert np.linalg.matrix_rank(delta.reshape(32, 32), tol=1e-4) == 3
    # the float64 reference of the same 3-D kernel: (alpha/r) (B A)^T reshaped
    a, b = (np.asarray(lora["decoder"]["layers_1"]["self_attention"]["value"]["kernel"][k],
                       np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(delta, 2.0 * (b @ a).T.reshape(32, 2, 16), atol=1e-5)


def test_stacked_layers_are_adapted_per_layer(gpt_scanned):
    _, params, _ = gpt_scanned
    lora = _randomize_b(lora_lib.init_lora(params, jax.random.key(0), rank=2,
                                           targets=("self_attention/out/kernel$",)))
    ab = lora["decoder"]["layers"]["self_attention"]["out"]["kernel"]
    assert ab["lora_a"].shape == (2, 2, 32) and ab["lora_b"].shape == (2, 32, 2)
    merged = lora_lib.merge(params, lora, alpha=2.0)
    w = merged["decoder"]["layers"]["self_attention"]["out"]["kernel"]     # [L, 2, 16, 32]
    w0 = params["decoder"]["layers"]["self_attention"]["out"]["kernel"]
    a, b = np.asarray(ab["lora_a"], np.float64), np.asarray(ab["lora_b"], np.float64)
    for layer in range(2):
        want = np.asarray(w0[layer], np.float64) + (b[layer] @ a[layer]).T.reshape(2, 16, 32)
        np.testing.assert_allclose(w[layer], want, atol=1e-5)
        delta = np.asarray(w[layer] - w0[layer], np.float64).reshape(32, 32)
        assert np.linalg.matrix_rank(delta, tol=1e-4) == 2


# --- selection and counts ----------------------------------------------------------------

def test_patterns_select_exactly_the_intended_kernels(gpt_unscanned):
    _, params, _ = gpt_unscanned
    qv = lora_lib.init_lora(params, jax.random.key(0), rank=2, targets=QV)
    assert _paths(qv) == {f"decoder/layers_{i}/self_attention/{m}/kernel/lora_{x}"
                          for i in (0, 1) for m in ("query", "value") for x in "ab"}
    every = lora_lib.init_lora(params, jax.random.key(0), rank=2, targets=(".*",))
    kernels = {p for p in _paths(params) if p.endswith("/kernel")}
    assert len(kernels) == 12
    assert _paths(every) == {f"{k}/lora_{x}" for k in kernels for x in "ab"}
    with_emb = lora_lib.init_lora(params, jax.random.key(0), rank=2, targets=("embed/",),
                                  include_embeddings=True)
    assert {p.rsplit("/", 1)[0] for p in _paths(with_emb)} == {
        "embed/tokens/embedding", "embed/positions/embedding"}


def test_param_count_is_r_times_in_plus_out(gpt_unscanned, gpt_scanned):
    _, params, _ = gpt_unscanned
    r = 4
    qv = lora_lib.init_lora(params, jax.random.key(0), rank=r, targets=QV)
    assert lora_lib.lora_param_count(qv) == 4 * r * (32 + 32)     # 4 kernels [32, 2*16]
    mlp = lora_lib.init_lora(params, jax.random.key(0), rank=r, targets=("mlp/fc",))
    assert lora_lib.lora_param_count(mlp) == 2 * r * ((32 + 64) + (64 + 32))
    _, sparams, _ = gpt_scanned                                    # 2 stacked layers
    sqv = lora_lib.init_lora(sparams, jax.random.key(0), rank=r, targets=QV)
    assert lora_lib.lora_param_count(sqv) == 2 * 2 * r * (32 + 32)


# --- training only the adapters ----------------------------------------------------------

def _train(loss_fn, state, tx, tokens, steps):
    opt_state = tx.init(state)

    @jax.jit
    def step(state, opt_state):
        value, grads = lora_lib.lora_value_and_grad(loss_fn)(state, tokens)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value
    losses = []
    for _ in range(steps):
        state, opt_state, value = step(state, opt_state)
        losses.append(float(value))
    return state, opt_state, losses


def test_training_adapters_only_keeps_base_and_matches_merged(gpt_unscanned):
    model, params, tokens = gpt_unscanned
    lm = _lm_loss(model)
    alpha = 8.0
    lora = lora_lib.init_lora(params, jax.random.key(3), rank=4, targets=(".*",))
    state = lora_lib.train_params(params, lora)
    tx = lora_lib.lora_optimizer(optax.adam(1e-2))
    # Adam moments (2 per adapter parameter) + its step count: nothing for the base.
    assert sum(np.size(x) for x in jax.tree.leaves(tx.init(state))) == \
        2 * lora_lib.lora_param_count(lora) + 1
    before = jax.tree.map(np.array, params)

    def loss(p, toks):
        return lm(lora_lib.apply_lora(p[lora_lib.BASE], p[lora_lib.LORA], alpha), toks)
    state, _, losses = _train(loss, state, tx, tokens, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    for got, want in zip(jax.tree.leaves(state["base"]), jax.tree.leaves(before)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
    b = state["lora"]["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"]["lora_b"]
    assert np.abs(b).max() > 0                      # the adapters did move
    x = tokens[:, :-1]
    adapted = model.apply({"params": lora_lib.apply_lora(state["base"], state["lora"],
                                                         alpha)}, x)
    merged = lora_lib.merge(state["base"], state["lora"], alpha)
    np.testing.assert_allclose(model.apply({"params": merged}, x), adapted,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.apply({"params": params}, x), adapted, atol=1e-3)


def test_qlora_on_a_quantized_base(gpt_unscanned):
    model, params, tokens = gpt_unscanned
    lm = _lm_loss(model)
    qbase = quantize.quantize_tree(params, bits=8, symmetric=True, per_channel=True)
    float_base = quantize.dequantize_tree(qbase)
    lora = lora_lib.init_lora(params, jax.random.key(4), rank=4, targets=(".*",))
    x = tokens[:, :-1]
    at_init = lora_lib.apply_lora(qbase, lora, 4.0, dequantize=quantize.dequantize_tree)
    np.testing.assert_array_equal(model.apply({"params": at_init}, x),
                                  model.apply({"params": float_base}, x))
    state = lora_lib.train_params(qbase, lora)
    tx = lora_lib.lora_optimizer(optax.adam(1e-2))
    before = jax.tree.map(np.array, qbase)

    def loss(p, toks):
        return lm(lora_lib.apply_lora(p["base"], p["lora"], 4.0,
                                      dequantize=quantize.dequantize_tree), toks)
    state, _, losses = _train(loss, state, tx, tokens, steps=4)
    assert losses[-1] < losses[0], losses
    assert any(np.issubdtype(np.asarray(v).dtype, np.integer) for v in jax.tree.leaves(before))
    for got, want in zip(jax.tree.leaves(state["base"]), jax.tree.leaves(before)):
        assert np.asarray(got).dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    merged = lora_lib.merge(state["base"], state["lora"], 4.0, quantize.dequantize_tree)
    np.testing.assert_allclose(model.apply({"params": merged}, x),
                               model.apply({"params": lora_lib.apply_lora(
                                   state["base"], state["lora"], 4.0,
                                   quantize.dequantize_tree)}, x), rtol=1e-5, atol=1e-5)


def test_state_round_trips_through_the_checkpointer(tmp_path):
    from train.checkpoint import Checkpointer
    params = {"fc": {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.ones(3)}}
    lora = _randomize_b(lora_lib.init_lora(params, jax.random.key(0), rank=2))
    state = {"step": jnp.int32(3), "params": lora_lib.train_params(params, lora)}
    with Checkpointer(tmp_path / "ckpt", save_every=1, keep=1) as ckpt:
        ckpt.save(3, state, force=True)
        ckpt.wait_until_finished()
        restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)


# --- errors ------------------------------------------------------------------------------

def test_errors_name_the_problem(gpt_unscanned):
    _, params, _ = gpt_unscanned
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"no kernel path matches.*decoder/layers_0/"):
        lora_lib.init_lora(params, key, rank=2, targets=("nonexistent",))
    with pytest.raises(ValueError, match="no kernel path matches"):   # embeddings need opt-in
        lora_lib.init_lora(params, key, rank=2, targets=("embedding$",))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank must be an int >= 1"):
            lora_lib.init_lora(params, key, rank=bad, targets=QV)
    with pytest.raises(ValueError, match=re.escape("min(32, 64) of decoder/layers_0/mlp/fc1")):
        lora_lib.init_lora(params, key, rank=33, targets=("fc1",))
    with pytest.raises(ValueError, match="list/tuple of regexes"):
        lora_lib.init_lora(params, key, rank=2, targets="query")
    with pytest.raises(ValueError, match="invalid regex"):
        lora_lib.init_lora(params, key, rank=2, targets=("(",))
    with pytest.raises(ValueError, match="a_init must be one of"):
        lora_lib.init_lora(params, key, rank=2, a_init="xavier")
    lora = lora_lib.init_lora(params, key, rank=2, targets=QV)
    for bad in (0.0, -1.0, "big", float("nan")):
        with pytest.raises(ValueError, match="alpha must be"):
            lora_lib.apply_lora(params, lora, alpha=bad)
    other = {"decoder": {"nope": {"kernel": jnp.ones((32, 32))}}}
    with pytest.raises(ValueError, match="absent from params"):
        lora_lib.apply_lora(other, lora, alpha=1.0)
    with pytest.raises(ValueError, match="absent from the base"):
        lora_lib.train_params(other, lora)
    wrong = lora_lib.init_lora({"decoder": {"layers_0": {"self_attention": {"query": {
        "kernel": jnp.ones((16, 2, 16))}}}}}, key, rank=2)
    with pytest.raises(ValueError, match=r"do not fit the kernel \(32, 2, 16\)"):
        lora_lib.apply_lora(params, wrong, alpha=1.0)
    with pytest.raises(ValueError, match="need both lora_a and lora_b"):
        lora_lib.apply_lora(params, {"x": {"kernel": {"lora_a": jnp.ones((2, 3))}}}, 1.0)
    with pytest.raises(ValueError, match="must be the dict"):
        lora_lib.lora_optimizer(optax.adam(1e-3)).init(params)
