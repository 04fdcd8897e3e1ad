"""DCGAN on the embedded shapes images (32x32x3, all 16 color x shape classes).

    python -m train.main --config=configs/gan.py --workdir=runs/gan
    python -m train.main --config=configs/gan.py:k2 --workdir=runs/gan_k2

Variants:
  default  "small" DCGAN (generator 297K params, discriminator 168K, batch norm in both,
           z of 64 dims), non-saturating loss, Adam 2e-4 / b1 0.5 for both groups, m = 64
           images per update, one discriminator update per generator update.
           RESULTS_PLACEHOLDER
  minimax  the same with the saturating generator loss log(1 - D(G(z))).
  k2       two discriminator updates (each on its own 64 real images) per generator update.
  tiny     a seconds-long smoke run (tests).

Each evaluation writes samples_<step>.png (the same 64 noise vectors every time) and logs
validation/fake_score next to validation/real_score (the scorer's Inception-Score-like
value of the real validation images, the ceiling); checkpoints are ranked by fake_score.
"""
from train.config import base_config, select_best_by, shrink_for_smoke_test

VARIANTS = ("default", "minimax", "k2", "tiny")


def get_config(variant: str = "default"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown gan variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    c = base_config("gan", "tiny" if variant == "tiny" else "small", family="gan")
    c.data.source = "shapes"
    c.data.exclude_heldout_from_train = False   # all 16 classes: the scorer's labels
    c.data.batch_size = 64
    c.data.eval_batch_size = 250
    c.data.shapes_split_sizes.validation = 1000  # faster evaluations
    # Both groups: Adam (task.g_/d_learning_rate and b1 set the rates; optim.learning_rate
    # is set to the same value so the logged learning_rate is the generator's).
    c.optim.name = "adam"
    c.optim.learning_rate = c.task.g_learning_rate
    c.optim.b1 = c.task.g_b1
    c.train.num_steps = 1500
    c.train.log_every = 50
    c.train.eval_every = 250
    c.checkpoint.every = 250
    select_best_by(c, "validation/fake_score", "max")
    if variant == "minimax":
        c.task.loss = "minimax"
    elif variant == "k2":
        c.task.d_steps = 2
        c.data.batch_size = 2 * 64
    elif variant == "tiny":
        shrink_for_smoke_test(c, num_steps=4, batch_size=16, eval_batch_size=32, log_every=2,
                              eval_every=2)
        c.data.image_size = 16                  # 2 up/down-samplings: faster compiles
        c.data.shapes_split_sizes.validation = 32
        c.data.shapes_split_sizes.test = 32
        c.task.scorer_steps = 3
        c.task.sample_grid = 2
    return c
