"""The hot path's in-place kernels and backend fast paths, held to the standard path on
every backend row: same values (bit for bit where the operations are the same), inputs
the caller did not hand over left untouched."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import is_writeable_array

import arraymlp as am
from arraymlp import functional as F
from arraymlp import layers as L
from arraymlp import losses as LS
from arraymlp.kernels import kernels_for, reference_kernels
from arraymlp.kernels import reference as R
from arraymlp.optim import SGD

# the float64 cases also run on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True
# on the 32-bit jax row, the float64-only tests run on float32 data, at float32 tolerances
FLOAT64_DATA = "float32"

INPLACE_ROWS = [name for name, act in F.ACTIVATIONS.items()
                if act.forward_inplace is not None or act.backward_inplace is not None]


def _data(backend, shape, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return r.standard_normal(shape).astype(dtype)


def _fresh(backend, a):
    """A writeable array of the row's namespace, as the library would make one."""
    xp = backend.xp
    return xp.asarray(backend.asarray(a), copy=True)


@pytest.mark.parametrize("name", INPLACE_ROWS)
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inplace_activations_match_the_standard_path(backend, name, fast, dtype):
    act = F.ACTIVATIONS[name]
    xp = backend.xp
    x_np = _data(backend, (7, 33), dtype=dtype)
    x_np[0, :3] = [0.0, -0.0, 1e-30]  # relu's kink, signed zero, a tiny positive
    dy_np = _data(backend, (7, 33), seed=1, dtype=dtype)
    x = backend.asarray(x_np)
    y_ref = act.forward(x, xp=xp)
    saved = y_ref if act.saves == "output" else x
    dx_ref = act.backward(backend.asarray(dy_np), saved, xp)
    row = kernels_for(xp).activations[name] if fast else act  # the backend's set, or the reference
    if act.forward_inplace is not None:
        buf = _fresh(backend, x_np)
        y = row.forward_inplace(buf, xp)
        np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))
        if fast and f"{name}_forward_inplace" in kernels_for(xp).overrides and is_writeable_array(buf):
            assert y is buf  # the fast paths compute into the buffer they were handed
    if act.backward_inplace is not None and act.backward_inplace is not R._identity_bw:
        buf = _fresh(backend, dy_np)
        dx = row.backward_inplace(buf, saved, xp)
        np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(dx_ref))
    # the arrays that were not handed over are unchanged
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)


def test_inplace_forward_only_for_rows_that_save_their_output():
    with pytest.raises(ValueError, match="overwrites the input its backward reads"):
        F.Activation("bad", F.gelu, F.ACTIVATIONS["gelu"].backward, "input", True, lambda x, xp: x)


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_activation_functions_take_inplace(backend, name):
    xp = backend.xp
    x_np = _data(backend, (5, 6))
    y_ref, saved_ref = F.activation_forward(name, backend.asarray(x_np), xp=xp)
    y, saved = F.activation_forward(name, _fresh(backend, x_np), xp=xp, inplace=True)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))
    dy_np = _data(backend, (5, 6), seed=2)
    dx_ref = F.activation_backward(name, saved_ref, backend.asarray(dy_np), xp=xp)
    dx = F.activation_backward(name, saved, _fresh(backend, dy_np), xp=xp, inplace=True)
    np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(dx_ref))


# ----------------------------------------------------------------------------- handing over
class ReluNoInplace(am.Activation):
    """A subclass whose backward does not take ``inplace=``: it must never get it."""

    def __init__(self):
        super().__init__("relu")

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        return super().backward(params, cache, dy, xp=xp, need_dx=need_dx)


class DenseView(am.Dense):
    """Overrides forward (returning a view): the inherited fresh_output is not trusted."""

    def forward(self, params, x, *, training, rng, xp):
        y, cache = super().forward(params, x, training=training, rng=rng, xp=xp)
        return y, cache


def test_handover_is_read_from_the_class_that_runs():
    assert L.handover(am.Dense(2, 3)) == L.Handover(False, False, True, True)
    assert L.handover(am.ReLU()) == L.Handover(True, True, False, False)
    assert L.handover(ReluNoInplace()).backward_inplace is False
    assert L.handover(DenseView(2, 3)).fresh_output is False
    assert L.handover(DenseView(2, 3)).fresh_dx is True
    assert L.handover(am.Dropout(0.5)) == L.Handover(False, False, False, False)


def test_model_with_in_place_layers_matches_one_without(backend):
    xp = backend.xp
    kwargs = dict(dtype=backend.float_dtype(), seed=4, **backend.model_kwargs())
    a = am.MLP([6, 9, 7, 4], activation="relu", output_activation="softmax", **kwargs)
    b = am.Sequential([am.Dense(6, 9, init="he_uniform"), ReluNoInplace(), am.Dense(9, 7, init="he_uniform"),
                       ReluNoInplace(), am.Dense(7, 4, init="glorot_uniform"), am.Softmax()], **kwargs)
    b.params = [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in a.params]
    x_np = _data(backend, (11, 6), dtype=backend.float_dtype())
    y = backend.asarray(np.arange(11) % 4)
    x = backend.asarray(x_np)
    la, ga = a.loss_and_grads(x, y, loss="cross_entropy")
    lb, gb = b.loss_and_grads(x, y, loss="cross_entropy")
    assert float(la) == float(lb)
    for pa, pb in zip(ga, gb):
        for k in pa:
            np.testing.assert_allclose(backend.to_numpy(pa[k]), backend.to_numpy(pb[k]), rtol=1e-14, atol=1e-16)
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)  # the input was not handed over
    # the caches hold what the backward pass needs: the ReLU outputs, not overwritten later
    out, caches = a.forward(x, training=True)
    relu_out = backend.to_numpy(caches[1])
    assert (relu_out >= 0).all()
    np.testing.assert_allclose(relu_out, np.maximum(x_np @ backend.to_numpy(a.params[0]["W"])
                                                    + backend.to_numpy(a.params[0]["b"]), 0), rtol=1e-12)


def test_backward_does_not_overwrite_a_gradient_it_was_not_handed(backend):
    model = am.MLP([4, 5, 3], dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
    x = backend.asarray(_data(backend, (6, 4), dtype=backend.float_dtype()))
    out, caches = model.forward(x, training=True)
    dy_np = _data(backend, (6, 3), seed=3, dtype=backend.float_dtype())
    dy = backend.asarray(dy_np)
    model.backward(caches, dy)
    np.testing.assert_array_equal(backend.to_numpy(dy), dy_np)


# ----------------------------------------------------------------------------- optimiser
@pytest.mark.parametrize("n", [5, 40_000, 2 * 65_536 + 3])
def test_sgd_update_is_exactly_p_minus_lr_g_at_every_size(backend, n):
    xp = backend.xp
    p_np = _data(backend, (n,), dtype=np.float32)
    g_np = _data(backend, (n,), seed=1, dtype=np.float32)
    W_np = _data(backend, (n // 5 + 1, 5), seed=2, dtype=np.float32)
    gW_np = _data(backend, W_np.shape, seed=3, dtype=np.float32)
    params = [{"W": _fresh(backend, W_np), "b": _fresh(backend, p_np)}]
    grads = [{"W": backend.asarray(gW_np), "b": backend.asarray(g_np)}]
    opt = SGD(lr=0.037)
    for _ in range(2):
        params = opt.step(params, grads)
        p_np = p_np - np.float32(0.037) * g_np
        W_np = W_np - np.float32(0.037) * gW_np
        np.testing.assert_array_equal(backend.to_numpy(params[0]["b"]), p_np)
        np.testing.assert_array_equal(backend.to_numpy(params[0]["W"]), W_np)
    np.testing.assert_array_equal(backend.to_numpy(grads[0]["b"]), g_np)  # gradients untouched
    assert xp.isdtype(params[0]["W"].dtype, "real floating")


def test_sgd_momentum_buffer_matches_the_standard_update(backend):
    n, dtype = 40_000, backend.float_dtype()  # float32 on JAX's 32-bit mode
    p_np = _data(backend, (n,), dtype=dtype)
    gs = [_data(backend, (n,), seed=s, dtype=dtype) for s in range(1, 4)]
    params = [{"b": _fresh(backend, p_np)}]
    opt = SGD(lr=0.1, momentum=0.9, dampening=0.25)
    buf = None
    for g_np in gs:
        params = opt.step(params, [{"b": backend.asarray(g_np)}])
        buf = g_np.copy() if buf is None else buf * 0.9 + 0.75 * g_np
        p_np = p_np - 0.1 * buf
        np.testing.assert_array_equal(backend.to_numpy(params[0]["b"]), p_np)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_fast_path_matches_the_standard_path(backend, weighted):
    xp = backend.xp
    dtype = backend.float_dtype()  # float32 on JAX's 32-bit mode
    o_np = _data(backend, (9, 5), dtype=dtype) * 3
    o_np[2, 1] = -1e300 if dtype == "float64" else -3e38  # a logit far below the others, not the label
    y = backend.asarray(np.array([0, 1, 2, 3, 4, 0, 1, 2, 3]))
    w = backend.asarray(np.linspace(0.5, 2.0, 9).astype(dtype)) if weighted else None
    o = backend.asarray(o_np)
    fast = LS.cross_entropy(o, y, xp=xp, sample_weight=w)
    with reference_kernels():
        std = LS.cross_entropy(o, y, xp=xp, sample_weight=w)
    # the float-target path, the original formulation, as a third opinion
    onehot = backend.asarray(np.eye(5, dtype=dtype)[[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    ref = LS.cross_entropy(o, onehot, xp=xp, sample_weight=w)
    for a in (fast, std):
        assert float(a[0]) == pytest.approx(float(ref[0]), rel=backend.tol(1e-14))
        np.testing.assert_allclose(backend.to_numpy(a[1]), backend.to_numpy(ref[1]),
                                   rtol=backend.tol(1e-13), atol=backend.tol(1e-16))
    np.testing.assert_array_equal(backend.to_numpy(o), o_np)


def test_cross_entropy_labels_ignore_a_masked_logit(backend):
    o_np = _data(backend, (3, 4), dtype=backend.float_dtype())
    o_np[1, 2] = -np.inf
    loss, g = LS.cross_entropy(backend.asarray(o_np), backend.asarray(np.array([0, 1, 3])), xp=backend.xp)
    assert np.isfinite(float(loss))
    g_np = backend.to_numpy(g)
    assert np.isfinite(g_np).all() and g_np[1, 2] == 0.0


@pytest.mark.parametrize("loss", sorted(LS.LOSSES))
def test_unchecked_losses_give_the_checked_values(backend, loss):
    xp = backend.xp
    o = backend.asarray(_data(backend, (6, 3), dtype=backend.float_dtype()))
    if loss == "cross_entropy":
        t = backend.asarray(np.array([0, 2, 1, 1, 0, 2]))
    else:
        t = backend.asarray(np.abs(_data(backend, (6, 3), seed=5, dtype=backend.float_dtype())))
    a = LS.LOSSES[loss](o, t, xp=xp)
    b = LS.LOSSES[loss](o, t, xp=xp, check=False)
    assert float(a[0]) == float(b[0])
    np.testing.assert_array_equal(backend.to_numpy(a[1]), backend.to_numpy(b[1]))


def test_training_step_validates_targets_once_up_front(backend):
    model = am.MLP([3, 4, 2], dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
    x = backend.asarray(_data(backend, (8, 3), dtype=backend.float_dtype()))
    y_np = _data(backend, (8, 2), seed=1, dtype=backend.float_dtype())
    y_np[5, 1] = np.nan
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        model.fit(x, backend.asarray(y_np), epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        model.loss_and_grads(x, backend.asarray(y_np))
    labels = backend.asarray(np.array([0, 1, 2, 0, 1, 0, 1, 0]))
    clf = am.MLP([3, 4, 2], output_activation="softmax", dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        clf.fit(x, labels, loss="cross_entropy", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        clf.loss_and_grads(x, labels, loss="cross_entropy")


# ------------------------------------------------------------- the fused plain SGD step
def _sgd_reference(x, dy, W, b, lr, l2):
    """``W - lr * (x.T @ dy + l2 * W)``, ``b - lr * sum(dy)`` in float64 on the host."""
    x, dy, W = (np.asarray(a, dtype=np.float64) for a in (x, dy, W))
    W_ref = W - lr * (x.T @ dy + l2 * W)
    b_ref = None if b is None else np.asarray(b, dtype=np.float64) - lr * dy.sum(axis=0)
    return W_ref, b_ref


@pytest.mark.parametrize("shape", [(6, 5), (160, 130)], ids=["small", "blas-sized"])
@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_sgd_update_is_the_gradient_step(backend, shape, l2, bias, dtype):
    xp = backend.xp
    n_in, n_out = shape
    x_np, dy_np = _data(backend, (9, n_in), 1, dtype), _data(backend, (9, n_out), 2, dtype)
    W_np, b_np = _data(backend, shape, 3, dtype), _data(backend, (n_out,), 4, dtype)
    x, dy = backend.asarray(x_np), backend.asarray(dy_np)  # the caller's: read-only on that row
    W, b = _fresh(backend, W_np), (_fresh(backend, b_np) if bias else None)
    W2, b2 = F.dense_sgd_update(x, dy, W, b, lr=0.05, l2=l2, xp=xp)
    W_ref, b_ref = _sgd_reference(x_np, dy_np, W_np, b_np if bias else None, 0.05, l2)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(W2), W_ref, **tol)
    assert W2.dtype == W.dtype and W2.shape == W.shape and backend.same_place(W2)
    if bias:
        np.testing.assert_allclose(backend.to_numpy(b2), b_ref, **tol)
    else:
        assert b2 is None
    if is_writeable_array(W):
        assert W2 is W  # the parameters are updated where they are
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)
    np.testing.assert_array_equal(backend.to_numpy(dy), dy_np)


def test_dense_sgd_update_with_inputs_of_another_dtype(backend):
    """float32 weights stepped with float64 inputs and gradients (a functional-API user's
    arrays): the fast paths step aside, the standard one promotes and writes back."""
    xp = backend.xp
    if not hasattr(xp, "float64"):
        pytest.skip("no float64")
    x_np, dy_np = _data(backend, (9, 140), 1, np.float64), _data(backend, (9, 130), 2, np.float64)
    W_np, b_np = _data(backend, (140, 130), 3), _data(backend, (130,), 4)
    W, b = _fresh(backend, W_np), _fresh(backend, b_np)
    try:
        W2, b2 = F.dense_sgd_update(backend.asarray(x_np), backend.asarray(dy_np), W, b, lr=0.05, xp=xp)
    except TypeError as exc:  # array-api-strict refuses in-place float64 into float32, as it should
        assert backend.name == "array_api_strict", exc
        return
    W_ref, b_ref = _sgd_reference(x_np, dy_np, W_np, b_np, 0.05, 0.0)
    np.testing.assert_allclose(backend.to_numpy(W2), W_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(backend.to_numpy(b2), b_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_dense_sgd_update_standard_path_rounds_as_the_optimizer_does(backend, l2):
    """Without a fast path the fused step is bit for bit SGD's step on the gradients of
    :func:`dense_backward` (plus ``l2 * W``, as ``loss_and_grads`` adds it)."""
    xp = backend.xp
    x_np, dy_np = _data(backend, (9, 140), 1), _data(backend, (9, 130), 2)
    W_np, b_np = _data(backend, (140, 130), 3), _data(backend, (130,), 4)
    x, dy = backend.asarray(x_np), backend.asarray(dy_np)
    W, b = _fresh(backend, W_np), _fresh(backend, b_np)
    with reference_kernels():
        W2, b2 = F.dense_sgd_update(x, dy, W, b, lr=0.05, l2=l2, xp=xp)
        _, dW, db = F.dense_backward(x, _fresh(backend, W_np), dy, need_dx=False, xp=xp)
        params = [{"W": _fresh(backend, W_np), "b": _fresh(backend, b_np)}]
        grads = [{"W": dW + l2 * params[0]["W"] if l2 else dW, "b": db}]
        SGD(lr=0.05).step(params, grads)
    np.testing.assert_array_equal(backend.to_numpy(W2), backend.to_numpy(params[0]["W"]))
    np.testing.assert_array_equal(backend.to_numpy(b2), backend.to_numpy(params[0]["b"]))


def test_blas_accumulate_declines_what_it_cannot_take():
    from arraymlp.kernels import _blas

    if not _blas.available():
        pytest.skip("NumPy was not built with the BLAS its wheels bundle")
    r = np.random.default_rng(0)
    a, b = r.standard_normal((8, 6)), r.standard_normal((8, 5))
    c0 = r.standard_normal((6, 5))

    def run(a, b, c):
        before = c.copy()
        ok = _blas.gemm_acc(c, a, b, -0.5, 0.75)
        return ok, before

    # row-strided operands are fine: BLAS takes their leading dimension
    for aa, bb in ((a, b), (a[::2], b[::2]), (np.repeat(a, 2, axis=1)[:, ::2], b)):
        c = c0.copy()
        ok, _ = run(aa, bb, c)
        assert ok == (aa.strides[1] == 8)
        expected = 0.75 * c0 - 0.5 * (aa.T @ bb) if ok else c0
        np.testing.assert_allclose(c, expected, rtol=1e-13, atol=1e-13)
    declined = [
        (a.astype(np.float16), b.astype(np.float16), c0.astype(np.float16)),  # no half-precision gemm
        (a.astype(np.float32), b, c0),  # mixed dtypes
        (a[::-1], b[::-1], c0.copy()),  # negative strides
        (np.asfortranarray(a), b, c0.copy()),  # columns not contiguous
        (a, b, np.asfortranarray(c0)),  # c not C-contiguous
    ]
    for aa, bb, c in declined:
        ok, before = run(aa, bb, c)
        assert not ok
        np.testing.assert_array_equal(c, before)
    ro = c0.copy()
    ro.flags.writeable = False
    assert not _blas.gemm_acc(ro, a, b, -0.5)
    big = np.zeros((8, 8))
    assert not _blas.gemm_acc(big[:6, :5], a, b, 1.0)  # c's rows are strided
    buf = np.zeros(8 * 6 + 6 * 5)
    a_view, c_view = buf[:48].reshape(8, 6), buf[40:70].reshape(6, 5)  # c overlaps a's last row
    assert not _blas.gemm_acc(c_view, a_view, b, 1.0)
    np.testing.assert_array_equal(buf, 0.0)


class _DoubledDense(L.Dense):
    """A Dense whose gradients are doubled: the fused step must go through its backward."""

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, g = super().backward(params, cache, dy, xp=xp, need_dx=need_dx)
        return dx, {k: 2.0 * v for k, v in g.items()}


def _stack(backend):
    layers = [L.Dense(5, 7), L.LayerNorm(7), L.ReLU(), _DoubledDense(7, 6), L.Tanh(), L.Dense(6, 3, bias=False),
              L.Softmax()]
    return am.Sequential(layers, dtype=backend.float_dtype(), seed=3, **backend.model_kwargs())


@pytest.mark.parametrize("l2", [0.0, 1e-2])
def test_fit_with_plain_sgd_is_loss_and_grads_then_step(backend, l2):
    """fit applies plain SGD during backpropagation; the parameters are those of
    ``loss_and_grads`` followed by ``SGD.step`` (bit for bit on the standard path)."""
    r = np.random.default_rng(7)
    x_np, y_np = r.standard_normal((24, 5)), r.integers(0, 3, 24)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    fused, manual = _stack(backend), _stack(backend)
    opt = SGD(lr=0.1)
    fused.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=8, shuffle=False, l2=l2,
              progress=False)
    ref = SGD(lr=0.1)
    for _ in range(2):
        for s in range(0, 24, 8):
            _, grads = manual.loss_and_grads(x[s:s + 8, ...], y[s:s + 8], loss="cross_entropy", l2=l2)
            ref.step(manual.params, grads)
    assert opt.step_count == ref.step_count == 6
    assert opt.state == [{key: {} for key in p} for p in fused.params]
    exact = not kernels_for(backend.xp).overrides
    for pf, pm in zip(fused.params, manual.params):
        assert pf.keys() == pm.keys()
        for key in pf:
            got, want = backend.to_numpy(pf[key]), backend.to_numpy(pm[key])
            if exact:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
            assert backend.same_place(pf[key])


def test_fused_sgd_step_checks_the_optimizer_state_before_updating(backend):
    x, y = backend.asarray(np.ones((4, 5))), backend.asarray(np.zeros(4, dtype=np.int64))
    model = _stack(backend)
    opt = SGD(lr=0.1)
    opt.state = [{}]  # built for another model
    before = [{k: backend.to_numpy(v).copy() for k, v in p.items()} for p in model.params]
    with pytest.raises(ValueError, match="different structure"):
        model.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4, progress=False)
    for p, q in zip(model.params, before):
        for k in p:
            np.testing.assert_array_equal(backend.to_numpy(p[k]), q[k])


@pytest.mark.parametrize("n", [7, 300, 1100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_dense_forward_is_the_affine_map(backend, n, dtype, strided):
    """``x @ W + b`` to rounding on every row, for contiguous and row-strided batches,
    and the inputs are untouched."""
    xp = backend.xp
    x_np = _data(backend, (2 * n, 33), 1, dtype)
    W_np, b_np = _data(backend, (33, 120), 2, dtype), _data(backend, (120,), 3, dtype)
    x_full = backend.asarray(x_np)
    x, x_ref = (x_full[::2, ...], x_np[::2]) if strided else (x_full[:n, ...], x_np[:n])
    W, b = backend.asarray(W_np), backend.asarray(b_np)
    y = F.dense_forward(x, W, b, xp=xp)
    ref = x_ref.astype(np.float64) @ W_np.astype(np.float64) + b_np
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(y), ref, **tol)
    assert y.dtype == W.dtype and tuple(y.shape) == (n, 120) and backend.same_place(y)
    np.testing.assert_array_equal(backend.to_numpy(x_full), x_np)
    np.testing.assert_array_equal(backend.to_numpy(b), b_np)


def test_fused_sgd_step_checks_again_for_another_model(backend):
    """The state check runs once per model, not once per optimiser: an SGD reused on a
    network of another structure is refused before it changes anything."""
    x, y = backend.asarray(np.ones((4, 5))), backend.asarray(np.zeros(4, dtype=np.int64))
    opt = SGD(lr=0.1)
    _stack(backend).fit(x, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=2, progress=False)
    assert opt.step_count == 4
    other = am.MLP([5, 4, 3], dtype=backend.float_dtype(), seed=1, **backend.model_kwargs())
    before = [{k: backend.to_numpy(v).copy() for k, v in p.items()} for p in other.params]
    with pytest.raises(ValueError, match="different structure"):
        other.partial_fit(x, y, loss="cross_entropy", optimizer=opt, batch_size=4)
    assert opt.step_count == 4
    for p, q in zip(other.params, before):
        for k in p:
            np.testing.assert_array_equal(backend.to_numpy(p[k]), q[k])


@pytest.mark.parametrize("shape", [(5, 3), (300, 64), (1, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_gradient_is_the_batch_sum(backend, shape, dtype):
    """``db = sum(dy, axis=0)`` (a matrix-vector product with ones on NumPy) on every row."""
    xp = backend.xp
    dy_np = _data(backend, shape, 6, dtype)
    dy = backend.asarray(dy_np)
    db = kernels_for(xp).bias_grad(dy, xp)
    assert tuple(db.shape) == (shape[1],) and db.dtype == dy.dtype and backend.same_place(db)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(backend.to_numpy(db), dy_np.astype(np.float64).sum(axis=0),
                               rtol=0, atol=4 * shape[0] * eps * np.abs(dy_np).max())
    np.testing.assert_array_equal(backend.to_numpy(dy), dy_np)
    # the cached ones are only read: a second call gives the same
    np.testing.assert_array_equal(backend.to_numpy(kernels_for(xp).bias_grad(dy, xp)), backend.to_numpy(db))


@pytest.mark.parametrize("shape", [(300, 10), (300, 1), (300, 40), (20, 10), (32, 10), (64, 16)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_reductions_of_many_short_rows(backend, shape, dtype):
    """The last-axis max and sum (NumPy reduces many short rows from a transposed copy)
    equal the row-wise ones: the max exactly, the sum to rounding."""
    xp = backend.xp
    x_np = _data(backend, shape, 5, dtype)
    x = backend.asarray(x_np)
    m = kernels_for(xp).row_max(x, xp)
    s = kernels_for(xp).row_sum(x, xp)
    assert tuple(m.shape) == tuple(s.shape) == (shape[0], 1) and m.dtype == s.dtype == x.dtype
    np.testing.assert_array_equal(backend.to_numpy(m), x_np.max(axis=-1, keepdims=True))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(backend.to_numpy(s), x_np.astype(np.float64).sum(axis=-1, keepdims=True),
                               rtol=0, atol=4 * shape[1] * eps * np.abs(x_np).max())
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)
    # the softmax and the label cross-entropy built on them
    p = F.softmax(x, xp=xp)
    z = x_np.astype(np.float64)
    ref = np.exp(z - z.max(axis=-1, keepdims=True))
    ref /= ref.sum(axis=-1, keepdims=True)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(backend.to_numpy(p), ref, rtol=tol, atol=tol)
    labels = np.arange(shape[0]) % shape[1]
    loss, grad = LS.cross_entropy(x, backend.asarray(labels), xp=xp)
    ref_loss = -np.log(ref[np.arange(shape[0]), labels]).mean()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=10 * tol)
    onehot = np.eye(shape[1])[labels]
    np.testing.assert_allclose(backend.to_numpy(grad), (ref - onehot) / shape[0], rtol=10 * tol, atol=tol / shape[0])


class _SharedGradScale(L.Layer):
    """y = x * (a + b), a layer whose backward returns one array for both parameters."""

    def init_params(self, *, rng, dtype):
        return {"a": rng.full((5,), 0.5, dtype), "b": rng.full((5,), 0.25, dtype)}

    def forward(self, params, x, *, training, rng, xp):
        return x * (params["a"] + params["b"]), x

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        g = xp.sum(dy * cache, axis=0)
        self.returned = g
        return dy * (params["a"] + params["b"]), {"a": g, "b": g}


def _manual_sgd(model, x, y, lr, steps, l2=0.0, loss="cross_entropy"):
    opt = SGD(lr=lr)
    for _ in range(steps):
        _, grads = model.loss_and_grads(x, y, loss=loss, l2=l2)
        opt.step(model.params, grads)


def _assert_same_params(backend, a, b, rtol=1e-12, atol=1e-13):
    for pa, pb in zip(a.params, b.params):
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_allclose(backend.to_numpy(pa[k]), backend.to_numpy(pb[k]), rtol=rtol, atol=atol)


def test_fused_sgd_step_leaves_a_layers_own_gradients_alone(backend):
    """The update of a custom layer's parameters reads its gradients and never writes
    them: one array returned for two parameters steps both alike."""
    r = np.random.default_rng(2)
    x, y = backend.asarray(r.standard_normal((8, 5))), backend.asarray(r.integers(0, 3, 8))

    def build():
        return am.Sequential([_SharedGradScale(), L.Dense(5, 3), L.Softmax()], dtype=backend.float_dtype(),
                             seed=4, **backend.model_kwargs())

    fused, manual = build(), build()
    fused.fit(x, y, loss="cross_entropy", optimizer=SGD(lr=0.1), epochs=1, batch_size=8, shuffle=False,
              l2=0.01, progress=False)
    g = backend.to_numpy(fused.layers[0].returned).copy()
    _manual_sgd(manual, x, y, 0.1, 1, l2=0.01)
    _assert_same_params(backend, fused, manual)
    np.testing.assert_allclose(backend.to_numpy(fused.params[0]["a"]) - 0.5,
                               backend.to_numpy(fused.params[0]["b"]) - 0.25,
                               rtol=backend.tol(1e-12), atol=backend.tol(1e-15))
    np.testing.assert_array_equal(backend.to_numpy(fused.layers[0].returned), g)


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_fused_sgd_step_refuses_a_bad_scheduled_rate(backend, bad):
    r = np.random.default_rng(3)
    x, y = backend.asarray(r.standard_normal((8, 5))), backend.asarray(r.integers(0, 3, 8))
    model = _stack(backend)
    with pytest.raises(ValueError, match="lr must be"):
        model.fit(x, y, loss="cross_entropy", optimizer=SGD(lr=0.1), schedule=lambda epoch: 0.1 if epoch == 0 else bad,
                  epochs=2, batch_size=4, shuffle=False, progress=False)


def test_fused_sgd_step_respects_a_wrapped_step(backend):
    """An optimiser whose step was wrapped on the instance (to log or inspect gradients)
    is stepped through the wrapper."""
    r = np.random.default_rng(5)
    x, y = backend.asarray(r.standard_normal((8, 5))), backend.asarray(r.integers(0, 3, 8))
    opt, seen = SGD(lr=0.1), []
    inner = opt.step

    def step(params, grads, **kw):
        seen.append(sorted(k for g in grads for k in g))
        return inner(params, grads, **kw)

    opt.step = step
    model, manual = _stack(backend), _stack(backend)
    model.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=4, shuffle=False, progress=False)
    assert len(seen) == 4 and seen[0] == ["W", "W", "W", "b", "b", "beta", "gamma"]
    for s in (0, 4, 0, 4):
        _manual_sgd(manual, x[s:s + 4, ...], y[s:s + 4], 0.1, 1)
    _assert_same_params(backend, model, manual)
    assert opt.step_count == 4


def test_fused_sgd_step_checks_a_model_grown_in_place(backend):
    """The state check runs every step: layers appended to the same lists are refused."""
    r = np.random.default_rng(6)
    x, y = backend.asarray(r.standard_normal((4, 5))), backend.asarray(r.integers(0, 3, 4))
    model = am.MLP([5, 4, 3], dtype=backend.float_dtype(), seed=1, output_activation="softmax",
                   **backend.model_kwargs())
    opt = SGD(lr=0.1)
    model.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4, progress=False)
    extra = am.MLP([3, 3, 3], dtype=backend.float_dtype(), seed=2, output_activation="softmax",
                   **backend.model_kwargs())
    model.layers[-1:] = extra.layers  # the same list objects, more layers
    model.params[-1:] = extra.params
    with pytest.raises(ValueError, match="different structure"):
        model.partial_fit(x, y, loss="cross_entropy", optimizer=opt, batch_size=4)


def test_tied_weights_are_not_fused(backend):
    """Dense layers sharing one weight array: each layer's input gradient must read the
    weights before the step, so the step is taken after backpropagation, as SGD.step."""
    r = np.random.default_rng(8)
    x, y = backend.asarray(r.standard_normal((8, 4))), backend.asarray(r.integers(0, 4, 8))

    def build():
        m = am.Sequential([L.Dense(4, 4), L.Tanh(), L.Dense(4, 4), L.Tanh(), L.Dense(4, 4), L.Softmax()],
                          dtype=backend.float_dtype(), seed=5, **backend.model_kwargs())
        m.params[2]["W"] = m.params[4]["W"] = m.params[0]["W"]
        return m

    fused, manual = build(), build()
    assert not fused._params_distinct()
    fused.fit(x, y, loss="cross_entropy", optimizer=SGD(lr=0.1), epochs=1, batch_size=8, shuffle=False,
              progress=False)
    _, grads = manual.loss_and_grads(x, y, loss="cross_entropy")
    W = backend.to_numpy(manual.params[0]["W"])
    expected = W - 0.1 * sum(backend.to_numpy(grads[i]["W"]) for i in (0, 2, 4))
    # SGD.step applies each layer's gradient to the one shared array in turn
    np.testing.assert_allclose(backend.to_numpy(fused.params[0]["W"]), expected,
                               rtol=backend.tol(1e-12), atol=backend.tol(1e-13))


# ----------------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 11), (11,), (5, 1)])
def test_all_finite_matches_isfinite(backend, dtype, shape):
    """The BLAS row-sum screen answers as ``all(isfinite(a))`` does: for each kind of
    non-finite entry, anywhere, and for finite entries whose sums overflow."""
    big = np.finfo(dtype).max
    base = _data(backend, shape, dtype=dtype)
    cases = {"finite": base}
    for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        for where in (0, base.size // 2, base.size - 1):
            a = base.copy()
            a.flat[where] = value
            cases[f"{label}@{where}"] = a
    overflow = np.full(shape, big, dtype=dtype)  # every sum overflows, every entry finite
    cases["overflowing sums"] = overflow
    cancel = overflow.copy()
    cancel.flat[-1] = np.inf  # a sum of +inf that an exact test must still reject
    cases["inf among huge"] = cancel
    mixed = np.where(np.arange(base.size).reshape(shape) % 2 == 0, big, -big).astype(dtype)
    cases["alternating huge"] = mixed
    for label, a in cases.items():
        expected = bool(np.isfinite(a).all())
        assert kernels_for(backend.xp).all_finite(backend.asarray(a), backend.xp) is expected, label
        # the exact test, block by block, gives the same answer
        assert R.all_finite(backend.asarray(a), backend.xp, rows=4) is expected, label


def test_all_finite_exact_for_other_dtypes_and_empty_arrays(backend):
    xp = backend.xp
    assert kernels_for(xp).all_finite(backend.asarray(np.zeros((0, 3), np.float32)), xp) is True
    assert kernels_for(xp).all_finite(backend.asarray(np.zeros((3, 0), np.float32)), xp) is True
    assert kernels_for(xp).all_finite(backend.asarray(np.arange(6).reshape(2, 3)), xp) is True


def test_model_rejects_non_finite_input_found_by_the_row_sums(backend):
    model = am.MLP([3, 4, 2], seed=0, backend=backend.xp, device=backend.device)
    x = np.ones((6, 3), np.float32)
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        model(backend.asarray(x))
    x[4, :] = np.finfo(np.float32).max  # finite, whose row sum overflows: accepted as it is
    checked, _ = model._check_x(backend.asarray(x))
    np.testing.assert_array_equal(backend.to_numpy(checked), x)


def test_all_finite_leaves_numpy_subclasses_to_the_exact_test():
    """A masked array multiplies by its own mask rules: the BLAS screen does not take
    it, and the exact test answers as ``all(isfinite(a))`` does."""
    bad = np.ma.masked_array([[1.0, np.nan], [2.0, 3.0]], mask=[[0, 1], [0, 0]])
    good = np.ma.masked_array([[1.0, 4.0], [2.0, 3.0]], mask=[[0, 1], [0, 0]])
    for a in (bad, good):
        assert kernels_for(np).all_finite(a, np) is bool(np.all(np.isfinite(a)))
    assert kernels_for(np).all_finite(good, np) is True
    assert kernels_for(np).all_finite(np.ma.masked_array([[1.0, np.inf]], mask=[[0, 0]]), np) is False
