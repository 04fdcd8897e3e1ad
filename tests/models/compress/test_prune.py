"""Pruning: exact sparsity, N:M groups, masks through optimizers, gradual schedule,
structured neurons/heads, report. References are float64 NumPy or closed forms."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.compress import prune
from models.compress.common import path_str


def _tree(seed=0, dtype=np.float32):
    """One kernel of each layout (+ a stacked one) and non-kernel leaves."""
    r = np.random.default_rng(seed)
    n = lambda *s: r.normal(size=s).astype(dtype)  # noqa: E731
    return {
        "dense": {"kernel": n(8, 12), "bias": n(12)},
        "attn": {"query": {"kernel": n(8, 2, 4), "bias": n(2, 4)},
                 "key": {"kernel": n(8, 2, 4), "bias": n(2, 4)},
                 "value": {"kernel": n(8, 2, 4), "bias": n(2, 4)},
                 "out": {"kernel": n(2, 4, 8), "bias": n(8)}},
        "conv": {"kernel": n(3, 3, 4, 8)},
        "layers": {"fc": {"kernel": n(3, 8, 4), "bias": n(3, 4)}},   # scanned: 3 layers
        "norm": {"scale": n(8)},
        "embed": {"embedding": n(10, 8)},
    }


KERNELS = ["dense/kernel", "attn/query/kernel", "attn/key/kernel", "attn/value/kernel",
           "attn/out/kernel", "conv/kernel", "layers/fc/kernel"]


def _flat(tree):
    return {path_str(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path(tree)}


def _assert_non_kernels_untouched(params, pruned, masks, kernels=KERNELS):
    fp, fq, fm = _flat(params), _flat(pruned), _flat(masks)
    for path in fp:
        if path not in kernels:
            np.testing.assert_array_equal(fq[path], fp[path])
            assert fq[path].dtype == fp[path].dtype and fm[path].all(), path


# ----------------------------------------------------------------------------------------
# Magnitude pruning.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_layer_magnitude_prunes_exactly_the_smallest_per_kernel_and_stacked_layer(sparsity):
    params = _tree()
    pruned, masks = prune.magnitude(params, sparsity=sparsity, scope="layer")
    fp, fq, fm = _flat(params), _flat(pruned), _flat(masks)
    for path in KERNELS:
        rows = 3 if path.startswith("layers/") else 1
        w, q, m = (a.reshape(rows, -1) for a in (fp[path], fq[path], fm[path]))
        for i in range(rows):
            k = round(sparsity * w.shape[1])
            # float64 reference: the k first of a stable argsort of |w|.
            ref = np.ones(w.shape[1], bool)
            ref[np.argsort(np.abs(w[i].astype(np.float64)), kind="stable")[:k]] = False
            np.testing.assert_array_equal(m[i], ref, err_msg=path)
            assert (q[i] == 0).sum() == k
            np.testing.assert_array_equal(q[i], np.where(ref, w[i], 0))
    _assert_non_kernels_untouched(params, pruned, masks)


def test_magnitude_with_ties_is_exact_and_deterministic():
    w = np.array([[1.0, -1.0, 1.0, 2.0], [1.0, 0.5, -1.0, 1.0]], np.float32)
    params = {"a": {"kernel": w}}
    _, masks = prune.magnitude(params, sparsity=0.5)
    # |w| sorted stably: 0.5 (idx 5), then the 1.0s in index order 0, 1, 2, 4 -> 0, 1, 2.
    expected = np.ones(8, bool)
    expected[[5, 0, 1, 2]] = False
    np.testing.assert_array_equal(np.asarray(masks["a"]["kernel"]).ravel(), expected)
    ones = {"a": {"kernel": np.ones((5, 7), np.float32)}}
    pruned, _ = prune.magnitude(ones, sparsity=0.4)
    assert int((np.asarray(pruned["a"]["kernel"]) == 0).sum()) == 14   # round(0.4 * 35)


@pytest.mark.parametrize("sparsity", [0.5, 0.77])
def test_global_magnitude_uses_one_threshold_and_exact_total(sparsity):
    params = _tree(seed=1)
    # Scale one kernel up so a global threshold prunes the layers unevenly.
    params["conv"]["kernel"] = params["conv"]["kernel"] * 10
    pruned, masks = prune.magnitude(params, sparsity=sparsity, scope="global")
    fp, fm = _flat(params), _flat(masks)
    scores = np.concatenate([np.abs(fp[p].astype(np.float64)).ravel() for p in KERNELS])
    k = round(sparsity * scores.size)
    ref = np.ones(scores.size, bool)
    ref[np.argsort(scores, kind="stable")[:k]] = False
    np.testing.assert_array_equal(np.concatenate([fm[p].ravel() for p in KERNELS]), ref)
    report = prune.sparsity_report(pruned)
    assert report.zeros == k and report.size == scores.size
    per = report.per_kernel()
    assert per["conv/kernel"] < sparsity < per["dense/kernel"]    # uneven per layer
    _assert_non_kernels_untouched(params, pruned, masks)


def test_magnitude_masks_traced_sparsity_matches_static():
    params = _tree(seed=2)
    _, static = prune.magnitude(params, 0.6, scope="layer")
    traced = jax.jit(lambda p, s: prune.magnitude_masks(p, s, scope="layer"))(
        params, jnp.float32(0.6))
    jax.tree.map(np.testing.assert_array_equal, static, traced)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_entries_pruned_by_old_masks_stay_pruned(scope):
    """Gradual pruning passes the current masks: their pruned entries rank first even when
    the weights there are large (not yet zeroed), so pruning only ever grows."""
    w = np.arange(1.0, 13.0, dtype=np.float32).reshape(3, 4)
    params = {"a": {"kernel": w}, "b": {"kernel": -w}}
    old = {"a": {"kernel": w < 12}, "b": {"kernel": w != 6}}    # prune the 12 and the -6
    new = prune.magnitude_masks(params, 0.25, scope, masks=old)  # 3 per kernel / 6 overall
    expected = {"a": np.isin(w, [1, 2, 12]), "b": np.isin(w, [1, 2, 6])}
    for name in ("a", "b"):
        np.testing.assert_array_equal(~np.asarray(new[name]["kernel"]), expected[name])


def test_embeddings_pruned_only_when_asked():
    params = _tree()
    _, masks = prune.magnitude(params, 0.5)
    assert np.asarray(masks["embed"]["embedding"]).all()
    _, masks = prune.magnitude(params, 0.5, include_embeddings=True)
    assert (~np.asarray(masks["embed"]["embedding"])).sum() == 40


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune.magnitude(_tree(), 1.5)
    with pytest.raises(ValueError, match="expected a scalar number"):
        prune.magnitude(_tree(), [0.5, 0.5])
    with pytest.raises(ValueError, match="scope must be one of"):
        prune.magnitude(_tree(), 0.5, scope="model")
    with pytest.raises(ValueError, match="1 <= n <= m"):
        prune.n_m(_tree(), n=5, m=4)


# ----------------------------------------------------------------------------------------
# N:M.
# ----------------------------------------------------------------------------------------
def _check_n_m(params, pruned, masks, n, m, kernels):
    fp, fq, fm = _flat(params), _flat(pruned), _flat(masks)
    for path in kernels:
        axis = prune.group_axis(path, fp[path].shape)
        w = np.moveaxis(fp[path].astype(np.float64), axis, -1).reshape(-1, m)
        q = np.moveaxis(fq[path], axis, -1).reshape(-1, m)
        np.testing.assert_array_equal((q != 0).sum(-1), n, err_msg=path)
        # The kept ones are the n largest |w| of each group.
        top = np.sort(np.argsort(-np.abs(w), axis=-1, kind="stable")[:, :n], axis=-1)
        np.testing.assert_array_equal(np.sort(np.nonzero(q)[1].reshape(-1, n), -1), top)
        np.testing.assert_array_equal(fm[path], fq[path] != 0)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2)])
def test_n_m_keeps_exactly_n_largest_per_group_of_each_layout(n, m):
    params = _tree(seed=3)
    pruned, masks = prune.n_m(params, n=n, m=m)
    _check_n_m(params, pruned, masks, n, m, KERNELS)
    _assert_non_kernels_untouched(params, pruned, masks)
    # Group axes: Dense/q/k/v axis 0, conv `in`, attention-out head_dim, stacked: after it.
    assert [prune.group_axis(p, _flat(params)[p].shape) for p in KERNELS] == [0, 0, 0, 0, 1,
                                                                                2, 1]


@pytest.mark.parametrize("scan", [False, True])
def test_n_m_on_a_tiny_gpt(scan):
    from configs import gpt
    from train import families
    c = gpt.get_config("tiny")
    c.model.scan_layers = scan
    model, _ = families.build(c.model, "lm", vocab_size=260)
    # The real tree (paths, shapes) from model.init, filled with N(0, 1) without running it.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda s: r.normal(size=s.shape).astype(s.dtype), shapes["params"])
    pruned, masks = prune.n_m(params, n=2, m=4)
    kernels = [row[0] for row in prune.sparsity_report(params).rows]   # kernel paths
    assert len(kernels) == (6 if scan else 12)
    _check_n_m(params, pruned, masks, 2, 4, kernels)
    _assert_non_kernels_untouched(params, pruned, masks, kernels)
    assert prune.sparsity_report(pruned).sparsity == 0.5


def test_n_m_indivisible_axis_errors_or_is_skipped():
    params = {"ok": {"kernel": np.ones((8, 3), np.float32)},
              "odd": {"kernel": np.ones((6, 4), np.float32)}}
    with pytest.raises(ValueError, match=re.escape("odd/kernel: N:M pruning groups m=4 "
                                                   "entries along axis 0, but shape (6, 4)")):
        prune.n_m(params, n=2, m=4)
    pruned, masks = prune.n_m(params, n=2, m=4, skip_indivisible=True)
    np.testing.assert_array_equal(pruned["odd"]["kernel"], params["odd"]["kernel"])
    assert prune.sparsity_report(masks).per_kernel() == {"ok/kernel": 0.5, "odd/kernel": 0.0}


# ----------------------------------------------------------------------------------------
# Masks through optimizer updates; gradual schedule.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [optax.adamw(1e-2, weight_decay=0.1),
                                   optax.sgd(1e-2, momentum=0.9)], ids=["adamw", "sgd"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(inner):
    params = _tree(seed=4)
    _, masks = prune.magnitude(params, 0.5)
    tx = prune.keep_pruned(inner, masks=masks)
    state = tx.init(params)          # params NOT pruned yet: the first update zeroes them

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    r = np.random.default_rng(0)
    p = params
    for _ in range(5):
        grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), x.dtype), params)
        p, state = step(p, state, grads)
    fp, fn, fm = _flat(params), _flat(p), _flat(masks)
    for path in fp:
        assert (fn[path][~fm[path]] == 0).all(), path
        assert (fn[path][fm[path]] != fp[path][fm[path]]).all(), path   # the rest trains
    jax.tree.map(np.testing.assert_array_equal,
                 optax.tree_utils.tree_get(state, "masks"), masks)


def test_polynomial_sparsity_equals_zhu_gupta_closed_form():
    si, sf, t0, t_end, dt = 0.1, 0.8, 10, 70, 20
    f = lambda t: prune.polynomial_sparsity(t, si, sf, t0, t_end, dt)  # noqa: E731
    for t, t_last in [(0, 10), (10, 10), (29, 10), (30, 30), (49, 30), (50, 50), (70, 70),
                      (100, 70)]:
        ref = sf + (si - sf) * (1 - (t_last - t0) / (t_end - t0)) ** 3
        np.testing.assert_allclose(float(f(t)), ref, rtol=1e-6)
    values = np.asarray(jax.vmap(f)(jnp.arange(0, 90)))
    changes = np.nonzero(np.diff(values))[0] + 1
    np.testing.assert_array_equal(changes, [30, 50, 70])  # only at t0 + k * dt
    with pytest.raises(ValueError, match="multiple of frequency"):
        prune.polynomial_sparsity(0, 0.0, 0.5, 0, 50, 20)


def test_gradual_pruning_in_a_jitted_step_reaches_each_target_exactly():
    params = _tree(seed=5)
    schedule = dict(initial_sparsity=0.0, final_sparsity=0.75, begin_step=2, end_step=8,
                    frequency=2, scope="layer")
    tx = prune.keep_pruned(optax.adam(1e-2), schedule=schedule)
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    r = np.random.default_rng(1)
    sched = prune.GradualSchedule(**schedule)
    p, prev = params, _flat(state.masks)
    for t in range(11):
        grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), x.dtype), params)
        p, state = step(p, state, grads)
        fm, fp = _flat(state.masks), _flat(p)
        s_t = float(sched.sparsity(t))
        for path in KERNELS:
            w = fm[path].reshape(3 if path.startswith("layers/") else 1, -1)
            target = round(s_t * w.shape[1]) if t >= 2 else 0
            np.testing.assert_array_equal((~w).sum(-1), target, err_msg=f"{path} step {t}")
            assert (fp[path][~fm[path]] == 0).all()
            assert not (fm[path] & ~prev[path]).any()        # pruned once, pruned forever
        prev = fm
    assert int(state.count) == 11
    assert prune.sparsity_report(p).per_kernel()["dense/kernel"] == 0.75


def test_update_masks_leaves_masks_alone_off_schedule():
    params = _tree(seed=6)
    masks = prune.all_true_masks(params)
    sched = prune.GradualSchedule(0.0, 0.5, begin_step=0, end_step=10, frequency=5)
    f = jax.jit(lambda p, m, t: prune.update_masks(p, m, t, sched))
    same = f(params, masks, 3)
    jax.tree.map(np.testing.assert_array_equal, same, masks)
    pruned = f(params, masks, 5)          # s = 0.5 - 0.5 * 0.5**3 = 0.4375
    assert prune.sparsity_report(pruned).per_kernel()["dense/kernel"] == round(
        0.4375 * 96) / 96
    with pytest.raises(ValueError, match="unknown gradual-pruning keys"):
        prune.update_masks(params, masks, 0, {"final": 0.5})


# ----------------------------------------------------------------------------------------
# Structured pruning.
# ----------------------------------------------------------------------------------------
def test_neurons_removes_whole_columns_and_channels_with_smallest_norm():
    params = _tree(seed=7)
    pruned, masks = prune.neurons(params, count=3, paths=r"^(dense|conv|layers/fc)/")
    fp, fq = _flat(params), _flat(pruned)
    for path, rows in [("dense/kernel", 1), ("conv/kernel", 1), ("layers/fc/kernel", 3)]:
        w = fp[path].astype(np.float64).reshape(rows, -1, fp[path].shape[-1])
        q = fq[path].reshape(w.shape)
        for i in range(rows):
            removed = np.sort(np.argsort(np.linalg.norm(w[i], axis=0))[:3])
            zero_cols = np.nonzero((q[i] == 0).all(axis=0))[0]
            np.testing.assert_array_equal(zero_cols, removed, err_msg=path)
            assert (q[i][:, np.setdiff1d(np.arange(w.shape[-1]), removed)] != 0).all()
            bias = path.replace("kernel", "bias")
            if bias in fq:
                b = fq[bias].reshape(rows, -1)[i]
                assert (b[removed] == 0).all() and (b != 0).sum() == w.shape[-1] - 3
    np.testing.assert_array_equal(fq["attn/query/kernel"], fp["attn/query/kernel"])
    with pytest.raises(ValueError, match="exactly one of fraction"):
        prune.neurons(params, fraction=0.5, count=2)


@pytest.mark.parametrize("layout", ["mha", "gqa", "fused", "stacked"])
def test_heads_removes_whole_heads_with_smallest_norm(layout):
    r = np.random.default_rng(8)
    h, kv, d, f = 4, (2 if layout == "gqa" else 4), 3, 6
    rows = 2 if layout == "stacked" else 1
    s = (rows,) if layout == "stacked" else ()
    w = lambda *shape: (r.normal(size=s + shape) * r.uniform(0.2, 2.0, s + (1,) * len(shape))
                        ).astype(np.float32)  # noqa: E731
    q, k, v = w(f, h, d), w(f, kv, d), w(f, kv, d)
    o = w(h, d, f)
    attn = {"out": {"kernel": o, "bias": w(f)}}
    if layout == "fused":
        attn["qkv"] = {"kernel": np.concatenate([q, k, v], -2)}
    else:
        attn.update(query={"kernel": q, "bias": w(h, d)}, key={"kernel": k}, value={"kernel": v})
    params = {"block": {"layers" if layout == "stacked" else "attn": attn}}
    pruned, masks = prune.heads(params, count=2)
    attn_p = next(iter(pruned["block"].values()))
    for i in range(rows):
        qi, ki, vi, oi = (a.reshape((rows,) + a.shape[len(s):])[i] for a in (q, k, v, o))
        g = np.arange(h) // (h // kv)
        score = ((qi ** 2).sum((0, 2)) + (oi ** 2).sum((1, 2)) + (ki ** 2).sum((0, 2))[g]
                 + (vi ** 2).sum((0, 2))[g])
        removed = np.sort(np.argsort(score)[:2])
        out_p = np.asarray(attn_p["out"]["kernel"]).reshape((rows, h, d, f))[i]
        zero_heads = np.nonzero((out_p == 0).all(axis=(1, 2)))[0]
        np.testing.assert_array_equal(zero_heads, removed)
        qp = (np.asarray(attn_p["qkv"]["kernel"])[..., :h, :] if layout == "fused"
              else np.asarray(attn_p["query"]["kernel"])).reshape((rows, f, h, d))[i]
        np.testing.assert_array_equal(np.nonzero((qp == 0).all(axis=(0, 2)))[0], removed)
        kept_kv = np.unique(g[np.setdiff1d(np.arange(h), removed)])
        kp = (np.asarray(attn_p["qkv"]["kernel"])[..., h:h + kv, :] if layout == "fused"
              else np.asarray(attn_p["key"]["kernel"])).reshape((rows, f, kv, d))[i]
        np.testing.assert_array_equal(np.nonzero((kp != 0).all(axis=(0, 2)))[0], kept_kv)
    if layout == "mha":
        np.testing.assert_array_equal(np.asarray(attn_p["query"]["bias"])[removed], 0)
        np.testing.assert_array_equal(attn_p["out"]["bias"], attn["out"]["bias"])


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
def test_sparsity_report_counts_and_markdown():
    params = {"a": {"kernel": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32),
                    "bias": np.zeros(2, np.float32)},
              "b": {"kernel": np.ones((2, 3), np.float32)}}
    rep = prune.sparsity_report(params)
    assert rep.rows == (("a/kernel", (2, 2), 2, 4), ("b/kernel", (2, 3), 0, 6))
    assert rep.sparsity == 0.2 and rep.other_params == 2 and rep.overall_sparsity == 2 / 12
    md = rep.to_markdown().splitlines()
    assert md[2] == "| a/kernel | 2x2 | 2 | 4 | 50.00% |"
    assert md[-2] == "| **kernels** | | 2 | 10 | 20.00% |"
    masks = jax.tree.map(lambda x: np.asarray(x) != 0, params)
    assert prune.sparsity_report(masks).rows == rep.rows
