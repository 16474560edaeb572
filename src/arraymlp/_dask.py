"""Out-of-core inference on Dask arrays.

``model(x)``, ``model.predict(x)`` and ``model.predict_proba(x)`` with a
``dask.array.Array`` ``x`` return a lazy Dask array computed block by block with
:func:`dask.array.map_blocks`: each block of rows goes through the ordinary in-memory
path on the worker that holds it, so memory stays bounded by a few blocks whatever the
number of rows.

The weights travel once, not once per block:

- when a ``distributed`` client is the scheduler in effect (a ``Client(...)`` was
  created and no other scheduler is configured), they are scattered to every worker
  up front (``client.scatter(..., broadcast=True)``) and the graph refers to that one
  future, so the result must be computed by that client;
- otherwise they are one ``delayed`` node of the graph that every block depends on,
  computed by whichever scheduler runs the graph (a worker that needs it fetches it
  once from the worker that holds it).

The blocks' array type must match the model's backend: NumPy blocks for a NumPy model,
CuPy blocks (``x.map_blocks(cupy.asarray)``, or data read by dask-cuda) for a CuPy model.
A worker rebuilds the model on its own default device, so a CuPy model runs on whichever
GPU a dask-cuda worker owns.

An ensemble (``ensemble=K``) maps the same way: ``model(x)`` is a lazy (K, n, n_outputs)
array (the member axis one chunk, the rows chunked like ``x``'s), and ``predict`` and
``predict_proba`` average the members within each block, as the eager methods do, or
keep the member axis in front with ``reduce=None``.
"""

from __future__ import annotations

import sys

import array_api_compat
import numpy

from ._backend import backend_name, canonical_device, resolve_backend, to_numpy

__all__ = ["map_model"]

_METHODS = ("__call__", "predict", "predict_proba")


class _InferenceModel:
    """A model stripped to what inference needs, pickled without its namespace module,
    device or generator (rebuilt on the worker, on its default device)."""

    #: How many times this process has unpickled a model (to check that a worker
    #: receives the weights once, not once per block).
    loads = 0

    def __init__(self, model):
        # A snapshot: training the model further must not change a lazy result.
        m = object.__new__(type(model))
        m.__dict__.update(
            (k, v) for k, v in model.__dict__.items()
            if not k.endswith("_") or k in ("task_", "loss_", "target_ndim_", "target_kind_")
        )
        xp = model.xp
        m.params = [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in model.params]
        m.layers = list(model.layers)
        self.model = m

    def __getstate__(self):
        m = self.model
        drop = {"xp", "device", "rng", "dtype"}
        state = {k: v for k, v in m.__dict__.items() if k not in drop}
        return {"cls": type(m), "backend": backend_name(m.xp), "state": state}

    def __setstate__(self, payload):
        from ._backend import Generator, resolve_dtype

        m = object.__new__(payload["cls"])
        m.__dict__.update(payload["state"])
        m.xp = resolve_backend(payload["backend"])
        m.device = canonical_device(m.xp)
        m.dtype = resolve_dtype(m.xp, m._dtype_name)
        m.rng = Generator(m.seed, m.xp, m.device)
        if m.params and backend_name(m.xp) == "cupy":
            # unpickled CuPy arrays land on the current device: make that the model's
            m.device = array_api_compat.device(next(a for p in m.params for a in p.values()))
        self.model = m
        type(self).loads += 1


def _apply(block, payload: _InferenceModel, method: str, out_shape: tuple, out_dtype: str, lead: tuple = (),
           reduce: str | None = "mean"):
    """Run ``method`` of the model on one block of rows; ``lead`` is an ensemble's
    member axis, (K,), in front of the rows (``()`` when the members are averaged)."""
    model = payload.model
    if block.shape[0] == 0:
        xp = array_api_compat.array_namespace(block)
        return xp.empty(lead + (0,) + out_shape, dtype=getattr(xp, out_dtype))
    if method == "__call__":
        return model(block)
    if model.ensemble is not None:
        return getattr(model, method)(block, reduce=reduce)
    return getattr(model, method)(block)


def _output(model, method: str) -> tuple[tuple, str]:
    """Per-row output shape and dtype name of ``method``, checked up front."""
    k = model.n_outputs
    act = model.output_activation
    task = getattr(model, "task_", None)
    if method == "__call__":
        return (k,), model.dtype_name
    if method == "predict_proba":
        if act in ("softmax", "sigmoid") or task in ("multiclass", "multilabel"):
            return (k,), model.dtype_name
        msg = "predict_proba needs a classifier: a softmax/sigmoid output, or a model fitted with a classification loss"
        raise ValueError(msg)
    from .training import _prediction_form

    task, one_d, dtype = _prediction_form(model)  # predict's own rule
    if task == "multiclass" or one_d:
        return (), dtype
    return (k,), dtype


def _ensemble_output(model, method: str, reduce) -> tuple[tuple, tuple, str]:
    """An ensemble's ``(lead, per-row shape, dtype name)`` of ``method``: ``lead`` is
    (K,) for per-member results (``model(x)``, ``reduce=None``), else ()."""
    from .ensemble import _check_reduce

    _check_reduce(reduce)
    k, m = model.ensemble, model.n_outputs
    lead = (k,) if method == "__call__" or reduce is None else ()
    if method == "__call__":
        return lead, (m,), model.dtype_name
    if method == "predict_proba":  # _output checks that the model is a classifier
        return (lead, *_output(model, "predict_proba"))
    task = getattr(model, "task_", None)
    if task is None:
        task = {"softmax": "multiclass", "sigmoid": "multilabel"}.get(model.output_activation, "regression")
    if task == "multiclass":  # argmax: the namespace's index dtype
        return lead, (), _index_dtype_name(model)
    if task == "multilabel":
        return lead, (m,), "int64"
    return lead, (m,), model.dtype_name


def _index_dtype_name(model) -> str:
    from ._backend import dtype_name, index_dtype

    return dtype_name(index_dtype(model.xp))


def _current_client():
    """The ``distributed`` client that ``compute()`` would use now, if any."""
    if "distributed" not in sys.modules:
        return None
    from dask.base import get_scheduler
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    if client.asynchronous or get_scheduler() != client.get:
        return None
    return client


def _weights_node(model):
    """One graph dependency holding the model: a scattered future, or a delayed."""
    from dask import delayed
    from dask.base import tokenize

    token = tokenize(
        type(model).__qualname__,
        model.config(),
        getattr(model, "task_", None),
        backend_name(model.xp),
        [[(k, to_numpy(v)) for k, v in p.items()] for p in model.params],
    )
    key = f"arraymlp-model-{token}"
    payload = _InferenceModel(model)
    client = _current_client()
    if client is not None:
        from distributed import Future

        state = client.futures.get(key)
        if state is not None and state.status == "finished":
            return Future(key, client), token  # already on the workers: do not resend
        return client.scatter({key: payload}, broadcast=True)[key], token
    return delayed(payload, name=key, pure=True, traverse=False), token


def map_model(model, x, method: str = "__call__", *, reduce: str | None = "mean"):
    """Lazy ``model.<method>(x)`` over the row blocks of a Dask array.

    Parameters
    ----------
    model : Sequential
    x : dask.array.Array, shape (n, n_features)
        Floating point; chunked along rows (column chunks are merged).
    method : {"__call__", "predict", "predict_proba"}
    reduce : {"mean", None}
        For an ensemble's ``predict`` and ``predict_proba``: average the members, or
        keep each member's result (a leading axis of K).

    Returns
    -------
    dask.array.Array
        Shape ``(n, n_outputs)``; for ``predict`` the shape and dtype the eager
        ``predict`` gives (``(n,)`` int64 labels of a multiclass model, ``(n,)`` for a
        one-output model fitted on targets of shape ``(n,)``); chunked like ``x``'s
        rows; the blocks are of ``x``'s array type. An ensemble's per-member results
        have a leading axis of K (one chunk).
    """
    import dask.array as da
    from dask.base import tokenize

    if method not in _METHODS:
        msg = f"method must be one of {', '.join(_METHODS)}, got {method!r}"
        raise ValueError(msg)
    meta_xp = array_api_compat.array_namespace(x._meta)
    if model.params is None:
        model._build(meta_xp, None)
    if meta_xp is not model.xp:
        a, b = model.backend, backend_name(meta_xp)
        hint = (
            "convert the blocks with x.map_blocks(cupy.asarray)" if a == "cupy"
            else f"run inference with a copy of the model on {b}: model.copy(backend={b!r})"
        )
        msg = f"x is a Dask array of {b} blocks but the model's parameters are {a} arrays; {hint}"
        raise TypeError(msg)
    if x.ndim != 2:
        msg = f"x must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if x.shape[1] != model.n_features_in:
        msg = f"x has {x.shape[1]} features but the model expects {model.n_features_in}"
        raise ValueError(msg)
    if not numpy.issubdtype(x.dtype, numpy.floating):
        msg = (
            f"x has dtype {x.dtype}; a floating-point array is required "
            f"(convert it with x.astype('{model.dtype_name}'))"
        )
        raise TypeError(msg)
    if model.ensemble is not None:
        lead, out_shape, dtype = _ensemble_output(model, method, reduce)
    else:
        lead, (out_shape, dtype) = (), _output(model, method)
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    weights, token = _weights_node(model)
    name = f"arraymlp-{method.strip('_')}-{tokenize(token, x.name, reduce, lead)}"
    meta = meta_xp.empty((0,) * (len(lead) + 1 + len(out_shape)), dtype=getattr(meta_xp, dtype))
    kwargs = {"drop_axis": 1} if not out_shape else {}
    if lead:  # the members' axis, one chunk, in front of the rows
        kwargs["new_axis"] = 0
    if out_shape or lead:
        kwargs["chunks"] = tuple((d,) for d in lead) + (x.chunks[0],) + tuple((d,) for d in out_shape)
    return da.map_blocks(
        _apply, x, weights, method=method, out_shape=out_shape, out_dtype=dtype, lead=lead, reduce=reduce,
        dtype=numpy.dtype(dtype), meta=meta, name=name, **kwargs,
    )
