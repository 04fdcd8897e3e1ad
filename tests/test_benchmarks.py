"""The benchmarks' CPU smoke modes: tiny shapes, a few steps, the JSON report written."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

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
