"""benchmarks/clip_train_step.py and its PyTorch peer (benchmarks/peers/clip.py): the same
model size on both sides, counted without allocating; closed forms; the peer's loss.
(The CPU smoke run of both: tests/test_benchmarks.py, through the GPU suite.)"""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks")


def _load(name: str, path: str):
    """A benchmark script as a module (registered first: its dataclasses look it up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCHMARKS, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _bench():
    return _load("clip_train_step", "clip_train_step.py")


def _peer():
    return _load("clip_peer", os.path.join("peers", "clip.py"))


@pytest.mark.parametrize("towers", ["tiny", "b16"])
def test_the_peer_module_is_flaxlabs_model_size(towers):
    """Both sides counted from shapes only: jax.eval_shape of ClipModel.init and the
    equivalent torch module on the meta device; per tower and in total."""
    bench, peer = _bench(), _peer()
    args = bench.parse_args([f"--towers={towers}", "--dry_run"])
    model, _ = bench.build_model(args, bench.build_run_config(
        args, bench.model_settings(args, {})))
    t = bench.TOWERS[towers]
    images = jax.ShapeDtypeStruct((1, t["image_size"], t["image_size"], 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, t["context"]), jnp.int32)
    params = jax.eval_shape(lambda i, c: model.init(jax.random.key(0), i, c), images,
                            tokens)["params"]
    count = bench.harness.count_params
    flax_total = count(params)[0]
    flax_image = count(params["image_tower"])[0] + count(params["image_projection"])[0]

    torch_model, _, impl = peer.build(peer.sizes(towers), "equivalent", device="meta")
    assert impl == "equivalent" and all(p.is_meta for p in torch_model.parameters())
    closed = bench.param_count(t, t["image_size"], t["patch"])
    assert peer.param_count(torch_model) == flax_total == closed["total"]
    assert peer.param_count(torch_model.visual) == flax_image == closed["image"]
    assert peer.param_count(torch_model.text) == closed["text"]
    if towers == "b16":
        assert flax_total == 149_621_505


def test_b16_closed_forms_match_open_clips_published_profile():
    """open_clip's docs/model_profile.csv, ViT-B-16: 149.62 M parameters (image 86.19,
    text 63.43), 41.09 forward GFLOPs per sample (image 35.13, text 5.96). flaxlab's image
    tower carries one more tensor, the patch embedding's bias (768)."""
    bench = _bench()
    t = bench.TOWERS["b16"]
    params, flops = bench.param_count(t, 224, 16), bench.forward_flops(t, 224, 16)
    assert params["total"] - 768 == bench.OPEN_CLIP_B16_PARAMS == 149_620_737
    assert round((params["image"] - 768) / 1e6, 2) == 86.19
    assert round((params["text"] + 1) / 1e6, 2) == 63.43     # + the logit scale
    assert (round(flops["image"] / 1e9, 2), round(flops["text"] / 1e9, 2)) == (35.13, 5.96)
    assert round(flops["total"] / 1e9, 2) == 41.09
    # By hand: 12 blocks of 197 tokens, 2 x (197 x 768 x (4 x 768 + 2 x 3072) + 2 x 197^2
    # x 768) each, the 196 x 768 x 768 patch matmul and the 768 x 512 projection.
    layer = 2 * (197 * 768 * (4 * 768 + 2 * 3072) + 2 * 197 ** 2 * 768)
    assert flops["image"] == 12 * layer + 2 * 196 * 768 * 768 + 2 * 768 * 512


def test_infonce_of_the_equivalent_peer_matches_float64():
    peer = _peer()
    rng = np.random.default_rng(0)
    img, txt = (rng.normal(size=(6, 5)) for _ in range(2))
    img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    logits = 14.0 * img @ txt.T
    row = np.log(np.exp(logits).sum(1)) - np.diag(logits)
    col = np.log(np.exp(logits).sum(0)) - np.diag(logits)
    want = 0.5 * (row.mean() + col.mean())
    got = peer.clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(14.0))
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_a_patch_that_does_not_tile_the_image_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().parse_args(["--towers=tiny", "--patch=5"])
    assert exc.value.code == 2
    assert "--patch=5 must divide the image size 32" in capsys.readouterr().err


def test_the_attention_kernel_is_read_from_the_compiled_hlo():
    bench = _bench()
    hlo = ('%a = custom-call(...), custom_call_target="__cudnn$fmhaSoftmax"\n'
           '%b = custom-call(...), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n')
    assert bench.harness.attention_kernel(hlo, "fused") == "cudnn"
    assert bench.cudnn_attention_calls(hlo) == 2
    assert bench.harness.attention_kernel("%a = dot(...)", "fused") == "xla"
    assert bench.harness.attention_kernel("%a = dot(...)", "reference") == "reference"
    assert bench.cudnn_attention_calls("%a = dot(...)") == 0
