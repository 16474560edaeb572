"""Benchmark workloads, the targets they run on, and their data.

A :class:`Workload` names one piece of work: a training step or an inference call of
one network, at a list of batch sizes and dtypes. :data:`WORKLOADS` is the table that
``python -m arraymlp bench`` runs. A :class:`Target` names where arraymlp runs it (a
backend and a device); :data:`TARGETS` lists them and :func:`available_targets` says
which of them this machine can run. Every candidate of a case draws its inputs from the
same seeded host data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Sequence

import numpy

__all__ = ["TARGETS", "WORKLOADS", "Target", "Workload", "available_targets"]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One named benchmark.

    Attributes
    ----------
    name : str
        Short key, ``"W1"`` ...
    title : str
        What it measures, for the table.
    kind : {"train", "infer", "ensemble"}
        One training step (forward, fused loss, backward, SGD update), one
        inference call (forward of the whole network, output activation included), or
        one training step of an ensemble (Adam): for this kind the case's size (the
        ``batches`` entries) is the member count K, each member steps on the same batch
        of ``ensemble_batch`` rows, and samples per second are member-steps per second.
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
        SGD learning rate (Adam's, 1e-3, for the ensemble kind).
    ensemble_batch : int
        Rows of the ensemble kind's batch.
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
    ensemble_batch: int = 64

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
        Workload("W6", "ensemble training step, Adam, K members on one batch of 64 (size = K)", "ensemble",
                 (64, 32, 10), (1, 4, 16, 64, 256), quick_batches=(1, 16, 64), lr=1e-3),
    )
}


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


def _host_data(sizes: Sequence[int], batch: int, loss: str, seed: int):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0]))
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], size=batch).astype(numpy.int64)
    else:
        y = rng.standard_normal((batch, sizes[-1]))
    return x, y
