"""VAEs and an autoencoder on the embedded shapes images (32x32x3, all 16 classes).

    python -m train.main --config=configs/vae.py --workdir=runs/vae
    python -m train.main --config=configs/vae.py:gumbel --workdir=runs/vae_gumbel
    python -m train.main --config=configs/vae.py:tiny --workdir=/tmp/vae_tiny

Every variant: 3000 steps of 64 images, AdamW 1e-3 (warmup + cosine), KL warm-up over 500
steps. Test ELBO in nats per image (a Gaussian decoder's density on pixel values in
[0, 1]: positive values are normal), next to the same model at initialization. Measured
on a 2-core CPU shared with other jobs (wall times inflated by that, up to 3x):

  variant  model                                 test ELBO   at init    KL  NLL bound*  time
  default  conv (16/32/64) Gaussian VAE, D=32,     4644.7  -12094.5  96.2    -4678.9  2m09s
           learned per-channel sigma (28 steps/s)
  gumbel   conv, N=32 x K=8 categorical latents,   4413.4   -6067.1  58.2    -4589.5  2m47s
           tau 1 -> 0.5 (exp decay 3e-4/step)
  beta     default with beta=4                     4557.5  -12094.5  63.1    -4632.4  2m17s
  mlp      MLP (512, 256) Gaussian VAE             4253.8  -45056.5  99.1    -4269.7  1m06s
  ae       conv autoencoder (no KL; loss=-recon)   recon 4883.4 (at init -4549.0)     3m01s
  * -iwae/nll_bound: the importance-weighted bound (16 samples), tighter than the ELBO.
  The table's rows are single runs (seed 0). Over 3 seeds the default gives test ELBO
  4641 ± 16 (at init -12171 ± 2902, KL 97.6 ± 1.6): python -m train.sweep
  --config=configs/vae.py --workdir=runs/seeds/vae --sweep="" --seeds=3.

Reconstructions keep count, position, color and size (edges are soft: crosses and
squares come out rounded); prior samples are mostly blobs of the right colors on the
right backgrounds (the usual VAE prior/posterior mismatch); interpolations move objects
smoothly. The gumbel variant's eval ELBO is that of the discrete model (hard codes). With a
learned sigma, beta is partly absorbed by sigma; a fixed sigma shows beta's trade-off
plainly: `:beta --config.model.decoder_scale=fixed` (sigma 0.1) gives KL 39.6, ELBO 3702.5.
conv_features=(32, 64, 128) reaches ELBO 5037.9 but runs ~4x slower (12m45s, heavier load).

Variants:
  default  convolutional Gaussian VAE (models.vae "conv").
  mlp      the same VAE with MLP encoder/decoder.
  beta     beta-VAE, beta=4 (Higgins et al. 2017): fewer nats in z, blurrier output.
  gumbel   discrete VAE with Gumbel-softmax (Jang et al. 2017), temperature annealed.
  ae       plain autoencoder (deterministic code, no KL): the reconstructions to beat;
           its samples.png draws codes from a Gaussian fitted to the test codes.
  tiny     a seconds-long smoke run (tests); ~20 s with compilation.
"""
from train.config import base_config, shrink_for_smoke_test

VARIANTS = ("default", "mlp", "beta", "gumbel", "ae", "tiny")


def get_config(variant: str = "default"):
    model_variant = {"mlp": "mlp", "tiny": "tiny"}.get(variant, "conv")
    c = base_config("vae", model_variant, family="vae")
    c.data.source = "shapes"
    c.data.shapes.exclude_heldout_from_train = False   # a generative model of all 16 classes
    c.data.batch_size = 64
    c.data.eval_batch_size = 200
    c.optim.learning_rate = 1e-3
    c.optim.grad_clip_norm = 100.0
    c.optim.schedule.name = "warmup_cosine"
    c.optim.schedule.warmup_steps = 100
    c.optim.schedule.end_lr_fraction = 0.1
    c.task.kl_warmup_steps = 500
    c.train.num_steps = 3000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.checkpoint.every = 1000
    if variant in ("default", "mlp"):
        pass
    elif variant == "beta":
        c.task.beta = 4.0
    elif variant == "gumbel":
        c.model.latent = "categorical"
        c.task.temperature_decay = 3e-4
    elif variant == "ae":
        c.model.latent = "none"
    elif variant == "tiny":
        shrink_for_smoke_test(c, num_steps=4, batch_size=16, eval_batch_size=64, log_every=2,
                              eval_every=2)
        c.task.kl_warmup_steps = 2
        c.evals.iwae.samples = 2
        c.evals.vae_pictures.images = 4
        c.data.shapes.shapes_split_sizes.validation = 64
        c.data.shapes.shapes_split_sizes.test = 64
    else:
        raise ValueError(f"unknown vae variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return c
