"""The train state: one pytree that a step maps to the next and a checkpoint stores.

    state = TrainState.create(params, opt_state, model_state)
    state = state.advance(finite, params=new_params, opt_state=new_opt_state, ...)

`model_state` holds the non-parameter collections (batch_stats, ...); `nonfinite_step` is
the first step whose loss or gradients were NaN/Inf (-1: none yet). It is kept inside the
state, computed in the jitted step and checked on the host only when metrics are fetched,
so the check costs no device-to-host sync per step, and the step that went bad is known
exactly even when it is noticed later. Every train step (the generic one in
train/tasks/base.py, the GAN's phased step, a compressed run's) advances the state through
`advance`, so the step counter and the NaN marker are written once.

On disk a state is the dict `to_dict()` gives ({"step", "params", "opt_state",
"model_state", "nonfinite_step"}): checkpoints do not depend on this class. `frozen` (a
distillation teacher's variables) is state the step reads but a checkpoint never holds.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

FIELDS = ("step", "params", "opt_state", "model_state", "nonfinite_step")


@struct.dataclass
class TrainState:
    step: jax.Array           # int32 [], optimizer steps taken
    params: Any               # the trained parameters (a GAN: {"generator", "discriminator"})
    opt_state: Any            # the optimizer's state for `params`
    model_state: Any          # non-parameter collections, e.g. {"batch_stats": ...}
    nonfinite_step: jax.Array  # int32 [], first step with a NaN/Inf loss or gradient; -1
    # Variables the step reads and never trains (a distillation teacher's): an argument of
    # the jitted step, not differentiated, not checkpointed (to_dict leaves it out; the
    # run reloads it from its source on every start).
    frozen: Any = struct.field(default_factory=dict)

    @classmethod
    def create(cls, params, opt_state, model_state=None) -> "TrainState":
        """The state before step 0."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                   model_state={} if model_state is None else model_state,
                   nonfinite_step=jnp.full((), -1, jnp.int32))

    def advance(self, finite: jax.Array, **changes) -> "TrainState":
        """The state after this step: step + 1, `changes` applied, and this step recorded
        as the first non-finite one when `finite` (a bool scalar) is False and none was."""
        first_bad = jnp.where((self.nonfinite_step < 0) & ~finite, self.step,
                              self.nonfinite_step)
        return self.replace(step=self.step + 1, nonfinite_step=first_bad, **changes)

    def to_dict(self) -> dict:
        """The checkpoint form."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, tree: dict, frozen=None) -> "TrainState":
        return cls(**{name: tree[name] for name in FIELDS},
                   frozen={} if frozen is None else frozen)
