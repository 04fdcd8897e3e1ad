"""train/optim.py against float64 NumPy closed forms and textbook update rules.

Every expected number is computed independently here (math / NumPy float64), never by
calling optax, so a wrong composition, off-by-one step or misplaced eps shows up.
Tiny arrays, no jit except where jit itself is under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import optim

RTOL = 2e-6  # float32 optimizer / schedule vs float64 reference


def cfg(**overrides):
    """default_config() with overrides; 'schedule' takes a dict of schedule overrides."""
    c = optim.default_config()
    for k, v in overrides.items():
        if k == "schedule":
            c.schedule.update(v)
        else:
            c[k] = v
    return c


# ----------------------------------------------------------------------------- paths


def test_path_str_joins_dict_keys_and_indices():
    tree = {"params_inner": {"decoder": {"layers_0": {"query": {"kernel": 1}}}},
            "stack": [2, {"bias": 3}]}
    paths = [optim.path_str(p) for p, _ in jax.tree.leaves_with_path(tree)]
    assert paths == ["params_inner/decoder/layers_0/query/kernel", "stack/0", "stack/1/bias"]


# ------------------------------------------------------------------------- schedules


def sched_values(schedule_overrides, lr, total, steps):
    c = cfg(learning_rate=lr, schedule=schedule_overrides)
    optim.validate(c, total)
    fn = optim.make_schedule(c.schedule, lr, total)
    eager = np.array([float(fn(t)) for t in steps])
    # The optimizer calls the schedule on a traced int32 count inside jit.
    jitted = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(jitted, eager, rtol=RTOL)
    return eager


def test_constant_schedule():
    np.testing.assert_allclose(sched_values({"name": "constant"}, 0.3, 10, [0, 5, 10]),
                               [0.3] * 3, rtol=RTOL)


def test_step_schedule_matches_steplr():
    lr, size, gamma, total = 0.1, 3, 0.5, 10
    steps = [0, 1, 2, 3, 4, 5, 6, 9, 10]
    want = [lr * gamma ** math.floor(t / size) for t in steps]
    got = sched_values({"name": "step", "step_size": size, "gamma": gamma}, lr, total, steps)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert got[2] == pytest.approx(0.1) and got[3] == pytest.approx(0.05)  # t = step_size


def test_exponential_schedule_matches_exponentiallr():
    lr, gamma, total = 0.2, 0.9, 20
    steps = [0, 1, 2, 7, 19, 20]
    got = sched_values({"name": "exponential", "gamma": gamma}, lr, total, steps)
    np.testing.assert_allclose(got, [lr * gamma ** t for t in steps], rtol=RTOL)


def cosine_ref(t, lr, eta_min, t_max):
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def test_cosine_schedule_t_max_zero_means_total_steps():
    lr, eta_min, total = 0.1, 0.01, 10
    steps = [0, 1, 5, 9, 10]
    got = sched_values({"name": "cosine", "eta_min": eta_min, "t_max": 0}, lr, total, steps)
    np.testing.assert_allclose(got, [cosine_ref(t, lr, eta_min, total) for t in steps],
                               rtol=RTOL)
    assert got[0] == pytest.approx(lr) and got[-1] == pytest.approx(eta_min)


def test_cosine_schedule_is_periodic_past_t_max_like_pytorch():
    lr, eta_min, t_max, total = 0.1, 0.01, 4, 10
    steps = list(range(11))
    got = sched_values({"name": "cosine", "eta_min": eta_min, "t_max": t_max}, lr, total,
                       steps)
    np.testing.assert_allclose(got, [cosine_ref(t, lr, eta_min, t_max) for t in steps],
                               rtol=RTOL, atol=1e-8)
    assert got[4] == pytest.approx(eta_min) and got[8] == pytest.approx(lr)


def warmup_cosine_ref(t, lr, warmup, total, frac):
    end = frac * lr
    if t < warmup:
        return lr * t / warmup
    if warmup == total:  # warmup only: no cosine phase left
        return lr
    t = min(t, total)
    return end + (lr - end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("warmup", [0, 5, 20])
def test_warmup_cosine_schedule(warmup):
    lr, total, frac = 0.4, 20, 0.1
    steps = [0, 1, 4, 5, 6, 12, 19, 20, 25]
    got = sched_values({"name": "warmup_cosine", "warmup_steps": warmup,
                        "end_lr_fraction": frac}, lr, total, steps)
    want = [warmup_cosine_ref(t, lr, warmup, total, frac) for t in steps]
    np.testing.assert_allclose(got, want, rtol=RTOL)
    if warmup == 5:
        assert got[0] == 0.0 and got[3] == pytest.approx(lr)  # t=0 and t=warmup_steps
    if warmup < total:
        assert got[7] == pytest.approx(frac * lr) and got[8] == pytest.approx(frac * lr)


def stlr_ref(t, lr, total, cut_frac, ratio):
    """Howard & Ruder 2018, eq. 3, verbatim."""
    cut = math.floor(total * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return lr * (1 + p * (ratio - 1)) / ratio


def test_slanted_triangular_matches_ulmfit():
    lr, total, cut_frac, ratio = 0.01, 100, 0.1, 32.0
    steps = [0, 1, 9, 10, 11, 50, 99, 100]
    got = sched_values({"name": "slanted_triangular", "cut_frac": cut_frac,
                        "ratio": ratio}, lr, total, steps)
    np.testing.assert_allclose(got, [stlr_ref(t, lr, total, cut_frac, ratio)
                                     for t in steps], rtol=RTOL)
    assert got[0] == pytest.approx(lr / ratio)    # t = 0: lr_max / ratio
    assert got[3] == pytest.approx(lr)            # t = cut: lr_max
    assert got[-1] == pytest.approx(lr / ratio)   # t = T: back to lr_max / ratio


def test_slanted_triangular_never_below_min_when_t_cut_frac_not_integer():
    # T=55: cut=5, the paper's decay phase lasts 45 < 50 steps and eq. 3 goes negative at
    # T; the schedule follows eq. 3 while it is >= lr/ratio and holds lr/ratio after.
    lr, total, cut_frac, ratio = 0.01, 55, 0.1, 32.0
    assert stlr_ref(total, lr, total, cut_frac, ratio) < 0
    steps = [0, 5, 30, 50, 51, 55]
    got = sched_values({"name": "slanted_triangular", "cut_frac": cut_frac,
                        "ratio": ratio}, lr, total, steps)
    want = [max(stlr_ref(t, lr, total, cut_frac, ratio), lr / ratio) for t in steps]
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_current_learning_rate_evaluates_the_schedule():
    c = cfg(learning_rate=0.1, schedule={"name": "step", "step_size": 2, "gamma": 0.5})
    assert [optim.current_learning_rate(c, 10, t) for t in (0, 1, 2, 5)] == \
        pytest.approx([0.1, 0.1, 0.05, 0.025])


# ------------------------------------------------------------- optimizers, 2 steps

W0 = np.array([0.5, -1.0, 2.0])
GRADS = [np.array([0.1, -0.2, 0.3]), np.array([-0.05, 0.4, 0.1])]


def f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def run(c, params, grads, total_steps=100, jit=False, return_updates=False):
    """Applies make_optimizer(c) to float32 `params` with the given gradient trees.

    Returns (history, final optimizer state); history holds the params after each step
    (float64 NumPy trees), or the updates if return_updates.
    """
    tx = optim.make_optimizer(c, total_steps)
    params = jax.tree.map(jnp.asarray, f32(params))
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    history = []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, f32(g)), state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree.map(lambda x: np.asarray(x, np.float64),
                                    updates if return_updates else params))
    return history, state


def run_w(c, **kw):
    history, _ = run(c, {"w": W0}, [{"w": g} for g in GRADS], **kw)
    return [h["w"] for h in history]


def test_sgd_with_step_schedule_uses_lr_of_step_0_then_1():
    c = cfg(name="sgd", learning_rate=0.1,
            schedule={"name": "step", "step_size": 1, "gamma": 0.5})
    w, want = W0.copy(), []
    for t, g in enumerate(GRADS):
        w = w - 0.1 * 0.5 ** t * g
        want.append(w)
    np.testing.assert_allclose(run_w(c), want, rtol=RTOL)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_pytorch(nesterov):
    lr, mu = 0.1, 0.9
    c = cfg(name="sgd", learning_rate=lr, momentum=mu, nesterov=nesterov)
    w, buf, want = W0.copy(), np.zeros(3), []
    for g in GRADS:  # torch.optim.SGD, dampening=0
        buf = mu * buf + g
        w = w - lr * (g + mu * buf if nesterov else buf)
        want.append(w)
    np.testing.assert_allclose(run_w(c), want, rtol=RTOL)


def adam_ref(w, grads, lr, b1, b2, eps, nesterov=False, wd_l2=0.0, wd_decoupled=0.0):
    """Adam (Kingma & Ba, bias-corrected, eps outside the sqrt); nesterov=True is optax's
    NAdam: m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)."""
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, start=1):
        g = g + wd_l2 * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        else:
            m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        w = w - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd_decoupled * w)
        out.append(w)
    return out


# eps = 0.1 is comparable to sqrt(v_hat), so eps placement and bias correction matter.
ADAM_HP = dict(learning_rate=0.05, b1=0.8, b2=0.9, eps=0.1)


def test_adam_matches_textbook():
    want = adam_ref(W0, GRADS, 0.05, 0.8, 0.9, 0.1)
    np.testing.assert_allclose(run_w(cfg(name="adam", **ADAM_HP)), want, rtol=RTOL)


def test_adam_weight_decay_is_coupled_l2():
    want = adam_ref(W0, GRADS, 0.05, 0.8, 0.9, 0.1, wd_l2=0.3)
    got = run_w(cfg(name="adam", weight_decay=0.3, **ADAM_HP))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_adamw_weight_decay_is_decoupled():
    want = adam_ref(W0, GRADS, 0.05, 0.8, 0.9, 0.1, wd_decoupled=0.3)
    got = run_w(cfg(name="adamw", weight_decay=0.3, **ADAM_HP))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_nadam_matches_optax_formula():
    want = adam_ref(W0, GRADS, 0.05, 0.8, 0.9, 0.1, nesterov=True)
    got = run_w(cfg(name="nadam", **ADAM_HP))
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # ... and it is not plain Adam.
    assert not np.allclose(got, adam_ref(W0, GRADS, 0.05, 0.8, 0.9, 0.1), rtol=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_rmsprop_matches_pytorch(momentum):
    lr, alpha, eps = 0.01, 0.9, 0.1
    c = cfg(name="rmsprop", learning_rate=lr, decay=alpha, eps=eps, momentum=momentum)
    w, v, buf, want = W0.copy(), np.zeros(3), np.zeros(3), []
    for g in GRADS:  # torch.optim.RMSprop: v_0 = 0, eps outside the sqrt
        v = alpha * v + (1 - alpha) * g * g
        buf = momentum * buf + g / (np.sqrt(v) + eps)
        w = w - lr * buf
        want.append(w)
    np.testing.assert_allclose(run_w(c), want, rtol=RTOL)


def test_nadam_has_no_pytorch_momentum_decay():
    """torch.optim.NAdam (momentum_decay psi = 0.004) differs from the first step."""
    lr, b1, b2, eps, psi = 0.05, 0.8, 0.9, 0.1, 0.004
    w, m, v, prod, torch_w = W0.copy(), np.zeros(3), np.zeros(3), 1.0, []
    for t, g in enumerate(GRADS, start=1):
        mu, mu_next = (b1 * (1 - 0.5 * 0.96 ** (s * psi)) for s in (t, t + 1))
        prod *= mu
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat = mu_next * m / (1 - prod * mu_next) + (1 - mu) * g / (1 - prod)
        w = w - lr * m_hat / (np.sqrt(v / (1 - b2 ** t)) + eps)
        torch_w.append(w)
    got = run_w(cfg(name="nadam", **ADAM_HP))
    assert np.abs(got[0] - torch_w[0]).max() > 1e-3


def test_rmsprop_momentum_under_a_schedule_keeps_each_step_s_lr():
    """optax: buf = mu buf + lr_t g / (sqrt(v) + eps), w -= buf; PyTorch: buf = mu buf +
    g / (sqrt(v) + eps), w -= lr_t buf. Equal at step 0, apart once the LR changes."""
    lr, alpha, eps, mu = 0.01, 0.9, 0.1, 0.7
    c = cfg(name="rmsprop", learning_rate=lr, decay=alpha, eps=eps, momentum=mu,
            schedule={"name": "step", "step_size": 1, "gamma": 0.5})
    w_optax, w_torch, v, b_optax, b_torch = W0.copy(), W0.copy(), np.zeros(3), 0.0, 0.0
    want, torch_w = [], []
    for t, g in enumerate(GRADS):
        v = alpha * v + (1 - alpha) * g * g
        lr_t, s = lr * 0.5 ** t, g / (np.sqrt(v) + eps)
        b_optax, b_torch = mu * b_optax + lr_t * s, mu * b_torch + s
        w_optax, w_torch = w_optax - b_optax, w_torch - lr_t * b_torch
        want.append(w_optax)
        torch_w.append(w_torch)
    got = run_w(c)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got[0], torch_w[0], rtol=RTOL)
    assert np.abs(got[1] - torch_w[1]).max() > 1e-4


def test_sgd_weight_decay_is_l2_added_to_gradient():
    lr, wd = 0.1, 0.2
    w, want = W0.copy(), []
    for g in GRADS:
        w = w - lr * (g + wd * w)
        want.append(w)
    np.testing.assert_allclose(run_w(cfg(name="sgd", learning_rate=lr, weight_decay=wd)),
                               want, rtol=RTOL)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_builds_from_defaults_and_jits(name):
    history, _ = run(cfg(name=name), {"w": W0}, [{"w": GRADS[0]}], jit=True)
    assert np.all(np.isfinite(history[0]["w"])) and not np.array_equal(history[0]["w"], W0)


# ------------------------------------------------ freezing, layer LR, decay mask, clip


def tree():
    return {"encoder": {"kernel": np.array([1.0, -2.0]), "bias": np.array([0.5])},
            "decoder": {"kernel": np.array([[0.3, -0.7], [1.1, 0.2]]),
                        "bias": np.array([-0.4, 0.9])},
            "head": {"frozen_w": np.array([3.0, 1.0, -1.0, 2.0, 0.5, 0.1, 7.0])}}


def grads_like(t, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=np.shape(x)), t)


def test_freeze_leaves_params_bit_identical_and_allocates_no_state():
    p0 = f32(tree())
    c = cfg(name="adamw", weight_decay=0.1, freeze=["^head/", "^encoder/bias$"],
            grad_clip_norm=1.0)
    history, state = run(c, p0, [grads_like(p0, s) for s in range(3)], jit=True)
    final = history[-1]
    assert np.array_equal(final["head"]["frozen_w"], p0["head"]["frozen_w"])
    assert np.array_equal(final["encoder"]["bias"], p0["encoder"]["bias"])
    assert not np.allclose(final["encoder"]["kernel"], p0["encoder"]["kernel"])
    assert not np.allclose(final["decoder"]["kernel"], p0["decoder"]["kernel"])
    # Adam's mu and nu exist for the 8 trainable numbers only (plus scalar counts).
    state_sizes = [np.size(x) for x in jax.tree.leaves(state)]
    assert sum(s for s in state_sizes if s > 1) == 2 * (2 + 4 + 2)
    assert (7,) not in [np.shape(x) for x in jax.tree.leaves(state)]


def test_frozen_gradients_do_not_count_toward_clipping():
    p0 = {"a": np.array([1.0]), "frozen": np.array([1.0])}
    g = {"a": np.array([0.5]), "frozen": np.array([1e6])}
    c = cfg(name="sgd", learning_rate=1.0, grad_clip_norm=1.0, freeze=["frozen"])
    history, _ = run(c, p0, [g])
    np.testing.assert_allclose(history[0]["a"], [0.5], rtol=RTOL)  # 0.5 < 1: unclipped


def test_layer_lr_multiplier_halves_the_update_first_match_wins():
    p0, g = tree(), grads_like(tree(), 0)
    base = cfg(name="sgd", learning_rate=0.1, momentum=0.9)
    # "decoder" matches both rules: the first (0.5) must win, not the second (0.25).
    multi = cfg(name="sgd", learning_rate=0.1, momentum=0.9,
                layer_lr=[("^decoder/", 0.5), ("kernel$", 0.25)])
    # Second-step updates (momentum carried over), as the optimizer returns them.
    u_base = run(base, p0, [g, g], return_updates=True)[0][-1]
    u_multi = run(multi, p0, [g, g], return_updates=True)[0][-1]
    # Multiplying by a power of two is exact in float32: bit-identical halves.
    for leaf in ("kernel", "bias"):
        assert np.array_equal(u_multi["decoder"][leaf], 0.5 * u_base["decoder"][leaf])
    assert np.array_equal(u_multi["encoder"]["kernel"], 0.25 * u_base["encoder"]["kernel"])
    assert np.any(u_base["decoder"]["kernel"] != 0)
    # No rule matches: multiplier 1, bit-identical update.
    assert np.array_equal(u_multi["encoder"]["bias"], u_base["encoder"]["bias"])
    assert np.array_equal(u_multi["head"]["frozen_w"], u_base["head"]["frozen_w"])


def test_layer_lr_equals_scaled_learning_rate_for_adam():
    p0, g = tree(), grads_like(tree(), 1)
    half_lr = run(cfg(name="adam", learning_rate=0.05), p0, [g, g])[0][-1]
    multi = run(cfg(name="adam", learning_rate=0.1, layer_lr=[(".*", 0.5)]), p0, [g, g])
    for a, b in zip(jax.tree.leaves(half_lr), jax.tree.leaves(multi[0][-1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_excludes_biases_scales_embeddings(name):
    """The default exclusions (open_clip's, timm's, Hugging Face's): every bias, named ones
    too (SigLIP's logit_bias, BERT's mlm_bias, the GRU's recurrent_bias), norm scales and
    CLIP's logit_scale, embeddings and ViT's class token; kernels, including named ones
    (combine_kernel) and a bias-free "biased" name, decay."""
    p0 = f32({"dense": {"kernel": np.array([1.0, -2.0]), "bias": np.array([0.5, 0.25])},
              "norm": {"scale": np.array([1.5])}, "embed": {"embedding": np.array([0.7])},
              "logit_scale": np.array(2.6), "logit_bias": np.array(-10.0),
              "head": {"mlm_bias": np.array([0.1]), "combine_kernel": np.array([0.3]),
                       "biased": np.array([0.9])},
              "vit": {"cls": np.array([0.2]), "pos_embedding": np.array([0.4])},
              "gru": {"recurrent_bias": np.array([0.6])}})
    zero = jax.tree.map(np.zeros_like, p0)
    lr, wd = 0.1, 0.2
    history, _ = run(cfg(name=name, learning_rate=lr, weight_decay=wd), p0, [zero])
    for path in (("dense", "kernel"), ("head", "combine_kernel"), ("head", "biased")):
        np.testing.assert_allclose(history[0][path[0]][path[1]],
                                   p0[path[0]][path[1]] * (1 - lr * wd), rtol=RTOL)
    for path in (("dense", "bias"), ("norm", "scale"), ("embed", "embedding"),
                 ("head", "mlm_bias"), ("vit", "cls"), ("vit", "pos_embedding"),
                 ("gru", "recurrent_bias")):
        assert np.array_equal(history[0][path[0]][path[1]], p0[path[0]][path[1]]), path
    for top in ("logit_scale", "logit_bias"):
        assert np.array_equal(history[0][top], p0[top]), top


def test_grad_clip_bounds_global_update_norm():
    p0 = {"a": np.zeros(3), "b": np.zeros(2)}
    big = {"a": np.array([3.0, 4.0, 0.0]), "b": np.array([12.0, 0.0])}  # norm 13
    c = cfg(name="sgd", learning_rate=1.0, grad_clip_norm=1.3)
    history, _ = run(c, p0, [big])
    got = np.concatenate([history[0]["a"], history[0]["b"]])
    np.testing.assert_allclose(got, -np.array([3.0, 4.0, 0.0, 12.0, 0.0]) / 10, rtol=RTOL)
    assert np.linalg.norm(got) <= 1.3 * (1 + 1e-6)
    # Below the threshold the gradient passes unchanged.
    small = jax.tree.map(lambda x: x / 100, big)
    history, _ = run(c, p0, [small])
    np.testing.assert_allclose(history[0]["b"], -small["b"], rtol=RTOL)


# ------------------------------------------------------------------- penalty


def test_regularization_penalty_l1_plus_l2_no_half_factor():
    p = tree()
    l1, l2, exclude = 0.01, 0.003, ["(^|/)bias$"]
    kept = [p["encoder"]["kernel"], p["decoder"]["kernel"], p["head"]["frozen_w"]]
    want = sum(l1 * np.abs(w).sum() + l2 * (w ** 2).sum() for w in kept)
    got = optim.regularization_penalty(p, l1, l2, exclude)
    assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, rel=1e-6)
    # Gradient of the L2 part is 2 * l2 * w (the documented convention).
    grad = jax.grad(optim.regularization_penalty)(p, 0.0, l2, exclude)
    np.testing.assert_allclose(grad["decoder"]["kernel"], 2 * l2 * p["decoder"]["kernel"],
                               rtol=1e-6)
    assert np.all(np.asarray(grad["decoder"]["bias"]) == 0)
    assert float(optim.regularization_penalty(p, 0.0, 0.0, exclude)) == 0.0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, key", [
    ({"name": "lamb"}, "optim.name"),
    ({"schedule": {"name": "linear"}}, "optim.schedule.name"),
    ({"learning_rate": 0.0}, "optim.learning_rate"),
    ({"learning_rate": -1e-3}, "optim.learning_rate"),
    ({"weight_decay": -0.1}, "optim.weight_decay"),
    ({"l1": -1.0}, "optim.l1"),
    ({"l2": -1.0}, "optim.l2"),
    ({"grad_clip_norm": -1.0}, "optim.grad_clip_norm"),
    ({"eps": 0.0}, "optim.eps"),
    ({"b1": 1.0}, "optim.b1"),
    ({"b2": -0.1}, "optim.b2"),
    ({"name": "sgd", "momentum": 1.0}, "optim.momentum"),
    ({"name": "rmsprop", "decay": 1.5}, "optim.decay"),
    ({"name": "adam", "nesterov": True}, "optim.nesterov"),
    ({"name": "sgd", "nesterov": True, "momentum": 0.0}, "optim.momentum"),
    ({"freeze": ["enc(oder"]}, "optim.freeze"),
    ({"weight_decay_exclude": ["[bias"]}, "optim.weight_decay_exclude"),
    ({"layer_lr": [("enc(", 0.5)]}, "optim.layer_lr"),
    ({"layer_lr": [("enc", -0.5)]}, "optim.layer_lr"),
    ({"layer_lr": [("enc",)]}, "optim.layer_lr"),
    ({"schedule": {"name": "step", "gamma": 0.0}}, "optim.schedule.gamma"),
    ({"schedule": {"name": "exponential", "gamma": -0.5}}, "optim.schedule.gamma"),
    ({"schedule": {"name": "step", "step_size": 0}}, "optim.schedule.step_size"),
    ({"schedule": {"name": "cosine", "t_max": -1}}, "optim.schedule.t_max"),
    ({"schedule": {"name": "cosine", "eta_min": -1e-3}}, "optim.schedule.eta_min"),
    ({"schedule": {"name": "warmup_cosine", "warmup_steps": 101}},
     "optim.schedule.warmup_steps"),
    ({"schedule": {"name": "warmup_cosine", "end_lr_fraction": 1.5}},
     "optim.schedule.end_lr_fraction"),
    ({"schedule": {"name": "slanted_triangular", "cut_frac": 1.0}},
     "optim.schedule.cut_frac"),
    ({"schedule": {"name": "slanted_triangular", "cut_frac": 0.001}},
     "optim.schedule.cut_frac"),  # floor(100 * 0.001) = 0 steps of warmup
    ({"schedule": {"name": "slanted_triangular", "ratio": 0.5}}, "optim.schedule.ratio"),
])
def test_validate_names_the_key(overrides, key):
    c = cfg(**overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        optim.validate(c, 100)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        optim.make_optimizer(c, 100)  # make_optimizer validates too


def test_validate_lists_allowed_names():
    with pytest.raises(ValueError) as e:
        optim.validate(cfg(name="lamb"), 100)
    assert all(n in str(e.value) for n in optim.OPTIMIZERS) and "lamb" in str(e.value)
    with pytest.raises(ValueError) as e:
        optim.validate(cfg(schedule={"name": "linear"}), 100)
    assert all(n in str(e.value) for n in optim.SCHEDULES)


def test_validate_total_steps_and_accepts_defaults():
    optim.validate(optim.default_config(), 1)
    with pytest.raises(ValueError, match="total_steps"):
        optim.validate(optim.default_config(), 0)
    # Keys that the chosen schedule does not use are not range-checked.
    optim.validate(cfg(schedule={"name": "cosine", "gamma": -1.0, "warmup_steps": 10**9}),
                   100)
