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

The package is laid out as

- :mod:`~arraymlp.bench.workloads`: the workloads, the targets and their data;
- :mod:`~arraymlp.bench.candidates`: arraymlp, its GEMM floor and the peers, each
  doing a case's work;
- :mod:`~arraymlp.bench.timing`: interleaved rounds, statistics, ratios, thread limits;
- :mod:`~arraymlp.bench.memory`: the peak memory of one training epoch;
- :mod:`~arraymlp.bench.machine`: the machine, devices, BLAS and versions of a run;
- :mod:`~arraymlp.bench.report`: the table, the CPU/GPU crossover and the plot;
- :mod:`~arraymlp.bench.runner`: the cases, a whole run and the ``bench`` command;

and the names of :data:`__all__` are importable from ``arraymlp.bench`` itself, as are
:func:`~arraymlp.bench.runner.run_case`, :func:`~arraymlp.bench.candidates.train_step`,
:func:`~arraymlp.bench.candidates.tf32` and
:data:`~arraymlp.bench.runner.SWITCH_TIME` (redundant aliases below mark the names
re-exported outside ``__all__``).
"""

from __future__ import annotations

from .candidates import (
    KERNELS,
    Candidate,
    gemm_floor_products,
    make_arraymlp,
    make_gemm_floor,
    make_kernel,
    make_sklearn,
    make_torch,
)
from .candidates import _in_tf32 as _in_tf32
from .candidates import tf32 as tf32
from .candidates import train_step as train_step
from .machine import environment
from .memory import measure_memory
from .report import SPREAD_LIMIT, crossover_batch, format_table, plot_throughput, ratio_legend, spread_warnings
from .runner import SWITCH_TIME as SWITCH_TIME
from .runner import _runtime as _runtime
from .runner import main, run
from .runner import run_case as run_case
from .timing import compute_ratios, interleaved, limit_threads, summarize
from .workloads import TARGETS, WORKLOADS, Target, Workload, available_targets
from .workloads import _host_data as _host_data

__all__ = [
    "SPREAD_LIMIT",
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
    "ratio_legend",
    "run",
    "spread_warnings",
    "summarize",
]
