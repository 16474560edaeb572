"""Optimisers over lists of parameter dicts: SGD, Adam, AdamW, RMSprop, Adagrad, and full-batch L-BFGS.

A model's parameters are ``params: list[dict[str, array]]`` (one dict per layer,
``{}`` for layers without parameters) and its gradients ``grads`` mirror them key
for key and shape for shape. ``opt.step(params, grads, lr=None)`` updates the
parameters and returns the same list.

Conventions, shared by every optimiser here:

- The update rules are those of :mod:`torch.optim` (same defaults, same order of
  operations), so a trajectory here matches PyTorch's to rounding.
- Weight decay applies to the weight matrices (keys named ``"W"``) only, unless
  ``decay_bias=True``, in which case it applies to every parameter (biases,
  LayerNorm's ``gamma`` and ``beta``). SGD, Adam, RMSprop and Adagrad use the
  coupled L2 form ``g <- g + wd * p``; AdamW decays the weights directly,
  ``p <- p - lr * wd * p``, before the Adam update.
- Clipping happens before weight decay, on copies of the gradients:
  ``clip_value`` clamps every element to ``[-clip_value, clip_value]``
  (``torch.nn.utils.clip_grad_value_``), then ``clip_norm`` rescales all gradients
  together by ``min(1, clip_norm / (||g||_2 + 1e-6))`` where ``||g||_2`` is the norm
  of all gradients concatenated (``torch.nn.utils.clip_grad_norm_``). In that order
  both bounds hold afterwards.
- The array namespace comes from the parameters and gradients, once per step.
  Optimiser state (moments, buffers) is created lazily on the first step with
  ``xp.zeros_like`` of each parameter: same namespace, device and dtype.
- Parameters and state are updated in place where
  :func:`array_api_compat.is_writeable_array` allows, and functionally otherwise
  (the new array is written back into the parameter dict). Gradients are never
  mutated and never aliased by the state.
- ``state_dict()`` returns plain Python containers (dicts, lists, tuples, numbers,
  strings) holding copies of the state arrays; ``load_state_dict`` accepts the same,
  with arrays of any backend: they are moved to the parameters' namespace, device
  and dtype on the next step.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import array_api_compat
import numpy

from ._backend import device_of, get_namespace, is_float16, is_writeable, to_backend, to_numpy
from .kernels import kernels_for
from .kernels.reference import _iadd, _imul, _isub, constant_like

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "LBFGS",
    "LBFGSIteration",
    "Optimizer",
    "RMSprop",
    "get_optimizer",
]

#: Added to the global gradient norm before dividing, as torch's clip_grad_norm_ does.
CLIP_NORM_EPS = 1e-6

#: Namespace of each array type met so far (the namespace is a function of the type).
_NAMESPACE_OF_TYPE: dict[type, Any] = {}

_FLOAT16_TINY = 6.103515625e-05  # float16's smallest normal number, 2**-14


def _check_eps_for(p, xp, eps: float, name: str) -> None:
    """float16 parameters need an ``eps`` that float16 can hold: squared gradients of
    1e-4 already underflow to 0 there, and the default 1e-8 rounds to 0 too, so the
    denominator ``sqrt(v) + eps`` would be 0 and the first step non-finite."""
    if is_float16(p.dtype, xp) and eps < _FLOAT16_TINY:
        msg = (f"{name} with float16 parameters needs eps >= {_FLOAT16_TINY:.3g} (float16's smallest normal "
               f"number), got eps={eps:g}, which float16 cannot hold: pass eps=1e-4, or train in float32")
        raise ValueError(msg)


# ----------------------------------------------------------------------------- checks
_keys = operator.methodcaller("keys")  # of any mapping of parameters


def _number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a real hyper-parameter and return it as a float."""
    # a float first: the fused step validates its rate every step, and the check
    # against the numbers.Real ABC costs a microsecond
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        msg = f"{name} must be a real number, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)
    v = float(value)
    bad = math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            want = f"in {lo}, {hi}"
        elif low is not None:
            want = (">" if low_open else ">=") + f" {low:g}"
        else:
            want = ("<" if high_open else "<=") + f" {high:g}"
        msg = f"{name} must be {want}, got {value!r}"
        raise ValueError(msg)
    return v


def _count(name: str, value: Any) -> int:
    """Validate a positive integer hyper-parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        msg = f"{name} must be a positive int, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return _number(name, value, low=0.0, low_open=True)


def _check_structure(params: Any, grads: Any) -> None:
    """Raise a ValueError unless ``grads`` mirrors ``params`` key for key and shape for shape."""
    if not isinstance(params, (list, tuple)):
        msg = (
            f"params must be a list of dicts of arrays (one dict per layer), got {type(params).__name__}"
        )
        raise TypeError(msg)
    if not isinstance(grads, (list, tuple)):
        msg = f"grads must be a list of dicts of arrays mirroring params, got {type(grads).__name__}"
        raise TypeError(msg)
    if len(grads) != len(params):
        msg = f"grads has {len(grads)} layers but params has {len(params)}; grads must mirror params"
        raise ValueError(msg)
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.keys() != g.keys():
            msg = (
                f"layer {i}: grads has keys {sorted(g)} but params has keys {sorted(p)}; "
                "grads must mirror params"
            )
            raise ValueError(msg)
        for key, pa in p.items():
            if g[key].shape != pa.shape and tuple(g[key].shape) != tuple(pa.shape):
                msg = (
                    f"layer {i}, {key!r}: gradient has shape {tuple(g[key].shape)} "
                    f"but the parameter has shape {tuple(pa.shape)}"
                )
                raise ValueError(msg)


def _copy(a):
    """A copy of an array in its own namespace and on its own device."""
    xp = array_api_compat.array_namespace(a)
    return xp.asarray(a, copy=True)


def _place(a, like, xp):
    """``a`` moved to ``like``'s namespace, device and dtype (a no-op when already there)."""
    if not array_api_compat.is_array_api_obj(a):
        a = xp.asarray(a, dtype=like.dtype, device=device_of(like))
    elif array_api_compat.array_namespace(a) is not xp or device_of(a) != device_of(like):
        a = to_backend(a, xp, device=device_of(like))
    if a.dtype != like.dtype:
        a = xp.astype(a, like.dtype)
    if tuple(a.shape) != tuple(like.shape):
        msg = (
            f"loaded optimizer state has shape {tuple(a.shape)} "
            f"but the parameter has shape {tuple(like.shape)}"
        )
        raise ValueError(msg)
    return a


def _clip_gradients(grads, xp, clip_value, clip_norm):
    """Clipped copies of ``grads`` (the input arrays are left untouched).

    ``clip_value`` first (elementwise clamp), then ``clip_norm`` (global 2-norm over
    all gradients, scaled by ``min(1, clip_norm / (norm + 1e-6))``).
    """
    if clip_value is None and clip_norm is None:
        return grads
    out = [dict(layer) for layer in grads]
    if clip_value is not None:
        for layer in out:
            for key, g in layer.items():
                # minimum/maximum rather than clip: array-api-compat's clip indexes with
                # boolean masks, and each such index reads the mask back from a GPU; the
                # bounds as 0-d arrays (a number is copied from the host on torch CUDA)
                layer[key] = xp.minimum(xp.maximum(g, constant_like(-clip_value, g, xp)),
                                        constant_like(clip_value, g, xp))
    if clip_norm is not None:
        sq = None
        for layer in out:
            for g in layer.values():
                if is_float16(g.dtype, xp):  # squares of float16 gradients over ~256 overflow: sum in float32
                    g = xp.astype(g, xp.float32)
                s = xp.sum(g * g)
                sq = s if sq is None else sq + s
        if sq is not None:
            coef = clip_norm / (xp.sqrt(sq) + CLIP_NORM_EPS)
            coef = xp.minimum(coef, constant_like(1.0, coef, xp))
            for layer in out:
                for key, g in layer.items():
                    layer[key] = g * (coef if coef.dtype == g.dtype else xp.astype(coef, g.dtype))
    return out


# ----------------------------------------------------------------------------- base
class Optimizer:
    """Base class: validation, clipping, weight-decay selection, lazy state, checkpoints.

    Subclasses set :attr:`name`, :attr:`_hyper` (their own hyper-parameter names, in
    ``repr`` order) and implement :meth:`_init_state` and :meth:`_update`.

    Attributes
    ----------
    lr : float
        Base learning rate, used when :meth:`step` gets no ``lr=``.
    step_count : int
        Number of steps taken.
    state : list of dict or None
        Per-parameter state mirroring ``params`` (``None`` before the first step).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import SGD
    >>> opt = SGD(lr=0.5, momentum=0.5)
    >>> params = [{"W": np.array([[1.0, 2.0]])}, {}]  # a layer without parameters: {}
    >>> _ = opt.step(params, [{"W": np.ones((1, 2))}, {}])
    >>> params[0]["W"]
    array([[0.5, 1.5]])
    >>> resumed = SGD(); resumed.load_state_dict(opt.state_dict())
    >>> resumed.lr, resumed.step_count, resumed.state[0]["W"]["momentum_buffer"]
    (0.5, 1, array([[1., 1.]]))
    """

    name = ""
    _hyper: tuple[str, ...] = ()

    def __init__(
        self,
        lr: float,
        *,
        weight_decay: float = 0.0,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        self.lr = lr
        self.weight_decay = _number("weight_decay", weight_decay, low=0.0)
        self.decay_bias = bool(decay_bias)
        self.clip_norm = _optional_positive("clip_norm", clip_norm)
        self.clip_value = _optional_positive("clip_value", clip_value)
        self.step_count = 0
        self.state: list[dict[str, dict[str, Any]]] | None = None
        self._needs_placement = False
        self._scratch = None  # work space the kernels' axpy may borrow (not state)

    # -- the base learning rate -----------------------------------------------------
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _number("lr", value, low=0.0)

    # -- in-place arithmetic ----------------------------------------------------------
    def _axpy(self, p, a: float, g, xp):
        """``p + a * g``, computed into ``p`` where it is writeable, by the kernel set's
        ``axpy``: the same values, bit for bit, as the standard ``p += a * g``; the
        backend sets compute the product into a work buffer this optimiser keeps
        (:meth:`_work`) instead of a temporary."""
        return kernels_for(xp).axpy(p, a, g, xp, self._work)

    def _work(self, n, p, xp):
        """A flat scratch array of ``n`` elements in ``p``'s dtype and place (a view of
        one buffer, grown on demand)."""
        s = self._scratch
        # type, dtype and device attributes: NumPy, CuPy and torch arrays all have them
        if s is None or s.shape[0] < n or type(s) is not type(p) or s.dtype != p.dtype or s.device != p.device:
            s = self._scratch = xp.empty((n,), dtype=p.dtype, device=device_of(p))
        return s[:n]

    # -- hooks for subclasses -------------------------------------------------------
    def _init_state(self, p, xp) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, p, g, st, *, lr, wd, xp):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------
    def step(
        self, params: list[dict[str, Any]], grads: list[dict[str, Any]], *, lr: float | None = None
    ):
        """Update ``params`` with ``grads`` once and return ``params``.

        Parameters
        ----------
        params : list of dict of arrays
            One dict per layer (``{"W": (n_in, n_out), "b": (n_out,)}``, ``{}``).
            Updated in place where the arrays are writeable; otherwise the new
            arrays are written back into the dicts.
        grads : list of dict of arrays
            Same layers, keys and shapes as ``params``. Never modified.
        lr : float, optional
            Learning rate for this step only (a schedule's value); default
            :attr:`lr`.

        Returns
        -------
        list of dict of arrays
            ``params``, updated.
        """
        lr = self.lr if lr is None else _number("lr", lr, low=0.0)
        _check_structure(params, grads)
        arrays = [a for layer in params for a in layer.values()]
        if not arrays:
            return params
        garrays = [a for layer in grads for a in layer.values()]
        types = set(map(type, arrays)).union(map(type, garrays))
        if len(types) == 1:  # one array type, one namespace
            kind = types.pop()
            xp = _NAMESPACE_OF_TYPE.get(kind)
            if xp is None:
                xp = _NAMESPACE_OF_TYPE[kind] = get_namespace(arrays[0])
        else:
            xp = get_namespace(*arrays, *garrays)  # mixed: raises, naming both
        grads = _clip_gradients(grads, xp, self.clip_value, self.clip_norm)
        if self.state is None:
            self.state = [{key: self._init_state(p, xp) for key, p in layer.items()} for layer in params]
        else:
            self._check_state(params, xp)
        self.step_count += 1
        update, wd_all, decay_bias = self._update, self.weight_decay, self.decay_bias
        if len(set(map(id, arrays))) == len(arrays):  # no array in two slots: each updated once
            for layer, glayer, slayer in zip(params, grads, self.state):
                for key, p in layer.items():
                    new = update(p, glayer[key], slayer[key], lr=lr, wd=wd_all if (key == "W" or decay_bias) else 0.0,
                                 xp=xp)
                    if new is not p:  # not updated in place: written back
                        layer[key] = new
            return params
        # One array held by several slots (tied weights) takes each slot's update in turn,
        # as an in-place update does; where the update makes a new array (JAX), the next
        # slot starts from it and every slot ends holding the last one, so ties hold.
        latest: dict[int, tuple[Any, Any]] = {}  # id(array before the step) -> (it, its update)
        for layer, glayer, slayer in zip(params, grads, self.state):
            for key, p in layer.items():
                wd = self.weight_decay if (key == "W" or self.decay_bias) else 0.0
                seen = latest.get(id(p))
                new = self._update(p if seen is None else seen[1], glayer[key], slayer[key], lr=lr, wd=wd, xp=xp)
                latest[id(p)] = (p, new)  # holding p keeps its id from being reused
        if any(new is not p for p, new in latest.values()):  # written back: not updated in place
            for layer in params:
                for key, p in layer.items():
                    layer[key] = latest[id(p)][1]
        return params

    def _fusable(self) -> bool:
        """Whether the update is plain ``p -= lr * g`` for every parameter, so that a
        training step may apply it as the gradients come (:meth:`_begin_fused_step`)."""
        return False

    def _begin_fused_step(self, params, xp, lr: float | None = None) -> float:
        """The bookkeeping :meth:`step` does, for a step whose update the model makes
        itself (``fit``'s fused plain SGD step): the rate validated, state built or
        checked, step counted. Returns the step's learning rate."""
        lr = self.lr if lr is None else _number("lr", lr, low=0.0)
        if self.state is None:
            self.state = [{key: self._init_state(p, xp) for key, p in layer.items()} for layer in params]
        else:
            self._check_state(params, xp)
        self.step_count += 1
        return lr

    def reset(self) -> None:
        """Forget all state (moments, buffers, step count); keep the hyper-parameters."""
        self.state = None
        self.step_count = 0
        self._needs_placement = False

    def hyperparameters(self) -> dict[str, Any]:
        """All constructor arguments, as a dict that rebuilds this optimiser."""
        d = {"lr": self.lr}
        d.update({k: getattr(self, k) for k in self._hyper})
        d.update(
            decay_bias=self.decay_bias,
            clip_norm=self.clip_norm,
            clip_value=self.clip_value,
        )
        return d

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint of this optimiser in plain Python containers.

        Returns
        -------
        dict
            ``{"optimizer": name, "hyperparameters": {...}, "step": int,
            "state": None or [ {key: {slot: array}} per layer ]}``; the arrays are
            copies, so later steps do not change the checkpoint.
        """
        state = None
        if self.state is not None:
            state = [
                {key: {slot: _copy(a) for slot, a in st.items()} for key, st in layer.items()}
                for layer in self.state
            ]
        return {
            "optimizer": self.name,
            "hyperparameters": self.hyperparameters(),
            "step": self.step_count,
            "state": state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyper-parameters, step count and state from :meth:`state_dict`.

        The arrays may come from any backend (a checkpoint read back as NumPy, say):
        they are copied now and moved to the parameters' namespace, device and dtype
        on the next :meth:`step`.
        """
        name = state_dict.get("optimizer")
        if name != self.name:
            msg = (
                f"state_dict is for optimizer {name!r}, not {self.name!r}; "
                f"use get_optimizer({name!r}) to rebuild it"
            )
            raise ValueError(msg)
        fresh = type(self)(**dict(state_dict["hyperparameters"]))
        self.__dict__.update(fresh.__dict__)
        step = state_dict.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            msg = f"state_dict['step'] must be a non-negative integer, got {step!r}"
            raise ValueError(msg)
        self.step_count = int(step)
        state = state_dict.get("state")
        if state is None:
            self.state = None
            return
        self.state = [
            {
                key: {
                    slot: (_copy(a) if array_api_compat.is_array_api_obj(a) else a)
                    for slot, a in st.items()
                }
                for key, st in layer.items()
            }
            for layer in state
        ]
        self._needs_placement = True

    def _check_state(self, params, xp) -> None:
        state = self.state
        # compared by map, without a Python-level loop: the fused step checks every step
        ok = len(state) == len(params) and list(map(dict.keys, state)) == list(map(_keys, params))
        if not ok:
            msg = (
                "the optimizer's state was built for parameters of a different structure "
                "(layers or keys differ); call opt.reset() or create a new optimizer"
            )
            raise ValueError(msg)
        if self._needs_placement:
            for slayer, layer in zip(state, params):
                for key, p in layer.items():
                    st = slayer[key]
                    for slot in st:
                        st[slot] = _place(st[slot], p, xp)
            self._needs_placement = False
            return
        if not any(map(any, map(dict.values, state))):
            return  # no state arrays (plain SGD): no shapes to compare
        for slayer, layer in zip(state, params):
            for key, p in layer.items():
                shape = p.shape
                for a in slayer[key].values():
                    if a.shape != shape and tuple(a.shape) != tuple(shape):
                        msg = (
                            f"the optimizer's state for {key!r} has shape {tuple(a.shape)} but the "
                            f"parameter has shape {tuple(p.shape)}; "
                            "call opt.reset() or create a new optimizer"
                        )
                        raise ValueError(msg)

    def __repr__(self) -> str:
        parts = [f"lr={self.lr!r}"] + [f"{k}={getattr(self, k)!r}" for k in self._hyper]
        if self.decay_bias:
            parts.append("decay_bias=True")
        if self.clip_norm is not None:
            parts.append(f"clip_norm={self.clip_norm!r}")
        if self.clip_value is not None:
            parts.append(f"clip_value={self.clip_value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# ----------------------------------------------------------------------------- SGD
class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    Update: ``p -= lr * (g + momentum*buf if nesterov else buf)``, ``buf = momentum*buf + (1-dampening)*g``.

    Here ``g = grad + wd*p`` (coupled L2) and ``buf = g`` on the first step; without
    momentum the rule is ``p -= lr * g``. In that plain case (no momentum, weight decay
    or clipping) :func:`arraymlp.fit` applies the update during backpropagation, each
    dense layer's weight gradient going straight into its weights
    (:func:`arraymlp.functional.dense_sgd_update`): the same step without a gradient
    array the size of the weights.

    Parameters
    ----------
    lr : float, default 0.01
        Learning rate, ``>= 0``.
    momentum : float, default 0.0
        Momentum factor, ``>= 0``.
    nesterov : bool, default False
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float, default 0.0
        Coupled L2 coefficient ``wd`` (``g += wd * p``).
    dampening : float, default 0.0
        Dampening of the momentum, in ``[0, 1]``.
    decay_bias : bool, default False
        Apply weight decay to every parameter, not only the ``"W"`` matrices.
    clip_norm, clip_value : float, optional
        Global-norm and elementwise gradient clipping (see the module notes).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import SGD
    >>> params = [{"W": np.array([[1.0, -2.0]])}]
    >>> grads = [{"W": np.array([[0.5, -1.0]])}]
    >>> _ = SGD(lr=0.5).step(params, grads)  # p - lr * g
    >>> params[0]["W"]
    array([[ 0.75, -1.5 ]])
    """

    name = "sgd"
    _hyper = ("momentum", "nesterov", "weight_decay", "dampening")

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        *,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        super().__init__(
            lr,
            weight_decay=weight_decay,
            decay_bias=decay_bias,
            clip_norm=clip_norm,
            clip_value=clip_value,
        )
        self.momentum = _number("momentum", momentum, low=0.0)
        self.dampening = _number("dampening", dampening, low=0.0, high=1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            msg = (
                "nesterov=True requires momentum > 0 and dampening == 0, "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )
            raise ValueError(msg)

    def _init_state(self, p, xp):
        return {"momentum_buffer": xp.zeros_like(p)} if self.momentum != 0 else {}

    def _fusable(self) -> bool:
        # neither the class nor this instance may have replaced the update or the step
        # (a wrapper that logs or inspects the gradients must see them)
        return (type(self)._update is SGD._update and type(self).step is Optimizer.step
                and "step" not in vars(self) and "_update" not in vars(self) and self.momentum == 0
                and self.weight_decay == 0 and self.clip_norm is None and self.clip_value is None)

    def _update(self, p, g, st, *, lr, wd, xp):
        if self.momentum != 0:  # one kernel of the set (one launch per array on a GPU)
            p, st["momentum_buffer"] = kernels_for(xp).sgd_momentum_update(
                p, g, st["momentum_buffer"], lr, self.momentum, self.dampening, self.nesterov, wd,
                self.step_count == 1, xp, self._work)
            return p
        if wd != 0:
            g = g + wd * p
        # p - lr * g with the same rounding (-(lr * g) is exact), without a temporary
        return self._axpy(p, -lr, g, xp)


# ----------------------------------------------------------------------------- Adam
class Adam(Optimizer):
    """Adam, with optional AMSGrad and coupled L2 weight decay.

    Update: ``p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``, ``m, v`` = EMAs of ``g, g*g``.

    Here ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``, ``g = grad + wd*p``
    (coupled L2), ``t`` counts steps from 1, and AMSGrad uses the running maximum
    of ``v`` in the denominator.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, ``>= 0``.
    betas : (float, float), default (0.9, 0.999)
        Decay rates ``(b1, b2)`` of the first and second moments, each in ``[0, 1)``.
    eps : float, default 1e-8
        Added to the denominator, ``>= 0``.
    weight_decay : float, default 0.0
        Coupled L2 coefficient ``wd`` (``g += wd * p``); see :class:`AdamW` for the
        decoupled form.
    amsgrad : bool, default False
        Use the running maximum of ``v`` (AMSGrad).
    decay_bias : bool, default False
        Apply weight decay to every parameter, not only the ``"W"`` matrices.
    clip_norm, clip_value : float, optional
        Global-norm and elementwise gradient clipping (see the module notes).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import Adam
    >>> params = [{"W": np.array([[1.0, -2.0]])}]
    >>> grads = [{"W": np.array([[0.5, -1.0]])}]
    >>> _ = Adam(lr=0.1).step(params, grads)  # the first step moves each entry by lr
    >>> np.round(params[0]["W"], 4)
    array([[ 0.9, -1.9]])
    """

    name = "adam"
    _hyper = ("betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        super().__init__(
            lr,
            weight_decay=weight_decay,
            decay_bias=decay_bias,
            clip_norm=clip_norm,
            clip_value=clip_value,
        )
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            msg = f"betas must be a pair (beta1, beta2), got {betas!r}"
            raise ValueError(msg)
        self.betas = (
            _number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
        )
        self.eps = _number("eps", eps, low=0.0)
        self.amsgrad = bool(amsgrad)

    def _init_state(self, p, xp):
        _check_eps_for(p, xp, self.eps, type(self).__name__)
        st = {"exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p)}
        if self.amsgrad:
            st["max_exp_avg_sq"] = xp.zeros_like(p)
        return st

    def _update(self, p, g, st, *, lr, wd, xp):
        b1, b2 = self.betas
        p, st["exp_avg"], st["exp_avg_sq"], vmax = kernels_for(xp).adam_update(
            p, g, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq") if self.amsgrad else None,
            lr, b1, b2, self.eps, wd, self._decoupled, self.step_count, xp, self._work)
        if self.amsgrad:
            st["max_exp_avg_sq"] = vmax
        return p


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Update: ``p -= lr*wd*p`` then ``p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``, as in :class:`Adam`.

    The moments ``m`` and ``v`` are those of :class:`Adam` on the raw gradient; the
    decay is scaled by the step's learning rate.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, ``>= 0``.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moments, each in ``[0, 1)``.
    eps : float, default 1e-8
        Added to the denominator, ``>= 0``.
    weight_decay : float, default 1e-2
        Decoupled decay coefficient ``wd``, scaled by the step's learning rate.
    amsgrad : bool, default False
        Use the running maximum of ``v`` (AMSGrad).
    decay_bias : bool, default False
        Decay every parameter, not only the ``"W"`` matrices.
    clip_norm, clip_value : float, optional
        Global-norm and elementwise gradient clipping (see the module notes).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import AdamW
    >>> params = [{"W": np.ones((1, 2)), "b": np.ones(2)}]
    >>> grads = [{"W": np.zeros((1, 2)), "b": np.zeros(2)}]
    >>> _ = AdamW(lr=0.1, weight_decay=0.5).step(params, grads)  # W *= 1 - lr * wd
    >>> np.round(params[0]["W"], 4), params[0]["b"]  # the bias is not decayed
    (array([[0.95, 0.95]]), array([1., 1.]))
    """

    name = "adamw"
    _decoupled = True

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        super().__init__(
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decay_bias=decay_bias,
            clip_norm=clip_norm,
            clip_value=clip_value,
        )


# ----------------------------------------------------------------------------- RMSprop
class RMSprop(Optimizer):
    """RMSprop, optionally centred and with momentum.

    Update: ``p -= lr * g / (sqrt(v - gbar**2 if centered else v) + eps)``, ``v = alpha*v + (1-alpha)*g*g``.

    Here ``g = grad + wd*p`` (coupled L2) and ``gbar = alpha*gbar + (1-alpha)*g``;
    with momentum, ``buf = momentum*buf + g / (sqrt(...) + eps)`` and ``p -= lr * buf``.

    Parameters
    ----------
    lr : float, default 1e-2
        Learning rate, ``>= 0``.
    alpha : float, default 0.99
        Smoothing constant of the squared-gradient average, in ``[0, 1]``.
    eps : float, default 1e-8
        Added to the denominator, ``>= 0``.
    momentum : float, default 0.0
        Momentum factor, ``>= 0``.
    centered : bool, default False
        Normalise by the estimated variance instead of the raw second moment.
    weight_decay : float, default 0.0
        Coupled L2 coefficient ``wd`` (``g += wd * p``).
    decay_bias : bool, default False
        Apply weight decay to every parameter, not only the ``"W"`` matrices.
    clip_norm, clip_value : float, optional
        Global-norm and elementwise gradient clipping (see the module notes).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import RMSprop
    >>> params = [{"W": np.array([[1.0, -2.0]])}]
    >>> grads = [{"W": np.array([[0.5, -1.0]])}]
    >>> _ = RMSprop(lr=0.01).step(params, grads)  # first step: lr / sqrt(1 - alpha) = 0.1
    >>> np.round(params[0]["W"], 4)
    array([[ 0.9, -1.9]])
    """

    name = "rmsprop"
    _hyper = ("alpha", "eps", "momentum", "centered", "weight_decay")

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        centered: bool = False,
        weight_decay: float = 0.0,
        *,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        super().__init__(
            lr,
            weight_decay=weight_decay,
            decay_bias=decay_bias,
            clip_norm=clip_norm,
            clip_value=clip_value,
        )
        self.alpha = _number("alpha", alpha, low=0.0, high=1.0)
        self.eps = _number("eps", eps, low=0.0)
        self.momentum = _number("momentum", momentum, low=0.0)
        self.centered = bool(centered)

    def _init_state(self, p, xp):
        _check_eps_for(p, xp, self.eps, type(self).__name__)
        st = {"square_avg": xp.zeros_like(p)}
        if self.centered:
            st["grad_avg"] = xp.zeros_like(p)
        if self.momentum > 0:
            st["momentum_buffer"] = xp.zeros_like(p)
        return st

    def _update(self, p, g, st, *, lr, wd, xp):
        p, st["square_avg"], gbar, buf = kernels_for(xp).rmsprop_update(
            p, g, st["square_avg"], st.get("grad_avg") if self.centered else None,
            st.get("momentum_buffer") if self.momentum > 0 else None, lr, self.alpha, self.eps, self.momentum, wd, xp,
            self._work)
        if self.centered:
            st["grad_avg"] = gbar
        if self.momentum > 0:
            st["momentum_buffer"] = buf
        return p


# ----------------------------------------------------------------------------- Adagrad
class Adagrad(Optimizer):
    """Adagrad, with optional learning-rate decay.

    Update: ``p -= lr/(1 + (t-1)*lr_decay) * g / (sqrt(s) + eps)``, ``s += g*g``.

    Here ``g = grad + wd*p`` (coupled L2), ``t`` counts steps from 1, and ``s``
    starts at ``initial_accumulator_value``.

    Parameters
    ----------
    lr : float, default 1e-2
        Learning rate, ``>= 0``.
    lr_decay : float, default 0.0
        Learning-rate decay per step, ``>= 0``.
    eps : float, default 1e-10
        Added to the denominator, ``>= 0``.
    weight_decay : float, default 0.0
        Coupled L2 coefficient ``wd`` (``g += wd * p``).
    initial_accumulator_value : float, default 0.0
        Starting value of the sum of squared gradients ``s``, ``>= 0``.
    decay_bias : bool, default False
        Apply weight decay to every parameter, not only the ``"W"`` matrices.
    clip_norm, clip_value : float, optional
        Global-norm and elementwise gradient clipping (see the module notes).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp import Adagrad
    >>> params = [{"W": np.array([[1.0, -2.0]])}]
    >>> grads = [{"W": np.array([[0.5, -1.0]])}]
    >>> opt = Adagrad(lr=0.1)
    >>> for _ in range(2):  # steps of lr, then lr / sqrt(2), as s accumulates g*g
    ...     _ = opt.step(params, grads)
    >>> np.round(params[0]["W"], 4)
    array([[ 0.8293, -1.8293]])
    """

    name = "adagrad"
    _hyper = ("lr_decay", "eps", "weight_decay", "initial_accumulator_value")

    def __init__(
        self,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        *,
        decay_bias: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
    ) -> None:
        super().__init__(
            lr,
            weight_decay=weight_decay,
            decay_bias=decay_bias,
            clip_norm=clip_norm,
            clip_value=clip_value,
        )
        self.lr_decay = _number("lr_decay", lr_decay, low=0.0)
        self.eps = _number("eps", eps, low=0.0)
        self.initial_accumulator_value = _number(
            "initial_accumulator_value", initial_accumulator_value, low=0.0
        )

    def _init_state(self, p, xp):
        return {"sum": xp.full_like(p, self.initial_accumulator_value)}

    def _update(self, p, g, st, *, lr, wd, xp):
        clr = lr / (1.0 + (self.step_count - 1) * self.lr_decay)
        p, st["sum"] = kernels_for(xp).adagrad_update(p, g, st["sum"], clr, self.eps, wd, xp, self._work)
        return p


# ----------------------------------------------------------------------------- L-BFGS
#: scipy's default ``factr=1e7`` times float64's machine epsilon: the relative change
#: of the objective below which L-BFGS stops.
_LBFGS_FTOL = 1e7 * 2.220446049250313e-16
#: The longest step a line search tries (L-BFGS-B's bound without constraints).
_MAX_STEP = 1e10
#: Moré and Thuente's relative width below which a bracket counts as closed (L-BFGS-B's).
_MT_XTOL = 0.1
_LINE_SEARCHES = ("more_thuente", "strong_wolfe")


def _flat(params) -> list:
    """The arrays of a list of parameter dicts, in order: one vector, held as pieces."""
    return [a for layer in params for a in layer.values()]


def _lbfgs_arrays(params) -> tuple[list, Any]:
    """``params``' arrays (:func:`_flat`) and namespace, refused when there are none or
    they are float16."""
    _check_structure(params, params)
    arrays = _flat(params)
    if not arrays:
        msg = "LBFGS needs at least one parameter array, got none"
        raise ValueError(msg)
    xp = get_namespace(*arrays)
    if is_float16(arrays[0].dtype, xp):
        msg = ("LBFGS needs float32 or float64 parameters, got float16: its dot products and curvature "
               "pairs lose all precision there; train in float32")
        raise ValueError(msg)
    return arrays, xp


def _vdot(a: list, b: list, xp):
    """``sum_i a_i . b_i`` over two lists of arrays of the same shapes: a 0-d array.

    Each term is ``matmul`` of two 1-d views (a BLAS dot product, no temporary):
    array-api-compat's ``vecdot`` for torch costs about 30 times as much on large vectors.
    """
    total = None
    for ai, bi in zip(a, b):
        s = xp.matmul(xp.reshape(ai, (-1,)), xp.reshape(bi, (-1,)))
        total = s if total is None else total + s
    return total


def _largest(arrays: list, xp):
    """``max_i |a_i|`` over all entries of a list of arrays: a 0-d array."""
    return xp.max(xp.stack([xp.max(xp.abs(xp.reshape(a, (-1,)))) for a in arrays]))


def _host_floats(values, xp) -> list[float]:
    """0-d arrays read to the host in one transfer."""
    return [float(v) for v in to_numpy(xp.stack(values))]


def _interpolate(t1, f1, g1, t2, f2, g2, lo, hi) -> float:
    """The minimiser, clamped to ``[lo, hi]``, of the cubic through ``(t1, f1)`` and
    ``(t2, f2)`` with slopes ``g1``, ``g2`` (Nocedal & Wright, eq. 3.59); of the quadratic
    through ``f1, g1, f2`` when the cubic has no minimiser; the midpoint when neither has.
    """
    mid = 0.5 * (lo + hi)
    if not all(map(math.isfinite, (t1, f1, g1, t2, f2, g2))) or t1 == t2:
        return mid
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = d1 * d1 - g1 * g2
    t = None
    if disc >= 0.0:
        d2 = math.copysign(math.sqrt(disc), t2 - t1)
        den = g2 - g1 + 2.0 * d2
        if den != 0.0:
            t = t2 - (t2 - t1) * (g2 + d2 - d1) / den
    if t is None:  # the quadratic q(t1) = f1, q'(t1) = g1, q(t2) = f2
        dt = t2 - t1
        curv = f2 - f1 - g1 * dt
        if curv > 0.0:
            t = t1 - g1 * dt * dt / (2.0 * curv)
    if t is None or not math.isfinite(t):
        return mid
    return min(max(t, lo), hi)


def _sqrt(v: float) -> float:
    """``sqrt(v)``, NaN for ``v < 0`` (rounding can push a discriminant just below 0;
    the caller's safeguards then take over, as in compiled implementations)."""
    return math.sqrt(v) if v >= 0.0 else math.nan


def _cubic_terms(ta, fa, ga, tb, fb, gb, *, clip=False):
    """``(theta, gamma)`` of the cubic through ``(ta, fa)``, ``(tb, fb)`` with slopes
    ``ga``, ``gb``: ``theta = 3 (fa - fb) / (tb - ta) + ga + gb`` and ``gamma =
    sqrt(theta^2 - ga gb)`` (scaled against overflow; ``clip``: 0 for a negative
    discriminant), from which its minimiser follows."""
    theta = 3.0 * (fa - fb) / (tb - ta) + ga + gb
    s = max(abs(theta), abs(ga), abs(gb))
    disc = (theta / s) ** 2 - (ga / s) * (gb / s)
    return theta, s * _sqrt(max(0.0, disc) if clip else disc)


def _safeguarded_step(lo, hi, t, ft, gt, bracketed, t_min, t_max):
    """One step of Moré and Thuente's interval update (their Section 4, the four cases).

    ``lo = (t_l, f_l, g_l)`` is the best step so far, ``hi = (t_u, f_u, g_u)`` the other
    end of the interval, ``(t, ft, gt)`` the new trial; ``t_min, t_max`` bound the new
    step when no minimiser is bracketed yet. Returns ``(lo, hi, t_next, bracketed)``.
    Steps come from the cubic through the two points with their slopes, the secant of
    the slopes (``t + g_t / (g_t - g_l) (t_l - t)``) or the quadratic through
    ``f_l, g_l, f_t``, chosen and safeguarded as in the paper.
    """
    tl, fl, gl = lo
    tu, fu, gu = hi
    same_sign = gl == 0.0 or gt * math.copysign(1.0, gl) >= 0.0

    if ft > fl:  # case 1: higher value, a minimiser lies between t_l and t
        theta, gamma = _cubic_terms(tl, fl, gl, t, ft, gt)
        if t < tl:
            gamma = -gamma
        r = ((gamma - gl) + theta) / (((gamma - gl) + gamma) + gt)
        tc = tl + r * (t - tl)
        tq = tl + ((gl / ((fl - ft) / (t - tl) + gl)) / 2.0) * (t - tl)
        t_next = tc if abs(tc - tl) < abs(tq - tl) else tc + (tq - tc) / 2.0
        bracketed = True
    elif not same_sign:  # case 2: lower value, slopes of opposite signs
        theta, gamma = _cubic_terms(tl, fl, gl, t, ft, gt)
        if t > tl:
            gamma = -gamma
        r = ((gamma - gt) + theta) / (((gamma - gt) + gamma) + gl)
        tc = t + r * (tl - t)
        ts = t + (gt / (gt - gl)) * (tl - t)
        t_next = tc if abs(tc - t) > abs(ts - t) else ts
        bracketed = True
    elif abs(gt) < abs(gl):  # case 3: lower value, same signs, the slope's size decreases
        theta, gamma = _cubic_terms(tl, fl, gl, t, ft, gt, clip=True)
        if t > tl:
            gamma = -gamma
        r = ((gamma - gt) + theta) / ((gamma + (gl - gt)) + gamma)
        if r < 0.0 and gamma != 0.0:
            tc = t + r * (tl - t)
        else:
            tc = t_max if t > tl else t_min
        ts = t + (gt / (gt - gl)) * (tl - t)
        if bracketed:
            t_next = tc if abs(tc - t) < abs(ts - t) else ts
            far = t + 0.66 * (tu - t)
            t_next = min(far, t_next) if t > tl else max(far, t_next)
        else:
            t_next = tc if abs(tc - t) > abs(ts - t) else ts
            t_next = max(t_min, min(t_max, t_next))
    else:  # case 4: lower value, same signs, the slope's size does not decrease
        if bracketed:
            theta, gamma = _cubic_terms(t, ft, gt, tu, fu, gu)
            if t > tu:
                gamma = -gamma
            r = ((gamma - gt) + theta) / (((gamma - gt) + gamma) + gu)
            t_next = t + r * (tu - t)
        else:
            t_next = t_max if t > tl else t_min
    if ft > fl:
        hi = (t, ft, gt)
    else:
        if not same_sign:
            hi = lo
        lo = (t, ft, gt)
    return lo, hi, t_next, bracketed


def _next_trial(lo, hi, t, f, g, gtest, bracketed, t_min, t_max, *, on_psi):
    """:func:`_safeguarded_step` on ``f`` or, with ``on_psi`` (Moré and Thuente's first
    stage: a lower value without sufficient decrease yet), on ``psi(t) = f(t) - t gtest``
    (constant dropped), its points mapped back after. Degenerate points (a zero-width
    interval, all slopes zero) give a NaN step, which the caller's safeguards replace, as
    in compiled implementations."""
    def shift(p, k):
        return p[0], p[1] + k * p[0] * gtest, p[2] + k * gtest

    try:
        if not on_psi:
            return _safeguarded_step(lo, hi, t, f, g, bracketed, t_min, t_max)
        lo_m, hi_m, t_next, bracketed = _safeguarded_step(shift(lo, -1), shift(hi, -1), t, f - t * gtest,
                                                          g - gtest, bracketed, t_min, t_max)
        return shift(lo_m, 1), shift(hi_m, 1), t_next, bracketed
    except ZeroDivisionError:
        return lo, hi, math.nan, bracketed


class _Trial:
    """One point of the line search: step ``t``, value ``f``, slope ``gtd`` along the
    direction, and the gradient arrays there."""

    __slots__ = ("f", "g", "gtd", "n", "t")

    def __init__(self, t, f, gtd, g, n=0):
        self.t, self.f, self.gtd, self.g, self.n = t, f, gtd, g, n


class LBFGSIteration:
    """What one iteration of :class:`LBFGS` reached: ``loss`` (a float), ``step`` (the
    line search's step length), ``n_fun`` (function evaluations so far), ``n_iter``, and
    ``evaluation``: which evaluation (counted from 1, the start's included) was at the
    point reached (``n_fun`` unless the evaluations ran out mid-search)."""

    __slots__ = ("evaluation", "loss", "n_fun", "n_iter", "step")

    def __init__(self, loss: float, step: float, n_fun: int, n_iter: int, evaluation: int | None = None):
        self.loss, self.step, self.n_fun, self.n_iter = loss, step, n_fun, n_iter
        self.evaluation = n_fun if evaluation is None else evaluation

    def __repr__(self) -> str:
        return (f"LBFGSIteration(loss={self.loss!r}, step={self.step!r}, n_fun={self.n_fun}, "
                f"n_iter={self.n_iter}, evaluation={self.evaluation})")


class LBFGS(Optimizer):
    """Limited-memory BFGS with a strong-Wolfe line search, on any array namespace.

    A full-batch optimiser: it owns the iteration and calls the objective itself, so
    it has no per-batch :meth:`step`; use :meth:`minimize` (or :meth:`iterate`) with a
    function ``fun(params) -> (loss, grads)``, or ``fit(model, x, y,
    optimizer="lbfgs")``, which trains on the whole data set with it.

    Direction: ``d = -H g`` by the two-loop recursion over the last ``history_size``
    pairs ``s = x_{k+1} - x_k``, ``y = g_{k+1} - g_k``, with ``H_0 = (s.y / y.y) I`` from
    the latest pair; a pair whose curvature ``y.s`` is at most ``eps * (-g_k.s)`` is
    skipped. This is the quasi-Newton step of scipy's L-BFGS-B without bounds (its compact
    form of the same matrix), and the default line search is L-BFGS-B's too, so that from
    the same start both take the same iterates up to rounding, as scikit-learn's
    ``solver="lbfgs"`` does through scipy:

    - ``line_search="more_thuente"``: Moré and Thuente's search with L-BFGS-B's constants
      (``c1 = 1e-3``, ``c2 = 0.9``, relative bracket width 0.1, at most ``max_ls = 20``
      evaluations); the first trial step is ``lr / ||g||_2`` on the first iteration (a
      step of unit length along ``-g``) and ``lr`` after. When the bracket closes or
      rounding stops progress it takes the last trial, as L-BFGS-B does.
    - ``line_search="strong_wolfe"``: Nocedal & Wright's Algorithms 3.5 and 3.6
      (bracketing, then zoom by cubic interpolation with quadratic and bisection
      fallbacks), the first trial step ``lr * min(1, 1/||g||_1)``, then ``lr``: the search
      of ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` (with ``c1=1e-4,
      max_ls=25``, its constants).

    A line search that ends without an acceptable point drops the history and retries
    along ``-g``; without history to drop, the run stops.

    The parameters are one vector held as the list of the model's arrays: dot products
    are sums over the list, and nothing is concatenated. The state is the current
    point, its gradient, the direction and ``2 * history_size`` vectors, each the size
    of the parameters. A line search compares numbers, so each function evaluation
    reads two scalars to the host (the value and the slope, in one transfer), and each
    iteration two more transfers (the direction's slope and size; the new pair's
    ``y.y`` with the new gradient's largest entry); the vector arithmetic stays on
    the device.

    Stopping, as scikit-learn's use of scipy's L-BFGS-B, tested in its order after each
    iteration: ``max_iter`` iterations; ``max_fun`` evaluations of the objective (never
    exceeded: a line search cut short takes its lowest point with sufficient decrease,
    if any; scipy finishes the iteration and may pass ``maxfun``); ``max |g_i| <= tol``
    (scipy's ``gtol``/``pgtol``, also tested at the start); ``(f_k - f_{k+1}) /
    max(|f_k|, |f_{k+1}|, 1) <= ftol`` (scipy's ``ftol = factr * eps``). After a run,
    :attr:`status` and :attr:`message` say which rule stopped it.

    Parameters
    ----------
    lr : float, default 1.0
        Scale of the first trial step of each line search, ``> 0``.
    history_size : int, default 10
        Pairs ``(s, y)`` kept (``m``; scipy's ``maxcor``).
    max_iter : int or None, default None
        Iterations per :meth:`minimize` call; ``None``: no limit of its own.
    max_fun : int, default 15000
        Evaluations of the objective per call, the first included.
    tol : float, default 1e-5
        Stop when every gradient entry is at most ``tol`` in absolute value.
    ftol : float, default 2.22e-9
        Stop when the relative decrease of the objective is at most ``ftol``.
    c1, c2 : float, default 1e-3, 0.9
        Sufficient-decrease and curvature constants, ``0 < c1 < c2 < 1``.
    max_ls : int, default 20
        Evaluations per line search (scipy's ``maxls``).
    line_search : {"more_thuente", "strong_wolfe"}, default "more_thuente"
        L-BFGS-B's search, or torch's (see above).

    Attributes
    ----------
    n_iter : int
        Iterations of the last call.
    n_fun : int
        Objective evaluations of the last call.
    loss : float or None
        The objective at the current point of the last call.
    status : str or None
        ``"gtol"``, ``"ftol"``, ``"max_iter"``, ``"max_fun"``, ``"line_search"`` or
        ``"interrupted"`` (the caller stopped iterating).
    message : str
        The reason in words.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.optim import LBFGS
    >>> A = np.array([[3.0, 1.0], [1.0, 2.0]]); b = np.array([1.0, -1.0])
    >>> def fun(params):  # f(w) = w.A.w / 2 - b.w, minimised at A^-1 b
    ...     w = params[0]["w"]
    ...     return w @ A @ w / 2 - b @ w, [{"w": A @ w - b}]
    >>> params = [{"w": np.zeros(2)}]
    >>> opt = LBFGS(tol=1e-10)
    >>> _ = opt.minimize(fun, params)
    >>> np.allclose(params[0]["w"], np.linalg.solve(A, b), atol=1e-10), opt.n_iter, opt.n_fun
    (True, 4, 6)
    >>> opt.status
    'gtol'
    """

    name = "lbfgs"
    _hyper = ("history_size", "max_iter", "max_fun", "tol", "ftol", "c1", "c2", "max_ls", "line_search")

    def __init__(
        self,
        lr: float = 1.0,
        history_size: int = 10,
        max_iter: int | None = None,
        max_fun: int = 15000,
        tol: float = 1e-5,
        ftol: float = _LBFGS_FTOL,
        c1: float = 1e-3,
        c2: float = 0.9,
        max_ls: int = 20,
        line_search: str = "more_thuente",
    ) -> None:
        super().__init__(lr)
        _number("lr", lr, low=0.0, low_open=True)
        self.history_size = _count("history_size", history_size)
        self.max_iter = None if max_iter is None else _count("max_iter", max_iter)
        self.max_fun = _count("max_fun", max_fun)
        self.tol = _number("tol", tol, low=0.0)
        self.ftol = _number("ftol", ftol, low=0.0)
        self.c1 = _number("c1", c1, low=0.0, high=1.0, low_open=True, high_open=True)
        self.c2 = _number("c2", c2, low=self.c1, high=1.0, low_open=True, high_open=True)
        self.max_ls = _count("max_ls", max_ls)
        if line_search not in _LINE_SEARCHES:
            msg = f"line_search must be one of {_LINE_SEARCHES}, got {line_search!r}"
            raise ValueError(msg)
        self.line_search = line_search
        self.n_iter = 0
        self.n_fun = 0
        self.status: str | None = None
        self.message = ""
        self.loss: float | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """All constructor arguments, as a dict that rebuilds this optimiser."""
        d = {"lr": self.lr}
        d.update({k: getattr(self, k) for k in self._hyper})
        return d

    def __repr__(self) -> str:
        parts = [f"lr={self.lr!r}"] + [f"{k}={getattr(self, k)!r}" for k in self._hyper]
        return f"LBFGS({', '.join(parts)})"

    def step(self, params, grads, *, lr=None):
        """Not available: L-BFGS evaluates the objective itself (see :meth:`minimize`);
        ``params`` and ``grads`` (lists of dicts of arrays of the parameters' shapes) are not used."""
        msg = ("LBFGS has no per-batch step: it needs the objective, not one gradient. Call "
               "opt.minimize(fun, params) with fun(params) -> (loss, grads), or fit(model, x, y, "
               "optimizer='lbfgs'), which trains on the whole data set")
        raise TypeError(msg)

    def minimize(self, fun, params):
        """Minimise ``fun`` from ``params`` (updated in place); return ``params``.

        Parameters
        ----------
        fun : callable
            ``fun(params) -> (loss, grads)``: a 0-d array (or float) and gradients
            mirroring ``params``. It reads the parameters from the dicts it is given,
            which the line search fills with each trial point.
        params : list of dict of arrays
            The starting point (any shapes; one dict per layer, ``{}`` for layers
            without parameters); left at the last accepted point.

        Returns
        -------
        list of dict of arrays
            ``params``.
        """
        for _ in self.iterate(fun, params):
            pass
        return params

    # -- K independent runs side by side ----------------------------------------------
    def minimize_members(self, fun, params, *, limit: int | None = None):
        """K independent L-BFGS runs over stacked parameters (updated in place), each
        member's until its own stopping rule holds; return ``params``.

        Parameters
        ----------
        fun : callable
            ``fun(params) -> (losses, grads)``: the members' losses, shape (K,), and the
            gradients of their sum, mirroring ``params``.
        params : list of dict of arrays
            Every array of shape (K, ...): member ``k``'s parameters are the slices ``[k]``.
        limit : int, optional
            Iterations per member (status ``"interrupted"`` when it is reached).

        Returns
        -------
        list of dict of arrays
            ``params``, each member at its last accepted point. See :meth:`iterate_members`.
        """
        for _ in self.iterate_members(fun, params, limit=limit):
            pass
        return params

    def iterate_members(self, fun, params, *, limit: int | None = None):
        """K independent L-BFGS runs side by side, one per member of stacked parameters.

        Every array of ``params`` has a leading member axis of length K (an ensemble's
        parameters), and ``fun(params) -> (losses, grads)`` gives the K members' losses,
        shape (K,), and the gradients of their sum (so each member's own gradient in its
        slice), in one batched pass. Member ``i`` runs exactly the algorithm of
        :meth:`iterate` on its own slice, with its own line search, history, counters
        (``max_iter``, ``max_fun``) and stopping rules; each round evaluates all K members
        at their own trial points in one call of ``fun``, and a stopped member keeps its
        parameters. The runs end when every member has stopped.

        Each round reads at most four times to the host (the K losses with their slopes;
        for the members that finished a line search, their ``y.y`` and largest gradient
        entries; for the members starting one, their directions' slopes, largest entries
        and norms, and once more when a direction is no descent direction). The two-loop
        recursion runs over all K members' stacked histories at once, each history kept
        as an array (history_size, K, ...) per parameter with its newest pair last.

        Parameters
        ----------
        fun : callable
            ``fun(params) -> (losses, grads)``: ``losses`` of shape (K,).
        params : list of dict of arrays
            Every array of shape (K, ...); left at each member's last accepted point.
        limit : int, optional
            Iterations per member, after which it stops with status ``"interrupted"`` (a
            fit's ``epochs``).

        Yields
        ------
        list of (int, LBFGSIteration)
            The members that finished an iteration in the round, with what it reached
            (the parameter dicts hold those members' new points when it is yielded).

        Notes
        -----
        Afterwards (and at each yield) ``n_iter``, ``n_fun`` (int arrays (K,)), ``loss``
        (float array (K,)), ``status`` and ``message`` (lists of K strings) hold each
        member's, as :meth:`iterate` sets them for one run.

        Examples
        --------
        >>> import numpy as np
        >>> from arraymlp.optim import LBFGS
        >>> A = np.array([[3.0, 1.0], [1.0, 2.0]]); b = np.array([[1.0, -1.0], [2.0, 0.5]])
        >>> def fun(params):  # member k: w.A.w / 2 - b_k.w
        ...     w = params[0]["w"]                            # (2, 2): one row per member
        ...     return np.sum(w @ A * w, axis=1) / 2 - np.sum(b * w, axis=1), [{"w": w @ A - b}]
        >>> params = [{"w": np.zeros((2, 2))}]
        >>> opt = LBFGS(tol=1e-10)
        >>> _ = opt.minimize_members(fun, params)
        >>> np.allclose(params[0]["w"], np.linalg.solve(A, b.T).T), opt.n_iter.tolist(), opt.status
        (True, [4, 6], ['gtol', 'ftol'])
        """
        arrays, xp = _lbfgs_arrays(params)
        k = int(arrays[0].shape[0]) if arrays[0].ndim else 0
        if k < 1 or any(a.ndim < 1 or int(a.shape[0]) != k for a in arrays):
            msg = ("iterate_members needs parameters with a leading member axis of one length K >= 1, got shapes "
                   f"{[tuple(a.shape) for a in arrays]}")
            raise ValueError(msg)
        if limit is not None:
            limit = _count("limit", limit)
        st = _Members(self, arrays, xp, k)
        runs = [_MemberRun() for _ in range(k)]
        self.n_iter, self.n_fun = numpy.zeros(k, dtype=numpy.int64), numpy.zeros(k, dtype=numpy.int64)
        self.status, self.message = ["interrupted"] * k, ["stopped by the caller"] * k
        self.loss = numpy.full(k, numpy.nan)
        eps = float(xp.finfo(arrays[0].dtype).eps)
        f, gmax, st.G = st.evaluate(fun, params, None)
        bad = [i for i in range(k) if not math.isfinite(f[i])]
        if bad:
            msg = (f"the objective is not finite at the starting point of members {bad} ({[f[i] for i in bad]}); "
                   "L-BFGS needs a finite start")
            raise FloatingPointError(msg)
        pending: dict[int, tuple] = {}
        coroutines = []
        for i, run in enumerate(runs):
            run.n_fun, run.loss = 1, f[i]
            coroutines.append(self._member_steps(run, i, st, gmax[i], eps, limit))
            self._advance(coroutines, pending, i, None)
        try:
            while True:
                done = self._settle(st, coroutines, pending, runs)
                self._publish(runs)
                if done:
                    st.write(params, None)
                    yield done
                if not pending:
                    return
                f, slopes, grads = st.evaluate(fun, params, {i: cmd[1] for i, cmd in pending.items()})
                for i in list(pending):
                    runs[i].n_fun += 1
                    self._advance(coroutines, pending, i, (f[i], slopes[i], grads))
        finally:
            for c in coroutines:
                c.close()
            self._publish(runs)
            st.write(params, None)

    def _publish(self, runs) -> None:
        """The members' counts, losses and statuses, as this optimiser's attributes."""
        self.n_iter = numpy.array([r.n_iter for r in runs], dtype=numpy.int64)
        self.n_fun = numpy.array([r.n_fun for r in runs], dtype=numpy.int64)
        self.loss = numpy.array([r.loss for r in runs], dtype=numpy.float64)
        self.status, self.message = [r.status for r in runs], [r.message for r in runs]

    @staticmethod
    def _advance(coroutines, pending, i, reply) -> None:
        """Send ``reply`` to member ``i``'s run and note its next request (none once it stops)."""
        try:
            pending[i] = coroutines[i].send(reply)
        except StopIteration:
            pending.pop(i, None)

    #: The order in which a round serves the members' requests, so that each kind is
    #: served for all members together: a finished search's pair is stored before the
    #: next accepted step overwrites the round's pairs, and every new direction of the
    #: round comes from one two-loop recursion.
    _ORDER = ("iteration", "forget", "remember", "accept", "direction")

    def _settle(self, st, coroutines, pending, runs) -> list:
        """Serve the members' requests, kind by kind, until each member waits for an
        evaluation or has stopped; the iterations finished on the way."""
        done = []
        while True:
            kinds = {cmd[0] for cmd in pending.values()}
            kind = next((c for c in self._ORDER if c in kinds), None)
            if kind is None:
                return done
            who = sorted(i for i, cmd in pending.items() if cmd[0] == kind)
            if kind == "iteration":
                replies = {i: None for i in who}
                done.extend((i, pending[i][1]) for i in who)
            elif kind == "forget":
                st.forget(who)
                replies = {i: None for i in who}
            elif kind == "remember":
                st.remember({i: pending[i][1:] for i in who})
                replies = {i: None for i in who}
            elif kind == "accept":
                replies = st.accept({i: pending[i][1] for i in who})
            else:
                replies = st.direction({i: pending[i][1] for i in who})
            for i in who:
                self._advance(coroutines, pending, i, replies[i])

    def _member_steps(self, run, i, st, gmax, eps, limit):
        """Member ``i``'s run: :meth:`iterate`'s loop, step for step, with each piece of
        vector work asked of the driver (``("direction", norm)``, ``("eval", t)``,
        ``("accept", trial)``, ``("remember", rho, gamma)``, ``("forget",)``) and each
        iteration announced (``("iteration", LBFGSIteration)``)."""
        if gmax <= self.tol:
            self._stop("gtol", f"the largest gradient entry {gmax:.3g} is at most tol={self.tol:g}", run)
            return
        more_thuente = self.line_search == "more_thuente"
        f = run.loss
        while True:
            first = run.n_iter == 0
            norm = (2 if more_thuente else 1) if first else 0
            gtd0, dmax, size = yield ("direction", norm)
            if more_thuente:
                t0 = self.lr * min(1.0 / size, _MAX_STEP) if first else self.lr
                steps = self._more_thuente(run, f, gtd0, t0)
            else:
                t0 = self.lr * min(1.0, 1.0 / size) if first else self.lr
                steps = self._line_search(run, f, gtd0, t0, dmax, eps)
            best = yield from _evaluations(steps)
            if best is None or best.t == 0.0:
                if run.status == "max_fun":
                    self._stop("max_fun", f"maximum function evaluations ({self.max_fun}) reached", run)
                    return
                if st.pairs[i]:  # forget the curvature pairs and retry along -g once
                    yield ("forget",)
                    continue
                self._stop("line_search", "the line search found no acceptable point along the search direction",
                           run)
                return
            yy, gmax = yield ("accept", best)
            ys, gts = (best.gtd - gtd0) * best.t, -gtd0 * best.t
            if ys > eps * gts and yy > 0.0:
                yield ("remember", 1.0 / ys, ys / yy)
            f_old, f = f, best.f
            run.loss = f
            run.n_iter += 1
            out_of_fun = run.status == "max_fun"
            run.status, run.message = "interrupted", "stopped by the caller"
            yield ("iteration", LBFGSIteration(f, best.t, run.n_fun, run.n_iter, best.n))
            if limit is not None and run.n_iter >= limit:
                return
            if self._stops_after(f_old, f, gmax, out_of_fun, run):
                return


    # -- the iteration --------------------------------------------------------------
    def _set(self, params, x, d, t, xp) -> None:
        """Write ``x + t d`` into the parameter dicts (in place where allowed)."""
        i = 0
        for layer in params:
            for key, p in layer.items():
                new = x[i] + t * d[i] if t != 0.0 else x[i]
                if is_writeable(p):
                    p[...] = new
                else:
                    layer[key] = xp.asarray(new, copy=True)
                i += 1

    def _evaluate(self, fun, params, d, xp):
        value, grads = fun(params)
        self.n_fun += 1
        _check_structure(params, grads)
        g = _flat(grads)
        if not array_api_compat.is_array_api_obj(value):
            value = xp.asarray(value, dtype=g[0].dtype if g else None)
        # the value with its slope along d (a trial) or the largest gradient entry (the start), in one read
        f, other = _host_floats([xp.astype(value, g[0].dtype), _largest(g, xp) if d is None else _vdot(g, d, xp)],
                                xp)
        return f, other, g

    def iterate(self, fun, params):
        """Run L-BFGS from ``params``, yielding after each iteration.

        A generator: each item is an :class:`LBFGSIteration`; the parameter dicts hold
        that iteration's point when it is yielded. It ends when a stopping rule holds
        (:attr:`status`); the caller may stop earlier by leaving the loop (status
        ``"interrupted"``).

        Parameters
        ----------
        fun : callable
            ``fun(params) -> (loss, grads)``, as for :meth:`minimize`.
        params : list of dict of arrays
            The starting point (any shapes; ``grads`` mirrors them), updated in place.

        Yields
        ------
        LBFGSIteration

        Raises
        ------
        FloatingPointError
            When the objective is not finite at the starting point.
        """
        arrays, xp = _lbfgs_arrays(params)
        self.n_iter, self.n_fun, self.status, self.message = 0, 0, "interrupted", "stopped by the caller"
        finfo = xp.finfo(arrays[0].dtype)
        eps = float(finfo.eps)
        x = [xp.asarray(a, copy=True) for a in arrays]
        f, gmax, g = self._evaluate(fun, params, None, xp)
        if not math.isfinite(f):
            msg = f"the objective is {f} at the starting point; L-BFGS needs a finite start"
            raise FloatingPointError(msg)
        self.loss = f
        if gmax <= self.tol:
            self._stop("gtol", f"the largest gradient entry {gmax:.3g} is at most tol={self.tol:g}")
            return
        history: list[tuple[list, list, float]] = []  # (s, y, rho)
        gamma = 1.0
        more_thuente = self.line_search == "more_thuente"
        while True:
            first = self.n_iter == 0
            norm = (2 if more_thuente else 1) if first else 0
            d, gtd0, dmax, size = self._direction(g, history, gamma, xp, norm=norm)
            if more_thuente:  # L-BFGS-B: a first step of unit length, then the quasi-Newton step
                t0 = self.lr * min(1.0 / size, _MAX_STEP) if first else self.lr
                best = self._search(fun, params, x, d, self._more_thuente(self, f, gtd0, t0), xp)
            else:  # torch.optim.LBFGS's choice of the first step
                t0 = self.lr * min(1.0, 1.0 / size) if first else self.lr
                best = self._search(fun, params, x, d, self._line_search(self, f, gtd0, t0, dmax, eps), xp)
            if best is None or best.t == 0.0:
                self._set(params, x, d, 0.0, xp)
                if self.status == "max_fun":
                    self._stop("max_fun", f"maximum function evaluations ({self.max_fun}) reached")
                    return
                if history:  # as L-BFGS-B: forget the curvature pairs and retry along -g once
                    history.clear()
                    gamma = 1.0
                    continue
                self._stop("line_search", "the line search found no acceptable point along the search direction")
                return
            self._set(params, x, d, best.t, xp)
            s = [best.t * di for di in d]
            y = [gn - go for gn, go in zip(best.g, g)]
            for i, si in enumerate(s):
                x[i] = _iadd(x[i], si)
            # y.s from the two slopes along d, skipped below rounding of the decrease g.s (L-BFGS-B's rule)
            ys, gts = (best.gtd - gtd0) * best.t, -gtd0 * best.t
            ratio, gmax = self._remember(history, s, y, ys, gts, best.g, eps, xp)
            gamma = ratio or gamma
            f_old, f, g = f, best.f, best.g
            self.loss = f
            self.n_iter += 1
            self.step_count += 1
            out_of_fun = self.status == "max_fun"
            self.status, self.message = "interrupted", "stopped by the caller"
            yield LBFGSIteration(f, best.t, self.n_fun, self.n_iter, best.n)
            if self._stops_after(f_old, f, gmax, out_of_fun):
                return

    def _stop(self, status: str, message: str, run=None) -> None:
        run = self if run is None else run
        run.status, run.message = status, message

    def _stops_after(self, f_old: float, f: float, gmax: float, out_of_fun: bool, run=None) -> bool:
        """Whether a rule stops the run after an iteration from ``f_old`` to ``f`` (``gmax``:
        the new gradient's largest entry), tested in the order of scipy's L-BFGS-B: the
        limits, then the gradient, then the relative decrease. ``run`` holds the counts
        ``n_iter``, ``n_fun`` and gets ``status`` and ``message`` (default: this optimiser;
        one member's under :meth:`iterate_members`)."""
        run = self if run is None else run
        if self.max_iter is not None and run.n_iter >= self.max_iter:
            self._stop("max_iter", f"maximum iterations ({self.max_iter}) reached", run)
        elif out_of_fun or run.n_fun >= self.max_fun:
            self._stop("max_fun", f"maximum function evaluations ({self.max_fun}) reached", run)
        elif gmax <= self.tol:
            self._stop("gtol", f"the largest gradient entry {gmax:.3g} is at most tol={self.tol:g}", run)
        elif (f_old - f) / max(abs(f_old), abs(f), 1.0) <= self.ftol:
            self._stop("ftol", f"the relative decrease of the objective is at most ftol={self.ftol:.3g}", run)
        else:
            return False
        return True

    def _remember(self, history, s, y, ys, gts, g, eps, xp) -> tuple[float | None, float]:
        """Keep the pair ``(s, y)`` unless its curvature ``ys = y.s`` is at most rounding of
        ``gts = -g_old.s`` (as L-BFGS-B). Returns the new ``H_0`` scale ``y.s / y.y``
        (None when the pair is skipped) and the largest entry of the new gradient ``g``,
        read together."""
        yy, gmax = _host_floats([_vdot(y, y, xp), _largest(g, xp)], xp)
        if not (ys > eps * gts and yy > 0.0):
            return None, gmax
        history.append((s, y, 1.0 / ys))
        if len(history) > self.history_size:
            history.pop(0)
        return ys / yy, gmax

    def _direction(self, g, history, gamma, xp, *, norm: int):
        """The search direction with its slope, largest entry and (when ``norm`` is 1 or
        2) the gradient's 1-norm or the direction's 2-norm, read in one transfer:
        ``(d, g.d, max|d_i|, norm or None)``. ``d = -H g`` by the two-loop recursion, or
        ``-g`` (the history forgotten) when rounding made that no descent direction."""
        d = self._two_loop(g, history, gamma, xp)
        extra = ([sum(xp.sum(xp.abs(gi)) for gi in g)] if norm == 1
                 else [xp.sqrt(_vdot(d, d, xp))] if norm == 2 else [])
        gtd, dmax, *rest = _host_floats([_vdot(g, d, xp), _largest(d, xp), *extra], xp)
        if not gtd < 0.0:
            history.clear()
            d = [-gi for gi in g]
            extra = [xp.sqrt(_vdot(d, d, xp))] if norm == 2 else extra
            gtd, dmax, *rest = _host_floats([_vdot(g, d, xp), _largest(d, xp), *extra], xp)
        return d, gtd, dmax, rest[0] if rest else None

    def _two_loop(self, g, history, gamma, xp):
        """``-H g`` by the two-loop recursion (the arrays of ``g`` are not modified)."""
        q = [-gi for gi in g]
        alphas = []
        for s, y, rho in reversed(history):
            a = rho * _vdot(s, q, xp)
            for i, yi in enumerate(y):
                q[i] = _isub(q[i], a * yi)
            alphas.append(a)
        if history and gamma != 1.0:
            q = [_imul(qi, gamma) for qi in q]
        for (s, y, rho), a in zip(history, reversed(alphas)):
            b = rho * _vdot(y, q, xp)
            for i, si in enumerate(s):
                q[i] = _iadd(q[i], (a - b) * si)
        return q

    def _search(self, fun, params, x, d, steps, xp):
        """Drive a line search's ``steps`` (a generator from :meth:`_more_thuente` or
        :meth:`_line_search`: it yields trial steps and is sent ``(f, g.d, g)`` at each)
        along ``d`` from ``x``, one evaluation at a time; return its result."""
        try:
            t = next(steps)
            while True:
                self._set(params, x, d, t, xp)
                t = steps.send(self._evaluate(fun, params, d, xp))
        except StopIteration as done:
            return done.value

    def _more_thuente(self, run, f0, gtd0, t):
        """Moré and Thuente's line search along ``d`` from step ``t`` (the search of
        L-BFGS-B, with its constants ``c1``, ``c2``, ``xtol = 0.1``, steps in
        ``[0, 1e10]``): a :class:`_Trial` meeting the strong Wolfe conditions, or the last
        trial when the bracket has closed below ``xtol`` or rounding stops progress (as
        L-BFGS-B takes it, even above ``f0``; the caller's ``ftol`` rule then stops);
        ``None`` after ``max_ls`` evaluations without one, or when the evaluations run
        out first with no trial of sufficient decrease (else that lowest trial).

        A generator, so that one run (:meth:`iterate`) or many side by side
        (:meth:`iterate_members`) drive it: it yields each trial step and is sent the
        trial's ``(f, g.d, g)``; ``run`` holds the evaluation count ``n_fun`` (already
        counting the trial when it is sent) and gets ``status = "max_fun"`` when the
        evaluations run out.

        Stage 1 works on ``psi(t) = f(t) - f0 - c1 t g0`` while no step has
        ``psi <= 0`` with a non-negative slope; each new step comes from
        :func:`_safeguarded_step`, with a bisection when the bracket has not shrunk by a
        third in two steps. A trial whose value or slope is not finite halves the step
        towards the best one (an addition: L-BFGS-B has no rule for it) and caps later steps.
        """
        c1, c2 = self.c1, self.c2
        gtest = c1 * gtd0
        bracketed, stage = False, 1
        width = _MAX_STEP
        width1 = 2.0 * width
        lo = hi = (0.0, f0, gtd0)  # (step, value, slope): the best step, and the bracket's other end
        t_min, t_max = 0.0, 5.0 * t
        lowest = None  # the lowest trial with sufficient decrease, for an evaluation cap
        t_bad = math.inf  # the shortest step found not finite
        for _ in range(self.max_ls):
            if run.n_fun >= self.max_fun:
                run.status = "max_fun"
                return lowest
            f, gtd, g = yield t
            if not (math.isfinite(f) and math.isfinite(gtd)):
                t_bad = min(t_bad, t)
                t = lo[0] + 0.5 * (t - lo[0])
                continue
            cur = _Trial(t, f, gtd, g, run.n_fun)
            ftest = f0 + t * gtest
            if f <= ftest and (lowest is None or f < lowest.f):
                lowest = cur
            if stage == 1 and f <= ftest and gtd >= 0.0:
                stage = 2
            if f <= ftest and abs(gtd) <= -c2 * gtd0:
                return cur  # the strong Wolfe conditions
            if bracketed and (t <= t_min or t >= t_max or t_max - t_min <= _MT_XTOL * t_max):
                return cur  # no progress possible within the bracket
            if t == _MAX_STEP and f <= ftest and gtd <= gtest:
                return cur
            lo, hi, t_next, bracketed = _next_trial(lo, hi, t, f, gtd, gtest, bracketed, t_min, t_max,
                                                    on_psi=stage == 1 and lo[1] >= f > ftest)
            if bracketed:
                if abs(hi[0] - lo[0]) >= 0.66 * width1:
                    t_next = lo[0] + 0.5 * (hi[0] - lo[0])
                width1, width = width, abs(hi[0] - lo[0])
                t_min, t_max = min(lo[0], hi[0]), max(lo[0], hi[0])
            else:
                t_min, t_max = t_next + 1.1 * (t_next - lo[0]), t_next + 4.0 * (t_next - lo[0])
            t_next = min(t_next, _MAX_STEP) if t_next >= 0.0 else 0.0  # NaN counts as 0, as fmax does
            if bracketed and (t_next <= t_min or t_next >= t_max or t_max - t_min <= _MT_XTOL * t_max):
                t_next = lo[0]
            if t_next >= t_bad:
                t_next = lo[0] + 0.5 * (t_bad - lo[0])
            t = t_next
        return None

    def _line_search(self, run, f0, gtd0, t, dmax, eps):
        """A step meeting the strong Wolfe conditions along ``d`` (or, when evaluations
        run out first, the lowest point found with sufficient decrease): a
        :class:`_Trial`, or ``None`` when no point below ``f0`` was found. A generator,
        driven as :meth:`_more_thuente` is."""
        c1, c2 = self.c1, self.c2
        prev = _Trial(0.0, f0, gtd0, None)
        for i in range(self.max_ls):
            if run.n_fun >= self.max_fun:
                run.status = "max_fun"
                return prev
            f, gtd, g = yield t
            cur = _Trial(t, f if math.isfinite(f) else math.inf, gtd, g, run.n_fun)
            if cur.f > f0 + c1 * t * gtd0 or (i > 0 and cur.f >= prev.f):
                return (yield from self._zoom(run, f0, gtd0, prev, cur, dmax, eps, i + 1))
            if abs(cur.gtd) <= -c2 * gtd0:
                return cur
            if cur.gtd >= 0.0:
                return (yield from self._zoom(run, f0, gtd0, cur, prev, dmax, eps, i + 1))
            # extrapolate: beyond t by at least 1% of the last stride, at most 10 t
            lo, hi = t + 0.01 * (t - prev.t), 10.0 * t
            t_next = _interpolate(prev.t, prev.f, prev.gtd, t, cur.f, cur.gtd, lo, hi)
            prev, t = cur, t_next
        return prev

    def _zoom(self, run, f0, gtd0, lo, hi, dmax, eps, used):
        """Nocedal & Wright's zoom between ``lo`` (sufficient decrease, the lower value)
        and ``hi``; return the Wolfe point, or ``lo`` when evaluations run out or the
        interval is narrow: below rounding, or (once ``lo`` is a step) at most a tenth of
        its upper end, as scipy's line search (``xtol=0.1``) does. On a piecewise-smooth
        objective (ReLU) the curvature condition may hold nowhere near a kink; this
        takes the lower point instead of closing in on the kink."""
        c1, c2 = self.c1, self.c2
        xtol = max(1e-9, 10.0 * eps)
        stalled = False
        while used < self.max_ls:
            a, b = min(lo.t, hi.t), max(lo.t, hi.t)
            if (b - a) * dmax < xtol or (lo.t > 0.0 and b - a <= 0.1 * b):
                break
            if run.n_fun >= self.max_fun:
                run.status = "max_fun"
                break
            t = _interpolate(lo.t, lo.f, lo.gtd, hi.t, hi.f, hi.gtd, a, b)
            # keep the trial off the ends of the interval: at once when it sits on one,
            # and on the second time running it falls within 10% of one
            margin = 0.1 * (b - a)
            if min(b - t, t - a) < margin:
                if stalled or t <= a or t >= b:
                    t = b - margin if abs(b - t) < abs(t - a) else a + margin
                    stalled = False
                else:
                    stalled = True
            else:
                stalled = False
            f, gtd, g = yield t
            used += 1
            cur = _Trial(t, f if math.isfinite(f) else math.inf, gtd, g, run.n_fun)
            if cur.f > f0 + c1 * t * gtd0 or cur.f >= lo.f:
                hi = cur
            else:
                if abs(cur.gtd) <= -c2 * gtd0:
                    return cur
                if cur.gtd * (hi.t - lo.t) >= 0.0:
                    hi = lo
                lo = cur
        return lo


def _evaluations(steps):
    """A line search's ``steps`` as requests ``("eval", t)``; its result."""
    try:
        t = next(steps)
        while True:
            t = steps.send((yield ("eval", t)))
    except StopIteration as done:
        return done.value


class _MemberRun:
    """One member's counts and status under :meth:`LBFGS.iterate_members` (what
    :meth:`LBFGS.iterate` keeps on the optimiser itself)."""

    __slots__ = ("loss", "message", "n_fun", "n_iter", "status")

    def __init__(self) -> None:
        self.n_iter, self.n_fun, self.loss = 0, 0, math.nan
        self.status, self.message = "interrupted", "stopped by the caller"


class _Members:
    """The vector state of K runs side by side (:meth:`LBFGS.iterate_members`), every
    array with the members along its leading axis: the points ``X``, their gradients
    ``G``, the directions ``D``, the trial steps (host, (K,)), and the histories ``S``,
    ``Y`` of shape (m, K, ...) per parameter with each member's newest pair last
    (``rho`` (K, m) on the host, 0 where a member has no pair). Each request kind of the
    members' runs is served for all of them at once, by masks over the member axis."""

    #: Whether the two-loop recursion runs member by member (the plain recursion on each
    #: member's slices) instead of once over the stacked histories; both give each
    #: member's direction, and benchmarks/lbfgs_members_vs_sequential.py times the two.
    per_member_two_loop = False

    def __init__(self, opt, arrays, xp, k: int) -> None:
        self.opt, self.xp, self.k, self.m = opt, xp, k, opt.history_size
        self.dtype, self.device = arrays[0].dtype, device_of(arrays[0])
        self.X = [xp.asarray(a, copy=True) for a in arrays]
        self.D = [xp.zeros_like(a) for a in arrays]
        self.G: list = []
        self.S: list | None = None
        self.Y: list | None = None
        self.rho = numpy.zeros((k, self.m))
        self.gamma = numpy.ones(k)
        self.pairs = numpy.zeros(k, dtype=numpy.int64)
        self.t = numpy.zeros(k)
        self.new_s: list = []
        self.new_y: list = []

    # helpers over the member axis
    def _vec(self, values):
        return self.xp.asarray(numpy.asarray(values, dtype=numpy.float64), dtype=self.dtype, device=self.device)

    def _mask(self, members) -> Any:
        m = numpy.zeros(self.k, dtype=bool)
        m[list(members)] = True
        return self.xp.asarray(m, device=self.device)

    def _per(self, v, a, lead: int = 0):
        """A (K,) array shaped to broadcast over ``a`` (with ``lead`` leading axes before K)."""
        return self.xp.reshape(v, (1,) * lead + (self.k,) + (1,) * (a.ndim - 1 - lead))

    def _dots(self, a: list, b: list):
        """``a_k . b_k`` for every member ``k``: (K,)."""
        xp, k = self.xp, self.k
        total = None
        for ai, bi in zip(a, b):
            s = xp.reshape(xp.matmul(xp.reshape(ai, (k, 1, -1)), xp.reshape(bi, (k, -1, 1))), (k,))
            total = s if total is None else total + s
        return total

    def _largest(self, a: list):
        xp, k = self.xp, self.k
        return xp.max(xp.stack([xp.max(xp.abs(xp.reshape(ai, (k, -1))), axis=1) for ai in a]), axis=0)

    def _read(self, values) -> numpy.ndarray:
        """(K,) arrays read to the host in one transfer: (len(values), K) floats."""
        return numpy.asarray(to_numpy(self.xp.stack(values)), dtype=numpy.float64)

    def write(self, params, steps) -> None:
        """Write ``X + t D`` (each member its own ``t``; ``X`` when ``steps`` is None)."""
        xp = self.xp
        tv = None if steps is None else self._vec(steps)
        i = 0
        for layer in params:
            for key, p in layer.items():
                new = self.X[i] if tv is None else self.X[i] + self._per(tv, self.X[i]) * self.D[i]
                if is_writeable(p):
                    p[...] = new
                else:
                    layer[key] = xp.asarray(new, copy=True)
                i += 1

    def evaluate(self, fun, params, trials):
        """``fun`` at the members' trial points (``trials``: member -> step; the others at
        their points): the losses and, for the start (``trials`` None), the largest
        gradient entries, else the slopes along the directions, read in one transfer; and
        the gradients."""
        xp = self.xp
        if trials is not None:
            self.t[:] = 0.0
            for i, t in trials.items():
                self.t[i] = t
        self.write(params, None if trials is None else self.t)
        values, grads = fun(params)
        _check_structure(params, grads)
        g = _flat(grads)
        if not array_api_compat.is_array_api_obj(values):
            values = xp.asarray(values, dtype=self.dtype, device=self.device)
        values = xp.reshape(xp.astype(values, self.dtype), (-1,))
        if int(values.shape[0]) != self.k:
            msg = f"fun must return one loss per member, shape ({self.k},), got shape {tuple(values.shape)}"
            raise ValueError(msg)
        other = self._largest(g) if trials is None else self._dots(g, self.D)
        f, second = self._read([values, other])
        return list(f), list(second), g

    def direction(self, requests: dict) -> dict:
        """New directions ``d = -H g`` for the requesting members (member -> norm kind), by
        one two-loop recursion over every member's history; their slopes, largest entries
        and norms read in one transfer (twice when some direction is no descent one:
        those members forget their pairs and take ``-g``)."""
        xp, who = self.xp, sorted(requests)
        mask = self._mask(who)
        d = self._two_loop_each(who) if self.per_member_two_loop else self._two_loop()
        self.D = [xp.where(self._per(mask, di), di, old) for di, old in zip(d, self.D)]
        gtd, dmax, n1, n2 = self._measure(requests)
        bad = [i for i in who if not gtd[i] < 0.0]
        if bad:
            self.forget(bad, gamma=False)
            mb = self._mask(bad)
            self.D = [xp.where(self._per(mb, gi), -gi, di) for gi, di in zip(self.G, self.D)]
            gtd, dmax, n1, n2 = self._measure(requests)
        norms = {0: None, 1: n1, 2: n2}
        return {i: (gtd[i], dmax[i], None if requests[i] == 0 else norms[requests[i]][i]) for i in who}

    def _measure(self, requests):
        xp = self.xp
        kinds = set(requests.values())
        zero = xp.zeros((self.k,), dtype=self.dtype, device=self.device)
        n1 = sum(xp.sum(xp.abs(xp.reshape(gi, (self.k, -1))), axis=1) for gi in self.G) if 1 in kinds else zero
        n2 = xp.sqrt(self._dots(self.D, self.D)) if 2 in kinds else zero
        gtd, dmax, n1, n2 = self._read([self._dots(self.G, self.D), self._largest(self.D), n1, n2])
        return gtd, dmax, n1, n2

    def _two_loop(self) -> list:
        """``-H g`` for every member over its own pairs (the slots where a member has no
        pair have ``rho = 0`` and change nothing), by the two-loop recursion."""
        q = [-gi for gi in self.G]
        if self.S is None or not self.pairs.any():
            return q
        used = [j for j in range(self.m) if self.rho[:, j].any()]
        alphas = {}
        for j in reversed(used):
            rho = self._vec(self.rho[:, j])
            s_j = [si[j, ...] for si in self.S]
            a = rho * self._dots(s_j, q)
            for n, yi in enumerate(self.Y):
                q[n] = _isub(q[n], self._per(a, q[n]) * yi[j, ...])
            alphas[j] = a
        gamma = numpy.where((self.pairs > 0) & (self.gamma != 1.0), self.gamma, 1.0)
        if (gamma != 1.0).any():
            gv = self._vec(gamma)
            q = [_imul(qi, self._per(gv, qi)) for qi in q]
        for j in used:
            rho = self._vec(self.rho[:, j])
            b = rho * self._dots([yi[j, ...] for yi in self.Y], q)
            c = alphas[j] - b
            for n, si in enumerate(self.S):
                q[n] = _iadd(q[n], self._per(c, q[n]) * si[j, ...])
        return q

    def _two_loop_each(self, who) -> list:
        """:meth:`_two_loop` member by member: the plain recursion on each requesting
        member's slices (its own pairs, oldest first), the rows stacked again (the others'
        rows are their current directions)."""
        xp, rows, asked = self.xp, [], set(who)
        for i in range(self.k):
            if i not in asked:
                rows.append([di[i, ...] for di in self.D])
                continue
            pairs = [] if self.S is None else [
                ([si[j, i, ...] for si in self.S], [yi[j, i, ...] for yi in self.Y], float(self.rho[i, j]))
                for j in range(self.m - int(self.pairs[i]), self.m)]
            rows.append(self.opt._two_loop([gi[i, ...] for gi in self.G], pairs, float(self.gamma[i]), xp))
        return [xp.stack([row[n] for row in rows]) for n in range(len(self.D))]

    def accept(self, requests: dict) -> dict:
        """The members' accepted trials (member -> :class:`_Trial`, its ``g`` the stacked
        gradients of its round): ``s = t d``, ``y = g_new - g``, ``x += s``, ``g = g_new``;
        ``y.y`` and the new gradient's largest entry read for all in one transfer."""
        xp, who = self.xp, sorted(requests)
        mask = self._mask(who)
        t = numpy.zeros(self.k)
        for i in who:
            t[i] = requests[i].t
        tv = self._vec(t)
        s = [self._per(tv, di) * di for di in self.D]
        g_new = list(self.G)
        rounds: dict[int, tuple[list, list[int]]] = {}
        for i in who:  # most members' trials come from the last round; a few from an earlier one
            rounds.setdefault(id(requests[i].g), (requests[i].g, []))[1].append(i)
        for grads, members in rounds.values():
            mr = self._mask(members)
            g_new = [xp.where(self._per(mr, gn), gr, gn) for gr, gn in zip(grads, g_new)]
        y = [gn - go for gn, go in zip(g_new, self.G)]
        self.X = [xp.where(self._per(mask, xi), xi + si, xi) for xi, si in zip(self.X, s)]
        self.G = g_new
        self.new_s, self.new_y = s, y
        yy, gmax = self._read([self._dots(y, y), self._largest(g_new)])
        return {i: (yy[i], gmax[i]) for i in who}

    def remember(self, requests: dict) -> None:
        """Append the round's pairs of the requesting members (member -> (rho, gamma)) to
        their histories, dropping each one's oldest when full."""
        xp, who = self.xp, sorted(requests)
        if self.S is None:
            self.S = [xp.zeros((self.m, *x.shape), dtype=self.dtype, device=self.device) for x in self.X]
            self.Y = [xp.zeros((self.m, *x.shape), dtype=self.dtype, device=self.device) for x in self.X]
        mask = None if len(who) == self.k else self._mask(who)

        def push(hist, new):
            shifted = xp.concat([hist[1:, ...], xp.expand_dims(new, axis=0)], axis=0)
            return shifted if mask is None else xp.where(self._per(mask, hist, lead=1), shifted, hist)

        self.S = [push(h, n) for h, n in zip(self.S, self.new_s)]
        self.Y = [push(h, n) for h, n in zip(self.Y, self.new_y)]
        for i in who:
            rho, gamma = requests[i]
            self.rho[i, :-1] = self.rho[i, 1:].copy()
            self.rho[i, -1] = rho
            self.gamma[i] = gamma
            self.pairs[i] = min(self.pairs[i] + 1, self.m)

    def forget(self, who, *, gamma: bool = True) -> None:
        """The members ``who`` drop their pairs (and, after a failed search, their scale)."""
        for i in who:
            self.rho[i, :] = 0.0
            self.pairs[i] = 0
            if gamma:
                self.gamma[i] = 1.0


# ----------------------------------------------------------------------------- registry
#: Optimiser names accepted by :func:`get_optimizer`.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
    "adagrad": Adagrad,
    "lbfgs": LBFGS,
}


def get_optimizer(name_or_instance: str | Optimizer, **kwargs: Any) -> Optimizer:
    """An optimiser from its name and hyper-parameters, or an instance passed through.

    Parameters
    ----------
    name_or_instance : str or Optimizer
        One of ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"lbfgs"``
        (case-insensitive), or an :class:`Optimizer`, returned as is.
    **kwargs
        Hyper-parameters for the named optimiser's constructor.

    Returns
    -------
    Optimizer

    Examples
    --------
    >>> from arraymlp import get_optimizer
    >>> opt = get_optimizer("Adam", lr=0.01)
    >>> opt
    Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)
    >>> get_optimizer(opt) is opt
    True
    """
    if isinstance(name_or_instance, Optimizer):
        if kwargs:
            msg = (
                f"hyper-parameters {sorted(kwargs)} cannot be combined with an optimizer "
                "instance; pass a name instead"
            )
            raise TypeError(msg)
        return name_or_instance
    if not isinstance(name_or_instance, str):
        msg = (
            f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or an Optimizer, "
            f"got {type(name_or_instance).__name__}"
        )
        raise TypeError(msg)
    try:
        cls = OPTIMIZERS[name_or_instance.lower()]
    except KeyError:
        msg = f"unknown optimizer {name_or_instance!r}; known optimizers: {', '.join(OPTIMIZERS)}"
        raise ValueError(msg) from None
    return cls(**kwargs)
