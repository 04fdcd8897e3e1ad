"""The size of a gated stack: the expected sparsity of every gate kind against a float64
hand count, in both layouts; all gates open is sparsity 0."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import transformer
from models.compress import gated_size
from models.layers import gates


def test_expected_sparsity_is_the_expected_l0_of_every_gate_kind_in_both_layouts():
    """1 - E[kept] / all over the attention and MLP parameters, E[kept] per layer
    P(attention) * sum P(head) * 4 hd * E[width] + P(mlp) * sum P(unit) * (2 E[width] + 1),
    E[width] = sum P(channel): a float64 count by hand, unrolled and scanned alike."""
    cfg = transformer.make_config("tiny", vocab_size=20, max_length=8, num_layers=3,
                                  num_heads=2, d_model=8, mlp_dim=12, unit_gates=True,
                                  channel_gates=True)
    params = nn.unbox(jax.eval_shape(transformer.Decoder(cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    stack = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params["decoder"])  # shapes

    def p_open(a):
        return 1.0 / (1.0 + np.exp(-(np.float64(a) - gates.BETA * np.log(
            -gates.LIMIT_L / gates.LIMIT_R))))

    for path in ([transformer.CHANNEL_GATE]
                 + [[f"layers_{i}", k, g] for i in range(3) for k, g in (
                     ("self_attention", "head_gate"), ("mlp", "unit_gate"),
                     ("attention_sublayer", "layer_gate"), ("mlp_sublayer", "layer_gate"))]):
        sub = stack
        for key in ([path] if isinstance(path, str) else path):
            sub = sub[key]
        sub[gates.PARAM] = rng.normal(0.0, 3.0, sub[gates.PARAM].shape).astype(np.float32)
    width = p_open(stack[transformer.CHANNEL_GATE][gates.PARAM]).sum()
    kept = 0.0
    for i in range(3):
        layer = stack[f"layers_{i}"]
        kept += (p_open(layer["attention_sublayer"]["layer_gate"][gates.PARAM][0])
                 * p_open(layer["self_attention"]["head_gate"][gates.PARAM]).sum() * 4 * 4
                 * width)
        kept += (p_open(layer["mlp_sublayer"]["layer_gate"][gates.PARAM][0])
                 * p_open(layer["mlp"]["unit_gate"][gates.PARAM]).sum() * (2 * width + 1))
    full = 3 * (2 * 4 * 4 * 8 + 12 * (2 * 8 + 1))
    want = 1.0 - kept / full
    assert abs(float(gated_size.expected_sparsity(stack)) - want) < 1e-5
    scanned = transformer.stack_layers(stack)
    assert abs(float(gated_size.expected_sparsity(scanned)) - want) < 1e-5
    opened = jax.tree.map(lambda x: np.full_like(x, 30.0), stack)   # every gate surely open
    assert abs(float(gated_size.expected_sparsity(opened))) < 1e-6
