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
  teacher  the distillation teacher: the default trained 4x as long (2400 steps):
           masked-token accuracy 49.8%, perplexity 6.34 (validation).
  distilbert  DistilBERT's recipe (Sanh et al. 2019) in small: the default at half depth
           (2 layers), initialized from every other layer of the teacher
           (runs/bert_teacher, init_from.inherit="uniform": layers 0 and 2) and trained with its
           triple loss -- soft targets at T=2 (weight 5), the masked-LM loss (2) and the
           cosine between last hidden states (1). Measured: 51.1% masked-token
           accuracy (103% of the teacher's) in 600 steps; the same model trained alone
           31.4%.
  tiny     a seconds-long smoke run (tests).
"""
from configs.common import cadence, warmup_cosine
from train.config import base_config, shrink_for_smoke_test


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
        c.model.num_layers = 2
        c.init_from.update(workdir="runs/bert_teacher", inherit="uniform")
        c.distill.update(teacher="runs/bert_teacher", temperature=2.0, kd_weight=5.0, hard_weight=2.0,
                         cosine_weight=1.0)
    else:
        raise ValueError(f"unknown bert variant {variant!r}; allowed: default, teacher, "
                         "distilbert, tiny")
    return c
