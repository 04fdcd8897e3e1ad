"""BERT-style encoder trained with masked language modelling on the embedded stdlib corpus.

    python -m train.main --config=configs/bert.py --workdir=runs/bert
    python -m train.main --config=configs/bert.py:tiny --workdir=/tmp/bert_tiny

Variants:
  default  4 layers, 128 wide, byte-level, 15% of tokens masked (80/10/10). Measured on 2
           CPU cores over 3 seeds (python -m train.sweep --config=configs/bert.py
           --workdir=runs/seeds/bert --sweep="" --seeds=3): 600 steps in ~5 minutes a run;
           masked-token accuracy 30.0 ± 1.3% and masked-token perplexity 17.4 ± 1.7 on
           validation (a byte-level MLM learns slowly: only 15% of the
           tokens carry a loss).
  teacher  the distillation teacher: the default trained 4x as long (2400 steps), run
           over 3 seeds into runs/seeds/bert_teacher (DISTILL_TEACHER): validation
           masked-token accuracy 47.0 ± 11.4% (33.9, 53.4 and 53.8%; 1.4-1.6 steps/s
           with another run sharing the 2 cores).
  distilbert  DistilBERT's recipe (Sanh et al. 2019) in small: the default at half depth
           (2 layers), initialized from every other layer of the teacher of the same seed
           (DISTILL_TEACHER, init_from.inherit="uniform": layers 0 and 2) and trained with
           its triple loss -- soft targets at T=2 (weight 5), the masked-LM loss (2) and the
           cosine between last hidden states (1). Measured over 3 seeds (2 CPU cores):
           validation masked-token accuracy 47.8 ± 11.8% (34.2-54.6%), +1.5 ± 0.6% over
           the teacher of each seed (47.0 ± 11.4%: seed 0's teacher stays on the
           plateau before a masked LM learns to use context) and +17.5 ± 13.0 points
           over the same model alone (30.3 ± 1.6%), a tie by the paired test (p=0.14).
  distill  the default config: the base of get_sweep("distill"), the 2-layer model alone
           and as DistilBERT (README's DistilBERT table gives the measured rows).
  tiny     a seconds-long smoke run (tests).
"""
from configs.common import cadence, warmup_cosine
from train.config import base_config, shrink_for_smoke_test

# The teacher of the DistilBERT student: the `teacher` run of the same seed ("{seed}" is the
# student's own seed, train/config.py), e.g. from
#   python -m train.sweep --config=configs/bert.py:teacher --workdir=runs/seeds/bert_teacher \
#       --sweep="" --seeds=3
DISTILL_TEACHER = "runs/seeds/bert_teacher/seed={seed}"
# DistilBERT (Sanh et al. 2019, sec. 2-3) on top of the default: half the depth, every other
# teacher layer (0 and 2 of 4), soft targets x 5 + masked LM x 2 + hidden-state cosine x 1.
DISTILBERT = {"model.num_layers": 2,
              "init_from.workdir": DISTILL_TEACHER, "init_from.inherit": "uniform",
              "distill.teacher": DISTILL_TEACHER, "distill.temperature": 2.0,
              "distill.kd_weight": 5.0, "distill.hard_weight": 2.0,
              "distill.cosine_weight": 1.0}


def get_config(variant: str = "default"):
    if variant == "default":
        c = base_config("mlm", "mini", max_length=128)
        c.data.stdlib_text.seq_len = 128
        c.data.batch_size = 32
        cadence(c, 600, 200)
        c.train.eval_max_batches = 8
        warmup_cosine(c, 2e-3, warmup_steps=50, weight_decay=0.01)
    elif variant == "tiny":
        c = base_config("mlm", "tiny", max_length=32)
        shrink_for_smoke_test(c, num_steps=10, batch_size=8, eval_batch_size=16, log_every=5,
                              eval_every=5)
        c.data.stdlib_text.seq_len = 32
        c.data.stdlib_text.max_bytes = 200_000
        c.train.eval_max_batches = 2
    elif variant == "teacher":
        c = get_config("default")
        cadence(c, 2400, 600)
    elif variant == "distilbert":
        c = get_config("default")
        c.update_from_flattened_dict(DISTILBERT)
    elif variant == "distill":
        c = get_config("default")
    else:
        raise ValueError(f"unknown bert variant {variant!r}; allowed: default, teacher, "
                         "distilbert, distill, tiny")
    return c


def get_sweep(variant: str = "distill"):
    """The DistilBERT comparison at equal steps (600), each seed distilling from the
    teacher of the same seed (DISTILL_TEACHER):

        python -m train.sweep --config=configs/bert.py:teacher \
            --workdir=runs/seeds/bert_teacher --sweep="" --seeds=3
        python -m train.sweep --config=configs/bert.py:distill \
            --workdir=runs/seeds/bert_distill --seeds=3

    Rows: the 2-layer model trained alone (the default at --config.model.num_layers=2) and
    the same model as DistilBERT (the `distilbert` variant's overrides).
    """
    if variant != "distill":
        raise ValueError(f"no sweep for bert variant {variant!r}; allowed: distill")
    return [("row", [{"model.num_layers": 2}, dict(DISTILBERT)])]
