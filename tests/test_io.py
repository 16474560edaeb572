"""Saving, loading and checkpoints: round trips on every backend, atomic writes, every
kind of bad file raising ModelFileError, and bit-identical resumed training."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraymlp as am
from arraymlp import io as amio

safetensors_numpy = pytest.importorskip("safetensors.numpy")


# ----------------------------------------------------------------------------- helpers
def _data(n=40, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, k, size=n)
    return x, y


def _rich_model(backend, dtype="float64", seed=3):
    """Every stored layer kind: Dense (with and without bias), LayerNorm, Dropout, activations."""
    layers = [am.Dense(5, 8), am.LayerNorm(8), am.GELU(), am.Dropout(0.25), am.Dense(8, 6, bias=False),
              am.Activation("tanh"), am.Dense(6, 3), am.Softmax()]
    return am.Sequential(layers, dtype=dtype, seed=seed, **backend.model_kwargs())


def _params_np(model, backend=None):
    to = (lambda a: np.asarray(am.to_numpy(a))) if backend is None else backend.to_numpy
    return [{k: to(v) for k, v in p.items()} for p in model.params]


def _assert_params_identical(a, b):
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert set(pa) == set(pb)
        for k in pa:
            assert pa[k].dtype == pb[k].dtype
            assert np.array_equal(pa[k], pb[k]), k


def _header(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw


def _tiny(seed=0):
    return am.MLP([3, 4, 2], layer_norm=True, dropout=0.1, output_activation="softmax", seed=seed, backend="numpy")


# ----------------------------------------------------------------------------- round trips
def test_roundtrip_every_backend(backend, tmp_path):
    x, y = _data()
    model = _rich_model(backend)
    xb, yb = backend.asarray(x), backend.asarray(y)
    model.fit(xb, yb, loss="cross_entropy", epochs=1, batch_size=16, progress=False)
    before = _params_np(model, backend)
    out = backend.to_numpy(model(xb))
    path = tmp_path / "model.safetensors"
    am.save(model, path)
    assert _params_np(model, backend)[0]["W"].tobytes() == before[0]["W"].tobytes()  # saving changes nothing

    on_numpy = am.load(path)
    assert on_numpy.backend == "numpy"
    _assert_params_identical(_params_np(on_numpy), before)
    assert on_numpy.layers == model.layers
    assert on_numpy.dtype_name == "float64" and on_numpy.seed == 3
    assert on_numpy.task_ == "multiclass" and on_numpy.loss_ == "cross_entropy"
    np.testing.assert_allclose(np.asarray(on_numpy(x)), out, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.asarray(on_numpy.predict(x)), out.argmax(axis=1))

    on_row = am.load(path, **backend.model_kwargs())
    _assert_params_identical(_params_np(on_row, backend), before)
    y_row = on_row(xb)
    assert backend.same_place(y_row)
    np.testing.assert_array_equal(backend.to_numpy(y_row), out)
    assert all(backend.same_place(a) for p in on_row.params for a in p.values())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_roundtrip_dtypes(dtype, tmp_path):
    model = am.MLP([4, 7, 2], activation="elu", dtype=dtype, seed=1, backend="numpy")
    am.save(model, tmp_path / "m.safetensors")
    loaded = am.load(tmp_path / "m.safetensors")
    assert loaded.dtype_name == dtype
    assert isinstance(loaded, am.MLP) and loaded.sizes == [4, 7, 2]
    _assert_params_identical(_params_np(loaded), _params_np(model))
    header, _ = _header(tmp_path / "m.safetensors")
    assert header["layers.0.W"]["dtype"] == {"float16": "F16", "float32": "F32", "float64": "F64"}[dtype]


def test_loaded_model_trains_like_a_fresh_one_on_torch(tmp_path):
    pytest.importorskip("torch")
    x, y = _data()
    model = am.MLP([5, 8, 3], seed=0, backend="numpy")
    am.save(model, tmp_path / "m.safetensors")
    loaded = am.load(tmp_path / "m.safetensors", backend="torch")
    import torch

    # the generator is not part of a model file: reseed both runs for the same batch order
    loaded.fit(torch.asarray(x), torch.asarray(y), loss="cross_entropy", epochs=2, progress=False, seed=5)
    model.fit(x, y, loss="cross_entropy", epochs=2, progress=False, seed=5)
    for pa, pb in zip(_params_np(model), _params_np(loaded)):
        for k in pa:
            np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6)


def test_shorthand_layers_and_file_layout(tmp_path):
    model = am.Sequential([am.Dense(3, 4), am.ReLU(), am.Dense(4, 2), am.LogSoftmax()], seed=0, backend="numpy")
    path = tmp_path / "m.safetensors"
    am.save(model, path)
    loaded = am.load(path)
    assert type(loaded) is am.Sequential
    assert [type(layer) for layer in loaded.layers] == [am.Dense, am.ReLU, am.Dense, am.LogSoftmax]
    assert loaded.layers == model.layers

    header, raw = _header(path)
    meta = header.pop("__metadata__")
    assert sorted(header) == ["layers.0.W", "layers.0.b", "layers.2.W", "layers.2.b"]
    assert header["layers.0.W"]["shape"] == [3, 4]
    assert meta["format"] == "arraymlp"
    assert meta["format_version"] == str(amio.FORMAT_VERSION) == "1"
    assert meta["arraymlp_version"] == am.__version__
    assert meta["kind"] == "model" and meta["dtype"] == "float32"
    cfg = json.loads(meta["model"])
    assert cfg["class"] == "Sequential" and cfg["seed"] == 0
    assert cfg["layers"][1] == {"type": "Activation", "name": "relu", "class": "ReLU"}
    assert len(meta["sha256"]) == 64
    # any safetensors reader gets the weights
    plain = safetensors_numpy.load_file(str(path))
    np.testing.assert_array_equal(plain["layers.2.W"], model.params[2]["W"])
    assert b"pickle" not in raw and not raw[8:].startswith(b"\x80")


def test_save_rejects_unbuilt_models_and_unknown_layers(tmp_path):
    with pytest.raises(ValueError, match="no parameters yet"):
        am.save(am.MLP([2, 3]), tmp_path / "m.safetensors")

    class Scale(am.Layer):
        pass

    model = am.Sequential([am.Dense(2, 3), Scale()], backend="numpy")
    with pytest.raises(TypeError, match=r"cannot save layer 1 .*Dense, Activation"):
        am.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_custom_initialiser_is_not_stored(tmp_path):
    def ones(shape, *, rng, dtype):
        return rng.full(shape, 1.0, dtype)

    model = am.Sequential([am.Dense(2, 3, init=ones)], seed=0, backend="numpy")
    am.save(model, tmp_path / "m.safetensors")
    loaded = am.load(tmp_path / "m.safetensors")
    assert loaded.layers[0].init == "glorot_uniform"
    np.testing.assert_array_equal(loaded.params[0]["W"], np.ones((2, 3), np.float32))


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    model = _tiny()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install arraymlp\[io\]"):
        am.save(model, tmp_path / "m.safetensors")


# ----------------------------------------------------------------------------- atomic writes
def _only(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_leaves_no_temporaries(tmp_path, monkeypatch, exc):
    path = tmp_path / "m.safetensors"
    old = am.MLP([3, 5, 2], seed=0, backend="numpy")
    am.save(old, path)
    old_bytes = path.read_bytes()

    def half_then_fail(f, data):
        view = memoryview(data)
        f.write(view[: len(view) // 2])
        f.flush()
        raise exc

    monkeypatch.setattr(amio.container, "_write_chunks", half_then_fail)
    new = am.MLP([3, 5, 2], seed=1, backend="numpy")
    with pytest.raises(type(exc)):
        am.save(new, path)
    assert path.read_bytes() == old_bytes
    assert _only(tmp_path) == ["m.safetensors"]
    _assert_params_identical(_params_np(am.load(path)), _params_np(old))

    monkeypatch.undo()
    am.save(new, path)  # and a later save succeeds
    _assert_params_identical(_params_np(am.load(path)), _params_np(new))
    assert _only(tmp_path) == ["m.safetensors"]


def test_failed_fsync_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    am.save(_tiny(0), path)
    old_bytes = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(amio.container.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        am.save(_tiny(1), path)
    assert path.read_bytes() == old_bytes
    assert _only(tmp_path) == ["m.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_overwrite_keeps_file_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    am.save(_tiny(), path)
    os.chmod(path, 0o640)
    am.save(_tiny(1), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_missing_folder_and_long_names(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"cannot write .*nope.x\.safetensors: the folder .*nope does not exist"):
        am.save(_tiny(), tmp_path / "nope" / "x.safetensors")
    assert os.listdir(tmp_path) == []
    long = tmp_path / ("m" * 240 + ".safetensors")  # 252 characters: a valid name
    am.save(_tiny(), long)
    back = am.load(long)
    _assert_params_identical(_params_np(back), _params_np(_tiny()))
    assert os.listdir(tmp_path) == [long.name]


def test_float16_file_onto_a_backend_without_float16(tmp_path):
    path = tmp_path / "h.safetensors"
    am.save(am.MLP([2, 3, 1], dtype="float16", seed=0, backend="numpy"), path)
    with pytest.raises(ValueError, match="the array_api_strict backend has no float16; use one of float32, float64"):
        am.load(path, backend="array_api_strict")


# ----------------------------------------------------------------------------- bad files
@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    am.save(_tiny(), path)
    return path


def _expect_bad(path, problem):
    with pytest.raises(am.ModelFileError) as info:
        am.load(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == os.fspath(path)
    assert str(err).startswith(f"{os.fspath(path)}: ")
    assert problem in err.problem, err.problem
    return err


def _craft(path, *, model_cfg=None, meta=None, tensors=None, base=None):
    """A file with a valid checksum but the given architecture / metadata / tensors."""
    base = base if base is not None else _tiny()
    metadata, arrays = amio._model_payload(base, "model")
    if model_cfg is not None:
        metadata["model"] = json.dumps(model_cfg)
    if meta is not None:
        metadata.update(meta)
    if tensors is not None:
        arrays = tensors
    amio._write_file(path, metadata, arrays)
    return path


def _write_raw(path, header: dict, data: bytes = b"", *, length=None):
    body = json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_empty_and_short_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    _expect_bad(tmp_path / "empty", "the file is empty")
    (tmp_path / "short").write_bytes(b"\x01\x02\x03")
    _expect_bad(tmp_path / "short", "too short")


def test_truncated_files(good, tmp_path):
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-4])
    _expect_bad(cut, "claims bytes")
    cut.write_bytes(raw[: 8 + n // 2])
    _expect_bad(cut, "only")
    cut.write_bytes(raw[:6])
    _expect_bad(cut, "too short")


def test_bit_flips_are_detected(good, tmp_path):
    raw = bytearray(good.read_bytes())
    flipped = tmp_path / "flip.safetensors"
    raw[-3] ^= 0x10  # inside the last tensor's bytes
    flipped.write_bytes(bytes(raw))
    _expect_bad(flipped, "checksum mismatch")
    raw = bytearray(good.read_bytes())
    at = raw.index(b'\\"seed\\": 0') + len(b'\\"seed\\": ')
    raw[at] ^= 0x01  # seed 0 -> 1: still a valid header, caught by the checksum
    flipped.write_bytes(bytes(raw))
    _expect_bad(flipped, "checksum mismatch")


def test_not_safetensors(tmp_path):
    (tmp_path / "text.txt").write_text("hello, this is not a model at all\n" * 3)
    _expect_bad(tmp_path / "text.txt", "header length field claims")
    (tmp_path / "zeros").write_bytes(bytes(64))
    _expect_bad(tmp_path / "zeros", "too short for a JSON header")
    _expect_bad(_write_raw(tmp_path / "list", [1, 2, 3]), "not an object")
    (tmp_path / "junk").write_bytes(struct.pack("<Q", 4) + b"{abc" + b"\x00" * 8)
    _expect_bad(tmp_path / "junk", "not valid JSON")
    (tmp_path / "latin").write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    _expect_bad(tmp_path / "latin", "not UTF-8")


def test_safetensors_from_elsewhere(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors_numpy.save_file({"weight": np.ones((2, 2), np.float32)}, str(path))
    _expect_bad(path, "no __metadata__")
    safetensors_numpy.save_file({"weight": np.ones((2, 2), np.float32)}, str(path), metadata={"a": "b"})
    _expect_bad(path, "not an arraymlp file")
    safetensors_numpy.save_file({"w": np.ones(2, np.int64)}, str(path), metadata={"format": "arraymlp"})
    _expect_bad(path, "F16, F32 or F64")


def test_pickles_are_refused_and_never_run(tmp_path):
    ran = []

    class Payload:
        def __reduce__(self):
            return (ran.append, ("executed",))

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Payload()))
    _expect_bad(path, "")
    torch = pytest.importorskip("torch")
    torch.save({"W": torch.ones(2)}, tmp_path / "model.pt")
    _expect_bad(tmp_path / "model.pt", "")
    assert ran == []


def test_unknown_layer_and_activation(tmp_path):
    cfg = amio._model_config(_tiny())
    bad = json.loads(json.dumps(cfg))
    bad["layers"][2] = {"type": "Lambda", "code": "__import__('os').system('echo pwned')"}
    err = _expect_bad(_craft(tmp_path / "a.safetensors", model_cfg=bad), "layer 2 of the architecture is invalid")
    assert "unknown layer type 'Lambda'" in str(err)
    bad = json.loads(json.dumps(cfg))
    bad["layers"][2]["name"] = "swishy"
    err = _expect_bad(_craft(tmp_path / "b.safetensors", model_cfg=bad), "unknown activation 'swishy'")
    assert "known activations: identity, relu" in str(err)
    bad = json.loads(json.dumps(cfg))
    bad["layers"][0]["init"] = "os.system"
    _expect_bad(_craft(tmp_path / "c.safetensors", model_cfg=bad), "unknown initializer 'os.system'")
    bad = json.loads(json.dumps(cfg))
    bad["layers"][3]["p"] = 1.5
    _expect_bad(_craft(tmp_path / "d.safetensors", model_cfg=bad), "Dropout: p must be in [0, 1)")
    bad = json.loads(json.dumps(cfg))
    bad["layers"][1]["extra"] = 1
    _expect_bad(_craft(tmp_path / "e.safetensors", model_cfg=bad), "unknown fields ['extra']")
    bad = json.loads(json.dumps(cfg))
    bad["class"] = "os.system"
    _expect_bad(_craft(tmp_path / "f.safetensors", model_cfg=bad), "unknown model class 'os.system'")
    bad = json.loads(json.dumps(cfg))
    bad["layers"][4]["n_in"] = 5
    _expect_bad(_craft(tmp_path / "g.safetensors", model_cfg=bad), "sizes must chain")


def test_tensors_must_match_the_architecture(tmp_path):
    base = _tiny()
    _, arrays = amio._model_payload(base, "model")
    wrong = dict(arrays, **{"layers.0.W": np.zeros((3, 5), np.float32)})
    err = _expect_bad(_craft(tmp_path / "a.safetensors", tensors=wrong), "tensor 'layers.0.W' has shape (3, 5)")
    assert "needs (3, 4)" in str(err)
    missing = {k: v for k, v in arrays.items() if k != "layers.1.gamma"}
    _expect_bad(_craft(tmp_path / "b.safetensors", tensors=missing), "missing: layers.1.gamma")
    extra = dict(arrays, **{"layers.9.W": np.zeros(2, np.float32)})
    _expect_bad(_craft(tmp_path / "c.safetensors", tensors=extra), "does not use: layers.9.W")
    f64 = dict(arrays, **{"layers.0.b": arrays["layers.0.b"].astype(np.float64)})
    _expect_bad(_craft(tmp_path / "d.safetensors", tensors=f64), "has dtype F64 but the model's dtype is float32")


def test_future_format_version(tmp_path):
    path = _craft(tmp_path / "future.safetensors", meta={"format_version": "7", "arraymlp_version": "9.0"})
    err = _expect_bad(path, "format version 7 (by arraymlp 9.0)")
    assert "reads versions up to 1; upgrade arraymlp" in str(err)
    _expect_bad(_craft(tmp_path / "v.safetensors", meta={"format_version": "one"}), "invalid format_version")
    _expect_bad(_craft(tmp_path / "k.safetensors", meta={"kind": "optimizer"}), "unknown file kind")


def test_crafted_huge_claims(tmp_path):
    meta = {"__metadata__": {"format": "arraymlp"}}
    # a tensor claiming 8 TB of data in a 200-byte file
    huge = dict(meta, w={"dtype": "F32", "shape": [1 << 20, 1 << 21], "data_offsets": [0, 1 << 43]})
    _expect_bad(_write_raw(tmp_path / "huge", huge, b"\x00" * 16),
                "claims bytes 0..8796093022208 but the file holds only 16")
    # offsets consistent with the file but not with the shape
    lie = dict(meta, w={"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 16]})
    _expect_bad(_write_raw(tmp_path / "lie", lie, b"\x00" * 16), "needs 4294967296 bytes")
    # an absurd header length
    (tmp_path / "len").write_bytes(struct.pack("<Q", (1 << 64) - 1) + b"{}")
    _expect_bad(tmp_path / "len", "more than the 100000000 allowed")
    _expect_bad(_write_raw(tmp_path / "len2", meta, length=10_000), "claims 10000 bytes but only")
    # overlapping tensors, gaps, trailing bytes
    two = dict(meta, a={"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]})
    _expect_bad(_write_raw(tmp_path / "overlap", two, b"\x00" * 12), "overlaps another tensor")
    gap = dict(meta, a={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]})
    _expect_bad(_write_raw(tmp_path / "gap", gap, b"\x00" * 12), "leaves a gap")
    tail = dict(meta, a={"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})
    _expect_bad(_write_raw(tmp_path / "tail", tail, b"\x00" * 12), "4 bytes not covered")
    neg = dict(meta, a={"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})
    _expect_bad(_write_raw(tmp_path / "neg", neg, b"\x00" * 8), "invalid shape [-2]")
    deep = struct.pack("<Q", 40_000) + b"[" * 40_000
    (tmp_path / "deep").write_bytes(deep)
    _expect_bad(tmp_path / "deep", "not valid JSON")


def test_missing_file_stays_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        am.load(tmp_path / "nope.safetensors")


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("splice"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 256)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def _mutate(raw: bytes, ops) -> bytes:
    b = bytearray(raw)
    for op in ops:
        kind, args = op[0], op[1:]
        n = max(len(b), 1)
        if kind == "flip" and b:
            b[args[0] % len(b)] ^= 1 << args[1]
        elif kind == "cut":
            del b[args[0] % n:]
        elif kind == "delete":
            i = args[0] % n
            del b[i:i + args[1]]
        elif kind == "insert":
            i = args[0] % n
            b[i:i] = args[1]
        elif kind == "splice" and b:
            src, dst, k = args[0] % len(b), args[1] % len(b), args[2]
            b[dst:dst + k] = bytes(b[src:src + k])
        elif kind == "overwrite" and b:
            i = args[0] % len(b)
            b[i:i + len(args[1])] = args[1]
        elif kind == "length":
            b[:8] = struct.pack("<Q", args[0])
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = am.MLP([2, 3, 2], layer_norm=True, dropout=0.1, output_activation="softmax", seed=0, backend="numpy")
    good = folder / "good.safetensors"
    am.save(model, good)
    return folder, good.read_bytes(), _params_np(model), model.layers


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_MUTATION, min_size=1, max_size=3))
def test_fuzzed_files_load_exactly_or_raise_model_file_error(fuzz_setup, ops):
    folder, raw, params, layers = fuzz_setup
    data = _mutate(raw, ops)
    path = folder / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        model = am.load(path)
    except am.ModelFileError as err:
        assert err.path == os.fspath(path) and err.problem
        return
    # a successful load is the original model, bit for bit
    assert model.layers == layers
    _assert_params_identical(_params_np(model), params)


# ----------------------------------------------------------------------------- checkpoints
def _classifier(backend=None, seed=0, dropout=0.2):
    kwargs = backend.model_kwargs() if backend is not None else {"backend": "numpy"}
    return am.MLP([5, 8, 3], layer_norm=True, dropout=dropout, output_activation="softmax", seed=seed, **kwargs)


def _fit_kwargs(**extra):
    return dict(loss="cross_entropy", batch_size=8, progress=False, **extra)


def test_resume_is_bit_identical(backend, tmp_path):
    x, y = _data(n=37)
    xb, yb = backend.asarray(x), backend.asarray(y, np.int64)
    straight = _classifier(backend)
    h_straight = straight.fit(xb, yb, epochs=6, **_fit_kwargs())

    first = _classifier(backend)
    ck = am.Checkpoint(tmp_path / "ck")
    first.fit(xb, yb, epochs=3, callbacks=[ck], **_fit_kwargs())
    assert [p.name for p in ck.saved] == ["epoch-00001.safetensors", "epoch-00002.safetensors",
                                          "epoch-00003.safetensors"]

    resumed = _classifier(backend, seed=123)  # a different seed: everything comes from the checkpoint
    h_resumed = resumed.fit(xb, yb, epochs=6, resume_from=tmp_path / "ck" / "epoch-00003.safetensors",
                            **_fit_kwargs())
    _assert_params_identical(_params_np(resumed, backend), _params_np(straight, backend))
    assert resumed.steps_ == straight.steps_ == 6 * 5
    assert h_resumed.loss == h_straight.loss and h_resumed.epochs == 6
    assert h_resumed.metrics == h_straight.metrics and len(h_straight["accuracy"]) == 6  # saved and restored
    assert all(backend.same_place(a) for p in resumed.params for a in p.values())


def test_resume_on_another_backend_continues_the_dropout_stream(backend, tmp_path):
    """A checkpoint written by a NumPy run resumes on this row's backend with the same
    dropout masks: the parameters end as the uninterrupted NumPy run's (to rounding)."""
    x, y = _data(n=37)
    straight = _classifier()
    straight.fit(x, y, epochs=4, **_fit_kwargs())
    _classifier().fit(x, y, epochs=2, callbacks=[am.Checkpoint(tmp_path / "ck.safetensors")], **_fit_kwargs())
    resumed = _classifier(backend, seed=99)
    resumed.fit(backend.asarray(x), backend.asarray(y, np.int64), epochs=4, resume_from=tmp_path / "ck.safetensors",
                **_fit_kwargs())
    assert resumed.rng.counter == straight.rng.counter == 4 * 5
    for p, q in zip(_params_np(straight), _params_np(resumed, backend)):
        for k in p:
            np.testing.assert_allclose(q[k], p[k], rtol=2e-4, atol=2e-5)


def test_resume_keeps_early_stopping_state(backend, tmp_path):
    """min_delta is so large that only the first epoch counts as an improvement: an
    uninterrupted run stops after epoch 5 (patience 4) and puts back epoch 0's
    parameters. A run interrupted after 3 epochs must resume with the same wait count
    and best parameters, not start afresh (which would stop 3 epochs later and put
    back epoch 3's)."""
    x, y = _data(n=37)
    xb, yb = backend.asarray(x), backend.asarray(y, np.int64)

    def stopper():
        return am.EarlyStopping("loss", patience=4, min_delta=1e9)

    one_epoch = _classifier(backend)
    one_epoch.fit(xb, yb, epochs=1, **_fit_kwargs())
    straight = _classifier(backend)
    h_straight = straight.fit(xb, yb, epochs=20, early_stopping=stopper(), **_fit_kwargs())
    assert h_straight.stopped_early and h_straight.epochs == 6 and h_straight.best_epoch == 0
    _assert_params_identical(_params_np(straight, backend), _params_np(one_epoch, backend))

    es = stopper()
    ck = am.Checkpoint(tmp_path / "ck")
    # the checkpoint is listed first, yet it saves the stopper's state of the same epoch
    _classifier(backend).fit(xb, yb, epochs=3, callbacks=[ck], early_stopping=es, **_fit_kwargs())
    assert (es.best_epoch, es.wait) == (0, 2)

    es2 = stopper()
    resumed = _classifier(backend, seed=9)
    h_resumed = resumed.fit(xb, yb, epochs=20, early_stopping=es2, resume_from=tmp_path / "ck", **_fit_kwargs())
    assert h_resumed.stopped_early and h_resumed.epochs == 6 and h_resumed.best_epoch == 0
    assert (es2.best, es2.wait) == (es.best, 5)
    _assert_params_identical(_params_np(resumed, backend), _params_np(straight, backend))
    assert all(backend.same_place(a) for p in resumed.params for a in p.values())


def test_checkpoint_without_stopper_resumes_into_one(tmp_path):
    """A checkpoint saved with no early stopping leaves a resumed run's stopper fresh;
    one saved with it resumes a run without one."""
    x, y = _data(n=24)
    am.MLP([5, 4, 3], seed=0).fit(x, y, loss="cross_entropy", epochs=2, progress=False,
                                  callbacks=[am.Checkpoint(tmp_path / "a")])
    es = am.EarlyStopping("loss", patience=3)
    h = am.MLP([5, 4, 3], seed=0).fit(x, y, loss="cross_entropy", epochs=4, progress=False, early_stopping=es,
                                      resume_from=tmp_path / "a")
    assert h.epochs == 4 and es.best_epoch in (2, 3)  # counted from the resumed epochs only
    am.MLP([5, 4, 3], seed=0).fit(x, y, loss="cross_entropy", epochs=2, progress=False,
                                  early_stopping=am.EarlyStopping("loss"), callbacks=[am.Checkpoint(tmp_path / "b")])
    h = am.MLP([5, 4, 3], seed=0).fit(x, y, loss="cross_entropy", epochs=3, progress=False,
                                      resume_from=tmp_path / "b")
    assert h.epochs == 3


@pytest.mark.parametrize("optimizer", [
    am.SGD(lr=0.05, momentum=0.9, nesterov=True),
    am.AdamW(lr=0.01, weight_decay=0.1, amsgrad=True),
    am.RMSprop(lr=0.01, centered=True, momentum=0.5),
    am.Adagrad(lr=0.05),
], ids=lambda o: o.name)
def test_resume_every_optimizer_with_plateau_schedule(optimizer, tmp_path):
    x, y = _data(n=30)
    opt_args = optimizer.hyperparameters()

    def run(epochs, **kw):
        model = _classifier()
        sched = am.ReduceOnPlateau(opt_args["lr"], factor=0.5, patience=0, threshold=0.5)
        opt = type(optimizer)(**opt_args)
        hist = model.fit(x, y, epochs=epochs, optimizer=opt, schedule=sched, validation_split=0.2,
                         **_fit_kwargs(**kw))
        return model, hist, sched

    straight, h1, s1 = run(6)
    run(4, callbacks=[am.Checkpoint(tmp_path, every=2, keep=1)])
    assert sorted(os.listdir(tmp_path)) == ["epoch-00004.safetensors"]
    resumed, h2, s2 = run(6, resume_from=tmp_path)
    _assert_params_identical(_params_np(resumed), _params_np(straight))
    assert h2.lr == h1.lr and len(set(h1.lr)) > 1  # the plateau schedule did reduce, identically
    assert h2.val_loss == h1.val_loss
    assert s2.state_dict() == s1.state_dict()


def test_checkpoint_contents_and_load_checkpoint(tmp_path):
    x, y = _data()
    model = _classifier()
    path = tmp_path / "last.safetensors"
    model.fit(x, y, epochs=2, callbacks=[am.Checkpoint(path)], **_fit_kwargs())
    header, _ = _header(path)
    meta = header.pop("__metadata__")
    assert meta["kind"] == "checkpoint"
    assert "optimizer.0.W.exp_avg" in header and "optimizer.1.gamma.exp_avg_sq" in header
    ck = json.loads(meta["checkpoint"])
    assert ck["epoch"] == 2 and ck["steps"] == 10
    assert ck["optimizer"]["optimizer"] == "adam" and ck["optimizer"]["step"] == 10
    assert ck["rng"]["state"]["stream"]["counter"] == 10  # one dropout mask per step, counter-based

    info = amio.load_checkpoint(path)
    assert info["epoch"] == 2 and info["steps"] == 10
    np.testing.assert_array_equal(info["optimizer"]["state"][0]["W"]["exp_avg"],
                                  model.optimizer_.state[0]["W"]["exp_avg"])
    _assert_params_identical(_params_np(info["model"]), _params_np(model))
    plain = am.load(path)  # a checkpoint is a model file too
    _assert_params_identical(_params_np(plain), _params_np(model))
    am.save(model, tmp_path / "m.safetensors")
    with pytest.raises(am.ModelFileError, match="a model file, not a checkpoint"):
        amio.load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_keep_every_and_latest(tmp_path):
    x, y = _data()
    model = _classifier()
    ck = am.Checkpoint(tmp_path / "run", every=2, keep=2)
    model.fit(x, y, epochs=7, callbacks=[ck], **_fit_kwargs())
    assert sorted(os.listdir(tmp_path / "run")) == ["epoch-00004.safetensors", "epoch-00006.safetensors"]
    assert am.Checkpoint.latest(tmp_path / "run").name == "epoch-00006.safetensors"
    assert am.Checkpoint.latest(tmp_path / "empty") is None
    assert len(ck.saved) == 3
    with pytest.raises(ValueError, match="needs a directory"):
        am.Checkpoint(tmp_path / "one.safetensors", monitor="loss")
    with pytest.raises(ValueError, match="mode must be"):
        am.Checkpoint(tmp_path, monitor="loss", mode="lowest")
    with pytest.raises(ValueError, match="every must be a positive int"):
        am.Checkpoint(tmp_path, every=0)


class _Logs(am.Callback):
    """Puts a constructed value into each epoch's logs, before the checkpoint reads them."""

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, model, logs):
        logs["score"] = self.values[logs["epoch"]]


def _names(folder):
    return sorted(os.listdir(folder))


def test_checkpoint_keeps_the_last_three_by_default_and_all_with_none(tmp_path):
    x, y = _data()
    ck = am.Checkpoint(tmp_path / "run")
    assert ck.keep == 3
    _classifier().fit(x, y, epochs=12, callbacks=[ck], **_fit_kwargs())
    assert _names(tmp_path / "run") == [f"epoch-{n:05d}.safetensors" for n in (10, 11, 12)]
    assert len(ck.saved) == 12
    _classifier().fit(x, y, epochs=12, callbacks=[am.Checkpoint(tmp_path / "all", keep=None)], **_fit_kwargs())
    assert _names(tmp_path / "all") == [f"epoch-{n:05d}.safetensors" for n in range(1, 13)]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_checkpoint_keeps_the_best_of_a_monitored_value(tmp_path, mode):
    x, y = _data()
    values = [0.9, 0.3, 0.7, 0.2, 0.8, 0.6, 0.5, 0.95, 0.4]
    best = int(np.argmin(values) if mode == "min" else np.argmax(values)) + 1  # completed epochs
    ck = am.Checkpoint(tmp_path / "run", keep=2, monitor="score", mode=mode)
    _classifier().fit(x, y, epochs=len(values), callbacks=[_Logs(values), ck], **_fit_kwargs())
    expected = sorted({best, len(values) - 1, len(values)})
    assert _names(tmp_path / "run") == [f"epoch-{n:05d}.safetensors" for n in expected]
    assert ck.best_path == tmp_path / "run" / f"epoch-{best:05d}.safetensors"
    assert ck.best == (min(values) if mode == "min" else max(values))
    # the best survives a resume: the saved state carries it, so later epochs cannot prune it
    more = values + [0.5, 0.5, 0.5]
    ck2 = am.Checkpoint(tmp_path / "run", keep=2, monitor="score", mode=mode)
    _classifier().fit(x, y, epochs=len(more), callbacks=[_Logs(more), ck2], resume_from=tmp_path / "run",
                      **_fit_kwargs())
    assert ck2.best_epoch == best
    assert _names(tmp_path / "run") == [f"epoch-{n:05d}.safetensors" for n in sorted({best, 11, 12})]


def test_checkpoint_monitor_auto_mode_and_missing_value(tmp_path):
    assert am.Checkpoint(tmp_path, monitor="val_loss").mode == "min"
    assert am.Checkpoint(tmp_path, monitor="val_metric").mode == "max"
    assert am.Checkpoint(tmp_path, monitor="val_accuracy").mode == "max"
    x, y = _data()
    with pytest.raises(ValueError, match="monitors 'val_loss', which training does not log; logged: accuracy, loss, "
                                         "lr. pass validation data"):
        _classifier().fit(x, y, epochs=1, callbacks=[am.Checkpoint(tmp_path, monitor="val_loss")], **_fit_kwargs())

    with pytest.raises(ValueError, match="monitor='score': cannot tell whether higher or lower values are better"):
        am.Checkpoint(tmp_path, monitor="score")


def test_checkpoint_keeps_the_epoch_of_the_best_validation_accuracy(tmp_path):
    """Checkpoint(monitor="val_accuracy") infers mode max, as EarlyStopping does: its best
    checkpoint is the first epoch of the highest validation accuracy the history logged,
    and that file holds the parameters of that epoch."""
    x, y = _data(n=60)
    ck = am.Checkpoint(tmp_path / "run", keep=1, monitor="val_accuracy")
    assert ck.mode == "max"
    model = _classifier(dropout=0.0)
    h = model.fit(x[:40], y[:40], epochs=12, validation_data=(x[40:], y[40:]), callbacks=[ck],
                  **_fit_kwargs(lr=0.05))
    acc = h["val_accuracy"]
    best = int(np.argmax(acc)) + 1  # the first of the highest (completed epochs)
    assert ck.best_epoch == best and ck.best == max(acc)
    restored = amio.load_checkpoint(ck.best_path)["model"]
    assert restored.evaluate(x[40:], y[40:], loss="cross_entropy")["accuracy"] == max(acc)


def test_resume_errors(tmp_path):
    x, y = _data()
    model = _classifier()
    model.fit(x, y, epochs=1, callbacks=[am.Checkpoint(tmp_path / "ck")], **_fit_kwargs())
    other = am.MLP([5, 9, 3], output_activation="softmax", seed=0, backend="numpy")
    with pytest.raises(ValueError, match=r"layer 0 is \{'type': 'Dense', 'n_in': 5, 'n_out': 8.* in the checkpoint "
                                         r"but \{'type': 'Dense', 'n_in': 5, 'n_out': 9.* in the model"):
        other.fit(x, y, epochs=2, resume_from=tmp_path / "ck", **_fit_kwargs())
    with pytest.raises(ValueError, match="holds a float32 model, but the model being restored is float64"):
        am.MLP([5, 8, 3], layer_norm=True, dropout=0.2, output_activation="softmax", dtype="float64",
               backend="numpy").fit(x, y, epochs=2, resume_from=tmp_path / "ck", **_fit_kwargs())
    # the same layers built by hand, with another initialiser and shorthand classes, resume
    by_hand = am.Sequential([am.Dense(5, 8, init="glorot_normal"), am.LayerNorm(8), am.ReLU(), am.Dropout(0.2),
                             am.Dense(8, 3, init="glorot_normal"), am.Softmax()], backend="numpy")
    by_hand.fit(x, y, epochs=1, resume_from=tmp_path / "ck", **_fit_kwargs())
    _assert_params_identical(_params_np(by_hand), _params_np(model))
    with pytest.raises(ValueError, match="saved with optimizer 'adam' but training uses 'sgd'"):
        _classifier().fit(x, y, epochs=2, optimizer="sgd", resume_from=tmp_path / "ck", **_fit_kwargs())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        (tmp_path / "void").mkdir()
        _classifier().fit(x, y, epochs=2, resume_from=tmp_path / "void", **_fit_kwargs())
    am.save(model, tmp_path / "plain.safetensors")
    with pytest.raises(am.ModelFileError, match="not a checkpoint"):
        _classifier().fit(x, y, epochs=2, resume_from=tmp_path / "plain.safetensors", **_fit_kwargs())
    # a resume past the end trains no further
    done = _classifier()
    hist = done.fit(x, y, epochs=1, resume_from=tmp_path / "ck", **_fit_kwargs())
    assert hist.epochs == 1
    _assert_params_identical(_params_np(done), _params_np(model))


def test_resume_takes_a_new_lr_and_refuses_an_optimizer_of_other_settings(backend, tmp_path):
    """fit(lr=..., resume_from=...) trains on at the given rate (as partial_fit's lr=
    does), with the saved moments and step count; the same rate as the saved one ends
    bit-identical to the uninterrupted run. An optimiser instance whose settings differ
    from the saved ones is refused by name instead of being silently replaced by them."""
    x, y = _data(n=24)
    xb, yb = backend.asarray(x), backend.asarray(y, np.int64)
    kwargs = _fit_kwargs(optimizer="adam")
    straight = _classifier(backend)
    straight.fit(xb, yb, epochs=3, lr=0.01, **kwargs)
    _classifier(backend).fit(xb, yb, epochs=2, lr=0.01, callbacks=[am.Checkpoint(tmp_path)], **kwargs)
    same = _classifier(backend, seed=7)
    same.fit(xb, yb, epochs=3, lr=0.01, resume_from=tmp_path, **kwargs)
    _assert_params_identical(_params_np(same, backend), _params_np(straight, backend))

    faster = _classifier(backend, seed=7)
    h = faster.fit(xb, yb, epochs=3, lr=0.05, resume_from=tmp_path, **kwargs)
    assert h.lr == [0.01, 0.01, 0.05] and faster.optimizer_.lr == 0.05
    assert faster.optimizer_.step_count == straight.optimizer_.step_count  # the saved state, continued
    # the same as restoring the checkpoint by hand and training one epoch at the new rate
    by_hand, opt = _classifier(backend, seed=7), am.Adam()
    amio.restore_checkpoint(tmp_path, by_hand, optimizer=opt)
    opt.lr = 0.05
    by_hand.fit(xb, yb, epochs=1, **_fit_kwargs(optimizer=opt))
    _assert_params_identical(_params_np(faster, backend), _params_np(by_hand, backend))
    assert not np.array_equal(_params_np(faster, backend)[0]["W"], _params_np(same, backend)[0]["W"])

    bad = am.Adam(lr=0.02)
    with pytest.raises(ValueError, match=r"saved with Adam\(lr=0.01.*but training was given Adam\(lr=0.02"):
        _classifier(backend).fit(xb, yb, epochs=3, resume_from=tmp_path, **_fit_kwargs(optimizer=bad))
    assert (bad.lr, bad.step_count, bad.state) == (0.02, 0, None)  # the refused instance is left as it was
    with pytest.raises(ValueError, match=r"weight_decay"):
        _classifier(backend).fit(xb, yb, epochs=3, resume_from=tmp_path,
                                 **_fit_kwargs(optimizer=am.Adam(lr=0.01, weight_decay=0.1)))
    ok = _classifier(backend, seed=7)  # an instance with the saved settings resumes exactly
    ok.fit(xb, yb, epochs=3, resume_from=tmp_path, **_fit_kwargs(optimizer=am.Adam(lr=0.01)))
    _assert_params_identical(_params_np(ok, backend), _params_np(straight, backend))


def test_bad_checkpoint_entries(tmp_path):
    x, y = _data()
    model = _classifier()
    model.fit(x, y, epochs=1, **_fit_kwargs())
    path = tmp_path / "ck.safetensors"
    amio.save_checkpoint(path, model, epoch=1)
    metadata, arrays = amio._model_payload(model, "checkpoint")
    header, _ = _header(path)
    good = json.loads(header["__metadata__"]["checkpoint"])
    opt_arrays = {k: safetensors_numpy.load_file(str(path))[k] for k in header if k.startswith("optimizer.")}

    def bad(change, problem, drop=()):
        ck = json.loads(json.dumps(good))
        change(ck)
        meta = dict(metadata, checkpoint=json.dumps(ck))
        tensors = dict(arrays, **{k: v for k, v in opt_arrays.items() if k not in drop})
        amio._write_file(path, meta, tensors)
        with pytest.raises(am.ModelFileError, match=problem):
            amio.restore_checkpoint(path, _classifier(), optimizer=am.Adam())

    bad(lambda ck: ck.update(epoch=-1), "epoch must be a non-negative integer")
    bad(lambda ck: ck["optimizer"].update(optimizer="evil"), "unknown optimizer 'evil'")
    bad(lambda ck: ck["optimizer"]["hyperparameters"].update(lr=-1), "invalid adam hyperparameters")
    bad(lambda ck: ck["optimizer"]["hyperparameters"].update(code="x"), "invalid adam hyperparameters")
    bad(lambda ck: None, "missing: optimizer.0.W.exp_avg", drop=("optimizer.0.W.exp_avg",))
    bad(lambda ck: ck["rng"]["state"].update(host={"bit_generator": "MT19937"}), "random-generator state is invalid")
    bad(lambda ck: ck.update(rng=[1]), "random-generator entry is malformed")
    bad(lambda ck: ck.update(history={"loss": ["a"]}), "history is malformed")
    bad(lambda ck: ck.update(history={"loss": [], "metrics": {"accuracy": ["a"]}}), "history is malformed")
    bad(lambda ck: ck.update(history={"loss": [], "metrics": [1.0]}), "history is malformed")
    bad(lambda ck: ck.update(callbacks={"EarlyStopping": {}}), "callbacks entry is not a list")
    bad(lambda ck: ck.update(callbacks=[{"class": "EarlyStopping"}]), "state of callback 0 is malformed")
    bad(lambda ck: ck.update(callbacks=[{"class": "EarlyStopping", "state": {}, "arrays": {"best_params": [["W"]]}}]),
        "do not have one entry per layer")
    # a well-formed entry whose state does not fit the callback
    wrong = {"class": "EarlyStopping", "state": {"best": "low", "best_epoch": 0, "wait": 0}, "arrays": {}}
    ck = dict(good, callbacks=[wrong])
    amio._write_file(path, dict(metadata, checkpoint=json.dumps(ck)), dict(arrays, **opt_arrays))
    with pytest.raises(am.ModelFileError, match="saved state of EarlyStopping does not fit it: best must be"):
        amio.restore_checkpoint(path, _classifier(), optimizer=am.Adam(), callbacks=[am.EarlyStopping("loss")])


def test_model_trained_with_a_custom_loss_saves_loads_and_resumes(backend, tmp_path):
    """A custom Loss is not in the table, so files do not name it: the model file and
    the checkpoints load, and partial_fit in the same session still knows the loss."""
    from arraymlp.losses import Loss, mse

    x, _ = _data(n=24, d=4)
    xb = backend.asarray(x)
    yb = backend.asarray(x[:, :1] * 2.0)
    mine = Loss("mse", mse, "identity", "same_shape")  # a built-in name, but not the built-in object

    def run(epochs, **kw):
        m = am.MLP([4, 8, 1], seed=0, **backend.model_kwargs())
        m.fit(xb, yb, loss=mine, epochs=epochs, batch_size=8, shuffle=False, progress=False, **kw)
        return m

    m = run(2, callbacks=[am.Checkpoint(tmp_path / "ck")])
    assert m.loss_ is mine
    am.save(m, tmp_path / "m.safetensors")
    back = am.load(tmp_path / "m.safetensors", backend=backend.name, device=backend.device)
    assert not hasattr(back, "loss_")
    _assert_params_identical(_params_np(back, backend), _params_np(m, backend))
    resumed = run(3, resume_from=tmp_path / "ck")
    _assert_params_identical(_params_np(resumed, backend), _params_np(run(3), backend))
    before = float(m.loss(xb, yb))
    m.partial_fit(xb, yb, batch_size=8, shuffle=False)  # no loss=: the custom one is kept
    assert m.loss_ is mine and float(m.loss(xb, yb)) < before


# ------------------------------------------------------------------ what predict returns survives
def _binary(n=30, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 3))
    return x, x[:, 0] + 0.3 * r.normal(size=n) > 0


@pytest.mark.parametrize(("dtype", "shape"), [("int64", (-1,)), ("bool", (-1,)), ("float32", (-1, 1))])
def test_predict_form_survives_save_and_load(backend, tmp_path, dtype, shape):
    x, labels = _binary()
    y = labels.astype(dtype).reshape(shape)
    model = am.MLP([3, 4, 1], output_activation="sigmoid", dtype="float64", seed=0, **backend.model_kwargs())
    xb = backend.asarray(x)
    model.fit(xb, backend.asarray(y), epochs=2, batch_size=8, progress=False)
    want = backend.to_numpy(model.predict(xb))
    path = tmp_path / "binary.safetensors"
    am.save(model, path)
    header, _ = _header(path)
    fitted = json.loads(header["__metadata__"]["model"])["fitted"]
    kind = {"int64": "int", "bool": "bool", "float32": "float"}[dtype]
    assert fitted == {"task_": "multilabel", "loss_": "binary_cross_entropy", "target_ndim_": len(shape),
                      "target_kind_": kind}
    for loaded, xin in ((am.load(path), x), (am.load(path, **backend.model_kwargs()), xb)):
        got = np.asarray(am.to_numpy(loaded.predict(xin)))
        assert got.shape == y.shape and got.dtype.kind == want.dtype.kind
        np.testing.assert_array_equal(got, want)


def test_files_without_the_targets_form_still_load(tmp_path):
    """Files written before the targets' form was recorded: predict answers as it did
    then, 0/1 labels of shape (n, n_outputs) as int64."""
    x, labels = _binary()
    model = am.MLP([3, 4, 1], output_activation="sigmoid", dtype="float64", seed=0, backend="numpy")
    model.fit(x, labels.astype(np.float64), epochs=1, batch_size=8, progress=False)
    path = tmp_path / "old.safetensors"
    metadata, arrays = amio._model_payload(model, "model")
    cfg = json.loads(metadata["model"])
    cfg["fitted"] = {"task_": "multilabel", "loss_": "binary_cross_entropy"}
    amio._write_file(path, dict(metadata, model=json.dumps(cfg, sort_keys=True)), arrays)
    old = am.load(path)
    pred = old.predict(x)
    assert pred.shape == (30, 1) and pred.dtype == np.int64
    np.testing.assert_array_equal(pred[:, 0], model.predict(x).astype(np.int64))
    cfg["fitted"]["target_ndim_"] = 3
    amio._write_file(path, dict(metadata, model=json.dumps(cfg, sort_keys=True)), arrays)
    with pytest.raises(am.ModelFileError, match="invalid target_ndim_ 3; expected 1 or 2"):
        am.load(path)
