"""Layers: thin objects over :mod:`arraymlp.functional`.

Every layer follows one contract, two pure functions over plain arrays::

    forward(params, x, *, training, rng, xp) -> (y, cache)
    backward(params, cache, dy, *, xp, need_dx=True) -> (dx, grads)

``params`` is a plain dict of arrays (``{}`` for layers without parameters), ``cache``
is explicit data (what backward needs), and ``grads`` has exactly the keys and shapes
of ``params``. A layer object holds only its configuration (sizes, names), never
arrays, so one layer list can be evaluated with any parameters on any backend.

Handing arrays over
-------------------
A layer may also accept ``inplace=False`` in ``forward`` (or ``backward``): with
``inplace=True`` the caller hands ``x`` (``dy``) over, holding no other reference and
never reading it again, so the layer may compute its result into it instead of
allocating. The model hands over only arrays it made itself: the output of a layer that
declares ``fresh_output`` (its forward always returns a new array its cache does not
hold; Dense, LayerNorm) and the input gradient of one that declares ``fresh_dx`` (its
backward always returns a new ``dx``), never a user's array. A declaration holds only
for the class that makes it: a subclass that overrides ``forward`` (``backward``) is not
trusted unless it declares again. :func:`handover` reads all this once per class.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

from . import functional as F
from .init import get_initializer
from .kernels import kernels_for

__all__ = [
    "GELU",
    "ELU",
    "Activation",
    "Dense",
    "Dropout",
    "Identity",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "LogSoftmax",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "handover",
    "layer_from_config",
]


#: Assignments and deletions of ``forward``, ``backward`` or ``__class__`` on layer
#: instances so far: the fusion plan compares it to tell that a hook came or went.
_HOOK_CHANGES = [0]
_HOOK_NAMES = frozenset({"forward", "backward", "__class__"})


def hook_changes() -> int:
    """How many times a ``forward``, ``backward`` or ``__class__`` was set on (or
    deleted from) a :class:`Layer` instance."""
    return _HOOK_CHANGES[0]


class Layer:
    """Base class: a layer with no parameters that passes its input through.

    Subclasses override :meth:`init_params`, :meth:`forward`, :meth:`backward`, and set
    ``n_in`` / ``n_out`` when they fix the feature count (``None`` keeps it).

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> class Double(am.Layer):  # y = 2 x, no parameters
    ...     def forward(self, params, x, *, training, rng, xp):
    ...         return 2.0 * x, None
    ...     def backward(self, params, cache, dy, *, xp, need_dx=True):
    ...         return 2.0 * dy, {}
    >>> y, cache = Double().forward({}, np.array([[1.0, -2.0]]), training=False, rng=None, xp=np)
    >>> y.tolist(), Double().backward({}, cache, np.ones((1, 2)), xp=np)
    ([[2.0, -4.0]], (array([[2., 2.]]), {}))
    """

    n_in: int | None = None
    n_out: int | None = None
    #: ``forward`` always returns a new array that its cache does not hold.
    fresh_output: bool = False
    #: ``backward`` always returns a new ``dx`` (or ``None``).
    fresh_dx: bool = False

    def init_params(self, *, rng, dtype) -> dict[str, Any]:
        """Fresh parameters drawn from ``rng`` (an :class:`arraymlp._backend.Generator`)."""
        return {}

    def forward(self, params, x, *, training, rng, xp):
        """``(y, cache)`` for input ``x`` of shape (n, d)."""
        return x, None

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        """``(dx, grads)`` for the upstream gradient ``dy`` of shape (n, n_out).

        ``dx`` has the shape of the layer's input, (n, n_in), and is ``None`` when not
        needed; ``grads`` has the keys and shapes of ``params``; ``cache`` is what
        :meth:`forward` returned with ``y``."""
        return dy, {}

    def config(self) -> dict[str, Any]:
        """Constructor arguments, with ``"type"``: enough to rebuild the layer."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOOK_NAMES:
            _HOOK_CHANGES[0] += 1
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _HOOK_NAMES:
            _HOOK_CHANGES[0] += 1
        object.__delattr__(self, name)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))


class Dense(Layer):
    """Fully connected layer ``y = x @ W + b``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output feature counts; ``W`` has shape (n_in, n_out), ``b`` (n_out,).
    bias : bool
        Whether to learn ``b``.
    init : str or callable
        Weight initialiser (see :mod:`arraymlp.init`); biases start at zero.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> dense = am.Dense(2, 3)
    >>> params = {"W": np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]), "b": np.array([0.0, 0.5, 1.0])}
    >>> y, cache = dense.forward(params, np.array([[1.0, 2.0]]), training=False, rng=None, xp=np)
    >>> y.tolist()
    [[1.0, 4.5, -1.0]]
    >>> dx, grads = dense.backward(params, cache, np.ones((1, 3)), xp=np)
    >>> dx.tolist(), grads["W"].shape, grads["b"].tolist()
    ([[3.0, 0.0]], (2, 3), [1.0, 1.0, 1.0])
    """

    def __init__(self, n_in: int, n_out: int, *, bias: bool = True, init: str = "glorot_uniform"):
        for name, v in (("n_in", n_in), ("n_out", n_out)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                msg = f"Dense: {name} must be a positive int, got {v!r}"
                raise ValueError(msg)
        self.n_in, self.n_out, self.bias = n_in, n_out, bias
        self.init = init
        get_initializer(init)  # fail early on unknown names

    fresh_output = True  # x @ W + b
    fresh_dx = True  # dy @ W.T

    def init_params(self, *, rng, dtype):
        p = {"W": get_initializer(self.init)((self.n_in, self.n_out), rng=rng, dtype=dtype)}
        if self.bias:
            p["b"] = rng.full((self.n_out,), 0.0, dtype)
        return p

    def forward(self, params, x, *, training, rng, xp):
        return F.dense_forward(x, params["W"], params.get("b"), xp=xp), x

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, dW, db = F.dense_backward(cache, params["W"], dy, has_bias=self.bias, need_dx=need_dx, xp=xp)
        grads = {"W": dW}
        if self.bias:
            grads["b"] = db
        return dx, grads

    def config(self):
        init = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "custom")
        return {"type": "Dense", "n_in": self.n_in, "n_out": self.n_out, "bias": self.bias, "init": init}

    def __repr__(self):
        return f"{type(self).__name__}({self.n_in} -> {self.n_out}{'' if self.bias else ', bias=False'})"


class Activation(Layer):
    """Elementwise (or row-wise, for softmax) activation from :data:`functional.ACTIVATIONS`.

    Parameters
    ----------
    name : str
        A key of :data:`arraymlp.functional.ACTIVATIONS`.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> relu = am.Activation("relu")
    >>> y, cache = relu.forward({}, np.array([[-1.0, 0.0, 2.0]]), training=False, rng=None, xp=np)
    >>> y.tolist()
    [[0.0, 0.0, 2.0]]
    >>> dx, grads = relu.backward({}, cache, np.ones((1, 3)), xp=np)
    >>> dx.tolist(), grads
    ([[0.0, 0.0, 1.0]], {})
    """

    def __init__(self, name: str):
        self.name = F.get_activation(name).name
        self._act = F.get_activation(name)

    def forward(self, params, x, *, training, rng, xp, inplace=False):
        act = kernels_for(xp).activation(self._act)
        if inplace and act.forward_inplace is not None:
            y = act.forward_inplace(x, xp)
        else:
            y = act.forward(x, xp=xp)
        return y, (y if act.saves == "output" else x)

    def backward(self, params, cache, dy, *, xp, need_dx=True, inplace=False):
        act = kernels_for(xp).activation(self._act)
        if inplace and act.backward_inplace is not None:
            return act.backward_inplace(dy, cache, xp), {}
        return act.backward(dy, cache, xp), {}

    def config(self):
        return {"type": "Activation", "name": self.name}

    def __repr__(self):
        return f"Activation({self.name!r})"


def _named(cls_name: str, act: str):
    def __init__(self):
        Activation.__init__(self, act)

    doc = (
        f"Shorthand for ``Activation({act!r})``.\n\n"
        "Examples\n"
        "--------\n"
        ">>> import arraymlp as am\n"
        f">>> am.{cls_name}().name == am.Activation({act!r}).name\n"
        "True\n"
    )
    return type(cls_name, (Activation,), {"__init__": __init__, "__doc__": doc,
                                          "__repr__": lambda self: f"{type(self).__name__}()"})


Identity = _named("Identity", "identity")
ReLU = _named("ReLU", "relu")
LeakyReLU = _named("LeakyReLU", "leaky_relu")
ELU = _named("ELU", "elu")
GELU = _named("GELU", "gelu")
SiLU = _named("SiLU", "silu")
Tanh = _named("Tanh", "tanh")
Sigmoid = _named("Sigmoid", "sigmoid")
Softplus = _named("Softplus", "softplus")
Softmax = _named("Softmax", "softmax")
LogSoftmax = _named("LogSoftmax", "log_softmax")


class Dropout(Layer):
    """Inverted dropout: in training, zero each entry with probability ``p`` and scale
    the rest by ``1/(1-p)``; identity at inference.

    Parameters
    ----------
    p : float in [0, 1)

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> drop, x = am.Dropout(0.5), np.ones((2, 4))
    >>> y, cache = drop.forward({}, x, training=True, rng=am.Generator(0, np), xp=np)
    >>> y.shape, set(y.ravel().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 2
    ((2, 4), True)
    >>> np.array_equal(drop.forward({}, x, training=False, rng=None, xp=np)[0], x)
    True
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= float(p) < 1.0:
            msg = f"Dropout: p must be in [0, 1), got {p!r}"
            raise ValueError(msg)
        self.p = float(p)

    def forward(self, params, x, *, training, rng, xp):
        return F.dropout_forward(x, self.p, rng=rng, training=training, xp=xp)

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        return F.dropout_backward(cache, dy, xp=xp), {}

    def config(self):
        return {"type": "Dropout", "p": self.p}


class LayerNorm(Layer):
    """Layer normalisation over the features, with learned scale and shift.

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta``, statistics per row.

    Parameters
    ----------
    n : int
        Feature count; ``gamma`` and ``beta`` have shape (n,).
    eps : float

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> norm = am.LayerNorm(3)
    >>> params = norm.init_params(rng=am.Generator(0, np), dtype=np.float64)  # gamma 1, beta 0
    >>> x = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    >>> y, cache = norm.forward(params, x, training=False, rng=None, xp=np)
    >>> np.round(y, 4).tolist()  # each row: mean 0, variance 1
    [[-1.2247, 0.0, 1.2247], [-1.2247, 0.0, 1.2247]]
    """

    def __init__(self, n: int, *, eps: float = 1e-5):
        if not isinstance(n, int) or n < 1:
            msg = f"LayerNorm: n must be a positive int, got {n!r}"
            raise ValueError(msg)
        self.n_in = self.n_out = n
        self.eps = float(eps)

    fresh_output = True  # xhat * gamma + beta
    fresh_dx = True

    def init_params(self, *, rng, dtype):
        return {"gamma": rng.full((self.n_in,), 1.0, dtype), "beta": rng.full((self.n_in,), 0.0, dtype)}

    def forward(self, params, x, *, training, rng, xp):
        return F.layer_norm_forward(x, params["gamma"], params["beta"], eps=self.eps, xp=xp)

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, dg, db = F.layer_norm_backward(cache, params["gamma"], dy, xp=xp)
        return dx, {"gamma": dg, "beta": db}

    def config(self):
        return {"type": "LayerNorm", "n": self.n_in, "eps": self.eps}

    def __repr__(self):
        return f"LayerNorm({self.n_in})"


@dataclasses.dataclass(frozen=True)
class Handover:
    """What a layer class allows its caller to hand over (see the module notes).

    Attributes
    ----------
    forward_inplace, backward_inplace : bool
        ``forward`` (``backward``) accepts ``inplace=``.
    fresh_output, fresh_dx : bool
        The declaration holds for the ``forward`` (``backward``) the class runs.
    """

    forward_inplace: bool
    backward_inplace: bool
    fresh_output: bool
    fresh_dx: bool


_HANDOVER: dict[type, Handover] = {}


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _declared(cls: type, flag: str, method: str) -> bool:
    """``cls.<flag>``, trusted only when the class that sets it also defines the
    ``method`` that ``cls`` runs."""
    if not getattr(cls, flag, False):
        return False
    setter = next(k for k in cls.__mro__ if flag in vars(k))
    owner = next((k for k in cls.__mro__ if method in vars(k)), None)
    return setter is owner


def handover(layer: Layer) -> Handover:
    """The :class:`Handover` of ``layer``'s class, worked out once per class."""
    cls = type(layer)
    try:
        return _HANDOVER[cls]
    except KeyError:
        pass
    h = Handover(
        forward_inplace=_accepts(cls.forward, "inplace"),
        backward_inplace=_accepts(cls.backward, "inplace"),
        fresh_output=_declared(cls, "fresh_output", "forward"),
        fresh_dx=_declared(cls, "fresh_dx", "backward"),
    )
    _HANDOVER[cls] = h
    return h


_LAYER_TYPES = {"Dense": Dense, "Activation": Activation, "Dropout": Dropout, "LayerNorm": LayerNorm}


def layer_from_config(cfg: dict[str, Any]) -> Layer:
    """Rebuild a layer from :meth:`Layer.config` output; unknown types raise ValueError."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in _LAYER_TYPES:
        msg = f"unknown layer type {kind!r}; known layer types: {', '.join(_LAYER_TYPES)}"
        raise ValueError(msg)
    if kind == "Dense":
        return Dense(cfg["n_in"], cfg["n_out"], bias=cfg.get("bias", True), init=cfg.get("init", "glorot_uniform"))
    if kind == "LayerNorm":
        return LayerNorm(cfg["n"], eps=cfg.get("eps", 1e-5))
    return _LAYER_TYPES[kind](**cfg)


def _check_chain(layers: Sequence[Layer]) -> None:
    """Check that ``layers`` are layers whose sizes chain (each sized layer takes what the
    sized layer before it produces), with at least one sized layer."""
    width, where = None, None
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            msg = f"layer {i} is a {type(layer).__name__}, not an arraymlp layer (Dense, ReLU(), Dropout(p), ...)"
            raise TypeError(msg)
        if layer.n_in is not None:
            if width is not None and layer.n_in != width:
                msg = (
                    f"layer {i} ({layer!r}) expects {layer.n_in} input features but "
                    f"layer {where} ({layers[where]!r}) produces {width}; the sizes must chain"
                )
                raise ValueError(msg)
            width, where = layer.n_out, i
    if width is None:
        msg = "a model needs at least one layer with a fixed size (Dense or LayerNorm)"
        raise ValueError(msg)
