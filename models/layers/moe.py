"""Sparse mixture-of-experts MLP (Shazeer et al. 2017; GShard, Lepikhin et al. 2021; Switch
Transformer, Fedus et al. 2022; ST-MoE, Zoph et al. 2022).

A router scores each token against `num_experts` expert MLPs; each token goes to its `top_k`
experts and the output is their gate-weighted sum:

  logits = x W_r                          (float32: ST-MoE's selective precision)
  noisy  = logits + N(0, 1) * softplus(x W_noise)   (Shazeer et al. eq. 4; training only)
  "topk_softmax"  gates = softmax over the k largest logits (Shazeer et al. eq. 3/5; what
                  GShard's renormalized top-2 of the full softmax also is)
  "softmax_topk"  gates = the full softmax's k largest probabilities, not renormalized
                  (Switch: a top-1 token's gate is its router probability p_i(x))
  y = sum_j gate_j * expert_{e_j}(x)

Capacity. Tokens are routed in groups of one sequence (a batch row), so routing never
depends on how the batch is split over devices. An expert takes at most
C = max(1, floor(capacity_factor * L * k / N)) tokens of a group (L tokens, N experts;
capacity_factor <= 0: no limit); slots go in token order, a token's k choices together, so
a token's routing depends on earlier tokens only (causal). A choice over capacity is
dropped: its expert adds nothing, and a token with every choice dropped leaves the block as
0 -- the residual connection around the block carries it on (GShard, Switch). GShard's
random routing (`random_routing`, top-2, training only) keeps the second choice with
probability min(1, 2 g_2), g_2 its gate: rarely for a weak second expert, always when the
two gates are equal; the first gate stays g_1 either way.

Auxiliary losses (returned, the caller weights them):
  switch_loss = N * sum_i f_i * P_i   (Switch eq. 4): f_i the fraction of the routed
                choices that picked expert i (before capacity), P_i the mean router
                probability of i; 1 under perfectly uniform routing
  z_loss      = mean over tokens of (logsumexp(logits))^2   (ST-MoE eq. 5)

Dispatch (one contract, equal outputs): "dense" builds one-hot dispatch and combine tensors
[B, L, N, C] and moves tokens with einsums (GShard, Mesh-TensorFlow); "sorted" computes
each expert slot's token index and gathers / scatters (no [B, L, N, C] tensor). Either way
the experts run as one batched matmul over [N, B * C, d] through `dot_general`, so the
compression hooks see every expert matmul.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from models.layers import initializers, partitioning
from models.layers.mlp import get_activation

ROUTINGS = ("topk_softmax", "softmax_topk")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts fields of a transformer (TransformerConfig.moe)."""
    every: int = 0                 # 0: no MoE; k: the MLP of every k-th layer (layers
                                   # k-1, 2k-1, ...; 2: every other layer, as GShard)
    num_experts: int = 8
    top_k: int = 2
    mlp_dim: int = 0               # each expert's hidden width; 0: the model's mlp_dim
    routing: str = "topk_softmax"  # ROUTINGS
    noisy: bool = False            # Shazeer et al.'s noisy top-k gating (training only)
    capacity_factor: float = 1.25  # <= 0: no capacity limit
    random_routing: bool = False   # GShard's random second expert (top_k = 2)
    switch_weight: float = 0.01    # the load-balancing loss's weight (Switch: 1e-2)
    z_weight: float = 0.001        # the router z-loss's weight (ST-MoE: 1e-3)
    dispatch: str = "dense"        # DISPATCHES

    def __post_init__(self):
        for key, allowed in (("routing", ROUTINGS), ("dispatch", DISPATCHES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.moe.{key}={getattr(self, key)!r}; allowed: "
                                 f"{', '.join(allowed)}")
        if self.every < 0 or self.num_experts < 1 or self.mlp_dim < 0:
            raise ValueError("model.moe.every and model.moe.mlp_dim must be >= 0 and "
                             f"model.moe.num_experts >= 1, got every={self.every}, "
                             f"num_experts={self.num_experts}, mlp_dim={self.mlp_dim}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.random_routing and self.top_k != 2:
            raise ValueError("model.moe.random_routing picks the second of two experts: it "
                             f"needs top_k=2, got {self.top_k}")
        if self.switch_weight < 0 or self.z_weight < 0:
            raise ValueError("model.moe.switch_weight and z_weight must be >= 0")

    def in_layer(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts."""
        return self.every > 0 and (i + 1) % self.every == 0


# ---- Routing (pure functions) -------------------------------------------------------------
def top_k_gates(logits, k: int, routing: str = "topk_softmax"):
    """logits [..., N] -> (gates [..., k], experts [..., k] int32), best first."""
    if routing == "topk_softmax":
        values, experts = lax.top_k(logits, k)
        return jax.nn.softmax(values, axis=-1), experts
    if routing == "softmax_topk":
        return lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    raise ValueError(f"routing {routing!r}; allowed: {', '.join(ROUTINGS)}")


def capacity(group_size: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert per group: max(1, floor(factor * group * k / N)); no limit (the
    group's size) when factor <= 0."""
    if factor <= 0:
        return group_size
    return max(1, min(group_size, math.floor(factor * group_size * top_k / num_experts)))


def slot_positions(experts, active, num_experts: int):
    """experts [B, L, k], active [B, L, k] bool -> position [B, L, k] int32 of each active
    choice among its expert's choices in its row, in token order (a token's k choices in
    rank order): the cumulative count. Inactive choices take no slot (their position is
    meaningless)."""
    b, l, k = experts.shape
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * active[..., None]
    flat = onehot.reshape(b, l * k, num_experts)
    before = jnp.cumsum(flat, axis=1) - flat                       # choices ahead of it
    return jnp.sum(before * flat, axis=-1).reshape(b, l, k)


def switch_loss(probs, experts, active):
    """Switch's load-balancing loss N * sum_i f_i P_i: probs [T, N] the router's full
    softmax, experts [T, k] the choices, active [T] the tokens that count."""
    n = probs.shape[-1]
    weight = active.astype(probs.dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    chosen = jnp.sum(jax.nn.one_hot(experts, n, dtype=probs.dtype), axis=-2)  # [T, N]
    f = jnp.sum(chosen * weight[:, None], axis=0) / (count * experts.shape[-1])
    p = jnp.sum(probs * weight[:, None], axis=0) / count
    return n * jnp.sum(f * p), f


def z_loss(logits, active):
    """ST-MoE's router z-loss: the mean over active tokens of logsumexp(logits)^2."""
    weight = active.astype(logits.dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.square(lse) * weight) / jnp.maximum(jnp.sum(weight), 1.0)


# ---- The experts, on one device or expert-parallel -----------------------------------------
EXPERT_AXIS = "expert"   # the mesh axis experts are split over (train/sharding.py)


def expert_mlps(h, weights, *, activation: str, dtype, dot_general=lax.dot_general):
    """h [n, B, C, d] -> [n, B, C, d]: expert i's MLP on h[i], as batched matmuls
    (dot_general batched over the experts; weights {"fc1": {"kernel" [n, d, F], "bias"
    [n, F]}, "fc2": {"kernel" [n, F, d], "bias" [n, d]}}, biases optional)."""
    n, b, c, d = h.shape
    batched = (((2,), (1,)), ((0,), (0,)))     # contract d (or F), batch over experts
    x = h.reshape(n, b * c, d).astype(dtype)
    for i, layer in enumerate((weights["fc1"], weights["fc2"])):
        if i:
            x = get_activation(activation)(x)
        x = dot_general(x, layer["kernel"].astype(dtype), batched)
        if "bias" in layer:
            x = x + layer["bias"][:, None].astype(dtype)
    return x.reshape(n, b, c, d)


def expert_mesh():
    """The mesh of the enclosing sharding rules when its "expert" axis has > 1 device."""
    context = partitioning.current_rules()
    if context is None or context[1].shape.get(EXPERT_AXIS, 1) <= 1:
        return None
    return context[1]


def expert_parallel(mlp, mesh, num_experts: int):
    """`mlp` (h [N, B, C, d], weights) with the experts split over the mesh's "expert"
    axis (GShard): each device dispatches its own tokens' slots for all N experts, an
    all-to-all over "expert" hands expert i's slots to the device holding expert i,
    that device runs its N / E experts on the E devices' slots, and a second all-to-all
    returns the outputs. The batch axis B stays split over every mesh axis."""
    e = mesh.shape[EXPERT_AXIS]
    if num_experts % e:
        raise ValueError(f"model.moe.num_experts={num_experts} does not split over the "
                         f"{e} devices of sharding.expert; allowed: a multiple of {e}")
    every_axis = tuple(mesh.axis_names)

    def local(h, weights):          # h [N, b, C, d] of this device's rows
        h = lax.all_to_all(h, EXPERT_AXIS, 0, 1, tiled=True)        # [N/E, E b, C, d]
        y = mlp(h, weights)
        return lax.all_to_all(y, EXPERT_AXIS, 1, 0, tiled=True)     # [N, b, C, d]

    def run(h, weights):
        specs = jax.tree.map(lambda w: P(EXPERT_AXIS, *([None] * (w.ndim - 1))), weights)
        rows = P(None, every_axis, None, None)
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, specs), out_specs=rows)(
            h, weights)
    return run


class ExpertDense(nn.Module):
    """() -> {"kernel" [N, in, out], "bias" [N, out]}: N experts' dense layers, each
    initialized as a dense kernel of its own (fan in/out of [in, out])."""
    num_experts: int
    features_in: int
    features_out: int
    names: tuple[str, str]           # logical axes of [in, out]
    use_bias: bool = True
    param_dtype: Any = jnp.float32
    kernel_init: Callable = initializers.get("xavier_uniform")

    @nn.compact
    def __call__(self):
        def per_expert(key, shape, dtype):
            keys = jax.random.split(key, shape[0])
            return jax.vmap(lambda k: self.kernel_init(k, shape[1:], dtype))(keys)

        n = self.num_experts
        out = {"kernel": self.param(
            "kernel", partitioning.boxed(per_expert, (EXPERT_AXIS, *self.names)),
            (n, self.features_in, self.features_out), self.param_dtype)}
        if self.use_bias:
            out["bias"] = self.param(
                "bias", partitioning.boxed(nn.initializers.zeros_init(),
                                           (EXPERT_AXIS, self.names[1])),
                (n, self.features_out), self.param_dtype)
        return out


# ---- Dispatch: tokens to expert slots and back (one contract, equal outputs) -------------
# (x [B, L, d], experts [B, L, k], position [B, L, k], kept [B, L, k] bool, weights [B, L, k]
#  the gates of the kept choices, N, C, run_experts: [N, B, C, d] -> [N, B, C, d])
#  -> [B, L, d] = sum over kept choices of weight * expert(x)
def dense_dispatch(x, experts, position, kept, weights, n, c, run_experts):
    """One-hot dispatch and combine tensors [B, L, N, C] and einsums (GShard)."""
    slot = jax.nn.one_hot(jnp.where(kept, position, c), c, dtype=x.dtype)  # C: no slot
    expert = jax.nn.one_hot(experts, n, dtype=x.dtype)
    dispatch = jnp.einsum("blkn,blkc->blnc", expert, slot)       # 0/1, one per kept choice
    combine = jnp.einsum("blkn,blkc,blk->blnc", expert, slot, weights)
    h = jnp.einsum("blnc,bld->nbcd", dispatch, x)
    return jnp.einsum("blnc,nbcd->bld", combine, run_experts(h))


def sorted_dispatch(x, experts, position, kept, weights, n, c, run_experts):
    """Each slot's token index: a gather into the slots, a gather of the outputs back."""
    b, l, k = experts.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, l, k))
    tokens = jnp.broadcast_to(jnp.arange(l)[None, :, None], (b, l, k))
    # slot (row, expert, position) -> its token; empty slots read a zero row (index l)
    index = jnp.full((b, n, c), l, jnp.int32).at[
        rows, experts, jnp.where(kept, position, c)].set(tokens, mode="drop")
    padded = jnp.concatenate([x, jnp.zeros((b, 1, x.shape[-1]), x.dtype)], axis=1)
    h = jnp.take_along_axis(padded, index.reshape(b, n * c, 1), axis=1)
    y = run_experts(jnp.transpose(h.reshape(b, n, c, -1), (1, 0, 2, 3)))
    picked = y[experts, rows, jnp.where(kept, position, 0)]            # [B, L, k, d]
    return jnp.sum(picked * weights[..., None], axis=2)


DISPATCH = {"dense": dense_dispatch, "sorted": sorted_dispatch}
DISPATCHES = tuple(DISPATCH)


# ---- The block ----------------------------------------------------------------------------
class MoeBlock(nn.Module):
    """x [B, L, d] (valid [B, L] or None) -> (y [B, L, d], stats).

    Params: router/kernel [d, N] (float32), router_noise/kernel [d, N] when noisy,
    fc1/kernel [N, d, F], fc1/bias [N, F], fc2/kernel [N, F, d], fc2/bias [N, d] (logical
    axes "expert", "embed", "mlp"; expert i's kernels are a dense MLP's [in, out], so the
    compression transforms treat the expert axis as a stack axis: models/compress).

    stats (float32 scalars unless noted): switch_loss, z_loss, load [N] (the fraction of
    routed choices per expert), dropped (the fraction of active choices over capacity),
    weighted (the number of active tokens, for averaging over layers and steps).
    """
    cfg: MoeConfig
    hidden_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = initializers.get("xavier_uniform")
    dot_general: Callable = lax.dot_general

    def _router(self, x, deterministic: bool):
        cfg, n = self.cfg, self.cfg.num_experts
        init = partitioning.boxed(nn.initializers.normal(0.02), ("embed", None))
        x32 = x.astype(jnp.float32)
        logits = nn.Dense(n, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=init, name="router")(x32)
        route = logits
        if cfg.noisy:
            noise_scale = jax.nn.softplus(nn.Dense(
                n, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                kernel_init=partitioning.boxed(nn.initializers.zeros_init(), ("embed", None)),
                name="router_noise")(x32))
            if not deterministic:
                route = logits + jax.random.normal(self.make_rng("dropout"),
                                                   logits.shape) * noise_scale
        return logits, route

    def _experts(self, h):
        """h [N, B, C, d] -> [N, B, C, d]: every expert's MLP on its slots, one batched
        matmul over the experts (expert-parallel over the mesh's "expert" axis when the
        sharding rules give it devices)."""
        n, d, f = self.cfg.num_experts, h.shape[-1], self.hidden_dim
        common = dict(use_bias=self.use_bias, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init)
        weights = {"fc1": ExpertDense(n, d, f, ("embed", "mlp"), **common, name="fc1")(),
                   "fc2": ExpertDense(n, f, d, ("mlp", "embed"), **common, name="fc2")()}
        mlp = functools.partial(expert_mlps, activation=self.activation, dtype=self.dtype,
                                dot_general=self.dot_general)
        mesh = expert_mesh()
        if mesh is None or h.shape[1] % mesh.size:  # e.g. a batch of one while sampling:
            return mlp(h, weights)                 # GSPMD gathers the experts instead
        return expert_parallel(mlp, mesh, n)(h, weights)

    @nn.compact
    def __call__(self, x, valid=None, *, deterministic: bool = True):
        cfg = self.cfg
        b, l, _ = x.shape
        n, k = cfg.num_experts, cfg.top_k
        valid = jnp.ones((b, l), bool) if valid is None else valid.astype(bool)
        logits, route = self._router(x, deterministic)
        gates, experts = top_k_gates(route, k, cfg.routing)        # [B, L, k]
        active = jnp.broadcast_to(valid[..., None], (b, l, k))
        if cfg.random_routing and not deterministic:
            u = jax.random.uniform(self.make_rng("dropout"), (b, l))
            active = active.at[..., 1].set(active[..., 1] & (u < 2.0 * gates[..., 1]))
        c = capacity(l, n, k, cfg.capacity_factor)
        position = slot_positions(experts, active, n)
        kept = active & (position < c)
        weights = (gates * kept).astype(self.dtype)

        out = DISPATCH[cfg.dispatch](x.astype(self.dtype), experts, position, kept, weights,
                                     n, c, self._experts)

        flat_valid = valid.reshape(-1)
        probs = jax.nn.softmax(route, axis=-1).reshape(b * l, n)
        balance, load = switch_loss(probs, experts.reshape(b * l, k), flat_valid)
        num_active = jnp.maximum(jnp.sum(active), 1)
        stats = {"switch_loss": balance, "z_loss": z_loss(logits.reshape(b * l, n), flat_valid),
                 "load": load,
                 "dropped": 1.0 - jnp.sum(kept) / num_active,
                 "weighted": jnp.sum(valid).astype(jnp.float32)}
        return out.astype(x.dtype), stats
