"""Multi-stage progressive distillation (TinyCLIP, Wu et al. 2023, sec. 3.3): compress in
several modest steps, each one weight inheritance from the previous stage's model plus
distillation from the teacher.

    config.distill.teacher = "runs/clip_teacher"
    config.distill.stages = ("model.vit.encoder.d_model=104;model.vit.encoder.mlp_dim=416",)
    config.model = the final student

Stage i (0 <= i < len(stages)) is the run's config with stage i's overrides ("key=value"
pairs split by ';', typed like the sweep's) -- an intermediate model --, the last stage
is the run's config itself. Every stage is an ordinary run in `<workdir>/stage_<i>`:
`init_from` the previous stage's workdir (stage 0: the teacher's) with weight
inheritance (`init_from.inherit`, default "uniform"), distilled from `distill.teacher`
(the original teacher throughout), for an equal share of `train.num_steps` (the whole
budget, so rows with and without stages compare at equal steps). `stages.json` lists them;
summary.json is the last stage's summary plus `stage_<i>/<metric>` of the earlier ones.
The same command resumes: finished stages are skipped, an interrupted one resumes from
its checkpoint (bit-exactly, as any run).
"""
from __future__ import annotations

import json
import os

import ml_collections

from train.metrics_log import write_json


def parse_stage(text: str) -> dict[str, str]:
    """"k1=v1;k2=v2" -> {"k1": "v1", "k2": "v2"}; ValueError naming a malformed pair."""
    pairs = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"distill.stages entry {text!r}: {part!r} is not key=value "
                             "(pairs are split by ';')")
        pairs[key.strip()] = value.strip()
    if not pairs:
        raise ValueError(f"distill.stages entry {text!r} holds no key=value pair")
    return pairs


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """[(stage workdir, its config)] of a staged run, every one validated."""
    from train import config as config_lib  # noqa: PLC0415
    from train.sweep import apply_overrides  # noqa: PLC0415 -- the typed override parser

    c = config.distill
    if not c.teacher:
        raise ValueError("distill.stages needs distill.teacher (stage 0 inherits from it)")
    count = len(c.stages) + 1
    steps = config.train.num_steps // count
    if steps < 1:
        raise ValueError(f"train.num_steps={config.train.num_steps} is below one step for "
                         f"each of the {count} stages")
    out, previous = [], c.teacher
    for i in range(count):
        overrides = parse_stage(c.stages[i]) if i < len(c.stages) else {}
        try:
            stage = apply_overrides(config, overrides)
        except ValueError as e:
            raise ValueError(f"distill.stages[{i}]: {e}") from None
        stage.distill.stages = ()
        stage.train.num_steps = steps
        stage.init_from.workdir = c.teacher  # validated with a workdir that exists now
        stage.init_from.inherit = config.init_from.inherit or "uniform"
        try:
            config_lib.validate(stage)
        except ValueError as e:
            raise ValueError(f"distill.stages[{i}]: {e}") from None
        stage.init_from.workdir = previous
        previous = os.path.join(workdir, f"stage_{i}")
        out.append((previous, stage))
    return out


def _latest_step(workdir: str) -> int:
    path = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps, default=0)


def _finished(workdir: str) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    return summary if summary.get("status", "finished") == "finished" else None


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_after_steps: int | None = None) -> dict:
    """Train every stage of `config` under `workdir` (see the module docstring)."""
    from train import trainer  # noqa: PLC0415

    plan = stage_configs(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "stages.json"), {
        "stages": list(config.distill.stages), "teacher": config.distill.teacher,
        "workdirs": [os.path.basename(w) for w, _ in plan],
        "steps_per_stage": plan[0][1].train.num_steps})
    summaries, budget = [], stop_after_steps
    for i, (stage_dir, stage) in enumerate(plan):
        summary = _finished(stage_dir)
        if summary is None:
            start = _latest_step(stage_dir)
            summary = trainer.train_and_evaluate(stage, stage_dir, stop_after_steps=budget)
            if summary.get("status", "finished") != "finished":
                return {**summary, "stage": i}
            if budget is not None:
                budget -= summary["train/steps"] - start
                if budget <= 0 and i < len(plan) - 1:
                    return {"status": "stopped", "stage": i, "step": summary["train/steps"]}
        summaries.append(summary)
    final = dict(summaries[-1])
    for i, summary in enumerate(summaries[:-1]):
        final.update({f"stage_{i}/{k}": v for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_json(os.path.join(workdir, "summary.json"), final)
    return final
