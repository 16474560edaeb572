"""``n_members=K`` on the scikit-learn estimators: a deep ensemble behind the same API.

Member ``i`` is checked against a one-member estimator started from member ``i``'s
initial parameters and trained with the same settings. :func:`_one_member` builds that
estimator so that it also draws the ensemble's batch order (the ensemble's generator is
member 0's) and splits off the same validation rows (the split's seed comes from
``random_state`` as for one member): then shuffling, sample weights, a short last batch,
the per-batch L2 rule, the ``tol`` test and early stopping can all be compared."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning

import arraymlp.sklearn as sk
from arraymlp.ensemble import member_seeds
from arraymlp.sklearn import MLPClassifier, MLPRegressor, _build_model
from arraymlp.training import DivergenceError


def _iris():
    X, y = load_iris(return_X_y=True)
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def _fit(est, X, y, sample_weight=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y, sample_weight=sample_weight)


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


def _one_member(monkeypatch, est, i, X, y, sample_weight=None):
    """A fresh one-member estimator of ``est``'s parameters whose model starts as member
    ``i`` and whose generator is the ensemble's (member 0's after its initialisation), so
    that it shuffles as the ensemble does; trained on ``(X, y)`` from scratch, it draws
    the same seeds from ``random_state`` and so the same early-stopping split."""
    k = est.n_members

    def build(config, *, seed, backend, device):
        seeds = member_seeds(seed, k)
        model = _build_model(config, seed=seeds[i], backend=backend, device=device)
        model.rng = _build_model(config, seed=seeds[0], backend=backend, device=device).rng
        return model

    with monkeypatch.context() as m:
        m.setattr(sk, "_build_model", build)
        return _fit(type(est)(**{**est.get_params(), "n_members": 1}), X, y, sample_weight)


def _assert_member_is(ens, i, one, rtol=1e-10):
    for layer in range(len(one.coefs_)):
        np.testing.assert_allclose(ens.coefs_[layer][i], one.coefs_[layer], rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(ens.intercepts_[layer][i, 0], one.intercepts_[layer], rtol=rtol, atol=1e-12)
    assert ens.n_iter_[i] == one.n_iter_
    assert ens.member_loss_[i] == pytest.approx(one.loss_, rel=rtol)
    curve = np.asarray(ens.member_loss_curve_)[:, i]
    np.testing.assert_allclose(curve[:one.n_iter_], one.loss_curve_, rtol=rtol)
    assert np.isnan(curve[one.n_iter_:]).all()  # frozen after its stop


@pytest.mark.parametrize("Estimator, kw", [
    (MLPClassifier, {"solver": "adam", "learning_rate_init": 0.05}),
    (MLPClassifier, {"solver": "sgd", "learning_rate_init": 0.1, "momentum": 0.5}),
    (MLPRegressor, {"solver": "adam", "learning_rate_init": 0.02}),
    (MLPRegressor, {"solver": "adam", "loss": "poisson", "learning_rate_init": 0.02}),
], ids=["clf-adam", "clf-sgd", "reg-adam", "reg-poisson"])
def test_early_stopping_member_is_the_one_member_estimator(monkeypatch, Estimator, kw):
    """early_stopping with n_members=3: each member is scored on the held-out rows (its
    accuracy or R^2), stops after n_iter_no_change epochs without improvement by tol, is
    frozen while the others go on, and ends with its best epoch's parameters; member i
    equals a one-member estimator of the same start, batches (shuffled, a short last
    batch, sample weights) and validation split."""
    X, y = _iris()
    if Estimator is MLPRegressor:
        y = 0.3 * X[:, 0] + y + 1.0  # positive, for the Poisson loss
    sw = np.linspace(0.5, 2.0, X.shape[0])
    ens = _fit(Estimator(hidden_layer_sizes=(5,), n_members=3, early_stopping=True, n_iter_no_change=3,
                         batch_size=32, alpha=1e-2, max_iter=60, random_state=0, **kw), X, y, sw)
    assert ens.n_iter_.shape == (3,) and ens.best_validation_score_.shape == (3,)
    assert ens.best_loss_ is None
    scores = np.asarray(ens.validation_scores_)
    assert scores.shape == (int(ens.n_iter_.max()), 3)
    for i in range(3):
        one = _one_member(monkeypatch, ens, i, X, y, sw)
        _assert_member_is(ens, i, one)
        np.testing.assert_allclose(scores[:one.n_iter_, i], one.validation_scores_, rtol=1e-10, atol=1e-12)
        assert np.isnan(scores[one.n_iter_:, i]).all()
        assert ens.best_validation_score_[i] == pytest.approx(one.best_validation_score_, rel=1e-12)
        assert ens.best_validation_score_[i] == np.nanmax(scores[:, i])
        assert one.n_iter_ < 60  # it stopped early


def test_early_stopping_with_warm_start_member_is_the_one_member_estimator(monkeypatch):
    """A second fit with warm_start goes on from each member's parameters, keeps its best
    score of the first fit, and restores only the members that beat it in this fit, as
    the one-member estimator does."""
    X, y = _iris()
    params = {"hidden_layer_sizes": (5,), "n_members": 3, "early_stopping": True, "n_iter_no_change": 2,
              "batch_size": 32, "max_iter": 4, "learning_rate_init": 0.05, "random_state": 0}
    ens = _fit(MLPClassifier(**params), X, y)
    ones = [_one_member(monkeypatch, ens, i, X, y) for i in range(3)]
    ens = _fit(ens.set_params(warm_start=True, max_iter=30), X, y)
    for i, one in enumerate(ones):
        one = _fit(one.set_params(warm_start=True, max_iter=30), X, y)
        for a, b in zip(ens.coefs_ + ens.intercepts_, one.coefs_ + one.intercepts_):
            np.testing.assert_allclose(a[i].reshape(b.shape), b, rtol=1e-10, atol=1e-12)
        assert ens.n_iter_[i] == one.n_iter_
        assert ens.best_validation_score_[i] == pytest.approx(one.best_validation_score_, rel=1e-12)
        scores = np.asarray(ens.validation_scores_)[:, i]  # both fits' epochs, NaN where it had stopped
        np.testing.assert_allclose(scores[~np.isnan(scores)], one.validation_scores_, rtol=1e-10)


def test_early_stopping_members_stop_at_different_epochs(monkeypatch):
    """The members' stops are their own (here at different epochs), and the fit ends
    with the last one's."""
    X, y = _iris()
    ens = _fit(MLPClassifier(hidden_layer_sizes=(5,), n_members=3, early_stopping=True, n_iter_no_change=3,
                             batch_size=32, max_iter=60, learning_rate_init=0.05, random_state=0), X, y)
    assert len(set(ens.n_iter_.tolist())) > 1
    assert len(ens.loss_curve_) == len(ens.validation_scores_) == ens.n_iter_.max()
    for i in range(3):
        _assert_member_is(ens, i, _one_member(monkeypatch, ens, i, X, y))


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_l2_per_batch_short_last_batch_and_weights(monkeypatch, Estimator):
    """The L2 coefficient is alpha over each batch's weight sum (its size without
    weights), a short last batch included, and a batch of zero weights takes no step:
    member i equals the one-member estimator, with and without weights."""
    X, y = _iris()
    if Estimator is MLPRegressor:
        y = X[:, 0] + y
    sw = np.linspace(0.2, 3.0, X.shape[0])
    sw[40:80] = 0.0  # without shuffling, the second batch has no weight
    for shuffle, weights in ((False, sw), (True, sw), (True, None)):
        ens = _fit(Estimator(hidden_layer_sizes=(6,), n_members=3, batch_size=40, alpha=0.5, shuffle=shuffle,
                             max_iter=5, n_iter_no_change=100, learning_rate_init=0.02, random_state=1),
                   X, y, weights)
        for i in range(3):
            _assert_member_is(ens, i, _one_member(monkeypatch, ens, i, X, y, weights))


@pytest.mark.parametrize("kw", [{"solver": "adam"},
                                {"solver": "sgd", "learning_rate": "adaptive", "learning_rate_init": 0.05}],
                         ids=["adam", "sgd-adaptive"])
def test_tol_rule_per_member(monkeypatch, kw):
    """Without early stopping each member follows scikit-learn's tol rule on its own
    training loss (n_iter_no_change epochs without a decrease by tol): it stops (or,
    with the adaptive schedule, divides its own rate by 5) on its own, and is frozen."""
    X, y = _iris()
    params = {"hidden_layer_sizes": (5,), "n_members": 3, "batch_size": 32, "max_iter": 200, "tol": 1e-2,
              "n_iter_no_change": 2, "random_state": 0, "learning_rate_init": 0.05, **kw}
    ens = _fit(MLPClassifier(**params), X, y)
    assert ens.n_iter_.max() < 200 and ens.best_loss_.shape == (3,)
    if kw["solver"] == "sgd":
        assert ens._lr.shape == (3,) and (ens._lr < 0.05).all()
    for i in range(3):
        one = _one_member(monkeypatch, ens, i, X, y)
        _assert_member_is(ens, i, one)
        assert ens.best_loss_[i] == pytest.approx(one.best_loss_, rel=1e-12)
        if kw["solver"] == "sgd":
            assert ens._lr[i] == pytest.approx(one._lr, rel=1e-12)
    curve = np.asarray(ens.member_loss_curve_)
    np.testing.assert_allclose(ens.loss_curve_, np.nanmean(curve, axis=1), rtol=1e-12)
    assert ens.loss_ == pytest.approx(np.mean(ens.member_loss_), rel=1e-12)


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
    assert ens.n_iter_.tolist() == [E] * K and len(ens.loss_curve_) == E
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
    assert ens.n_iter_.tolist() == [1, 1, 1]  # as scikit-learn: 1 per partial_fit, here per member
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


def test_max_iter_warning_names_the_members_still_training():
    X, y = _iris()
    est = MLPClassifier(hidden_layer_sizes=(4,), n_members=2, max_iter=2, random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(2\) reached .*\(members \[0, 1\]\)"):
        est.fit(X, y)
    assert est.n_iter_.tolist() == [2, 2] and len(est.member_loss_curve_) == 2


def test_warm_start_with_another_member_count_is_refused():
    X, y = _iris()
    est = _fit(MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_members=2, warm_start=True, random_state=0), X, y)
    est.set_params(n_members=3)
    with pytest.raises(ValueError, match="n_members=3 but the fitted model has 2 members"):
        est.fit(X, y)


@pytest.mark.parametrize("early", [False, True], ids=["tol", "early_stopping"])
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_members_on_every_backend(backend, Estimator, early):
    """An ensemble estimator trains on X's backend and device and gives the NumPy fit's
    predictions there (float64), with sample weights, per-member stopping (tol or early
    stopping) included."""
    backend.skip_without_float64()
    X_np, y_np = _iris()
    sw = np.linspace(0.5, 2.0, X_np.shape[0])
    params = {"hidden_layer_sizes": (6,), "n_members": 3, "max_iter": 6, "batch_size": 40, "random_state": 0,
              "learning_rate_init": 0.01, "early_stopping": early, "n_iter_no_change": 1, "tol": 0.5 if early else 0.2}
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
    np.testing.assert_array_equal(est.n_iter_, ref.n_iter_)
    if early:
        np.testing.assert_allclose(np.asarray(est.validation_scores_), np.asarray(ref.validation_scores_),
                                   rtol=1e-9)


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


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_sparse_X_equals_dense(Estimator):
    """A scipy.sparse X with n_members=3 (CSR and COO; shuffled, sample weights, early
    stopping) trains the members as the densified X does: the first layer's K products
    are one sparse product. The sparse tag says so."""
    sparse = pytest.importorskip("scipy.sparse")
    X, y = _iris()
    X[np.abs(X) < 0.7] = 0.0  # about half the entries stored
    if Estimator is MLPRegressor:
        y = X[:, 0] + y
    sw = np.linspace(0.5, 2.0, X.shape[0])
    params = {"hidden_layer_sizes": (6,), "n_members": 3, "batch_size": 32, "max_iter": 30, "early_stopping": True,
              "n_iter_no_change": 2, "learning_rate_init": 0.05, "random_state": 0}
    assert Estimator(**params).__sklearn_tags__().input_tags.sparse is True
    dense = _fit(Estimator(**params), X, y, sw)
    for fmt in (sparse.csr_matrix, sparse.coo_array):
        est = _fit(Estimator(**params), fmt(X), y, sw)
        np.testing.assert_array_equal(est.n_iter_, dense.n_iter_)
        for a, b in zip(est.coefs_ + est.intercepts_, dense.coefs_ + dense.intercepts_):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(est.validation_scores_), np.asarray(dense.validation_scores_),
                                   rtol=1e-12)
        got = est.predict_proba(fmt(X)) if Estimator is MLPClassifier else est.predict(fmt(X))
        want = dense.predict_proba(X) if Estimator is MLPClassifier else dense.predict(X)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert len(set(dense.n_iter_.tolist())) > 1 or dense.n_iter_.max() < 30  # the members stopped


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_scikit_learn_checks_with_members(Estimator):
    """scikit-learn's estimator checks with n_members=3, all of them (the sample-weight
    equivalence too, now that the L2 coefficient follows each batch's weight sum)."""
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(Estimator(n_members=3), on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed == set()
    assert sum(r["status"] == "passed" for r in results) > 40


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_sample_weight_equivalence_with_a_strong_l2(Estimator):
    """Weights of 2 are the same as repeated rows with a large alpha too: the L2 term is
    scaled by each batch's weight sum, as for one member."""
    from sklearn.utils.estimator_checks import check_sample_weight_equivalence_on_dense_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check_sample_weight_equivalence_on_dense_data(Estimator.__name__, Estimator(n_members=3, alpha=1.0))
