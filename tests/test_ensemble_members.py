"""Each member's own random streams and optimiser state (arraymlp.ensemble).

The oracle is a plain model: member ``i`` of ``MLP(..., ensemble=K, seed=s)`` fitted with
``seed=t`` draws its dropout masks (and, with ``shuffle="members"``, its batch order) as
the plain ``MLP(..., seed=member_seeds(s, K)[i])`` fitted with
``seed=member_seeds(t, K)[i]`` draws them, and a frozen member's optimiser stands still
as a plain model's does once its fit has stopped."""

import numpy as np
import pytest

import arraymlp as am
from arraymlp._backend import counter_bits, member_counter_bits
from arraymlp.ensemble import MemberGenerators, member_seeds

K = 3


@pytest.fixture(autouse=True)
def _numpy_path(monkeypatch):
    """NumPy's ufunc path for the whole module. The compiled NumPy kernels (kernels._jit)
    load in a process only once earlier calls have tallied enough work, and their
    cross-entropy differs from the ufuncs' in the last bit; a plain model's 2-D logits
    can take them where an ensemble's (K, n, c) ones do not. The bit-for-bit comparisons
    here would then hold or fail by what ran before in the process."""
    from arraymlp.kernels import _jit

    monkeypatch.setattr(_jit, "_kernels", None)


def _data(backend, n=30, n_in=5, n_out=3, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in))
    y = rng.integers(0, n_out, size=n) if labels else rng.normal(size=(n, n_out))
    return backend.asarray(x), backend.asarray(y)


def _np_params(model):
    return [{k: am.to_numpy(v) for k, v in p.items()} for p in model.params]


def _equal(a, b, tol=0.0):
    """Parameter lists equal: bit for bit (``tol=0``), or to ``tol``."""
    for pa, pb in zip(a, b, strict=True):
        assert pa.keys() == pb.keys()
        for k in pa:
            if tol == 0.0:
                np.testing.assert_array_equal(pa[k], pb[k])
            else:
                np.testing.assert_allclose(pa[k], pb[k], rtol=tol, atol=tol)


def _net(backend, *, input_dropout=True, seed=7):
    """5 -> (input dropout) -> 8 tanh -> dropout -> 3: masks on a shared input (drawn
    (K, n, 5) for the members) and on the members' activations (K, n, 8)."""
    layers = ([am.Dropout(0.2)] if input_dropout else []) + [am.Dense(5, 8), am.Tanh(), am.Dropout(0.3),
                                                             am.Dense(8, 3)]
    return lambda ensemble=None, s=seed: am.Sequential(layers, ensemble=ensemble, seed=s, dtype="float64",
                                                        **backend.model_kwargs())


# ------------------------------------------------------------------- the draws
def test_member_counter_bits_are_each_streams_own(backend):
    """Row k of one draw for K streams is counter_bits of stream k, bit for bit."""
    keys, counters = [5, 2**64 - 1, 12345678901234567], [0, 3, 2**40]
    both = backend.to_numpy(member_counter_bits((4, 6), keys, counters, backend.xp, backend.device))
    assert both.shape == (3, 4, 6)
    for k in range(3):
        np.testing.assert_array_equal(both[k], backend.to_numpy(counter_bits((4, 6), keys[k], counters[k],
                                                                             backend.xp, backend.device)))
    assert len({both[k].tobytes() for k in range(3)}) == 3


def test_a_frozen_members_stream_stands_still(backend):
    gens = MemberGenerators(am.Generator(0, backend.xp, backend.device),
                            [am.Generator(s, backend.xp, backend.device) for s in (1, 2)])
    gens.active = np.array([True, False])
    gens.bits((2, 3, 4))
    assert [m.counter for m in gens.members] == [1, 0]
    state = gens.get_state()
    moved = gens.moved(backend.xp, backend.device)
    assert moved.get_state() == state and [m.counter for m in moved.members] == [1, 0]


# ------------------------------------------------------------------- dropout
@pytest.mark.parametrize("input_dropout", [True, False], ids=["input+hidden", "hidden"])
@pytest.mark.parametrize("rates", ["shared", "per-member"])
def test_member_i_draws_the_dropout_masks_of_its_plain_model(backend, input_dropout, rates):
    """With dropout (on the input and on hidden activations) and Adam, member i equals
    the plain model of member i's seed fitted with seed member_seeds(t, K)[i]: bit for bit
    in float64 where the members share their rate (on NumPy and array-api-strict; torch's
    batched products sum in another order than its plain ones, without dropout too), to
    1e-10 with per-member rates, as without dropout; without fit's
    seed, the plain model of member i's seed that continues its own generator
    (``member(i)`` before the fit). A mask drawn wrong would differ by O(1)."""
    x, y = _data(backend)
    build = _net(backend, input_dropout=input_dropout)
    lrs = [0.03] * K if rates == "shared" else [0.01, 0.03, 0.05]
    tol = 0.0 if rates == "shared" and backend.name in ("numpy", "array_api_strict") else 1e-10
    lr = 0.03 if rates == "shared" else lrs
    ens = build(K)
    starts = [ens.member(i) for i in range(K)]
    hist = ens.fit(x, y, loss="cross_entropy", lr=lr, epochs=3, batch_size=8, shuffle=False, seed=4,
                   progress=False)
    fit_seeds = member_seeds(4, K)
    for i in range(K):
        plain = build(None, member_seeds(7, K)[i])
        _equal(_np_params(plain), _np_params(starts[i]))
        h = plain.fit(x, y, loss="cross_entropy", optimizer=am.Adam(lr=lrs[i]), epochs=3, batch_size=8,
                      shuffle=False, seed=fit_seeds[i], progress=False)
        _equal(_np_params(ens.member(i)), _np_params(plain), tol)
        np.testing.assert_allclose([e[i] for e in hist.loss], h.loss, rtol=1e-12)  # (summed in another order)
    # no seed= in fit: each member goes on with its own generator, as its plain model does
    ens2 = build(K)
    starts = [ens2.member(i) for i in range(K)]
    ens2.fit(x, y, loss="cross_entropy", lr=lr, epochs=2, batch_size=8, shuffle=False, progress=False)
    for i in range(K):
        starts[i].fit(x, y, loss="cross_entropy", optimizer=am.Adam(lr=lrs[i]), epochs=2, batch_size=8,
                      shuffle=False, progress=False)
        _equal(_np_params(ens2.member(i)), _np_params(starts[i]), tol)
        fresh = build(None, member_seeds(7, K)[i])
        fresh.fit(x, y, loss="cross_entropy", optimizer=am.Adam(lr=lrs[i]), epochs=2, batch_size=8,
                  shuffle=False, progress=False)
        _equal(_np_params(fresh), _np_params(starts[i]))
        # member(i) carries the member's streams on, where its plain model's are
        assert ens2.member(i).rng.get_state() == starts[i].rng.get_state()


def test_the_members_masks_differ(backend):
    """Members of equal parameters (stacked copies of one model) get different masks:
    their dropout noise is not one draw shared."""
    x, y = _data(backend)
    one = _net(backend)()
    ens = am.Sequential.stack([one.copy() for _ in range(K)])
    ens.rng = MemberGenerators(one.rng, [am.Generator(s, backend.xp, backend.device) for s in (1, 2, 3)])
    ens.fit(x, y, loss="cross_entropy", lr=0.05, epochs=1, batch_size=10, shuffle=False, progress=False)
    w = am.to_numpy(ens.params[1]["W"])  # (after the input dropout)
    assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[1], w[2])


# ------------------------------------------------------------------- frozen members
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_frozen_member_goes_on_as_its_stopped_plain_model(backend, optimizer):
    """Members stop at different epochs (per-member early stopping), then two partial_fit
    calls train all of them again: each member ends where its plain model ends, stopped
    by the same early stopping and then given the same two partial_fit calls. A frozen
    member's moments, step count (Adam's bias correction, the first momentum step) and
    dropout stream stood still while it was frozen, as the stopped plain model's did."""
    x, y = _data(backend, n=40, labels=False)
    xv, yv = _data(backend, n=20, labels=False, seed=9)
    lrs = [0.3, 1e-4, 0.05] if optimizer == "adam" else [0.5, 1e-4, 0.05]
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    build = _net(backend, input_dropout=False, seed=3)
    tol = 0.0 if backend.name in ("numpy", "array_api_strict") else 1e-10

    def opt(i):
        return am.Adam(lr=lrs[i]) if optimizer == "adam" else am.SGD(lr=lrs[i], momentum=0.9)

    common = dict(loss="mse", epochs=12, batch_size=10, shuffle=False, validation_data=(xv, yv), progress=False)
    ens = build(K)
    starts = [ens.member(i) for i in range(K)]
    hist = ens.fit(x, y, optimizer=optimizer, lr=lrs, early_stopping=am.EarlyStopping("val_loss", patience=1),
                   seed=2, **common, **extra)
    stopped = hist.stopped_epoch
    assert (stopped >= 0).any() and len(set(stopped.tolist())) > 1  # stopped, at different epochs
    for _ in range(2):
        ens.partial_fit(x, y, lr=lrs, batch_size=10, shuffle=False)
    steps = []
    for i in range(K):
        plain = starts[i]
        h = plain.fit(x, y, optimizer=opt(i), early_stopping=am.EarlyStopping("val_loss", patience=1),
                      seed=member_seeds(2, K)[i], **common)
        assert hist.stopped_epoch[i] == (len(h.loss) - 1 if h.stopped_early else -1)
        for _ in range(2):
            plain.partial_fit(x, y, lr=lrs[i], batch_size=10, shuffle=False)
        _equal(_np_params(ens.member(i)), _np_params(plain), tol)
        steps.append(plain.optimizer_.step_count)
    np.testing.assert_array_equal(ens.ensemble_optimizer_.t, steps)
    assert len(set(steps)) > 1


def test_a_frozen_members_schedule_and_loss_scale_stand_still(backend, monkeypatch):
    """Per-member ReduceOnPlateau schedules and float16 loss scales under per-member early
    stopping: after the fit, member i's schedule state and loss scale (and skip count)
    are those of its plain model stopped by the same early stopping; a frozen member's
    do not go on moving with the epochs and steps it no longer trains in."""
    if backend.name not in ("numpy", "torch"):
        pytest.skip("float16 compute is checked bit for bit on NumPy and torch (as in test_ensemble)")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(size=(48, 5)).astype(np.float32))
    y = backend.asarray(rng.normal(size=(48, 3)).astype(np.float32))
    xv = backend.asarray(rng.normal(size=(16, 5)).astype(np.float32))
    yv = backend.asarray(rng.normal(size=(16, 3)).astype(np.float32))
    lrs = [0.3, 1e-4, 0.05]

    def amp():
        return am.MixedPrecision("float16", init_scale=2.0**14, growth_interval=2)

    def plateau(lr):
        return am.schedules.ReduceOnPlateau(lr, factor=0.5, patience=0)

    common = dict(loss="mse", optimizer="adam", epochs=10, batch_size=16, validation_data=(xv, yv), progress=False)
    ens = am.MLP([5, 8, 3], ensemble=K, seed=5, **backend.model_kwargs())
    starts = [ens.member(i) for i in range(K)]
    scales, schedules = amp(), [plateau(lr) for lr in lrs]
    h = ens.fit(x, y, schedule=schedules, precision=scales, early_stopping=am.EarlyStopping("val_loss", patience=1),
                seed=1, **common)
    assert len(set(h.stopped_epoch.tolist())) > 1
    for i in range(K):
        own, sched = amp(), plateau(lrs[i])
        starts[i].fit(x, y, schedule=sched, precision=own, early_stopping=am.EarlyStopping("val_loss", patience=1),
                      seed=1, **common)  # (no dropout: the shared batch order is all fit's seed draws)
        _equal(_np_params(ens.member(i)), _np_params(starts[i]), 1e-6)  # (per-member rates: float32 arrays)
        got, want = schedules[i].state_dict(), sched.state_dict()
        assert got.pop("best") == pytest.approx(want.pop("best"), rel=1e-6) and got == want
        assert float(backend.to_numpy(scales.scale)[i]) == float(own.scale)
        assert int(backend.to_numpy(scales.good_steps)[i]) == int(own.good_steps)
        assert int(backend.to_numpy(scales.skipped)[i]) == int(own.skipped)


def test_copy_and_to_carry_each_members_optimiser_on(backend):
    """An ensemble trained on NumPy with one member frozen for a while (different step
    counts), then moved with ``to`` (or copied with ``copy(backend=...)``) to this row
    and given a partial_fit: each member equals its plain model moved and trained alike,
    as a plain model's ``to`` and ``copy`` carry its optimiser on."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(24, 5)), rng.normal(size=(24, 3))
    ens = am.MLP([5, 6, 3], ensemble=2, seed=0, dtype="float64", backend="numpy")
    plains = [ens.member(i) for i in range(2)]
    ens.partial_fit(x, y, loss="mse", optimizer=am.Adam(lr=0.01), batch_size=8, shuffle=False)
    ens.partial_fit(x, y, batch_size=8, shuffle=False, _active=[True, False])  # member 1 frozen for an epoch
    for i, p in enumerate(plains):
        p.partial_fit(x, y, loss="mse", optimizer=am.Adam(lr=0.01), batch_size=8, shuffle=False)
        if i == 0:
            p.partial_fit(x, y, batch_size=8, shuffle=False)
    np.testing.assert_array_equal(ens.ensemble_optimizer_.t, [6, 3])
    xb, yb = backend.asarray(x), backend.asarray(y)
    tol = 0.0 if backend.name in ("numpy", "array_api_strict") else 1e-12
    for move in ("to", "copy"):
        moved = ens.copy().to(backend.name, backend.device) if move == "to" else ens.copy(**backend.model_kwargs())
        moved.partial_fit(xb, yb, batch_size=8, shuffle=False)
        for i, p in enumerate(plains):
            q = p.copy().to(backend.name, backend.device) if move == "to" else p.copy(**backend.model_kwargs())
            q.partial_fit(xb, yb, batch_size=8, shuffle=False)
            _equal(_np_params(moved.member(i)), _np_params(q), tol)


# ------------------------------------------------------------------- per-member order
@pytest.mark.parametrize("case", ["labels", "regression", "regression-1d", "custom-loss"])
def test_shuffle_members_gives_member_i_its_plain_models_batches(backend, case):
    """``shuffle="members"`` with dropout, per-member sample weights and rates, a short
    last batch and metrics: member i (parameters, losses, training metrics) equals the
    plain model of member i's seed fitted with seed member_seeds(t, K)[i] and shuffling
    on; without fit's seed, the plain model going on with its own generator."""
    n = 29  # batches of 8: a short last one
    rng = np.random.default_rng(4)
    x_np = rng.normal(size=(n, 5))
    out = 1 if case == "regression-1d" else 3
    y_np = {"labels": rng.integers(0, 3, size=n), "regression": rng.normal(size=(n, 3)),
            "regression-1d": rng.normal(size=n), "custom-loss": rng.normal(size=(n, 3))}[case]
    w = rng.uniform(0.2, 2.0, size=(K, n))
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    custom = am.losses.Loss("my_mse", am.losses.LOSSES["mse"].fn, None, "same_shape")  # (once per member)
    loss = {"labels": "cross_entropy", "custom-loss": custom}.get(case, "mse")
    metrics = ["accuracy", am.metrics.top_k_accuracy(2)] if case == "labels" else ["mae", "r2"]
    lrs = [0.01, 0.03, 0.05]
    tol = 1e-10
    ens = am.MLP([5, 8, out], dropout=0.25, ensemble=K, seed=7, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(K)]
    fresh = [ens.member(i) for i in range(K)]
    common = dict(loss=loss, epochs=3, batch_size=8, metrics=metrics, progress=False)
    hist = ens.fit(x, y, lr=lrs, sample_weight=backend.asarray(w), shuffle="members", seed=4, **common)
    for i in range(K):
        h = starts[i].fit(x, y, optimizer=am.Adam(lr=lrs[i]), sample_weight=backend.asarray(w[i]), shuffle=True,
                          seed=member_seeds(4, K)[i], **common)
        _equal(_np_params(ens.member(i)), _np_params(starts[i]), tol)
        np.testing.assert_allclose([e[i] for e in hist.loss], h.loss, rtol=1e-10)
        for name in h.metrics:
            np.testing.assert_allclose([e[i] for e in hist.metrics[name]], h.metrics[name], rtol=1e-10, atol=1e-12)
    # no seed=: each member shuffles with its own generator, as its plain model does
    ens2 = am.MLP([5, 8, out], dropout=0.25, ensemble=K, seed=7, dtype="float64", **backend.model_kwargs())
    ens2.fit(x, y, lr=lrs, sample_weight=backend.asarray(w), shuffle="members", **common)
    for i in range(K):
        fresh[i].fit(x, y, optimizer=am.Adam(lr=lrs[i]), sample_weight=backend.asarray(w[i]), **common)
        _equal(_np_params(ens2.member(i)), _np_params(fresh[i]), tol)


def test_shuffle_is_checked(backend):
    x, y = _data(backend, n=12)
    ens = am.MLP([5, 4, 3], ensemble=2, seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match="shuffle must be True, False or 'members'"):
        ens.fit(x, y, loss="cross_entropy", shuffle="rows", progress=False)
    with pytest.raises(TypeError, match="shuffle must be True, False or 'members'"):
        ens.fit(x, y, loss="cross_entropy", shuffle=None, progress=False)
    with pytest.raises(ValueError, match=r"shuffle='members' is not supported with data-parallel training \(comm=\)"):
        ens.fit(x, y, loss="cross_entropy", shuffle="members", comm=object(), progress=False)
    with pytest.raises(ValueError, match="shuffle='members' is not supported with the scikit-learn estimators'"):
        ens.partial_fit(x, y, loss="cross_entropy", shuffle="members", _l2_per_batch=True)


def test_shuffle_members_refuses_a_sparse_x():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(0)
    x = sparse.random(12, 5, density=0.5, format="csr", random_state=0)
    ens = am.MLP([5, 4, 3], ensemble=2, seed=0, backend="numpy")
    with pytest.raises(ValueError, match="shuffle='members' is not supported with a sparse x"):
        ens.fit(x, rng.integers(0, 3, size=12), loss="cross_entropy", shuffle="members", progress=False)


# ------------------------------------------------------------------- scikit-learn
@pytest.mark.parametrize("Estimator", ["MLPClassifier", "MLPRegressor"])
def test_an_estimators_member_draws_the_masks_of_its_one_member_estimator(monkeypatch, Estimator):
    """``n_members=3, dropout=0.3`` (rows in order): member i equals a one-member
    estimator whose model starts as member i with member i's generator, that is the
    one-member estimator of seed ``member_seeds(seed, 3)[i]``, masks included."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    import arraymlp.sklearn as sk

    Est = getattr(sk, Estimator)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = (X[:, 0] > 0).astype(int) if Estimator == "MLPClassifier" else X[:, 0] - X[:, 1]
    params = dict(hidden_layer_sizes=(6,), dropout=0.3, shuffle=False, batch_size=16, max_iter=4,
                  learning_rate_init=0.02, random_state=0)

    def fit(est):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return est.fit(X, y)

    ens = fit(Est(n_members=K, **params))
    original = sk._build_model
    for i in range(K):
        def build(config, *, seed, backend, device, i=i):
            return original(config, seed=member_seeds(seed, K)[i], backend=backend, device=device)

        with monkeypatch.context() as m:
            m.setattr(sk, "_build_model", build)
            one = fit(Est(n_members=1, **params))
        for layer in range(len(one.coefs_)):
            np.testing.assert_allclose(ens.coefs_[layer][i], one.coefs_[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [3, 6])
def test_a_resumed_run_keeps_frozen_members_and_each_members_streams(backend, tmp_path, split):
    """Adam, dropout, shuffle="members" and per-member early stopping (members frozen at
    different epochs, so different step counts): resumed from the checkpoint of epoch
    ``split``, the run ends bit for bit where the uninterrupted one ends (each member's
    generator, step count and frozen state travel in the checkpoint)."""
    x, y = _data(backend, n=40, labels=False)
    xv, yv = _data(backend, n=20, labels=False, seed=9)
    build = _net(backend, input_dropout=False, seed=3)

    def fit(model, **kw):
        return model.fit(x, y, loss="mse", optimizer="adam", lr=[0.3, 1e-4, 0.05], epochs=10, batch_size=10,
                         shuffle="members", validation_data=(xv, yv), seed=2, progress=False,
                         early_stopping=am.EarlyStopping("val_loss", patience=1), **kw)

    whole = build(K)
    h_whole = fit(whole)
    assert len(set(h_whole.stopped_epoch.tolist())) > 1
    fit(build(K), callbacks=[am.Checkpoint(tmp_path / "run", every=split, keep=None)])
    resumed = build(K)
    h = fit(resumed, resume_from=tmp_path / "run" / f"epoch-{split:05d}.safetensors")
    _equal(_np_params(resumed), _np_params(whole))
    np.testing.assert_array_equal(h.stopped_epoch, h_whole.stopped_epoch)
    np.testing.assert_array_equal(resumed.ensemble_optimizer_.t, whole.ensemble_optimizer_.t)
    assert resumed.rng.get_state() == whole.rng.get_state()


# ------------------------------------------------------------------- data parallelism
def test_a_data_parallel_rank_draws_its_own_masks_for_each_member(backend):
    """Under comm=, a rank other than the root takes the root's generator state and then a
    key of its own for the shared stream and for every member's (derived from the root's
    key and the rank, at the root's counters): its masks are its own, member by member,
    and the same again from the same root state (a resumed run draws what it drew)."""
    pytest.importorskip("mpi4py")
    from arraymlp.distributed import DataParallel

    x, _ = _data(backend, n=8)
    root = am.MLP([5, 4, 3], dropout=0.5, ensemble=K, seed=0, dtype="float64", **backend.model_kwargs())
    root.rng.members[1].bits((2,))  # the root's counters: not all zero
    state = root.rng.get_state()

    class Rank1:  # rank 1 of 2, in one process: allgather answers with the root's payload and this rank's
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

        def allgather(self, payload):
            return [(payload[0], state), payload]

    def rank1_generators():
        model = am.MLP([5, 4, 3], dropout=0.5, ensemble=K, seed=9, dtype="float64", **backend.model_kwargs())
        dp = DataParallel(Rank1(), abort_on_error=False)
        dp.broadcast_parameters = lambda model: None  # (no parameters travel in one process)
        dp.begin(model, x, [], call=None, what="fit")
        return model.rng

    gens = rank1_generators()
    keys = [gens.key] + [m.key for m in gens.members]
    root_keys = [root.rng.key] + [m.key for m in root.rng.members]
    assert len(set(keys)) == K + 1 and not set(keys) & set(root_keys)
    assert [m.counter for m in gens.members] == [m.counter for m in root.rng.members] == [0, 1, 0]
    again = rank1_generators()
    assert again.get_state() == gens.get_state()
