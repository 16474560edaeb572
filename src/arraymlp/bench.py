"""Benchmarks: named workloads timed side by side with their GEMM floor and peers.

``python -m arraymlp bench`` runs each workload on every requested backend together
with the same work done by

- the **GEMM floor**: the workload's matrix products alone, on the same backend, with
  nothing else (for a training step of an ``L``-layer network, ``L`` forward products,
  ``L`` weight-gradient products and ``L - 1`` input-gradient products; for inference,
  the ``L`` forward products);
- **PyTorch eager** (``torch.nn`` + ``torch.optim``) on the CPU, and on CUDA where
  available;
- **scikit-learn**'s ``MLPClassifier`` / ``MLPRegressor`` (CPU; one training step is
  ``partial_fit`` on one batch with ``solver="sgd"`` and ``batch_size`` equal to it).

The candidates of one case are run in interleaved rounds (A B C A B C ...) so that
machine noise hits them alike, and medians are reported with their spread (the
interquartile range) and their ratios to the floor and to every peer. Results go to a
terminal table, optionally a JSON file that records the environment, and a PNG plot of
throughput against batch size.

Everything here is measurement machinery; nothing in it is on the library's compute
path. The building blocks (:func:`make_arraymlp`, :func:`make_gemm_floor`, ...) are
shared with the pytest-benchmark suites in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy

from .training import _loss_then_update

__all__ = [
    "TARGETS",
    "WORKLOADS",
    "KERNELS",
    "Candidate",
    "Target",
    "Workload",
    "available_targets",
    "compute_ratios",
    "crossover_batch",
    "environment",
    "format_table",
    "gemm_floor_products",
    "interleaved",
    "limit_threads",
    "main",
    "make_arraymlp",
    "make_gemm_floor",
    "make_kernel",
    "make_sklearn",
    "make_torch",
    "measure_memory",
    "plot_throughput",
    "run",
    "summarize",
]


# ----------------------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True)
class Workload:
    """One named benchmark.

    Attributes
    ----------
    name : str
        Short key, ``"W1"`` ...
    title : str
        What it measures, for the table.
    kind : {"train", "infer"}
        One training step (forward, fused loss, backward, SGD update) or one
        inference call (forward of the whole network, output activation included).
    sizes : tuple of int
        Layer sizes ``(n_features, hidden..., n_outputs)``.
    batches : tuple of int
        Batch sizes of a full run.
    quick_batches : tuple of int
        Batch sizes of a ``--quick`` run.
    dtypes : tuple of str
        ``"float32"``, ``"float64"``, ``"float16"`` or ``"tf32"`` (float32 arrays with
        TensorFloat-32 matrix products, GPU only).
    gpu_only : bool
        Skipped on CPU targets.
    activation : str
        Hidden activation.
    loss : str
        ``"cross_entropy"`` (softmax output, classifier peers) or ``"mse"``
        (identity output, regressor peers).
    lr : float
        SGD learning rate.
    """

    name: str
    title: str
    kind: str
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    quick_batches: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] = ("float32",)
    gpu_only: bool = False
    activation: str = "relu"
    loss: str = "cross_entropy"
    lr: float = 0.01

    def batch_sizes(self, quick: bool) -> tuple[int, ...]:
        """Batch sizes of a full or a quick run."""
        return self.quick_batches if quick and self.quick_batches is not None else self.batches

    @property
    def arch(self) -> str:
        """``"784-512-512-10"``."""
        return "-".join(str(s) for s in self.sizes)

    @property
    def n_layers(self) -> int:
        """Number of dense layers."""
        return len(self.sizes) - 1


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("W1", "training step, ReLU, softmax-CE, SGD", "train", (784, 512, 512, 10), (256,)),
        Workload("W2", "training step, small net (overhead-bound)", "train", (64, 128, 10), (32,)),
        Workload("W3", "inference, softmax output", "infer", (784, 512, 512, 10), (4096,)),
        Workload("W4", "training step, large GEMMs", "train", (1024, 4096, 4096, 1024), (8192,),
                 dtypes=("float32", "tf32", "float16"), gpu_only=True),
        Workload("W5", "training step, 5 layers of width 64 (per-layer overhead)", "train",
                 (64, 64, 64, 64, 64, 10), (16, 64, 256, 1024, 4096, 16384, 65536),
                 quick_batches=(16, 256, 4096)),
    )
}


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """Where arraymlp runs: a backend name and a device.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"torch"`` (CPU), ``"cupy"`` or ``"torch-cuda"``.
    backend : str
        The ``backend=`` argument of :class:`arraymlp.MLP`.
    device : str or None
        The ``device=`` argument.
    gpu : bool
    """

    name: str
    backend: str
    device: str | None
    gpu: bool


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("numpy", "numpy", None, False),
        Target("torch", "torch", "cpu", False),
        Target("cupy", "cupy", None, True),
        Target("torch-cuda", "torch", "cuda", True),
    )
}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cupy_gpu() -> bool:
    if not _has("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy imports but cannot run
        return False


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def available_targets() -> list[str]:
    """Names of the targets this machine can run (numpy always)."""
    out = ["numpy"]
    if _has("torch"):
        out.append("torch")
    if _cupy_gpu():
        out.append("cupy")
    if _torch_cuda():
        out.append("torch-cuda")
    return out


def _sync_fn(target: Target) -> Callable[[], None]:
    """A callable that waits for the target's device to finish queued work."""
    if target.name == "cupy":
        import cupy

        return lambda: cupy.cuda.get_current_stream().synchronize()
    if target.name == "torch-cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _array_dtype(dtype: str) -> str:
    """Storage dtype of a benchmark dtype (``"tf32"`` stores float32)."""
    return "float32" if dtype == "tf32" else dtype


@contextlib.contextmanager
def tf32(target: Target, enabled: bool):
    """Enable (or leave as it is) TensorFloat-32 matrix products on ``target``.

    PyTorch's switch is ``torch.backends.cuda.matmul.allow_tf32``; CuPy's is the
    compute type of its float32 matrix products. Both are restored on exit. A no-op on
    CPU targets and when ``enabled`` is false.
    """
    if not enabled or not target.gpu:
        yield
        return
    restore: list[Callable[[], None]] = []
    try:
        if _has("torch"):
            import torch

            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            restore.append(lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", old))
        if target.name == "cupy":
            import cupy

            try:
                from cupy._core import _routines_linalg as linalg

                old_ct = linalg.get_compute_type(cupy.float32)
                linalg.set_compute_type(cupy.float32, linalg.COMPUTE_TYPE_TF32)
            except (ImportError, AttributeError) as exc:  # a CuPy without the switch
                msg = f"this CuPy cannot switch float32 products to TF32: {exc}"
                raise RuntimeError(msg) from exc
            restore.append(lambda: linalg.set_compute_type(cupy.float32, old_ct))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _in_tf32(target: Target, enabled: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside :func:`tf32`; ``fn`` itself where that is a no-op (CPU targets,
    TF32 off), so that a timed call carries no context manager (0.8 us, about 1 % of
    W2's step on 2 cores)."""
    if not enabled or not target.gpu:
        return fn

    def run():
        with tf32(target, True):
            return fn()

    return run


# ----------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class Candidate:
    """One implementation of a case's work, ready to time.

    Attributes
    ----------
    name : str
        Row label, e.g. ``"arraymlp[numpy]"``, ``"floor[numpy]"``, ``"torch[cpu]"``.
    role : {"ours", "floor", "peer"}
    target : str
        Target (for ``ours``/``floor``) or device (for peers) it runs on.
    fn : callable
        Does the work once and returns when the device has finished it.
    """

    name: str
    role: str
    target: str
    fn: Callable[[], Any]


def _host_data(sizes: Sequence[int], batch: int, loss: str, seed: int):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0]))
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], size=batch).astype(numpy.int64)
    else:
        y = rng.standard_normal((batch, sizes[-1]))
    return x, y


def _output_activation(loss: str) -> str | None:
    return "softmax" if loss == "cross_entropy" else None


def train_step(model, optimizer, lossfn, x, y, *, xp, sync: Callable[[], None] = lambda: None) -> float:
    """One training step as :func:`arraymlp.training.fit` takes it on a batch.

    Forward, fused loss, one host read of the loss value, then backward and the
    optimiser's update (for plain SGD, fused into the backward pass, as ``fit``
    does); ``sync`` waits for the device at the end.

    Parameters
    ----------
    model : Sequential
    optimizer : Optimizer
    lossfn : arraymlp.losses.Loss
    x : array, shape (n, n_features)
    y : array, labels (n,) or targets (n, n_outputs)
    xp : namespace
    sync : callable

    Returns
    -------
    float
        The batch loss.
    """
    value, update = _loss_then_update(model, optimizer, lossfn, x, y, None, xp=xp)
    value = float(value)
    update(optimizer.lr)
    sync()
    return value


def make_arraymlp(target: Target | str, workload: Workload, batch: int, dtype: str = "float32",
                  *, seed: int = 0) -> Callable[[], Any]:
    """arraymlp doing ``workload``'s work on ``target``: one step or one inference.

    Parameters
    ----------
    target : Target or str
    workload : Workload
    batch : int
    dtype : str
        A benchmark dtype (``"tf32"`` runs float32 with TF32 products).
    seed : int

    Returns
    -------
    callable
        ``fn()`` doing the work once, synchronised.
    """
    from . import MLP
    from ._backend import resolve_backend
    from .losses import get_loss
    from .optim import SGD

    target = TARGETS[target] if isinstance(target, str) else target
    sync = _sync_fn(target)
    model = MLP(list(workload.sizes), activation=workload.activation,
                output_activation=_output_activation(workload.loss), dtype=_array_dtype(dtype),
                backend=target.backend, device=target.device, seed=seed)
    xp = resolve_backend(target.backend)
    xh, yh = _host_data(workload.sizes, batch, workload.loss, seed)
    x = xp.asarray(xh.astype(_array_dtype(dtype)), device=model.device)
    y = xp.asarray(yh if yh.dtype == numpy.int64 else yh.astype(_array_dtype(dtype)), device=model.device)
    use_tf32 = dtype == "tf32"
    if workload.kind == "infer":

        def infer():
            out = model(x)
            sync()
            return out

        return _in_tf32(target, use_tf32, infer)
    lossfn = get_loss(workload.loss)
    opt = SGD(lr=workload.lr)

    def step():
        return train_step(model, opt, lossfn, x, y, xp=xp, sync=sync)

    return _in_tf32(target, use_tf32, step)


def gemm_floor_products(sizes: Sequence[int], batch: int, kind: str) -> list[tuple[str, tuple, tuple]]:
    """The matrix products of one step (or one inference) of a dense network.

    Parameters
    ----------
    sizes : sequence of int
        ``(n_features, hidden..., n_outputs)``: ``L = len(sizes) - 1`` layers.
    batch : int
    kind : {"train", "infer"}

    Returns
    -------
    list of (label, shape of a, shape of b)
        ``L`` forward products ``x @ W`` ((n, i) @ (i, o)); for training also ``L``
        weight-gradient products ``x.T @ dy`` ((i, n) @ (n, o)) and ``L - 1``
        input-gradient products ``dy @ W.T`` ((n, o) @ (o, i)), the first layer
        needing no input gradient.
    """
    if kind not in ("train", "infer"):
        msg = f"kind must be 'train' or 'infer', got {kind!r}"
        raise ValueError(msg)
    layers = list(zip(sizes[:-1], sizes[1:]))
    out = [(f"x{i} @ W{i}", (batch, a), (a, b)) for i, (a, b) in enumerate(layers)]
    if kind == "train":
        for i in range(len(layers) - 1, -1, -1):
            a, b = layers[i]
            out.append((f"x{i}.T @ dy{i}", (a, batch), (batch, b)))
            if i > 0:
                out.append((f"dy{i} @ W{i}.T", (batch, b), (b, a)))
    return out


def make_gemm_floor(target: Target | str, sizes: Sequence[int], batch: int, kind: str,
                    dtype: str = "float32", *, seed: int = 0,
                    matmul: Callable[[Any, Any], Any] | None = None) -> Callable[[], Any]:
    """The GEMM floor: the products of :func:`gemm_floor_products` and nothing else.

    Operands are made once, up front, in the target's namespace and on its device;
    the transposed operands are the same transposed views the library multiplies.

    Parameters
    ----------
    target : Target or str
    sizes : sequence of int
    batch : int
    kind : {"train", "infer"}
    dtype : str
    seed : int
    matmul : callable, optional
        ``matmul(a, b)``; default ``a @ b`` (tests pass a recording one).

    Returns
    -------
    callable
        ``fn()`` running all the products once, synchronised.
    """
    from ._backend import canonical_device, resolve_backend

    target = TARGETS[target] if isinstance(target, str) else target
    xp = resolve_backend(target.backend)
    device = canonical_device(xp, target.device)
    sync = _sync_fn(target)
    rng = numpy.random.default_rng(seed)
    adt = _array_dtype(dtype)

    def put(shape):
        return xp.asarray(rng.standard_normal(shape).astype(adt), device=device)

    layers = list(zip(sizes[:-1], sizes[1:]))
    xs = [put((batch, a)) for a, _ in layers]
    Ws = [put((a, b)) for a, b in layers]
    dys = [put((batch, b)) for _, b in layers]
    ops: list[tuple[Any, Any]] = [(xs[i], Ws[i]) for i in range(len(layers))]
    if kind == "train":
        for i in range(len(layers) - 1, -1, -1):
            ops.append((xs[i].T, dys[i]))
            if i > 0:
                ops.append((dys[i], Ws[i].T))
    elif kind != "infer":
        msg = f"kind must be 'train' or 'infer', got {kind!r}"
        raise ValueError(msg)
    mm = matmul if matmul is not None else (lambda a, b: a @ b)
    use_tf32 = dtype == "tf32"

    def floor():
        for a, b in ops:
            mm(a, b)
        sync()

    return _in_tf32(target, use_tf32, floor)


def make_torch(device: str, workload: Workload, batch: int, dtype: str = "float32",
               *, seed: int = 0) -> Callable[[], Any]:
    """PyTorch eager doing ``workload``'s work: ``torch.nn`` layers, ``torch.optim.SGD``.

    A training step is ``zero_grad``, forward, ``CrossEntropyLoss`` (or ``MSELoss``),
    ``backward``, ``step`` and ``loss.item()``; inference is the forward pass and the
    softmax under ``torch.inference_mode``.

    Parameters
    ----------
    device : {"cpu", "cuda"}
    workload : Workload
    batch : int
    dtype : str
    seed : int

    Returns
    -------
    callable
    """
    import torch

    torch.manual_seed(seed)
    tdtype = getattr(torch, _array_dtype(dtype))
    mods: list[Any] = []
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[workload.activation]
    for i, (a, b) in enumerate(zip(workload.sizes[:-1], workload.sizes[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < workload.n_layers - 1:
            mods.append(act())
    net = torch.nn.Sequential(*mods).to(device=device, dtype=tdtype)
    xh, yh = _host_data(workload.sizes, batch, workload.loss, seed)
    x = torch.as_tensor(xh, dtype=tdtype, device=device)
    if workload.loss == "cross_entropy":
        y = torch.as_tensor(yh, device=device)
        lossf = torch.nn.CrossEntropyLoss()
    else:
        y = torch.as_tensor(yh, dtype=tdtype, device=device)
        lossf = torch.nn.MSELoss()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tgt = Target("torch-peer", "torch", device, device.startswith("cuda"))
    use_tf32 = dtype == "tf32"
    if workload.kind == "infer":

        def infer():
            with torch.inference_mode():
                out = net(x)
                if workload.loss == "cross_entropy":
                    out = torch.softmax(out, dim=1)
                sync()
            return out

        return _in_tf32(tgt, use_tf32, infer)
    opt = torch.optim.SGD(net.parameters(), lr=workload.lr)

    def step():
        opt.zero_grad()
        loss = lossf(net(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        sync()
        return value

    return _in_tf32(tgt, use_tf32, step)


def make_sklearn(workload: Workload, batch: int, dtype: str = "float32", *, seed: int = 0) -> Callable[[], Any]:
    """scikit-learn doing ``workload``'s work on the CPU.

    ``MLPClassifier`` (``MLPRegressor`` for ``loss="mse"``) with the same hidden sizes
    and activation, ``solver="sgd"``, no momentum, no L2 (``alpha=0``) and
    ``batch_size`` equal to the batch, so that one ``partial_fit`` on one batch is one
    training step; inference is ``predict_proba`` (``predict`` for a regressor).

    Parameters
    ----------
    workload : Workload
    batch : int
    dtype : {"float32", "float64"}
    seed : int

    Returns
    -------
    callable
    """
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    cls = MLPClassifier if workload.loss == "cross_entropy" else MLPRegressor
    est = cls(hidden_layer_sizes=tuple(workload.sizes[1:-1]), activation=workload.activation, solver="sgd",
              batch_size=batch, learning_rate_init=workload.lr, momentum=0.0, nesterovs_momentum=False,
              alpha=0.0, shuffle=False, random_state=seed)
    xh, yh = _host_data(workload.sizes, batch, workload.loss, seed)
    x = numpy.ascontiguousarray(xh.astype(dtype))
    y = yh if workload.loss == "cross_entropy" else yh.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if workload.loss == "cross_entropy":
            est.partial_fit(x, y, classes=numpy.arange(workload.sizes[-1]))
        else:
            est.partial_fit(x, y)
    if workload.kind == "infer":
        predict = est.predict_proba if workload.loss == "cross_entropy" else est.predict
        return lambda: predict(x)
    return lambda: est.partial_fit(x, y)


#: Kernels of the pytest-benchmark suites (see :func:`make_kernel`).
KERNELS = ("dense_forward", "dense_backward", "train_step", "inference")


def make_kernel(kernel: str, target: Target | str, batch: int, width: int, dtype: str = "float32",
                *, seed: int = 0) -> Callable[[], Any]:
    """One piece of the hot path at a given size, as the model runs it.

    - ``"dense_forward"``: ``relu(x @ W + b)``, the first two layers of
      ``MLP([width, width, 10])`` run by :meth:`Sequential.forward`;
    - ``"dense_backward"``: that Dense layer's backward (``dW = x.T @ dy``,
      ``db = sum(dy, 0)``, ``dx = dy @ W.T``);
    - ``"train_step"``: one SGD training step of ``MLP([width, width, width, 10])``
      with softmax cross-entropy (:func:`train_step`);
    - ``"inference"``: ``model(x)`` on the same network (softmax output).

    Parameters
    ----------
    kernel : str
        One of :data:`KERNELS`.
    target : Target or str
    batch, width : int
    dtype : str
        ``"float32"``, ``"float64"``, ``"float16"`` or ``"tf32"``.
    seed : int

    Returns
    -------
    callable
        ``fn()`` running the kernel once, synchronised; it returns the kernel's result
        (the activations, ``(dx, grads)``, the loss, the outputs).
    """
    target = TARGETS[target] if isinstance(target, str) else target
    if kernel in ("train_step", "inference"):
        wl = Workload(f"{kernel}-{width}", kernel, "train" if kernel == "train_step" else "infer",
                      (width, width, width, 10), (batch,))
        return make_arraymlp(target, wl, batch, dtype, seed=seed)
    if kernel not in KERNELS:
        msg = f"unknown kernel {kernel!r}; known kernels: {', '.join(KERNELS)}"
        raise ValueError(msg)
    from . import MLP

    sync = _sync_fn(target)
    model = MLP([width, width, 10], dtype=_array_dtype(dtype), backend=target.backend, device=target.device,
                seed=seed)
    xp = model.xp
    rng = numpy.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((batch, width)).astype(_array_dtype(dtype)), device=model.device)
    use_tf32 = dtype == "tf32"
    if kernel == "dense_forward":

        def forward():
            y, _ = model.forward(x, training=True, xp=xp, upto=2)
            sync()
            return y

        return _in_tf32(target, use_tf32, forward)
    dy = xp.asarray(rng.standard_normal((batch, width)).astype(_array_dtype(dtype)), device=model.device)
    dense = model.layers[0]
    _, caches = model.forward(x, training=True, xp=xp, upto=1)

    def backward():
        out = dense.backward(model.params[0], caches[0], dy, xp=xp, need_dx=True)
        sync()
        return out

    return _in_tf32(target, use_tf32, backward)


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], Any]], *, repeat: int, warmup: int = 2,
                min_time: float = 0.01, max_number: int = 1000, settle: int = 1,
                groups: dict[str, str] | None = None, switch_time: float = 0.0) -> dict[str, list[float]]:
    """Time several callables in interleaved rounds (A B C A B C ...).

    Each callable is first called ``warmup`` times, then its calls per sample are
    calibrated so that a sample lasts at least ``min_time`` seconds; each of the
    ``repeat`` rounds then takes one sample of every callable in turn. Every sample is
    preceded by ``settle`` untimed calls of the same callable, and the first sample
    after a change of ``groups`` (the threading runtime a callable runs on) by untimed
    calls lasting ``switch_time`` seconds: after a NumPy product OpenBLAS's worker
    threads keep spinning for about 0.1 s and starve PyTorch's OpenMP threads (a
    PyTorch CPU step measured twice its steady time for that long). Each sample thus
    measures its candidate in the steady state a training loop runs in. Callables of
    one group run one after another within a round. The garbage collector is paused
    while timing, as :mod:`timeit` does.

    Parameters
    ----------
    fns : dict of name -> callable
    repeat : int
        Rounds, i.e. samples per callable.
    warmup : int
    min_time : float
    max_number : int
        Upper bound on calls per sample.
    settle : int
        Untimed calls before each sample.
    groups : dict of name -> str, optional
        Runtime of each callable (default: each its own).
    switch_time : float
        Seconds of untimed calls before the first sample after a change of group.

    Returns
    -------
    dict of name -> list of float
        Seconds per call, one entry per round.

    Examples
    --------
    >>> from arraymlp.bench import interleaved
    >>> calls = []
    >>> fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    >>> times = interleaved(fns, repeat=2, warmup=1, min_time=0.0, settle=0, groups={"a": "x", "b": "y", "c": "x"})
    >>> "".join(calls[6:])  # after warm-up and calibration: a and c (group x) side by side
    'acbacb'
    """
    group_of = {name: (groups or {}).get(name, name) for name in fns}
    order = sorted(fns, key=lambda name: list(dict.fromkeys(group_of.values())).index(group_of[name]))
    fns = {name: fns[name] for name in order}
    numbers: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(max(warmup, 1)):
            fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        numbers[name] = max(1, min(max_number, math.ceil(min_time / max(once, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    last = None
    try:
        for _ in range(repeat):
            for name, fn in fns.items():
                n = numbers[name]
                for _ in range(settle):
                    fn()
                if switch_time > 0 and group_of[name] != last:
                    end = time.perf_counter() + switch_time
                    while time.perf_counter() < end:
                        fn()
                last = group_of[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - t0) / n)
    finally:
        if enabled:
            gc.enable()
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, interquartile range, min and max of a list of times.

    Quartiles are the inclusive ones of :func:`statistics.quantiles` (the median of
    one value is that value and its quartiles equal it).
    """
    ts = sorted(float(t) for t in times)
    if not ts:
        msg = "summarize needs at least one time"
        raise ValueError(msg)
    if len(ts) == 1:
        q1 = q3 = ts[0]
    else:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return {"median": statistics.median(ts), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": ts[0], "max": ts[-1], "n": len(ts)}


def compute_ratios(medians: dict[str, float], roles: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Each candidate's median over its GEMM floor's and over every peer's.

    Parameters
    ----------
    medians : dict of name -> seconds
    roles : dict of name -> (role, target)
        ``role`` is ``"ours"``, ``"floor"`` or ``"peer"``; a candidate's floor is the
        floor of the same target (the first floor when its target has none).

    Returns
    -------
    dict of name -> dict of reference -> ratio
        References are ``"floor"`` and the peers' names; a ratio below 1 means faster
        than the reference.
    """
    floors = {tgt: name for name, (role, tgt) in roles.items() if role == "floor"}
    first_floor = next(iter(floors.values()), None)
    peers = [name for name, (role, _) in roles.items() if role == "peer"]
    out: dict[str, dict[str, float]] = {}
    for name, med in medians.items():
        _, tgt = roles[name]
        r: dict[str, float] = {}
        floor = floors.get(tgt, first_floor)
        if floor is not None and medians.get(floor):
            r["floor"] = med / medians[floor]
        for p in peers:
            if medians.get(p):
                r[p] = med / medians[p]
        out[name] = r
    return out


# ----------------------------------------------------------------------------- cases
def _gpu_device_group(targets: Iterable[Target]) -> dict[bool, list[Target]]:
    groups: dict[bool, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.gpu, []).append(t)
    return groups


def _build_candidates(workload: Workload, batch: int, dtype: str, targets: list[Target], gpu: bool,
                      peers: bool, errors: list[str]) -> list[Candidate]:
    cands: list[Candidate] = []

    def add(name, role, tgt, builder):
        try:
            fn = builder()
            fn()  # a first call here: a candidate that cannot run is skipped, not fatal
            cands.append(Candidate(name, role, tgt, fn))
        except Exception as exc:  # a peer missing a dtype, a device out of memory ...
            errors.append(f"{workload.name} batch {batch} {dtype}: {name} skipped: {type(exc).__name__}: {exc}")

    for t in targets:
        add(f"arraymlp[{t.name}]", "ours", t.name, lambda t=t: make_arraymlp(t, workload, batch, dtype))
    for t in targets:
        add(f"floor[{t.name}]", "floor", t.name,
            lambda t=t: make_gemm_floor(t, workload.sizes, batch, workload.kind, dtype))
    if peers and _has("torch") and (not gpu or _torch_cuda()):
        dev = "cuda" if gpu else "cpu"
        if gpu or dtype in ("float32", "float64"):
            add(f"torch[{dev}]", "peer", dev, lambda: make_torch(dev, workload, batch, dtype))
    if peers and not gpu and _has("sklearn") and dtype in ("float32", "float64"):
        add("sklearn", "peer", "cpu", lambda: make_sklearn(workload, batch, dtype))
    return cands


SWITCH_TIME = 0.15
"""Seconds a candidate runs untimed after one of another threading runtime (see
:func:`interleaved`): longer than the ~0.1 s OpenBLAS's idle workers spin."""


def _runtime(c: Candidate) -> str:
    """The threading runtime a candidate's work runs on: NumPy's BLAS (arraymlp and its
    floor on NumPy, scikit-learn), PyTorch's (CPU or CUDA), CuPy's."""
    if c.role == "peer":
        return "numpy" if c.name == "sklearn" else f"torch-{c.target}"
    t = TARGETS.get(c.target)
    if t is None:
        return c.target
    return t.backend if t.backend != "torch" else f"torch-{t.device}"


def _free_device_memory() -> None:
    gc.collect()
    if sys.modules.get("cupy") is not None:
        try:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
    if sys.modules.get("torch") is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_case(workload: Workload, batch: int, dtype: str, targets: list[Target], *, gpu: bool,
             repeat: int, min_time: float, peers: bool = True, errors: list[str] | None = None) -> dict[str, Any]:
    """Build and time every candidate of one (workload, batch, dtype, device) case.

    Returns
    -------
    dict
        ``workload``, ``batch``, ``dtype``, ``device`` (``"cpu"``/``"gpu"``),
        ``candidates`` (name, role, target, times and their :func:`summarize`,
        ``samples_per_s``) and ``ratios`` (:func:`compute_ratios`).
    """
    errors = errors if errors is not None else []
    cands = _build_candidates(workload, batch, dtype, targets, gpu, peers, errors)
    groups = {c.name: _runtime(c) for c in cands}
    times = (interleaved({c.name: c.fn for c in cands}, repeat=repeat, min_time=min_time, groups=groups,
                         switch_time=SWITCH_TIME) if cands else {})
    rows = []
    for c in cands:
        s = summarize(times[c.name])
        rows.append({"name": c.name, "role": c.role, "target": c.target, "times": times[c.name], **s,
                     "samples_per_s": batch / s["median"]})
    ratios = compute_ratios({r["name"]: r["median"] for r in rows},
                            {r["name"]: (r["role"], r["target"]) for r in rows})
    del cands
    _free_device_memory()
    return {"workload": workload.name, "title": workload.title, "kind": workload.kind,
            "arch": workload.arch, "batch": batch, "dtype": dtype, "device": "gpu" if gpu else "cpu",
            "candidates": rows, "ratios": ratios}


# ----------------------------------------------------------------------------- output
def _fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_rate(r: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            return f"{r / scale:.3g}{unit}"
    return f"{r:.3g}"


def format_table(cases: Sequence[dict[str, Any]]) -> str:
    """The terminal table of a run: one block per case, one row per candidate.

    Columns: median time, spread (interquartile range, first to third quartile),
    throughput (samples/s), and the ratio of the median to the candidate's GEMM floor
    (``x floor``) and to each peer (``x torch[cpu]``, ``x sklearn`` ...).

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`.

    Returns
    -------
    str
    """
    lines: list[str] = []
    for case in cases:
        rows = case["candidates"]
        if not rows:
            continue
        refs = ["floor"] + [r["name"] for r in rows if r["role"] == "peer"]
        head = (f"{case['workload']}  {case['title']}  {case['arch']}  batch {case['batch']}  "
                f"{case['dtype']}  [{case['device']}]")
        lines.append(head)
        width = max(len("candidate"), *(len(r["name"]) for r in rows))
        cols = [f"{'candidate':<{width}}", f"{'median':>11}", f"{'spread (IQR)':>23}", f"{'samples/s':>10}"]
        cols += [f"{'x ' + ref:>{max(8, len(ref) + 2)}}" for ref in refs]
        lines.append("  " + "  ".join(cols))
        for r in rows:
            ratio = case["ratios"].get(r["name"], {})
            spread = f"{_fmt_time(r['q1'])} - {_fmt_time(r['q3'])}"
            cells = [f"{r['name']:<{width}}", f"{_fmt_time(r['median']):>11}", f"{spread:>23}",
                     f"{_fmt_rate(r['samples_per_s']):>10}"]
            for ref in refs:
                w = max(8, len(ref) + 2)
                cells.append(f"{ratio[ref]:>{w}.3f}" if ref in ratio else f"{'-':>{w}}")
            lines.append("  " + "  ".join(cells))
        lines.append("")
    return "\n".join(lines)


def crossover_batch(cpu: dict[int, float], gpu: dict[int, float]) -> int | None:
    """Smallest batch from which the GPU's throughput stays above the CPU's.

    Parameters
    ----------
    cpu, gpu : dict of batch -> samples/s

    Returns
    -------
    int or None
        ``None`` when the GPU never overtakes (or there is no common batch).
    """
    common = sorted(set(cpu) & set(gpu))
    best = None
    for b in reversed(common):
        if gpu[b] > cpu[b]:
            best = b
        else:
            break
    return best


def _crossovers(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and dtype swept over several batches: the CPU/GPU crossover."""
    out: dict[str, Any] = {}
    lines: dict[tuple[str, str, str], dict[int, float]] = {}
    for case in cases:
        for r in case["candidates"]:
            if r["role"] != "ours":
                continue
            lines.setdefault((case["workload"], case["dtype"], r["target"]), {})[case["batch"]] = r["samples_per_s"]
    keys = {(w, d) for (w, d, _) in lines}
    for w, d in sorted(keys):
        cpu = [t for (w2, d2, t) in lines if (w2, d2) == (w, d) and not TARGETS[t].gpu]
        gpu = [t for (w2, d2, t) in lines if (w2, d2) == (w, d) and TARGETS[t].gpu]
        if not cpu or not gpu or len(lines[(w, d, cpu[0])]) < 2:
            continue
        c, g = cpu[0], gpu[0]
        out.setdefault(w, {})[d] = {"cpu": c, "gpu": g,
                                    "batch": crossover_batch(lines[(w, d, c)], lines[(w, d, g)])}
    return out


def plot_throughput(cases: Sequence[dict[str, Any]], path: str, *, title: str | None = None) -> str:
    """Write a PNG of throughput (samples/s) against batch size, one line per candidate.

    CPU candidates are drawn in blue tones, GPU ones in red; arraymlp solid, GEMM
    floors dotted, peers dashed. Both axes are logarithmic. Uses matplotlib's Agg
    canvas directly (no global backend switch).

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`; the training-step cases of the workload with
        the most batch sizes are drawn (all cases when none has several).
    path : str
    title : str, optional

    Returns
    -------
    str
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts: dict[tuple[str, str], set[int]] = {}
    for c in cases:
        counts.setdefault((c["workload"], c["dtype"]), set()).add(c["batch"])
    if not counts:
        msg = "nothing to plot: no cases"
        raise ValueError(msg)
    wl, dt = max(counts, key=lambda k: (len(counts[k]), k[0] == "W5"))
    chosen = [c for c in cases if (c["workload"], c["dtype"]) == (wl, dt)]
    series: dict[tuple[str, str, str], dict[int, float]] = {}
    for c in chosen:
        for r in c["candidates"]:
            series.setdefault((r["name"], r["role"], c["device"]), {})[c["batch"]] = r["samples_per_s"]
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cpu_colors = iter(["#1f4e9c", "#4a90d9", "#7fb3e6", "#0b2a5c", "#9cc7f0", "#3d6fb5"])
    gpu_colors = iter(["#b8262b", "#e0605f", "#f09a8f", "#7a1114", "#f5b7ae", "#c9473f"])
    styles = {"ours": "-", "floor": ":", "peer": "--"}
    for (name, role, device), pts in sorted(series.items(), key=lambda kv: (kv[0][2], kv[0][1] != "ours", kv[0][0])):
        xs = sorted(pts)
        color = next(gpu_colors if device == "gpu" else cpu_colors, None)
        ax.plot(xs, [pts[b] for b in xs], styles.get(role, "-"), marker="o", markersize=3, color=color,
                label=f"{name} ({device})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    arch = chosen[0]["arch"]
    ax.set_title(title or f"{wl}: {chosen[0]['title']} ({arch}, {dt})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    if not _has(module):
        return None
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as exc:  # an installed but broken package
        return f"unavailable ({type(exc).__name__})"


def _blas_info() -> list[dict[str, Any]] | dict[str, Any]:
    try:
        import threadpoolctl

        return [
            {k: v for k, v in lib.items() if k in ("user_api", "internal_api", "prefix", "version",
                                                    "num_threads", "architecture", "threading_layer")}
            for lib in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        try:
            cfg = numpy.show_config(mode="dicts")
            return dict(cfg.get("Build Dependencies", {}))
        except Exception:
            return {}


def _gpus() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if _cupy_gpu():
        import cupy

        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"]
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_bytes": int(props.get("totalGlobalMem", 0)), "via": "cupy"})
    elif _torch_cuda():
        import torch

        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory), "via": "torch"})
    return out


def environment() -> dict[str, Any]:
    """Where the numbers come from: machine, devices, threads, BLAS and versions.

    Returns
    -------
    dict
        Keys ``device_name``, ``cpu_model``, ``cpu_count``, ``threads``, ``blas``,
        ``gpus``, ``versions``, ``jit_kernels`` (whether NumPy's hot path runs the
        compiled kernels of :mod:`arraymlp._jit`), ``python``, ``platform``,
        ``timestamp``.
    """
    gpus = _gpus()
    threads: dict[str, Any] = {"os_cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        threads["affinity"] = len(os.sched_getaffinity(0))
    if _has("torch"):
        import torch

        threads["torch"] = torch.get_num_threads()
    blas = _blas_info()
    if isinstance(blas, list):
        threads["blas"] = [lib.get("num_threads") for lib in blas if lib.get("user_api") == "blas"]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            threads[var] = os.environ[var]
    cpu = _cpu_model()
    name = f"{cpu} ({os.cpu_count()} cores)"
    if gpus:
        name += " + " + ", ".join(g["name"] for g in gpus)
    versions = {m: _version(m) for m in ("numpy", "cupy", "torch", "sklearn", "array_api_compat",
                                        "array_api_strict", "matplotlib", "numba")}
    from . import _jit
    from ._version import __version__

    versions["arraymlp"] = __version__
    return {
        "device_name": name,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "blas": blas,
        "gpus": gpus,
        "versions": versions,
        "jit_kernels": _jit.kernels() is not None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- memory
def measure_memory(rows: int = 60_000, *, workload: Workload | None = None, batch: int = 256,
                   dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Peak traced memory of one training epoch, against what it must hold.

    Runs :func:`arraymlp.training.fit` for one epoch of ``rows`` samples on NumPy
    (whose allocations :mod:`tracemalloc` sees) and compares the peak with the sum of
    the data (``x`` and labels), the parameters, the optimiser state (none for plain
    SGD) and one batch's activations (the batch and every layer's output).

    Parameters
    ----------
    rows : int
    workload : Workload, optional
        Architecture; default W1.
    batch : int
    dtype : str
    seed : int

    Returns
    -------
    dict
        ``peak_bytes``, ``budget_bytes``, ``ratio`` and the budget's parts.
    """
    import tracemalloc

    from . import MLP
    from .optim import SGD

    wl = workload or WORKLOADS["W1"]
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.stop()
    gc.collect()
    tracemalloc.start()
    try:
        rng = numpy.random.default_rng(seed)
        x = rng.standard_normal((rows, wl.sizes[0]), dtype=numpy.float32).astype(dtype, copy=False)
        y = rng.integers(0, wl.sizes[-1], size=rows).astype(numpy.int64)
        model = MLP(list(wl.sizes), activation=wl.activation, output_activation="softmax",
                    dtype=dtype, backend="numpy", seed=seed)
        opt = SGD(lr=wl.lr)
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        model.fit(x, y, loss=wl.loss, optimizer=opt, epochs=1, batch_size=batch, progress=False)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        item = numpy.dtype(dtype).itemsize
        data = x.nbytes + y.nbytes
        params = sum(int(a.nbytes) for p in model.params for a in p.values())
        state = sum(int(a.nbytes) for layer in (opt.state or []) for st in layer.values() for a in st.values())
        widths = [layer.n_out for layer in model.layers if layer.n_out is not None]
        # every layer's output: dense outputs and the activations that follow them
        n_act = sum(w * (2 if i < len(widths) - 1 else 1) for i, w in enumerate(widths))
        activations = batch * (wl.sizes[0] + n_act) * item + batch * y.itemsize
        budget = data + params + state + activations
        return {"rows": rows, "batch": batch, "dtype": dtype, "arch": wl.arch, "peak_bytes": int(peak),
                "data_bytes": int(data), "param_bytes": int(params), "optimizer_state_bytes": int(state),
                "activation_bytes": int(activations), "budget_bytes": int(budget),
                "ratio": peak / budget, "epoch_seconds": elapsed}
    finally:
        tracemalloc.stop()
        if was_tracing:
            tracemalloc.start()


# ----------------------------------------------------------------------------- driver
@contextlib.contextmanager
def limit_threads(n: int | None, notes: list[str] | None = None):
    """Run with at most ``n`` threads in every thread pool of the process: BLAS and
    OpenMP libraries (through threadpoolctl) and PyTorch's intra-op pool. ``None``
    leaves every library at its default.

    On a machine shared with other work, ``n = 1`` gives the steadiest ratios: a
    multi-threaded product whose threads are descheduled waits for the slowest.
    PyTorch and scikit-learn are imported first, so that their pools exist when the
    limits are set.
    """
    if not n:
        yield
        return
    notes = notes if notes is not None else []
    with contextlib.ExitStack() as stack:
        torch = None
        if _has("torch"):
            import torch
        if _has("sklearn"):
            import sklearn.neural_network  # noqa: F401  (loads its OpenMP runtime)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            notes.append("threadpoolctl is not installed: BLAS threads left at their default")
        else:
            stack.enter_context(threadpool_limits(limits=n))
        if torch is not None:
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old)
        yield


def _resolve_targets(spec: Sequence[str] | None) -> tuple[list[Target], list[str]]:
    avail = available_targets()
    notes: list[str] = []
    if not spec:
        names = ["numpy"] + [t for t in avail if TARGETS[t].gpu]
    else:
        names = []
        for item in spec:
            for name in item.split(","):
                name = name.strip()
                if not name:
                    continue
                if name == "all":
                    names.extend(avail)
                    continue
                if name not in TARGETS:
                    msg = f"unknown backend {name!r}; known: {', '.join(TARGETS)}, all"
                    raise ValueError(msg)
                names.append(name)
    out: list[Target] = []
    for name in dict.fromkeys(names):
        if name in avail:
            out.append(TARGETS[name])
        else:
            notes.append(f"backend {name} is not available on this machine; skipped")
    return out, notes


def _resolve_workloads(spec: Sequence[str] | None) -> list[Workload]:
    if not spec:
        return list(WORKLOADS.values())
    out = []
    for item in spec:
        for name in item.split(","):
            name = name.strip().upper()
            if not name:
                continue
            if name not in WORKLOADS:
                msg = f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}"
                raise ValueError(msg)
            out.append(WORKLOADS[name])
    return list(dict.fromkeys(out))


def run(workloads: Sequence[Workload], targets: Sequence[Target], *, repeat: int, quick: bool,
        min_time: float, peers: bool = True, memory: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run workloads on targets and collect a JSON-able result.

    Returns
    -------
    dict
        ``environment``, ``settings``, ``cases`` (see :func:`run_case`), ``crossover``,
        ``memory`` (or None) and ``notes`` (skips and errors).
    """
    notes: list[str] = []
    cases = []
    groups = _gpu_device_group(targets)
    for wl in workloads:
        for gpu in (False, True):
            tgts = groups.get(gpu)
            if not tgts:
                continue
            if wl.gpu_only and not gpu:
                continue
            for dtype in wl.dtypes:
                if dtype in ("float16", "tf32") and not gpu:
                    continue
                for batch in wl.batch_sizes(quick):
                    log(f"{wl.name} batch {batch} {dtype} [{'gpu' if gpu else 'cpu'}] ...")
                    cases.append(run_case(wl, batch, dtype, tgts, gpu=gpu, repeat=repeat, min_time=min_time,
                                          peers=peers, errors=notes))
        if wl.gpu_only and True not in groups:
            notes.append(f"{wl.name} runs on a GPU only; skipped (no CUDA device)")
    mem = None
    if memory:
        log("memory: one W1 epoch over 60000 rows ...")
        mem = measure_memory(60_000)
    return {
        "environment": environment(),
        "settings": {"repeat": repeat, "quick": quick, "min_time": min_time,
                     "targets": [t.name for t in targets], "workloads": [w.name for w in workloads]},
        "cases": cases,
        "crossover": _crossovers(cases),
        "memory": mem,
        "notes": notes,
    }


def _json_default(o: Any) -> Any:
    if isinstance(o, (numpy.integer,)):
        return int(o)
    if isinstance(o, (numpy.floating,)):
        return float(o)
    return str(o)


def main(argv: list[str] | None = None) -> int:
    """``python -m arraymlp bench``: time the workloads and print the table.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after ``bench`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0 on success, 2 on bad arguments).
    """
    ap = argparse.ArgumentParser(
        prog="python -m arraymlp bench",
        description="Time arraymlp's hot path against its GEMM floor, PyTorch eager and scikit-learn, "
                    "side by side in one process.")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="numpy, torch (CPU), cupy, torch-cuda or all; repeat or comma-separate "
                         "(default: numpy and every GPU backend present)")
    ap.add_argument("--workload", action="append", metavar="NAME",
                    help=f"one of {', '.join(WORKLOADS)}; repeat or comma-separate (default: all)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds per case (default 15, quick 5)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds a sample lasts at least (calls are looped; default 0.05, quick 0.01)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and batch sizes: under a minute on 2 cores")
    ap.add_argument("--no-peers", action="store_true", help="time arraymlp and its GEMM floor only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="at most N threads in BLAS, OpenMP and PyTorch pools (default: each library's own)")
    ap.add_argument("--json", metavar="PATH", help="write results and environment as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of throughput against batch size")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        targets, tnotes = _resolve_targets(args.backend)
        workloads = _resolve_workloads(args.workload)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repeat = args.repeat if args.repeat is not None else (5 if args.quick else 15)
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.05)
    if repeat < 1:
        print("error: --repeat must be >= 1", file=sys.stderr)
        return 2
    if not targets:
        print("error: none of the requested backends is available", file=sys.stderr)
        return 2

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads is not None and args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    if not (math.isfinite(min_time) and min_time >= 0):
        print(f"error: --min-time must be a finite number of seconds >= 0, got {args.min_time}", file=sys.stderr)
        return 2
    for opt, path in (("--json", args.json), ("--plot", args.plot)):  # before minutes of timing, not after
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            print(f"error: {opt} {path}: the folder {folder} does not exist", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    with limit_threads(args.threads, tnotes):
        result = run(workloads, targets, repeat=repeat, quick=args.quick, min_time=min_time,
                     peers=not args.no_peers, memory=not args.no_memory, log=log)
    result["notes"] = tnotes + result["notes"]
    result["settings"]["wall_seconds"] = time.perf_counter() - t0
    result["settings"]["threads"] = args.threads
    env = result["environment"]
    threads = "default threads" if args.threads is None else f"{args.threads} thread(s) per pool"
    kernels = "compiled NumPy kernels" if env["jit_kernels"] else "NumPy ufuncs only"
    print(f"arraymlp {env['versions']['arraymlp']} bench on {env['device_name']}; "
          f"repeat {repeat}, medians of interleaved rounds, {threads}, {kernels}")
    print()
    print(format_table(result["cases"]))
    for wl, by_dtype in result["crossover"].items():
        for dt, c in by_dtype.items():
            where = f"batch {c['batch']}" if c["batch"] is not None else "never (in the batches run)"
            print(f"{wl} {dt}: {c['gpu']} overtakes {c['cpu']} from {where}")
    mem = result["memory"]
    if mem:
        print(f"memory: one {mem['arch']} epoch over {mem['rows']} rows (batch {mem['batch']}, {mem['dtype']}): "
              f"peak {mem['peak_bytes'] / 2**20:.1f} MiB vs data + parameters + optimiser state + one "
              f"batch's activations {mem['budget_bytes'] / 2**20:.1f} MiB: ratio {mem['ratio']:.3f}")
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
            fh.write("\n")
        log(f"wrote {args.json}")
    if args.plot:
        if result["cases"]:
            plot_throughput(result["cases"], args.plot)
            log(f"wrote {args.plot}")
        else:
            log("no cases: no plot written")
    log(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
