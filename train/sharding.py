"""Device mesh: data parallelism, FSDP, tensor and expert parallelism with jax.sharding
(no pmap; manual collectives only in the MoE's shard_map).

The mesh has two named axes, shape (data, fsdp), then `expert` when sharding.expert > 1
and `model` when sharding.model > 1, in that order (the last axis is the most local one:
jax.make_mesh keeps it within a host, where tensor parallelism's per-layer collectives
belong):

  batch:  split over data, fsdp and expert, so those devices see different examples;
          the `model` devices of one group see the same ones (batch_sharding,
          shard_batch). In a multi-process run each process builds only the rows its
          devices hold (process_rows) and the global batch is assembled from them.
  params: "replicate" copies every parameter to every device of the data axes (pure data
          parallel); "fsdp" splits each large parameter along one axis over the `fsdp`
          devices and replicates it over `data`.
  tensor: the `model` axis splits attention heads and the MLP hidden units (and the
          vocabulary) of every layer, Megatron style (Shoeybi et al. 2019): the QKV and
          first MLP kernels by columns, the output and second MLP kernels by rows, so
          each sublayer (attention, MLP) needs one all-reduce of its output forward and
          one of its input's gradient backward. The rules do it: ("heads", "model"), ("mlp", "model"), ("vocab", "model") and the
          matching activation names; jit's propagation inserts the all-reduces.
  experts: a mixture of experts' expert axis is split over `expert` (expert parallelism,
          GShard): each device holds num_experts / expert experts, and the MoE layer
          exchanges token slots with all-to-alls inside shard_map (models/layers/moe.py).

Which axis is split comes from logical axis names (GSPMD, Xu et al. 2021): the models
name every kernel's axes (("embed", "mlp"), ...; models/layers/partitioning.py) and
`sharding.rules` maps names to mesh axes, e.g. ("embed", "fsdp"), ("batch", ("data",
"fsdp")). `state_sharding` gives every leaf of the train state (params, optimizer moments,
pruning masks, LoRA base weights: anything that mirrors a parameter by path and shape) the
sharding of its parameter; leaves without names (families not annotated, batch_stats,
LoRA adapters, counters) keep the shape rule of `param_sharding`: the largest axis
divisible by the fsdp size. `use_rules` makes the models' activation constraints live.

jit with these in/out shardings does the rest: XLA inserts the all-gathers of FSDP
parameters and the gradient reductions.

    mesh = mesh_from_config(cfg)
    boxed = jax.eval_shape(model.init, rng, x)["params"]        # nn.LogicallyPartitioned
    init = lambda: nn.unbox(model.init(rng, x))["params"]       # plain arrays
    p_sh = state_sharding(jax.eval_shape(init), mesh, cfg, boxed)
    params = jax.jit(init, out_shardings=p_sh)()
    step = jax.jit(train_step, in_shardings=(p_sh, batch_sharding(mesh)), ...)
    with use_rules(mesh, cfg):
        params = step(params, shard_batch(host_batch, mesh))

Default rules versus the shape rule they replace (DEFAULT_RULES): every annotated kernel
and table is split along its model-width axis "embed" (falling back to mlp, heads, kv,
vocab, ... when d_model does not divide), where the shape rule took the largest divisible
axis (the vocabulary of an embedding table, the hidden axis of an MLP kernel). The bytes
per device and the all-gather volume are the same; the layout is the same for every
kernel, which is what the `model` axis on mlp/heads/vocab composes with (fc1 of a
data x fsdp x model mesh: P("fsdp", "model")). Leaves below min_size_to_shard stay
replicated over the data-parallel axes either way, and activations are pinned along
their batch axis and, with a `model` axis, their heads / mlp / vocab axis.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.layers import partitioning

PyTree = Any

AXES = ("data", "fsdp", "expert", "model")
DATA_AXES = ("data", "fsdp")   # the axes a parameter is replicated over under "replicate"
BATCH_AXES = ("data", "fsdp", "expert")  # the axes that split a batch's examples
STRATEGIES = ("replicate", "fsdp")

# [logical name, mesh axes] in priority order (first applicable rule wins; a mesh axis
# splits one dimension per array; rules that do not divide a dimension are skipped).
# Examples over data x fsdp x expert; tensor parallelism first: a kernel's heads / mlp /
# vocab axis goes to "model" (when the mesh has one), its embed axis to "fsdp".
DEFAULT_RULES = (
    ("expert", "expert"),
    ("batch", BATCH_AXES),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("activation_heads", "model"),
    ("activation_mlp", "model"),
    ("activation_vocab", "model"),
    # Token tables by row: a lookup in a table split along embed would come out split
    # along embed and need an all-to-all back to the batch layout.
    ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("qkv", "fsdp"),
    ("kv", "fsdp"),
    ("position", "fsdp"),
    ("classes", "fsdp"),
    ("conv_in", "fsdp"),
    ("conv_out", "fsdp"),
)


def default_config() -> ml_collections.ConfigDict:
    """Sharding section of a training config.

    data: devices along the data axis; -1 means all devices not used by fsdp.
    fsdp: devices each large parameter is split over (1: no parameter sharding).
    expert: devices a mixture of experts' experts are split over (1: every device holds
      every expert).
    model: devices each layer's heads and MLP units are split over (tensor parallelism;
      1: none); the mesh is data x fsdp [x expert] [x model], data x fsdp covering
      num_devices / (expert * model).
    strategy: "replicate" (parameters on every device) or "fsdp" (parameters split as
      `rules` say; leaves without logical names: see param_sharding).
    min_size_to_shard: parameters with fewer elements stay replicated under "fsdp".
    num_devices: use the first N devices; 0 means all of jax.devices().
    rules: [logical_name, mesh_axis | [mesh_axes] | None] pairs in priority order, for
      parameters and activations (module docstring); default DEFAULT_RULES.
    """
    return ml_collections.ConfigDict({
        "num_devices": 0,
        "data": -1,
        "fsdp": 1,
        "expert": 1,
        "model": 1,
        "strategy": "replicate",
        # 16K elements (64 KiB in f32): below this, gathering a parameter every step
        # costs more latency than the memory it saves.
        "min_size_to_shard": 2**14,
        # Pairs as tuples, so --config.sharding.rules="(('embed', 'fsdp'), ...)" works.
        "rules": tuple(DEFAULT_RULES),
    })


def rules_from_config(sharding_cfg: ml_collections.ConfigDict) -> tuple:
    """sharding.rules as ((logical_name, mesh_axes), ...) tuples; checked (check_rules)."""
    rules = sharding_cfg.get("rules", None)
    rules = DEFAULT_RULES if rules is None else rules
    check_rules(rules)
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in rules)


def check_rules(rules) -> None:
    """Raises one ValueError naming the bad sharding.rules entry and what is allowed."""
    allowed = (f"allowed: [logical_name, mesh_axes] with logical_name one of "
               f"{', '.join(partitioning.AXIS_NAMES)} and mesh_axes one of {AXES}, a list "
               "of them, or None")
    for i, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            raise ValueError(f"sharding.rules[{i}]={rule!r} is not a pair; {allowed}")
        name, axes = rule
        if name not in partitioning.AXIS_NAMES:
            raise ValueError(f"sharding.rules[{i}]: unknown logical axis {name!r}; {allowed}")
        listed = [] if axes is None else [axes] if isinstance(axes, str) else axes
        if (not isinstance(listed, (list, tuple)) or any(a not in AXES for a in listed)
                or len(set(listed)) != len(listed)):
            raise ValueError(f"sharding.rules[{i}]: mesh axes {axes!r} for {name!r} are "
                             f"not allowed; {allowed}")


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


def _check_inner(expert: int, model: int, num_devices: int) -> None:
    for name, size in (("expert", expert), ("model", model)):
        if size < 1 or num_devices % size:
            raise ValueError(f"sharding.{name}={size} must be >= 1 and divide the "
                             f"{num_devices} devices")
    if num_devices % (expert * model):
        raise ValueError(f"sharding.expert={expert} x sharding.model={model} must divide "
                         f"the {num_devices} devices")


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None, expert: int = 1,
              model: int = 1) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all of jax.devices()), with an
    `expert` axis when expert > 1 and a `model` axis when model > 1 (data x fsdp then
    cover the devices / (expert * model))."""
    devices = list(jax.devices() if devices is None else devices)
    _check_inner(expert, model, len(devices))
    shape = resolve_mesh_shape(data, fsdp, len(devices) // (expert * model))
    inner = [(name, size) for name, size in (("expert", expert), ("model", model))
             if size > 1]
    names = DATA_AXES + tuple(name for name, _ in inner)
    shape = (*shape, *(size for _, size in inner))
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU). Auto
    # axes (its default is Explicit) let jit's in/out shardings drive propagation, so
    # model code needs no sharding-in-types annotations.
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def devices_for(sharding_cfg: ml_collections.ConfigDict) -> list[jax.Device]:
    """The devices a run uses: the first `num_devices` (0 = all)."""
    devices = jax.devices()
    n = sharding_cfg.num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"sharding.num_devices={sharding_cfg.num_devices} must be between 1 "
                         f"and the {len(devices)} available devices (0 = all)")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"sharding.num_devices={sharding_cfg.num_devices}: a run of "
                         f"{jax.process_count()} processes uses every one of the "
                         f"{len(devices)} devices (0 = all)")
    return devices[:n]


def mesh_from_config(sharding_cfg: ml_collections.ConfigDict) -> Mesh:
    return make_mesh(sharding_cfg.data, sharding_cfg.fsdp, devices_for(sharding_cfg),
                     expert=sharding_cfg.get("expert", 1), model=sharding_cfg.get("model", 1))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split a batch's examples (all but `model`)."""
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_shards(mesh: Mesh) -> int:
    """How many groups of devices see different examples (the batch must divide)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'[, 'expert']), replicated over
    'model'; other axes whole."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows [start, stop) of a global batch that this process's devices hold.

    One process: every row. Several: each process's devices hold one contiguous block
    (jax.make_mesh puts a process's devices next to each other along the batch axes), so
    a random-access dataset gathers only those ids: `ds.batch(step, rows)`.

    Raises:
      ValueError: the batch does not split over the mesh's batch axes, or this
        process's rows are not one block (a hand-made device order).
    """
    _check_divisible(global_batch_size, mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    blocks = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None
                      else s[0].stop) for s in index.values()})
    start, stop = blocks[0][0], blocks[-1][1]
    covered = sum(b - a for a, b in blocks)
    if covered != stop - start:
        raise ValueError(f"the rows of process {jax.process_index()} are not contiguous "
                         f"({blocks}): order the mesh's devices by process")
    return slice(start, stop)


def _check_divisible(size: int, mesh: Mesh) -> None:
    if size % batch_shards(mesh):
        raise ValueError(f"Global batch_size {size} is not divisible by the "
                         f"{batch_shards(mesh)} batch shards of the mesh {dict(mesh.shape)}")


def shard_batch(batch: PyTree, mesh: Mesh, global_batch_size: int | None = None) -> PyTree:
    """Global jax.Arrays of a batch (dict of np arrays [rows, ...]) split over the mesh.

    One process: `batch` is the global batch. Several: `batch` holds this process's
    rows, process_rows(mesh, global_batch_size), and every process calls this with its
    own (jax.make_array_from_process_local_data assembles them).

    Raises:
      ValueError: the batch does not split evenly over the mesh's batch axes.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("a batch leaf is a scalar; every leaf needs a batch axis")
        size = x.shape[0] if global_batch_size is None else global_batch_size
        _check_divisible(size, mesh)
        if jax.process_count() == 1 and x.shape[0] == size:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, (size, *x.shape[1:]))

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


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keypath) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in keypath)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def logical_names(boxed_params: PyTree) -> dict[tuple[str, ...], tuple[tuple, tuple]]:
    """{path: (shape, names)} of every leaf of `boxed_params` that carries logical names.

    Paths are those of the unboxed tree (tuples of key strings, no trailing "value").
    """
    table = {}
    leaves = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]
    for keypath, leaf in leaves:
        if _is_box(leaf):
            table[_path(keypath)] = (tuple(leaf.value.shape), tuple(leaf.names))
    return table


def state_sharding(abstract_state: PyTree, mesh: Mesh,
                   sharding_cfg: ml_collections.ConfigDict,
                   logical_params: PyTree | None = None) -> PyTree:
    """A NamedSharding for every leaf of `abstract_state` (arrays or ShapeDtypeStructs).

    Args:
      abstract_state: any pytree of plain arrays: a TrainState, its dict form, params.
      mesh: the (data, fsdp) mesh.
      sharding_cfg: strategy, min_size_to_shard and rules (default_config).
      logical_params: the boxed parameters, `jax.eval_shape(model.init, ...)["params"]`
        (nn.LogicallyPartitioned leaves); None: the shape rule everywhere.

    A leaf whose path ends with a named parameter's path and has its shape (the
    parameter itself, Adam's mu / nu, a pruning mask, LoRA's base copy) gets
    `logical_to_spec` of the parameter's names under the rules. Under "replicate", and for
    leaves under min_size_to_shard elements, the data-parallel axes are left out of the
    rules (mesh axes of size 1 split nothing). Any other leaf gets the shape rule of
    `param_sharding` (strategy and min_size_to_shard as configured).
    """
    strategy, min_size = sharding_cfg.strategy, sharding_cfg.min_size_to_shard
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding.strategy must be one of {STRATEGIES}, got {strategy!r}")
    rules = rules_from_config(sharding_cfg)
    fsdp_size = mesh.shape["fsdp"] if strategy == "fsdp" else 1
    mesh_shape = dict(mesh.shape)
    no_data_parallel = {**mesh_shape, **{a: 1 for a in DATA_AXES}}
    by_last: dict[str, list] = {}
    for path, (shape, names) in (logical_names(logical_params) if logical_params is not None
                                 else {}).items():
        by_last.setdefault(path[-1], []).append((path, shape, names))

    def spec(keypath, leaf) -> P:
        path, shape = _path(keypath), tuple(leaf.shape)
        matches = [(len(p), names) for p, s, names in by_last.get(path[-1] if path else "", [])
                   if s == shape and path[-len(p):] == p]
        if not matches:
            return _fsdp_spec(shape, fsdp_size, min_size)
        names = max(matches, key=lambda m: m[0])[1]
        small = math.prod(shape) < min_size
        axes = no_data_parallel if strategy == "replicate" or small else mesh_shape
        return partitioning.logical_to_spec(names, shape, rules, axes)

    return jax.tree_util.tree_map_with_path(
        lambda keypath, leaf: NamedSharding(mesh, spec(keypath, leaf)), abstract_state)


@contextlib.contextmanager
def use_rules(mesh: Mesh, sharding_cfg: ml_collections.ConfigDict):
    """Within the block the models' activation constraints (partitioning.constrain) map
    logical names onto `mesh` through sharding.rules; outside they do nothing.

    Wrap the jitted calls (the first call traces): `with use_rules(mesh, cfg): step(...)`.
    """
    with partitioning.axis_rules(rules_from_config(sharding_cfg), mesh):
        yield


def validate(sharding_cfg: ml_collections.ConfigDict, global_batch_size: int,
             num_devices: int | None = None) -> tuple[int, int]:
    """Checks a sharding config before anything is built; returns the (data, fsdp) shape.

    Raises:
      ValueError: unknown strategy, bad rules, mesh not matching num_devices, or a global
        batch that does not split evenly over the devices.
    """
    if sharding_cfg.strategy not in STRATEGIES:
        raise ValueError(f"sharding.strategy must be one of {STRATEGIES}, "
                         f"got {sharding_cfg.strategy!r}")
    if sharding_cfg.min_size_to_shard < 0:
        raise ValueError(f"sharding.min_size_to_shard must be >= 0, "
                         f"got {sharding_cfg.min_size_to_shard}")
    rules_from_config(sharding_cfg)
    if num_devices is None:
        num_devices = len(devices_for(sharding_cfg))
    expert, model = sharding_cfg.get("expert", 1), sharding_cfg.get("model", 1)
    _check_inner(expert, model, num_devices)
    shape = resolve_mesh_shape(sharding_cfg.data, sharding_cfg.fsdp,
                               num_devices // (expert * model))
    shards = num_devices // model
    if global_batch_size % shards:
        raise ValueError(f"data.batch_size={global_batch_size} is not divisible by the "
                         f"{shards} device groups the batch is split over (set "
                         "data.batch_size, sharding.num_devices or sharding.model)")
    return shape
