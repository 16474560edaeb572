"""Saving and loading models and training checkpoints, and ONNX export.

Files are `safetensors <https://github.com/huggingface/safetensors>`_ files: an
8-byte little-endian header length, a JSON header, then the raw little-endian
tensor bytes. Nothing is pickled and nothing in a file is ever executed: layers are
rebuilt from a fixed table of layer types and activation names, and every field of
the header is checked before any array is made. See ``docs/persistence.md`` for the
format, its guarantees and examples.

- :func:`save` / :func:`load`: a model's architecture and parameters; a model saved
  from any backend loads on any other.
- :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`restore_checkpoint` and
  the :class:`Checkpoint` callback: everything a training run needs to continue
  bit-identically (optimiser moments, step counts, schedule state, random-generator
  state); ``fit(..., resume_from=path)`` uses them.
- :func:`export_onnx`: the inference graph as an ONNX model (the ``onnx`` extra).

Every problem with a file's contents raises :class:`ModelFileError`, whose message
names the file and the problem. Writes are atomic: a temporary file in the target's
folder is written, flushed and synced, then renamed over the target, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import numbers
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Sequence

import numpy

from . import functional as F
from . import layers as L
from ._backend import Generator, backend_name, canonical_device, resolve_backend, resolve_dtype, to_numpy
from .callbacks import Callback, History
from .init import INITIALIZERS
from .losses import LOSSES
from .model import MLP, Sequential
from .optim import OPTIMIZERS, Optimizer

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "ModelFileError",
    "export_onnx",
    "load",
    "load_checkpoint",
    "restore_checkpoint",
    "save",
    "save_checkpoint",
]

#: Version of the file layout written by this release; files with a larger version
#: are refused with a message asking for a newer arraymlp.
FORMAT_VERSION = 1

#: Value of the ``"format"`` metadata entry of every arraymlp file.
FORMAT_NAME = "arraymlp"

#: Largest JSON header accepted (the limit the safetensors library itself uses).
MAX_HEADER_BYTES = 100_000_000

_CHUNK = 1 << 20

# safetensors dtype code -> NumPy dtype (little-endian), and back by dtype name.
_ST_DTYPES = {"F16": numpy.dtype("<f2"), "F32": numpy.dtype("<f4"), "F64": numpy.dtype("<f8")}
_ST_CODES = {"float16": "F16", "float32": "F32", "float64": "F64"}

_LAYER_KEYS = {
    "Dense": {"type", "n_in", "n_out", "bias", "init"},
    "Activation": {"type", "name"},
    "Dropout": {"type", "p"},
    "LayerNorm": {"type", "n", "eps"},
}
_SAVEABLE = (L.Dense, L.Activation, L.Dropout, L.LayerNorm)
_SHORTHANDS = {
    cls.__name__: cls
    for cls in (L.Identity, L.ReLU, L.LeakyReLU, L.ELU, L.GELU, L.SiLU, L.Tanh, L.Sigmoid, L.Softplus,
                L.Softmax, L.LogSoftmax)
}
_MODEL_CLASSES = {"Sequential": Sequential, "MLP": MLP}
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)\.safetensors$")


class ModelFileError(ValueError):
    """A file is not a valid arraymlp model or checkpoint.

    Raised for every problem with a file's contents: empty, truncated or corrupted
    files, files that are not safetensors or not written by arraymlp, headers naming
    unknown layers or activations, tensors whose shapes do not match the
    architecture, checksum mismatches, and files from a newer format version. Errors
    of the file system (a missing file, no permission) stay :class:`OSError`.

    Attributes
    ----------
    path : str
        The file.
    problem : str
        What is wrong with it.

    Examples
    --------
    >>> import tempfile, os
    >>> import arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> path = os.path.join(d, "empty.safetensors")
    >>> open(path, "wb").close()
    >>> try:
    ...     am.load(path)
    ... except am.ModelFileError as err:
    ...     print(err.problem, err.path == path, isinstance(err, ValueError))
    the file is empty True True
    """

    def __init__(self, path: Any, problem: str):
        self.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


# ============================================================================ writing
def _write_chunks(f, data) -> None:
    """Write ``data`` (bytes-like) to the open binary file ``f``, 1 MiB at a time."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start:start + _CHUNK])


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old contents or
    all of ``data``, never a mixture: a temporary file in the same folder is written,
    flushed, synced to disk and renamed over ``path`` (``os.replace``)."""
    path = Path(path)
    folder = path.absolute().parent
    if not folder.is_dir():
        msg = f"cannot write {os.fspath(path)}: the folder {os.fspath(folder)} does not exist"
        raise FileNotFoundError(msg)
    # the name's first 200 characters: a target name near the 255-byte limit stays writable
    tmp = folder / f".{path.name[:200]}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb", closefd=True) as f:
            _write_chunks(f, data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # keep an existing file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _require_safetensors():
    try:
        import safetensors.numpy as stnp
    except ImportError as exc:
        msg = (
            "saving and loading arraymlp files needs the safetensors package; "
            "install it with `pip install arraymlp[io]` (or `pip install safetensors`)"
        )
        raise ImportError(msg) from exc
    return stnp


def _canonical(metadata: dict[str, str], index: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    body = {
        "metadata": {k: v for k, v in metadata.items() if k != "sha256"},
        "tensors": {name: {"dtype": code, "shape": list(shape)} for name, (code, shape) in index.items()},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _content_digest(metadata: dict[str, str], index: dict[str, tuple[str, tuple[int, ...]]], buffers) -> str:
    """SHA-256 of a file's meaning: the canonical JSON of its metadata (less the
    ``sha256`` entry) and tensor index, then each tensor's bytes in name order.

    ``buffers`` maps tensor names to bytes-like objects (the little-endian data).
    """
    h = hashlib.sha256(_canonical(metadata, index))
    for name in sorted(index):
        h.update(buffers[name])
    return h.hexdigest()


def _write_file(path: Any, metadata: dict[str, str], tensors: dict[str, numpy.ndarray]) -> None:
    stnp = _require_safetensors()
    arrays = {}
    for name, a in tensors.items():
        a = numpy.asarray(a)
        arrays[name] = numpy.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    index = {name: (_ST_CODES[a.dtype.name], tuple(a.shape)) for name, a in arrays.items()}
    metadata = dict(metadata)
    metadata["sha256"] = _content_digest(metadata, index, {n: a.data for n, a in arrays.items()})
    data = stnp.save(arrays, metadata=metadata)
    _write_atomic(Path(os.fspath(path)), data)


# ------------------------------------------------------------------- model payloads
def _param_shapes(layer: L.Layer) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a layer's parameters, from its configuration alone."""
    if isinstance(layer, L.Dense):
        shapes = {"W": (layer.n_in, layer.n_out)}
        if layer.bias:
            shapes["b"] = (layer.n_out,)
        return shapes
    if isinstance(layer, L.LayerNorm):
        return {"gamma": (layer.n_in,), "beta": (layer.n_in,)}
    return {}


def _layer_config(i: int, layer: L.Layer) -> dict[str, Any]:
    """The stored form of one layer (its ``config()``, plus the shorthand class name)."""
    if not (type(layer) in _SAVEABLE or type(layer) in _SHORTHANDS.values()):
        msg = (
            f"cannot save layer {i} ({layer!r}): arraymlp files store Dense, Activation (and its "
            "shorthands such as ReLU()), Dropout and LayerNorm layers only"
        )
        raise TypeError(msg)
    cfg = dict(layer.config())
    if cfg.get("type") == "Dense" and cfg.get("init") not in INITIALIZERS:
        cfg["init"] = "glorot_uniform"  # a custom initialiser callable is not stored (the weights are)
    if type(layer) in _SHORTHANDS.values():
        cfg["class"] = type(layer).__name__
    return cfg


def _seed_for_json(seed: Any) -> Any:
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, (list, tuple)) and all(isinstance(s, numbers.Integral) for s in seed):
        return [int(s) for s in seed]
    return None


def _model_config(model: Sequential) -> dict[str, Any]:
    cls = "MLP" if isinstance(model, MLP) else "Sequential"
    cfg = {
        "class": cls,
        "layers": [_layer_config(i, layer) for i, layer in enumerate(model.layers)],
        "dtype": model.dtype_name,
        "seed": _seed_for_json(model.seed),
    }
    fitted = {k: getattr(model, k) for k in ("task_", "loss_") if isinstance(getattr(model, k, None), str)}
    if fitted:
        cfg["fitted"] = fitted
    return cfg


def _host(a: Any, dtype: numpy.dtype) -> numpy.ndarray:
    h = numpy.asarray(to_numpy(a))
    return h if h.dtype == dtype else h.astype(dtype)


def _model_payload(model: Sequential, kind: str) -> tuple[dict[str, str], dict[str, numpy.ndarray]]:
    if not isinstance(model, Sequential):
        msg = f"model must be an arraymlp Sequential or MLP, got {type(model).__name__}"
        raise TypeError(msg)
    if model.params is None:
        msg = "the model has no parameters yet; call it once or construct it with backend= before saving"
        raise ValueError(msg)
    import arraymlp

    cfg = _model_config(model)
    dtype = numpy.dtype(model.dtype_name)
    tensors = {}
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        shapes = _param_shapes(layer)
        if set(p) != set(shapes):
            msg = f"layer {i} ({layer!r}) has parameters {sorted(p)} but its configuration needs {sorted(shapes)}"
            raise ValueError(msg)
        for key, shape in shapes.items():
            a = _host(p[key], dtype)
            if tuple(a.shape) != shape:
                msg = f"parameter {key!r} of layer {i} ({layer!r}) has shape {tuple(a.shape)}, expected {shape}"
                raise ValueError(msg)
            tensors[f"layers.{i}.{key}"] = a
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arraymlp_version": arraymlp.__version__,
        "kind": kind,
        "dtype": model.dtype_name,
        "model": json.dumps(cfg, sort_keys=True),
    }
    return metadata, tensors


def save(model: Sequential, path: str | os.PathLike) -> None:
    """Save a model's architecture and parameters to a safetensors file.

    The parameters are stored as tensors named ``layers.{i}.{name}`` (``layers.0.W``,
    ``layers.0.b``, ``layers.1.gamma``, ...), copied to host memory from whatever
    backend and device the model lives on; the architecture, dtype, seed, library
    and format versions and a SHA-256 checksum go in the header's ``__metadata__``.
    The write is atomic (temporary file, flush, fsync, rename).

    Parameters
    ----------
    model : Sequential or MLP
        A model whose parameters exist.
    path : str or path-like
        Target file, conventionally ending in ``.safetensors``; replaced if it exists.

    Raises
    ------
    ImportError
        When the ``safetensors`` package is missing (``pip install arraymlp[io]``).
    TypeError
        When the model holds a layer type that files cannot store.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np, arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> model = am.MLP([3, 4, 2], backend="numpy", seed=0)
    >>> am.save(model, os.path.join(d, "model.safetensors"))
    >>> os.listdir(d)
    ['model.safetensors']
    >>> x = np.ones((5, 3))
    >>> bool(np.array_equal(am.load(os.path.join(d, "model.safetensors"))(x), model(x)))
    True
    """
    metadata, tensors = _model_payload(model, "model")
    _write_file(path, metadata, tensors)


# ============================================================================ reading
class _File:
    """A validated file: metadata, tensors (host NumPy arrays) and the rebuilt architecture."""

    def __init__(self, path, metadata, tensors, model_cfg, layers, checkpoint):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.model_cfg = model_cfg
        self.layers = layers
        self.checkpoint = checkpoint


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_container(path: str, data: bytes):
    """Check the safetensors framing of ``data``; return ``(metadata, index, data_start)``.

    ``index`` maps tensor names to ``(dtype code, shape, begin, end)`` with offsets
    relative to the data section. Nothing is allocated from a size the file claims.
    """
    size = len(data)
    if size == 0:
        raise ModelFileError(path, "the file is empty")
    if size < 8:
        raise ModelFileError(path, f"the file is {size} bytes long, too short for a safetensors file (8-byte header length first)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(path, f"the header length field claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed (not a safetensors file, or corrupted)")
    if n > size - 8:
        raise ModelFileError(path, f"the header length field claims {n} bytes but only {size - 8} follow it (truncated, or not a safetensors file)")
    if n < 2:
        raise ModelFileError(path, f"the header length field claims {n} bytes, too short for a JSON header (not a safetensors file)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(path, "the header is not UTF-8 text (not a safetensors file, or corrupted)") from None
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(path, f"the header is not valid JSON ({exc}); not a safetensors file, or corrupted") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, f"the header is a JSON {type(header).__name__}, not an object (not a safetensors file)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise ModelFileError(path, "the header has no __metadata__ entry: a safetensors file, but not one written by arraymlp")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelFileError(path, "the header's __metadata__ is not a mapping of strings to strings")
    data_len = size - 8 - n
    index = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(path, f"the header entry for tensor {name!r} is malformed (expected dtype, shape and data_offsets)")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _ST_DTYPES:
            raise ModelFileError(path, f"tensor {name!r} has dtype {code!r}; arraymlp files hold F16, F32 or F64 tensors only")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ModelFileError(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise ModelFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ModelFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if end > data_len:
            raise ModelFileError(path, f"tensor {name!r} claims bytes {begin}..{end} but the file holds only {data_len} bytes of tensor data (truncated, or a crafted header)")
        nbytes = math.prod(shape) * _ST_DTYPES[code].itemsize
        if end - begin != nbytes:
            raise ModelFileError(path, f"tensor {name!r} of shape {tuple(shape)} and dtype {code} needs {nbytes} bytes but its data_offsets span {end - begin}")
        index[name] = (code, tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(index.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            what = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise ModelFileError(path, f"tensor {name!r} {what} in the data section (corrupted or crafted header)")
        position = end
    if position != data_len:
        raise ModelFileError(path, f"the data section has {data_len - position} bytes not covered by any tensor (corrupted, or extra data appended)")
    return metadata, index, 8 + n


def _check_metadata(path: str, metadata: dict[str, str]) -> str:
    """Check the format entries; return the kind ("model" or "checkpoint")."""
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(path, "not an arraymlp file: the safetensors metadata has no 'format': 'arraymlp' entry")
    version = metadata.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise ModelFileError(path, f"invalid format_version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ModelFileError(
            path,
            f"written in format version {int(version)} (by arraymlp {metadata.get('arraymlp_version', '?')}), "
            f"but this arraymlp reads versions up to {FORMAT_VERSION}; upgrade arraymlp to load it",
        )
    if int(version) < 1:
        raise ModelFileError(path, f"invalid format_version {version!r}")
    kind = metadata.get("kind")
    if kind not in ("model", "checkpoint"):
        raise ModelFileError(path, f"unknown file kind {kind!r} (expected 'model' or 'checkpoint')")
    if not re.fullmatch(r"[0-9a-f]{64}", metadata.get("sha256", "")):
        raise ModelFileError(path, "the metadata has no valid sha256 checksum entry")
    return kind


def _json_field(path: str, metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise ModelFileError(path, f"the metadata has no {key!r} entry") from None
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(path, f"the metadata entry {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelFileError(path, f"the metadata entry {key!r} is not a JSON object")
    return value


def _layer_from_saved(cfg: Any) -> L.Layer:
    """Rebuild one layer from its stored form; any problem raises ValueError."""
    if not isinstance(cfg, dict):
        msg = f"the layer entry is a {type(cfg).__name__}, not an object"
        raise ValueError(msg)
    cfg = dict(cfg)
    shorthand = cfg.pop("class", None)
    kind = cfg.get("type")
    if kind not in _LAYER_KEYS:
        msg = f"unknown layer type {kind!r}; known layer types: {', '.join(_LAYER_KEYS)}"
        raise ValueError(msg)
    extra = set(cfg) - _LAYER_KEYS[kind]
    if extra:
        msg = f"{kind} layer with unknown fields {sorted(extra)}"
        raise ValueError(msg)
    if kind == "Dense" and not isinstance(cfg.get("bias", True), bool):
        msg = f"Dense bias must be true or false, got {cfg['bias']!r}"
        raise ValueError(msg)
    if kind == "Activation" and not isinstance(cfg.get("name"), str):
        msg = f"unknown activation {cfg.get('name')!r}; known activations: {', '.join(F.ACTIVATIONS)}"
        raise ValueError(msg)
    if kind == "LayerNorm":
        eps = cfg.get("eps", 1e-5)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
            msg = f"LayerNorm eps must be a finite number >= 0, got {eps!r}"
            raise ValueError(msg)
    if kind == "Dropout" and (isinstance(cfg.get("p"), bool) or not isinstance(cfg.get("p"), (int, float))):
        msg = f"Dropout p must be a number in [0, 1), got {cfg.get('p')!r}"
        raise ValueError(msg)
    layer = L.layer_from_config(cfg)
    if shorthand is not None:
        cls = _SHORTHANDS.get(shorthand) if isinstance(shorthand, str) else None
        if cls is None or not isinstance(layer, L.Activation) or cls().name != layer.name:
            msg = f"unknown layer class {shorthand!r} for {layer!r}"
            raise ValueError(msg)
        layer = cls()
    return layer


def _parse_model_config(path: str, cfg: dict[str, Any]) -> tuple[list[L.Layer], dict[str, Any]]:
    cls = cfg.get("class", "Sequential")
    if cls not in _MODEL_CLASSES:
        raise ModelFileError(path, f"unknown model class {cls!r}; known: {', '.join(_MODEL_CLASSES)}")
    dtype = cfg.get("dtype")
    if dtype not in _ST_CODES:
        raise ModelFileError(path, f"unsupported model dtype {dtype!r}; expected float16, float32 or float64")
    seed = cfg.get("seed")
    ok_seed = seed is None or (_is_int(seed) and seed >= 0) or (
        isinstance(seed, list) and all(_is_int(s) and s >= 0 for s in seed))
    if not ok_seed:
        raise ModelFileError(path, f"invalid seed {seed!r}")
    fitted = cfg.get("fitted", {})
    if not isinstance(fitted, dict) or set(fitted) - {"task_", "loss_"}:
        raise ModelFileError(path, f"invalid 'fitted' entry {fitted!r}")
    if "loss_" in fitted and fitted["loss_"] not in LOSSES:
        raise ModelFileError(path, f"unknown loss {fitted['loss_']!r}; known losses: {', '.join(LOSSES)}")
    tasks = {"regression", *(loss.task for loss in LOSSES.values())}
    if "task_" in fitted and fitted["task_"] not in tasks:
        raise ModelFileError(path, f"unknown task {fitted['task_']!r}")
    raw = cfg.get("layers")
    if not isinstance(raw, list) or not raw:
        raise ModelFileError(path, "the architecture has no list of layers")
    layers = []
    for i, item in enumerate(raw):
        try:
            layers.append(_layer_from_saved(item))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise ModelFileError(path, f"layer {i} of the architecture is invalid: {exc}") from None
    try:
        Sequential(layers, dtype=dtype)  # checks that the sizes chain
    except (ValueError, TypeError) as exc:
        raise ModelFileError(path, f"the architecture is invalid: {exc}") from None
    return layers, {"class": cls, "dtype": dtype, "seed": seed, "fitted": fitted}


def _expected_tensors(layers: list[L.Layer]) -> dict[str, tuple[int, ...]]:
    return {f"layers.{i}.{k}": shape for i, layer in enumerate(layers) for k, shape in _param_shapes(layer).items()}


def _nonneg_int(path: str, value: Any, what: str) -> int:
    if not _is_int(value) or value < 0:
        raise ModelFileError(path, f"the checkpoint's {what} must be a non-negative integer, got {value!r}")
    return value


def _parse_checkpoint(path: str, metadata: dict[str, str], layers: list[L.Layer]):
    """Validate the checkpoint entry; return it and the optimiser tensors it expects."""
    ck = _json_field(path, metadata, "checkpoint")
    _nonneg_int(path, ck.get("epoch"), "epoch")
    _nonneg_int(path, ck.get("steps"), "steps")
    expected: dict[str, tuple[int, ...]] = {}
    opt = ck.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or set(opt) != {"optimizer", "hyperparameters", "step", "state"}:
            raise ModelFileError(path, "the checkpoint's optimizer entry is malformed")
        name, hyper = opt["optimizer"], opt["hyperparameters"]
        if name not in OPTIMIZERS:
            raise ModelFileError(path, f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
        if not isinstance(hyper, dict):
            raise ModelFileError(path, "the checkpoint's optimizer hyperparameters are not an object")
        try:
            OPTIMIZERS[name](**hyper)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(path, f"invalid {name} hyperparameters: {exc}") from None
        _nonneg_int(path, opt["step"], "optimizer step")
        skeleton = opt["state"]
        if skeleton is not None:
            if not isinstance(skeleton, list) or len(skeleton) != len(layers):
                raise ModelFileError(path, "the checkpoint's optimizer state does not have one entry per layer")
            for i, (entry, layer) in enumerate(zip(skeleton, layers)):
                shapes = _param_shapes(layer)
                if not isinstance(entry, dict) or set(entry) != set(shapes):
                    raise ModelFileError(path, f"the optimizer state of layer {i} does not match its parameters {sorted(shapes)}")
                for key, slots in entry.items():
                    if not isinstance(slots, list) or not all(isinstance(s, str) and s for s in slots):
                        raise ModelFileError(path, f"the optimizer state of layer {i}, {key!r} is malformed")
                    for slot in slots:
                        expected[f"optimizer.{i}.{key}.{slot}"] = shapes[key]
    rng = ck.get("rng")
    if rng is not None:
        entropy = rng.get("entropy") if isinstance(rng, dict) else None
        ok_entropy = entropy is None or (_is_int(entropy) and entropy >= 0) or (
            isinstance(entropy, list) and all(_is_int(e) and e >= 0 for e in entropy))
        if not isinstance(rng, dict) or set(rng) != {"entropy", "backend", "state"} or not ok_entropy \
                or not isinstance(rng["backend"], str) or not isinstance(rng["state"], dict):
            raise ModelFileError(path, "the checkpoint's random-generator entry is malformed")
    entries = ck.get("callbacks", [])
    if not isinstance(entries, list):
        raise ModelFileError(path, "the checkpoint's callbacks entry is not a list")
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"class", "state", "arrays"} \
                or not isinstance(entry["class"], str) or not isinstance(entry["state"], dict) \
                or not isinstance(entry["arrays"], dict):
            raise ModelFileError(path, f"the checkpoint's state of callback {j} is malformed")
        for name, skeleton in entry["arrays"].items():
            if not isinstance(skeleton, list) or len(skeleton) != len(layers):
                raise ModelFileError(path, f"the arrays {name!r} of callback {j} do not have one entry per layer")
            for i, (keys, layer) in enumerate(zip(skeleton, layers)):
                shapes = _param_shapes(layer)
                if not isinstance(keys, list) or set(keys) != set(shapes) or len(keys) != len(shapes):
                    raise ModelFileError(path, f"the arrays {name!r} of callback {j}, layer {i} do not match its parameters")
                for key in keys:
                    expected[f"callbacks.{j}.{name}.{i}.{key}"] = shapes[key]
    sched = ck.get("schedule")
    if sched is not None and not isinstance(sched, dict):
        raise ModelFileError(path, "the checkpoint's schedule state is not an object")
    hist = ck.get("history")
    if hist is not None:
        ok = isinstance(hist, dict) and isinstance(hist.get("metric_name", ""), str) and all(
            isinstance(hist.get(k, []), list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in hist.get(k, []))
            for k in ("loss", "val_loss", "val_metric", "lr", "time"))
        if not ok:
            raise ModelFileError(path, "the checkpoint's history is malformed")
    return ck, expected


def _read(path: Any) -> _File:
    """Read and fully validate an arraymlp file (model or checkpoint)."""
    shown = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    metadata, index, start = _parse_container(shown, data)
    kind = _check_metadata(shown, metadata)
    view = memoryview(data)
    buffers = {name: view[start + b:start + e] for name, (_, _, b, e) in index.items()}
    digest = _content_digest(metadata, {n: (c, s) for n, (c, s, _, _) in index.items()}, buffers)
    if not hmac.compare_digest(digest, metadata["sha256"]):
        raise ModelFileError(shown, "checksum mismatch: the file is corrupted (its contents do not match the sha256 recorded in its header)")
    cfg = _json_field(shown, metadata, "model")
    layers, model_cfg = _parse_model_config(shown, cfg)
    if metadata.get("dtype", model_cfg["dtype"]) != model_cfg["dtype"]:
        raise ModelFileError(shown, "the metadata's dtype and the architecture's dtype differ")
    expected = _expected_tensors(layers)
    checkpoint = None
    if kind == "checkpoint":
        checkpoint, opt_expected = _parse_checkpoint(shown, metadata, layers)
        expected.update(opt_expected)
    missing = sorted(set(expected) - set(index))
    if missing:
        raise ModelFileError(shown, f"required tensors are missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(index) - set(expected))
    if unexpected:
        raise ModelFileError(shown, f"the file holds tensors the architecture does not use: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    code = _ST_CODES[model_cfg["dtype"]]
    for name, shape in expected.items():
        got_code, got_shape = index[name][0], index[name][1]
        if got_shape != shape:
            raise ModelFileError(shown, f"tensor {name!r} has shape {got_shape} but the architecture needs {shape}")
        if got_code != code:
            raise ModelFileError(shown, f"tensor {name!r} has dtype {got_code} but the model's dtype is {model_cfg['dtype']} ({code})")
    stnp = _require_safetensors()
    try:
        tensors = stnp.load(data)
    except Exception as exc:  # the library's own errors, of whatever class, become ours
        raise ModelFileError(shown, f"safetensors could not read the file: {exc}") from None
    for name, (c, shape, _, _) in index.items():
        a = tensors.get(name)
        if a is None or tuple(a.shape) != shape or a.dtype != _ST_DTYPES[c]:
            raise ModelFileError(shown, f"safetensors returned tensor {name!r} differently from its header")
    return _File(shown, metadata, tensors, model_cfg, layers, checkpoint)


def _to_xp(a: numpy.ndarray, xp, dtype, device) -> Any:
    """A freshly read host array as an array of ``xp`` on ``device``.

    The arrays safetensors returns are new, writeable and owned by nobody else, so
    NumPy models take them as they are (in native byte order).
    """
    a = numpy.asarray(a, dtype=a.dtype.newbyteorder("="))
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = numpy.array(a, copy=True, order="C")
    if backend_name(xp) == "numpy":
        return a
    return xp.asarray(a, dtype=dtype, device=device)


def _build_model(f: _File, backend: Any, device: Any) -> Sequential:
    xp = resolve_backend(backend if backend is not None else "numpy")
    dev = canonical_device(xp, device)
    cfg = f.model_cfg
    cls = _MODEL_CLASSES[cfg["class"]]
    model = cls.__new__(cls)
    Sequential.__init__(model, f.layers, dtype=cfg["dtype"], seed=cfg["seed"])
    if cls is MLP:
        dense = [layer for layer in f.layers if isinstance(layer, L.Dense)]
        model.sizes = [dense[0].n_in] + [layer.n_out for layer in dense] if dense else []
    dtype = resolve_dtype(xp, cfg["dtype"])
    model.params = [
        {k: _to_xp(f.tensors[f"layers.{i}.{k}"], xp, dtype, dev) for k in _param_shapes(layer)}
        for i, layer in enumerate(f.layers)
    ]
    model.xp, model.device, model.dtype = xp, dev, dtype
    model.rng = Generator(cfg["seed"], xp, dev)
    for key, value in cfg["fitted"].items():
        setattr(model, key, value)
    return model


def load(path: str | os.PathLike, backend: Any = None, device: Any = None) -> Sequential:
    """Load a model saved by :func:`save` (or the model of a checkpoint).

    Parameters
    ----------
    path : str or path-like
    backend : str or module, optional
        Where the parameters go: ``"numpy"`` (the default), ``"cupy"``, ``"torch"``,
        ``"array_api_strict"`` or a namespace module; any backend loads a file saved
        from any other.
    device : optional
        Device for the parameters (the backend's default when ``None``).

    Returns
    -------
    Sequential or MLP
        The model, with the saved architecture, dtype, seed and parameters (bit for
        bit); its random generator starts fresh from the saved seed.

    Raises
    ------
    ModelFileError
        For any problem with the file's contents (see the class).
    OSError
        When the file cannot be opened.
    ImportError
        When the ``safetensors`` package is missing (``pip install arraymlp[io]``).

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np, arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> path = os.path.join(d, "model.safetensors")
    >>> am.save(am.MLP([3, 4, 2], dtype="float64", backend="numpy", seed=0), path)
    >>> model = am.load(path)
    >>> type(model).__name__, model.sizes, model.dtype_name
    ('MLP', [3, 4, 2], 'float64')
    >>> model(np.ones((5, 3))).shape
    (5, 2)
    """
    return _build_model(_read(path), backend, device)


# ============================================================================ checkpoints
def _rng_state(model: Sequential) -> dict[str, Any] | None:
    rng = model.rng
    if rng is None:
        return None
    return {
        "entropy": _seed_for_json(rng.seed_sequence.entropy),
        "backend": backend_name(rng.xp),
        "state": rng.get_state(),
    }


def _schedule_state(schedule: Any) -> dict[str, Any] | None:
    get = getattr(schedule, "state_dict", None)
    if schedule is None or not callable(get):
        return None
    state = get()
    return state if state else None


def save_checkpoint(path: str | os.PathLike, model: Sequential, *, optimizer: Optimizer | None = None,
                    schedule: Any = None, epoch: int = 0, steps: int | None = None,
                    history: History | None = None, callbacks: Sequence[Any] = ()) -> None:
    """Save everything needed to continue training ``model`` bit-identically.

    The file is a model file (it loads with :func:`load`) whose metadata also holds a
    ``"checkpoint"`` JSON entry: the number of completed epochs, the step counter, the
    optimiser's name, hyper-parameters and step count, the schedule's state (for a
    :class:`~arraymlp.schedules.ReduceOnPlateau`), the model's random-generator state
    and the history so far, and the state of every callback with one (an
    :class:`~arraymlp.EarlyStopping`'s counters and best parameters). The optimiser's
    moment arrays are tensors named ``optimizer.{i}.{key}.{slot}``
    (``optimizer.0.W.exp_avg``), a callback's arrays ``callbacks.{j}.{name}.{i}.{key}``.

    Parameters
    ----------
    path : str or path-like
    model : Sequential
    optimizer : Optimizer, optional
        Default: the one of the model's last ``fit`` (``model.optimizer_``), if any.
    schedule : Schedule, optional
        Default: the one of the model's last ``fit`` (``model.schedule_``), if any.
    epoch : int
        Number of completed epochs; training resumes with this epoch index.
    steps : int, optional
        Optimisation steps so far; default ``model.steps_`` (0 if unset).
    history : History, optional
        Per-epoch record so far, restored into the resumed run's history.
    callbacks : sequence of Callback
        The run's callbacks; those whose ``state_dict()`` is not None are saved.
    """
    if optimizer is None:
        optimizer = getattr(model, "optimizer_", None)
    if schedule is None:
        schedule = getattr(model, "schedule_", None)
    metadata, tensors = _model_payload(model, "checkpoint")
    dtype = numpy.dtype(model.dtype_name)
    opt_entry = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        skeleton = None
        if sd["state"] is not None:
            skeleton = []
            for i, layer_state in enumerate(sd["state"]):
                entry = {}
                for key, slots in layer_state.items():
                    entry[key] = sorted(slots)
                    for slot, a in slots.items():
                        tensors[f"optimizer.{i}.{key}.{slot}"] = _host(a, dtype)
                skeleton.append(entry)
        opt_entry = {"optimizer": sd["optimizer"], "hyperparameters": sd["hyperparameters"],
                     "step": int(sd["step"]), "state": skeleton}
    if steps is None:
        steps = getattr(model, "steps_", 0)
    hist = None
    if history is not None:
        hist = {k: [float(v) for v in getattr(history, k)] for k in ("loss", "val_loss", "val_metric", "lr", "time")}
        hist["metric_name"] = history.metric_name
    cb_entries = []
    for cb in callbacks:
        state = cb.state_dict()
        if state is None:
            continue
        j = len(cb_entries)
        plain, arrays = {}, {}
        for name, value in state.items():
            if isinstance(value, list) and len(value) == len(model.layers) and all(isinstance(d, dict) for d in value):
                arrays[name] = [sorted(d) for d in value]
                for i, d in enumerate(value):
                    for key, a in d.items():
                        tensors[f"callbacks.{j}.{name}.{i}.{key}"] = _host(a, dtype)
            else:
                plain[name] = value
        cb_entries.append({"class": type(cb).__name__, "state": plain, "arrays": arrays})
    ck = {
        "callbacks": cb_entries,
        "epoch": int(epoch),
        "steps": int(steps),
        "optimizer": opt_entry,
        "schedule": _schedule_state(schedule),
        "rng": _rng_state(model),
        "history": hist,
    }
    metadata["checkpoint"] = json.dumps(ck, sort_keys=True)
    _write_file(path, metadata, tensors)


def _resolve_checkpoint_path(path: Any) -> Path:
    p = Path(os.fspath(path))
    if p.is_dir():
        latest = Checkpoint.latest(p)
        if latest is None:
            msg = f"no checkpoint (epoch-NNNNN.safetensors) in directory {os.fspath(p)}"
            raise FileNotFoundError(msg)
        return latest
    return p


def load_checkpoint(path: str | os.PathLike, backend: Any = None, device: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` or :class:`Checkpoint`.

    Parameters
    ----------
    path : str or path-like
        A checkpoint file, or a directory of them (the latest is read).
    backend, device
        Where the model's parameters go, as for :func:`load`.

    Returns
    -------
    dict
        ``"model"`` (the model), ``"optimizer"`` (an ``Optimizer.state_dict()`` with
        host NumPy arrays, or ``None``), ``"epoch"``, ``"steps"``, ``"schedule"``,
        ``"rng"``, ``"history"`` and ``"path"``.
    """
    p = _resolve_checkpoint_path(path)
    f = _read(p)
    if f.checkpoint is None:
        raise ModelFileError(f.path, "a model file, not a checkpoint (it has no training state); load it with arraymlp.load")
    return _checkpoint_dict(f, _build_model(f, backend, device))


def _checkpoint_dict(f: _File, model: Sequential | None) -> dict[str, Any]:
    ck = f.checkpoint
    opt = ck.get("optimizer")
    if opt is not None:
        state = None
        if opt["state"] is not None:
            state = [
                {key: {slot: f.tensors[f"optimizer.{i}.{key}.{slot}"] for slot in slots} for key, slots in entry.items()}
                for i, entry in enumerate(opt["state"])
            ]
        opt = {"optimizer": opt["optimizer"], "hyperparameters": opt["hyperparameters"], "step": opt["step"],
               "state": state}
    return {"model": model, "optimizer": opt, "epoch": ck["epoch"], "steps": ck["steps"],
            "schedule": ck.get("schedule"), "rng": ck.get("rng"), "history": ck.get("history"), "path": Path(f.path)}


def _numpy_like_rng(kind: str) -> bool:
    return kind not in ("cupy", "torch")


def restore_checkpoint(path: str | os.PathLike, model: Sequential, *, optimizer: Optimizer | None = None,
                       schedule: Any = None, history: History | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Put a checkpoint's training state into a built model and its optimiser.

    This is what ``fit(..., resume_from=path)`` calls; a hand-written training loop
    can call it too. The model keeps its backend and device; the parameters, step
    counter (``model.steps_``) and random-generator state are replaced, the
    optimiser gets the saved hyper-parameters, step count and moments, a stateful
    schedule its counters, and ``history`` the epochs already run.

    Parameters
    ----------
    path : str or path-like
        A checkpoint file, or a directory of them (the latest is used).
    model : Sequential
        A model with the same architecture and dtype, whose parameters exist.
    optimizer : Optimizer, optional
        Must be of the saved kind (``Adam`` for an Adam checkpoint).
    schedule : Schedule, optional
    history : History, optional
    callbacks : sequence of Callback
        Callbacks with a state (``state_dict()`` not None) get the saved state of
        the same class, in order; saved states without such a callback are ignored.

    Returns
    -------
    int
        The number of completed epochs: the index of the epoch to run next.

    Raises
    ------
    ModelFileError
        For any problem with the file's contents.
    ValueError
        When the checkpoint does not fit the model (architecture or dtype) or the
        optimiser (another kind).
    """
    p = _resolve_checkpoint_path(path)
    f = _read(p)
    if f.checkpoint is None:
        raise ModelFileError(f.path, "a model file, not a checkpoint (it has no training state)")
    if model.params is None:
        msg = "the model has no parameters yet; build it (backend= or a first call) before restoring a checkpoint"
        raise ValueError(msg)
    saved = [_layer_config(i, layer) for i, layer in enumerate(f.layers)]
    mine = [_layer_config(i, layer) for i, layer in enumerate(model.layers)]
    for cfgs in (saved, mine):
        for c in cfgs:
            c.pop("class", None)  # ReLU() and Activation("relu") are the same layer
            c.pop("init", None)  # the saved weights replace the initial ones
    if f.model_cfg["dtype"] != model.dtype_name:
        msg = (f"checkpoint {f.path} holds a {f.model_cfg['dtype']} model, but the model being restored is "
               f"{model.dtype_name}; build it with dtype={f.model_cfg['dtype']!r}")
        raise ValueError(msg)
    if saved != mine:
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(saved, mine)) if a != b), None)
        where = (f"layer {diff[0]} is {diff[1]} in the checkpoint but {diff[2]} in the model" if diff is not None
                 else f"the checkpoint has {len(saved)} layers, the model {len(mine)}")
        msg = (
            f"checkpoint {f.path} holds layers {f.layers!r}, but the model being restored has layers "
            f"{model.layers!r}: {where}"
        )
        raise ValueError(msg)
    info = _checkpoint_dict(f, None)
    opt = info["optimizer"]
    if optimizer is not None and opt is not None and opt["optimizer"] != optimizer.name:
        msg = (
            f"checkpoint {f.path} was saved with optimizer {opt['optimizer']!r} but training uses "
            f"{optimizer.name!r}; pass optimizer={opt['optimizer']!r} to resume"
        )
        raise ValueError(msg)
    xp = model.xp
    model.params = [
        {k: _to_xp(f.tensors[f"layers.{i}.{k}"], xp, model.dtype, model.device) for k in _param_shapes(layer)}
        for i, layer in enumerate(model.layers)
    ]
    if optimizer is not None:
        if opt is not None:
            optimizer.load_state_dict(opt)
        else:
            optimizer.reset()
    rng = info["rng"]
    if rng is not None:
        gen = Generator(rng["entropy"], xp, model.device)
        kind = backend_name(xp)
        state = rng["state"]
        try:
            if rng["backend"] == kind or (_numpy_like_rng(rng["backend"]) and _numpy_like_rng(kind)):
                gen.set_state(state)
            else:  # the per-step stream of another library cannot be carried over; the host stream can
                gen.host.bit_generator.state = state["host"]
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the random-generator state is invalid: {exc}") from None
        model.rng = gen
    model.steps_ = info["steps"]
    if schedule is not None and info["schedule"] is not None and callable(getattr(schedule, "load_state_dict", None)):
        try:
            schedule.load_state_dict(info["schedule"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the schedule state does not fit {schedule!r}: {exc}") from None
    hist = info["history"]
    if history is not None and hist is not None:
        for k in ("loss", "val_loss", "val_metric", "lr", "time"):
            setattr(history, k, list(hist.get(k, [])))
        history.metric_name = hist.get("metric_name", history.metric_name) or history.metric_name
    _restore_callbacks(f, model, callbacks)
    for key, value in f.model_cfg["fitted"].items():
        setattr(model, key, value)
    return info["epoch"]


def _restore_callbacks(f: _File, model: Sequential, callbacks: Sequence[Any]) -> None:
    """Give each stateful callback the next saved state of its class."""
    saved = list(enumerate(f.checkpoint.get("callbacks", [])))
    xp = model.xp
    for cb in callbacks:
        if cb.state_dict() is None:
            continue
        match = next((k for k, (_, e) in enumerate(saved) if e["class"] == type(cb).__name__), None)
        if match is None:
            continue
        j, entry = saved.pop(match)
        state = dict(entry["state"])
        for name, skeleton in entry["arrays"].items():
            state[name] = [{key: _to_xp(f.tensors[f"callbacks.{j}.{name}.{i}.{key}"], xp, model.dtype, model.device)
                            for key in keys} for i, keys in enumerate(skeleton)]
        try:
            cb.load_state_dict(state)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the saved state of {type(cb).__name__} does not fit it: {exc}") from None


class Checkpoint(Callback):
    """Training callback that saves a checkpoint every ``every`` epochs.

    Each checkpoint holds the model, the optimiser's state, the schedule's state, the
    random-generator state, the step counter, the epoch, the history and the state of
    the run's other callbacks, such as early stopping (see :func:`save_checkpoint`);
    ``fit(..., resume_from=...)`` continues from it so that an interrupted run ends
    bit-identical (on NumPy) to an uninterrupted one. ``fit`` runs checkpoints after
    the other callbacks of each epoch, so what they save is the epoch's final state.

    Parameters
    ----------
    path : str or path-like
        A directory (created if needed), where the checkpoints are files named
        ``epoch-00003.safetensors`` after the number of completed epochs; or a file
        ending in ``.safetensors``, rewritten (atomically) at each save.
    every : int
        Save after every ``every``-th epoch (counted from the start of training, so
        resumed runs keep the same rhythm).
    keep : int, optional
        Keep only the last ``keep`` checkpoints of the directory (those with the
        highest epoch numbers up to the one just written); ``None`` keeps them all.

    Attributes
    ----------
    saved : list of Path
        Files written by this callback, in order.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np, arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> x, y = np.zeros((4, 2)), np.ones((4, 1))
    >>> ckpt = am.Checkpoint(os.path.join(d, "run"), every=2, keep=1)
    >>> _ = am.MLP([2, 3, 1], backend="numpy", seed=0).fit(x, y, epochs=4, callbacks=[ckpt], progress=False)
    >>> [p.name for p in ckpt.saved], os.listdir(os.path.join(d, "run"))
    (['epoch-00002.safetensors', 'epoch-00004.safetensors'], ['epoch-00004.safetensors'])
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> model.fit(x, y, epochs=6, resume_from=os.path.join(d, "run"), progress=False).epochs
    6
    """

    saves_callbacks = True  # fit runs it last and gives it run_callbacks

    def __init__(self, path: str | os.PathLike, every: int = 1, keep: int | None = None):
        if not _is_int(every) or every < 1:
            msg = f"every must be a positive int, got {every!r}"
            raise ValueError(msg)
        if keep is not None and (not _is_int(keep) or keep < 1):
            msg = f"keep must be a positive int or None, got {keep!r}"
            raise ValueError(msg)
        self.path = Path(os.fspath(path))
        self.single_file = self.path.suffix == ".safetensors"
        if self.single_file and keep not in (None, 1):
            msg = f"keep={keep} needs a directory; {os.fspath(self.path)} names a single file, rewritten at each save"
            raise ValueError(msg)
        self.every, self.keep = every, keep
        self.run_callbacks: Sequence[Callback] = ()  # set by fit: the run's callbacks, whose state is saved
        self.saved: list[Path] = []
        self._history: History | None = None

    def on_train_begin(self, model, history):
        """Remember the run's history, saved with each checkpoint."""
        self._history = history

    def on_epoch_end(self, model, logs):
        """Save a checkpoint when the number of completed epochs is a multiple of ``every``."""
        done = logs["epoch"] + 1
        if done % self.every:
            return None
        if self.single_file:
            target = self.path
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            target = self.path / f"epoch-{done:05d}.safetensors"
        save_checkpoint(target, model, epoch=done, steps=logs["step"], history=self._history,
                        callbacks=self.run_callbacks)
        self.saved.append(target)
        if not self.single_file and self.keep is not None:
            self._prune(done)
        return None

    def _prune(self, upto: int) -> None:
        found = sorted((n, p) for n, p in self._scan(self.path) if n <= upto)
        for _, p in found[:-self.keep]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    @staticmethod
    def _scan(directory: Path) -> list[tuple[int, Path]]:
        out = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                m = _CHECKPOINT_NAME.match(entry.name)
                if m and entry.is_file():
                    out.append((int(m.group(1)), Path(entry.path)))
        return out

    @staticmethod
    def latest(directory: str | os.PathLike) -> Path | None:
        """The checkpoint with the highest epoch number in ``directory`` (``None`` if none)."""
        found = Checkpoint._scan(Path(os.fspath(directory)))
        return max(found)[1] if found else None

    def __repr__(self) -> str:
        return f"Checkpoint({os.fspath(self.path)!r}, every={self.every}, keep={self.keep})"


# ============================================================================ ONNX
def _require_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        msg = "ONNX export needs the onnx package; install it with `pip install arraymlp[onnx]`"
        raise ImportError(msg) from exc
    return onnx, helper, numpy_helper


def export_onnx(model: Sequential, path: str | os.PathLike, *, opset: int = 17):
    """Export a model's inference graph as an ONNX file.

    The graph has one input ``"input"`` of shape ``("batch", n_features)`` and one
    output ``"output"`` of shape ``("batch", n_outputs)``, in the model's dtype.
    Dense layers become ``Gemm`` (``MatMul`` without bias), LayerNorm
    ``LayerNormalization``, Dropout nothing (it is the identity at inference), and
    activations their ONNX operators (``Relu``, ``LeakyRelu`` with alpha 0.01,
    ``Elu``, ``Tanh``, ``Sigmoid``, ``Softplus``, ``Softmax`` and ``LogSoftmax`` over
    the last axis); SiLU is ``x * Sigmoid(x)`` and GELU its tanh form (the ``Gelu``
    operator with ``approximate="tanh"`` from opset 20, elementary operators below).

    Parameters
    ----------
    model : Sequential or MLP
        A model whose parameters exist, on any backend.
    path : str or path-like
        Target ``.onnx`` file, written atomically.
    opset : int
        ONNX operator-set version, at least 17.

    Returns
    -------
    onnx.ModelProto
        The exported model (already checked with ``onnx.checker``).

    Raises
    ------
    ImportError
        When the ``onnx`` package is missing (``pip install arraymlp[onnx]``).

    Examples
    --------
    >>> import tempfile, os
    >>> import arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> model = am.MLP([3, 4, 2], backend="numpy", seed=0)
    >>> proto = am.export_onnx(model, os.path.join(d, "model.onnx"))
    >>> [node.op_type for node in proto.graph.node]
    ['Gemm', 'Relu', 'Gemm']
    >>> [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    (['input'], ['output'])
    >>> os.listdir(d)
    ['model.onnx']
    """
    onnx, helper, numpy_helper = _require_onnx()
    if not _is_int(opset) or opset < 17:
        msg = f"opset must be an int >= 17 (LayerNormalization needs 17), got {opset!r}"
        raise ValueError(msg)
    if not isinstance(model, Sequential):
        msg = f"model must be an arraymlp Sequential or MLP, got {type(model).__name__}"
        raise TypeError(msg)
    if model.params is None:
        msg = "the model has no parameters yet; call it once or construct it with backend= before exporting"
        raise ValueError(msg)
    import arraymlp

    np_dtype = numpy.dtype(model.dtype_name)
    elem = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT,
            "float64": onnx.TensorProto.DOUBLE}[model.dtype_name]
    nodes: list[Any] = []
    inits: list[Any] = []

    def tensor(name: str, value) -> str:
        inits.append(numpy_helper.from_array(numpy.ascontiguousarray(numpy.asarray(value, dtype=np_dtype)), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    emitting = [i for i, layer in enumerate(model.layers) if not isinstance(layer, L.Dropout)]
    last = emitting[-1]
    cur = "input"
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        if isinstance(layer, L.Dropout):
            continue
        out = "output" if i == last else f"layer{i}"
        pre = f"layer{i}"
        if isinstance(layer, L.Dense):
            W = tensor(f"{pre}.W", to_numpy(p["W"]))
            if layer.bias:
                cur = node("Gemm", [cur, W, tensor(f"{pre}.b", to_numpy(p["b"]))], out)
            else:
                cur = node("MatMul", [cur, W], out)
        elif isinstance(layer, L.LayerNorm):
            g, b = tensor(f"{pre}.gamma", to_numpy(p["gamma"])), tensor(f"{pre}.beta", to_numpy(p["beta"]))
            cur = node("LayerNormalization", [cur, g, b], out, axis=-1, epsilon=layer.eps)
        elif isinstance(layer, L.Activation):
            cur = _onnx_activation(layer.name, cur, out, pre, node, tensor, opset, exact=np_dtype == numpy.float64)
        else:
            msg = f"cannot export layer {i} ({layer!r}) to ONNX: only Dense, Activation, Dropout and LayerNorm are supported"
            raise TypeError(msg)
    n_in, n_out = model.n_features_in, model.n_outputs
    graph = helper.make_graph(
        nodes, "arraymlp",
        [helper.make_tensor_value_info("input", elem, ["batch", n_in])],
        [helper.make_tensor_value_info("output", elem, ["batch", n_out])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="arraymlp",
                              producer_version=arraymlp.__version__,
                              doc_string=f"arraymlp {type(model).__name__}: {len(model.layers)} layers, {model.dtype_name}")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(proto, {"arraymlp_version": arraymlp.__version__,
                                   "arraymlp_model": json.dumps(_model_config(model), sort_keys=True)})
    onnx.checker.check_model(proto)
    _write_atomic(Path(os.fspath(path)), proto.SerializeToString())
    return proto


def _onnx_activation(name: str, x: str, out: str, pre: str, node, tensor, opset: int, exact: bool = False) -> str:
    """Nodes computing activation ``name`` of ``x`` into ``out``; returns ``out``.

    ``exact`` (float64 models) builds LeakyReLU, ELU, softplus and GELU from elementary
    operators with constants in the model's dtype: ONNX keeps operator attributes such
    as ``alpha`` in float32, and onnxruntime has no float64 kernel for some of these
    operators at some opsets.
    """
    if exact and name == "leaky_relu":  # max(x, slope x), for 0 < slope < 1
        return node("Max", [x, node("Mul", [x, tensor(f"{pre}.slope", F.LEAKY_SLOPE)], f"{pre}.sx")], out)
    if exact and name == "elu":  # relu(x) + alpha (exp(min(x, 0)) - 1)
        neg = node("Min", [x, tensor(f"{pre}.zero", 0.0)], f"{pre}.neg")
        em1 = node("Sub", [node("Exp", [neg], f"{pre}.exp"), tensor(f"{pre}.one", 1.0)], f"{pre}.em1")
        scaled = node("Mul", [em1, tensor(f"{pre}.alpha", F.ELU_ALPHA)], f"{pre}.scaled")
        return node("Add", [node("Relu", [x], f"{pre}.relu"), scaled], out)
    if exact and name == "softplus":  # relu(x) + log(1 + exp(-|x|)), never overflowing
        e = node("Exp", [node("Neg", [node("Abs", [x], f"{pre}.abs")], f"{pre}.negabs")], f"{pre}.exp")
        log1pe = node("Log", [node("Add", [e, tensor(f"{pre}.one", 1.0)], f"{pre}.onepe")], f"{pre}.log")
        return node("Add", [node("Relu", [x], f"{pre}.relu"), log1pe], out)
    simple = {"identity": "Identity", "relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus"}
    if name in simple:
        return node(simple[name], [x], out)
    if name == "leaky_relu":
        return node("LeakyRelu", [x], out, alpha=F.LEAKY_SLOPE)
    if name == "elu":
        return node("Elu", [x], out, alpha=F.ELU_ALPHA)
    if name == "softmax":
        return node("Softmax", [x], out, axis=-1)
    if name == "log_softmax":
        return node("LogSoftmax", [x], out, axis=-1)
    if name == "silu":
        return node("Mul", [x, node("Sigmoid", [x], f"{pre}.sigmoid")], out)
    if name == "gelu":
        if opset >= 20 and not exact:
            return node("Gelu", [x], out, approximate="tanh")
        # y = 0.5 x (1 + tanh(c (x + k x^3)))
        x3 = node("Mul", [node("Mul", [x, x], f"{pre}.x2"), x], f"{pre}.x3")
        inner = node("Add", [x, node("Mul", [x3, tensor(f"{pre}.k", F._GELU_K)], f"{pre}.kx3")], f"{pre}.inner")
        t = node("Tanh", [node("Mul", [inner, tensor(f"{pre}.c", F._GELU_C)], f"{pre}.scaled")], f"{pre}.tanh")
        half_x = node("Mul", [x, tensor(f"{pre}.half", 0.5)], f"{pre}.half_x")
        return node("Mul", [half_x, node("Add", [t, tensor(f"{pre}.one", 1.0)], f"{pre}.one_plus_t")], out)
    msg = f"cannot export activation {name!r} to ONNX; known activations: {', '.join(F.ACTIVATIONS)}"
    raise ValueError(msg)
