"""Compression as configuration: `config.compress` on any model family and task.

The transforms themselves are pure functions in `models/compress` (quantize, prune, LoRA);
this module maps the config onto them at the three places a run touches parameters:

  start     `config.init_from` (train/init_from.py) loads a trained run's matching params
            (its best checkpoint by default); one-shot pruning prunes them; LoRA adds
            adapters.
  training  the loss sees `forward_params(params)`: fake-quantized kernels for QAT
            (straight-through gradients), LoRA-adapted kernels (base frozen, and for
            QLoRA quantized); the optimizer keeps pruned weights at zero and prunes
            gradually on the Zhu & Gupta schedule; QAT of activations goes through the
            models' `dot_general` hook (`model_code`).
  export    after the final evaluation, the compressed form is built (integer kernels +
            scales, k-means codebooks, sparse storage, merged or QLoRA adapters), the run
            is evaluated again *through that form* (integers dequantized inside the jitted
            step; integer activation matmuls when `quantize.activations` is set), and
            summary.json gets `compressed/<split>/<metric>`, `compressed/bytes` (true
            storage, scales and indices included) and `compressed/fraction_of_float`.

Post-training quantization of a finished run, from the command line (no training steps):

    python -m train.main --config=configs/gpt.py --workdir=runs/gpt_int8 \
        --config.init_from.workdir=runs/gpt --config.train.num_steps=0 \
        --config.compress.quantize.mode=ptq --config.compress.quantize.bits=8

Storage accounting: quantized or clustered trees count their packed integers, scales,
zero points and codebooks (`quantize.tree_nbytes`); pruned trees their sparse form
(`prune.sparse_nbytes`: values + relative indices, or N:M values + metadata); a run that
is both pruned and quantized reports the smaller of the two forms it actually builds
(the combined sparse-integer format is not implemented). Float leaves count at their size.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging

from models.compress import cluster, lora, prune, quant_matmul, quantize
from train import init_from as init_from_lib
from train.tasks.base import Task

QUANTIZE_MODES = ("none", "ptq", "qat", "cluster")
ACTIVATION_MODES = ("none", "dynamic", "static")
PRUNE_METHODS = ("none", "magnitude", "n_m", "neurons", "heads")


def default_config() -> ml_collections.ConfigDict:
    """The `compress` section; everything off by default."""
    c = ml_collections.ConfigDict()
    c.include_embeddings = False   # also compress embedding tables (quantize, prune)
    q = c.quantize = ml_collections.ConfigDict()
    q.mode = "none"                # none | ptq (quantize at export) | qat (fake-quant in
    #                                training, integers at export) | cluster (k-means)
    q.bits = 8                     # weight bits, 2..8 (cluster: log2 of the codebook size)
    q.symmetric = True             # False: asymmetric with a zero point
    q.per_channel = True           # one scale per output channel (last axis), else per tensor
    q.activations = "none"         # none | dynamic (per-batch ranges) | static (calibrated):
    #                                integer activation x weight matmuls at export (QAT:
    #                                fake-quantized activations in training too)
    q.activation_bits = 8
    q.calibration = "minmax"       # static: minmax | moving_average | percentile
    q.calibration_batches = 4      # training batches observed for static ranges
    p = c.prune = ml_collections.ConfigDict()
    p.method = "none"              # none | magnitude | n_m | neurons | heads
    p.sparsity = 0.5               # magnitude: final fraction of zeros; neurons / heads:
    #                                fraction removed
    p.scope = "layer"              # magnitude: layer | global
    p.paths = ".*"                 # neurons / heads: regex of the kernels whose units go
    #                                (transformers: "mlp/fc1" prunes hidden MLP units only)
    p.n = 2                        # n_m: keep n of every m consecutive input weights
    p.m = 4
    p.gradual = False              # magnitude: Zhu & Gupta polynomial schedule (else one
    p.begin_step = 0               #   shot at the start, then masked fine-tuning)
    p.end_step = 0                 # gradual: last pruning step (0 = 3/4 of train.num_steps)
    p.frequency = 50               # gradual: steps between mask updates
    p.initial_sparsity = 0.0
    lo = c.lora = ml_collections.ConfigDict()
    lo.rank = 0                    # 0 = off; else adapters of this rank, base frozen
    lo.alpha = 16.0                # the update is scaled by alpha / rank
    lo.targets = (".*",)           # regexes (re.search) over kernel paths to adapt
    return c


def enabled(c: ml_collections.ConfigDict) -> bool:
    return (c.quantize.mode != "none" or c.quantize.activations != "none"
            or c.prune.method != "none" or c.lora.rank > 0)


def validate(c: ml_collections.ConfigDict, num_steps: int) -> None:
    """ValueError naming the `compress.*` key and what is allowed."""
    q, p, lo = c.quantize, c.prune, c.lora

    def need(ok, key, allowed, value):
        if not ok:
            raise ValueError(f"compress.{key}={value!r}; allowed: {allowed}")

    need(q.mode in QUANTIZE_MODES, "quantize.mode", ", ".join(QUANTIZE_MODES), q.mode)
    need(q.activations in ACTIVATION_MODES, "quantize.activations",
         ", ".join(ACTIVATION_MODES), q.activations)
    need(2 <= q.bits <= 8, "quantize.bits", "2..8", q.bits)
    need(2 <= q.activation_bits <= 8, "quantize.activation_bits", "2..8", q.activation_bits)
    need(q.calibration in quantize.OBSERVERS, "quantize.calibration",
         ", ".join(quantize.OBSERVERS), q.calibration)
    need(q.calibration_batches >= 1, "quantize.calibration_batches", ">= 1",
         q.calibration_batches)
    need(p.method in PRUNE_METHODS, "prune.method", ", ".join(PRUNE_METHODS), p.method)
    need(0.0 <= p.sparsity < 1.0, "prune.sparsity", "[0, 1)", p.sparsity)
    need(p.scope in prune.SCOPES, "prune.scope", ", ".join(prune.SCOPES), p.scope)
    need(1 <= p.n < p.m, "prune.n", f"1 <= n < m (m={p.m})", p.n)
    need(p.frequency >= 1, "prune.frequency", ">= 1", p.frequency)
    need(lo.rank >= 0, "lora.rank", ">= 0 (0 = off)", lo.rank)
    need(lo.alpha > 0, "lora.alpha", "> 0", lo.alpha)
    need(len(lo.targets) > 0, "lora.targets", "at least one regex", list(lo.targets))
    if p.gradual:
        need(p.method == "magnitude", "prune.gradual",
             "True only with prune.method='magnitude'", p.gradual)
        prune.GradualSchedule(**_gradual_kwargs(c, num_steps))  # raises on bad steps
    if lo.rank and q.mode in ("qat", "cluster"):
        raise ValueError(f"compress.lora.rank={lo.rank} with compress.quantize.mode="
                         f"{q.mode!r}: LoRA combines with mode 'ptq' (QLoRA: a quantized "
                         "frozen base) or 'none'")
    if lo.rank and p.method != "none":
        raise ValueError("compress.lora and compress.prune together are not supported "
                         "(the merged adapters would fill the pruned weights)")


def _gradual_kwargs(c, num_steps: int) -> dict:
    p = c.prune
    end = p.end_step or max(p.begin_step + p.frequency,
                            (3 * num_steps // 4) // p.frequency * p.frequency)
    return dict(initial_sparsity=p.initial_sparsity, final_sparsity=p.sparsity,
                begin_step=p.begin_step, end_step=end, frequency=p.frequency,
                scope=p.scope, include_embeddings=c.include_embeddings)


# ----------------------------------------------------------------------------------------
# The run's view of compression.
# ----------------------------------------------------------------------------------------
class Compression:
    """`config.compress` bound to one run. The trainer calls, unconditionally:

      model_code(for_export=False)   code fields of the trained model (QAT's dot_general)
      wrap_task(task)                the task whose loss sees forward_params(params)
      wrap_optimizer(tx)             pruning masks / adapters-only updates
      initial_state(...)             the state a run starts from (init_from, pruning, LoRA)
      evaluate_export(...)           summary entries of the exported, compressed form

    each the identity (or nothing) when compression is off. `init_from` is the run's
    `config.init_from` section (None or workdir "": start from the model's own init).
    """

    def __init__(self, c: ml_collections.ConfigDict, num_steps: int,
                 init_from: ml_collections.ConfigDict | None = None):
        self.c, self.num_steps = c, num_steps
        self.init_from = (init_from if init_from is not None and init_from_lib.enabled(
            init_from) else None)
        self.q, self.p, self.lo = c.quantize, c.prune, c.lora
        self.emb = bool(c.include_embeddings)
        self.enabled = enabled(c)

    # -- model ---------------------------------------------------------------------------
    def model_code(self, for_export: bool, calibration=None) -> dict:
        """Code fields for families.build: the dot_general of training or of export."""
        q = self.q
        if q.activations == "none":
            return {}
        if not for_export:
            if q.mode != "qat":
                return {}
            return {"dot_general": quantize.make_dot_general(
                "fake", q.activation_bits, q.symmetric)}
        if q.activations == "static":
            if calibration is None:
                return {"dot_general": quant_matmul.RecordingDotGeneral(q.calibration)}
            return {"dot_general": quantize.make_dot_general(
                "static", q.activation_bits, q.symmetric, calibration=calibration)}
        return {"dot_general": quantize.make_dot_general("dynamic", q.activation_bits,
                                                         q.symmetric)}

    # -- parameters at the start -----------------------------------------------------------
    @property
    def changes_initial_params(self) -> bool:
        return bool(self.init_from is not None or self.lo.rank or
                    (self.p.method != "none" and not self.p.gradual))

    def prepare(self, params, model_state, pretrained, key):
        """(params, model_state, masks) a run starts from (jittable; pretrained may be None)."""
        if pretrained is not None:
            params, model_state = pretrained
        masks = None
        p = self.p
        if p.method == "magnitude" and not p.gradual:
            params, masks = prune.magnitude(params, p.sparsity, p.scope,
                                            include_embeddings=self.emb)
        elif p.method == "n_m":
            params, masks = prune.n_m(params, p.n, p.m, include_embeddings=self.emb)
        elif p.method == "neurons":
            params, masks = prune.neurons(params, fraction=p.sparsity, paths=p.paths)
        elif p.method == "heads":
            params, masks = prune.heads(params, fraction=p.sparsity, paths=p.paths)
        if self.lo.rank:
            adapters = lora.init_lora(params, key, self.lo.rank, targets=tuple(self.lo.targets),
                                      include_embeddings=self.emb)
            params = lora.train_params(params, adapters)
        return params, model_state, masks

    # -- optimizer ---------------------------------------------------------------------------
    def wrap_optimizer(self, tx):
        """The optimizer that keeps pruned weights at zero / trains only the adapters."""
        if self.lo.rank:
            return lora.lora_optimizer(tx)
        if self.p.method == "none":
            return tx
        schedule = prune.GradualSchedule(**_gradual_kwargs(self.c, self.num_steps)) \
            if self.p.gradual else None
        return prune.keep_pruned(tx, None, schedule)

    def init_opt_state(self, tx_inner, tx, params, masks):
        """tx.init(params), with one-shot pruning masks placed in the wrapper's state."""
        if masks is not None and not self.lo.rank:
            return prune.keep_pruned(tx_inner, masks).init(params)
        return tx.init(params)

    # -- the forward pass in training ----------------------------------------------------------
    def forward_params(self, params):
        """What the model sees in training: adapted / fake-quantized kernels."""
        q = self.q
        if self.lo.rank:
            base = params["base"]
            if q.mode == "ptq":  # QLoRA: the frozen base is used in its quantized form
                base = jax.lax.stop_gradient(quantize.fake_quant_tree(
                    base, q.bits, q.symmetric, q.per_channel, self.emb))
            return lora.apply_lora(base, params["lora"], self.lo.alpha)
        if q.mode == "qat":
            return quantize.fake_quant_tree(params, q.bits, q.symmetric, q.per_channel,
                                            self.emb)
        return params

    def wrap_task(self, task: Task) -> Task:
        return task if not self.enabled else CompressedTask(task, self.forward_params)

    def initial_state(self, init_state, plain_init, base_tx, tx, init_key, resuming: bool):
        """(init_state(*inputs) -> TrainState, inputs) of the run's start.

        init_state() -> TrainState: the model's own initialization with `tx`'s state; when
        nothing changes the initial params, that is the answer (no inputs). Otherwise
        plain_init() (the same with base_tx's state) gives the architecture and the fresh
        values; `init_from` replaces the matching ones with a trained run's
        (train.init_from.load_into; not when this run resumes from its own checkpoint);
        pruning and LoRA are applied on the host, then the state (a fresh optimizer state
        included) is built around them.
        """
        if not self.changes_initial_params:
            return init_state, ()
        plain = jax.jit(plain_init)()
        params, model_state = plain.params, plain.model_state
        pretrained = None
        if self.init_from is not None and not resuming:
            pretrained = init_from_lib.load_into(self.init_from, params, model_state)
        params, model_state, masks = self.prepare(params, model_state, pretrained,
                                                  jax.random.fold_in(init_key, 1))

        def compressed_init(params, model_state, masks):
            return plain.replace(params=params, model_state=model_state,
                                 opt_state=self.init_opt_state(base_tx, tx, params, masks))
        # Host copies: the jitted init places them with the state's shardings (any mesh).
        return compressed_init, jax.device_get((params, model_state, masks))

    # -- export ----------------------------------------------------------------------------
    def export(self, params) -> tuple[Any, Any, dict]:
        """(stored tree, decode fn (jittable) stored -> float params, stats).

        stats: float_bytes (the float32 model), bytes (the stored form), sparsity, ...
        """
        q, p = self.q, self.p
        if self.lo.rank:
            float_params = lora.merge(params["base"], params["lora"], self.lo.alpha)
        else:
            float_params = params
        stats = {"float_bytes": quantize.tree_nbytes(float_params)}
        if self.lo.rank:
            stats["lora_params"] = lora.lora_param_count(params["lora"])
            if q.mode == "ptq":   # QLoRA: integer base + float adapters
                stored = {"base": quantize.quantize_tree(params["base"], q.bits, q.symmetric,
                                                         q.per_channel, self.emb),
                          "lora": params["lora"]}
                alpha = self.lo.alpha

                def decode(s):
                    return lora.apply_lora(quantize.dequantize_tree(s["base"]), s["lora"],
                                           alpha)
                stats["bytes"] = quantize.tree_nbytes(stored)
                stats["fraction_of_float"] = stats["bytes"] / stats["float_bytes"]
                return stored, decode, stats
            stats["bytes"], stats["fraction_of_float"] = stats["float_bytes"], 1.0
            return float_params, lambda s: s, stats
        stored, decode = float_params, (lambda s: s)
        stats["bytes"] = stats["float_bytes"]
        if q.mode in ("ptq", "qat"):
            stored = quantize.quantize_tree(float_params, q.bits, q.symmetric, q.per_channel,
                                            self.emb)
            decode = quantize.dequantize_tree
            stats["bytes"] = quantize.tree_nbytes(stored)
        elif q.mode == "cluster":
            stored = cluster.cluster_tree(float_params, q.bits, include_embeddings=self.emb)
            decode = quantize.dequantize_tree
            stats["bytes"] = quantize.tree_nbytes(stored)
            stats["huffman_bytes"] = cluster.tree_huffman_nbytes(stored)
        if p.method != "none":
            report = prune.sparsity_report(float_params, include_embeddings=self.emb)
            stats["sparsity"] = report.sparsity
            n_m = (p.n, p.m) if p.method == "n_m" else None
            sparse = prune.sparse_nbytes(prune.to_sparse(jax.device_get(float_params),
                                                         n_m=n_m))
            stats["sparse_bytes"] = sparse
            stats["bytes"] = min(stats["bytes"], sparse)
        stats["fraction_of_float"] = stats["bytes"] / stats["float_bytes"]
        return stored, decode, stats


class CompressedTask(Task):
    """The wrapped task with its loss applied to `forward(params)` (adapted / fake-quantized
    kernels); every other hook is the wrapped task's. `uncompressed` is the wrapped task:
    evaluators and the export are evaluated through it, with model-form params."""

    def __init__(self, task: Task, forward):
        super().__init__(task.config, task.model, task.data)
        self.uncompressed, self._forward = task, forward
        self.needs_step, self.needs_frozen = task.needs_step, task.needs_frozen

    def init_args(self, batch):
        return self.uncompressed.init_args(batch)

    def loss_fn(self, params, model_state, batch, rng, train, **step_kwargs):
        return self.uncompressed.loss_fn(self._forward(params), model_state, batch, rng,
                                         train, **step_kwargs)

    def derived_metrics(self, means):
        return self.uncompressed.derived_metrics(means)

    def report(self, params, model_state, workdir):
        return self.uncompressed.report(self._forward(params), model_state, workdir)

    def model_params(self, params):
        return self._forward(params)

    def after_evaluation(self, step, params, model_state, workdir):
        self.uncompressed.after_evaluation(step, self._forward(params), model_state, workdir)

    def make_optimizer(self, optim_cfg, num_steps):
        return self.uncompressed.make_optimizer(optim_cfg, num_steps)

    def make_train_step(self, tx, train_key, optim_cfg):
        # The generic step around the compressed loss; validate() refuses compression of
        # tasks with their own (phased) step, which would bypass the transform.
        return Task.make_train_step(self, tx, train_key, optim_cfg)


def uncompressed_task(task: Task) -> Task:
    """The task without the training-time transform (itself when none was applied)."""
    return task.uncompressed if isinstance(task, CompressedTask) else task


def calibrate_activations(apply_fn, dataset, q: ml_collections.ConfigDict):
    """Static activation ranges from the first `q.calibration_batches` training batches;
    apply_fn(dot_general, batch) runs the forward pass with the recording dot_general."""
    batches = [dataset.batch(i) for i in range(q.calibration_batches)]
    return quant_matmul.calibrate(apply_fn, batches, q.calibration)


def summary_entries(stats: dict, metrics: dict) -> dict:
    """summary.json keys of the export: compressed/<split>/<metric>, bytes, fractions."""
    out = {f"compressed/{k}": v for k, v in metrics.items()}
    out.update({f"compressed/{k}": v for k, v in stats.items()})
    return out



def _shrunken(config, model, float_params, stats: dict, data, code):
    """Structured pruning's export: the physically smaller model without the removed heads
    / MLP units (models/compress/inherit.py shrink_pruned), which the export is then
    evaluated through; the masked model when the pruning removed other units (a log line
    says why). Adds stats shrunken_params and shrunken_bytes."""
    import copy  # noqa: PLC0415

    from models.compress import inherit  # noqa: PLC0415
    from train import families  # noqa: PLC0415

    try:
        small, fields = inherit.shrink_pruned(float_params, model.cfg)
    except (ValueError, KeyError) as e:
        logging.info("compressed model: not shrunk (%s); evaluated masked", e)
        return model, float_params, lambda s: s
    model_cfg = copy.deepcopy(config.model)
    for key, value in fields.items():
        if isinstance(value, dict):
            model_cfg[key].update(value)
        else:
            model_cfg[key] = value
    small_model, _ = families.build(model_cfg, config.task.name, **data.info, **code)
    stats["shrunken_params"] = inherit.count_params(small)
    stats["shrunken_bytes"] = quantize.tree_nbytes(small)
    stats["bytes"] = min(stats["bytes"], stats["shrunken_bytes"])
    stats["fraction_of_float"] = stats["bytes"] / stats["float_bytes"]
    logging.info("compressed model: shrunk to %s (%d parameters)", fields,
                 stats["shrunken_params"])
    return small_model, small, lambda s: s


def evaluate_export(compression: Compression, config, params, model_state, data,
                    evaluate) -> dict:
    """summary entries of the exported (quantized / pruned / merged) model, evaluated
    through itself: integers dequantized inside the jitted step, integer activation
    matmuls when `quantize.activations` is set. {} when compression is off.

    params: the trained state's params (host or device); evaluate(split, params,
    model_state, step_fn=...) -> {metric: mean}: the trainer's evaluation loop.
    """
    if not compression.enabled:
        return {}
    from train import families  # noqa: PLC0415 -- the model is rebuilt with export code
    from train.tasks import make_task  # noqa: PLC0415

    stored, decode, stats = compression.export(jax.device_get(params))
    code = compression.model_code(for_export=True)
    if config.compress.quantize.activations == "static":
        # Static activation ranges: a recording forward pass over a few training batches.
        float_params = decode(stored)

        def apply_fn(dot_general, batch):
            model, _ = families.build(config.model, config.task.name, **data.info,
                                      dot_general=dot_general)
            return make_task(config, model, data).loss_fn(
                float_params, model_state, batch, jax.random.key(0), False)[0]
        calibration = calibrate_activations(apply_fn, data["train"], config.compress.quantize)
        code = compression.model_code(for_export=True, calibration=calibration)
    model, _ = families.build(config.model, config.task.name, **data.info, **code)
    if config.compress.prune.method in ("neurons", "heads"):
        model, stored, decode = _shrunken(config, model, decode(stored), stats, data, code)
    inner = make_task(config, model, data)  # no training-time transform

    def compressed_eval_step(stored, model_state, batch, rng):
        _, (metrics, _) = inner.loss_fn(decode(stored), model_state, batch, rng, False)
        return metrics
    step_fn = jax.jit(compressed_eval_step)
    metrics = {f"{split}/{k}": v for split in ("validation", "test")
               for k, v in evaluate(split, stored, model_state, step_fn=step_fn).items()}
    logging.info("compressed model: %d bytes (%.1f%% of float32): %s", stats["bytes"],
                 100 * stats["fraction_of_float"],
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "loss" in k))
    return summary_entries(stats, metrics)
