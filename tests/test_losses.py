"""Tests of arraymlp.losses: values and gradients against a float64 NumPy reference
and PyTorch autograd, directional finite differences, sample weights, stability for
huge logits, the fusion contract, and the error messages. Every test runs on every
row of the ``backend`` fixture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from arraymlp import functional as F
from arraymlp.losses import LOSSES, Loss, get_loss, huber

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32
FLOAT64_DATA = "float32"

# the float64 cases also run on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True

# ----------------------------------------------------------------------- the cases
N, K = 6, 4
DTYPES = ["float32", "float64"]
TOL = {
    "float32": {"rtol": 2e-5, "atol": 2e-6},
    "float64": {"rtol": 1e-11, "atol": 1e-13},
}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    form: str  # "values", "labels", "onehot", "probs" (rows sum to 1), "scaled" (they do not)

    def __str__(self):
        return f"{self.loss}-{self.form}"

    @property
    def labels(self) -> bool:
        return self.form == "labels"


CASES = [
    Case("mse", "values"),
    Case("mae", "values"),
    Case("huber", "values"),
    Case("binary_cross_entropy", "values"),
    Case("poisson_nll", "values"),
    Case("cross_entropy", "labels"),
    Case("cross_entropy", "onehot"),
    Case("cross_entropy", "probs"),
    Case("cross_entropy", "scaled"),
]
case_param = pytest.mark.parametrize("case", CASES, ids=str)
dtype_param = pytest.mark.parametrize("dtype", DTYPES)
weighted_param = pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])


def make_data(case, rng, n=N, k=K):
    """Outputs (float64) and targets (int64 labels or float64) for a case."""
    if case.loss in ("mse", "mae", "huber"):
        o = 2.0 * rng.standard_normal((n, k))
        t = rng.standard_normal((n, k))
        t[0, 0] = o[0, 0]  # an exact zero difference: the L1 gradient is 0 there
        return o, t
    if case.loss == "binary_cross_entropy":
        o = 3.0 * rng.standard_normal((n, k))
        t = rng.random((n, k))
        t[: n // 2] = np.round(t[: n // 2])  # hard 0/1 labels and soft probabilities
        return o, t
    if case.loss == "poisson_nll":
        o = 0.5 * rng.standard_normal((n, k))
        return o, rng.poisson(2.0, size=(n, k)).astype(np.float64)
    o = 2.0 * rng.standard_normal((n, k))
    y = rng.integers(0, k, size=n)
    if case.form == "labels":
        return o, y
    if case.form == "onehot":
        return o, np.eye(k)[y]
    p = rng.random((n, k)) + 0.1
    p /= p.sum(axis=1, keepdims=True)
    if case.form == "scaled":
        p *= rng.uniform(0.5, 2.0, size=(n, 1))
    return o, p


def make_weights(rng, n=N):
    w = rng.uniform(0.0, 3.0, size=n)
    w[1] = 0.0
    return w


def on_backend(backend, o, t, w, dtype):
    """Inputs on the backend row: outputs and float targets in ``dtype``, labels int64.
    A float64 case skips on a row without float64 (JAX in its 32-bit mode)."""
    if dtype == "float64":
        backend.skip_without_float64()
    ob = backend.asarray(o, dtype)
    tb = backend.asarray(t, "int64" if np.issubdtype(np.asarray(t).dtype, np.integer) else dtype)
    wb = None if w is None else backend.asarray(w, dtype)
    return ob, tb, wb


def rounded(a, dtype):
    """The float64 value of what the backend actually saw."""
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.integer) else a.astype(dtype).astype(np.float64)


# ------------------------------------------------------------- float64 NumPy reference
def reference(name, o, t, w=None):
    """Loss and gradient in float64 NumPy, written from the textbook definitions."""
    o = np.asarray(o, dtype=np.float64)
    n = o.shape[0]
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    if name == "cross_entropy":
        k = o.shape[1]
        T = np.eye(k)[t] if np.issubdtype(np.asarray(t).dtype, np.integer) else np.asarray(t, float)
        m = o.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(o - m).sum(axis=1, keepdims=True))
        p = np.exp(o - lse)
        per_sample = -(T * (o - lse)).sum(axis=1)
        g = p * T.sum(axis=1, keepdims=True) - T
        m_el = 1
    else:
        t = np.asarray(t, dtype=np.float64).reshape(o.shape)
        d = o - t
        if name == "mse":
            e, g = d**2, 2 * d
        elif name == "mae":
            e, g = np.abs(d), np.sign(d)
        elif name == "huber":
            quad = np.abs(d) <= 1.0
            e = np.where(quad, 0.5 * d**2, np.abs(d) - 0.5)
            g = np.where(quad, d, np.sign(d))
        elif name == "binary_cross_entropy":
            s = 1.0 / (1.0 + np.exp(-o))  # fine for the moderate logits used here
            e = -(t * np.log(s) + (1 - t) * np.log(1 - s))
            g = s - t
        elif name == "poisson_nll":
            e, g = np.exp(o) - t * o, np.exp(o) - t
        else:  # pragma: no cover
            raise AssertionError(name)
        m_el = int(np.prod(o.shape[1:]))
        per_sample = e.reshape(n, -1).mean(axis=1)
    loss = (w * per_sample).sum() / w.sum()
    grad = g * (w / (w.sum() * m_el)).reshape((n,) + (1,) * (o.ndim - 1))
    return loss, grad


# ------------------------------------------------------------------ PyTorch oracle
def torch_oracle(name, o, t, dtype, w=None):
    """Loss and autograd gradient from ``torch.nn.functional`` (reduction="mean"; with
    weights, reduction="none" and the weighted mean of the per-sample means)."""
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    tdt = getattr(torch, dtype)
    x = torch.tensor(np.asarray(o), dtype=tdt, requires_grad=True)
    is_labels = np.issubdtype(np.asarray(t).dtype, np.integer)
    y = torch.tensor(np.asarray(t), dtype=torch.int64 if is_labels else tdt)
    red = "mean" if w is None else "none"
    if name == "mse":
        out = tf.mse_loss(x, y, reduction=red)
    elif name == "mae":
        out = tf.l1_loss(x, y, reduction=red)
    elif name == "huber":
        out = tf.huber_loss(x, y, reduction=red, delta=1.0)
    elif name == "binary_cross_entropy":
        out = tf.binary_cross_entropy_with_logits(x, y, reduction=red)
    elif name == "poisson_nll":
        out = tf.poisson_nll_loss(x, y, log_input=True, full=False, reduction=red)
    else:
        out = tf.cross_entropy(x, y, reduction=red)
    if w is not None:
        wt = torch.tensor(np.asarray(w), dtype=tdt)
        per_sample = out.reshape(out.shape[0], -1).mean(dim=1)
        out = (wt * per_sample).sum() / wt.sum()
    out.backward()
    return out.detach().numpy(), x.grad.numpy()


# ------------------------------------------------------------ values and gradients
def check_result(backend, loss, grad, outputs, dtype):
    """Loss is 0-d, both results are in the outputs' dtype and on their device."""
    assert tuple(loss.shape) == ()
    assert tuple(grad.shape) == tuple(outputs.shape)
    assert loss.dtype == outputs.dtype and grad.dtype == outputs.dtype
    assert backend.same_place(loss) and backend.same_place(grad)
    return float(backend.to_numpy(loss)), backend.to_numpy(grad)


@case_param
@dtype_param
@weighted_param
def test_matches_numpy_reference(backend, rng, case, dtype, weighted):
    o, t = make_data(case, rng)
    w = make_weights(rng) if weighted else None
    ob, tb, wb = on_backend(backend, o, t, w, dtype)
    loss, grad = get_loss(case.loss).fn(ob, tb, xp=backend.xp, sample_weight=wb)
    loss, grad = check_result(backend, loss, grad, ob, dtype)
    want_loss, want_grad = reference(
        case.loss, rounded(o, dtype), rounded(t, dtype), None if w is None else rounded(w, dtype)
    )
    np.testing.assert_allclose(loss, want_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, want_grad, **TOL[dtype])


@case_param
@dtype_param
@weighted_param
def test_matches_torch_autograd(backend, rng, case, dtype, weighted):
    o, t = make_data(case, rng)
    w = make_weights(rng) if weighted else None
    want_loss, want_grad = torch_oracle(case.loss, rounded(o, dtype), rounded(t, dtype), dtype, w)
    ob, tb, wb = on_backend(backend, o, t, w, dtype)
    loss, grad = get_loss(case.loss)(ob, tb, sample_weight=wb)  # xp inferred
    loss, grad = check_result(backend, loss, grad, ob, dtype)
    np.testing.assert_allclose(loss, want_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, want_grad, **TOL[dtype])


@case_param
@weighted_param
def test_directional_finite_differences(backend, case, weighted):
    rng = np.random.default_rng(7)
    o, t = make_data(case, rng)
    w = make_weights(rng) if weighted else None
    fn = get_loss(case.loss).fn
    _, tb, wb = on_backend(backend, o, t, w, "float64")

    def value(x):
        loss, _ = fn(backend.asarray(x, "float64"), tb, xp=backend.xp, sample_weight=wb)
        return float(backend.to_numpy(loss))

    _, grad = fn(backend.asarray(o, "float64"), tb, xp=backend.xp, sample_weight=wb)
    grad = backend.to_numpy(grad)
    h = 1e-6
    for _ in range(3):
        v = rng.standard_normal(o.shape)
        fd = (value(o + h * v) - value(o - h * v)) / (2 * h)
        np.testing.assert_allclose(fd, np.sum(grad * v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["mse", "huber", "poisson_nll"])
def test_higher_rank_outputs_weighted(backend, rng, name):
    """Outputs (n, 2, 3): each sample's loss is the mean over its 6 elements."""
    backend.skip_without_float64()  # compared with float64 references at float64 tolerances
    o = rng.standard_normal((5, 2, 3))
    if name == "poisson_nll":
        t = rng.poisson(1.0, (5, 2, 3)).astype(np.float64)
    else:
        t = rng.standard_normal((5, 2, 3))
    w = rng.uniform(0.5, 2.0, size=5)
    ob, tb, wb = on_backend(backend, o, t, w, "float64")
    loss, grad = LOSSES[name](ob, tb, sample_weight=wb)
    want_loss, want_grad = reference(name, o, t, w)
    np.testing.assert_allclose(float(backend.to_numpy(loss)), want_loss, **TOL["float64"])
    np.testing.assert_allclose(backend.to_numpy(grad), want_grad, **TOL["float64"])


# ------------------------------------------------------------------ sample weights
@case_param
@dtype_param
def test_all_ones_weights_equal_unweighted(backend, rng, case, dtype):
    o, t = make_data(case, rng)
    ob, tb, _ = on_backend(backend, o, t, None, dtype)
    fn = get_loss(case.loss).fn
    loss0, grad0 = fn(ob, tb, xp=backend.xp)
    loss1, grad1 = fn(ob, tb, xp=backend.xp, sample_weight=backend.asarray(np.ones(N), dtype))
    # the same value up to the order of summation: a few ulps
    tol = {"rtol": 8 * EPS[dtype], "atol": 8 * EPS[dtype]}
    np.testing.assert_allclose(backend.to_numpy(loss1), backend.to_numpy(loss0), **tol)
    np.testing.assert_allclose(backend.to_numpy(grad1), backend.to_numpy(grad0), **tol)


@case_param
@dtype_param
def test_integer_weights_equal_repeated_rows(backend, rng, case, dtype):
    o, t = make_data(case, rng)
    counts = np.array([2, 0, 1, 3, 1, 1])
    idx = np.repeat(np.arange(N), counts)
    fn = get_loss(case.loss).fn
    ob, tb, _ = on_backend(backend, o, t, None, dtype)
    loss_w, grad_w = fn(ob, tb, xp=backend.xp, sample_weight=backend.asarray(counts, "int64"))
    ob_r, tb_r, _ = on_backend(backend, o[idx], t[idx], None, dtype)
    loss_r, grad_r = fn(ob_r, tb_r, xp=backend.xp)
    np.testing.assert_allclose(backend.to_numpy(loss_w), backend.to_numpy(loss_r), **TOL[dtype])
    # d/d(row i) of the repeated loss is the sum over row i's copies
    summed = np.zeros(o.shape)
    np.add.at(summed, idx, backend.to_numpy(grad_r).astype(np.float64))
    np.testing.assert_allclose(backend.to_numpy(grad_w), summed, **TOL[dtype])
    assert np.all(backend.to_numpy(grad_w)[1] == 0.0)  # weight 0: no gradient


# ------------------------------------------------------------------------ stability
BIG = {"float64": 1e4, "float32": 80.0}


@dtype_param
def test_cross_entropy_huge_logits(backend, dtype):
    b = BIG[dtype]
    o = np.array([[b, -b, 0.0], [b, -b, 0.0], [-b, -b, b], [b, b, -b]])
    y = np.array([0, 1, 2, 1])
    for t in (y, np.eye(3)[y]):
        ob, tb, _ = on_backend(backend, o, t, None, dtype)
        loss, grad = LOSSES["cross_entropy"](ob, tb)
        loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        # per sample: 0, 2b, 0, log 2; gradients softmax - onehot over n = 4
        np.testing.assert_allclose(loss, (2 * b + np.log(2.0)) / 4, rtol=10 * EPS[dtype])
        want = np.array([[0, 0, 0], [1, -1, 0], [0, 0, 0], [0.5, -0.5, 0]]) / 4
        np.testing.assert_allclose(grad, want, rtol=10 * EPS[dtype], atol=1e-30)


@dtype_param
def test_binary_cross_entropy_huge_logits(backend, dtype):
    b = BIG[dtype]
    o = np.array([[b, -b], [b, -b], [0.0, b]])
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    ob, tb, _ = on_backend(backend, o, t, None, dtype)
    loss, grad = LOSSES["binary_cross_entropy"](ob, tb)
    loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    # elementwise: ~0, ~0, b, b, log 2, b/2 (exp(-b) is below the tolerance)
    np.testing.assert_allclose(loss, (2.5 * b + np.log(2.0)) / 6, rtol=10 * EPS[dtype])
    want = np.array([[0.0, 0.0], [1.0, -1.0], [-0.5, 0.5]]) / 6
    np.testing.assert_allclose(grad, want, rtol=10 * EPS[dtype], atol=1e-30)


@pytest.mark.parametrize("shape", [(N, 1), (N,)])
def test_binary_cross_entropy_takes_int_and_bool_labels(backend, rng, shape):
    """0/1 labels as integers or booleans give the loss and gradient of the same labels
    as floats (a one-output model's (n,) labels included)."""
    o = rng.normal(size=(N, 1))
    labels = (rng.uniform(size=shape) > 0.5)
    labels[0] = True
    ob = backend.asarray(o)
    want_loss, want_grad = LOSSES["binary_cross_entropy"](ob, backend.asarray(labels.astype(np.float64)))
    for t in (labels.astype(np.int64), labels.astype(np.int32), labels):
        loss, grad = LOSSES["binary_cross_entropy"](ob, backend.asarray(t))
        assert backend.same_place(loss) and backend.same_place(grad)
        np.testing.assert_array_equal(backend.to_numpy(loss), backend.to_numpy(want_loss))
        np.testing.assert_array_equal(backend.to_numpy(grad), backend.to_numpy(want_grad))
    # and the value itself: -mean(t log p + (1 - t) log(1 - p)) in float64
    p = 1 / (1 + np.exp(-o[:, 0]))
    t = labels.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(backend.to_numpy(want_loss), -np.mean(t * np.log(p) + (1 - t) * np.log1p(-p)),
                               rtol=1e-12 if backend.has_float64 else 1e-6)  # float32 on JAX's 32-bit mode


@pytest.mark.parametrize("name", ["cross_entropy", "binary_cross_entropy"])
def test_huge_logits_match_torch(backend, rng, name):
    """Random huge logits in float32: finite and equal to torch's stable kernels."""
    o = rng.uniform(-80.0, 80.0, size=(N, K))
    t = rng.integers(0, K, size=N) if name == "cross_entropy" else np.round(rng.random((N, K)))
    want_loss, want_grad = torch_oracle(name, o, t, "float32")
    ob, tb, _ = on_backend(backend, o, t, None, "float32")
    loss, grad = LOSSES[name](ob, tb)
    np.testing.assert_allclose(backend.to_numpy(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(grad), want_grad, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- fusion
def test_fused_gradient_equals_unfused_chain(backend, rng):
    """For moderate logits the fused gradients equal loss-of-activation backpropagated
    through the activation's own backward rule."""
    backend.skip_without_float64()  # compared with float64 references at float64 tolerances
    xp = backend.xp
    o = rng.standard_normal((N, K))
    # softmax + cross-entropy: dL/dp = -t / (n p), then the softmax backward
    p = rng.random((N, K))
    p /= p.sum(axis=1, keepdims=True)
    ob, tb, _ = on_backend(backend, o, p, None, "float64")
    _, fused = LOSSES["cross_entropy"](ob, tb)
    y, saved = F.activation_forward("softmax", ob, xp=xp)
    chained = F.activation_backward("softmax", saved, -tb / (y * N), xp=xp)
    np.testing.assert_allclose(
        backend.to_numpy(fused), backend.to_numpy(chained), rtol=1e-10, atol=1e-14
    )
    # sigmoid + binary cross-entropy: dL/ds = (s - t) / (s (1 - s) N)
    t = rng.random((N, K))
    ob, tb, _ = on_backend(backend, o, t, None, "float64")
    _, fused = LOSSES["binary_cross_entropy"](ob, tb)
    s, saved = F.activation_forward("sigmoid", ob, xp=xp)
    chained = F.activation_backward("sigmoid", saved, (s - tb) / (s * (1.0 - s) * (N * K)), xp=xp)
    np.testing.assert_allclose(
        backend.to_numpy(fused), backend.to_numpy(chained), rtol=1e-10, atol=1e-14
    )


# ------------------------------------------------------------------- table, targets
def test_table_and_get_loss(backend, rng):
    assert {name: (row.fused_activation, row.targets) for name, row in LOSSES.items()} == {
        "mse": ("identity", "same_shape"),
        "mae": ("identity", "same_shape"),
        "huber": ("identity", "same_shape"),
        "cross_entropy": ("softmax", "labels_or_probs"),
        "binary_cross_entropy": ("sigmoid", "same_shape"),
        "poisson_nll": (None, "same_shape"),
    }
    for name, row in LOSSES.items():
        assert isinstance(row, Loss) and row.name == name
        assert get_loss(name) is row and get_loss(row) is row
        assert row.fused_activation in (None, *F.ACTIVATIONS)
        o, t = make_data(Case(name, "labels" if name == "cross_entropy" else "values"), rng)
        ob, tb, _ = on_backend(backend, o, t, None, "float64")
        l1, g1 = row(ob, tb)
        l2, g2 = row.fn(ob, tb, xp=backend.xp)
        np.testing.assert_array_equal(backend.to_numpy(l1), backend.to_numpy(l2))
        np.testing.assert_array_equal(backend.to_numpy(g1), backend.to_numpy(g2))
    with pytest.raises(ValueError, match=r"unknown loss 'squared'; known losses: mse, mae, huber"):
        get_loss("squared")
    with pytest.raises(ValueError, match="unknown loss None"):
        get_loss(None)


@pytest.mark.parametrize("name", ["mse", "mae", "huber", "binary_cross_entropy", "poisson_nll"])
def test_column_targets_and_1d_outputs(backend, rng, name):
    o = rng.standard_normal((N, 1))
    t = rng.random((N, 1))
    fn = LOSSES[name].fn
    want_loss, want_grad = fn(backend.asarray(o, "float64"), backend.asarray(t, "float64"))
    # targets (n,) with outputs (n, 1)
    loss, grad = fn(backend.asarray(o, "float64"), backend.asarray(t[:, 0], "float64"))
    assert tuple(grad.shape) == (N, 1)
    np.testing.assert_allclose(backend.to_numpy(loss), backend.to_numpy(want_loss), rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(grad), backend.to_numpy(want_grad), rtol=1e-15)
    # outputs and targets both (n,)
    loss, grad = fn(backend.asarray(o[:, 0], "float64"), backend.asarray(t[:, 0], "float64"))
    assert tuple(grad.shape) == (N,)
    np.testing.assert_allclose(backend.to_numpy(loss), backend.to_numpy(want_loss), rtol=1e-15)
    np.testing.assert_allclose(
        backend.to_numpy(grad), backend.to_numpy(want_grad)[:, 0], rtol=1e-15
    )


@pytest.mark.parametrize("label_dtype", ["int8", "uint8", "int16", "int32", "uint32"])
def test_label_dtypes(backend, rng, label_dtype):
    o = rng.standard_normal((N, K))
    y = rng.integers(0, K, size=N)
    ob = backend.asarray(o, "float32")
    want_loss, want_grad = LOSSES["cross_entropy"](ob, backend.asarray(y, "int64"))
    loss, grad = LOSSES["cross_entropy"](ob, backend.asarray(y, label_dtype))
    np.testing.assert_array_equal(backend.to_numpy(loss), backend.to_numpy(want_loss))
    np.testing.assert_array_equal(backend.to_numpy(grad), backend.to_numpy(want_grad))


def test_huber_delta(backend, rng):
    backend.skip_without_float64()  # compared with float64 references at float64 tolerances
    o = 3.0 * rng.standard_normal((N, K))
    t = rng.standard_normal((N, K))
    torch = pytest.importorskip("torch")
    x = torch.tensor(o, requires_grad=True)
    want = torch.nn.functional.huber_loss(x, torch.tensor(t), delta=2.5)
    want.backward()
    loss, grad = huber(backend.asarray(o, "float64"), backend.asarray(t, "float64"), delta=2.5)
    np.testing.assert_allclose(backend.to_numpy(loss), want.item(), **TOL["float64"])
    np.testing.assert_allclose(backend.to_numpy(grad), x.grad.numpy(), **TOL["float64"])
    with pytest.raises(ValueError, match="delta must be a positive finite number, got -1.0"):
        huber(backend.asarray(o, "float64"), backend.asarray(t, "float64"), delta=-1.0)


@case_param
def test_inputs_not_mutated(backend, rng, case):
    """The numpy-readonly row raises on any write; every row compares before and after."""
    o, t = make_data(case, rng)
    w = make_weights(rng)
    for dtype in DTYPES:
        ob, tb, wb = on_backend(backend, o, t, w, dtype)
        before = [backend.to_numpy(a).copy() for a in (ob, tb, wb)]
        get_loss(case.loss)(ob, tb, sample_weight=wb)
        get_loss(case.loss)(ob, tb)
        for a, b in zip((ob, tb, wb), before):
            np.testing.assert_array_equal(backend.to_numpy(a), b)


# --------------------------------------------------------------------------- errors
def _o(shape=(N, K)):
    return np.random.default_rng(0).standard_normal(shape)


def _y(values):
    return np.asarray(values, dtype=np.int64)


# (id, loss, outputs, targets, sample_weight, pattern)
ERRORS = [
    ("label-too-big", "cross_entropy", _o(), _y([0, 1, 4, 2, 3, 0]), None,
     r"labels must lie in \[0, 4\) for outputs with k=4 classes; found labels in \[0, 4\]"),
    ("label-negative", "cross_entropy", _o(), _y([0, -1, 3, 2, 3, 0]), None,
     r"labels must lie in \[0, 4\).*found labels in \[-1, 3\]"),
    ("int-targets-2d", "cross_entropy", _o(), np.ones((N, K), dtype=np.int64), None,
     r"integer targets must be class labels of shape \(n,\) = \(6,\).*got shape \(6, 4\)"),
    ("prob-shape", "cross_entropy", _o(), np.ones((N, 3)) / 3, None,
     r"probability targets shape \(6, 3\) does not match outputs shape \(6, 4\)"),
    ("float-labels", "cross_entropy", _o(), np.zeros(N), None,
     r"look like labels: convert them to an integer dtype"),
    ("bool-targets-ce", "cross_entropy", _o(), np.zeros(N, dtype=bool), None,
     r"targets must be integer labels .* or float probabilities .* got dtype bool"),
    ("int-targets-bce-not-0-1", "binary_cross_entropy", _o(), np.full((N, K), 2, dtype=np.int64), None,
     r"binary_cross_entropy: integer targets must be the labels 0 and 1, found values in \[2, 2\]"),
    ("int-targets-bce-negative", "binary_cross_entropy", _o(), -np.eye(N, K, dtype=np.int32), None,
     r"integer targets must be the labels 0 and 1, found values in \[-1, 0\]"),
    ("bool-targets-bce-shape", "binary_cross_entropy", _o(), np.zeros((N, K + 1), dtype=bool), None,
     r"targets shape \(6, 5\) does not match outputs shape \(6, 4\)"),
    ("int-targets-mse", "mse", _o(), np.zeros((N, K), dtype=np.int64), None,
     r"mse: needs float targets with the outputs' shape, got integer targets"),
    ("int-counts-poisson", "poisson_nll", _o(), np.zeros((N, K), dtype=np.int32), None,
     r"convert them with xp.astype\(targets, outputs.dtype\)"),
    ("shape-mismatch", "mse", _o(), np.zeros((N, K + 1)), None,
     r"mse: targets shape \(6, 5\) does not match outputs shape \(6, 4\)"),
    ("vector-vs-matrix", "huber", _o(), np.zeros(N), None,
     r"targets shape \(6,\) does not match outputs shape \(6, 4\)"),
    ("column-vs-vector", "mae", _o((N,)), np.zeros((N, 1)), None,
     r"targets shape \(6, 1\) does not match outputs shape \(6,\)"),
    ("empty-batch", "mse", _o((0, K)), np.zeros((0, K)), None,
     r"empty batch: outputs have shape \(0, 4\)"),
    ("empty-batch-ce", "cross_entropy", _o((0, K)), _y([]), None, r"empty batch"),
    ("no-classes", "cross_entropy", _o((N, 0)), _y([0] * N), None,
     r"no elements per sample: shape \(6, 0\)"),
    ("int-outputs", "mse", np.zeros((N, K), dtype=np.int64), np.zeros((N, K)), None,
     r"outputs must have a real floating dtype, got int(64|32)"),  # int32: JAX's 32-bit mode
    ("ce-1d-outputs", "cross_entropy", _o((N,)), _y([0] * N), None,
     r"outputs must be logits of shape \(n, k\), got shape \(6,\)"),
    ("scalar-outputs", "mse", _o(()), np.zeros(()), None, r"outputs must have a batch axis"),
    ("nan-targets", "mse", _o(), np.full((N, K), np.nan), None, r"targets contain NaN or infinity"),
    ("inf-probs", "cross_entropy", _o(), np.full((N, K), np.inf), None,
     r"targets contain NaN or infinity"),
    ("weight-2d", "mse", _o(), np.zeros((N, K)), np.ones((N, 1)),
     r"sample_weight must have shape \(n,\) = \(6,\) to match outputs of shape \(6, 4\), "
     r"got shape \(6, 1\)"),
    ("weight-short", "cross_entropy", _o(), _y([0] * N), np.ones(N - 1),
     r"sample_weight must have shape \(n,\) = \(6,\).*got shape \(5,\)"),
    ("weight-negative", "binary_cross_entropy", _o(), np.zeros((N, K)),
     np.array([1.0, -1.0, 1, 1, 1, 1]),
     r"sample_weight must be non-negative, found minimum -1.0"),
    ("weight-zero", "cross_entropy", _o(), _y([0] * N), np.zeros(N),
     r"sample_weight is all zero; at least one sample needs a positive weight"),
    ("weight-nan", "mse", _o(), np.zeros((N, K)), np.array([1.0, np.nan, 1, 1, 1, 1]),
     r"sample_weight must be finite"),
    ("weight-bool", "mse", _o(), np.zeros((N, K)), np.ones(N, dtype=bool),
     r"sample_weight must be a real number array, got dtype bool"),
]


@pytest.mark.parametrize(
    ("loss", "outputs", "targets", "weight", "pattern"),
    [pytest.param(*e[1:], id=e[0]) for e in ERRORS],
)
def test_errors(backend, loss, outputs, targets, weight, pattern):
    xp = backend.xp
    # reshape: the fixture's torch conversion turns 0-d arrays into 1-d ones
    ob = xp.reshape(backend.asarray(outputs), outputs.shape)
    tb = xp.reshape(backend.asarray(targets), targets.shape)
    wb = None if weight is None else xp.reshape(backend.asarray(weight), weight.shape)
    with pytest.raises(ValueError, match=pattern):
        LOSSES[loss].fn(ob, tb, xp=backend.xp, sample_weight=wb)


def test_mixed_namespaces_or_devices(backend, rng):
    o, t = make_data(Case("mse", "values"), rng)
    ob = backend.asarray(o)
    xp = backend.xp
    default = xp.__array_namespace_info__().default_device()
    if backend.device is not None and str(backend.device) != str(default):
        tb = xp.asarray(backend.to_numpy(backend.asarray(t)), device=default)
        with pytest.raises(ValueError, match=r"mse: targets is on device .* but outputs are on"):
            LOSSES["mse"](ob, tb)
    else:
        import array_api_strict

        other = np.asarray(t) if backend.name == "array_api_strict" else array_api_strict.asarray(t)
        with pytest.raises(TypeError, match="array"):
            LOSSES["mse"](ob, other)


# ----------------------------------------------------------------------- float16
def _needs_float16(backend):
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16")


@pytest.mark.parametrize("name", ["mse", "mae", "huber"])
def test_float16_batch_sums_do_not_overflow(backend, name):
    """256 rows with an error of 16: the squared errors add up to 65536, past float16's
    largest value (65504), yet the mean is 256. Sums over the batch accumulate in
    float32; the loss comes back in float16."""
    _needs_float16(backend)
    n = 256
    o = backend.asarray(np.full((n, 1), 16.0), dtype="float16")
    t = backend.asarray(np.zeros((n, 1)), dtype="float16")
    want = {"mse": 256.0, "mae": 16.0, "huber": 15.5}[name]
    loss, g = get_loss(name)(o, t)
    assert str(loss.dtype).endswith("float16") and float(loss) == want
    # weights of 300 each sum to 76800, also past float16's range
    w = backend.asarray(np.full(n, 300.0), dtype="float16")
    loss_w, g_w = get_loss(name)(o, t, sample_weight=w)
    assert float(loss_w) == want
    np.testing.assert_allclose(backend.to_numpy(g_w).astype(np.float64), backend.to_numpy(g).astype(np.float64),
                               rtol=1e-3)
    assert str(g_w.dtype).endswith("float16")


@pytest.mark.parametrize("form", ["labels", "probs"])
def test_float16_cross_entropy_sums_do_not_overflow(backend, form):
    """Each row's cross-entropy is log(1 + e^9), about 9.0001 (the true class's logit
    is 0, the other's 9): over 8000 rows a float16 sum would pass 65504 and be inf."""
    _needs_float16(backend)
    n, k = 8000, 2
    z = np.zeros((n, k))
    z[:, 1] = 9.0
    labels = np.zeros(n, dtype=np.int64)
    per_row = np.log1p(np.exp(9.0))  # -log softmax(z)_0
    t = labels if form == "labels" else np.eye(k)[labels]
    loss, _ = get_loss("cross_entropy")(backend.asarray(z, dtype="float16"),
                                        backend.asarray(t, dtype=None if form == "labels" else "float16"))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), per_row, rtol=2e-3)


def test_huber_delta_accepts_numpy_scalars_not_bools(backend):
    o = backend.asarray(np.array([[0.0], [3.0]]))
    t = backend.asarray(np.zeros((2, 1)))
    a, _ = huber(o, t, delta=np.float32(0.5))
    b, _ = huber(o, t, delta=0.5)
    assert float(a) == float(b) == pytest.approx(0.5 * (3.0 - 0.25) / 2)  # delta (|e| - delta / 2), mean of 2
    with pytest.raises(ValueError, match="delta must be a positive finite number"):
        huber(o, t, delta=True)


def test_task_is_a_property_of_the_loss():
    assert {name: row.task for name, row in LOSSES.items()} == {
        "mse": "regression", "mae": "regression", "huber": "regression", "cross_entropy": "multiclass",
        "binary_cross_entropy": "multilabel", "poisson_nll": "regression",
    }
    ce = LOSSES["cross_entropy"]
    # a custom loss is a regression loss unless it says otherwise, whatever its name
    assert Loss("cross_entropy", ce.fn, "softmax", "labels_or_probs").task == "regression"
    assert Loss("my_ce", ce.fn, "softmax", "labels_or_probs", task="multiclass").task == "multiclass"
    with pytest.raises(ValueError, match="task must be 'multiclass', 'multilabel' or 'regression', got 'labels'"):
        Loss("my_ce", ce.fn, "softmax", "labels_or_probs", task="labels")
