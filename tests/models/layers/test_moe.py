"""Mixture of experts against a float64 NumPy reference (routing, capacity in token order,
the gate-weighted sum), the closed forms of the Switch and z losses, the limits (one
expert = the dense MLP; identical experts = one expert), dense == sorted dispatch in
outputs and gradients, noise in training only, and gradients reaching the router."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from jax.test_util import check_grads

from models.layers import moe
from models.layers.mlp import MlpBlock

B, L, D, F = 2, 8, 6, 10


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gelu64(x):
    from scipy.special import erf  # noqa: PLC0415
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def block(**fields):
    fields = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, **fields}
    return moe.MoeBlock(cfg=moe.MoeConfig(**fields), hidden_dim=F)


def init(model, x, seed=1):
    params = nn.unbox(model.init(jax.random.key(seed), x))["params"]
    rng = np.random.default_rng(seed)   # biases and a router away from init scale
    return jax.tree.map(lambda p: np.asarray(p) + 0.3 * rng.normal(size=p.shape).astype(
        np.float32), params)


def identical_experts(params):
    """params with every expert a copy of expert 0."""
    copies = jax.tree.map(lambda w: np.broadcast_to(w[:1], w.shape).copy(),
                          {k: params[k] for k in ("fc1", "fc2")})
    return {**params, **copies}


def inputs(seed=0, shape=(B, L, D)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def reference(params, x, cfg, valid=None):
    """float64 loops: route each row's tokens in order, an expert full at C slots."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, l, _ = x.shape
    n, k = cfg.num_experts, cfg.top_k
    c = moe.capacity(l, n, k, cfg.capacity_factor)
    valid = np.ones((b, l), bool) if valid is None else np.asarray(valid)
    out, kept_total, active_total = np.zeros_like(x), 0, 0
    for r in range(b):
        used = np.zeros(n, int)
        for t in range(l):
            if not valid[r, t]:
                continue
            logits = x[r, t] @ p["router"]["kernel"]
            order = np.argsort(-logits, kind="stable")[:k]
            gates = (softmax64(logits[order]) if cfg.routing == "topk_softmax"
                     else softmax64(logits)[order])
            for e, g in zip(order, gates):
                active_total += 1
                if used[e] >= c:
                    continue
                used[e] += 1
                kept_total += 1
                h = gelu64(x[r, t] @ p["fc1"]["kernel"][e] + p["fc1"]["bias"][e])
                out[r, t] += g * (h @ p["fc2"]["kernel"][e] + p["fc2"]["bias"][e])
    return out, 1.0 - kept_total / active_total


@pytest.mark.parametrize("routing", moe.ROUTINGS)
def test_top_k_gates_equal_numpy(routing):
    logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    gates, experts = moe.top_k_gates(jnp.asarray(logits), 3, routing)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(experts), order)
    picked = np.take_along_axis(logits.astype(np.float64), order, -1)
    want = (softmax64(picked) if routing == "topk_softmax"
            else np.take_along_axis(softmax64(logits), order, -1))
    np.testing.assert_allclose(np.asarray(gates), want, rtol=1e-6)
    if routing == "topk_softmax":   # = GShard's renormalized top-k of the full softmax
        full = np.take_along_axis(softmax64(logits), order, -1)
        np.testing.assert_allclose(np.asarray(gates), full / full.sum(-1, keepdims=True),
                                   rtol=1e-6)


@pytest.mark.parametrize("routing", moe.ROUTINGS)
@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
@pytest.mark.parametrize("factor", [1.0, 0.5, 0.0])
def test_forward_equals_the_float64_loop_reference(routing, dispatch, factor):
    x = inputs()
    valid = np.ones((B, L), bool)
    valid[1, 5:] = False                 # padding takes no slot and gets 0
    model = block(routing=routing, dispatch=dispatch, capacity_factor=factor)
    params = init(model, x)
    y, stats = model.apply({"params": params}, x, jnp.asarray(valid))
    want, dropped = reference(params, x, model.cfg, valid)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
    assert abs(float(stats["dropped"]) - dropped) < 1e-6
    assert float(stats["weighted"]) == valid.sum()
    if factor == 0.5:
        assert dropped > 0.2               # the capacity binds here


def test_a_token_over_capacity_gets_exactly_zero():
    """Every token prefers expert 0 (k=1, C = 8 * 1 / 4 = 2): tokens 0 and 1 are served,
    tokens 2..7 leave with 0 (the residual connection carries them); dropped = 6/8."""
    x = jnp.abs(inputs()) + 0.1
    model = block(top_k=1)
    params = init(model, x)
    kernel = np.zeros((D, 4), np.float32)
    kernel[:, 0] = 1.0
    params["router"]["kernel"] = kernel
    y, stats = model.apply({"params": params}, x)
    assert np.all(np.asarray(y)[:, 2:] == 0.0) and np.all(np.abs(np.asarray(y)[:, :2]) > 0)
    assert float(stats["dropped"]) == pytest.approx(6 / 8)
    np.testing.assert_allclose(np.asarray(stats["load"]), [1.0, 0.0, 0.0, 0.0])


def test_one_expert_with_unlimited_capacity_is_the_dense_mlp():
    x = inputs()
    model = block(num_experts=1, top_k=1, capacity_factor=0.0)
    params = init(model, x)
    dense = jax.tree.map(lambda w: w[0], {k: params[k] for k in ("fc1", "fc2")})
    want = MlpBlock(F).apply({"params": dense}, x)
    for dispatch in moe.DISPATCHES:
        model = block(num_experts=1, top_k=1, capacity_factor=0.0, dispatch=dispatch)
        y, _ = model.apply({"params": params}, x)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@pytest.mark.parametrize("routing", moe.ROUTINGS)
def test_identical_experts_give_one_experts_output_for_any_routing(routing):
    x = inputs()
    model = block(routing=routing, capacity_factor=0.0)
    params = init(model, x)
    params = identical_experts(params)
    one = jax.tree.map(lambda w: w[0], {k: params[k] for k in ("fc1", "fc2")})
    single = np.asarray(MlpBlock(F).apply({"params": one}, x))
    for seed in range(3):                       # whatever the router says
        params["router"]["kernel"] = np.random.default_rng(seed).normal(
            size=(D, 4)).astype(np.float32)
        y, _ = model.apply({"params": params}, x)
        gates, _ = moe.top_k_gates(x @ params["router"]["kernel"], 2, routing)
        scale = np.asarray(jnp.sum(gates, -1, keepdims=True))  # 1 for topk_softmax
        if routing == "topk_softmax":
            np.testing.assert_allclose(scale, 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y), single * scale, atol=1e-5)


def test_switch_loss_closed_form_and_one_under_uniform_routing():
    rng = np.random.default_rng(0)
    probs = softmax64(rng.normal(size=(12, 4)))
    experts = np.stack([rng.permutation(4)[:2] for _ in range(12)])
    active = np.ones(12, bool)
    active[-2:] = False
    got, load = moe.switch_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(experts),
                                jnp.asarray(active))
    f = np.zeros(4)
    for row in experts[active]:
        f[row] += 1
    f /= active.sum() * 2
    p = probs[active].mean(0)
    assert abs(float(got) - 4 * np.sum(f * p)) < 1e-6
    np.testing.assert_allclose(np.asarray(load), f, rtol=1e-6)
    uniform = jnp.full((8, 4), 0.25)
    balanced = jnp.asarray(np.array([[i % 4, (i + 1) % 4] for i in range(8)]))
    assert abs(float(moe.switch_loss(uniform, balanced, jnp.ones(8, bool))[0]) - 1.0) < 1e-6


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = np.random.default_rng(1).normal(size=(6, 5)) * 3
    active = np.array([1, 1, 1, 0, 1, 1], bool)
    lse = np.log(np.exp(logits).sum(-1))
    got = float(moe.z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(active)))
    assert abs(got - np.mean(lse[active] ** 2)) < 1e-4


def test_dense_and_sorted_dispatch_agree_in_outputs_and_gradients():
    x = inputs()
    dense, sorted_ = block(dispatch="dense"), block(dispatch="sorted")
    params = init(dense, x)

    def loss(model):
        def f(p, x_):
            y, stats = model.apply({"params": p}, x_)
            return jnp.sum(y * jnp.cos(y)) + stats["switch_loss"] + stats["z_loss"]
        return jax.value_and_grad(f, argnums=(0, 1))

    (va, (ga, gxa)), (vb, (gb, gxb)) = loss(dense)(params, x), loss(sorted_)(params, x)
    assert abs(float(va) - float(vb)) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ga, gb)
    np.testing.assert_allclose(gxa, gxb, atol=1e-5)
    assert float(jnp.abs(ga["router"]["kernel"]).sum()) > 0   # the router learns


def test_noisy_gating_adds_noise_in_training_only():
    x = inputs()
    noisy = block(noisy=True, capacity_factor=0.0)
    params = init(noisy, x)
    plain = {k: v for k, v in params.items() if k != "router_noise"}
    clean, _ = block(capacity_factor=0.0).apply({"params": plain}, x)
    evaluated, _ = noisy.apply({"params": params}, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(clean))
    trained = [np.asarray(noisy.apply({"params": params}, x, deterministic=False,
                                      rngs={"dropout": jax.random.key(s)})[0]) for s in (0, 1)]
    assert np.abs(trained[0] - trained[1]).max() > 1e-3
    assert np.abs(trained[0] - np.asarray(clean)).max() > 1e-3


def test_random_routing_keeps_the_second_expert_with_probability_two_g2():
    """With identical experts a token's output is (g1 + kept2 * g2) E(x), so kept2 can be
    read off: it is 0 or 1, its rate is mean(min(1, 2 g2)), and evaluation keeps both."""
    x = inputs(shape=(64, 8, D))
    model = block(random_routing=True, capacity_factor=0.0)
    params = init(model, x)
    params = identical_experts(params)
    y_eval, _ = model.apply({"params": params}, x)          # evaluation: both experts
    want, _ = reference(params, x, model.cfg)
    np.testing.assert_allclose(np.asarray(y_eval), want, atol=1e-5)
    single = np.asarray(y_eval, np.float64)                   # = E(x): g1 + g2 = 1
    gates, _ = moe.top_k_gates(jnp.einsum("bld,dn->bln", x, params["router"]["kernel"]), 2)
    g = np.asarray(gates, np.float64)
    rates = []
    for seed in range(4):
        y, stats = model.apply({"params": params}, x, deterministic=False,
                               rngs={"dropout": jax.random.key(seed)})
        scale = np.sum(np.asarray(y, np.float64) * single, -1) / np.sum(single * single, -1)
        kept2 = (scale - g[..., 0]) / g[..., 1]
        np.testing.assert_allclose(kept2, np.round(kept2), atol=1e-3)   # 0 or 1
        rates.append(np.mean(np.round(kept2)))
        assert float(stats["dropped"]) == 0.0     # not a capacity drop
    assert abs(np.mean(rates) - np.mean(np.minimum(1.0, 2.0 * g[..., 1]))) < 0.04
    assert 0.0 < np.mean(rates) < 1.0


def test_gradients_reach_the_router_and_experts():
    x = inputs(shape=(1, 4, D))
    model = block(num_experts=3, capacity_factor=0.0)
    params = init(model, x)

    @jax.jit    # check_grads calls it many times: compile once
    def f(router, w1):
        p = {**params, "router": {"kernel": router}, "fc1": {**params["fc1"], "kernel": w1}}
        return model.apply({"params": p}, x)[0]

    check_grads(f, (jnp.asarray(params["router"]["kernel"]),
                    jnp.asarray(params["fc1"]["kernel"])),
                order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.moe.top_k=5 must be in 1..num_experts"):
        moe.MoeConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="random_routing .* needs top_k=2"):
        moe.MoeConfig(top_k=1, random_routing=True)
    with pytest.raises(ValueError, match="model.moe.dispatch='ragged'; allowed: dense, sorted"):
        moe.MoeConfig(dispatch="ragged")
    assert [moe.MoeConfig(every=2).in_layer(i) for i in range(4)] == [False, True, False, True]


def test_every_expert_matmul_goes_through_the_dot_general_hook():
    """The compression switch's activation quantization replaces `dot_general`: both
    expert matmuls (all experts batched) are its calls, in either dispatch, and the
    hook's result is what the block computes -- a hook that doubles every product makes a
    bias-free ReLU block exactly 4x the plain one (relu(2 a) = 2 relu(a))."""
    x = inputs()
    calls = []

    def doubling(lhs, rhs, dims, precision=None, preferred_element_type=None):
        calls.append(rhs.shape)
        return 2.0 * lax.dot_general(lhs, rhs, dims, precision=precision,
                                     preferred_element_type=preferred_element_type)

    for dispatch in moe.DISPATCHES:
        cfg = moe.MoeConfig(num_experts=4, top_k=2, capacity_factor=0.0, dispatch=dispatch)
        plain = moe.MoeBlock(cfg=cfg, hidden_dim=F, activation="relu", use_bias=False)
        hooked = moe.MoeBlock(cfg=cfg, hidden_dim=F, activation="relu", use_bias=False,
                              dot_general=doubling)
        params = init(plain, x)
        calls.clear()
        y, _ = hooked.apply({"params": params}, x)
        assert calls == [(4, D, F), (4, F, D)]
        y_plain, _ = plain.apply({"params": params}, x)
        np.testing.assert_allclose(np.asarray(y), 4.0 * np.asarray(y_plain), rtol=1e-5,
                                   atol=1e-6)
