"""Damage to a committed checkpoint step, as disks and kills do it (tests only)."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _array_files(step_dir):
    return [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
            for f in names if f"{os.sep}d{os.sep}" in os.path.join(root, f)]


def _flip(path, fraction: float) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[int(len(data) * fraction)] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)


def _raw_state(step_dir):
    with ocp.StandardCheckpointer() as reader:
        return jax.tree.leaves(reader.restore(os.path.join(step_dir, "state")))


def flip_a_bit(step_dir) -> None:
    """One bit flipped in array bytes such that orbax restores a wrong value without any
    complaint (the damage fingerprints exist for): the first place, in the data files
    largest first, at 10%, 20%, ... of each, where that happens (orbax keeps several data
    files, not all read, and damaged headers fail loudly)."""
    reference = _raw_state(step_dir)
    for path in sorted(_array_files(step_dir), key=os.path.getsize, reverse=True):
        for fraction in np.arange(1, 10) / 10:
            _flip(path, fraction)
            try:
                restored = _raw_state(step_dir)
                if any(not np.array_equal(a, b) for a, b in zip(reference, restored)):
                    return
            except Exception:  # noqa: BLE001 -- a loud failure is not the damage wanted
                pass
            _flip(path, fraction)  # undo
    raise AssertionError(f"no silently restored bit flip found in {step_dir}")


def truncate(step_dir) -> None:
    """Every array data file cut to 8 bytes (a full disk, a copy interrupted)."""
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(8)
