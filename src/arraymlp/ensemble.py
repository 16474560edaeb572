"""Ensembles: K networks of one architecture trained at once.

A model built with ``ensemble=K`` (``am.MLP(sizes, ensemble=K, seed=s)``) holds its
members' parameters stacked along a leading member axis: a dense layer's ``W`` has shape
(K, n_in, n_out) and its ``b`` (K, 1, n_out), a LayerNorm's ``gamma`` and ``beta``
(K, 1, d). The model's forward and backward passes are those of a plain model: the
kernels broadcast over the leading axis (``xp.matmul`` batches the K products), so
``model(x)`` with ``x`` of shape (n, n_features) gives (K, n, n_out), one batched matmul
per layer.

Member seeds
------------
Member ``i`` of ``MLP(sizes, ..., ensemble=K, seed=s)`` starts with exactly the parameters
of ``MLP(sizes, ..., seed=member_seeds(s, K)[i])``: its seed is the ``i``-th child of
``numpy.random.SeedSequence(s)`` (:func:`member_seeds`). A child does not depend on ``K``,
so a larger ensemble of the same seed starts with the smaller one's members; two
ensembles of different seeds share none.

Random streams
--------------
``model.rng`` of an ensemble is a :class:`MemberGenerators`: a shared generator,
``Generator(s)``, which draws the batch order the members share (so that a plain model
trained with ``fit(..., seed=t)`` sees the batches the ensemble sees with the same
``seed=t``), and member ``i``'s own generator, the one the plain model of member ``i``'s
seed holds after its initialisation, which draws member ``i``'s dropout masks and, with
``fit(..., shuffle="members")``, its batch order. ``fit(..., seed=t)`` starts them
afresh: ``Generator(t)`` and ``Generator(member_seeds(t, K)[i])``. A frozen member's
streams do not advance.

Training
--------
:func:`fit` trains every member on the same batches. Each member has its own loss (the
mean over the batch, weighted by its row of ``sample_weight``), its own gradient, and its
own optimiser hyper-parameters where they are given as K values; the update is the plain
optimiser's rule with those hyper-parameters broadcast as arrays of shape (K, 1, 1).
Member ``i`` then follows the trajectory of a plain model trained alone with member
``i``'s settings and initial parameters, to rounding. A member frozen by per-member early
stopping keeps its parameters, moments and step count (each member has its own,
``_MemberUpdate.steps``), as a stopped plain model keeps them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from typing import Any, Sequence

import numpy

from . import layers as L
from ._backend import (
    Generator,
    MemberGenerators,
    StepValues,
    check_same_backend,
    check_same_device,
    device_of,
    dtype_name,
    get_namespace,
    index_dtype,
    is_float16,
    is_sparse,
    is_writeable,
    quiet_overflow,
    slice_rows,
    take_rows,
    to_numpy,
)
from .callbacks import Callback, DivergenceError, EarlyStopping, History
from .fusion import plan_for
from .kernels import kernels_for
from .kernels.reference import _idiv, _imul, _isub, constant_like
from .losses import LOSSES, Loss, get_loss
from .metrics import Metric, _MembersPair, _Pair, accuracy, get_metrics, read_results
from .optim import LBFGS, OPTIMIZERS, SGD, Adagrad, Adam, Optimizer, RMSprop, get_optimizer
from .precision import _keep_if_not, master_grads, resolve_precision
from .precision import _snapshot as _amp_snapshot

__all__ = ["EnsembleHistory", "check_layers", "check_members", "cross_val_scores", "evaluate", "fit", "make_step",
           "member_seeds", "MemberGenerators", "partial_fit", "predict", "predict_proba"]


# ------------------------------------------------------------------------ members
def check_members(ensemble: Any) -> int | None:
    """``ensemble=`` validated: ``None`` (a plain model) or the member count, an int >= 1."""
    if ensemble is None:
        return None
    if isinstance(ensemble, bool) or not isinstance(ensemble, numbers.Integral) or ensemble < 1:
        msg = f"ensemble must be a member count K >= 1 (or None for a plain model), got {ensemble!r}"
        raise ValueError(msg)
    return int(ensemble)


def check_layers(layers) -> None:
    """Refuse layers whose behaviour over a leading member axis is unknown: an ensemble
    runs the library's Dense, Activation (and its shorthands), Dropout and LayerNorm, whose
    kernels broadcast over it; a layer of another class (a subclass too) may reduce over
    the wrong axis and be silently wrong."""
    known = (L.Dense, L.Dropout, L.LayerNorm)
    for i, layer in enumerate(layers):
        ok = type(layer) in known or (isinstance(layer, L.Activation)
                                      and type(layer).forward is L.Activation.forward
                                      and type(layer).backward is L.Activation.backward)
        if not ok:
            msg = (f"layer {i} ({layer!r}) is a {type(layer).__name__}: ensembles run the library's Dense, "
                   "Activation, Dropout and LayerNorm layers only (their kernels broadcast over the member axis)")
            raise TypeError(msg)


def member_seeds(seed: int | None, k: int) -> list[int]:
    """The seeds of an ensemble's members: member ``i`` of ``MLP(..., ensemble=k, seed=seed)``
    starts as ``MLP(..., seed=member_seeds(seed, k)[i])``.

    Seed ``i`` is the first 32-bit word of the ``i``-th child of
    ``numpy.random.SeedSequence(seed)``; it does not depend on ``k``.

    Parameters
    ----------
    seed : int or None
        ``None`` draws fresh entropy (the seeds then differ from call to call).
    k : int
        Member count.

    Returns
    -------
    list of int, length ``k``

    Examples
    --------
    >>> from arraymlp.ensemble import member_seeds
    >>> member_seeds(0, 3)[:2] == member_seeds(0, 2)
    True
    >>> len(set(member_seeds(0, 64)))
    64
    """
    k = check_members(k)
    children = numpy.random.SeedSequence(seed).spawn(k)
    return [int(c.generate_state(1, dtype=numpy.uint32)[0]) for c in children]


def _stacked(a, xp):
    """Member arrays ``a`` (each of a plain model's shape) stacked on a new first axis; a
    vector parameter (bias, LayerNorm's scale and shift) becomes (K, 1, d), which
    broadcasts over the batch axis of the stacked activations (K, n, d)."""
    s = xp.stack(a, axis=0)
    return xp.expand_dims(s, axis=1) if s.ndim == 2 else s


def stack_params(members: Sequence[list[dict[str, Any]]], xp) -> list[dict[str, Any]]:
    """The stacked parameters of an ensemble from its members' plain parameter lists."""
    first = members[0]
    return [{key: _stacked([m[i][key] for m in members], xp) for key in layer} for i, layer in enumerate(first)]


def member_params(params: list[dict[str, Any]], i: int, xp) -> list[dict[str, Any]]:
    """Copies of member ``i``'s parameters, in a plain model's shapes."""
    out = []
    for layer in params:
        d = {}
        for key, a in layer.items():
            m = a[i, ...]
            if a.ndim == 3 and a.shape[1] == 1 and key != "W":
                m = xp.reshape(m, (a.shape[2],))
            d[key] = xp.asarray(m, copy=True)
        out.append(d)
    return out


def init_members(layers, seeds: Sequence[int], xp, device, dtype) -> tuple[list[dict[str, Any]], list[Generator]]:
    """Stacked initial parameters, member ``i`` drawn as a plain model of seed
    ``seeds[i]``, and the members' generators after those draws (where a plain model's
    generator is after its initialisation)."""
    members, gens = [], []
    for s in seeds:
        rng = Generator(s, xp, device)
        members.append([layer.init_params(rng=rng, dtype=dtype) for layer in layers])
        gens.append(rng)
    return stack_params(members, xp), gens


def _member_generators(model, seed, xp) -> MemberGenerators:
    """The ensemble's generators for a fit: with ``seed``, fresh ones, the shared
    ``Generator(seed)`` (the batch order a plain model fitted with ``seed=seed`` draws) and
    member ``i``'s ``Generator(member_seeds(seed, K)[i])`` (what a plain model fitted with
    ``seed=member_seeds(seed, K)[i]`` draws); else the model's own (one without members'
    streams gets fresh ones of the members' seeds)."""
    k, device = model.ensemble, model.device
    if seed is not None:
        return MemberGenerators(Generator(seed, xp, device), [Generator(s, xp, device) for s in member_seeds(seed, k)])
    rng = model.rng
    if isinstance(rng, MemberGenerators) and len(rng.members) == k:
        return rng
    return MemberGenerators(rng, [Generator(s, xp, device) for s in model.member_seeds])


# ------------------------------------------------------------------- per-member values
def _per_member(name: str, value: Any, k: int, xp, like, *, low: float = 0.0, high: float | None = None,
                high_open: bool = False):
    """A hyper-parameter given as one number or K numbers: a float, or an array of shape
    (K, 1, 1) in ``like``'s dtype and place when the members differ."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        vals = [float(value)]
    else:
        try:
            vals = [float(v) for v in to_numpy(value).reshape(-1)] if hasattr(value, "shape") else \
                [float(v) for v in value]
        except (TypeError, ValueError):
            msg = f"{name} must be a number or a sequence of {k} numbers (one per member), got {value!r}"
            raise TypeError(msg) from None
        if len(vals) != k:
            msg = f"{name} has {len(vals)} values but the ensemble has {k} members; give one value or {k}"
            raise ValueError(msg)
    for v in vals:
        bad = math.isnan(v) or v < low or (high is not None and (v >= high if high_open else v > high))
        if bad:
            want = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}{')' if high_open else ']'}"
            msg = f"{name} values must be {want}, got {value!r}"
            raise ValueError(msg)
    if len(vals) == 1:
        return vals[0]
    return xp.reshape(xp.asarray(vals, dtype=like.dtype, device=like.device), (k, 1, 1))


def _member_weights(sample_weight, k: int, n: int, xp, like):
    """``sample_weight`` as (K, n) in the model's dtype: (n,) is every member's weights.
    Non-negative, finite, and every member with some positive weight; on the model's
    backend and device (else the error says how to move it)."""
    if sample_weight is None:
        return None
    check_same_backend(xp, get_namespace(sample_weight), "sample_weight")
    check_same_device(device_of(like), device_of(sample_weight), "sample_weight")
    w = sample_weight
    if tuple(w.shape) == (n,):
        w = xp.broadcast_to(xp.reshape(w, (1, n)), (k, n))
    elif tuple(w.shape) != (k, n):
        msg = (f"sample_weight must have shape (K, n) = ({k}, {n}) (one row per member) or (n,) = ({n},), "
               f"got shape {tuple(w.shape)}")
        raise ValueError(msg)
    if not (xp.isdtype(w.dtype, "real floating") or xp.isdtype(w.dtype, "integral")):
        msg = f"sample_weight must be a real number array, got dtype {w.dtype}"
        raise ValueError(msg)
    w = xp.astype(w, like.dtype)
    host = to_numpy(w)
    if not numpy.all(numpy.isfinite(host)):
        msg = "sample_weight must be finite"
        raise ValueError(msg)
    if numpy.any(host < 0):
        msg = f"sample_weight must be non-negative, found minimum {float(host.min())}"
        raise ValueError(msg)
    empty = numpy.flatnonzero(host.sum(axis=1) == 0).tolist()
    if empty:
        msg = f"sample_weight is all zero for members {empty}; each member needs a positive weight"
        raise ValueError(msg)
    return w


# --------------------------------------------------------------------------- losses
def _elementwise_kernels():
    from . import losses as _losses

    return {"mse": _losses._mse_kernel, "mae": _losses._mae_kernel, "huber": _losses._huber_kernel,
            "binary_cross_entropy": _losses._bce_kernel, "poisson_nll": _losses._poisson_kernel}


def _targets(lossfn, y, n_out: int, xp, dtype, members: bool = False):
    """Targets as an array that broadcasts against the outputs (K, n, n_out); with
    ``members``, ``y`` holds each member's own rows, a leading axis of K."""
    if lossfn.name == "cross_entropy":
        if xp.isdtype(y.dtype, "integral"):
            ix = index_dtype(xp)  # int32 on JAX's 32-bit mode, where int64 is truncated with a warning
            labels = xp.reshape(xp.astype(y, ix), (*y.shape, 1))
            return xp.astype(labels == xp.arange(n_out, dtype=ix, device=y.device), dtype)
        return xp.astype(y, dtype)
    y = xp.astype(y, dtype)
    if y.ndim == (2 if members else 1):
        return xp.reshape(y, (*y.shape, 1)) if n_out == 1 else xp.reshape(y, (*y.shape[:-1], -1, n_out))
    return y


def member_losses(lossfn, out, t, w, xp):
    """Each member's loss and the gradient of their sum with respect to ``out``.

    Parameters
    ----------
    lossfn : Loss
        A row of :data:`arraymlp.losses.LOSSES` (the fused ones take logits).
    out : array, shape (K, n, m)
    t : array, shape (n, m), or (K, n, m) (each member's own rows)
        Targets from :func:`_targets` (one-hot for labels).
    w : array of shape (K, n), or None
        Each member's sample weights; a batch in which a member's weights are all zero
        gives that member a loss and gradient of 0.

    Returns
    -------
    losses : array, shape (K,)
        ``L_k = sum_i w_ki l_ki / sum_i w_ki`` (``mean_i l_ki`` unweighted).
    d_out : array, shape (K, n, m)
        ``dL_k / d out_k``.
    """
    k, n, m = (int(d) for d in out.shape)
    ks = kernels_for(xp)

    def per_row(fn, a):  # a row reduction of the kernel set over (K*n, m) rows: (K, n, 1)
        return xp.reshape(fn(xp.reshape(a, (k * n, m)), xp), (k, n, 1))

    if lossfn.name == "cross_entropy":
        z = out - per_row(ks.row_max, out)
        e = xp.exp(z)
        s = per_row(ks.row_sum, e)
        tsum = xp.sum(t, axis=-1)  # (n,)
        z = _imul(z, t)  # t * z: z is not read again
        per_sample = tsum * xp.log(s)[..., 0] - per_row(ks.row_sum, z)[..., 0]  # (K, n)
        g = _isub(_imul(_idiv(e, s), xp.expand_dims(tsum, axis=-1)), t)  # softmax * sum(t) - t, into e
        scale_m = 1.0
    else:
        e, g = _elementwise_kernels()[lossfn.name](out, t, xp)
        per_sample = per_row(ks.row_sum, e)[..., 0] / float(m)
        scale_m = float(m)
    if w is None:
        losses = xp.sum(per_sample, axis=-1) / float(n)
        return losses, _imul(g, 1.0 / (n * scale_m))
    total = xp.sum(w, axis=-1)  # (K,)
    safe = xp.where(total > 0, total, xp.ones_like(total))
    losses = xp.sum(w * per_sample, axis=-1) / safe
    c = w / xp.reshape(safe * scale_m, (-1, 1))
    return losses, _imul(g, c[:, :, None])


def _custom_member_losses(lossfn, out, y, w, xp, members: bool = False):
    """A loss outside the table: its function once per member (correct, not fast);
    ``members``: ``y`` has each member's own rows (a leading axis of K)."""
    values, grads = [], []
    for i in range(out.shape[0]):
        wi = None if w is None else w[i, ...]
        if wi is not None and float(xp.sum(wi)) == 0.0:
            values.append(xp.zeros((), dtype=out.dtype, device=out.device))
            grads.append(xp.zeros_like(out[i, ...]))
            continue
        v, g = lossfn.fn(out[i, ...], y[i, ...] if members else y, xp=xp, sample_weight=wi)
        values.append(v)
        grads.append(g)
    return xp.stack(values), xp.stack(grads)


def _penalty(model, l2, xp):
    """Each member's ``l2/2 * sum(W**2)`` over its weight matrices, shape (K,)."""
    total = 0.0
    for layer, p in zip(model.layers, model.params):
        if isinstance(layer, L.Dense):
            W = p["W"]
            total = total + xp.sum(W * W, axis=(1, 2))
    lk = xp.reshape(l2, (-1,)) if hasattr(l2, "shape") else l2
    return 0.5 * lk * total


# ------------------------------------------------------------------------ optimiser
class _MemberUpdate:
    """The update rule of a plain optimiser with per-member hyper-parameters.

    The update of each stacked parameter is the plain optimiser's kernel of the set
    (:mod:`arraymlp.kernels`: ``sgd_momentum_update``, ``axpy``, ``adam_update``,
    ``rmsprop_update``, ``adagrad_update``), called with the per-member hyper-parameters:
    a float where the members share it (the plain model's operations exactly), or an
    array of shape (K, 1, 1) that broadcasts over the stacked parameters. Clipping acts
    per member (``clip_norm`` over a member's own gradients).
    """

    def __init__(self, opt: Optimizer, k: int, xp, like, *, lr, momentum, weight_decay, betas):
        self.opt, self.k, self.xp, self.like = opt, k, xp, like
        if type(opt) not in (SGD, Adam, RMSprop, Adagrad) and opt.name not in ("adamw",):
            msg = (f"ensembles train with the library's optimisers (sgd, adam, adamw, rmsprop, adagrad), "
                   f"got {type(opt).__name__}")
            raise TypeError(msg)
        self.lr = _per_member("lr", opt.lr if lr is None else lr, k, xp, like)
        self.wd = _per_member("weight_decay", opt.weight_decay if weight_decay is None else weight_decay,
                              k, xp, like)
        if momentum is not None and not hasattr(opt, "momentum"):
            msg = f"momentum= needs an optimiser with momentum (sgd, rmsprop), got {opt.name!r}"
            raise ValueError(msg)
        if betas is not None and not isinstance(opt, Adam):
            msg = f"betas= needs adam or adamw, got {opt.name!r}"
            raise ValueError(msg)
        self.momentum = None
        if hasattr(opt, "momentum"):
            self.momentum = _per_member("momentum", opt.momentum if momentum is None else momentum, k, xp, like)
            if isinstance(opt, SGD) and opt.nesterov and not isinstance(self.momentum, float):
                if bool(xp.any(self.momentum <= 0)):
                    msg = f"nesterov=True requires every member's momentum > 0, got momentum={momentum!r}"
                    raise ValueError(msg)
        if isinstance(opt, Adam):
            b = opt.betas if betas is None else betas
            if not isinstance(b, (tuple, list)) or len(b) != 2:
                msg = f"betas must be a pair (beta1, beta2), each a number or {k} numbers, got {betas!r}"
                raise ValueError(msg)
            self.b1 = _per_member("betas[0]", b[0], k, xp, like, high=1.0, high_open=True)
            self.b2 = _per_member("betas[1]", b[1], k, xp, like, high=1.0, high_open=True)
        self.state: list[dict[str, dict[str, Any]]] | None = None
        #: each member's step count (its Adam bias correction, Adagrad decay, first
        #: momentum step): a frozen member's stands still, as a stopped plain model's does
        self.steps = numpy.zeros(k, dtype=numpy.int64)
        self._scratch = None

    _HYPER = ("lr", "wd", "momentum", "b1", "b2")

    @property
    def t(self):
        """The members' step count: an int where they agree, else an int array (K,)."""
        s = self.steps
        return int(s[0]) if (s == s[0]).all() else s.copy()

    @t.setter
    def t(self, value) -> None:
        steps = numpy.asarray(value, dtype=numpy.int64).reshape(-1)
        if steps.shape[0] not in (1, self.k) or (steps < 0).any():
            msg = f"the members' step count must be one int >= 0 or {self.k} of them, got {value!r}"
            raise ValueError(msg)
        self.steps = numpy.broadcast_to(steps, (self.k,)).copy()

    @property
    def name(self) -> str:
        return self.opt.name

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint of the rule, as :meth:`arraymlp.optim.Optimizer.state_dict` gives
        one: the per-member hyper-parameters (a float, or K floats), the step count and
        copies of the stacked moments."""
        xp = self.xp
        hyper = {}
        for key in self._HYPER:
            v = getattr(self, key, None)
            if v is not None:
                hyper[key] = float(v) if isinstance(v, float) else [float(a) for a in to_numpy(v).reshape(-1)]
        state = None
        if self.state is not None:
            state = [{key: {slot: xp.asarray(a, copy=True) for slot, a in st.items()}
                      for key, st in layer.items()} for layer in self.state]
        t = self.t
        return {"optimizer": self.name, "hyperparameters": hyper, "step": t if isinstance(t, int) else t.tolist(),
                "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Back to a :meth:`state_dict` (its arrays may be NumPy host arrays)."""
        from .io.layout import _to_xp

        if sd.get("optimizer") != self.name:
            msg = f"state_dict is for optimizer {sd.get('optimizer')!r}, not {self.name!r}"
            raise ValueError(msg)
        like = self.like
        for key, v in sd["hyperparameters"].items():
            if key not in self._HYPER or getattr(self, key, None) is None:
                msg = f"state_dict has hyper-parameter {key!r}, which the {self.name} rule of an ensemble has not"
                raise ValueError(msg)
            setattr(self, key, _per_member(key, v, self.k, self.xp, like, high=None))
        self.t = sd["step"]  # an int, or one per member
        self.state = None if sd["state"] is None else [
            {key: {slot: _to_xp(numpy.asarray(to_numpy(a)), self.xp, like.dtype, like.device)
                   for slot, a in st.items()} for key, st in layer.items()} for layer in sd["state"]]

    def reset(self) -> None:
        self.state, self.t = None, 0

    @staticmethod
    def _on(v) -> bool:
        """Whether a hyper-parameter is not the float 0 (an array of K values always is on)."""
        return not (isinstance(v, float) and v == 0.0)

    def _zeros(self, p):
        return self.xp.zeros_like(p)

    def build_state(self, params) -> None:
        """The members' optimiser state (moments, buffers), made at the first step."""
        if self.state is None:
            self.state = [{key: self._init(p) for key, p in layer.items()} for layer in params]

    def _work(self, n, p, xp):
        """A flat scratch array of ``n`` elements in ``p``'s dtype and place, for the
        kernels' products (one buffer, grown on demand; not state)."""
        s = self._scratch
        if s is None or s.shape[0] < n or type(s) is not type(p) or s.dtype != p.dtype or s.device != p.device:
            s = self._scratch = xp.empty((n,), dtype=p.dtype, device=device_of(p))
        return s[:n]

    def _init(self, p):
        o = self.opt
        eps = getattr(o, "eps", None)
        if eps is not None and isinstance(o, (Adam, RMSprop)) and is_float16(p.dtype, self.xp) and eps < 2.0**-14:
            msg = (f"{type(o).__name__} with float16 parameters needs eps >= {2.0**-14:.3g} (float16's smallest "
                   f"normal number), got eps={eps:g}: pass eps=1e-4, or train in float32")
            raise ValueError(msg)
        if isinstance(o, SGD):
            return {"momentum_buffer": self._zeros(p)} if self._on(self.momentum) else {}
        if isinstance(o, Adam):
            st = {"exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}
            if o.amsgrad:
                st["max_exp_avg_sq"] = self._zeros(p)
            return st
        if isinstance(o, RMSprop):
            st = {"square_avg": self._zeros(p)}
            if o.centered:
                st["grad_avg"] = self._zeros(p)
            if self._on(self.momentum):
                st["momentum_buffer"] = self._zeros(p)
            return st
        return {"sum": self.xp.full_like(p, o.initial_accumulator_value)}

    def _clip(self, grads):
        xp, o = self.xp, self.opt
        if o.clip_value is not None:
            # minimum/maximum, not clip: array-api-compat's clip reads boolean masks back
            # the bounds as 0-d arrays: a number is copied from the host on torch CUDA
            grads = [{k: xp.minimum(xp.maximum(g, constant_like(-o.clip_value, g, xp)),
                                    constant_like(o.clip_value, g, xp)) for k, g in layer.items()}
                     for layer in grads]
        if o.clip_norm is not None:
            sq = 0.0
            for layer in grads:
                for g in layer.values():
                    sq = sq + xp.sum(g * g, axis=tuple(range(1, g.ndim)))
            coef = o.clip_norm / (xp.sqrt(sq) + 1e-6)
            coef = xp.minimum(coef, constant_like(1.0, coef, xp))
            coef = xp.reshape(coef, (-1, 1, 1))
            grads = [{k: g * coef for k, g in layer.items()} for layer in grads]
        return grads

    def step(self, params, grads, active=None):
        """Update ``params`` in place of its dicts. ``active`` (host bools (K,), None: all)
        marks the members that train: a frozen member's parameters, moments and step
        count stay as they are (put back by ``xp.where`` on the device, no host read).
        Members that train with different step counts (one frozen for a while, then
        trained again) are updated group by group, each with its own count, so that
        each member's update is its plain model's."""
        xp = self.xp
        grads = self._clip(grads)
        self.build_state(params)
        on = numpy.ones(self.k, dtype=bool) if active is None else numpy.asarray(active, dtype=bool).reshape(self.k)
        counts = numpy.unique(self.steps[on])
        if on.all() and counts.size == 1:  # the usual step: one update of every member
            self._apply(params, grads, int(counts[0]) + 1)
            self.steps += 1
            return params
        for t in counts.tolist():
            group = on & (self.steps == t)
            before = _amp_snapshot(params, self.state, xp)
            self._apply(params, grads, t + 1)
            mask = xp.reshape(xp.asarray(group, device=device_of(self.like)), (self.k, 1, 1))
            _keep_if_not(mask, before, params, self.state, xp)
            self.steps[group] += 1
        return params

    def _apply(self, params, grads, t: int) -> None:
        o, xp = self.opt, self.xp
        for layer, glayer, slayer in zip(params, grads, self.state):
            for key, p in layer.items():
                wd = self.wd if (key == "W" or o.decay_bias) else 0.0
                layer[key] = self._update(p, glayer[key], slayer[key], self.lr, wd, t, xp)

    def _update(self, p, g, st, lr, wd, t, xp):
        """The plain optimiser's kernel of the set at step ``t``, with the per-member
        hyper-parameters as they are (floats, or (K, 1, 1) arrays that broadcast over the
        stacked ``p``)."""
        o, ks = self.opt, kernels_for(xp)
        if isinstance(o, SGD):
            if self._on(self.momentum):
                p, st["momentum_buffer"] = ks.sgd_momentum_update(
                    p, g, st["momentum_buffer"], lr, self.momentum, o.dampening, o.nesterov, wd, t == 1, xp,
                    self._work)
                return p
            if self._on(wd):
                g = g + wd * p
            return ks.axpy(p, -lr, g, xp, self._work)
        if isinstance(o, Adam):
            p, st["exp_avg"], st["exp_avg_sq"], vmax = ks.adam_update(
                p, g, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq") if o.amsgrad else None,
                lr, self.b1, self.b2, o.eps, wd, o._decoupled, t, xp, self._work)
            if o.amsgrad:
                st["max_exp_avg_sq"] = vmax
            return p
        if isinstance(o, RMSprop):
            on = self._on(self.momentum)
            p, st["square_avg"], gbar, buf = ks.rmsprop_update(
                p, g, st["square_avg"], st.get("grad_avg") if o.centered else None,
                st.get("momentum_buffer") if on else None, lr, o.alpha, o.eps, self.momentum, wd, xp, self._work)
            if o.centered:
                st["grad_avg"] = gbar
            if on:
                st["momentum_buffer"] = buf
            return p
        clr = lr / (1.0 + (t - 1) * o.lr_decay)
        p, st["sum"] = ks.adagrad_update(p, g, st["sum"], clr, o.eps, wd, xp, self._work)
        return p


def moved_rule(rule: _MemberUpdate, params, xp) -> _MemberUpdate:
    """A copy of the members' update rule (per-member settings, step counts and moments)
    for ``params`` (an ensemble's stacked parameters, on any backend, device and dtype):
    ``copy`` and ``to`` of an ensemble carry its optimiser on, as a plain model's do."""
    like = next(a for p in params for a in p.values())
    opt = rule.opt
    new = _MemberUpdate(type(opt)(**opt.hyperparameters()), rule.k, xp, like, lr=None, momentum=None,
                        weight_decay=None, betas=None)
    new.load_state_dict(rule.state_dict())
    return new


def _assign(a, c):
    """``c``'s values, into ``a`` where it is writeable (``a`` is then reused)."""
    if is_writeable(a):
        a[...] = c
        return a
    return c


# -------------------------------------------------------------------------- history
class EnsembleHistory(History):
    """The :class:`arraymlp.History` of an ensemble's fit: every per-epoch entry of
    ``loss``, ``val_loss`` and ``val_metric`` is a NumPy array of shape (K,), one value
    per member.

    Attributes
    ----------
    stopped_epoch : numpy.ndarray of int, shape (K,)
        The last epoch each member trained in (-1: never stopped, it trained to the end).
    best_epochs : numpy.ndarray of int, shape (K,) or None
        The epoch whose parameters each member was restored to by early stopping.
    """

    stopped_epoch: Any = None
    best_epochs: Any = None


# ----------------------------------------------------------------------------- fit
def partial_fit(model, x, y, *, loss: str | None = None, optimizer: str | Optimizer | None = None, lr: Any = None,
                batch_size: int = 32, shuffle: bool | str = True, l2: Any = 0.0,
                sample_weight: Any = None, metrics: Sequence[Any] | None = None, precision: Any = None,
                comm: Any = None, _active: Any = None, _l2_per_batch: bool = False,
                _host_weight: Any = None) -> EnsembleHistory:
    """One epoch of every member over ``(x, y)``, keeping the members' optimiser state of
    earlier calls (``model.partial_fit`` of an ensemble).

    Parameters are as for :func:`fit` (``x`` (n, n_features), ``y`` (n, n_outputs), (n,)
    or labels (n,), ``sample_weight`` (K, n) or (n,)); ``loss`` defaults to the last fit's,
    and ``lr`` (one or K values) is the only hyper-parameter that may change between calls.
    ``optimizer`` left out, the kept optimiser itself or a name of its kind (``"adam"`` for
    an Adam) goes on with its state; another name or instance starts that one afresh.
    ``copy`` and ``to`` carry a copy of the members' optimiser on (each member's moments
    and step count), ``member`` starts afresh. ``comm`` makes
    the epoch data-parallel, as :func:`arraymlp.partial_fit`'s does.

    Three private options serve the scikit-learn estimators (``n_members=K``), whose
    epochs are one call each: ``_active`` (K bools) trains only the members marked True
    (the others are frozen: their parameters, optimiser moments, step counts and random
    streams do not change); ``_l2_per_batch`` divides
    ``l2`` by each batch's size, or weight sum, as scikit-learn scales its penalty;
    ``_host_weight``, the (n,) sample weights as a float64 host array, gives those
    weight sums without a device read, and a batch whose weights are all zero is then
    skipped (no step), as the one-member estimator skips it.
    """
    if loss is None:
        loss = getattr(model, "loss_", None)
        if loss is None:
            msg = "partial_fit needs loss= on its first call"
            raise ValueError(msg)
    return fit(model, x, y, loss=loss, optimizer=optimizer, lr=lr, epochs=1, batch_size=batch_size, shuffle=shuffle,
               progress=False, l2=l2, sample_weight=sample_weight, metrics=metrics, precision=precision, comm=comm,
               _reuse_optimizer=True, _active=_active, _l2_per_batch=_l2_per_batch, _host_weight=_host_weight)


def _rule(model, run, optimizer, lr, momentum, weight_decay, betas, reuse: bool) -> _MemberUpdate:
    """The members' update rule: the model's last one with its state (``partial_fit``, when
    ``optimizer`` is None, that rule's optimiser, or a name of its kind), or a new one."""
    k, xp, like = model.ensemble, run.xp, run.like
    existing = getattr(model, "ensemble_optimizer_", None)
    same = existing is not None and (optimizer is None or optimizer is existing.opt or (
        isinstance(optimizer, str) and OPTIMIZERS.get(optimizer.lower()) is type(existing.opt)))
    if reuse and same and existing.k == k and existing.xp is xp:
        if momentum is not None or weight_decay is not None or betas is not None:
            msg = "partial_fit keeps the optimiser: only lr= may change between calls"
            raise ValueError(msg)
        if lr is not None:
            existing.lr = _per_member("lr", lr, k, xp, like)
        return existing
    return _MemberUpdate(get_optimizer(optimizer if optimizer is not None else "adam"), k, xp, like, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, betas=betas)


def _step_schedules(schedules, logs, active) -> None:
    """A ReduceOnPlateau records its member's monitored loss (validation loss, else
    training), while the member trains (``active``, host bools (K,)): a frozen member's
    stands still, as a stopped plain model's does."""
    monitored = logs["val_loss"] if logs["val_loss"] is not None else logs["loss"]
    for i, s in enumerate(schedules):
        if active[i] and callable(getattr(s, "step", None)):
            s.step(float(monitored[i]))


def _check_schedules(schedule, lr, k: int):
    """``schedule=``: None, one schedule (every member's rate), or K of them (one per
    member); each ``schedule(epoch) -> lr``. The rates come from the schedules, so ``lr=``
    is refused beside them."""
    if schedule is None:
        return None
    if lr is not None:
        msg = "give the members' rates through schedule= or lr=, not both (a schedule's rate replaces lr)"
        raise ValueError(msg)
    schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * k
    if len(schedules) != k or not all(callable(s) for s in schedules):
        msg = (f"schedule must be a schedule (callable epoch -> lr) or a sequence of {k} of them, one per member, "
               f"got {schedule!r}")
        raise ValueError(msg)
    if isinstance(schedule, (list, tuple)) and len({id(s) for s in schedules if hasattr(s, "step")}) < sum(
            hasattr(s, "step") for s in schedules):
        msg = "each member needs its own ReduceOnPlateau (one object steps with one member's loss)"
        raise ValueError(msg)
    if not isinstance(schedule, (list, tuple)) and callable(getattr(schedule, "step", None)) and k > 1:
        msg = f"a ReduceOnPlateau follows one loss: give {k} of them, one per member"
        raise ValueError(msg)
    return schedules


def _random_streams(run, seed, shuffle, comm, estimator: bool) -> None:
    """The fit's generators (:func:`_member_generators`) and whether each member draws
    its own order (``shuffle="members"``, checked)."""
    run.members_order = _check_shuffle(shuffle, run, comm, estimator)
    run.model.rng = _member_generators(run.model, seed, run.xp)


def _check_shuffle(shuffle, run, comm, estimator: bool) -> bool:
    """``shuffle=`` checked; whether each member draws its own order (``"members"``)."""
    if isinstance(shuffle, str):
        if shuffle != "members":
            msg = f"shuffle must be True, False or 'members' (each member in its own order), got {shuffle!r}"
            raise ValueError(msg)
        reason = ("data-parallel training (comm=)" if comm is not None else "a sparse x" if is_sparse(run.x)
                  else "the scikit-learn estimators' per-batch rules" if estimator else None)
        if reason is not None:
            msg = f"shuffle='members' is not supported with {reason}; use shuffle=True (one order for every member)"
            raise ValueError(msg)
        return True
    if not isinstance(shuffle, (bool, numpy.bool_)):
        msg = f"shuffle must be True, False or 'members' (each member in its own order), got {shuffle!r}"
        raise TypeError(msg)
    return False


def _check_run(epochs, batch_size, validation_split):
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            msg = f"{name} must be a positive int, got {v!r}"
            raise ValueError(msg)
    if not 0.0 <= validation_split < 1.0:
        msg = f"validation_split must be in [0, 1), got {validation_split!r}"
        raise ValueError(msg)


def _early_stopping(early_stopping, validation: bool):
    if early_stopping is None:
        return None
    if isinstance(early_stopping, bool) or not isinstance(early_stopping, (int, EarlyStopping)):
        msg = (f"early_stopping must be an EarlyStopping or an int patience for an ensemble, "
               f"got {early_stopping!r}")
        raise TypeError(msg)
    if isinstance(early_stopping, int):
        return EarlyStopping("val_loss" if validation else "loss", patience=early_stopping)
    if early_stopping.monitor not in ("loss", "val_loss", "val_metric"):
        msg = (f"EarlyStopping(monitor={early_stopping.monitor!r}): an ensemble logs 'loss', 'val_loss' and "
               "'val_metric' (the validation accuracy, or R^2 for a regressor) per member; monitor one of those")
        raise ValueError(msg)
    if early_stopping.monitor.startswith("val") and not validation:
        msg = f"EarlyStopping monitors {early_stopping.monitor!r} but training has no validation data"
        raise ValueError(msg)
    return early_stopping


class _MeanLoss(Metric):
    """The members' losses averaged over batches, weighted by the batches' sizes."""

    name = "loss"

    def _finish_members(self, acc, host):
        return host[0] / acc.count


def _add_loss(acc, values, rows: int) -> None:
    acc.add([acc.xp.astype(values, acc.acc) * float(rows)])
    acc.count += rows


def _pair_kind(model, lossfn, fused: bool) -> dict:
    """The keyword arguments of a batch's metric pair: 0/1 outputs split at 0 for logits
    and 0.5 for probabilities; Poisson outputs are log-rates (metrics read the rates)."""
    return {"threshold": 0.5 if model.output_activation == "sigmoid" and not fused else 0.0,
            "rates": lossfn.name == "poisson_nll"}


def _combined(model, out, lossfn, fused: bool, xp):
    """The ensemble's own prediction of a batch, as one model's output (n, m) for its
    loss and metrics: for classification the logits of the members' averaged
    probabilities (``log P`` for one class per sample, ``log P - log(1 - P)`` for 0/1
    outputs), whose softmax or sigmoid is the average ``predict_proba`` gives; for
    regression the members' averaged outputs, as ``predict`` gives."""
    from .functional import sigmoid, softmax

    task = lossfn.task
    if task == "regression":
        return xp.mean(out, axis=0)
    if fused or model.output_activation not in ("softmax", "sigmoid"):
        out = softmax(out, xp=xp) if task == "multiclass" else sigmoid(out, xp=xp)
    p = xp.mean(out, axis=0)
    return xp.log(p) if task == "multiclass" else xp.log(p) - xp.log1p(-p)


def _scores(model, x, y, lossfn, xp, fused: bool, metrics, *, combined: bool = False, batch_size: int = 4096):
    """Each member's loss and metrics on ``(x, y)`` in inference mode, in batches, the sums
    kept on the device and read once: ``(losses (K,), {name: (K,)})``, and with
    ``combined`` also the ensemble's own (its averaged prediction, :func:`_combined`):
    ``(loss, {name: value})`` as floats."""
    n, k = int(x.shape[0]), model.ensemble
    upto = len(model.layers) - 1 if fused else None
    kind = _pair_kind(model, lossfn, fused)
    dtype, device = model.dtype, model.device
    loss_acc = _MeanLoss().start_members(xp, dtype, device, k)
    accs = [m.start_members(xp, dtype, device, k) for m in metrics]
    ens_loss = _MeanLoss().start_members(xp, dtype, device, 1) if combined else None
    ens_accs = [m.start(xp, dtype, device) for m in metrics] if combined else []
    for i in range(0, n, batch_size):
        end = min(i + batch_size, n)
        xb, yb = slice_rows(x, i, end), y[i:end, ...]  # (a sparse x: the sparse library's rows)
        out = model.forward(xb, training=False, xp=xp, upto=upto, keep=False)[0]
        pair = _MembersPair(yb, out, lossfn.task, xp, **kind)
        for acc in accs:
            acc.update(pair)
        if combined:
            c = _combined(model, out, lossfn, fused, xp)
            one = _Pair(yb, c, lossfn.task, xp, threshold=0.0 if lossfn.task != "regression" else kind["threshold"],
                        rates=kind["rates"])
            for acc in ens_accs:
                acc.update(one)
            _add_loss(ens_loss, _losses(model, lossfn, xp.expand_dims(c, axis=0), yb, None, xp)[0], end - i)
        _add_loss(loss_acc, _losses(model, lossfn, out, yb, None, xp)[0], end - i)
        del out, pair
    values = read_results([loss_acc, *accs, *([ens_loss, *ens_accs] if combined else [])], xp)  # one read
    members = (values[0], {m.name: v for m, v in zip(metrics, values[1:1 + len(metrics)])})
    if not combined:
        return members
    rest = values[1 + len(metrics):]
    return members, (float(rest[0][0]), {m.name: float(v) for m, v in zip(metrics, rest[1:])})


def _default_metrics(metrics, lossfn, model):
    """``metrics=`` resolved as the plain fit resolves it: the training metrics (default
    accuracy for classification, none for regression) and the validation ones (those,
    plus ``val_metric``'s accuracy or R^2)."""
    main_name = "accuracy" if lossfn.task != "regression" else "r2"
    if metrics is None:
        metrics = ["accuracy"] if lossfn.task != "regression" else []
    metrics = get_metrics(metrics, lossfn.task, model.n_outputs)
    val_metrics = list(metrics)
    if all(m.name != main_name for m in val_metrics):
        val_metrics.append(get_metrics([main_name], lossfn.task, model.n_outputs)[0])
    return metrics, val_metrics, main_name


def evaluate(model, x, y, *, loss: str | None = None, metrics: Sequence[Any] | None = None,
             batch_size: int = 4096) -> dict[str, Any]:
    """The loss and metrics of every member of an ensemble, and of the ensemble's own
    averaged prediction, on ``(x, y)`` in inference mode (``model.evaluate`` of an
    ensemble).

    Parameters
    ----------
    model : Sequential built with ``ensemble=K``
    x : array, shape (n, n_features)
    y : array, shape (n, n_outputs), (n,), or integer labels (n,)
    loss : str, optional
        Default: the loss of the last fit, else "mse".
    metrics : sequence of str, Metric or callable, optional
        As for :func:`arraymlp.evaluate`; default accuracy for a classification loss,
        R^2 for a regression one.
    batch_size : int
        Rows per forward pass (memory only).

    Returns
    -------
    dict
        ``"loss"`` and each metric's name: NumPy arrays (K,), member ``i``'s value at
        ``[i]`` (what ``model.member(i).evaluate(x, y)`` gives). ``"ensemble_loss"`` and
        ``"ensemble_<name>"``: floats, the values of the ensemble's prediction, the
        members' probabilities averaged for classification (so ``ensemble_accuracy`` is
        the accuracy of ``model.predict(x)``, the score scikit-learn reports) and their
        outputs averaged for regression. The sums stay on the device and are read once.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(90, 3)); y = (x[:, 0] > 0).astype(np.int64)
    >>> model = am.MLP([3, 8, 2], ensemble=3, backend="numpy", dtype="float64", seed=0)
    >>> _ = model.fit(x, y, loss="cross_entropy", lr=0.05, epochs=20, progress=False)
    >>> scores = model.evaluate(x, y)
    >>> sorted(scores), scores["accuracy"].shape
    (['accuracy', 'ensemble_accuracy', 'ensemble_loss', 'loss'], (3,))
    >>> bool(scores["ensemble_accuracy"] == np.mean(model.predict(x) == y))
    True
    """
    lossfn = get_loss(loss if loss is not None else (getattr(model, "loss_", None) or "mse"))
    x, xp = model._check_x(x)
    y = model._check_target(y, xp)
    if int(y.shape[0]) != int(x.shape[0]):
        msg = f"x has {int(x.shape[0])} samples but y has {int(y.shape[0])}"
        raise ValueError(msg)
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)
    lossfn.fn(xp.zeros((int(x.shape[0]), model.n_outputs), dtype=model.dtype, device=model.device), y, xp=xp)
    if metrics is None:
        metrics = ["accuracy" if lossfn.task != "regression" else "r2"]
    metrics = get_metrics(metrics, lossfn.task, model.n_outputs)
    with quiet_overflow(xp):
        (losses, values), (ens_loss, ens_values) = _scores(model, x, y, lossfn, xp, model._fused(lossfn), metrics,
                                                           combined=True, batch_size=int(batch_size))
    return {"loss": losses, **values, "ensemble_loss": ens_loss,
            **{f"ensemble_{name}": v for name, v in ens_values.items()}}


def member_metric(model, out, y, lossfn, xp, *, logits: bool) -> numpy.ndarray:
    """Accuracy (classification) or R^2 (regression) of each member, from outputs (K, n, m)."""
    task = lossfn.task
    if task == "multiclass":
        pred = xp.argmax(out, axis=-1)
        labels = y if y.ndim == 1 else xp.argmax(y, axis=-1)
        return to_numpy(xp.mean(xp.astype(pred == xp.astype(labels, pred.dtype), out.dtype), axis=-1)).astype(float)
    if task == "multilabel":
        threshold = 0.5 if model.output_activation == "sigmoid" and not logits else 0.0
        pred = xp.astype(out > threshold, out.dtype)
        yy = xp.astype(xp.reshape(y, tuple(pred.shape[1:])), out.dtype)
        return to_numpy(xp.mean(xp.astype(pred == yy, out.dtype), axis=(1, 2))).astype(float)
    if lossfn.name == "poisson_nll":
        out = xp.exp(out)
    # R^2 per output, averaged uniformly over the outputs (scikit-learn's r2_score, and
    # arraymlp.metrics.r2): 1 for a constant target predicted exactly, 0 otherwise
    yy = xp.reshape(xp.astype(y, out.dtype), tuple(out.shape[1:]))
    res = to_numpy(xp.sum((yy - out) ** 2, axis=1)).astype(float)  # (K, m)
    tot = to_numpy(xp.sum((yy - xp.mean(yy, axis=0)) ** 2, axis=0)).astype(float)  # (m,)
    scores = numpy.where(tot > 0, 1.0 - res / numpy.where(tot > 0, tot, 1.0), numpy.where(res == 0, 1.0, 0.0))
    return scores.mean(axis=1)


def _losses(model, lossfn, out, y, w, xp, members: bool = False):
    if LOSSES.get(lossfn.name) is lossfn:
        return member_losses(lossfn, out, _targets(lossfn, y, int(out.shape[-1]), xp, out.dtype, members), w, xp)
    return _custom_member_losses(lossfn, out, y, w, xp, members)


class _RowsPair(_MembersPair):
    """A batch of ``shuffle="members"``: ``y`` holds each member's own rows, (K, n, ...);
    member ``i``'s pair is its rows against its outputs."""

    __slots__ = ()

    def member(self, i: int) -> _Pair:
        return _Pair(self.y[i, ...], self.out[i, ...], self.task, self.xp, threshold=self.threshold, rates=self.rates)


def _update_metrics(run, yb, out, xp) -> None:
    """The batch joins the epoch's metric sums, on the device. With each member's own
    rows, member by member (the metric's plain sums, stacked when read)."""
    if run.members_order:
        pair = _RowsPair(yb, out, run.lossfn.task, xp, **run.pair_kind)
        labels = run.lossfn.task == "multiclass" and yb.ndim == 2 and xp.isdtype(yb.dtype, "integral")
        for acc in run.accs:
            if labels and type(acc.metric) is type(accuracy):  # all members at once: hits (K,)
                pred = xp.argmax(out, axis=-1)
                acc.add([xp.sum(xp.astype(pred == xp.astype(yb, pred.dtype), index_dtype(xp)), axis=-1)])
                acc.count += int(yb.shape[1])
            else:
                Metric._update_members(acc.metric, acc, pair)
        return
    pair = _MembersPair(yb, out, run.lossfn.task, xp, **run.pair_kind)
    for acc in run.accs:
        acc.update(pair)


def fit(model, x, y, *, loss: str | Loss | None = None, optimizer: str | Optimizer = "adam", lr: Any = None,
        momentum: Any = None, weight_decay: Any = None, betas: Any = None, l2: Any = 0.0, epochs: int = 10,
        batch_size: int = 32, shuffle: bool | str = True, validation_data: tuple | None = None,
        validation_split: float = 0.0, early_stopping: EarlyStopping | int | None = None,
        sample_weight: Any = None, seed: int | None = None, schedule: Any = None, callbacks: Sequence = (),
        metrics: Sequence[Any] | None = None, precision: Any = None, progress: bool = True, verbose: bool = False,
        resume_from: Any = None, comm: Any = None, _reuse_optimizer: bool = False, _active: Any = None,
        _l2_per_batch: bool = False, _host_weight: Any = None, **unsupported) -> EnsembleHistory:
    """Train every member of an ensemble on the same batches (``model.fit`` of a model
    built with ``ensemble=K``).

    Parameters
    ----------
    model : Sequential built with ``ensemble=K``
    x : array, shape (n, n_features)
    y : array, shape (n, n_outputs), (n,), or integer labels (n,) for cross-entropy
    loss, optimizer, epochs, batch_size, validation_data, validation_split, seed
        As for :func:`arraymlp.fit` (an omitted ``loss`` is inferred as it infers it:
        cross-entropy for a softmax output, and so on). ``optimizer`` gives the update
        rule and the hyper-parameters the members share; ``"lbfgs"`` (or an
        :class:`arraymlp.optim.LBFGS`) trains the members as K full-batch L-BFGS runs side
        by side instead (:func:`_fit_lbfgs`: ``epochs`` caps each member's iterations).
        ``seed`` gives the shared generator ``Generator(seed)`` and member ``i`` the
        generator ``Generator(member_seeds(seed, K)[i])`` (its dropout masks and, with
        ``shuffle="members"``, its batch order): what a plain model fitted with
        ``seed=member_seeds(seed, K)[i]`` draws. Without it each member goes on with its
        own generator, as a plain model of its seed does.
    shuffle : bool or "members"
        True (default): every member trains on the same batches, in the order of the
        shared generator (as a plain model fitted with ``seed`` draws it); False: in the
        order of the rows; ``"members"``: each member in its own order, drawn from its
        own generator (each epoch's first layer then reads (K, batch, n_features) rows
        gathered for the members), so that member ``i`` sees the batches of its plain
        model. Not with ``comm=`` nor a sparse ``x``.
    lr, momentum, weight_decay : float or sequence of K floats, optional
        Per-member values (one value: every member's); ``None`` keeps the optimiser's.
    betas : (beta1, beta2), optional
        Adam's decay rates, each a float or K floats.
    l2 : float or sequence of K floats
        Each member's L2 penalty ``l2/2 * sum(W**2)``.
    sample_weight : array of shape (K, n) or (n,), optional
        Member ``k`` weights sample ``i`` by ``sample_weight[k, i]`` (bootstrap counts;
        cross-validation folds as 0/1 weights). A batch in which a member's weights are
        all zero leaves that member's gradient at zero for that step.
    early_stopping : EarlyStopping or int, optional
        Per member: a member whose monitored value has not improved for ``patience``
        epochs stops (its parameters no longer change) while the others go on, and with
        ``restore_best_weights`` it ends with the parameters of its best epoch.
    schedule : Schedule or callable, or a sequence of K of them, optional
        ``schedule(epoch) -> lr`` for every member, or one per member (each
        ``ReduceOnPlateau`` stepped with its own member's monitored loss); instead of
        ``lr``.

    callbacks : sequence of Callback
        Their hooks are called as in :func:`arraymlp.fit`, with per-member values:
        ``on_epoch_end``'s ``logs["loss"]``, ``"val_loss"`` and ``"val_metric"`` are
        arrays (K,), ``logs["lr"]`` the epoch's rate(s) and ``logs["active"]`` says which
        members still train (K bools); ``on_batch_end``'s ``logs["loss"]`` is the step's
        losses (K,). A hook returning True stops every member. An :class:`EarlyStopping`
        among them acts per member, as ``early_stopping=`` does. A callback that
        overrides ``on_batch_end`` makes every step read its losses (one host read each).
        An :class:`arraymlp.Checkpoint` saves the members' parameters, optimiser state
        (with the per-member hyper-parameters), generator state and history; with
        ``monitor=`` it keeps each member's best parameters in one model file
        (``reduce=None``) or the checkpoint of the members' best mean (``reduce="mean"``).
    resume_from : str or path-like, optional
        A checkpoint of this ensemble (or a directory of them): training continues
        after its epoch exactly as the uninterrupted run would, the checkpoint's
        per-member optimiser settings replacing the given ones. The members' early
        stopping counters and best parameters, and their schedules' states, are saved
        and restored too (they travel as one more callback state).
    comm : mpi4py communicator or arraymlp.distributed.DataParallel, optional
        Data-parallel training, as for :func:`arraymlp.fit`: every rank holds all K
        members and the same data, and computes the members' losses and gradients on
        its shard of each global batch; one ``Allreduce`` per step sums the stacked
        gradients of all members, each member's weighted by its own weight of the shard
        (its row of ``sample_weight``), so that member ``k`` gets the gradient of its own
        weighted mean loss over the global batch. Validation runs on the root rank and
        is broadcast, so every rank takes the same per-member early-stopping decisions;
        checkpoints are written by the root.

    Returns
    -------
    EnsembleHistory
        Per-epoch arrays of shape (K,).

    metrics : sequence of str, Metric or callable, optional
        As for :func:`arraymlp.fit` (default accuracy for a classification loss, none for
        a regression one), each member's: ``history.metrics[name]`` (training batches,
        before each step's update) and ``history.metrics["val_" + name]`` hold one
        array (K,) per epoch, summed on the device and read once per epoch. Unweighted,
        as in the plain fit.

    precision : {None, "float16", "bfloat16"} or MixedPrecision, optional
        Mixed precision as for :func:`arraymlp.fit` (float32 master weights, the
        stacked ones), with one loss scale per member for float16: a member whose
        scaled gradients overflow skips its own step and halves its own scale
        (``MixedPrecision.scale`` is then an array (K,)), so that each member does what
        its plain model would.

    Notes
    -----
    Mixed precision is not supported together with ``comm`` (as for a plain model). Under
    ``comm`` each rank sums the training metrics over its shards' rows on the device, and
    the sums are added over the ranks once per epoch, so every rank records the values
    of the single-process fit.
    """
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        msg = f"fit of an ensemble does not support {', '.join(sorted(unsupported))} yet"
        raise NotImplementedError(msg)
    callbacks, early_stopping = _ensemble_callbacks(callbacks, early_stopping)
    schedules = _check_schedules(schedule, lr, model.ensemble)
    _check_run(epochs, batch_size, validation_split)
    lossfn = get_loss(model._own_loss(loss, y, last_fit=False))
    run = _prepare(model, x, y, lossfn, sample_weight, validation_data, validation_split)
    k, xp, like = model.ensemble, run.xp, run.like
    _random_streams(run, seed, shuffle, comm, _l2_per_batch or _host_weight is not None)
    run.rule = _rule(model, run, optimizer, lr, momentum, weight_decay, betas, _reuse_optimizer)
    opt = run.rule.opt
    run.l2 = _per_member("l2", l2, k, xp, like)
    run.amp = resolve_precision(precision, model, xp, data_parallel=comm is not None,
                                previous=getattr(model, "precision_", None) if _reuse_optimizer else None)
    model.precision_ = run.amp  # checkpoints save its per-member loss scales
    run.stopper = _early_stopping(early_stopping, run.val is not None)
    model.task_ = lossfn.task
    model.loss_ = lossfn.name if LOSSES.get(lossfn.name) is lossfn else lossfn
    model.optimizer_ = None  # the members' optimiser state: ensemble_optimizer_
    model.ensemble_optimizer_ = run.rule
    model.schedule_ = None
    history = _start_history(run, metrics)
    _estimator_options(run, _active, _l2_per_batch, _host_weight)
    run.best, run.best_epoch = numpy.full(k, numpy.inf), numpy.full(k, -1)
    run.wait = numpy.zeros(k, dtype=int)
    start_epoch = _resume(run, resume_from, callbacks, schedules)
    call = None if comm is None else {
        "lr": _plain(lr), "momentum": _plain(momentum), "weight_decay": _plain(weight_decay), "betas": _plain(betas),
        "l2": _plain(l2), "epochs": epochs, "batch_size": batch_size, "shuffle": shuffle,
        "optimizer steps": _plain(run.rule.t)}
    verbose = _data_parallel(run, comm, callbacks, verbose, call, "partial_fit" if _reuse_optimizer else "fit")
    if resume_from is not None and schedule is None:  # the checkpoint's rates replace lr=
        r = run.rule.lr
        lr = r if isinstance(r, float) else [float(v) for v in to_numpy(r).reshape(-1)]
    run.callbacks = callbacks
    run.batch_callbacks = [cb for cb in callbacks if _overrides_batch_end(cb)]
    run.fused = model._fused(lossfn)
    run.plan = plan_for(model, xp)
    try:
        with quiet_overflow(xp):
            for cb in callbacks:
                cb.on_train_begin(model, history)
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                if _agree(run, any([bool(cb.on_epoch_begin(model, epoch)) for cb in callbacks])):
                    history.stopped_early = True
                    break
                epoch_lr = opt.lr if lr is None else lr
                if schedules is not None:  # this epoch's rates, member by member
                    epoch_lr = [float(s(epoch)) for s in schedules]
                    run.rule.lr = _per_member("lr", epoch_lr, k, xp, like)
                epoch_loss, stop = _run_epoch(run, epoch, batch_size, shuffle)
                if _end_epoch(run, epoch, epoch_lr, epoch_loss, t0, schedules, verbose) or stop:
                    history.stopped_early = True
                    break
        if run.stopper is not None and run.stopper.restore_best_weights and run.best_params is not None:
            model.params = run.best_params
            history.best_epochs = run.best_epoch
    finally:
        model.steps_ = run.step
        model.rng.active = None
        for cb in callbacks:
            cb.on_train_end(model, history)
    return history


def _start_history(run: _Run, metrics) -> EnsembleHistory:
    """The run's metrics resolved (:func:`_default_metrics`) and its history begun, with a
    series for each training and validation metric."""
    model, lossfn = run.model, run.lossfn
    run.metrics, run.val_metrics, main_metric = _default_metrics(metrics, lossfn, model)
    run.pair_kind = _pair_kind(model, lossfn, model._fused(lossfn))
    history = run.history = EnsembleHistory(metric_name=main_metric)
    for m in run.metrics:
        history.metrics[m.name] = []
    if run.val is not None:
        for m in run.val_metrics:
            history.metrics["val_" + m.name] = []
    history.stopped_epoch = numpy.full(model.ensemble, -1)
    return history


def _data_parallel(run: _Run, comm, callbacks, verbose: bool, call: dict | None, what: str) -> bool:
    """``comm=`` set up, after resuming: the ranks' arguments compared (``call``, with the
    data's shapes and dtypes), the root's parameters and generator state broadcast,
    checkpoints made root-only; whether this rank prints (``verbose``)."""
    if comm is None:
        return verbose
    from .distributed import DataParallel

    def described(a):
        return None if a is None else (tuple(int(s) for s in a.shape), dtype_name(a.dtype))

    call = {"x dtype": dtype_name(run.x.dtype), "y": described(run.y), "sample_weight": described(run.w),
            "validation data": None if run.val is None else tuple(described(a) for a in run.val),
            "loss": run.lossfn.name, "metrics": [m.name for m in run.metrics],
            "optimizer": type(run.rule.opt).__name__, **call}
    run.dp = comm if isinstance(comm, DataParallel) else DataParallel(comm)
    run.dp.begin(run.model, run.x, callbacks, call=call, what=what)
    return verbose and run.dp.is_root


def _plain(value):
    """A per-member option as host floats (to compare across ranks), None kept."""
    if value is None or isinstance(value, (int, float)):
        return value
    if hasattr(value, "shape"):
        return numpy.asarray(to_numpy(value), dtype=float).tolist()
    return [_plain(v) for v in value]


def _estimator_options(run: _Run, active, l2_per_batch: bool, host_weight) -> None:
    """Which members train (all, or those of the scikit-learn estimators' ``_active``;
    the others are frozen), and those estimators' per-batch L2 rule and host weights."""
    k = run.model.ensemble
    run.active_host = numpy.ones(k, dtype=bool)
    if active is not None:
        run.active_host = numpy.asarray(active, dtype=bool).reshape(k).copy()
    run.l2_per_batch = bool(l2_per_batch)
    if host_weight is not None:
        run.host_weight = numpy.asarray(host_weight, dtype=numpy.float64).reshape(-1)
        if run.host_weight.shape[0] != int(run.x.shape[0]):
            msg = f"_host_weight has {run.host_weight.shape[0]} values but x has {int(run.x.shape[0])} rows"
            raise ValueError(msg)


def _resume(run: _Run, resume_from, callbacks, schedules) -> int:
    """A checkpoint's state restored (``resume_from``); the epoch to start with. With
    per-member early stopping or stateful schedules, a ``_MembersState`` joins the
    callbacks, so that checkpoints save that state and ``resume_from`` restores it."""
    model = run.model
    checkpoints = resume_from is not None or any(getattr(cb, "saves_callbacks", False) for cb in callbacks)
    if checkpoints and (run.stopper is not None or any(callable(getattr(s, "step", None)) for s in schedules or ())):
        # the members' early-stopping counters and schedules' states travel as one more
        # callback state, just before the checkpoints (which save the states before them)
        state = _MembersState(run, schedules)
        at = next(i for i, cb in enumerate(callbacks + [None]) if cb is None or getattr(cb, "saves_callbacks", False))
        callbacks.insert(at, state)
        for cb in callbacks:
            if getattr(cb, "saves_callbacks", False):
                cb.run_callbacks = callbacks
    start_epoch = 0
    if resume_from is not None:
        from .io.checkpoints import restore_checkpoint

        start_epoch = restore_checkpoint(resume_from, model, optimizer=run.rule, history=run.history,
                                         callbacks=callbacks, precision=run.amp)
        model.rng = _member_generators(model, None, run.xp)  # (one written without the members' streams)
    run.step = getattr(model, "steps_", 0)
    return start_epoch


class _MembersState(Callback):
    """What a checkpoint of an ensemble saves beside the optimiser: each member's
    early-stopping counters (best value, its epoch, epochs waited, whether it still
    trains, the epoch it stopped) and best parameters, and each member's schedule state
    (a ``ReduceOnPlateau``'s counters). :func:`fit` adds it to the run's callbacks when
    a checkpoint is saved or resumed; it has no hooks."""

    def __init__(self, run, schedules):
        self.run, self.schedules = run, schedules

    def state_dict(self) -> dict[str, Any]:
        run = self.run

        def floats(a):
            return [None if math.isinf(v) else float(v) for v in numpy.asarray(a, dtype=float)]

        state = {"best": floats(run.best), "best_epoch": [int(v) for v in run.best_epoch],
                 "wait": [int(v) for v in run.wait], "active": [bool(v) for v in run.active_host],
                 "stopped_epoch": [int(v) for v in run.history.stopped_epoch],
                 "schedules": [s.state_dict() if callable(getattr(s, "state_dict", None)) else {}
                               for s in self.schedules or ()]}
        if run.best_params is not None:
            state["best_params"] = run.best_params
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run, k = self.run, self.run.model.ensemble
        lists = ("best", "best_epoch", "wait", "active", "stopped_epoch")
        if any(not isinstance(state.get(key), list) or len(state[key]) != k for key in lists):
            msg = f"the members' state must hold {k} values in each of {lists}"
            raise ValueError(msg)
        run.best = numpy.array([numpy.inf if v is None else float(v) for v in state["best"]])
        run.best_epoch = numpy.array(state["best_epoch"], dtype=int)
        run.wait = numpy.array(state["wait"], dtype=int)
        run.active_host = numpy.array(state["active"], dtype=bool)
        run.history.stopped_epoch = numpy.array(state["stopped_epoch"], dtype=int)
        run.best_params = state.get("best_params")
        saved = state.get("schedules", [])
        for s, st in zip(self.schedules or (), saved):
            if st and callable(getattr(s, "load_state_dict", None)):
                s.load_state_dict(st)


def _end_epoch(run: _Run, epoch: int, epoch_lr, epoch_loss, t0: float, schedules, verbose: bool) -> bool:
    """Validation, history, the schedules' step, early stopping and ``on_epoch_end``;
    whether to stop every member."""
    model, history, xp = run.model, run.history, run.xp
    history.loss.append(epoch_loss)
    history.lr.append(epoch_lr)
    logs = {"epoch": epoch, "step": run.step, "loss": epoch_loss, "lr": epoch_lr, "val_loss": None,
            "val_metric": None}
    if run.accs:  # the training metrics' sums, read once, now (and added over the ranks: one collective)
        values = read_results(run.accs, xp) if run.dp is None else read_results(run.accs, xp,
                                                                                gather=run.dp.comm.allgather)
        for acc, value in zip(run.accs, values):
            logs[acc.metric.name] = value
    if run.val is not None:
        args = (model, run.val[0], run.val[1], run.lossfn, xp, run.fused, run.val_metrics)
        # under data parallelism the root evaluates and broadcasts: every rank then
        # takes the same early-stopping decisions
        logs["val_loss"], val = _scores(*args) if run.dp is None else run.dp.on_root(_scores, *args)
        logs["val_metric"] = val[history.metric_name]
        for name, value in val.items():
            logs["val_" + name] = value
        history.val_loss.append(logs["val_loss"])
        history.val_metric.append(logs["val_metric"])
    for name, series in history.metrics.items():
        series.append(logs[name])
    logs["time"] = time.perf_counter() - t0
    history.time.append(logs["time"])
    if schedules is not None:
        _step_schedules(schedules, logs, run.active_host)
    if verbose:
        print(f"epoch {epoch + 1:>4}  loss {numpy.array2string(epoch_loss, precision=4)}", flush=True)
    stop = run.stopper is not None and _stop_members(run, epoch, logs)
    logs["active"] = run.active_host.copy()
    return _agree(run, any([bool(cb.on_epoch_end(model, logs)) for cb in run.callbacks])) or stop


def _agree(run: _Run, stop: bool) -> bool:
    """A callback's stop, decided collectively under data parallelism (a stop on any
    rank stops every rank)."""
    return bool(stop) if run.dp is None else run.dp.agree(stop)


def _overrides_batch_end(cb) -> bool:
    hook = getattr(cb, "on_batch_end", None)
    return hook is not None and getattr(hook, "__func__", None) is not Callback.on_batch_end


def _ensemble_callbacks(callbacks, early_stopping):
    """The user's callbacks, less an :class:`EarlyStopping` among them, which becomes the
    members' early stopping; checkpoints last."""
    callbacks = list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback) and not callable(getattr(cb, "on_epoch_end", None)):
            msg = f"callbacks must be Callback instances, got {cb!r}"
            raise TypeError(msg)
    stoppers = [cb for cb in callbacks if isinstance(cb, EarlyStopping)]
    if stoppers:
        if early_stopping is not None or len(stoppers) > 1:
            msg = ("an ensemble takes one EarlyStopping (per member), given either as early_stopping= or among "
                   f"callbacks; got early_stopping={early_stopping!r} and {len(stoppers)} in callbacks")
            raise ValueError(msg)
        early_stopping = stoppers[0]
        callbacks = [cb for cb in callbacks if cb is not early_stopping]
    # checkpoints run after the other callbacks of an epoch and save their states
    saving = [cb for cb in callbacks if getattr(cb, "saves_callbacks", False)]
    callbacks = [cb for cb in callbacks if cb not in saving] + saving
    for cb in saving:
        cb.run_callbacks = callbacks
    return callbacks, early_stopping


@dataclasses.dataclass
class _Run:
    """What one ensemble fit trains on, and the state its epochs carry along."""

    model: Any
    x: Any
    y: Any
    w: Any
    val: Any
    lossfn: Any
    xp: Any
    like: Any
    rule: Any = None
    l2: Any = 0.0
    stopper: Any = None
    history: Any = None
    fused: bool = False
    plan: Any = None
    active_host: Any = None  # (K,) host bools: the members that train (the others are frozen)
    best: Any = None
    best_epoch: Any = None
    wait: Any = None
    best_params: Any = None
    step: int = 0
    held: Any = None
    callbacks: Any = ()
    batch_callbacks: Any = ()
    metrics: Any = ()  # recorded on the training batches, each (K,)
    val_metrics: Any = ()  # and on the validation data
    accs: Any = ()  # the epoch's member accumulators of the training metrics
    pair_kind: Any = None  # the keyword arguments of a batch's metric pair
    amp: Any = None  # MixedPrecision (per-member loss scales), or None
    dp: Any = None
    l2_per_batch: bool = False  # l2 over each batch's size or weight sum (scikit-learn's rule)
    host_weight: Any = None  # (n,) float64 host weights: the batches' weight sums, zero-weight batches skipped
    members_order: bool = False  # shuffle="members": each member's batches its own rows, (K, batch, ...)


def _prepare(model, x, y, lossfn, sample_weight, validation_data, validation_split) -> _Run:
    """The data checked (and the validation rows split off), as a :class:`_Run`."""
    k = model.ensemble
    x, xp = model._check_x(x)
    y = model._check_target(y, xp)
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        msg = f"x has {n} samples but y has {int(y.shape[0])}"
        raise ValueError(msg)
    like = next(a for p in model.params for a in p.values())
    w = _member_weights(sample_weight, k, n, xp, like)
    # the targets' kind, shape and label range, once, as the plain fit checks them
    lossfn.fn(xp.zeros((n, model.n_outputs), dtype=model.dtype, device=model.device), y, xp=xp)
    if validation_data is None and validation_split > 0.0:
        n_val = max(1, int(round(n * validation_split)))
        if n_val >= n:
            msg = f"validation_split={validation_split} of {n} samples leaves none to train on"
            raise ValueError(msg)
        validation_data = (slice_rows(x, n - n_val, n), y[n - n_val:, ...])  # a CSR matrix's rows too
        x, y, n = slice_rows(x, 0, n - n_val), y[:n - n_val, ...], n - n_val
        w = None if w is None else w[:, :n]
    val = None
    if validation_data is not None:
        xv, _ = model._check_x(validation_data[0], what="validation x")
        yv = model._check_target(validation_data[1], xp, "validation y")
        lossfn.fn(xp.zeros((int(yv.shape[0]), model.n_outputs), dtype=model.dtype, device=model.device), yv,
                  xp=xp)
        val = (xv, yv)
    return _Run(model=model, x=x, y=y, w=w, val=val, lossfn=lossfn, xp=xp, like=like)


def _has_l2(l2) -> bool:
    return not (isinstance(l2, float) and l2 == 0.0)


def _member_grads(run: _Run, xb, yb, wb):
    """Each member's loss on the batch (K,) and the gradients, without the L2 term."""
    model, xp = run.model, run.xp
    upto = len(model.layers) - 1 if run.fused else None
    out, caches = model.forward(xb, training=True, xp=xp, upto=upto, plan=run.plan)
    if run.accs:  # (before the loss reuses out)
        _update_metrics(run, yb, out, xp)
    values, dout = _losses(model, run.lossfn, out, yb, wb, xp, run.members_order)
    del out
    grads = model._backprop(caches, dout, xp=xp, inplace=True, plan=run.plan)
    # the previous step's arrays are let go only now, after this step's of the same sizes
    # exist: freed first, they would shrink the heap, and the next step's would be
    # faulted in again page by page (a large share of a small ensemble's step)
    run.held = (caches, grads)
    return values, grads


def _shard_grads(run: _Run, xb, yb, wb):
    """This rank's shard's losses, gradients and weight per member (K,), for
    :meth:`arraymlp.distributed.DataParallel.member_loss_and_grads`; None when the
    shard is empty."""
    n = int(xb.shape[0])
    if n == 0:
        return None
    values, grads = _member_grads(run, xb, yb, wb)
    xp, like = run.xp, run.like
    if wb is None:
        weights = xp.full((run.model.ensemble,), float(n), dtype=like.dtype, device=like.device)
    else:
        weights = xp.sum(wb, axis=1)
    return values, grads, weights


def _step(run: _Run, xb, yb, wb, l2=None):
    """One training step of every member; each member's loss on the batch, (K,), left on
    the device (nothing is read back to the host). ``l2``: the batch's coefficient
    (default ``run.l2``). Under data parallelism ``(xb, yb, wb)`` is this rank's shard
    and one ``Allreduce`` gives every member's gradient of the global batch."""
    model, xp = run.model, run.xp
    l2 = run.l2 if l2 is None else l2
    if run.amp is not None:  # (never under data parallelism: refused)
        return _amp_step(run, xb, yb, wb, l2)
    if run.dp is None:
        values, grads = _member_grads(run, xb, yb, wb)
    else:
        values, grads, _ = run.dp.member_loss_and_grads(model, lambda: _shard_grads(run, xb, yb, wb))
    if _has_l2(l2):
        values = values + _penalty(model, l2, xp)
    if _has_l2(l2):
        for layer, p, g in zip(model.layers, model.params, grads):
            if isinstance(layer, L.Dense):
                g["W"] = g["W"] + l2 * p["W"]
    run.rule.step(model.params, grads, run.active_host)
    run.step += 1
    return values


def _amp_step(run: _Run, xb, yb, wb, l2):
    """A mixed-precision step of every member (:mod:`arraymlp.precision`): forward and
    backward in the compute dtype over casts of the float32 master weights, the loss in
    float32, each member's loss gradient multiplied by its own loss scale and its
    gradients divided by it; a member whose gradients are not all finite keeps its
    parameters and moments (``xp.where`` on the device) and halves its scale, the others
    step. Each member thus does what its plain model's mixed-precision step does."""
    model, xp, amp = run.model, run.xp, run.amp
    k = model.ensemble
    amp._state(xp, device_of(xb), k)
    cdt = getattr(xp, amp.dtype_name)
    master, master_dtype = model.params, model.dtype
    model.params, model.dtype = [{key: xp.astype(v, cdt) for key, v in p.items()} for p in master], cdt
    try:
        out, caches = model.forward(xp.astype(xb, cdt), training=True, xp=xp,
                                    upto=len(model.layers) - 1 if run.fused else None)
        out = xp.astype(out, xp.float32)
        if run.accs:
            _update_metrics(run, yb, out, xp)
        values, dout = _losses(model, run.lossfn, out, yb, wb, xp, run.members_order)
        if amp.dynamic:
            dout = dout * xp.reshape(amp.scale, (k, 1, 1))
        grads = model._backprop(caches, xp.astype(dout, cdt), xp=xp, inplace=True)
    finally:
        model.params, model.dtype = master, master_dtype
    del caches, out, dout
    if _has_l2(l2):
        values = values + _penalty(model, l2, xp)
    inv = xp.reshape(1.0 / amp.scale, (k, 1, 1)) if amp.dynamic else None
    grads32 = master_grads(model.layers, master, grads, inv, l2 if _has_l2(l2) else None, xp)
    if not amp.dynamic:
        run.rule.step(model.params, grads32, run.active_host)
    else:
        # each member's: a NaN or infinite entry makes that member's sum non-finite
        ok = None
        for d in grads32:
            for gk in d.values():
                fin = xp.isfinite(xp.sum(gk, axis=tuple(range(1, gk.ndim))))
                ok = fin if ok is None else ok & fin
        run.rule.build_state(model.params)  # before the snapshot, so that a skipped first step keeps it
        before = _amp_snapshot(model.params, run.rule.state, xp)
        run.rule.step(model.params, grads32, run.active_host)
        _keep_if_not(xp.reshape(ok, (k, 1, 1)), before, model.params, run.rule.state, xp)
        kept = (amp.scale, amp.good_steps, amp.skipped)
        amp.update_scale(ok, xp)
        if not run.active_host.all():  # a frozen member's loss scale and counts stand still too
            on = xp.asarray(run.active_host, device=device_of(amp.scale))
            amp.scale, amp.good_steps, amp.skipped = (xp.where(on, new, old) for new, old in
                                                      zip((amp.scale, amp.good_steps, amp.skipped), kept))
    run.step += 1
    return values


#: Per-step losses (K,) are kept on the device and stacked into one (steps, K) array
#: every this many steps, so that a long epoch holds few arrays.
_STACK_EVERY = 256

#: A long epoch reads its losses every this many steps (one transfer), checks them and
#: copies the parameters and optimiser state again: a divergence is found, and replayed,
#: within this many steps (as the plain fit does).
_CHECK_EVERY = 1000


def _batch(run: _Run, order, k: int, batch_size: int):
    """Batch ``k`` of the epoch's order (this rank's shard of it under data parallelism)."""
    x, y, w, xp = run.x, run.y, run.w, run.xp
    n = int(x.shape[0])
    start, end = k * batch_size, min((k + 1) * batch_size, n)
    if run.dp is not None:
        start, end = run.dp.shard(start, end)
    if order is None:
        return slice_rows(x, start, end), y[start:end, ...], None if w is None else w[:, start:end]
    if run.members_order:  # each member's own rows: order (K, n) and its offsets into the flat weights
        rows, flat = order
        km, b = int(rows.shape[0]), end - start
        idx = xp.reshape(rows[:, start:end], (-1,))
        xb = xp.reshape(xp.take(x, idx, axis=0), (km, b, *x.shape[1:]))
        yb = xp.reshape(xp.take(y, idx, axis=0), (km, b, *y.shape[1:]))
        wb = None if w is None else xp.reshape(xp.take(xp.reshape(w, (-1,)), xp.reshape(flat[:, start:end], (-1,)),
                                                       axis=0), (km, b))
        return xb, yb, wb
    idx = order[start:end]
    return take_rows(x, idx, xp), xp.take(y, idx, axis=0), None if w is None else xp.take(w, idx, axis=1)


def _snapshot(run: _Run) -> tuple:
    """Copies, on the device, of what an epoch's steps change: the stacked parameters, the
    members' optimiser state and step count, the step counter and the generator's state."""
    xp, rule = run.xp, run.rule

    def copy(d):
        return {key: xp.asarray(a, copy=True) for key, a in d.items()}

    params = [copy(p) for p in run.model.params]
    state = None if rule.state is None else [{key: copy(st) for key, st in layer.items()} for layer in rule.state]
    rng = None if run.model.rng is None else run.model.rng.get_state()
    amp = None if run.amp is None else run.amp.get_state()
    return params, state, rule.steps.copy(), run.step, rng, amp


def _restore(run: _Run, snapshot: tuple) -> None:
    params, state, t, step, rng, amp = snapshot
    if amp is not None:
        run.amp.set_state(amp)
    run.model.params = [dict(p) for p in params]
    run.rule.state = None if state is None else [{key: dict(st) for key, st in layer.items()} for layer in state]
    run.rule.steps, run.step = t.copy(), step
    if rng is not None:
        run.model.rng.set_state(rng)


def _divergence(run: _Run, row, epoch: int) -> DivergenceError:
    """The error for a step whose losses ``row`` (K host floats) are not all finite; the
    parameters are those before that step (one host read, to say whether they are finite)."""
    xp = run.xp
    bad = numpy.flatnonzero(~numpy.isfinite(row)).tolist()
    finite = all(bool(xp.all(xp.isfinite(a))) for p in run.model.params for a in p.values())
    kept = ("the parameters are those of the last finite step" if finite else
            f"the update of step {run.step} already made some parameters non-finite")
    msg = (f"the training loss of members {bad} became non-finite at epoch {epoch + 1}, "
           f"step {run.step + 1}; {kept}. Lower those members' learning rates or scale the inputs.")
    return DivergenceError(msg, epoch=epoch, step=run.step, params_finite=finite)


def _member_orders(run: _Run, n: int):
    """Each member's order of the epoch, drawn on the host from its own generator as a
    plain model's ``rng.permutation(n)`` draws it (a frozen member draws nothing and
    keeps the rows' order), copied to the device once: ``(rows, flat)``, both (K, n),
    ``flat`` the rows' positions in the members' flattened (K * n) sample weights."""
    rng, k = run.model.rng, run.model.ensemble
    rows = numpy.empty((k, n), dtype=numpy.int64)
    for i, member in enumerate(rng.members):
        rows[i] = member.host.permutation(n) if run.active_host[i] else numpy.arange(n)
    xp, device, ix = run.xp, run.model.device, index_dtype(run.xp)
    flat = rows + (numpy.arange(k, dtype=numpy.int64) * n)[:, None]
    return xp.asarray(rows, dtype=ix, device=device), xp.asarray(flat, dtype=ix, device=device)


def _batch_l2(run: _Run, host_order, k: int, batch_size: int):
    """The L2 coefficient of batch ``k``: ``run.l2``, or with ``run.l2_per_batch`` that
    over the batch's size (its weight sum, with host weights), as the one-member
    estimator computes it; None for a batch to skip (host weights all zero)."""
    if not run.l2_per_batch and run.host_weight is None:
        return run.l2
    start, end = k * batch_size, min((k + 1) * batch_size, int(run.x.shape[0]))
    size = float(end - start)
    if run.host_weight is not None:
        rows = slice(start, end) if host_order is None else host_order[start:end]
        size = float(run.host_weight[rows].sum())
        if size <= 0.0:
            return None
    return run.l2 / size if run.l2_per_batch else run.l2


def _run_epoch(run: _Run, epoch: int, batch_size: int, shuffle: bool):
    """The epoch's batches: each member's mean training loss, (K,) on the host, and
    whether an ``on_batch_end`` hook asked to stop.

    No step reads anything back to the host: each step's losses (K,) stay on the device
    and are read together, in one transfer, at the end of the epoch (every
    :data:`_CHECK_EVERY` steps in a longer one). A step with a non-finite loss is found
    then: the steps since the last read are replayed from a copy of the parameters,
    optimiser state and generator state taken there, up to the step before it, so that
    :class:`DivergenceError` leaves the parameters of the last finite step and names the
    members whose loss was not finite, as a check after every step would. A callback
    that overrides ``on_batch_end`` needs each step's losses: then every step is read.

    With host weights (``run.host_weight``) the order is drawn on the host (the draw of
    ``rng.permutation``), so that the batches' weight sums need no device read; a batch
    whose weights are all zero takes no step and adds nothing to the epoch's loss."""
    xp = run.xp
    # a frozen member's streams stay where they are, as its plain model's would
    run.model.rng.active = None if run.active_host.all() else run.active_host.copy()
    check_every = 1 if run.batch_callbacks else _CHECK_EVERY
    n = int(run.x.shape[0])
    n_steps = -(-n // batch_size)
    host_order = None
    if shuffle and run.members_order:
        order = _member_orders(run, n)
    elif shuffle and run.host_weight is not None:
        host_order = run.model.rng.host.permutation(n)
        order = xp.asarray(host_order, dtype=index_dtype(xp), device=run.model.device)
    else:
        order = run.model.rng.permutation(n) if shuffle else None
    l2s = [_batch_l2(run, host_order, k, batch_size) for k in range(n_steps)]
    taken = [k for k in range(n_steps) if l2s[k] is not None]  # the batches that take a step
    sizes = (numpy.minimum(numpy.arange(1, n_steps + 1) * batch_size, n) - numpy.arange(n_steps) * batch_size)[taken]
    totals = numpy.zeros(run.model.ensemble)
    run.accs = [m.start_members(xp, run.model.dtype, run.model.device, run.model.ensemble) for m in run.metrics]
    if run.dp is not None and run.accs and taken:  # every rank's sums about the epoch's first row: they add up
        row = taken[0] * batch_size
        first = run.y[row:row + 1, ...] if order is None else xp.take(run.y, order[row:row + 1], axis=0)
        for acc in run.accs:
            acc.metric._anchor(acc, first)
    snapshot, first = _snapshot(run), 0  # the state before the ``first``-th step taken this epoch
    values = StepValues(xp, _STACK_EVERY)
    for j, k in enumerate(taken):
        values.append(_step(run, *_batch(run, order, k, batch_size), l2=l2s[k]))
        if j + 1 - first < check_every and j + 1 < len(taken):
            continue
        losses = values.read()  # the read
        ok = numpy.isfinite(losses).all(axis=1)
        if not ok.all():
            i = int(numpy.argmin(ok))
            _restore(run, snapshot)
            run.accs = []  # a replay adds nothing to the metrics
            for jj in range(first, first + i):
                _step(run, *_batch(run, order, taken[jj], batch_size), l2=l2s[taken[jj]])
            raise _divergence(run, losses[i], epoch)
        totals += sizes[first:j + 1] @ losses
        first = j + 1
        if run.batch_callbacks:  # check_every 1: one row, this step's
            logs = {"epoch": epoch, "step": run.step, "loss": losses[-1]}
            stop = any([bool(cb.on_batch_end(run.model, logs)) for cb in run.batch_callbacks])
            if stop if run.dp is None else run.dp.agree_batch(stop):
                return totals / int(sizes[:first].sum()), True
        if first < len(taken):
            snapshot = _snapshot(run)
    return totals / n, False


def _stop_members(run: _Run, epoch: int, logs) -> bool:
    """Per-member early stopping after an epoch; whether every member has stopped."""
    stopper, xp, like = run.stopper, run.xp, run.like
    score = stopper.sign * logs[stopper.monitor]
    improved = run.active_host & (score < run.best - stopper.min_delta)
    run.best = numpy.where(improved, score, run.best)
    run.best_epoch = numpy.where(improved, epoch, run.best_epoch)
    run.wait = numpy.where(improved, 0, run.wait + run.active_host)
    if stopper.restore_best_weights and improved.any():
        run.best_params = _keep_best(run.model.params, run.best_params, improved, xp, like)
    stop = run.active_host & (run.wait > stopper.patience)
    if stop.any():
        run.history.stopped_epoch = numpy.where(stop, epoch, run.history.stopped_epoch)
        run.active_host = run.active_host & ~stop
    return not run.active_host.any()


def _members_loss(model, x, y, loss, sample_weight, l2, training, backward):
    lossfn = get_loss(loss)
    x, xp = model._check_x(x)
    y = model._check_target(y, xp)
    n, k = int(x.shape[0]), model.ensemble
    like = next(a for p in model.params for a in p.values())
    w = _member_weights(sample_weight, k, n, xp, like)
    lossfn.fn(xp.zeros((n, model.n_outputs), dtype=model.dtype, device=model.device), y, xp=xp)
    l2 = _per_member("l2", l2, k, xp, like)
    fused = model._fused(lossfn)
    out, caches = model.forward(x, training=training, xp=xp, upto=len(model.layers) - 1 if fused else None,
                                keep=backward)
    values, dout = _losses(model, lossfn, out, y, w, xp)
    if _has_l2(l2):
        values = values + _penalty(model, l2, xp)
    if not backward:
        return values, None
    grads = model._backprop(caches, dout, xp=xp, inplace=True)
    if _has_l2(l2):
        for layer, p, g in zip(model.layers, model.params, grads):
            if isinstance(layer, L.Dense):
                g["W"] = g["W"] + l2 * p["W"]
    return values, grads


def loss_and_grads(model, x, y, *, loss: str | None = None, sample_weight=None, l2: Any = 0.0,
                   training: bool = True):
    """An ensemble's ``model.loss_and_grads``: the sum of the members' losses and its
    gradient, which is each member's own gradient in its slice of the stacked parameters.

    Parameters
    ----------
    model : Sequential built with ``ensemble=K``
    x, y, loss, training
        As for :meth:`arraymlp.Sequential.loss_and_grads`.
    sample_weight : array of shape (K, n) or (n,), optional
    l2 : float or K floats

    Returns
    -------
    loss : 0-d array
        ``sum_k L_k``.
    grads : list of dict of arrays, mirroring the stacked ``params``
    """
    loss = model._own_loss(loss, y)  # the ensemble's fitted loss, else the one fit would infer
    values, grads = _members_loss(model, x, y, loss, sample_weight, l2, training, True)
    return model.xp.sum(values), grads


def loss(model, x, y, *, loss: str | None = None, sample_weight=None, l2: Any = 0.0, training: bool = False,
         reduce: str | None = "sum"):
    """An ensemble's ``model.loss``: the sum of the members' losses (0-d), or each
    member's, shape (K,), with ``reduce=None``; ``loss`` defaults to the ensemble's own
    (that of its last fit, else the one ``fit`` would infer)."""
    if reduce not in ("sum", None):
        msg = f"reduce must be 'sum' or None (one loss per member), got {reduce!r}"
        raise ValueError(msg)
    loss = model._own_loss(loss, y)
    values, _ = _members_loss(model, x, y, loss, sample_weight, l2, training, False)
    return values if reduce is None else model.xp.sum(values)


def make_step(model, x, y, *, loss: str = "mse", optimizer: str | Optimizer = "adam", lr: Any = None):
    """A function taking one training step of every member of ``model`` on the batch
    ``(x, y)``, as :func:`fit` takes it (forward, each member's loss read on the host,
    backward, the optimiser's update); for benchmarks.

    Parameters
    ----------
    model : Sequential built with ``ensemble=K``
    x : array, shape (n, n_features)
    y : array, targets or labels (n,)
    loss, optimizer, lr
        As for :func:`fit`.

    Returns
    -------
    callable
        ``step()`` returns the members' losses on the batch, a NumPy array (K,).
    """
    lossfn = get_loss(loss)
    run = _prepare(model, x, y, lossfn, None, None, 0.0)
    run.rule = _MemberUpdate(get_optimizer(optimizer), model.ensemble, run.xp, run.like, lr=lr, momentum=None,
                             weight_decay=None, betas=None)
    run.fused = model._fused(lossfn)
    run.plan = plan_for(model, run.xp)
    return lambda: to_numpy(_step(run, run.x, run.y, None)).astype(float)


def _keep_best(params, best, improved, xp, like):
    """``best`` with the members in ``improved`` (a host bool array (K,)) replaced by their
    current parameters (copies)."""
    if best is None:
        return [{key: xp.asarray(a, copy=True) for key, a in p.items()} for p in params]
    mask = xp.asarray(improved, device=like.device)
    mask = xp.reshape(mask, (-1, 1, 1))
    return [{key: xp.where(mask, a, best[i][key]) for key, a in p.items()} for i, p in enumerate(params)]


# ------------------------------------------------------------------------- predict
_REDUCE = ("mean", None)


def _check_reduce(reduce):
    if reduce not in _REDUCE:
        msg = f"reduce must be 'mean' (average the members) or None (one result per member), got {reduce!r}"
        raise ValueError(msg)


def predict_proba(model, x, *, reduce: str | None = "mean"):
    """Class probabilities of an ensemble: the members' probabilities averaged, shape
    (n, n_classes), or each member's, (K, n, n_classes), with ``reduce=None``."""
    from .functional import sigmoid, softmax

    _check_reduce(reduce)
    out = model(x)
    xp = model.xp
    task = getattr(model, "task_", None)
    act = model.output_activation
    if act not in ("softmax", "sigmoid"):
        if task == "multiclass":
            out = softmax(out, xp=xp)
        elif task == "multilabel":
            out = sigmoid(out, xp=xp)
        else:
            msg = ("predict_proba needs a classifier: a softmax/sigmoid output, or a model fitted with a "
                   "classification loss")
            raise ValueError(msg)
    return out if reduce is None else xp.mean(out, axis=0)


def predict(model, x, *, reduce: str | None = "mean"):
    """Predictions of an ensemble: for a regressor the members' outputs averaged, (n, m);
    for a classifier the labels of the averaged probabilities, (n,) (0/1 (n, k) for
    multilabel); ``reduce=None`` gives each member's own, with a leading axis of K."""
    _check_reduce(reduce)
    task = getattr(model, "task_", None)
    act = model.output_activation
    if task is None:
        task = {"softmax": "multiclass", "sigmoid": "multilabel"}.get(act, "regression")
    xp = model.xp
    if task == "regression":
        out = model(x)
        return out if reduce is None else xp.mean(out, axis=0)
    p = predict_proba(model, x, reduce=reduce)
    if task == "multiclass":
        return xp.argmax(p, axis=-1)
    return xp.astype(p > 0.5, index_dtype(xp))


# ------------------------------------------------------------------- cross-validation
def _folds(cv, n: int, seed: int | None):
    if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
        if not 2 <= cv <= n:
            msg = (f"cv must be a number of folds in [2, n_samples={n}] or a list of (train, test) index arrays, "
                   f"got {cv!r}")
            raise ValueError(msg)
        order = numpy.random.default_rng(seed).permutation(n)
        parts = numpy.array_split(order, int(cv))
        return [(numpy.setdiff1d(numpy.arange(n), part), numpy.sort(part)) for part in parts]
    folds = [(numpy.asarray(tr), numpy.asarray(te)) for tr, te in cv]
    for k, (_, te) in enumerate(folds):
        if te.size == 0:
            msg = f"fold {k} holds out no samples"
            raise ValueError(msg)
    return folds


def cross_val_scores(model, x, y, *, cv: Any = 5, cv_seed: int | None = 0, **fit_kwargs) -> numpy.ndarray:
    """Evaluate one configuration over K cross-validation folds in one fit.

    Member ``k`` of ``model`` (an ensemble of K members, K the number of folds) trains with
    sample weights 1 on fold ``k``'s training rows and 0 on its held-out rows (all rows go
    through the network, the held-out ones add nothing to member ``k``'s loss), and is
    scored on its held-out rows.

    Parameters
    ----------
    model : Sequential built with ``ensemble=K``
        Trained in place.
    x : array, shape (n, n_features)
    y : array, shape (n, n_outputs), (n,), or integer labels (n,)
    cv : int or sequence of (train, test) index arrays
        K folds: an int splits a seeded permutation of the rows into K nearly equal parts
        (use scikit-learn's splitters for stratified folds); a sequence gives the folds.
    cv_seed : int or None
        Seed of the permutation of an int ``cv``.
    **fit_kwargs
        Passed to :func:`fit` (``loss``, ``lr`` as one or K values, ``epochs``, ...);
        ``sample_weight`` of shape (n,) is multiplied into the folds' weights.

    Returns
    -------
    numpy.ndarray, shape (K,)
        Each member's held-out accuracy (classification) or R^2 (regression).

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> from arraymlp.ensemble import cross_val_scores
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(60, 3)); y = (x[:, 0] > 0).astype(np.int64)
    >>> model = am.MLP([3, 8, 2], ensemble=3, dtype="float64", backend="numpy", seed=0)
    >>> scores = cross_val_scores(model, x, y, cv=3, loss="cross_entropy", lr=0.05, epochs=40,
    ...                           progress=False)
    >>> scores.shape, bool(scores.mean() > 0.8)
    ((3,), True)
    """
    k = model.ensemble
    n = int(x.shape[0])
    folds = _folds(cv, n, cv_seed)
    if len(folds) != k:
        msg = f"cv gives {len(folds)} folds but the ensemble has {k} members; build it with ensemble={len(folds)}"
        raise ValueError(msg)
    w = numpy.ones((k, n))
    for i, (_, te) in enumerate(folds):
        w[i, te] = 0.0
    extra = fit_kwargs.pop("sample_weight", None)
    if extra is not None:
        w = w * to_numpy(extra).reshape(1, n)
    xp = model.xp
    if xp is None:  # not built: follow x
        model._check_x(x)
        xp = model.xp
    fit(model, x, y, sample_weight=xp.asarray(w, device=model.device), **fit_kwargs)
    lossfn = get_loss(getattr(model, "loss_", None) or fit_kwargs.get("loss", "mse"))
    xc, _ = model._check_x(x)
    yc = model._check_target(y, xp)
    fused = model._fused(lossfn)
    out = model.forward(xc, training=False, xp=xp, upto=len(model.layers) - 1 if fused else None, keep=False)[0]
    scores = numpy.empty(k)
    for i, (_, te) in enumerate(folds):
        idx = xp.asarray(numpy.asarray(te, dtype=numpy.int64), device=model.device)
        oi = xp.take(out[i:i + 1, ...], idx, axis=1)
        scores[i] = member_metric(model, oi, xp.take(yc, idx, axis=0), lossfn, xp, logits=fused)[0]
    return scores


# ------------------------------------------------------------------------- L-BFGS
def _is_lbfgs(model, optimizer, reuse: bool) -> bool:
    """Whether the fit is L-BFGS's: asked for, or (``partial_fit``) the last fit's."""
    if optimizer is None:
        return reuse and isinstance(getattr(model, "optimizer_", None), LBFGS)
    return optimizer == "lbfgs" or isinstance(optimizer, LBFGS)


def _lbfgs_objective(model, x, y, lossfn, w, l2, xp, *, on_outputs=None):
    """The members' full-batch objectives for :meth:`arraymlp.optim.LBFGS.iterate_members`:
    ``fun(params) -> (losses (K,), grads)``, one batched forward and backward pass over
    all of ``(x, y)`` at the parameters the model holds (``params`` is
    ``model.params``). Member ``k``'s loss is its weighted mean loss (row ``k`` of ``w``,
    (K, n), or None) plus ``l2[k]/2 * sum(W**2)``, its gradient the slice ``k`` of the
    stacked gradients. ``on_outputs(out)`` sees the outputs (K, n, m) before the loss.
    A row that is the table's under another object (the estimators' cross-entropy) is
    taken as the table's, whose members' losses are one batched pass with no host read."""
    table = LOSSES.get(lossfn.name)
    if table is not None and table.fn is lossfn.fn and table.fused_activation == lossfn.fused_activation:
        lossfn = table
    upto = len(model.layers) - 1 if model._fused(lossfn) else None

    def fun(params):
        out, caches = model.forward(x, training=True, xp=xp, upto=upto)
        if on_outputs is not None:
            on_outputs(out)
        values, dout = _losses(model, lossfn, out, y, w, xp)
        del out
        grads = model._backprop(caches, dout, xp=xp, inplace=True)
        if _has_l2(l2):
            values = values + _penalty(model, l2, xp)
            for layer, p, g in zip(model.layers, model.params, grads):
                if isinstance(layer, L.Dense):
                    g["W"] = g["W"] + l2 * p["W"]
        return values, grads

    return fun


def _fit_lbfgs(model, x, y, *, loss=None, optimizer="lbfgs", lr=None, l2=0.0, epochs=10, sample_weight=None,
               metrics=None, callbacks=(), validation_split=0.0, batch_size=32, shuffle=True, seed=None,
               progress=True, verbose=False, _reuse_optimizer=False, _l2_per_batch=False, _host_weight=None,
               **refused) -> EnsembleHistory:
    """:func:`fit` with ``optimizer="lbfgs"``: K independent full-batch L-BFGS runs side by
    side (:meth:`arraymlp.optim.LBFGS.iterate_members`), member ``i`` exactly the run of
    the plain model's L-BFGS fit from member ``i``'s parameters, with its own line search,
    history, counts and stopping rule; every round evaluates all members at their own
    trial points in one batched pass.

    Row ``j`` of the history (``loss``, ``metrics[name]``, shape (K,)) holds each member's
    values after its own iteration ``j + 1`` (NaN once it has stopped); ``epochs`` caps
    each member's iterations. ``model.optimizer_`` holds each member's ``n_iter``,
    ``n_fun``, ``loss``, ``status`` and ``message``. Validation data, early stopping,
    callbacks, schedules, checkpoints, mixed precision and data parallelism are refused:
    the members reach their iterations at different rounds. ``batch_size``, ``shuffle``
    and ``seed`` do not apply (each evaluation is over all the data).
    """
    given = sorted(name.lstrip("_") for name, v in refused.items() if v is not None)
    given += ["callbacks"] * bool(list(callbacks)) + ["validation_split"] * bool(validation_split)
    if given:
        msg = (f"optimizer='lbfgs' trains the members as K full-batch runs that reach their iterations at "
               f"different times; it does not take {', '.join(given)}. Fit without them, or train the members "
               "one by one (model.member(i)) with the plain L-BFGS fit")
        raise ValueError(msg)
    _check_run(epochs, 1, 0.0)
    rates = [float(layer.p) for layer in model.layers if isinstance(layer, L.Dropout)]
    if any(rates):
        msg = (f"optimizer='lbfgs' needs a deterministic objective, but the model has dropout (p={max(rates)}), "
               "which draws a new mask at each evaluation; remove the dropout or use a mini-batch optimiser")
        raise ValueError(msg)
    if lr is not None and not isinstance(lr, numbers.Real):
        msg = f"lr (the scale of L-BFGS' first trial step) must be one number for every member, got {lr!r}"
        raise TypeError(msg)
    opt = get_optimizer(optimizer, **({} if lr is None else {"lr": lr}))
    lossfn = get_loss(model._own_loss(loss, y, last_fit=False))
    run = _prepare(model, x, y, lossfn, sample_weight, None, 0.0)
    k, xp = model.ensemble, run.xp
    l2 = _per_member("l2", l2, k, xp, run.like)
    model.task_ = lossfn.task
    model.loss_ = lossfn.name if LOSSES.get(lossfn.name) is lossfn else lossfn
    model.optimizer_, model.ensemble_optimizer_, model.schedule_ = opt, None, None
    history = _start_history(run, metrics)
    kind = _pair_kind(model, lossfn, model._fused(lossfn))
    latest: dict[str, Any] = {}

    def keep(out):  # the evaluation's metric sums, on the device, before the loss reuses out
        latest["accs"] = _metric_sums(run, y=run.y, out=out, kind=kind)

    fun = _lbfgs_objective(model, run.x, run.y, lossfn, run.w, l2, xp, on_outputs=keep if run.metrics else None)
    t0 = time.perf_counter()
    with quiet_overflow(xp):
        try:
            for done in opt.iterate_members(fun, model.params, limit=epochs):
                _record_lbfgs(run, done, latest, kind, time.perf_counter() - t0)
        except FloatingPointError as exc:
            msg = f"{exc}. Scale the inputs, or check the initial parameters."
            finite = all(bool(xp.all(xp.isfinite(a))) for p in model.params for a in p.values())
            raise DivergenceError(msg, epoch=0, step=0, params_finite=finite) from exc
    stopped = [s != "interrupted" for s in opt.status]
    history.stopped_epoch = numpy.where(stopped, numpy.maximum(opt.n_iter - 1, 0), -1)
    model.steps_ = getattr(model, "steps_", 0) + len(history.loss)
    return history


def _metric_sums(run, *, y, out, kind) -> list:
    accs = [m.start_members(run.xp, run.model.dtype, run.model.device, run.model.ensemble) for m in run.metrics]
    pair = _MembersPair(y, out, run.lossfn.task, run.xp, **kind)
    for acc in accs:
        acc.update(pair)
    return accs


def _record_lbfgs(run, done, latest, kind, elapsed: float) -> None:
    """The members' iterations finished in a round, into the history's rows: row ``j``
    holds each member's values after its iteration ``j + 1`` (NaN where it has none).
    The metrics come from the round's evaluation, or, for a member whose line search
    settled on an earlier trial, from one more forward pass at the members' points."""
    history, k = run.history, run.model.ensemble
    for i, it in done:
        j = it.n_iter - 1
        while len(history.loss) <= j:
            history.loss.append(numpy.full(k, numpy.nan))
            history.lr.append(run.model.optimizer_.lr)
            history.time.append(elapsed)
            for series in history.metrics.values():
                series.append(numpy.full(k, numpy.nan))
        history.loss[j][i] = it.loss
        history.time[j] = elapsed
    if not run.metrics:
        return
    values = {}
    if any(it.evaluation == it.n_fun for _, it in done):
        values["latest"] = read_results(latest["accs"], run.xp)
    if any(it.evaluation != it.n_fun for _, it in done):  # the parameters hold the members' points now
        upto = len(run.model.layers) - 1 if run.model._fused(run.lossfn) else None
        out = run.model.forward(run.x, training=False, xp=run.xp, upto=upto, keep=False)[0]
        values["points"] = read_results(_metric_sums(run, y=run.y, out=out, kind=kind), run.xp)
    for i, it in done:
        got = values["latest" if it.evaluation == it.n_fun else "points"]
        for m, v in zip(run.metrics, got):
            history.metrics[m.name][it.n_iter - 1][i] = float(numpy.asarray(v).reshape(-1)[i])


def _with_lbfgs(fit_members):
    """:func:`fit` with its L-BFGS branch: ``optimizer="lbfgs"`` (or an LBFGS, or, in
    ``partial_fit``, the last fit's) goes to :func:`_fit_lbfgs`, any other to the
    mini-batch loop."""

    @functools.wraps(fit_members)
    def fit(model, x, y, **options):
        if _is_lbfgs(model, options.get("optimizer", "adam"), options.get("_reuse_optimizer", False)):
            options["optimizer"] = options.get("optimizer") or model.optimizer_
            return _fit_lbfgs(model, x, y, **options)
        return fit_members(model, x, y, **options)

    return fit


fit = _with_lbfgs(fit)  # partial_fit, training.fit and model.fit all reach it through this name
