"""Benchmark candidates: the implementations of a case's work, ready to time.

Each ``make_*`` function builds one implementation of a workload at one batch size and
dtype, and returns a callable that does the work once and returns when the device has
finished it: arraymlp itself (:func:`make_arraymlp`, a step as :func:`train_step` takes
it), its GEMM floor (:func:`make_gemm_floor`, the products of
:func:`gemm_floor_products` and nothing else), PyTorch eager (:func:`make_torch`) and
scikit-learn (:func:`make_sklearn`). :func:`make_kernel` builds the pieces of the hot
path that the pytest-benchmark suites in ``benchmarks/`` time. TF32 cases run inside
:func:`tf32`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Sequence

import numpy

from ..training import _loss_then_update
from .workloads import TARGETS, Target, Workload, _has, _host_data

__all__ = ["KERNELS", "Candidate", "gemm_floor_products", "make_arraymlp", "make_gemm_floor", "make_kernel",
           "make_sklearn", "make_torch", "tf32", "train_step"]


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
    TF32 off), so that a timed call carries no context manager: entering one is a
    visible part of the small workloads' steps."""
    if not enabled or not target.gpu:
        return fn

    def run():
        with tf32(target, True):
            return fn()

    return run


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


def _output_activation(loss: str) -> str | None:
    return "softmax" if loss == "cross_entropy" else None


def train_step(model, optimizer, lossfn, x, y, *, xp, sync: Callable[[], None] = lambda: None) -> Any:
    """One training step as :func:`arraymlp.training.fit` takes it on a batch.

    Forward, fused loss, backward and the optimiser's update (for plain SGD, fused into
    the backward pass, as ``fit`` does), with nothing read back to the host: the loss
    stays a 0-d array on the device, as in ``fit``'s steps (which read an epoch's losses
    together at its end). ``sync`` waits for the device at the end, so a timed call
    holds the step's device time.

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
    array, shape ()
        The batch loss, on the device (not read).
    """
    value, update = _loss_then_update(model, optimizer, lossfn, x, y, None, xp=xp)
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
    from .. import MLP
    from .._backend import resolve_backend
    from ..losses import get_loss
    from ..optim import SGD

    target = TARGETS[target] if isinstance(target, str) else target
    sync = _sync_fn(target)
    if workload.kind == "ensemble":
        return _make_arraymlp_ensemble(target, workload, batch, dtype, seed=seed, sync=sync)
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


def _make_arraymlp_ensemble(target: Target, workload: Workload, k: int, dtype: str, *, seed: int,
                            sync: Callable[[], None]) -> Callable[[], Any]:
    """One training step of an ensemble of ``k`` members (Adam), as its ``fit`` takes it."""
    from .. import MLP
    from .._backend import resolve_backend
    from ..ensemble import make_step

    model = MLP(list(workload.sizes), activation=workload.activation,
                output_activation=_output_activation(workload.loss), dtype=_array_dtype(dtype),
                backend=target.backend, device=target.device, seed=seed, ensemble=k)
    xp = resolve_backend(target.backend)
    xh, yh = _host_data(workload.sizes, workload.ensemble_batch, workload.loss, seed)
    x = xp.asarray(xh.astype(_array_dtype(dtype)), device=model.device)
    y = xp.asarray(yh if yh.dtype == numpy.int64 else yh.astype(_array_dtype(dtype)), device=model.device)
    step = make_step(model, x, y, loss=workload.loss, optimizer="adam", lr=workload.lr)

    def run():
        out = step()
        sync()
        return out

    return run


def _make_torch_vmap(device: str, workload: Workload, k: int, dtype: str, *, seed: int) -> Callable[[], Any]:
    """PyTorch's way to train ``k`` networks at once: ``torch.func.stack_module_state``
    over ``k`` modules, ``vmap`` of ``grad_and_value`` of a ``functional_call``, and
    ``torch.optim.Adam`` over the stacked parameters; each step reads the losses."""
    import copy

    import torch
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    torch.manual_seed(seed)
    tdtype = getattr(torch, _array_dtype(dtype))
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[workload.activation]

    def net():
        mods: list[Any] = []
        for i, (a, b) in enumerate(zip(workload.sizes[:-1], workload.sizes[1:])):
            mods.append(torch.nn.Linear(a, b))
            if i < workload.n_layers - 1:
                mods.append(act())
        return torch.nn.Sequential(*mods).to(device=device, dtype=tdtype)

    models = [net() for _ in range(k)]
    params, buffers = stack_module_state(models)
    params = {name: p.detach().requires_grad_(False) for name, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    xh, yh = _host_data(workload.sizes, workload.ensemble_batch, workload.loss, seed)
    x = torch.as_tensor(xh, dtype=tdtype, device=device)
    if workload.loss == "cross_entropy":
        y = torch.as_tensor(yh, device=device)
        lossf = torch.nn.functional.cross_entropy
    else:
        y = torch.as_tensor(yh, dtype=tdtype, device=device)
        lossf = torch.nn.functional.mse_loss

    def member_loss(p, b, xb, yb):
        return lossf(functional_call(base, (p, b), (xb,)), yb)

    grads_and_losses = vmap(grad_and_value(member_loss), in_dims=(0, 0, None, None))
    opt = torch.optim.Adam(list(params.values()), lr=workload.lr)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        grads, losses = grads_and_losses(params, buffers, x, y)
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        out = losses.cpu()
        sync()
        return out

    return step


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
    from .._backend import canonical_device, resolve_backend

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

    if workload.kind == "ensemble":
        return _make_torch_vmap(device, workload, batch, dtype, seed=seed)
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
    from .. import MLP

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
