"""MLP, norms, embeddings, initializers and dtype/dot_general plumbing vs float64 NumPy."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models.layers import initializers
from models.layers.attention import MultiHeadAttention
from models.layers.embedding import Embed, PositionEmbedding, sinusoidal_position_encoding
from models.layers.mlp import ACTIVATIONS, MlpBlock
from models.layers.normalization import make_norm

f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
# On CPU, compiling dominates these tests: jit whole functions once (backend optimization
# level 0: fewer LLVM passes, same program) rather than compiling op by op eagerly.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _randomize(params, seed, scale=0.5):
    """N(0, scale^2) noise with the shapes/dtypes of `params` (arrays or eval_shape
    structs), so that zero-initialized biases and unit norm scales are exercised too."""
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(r.normal(0.0, scale, p.shape), p.dtype), params)


def _params(module, *args, seed):
    """Random parameters with the module's shapes (eval_shape: nothing is compiled)."""
    return _randomize(nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"]),
                      seed)


# ----------------------------------------------------------------------------------------
# MlpBlock: FFN(x) = act(x W1 + b1) W2 + b2.
# ----------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf)
NUMPY_ACTIVATIONS = {
    "gelu": lambda h: 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0))),  # x * Phi(x), exact
    "gelu_tanh": lambda h: 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                    * (h + 0.044715 * h ** 3))),
    "relu": lambda h: np.maximum(h, 0.0),
}


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_mlp_block_equals_float64_ffn(activation):
    x = np.random.default_rng(0).normal(0.0, 1.5, (2, 3, 4)).astype(np.float32)
    mlp = MlpBlock(hidden_dim=8, out_features=5, activation=activation)
    params = _params(mlp, x, seed=1)
    assert jax.tree.map(np.shape, params) == {"fc1": {"kernel": (4, 8), "bias": (8,)},
                                              "fc2": {"kernel": (8, 5), "bias": (5,)}}
    out = _jit(mlp.apply)({"params": params}, x)
    h = f64(x) @ f64(params["fc1"]["kernel"]) + f64(params["fc1"]["bias"])
    expected = (NUMPY_ACTIVATIONS[activation](h) @ f64(params["fc2"]["kernel"])
                + f64(params["fc2"]["bias"]))
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    # The hidden pre-activations are spread enough that exact GELU and its tanh
    # approximation differ by far more than the tolerance: swapping them would be caught.
    gap = np.abs(NUMPY_ACTIVATIONS["gelu"](h) - NUMPY_ACTIVATIONS["gelu_tanh"](h)).max()
    assert gap > 1e-4


def test_mlp_unknown_activation_lists_allowed():
    mlp = MlpBlock(hidden_dim=8, activation="swish")
    with pytest.raises(ValueError, match="'swish'") as e:
        jax.eval_shape(mlp.init, jax.random.key(0), jnp.ones((1, 4)))
    for name in ACTIVATIONS:
        assert name in str(e.value)


# ----------------------------------------------------------------------------------------
# Norms.
# ----------------------------------------------------------------------------------------
def _norm_input():
    r = np.random.default_rng(2)
    x = r.normal(3.0, 2.0, (3, 6))     # non-zero mean: layernorm and rmsnorm differ
    x[2] = 1.0 + 0.05 * r.normal(size=6)  # tiny variance: epsilon=0.01 matters here
    return x.astype(np.float32)


def test_layernorm_equals_formula():
    x = _norm_input()
    norm = make_norm("layernorm", epsilon=0.01)
    params = _params(norm, x, seed=3)
    assert set(params) == {"scale", "bias"}
    xd = f64(x)
    mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)  # biased variance
    expected = (xd - mu) / np.sqrt(var + 0.01) * f64(params["scale"]) + f64(params["bias"])
    np.testing.assert_allclose(_jit(norm.apply)({"params": params}, x), expected, atol=1e-5)
    # epsilon is really 0.01 here: the default 1e-6 gives a very different last row.
    wrong_eps = (xd - mu) / np.sqrt(var + 1e-6) * f64(params["scale"]) + f64(params["bias"])
    assert np.abs(wrong_eps[2] - expected[2]).max() > 0.1


def test_rmsnorm_equals_formula():
    x = _norm_input()
    norm = make_norm("rmsnorm", epsilon=0.01)
    params = _params(norm, x, seed=4)
    assert set(params) == {"scale"}  # no bias, no mean-centring
    xd = f64(x)
    expected = xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + 0.01) * f64(params["scale"])
    np.testing.assert_allclose(_jit(norm.apply)({"params": params}, x), expected, atol=1e-5)


def test_unknown_norm_lists_allowed():
    with pytest.raises(ValueError, match="'batchnorm'.*allowed: layernorm, rmsnorm"):
        make_norm("batchnorm")


# ----------------------------------------------------------------------------------------
# Embeddings.
# ----------------------------------------------------------------------------------------
def test_sinusoidal_equals_paper_formula():
    positions = np.array([[0, 1, 7], [33, 64, 100]])
    d = 16
    enc = np.asarray(sinusoidal_position_encoding(jnp.asarray(positions), d))
    assert enc.shape == (2, 3, d) and enc.dtype == np.float32
    expected = np.zeros((2, 3, d))
    for idx in np.ndindex(positions.shape):
        pos = float(positions[idx])
        for i in range(d // 2):
            expected[idx + (2 * i,)] = math.sin(pos / 10000 ** (2 * i / d))
            expected[idx + (2 * i + 1,)] = math.cos(pos / 10000 ** (2 * i / d))
    # float32 angles up to 100 rad carry ~4e-6 rounding error.
    np.testing.assert_allclose(enc, expected, atol=2e-5)
    # Spot values: channel 0/1 at pos 1 are sin(1)/cos(1); channel 14/15 at pos 100 use
    # the slowest frequency 10000^(-14/16).
    assert abs(enc[0, 1, 0] - math.sin(1.0)) < 1e-6 and abs(enc[0, 1, 1] - math.cos(1.0)) < 1e-6
    assert abs(enc[1, 2, 15] - math.cos(100 / 10000 ** (14 / 16))) < 1e-6
    # Through the module (kind="sinusoidal") it is the same table, and has no parameters.
    pe = PositionEmbedding("sinusoidal", max_length=128, features=d)
    variables = pe.init(jax.random.key(0), jnp.asarray(positions))
    assert variables == {}
    np.testing.assert_array_equal(pe.apply(variables, jnp.asarray(positions)), enc)


def test_sinusoidal_odd_features_error():
    with pytest.raises(ValueError, match="even feature size, got 7"):
        sinusoidal_position_encoding(jnp.arange(3), 7)


def test_embed_lookup_and_tied_attend():
    emb = Embed(num_embeddings=7, features=4)
    ids = jnp.array([[0, 3], [6, 6]])
    params = nn.unbox(emb.init(jax.random.key(0), ids)["params"])
    table = np.asarray(params["embedding"])
    assert table.shape == (7, 4)
    np.testing.assert_array_equal(emb.apply({"params": params}, ids), table[np.asarray(ids)])
    x = np.random.default_rng(5).normal(size=(2, 3, 4)).astype(np.float32)
    logits = emb.apply({"params": params}, x, method=Embed.attend)
    assert logits.shape == (2, 3, 7)
    np.testing.assert_allclose(logits, f64(x) @ f64(table).T, atol=1e-6)


def test_embed_rejects_float_ids():
    emb = Embed(num_embeddings=7, features=4)
    params = emb.init(jax.random.key(0), jnp.array([1]))
    with pytest.raises(ValueError, match="token ids must be integers, got float32"):
        emb.apply(params, jnp.array([1.0, 2.0]))


def test_learned_position_embedding_is_table_rows():
    pe = PositionEmbedding("learned", max_length=10, features=4)
    positions = jnp.array([[0, 9, 3], [5, 5, 1]])
    params = nn.unbox(pe.init(jax.random.key(0), positions)["params"])
    table = np.asarray(params["embedding"])
    assert table.shape == (10, 4)
    np.testing.assert_array_equal(pe.apply({"params": params}, positions),
                                  table[np.asarray(positions)])


def test_unknown_position_kind_error():
    pe = PositionEmbedding("rotary", max_length=10, features=4)
    with pytest.raises(ValueError, match="'rotary'.*allowed here: learned, sinusoidal"):
        pe.init(jax.random.key(0), jnp.array([[0, 1]]))


# ----------------------------------------------------------------------------------------
# Initializers: empirical variance of a large kernel.
# ----------------------------------------------------------------------------------------
FAN_IN, FAN_OUT = 400, 600  # unequal, so xavier (0.002), he (0.005), lecun (0.0025) differ
EXPECTED_VAR = {
    "xavier_uniform": 2 / (FAN_IN + FAN_OUT), "xavier_normal": 2 / (FAN_IN + FAN_OUT),
    "he_uniform": 2 / FAN_IN, "he_normal": 2 / FAN_IN, "lecun_normal": 1 / FAN_IN,
    "normal": 0.02 ** 2,
    # N(0, s^2) truncated at +-2s has variance s^2 (1 - 2 a phi(a) / (2 Phi(a) - 1)), a = 2.
    "truncated_normal": 0.02 ** 2 * (1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi)
                                     / math.erf(2 / math.sqrt(2))),
}


def _check_variance(w, name):
    w = f64(w)
    # 240k samples: the relative standard error of the variance is <= 0.3%; 3% tolerance.
    np.testing.assert_allclose(w.var(), EXPECTED_VAR[name], rtol=0.03)
    assert abs(w.mean()) < 0.05 * math.sqrt(EXPECTED_VAR[name])  # centred on 0 (not 1)


@pytest.mark.parametrize("name", sorted(EXPECTED_VAR))
def test_initializer_variance_dense(name):
    w = _jit(initializers.get(name), static_argnums=(1, 2))(jax.random.key(0),
                                                            (FAN_IN, FAN_OUT), jnp.float32)
    assert w.shape == (FAN_IN, FAN_OUT) and w.dtype == jnp.float32
    _check_variance(w, name)
    if name == "truncated_normal":
        assert np.abs(np.asarray(w)).max() <= 2 * 0.02 + 1e-7
    if name.endswith("uniform"):  # U(-b, b) with b = sqrt(3 var)
        assert np.abs(np.asarray(w)).max() <= math.sqrt(3 * EXPECTED_VAR[name]) + 1e-7


@pytest.mark.parametrize("name", ["xavier_uniform", "he_normal", "lecun_normal"])
def test_initializer_variance_multihead_kernels(name):
    """DenseGeneral kernels [in, heads, head_dim] and [heads, head_dim, out] get the fans
    of the flattened [in, heads*head_dim] / [heads*head_dim, out] matrix. (jax's
    variance_scaling on the raw 3-d shape would use fan_in = heads*in = 2400 instead.)"""
    init = initializers.get(name)
    qkv = nn.DenseGeneral((6, 100), kernel_init=init)            # [400, 6, 100]: 400 -> 600
    k = _jit(qkv.init)(jax.random.key(1), jnp.ones((1, FAN_IN)))["params"]["kernel"]
    assert k.shape == (FAN_IN, 6, 100)
    _check_variance(k, name)
    out = nn.DenseGeneral(FAN_OUT, axis=(-2, -1), kernel_init=init)  # [4, 100, 600]: 400->600
    k = _jit(out.init)(jax.random.key(2), jnp.ones((1, 4, 100)))["params"]["kernel"]
    assert k.shape == (4, 100, FAN_OUT)
    _check_variance(k, name)


def test_initializer_aliases_and_unknown_name():
    # An alias traces to exactly the same program as its target (and a different scheme
    # does not): comparing jaxprs checks this without compiling anything.
    def program(name):
        init = functools.partial(initializers.get(name), shape=(FAN_IN, FAN_OUT))
        return str(jax.make_jaxpr(init)(jax.random.key(0)))
    for alias, name in [("glorot_uniform", "xavier_uniform"), ("glorot_normal", "xavier_normal"),
                        ("kaiming_uniform", "he_uniform"), ("kaiming_normal", "he_normal")]:
        assert program(alias) == program(name)
    assert program("xavier_uniform") != program("he_uniform")
    w = _jit(initializers.get("normal", stddev=0.5), static_argnums=(1,))(
        jax.random.key(0), (FAN_IN, FAN_OUT))
    np.testing.assert_allclose(np.var(f64(w)), 0.25, rtol=0.03)  # stddev is passed through
    with pytest.raises(ValueError, match="'orthogonal'") as e:
        initializers.get("orthogonal")
    for name in initializers.NAMES:
        assert name in str(e.value)
    assert {"glorot_uniform", "kaiming_normal", "xavier_normal", "he_uniform"} <= set(
        initializers.NAMES)


# ----------------------------------------------------------------------------------------
# Compute dtype vs parameter dtype, and the dot_general hook.
# ----------------------------------------------------------------------------------------
class _CountingDot:
    def __init__(self):
        self.calls = []

    def __call__(self, lhs, rhs, dims, *args, **kwargs):
        self.calls.append((lhs.shape, rhs.shape, lhs.dtype, rhs.dtype))
        return lax.dot_general(lhs, rhs, dims, *args, **kwargs)


def test_mha_bf16_compute_float32_params_and_hook():
    hook = _CountingDot()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mha = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                             dot_general=hook)
    shapes = jax.eval_shape(mha.init, jax.random.key(1), x)["params"]
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    params = _randomize(shapes, seed=6, scale=0.3)
    # jit: the hook runs while tracing, once per matmul; compiling beats eager op-by-op.
    hook.calls.clear()
    out = jax.jit(mha.apply)({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 8)
    # q, k, v projections, scores, weights @ V, output projection -- all in bfloat16.
    assert [(c[0], c[1]) for c in hook.calls] == [
        ((2, 3, 8), (8, 2, 4)), ((2, 3, 8), (8, 2, 4)), ((2, 3, 8), (8, 2, 4)),
        ((2, 3, 2, 4), (2, 3, 2, 4)), ((2, 2, 3, 3), (2, 3, 2, 4)), ((2, 3, 2, 4), (2, 4, 8))]
    assert all(c[2] == c[3] == jnp.bfloat16 for c in hook.calls)
    # The bf16 result is the float32 one up to bf16 rounding (not something else).
    ref = jax.jit(MultiHeadAttention(num_heads=2).apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05, rtol=0.05)
    # fused_qkv: one projection instead of three.
    hook.calls.clear()
    fused = mha.clone(fused_qkv=True)
    jax.eval_shape(fused.init, jax.random.key(1), x)
    assert len(hook.calls) == 4


def test_mlp_bf16_compute_float32_params_and_hook():
    hook = _CountingDot()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mlp = MlpBlock(hidden_dim=16, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                   dot_general=hook)
    shapes = jax.eval_shape(mlp.init, jax.random.key(1), x)["params"]
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    params = _randomize(shapes, seed=7, scale=0.3)
    hook.calls.clear()
    out = jax.jit(mlp.apply)({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 8)
    assert [(c[0], c[1]) for c in hook.calls] == [((2, 3, 8), (8, 16)), ((2, 3, 16), (16, 8))]
    assert all(c[2] == c[3] == jnp.bfloat16 for c in hook.calls)
