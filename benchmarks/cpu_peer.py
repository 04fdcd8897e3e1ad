"""flaxlab against PyTorch on the CPU: the default configs' train steps, alternated in one run.

    python benchmarks/cpu_peer.py                      # gpt and lstm_seq2seq, ~3 minutes
    python benchmarks/cpu_peer.py --models=gpt --rounds=3 --steps=5 --out=''

What is timed, for each model:
  flaxlab        the train step exactly as `python -m train.main --config=<config>` builds
                 and jits it (trainer.make_init_state, task.make_train_step, the trainer's
                 shardings, donated state) on the config's own first training batches;
  torch eager    the same model and step in PyTorch (benchmarks/peers/: same parameter
                 count, asserted; same initialization scheme, loss, gradient clip, AdamW
                 with the same hyper-parameters and weight-decay exclusions), eager;
  torch compile  the same with the model under torch.compile (inductor; the optimizer
                 step eager, as nanoGPT does; for the seq2seq twin, one decoder step is
                 compiled and reused for every target position: compiling the unrolled
                 loop takes tens of minutes).

The three are timed in alternation in one process on the same cores: `--rounds` rounds,
each one window of `--steps` steps of every implementation (the order rotates from round
to round), so that a machine whose speed drifts (other jobs, clocks) affects all three
alike. Reported: the median window's ms per step of each, and `x best torch` = the faster
torch's ms / flaxlab's ms (> 1: flaxlab is faster). Both frameworks use every core (torch
intra-op threads = the number of CPUs; XLA's CPU client likewise).

Models:
  gpt           configs/gpt.py default: 4 x 128 decoder, B 32, T 128, byte vocabulary (260)
  lstm_seq2seq  configs/lstm.py default: bi-LSTM encoder, Bahdanau-attention LSTM decoder,
                B 64 on numbers -> words
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import time
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
PEERS = os.path.join(REPO_ROOT, "benchmarks", "peers")
if PEERS not in sys.path:
    sys.path.insert(0, PEERS)

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "cpu_peer.json")
IMPLS = ("flaxlab", "torch_eager", "torch_compile")


# ----------------------------------------------------------------------------------------
# flaxlab's step, built as the trainer builds it.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class FlaxlabStep:
    """The trainer's jitted train step on the config's first `num_batches` batches."""
    config: object
    num_batches: int

    def __post_init__(self):
        from jax.sharding import NamedSharding, PartitionSpec as P
        from train import families, optim, sharding, trainer
        from train.run_data import RunData
        from train.tasks import make_task

        c = self.config
        self.mesh = mesh = sharding.mesh_from_config(c.sharding)
        data = RunData(c.data, c.seed)
        self.model, self.model_cfg = families.build(c.model, c.task.name, **data.info)
        task = make_task(c, self.model, data)
        tx = task.make_optimizer(c.optim, optim.schedule_steps(c.optim, c.train.num_steps))
        init_key, train_key, _ = jax.random.split(jax.random.key(c.seed), 3)
        self.host_batches = [data.train.batch(s) for s in range(self.num_batches)]
        init_args, init_kwargs = task.init_args(self.host_batches[0])
        init_state = trainer.make_init_state(self.model, tx, init_key, init_args, init_kwargs)
        abstract = jax.eval_shape(init_state)
        logical = jax.eval_shape(lambda: self.model.init(
            {"params": init_key, "dropout": init_key}, *init_args, **init_kwargs))["params"]
        state_sh = sharding.state_sharding(abstract, mesh, c.sharding, logical)
        self.state = jax.jit(init_state, out_shardings=state_sh)()
        self.params = self.state.params
        step = jax.jit(task.make_train_step(tx, train_key, c.optim),
                       in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
        self.batches = [sharding.shard_batch(b, mesh, c.data.batch_size)
                        for b in self.host_batches]
        with sharding.use_rules(mesh, c.sharding):
            _, self.compiled, self.compile_times = harness.lower_and_compile(
                step, self.state, self.batches[0])
        self.n_params = sum(x.size for x in jax.tree.leaves(self.state.params))
        self.i = 0

    def __call__(self):
        self.state, scalars = self.compiled(self.state, self.batches[self.i % len(self.batches)])
        self.i += 1
        return scalars

    def sync(self, out):
        jax.block_until_ready((self.state, out))

    def loss(self, out) -> float:
        return float(jax.device_get(out)["loss"])


# ----------------------------------------------------------------------------------------
# The PyTorch peers of each model (benchmarks/peers/).
# ----------------------------------------------------------------------------------------
def gpt_peer(flax_step: FlaxlabStep, mode: str):
    """benchmarks/peers/gpt.py's model of the config and its train step."""
    gpt = importlib.import_module("gpt")
    c, m = flax_step.config, flax_step.model_cfg
    cfg = gpt.GPTConfig(vocab_size=m.vocab_size, max_length=m.max_length,
                        num_layers=m.num_layers, num_heads=m.num_heads, d_model=m.d_model,
                        mlp_dim=m.mlp_dim, norm_epsilon=m.norm_epsilon,
                        gelu_approximate="tanh" if m.activation == "gelu_tanh" else "none")
    model = gpt.GPT(cfg)
    o = c.optim
    step = gpt.make_train_step(
        model, [b["tokens"] for b in flax_step.host_batches], mode=mode, device="cpu",
        lr=o.learning_rate, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        grad_clip=o.grad_clip_norm, warmup_steps=o.schedule.warmup_steps,
        total_steps=c.train.num_steps, end_lr_fraction=o.schedule.end_lr_fraction)
    return model, step


def seq2seq_peer(flax_step: FlaxlabStep, mode: str):
    """benchmarks/peers/rnn.py's twin of the LSTM seq2seq model and its train step."""
    rnn = importlib.import_module("rnn")
    m, c = flax_step.model_cfg, flax_step.config
    model = rnn.build_seq2seq(vocab_size=m.vocab_size, embed_dim=m.embed_dim, hidden=m.hidden,
                              num_layers=m.num_layers, decoder_layers=m.decoder_layers,
                              attention_dim=m.attention_dim, dropout=m.dropout, pad_id=m.pad_id,
                              seed=c.seed)
    o = c.optim
    step = rnn.make_seq2seq_step(
        model, flax_step.host_batches, mode=mode, device="cpu", lr=o.learning_rate,
        betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
        grad_clip_norm=o.grad_clip_norm, warmup_steps=o.schedule.warmup_steps,
        total_steps=c.train.num_steps, end_lr_fraction=o.schedule.end_lr_fraction,
        label_smoothing=c.task.get("label_smoothing", 0.0))
    return model, step


@dataclasses.dataclass(frozen=True)
class ModelPair:
    config: str                  # configs/<file>.py:<variant>
    peer: Callable               # (FlaxlabStep, mode) -> (torch module, step function)
    shape: str                   # for the table


MODELS = {
    "gpt": ModelPair("configs/gpt.py:default", gpt_peer, "4x128 decoder, B 32, T 128"),
    "lstm_seq2seq": ModelPair("configs/lstm.py:default", seq2seq_peer,
                              "bi-LSTM 128 + Bahdanau decoder, B 64"),
}


class TorchStep:
    def __init__(self, flax_step: FlaxlabStep, pair: ModelPair, mode: str):
        import torch
        self.torch = torch
        self.model, self.step = pair.peer(flax_step, mode)
        # Trainable ones: a twin may hold frozen zeros where flaxlab has no parameter
        # (nn.LSTM's second bias, b_hh, in peers/rnn.py).
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def __call__(self):
        return self.step()

    def sync(self, out):
        pass   # the CPU runs torch synchronously

    def loss(self, out) -> float:
        return float(out.item())


# ----------------------------------------------------------------------------------------
# The alternation.
# ----------------------------------------------------------------------------------------
def load_config(spec: str):
    path, _, variant = spec.partition(":")
    spec_ = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(variant or "default")


def time_window(impl, steps: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = impl()
    impl.sync(out)
    return (time.perf_counter() - t0) / steps * 1e3


def run_model(name: str, args) -> dict:
    import torch
    pair = MODELS[name]
    config = load_config(pair.config)
    config.sharding.num_devices = 1
    print(f"[{name}] building {pair.config} ...", flush=True)
    impls = {"flaxlab": FlaxlabStep(config, args.num_batches)}
    for mode in args.torch_modes.split(","):
        impls[f"torch_{mode}"] = TorchStep(impls["flaxlab"], pair, mode)
    counts = {k: v.n_params for k, v in impls.items()}
    if len(set(counts.values())) != 1:
        raise AssertionError(f"[{name}] the peers are not the same model: parameter counts "
                             f"{counts}")
    first_loss, warm_s = {}, {}
    for key, impl in impls.items():   # warm-up: jit is compiled; torch.compile compiles here
        t0 = time.perf_counter()
        out = None
        for _ in range(args.warmup):
            out = impl()
        impl.sync(out)
        warm_s[key] = time.perf_counter() - t0
        first_loss[key] = impl.loss(out)
        print(f"[{name}] {key}: warm-up {warm_s[key]:.1f} s, loss {first_loss[key]:.3f}",
              flush=True)
    windows = {k: [] for k in impls}
    order = list(impls)
    for r in range(args.rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            windows[key].append(time_window(impls[key], args.steps))
        print(f"[{name}] round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {w[-1]:.1f} ms" for k, w in windows.items()), flush=True)
    stats = {k: harness.window_stats(w) for k, w in windows.items()}
    torch_keys = [k for k in impls if k.startswith("torch_")]
    best = min(torch_keys, key=lambda k: stats[k]["ms_median"])
    result = {
        "name": name, "config": pair.config, "shape": pair.shape, "params": counts["flaxlab"],
        "batch": config.data.batch_size, "warmup_s": warm_s, "loss_after_warmup": first_loss,
        "flaxlab_compile_s": impls["flaxlab"].compile_times, "stats": stats,
        "best_torch": best,
        "speedup_vs_best_torch": stats[best]["ms_median"] / stats["flaxlab"]["ms_median"],
        "speedup_vs": {k: stats[k]["ms_median"] / stats["flaxlab"]["ms_median"]
                       for k in torch_keys},
        "torch_threads": torch.get_num_threads(),
    }
    del impls
    return result


COLUMNS = [("model", "<13"), ("impl", "<14"), ("ms/step", "9.2f"), ("spread", ">7"),
           ("x flaxlab", "9.2f")]


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"flaxlab vs PyTorch train steps on the CPU: {env['device']} "
             f"({os.cpu_count()} CPUs), jax {env['jax']}, torch {report['torch']}; "
             f"{report['rounds']} alternating rounds x {report['steps']} steps, median"]
    head = harness.table_header(COLUMNS)
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        base = r["stats"]["flaxlab"]["ms_median"]
        for key, s in r["stats"].items():
            lines.append(harness.table_row(COLUMNS, (
                r["name"], key, s["ms_median"], f"{s['spread_pct']:5.1f}%",
                s["ms_median"] / base)))
        lines.append(f"  {r['name']}: flaxlab is {r['speedup_vs_best_torch']:.2f}x the "
                     f"speed of the best torch ({r['best_torch']}); {r['params']:,} params; "
                     f"{r['shape']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"from {', '.join(MODELS)}")
    p.add_argument("--torch_modes", default="eager,compile")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per window")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num_batches", type=int, default=4)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON path ('' = none)")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; allowed: {', '.join(MODELS)}")
    modes = args.torch_modes.split(",")
    if not modes or any(m not in ("eager", "compile") for m in modes):
        p.error(f"--torch_modes={args.torch_modes!r}; allowed: eager, compile, both")
    harness.require_at_least(p, args, ("rounds", "steps", "warmup", "num_batches"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    report = harness.new_report("cpu_peer", argv, rounds=args.rounds, steps=args.steps,
                                torch=torch.__version__, environment=harness.environment(),
                                results=[])
    harness.run_each(args.models.split(","), lambda n: run_model(n, args), report, args.out)
    return harness.print_and_write(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
