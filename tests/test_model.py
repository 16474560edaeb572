import numpy as np
import pytest

import arraymlp as am
from _reference import np_forward, torch_loss_and_grads
from arraymlp._backend import backend_name

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32
FLOAT64_DATA = "float32"

HIDDEN_ACTIVATIONS = ["identity", "relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid", "softplus"]


def test_sizes_must_chain():
    with pytest.raises(
        ValueError,
        match=r"layer 2 \(Dense\(5 -> 2\)\) expects 5 input features but layer 0 \(Dense\(3 -> 4\)\) produces 4",
    ):
        am.Sequential([am.Dense(3, 4), am.ReLU(), am.Dense(5, 2)])


@pytest.mark.parametrize("sizes", [[1, 3, 2, 1], [2, 1], [5, 1, 1, 7], [4, 33, 1, 33, 2]])
def test_arbitrary_sizes_chain(backend, sizes):
    model = am.MLP(sizes, activation="tanh", dtype="float64", seed=1, **backend.model_kwargs())
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(size=(6, sizes[0])))
    y = backend.asarray(rng.normal(size=(6, sizes[-1])))
    loss, grads = model.loss_and_grads(x, y, loss="mse")
    assert len(grads) == len(model.params)
    for p, g in zip(model.params, grads):
        assert set(p) == set(g)
        for k in p:
            assert tuple(g[k].shape) == tuple(p[k].shape)
    # the loss is the float64 reference MSE
    ref = np.mean((np_forward(model, backend.to_numpy(x)) - backend.to_numpy(y)) ** 2)
    assert float(loss) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("first", ["dropout", "tanh", "softmax"])
def test_layers_without_parameters_before_the_first_dense(backend, first):
    """Input dropout (or an activation on the raw inputs) has nothing to learn and no
    input gradient to give: the gradients are those of the Dense layer on the
    transformed inputs, checked against finite differences in float64."""
    head = {"dropout": am.Dropout(0.5), "tanh": am.Tanh(), "softmax": am.Softmax()}[first]
    model = am.Sequential([head, am.Dense(4, 3), am.Tanh(), am.Dense(3, 2)], dtype="float64", seed=0,
                          **backend.model_kwargs())
    rng = np.random.default_rng(1)
    x, y = backend.asarray(rng.normal(size=(6, 4))), backend.asarray(rng.normal(size=(6, 2)))
    value, grads = model.loss_and_grads(x, y, loss="mse", training=False)  # dropout off, as in loss()
    assert grads[0] == {} and set(grads[1]) == {"W", "b"}
    W = backend.to_numpy(model.params[1]["W"]).copy()
    d = rng.normal(size=W.shape)
    h = 1e-6
    losses = []
    for s in (h, -h):
        model.params[1]["W"] = backend.asarray(W + s * d)
        losses.append(float(model.loss(x, y, loss="mse")))
    model.params[1]["W"] = backend.asarray(W)
    np.testing.assert_allclose(np.sum(backend.to_numpy(grads[1]["W"]) * d), (losses[0] - losses[1]) / (2 * h),
                               rtol=1e-6)
    before = float(model.loss(x, y, loss="mse"))
    model.fit(x, y, loss="mse", epochs=20, batch_size=3, progress=False)
    assert float(model.loss(x, y, loss="mse")) < before


def test_mlp_init_applies_to_every_dense_layer():
    m = am.MLP([3, 4, 2], activation="relu", output_activation="sigmoid", init="lecun_normal", backend="numpy")
    assert [layer.init for layer in m.layers if isinstance(layer, am.Dense)] == ["lecun_normal"] * 2
    d = am.MLP([3, 4, 2], activation="relu", output_activation="sigmoid", backend="numpy")
    assert [layer.init for layer in d.layers if isinstance(layer, am.Dense)] == ["he_uniform", "glorot_uniform"]
    one = am.MLP([3, 2], output_activation="sigmoid", backend="numpy")  # no hidden layer: the output's rule
    assert one.layers[0].init == "glorot_uniform"


def test_single_output_bias_gradient_has_bias_shape(backend):
    """Regression: one output unit, batch n -> the bias gradient is (1,), never (n,)."""
    model = am.MLP([3, 4, 1], dtype="float64", seed=0, **backend.model_kwargs())
    rng = np.random.default_rng(1)
    x = backend.asarray(rng.normal(size=(7, 3)))
    y = backend.asarray(rng.normal(size=(7,)))  # (n,) targets for a single output
    _, grads = model.loss_and_grads(x, y, loss="mse")
    assert tuple(grads[-1]["b"].shape) == (1,)
    assert tuple(grads[0]["b"].shape) == (4,)
    # and it is the batch sum of the output gradient: d/db mean((o - y)^2) = 2 mean(o - y)
    o = np_forward(model, backend.to_numpy(x))[:, 0]
    expected = 2 * np.mean(o - backend.to_numpy(y))
    assert backend.to_numpy(grads[-1]["b"])[0] == pytest.approx(expected, rel=1e-10)


def test_follows_input_backend_and_device(backend):
    model = am.MLP([3, 5, 2], seed=3)
    assert model.params is None
    x = backend.asarray(np.ones((4, 3)), dtype=np.float32)
    out = model(x)
    assert backend.same_place(out)
    assert backend.same_place(model.params[0]["W"])
    assert out.dtype == backend.xp.float32
    np.testing.assert_allclose(backend.to_numpy(out), np_forward(model, np.ones((4, 3))), rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_on_every_backend(backend):
    a = am.MLP([4, 6, 2], seed=42, dtype="float64", backend="numpy")
    b = am.MLP([4, 6, 2], seed=42, dtype="float64", **backend.model_kwargs())
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_array_equal(am.to_numpy(pa[k]), backend.to_numpy(pb[k]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inference_matches_reference(backend, dtype):
    model = am.MLP([5, 16, 8, 3], activation="gelu", output_activation="softmax", layer_norm=True,
                   dtype=dtype, seed=7, **backend.model_kwargs())
    rng = np.random.default_rng(2)
    xh = rng.normal(size=(9, 5))
    out = model(backend.asarray(xh, dtype=dtype))
    assert backend.same_place(out)
    tol = 1e-5 if dtype == "float32" else 1e-12
    got = backend.to_numpy(out)
    np.testing.assert_allclose(got, np_forward(model, xh), rtol=tol, atol=tol)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=tol)


def test_inference_keeps_no_caches(backend):
    """model(x) runs forward without keeping caches: the same outputs, bit for bit,
    as a forward that keeps them, and nothing held for a backward pass."""
    model = am.MLP([5, 16, 8, 3], activation="relu", dropout=0.3, layer_norm=True, seed=7,
                   **backend.model_kwargs())
    x = backend.asarray(np.random.default_rng(2).normal(size=(9, 5)), dtype="float32")
    y_kept, caches = model.forward(x, training=False, keep=True)
    y_free, none = model.forward(x, training=False, keep=False)
    assert len(none) == len(caches) == len(model.layers) and all(c is None for c in none)
    assert all(c is not None for c, layer in zip(caches, model.layers) if isinstance(layer, am.Dense))
    np.testing.assert_array_equal(backend.to_numpy(y_free), backend.to_numpy(y_kept))
    np.testing.assert_array_equal(backend.to_numpy(model(x)), backend.to_numpy(y_kept))


def test_inference_peak_memory_is_two_activations():
    """NumPy allocations are traced: a 4-layer net's inference holds at most two
    adjacent activations at a time (and the output), not every activation."""
    import tracemalloc

    n, width = 2000, 500
    model = am.MLP([10, width, width, width, width, 2], seed=0, backend="numpy")
    x = np.random.default_rng(0).normal(size=(n, 10)).astype(np.float32)
    model(x)
    act = n * width * 4
    tracemalloc.start()
    try:
        model(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * act, (peak, act)
    tracemalloc.start()
    try:
        model.forward(x, keep=True)
        _, peak_kept = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_kept > 3.9 * act  # the caches hold all four hidden activations


def test_float64_input_is_cast_to_model_dtype(backend):
    model = am.MLP([2, 3, 1], seed=0, **backend.model_kwargs())
    out = model(backend.asarray(np.ones((2, 2)), dtype=np.float64))
    assert out.dtype == backend.xp.float32


def _random_architecture(seed):
    r = np.random.default_rng(seed)
    depth = int(r.integers(1, 5))
    sizes = [int(r.integers(1, 34)) for _ in range(depth + 2)]
    return sizes, r


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_model_gradients_against_torch(backend, activation):
    """Random architectures (1-4 hidden layers, widths 1-33) against PyTorch autograd."""
    pytest.importorskip("torch")
    sizes, r = _random_architecture(sum(map(ord, activation)))
    for loss, out_act in (("mse", None), ("cross_entropy", "softmax"), ("binary_cross_entropy", "sigmoid")):
        model = am.MLP(sizes, activation=activation, output_activation=out_act, dtype="float64",
                       seed=int(r.integers(1000)), **backend.model_kwargs())
        n = int(r.integers(1, 12))
        xh = r.normal(size=(n, sizes[0]))
        if loss == "cross_entropy":
            yh = r.integers(0, sizes[-1], size=n)
        elif loss == "binary_cross_entropy":
            yh = r.integers(0, 2, size=(n, sizes[-1])).astype(np.float64)
        else:
            yh = r.normal(size=(n, sizes[-1]))
        value, grads = model.loss_and_grads(backend.asarray(xh), backend.asarray(yh), loss=loss, l2=0.01)
        ref_value, ref_grads = torch_loss_and_grads(model, xh, yh, loss, l2=0.01)
        assert float(value) == pytest.approx(ref_value, rel=1e-10, abs=1e-12)
        for g, rg in zip(grads, ref_grads):
            assert set(g) == set(rg)
            for k in g:
                np.testing.assert_allclose(backend.to_numpy(g[k]), rg[k], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("activation", ["relu", "tanh", "elu"])
def test_model_directional_finite_differences(backend, activation):
    model = am.MLP([4, 7, 5, 3], activation=activation, layer_norm=True, dtype="float64", seed=5,
                   **backend.model_kwargs())
    r = np.random.default_rng(9)
    x = backend.asarray(r.normal(size=(6, 4)))
    y = backend.asarray(r.normal(size=(6, 3)))
    _, grads = model.loss_and_grads(x, y, loss="mse")
    xp = backend.xp
    directions = [{k: r.normal(size=tuple(v.shape)) for k, v in p.items()} for p in model.params]
    analytic = sum(float(np.sum(backend.to_numpy(g[k]) * d[k])) for g, d in zip(grads, directions) for k in g)
    original = [dict(p) for p in model.params]
    h = 1e-6
    vals = []
    for sign in (1.0, -1.0):
        model.params = [
            {k: v + sign * h * backend.asarray(d[k]) for k, v in p.items()} for p, d in zip(original, directions)
        ]
        vals.append(float(model.loss(x, y, loss="mse")))
    model.params = original
    assert (vals[0] - vals[1]) / (2 * h) == pytest.approx(analytic, rel=1e-6, abs=1e-9)
    assert xp is model.xp


def test_fused_softmax_cross_entropy_outputs_probabilities(backend):
    model = am.MLP([3, 4, 5], output_activation="softmax", dtype="float64", seed=0, **backend.model_kwargs())
    r = np.random.default_rng(0)
    xh = r.normal(size=(4, 3)) * 50  # large logits: the fused form stays finite
    labels = np.array([0, 4, 2, 1])
    value, grads = model.loss_and_grads(backend.asarray(xh), backend.asarray(labels), loss="cross_entropy")
    assert np.isfinite(float(value))
    # reference: CE from the logits (the model without its softmax)
    sub = am.Sequential(model.layers[:-1], dtype="float64", backend="numpy")
    sub.params = [{k: backend.to_numpy(v) for k, v in p.items()} for p in model.params[:-1]]
    z = np_forward(sub, xh)
    z = z - z.max(1, keepdims=True)
    ref = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(4), labels])
    assert float(value) == pytest.approx(ref, rel=1e-10)
    probs = backend.to_numpy(model(backend.asarray(xh)))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)


def test_ridge_closed_form(backend):
    """A linear network with an L2 penalty, trained by gradient descent to convergence,
    lands on the closed-form ridge solution (the penalty shrinks, it does not zero)."""
    r = np.random.default_rng(0)
    n, d, l2 = 40, 3, 0.5
    xh = r.normal(size=(n, d))
    yh = xh @ np.array([1.5, -2.0, 0.5]) + 0.3 + 0.1 * r.normal(size=n)
    model = am.MLP([d, 1], dtype="float64", seed=0, **backend.model_kwargs())
    x, y = backend.asarray(xh), backend.asarray(yh)
    for _ in range(600):
        _, grads = model.loss_and_grads(x, y, loss="mse", l2=l2)
        model.params = [{k: v - 0.2 * g[k] for k, v in p.items()} for p, g in zip(model.params, grads)]
    # minimise mean((Xw + b - y)^2) + l2/2 |w|^2:  (Xc'Xc + n l2/2 I) w = Xc'yc, b = ym - xm w
    xm, ym = xh.mean(0), yh.mean()
    xc, yc = xh - xm, yh - ym
    w = np.linalg.solve(xc.T @ xc + n * l2 / 2 * np.eye(d), xc.T @ yc)
    b = ym - xm @ w
    np.testing.assert_allclose(backend.to_numpy(model.params[0]["W"])[:, 0], w, rtol=1e-8)
    np.testing.assert_allclose(backend.to_numpy(model.params[0]["b"]), [b], rtol=1e-8)
    assert np.all(np.abs(w) > 0.3)  # not driven to zero


def test_to_and_copy(backend):
    model = am.MLP([3, 4, 2], dtype="float64", seed=1, backend="numpy")
    xh = np.random.default_rng(0).normal(size=(5, 3))
    before = model(xh)
    model.to(backend.name, device=backend.device)
    assert model.xp is backend.xp
    after = model(backend.asarray(xh))
    assert backend.same_place(after)
    np.testing.assert_allclose(backend.to_numpy(after), before, rtol=1e-12)
    c32 = model.copy(dtype="float32")
    assert c32.params[0]["W"].dtype == backend.xp.float32
    assert model.params[0]["W"].dtype == backend.xp.float64
    np.testing.assert_allclose(backend.to_numpy(c32(backend.asarray(xh, dtype=np.float32))), before, rtol=1e-5)


def test_a_copy_has_its_own_layers(backend):
    """A copy is independent down to its layers: switching its dropout off, or replacing
    a layer's forward on it (which also keeps that layer out of fusion), leaves the
    original's layers, and so its training, as they were."""
    rng = np.random.default_rng(0)
    xh, yh = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    x, y = backend.asarray(xh), backend.asarray(yh)
    model = am.MLP([3, 4, 2], dropout=0.5, dtype="float64", seed=1, **backend.model_kwargs())
    twin = model.copy()
    other = model.copy()
    other.layers[2].p = 0.0
    original_forward = other.layers[0].forward
    other.layers[0].forward = lambda params, x, **kw: original_forward(params, 2.0 * x, **kw)
    assert model.layers[2].p == 0.5 and "forward" not in vars(model.layers[0])
    kw = dict(loss="mse", optimizer="sgd", lr=0.1, batch_size=8, epochs=2, progress=False, seed=3)
    model.fit(x, y, **kw)
    twin.fit(x, y, **kw)
    for p, q in zip(model.params, twin.params):
        for k in p:
            np.testing.assert_array_equal(backend.to_numpy(p[k]), backend.to_numpy(q[k]))


def test_to_and_copy_carry_the_optimizer_state(backend):
    """After fit with Adam, `to` moves the moments with the parameters, and `copy` gets
    its own optimiser: training the copy leaves the original's state alone, and both
    continue exactly as an uninterrupted NumPy run."""
    rng = np.random.default_rng(0)
    xh, yh = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    kw = dict(loss="mse", optimizer="adam", lr=0.01, batch_size=8, shuffle=False, progress=False)

    def fitted():
        m = am.MLP([3, 4, 2], dtype="float64", seed=1, backend="numpy")
        m.fit(xh, yh, epochs=2, **kw)
        return m

    ref = fitted()
    ref.partial_fit(xh, yh, batch_size=8, shuffle=False)
    want = [{k: np.asarray(v) for k, v in p.items()} for p in ref.params]

    moved = fitted().to(backend.name, device=backend.device)
    moved.partial_fit(backend.asarray(xh), backend.asarray(yh), batch_size=8, shuffle=False)
    for p, w in zip(moved.params, want):
        for k in p:
            assert backend.same_place(p[k])
            np.testing.assert_allclose(backend.to_numpy(p[k]), w[k], rtol=1e-12, atol=1e-14)

    original = fitted()
    steps = original.optimizer_.step_count
    twin = original.copy(backend=backend.name, device=backend.device)
    assert twin.optimizer_ is not original.optimizer_
    twin.partial_fit(backend.asarray(xh), backend.asarray(yh), batch_size=8, shuffle=False)
    assert original.optimizer_.step_count == steps and twin.optimizer_.step_count == steps + 2
    original.partial_fit(xh, yh, batch_size=8, shuffle=False)
    for p, q, w in zip(original.params, twin.params, want):
        for k in p:
            np.testing.assert_array_equal(np.asarray(p[k]), w[k])
            np.testing.assert_allclose(backend.to_numpy(q[k]), w[k], rtol=1e-12, atol=1e-14)


def test_copy_and_to_continue_the_dropout_stream(backend):
    """A copy (and a model moved to where it already is) draws the same dropout masks
    as the original would: training both gives identical parameters."""
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(size=(24, 4)))
    y = backend.asarray(rng.normal(size=(24, 2)))
    for seed in (1, None):
        m = am.MLP([4, 16, 2], dropout=0.3, dtype=backend.float_dtype(), seed=seed, **backend.model_kwargs())
        m.fit(x, y, loss="mse", epochs=1, batch_size=8, progress=False)
        twin, moved = m.copy(), m.copy()
        moved.to(backend.name, device=backend.device)
        for model in (m, twin, moved):
            model.partial_fit(x, y, batch_size=8)
        for other in (twin, moved):
            for p, q in zip(m.params, other.params):
                for k in p:
                    np.testing.assert_array_equal(backend.to_numpy(q[k]), backend.to_numpy(p[k]))


def test_dropout_masks_are_the_same_on_every_backend(backend):
    """One seed, one sequence of dropout masks, whatever the backend: the training
    forward passes of a NumPy model and of this row's model zero the same entries."""
    x_np = np.random.default_rng(5).normal(size=(16, 6)) + 3.0  # positive: ReLU keeps them
    dtype = backend.float_dtype()  # float32 on JAX's 32-bit mode
    scale = float(np.asarray(1 / 0.6, dtype=dtype))
    models = [am.MLP([6, 32, 32, 3], activation="relu", dropout=0.4, dtype=dtype, seed=9, **kw)
              for kw in ({"backend": "numpy"}, backend.model_kwargs())]
    for _ in range(3):  # three draws each: the counters advance alike
        xs = (x_np.astype(dtype), backend.asarray(x_np.astype(dtype)))
        caches = [m.forward(x, training=True)[1] for m, x in zip(models, xs)]
        masks = [[am.to_numpy(c) for c in cs if c is not None and tuple(c.shape) == (16, 32)
                  and set(np.unique(am.to_numpy(c)).tolist()) <= {0.0, scale}] for cs in caches]
        assert len(masks[0]) == len(masks[1]) == 2
        for a, b in zip(*masks):
            np.testing.assert_array_equal(a, b)
            assert 0.4 * a.size / 2 < (a == 0).sum() < 0.4 * a.size * 2
    assert models[0].rng.counter == models[1].rng.counter == 6


def test_copy_and_to_another_backend_continue_the_dropout_stream(backend):
    """A NumPy model copied (or moved) to this row's backend draws the masks the
    original draws next: the next epoch of training gives the same parameters."""
    rng = np.random.default_rng(1)
    x_np, y_np = rng.normal(size=(24, 4)), rng.normal(size=(24, 2))
    m = am.MLP([4, 16, 2], dropout=0.3, dtype="float64", seed=4, backend="numpy")
    m.fit(x_np, y_np, loss="mse", epochs=1, batch_size=8, progress=False)
    twin, moved = m.copy(**backend.model_kwargs()), m.copy()
    moved.to(backend.name, device=backend.device)
    assert twin.rng.counter == moved.rng.counter == m.rng.counter == 3
    m.partial_fit(x_np, y_np, batch_size=8)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    for other in (twin, moved):
        other.partial_fit(x, y, batch_size=8)
        assert other.rng.counter == m.rng.counter == 6
        for p, q in zip(m.params, other.params):
            for k in p:
                np.testing.assert_allclose(backend.to_numpy(q[k]), p[k], rtol=1e-12, atol=1e-14)


def test_repr_lists_layers_and_counts():
    model = am.MLP([64, 128, 10], output_activation="softmax", backend="numpy")
    text = repr(model)
    assert "Dense(64 -> 128)" in text and "Activation('relu')" in text and "Activation('softmax')" in text
    assert "8,320 params" in text and "1,290 params" in text
    assert "total 9,610 params" in text and "backend=numpy" in text
    assert model.n_params == 64 * 128 + 128 + 128 * 10 + 10


# --------------------------------------------------------------------------- errors
def _model(backend):
    return am.MLP([3, 4, 2], seed=0, **backend.model_kwargs())


def test_error_wrong_rank(backend):
    with pytest.raises(ValueError, match=r"x must be 2-D .* got shape \(3,\).*reshape"):
        _model(backend)(backend.asarray(np.ones(3), dtype=np.float32))


def test_error_wrong_feature_count(backend):
    with pytest.raises(ValueError, match="x has 5 features but the model expects 3"):
        _model(backend)(backend.asarray(np.ones((2, 5)), dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite(backend, bad):
    xh = np.ones((2, 3), dtype=np.float32)
    xh[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        _model(backend)(backend.asarray(xh))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_error_integer_or_bool_x(backend, dtype):
    with pytest.raises(TypeError, match=r"floating-point array is required .*astype"):
        _model(backend)(backend.asarray(np.ones((2, 3)), dtype=dtype))


def test_error_empty_batch(backend):
    with pytest.raises(ValueError, match="x is empty"):
        _model(backend)(backend.asarray(np.ones((0, 3)), dtype=np.float32))


def test_error_labels_outside_classes(backend):
    model = am.MLP([3, 4, 2], output_activation="softmax", seed=0, **backend.model_kwargs())
    x = backend.asarray(np.ones((3, 3)), dtype=np.float32)
    with pytest.raises(ValueError, match="label"):
        model.loss_and_grads(x, backend.asarray(np.array([0, 1, 2])), loss="cross_entropy")


def test_error_unknown_names():
    with pytest.raises(ValueError, match="unknown activation 'rellu'; known activations: identity, relu"):
        am.MLP([2, 2], activation="rellu")
    with pytest.raises(ValueError, match="unknown loss 'mae2'.*mse"):
        am.MLP([2, 2], backend="numpy").loss_and_grads(np.ones((1, 2)), np.ones((1, 2)), loss="mae2")
    with pytest.raises(ValueError, match="unknown initializer 'he'.*he_uniform"):
        am.Dense(2, 2, init="he")
    with pytest.raises(ValueError, match="unknown backend 'jax2'.*numpy"):
        am.MLP([2, 2], backend="jax2")


def test_error_mixed_backends(backend):
    if backend.name == "numpy":
        other = am.MLP([3, 4, 2], backend="array_api_strict", seed=0)
        msg = r"x is a numpy array but the model's parameters are array_api_strict arrays.*to_backend"
    else:
        other = am.MLP([3, 4, 2], backend="numpy", seed=0)
        name = backend_name(backend.xp)
        msg = rf"x is a {name} array but the model's parameters are numpy arrays.*to_backend"
    with pytest.raises(TypeError, match=msg):
        other(backend.asarray(np.ones((2, 3)), dtype=np.float32))


def test_error_mixed_devices():
    import array_api_strict as s

    model = am.MLP([3, 4, 2], backend="array_api_strict", device=s.Device("device1"), seed=0)
    x = s.asarray(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x is on device .*CPU_DEVICE.* but the model's parameters are on .*device1"):
        model(x)


# ---------------------------------------------------------------- fit's signature, one source
@pytest.mark.parametrize("name", ["fit", "partial_fit", "evaluate"])
def test_training_methods_show_the_training_functions_signature_and_docs(name):
    """``model.fit`` (and partial_fit, evaluate) is ``arraymlp.training.fit`` with the
    model bound: help() and editors see every parameter, taken from that one function."""
    import inspect

    from arraymlp import training

    fn = getattr(training, name)
    want = inspect.signature(fn)
    params = list(want.parameters.values())
    assert params[0].name == "model"
    model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    for cls in (am.Sequential, am.MLP):
        got = inspect.signature(getattr(cls, name))
        assert got == want.replace(parameters=[params[0].replace(name="self"), *params[1:]])
    assert inspect.signature(getattr(model, name)) == want.replace(parameters=params[1:])
    doc = inspect.getdoc(getattr(model, name))
    assert doc == inspect.getdoc(fn)
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    documented = {line.split(" : ")[0] for line in section.splitlines() if line and not line[0].isspace()}
    assert documented == set(want.parameters)  # every parameter has its entry
    # and the bound method is that function: the same call, the same result
    x, y = np.linspace(-1, 1, 8).reshape(4, 2), np.arange(4.0).reshape(4, 1)
    twin = model.copy()
    kwargs = {} if name == "evaluate" else {"lr": 0.1, "batch_size": 2}
    if name == "fit":
        kwargs.update(epochs=2, progress=False)
    a, b = getattr(model, name)(x, y, **kwargs), fn(twin, x, y, **kwargs)
    if name == "evaluate":
        assert a == b and set(a) == {"loss", "r2"}
    else:
        assert a.loss == b.loss and len(a.loss) == (2 if name == "fit" else 1)
        for p, q in zip(model.params, twin.params):
            for k in p:
                np.testing.assert_array_equal(p[k], q[k])


def test_fit_signature_has_no_private_parameters():
    import inspect

    assert not [p for p in inspect.signature(am.MLP([2, 1]).fit).parameters if p.startswith("_")]


# ----------------------------------------------------------------- the default loss
def test_loss_defaults_to_the_models_own_loss(backend):
    """model.loss and loss_and_grads without loss= use the loss of the last fit (else the
    one fit infers), never a squared error the model was not trained on: the values are
    the cross-entropy and binary cross-entropy computed in NumPy from the probabilities,
    for class labels and one-hot targets alike."""
    backend.skip_without_float64()
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, 30)
    x = backend.asarray(x_np)
    kw = dict(epochs=2, lr=0.1, progress=False)

    clf = am.MLP([4, 8, 3], output_activation="softmax", dtype="float64", seed=0, **backend.model_kwargs())
    p = backend.to_numpy(clf.predict_proba(x))
    ce = -np.mean(np.log(p[np.arange(30), labels]))  # before any fit: inferred from the softmax output
    assert float(clf.loss(x, backend.asarray(labels))) == pytest.approx(ce, rel=1e-12)
    clf.fit(x, backend.asarray(labels), loss="cross_entropy", **kw)
    p = backend.to_numpy(clf.predict_proba(x))
    ce = -np.mean(np.log(p[np.arange(30), labels]))
    for y in (backend.asarray(labels), backend.asarray(np.eye(3)[labels])):
        assert float(clf.loss(x, y)) == pytest.approx(ce, rel=1e-12)
        value, grads = clf.loss_and_grads(x, y)
        want, want_grads = clf.loss_and_grads(x, y, loss="cross_entropy")
        assert float(value) == pytest.approx(ce, rel=1e-12)
        for g, w in zip(grads, want_grads):
            for k in g:
                np.testing.assert_array_equal(backend.to_numpy(g[k]), backend.to_numpy(w[k]))
    mse = np.mean((p - np.eye(3)[labels]) ** 2)  # what the old default reported
    assert float(clf.loss(x, backend.asarray(np.eye(3)[labels]), loss="mse")) == pytest.approx(mse, rel=1e-12)

    binary = (labels > 0).astype(np.float64)
    bin_clf = am.MLP([4, 8, 1], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
    bin_clf.fit(x, backend.asarray(binary), **kw)
    q = backend.to_numpy(bin_clf.predict_proba(x))[:, 0]
    bce = -np.mean(binary * np.log(q) + (1 - binary) * np.log(1 - q))
    assert float(bin_clf.loss(x, backend.asarray(binary))) == pytest.approx(bce, rel=1e-10)

    reg = am.MLP([4, 8, 2], dtype="float64", seed=0, **backend.model_kwargs())
    t = rng.normal(size=(30, 2))
    out = backend.to_numpy(reg(x))
    assert float(reg.loss(x, backend.asarray(t))) == pytest.approx(np.mean((out - t) ** 2), rel=1e-12)
    with pytest.raises(ValueError, match="cannot tell which loss to use.*pass loss="):
        reg.loss(x, backend.asarray(labels[:, None]))

    ens = am.MLP([4, 8, 3], output_activation="softmax", ensemble=2, dtype="float64", seed=0, **backend.model_kwargs())
    ens.fit(x, backend.asarray(labels), **kw)
    members = backend.to_numpy(ens.predict_proba(x, reduce=None))
    onehot = backend.asarray(np.eye(3)[labels])
    want = sum(-np.mean(np.log(m[np.arange(30), labels])) for m in members)
    assert float(ens.loss(x, onehot)) == pytest.approx(want, rel=1e-12)
    assert float(ens.loss_and_grads(x, onehot)[0]) == pytest.approx(want, rel=1e-12)
    # an ensemble's fit infers its loss as fit does (a softmax output with one-hot targets: cross-entropy)
    ens2 = am.MLP([4, 8, 3], output_activation="softmax", ensemble=2, dtype="float64", seed=0,
                  **backend.model_kwargs())
    ens2.fit(x, onehot, **kw)
    assert ens2.loss_ == "cross_entropy"
