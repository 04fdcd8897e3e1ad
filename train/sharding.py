"""Device mesh, data parallelism and FSDP with jax.sharding (no pmap, no manual collectives).

The mesh has two named axes, shape (data, fsdp):

  batch:  split over both axes, so every device sees different examples
          (batch_sharding, shard_batch).
  params: "replicate" copies every parameter to every device (pure data parallel);
          "fsdp" splits each large parameter along one axis over the `fsdp` devices and
          replicates it over `data` (param_sharding).

jit with these in/out shardings does the rest: XLA inserts the all-gathers of FSDP
parameters and the gradient reductions. Optimizer states have the parameters' shapes,
so param_sharding(opt_state, ...) shards them the same way.

    mesh = make_mesh(data=-1, fsdp=4)
    p_sh = param_sharding(jax.eval_shape(init, rng), mesh, "fsdp")
    params = jax.jit(init, out_shardings=p_sh)(rng)
    step = jax.jit(train_step, in_shardings=(p_sh, batch_sharding(mesh)), ...)
    step(params, shard_batch(host_batch, mesh))
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

AXES = ("data", "fsdp")
STRATEGIES = ("replicate", "fsdp")


def default_config() -> ml_collections.ConfigDict:
    """Sharding section of a training config.

    data: devices along the data axis; -1 means all devices not used by fsdp.
    fsdp: devices each large parameter is split over (1: no parameter sharding).
    strategy: "replicate" or "fsdp" (see param_sharding).
    min_size_to_shard: parameters with fewer elements stay replicated under "fsdp".
    num_devices: use the first N devices; 0 means all of jax.devices().
    """
    return ml_collections.ConfigDict({
        "num_devices": 0,
        "data": -1,
        "fsdp": 1,
        "strategy": "replicate",
        # 16K elements (64 KiB in f32): below this, gathering a parameter every step
        # costs more latency than the memory it saves.
        "min_size_to_shard": 2**14,
    })


def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) with a -1 replaced by the remaining device count.

    Raises:
      ValueError: sizes are not positive (or -1 on one axis), or their product is not
        `num_devices`.
    """
    if data == -1 and fsdp == -1:
        raise ValueError("At most one of data and fsdp can be -1")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size != -1 and size < 1:
            raise ValueError(f"Mesh axis {name} must be >= 1 or -1, got {size}")
    known = fsdp if data == -1 else data
    if -1 in (data, fsdp):
        if num_devices % known:
            raise ValueError(f"Mesh data={data} x fsdp={fsdp}: {num_devices} devices are not "
                             f"divisible by {known}")
        data, fsdp = (num_devices // fsdp, fsdp) if data == -1 else (data, num_devices // data)
    if data * fsdp != num_devices:
        raise ValueError(f"Mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                         f"but {num_devices} devices are available")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all of jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, len(devices))
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU). Auto
    # axes (its default is Explicit) let jit's in/out shardings drive propagation, so
    # model code needs no sharding-in-types annotations.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def devices_for(sharding_cfg: ml_collections.ConfigDict) -> list[jax.Device]:
    """The devices a run uses: the first `num_devices` (0 = all)."""
    devices = jax.devices()
    n = sharding_cfg.num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"sharding.num_devices={sharding_cfg.num_devices} must be between 1 "
                         f"and the {len(devices)} available devices (0 = all)")
    return devices[:n]


def mesh_from_config(sharding_cfg: ml_collections.ConfigDict) -> Mesh:
    return make_mesh(sharding_cfg.data, sharding_cfg.fsdp, devices_for(sharding_cfg))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all devices: ('data', 'fsdp'); other axes whole."""
    return NamedSharding(mesh, P(AXES))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a host batch (dict of np arrays [batch, ...]) as global jax.Arrays.

    Single process: the host batch is the global batch. (Multi-host input would use
    jax.make_array_from_process_local_data, each host holding its slice.)

    Raises:
      ValueError: a leading dimension is not divisible by the device count.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % mesh.size:
            raise ValueError(f"Global batch_size {x.shape[0] if x.ndim else 'of a scalar'} is not "
                             f"divisible by the {mesh.size} devices of the mesh {dict(mesh.shape)}")
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size_to_shard: int) -> P:
    """Spec splitting the largest axis divisible by fsdp_size; P() when none or too small.

    Ties go to the first such axis. The spec has one entry per dimension.
    """
    if fsdp_size == 1 or math.prod(shape) < min_size_to_shard:
        return P()
    candidates = [axis for axis, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return P(*("fsdp" if a == axis else None for a in range(len(shape))))


def param_sharding(params: PyTree, mesh: Mesh, strategy: str = "replicate",
                   min_size_to_shard: int = 2**14) -> PyTree:
    """A NamedSharding per leaf of `params` (arrays or jax.ShapeDtypeStructs).

    "replicate": P() everywhere. "fsdp": each leaf with >= min_size_to_shard elements
    is split along its largest axis divisible by the fsdp axis size, e.g. a (64, 512)
    kernel on fsdp=4 gets P(None, 'fsdp'); small or indivisible leaves stay P().
    Works for optimizer states too (they share the parameters' shapes).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    fsdp_size = mesh.shape["fsdp"] if strategy == "fsdp" else 1
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp_size, min_size_to_shard)),
        params)


def validate(sharding_cfg: ml_collections.ConfigDict, global_batch_size: int,
             num_devices: int | None = None) -> tuple[int, int]:
    """Checks a sharding config before anything is built; returns the (data, fsdp) shape.

    Raises:
      ValueError: unknown strategy, mesh not matching num_devices, or a global batch
        that does not split evenly over the devices.
    """
    if sharding_cfg.strategy not in STRATEGIES:
        raise ValueError(f"sharding.strategy must be one of {STRATEGIES}, "
                         f"got {sharding_cfg.strategy!r}")
    if sharding_cfg.min_size_to_shard < 0:
        raise ValueError(f"sharding.min_size_to_shard must be >= 0, "
                         f"got {sharding_cfg.min_size_to_shard}")
    if num_devices is None:
        num_devices = len(devices_for(sharding_cfg))
    shape = resolve_mesh_shape(sharding_cfg.data, sharding_cfg.fsdp, num_devices)
    if global_batch_size % num_devices:
        raise ValueError(f"data.batch_size={global_batch_size} is not divisible by the "
                         f"{num_devices} devices the batch is split over (set data.batch_size "
                         "or sharding.num_devices)")
    return shape
