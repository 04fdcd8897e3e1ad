"""The benchmarks' CPU smoke modes: tiny shapes, a few steps, the JSON report written."""
import importlib.util
import json
import math
import os

import subprocess

import numpy as np
import pytest

from benchmarks import harness

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks")


def _load(name="gpt2_train_step"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCHMARKS,
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_cpu_smoke_runs_every_benchmark_with_its_peer(tmp_path):
    """benchmarks/gpu_suite.sh --cpu_smoke (its benchmark parts; tests/gpu run in the
    ordinary suite): each part writes its report with the PyTorch peer's figures (the peer
    on the CPU, eager), and the summary has a measured value for every target."""
    repo = os.path.dirname(_BENCHMARKS)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--cpu_smoke", f"--out_dir={tmp_path}",
         "--parts=gpt2,clip,rnn,decode"], cwd=repo, env=env, capture_output=True, text=True,
        timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in (
        "gpt2_train_step", "clip_train_step", "rnn_step", "decode_step")}

    # GPT: the tiny decoder, bf16, fused attention (XLA's here), donated state.
    (r,) = report["gpt2_train_step"]["results"]
    assert r["name"] == "base" and r["settings"]["attention_impl"] == "fused"
    assert r["attention_kernel"] == "xla"                      # no cuDNN on a CPU
    assert r["steps_run"] == 1 + 2 * 2 and r["nonfinite_step"] == -1 and r["state_donated"]
    assert r["ms_median"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
    # Random tokens over 512 ids: the initial loss is close to ln(512) = 6.24.
    assert 5.7 < r["first_loss"] < 6.8
    # 6N + 12 L H Q T with N excluding the 64 x 32 learned position table.
    assert r["params"] - r["params_no_position"] == 64 * 32
    assert r["flops_per_token"] == 6 * r["params_no_position"] + 12 * 2 * 2 * 16 * 32
    peer = report["gpt2_train_step"]["peer"]
    assert "skipped" not in peer, peer.get("stderr")
    assert peer["device"] == "cpu" and peer["mode"] == "eager"
    assert peer["torch_gpt_params"] == r["params"]             # the same model
    assert r["speedup_vs_torch"] == pytest.approx(peer["torch_gpt_eager_step_ms"]
                                                  / r["ms_median"])

    # RNN: every cell x dtype; cuDNN rows skipped on a CPU; the peer's cuDNN-named rows.
    rnn = report["rnn_step"]
    scans = [x for x in rnn["results"] if x["name"].endswith("/scan")]
    assert {(x["cell"], x["dtype"]) for x in scans} == {
        (c, d) for c in ("lstm", "gru") for d in ("float32", "bfloat16")}
    assert all("skipped" in x for x in rnn["results"] if x["name"].endswith("/cudnn"))
    lstm = next(x for x in scans if (x["cell"], x["dtype"]) == ("lstm", "float32"))
    # 2 LSTM layers, 4 gates: (in * 4H + H * 4H + 4H) per layer, in = 16 then 32.
    assert lstm["params"] == (16 + 32 + 1) * 128 + (32 + 32 + 1) * 128
    assert lstm["flops_per_step"] == 3 * 2 * 4 * 8 * 128 * ((16 + 32) + (32 + 32))
    assert lstm["ratio_to_torch"] == pytest.approx(
        lstm["ms_median"] / rnn["peer"]["torch_cudnn_lstm_float32_step_ms"])

    # CLIP: the tiny towers' closed-form count; InfoNCE at init about ln B.
    (c,) = report["clip_train_step"]["results"]
    assert c["params"] == c["params_closed_form"]["total"] == 139_713
    assert abs(c["first_loss"] - math.log(8)) < 0.3 and c["attention_kernel"] == "xla"
    assert c["samples_per_s"] == pytest.approx(8 / (c["ms_median"] / 1e3))
    assert c["flops_per_step"] == 3 * 8 * c["forward_flops_per_sample"]["total"]
    clip_peer = report["clip_train_step"]["peer"]
    assert "skipped" not in clip_peer, clip_peer.get("stderr")
    assert (clip_peer["device"], clip_peer["mode"], clip_peer["towers"]) == (
        "cpu", "eager", "tiny")
    sps = clip_peer["torch_clip_tiny_eager_samples_per_s"]
    assert clip_peer["torch_clip_tiny_eager_step_ms"] == pytest.approx(8e3 / sps, rel=1e-4)
    assert c["speedup_vs_torch"] == pytest.approx(c["samples_per_s"] / sps)
    # open_clip's towers lack flaxlab's patch-embedding bias (64 here).
    bias = 0 if clip_peer["impl"].startswith("equivalent") else 64
    assert clip_peer["torch_clip_tiny_params"] == c["params"] - bias

    # Decoding: bf16 vs int8 weight-only, the bytes each reads in closed form.
    report = report["decode_step"]
    bf16, int8 = report["results"]
    assert (bf16["name"], bf16["weights"], int8["name"], int8["weights"]) == (
        "bf16", "bfloat16", "int8", "int8")
    # Tiny GPT, fused QKV, tied table: L=2, d=32, MLP 64, vocab 256, 64 positions.
    L, d, m, v, positions = 2, 32, 64, 256, 64
    n_matmul = L * (4 * d * d + 2 * d * m) + v * d      # kernels + the tied table
    n_other = L * (9 * d + m) + 2 * d                    # biases, norms, final norm
    n_out = L * (5 * d + m) + v                          # output channels = scales
    assert report["params"] == n_matmul + n_other + positions * d
    b, q = bf16["bytes_per_token"], int8["bytes_per_token"]
    assert q["matmul"] * 2 == b["matmul"] == 2 * n_matmul   # int8 reads half of bf16's
    assert q["scales"] == 4 * n_out and b["scales"] == 0
    assert q["other"] == b["other"] == 2 * n_other
    assert b["total"] == 2 * (n_matmul + n_other) + 2 * d    # + one position row
    assert q["total"] == n_matmul + 4 * n_out + 2 * n_other + 2 * d
    for r in (bf16, int8):
        assert len(r["window_ms"]) == 2 and r["ms_per_token"] > 0
        assert r["tokens_per_s"] == 1e3 / r["ms_per_token"]
        assert r["weight_GBps"] == pytest.approx(
            r["bytes_per_token"]["total"] / r["ms_per_token"] / 1e6)
        assert np.asarray(r["tokens"]).shape == (1, 1 + 4)
    assert int8["speedup_vs_bf16"] == bf16["ms_per_token"] / int8["ms_per_token"]
    assert 0.0 <= int8["tokens_match_bf16"] <= 1.0 and bf16["tokens_match_bf16"] == 1.0
    # Every int8 kernel (4 a layer) and the table is an int8 parameter of the step.
    assert int8["int8_operands"]["int8_params"] == 4 * L + 1
    peer = report["peer"]
    assert "skipped" not in peer, peer
    assert peer["device"] == "cpu" and peer["int8_impl"] in ("torchao", "int8pack_mm",
                                                             "explicit")
    assert peer["torch_decode_bf16_eager_ms_per_token"] > 0
    assert peer["torch_decode_int8_eager_ms_per_token"] > 0
    assert peer["torch_decode_int8_eager_speedup"] > 0
    # The peer's GPT is the same model: its parameter count (position table included).
    assert peer["torch_decode_params"] == report["params"]

    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {row["target"]: row for row in summary["rows"]}
    assert rows["GPU tests (pytest -m gpu)"]["status"] == "missing"   # not a part here
    for name, row in rows.items():
        if name.startswith("GPU tests"):
            continue
        assert row["status"] in ("met", "NOT met"), row            # measured, not missing
    assert rows["GPT-2 small step: cuDNN attention compiled"]["value"] == 0.0
    assert "flaxlab GPU suite" in proc.stdout


def test_rnn_peer_that_does_not_exist_is_skipped_and_the_benchmark_runs(tmp_path):
    bench = _load("rnn_step")
    out = tmp_path / "rnn.json"
    bench.main(["--cells=lstm", "--dtypes=float32", "--impls=scan", "--batch=2",
                "--seq_len=4", "--input=8", "--hidden=8", "--steps=1", "--windows=1",
                "--warmup=1", "--num_batches=1", "--peer=/nonexistent/peer.py",
                "--peer_device=cpu", f"--out={out}"])
    report = json.loads(out.read_text())
    assert report["peer"]["skipped"] == "/nonexistent/peer.py does not exist"
    assert "ratio_to_torch" not in report["results"][0]
    if not harness.nvidia_gpu_present():   # by default no GPU = no peer, and it says why
        assert "no NVIDIA GPU" in harness.run_peer(bench.parse_args([]), ["step"])["skipped"]


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


def test_collectives_reads_the_compiled_collectives_and_scales_them(tmp_path):
    """The tiny GPT on the suite's 8 devices: dp is one gradient all-reduce over all 8,
    fsdp gathers its split kernels, tp reduces over groups of 4 (model) and across data; the
    alpha-beta model matches the closed form of a ring."""
    bench = _load("collectives")
    out = tmp_path / "collectives.json"
    bench.main(["--variant=tiny", "--batch=16", "--seq_len=32", "--vocab=256",
                "--dtype=float32", "--min_size_to_shard=0", "--devices=8,64",
                f"--out={out}"])
    report = json.loads(out.read_text())
    measured = {m["strategy"]: m for m in report["measured"]}
    params_bytes = 4 * measured["dp"]["params"]
    dp = measured["dp"]["collectives"]
    # Every gradient is reduced over all 8 devices (loss scalars ride along).
    assert {(r["kind"], r["group"], tuple(r["axes"])) for r in dp} == {
        ("all-reduce", 8, ("data",))}
    # The tied token table's gradient comes in two parts (lookup, output projection)
    # that XLA reduces before adding them: one table (256 x 32 floats) more; then scalars.
    assert params_bytes + 4 * 256 * 32 <= sum(r["bytes"] for r in dp) <= (
        params_bytes + 4 * 256 * 32 + 64)
    fsdp = measured["fsdp"]["by_kind"]
    assert fsdp["all-gather"]["count"] > 0 and fsdp["all-gather"]["bytes"] >= params_bytes / 2
    tp_axes = {tuple(r["axes"]) for r in measured["tp"]["collectives"]}
    # Activations reduce within a model group; gradients across the data groups.
    assert ("model",) in tp_axes and any("data" in axes for axes in tp_axes)
    # Ring all-reduce over n: 2 (n-1)/n S bytes in 2 (n-1) steps.
    assert bench.ring_cost("all-reduce", 800.0, 8) == (1400.0, 14)
    assert bench.ring_cost("all-gather", 800.0, 8) == (700.0, 7)
    rows = {(r["strategy"], r["devices"]): r for r in report["rows"]}
    s = sum(r["bytes"] for r in dp)
    assert rows["dp", 8]["bytes_per_device"] == pytest.approx(2 * 7 / 8 * s)
    # 64 devices: the ring leaves the node, 50 GB/s and 10 us a step.
    assert rows["dp", 64]["comm_ms"] == pytest.approx(
        1e3 * (len(dp) * 2 * 63 * 10e-6 + 2 * 63 / 64 * s / 50e9))
    assert rows["tp", 64]["comm_ms"] > rows["tp", 8]["comm_ms"]


def test_collectives_parses_every_replica_group_form_and_async_results():
    """Hand-written HLO lines in each form XLA prints, on a data 2 x model 4 mesh."""
    import jax

    bench = _load("collectives")
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    hlo = "\n".join([
        # explicit groups along model; a tuple of two arrays combined: 4*8*4 + 4*4 bytes
        "%ar = (f32[8,4]{1,0}, f32[4]{0}) all-reduce(%a, %b), channel_id=1, "
        "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
        # iota groups along data (transposed), bf16
        "%ag = bf16[16]{0} all-gather(%c), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}",
        # the mesh form, and a reduce-scatter's 1/n result
        "%rs = f32[2]{0} reduce-scatter(%d), replica_groups=mesh['axis_0'=2,'axis_1'=4] "
        "{'axis_1'}, dimensions={0}, to_apply=%add",
        # async: (operand, output, contexts) of a permute between data neighbours
        "%cp = (f32[6]{0}, f32[6]{0}, u32[], u32[]) collective-permute-start(%e), "
        "source_target_pairs={{0,4},{4,0}}",
        "%cpd = f32[6]{0} collective-permute-done(%cp)",
        # no groups given: every device
        "%all = s32[] all-reduce(%f), to_apply=%add",
    ])
    got = [(r["kind"], r["bytes"], r["group"], tuple(r["axes"]))
           for r in bench.collectives(hlo, mesh)]
    assert got == [("all-reduce", 4 * 8 * 4 + 4 * 4, 4, ("model",)),
                   ("all-gather", 2 * 16, 2, ("data",)),
                   ("reduce-scatter", 4 * 2 * 4, 4, ("model",)),
                   ("collective-permute", 4 * 6, 2, ("data",)),
                   ("all-reduce", 4, 8, ("data", "model"))]
