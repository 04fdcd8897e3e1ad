"""benchmarks/peers/rnn.py against flaxlab itself: the seq2seq twin computes
models.rnn.Seq2SeqRNN's logits, the seq2seq task's loss and its gradients from the same
weights on a real, padded numbers_to_words batch; it has the default config's parameter
count; its training step takes flaxlab's optimizer steps (AdamW, clipping, warm-up +
cosine, weight-decay exclusions); and the RNN `step` CLI prints its metric lines."""
import copy
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta as flax_meta

torch = pytest.importorskip("torch")
# torch's own modules (inductor) import deprecated torch.jit decorators.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")

from configs import lstm as lstm_config  # noqa: E402
from train import families, optim  # noqa: E402
from train.data.seq2seq import numbers_to_words_dataset  # noqa: E402
from train.tasks import make_task  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "peers", "rnn.py")
# benchmarks/harness.py's result lines (the `torch <version>` line is not one).
METRIC = re.compile(r"^(torch_\w+)\s+([0-9.eE+-]+)\s")


def _load_peer():
    spec = importlib.util.spec_from_file_location("peers_rnn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load_peer()


# ----------------------------------------------------------------------------------------
# flaxlab <-> twin: the parameter mapping.
# ----------------------------------------------------------------------------------------
def mapping(params):
    """[(twin name, flaxlab path, how)]: how "T" = transposed ([in, out] -> [out, in]),
    "row" = a [A] vector as a [1, A] weight, "" = as is. The twin's frozen b_hh have no
    flaxlab counterpart (they stay zero)."""
    out = [("embed.weight", "embed/embedding", "")]
    enc = params["encoder"]
    for k in range(len(enc)):
        for d, sfx in (("fwd", ""), ("bwd", "_reverse")):
            base = f"encoder/layers_{k}/{d}"
            out += [(f"encoder.weight_ih_l{k}{sfx}", f"{base}/input_kernel", "T"),
                    (f"encoder.weight_hh_l{k}{sfx}", f"{base}/recurrent_kernel", "T"),
                    (f"encoder.bias_ih_l{k}{sfx}", f"{base}/bias", "")]
    out += [("decoder.bridge.weight", "bridge/kernel", "T"),
            ("decoder.bridge.bias", "bridge/bias", ""),
            ("decoder.attn_query.weight", "attn_query_kernel", "T"),
            ("decoder.attn_key.weight", "attn_key_kernel", "T"),
            ("decoder.attn_v.weight", "attn_v", "row"),
            ("decoder.combine.weight", "combine_kernel", "T"),
            ("decoder.combine.bias", "combine_bias", ""),
            ("decoder.logits.weight", "logits/kernel", "T"),
            ("decoder.logits.bias", "logits/bias", "")]
    i = 0
    while f"decoder_{i}" in params:
        out += [(f"decoder.cells.{i}.weight_ih", f"decoder_{i}/input_kernel", "T"),
                (f"decoder.cells.{i}.weight_hh", f"decoder_{i}/recurrent_kernel", "T"),
                (f"decoder.cells.{i}.bias_ih", f"decoder_{i}/bias", "")]
        i += 1
    return out


def at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return np.asarray(tree, np.float32)


def as_twin(a, how):
    return a.T if how == "T" else a[None] if how == "row" else a


def load_into_twin(twin, params):
    """flaxlab Seq2SeqRNN params -> the twin's state dict (every twin parameter set)."""
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    rows = mapping(params)
    for name, path, how in rows:
        assert state[name].shape == as_twin(at(params, path), how).shape, name
        state[name] = torch.from_numpy(np.array(as_twin(at(params, path), how)))
    unmapped = {n for n, p in twin.named_parameters()} - {n for n, _, _ in rows}
    assert all(".bias_hh" in n for n in unmapped), unmapped
    twin.load_state_dict(state)


# ----------------------------------------------------------------------------------------
# A smaller model of the default's architecture on real padded batches.
# ----------------------------------------------------------------------------------------
SMALL = dict(embed_dim=16, hidden=24, attention_dim=20)   # attention width != hidden
NUMBERS = ([7, 42, 315, 999, 100], [860, 5, 13, 777, 20])


def small_config():
    c = lstm_config.get_config("default")
    for k, v in SMALL.items():
        c.model[k] = v
    return c


def twin_for(c):
    m = c.model
    return peer.build_seq2seq(peer.VOCAB, m.embed_dim, m.hidden, m.num_layers,
                              m.decoder_layers, m.attention_dim, m.dropout, m.pad_id, seed=0)


@pytest.fixture(scope="module")
def flaxlab():
    """The small config's flaxlab model: params (the init moved off its zero / one biases
    by noise), the task, two numbers_to_words batches (the source's own encoding of fixed
    numbers: 1-3 digits + EOS in 8 columns, their words + EOS in 32, so every row is
    padded and the lengths differ) and a jitted (params, batch) -> (loss, logits), grads
    of the task's own predict + metrics_of."""
    c = small_config()
    ds = numbers_to_words_dataset("train", seed=0, batch_size=5, max_number=999,
                                  max_input_len=8, max_target_len=32)
    batches = [ds.examples(np.array(n)) for n in NUMBERS]
    for b in batches:
        lengths = (b["inputs"] != 0).sum(1)
        assert len(set(lengths)) > 1 and lengths.max() < 8 and (b["targets"] == 0).any()
    model, _ = families.build(c.model, "seq2seq", vocab_size=peer.VOCAB)
    task = make_task(c, model, {"train": ds})
    args, kwargs = task.init_args(batches[0])
    params = flax_meta.unbox(jax.jit(model.init)(jax.random.key(0), *args, **kwargs))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])

    def loss_and_logits(p, batch):
        outputs, _ = task.predict(p, {}, batch, jax.random.key(2), True)
        return task.metrics_of(outputs, batch)[0], outputs["logits"]
    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))
    return c, params, batches, grad_fn


# ----------------------------------------------------------------------------------------
# (a) the same function: logits, loss, gradients.
# ----------------------------------------------------------------------------------------
def test_twin_logits_loss_and_gradients_equal_flaxlab(flaxlab):
    c, params, batches, grad_fn = flaxlab
    batch = batches[0]
    (loss, logits), grads = grad_fn(params, batch)
    twin = twin_for(c)
    load_into_twin(twin, params)
    b = peer.prepare_batch(batch)
    twin_logits = twin(b["inputs"], b["decoder_tokens"], b["lengths"])
    twin_loss = peer.seq2seq_loss(twin_logits, b["targets"], b["weights"])
    twin_loss.backward()
    twin_loss = twin_loss.detach()

    assert twin_logits.shape == logits.shape == batch["targets"].shape + (peer.VOCAB,)
    assert np.abs(twin_logits.detach().numpy() - np.asarray(logits)).max() < 1e-5
    assert abs(float(twin_loss) - float(loss)) < 1e-5 * float(loss)
    named = dict(twin.named_parameters())
    for name, path, how in mapping(params):
        g_flax = as_twin(at(grads, path), how)
        g_twin = named[name].grad.numpy()
        scale = max(np.abs(g_flax).max(), 1e-3)
        assert np.abs(g_twin - g_flax).max() < 1e-4 * scale, name
    assert all(p.grad is None for n, p in named.items() if ".bias_hh" in n)
    norm_twin = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in twin.parameters()
                               if p.grad is not None))
    norm_flax = float(optax.tree.norm(grads))
    assert norm_flax > 0.1
    assert abs(float(norm_twin) - norm_flax) < 1e-5 * norm_flax


# ----------------------------------------------------------------------------------------
# (b) the default config's size; the decay exclusions are flaxlab's.
# ----------------------------------------------------------------------------------------
def test_default_config_parameter_count_and_decay_exclusions_equal_flaxlab():
    c = lstm_config.get_config("default")
    model, _ = families.build(c.model, "seq2seq", vocab_size=peer.VOCAB)
    shapes = jax.eval_shape(lambda: flax_meta.unbox(model.init(
        jax.random.key(0), jnp.ones((2, 8), jnp.int32), jnp.ones((2, 72), jnp.int32))))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    twin = peer.build_seq2seq()   # its defaults are the default config's
    assert count == peer.trainable_parameters(twin) == 617_348
    # Every twin parameter is decayed exactly when optim.weight_decay_exclude keeps
    # flaxlab's decay on its counterpart.
    exclude = c.optim.weight_decay_exclude
    rows = mapping(jax.tree.map(np.zeros_like, shapes["params"]))
    decided = {name: not any(re.search(p, path) for p in exclude)
               for name, path, _ in rows}
    assert {n: not peer.no_decay(n) for n in decided} == decided
    assert decided["decoder.combine.weight"] and not decided["embed.weight"]
    assert not decided["decoder.combine.bias"]   # combine_bias: a named bias


# ----------------------------------------------------------------------------------------
# The training step equals flaxlab's optimizer steps.
# ----------------------------------------------------------------------------------------
def test_seq2seq_step_takes_flaxlab_optimizer_steps(flaxlab):
    """3 steps (batches 0, 1, 0) of flaxlab's optimizer for the config -- AdamW, weight
    decay 0.5 with the exclusions, clipping at global norm 0.25 (the gradient norms are
    larger) and warm-up (1 step) + cosine over 4 steps -- and of the twin's step: the
    same losses and parameters."""
    c, params, batches, grad_fn = flaxlab
    c = small_config()
    c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip_norm = 1e-2, 0.5, 0.25
    c.optim.schedule.warmup_steps, total = 1, 4
    tx = optim.make_optimizer(c.optim, total)
    update = jax.jit(tx.update)

    twin = twin_for(c)
    load_into_twin(twin, params)
    step = peer.make_seq2seq_step(twin, batches, "eager", lr=1e-2, weight_decay=0.5,
                                  grad_clip_norm=0.25, warmup_steps=1, total_steps=total)
    state, start = tx.init(params), params
    for i in range(3):
        (loss, _), grads = grad_fn(params, batches[i % 2])
        assert float(optax.tree.norm(grads)) > 0.25   # the clipping acts
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert abs(float(step()) - float(loss)) < 1e-5 * float(loss), i
    named, moved = dict(twin.named_parameters()), 0.0
    for name, path, how in mapping(params):
        a, b = as_twin(at(params, path), how), named[name].detach().numpy()
        assert np.abs(a - b).max() < 2e-4, name
        moved = max(moved, float(np.abs(at(params, path) - at(start, path)).max()))
    assert moved > 1e-2   # the steps moved them


# ----------------------------------------------------------------------------------------
# (c) the `step` CLI and its step.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_step_is_loss_mean_square_and_one_sgd_update(cell):
    """The step's loss and update against a float64 copy: mean(y^2), w - lr * grad."""
    step, rnn, x = peer.make_rnn_step(cell, "float32", batch=3, seq_len=5, input_size=4,
                                      hidden=6, layers=2, lr=0.1)
    ref = copy.deepcopy(rnn).double()
    y, _ = ref(x.double())
    expected = y.pow(2).mean()
    expected.backward()
    loss = step()
    assert abs(float(loss) - expected.item()) < 1e-6 * expected.item()
    for n, p in rnn.named_parameters():
        r = ref.get_parameter(n)
        want = (r - 0.1 * r.grad).detach()
        assert torch.allclose(p.detach().double(), want, atol=1e-6), n


def test_step_cli_prints_a_line_per_cell_and_dtype_and_reports_failures():
    out = subprocess.run(
        [sys.executable, SCRIPT, "step", "--cells=lstm,gru", "--dtypes=float32,bfloat16,int8",
         "--batch=2", "--seq_len=4", "--input=8", "--hidden=8", "--layers=2", "--steps=1",
         "--windows=1", "--warmup=1", "--device=cpu", "--threads=1"],
        capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    metrics = dict(m.groups() for m in map(METRIC.match, out.stdout.splitlines()) if m)
    assert set(metrics) == {f"torch_cudnn_{c}_{d}_step_ms" for c in ("lstm", "gru")
                            for d in ("float32", "bfloat16")}
    assert all(float(v) > 0 for v in metrics.values())
    kernels = re.findall(r"_step_ms \S+ ms kernel=(\w+)", out.stdout)
    assert len(kernels) == 4 and set(kernels) <= {"cudnn", "mkldnn", "native"}
    assert "torch_cudnn_lstm_int8 failed:" in out.stdout
    assert "torch_cudnn_gru_int8 failed:" in out.stdout
    assert out.stdout.startswith("torch ")


# ----------------------------------------------------------------------------------------
# (d) make_seq2seq_step trains, eager and compiled.
# ----------------------------------------------------------------------------------------
def tiny_batch(targets_len=6):
    b = peer.random_batches(1, 3, max_target_len=targets_len, seed=0)[0]
    assert (b["inputs"] == 0).any()
    return b


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_make_seq2seq_step_trains(mode):
    """The same batch twice, no warm-up: the second loss is lower. Compile mode compiles
    the decoder on the first call (inductor: about 15 s on 2 CPU cores with a warm
    inductor cache, minutes cold)."""
    twin = peer.build_seq2seq(embed_dim=8, hidden=8, seed=0)
    step = peer.make_seq2seq_step(twin, [tiny_batch()], mode, lr=1e-2, warmup_steps=0)
    first, second = float(step()), float(step())
    assert np.isfinite(first) and second < first
    if mode == "compile":   # the eager twin from the same weights computes the same loss
        eager = peer.build_seq2seq(embed_dim=8, hidden=8, seed=0)
        eager_step = peer.make_seq2seq_step(eager, [tiny_batch()], "eager", lr=1e-2,
                                            warmup_steps=0)
        assert abs(float(eager_step()) - first) < 1e-5 * first
        assert abs(float(eager_step()) - second) < 1e-4 * second


def test_seq2seq_cli_prints_its_step_time(capsys):
    assert peer.main(["seq2seq", "--batch=2", "--embed_dim=8", "--hidden=8", "--steps=1",
                      "--windows=1", "--warmup=1", "--num_batches=1", "--device=cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = dict(m.groups() for m in map(METRIC.match, lines) if m)
    assert set(metrics) == {"torch_lstm_seq2seq_eager_step_ms", "torch_lstm_seq2seq_params",
                            "torch_lstm_seq2seq_eager_first_step_s"}
    assert float(metrics["torch_lstm_seq2seq_eager_step_ms"]) > 0
    assert int(metrics["torch_lstm_seq2seq_params"]) == peer.trainable_parameters(
        peer.build_seq2seq(embed_dim=8, hidden=8))
