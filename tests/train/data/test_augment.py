"""Augmentation (train/data/augment.py): deterministic given its key and pure in the step,
bit-for-bit identity at zero strength, images in range, masks aligned with their images
(checked against the shapes renderer's own geometry), mixup / CutMix soft labels and their
loss against float64 NumPy, config errors. (An augmented run through the trainer is
tests/train/test_tasks.py's ResNet tiny run.)"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip, gan, resnet, unet, vit
from train import config as config_lib
from train import sharding
from train.data import augment, augment_ops as ops, shapes, tfds_images
from train.tasks import common
from train.tasks.classify import ClassificationTask

S = 32  # rendered side
B = 16


@pytest.fixture(scope="module")
def rendered():
    """(attrs, image, mask, render key) of 16 rendered training examples."""
    ds = shapes.ShapesDataset("train", B, 0, num_examples=100, image_size=S)
    attrs = ds.attributes(np.arange(B))
    image, mask = shapes.render(attrs, S, ds.key)
    return attrs, image, mask, ds.key


def _run(policy, batch, key, keys=("image", "mask", "label"), num_classes=16, **kw):
    return jax.device_get(jax.jit(augment.Augmenter(policy, keys, num_classes, **kw))(
        batch, key))


def _colored(image):
    """Object pixels of a shapes image: saturated colors on a gray (+-0.04 noise) ground."""
    return (image.max(-1) - image.min(-1)) > 0.2


def _near_boundary(mask, r):
    """True within r pixels (Chebyshev) of a label change or of the image frame (where the
    boundary may lie just outside the picture)."""
    pad = np.pad(mask, ((0, 0), (r, r), (r, r)), constant_values=-1)
    h, w = mask.shape[1:]
    near = np.stack([pad[:, dy:dy + h, dx:dx + w] for dy in range(2 * r + 1)
                     for dx in range(2 * r + 1)])
    return (near != mask[None]).any(0)


def _rerender(attrs, matrices, key):
    """Render the same scenes seen through the affine maps (output -> source, per example):
    centers mapped by the inverse map, radii divided by its scale (a similarity)."""
    m = np.asarray(matrices, np.float64)
    lin, shift = m[:, :2, :2], m[:, :2, 2]
    centers = (attrs["centers"] - 0.5) * S                       # centered pixels
    out = np.einsum("bij,bkj->bki", np.linalg.inv(lin), centers - shift[:, None]) / S + 0.5
    scale = np.sqrt(np.abs(np.linalg.det(lin)))
    return shapes.render({**attrs, "centers": out, "radius": attrs["radius"] / scale}, S, key)


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("flip", 2.0, "data.shapes.augment.flip=2.0 is invalid: expected a number in [0.0, 1.0]"),
    ("crop_area_min", 0.0, "data.shapes.augment.crop_area_min=0.0 is invalid: expected a "
                           "number in (0.0, 1.0]"),
    ("crop_aspect", 0.5, "data.shapes.augment.crop_aspect=0.5 is invalid: expected a number "
                         ">= 1.0"),
    ("hue", 0.7, "data.shapes.augment.hue=0.7 is invalid: expected a number in [0.0, 0.5]"),
    ("mixup", -1.0, "data.shapes.augment.mixup=-1.0 is invalid: expected a number >= 0.0"),
    ("randaugment_ops", 11, "data.shapes.augment.randaugment_ops=11 is invalid: expected an "
                            "integer >= 0 and <= 10"),
])
def test_bad_values_name_the_full_key(key, value, message):
    c = vit.get_config("tiny")
    c.data.shapes.augment[key] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert str(e.value) == message
    section = tfds_images.default_config()  # every image source has the section
    section.augment[key] = value
    with pytest.raises(ValueError) as e:
        tfds_images.validate(section)
    assert str(e.value) == message.replace("data.shapes.", "data.tfds_images.")


def test_tasks_refuse_what_they_cannot_use():
    c = unet.get_config("tiny")
    c.data.shapes.augment.cutmix = 1.0
    with pytest.raises(ValueError, match=r"^data\.shapes\.augment\.cutmix=1\.0 is invalid: "
                       r"mixup / CutMix .*only task\.name='classify'.*'segment'"):
        config_lib.validate(c)
    c = gan.get_config("tiny")
    c.data.shapes.augment.flip = 0.5
    with pytest.raises(ValueError, match=r"data\.shapes\.augment is on, but task\.name='gan' "
                       r"takes no augmented images; allowed with task\.name in \('classify', "
                       r"'contrastive', 'segment'\)"):
        config_lib.validate(c)
    for module in (clip, unet):  # geometric and color ops are fine there
        c = module.get_config("tiny")
        c.data.shapes.augment.rotate = 10.0
        config_lib.validate(c)


def test_off_by_default_so_the_train_step_is_the_tasks_own():
    def step(state, batch):
        return state, batch
    for module in (vit, resnet, clip, unet):
        c = module.get_config("default")
        assert augment.for_run(c.data, ("image", "mask", "label"), {}) is None
        assert augment.wrap_train_step(step, None, jax.random.key(0)) is step
    c = vit.get_config("default")
    c.data.shapes.augment.flip = 0.5
    assert isinstance(augment.for_run(c.data, ("image", "label"), {"num_classes": 16}),
                      augment.Augmenter)


# ---- determinism --------------------------------------------------------------------------
class _State(NamedTuple):
    step: jax.Array


POLICY = augment.Policy(crop_area_min=0.5, flip=0.5, brightness=0.3)


def test_deterministic_given_the_key_and_pure_in_the_step(rendered):
    attrs, image, mask, _ = rendered
    batch = {"image": image, "mask": mask}
    train_key = jax.random.key(7)
    augmenter = jax.jit(augment.Augmenter(POLICY, ("image", "mask")))
    a = jax.device_get(augmenter(batch, augment.step_key(train_key, 5)))
    again = jax.device_get(augmenter(batch, augment.step_key(jax.random.key(7), 5)))
    other = jax.device_get(augmenter(batch, augment.step_key(train_key, 6)))
    for k in a:
        np.testing.assert_array_equal(a[k], again[k], err_msg=k)
    assert not np.array_equal(a["image"], other["image"])
    assert not np.array_equal(a["mask"], other["mask"])
    # Example i's draws depend on its position: no two examples get the same draws.
    u = jax.vmap(lambda k: augment.draws(POLICY, k))(augment.example_keys(
        augment.step_key(train_key, 5), B))
    assert len(np.unique(np.asarray(u)[:, 0])) == B
    # The trainer's hook, compiled afresh (as a restarted run would): the step of
    # state.step = 5 sees exactly that augmented batch.
    step = augment.wrap_train_step(lambda state, batch: batch, augment.Augmenter(
        POLICY, ("image", "mask")), train_key)
    seen = jax.device_get(jax.jit(step)(_State(jnp.int32(5)), batch))
    for k in a:
        np.testing.assert_array_equal(seen[k], a[k], err_msg=k)


# ---- identity and range --------------------------------------------------------------------
def test_every_op_is_the_identity_at_zero_strength_bit_for_bit(rendered):
    _, image, mask, _ = rendered
    x, m = jnp.asarray(image[0]), jnp.asarray(mask[0])
    for name, (y, n) in jax.device_get(jax.jit(_neutral_ops)(x, m)).items():  # one program
        np.testing.assert_array_equal(y, x, err_msg=name)
        if n is not None:
            np.testing.assert_array_equal(n, m, err_msg=name)
    # RandAugment at magnitude 0 draws real ops (rotations, shears, ... of size 0).
    batch = {"image": image, "mask": mask}
    out = _run(augment.Policy(randaugment_ops=1, randaugment_magnitude=0.0), batch,
               jax.random.key(0), keys=("image", "mask"))
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)


def _neutral_ops(x, m):
    """{op: (image, mask or None)} of every op at its neutral parameter."""
    out = {}
    neutral = {
        "rotation 0": ops.rotation_matrix(0.0), "no flip": ops.flip_matrix(False),
        "full crop": ops.crop_matrix(0.5, 0.5, 1.0, 1.0, S, S),
        "shear 0": ops.shear_matrix(0.0, 0.0), "translate 0": ops.translate_matrix(0, 0, S, S),
        "all composed": ops.compose(ops.crop_matrix(0.5, 0.5, 1.0, 1.0, S, S),
                                    ops.rotation_matrix(-0.0), ops.flip_matrix(False))}
    for name, matrix in neutral.items():
        out[name] = (ops.warp(x, matrix, order=1, fill=0.5), ops.warp(m, matrix, order=0))
    # Traced factors: no constant folding of f * x at f = 1.
    one, zero = jnp.float32(1.0) + 0 * x[0, 0, 0], 0 * x[0, 0, 0]
    for name, y in {"brightness": ops.adjust_brightness(x, one),
                    "contrast": ops.adjust_contrast(x, one),
                    "saturation": ops.adjust_saturation(x, one),
                    "hue": ops.rotate_hue(x, zero),
                    "sharpness": ops.sharpen(x, one), "solarize": ops.solarize(x, one),
                    "mixup lam 1": ops.mixup(x, x[::-1], one)}.items():
        out[name] = (y, None)
    return out


def test_images_stay_in_range(rendered):
    """Every op at full strength keeps images in [0, 1] -- here normalized ones ((x - mean)
    / std, a pretrained tower's), which are augmented in [0, 1] and normalized again."""
    attrs, image, mask, _ = rendered
    strong = augment.Policy(crop_area_min=0.1, crop_aspect=3.0, rotate=180.0, flip=1.0,
                            brightness=1.0, contrast=1.0, saturation=1.0, hue=0.5,
                            randaugment_ops=1, randaugment_magnitude=1.0, fill=1.0)
    mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
    batch = {"image": ((image - mean) / std).astype(np.float32), "mask": mask}
    out = _run(strong, batch, jax.random.key(1), keys=("image", "mask"), mean=tuple(mean),
               std=tuple(std))
    low, high = (0 - mean) / std, (1 - mean) / std
    assert (out["image"] >= low - 1e-6).all() and (out["image"] <= high + 1e-6).all()
    assert (out["image"] <= low + 1e-6).any() and (out["image"] >= high - 1e-6).any()
    assert np.abs(out["image"] * std + mean - image).mean() > 0.05  # changed, a lot
    assert set(np.unique(out["mask"])) <= set(range(5))


@jax.jit
def _warp_nearest(x, matrix):
    return ops.warp(x, matrix, order=0)


def test_geometry_conventions():
    """Exact on marked pixels (nearest): +90 degrees turns content counter-clockwise on
    screen, translate_matrix moves it right / down, crop_matrix zooms into its region."""
    def moved(matrix, size, at):
        x = jnp.zeros((size, size), jnp.int32).at[at].set(1)
        rows, cols = np.nonzero(np.asarray(_warp_nearest(x, matrix)))
        return tuple(rows.tolist()), tuple(cols.tolist())
    assert moved(ops.rotation_matrix(90.0), 9, (4, 8)) == ((0,), (4,))  # right -> top
    assert moved(ops.rotation_matrix(-90.0), 9, (4, 8)) == ((8,), (4,))  # right -> bottom
    assert moved(ops.translate_matrix(2 / 9, 3 / 9, 9, 9), 9, (4, 4)) == ((7,), (6,))
    assert moved(ops.flip_matrix(True), 9, (2, 1)) == ((2,), (7,))
    # The top-left quadrant of 8x8, twice as large: source pixel (1, 1) covers (2..3, 2..3).
    assert moved(ops.crop_matrix(0.25, 0.25, 0.5, 0.5, 8, 8), 8, (1, 1)) == (
        (2, 2, 3, 3), (2, 3, 2, 3))


# ---- masks aligned with images --------------------------------------------------------------
def test_flip_equals_rendering_the_mirrored_scene(rendered):
    """Every shape is left-right symmetric: a flipped example is the scene rendered with
    mirrored centers, mask pixel for pixel."""
    attrs, image, mask, key = rendered
    out = _run(augment.Policy(flip=1.0), {"image": image, "mask": mask}, jax.random.key(0),
               keys=("image", "mask"))
    centers = attrs["centers"].copy()
    centers[..., 0] = 1.0 - centers[..., 0]
    _, mirrored = shapes.render({**attrs, "centers": centers}, S, key)
    np.testing.assert_array_equal(out["mask"], mirrored)
    np.testing.assert_array_equal(_colored(out["image"]), mirrored > 0)
    np.testing.assert_array_equal(_colored(image), mask > 0)  # the detector is exact


@pytest.mark.parametrize("name,policy,circles", [
    ("crop", augment.Policy(crop_area_min=0.3, crop_aspect=1.0), False),
    ("crop+rotate+flip", augment.Policy(crop_area_min=0.4, crop_aspect=1.0, rotate=45.0,
                                        flip=0.5), True),
])
def test_crop_and_rotation_keep_masks_on_their_shapes(rendered, name, policy, circles):
    """The scene rendered through the example's drawn affine map (its inverse applied to the
    centers, radii scaled; circles where rotation would turn other shapes) is what the
    augmented mask and image show: mismatches only within 2 pixels of an edge (nearest /
    bilinear resampling of a 32-pixel picture), and a mask flipped, rotated the wrong way
    or left in place would fail this."""
    attrs, _, _, key = rendered
    if circles:
        attrs = {**attrs, "shape": np.zeros_like(attrs["shape"])}
    image, mask = shapes.render(attrs, S, key)
    step_key = jax.random.key(11)
    out = _run(policy, {"image": image, "mask": mask}, step_key, keys=("image", "mask"))
    u = jax.vmap(lambda k: augment.draws(policy, k))(augment.example_keys(step_key, B))
    matrices = jax.vmap(lambda u: augment.geometry(policy, u, S, S))(u)
    _, expected = _rerender(attrs, matrices, key)
    band = _near_boundary(expected, 2)
    assert not ((out["mask"] != expected) & ~band).any()
    assert not ((_colored(out["image"]) != (expected > 0)) & ~band).any()
    inter = ((out["mask"] > 0) & (out["mask"] == expected)).sum()
    assert inter / ((out["mask"] > 0) | (expected > 0)).sum() > 0.8
    # The maps are not the identity, and the same scene with the mask left unaugmented
    # does not pass the check.
    assert ((mask != expected) & ~band).any()


# ---- mixing ---------------------------------------------------------------------------------
MIX = augment.Policy(mixup=0.4, cutmix=1.0)
N_MIX, K_MIX, SIDE = 1024, 8, 8


def _mix_batch(n, k, side):
    """Example i is the constant image (i + 1) / (n + 1), label i mod k: different from its
    partner's (B-1-i: odd difference, even k), so each label's share is readable."""
    image = np.broadcast_to(((np.arange(n) + 1.0) / (n + 1))[:, None, None, None],
                            (n, side, side, 3)).astype(np.float32)
    return {"image": image, "label": (np.arange(n) % k).astype(np.int32)}


@pytest.fixture(scope="module")
def mixed():
    """(batch, out, is_cutmix bool[n]) of one mixup + CutMix pass (one compilation)."""
    batch = _mix_batch(N_MIX, K_MIX, SIDE)
    out = _run(MIX, batch, jax.random.key(5), keys=("image", "label"), num_classes=K_MIX)
    x, own = out["image"][..., 0], batch["image"][..., 0]
    partner = own[::-1]
    # CutMix leaves the two values (or one of them: an empty / full box); mixup a blend.
    is_cutmix = ((x != x[:, :1, :1]).any(axis=(1, 2)) | (x == own).all(axis=(1, 2))
                 | (x == partner).all(axis=(1, 2)))
    return batch, out, is_cutmix


def test_mixed_labels_sum_to_one_and_name_the_two_examples(mixed):
    batch, out, _ = mixed
    probs = out["label_probs"].astype(np.float64)
    assert probs.shape == (N_MIX, K_MIX) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    y, yp, rows = batch["label"], batch["label"][::-1], np.arange(N_MIX)
    np.testing.assert_allclose(probs[rows, y] + probs[rows, yp], 1.0, atol=1e-6)
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_mixup_blends_the_images_by_its_lambda(mixed):
    """x = lam x_i + (1 - lam) x_p with lam the label's share; lam ~ Beta(0.4, 0.4): mean
    1/2, variance 1 / (4 (2 alpha + 1)) (each example draws its own)."""
    batch, out, is_cutmix = mixed
    sel = np.flatnonzero(~is_cutmix)
    lam = out["label_probs"][sel, batch["label"][sel]].astype(np.float64)
    x = batch["image"][:, 0, 0, 0].astype(np.float64)
    np.testing.assert_allclose(out["image"][sel, 0, 0, 0],
                               lam * x[sel] + (1 - lam) * x[::-1][sel], atol=1e-6)
    assert (out["image"][sel] == out["image"][sel, :1, :1]).all()  # a whole-image blend
    alpha = MIX.mixup
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.mean() - 0.5) < 4 * np.sqrt(var / len(lam))
    assert abs(lam.var() - var) < 0.15 * var


def test_cutmix_area_equals_its_lambda(mixed):
    batch, out, is_cutmix = mixed
    sel = np.flatnonzero(is_cutmix)
    image = out["image"][sel, ..., 0]
    pasted = image == batch["image"][::-1][sel, ..., 0]   # the partner's pixels
    assert (pasted ^ (image == batch["image"][sel, ..., 0])).all()
    share = pasted.mean(axis=(1, 2))
    y, yp = batch["label"][sel], batch["label"][::-1][sel]
    np.testing.assert_allclose(out["label_probs"][sel, yp], share, atol=1e-6)
    np.testing.assert_allclose(out["label_probs"][sel, y], 1 - share, atol=1e-6)
    for i in range(len(sel)):  # the pasted pixels form one axis-aligned box
        rows, cols = np.nonzero(pasted[i])
        if rows.size:
            assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert 0.3 < share.mean() < 0.7 and (share > 0).mean() > 0.7
    # With both on, each example uses one of them with probability 1/2.
    assert abs(is_cutmix.mean() - 0.5) < 0.06


def test_eight_devices_equal_one(mixed):
    """The batch sharded over 8 devices (partners on other devices) mixes the same."""
    batch, out, _ = mixed
    sharded = jax.device_put(batch, sharding.batch_sharding(sharding.make_mesh()))  # 8
    eight = jax.device_get(jax.jit(augment.Augmenter(MIX, ("image", "label"), K_MIX))(
        sharded, jax.random.key(5)))
    for k in out:
        np.testing.assert_array_equal(out[k], eight[k], err_msg=k)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_label_loss_equals_numpy(eps):
    r = np.random.default_rng(0)
    n, k = 6, 5
    logits = (3 * r.normal(size=(n, k))).astype(np.float32)
    probs = r.dirichlet(np.ones(k), size=n).astype(np.float32)
    labels = r.integers(0, k, n).astype(np.int32)
    x = logits.astype(np.float64)
    log_q = x - x.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    target = (1 - eps) * probs.astype(np.float64) + eps / k
    loss, ce = common.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(probs), eps)
    np.testing.assert_allclose(loss, -(target * log_q).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(ce, -(probs * log_q).sum(-1), rtol=1e-5)
    # A one-hot target is the hard-label cross-entropy.
    hard = common.soft_cross_entropy(jnp.asarray(logits), jnp.eye(k)[labels], eps)[0]
    np.testing.assert_allclose(hard, common.cross_entropy(jnp.asarray(logits),
                                                          jnp.asarray(labels), eps)[0],
                               rtol=1e-6)
    # The classification task trains on label_probs and keeps accuracy on the hard labels.
    c = vit.get_config("tiny")
    c.task.label_smoothing = eps
    task = ClassificationTask(c, None, {})
    outputs = {"logits": jnp.asarray(logits), "targets": jnp.asarray(labels),
               "weights": jnp.ones(n)}
    objective, metrics = task.metrics_of(outputs, {"label": labels, "label_probs": probs})
    np.testing.assert_allclose(objective, -(target * log_q).sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"][0] / n, -(probs * log_q).sum(-1).mean(),
                               rtol=1e-5)
    assert float(metrics["accuracy"][0]) == (logits.argmax(-1) == labels).sum()
    with pytest.raises(ValueError, match="soft targets have 4 classes, the logits 5"):
        common.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(probs[:, :4]))
