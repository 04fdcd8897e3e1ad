"""Segmentation task: Dice loss, cross-entropy, pixel accuracy and IoU / Dice against
float64 NumPy (accumulated over batches with padded weight-0 examples), the Dice
gradient, the family's class count from the dataset's masks, errors, a tiny run."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from configs import unet as unet_configs
from train import config as config_lib
from train import families, trainer
from train.tasks import common
from train.tasks.segment import SegmentationTask, iou_and_dice, soft_dice_loss

K = 4


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_dice_loss(logits, labels, w, squared, eps):
    p = _np_softmax(logits.astype(np.float64))
    g = np.eye(logits.shape[-1])[labels]
    w = w.astype(np.float64)[..., None]
    axes = tuple(range(logits.ndim - 1))
    inter = (w * p * g).sum(axes)
    denom = (w * p ** (2 if squared else 1)).sum(axes) + (w * g * g).sum(axes)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice.mean(), dice


def _batch(seed, b=3, h=4, w=6, padded=0):
    r = np.random.default_rng(seed)
    logits = (2 * r.normal(size=(b, h, w, K))).astype(np.float32)
    labels = r.integers(0, K - 1, size=(b, h, w)).astype(np.int32)  # class K-1 never true
    weights = np.ones(b, np.float32)
    weights[b - padded:] = 0.0
    return logits, labels, weights


@pytest.mark.parametrize("squared,eps", [(True, 1.0), (False, 1e-3)])
def test_soft_dice_loss_equals_numpy(squared, eps):
    logits, labels, weights = _batch(0, padded=1)
    pixel_w = np.broadcast_to(weights[:, None, None], labels.shape)
    loss, dice = soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels),
                                jnp.asarray(pixel_w), squared=squared, eps=eps)
    want_loss, want_dice = _np_dice_loss(logits, labels, pixel_w, squared, eps)
    np.testing.assert_allclose(dice, want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # The padded example does not count: dropping it gives the same loss.
    alone, _ = soft_dice_loss(jnp.asarray(logits[:2]), jnp.asarray(labels[:2]),
                              jnp.ones(labels[:2].shape), squared=squared, eps=eps)
    np.testing.assert_allclose(loss, alone, rtol=1e-6)


def test_dice_of_a_perfect_prediction_is_one():
    labels = np.random.default_rng(1).integers(0, K, size=(2, 5, 5))
    logits = 50.0 * np.eye(K)[labels]  # softmax is one-hot to float precision
    for squared in (True, False):
        loss, dice = soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.ones(labels.shape), squared=squared, eps=1e-6)
        np.testing.assert_allclose(dice, 1.0, atol=1e-6)
        assert abs(float(loss)) < 1e-6


def test_soft_dice_loss_gradient_check():
    logits, labels, _ = _batch(2, b=2, h=3, w=3)
    w = np.array([[[1.0]], [[0.0]]]) * np.ones(labels.shape)
    with jax.enable_x64(True):  # float64 so finite differences are meaningful
        for squared in (True, False):
            f = lambda x: soft_dice_loss(x, jnp.asarray(labels), jnp.asarray(w),  # noqa
                                         squared=squared, eps=0.5)[0]
            check_grads(jax.jit(f), (jnp.asarray(logits, jnp.float64),), order=1,
                        modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


class _FixedLogits(nn.Module):
    """A stand-in model whose "prediction" for batch images is given logits, looked up
    by the example index carried in the image (so the task's plumbing is what's tested)."""
    table: np.ndarray

    @nn.compact
    def __call__(self, images, train: bool = False):
        return jnp.asarray(self.table)[images[:, 0, 0, 0].astype(jnp.int32)]


def _task(table, dice_weight=0.5, **task_overrides):
    c = config_lib.base_config("segment", "tiny", family="unet")
    c.task.dice_weight = dice_weight
    c.task.update(task_overrides)
    SegmentationTask.validate_config(c)
    datasets = {"train": _info(num_mask_classes=K)}
    return SegmentationTask(c, _FixedLogits(table), datasets)


def _info(**data_info):
    """A stand-in dataset: only data_info()."""
    return types.SimpleNamespace(data_info=lambda: data_info)


def _eval_batch(idx, labels, weights):
    images = np.zeros((len(idx),) + labels.shape[1:] + (3,), np.float32)
    images[:, 0, 0, 0] = idx
    return {"image": images, "mask": labels, "weights": weights}


def test_loss_is_cross_entropy_plus_weighted_dice():
    logits, labels, _ = _batch(3)
    task = _task(logits, dice_weight=0.5)
    batch = _eval_batch(np.arange(3), labels, np.ones(3, np.float32))
    loss, (metrics, _) = task.loss_fn({}, {}, batch, jax.random.key(0), False)
    x = logits.astype(np.float64)
    logp = np.log(_np_softmax(x))
    ce = -np.take_along_axis(logp, labels[..., None], -1).mean()
    dice_loss, _ = _np_dice_loss(logits, labels, np.ones(labels.shape), True, 1.0)
    np.testing.assert_allclose(loss, ce + 0.5 * dice_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["cross_entropy"][0] / metrics["cross_entropy"][1], ce,
                               rtol=1e-5)


def test_split_metrics_over_padded_batches_equal_numpy():
    """Two eval batches, the second padded with weight-0 copies: pixel accuracy, per-class
    IoU and Dice, mIoU (all / foreground) equal float64 NumPy on the 5 real examples."""
    logits, labels, _ = _batch(4, b=5, h=4, w=4)
    logits[..., K - 1] -= 3.0     # class K-1: sometimes predicted, never true (IoU 0)
    logits[..., 2] -= 100.0       # class 2: true somewhere, never predicted (IoU 0)
    task = _task(logits)
    batches = [(np.array([0, 1, 2]), np.ones(3, np.float32)),
               (np.array([3, 4, 0]), np.array([1, 1, 0], np.float32))]
    totals = None
    for idx, w in batches:
        batch = _eval_batch(idx, labels[idx], w)
        _, (metrics, _) = jax.jit(task.loss_fn, static_argnums=4)(
            {}, {}, batch, jax.random.key(0), False)
        totals = common.add_metrics(totals, metrics)
    means = common.finalize(jax.device_get(totals))
    got = {**means, **task.derived_metrics(means)}

    pred = logits.argmax(-1)
    assert 0 < (pred == K - 1).sum() and (pred == 2).sum() == 0 < (labels == 2).sum()
    assert got["pixel_accuracy"] == pytest.approx((pred == labels).mean(), abs=1e-12)
    ious, dices = [], []
    for k in range(K):
        i = np.sum((pred == k) & (labels == k), dtype=np.float64)
        u = np.sum((pred == k) | (labels == k), dtype=np.float64)
        assert got[f"iou_{k}"] == pytest.approx(i / u, abs=1e-12)
        assert got[f"dice_{k}"] == pytest.approx(
            2 * i / ((pred == k).sum() + (labels == k).sum()), abs=1e-12)
        ious.append(i / u)
        dices.append(got[f"dice_{k}"])
    assert got["iou_2"] == 0.0 and got[f"iou_{K - 1}"] == 0.0
    assert got["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert got["miou_foreground"] == pytest.approx(np.mean(ious[1:]), abs=1e-12)
    assert got["mean_dice"] == pytest.approx(np.mean(dices), abs=1e-12)
    x = logits.astype(np.float64)
    ce = -np.take_along_axis(np.log(_np_softmax(x)), labels[..., None], -1).mean()
    assert got["cross_entropy"] == pytest.approx(ce, rel=1e-5)


def test_iou_skips_classes_absent_from_target_and_prediction():
    out = iou_and_dice(np.array([6, 0, 2, 0]), np.array([8, 0, 4, 3]))
    assert "iou_1" not in out and "dice_1" not in out   # union 0: not present
    assert out["iou_0"] == 0.75 and out["iou_2"] == 0.5 and out["iou_3"] == 0.0
    assert out["dice_2"] == pytest.approx(2 * 2 / 6)    # 2 I / (I + U)
    assert out["miou"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert out["miou_foreground"] == pytest.approx(0.25)


@pytest.mark.parametrize("overrides,words", [
    (dict(dice_eps=0.0), "task.dice_eps"), (dict(dice_weight=-1.0), "task.dice_weight")])
def test_bad_task_options_raise(overrides, words):
    with pytest.raises(ValueError, match=words):
        _task(np.zeros((1, 2, 2, K), np.float32), **overrides)


def test_dataset_without_masks_is_refused():
    c = config_lib.base_config("segment", "tiny", family="unet")
    with pytest.raises(ValueError, match="per-pixel masks"):
        SegmentationTask(c, None, {"train": _info(num_classes=16)})


def test_unet_classes_come_from_the_masks_not_the_image_labels():
    section = config_lib.base_config("segment", "tiny", family="unet").model
    assert "num_classes" not in section          # a data field, filled by the dataset
    info = {"num_classes": 16, "num_mask_classes": 5, "image_size": 32}
    _, cfg = families.build(section, "segment", **info)
    assert cfg.num_classes == 5


def test_tiny_config_trains_end_to_end(tmp_path):
    c = unet_configs.get_config("tiny")
    c.train.num_steps = 4
    c.sharding.num_devices = 1
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["train/steps"] == 4
    for split in ("validation", "test"):
        assert 0.0 <= summary[f"{split}/miou"] <= 1.0
        assert 0.0 <= summary[f"{split}/miou_foreground"] <= 1.0
        assert 0.0 <= summary[f"{split}/pixel_accuracy"] <= 1.0
        assert np.isfinite(summary[f"{split}/loss"])
    assert (tmp_path / "segmentation.png").stat().st_size > 5_000
