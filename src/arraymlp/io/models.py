"""Model files: :func:`save` and :func:`load`, and :func:`load_checkpoint`, which
rebuilds the model a checkpoint holds.

This is the one module of :mod:`arraymlp.io` that knows the model classes; the others
read and write files without them.
"""

from __future__ import annotations

import os
from typing import Any

from .. import layers as L
from .._backend import Generator, MemberGenerators, canonical_device, resolve_backend, resolve_dtype
from ..model import MLP, Sequential
from .checkpoints import _checkpoint_dict, _resolve_checkpoint_path
from .container import ModelFileError, _write_file
from .layout import _File, _model_payload, _param_shapes, _read, _to_xp

__all__ = ["load", "load_checkpoint", "save"]

_MODEL_CLASSES = {"Sequential": Sequential, "MLP": MLP}


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


def _build_model(f: _File, backend: Any, device: Any) -> Sequential:
    xp = resolve_backend(backend if backend is not None else "numpy")
    dev = canonical_device(xp, device)
    cfg = f.model_cfg
    cls = _MODEL_CLASSES[cfg["class"]]
    model = cls.__new__(cls)
    Sequential.__init__(model, f.layers, dtype=cfg["dtype"], seed=cfg["seed"], ensemble=cfg.get("ensemble"))
    if model.ensemble is not None:
        model.member_seeds = list(cfg["member_seeds"])
    if cls is MLP:
        dense = [layer for layer in f.layers if isinstance(layer, L.Dense)]
        model.sizes = [dense[0].n_in] + [layer.n_out for layer in dense] if dense else []
    dtype = resolve_dtype(xp, cfg["dtype"])
    model.params = [
        {k: _to_xp(f.tensors[f"layers.{i}.{k}"], xp, dtype, dev) for k in _param_shapes(layer, model.ensemble)}
        for i, layer in enumerate(f.layers)
    ]
    model.xp, model.device, model.dtype = xp, dev, dtype
    model.rng = Generator(cfg["seed"], xp, dev)
    if model.ensemble is not None:  # and each member's streams, as a plain model of its seed loads them
        model.rng = MemberGenerators(model.rng, [Generator(s, xp, dev) for s in model.member_seeds])
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
        raise ModelFileError(
            f.path, "a model file, not a checkpoint (it has no training state); load it with arraymlp.load")
    return _checkpoint_dict(f, _build_model(f, backend, device))
