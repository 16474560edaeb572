"""L-BFGS for ensembles (:meth:`arraymlp.optim.LBFGS.iterate_members`, ``fit(...,
optimizer="lbfgs")`` of an ensemble, ``solver="lbfgs", n_members=K`` in the estimators).

The oracle is the one-member algorithm: member ``i`` of a K-member run must take the
run of the plain L-BFGS from member ``i``'s start with member ``i``'s objective, the same
iterations, evaluations and stopping rule, and the same parameters to 1e-10 in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arraymlp as am
from arraymlp.ensemble import member_seeds
from arraymlp.optim import LBFGS

JAX_X64 = True  # a jax-x64 row runs the float64 comparisons on JAX too


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _iris():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def _host(a):
    return np.asarray(am.to_numpy(a), dtype=np.float64)


def _assert_params(stacked, i, plain, rtol=1e-10):
    for p_ens, p_one in zip(stacked, plain):
        for key in p_one:
            np.testing.assert_allclose(_host(p_ens[key])[i], _host(p_one[key]).reshape(_host(p_ens[key])[i].shape),
                                       rtol=rtol, atol=1e-12, err_msg=key)


# ----------------------------------------------------------------------------- the runs themselves
def _softmax_members(xp, device, x, y, w, l2):
    """K softmax regressions at once: member k's weighted mean cross-entropy (weights
    ``w[k]``) plus ``l2[k]/2 ||W_k||^2``, written with the namespace's own operations."""
    k, c = int(w.shape[0]), int(np.max(y)) + 1
    onehot = xp.asarray(np.eye(c)[y], device=device)
    ws = xp.asarray(w / w.sum(axis=1, keepdims=True), device=device)  # (K, n)
    l2v = xp.asarray(np.asarray(l2, dtype=np.float64).reshape(k, 1, 1), device=device)

    def fun(params):
        W, b = params[0]["W"], params[0]["b"]  # (K, d, c), (K, 1, c)
        z = x @ W + b
        z = z - xp.max(z, axis=-1, keepdims=True)
        logp = z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))
        f = -xp.sum(ws * xp.sum(onehot * logp, axis=-1), axis=-1) + 0.5 * xp.sum(l2v * W * W, axis=(1, 2))
        dz = (xp.exp(logp) - onehot) * ws[:, :, None]
        return f, [{"W": xp.matrix_transpose(x) @ dz + l2v * W, "b": xp.sum(dz, axis=1, keepdims=True)}]

    return fun


def _member_fun(fun, i):
    """The objective of member ``i`` of a one-member stacked ``fun``, on plain parameters."""
    def one(params):
        f, g = fun([{key: a[None, ...] for key, a in params[0].items()}])
        return f[0], [{key: a[0, ...] for key, a in g[0].items()}]

    return one


@pytest.mark.parametrize("two_loop", ["stacked", "per_member"])
@pytest.mark.parametrize("line_search", ["more_thuente", "strong_wolfe"])
def test_each_member_is_the_plain_run(backend, rng, line_search, two_loop, monkeypatch):
    """Five softmax regressions with their own weights, L2 and starts: each member's
    iterations, evaluations, status, loss and parameters are those of
    :meth:`LBFGS.iterate` on that member alone, with the two-loop recursion over the
    stacked histories or member by member."""
    from arraymlp import optim

    backend.skip_without_float64()
    monkeypatch.setattr(optim._Members, "per_member_two_loop", two_loop == "per_member")
    xp, dev = backend.xp, backend.device
    k, n, d, c = 5, 40, 3, 3
    xh = rng.normal(size=(n, d))
    y = rng.integers(0, c, size=n)
    w = rng.uniform(0.2, 2.0, size=(k, n))
    l2 = np.array([1e-3, 1e-1, 0.0, 1e-2, 3e-1])
    x = backend.asarray(xh)
    W0 = rng.normal(size=(k, d, c)) * 0.3
    b0 = rng.normal(size=(k, 1, c)) * 0.3
    fun = _softmax_members(xp, dev, x, y, w, l2)
    opts = {"tol": 1e-6, "max_iter": 30, "line_search": line_search}
    params = [{"W": xp.asarray(W0.copy(), device=dev), "b": xp.asarray(b0.copy(), device=dev)}]
    opt = LBFGS(**opts)
    rounds = 0
    for done in opt.iterate_members(fun, params):
        rounds += 1
        for _, it in done:
            assert it.n_iter <= opt.max_iter and 1 <= it.evaluation <= it.n_fun
    assert rounds >= 1
    for i in range(k):
        fi = _softmax_members(xp, dev, x, y, w[i:i + 1], l2[i:i + 1])
        plain = [{"W": xp.asarray(W0[i].copy(), device=dev), "b": xp.asarray(b0[i].copy(), device=dev)}]
        ref = LBFGS(**opts)
        ref.minimize(_member_fun(fi, 0), plain)
        assert (opt.n_iter[i], opt.n_fun[i], opt.status[i]) == (ref.n_iter, ref.n_fun, ref.status), i
        assert opt.loss[i] == pytest.approx(ref.loss, rel=1e-12)
        _assert_params(params, i, plain)


def test_members_stop_on_different_rules():
    """A member started at its minimiser stops at once on tol (0 iterations, 1
    evaluation), the others iterate on; one stops on ftol, one on max_iter; each is its
    plain run."""
    A = np.array([[3.0, 1.0], [1.0, 2.0]])
    b = np.array([[1.0, -1.0], [0.0, 0.0], [2.0, 0.5], [-1.0, 3.0]])

    def fun(params):
        w = params[0]["w"]
        return np.sum(w @ A * w, axis=1) / 2 - np.sum(b * w, axis=1), [{"w": w @ A - b}]

    params = [{"w": np.zeros((4, 2))}]
    opt = LBFGS(tol=1e-10, max_iter=3)
    opt.minimize_members(fun, params)
    for i in range(4):
        def one(p, i=i):
            v = p[0]["w"]
            return v @ A @ v / 2 - b[i] @ v, [{"w": A @ v - b[i]}]

        plain = [{"w": np.zeros(2)}]
        ref = LBFGS(tol=1e-10, max_iter=3)
        ref.minimize(one, plain)
        assert (opt.n_iter[i], opt.n_fun[i], opt.status[i], opt.message[i]) == (ref.n_iter, ref.n_fun, ref.status,
                                                                                 ref.message)
        np.testing.assert_allclose(params[0]["w"][i], plain[0]["w"], rtol=1e-12)
    assert opt.status[1] == "gtol" and opt.n_iter[1] == 0 and opt.n_fun[1] == 1
    assert len(set(opt.status)) >= 2


@pytest.mark.parametrize("max_fun", [2, 5, 9, 14])
def test_max_fun_cuts_each_members_search_as_alone(max_fun, rng):
    """A member whose evaluations run out mid-search takes its lowest trial with
    sufficient decrease, possibly one evaluated rounds before (its gradient kept from
    that round), as the plain run does."""
    k, n, d, c = 4, 30, 4, 3
    x = rng.normal(size=(n, d)) * 3.0  # badly scaled: the first searches take several trials
    y = rng.integers(0, c, size=n)
    w = rng.uniform(0.5, 1.5, size=(k, n))
    l2 = np.array([0.0, 1e-2, 1e-1, 1.0])
    W0 = rng.normal(size=(k, d, c))
    b0 = rng.normal(size=(k, 1, c))
    fun = _softmax_members(np, None, x, y, w, l2)
    params = [{"W": W0.copy(), "b": b0.copy()}]
    opt = LBFGS(max_fun=max_fun, tol=0.0, ftol=0.0)
    opt.minimize_members(fun, params)
    assert (opt.n_fun <= max_fun).all()
    for i in range(k):
        plain = [{"W": W0[i].copy(), "b": b0[i].copy()}]
        ref = LBFGS(max_fun=max_fun, tol=0.0, ftol=0.0)
        ref.minimize(_member_fun(_softmax_members(np, None, x, y, w[i:i + 1], l2[i:i + 1]), 0), plain)
        assert (opt.n_iter[i], opt.n_fun[i], opt.status[i]) == (ref.n_iter, ref.n_fun, ref.status)
        _assert_params(params, i, plain)


def test_iterate_members_checks_its_input():
    with pytest.raises(ValueError, match="leading member axis"):
        LBFGS().minimize_members(lambda p: (None, None), [{"W": np.zeros((2, 3)), "b": np.zeros((3, 1))}])

    def short(params):
        return np.zeros(1), [{"W": np.zeros_like(params[0]["W"])}]

    with pytest.raises(ValueError, match=r"one loss per member, shape \(2,\)"):
        LBFGS().minimize_members(short, [{"W": np.ones((2, 3))}])

    def bad_start(params):
        return np.array([0.0, np.inf]), [{"W": params[0]["W"]}]

    with pytest.raises(FloatingPointError, match=r"members \[1\]"):
        LBFGS().minimize_members(bad_start, [{"W": np.ones((2, 3))}])


def test_host_reads_per_round(monkeypatch, rng):
    """Counted on array_api_strict: each round reads the K losses with their slopes once,
    the finished searches' y.y and gradient sizes once, the new directions' slopes and
    sizes once: at most three reads per evaluation round (and one for the start), however
    many members."""
    import array_api_strict

    from test_host_sync import HostReads

    for k in (1, 6):
        x = array_api_strict.asarray(rng.normal(size=(30, 3)))
        y = rng.integers(0, 3, size=30)
        fun = _softmax_members(array_api_strict, None, x, y, rng.uniform(0.5, 1.5, size=(k, 30)),
                               np.full(k, 1e-2))
        calls = []

        def counted(params, fun=fun, calls=calls):
            calls.append(1)
            return fun(params)

        params = [{"W": array_api_strict.asarray(rng.normal(size=(k, 3, 3))),
                   "b": array_api_strict.asarray(np.zeros((k, 1, 3)))}]
        opt = LBFGS(max_iter=8, tol=0.0, ftol=0.0)
        with monkeypatch.context() as m:
            reads = HostReads(m)
            opt.minimize_members(counted, params)
        total = sum(reads.counts.values())
        assert (opt.n_iter == 8).all()
        assert len(calls) <= total <= 3 * len(calls) + 1


# ----------------------------------------------------------------------------- the ensemble fit
def _fit_pair(backend, *, line_search="more_thuente", epochs=12, max_iter=None, weights=True):
    X, y = _iris()
    k = 3
    sw = np.random.default_rng(1).uniform(0.3, 2.0, size=(k, X.shape[0])) if weights else None
    l2 = [1e-3, 3e-2, 0.0]
    kw = {"dtype": "float64", "backend": backend.name, "device": backend.device}
    ens = am.MLP([4, 6, 3], activation="tanh", ensemble=k, seed=5, **kw)
    opt = LBFGS(max_iter=max_iter, line_search=line_search)
    history = ens.fit(backend.asarray(X), backend.asarray(y), loss="cross_entropy", optimizer=opt, epochs=epochs,
                      l2=l2, sample_weight=None if sw is None else backend.asarray(sw), progress=False)
    plains = []
    for i in range(k):
        one = am.MLP([4, 6, 3], activation="tanh", seed=member_seeds(5, k)[i], **kw)
        h = one.fit(backend.asarray(X), backend.asarray(y), loss="cross_entropy",
                    optimizer=LBFGS(max_iter=max_iter, line_search=line_search), epochs=epochs, l2=l2[i],
                    sample_weight=None if sw is None else backend.asarray(sw[i]), progress=False)
        plains.append((one, h))
    return ens, history, plains


@pytest.mark.parametrize("line_search", ["more_thuente", "strong_wolfe"])
def test_ensemble_fit_member_is_the_plain_lbfgs_fit(backend, line_search):
    """``fit(optimizer="lbfgs")`` of an ensemble with per-member weights (K, n) and L2:
    member i's iterations, evaluations, status (``"interrupted"`` at the epochs cap, as
    the plain fit's), parameters, loss and accuracy after each iteration are the plain
    model's L-BFGS fit from member i's start."""
    backend.skip_without_float64()
    ens, history, plains = _fit_pair(backend, line_search=line_search)
    opt = ens.optimizer_
    loss = np.stack(history.loss)
    acc = np.stack(history.metrics["accuracy"])
    assert loss.shape == acc.shape == (int(opt.n_iter.max()), 3)
    for i, (one, h) in enumerate(plains):
        ref = one.optimizer_
        assert (opt.n_iter[i], opt.n_fun[i], opt.status[i]) == (ref.n_iter, ref.n_fun, ref.status)
        _assert_params(ens.params, i, one.params)
        np.testing.assert_allclose(loss[:ref.n_iter, i], h.loss, rtol=1e-10)
        np.testing.assert_array_equal(acc[:ref.n_iter, i], h.metrics["accuracy"])
        assert np.isnan(loss[ref.n_iter:, i]).all()
        assert opt.loss[i] == pytest.approx(h.loss[-1], rel=1e-10)


def test_ensemble_fit_members_stopping_on_their_own_rules():
    """With max_iter below epochs, members stop on max_iter (or earlier on ftol), each as
    its plain fit; the history's rows past a member's stop are NaN, and
    ``stopped_epoch`` says where each stopped."""
    from conftest import Backend

    ens, history, plains = _fit_pair(Backend("numpy", "numpy"), epochs=60, max_iter=25, weights=False)
    opt = ens.optimizer_
    for i, (one, _) in enumerate(plains):
        assert opt.status[i] == one.optimizer_.status != "interrupted"
        assert (opt.n_iter[i], opt.n_fun[i]) == (one.optimizer_.n_iter, one.optimizer_.n_fun)
        assert history.stopped_epoch[i] == opt.n_iter[i] - 1
        _assert_params(ens.params, i, one.params)


def test_ensemble_partial_fit_is_one_iteration_each():
    X, y = _iris()
    ens = am.MLP([4, 5, 3], ensemble=2, dtype="float64", backend="numpy", seed=2)
    ens.partial_fit(X, y, loss="cross_entropy", optimizer="lbfgs")
    h = ens.partial_fit(X, y)
    assert isinstance(ens.optimizer_, LBFGS) and list(ens.optimizer_.n_iter) == [1, 1]
    for i in range(2):
        one = am.MLP([4, 5, 3], dtype="float64", backend="numpy", seed=ens.member_seeds[i])
        one.partial_fit(X, y, loss="cross_entropy", optimizer="lbfgs")
        h1 = one.partial_fit(X, y)
        _assert_params(ens.params, i, one.params)
        assert h.loss[0][i] == pytest.approx(h1.loss[0], rel=1e-10)


@pytest.mark.parametrize("option, value", [
    ("validation_data", "val"), ("early_stopping", 3), ("callbacks", [am.Callback()]), ("momentum", 0.5),
    ("schedule", lambda epoch: 1.0), ("validation_split", 0.2),
])
def test_ensemble_lbfgs_refuses_what_it_cannot_do(option, value):
    X, y = _iris()
    ens = am.MLP([4, 5, 3], ensemble=2, dtype="float64", backend="numpy", seed=0)
    if value == "val":
        value = (X, y)
    with pytest.raises(ValueError, match=f"optimizer='lbfgs' trains the members .* {option}"):
        ens.fit(X, y, loss="cross_entropy", optimizer="lbfgs", progress=False, **{option: value})


def test_ensemble_lbfgs_refuses_dropout_and_per_member_lr():
    X, y = _iris()
    drop = am.MLP([4, 5, 3], ensemble=2, dropout=0.2, dtype="float64", backend="numpy", seed=0)
    with pytest.raises(ValueError, match="deterministic objective"):
        drop.fit(X, y, loss="cross_entropy", optimizer="lbfgs", progress=False)
    ens = am.MLP([4, 5, 3], ensemble=2, dtype="float64", backend="numpy", seed=0)
    with pytest.raises(TypeError, match="one number for every member"):
        ens.fit(X, y, loss="cross_entropy", optimizer="lbfgs", lr=[1.0, 0.5], progress=False)


# ----------------------------------------------------------------------------- the estimators
def _estimator_pair(Estimator, X, y, sw, backend_kwargs, **kw):
    from sklearn.exceptions import ConvergenceWarning

    params = dict(hidden_layer_sizes=(6,), solver="lbfgs", random_state=3, dtype="float64", **backend_kwargs, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ens = Estimator(n_members=3, **params).fit(X, y, sample_weight=sw)
        seed = int(np.random.RandomState(3).randint(np.iinfo(np.int32).max))
        ones = [Estimator(**{**params, "random_state": member_seeds(seed, 3)[i]}).fit(X, y, sample_weight=sw)
                for i in range(3)]
    return ens, ones


@pytest.mark.parametrize("kind", ["multiclass", "binary", "regression"])
def test_estimator_member_is_the_one_member_estimator(kind):
    """``solver="lbfgs", n_members=3``: member i is the one-member estimator whose
    random_state is ``member_seeds(seed, 3)[i]`` (``seed`` drawn from random_state, the
    ensemble estimators' rule): the same weights, iterations, loss curve and final loss;
    the ConvergenceWarning names the members that did not converge."""
    from arraymlp.sklearn import MLPClassifier, MLPRegressor

    X, y = _iris()
    Estimator = MLPRegressor if kind == "regression" else MLPClassifier
    if kind == "binary":
        y = (y == 1).astype(int)
    if kind == "regression":
        y = np.c_[X[:, 0] - X[:, 1], X[:, 2] * X[:, 3]]
    sw = np.linspace(0.5, 2.0, X.shape[0])
    ens, ones = _estimator_pair(Estimator, X, y, sw, {}, max_iter=30, alpha=1e-3)
    curve = np.stack(ens.member_loss_curve_)
    assert ens.n_iter_.shape == ens.member_loss_.shape == ens.best_loss_.shape == (3,)
    for i, one in enumerate(ones):
        for layer in range(2):
            np.testing.assert_allclose(ens.coefs_[layer][i], one.coefs_[layer], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(ens.intercepts_[layer][i, 0], one.intercepts_[layer], rtol=1e-10, atol=1e-12)
        assert ens.n_iter_[i] == one.n_iter_
        np.testing.assert_allclose(curve[:one.n_iter_, i], one.loss_curve_, rtol=1e-10)
        assert ens.member_loss_[i] == pytest.approx(one.loss_, rel=1e-10)
    assert ens.loss_ == pytest.approx(np.mean([one.loss_ for one in ones]), rel=1e-10)
    np.testing.assert_allclose(ens.loss_curve_, np.nanmean(curve, axis=1))


def test_estimator_lbfgs_members_on_backends(backend):
    from arraymlp.sklearn import MLPClassifier

    backend.skip_without_float64()
    X, y = _iris()
    ens, ones = _estimator_pair(MLPClassifier, backend.asarray(X), y, None, backend.model_kwargs(), max_iter=20,
                                alpha=1e-2)
    for i, one in enumerate(ones):
        for layer in range(2):
            np.testing.assert_allclose(_host(ens.coefs_[layer])[i], _host(one.coefs_[layer]), rtol=1e-10,
                                       atol=1e-12)
        assert ens.n_iter_[i] == one.n_iter_
    proba = np.mean([_host(one.predict_proba(backend.asarray(X))) for one in ones], axis=0)
    np.testing.assert_allclose(_host(ens.predict_proba(backend.asarray(X))), proba, rtol=1e-9, atol=1e-12)


def test_estimator_lbfgs_members_warn_naming_members():
    from sklearn.exceptions import ConvergenceWarning

    from arraymlp.sklearn import MLPClassifier

    X, y = _iris()
    with pytest.warns(ConvergenceWarning, match=r"members \[0, 1, 2\]"):
        MLPClassifier(hidden_layer_sizes=(6,), solver="lbfgs", n_members=3, max_iter=3, random_state=0).fit(X, y)


@pytest.mark.parametrize("estimator", ["MLPClassifier", "MLPRegressor"])
def test_scikit_learn_checks_with_lbfgs_members(estimator):
    """scikit-learn's estimator checks with solver="lbfgs", n_members=3, all of them. As for
    one member (tests/test_lbfgs.py), check_classifiers_train may fail only on rounding:
    predict_proba is delivered in float32 (the check's input dtype), where a probability
    of 1 - 1e-8 is 1.0, while predict_log_proba comes from the float64 logits."""
    from sklearn.utils.estimator_checks import check_estimator

    import arraymlp.sklearn as sk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = getattr(sk, estimator)(solver="lbfgs", n_members=3, dtype="float64", max_iter=50)
        results = check_estimator(est, on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed <= ({"check_classifiers_train"} if estimator == "MLPClassifier" else set())
    assert sum(r["status"] == "passed" for r in results) > 40
