"""Optimisers: trajectories against torch.optim on every backend row, exact SGD,
in-place versus functional updates, untouched gradients, checkpoints, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_api_compat import is_writeable_array

import arraymlp.kernels._common as kernel_common
import arraymlp.kernels.reference as kernel_reference
from arraymlp.optim import SGD, Adagrad, Adam, AdamW, RMSprop, get_optimizer
from arraymlp.schedules import CosineAnnealing, LinearWarmup

# the float64 cases also run on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True
# on the 32-bit jax row, the float64-only tests run on float32 data, at float32 tolerances
FLOAT64_DATA = "float32"

# Two dense layers with an activation (no parameters) between them.
SHAPES = [{"W": (3, 4), "b": (4,)}, {}, {"W": (4, 2), "b": (2,)}]
N_STEPS = 20


def initial_params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return [{k: rng.normal(size=s).astype(dtype) for k, s in layer.items()} for layer in SHAPES]


_TARGETS = [
    {k: np.random.default_rng(1 + i).normal(size=s) for k, s in layer.items()}
    for i, layer in enumerate(SHAPES)
]


def grad_fn(params_np, k):
    """Gradient of a non-quadratic loss of the parameters at step ``k``.

    ``d/dp [ (p - t)**2 + 0.5*cos(3p)/3 ]`` plus a step-dependent term; the first
    weight matrix's gradient is scaled up so the global norm (about 10) is well
    above the clipping thresholds used below.
    """
    out = []
    for i, (layer, targets) in enumerate(zip(params_np, _TARGETS)):
        g = {}
        for key, p in layer.items():
            gk = 2.0 * (p - targets[key]) - 0.5 * np.sin(3.0 * p) + 0.1 * math.cos(0.7 * k)
            if i == 0 and key == "W":
                gk = 3.0 * gk
            g[key] = gk
        out.append(g)
    return out


def rounded(backend, arrays_np):
    """``arrays_np`` (a list of dicts) in the dtype the row computes float64 data in:
    unchanged, or float32 on JAX's 32-bit mode, so that references start from the
    values the row holds."""
    dtype = backend.float_dtype()
    return [{k: v.astype(dtype) for k, v in layer.items()} for layer in arrays_np]


def make_params(backend, params_np):
    """Parameters as the library would hold them: writeable, on the row's namespace and device."""
    # copies: array_api_strict may wrap NumPy memory without copying
    if backend.readonly:
        return [{k: np.array(v, copy=True) for k, v in layer.items()} for layer in params_np]
    return [
        {k: backend.asarray(np.array(v, copy=True)) for k, v in layer.items()} for layer in params_np
    ]


def make_grads(backend, grads_np):
    """Gradients as a user would pass them (read-only on the numpy-readonly row).

    Copies, so that a mutation cannot reach ``grads_np`` through shared memory and
    go unnoticed by the comparisons against it.
    """
    return [{k: backend.asarray(np.array(v, copy=True)) for k, v in layer.items()} for layer in grads_np]


def to_np(backend, params):
    return [{k: np.array(backend.to_numpy(v), copy=True) for k, v in layer.items()} for layer in params]


def run_ours(backend, opt, params_np, n_steps, lrs=None, start=0):
    """Run ``n_steps`` steps; return the trajectory as lists of numpy dicts."""
    params = make_params(backend, params_np)
    traj = []
    for k in range(start, start + n_steps):
        gnp = rounded(backend, grad_fn(to_np(backend, params), k))
        grads = make_grads(backend, gnp)
        params = opt.step(params, grads, lr=None if lrs is None else lrs[k])
        for layer, ref in zip(grads, gnp):  # gradients are never mutated
            for key, g in layer.items():
                np.testing.assert_array_equal(backend.to_numpy(g), ref[key])
        traj.append(to_np(backend, params))
    return traj


_TORCH_CACHE: dict = {}


def run_torch(opt, params_np, n_steps, lrs=None, key=None):
    """The same trajectory with torch.optim and torch.nn.utils clipping (on the CPU)."""
    if key is not None and key in _TORCH_CACHE:
        return _TORCH_CACHE[key]
    torch = pytest.importorskip("torch")
    hyper = opt.hyperparameters()
    decay_bias = hyper.pop("decay_bias")
    clip_norm = hyper.pop("clip_norm")
    clip_value = hyper.pop("clip_value")
    wd = hyper.pop("weight_decay")
    cls = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
        "adagrad": torch.optim.Adagrad,
    }[opt.name]
    tparams = [
        {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in layer.items()}
        for layer in params_np
    ]
    flat = [(k, p) for layer in tparams for k, p in layer.items()]
    decayed = [p for k, p in flat if k == "W" or decay_bias]
    others = [p for k, p in flat if not (k == "W" or decay_bias)]
    groups = [{"params": decayed, "weight_decay": wd}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    topt = cls(groups, foreach=False, **hyper)
    traj = []
    for k in range(n_steps):
        gnp = grad_fn([{kk: v.detach().numpy() for kk, v in layer.items()} for layer in tparams], k)
        for layer, glayer in zip(tparams, gnp):
            for kk, p in layer.items():
                p.grad = torch.tensor(glayer[kk], dtype=torch.float64)
        ps = [p for _, p in flat]
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(ps, clip_value)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(ps, clip_norm)
        if lrs is not None:
            for group in topt.param_groups:
                group["lr"] = lrs[k]
        topt.step()
        traj.append([{kk: v.detach().numpy().copy() for kk, v in layer.items()} for layer in tparams])
    if key is not None:
        _TORCH_CACHE[key] = traj
    return traj


def assert_traj_close(got, want, tol=1e-6):
    assert len(got) == len(want)
    for k, (g_params, w_params) in enumerate(zip(got, want)):
        for i, (g_layer, w_layer) in enumerate(zip(g_params, w_params)):
            assert set(g_layer) == set(w_layer)
            for key in g_layer:
                np.testing.assert_allclose(
                    g_layer[key], w_layer[key], rtol=tol, atol=tol, err_msg=f"step {k}, layer {i}, {key}"
                )


CASES = {
    "sgd": (SGD, dict(lr=0.05)),
    "sgd-momentum": (SGD, dict(lr=0.05, momentum=0.9)),
    "sgd-momentum-dampening": (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "sgd-nesterov-wd": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgd-wd-decay-bias": (SGD, dict(lr=0.05, weight_decay=0.1, decay_bias=True)),
    "sgd-momentum-clip-both": (SGD, dict(lr=0.05, momentum=0.9, clip_value=0.5, clip_norm=1.0)),
    "adam": (Adam, dict(lr=0.05)),
    "adam-wd": (Adam, dict(lr=0.05, weight_decay=0.1)),
    "adam-amsgrad": (Adam, dict(lr=0.05, betas=(0.8, 0.99), amsgrad=True)),
    "adam-clip-norm": (Adam, dict(lr=0.05, clip_norm=1.0)),
    "adamw": (AdamW, dict(lr=0.05, weight_decay=0.1)),
    "adamw-decay-bias-amsgrad": (AdamW, dict(lr=0.05, weight_decay=0.1, decay_bias=True, amsgrad=True)),
    "rmsprop": (RMSprop, dict(lr=0.01)),
    "rmsprop-centered-momentum-wd": (
        RMSprop,
        dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.05),
    ),
    "rmsprop-momentum-clip-value": (RMSprop, dict(lr=0.01, momentum=0.9, clip_value=0.5)),
    "adagrad": (Adagrad, dict(lr=0.1)),
    "adagrad-options": (
        Adagrad,
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, clip_norm=2.0),
    ),
}


@pytest.fixture(params=["inplace", "functional"])
def update_mode(request, monkeypatch):
    """Run with in-place updates where allowed, or force the functional form everywhere."""
    if request.param == "functional":  # the update kernels ask whether they may write
        monkeypatch.setattr(kernel_reference, "is_writeable", lambda x: False)
        monkeypatch.setattr(kernel_common, "is_writeable", lambda x: False)
    return request.param


# ----------------------------------------------------------------------------- against torch
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_torch(backend, case, update_mode):
    cls, kwargs = CASES[case]
    p0 = initial_params()
    opt = cls(**kwargs)
    got = run_ours(backend, opt, p0, N_STEPS)
    want = run_torch(cls(**kwargs), p0, N_STEPS, key=case)
    assert_traj_close(got, want)
    assert opt.step_count == N_STEPS
    # the trajectory really moved, so the comparison means something
    assert np.max(np.abs(got[-1][0]["W"] - p0[0]["W"])) > 1e-2


@pytest.mark.parametrize("case", ["sgd-momentum", "adam", "adagrad-options"])
def test_scheduled_lr_matches_torch(backend, case):
    cls, kwargs = CASES[case]
    schedule = LinearWarmup(CosineAnnealing(kwargs["lr"], T_max=15), warmup_steps=5, start_factor=0.1)
    lrs = [schedule(k) for k in range(N_STEPS)]
    p0 = initial_params()
    got = run_ours(backend, cls(**kwargs), p0, N_STEPS, lrs=lrs)
    want = run_torch(cls(**kwargs), p0, N_STEPS, lrs=lrs, key=("scheduled", case))
    assert_traj_close(got, want)


# ----------------------------------------------------------------------------- reference-free
def test_sgd_plain_is_exactly_p_minus_lr_g(backend):
    p0 = rounded(backend, initial_params())  # float32 on JAX's 32-bit mode: exact there too
    params = make_params(backend, p0)
    opt = SGD(lr=0.1)
    want = [{k: v.copy() for k, v in layer.items()} for layer in p0]
    for k in range(3):
        gnp = rounded(backend, grad_fn(want, k))
        params = opt.step(params, make_grads(backend, gnp))
        want = [{key: v - 0.1 * g[key] for key, v in layer.items()} for layer, g in zip(want, gnp)]
        for layer, ref in zip(params, want):
            for key, v in layer.items():
                np.testing.assert_array_equal(backend.to_numpy(v), ref[key])


def test_step_lr_override_is_for_one_step_only(backend):
    p0 = rounded(backend, initial_params())  # float32 on JAX's 32-bit mode
    g0 = [{k: np.ones_like(v) for k, v in layer.items()} for layer in p0]
    opt = SGD(lr=0.1)
    params = make_params(backend, p0)
    opt.step(params, make_grads(backend, g0), lr=0.5)
    np.testing.assert_array_equal(backend.to_numpy(params[0]["W"]), p0[0]["W"] - 0.5)
    opt.step(params, make_grads(backend, g0))
    np.testing.assert_array_equal(backend.to_numpy(params[0]["W"]), p0[0]["W"] - 0.5 - 0.1)
    assert opt.lr == 0.1


@pytest.mark.parametrize("decay_bias", [False, True])
def test_weight_decay_applies_to_W_only_unless_decay_bias(backend, decay_bias):
    shapes = [{"W": (3, 4), "b": (4,)}, {"gamma": (4,), "beta": (4,)}]
    rng = np.random.default_rng(3)
    p0 = rounded(backend, [{k: rng.normal(size=s) for k, s in layer.items()} for layer in shapes])
    zeros = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in p0]
    for opt, factor in [
        (SGD(lr=0.5, weight_decay=0.1, decay_bias=decay_bias), 1 - 0.5 * 0.1),
        (AdamW(lr=0.5, weight_decay=0.1, decay_bias=decay_bias), 1 - 0.5 * 0.1),
    ]:
        params = opt.step(make_params(backend, p0), make_grads(backend, zeros))
        for layer, ref in zip(params, p0):
            for key, v in layer.items():
                decayed = key == "W" or decay_bias
                want = ref[key].astype(np.float64) * factor if decayed else ref[key]
                np.testing.assert_allclose(backend.to_numpy(v), want, rtol=backend.tol(1e-14), atol=0)


def test_clip_norm_and_value_bound_the_update(backend):
    p0 = rounded(backend, initial_params())  # float32 on JAX's 32-bit mode
    g = rounded(backend, grad_fn(p0, 0))
    norm = math.sqrt(sum(float(np.sum(v * v)) for layer in g for v in layer.values()))
    assert norm > 2.0
    params = SGD(lr=1.0, clip_norm=2.0).step(make_params(backend, p0), make_grads(backend, g))
    coef = 2.0 / (norm + 1e-6)
    for layer, ref, gl in zip(params, p0, g):
        for key, v in layer.items():
            np.testing.assert_allclose(
                backend.to_numpy(v), ref[key] - coef * gl[key].astype(np.float64),
                rtol=backend.tol(1e-12), atol=backend.tol(1e-12),
            )
    params = SGD(lr=1.0, clip_value=0.25).step(make_params(backend, p0), make_grads(backend, g))
    for layer, ref, gl in zip(params, p0, g):
        for key, v in layer.items():
            np.testing.assert_array_equal(backend.to_numpy(v), ref[key] - np.clip(gl[key], -0.25, 0.25))


def test_clip_norm_of_float16_gradients(backend):
    """1000 gradients of 10 in float16: their squares sum to 1e5, past float16's range
    (65504). The norm, 316.2, is taken in float32, so clipping scales the gradients to
    a unit norm instead of zeroing them."""
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16")
    p = [{"W": backend.asarray(np.zeros(1000), dtype="float16")}]
    g = [{"W": backend.asarray(np.full(1000, 10.0), dtype="float16")}]
    out = SGD(lr=1.0, clip_norm=1.0).step(p, g)
    got = backend.to_numpy(out[0]["W"])
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), -10.0 / (math.sqrt(1e5) + 1e-6), rtol=1e-3)


def _tied_reference(case, W0, gs, n_steps):
    """What in-place updates do to one array held by ``len(gs)`` slots: each slot's
    update in turn, each slot with its own state (plain NumPy float64)."""
    p = W0.copy()
    bufs = [np.zeros_like(W0) for _ in gs]
    m, v = [np.zeros_like(W0) for _ in gs], [np.zeros_like(W0) for _ in gs]
    for t in range(1, n_steps + 1):
        for i, g in enumerate(gs):
            if case == "sgd":
                p = p - 0.05 * g
            elif case == "sgd-momentum":
                bufs[i] = g if t == 1 else 0.9 * bufs[i] + g
                p = p - 0.05 * bufs[i]
            else:  # adam, betas (0.9, 0.999), eps 1e-8
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                mhat, vhat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                p = p - 0.05 * mhat / (np.sqrt(vhat) + 1e-8)
    return p


@pytest.mark.parametrize("case", ["sgd", "sgd-momentum", "adam"])
def test_tied_weights_take_every_slots_update_and_stay_tied(backend, case, update_mode):
    """One weight array held by two layers (tied weights) takes both layers' updates in
    turn, as an in-place update does, and both layers hold one array afterwards: also
    where updates make new arrays (JAX, or any row with the functional form forced),
    which would otherwise untie them silently."""
    cls, kwargs = CASES[case]
    dtype = backend.float_dtype()  # float32 on JAX's 32-bit mode
    r = np.random.default_rng(4)
    W0, b0 = r.normal(size=(3, 2)).astype(dtype), r.normal(size=2).astype(dtype)
    gs = [r.normal(size=(3, 2)).astype(dtype) for _ in range(2)]
    params = make_params(backend, [{"W": W0, "b": b0}, {"W": W0}])
    params[1]["W"] = params[0]["W"]
    grads = make_grads(backend, [{"W": gs[0], "b": np.zeros_like(b0)}, {"W": gs[1]}])
    opt = cls(**kwargs)
    for _ in range(3):
        params = opt.step(params, grads)
    assert params[0]["W"] is params[1]["W"]
    want = _tied_reference(case, W0.astype(np.float64), [g.astype(np.float64) for g in gs], 3)
    eps = np.finfo(dtype).eps  # a few roundings a step, on values of order one
    np.testing.assert_allclose(backend.to_numpy(params[0]["W"]), want, rtol=0, atol=200 * eps)
    assert np.max(np.abs(want - W0)) > 0.1  # both slots' updates moved it


# ----------------------------------------------------------------------------- in place / functional
@pytest.mark.parametrize(
    "case", ["sgd-momentum", "adam-amsgrad", "rmsprop-centered-momentum-wd", "adagrad"]
)
def test_updates_in_place_and_never_touch_grads(backend, case):
    """Writeable parameters are updated in place; JAX's immutable ones are replaced
    in the caller's dicts (the trajectory tests check their values). Gradients are
    never written, and the state lives where the parameters do."""
    cls, kwargs = CASES[case]
    p0 = initial_params()
    params = make_params(backend, p0)
    in_place = is_writeable_array(params[0]["W"])
    assert in_place or backend.name == "jax"
    ids = [{k: id(v) for k, v in layer.items()} for layer in params]
    gnp = rounded(backend, grad_fn(p0, 0))  # float32 on JAX's 32-bit mode
    grads = make_grads(backend, gnp)
    opt = cls(**kwargs)
    for _ in range(3):  # the same gradient arrays, reused: state must not alias them
        out = opt.step(params, grads)
    assert out is params
    for layer, idl in zip(params, ids):
        assert set(layer) == set(idl)
        if in_place:
            assert {k: id(v) for k, v in layer.items()} == idl
        for v in layer.values():
            assert backend.same_place(v)
    for layer, ref in zip(grads, gnp):
        for key, g in layer.items():
            np.testing.assert_array_equal(backend.to_numpy(g), ref[key])
    for slayer, layer in zip(opt.state, params):
        for key, st in slayer.items():
            for a in st.values():
                assert backend.same_place(a)
                assert a.dtype == layer[key].dtype
                assert tuple(a.shape) == tuple(layer[key].shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_has_the_params_namespace_device_and_dtype(backend, dtype):
    p0 = initial_params(dtype)
    params = make_params(backend, p0)
    grads = make_grads(backend, [{k: v.astype(dtype) for k, v in g.items()} for g in grad_fn(p0, 0)])
    opt = Adam(lr=0.01, amsgrad=True, clip_norm=1.0)
    opt.step(params, grads)
    for slayer, layer in zip(opt.state, params):
        for key, st in slayer.items():
            assert backend.same_place(layer[key]) and layer[key].dtype == grads[0]["W"].dtype
            for a in st.values():
                assert backend.same_place(a) and a.dtype == layer[key].dtype


@pytest.mark.parametrize(
    "case", ["sgd-momentum", "adamw-decay-bias-amsgrad", "rmsprop-centered-momentum-wd"]
)
def test_read_only_params_are_updated_functionally(case):
    cls, kwargs = CASES[case]
    p0 = initial_params()
    params = [{k: np.array(v, copy=True) for k, v in layer.items()} for layer in p0]
    originals = [dict(layer) for layer in params]
    for layer in params:
        for v in layer.values():
            v.flags.writeable = False
    opt_ro, opt_rw = cls(**kwargs), cls(**kwargs)
    rw = [{k: np.array(v, copy=True) for k, v in layer.items()} for layer in p0]
    for k in range(5):
        g = grad_fn(
            p0 if k == 0 else [{kk: np.asarray(v) for kk, v in layer.items()} for layer in params], k
        )
        params = opt_ro.step(params, g)
        rw = opt_rw.step(rw, g)
    for layer, orig, ref, rwl in zip(params, originals, p0, rw):
        for key, v in layer.items():
            assert v is not orig[key]
            np.testing.assert_array_equal(orig[key], ref[key])  # the read-only arrays are untouched
            np.testing.assert_array_equal(v, rwl[key])  # same values as the in-place path


# ----------------------------------------------------------------------------- checkpoints
def _plain(obj):
    """True when obj is made only of dicts, lists, tuples, numbers, strings, None and arrays."""
    from array_api_compat import is_array_api_obj

    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str)) or is_array_api_obj(obj)


@pytest.mark.parametrize(
    "case", ["sgd-momentum", "adam-amsgrad", "adamw", "rmsprop-centered-momentum-wd", "adagrad-options"]
)
def test_state_dict_round_trip_resumes_the_trajectory(backend, case):
    cls, kwargs = CASES[case]
    p0 = initial_params()
    opt = cls(**kwargs)
    first = run_ours(backend, opt, p0, 10)
    sd = opt.state_dict()
    assert _plain(sd)
    assert sd["optimizer"] == opt.name and sd["step"] == 10
    uninterrupted = run_ours(backend, opt, first[-1], 10, start=10)

    resumed = get_optimizer(sd["optimizer"])  # default hyper-parameters, restored by the load
    resumed.load_state_dict(sd)
    assert resumed.hyperparameters() == opt.hyperparameters()
    assert_traj_close(run_ours(backend, resumed, first[-1], 10, start=10), uninterrupted, tol=0)

    # a checkpoint read back as NumPy arrays resumes on the row's own backend and device
    as_numpy = {
        **sd,
        "state": [
            {k: {s: np.asarray(backend.to_numpy(a)) for s, a in st.items()} for k, st in layer.items()}
            for layer in sd["state"]
        ],
    }
    from_host = get_optimizer(sd["optimizer"])
    from_host.load_state_dict(as_numpy)
    assert_traj_close(run_ours(backend, from_host, first[-1], 10, start=10), uninterrupted, tol=0)
    for slayer in from_host.state:
        for st in slayer.values():
            for a in st.values():
                assert backend.same_place(a)


def test_state_dict_is_a_snapshot(backend):
    p0 = initial_params()
    opt = Adam(lr=0.1)
    params = make_params(backend, p0)
    opt.step(params, make_grads(backend, grad_fn(p0, 0)))
    sd = opt.state_dict()
    saved = backend.to_numpy(sd["state"][0]["W"]["exp_avg"]).copy()
    opt.step(params, make_grads(backend, grad_fn(p0, 1)))
    np.testing.assert_array_equal(backend.to_numpy(sd["state"][0]["W"]["exp_avg"]), saved)
    assert sd["step"] == 1


def test_load_state_dict_rejects_another_optimizer():
    sd = Adam().state_dict()
    with pytest.raises(ValueError, match="'adam'.*not 'sgd'"):
        SGD().load_state_dict(sd)


# ----------------------------------------------------------------------------- structure
def test_empty_params_are_returned_unchanged():
    params = [{}, {}]
    assert SGD().step(params, [{}, {}]) is params


@pytest.mark.parametrize(
    "grads, match",
    [
        ([{"W": np.zeros((3, 4)), "b": np.zeros(4)}], "1 layers but params has 3"),
        (
            [{"W": np.zeros((3, 4))}, {}, {"W": np.zeros((4, 2)), "b": np.zeros(2)}],
            r"layer 0: grads has keys \['W'\]",
        ),
        (
            [{"W": np.zeros((4, 3)), "b": np.zeros(4)}, {}, {"W": np.zeros((4, 2)), "b": np.zeros(2)}],
            r"layer 0, 'W': gradient has shape \(4, 3\)",
        ),
    ],
)
def test_grads_must_mirror_params(grads, match):
    with pytest.raises(ValueError, match=match):
        Adam().step(initial_params(), grads)


def test_state_of_other_params_is_refused_until_reset():
    p0 = initial_params()
    opt = Adam()
    opt.step(p0, grad_fn(p0, 0))
    small = [p0[0]]
    with pytest.raises(ValueError, match="different structure.*reset"):
        opt.step(small, grad_fn(small, 0))
    other = [{"W": np.zeros((5, 4)), "b": np.zeros(4)}, {}, p0[2]]
    with pytest.raises(ValueError, match=r"shape \(3, 4\) but the parameter has shape \(5, 4\)"):
        opt.step(other, [{k: np.ones_like(v) for k, v in layer.items()} for layer in other])
    opt.reset()
    assert opt.state is None and opt.step_count == 0
    opt.step(small, grad_fn(small, 0))


def test_mixed_backends_raise_type_error():
    torch = pytest.importorskip("torch")
    params = [{"W": np.zeros((2, 2))}]
    grads = [{"W": torch.zeros((2, 2), dtype=torch.float64)}]
    with pytest.raises(TypeError, match="numpy.*torch|torch.*numpy"):
        SGD().step(params, grads)


# ----------------------------------------------------------------------------- names, errors, repr
@pytest.mark.parametrize(
    "name, cls",
    [("sgd", SGD), ("adam", Adam), ("adamw", AdamW), ("rmsprop", RMSprop), ("Adagrad", Adagrad)],
)
def test_get_optimizer_by_name(name, cls):
    opt = get_optimizer(name, lr=0.5)
    assert type(opt) is cls and opt.lr == 0.5


def test_get_optimizer_passes_instances_through():
    opt = Adam()
    assert get_optimizer(opt) is opt
    with pytest.raises(TypeError, match="cannot be combined"):
        get_optimizer(opt, lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a name"):
        get_optimizer(3)


def test_get_optimizer_unknown_name_lists_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown optimizer 'nadam'; known optimizers: sgd, adam, adamw, rmsprop, adagrad, lbfgs",
    ):
        get_optimizer("nadam")


@pytest.mark.parametrize(
    "cls, kwargs, exc, match",
    [
        (SGD, dict(lr=-0.1), ValueError, "lr must be >= 0"),
        (SGD, dict(lr="fast"), TypeError, "lr must be a real number"),
        (SGD, dict(momentum=-0.5), ValueError, "momentum must be >= 0"),
        (SGD, dict(nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
        (SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov.*dampening == 0"),
        (SGD, dict(dampening=1.5), ValueError, r"dampening must be in \[0, 1\]"),
        (SGD, dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
        (Adam, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\)"),
        (Adam, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (AdamW, dict(betas=(0.9,)), ValueError, "betas must be a pair"),
        (Adam, dict(eps=-1e-8), ValueError, "eps must be >= 0"),
        (AdamW, dict(lr=float("nan")), ValueError, "lr must be >= 0"),
        (RMSprop, dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
        (RMSprop, dict(momentum=-1.0), ValueError, "momentum must be >= 0"),
        (Adagrad, dict(lr_decay=-0.1), ValueError, "lr_decay must be >= 0"),
        (
            Adagrad,
            dict(initial_accumulator_value=-1.0),
            ValueError,
            "initial_accumulator_value must be >= 0",
        ),
        (Adam, dict(clip_norm=0.0), ValueError, "clip_norm must be > 0"),
        (SGD, dict(clip_value=-1.0), ValueError, "clip_value must be > 0"),
    ],
)
def test_bad_hyperparameters_name_the_argument(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_bad_lr_at_step_and_on_the_attribute():
    opt = SGD()
    p0 = initial_params()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step(p0, grad_fn(p0, 0), lr=-1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.lr = -1.0
    opt.lr = 0.2
    assert opt.lr == 0.2


@pytest.mark.parametrize("case", list(CASES))
def test_repr_rebuilds_the_optimizer(case):
    cls, kwargs = CASES[case]
    opt = cls(**kwargs)
    text = repr(opt)
    assert text.startswith(f"{cls.__name__}(lr=")
    rebuilt = eval(text, {c.__name__: c for c in (SGD, Adam, AdamW, RMSprop, Adagrad)})
    assert rebuilt.hyperparameters() == opt.hyperparameters()


def test_defaults_follow_torch():
    assert (
        repr(Adam()) == "Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)"
    )
    assert AdamW().weight_decay == 0.01
    assert (RMSprop().lr, RMSprop().alpha, RMSprop().eps) == (0.01, 0.99, 1e-8)
    assert (Adagrad().lr, Adagrad().eps) == (0.01, 1e-10)
    assert SGD().lr == 0.01


@pytest.mark.parametrize("cls", [Adam, AdamW, RMSprop])
def test_float16_needs_an_eps_float16_can_hold(backend, cls):
    """eps=1e-8 is 0 in float16 and squared small gradients underflow: the first step
    would divide by zero. The optimiser says so; eps=1e-4 trains."""
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16")
    p = [{"W": backend.asarray(np.ones(4), dtype="float16")}]
    g = [{"W": backend.asarray(np.full(4, 1e-4), dtype="float16")}]
    with pytest.raises(ValueError, match=f"{cls.__name__} with float16 parameters needs eps >= 6.1e-05.*eps=1e-4"):
        cls(lr=0.1).step(p, g)
    out = cls(lr=0.1, eps=1e-4).step(p, g)
    got = backend.to_numpy(out[0]["W"]).astype(np.float64)
    assert np.all(np.isfinite(got)) and np.all(got < 1.0) and np.all(got > 0.5)
