"""ONNX export: every activation and layer, checked against onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import arraymlp as am

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ACTIVATIONS = ["identity", "relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid", "softplus",
               "softmax", "log_softmax"]


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["output"], {"input": x})
    return out


def _inputs(n_in, dtype=np.float32, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3.0, size=(n, n_in))
    x[0] = 25.0  # far into the tails: saturation, overflow-prone exponentials
    x[1] = -25.0
    x[2] = 0.0
    return x.astype(dtype)


def _check(model, tmp_path, x, *, rtol=1e-5, atol=1e-5, **kwargs):
    path = tmp_path / "model.onnx"
    proto = am.export_onnx(model, path, **kwargs)
    onnx.checker.check_model(onnx.load(str(path)))
    got = _run(path, x)
    want = np.asarray(model(x))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    return proto


def _ops(proto):
    return [node.op_type for node in proto.graph.node]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation(name, tmp_path):
    # the activation acts on the input directly (Identity weights), then a Dense layer follows
    model = am.Sequential([am.Dense(6, 6), am.Activation(name), am.Dense(6, 4)], seed=0, backend="numpy")
    model.params[0]["W"] = np.eye(6, dtype=np.float32)
    model.params[0]["b"] = np.linspace(-1, 1, 6, dtype=np.float32)
    _check(model, tmp_path, _inputs(6))
    last = am.Sequential([am.Dense(6, 5), am.Activation(name)], seed=1, backend="numpy")
    _check(last, tmp_path, _inputs(6))  # as the output layer


@pytest.mark.parametrize("opset", [17, 20])
def test_gelu_forms(opset, tmp_path):
    model = am.Sequential([am.Dense(5, 5), am.GELU()], seed=0, backend="numpy")
    proto = _check(model, tmp_path, _inputs(5), opset=opset)
    assert ("Gelu" in _ops(proto)) == (opset >= 20)
    if opset >= 20:
        gelu = next(n for n in proto.graph.node if n.op_type == "Gelu")
        assert onnx.helper.get_attribute_value(gelu.attribute[0]) == b"tanh"


def test_dense_without_bias_layernorm_and_dropout(tmp_path):
    model = am.Sequential([am.Dense(7, 9, bias=False), am.LayerNorm(9, eps=1e-3), am.Dropout(0.5),
                           am.Dense(9, 3), am.Dropout(0.2)], seed=2, backend="numpy")
    model.params[1]["gamma"] = np.linspace(0.5, 2.0, 9, dtype=np.float32)
    model.params[1]["beta"] = np.linspace(-0.3, 0.3, 9, dtype=np.float32)
    proto = _check(model, tmp_path, _inputs(7))
    assert _ops(proto) == ["MatMul", "LayerNormalization", "Gemm"]  # dropout is the identity at inference
    assert [o.name for o in proto.graph.output] == ["output"]


def test_trained_mlp_every_backend(backend, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = rng.integers(0, 4, size=80)
    model = am.MLP([6, 16, 16, 4], activation="silu", layer_norm=True, dropout=0.1, output_activation="softmax",
                   seed=0, **backend.model_kwargs())
    model.fit(backend.asarray(x, np.float32), backend.asarray(y, np.int64), loss="cross_entropy", epochs=2,
              progress=False)
    path = tmp_path / "mlp.onnx"
    proto = am.export_onnx(model, path)
    xf = x.astype(np.float32)
    want = backend.to_numpy(model(backend.asarray(xf)))
    np.testing.assert_allclose(_run(path, xf), want, rtol=1e-5, atol=1e-6)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 6
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["arraymlp_version"] == am.__version__
    assert proto.opset_import[0].version == 17


def test_float64_export(tmp_path):
    model = am.MLP([5, 8, 3], activation="tanh", layer_norm=True, output_activation="log_softmax",
                   dtype="float64", seed=0, backend="numpy")
    proto = _check(model, tmp_path, _inputs(5, np.float64), rtol=1e-12, atol=1e-12)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


@pytest.mark.parametrize("opset", [17, 18, 20])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_float64_every_activation_runs_to_float64_precision(name, opset, tmp_path):
    """float64 models export activations whose float64 kernels onnxruntime lacks (ELU,
    softplus at some opsets) or whose attributes ONNX stores in float32 (LeakyReLU's
    slope) as elementary operators with float64 constants."""
    model = am.Sequential([am.Dense(6, 6), am.Activation(name), am.Dense(6, 4)], dtype="float64", seed=0,
                          backend="numpy")
    model.params[0]["W"] = np.eye(6)
    model.params[0]["b"] = np.linspace(-1, 1, 6)
    proto = _check(model, tmp_path, _inputs(6, np.float64), rtol=1e-13, atol=1e-13, opset=opset)
    ops = _ops(proto)
    assert not {"LeakyRelu", "Elu", "Softplus", "Gelu"} & set(ops)


def test_float16_export(tmp_path):
    model = am.MLP([4, 8, 3], activation="gelu", layer_norm=True, output_activation="softmax", dtype="float16",
                   seed=0, backend="numpy")
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float16)
    proto = _check(model, tmp_path, x, rtol=0, atol=2e-3)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_export_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no parameters yet"):
        am.export_onnx(am.MLP([2, 3]), tmp_path / "m.onnx")
    model = am.MLP([2, 3], backend="numpy")
    with pytest.raises(ValueError, match="opset must be an int >= 17"):
        am.export_onnx(model, tmp_path / "m.onnx", opset=13)

    class Scale(am.Layer):
        pass

    with pytest.raises(TypeError, match="cannot export layer 1"):
        am.export_onnx(am.Sequential([am.Dense(2, 3), Scale()], backend="numpy"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install arraymlp\[onnx\]"):
        am.export_onnx(model, tmp_path / "m.onnx")


# ----------------------------------------------------------------------------- ensembles
def _run_members(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output", "members"], {"input": x})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ensemble_classifier_every_backend(backend, tmp_path, dtype):
    """One graph for K members: "output" is predict_proba (the members' probabilities
    averaged; a model trained on logits gets its softmax), "members" predict_proba with
    reduce=None, on every backend the ensemble was trained on."""
    np_dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    y = rng.integers(0, 4, size=60)
    model = am.MLP([6, 12, 4], activation="silu", layer_norm=True, dropout=0.1, ensemble=3, seed=0, dtype=dtype,
                   **backend.model_kwargs())
    model.fit(backend.asarray(x, np_dtype), backend.asarray(y, np.int64), loss="cross_entropy",
              lr=[1e-3, 1e-2, 3e-2], epochs=2, progress=False)
    path = tmp_path / "ensemble.onnx"
    proto = am.export_onnx(model, path, members=True)
    xd = x.astype(np_dtype)
    out, members = _run_members(path, xd)
    tol = 1e-12 if dtype == "float64" else 1e-5
    want = backend.to_numpy(model.predict_proba(backend.asarray(xd)))
    per = backend.to_numpy(model.predict_proba(backend.asarray(xd), reduce=None))
    assert out.dtype == np_dtype and out.shape == (60, 4) and members.shape == (3, 60, 4)
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(members, per, rtol=tol, atol=tol)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=tol)
    # dense: MatMul over the member axis + Add; LayerNorm with the members' gamma/beta;
    # silu; dropout is nothing; the logits' softmax; the mean over the members
    assert _ops(proto) == ["MatMul", "Add", "LayerNormalization", "Mul", "Add", "Sigmoid", "Mul", "MatMul", "Add",
                           "Softmax", "ReduceMean"]
    dims = proto.graph.output[1].type.tensor_type.shape.dim
    assert [dims[0].dim_value, dims[1].dim_param, dims[2].dim_value] == [3, "batch", 4]


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_ensemble_regressor_and_output_activations(tmp_path, opset):
    """A regressor's "output" is predict (the members' outputs averaged) and "members"
    model(x); a softmax output layer is averaged as it is; a multilabel model trained on
    logits gets its sigmoid; a dense layer without bias is a bare MatMul."""
    x = _inputs(5, np.float64, n=40)
    reg = am.Sequential([am.Dense(5, 8, bias=False), am.LayerNorm(8, eps=1e-3), am.Activation("tanh"),
                         am.Dense(8, 2)], ensemble=4, dtype="float64", seed=1, backend="numpy")
    reg.params[1]["gamma"] = np.linspace(0.5, 2.0, 4 * 8).reshape(4, 1, 8)
    path = tmp_path / "reg.onnx"
    proto = am.export_onnx(reg, path, opset=opset, members=True)
    out, members = _run_members(path, x)
    # onnxruntime's LayerNormalization on the inputs of +-25 differs by 1e-11 from the
    # library's, as much as in each member's own (plain) export
    np.testing.assert_allclose(out, reg.predict(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(members, reg(x), rtol=1e-10, atol=1e-10)
    for i in range(4):
        am.export_onnx(reg.member(i), tmp_path / "member.onnx", opset=opset)
        np.testing.assert_allclose(members[i], _run(tmp_path / "member.onnx", x), rtol=1e-13, atol=1e-13)
    assert _ops(proto)[0] == "MatMul" and _ops(proto)[1] == "LayerNormalization"
    assert "Softmax" not in _ops(proto) and "Sigmoid" not in _ops(proto)

    soft = am.MLP([5, 6, 3], output_activation="softmax", ensemble=2, dtype="float64", seed=2, backend="numpy")
    proto = am.export_onnx(soft, path, opset=opset)
    assert _ops(proto).count("Softmax") == 1 and [o.name for o in proto.graph.output] == ["output"]
    np.testing.assert_allclose(_run(path, x), soft.predict_proba(x), rtol=1e-12, atol=1e-12)

    multi = am.MLP([5, 6, 3], ensemble=3, dtype="float64", seed=3, backend="numpy")
    labels = (x[:, :3] > 0).astype(np.float64)
    multi.fit(x, labels, loss="binary_cross_entropy", epochs=1, progress=False)
    proto = am.export_onnx(multi, path, opset=opset)
    assert _ops(proto)[-2:] == ["Sigmoid", "ReduceMean"]
    np.testing.assert_allclose(_run(path, x), multi.predict_proba(x), rtol=1e-12, atol=1e-12)


def test_members_output_needs_an_ensemble(tmp_path):
    with pytest.raises(ValueError, match="members=True exports each member's output of an ensemble"):
        am.export_onnx(am.MLP([2, 3], backend="numpy"), tmp_path / "m.onnx", members=True)


def test_float16_ensemble_export(tmp_path):
    model = am.MLP([4, 8, 3], activation="gelu", layer_norm=True, output_activation="softmax", ensemble=3,
                   dtype="float16", seed=0, backend="numpy")
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float16)
    proto = am.export_onnx(model, tmp_path / "e.onnx", members=True)
    out, members = _run_members(tmp_path / "e.onnx", x)
    assert out.dtype == np.float16 and proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    np.testing.assert_allclose(out, model.predict_proba(x), rtol=0, atol=2e-3)
    np.testing.assert_allclose(members, model.predict_proba(x, reduce=None), rtol=0, atol=2e-3)
