"""Forecasting windows over multivariate time series (no download).

Two series, both float64[N, C] before normalization:

* ``synthetic_series`` (source "synthetic_series"): C channels of "hourly" data, each
      level + slope * t + slow wave            trend (period 3000-8000 steps)
    + daily (period 24) wave + 2nd harmonic    dominant season: ``DAY`` = 24
    + weekly (period 168) wave + weekend dip   second season: ``WEEK`` = 168
    + AR(1) noise                              partly shared between channels
  with per-channel amplitudes, phases and noise drawn from ``data_seed`` (not the run
  seed). Channel c and the first n steps do not depend on C or N: a longer or wider
  series extends a shorter one. Seasonal-naive (season 24) is therefore far better
  than naive, and a model can beat both by also using the week and averaging out noise.
* ``real_series("goog")`` (source "real_series"): Google daily prices 2004-08-19 ..
  2008-10-14 (1047 trading days) from matplotlib's sample data (installed with
  matplotlib, no download): channels log open, log high, log low, log close, log volume.
  Logs make price moves and volume multiplicative-scale; "adj_close" equals "close" in
  this file and is dropped. Its season is the trading week (5), which is weak: prices
  are close to a random walk, so naive is the strong baseline here. (The other sample
  files are unsuitable: Stocks.csv is ~390 monthly rows with gaps, msft.csv 64 rows,
  eeg.dat 800 x 4, membrane.dat univariate.)

Splits are chronological by *target* time: rows [0, n1) train, [n1, n2) validation,
[n2, N) test with n1 = round(f_train * N), n2 = n1 + round(f_val * N). A window whose
first target step is t has inputs rows [t - L, t) and targets rows [t, t + H); the
split owns every t with all H targets inside its rows. Inputs may reach back into the
previous split (they are the past, known at forecast time), but no target row belongs
to two splits. Normalization: per-channel mean and std of the TRAIN rows only, applied
to the whole series (so validation/test statistics never leak); models may add their
own instance normalization on top.

Baselines (same definitions as ``train/tasks/forecast.py``): naive repeats the last
input value; seasonal naive with season m predicts step h by input L - m + (h mod m),
i.e. the value one season before the target (the last observed season, repeated).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import ml_collections
import numpy as np

from train.data import checks
from train.data.base import RandomAccessDataset, Source

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DAY, WEEK = 24, 168
DEFAULT_LENGTH = 20_000
DEFAULT_CHANNELS = 5
REAL_SERIES = ("goog",)
REAL_SERIES_LENGTHS = {"goog": 1047}  # rows N, so config validation need not load the file
GOOG_CHANNELS = ("log_open", "log_high", "log_low", "log_close", "log_volume")
GOOG_SEASON = 5  # trading days per week


def _unit_ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """float64[n]: stationary AR(1) with unit variance, x_t = phi x_{t-1} + sqrt(1-phi^2) e_t."""
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0], k = e[0], np.sqrt(1.0 - phi * phi)
    for t in range(1, n):  # 20k steps: ~10 ms, and no scipy dependency for lfilter
        x[t] = phi * x[t - 1] + k * e[t]
    return x


@functools.lru_cache(maxsize=8)
def synthetic_series(length: int = DEFAULT_LENGTH, channels: int = DEFAULT_CHANNELS,
                     data_seed: int = 0) -> np.ndarray:
    """float64[length, channels] (read-only, cached); see the module docstring.

    Channel c's parameters come from ``default_rng([data_seed, c])`` and its noise from
    its own stream, so channels and prefixes are stable when C or N change.
    """
    if length < 1 or channels < 1:
        raise ValueError(f"need length >= 1 and channels >= 1, got {length}, {channels}")
    t = np.arange(length, dtype=np.float64)
    common = _unit_ar1(np.random.default_rng([data_seed, 1_000_000]), length, 0.8)
    dow = (t // DAY) % 7  # day of week; days 5 and 6 are the "weekend"
    out = np.empty((length, channels))
    for c in range(channels):
        r = np.random.default_rng([data_seed, c])
        u = lambda lo, hi: r.uniform(lo, hi)  # noqa: E731  (draw order fixes the series)
        level, slope = u(-1, 1), u(-0.5, 0.5) / 10_000
        slow_amp, slow_period, slow_phase = u(0.2, 0.5), u(3000, 8000), u(0, 2 * np.pi)
        day_amp, harm = u(0.8, 1.5), u(0.2, 0.5)
        day_phase, harm_phase = u(0, 2 * np.pi), u(0, 2 * np.pi)
        week_amp, week_phase, weekend = u(0.3, 0.6), u(0, 2 * np.pi), u(0.0, 0.4)
        noise_std, phi, shared = u(0.2, 0.35), u(0.6, 0.9), u(0.3, 0.7)
        own = _unit_ar1(np.random.default_rng([data_seed, c, 1]), length, phi)
        w = 2 * np.pi * t
        out[:, c] = (level + slope * t + slow_amp * np.sin(w / slow_period + slow_phase)
                     + day_amp * (np.sin(w / DAY + day_phase)
                                  + harm * np.sin(2 * w / DAY + harm_phase))
                     + week_amp * np.sin(w / WEEK + week_phase) - weekend * (dow >= 5)
                     + noise_std * (shared * common + np.sqrt(1 - shared ** 2) * own))
    out.flags.writeable = False  # cached and shared
    return out


def real_series(name: str = "goog") -> tuple[np.ndarray, tuple[str, ...], int]:
    """-> (values float64[N, C], channel names, season length) of an installed real series.

    "goog": float64[1047, 5] (see the module docstring). Raises ValueError for an unknown
    name and FileNotFoundError if matplotlib's sample data is not installed.
    """
    if name not in REAL_SERIES:
        raise ValueError(f"real series {name!r} is unknown; available: {REAL_SERIES}")
    try:
        from matplotlib import cbook  # lazy: matplotlib is only needed for this series
        path = cbook.get_sample_data("goog.npz", asfileobj=False)
        with np.load(path) as z:
            rec = z["price_data"]
    except (ImportError, OSError, KeyError) as e:
        raise FileNotFoundError(
            "real_series 'goog' reads matplotlib's sample data goog.npz "
            "(matplotlib.cbook.get_sample_data); install matplotlib>=3.8 with its mpl-data"
        ) from e
    cols = [rec[k].astype(np.float64) for k in ("open", "high", "low", "close", "volume")]
    return np.log(np.stack(cols, axis=1)), GOOG_CHANNELS, GOOG_SEASON


def split_bounds(length: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
                 ) -> dict[str, tuple[int, int]]:
    """{"train", "validation", "test"} -> [start, end) rows owned as targets (contiguous,
    in time order; test takes the rest after rounding)."""
    n1 = int(round(length * fractions[0]))
    n2 = n1 + int(round(length * fractions[1]))
    return {"train": (0, n1), "validation": (n1, n2), "test": (n2, length)}


def normalization_stats(values: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64[C] of the train rows only; a constant channel gets std 1."""
    start, end = split_bounds(len(values), fractions)["train"]
    train = np.asarray(values, np.float64)[start:end]
    std = train.std(axis=0)
    return train.mean(axis=0), np.where(std > 0, std, 1.0)


def naive_forecast(inputs: np.ndarray, horizon: int) -> np.ndarray:
    """[B, L, C] -> [B, horizon, C]: the last input value repeated."""
    return np.repeat(inputs[:, -1:, :], horizon, axis=1)


def seasonal_naive_forecast(inputs: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """[B, L, C] -> [B, horizon, C]: step h is input L - season + (h mod season)."""
    lookback = inputs.shape[1]
    if not 1 <= season <= lookback:
        raise ValueError(f"seasonal naive needs 1 <= season <= lookback, got season={season}, "
                         f"lookback={lookback}: increase the series' lookback "
                         "(data.synthetic_series.lookback or data.real_series.lookback)")
    return inputs[:, lookback - season + np.arange(horizon) % season, :]


class ForecastDataset(RandomAccessDataset):
    """Random-access look-back/horizon windows of one chronological split.

    Args:
      values: float[N, C] raw series (the whole series, all splits).
      lookback: L input steps (> 0).
      horizon: H target steps (> 0).
      split: "train" | "validation" | "test" (its target rows, see the module docstring).
      batch_size: training batch size.
      seed: run seed; only the training order depends on it.
      fractions: (train, validation, test) fractions of the N rows.
      eval_stride: ``eval_batches`` uses every eval_stride-th window (1 = all; H = targets
        tile the split without overlap).
      season_length: dominant season m (for ``seasonal_naive_forecast``).
      normalize: apply the train-rows mean/std (``self.mean``, ``self.std``); False
        leaves values as they are (mean 0, std 1 recorded).
      channel_names: optional names of the C channels.

    Batches (``batch`` and ``eval_batches``) are dicts of NumPy arrays:
      "inputs"  float32[B, L, C]  normalized rows [t - L, t)
      "targets" float32[B, H, C]  normalized rows [t, t + H)
      "start"   int32[B]          t, the row of the first target in the whole series
    ``eval_batches`` adds "weights" float32[B] (1.0 real, 0.0 padded tail).
    """

    tokenizer = None               # numeric series: no tokens, no vocabulary
    vocab_size = None

    def __init__(self, values: np.ndarray, lookback: int, horizon: int, split: str,
                 batch_size: int, seed: int, *,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, eval_stride: int = 1,
                 season_length: int = 1, normalize: bool = True,
                 channel_names: Sequence[str] | None = None):
        values = np.asarray(values, np.float64)
        if values.ndim != 2:
            raise ValueError(f"values must be [N, C], got shape {values.shape}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
        if lookback < 1 or horizon < 1 or eval_stride < 1:
            raise ValueError(f"need lookback, horizon, eval_stride >= 1, got "
                             f"{lookback}, {horizon}, {eval_stride}")
        self.split = split
        self.lookback, self.horizon, self.eval_stride = lookback, horizon, eval_stride
        self.length, self.channels = values.shape
        self.season_length = season_length
        self.channel_names = tuple(channel_names or (f"ch{i}" for i in range(self.channels)))
        self.bounds = split_bounds(self.length, fractions)
        if normalize:
            self.mean, self.std = normalization_stats(values, fractions)
        else:
            self.mean, self.std = np.zeros(self.channels), np.ones(self.channels)
        self.series = ((values - self.mean) / self.std).astype(np.float32)  # [N, C]
        start, end = self.bounds[split]
        # First target rows t: inputs need t >= L, targets need t + H <= end.
        self.starts = np.arange(max(start, lookback), end - horizon + 1, dtype=np.int64)
        if not self.starts.size:
            raise ValueError(
                f"the {split} split (rows {start}..{end} of {self.length}) holds no window "
                f"with lookback={lookback} and horizon={horizon}: shorten them or change "
                "the split fractions")
        self.num_windows = len(self.starts)
        self.eval_starts = self.starts[::eval_stride]
        self.num_eval_windows = len(self.eval_starts)
        self._in = np.arange(-lookback, 0, dtype=np.int64)
        self._out = np.arange(horizon, dtype=np.int64)
        super().__init__(self.num_windows, batch_size, seed, self.num_eval_windows)

    def data_info(self) -> dict:
        """Fields the trainer copies into the model config."""
        return {"channels": self.channels, "horizon": self.horizon, "lookback": self.lookback}

    def windows(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict (see the class docstring) of first-target rows ``starts`` int[B]."""
        starts = np.asarray(starts, np.int64)
        return {"inputs": self.series[starts[:, None] + self._in],
                "targets": self.series[starts[:, None] + self._out],
                "start": starts.astype(np.int32)}

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """``windows`` of ``starts[ids]``: item ids index the split's windows."""
        return self.windows(self.starts[ids])

    def eval_ids(self, positions: np.ndarray) -> np.ndarray:
        """Every eval_stride-th window, in time order (``eval_starts``)."""
        return positions * self.eval_stride

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """float[..., C] normalized -> original units (log units for "goog")."""
        return np.asarray(x, np.float64) * self.std + self.mean

    def naive_forecast(self, inputs: np.ndarray) -> np.ndarray:
        """[B, L, C] -> [B, H, C]: the last input value repeated H times."""
        return naive_forecast(inputs, self.horizon)

    def seasonal_naive_forecast(self, inputs: np.ndarray, season: int | None = None
                                ) -> np.ndarray:
        """[B, L, C] -> [B, H, C]: the value one season (default ``season_length``)
        before each target step. ValueError if lookback < season."""
        return seasonal_naive_forecast(inputs, self.horizon,
                                       self.season_length if season is None else season)

    def baseline_errors(self, batch_size: int = 1024) -> dict[str, float]:
        """Mean squared / absolute error over every element of the eval windows
        (normalized units, as the forecast task reports them): "naive_mse", "naive_mae",
        and "seasonal_naive_mse", "seasonal_naive_mae" when lookback >= season."""
        sums: dict[str, float] = {}
        count = 0.0
        for b in self.eval_batches(batch_size):
            w = b["weights"].astype(np.float64)[:, None, None]
            count += w.sum() * self.horizon * self.channels
            preds = {"naive": self.naive_forecast(b["inputs"])}
            if self.season_length <= self.lookback:
                preds["seasonal_naive"] = self.seasonal_naive_forecast(b["inputs"])
            for name, p in preds.items():
                err = p.astype(np.float64) - b["targets"]
                sums[f"{name}_mse"] = sums.get(f"{name}_mse", 0.0) + float((w * err ** 2).sum())
                sums[f"{name}_mae"] = sums.get(f"{name}_mae", 0.0) + float((w * np.abs(err)).sum())
        return {k: float(v / count) for k, v in sums.items()}


def series_dataset(source: str, split: str, batch_size: int, seed: int, *, lookback: int,
                   horizon: int, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   eval_stride: int = 1, length: int = DEFAULT_LENGTH,
                   channels: int = DEFAULT_CHANNELS, data_seed: int = 0,
                   real_name: str = "goog") -> ForecastDataset:
    """``ForecastDataset`` of source "synthetic_series" (length, channels, data_seed) or
    "real_series" (real_name); season length DAY or the real series' own."""
    if source == "synthetic_series":
        values, names = synthetic_series(length, channels, data_seed), None
        season = DAY
    elif source == "real_series":
        values, names, season = real_series(real_name)
    else:
        raise ValueError(f"source={source!r} is not a series source")
    return ForecastDataset(values, lookback, horizon, split, batch_size, seed,
                           fractions=fractions, eval_stride=eval_stride,
                           season_length=season, channel_names=names)


# ---- Sources "synthetic_series" and "real_series": config.data.<source> ------------------
def _window_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Windows of `lookback` input steps and `horizon` target steps; splits are
    # chronological by target time.
    c.lookback = 96
    c.horizon = 24
    c.series_split_fractions = ml_collections.ConfigDict(dict(zip(SPLITS, DEFAULT_FRACTIONS)))
    c.series_eval_stride = 1       # eval every k-th window (1 = all; horizon = no overlap)
    return c


def synthetic_default_config() -> ml_collections.ConfigDict:
    """``config.data.synthetic_series``: the generated seasonal series."""
    c = _window_config()
    c.series_length = DEFAULT_LENGTH      # steps N
    c.series_channels = DEFAULT_CHANNELS  # channels C
    c.series_data_seed = 0         # changes the series, not the run seed
    return c


def real_default_config() -> ml_collections.ConfigDict:
    """``config.data.real_series``: a real series shipped with matplotlib."""
    c = _window_config()
    c.real_series = "goog"         # one of REAL_SERIES
    return c


def _check_windows(c, prefix: str) -> tuple[float, float, float]:
    """The keys both series sources share; returns the split fractions."""
    for key in ("lookback", "horizon", "series_eval_stride"):
        checks.check_int(c, prefix, key, 1)
    return checks.check_split_fractions(c, prefix, "series_split_fractions")


def _check_every_split_has_a_window(c, prefix: str, length: int, fractions) -> None:
    for split, (start, end) in split_bounds(length, fractions).items():
        # Same rule as ForecastDataset: first target row t in [max(start, L), end - H].
        if end - c.horizon < max(start, c.lookback):
            key = "horizon" if end - start < c.horizon else "lookback"
            checks.fail(f"{prefix}.{key}", c[key], f"the {split} split of the {length}-step "
                        f"series (rows {start}..{end}) holds no window of lookback="
                        f"{c.lookback} + horizon={c.horizon}")


def synthetic_validate(c: ml_collections.ConfigDict, prefix: str = "data.synthetic_series"
                       ) -> None:
    fractions = _check_windows(c, prefix)
    checks.check_int(c, prefix, "series_length", 2)
    checks.check_int(c, prefix, "series_channels", 1)
    checks.check_int(c, prefix, "series_data_seed", 0)
    _check_every_split_has_a_window(c, prefix, c.series_length, fractions)


def real_validate(c: ml_collections.ConfigDict, prefix: str = "data.real_series") -> None:
    fractions = _check_windows(c, prefix)
    if c.real_series not in REAL_SERIES:
        checks.fail(f"{prefix}.real_series", c.real_series, f"expected one of {REAL_SERIES}")
    _check_every_split_has_a_window(c, prefix, REAL_SERIES_LENGTHS[c.real_series], fractions)


def _fractions(c) -> tuple[float, ...]:
    return tuple(c.series_split_fractions[s] for s in SPLITS)


def synthetic_make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
                   ) -> ForecastDataset:
    return series_dataset("synthetic_series", split, batch_size, seed, lookback=c.lookback,
                          horizon=c.horizon, fractions=_fractions(c),
                          eval_stride=c.series_eval_stride, length=c.series_length,
                          channels=c.series_channels, data_seed=c.series_data_seed)


def real_make(c: ml_collections.ConfigDict, split: str, batch_size: int, seed: int
              ) -> ForecastDataset:
    return series_dataset("real_series", split, batch_size, seed, lookback=c.lookback,
                          horizon=c.horizon, fractions=_fractions(c),
                          eval_stride=c.series_eval_stride, real_name=c.real_series)


SYNTHETIC_SOURCE = Source(synthetic_default_config, synthetic_validate, synthetic_make)
REAL_SOURCE = Source(real_default_config, real_validate, real_make)
