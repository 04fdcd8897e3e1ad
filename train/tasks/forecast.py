"""Time-series forecasting: look-back window [B, L, C] -> forecast [B, H, C].

Trained with MSE; evaluated by MSE and MAE next to the two baselines every forecaster must
beat, computed on the very same windows:
  naive           the last observed value, repeated for all H steps;
  seasonal naive  the value one season earlier: y_hat[L + h] = y[L + h - m * ceil((h+1)/m)]
                  for season length m, i.e. the last observed season repeated.
"""
from __future__ import annotations

import jax.numpy as jnp

from train.tasks import common
from train.tasks.base import Task, apply_model


def naive_forecast(inputs, horizon: int):
    """[B, L, C] -> [B, horizon, C]: the last value repeated."""
    return jnp.repeat(inputs[:, -1:, :], horizon, axis=1)


def seasonal_naive_forecast(inputs, horizon: int, season: int):
    """[B, L, C] -> [B, horizon, C]: step h repeats the value at L - season + (h mod season)."""
    lookback = inputs.shape[1]
    if season > lookback:
        raise ValueError(f"seasonal naive needs lookback >= season, got {lookback} < {season}")
    index = lookback - season + jnp.arange(horizon) % season
    return jnp.take(inputs, index, axis=1)


class ForecastTask(Task):
    """batch {"inputs": float[B, L, C], "targets": float[B, H, C]} -> MSE. No options: the
    baselines are computed, not configured."""

    name = "forecast"

    def __init__(self, config, model, data):
        super().__init__(config, model, data)
        self.season = data["train"].season_length

    def init_args(self, batch):
        return (batch["inputs"],), {}

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        inputs, targets = batch["inputs"], batch["targets"].astype(jnp.float32)
        pred, model_state = apply_model(self.model, params, model_state, inputs, rng, train)
        w = common.example_weights(batch, inputs.shape[0])[:, None, None]
        count = jnp.sum(jnp.broadcast_to(w, targets.shape))
        horizon = targets.shape[1]
        metrics = {}
        forecasts = {"": pred, "naive_": naive_forecast(inputs, horizon)}
        if self.season <= inputs.shape[1]:
            forecasts["seasonal_naive_"] = seasonal_naive_forecast(inputs, horizon, self.season)
        for name, forecast in forecasts.items():
            err = forecast.astype(jnp.float32) - targets
            metrics[f"{name}mse"] = (jnp.sum(w * err ** 2), count)
            metrics[f"{name}mae"] = (jnp.sum(w * jnp.abs(err)), count)
        metrics["loss"] = metrics["mse"]
        loss = metrics["mse"][0] / jnp.maximum(count, 1.0)
        return loss, (metrics, model_state)

    def derived_metrics(self, metrics: dict) -> dict:
        """Skill relative to the baselines: 1 - MSE / baseline MSE (> 0 = better)."""
        out = {"mse_skill_vs_naive": 1.0 - metrics["mse"] / max(metrics["naive_mse"], 1e-12)}
        if "seasonal_naive_mse" in metrics:
            out["mse_skill_vs_seasonal_naive"] = 1.0 - metrics["mse"] / max(
                metrics["seasonal_naive_mse"], 1e-12)
        return out
