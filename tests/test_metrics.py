"""Metrics: every named metric against scikit-learn on every backend row, whole or
accumulated over uneven batches; History's per-epoch values against a recomputation;
evaluate() against a computation by hand; and the host reads stay at the epoch's end."""

from __future__ import annotations

import numpy as np
import pytest

import arraymlp as am
from arraymlp import metrics as M
from arraymlp.optim import SGD

skm = pytest.importorskip("sklearn.metrics")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _multiclass_data(n=53, k=6, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 4))
    y = (np.argmax(x @ r.normal(size=(4, k)) + r.normal(size=(n, k)), axis=1)).astype(np.int64)
    return x, y


def _regression_data(n=53, m=3, seed=0, offset=100.0):
    """Targets far from 0 (offset) with unequal spreads: R^2 from raw sums of y and y^2
    in float32 would lose its digits."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 4))
    y = offset + x[:, :m] * np.array([1.0, 3.0, 0.2])[:m] + 0.5 * r.normal(size=(n, m))
    return x, y


# ---------------------------------------------------------------- the metrics as functions
def test_metric_functions_match_sklearn(backend, rng):
    n, k = 41, 5
    labels = rng.integers(0, k, size=n)
    pred = np.where(rng.uniform(size=n) < 0.6, labels, rng.integers(0, k, size=n))
    scores = rng.normal(size=(n, k))
    y = rng.normal(size=(n, 3)) + 10.0
    p = y + rng.normal(size=(n, 3)) * np.array([0.1, 1.0, 3.0])
    B = backend.asarray
    tol = 1e-15 if backend.has_float64 else 1e-6  # JAX's 32-bit mode: the metrics are float32

    def value(a):
        return float(backend.to_numpy(a))

    assert value(M.accuracy(B(labels), B(pred))) == pytest.approx(skm.accuracy_score(labels, pred), abs=tol)
    binary = (labels > 1).astype(bool)
    assert value(M.accuracy(B(binary), B(pred > 1))) == pytest.approx(skm.accuracy_score(binary, pred > 1),
                                                                       abs=tol)
    multi = rng.uniform(size=(n, 3)) > 0.5  # several 0/1 outputs: the fraction of right values
    multi_pred = np.where(rng.uniform(size=(n, 3)) < 0.7, multi, ~multi)
    assert value(M.accuracy(B(multi.astype(np.float64)), B(multi_pred.astype(np.float64)))) == pytest.approx(
        1 - skm.hamming_loss(multi, multi_pred), abs=tol)
    for kk in (1, 2, 4):
        want = skm.top_k_accuracy_score(labels, scores, k=kk, labels=np.arange(k))
        assert value(M.top_k_accuracy(kk)(B(labels), B(scores))) == pytest.approx(want, abs=tol)
    assert value(M.mae(B(y), B(p))) == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-12)
    assert value(M.r2(B(y), B(p))) == pytest.approx(skm.r2_score(y, p), rel=1e-12)
    assert value(M.r2(B(y[:, 0]), B(p[:, 0]))) == pytest.approx(skm.r2_score(y[:, 0], p[:, 0]), rel=1e-12)
    # a constant target column: 1 when predicted exactly, 0 otherwise (scikit-learn's rule)
    yc = y.copy()
    yc[:, 1] = 4.0
    pc = p.copy()
    pc[:, 1] = 4.0
    assert value(M.r2(B(yc), B(pc))) == pytest.approx(skm.r2_score(yc, pc), rel=1e-12)
    pc[:, 1] = 4.5
    assert value(M.r2(B(yc), B(pc))) == pytest.approx(skm.r2_score(yc, pc), rel=1e-12)


def test_accuracy_never_broadcasts_a_column_against_a_vector(backend):
    y = backend.asarray(np.array([0, 1, 1, 0]))
    pred = backend.asarray(np.array([[0], [1], [0], [0]]))
    with pytest.raises(ValueError, match=r"y_pred has shape \(4, 1\) but y_true has shape \(4,\)"):
        M.accuracy(y, pred)
    with pytest.raises(ValueError, match=r"y_pred has shape \(4, 1\) but y_true has shape \(4,\)"):
        M.mae(backend.asarray(np.zeros(4)), backend.asarray(np.zeros((4, 1))))


def test_metric_lookup_and_checks():
    assert M.get_metric("accuracy") is M.accuracy and M.get_metric(M.r2) is M.r2
    assert M.get_metric("top_k_accuracy").k == 5 and M.top_k_accuracy(3).name == "top_3_accuracy"
    with pytest.raises(ValueError, match="unknown metric 'f1'; known metrics: accuracy, top_k_accuracy, mae, r2"):
        M.get_metric("f1")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        M.top_k_accuracy(0)
    with pytest.raises(ValueError, match="'mae' is for regression losses, but the loss is a multiclass one"):
        M.get_metrics(["mae"], "multiclass", 3)
    with pytest.raises(ValueError, match="'accuracy' is for classification losses"):
        M.get_metrics(["accuracy"], "regression", 1)
    with pytest.raises(ValueError, match=r"k=5 is not below the 3 classes.*top_k_accuracy\(k\) with k < 3"):
        M.get_metrics(["top_k_accuracy"], "multiclass", 3)
    with pytest.raises(ValueError, match="the name 'accuracy' appears twice"):
        M.get_metrics(["accuracy", M.accuracy], "multiclass", 3)


# ---------------------------------------------------------------- evaluate
@pytest.mark.parametrize("batch_size", [7, 4096])
def test_evaluate_multiclass_matches_a_manual_computation(backend, batch_size):
    x_np, y_np = _multiclass_data()
    model = am.MLP([4, 8, 6], dtype="float64", seed=0, **backend.model_kwargs())  # logits out
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model.fit(x, y, lr=0.01, epochs=2, batch_size=8, progress=False)
    got = model.evaluate(x, y, metrics=["accuracy", "top_k_accuracy", M.top_k_accuracy(2)],
                         batch_size=batch_size)
    logits = backend.to_numpy(model(x))
    p = _softmax(logits)
    want_loss = -np.mean(np.log(p[np.arange(len(y_np)), y_np]))
    assert set(got) == {"loss", "accuracy", "top_k_accuracy", "top_2_accuracy"}
    assert all(type(v) is float for v in got.values())
    assert got["loss"] == pytest.approx(want_loss, rel=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_np, logits.argmax(axis=1)), abs=1e-15)
    assert got["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_np, p, k=5, labels=range(6)))
    assert got["top_2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_np, p, k=2, labels=range(6)))
    # default metrics: the loss's (accuracy here)
    assert model.evaluate(x, y, batch_size=batch_size) == {"loss": got["loss"], "accuracy": got["accuracy"]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_evaluate_regression_matches_sklearn_over_uneven_batches(backend, dtype):
    x_np, y_np = _regression_data()
    model = am.MLP([4, 8, 3], dtype=dtype, seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np, dtype), backend.asarray(y_np, dtype)
    model.fit(x, y, lr=0.05, epochs=3, batch_size=8, progress=False)
    got = model.evaluate(x, y, metrics=["mae", "r2"], batch_size=10)  # 53 rows: 5 batches of 10 and one of 3
    out = backend.to_numpy(model(x)).astype(np.float64)
    y64 = y_np.astype(dtype).astype(np.float64)
    rel = 1e-12 if dtype == "float64" else 1e-5
    assert got["loss"] == pytest.approx(np.mean((out - y64) ** 2), rel=rel)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y64, out), rel=rel)
    assert got["r2"] == pytest.approx(skm.r2_score(y64, out), rel=rel, abs=rel)
    assert model.evaluate(x, y)["r2"] == pytest.approx(got["r2"], rel=rel, abs=rel)  # r2 by default


def test_evaluate_binary_and_a_callable_metric(backend):
    r = np.random.default_rng(3)
    x_np = r.normal(size=(37, 3))
    y_np = (x_np[:, 0] + r.normal(size=37) > 0).astype(np.int64)
    model = am.MLP([3, 5, 1], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model.fit(x, y, lr=0.05, epochs=3, batch_size=8, progress=False)

    def false_positive_rate_share(y_true, y_pred, *, xp):
        assert tuple(y_pred.shape) == tuple(y_true.shape)  # predict's form: (n,) for (n,) labels
        return xp.mean(xp.astype((y_pred == 1) & (y_true == 0), xp.float64))

    got = model.evaluate(x, y, metrics=["accuracy", false_positive_rate_share], batch_size=8)
    p = backend.to_numpy(model(x))[:, 0]  # the sigmoid output: probabilities
    pred = (p > 0.5).astype(np.int64)
    assert got["loss"] == pytest.approx(skm.log_loss(y_np, p), rel=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_np, pred), abs=1e-15)
    assert got["false_positive_rate_share"] == pytest.approx(np.mean((pred == 1) & (y_np == 0)), abs=1e-15)


# ---------------------------------------------------------------- History
def test_history_records_accuracy_per_epoch(backend):
    """One batch per epoch: the training accuracy of an epoch is that of the parameters
    at its start, the validation accuracy that of the parameters at its end."""
    x_np, y_np = _multiclass_data(n=40)
    xv_np, yv_np = _multiclass_data(n=23, seed=1)
    model = am.MLP([4, 8, 6], output_activation="softmax", dtype="float64", seed=0, **backend.model_kwargs())
    x, y, xv = backend.asarray(x_np), backend.asarray(y_np), backend.asarray(xv_np)

    class Recompute(am.Callback):
        def __init__(self):
            self.train, self.val, self.top2 = [], [], []

        def on_epoch_begin(self, model, epoch):
            self.train.append(skm.accuracy_score(y_np, backend.to_numpy(model.predict(x))))

        def on_epoch_end(self, model, logs):
            p = backend.to_numpy(model.predict_proba(xv))
            self.val.append(skm.accuracy_score(yv_np, p.argmax(axis=1)))
            self.top2.append(skm.top_k_accuracy_score(yv_np, p, k=2, labels=range(6)))

    cb = Recompute()
    h = model.fit(x, y, optimizer=SGD(lr=0.5), epochs=4, batch_size=40, callbacks=[cb],
                  validation_data=(xv, backend.asarray(yv_np)), metrics=["accuracy", M.top_k_accuracy(2)],
                  progress=False)
    assert sorted(h.metrics) == ["accuracy", "top_2_accuracy", "val_accuracy", "val_top_2_accuracy"]
    np.testing.assert_allclose(h["accuracy"], cb.train, atol=1e-15)
    np.testing.assert_allclose(h["val_accuracy"], cb.val, atol=1e-15)
    np.testing.assert_allclose(h.val_metric, cb.val, atol=1e-15)
    np.testing.assert_allclose(h["val_top_2_accuracy"], cb.top2, atol=1e-15)
    assert len(set(h["accuracy"])) > 1  # it moved: the values are the epochs' own



@pytest.mark.parametrize("case", ["labels", "one-hot", "weighted", "batch-callback", "adam"])
def test_training_accuracy_counted_by_the_loss_equals_sklearn(backend, monkeypatch, case):
    """With a zero learning rate every batch sees the same parameters, so the training
    accuracy over uneven batches equals scikit-learn's on the whole data, whether the
    cross-entropy's own pass counts it (labels, with plain SGD or Adam, and in the loop
    that reads each step's loss) or the metric's hook does (one-hot targets, sample
    weights); the loss counts it exactly in the label cases."""
    from arraymlp.kernels import kernels_for

    x_np, y_np = _multiclass_data(n=47)
    model = am.MLP([4, 8, 6], output_activation="softmax", dtype="float64", seed=0, **backend.model_kwargs())
    x = backend.asarray(x_np)
    ks = kernels_for(backend.xp)
    counted = []
    real = ks.cross_entropy_labels_mean_hits
    monkeypatch.setattr(ks, "cross_entropy_labels_mean_hits", lambda *a: counted.append(1) or real(*a))
    kw = dict(optimizer=am.Adam(lr=0.0) if case == "adam" else SGD(lr=0.0), epochs=2, batch_size=6, progress=False)
    y = backend.asarray(np.eye(6)[y_np] if case == "one-hot" else y_np)
    if case == "weighted":
        kw["sample_weight"] = backend.asarray(np.ones(47))
    if case == "batch-callback":
        class Watch(am.Callback):
            def on_batch_end(self, model, logs):
                return False

        kw["callbacks"] = [Watch()]
    h = model.fit(x, y, **kw)
    want = skm.accuracy_score(y_np, backend.to_numpy(model.predict(x)))
    assert h["accuracy"] == [want, want]
    assert len(counted) == (0 if case in ("one-hot", "weighted") else 16)  # 8 batches an epoch


def test_history_metrics_accumulate_over_uneven_batches(backend):
    """With a zero learning rate every batch sees the same parameters, so the epoch's
    accumulated metrics equal scikit-learn's on the whole data (7 batches, the last short)."""
    x_np, y_np = _regression_data(n=45)
    model = am.MLP([4, 8, 3], dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    h = model.fit(x, y, optimizer=SGD(lr=0.0), epochs=2, batch_size=7, metrics=["mae", "r2"], progress=False)
    out = backend.to_numpy(model(x))
    for name, want in (("mae", skm.mean_absolute_error(y_np, out)), ("r2", skm.r2_score(y_np, out))):
        np.testing.assert_allclose(h[name], [want, want], rtol=1e-12)
    assert h.loss[0] == pytest.approx(np.mean((out - y_np) ** 2), rel=1e-12)
    with pytest.raises(KeyError, match="History has no series 'accuracy'; it has loss, val_loss, lr, time, mae"):
        h["accuracy"]


def test_classification_records_accuracy_by_default_and_regression_nothing(backend):
    x_np, y_np = _multiclass_data(n=30)
    model = am.MLP([4, 6, 6], seed=0, **backend.model_kwargs())
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), epochs=2, progress=False)
    assert model.loss_ == "cross_entropy" and list(h.metrics) == ["accuracy"] and len(h["accuracy"]) == 2
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), epochs=2, metrics=[], progress=False)
    assert h.metrics == {}
    xr, yr = _regression_data(n=30)
    model = am.MLP([4, 6, 3], seed=0, **backend.model_kwargs())
    h = model.fit(backend.asarray(xr), backend.asarray(yr), epochs=2, validation_split=0.2, progress=False)
    assert list(h.metrics) == ["val_r2"] and h["val_r2"] == h.val_metric


def test_metrics_are_read_once_per_epoch(backend, monkeypatch):
    """The sums stay on the device through the epoch's steps: one read of the training
    metrics and one of the validation pass per epoch, whatever the number of batches."""
    import arraymlp.training as T

    calls = []
    real = T.read_results

    def counting(accs, xp):
        calls.append(len(accs))
        return real(accs, xp)

    monkeypatch.setattr(T, "read_results", counting)
    x_np, y_np = _multiclass_data(n=50)
    model = am.MLP([4, 6, 6], seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model.fit(x, y, epochs=3, batch_size=5, validation_data=(x, y), metrics=["accuracy", M.top_k_accuracy(2)],
              progress=False)
    assert calls == [2, 3] * 3  # training: 2 metrics; validation: the loss and 2 metrics


def test_fit_refuses_metrics_that_do_not_fit_the_loss_before_training(backend):
    x_np, y_np = _multiclass_data(n=20, k=3)
    model = am.MLP([4, 5, 3], output_activation="softmax", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model(x)
    before = [{k: backend.to_numpy(v).copy() for k, v in p.items()} for p in model.params]
    with pytest.raises(ValueError, match="metric 'r2' is for regression losses"):
        model.fit(x, y, metrics=["r2"], progress=False)
    with pytest.raises(ValueError, match=r"top_k_accuracy: k=5 is not below the 3 classes"):
        model.fit(x, y, metrics=["top_k_accuracy"], progress=False)
    with pytest.raises(ValueError, match="unknown metric 'precision'"):
        model.evaluate(x, y, metrics=["precision"])
    for p, q in zip(model.params, before):
        for k in p:
            np.testing.assert_array_equal(backend.to_numpy(p[k]), q[k])


def test_history_of_a_callable_metric_matches_a_recomputation(backend):
    """A callable gets each batch's targets and predict's predictions; with a zero
    learning rate its batch-size-weighted mean over 6 uneven batches is its value on
    the whole data."""
    x_np, y_np = _multiclass_data(n=41)
    model = am.MLP([4, 8, 6], dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    seen = []

    def error_rate(y_true, y_pred, *, xp):
        seen.append(tuple(y_pred.shape))
        return xp.mean(xp.astype(y_true != y_pred, xp.float64))

    h = model.fit(x, y, optimizer=SGD(lr=0.0), epochs=2, batch_size=8, metrics=[error_rate], progress=False)
    want = 1 - skm.accuracy_score(y_np, backend.to_numpy(model.predict(x)))
    np.testing.assert_allclose(h["error_rate"], [want, want], rtol=1e-12, atol=1e-15)
    assert seen[:6] == [(8,)] * 5 + [(1,)]


def test_history_metrics_under_mixed_precision(backend):
    """Under precision="float16" the metrics read the float16 forward pass of each step:
    with a zero learning rate, the epoch's accuracy is that of a float16 copy."""
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16")
    x_np, y_np = _multiclass_data(n=45)
    model = am.MLP([4, 8, 6], seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np, "float32"), backend.asarray(y_np)
    h = model.fit(x, y, optimizer=SGD(lr=0.0), epochs=1, batch_size=8, precision="float16", progress=False)
    half = model.copy(dtype="float16")
    pred = backend.to_numpy(half.predict(backend.asarray(x_np, "float16")))
    assert h["accuracy"] == [pytest.approx(skm.accuracy_score(y_np, pred), abs=1e-15)]
