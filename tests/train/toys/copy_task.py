"""A toy task written from WORKSPACE.md's "How to add a task" alone: a decoder learns to
copy its input token (logits at position t predict token t, which it sees)."""
import jax.numpy as jnp

from train.tasks import common
from train.tasks.base import Task


class CopyTask(Task):
    name = "copy"
    model_kind = "lm"          # the transformer family's decoder builder

    def init_args(self, batch):
        return (batch["tokens"][:, :-1],), {}

    def loss_fn(self, params, model_state, batch, rng, train: bool):
        inputs = batch["tokens"][:, :-1]
        logits = self.model.apply({"params": params}, inputs, train=train,
                                  rngs={"dropout": rng})
        weights = jnp.broadcast_to(common.example_weights(batch, inputs.shape[0])[:, None],
                                   inputs.shape)
        loss, metrics = common.token_metrics(logits, inputs, weights)
        return loss, (metrics, model_state)
