"""Tasks: losses against float64 NumPy, BERT masking statistics, BLEU, one-step runs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert, clip, lstm, patchtst, resnet, vit
from configs import transformer as transformer_configs
from train import trainer
from train.data import augment
from train.data.tokenizers import BOS, MASK, NUM_SPECIAL, PAD
from train.main import format_summary
from train.tasks import common
from train.tasks.mlm import mask_tokens
from train.tasks.seq2seq import bleu_and_exact_match, shift_right


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_with_label_smoothing_equals_numpy(eps):
    r = np.random.default_rng(0)
    logits = r.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = r.integers(0, 7, size=(3, 5))
    loss, nll = common.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), eps)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
        -1, keepdims=True)
    onehot = np.eye(7)[targets]
    smoothed = (1 - eps) * onehot + eps / 7  # optax.smooth_labels' target distribution
    np.testing.assert_allclose(loss, -(smoothed * logp).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(nll, -(onehot * logp).sum(-1), rtol=1e-5)


def test_token_metrics_weights_and_finalize():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = jnp.array([[0, 2]])
    loss, metrics = common.token_metrics(logits, targets, jnp.array([[1.0, 0.0]]))
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)  # the weight-0 token is ignored
    means = common.finalize(jax.device_get(metrics))
    np.testing.assert_allclose(means["loss"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(common.perplexity(means["loss"]), 2.0, rtol=1e-6)
    assert means["accuracy"] == 1.0


def test_bert_masking_rates_and_specials():
    tokens = jax.random.randint(jax.random.key(0), (64, 512), NUM_SPECIAL, 260)
    tokens = tokens.at[:, :8].set(PAD).at[:, 8].set(BOS)  # specials are never selected
    corrupted, selected = mask_tokens(jax.random.key(1), tokens, mask_probability=0.15,
                                      mask_token_fraction=0.8, random_token_fraction=0.1,
                                      vocab_size=260)
    corrupted, selected, tokens = map(np.asarray, (corrupted, selected, tokens))
    assert not selected[:, :9].any()
    np.testing.assert_array_equal(corrupted[~selected], tokens[~selected])
    regular = 64 * (512 - 9)
    assert abs(selected.sum() / regular - 0.15) < 0.005
    sel_new, sel_old = corrupted[selected], tokens[selected]
    frac_mask = np.mean(sel_new == MASK)
    frac_same = np.mean(sel_new == sel_old)
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.01
    # "unchanged" also catches the 1/256 random draws that hit the original token
    assert abs(frac_same - (0.1 + 0.1 / 256)) < 0.01 and abs(frac_random - 0.1) < 0.01
    assert sel_new[sel_new != MASK].min() >= NUM_SPECIAL


def test_shift_right_and_bleu():
    np.testing.assert_array_equal(shift_right(jnp.array([[7, 8, 2, 0]])), [[BOS, 7, 8, 2]])
    refs = ["one thousand two hundred thirty-four", "seven", "forty-two thousand"]
    perfect = bleu_and_exact_match(refs, refs)
    assert perfect == {"bleu": pytest.approx(100.0), "exact_match": 1.0}
    partial = bleu_and_exact_match(["one thousand two hundred", "seven", "forty"], refs)
    # Corpus BLEU by hand (Papineni et al. 2002, sec. 2.3; sacrebleu's 13a tokens keep
    # "thirty-four" and "forty-two" whole): hypothesis 6 tokens, reference 8; n-gram
    # precisions 5/6 ("forty" matches nothing), 3/3, 2/2, 1/1; brevity penalty e^(1 - 8/6).
    assert partial["bleu"] == pytest.approx(100 * math.exp(1 - 8 / 6) * (5 / 6) ** 0.25,
                                            rel=1e-12)
    assert partial["exact_match"] == pytest.approx(1 / 3)


def test_bleu_is_zero_without_4_grams_even_when_every_decode_is_right():
    """sacrebleu's corpus BLEU: no 4-gram in the corpus -> 4-gram precision 0/0 -> BLEU 0."""
    refs = ["one hundred five", "seven", "forty two"]       # at most 3 tokens each
    assert bleu_and_exact_match(refs, refs) == {"bleu": 0.0, "exact_match": 1.0}
    refs.append("one thousand and six")                      # one 4-gram: BLEU 100
    assert bleu_and_exact_match(refs, refs)["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("config_module,variant", [
    (bert, "tiny"), (transformer_configs, "tiny"), (vit, "tiny"), (resnet, "tiny"),
    (clip, "tiny"), (lstm, "tiny"), (lstm, "tiny_classify"), (lstm, "tiny_forecast"),
    (patchtst, "tiny")])
def test_tiny_configs_train_end_to_end(tmp_path, monkeypatch, config_module, variant):
    c = config_module.get_config(variant)
    c.train.num_steps = 4
    c.sharding.num_devices = 1  # every family end to end; the 8-device runs are elsewhere
    traced = []  # the ResNet run's train step goes through the augmentation on device
    if config_module is resnet:
        a = c.data.shapes.augment
        a.crop_area_min, a.flip, a.mixup, a.cutmix = 0.6, 0.5, 0.4, 1.0
        call = augment.Augmenter.__call__
        monkeypatch.setattr(augment.Augmenter, "__call__", lambda self, batch, key: (
            traced.append(key) or call(self, batch, key)))
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["train/steps"] == 4
    assert len(traced) == (config_module is resnet)  # traced once, into the jitted step
    assert np.isfinite(summary["validation/loss"]) and np.isfinite(summary["test/loss"])
    if c.task.name == "forecast":
        for key in ("test/mse", "test/naive_mse", "test/seasonal_naive_mse", "test/mae"):
            assert summary[key] > 0, key
    if c.task.name == "seq2seq":
        for key in ("decode/test_bleu", "decode/test_exact_match", "decode/test_bleu_beam2",
                    "decode/validation_bleu"):
            assert 0.0 <= summary[key] <= 100.0
        assert (tmp_path / "decodes.txt").read_text().count("[test_beam2]") == 5
    if c.task.name == "classify":
        assert 0.0 <= summary["test/accuracy"] <= summary["test/top5_accuracy"] <= 1.0
    if config_module is clip:
        assert summary["zero_shot/num_classes"] == 16 and summary["zero_shot/chance"] == 1 / 16
        for key in ("zero_shot/top1", "zero_shot/top1_among_heldout", "zero_shot/test_top1",
                    "retrieval/image_to_text_r@1", "retrieval/text_to_image_r@5",
                    "linear_probe/accuracy"):
            assert 0.0 <= summary[key] <= 1.0, key
        assert (tmp_path / "similarity_heatmap.png").stat().st_size > 10_000
        # The among-held-out accuracy is the per-class accuracies weighted by class counts.
        from train.data import shapes  # noqa: PLC0415
        zero_shot = shapes.make(c.data.shapes, "zero_shot", 64, 0)
        batch = next(iter(zero_shot.eval_batches(c.data.shapes.shapes_split_sizes.zero_shot)))
        labels = batch["label"][batch["weights"] > 0]
        counts = {n: int(np.sum(labels == shapes.class_index(n)))
                  for n in c.data.shapes.heldout_classes}
        weighted = sum(k * summary[f"zero_shot/heldout_top1/{n.replace(' ', '_')}"]
                       for n, k in counts.items() if k) / sum(counts.values())
        assert weighted == pytest.approx(summary["zero_shot/top1_among_heldout"], abs=1e-6)
    text = format_summary({**summary, "sample": "abc"})
    assert "validation/loss" in text and text.endswith("sample:\nabc")


def test_forecast_baselines_equal_hand_computations():
    from train.tasks.forecast import naive_forecast, seasonal_naive_forecast
    x = jnp.arange(2 * 7 * 1, dtype=jnp.float32).reshape(2, 7, 1)  # series 0..6, 7..13
    np.testing.assert_array_equal(naive_forecast(x, 3)[:, :, 0], [[6, 6, 6], [13, 13, 13]])
    # season 3: the last 3 observed values (4, 5, 6) repeat: 4 5 6 4 5
    np.testing.assert_array_equal(seasonal_naive_forecast(x, 5, 3)[0, :, 0], [4, 5, 6, 4, 5])
    with pytest.raises(ValueError, match="lookback >= season"):
        seasonal_naive_forecast(x, 2, 8)
