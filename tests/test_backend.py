import numpy as np
import pytest

import arraymlp as am
from arraymlp._backend import Generator, backend_name, canonical_device, get_namespace, resolve_backend


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


def test_generator_native_stream_and_state(backend):
    xp = backend.xp
    dev = canonical_device(xp, backend.device)
    g = Generator(3, xp, dev)
    first = backend.to_numpy(g.random((4, 5), xp.float32))
    assert first.dtype == np.float32 and np.all((first >= 0) & (first < 1))
    state = g.get_state()
    second = backend.to_numpy(g.random((4, 5), xp.float32))
    g.set_state(state)
    np.testing.assert_array_equal(backend.to_numpy(g.random((4, 5), xp.float32)), second)
    np.testing.assert_array_equal(backend.to_numpy(Generator(3, xp, dev).random((4, 5), xp.float32)), first)
    assert not np.array_equal(first, second)


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


def test_torch_lazy_negation_is_resolved():
    torch = pytest.importorskip("torch")
    im = torch.tensor([1 + 2j, 3 + 4j]).conj().imag  # a view with torch's negative bit set
    np.testing.assert_array_equal(am.to_backend(im, "numpy"), [-2.0, -4.0])
    np.testing.assert_array_equal(am.to_numpy(im), [-2.0, -4.0])
