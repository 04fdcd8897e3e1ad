"""A tiny GPT (configs/gpt.py "tiny", built the way training builds it), shared by the
compression tests of this directory."""
import flax.linen as nn
import jax
import pytest


@pytest.fixture(scope="session")
def tiny_gpt():
    """(model, resolved TransformerConfig, params, tokens [2, 16]) of the tiny GPT."""
    from configs import gpt
    from train import families
    c = gpt.get_config("tiny")
    model, cfg = families.build(c.model, "lm", vocab_size=260)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 4, 260)
    # Plain arrays, as training stores them (model.init returns logical-axis boxes).
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    return model, cfg, params, tokens
