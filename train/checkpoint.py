"""Checkpoints for training runs: orbax CheckpointManager plus the guards a long run needs.

A checkpoint at step N is a directory `<directory>/<N>/` holding two orbax items:

  state: the trainer's pytree, e.g. {"step": int32[], "params": ..., "opt_state": ...,
         "model_state": ...}; optax namedtuple states round-trip because restoring
         fills the caller's template (which has the namedtuples) rather than
         rebuilding the tree from disk.
  meta:  a small JSON dict (early-stopping counters, best metric so far, data
         position, config hash).

Orbax writes each step into a temporary directory and renames it on commit, so a
crash mid-save never leaves a half-written step behind; what can still go wrong is a
damaged committed step (a flipped bit, deleted or truncated files, a step half-deleted
by a kill during orbax's cleanup of old steps), a checkpoint from a different model,
and a diverged (NaN) state. Each of those is a clear error here:

  save()    raises NonFiniteStateError if any floating leaf is NaN/Inf, before
            writing anything, so the previous good checkpoints stay the newest.
            Records a fingerprint of every array (two 32-bit sums of its bit
            pattern, computed on device: `fingerprints`) in `meta`.
  all_steps() lists only complete steps (every file restore reads is present).
  restore() compares the saved tree metadata (paths, shapes, dtypes) with the
            template first and raises CheckpointMismatchError naming every differing
            path: orbax itself would silently cast dtypes. Unreadable files and
            arrays whose fingerprint differs from the recorded one raise
            CorruptCheckpointError naming the step, directory and paths.
  restore_newest_intact()  the newest step that restores and verifies, with the
            steps it skipped and why: the caller (the trainer) logs them and moves
            them aside, never deleting them.

Usage in a trainer:

    ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3,
                        best_metric="validation/loss", best_mode="min")
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(template)      # template: initialized or abstract state
    with PreemptionGuard() as guard:          # train/preemption.py
        for step in ...:
            ...
            ckpt.save(step, state, meta, metrics=eval_metrics)   # no-op off save steps
            if guard.requested:
                ckpt.save(step, state, meta, force=True)
                break
    ckpt.close()
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from train import errors

log = logging.getLogger(__name__)


class _NoUnrankedSaveWarning(logging.Filter):
    """orbax warns on every save without metrics when best_fn is set; here that is by design
    (periodic saves between evaluations rank nothing and fall under keep-last-K)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoUnrankedSaveWarning())

PyTree = Any

_MAX_LISTED = 20  # differing paths listed in a mismatch error before "... and N more"
_FINGERPRINTS = "array_fingerprints"  # the key of meta that holds them


class NonFiniteStateError(errors.NonFiniteError, ValueError):
    """save() was given a state with NaN/Inf floating leaves; nothing was written."""


class CheckpointMismatchError(errors.CheckpointError, ValueError):
    """The saved checkpoint's tree (paths, shapes, dtypes) differs from the template's."""


class CorruptCheckpointError(errors.CheckpointError, RuntimeError):
    """A committed checkpoint step could not be read (missing or truncated files) or an
    array differs from the fingerprint recorded when it was saved."""


# Files every complete step has (orbax 0.12 layout): its checkpoint metadata, the state's
# tree metadata and the meta item. A step half-deleted by a kill during orbax's cleanup of
# old steps lacks some of them; missing array data is caught by restore + fingerprints.
_STEP_FILES = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"),
               os.path.join("meta", "metadata"))


def _path_str(path) -> str:
    """'params/decoder/layers_0/mlp/kernel' for a jax key path.

    Namedtuple fields (GetAttrKey) and the dict keys orbax stores them under print
    the same, so template and saved paths compare equal.
    """
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _flat(tree: PyTree) -> dict[str, Any]:
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """bool[len(leaves)]: whether every element of each leaf is finite (one transfer)."""
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _as_words(x: jax.Array) -> jax.Array:
    """x's bit pattern as a flat uint32 vector (one word per element of <= 32 bits, two
    for 64-bit elements); typed PRNG keys by their key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    return bits.reshape(-1).astype(jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> jax.Array:
    """uint32[len(leaves), 2]: per leaf, sum(w) and sum((2i+1) * w) mod 2**32 over its
    words w_i. Integer sums are exact in any reduction order (so on any mesh), any single
    flipped bit changes the first (by +-2**k), a swap of two words the second."""
    rows = []
    for x in leaves:
        w = _as_words(x)
        odd = 2 * jnp.arange(w.size, dtype=jnp.uint32) + 1
        rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                               jnp.sum(w * odd, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def fingerprints(state: PyTree) -> dict[str, list[int]]:
    """{path: [sum, weighted sum]} of every array leaf of `state` (computed on device;
    only 8 bytes a leaf come to the host)."""
    arrays = {p: x for p, x in _flat(state).items() if hasattr(x, "dtype")}
    values = np.asarray(jax.device_get(_fingerprint_leaves(
        [jnp.asarray(x) for x in arrays.values()])))
    return {p: [int(a), int(b)] for p, (a, b) in zip(arrays, values)}


def nonfinite_paths(state: PyTree) -> list[str]:
    """Paths of the floating leaves of `state` that contain a NaN or Inf."""
    floating = [(p, x) for p, x in _flat(state).items()
                if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floating:
        return []
    flags = np.asarray(jax.device_get(_finite_flags([x for _, x in floating])))
    return [p for (p, _), ok in zip(floating, flags) if not ok]


def _mismatches(saved: PyTree, template: PyTree) -> list[str]:
    """One line per path whose presence, shape or dtype differs; [] if compatible."""
    saved, model = _flat(saved), _flat(template)
    lines = [f"{p}: in checkpoint, missing from model" for p in sorted(saved.keys() - model)]
    lines += [f"{p}: in model, missing from checkpoint" for p in sorted(model.keys() - saved)]
    for p in sorted(saved.keys() & model.keys()):
        s_shape, m_shape = getattr(saved[p], "shape", None), getattr(model[p], "shape", None)
        if s_shape is not None and m_shape is not None and tuple(s_shape) != tuple(m_shape):
            lines.append(f"{p}: saved {tuple(s_shape)} vs model {tuple(m_shape)}")
            continue
        s_dtype, m_dtype = getattr(saved[p], "dtype", None), getattr(model[p], "dtype", None)
        if s_dtype is not None and m_dtype is not None and np.dtype(s_dtype) != np.dtype(m_dtype):
            lines.append(f"{p}: saved {np.dtype(s_dtype)} vs model {np.dtype(m_dtype)}")
    return lines


def _listing(lines: list[str], sep: str) -> str:
    """The first _MAX_LISTED lines joined by `sep`, then how many were left out."""
    more = [f"... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else []
    return sep.join(lines[:_MAX_LISTED] + more)


def _abstract(leaf):
    """Restore target for one template leaf: shape, dtype and the template's sharding.

    Leaves without a sharding (numpy arrays, ShapeDtypeStructs from a plain
    jax.eval_shape) land on the default device.
    """
    if not hasattr(leaf, "shape"):
        return leaf
    sharding = (getattr(leaf, "sharding", None)
                or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `keep` steps plus the best one.

    Args:
      directory: where step directories go (local path or any path orbax accepts).
      save_every: save() without force writes only when step % save_every == 0.
      keep: number of most recent checkpoints to keep.
      best_metric: key in the `metrics` passed to save() that ranks checkpoints; the
        best one is kept in addition to the last `keep`, however old. None: no best.
      best_mode: "min" or "max": which end of `best_metric` is best.
    """

    def __init__(self, directory: str | os.PathLike, save_every: int, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "min"):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        directory = os.fspath(directory)
        # orbax wants absolute paths; leave remote ones (gs://...) alone.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.best_metric = best_metric

        # One manager and orbax's own preservation policies (LatestN OR BestN), both
        # present with identical code in orbax-checkpoint 0.12.4 and 0.12.8. Because
        # retention is a per-step union, the best step needs no copy or second
        # directory, and survives any number of newer saves. `best_fn` is also set
        # because orbax only writes the `metrics` item (which BestN reads back after a
        # restart) and only answers best_step() when best_fn is set.
        # keep_checkpoints_without_metrics=False: periodic saves without metrics must
        # fall under LatestN, not be kept forever by BestN.
        preserve: list[Any] = [policies.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
            # BestN keeps the top of an ascending sort; reverse it when lower is better.
            preserve.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                           n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # Fixed interval only: orbax's default also saves the first step of a fresh
            # run, which would make should_save() depend on the directory's history. The
            # step a preemption stops at is the trainer's to save (force=True), as its
            # PreemptionGuard (train/preemption.py) decides, on one host or on many.
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            best_fn=best_fn,
            best_mode=best_mode,
            # The directory appears with the first save: opening a workdir to look at
            # its checkpoints (a refused start included) writes nothing.
            create=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            # Handlers up front so a fresh manager can read metadata before any save.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    # -- queries ---------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed, complete steps on disk, ascending (not a step half-deleted by a
        kill during orbax's cleanup: it lacks files every restore reads)."""
        return sorted(s for s in self._manager.all_steps() if self._complete(s))

    def _complete(self, step: int) -> bool:
        if "://" in self.directory:  # remote storage: trust orbax's commit protocol
            return True
        root = os.path.join(self.directory, str(step))
        return all(os.path.exists(os.path.join(root, f)) for f in _STEP_FILES)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """Step with the best `best_metric`; None without best_metric or metrics."""
        return None if self.best_metric is None else self._manager.best_step()

    def should_save(self, step: int) -> bool:
        """True on save_every multiples after the latest step."""
        return self._manager.should_save(step)

    # -- save / restore --------------------------------------------------------------

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None,
             metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; True if one started.

        Without force, saves only when should_save(step). A step that is already on
        disk is skipped (False): a preemption save right after a periodic one is a
        no-op. `metrics` (scalars) must contain `best_metric` when it is set; a
        non-finite value cannot rank, so that step is saved without metrics (kept
        only while among the last `keep`).

        Raises:
          NonFiniteStateError: a floating leaf of `state` is NaN/Inf. Nothing is
            written, so earlier checkpoints remain the newest. The trainer should have
            stopped earlier; this is the last line of defense.
          ValueError: `meta` is not JSON-serializable, or `metrics` lacks best_metric.
        """
        if step in self._manager.all_steps():
            log.info("Checkpoint for step %d already exists in %s; not saving again.",
                     step, self.directory)
            return False
        if not force and not self.should_save(step):
            return False
        bad = nonfinite_paths(state)
        if bad:
            raise NonFiniteStateError(
                f"Refusing to save step {step} to {self.directory}: non-finite values in "
                f"{len(bad)} leaves: {_listing(bad, sep=', ')}. Earlier checkpoints "
                f"are untouched (latest: {self.latest_step()}).")
        meta = dict(meta or {})
        try:
            json.dumps(meta)  # fail here, not in orbax's background write thread
        except TypeError as e:
            raise ValueError(f"meta must be JSON-serializable: {e}") from e
        meta[_FINGERPRINTS] = fingerprints(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, metrics=self._ranking_metrics(step, metrics),
                                  force=force)

    def _ranking_metrics(self, step: int, metrics: Mapping[str, Any] | None):
        """The JSON metrics orbax stores for BestN, or None if this step cannot rank."""
        if self.best_metric is None or metrics is None:
            return None
        if self.best_metric not in metrics:
            raise ValueError(f"metrics for step {step} lack best_metric "
                             f"{self.best_metric!r}; got {sorted(metrics)}")
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics[self.best_metric]):
            log.warning("Step %d: %s=%s cannot rank; saving it without metrics.",
                        step, self.best_metric, metrics[self.best_metric])
            return None
        return metrics

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores (state, meta) at `step` (default: latest) into `template`'s structure.

        Args:
          template: the trainer's state, initialized or abstract (jax.eval_shape /
            ShapeDtypeStruct leaves). Its tree structure (optax namedtuples included),
            shapes, dtypes and shardings are what come back; leaves without a
            sharding go to the default device.
          step: which step; None means latest_step().

        Raises:
          FileNotFoundError: no checkpoint at all, or none for `step`.
          CheckpointMismatchError: saved paths/shapes/dtypes differ from the template.
          CorruptCheckpointError: the step's files are missing or unreadable.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
        if step is None or step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        saved = self._saved_state_metadata(step, steps)
        diffs = _mismatches(saved, template)
        if diffs:
            listing = _listing(diffs, sep="\n  ")
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit the model "
                f"({len(diffs)} differences; it belongs to a different model: use a fresh "
                f"workdir or the config that wrote it):\n  {listing}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(_abstract, template)),
            meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore/IO errors come in many types
            raise self._corrupt(step, steps, e) from e
        meta = dict(restored["meta"] or {})
        self._verify(step, steps, restored["state"], meta.pop(_FINGERPRINTS, None))
        return restored["state"], meta

    def restore_newest_intact(self, template: PyTree, step: int | None = None
                              ) -> tuple[PyTree, dict, int, list[tuple[int, str]]]:
        """(state, meta, step, skipped): the newest complete step that restores and
        verifies (or exactly `step` when given), and [(step, why)] of the newer ones that
        did not. Raises CorruptCheckpointError when no step is intact (or `step` is not),
        CheckpointMismatchError at once for a checkpoint of another model (older steps
        would not fit either), FileNotFoundError when there is no checkpoint."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise errors.CheckpointError(
                    f"checkpoint.restore_step={step}: no complete checkpoint of that step "
                    f"in {self.directory}; available steps: {steps}")
            state, meta = self.restore(template, step)
            return state, meta, step, []
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        skipped = []
        for candidate in reversed(steps):
            try:
                state, meta = self.restore(template, candidate)
                return state, meta, candidate, skipped
            except CorruptCheckpointError as e:
                skipped.append((candidate, errors.first_line(e)))
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in skipped))

    def _verify(self, step: int, steps: list[int], state: PyTree, recorded) -> None:
        """CorruptCheckpointError unless every array matches its recorded fingerprint."""
        if recorded is None:  # written before fingerprints existed: nothing to compare
            log.warning("checkpoint step %d in %s has no fingerprints; not verified",
                        step, self.directory)
            return
        actual = fingerprints(state)
        bad = sorted(p for p in actual if recorded.get(p) != actual[p])
        if bad:
            raise self._corrupt(step, steps, f"{len(bad)} arrays differ from the "
                                f"fingerprints recorded at save: {_listing(bad, ', ')}")

    def restore_raw(self, step: int | None = None) -> PyTree:
        """The state at `step` (default latest) as saved, without a template: nested
        dicts/lists of arrays on the default device (optimizer namedtuples come back as
        containers). For reading another run's params (train/compression.py)."""
        steps = self.all_steps()
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        template = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            self._saved_state_metadata(step, steps),
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                  meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore/IO errors come in many types
            raise self._corrupt(step, steps, e) from e
        self._verify(step, steps, restored["state"],
                     dict(restored["meta"] or {}).get(_FINGERPRINTS))
        return restored["state"]

    def _saved_state_metadata(self, step: int, steps: list[int]) -> PyTree:
        """The saved state's tree of ArrayMetadata (shape, dtype); never loads arrays."""
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise self._corrupt(step, steps, e) from e
        if metadata is None:  # orbax returns None when the tree metadata file is gone
            raise self._corrupt(step, steps, "its tree metadata (state/_METADATA) is missing")
        return getattr(metadata, "tree", metadata)  # TreeMetadata wraps the plain tree

    def _corrupt(self, step: int, steps: list[int], cause) -> CorruptCheckpointError:
        if isinstance(cause, Exception):  # tensorstore messages run to many lines
            cause = f"{type(cause).__name__}: {errors.first_line(cause, 200)}"
        return CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupt or incomplete ({cause}); "
            f"available steps: {steps}")

    # -- lifecycle -------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the steps on disk (after step directories were moved aside)."""
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until background saves are committed (and old steps deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
