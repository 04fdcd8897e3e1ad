"""VAE math against float64 NumPy and closed forms; the VAE family's shapes, hooks, errors."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from models import vae
from models.layers import distributions as dist


def _log_normal(z, mean, var):
    return -0.5 * np.sum(np.log(2 * np.pi * var) + (z - mean) ** 2 / var, axis=-1)


def test_gaussian_kl_equals_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 4)), rng.normal(scale=0.5, size=(3, 4))
    var = np.exp(logvar)
    closed = 0.5 * np.sum(var + mean ** 2 - 1 - logvar, axis=-1)
    with jax.enable_x64(True):
        kl = np.asarray(dist.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)))
    np.testing.assert_allclose(kl, closed, rtol=1e-12)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], 200k samples, within 4 standard errors.
    z = mean + np.sqrt(var) * rng.normal(size=(200_000, 3, 4))
    terms = _log_normal(z, mean, var) - _log_normal(z, 0.0, 1.0)
    err = terms.std(0) / math.sqrt(len(terms))
    assert np.all(np.abs(terms.mean(0) - kl) < 4 * err), (terms.mean(0), kl, err)


def test_categorical_kl_equals_numpy_and_monte_carlo():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(2, 3, 5))                   # B=2, N=3, K=5
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    exact = np.sum(q * np.log(5 * q), axis=(1, 2))
    with jax.enable_x64(True):
        kl = np.asarray(dist.categorical_kl(jnp.asarray(logits)))
        first = np.eye(5)[np.zeros((2, 3), int)]                      # category 0 each
        log_q = np.asarray(dist.categorical_log_prob(first, jnp.asarray(logits)))
    np.testing.assert_allclose(kl, exact, rtol=1e-12)
    np.testing.assert_allclose(log_q, np.log(q[..., 0]).sum(-1), rtol=1e-12)
    codes = np.stack([[rng.choice(5, size=100_000, p=q[b, n]) for n in range(3)]
                      for b in range(2)])                             # [B, N, S]
    terms = np.log(5 * np.take_along_axis(q, codes, -1)).sum(1)       # [B, S]
    err = terms.std(-1) / math.sqrt(terms.shape[-1])
    assert np.all(np.abs(terms.mean(-1) - kl) < 4 * err)


def test_likelihoods_equal_numpy():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 4, 4, 3))
    logits, mean = rng.normal(size=x.shape), rng.normal(size=x.shape)
    log_scale = rng.normal(scale=0.3, size=(3,))
    p = 1 / (1 + np.exp(-logits))
    bern = np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=(1, 2, 3))
    sigma = np.exp(log_scale)
    gauss = np.sum(-0.5 * np.log(2 * np.pi * sigma ** 2) - (x - mean) ** 2 / (2 * sigma ** 2),
                   axis=(1, 2, 3))
    with jax.enable_x64(True):
        np.testing.assert_allclose(dist.bernoulli_log_likelihood(logits, x), bern, rtol=1e-10)
        np.testing.assert_allclose(dist.gaussian_log_likelihood(mean, log_scale, x), gauss,
                                   rtol=1e-10)


def test_reparameterized_sample_has_requested_mean_and_variance():
    mean = jnp.array([-2.0, 0.0, 3.0])
    logvar = jnp.log(jnp.array([0.25, 1.0, 4.0]))
    keys = jax.random.split(jax.random.key(0), 50_000)
    z = np.asarray(jax.vmap(lambda k: dist.reparameterize(k, mean, logvar))(keys),
                   np.float64)
    var = np.array([0.25, 1.0, 4.0])
    # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance.
    assert np.all(np.abs(z.mean(0) - mean) < 4 * np.sqrt(var / len(z)))
    assert np.all(np.abs(z.var(0) - var) < 4 * var * np.sqrt(2 / len(z)))


def test_gradients_flow_through_the_samplers():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        w, b, x = rng.normal(size=(3, 6)), rng.normal(size=6), rng.normal(size=(2, 6))
        key = jax.random.key(1)

        @jax.jit
        def elbo(mean, logvar):   # fixed noise: a smooth function of the posterior params
            z = dist.reparameterize(key, mean, logvar)
            ll = dist.gaussian_log_likelihood(z @ w + b, jnp.zeros(()), x)
            return jnp.sum(dist.elbo(ll, dist.gaussian_kl(mean, logvar)))

        mean, logvar = rng.normal(size=(2, 3)), rng.normal(scale=0.3, size=(2, 3))
        check_grads(elbo, (mean, logvar), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        g_mean, g_logvar = jax.grad(elbo, argnums=(0, 1))(mean, logvar)
        assert np.all(np.abs(g_logvar) > 0) and np.all(np.abs(g_mean) > 0)

        logits, c = rng.normal(size=(2, 4, 5)), rng.normal(size=5)
        check_grads(jax.jit(lambda l: jnp.sum(dist.gumbel_softmax(key, l, 0.7) * c)),
                    (logits,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        for hard in (False, True):
            g = jax.grad(lambda l: jnp.sum(dist.gumbel_softmax(key, l, 0.7, hard) * c))(logits)
            assert np.all(np.abs(np.asarray(g)).sum(-1) > 1e-6), hard


def test_elbo_and_iwae_below_exact_log_likelihood_of_a_linear_gaussian_model():
    """p(z) = N(0, I2), p(x|z) = N(W z + b, s^2 I5): p(x) = N(b, W W^T + s^2 I) exactly.
    W has orthogonal columns, so the true posterior is a diagonal Gaussian: with it the
    importance weight is constant and ELBO = IWAE = log p(x) exactly; any other q is
    strictly below, and IWAE(S=16) sits between ELBO and log p(x)."""
    rng = np.random.default_rng(4)
    w = np.linalg.qr(rng.normal(size=(5, 2)))[0] * np.array([2.0, 0.7])   # [5, 2]
    b, s, x = rng.normal(size=5), 0.5, rng.normal(size=(1, 5))
    cov = w @ w.T + s ** 2 * np.eye(5)
    d = x[0] - b
    log_px = -0.5 * (5 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
                     + d @ np.linalg.solve(cov, d))
    post_var = 1.0 / (1.0 + np.sum(w ** 2, 0) / s ** 2)             # diagonal: W^T W is
    post_mean = post_var * (w.T @ d) / s ** 2

    with jax.enable_x64(True):
        @functools.partial(jax.jit, static_argnums=3)
        def log_weights(mean, logvar, key, n):
            z = dist.reparameterize(key, jnp.broadcast_to(mean, (n, 2)),
                                    jnp.broadcast_to(logvar, (n, 2)))
            ll = dist.gaussian_log_likelihood(z @ w.T + b, jnp.log(s), np.repeat(x, n, 0))
            return ll, (ll + dist.gaussian_log_prob(z, 0 * z, 0 * z)
                        - dist.gaussian_log_prob(z, jnp.broadcast_to(mean, z.shape),
                                                 jnp.broadcast_to(logvar, z.shape)))

        key = jax.random.key(2)
        exact = (post_mean[None], np.log(post_var)[None])
        ll, lw = log_weights(*exact, key, 1000)
        np.testing.assert_allclose(np.asarray(lw), log_px, rtol=1e-10)   # every sample
        np.testing.assert_allclose(float(dist.iwae_bound(lw[:, None])[0]), log_px, rtol=1e-10)
        # E_q[log p(x|z)] - KL (closed form) is the same ELBO, up to Monte-Carlo error.
        elbo = np.asarray(dist.elbo(ll, dist.gaussian_kl(*exact)))
        assert abs(elbo.mean() - log_px) < 4 * elbo.std() / math.sqrt(len(elbo))

        off = (post_mean[None] + 0.8, np.log(post_var)[None] + 1.0)  # a worse posterior
        ll, lw = log_weights(*off, key, 16 * 4000)
        elbo = float(jnp.mean(ll) - dist.gaussian_kl(*off)[0])
        iwae = float(jnp.mean(dist.iwae_bound(lw.reshape(16, 4000))))
    assert elbo < iwae - 0.1 and iwae < log_px - 0.01, (elbo, iwae, log_px)


def test_categorical_elbo_below_exact_log_likelihood():
    """One categorical z with K=3 states, Bernoulli p(x|z) over 4 binary pixels:
    log p(x) = logsumexp_z(log 1/3 + log p(x|z)); the exact ELBO (expectation over the 3
    states) is below it for any q and equal at q = p(z|x)."""
    rng = np.random.default_rng(5)
    table = rng.normal(scale=2.0, size=(3, 4))                     # decoder logits per z
    x = np.array([[1.0, 0.0, 1.0, 1.0]])
    with jax.enable_x64(True):
        ll = np.asarray(dist.bernoulli_log_likelihood(table, np.repeat(x, 3, 0)))  # [3]
        log_px = np.logaddexp.reduce(np.log(1 / 3) + ll)

        def exact_elbo(logits):                                     # logits [1, 1, 3]
            q = jax.nn.softmax(logits[0, 0])
            return float(jnp.sum(q * ll) - dist.categorical_kl(logits)[0])

        for logits in rng.normal(size=(5, 1, 1, 3)):
            assert exact_elbo(jnp.asarray(logits)) < log_px - 1e-6
        posterior_logits = (ll - log_px)[None, None]
        np.testing.assert_allclose(exact_elbo(jnp.asarray(posterior_logits)), log_px,
                                   rtol=1e-12)


def test_gumbel_softmax_tends_to_one_hot_with_softmax_frequencies():
    logits = jnp.array([0.5, -1.0, 2.0, 0.0])
    probs = np.asarray(jax.nn.softmax(logits))
    keys = jax.random.split(jax.random.key(3), 40_000)
    sample = jax.vmap(lambda k, t: dist.gumbel_softmax(k, logits, t), (0, None))
    cold, warm = np.asarray(sample(keys, 0.05)), np.asarray(sample(keys, 5.0))
    assert cold.max(-1).mean() > 0.98 and warm.max(-1).mean() < 0.5
    np.testing.assert_allclose(cold.sum(-1), 1.0, rtol=1e-5)
    # Argmax frequencies are the softmax probabilities (Gumbel-max), at any temperature.
    freq = np.bincount(cold.argmax(-1), minlength=4) / len(keys)
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / len(keys)))
    np.testing.assert_array_equal(cold.argmax(-1), warm.argmax(-1))
    hard = np.asarray(jax.vmap(lambda k: dist.gumbel_softmax(k, logits, 5.0, True))(keys))
    np.testing.assert_array_equal(hard, np.eye(4)[warm.argmax(-1)])


@pytest.mark.parametrize("architecture,latent,likelihood", [
    ("conv", "gaussian", "gaussian"), ("mlp", "categorical", "bernoulli"),
    ("conv", "none", "bernoulli")])
def test_output_shapes_and_methods(architecture, latent, likelihood):
    cfg = vae.make_config("tiny", architecture=architecture, latent=latent,
                          likelihood=likelihood, image_size=16, num_latents=3,
                          num_categories=4)
    model, x = vae.VAE(cfg), jnp.linspace(0, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
    apply = jax.jit(model.apply, static_argnames="method")
    # NumPy-drawn weights of the right shapes: compiling the random initializers of every
    # layer would cost more than the rest of the test.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.normal(scale=0.1, size=a.shape).astype(a.dtype),
                             jax.eval_shape(model.init, jax.random.key(0), x))
    out = apply(variables, x, jax.random.key(1), temperature=0.5)
    z_shape = {"gaussian": (2, 8), "categorical": (2, 3, 4), "none": (2, 8)}[latent]
    assert out["recon"].shape == (2, 16, 16, 3) and out["z"].shape == z_shape
    assert ("log_scale" in out) == (likelihood == "gaussian")
    post = apply(variables, x, method="encode")
    decoded = apply(variables, out["z"], method="decode")
    np.testing.assert_allclose(decoded, out["recon"], rtol=1e-5, atol=1e-6)
    assert vae.log_likelihood(cfg, out, x).shape == (2,)
    assert vae.kl_divergence(cfg, out).shape == (2,)
    if latent == "none":
        assert set(post) == {"code"} and not np.any(vae.kl_divergence(cfg, out))
        with pytest.raises(ValueError, match="no prior"):
            model.apply(variables, jax.random.key(2), 3, method="sample")
    else:
        samples = jax.jit(lambda v, k: model.apply(v, k, 3, method="sample"))(
            variables, jax.random.key(2))
        assert samples.shape == (3, 16, 16, 3)
        assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0
    if latent == "categorical":  # no rng: the posterior mode, one-hot
        mode = apply(variables, x)["z"]
        np.testing.assert_array_equal(mode.sum(-1), 1.0)


def test_every_dense_and_conv_goes_through_the_hooks():
    calls = {"dot": 0, "conv": 0}

    def dot(*args, **kwargs):
        calls["dot"] += 1
        return jax.lax.dot_general(*args, **kwargs)

    def conv(*args, **kwargs):
        calls["conv"] += 1
        return jax.lax.conv_general_dilated(*args, **kwargs)

    cfg = vae.make_config("tiny", image_size=8, dot_general=dot, conv_general_dilated=conv)
    model, x = vae.VAE(cfg), jnp.zeros((1, 8, 8, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    calls.update(dot=0, conv=0)
    jax.eval_shape(model.apply, variables, x)
    # encoder: 2 convs + head; decoder: project + 2 upsampling convs + output conv.
    assert calls == {"dot": 2, "conv": 5}


@pytest.mark.parametrize("overrides,message", [
    (dict(latent="vq"), "model.latent='vq' is not allowed; allowed: gaussian"),
    (dict(likelihood="poisson"), "model.likelihood"),
    (dict(image_size=30), "divisible by 2\\^2"),
    (dict(latent="categorical", num_categories=1), "num_categories must be >= 2"),
    (dict(decoder_std=0.0), "decoder_std must be positive"),
    (dict(conv_features=()), "conv_features"),
    (dict(latent_dim=0), "latent_dim must be positive"),
    (dict(activation="tanhh"), "allowed: relu"),
    (dict(latentdim=4), "unknown vae config keys \\['latentdim'\\]"),
])
def test_bad_config_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        vae.make_config("tiny", **overrides)


def test_unknown_variant_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown vae variant 'huge'; allowed: conv, mlp"):
        vae.make_config("huge")
