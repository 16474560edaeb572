"""``n_members=K`` on the scikit-learn estimators: a deep ensemble behind the same API.

Member ``i`` is checked against a one-member estimator started from member ``i``'s
initial parameters and trained with the same settings (no shuffling, a batch size that
divides the sample count and no sample weights, where the two trainings' objectives are
the same: the L2 coefficient alpha / batch size on every batch)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning

from arraymlp.ensemble import member_seeds
from arraymlp.sklearn import MLPClassifier, MLPRegressor, _build_model
from arraymlp.training import DivergenceError


def _iris():
    X, y = load_iris(return_X_y=True)
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def _fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _member_start(est, i):
    """Member ``i``'s initial parameters, drawn as the estimator draws them."""
    seed = int(np.random.RandomState(est.random_state).randint(np.iinfo(np.int32).max))
    config = {k: v for k, v in est._model_config.items() if k != "members"}
    return _build_model(config, seed=member_seeds(seed, est.n_members)[i], backend="numpy", device=None)


def _as_member(est, X, y, i, **params):
    """A one-member estimator from member ``i``'s start, trained with ``params``."""
    one = _fit(type(est)(**{**est.get_params(), "n_members": 1, "max_iter": 1}), X, y)
    start = _member_start(est, i)
    one.coefs_ = [p["W"] for p in start.params if "W" in p]
    one.intercepts_ = [p["b"] for p in start.params if "W" in p]
    one.set_params(warm_start=True, **params)
    one.n_iter_, one.t_, one.loss_curve_, one.best_loss_ = 0, 0, [], np.inf
    return _fit(one, X, y)


@pytest.mark.parametrize("Estimator, kw", [
    (MLPClassifier, {"solver": "adam", "alpha": 1e-3}),
    (MLPClassifier, {"solver": "sgd", "momentum": 0.9, "learning_rate_init": 0.05}),
    (MLPRegressor, {"solver": "sgd", "learning_rate": "invscaling", "learning_rate_init": 0.05, "alpha": 1e-2}),
    (MLPRegressor, {"solver": "adam", "loss": "poisson", "learning_rate_init": 0.01}),
], ids=["clf-adam", "clf-sgd", "reg-sgd-invscaling", "reg-poisson"])
def test_each_member_is_the_one_member_estimator_from_its_start(Estimator, kw):
    X, y = _iris()
    K, E = 3, 6
    params = {"hidden_layer_sizes": (7,), "batch_size": 50, "shuffle": False, "random_state": 3,
              "n_iter_no_change": 100, **kw}
    ens = _fit(Estimator(n_members=K, max_iter=E, **params), X, y)
    assert ens.n_iter_ == E and len(ens.loss_curve_) == E
    # the members start apart and every one of them trained
    assert not np.allclose(ens.coefs_[0][0], ens.coefs_[0][1])
    assert not np.allclose(ens.coefs_[0][0], _member_start(ens, 0).params[0]["W"])
    member_preds, losses = [], []
    for i in range(K):
        one = _as_member(ens, X, y, i, max_iter=E)
        for layer in range(len(one.coefs_)):
            np.testing.assert_allclose(ens.coefs_[layer][i], one.coefs_[layer], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(ens.intercepts_[layer][i, 0], one.intercepts_[layer], rtol=1e-10, atol=1e-12)
        losses.append(one.loss_)
        member_preds.append(one.predict_proba(X) if Estimator is MLPClassifier else one.predict(X))
    np.testing.assert_allclose(ens.member_loss_, losses, rtol=1e-10)
    assert ens.loss_ == pytest.approx(np.mean(losses), rel=1e-12)
    mean = np.mean(member_preds, axis=0)
    if Estimator is MLPClassifier:
        p = ens.predict_proba(X)
        np.testing.assert_allclose(p, mean, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(np.exp(ens.predict_log_proba(X)), mean, rtol=1e-9, atol=1e-13)
        np.testing.assert_array_equal(ens.predict(X), ens.classes_[np.argmax(mean, axis=1)])
    else:  # outputs averaged; with loss="poisson" the members' rates
        np.testing.assert_allclose(ens.predict(X), mean, rtol=1e-10, atol=1e-12)


def test_binary_classifier_averages_the_members_probabilities():
    X, y = _iris()
    yb = np.where(y == 1, "b", "a")
    ens = _fit(MLPClassifier(hidden_layer_sizes=(5,), n_members=4, max_iter=5, batch_size=30, shuffle=False,
                             random_state=0), X, yb)
    p = ens.predict_proba(X)
    member = [_as_member(ens, X, yb, i, max_iter=5).predict_proba(X) for i in range(4)]
    np.testing.assert_allclose(p, np.mean(member, axis=0), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(ens.predict(X), np.where(p[:, 1] > 0.5, "b", "a"))


def test_n_members_one_is_the_plain_estimator():
    X, y = _iris()
    a = _fit(MLPClassifier(hidden_layer_sizes=(6,), max_iter=8, random_state=1), X, y)
    b = _fit(MLPClassifier(hidden_layer_sizes=(6,), max_iter=8, random_state=1, n_members=1), X, y)
    assert a.model_.ensemble is None and "members" not in a._model_config
    for wa, wb in zip(a.coefs_, b.coefs_):
        np.testing.assert_array_equal(wa, wb)
    assert a.loss_curve_ == b.loss_curve_
    assert not hasattr(a, "member_loss_")


def test_partial_fit_pickle_and_shapes():
    X, y = _iris()
    ens = MLPClassifier(hidden_layer_sizes=(6,), n_members=3, random_state=0, batch_size=50)
    ens.partial_fit(X, y, classes=np.unique(y))
    assert [c.shape for c in ens.coefs_] == [(3, 4, 6), (3, 6, 3)]
    assert [b.shape for b in ens.intercepts_] == [(3, 1, 6), (3, 1, 3)]
    copy = pickle.loads(pickle.dumps(ens))
    np.testing.assert_array_equal(copy.predict_proba(X), ens.predict_proba(X))
    # a second partial_fit continues every member with its optimiser state
    ref = _fit(MLPClassifier(hidden_layer_sizes=(6,), n_members=3, random_state=0, batch_size=50, max_iter=2,
                             n_iter_no_change=100), X, y)
    ens.partial_fit(X, y)
    copy.partial_fit(X, y)  # the pickle kept the members' Adam moments and step count
    for a, b, c in zip(ens.coefs_, ref.coefs_, copy.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(c, a)
    ens.coefs_[-1] = np.zeros((3, 6, 3))  # the stacked arrays are assignable
    ens.intercepts_[-1] = np.zeros((3, 1, 3))
    np.testing.assert_allclose(ens.predict_proba(X[:2]), np.full((2, 3), 1 / 3), rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_n_members_is_validated(bad):
    X, y = _iris()
    msg = r"'n_members' parameter of MLPRegressor must be an int in the range \[1, inf\)"
    with pytest.raises(ValueError, match=msg):
        MLPRegressor(n_members=bad).fit(X, y)


@pytest.mark.parametrize("kw, what", [({"solver": "lbfgs"}, "solver='lbfgs'"),
                                      ({"early_stopping": True}, "early_stopping=True")])
def test_unsupported_settings_are_refused(kw, what):
    X, y = _iris()
    with pytest.raises(ValueError, match=f"n_members=2 trains .* does not support {what}"):
        MLPClassifier(n_members=2, **kw).fit(X, y)


def test_warm_start_with_another_member_count_is_refused():
    X, y = _iris()
    est = _fit(MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_members=2, warm_start=True, random_state=0), X, y)
    est.set_params(n_members=3)
    with pytest.raises(ValueError, match="n_members=3 but the fitted model has 2 members"):
        est.fit(X, y)


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_members_on_every_backend(backend, Estimator):
    """An ensemble estimator trains on X's backend and device and gives the NumPy fit's
    predictions there (float64), with and without sample weights."""
    backend.skip_without_float64()
    X_np, y_np = _iris()
    sw = np.linspace(0.5, 2.0, X_np.shape[0])
    params = {"hidden_layer_sizes": (6,), "n_members": 3, "max_iter": 4, "batch_size": 40, "random_state": 0,
              "learning_rate_init": 0.01}
    ref = Estimator(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref.fit(X_np, y_np, sample_weight=sw)
        est = Estimator(**params).fit(backend.asarray(X_np), backend.asarray(y_np), sample_weight=backend.asarray(sw))
    assert backend.same_place(est.coefs_[0]) and tuple(est.coefs_[0].shape) == (3, 4, 6)
    X = backend.asarray(X_np)
    out = est.predict_proba(X) if Estimator is MLPClassifier else est.predict(X)
    want = ref.predict_proba(X_np) if Estimator is MLPClassifier else ref.predict(X_np)
    assert backend.same_place(out)
    np.testing.assert_allclose(backend.to_numpy(out), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.member_loss_, ref.member_loss_, rtol=1e-9)


def test_divergence_names_the_epoch_and_members():
    """A member whose loss stops being finite ends the fit loudly (the ensemble fit does
    not train on through non-finite losses as one member does); the epoch counts the
    estimator's epochs."""
    X, y = _iris()
    y_big = y * 1e200  # squared errors overflow at the first step
    est = MLPRegressor(hidden_layer_sizes=(4,), n_members=2, solver="sgd", learning_rate_init=1e-3, max_iter=5,
                       random_state=0)
    with pytest.raises(DivergenceError, match=r"The training loss became non-finite\. .*Training diverged at "
                                              r"epoch 1, step 1: the loss of members \[0, 1\] is not finite"):
        est.fit(X, y_big)


def test_sparse_X_is_refused_and_the_tag_says_so():
    sparse = pytest.importorskip("scipy.sparse")
    X, y = _iris()
    est = MLPClassifier(n_members=2)
    assert est.__sklearn_tags__().input_tags.sparse is False
    assert MLPClassifier().__sklearn_tags__().input_tags.sparse is True
    with pytest.raises(TypeError, match=r"n_members=2 does not take sparse X yet .* X\.toarray\(\)"):
        est.fit(sparse.csr_matrix(X), y)


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_scikit_learn_checks_with_members(Estimator):
    """scikit-learn's estimator checks with n_members=3: all pass but the sample-weight
    equivalence, which the fixed L2 coefficient alpha / batch_size breaks (documented)."""
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(Estimator(n_members=3), on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed == {"check_sample_weight_equivalence_on_dense_data"}
    assert sum(r["status"] == "passed" for r in results) > 40


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_sample_weight_equivalence_without_l2(Estimator):
    """Without the L2 term (whose coefficient is fixed per fit), weights of 2 are the same
    as repeated rows, as scikit-learn's check demands."""
    from sklearn.utils.estimator_checks import check_sample_weight_equivalence_on_dense_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check_sample_weight_equivalence_on_dense_data(Estimator.__name__, Estimator(n_members=3, alpha=0.0))
