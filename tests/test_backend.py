import contextlib
import json
import math

import numpy as np
import pytest

import arraymlp as am
from arraymlp._backend import Generator, backend_name, canonical_device, get_namespace, resolve_backend, to_numpy

# every backend test also runs on JAX with its 64-bit mode on (the jax-x64 row)
JAX_X64 = True


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_resolve_by_name_and_module(name):
    import importlib

    xp = resolve_backend(name)
    assert backend_name(xp) == name
    mod = importlib.import_module(name)
    assert resolve_backend(mod) is xp


def test_resolve_unknown_backend_lists_known():
    with pytest.raises(
        ValueError, match="unknown backend 'tensorflow'; known backends: numpy, cupy, torch, array_api_strict, jax"
    ):
        resolve_backend("tensorflow")
    with pytest.raises(TypeError, match="backend must be a name or a namespace module"):
        resolve_backend(3)


def test_to_backend_roundtrip(backend):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    moved = am.to_backend(a, backend.name, device=backend.device)
    assert backend.same_place(moved)
    back = am.to_backend(moved, "numpy")
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, a)
    # from the row to array_api_strict and back keeps the values
    s = am.to_backend(backend.asarray(a), "array_api_strict")
    np.testing.assert_array_equal(am.to_numpy(s), a)


def test_mixed_namespaces_name_both():
    import array_api_strict as s

    with pytest.raises(TypeError, match="array_api_strict array but the model's parameters are numpy arrays"):
        get_namespace(np.ones(2), s.ones(2))
    with pytest.raises(TypeError, match="expected an array .* got builtins.list"):
        get_namespace([1, 2])


def test_generator_host_stream_is_backend_independent(backend):
    xp = backend.xp
    dev = canonical_device(xp, backend.device)
    dtype = backend.float_dtype("float64")  # float32 on JAX's 32-bit mode
    a = Generator(7, resolve_backend("numpy"), "cpu").uniform((3, 2), 1.0, np.dtype(dtype))
    b = Generator(7, xp, dev).uniform((3, 2), 1.0, getattr(xp, dtype))
    assert backend.same_place(b)
    np.testing.assert_array_equal(backend.to_numpy(b), a)
    p = Generator(7, xp, dev).permutation(10)
    assert sorted(backend.to_numpy(p).tolist()) == list(range(10))


def test_generator_counter_stream_and_state(backend):
    xp = backend.xp
    dev = canonical_device(xp, backend.device)
    g = Generator(3, xp, dev)
    first = g.random((4, 5), xp.float32)
    assert backend.same_place(first)
    first = backend.to_numpy(first)
    assert first.dtype == np.float32 and np.all((first >= 0) & (first < 1))
    state = g.get_state()
    assert state["stream"] == {"key": g.key, "counter": 1}
    second = backend.to_numpy(g.random((4, 5), xp.float32))
    g.set_state(json.loads(json.dumps(state)))  # plain JSON: two integers and the host state
    np.testing.assert_array_equal(backend.to_numpy(g.random((4, 5), xp.float32)), second)
    np.testing.assert_array_equal(backend.to_numpy(Generator(3, xp, dev).random((4, 5), xp.float32)), first)
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="counter must be an integer in"):
        g.set_state({"host": state["host"], "stream": {"key": 1, "counter": -1}})


def test_generator_state_without_a_counter_stream_restarts_it():
    """A state saved before the per-step stream was counter-based (a "native" entry, no
    "stream") restores the host stream and starts the counter stream at 0."""
    xp = resolve_backend("numpy")
    g = Generator(5, xp)
    g.random((3,), np.float64)
    old = {"host": g.get_state()["host"], "native": {"bit_generator": "PCG64"}}
    h = Generator(5, xp)
    h.set_state(old)
    assert h.counter == 0
    np.testing.assert_array_equal(h.random((3,), np.float64), Generator(5, xp).random((3,), np.float64))
    np.testing.assert_array_equal(h.permutation(9), g.permutation(9))


def _reference_bits(n, key, counter):
    """The counter-based bits computed with Python integers, one element at a time."""
    m32, m64 = 2**32 - 1, 2**64 - 1

    def splitmix(z):
        z = (z + 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    def mix(x):
        x ^= x >> 17
        x = (x * 0xED5AD4BB) & m32
        x ^= x >> 11
        x = (x * 0xAC4C1B51) & m32
        x ^= x >> 15
        x = (x * 0x31848BAB) & m32
        return x ^ (x >> 14)

    w = splitmix(key ^ splitmix(counter))
    s0, s1 = w & m32, w >> 32
    return np.array([mix(mix((i + s0) & m32) ^ s1) for i in range(n)], dtype=np.uint64)


@pytest.mark.parametrize("counter", [0, 7, 2**40 + 3])
def test_counter_bits_match_python_integers_on_every_backend(backend, counter):
    """The same bits on every backend, equal to the definition computed with Python
    integers (so neither the int64 halves nor NumPy's wrapping uint32 path overflow)."""
    from arraymlp._backend import counter_bits

    key = 0xDEADBEEF12345678
    got = counter_bits((3, 41), key, counter, backend.xp, canonical_device(backend.xp, backend.device))
    assert backend.same_place(got)
    got = backend.to_numpy(got).astype(np.uint64)
    np.testing.assert_array_equal(got.reshape(-1), _reference_bits(3 * 41, key, counter))


def test_dtype_answers_follow_jax_64_bit_switch_flipped_between_calls():
    """Index dtypes and metric accumulators are remembered per namespace and per JAX
    mode: after a call in 64-bit mode, 32-bit calls do not reuse int64 (whose counter
    bits would overflow int32) nor float64 sums, and the other way round."""
    jax = pytest.importorskip("jax")
    from arraymlp._backend import counter_bits, index_dtype
    from arraymlp.metrics import _sum_dtype
    from conftest import _jax_x64_mode

    xp = resolve_backend("jax")
    key, counter = 0xDEADBEEF12345678, 5
    want = _reference_bits(40, key, counter)
    for x64 in (True, False, True, False):
        with _jax_x64_mode() if x64 else contextlib.nullcontext():
            assert jax.config.jax_enable_x64 is x64
            assert index_dtype(xp) == (xp.int64 if x64 else xp.int32)
            assert _sum_dtype(xp, xp.float32, None) == (xp.float64 if x64 else xp.float32)
            got = np.asarray(counter_bits((40,), key, counter, xp)).astype(np.uint64)
            np.testing.assert_array_equal(got, want)


def test_wrapping_int64_mix_matches_the_overflow_free_one():
    """torch on a GPU and CuPy mix in int64 with wrapping products: that arithmetic,
    run here on torch's CPU tensors, equals the overflow-free definition."""
    torch = pytest.importorskip("torch")
    from arraymlp._backend import _mix32, _mix32_wrapping

    x = np.concatenate([np.arange(1000), np.random.default_rng(0).integers(0, 2**32, size=5000), [2**32 - 1]])
    want = np.asarray(_mix32(np.asarray(x, dtype=np.int64)))
    got = _mix32_wrapping(torch.asarray(x, dtype=torch.int64)).numpy()
    np.testing.assert_array_equal(got, want)
    assert want.max() < 2**32 and want.min() >= 0


def test_random_draws_are_the_same_on_every_backend(backend):
    rows = {"numpy": ("numpy", None)}
    rows[backend.id] = (backend.name, backend.device)
    draws = {}
    dtypes = ("float32", backend.float_dtype("float64"), "float32")  # float32 on JAX's 32-bit mode
    for rid, (name, device) in rows.items():
        xp = resolve_backend(name)
        g = Generator(11, xp, canonical_device(xp, device))
        draws[rid] = [np.asarray(to_numpy(g.random((17, 9), getattr(xp, dt)))) for dt in dtypes]
    for a, b in zip(draws["numpy"], draws[backend.id]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # float32 and float64 draws of one counter are the same numbers
    np.testing.assert_array_equal(Generator(2, np).random((5, 5), np.float64),
                                  Generator(2, np).random((5, 5), np.float32).astype(np.float64))


def test_counter_stream_statistics():
    """Uniformity of each draw and independence of consecutive draws and seeds, with
    bounds of 5 standard deviations computed from the sample size."""
    xp = resolve_backend("numpy")
    g = Generator(2024, xp)
    n = 1 << 18
    draws = [g.random((n,), np.float64) for _ in range(4)] + [Generator(2025, xp).random((n,), np.float64)]
    for u in draws:
        assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
        for p in (0.1, 0.5, 0.9):  # the kept fraction of a dropout mask
            assert abs((u >= p).mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        counts = np.bincount((u * 64).astype(int), minlength=64)  # chi-square, 63 degrees of freedom
        chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
        assert chi2 < 63 + 5 * math.sqrt(2 * 63)
        # neighbouring elements of one draw are uncorrelated
        assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / math.sqrt(n)
    for a, b in zip(draws, draws[1:]):  # consecutive counters, and the neighbouring seed
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)
        assert abs(((a >= 0.5) == (b >= 0.5)).mean() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_dtype_names():
    from arraymlp._backend import resolve_dtype

    xp = resolve_backend("numpy")
    assert resolve_dtype(xp, "float64") == np.float64
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype(xp, "int8")
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        am.MLP([2, 2], dtype="float8")


def test_dtype_names_are_exact():
    from arraymlp._backend import dtype_name

    assert [dtype_name(d) for d in (np.float32, np.dtype("float16"), "float64")] == ["float32", "float16", "float64"]
    torch = pytest.importorskip("torch")
    assert dtype_name(torch.float64) == "float64" and dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype 'bfloat16'"):
        am.MLP([2, 2], dtype="bfloat16")
    with pytest.raises(ValueError, match="unsupported dtype"):
        am.MLP([2, 2], dtype=torch.bfloat16, backend="torch")


@pytest.mark.parametrize("make", ["reversed", "read-only", "broadcast"])
def test_to_backend_odd_numpy_arrays(backend, make):
    """Negative strides (which torch's DLPack import cannot take), read-only arrays and
    broadcast views move with their values, and the result never writes back into the
    caller's array."""
    base = np.arange(6.0)
    a = {"reversed": base[::-1], "read-only": base.copy(), "broadcast": np.broadcast_to(base, (3, 6))}[make]
    if make == "read-only":
        a.flags.writeable = False
    want = np.array(a)
    moved = am.to_backend(a, backend.name, device=backend.device)
    assert backend.same_place(moved)
    np.testing.assert_array_equal(backend.to_numpy(moved), want)
    if backend.name == "torch" and make != "reversed":  # torch tensors are writeable
        moved[(0,) * moved.ndim] = 99.0
        np.testing.assert_array_equal(a, want)


def test_a_cupy_array_goes_to_torch_without_a_host_copy(monkeypatch):
    """A CuPy array for torch: handed to torch's DLPack import as it is when its strides
    are positive, copied on its own device when one is negative (torch rejects those);
    never read back to the host (a synchronisation and a copy of the whole array). A
    stand-in ``cupy.ndarray`` (over NumPy memory) whose ``get`` fails stands for CuPy."""
    import sys
    import types

    from arraymlp._backend import _for_torch_dlpack

    class FakeCupyArray(np.ndarray):
        def get(self):
            raise AssertionError("read back to the host")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=FakeCupyArray))
    plain = np.arange(6.0).reshape(2, 3).view(FakeCupyArray)
    assert _for_torch_dlpack(plain) is plain
    reversed_ = np.arange(6.0)[::-1].view(FakeCupyArray)
    got = _for_torch_dlpack(reversed_)
    assert type(got) is FakeCupyArray and min(got.strides) > 0
    np.testing.assert_array_equal(np.asarray(got), [5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    host = np.arange(4.0)[::-2]  # host arrays are still taken through NumPy
    np.testing.assert_array_equal(_for_torch_dlpack(host), [3.0, 1.0])


def test_torch_lazy_negation_is_resolved():
    torch = pytest.importorskip("torch")
    im = torch.tensor([1 + 2j, 3 + 4j]).conj().imag  # a view with torch's negative bit set
    np.testing.assert_array_equal(am.to_backend(im, "numpy"), [-2.0, -4.0])
    np.testing.assert_array_equal(am.to_numpy(im), [-2.0, -4.0])
