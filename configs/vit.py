"""ViT classifier on the embedded shapes images (16 color x shape classes).

    python -m train.main --config=configs/vit.py --workdir=runs/vit
    python -m train.main --config=configs/vit.py:augment --workdir=runs/vit_augment
    python -m train.main --config=configs/vit.py:tiny --workdir=/tmp/vit_tiny

Variants:
  default  ViT "tiny/4" (64 wide, 2 blocks, 4x4 patches on 32x32 images, mean pooling;
           108K params) on all 16 classes. Measured on 2 CPU cores: 3000 steps in ~2.5
           minutes (21 steps/s), test accuracy 90.5 ± 1.1% over 3 seeds (89.4-91.6%;
           one earlier run: 91.9%; 1500 steps at lr 1e-3: 78.9% -- a
           ViT without convolutions' inductive bias needs more steps than the ResNet).
  augment  the default with training-time augmentation (configs/common.py shapes_augment:
           random resized crops of >= half the area, flips, rotations <= 15 degrees,
           brightness / contrast / saturation 0.2, mixup 0.2 or CutMix 1 per example; on
           device in the train step, train/data/augment.py). Measured on 2 CPU cores shared
           with other jobs: test accuracy 52.4 ± 6.2% over 3 seeds (45.6-57.7%; python -m
           train.sweep --config=configs/vit.py:augment --workdir=runs/seeds/vit_augment
           --sweep="" --seeds=3) vs 90.5 ± 1.1% without (one earlier run: validation
           34.7 / 44.4 / 52.0% at steps 1000 / 2000 / 3000) -- it hurts, a
           lot: colors stay perfect (no color confusion in the confusion matrix), shapes
           (5-9 px) blur under the resampling and the soft labels slow learning;
           configs/resnet.py measures which ops cost what. Flips and color jitter alone
           (--config.data.shapes.augment.crop_area_min=1, .rotate=0, .mixup=0, .cutmix=0)
           are neutral: test 91.4%, validation 92.3% (the default: 91.9%, 92.3%; over 3
           seeds its test accuracy spans 89.4-91.6%, so 91.4% is within it). Train
           and test are one distribution here and 3000 steps are 4 epochs of 50,000
           images: no overfitting for augmentation to cure. The ops take 16 ms per batch
           of 64 on those cores (flips + jitter: 7 ms).
  tiny     a seconds-long smoke run (tests).
Pictures of the default run (train/evaluators): embeddings_pca.png, embeddings_tsne.png (the
test images' pooled features by class), attention_rollout.png (attention rollout through
both blocks: 31% of it on the objects' 5.6% of the pixels), confusion_matrix.png (test
accuracy 91.9%, balanced 92.0%, the worst class green circle at 77%).
Any ViT size works as model.variant (e.g. --config.model.variant=S/16 with image_size 224).
The transformer's fields are under model.encoder (e.g. --config.model.encoder.num_layers=4,
--config.model.encoder.dropout_rate=0.1); the image-side ones (patch_size, pool, ...) are
directly under model.
"""
from configs.common import (add_eval, cadence, shapes_augment, shapes_classification,
                            warmup_cosine)
from train.config import base_config, select_best_by, shrink_for_smoke_test


def get_config(variant: str = "default"):
    c = base_config("classify", "tiny/4", family="vit", pool="gap")
    shapes_classification(c)
    warmup_cosine(c, 2e-3, warmup_steps=100, weight_decay=1e-4)
    select_best_by(c, "validation/accuracy", "max")
    if variant in ("default", "augment"):
        cadence(c, 3000, 1000)
        for name in ("embeddings", "attention_rollout", "confusion_matrix"):  # pictures
            add_eval(c, name)
    elif variant == "tiny":
        shrink_for_smoke_test(c, num_steps=6, batch_size=16, eval_batch_size=64, log_every=3,
                              eval_every=3)
        c.data.shapes.shapes_split_sizes.validation = 128
        c.data.shapes.shapes_split_sizes.test = 128
    else:
        raise ValueError(f"unknown vit variant {variant!r}; allowed: default, augment, tiny")
    if variant == "augment":
        shapes_augment(c)
    return c
