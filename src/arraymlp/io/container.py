"""The container of arraymlp files: safetensors framing, checksums and atomic writes.

A file is an 8-byte little-endian header length, a JSON header (the tensors' dtypes,
shapes and offsets, and a ``__metadata__`` mapping of strings to strings), then the raw
little-endian tensor bytes. This module writes such files atomically, with a SHA-256
checksum of their meaning in the metadata, and checks the framing and the format
entries of a file before anything else reads it. What the metadata holds (the
architecture, the training state) is :mod:`arraymlp.io.layout`'s business.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import numpy

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


# ============================================================================ reading
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path: str, data: bytes) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length, checked for framing."""
    size = len(data)
    if size == 0:
        raise ModelFileError(path, "the file is empty")
    if size < 8:
        raise ModelFileError(path, f"the file is {size} bytes long, too short for a safetensors file "
                                   "(8-byte header length first)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(path, f"the header length field claims {n} bytes, more than the {MAX_HEADER_BYTES} "
                                   "allowed (not a safetensors file, or corrupted)")
    if n > size - 8:
        raise ModelFileError(path, f"the header length field claims {n} bytes but only {size - 8} follow it "
                                   "(truncated, or not a safetensors file)")
    if n < 2:
        raise ModelFileError(path, f"the header length field claims {n} bytes, too short for a JSON header "
                                   "(not a safetensors file)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(path, "the header is not UTF-8 text (not a safetensors file, or corrupted)") from None
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(path, f"the header is not valid JSON ({exc}); not a safetensors file, "
                                   "or corrupted") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, f"the header is a JSON {type(header).__name__}, not an object "
                                   "(not a safetensors file)")
    return header, n


def _tensor_entry(path: str, name: str, info, data_len: int) -> tuple:
    """``(dtype code, shape, begin, end)`` of one header entry, checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ModelFileError(path, f"the header entry for tensor {name!r} is malformed "
                                   "(expected dtype, shape and data_offsets)")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in _ST_DTYPES:
        raise ModelFileError(path, f"tensor {name!r} has dtype {code!r}; arraymlp files hold F16, F32 or F64 "
                                   "tensors only")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFileError(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ModelFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    if end > data_len:
        raise ModelFileError(path, f"tensor {name!r} claims bytes {begin}..{end} but the file holds only "
                                   f"{data_len} bytes of tensor data (truncated, or a crafted header)")
    nbytes = math.prod(shape) * _ST_DTYPES[code].itemsize
    if end - begin != nbytes:
        raise ModelFileError(path, f"tensor {name!r} of shape {tuple(shape)} and dtype {code} needs {nbytes} "
                                   f"bytes but its data_offsets span {end - begin}")
    return code, tuple(shape), begin, end


def _check_tiling(path: str, index: dict, data_len: int) -> None:
    """The tensors cover the data section exactly, without overlaps or gaps."""
    position = 0
    for name, (_, _, begin, end) in sorted(index.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            what = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise ModelFileError(path, f"tensor {name!r} {what} in the data section (corrupted or crafted header)")
        position = end
    if position != data_len:
        raise ModelFileError(path, f"the data section has {data_len - position} bytes not covered by any tensor "
                                   "(corrupted, or extra data appended)")


def _parse_container(path: str, data: bytes):
    """Check the safetensors framing of ``data``; return ``(metadata, index, data_start)``.

    ``index`` maps tensor names to ``(dtype code, shape, begin, end)`` with offsets
    relative to the data section. Nothing is allocated from a size the file claims.
    """
    header, n = _read_header(path, data)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise ModelFileError(path, "the header has no __metadata__ entry: a safetensors file, but not one "
                                   "written by arraymlp")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise ModelFileError(path, "the header's __metadata__ is not a mapping of strings to strings")
    data_len = len(data) - 8 - n
    index = {name: _tensor_entry(path, name, info, data_len) for name, info in header.items()}
    _check_tiling(path, index, data_len)
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
