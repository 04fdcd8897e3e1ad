"""Shared checks of the interop tests (tests/train/test_interop_*.py)."""
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest


def assert_trees_equal(a, b) -> None:
    """Same structure, every leaf bit-equal."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def convert_in_and_out(arch: str, checkpoint: str, tmp_path, params) -> str:
    """`python -m train.convert` from `checkpoint` into a workdir (whose params init_from
    loads bit-equal to `params`) and back out; the directory written back."""
    from train import convert, init_from  # noqa: PLC0415

    workdir, out = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "again")
    assert convert.run(["convert", "--from=hf", f"--arch={arch}", f"--checkpoint={checkpoint}",
                        f"--workdir={workdir}"]) == 0
    assert_trees_equal(params, init_from.load_variables(workdir)[0])
    assert convert.run(["convert", "--to=hf", f"--workdir={workdir}",
                        f"--checkpoint={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def interop():
    return SimpleNamespace(assert_trees_equal=assert_trees_equal,
                           convert_in_and_out=convert_in_and_out)
