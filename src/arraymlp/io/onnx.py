"""ONNX export: :func:`export_onnx` writes a model's inference graph (the ``onnx``
extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy

from .. import layers as L
from .._backend import to_numpy
from .._version import __version__
from ..kernels import reference as F
from .container import _is_int, _write_atomic
from .layout import _check_built, _model_config

__all__ = ["export_onnx"]


def _require_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        msg = "ONNX export needs the onnx package; install it with `pip install arraymlp[onnx]`"
        raise ImportError(msg) from exc
    return onnx, helper, numpy_helper


def export_onnx(model: Any, path: str | os.PathLike, *, opset: int = 17, members: bool = False):
    """Export a model's inference graph as an ONNX file.

    The graph has one input ``"input"`` of shape ``("batch", n_features)`` and one
    output ``"output"`` of shape ``("batch", n_outputs)``, in the model's dtype.
    Dense layers become ``Gemm`` (``MatMul`` without bias), LayerNorm
    ``LayerNormalization``, Dropout nothing (it is the identity at inference), and
    activations their ONNX operators (``Relu``, ``LeakyRelu`` with alpha 0.01,
    ``Elu``, ``Tanh``, ``Sigmoid``, ``Softplus``, ``Softmax`` and ``LogSoftmax`` over
    the last axis); SiLU is ``x * Sigmoid(x)`` and GELU its tanh form (the ``Gelu``
    operator with ``approximate="tanh"`` from opset 20, elementary operators below).

    An ensemble (``ensemble=K``) is one graph over its stacked parameters: each dense
    layer is a ``MatMul`` of the activations with ``W`` of shape (K, n_in, n_out),
    which broadcasts over the leading member axis (the input (batch, n_features)
    becomes (K, batch, n_out)), and an ``Add`` of ``b`` (K, 1, n_out); a LayerNorm
    normalises with ``LayerNormalization`` and scales and shifts by the members'
    ``gamma`` and ``beta`` (K, 1, d). ``"output"`` (batch, n_outputs) is what
    ``predict_proba`` gives for a classifier, the mean of the members' probabilities
    (a softmax or sigmoid is added for a model trained on logits), and what
    ``predict`` gives for a regressor, the mean of the members' outputs
    (``ReduceMean`` over the member axis).

    Parameters
    ----------
    model : Sequential or MLP
        A model whose parameters exist, on any backend.
    path : str or path-like
        Target ``.onnx`` file, written atomically.
    opset : int
        ONNX operator-set version, at least 17.
    members : bool
        For an ensemble, a second output ``"members"`` of shape (K, batch, n_outputs):
        each member's probabilities (classifier) or outputs (regressor), as
        ``predict_proba(x, reduce=None)`` or ``model(x)`` give them.

    Returns
    -------
    onnx.ModelProto
        The exported model (already checked with ``onnx.checker``).

    Raises
    ------
    ImportError
        When the ``onnx`` package is missing (``pip install arraymlp[onnx]``).

    Examples
    --------
    >>> import tempfile, os
    >>> import arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> model = am.MLP([3, 4, 2], backend="numpy", seed=0)
    >>> proto = am.export_onnx(model, os.path.join(d, "model.onnx"))
    >>> [node.op_type for node in proto.graph.node]
    ['Gemm', 'Relu', 'Gemm']
    >>> [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    (['input'], ['output'])
    >>> os.listdir(d)
    ['model.onnx']
    """
    onnx, helper, numpy_helper = _require_onnx()
    if not _is_int(opset) or opset < 17:
        msg = f"opset must be an int >= 17 (LayerNormalization needs 17), got {opset!r}"
        raise ValueError(msg)
    _check_built(model, "exporting")
    k = getattr(model, "ensemble", None)
    if members and k is None:
        msg = "members=True exports each member's output of an ensemble; this model is not one (ensemble=None)"
        raise ValueError(msg)
    np_dtype = numpy.dtype(model.dtype_name)
    elem = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT,
            "float64": onnx.TensorProto.DOUBLE}[model.dtype_name]
    nodes: list[Any] = []
    inits: list[Any] = []

    def tensor(name: str, value) -> str:
        inits.append(numpy_helper.from_array(numpy.ascontiguousarray(numpy.asarray(value, dtype=np_dtype)), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    emitting = [i for i, layer in enumerate(model.layers) if not isinstance(layer, L.Dropout)]
    last = emitting[-1]
    cur = "input"
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        if isinstance(layer, L.Dropout):
            continue
        out = "output" if i == last and k is None else f"layer{i}"
        pre = f"layer{i}"
        if k is not None and isinstance(layer, (L.Dense, L.LayerNorm)):
            cur = _stacked_layer(layer, p, cur, out, pre, node, tensor)
        elif isinstance(layer, L.Dense):
            W = tensor(f"{pre}.W", to_numpy(p["W"]))
            if layer.bias:
                cur = node("Gemm", [cur, W, tensor(f"{pre}.b", to_numpy(p["b"]))], out)
            else:
                cur = node("MatMul", [cur, W], out)
        elif isinstance(layer, L.LayerNorm):
            g, b = tensor(f"{pre}.gamma", to_numpy(p["gamma"])), tensor(f"{pre}.beta", to_numpy(p["beta"]))
            cur = node("LayerNormalization", [cur, g, b], out, axis=-1, epsilon=layer.eps)
        elif isinstance(layer, L.Activation):
            cur = _onnx_activation(layer.name, cur, out, pre, node, tensor, opset, exact=np_dtype == numpy.float64)
        else:
            msg = (f"cannot export layer {i} ({layer!r}) to ONNX: "
                   "only Dense, Activation, Dropout and LayerNorm are supported")
            raise TypeError(msg)
    n_in, n_out = model.n_features_in, model.n_outputs
    outputs = [helper.make_tensor_value_info("output", elem, ["batch", n_out])]
    if k is not None:
        _average_members(model, cur, members, node, opset, inits, numpy_helper)
        if members:
            outputs.append(helper.make_tensor_value_info("members", elem, [k, "batch", n_out]))
    graph = helper.make_graph(
        nodes, "arraymlp",
        [helper.make_tensor_value_info("input", elem, ["batch", n_in])],
        outputs,
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="arraymlp",
                              producer_version=__version__,
                              doc_string=f"arraymlp {type(model).__name__}: {len(model.layers)} layers, "
                                         f"{model.dtype_name}")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(proto, {"arraymlp_version": __version__,
                                   "arraymlp_model": json.dumps(_model_config(model), sort_keys=True)})
    onnx.checker.check_model(proto)
    _write_atomic(Path(os.fspath(path)), proto.SerializeToString())
    return proto


def _stacked_layer(layer, p, x: str, out: str, pre: str, node, tensor) -> str:
    """An ensemble's Dense or LayerNorm layer over the member axis: ``x`` is (batch, n_in)
    for the first layer, (K, batch, n_in) after it."""
    if isinstance(layer, L.Dense):  # (K, n_in, n_out): MatMul broadcasts over the members
        W = tensor(f"{pre}.W", to_numpy(p["W"]))
        if not layer.bias:
            return node("MatMul", [x, W], out)
        xw = node("MatMul", [x, W], f"{pre}.xW")
        return node("Add", [xw, tensor(f"{pre}.b", to_numpy(p["b"]))], out)
    # LayerNormalization's scale has the normalised shape (d,): normalise with a scale of
    # ones, then each member's gamma and beta, (K, 1, d)
    d = int(p["gamma"].shape[-1])
    normed = node("LayerNormalization", [x, tensor(f"{pre}.ones", numpy.ones(d))], f"{pre}.normed", axis=-1,
                  epsilon=layer.eps)
    scaled = node("Mul", [normed, tensor(f"{pre}.gamma", to_numpy(p["gamma"]))], f"{pre}.scaled")
    return node("Add", [scaled, tensor(f"{pre}.beta", to_numpy(p["beta"]))], out)


def _average_members(model, x: str, members: bool, node, opset: int, inits: list, numpy_helper) -> None:
    """The nodes from the members' last outputs ``x`` (K, batch, m) to ``"output"``:
    their probabilities (a classifier trained on logits gets its softmax or sigmoid)
    averaged, or their outputs averaged (a regressor), as ``predict_proba`` and
    ``predict`` average them; with ``members``, the per-member values are the output
    ``"members"``."""
    task = getattr(model, "task_", None)
    act = model.output_activation
    per = "members" if members else "members.values"
    if act not in ("softmax", "sigmoid") and task == "multiclass":
        x = node("Softmax", [x], per, axis=-1)
    elif act not in ("softmax", "sigmoid") and task == "multilabel":
        x = node("Sigmoid", [x], per)
    elif members:
        x = node("Identity", [x], per)
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        inits.append(numpy_helper.from_array(numpy.array([0], dtype=numpy.int64), "members.axis"))
        node("ReduceMean", [x, "members.axis"], "output", keepdims=0)
    else:
        node("ReduceMean", [x], "output", axes=[0], keepdims=0)


def _onnx_activation(name: str, x: str, out: str, pre: str, node, tensor, opset: int, exact: bool = False) -> str:
    """Nodes computing activation ``name`` of ``x`` into ``out``; returns ``out``.

    ``exact`` (float64 models) builds LeakyReLU, ELU, softplus and GELU from elementary
    operators with constants in the model's dtype: ONNX keeps operator attributes such
    as ``alpha`` in float32, and onnxruntime has no float64 kernel for some of these
    operators at some opsets.
    """
    if exact and name == "leaky_relu":  # max(x, slope x), for 0 < slope < 1
        return node("Max", [x, node("Mul", [x, tensor(f"{pre}.slope", F.LEAKY_SLOPE)], f"{pre}.sx")], out)
    if exact and name == "elu":  # relu(x) + alpha (exp(min(x, 0)) - 1)
        neg = node("Min", [x, tensor(f"{pre}.zero", 0.0)], f"{pre}.neg")
        em1 = node("Sub", [node("Exp", [neg], f"{pre}.exp"), tensor(f"{pre}.one", 1.0)], f"{pre}.em1")
        scaled = node("Mul", [em1, tensor(f"{pre}.alpha", F.ELU_ALPHA)], f"{pre}.scaled")
        return node("Add", [node("Relu", [x], f"{pre}.relu"), scaled], out)
    if exact and name == "softplus":  # relu(x) + log(1 + exp(-|x|)), never overflowing
        e = node("Exp", [node("Neg", [node("Abs", [x], f"{pre}.abs")], f"{pre}.negabs")], f"{pre}.exp")
        log1pe = node("Log", [node("Add", [e, tensor(f"{pre}.one", 1.0)], f"{pre}.onepe")], f"{pre}.log")
        return node("Add", [node("Relu", [x], f"{pre}.relu"), log1pe], out)
    simple = {"identity": "Identity", "relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus"}
    if name in simple:
        return node(simple[name], [x], out)
    if name == "leaky_relu":
        return node("LeakyRelu", [x], out, alpha=F.LEAKY_SLOPE)
    if name == "elu":
        return node("Elu", [x], out, alpha=F.ELU_ALPHA)
    if name == "softmax":
        return node("Softmax", [x], out, axis=-1)
    if name == "log_softmax":
        return node("LogSoftmax", [x], out, axis=-1)
    if name == "silu":
        return node("Mul", [x, node("Sigmoid", [x], f"{pre}.sigmoid")], out)
    if name == "gelu":
        if opset >= 20 and not exact:
            return node("Gelu", [x], out, approximate="tanh")
        # y = 0.5 x (1 + tanh(c (x + k x^3)))
        x3 = node("Mul", [node("Mul", [x, x], f"{pre}.x2"), x], f"{pre}.x3")
        inner = node("Add", [x, node("Mul", [x3, tensor(f"{pre}.k", F._GELU_K)], f"{pre}.kx3")], f"{pre}.inner")
        t = node("Tanh", [node("Mul", [inner, tensor(f"{pre}.c", F._GELU_C)], f"{pre}.scaled")], f"{pre}.tanh")
        half_x = node("Mul", [x, tensor(f"{pre}.half", 0.5)], f"{pre}.half_x")
        return node("Mul", [half_x, node("Add", [t, tensor(f"{pre}.one", 1.0)], f"{pre}.one_plus_t")], out)
    msg = f"cannot export activation {name!r} to ONNX; known activations: {', '.join(F.ACTIVATIONS)}"
    raise ValueError(msg)
