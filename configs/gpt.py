"""GPT (decoder-only transformer) language model on the embedded standard-library corpus.

    python -m train.main --config=configs/gpt.py --workdir=runs/gpt
    python -m train.main --config=configs/gpt.py:tiny --workdir=/tmp/gpt_tiny

Variants:
  default     the README's main job: a 4-layer, 128-wide byte-level GPT (0.84M params).
              Measured on 2 CPU cores: 600 steps in ~3 minutes (3.3-3.7 steps/s), validation
              perplexity 4.993 ± 0.131 over 3 seeds (4.870-5.130; 2.32 bits/byte) against
              the unigram baseline's 21.90; test 5.086 ± 0.126. Another machine of the same
              kind (2.2-2.4 steps/s): 4.984 ± 0.118, test 5.085 ± 0.120.
  tiny        a seconds-long smoke run (tests).
  compress    the base of the compression sweep: the default model started from the
              trained run in `init_from.workdir` (default runs/gpt, the README's main
              job), 200 fine-tuning steps at a low learning rate; each sweep run switches on
              one compression (get_sweep("compress")). With --config.train.num_steps=0 it
              only evaluates: post-training compression.
  distill     the default config: the base of get_sweep("distill") (a 2-layer student of a
              6-layer teacher of the same seed, runs/seeds/gpt6/seed={seed}, alone and
              distilled): KD alone ties with training alone (5.070 ± 0.081 vs 5.011 ±
              0.064 validation perplexity, 3 seeds), KD from inherited layers 4.534 ±
              0.062 (-9.5 ± 0.4% seed by seed)
  moe         the default with a sparse mixture of experts in every other layer (layers 1
              and 3): 8 experts of half the MLP width, top-2, so each token runs as many
              MLP parameters as the dense default (4x the MLP parameters in those layers);
              capacity factor 1.25, Switch balancing loss 0.01, router z-loss 0.001; the
              expert_load evaluator plots the routing. The base of get_sweep("moe").
              Measured (600 steps, 2 CPU cores, 3 seeds): validation perplexity 4.837 ±
              0.018 vs the dense default's 4.984 ± 0.118 (-0.147 ± 0.113 seed by seed, a
              tie by the paired test, p=0.15); capacity factor 2.0: 4.835 ± 0.110, -0.149 ±
              0.010 vs dense (p=0.0014); expert load max/min 1.41 ± 0.07.
  moe_tiny    a seconds-long MoE smoke run (tests).
  gpt2_small  GPT-2 small (12 layers, 768 wide, 1024 context) in bf16 with fused attention:
              the GPU benchmark shape.
"""
from configs.common import cadence, warmup_cosine
from train.config import add_eval, base_config, shrink_for_smoke_test

# The teacher of get_sweep("distill"): the 6-layer run of the same seed.
DISTILL_TEACHER = "runs/seeds/gpt6/seed={seed}"

# The MoE variant's experts (model.moe): same active MLP parameters as the dense default.
# Sorted dispatch: 1.4x the steps/s of the dense one-hot einsums on CPU (same outputs).
MOE = {"every": 2, "num_experts": 8, "top_k": 2, "mlp_dim": 256, "capacity_factor": 1.25,
       "switch_weight": 0.01, "z_weight": 0.001, "dispatch": "sorted"}


def get_config(variant: str = "default"):
    if variant == "default":
        c = base_config("lm", "mini", max_length=128, dropout_rate=0.0)
        c.data.stdlib_text.seq_len = 128
        c.data.batch_size = 32
        cadence(c, 600, 200)
        c.train.eval_max_batches = 8
        warmup_cosine(c, 3e-3, warmup_steps=50, weight_decay=0.01)
        c.optim.schedule.end_lr_fraction = 0.1
    elif variant == "distill":  # the base of get_sweep("distill"): the default config
        c = get_config("default")
    elif variant == "compress":
        c = get_config("default")
        c.init_from.workdir = "runs/gpt"
        cadence(c, 200, 200)
        c.optim.learning_rate = 3e-4
        c.optim.schedule.name = "cosine"
    elif variant == "tiny":
        c = base_config("lm", "tiny", max_length=32)
        shrink_for_smoke_test(c, num_steps=20, batch_size=8, eval_batch_size=16, log_every=5,
                              eval_every=10)
        c.data.stdlib_text.seq_len = 32
        c.data.stdlib_text.max_bytes = 200_000
        c.train.eval_max_batches = 2
        c.optim.learning_rate = 3e-3
        c.evals.sample.tokens = 16
    elif variant in ("moe", "moe_tiny"):
        c = get_config("default" if variant == "moe" else "tiny")
        c.model.moe.update(MOE if variant == "moe" else {**MOE, "num_experts": 4,
                                                        "mlp_dim": 32})
        add_eval(c, "expert_load")
    elif variant == "gpt2_small":
        c = base_config("lm", "gpt2_small", dtype="bfloat16", attention_impl="fused",
                        fused_qkv=True, scan_layers=True, remat_policy="none")
        c.data.stdlib_text.seq_len = 1024
        c.data.batch_size = 16
        c.optim.learning_rate = 6e-4
        c.optim.weight_decay = 0.1
        c.optim.grad_clip_norm = 1.0
        c.optim.b2 = 0.95
        c.optim.schedule.name = "warmup_cosine"
        c.optim.schedule.warmup_steps = 100
    else:
        raise ValueError(f"unknown gpt variant {variant!r}; allowed: default, compress, "
                         "distill, moe, moe_tiny, tiny, gpt2_small")
    return c


def get_sweep(variant: str = "default"):
    """The example ablation: `python -m train.sweep --config=configs/gpt.py[:variant]`.

    default: optimizer x depth, 4 x 2 = 8 runs of the default config. Each optimizer runs
      at two peak learning rates around its own good value (one shared learning rate would
      only show that SGD needs a larger one): AdamW at 1e-3 and 3e-3 (the default), SGD
      with momentum 0.9 at 0.1 and 0.3. SGD gets no weight decay: the config's 0.01 is
      AdamW's decoupled decay, and as SGD's L2 penalty it cost 0.16 nats of validation loss
      in a 600-step run at lr 0.1 (2.34 vs 2.19). Depth: 2 vs the default 4 layers.
    tiny: 2 runs, 1 vs 2 layers (tests, smoke runs).
    """
    if variant == "default":
        adamw = [{"optim.name": "adamw", "optim.learning_rate": lr} for lr in (1e-3, 3e-3)]
        sgd = [{"optim.name": "sgd", "optim.learning_rate": lr, "optim.momentum": 0.9,
                "optim.weight_decay": 0.0} for lr in (0.1, 0.3)]
        return [("optimizer", adamw + sgd), ("model.num_layers", [2, 4])]
    if variant == "tiny":
        return [("model.num_layers", [1, 2])]
    if variant == "distill":
        return distill_sweep()
    if variant == "compress":
        return compression_sweep()
    if variant == "moe":
        return moe_sweep()
    raise ValueError(f"no sweep for gpt variant {variant!r}; allowed: default, compress, "
                     "distill, moe, tiny")


def get_search_space(variant: str = "default"):
    """The search of `python -m train.sweep --config=configs/gpt.py[:variant]
    --search=tpe --trials=16` (train/search.py): the optimizer's three main knobs around
    the hand-tuned default (peak learning rate 3e-3, 50 warm-up steps, weight decay 0.01).

    default: learning rate log-uniform in [1e-3, 1e-2], warm-up steps in [0, 200], AdamW's
      decoupled weight decay log-uniform in [1e-4, 0.1].
    tiny: learning rate and warm-up only, scaled to its 20 steps (tests, smoke runs).
    """
    if variant == "default":
        return {"optim.learning_rate": "loguniform(1e-3,1e-2)",
                "optim.schedule.warmup_steps": "int(0,200)",
                "optim.weight_decay": "loguniform(1e-4,0.1)"}
    if variant == "tiny":
        return {"optim.learning_rate": "loguniform(1e-3,1e-2)",
                "optim.schedule.warmup_steps": "int(0,10)"}
    raise ValueError(f"no search space for gpt variant {variant!r}; allowed: default, tiny")


def moe_sweep():
    """The mixture-of-experts ablation, every row 600 steps of the default schedule:

        python -m train.sweep --config=configs/gpt.py:moe --workdir=runs/seeds/gpt_moe --seeds=3 \
            --sort=validation/perplexity

    Rows: the dense default; the MoE (MOE: same active MLP parameters per token); dense
    with the MoE's total parameters (mlp_dim 1280 in every layer: 1.31M vs 1.32M); top-1
    (half the active expert parameters); no balancing loss; capacity factor 1.0 and 2.0.
    """
    dense = {"model.moe.every": 0, "evals.expert_load.every": -1}
    return [("row", [dense, {}, {**dense, "model.mlp_dim": 1280}, {"model.moe.top_k": 1},
                     {"model.moe.switch_weight": 0.0}, {"model.moe.capacity_factor": 1.0},
                     {"model.moe.capacity_factor": 2.0}])]


def compression_sweep():
    """The compression table of the README: `python -m train.sweep
    --config=configs/gpt.py:compress --workdir=runs/gpt_compress
    --sort=validation/perplexity` after the main job trained runs/gpt.

    Post-training runs (0 steps) evaluate runs/gpt's best checkpoint in compressed form;
    the others fine-tune it for 200 steps (the dense fine-tune is their control). README's
    table is this sweep over 3 seeds, each seed compressing its own base:
    `--workdir=runs/seeds/gpt_compress --seeds=3
    --config.init_from.workdir="runs/seeds/gpt/seed={seed}"` after the default's seed sweep
    into runs/seeds/gpt.
    """
    emb = {"compress.include_embeddings": True}
    ptq = {"train.num_steps": 0, "compress.quantize.mode": "ptq"}
    return [
        {"train.num_steps": 0},                                        # float reference
        {**ptq, **emb, "compress.quantize.bits": 8},
        {**ptq, "compress.quantize.bits": 8},                          # float embeddings
        {**ptq, **emb, "compress.quantize.bits": 8, "compress.quantize.activations":
         "dynamic"},
        {**ptq, **emb, "compress.quantize.bits": 4},
        {**emb, "compress.quantize.mode": "qat", "compress.quantize.bits": 4},
        {**emb, "train.num_steps": 0, "compress.quantize.mode": "cluster",
         "compress.quantize.bits": 4},
        {"train.num_steps": 200},                                      # dense fine-tune
        {"compress.prune.method": "magnitude", "compress.prune.sparsity": 0.5},
        {"compress.prune.method": "n_m"},
        {"compress.prune.method": "magnitude", "compress.prune.sparsity": 0.5,
         "compress.prune.gradual": True, "compress.prune.end_step": 150,
         "compress.prune.frequency": 25},
        {"compress.lora.rank": 8, "compress.quantize.mode": "ptq"},    # QLoRA, int8 base
    ]


def distill_sweep():
    """A 2-layer student of a 6-layer teacher, alone and distilled, at equal steps, each
    seed distilling from the teacher of the same seed (`{seed}`, train/config.py):

        python -m train.sweep --config=configs/gpt.py --workdir=runs/seeds/gpt6 \
            --sweep="" --seeds=3 --config.model.num_layers=6
        python -m train.sweep --config=configs/gpt.py:distill \
            --workdir=runs/seeds/gpt_distill --seeds=3 --sort=validation/perplexity

    (without --seeds, the one run of seed 0 uses runs/seeds/gpt6/seed=0). The distilled
    rows add Hinton KD at T=2 (weight 1, beside the hard loss); the last also starts from
    the teacher's layers 0 and 3 (init_from.inherit="uniform"). Measured on 2 CPU cores
    (validation perplexity over 3 seeds): teacher 5.172 ± 0.164; the student alone
    5.011 ± 0.064, + KD 5.070 ± 0.081 (a tie with alone, paired p=0.3), + KD and
    inheritance 4.534 ± 0.062 (-9.5 ± 0.4% seed by seed, paired p=0.00065).
    """
    teacher = DISTILL_TEACHER
    alone = {"model.num_layers": 2}
    distilled = {**alone, "distill.teacher": teacher, "distill.temperature": 2.0}
    inherited = {**distilled, "init_from.workdir": teacher, "init_from.inherit": "uniform"}
    return [("row", [alone, distilled, inherited])]
