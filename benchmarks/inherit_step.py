"""Step time of inherited (shrunken) students beside their teachers.

    python benchmarks/inherit_step.py                         # CLIP teacher vs student
    python benchmarks/inherit_step.py --pairs=gpt --batch=16  # 6-layer vs 2-layer GPT

Weight inheritance (models/compress/inherit.py) removes layers, heads, units and channels,
so a student is an ordinary smaller model with fewer FLOPs, not a masked teacher. This
measures it: for each pair, the jitted loss-and-gradient step of the teacher's and the
student's config (the run's own task loss on a training batch of the embedded data) is
compiled ahead of time, warmed up and timed in windows (benchmarks/harness.py). Reported:
parameters, XLA's FLOP estimate, median ms per step, and the student/teacher ratios --
the peer of a student is its teacher, measured in the same run.

The table is printed last; the JSON report goes to --out (default
benchmarks/results/inherit_step.json; '' writes none).
"""
from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "inherit_step.json")
# name -> (teacher (config, variant, overrides), student (config, variant, overrides))
PAIRS = {
    "clip": (("clip", "teacher", {}), ("clip", "student", {})),
    "gpt": (("gpt", "default", {"num_layers": 6}), ("gpt", "default", {"num_layers": 2})),
}


def loss_and_grad_step(config_name: str, variant: str, model_overrides: dict, batch: int):
    """(jitted (params, batch) -> (loss, grads), params, batch, parameter count)."""
    import importlib  # noqa: PLC0415

    from flax import linen as nn  # noqa: PLC0415

    from train import families, run_data  # noqa: PLC0415
    from train.tasks import TASKS  # noqa: PLC0415

    c = importlib.import_module(f"configs.{config_name}").get_config(variant)
    c.model.update(model_overrides)
    c.data.batch_size = batch
    data = run_data.RunData(c.data, c.seed)
    model, _ = families.build(c.model, c.task.name, **data.info)
    task = TASKS[c.task.name](c, model, data)
    example = data.train.batch(0)
    args, kwargs = task.init_args(jax.tree.map(lambda x: x[:1], example))
    variables = jax.jit(lambda: model.init({"params": jax.random.key(0),
                                            "dropout": jax.random.key(1)}, *args, **kwargs))()
    params = nn.unbox(variables["params"])
    model_state = {k: v for k, v in nn.unbox(variables).items() if k != "params"}

    def step(p, b):  # harness steps map (state, input) -> (state, outputs)
        return p, jax.value_and_grad(lambda q: task.loss_fn(q, model_state, b,
                                                            jax.random.key(2), True)[0])(p)
    return jax.jit(step), params, example, harness.count_params(params)[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="clip", help=f"comma-separated of {', '.join(PAIRS)}")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--out", default=DEFAULT_OUT)
    harness.add_timing_flags(p)
    args = p.parse_args(argv)
    report = harness.new_report("inherit_step", argv, batch=args.batch, results={})
    columns = [("pair", "<6"), ("model", "<8"), ("params", ">10"), ("GFLOP", "8.3f"),
               ("ms/step", "9.2f"), ("x params", "9.3f"), ("x time", "7.3f")]
    rows = [harness.table_header(columns)]
    for name in args.pairs.split(","):
        if name not in PAIRS:
            p.error(f"--pairs: unknown {name!r}; allowed: {', '.join(PAIRS)}")
        measured = {}
        for role, spec in zip(("teacher", "student"), PAIRS[name]):
            step, params, batch, n = loss_and_grad_step(*spec, args.batch)
            _, compiled, _ = harness.lower_and_compile(step, params, batch)
            harness.warm_up(compiled, params, [batch], args.warmup)
            stats = harness.window_stats(harness.time_windows(
                compiled, params, [batch], windows=args.windows, steps=args.steps)[2])
            measured[role] = {"params": n, "flops": harness.cost_flops(compiled), **stats}
        t, s = measured["teacher"], measured["student"]
        s["params_ratio"] = s["params"] / t["params"]
        s["time_ratio"] = s["ms_median"] / t["ms_median"]
        report["results"][name] = measured
        for role, m in measured.items():
            rows.append(harness.table_row(columns, [
                name, role, m["params"], (m["flops"] or float("nan")) / 1e9, m["ms_median"],
                m.get("params_ratio", 1.0), m.get("time_ratio", 1.0)]))
    return harness.print_and_write(report, "\n".join(rows), args.out or None)


if __name__ == "__main__":
    main()
