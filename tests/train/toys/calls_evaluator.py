"""A toy evaluator written from WORKSPACE.md's "How to add an evaluator" alone: it records
when it ran and re-evaluates the validation split through the run's own loop."""
from train.evaluators.base import Evaluator


class CallsEvaluator(Evaluator):
    name = "calls"

    @classmethod
    def default_config(cls):
        c = super().default_config()
        c.split = "validation"
        return c

    def run(self, step, params, model_state, final):
        means = self.ctx.evaluate(self.cfg.split, params, model_state)
        return {"step": step, "final": float(final), "loss": means["loss"]}
