"""Weight initialisers.

Each initialiser is ``fn(shape, *, rng, dtype) -> array`` for a weight of shape
``(fan_in, fan_out)``, drawn from the model's generator (host stream, so the same seed
gives the same initial weights on every backend):

=================  ============================================
glorot_uniform     U(-a, a),  a = sqrt(6 / (fan_in + fan_out))
glorot_normal      N(0, s²),  s = sqrt(2 / (fan_in + fan_out))
he_uniform         U(-a, a),  a = sqrt(6 / fan_in)
he_normal          N(0, s²),  s = sqrt(2 / fan_in)
lecun_uniform      U(-a, a),  a = sqrt(3 / fan_in)
lecun_normal       N(0, s²),  s = sqrt(1 / fan_in)
zeros              0
=================  ============================================

Biases start at zero. The He forms suit ReLU-like activations, Glorot the saturating
ones (tanh, sigmoid); :func:`default_for` picks between them.
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["INITIALIZERS", "default_for", "get_initializer"]


def _fans(shape):
    fan_in, fan_out = shape[0], shape[-1]
    return fan_in, fan_out


def glorot_uniform(shape, *, rng, dtype):
    """``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    fi, fo = _fans(shape)
    return rng.uniform(shape, math.sqrt(6.0 / (fi + fo)), dtype)


def glorot_normal(shape, *, rng, dtype):
    """``N(0, 2 / (fan_in + fan_out))``."""
    fi, fo = _fans(shape)
    return rng.normal(shape, math.sqrt(2.0 / (fi + fo)), dtype)


def he_uniform(shape, *, rng, dtype):
    """``U(-a, a)`` with ``a = sqrt(6 / fan_in)``."""
    fi, _ = _fans(shape)
    return rng.uniform(shape, math.sqrt(6.0 / fi), dtype)


def he_normal(shape, *, rng, dtype):
    """``N(0, 2 / fan_in)``."""
    fi, _ = _fans(shape)
    return rng.normal(shape, math.sqrt(2.0 / fi), dtype)


def lecun_uniform(shape, *, rng, dtype):
    """``U(-a, a)`` with ``a = sqrt(3 / fan_in)``."""
    fi, _ = _fans(shape)
    return rng.uniform(shape, math.sqrt(3.0 / fi), dtype)


def lecun_normal(shape, *, rng, dtype):
    """``N(0, 1 / fan_in)``."""
    fi, _ = _fans(shape)
    return rng.normal(shape, math.sqrt(1.0 / fi), dtype)


def zeros(shape, *, rng, dtype):
    """All zeros (for biases, or to test a network that cannot break symmetry)."""
    return rng.full(shape, 0.0, dtype)


#: The initialiser table: name to ``fn(shape, *, rng, dtype) -> array``.
#:
#: :meta hide-value:
INITIALIZERS: dict[str, Callable] = {
    f.__name__: f
    for f in (glorot_uniform, glorot_normal, he_uniform, he_normal, lecun_uniform, lecun_normal, zeros)
}

_RELU_LIKE = {"relu", "leaky_relu", "elu", "gelu", "silu", "softplus"}


def get_initializer(name: str | Callable) -> Callable:
    """Look up an initialiser by name (or pass a callable through)."""
    if callable(name):
        return name
    try:
        return INITIALIZERS[name]
    except (KeyError, TypeError):
        msg = f"unknown initializer {name!r}; known initializers: {', '.join(INITIALIZERS)}"
        raise ValueError(msg) from None


def default_for(activation: str | None) -> str:
    """``"he_uniform"`` before ReLU-like activations, ``"glorot_uniform"`` otherwise."""
    return "he_uniform" if activation in _RELU_LIKE else "glorot_uniform"
