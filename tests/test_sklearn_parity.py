"""The estimators against what scikit-learn's own MLP tests expect of its MLPs
(sklearn/neural_network/tests/test_mlp.py): sparse input, the dtype that follows the
data, divergence, one-class targets, ``n_iter_`` of ``partial_fit`` and ``loss_`` of
multi-output regression. Each test names the scikit-learn test whose behaviour it checks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn.neural_network as sknn
from sklearn.datasets import load_diabetes, load_digits, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import arraymlp as am
from arraymlp.sklearn import MLPClassifier, MLPRegressor


def _quiet(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


def _digits(n=300):
    X, y = load_digits(return_X_y=True)
    return X[:n], y[:n], X[n:n + 200], y[n:n + 200]


# ----------------------------------------------------------------------------- sparse input
_WORDS = ("cat dog bird fish mouse horse cow sheep goat duck lion tiger bear wolf fox owl "
          "red green blue black white small big fast slow old young happy sad loud quiet").split()


def _corpus(n=120, seed=0):
    """Short documents of three topics: each topic favours a third of the words."""
    rng = np.random.default_rng(seed)
    docs, labels = [], []
    for i in range(n):
        topic = i % 3
        favoured = _WORDS[topic * 10:(topic + 1) * 10]
        words = list(rng.choice(favoured, size=6)) + list(rng.choice(_WORDS, size=3))
        docs.append(" ".join(words))
        labels.append(["animals", "colours", "moods"][topic])
    return docs, np.array(labels)


def test_tfidf_pipeline_equals_the_densified_matrix(monkeypatch):
    """scikit-learn's test_sparse_matrices, as a text pipeline: TfidfVectorizer ->
    MLPClassifier trains on the sparse matrix, without ever densifying it, and gives, in
    float64, the model fitted on the densified matrix (parameters, losses, probabilities,
    labels)."""
    docs, y = _corpus()
    params = dict(hidden_layer_sizes=(12,), learning_rate_init=0.01, max_iter=30, random_state=0)
    tfidf = TfidfVectorizer().fit_transform(docs)
    assert sp.issparse(tfidf) and tfidf.dtype == np.float64
    dense_X = tfidf.toarray()
    dense = _quiet(MLPClassifier(**params), dense_X, y)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the sparse matrix was densified")

    for cls in (sp.csr_matrix, sp.csr_array):
        monkeypatch.setattr(cls, "toarray", refuse)
        monkeypatch.setattr(cls, "todense", refuse)
    pipe = _quiet(make_pipeline(TfidfVectorizer(), MLPClassifier(**params)), docs, y)
    proba, labels = pipe.predict_proba(docs), pipe.predict(docs)
    monkeypatch.undo()
    mlp = pipe[-1]
    assert mlp.coefs_[0].dtype == np.float64
    for a, b in zip(mlp.coefs_ + mlp.intercepts_, dense.coefs_ + dense.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(mlp.loss_curve_, dense.loss_curve_, rtol=1e-12)
    np.testing.assert_allclose(proba, dense.predict_proba(dense_X), rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(labels, dense.predict(dense_X))
    assert pipe.score(docs, y) > 0.9
    new = ["cat dog bird fish", "red green blue", "happy sad loud"]
    np.testing.assert_array_equal(pipe.predict(new), ["animals", "colours", "moods"])


@pytest.mark.parametrize("kind", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "csc_array", "coo_array"])
def test_sparse_formats_equal_dense(kind):
    """scikit-learn's test_sparse_matrices: every scipy format gives the dense results;
    with early stopping (a row subset of the matrix) and with partial_fit too."""
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    X[np.abs(X) < 0.7] = 0.0  # about half the entries
    Xs = getattr(sp, kind)(X)
    y = (y - y.mean()) / y.std()
    for extra in ({}, {"early_stopping": True}):
        params = dict(hidden_layer_sizes=(8,), max_iter=20, random_state=0, **extra)
        a, b = _quiet(MLPRegressor(**params), Xs, y), _quiet(MLPRegressor(**params), X, y)
        np.testing.assert_allclose(a.predict(Xs), b.predict(X), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-12)
    a = MLPRegressor(hidden_layer_sizes=(8,), random_state=0).partial_fit(Xs, y).partial_fit(Xs, y)
    b = MLPRegressor(hidden_layer_sizes=(8,), random_state=0).partial_fit(X, y).partial_fit(X, y)
    np.testing.assert_allclose(a.predict(Xs), b.predict(X), rtol=1e-10, atol=1e-12)


def test_sparse_float32_and_other_backends():
    """A float32 sparse matrix trains float32 parameters; a sparse matrix cannot train on
    another backend (a TypeError says how to proceed)."""
    X, y = load_iris(return_X_y=True)
    Xs = sp.csr_matrix(X.astype(np.float32))
    est = _quiet(MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0), Xs, y)
    assert est.coefs_[0].dtype == np.float32 and est.predict_proba(Xs).dtype == np.float32
    with pytest.raises(TypeError, match="sparse X computes on numpy"):
        MLPClassifier(max_iter=2, backend="array_api_strict").fit(Xs, y)


# ----------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_parameters_and_predictions_follow_the_data_dtype(dtype, Estimator):
    """scikit-learn's test_mlp_param_dtypes: float32 data gives float32 parameters and
    predictions, float64 data float64 ones; anything else float64, unless dtype= says."""
    X, y, X_test, _ = _digits()
    est = _quiet(Estimator(alpha=1e-5, hidden_layer_sizes=(5, 3), random_state=1, max_iter=50, tol=1e-1),
                 X.astype(dtype), y)
    assert all(c.dtype == dtype for c in est.coefs_) and all(b.dtype == dtype for b in est.intercepts_)
    out = est.predict_proba(X_test.astype(dtype)) if Estimator is MLPClassifier else est.predict(X_test.astype(dtype))
    assert out.dtype == dtype
    ints = _quiet(Estimator(hidden_layer_sizes=(5,), random_state=1, max_iter=5), X.astype(np.int64), y)
    assert ints.coefs_[0].dtype == np.float64
    asked = _quiet(Estimator(hidden_layer_sizes=(5,), random_state=1, max_iter=5, dtype="float32"), X, y)
    assert asked.coefs_[0].dtype == np.float32


def test_float32_and_float64_fits_agree():
    """scikit-learn's test_mlp_classifier_dtypes_casting / test_mlp_regressor_dtypes_casting."""
    X, y, X_test, _ = _digits()
    params = dict(alpha=1e-5, hidden_layer_sizes=(5, 3), random_state=1, max_iter=100, tol=1e-1)
    c64, c32 = _quiet(MLPClassifier(**params), X, y), _quiet(MLPClassifier(**params), X.astype(np.float32), y)
    np.testing.assert_array_equal(c64.predict(X_test), c32.predict(X_test.astype(np.float32)))
    np.testing.assert_allclose(c64.predict_proba(X_test), c32.predict_proba(X_test.astype(np.float32)), rtol=1e-2)
    params.update(max_iter=150, tol=1e-3)
    r64, r32 = _quiet(MLPRegressor(**params), X, y), _quiet(MLPRegressor(**params), X.astype(np.float32), y)
    np.testing.assert_allclose(r64.predict(X_test), r32.predict(X_test.astype(np.float32)), rtol=5e-4)


def test_finite_inputs_beyond_float32_are_accepted_in_float64():
    """Values above float32's largest (~3.4e38) are finite in float64 and are used as they
    are; only a float32 model refuses them, saying why."""
    X, y = load_iris(return_X_y=True)
    est = _quiet(MLPRegressor(hidden_layer_sizes=(4,), max_iter=3, random_state=0), X, y)
    big = X[:5] * 1e38  # up to 5.1e38: beyond float32
    assert big.max() > np.finfo(np.float32).max
    W0, b0, W1, b1 = (np.asarray(a) for a in (*est.coefs_[:1], *est.intercepts_[:1], est.coefs_[1],
                                              est.intercepts_[1]))
    want = (np.maximum(big @ W0 + b0, 0) @ W1 + b1)[:, 0]
    np.testing.assert_allclose(est.predict(big), want, rtol=1e-12)
    assert np.isfinite(want).all()
    f32 = _quiet(MLPRegressor(hidden_layer_sizes=(4,), max_iter=3, random_state=0, dtype="float32"), X, y)
    with pytest.raises(ValueError, match=r"too large for dtype\('float32'\)"):
        f32.predict(big)


# ----------------------------------------------------------------------------- divergence
def test_non_finite_parameters_raise_sklearns_value_error():
    """scikit-learn's test_nonfinite_params: the same ValueError and message."""
    rng = np.random.RandomState(0)
    X = np.finfo(np.float64).max * rng.uniform(size=(10, 2))
    y = rng.standard_normal(size=10)
    msg = ("Solver produced non-finite parameter weights. The input data may contain large values and need to "
           "be preprocessed.")
    with pytest.raises(ValueError, match=msg):
        MLPRegressor().fit(X, y)


def test_core_divergence_error_is_a_value_error():
    """The core fit's DivergenceError is caught by ``except ValueError`` (and still by
    ``except FloatingPointError``)."""
    model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    for kind in (ValueError, FloatingPointError):
        with pytest.raises(kind, match="loss became"):
            model.fit(np.ones((4, 2)), np.ones((4, 1)), optimizer="sgd", lr=1e20, epochs=5, progress=False)
    assert issubclass(am.DivergenceError, ValueError)


def test_diverging_run_with_early_stopping_finishes_with_the_best_parameters():
    """scikit-learn's test_mlp_diverging_loss: with early stopping a diverging run ends
    without an error, its last validation score NaN (a float); ours warns, and keeps the
    parameters of the best epoch: those of the same run stopped after that epoch."""
    X, y = load_iris(return_X_y=True)
    params = dict(hidden_layer_sizes=100, activation="identity", solver="sgd", alpha=0.0001, learning_rate="constant",
                  learning_rate_init=1, shuffle=True, max_iter=20, early_stopping=True, n_iter_no_change=10,
                  random_state=0)
    with pytest.warns(ConvergenceWarning, match="Training diverged at epoch"):
        mlp = MLPRegressor(**params).fit(X, y)
    assert str(mlp.validation_scores_[-1]) == str(np.nan) and isinstance(mlp.validation_scores_[-1], float)
    best = int(np.nanargmax(mlp.validation_scores_)) + 1
    assert mlp.best_validation_score_ == mlp.validation_scores_[best - 1]
    assert all(np.isfinite(c).all() for c in mlp.coefs_ + mlp.intercepts_)
    short = _quiet(MLPRegressor(**{**params, "max_iter": best}), X, y)
    for a, b in zip(mlp.coefs_ + mlp.intercepts_, short.coefs_ + short.intercepts_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_grid_search_over_learning_rates_scores_where_sklearn_does(solver):
    """A GridSearchCV over learning rates up to 100 on unscaled data: every candidate whose
    scikit-learn score is finite has a finite score here too, and error_score="raise"
    runs through (no candidate's fit fails)."""
    X, y = load_diabetes(return_X_y=True)
    grid = {"learning_rate_init": [1e-3, 1e-1, 1.0, 10.0, 100.0]}
    scores = {}
    for name, Est in (("sklearn", sknn.MLPRegressor), ("ours", MLPRegressor)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow and convergence warnings of both
            search = GridSearchCV(Est(hidden_layer_sizes=(16,), solver=solver, max_iter=10, random_state=0), grid,
                                  cv=3, error_score="raise").fit(X, y)
        scores[name] = search.cv_results_["mean_test_score"]
    np.testing.assert_array_equal(np.isfinite(scores["ours"]), np.isfinite(scores["sklearn"]))
    assert np.isfinite(scores["ours"]).all()


# ----------------------------------------------------------------------------- targets and counters
def test_one_class_is_fitted_as_sklearn_fits_it():
    """A y of one class (a cross-validation fold can have one) is fitted as scikit-learn
    fits it: one logistic unit trained towards "no second class". From scikit-learn's
    parameters, the loss curve is scikit-learn's and predict_proba is scikit-learn's first
    column (scikit-learn returns a second column too, for a class that does not exist)."""
    X, y = load_iris(return_X_y=True)
    X, y = StandardScaler().fit_transform(X)[:50], np.full(50, "setosa")
    params = dict(hidden_layer_sizes=(5,), solver="sgd", learning_rate_init=0.1, batch_size=20, shuffle=False,
                  max_iter=1, random_state=0, warm_start=True, momentum=0.0)
    ours, theirs = MLPClassifier(**params), sknn.MLPClassifier(**params)
    _quiet(ours, X, y)
    _quiet(theirs, X, y)
    ours.coefs_ = [c.copy() for c in theirs.coefs_]
    ours.intercepts_ = [b.copy() for b in theirs.intercepts_]
    for est in (ours, theirs):
        _quiet(est.set_params(max_iter=3), X, y)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    assert ours.n_outputs_ == theirs.n_outputs_ == 1 and ours.out_activation_ == theirs.out_activation_
    np.testing.assert_allclose(ours.loss_curve_[-3:], theirs.loss_curve_[-3:], rtol=1e-10)
    proba = ours.predict_proba(X)
    assert proba.shape == (50, 1)
    np.testing.assert_allclose(proba, theirs.predict_proba(X)[:, :1], rtol=1e-10)
    np.testing.assert_allclose(ours.predict_log_proba(X), np.log(proba), rtol=1e-10)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    assert ours.score(X, y) == 1.0


def test_n_iter_of_partial_fit_is_sklearns():
    """scikit-learn's n_iter_ counts the epochs of the last call: 1 after each partial_fit;
    t_ and loss_curve_ keep accumulating."""
    X, y = load_iris(return_X_y=True)
    ours = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    theirs = sknn.MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    for i in range(3):
        for est in (ours, theirs):
            est.partial_fit(X, y, classes=[0, 1, 2])
        assert ours.n_iter_ == theirs.n_iter_ == 1
        assert ours.t_ == theirs.t_ == 150 * (i + 1) and len(ours.loss_curve_) == len(theirs.loss_curve_) == i + 1
    _quiet(ours.set_params(max_iter=4), X, y)
    assert ours.n_iter_ == 4


def test_multi_output_loss_is_sklearns():
    """loss_ of multi-output regression as scikit-learn computes it: half the squared
    error averaged over the samples and the outputs, plus alpha / (2 n) * sum ||W||^2,
    here checked against that formula in NumPy for one full-batch epoch."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    Y = np.stack([X[:, 0], X[:, 1] - X[:, 2], 3 * X[:, 3]], axis=1)
    est = MLPRegressor(hidden_layer_sizes=(6,), alpha=0.3, batch_size=40, shuffle=False, max_iter=1, warm_start=True,
                       random_state=0)
    _quiet(est, X, Y)
    W = [np.array(c) for c in est.coefs_]
    b = [np.array(v) for v in est.intercepts_]
    pred = np.maximum(X @ W[0] + b[0], 0) @ W[1] + b[1]
    want = 0.5 * np.mean((pred - Y) ** 2) + 0.3 / (2 * 40) * sum((w**2).sum() for w in W)
    _quiet(est, X, Y)  # one more full-batch epoch: its loss is that of the parameters above
    assert est.loss_ == pytest.approx(want, rel=1e-12)


def test_lbfgs_multi_output_minimises_the_summed_objective():
    """With several regression outputs, L-BFGS minimises (and reports as loss_) the
    objective whose gradient it follows: half the squared error summed over the outputs,
    averaged over the samples, plus alpha / (2 n) * sum ||W||^2; the stochastic solvers
    report scikit-learn's mean over the outputs instead (test_multi_output_loss_is_sklearns)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 4))
    Y = np.stack([X[:, 0] - X[:, 1], np.tanh(X[:, 2]), X[:, 3] ** 2], axis=1)
    est = _quiet(MLPRegressor(solver="lbfgs", hidden_layer_sizes=(5,), alpha=0.1, max_iter=50, random_state=0), X, Y)
    W = [np.array(c) for c in est.coefs_]
    b = [np.array(v) for v in est.intercepts_]
    pred = np.maximum(X @ W[0] + b[0], 0) @ W[1] + b[1]
    want = 0.5 * np.mean(np.sum((pred - Y) ** 2, axis=1)) + 0.1 / (2 * 60) * sum((w**2).sum() for w in W)
    assert est.loss_ == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(est.predict(X), pred, rtol=1e-12, atol=1e-12)
