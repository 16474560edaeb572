"""Out-of-core inference on Dask arrays: lazy, block by block, weights sent once."""

from __future__ import annotations

import importlib.util
import pickle
import tracemalloc

import numpy as np
import pytest

import arraymlp as am

da = pytest.importorskip("dask.array", reason="needs dask (pip install 'arraymlp[dask]')")
import dask  # noqa: E402

from arraymlp._dask import _InferenceModel  # noqa: E402

N_ROWS = 2_000_000
CHUNK = 50_000
N_FEATURES = 8


def _classifier(**kwargs):
    return am.MLP([N_FEATURES, 16, 3], output_activation="softmax", backend="numpy", seed=0, **kwargs)


def _rows(n, chunk, seed=0, dtype=np.float32):
    return da.random.default_rng(seed).random((n, N_FEATURES), chunks=(chunk, N_FEATURES), dtype=dtype)


def _gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# ----------------------------------------------------------------------------- without a cluster
def test_lazy_results_equal_in_memory_predictions():
    model = _classifier()
    x = _rows(10_000, 1_000)
    with dask.config.set(scheduler="threads"):
        xs = x.compute()
        pred, proba, out = model.predict(x), model.predict_proba(x), model(x)
        assert isinstance(pred, da.Array) and isinstance(proba, da.Array) and isinstance(out, da.Array)
        assert pred.shape == (10_000,) and pred.dtype == np.int64 and pred.chunks == ((1_000,) * 10,)
        assert proba.shape == out.shape == (10_000, 3) and proba.dtype == np.float32
        np.testing.assert_array_equal(pred.compute(), model.predict(xs))
        np.testing.assert_allclose(proba.compute(), model.predict_proba(xs), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out.compute(), model(xs), rtol=1e-6, atol=1e-7)


def test_weights_are_one_graph_node():
    model = am.MLP([N_FEATURES, 256, 256, 3], output_activation="softmax", backend="numpy", seed=0)
    weight_bytes = sum(a.nbytes for p in model.params for a in p.values())
    x = _rows(100_000, 1_000)  # 100 blocks
    pred = model.predict(x)
    graph = dict(pred.__dask_graph__())
    holders = [k for k in graph if isinstance(k, str) and k.startswith("arraymlp-model-")]
    assert len(holders) == 1
    # every block task refers to that key instead of carrying the weights
    blocks = [v for k, v in graph.items() if isinstance(k, tuple) and k[0] == pred.name]
    assert len(blocks) == 100
    assert all(holders[0] in v.dependencies for v in blocks)
    assert max(len(pickle.dumps(v)) for v in blocks) < 2_000 < weight_bytes
    assert len(pickle.dumps(graph[holders[0]])) > weight_bytes


def test_weights_are_taken_when_the_lazy_array_is_built():
    model = _classifier()
    x = _rows(2_000, 500)
    xs = x.compute()
    before = model.predict_proba(xs)
    lazy = model.predict_proba(x)
    model.fit(xs, model.predict(xs), loss="cross_entropy", epochs=1, progress=False)  # changes the weights
    assert not np.allclose(model.predict_proba(xs), before)
    with dask.config.set(scheduler="threads"):
        np.testing.assert_allclose(lazy.compute(), before, rtol=1e-6, atol=1e-7)


def test_regressor_multilabel_and_column_chunks():
    x = da.random.default_rng(1).random((3_000, N_FEATURES), chunks=(700, 3), dtype=np.float64)
    xs = x.compute()
    reg = am.MLP([N_FEATURES, 8, 2], backend="numpy", seed=1)
    multi = am.MLP([N_FEATURES, 8, 4], output_activation="sigmoid", backend="numpy", seed=2)
    with dask.config.set(scheduler="sync"):
        r = reg.predict(x)
        assert r.shape == (3_000, 2) and r.dtype == np.float32 and r.chunks[0] == x.chunks[0]
        np.testing.assert_allclose(r.compute(), reg.predict(xs), rtol=1e-6, atol=1e-6)
        m = multi.predict(x)
        assert m.shape == (3_000, 4) and m.dtype == np.int64
        np.testing.assert_array_equal(m.compute(), multi.predict(xs))


def test_bad_inputs_are_reported_up_front():
    model = _classifier()
    with pytest.raises(ValueError, match="x has 4 features but the model expects 8"):
        model.predict(da.zeros((10, 4), chunks=5, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        model.predict(da.zeros((10,), chunks=5, dtype=np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        model.predict(da.zeros((10, N_FEATURES), chunks=5, dtype=np.int32))
    regressor = am.MLP([N_FEATURES, 4, 1], backend="numpy", seed=0)
    with pytest.raises(ValueError, match="predict_proba needs a classifier"):
        regressor.predict_proba(da.zeros((10, N_FEATURES), chunks=5, dtype=np.float32))


def test_backend_mismatch_names_both():
    pytest.importorskip("torch")
    model = am.MLP([N_FEATURES, 4, 3], output_activation="softmax", backend="torch", seed=0)
    with pytest.raises(
        TypeError, match=r"numpy blocks but the model's parameters are torch.*model.copy\(backend='numpy'\)"
    ):
        model.predict(da.zeros((10, N_FEATURES), chunks=5, dtype=np.float32))


def test_empty_blocks():
    model = _classifier()
    x = _rows(1_000, 250)
    x = x[x[:, 0] > 2.0]  # no row passes: blocks of unknown, in fact zero, length
    with dask.config.set(scheduler="sync"):
        out = model.predict_proba(x).compute()
    assert out.shape == (0, 3)


# ----------------------------------------------------------------------------- on a LocalCluster
def _start_tracing():
    tracemalloc.start()
    tracemalloc.reset_peak()


def _traced_peak():
    return tracemalloc.get_traced_memory()[1]


def _loads():
    return _InferenceModel.loads


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed (pip install 'arraymlp[dask]')")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                 memory_limit="1GiB") as cluster,
        distributed.Client(cluster) as c,
    ):
        c.wait_for_workers(2)
        yield c


def test_two_million_rows_on_a_local_cluster(client):
    model = _classifier()
    x = _rows(N_ROWS, CHUNK)
    client.run(_start_tracing)
    pred = model.predict(x)
    proba = model.predict_proba(x)

    # the weights were scattered once, up front, and the graph only refers to them
    assert not any(str(k).startswith("arraymlp-model-") for k in dict(pred.__dask_graph__()))
    held = {k: v for k, v in client.who_has().items() if k.startswith("arraymlp-model-")}
    assert len(held) == 1 and len(next(iter(held.values()))) >= 1

    counts, worst = dask.compute(da.bincount(pred, minlength=3), da.max(da.abs(proba.sum(axis=1) - 1.0)))
    assert counts.sum() == N_ROWS and (counts > 0).sum() >= 2
    assert worst < 1e-5

    peaks = client.run(_traced_peak)
    peak = max(peaks.values())
    print(f"peak traced memory per worker: {', '.join(f'{v / 2**20:.1f} MiB' for v in peaks.values())}")
    full = N_ROWS * N_FEATURES * 4
    # a worker holds a few blocks (3.2 MB of rows, 3.2 MB of hidden units each), never the data set
    assert peak < full / 2, f"worker peak {peak / 2**20:.1f} MiB for {full / 2**20:.1f} MiB of rows"

    # 80 block tasks, but each worker unpickled the model once, or twice when dask's
    # active memory manager dropped the broadcast replica and the worker fetched it again
    loads = client.run(_loads)
    assert all(1 <= n <= 2 for n in loads.values()), loads

    # equal to in-memory predictions on slices: across a block boundary and at the end
    for lo, hi in [(CHUNK - 1_000, CHUNK + 1_000), (N_ROWS - 3_000, N_ROWS)]:
        xs = x[lo:hi].compute()
        np.testing.assert_array_equal(pred[lo:hi].compute(), model.predict(xs))
        np.testing.assert_allclose(proba[lo:hi].compute(), model.predict_proba(xs), rtol=1e-6, atol=1e-7)


def test_another_scheduler_while_a_client_exists(client):
    model = _classifier()
    x = _rows(20_000, 5_000)
    with dask.config.set(scheduler="threads"):
        pred = model.predict(x)  # built for the threaded scheduler: a delayed node, no future
        assert sum(str(k).startswith("arraymlp-model-") for k in dict(pred.__dask_graph__())) == 1
        np.testing.assert_array_equal(pred.compute(), model.predict(x.compute()))


# ----------------------------------------------------------------------------- CuPy blocks
@pytest.mark.skipif(not _gpu(), reason="needs CuPy and a CUDA GPU")
def test_cupy_blocks():
    import cupy

    model = _classifier()
    gpu_model = model.copy(backend="cupy")
    x = _rows(20_000, 5_000)
    xg = x.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype=cupy.float32))
    with dask.config.set(scheduler="threads"):
        pred = gpu_model.predict(xg)
        assert isinstance(pred._meta, cupy.ndarray)
        got = pred.compute()
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(got), model.predict(x.compute()))


@pytest.mark.skipif(not _gpu() or importlib.util.find_spec("dask_cuda") is None,
                    reason="needs CuPy, a CUDA GPU and dask-cuda")
def test_cupy_blocks_on_a_local_cuda_cluster():
    import cupy
    import distributed
    from dask_cuda import LocalCUDACluster

    model = _classifier()
    gpu_model = model.copy(backend="cupy")
    x = _rows(200_000, 20_000)
    xg = x.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype=cupy.float32))
    with LocalCUDACluster(dashboard_address=None) as cluster, distributed.Client(cluster):
        proba = gpu_model.predict_proba(xg)
        got = cupy.asnumpy(proba[:30_000].compute())
    np.testing.assert_allclose(got, model.predict_proba(x[:30_000].compute()), rtol=1e-5, atol=1e-6)


def test_lazy_predict_of_a_binary_model_has_the_eager_form():
    """A one-output sigmoid model fitted on (n,) boolean labels: the lazy predict gives
    (n,) booleans, as the eager one does, block by block."""
    r = np.random.default_rng(0)
    x = r.normal(size=(50, 3))
    y = x[:, 0] + 0.3 * r.normal(size=50) > 0
    model = am.MLP([3, 4, 1], output_activation="sigmoid", dtype="float64", seed=0, backend="numpy")
    model.fit(x, y, epochs=2, batch_size=8, progress=False)
    lazy = model.predict(da.from_array(x, chunks=(16, 3)))
    assert lazy.shape == (50,) and lazy.dtype == np.bool_
    got = lazy.compute()
    assert got.shape == (50,) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, model.predict(x))


# ----------------------------------------------------------------------------- ensembles
def test_an_ensembles_lazy_results_equal_its_in_memory_ones():
    """model(x) is (K, n, m), chunked by rows behind one member chunk; predict and
    predict_proba average the members within each block (or keep them, reduce=None)."""
    k = 4
    rng = np.random.default_rng(0)
    model = am.MLP([N_FEATURES, 16, 3], ensemble=k, backend="numpy", seed=0)
    xt = rng.normal(size=(64, N_FEATURES)).astype(np.float32)
    model.fit(xt, rng.integers(0, 3, size=64), loss="cross_entropy", lr=[1e-3, 1e-2, 3e-2, 1e-1], epochs=2,
              progress=False)  # logits: the probabilities are the softmax's
    x = _rows(5_000, 1_000)
    with dask.config.set(scheduler="threads"):
        xs = x.compute()
        out, proba, members = model(x), model.predict_proba(x), model.predict_proba(x, reduce=None)
        pred, labels = model.predict(x), model.predict(x, reduce=None)
        assert out.shape == members.shape == (k, 5_000, 3) and out.chunks == ((k,), (1_000,) * 5, (3,))
        assert proba.shape == (5_000, 3) and proba.chunks == ((1_000,) * 5, (3,))
        assert pred.shape == (5_000,) and pred.dtype == np.int64 and labels.shape == (k, 5_000)
        np.testing.assert_allclose(out.compute(), model(xs), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(proba.compute(), model.predict_proba(xs), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(members.compute(), model.predict_proba(xs, reduce=None), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(pred.compute(), model.predict(xs))
        np.testing.assert_array_equal(labels.compute(), model.predict(xs, reduce=None))
        # the members' mean, computed here from the members' own plain models
        mean = np.mean([model.member(i).predict_proba(xs) for i in range(k)], axis=0)
        np.testing.assert_allclose(proba.compute(), mean, rtol=1e-5, atol=1e-6)


def test_an_ensemble_regressor_and_empty_blocks():
    k = 3
    model = am.MLP([N_FEATURES, 8, 2], ensemble=k, dtype="float64", backend="numpy", seed=1)
    x = _rows(40, 10, dtype=np.float64)
    x = x[x[:, 0] > 0.7]  # blocks of unknown length, some of them empty
    with dask.config.set(scheduler="sync"):
        xs = x.compute()
        pred, per = model.predict(x), model.predict(x, reduce=None)
        n = xs.shape[0]
        assert 0 < n < 40 and pred.dtype == np.float64
        assert pred.compute().shape == (n, 2) and per.compute().shape == (k, n, 2)
        empty = x[x[:, 0] > 2.0]  # every block empty
        assert model(empty).compute().shape == (k, 0, 2) and model.predict(empty).compute().shape == (0, 2)
        np.testing.assert_allclose(pred.compute(), np.mean([model.member(i)(xs) for i in range(k)], axis=0),
                                   rtol=1e-13)
        np.testing.assert_allclose(per.compute(), model(xs), rtol=1e-13)
        with pytest.raises(ValueError, match="predict_proba needs a classifier"):
            model.predict_proba(x)
        with pytest.raises(ValueError, match="reduce must be 'mean'"):
            model.predict(x, reduce="max")
