"""Ensembles: K members with stacked parameters, trained at once (arraymlp.ensemble).

The oracle of every value test is a plain model: member i of an ensemble must do what a
plain model with member i's parameters and settings does alone."""

import numpy as np
import pytest

import arraymlp as am
from arraymlp.ensemble import member_seeds

K = 4


def _data(backend, n=40, n_in=5, n_out=3, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in))
    y = rng.integers(0, n_out, size=n) if labels else rng.normal(size=(n, n_out))
    return backend.asarray(x), backend.asarray(y), x, y


def _np_params(model):
    return [{k: am.to_numpy(v) for k, v in p.items()} for p in model.params]


def _close(a, b, tol=1e-10):
    for pa, pb in zip(a, b):
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=tol, atol=tol)


# ------------------------------------------------------------------------ construction
def test_member_i_is_the_plain_model_of_its_seed(backend):
    ens = am.MLP([5, 7, 3], ensemble=K, seed=11, dtype="float64", layer_norm=True, **backend.model_kwargs())
    assert ens.member_seeds == member_seeds(11, K)
    assert ens.params[0]["W"].shape == (K, 5, 7) and ens.params[0]["b"].shape == (K, 1, 7)
    assert ens.n_params == K * am.MLP([5, 7, 3], layer_norm=True).n_params
    for i in range(K):
        plain = am.MLP([5, 7, 3], seed=member_seeds(11, K)[i], dtype="float64", layer_norm=True,
                       **backend.model_kwargs())
        member = ens.member(i)
        assert member.ensemble is None and member.seed == plain.seed
        for pm, pp in zip(_np_params(member), _np_params(plain)):
            for k in pp:
                assert pm[k].shape == pp[k].shape
                np.testing.assert_array_equal(pm[k], pp[k])


def test_member_seeds_do_not_depend_on_k_and_differ_between_seeds():
    assert member_seeds(3, 8)[:5] == member_seeds(3, 5)
    assert not set(member_seeds(3, 8)) & set(member_seeds(4, 8))


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_forward_is_each_members_forward(backend, activation):
    ens = am.MLP([5, 6, 4, 3], activation=activation, output_activation="softmax", ensemble=K, seed=2,
                 dtype="float64", layer_norm=True, **backend.model_kwargs())
    x, _, _, _ = _data(backend)
    out = backend.to_numpy(ens(x))
    assert out.shape == (K, 40, 3)
    for i in range(K):
        np.testing.assert_allclose(out[i], backend.to_numpy(ens.member(i)(x)), rtol=1e-12, atol=1e-14)


def test_stack_round_trips_members(backend):
    models = [am.MLP([5, 4, 2], seed=s, dtype="float64", **backend.model_kwargs()) for s in (5, 6, 7)]
    ens = am.MLP.stack(models)
    assert ens.ensemble == 3 and ens.member_seeds == [5, 6, 7]
    for i, m in enumerate(models):
        _close(_np_params(ens.member(i)), _np_params(m), tol=0)
    # stacking copies: training the ensemble leaves the plain models alone
    before = _np_params(models[0])
    x, _, _, _ = _data(backend, n_in=5)
    y = backend.asarray(np.random.default_rng(1).normal(size=(40, 2)))
    ens.fit(x, y, epochs=1, progress=False)
    _close(_np_params(models[0]), before, tol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"ensemble must be a member count K >= 1.*got 0"):
        am.MLP([2, 3, 1], ensemble=0)
    with pytest.raises(ValueError, match=r"ensemble must be a member count K >= 1.*got True"):
        am.MLP([2, 3, 1], ensemble=True)
    a = am.MLP([2, 3, 1], backend="numpy", seed=0)
    with pytest.raises(ValueError, match=r"models\[1\] has layers .* but models\[0\] has"):
        am.MLP.stack([a, am.MLP([2, 4, 1], backend="numpy", seed=0)])
    with pytest.raises(ValueError, match=r"models\[1\] is on backend 'array_api_strict'.*'numpy'"):
        am.MLP.stack([a, am.MLP([2, 3, 1], backend="array_api_strict", seed=0)])
    with pytest.raises(ValueError, match=r"models\[1\] has dtype float64 but models\[0\] has float32"):
        am.MLP.stack([a, am.MLP([2, 3, 1], backend="numpy", seed=0, dtype="float64")])
    with pytest.raises(ValueError, match="empty"):
        am.MLP.stack([])
    ens = am.MLP([2, 3, 1], ensemble=3, backend="numpy", seed=0)
    with pytest.raises(IndexError, match=r"in \[-3, 3\).*got 3"):
        ens.member(3)
    with pytest.raises(ValueError, match="needs an ensemble"):
        a.member(0)
    x, y = np.zeros((6, 2), dtype=np.float32), np.zeros((6, 1), dtype=np.float32)
    with pytest.raises(ValueError, match=r"lr has 2 values but the ensemble has 3 members"):
        ens.fit(x, y, lr=[0.1, 0.2], progress=False)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(K, n\) = \(3, 6\).*got shape \(2, 6\)"):
        ens.fit(x, y, sample_weight=np.ones((2, 6)), progress=False)
    with pytest.raises(ValueError, match=r"all zero for members \[1\]"):
        ens.fit(x, y, sample_weight=np.array([[1.0] * 6, [0.0] * 6, [1.0] * 6]), progress=False)
    with pytest.raises(ValueError, match="reduce must be 'mean'"):
        ens.predict(x, reduce="median")


# ------------------------------------------------------------------ the acceptance test
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_member_i_trains_as_the_plain_model_alone(backend, optimizer):
    """Per-member learning rates and sample weights (and momentum or betas, and L2):
    member i of the trained ensemble equals a plain model trained alone from member i's
    initial parameters with member i's settings, float64, to 1e-10."""
    x, y, _, _ = _data(backend, n=30)
    rng = np.random.default_rng(3)
    w = rng.uniform(0.2, 2.0, size=(K, 30))
    lrs = [0.01, 0.03, 0.05, 0.1] if optimizer == "sgd" else [1e-3, 3e-3, 1e-2, 2e-2]
    l2s = [0.0, 1e-3, 1e-2, 0.0]
    extra = {"momentum": [0.0, 0.5, 0.9, 0.0]} if optimizer == "sgd" else {"betas": ([0.9, 0.8, 0.9, 0.5], 0.99)}
    ens = am.MLP([5, 8, 3], ensemble=K, seed=7, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(K)]
    hist = ens.fit(x, y, loss="cross_entropy", optimizer=optimizer, lr=lrs, l2=l2s, epochs=3, batch_size=8,
                   sample_weight=backend.asarray(w), seed=1, progress=False, **extra)
    assert hist.loss[0].shape == (K,)
    for i in range(K):
        plain = starts[i]
        if optimizer == "sgd":
            opt = am.SGD(lr=lrs[i], momentum=extra["momentum"][i])
        else:
            opt = am.Adam(lr=lrs[i], betas=(extra["betas"][0][i], 0.99))
        h = plain.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=8, l2=l2s[i],
                      sample_weight=backend.asarray(w[i]), seed=1, progress=False)
        _close(_np_params(ens.member(i)), _np_params(plain))
        np.testing.assert_allclose([e[i] for e in hist.loss], h.loss, rtol=1e-10)


@pytest.mark.parametrize("loss,out_act", [("mse", None), ("mae", None), ("huber", None), ("poisson_nll", None),
                                          ("binary_cross_entropy", "sigmoid"), ("cross_entropy", "softmax"),
                                          ("cross_entropy", None)])
def test_every_table_loss_matches_the_plain_loss(backend, loss, out_act):
    """Each member's loss and gradient are the plain model's for that member."""
    labels = loss == "cross_entropy"
    x, y, _, y_np = _data(backend, n=12, labels=labels)
    if loss == "binary_cross_entropy":
        y = backend.asarray((y_np > 0).astype(np.float64))
    if loss == "poisson_nll":
        y = backend.asarray(np.abs(y_np))
    ens = am.MLP([5, 6, 3], output_activation=out_act, ensemble=3, seed=4, dtype="float64",
                 **backend.model_kwargs())
    w = np.random.default_rng(0).uniform(0.5, 1.5, size=(3, 12))
    x0 = np.asarray(backend.to_numpy(x))
    before = [ens.member(i) for i in range(3)]
    ens.fit(x, y, loss=loss, optimizer="sgd", lr=0.1, epochs=1, batch_size=12, shuffle=False,
            sample_weight=backend.asarray(w), progress=False)
    for i in range(3):
        m = before[i]
        m.fit(backend.asarray(x0), y, loss=loss, optimizer="sgd", lr=0.1, epochs=1, batch_size=12, shuffle=False,
              sample_weight=backend.asarray(w[i]), progress=False)
        _close(_np_params(ens.member(i)), _np_params(m))


def test_early_stopping_freezes_each_member_on_its_own(backend):
    """Members with very different rates stop at different epochs; each ends where the
    plain model with the same settings and early stopping ends."""
    x, y, _, _ = _data(backend, n=40, labels=False)
    xv, yv, _, _ = _data(backend, n=20, labels=False, seed=9)
    lrs = [0.5, 1e-4, 0.05, 0.2]
    ens = am.MLP([5, 8, 3], ensemble=K, seed=3, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(K)]
    hist = ens.fit(x, y, optimizer="sgd", lr=lrs, epochs=12, batch_size=10, validation_data=(xv, yv),
                   early_stopping=am.EarlyStopping("val_loss", patience=1), seed=0, progress=False)
    for i in range(K):
        h = starts[i].fit(x, y, optimizer="sgd", lr=lrs[i], epochs=12, batch_size=10, validation_data=(xv, yv),
                          early_stopping=am.EarlyStopping("val_loss", patience=1), seed=0, progress=False)
        _close(_np_params(ens.member(i)), _np_params(starts[i]))
        ran = len(h.val_loss)
        np.testing.assert_allclose([v[i] for v in hist.val_loss[:ran]], h.val_loss, rtol=1e-10)
        np.testing.assert_allclose([v[i] for v in hist.val_metric[:ran]], h.val_metric, rtol=1e-9, atol=1e-12)
        assert hist.stopped_epoch[i] == (ran - 1 if h.stopped_early else -1)


class _Recorder(am.Callback):
    """Records what each hook is given."""

    def __init__(self, batches=False, stop_after_epoch=None):
        self.calls, self.epochs, self.batches = [], [], []
        self.stop_after_epoch = stop_after_epoch
        if batches:
            self.on_batch_end = self._on_batch_end

    def on_train_begin(self, model, history):
        self.calls.append("begin")

    def on_epoch_begin(self, model, epoch):
        self.calls.append(("epoch", epoch))

    def _on_batch_end(self, model, logs):
        self.batches.append((logs["epoch"], logs["step"], np.array(logs["loss"], copy=True)))

    def on_epoch_end(self, model, logs):
        self.epochs.append({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in logs.items()})
        return logs["epoch"] == self.stop_after_epoch

    def on_train_end(self, model, history):
        self.calls.append("end")


def test_callbacks_see_each_members_values(backend):
    """on_epoch_end gets the members' losses (K,) and on_batch_end each step's; the
    step losses of member i are those a plain model trained alone logs."""
    x, y, _, _ = _data(backend, n=36)
    xv, yv, _, _ = _data(backend, n=12, seed=4)
    lrs = [0.05, 0.1, 0.2]
    ens = am.MLP([5, 6, 3], ensemble=3, seed=2, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(3)]
    rec = _Recorder(batches=True)
    opts = dict(loss="cross_entropy", optimizer="sgd", epochs=3, batch_size=10, seed=7, progress=False,
                validation_data=(xv, yv))
    hist = ens.fit(x, y, lr=lrs, callbacks=[rec], **opts)
    assert rec.calls == ["begin", ("epoch", 0), ("epoch", 1), ("epoch", 2), "end"]
    assert [e["epoch"] for e in rec.epochs] == [0, 1, 2] and [e["step"] for e in rec.epochs] == [4, 8, 12]
    for e, logs in enumerate(rec.epochs):
        np.testing.assert_array_equal(logs["loss"], hist.loss[e])
        np.testing.assert_array_equal(logs["val_loss"], hist.val_loss[e])
        np.testing.assert_array_equal(logs["active"], [True] * 3)
        assert logs["lr"] == lrs
    assert [(e, s) for e, s, _ in rec.batches] == [(e, 4 * e + j + 1) for e in range(3) for j in range(4)]
    sizes = np.array([10, 10, 10, 6])
    for e in range(3):  # the epoch's loss is the steps' losses weighted by the batch sizes
        steps = np.stack([v for ep, _, v in rec.batches if ep == e])
        np.testing.assert_allclose(sizes @ steps / 36, hist.loss[e], rtol=1e-12)
    for i in range(3):
        plain = _Recorder(batches=True)
        starts[i].fit(x, y, lr=lrs[i], callbacks=[plain], **opts)
        np.testing.assert_allclose([v[i] for _, _, v in rec.batches], [v for _, _, v in plain.batches],
                                   rtol=1e-10)
        _close(_np_params(ens.member(i)), _np_params(starts[i]))


def test_a_callback_stops_every_member_and_early_stopping_may_come_among_callbacks(backend):
    x, y, _, _ = _data(backend, n=30, labels=False)
    xv, yv, _, _ = _data(backend, n=12, labels=False, seed=9)
    ens = am.MLP([5, 6, 3], ensemble=2, seed=1, dtype="float64", **backend.model_kwargs())
    rec = _Recorder(stop_after_epoch=1)
    hist = ens.fit(x, y, optimizer="sgd", lr=0.05, epochs=5, batch_size=10, callbacks=[rec], progress=False)
    assert len(hist.loss) == 2 and hist.stopped_early and rec.calls[-1] == "end"
    assert ens.steps_ == 6
    # an EarlyStopping among the callbacks is the members' early stopping
    a = am.MLP([5, 6, 3], ensemble=4, seed=3, dtype="float64", **backend.model_kwargs())
    b = a.copy()
    opts = dict(optimizer="sgd", lr=[0.5, 1e-4, 0.05, 0.2], epochs=10, batch_size=10, validation_data=(xv, yv),
                seed=0, progress=False)
    ha = a.fit(x, y, early_stopping=am.EarlyStopping("val_loss", patience=1), **opts)
    hb = b.fit(x, y, callbacks=[am.EarlyStopping("val_loss", patience=1)], **opts)
    np.testing.assert_array_equal(ha.stopped_epoch, hb.stopped_epoch)
    _close(_np_params(a), _np_params(b), tol=0.0)
    with pytest.raises(ValueError, match="an ensemble takes one EarlyStopping"):
        b.fit(x, y, early_stopping=2, callbacks=[am.EarlyStopping("val_loss", patience=1)], **opts)
    with pytest.raises(ValueError, match=r"EarlyStopping\(monitor='val_accuracy'\): an ensemble logs 'loss', "
                                         r"'val_loss' and 'val_metric'"):
        b.fit(x, y, early_stopping=am.EarlyStopping("val_accuracy"), **opts)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_checkpointed_ensemble_resumes_exactly(backend, tmp_path, optimizer):
    """Stopped after 2 of 4 epochs and resumed from its checkpoint, an ensemble (shuffled
    batches, dropout, per-member settings) ends exactly where the uninterrupted run ends."""
    x, y, _, _ = _data(backend, n=30)
    xv, yv, _, _ = _data(backend, n=10, seed=4)
    extra = dict(betas=([0.9, 0.8, 0.95], 0.999)) if optimizer == "adam" else dict(momentum=[0.0, 0.5, 0.9])
    opts = dict(loss="cross_entropy", optimizer=optimizer, lr=[0.01, 0.02, 0.05], l2=[0.0, 1e-3, 1e-2],
                batch_size=8, seed=5, progress=False, validation_data=(xv, yv), **extra)

    def build():
        return am.MLP([5, 6, 3], dropout=0.2, ensemble=3, seed=1, dtype="float64", **backend.model_kwargs())

    whole = build()
    h_whole = whole.fit(x, y, epochs=4, **opts)
    first = build()
    first.fit(x, y, epochs=2, callbacks=[am.Checkpoint(tmp_path / "run", every=1)], **opts)
    resumed = build()
    rec = _Recorder()
    # the checkpoint's per-member settings replace the ones given again
    h = resumed.fit(x, y, epochs=4, resume_from=tmp_path / "run", callbacks=[rec],
                    **{**opts, "lr": 0.5, "l2": opts["l2"]})
    assert [e["epoch"] for e in rec.epochs] == [2, 3] and resumed.steps_ == whole.steps_ == 16
    _close(_np_params(resumed), _np_params(whole), tol=0.0)
    for a, b in zip(h.loss + h.val_loss, h_whole.loss + h_whole.val_loss):
        np.testing.assert_array_equal(a, b)
    assert h.lr == h_whole.lr == [[0.01, 0.02, 0.05]] * 4 and len(h.loss) == 4
    # the members' metric series (training and validation accuracy, (K,) per epoch) survive the checkpoint
    assert sorted(h.metrics) == sorted(h_whole.metrics) == ["accuracy", "val_accuracy"]
    for name in h.metrics:
        assert len(h.metrics[name]) == 4
        np.testing.assert_array_equal(np.stack(h.metrics[name]), np.stack(h_whole.metrics[name]))
    with pytest.raises(ValueError, match="holds an ensemble of 3 members, but the model being restored is an "
                                         "ensemble of 2"):
        am.MLP([5, 6, 3], dropout=0.2, ensemble=2, seed=1, dtype="float64", **backend.model_kwargs()).fit(
            x, y, epochs=4, resume_from=tmp_path / "run", **{**opts, "lr": 0.1, "l2": 0.0, **(
                dict(betas=(0.9, 0.999)) if optimizer == "adam" else dict(momentum=0.5))})
    with pytest.raises(ValueError, match="holds an ensemble of 3 members, but the model being restored is a plain"):
        am.MLP([5, 6, 3], dropout=0.2, seed=1, dtype="float64", **backend.model_kwargs()).fit(
            x, y, loss="cross_entropy", optimizer=optimizer, epochs=4, resume_from=tmp_path / "run", progress=False)


@pytest.mark.parametrize("split", [2, 4])
def test_a_checkpoint_keeps_per_member_early_stopping_and_plateau_schedules(backend, tmp_path, split):
    """Members stopping at different epochs, each with its own ReduceOnPlateau: resumed
    from the checkpoint of epoch ``split``, the run ends exactly as the uninterrupted one."""
    x, y, _, _ = _data(backend, n=40, labels=False)
    xv, yv, _, _ = _data(backend, n=20, labels=False, seed=9)

    def build():
        return am.MLP([5, 8, 3], ensemble=4, seed=3, dtype="float64", **backend.model_kwargs())

    def opts():
        return dict(optimizer="sgd", epochs=10, batch_size=10, validation_data=(xv, yv), seed=0, progress=False,
                    early_stopping=am.EarlyStopping("val_loss", patience=1),
                    schedule=[am.schedules.ReduceOnPlateau(lr, factor=0.5, patience=0)
                              for lr in (0.5, 1e-4, 0.05, 0.2)])

    whole = build()
    h_whole = whole.fit(x, y, **opts())
    assert len(set(h_whole.stopped_epoch.tolist())) > 1  # the members stop at different epochs
    first = build()
    first.fit(x, y, callbacks=[am.Checkpoint(tmp_path / "run", every=split, keep=None)], **opts())
    resumed = build()
    h = resumed.fit(x, y, resume_from=tmp_path / "run" / f"epoch-{split:05d}.safetensors", **opts())
    _close(_np_params(resumed), _np_params(whole), tol=0.0)
    np.testing.assert_array_equal(h.stopped_epoch, h_whole.stopped_epoch)
    np.testing.assert_array_equal(h.best_epochs, h_whole.best_epochs)
    assert h.lr == h_whole.lr
    for a, b in zip(h.val_loss, h_whole.val_loss, strict=True):
        np.testing.assert_array_equal(a, b)


class _Record(am.Callback):
    """Each epoch's parameters (NumPy copies) and monitored values, as logged."""

    def __init__(self, monitor="val_loss"):
        self.params, self.values, self.monitor = [], [], monitor

    def on_epoch_end(self, model, logs):
        self.params.append([{k: np.array(v, copy=True) for k, v in p.items()} for p in _np_params(model)])
        self.values.append(np.array(logs[self.monitor], dtype=float))


def _monitored_run(backend, callbacks, epochs=8, resume_from=None):
    x, y, _, _ = _data(backend, n=40, labels=False)
    xv, yv, _, _ = _data(backend, n=20, labels=False, seed=9)
    model = am.MLP([5, 8, 3], ensemble=4, seed=3, dtype="float64", **backend.model_kwargs())
    # the large rates overshoot: the members reach their best validation loss at different epochs
    model.fit(x, y, optimizer="sgd", lr=[0.4, 0.01, 0.2, 0.1], momentum=0.9, epochs=epochs, batch_size=10,
              validation_data=(xv, yv), seed=0, progress=False, callbacks=callbacks, resume_from=resume_from)
    return model


@pytest.mark.parametrize("monitor", ["val_loss", "val_metric"])
def test_a_checkpoint_monitor_keeps_each_members_best(backend, tmp_path, monitor):
    """Checkpoint(monitor=) on an ensemble: best.safetensors is the ensemble whose member
    i holds member i's parameters at the epoch of its best value (the lowest val_loss,
    the highest val_metric: R^2 here), as a run that records every epoch's parameters
    finds them."""
    record = _Record(monitor)
    _monitored_run(backend, [record])
    values = np.stack(record.values)  # (epochs, K)
    best = values.argmin(axis=0) if monitor == "val_loss" else values.argmax(axis=0)
    assert len(set(best.tolist())) > 1, values  # the members are best at different epochs

    ckpt = am.Checkpoint(tmp_path / "run", monitor=monitor, keep=2)
    _monitored_run(backend, [ckpt])
    np.testing.assert_array_equal(ckpt.best_epoch, best + 1)  # completed epochs
    np.testing.assert_array_equal(ckpt.best, values[best, np.arange(4)])
    assert ckpt.best_path == tmp_path / "run" / "best.safetensors"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.safetensors", "epoch-00007.safetensors", "epoch-00008.safetensors"]
    restored = am.load(ckpt.best_path)
    assert restored.ensemble == 4
    got = _np_params(restored)
    for i, e in enumerate(best):
        for layer, kept in zip(got, record.params[e]):
            for key in kept:
                np.testing.assert_array_equal(layer[key][i], kept[key][i])


def test_a_checkpoint_monitoring_the_members_mean_keeps_that_epoch(backend, tmp_path):
    record = _Record()
    _monitored_run(backend, [record])
    mean = np.stack(record.values).mean(axis=1)
    e = int(mean.argmin())
    ckpt = am.Checkpoint(tmp_path / "run", monitor="val_loss", keep=1, reduce="mean")
    _monitored_run(backend, [ckpt])
    assert ckpt.best_epoch == e + 1 and ckpt.best == pytest.approx(mean[e], rel=1e-15)
    assert ckpt.best_path == tmp_path / "run" / f"epoch-{e + 1:05d}.safetensors" and ckpt.best_path.exists()
    _close(_np_params(am.load(ckpt.best_path)), record.params[e], tol=0.0)


@pytest.mark.parametrize("split", [2, 5])
def test_the_members_best_survives_a_resume(backend, tmp_path, split):
    """Resumed from the checkpoint of epoch ``split``, per-member tracking goes on as in
    the uninterrupted run: the same best epochs and the same best.safetensors."""
    whole = am.Checkpoint(tmp_path / "whole", monitor="val_loss")
    _monitored_run(backend, [whole])
    first = am.Checkpoint(tmp_path / "part", monitor="val_loss", keep=None)
    _monitored_run(backend, [first], epochs=split)
    again = am.Checkpoint(tmp_path / "part", monitor="val_loss", keep=None)
    _monitored_run(backend, [again], resume_from=tmp_path / "part" / f"epoch-{split:05d}.safetensors")
    np.testing.assert_array_equal(again.best_epoch, whole.best_epoch)
    np.testing.assert_array_equal(again.best, whole.best)
    _close(_np_params(am.load(again.best_path)), _np_params(am.load(whole.best_path)), tol=0.0)


def test_checkpoint_reduce_is_checked():
    with pytest.raises(ValueError, match="reduce must be None"):
        am.Checkpoint("run", monitor="val_loss", reduce="max")


# ------------------------------------------------------------------------- prediction
def test_predictions_average_the_members(backend):
    x, y, _, _ = _data(backend, n=20)
    ens = am.MLP([5, 6, 3], ensemble=3, seed=1, dtype="float64", **backend.model_kwargs())
    ens.fit(x, y, loss="cross_entropy", epochs=2, progress=False)
    per = np.stack([backend.to_numpy(ens.member(i).predict_proba(x)) for i in range(3)])
    per_member = backend.to_numpy(ens.predict_proba(x, reduce=None))
    np.testing.assert_allclose(per_member, per, rtol=1e-12)
    mean = backend.to_numpy(ens.predict_proba(x))
    np.testing.assert_allclose(mean, per.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(ens.predict(x)), per.mean(axis=0).argmax(axis=1))
    np.testing.assert_array_equal(backend.to_numpy(ens.predict(x, reduce=None)), per.argmax(axis=2))
    reg = am.MLP([5, 4, 2], ensemble=3, seed=1, dtype="float64", **backend.model_kwargs())
    outs = np.stack([backend.to_numpy(reg.member(i)(x)) for i in range(3)])
    np.testing.assert_allclose(backend.to_numpy(reg.predict(x)), outs.mean(axis=0), rtol=1e-12)


def test_make_step_is_the_fit_step(backend):
    """The benchmark's step (arraymlp.ensemble.make_step) is one step of fit."""
    from arraymlp.ensemble import make_step

    x, y, _, _ = _data(backend, n=16)
    a = am.MLP([5, 6, 3], ensemble=3, seed=2, dtype="float64", **backend.model_kwargs())
    b = a.copy()
    step = make_step(a, x, y, loss="cross_entropy", optimizer="adam", lr=0.01)
    losses = step()
    h = b.fit(x, y, loss="cross_entropy", optimizer="adam", lr=0.01, epochs=1, batch_size=16, shuffle=False,
              progress=False)
    np.testing.assert_allclose(losses, h.loss[0], rtol=1e-12)
    _close(_np_params(a), _np_params(b), tol=1e-12)


# ------------------------------------------------------------ copy, to, save, gradcheck
def test_copy_and_to_keep_the_members(backend):
    ens = am.MLP([5, 4, 3], ensemble=3, seed=0, dtype="float64", **backend.model_kwargs())
    x, _, _, _ = _data(backend)
    ref = backend.to_numpy(ens(x))
    c = ens.copy()
    assert c.ensemble == 3 and c.member_seeds == ens.member_seeds
    np.testing.assert_array_equal(backend.to_numpy(c(x)), ref)
    moved = ens.copy(backend="numpy").to("array_api_strict")
    out = am.to_numpy(moved(moved.xp.asarray(backend.to_numpy(x))))
    np.testing.assert_allclose(out, ref, rtol=1e-14)


def test_save_and_load_round_trip(backend, tmp_path):
    ens = am.MLP([5, 4, 3], ensemble=3, seed=0, dtype="float64", layer_norm=True, **backend.model_kwargs())
    x, _, x_np, _ = _data(backend)
    path = tmp_path / "ens.safetensors"
    am.save(ens, path)
    back = am.load(path)
    assert back.ensemble == 3 and back.member_seeds == ens.member_seeds
    np.testing.assert_array_equal(am.to_numpy(back(x_np)), backend.to_numpy(ens(x)))


def test_loss_and_grads_are_each_members_own(backend):
    """The ensemble's loss is the sum of its members', its gradient each member's, with
    per-member weights and L2; gradcheck (finite differences) agrees."""
    x, y, _, _ = _data(backend, n=10)
    ens = am.MLP([5, 4, 3], ensemble=3, seed=0, dtype="float64", **backend.model_kwargs())
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=(3, 10))
    l2 = [0.0, 0.1, 0.01]
    total, grads = ens.loss_and_grads(x, y, loss="cross_entropy", sample_weight=backend.asarray(w), l2=l2)
    values = []
    for i in range(3):
        v, g = ens.member(i).loss_and_grads(x, y, loss="cross_entropy", sample_weight=backend.asarray(w[i]),
                                            l2=l2[i])
        values.append(float(v))
        for gl, ml in zip(grads, g):
            for key in ml:
                np.testing.assert_allclose(backend.to_numpy(gl[key])[i].reshape(backend.to_numpy(ml[key]).shape),
                                           backend.to_numpy(ml[key]), rtol=1e-12, atol=1e-14)
    assert float(total) == pytest.approx(sum(values), rel=1e-12)
    report = am.gradcheck(ens, x, y, loss="cross_entropy", l2=0.01)
    assert report.passed and {tuple(r.shape) for r in report.rows} >= {(3, 5, 4), (3, 1, 4)}


def test_cross_val_scores_are_each_folds_held_out_score(backend):
    """Member k is scored on fold k's held-out rows, which carried weight 0 for it."""
    from arraymlp.ensemble import cross_val_scores

    rng = np.random.default_rng(1)
    x_np = rng.normal(size=(30, 3))
    y_np = (x_np[:, 0] + 0.3 * rng.normal(size=30) > 0).astype(np.int64)
    folds = [(np.setdiff1d(np.arange(30), te), te) for te in (np.arange(0, 10), np.arange(10, 20), np.arange(20, 30))]
    ens = am.MLP([3, 6, 2], ensemble=3, seed=5, dtype="float64", **backend.model_kwargs())
    start = [ens.member(i) for i in range(3)]
    scores = cross_val_scores(ens, backend.asarray(x_np), backend.asarray(y_np), cv=folds, loss="cross_entropy",
                              optimizer="sgd", lr=0.1, epochs=5, batch_size=30, shuffle=False, progress=False)
    for k, (tr, te) in enumerate(folds):
        # full batches: the 0/1-weighted member is the plain model trained on its training rows
        m = start[k]
        m.fit(backend.asarray(x_np[tr]), backend.asarray(y_np[tr]), loss="cross_entropy", optimizer="sgd", lr=0.1,
              epochs=5, batch_size=30, shuffle=False, progress=False)
        _close(_np_params(ens.member(k)), _np_params(m))
        acc = np.mean(backend.to_numpy(m.predict(backend.asarray(x_np[te]))) == y_np[te])
        assert scores[k] == pytest.approx(acc)
    with pytest.raises(ValueError, match="cv gives 2 folds but the ensemble has 3 members"):
        cross_val_scores(ens, backend.asarray(x_np), backend.asarray(y_np), cv=2, loss="cross_entropy")


def test_a_diverging_member_is_named():
    x = np.random.default_rng(0).normal(size=(32, 5)) * 100.0
    y = np.random.default_rng(1).normal(size=(32, 3)) * 100.0
    ens = am.MLP([5, 8, 3], ensemble=3, seed=0, dtype="float64", backend="numpy")
    with pytest.raises(am.DivergenceError, match=r"members \[1\] became non-finite"):
        ens.fit(x, y, optimizer="sgd", lr=[1e-6, 10.0, 1e-6], epochs=20, batch_size=8, progress=False)


def test_divergence_found_at_the_epoch_read_leaves_the_last_finite_step(backend):
    """The members' losses are read once per epoch; a non-finite one is found then, the
    epoch's steps are replayed up to the step before it, and the error names the member,
    epoch and step. Oracle: plain models trained alone, member by member."""
    x_np = np.random.default_rng(0).normal(size=(32, 5)) * 10.0
    y_np = np.random.default_rng(1).normal(size=(32, 3)) * 10.0
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    ens = am.MLP([5, 8, 3], ensemble=3, seed=0, dtype="float64", **backend.model_kwargs())
    start = [ens.member(i) for i in range(3)]
    lrs = [1e-4, 0.5, 1e-4]
    opts = dict(optimizer="sgd", batch_size=8, shuffle=False, progress=False)
    with pytest.raises(am.DivergenceError, match=r"members \[1\] became non-finite") as info:
        ens.fit(x, y, lr=lrs, epochs=20, **opts)
    err = info.value
    # the plain model with member 1's rate diverges at the same step and keeps the same parameters
    with pytest.raises(am.DivergenceError) as plain_info:
        start[1].fit(x, y, lr=lrs[1], epochs=20, **opts)
    assert (err.epoch, err.step) == (plain_info.value.epoch, plain_info.value.step)
    assert f"epoch {err.epoch + 1}, step {err.step + 1}" in str(err)
    assert err.step % 4 != 0  # inside an epoch: the replay ran steps
    assert err.params_finite
    _close(_np_params(ens.member(1)), _np_params(start[1]))
    # the other members stopped after the last finite step: err.step steps of plain SGD
    done, left = divmod(err.step, 4)
    for i in (0, 2):
        m = start[i]
        m.fit(x, y, lr=lrs[i], epochs=done, **opts)
        m.partial_fit(x[:8 * left, ...], y[:8 * left, ...], lr=lrs[i], batch_size=8, shuffle=False)
        _close(_np_params(ens.member(i)), _np_params(m))


def test_training_functions_called_directly_hand_an_ensemble_to_its_loop(backend):
    """arraymlp.training.fit(ensemble, ...) (not model.fit) trains the members as
    model.fit does, never as one plain model; what an ensemble does not support raises."""
    from arraymlp import training

    x, y, _, _ = _data(backend)
    opts = dict(loss="cross_entropy", optimizer="adam", lr=[0.01, 0.02, 0.03], epochs=3, batch_size=8, seed=3,
                progress=False)
    direct = am.MLP([5, 6, 3], ensemble=3, seed=1, dtype="float64", **backend.model_kwargs())
    method = am.MLP([5, 6, 3], ensemble=3, seed=1, dtype="float64", **backend.model_kwargs())
    plain = method.member(2)
    h_direct = training.fit(direct, x, y, **opts)
    h_method = method.fit(x, y, **opts)
    assert isinstance(h_direct, am.ensemble.EnsembleHistory)
    np.testing.assert_array_equal(np.stack(h_direct.loss), np.stack(h_method.loss))
    _close(_np_params(direct), _np_params(method), tol=0.0)
    # and member 2 is the plain model trained alone with its rate
    plain.fit(x, y, **{**opts, "lr": 0.03})
    _close(_np_params(direct.member(2)), _np_params(plain))
    training.partial_fit(direct, x, y, batch_size=8)
    method.partial_fit(x, y, batch_size=8)
    _close(_np_params(direct), _np_params(method), tol=0.0)
    for fn in ("predict", "predict_proba"):
        np.testing.assert_array_equal(backend.to_numpy(getattr(training, fn)(direct, x)),
                                      backend.to_numpy(getattr(method, fn)(x)))
    ev_direct, ev_method = training.evaluate(direct, x, y), method.evaluate(x, y)
    assert ev_direct.keys() == ev_method.keys() == {"loss", "accuracy", "ensemble_loss", "ensemble_accuracy"}
    for key in ev_direct:
        np.testing.assert_array_equal(ev_direct[key], ev_method[key])
    with pytest.raises(ValueError, match="keeps float32 master weights"):  # a float64 ensemble, as a plain model
        training.partial_fit(direct, x, y, precision="float16")


def test_float16_adam_needs_an_eps_float16_holds():
    ens = am.MLP([5, 4, 3], ensemble=2, seed=0, dtype="float16", backend="numpy")
    x, y = np.zeros((4, 5), dtype=np.float16), np.zeros((4, 3), dtype=np.float16)
    with pytest.raises(ValueError, match="float16 parameters needs eps"):
        ens.fit(x, y, optimizer="adam", epochs=1, progress=False)


# ------------------------------------------------------------------ kernels, stacked
def test_kernels_broadcast_over_a_member_axis(backend):
    """The backend's set on stacked operands equals NumPy float64 member by member: the
    dense forward (a shared and a stacked input), its backward, the bias gradient, the
    layer-norm backward."""
    from arraymlp import functional as F
    from arraymlp.kernels import kernels_for

    rng = np.random.default_rng(0)
    k, n, i, o = 3, 7, 5, 4
    x2, x3 = rng.normal(size=(n, i)), rng.normal(size=(k, n, i))
    W, b, dy = rng.normal(size=(k, i, o)), rng.normal(size=(k, 1, o)), rng.normal(size=(k, n, o))
    xp = backend.xp
    ks = kernels_for(xp)
    a = backend.asarray
    for x in (x2, x3):
        y = backend.to_numpy(ks.dense_forward(a(x), a(W), a(b), xp))
        dx, dW, db = (backend.to_numpy(t) for t in ks.dense_backward(a(x), a(W), a(dy), True, True, xp))
        for m in range(k):
            xm = x if x.ndim == 2 else x[m]
            np.testing.assert_allclose(y[m], xm @ W[m] + b[m], rtol=1e-12)
            np.testing.assert_allclose(dW[m], xm.T @ dy[m], rtol=1e-12)
            np.testing.assert_allclose(db[m], dy[m].sum(axis=0, keepdims=True), rtol=1e-12)
            np.testing.assert_allclose(dx[m], dy[m] @ W[m].T, rtol=1e-12)
    g = rng.normal(size=(k, 1, o))
    _, cache = F.layer_norm_forward(a(dy), a(g), a(b), xp=xp)
    _, dg, dbeta = F.layer_norm_backward(cache, a(g), a(dy), xp=xp)
    assert tuple(dg.shape) == (k, 1, o) and tuple(dbeta.shape) == (k, 1, o)
    for m in range(k):
        mu = dy[m].mean(axis=1, keepdims=True)
        xhat = (dy[m] - mu) / np.sqrt(dy[m].var(axis=1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(backend.to_numpy(dg)[m, 0], (dy[m] * xhat).sum(axis=0), rtol=1e-10)
        np.testing.assert_allclose(backend.to_numpy(dbeta)[m, 0], dy[m].sum(axis=0), rtol=1e-12)


def test_a_batch_without_weight_leaves_a_member_alone(backend):
    """0/1 weights: a batch in which member 0 has no weight gives it no gradient (plain SGD:
    no step), so after the two batches of one epoch it equals the plain model trained on
    the second half alone."""
    x, y, x_np, y_np = _data(backend, n=20)
    w = np.ones((2, 20))
    w[0, :10] = 0.0
    ens = am.MLP([5, 6, 3], ensemble=2, seed=3, dtype="float64", **backend.model_kwargs())
    plain = ens.member(0)
    hist = ens.fit(x, y, loss="cross_entropy", optimizer="sgd", lr=0.1, epochs=1, batch_size=10, shuffle=False,
                   sample_weight=backend.asarray(w), progress=False)
    plain.fit(backend.asarray(x_np[10:]), backend.asarray(y_np[10:]), loss="cross_entropy", optimizer="sgd", lr=0.1,
              epochs=1, batch_size=10, shuffle=False, progress=False)
    _close(_np_params(ens.member(0)), _np_params(plain))
    assert np.isfinite(hist.loss[0]).all()


def test_per_member_schedules(backend):
    """One schedule per member (a ReduceOnPlateau stepped with its own member's loss):
    member i equals the plain model trained with schedule i."""
    x, y, _, _ = _data(backend, n=24, labels=False)
    ens = am.MLP([5, 6, 3], ensemble=3, seed=2, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(3)]

    def schedules():
        return [am.StepDecay(0.1, step_size=2, gamma=0.5), am.ExponentialDecay(0.05, gamma=0.7),
                am.ReduceOnPlateau(0.2, patience=0, factor=0.5)]

    hist = ens.fit(x, y, optimizer="sgd", schedule=schedules(), epochs=5, batch_size=8, seed=0, progress=False)
    for i, sched in enumerate(schedules()):
        h = starts[i].fit(x, y, optimizer="sgd", schedule=sched, epochs=5, batch_size=8, seed=0, progress=False)
        _close(_np_params(ens.member(i)), _np_params(starts[i]))
        np.testing.assert_allclose([lrs[i] for lrs in hist.lr], h.lr, rtol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        ens.fit(x, y, schedule=am.StepDecay(0.1, step_size=2), lr=0.1, progress=False)
    with pytest.raises(ValueError, match="give 3 of them"):
        ens.fit(x, y, schedule=am.ReduceOnPlateau(0.1), progress=False)


def test_partial_fit_keeps_each_members_optimiser(backend):
    """Two partial_fit calls (Adam, per-member rates) equal the plain models' two calls;
    a copy goes on with a copy of the optimiser state, as the plain models' copies do,
    and leaves the original's state alone."""
    x, y, _, _ = _data(backend, n=16)
    ens = am.MLP([5, 6, 3], ensemble=2, seed=1, dtype="float64", **backend.model_kwargs())
    starts = [ens.member(i) for i in range(2)]
    lrs = [0.01, 0.05]
    for _ in range(2):
        ens.partial_fit(x, y, loss="cross_entropy", lr=lrs, batch_size=8, shuffle=False)
    for i in range(2):
        for _ in range(2):
            starts[i].partial_fit(x, y, loss="cross_entropy", lr=lrs[i], batch_size=8, shuffle=False)
        _close(_np_params(ens.member(i)), _np_params(starts[i]))
    assert ens.ensemble_optimizer_.t == 4
    # a copy carries a copy of the members' optimiser on, as a plain model's copy does
    c = ens.copy()
    c.partial_fit(x, y, batch_size=8, shuffle=False)
    assert ens.ensemble_optimizer_.t == 4 and c.ensemble_optimizer_.t == 6
    for i in range(2):
        plain = starts[i].copy()
        plain.partial_fit(x, y, batch_size=8, shuffle=False)
        _close(_np_params(c.member(i)), _np_params(plain))


def test_partial_fit_naming_the_optimisers_kind_keeps_its_state(backend):
    """optimizer="adam" (any case) on every call keeps the members' Adam, moments and step
    counts, as leaving it out does; naming another kind starts that one afresh."""
    x, y, _, _ = _data(backend, n=16)
    ens = am.MLP([5, 6, 3], ensemble=2, seed=1, dtype="float64", **backend.model_kwargs())
    named, left_out = ens.copy(), ens.copy()
    for name in ("adam", "Adam"):
        named.partial_fit(x, y, loss="cross_entropy", optimizer=name, lr=0.01, batch_size=8, shuffle=False)
    left_out.partial_fit(x, y, loss="cross_entropy", optimizer="adam", lr=0.01, batch_size=8, shuffle=False)
    left_out.partial_fit(x, y, batch_size=8, shuffle=False)
    assert int(np.max(np.asarray(named.ensemble_optimizer_.t))) == 4
    for i in range(2):
        _close(_np_params(named.member(i)), _np_params(left_out.member(i)))
    named.partial_fit(x, y, optimizer="sgd", lr=0.01, batch_size=8, shuffle=False)
    assert isinstance(named.ensemble_optimizer_.opt, am.SGD)


def test_sample_weight_on_another_backend_is_refused():
    ens = am.MLP([2, 3, 1], ensemble=2, seed=0, backend="array_api_strict")
    xs = ens.xp.asarray(np.zeros((4, 2), dtype=np.float32))
    ys = ens.xp.asarray(np.zeros((4, 1), dtype=np.float32))
    with pytest.raises((TypeError, ValueError), match="sample_weight"):
        ens.fit(xs, ys, sample_weight=np.ones((2, 4)), progress=False)


def test_layers_of_unknown_behaviour_are_refused():
    class Double(am.Layer):
        def forward(self, params, x, *, training, rng, xp):
            return 2.0 * x, None

        def backward(self, params, cache, dy, *, xp, need_dx=True):
            return 2.0 * dy, {}

    with pytest.raises(TypeError, match=r"layer 1 .* is a Double: ensembles run the library's Dense"):
        am.Sequential([am.Dense(2, 3), Double(), am.Dense(3, 1)], ensemble=2)
    ens = am.Sequential([am.Dense(2, 3), am.Tanh(), am.Dropout(0.1), am.LayerNorm(3), am.Dense(3, 1)], ensemble=2,
                        backend="numpy", seed=0)
    assert ens(np.zeros((4, 2), dtype=np.float32)).shape == (2, 4, 1)


# ------------------------------------------------------------------------- metrics
METRIC_CASES = {
    "multiclass": dict(loss="cross_entropy", out="softmax", n_out=3, labels=True,
                       metrics=lambda: ["accuracy", am.metrics.top_k_accuracy(2),
                                        lambda yt, yp, *, xp: xp.mean(xp.astype(yt == yp, xp.float64))]),
    "multilabel": dict(loss="binary_cross_entropy", out="sigmoid", n_out=2, labels=False, metrics=lambda: ["accuracy"]),
    "regression": dict(loss="mse", out="identity", n_out=2, labels=False, metrics=lambda: ["mae", "r2"]),
}


def _metric_data(backend, case, n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    if case["labels"]:
        y = rng.integers(0, case["n_out"], size=n)
    elif case["loss"] == "binary_cross_entropy":
        y = (rng.normal(size=(n, case["n_out"])) > 0).astype(np.float64)
    else:
        y = rng.normal(size=(n, case["n_out"]))
    return backend.asarray(x), backend.asarray(y), x, y


@pytest.mark.parametrize("name", list(METRIC_CASES))
def test_metrics_are_each_members_own(backend, name):
    """Training and validation metrics of every member, (K,) per epoch, equal those of
    the plain model trained alone with that member's rate and initial parameters."""
    case = METRIC_CASES[name]
    x, y, _, _ = _metric_data(backend, case)
    xv, yv, _, _ = _metric_data(backend, case, n=20, seed=1)
    ens = am.MLP([5, 6, case["n_out"]], output_activation=case["out"], ensemble=3, seed=2, dtype="float64",
                 **backend.model_kwargs())
    start = [ens.member(i) for i in range(3)]
    lrs = [0.01, 0.05, 0.2]
    opts = dict(loss=case["loss"], optimizer="sgd", epochs=3, batch_size=16, seed=4, progress=False,
                validation_data=(xv, yv))
    h = ens.fit(x, y, lr=lrs, metrics=case["metrics"](), **opts)
    names = [k for k in h.metrics]
    assert names and all(len(h.metrics[k]) == 3 and h.metrics[k][0].shape == (3,) for k in names)
    for i in range(3):
        plain = start[i].fit(x, y, lr=lrs[i], metrics=case["metrics"](), **opts)
        assert sorted(plain.metrics) == sorted(names)
        for k in names:
            np.testing.assert_allclose([v[i] for v in h.metrics[k]], plain.metrics[k], rtol=1e-10, atol=1e-12,
                                       err_msg=f"member {i}, {k}")
        np.testing.assert_allclose([v[i] for v in h.val_metric], plain.val_metric, rtol=1e-10, atol=1e-12)


def test_default_metrics_follow_the_plain_fit(backend):
    x, y, _, _ = _data(backend)
    ens = am.MLP([5, 6, 3], ensemble=2, seed=0, dtype="float64", **backend.model_kwargs())
    h = ens.fit(x, y, loss="cross_entropy", epochs=2, batch_size=8, progress=False, validation_split=0.25)
    assert sorted(h.metrics) == ["accuracy", "val_accuracy"] and h.metric_name == "accuracy"
    np.testing.assert_array_equal(np.stack(h["val_accuracy"]), np.stack(h.val_metric))
    xr, yr, _, _ = _data(backend, labels=False)
    h = ens.fit(xr, yr, loss="mse", epochs=1, batch_size=8, progress=False, validation_split=0.25)
    assert sorted(h.metrics) == ["val_r2"]


@pytest.mark.parametrize("name", list(METRIC_CASES))
def test_evaluate_gives_each_member_and_the_ensembles_prediction(backend, name):
    """``evaluate`` of an ensemble: per-member values equal each member's own
    ``evaluate``; ``ensemble_*`` are the values of the averaged prediction, computed
    here in NumPy from ``predict_proba`` / ``predict`` (and scikit-learn for R^2)."""
    from sklearn.metrics import mean_absolute_error, r2_score

    case = METRIC_CASES[name]
    x, y, _, y_np = _metric_data(backend, case)
    ens = am.MLP([5, 6, case["n_out"]], output_activation=case["out"], ensemble=3, seed=2, dtype="float64",
                 **backend.model_kwargs())
    ens.fit(x, y, loss=case["loss"], lr=[0.01, 0.05, 0.2], optimizer="sgd", epochs=3, batch_size=16,
            progress=False)
    metrics = [m for m in case["metrics"]() if isinstance(m, str) or isinstance(m, am.metrics.Metric)]
    got = ens.evaluate(x, y, metrics=metrics, batch_size=20)  # three batches
    names = ["loss"] + [am.metrics.get_metric(m).name for m in metrics]
    assert set(got) == set(names) | {"ensemble_" + k for k in names}
    for i in range(3):
        own = ens.member(i).evaluate(x, y, loss=case["loss"], metrics=metrics)
        for k in names:
            assert got[k].shape == (3,)
            np.testing.assert_allclose(got[k][i], own[k], rtol=1e-10, atol=1e-12, err_msg=f"member {i}, {k}")
    if case["loss"] == "cross_entropy":
        p = backend.to_numpy(ens.predict_proba(x))
        pred = backend.to_numpy(ens.predict(x))
        np.testing.assert_allclose(got["ensemble_loss"], -np.mean(np.log(p[np.arange(len(y_np)), y_np])), rtol=1e-10)
        assert got["ensemble_accuracy"] == np.mean(pred == y_np)
        top2 = np.argsort(-p, axis=1)[:, :2]
        assert got["ensemble_top_2_accuracy"] == np.mean((top2 == y_np[:, None]).any(axis=1))
    elif case["loss"] == "binary_cross_entropy":
        p = backend.to_numpy(ens.predict_proba(x))
        bce = -np.mean(y_np * np.log(p) + (1 - y_np) * np.log(1 - p))
        np.testing.assert_allclose(got["ensemble_loss"], bce, rtol=1e-10)
        assert got["ensemble_accuracy"] == np.mean((p > 0.5) == y_np)
    else:
        pred = backend.to_numpy(ens.predict(x))
        np.testing.assert_allclose(got["ensemble_loss"], np.mean((pred - y_np) ** 2), rtol=1e-10)
        np.testing.assert_allclose(got["ensemble_mae"], mean_absolute_error(y_np, pred), rtol=1e-10)
        np.testing.assert_allclose(got["ensemble_r2"], r2_score(y_np, pred), rtol=1e-10)


# --------------------------------------------------------------- mixed precision
def _need_dtype(backend, dtype):
    if getattr(backend.xp, dtype, None) is None:
        pytest.skip(f"the {backend.name} namespace has no {dtype}")


def _amp(dtype):
    # float16: a huge first scale and a short growth interval, so that steps overflow,
    # are skipped and the scales move (members at different steps)
    return am.MixedPrecision("float16", init_scale=2.0**20, growth_interval=3) if dtype == "float16" else dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_members_are_their_plain_models(backend, dtype, monkeypatch):
    """precision= of an ensemble: float32 master weights, one loss scale per member.
    With shared hyper-parameters every member's parameters equal, bit for bit, its plain
    model's trained alone with the same precision (float16: its loss scale and skipped
    steps too, though members skip different steps); with per-member rates (float32
    arrays, whose constants round once more) within a few float32 ulps."""
    from arraymlp.kernels import _jit

    _need_dtype(backend, dtype)
    # NumPy's compiled cross-entropy (once loaded) adds a plain model's exponentials in
    # float64, the ensemble's loss in float32: off here, so both take the same operations
    monkeypatch.setattr(_jit, "_kernels", None)
    rng = np.random.default_rng(0)
    x, y = backend.asarray(rng.normal(size=(64, 5)).astype(np.float32)), backend.asarray(rng.integers(0, 3, size=64))
    for lr in (0.05, [0.01, 0.05, 0.1]):
        ens = am.MLP([5, 8, 3], ensemble=3, seed=0, dtype="float32", **backend.model_kwargs())
        start = [ens.member(i) for i in range(3)]
        opts = dict(loss="cross_entropy", optimizer="adam", epochs=3, batch_size=16, seed=1, progress=False)
        amp = _amp(dtype)
        h = ens.fit(x, y, lr=lr, precision=amp, **opts)
        assert all(p.dtype == ens.params[0]["W"].dtype for layer in ens.params for p in layer.values())
        skips = set()
        for i in range(3):
            plain_amp = _amp(dtype)
            hp = start[i].fit(x, y, lr=lr if isinstance(lr, float) else lr[i], precision=plain_amp, **opts)
            tol = 0.0 if isinstance(lr, float) else 1e-6
            _close(_np_params(ens.member(i)), _np_params(start[i]), tol=tol)
            np.testing.assert_allclose([v[i] for v in h.loss], hp.loss, rtol=tol, atol=tol)
            if dtype == "float16":
                assert backend.to_numpy(amp.scale).shape == (3,)
                assert float(backend.to_numpy(amp.scale)[i]) == float(plain_amp.scale)
                assert int(backend.to_numpy(amp.skipped)[i]) == int(plain_amp.skipped)
                skips.add(int(plain_amp.skipped))
        if dtype == "float16":
            assert min(skips) > 0 and len(skips) > 1  # steps were skipped, not the same number per member


def test_a_member_whose_gradients_overflow_skips_alone(backend):
    """float16 with a scale that overflows only member 1's gradients (its outputs are far
    larger): member 1 keeps its parameters and halves its scale; the others step."""
    _need_dtype(backend, "float16")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(size=(16, 3)).astype(np.float32))
    t = backend.asarray(rng.normal(size=(16, 2)).astype(np.float32))
    ens = am.MLP([3, 2], ensemble=3, seed=0, dtype="float32", **backend.model_kwargs())
    ens(x)
    W = backend.to_numpy(ens.params[0]["W"]).copy()
    W[1] *= 3000.0  # member 1's loss gradient times the scale overflows float16 (the others' do not)
    xp = backend.xp
    ens.params[0]["W"] = xp.asarray(backend.asarray(W), copy=True)
    before = [{k: v.copy() for k, v in p.items()} for p in _np_params(ens)]  # copies: updated in place
    amp = am.MixedPrecision("float16", init_scale=1024.0)
    ens.fit(x, t, loss="mse", optimizer="sgd", lr=0.01, epochs=1, batch_size=16, progress=False, precision=amp)
    after = _np_params(ens)
    np.testing.assert_array_equal(after[0]["W"][1], before[0]["W"][1])
    np.testing.assert_array_equal(after[0]["b"][1], before[0]["b"][1])
    assert not np.array_equal(after[0]["W"][0], before[0]["W"][0])
    assert not np.array_equal(after[0]["W"][2], before[0]["W"][2])
    np.testing.assert_array_equal(backend.to_numpy(amp.scale), [1024.0, 512.0, 1024.0])
    np.testing.assert_array_equal(backend.to_numpy(amp.skipped), [0, 1, 0])


def test_a_mixed_precision_ensemble_resumes_with_its_members_scales(backend, tmp_path):
    """A float16 ensemble stopped after 2 of 4 epochs and resumed from its checkpoint ends
    where the uninterrupted run ends: parameters and each member's loss scale and skips."""
    _need_dtype(backend, "float16")
    rng = np.random.default_rng(0)
    x, y = backend.asarray(rng.normal(size=(64, 5)).astype(np.float32)), backend.asarray(rng.integers(0, 3, size=64))
    opts = dict(loss="cross_entropy", optimizer="adam", lr=[0.01, 0.05, 0.1], batch_size=16, seed=1, progress=False)

    def build():
        return am.MLP([5, 8, 3], ensemble=3, seed=0, dtype="float32", **backend.model_kwargs())

    whole, a = build(), _amp("float16")
    whole.fit(x, y, epochs=4, precision=a, **opts)
    build().fit(x, y, epochs=2, precision=_amp("float16"), callbacks=[am.Checkpoint(tmp_path / "run", every=1)],
                **opts)
    resumed, c = build(), _amp("float16")
    resumed.fit(x, y, epochs=4, precision=c, resume_from=tmp_path / "run", **opts)
    _close(_np_params(resumed), _np_params(whole), tol=0.0)
    for got, want in ((c.scale, a.scale), (c.skipped, a.skipped), (c.good_steps, a.good_steps)):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    assert int(backend.to_numpy(a.skipped).sum()) > 0
