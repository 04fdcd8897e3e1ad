"""The picture evaluators (train/evaluators/embeddings.py, attention_maps.py, confusion.py):
their helpers against float64 NumPy and closed forms, and each evaluator on a tiny config's
model and data writing its PNG and the same picture as a TensorBoard image.

The evaluators run on random parameters (no training: the pictures' plumbing is under
test; numbers are checked against the same model applied directly)."""
import importlib.util
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip, lstm, vit
from configs.common import add_eval
from models import clip as clip_models
from models import vit as vit_models
from train import config as config_lib
from train import evaluators, families
from train.evaluators import attention_maps as am
from train.evaluators import confusion, embeddings
from train.run_data import RunData
from train.tasks import make_task


# ----------------------------------------------------------------------------------------
# PCA and t-SNE.
# ----------------------------------------------------------------------------------------
def test_pca_recovers_the_principal_axis_of_a_hand_made_set():
    rng = np.random.default_rng(0)
    u = np.array([3.0, -1.0, 2.0, 0.5, 0.0]) / np.linalg.norm([3.0, -1.0, 2.0, 0.5, 0.0])
    v = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    v = (v - (v @ u) * u) / np.linalg.norm(v - (v @ u) * u)       # orthogonal to u
    t = rng.normal(size=(400, 2))
    x = (5.0 * t[:, :1] * u + 1.0 * t[:, 1:] * v + 0.05 * rng.normal(size=(400, 5))
         + np.array([10.0, -3.0, 2.0, 7.0, 1.0]))
    scores, comps, ratio = embeddings.pca(x)
    np.testing.assert_allclose(comps[0], u, atol=0.01)   # the axis, sign: largest entry > 0
    assert abs(comps[1] @ v) > 0.999
    # float64 reference: the eigen-decomposition of the covariance matrix.
    evals, evecs = np.linalg.eigh(np.cov(x.T, bias=True))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    np.testing.assert_allclose(ratio, evals[:2] / evals.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(comps * evecs[:, :2].T, axis=1)), 1.0, atol=1e-10)
    np.testing.assert_allclose(scores, (x - x.mean(0)) @ comps.T, atol=1e-10)
    np.testing.assert_allclose(scores.var(0), evals[:2], rtol=1e-10)
    # Points exactly on a line: the line is the first component and all of the variance.
    line = np.linspace(-2, 3, 50)[:, None] * u + 4.0
    _, comps, ratio = embeddings.pca(line)
    np.testing.assert_allclose(comps[0], u, atol=1e-12)
    assert ratio[0] == pytest.approx(1.0, abs=1e-12) and ratio[1] < 1e-20


def test_tsne_keeps_separated_clusters_apart():
    rng = np.random.default_rng(1)
    centers = 10.0 * np.eye(8)[:3]
    x = np.concatenate([c + rng.normal(size=(20, 8)) for c in centers])
    points, kl = embeddings.tsne(x, perplexity=30.0, seed=0)   # capped at (60 - 1) / 3
    assert points.shape == (60, 2) and np.isfinite(kl) and kl > 0
    labels = np.repeat(np.arange(3), 20)
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    nearest = np.argsort(d, axis=1)[:, 1]        # every point's nearest other point
    assert np.all(labels[nearest] == labels)


# ----------------------------------------------------------------------------------------
# Attention rollout.
# ----------------------------------------------------------------------------------------
def test_rollout_of_identity_attention_is_identity():
    w = np.broadcast_to(np.eye(6), (3, 2, 4, 6, 6))      # [L, B, H, T, T]
    np.testing.assert_array_equal(am.attention_rollout(w), np.broadcast_to(np.eye(6),
                                                                           (2, 6, 6)))


def test_rollout_of_uniform_attention_has_its_closed_form():
    """W = U (every row 1/T): A = (I + U) / 2 and, as U^2 = U, A^L = 2^-L I + (1 - 2^-L) U."""
    t, layers = 5, 3
    w = np.full((layers, 1, 2, t, t), 1.0 / t)
    want = 0.5 ** layers * np.eye(t) + (1 - 0.5 ** layers) / t
    np.testing.assert_allclose(am.attention_rollout(w)[0], want, atol=1e-15)


def test_rollout_equals_a_numpy_reference_on_random_row_stochastic_matrices():
    rng = np.random.default_rng(2)
    layers, b, h, t = 4, 2, 3, 5
    w = rng.dirichlet(np.ones(t), size=(layers, b, h, t))    # rows sum to 1
    w[1, 0, :, 2] = 0.0       # a query that attended nothing (masked): residual path only
    got = am.attention_rollout(w)
    for i in range(b):
        per_layer = []
        for layer in range(layers):
            mean = sum(w[layer, i, k] for k in range(h)) / h
            a = 0.5 * mean + 0.5 * np.eye(t)
            per_layer.append(a / a.sum(axis=1)[:, None])
        want = np.linalg.multi_dot(per_layer[::-1])        # A_L ... A_1
        np.testing.assert_allclose(got[i], want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="layers, batch, heads"):
        am.attention_rollout(w[0])


def test_relevance_maps_take_the_pooled_row_onto_the_patch_grid():
    r = np.zeros((1, 5, 5))
    r[0, 0] = [0.6, 0.1, 0.2, 0.3, 0.4]            # class token + a 2 x 2 patch grid
    maps = am.relevance_maps(r, "cls", patch=3)
    assert maps.shape == (1, 6, 6)
    np.testing.assert_array_equal(maps[0, :3, :3], 0.1)   # patch 0: top left
    np.testing.assert_array_equal(maps[0, :3, 3:], 0.2)   # patch 1: top right
    np.testing.assert_array_equal(maps[0, 3:, :3], 0.3)
    np.testing.assert_array_equal(maps[0, 3:, 3:], 0.4)
    gap = np.random.default_rng(3).dirichlet(np.ones(4), size=(1, 4))  # no class token
    np.testing.assert_allclose(am.relevance_maps(gap, "gap", 1)[0].ravel(), gap[0].mean(0))


def test_self_attention_weights_are_gathered_in_layer_order():
    w = {i: np.full((1, 2, 3, 3), float(i)) for i in range(11)}
    unrolled = {"encoder": {f"layers_{i}": {"self_attention": {"attention_weights": (w[i],)},
                                            "cross_attention": {"attention_weights": (-w[i],)}}
                            for i in (10, 2, 0)}, "encoded": (np.zeros(1),)}
    got = am.self_attention_weights(unrolled)
    assert got.shape == (3, 1, 2, 3, 3) and list(got[:, 0, 0, 0, 0]) == [0.0, 2.0, 10.0]
    scanned = {"encoder": {"layers": {"self_attention": {"attention_weights": (
        np.stack([w[0], w[1]]),)}}}}
    assert list(am.self_attention_weights(scanned)[:, 0, 0, 0, 0]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="no self-attention"):
        am.self_attention_weights({"encoded": (np.zeros(1),)})


def test_rollout_models_and_their_errors():
    fused = vit_models.ViT(vit_models.make_config("tiny/4", encoder={"attention_impl":
                                                                      "fused"}))
    module, method, cfg = am.vit_of(fused)        # the same function, weights materialized
    assert module.cfg.encoder.attention_impl == "reference" and method == "__call__"
    align = clip_models.ClipModel(clip_models.make_config("align_tiny"))
    with pytest.raises(ValueError, match="model.image_tower='efficientnet'"):
        am.vit_of(align)


# ----------------------------------------------------------------------------------------
# Confusion matrix and alignment statistics.
# ----------------------------------------------------------------------------------------
def test_confusion_matrix_equals_a_numpy_count():
    rng = np.random.default_rng(4)
    labels, preds = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    preds[:120] = labels[:120]
    weights = (rng.random(300) > 0.2).astype(np.float32)
    got = confusion.confusion_matrix(labels, preds, 5, weights)
    want = np.zeros((5, 5), np.int64)
    for y, p, wt in zip(labels, preds, weights):
        if wt > 0:
            want[y, p] += 1
    np.testing.assert_array_equal(got, want)
    keep = weights > 0
    stats = confusion.confusion_stats(got)
    assert stats["accuracy"] == pytest.approx(np.mean(labels[keep] == preds[keep]))
    recalls = [np.mean(preds[keep][labels[keep] == c] == c) for c in range(5)]
    assert stats["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert stats["min_recall"] == pytest.approx(min(recalls))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        confusion.confusion_matrix(labels, preds, 4)


def test_alignment_stats_of_hand_made_matrices():
    diagonal = am.alignment_stats([np.eye(4), np.eye(3)])
    assert diagonal == {"entropy": pytest.approx(0.0, abs=1e-9), "monotonic": 1.0}
    uniform = am.alignment_stats([np.full((3, 5), 0.2)])
    assert uniform["entropy"] == pytest.approx(np.log(5))
    assert am.alignment_stats([np.eye(4)[::-1]])["monotonic"] == 0.0


# ----------------------------------------------------------------------------------------
# The evaluators on tiny configs.
# ----------------------------------------------------------------------------------------
def _random_params(model, args, kwargs, seed=0):
    """Random parameters at scales that make a random network's outputs differ from image
    to image (an initialized ViT's zero head predicts one class; eval_shape: no init run):
    kernels N(0, 2^2 / fan_in), tables N(0, 0.5^2), norm scales 1 + N(0, 0.1^2), biases
    and scalars N(0, 0.1^2)."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args,
                                                        **kwargs)))["params"]
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name in ("embedding", "pos_embedding", "cls"):
            value = 0.5 * r.normal(size=s.shape)
        elif len(s.shape) >= 2:
            value = 2.0 * r.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            value = (name == "scale") + 0.1 * r.normal(size=s.shape)
        return jnp.asarray(value, s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _context(config, workdir):
    """(EvalContext of `config`: the trainer's model, task and data; random params; no
    model state -- the three families have none)."""
    config_lib.validate(config)
    data = RunData(config.data, config.seed)
    model, _ = families.build(config.model, config.task.name, **data.info)
    task = make_task(config, model, data)
    args, kwargs = task.init_args(data.train.batch(0, slice(0, 2)))
    ctx = evaluators.EvalContext(config=config, model=model, task=task, data=data,
                                 workdir=str(workdir), evaluate=None, init_variables=None,
                                 eval_key=jax.random.key(1))
    return ctx, _random_params(model, args, kwargs), {}


def _run(config, ctx, params, state, name, step=6, final=True):
    ev = evaluators.get_evaluator_class(name)(config.evals[name], ctx)
    return ev.run(step, params, state, final)


def _tensorboard_images(workdir) -> dict:
    """{tag: (step, width, height, PNG bytes)} of every image in <workdir>/tensorboard (the
    event files are TFRecords: length, its CRC, an Event proto, the data's CRC)."""
    from tensorboardX.proto import event_pb2
    found, logdir = {}, os.path.join(workdir, "tensorboard")
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    image = value.image
                    found[value.tag] = (event.step, image.width, image.height,
                                        image.encoded_image_string)
    return found


def _assert_published(workdir, pictures: dict, step: int):
    """Each {tag: file} PNG exists and is the TensorBoard image `tag` at `step`."""
    import matplotlib.image
    images = _tensorboard_images(workdir)
    for tag, filename in pictures.items():
        png = matplotlib.image.imread(os.path.join(workdir, filename))
        assert png.shape[0] > 100 and png.shape[1] > 100, filename
        got_step, width, height, encoded = images[tag]
        assert (got_step, height, width) == (step, png.shape[0], png.shape[1]), tag
        assert encoded[:8] == b"\x89PNG\r\n\x1a\n"


def test_vit_embeddings_rollout_and_confusion_matrix(tmp_path):
    c = vit.get_config("tiny")        # mean pooling ("gap"), 16 classes, 128 test images
    add_eval(c, "embeddings", examples=40)
    add_eval(c, "attention_rollout", images=3)
    add_eval(c, "confusion_matrix")
    ctx, params, state = _context(c, tmp_path)
    got = _run(c, ctx, params, state, "embeddings")
    # Float64 references from the features it embedded (the head's input, pre_logits):
    # their covariance's spectrum, and the head's predictions over the whole test split.
    features, labels = zip(*[(np.asarray(ctx.shared["pre_logits"]({"params": params},
                                                                   b["image"]), np.float64),
                              b["label"]) for b in ctx.data["test"].eval_batches(40)])
    keep = np.concatenate([b["weights"] > 0 for b in ctx.data["test"].eval_batches(40)])
    features, labels = np.concatenate(features)[keep], np.concatenate(labels)[keep]
    top = np.linalg.eigvalsh(np.cov(features[:40].T, bias=True))[::-1]
    assert got["points"] == 40 and got["heldout_points"] == 0
    assert got["pca_variance_2d"] == pytest.approx(top[:2].sum() / top.sum(), rel=1e-4)
    assert np.isfinite(got["tsne_kl"]) and got["tsne_kl"] > 0

    # A random ViT's features share one large mean: a head bias taking it out of the logits
    # makes the predictions vary from image to image.
    kernel = np.asarray(params["head"]["kernel"], np.float64)
    bias = -features.mean(0) @ kernel
    params = {**params, "head": {"kernel": params["head"]["kernel"],
                                 "bias": jnp.asarray(bias, jnp.float32)}}
    got = _run(c, ctx, params, state, "confusion_matrix")
    pred = np.argmax(features @ kernel + bias, -1)
    assert len(labels) == 128 and len(set(pred)) > 2          # a non-trivial matrix
    assert got["accuracy"] == pytest.approx(np.mean(pred == labels))
    recalls = [np.mean(pred[labels == k] == k) for k in np.unique(labels)]
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))

    got = _run(c, ctx, params, state, "attention_rollout")
    masks = next(iter(ctx.data["test"].eval_batches(3)))["mask"]
    assert got["object_area"] == pytest.approx(np.mean(masks > 0))
    assert 0.0 < got["object_relevance"] < 1.0
    _assert_published(str(tmp_path), {"embeddings/pca": "embeddings_pca.png",
                                      "embeddings/tsne": "embeddings_tsne.png",
                                      "attention_rollout/rollout": "attention_rollout.png",
                                      "confusion_matrix/confusion_matrix":
                                          "confusion_matrix.png"}, step=6)


def test_clip_embeddings_mark_the_heldout_classes_and_rollout_reads_the_class_token(
        tmp_path):
    c = clip.get_config("tiny")       # a ViT image tower pooled at the class token
    add_eval(c, "embeddings", examples=40, heldout_split="zero_shot", heldout_examples=20,
             methods=("pca",))
    add_eval(c, "attention_rollout", images=2)
    ctx, params, state = _context(c, tmp_path)
    got = _run(c, ctx, params, state, "embeddings", step=2, final=False)
    assert got["points"] == 60 and got["heldout_points"] == 20 and "tsne_kl" not in got
    # The picture's points: the first 40 test and 20 zero-shot images' joint embeddings.
    encode = lambda x: np.asarray(ctx.shared["clip_encoders"][0](  # noqa: E731
        {"params": params}, x), np.float64)
    emb = np.concatenate([encode(next(iter(ctx.data[s].eval_batches(n)))["image"][:n])
                          for s, n in (("test", 40), ("zero_shot", 20))])
    top = np.linalg.eigvalsh(np.cov(emb.T, bias=True))[::-1]
    assert got["pca_variance_2d"] == pytest.approx(top[:2].sum() / top.sum(), rel=1e-4)
    got = _run(c, ctx, params, state, "attention_rollout", step=2, final=False)
    assert 0.0 < got["object_relevance"] < 1.0
    _assert_published(str(tmp_path), {"embeddings/pca": "embeddings_pca_2.png",
                                       "attention_rollout/rollout":
                                           "attention_rollout_2.png"}, step=2)
    assert not os.path.exists(tmp_path / "embeddings_tsne_2.png")


def test_lstm_alignment(tmp_path):
    c = lstm.get_config("tiny")       # Bahdanau attention, digits -> words
    add_eval(c, "alignment", examples=3)
    ctx, params, state = _context(c, tmp_path)
    got = _run(c, ctx, params, state, "alignment")
    longest = ctx.data["test"].max_input_len
    assert got["examples"] == 3 and 0.0 < got["entropy"] <= np.log(longest)
    assert 0.0 <= got["monotonic"] <= 1.0
    _assert_published(str(tmp_path), {"alignment/alignment": "alignment.png"}, step=6)


# ----------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------
def test_default_configs_draw_the_pictures():
    for module, variant, names in ((vit, "default", ("embeddings", "attention_rollout",
                                                     "confusion_matrix")),
                                   (clip, "default", ("embeddings", "attention_rollout")),
                                   (lstm, "default", ("alignment",)),
                                   (lstm, "luong", ("alignment",))):
        c = module.get_config(variant)
        config_lib.validate(c)
        assert all(c.evals[n].every == 0 for n in names), (module.__name__, variant)
    assert clip.get_config("default").evals.embeddings.heldout_split == "zero_shot"


class _NoPictures(nn.Module):
    @nn.compact
    def __call__(self, x, *args, train=False):
        return jnp.zeros(x.shape[:1])


def test_bad_options_and_models_are_one_clear_error(monkeypatch):
    cls = evaluators.get_evaluator_class("embeddings")
    cfg = cls.default_config()
    cfg.methods = ("pca", "umap")
    with pytest.raises(ValueError, match=r"evals.embeddings.methods=.*allowed: .*pca, tsne"):
        cls.validate_config(cfg)
    cfg.methods, cfg.heldout_split = ("pca",), "test"
    with pytest.raises(ValueError, match="evals.embeddings.heldout_split='test' must differ"):
        cls.validate_config(cfg)
    cfg.heldout_split = ""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real_find_spec(name))
    cfg.methods = ("pca", "tsne")
    with pytest.raises(ValueError, match=r"'tsne' needs scikit-learn \(pip install -e "
                                         r"\"\.\[research\]\"\)"):
        cls.validate_config(cfg)
    cfg = evaluators.get_evaluator_class("alignment").default_config()
    cfg.examples = 0
    with pytest.raises(ValueError, match="evals.alignment.examples=0 must be >= 1"):
        evaluators.validate(config_lib.ml_collections.ConfigDict({"alignment": cfg}))
    x = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="evals.alignment: _NoPictures sows no alignment"):
        am.decoder_alignment(_NoPictures(), {"params": {}}, x, x)
    with pytest.raises(ValueError, match="evals.embeddings: _NoPictures neither encodes"):
        embeddings.image_embedder(_NoPictures(), {})({"params": {}}, jnp.zeros((2, 4)))
