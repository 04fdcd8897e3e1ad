"""The benchmarks' CPU smoke modes: tiny shapes, a few steps, the JSON report written."""
import importlib.util
import json
import math
import os

import numpy as np

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks")


def _load(name="gpt2_train_step"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCHMARKS,
                                                                     name + ".py"))
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


def test_rnn_step_cpu_smoke_skips_cudnn_and_a_missing_peer(tmp_path):
    bench = _load("rnn_step")
    out = tmp_path / "rnn.json"
    bench.main(["--cells=lstm", "--dtypes=float32", "--impls=scan,cudnn", "--batch=4",
                "--seq_len=16", "--input=32", "--hidden=64", "--steps=2", "--windows=2",
                "--warmup=1", "--num_batches=2", "--peer=/nonexistent/torch_peers.py",
                f"--out={out}"])
    report = json.loads(out.read_text())
    scan, cudnn = report["results"]
    assert scan["name"] == "lstm/float32/scan" and scan["kernel"] == "scan"
    # 2 LSTM layers, 4 gates: (in * 4H + H * 4H + 4H) per layer, in = 32 then 64.
    assert scan["params"] == (32 + 64 + 1) * 256 + (64 + 64 + 1) * 256 == 57856
    # 3 x forward matmul FLOPs: 2 B T (in + H) 4H per layer.
    assert scan["flops_per_step"] == 3 * 2 * 4 * 16 * 256 * ((32 + 64) + (64 + 64))
    assert len(scan["window_ms"]) == 2 and scan["state_donated"]
    assert cudnn["name"] == "lstm/float32/cudnn" and "skipped" in cudnn   # no NVIDIA GPU
    assert report["peer"]["skipped"] == "/nonexistent/torch_peers.py does not exist"


def test_data_batch_smoke_reports_the_batch_it_times(tmp_path):
    bench = _load("data_batch")
    out = tmp_path / "data.json"
    bench.main(["--sources=shapes", "--batch=8", "--steps=2", "--windows=2",
                f"--out={out}"])
    (r,) = json.loads(out.read_text())["results"]
    assert r["name"] == "shapes" and r["batch"] == 8 and len(r["window_ms"]) == 2
    assert r["arrays"]["image"] == [[8, 32, 32, 3], "float32"]
    assert r["batch_bytes"] == sum(
        math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in r["arrays"].values())


def test_inherit_step_smoke_times_a_student_beside_its_teacher(tmp_path):
    bench = _load("inherit_step")
    out = tmp_path / "inherit.json"
    bench.main(["--pairs=gpt", "--batch=2", "--steps=1", "--windows=1", "--warmup=1",
                f"--out={out}"])
    gpt = json.loads(out.read_text())["results"]["gpt"]
    teacher, student = gpt["teacher"], gpt["student"]
    assert student["params"] < teacher["params"]
    assert student["params_ratio"] == student["params"] / teacher["params"]
    assert len(student["window_ms"]) == 1 and student["time_ratio"] > 0
