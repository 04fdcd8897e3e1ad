"""VAEs and an autoencoder on the embedded shapes images (32x32x3, all 16 classes).

    python -m train.main --config=configs/vae.py --workdir=runs/vae
    python -m train.main --config=configs/vae.py:gumbel --workdir=runs/vae_gumbel
    python -m train.main --config=configs/vae.py:tiny --workdir=/tmp/vae_tiny

Variants:
  default  convolutional Gaussian VAE: 3 stride-2 conv stages (32/64/128), D=32 latent,
           Gaussian decoder with a learned per-channel scale (sigma-VAE).
  mlp      the same VAE with MLP encoder/decoder (512, 256).
  beta     beta-VAE, beta=4 (Higgins et al. 2017): a smoother, less detailed latent.
  gumbel   discrete VAE: N=32 categorical variables of K=8 (Gumbel-softmax, Jang et al.
           2017), temperature annealed 1 -> 0.5.
  ae       plain autoencoder (deterministic code, no KL): the reconstructions to beat.
  tiny     a seconds-long smoke run (tests).
"""
from train.config import base_config, shrink_for_smoke_test

VARIANTS = ("default", "mlp", "beta", "gumbel", "ae", "tiny")


def get_config(variant: str = "default"):
    model_variant = {"mlp": "mlp", "tiny": "tiny"}.get(variant, "conv")
    c = base_config("vae", model_variant, family="vae")
    c.data.source = "shapes"
    c.data.exclude_heldout_from_train = False   # a generative model of all 16 classes
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
        c.task.iwae_samples = 2
        c.task.report_images = 4
        c.data.shapes_split_sizes.validation = 64
        c.data.shapes_split_sizes.test = 64
    else:
        raise ValueError(f"unknown vae variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return c
