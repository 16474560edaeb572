"""The layout of arraymlp files inside the container: what a model file and a
checkpoint hold, and reading either with every field checked.

The metadata holds the format entries (:mod:`arraymlp.io.container`), the library
version, the kind (``"model"`` or ``"checkpoint"``), the dtype, the architecture as JSON
(``"model"``: the model class, one entry per layer, the seed and what ``fit`` recorded)
and, in a checkpoint, the training state (``"checkpoint"``). The tensors are the
parameters, ``layers.{i}.{name}``, and in a checkpoint the optimiser's moments and the
callbacks' arrays. Layers are rebuilt from a fixed table of layer types and activation
names; nothing in a file is executed. Building a model from a file is
:mod:`arraymlp.io.models`'s: this module does not know the model classes, only the
names files give them.
"""

from __future__ import annotations

import hmac
import json
import math
import numbers
import os
from typing import Any

import numpy

from .. import functional as F
from .. import layers as L
from .._backend import backend_name, to_numpy
from .._version import __version__
from ..init import INITIALIZERS
from ..losses import LOSSES
from ..optim import OPTIMIZERS
from .container import (
    _ST_CODES,
    _ST_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    ModelFileError,
    _check_metadata,
    _content_digest,
    _is_int,
    _json_field,
    _parse_container,
    _require_safetensors,
)

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

#: The model classes files store, by the names they give them (``"class"`` in the
#: architecture); :mod:`arraymlp.io.models` maps the names to the classes.
_MODEL_CLASS_NAMES = ("Sequential", "MLP")


def _model_class(model: Any) -> str | None:
    """The name files give the class of ``model`` (the ``_file_class`` of
    :class:`~arraymlp.Sequential` and :class:`~arraymlp.MLP`, which subclasses inherit),
    or None when ``model`` is not an arraymlp model."""
    name = getattr(type(model), "_file_class", None)
    return name if name in _MODEL_CLASS_NAMES else None


# ------------------------------------------------------------------- model payloads
def _param_shapes(layer: L.Layer, k: int | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a layer's parameters, from its configuration alone (with a
    leading member axis for an ensemble of ``k`` members: (k, n_in, n_out), (k, 1, n))."""
    if k is not None:
        return {key: (k, *shape) if len(shape) == 2 else (k, 1, *shape)
                for key, shape in _param_shapes(layer).items()}
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


def _model_config(model: Any) -> dict[str, Any]:
    cls = _model_class(model)
    cfg = {
        "class": cls,
        "layers": [_layer_config(i, layer) for i, layer in enumerate(model.layers)],
        "dtype": model.dtype_name,
        "seed": _seed_for_json(model.seed),
    }
    if getattr(model, "ensemble", None) is not None:
        cfg["ensemble"] = int(model.ensemble)
        cfg["member_seeds"] = [_seed_for_json(s) for s in model.member_seeds]
    fitted = {k: getattr(model, k) for k in ("task_", "loss_", "target_kind_")
              if isinstance(getattr(model, k, None), str)}
    ndim = getattr(model, "target_ndim_", None)
    if isinstance(ndim, int) and not isinstance(ndim, bool):
        fitted["target_ndim_"] = ndim
    if fitted:
        cfg["fitted"] = fitted
    return cfg


def _host(a: Any, dtype: numpy.dtype) -> numpy.ndarray:
    h = numpy.asarray(to_numpy(a))
    return h if h.dtype == dtype else h.astype(dtype)


def _check_built(model: Any, doing: str) -> None:
    """Raise unless ``model`` is an arraymlp model whose parameters exist (``doing``:
    what needs them, for the message)."""
    if _model_class(model) is None:
        msg = f"model must be an arraymlp Sequential or MLP, got {type(model).__name__}"
        raise TypeError(msg)
    if model.params is None:
        msg = f"the model has no parameters yet; call it once or construct it with backend= before {doing}"
        raise ValueError(msg)


def _model_payload(model: Any, kind: str) -> tuple[dict[str, str], dict[str, numpy.ndarray]]:
    _check_built(model, "saving")
    if getattr(model, "ensemble", None) is not None and kind not in ("model", "checkpoint"):
        msg = f"an ensemble is saved with arraymlp.save; {kind}s of ensembles are not supported yet"
        raise NotImplementedError(msg)
    cfg = _model_config(model)
    dtype = numpy.dtype(model.dtype_name)
    tensors = {}
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        shapes = _param_shapes(layer, getattr(model, "ensemble", None))
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
        "arraymlp_version": __version__,
        "kind": kind,
        "dtype": model.dtype_name,
        "model": json.dumps(cfg, sort_keys=True),
    }
    return metadata, tensors


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
    if cls not in _MODEL_CLASS_NAMES:
        raise ModelFileError(path, f"unknown model class {cls!r}; known: {', '.join(_MODEL_CLASS_NAMES)}")
    dtype = cfg.get("dtype")
    if dtype not in _ST_CODES:
        raise ModelFileError(path, f"unsupported model dtype {dtype!r}; expected float16, float32 or float64")
    seed = cfg.get("seed")
    ok_seed = seed is None or (_is_int(seed) and seed >= 0) or (
        isinstance(seed, list) and all(_is_int(s) and s >= 0 for s in seed))
    if not ok_seed:
        raise ModelFileError(path, f"invalid seed {seed!r}")
    fitted = cfg.get("fitted", {})
    # target_ndim_ and target_kind_ (what predict returns) are absent from older files
    if not isinstance(fitted, dict) or set(fitted) - {"task_", "loss_", "target_ndim_", "target_kind_"}:
        raise ModelFileError(path, f"invalid 'fitted' entry {fitted!r}")
    if "target_ndim_" in fitted and fitted["target_ndim_"] not in (1, 2):
        raise ModelFileError(path, f"invalid target_ndim_ {fitted['target_ndim_']!r}; expected 1 or 2")
    if "target_kind_" in fitted and fitted["target_kind_"] not in ("bool", "int", "float"):
        raise ModelFileError(path, f"invalid target_kind_ {fitted['target_kind_']!r}; expected bool, int or float")
    if "loss_" in fitted and fitted["loss_"] not in LOSSES:
        raise ModelFileError(path, f"unknown loss {fitted['loss_']!r}; known losses: {', '.join(LOSSES)}")
    tasks = {"regression", *(loss.task for loss in LOSSES.values())}
    if "task_" in fitted and fitted["task_"] not in tasks:
        raise ModelFileError(path, f"unknown task {fitted['task_']!r}")
    ensemble = cfg.get("ensemble")
    if ensemble is not None and not (_is_int(ensemble) and ensemble >= 1):
        raise ModelFileError(path, f"invalid ensemble member count {ensemble!r}; expected an int >= 1")
    seeds = cfg.get("member_seeds")
    if ensemble is not None and not (isinstance(seeds, list) and len(seeds) == ensemble
                                     and all(s is None or (_is_int(s) and s >= 0) for s in seeds)):
        raise ModelFileError(path, f"invalid member_seeds {seeds!r} for an ensemble of {ensemble} members")
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
        L._check_chain(layers)  # checks that the sizes chain
    except (ValueError, TypeError) as exc:
        raise ModelFileError(path, f"the architecture is invalid: {exc}") from None
    return layers, {"class": cls, "dtype": dtype, "seed": seed, "fitted": fitted, "ensemble": ensemble,
                    "member_seeds": seeds if ensemble is not None else None}


def _expected_tensors(layers: list[L.Layer], k: int | None = None) -> dict[str, tuple[int, ...]]:
    return {f"layers.{i}.{key}": shape for i, layer in enumerate(layers)
            for key, shape in _param_shapes(layer, k).items()}


def _nonneg_int(path: str, value: Any, what: str) -> int:
    if not _is_int(value) or value < 0:
        raise ModelFileError(path, f"the checkpoint's {what} must be a non-negative integer, got {value!r}")
    return value


def _member_values_ok(v: Any, k: int) -> bool:
    """Whether ``v`` is a number, or a list of ``k`` numbers (an ensemble's per-member value)."""
    def num(e):
        return isinstance(e, (int, float)) and not isinstance(e, bool)

    return num(v) or (isinstance(v, list) and len(v) == k and all(num(e) for e in v))


def _parse_optimizer_entry(path: str, opt: Any, layers: list[L.Layer], expected: dict[str, tuple[int, ...]],
                           k: int | None = None) -> None:
    """Validate the checkpoint's optimizer entry; record the optimiser tensors it expects
    (stacked, for an ensemble of ``k`` members, whose hyper-parameters are per member)."""
    if not isinstance(opt, dict) or set(opt) != {"optimizer", "hyperparameters", "step", "state"}:
        raise ModelFileError(path, "the checkpoint's optimizer entry is malformed")
    name, hyper = opt["optimizer"], opt["hyperparameters"]
    if name not in OPTIMIZERS:
        raise ModelFileError(path, f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
    if not isinstance(hyper, dict):
        raise ModelFileError(path, "the checkpoint's optimizer hyperparameters are not an object")
    if k is not None:
        if not all(key in ("lr", "wd", "momentum", "b1", "b2") and _member_values_ok(v, k) for key, v in hyper.items()):
            raise ModelFileError(path, f"invalid per-member {name} hyperparameters {hyper!r}")
    else:
        try:
            OPTIMIZERS[name](**hyper)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(path, f"invalid {name} hyperparameters: {exc}") from None
    step = opt["step"]  # an ensemble's members' own counts, or one
    many = k is not None and isinstance(step, list) and len(step) == k
    [_nonneg_int(path, v, "optimizer step") for v in (step if many else [step])]
    skeleton = opt["state"]
    if skeleton is None:
        return
    if not isinstance(skeleton, list) or len(skeleton) != len(layers):
        raise ModelFileError(path, "the checkpoint's optimizer state does not have one entry per layer")
    for i, (entry, layer) in enumerate(zip(skeleton, layers)):
        shapes = _param_shapes(layer, k)
        if not isinstance(entry, dict) or set(entry) != set(shapes):
            raise ModelFileError(
                path, f"the optimizer state of layer {i} does not match its parameters {sorted(shapes)}")
        for key, slots in entry.items():
            if not isinstance(slots, list) or not all(isinstance(s, str) and s for s in slots):
                raise ModelFileError(path, f"the optimizer state of layer {i}, {key!r} is malformed")
            for slot in slots:
                expected[f"optimizer.{i}.{key}.{slot}"] = shapes[key]


def _check_rng_entry(path: str, rng: Any) -> None:
    """Validate the checkpoint's random-generator entry."""
    entropy = rng.get("entropy") if isinstance(rng, dict) else None
    ok_entropy = entropy is None or (_is_int(entropy) and entropy >= 0) or (
        isinstance(entropy, list) and all(_is_int(e) and e >= 0 for e in entropy))
    if not isinstance(rng, dict) or set(rng) != {"entropy", "backend", "state"} or not ok_entropy \
            or not isinstance(rng["backend"], str) or not isinstance(rng["state"], dict):
        raise ModelFileError(path, "the checkpoint's random-generator entry is malformed")


def _parse_callback_entries(path: str, entries: Any, layers: list[L.Layer],
                            expected: dict[str, tuple[int, ...]], k: int | None = None) -> None:
    """Validate the checkpoint's callback states; record the per-layer arrays they expect."""
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
                shapes = _param_shapes(layer, k)
                if not isinstance(keys, list) or set(keys) != set(shapes) or len(keys) != len(shapes):
                    raise ModelFileError(
                        path, f"the arrays {name!r} of callback {j}, layer {i} do not match its parameters")
                for key in keys:
                    expected[f"callbacks.{j}.{name}.{i}.{key}"] = shapes[key]


def _check_history_entry(path: str, hist: Any, members: int | None = None) -> None:
    """Validate the checkpoint's training history (an ensemble's entries may be lists of
    one value per member)."""
    ok = isinstance(hist, dict) and isinstance(hist.get("metric_name", ""), str) and all(
        isinstance(hist.get(k, []), list) and all(
            (isinstance(v, (int, float)) and not isinstance(v, bool))
            or (members is not None and _member_values_ok(v, members)) for v in hist.get(k, []))
        for k in ("loss", "val_loss", "val_metric", "lr", "time"))
    metrics = hist.get("metrics", {}) if isinstance(hist, dict) else None  # absent from older checkpoints
    ok = ok and isinstance(metrics, dict) and all(
        isinstance(k, str) and isinstance(v, list)
        and all((isinstance(e, (int, float)) and not isinstance(e, bool))
                or (members is not None and _member_values_ok(e, members)) for e in v)
        for k, v in metrics.items())
    if not ok:
        raise ModelFileError(path, "the checkpoint's history is malformed")


def _parse_checkpoint(path: str, metadata: dict[str, str], layers: list[L.Layer], k: int | None = None):
    """Validate the checkpoint entry; return it and the optimiser tensors it expects."""
    ck = _json_field(path, metadata, "checkpoint")
    _nonneg_int(path, ck.get("epoch"), "epoch")
    _nonneg_int(path, ck.get("steps"), "steps")
    expected: dict[str, tuple[int, ...]] = {}
    opt = ck.get("optimizer")
    if opt is not None:
        _parse_optimizer_entry(path, opt, layers, expected, k)
    rng = ck.get("rng")
    if rng is not None:
        _check_rng_entry(path, rng)
    _parse_callback_entries(path, ck.get("callbacks", []), layers, expected, k)
    sched = ck.get("schedule")
    if sched is not None and not isinstance(sched, dict):
        raise ModelFileError(path, "the checkpoint's schedule state is not an object")
    hist = ck.get("history")
    if hist is not None:
        _check_history_entry(path, hist, k)
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
        raise ModelFileError(shown, "checksum mismatch: the file is corrupted (its contents do not match "
                                    "the sha256 recorded in its header)")
    cfg = _json_field(shown, metadata, "model")
    layers, model_cfg = _parse_model_config(shown, cfg)
    if metadata.get("dtype", model_cfg["dtype"]) != model_cfg["dtype"]:
        raise ModelFileError(shown, "the metadata's dtype and the architecture's dtype differ")
    expected = _expected_tensors(layers, model_cfg["ensemble"])
    checkpoint = None
    if kind == "checkpoint":
        checkpoint, opt_expected = _parse_checkpoint(shown, metadata, layers, model_cfg["ensemble"])
        expected.update(opt_expected)
    missing = sorted(set(expected) - set(index))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ModelFileError(shown, f"required tensors are missing: {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(index) - set(expected))
    if unexpected:
        more = " ..." if len(unexpected) > 5 else ""
        raise ModelFileError(
            shown, f"the file holds tensors the architecture does not use: {', '.join(unexpected[:5])}{more}")
    code = _ST_CODES[model_cfg["dtype"]]
    for name, shape in expected.items():
        got_code, got_shape = index[name][0], index[name][1]
        if got_shape != shape:
            raise ModelFileError(shown, f"tensor {name!r} has shape {got_shape} but the architecture needs {shape}")
        if got_code != code:
            raise ModelFileError(
                shown, f"tensor {name!r} has dtype {got_code} but the model's dtype is {model_cfg['dtype']} ({code})")
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
