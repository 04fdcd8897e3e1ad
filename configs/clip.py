"""Contrastive image-text models on the embedded shapes captions, evaluated zero-shot on
attribute combinations never seen in training (4 held-out color x shape classes).

    python -m train.main --config=configs/clip.py --workdir=runs/clip
    python -m train.main --config=configs/clip.py:align --workdir=runs/align
    python -m train.main --config=configs/clip.py:siglip --workdir=runs/siglip
    python -m train.main --config=configs/clip.py:tiny --workdir=/tmp/clip_tiny
    # README's headline: 3 seeds x the 4 held-out folds, each seed's fold mean
    python -m train.sweep --config=configs/clip.py --workdir=runs/seeds/clip_folds \
        --sweep="data.shapes.heldout_fold=0,1,2,3" --seeds=3

Variants:
  default  CLIP: ViT "tiny/4" image tower, causal text transformer pooled at EOS, InfoNCE
           with a learnable temperature (init 0.07, scale clipped at 100). Measured on 2
           CPU cores (1500 steps, ~3.5 min a run alone; mean ± std over 3 seeds, min-max)
           with each of the 4 held-out folds in turn (data.shapes.heldout_fold=0..3, all
           16 combinations unseen once), each seed's fold mean: zero-shot top-1 on the
           held-out combinations 86.6 ± 5.3% (81.4-92.0%) among the run's 4 held-out
           classes (chance 25%), 20.2 ± 4.9% among all 16 (chance 6.25%); seen classes
           58.2 ± 8.5%; retrieval R@1 48.0 ± 4.2% (image->text), 63.7 ± 7.0%
           (text->image). Fold 0 alone (the default classes): 87.1 ± 9.4% (78.0-96.8%);
           the same runs evaluated every 250 steps reach 98.2 ± 0.8% among 4 at step 500,
           while seen classes are at 42.7 ± 10.0%, then each seed gives up part of the
           unseen pairs as it fits the seen ones (README, row clip_curve).
  siglip   the same towers with the sigmoid loss (learnable scale and bias, 10 and -10):
           over 3 seeds x the 4 folds (each seed's fold mean, as the default's) held-out
           89.3 ± 4.3% (84.3-92.1%) among 4, 22.8 ± 1.1% among 16, seen classes 45.7 ±
           4.4%, retrieval R@1 34.9 ± 3.2% / 49.9 ± 3.3%; it ties with CLIP (Welch p=0.53).
  align    ALIGN: EfficientNet-style tower (depthwise separable MBConv + SE, batch norm)
           and a BERT-style bidirectional text tower pooled at [CLS], InfoNCE: over 3
           seeds held-out 88.6 ± 9.6% (77.8-96.0%) among 4, 23.8 ± 9.6% among 16, seen
           classes 44.7 ± 5.1% (one earlier run: 93.1% among 4).
  teacher  the distillation teacher: the default at twice the width (image tower 128 wide,
           text tower 64), 3.6x its parameters (510,593), 1500 steps. Over 3 seeds:
           held-out 84.7 ± 10.6% (76.6-96.8%) among 4, seen classes 83.3 ± 1.6%.
  student  its student at 51% of the teacher's parameters (image width 80, one text
           layer), 1000 steps: the base of get_sweep("student"), the TinyCLIP ablation.
           Over 3 seeds from scratch: held-out 81.1 ± 3.3% among 4, seen classes 59.3 ±
           8.4%; with manual inheritance from the teacher of its seed seen classes 86.7 ±
           2.4% (paired p=0.028), held-out 84.8 ± 7.9% (a tie).
  heldout8 the default with 8 held-out combinations (two disjoint Latin transversals):
           zero-shot among 8 unseen classes, each of which shares its color with one other
           held-out class, so color alone no longer decides (among the default's 4 it does).
           Over 3 seeds: 24.2 ± 6.1% (19.3-31.1%) among the 8 (chance 12.5%), 7.7 ± 2.4%
           among all 16, seen classes 53.7 ± 7.4%: the unseen combinations are barely
           composed at this budget.
  tiny     a seconds-long smoke run (tests).
Pictures of the default run (train/evaluators): embeddings_pca.png, embeddings_tsne.png (1000
test and 300 zero-shot images' joint embeddings by class, the held-out classes as crosses:
in t-SNE each lands beside the trained classes of its color), attention_rollout.png (the
class token's attention rollout: 28% of it on the objects' 5.5% of the pixels).
"""
from configs.common import add_eval, cadence, warmup_cosine
from train.config import base_config, shrink_for_smoke_test
from train.data.shapes import HELDOUT_FOLDS

MODEL_VARIANTS = {"default": "clip_tiny", "siglip": "siglip_tiny", "align": "align_tiny",
                  "tiny": "clip_tiny", "teacher": "clip_tiny", "student": "clip_tiny",
                  "heldout8": "clip_tiny"}
# heldout8: a second Latin-square transversal, disjoint from the default one, held out too:
# 8 of the 16 combinations unseen, each color and each shape still seen in 2 of its 4.
HELDOUT_8 = HELDOUT_FOLDS[0] + HELDOUT_FOLDS[1]
# The distillation teacher: the default at twice the width (image tower 128, text 64).
TEACHER = dict(vit={"encoder": {"d_model": 128, "mlp_dim": 512, "num_heads": 4}},
               text={"d_model": 64, "mlp_dim": 128, "num_heads": 2})
# Its student at 51% of the parameters, shrunk as TinyCLIP's manual inheritance does:
# the image tower in width (128 -> 80, heads kept at width 32), the text tower in depth
# (2 -> 1 layers).
STUDENT = dict(vit={"encoder": {"d_model": 80, "mlp_dim": 320, "num_heads": 4,
                                "head_dim": 32}},
               text={"d_model": 64, "mlp_dim": 128, "num_heads": 2, "num_layers": 1})


def get_config(variant: str = "default"):
    if variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown clip variant {variant!r}; allowed: "
                         f"{', '.join(MODEL_VARIANTS)}")
    sizes = {"teacher": TEACHER, "student": STUDENT}.get(variant, {})
    c = base_config("contrastive", MODEL_VARIANTS[variant], family="clip", **sizes)
    c.task.loss = "siglip" if variant == "siglip" else "infonce"
    c.data.source = "shapes"
    c.data.shapes.exclude_heldout_from_train = True   # the zero-shot classes stay unseen
    if variant == "heldout8":
        c.data.shapes.heldout_classes = HELDOUT_8
    c.data.batch_size = 128
    c.data.eval_batch_size = 128
    warmup_cosine(c, 1e-3, warmup_steps=100, weight_decay=0.1)
    cadence(c, 1500, 500)
    if variant == "student":  # the distillation rows' budget (get_sweep)
        cadence(c, 1000, 250)
    if variant == "default":  # pictures: the held-out classes' images among the others
        add_eval(c, "embeddings", heldout_split="zero_shot")
        add_eval(c, "attention_rollout")
    if variant == "tiny":
        shrink_for_smoke_test(c, num_steps=4, batch_size=16, eval_batch_size=32, log_every=2,
                              eval_every=2)
        c.data.shapes.shapes_split_sizes.validation = 64
        c.data.shapes.shapes_split_sizes.test = 64
        c.data.shapes.shapes_split_sizes.zero_shot = 64
        c.evals.retrieval.examples = 64
        c.evals.linear_probe.examples = 128
    return c


# The teacher of get_sweep("student"): the `teacher` run of the same seed ("{seed}" is the
# student's own seed, train/config.py); seed 0's alone for a sweep without --seeds.
DISTILL_TEACHER = "runs/seeds/clip_teacher/seed={seed}"

# The intermediate model of the multi-stage row: image width 104 (77% of the teacher's
# parameters), text depth still 2.
STAGE_75 = ("model.vit.encoder.d_model=104;model.vit.encoder.mlp_dim=416;"
            "model.vit.encoder.head_dim=32;model.text.num_layers=2")


# Stage 0 of the automatic-inheritance row: the teacher's size with L0 gates on both
# towers -- every head and MLP unit, each layer's attention and MLP, and the image tower's
# residual channels (TinyCLIP's masks) -- distilled under the constraint "half the gated
# parameters removed"; the student then inherits the channels, layers and units the gates
# kept.
AUTO_GATES = ("model.vit.encoder.d_model=128;model.vit.encoder.mlp_dim=512;"
              "model.text.num_layers=2;model.vit.encoder.unit_gates=True;"
              "model.vit.encoder.channel_gates=True;model.text.unit_gates=True;"
              "distill.gate_target=0.5;distill.gate_warmup_steps=250")


def get_sweep(variant: str = "student"):
    """The distillation ablation (TinyCLIP in small) on the student config, over seeds, each
    student distilled from (and inheriting from) the teacher of its seed (DISTILL_TEACHER):

        python -m train.sweep --config=configs/clip.py:teacher \
            --workdir=runs/seeds/clip_teacher --sweep="" --seeds=3
        python -m train.sweep --config=configs/clip.py:student \
            --workdir=runs/seeds/clip_distill --seeds=3 --sort=zero_shot/top1_among_heldout

    (without --seeds, one run a row, from seed 0's teacher).

    Rows at the same student size (51% of the teacher) and step budget (1000 steps): (a)
    from scratch,
    (b) + affinity mimicking from DISTILL_TEACHER, (c) + manual weight inheritance
    (init_from.inherit: the text tower's uniform layers, the image tower's widest
    channels), (d) + automatic inheritance (500 steps of gates learned at the teacher's
    size, AUTO_GATES, then 500 of the student inheriting by them), (e) multi-stage
    100% -> 77% -> 51% (each stage inheritance + affinity mimicking). Zero-shot accuracy
    is evaluated every 250 steps, so the steps each row needs to reach (a)'s final
    accuracy can be read off metrics.jsonl.
    """
    if variant != "student":
        raise ValueError(f"no sweep for clip variant {variant!r}; allowed: student")
    teacher = DISTILL_TEACHER
    every = {"evals.zero_shot.every": 250}
    distill = {**every, "distill.teacher": teacher}
    inherit = {**distill, "init_from.workdir": teacher, "init_from.inherit": "uniform"}
    auto = {**distill, "distill.stages": (AUTO_GATES,), "init_from.inherit": "importance"}
    return [("row", [{**every}, distill, inherit, auto,
                     {**distill, "distill.stages": (STAGE_75,)}])]
