"""Weight initializers by name, so configs can select them (`model.kernel_init = "he_normal"`).

The common schemes (random, Xavier/Glorot for tanh/sigmoid, He for ReLU):
  xavier_uniform / xavier_normal (= glorot_*): Var(w) = 2 / (fan_in + fan_out)
                                               (Glorot & Bengio 2010, eq. 16)
  he_uniform / he_normal (= kaiming_*):        Var(w) = 2 / fan_in  (He et al. 2015, eq. 10)
  lecun_normal:                                Var(w) = 1 / fan_in
  normal:                                      N(0, stddev^2), stddev=0.02 as in GPT-2/BERT
  truncated_normal:                            N(0, stddev^2) truncated at 2 stddev
A popular explanation says Kaiming init keeps the weights "centred around 1"; what He et al.
2015 (sec. 2.2) derive is a *variance*, 2 / fan_in, chosen so that the variance of each layer's
response stays constant through ReLU layers -- the weights themselves are centred on 0.

Fan-in/fan-out follow jax.nn.initializers; flax's DenseGeneral initializes its kernel in the
flattened [in, out] shape, so multi-head kernels get the same fans as one dense matrix.
"""
from __future__ import annotations

from typing import Callable

import jax

_I = jax.nn.initializers

_FACTORIES: dict[str, Callable[[float], Callable]] = {
    "xavier_uniform": lambda s: _I.glorot_uniform(),
    "xavier_normal": lambda s: _I.glorot_normal(),
    "he_uniform": lambda s: _I.he_uniform(),
    "he_normal": lambda s: _I.he_normal(),
    "lecun_normal": lambda s: _I.lecun_normal(),
    "normal": lambda s: _I.normal(stddev=s),
    "truncated_normal": lambda s: _I.truncated_normal(stddev=s),
    "zeros": lambda s: _I.zeros,
}
_ALIASES = {"glorot_uniform": "xavier_uniform", "glorot_normal": "xavier_normal",
            "kaiming_uniform": "he_uniform", "kaiming_normal": "he_normal"}
NAMES = tuple(sorted(list(_FACTORIES) + list(_ALIASES)))


def get(name: str, stddev: float = 0.02) -> Callable:
    """Initializer `init(key, shape, dtype)` for `name` (see module docstring).

    `stddev` is used by "normal" and "truncated_normal" only.
    """
    key = _ALIASES.get(name, name)
    if key not in _FACTORIES:
        raise ValueError(f"unknown initializer {name!r}; allowed: {', '.join(NAMES)}")
    return _FACTORIES[key](stddev)
