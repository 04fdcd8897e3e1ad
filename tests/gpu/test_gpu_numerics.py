"""What only a GPU can check: cuDNN kernels against the reference paths, bf16 training.

    JAX_PLATFORMS= python -m pytest -q -m gpu tests/gpu      # on a machine with a GPU

On a GPU every test runs at its real size and asserts that the cuDNN kernel was really
compiled (the model falls back to XLA silently; these tests do not). Without one (the
ordinary test suite) they run on the CPU at smoke sizes, in seconds, so a GPU is never
spent on a crash: there the kernels are XLA's and the kernel assertions are off; every
numerical assertion stays.

`benchmarks/gpu_suite.sh` runs this file first. (tests/conftest.py pins JAX to the CPU
unless JAX_PLATFORMS is set: the empty value lets jax take the GPU.)
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import attention as attn
from models.layers import recurrent as R

ON_GPU = jax.default_backend() == "gpu"
SMOKE = not ON_GPU          # the CPU: smoke sizes
pytestmark = pytest.mark.gpu


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


# ----------------------------------------------------------------------------------------
# cuDNN flash attention == the reference path (bf16 tolerance), causal and padding masks.
# ----------------------------------------------------------------------------------------
def _qkv(rng, b, t, h, d, dtype):
    return [jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(3)]


@pytest.mark.parametrize("masking", ["causal", "padding", "causal_padding"])
def test_cudnn_attention_equals_reference(masking):
    b, t, h, d = (2, 64, 2, 32) if SMOKE else (4, 1024, 12, 64)
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, b, t, h, d, jnp.bfloat16)
    is_causal = masking.startswith("causal")
    mask = None
    if "padding" in masking:
        lengths = jnp.asarray(rng.integers(t // 4, t + 1, size=b))
        key_valid = jnp.arange(t)[None, :] < lengths[:, None]        # [B, T]
        mask = attn.padding_mask(key_valid, key_valid)

    def loss(impl, q, k, v):
        out = attn.dot_product_attention(q, k, v, mask, is_causal=is_causal,
                                         implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    cot = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    # The reference in float32 from the same bf16 inputs: what both paths approximate.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    (_, want), want_grads = jax.value_and_grad(
        lambda *a: loss("reference", *a), argnums=(0, 1, 2), has_aux=True)(q32, k32, v32)
    fused = jax.jit(jax.value_and_grad(lambda *a: loss("fused", *a), argnums=(0, 1, 2),
                                       has_aux=True))
    (_, got), got_grads = fused(q, k, v)
    if ON_GPU:
        assert "cudnn$fmha" in compiled_text(fused, q, k, v), "cuDNN attention not compiled"
    if mask is not None:   # padded query rows are zero in both (models/layers/attention.py)
        rows = np.asarray(key_valid)[:, :, None, None]
        np.testing.assert_array_equal(np.asarray(got, np.float32) * ~rows, 0.0)
    assert relative_error(got, want) < 1e-2
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) < 2e-2


# ----------------------------------------------------------------------------------------
# KV-cache decoding == the full forward, on the device.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 3e-2)])
def test_kv_cache_decoding_equals_full_forward(dtype, tol):
    from models import decoding, transformer
    variant = "tiny" if SMOKE else "gpt2_small"
    cfg = transformer.TransformerConfig(**{
        **transformer.VARIANTS[variant], "vocab_size": 512, "dtype": dtype,
        "attention_impl": "fused", "fused_qkv": True})
    model = transformer.Decoder(cfg)
    b, t = (2, 12) if SMOKE else (4, 128)
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, 512, (b, t)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
    step = jax.jit(lambda p, c, x: model.apply({"params": p, "cache": c}, x, decode=True,
                                               mutable=["cache"]))
    cache = decoding.init_decoder_cache(model, b, t)
    half = t // 2   # a prompt in one call, then one token per call
    logits, v = step(params, cache, tokens[:, :half])
    pieces = [logits]
    for i in range(half, t):
        logits, v = step(params, v["cache"], tokens[:, i:i + 1])
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    assert relative_error(cached, full) < tol


# ----------------------------------------------------------------------------------------
# The cuDNN LSTM == the scan (the same parameters), forward and gradients.
# ----------------------------------------------------------------------------------------
def test_cudnn_lstm_equals_scan():
    b, t, i, h = (3, 7, 8, 16) if SMOKE else (16, 64, 256, 512)
    base = dict(cell="lstm", hidden=h, num_layers=2, bidirectional=True)
    scan_cfg = R.RecurrentConfig(**base, implementation="scan")
    cudnn_cfg = R.RecurrentConfig(**base, implementation="auto")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(b, t, i)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, t + 1, size=b), jnp.int32)
    params = R.Recurrent(scan_cfg).init(jax.random.key(0), x)["params"]
    cot = jnp.asarray(rng.normal(size=(b, t, 2 * h)), jnp.float32)

    def loss(cfg, p, x):
        y = R.Recurrent(cfg).apply({"params": p}, x, lengths=lengths)[0]
        return jnp.sum(y * cot), y

    grads = {}
    for name, cfg in (("scan", scan_cfg), ("cudnn", cudnn_cfg)):
        fn = jax.jit(jax.value_and_grad(lambda p, x, cfg=cfg: loss(cfg, p, x),
                                        argnums=(0, 1), has_aux=True))
        (_, y), g = fn(params, x)
        grads[name] = (y, g)
        if ON_GPU and name == "cudnn":
            assert R.resolve_implementation(cfg) == "cudnn"
            assert "cudnn" in compiled_text(fn, params, x).lower()
    (y_scan, g_scan), (y_cudnn, g_cudnn) = grads["scan"], grads["cudnn"]
    # cuDNN runs its matmuls in TF32 where allowed: ~1e-3 relative.
    assert relative_error(y_cudnn, y_scan) < 3e-3
    for u, w in zip(jax.tree.leaves(g_cudnn), jax.tree.leaves(g_scan)):
        assert relative_error(u, w) < 1e-2


# ----------------------------------------------------------------------------------------
# bf16 training reaches float32's validation perplexity (within 2%).
# ----------------------------------------------------------------------------------------
def _train_perplexity(tmp_path, dtype: str) -> float:
    from train import main as main_lib
    variant, steps = ("tiny", 20) if SMOKE else ("default", 300)
    workdir = tmp_path / dtype
    code = main_lib.run([
        "train", f"--config=configs/gpt.py:{variant}", f"--workdir={workdir}",
        f"--config.model.dtype={dtype}", "--config.model.attention_impl=fused",
        f"--config.train.num_steps={steps}", f"--config.train.eval_every={steps}",
        f"--config.checkpoint.every={steps}", "--config.evals.sample.every=-1"])
    assert code == 0
    with open(workdir / "summary.json", encoding="utf-8") as f:
        return json.load(f)["validation/perplexity"]


def test_bf16_training_reaches_float32_perplexity(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    f32 = _train_perplexity(tmp_path, "float32")
    bf16 = _train_perplexity(tmp_path, "bfloat16")
    print(f"validation perplexity: float32 {f32:.4f}, bfloat16 {bf16:.4f}")
    assert abs(bf16 - f32) / f32 < 0.02
