"""LSTM / GRU models: seq2seq with attention, sequence classification, forecasting.

    python -m train.main --config=configs/lstm.py --workdir=runs/lstm_seq2seq
    python -m train.main --config=configs/lstm.py:luong --workdir=runs/lstm_luong
    python -m train.main --config=configs/lstm.py:classify --workdir=runs/lstm_classify
    python -m train.main --config=configs/lstm.py:forecast --workdir=runs/lstm_forecast
    python -m train.main --config=configs/lstm.py:imdb --workdir=runs/lstm_imdb   # needs TFDS

Variants:
  default   bidirectional LSTM encoder + LSTM decoder with Bahdanau (additive) attention on
            numbers -> words, the same task and metrics (BLEU, exact match, greedy and beam)
            as configs/transformer.py. README "Results" has the measured numbers.
  luong     the same with Luong "general" attention.
  classify  embedding -> bi-LSTM -> attention pooling -> classifier on the embedded text
            task: which of 12 standard-library modules a 256-byte window comes from.
  imdb      the same classifier on TFDS imdb_reviews (prepared as ArrayRecord by TFDS).
  forecast  LSTM forecaster with instance normalization on the generated series (the
            same data and baselines as configs/patchtst.py).
  tiny, tiny_classify, tiny_forecast   seconds-long smoke runs (tests).

Measured on 2 CPU cores (steps/s of the runs that had them alone):
  default   over 3 seeds (train.sweep --sweep="" --seeds=3): test BLEU 99.99 ± 0.02
            (greedy), 100.00 (beam 4), exact match 99.9 ± 0.1% after 2000 steps, 8.8
            steps/s alone, ~4.5 minutes a run (the target: BLEU >= 90 within 10 minutes).
  luong     over 3 seeds: test BLEU 99.79 ± 0.33 (greedy; ties with the default by
            Welch's test), 99.78 ± 0.34 (beam 4), exact match 99.2 ± 1.2% (97.8-100.0%),
            2000 steps, ~3 minutes a run.
  classify  over 3 seeds: test accuracy 56.4 ± 0.2% over 12 modules (chance 8.3%; top-5
            83.9 ± 1.6%), 1500 steps, 5.5 steps/s, ~5 minutes a run.
  forecast  over 3 seeds (train.sweep --sweep="" --seeds=3): test MSE 0.0917 ± 0.0005 vs
            naive 1.651 and seasonal-naive 0.255 (MAE 0.240 ± 0.001 vs 1.031 / 0.407), 1000
            steps -- PatchTST on the same split: 0.1285 ± 0.0003.
Pictures (default, luong): alignment.png, the attention of the first 4 test decodes (Bahdanau
et al. 2015, fig. 3); default: 1.26 nats per row (uniform over a 7-token source: 1.95), the
most attended source position not moving back in 75% of the steps.
"""
from configs.common import add_eval, cadence, series_forecasting, warmup_cosine
from train.config import base_config, shrink_for_smoke_test

VARIANTS = ("default", "luong", "classify", "imdb", "forecast", "tiny", "tiny_classify",
            "tiny_forecast")


def _seq2seq(attention: str):
    c = base_config("seq2seq", "tiny", family="rnn", embed_dim=64, hidden=128,
                    bidirectional=True, attention=attention)
    c.data.source = "numbers_to_words"
    c.data.batch_size = 64
    c.data.numbers_to_words.max_eval_examples = 1000
    c.evals.decode.max_examples = 500
    warmup_cosine(c, 2e-3, warmup_steps=100)
    cadence(c, 2000, 500)
    return c


def _classify(source: str):
    c = base_config("classify", "tiny", family="rnn", embed_dim=64, hidden=128,
                    bidirectional=True, pooling="attention", dropout=0.3)
    c.task.input_key = "tokens"
    c.data.source = source
    c.data.batch_size = 32
    warmup_cosine(c, 2e-3, warmup_steps=100, weight_decay=0.01)
    cadence(c, 1500, 250)
    c.checkpoint.best_metric, c.checkpoint.best_mode = "validation/accuracy", "max"
    c.train.early_stopping.update(metric="validation/accuracy", mode="max", patience=3)
    if source == "tfds":
        c.data.tfds.tfds_name = "imdb_reviews"
        c.data.tfds.label_key = "label"
        c.data.tfds.tfds_splits.validation = "test[:50%]"
        c.data.tfds.tfds_splits.test = "test[50%:]"
        c.data.tfds.max_eval_examples = 2000
    return c


def _forecast():
    c = base_config("forecast", "tiny", family="rnn", hidden=64, num_layers=1)
    series_forecasting(c, learning_rate=2e-3)
    return c


def get_config(variant: str = "default"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown lstm variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if variant in ("default", "luong", "tiny"):
        c = _seq2seq("luong_general" if variant == "luong" else "bahdanau")
        if variant != "tiny":
            add_eval(c, "alignment")   # alignment.png: the attention of a few decodes
    elif variant in ("classify", "imdb", "tiny_classify"):
        c = _classify("tfds" if variant == "imdb" else "text_classification")
    else:
        c = _forecast()
    if variant.startswith("tiny"):
        shrink_for_smoke_test(c, num_steps=4, batch_size=8, eval_batch_size=16, log_every=2,
                              eval_every=2)
        if variant == "tiny":
            c.data.numbers_to_words.max_eval_examples = 32
            c.evals.decode.max_examples = 16
            c.evals.decode.beam_size = 2
        if variant == "tiny_forecast":
            c.data.synthetic_series.series_length = 2000
            c.data.synthetic_series.lookback = 48
            c.data.synthetic_series.horizon = 12
        if variant == "tiny_classify":
            c.data.text_classification.seq_len = 64
    return c
