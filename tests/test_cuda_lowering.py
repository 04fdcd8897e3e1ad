"""The GPT-2 small train step lowered for CUDA on this CPU host keeps cuDNN flash attention.

The fused attention path falls back to XLA's attention silently whenever cuDNN cannot take
a call (dtype, head size, mask form, a jax change). On a GPU that costs speed, not
correctness, so no numerical test notices; this one does, without a GPU: it lowers the
exact step `benchmarks/gpt2_train_step.py` times (configs/gpt.py:gpt2_small, bf16, fused
QKV, scanned layers, vocab 50304) with `jax.export(..., platforms=("cuda",))` and counts
the cuDNN attention custom calls in the module.

Lowering for CUDA on a CPU-only jaxlib needs two stand-ins, both test-only: flaxlab's
`attention.lowering_for("gpu")` (the fused path asks the default backend otherwise), and
jax's cuDNN attention checks the local CUDA runtime at trace time (the cuDNN version, the
GPU's compute capability), which are patched to an H100's (cuDNN 9.10, sm_90). If a jax
upgrade renames the patched private functions, this test fails naming them.
"""
from __future__ import annotations

import argparse
import types

import jax
import pytest
from jax import export

from benchmarks import gpt2_train_step as bench
from models.layers import attention

CUDNN_FMHA_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


@pytest.fixture
def as_if_on_an_h100(monkeypatch):
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:  # pragma: no cover -- a jax upgrade moved it
        pytest.fail(f"jax._src.cudnn.fused_attention_stablehlo is gone ({e}); update the "
                    "stand-ins of this test")
    for name in ("cuda_versions", "check_compute_capability",
                 "is_cuda_compute_capability_equal"):
        if not hasattr(fa, name):
            pytest.fail(f"jax's cuDNN attention has no {name} any more; update this test")
    monkeypatch.setattr(fa, "cuda_versions",
                        types.SimpleNamespace(cudnn_get_version=lambda: 91000))
    sm90 = (9, 0)
    monkeypatch.setattr(fa, "check_compute_capability",
                        lambda c: tuple(map(int, c.split("."))) <= sm90)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal",
                        lambda c: tuple(map(int, c.split("."))) == sm90)
    with attention.lowering_for("gpu"):
        yield


def _bench_args(**kw) -> argparse.Namespace:
    return bench.parse_args([f"--{k}={v}" for k, v in kw.items()] + ["--dry_run",
                                                                     "--num_devices=1"])


def _cuda_module(args, settings) -> str:
    setup = bench.Setup(args, settings)
    exported = export.export(
        jax.jit(setup.train_step), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call(t)
                         for t in CUDNN_FMHA_TARGETS])(setup.abstract_state,
                                                        setup.abstract_batch)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _fmha_calls(module: str) -> tuple[int, int]:
    forward = module.count("custom_call @__cudnn$fmhaSoftmax(")
    backward = module.count("custom_call @__cudnn$fmhaSoftmaxBackward(")
    return forward, backward


def test_gpt2_small_train_step_lowered_for_cuda_uses_cudnn_attention(as_if_on_an_h100):
    args = _bench_args(batch=2)
    settings = bench.model_settings(args, bench.PRESETS["base"])   # bf16, fused, scanned
    assert settings["dtype"] == "bfloat16" and settings["attention_impl"] == "fused"
    module = _cuda_module(args, settings)
    # Scanned layers: one forward kernel in the scan body, one backward in its transpose.
    assert _fmha_calls(module) == (1, 1)
    assert "mask_type\\22: \\22CAUSAL" in module   # the causal kernel, not a dense mask


def test_unrolled_step_has_one_kernel_per_layer_and_float32_none(as_if_on_an_h100):
    args = _bench_args(batch=2, variant="tiny", seq_len=64, vocab=512)
    unrolled = bench.model_settings(args, bench.PRESETS["unrolled"])
    layers = 2   # models.transformer.VARIANTS["tiny"]
    assert _fmha_calls(_cuda_module(args, unrolled)) == (layers, layers)
    # float32 is not eligible: the fused path is XLA's there, so no cuDNN call (and the
    # benchmark's table says `xla`).
    f32 = bench.model_settings(args, bench.PRESETS["float32"])
    assert _fmha_calls(_cuda_module(args, f32)) == (0, 0)


def test_without_the_stand_ins_a_cpu_trace_has_no_cudnn_call():
    """The stand-ins are what make the lowering above a GPU's: plain CPU tracing falls
    back (so the first test cannot pass by accident on a CPU trace)."""
    args = _bench_args(batch=2, variant="tiny", seq_len=64, vocab=512)
    setup = bench.Setup(args, bench.model_settings(args, bench.PRESETS["base"]))
    text = jax.jit(setup.train_step).lower(setup.abstract_state,
                                           setup.abstract_batch).as_text()
    assert "cudnn" not in text
