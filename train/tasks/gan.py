"""GAN training (Goodfellow et al. 2014; DCGAN, Radford et al. 2016) and its diagnostics.

One trainer step (Goodfellow et al., Algorithm 1) on a batch of k * m real images:
  k discriminator updates, update i on real images [i m, (i + 1) m) and m fakes G(z_i),
      ascending log D(x) + log(1 - D(G(z))), i.e. descending the binary cross-entropy
      BCE(D(x), 1 - eps) + BCE(D(G(z)), 0)   (eps: one-sided label smoothing)
  then one generator update on m fresh z:
      "non_saturating": -log D(G(z))        (the paper's practical choice, section 3)
      "minimax":        log(1 - D(G(z)))    (the game's value; its gradient vanishes while
                                             D rejects the fakes confidently)
The noise of step s comes from fold_in(fold_in(train_key, s), phase), so a resumed run
recomputes the same updates. Each parameter group has its own optimizer (DCGAN: Adam
2e-4, b1 0.5) and its own optimizer state; a phase leaves the other group's params and
optimizer state untouched (batch-norm running statistics are updated by every train-mode
pass, as in DCGAN's reference code).

A popular explanation says the discriminator is "typically" updated ~5 times per
generator update; that is WGAN's critic schedule (Arjovsky et al. 2017). Goodfellow et al.
used k = 1 in their experiments and DCGAN k = 1, so task.d_steps defaults to 1. Training
is also often described as running "until Nash equilibrium": in practice it runs a fixed
number of steps; at the equilibrium D(x) = 1/2 everywhere and the discriminator's loss is
2 log 2 = 1.386.

Metrics: d_loss (unsmoothed BCE; "loss" = d_loss in training, the progress line's number),
g_loss, d_real_accuracy (D(x) > 1/2), d_fake_accuracy (D(G(z)) < 1/2), fake_diversity and
real_diversity (mean pairwise RMS pixel distance within a batch; a collapsing generator's
falls toward 0) and their diversity_ratio. With batch norm in D, evaluation normalizes with
running averages gathered over all-real and all-fake batches, so evaluation accuracies can
differ from the training ones (which use batch statistics, as the updates do).

Sample quality (evaluation metrics; the `scorer` evaluator repeats the test pass with
other noise, `gan_samples` writes the fixed-noise sample grids): a classifier of the same data -- resnet_tiny (models/cnn.py)
with the 7x7/2 + max-pool stem, trained for task.scorer_steps Adam steps on batches of 64
train-split images when the task is built (deterministic, ~30 s on 2 CPU cores for 500
steps, ~90% test accuracy; kept in memory for the process, never written: a resume in a
new process trains the identical classifier; chosen over restoring a configs/resnet.py
run so that one command is the whole experiment) -- scores real and generated images with
    score = exp(H(p(y)) - E_x H(p(y|x))) = exp(E_x KL(p(y|x) || p(y)))   (Inception Score
form), exact over a split from (sum, weight) metrics: per-class probability sums
({real,fake}_marginal_XX: the class coverage, which shows mode collapse class by class) and
per-sample entropy sums. Also {real,fake}_classes = exp(H(p(y))), the effective number of
classes the scorer sees, and {real,fake}_confidence, the mean max p(y|x). The score lies in
[1, K]: 1 when every sample gets the same prediction, K when each prediction is confident
and the K classes are covered equally; real_score on the real images is the reference.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta as flax_meta

from models import cnn
from train import optim
from train.state import TrainState
from train.tasks import common
from train.tasks.base import CrossEntropyTask

LOSSES = ("non_saturating", "minimax")
SCORER_BATCH_SIZE = 64  # the scorer's training batch, whatever data.batch_size is
_SAMPLE_KEY = 0x6A4  # fold_in constant of the fixed sample-grid noise
_SCORER_KEY = 0x5C0  # fold_in constant of the scorer's init
_SCORERS: dict = {}  # (data config, classes, steps, lr, seed) -> (scorer, variables)
# (The sample-grid and score noise constants live with their evaluators in
# train/evaluators/generative.py; the grid's noise is this module's fixed_noise.)


# ----------------------------------------------------------------------------------------
# Losses (pure functions of discriminator logits; D(x) = sigmoid(logit)).
# ----------------------------------------------------------------------------------------
def _mean(x, weights):
    if weights is None:
        return jnp.mean(x)
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def discriminator_loss(real_logits, fake_logits, real_label: float = 1.0, weights=None):
    """BCE(D(x), real_label) + BCE(D(G(z)), 0), each averaged over its batch: scalar.

    real_logits, fake_logits [B]; real_label = 1 - eps is one-sided label smoothing
    (Salimans et al. 2016: only the real targets are smoothed, so the optimal D does not
    reward fakes); weights [B] or None.
    """
    real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.full_like(real_logits,
                                                                         real_label))
    fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    return _mean(real, weights) + _mean(fake, weights)


def generator_loss(fake_logits, kind: str = "non_saturating", weights=None):
    """-log D(G(z)) ("non_saturating") or log(1 - D(G(z))) ("minimax"), mean: scalar."""
    if kind == "non_saturating":
        per = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits))
    elif kind == "minimax":
        per = -optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    else:
        raise ValueError(f"task.loss={kind!r}; allowed: {', '.join(LOSSES)}")
    return _mean(per, weights)


def pairwise_distance_sums(images, weights):
    """(sum over pairs i < j of w_i w_j d_ij, sum of w_i w_j): d_ij = RMS pixel difference.

    images [B, ...]; weights [B]. From the Gram matrix (no [B, B, D] difference tensor).
    """
    x = images.reshape(images.shape[0], -1).astype(jnp.float32)
    sq = jnp.sum(x * x, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0) / x.shape[1]
    pair_w = jnp.triu(weights[:, None] * weights[None, :], k=1)
    dist = jnp.sqrt(jnp.where(pair_w > 0, d2, 1.0))  # where: no sqrt(0) on unused pairs
    return jnp.sum(pair_w * dist), jnp.sum(pair_w)


def discriminator_metrics(real_logits, fake_logits, w) -> common.Metrics:
    """(sum, weight): d_loss (unsmoothed BCE), d_real_accuracy, d_fake_accuracy."""
    n = jnp.sum(w)
    d_loss = discriminator_loss(real_logits, fake_logits, 1.0, w) * n
    return {"d_loss": (d_loss, n), "d_real_accuracy": (jnp.sum((real_logits > 0) * w), n),
            "d_fake_accuracy": (jnp.sum((fake_logits < 0) * w), n)}


def gan_metrics(real_logits, fake_logits, kind, w, real, fakes) -> common.Metrics:
    """(sum, weight) metrics of one batch: discriminator_metrics, g_loss, diversity."""
    return {**discriminator_metrics(real_logits, fake_logits, w),
            "g_loss": (generator_loss(fake_logits, kind, w) * jnp.sum(w), jnp.sum(w)),
            "fake_diversity": pairwise_distance_sums(fakes, w),
            "real_diversity": pairwise_distance_sums(real, w)}


# ----------------------------------------------------------------------------------------
# The classifier-based sample-quality score.
# ----------------------------------------------------------------------------------------
def class_probability_sums(probs, weights, prefix: str) -> common.Metrics:
    """probs [B, K] (rows sum to 1), weights [B] -> (sum, weight) metrics:
    {prefix}_marginal_{k:02d} (p(y = k)), {prefix}_entropy (H(p(y|x)), nats),
    {prefix}_confidence (max_k p(y = k | x))."""
    p = probs.astype(jnp.float32)
    n = jnp.sum(weights)
    entropy = jnp.sum(jax.scipy.special.entr(p), -1)   # -p log p, 0 at p = 0
    out = {f"{prefix}_marginal_{k:02d}": (jnp.sum(p[:, k] * weights), n)
           for k in range(p.shape[1])}
    out[f"{prefix}_entropy"] = (jnp.sum(entropy * weights), n)
    out[f"{prefix}_confidence"] = (jnp.sum(jnp.max(p, -1) * weights), n)
    return out


def inception_like_score(marginal, mean_entropy: float) -> tuple[float, float]:
    """(exp(H(marginal) - mean_entropy), exp(H(marginal))) in float64 (host side).

    marginal [K]: mean p(y|x) over the split; mean_entropy: mean H(p(y|x)) in nats.
    """
    m = np.asarray(marginal, np.float64)
    m = m / m.sum()
    h = -np.sum(np.where(m > 0, m * np.log(np.where(m > 0, m, 1.0)), 0.0))
    return float(np.exp(h - mean_entropy)), float(np.exp(h))


def train_scorer(train_ds, num_classes: int, steps: int, learning_rate: float, seed: int):
    """(resnet_tiny with the 7x7/2 + max-pool stem, its variables) after `steps` Adam steps
    (cosine LR) of cross-entropy on train_ds.batch(0..steps-1)["image" / "label"]."""
    model = cnn.ResNet(cnn.make_resnet_config("resnet_tiny", num_classes=num_classes,
                                              stem="imagenet"))
    first = train_ds.batch(0)
    variables = flax_meta.unbox(jax.jit(model.init)(  # jit: one compile, not one per op
        jax.random.fold_in(jax.random.key(seed), _SCORER_KEY), first["image"][:1]))
    cfg = optim.default_config()
    cfg.name, cfg.learning_rate, cfg.schedule.name = "adam", learning_rate, "cosine"
    tx = optim.make_optimizer(cfg, steps)

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_of(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.mean(loss), upd["batch_stats"]
        (_, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for s in range(steps):
        batch = first if s == 0 else train_ds.batch(s)
        params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                              batch["image"], batch["label"])
    return model, {"params": params, "batch_stats": batch_stats}


# ----------------------------------------------------------------------------------------
# The task.
# ----------------------------------------------------------------------------------------
class GANOptimizer(NamedTuple):
    """One optax optimizer per parameter group; init(params) -> the trainer's opt_state."""
    generator: optax.GradientTransformation
    discriminator: optax.GradientTransformation

    def init(self, params):
        return {"generator": self.generator.init(params["generator"]),
                "discriminator": self.discriminator.init(params["discriminator"])}


class GANTask(CrossEntropyTask):
    """Needs a model with methods generate(z, train) -> images [B, H, W, C] in [0, 1] and
    discriminate(images, train) -> logits [B], params {"generator", "discriminator"}
    (models/gan.py), and batches {"image": [B, H, W, C] in [0, 1], "label"} (the labels
    only train the scorer)."""

    name = "gan"
    default_evals = ("gan_samples", "scorer")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()  # label_smoothing: one-sided here: real targets 1 - eps
        c.loss = "non_saturating"  # generator: "non_saturating" -log D(G(z)) | "minimax"
        c.d_steps = 1              # k discriminator updates per generator update, each on
        #                            data.batch_size / k real images (Goodfellow et al. k=1)
        c.g_learning_rate = 2e-4   # per-group Adam LR and b1 (DCGAN: 2e-4, 0.5); they
        c.d_learning_rate = 2e-4   # replace optim.learning_rate / optim.b1, the rest of
        c.g_b1 = 0.5               # `optim` (name, b2, schedule, clipping ...) applies to
        c.d_b1 = 0.5               # both groups
        c.scorer_steps = 500       # Adam steps of the sample-quality classifier trained on
        #                            the train split at start (0 = no score)
        c.scorer_learning_rate = 1e-2  # its peak Adam LR (cosine decay)
        return c

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        _check_options(config.task, config.data.batch_size)

    def __init__(self, config, model, data):
        super().__init__(config, model, data)
        t = config.task
        self.kind, self.k = t.loss, t.d_steps
        self.real_label = 1.0 - t.label_smoothing
        self.latent_dim = model.cfg.latent_dim
        self.num_classes = data["train"].data_info().get("num_classes", 0)
        self.scorer = None
        if t.scorer_steps:
            if not self.num_classes:
                raise ValueError("task.scorer_steps > 0 needs a labelled image dataset "
                                 "(num_classes); set task.scorer_steps=0 for no score")
            # Batches of its own size, so every data.batch_size (and d_steps) gets the same
            # scorer and scores compare across configs of the same data and seed.
            scorer_data = data.split("train", batch_size=SCORER_BATCH_SIZE)
            # Deterministic, so a run resumed (or swept) in the same process reuses it.
            key = (config.data.to_json_best_effort(sort_keys=True), self.num_classes,
                   t.scorer_steps, t.scorer_learning_rate, config.seed)
            if key not in _SCORERS:
                _SCORERS.clear()  # keep one: it is small, but there is no need for more
                _SCORERS[key] = train_scorer(scorer_data, self.num_classes, t.scorer_steps,
                                             t.scorer_learning_rate, config.seed)
            self.scorer = _SCORERS[key]
        self._generate = jax.jit(lambda p, s, z: self._apply(p, s, z, "generate", False)[0])

    def fixed_noise(self, n: int) -> jax.Array:
        """[n, latent_dim]: the same z for every sample grid of a seed."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), _SAMPLE_KEY)
        return jax.random.normal(key, (n, self.latent_dim))

    def generate(self, params, model_state, z) -> jax.Array:
        """Images [n, H, W, C] in [0, 1] from noise z [n, latent_dim] (evaluation mode)."""
        return self._generate(params, model_state, z)

    # ---- model application ---------------------------------------------------------------
    def _apply(self, params, model_state, x, method: str, train: bool):
        """model.apply(method) -> (output, model_state); batch stats update in training."""
        variables = {"params": params, **model_state}
        if train and model_state:
            out, upd = self.model.apply(variables, x, train=True, method=method,
                                        mutable=list(model_state))
            return out, {**model_state, **upd}
        return self.model.apply(variables, x, train=train, method=method), model_state

    def _noise(self, rng, n: int):
        return jax.random.normal(rng, (n, self.latent_dim))

    def init_args(self, batch):
        return (self._noise(jax.random.key(0), 1), batch["image"]), {}

    # ---- evaluation --------------------------------------------------------------------------
    def loss_fn(self, params, model_state, batch, rng, train: bool):
        """Losses, accuracies, diversity and (evaluation) scorer metrics on the real batch
        vs as many generated images; loss = the (smoothed) discriminator objective."""
        real = batch["image"]
        w = common.example_weights(batch, real.shape[0])
        fakes, model_state = self._apply(params, model_state, self._noise(rng, real.shape[0]),
                                         "generate", train)
        real_logits, model_state = self._apply(params, model_state, real, "discriminate",
                                               train)
        fake_logits, model_state = self._apply(params, model_state, fakes, "discriminate",
                                               train)
        metrics = gan_metrics(real_logits, fake_logits, self.kind, w, real, fakes)
        if self.scorer is not None and not train:
            scorer, variables = self.scorer
            for prefix, images in (("real", real), ("fake", fakes)):
                probs = jax.nn.softmax(scorer.apply(variables, images), axis=-1)
                metrics.update(class_probability_sums(probs, w, prefix))
                if prefix == "real" and "label" in batch:  # the scorer's own accuracy
                    hits = jnp.argmax(probs, -1) == batch["label"]
                    metrics["scorer_accuracy"] = (jnp.sum(hits * w), jnp.sum(w))
        loss = discriminator_loss(real_logits, fake_logits, self.real_label, w)
        return loss, (metrics, model_state)

    def derived_metrics(self, means: dict) -> dict:
        out = {}
        if means.get("real_diversity", 0) > 0:
            out["diversity_ratio"] = means["fake_diversity"] / means["real_diversity"]
        for prefix in ("real", "fake"):
            if f"{prefix}_entropy" in means:
                marginal = [means[f"{prefix}_marginal_{k:02d}"]
                            for k in range(self.num_classes)]
                score, classes = inception_like_score(marginal, means[f"{prefix}_entropy"])
                out[f"{prefix}_score"], out[f"{prefix}_classes"] = score, classes
        return out

    # ---- training: two optimizers, k discriminator updates, one generator update -------
    def make_optimizer(self, optim_cfg, num_steps: int) -> GANOptimizer:
        """Each group: train.optim.make_optimizer(optim) with the group's learning rate and
        b1 (task.g_* / task.d_*); paths in optim.freeze etc. are relative to the group."""
        t = self.config.task

        def group(lr, b1):
            cfg = optim_cfg.copy_and_resolve_references()
            cfg.learning_rate, cfg.b1 = lr, b1
            return optim.make_optimizer(cfg, num_steps)
        return GANOptimizer(generator=group(t.g_learning_rate, t.g_b1),
                            discriminator=group(t.d_learning_rate, t.d_b1))

    def _penalty(self, params, o):
        if not (o.l1 or o.l2):
            return 0.0
        return optim.regularization_penalty(params, o.l1, o.l2, o.weight_decay_exclude)

    def discriminator_update(self, tx, o, params, d_opt_state, model_state, real, rng):
        """One update on `real` [m, ...] and m fakes from `rng` -> (d_params, d_opt_state,
        model_state, (objective, grad_norm, metrics)); o: the optim config (l1, l2)."""
        fakes, model_state = self._apply(params, model_state,
                                         self._noise(rng, real.shape[0]), "generate", True)
        fakes = jax.lax.stop_gradient(fakes)

        def loss_of(d_params):
            p = {**params, "discriminator": d_params}
            real_logits, ms = self._apply(p, model_state, real, "discriminate", True)
            fake_logits, ms = self._apply(p, ms, fakes, "discriminate", True)
            loss = discriminator_loss(real_logits, fake_logits, self.real_label)
            return loss + self._penalty(d_params, o), (real_logits, fake_logits, ms)

        (loss, (real_logits, fake_logits, model_state)), grads = jax.value_and_grad(
            loss_of, has_aux=True)(params["discriminator"])
        updates, d_opt = tx.discriminator.update(grads, d_opt_state, params["discriminator"])
        metrics = {k: total / n for k, (total, n) in discriminator_metrics(
            real_logits, fake_logits, jnp.ones(real.shape[:1], jnp.float32)).items()}
        return (optax.apply_updates(params["discriminator"], updates), d_opt, model_state,
                (loss, optax.tree.norm(grads), metrics))

    def generator_update(self, tx, o, params, g_opt_state, model_state, m: int, rng):
        """One update on m fakes from `rng` -> (g_params, g_opt_state, model_state,
        (objective, grad_norm, fakes))."""
        z = self._noise(rng, m)

        def loss_of(g_params):
            p = {**params, "generator": g_params}
            fakes, ms = self._apply(p, model_state, z, "generate", True)
            logits, ms = self._apply(p, ms, fakes, "discriminate", True)
            loss = generator_loss(logits, self.kind)
            return loss + self._penalty(g_params, o), (fakes, ms)

        (loss, (fakes, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            params["generator"])
        updates, g_opt = tx.generator.update(grads, g_opt_state, params["generator"])
        return (optax.apply_updates(params["generator"], updates), g_opt, model_state,
                (loss, optax.tree.norm(grads), fakes))

    def make_train_step(self, tx: GANOptimizer, train_key, optim_cfg):
        """(TrainState, batch) -> (TrainState, scalars): k discriminator updates, one
        generator update; the state advances like every train step's (TrainState.advance:
        the first step whose losses or gradients are not finite is recorded). Scalars:
        d_* are means over the k updates."""
        k, o = self.k, optim_cfg

        def train_step(state: TrainState, batch):
            rng = jax.random.fold_in(train_key, state.step)
            real = batch["image"]
            m = real.shape[0] // k
            reals = real.reshape((k, m) + real.shape[1:])
            params, opt_state = state.params, state.opt_state

            # k discriminator updates, unrolled: k is small, and XLA:CPU runs convolutions
            # inside a lax.scan body ~20x slower than the same ops outside one.
            d_params, d_opt = params["discriminator"], opt_state["discriminator"]
            model_state, outs = state.model_state, []
            for i in range(k):
                d_params, d_opt, model_state, out = self.discriminator_update(
                    tx, o, {**params, "discriminator": d_params}, d_opt, model_state,
                    reals[i], jax.random.fold_in(rng, i))
                outs.append(out)
            d_obj, d_norm, d_metrics = jax.tree.map(lambda *x: jnp.stack(x), *outs)
            params = {**params, "discriminator": d_params}
            g_params, g_opt, model_state, (g_obj, g_norm, fakes) = self.generator_update(
                tx, o, params, opt_state["generator"], model_state, m,
                jax.random.fold_in(rng, k))

            finite = (jnp.all(jnp.isfinite(d_obj)) & jnp.all(jnp.isfinite(d_norm))
                      & jnp.isfinite(g_obj) & jnp.isfinite(g_norm))
            new_state = state.advance(
                finite, params={"generator": g_params, "discriminator": d_params},
                opt_state={"generator": g_opt, "discriminator": d_opt},
                model_state=model_state)
            scalars = {name: jnp.mean(v) for name, v in d_metrics.items()}
            scalars.update(loss=scalars["d_loss"], g_loss=g_obj, d_objective=jnp.mean(d_obj),
                           d_grad_norm=jnp.mean(d_norm), g_grad_norm=g_norm)
            for name, images in (("fake", fakes), ("real", reals[-1])):
                scalars[f"{name}_diversity"] = jnp.divide(*pairwise_distance_sums(
                    images, jnp.ones((m,), jnp.float32)))
            scalars["diversity_ratio"] = scalars["fake_diversity"] / scalars["real_diversity"]
            return new_state, scalars
        return train_step


def _check_options(t, batch_size: int) -> None:
    """ValueError naming the task option and what is allowed."""
    if t.loss not in LOSSES:
        raise ValueError(f"task.loss={t.loss!r}; allowed: {', '.join(LOSSES)}")
    if not isinstance(t.d_steps, int) or t.d_steps < 1 or batch_size % t.d_steps:
        raise ValueError(f"task.d_steps={t.d_steps!r} must be an integer >= 1 dividing "
                         f"data.batch_size={batch_size} (each discriminator update takes "
                         "its own batch_size / d_steps real images)")
    for key in ("g_learning_rate", "d_learning_rate"):
        if not t[key] > 0:
            raise ValueError(f"task.{key}={t[key]} must be > 0")
    for key in ("g_b1", "d_b1"):
        if not 0 <= t[key] < 1:
            raise ValueError(f"task.{key}={t[key]} must be in [0, 1)")
    if t.scorer_steps < 0 or not t.scorer_learning_rate > 0:
        raise ValueError(f"task.scorer_steps={t.scorer_steps} must be >= 0 (0 = no score) and "
                         f"task.scorer_learning_rate={t.scorer_learning_rate} > 0")
