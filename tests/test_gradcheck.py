"""gradcheck passes correct gradients and names the parameter behind each classic
hand-written backprop mistake when it is injected into a deliberately broken layer."""

import numpy as np
import pytest

import arraymlp as am

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32:
# gradcheck must still check in float64 (on a host copy) and pass correct gradients
FLOAT64_DATA = "float32"


class BiasNotSummed(am.Dense):
    """Bug: the bias gradient is dy itself, shape (n, k), not summed over the batch."""

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, grads = super().backward(params, cache, dy, xp=xp, need_dx=need_dx)
        grads["b"] = dy
        return dx, grads


class BiasWithoutLearningRate(am.Dense):
    """Bug: the bias step skips the learning rate (b -= db instead of b -= lr * db);
    seen as a gradient, the bias gradient is 1/lr times too large."""

    lr = 0.1

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, grads = super().backward(params, cache, dy, xp=xp, need_dx=need_dx)
        grads["b"] = grads["b"] / self.lr
        return dx, grads


class TransposedWeightGradient(am.Dense):
    """Bug: dW = dy.T @ x, the transpose of x.T @ dy."""

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, grads = super().backward(params, cache, dy, xp=xp, need_dx=need_dx)
        grads["W"] = dy.T @ cache
        return dx, grads


class TanhInsteadOfDerivative(am.Activation):
    """Bug: the backward multiplies by tanh(x) where 1 - tanh(x)^2 belongs."""

    def __init__(self):
        super().__init__("tanh")

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        return dy * cache, {}  # cache is the output tanh(x)


class NaNWeightGradient(am.Dense):
    """Bug: a 0/0 somewhere makes the weight gradient NaN."""

    def backward(self, params, cache, dy, *, xp, need_dx=True):
        dx, grads = super().backward(params, cache, dy, xp=xp, need_dx=need_dx)
        grads["W"] = grads["W"] * float("nan")
        return dx, grads


def _data(backend, n=6, d=3, k=2, seed=0):
    r = np.random.default_rng(seed)
    return backend.asarray(r.normal(size=(n, d))), backend.asarray(r.normal(size=(n, k)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_correct_model_passes(backend, dtype):
    model = am.MLP([3, 5, 4, 2], activation="tanh", layer_norm=True, dtype=dtype, seed=1, **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y, loss="mse", l2=0.1)
    assert report.passed, str(report)
    assert [(r.layer, r.param) for r in report.rows] == [
        (0, "W"), (0, "b"), (1, "gamma"), (1, "beta"), (3, "W"), (3, "b"), (4, "gamma"), (4, "beta"), (6, "W"), (6, "b")
    ]
    assert all(r.max_abs_err < 1e-7 for r in report.rows)
    # the user's model is untouched: still its own dtype
    assert model.params[0]["W"].dtype == getattr(backend.xp, dtype)


def test_a_namespace_without_float64_is_checked_on_a_float64_host_copy(backend):
    """JAX in its 32-bit mode hands back float32 for float64: differences taken there
    would fail correct gradients. gradcheck checks a float64 NumPy copy instead, says so,
    and still catches a wrong gradient."""
    model = am.MLP([3, 5, 2], activation="tanh", seed=1, **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y, loss="mse")
    assert report.passed, str(report)
    assert all(r.max_abs_err < 1e-7 for r in report.rows)
    if backend.has_float64:
        assert report.host_copy is None and "host" not in str(report)
    else:
        assert report.host_copy == "jax"
        assert str(report).splitlines()[-1] == "checked on a float64 NumPy copy on the host: jax has no float64 here"
    broken = am.Sequential([am.Dense(3, 4), am.Tanh(), BiasNotSummed(4, 2)], seed=0, **backend.model_kwargs())
    assert [(r.layer, r.param) for r in am.gradcheck(broken, x, y).failures] == [(2, "b")]
    assert am.gradcheck(am.GELU(), x).passed and am.gradcheck("mse", backend.asarray(np.ones((6, 2)) / 3), y).passed


def test_bias_not_summed_is_caught(backend):
    model = am.Sequential([am.Dense(3, 4), am.Tanh(), BiasNotSummed(4, 2)],
                          dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y)
    assert not report.passed
    assert [(r.layer, r.param) for r in report.failures] == [(2, "b")]
    row = report.row(2, "b")
    assert row.grad_shape == (6, 2) and row.shape == (2,)
    assert "not summed over the batch" in row.note


def test_activation_instead_of_derivative_is_caught(backend):
    model = am.Sequential([am.Dense(3, 4), TanhInsteadOfDerivative(), am.Dense(4, 2)],
                          dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y)
    # the layer after the broken activation is right; the one before it is wrong
    assert {(r.layer, r.param) for r in report.failures} == {(0, "W"), (0, "b")}
    assert report.row(2, "W").passed
    # checking the activation alone points at its input gradient
    layer_report = am.gradcheck(TanhInsteadOfDerivative(), x)
    assert [r.param for r in layer_report.failures] == ["x"]


def test_bias_without_learning_rate_is_caught(backend):
    model = am.Sequential([BiasWithoutLearningRate(3, 4), am.Tanh(), am.Dense(4, 2)],
                          dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y)
    assert [(r.layer, r.param) for r in report.failures] == [(0, "b")]
    row = report.row(0, "b")
    assert row.analytic / row.numeric == pytest.approx(10.0, rel=1e-6)
    assert "a factor 10 off" in row.note


def test_nan_gradient_is_caught(backend):
    model = am.Sequential([am.Dense(3, 4), am.Tanh(), NaNWeightGradient(4, 2)],
                          dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, y = _data(backend)
    report = am.gradcheck(model, x, y)
    assert [(r.layer, r.param) for r in report.failures] == [(2, "W")]
    row = report.row(2, "W")
    assert np.isnan(row.analytic) and row.max_abs_err == np.inf and row.worst_index == (0, 0)


def test_large_losses_do_not_fail_correct_gradients(backend):
    """Targets of order 1e3 to 1e5 give losses up to ~1e10, whose rounding alone puts
    errors far above atol into the difference quotient; the tolerance allows for it,
    while a wrong gradient of the same model still fails."""
    r = np.random.default_rng(3)
    x = backend.asarray(r.normal(size=(6, 3)))
    for scale in (1e3, 1e5):
        y = backend.asarray(scale * r.normal(size=(6, 1)))
        for seed in range(4):
            model = am.MLP([3, 4, 1], activation="tanh", dtype="float64", seed=seed, **backend.model_kwargs())
            report = am.gradcheck(model, x, y)
            assert report.passed, (scale, seed, report)
        broken = am.Sequential([BiasWithoutLearningRate(3, 4), am.Tanh(), am.Dense(4, 1)], dtype="float64",
                               seed=0, **backend.model_kwargs())
        assert [(f.layer, f.param) for f in am.gradcheck(broken, x, y).failures] == [(0, "b")]


def test_report_fields_name_the_worst_entry_even_when_passing(backend):
    model = am.MLP([3, 4, 2], activation="tanh", dtype="float64", seed=0, **backend.model_kwargs())
    x, y = _data(backend)
    row = am.gradcheck(model, x, y).row(0, "W")
    assert row.passed and len(row.worst_index) == 2 and row.analytic != 0.0
    assert row.analytic == pytest.approx(row.numeric, rel=1e-6, abs=1e-8)
    assert 0.0 < row.max_rel_err < 1e-4 and 0.0 < row.max_abs_err < 1e-6


@pytest.mark.parametrize("square", [False, True])
def test_transposed_weight_gradient_is_caught(backend, square):
    k = 3 if square else 2
    model = am.Sequential([am.Dense(3, 4), am.ReLU(), TransposedWeightGradient(4, 4 if square else 2)]
                          if not square else [am.Dense(3, 3), am.Tanh(), TransposedWeightGradient(3, 3)],
                          dtype="float64", seed=0, **backend.model_kwargs())
    x, y = _data(backend, k=k if square else 2)
    report = am.gradcheck(model, x, y)
    assert [(r.layer, r.param) for r in report.failures] == [(2, "W")]
    if not square:
        assert "transposed?" in report.row(2, "W").note
    else:
        assert report.row(2, "W").max_abs_err > 1e-3


def test_raise_on_failure_shows_the_table(backend):
    model = am.Sequential([am.Dense(3, 4), am.Tanh(), BiasNotSummed(4, 2)],
                          dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, y = _data(backend)
    with pytest.raises(
        am.GradcheckError, match=r"(?s)gradient check failed.*2 BiasNotSummed.* b .*NO.*1 of 4 gradients wrong"
    ):
        am.gradcheck(model, x, y, raise_on_failure=True)


@pytest.mark.parametrize("layer", [am.Dense(3, 4), am.LayerNorm(3), am.Softmax(), am.GELU(), am.Dropout(0.3)],
                         ids=repr)
def test_layers_pass(backend, layer):
    x, _ = _data(backend, n=5, d=3)
    report = am.gradcheck(layer, x)
    assert report.passed, str(report)
    assert report.rows[-1].param == "x"


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "binary_cross_entropy", "poisson_nll", "cross_entropy"])
def test_losses_pass(backend, loss):
    r = np.random.default_rng(3)
    out = r.normal(size=(5, 3))
    if loss == "cross_entropy":
        t = r.integers(0, 3, size=5)
    elif loss == "binary_cross_entropy":
        t = r.integers(0, 2, size=(5, 3)).astype(float)
    elif loss == "poisson_nll":
        t = r.poisson(2.0, size=(5, 3)).astype(float)
    else:
        t = r.normal(size=(5, 3))
    report = am.gradcheck(loss, backend.asarray(out), backend.asarray(t))
    assert report.passed, str(report)
    assert report.rows[0].n_checked == 15


def test_report_table_has_one_line_per_parameter():
    model = am.MLP([2, 3, 1], backend="numpy", dtype="float64", seed=0)
    x = np.linspace(-1, 1, 8).reshape(4, 2)
    report = am.gradcheck(model, x, np.ones((4, 1)))
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert lines[-1].startswith("all gradients match")
    assert bool(report) is True


def test_max_checks_samples_large_parameters():
    model = am.MLP([30, 20, 1], backend="numpy", dtype="float64", seed=0)
    x = np.random.default_rng(0).normal(size=(4, 30))
    report = am.gradcheck(model, x, np.ones((4, 1)), max_checks=25)
    assert report.row(0, "W").n_checked == 25 and report.row(0, "b").n_checked == 20
    assert report.passed


def test_gradcheck_rejects_other_objects():
    with pytest.raises(TypeError, match="gradcheck takes a model, a layer or a loss name"):
        am.gradcheck(42)
    with pytest.raises(ValueError, match="needs x and y"):
        am.gradcheck(am.MLP([2, 1], backend="numpy"))
