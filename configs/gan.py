"""DCGAN on the embedded shapes images (32x32x3, all 16 color x shape classes).

    python -m train.main --config=configs/gan.py --workdir=runs/gan
    python -m train.main --config=configs/gan.py:minimax --workdir=runs/gan_minimax
    python -m train.main --config=configs/gan.py:k2 --workdir=runs/gan_k2

Variants (measured on 2 CPU cores shared with other jobs, so wall times vary 1.5x from
run to run; validation/fake_score at steps 250, 500, ..., 1500, where the real validation
images score 9.89; the scorer is 90.2% accurate on test):
  default  "small" DCGAN (generator 297K params, discriminator 168K, batch norm in both,
           z of 64 dims), non-saturating loss, Adam 2e-4 / b1 0.5 for both groups, m = 64
           images per update, one discriminator update per generator update. 1500 steps
           in 2m35s to 4m05s (8.5-12 steps/s), ~30 s of it training the scorer.
           fake_score 2.09, 2.57, 4.31, 5.10, 4.57, 5.00; test fake_score 5.09 vs 10.21
           for the real test images, 12.9 of 16 effective classes, diversity_ratio 1.02
           (no mode collapse): one run. Over 3 seeds (get_sweep below): test fake_score
           5.47 ± 0.24 (5.27-5.73) vs 9.81 ± 0.19 for the real images, diversity_ratio
           0.99 ± 0.03. Samples: colored shapes in the right places, some
           multi-colored or blobby. (With model.d_norm=none: 1.00 at step 250 with
           diversity_ratio 0.10, a collapse, recovering to 3.73 at 1500.)
  minimax  the same with the saturating generator loss log(1 - D(G(z))): D rejects the
           fakes (train d_fake_accuracy 1.0, g_loss ~ -0.01: a vanishing gradient);
           fake_score 1.41, 1.09, 2.71, 2.22, 3.80, 3.03 (test 3.06) in 2m54s. Over 3 seeds:
           test fake_score 3.30 ± 0.27, below the default beyond the noise (Welch p < 0.001).
  k2       two discriminator updates (each on its own 64 real images) per generator update
           (data.batch_size 128): fake_score 1.87, 3.93, 3.53, 4.35, 5.26, 4.74 (test 4.77)
           in 4m33s (6.7 steps/s). Over 3 seeds: 5.24 ± 0.79 (4.35-5.82), a tie with the
           default (Welch p = 0.67).
  tiny     a seconds-long smoke run (tests; 16x16 images).

Each evaluation writes samples_<step>.png (the same 64 noise vectors every time) and logs
validation/fake_score next to validation/real_score (the scorer's Inception-Score-like
value of the real validation images, the ceiling); checkpoints are ranked by fake_score.
"""
from train.config import base_config, select_best_by, shrink_for_smoke_test
from train.sweep_spec import apply_overrides

VARIANTS = ("default", "minimax", "k2", "tiny")
# The ablations' overrides of the default: the variants of those names and get_sweep's rows
# (k2: each of the two discriminator updates sees its own 64 real images).
ABLATIONS = {"minimax": {"task.loss": "minimax"},
             "k2": {"task.d_steps": 2, "data.batch_size": 2 * 64}}


def get_config(variant: str = "default"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown gan variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    c = base_config("gan", "tiny" if variant == "tiny" else "small", family="gan")
    c.data.source = "shapes"
    c.data.shapes.exclude_heldout_from_train = False   # all 16 classes: the scorer's labels
    c.data.batch_size = 64
    c.data.eval_batch_size = 200                 # divisible by 8 devices
    c.data.shapes.shapes_split_sizes.validation = 1000  # faster evaluations
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
    if variant in ABLATIONS:
        c = apply_overrides(c, ABLATIONS[variant])
    elif variant == "tiny":
        shrink_for_smoke_test(c, num_steps=4, batch_size=16, eval_batch_size=32, log_every=2,
                              eval_every=2)
        c.data.shapes.image_size = 16                  # 2 up/down-samplings: faster compiles
        c.data.shapes.shapes_split_sizes.validation = 32
        c.data.shapes.shapes_split_sizes.test = 32
        c.task.scorer_steps = 3
        c.evals.gan_samples.grid = 2
    c.evals.gan_samples.every = c.train.eval_every  # a grid after every evaluation
    return c


def get_sweep(variant: str = "default"):
    """The GAN's two ablations beside the default, each over seeds:

        python -m train.sweep --config=configs/gan.py --workdir=runs/seeds/gan --seeds=3 \
            --sort=test/fake_score

    Rows: the default (non-saturating loss, one discriminator update per generator
    update), the saturating minimax loss (the `minimax` variant), two discriminator
    updates per generator update (the `k2` variant: 2 x 64 real images a step).
    """
    if variant != "default":
        raise ValueError(f"no sweep for gan variant {variant!r}; allowed: default")
    return [("row", [{}, ABLATIONS["minimax"], ABLATIONS["k2"]])]
