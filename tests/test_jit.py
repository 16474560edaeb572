"""The compiled one-pass kernels (Numba, where installed) held to the NumPy code they
replace: the ReLU kernels bit for bit, the cross-entropy kernel to the rounding of
``exp``/``log`` and of its row sums; every backend row gives the same results with the
kernels on and off (only NumPy rows take them); declined inputs leave arrays untouched."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arraymlp as am
from arraymlp import losses as LS
from arraymlp.kernels import _jit, reference_kernels

needs_numba = pytest.mark.skipif(_jit.kernels() is None, reason="Numba is not installed")

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 2.5, -2.5]


@pytest.fixture(autouse=True)
def _numpy_set():
    """These tests are of the NumPy set's compiled kernels: run them with the backend
    sets even where the reference is forced for the rest of the suite (the tests on
    every row force it themselves where they compare with it)."""
    with reference_kernels(False):
        yield


@pytest.fixture
def jit_off():
    """Run a block with the kernels off: ``with jit_off(): ...``."""
    import contextlib

    @contextlib.contextmanager
    def off():
        saved = _jit._kernels
        _jit.set_enabled(False)
        try:
            yield
        finally:
            _jit._kernels = saved

    return off


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


# ----------------------------------------------------------------------------- kernels
@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 9), (64, 33)])
def test_bias_relu_is_numpys_maximum_bit_for_bit(dtype, shape):
    r = np.random.default_rng(0)
    h = r.standard_normal(shape).astype(dtype)
    b = r.standard_normal(shape[1]).astype(dtype)
    flat = h.reshape(-1)
    flat[: len(SPECIALS)] = SPECIALS[: flat.size]
    b[0] = -0.0  # -0.0 + -0.0 stays -0.0, which ReLU turns into +0.0
    ref = h + b
    np.maximum(ref, 0, out=ref)
    got = h.copy()
    assert _jit.bias_relu(got, b) is True
    np.testing.assert_array_equal(_bits(got), _bits(ref))


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_is_the_masked_product_bit_for_bit(dtype):
    r = np.random.default_rng(1)
    dy = r.standard_normal((17, 12)).astype(dtype)
    y = np.maximum(r.standard_normal((17, 12)), 0).astype(dtype)
    dy.reshape(-1)[: len(SPECIALS)] = SPECIALS
    y.reshape(-1)[: len(SPECIALS)] = 0.0  # inf * 0 is NaN, -2.5 * 0 is -0.0
    y[5, :4] = [np.nan, np.inf, 1e-45 if dtype == np.float32 else 5e-324, -0.0]
    with np.errstate(invalid="ignore"):  # NumPy warns of inf * 0; the kernel does not
        ref = dy * (y > 0)
    got = dy.copy()
    assert _jit.relu_backward(got, y) is True
    np.testing.assert_array_equal(_bits(got), _bits(ref))


@needs_numba
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", [(1, 2), (9, 5), (300, 10)])
def test_cross_entropy_kernel_matches_the_numpy_path(dtype, rtol, shape, jit_off):
    n, k = shape
    r = np.random.default_rng(2)
    x = (r.standard_normal(shape) * 4).astype(dtype)
    x[0, 0] = -np.inf  # a masked logit (the label of row 0 is never 0 below)
    labels = (np.arange(n) % (k - 1)) + 1
    fused = _jit.cross_entropy_labels(x, labels)
    assert fused is not None
    total, g = fused
    with jit_off():
        loss_ref, g_ref = LS.cross_entropy(x, labels)
    assert total / n == pytest.approx(float(loss_ref), rel=rtol)
    np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol / n)
    assert g.dtype == x.dtype and g[0, 0] == 0.0
    # through the loss: the same value and gradient, the logits untouched
    x0 = x.copy()
    loss, g2 = LS.cross_entropy(x, labels)
    assert loss.dtype == x.dtype and float(loss) == pytest.approx(float(loss_ref), rel=rtol)
    np.testing.assert_array_equal(g2, g)
    np.testing.assert_array_equal(x, x0)


@needs_numba
def test_cross_entropy_kernel_gives_nan_for_nan_logits_like_numpy(jit_off):
    x = np.array([[0.0, np.nan, 1.0], [np.nan, 0.0, 2.0], [0.0, 1.0, 2.0]])
    labels = np.array([0, 2, 1])
    total, g = _jit.cross_entropy_labels(x, labels)
    with jit_off():
        _, g_ref = LS.cross_entropy(x, labels, check=False)
    assert np.isnan(total)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(g_ref))
    np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-14)


@needs_numba
@pytest.mark.parametrize("bad", [-1, 3])
def test_cross_entropy_kernel_declines_labels_out_of_range(bad):
    x = np.zeros((2, 3))
    assert _jit.cross_entropy_labels(x, np.array([0, bad])) is None
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        LS.cross_entropy(x, np.array([0, bad]))  # the checked loss still says why


@needs_numba
def test_kernels_decline_what_they_cannot_take():
    r = np.random.default_rng(3)
    h = r.standard_normal((4, 6))
    b = r.standard_normal(6)
    cases = [
        (h.astype(np.float16), b.astype(np.float16)),  # dtype
        (h.astype(np.float32), b),  # mixed dtypes
        (np.asfortranarray(h), b),  # layout
        (h[:, ::2], b[::2]),  # a strided view
        (h, b[:5]),  # shapes that do not broadcast
        (np.ma.masked_array(h), b),  # a NumPy subclass
        (h.reshape(2, 2, 6), b),  # three axes
    ]
    for hh, bb in cases:
        before = np.array(hh, copy=True)
        assert _jit.bias_relu(hh, bb) is False
        np.testing.assert_array_equal(np.asarray(hh), before)
    for dy, y in [cases[0][:1] * 2, (np.asfortranarray(h),) * 2, (h[:, ::2],) * 2, (h, h[:, :5]),
                  (np.ma.masked_array(h), h), (h, h.astype(np.float32))]:
        before = np.array(dy, copy=True)
        assert _jit.relu_backward(dy, y) is False
        np.testing.assert_array_equal(np.asarray(dy), before)
    ro = h.copy()
    ro.flags.writeable = False
    assert _jit.bias_relu(ro, b) is False and _jit.relu_backward(ro, h) is False
    assert _jit.cross_entropy_labels(h, np.arange(4, dtype=np.int32) % 6) is None  # int32 labels
    assert _jit.cross_entropy_labels(h.astype(np.float16), np.arange(4) % 6) is None
    assert _jit.cross_entropy_labels(h[:0], np.arange(0)) is None  # no rows


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_hits_count_numpys_argmax(dtype):
    """Ties (the first highest entry wins), NaN (the first NaN wins, as NumPy's argmax),
    infinities and signed zeros: the compiled count is NumPy's, added to the total."""
    r = np.random.default_rng(11)
    x = r.choice(SPECIALS, size=(500, 7)).astype(dtype)
    x[:3] = [0.0, -0.0, 0.0, -0.0, 0.0, 0.0, 0.0]  # all tied
    labels = r.integers(0, 7, size=500)
    labels[::3] = np.argmax(x[::3], axis=1)
    total = np.array([5])
    assert _jit.add_argmax_hits(total, x, labels) is True
    assert int(total[0]) == 5 + int(np.count_nonzero(np.argmax(x, axis=1) == labels))


@needs_numba
def test_argmax_hits_decline_what_they_cannot_take():
    x = np.random.default_rng(12).standard_normal((4, 3))
    labels = np.array([0, 1, 2, 0])
    ro = np.array([0])
    ro.flags.writeable = False
    for total, xx, lab in [(np.array([0], dtype=np.int32), x, labels), (np.array(0), x, labels),
                           (ro, x, labels), (np.array([0]), x, labels.astype(np.int32)),
                           (np.array([0]), x, labels[:3]), (np.array([0]), x.astype(np.float16), labels),
                           (np.array([0]), x[:, ::2], labels), (np.array([0]), x[:, :0], labels)]:
        before = np.array(total, copy=True)
        assert _jit.add_argmax_hits(total, xx, lab) is False
        np.testing.assert_array_equal(total, before)


# ----------------------------------------------------------------------------- switches
def test_switches_turn_the_kernels_off(monkeypatch):
    saved = _jit._kernels
    try:
        monkeypatch.setenv("ARRAYMLP_JIT", "0")
        _jit.set_enabled(True)  # back to what the environment allows: off
        assert _jit.kernels() is None
        h = np.ones((2, 2))
        assert _jit.bias_relu(h, np.ones(2)) is False
        monkeypatch.delenv("ARRAYMLP_JIT")
        monkeypatch.setitem(sys.modules, "numba", None)  # as if Numba were not installed
        _jit.set_enabled(None)
        assert _jit.kernels() is None
        monkeypatch.delitem(sys.modules, "numba")
        _jit.set_enabled(None)
        assert (_jit.kernels() is not None) == (importlib.util.find_spec("numba") is not None)
        _jit.set_enabled(False)
        assert _jit.kernels() is None
    finally:
        _jit._kernels = saved


# ----------------------------------------------------------------------------- loading only where they pay
_FIT = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import arraymlp as am
from arraymlp.kernels import _jit
if len(sys.argv) > 2:
    _jit.LOAD_COST = float(sys.argv[2])
r = np.random.default_rng(0)
x = r.normal(size=(200, 8)).astype(np.float32)
y = r.integers(0, 3, size=200)
am.MLP([8, 32, 32, 3], activation="relu", output_activation="softmax", seed=0, backend="numpy").fit(
    x, y, loss="cross_entropy", epochs=5, batch_size=32, progress=False)
loaded = _jit._kernels is not None and _jit._kernels is not _jit._UNSET
print("numba" in sys.modules, _jit._spent < _jit.LOAD_COST, loaded)
"""


def _fresh_fit(*args):
    src = str(Path(am.__file__).resolve().parents[1])
    # the NumPy set's own behaviour: neither switch of the environment applies
    env = {k: v for k, v in os.environ.items() if k not in ("ARRAYMLP_JIT", "ARRAYMLP_KERNELS")}
    out = subprocess.run([sys.executable, "-c", _FIT, src, *args], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split()


def test_a_small_first_fit_does_not_import_numba():
    """Five epochs of a small ReLU classifier: the kernels would save well under the time
    loading them takes, so Numba is not even imported."""
    assert _fresh_fit() == ["False", "True", "False"]


@needs_numba
def test_the_kernels_load_once_the_numpy_path_has_cost_what_loading_does():
    """The same fit, with the load taken to cost one millisecond: the tally passes it
    and the kernels load mid-run."""
    assert _fresh_fit("0.001") == ["True", "False", "True"]


@needs_numba
def test_kernels_decline_until_the_tally_reaches_the_load_cost(monkeypatch):
    monkeypatch.setattr(_jit, "_kernels", _jit._UNSET)
    monkeypatch.setattr(_jit, "_spent", 0.0)
    h, b = np.full((10, 10), -1.0), np.ones(10)
    per_call = _jit._CALL_COST["relu"] + _jit._ELEMENT_COST["relu"] * h.size
    monkeypatch.setattr(_jit, "LOAD_COST", 3.5 * per_call)
    assert [_jit.bias_relu(h, b) for _ in range(4)] == [False, False, False, True]
    np.testing.assert_array_equal(h, np.zeros((10, 10)))  # -1 + 1 once: the declined calls wrote nothing
    assert _jit._kernels is not None and _jit.bias_relu(h, b) is True


# ----------------------------------------------------------------------------- on every row
def test_model_forward_is_the_same_with_and_without_kernels(backend):
    kwargs = dict(dtype="float64", seed=3, **backend.model_kwargs())
    model = am.MLP([5, 8, 8, 3], activation="relu", output_activation="softmax", **kwargs)
    x_np = np.random.default_rng(4).standard_normal((7, 5))
    x = backend.asarray(x_np)
    out, caches = model.forward(x, training=True)
    with reference_kernels():
        out_ref, caches_ref = model.forward(x, training=True)
    np.testing.assert_array_equal(backend.to_numpy(out), backend.to_numpy(out_ref))
    assert len(caches) == len(caches_ref) == len(model.layers)
    for c, cr in zip(caches, caches_ref):
        np.testing.assert_array_equal(backend.to_numpy(c), backend.to_numpy(cr))
    # the ReLU caches are the hidden activations, the dense caches their inputs
    h1 = np.maximum(x_np @ backend.to_numpy(model.params[0]["W"]) + backend.to_numpy(model.params[0]["b"]), 0)
    np.testing.assert_allclose(backend.to_numpy(caches[1]), h1, rtol=1e-13)
    np.testing.assert_array_equal(backend.to_numpy(caches[2]), backend.to_numpy(caches[1]))
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)  # the input is not overwritten
    # inference: only the output
    np.testing.assert_array_equal(backend.to_numpy(model(x)), backend.to_numpy(out))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_is_the_same_with_and_without_kernels(backend, dtype):
    r = np.random.default_rng(5)
    x = backend.asarray(r.standard_normal((64, 6)).astype(dtype))
    y = backend.asarray(r.integers(0, 3, 64))

    def train():
        model = am.MLP([6, 16, 16, 3], activation="relu", output_activation="softmax", dtype=dtype, seed=1,
                       **backend.model_kwargs())
        hist = model.fit(x, y, loss="cross_entropy", epochs=3, batch_size=16, optimizer=am.SGD(lr=0.1),
                         shuffle=False, progress=False)
        return model, hist

    model, hist = train()
    with reference_kernels():
        model_ref, hist_ref = train()
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(hist.loss, hist_ref.loss, rtol=tol)
    for p, pr in zip(model.params, model_ref.params):
        for key in p:
            np.testing.assert_allclose(backend.to_numpy(p[key]), backend.to_numpy(pr[key]), rtol=tol, atol=tol)
    assert hist.loss[-1] < hist.loss[0]  # it learns


# ----------------------------------------------------------------------------- failures and edges
@needs_numba
def test_kernels_that_cannot_load_fall_back_with_one_warning(monkeypatch, jit_off):
    saved = _jit._kernels
    x = np.random.default_rng(6).standard_normal((5, 4))
    model = am.MLP([4, 6, 2], activation="relu", backend="numpy", seed=0)
    with jit_off():
        ref = model(x)
    try:
        # as where no cache folder is writeable: the kernels' module raises on import
        monkeypatch.setitem(sys.modules, "arraymlp.kernels._jitkernels", None)
        monkeypatch.delattr(sys.modules["arraymlp.kernels"], "_jitkernels")
        _jit.set_enabled(None)
        with pytest.warns(RuntimeWarning, match="compiled NumPy kernels are off"):
            out = model(x)
        np.testing.assert_array_equal(out, ref)
        assert _jit.kernels() is None
        np.testing.assert_array_equal(model(x), ref)  # no second warning (warnings are errors here)
    finally:
        _jit._kernels = saved


@needs_numba
@pytest.mark.parametrize("kernel", ["bias_relu", "relu_backward", "cross_entropy_labels", "add_argmax_hits"])
def test_a_kernel_that_fails_to_compile_falls_back(kernel):
    saved = _jit._kernels

    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("LLVM said no")
            return fail

    h = np.random.default_rng(7).standard_normal((3, 4))
    before = h.copy()
    try:
        _jit._kernels = Broken()
        with pytest.warns(RuntimeWarning, match="LLVM said no"):
            if kernel == "bias_relu":
                assert _jit.bias_relu(h, np.zeros(4)) is False
            elif kernel == "relu_backward":
                assert _jit.relu_backward(h, before) is False
            elif kernel == "add_argmax_hits":
                total = np.array([0])
                assert _jit.add_argmax_hits(total, h, np.array([0, 1, 2])) is False
                assert total[0] == 0
            else:
                assert _jit.cross_entropy_labels(h, np.array([0, 1, 2])) is None
        np.testing.assert_array_equal(h, before)
        assert _jit.kernels() is None
    finally:
        _jit._kernels = saved


def test_relu_backward_of_overlapping_views_is_numpys():
    buf = np.array([-1.0, -1.0, 2.0, 3.0, 4.0, 5.0])
    y, dy = buf[:4].reshape(2, 2), buf[2:].reshape(2, 2)  # dy starts where y's third entry is
    expected = buf[2:] * (buf[:4] > 0)
    assert _jit.relu_backward(dy, y) is False
    dx, _ = am.ReLU().backward({}, y, dy, xp=np, inplace=True)
    np.testing.assert_array_equal(dx.reshape(-1), expected)  # [0, 0, 4, 5]


def test_a_forward_hook_on_a_layer_is_called():
    model = am.MLP([3, 4, 2], activation="relu", backend="numpy", seed=0)
    x = np.ones((2, 3))
    seen = []
    for layer in model.layers[:2]:
        def hook(*args, _layer=layer, **kwargs):
            seen.append(type(_layer).__name__)
            return type(_layer).forward(_layer, *args, **kwargs)
        layer.forward = hook
    out = model(x)
    assert seen == ["Dense", "Activation"]
    with reference_kernels():
        np.testing.assert_array_equal(model(x), out)


@needs_numba
def test_cross_entropy_kernel_keeps_long_float32_rows_accurate():
    r = np.random.default_rng(8)
    x = r.standard_normal((4, 100_000)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    # NumPy's vectorised exp is faster on rows this long: the library declines the kernel there
    assert x.shape[1] > _jit.CE_MAX_CLASSES and _jit.cross_entropy_labels(x, labels) is None
    g = np.empty_like(x)
    ok, total = _jit.kernels().cross_entropy_labels(x, labels, g, np.float32(1 / 4), np.zeros(1, np.int64))
    assert ok
    xd = x.astype(np.float64)
    m = xd.max(axis=1, keepdims=True)
    s = np.exp(xd - m).sum(axis=1)
    exact = float(np.mean(np.log(s) - (xd[np.arange(4), labels] - m[:, 0])))
    assert total / 4 == pytest.approx(exact, rel=1e-7)
    g_exact = np.exp(xd - m) / s[:, None]
    g_exact[np.arange(4), labels] -= 1
    g_exact /= 4
    np.testing.assert_allclose(g, g_exact, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_kernel_counts_the_accuracy_hits(dtype):
    """With a count, the compiled cross-entropy adds the rows whose arg-max (NumPy's: the
    first highest entry, or the first NaN) is their label, and its loss and gradient are
    bit for bit those of the call without a count; a count it cannot write (int32, read-
    only, two entries) makes it decline, leaving the count as it was."""
    _jit.kernels()
    r = np.random.default_rng(4)
    x = np.round(r.standard_normal((400, 7)) * 2).astype(dtype)  # many ties
    x[3, 2] = x[4, 0] = np.nan
    x[5, 4], x[6, :] = np.nan, np.nan
    x[7, 1], x[8, 3] = np.inf, -np.inf
    x[9, :] = np.inf
    x[10, 5] = -0.0
    labels = np.where(np.arange(400) % 3 == 0, np.argmax(x, axis=1), r.integers(0, 7, 400)).astype(np.int64)
    want = 11 + int(np.count_nonzero(np.argmax(x, axis=1) == labels))
    hits = np.array([11])
    with np.errstate(invalid="ignore"):
        total, g = _jit.cross_entropy_labels(x, labels, hits)
        total0, g0 = _jit.cross_entropy_labels(x, labels)
    assert int(hits[0]) == want
    assert (total == total0 or (math.isnan(total) and math.isnan(total0)))
    np.testing.assert_array_equal(g, g0)
    for bad in (np.array([11], dtype=np.int32), np.array([11, 0]), np.array([11])):
        if bad.shape == (1,) and bad.dtype == np.int64:
            bad.flags.writeable = False
        assert _jit.cross_entropy_labels(x, labels, bad) is None
        assert int(bad[0]) == 11
    bad_labels = labels.copy()
    bad_labels[-1] = 7  # out of range: declined, nothing counted
    hits = np.array([0])
    assert _jit.cross_entropy_labels(x, bad_labels, hits) is None and int(hits[0]) == 0
