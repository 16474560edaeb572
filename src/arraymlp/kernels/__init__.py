"""Kernel sets: the compute of the library, one set per backend.

:mod:`.reference` holds every kernel written only against the Array API standard: it
is the definition of the maths. A backend's module (:mod:`.numpy`, :mod:`.torch`,
:mod:`.cupy`) holds ``OVERRIDES``, faster functions with the same signature and values
as the reference kernels they replace, each checking that it applies and otherwise
calling the kernel it replaces. :func:`kernels_for` returns the set for a namespace,
built once and remembered.

A composite kernel names the kernels it is built from as keyword-only parameters
(``dense_backward(..., *, bias_grad=bias_grad)``); when a set is built, a copy of the
composite gets the set's own kernels as those defaults, so overriding a primitive speeds up every composite built on
it without a copy of the composite.

Forcing the reference set
-------------------------
Set the environment variable ``ARRAYMLP_KERNELS=reference`` (read at import) or run
code inside ``with reference_kernels():`` and every namespace gets the reference set:
no backend-specific path runs. The tests run the whole suite both ways.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import types
from typing import Any, Callable, Iterator

from array_api_compat import is_cupy_namespace, is_numpy_namespace, is_torch_namespace

from . import reference

__all__ = ["KERNELS", "KernelSet", "kernels_for", "reference_kernels", "reference_forced"]

#: The kernels every set provides (the reference defines each).
KERNELS = (
    "adagrad_update",
    "adam_update",
    "add_argmax_hits",
    "add_bias",
    "all_finite",
    "axpy",
    "batch_sum",
    "bias_grad",
    "cross_entropy_labels",
    "cross_entropy_labels_mean",
    "cross_entropy_labels_mean_hits",
    "dense_backward",
    "dense_forward",
    "dense_relu_forward",
    "dense_sgd_update",
    "identity_forward_inplace",
    "member_adam_update",
    "pick_labels",
    "relu_backward_inplace",
    "relu_forward_inplace",
    "rmsprop_update",
    "row_max",
    "row_sum",
    "sgd_apply",
    "sgd_momentum_update",
    "sigmoid_backward_inplace",
    "softmax",
    "subtract_onehot",
    "tanh_backward_inplace",
    "tanh_forward_inplace",
)


def _rebound(fn: Callable, deps: dict[str, Callable]) -> Callable:
    """A copy of function ``fn`` whose keyword-only defaults ``deps`` are replaced: the
    same code, called as fast as ``fn`` (a :func:`functools.partial` would merge its
    keywords on every call of the hot path)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **deps}
    functools.update_wrapper(new, fn, updated=())
    del new.__wrapped__  # the signature is the copy's own, with its new defaults
    return new


def _bind(name: str, fns: dict[str, Callable], done: dict[str, Callable]) -> Callable:
    """``fns[name]`` with its keyword-only kernel parameters bound to this set's kernels
    (themselves bound first)."""
    if name in done:
        return done[name]
    fn = fns[name]
    deps = [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name in fns and p.name != name]
    done[name] = _rebound(fn, {d: _bind(d, fns, done) for d in deps}) if deps else fn
    return done[name]


class KernelSet:
    """The kernels for one backend: every name of :data:`KERNELS` as an attribute.

    Parameters
    ----------
    name : str
        ``"reference"``, ``"numpy"``, ``"torch"`` or ``"cupy"``.
    overrides : dict of str to callable
        Functions replacing reference kernels of the same name.

    Attributes
    ----------
    overrides : frozenset of str
        The names this set overrides (empty for the reference set).
    activations : dict of str to :class:`reference.Activation`
        The activation table with this set's functions in its rows.
    """

    def __init__(self, name: str, overrides: dict[str, Callable] | None = None):
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(KERNELS))
        if unknown:
            msg = f"kernel set {name!r} overrides unknown kernels {unknown}; known kernels: {', '.join(KERNELS)}"
            raise ValueError(msg)
        fns = {k: getattr(reference, k) for k in KERNELS}
        fns.update(overrides)
        done: dict[str, Callable] = {}
        for k in KERNELS:
            setattr(self, k, _bind(k, fns, done))
        self.name = name
        self.overrides = frozenset(overrides)
        self.activations = {row.name: self._row(row) for row in reference.ACTIVATIONS.values()}
        # by the reference row's identity: one lookup per activation call, and a custom
        # row of the same name is never swapped for the table's
        self._rows = {id(row): self.activations[name] for name, row in reference.ACTIVATIONS.items()}

    def _row(self, row: reference.Activation) -> reference.Activation:
        changes: dict[str, Any] = {}
        if row.name in KERNELS:  # a forward this set may override (softmax)
            changes["forward"] = getattr(self, row.name)
        for field in ("forward_inplace", "backward_inplace"):
            kernel = f"{row.name}_{field}"
            if getattr(row, field) is not None and kernel in KERNELS:
                changes[field] = getattr(self, kernel)
        return dataclasses.replace(row, **changes) if changes else row

    def activation(self, act: reference.Activation) -> reference.Activation:
        """This set's row for a row of the reference table; any other row as it is."""
        return self._rows.get(id(act), act)

    def __repr__(self) -> str:
        return f"KernelSet({self.name!r}, overrides={sorted(self.overrides)})"


REFERENCE = KernelSet("reference")
_SETS: dict[Any, KernelSet] = {}
_forced = os.environ.get("ARRAYMLP_KERNELS", "").strip().lower() == "reference"


def _build(xp) -> KernelSet:
    if is_numpy_namespace(xp):
        from . import numpy as module
    elif is_torch_namespace(xp):
        from . import torch as module
    elif is_cupy_namespace(xp):
        from . import cupy as module
    else:
        return REFERENCE
    name = module.__name__.rsplit(".", 1)[-1]
    return KernelSet(name, module.OVERRIDES)


def kernels_for(xp) -> KernelSet:
    """The kernel set for namespace ``xp``: NumPy's, torch's or CuPy's overrides over the
    reference, the reference set for any other namespace, or for every namespace while
    the reference is forced. Built once per namespace; a dictionary lookup after that."""
    if _forced:
        return REFERENCE
    try:
        return _SETS[xp]
    except KeyError:
        ks = _SETS[xp] = _build(xp)
        return ks


def reference_forced() -> bool:
    """Whether the reference set is forced (environment variable or context manager)."""
    return _forced


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Run the block with the reference set forced on every namespace (``enabled=False``:
    with each backend's own set, whatever the environment says).

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.kernels import kernels_for, reference_kernels
    >>> kernels_for(np).name
    'numpy'
    >>> with reference_kernels():
    ...     kernels_for(np).name
    'reference'
    """
    global _forced
    before = _forced
    _forced = bool(enabled)
    try:
        yield
    finally:
        _forced = before
