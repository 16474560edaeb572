"""Tests of the fit loop (:mod:`arraymlp.training`): mini-batches, shuffling, validation,
early stopping, callbacks, schedules, the divergence guard, partial_fit, predict, progress
output, the small problems users bring, and acceptance figures on scikit-learn's bundled
data sets.

Every test runs on every backend row except the NumPy-only bit-identity test and the data
set acceptance tests, which run on NumPy and torch to stay fast.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

import arraymlp as am
from arraymlp.optim import SGD, Adam
from arraymlp.schedules import CosineAnnealing, LinearWarmup, ReduceOnPlateau, StepDecay
from arraymlp.training import Callback, DivergenceError, EarlyStopping, History
from conftest import BACKEND_ROWS

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32
FLOAT64_DATA = "float32"

ACCEPTANCE_ROWS = [row for row in BACKEND_ROWS if row.id in ("numpy", "torch")]


pytestmark = pytest.mark.usefixtures("one_blas_thread")


# ----------------------------------------------------------------------------- helpers
def host_params(model):
    """The model's parameters as float64 NumPy copies."""
    return [{k: np.array(am.to_numpy(v), dtype=np.float64) for k, v in p.items()} for p in model.params]


def assert_params_equal(got, expected, rtol=0.0, atol=0.0):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        for k in g:
            if rtol == 0.0 and atol == 0.0:
                np.testing.assert_array_equal(g[k], e[k])
            else:
                np.testing.assert_allclose(g[k], e[k], rtol=rtol, atol=atol)


def params_differ(a, b) -> bool:
    return any(not np.array_equal(pa[k], pb[k]) for pa, pb in zip(a, b) for k in pa)


def regression_data(n=20, n_features=3, n_outputs=2, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, n_features))
    w = r.normal(size=(n_features, n_outputs))
    y = np.tanh(x @ w) + 0.1 * r.normal(size=(n, n_outputs))
    return x, y


def blobs(n_per_class=20, seed=0):
    """Three well separated Gaussian blobs in 2-D; integer labels."""
    r = np.random.default_rng(seed)
    centres = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
    x = np.concatenate([c + 0.4 * r.normal(size=(n_per_class, 2)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    order = r.permutation(len(y))
    return x[order], y[order]


class Snapshots(Callback):
    """Records the parameters (host copies) after every batch and every epoch."""

    def __init__(self):
        self.after_batch, self.after_epoch, self.epochs_begun = [], [], 0

    def on_epoch_begin(self, model, epoch):
        self.epochs_begun += 1

    def on_batch_end(self, model, logs):
        self.after_batch.append(host_params(model))

    def on_epoch_end(self, model, logs):
        self.after_epoch.append(host_params(model))


def _scaled_split(loader, *, stratify: bool, scale_y: bool = False, random_state: int = 0):
    """A 25% held-out split of one of scikit-learn's bundled data sets, standardised
    with statistics of the training part (targets too when ``scale_y``)."""
    pytest.importorskip("sklearn")
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = loader(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=random_state, stratify=y if stratify else None
    )
    sx = StandardScaler().fit(x_tr)
    x_tr, x_te = sx.transform(x_tr).astype(np.float32), sx.transform(x_te).astype(np.float32)
    if scale_y:
        return x_tr, x_te, y_tr, y_te, StandardScaler().fit(y_tr[:, None])
    return x_tr, x_te, y_tr, y_te


# ------------------------------------------------------------------------ mini-batches
def test_one_epoch_equals_hand_written_sgd_loop(backend):
    """shuffle=False + plain SGD: one epoch is the loop over consecutive slices."""
    x_np, y_np = regression_data(n=10)
    model = am.MLP([3, 5, 2], activation="tanh", dtype="float64", seed=1, **backend.model_kwargs())
    ref = model.copy()
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    lr, batch = 0.1, 4

    history = model.fit(x, y, loss="mse", optimizer=SGD(lr=lr), epochs=1, batch_size=batch,
                        shuffle=False, progress=False)

    values, sizes = [], []
    for start in range(0, 10, batch):  # slices of 4, 4, 2
        stop = min(start + batch, 10)  # the standard leaves out-of-bounds slice ends unspecified
        xb, yb = x[start:stop, ...], y[start:stop, ...]
        value, grads = ref.loss_and_grads(xb, yb, loss="mse")
        ref.params = [{k: p[k] - lr * g[k] for k in p} for p, g in zip(ref.params, grads)]
        values.append(float(value))
        sizes.append(int(xb.shape[0]))
    assert sizes == [4, 4, 2]
    assert_params_equal(host_params(model), host_params(ref), rtol=1e-12, atol=1e-14)
    # the epoch's loss is the batch losses' mean weighted by batch size
    assert history.loss[0] == pytest.approx(np.dot(values, sizes) / 10, rel=1e-12)
    assert model.steps_ == 3
    assert backend.same_place(model.params[0]["W"])


def _numpy_fit(params, x, y, w, *, lr, momentum, l2, batch, epochs):
    """fit's mini-batch loop written out in NumPy float64 for a tanh-identity MLP and a
    weighted mse: ``L_b = sum_i w_i mean_j (o_ij - t_ij)^2 / sum_i w_i + l2/2 sum |W|^2``
    per batch, rows in order, the last batch shorter; SGD with PyTorch's momentum
    (``buf = g`` at the first step, then ``buf = m buf + g``; ``p -= lr buf``)."""
    W1, b1, W2, b2 = (np.array(a, dtype=np.float64) for a in params)
    bufs, losses = None, []
    for _ in range(epochs):
        total = 0.0
        for s in range(0, len(x), batch):
            xb, yb, wb = x[s:s + batch], y[s:s + batch], w[s:s + batch]
            h = np.tanh(xb @ W1 + b1)
            o = h @ W2 + b2
            per_row = np.mean((o - yb) ** 2, axis=1)
            value = np.sum(wb * per_row) / np.sum(wb) + l2 / 2 * (np.sum(W1**2) + np.sum(W2**2))
            total += value * len(xb)
            do = 2 * (o - yb) / yb.shape[1] * (wb / np.sum(wb))[:, None]
            gW2, gb2 = h.T @ do + l2 * W2, do.sum(0)
            dz = (do @ W2.T) * (1 - h**2)
            gW1, gb1 = xb.T @ dz + l2 * W1, dz.sum(0)
            grads = [gW1, gb1, gW2, gb2]
            bufs = grads if bufs is None or momentum == 0 else [momentum * b + g for b, g in zip(bufs, grads)]
            W1, b1, W2, b2 = (p - lr * b for p, b in zip((W1, b1, W2, b2), bufs))
        losses.append(total / len(x))
    return [W1, b1, W2, b2], losses


@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0: the update fused into backpropagation
def test_weighted_l2_momentum_short_last_batch_against_numpy(backend, momentum):
    """Sample weights, L2, momentum and a last batch of 2 rows out of 10, two epochs in
    order: the parameters and the epoch losses of an independent NumPy float64 loop."""
    backend.skip_without_float64()
    r = np.random.default_rng(4)
    x_np, y_np, w_np = r.normal(size=(10, 3)), r.normal(size=(10, 2)), r.uniform(0.1, 2.0, size=10)
    model = am.MLP([3, 5, 2], activation="tanh", dtype="float64", seed=2, **backend.model_kwargs())
    start = [np.array(backend.to_numpy(model.params[i][k])) for i, k in ((0, "W"), (0, "b"), (2, "W"), (2, "b"))]
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), sample_weight=backend.asarray(w_np), loss="mse",
                  optimizer=SGD(lr=0.1, momentum=momentum), l2=0.01, epochs=2, batch_size=4, shuffle=False,
                  progress=False)
    want, losses = _numpy_fit(start, x_np, y_np, w_np, lr=0.1, momentum=momentum, l2=0.01, batch=4, epochs=2)
    got = [backend.to_numpy(model.params[i][k]) for i, k in ((0, "W"), (0, "b"), (2, "W"), (2, "b"))]
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h.loss, losses, rtol=1e-12)


# --------------------------------------------------------------------------- shuffling
def _batch_orders(backend, epochs=3, n=16, seed=7):
    """Which sample each batch of size 1 held, epoch by epoch, read back from the
    per-batch losses of a model that does not move (learning rate 0)."""
    r = np.random.default_rng(3)
    x_np = r.normal(size=(n, 2))
    y_np = np.arange(n, dtype=np.float64)[:, None]  # distinct targets -> distinct losses
    model = am.MLP([2, 4, 1], dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    per_sample = np.array([float(model.loss(x[i:i + 1, ...], y[i:i + 1, ...])) for i in range(n)])
    assert len(np.unique(per_sample)) == n

    class Losses(Callback):
        def __init__(self):
            self.by_epoch = []

        def on_epoch_begin(self, model, epoch):
            self.by_epoch.append([])

        def on_batch_end(self, model, logs):
            self.by_epoch[-1].append(logs["loss"])

    rec = Losses()
    model.fit(x, y, loss="mse", optimizer=SGD(lr=0.0), epochs=epochs, batch_size=1, seed=seed,
              callbacks=[rec], progress=False)
    orders = []
    for losses in rec.by_epoch:
        idx = [int(np.argmin(np.abs(per_sample - v))) for v in losses]
        np.testing.assert_allclose(per_sample[idx], losses, rtol=1e-12)
        orders.append(idx)
    return orders


def test_shuffle_draws_a_fresh_permutation_every_epoch(backend):
    orders = _batch_orders(backend)
    n = 16
    for order in orders:
        assert sorted(order) == list(range(n))  # every sample exactly once per epoch
        assert order != list(range(n))
    assert len({tuple(o) for o in orders}) == len(orders)  # a new order each epoch
    # the batch order comes from the host stream: the same seed gives it on every backend
    if backend.id != "numpy":
        from conftest import Backend

        assert orders == _batch_orders(Backend("numpy", "numpy"))


def _fit_shuffled(backend, *, seed):
    x_np, y_np = regression_data(n=30)
    model = am.MLP([3, 8, 2], dtype="float64", seed=0, **backend.model_kwargs())
    model.fit(backend.asarray(x_np), backend.asarray(y_np), loss="mse", epochs=3, batch_size=7,
              seed=seed, progress=False)
    return host_params(model)


def test_same_seed_bit_identical_on_numpy():
    """NumPy only: bit identity of two runs is a promise of the host backend."""
    from conftest import Backend

    numpy_row = Backend("numpy", "numpy")
    a = _fit_shuffled(numpy_row, seed=11)
    b = _fit_shuffled(numpy_row, seed=11)
    c = _fit_shuffled(numpy_row, seed=12)
    assert_params_equal(a, b)
    assert params_differ(a, c)


def test_seed_reproducible_and_matches_numpy(backend):
    a = _fit_shuffled(backend, seed=11)
    b = _fit_shuffled(backend, seed=11)
    c = _fit_shuffled(backend, seed=12)
    assert_params_equal(a, b, rtol=1e-12, atol=1e-14)
    assert params_differ(a, c)
    if backend.id != "numpy":
        from conftest import Backend

        assert_params_equal(a, _fit_shuffled(Backend("numpy", "numpy"), seed=11), rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------- validation
def test_validation_split_holds_out_last_rows(backend):
    x_np, labels = blobs(n_per_class=7, seed=1)  # 21 rows; round(21 * 0.25) = 5 held out
    model = am.MLP([2, 6, 3], dtype="float64", seed=2, **backend.model_kwargs())
    twin = model.copy()
    x, y = backend.asarray(x_np), backend.asarray(labels)
    x_val, y_val = x[16:, ...], y[16:]

    class Evaluate(Callback):
        def __init__(self):
            self.val_loss, self.val_acc = [], []

        def on_epoch_end(self, model, logs):
            self.val_loss.append(float(model.loss(x_val, y_val, loss="cross_entropy")))
            pred = backend.to_numpy(model.predict(x_val))
            self.val_acc.append(float(np.mean(pred == labels[16:])))

    ev = Evaluate()
    epochs = 4
    kw = dict(loss="cross_entropy", optimizer=SGD(lr=0.2), epochs=epochs, batch_size=5, shuffle=False,
              progress=False)
    h = model.fit(x, y, validation_split=0.25, callbacks=[ev], **kw)
    kw["optimizer"] = SGD(lr=0.2)
    h_twin = twin.fit(x[:16, ...], y[:16], validation_data=(x_val, y_val), **kw)

    # trained on the first 16 rows, validated on the last 5
    assert_params_equal(host_params(model), host_params(twin), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h.loss, h_twin.loss, rtol=1e-12)
    np.testing.assert_allclose(h.val_loss, h_twin.val_loss, rtol=1e-12)
    # the history: one entry per epoch of each series, with the right values
    assert isinstance(h, History)
    assert h.epochs == epochs
    for series in (h.loss, h.val_loss, h.val_metric, h.lr, h.time):
        assert len(series) == epochs
    assert h.metric_name == "accuracy"
    assert h.lr == [0.2] * epochs
    assert all(t > 0 for t in h.time)
    np.testing.assert_allclose(h.val_loss, ev.val_loss, rtol=1e-12)
    np.testing.assert_allclose(h.val_metric, ev.val_acc, rtol=1e-12)
    assert h.val_loss[-1] < h.val_loss[0]
    assert not h.stopped_early


def test_validation_metric_is_r2_for_regression(backend):
    x_np, y_np = regression_data(n=24)
    model = am.MLP([3, 8, 2], dtype="float64", seed=3, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)

    class R2(Callback):
        def __init__(self):
            self.r2, self.mse = [], []

        def on_epoch_end(self, model, logs):
            out = backend.to_numpy(model(x[18:, ...]))
            t = y_np[18:]
            # per output, then averaged (scikit-learn's r2_score, multioutput="uniform_average")
            self.r2.append(np.mean(1 - np.sum((t - out) ** 2, axis=0) / np.sum((t - t.mean(axis=0)) ** 2, axis=0)))
            self.mse.append(np.mean((t - out) ** 2))

    cb = R2()
    h = model.fit(x, y, loss="mse", epochs=3, batch_size=6, validation_split=0.25, callbacks=[cb],
                  seed=0, progress=False)
    assert h.metric_name == "r2"
    np.testing.assert_allclose(h.val_metric, cb.r2, rtol=1e-10)
    np.testing.assert_allclose(h.val_loss, cb.mse, rtol=1e-10)


def test_the_loss_task_decides_metric_and_predictions():
    """A custom loss's task, not its name, makes fit a classifier's (accuracy, labels from
    predict) or a regressor's (R^2, raw outputs)."""
    x, y = blobs(n_per_class=8)
    ce = am.LOSSES["cross_entropy"]
    for task, metric in (("multiclass", "accuracy"), ("regression", "r2")):
        loss = am.Loss("my_ce", ce.fn, "softmax", "labels_or_probs", task=task)
        model = am.MLP([2, 6, 3], dtype="float64", seed=0, backend="numpy")
        h = model.fit(x, y, loss=loss, optimizer=SGD(lr=0.5), epochs=30, batch_size=8, progress=False)
        assert model.task_ == task and h.metric_name == metric
        logits = model(x)
        if task == "multiclass":
            np.testing.assert_array_equal(model.predict(x), np.argmax(logits, axis=1))
            np.testing.assert_array_equal(model.predict(x), y)  # well separated blobs: all right
        else:
            np.testing.assert_array_equal(model.predict(x), logits)


# ---------------------------------------------------------------------- early stopping
def _line_problem(backend):
    """A bias-free 1 -> 1 linear model starting at w = 0, trained full-batch towards
    y = 2x while validated on y = x: w climbs 0 -> 2, so the validation loss falls until w
    passes 1 and rises after."""
    x_np = np.linspace(0.5, 1.5, 8)[:, None]
    model = am.Sequential([am.Dense(1, 1, bias=False)], dtype="float64", seed=0, **backend.model_kwargs())
    model.params[0]["W"] = model.params[0]["W"] * 0.0
    x = backend.asarray(x_np)
    return model, x, backend.asarray(2 * x_np), (x, backend.asarray(x_np))


def _expected_stop(val_loss, patience, min_delta):
    """(best epoch, last epoch run) by the rule: an improvement beats the best by more
    than min_delta; stop once more than `patience` epochs in a row did not improve."""
    best, best_epoch, wait = math.inf, None, 0
    for epoch, v in enumerate(val_loss):
        if v < best - min_delta:
            best, best_epoch, wait = v, epoch, 0
        else:
            wait += 1
            if wait > patience:
                return best_epoch, epoch
    return best_epoch, len(val_loss) - 1


@pytest.mark.parametrize("min_delta", [0.0, 0.02])
def test_early_stopping_restores_best_weights(backend, min_delta):
    kw = dict(loss="mse", epochs=40, batch_size=8, shuffle=False, progress=False)
    # the whole trajectory, without early stopping: the validation loss falls, then rises
    model, x, y, val = _line_problem(backend)
    full = np.asarray(model.fit(x, y, optimizer=SGD(lr=0.05), validation_data=val, **kw).val_loss)
    turn = int(np.argmin(full))
    assert 3 <= turn < 20
    assert np.all(np.diff(full[:turn + 1]) < 0) and np.all(np.diff(full[turn:]) > 0)

    patience = 2
    best_epoch, last_epoch = _expected_stop(full, patience, min_delta)
    if min_delta == 0.0:
        assert best_epoch == turn
    else:  # the last small improvements before the turn do not count
        assert best_epoch < turn

    model, x, y, val = _line_problem(backend)
    snaps = Snapshots()
    h = model.fit(x, y, optimizer=SGD(lr=0.05), validation_data=val, callbacks=[snaps],
                  early_stopping=EarlyStopping(patience=patience, min_delta=min_delta), **kw)
    assert h.stopped_early
    assert h.epochs == last_epoch + 1
    np.testing.assert_allclose(h.val_loss, full[:last_epoch + 1], rtol=1e-12)
    assert h.best_epoch == best_epoch
    assert_params_equal(host_params(model), snaps.after_epoch[best_epoch])
    assert float(model.loss(*val)) == pytest.approx(full[best_epoch], rel=1e-12)


def test_early_stopping_int_monitors_training_loss_without_validation(backend):
    """early_stopping=3 without validation data watches the training loss; a model that
    cannot move (learning rate 0) improves once, then stops after 3 + 1 flat epochs."""
    model, x, y, _ = _line_problem(backend)
    h = model.fit(x, y, loss="mse", optimizer=SGD(lr=0.0), epochs=20, batch_size=8, shuffle=False,
                  early_stopping=3, progress=False)
    assert h.stopped_early
    assert h.epochs == 5
    assert h.best_epoch == 0
    assert h.val_loss == []


def _accuracy_problem(backend):
    """Three noisy classes, 80 training and 40 validation rows, and a float64 softmax MLP."""
    r = np.random.default_rng(3)
    x = r.normal(size=(120, 4))
    y = np.argmax(x @ r.normal(size=(4, 3)) + 1.5 * r.normal(size=(120, 3)), axis=1)
    model = am.MLP([4, 8, 3], output_activation="softmax", dtype="float64", seed=0, **backend.model_kwargs())
    data = backend.asarray(x[:80]), backend.asarray(y[:80])
    return model, data, (backend.asarray(x[80:]), backend.asarray(y[80:]))


_ACC_KW = dict(loss="cross_entropy", optimizer="adam", lr=0.05, epochs=40, batch_size=16, shuffle=False,
               metrics=["accuracy"], progress=False)


@pytest.mark.parametrize("mode", ["auto", "max", "min"])
def test_early_stopping_on_val_accuracy(backend, mode):
    """EarlyStopping("val_accuracy") (mode inferred as max, or given) stops at the epoch the
    rule gives on the uninterrupted run's validation accuracies, restores the parameters of
    that run's best epoch, and logs the same values up to the stop."""
    model, (x, y), val = _accuracy_problem(backend)
    snaps = Snapshots()
    full = model.fit(x, y, validation_data=val, callbacks=[snaps], **_ACC_KW)["val_accuracy"]
    higher = mode != "min"
    best_epoch, last_epoch = _expected_stop([-v if higher else v for v in full], patience=3, min_delta=0.0)
    assert last_epoch < len(full) - 1  # the rule does stop this run early
    if higher:
        assert best_epoch > 0 and full[best_epoch] == max(full[:last_epoch + 1])

    model, (x, y), val = _accuracy_problem(backend)
    stop = EarlyStopping("val_accuracy", patience=3, mode=mode)
    assert stop.mode == ("min" if mode == "min" else "max")
    h = model.fit(x, y, validation_data=val, early_stopping=stop, **_ACC_KW)
    assert h.stopped_early and h.epochs == last_epoch + 1 and h.best_epoch == best_epoch
    assert h["val_accuracy"] == full[:last_epoch + 1]
    assert_params_equal(host_params(model), snaps.after_epoch[best_epoch])
    assert model.evaluate(*val)["accuracy"] == full[best_epoch]


def test_early_stopping_on_a_training_metric_and_a_custom_one(backend):
    """A training metric ("accuracy", max) and a custom metric with mode="max" are monitored
    like the validation ones; a custom name without mode= is refused up front."""
    model, (x, y), val = _accuracy_problem(backend)
    kw = {**_ACC_KW, "lr": 0.2}

    def hits(y_true, y_pred, *, xp):
        return xp.mean(xp.astype(y_true == y_pred, xp.float64))

    full = model.fit(x, y, **{**kw, "metrics": ["accuracy", hits]})
    for name, stop in (("accuracy", EarlyStopping("accuracy", patience=2)),
                       ("hits", EarlyStopping("hits", patience=2, mode="max"))):
        best_epoch, last_epoch = _expected_stop([-v for v in full[name]], patience=2, min_delta=0.0)
        model, (x, y), val = _accuracy_problem(backend)
        h = model.fit(x, y, early_stopping=stop, **{**kw, "metrics": ["accuracy", hits]})
        assert h.epochs == last_epoch + 1 and h.best_epoch == best_epoch
        assert h.stopped_early == (last_epoch < kw["epochs"] - 1)
    with pytest.raises(ValueError, match="monitor='hits': cannot tell whether higher or lower values are better; "
                                         "pass mode='max'"):
        EarlyStopping("hits")


def test_early_stopping_on_a_value_never_logged_names_the_logged_ones():
    model, (x, y), val = _accuracy_problem(BACKEND_ROWS[0].values[0])  # the numpy row
    kw = {**_ACC_KW, "epochs": 3}
    with pytest.raises(ValueError, match=r"EarlyStopping monitors 'val_accuracy', which training does not log; "
                                         r"logged: accuracy, loss, lr\. pass validation data"):
        model.fit(x, y, early_stopping=EarlyStopping("val_accuracy"), **kw)
    with pytest.raises(ValueError, match=r"monitors 'val_top_3_accuracy', which training does not log; logged: "
                                         r"accuracy, loss, lr, val_accuracy, val_loss, val_metric\. name a metric"):
        model.fit(x, y, validation_data=val, early_stopping=EarlyStopping("val_top_3_accuracy"), **kw)
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max', got 'up'"):
        EarlyStopping("val_accuracy", mode="up")
    with pytest.raises(TypeError, match="monitor must be the name of a logged value"):
        EarlyStopping(3)
    assert [EarlyStopping(m).mode for m in ("loss", "val_loss", "val_metric", "val_r2", "mae", "val_top_2_accuracy")] \
        == ["min", "min", "max", "max", "min", "max"]


# ---------------------------------------------------------------------------- callbacks
class Recorder(Callback):
    def __init__(self, stop_at_step=None, stop_at_epoch=None):
        self.events, self.stop_at_step, self.stop_at_epoch = [], stop_at_step, stop_at_epoch

    def on_train_begin(self, model, history):
        self.events.append(("train_begin",))

    def on_epoch_begin(self, model, epoch):
        self.events.append(("epoch_begin", epoch))

    def on_batch_end(self, model, logs):
        self.events.append(("batch_end", logs["epoch"], logs["step"]))
        return logs["step"] == self.stop_at_step

    def on_epoch_end(self, model, logs):
        self.events.append(("epoch_end", logs["epoch"]))
        return logs["epoch"] == self.stop_at_epoch

    def on_train_end(self, model, history):
        self.events.append(("train_end",))


def test_callbacks_receive_events_in_order(backend):
    x_np, y_np = regression_data(n=10)
    model = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    rec = Recorder()
    model.fit(backend.asarray(x_np), backend.asarray(y_np), epochs=2, batch_size=4, callbacks=[rec],
              progress=False)
    assert rec.events == [
        ("train_begin",),
        ("epoch_begin", 0), ("batch_end", 0, 1), ("batch_end", 0, 2), ("batch_end", 0, 3), ("epoch_end", 0),
        ("epoch_begin", 1), ("batch_end", 1, 4), ("batch_end", 1, 5), ("batch_end", 1, 6), ("epoch_end", 1),
        ("train_end",),
    ]


def test_callback_returning_true_stops_training(backend):
    x_np, y_np = regression_data(n=10)
    x, y = backend.asarray(x_np), backend.asarray(y_np)

    # at a batch: the current epoch ends there
    model = am.MLP([3, 4, 2], dtype="float64", seed=0, **backend.model_kwargs())
    ref = model.copy()
    rec = Recorder(stop_at_step=2)
    h = model.fit(x, y, optimizer=SGD(lr=0.1), epochs=5, batch_size=4, shuffle=False, callbacks=[rec],
                  progress=False)
    assert rec.events == [("train_begin",), ("epoch_begin", 0), ("batch_end", 0, 1), ("batch_end", 0, 2),
                          ("epoch_end", 0), ("train_end",)]
    assert h.stopped_early and h.epochs == 1 and model.steps_ == 2
    ref.fit(x[:8, ...], y[:8, ...], optimizer=SGD(lr=0.1), epochs=1, batch_size=4, shuffle=False,
            progress=False)  # the same two steps
    assert_params_equal(host_params(model), host_params(ref), rtol=1e-12, atol=1e-14)

    # at an epoch end
    model = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    rec = Recorder(stop_at_epoch=1)
    h = model.fit(x, y, epochs=5, batch_size=4, callbacks=[rec], progress=False)
    assert h.stopped_early and h.epochs == 2 and model.steps_ == 6
    assert rec.events[-2:] == [("epoch_end", 1), ("train_end",)]


# ---------------------------------------------------------------------------- schedules
def test_lr_follows_schedule_per_epoch(backend):
    """Full-batch SGD with a step decay: History.lr is the schedule and each epoch's
    update uses it."""
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], activation="tanh", dtype="float64", seed=4, **backend.model_kwargs())
    ref = model.copy()
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    h = model.fit(x, y, optimizer="sgd", schedule=StepDecay(0.2, step_size=2, gamma=0.5), epochs=5,
                  batch_size=12, shuffle=False, progress=False)
    expected = [0.2 * 0.5 ** (e // 2) for e in range(5)]
    np.testing.assert_allclose(h.lr, expected, rtol=1e-15)
    for lr in expected:
        _, grads = ref.loss_and_grads(x, y, loss="mse")
        ref.params = [{k: p[k] - lr * g[k] for k in p} for p, g in zip(ref.params, grads)]
    assert_params_equal(host_params(model), host_params(ref), rtol=1e-12, atol=1e-14)


def test_cosine_schedule_in_history(backend):
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], seed=4, **backend.model_kwargs())
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), optimizer="adam",
                  schedule=CosineAnnealing(0.01, T_max=4), epochs=6, batch_size=4, progress=False)
    expected = [0.01 * (1 + math.cos(math.pi * min(e, 4) / 4)) / 2 for e in range(6)]
    np.testing.assert_allclose(h.lr, expected, rtol=1e-12, atol=1e-18)


def test_reduce_on_plateau_reduces_after_patience(backend):
    """A learning rate too small to move the loss by the relative threshold: every epoch
    after the first is a plateau epoch, and the rate halves after `patience` + 1 of them."""
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], dtype="float64", seed=4, **backend.model_kwargs())
    lr0, patience = 1e-6, 2
    sched = ReduceOnPlateau(lr0, factor=0.5, patience=patience)
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), optimizer="sgd", schedule=sched, epochs=9,
                  batch_size=12, shuffle=False, progress=False)
    # epoch 0 sets the best; epochs 1..3 are bad; after the 3rd (> patience) the rate halves
    expected = [lr0] * 4 + [lr0 / 2] * 3 + [lr0 / 4] * 2
    np.testing.assert_allclose(h.lr, expected, rtol=1e-15)
    assert h.loss[-1] <= h.loss[0] and h.loss[0] - h.loss[-1] < 1e-4 * h.loss[0]


def test_reduce_on_plateau_keeps_rate_while_improving(backend):
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], dtype="float64", seed=4, **backend.model_kwargs())
    sched = ReduceOnPlateau(0.05, factor=0.5, patience=0)
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), optimizer="sgd", schedule=sched, epochs=5,
                  batch_size=12, shuffle=False, progress=False)
    assert np.all(np.diff(h.loss) < 0)
    assert h.lr == [0.05] * 5


def test_warmup_around_reduce_on_plateau_steps_it_after_warmup(backend):
    """LinearWarmup(ReduceOnPlateau): fit's metrics reach the wrapped schedule from the
    last warm-up epoch on. The rate (1e-6) is too small to move the loss by the relative
    threshold, so each epoch after the first one the plateau sees is a bad one."""
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], dtype="float64", seed=4, **backend.model_kwargs())
    lr0 = 1e-6
    sched = LinearWarmup(ReduceOnPlateau(lr0, factor=0.5, patience=1), warmup_steps=3, start_factor=0.5)
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), optimizer="sgd", schedule=sched, epochs=9,
                  batch_size=12, shuffle=False, progress=False)
    # epochs 0-2 ramp; epoch 2's loss is the plateau's first metric; epochs 3 and 4 are bad
    ramp = [lr0 * (0.5 + 0.5 * t / 3) for t in range(3)]
    expected = ramp + [lr0] * 2 + [lr0 / 2] * 2 + [lr0 / 4] * 2
    np.testing.assert_allclose(h.lr, expected, rtol=1e-15)
    assert sched.metrics_seen == 9 and sched.schedule.last_epoch == 7


# --------------------------------------------------------------------- divergence guard
def test_divergence_raises_and_keeps_last_finite_parameters(backend):
    x_np, y_np = regression_data(n=40)
    model = am.MLP([3, 8, 2], seed=1, **backend.model_kwargs())
    before = host_params(model)
    snaps = Snapshots()
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    with pytest.raises(DivergenceError) as info:
        model.fit(x, y, optimizer=SGD(lr=1e6), epochs=20, batch_size=8, shuffle=False, callbacks=[snaps],
                  progress=False)
    err = info.value
    steps_done = len(snaps.after_batch)
    epoch = snaps.epochs_begun  # 1-based number of the epoch that failed
    assert err.step == steps_done and err.epoch == epoch - 1
    assert re.search(rf"\bepoch {epoch}, step {steps_done + 1}\b", str(err)), str(err)
    # the parameters are finite and those of the last finite step
    last = snaps.after_batch[-1] if snaps.after_batch else before
    got = host_params(model)
    assert all(np.all(np.isfinite(a)) for p in got for a in p.values())
    assert_params_equal(got, last)
    # ... and the batch it stopped at does have a non-finite loss with them
    batch = steps_done % 5
    with np.errstate(over="ignore", invalid="ignore"):  # this check itself overflows, as it should
        value = float(model.loss(x[8 * batch:8 * batch + 8, ...], y[8 * batch:8 * batch + 8, ...]))
    assert not math.isfinite(value)


class _PoisonAfter(Callback):
    """Makes one weight NaN after update ``k``: a finite loss whose update overflowed."""

    def __init__(self, k, backend):
        self.k, self.backend = k, backend

    def on_batch_end(self, model, logs):
        if logs["step"] == self.k:
            W = np.array(am.to_numpy(model.params[0]["W"]))  # the model's own dtype
            W[0, 0] = np.nan
            model.params[0]["W"] = self.backend.asarray(W)


def test_divergence_says_when_the_last_update_left_non_finite_parameters(backend):
    x_np, y_np = regression_data(n=40)
    model = am.MLP([3, 8, 2], seed=1, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    with pytest.raises(DivergenceError) as info:
        model.fit(x, y, optimizer=SGD(lr=1e-3), epochs=2, batch_size=8, shuffle=False,
                  callbacks=[_PoisonAfter(3, backend)], progress=False)
    err = info.value
    assert (err.step, err.epoch, err.params_finite) == (3, 0, False)
    assert "update of step 3" in str(err) and "non-finite" in str(err)
    assert np.isnan(host_params(model)[0]["W"][0, 0])


def test_divergence_reports_finite_parameters(backend):
    x_np, y_np = regression_data(n=40)
    model = am.MLP([3, 8, 2], seed=1, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    with pytest.raises(DivergenceError) as info:
        model.fit(x, y, optimizer=SGD(lr=1e6), epochs=20, batch_size=8, shuffle=False, progress=False)
    assert info.value.params_finite is True
    assert "those of the last finite step" in str(info.value)


@pytest.mark.parametrize("watch", [False, True])
def test_divergence_keeps_the_last_finite_step_despite_early_stopping(backend, watch):
    """EarlyStopping (restore_best_weights) puts the best epoch's parameters back when
    training ends; a run that ends with DivergenceError keeps those of its last finite
    step instead, as the error says. Read per step (a batch watcher) or at the epoch's
    end (a replay), the same parameters."""
    x_np, y_np = regression_data(n=40)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    watcher = _Watcher()
    model = am.MLP([3, 8, 2], dtype="float64", seed=1, **backend.model_kwargs())
    stopper = EarlyStopping("loss", patience=10)
    with pytest.raises(DivergenceError, match="those of the last finite step") as info:
        # call 1 checks the targets; the NaN comes at step 13, in the third epoch (5 steps each)
        model.fit(x, y, loss=_nan_at_call(14), optimizer=Adam(lr=1e-2), epochs=5, batch_size=8, progress=False,
                  early_stopping=stopper, callbacks=[watcher] if watch else [], seed=3)
    assert info.value.step == 12 and stopper.best_epoch == 1
    reference = am.MLP([3, 8, 2], dtype="float64", seed=1, **backend.model_kwargs())
    with pytest.raises(DivergenceError):
        reference.fit(x, y, loss=_nan_at_call(14), optimizer=Adam(lr=1e-2), epochs=5, batch_size=8,
                      progress=False, callbacks=[_Watcher()], seed=3)  # no early stopping at all
    assert_params_equal(host_params(model), host_params(reference))


def _nan_at_call(k):
    """A custom mse whose ``k``-th call (counting from 1) returns a NaN loss: the
    parameters stay finite, the step is known."""
    calls = [0]

    def fn(outputs, targets, *, xp=None, sample_weight=None, check=True):
        calls[0] += 1
        value, g = am.LOSSES["mse"].fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)
        return (value * math.nan if calls[0] == k else value), g

    return am.losses.Loss("nan_at_call", fn, "identity", "same_shape")


class _Watcher(Callback):
    """Watches every batch: fit then reads each step's loss as it comes."""

    def __init__(self):
        self.after_batch = []

    def on_batch_end(self, model, logs):
        self.after_batch.append(host_params(model))


@pytest.mark.parametrize(("stack_every", "check_every"), [(256, 1000), (2, 1000), (2, 3)])
@pytest.mark.parametrize("call", [2, 8, 15])
def test_divergence_found_at_epoch_end_keeps_the_parameters_of_the_last_finite_step(backend, call, stack_every,
                                                                                  check_every, monkeypatch):
    """Without a callback watching batches the losses are read once per epoch (or every
    ``check_every`` steps); a non-finite one then replays the steps since the last read
    up to the step before it, so the error and the parameters are those a check after
    every step gives (shuffled batches, dropout masks and Adam's moments included; the
    losses stacked in one piece or in several)."""
    monkeypatch.setattr(am.training, "_STACK_EVERY", stack_every)
    monkeypatch.setattr(am.training, "_CHECK_EVERY", check_every)
    x_np, y_np = regression_data(n=40)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    results = []
    for watcher in (None, _Watcher()):
        model = am.MLP([3, 8, 2], dropout=0.25, dtype="float64", seed=1, **backend.model_kwargs())
        with pytest.raises(DivergenceError) as info:
            # call 1 is fit's up-front check of the targets; call c > 1 is step c - 1
            model.fit(x, y, loss=_nan_at_call(call), optimizer=Adam(lr=1e-2), epochs=4, batch_size=8,
                      callbacks=[] if watcher is None else [watcher], progress=False, seed=3)
        results.append((info.value, host_params(model), model.steps_, model.optimizer_.step_count, watcher))
    (err, params, steps, opt_steps, _), (err_w, params_w, steps_w, opt_steps_w, watcher) = results
    done = call - 2  # steps completed before the bad one
    assert (err.step, err.epoch) == (err_w.step, err_w.epoch) == (done, done // 5)
    assert steps == steps_w == opt_steps == opt_steps_w == done
    assert str(err) == str(err_w)
    assert re.search(rf"\bepoch {done // 5 + 1}, step {done + 1} \(batch {done % 5 + 1}\)", str(err)), str(err)
    assert err.params_finite and err_w.params_finite
    assert len(watcher.after_batch) == done
    assert_params_equal(params, params_w)
    if done:
        assert_params_equal(params, watcher.after_batch[-1])


class _LossWatcher(Callback):
    def __init__(self):
        self.losses = []

    def on_batch_end(self, model, logs):
        self.losses.append(logs["loss"])


@pytest.mark.parametrize("check_every", [1000, 4])
@pytest.mark.parametrize("loss", ["mse", "huber", "cross_entropy"])
def test_losses_read_at_epoch_end_equal_those_read_per_step(backend, loss, check_every, monkeypatch):
    """The epoch's losses kept on the device and read at its end give the history that
    reading each step's loss gives (no step's value is overwritten by a later step),
    and the same parameters, with dropout, clipping and sample weights on."""
    x_np, y_np = regression_data(n=45, n_outputs=3)
    if loss == "cross_entropy":
        y_np = np.argmax(y_np, axis=1)
    w_np = np.random.default_rng(3).uniform(0.2, 2.0, size=45)
    monkeypatch.setattr(am.training, "_CHECK_EVERY", check_every)
    runs = []
    for watcher in (None, _LossWatcher()):
        model = am.MLP([3, 8, 3], dropout=0.2, dtype="float64", seed=2, **backend.model_kwargs())
        h = model.fit(backend.asarray(x_np), backend.asarray(y_np), loss=loss, epochs=3, batch_size=8,
                      optimizer=Adam(lr=1e-2, clip_norm=0.5, clip_value=0.2), sample_weight=backend.asarray(w_np),
                      callbacks=[] if watcher is None else [watcher], progress=False, seed=5)
        runs.append((h, host_params(model), watcher))
    (h, params, _), (h_w, params_w, watcher) = runs
    assert h.loss == h_w.loss
    rows = [8] * 5 + [5]
    want = [sum(v * r for v, r in zip(watcher.losses[6 * e:6 * e + 6], rows)) / 45 for e in range(3)]
    np.testing.assert_allclose(h.loss, want, rtol=1e-15)
    assert_params_equal(params, params_w)


# --------------------------------------------------------------------------- partial_fit
def test_partial_fit_keeps_optimizer_state(backend):
    x_np, y_np = regression_data(n=20)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    a = am.MLP([3, 6, 2], dtype="float64", seed=5, **backend.model_kwargs())
    b, c = a.copy(), a.copy()
    a.partial_fit(x, y, loss="mse", optimizer="adam", batch_size=8, shuffle=False)
    a.partial_fit(x, y, batch_size=8, shuffle=False)
    b.fit(x, y, loss="mse", optimizer="adam", epochs=2, batch_size=8, shuffle=False, progress=False)
    assert_params_equal(host_params(a), host_params(b), rtol=1e-12, atol=1e-14)
    assert a.optimizer_.step_count == 6
    # two separate fits restart Adam's moments: a different result
    c.fit(x, y, loss="mse", optimizer="adam", epochs=1, batch_size=8, shuffle=False, progress=False)
    c.fit(x, y, loss="mse", optimizer="adam", epochs=1, batch_size=8, shuffle=False, progress=False)
    assert params_differ(host_params(a), host_params(c))


def test_partial_fit_naming_the_same_optimizer_keeps_its_state(backend):
    """A loop that names its optimiser on every call (``partial_fit(..., optimizer="adam")``)
    continues the same Adam, moments and step count included, as one that names it
    only once does; naming another kind starts that one afresh."""
    x_np, y_np = regression_data(n=20)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    a = am.MLP([3, 6, 2], dtype="float64", seed=5, **backend.model_kwargs())
    b = a.copy()
    for i in range(3):
        a.partial_fit(x, y, loss="mse", optimizer="adam", batch_size=8, shuffle=False)
        b.partial_fit(x, y, loss="mse", optimizer="adam" if i == 0 else None, batch_size=8, shuffle=False)
    assert a.optimizer_.step_count == b.optimizer_.step_count == 9
    assert_params_equal(host_params(a), host_params(b))
    first = a.optimizer_
    a.partial_fit(x, y, optimizer="Adam", lr=1e-2, batch_size=8, shuffle=False)  # any case, a new rate
    assert a.optimizer_ is first and first.step_count == 12 and first.lr == 1e-2
    a.partial_fit(x, y, optimizer="sgd", batch_size=8, shuffle=False)
    assert isinstance(a.optimizer_, SGD) and a.optimizer_.step_count == 3


def test_partial_fit_infers_its_first_loss_or_asks_for_one(backend):
    """Without loss= the first partial_fit infers it as fit does (the identity output
    and float targets: mse, the same step as loss="mse"); an ambiguous model asks."""
    x_np, y_np = regression_data(n=6)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, 2], dtype="float64", seed=0, **backend.model_kwargs())
    twin = model.copy()
    model.partial_fit(x, y, shuffle=False)
    twin.partial_fit(x, y, loss="mse", shuffle=False)
    assert model.loss_ == "mse"
    assert_params_equal(host_params(model), host_params(twin), rtol=0, atol=0)
    tanh = am.MLP([3, 4, 2], output_activation="tanh", seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match="pass loss= , one of mse, mae, huber, cross_entropy"):
        tanh.partial_fit(x, y)


# ------------------------------------------------------------------ predict, predict_proba
def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("output_activation", ["softmax", None])
def test_predict_multiclass(backend, output_activation):
    x_np, labels = blobs(seed=2)
    model = am.MLP([2, 16, 3], output_activation=output_activation, dtype="float64", seed=0,
                   **backend.model_kwargs())
    x = backend.asarray(x_np)
    model.fit(x, backend.asarray(labels), loss="cross_entropy", lr=0.02, epochs=30, batch_size=8, seed=0,
              progress=False)
    out = backend.to_numpy(model(x))
    proba = model.predict_proba(x)
    pred = model.predict(x)
    assert backend.same_place(proba) and backend.same_place(pred)
    p = backend.to_numpy(proba)
    expected = out if output_activation == "softmax" else _softmax(out)
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert tuple(pred.shape) == (60,)
    np.testing.assert_array_equal(backend.to_numpy(pred), np.argmax(out, axis=1))
    assert np.mean(backend.to_numpy(pred) == labels) == 1.0  # separable blobs


def test_predict_multilabel(backend):
    r = np.random.default_rng(4)
    x_np = np.sign(r.normal(size=(64, 2))) * (0.5 + np.abs(r.normal(size=(64, 2))))
    y_np = (x_np > 0).astype(np.float64)  # label j: feature j is positive
    model = am.MLP([2, 8, 2], dtype="float64", seed=1, **backend.model_kwargs())
    x = backend.asarray(x_np)
    model.fit(x, backend.asarray(y_np), loss="binary_cross_entropy", lr=0.02, epochs=40, batch_size=8, seed=0,
              progress=False)
    logits = backend.to_numpy(model(x))
    p = backend.to_numpy(model.predict_proba(x))
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits)), rtol=1e-12)
    pred = backend.to_numpy(model.predict(x))
    assert pred.shape == (64, 2)
    np.testing.assert_array_equal(pred, (logits > 0).astype(pred.dtype))
    assert np.mean(pred == y_np) == 1.0


def test_predict_regression_returns_outputs(backend):
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 5, 2], dtype="float64", seed=0, **backend.model_kwargs())
    x = backend.asarray(x_np)
    model.fit(x, backend.asarray(y_np), loss="mse", epochs=2, batch_size=4, progress=False)
    pred = model.predict(x)
    assert backend.same_place(pred)
    np.testing.assert_array_equal(backend.to_numpy(pred), backend.to_numpy(model(x)))
    with pytest.raises(ValueError, match="predict_proba needs a classifier"):
        model.predict_proba(x)


# ------------------------------------------------------------------------------ progress
def test_progress_silent_without_terminal(backend, capsys):
    x_np, y_np = regression_data(n=12)
    model = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), epochs=3, progress=True)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert h.epochs == 3


def test_verbose_prints_one_line_per_epoch(backend, capsys):
    x_np, labels = blobs(n_per_class=6, seed=0)
    model = am.MLP([2, 4, 3], seed=0, **backend.model_kwargs())
    h = model.fit(backend.asarray(x_np), backend.asarray(labels), loss="cross_entropy", epochs=4, batch_size=5,
                  validation_split=0.2, verbose=True)
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        m = re.match(r"epoch\s+(\d+)\s+loss (\S+)\s+accuracy (\S+)\s+val_loss (\S+)\s+val_accuracy (\S+)", line)
        assert m, line
        assert int(m.group(1)) == i + 1
        assert float(m.group(2)) == pytest.approx(h.loss[i], rel=1e-3)
        assert float(m.group(3)) == pytest.approx(h["accuracy"][i], abs=1e-4)
        assert float(m.group(4)) == pytest.approx(h.val_loss[i], rel=1e-3)
        assert float(m.group(5)) == pytest.approx(h.val_metric[i], abs=1e-4)


# ------------------------------------------------------------------ problems users bring
def test_one_one_one_linear_network_fits_y_equals_2x(backend):
    """A 1-1-1 linear network on x = 1..5, y = 2x (raw, unscaled, as users write it);
    this initialisation has weights of opposite signs, so w1*w2 must pass through 0."""
    x_np = np.arange(1.0, 6.0)[:, None]
    model = am.Sequential([am.Dense(1, 1), am.Dense(1, 1)], seed=19, **backend.model_kwargs())
    w1, w2 = (float(backend.to_numpy(p["W"])[0, 0]) for p in model.params)
    assert w1 * w2 < 0
    x = backend.asarray(x_np, dtype=np.float32)
    model.fit(x, backend.asarray(2 * x_np, dtype=np.float32), loss="mse", optimizer=Adam(lr=0.1), epochs=500,
              batch_size=5, progress=False)
    err = np.abs(backend.to_numpy(model.predict(x)) - 2 * x_np)
    assert err.max() < 1e-3
    # it learned the line, not the five points
    x6 = backend.asarray([[6.0]], dtype=np.float32)
    assert float(backend.to_numpy(model.predict(x6))[0, 0]) == pytest.approx(12.0, abs=2e-3)


def test_mlp_identity_1_1_1_fits_y_equals_2x(backend):
    x_np = np.arange(1.0, 6.0)[:, None]
    model = am.MLP([1, 1, 1], activation="identity", seed=0, **backend.model_kwargs())
    x = backend.asarray(x_np, dtype=np.float32)
    model.fit(x, backend.asarray(2 * x_np, dtype=np.float32), loss="mse", optimizer=Adam(lr=0.1), epochs=500,
              batch_size=5, progress=False)
    assert np.abs(backend.to_numpy(model.predict(x)) - 2 * x_np).max() < 1e-3


def test_xor_with_2_3_1_sigmoid_network(backend):
    x_np = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y_np = np.array([[0], [1], [1], [0]], dtype=np.float32)
    model = am.MLP([2, 3, 1], activation="sigmoid", output_activation="sigmoid", seed=0,
                   **backend.model_kwargs())
    assert all("b" in p for p in model.params if p)  # biases enabled
    x = backend.asarray(x_np)
    model.fit(x, backend.asarray(y_np), loss="binary_cross_entropy", optimizer=Adam(lr=0.1), epochs=500,
              batch_size=4, progress=False)
    np.testing.assert_array_equal(backend.to_numpy(model.predict(x)), y_np)
    p = backend.to_numpy(model.predict_proba(x))[:, 0]
    assert p[[1, 2]].min() > 0.8 and p[[0, 3]].max() < 0.2


@pytest.mark.parametrize("backend", ACCEPTANCE_ROWS)
def test_digits_64_10_10_softmax_above_0_9(backend):
    from sklearn.datasets import load_digits

    x_tr, x_te, y_tr, y_te = _scaled_split(load_digits, stratify=True)
    model = am.MLP([64, 10, 10], output_activation="softmax", seed=0, **backend.model_kwargs())
    model.fit(backend.asarray(x_tr), backend.asarray(y_tr), loss="cross_entropy", lr=5e-3, epochs=30,
              batch_size=32, seed=0, progress=False)
    acc = np.mean(backend.to_numpy(model.predict(backend.asarray(x_te))) == y_te)
    assert acc > 0.9


# ---------------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("backend", ACCEPTANCE_ROWS)
def test_acceptance_digits_at_least_0_97(backend):
    from sklearn.datasets import load_digits

    x_tr, x_te, y_tr, y_te = _scaled_split(load_digits, stratify=True)
    model = am.MLP([64, 256, 10], output_activation="softmax", seed=0, **backend.model_kwargs())
    epochs = 30
    model.fit(backend.asarray(x_tr), backend.asarray(y_tr), loss="cross_entropy",
              schedule=CosineAnnealing(3e-3, T_max=epochs), l2=1e-3, epochs=epochs, batch_size=32, seed=0,
              progress=False)
    acc = np.mean(backend.to_numpy(model.predict(backend.asarray(x_te))) == y_te)
    assert acc >= 0.97


@pytest.mark.parametrize("backend", ACCEPTANCE_ROWS)
def test_acceptance_iris_at_least_0_95(backend):
    from sklearn.datasets import load_iris

    x_tr, x_te, y_tr, y_te = _scaled_split(load_iris, stratify=True)
    model = am.MLP([4, 16, 3], output_activation="softmax", seed=0, **backend.model_kwargs())
    model.fit(backend.asarray(x_tr), backend.asarray(y_tr), loss="cross_entropy", lr=0.01, epochs=100,
              batch_size=16, seed=0, progress=False)
    acc = np.mean(backend.to_numpy(model.predict(backend.asarray(x_te))) == y_te)
    assert acc >= 0.95


@pytest.mark.parametrize("backend", ACCEPTANCE_ROWS)
def test_acceptance_diabetes_r2_at_least_sklearn(backend):
    """Same split, same hidden size, Adam at scikit-learn's default rate, same epochs and
    batch size, same initialisation scheme (Glorot uniform, scikit-learn's); inputs and
    targets standardised on the training part. R^2 is averaged over five seeds on each
    side, since a single run on 331 samples varies by several hundredths."""
    from sklearn.datasets import load_diabetes
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    x_tr, x_te, y_tr, y_te, sy = _scaled_split(load_diabetes, stratify=False, scale_y=True)
    t_tr = sy.transform(y_tr[:, None]).astype(np.float32)
    hidden, epochs, batch = 64, 50, 32
    ours, theirs = [], []
    for seed in range(5):
        model = am.MLP([10, hidden, 1], init="glorot_uniform", seed=seed, **backend.model_kwargs())
        model.fit(backend.asarray(x_tr), backend.asarray(t_tr), loss="mse", optimizer="adam", lr=1e-3,
                  epochs=epochs, batch_size=batch, seed=seed, progress=False)
        out = backend.to_numpy(model.predict(backend.asarray(x_te))).astype(np.float64)
        ours.append(r2_score(y_te, sy.inverse_transform(out)[:, 0]))
        sk = MLPRegressor(hidden_layer_sizes=(hidden,), solver="adam", learning_rate_init=1e-3,
                          batch_size=batch, max_iter=epochs, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget, on purpose
            sk.fit(x_tr, t_tr[:, 0])
        theirs.append(r2_score(y_te, sy.inverse_transform(sk.predict(x_te)[:, None])[:, 0]))
    assert np.mean(ours) >= np.mean(theirs)
    assert np.mean(ours) > 0.25


# ---------------------------------------------------------------------- validation metrics and checks
def test_validation_accuracy_of_a_sigmoid_output_uses_its_probabilities(backend):
    """With a sigmoid output and binary cross-entropy the validation pass returns the
    logits; the accuracy splits them at 0 (probability 0.5), as predict does."""
    r = np.random.default_rng(0)
    x_np = r.normal(size=(60, 5))
    y_np = (x_np[:, :3] + 0.3 * r.normal(size=(60, 3)) > 0.4).astype(float)
    model = am.MLP([5, 16, 3], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    h = model.fit(x, y, loss="binary_cross_entropy", epochs=5, validation_data=(x, y), progress=False)
    want = float(np.mean(backend.to_numpy(model.predict(x)) == y_np))
    assert h.val_metric[-1] == pytest.approx(want, abs=1e-12)


def test_poisson_validation_r2_is_of_the_rates(backend):
    r = np.random.default_rng(1)
    x_np = r.normal(size=(40, 3))
    y_np = r.poisson(np.exp(0.5 * x_np[:, :1])).astype(float)
    model = am.MLP([3, 8, 1], dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    h = model.fit(x, y, loss="poisson_nll", epochs=3, validation_data=(x, y), progress=False)
    rate = np.exp(backend.to_numpy(model(x)))
    want = 1.0 - np.sum((y_np - rate) ** 2) / np.sum((y_np - y_np.mean()) ** 2)
    assert h.val_metric[-1] == pytest.approx(want, rel=1e-9)


def test_float16_validation_r2_does_not_overflow(backend):
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16")
    r = np.random.default_rng(2)
    x_np = r.normal(size=(2000, 2))
    y_np = 20.0 + 5.0 * x_np[:, :1]  # squared deviations sum past float16's 65504
    model = am.MLP([2, 4, 1], dtype="float16", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np, "float16"), backend.asarray(y_np, "float16")
    h = model.fit(x, y, loss="mse", optimizer="sgd", lr=1e-3, epochs=1, batch_size=100,
                  validation_data=(x, y), progress=False)
    out = backend.to_numpy(model(x)).astype(np.float64)
    want = 1.0 - np.sum((y_np - out) ** 2) / np.sum((y_np - y_np.mean()) ** 2)
    assert np.isfinite(h.val_metric[-1]) and h.val_metric[-1] == pytest.approx(want, abs=2e-2)


def test_partial_fit_takes_a_new_learning_rate(backend):
    x_np, y_np = regression_data(n=16)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, 2], dtype="float64", seed=0, **backend.model_kwargs())
    model.partial_fit(x, y, loss="mse", lr=1e-3, batch_size=16)
    h = model.partial_fit(x, y, lr=0.5, batch_size=16)
    assert model.optimizer_.lr == 0.5 and h.lr == [0.5] and model.optimizer_.step_count == 2


def test_bad_validation_settings_fail_before_training(backend):
    x_np, y_np = regression_data(n=20)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    before = host_params(model)
    with pytest.raises(ValueError, match="validation_split=0.99 of 20 samples leaves none to train on"):
        model.fit(x, y, validation_split=0.99, progress=False)
    with pytest.raises(ValueError, match="validation x has 5 samples but validation y has 4"):
        model.fit(x, y, validation_data=(x[:5, ...], y[:4, ...]), progress=False)
    with pytest.raises(ValueError, match="validation x has 2 features but the model expects 3"):
        model.fit(x, y, validation_data=(x[:5, :2], y[:5, ...]), progress=False)
    labels = backend.asarray(np.arange(20) % 2)
    clf = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match="label"):
        clf.fit(x, labels, loss="cross_entropy", validation_data=(x[:4, ...], backend.asarray(np.array([0, 1, 5, 1]))),
                progress=False)
    with pytest.raises(TypeError, match="early_stopping must be an EarlyStopping, an int patience or None"):
        model.fit(x, y, early_stopping=True, progress=False)
    assert_params_equal(host_params(model), before)


def test_bad_l2_and_validation_arguments_are_refused_by_name(backend):
    """A negative L2 coefficient would reward large weights (the loss goes below zero)
    without a word; NaN would stop training as a "divergence". Both are refused up front,
    as are a validation split that is not a number, validation data that is not a pair
    (a weighted triple would otherwise fail in an unpacking) and both at once (the split
    would be ignored); partial_fit too."""
    x_np, y_np = regression_data(n=20)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())
    before = host_params(model)
    for bad in (-1e-3, float("nan"), float("inf"), "0.1", None, True):
        with pytest.raises((ValueError, TypeError), match=r"l2 must be a finite non-negative number, got "):
            model.fit(x, y, l2=bad, progress=False)
        with pytest.raises((ValueError, TypeError), match=r"l2 must be a finite non-negative number, got "):
            model.partial_fit(x, y, loss="mse", l2=bad)
    for bad in (None, "0.2", True):
        with pytest.raises(TypeError, match=r"validation_split must be a number in \[0, 1\), got "):
            model.fit(x, y, validation_split=bad, progress=False)
    with pytest.raises(ValueError, match=r"validation_data and validation_split=0.2 were both given; pass one"):
        model.fit(x, y, validation_data=(x[:5, ...], y[:5, ...]), validation_split=0.2, progress=False)
    w = backend.asarray(np.ones(5))
    for bad in ((x[:5, ...], y[:5, ...], w), [x[:5, ...]], x[:5, ...]):
        with pytest.raises((ValueError, TypeError), match=r"validation_data must be a pair \(x_val, y_val\)"):
            model.fit(x, y, validation_data=bad, progress=False)
    assert_params_equal(host_params(model), before)
    assert getattr(model, "optimizer_", None) is None  # refused before anything was set up


def test_stop_at_epoch_begin_runs_no_batch_of_that_epoch(backend):
    class StopAtTwo(Callback):
        def on_epoch_begin(self, model, epoch):
            return epoch == 2

    x_np, y_np = regression_data(n=12)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, 2], dtype="float64", seed=0, **backend.model_kwargs())
    ref = model.copy()
    h = model.fit(x, y, epochs=5, batch_size=4, shuffle=False, callbacks=[StopAtTwo()], progress=False)
    assert h.epochs == 2 and h.stopped_early and model.steps_ == 6
    ref.fit(x, y, epochs=2, batch_size=4, shuffle=False, progress=False)
    assert_params_equal(host_params(model), host_params(ref))


def test_numpy_integers_for_sizes_epochs_and_batch_size(backend):
    x_np, y_np = regression_data(n=12)
    model = am.MLP(np.array([3, 4, 2]), dtype="float64", seed=0, **backend.model_kwargs())
    h = model.fit(backend.asarray(x_np), backend.asarray(y_np), epochs=np.int64(2), batch_size=np.int32(6),
                  progress=False)
    assert model.sizes == [3, 4, 2] and all(type(s) is int for s in model.sizes)
    assert h.epochs == 2 and model.steps_ == 4


# ------------------------------------------------------------ binary labels, the README's accuracy
def _binary_problem(n=120, seed=0):
    """A noisy binary problem: a trained model gets some but not all of it right."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * r.normal(size=n) > 0.2)
    return x, y


BINARY_FORMS = [("int64", (-1,)), ("int32", (-1, 1)), ("bool", (-1,)), ("bool", (-1, 1)), ("float32", (-1,)),
                ("float64", (-1, 1))]


@pytest.mark.parametrize(("dtype", "shape"), BINARY_FORMS)
def test_readme_accuracy_idiom_is_the_true_accuracy_for_binary_labels(backend, dtype, shape):
    """0/1 labels of any dtype family and of shape (n,) or (n, 1) train a one-output
    sigmoid model (the loss inferred), and ``(model.predict(x) == y).mean()`` is the
    accuracy computed independently from the probabilities: predict answers in y's shape
    (so (n,) is never compared with (n, 1), which would broadcast to (n, n)) and in its
    dtype family."""
    x_np, y_bool = _binary_problem()
    y_np = y_bool.astype(dtype).reshape(shape)
    model = am.MLP([3, 8, 1], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model.fit(x, y, lr=0.05, epochs=5, batch_size=16, seed=0, progress=False)
    assert model.loss_ == "binary_cross_entropy"
    pred = model.predict(x)
    assert backend.same_place(pred) and tuple(pred.shape) == y_np.shape
    family = {"bool": "b", "int64": "i", "int32": "i", "float32": "f", "float64": "f"}[dtype]
    assert backend.to_numpy(pred).dtype.kind == family
    proba = backend.to_numpy(model.predict_proba(x))
    assert proba.shape == (len(y_bool), 1)
    want = float(np.mean((proba[:, 0] > 0.5) == y_bool))  # independent of predict
    assert 0.6 < want < 1.0  # a real, imperfect accuracy: a broadcast would not give it by chance
    if backend.name == "numpy":
        acc = (model.predict(x) == y).mean()  # the README's idiom, as written
    else:
        xp = backend.xp
        acc = xp.mean(xp.astype(model.predict(x) == y, xp.float64))
    assert float(acc) == pytest.approx(want, abs=1e-15)
    assert model.evaluate(x, y)["accuracy"] == pytest.approx(want, abs=1e-15)


def test_binary_labels_train_the_same_whatever_their_dtype(backend):
    x_np, y_bool = _binary_problem(n=40)
    x = backend.asarray(x_np)
    params = []
    for dtype, shape in BINARY_FORMS:
        model = am.MLP([3, 4, 1], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
        model.fit(x, backend.asarray(y_bool.astype(dtype).reshape(shape)), lr=0.05, epochs=2, batch_size=8,
                  seed=0, progress=False)
        params.append(host_params(model))
    for p in params[1:]:
        assert_params_equal(p, params[0], rtol=0, atol=0)


@pytest.mark.parametrize(("values", "found"), [([0, 1, 2], r"\[2\]"), ([-1, 0, 1], r"\[-1\]"),
                                               ([0.0, 0.5, 1.0], r"\[0.5\]")])
def test_binary_classification_refuses_labels_other_than_0_and_1(backend, values, found):
    x_np, _ = _binary_problem(n=12)
    y_np = np.array(values * 4)
    model = am.MLP([3, 4, 1], output_activation="sigmoid", seed=0, **backend.model_kwargs())
    before = host_params(model)
    x = backend.asarray(x_np)
    with pytest.raises(ValueError, match=rf"y must hold the labels 0 and 1 for a binary classification loss.*"
                                         rf"found {found}.*use cross_entropy"):
        model.fit(x, backend.asarray(y_np), epochs=1, progress=False)
    good = backend.asarray(np.array([0, 1] * 6))
    with pytest.raises(ValueError, match=rf"validation y must hold the labels 0 and 1.*found {found}"):
        model.fit(x, good, epochs=1, validation_data=(x, backend.asarray(y_np)), progress=False)
    assert_params_equal(host_params(model), before)  # refused before any step


def test_predict_of_a_regressor_follows_y_shape(backend):
    x_np, y_np = regression_data(n=12, n_outputs=1)
    model = am.MLP([3, 5, 1], dtype="float64", seed=0, **backend.model_kwargs())
    x = backend.asarray(x_np)
    model.fit(x, backend.asarray(y_np[:, 0]), epochs=2, batch_size=4, progress=False)
    pred = model.predict(x)
    assert tuple(pred.shape) == (12,) and backend.same_place(pred)
    np.testing.assert_array_equal(backend.to_numpy(pred), backend.to_numpy(model(x))[:, 0])
    model.fit(x, backend.asarray(y_np), epochs=1, batch_size=4, progress=False)
    assert tuple(model.predict(x).shape) == (12, 1)


# ---------------------------------------------------------------------------- loss inference
@pytest.mark.parametrize(("output_activation", "labels", "n_out", "want"), [
    ("softmax", "int", 3, "cross_entropy"),
    ("softmax", "onehot", 3, "cross_entropy"),
    (None, "int", 3, "cross_entropy"),
    ("sigmoid", "int", 1, "binary_cross_entropy"),
    ("sigmoid", "float01", 2, "binary_cross_entropy"),
    (None, "float", 2, "mse"),
    ("identity", "float", 1, "mse"),
])
def test_the_loss_is_inferred(backend, capsys, output_activation, labels, n_out, want):
    """Without loss= fit picks it from the output activation and the targets, says so
    when verbose, and trains exactly as with that loss given."""
    r = np.random.default_rng(0)
    x_np = r.normal(size=(20, 3))
    y_np = {"int": r.integers(0, n_out, 20), "onehot": np.eye(n_out)[r.integers(0, n_out, 20)],
            "float01": (r.uniform(size=(20, n_out)) > 0.5).astype(float), "float": r.normal(size=(20, n_out))}[labels]
    if labels == "int" and n_out == 1:
        y_np = r.integers(0, 2, 20)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    model = am.MLP([3, 4, n_out], output_activation=output_activation, dtype="float64", seed=0,
                   **backend.model_kwargs())
    twin = model.copy()
    model.fit(x, y, epochs=2, batch_size=8, verbose=True, progress=False)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"loss: {want} (") and "pass loss= to choose another" in out
    twin.fit(x, y, loss=want, epochs=2, batch_size=8, progress=False)
    assert model.loss_ == want
    assert_params_equal(host_params(model), host_params(twin))
    twin.fit(x, y, loss=want, epochs=1, batch_size=8, verbose=True, progress=False)
    assert "loss:" not in capsys.readouterr().out  # said only when inferred


@pytest.mark.parametrize(("output_activation", "y_np", "what"), [
    (None, np.array([0, 1] * 5), r"'the identity' with 1 output\(s\), and y has int values of shape \(10,\)"),
    ("tanh", np.zeros((10, 1)), r"'tanh' with 1 output\(s\), and y has float values"),
    (None, np.zeros((10, 2), dtype=bool), r"y has bool values of shape \(10, 2\)"),
])
def test_an_ambiguous_loss_asks_for_loss(backend, output_activation, y_np, what):
    model = am.MLP([3, 4, y_np.shape[1] if y_np.ndim == 2 else 1], output_activation=output_activation, seed=0,
                   **backend.model_kwargs())
    x = backend.asarray(np.zeros((10, 3)))
    with pytest.raises(ValueError, match=rf"cannot tell which loss to use: .*{what}.*pass loss= , one of "
                                         r"mse, mae, huber, cross_entropy, binary_cross_entropy, poisson_nll"):
        model.fit(x, backend.asarray(y_np), epochs=1, progress=False)
