"""Models: :class:`Sequential` (a list of layers) and :class:`MLP` (built from sizes).

A model's ``params`` is a list with one dict of arrays per layer; gradients mirror it.
Forward is a loop over the layers; backward is the same loop reversed. The array
namespace is resolved once per public call and handed down to every kernel.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import types
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Generic, ParamSpec, Sequence, TypeVar, overload

from array_api_compat import is_dask_array

from . import ensemble as E
from . import layers as L
from ._backend import (
    Generator,
    MemberGenerators,
    as_csr,
    backend_name,
    canonical_device,
    check_same_backend,
    check_same_device,
    device_of,
    dtype_name,
    get_namespace,
    host_namespace,
    is_sparse,
    is_writeable,
    quiet_overflow,
    resolve_backend,
    resolve_dtype,
    sparse_device,
    sparse_namespace,
    sparse_values,
    to_backend,
)
from .fusion import _params_distinct, plan_for
from .init import default_for
from .kernels import kernels_for
from .losses import LOSSES, get_loss

if TYPE_CHECKING:
    from . import training

__all__ = ["MLP", "Sequential"]


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _TrainingMethod(Generic[_P, _R]):
    """A model method that is a function of :mod:`arraymlp.training` taking the model
    first: ``model.fit(x, y, ...)`` is ``training.fit(model, x, y, ...)``. ``help()``,
    ``inspect.signature`` and editors see that function's parameters and docstring (one
    source of truth), less ``model``; static type checkers read them through the
    ``ParamSpec``."""

    def __init__(self, fn: Callable[Concatenate[Any, _P], _R] | str):
        self.name = fn if isinstance(fn, str) else fn.__name__
        self.method: Any = None

    def _build(self):
        """The method, made at first use: loading a model (``arraymlp.io``) does not
        import the training loop."""
        from . import training

        fn = getattr(training, self.name)
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())

        name = self.name

        def method(self, *args, **kwargs):
            if self.ensemble is not None:  # K members at once: arraymlp.ensemble's loop
                ens_fn = getattr(E, name, None)
                if ens_fn is None:
                    msg = f"{name} of an ensemble is not supported yet"
                    raise NotImplementedError(msg)
                return ens_fn(self, *args, **kwargs)
            return fn(self, *args, **kwargs)

        method.__signature__ = sig.replace(parameters=[params[0].replace(name="self"), *params[1:]])
        method.__name__ = method.__qualname__ = fn.__name__
        method.__doc__ = fn.__doc__
        method.__module__ = fn.__module__
        self.method = method
        return method

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Callable[Concatenate[Any, _P], _R]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> Callable[_P, _R]: ...

    def __get__(self, obj, objtype=None):
        method = self.method or self._build()
        return method if obj is None else types.MethodType(method, obj)


def _cast_checked(a, dtype, xp, what: str, *, check_finite: bool = True):
    """``a`` (dense, floating) cast to ``dtype``, its values checked finite there (one
    read): a value the cast took past ``dtype``'s range is named as such, not as a NaN
    or an infinity the caller's data does not hold."""
    b = a
    if a.dtype != dtype:
        with quiet_overflow(xp):  # an overflow is reported below, by name
            b = xp.astype(a, dtype)
    if not check_finite or kernels_for(xp).all_finite(b, xp):
        return b
    if b is not a and kernels_for(xp).all_finite(a, xp):
        name = dtype_name(dtype)
        wider = {"float16": "float32", "float32": "float64"}.get(name)
        hint = f", or build the model with dtype={wider!r}" if wider else ""
        msg = (f"{what} has values beyond the range of {name} (largest finite {float(xp.finfo(dtype).max):g}): "
               f"scale them{hint}")
        raise ValueError(msg)
    msg = f"{what} contains NaN or infinite values"
    raise ValueError(msg)


def _replace_optimizer_state(source, target) -> None:
    """Give ``target`` a copy of ``source``'s state, placed on the parameters' backend,
    device and dtype at its next step (``to`` and ``copy`` move the parameters)."""
    if source is not None and target is not None:
        target.load_state_dict(source.state_dict())


class Sequential:
    """A chain of layers trained by backpropagation.

    Parameters
    ----------
    layers : sequence of Layer
        For example ``[Dense(64, 128), ReLU(), Dropout(0.1), Dense(128, 10)]``; sizes
        must chain.
    dtype : {"float32", "float64", "float16"}
        Dtype of the parameters (and of everything the model creates).
    backend : str, module or None
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"`` or a namespace
        module. ``None``: parameters are created on the first call, on the input's
        namespace and device.
    device : optional
        Device for the parameters (backend's default when ``None``).
    seed : int or None
        Seed of the model's random generator (initialisation, dropout, shuffling).
    ensemble : int or None
        ``K``: an ensemble of K members of this architecture, trained at once, their
        parameters stacked on a leading member axis (see :mod:`arraymlp.ensemble`);
        member ``i`` starts as a plain model of seed ``member_seeds[i]``.

    Attributes
    ----------
    params : list of dict of arrays, or None before the parameters exist
        With ``ensemble=K`` a dense layer holds ``W`` (K, n_in, n_out) and ``b``
        (K, 1, n_out).
    layers : list of Layer
    member_seeds : list of int or None
        The members' seeds (:func:`arraymlp.ensemble.member_seeds`); None for a plain model.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.Sequential([am.Dense(2, 3), am.ReLU(), am.Dense(3, 1)], backend="numpy", seed=0)
    >>> model
    Sequential(
      (0): Dense(2 -> 3)            9 params
      (1): ReLU()
      (2): Dense(3 -> 1)            4 params
    ) total 13 params, dtype=float32, backend=numpy, device=cpu
    >>> model(np.ones((4, 2), dtype=np.float32)).shape
    (4, 1)
    """

    _file_class = "Sequential"  # the class arraymlp files record it as (arraymlp.io)
    ensemble: int | None = None
    member_seeds: list[int] | None = None

    def __init__(self, layers: Sequence[L.Layer], *, dtype: str = "float32", backend: Any = None,
                 device: Any = None, seed: int | None = None, ensemble: int | None = None):
        layers = list(layers)
        L._check_chain(layers)
        self.layers = layers
        self.seed = seed
        self.ensemble = E.check_members(ensemble)
        if self.ensemble is not None:
            E.check_layers(layers)
        self.member_seeds = None if self.ensemble is None else E.member_seeds(seed, self.ensemble)
        self._dtype_name = dtype_name(dtype)
        if self._dtype_name not in ("float16", "float32", "float64"):
            msg = f"unsupported dtype {dtype!r}; use one of float16, float32, float64"
            raise ValueError(msg)
        self.params: list[dict[str, Any]] | None = None
        self.xp = None
        self.device = None
        self.rng: Generator | None = None
        if backend is not None:
            self._build(resolve_backend(backend), device)
        elif device is not None:
            msg = "device= needs backend= as well (or leave both out and the model follows its inputs)"
            raise ValueError(msg)

    # ------------------------------------------------------------------ construction
    def _build(self, xp, device) -> None:
        self.xp = xp
        self.device = canonical_device(xp, device)
        self.dtype = resolve_dtype(xp, self._dtype_name)
        self.rng = Generator(self.seed, xp, self.device)
        if self.ensemble is not None:
            self.params, members = E.init_members(self.layers, self.member_seeds, xp, self.device, self.dtype)
            self.rng = MemberGenerators(self.rng, members)
            return
        self.params = [layer.init_params(rng=self.rng, dtype=self.dtype) for layer in self.layers]

    # ------------------------------------------------------------------ ensembles
    def member(self, i: int) -> "Sequential":
        """Member ``i`` of an ensemble as a plain model holding a copy of its parameters.

        Parameters
        ----------
        i : int
            In ``[-K, K)``.

        Returns
        -------
        Sequential (or MLP)
            A plain model of the same class, layers, dtype, backend and device, with
            ``seed`` the member's seed and a copy of the member's generator (its
            dropout and shuffling streams where they are: those of a plain model of
            that seed that drew what the member drew).

        Examples
        --------
        >>> import numpy as np, arraymlp as am
        >>> ens = am.MLP([4, 8, 3], ensemble=5, backend="numpy", seed=0)
        >>> plain = am.MLP([4, 8, 3], backend="numpy", seed=ens.member_seeds[2])
        >>> bool(np.array_equal(ens.member(2).params[0]["W"], plain.params[0]["W"]))
        True
        """
        k = self.ensemble
        if k is None:
            msg = "member() needs an ensemble (a model built with ensemble=K); this model is a plain one"
            raise ValueError(msg)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -k <= i < k:
            msg = f"member index must be an int in [{-k}, {k}) for an ensemble of {k} members, got {i!r}"
            raise IndexError(msg)
        i = int(i) % k
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.layers = list(self.layers)
        new.ensemble, new.member_seeds = None, None
        new.seed = self.member_seeds[i] if self.member_seeds is not None else None
        for attr in ("optimizer_", "schedule_", "steps_", "ensemble_optimizer_"):
            new.__dict__.pop(attr, None)
        if self.params is not None:
            new.params = E.member_params(self.params, i, self.xp)
            members = getattr(self.rng, "members", None)  # the member's own streams, where they are
            new.rng = members[i].moved(self.xp, self.device) if members else Generator(new.seed, self.xp, self.device)
        return new

    @classmethod
    def stack(cls, models: Sequence["Sequential"]) -> "Sequential":
        """An ensemble whose members are copies of plain ``models`` of one architecture.

        Parameters
        ----------
        models : sequence of Sequential
            Built (parameters exist), plain, of equal layers, dtype, backend and device.

        Returns
        -------
        Sequential (or MLP)
            ``ensemble=len(models)``; ``member(i)`` has ``models[i]``'s parameters.

        Examples
        --------
        >>> import numpy as np, arraymlp as am
        >>> models = [am.MLP([4, 8, 3], backend="numpy", seed=s) for s in (1, 2)]
        >>> ens = am.MLP.stack(models)
        >>> ens.ensemble, ens.params[0]["W"].shape, ens.params[0]["b"].shape
        (2, (2, 4, 8), (2, 1, 8))
        """
        models = list(models)
        if not models:
            msg = "stack needs at least one model, got an empty sequence"
            raise ValueError(msg)
        first = models[0]
        for i, m in enumerate(models):
            if not isinstance(m, Sequential):
                msg = f"stack: models[{i}] is a {type(m).__name__}, not an arraymlp model"
                raise TypeError(msg)
            if m.ensemble is not None:
                msg = f"stack: models[{i}] is already an ensemble of {m.ensemble} members; stack plain models"
                raise ValueError(msg)
            if m.params is None:
                msg = f"stack: models[{i}] has no parameters yet; build it with backend= or call it once"
                raise ValueError(msg)
            if [layer.config() for layer in m.layers] != [layer.config() for layer in first.layers]:
                msg = (f"stack: models[{i}] has layers {m.layers!r} but models[0] has {first.layers!r}; "
                       "the members of an ensemble share one architecture")
                raise ValueError(msg)
            if m.xp is not first.xp or m.device != first.device:
                msg = (f"stack: models[{i}] is on backend {m.backend!r}, device {m.device!r} but models[0] on "
                       f"{first.backend!r}, device {first.device!r}; move them with model.to(...) first")
                raise ValueError(msg)
            if m.dtype_name != first.dtype_name:
                msg = (f"stack: models[{i}] has dtype {m.dtype_name} but models[0] has {first.dtype_name}; "
                       "convert with model.copy(dtype=...) first")
                raise ValueError(msg)
        E.check_layers(first.layers)
        new = object.__new__(type(first))
        new.__dict__.update(first.__dict__)
        for attr in ("optimizer_", "schedule_", "steps_", "ensemble_optimizer_"):
            new.__dict__.pop(attr, None)
        new.layers = list(first.layers)
        new.ensemble = len(models)
        new.member_seeds = [m.seed for m in models]
        new.params = E.stack_params([m.params for m in models], first.xp)
        new.rng = MemberGenerators(first.rng.moved(first.xp, first.device),
                                   [m.rng.moved(first.xp, first.device) for m in models])
        return new

    @property
    def n_features_in(self) -> int:
        """Input feature count (of the first sized layer)."""
        return next(layer.n_in for layer in self.layers if layer.n_in is not None)

    @property
    def n_outputs(self) -> int:
        """Output feature count (of the last sized layer)."""
        return next(layer.n_out for layer in reversed(self.layers) if layer.n_out is not None)

    @property
    def n_params(self) -> int:
        """Number of scalar parameters (of all members, for an ensemble)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, L.Dense):
                total += layer.n_in * layer.n_out + (layer.n_out if layer.bias else 0)
            elif isinstance(layer, L.LayerNorm):
                total += 2 * layer.n_in
        return total * (self.ensemble or 1)

    @property
    def backend(self) -> str | None:
        """Name of the parameters' backend, ``None`` before they exist."""
        return None if self.xp is None else backend_name(self.xp)

    @property
    def dtype_name(self) -> str:
        return self._dtype_name

    @property
    def output_activation(self) -> str | None:
        """Name of the final Activation layer, if the model ends with one."""
        last = self.layers[-1]
        return last.name if isinstance(last, L.Activation) else None

    def to(self, backend: Any, device: Any = None) -> "Sequential":
        """Move the parameters (and generator) to another backend/device, in place.

        The last ``fit``'s optimiser state (``optimizer_``) and mixed-precision loss scale
        (``precision_``) follow at the next step, so
        ``partial_fit`` continues on the new backend. Returns ``self``, so
        ``model = model.to("cupy")`` reads naturally.
        """
        xp = resolve_backend(backend)
        if self.params is None:
            self._build(xp, device)
            return self
        device = canonical_device(xp, device)
        self.params = [{k: to_backend(v, xp, device=device) for k, v in p.items()} for p in self.params]
        self.xp, self.device = xp, device
        self.dtype = resolve_dtype(xp, self._dtype_name)
        self.rng = self.rng.moved(xp, device) if self.rng is not None else Generator(self.seed, xp, device)
        _replace_optimizer_state(getattr(self, "optimizer_", None), getattr(self, "optimizer_", None))
        if getattr(self, "ensemble_optimizer_", None) is not None:  # an ensemble's members' optimiser moves too
            self.ensemble_optimizer_ = E.moved_rule(self.ensemble_optimizer_, self.params, xp)
        return self

    def copy(self, *, dtype: str | None = None, backend: Any = None, device: Any = None) -> "Sequential":
        """An independent copy, optionally in another dtype or on another backend.

        The copy has its own layers (a shallow copy of each: setting an attribute of
        one, such as a dropout rate, leaves the other's alone), optimiser
        (``optimizer_``, with a copy of the state), schedule and loss scale: training
        one does not move the other.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.pop("ensemble_optimizer_", None)  # (a copy of an ensemble's members' optimiser: below)
        new.layers = [copy.copy(layer) for layer in self.layers]  # its own: a change to one leaves the other's
        new._dtype_name = dtype_name(dtype) if dtype is not None else self._dtype_name
        if self.params is None:
            new.params = None
            if backend is not None:
                new._build(resolve_backend(backend), device)
            return new
        xp = resolve_backend(backend) if backend is not None else self.xp
        if device is not None:
            dev = canonical_device(xp, device)
        else:
            dev = self.device if xp is self.xp else canonical_device(xp)
        new.xp, new.device = xp, dev
        new.dtype = resolve_dtype(xp, new._dtype_name)
        new.params = [
            {k: xp.astype(to_backend(v, xp, device=dev), new.dtype, copy=True) for k, v in p.items()}
            for p in self.params
        ]
        new.rng = self.rng.moved(xp, dev)
        opt = getattr(self, "optimizer_", None)
        if opt is not None:  # the copy trains on with its own optimiser and schedule
            new.optimizer_ = type(opt)(**opt.hyperparameters())
            _replace_optimizer_state(opt, new.optimizer_)
        if getattr(self, "ensemble_optimizer_", None) is not None:  # an ensemble's: each member's state, copied
            new.ensemble_optimizer_ = E.moved_rule(self.ensemble_optimizer_, new.params, xp)
        if getattr(self, "schedule_", None) is not None:
            new.schedule_ = copy.deepcopy(self.schedule_)
        if getattr(self, "precision_", None) is not None:  # and its own loss scale, continued
            new.precision_ = self.precision_.copy()
        return new

    # ------------------------------------------------------------------ validation
    def _check_x(self, x: Any, *, check_finite: bool = True, what: str = "x", host: bool = False):
        """Validate an input batch and return ``(x, xp)`` in the model's dtype (a sparse
        matrix in compressed-row form). ``host``: ``x`` is a NumPy array that training
        stages to the model's device batch by batch; it is checked, and cast to the
        model's dtype, on the host (``xp`` is then the host namespace)."""
        sparse = is_sparse(x)
        if host:
            xp, dtype = host_namespace(), resolve_dtype(host_namespace(), self._dtype_name)
        else:
            xp = sparse_namespace(x) if sparse else get_namespace(x)
            device = sparse_device(x) if sparse else device_of(x)
            if self.params is None:
                self._build(xp, device)
            else:
                if sparse and xp is not self.xp:
                    msg = (f"{what} is a sparse matrix of {backend_name(xp)}'s kind (scipy.sparse goes with numpy, "
                           f"a sparse torch tensor with torch, cupyx.scipy.sparse with cupy), but the model's "
                           f"parameters are {backend_name(self.xp)} arrays; move the model with "
                           f"model.to({backend_name(xp)!r}), or give it a sparse matrix of its own backend's kind")
                    raise TypeError(msg)
                check_same_backend(self.xp, xp, what)
                check_same_device(self.device, device, what)
            xp, dtype = self.xp, self.dtype
        if sparse and not (self.layers and isinstance(self.layers[0], L.Dense)):
            first = type(self.layers[0]).__name__ if self.layers else "no layer"
            msg = (f"{what} is a sparse matrix, which only a first Dense layer can take; this model starts "
                   f"with {first}. Densify it (x.toarray()) or start the model with a Dense layer")
            raise TypeError(msg)
        if sparse and kernels_for(xp).name == "reference":
            msg = (f"{what} is a sparse matrix, whose products only {backend_name(xp)}'s own kernel set computes, "
                   "but the reference kernels are forced (ARRAYMLP_KERNELS=reference), and they take dense "
                   "arrays only; unset ARRAYMLP_KERNELS or densify the input")
            raise TypeError(msg)
        if x.ndim != 2:
            hint = ""
            if x.ndim == 1:
                hint = " (use x.reshape(-1, 1) for a single feature, x.reshape(1, -1) for one sample)"
            msg = f"{what} must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}{hint}"
            raise ValueError(msg)
        if x.shape[1] != self.n_features_in:
            msg = f"{what} has {x.shape[1]} features but the model expects {self.n_features_in}"
            raise ValueError(msg)
        if x.shape[0] == 0:
            msg = f"{what} is empty (0 samples); at least one sample is required"
            raise ValueError(msg)
        if not xp.isdtype(x.dtype, "real floating"):
            msg = (
                f"{what} has dtype {x.dtype}; a floating-point array is required "
                f"(convert it with xp.astype(x, xp.{self._dtype_name}))"
            )
            raise TypeError(msg)
        if sparse:  # compressed rows, batches are row slices; only the stored values are read
            x = as_csr(x, dtype)
            if check_finite and not kernels_for(xp).all_finite(sparse_values(x), xp):
                msg = f"{what} contains NaN or infinite values"
                raise ValueError(msg)
            return x, xp
        return _cast_checked(x, dtype, xp, what, check_finite=check_finite), xp

    def _check_target(self, y: Any, xp, what: str = "y", host: bool = False):
        """Validate targets (or weights) of ``xp``; ``host`` as for :meth:`_check_x`."""
        if host:
            dtype = resolve_dtype(xp, self._dtype_name)
        else:
            check_same_backend(self.xp, get_namespace(y), what)
            check_same_device(self.device, device_of(y), what)
            dtype = self.dtype
        if xp.isdtype(y.dtype, "real floating"):
            # once, here: the training step's loss does not read the values again
            y = _cast_checked(y, dtype, xp, what)
        return y

    # ------------------------------------------------------------------ passes
    def forward(self, x, *, training: bool = False, xp=None, upto: int | None = None, keep: bool = True,
                plan=None):
        """Run layers ``[0, upto)`` (all by default) on a validated batch.

        Parameters
        ----------
        x : array, shape (n, n_features)
        training : bool
            Training mode (dropout active).
        upto : int, optional
            Number of layers to run.
        keep : bool, default True
            Keep each layer's cache for :meth:`backward`. Inference passes False, so
            each intermediate activation is freed as soon as the next layer has read
            it: peak memory is two adjacent activations, not all of them.
        plan : arraymlp.fusion.Plan, optional
            Which layers run fused (:func:`arraymlp.fusion.plan_for`; looked up when
            omitted).

        Returns
        -------
        y : array, shape (n, n_out)
        caches : list, one entry per layer run (what its backward needs; None
            entries when ``keep`` is false)
        """
        xp = xp if xp is not None else self.xp
        plan = plan if plan is not None else plan_for(self, xp)
        stop = len(self.layers) if upto is None else upto
        layers, params, rng = self.layers, self.params, self.rng
        caches = []
        owned = False  # the input is the caller's: never overwritten
        for step in plan.forward:
            if step.start >= stop:
                break
            if step.kernel is not None and step.stop <= stop:  # a Dense layer and its ReLU, in one kernel
                p = params[step.start]
                y = step.kernel(x, p["W"], p.get("b"), xp)
                caches += (x, y) if keep else (None, None)  # the caches of the two layers one by one
                x = y
                del y
                owned = L.handover(layers[step.stop - 1]).fresh_output
                continue
            for i in range(step.start, min(step.stop, stop)):
                h = L.handover(layers[i])
                if owned and h.forward_inplace:
                    x, cache = layers[i].forward(params[i], x, training=training, rng=rng, xp=xp, inplace=True)
                else:
                    x, cache = layers[i].forward(params[i], x, training=training, rng=rng, xp=xp)
                owned = h.fresh_output
                caches.append(cache if keep else None)
                del cache
        return x, caches

    def backward(self, caches, dy, *, xp=None, inplace: bool = False):
        """Backpropagate ``dy`` through the layers that produced ``caches``, in reverse.

        Parameters
        ----------
        caches : list
            From :meth:`forward`, one entry per layer run.
        dy : array, shape (n, n_out)
            Gradient of the loss with respect to the output of the last layer run.
        inplace : bool
            Hand ``dy`` over: nothing else holds it or reads it again, so layers may
            overwrite it (the loss gradient inside :meth:`loss_and_grads`).

        Returns
        -------
        grads : list of dict of arrays
            Mirroring ``params``, key for key and shape for shape (empty dicts for
            layers without parameters or that were not run).
        """
        return self._backprop(caches, dy, xp=xp if xp is not None else self.xp, inplace=inplace)

    def _backprop(self, caches, dy, *, xp, inplace: bool, sgd: tuple[float, float] | None = None, plan=None):
        """The reversed loop of :meth:`backward`; with ``sgd=(lr, l2)`` and a ``plan``
        that fuses the step (``plan.sgd``) it also takes a plain SGD step, layer by
        layer, as the gradients come (see :meth:`_sgd_update`)."""
        n = len(caches)
        params = self.params
        grads: list[dict[str, Any]] = [{} for _ in params]
        ks = plan.kernels if plan is not None else kernels_for(xp)
        dense_sgd = plan.sgd_dense if sgd is not None else ()
        # The input gradient is needed only above the first layer that has parameters,
        # and the layers below it (input dropout, say) have no gradients to give.
        first = next((i for i, p in enumerate(params[:n]) if p), n)
        owned = inplace
        for i in range(n - 1, first - 1, -1):
            layer, p = self.layers[i], params[i]
            h = L.handover(layer)
            if i in dense_sgd:
                # the input gradient reads the old W: take it before the update
                dx = dy @ xp.matrix_transpose(p["W"]) if i > first else None
                p["W"], b = ks.dense_sgd_update(caches[i], dy, p["W"], p.get("b"), sgd[0], sgd[1], xp)
                if b is not None:
                    p["b"] = b
                g = {}
            elif owned and h.backward_inplace:
                dx, g = layer.backward(p, caches[i], dy, xp=xp, need_dx=i > first, inplace=True)
            else:
                dx, g = layer.backward(p, caches[i], dy, xp=xp, need_dx=i > first)
            if sgd is not None and g:
                l2 = sgd[1] if isinstance(layer, L.Dense) else 0.0
                for key, gk in g.items():  # a layer's own gradients: never overwritten
                    p[key] = ks.sgd_apply(p[key], gk, sgd[0], l2 if key == "W" else 0.0, xp, owned=False)
                g = {}
            owned = h.fresh_dx or (owned and dx is dy)
            dy = dx
            grads[i] = g
        return grads

    def __call__(self, x):
        """Inference: ``y = model(x)``, on ``x``'s namespace and device.

        Parameters
        ----------
        x : array, shape (n, n_features)

        Returns
        -------
        array, shape (n, n_outputs)
            (K, n, n_outputs) for an ensemble of K members. A lazy Dask array, computed
            block by block, when ``x`` is a Dask array.
        """
        if is_dask_array(x):
            from ._dask import map_model

            return map_model(self, x, "__call__")
        x, xp = self._check_x(x)
        return self.forward(x, training=False, xp=xp, keep=False)[0]

    # ------------------------------------------------------------------ training
    # fit, partial_fit and evaluate are the functions of arraymlp.training with the model
    # as first argument: their signatures and docstrings are those functions' own. An
    # ensemble's (``ensemble=K``) are those of arraymlp.ensemble.
    if TYPE_CHECKING:  # type checkers read the parameters from the functions themselves
        fit = _TrainingMethod(training.fit)
        partial_fit = _TrainingMethod(training.partial_fit)
        evaluate = _TrainingMethod(training.evaluate)
    else:
        fit = _TrainingMethod("fit")
        partial_fit = _TrainingMethod("partial_fit")
        evaluate = _TrainingMethod("evaluate")

    def predict(self, x, *, reduce: str | None = "mean"):
        """Predictions in the form of the ``y`` of the last fit: class indices (n,) for
        one class per sample; 0/1 labels in ``y``'s shape ((n,) stays (n,)) and dtype
        family for ``binary_cross_entropy``; outputs for regressors ((n,) when ``y`` was
        (n,)). See :func:`arraymlp.training.predict` (lazy, block by block, for a Dask
        array).

        For an ensemble, the prediction of the members' averaged probabilities (outputs,
        for a regressor); ``reduce=None`` gives each member's, with a leading axis of K
        (see :func:`arraymlp.ensemble.predict`). A plain model takes only ``"mean"``."""
        if is_dask_array(x):
            from ._dask import map_model

            E._check_reduce(reduce)
            return map_model(self, x, "predict", reduce=reduce)
        if self.ensemble is not None:
            return E.predict(self, x, reduce=reduce)
        E._check_reduce(reduce)
        from .training import predict

        return predict(self, x)

    def predict_proba(self, x, *, reduce: str | None = "mean"):
        """Class probabilities: (n, n_classes) for one class per sample, (n, n_outputs)
        for 0/1 outputs ((n, 1) for a binary classifier: the probability of 1); see
        :func:`arraymlp.training.predict_proba` (lazy, block by block, for a Dask array).
        For an ensemble, the members' averaged probabilities, or each member's
        (K, n, n_classes) with ``reduce=None``."""
        if is_dask_array(x):
            from ._dask import map_model

            E._check_reduce(reduce)
            return map_model(self, x, "predict_proba", reduce=reduce)
        if self.ensemble is not None:
            return E.predict_proba(self, x, reduce=reduce)
        E._check_reduce(reduce)
        from .training import predict_proba

        return predict_proba(self, x)

    def _fused(self, loss) -> bool:
        fa = loss.fused_activation
        return fa is not None and fa != "identity" and self.output_activation == fa

    def _loss_and_grads(self, x, y, loss, *, xp, sample_weight=None, l2=0.0, training=True, check=False, plan=None,
                        on_outputs=None, hits=None):
        """Unchecked core of :meth:`loss_and_grads` (inputs already validated).

        ``check=False`` also spares the table's losses their reading of the targets'
        values (label range, finiteness), which the caller validated up front (as
        ``fit`` does for its whole ``y``); custom losses always check. ``on_outputs``,
        when given, is called with the last layer's output (the logits when the output
        activation is fused) before backpropagation starts (``fit``'s metrics); ``hits``
        goes to the table's cross-entropy, which adds the batch's right answers to it
        (``fit``'s accuracy counted by the loss's own pass: see
        :func:`arraymlp.losses.cross_entropy`).
        """
        value, dout, caches, owned = self._loss_and_dout(x, y, loss, xp=xp, sample_weight=sample_weight, l2=l2,
                                                         training=training, check=check, plan=plan,
                                                         on_outputs=on_outputs, hits=hits)
        grads = self._backprop(caches, dout, xp=xp, inplace=owned, plan=plan)
        if l2:
            for layer, p, g in zip(self.layers, self.params, grads):
                if isinstance(layer, L.Dense):
                    # dW = x.T @ dy is a fresh array of the model's: add in place where allowed
                    if is_writeable(g["W"]):
                        g["W"] += l2 * p["W"]
                    else:
                        g["W"] = g["W"] + l2 * p["W"]
        return value, grads

    def _loss_and_dout(self, x, y, loss, *, xp, sample_weight=None, l2=0.0, training=True, check=False, plan=None,
                       on_outputs=None, hits=None):
        """Forward and loss of a batch: ``(value, d_out, caches, owned)``, where ``d_out``
        is the loss gradient at the last layer run and ``owned`` says whether the layers
        may overwrite it (the table's losses return a new array). ``value`` includes the
        L2 penalty. ``on_outputs(out)`` sees the last layer's output, as for
        :meth:`_loss_and_grads`."""
        fused = self._fused(loss)
        out, caches = self.forward(x, training=training, xp=xp, upto=len(self.layers) - 1 if fused else None,
                                   plan=plan)
        builtin = LOSSES.get(loss.name) is loss
        if hits is not None:  # the table's cross-entropy, which counts the accuracy's hits as it goes
            value, dout = loss.fn(out, y, xp=xp, sample_weight=sample_weight, check=check, hits=hits)
        elif builtin and not check:
            value, dout = loss.fn(out, y, xp=xp, sample_weight=sample_weight, check=False)
        else:
            value, dout = loss.fn(out, y, xp=xp, sample_weight=sample_weight)
        if on_outputs is not None:
            on_outputs(out)
        if l2:
            value = value + self._l2_penalty(l2, xp)
        return value, dout, caches, builtin

    def _params_distinct(self) -> bool:
        """Whether no parameter array serves two places (tied weights)."""
        return _params_distinct(self.params)

    def _sgd_update(self, caches, dout, *, lr: float, l2: float = 0.0, xp, owned: bool = False, plan) -> None:
        """Backpropagate ``dout`` and take one plain SGD step on the way down.

        The same update as ``SGD(lr).step(params, grads)`` after :meth:`loss_and_grads`
        with ``l2``, but the Dense layers of ``plan.sgd_dense`` take their weight
        gradient straight into their weights (``dense_sgd_update`` of the kernel set)
        instead of into a gradient array first. ``caches``, ``dout`` and ``owned`` come
        from :meth:`_loss_and_dout`; ``plan`` is :func:`arraymlp.fusion.plan_for` with
        the optimiser, and must fuse the step (``plan.sgd``).
        """
        self._backprop(caches, dout, xp=xp, inplace=owned, sgd=(lr, l2), plan=plan)

    def _l2_penalty(self, l2, xp):
        """``l2/2 * sum(W**2)`` over the weight matrices, by row-wise dot products (no
        squared copy of each matrix)."""
        total = 0.0
        for layer, p in zip(self.layers, self.params):
            if isinstance(layer, L.Dense):
                W = p["W"]
                total = total + xp.sum(xp.vecdot(W, W))
        return 0.5 * l2 * total

    def _own_loss(self, loss, y, *, last_fit: bool = True):
        """``loss`` when given; else the loss of the last fit (``loss_``, when
        ``last_fit``); else the one ``fit`` infers from the output activation and ``y``
        (:func:`arraymlp.training.infer_loss`, which raises when that is ambiguous)."""
        if loss is not None:
            return loss
        own = getattr(self, "loss_", None) if last_fit else None
        if own is not None:
            return own
        from .training import infer_loss

        return infer_loss(self, y)[0]

    def loss_and_grads(self, x, y, *, loss: str | None = None, sample_weight=None, l2: float = 0.0,
                       training: bool = True):
        """Loss of a batch and its gradient with respect to every parameter.

        When the model ends with the activation a loss fuses with (softmax for
        ``"cross_entropy"``, sigmoid for ``"binary_cross_entropy"``), the loss is
        computed from the logits in its stable combined form.

        Parameters
        ----------
        x : array, shape (n, n_features)
        y : array
            Targets: shape (n, n_outputs) (or (n,) for a single output), or integer
            labels of shape (n,) for ``"cross_entropy"``.
        loss : str or Loss, optional
            A key of :data:`arraymlp.losses.LOSSES`. Default: the model's own loss,
            that of its last fit (``loss_``), else the one ``fit`` would infer
            (:func:`arraymlp.training.infer_loss`: cross-entropy for a softmax output,
            and so on), never a squared error the model was not trained on.
        sample_weight : array of shape (n,), optional
        l2 : float
            L2 penalty ``l2/2 * sum(W**2)`` over the weight matrices (not the biases),
            adding ``l2 * W`` to each weight gradient.
        training : bool
            Whether dropout is active.

        Returns
        -------
        loss : 0-d array
        grads : list of dict of arrays, mirroring ``params``

        For an ensemble, the sum of the members' losses and so each member's own
        gradient (see :func:`arraymlp.ensemble.loss_and_grads`).
        """
        loss = self._own_loss(loss, y)
        if self.ensemble is not None:
            return E.loss_and_grads(self, x, y, loss=loss, sample_weight=sample_weight, l2=l2, training=training)
        loss = get_loss(loss)
        x, xp = self._check_x(x)
        y = self._check_target(y, xp)
        if sample_weight is not None:
            sample_weight = self._check_target(sample_weight, xp, "sample_weight")
        return self._loss_and_grads(x, y, loss, xp=xp, sample_weight=sample_weight, l2=l2, training=training,
                                    check=True)

    def loss(self, x, y, *, loss: str | None = None, sample_weight=None, l2: float = 0.0, training: bool = False):
        """Loss of a batch only (no gradients), a 0-d array; same arguments as
        :meth:`loss_and_grads`: ``x`` of shape (n, n_features), ``y`` of shape
        (n, n_outputs) or labels (n,), ``sample_weight`` of shape (n,); ``loss``
        defaults to the model's own (that of its last fit, else the one ``fit`` would
        infer). For an ensemble the sum of the members' losses (see
        :func:`arraymlp.ensemble.loss`).

        Examples
        --------
        >>> import numpy as np, arraymlp as am
        >>> x, y = np.eye(3), np.array([0, 1, 2])
        >>> model = am.MLP([3, 3], output_activation="softmax", backend="numpy", dtype="float64", seed=0)
        >>> p = model.predict_proba(x)
        >>> bool(np.isclose(model.loss(x, y), -np.mean(np.log(p[[0, 1, 2], y]))))  # cross-entropy, inferred
        True
        """
        loss = self._own_loss(loss, y)
        if self.ensemble is not None:
            return E.loss(self, x, y, loss=loss, sample_weight=sample_weight, l2=l2, training=training)
        lossfn = get_loss(loss)
        x, xp = self._check_x(x)
        y = self._check_target(y, xp)
        if sample_weight is not None:
            sample_weight = self._check_target(sample_weight, xp, "sample_weight")
        fused = self._fused(lossfn)
        out, _ = self.forward(x, training=training, xp=xp, upto=len(self.layers) - 1 if fused else None, keep=False)
        value, _ = lossfn.fn(out, y, xp=xp, sample_weight=sample_weight)
        if l2:
            value = value + self._l2_penalty(l2, xp)
        return value

    # ------------------------------------------------------------------ display
    def config(self) -> dict[str, Any]:
        """Architecture and settings as plain data (for saving)."""
        cfg = {"layers": [layer.config() for layer in self.layers], "dtype": self._dtype_name, "seed": self.seed}
        if self.ensemble is not None:
            cfg["ensemble"] = self.ensemble
        return cfg

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        width = max(len(repr(layer)) for layer in self.layers)
        for i, layer in enumerate(self.layers):
            n = 0
            if isinstance(layer, L.Dense):
                n = layer.n_in * layer.n_out + (layer.n_out if layer.bias else 0)
            elif isinstance(layer, L.LayerNorm):
                n = 2 * layer.n_in
            count = f"{n:>12,d} params" if n else ""
            lines.append(f"  ({i}): {layer!r:<{width}} {count}".rstrip())
        if self.xp is None:
            where = "not built (follows its first input)"
        else:
            where = f"backend={self.backend}, device={self.device}"
        if self.ensemble is not None:
            where += f", ensemble of {self.ensemble} members"
        lines.append(f") total {self.n_params:,d} params, dtype={self._dtype_name}, {where}")
        return "\n".join(lines)


class MLP(Sequential):
    """A multilayer perceptron from layer sizes.

    ``MLP([64, 128, 10])`` is ``Dense(64, 128), ReLU(), Dense(128, 10)``; each hidden
    block is ``Dense -> [LayerNorm] -> activation -> [Dropout]``.

    Parameters
    ----------
    sizes : sequence of int
        ``[n_features, hidden..., n_outputs]``, at least two entries.
    activation : str
        Hidden activation, a key of :data:`arraymlp.functional.ACTIVATIONS`.
    output_activation : str or None
        Final activation. ``"softmax"`` with ``loss="cross_entropy"`` (or ``"sigmoid"``
        with ``"binary_cross_entropy"``) is fused with the loss for stability, and
        ``model(x)`` then returns probabilities.
    dropout : float
        Dropout probability after each hidden activation (0 disables).
    layer_norm : bool
        Whether to add layer normalisation before each hidden activation.
    init : str or None
        Weight initialiser of every Dense layer. Default: by the activation that
        follows the layer, He for ReLU-like ones and Glorot otherwise (Glorot for the
        output layer without an output activation).
    dtype, backend, device, seed, ensemble
        As for :class:`Sequential`; ``ensemble=K`` builds K members at once.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([4, 8, 3], output_activation="softmax", backend="numpy", seed=0)
    >>> model.layers
    [Dense(4 -> 8), Activation('relu'), Dense(8 -> 3), Activation('softmax')]
    >>> model.n_params
    67
    >>> proba = model(np.ones((2, 4), dtype=np.float32))
    >>> proba.shape, np.allclose(proba.sum(axis=1), 1.0)
    ((2, 3), True)
    """

    _file_class = "MLP"

    def __init__(self, sizes: Sequence[int], *, activation: str = "relu", output_activation: str | None = None,
                 dropout: float = 0.0, layer_norm: bool = False, init: str | None = None,
                 dtype: str = "float32", backend: Any = None, device: Any = None, seed: int | None = None,
                 ensemble: int | None = None):
        sizes = list(sizes)
        if len(sizes) < 2:
            msg = f"sizes needs at least [n_features, n_outputs], got {sizes!r}"
            raise ValueError(msg)
        bad = [s for s in sizes if not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 1]
        if bad:
            msg = f"sizes must be positive ints, got {sizes!r}"
            raise ValueError(msg)
        sizes = [int(s) for s in sizes]  # NumPy integers too
        L.Activation(activation)  # validate names early
        out_init = init or (default_for(output_activation) if output_activation not in (None, "identity")
                            else "glorot_uniform")
        init = init or default_for(activation)
        layers: list[L.Layer] = []
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            layers.append(L.Dense(n_in, n_out, init=init))
            if layer_norm:
                layers.append(L.LayerNorm(n_out))
            layers.append(L.Activation(activation))
            if dropout:
                layers.append(L.Dropout(dropout))
        layers.append(L.Dense(sizes[-2], sizes[-1], init=out_init))
        if output_activation not in (None, "identity"):
            layers.append(L.Activation(output_activation))
        self.sizes = sizes
        super().__init__(layers, dtype=dtype, backend=backend, device=device, seed=seed, ensemble=ensemble)
