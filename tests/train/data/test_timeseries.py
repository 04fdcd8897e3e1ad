"""Forecasting windows: generated and real series, chronological splits, baselines."""
import numpy as np
import pytest

from train import data
from train.data import timeseries as ts


def _series_cfg(source="synthetic_series", **changes):
    c = data.default_config()
    c.source = source
    for k, v in changes.items():
        c[source][k] = v
    return c


def test_synthetic_series_is_deterministic_and_extends_consistently():
    v = ts.synthetic_series()
    assert v.shape == (20_000, 5) and v.dtype == np.float64 and np.isfinite(v).all()
    ts.synthetic_series.cache_clear()
    np.testing.assert_array_equal(ts.synthetic_series(), v)  # recomputed, not cached
    # Channel c and the first n steps do not depend on C or N.
    np.testing.assert_array_equal(ts.synthetic_series(500, 3), v[:500, :3])
    assert not np.allclose(ts.synthetic_series(500, 3, data_seed=1), v[:500, :3])


def test_synthetic_series_has_daily_and_weekly_seasons():
    v = ts.synthetic_series()
    x = v - v.mean(axis=0)
    power = np.abs(np.fft.rfft(x, axis=0)) ** 2
    freqs = np.fft.rfftfreq(len(v))
    # Strongest periodic component (ignoring the slow trend, periods > 1000) is daily.
    fast = freqs > 1 / 1000
    peak_period = 1 / freqs[fast][power[fast].argmax(axis=0)]
    np.testing.assert_allclose(peak_period, 24.0, rtol=0.01)
    week = np.argmin(np.abs(freqs - 1 / 168))
    median = np.median(power[fast], axis=0)
    assert (power[week] > 100 * median).all()


def test_splits_are_chronological_and_windows_are_slices():
    c = _series_cfg()
    sets = {s: data.make_dataset(c, s, seed=0) for s in data.SPLITS}
    tr = sets["train"]
    assert tr.bounds == {"train": (0, 14_000), "validation": (14_000, 16_000),
                         "test": (16_000, 20_000)}
    assert {s: d.num_windows for s, d in sets.items()} == {
        "train": 14_000 - 96 - 24 + 1, "validation": 2_000 - 24 + 1, "test": 4_000 - 24 + 1}
    for s, d in sets.items():
        start, end = d.bounds[s]
        assert d.starts.min() == max(start, 96) and d.starts.max() + 24 == end
        np.testing.assert_array_equal(np.diff(d.starts), 1)
        np.testing.assert_array_equal(d.series, tr.series)  # one series, train statistics
    # Target rows of the three splits are disjoint and in time order.
    last = [sets[s].starts.max() + 23 for s in data.SPLITS]
    first = [sets[s].starts.min() for s in data.SPLITS]
    assert last[0] < first[1] and last[1] < first[2]
    # Windows are exactly slices of the normalized series; inputs may reach into the
    # previous split but targets never do.
    for b in (tr.batch(3), next(sets["validation"].eval_batches(16)),
              next(sets["test"].eval_batches(16))):
        assert b["inputs"].shape[1:] == (96, 5) and b["targets"].shape[1:] == (24, 5)
        assert b["inputs"].dtype == b["targets"].dtype == np.float32
        for row, t in enumerate(b["start"]):
            np.testing.assert_array_equal(b["inputs"][row], tr.series[t - 96:t])
            np.testing.assert_array_equal(b["targets"][row], tr.series[t:t + 24])
    first_val = next(sets["validation"].eval_batches(1))
    assert first_val["start"][0] == 14_000  # its inputs are train rows 13904..13999


def test_normalization_uses_train_rows_only():
    values = np.arange(20, dtype=np.float64)[:, None] * np.array([1.0, -2.0, 0.0]) + [0, 0, 7]
    ds = ts.ForecastDataset(values, lookback=2, horizon=2, split="test", batch_size=2,
                            seed=0, fractions=(0.5, 0.25, 0.25))
    # Train rows 0..9: mean 4.5 and -9, std sqrt(8.25) and 2 sqrt(8.25); the constant
    # channel keeps std 1 instead of dividing by zero.
    np.testing.assert_allclose(ds.mean, [4.5, -9.0, 7.0])
    np.testing.assert_allclose(ds.std, [np.sqrt(8.25), 2 * np.sqrt(8.25), 1.0])
    np.testing.assert_allclose(ds.series[:, 0], (np.arange(20) - 4.5) / np.sqrt(8.25),
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.series[:, 2], 0.0)
    np.testing.assert_allclose(ds.denormalize(ds.series), values, atol=1e-5)
    # On the generated series: train rows are standardized, later rows are not.
    syn = data.make_dataset(_series_cfg(), "test", seed=0)
    raw = ts.synthetic_series()
    np.testing.assert_allclose(syn.mean, raw[:14_000].mean(axis=0))
    np.testing.assert_allclose(syn.std, raw[:14_000].std(axis=0))
    np.testing.assert_allclose(syn.series[:14_000].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(syn.series[:14_000].std(axis=0), 1.0, atol=1e-5)
    assert np.abs(syn.series[16_000:].mean(axis=0)).max() > 0.1  # test stats differ


def test_training_batches_are_random_access_and_cover_each_epoch():
    values = ts.synthetic_series(300, 2)
    make = lambda seed: ts.ForecastDataset(values, 24, 6, "train", 7, seed)  # noqa: E731
    a, b, other = make(3), make(3), make(4)
    assert a.num_windows == 210 - 24 - 6 + 1 == 181
    for t in (500, 0, 1, 77):  # any order: the batch is a function of (seed, step)
        np.testing.assert_array_equal(a.batch(t)["inputs"], b.batch(t)["inputs"])
    assert not np.array_equal(a.batch(0)["start"], other.batch(0)["start"])
    steps = -(-2 * a.num_windows // 7)
    starts = np.concatenate([a.batch(t)["start"] for t in range(steps)])
    for e in range(2):
        assert sorted(starts[e * 181:(e + 1) * 181]) == a.starts.tolist()


def test_eval_pass_in_time_order_with_stride_and_weights():
    values = ts.synthetic_series(300, 2)
    ds = ts.ForecastDataset(values, 24, 6, "validation", 7, 0, eval_stride=6)
    # Validation rows 210..239: first targets 210..234, every 6th -> 210, 216, ..., 234.
    np.testing.assert_array_equal(ds.eval_starts, np.arange(210, 235, 6))
    batches = list(ds.eval_batches(4))
    w = np.concatenate([x["weights"] for x in batches])
    np.testing.assert_array_equal(w, [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.concatenate([x["start"] for x in batches])[:5],
                                  ds.eval_starts)
    with pytest.raises(ValueError, match="lookback=24 and horizon=40"):
        ts.ForecastDataset(values, 24, 40, "validation", 7, 0)


def test_baseline_forecasts_match_hand_computation():
    inputs = np.arange(12, dtype=np.float32).reshape(2, 6, 1)  # rows 0..5 and 6..11
    np.testing.assert_array_equal(ts.naive_forecast(inputs, 4)[:, :, 0],
                                  [[5, 5, 5, 5], [11, 11, 11, 11]])
    # Season 3, lookback 6: step h reads input 6 - 3 + h % 3 -> inputs 3, 4, 5, 3.
    np.testing.assert_array_equal(ts.seasonal_naive_forecast(inputs, 4, 3)[:, :, 0],
                                  [[3, 4, 5, 3], [9, 10, 11, 9]])
    np.testing.assert_array_equal(ts.seasonal_naive_forecast(inputs, 2, 6)[0, :, 0], [0, 1])
    with pytest.raises(ValueError, match="lookback=6"):
        ts.seasonal_naive_forecast(inputs, 4, 7)
    ds = ts.ForecastDataset(ts.synthetic_series(300, 2), 24, 30, "train", 4, 0,
                            season_length=24)
    b = ds.batch(0)
    # One season before each target step (the last season repeated beyond h = 24).
    t = b["start"][:, None] + np.arange(30) % 24 - 24
    np.testing.assert_array_equal(ds.seasonal_naive_forecast(b["inputs"]),
                                  ds.series[t])
    np.testing.assert_array_equal(ds.naive_forecast(b["inputs"]),
                                  np.repeat(ds.series[b["start"] - 1][:, None], 30, 1))
    with pytest.raises(ValueError, match="season=48"):
        ds.seasonal_naive_forecast(b["inputs"], season=48)


def test_synthetic_seasonal_naive_beats_naive_on_test():
    ds = data.make_dataset(_series_cfg(), "test", seed=0)
    assert ds.season_length == 24
    assert ds.data_info() == {"channels": 5, "horizon": 24, "lookback": 96}
    err = ds.baseline_errors()
    print("synthetic test baselines:", {k: round(v, 4) for k, v in err.items()})
    # Measured: naive MSE 1.651 / MAE 1.031, seasonal naive MSE 0.255 / MAE 0.407.
    assert err["naive_mse"] == pytest.approx(1.651, abs=0.01)
    assert err["seasonal_naive_mse"] == pytest.approx(0.255, abs=0.01)
    assert err["seasonal_naive_mse"] < 0.2 * err["naive_mse"]


def test_real_series_loads_offline_with_documented_shape():
    values, names, season = ts.real_series("goog")
    assert values.shape == (1047, 5) == (ts.REAL_SERIES_LENGTHS["goog"], len(names))
    assert names == ts.GOOG_CHANNELS and season == 5
    # First day 2004-08-19: open 100.00, close 100.34, volume 22,351,900 (logs).
    np.testing.assert_allclose(values[0, [0, 3, 4]], np.log([100.0, 100.34, 22_351_900]))
    assert (values[:, 1] >= values[:, 2]).all()  # high >= low
    c = _series_cfg("real_series")
    sets = {s: data.make_dataset(c, s, seed=0) for s in data.SPLITS}
    assert sets["test"].bounds == {"train": (0, 733), "validation": (733, 838),
                                   "test": (838, 1047)}
    assert {s: d.num_windows for s, d in sets.items()} == {
        "train": 614, "validation": 82, "test": 186}
    err = sets["test"].baseline_errors()
    print("goog test baselines:", {k: round(v, 4) for k, v in err.items()})
    # Measured: naive MSE 0.228 / MAE 0.293, seasonal naive (5) MSE 0.253 / MAE 0.317.
    assert err["naive_mse"] == pytest.approx(0.228, abs=0.005)
    assert err["seasonal_naive_mse"] > err["naive_mse"]  # the weekly "season" is weak
    with pytest.raises(ValueError, match="'aapl'"):
        ts.real_series("aapl")


def test_real_series_missing_sample_data_is_a_clear_error(monkeypatch):
    from matplotlib import cbook
    monkeypatch.setattr(cbook, "get_sample_data", lambda *a, **k: "/nonexistent/goog.npz")
    with pytest.raises(FileNotFoundError, match="goog.npz"):
        ts.real_series("goog")


def test_default_series_config():
    c = data.default_config()
    for s in (c.synthetic_series, c.real_series):
        assert (s.lookback, s.horizon, s.series_eval_stride) == (96, 24, 1)
        assert s.series_split_fractions.to_dict() == {"train": 0.7, "validation": 0.1,
                                                      "test": 0.2}
    syn = c.synthetic_series
    assert (syn.series_length, syn.series_channels, syn.series_data_seed) == (20_000, 5, 0)
    assert c.real_series.real_series == "goog"
    c.update(source="synthetic_series", batch_size=8)
    syn.update(series_channels=7, series_length=3000, series_eval_stride=24)
    ds = data.make_dataset(c, "validation", seed=0)
    assert ds.batch(0)["inputs"].shape == (8, 96, 7)
    assert ds.num_eval_windows == len(range(0, 300 - 24 + 1, 24))


@pytest.mark.parametrize("changes,message", [
    ({"lookback": 0}, r"^data.synthetic_series.lookback=0 .*>= 1"),
    ({"horizon": -1}, r"^data.synthetic_series.horizon=-1"),
    ({"series_eval_stride": 0}, r"^data.synthetic_series.series_eval_stride=0"),
    ({"series_length": 1}, r"^data.synthetic_series.series_length=1 .*>= 2"),
    ({"series_channels": 0}, r"^data.synthetic_series.series_channels=0"),
    ({"series_data_seed": -1}, r"^data.synthetic_series.series_data_seed=-1"),
    ({"series_split_fractions": {"train": 0.7, "validation": 0.0, "test": 0.3}},
     r"^data.synthetic_series.series_split_fractions.validation=0.0 .*\(0, 1\]"),
    ({"series_split_fractions": {"train": 0.7, "validation": 0.2, "test": 0.2}},
     r"^data.synthetic_series.series_split_fractions=.*sum to 1"),
    ({"series_length": 150},
     r"^data.synthetic_series.lookback=96 .*train split of the 150-step"),
    ({"series_length": 200},
     r"^data.synthetic_series.horizon=24 .*validation split of the 200-step"),
    ({"source": "real_series", "real_series": "aapl"},
     r"^data.real_series.real_series='aapl'.*goog"),
    ({"source": "real_series", "lookback": 800}, r"^data.real_series.lookback=800 .*1047-step"),
    ({"source": "real_series", "horizon": 200},
     r"^data.real_series.horizon=200 .*validation split"),
    ({"source": "real_series", "series_eval_stride": 0},
     r"^data.real_series.series_eval_stride=0"),
])
def test_series_validation_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        data.validate(_series_cfg(**changes))
