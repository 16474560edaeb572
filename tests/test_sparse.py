"""Sparse inputs (scipy.sparse on NumPy; sparse torch tensors on torch; cupyx.scipy.sparse
on CuPy where a GPU is present).

Only the first dense layer sees the matrix: its kernels multiply it sparsely, the fit loop
takes row slices of a CSR matrix. Every result is compared with the same computation on
the densified matrix in float64; the matrix itself is never densified, nor written to.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

import arraymlp as am
from arraymlp._backend import as_csr, slice_rows, take_rows
from arraymlp.kernels import REFERENCE, kernels_for

# torch says once per process that its CSR support is in beta
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")

FORMATS = ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "csc_array", "coo_array"]


def _sparse(n=60, d=25, density=0.15, seed=0, kind="csr_matrix"):
    m = sp.random(n, d, density=density, format="csr", random_state=seed, dtype=np.float64)
    m.data = np.random.default_rng(seed).normal(size=m.data.shape)  # signed values
    return getattr(sp, kind)(m)


def _torch_csr(m, device=None):
    """scipy matrix ``m`` as a torch CSR tensor, built from its parts (nothing densified)."""
    import torch

    c = sp.csr_matrix(m)
    crow, col = torch.asarray(c.indptr, dtype=torch.int64), torch.asarray(c.indices, dtype=torch.int64)
    return torch.sparse_csr_tensor(crow, col, torch.asarray(c.data), size=c.shape, device=device or "cpu",
                                   check_invariants=True)


def _sparse_on(backend, m):
    """``m`` as the sparse matrix of ``backend``'s library, or None where it has none."""
    if backend.name == "numpy":
        return m
    if backend.name == "torch":
        return _torch_csr(m, backend.device)
    if backend.name == "cupy":  # pragma: no cover - needs a CUDA device
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix(m)
    return None


@pytest.fixture
def no_densify(monkeypatch):
    """Any attempt to densify a scipy.sparse matrix or array fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a sparse input was densified")

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.csr_array, sp.csc_array, sp.coo_array):
        monkeypatch.setattr(cls, "toarray", refuse)
        monkeypatch.setattr(cls, "todense", refuse)


# ----------------------------------------------------------------------------- kernels
def test_sparse_kernels_match_the_reference_on_dense(backend, rng):
    """dense_forward, dense_relu_forward, dense_backward and dense_sgd_update of the row's
    set, given a sparse x, equal the reference kernels on the densified x. A row without a
    sparse library refuses a scipy.sparse input with a TypeError naming both backends."""
    m = _sparse()
    xs = _sparse_on(backend, m)
    model = am.MLP([25, 4, 2], **backend.model_kwargs(), seed=0)
    if backend.name != "numpy":
        with pytest.raises(TypeError, match="scipy.sparse goes with numpy.*model.to"):
            model(m)
    if backend.name != "torch" and importlib.util.find_spec("torch") is not None:
        with pytest.raises(TypeError, match="sparse torch tensor with torch.*are {}".format(backend.name)):
            model(_torch_csr(m))
    if xs is None:
        return
    xp = backend.xp
    dense = backend.asarray(m.toarray())
    W = backend.asarray(rng.normal(size=(25, 7)))
    b = backend.asarray(rng.normal(size=(7,)))
    dy = backend.asarray(rng.normal(size=(60, 7)))
    ks = kernels_for(xp)
    close = np.testing.assert_allclose
    close(backend.to_numpy(ks.dense_forward(xs, W, b, xp)),
          backend.to_numpy(REFERENCE.dense_forward(dense, W, b, xp)), rtol=1e-13, atol=1e-13)
    close(backend.to_numpy(ks.dense_relu_forward(xs, W, b, xp)),
          backend.to_numpy(REFERENCE.dense_relu_forward(dense, W, b, xp)), rtol=1e-13, atol=1e-13)
    got = ks.dense_backward(xs, W, dy, True, True, xp)
    want = REFERENCE.dense_backward(dense, W, dy, True, True, xp)
    for g, w in zip(got, want):
        close(backend.to_numpy(g), backend.to_numpy(w), rtol=1e-13, atol=1e-13)
    assert ks.dense_backward(xs, W, dy, False, False, xp)[0::2] == (None, None)
    for big in (False, True):  # below and above the size where NumPy's BLAS accumulate applies
        shape = (25, 700) if big else (25, 7)
        Wb = rng.normal(size=shape)
        bb, dyb = rng.normal(size=shape[1:]), rng.normal(size=(60, shape[1]))
        W1, b1 = ks.dense_sgd_update(xs, backend.asarray(dyb), backend.asarray(Wb), backend.asarray(bb), 0.1, 0.01, xp)
        W2, b2 = REFERENCE.dense_sgd_update(dense, backend.asarray(dyb), backend.asarray(Wb), backend.asarray(bb),
                                            0.1, 0.01, xp)
        close(backend.to_numpy(W1), backend.to_numpy(W2), rtol=1e-13, atol=1e-13)
        close(backend.to_numpy(b1), backend.to_numpy(b2), rtol=1e-13, atol=1e-13)
        # independently, in NumPy: W - lr (x.T dy + l2 W)
        close(backend.to_numpy(W1), Wb - 0.1 * (m.toarray().T @ dyb + 0.01 * Wb), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sparse_gradients_match_dense(kind, loss):
    """loss_and_grads on a sparse x equals the same on the densified x (float64), for every
    scipy format; and the first layer's weight gradient is x.T @ delta computed by hand."""
    x = _sparse(kind=kind)
    dense = x.toarray()
    y = np.random.default_rng(1).integers(0, 3, 60) if loss == "cross_entropy" else \
        np.random.default_rng(1).normal(size=(60, 3))
    model = am.MLP([25, 9, 3], activation="tanh", backend="numpy", dtype="float64", seed=0)
    value_s, grads_s = model.loss_and_grads(x, y, loss=loss, l2=0.01)
    value_d, grads_d = model.loss_and_grads(dense, y, loss=loss, l2=0.01)
    assert float(value_s) == pytest.approx(float(value_d), rel=1e-14)
    for gs, gd in zip(grads_s, grads_d):
        assert gs.keys() == gd.keys()
        for k in gs:
            assert type(gs[k]) is np.ndarray
            np.testing.assert_allclose(gs[k], gd[k], rtol=1e-12, atol=1e-14)
    # the first layer's dW by hand: backpropagate d_out through the second layer and tanh
    W1, b1 = model.params[0]["W"], model.params[0]["b"]
    W2, b2 = model.params[2]["W"], model.params[2]["b"]
    h = np.tanh(dense @ W1 + b1)
    out = h @ W2 + b2
    if loss == "cross_entropy":
        p = np.exp(out - out.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d_out = (p - np.eye(3)[y]) / 60
    else:
        d_out = 2 * (out - y) / y.size
    d_h = (d_out @ W2.T) * (1 - h**2)
    np.testing.assert_allclose(grads_s[0]["W"], dense.T @ d_h + 0.01 * W1, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_and_predict_on_sparse_equal_dense(optimizer, no_densify):
    """fit (shuffled batches, a validation split, plain SGD fused into backpropagation or
    Adam) and predict on a CSC input give the parameters and outputs of the same run on
    the densified matrix; nothing densifies the input and it is left as it was."""
    x = _sparse(n=300, d=40, kind="csc_matrix")
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    coo = x.tocoo()  # the reference run's dense matrix, built without toarray (refused here)
    dense = np.zeros(x.shape)
    dense[coo.row, coo.col] = coo.data
    y = np.random.default_rng(0).integers(0, 3, 300)
    kw = dict(loss="cross_entropy", optimizer=optimizer, lr=0.05, epochs=3, batch_size=32, progress=False, seed=1,
              validation_split=0.1)
    a = am.MLP([40, 16, 3], backend="numpy", dtype="float64", seed=0)
    b = am.MLP([40, 16, 3], backend="numpy", dtype="float64", seed=0)
    ha, hb = a.fit(x, y, **kw), b.fit(dense, y, **kw)
    np.testing.assert_allclose(ha.loss, hb.loss, rtol=1e-12)
    np.testing.assert_allclose(ha.val_loss, hb.val_loss, rtol=1e-12)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.predict_proba(x), b.predict_proba(dense), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(a.predict(x.tocoo()), b.predict(dense))
    for got, want in zip((x.data, x.indices, x.indptr), before):
        np.testing.assert_array_equal(got, want)


def test_sparse_float32_model_and_errors():
    """A float64 matrix is cast to a float32 model's dtype (its stored values only); integer
    matrices, non-finite stored values and a first layer other than Dense are refused."""
    x = _sparse()
    model = am.MLP([25, 4, 2], backend="numpy", seed=0)
    out = model(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, model(x.toarray().astype(np.float32)), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="floating-point"):
        model(sp.csr_matrix(np.eye(25, dtype=np.int64)))
    bad = x.copy()
    bad.data[3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad)
    with pytest.raises(ValueError, match="24 features but the model expects 25"):
        model(_sparse(d=24))
    seq = am.Sequential([am.Dropout(0.1), am.Dense(25, 2)], backend="numpy", seed=0)
    with pytest.raises(TypeError, match="only a first Dense layer"):
        seq(x)


def test_sparse_input_is_refused_by_name_while_the_reference_kernels_are_forced(monkeypatch):
    """The reference kernels are the standard's dense operations: with them forced, a sparse
    input is refused up front (naming the setting), not failed deep inside a product."""
    import arraymlp.kernels as K

    x, y = _sparse(), np.arange(60) % 2
    model = am.MLP([25, 4, 2], backend="numpy", seed=0)
    dense = model(x.toarray())
    monkeypatch.setattr(K, "_forced", True)
    for call in (lambda: model(x), lambda: model.fit(x, y, epochs=1, progress=False)):
        with pytest.raises(TypeError, match="ARRAYMLP_KERNELS=reference"):
            call()
    np.testing.assert_array_equal(model(x.toarray()), dense)  # dense input: the same answer


# ------------------------------------------------------------- sparse torch tensors
def _torch():
    return pytest.importorskip("torch")


def _torch_layout(m, layout):
    """scipy matrix ``m`` as a torch tensor of ``layout``, built from its parts."""
    torch = _torch()
    if layout == "csr":
        return _torch_csr(m)
    c = sp.coo_matrix(m)
    coo = torch.sparse_coo_tensor(torch.asarray(np.vstack([c.row, c.col]).astype(np.int64)), torch.asarray(c.data),
                                  size=c.shape, check_invariants=True)
    if layout == "coo":
        return coo
    if layout == "coo-duplicates":  # every entry split in two halves, uncoalesced
        idx = torch.asarray(np.hstack([np.vstack([c.row, c.col])] * 2).astype(np.int64))
        return torch.sparse_coo_tensor(idx, torch.asarray(np.hstack([c.data * 0.25, c.data * 0.75])), size=c.shape,
                                       check_invariants=True)
    return coo.coalesce().to_sparse_csc()


def _parts(t):
    """Copies of a sparse torch tensor's index and value arrays (to check it was not written to)."""
    torch = _torch()
    if t.layout is torch.sparse_csr:
        return [t.crow_indices().clone(), t.col_indices().clone(), t.values().clone()]
    if t.layout is torch.sparse_csc:
        return [t.ccol_indices().clone(), t.row_indices().clone(), t.values().clone()]
    return [t._indices().clone(), t._values().clone()]


@pytest.fixture
def no_torch_densify(monkeypatch):
    """Densifying a torch tensor (``to_dense``) fails the test."""
    torch = _torch()

    def refuse(self, *args, **kwargs):
        raise AssertionError("a sparse tensor was densified")

    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)


def test_torch_csr_row_selection_matches_dense(rng):
    """Row slices and row gathers (repeats, empty rows, an empty selection) of a torch CSR
    tensor hold exactly the dense matrix's rows; int32 row offsets work alike."""
    torch = _torch()
    m = _sparse(n=40, d=9, density=0.2)
    m = sp.csr_matrix(m.multiply(np.arange(40)[:, None] % 5 != 0))  # every fifth row empty
    dense = m.toarray()
    for x in (_torch_csr(m), torch.sparse_csr_tensor(torch.asarray(m.indptr.astype(np.int32)),
                                                     torch.asarray(m.indices.astype(np.int32)),
                                                     torch.asarray(m.data), size=m.shape, check_invariants=True)):
        for start, stop in ((0, 40), (3, 17), (5, 6), (39, 40), (7, 7)):
            part = slice_rows(x, start, stop)
            assert part.layout is torch.sparse_csr and tuple(part.shape) == (stop - start, 9)
            np.testing.assert_array_equal(part.to_dense().numpy(), dense[start:stop])
        for idx in (rng.permutation(40), np.array([5, 5, 0, 39, 10]), np.array([], dtype=np.int64)):
            part = take_rows(x, torch.asarray(idx), None)
            assert part.layout is torch.sparse_csr
            np.testing.assert_array_equal(part.to_dense().numpy(), dense[idx])


@pytest.mark.parametrize("layout", ["csr", "csc", "coo", "coo-duplicates"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_torch_sparse_gradients_match_dense(layout, loss):
    """loss_and_grads and loss on a sparse torch tensor (CSR, CSC, COO, an uncoalesced COO)
    equal the same on the dense tensor in float64; the first layer's weight gradient is
    x.T @ delta computed by hand in NumPy; the tensor is left as it was."""
    torch = _torch()
    m = _sparse()
    dense = m.toarray()
    x = _torch_layout(m, layout)
    before = _parts(x)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60) if loss == "cross_entropy" else rng.normal(size=(60, 3))
    yt = torch.asarray(y)
    model = am.MLP([25, 9, 3], activation="tanh", backend="torch", dtype="float64", seed=0)
    value_s, grads_s = model.loss_and_grads(x, yt, loss=loss, l2=0.01)
    value_d, grads_d = model.loss_and_grads(torch.asarray(dense), yt, loss=loss, l2=0.01)
    assert float(value_s) == pytest.approx(float(value_d), rel=1e-14)
    assert float(model.loss(x, yt, loss=loss)) == pytest.approx(float(model.loss(torch.asarray(dense), yt, loss=loss)),
                                                                 rel=1e-14)
    for gs, gd in zip(grads_s, grads_d):
        assert gs.keys() == gd.keys()
        for k in gs:
            assert gs[k].layout is torch.strided
            np.testing.assert_allclose(gs[k].numpy(), gd[k].numpy(), rtol=1e-12, atol=1e-14)
    W1, b1 = model.params[0]["W"].numpy(), model.params[0]["b"].numpy()
    W2, b2 = model.params[2]["W"].numpy(), model.params[2]["b"].numpy()
    h = np.tanh(dense @ W1 + b1)
    out = h @ W2 + b2
    if loss == "cross_entropy":
        p = np.exp(out - out.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d_out = (p - np.eye(3)[y]) / 60
    else:
        d_out = 2 * (out - y) / y.size
    d_h = (d_out @ W2.T) * (1 - h**2)
    np.testing.assert_allclose(grads_s[0]["W"].numpy(), dense.T @ d_h + 0.01 * W1, rtol=1e-10, atol=1e-14)
    for got, want in zip(_parts(x), before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_torch_fit_predict_evaluate_on_sparse_equal_dense(optimizer, no_torch_densify):
    """fit (shuffled batches, a validation split; SGD fused into backpropagation, or Adam),
    predict, predict_proba and evaluate on a torch CSR tensor give the values of the same
    calls on the dense tensor; nothing densifies the input and it is left as it was."""
    torch = _torch()
    m = _sparse(n=300, d=40)
    x = _torch_csr(m)
    before = _parts(x)
    dense = torch.asarray(m.toarray())
    y = torch.asarray(np.random.default_rng(0).integers(0, 3, 300))
    kw = dict(loss="cross_entropy", optimizer=optimizer, lr=0.05, epochs=3, batch_size=32, progress=False, seed=1,
              validation_split=0.1)
    a = am.MLP([40, 16, 3], backend="torch", dtype="float64", seed=0)
    b = am.MLP([40, 16, 3], backend="torch", dtype="float64", seed=0)
    ha, hb = a.fit(x, y, **kw), b.fit(dense, y, **kw)
    np.testing.assert_allclose(ha.loss, hb.loss, rtol=1e-12)
    np.testing.assert_allclose(ha.val_loss, hb.val_loss, rtol=1e-12)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k].numpy(), pb[k].numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.predict_proba(x).numpy(), b.predict_proba(dense).numpy(), rtol=1e-12, atol=1e-15)
    assert torch.equal(a.predict(x), b.predict(dense))
    ea, eb = a.evaluate(x, y, batch_size=70), b.evaluate(dense, y, batch_size=70)
    assert ea.keys() == eb.keys() == {"loss", "accuracy"}
    assert ea["loss"] == pytest.approx(eb["loss"], rel=1e-13)
    assert ea["accuracy"] == eb["accuracy"] == float((b.predict(dense) == y).double().mean())
    for got, want in zip(_parts(x), before):
        assert torch.equal(got, want)


def test_torch_sparse_float32_model_and_errors():
    """A float64 tensor is cast to a float32 model's dtype (its stored values only); integer
    values, non-finite stored values, a wrong feature count, a block layout and a first
    layer other than Dense are refused."""
    torch = _torch()
    m = _sparse()
    x = _torch_csr(m)
    model = am.MLP([25, 4, 2], backend="torch", seed=0)
    out = model(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), model(torch.asarray(m.toarray(), dtype=torch.float32)).numpy(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.eye(25, dtype=torch.int64).to_sparse_csr())
    bad = _torch_csr(m)
    bad.values()[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad)
    with pytest.raises(ValueError, match="24 features but the model expects 25"):
        model(_torch_csr(_sparse(d=24)))
    with pytest.raises(TypeError, match="layout torch.sparse_bsr is not supported; use CSR, CSC or COO"):
        model(torch.asarray(m.toarray()).to_sparse_bsr((1, 1)))
    seq = am.Sequential([am.Dropout(0.1), am.Dense(25, 2)], backend="torch", seed=0)
    with pytest.raises(TypeError, match="only a first Dense layer"):
        seq(x)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_torch_sparse_into_the_estimator_equals_dense():
    """MLPClassifier (early stopping: the validation rows are gathered from the CSR tensor)
    fitted on a torch CSR tensor equals the fit on the dense tensor, in float64."""
    torch = _torch()
    from arraymlp.sklearn import MLPClassifier

    m = _sparse(n=200, d=30)
    y = np.random.default_rng(0).integers(0, 3, 200)
    kw = dict(hidden_layer_sizes=(8,), max_iter=6, random_state=0, early_stopping=True, n_iter_no_change=20)
    a = MLPClassifier(**kw).fit(_torch_csr(m), y)
    b = MLPClassifier(**kw).fit(torch.asarray(m.toarray()), y)
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-12)
    np.testing.assert_allclose(a.validation_scores_, b.validation_scores_, rtol=1e-12)
    for ca, cb in zip(a.coefs_, b.coefs_):
        np.testing.assert_allclose(np.asarray(ca), np.asarray(cb), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.predict_proba(_torch_csr(m)).numpy(),
                               b.predict_proba(torch.asarray(m.toarray())).numpy(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------- canonical form (the CuPy path's guard)
class _SortsInPlace(sp.csr_matrix):
    """A scipy CSR matrix whose product with a dense matrix first sums and sorts its own
    entries in place, as cupyx.scipy.sparse's does (its ``__matmul__`` calls the in-place
    ``sum_duplicates``): the one point where the CuPy path differs from scipy's."""

    def __matmul__(self, other):
        self.sum_duplicates()
        return super().__matmul__(other)


def _non_canonical(m):
    """``m`` (CSR) with each row's entries reversed and its first stored entry split in two."""
    rows, cols, vals = [], [], []
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        rows += [i] * (hi - lo)
        cols += list(m.indices[lo:hi][::-1])
        vals += list(m.data[lo:hi][::-1])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m.shape[0]))])
    indices, data = np.array(cols, dtype=np.int32), np.array(vals)
    k = int(np.argmax(np.diff(indptr) > 0))  # the first row with an entry: split it
    at = indptr[k]
    indices = np.insert(indices, at, indices[at])
    data = np.insert(data, at, 0.5 * data[at])
    data[at + 1] *= 0.5
    indptr[k + 1:] += 1
    return _SortsInPlace((data, indices, indptr), shape=m.shape)


def test_non_canonical_csr_is_copied_before_a_product_that_sorts_in_place():
    """A CSR matrix with unsorted column indices and a duplicate, whose product sorts it in
    place (as cupyx's does), is copied into canonical form once: fitting and predicting
    leave the caller's arrays exactly as they were and give the dense run's values; a
    canonical CSR matrix is taken as it is."""
    m = _sparse(n=200, d=30)
    x = _non_canonical(m)
    assert not x.has_canonical_format
    np.testing.assert_allclose(x.toarray(), m.toarray(), rtol=1e-15, atol=0)
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    ready = as_csr(x, np.float64)
    assert ready is not x and ready.has_canonical_format
    assert as_csr(m, np.float64) is m
    y = np.random.default_rng(0).integers(0, 3, 200)
    kw = dict(loss="cross_entropy", optimizer="sgd", lr=0.05, epochs=2, batch_size=32, progress=False, seed=1,
              validation_split=0.1)
    a = am.MLP([30, 8, 3], backend="numpy", dtype="float64", seed=0)
    b = am.MLP([30, 8, 3], backend="numpy", dtype="float64", seed=0)
    ha, hb = a.fit(x, y, **kw), b.fit(m.toarray(), y, **kw)
    np.testing.assert_allclose(ha.loss, hb.loss, rtol=1e-12)
    np.testing.assert_allclose(a.predict_proba(x), b.predict_proba(m.toarray()), rtol=1e-12, atol=1e-15)
    for got, want in zip((x.data, x.indices, x.indptr), before):
        np.testing.assert_array_equal(got, want)
    # without the copy the product itself rewrites the caller's matrix (what the copy prevents)
    x @ np.ones((30, 2))
    assert x.has_canonical_format and not np.array_equal(x.indices, before[1])


# ---------------------------------------------------------------------- ensembles (K members)
@pytest.mark.parametrize("shape, density", [((60, 25), 0.15), ((40, 600), 0.01), ((8, 30), 0.0)],
                         ids=["most-features", "wide", "no-entries"])
def test_sparse_kernels_with_stacked_members_match_dense(backend, rng, shape, density):
    """An ensemble's stacked weights (K, n_in, n_out), biases (K, 1, n_out) and output
    gradients (K, n, n_out) with a sparse x: dense_forward, dense_relu_forward,
    dense_backward and dense_sgd_update equal the reference kernels on the densified x,
    and member k's products equal x @ W[k] and x.T @ dy[k] computed one by one in NumPy;
    for a batch that touches most features, a wide one that touches few (its weight
    gradient is one sparse product over the touched rows) and one with no entries."""
    n, d = shape
    m = _sparse(n=n, d=d, density=density)
    xs = _sparse_on(backend, m)
    if xs is None:
        model = am.MLP([d, 4, 2], **backend.model_kwargs(), seed=0, ensemble=3)
        with pytest.raises(TypeError, match="numpy"):
            model(m)
        return
    xp = backend.xp
    K = 3
    dense_np = m.toarray()
    dense = backend.asarray(dense_np)
    W_np, b_np, dy_np = rng.normal(size=(K, d, 7)), rng.normal(size=(K, 1, 7)), rng.normal(size=(K, n, 7))
    W, b, dy = backend.asarray(W_np), backend.asarray(b_np), backend.asarray(dy_np)
    ks = kernels_for(xp)
    close = np.testing.assert_allclose
    y = backend.to_numpy(ks.dense_forward(xs, W, b, xp))
    assert y.shape == (K, n, 7)
    close(y, backend.to_numpy(REFERENCE.dense_forward(dense, W, b, xp)), rtol=1e-13, atol=1e-13)
    close(y, np.stack([dense_np @ W_np[k] + b_np[k] for k in range(K)]), rtol=1e-12, atol=1e-12)
    close(backend.to_numpy(ks.dense_relu_forward(xs, W, b, xp)), np.maximum(y, 0.0), rtol=1e-13, atol=1e-13)
    dx, dW, db = ks.dense_backward(xs, W, dy, True, False, xp)
    assert dx is None and tuple(dW.shape) == (K, d, 7) and tuple(db.shape) == (K, 1, 7)
    _, dW_ref, db_ref = REFERENCE.dense_backward(dense, W, dy, True, False, xp)
    dW_np = np.stack([dense_np.T @ dy_np[k] for k in range(K)])
    close(backend.to_numpy(dW), backend.to_numpy(dW_ref), rtol=1e-13, atol=1e-13)
    close(backend.to_numpy(dW), dW_np, rtol=1e-12, atol=1e-12)
    close(backend.to_numpy(db), backend.to_numpy(db_ref), rtol=1e-13, atol=1e-13)
    W1, b1 = ks.dense_sgd_update(xs, dy, backend.asarray(W_np), backend.asarray(b_np), 0.1, 0.01, xp)
    close(backend.to_numpy(W1), W_np - 0.1 * (dW_np + 0.01 * W_np), rtol=1e-12, atol=1e-12)
    close(backend.to_numpy(b1), b_np - 0.1 * dy_np.sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ensemble_fit_on_sparse_equals_dense(optimizer, no_densify):
    """An ensemble (K = 3) fitted on a CSR input (shuffled batches, per-member sample
    weights and rates, a validation split with per-member early stopping) gives the
    losses, parameters and predictions of the same fit on the densified matrix; the input
    is neither densified nor changed."""
    x = _sparse(n=200, d=30, kind="csr_matrix")
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    coo = x.tocoo()
    dense = np.zeros(x.shape)
    dense[coo.row, coo.col] = coo.data
    y = np.random.default_rng(0).integers(0, 3, 200)
    w = np.random.default_rng(1).uniform(0.0, 2.0, size=(3, 200))
    kw = dict(loss="cross_entropy", optimizer=optimizer, lr=[0.05, 0.02, 0.1], epochs=6, batch_size=32,
              progress=False, seed=1, validation_split=0.2, early_stopping=1, sample_weight=w, l2=0.01)
    a = am.MLP([30, 8, 3], backend="numpy", dtype="float64", seed=0, ensemble=3)
    b = am.MLP([30, 8, 3], backend="numpy", dtype="float64", seed=0, ensemble=3)
    ha, hb = a.fit(x, y, **kw), b.fit(dense, y, **kw)
    np.testing.assert_allclose(np.asarray(ha.loss), np.asarray(hb.loss), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ha.val_loss), np.asarray(hb.val_loss), rtol=1e-12)
    np.testing.assert_array_equal(ha.stopped_epoch, hb.stopped_epoch)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a(x), b(dense), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.predict_proba(x, reduce=None), b.predict_proba(dense, reduce=None), rtol=1e-12,
                               atol=1e-15)
    for got, want in zip((x.data, x.indices, x.indptr), before):
        np.testing.assert_array_equal(got, want)


def test_torch_sparse_ensemble_fit_equals_dense(no_torch_densify):
    """An ensemble (K = 3) on torch fitted on a CSR tensor (shuffled batches, per-member
    rates, a validation split with per-member early stopping) gives the losses,
    parameters and members' probabilities of the fit on the dense tensor; the tensor is
    neither densified nor changed."""
    torch = _torch()
    m = _sparse(n=200, d=30)
    x = _torch_csr(m)
    before = _parts(x)
    dense = torch.asarray(m.toarray())
    y = torch.asarray(np.random.default_rng(0).integers(0, 3, 200))
    kw = dict(loss="cross_entropy", optimizer="adam", lr=[0.05, 0.02, 0.1], epochs=4, batch_size=32,
              progress=False, seed=1, validation_split=0.2, early_stopping=1)
    a = am.MLP([30, 8, 3], backend="torch", dtype="float64", seed=0, ensemble=3)
    b = am.MLP([30, 8, 3], backend="torch", dtype="float64", seed=0, ensemble=3)
    ha, hb = a.fit(x, y, **kw), b.fit(dense, y, **kw)
    np.testing.assert_allclose(np.asarray(ha.loss), np.asarray(hb.loss), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ha.val_loss), np.asarray(hb.val_loss), rtol=1e-12)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k].numpy(), pb[k].numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.predict_proba(x, reduce=None).numpy(), b.predict_proba(dense, reduce=None).numpy(),
                               rtol=1e-12, atol=1e-15)
    for got, want in zip(_parts(x), before):
        assert torch.equal(got, want)
