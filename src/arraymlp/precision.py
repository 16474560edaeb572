"""Mixed precision: float16 or bfloat16 compute over float32 master weights.

``fit(..., precision="float16")`` (or ``"bfloat16"``, or a :class:`MixedPrecision`)
keeps the model's parameters in float32 (the *master* weights, which the optimiser
updates and ``predict`` uses) and runs each training step's forward and backward pass
on copies cast to the compute dtype:

1. the master weights are cast to the compute dtype, the batch too;
2. forward in the compute dtype; the output is cast to float32 and the loss computed in
   float32 (softmax, logarithms and sums keep their range and precision);
3. the loss gradient is multiplied by the loss scale ``S`` and cast to the compute dtype,
   then backpropagated in it;
4. the gradients are cast to float32 and multiplied by ``1/S``; the optimiser updates the
   float32 master weights, so an update smaller than half a float16 spacing of a weight
   (``|lr * g| < 2**-12`` for a weight near 1) is not lost.

float16 has 5 exponent bits: gradients below ``2**-24`` flush to zero, so the loss
gradient is scaled up by ``S`` (dynamic loss scaling). When a scaled gradient overflows
(an infinite or NaN entry), the step is skipped: the master weights and the optimiser's
moments keep their values (an ``xp.where`` on the device: no host read) and ``S`` is
halved; after ``growth_interval`` good steps in a row ``S`` is doubled. The optimiser's
step counter still counts a skipped step (reading it back would cost a host read per
step), so Adam's bias correction after a skip uses a step count one higher than
PyTorch's ``GradScaler`` would. bfloat16 has float32's exponent range and needs no
scaling: its scale stays 1.

Ensembles (``MLP(..., ensemble=K)``) keep one loss scale per member: ``scale``,
``good_steps`` and ``skipped`` are arrays (K,), a member whose scaled gradients
overflow skips its own step (its parameters and moments keep their values) and halves
its own scale, and the other members step on. Each member's scale thus evolves as the
plain model's would, trained alone, and a member stays the plain model it would be
(see the ensembles page).

Where mixed precision pays: on GPUs with tensor cores (V100 and later for float16,
A100 and later for bfloat16), matrix products in half precision run several times
faster than float32's. On a CPU the same code runs (NumPy and torch have float16, torch
has bfloat16) but usually no faster: it is supported there so that it is tested.
"""

from __future__ import annotations

from typing import Any

from . import layers as L
from ._backend import backend_name, device_of, is_writeable, to_numpy
from .losses import LOSSES

__all__ = ["MixedPrecision", "resolve_precision"]

_COMPUTE = ("float16", "bfloat16")


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


class MixedPrecision:
    """Compute dtype and loss scaling of a mixed-precision run (see the module notes).

    ``y = forward(cast(W, dtype), cast(x, dtype))``, ``loss`` in float32, gradients
    ``g = cast(backward(S * dloss), float32) / S`` applied to the float32 ``W``.

    Parameters
    ----------
    dtype : {"float16", "bfloat16"}
        The compute dtype.
    dynamic : bool, optional
        Dynamic loss scaling; default True for float16, False for bfloat16 (whose scale
        stays 1, and whose steps are never skipped).
    init_scale : float, default 65536.0
        The first loss scale ``S`` (a power of two keeps the scaling exact).
    growth_interval : int, default 2000
        Good steps in a row after which ``S`` doubles.
    min_scale : float, default 1.0
        ``S`` is never halved below this.

    Attributes
    ----------
    scale : 0-d float32 array or None
        The current loss scale, on the model's device (None before the first step).
    good_steps : 0-d int32 array or None
        Good steps since the last change of ``S``.
    skipped : 0-d int32 array or None
        Steps skipped so far for a non-finite gradient. Reading any of these with
        ``float()`` or ``int()`` is a host read: do it at epoch end, not per step.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int64)
    >>> model = am.MLP([4, 8, 2], seed=0)
    >>> amp = am.MixedPrecision("float16", init_scale=1024.0)
    >>> _ = model.fit(x, y, loss="cross_entropy", epochs=2, progress=False, precision=amp)
    >>> model.params[0]["W"].dtype, float(amp.scale), int(amp.skipped)
    (dtype('float32'), 1024.0, 0)
    """

    def __init__(self, dtype: str = "float16", *, dynamic: bool | None = None, init_scale: float = 65536.0,
                 growth_interval: int = 2000, min_scale: float = 1.0):
        if dtype not in _COMPUTE:
            msg = f"the compute dtype of mixed precision must be one of {', '.join(_COMPUTE)}, got {dtype!r}"
            raise ValueError(msg)
        self.dtype_name = dtype
        self.dynamic = (dtype == "float16") if dynamic is None else bool(dynamic)
        init_scale = float(init_scale)
        if not (init_scale > 0 and init_scale < float("inf")):
            msg = f"init_scale must be a finite positive number, got {init_scale!r}"
            raise ValueError(msg)
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            msg = f"growth_interval must be a positive int, got {growth_interval!r}"
            raise ValueError(msg)
        min_scale = float(min_scale)
        if not (0 < min_scale <= init_scale):
            msg = f"min_scale must be positive and at most init_scale={init_scale:g}, got {min_scale!r}"
            raise ValueError(msg)
        self.init_scale = init_scale if self.dynamic else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.scale = self.good_steps = self.skipped = None
        self._where = None  # (namespace, device) of the state
        self._pending = None  # host values of a loaded state, put on the device at the next step

    def __repr__(self) -> str:
        return (f"MixedPrecision({self.dtype_name!r}, dynamic={self.dynamic}, init_scale={self.init_scale:g}, "
                f"growth_interval={self.growth_interval})")

    # -------------------------------------------------------------------- state
    def _state(self, xp, device, members: int | None = None) -> None:
        """The scale and counters as 0-d arrays on the device, or arrays (K,) of an
        ensemble's ``members``: made once per place and shape, from ``init_scale``, from
        a loaded state, or from the values they had on another place (the model moved:
        three host reads, once)."""
        shape = () if members is None else (members,)
        if self.scale is not None and self._where == (xp, device) and tuple(self.scale.shape) == shape:
            return
        values = self._pending if self.scale is None else self._host_values()
        if values is not None and isinstance(values[0], list) and (members is None or len(values[0]) != members):
            values = None  # per-member values of another member count: start afresh
        scale, good, skipped = values if values is not None else (self.init_scale, 0, 0)

        def make(v, dtype):
            if isinstance(v, list):
                return xp.asarray(v, dtype=dtype, device=device)
            return xp.full(shape, v, dtype=dtype, device=device)

        self.scale = make(scale, xp.float32)
        self.good_steps = make(good, xp.int32)
        self.skipped = make(skipped, xp.int32)
        self._where, self._pending = (xp, device), None

    def _host_values(self) -> tuple | None:
        """``(scale, good_steps, skipped)`` as Python numbers (host reads), or None
        before the first step."""
        if self.scale is None:
            return self._pending
        return (_host(self.scale, float), _host(self.good_steps, int), _host(self.skipped, int))

    def state_dict(self) -> dict:
        """The configuration and the loss-scale state as JSON-ready values (three host
        reads): what a checkpoint keeps, so that a resumed float16 run scales, skips and
        grows exactly as the uninterrupted one. ``scale`` and the counters are None
        before the first step."""
        values = self._host_values()
        scale, good, skipped = values if values is not None else (None, None, None)
        return {"dtype": self.dtype_name, "dynamic": self.dynamic, "init_scale": self.init_scale,
                "growth_interval": self.growth_interval, "min_scale": self.min_scale,
                "scale": scale, "good_steps": good, "skipped": skipped}

    def load_state_dict(self, state: dict) -> None:
        """Take the configuration and loss-scale state of :meth:`state_dict` (of the same
        compute dtype); the scale reaches the device at the next step."""
        if state.get("dtype") != self.dtype_name:
            msg = (f"the saved mixed-precision state is for dtype {state.get('dtype')!r}, but this run computes in "
                   f"{self.dtype_name!r}; pass precision={state.get('dtype')!r} to continue it")
            raise ValueError(msg)
        self.dynamic = bool(state["dynamic"])
        self.init_scale, self.min_scale = float(state["init_scale"]), float(state["min_scale"])
        self.growth_interval = int(state["growth_interval"])
        self.scale = self.good_steps = self.skipped = self._where = None
        self._pending = None if state.get("scale") is None else (  # an ensemble's: lists of K values
            _cast(state["scale"], float), _cast(state["good_steps"], int), _cast(state["skipped"], int))

    def copy(self) -> "MixedPrecision":
        """An independent MixedPrecision with this one's configuration and state (for
        ``model.copy()``: the copy trains on with its own loss scale)."""
        new = MixedPrecision(self.dtype_name, dynamic=self.dynamic, init_scale=self.init_scale,
                             growth_interval=self.growth_interval, min_scale=self.min_scale)
        new.load_state_dict(self.state_dict())
        return new

    def get_state(self) -> tuple:
        """Copies of ``(scale, good_steps, skipped)`` (Nones before the first step, with
        the loaded values still to be placed, if any), for :meth:`set_state`: no host read."""
        if self.scale is None:
            return (None, None, None, None, self._pending)
        xp = self._where[0]
        return (xp.asarray(self.scale, copy=True), xp.asarray(self.good_steps, copy=True),
                xp.asarray(self.skipped, copy=True), self._where, None)

    def set_state(self, state: tuple) -> None:
        """Back to a state of :meth:`get_state` (a replayed stretch of steps then scales
        its gradients as it did the first time: a state taken before the first step of a
        resumed run or a copy keeps the loaded scale pending, not ``init_scale``)."""
        self.scale, self.good_steps, self.skipped, self._where, self._pending = state

    def update_scale(self, ok, xp) -> None:
        """After a step whose gradients were all finite (``ok``, a 0-d boolean array, or
        one per member (K,) for an ensemble's per-member scales) or not: count it,
        double ``S`` after ``growth_interval`` good steps, halve it (not below
        ``min_scale``) and count a skip otherwise. Device arithmetic only."""
        # constants filled on the device: asarray of a number would copy it from the host (torch
        # does that synchronously on a GPU)
        one = xp.ones((), dtype=xp.int32, device=device_of(self.good_steps))
        zero = xp.zeros_like(self.good_steps)
        good = self.good_steps + one
        grow = good >= self.growth_interval
        halved = xp.maximum(self.scale * 0.5, xp.full((), self.min_scale, dtype=xp.float32,
                                                      device=device_of(self.scale)))
        self.scale = xp.where(ok, xp.where(grow, self.scale * 2.0, self.scale), halved)
        self.good_steps = xp.where(ok, xp.where(grow, zero, good), zero)
        self.skipped = self.skipped + xp.where(ok, zero, one)

    # -------------------------------------------------------------------- a step
    def loss_then_update(self, model, opt, lossfn, xb, yb, wb, *, xp, l2: float = 0.0, on_outputs=None):
        """One training step's loss and its update, in the compute dtype over the
        float32 master weights: ``(value, update)`` as the fit loop expects
        (``value`` is the float32 loss; ``update(lr)`` steps the optimiser).
        ``on_outputs(out)`` sees the batch's float32 outputs before backpropagation
        (``fit``'s metrics)."""
        device = device_of(xb)
        self._state(xp, device)
        cdt = getattr(xp, self.dtype_name)
        master, master_dtype = model.params, model.dtype
        compute = [{k: xp.astype(v, cdt) for k, v in p.items()} for p in master]
        fused = model._fused(lossfn)
        builtin = LOSSES.get(lossfn.name) is lossfn
        model.params, model.dtype = compute, cdt  # the model's passes read these
        try:
            out, caches = model.forward(xp.astype(xb, cdt), training=True, xp=xp,
                                        upto=len(model.layers) - 1 if fused else None)
            out = xp.astype(out, xp.float32)
            if on_outputs is not None:
                on_outputs(out)
            yl = yb if not xp.isdtype(yb.dtype, "real floating") else xp.astype(yb, xp.float32)
            wl = None if wb is None else xp.astype(wb, xp.float32)
            if builtin:
                value, dout = lossfn.fn(out, yl, xp=xp, sample_weight=wl, check=False)
            else:
                value, dout = lossfn.fn(out, yl, xp=xp, sample_weight=wl)
            if self.dynamic:
                dout = dout * self.scale
            grads = model._backprop(caches, xp.astype(dout, cdt), xp=xp, inplace=True)
        finally:
            model.params, model.dtype = master, master_dtype
        del caches, out
        if l2:
            value = value + model._l2_penalty(l2, xp)
        grads32 = master_grads(model.layers, master, grads, (1.0 / self.scale) if self.dynamic else None,
                               l2 if l2 else None, xp)

        def update(lr):
            if not self.dynamic:
                model.params = opt.step(model.params, grads32, lr=lr)
                return
            # a NaN or infinite entry makes its array's sum non-finite; finite float32
            # gradients unscaled from float16 cannot add up to float32's overflow
            ok = xp.asarray(True, device=device)
            for d in grads32:
                for gk in d.values():
                    ok = ok & xp.isfinite(xp.sum(gk))
            if opt.state is None:  # built now, so that a skipped first step keeps it
                opt.state = [{k: opt._init_state(p, xp) for k, p in layer.items()} for layer in model.params]
            elif opt._needs_placement:  # a loaded or moved state, placed now: a skip puts back the placed arrays
                opt._check_state(model.params, xp)
            before = _snapshot(model.params, opt.state, xp)
            model.params = opt.step(model.params, grads32, lr=lr)
            _keep_if_not(ok, before, model.params, opt.state, xp)
            self.update_scale(ok, xp)

        return value, update


def master_grads(layers, master, grads, inv, l2, xp) -> list[dict]:
    """The compute-dtype gradients ``grads`` as the master weights' dtype, unscaled by
    ``inv`` (``None``: no loss scale; a number, or an ensemble's (K, 1, 1) array) and with
    the L2 term ``l2 * W`` of each Dense weight added (``None``: no L2 term)."""
    out = []
    for layer, p, g in zip(layers, master, grads):
        d = {}
        for k, gk in g.items():
            gk = xp.astype(gk, p[k].dtype)
            if inv is not None:
                gk = gk * inv
            if l2 is not None and k == "W" and isinstance(layer, L.Dense):
                gk = gk + l2 * p[k]
            d[k] = gk
        out.append(d)
    return out


def _host(a, cast):
    """A 0-d array as a Python number, an ensemble's (K,) as a list (host reads)."""
    h = to_numpy(a)
    return cast(h) if h.ndim == 0 else [cast(v) for v in h.reshape(-1)]


def _cast(v, cast):
    return [cast(e) for e in v] if isinstance(v, list) else cast(v)


def _arrays(params, state):
    """``(container, key)`` of every parameter and optimiser-state array."""
    out = []
    for layer in params:
        out += [(layer, k) for k in layer]
    for layer in state or ():
        for st in layer.values():
            out += [(st, k) for k, v in st.items() if _is_array(v)]
    return out


def _snapshot(params, state, xp):
    return [(c, k, xp.asarray(c[k], copy=True)) for c, k in _arrays(params, state)]


def _keep_if_not(ok, before, params, state, xp) -> None:
    """Where ``ok`` is false, put back every array of ``before`` (a skipped step)."""
    for c, k, old in before:
        new = c[k]
        kept = xp.where(ok, new, old)
        if is_writeable(new):
            new[...] = kept
        else:
            c[k] = kept


def resolve_precision(precision: Any, model, xp, *, data_parallel: bool = False,
                      previous: MixedPrecision | None = None) -> MixedPrecision | None:
    """``fit``'s ``precision`` argument as a :class:`MixedPrecision` (None: the model's
    own dtype throughout), checked against the model and namespace. A dtype name that
    ``previous`` (the model's ``precision_``, for ``partial_fit``) computes in continues
    it, loss scale included."""
    if precision is None or (isinstance(precision, str) and precision == model.dtype_name):
        return None
    if isinstance(precision, str) and isinstance(previous, MixedPrecision) and previous.dtype_name == precision:
        precision = previous
    if isinstance(precision, str):
        if precision not in _COMPUTE:
            msg = (f"precision must be None, the model's dtype {model.dtype_name!r}, one of "
                   f"{', '.join(_COMPUTE)} or a MixedPrecision, got {precision!r}")
            raise ValueError(msg)
        precision = MixedPrecision(precision)
    if not isinstance(precision, MixedPrecision):
        msg = f"precision must be None, a dtype name or a MixedPrecision, got {type(precision).__name__}"
        raise TypeError(msg)
    if model.dtype_name != "float32":
        msg = (f"mixed precision keeps float32 master weights: build the model with dtype='float32' "
               f"(got dtype={model.dtype_name!r}) to train with precision={precision.dtype_name!r}")
        raise ValueError(msg)
    if getattr(xp, precision.dtype_name, None) is None:
        hint = " (NumPy has no bfloat16: use the torch backend)" if precision.dtype_name == "bfloat16" else ""
        msg = f"precision={precision.dtype_name!r}: the {backend_name(xp)} backend has no {precision.dtype_name}{hint}"
        raise ValueError(msg)
    if data_parallel:
        msg = "precision= is not supported together with comm= (data-parallel training) yet"
        raise ValueError(msg)
    return precision
