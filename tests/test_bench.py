"""The benchmark machinery on tiny sizes: values, never times."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

import arraymlp as am
from arraymlp import bench
from arraymlp.losses import get_loss
from arraymlp.optim import SGD

TINY = bench.Workload("T1", "tiny training step", "train", (5, 4, 3), (6,), quick_batches=(2, 6))
TINY_INFER = bench.Workload("T2", "tiny inference", "infer", (5, 4, 3), (6,))
CPU_TARGETS = [t for t in bench.available_targets() if not bench.TARGETS[t].gpu]


# ----------------------------------------------------------------------------- GEMM floor
def test_floor_products_of_a_training_step():
    prods = bench.gemm_floor_products((5, 4, 3, 2), 7, "train")
    shapes = [(a, b) for _, a, b in prods]
    # L = 3 layers: 3 forward, 3 weight-gradient and 2 input-gradient products
    assert len(prods) == 3 + 3 + 2
    assert shapes[:3] == [((7, 5), (5, 4)), ((7, 4), (4, 3)), ((7, 3), (3, 2))]
    weight_grads = [(a, b) for label, a, b in prods if label.startswith("x") and ".T @ dy" in label]
    input_grads = [(a, b) for label, a, b in prods if label.startswith("dy") and label.endswith(".T")]
    assert sorted(weight_grads) == sorted([((5, 7), (7, 4)), ((4, 7), (7, 3)), ((3, 7), (7, 2))])
    assert sorted(input_grads) == sorted([((7, 2), (2, 3)), ((7, 3), (3, 4))])
    # every product chains: inner dimensions agree
    assert all(a[1] == b[0] for a, b in shapes)


def test_floor_products_of_inference():
    prods = bench.gemm_floor_products((5, 4, 3, 2), 7, "infer")
    assert [(a, b) for _, a, b in prods] == [((7, 5), (5, 4)), ((7, 4), (4, 3)), ((7, 3), (3, 2))]


@pytest.mark.parametrize("name, count", [("W1", 3 + 3 + 2), ("W2", 2 + 2 + 1), ("W3", 3),
                                         ("W4", 3 + 3 + 2), ("W5", 5 + 5 + 4)])
def test_floor_product_counts_of_the_workloads(name, count):
    wl = bench.WORKLOADS[name]
    assert len(bench.gemm_floor_products(wl.sizes, 8, wl.kind)) == count


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("kind", ["train", "infer"])
def test_floor_runs_exactly_its_products(target, kind):
    seen = []

    def matmul(a, b):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return a @ b

    fn = bench.make_gemm_floor(target, (5, 4, 3, 2), 7, kind, matmul=matmul)
    assert seen == []  # building it multiplies nothing
    fn()
    assert seen == [(a, b) for _, a, b in bench.gemm_floor_products((5, 4, 3, 2), 7, kind)]
    fn()
    assert len(seen) == 2 * (8 if kind == "train" else 3)


def test_floor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'train' or 'infer'"):
        bench.gemm_floor_products((3, 2), 4, "step")


# ----------------------------------------------------------------------------- statistics
def test_summarize_values():
    s = bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "iqr": 2.0, "min": 1.0, "max": 5.0, "n": 5}
    one = bench.summarize([0.25])
    assert (one["median"], one["q1"], one["q3"], one["iqr"]) == (0.25, 0.25, 0.25, 0.0)
    with pytest.raises(ValueError):
        bench.summarize([])


def test_ratios_from_given_medians():
    medians = {"arraymlp[numpy]": 2.0, "floor[numpy]": 1.0, "torch[cpu]": 4.0, "sklearn": 8.0}
    roles = {"arraymlp[numpy]": ("ours", "numpy"), "floor[numpy]": ("floor", "numpy"),
             "torch[cpu]": ("peer", "cpu"), "sklearn": ("peer", "cpu")}
    r = bench.compute_ratios(medians, roles)
    assert r["arraymlp[numpy]"] == {"floor": 2.0, "torch[cpu]": 0.5, "sklearn": 0.25}
    assert r["floor[numpy]"] == {"floor": 1.0, "torch[cpu]": 0.25, "sklearn": 0.125}
    assert r["sklearn"] == {"floor": 8.0, "torch[cpu]": 2.0, "sklearn": 1.0}


def test_each_target_is_compared_with_its_own_floor():
    medians = {"arraymlp[numpy]": 3.0, "floor[numpy]": 2.0, "arraymlp[torch]": 3.0, "floor[torch]": 1.5}
    roles = {"arraymlp[numpy]": ("ours", "numpy"), "floor[numpy]": ("floor", "numpy"),
             "arraymlp[torch]": ("ours", "torch"), "floor[torch]": ("floor", "torch")}
    r = bench.compute_ratios(medians, roles)
    assert r["arraymlp[numpy]"]["floor"] == 1.5
    assert r["arraymlp[torch]"]["floor"] == 2.0


def _case(times):
    rows = []
    roles = {"arraymlp[numpy]": ("ours", "numpy"), "floor[numpy]": ("floor", "numpy"),
             "torch[cpu]": ("peer", "cpu")}
    for name, ts in times.items():
        s = bench.summarize(ts)
        rows.append({"name": name, "role": roles[name][0], "target": roles[name][1], "times": ts, **s,
                     "samples_per_s": 256 / s["median"]})
    ratios = bench.compute_ratios({r["name"]: r["median"] for r in rows}, roles)
    return {"workload": "W1", "title": "training step", "kind": "train", "arch": "784-512-512-10", "batch": 256,
            "dtype": "float32", "device": "cpu", "candidates": rows, "ratios": ratios}


def test_table_shows_medians_spreads_and_ratios():
    case = _case({"arraymlp[numpy]": [0.011, 0.010, 0.013], "floor[numpy]": [0.010, 0.009, 0.008],
                  "torch[cpu]": [0.020, 0.025, 0.015]})
    table = bench.format_table([case])
    lines = table.splitlines()
    assert lines[0].startswith("W1") and "batch 256" in lines[0] and "float32" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["candidate", "median"]
    assert header[-4:] == ["x", "floor", "x", "torch[cpu]"]
    ours = next(line for line in lines if line.strip().startswith("arraymlp[numpy]")).split()
    # median 11 ms; floor median 9 ms -> 11/9; torch median 20 ms -> 0.55
    assert ours[1:3] == ["11.000", "ms"]
    assert ours[-2:] == [f"{11 / 9:.3f}", "0.550"]
    # spread: the quartiles of the three samples
    assert "10.500 ms - 12.000 ms" in next(line for line in lines if "arraymlp[numpy]" in line)
    # samples/s = batch / median
    assert "23.3k" in next(line for line in lines if "arraymlp[numpy]" in line)
    floor = next(line for line in lines if line.strip().startswith("floor[numpy]")).split()
    assert floor[-2:] == ["1.000", "0.450"]


def test_table_ends_with_a_legend_of_the_ratio_columns():
    case = _case({"arraymlp[numpy]": [0.011, 0.010, 0.013], "floor[numpy]": [0.010, 0.009, 0.008],
                  "torch[cpu]": [0.020, 0.025, 0.015]})
    lines = bench.format_table([case], spread_limit=math.inf).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ratio columns"))
    assert "below 1 is faster" in lines[start]
    legend = [line.split(":")[0].strip() for line in lines[start + 1:]]
    assert legend == ["x floor", "x torch[cpu]"]  # one line per ratio column of the table, in its order
    assert bench.ratio_legend([]) == []
    assert not any(line.startswith("warning") for line in lines)


def test_table_warns_when_a_spread_makes_ratios_unreliable():
    # arraymlp: quartiles 10.5 and 12 ms of a median of 11 ms: 0.136; floor: 8.5 and 9.5 of 9 ms: 0.111;
    # torch: 7, 20, 128 ms -> quartiles 13.5 and 74 ms of a median of 20 ms: 3.025, noisy
    case = _case({"arraymlp[numpy]": [0.011, 0.010, 0.013], "floor[numpy]": [0.010, 0.009, 0.008],
                  "torch[cpu]": [0.007, 0.020, 0.128]})
    warnings = bench.spread_warnings([case], limit=0.2)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: W1 batch 256 float32: torch[cpu] spread (IQR / median) ")
    assert "(IQR / median) 3.0" in warnings[0] and "> 0.20" in warnings[0]
    assert "--threads 1" in warnings[0]
    assert len(bench.spread_warnings([case], limit=0.12)) == 2  # arraymlp's 0.136 too, not the floor's 0.111
    table = bench.format_table([case])
    assert table.splitlines()[-len(warnings):] == warnings
    assert bench.spread_warnings([case], limit=4.0) == []


def test_crossover_batch():
    cpu = {16: 100.0, 256: 1000.0, 4096: 5000.0, 65536: 6000.0}
    assert bench.crossover_batch(cpu, {16: 10.0, 256: 1200.0, 4096: 9000.0, 65536: 90000.0}) == 256
    # ahead at 16, behind at 256: it overtakes for good only from 4096
    assert bench.crossover_batch(cpu, {16: 200.0, 256: 900.0, 4096: 9000.0, 65536: 90000.0}) == 4096
    assert bench.crossover_batch(cpu, {16: 1.0, 256: 1.0, 4096: 1.0, 65536: 1.0}) is None
    assert bench.crossover_batch(cpu, {}) is None


def test_interleaved_rounds_alternate_candidates():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved(fns, repeat=3, warmup=1, min_time=0.0, settle=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    # warm-up and calibration (2 calls each), then a b a b a b
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_groups_runtimes_and_settles_after_a_switch():
    stamps = {"a": [], "b": [], "c": []}
    order = []  # every call in sequence: rounds are read from it, not from time gaps (load-proof)

    def record(k):
        order.append(k)
        stamps[k].append(time.perf_counter())

    fns = {k: (lambda k=k: record(k)) for k in stamps}
    groups = {"a": "numpy", "b": "torch-cpu", "c": "numpy"}
    bench.interleaved(fns, repeat=3, warmup=1, min_time=0.0, settle=0, groups=groups, switch_time=0.02)
    # a and c share a runtime: c follows a with no settling; b and, in the later rounds,
    # a (after b) first run untimed for the switch time
    assert len(stamps["c"]) == 2 + 3
    for k in ("a", "b"):
        calls = stamps[k][2:]  # after warm-up and calibration
        assert len(calls) > 3
    # b's calls after warm-up and calibration, split into its runs of consecutive calls
    runs, start = [], None
    seen = 0
    for k in order + [None]:
        if k == "b":
            seen += 1
            if seen > 2 and start is None:
                start = seen - 1
        elif start is not None:
            runs.append((start, seen))
            start = None
    assert len(runs) == 3
    for i, j in runs:
        assert stamps["b"][j - 1] - stamps["b"][i] >= 0.02  # the settling calls of one round span the switch time


def test_candidates_are_grouped_by_threading_runtime():
    C = bench.Candidate
    runtime = {c.name: bench._runtime(c) for c in [
        C("arraymlp[numpy]", "ours", "numpy", None), C("floor[numpy]", "floor", "numpy", None),
        C("sklearn", "peer", "cpu", None), C("torch[cpu]", "peer", "cpu", None),
        C("arraymlp[torch]", "ours", "torch", None), C("torch[cuda]", "peer", "cuda", None),
        C("arraymlp[torch-cuda]", "ours", "torch-cuda", None), C("floor[cupy]", "floor", "cupy", None)]}
    assert runtime == {"arraymlp[numpy]": "numpy", "floor[numpy]": "numpy", "sklearn": "numpy",
                       "torch[cpu]": "torch-cpu", "arraymlp[torch]": "torch-cpu", "torch[cuda]": "torch-cuda",
                       "arraymlp[torch-cuda]": "torch-cuda", "floor[cupy]": "cupy"}


# ----------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_arraymlp_step_is_one_sgd_step(target):
    fn = bench.make_arraymlp(target, TINY, 6, "float64", seed=3)
    # an identical model, stepped by hand
    model = am.MLP([5, 4, 3], output_activation="softmax", dtype="float64", seed=3,
                   backend=bench.TARGETS[target].backend, device=bench.TARGETS[target].device)
    x, y = bench._host_data(TINY.sizes, 6, TINY.loss, 3)
    xp = model.xp
    xa, ya = xp.asarray(x, device=model.device), xp.asarray(y, device=model.device)
    loss0, grads = model.loss_and_grads(xa, ya, loss="cross_entropy")
    expected = [{k: am.to_numpy(p[k]) - TINY.lr * am.to_numpy(g[k]) for k in p} for p, g in zip(model.params, grads)]
    value = fn()
    assert value == pytest.approx(float(loss0), rel=1e-12)
    # a second step starts from the updated parameters: its loss is lower
    SGD(lr=TINY.lr).step(model.params, grads)
    for p, e in zip(model.params, expected):
        for k in p:
            np.testing.assert_allclose(am.to_numpy(p[k]), e[k], rtol=1e-12, atol=1e-15)
    assert fn() == pytest.approx(float(model.loss(xa, ya, loss="cross_entropy")), rel=1e-12)


def test_train_step_matches_fit_loop():
    x, y = bench._host_data(TINY.sizes, 6, TINY.loss, 0)
    a = am.MLP([5, 4, 3], output_activation="softmax", dtype="float64", seed=1, backend="numpy")
    b = am.MLP([5, 4, 3], output_activation="softmax", dtype="float64", seed=1, backend="numpy")
    value = bench.train_step(a, SGD(lr=0.1), get_loss("cross_entropy"), x, y, xp=a.xp)
    h = b.fit(x, y, loss="cross_entropy", optimizer=SGD(lr=0.1), epochs=1, batch_size=6, shuffle=False,
              progress=False)
    assert value.shape == () and float(value) == pytest.approx(h.loss[0], rel=1e-12)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_step_reads_nothing_back(monkeypatch, optimizer):
    """The benchmark's step is fit's: on array_api_strict arrays no value reaches the host
    (the loss is returned on the device), so a GPU timing holds no drain of the queue."""
    import array_api_strict

    x, y = bench._host_data(TINY.sizes, 6, TINY.loss, 0)
    model = am.MLP([5, 4, 3], output_activation="softmax", dtype="float64", seed=1, backend="array_api_strict")
    xs, ys = array_api_strict.asarray(x), array_api_strict.asarray(y)
    opt = am.optim.get_optimizer(optimizer, lr=0.1)
    lossfn = get_loss("cross_entropy")
    bench.train_step(model, opt, lossfn, xs, ys, xp=model.xp)  # the optimiser's state is made
    before = float(model.loss(xs, ys, loss="cross_entropy"))  # the loss the next step computes
    reads = []
    cls = type(xs)
    for name in ("__float__", "__int__", "__index__", "__bool__", "__array__", "__dlpack__", "__iter__"):
        original = getattr(cls, name, None)
        if original is not None:
            monkeypatch.setattr(cls, name, lambda *a, _n=name, _o=original, **k: reads.append(_n) or _o(*a, **k))
    value = bench.train_step(model, opt, lossfn, xs, ys, xp=model.xp)
    assert reads == []
    assert isinstance(value, cls) and value.shape == ()
    assert float(value) == pytest.approx(before, rel=1e-12) and reads == ["__float__"]  # the counter counts


def test_arraymlp_inference_returns_probabilities():
    fn = bench.make_arraymlp("numpy", TINY_INFER, 6, "float32")
    out = fn()
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_kernels_compute_the_hot_path(kernel):
    fn = bench.make_kernel(kernel, "numpy", 6, 8, "float64", seed=2)
    out = fn()
    model = am.MLP([8, 8, 10], dtype="float64", seed=2, backend="numpy")
    x = np.random.default_rng(2).standard_normal((6, 8))
    W, b = model.params[0]["W"], model.params[0]["b"]
    if kernel == "dense_forward":
        np.testing.assert_allclose(out, np.maximum(x @ W + b, 0), rtol=1e-13)
    elif kernel == "dense_backward":
        rng = np.random.default_rng(2)
        rng.standard_normal((6, 8))
        dy = rng.standard_normal((6, 8))
        dx, grads = out
        np.testing.assert_allclose(dx, dy @ W.T, rtol=1e-13)
        np.testing.assert_allclose(grads["W"], x.T @ dy, rtol=1e-13)
        np.testing.assert_allclose(grads["b"], dy.sum(axis=0), rtol=1e-13)
    elif kernel == "train_step":
        assert math.isfinite(out) and out == pytest.approx(math.log(10), rel=0.5)
    else:
        assert out.shape == (6, 10)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown kernel"):
        bench.make_kernel("conv", "numpy", 2, 2)


def test_torch_peer_step_and_inference():
    pytest.importorskip("torch")
    value = bench.make_torch("cpu", TINY, 6, "float64")()
    assert math.isfinite(value) and value == pytest.approx(math.log(3), rel=0.5)
    out = bench.make_torch("cpu", TINY_INFER, 6, "float32")()
    assert tuple(out.shape) == (6, 3)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), 1.0, rtol=1e-6)


def test_sklearn_peer_is_one_step_per_call():
    pytest.importorskip("sklearn")
    fn = bench.make_sklearn(TINY, 6, "float64")
    est = fn()
    assert est.t_ == 2 * 6  # the warm-up call and this one: one batch of 6 samples each
    assert [c.shape for c in est.coefs_] == [(5, 4), (4, 3)]
    proba = bench.make_sklearn(TINY_INFER, 6, "float32")()
    assert proba.shape == (6, 3)


# ----------------------------------------------------------------------------- environment, JSON, CLI
ENV_KEYS = {"device_name", "cpu_model", "cpu_count", "threads", "blas", "gpus", "versions", "python",
            "platform", "timestamp", "jit_kernels"}


def test_environment_records_machine_and_versions():
    env = bench.environment()
    assert ENV_KEYS <= set(env)
    assert env["versions"]["numpy"] == np.__version__
    assert env["versions"]["arraymlp"] == am.__version__
    assert {"cupy", "torch", "sklearn", "numba"} <= set(env["versions"])
    assert env["cpu_count"] >= 1 and env["cpu_model"]
    json.dumps(env)  # JSON-able as it is


def test_environment_says_whether_the_compiled_kernels_ran():
    from arraymlp.kernels import _jit, reference_kernels

    saved = _jit._kernels
    try:
        with reference_kernels(False):
            assert bench.environment()["jit_kernels"] is (_jit.kernels() is not None)
            assert bench.environment()["kernels"] == "backend"
            _jit.set_enabled(False)
            assert bench.environment()["jit_kernels"] is False
            _jit._kernels = object()  # loaded
            assert bench.environment()["jit_kernels"] is True
            with reference_kernels():  # forced: the compiled kernels do not run either
                env = bench.environment()
                assert env["jit_kernels"] is False and env["kernels"] == "reference"
    finally:
        _jit._kernels = saved


def test_main_writes_json_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.WORKLOADS, "T1", TINY)
    jpath, ppath = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench.main(["--workload", "t1", "--backend", "numpy", "--repeat", "3", "--min-time", "0", "--quick",
                     "--no-memory", "--json", str(jpath), "--plot", str(ppath), "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "arraymlp[numpy]" in out and "floor[numpy]" in out
    data = json.loads(jpath.read_text())
    assert ENV_KEYS <= set(data["environment"])
    assert data["settings"]["repeat"] == 3 and data["settings"]["quick"] is True
    assert [c["batch"] for c in data["cases"]] == [2, 6]  # the quick batch sizes
    for case in data["cases"]:
        names = [r["name"] for r in case["candidates"]]
        assert names[:2] == ["arraymlp[numpy]", "floor[numpy]"]
        for r in case["candidates"]:
            assert len(r["times"]) == 3
            assert r["median"] == sorted(r["times"])[1]
            assert r["samples_per_s"] == pytest.approx(case["batch"] / r["median"])
        floor = next(r for r in case["candidates"] if r["role"] == "floor")
        ours = case["candidates"][0]
        assert case["ratios"]["arraymlp[numpy]"]["floor"] == pytest.approx(ours["median"] / floor["median"])
    assert ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threads_option_limits_every_pool(tmp_path, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setitem(bench.WORKLOADS, "T1", TINY)
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    jpath = tmp_path / "r.json"
    rc = bench.main(["--workload", "T1", "--backend", "numpy", "--repeat", "1", "--min-time", "0", "--quick",
                     "--no-memory", "--no-peers", "--threads", "1", "--json", str(jpath), "-q"])
    assert rc == 0
    data = json.loads(jpath.read_text())
    assert data["settings"]["threads"] == 1
    assert data["environment"]["threads"]["blas"] and set(data["environment"]["threads"]["blas"]) == {1}
    # restored afterwards
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()][:len(before)] == before
    assert bench.main(["--threads", "0", "-q"]) == 2


def test_main_rejects_unknown_names(capsys):
    assert bench.main(["--workload", "W9", "-q"]) == 2
    assert "unknown workload 'W9'" in capsys.readouterr().err
    assert bench.main(["--backend", "tpu", "-q"]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--min-time", "nan"], "--min-time must be a finite number of seconds >= 0, got nan"),
    (["--min-time", "-1"], "--min-time must be a finite number of seconds >= 0, got -1.0"),
    (["--json", "no/such/folder/r.json"], "--json no/such/folder/r.json: the folder"),
    (["--plot", "no/such/folder/r.png"], "--plot no/such/folder/r.png: the folder"),
])
def test_main_checks_options_before_timing(args, message, capsys, monkeypatch):
    monkeypatch.setattr(bench.runner, "run", lambda *a, **k: pytest.fail("timed before checking the options"))
    assert bench.main(["--workload", "W2", "--backend", "numpy", "-q", *args]) == 2
    assert message in capsys.readouterr().err


def test_gpu_workload_is_skipped_with_a_note_on_cpu(capsys):
    result = bench.run([bench.WORKLOADS["W4"]], [bench.TARGETS["numpy"]], repeat=1, quick=True, min_time=0.0,
                       memory=False)
    assert result["cases"] == []
    assert any("W4 runs on a GPU only" in n for n in result["notes"])


def test_a_candidate_that_cannot_run_is_skipped_with_a_note(monkeypatch):
    def broken(*args, **kwargs):
        def fn():
            raise RuntimeError("no such kernel")
        return fn

    monkeypatch.setattr(bench.runner, "make_torch", broken)
    monkeypatch.setattr(bench.runner, "_has", lambda module: module == "torch")
    notes = []
    case = bench.run_case(TINY, 4, "float64", [bench.TARGETS["numpy"]], gpu=False, repeat=2, min_time=0.0,
                          errors=notes)
    assert [r["name"] for r in case["candidates"]] == ["arraymlp[numpy]", "floor[numpy]"]
    assert len(notes) == 1 and "torch[cpu] skipped: RuntimeError: no such kernel" in notes[0]


def test_memory_budget_parts():
    wl = bench.Workload("M", "memory", "train", (6, 5, 3), (4,))
    m = bench.measure_memory(40, workload=wl, batch=8, dtype="float32")
    assert m["data_bytes"] == 40 * 6 * 4 + 40 * 8
    assert m["param_bytes"] == (6 * 5 + 5 + 5 * 3 + 3) * 4
    assert m["optimizer_state_bytes"] == 0  # plain SGD keeps no state
    # the batch, the hidden layer's dense output and activation, the logits; the labels
    assert m["activation_bytes"] == 8 * (6 + 2 * 5 + 3) * 4 + 8 * 8
    assert m["budget_bytes"] == m["data_bytes"] + m["param_bytes"] + m["activation_bytes"]
    assert m["ratio"] == pytest.approx(m["peak_bytes"] / m["budget_bytes"])
    assert m["peak_bytes"] >= m["data_bytes"]


def test_tf32_wrapper_only_where_it_switches_something():
    """On CPU targets, and with TF32 off, the timed function is the work itself; on a
    GPU target with TF32 on, the switch is on during the call and restored after it."""
    torch = pytest.importorskip("torch")

    def work():
        return torch.backends.cuda.matmul.allow_tf32

    cpu = bench.TARGETS["numpy"]
    assert bench._in_tf32(cpu, True, work) is work
    gpu = bench.Target("gpu", "torch", "cuda", True)
    assert bench._in_tf32(gpu, False, work) is work
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        wrapped = bench._in_tf32(gpu, True, work)
        assert wrapped is not work
        assert wrapped() is True
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


TINY_ENSEMBLE = bench.Workload("T6", "tiny ensemble", "ensemble", (5, 4, 3), (2, 3), lr=1e-3, ensemble_batch=8)


def test_ensemble_workload_times_members_against_torch_vmap(monkeypatch):
    """W6's kind: the case's size is K; arraymlp's candidate is one ensemble step (each
    member's loss on the batch), the peer is torch.func.vmap over stacked modules; no floor."""
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(bench.WORKLOADS, "T6", TINY_ENSEMBLE)
    ours = bench.make_arraymlp("numpy", TINY_ENSEMBLE, 3)
    losses = ours()
    assert losses.shape == (3,)
    # the first step's losses are the members' cross-entropies of the same data, initial parameters
    import arraymlp as am
    from arraymlp.bench.workloads import _host_data

    x, y = _host_data((5, 4, 3), 8, "cross_entropy", 0)
    ens = am.MLP([5, 4, 3], output_activation="softmax", ensemble=3, seed=0, backend="numpy")
    for i in range(3):
        m = ens.member(i)
        ref = float(m.loss(x.astype(np.float32), y, loss="cross_entropy"))
        assert losses[i] == pytest.approx(ref, rel=1e-5)
    peer = bench.make_torch("cpu", TINY_ENSEMBLE, 3)
    first, second = peer(), peer()
    assert tuple(first.shape) == (3,) and bool(torch.all(second < first))  # Adam steps lower each loss
    case = bench.run_case(TINY_ENSEMBLE, 2, "float32", [bench.TARGETS["numpy"]], gpu=False, repeat=1, min_time=0.0)
    assert [r["name"] for r in case["candidates"]] == ["arraymlp[numpy]", "torch.vmap[cpu]"]
    assert case["kind"] == "ensemble" and case["batch"] == 2
