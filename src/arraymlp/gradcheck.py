"""Finite-difference gradient checks with a per-parameter report.

``gradcheck`` compares the analytic gradients a model (or a single layer, or a loss)
computes with central differences ``(L(p + eps) - L(p - eps)) / (2 eps)``, evaluated in
float64 (on a float64 copy when the model is float32), and reports for every layer and
parameter the largest absolute and relative error, where it occurred, and whether it
passed. A gradient of the wrong shape (a bias gradient of shape (n, k) instead of (k,),
a transposed weight gradient) is reported as such rather than broadcast away.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy

from ._backend import Generator, backend_name, device_of, get_namespace, has_float64, to_numpy
from .layers import Layer
from .losses import Loss, get_loss

__all__ = ["GradcheckError", "GradcheckReport", "GradcheckRow", "gradcheck"]


class GradcheckError(AssertionError):
    """Raised by ``gradcheck(..., raise_on_failure=True)``; the message holds the report.

    Examples
    --------
    A loss whose gradient is twice the true one:

    >>> import numpy as np, arraymlp as am
    >>> def doubled(outputs, targets, **kwargs):
    ...     value, d_outputs = am.get_loss("mse")(outputs, targets, **kwargs)
    ...     return value, 2 * d_outputs
    >>> wrong = am.Loss("doubled", doubled, "identity", "same_shape")
    >>> am.gradcheck(wrong, np.zeros((2, 1)), np.ones((2, 1)), raise_on_failure=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    arraymlp.gradcheck.GradcheckError: gradient check failed:
    ...
    0 doubled ... NO  analytic -2 vs numeric -1 at (0, 0) (a factor 2 off)
    1 of 1 gradients wrong (central differences, eps=1e-06, atol=1e-06, rtol=0.0001)
    """


@dataclasses.dataclass
class GradcheckRow:
    """The check of one parameter.

    Attributes
    ----------
    layer : int
        Index of the layer in the model (0 for a single layer or loss).
    layer_repr : str
    param : str
        Parameter name (``"W"``, ``"b"``, ...; ``"x"`` for an input, ``"outputs"`` for a loss).
    shape : tuple
        Shape of the parameter.
    grad_shape : tuple or None
        Shape of the analytic gradient (``None`` if it was missing).
    max_abs_err, max_rel_err : float
        Largest ``|analytic - numeric|`` and that divided by ``max(|analytic|, |numeric|)``.
    worst_index : tuple
        Index of the entry with the largest violation.
    analytic, numeric : float
        The two values at ``worst_index``.
    n_checked : int
        Entries compared (all, or a random subset of ``max_checks``).
    passed : bool
    note : str
        Why it failed, in words.
    """

    layer: int
    layer_repr: str
    param: str
    shape: tuple
    grad_shape: tuple | None
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    worst_index: tuple = ()
    analytic: float = 0.0
    numeric: float = 0.0
    n_checked: int = 0
    passed: bool = True
    note: str = ""


@dataclasses.dataclass
class GradcheckReport:
    """All rows of a check; ``str(report)`` is a table, ``report.passed`` the verdict.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([3, 4, 1], activation="tanh", dtype="float64", backend="numpy", seed=0)
    >>> x = np.linspace(-1, 1, 15).reshape(5, 3); y = np.ones((5, 1))
    >>> report = am.gradcheck(model, x, y)
    >>> report.passed, bool(report), report.failures
    (True, True, [])
    >>> [(row.layer, row.param, row.shape) for row in report.rows]
    [(0, 'W', (3, 4)), (0, 'b', (4,)), (2, 'W', (4, 1)), (2, 'b', (1,))]
    >>> report.row(2, "W").n_checked
    4
    >>> print(str(report).splitlines()[-1])
    all gradients match (central differences, eps=1e-06, atol=1e-06, rtol=0.0001)
    """

    rows: list[GradcheckRow]
    eps: float
    atol: float
    rtol: float
    #: The namespace whose arrays were checked on a float64 NumPy copy on the host,
    #: because it has no float64 (JAX in its default 32-bit mode); ``None`` otherwise.
    host_copy: str | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[GradcheckRow]:
        return [r for r in self.rows if not r.passed]

    def __bool__(self) -> bool:
        return self.passed

    def row(self, layer: int, param: str) -> GradcheckRow:
        """The row of ``param`` in layer ``layer``."""
        for r in self.rows:
            if r.layer == layer and r.param == param:
                return r
        msg = f"no row for layer {layer}, parameter {param!r}"
        raise KeyError(msg)

    def __str__(self) -> str:
        head = (
            f"{'layer':<22} {'param':<7} {'shape':<12} {'max abs err':>11} {'max rel err':>11} "
            f"{'worst at':<12} {'ok':<4}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            name = f"{r.layer} {r.layer_repr}"[:22]
            shape = "x".join(map(str, r.shape)) or "()"
            worst = ",".join(map(str, r.worst_index))
            lines.append(
                f"{name:<22} {r.param:<7} {shape:<12} {r.max_abs_err:>11.2e} {r.max_rel_err:>11.2e} "
                f"{worst:<12} {'yes' if r.passed else 'NO'}"
                + (f"  {r.note}" if r.note else "")
            )
        verdict = "all gradients match" if self.passed else f"{len(self.failures)} of {len(self.rows)} gradients wrong"
        lines.append(f"{verdict} (central differences, eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g})")
        if self.host_copy is not None:
            lines.append(f"checked on a float64 NumPy copy on the host: {self.host_copy} has no float64 here")
        return "\n".join(lines)


def _float64_namespace(xp, device):
    """Whether float64 works on this namespace/device: not on every GPU or strict
    device, nor on JAX in its default 32-bit mode, whose float64 arrays are float32
    (differences taken there would be float32 noise, failing correct gradients)."""
    return has_float64(xp, device)


# Rounding of each float64 loss value, relative to its size, allowed for in the
# difference quotient: a few hundred operations' worth of unit roundoff.
_LOSS_NOISE = 64 * float(numpy.finfo(numpy.float64).eps)


def _quotient(vals, eps):
    """``(L(p + eps) - L(p - eps)) / (2 eps)`` and the part of it rounding can explain:
    ``L``'s own rounding error, about ``|L|`` times the unit roundoff, divided by the
    step; for a large loss it exceeds any fixed ``atol``."""
    return (vals[0] - vals[1]) / (2 * eps), _LOSS_NOISE * max(abs(vals[0]), abs(vals[1])) / eps


def _compare(row: GradcheckRow, analytic, numeric_fn, param_host: numpy.ndarray, *, eps, atol, rtol,
             max_checks, host_rng, host_copy=None) -> GradcheckRow:
    """Fill ``row`` by comparing ``analytic`` with central differences of ``numeric_fn``
    (which returns the quotient and its rounding noise). A non-finite value on either
    side fails."""
    if analytic is None:
        row.passed, row.note = False, "no gradient returned for this parameter"
        return row
    a = numpy.asarray(to_numpy(analytic), dtype=numpy.float64)
    row.grad_shape = tuple(a.shape)
    if a.shape != param_host.shape:
        row.passed = False
        row.note = f"gradient has shape {a.shape} but the parameter has shape {param_host.shape}"
        if a.size == param_host.size and a.ndim == 2 and a.T.shape == param_host.shape:
            row.note += " (transposed?)"
        elif a.ndim == param_host.ndim + 1:
            row.note += " (not summed over the batch?)"
        return row
    size = param_host.size
    flat = numpy.arange(size) if size <= max_checks else host_rng.choice(size, max_checks, replace=False)
    worst = -math.inf
    for f in flat:
        idx = numpy.unravel_index(int(f), param_host.shape)
        num, noise = numeric_fn(idx)
        an = float(a[idx])
        if math.isfinite(an) and math.isfinite(num):
            err = abs(an - num)
            violation = err - (atol + noise + rtol * abs(num))
            rel = err / max(abs(an), abs(num), 1e-300)
        else:  # NaN or infinity: never a match (NaN would compare as no violation at all)
            err = violation = rel = math.inf
        row.max_abs_err = max(row.max_abs_err, err)
        row.max_rel_err = max(row.max_rel_err, rel)
        if violation > worst:
            worst = violation
            row.worst_index, row.analytic, row.numeric = tuple(int(i) for i in idx), an, num
    row.n_checked = len(flat)
    row.passed = worst <= 0.0
    if not row.passed:
        ratio = row.analytic / row.numeric if row.numeric else float("inf")
        row.note = f"analytic {row.analytic:.6g} vs numeric {row.numeric:.6g} at {row.worst_index}"
        if (
            numpy.isfinite(ratio)
            and abs(ratio) > 1e-12
            and abs(ratio - round(ratio)) < 1e-3 * abs(ratio)
            and abs(ratio) != 1
        ):
            row.note += f" (a factor {ratio:g} off)"
    return row


def _perturbed(arr, xp, device, host: numpy.ndarray, idx, delta):
    h = host.copy()
    h[idx] += delta
    return xp.asarray(h, dtype=xp.float64, device=device)


def gradcheck(obj: Any, x: Any = None, y: Any = None, *, loss: str | Loss = "mse", sample_weight: Any = None,
              l2: float = 0.0, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              max_checks: int = 200, seed: int = 0, raise_on_failure: bool = False) -> GradcheckReport:
    """Check analytic gradients against central finite differences, in float64.

    The check runs on a float64 copy, on the model's backend and device where they have
    float64, otherwise (JAX in its default 32-bit mode, devices without float64) on a
    NumPy copy on the host; the report's ``host_copy`` then names the backend.

    Parameters
    ----------
    obj : Sequential, Layer, or loss name / Loss
        What to check. A model: its :meth:`~arraymlp.Sequential.loss_and_grads` on
        ``(x, y)``, every parameter of every layer (dropout off). A layer: the
        parameters it creates and its input, under the loss ``sum(layer(x) * r)`` for a
        fixed random ``r``. A loss: ``d_outputs`` against differences in ``x`` (the
        outputs) with ``y`` as targets.
    x : array, shape (n, n_features)
    y : array
        Targets, shaped as the loss takes them: (n, n_outputs), or labels of shape (n,)
        for ``"cross_entropy"`` (ignored for a layer).
    loss : str or Loss
        Loss for a model check.
    sample_weight : array of shape (n,), optional
    l2 : float
        L2 penalty, as in ``loss_and_grads``.
    eps : float
        Finite-difference step.
    atol, rtol : float
        An entry passes when ``|analytic - numeric| <= atol + noise + rtol * |numeric|``,
        where ``noise = 64 u max|L(p ± eps)| / eps`` (``u`` the float64 unit roundoff)
        is what rounding of the loss values can put into the difference quotient: a
        large loss does not fail correct gradients. NaN or infinite values fail.
    max_checks : int
        At most this many entries per parameter are checked (a random subset).
    seed : int
        Seed for that subset and for a layer's parameters and ``r``.
    raise_on_failure : bool
        Raise :class:`GradcheckError` with the report when any row fails.

    Returns
    -------
    GradcheckReport
        ``str(report)`` prints one line per parameter: max abs/rel error, worst index, pass.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([3, 4, 1], activation="tanh", dtype="float64", backend="numpy", seed=0)
    >>> x = np.linspace(-1, 1, 15).reshape(5, 3); y = np.ones((5, 1))
    >>> am.gradcheck(model, x, y, loss="mse").passed
    True
    """
    from .model import Sequential

    host_rng = numpy.random.default_rng(seed)
    # host_copy: set by _place to the namespace's name where the check runs on a NumPy copy
    kw = dict(eps=eps, atol=atol, rtol=rtol, max_checks=max_checks, host_rng=host_rng, host_copy=None)
    if isinstance(obj, Sequential):
        rows = _check_model(obj, x, y, get_loss(loss), sample_weight, l2, kw)
    elif isinstance(obj, Layer):
        rows = _check_layer(obj, x, seed, kw)
    elif isinstance(obj, (str, Loss)):
        rows = _check_loss(get_loss(obj), x, y, sample_weight, kw)
    else:
        msg = f"gradcheck takes a model, a layer or a loss name, got {type(obj).__name__}"
        raise TypeError(msg)
    report = GradcheckReport(rows, eps, atol, rtol, host_copy=kw["host_copy"])
    if raise_on_failure and not report.passed:
        raise GradcheckError("gradient check failed:\n" + str(report))
    return report


def _to64(a, xp, device):
    if a is None:
        return None
    return xp.asarray(numpy.asarray(to_numpy(a), dtype=numpy.float64) if not xp.isdtype(a.dtype, "integral")
                      else to_numpy(a), device=device)


def _place(x, kw):
    """The namespace and device to check in: ``x``'s, or NumPy on the host (noted in
    ``kw["host_copy"]``) where ``x``'s has no float64."""
    xp = get_namespace(x)
    device = device_of(x)
    if not _float64_namespace(xp, device):
        from ._backend import resolve_backend

        kw["host_copy"] = backend_name(xp)
        xp, device = resolve_backend("numpy"), "cpu"
    return xp, device


def _check_model(model, x, y, lossfn, sample_weight, l2, kw):
    if x is None or y is None:
        msg = "gradcheck of a model needs x and y"
        raise ValueError(msg)
    x_checked, xp = model._check_x(x)
    xp, device = (model.xp, model.device) if _float64_namespace(model.xp, model.device) else _place(x_checked, kw)
    m = model.copy(dtype="float64", backend=backend_name(xp) if xp is not model.xp else None,
                   device=device if xp is not model.xp else None)
    x64, y64, w64 = _to64(x, xp, device), _to64(y, xp, device), _to64(sample_weight, xp, device)
    _, grads = m.loss_and_grads(x64, y64, loss=lossfn, sample_weight=w64, l2=l2, training=False)

    rows = []
    for i, (layer, p) in enumerate(zip(m.layers, m.params)):
        for name, arr in p.items():
            host = numpy.array(to_numpy(arr), dtype=numpy.float64)

            def numeric(idx, i=i, name=name, arr=arr, host=host):
                vals = []
                for delta in (kw["eps"], -kw["eps"]):
                    m.params[i][name] = _perturbed(arr, xp, device, host, idx, delta)
                    vals.append(float(m.loss(x64, y64, loss=lossfn, sample_weight=w64, l2=l2)))
                m.params[i][name] = arr
                return _quotient(vals, kw["eps"])

            row = GradcheckRow(i, repr(layer), name, tuple(host.shape), None)
            rows.append(_compare(row, grads[i].get(name), numeric, host, **kw))
    return rows


def _check_layer(layer, x, seed, kw):
    if x is None:
        msg = "gradcheck of a layer needs an input x of shape (n, n_features)"
        raise ValueError(msg)
    xp, device = _place(x, kw)
    x64 = _to64(x, xp, device)
    gen = Generator(seed, xp, device)
    params = layer.init_params(rng=gen, dtype=xp.float64)
    y, cache = layer.forward(params, x64, training=False, rng=gen, xp=xp)
    r = xp.asarray(kw["host_rng"].standard_normal(tuple(y.shape)), dtype=xp.float64, device=device)
    dx, grads = layer.backward(params, cache, r, xp=xp, need_dx=True)

    def objective(p, xin):
        out, _ = layer.forward(p, xin, training=False, rng=gen, xp=xp)
        return float(xp.sum(out * r))

    rows = []
    for name, arr in list(params.items()) + [("x", x64)]:
        host = numpy.array(to_numpy(arr), dtype=numpy.float64)

        def numeric(idx, name=name, arr=arr, host=host):
            vals = []
            for delta in (kw["eps"], -kw["eps"]):
                moved = _perturbed(arr, xp, device, host, idx, delta)
                if name == "x":
                    vals.append(objective(params, moved))
                else:
                    vals.append(objective({**params, name: moved}, x64))
            return _quotient(vals, kw["eps"])

        g = dx if name == "x" else grads.get(name)
        row = GradcheckRow(0, repr(layer), name, tuple(host.shape), None)
        rows.append(_compare(row, g, numeric, host, **kw))
    return rows


def _check_loss(lossfn, outputs, targets, sample_weight, kw):
    if outputs is None or targets is None:
        msg = "gradcheck of a loss needs outputs (as x) and targets (as y)"
        raise ValueError(msg)
    xp, device = _place(outputs, kw)
    o64, t64, w64 = _to64(outputs, xp, device), _to64(targets, xp, device), _to64(sample_weight, xp, device)
    _, d = lossfn.fn(o64, t64, xp=xp, sample_weight=w64)
    host = numpy.array(to_numpy(o64), dtype=numpy.float64)

    def numeric(idx):
        vals = [float(lossfn.fn(_perturbed(o64, xp, device, host, idx, delta), t64, xp=xp, sample_weight=w64)[0])
                for delta in (kw["eps"], -kw["eps"])]
        return _quotient(vals, kw["eps"])

    row = GradcheckRow(0, lossfn.name, "outputs", tuple(host.shape), None)
    return [_compare(row, d, numeric, host, **kw)]
