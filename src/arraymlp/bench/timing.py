"""Timing: callables run side by side in interleaved rounds, and their statistics.

:func:`interleaved` times the candidates of one case in rounds (A B C A B C ...), so
that noise from the rest of the machine falls on all of them alike;
:func:`summarize` reduces each candidate's samples to a median and its spread, and
:func:`compute_ratios` sets each median against its GEMM floor's and every peer's.
:func:`limit_threads` caps the thread pools the timed work runs on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from typing import Any, Callable, Sequence

from .workloads import _has

__all__ = ["compute_ratios", "interleaved", "limit_threads", "summarize"]


def interleaved(fns: dict[str, Callable[[], Any]], *, repeat: int, warmup: int = 2,
                min_time: float = 0.01, max_number: int = 1000, settle: int = 1,
                groups: dict[str, str] | None = None, switch_time: float = 0.0) -> dict[str, list[float]]:
    """Time several callables in interleaved rounds (A B C A B C ...).

    Each callable is first called ``warmup`` times, then its calls per sample are
    calibrated so that a sample lasts at least ``min_time`` seconds; each of the
    ``repeat`` rounds then takes one sample of every callable in turn. Every sample is
    preceded by ``settle`` untimed calls of the same callable, and the first sample
    after a change of ``groups`` (the threading runtime a callable runs on) by untimed
    calls lasting ``switch_time`` seconds: after a NumPy product OpenBLAS's idle worker
    threads keep spinning for a while and starve PyTorch's OpenMP threads, slowing a
    PyTorch CPU step that starts meanwhile. Each sample thus measures its candidate in
    the steady state a training loop runs in. Callables of one group run one after
    another within a round. The garbage collector is paused while timing, as
    :mod:`timeit` does.

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
