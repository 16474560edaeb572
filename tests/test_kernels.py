"""The kernel sets: every backend override held to the reference kernel it replaces,
on every backend row, in one parametrisation; the set chosen per namespace; the switch
that forces the reference set."""

from __future__ import annotations

import math

import numpy as np
import pytest

import arraymlp.kernels as K
from arraymlp.kernels import KERNELS, KernelSet, kernels_for, reference_kernels
from arraymlp.kernels import reference as R

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32
FLOAT64_DATA = "float32"

# the float64 cases also run on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True

N, M = 300, 10  # many short rows: the NumPy row reductions take their transposed path
BIG = (160, 130)  # weights large enough for the BLAS accumulate


def _r(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _labels(n=N, k=M):
    return np.arange(n) % k


def _work(n, p, xp):
    return xp.empty((n,), dtype=p.dtype, device=p.device)


P = (120, 90)  # a parameter of an optimiser update


def _state(seed):
    return np.abs(_r(P, seed))  # second moments and sums of squares are non-negative


def _hits_case():
    """Scores with ties (rounded values) and a NaN row, and labels that hit about half
    the rows: the count of ``argmax(scores) == labels`` added to a running count of 7."""
    scores = np.round(_r((N, M), 53))
    scores[5, 3] = np.nan
    labels = np.where(np.arange(N) % 2 == 0, np.argmax(scores, axis=1), _labels())
    return np.array([7]), scores, labels


def _ce_hits_case():
    """Logits with ties (rounded values), labels that are the arg-max of about half the
    rows, and a running count of 7 (the NaN cases of the count are test_jit's)."""
    scores = np.round(_r((N, M), 54) * 2)
    labels = np.where(np.arange(N) % 2 == 0, np.argmax(scores, axis=1), _labels())
    return scores, labels, np.array([7])


# name -> (host arguments, keyword arguments, indices of the arguments handed over)
CASES = {
    "add_argmax_hits": (_hits_case, {}, (0,)),
    "adagrad_update": (lambda: (_r(P, 40), _r(P, 41), _state(42), 0.05, 1e-10, 0.1), {"work": _work}, (0, 2)),
    "adam_update": (lambda: (_r((N, M), 40), _r((N, M), 41), _r((N, M), 42), np.abs(_r((N, M), 43)),
                             np.abs(_r((N, M), 44)), 0.01, 0.9, 0.999, 1e-8, 0.05, True, 3), {"work": _work},
                    (0, 2, 3, 4)),
    "add_bias": (lambda: (_r((N, M), 0), _r((M,), 1)), {}, (0,)),
    "all_finite": (lambda: (np.where(np.arange(N * M).reshape(N, M) == 777, np.nan, _r((N, M), 2)),), {}, ()),
    "axpy": (lambda: (_r((40_000,), 3), -0.25, _r((40_000,), 4)), {"work": _work}, (0,)),
    "batch_sum": (lambda: (_r((N,), 5),), {}, ()),
    "bias_grad": (lambda: (_r((N, 64), 6),), {}, ()),
    "cross_entropy_labels": (lambda: (_r((N, M), 7) * 3, _labels()), {}, ()),
    "cross_entropy_labels_mean": (lambda: (_r((N, M), 8) * 3, _labels()), {}, ()),
    "cross_entropy_labels_mean_hits": (lambda: _ce_hits_case(), {}, (2,)),
    "dense_backward": (lambda: (_r((N, 33), 9), _r((33, 64), 10), _r((N, 64), 11), True, True), {}, ()),
    "dense_forward": (lambda: (_r((N, 33), 12), _r((33, 64), 13), _r((64,), 14)), {}, ()),
    "dense_relu_forward": (lambda: (_r((N, 33), 15), _r((33, 64), 16), _r((64,), 17)), {}, ()),
    "dense_sgd_update": (lambda: (_r((9, BIG[0]), 18), _r((9, BIG[1]), 19), _r(BIG, 20), _r((BIG[1],), 21),
                                  0.05, 0.3), {}, (2, 3)),
    "identity_forward_inplace": (lambda: (_r((N, M), 22),), {}, (0,)),
    "pick_labels": (lambda: (_r((N, M), 23), _labels()), {}, ()),
    "relu_backward_inplace": (lambda: (_r((N, M), 24), _r((N, M), 25)), {}, (0,)),
    "relu_forward_inplace": (lambda: (_r((N, M), 26),), {}, (0,)),
    "rmsprop_update": (lambda: (_r((N, M), 45), _r((N, M), 46), np.abs(_r((N, M), 47)) + 1.0, 0.1 * _r((N, M), 48),
                                _r((N, M), 49), 0.01, 0.99, 1e-8, 0.9, 0.02), {"work": _work},
                       (0, 2, 3, 4)),
    "row_max": (lambda: (_r((N, M), 27),), {}, ()),
    "row_sum": (lambda: (_r((N, M), 28),), {}, ()),
    "sgd_apply": (lambda: (_r((N, M), 29), _r((N, M), 30), 0.1, 0.01), {}, (0, 1)),
    "sgd_momentum_update": (lambda: (_r((40_000,), 50), _r((40_000,), 51), _r((40_000,), 52), 0.1, 0.9, 0.0, True,
                                     0.01, False), {"work": _work}, (0, 2)),
    "sigmoid_backward_inplace": (lambda: (_r((N, M), 31), 1 / (1 + np.exp(-_r((N, M), 32)))), {}, (0,)),
    "softmax": (lambda: (_r((N, M), 33),), {}, ()),
    "subtract_onehot": (lambda: (_r((N, M), 34), _labels()), {}, (0,)),
    "tanh_backward_inplace": (lambda: (_r((N, M), 35), np.tanh(_r((N, M), 36))), {}, (0,)),
    "tanh_forward_inplace": (lambda: (_r((N, M), 37),), {}, (0,)),
}


def test_every_kernel_has_a_parity_case():
    assert set(CASES) == set(KERNELS)
    for name in KERNELS:
        assert callable(getattr(R, name)), name


def _call(ks, name, args, kwargs, xp):
    if name == "softmax":  # the public activation's form: xp by keyword
        return getattr(ks, name)(*args, xp=xp)
    return getattr(ks, name)(*args, xp, **kwargs)


def _host(backend, out):
    if isinstance(out, tuple):
        return tuple(_host(backend, o) for o in out)
    if out is None or isinstance(out, (bool, float, int)):
        return out
    return backend.to_numpy(out)


def _every_override():
    """(backend name, kernel) for every override of the sets the rows can build (a set
    whose library is not installed, as torch in CI's first run, has no row to build it)."""
    names = set()
    for mod in ("numpy", "torch", "cupy"):
        try:
            names |= set(__import__(f"arraymlp.kernels.{mod}", fromlist=["OVERRIDES"]).OVERRIDES)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    return sorted(names)


@pytest.mark.parametrize("name", _every_override())
def test_override_gives_the_reference_values(backend, name):
    """Each backend's override against the reference kernel on the same arrays: same
    values (to the rounding of another summation order), and the arguments that are not
    handed over left untouched."""
    xp = backend.xp
    ks = kernels_for(xp)
    if name not in ks.overrides:
        pytest.skip(f"the {ks.name} set does not override {name}")
    make, kwargs, handed = CASES[name]
    host = make()

    def args():
        out = []
        for i, a in enumerate(host):
            if not isinstance(a, np.ndarray):
                out.append(a)
            elif i in handed:
                out.append(xp.asarray(backend.asarray(a), copy=True))  # the library's own temporary
            else:
                out.append(backend.asarray(a))  # the caller's (read-only on that row)
        return out

    got_args, ref_args = args(), args()
    got = _host(backend, _call(ks, name, got_args, kwargs, xp))
    ref = _host(backend, _call(K.REFERENCE, name, ref_args, kwargs, xp))
    for g, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        if isinstance(r, np.ndarray):
            assert g.shape == r.shape and g.dtype == r.dtype, name
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13, err_msg=name)
        else:
            assert (g == r) or (math.isclose(float(g), float(r), rel_tol=1e-12)), (name, g, r)
    for i, a in enumerate(got_args):
        if i not in handed and isinstance(host[i], np.ndarray):
            np.testing.assert_array_equal(backend.to_numpy(a), host[i], err_msg=f"{name} changed argument {i}")


def test_sets_by_namespace(backend):
    xp = backend.xp
    ks = kernels_for(xp)
    expected = {"numpy": "numpy", "torch": "torch", "cupy": "cupy"}.get(backend.name, "reference")
    if K.reference_forced():  # the suite run with ARRAYMLP_KERNELS=reference
        expected = "reference"
    assert ks.name == expected  # array-api-strict and JAX take the reference set
    assert kernels_for(xp) is ks  # built once
    with reference_kernels():
        assert kernels_for(xp) is K.REFERENCE
        assert not kernels_for(xp).overrides
    assert kernels_for(xp) is ks


def test_reference_switch_nests_and_can_be_turned_off():
    before = K.reference_forced()
    with reference_kernels():
        assert K.reference_forced()
        with reference_kernels(False):
            assert kernels_for(np).name == "numpy"
        assert kernels_for(np).name == "reference"
    assert K.reference_forced() is before


def test_the_environment_variable_forces_the_reference_in_a_new_process():
    import subprocess
    import sys

    code = "import numpy, arraymlp.kernels as K; print(K.kernels_for(numpy).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "ARRAYMLP_KERNELS": "reference"})
    assert out.stdout.strip() == "reference"


def test_composites_are_bound_to_their_sets_primitives():
    """A set that overrides a primitive speeds up every composite built on it."""
    calls = []

    def bias_grad(dy, xp):
        calls.append(dy.shape)
        return R.bias_grad(dy, xp)

    ks = KernelSet("test", {"bias_grad": bias_grad})
    dy = _r((5, 3), 0)
    dx, dW, db = ks.dense_backward(_r((5, 2), 1), _r((2, 3), 2), dy, True, True, np)
    ks.dense_sgd_update(_r((5, 2), 1), dy, _r((2, 3), 2), _r((3,), 3), 0.1, 0.0, np)
    assert calls == [(5, 3), (5, 3)]
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=1e-15)
    assert ks.overrides == {"bias_grad"}
    with pytest.raises(ValueError, match="unknown kernels"):
        KernelSet("bad", {"no_such_kernel": bias_grad})


def test_activation_rows_of_a_set():
    ks = kernels_for(np)
    relu = ks.activation(R.ACTIVATIONS["relu"])
    assert relu.forward_inplace is ks.relu_forward_inplace and relu.backward is R.ACTIVATIONS["relu"].backward
    custom = R.Activation("relu", R.relu, R._relu_bw, "output")  # not the table's row: used as it is
    assert ks.activation(custom) is custom


# every branch of the optimiser updates: (kernel, host arguments, indices handed over)
def _update_variants():
    p, g, a, s = (lambda: _r(P, 60)), (lambda: _r(P, 61)), (lambda: _r(P, 62) * 0.1), (lambda: _state(63))
    out = []
    for first in (True, False):
        for nesterov, damp in ((False, 0.0), (True, 0.0), (False, 0.3)):
            for wd in (0.0, 0.05):
                out.append(("sgd_momentum_update", lambda f=first, n=nesterov, d=damp, w=wd:
                            (p(), g(), a(), 0.1, 0.9, d, n, w, f), (0, 2)))
    for amsgrad in (False, True):
        for wd, decoupled in ((0.0, False), (0.1, False), (0.1, True)):
            out.append(("adam_update", lambda ams=amsgrad, w=wd, dec=decoupled:
                        (p(), g(), a(), s(), s() * 0.5 if ams else None, 0.01, 0.9, 0.999, 1e-8, w, dec, 4),
                        (0, 2, 3, 4)))
    for centered in (False, True):
        for momentum in (0.0, 0.9):
            for wd in (0.0, 0.1):
                out.append(("rmsprop_update", lambda c=centered, mo=momentum, w=wd:
                            (p(), g(), s() + 1.0, a() if c else None, a() if mo else None, 0.01, 0.99, 1e-8, mo, w),
                            (0, 2, 3, 4)))
    for wd in (0.0, 0.1):
        out.append(("adagrad_update", lambda w=wd: (p(), g(), s(), 0.05, 1e-10, w), (0, 2)))
    return out


UPDATE_VARIANTS = _update_variants()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(UPDATE_VARIANTS)))
def test_optimizer_updates_of_a_set_are_the_reference_bit_for_bit(backend, case, dtype):
    """Every branch of every optimiser update of the namespace's set against the
    reference: the same values bit for bit (the overrides make the same operations in
    the same order, into a work buffer), the gradient untouched, and the reference's
    in-place result equal to its functional one on the read-only row."""
    if dtype == np.float64:
        backend.skip_without_float64()
    xp = backend.xp
    name, make, handed = UPDATE_VARIANTS[case]
    host = [a.astype(dtype) if isinstance(a, np.ndarray) else a for a in make()]

    def args():
        return [a if not isinstance(a, np.ndarray) else
                xp.asarray(backend.asarray(a), copy=True) if i in handed else backend.asarray(a)
                for i, a in enumerate(host)]

    got_args, ref_args = args(), args()
    got = getattr(kernels_for(xp), name)(*got_args, xp, _work)
    ref = getattr(K.REFERENCE, name)(*ref_args, xp)
    for gv, rv in zip(got, ref):
        assert (gv is None) == (rv is None)
        if rv is not None:
            np.testing.assert_array_equal(backend.to_numpy(gv), backend.to_numpy(rv), err_msg=name)
    np.testing.assert_array_equal(backend.to_numpy(got_args[1]), host[1], err_msg=f"{name} changed the gradient")


K3 = (4, 64, 90)  # an ensemble's stacked parameter: 4 members, large enough for compiled paths


def _members(values, dtype):
    """Per-member hyper-parameters (K, 1, 1) in the parameters' dtype, as host arrays."""
    return np.asarray(values, dtype=dtype).reshape(-1, 1, 1)


def _member_variants(dtype):
    """Every branch of the updates with per-member (K, 1, 1) hyper-parameters (one member
    at rate 0, as a frozen one is): (kernel, host arguments, handed over, indices of the
    per-member arguments)."""
    p, g, a, s = (lambda: _r(K3, 80)), (lambda: _r(K3, 81)), (lambda: _r(K3, 82) * 0.1), (lambda: _state_of(K3, 83))
    lr = _members([0.01, 0.05, 0.0, 0.2], dtype)
    mom = _members([0.9, 0.5, 0.0, 0.99], dtype)
    wds = _members([0.1, 0.0, 0.3, 0.01], dtype)
    b1, b2 = _members([0.9, 0.8, 0.5, 0.0], dtype), _members([0.999, 0.99, 0.9, 0.5], dtype)
    out = []
    for first in (True, False):
        for nesterov in (False, True):
            for wd in (0.0, wds):
                out.append(("sgd_momentum_update", (p(), g(), a(), lr, mom, 0.0, nesterov, wd, first), (0, 2)))
    for amsgrad in (False, True):
        for wd, decoupled in ((0.0, False), (wds, False), (wds, True)):
            out.append(("adam_update", (p(), g(), a(), s(), s() * 0.5 if amsgrad else None, lr, b1, b2, 1e-8, wd,
                                        decoupled, 4), (0, 2, 3, 4)))
    for centered in (False, True):
        for momentum in (0.0, mom):
            out.append(("rmsprop_update", (p(), g(), s() + 1.0, a() if centered else None,
                                           None if isinstance(momentum, float) else a(), lr, 0.99, 1e-8, momentum,
                                           wds), (0, 2, 3, 4)))
    out.append(("adagrad_update", (p(), g(), s(), lr, 1e-10, wds), (0, 2)))
    out.append(("axpy", (p(), -lr, g()), (0,)))
    return out


def _state_of(shape, seed):
    return np.abs(_r(shape, seed))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(_member_variants(np.float64))))
def test_optimizer_updates_take_per_member_hyperparameters(backend, case, dtype):
    """The updates with an ensemble's per-member hyper-parameters, arrays (K, 1, 1) in the
    parameters' dtype against stacked parameters (K, ...): the namespace's set (NumPy's
    compiled Adam included) gives the reference's values bit for bit, and member ``i``'s
    slice equals the kernel run on that member alone with its values as Python floats,
    the plain optimiser's call (to rounding in float32, where a plain model's constants
    such as ``1 - b1`` are computed in float64 and rounded once)."""
    from arraymlp.kernels import _jit

    if dtype == np.float64:
        backend.skip_without_float64()
    _jit.set_enabled(True)  # the compiled Adam loads at its next call where Numba is installed
    xp = backend.xp
    name, host, handed = _member_variants(dtype)[case]
    host = [a.astype(dtype) if isinstance(a, np.ndarray) else a for a in host]
    per_member = [i for i, a in enumerate(host) if isinstance(a, np.ndarray) and a.shape == (K3[0], 1, 1)]

    def args(values):
        return [a if not isinstance(a, np.ndarray) else
                xp.asarray(backend.asarray(a), copy=True) if i in handed or i in per_member else backend.asarray(a)
                for i, a in enumerate(values)]

    got = getattr(kernels_for(xp), name)(*args(host), xp, _work)
    ref = getattr(K.REFERENCE, name)(*args(host), xp)
    got, ref = (got,) if name == "axpy" else got, (ref,) if name == "axpy" else ref
    for gv, rv in zip(got, ref):
        assert (gv is None) == (rv is None)
        if rv is not None:
            np.testing.assert_array_equal(backend.to_numpy(gv), backend.to_numpy(rv), err_msg=name)
    tol = 1e-13 if dtype == np.float64 else 2e-6
    for i in range(K3[0]):  # member i alone, its hyper-parameters as floats
        alone = [float(a[i, 0, 0]) if j in per_member else (a[i].copy() if isinstance(a, np.ndarray) else a)
                 for j, a in enumerate(host)]
        one = getattr(kernels_for(xp), name)(*args(alone), xp, _work)
        one = (one,) if name == "axpy" else one
        for gv, ov in zip(got, one):
            if ov is not None:
                np.testing.assert_allclose(backend.to_numpy(gv)[i], backend.to_numpy(ov), rtol=tol, atol=tol,
                                           err_msg=f"{name}, member {i}")


def test_compiled_adam_is_the_ufunc_path_bit_for_bit(monkeypatch):
    """NumPy's compiled Adam (one pass) against its ufunc path, every branch, float32 and
    float64, plain parameters and per-member hyper-parameters: the same bits."""
    from arraymlp.kernels import _common as C
    from arraymlp.kernels import _jit
    from arraymlp.kernels import numpy as NK

    if _jit.kernels() is None:
        pytest.skip("Numba is not installed or the compiled kernels are off")
    _jit.set_enabled(True)
    monkeypatch.setattr(_jit, "ADAM_MIN", 1)  # every size of the cases
    for dtype in (np.float32, np.float64):
        for variant in _member_variants(dtype) + [v for v in _update_variants()]:
            name, host, *_ = variant if isinstance(variant[1], list | tuple) else (variant[0], variant[1](), None)
            if name != "adam_update":
                continue
            host = [a.astype(dtype) if isinstance(a, np.ndarray) else a for a in host]
            p, g, m, v, vmax = (None if a is None else a.copy() for a in host[:5])
            p2, m2, v2, vmax2 = (None if a is None else a.copy() for a in (p, m, v, vmax))
            assert _jit.adam(p, g, m, v, vmax, lambda h=host: _constants(h), host[9] is not None and
                             R.is_on(host[9]) and not host[10], host[10] and R.is_on(host[9]))
            C.adam_update(p2, g, m2, v2, vmax2, *host[5:], np, _work)
            for a, b in zip((p, m, v, vmax), (p2, m2, v2, vmax2)):
                if b is not None:
                    assert a.tobytes() == b.tobytes(), (dtype, host[5:])
    assert NK.adam_update is kernels_for(np).adam_update or K.reference_forced()


ADAM_SIZES = ((3,), (17, 5), P)  # the compiled pass's remainder loop, and a parameter of the cases


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_of_python_numbers_takes_the_compiled_pass_bit_for_bit(backend, dtype, monkeypatch):
    """Adam with hyper-parameters that are Python numbers, with the compiled kernels
    loaded: every branch, at sizes from 3 elements up, gives the reference's bits (NumPy
    takes the compiled pass at every size, torch CPU two compiled passes around its own
    square root). A gradient that shares memory with the state takes the ufunc path,
    with its values."""
    from arraymlp.kernels import _jit

    if dtype == np.float64:
        backend.skip_without_float64()
    if _jit.kernels() is None and backend.name in ("numpy", "torch"):
        pytest.skip("Numba is not installed or the compiled kernels are off")
    _jit.set_enabled(True)
    calls = []
    name = "adam_around_sqrt" if backend.name == "torch" else "adam_numbers"
    real = getattr(_jit, name)
    monkeypatch.setattr(_jit, name, lambda *a: calls.append(real(*a)) or calls[-1])
    xp = backend.xp
    variants = [v for v in UPDATE_VARIANTS if v[0] == "adam_update"]
    for shape in ADAM_SIZES:
        for _, make, handed in variants:
            host = make()
            host = [np.resize(a, shape).astype(dtype) if isinstance(a, np.ndarray) else a for a in host]

            def args(host=host, handed=handed):
                return [a if not isinstance(a, np.ndarray) else
                        xp.asarray(backend.asarray(a), copy=True) if i in handed else backend.asarray(a)
                        for i, a in enumerate(host)]

            got = kernels_for(xp).adam_update(*args(), xp, _work)
            ref = K.REFERENCE.adam_update(*args(), xp)
            for gv, rv in zip(got, ref):
                if rv is not None:
                    np.testing.assert_array_equal(backend.to_numpy(gv), backend.to_numpy(rv), err_msg=str(host[5:]))
    if backend.name in ("numpy", "torch") and backend.device in (None, "cpu") and not K.reference_forced():
        assert calls and all(calls), "the compiled passes did not take every case"
    if backend.name not in ("numpy", "torch") or backend.readonly or K.reference_forced():
        return
    # a gradient that is a view of the first moment: the one pass would read what it
    # wrote, so the work-buffer path runs, as it did before the compiled passes
    from arraymlp.kernels import _common as C

    def case():
        p, m, v = (backend.asarray(a.astype(dtype)) for a in (_r(P, 1), _r(P, 2) * 0.1, _state(3)))
        return p, m[:], m, v

    want = C.adam_update(*case(), None, 0.01, 0.9, 0.999, 1e-8, 0.0, False, 3, xp, _work)
    calls.clear()
    got = kernels_for(xp).adam_update(*case(), None, 0.01, 0.9, 0.999, 1e-8, 0.0, False, 3, xp, _work)
    assert calls == [False]
    for gv, rv in zip(got, want):
        if rv is not None:
            np.testing.assert_array_equal(backend.to_numpy(gv), backend.to_numpy(rv))


def test_adam_on_torch_leaves_autograd_tensors_to_torch():
    """A parameter autograd tracks is never written through a NumPy view: torch's own
    path runs, and refuses the in-place update of a leaf that requires grad."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tx

    from arraymlp.kernels import _jit

    if _jit.kernels() is None or K.reference_forced():
        pytest.skip("Numba is not installed, the compiled kernels are off, or the reference is forced")
    _jit.set_enabled(True)
    p = torch.ones(5, requires_grad=True)
    g, m, v = torch.full((5,), 0.5), torch.zeros(5), torch.zeros(5)
    with pytest.raises(RuntimeError):
        kernels_for(tx).adam_update(p, g, m, v, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1, tx, _work)
    assert torch.equal(p.detach(), torch.ones(5))


def _constants(host):
    lr, b1, b2, eps, wd, decoupled, t = host[5:]
    coupled = R.is_on(wd) and not decoupled
    return (b1, 1.0 - b1, b2, 1.0 - b2, R.hyper_sqrt(1.0 - b2**t, np), eps, lr / (1.0 - b1**t),
            wd if coupled else 0.0, 1.0 - lr * wd if decoupled and R.is_on(wd) else 1.0)


def test_adam_update_reference_against_the_formula():
    """The reference Adam update (coupled L2, AMSGrad) against the rule written out in
    float64 NumPy."""
    p, g, m, v, vmax = _r(P, 70), _r(P, 71), _r(P, 72) * 0.1, _state(73) * 0.1, _state(74) * 0.1
    lr, b1, b2, eps, t, wd = 0.01, 0.9, 0.999, 1e-8, 5, 0.1
    ge = g + wd * p
    m_e = b1 * m + (1 - b1) * ge
    v_e = b2 * v + (1 - b2) * ge * ge
    vmax_e = np.maximum(vmax, v_e)
    p_e = p - lr / (1 - b1**t) * m_e / (np.sqrt(vmax_e) / np.sqrt(1 - b2**t) + eps)
    got = R.adam_update(p.copy(), g, m.copy(), v.copy(), vmax.copy(), lr, b1, b2, eps, wd, False, t, np)
    for a, e in zip(got, (p_e, m_e, v_e, vmax_e)):
        np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-15)


def test_constants_are_not_kept_from_a_jax_trace():
    """ReLU under jax.jit gives max(x, 0) and leaves no traced constant in the cache of
    0-d constants (a kept tracer would outlive its trace)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from arraymlp.kernels import reference as ref

    relu = jax.jit(lambda x: ref.relu(x, xp=jnp))
    x = np.array([-1.5, 0.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(relu(jnp.asarray(x))), np.maximum(x, 0.0))
    assert not any(isinstance(v, jax.core.Tracer) for v in ref._CONSTANTS.values())
