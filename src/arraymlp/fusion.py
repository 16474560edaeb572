"""The fusion plan: which layers of a model run fused, decided once, outside its loop.

A model's forward pass is a loop over its layers and its backward pass the same loop
reversed. Two fusions make a training step cheaper without changing its values:

- a :class:`~arraymlp.Dense` layer and the ReLU after it run as one kernel
  (``dense_relu_forward``), where the namespace's kernel set has a faster one than the
  two passes; both layers' caches are kept as if they had run one by one;
- with plain SGD (no momentum, weight decay or clipping; see ``SGD._fusable``), each
  Dense layer's weight gradient goes straight into its weights
  (``dense_sgd_update``) instead of into a gradient array, and every other layer's
  gradients are applied as they come.

:func:`plan_for` decides both once per model, namespace and optimiser state, and keeps
the plan until one of them changes: the layer list, a layer's class, a ``forward`` or
``backward`` set on a layer instance (a hook), the kernel set, whether the optimiser is
fusable, or a parameter array shared by two layers. Checking that is cheap enough for
every step: :class:`arraymlp.Layer` counts the assignments (and deletions) of ``forward``,
``backward`` and ``__class__`` on its instances, so a hook shows without a look at each
layer; the layers' identities and classes are compared in C. (A hook written straight
into an instance's ``__dict__`` bypasses the count; set hooks as attributes.) A layer whose ``forward`` or
``backward`` was replaced on the instance, or whose class replaced Dense's or
Activation's, is never fused: a user's hook always runs.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import Any, Callable

from . import layers as L
from .kernels import KernelSet, kernels_for, reference

__all__ = ["ForwardStep", "Plan", "plan_for"]

_DENSE = (L.Dense.forward, L.Dense.backward)


def _hooked(layer) -> bool:
    """Whether ``forward`` or ``backward`` was set on the layer instance itself."""
    d = getattr(layer, "__dict__", ())
    return "forward" in d or "backward" in d


def _plain_dense(layer) -> bool:
    return (type(layer).forward, type(layer).backward) == _DENSE and not _hooked(layer)


def _plain_relu(layer) -> bool:
    return (type(layer).forward is L.Activation.forward and not _hooked(layer)
            and getattr(layer, "_act", None) is reference.ACTIVATIONS["relu"])


@dataclasses.dataclass(frozen=True)
class ForwardStep:
    """Layers ``[start, stop)`` run as one step: one layer by its own ``forward``
    (``kernel`` None), or a Dense layer and its ReLU by ``kernel(x, W, b, xp)``."""

    start: int
    stop: int
    kernel: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a model runs its layers.

    Attributes
    ----------
    forward : tuple of ForwardStep
        Covering the layers in order.
    sgd_dense : frozenset of int
        Layers whose plain SGD step is taken from the input and output gradient
        (``kernels.dense_sgd_update``); empty when the step is not fused.
    sgd : bool
        Whether a training step may apply plain SGD during backpropagation.
    kernels : KernelSet
    """

    forward: tuple[ForwardStep, ...]
    sgd_dense: frozenset
    sgd: bool
    kernels: KernelSet


def _forward_steps(layers, ks: KernelSet) -> tuple[ForwardStep, ...]:
    steps, i, n = [], 0, len(layers)
    fuse = "dense_relu_forward" in ks.overrides
    while i < n:
        if fuse and i + 1 < n and _plain_dense(layers[i]) and _plain_relu(layers[i + 1]):
            steps.append(ForwardStep(i, i + 2, ks.dense_relu_forward))
            i += 2
        else:
            steps.append(ForwardStep(i, i + 1))
            i += 1
    return tuple(steps)


def _params_distinct(params) -> bool:
    """Whether no parameter array serves two places (tied weights): the fused SGD step
    updates each layer's weights before the layer below reads them."""
    ids = [id(a) for p in params for a in p.values()]
    return len(set(ids)) == len(ids)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A plan and what it was decided from."""

    layers: tuple
    classes: tuple
    hooked: tuple
    watched: bool  # every layer an arraymlp.Layer, whose hooks bump L.hook_changes()
    hook_changes: int
    kernels: KernelSet
    n_params: int
    plan: Plan

    def still(self, layers, ks: KernelSet, n_params: int) -> bool:
        """Whether the plan still holds: the same kernel set, parameter count and layer
        objects, and no ``forward``, ``backward`` or ``__class__`` set on or deleted from
        a layer instance since (the count of such assignments, for arraymlp layers; a
        look at each instance's class and attributes for others). Comparisons made in
        C, no Python loop over the layers."""
        # an arraymlp layer's class changes through Layer.__setattr__, counted with the hooks
        return (self.kernels is ks and self.n_params == n_params and self.hook_changes == _HOOK_CHANGES[0]
                and len(layers) == len(self.layers) and all(map(_is, layers, self.layers))
                and (self.watched or (tuple(map(type, layers)) == self.classes
                                      and tuple(map(_hooked, layers)) == self.hooked)))


_is = operator.is_
_HOOK_CHANGES = L._HOOK_CHANGES  # the count behind L.hook_changes(), read without a call


#: id(model) -> {(xp, sgd): _Entry}: the plans a model's inference and training steps
#: use, kept here rather than on the model so that its copies, pickles and files never
#: carry them; a model's entry goes when the model does (a dictionary keyed by the id
#: is looked up faster than a WeakKeyDictionary, which makes a weak reference per call).
_PLANS: dict[int, dict] = {}


def _plans_of(model) -> dict:
    plans = _PLANS.get(id(model))
    if plans is None:
        plans = _PLANS[id(model)] = {}
        weakref.finalize(model, _PLANS.pop, id(model), None)
    return plans


def plan_for(model, xp, optimizer: Any = None) -> Plan:
    """The plan for ``model`` on namespace ``xp``, with ``optimizer`` when a training
    step may fuse its update (None: forward and plain backward only). Kept until what it
    was decided from changes (see the module notes); checking that costs a few
    comparisons made in C (:meth:`_Entry.still`), no Python loop over the layers."""
    params = model.params
    sgd = optimizer is not None and optimizer._fusable() and _params_distinct(params)
    ks = kernels_for(xp)
    layers = model.layers
    plans = _PLANS.get(id(model)) or _plans_of(model)
    entry = plans.get((xp, sgd))
    if entry is not None and entry.still(layers, ks, len(params)):
        return entry.plan
    plan = Plan(
        forward=_forward_steps(layers, ks),
        sgd_dense=frozenset(i for i, layer in enumerate(layers) if sgd and _plain_dense(layer)),
        sgd=sgd,
        kernels=ks,
    )
    plans[(xp, sgd)] = _Entry(tuple(layers), tuple(map(type, layers)), tuple(map(_hooked, layers)),
                              all(isinstance(layer, L.Layer) for layer in layers), L.hook_changes(), ks,
                              len(params), plan)
    return plan
