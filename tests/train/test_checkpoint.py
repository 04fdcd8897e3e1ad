"""Checkpointer and PreemptionGuard: round trips, retention, and every refusal path."""
import importlib.util
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import checkpoint as ckpt_lib
from train.checkpoint import (CheckpointMismatchError, Checkpointer, CorruptCheckpointError,
                              NonFiniteStateError)
from train.preemption import PreemptionGuard
from train.sharding import make_mesh, param_sharding

_spec = importlib.util.spec_from_file_location(
    "damage", os.path.join(os.path.dirname(os.path.abspath(__file__)), "toys", "damage.py"))
damage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(damage)


def make_state(hidden=32, seed=0):
    """A trainer-like state: int32 step, params, an adam state (namedtuples), model_state."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"decoder": {"layers_0": {"mlp": {
        "kernel": jax.random.normal(k1, (16, hidden)),
        "bias": jax.random.normal(k2, (hidden,)).astype(jnp.bfloat16)}}}}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are not all zeros.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {"step": jnp.int32(7), "params": params, "opt_state": opt_state,
            "model_state": {"batch_stats": {"mean": jnp.arange(4.0)}}}


def steps_on_disk(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def save_now(ckpt, step, state, **kwargs):
    assert ckpt.save(step, state, **kwargs)
    ckpt.wait_until_finished()


def test_round_trip_is_bit_exact_and_keeps_structure(tmp_path):
    state = make_state()
    meta = {"best_loss": 0.25, "patience": 2, "data_position": [3, 128], "config_hash": "ab12"}
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        save_now(ckpt, 10, state, meta=meta)
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        template = jax.eval_shape(make_state)   # abstract template, as the trainer builds
        restored, restored_meta = ckpt.restore(template)
    assert restored_meta == meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # adam namedtuples
    assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bit-exact, NaN-safe


def test_restore_uses_template_sharding(tmp_path):
    state = make_state()
    mesh = make_mesh(data=2, fsdp=4)
    shardings = param_sharding(state, mesh, strategy="fsdp", min_size_to_shard=64)
    sharded = jax.device_put(state, shardings)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save_now(ckpt, 1, sharded)
        restored, _ = ckpt.restore(sharded)
    kernel = restored["params"]["decoder"]["layers_0"]["mlp"]["kernel"]
    assert kernel.sharding == shardings["params"]["decoder"]["layers_0"]["mlp"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(kernel, state["params"]["decoder"]["layers_0"]["mlp"]["kernel"])


def test_keeps_last_k_plus_best(tmp_path):
    state = make_state()
    ckpt = Checkpointer(tmp_path, save_every=10, keep=2, best_metric="validation/loss",
                        best_mode="min")
    losses = {10: 0.9, 20: 0.3, 30: 0.5, 40: 0.6, 50: 0.7}
    for step, loss in losses.items():
        assert not ckpt.should_save(step + 1)
        save_now(ckpt, step, state, metrics={"validation/loss": loss, "train/loss": loss})
    save_now(ckpt, 60, state)  # a periodic save without metrics falls under keep-last-K only
    assert steps_on_disk(tmp_path) == [20, 50, 60]
    assert ckpt.best_step() == 20 and ckpt.latest_step() == 60
    ckpt.close()

    # Reopened: metrics are read back from disk, so best survives further saves.
    ckpt = Checkpointer(tmp_path, save_every=10, keep=2, best_metric="validation/loss",
                        best_mode="min")
    assert ckpt.latest_step() == 60 and ckpt.best_step() == 20
    save_now(ckpt, 70, state, metrics={"validation/loss": 0.8})
    assert steps_on_disk(tmp_path) == [20, 60, 70]
    with pytest.raises(ValueError, match="validation/loss"):
        ckpt.save(80, state, metrics={"validation/acc": 1.0})
    ckpt.close()


def test_best_mode_max(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, keep=1, best_metric="acc",
                      best_mode="max") as ckpt:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
            save_now(ckpt, step, state, metrics={"acc": acc})
        assert ckpt.best_step() == 2
    assert steps_on_disk(tmp_path) == [2, 4]


def test_refuses_nan_state_and_keeps_previous(tmp_path):
    state = make_state()
    ckpt = Checkpointer(tmp_path, save_every=10, keep=1)
    save_now(ckpt, 10, state, meta={"good": True})
    bad = jax.tree.map(lambda x: x, state)
    bad["params"]["decoder"]["layers_0"]["mlp"]["kernel"] = jnp.full((16, 32), jnp.nan)
    with pytest.raises(NonFiniteStateError, match="params/decoder/layers_0/mlp/kernel"):
        ckpt.save(20, bad, meta={"good": False})
    ckpt.wait_until_finished()
    assert steps_on_disk(tmp_path) == [10] and ckpt.latest_step() == 10
    restored, meta = ckpt.restore(state)
    assert meta == {"good": True}
    np.testing.assert_array_equal(restored["params"]["decoder"]["layers_0"]["mlp"]["kernel"],
                                  state["params"]["decoder"]["layers_0"]["mlp"]["kernel"])
    ckpt.close()


def test_save_schedule_and_duplicate_step(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        assert not ckpt.save(3, state)          # off schedule
        assert ckpt.save(3, state, force=True)  # e.g. preemption
        ckpt.wait_until_finished()
        assert not ckpt.save(3, state, force=True)  # already on disk: no-op, no error
        assert not ckpt.should_save(4) and ckpt.should_save(5)
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(5, state, meta={"array": np.zeros(2)})
    assert steps_on_disk(tmp_path) == [3]


def test_shape_mismatch_names_path(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save_now(ckpt, 1, make_state(hidden=32))
        template = jax.eval_shape(lambda: make_state(hidden=64))
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(template)
    message = str(err.value)
    assert "params/decoder/layers_0/mlp/kernel: saved (16, 32) vs model (16, 64)" in message
    assert "opt_state/0/mu/decoder/layers_0/mlp/kernel: saved (16, 32)" in message
    assert "different model" in message


def test_structure_and_dtype_mismatch_names_paths(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save_now(ckpt, 1, make_state())
        template = jax.eval_shape(make_state)
        template["params"]["decoder"]["layers_0"]["mlp"]["scale"] = template["step"]
        del template["model_state"]["batch_stats"]
        template["step"] = jax.ShapeDtypeStruct((), jnp.int64 if jax.config.jax_enable_x64
                                                else jnp.int16)
        with pytest.raises(ValueError) as err:  # CheckpointMismatchError is a ValueError
            ckpt.restore(template)
    message = str(err.value)
    assert "params/decoder/layers_0/mlp/scale: in model, missing from checkpoint" in message
    assert "model_state/batch_stats/mean: in checkpoint, missing from model" in message
    assert "step: saved int32 vs model int16" in message


# When one tensorstore read fails, reads still in flight may complete after orbax has
# closed its asyncio loop; asyncio reports that as an unraisable "Event loop is closed".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_names_step_and_directory(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save_now(ckpt, 1, state)
        save_now(ckpt, 2, state)
    data_dir = tmp_path / "2" / "state" / "d"
    for name in os.listdir(data_dir):  # truncate the array data files
        with open(data_dir / name, "r+b") as f:
            f.truncate(8)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CorruptCheckpointError) as err:
            ckpt.restore(state)
        assert f"step 2 in {tmp_path}" in str(err.value)
        assert len(str(err.value).splitlines()) == 1  # tensorstore's message cut to a line
        restored, _ = ckpt.restore(state, step=1)  # restore() never falls back by itself
        assert int(restored["step"]) == 7
        os.remove(tmp_path / "1" / "state" / "_METADATA")
        assert ckpt.all_steps() == [2]  # an incomplete step is not listed
        with pytest.raises(FileNotFoundError, match="available steps: \\[2\\]"):
            ckpt.restore(state, step=1)


def test_latest_step_after_reopen(tmp_path):
    state = make_state()
    assert Checkpointer(tmp_path, save_every=2).latest_step() is None
    with Checkpointer(tmp_path, save_every=2, keep=5) as ckpt:
        for step in range(1, 7):
            ckpt.save(step, state)
    reopened = Checkpointer(tmp_path, save_every=2, keep=5)
    assert reopened.latest_step() == 6 and reopened.all_steps() == [2, 4, 6]
    assert reopened.best_step() is None  # no best_metric configured
    assert not reopened.should_save(6) and reopened.should_save(8)
    reopened.close()


def test_preemption_guard_sets_flag_and_restores_handlers():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run inside the guard")

    old_term = signal.signal(signal.SIGTERM, previous)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.signal_received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is old_int
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_preemption_guard_second_sigint_interrupts():
    old_int = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.requested and guard.signal_received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice still stops a stuck run
    assert signal.getsignal(signal.SIGINT) is old_int


def _big_state(value):
    return {"step": jnp.asarray(value, jnp.int32),
            "w": jnp.arange(1000, dtype=jnp.float32) / 7 + value,
            "h": jnp.ones((4, 3), jnp.bfloat16), "mask": jnp.arange(5) > 2,
            "q": jnp.arange(6, dtype=jnp.int8)}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flipped_bit_is_detected_and_the_newest_intact_step_restored(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (1, 2, 3):
            save_now(ckpt, step, _big_state(step))
    damage.flip_a_bit(tmp_path / "3")
    with open(tmp_path / "2" / "state" / "manifest.ocdbt", "r+b") as f:
        f.truncate(10)  # step 2: a truncated file
    template = _big_state(0)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CorruptCheckpointError, match="1 arrays differ from the "
                           "fingerprints recorded at save: w"):
            ckpt.restore(template)  # not silently restored
        state, meta, step, skipped = ckpt.restore_newest_intact(template)
        assert step == 1 and [s for s, _ in skipped] == [3, 2]
        assert "fingerprints" in skipped[0][1] and "corrupt" in skipped[1][1]
        np.testing.assert_array_equal(state["w"], _big_state(1)["w"])
        assert "array_fingerprints" not in meta
        with pytest.raises(CorruptCheckpointError, match="step 3"):
            ckpt.restore_newest_intact(template, step=3)  # an explicit step is that step
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # nothing deleted


def test_fingerprints_see_every_bit_of_every_dtype():
    state = _big_state(1)
    base = ckpt_lib.fingerprints(state)
    assert set(base) == {"step", "w", "h", "mask", "q"}
    for path, flipped in [("w", state["w"].at[500].set(jnp.nextafter(state["w"][500], 1e9))),
                          ("h", state["h"].at[0, 0].set(1.0078125)),  # the last bf16 bit
                          ("mask", ~state["mask"]), ("q", state["q"].at[0].set(1)),
                          ("w", state["w"][::-1])]:  # a permutation: the weighted sum
        changed = ckpt_lib.fingerprints({**state, path: flipped})
        assert changed[path] != base[path]
        assert all(changed[p] == base[p] for p in base if p != path)


def test_a_new_checkpointer_writes_nothing_until_it_saves(tmp_path):
    with Checkpointer(tmp_path / "ckpts", save_every=1) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert not (tmp_path / "ckpts").exists()
