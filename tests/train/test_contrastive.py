"""Contrastive losses against float64 NumPy, padding, zero-shot and retrieval on hand-made
examples, and the global-batch property across 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from train.tasks import contrastive_losses as C


def _embeddings(seed, n=6, d=5):
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return unit(r.normal(size=(n, d))), unit(r.normal(size=(n, d)))


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def numpy_infonce(img, txt, scale):
    logits = scale * img @ txt.T
    n = len(img)
    rows = -_log_softmax(logits, 1)[np.arange(n), np.arange(n)]
    cols = -_log_softmax(logits, 0)[np.arange(n), np.arange(n)]
    return 0.5 * (rows.mean() + cols.mean())


def numpy_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits))) / len(img)


def test_infonce_equals_float64_reference():
    img, txt = _embeddings(0)
    loss, _ = C.infonce_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                             14.3)
    np.testing.assert_allclose(loss, numpy_infonce(img, txt, 14.3), rtol=1e-5)
    # perfectly aligned embeddings with a large scale: loss -> 0; with scale 0: log N
    assert float(C.infonce_loss(jnp.eye(4), jnp.eye(4), 100.0)[0]) < 1e-6
    np.testing.assert_allclose(C.infonce_loss(jnp.eye(4), jnp.eye(4), 0.0)[0], np.log(4),
                               rtol=1e-6)


def test_siglip_equals_float64_reference():
    img, txt = _embeddings(1)
    loss, _ = C.siglip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                            10.0, -10.0)
    np.testing.assert_allclose(loss, numpy_siglip(img, txt, 10.0, -10.0), rtol=1e-5)


def numpy_multi_positive_infonce(img, txt, scale, pos):
    """UniCL's bidirectional loss (Yang et al. 2022, eq. 2-3) in float64: each row's and
    column's -log softmax averaged over its positives."""
    logits = scale * img @ txt.T
    rows = -(_log_softmax(logits, 1) * pos).sum(1) / pos.sum(1)
    cols = -(_log_softmax(logits, 0) * pos).sum(0) / pos.sum(0)
    return 0.5 * (rows.mean() + cols.mean())


def _positives(n, seed):
    """A random symmetric-free positives matrix with the diagonal set."""
    return (np.random.default_rng(seed).random((n, n)) < 0.3) | np.eye(n, dtype=bool)


def test_multi_positive_losses_equal_float64_references():
    img, txt = _embeddings(5, n=7)
    pos = _positives(7, 0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, _ = C.infonce_loss(f32(img), f32(txt), 9.0, positives=pos)
    np.testing.assert_allclose(loss, numpy_multi_positive_infonce(img, txt, 9.0, pos),
                               rtol=1e-5)
    # the identity (or no caption true of another image) is CLIP's loss exactly
    np.testing.assert_allclose(C.infonce_loss(f32(img), f32(txt), 9.0,
                                              positives=np.eye(7, dtype=bool))[0],
                               numpy_infonce(img, txt, 9.0), rtol=1e-5)
    # SigLIP: every positive pair is labelled +1; the diagonal always is
    logits = 10.0 * img @ txt.T - 5.0
    labels = 2.0 * pos - 1.0
    expect = np.sum(np.log1p(np.exp(-labels * logits))) / 7
    off_diagonal = pos & ~np.eye(7, dtype=bool)
    np.testing.assert_allclose(C.siglip_loss(f32(img), f32(txt), 10.0, -5.0,
                                             positives=off_diagonal)[0], expect, rtol=1e-5)


def test_multi_positive_infonce_gradients():
    pos = _positives(5, 1)
    with jax.enable_x64(True):  # float64 so finite differences are meaningful
        img, txt = (jnp.asarray(x, jnp.float64) for x in _embeddings(6, n=5))
        check_grads(lambda a, b: C.infonce_loss(a, b, 4.0, positives=pos)[0], (img, txt),
                    order=1, modes=["rev"])


def test_true_caption_pairs_reads_stated_facts():
    # facts (class, size); image 0: class 1 small; image 1: class 1 large; image 2: class 2
    facts = np.array([[1, 0], [1, 1], [2, 0]])
    stated = np.array([[True, False], [True, True], [True, True]])
    np.testing.assert_array_equal(C.true_caption_pairs(facts, facts, stated),
                                  [[True, False, False],   # "class 1" fits image 0 ...
                                   [True, True, False],    # ... and 1; "class 1 large" not 0
                                   [False, False, True]])


@pytest.mark.parametrize("loss_name", ["infonce", "siglip"])
@pytest.mark.parametrize("with_positives", [False, True])
def test_padded_examples_change_nothing(loss_name, with_positives):
    img, txt = _embeddings(2, n=5)
    img_p = np.concatenate([img, _embeddings(3, n=3)[0]])  # 3 padding rows of garbage
    txt_p = np.concatenate([txt, _embeddings(3, n=3)[1]])
    w = np.array([1.0] * 5 + [0.0] * 3)
    # padding rows claim every pair as a positive: weights must still drop them
    pos_p = np.ones((8, 8), bool)
    pos_p[:5, :5] = _positives(5, 2)
    pos, pos_p = (pos_p[:5, :5], pos_p) if with_positives else (None, None)
    if loss_name == "infonce":
        full = C.infonce_loss(img, txt, 7.0, positives=pos)[0]
        padded = C.infonce_loss(img_p, txt_p, 7.0, weights=w, positives=pos_p)[0]
    else:
        full = C.siglip_loss(img, txt, 7.0, -3.0, positives=pos)[0]
        padded = C.siglip_loss(img_p, txt_p, 7.0, -3.0, weights=w, positives=pos_p)[0]
    np.testing.assert_allclose(padded, full, rtol=1e-6)


def test_loss_on_global_batch_sharded_over_8_devices_equals_one_device():
    img, txt = _embeddings(4, n=16)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = [jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("data")))
               for x in (img, txt)]
    f = jax.jit(lambda a, b: C.infonce_loss(a, b, 10.0)[0])
    np.testing.assert_allclose(f(*sharded), numpy_infonce(img, txt, 10.0), rtol=1e-5)
    g = jax.jit(lambda a, b: C.siglip_loss(a, b, 10.0, -5.0)[0])
    np.testing.assert_allclose(g(*sharded), numpy_siglip(img, txt, 10.0, -5.0), rtol=1e-5)


def test_zero_shot_with_prompt_ensembling_picks_the_right_class():
    # 3 classes in 3-d; each class has 2 prompts whose embeddings scatter around its axis.
    prompts = np.array([[[1, 0.3, 0], [1, -0.3, 0]],
                        [[0.2, 1, 0], [-0.2, 1, 0.1]],
                        [[0, 0.1, 1], [0, -0.1, 1]]], np.float32)
    weights = C.zero_shot_classifier(jnp.asarray(prompts))
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(weights[0], [1, 0, 0], atol=1e-6)  # ensembling cancels noise
    images = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [0.1, 1.0, 0.0]], np.float32)
    scores = np.asarray(C.l2_normalize(images) @ weights.T)
    assert C.topk_accuracy(scores, np.array([0, 2, 1]), 1) == 1.0
    assert C.topk_accuracy(scores, np.array([1, 2, 1]), 1) == pytest.approx(2 / 3)
    assert C.topk_accuracy(scores, np.array([1, 2, 1]), 2) == 1.0


def test_retrieval_recall_on_a_hand_made_matrix():
    sim = np.array([[0.9, 0.1, 0.0],    # image 0: caption 0 first
                    [0.8, 0.5, 0.1],    # image 1: caption 1 second
                    [0.7, 0.6, 0.2]])   # image 2: caption 2 third
    r = C.retrieval_recall(sim, ks=(1, 2))
    assert r["image_to_text_r@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_r@2"] == pytest.approx(2 / 3)
    # columns: caption 0 -> image 0 best; caption 1 -> image 2 (0.6) beats image 1 (0.5);
    # caption 2 -> image 2 best
    assert r["text_to_image_r@1"] == pytest.approx(2 / 3)
    assert r["text_to_image_r@2"] == pytest.approx(1.0)
    # Caption 0 is also true of image 1 (captions repeat): image 1's best true caption is
    # now caption 0 at rank 0, and caption 0's best true image stays image 0.
    matches = np.eye(3, dtype=bool)
    matches[1, 0] = True
    r = C.retrieval_recall(sim, matches, ks=(1,))
    assert r["image_to_text_r@1"] == pytest.approx(2 / 3)
    assert r["text_to_image_r@1"] == pytest.approx(2 / 3)


def test_linear_probe_separates_separable_features_and_not_noise():
    r = np.random.default_rng(5)
    labels = r.integers(0, 3, size=300)
    centers = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    x = centers[labels] + r.normal(size=(300, 3))
    acc = C.linear_probe_accuracy(x[:200], labels[:200], x[200:], labels[200:], 3)
    assert acc > 0.95
    noise = r.normal(size=(300, 3))
    assert C.linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:],
                                   3) < 0.6


def test_true_caption_positives_config_and_missing_facts():
    from configs.clip import get_config
    from train import config as config_lib
    from train.tasks.contrastive import ContrastiveTask
    c = get_config("tiny")
    c.task.positives = "same_label"
    with pytest.raises(ValueError, match="task.positives='same_label'; allowed: pair, "
                                         "true_captions"):
        config_lib.validate(c)
    c.task.positives = "true_captions"
    config_lib.validate(c)
    task = ContrastiveTask(c, model=None, data={})
    with pytest.raises(ValueError, match='needs batches with "facts"'):
        task.positives({"image": np.zeros((2, 4, 4, 3)), "caption": np.zeros((2, 5))})
    facts = np.array([[1, 0], [1, 1]])
    stated = np.array([[True, False], [True, True]])
    np.testing.assert_array_equal(task.positives({"facts": facts, "facts_stated": stated}),
                                  [[True, False], [True, True]])
