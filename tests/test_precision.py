"""Mixed precision: float16/bfloat16 compute over float32 master weights, and dynamic
loss scaling, on every backend row that has the compute dtype."""

from __future__ import annotations

import numpy as np
import pytest

import arraymlp as am
from arraymlp import Callback
from arraymlp._backend import device_of

DTYPES = ("float16", "bfloat16")


def _need(backend, dtype):
    if getattr(backend.xp, dtype, None) is None:
        pytest.skip(f"the {backend.name} namespace has no {dtype}")


def _linear_model(backend, W, b):
    """One Dense layer (no activation) with the given float32 weights."""
    model = am.MLP([W.shape[0], W.shape[1]], seed=0, **backend.model_kwargs())
    model(backend.asarray(np.zeros((1, W.shape[0]), dtype=np.float32)))  # built on the row's device
    xp = backend.xp
    dev = model.device
    model.params[0]["W"] = xp.asarray(backend.asarray(W), copy=True, device=dev)
    model.params[0]["b"] = xp.asarray(backend.asarray(b), copy=True, device=dev)
    return model


def _mse_grad64(x, t, W, b):
    """dL/dW of L = mean((x W + b - t)^2), in float64."""
    x, t, W, b = (np.asarray(a, np.float64) for a in (x, t, W, b))
    d = 2.0 * (x @ W + b - t) / t.size
    return x.T @ d


@pytest.mark.parametrize("dtype", DTYPES)
def test_master_weights_keep_updates_too_small_for_the_compute_dtype(backend, dtype):
    """Weights in [1, 2), where float16's spacing is 2**-10 (bfloat16's 2**-7): a step of
    at most 1e-4 vanishes in a pure float16 model, and changes the float32 master by
    ``-lr * g`` (g of the float64 reference, to the compute dtype's rounding)."""
    _need(backend, dtype)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (32, 6)).astype(np.float32)
    t = rng.uniform(-1, 1, (32, 3)).astype(np.float32)
    W = rng.uniform(1.0, 1.9, (6, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    g = _mse_grad64(x, t, W, b)
    lr = 1e-4 / np.abs(g).max()

    model = _linear_model(backend, W, b)
    model.fit(backend.asarray(x), backend.asarray(t), loss="mse", optimizer=am.SGD(lr=lr), epochs=1,
              batch_size=32, shuffle=False, progress=False, precision=dtype)
    W_new = backend.to_numpy(model.params[0]["W"])
    assert W_new.dtype == np.float32 and str(model.params[0]["W"].dtype).endswith("float32")
    step = W_new.astype(np.float64) - W
    tol = 3e-2 if dtype == "float16" else 8e-2  # 11- or 8-bit significands through two products
    np.testing.assert_allclose(step, -lr * g, rtol=0, atol=tol * 1e-4)
    assert np.all(step != 0)  # every weight moved

    if dtype == "float16" and backend.name == "numpy":  # the same step in a float16 model is lost
        pure = model.copy(dtype="float16")
        pure.params[0]["W"] = W.astype(np.float16)
        pure.fit(x.astype(np.float16), t.astype(np.float16), loss="mse", optimizer=am.SGD(lr=lr), epochs=1,
                 batch_size=32, shuffle=False, progress=False)
        np.testing.assert_array_equal(pure.params[0]["W"], W.astype(np.float16))


class _Scales(Callback):
    def __init__(self, amp):
        self.amp, self.seen = amp, []

    def on_batch_end(self, model, logs):
        self.seen.append((float(self.amp.scale), int(self.amp.skipped)))


def test_an_overflowing_step_is_skipped_and_halves_the_scale(backend):
    """Targets of 1e4 and a scale of 2**15: the scaled float16 gradient overflows. The
    weights and Adam's moments keep their values; the scale halves; one skip counted."""
    _need(backend, "float16")
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
    t = np.full((8, 2), 1e4, np.float32)
    W = rng.uniform(-1, 1, (4, 2)).astype(np.float32)
    b = np.zeros(2, np.float32)
    model = _linear_model(backend, W, b)
    amp = am.MixedPrecision("float16", init_scale=2.0**15)
    seen = _Scales(amp)
    opt = am.Adam(lr=0.1)
    model.fit(backend.asarray(x), backend.asarray(t), loss="mse", optimizer=opt, epochs=1, batch_size=8,
              shuffle=False, progress=False, precision=amp, callbacks=[seen])
    assert seen.seen == [(2.0**14, 1)]
    np.testing.assert_array_equal(backend.to_numpy(model.params[0]["W"]), W)
    np.testing.assert_array_equal(backend.to_numpy(model.params[0]["b"]), b)
    for st in opt.state[0].values():
        for v in st.values():
            np.testing.assert_array_equal(backend.to_numpy(v), 0.0)


def test_the_scale_grows_after_growth_interval_good_steps(backend):
    """growth_interval=3 from a scale of 1: 1, 1, 2, 2, 2, 4 after each step; the weights
    move as SGD in float32 would (to float16 rounding)."""
    _need(backend, "float16")
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (6, 4)).astype(np.float32)
    t = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
    W = rng.uniform(-1, 1, (4, 2)).astype(np.float32)
    b = np.zeros(2, np.float32)
    model = _linear_model(backend, W, b)
    amp = am.MixedPrecision("float16", init_scale=1.0, growth_interval=3)
    seen = _Scales(amp)
    model.fit(backend.asarray(x), backend.asarray(t), loss="mse", optimizer=am.SGD(lr=0.05), epochs=6,
              batch_size=6, shuffle=False, progress=False, precision=amp, callbacks=[seen])
    assert seen.seen == [(1.0, 0), (1.0, 0), (2.0, 0), (2.0, 0), (2.0, 0), (4.0, 0)]
    Wr, br = W.astype(np.float64), b.astype(np.float64)
    for _ in range(6):  # float64 reference of the six SGD steps
        d = 2.0 * (x @ Wr + br - t) / t.size
        Wr, br = Wr - 0.05 * (x.T @ d), br - 0.05 * d.sum(axis=0)
    np.testing.assert_allclose(backend.to_numpy(model.params[0]["W"]), Wr, atol=2e-3)


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return X[:1400], y[:1400], X[1400:], y[1400:]


@pytest.mark.parametrize("dtype,backend_name", [("float16", "numpy"), ("bfloat16", "torch")])
def test_half_precision_training_on_digits_matches_float32(dtype, backend_name):
    """The same seeds, float32 against mixed precision: test accuracy within 0.5 % on
    the 397 held-out digits (at most one digit's difference) for float16; bfloat16 keeps
    8 significant bits (float16: 11), so its bound is 1 % (three digits)."""
    if backend_name == "torch":
        pytest.importorskip("torch")
    Xtr, ytr, Xte, yte = _digits()
    acc = {}
    for prec in (None, dtype):
        model = am.MLP([64, 64, 10], seed=0, backend=backend_name)
        Xa, ya, Xb = Xtr, ytr, Xte
        if backend_name == "torch":
            import torch

            Xa, ya, Xb = torch.asarray(Xtr), torch.asarray(ytr), torch.asarray(Xte)
        model.fit(Xa, ya, loss="cross_entropy", epochs=20, batch_size=64, progress=False, seed=0, precision=prec)
        acc[prec] = float(np.mean(am.to_numpy(model.predict(Xb)) == yte))
    assert acc[None] > 0.85
    bound = 0.005 if dtype == "float16" else 0.01
    assert abs(acc[dtype] - acc[None]) <= bound, acc


def test_precision_arguments_are_checked():
    x = np.zeros((4, 3), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="float32 master weights"):
        am.MLP([3, 2], dtype="float64", seed=0).fit(x.astype(np.float64), y, loss="cross_entropy",
                                                    progress=False, precision="float16")
    with pytest.raises(ValueError, match="NumPy has no bfloat16"):
        am.MLP([3, 2], seed=0).fit(x, y, loss="cross_entropy", progress=False, precision="bfloat16")
    with pytest.raises(ValueError, match="precision must be"):
        am.MLP([3, 2], seed=0).fit(x, y, loss="cross_entropy", progress=False, precision="int8")
    with pytest.raises(ValueError, match="compute dtype"):
        am.MixedPrecision("float32")
    with pytest.raises(ValueError, match="growth_interval"):
        am.MixedPrecision("float16", growth_interval=0)
    assert not am.MixedPrecision("bfloat16").dynamic and am.MixedPrecision("bfloat16").init_scale == 1.0
    # precision equal to the model's dtype is plain training, bit for bit
    xr = np.random.default_rng(3).standard_normal((16, 3)).astype(np.float32)
    yr = np.arange(16) % 2
    a, b = am.MLP([3, 2], seed=0), am.MLP([3, 2], seed=0)
    a.fit(xr, yr, loss="cross_entropy", epochs=2, progress=False, seed=0, precision="float32")
    b.fit(xr, yr, loss="cross_entropy", epochs=2, progress=False, seed=0)
    np.testing.assert_array_equal(a.params[0]["W"], b.params[0]["W"])


def test_strict_has_no_float16():
    import array_api_strict as xps

    model = am.MLP([3, 2], seed=0, backend="array_api_strict")
    with pytest.raises(ValueError, match="has no float16"):
        model.fit(xps.zeros((4, 3)), xps.zeros((4,), dtype=xps.int64), loss="cross_entropy", progress=False,
                  precision="float16")


def test_partial_fit_keeps_the_loss_scale_of_one_mixed_precision():
    """Two partial_fit calls with one MixedPrecision: the good-step count carries over, so
    growth_interval=2 doubles the scale at the second call's step."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = np.arange(8) % 2
    model = am.MLP([3, 2], seed=0)
    amp = am.MixedPrecision("float16", init_scale=8.0, growth_interval=2)
    model.partial_fit(x, y, loss="cross_entropy", optimizer="sgd", batch_size=8, precision=amp)
    assert (float(amp.scale), int(amp.good_steps)) == (8.0, 1)
    model.partial_fit(x, y, batch_size=8, precision=amp)
    assert (float(amp.scale), int(amp.good_steps)) == (16.0, 0)
    assert model.params[0]["W"].dtype == np.float32


def test_the_device_resident_loop_and_the_per_step_loop_agree_under_mixed_precision():
    """fit without a batch callback keeps the losses on the device (and replays from a
    snapshot that includes the loss scale); with one it reads each step. Same seeds: the
    same parameters and the same scale, bit for bit."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    class Watch(Callback):
        def on_batch_end(self, model, logs):
            return None

    out = []
    for watch in (False, True):
        model = am.MLP([5, 8, 2], seed=0)
        amp = am.MixedPrecision("float16", init_scale=2.0**20, growth_interval=3)  # overflows, then settles
        model.fit(x, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=16, progress=False, seed=0,
                  precision=amp, callbacks=[Watch()] if watch else [])
        out.append((model.params[0]["W"].copy(), float(amp.scale), int(amp.skipped)))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1:] == out[1][1:] and out[0][2] >= 1


def _overflowing_data():
    """Targets large enough that a scale of 2**20 overflows float16 now and then, so the
    scale halves, skips are counted and growth (every 3 good steps) doubles it again."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = (x @ rng.standard_normal((5, 2)) * 50.0).astype(np.float32)
    return x, y


def _amp():
    return am.MixedPrecision("float16", init_scale=2.0**20, growth_interval=3)


@pytest.mark.parametrize("given", ["instance", "name"])
def test_a_resumed_float16_run_ends_as_the_uninterrupted_one(backend, tmp_path, given):
    """Checkpoints keep the loss scale, its good-step count and the skip count (and the
    scaling's configuration): a run resumed after epoch 2 of 4 ends with the parameters
    and loss-scale state of the uninterrupted run, bit for bit. A resume that passes
    only the dtype name takes the saved configuration."""
    _need(backend, "float16")
    x, y = _overflowing_data()
    xs, ys = backend.asarray(x), backend.asarray(y)
    kwargs = dict(loss="mse", optimizer="adam", lr=1e-2, batch_size=16, progress=False, seed=0)
    full = am.MLP([5, 8, 2], seed=0, **backend.model_kwargs())
    amp = _amp()
    full.fit(xs, ys, epochs=4, precision=amp, callbacks=[am.Checkpoint(tmp_path, keep=None)], **kwargs)
    want = amp.state_dict()
    assert want["skipped"] >= 1 and want["scale"] != 2.0**20  # the scale moved during the run

    resumed = am.MLP([5, 8, 2], seed=0, **backend.model_kwargs())
    amp2 = _amp() if given == "instance" else "float16"
    resumed.fit(xs, ys, epochs=4, precision=amp2, resume_from=tmp_path / "epoch-00002.safetensors", **kwargs)
    assert resumed.precision_.state_dict() == want
    for p, q in zip(full.params, resumed.params):
        for k in p:
            np.testing.assert_array_equal(backend.to_numpy(p[k]), backend.to_numpy(q[k]))


def test_a_resume_without_the_saved_state_differs(tmp_path, monkeypatch):
    """The check above is not vacuous: a run resumed with its loss scale back at
    init_scale (the state dropped from the checkpoint) ends elsewhere."""
    x, y = _overflowing_data()
    kwargs = dict(loss="mse", optimizer="adam", lr=1e-2, batch_size=16, progress=False, seed=0)
    full = am.MLP([5, 8, 2], seed=0)
    full.fit(x, y, epochs=4, precision=_amp(), callbacks=[am.Checkpoint(tmp_path, keep=None)], **kwargs)
    resumed = am.MLP([5, 8, 2], seed=0)
    monkeypatch.setattr(am.io.checkpoints, "_restore_precision", lambda f, precision: None)
    resumed.fit(x, y, epochs=4, precision=_amp(), resume_from=tmp_path / "epoch-00002.safetensors", **kwargs)
    assert not np.array_equal(full.params[0]["W"], resumed.params[0]["W"])


def test_a_mixed_precision_checkpoint_resumed_without_precision_is_refused(tmp_path):
    """Resuming a float16 run's checkpoint without precision= would train on in float32
    and drop the saved loss scale without a word; it is refused, naming the argument,
    before the model or the optimiser is touched. A checkpoint of a float32 run may
    start mixed precision (its loss scale from init_scale)."""
    x, y = _overflowing_data()
    kwargs = dict(loss="mse", optimizer="adam", lr=1e-2, batch_size=16, progress=False, seed=0)
    am.MLP([5, 8, 2], seed=0).fit(x, y, epochs=1, precision=_amp(), callbacks=[am.Checkpoint(tmp_path / "amp")],
                                  **kwargs)
    model = am.MLP([5, 8, 2], seed=3, backend="numpy")
    before = [a.copy() for p in model.params for a in p.values()]
    with pytest.raises(ValueError, match=r"mixed precision \(float16\).*pass precision='float16'"):
        model.fit(x, y, epochs=2, resume_from=tmp_path / "amp", **kwargs)
    for a, b in zip(before, [a for p in model.params for a in p.values()]):
        np.testing.assert_array_equal(a, b)
    assert model.optimizer_.state is None and model.rng.counter == 0
    am.MLP([5, 8, 2], seed=0).fit(x, y, epochs=1, callbacks=[am.Checkpoint(tmp_path / "plain")], **kwargs)
    resumed = am.MLP([5, 8, 2], seed=0)
    resumed.fit(x, y, epochs=2, precision=_amp(), resume_from=tmp_path / "plain", **kwargs)
    assert resumed.precision_.state_dict()["init_scale"] == 2.0**20


def test_copy_and_to_continue_the_loss_scale(backend):
    """``copy()`` gives the copy its own MixedPrecision with the same scale and counters;
    ``to()`` keeps it and moves it at the next step. partial_fit with the dtype name
    continues it: growth_interval=2 doubles the scale at the second call's step, as one
    uninterrupted sequence of calls does."""
    _need(backend, "float16")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = np.arange(8) % 2
    model = am.MLP([3, 2], seed=0)
    amp = am.MixedPrecision("float16", init_scale=8.0, growth_interval=2)
    model.partial_fit(x, y, loss="cross_entropy", optimizer="sgd", batch_size=8, precision=amp)
    assert (float(amp.scale), int(amp.good_steps)) == (8.0, 1)
    twin = model.copy()
    assert twin.precision_ is not amp and twin.precision_.state_dict() == amp.state_dict()
    moved = model.copy().to(backend.name, backend.device)
    for m in (twin, moved):
        xs, ys = (x, y) if m is twin else (backend.asarray(x), backend.asarray(y))
        m.partial_fit(xs, ys, batch_size=8, precision="float16")
        assert m.precision_.state_dict()["scale"] == 16.0 and m.precision_.state_dict()["good_steps"] == 0
    assert (float(amp.scale), int(amp.good_steps)) == (8.0, 1)  # the original is untouched by its copies


def test_a_skipped_first_step_after_to_keeps_the_moved_optimizer_state(backend, monkeypatch):
    """After ``to()`` the optimiser's saved moments are placed on the new device at the
    next step. A float16 step that overflows there is skipped: the moments it puts back
    must be the placed ones (a copy taken before the placement is a host array, which a
    GPU's ``where`` cannot mix with device arrays). The moved model then trains on as
    the unmoved one does, to rounding, with the same loss-scale history."""
    _need(backend, "float16")
    x, y = _overflowing_data()
    kwargs = dict(loss="mse", optimizer="adam", lr=1e-2, batch_size=16, shuffle=False)
    model = am.MLP([5, 8, 2], seed=0)
    model.partial_fit(x, y * 0.01, precision=am.MixedPrecision("float16", init_scale=2.0**14), **kwargs)
    assert model.precision_.state_dict()["skipped"] == 0
    stay, moved = model.copy(), model.copy().to(backend.name, backend.device)
    stay.precision_ = moved.precision_ = None  # both start again at 2**20: the first step overflows
    original, placed = am.precision._snapshot, []

    def snapshot(params, state, xp):  # what a skip would put back: on the parameters' device
        like = params[0]["W"]
        placed.extend(type(c[k]) is type(like) and device_of(c[k]) == device_of(like)
                      for c, k in am.precision._arrays(params, state))
        return original(params, state, xp)

    monkeypatch.setattr(am.precision, "_snapshot", snapshot)
    runs = []
    for m, put in ((stay, lambda a: a), (moved, backend.asarray)):
        amp = am.MixedPrecision("float16", init_scale=2.0**20, growth_interval=1000)
        m.partial_fit(put(x), put(y * 0.01), precision=amp, **kwargs)
        runs.append(([backend.to_numpy(a) for p in m.params for a in p.values()], amp.state_dict()))
    assert placed and all(placed)
    assert runs[0][1] == runs[1][1] and runs[0][1]["skipped"] >= 1
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert all(backend.same_place(a) for st in moved.optimizer_.state for d in st.values() for a in d.values())


def test_a_checkpoint_of_another_compute_dtype_is_refused(tmp_path):
    pytest.importorskip("torch")
    x, y = _overflowing_data()
    model = am.MLP([5, 8, 2], seed=0, backend="torch")
    model.fit(x, y, loss="mse", epochs=1, progress=False, precision="bfloat16",
              callbacks=[am.Checkpoint(tmp_path, keep=None)])
    with pytest.raises(ValueError, match="dtype 'bfloat16'.*precision='bfloat16'"):
        am.MLP([5, 8, 2], seed=0, backend="torch").fit(x, y, loss="mse", epochs=2, progress=False,
                                                        precision="float16", resume_from=tmp_path)


def _nan_after(calls_before_nan):
    """An mse whose value is NaN at one call (counting the calls fit makes)."""
    calls = [0]

    def fn(outputs, targets, *, xp=None, sample_weight=None, check=True):
        calls[0] += 1
        value, g = am.LOSSES["mse"].fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)
        return (value * float("nan") if calls[0] == calls_before_nan else value), g

    return am.losses.Loss("nan_once", fn, "identity", "same_shape")


def test_a_divergence_replay_right_after_a_resume_keeps_the_resumed_loss_scale(backend, tmp_path, monkeypatch):
    """A run resumed from a checkpoint holds the saved loss scale as a pending value
    until its first step. A non-finite loss found at the first read replays the steps
    from the snapshot taken before that first step: the replay must scale (and skip)
    with the resumed scale, as the first pass did, not with ``init_scale``. The
    parameters left by DivergenceError are then those of the per-step loop, which checks
    each loss before its update and never replays."""
    _need(backend, "float16")
    monkeypatch.setattr(am.training, "_CHECK_EVERY", 3)
    x, y = _overflowing_data()
    xs, ys = backend.asarray(x), backend.asarray(y * 0.01)  # 2**20 overflows; the scale settles at 2**14
    kwargs = dict(optimizer="adam", lr=1e-2, batch_size=16, progress=False, seed=0)

    def amp():
        return am.MixedPrecision("float16", init_scale=2.0**20, growth_interval=1000)

    first = am.MLP([5, 8, 2], seed=0, **backend.model_kwargs())
    first.fit(xs, ys, loss="mse", epochs=2, precision=amp(), callbacks=[am.Checkpoint(tmp_path)], **kwargs)
    saved = first.precision_.state_dict()
    assert saved["scale"] == 2.0**14 and saved["skipped"] == 6  # settled: its steps no longer overflow

    class Watch(Callback):
        def on_batch_end(self, model, logs):
            return None

    out = []
    for watch in (False, True):
        model = am.MLP([5, 8, 2], seed=0, **backend.model_kwargs())
        # the up-front target check calls the loss once; the NaN comes at the third step
        with pytest.raises(am.DivergenceError, match="step 11 "):
            model.fit(xs, ys, loss=_nan_after(1 + 3), epochs=4, precision=amp(), resume_from=tmp_path,
                      callbacks=[Watch()] if watch else [], **kwargs)
        out.append([backend.to_numpy(a) for p in model.params for a in p.values()])
        assert model.precision_.state_dict()["skipped"] == 6  # the replayed steps did not overflow
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
