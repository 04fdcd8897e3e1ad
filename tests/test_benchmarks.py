"""Smoke test of benchmarks/gpt2_train_step.py: a tiny model, a few steps, JSON written."""
import importlib.util
import json
import os

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "benchmarks", "gpt2_train_step.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpt2_train_step", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt2_train_step_tiny_writes_json(tmp_path):
    bench = _load()
    out = tmp_path / "results" / "bench.json"
    report = bench.main(["--variant=tiny", "--batch=4", "--seq_len=32", "--vocab=256",
                         "--dtype=float32", "--steps=2", "--windows=2", "--warmup=1",
                         "--num_devices=1", f"--out={out}"])
    saved = json.loads(out.read_text())
    (r,) = saved["results"]
    assert r["name"] == "base" and r["settings"]["attention_impl"] == "fused"
    assert r["steps_run"] == 1 + 2 * 2 and r["nonfinite_step"] == -1
    assert r["ms_median"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
    assert len(r["window_ms"]) == 2 and r["state_donated"]
    # Random tokens over 256 ids: the initial loss is close to ln(256) = 5.55.
    assert 5.0 < r["first_loss"] < 6.2
    # 6N + 12 L H Q T with N excluding the 64 x 32 learned position table.
    assert r["params"] - r["params_no_position"] == 64 * 32
    assert r["flops_per_token"] == 6 * r["params_no_position"] + 12 * 2 * 2 * 16 * 32
    assert saved["environment"]["jax"] and report["results"][0]["mfu"] > 0
