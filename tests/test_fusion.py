"""The fusion plan: decided once per model, namespace and optimiser, never fusing past
a hook. A ``forward`` or ``backward`` set on a layer instance runs under every
optimiser, with the backend's kernels and with the reference forced, on every row."""

from __future__ import annotations

import numpy as np
import pytest

import arraymlp as am
from arraymlp.fusion import plan_for
from arraymlp.kernels import kernels_for, reference_kernels

# the float64 cases also run on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True
# on the 32-bit jax row, the float64-only tests run on float32 data, at float32 tolerances
FLOAT64_DATA = "float32"

OPTIMIZERS = {
    "sgd": lambda: am.SGD(lr=0.1),
    "momentum": lambda: am.SGD(lr=0.1, momentum=0.9),
    "adam": lambda: am.Adam(lr=0.01),
}


def _data(backend, n=24):
    r = np.random.default_rng(0)
    return backend.asarray(r.standard_normal((n, 5))), backend.asarray(r.integers(0, 3, n))


def _model(backend):
    return am.MLP([5, 8, 8, 3], output_activation="softmax", dtype=backend.float_dtype(), seed=2,
                  **backend.model_kwargs())


def _hook(layer, method, seen):
    def hook(*args, **kwargs):
        seen.append((type(layer).__name__, method))
        return getattr(type(layer), method)(layer, *args, **kwargs)

    setattr(layer, method, hook)


@pytest.mark.parametrize("reference", [False, True], ids=["backend-kernels", "reference"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", ["forward", "backward"])
def test_instance_hooks_run_under_every_optimizer(backend, opt, method, reference):
    """A counting hook on the first Dense layer and on the ReLU after it runs once per
    batch, and the hooked model trains to the same parameters as an unhooked one."""
    x, y = _data(backend)
    hooked, plain = _model(backend), _model(backend)
    seen = []
    for layer in hooked.layers[:2]:
        _hook(layer, method, seen)
    with reference_kernels(reference):
        hooked.fit(x, y, loss="cross_entropy", optimizer=OPTIMIZERS[opt](), epochs=1, batch_size=8,
                   shuffle=False, progress=False)
        plain.fit(x, y, loss="cross_entropy", optimizer=OPTIMIZERS[opt](), epochs=1, batch_size=8,
                  shuffle=False, progress=False)
    assert seen.count(("Dense", method)) == 3  # three batches
    assert seen.count(("Activation", method)) == 3
    for p, q in zip(hooked.params, plain.params):
        for k in p:
            np.testing.assert_allclose(backend.to_numpy(p[k]), backend.to_numpy(q[k]),
                                       rtol=backend.tol(1e-12), atol=backend.tol(1e-14))


def test_a_hook_set_after_the_first_fit_is_called(backend):
    """The plan is rebuilt when a hook appears on a layer it had fused."""
    x, y = _data(backend)
    model = _model(backend)
    model.fit(x, y, loss="cross_entropy", optimizer=am.SGD(lr=0.1), epochs=1, batch_size=8, progress=False)
    seen = []
    _hook(model.layers[0], "backward", seen)
    _hook(model.layers[2], "forward", seen)
    model.fit(x, y, loss="cross_entropy", optimizer=am.SGD(lr=0.1), epochs=1, batch_size=8, progress=False)
    assert seen.count(("Dense", "backward")) == 3 and seen.count(("Dense", "forward")) == 3
    del model.layers[0].backward, model.layers[2].forward
    plan = plan_for(model, model.xp, am.SGD(lr=0.1))
    assert plan.sgd and 0 in plan.sgd_dense and 2 in plan.sgd_dense


def test_the_plan_fuses_what_the_kernel_set_speeds_up(backend):
    model = _model(backend)
    xp = model.xp
    ks = kernels_for(xp)
    plan = plan_for(model, xp)
    fused = [(s.start, s.stop) for s in plan.forward if s.kernel is not None]
    assert fused == ([(0, 2), (2, 4)] if "dense_relu_forward" in ks.overrides else [])
    assert [i for s in plan.forward for i in range(s.start, s.stop)] == list(range(len(model.layers)))
    assert plan_for(model, xp) is plan  # kept while nothing changes
    assert not plan.sgd and not plan.sgd_dense
    sgd = plan_for(model, xp, am.SGD(lr=0.1))
    assert sgd.sgd and sgd.sgd_dense == {0, 2, 4}
    assert not plan_for(model, xp, am.SGD(lr=0.1, momentum=0.5)).sgd
    assert not plan_for(model, xp, am.Adam()).sgd
    with reference_kernels():
        ref = plan_for(model, xp)
        assert all(s.kernel is None for s in ref.forward)
    tied = _model(backend)
    tied.params[0]["b"] = tied.params[2]["b"]  # one array in two places
    assert not plan_for(tied, xp, am.SGD(lr=0.1)).sgd


def test_a_subclass_that_replaces_forward_is_not_fused(backend):
    class LoggingDense(am.Dense):
        calls = 0

        def forward(self, params, x, *, training, rng, xp):
            LoggingDense.calls += 1
            return super().forward(params, x, training=training, rng=rng, xp=xp)

    model = am.Sequential([LoggingDense(5, 8), am.ReLU(), am.Dense(8, 3)], dtype=backend.float_dtype(), seed=0,
                          **backend.model_kwargs())
    x, _ = _data(backend)
    plan = plan_for(model, model.xp)
    assert all(s.kernel is None for s in plan.forward[:1])
    model(x)
    assert LoggingDense.calls == 1


def test_the_kept_plan_is_rebuilt_when_what_it_depends_on_changes(backend):
    """The per-step check compares identities, classes and a count of hook assignments
    instead of walking the layers: each change it must see, seen."""
    import gc

    import arraymlp.fusion as fusion

    model = _model(backend)
    xp = model.xp
    sgd = am.SGD(lr=0.1)
    plan = plan_for(model, xp, sgd)
    assert plan_for(model, xp, sgd) is plan and plan.sgd_dense == {0, 2, 4}

    # a hooked layer of the same class and configuration swapped in (equal, not identical)
    twin = am.Dense(5, 8)
    twin.backward = lambda *a, **k: None
    model.layers[0] = twin
    assert 0 not in plan_for(model, xp, sgd).sgd_dense
    del twin.backward
    assert 0 in plan_for(model, xp, sgd).sgd_dense

    # a hook set as an attribute, and through a patch of the instance's class
    original = model.layers[2]
    original.forward = lambda *a, **k: None
    assert 2 not in plan_for(model, xp, sgd).sgd_dense
    del original.forward

    class Logged(am.Dense):
        def backward(self, *args, **kwargs):
            return super().backward(*args, **kwargs)

    original.__class__ = Logged
    assert 2 not in plan_for(model, xp, sgd).sgd_dense
    original.__class__ = am.Dense
    assert plan_for(model, xp, sgd).sgd_dense == {0, 2, 4}

    # a layer added, a parameter tied, the reference set forced
    n = len(model.layers)
    model.layers.append(am.Activation("identity"))
    model.params.append({})
    assert [i for s in plan_for(model, xp, sgd).forward for i in range(s.start, s.stop)] == list(range(n + 1))
    model.layers.pop()
    model.params.pop()
    model.params[0]["b"] = model.params[2]["b"]
    assert not plan_for(model, xp, sgd).sgd
    with reference_kernels():
        assert plan_for(model, xp).kernels is kernels_for(xp)

    # the plans go with the model
    key = id(model)
    assert key in fusion._PLANS
    del model, original
    gc.collect()
    assert key not in fusion._PLANS


def test_a_layer_outside_arraymlps_class_is_watched_by_looking(backend):
    """A layer object that is not an arraymlp.Layer does not count its hooks: the plan
    looks at its attributes instead, and sees a hook set after it was built."""

    class Passthrough:  # the layer contract, without arraymlp's base class
        n_in = n_out = None
        fresh_output = fresh_dx = False

        def init_params(self, *, rng, dtype):
            return {}

        def forward(self, params, x, *, training, rng, xp):
            return x, None

        def backward(self, params, cache, dy, *, xp, need_dx=True):
            return dy, {}

        def config(self):
            return {"type": "Passthrough"}

    other = Passthrough()
    model = am.Sequential([am.Dense(5, 8), am.ReLU(), am.Activation("identity"), am.Dense(8, 3)],
                          dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
    model.layers[2] = other  # the constructor takes arraymlp layers only; the list takes anything
    xp = model.xp
    sgd = am.SGD(lr=0.1)
    plan = plan_for(model, xp, sgd)
    assert plan_for(model, xp, sgd) is plan
    seen = []
    other.forward = lambda params, x, **kw: (seen.append(1), (x, None))[1]
    rebuilt = plan_for(model, xp, sgd)
    assert rebuilt is not plan and rebuilt.sgd_dense == plan.sgd_dense
    x, _ = _data(backend)
    model(x)
    assert seen == [1]
