"""Where a model looks: attention rollout of a ViT (or a CLIP's ViT image tower) and the
alignment of a recurrent seq2seq model's attention.

  attention_rollout  attention_rollout.png: a few test images over the image regions their
                     representation draws on -- attention rollout (Abnar & Zuidema 2020)
                     through every layer, the pooled output's row of it (the class token's,
                     or the mean of all tokens' for mean pooling) on the patch grid, each
                     patch's value over its pixels. With masks in the batch (the shapes
                     data), object_relevance: the share of the relevance on object pixels,
                     beside object_area, the share a uniform map would put there.
  alignment          alignment.png: the attention weights of a few greedy decodes (Bahdanau
                     et al. 2015, fig. 3): one row per emitted token, one column per source
                     token. Numbers: entropy (mean nats per row), monotonic (the fraction of
                     consecutive rows whose most attended source position does not move back).

The ViT's attention weights are the ones models/layers/attention.py sows into the
`intermediates` collection (per block .../layers_<i>/self_attention/attention_weights, a
scanned stack's stacked on a leading layer axis); a model with the fused kernels is applied
with the reference implementation here (same parameters, same function), since fused
kernels never materialize the weights. The decoder's are models/rnn.py's "alignment".
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models import clip as clip_lib
from models import decoding
from models import vit as vit_lib
from train.data.tokenizers import BOS, EOS, PAD
from train.evaluators import figures
from train.evaluators.base import SampleEvaluator
from train.tasks.seq2seq import shift_right

RESIDUAL = 0.5   # Abnar & Zuidema 2020, sec. 3: A = 0.5 W_att + 0.5 I (the residual path)


# ----------------------------------------------------------------------------------------
# Attention rollout.
# ----------------------------------------------------------------------------------------
def attention_rollout(weights) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, eq. 1) in float64.

    weights [L, B, H, T, T]: layer l's attention (the first layer first), row i = query i's
    distribution over the keys. Per layer the heads are averaged, the residual connection
    added as identity (A = 0.5 W + 0.5 I) and the rows renormalized (a query that attended
    nothing keeps only its residual path); the rollout multiplies the layers,
    R = A_L ... A_2 A_1. Returns R [B, T, T]: R[b, i, j] is how much input token j flows
    into output token i through all L layers (every row sums to 1).
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 5 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"attention_rollout needs weights [layers, batch, heads, T, T], "
                         f"got shape {w.shape}")
    eye = np.eye(w.shape[-1])
    rollout = np.broadcast_to(eye, (w.shape[1],) + eye.shape).copy()
    for layer in w:
        a = (1.0 - RESIDUAL) * layer.mean(axis=1) + RESIDUAL * eye
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a @ rollout
    return rollout


def relevance_maps(rollout, pool: str, patch: int) -> np.ndarray:
    """rollout [B, T, T] of a ViT -> [B, S, S] pixel maps, S = grid * patch.

    The pooled output's row: the class token's (pool "cls": row 0, without the class
    token's own column) or, for mean pooling ("gap": the output is the mean of all tokens),
    the mean of the rows; its patch n = i * grid + j (models.vit.patchify's row-major order)
    fills pixel block [i P:(i + 1) P, j P:(j + 1) P].
    """
    rollout = np.asarray(rollout, np.float64)
    relevance = rollout[:, 0, 1:] if pool == "cls" else rollout.mean(axis=1)
    grid = int(round(relevance.shape[1] ** 0.5))
    if grid * grid != relevance.shape[1]:
        raise ValueError(f"{relevance.shape[1]} patch tokens do not form a square grid "
                         f"(pool={pool!r})")
    return np.kron(relevance.reshape(-1, grid, grid), np.ones((1, patch, patch)))


def self_attention_weights(intermediates: dict) -> np.ndarray:
    """[L, B, H, T, T]: the sown self-attention weights of every transformer block of
    `intermediates` in layer order (see the module docstring for where they are)."""
    layers = []
    for path, sown in traverse_util.flatten_dict(intermediates).items():
        if path[-1] != "attention_weights" or "self_attention" not in path:
            continue
        w = np.asarray(sown[0])
        if "layers" in path:                 # a scanned stack: [L, B, H, T, T]
            layers += [(i, w[i]) for i in range(w.shape[0])]
        else:
            index = next(int(m.group(1)) for p in path
                         if (m := re.fullmatch(r"layers_(\d+)", str(p))))
            layers.append((index, w))
    if not layers:
        raise ValueError("the model sowed no self-attention weights")
    return np.stack([w for _, w in sorted(layers, key=lambda t: t[0])])


def vit_of(model):
    """(module to apply, its method, the ViTConfig) for a ViT or a CLIP with a ViT image
    tower, with the reference attention (the one that sows its weights)."""
    if isinstance(model, vit_lib.ViT):
        vcfg = model.cfg
        if vcfg.encoder.attention_impl != "reference":
            model = model.clone(cfg=vcfg.replace(encoder={"attention_impl": "reference"}))
        return model, "__call__", vcfg
    if isinstance(model, clip_lib.ClipModel) and model.cfg.image_tower == "vit":
        cfg = model.cfg
        if cfg.vit.encoder.attention_impl != "reference":
            model = model.clone(cfg=cfg.replace(vit={"encoder": {"attention_impl":
                                                                 "reference"}}))
        return model, "image_features", cfg.image_config
    tower = getattr(getattr(model, "cfg", None), "image_tower", None)
    raise ValueError("evals.attention_rollout needs a ViT or a CLIP with "
                     f"model.image_tower='vit'; got {type(model).__name__}"
                     + (f" with model.image_tower={tower!r}" if tower else ""))


class AttentionRollout(SampleEvaluator):
    """attention_rollout.png (see the module docstring) of the split's first `images`
    images, one column each."""

    name = "attention_rollout"
    SAMPLE_KEY, SAMPLE_DEFAULT = "images", 6

    def run(self, step, params, model_state, final):
        ctx = self.ctx
        if "attention_rollout" not in ctx.shared:   # compiled once per run
            module, method, vcfg = vit_of(ctx.model)
            sown = jax.jit(lambda variables, images: module.apply(
                variables, images, method=method, mutable=["intermediates"])[1])
            ctx.shared["attention_rollout"] = sown, vcfg
        sown, vcfg = ctx.shared["attention_rollout"]
        batch = next(iter(ctx.data[self.cfg.split].eval_batches(self.cfg.images)))
        keep = batch["weights"] > 0
        images = batch["image"][keep]
        state = jax.device_get(sown({"params": params, **model_state}, images))
        rollout = attention_rollout(self_attention_weights(state["intermediates"]))
        maps = relevance_maps(rollout, vcfg.pool, vcfg.patch_size)
        out = {}
        if "mask" in batch:
            on_object = batch["mask"][keep] > 0
            out["object_relevance"] = float(np.mean(
                (maps * on_object).sum((1, 2)) / maps.sum((1, 2))))
            out["object_area"] = float(on_object.mean())
        names = getattr(ctx.data[self.cfg.split], "class_names", None)
        titles = ([names[int(y)] for y in batch["label"][keep]]
                  if names is not None and "label" in batch else [""] * len(images))
        path = figures.picture_path(ctx.workdir, "attention_rollout", step, final)
        plot_rollout(images, maps, titles, path)
        figures.publish(ctx.workdir, self.name, step, {"rollout": path})
        return out


def plot_rollout(images, maps, titles, path: str) -> str:
    """Two rows: the images [N, S, S, C], then each dimmed under its relevance map [N, S, S]
    (scaled to its maximum)."""
    plt = figures.pyplot()
    images = figures.displayable(images)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 3.2), squeeze=False)
    for i in range(n):
        top, bottom = axes[0][i], axes[1][i]
        top.imshow(images[i], interpolation="nearest")
        top.set_title(titles[i], fontsize=7)
        bottom.imshow(images[i].mean(-1), cmap="gray", vmin=0, vmax=1, alpha=0.5,
                      interpolation="nearest")
        bottom.imshow(maps[i] / max(maps[i].max(), 1e-12), cmap="inferno", alpha=0.65,
                      vmin=0, vmax=1, interpolation="bilinear")
        for ax in (top, bottom):
            ax.axis("off")
    axes[1][0].set_title("attention rollout", fontsize=7, loc="left")
    fig.tight_layout()
    return figures.save(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------
# Seq2seq alignment.
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def decoder_alignment(model, variables, inputs, tokens):
    """inputs [B, S], tokens [B, T] (a decode, without BOS) -> [B, T, S]: the attention
    weights of each emitted token over the source, from the teacher-forced decoder on the
    decode itself -- the weights greedy decoding used, as the decoder is deterministic
    given the prefix."""
    _, state = model.apply(variables, inputs, shift_right(tokens, BOS),
                           mutable=["intermediates"])
    sown = state.get("intermediates", {})
    if "alignment" not in sown:
        raise ValueError(f"evals.alignment: {type(model).__name__} sows no alignment (the "
                         "recurrent seq2seq model, models/rnn.py Seq2SeqRNN, does)")
    return sown["alignment"][0]


def alignment_stats(matrices: list[np.ndarray]) -> dict:
    """Mean row entropy (nats) and the fraction of consecutive rows whose argmax column does
    not decrease, over alignment matrices [T_i, S_i] (rows: distributions)."""
    entropy = float(np.mean(np.concatenate(
        [-(m * np.log(np.clip(m, 1e-12, 1.0))).sum(-1) for m in matrices])))
    steps = [np.diff(np.argmax(m, axis=-1)) >= 0 for m in matrices if len(m) > 1]
    monotonic = float(np.mean(np.concatenate(steps))) if steps else 1.0
    return {"entropy": entropy, "monotonic": monotonic}


def token_labels(tokenizer, ids) -> list[str]:
    """One tick label per token id: its text ("_" for a space, escapes for unprintable
    bytes, which an untrained decoder emits), "</s>" for EOS."""
    def label(t):
        if int(t) == EOS:
            return "</s>"
        text = tokenizer.decode(np.array([t]), stop_at_eos=False).replace(" ", "_")
        return text if text.isprintable() else ascii(text)[1:-1]
    return [label(t) for t in ids]


class Alignment(SampleEvaluator):
    """alignment.png and its entropy / monotonicity (see the module docstring) of the
    split's first `examples` examples, one matrix each."""

    name = "alignment"
    SAMPLE_KEY, SAMPLE_DEFAULT = "examples", 4

    def run(self, step, params, model_state, final):
        ctx, model = self.ctx, self.ctx.model
        ds = ctx.data[self.cfg.split]
        batch = next(iter(ds.eval_batches(self.cfg.examples)))
        keep = batch["weights"] > 0
        inputs = jnp.asarray(batch["inputs"][keep])
        tokens, lengths = decoding.greedy_decode(model, params, inputs,
                                                 max_length=ds.max_target_len, bos_id=BOS,
                                                 eos_id=EOS, pad_id=PAD)
        weights = np.asarray(decoder_alignment(model, {"params": params, **model_state},
                                               inputs, tokens))
        matrices, rows, cols = [], [], []
        for i, (source, n_out) in enumerate(zip(np.asarray(inputs), np.asarray(lengths))):
            n_in = int(np.sum(source != PAD))
            matrices.append(weights[i, :int(n_out), :n_in])
            rows.append(token_labels(ds.tokenizer, np.asarray(tokens)[i, :int(n_out)]))
            cols.append(token_labels(ds.tokenizer, source[:n_in]))
        path = figures.picture_path(ctx.workdir, "alignment", step, final)
        plot_alignments(matrices, rows, cols, path)
        figures.publish(ctx.workdir, self.name, step, {"alignment": path})
        return {**alignment_stats(matrices), "examples": float(len(matrices))}


def plot_alignments(matrices, rows, cols, path: str) -> str:
    """One panel per decode: matrix [T, S] (emitted tokens down, source tokens across)."""
    plt = figures.pyplot()
    tallest = max(len(r) for r in rows)
    widths = [max(len(c), 3) for c in cols]
    fig, axes = plt.subplots(1, len(matrices), squeeze=False,
                             figsize=(0.3 * sum(widths) + 0.9 * len(matrices) + 0.6,
                                      0.13 * tallest + 1.3),
                             gridspec_kw={"width_ratios": widths})
    for ax, m, r, c in zip(axes[0], matrices, rows, cols):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(range(len(c)), c, fontsize=7)
        ax.set_yticks(range(len(r)), r, fontsize=5)
        ax.xaxis.tick_top()
        ax.set_title("".join(c[:-1] if c and c[-1] == "</s>" else c), fontsize=8, pad=12)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, pad=0.02)
    return figures.save(fig, path, dpi=110)
