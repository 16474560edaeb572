"""Data-parallel training over MPI (mpi4py).

Every rank holds the same model and the same data set (or at least the same rows in
the same order, say a memory map of one file). Each step, the global batch that a
single process would use is split into one contiguous shard per rank; every rank
computes the loss and gradients of its own shard, and the gradients are summed with a
single ``Allreduce`` of one flat buffer:

``g = sum_r W_r g_r / sum_r W_r``

where ``g_r`` is rank ``r``'s gradient of its shard's mean loss and ``W_r`` the weight
of the shard (its row count, or the sum of its ``sample_weight``). The losses take the
mean over the batch, so this weighting makes ``g`` the gradient of the global batch's
mean loss, whatever the shard sizes (the last batch of an epoch, a global batch not
divisible by the number of ranks, an empty shard). The loss and ``W_r`` travel in the
same buffer, so a step costs one collective.

Use it through :meth:`arraymlp.Sequential.fit` (or ``partial_fit``, one epoch a call)::

    from mpi4py import MPI
    model.fit(x, y, loss="cross_entropy", batch_size=512, comm=MPI.COMM_WORLD)

or with a :class:`DataParallel` object when its options or timings are wanted. What
``fit`` does with it:

- the ranks' arguments are compared (one ``allgather`` of the data's shapes and dtypes
  and the options), and a difference raises a ``ValueError`` on every rank;
- the parameters (and the generator that shuffles) are broadcast from the root rank
  before the first step, so every rank starts from, and keeps, the same state;
- the training metrics are summed by each rank over its shards' rows, on the device,
  and the sums added over the ranks once per epoch (one ``allgather``), so every rank's
  history is the single-process one;
- progress bars and ``verbose`` lines are shown by the root rank only, and
  :class:`arraymlp.Checkpoint` callbacks write on the root only; other callbacks run on
  every rank (so that :class:`~arraymlp.training.EarlyStopping` restores the same
  weights everywhere): wrap side-effecting ones (loggers, plots) in :class:`RootOnly`;
- ``resume_from=`` is read by every rank (put checkpoints on a shared file system), and
  the root's parameters and generator state are broadcast after it;
- validation is computed by the root rank and broadcast;
- stopping is decided collectively: the loss that the divergence check reads is the
  reduced one, so every rank raises :class:`~arraymlp.training.DivergenceError` at the
  same step; a callback asking to stop on any rank stops all of them; an exception
  while one rank computes its gradients is reported to every rank instead of leaving
  the others waiting in the collective.

A rank that dies outside those points (an uncaught exception anywhere in the script)
would leave the others blocked in their next collective; :func:`install_abort_hook`
(installed by :class:`DataParallel` unless ``abort_on_error=False``) makes an uncaught
exception call ``comm.Abort()`` so the whole job exits with a non-zero status.

Buffers: NumPy parameters are reduced in place. CuPy (and torch CUDA) buffers are
handed to MPI directly when the MPI library is CUDA-aware (:func:`cuda_aware_mpi`) and
staged through host memory otherwise; torch CPU and other host arrays are viewed as
NumPy through DLPack. float16 parameters are reduced in float32 (MPI has no
half-precision type).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import sys
import time
from typing import Any

import array_api_compat
import numpy

from ._backend import dtype_name, to_backend, to_numpy
from .callbacks import Callback

__all__ = [
    "DataParallel",
    "RootOnly",
    "cuda_aware_mpi",
    "has_batch_hook",
    "install_abort_hook",
    "shard_bounds",
]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
        msg = f"distributed training needs mpi4py: pip install 'arraymlp[mpi]' ({exc})"
        raise ImportError(msg) from exc
    return MPI


def shard_bounds(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the global batch ``[start, stop)`` that ``rank`` owns.

    The batch is cut into ``size`` contiguous pieces whose lengths differ by at most
    one, the longer ones first; a rank gets an empty piece when the batch has fewer
    rows than there are ranks.

    Parameters
    ----------
    start, stop : int
        Row range of the global batch.
    rank, size : int
        This rank and the number of ranks.

    Returns
    -------
    (int, int)
    """
    n = stop - start
    base, extra = divmod(n, size)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@functools.cache
def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI library accepts CUDA device buffers.

    Asks the library through ``MPIX_Query_cuda_support`` (provided by MPICH and Open
    MPI); ``False`` when the library does not say (or is not loaded).
    """
    _mpi()
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libmpi" in line and "/" in line})
    except OSError:
        paths = []
    for path in paths:
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


_ABORT_GRACE_S = 0.5  # seconds between printing a rank's traceback and aborting the job


def install_abort_hook(comm: Any = None, *, errorcode: int = 1) -> None:
    """Make an uncaught exception on this rank abort the whole MPI job.

    Without it, the other ranks of a job whose rank died wait in their next
    collective until they are killed. The hook prints the traceback as usual, waits
    half a second (the launcher forwards output asynchronously, and the abort would
    cut it off), then calls ``comm.Abort(errorcode)``. Installing it twice is harmless.

    Parameters
    ----------
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    errorcode : int
        Exit status the job ends with.
    """
    if comm is None:
        comm = _mpi().COMM_WORLD
    if getattr(sys.excepthook, "_arraymlp_abort", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
            sys.stdout.flush()
            sys.stderr.flush()
            # the launcher forwards output asynchronously, and an abort kills its
            # forwarding too: without a pause the traceback can be lost
            time.sleep(_ABORT_GRACE_S)
        finally:
            comm.Abort(errorcode)

    hook._arraymlp_abort = True
    sys.excepthook = hook


def _synchronize(a: Any) -> None:
    """Wait for pending device work on ``a`` before MPI reads or writes its memory."""
    if array_api_compat.is_cupy_array(a):
        import cupy

        with a.device:  # the current stream is per device: the one of a's device
            cupy.cuda.get_current_stream().synchronize()
    elif array_api_compat.is_torch_array(a) and a.device.type == "cuda":
        import torch

        torch.cuda.current_stream(a.device).synchronize()


def _on_host(a: Any) -> bool:
    if isinstance(a, numpy.ndarray):
        return True
    if array_api_compat.is_cupy_array(a):
        return False
    if array_api_compat.is_torch_array(a):
        return a.device.type == "cpu"
    return True


class DataParallel:
    """Data-parallel training over an MPI communicator.

    Pass it (or the communicator itself) as ``comm=`` to :meth:`arraymlp.Sequential.fit`
    or :meth:`arraymlp.Sequential.partial_fit`. Every rank must call them with the same
    arguments and the same data (checked at each call: the data's shapes and dtypes and
    the options, not the values).

    Parameters
    ----------
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    root : int
        Rank whose parameters are broadcast at the start, which shows progress and
        computes validation.
    cuda_aware : bool, optional
        Hand device buffers (CuPy, torch CUDA) to MPI directly; default: ask the MPI
        library (:func:`cuda_aware_mpi`).
    abort_on_error : bool
        Install :func:`install_abort_hook`, so an uncaught exception on any rank ends
        the whole job.

    Attributes
    ----------
    rank, size : int
    stats : dict
        ``steps`` and ``allreduce_s`` (seconds spent staging and in ``Allreduce``,
        waiting for the slowest rank included) accumulated over the steps taken;
        :meth:`reset_stats` clears them.

    Examples
    --------
    >>> from mpi4py import MPI                                       # doctest: +SKIP
    >>> dp = am.distributed.DataParallel(MPI.COMM_WORLD)             # doctest: +SKIP
    >>> model.fit(x, y, loss="cross_entropy", batch_size=512, comm=dp)  # doctest: +SKIP
    """

    def __init__(self, comm: Any = None, *, root: int = 0, cuda_aware: bool | None = None,
                 abort_on_error: bool = True):
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if not 0 <= root < self.size:
            msg = f"root must be a rank in [0, {self.size}), got {root!r}"
            raise ValueError(msg)
        self.root = root
        self._cuda_aware = cuda_aware
        self._sync_batches = False
        self.stats = {"steps": 0, "allreduce_s": 0.0}
        if abort_on_error:
            install_abort_hook(self.comm)

    @property
    def is_root(self) -> bool:
        """Whether this rank is the root (shows progress, computes validation)."""
        return self.rank == self.root

    @property
    def cuda_aware(self) -> bool:
        """Whether device buffers go to MPI directly (else through host memory)."""
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware_mpi()
        return self._cuda_aware

    def reset_stats(self) -> None:
        """Zero :attr:`stats`."""
        self.stats = {"steps": 0, "allreduce_s": 0.0}

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, size={self.size}, root={self.root})"

    # ------------------------------------------------------------------ collectives
    def _collective(self, flat: Any, xp: Any, device: Any, *, bcast: bool = False) -> Any:
        """Sum ``flat`` over the ranks (or broadcast the root's), returning an array of
        ``xp`` on ``device`` that may be ``flat`` itself."""
        MPI = _mpi()
        direct = isinstance(flat, numpy.ndarray) or (not _on_host(flat) and self.cuda_aware)
        if direct:
            _synchronize(flat)
            if bcast:
                self.comm.Bcast(flat, root=self.root)
            else:
                self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            return flat
        host = to_numpy(flat)
        if not (host.flags.writeable and host.flags.c_contiguous):
            host = numpy.array(host, copy=True, order="C")
        if bcast:
            self.comm.Bcast(host, root=self.root)
        else:
            self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        return to_backend(host, xp, device=device)

    def agree(self, flag: bool) -> bool:
        """``True`` on every rank when ``flag`` is true on any rank (a collective)."""
        return bool(self.comm.allreduce(bool(flag), op=_mpi().LOR))

    def on_root(self, fn, *args, **kwargs):
        """Call ``fn`` on the root only and broadcast its result to every rank.

        An exception on the root is raised on every rank (the others get a
        :class:`RuntimeError` quoting it), so none is left waiting.
        """
        if self.is_root:
            try:
                payload = (True, fn(*args, **kwargs))
            except Exception as exc:
                self.comm.bcast((False, f"{type(exc).__name__}: {exc}"), root=self.root)
                raise
            return self.comm.bcast(payload, root=self.root)[1]
        ok, value = self.comm.bcast(None, root=self.root)
        if not ok:
            msg = f"rank {self.root} failed: {value}"
            raise RuntimeError(msg)
        return value

    # ------------------------------------------------------------------ fit hooks
    def begin(self, model, x, callbacks=(), *, call: dict | None = None, what: str = "fit") -> None:
        """Check that every rank has the same data, broadcast the root's parameters and
        shuffling state, give each rank its own stream for dropout masks, and make
        :class:`arraymlp.Checkpoint` callbacks (in the list ``callbacks``) root-only.

        Called by :func:`arraymlp.training.fit` and ``partial_fit`` (at every call)
        before the first step.

        Parameters
        ----------
        model : Sequential
            Its parameters exist (``fit`` has validated the data).
        x : array, shape (n, n_features)
            This rank's training data; its shape must be the same on every rank.
        callbacks : list of Callback
            ``fit``'s callbacks; checkpoints (:class:`arraymlp.Checkpoint`, and any
            callback whose ``saves_callbacks`` is true) are replaced, in place, by
            :class:`RootOnly` wrappers.
        call : dict, optional
            What else every rank must pass alike (the other arrays' shapes and dtypes,
            ``batch_size``, the loss, the optimiser and its step count...), by name;
            compared in the same ``allgather`` as ``x``'s shape.
        what : str
            The function called, for the error message.

        Raises
        ------
        ValueError
            On every rank, naming what differs and its value on each rank.
        """
        mine = {"x shape": tuple(int(s) for s in x.shape), **(call or {})}
        # the root's generator state travels in the same collective
        gathered = self.comm.allgather((mine, model.rng.get_state() if self.is_root else None))
        calls, state = [c for c, _ in gathered], gathered[self.root][1]
        differ = [name for name in mine if any(c.get(name) != mine[name] for c in calls)]
        if differ or any(set(c) != set(mine) for c in calls):
            name = differ[0] if differ else "arguments"
            msg = (
                f"every rank must call {what} with the same data and arguments; {name} differs: "
                + ", ".join(f"{c.get(name)!r} on rank {r}" for r, c in enumerate(calls))
            )
            raise ValueError(msg)
        self.broadcast_parameters(model)
        model.rng.set_state(state)
        if not self.is_root:
            # Same permutation everywhere, but independent dropout masks per rank: a key of
            # the rank's own, derived from the root's, at the root's counter (so a run
            # resumed from the root's checkpoint draws the masks it drew before).
            for gen in [model.rng, *getattr(model.rng, "members", ())]:  # an ensemble's members' streams too
                seq = numpy.random.SeedSequence([gen.key, self.rank])
                gen.key = int(seq.generate_state(1, dtype=numpy.uint64)[0])
        if isinstance(callbacks, list):
            # checkpoints (callbacks that save the run's state) are written by the root only
            callbacks[:] = [RootOnly(cb, self) if _saves_run(cb) else cb for cb in callbacks]
        self._sync_batches = any(has_batch_hook(cb) for cb in callbacks)

    def broadcast_parameters(self, model) -> None:
        """Overwrite every rank's parameters with the root's (one ``Bcast``).

        Parameters
        ----------
        model : Sequential
            The same architecture and dtype on every rank.
        """
        xp, keys = model.xp, [(i, k) for i, p in enumerate(model.params) for k in p]
        if not keys or self.size == 1:
            return
        dtype = _wire_dtype(xp, model.dtype)
        flat = xp.concat([xp.reshape(xp.astype(model.params[i][k], dtype), (-1,)) for i, k in keys])
        flat = self._collective(flat, xp, model.device, bcast=True)
        if self.is_root:
            return
        offset = 0
        for i, k in keys:
            shape = tuple(model.params[i][k].shape)
            size = int(numpy.prod(shape, dtype=numpy.int64))
            seg = xp.reshape(flat[offset:offset + size], shape)
            model.params[i][k] = xp.astype(seg, model.dtype, copy=True)
            offset += size

    def shard(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of the global batch ``[start, stop)``."""
        return shard_bounds(start, stop, self.rank, self.size)

    def agree_batch(self, stop: bool) -> bool:
        """The collective stop decision after a batch (a no-op unless a callback has
        ``on_batch_end``, whose answer could then differ between ranks)."""
        return self.agree(stop) if self._sync_batches else bool(stop)

    def loss_and_grads(self, model, x, y, lossfn, *, xp, sample_weight=None, l2: float = 0.0, on_outputs=None,
                       hits=None):
        """Loss and gradients of the global batch from this rank's shard ``(x, y)``.

        Buffer layout: ``[W_r g_r (flattened, in parameter order), W_r L_r, W_r, err_r]``
        summed over the ranks by one ``Allreduce``, then divided by ``sum_r W_r``.

        Parameters
        ----------
        model : Sequential
        x : array, shape (n_r, n_features)
            This rank's shard of the global batch (``n_r`` may be 0).
        y : array, shape (n_r, n_outputs), (n_r,), or integer labels (n_r,)
            The shard's targets.
        lossfn : arraymlp.Loss
        xp : module
            The parameters' namespace.
        sample_weight : array of shape (n_r,), optional
            The shard's weights; the shard then weighs ``sum(sample_weight)``.
        l2 : float
            L2 penalty on the weight matrices, as in :func:`arraymlp.training.fit`.
        on_outputs : callable, optional
            Called with the shard's outputs (the training metrics' sums, on the device),
            also for a shard whose weights are all zero (the metrics are unweighted).
        hits : list, optional
            The accuracy's count that the table's cross-entropy adds the shard's right
            answers to.

        Returns
        -------
        loss : float
            Mean loss of the global batch (with the L2 term).
        grads : list of dict of arrays
            Mirroring ``model.params``; views into one buffer.
        """
        keys = [(i, k) for i, p in enumerate(model.params) for k in p]
        shapes = [tuple(model.params[i][k].shape) for i, k in keys]
        sizes = [int(numpy.prod(s, dtype=numpy.int64)) for s in shapes]
        dtype = _wire_dtype(xp, model.dtype)
        n = int(x.shape[0])
        failure, active = None, False
        try:
            if sample_weight is None:
                weight = float(n)
                active = n > 0
            else:
                active = n > 0 and bool(xp.any(sample_weight != 0))
                weight = float(xp.sum(xp.astype(sample_weight, model.dtype))) if active else 0.0
            if active:
                value, grads = model._loss_and_grads(x, y, lossfn, xp=xp, sample_weight=sample_weight, l2=l2,
                                                     on_outputs=on_outputs, hits=hits)
                parts = [xp.reshape(xp.astype(grads[i][k], dtype), (-1,)) for i, k in keys]
                tail = xp.stack([xp.astype(xp.asarray(value), dtype),
                                 xp.ones((), dtype=dtype, device=model.device),
                                 xp.zeros((), dtype=dtype, device=model.device)])
                flat = xp.concat([*parts, tail])
                flat = _scale(flat, weight)
            elif n > 0 and on_outputs is not None:  # no gradient, but rows the metrics count
                upto = len(model.layers) - 1 if model._fused(lossfn) else None
                on_outputs(model.forward(x, training=True, xp=xp, upto=upto, keep=False)[0])
        except Exception as exc:  # reported to every rank below, then re-raised here
            failure = exc
        if failure is not None or not active:
            flat = xp.zeros((sum(sizes) + 3,), dtype=dtype, device=model.device)
            if failure is not None:
                flat = xp.concat([flat[:-1], xp.ones((1,), dtype=dtype, device=model.device)])

        t0 = time.perf_counter()
        flat = self._collective(flat, xp, model.device)
        tail = to_numpy(flat[-3:]).astype(numpy.float64)
        self.stats["allreduce_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1

        if tail[2] > 0:
            if failure is not None:
                raise failure
            msg = f"{int(tail[2])} other rank(s) failed while computing gradients; see their errors"
            raise RuntimeError(msg)
        total = float(tail[1])
        if total == 0.0:
            msg = (
                f"{lossfn.name}: sample_weight is all zero over the global batch; "
                "at least one sample needs a positive weight"
            )
            raise ValueError(msg)
        value = float(tail[0]) / total
        flat = _scale(flat, 1.0 / total)
        grads = [{} for _ in model.params]
        offset = 0
        for (i, k), shape, size in zip(keys, shapes, sizes):
            g = xp.reshape(flat[offset:offset + size], shape)
            grads[i][k] = g if dtype == model.dtype else xp.astype(g, model.dtype)
            offset += size
        return value, grads

    def member_loss_and_grads(self, model, compute):
        """Each member's loss and gradients of the global batch, for an ensemble
        (``ensemble=K``), from this rank's shard.

        ``compute()`` gives this rank's ``(losses, grads, weights)``: the members' mean
        losses over the shard, shape (K,), their gradients (mirroring the stacked
        ``model.params``) and the shard's weight for each member, shape (K,) (its row
        count, or the sum of the member's row of ``sample_weight``); or ``None`` for an
        empty shard. Per member ``k`` the result is

        ``g_k = sum_r W_rk g_rk / sum_r W_rk``

        (0 where ``sum_r W_rk`` is 0: a global batch in which member ``k`` has no weight).
        Buffer layout: ``[W_rk g_rk (flattened, in parameter order), W_rk L_rk (K),
        W_rk (K), err_r]``, one ``Allreduce`` for all the members; the only host read is
        ``err`` (an exception on any rank is raised on every rank).

        Parameters
        ----------
        model : Sequential built with ``ensemble=K``
        compute : callable
            ``compute() -> (losses, grads, weights)`` or ``None``.

        Returns
        -------
        losses : array, shape (K,)
            Each member's mean loss over the global batch (on the device, not read).
        grads : list of dict of arrays
            Mirroring ``model.params``.
        weights : array, shape (K,)
            Each member's total weight in the global batch.
        """
        xp, k = model.xp, int(model.ensemble)
        keys = [(i, key) for i, p in enumerate(model.params) for key in p]
        shapes = [tuple(model.params[i][key].shape) for i, key in keys]
        sizes = [int(numpy.prod(s, dtype=numpy.int64)) for s in shapes]
        dtype, device = _wire_dtype(xp, model.dtype), model.device
        failure, flat = None, None
        try:
            result = compute()
            if result is not None:
                losses, grads, weights = result
                wk = xp.astype(weights, dtype, copy=False)
                col = xp.reshape(wk, (k, 1, 1))
                parts = [xp.reshape(xp.astype(grads[i][key], dtype, copy=False) * col, (-1,)) for i, key in keys]
                flat = xp.concat([*parts, xp.astype(losses, dtype) * wk, wk,
                                  xp.zeros((1,), dtype=dtype, device=device)])
        except Exception as exc:  # reported to every rank below, then re-raised here
            failure = exc
        if flat is None:
            flat = xp.zeros((sum(sizes) + 2 * k + 1,), dtype=dtype, device=device)
            if failure is not None:
                flat = xp.concat([flat[:-1], xp.ones((1,), dtype=dtype, device=device)])

        t0 = time.perf_counter()
        flat = self._collective(flat, xp, device)
        err = float(to_numpy(flat[-1:])[0])
        self.stats["allreduce_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        if err > 0:
            if failure is not None:
                raise failure
            msg = f"{int(err)} other rank(s) failed while computing gradients; see their errors"
            raise RuntimeError(msg)
        total = sum(sizes)
        weights = flat[total + k:total + 2 * k]
        inv = 1.0 / xp.where(weights > 0, weights, xp.ones_like(weights))
        losses = flat[total:total + k] * inv
        col = xp.reshape(inv, (k, 1, 1))
        grads = [{} for _ in model.params]
        offset = 0
        for (i, key), shape, size in zip(keys, shapes, sizes):
            g = _scale(xp.reshape(flat[offset:offset + size], shape), col)  # in place in the reduced buffer
            grads[i][key] = g if dtype == model.dtype else xp.astype(g, model.dtype)
            offset += size
        if dtype != model.dtype:
            losses, weights = xp.astype(losses, model.dtype), xp.astype(weights, model.dtype)
        return losses, grads, weights

    # ------------------------------------------------------------------ checks
    def parameters_agree(self, model) -> bool:
        """Whether every rank holds bit-identical parameters (a collective, for tests
        and debugging).

        Parameters
        ----------
        model : Sequential
        """
        digest = hashlib.sha256()
        for p in model.params:
            for k in sorted(p):
                digest.update(numpy.ascontiguousarray(to_numpy(p[k])).tobytes())
        return len(set(self.comm.allgather(digest.hexdigest()))) == 1


def _wire_dtype(xp, dtype):
    """The dtype gradients travel in: the parameters', float32 for float16."""
    return xp.float32 if dtype_name(dtype) == "float16" else dtype


def _scale(a, c):
    if array_api_compat.is_writeable_array(a):
        a *= c
        return a
    return a * c


def _saves_run(callback) -> bool:
    """Whether a callback writes checkpoints of the run (``saves_callbacks``, which
    :class:`arraymlp.Checkpoint` sets) and is not yet wrapped in :class:`RootOnly`."""
    return bool(getattr(callback, "saves_callbacks", False)) and not isinstance(callback, RootOnly)


def has_batch_hook(callback) -> bool:
    """Whether a callback overrides ``on_batch_end`` (and so may stop after a batch)."""
    if isinstance(callback, RootOnly):
        return has_batch_hook(callback.callback)
    hook = getattr(callback, "on_batch_end", None)
    return hook is not None and getattr(hook, "__func__", None) is not Callback.on_batch_end


class RootOnly(Callback):
    """Run a callback's hooks on the root rank only (checkpoints, loggers, plots).

    A stop it asks for is shared with the other ranks by :func:`arraymlp.training.fit`,
    which decides stops collectively.

    Parameters
    ----------
    callback : Callback
    comm : mpi4py communicator or DataParallel, optional
        Default ``MPI.COMM_WORLD``.
    root : int
    """

    def __init__(self, callback, comm: Any = None, *, root: int = 0):
        if isinstance(comm, DataParallel):
            comm, root = comm.comm, comm.root
        elif comm is None:
            comm = _mpi().COMM_WORLD
        self.callback = callback
        self.active = comm.Get_rank() == root

    def on_train_begin(self, model, history):
        return self.callback.on_train_begin(model, history) if self.active else None

    def on_epoch_begin(self, model, epoch):
        return self.callback.on_epoch_begin(model, epoch) if self.active else None

    def on_epoch_end(self, model, logs):
        return self.callback.on_epoch_end(model, logs) if self.active else None

    def on_train_end(self, model, history):
        return self.callback.on_train_end(model, history) if self.active else None

    def on_batch_end(self, model, logs):
        return self.callback.on_batch_end(model, logs) if self.active else None

    # A wrapped Checkpoint stays a checkpoint to fit: it runs after the other callbacks
    # and saves their state; a wrapped stateful callback keeps its state.
    @property
    def saves_callbacks(self) -> bool:
        return bool(getattr(self.callback, "saves_callbacks", False))

    @property
    def run_callbacks(self):
        return getattr(self.callback, "run_callbacks", ())

    @run_callbacks.setter
    def run_callbacks(self, callbacks) -> None:
        self.callback.run_callbacks = callbacks

    @property
    def state_name(self) -> str:
        """The wrapped callback's name for its saved state: a checkpoint written by a
        wrapped callback resumes into the bare one (``resume_from`` restores the
        callbacks before data-parallel training wraps them) and back."""
        return getattr(self.callback, "state_name", None) or type(self.callback).__name__

    def state_dict(self):
        state_dict = getattr(self.callback, "state_dict", None)
        return state_dict() if state_dict is not None else None

    def load_state_dict(self, state) -> None:
        self.callback.load_state_dict(state)

    def __repr__(self) -> str:
        return f"RootOnly({self.callback!r})"
