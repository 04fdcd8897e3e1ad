"""Fixtures shared by the model tests: random variables with realistic scales, and
cached jitted forward passes (train mode returns the updated batch statistics)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Unoptimized XLA compiles these small reference graphs several times faster on CPU.
jit_o0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _random_variables(model, x, seed=0, kernel_gain=1.0):
    """Variables of `model` on input `x`: kernels N(0, gain^2 / fan_in), norm scales near
    1, running variances in [0.5, 1.5], biases and running means small; so a float64
    reference sees non-trivial values in every leaf."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))  # plain arrays
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name, shape = path[-1].key, s.shape
        if name == "kernel":
            value = r.normal(size=shape) * kernel_gain / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * r.normal(size=shape)
        elif name == "var":
            value = r.uniform(0.5, 1.5, size=shape)
        else:  # bias, running mean
            value = 0.1 * r.normal(size=shape)
        return jnp.asarray(value, s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


@functools.cache
def _forward(model, train=False):
    """(variables, x) -> (outputs, batch-stat updates or None), jitted once per model."""
    def f(v, x):
        if train:
            return model.apply(v, x, train=True, mutable=["batch_stats"])
        return model.apply(v, x), None
    return jit_o0(f)


@pytest.fixture
def random_variables():
    return _random_variables


@pytest.fixture
def forward():
    return _forward


@pytest.fixture
def jit():
    return jit_o0
