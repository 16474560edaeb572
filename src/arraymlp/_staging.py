"""Host data for a model on another device: batches gathered on the host into reused
(pinned, where there is a GPU) buffers and copied to the device one batch ahead.

The fit loop gathers batches where the data lives (a device permutation and
``xp.take`` when the data is already on the model's device). When the data is on the
host (NumPy) and the model on a GPU, :class:`DeviceBatches` delivers each batch on the
device without a synchronous copy: the rows of batch ``i + 1`` are gathered into a
pinned host buffer and copied on a side stream while batch ``i`` computes, and the
compute stream waits for that copy by an event (a device-side wait, not a host one).
Two buffers per array alternate; before a buffer is refilled, the host waits for the
copy that read it two batches ago (long done in a steady state). Without a GPU stream
(NumPy, array-api-strict, torch on the CPU) a batch is a plain copy.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy

from ._backend import host_copies

__all__ = ["DeviceBatches", "StagedEpochs"]


class DeviceBatches:
    """Batches of host arrays, delivered on ``device`` of namespace ``xp``.

    Parameters
    ----------
    arrays : sequence of NumPy arrays (or None)
        Arrays of one length ``n`` (``x``, ``y``, sample weights); None passes through
        as None in every batch.
    xp : namespace
        The model's namespace.
    device : optional
        The model's device.
    batch_size : int
        Rows per batch (the last batch of an epoch may be shorter).
    dtypes : sequence, optional
        A host dtype per array for its device copy (``None``: the array's own), so that
        a float64 ``x`` travels as the model's float32.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp._staging import DeviceBatches
    >>> x = np.arange(10.0).reshape(5, 2)
    >>> batches = DeviceBatches([x, None], np, None, batch_size=2)
    >>> [b[0][:, 0].tolist() for b in batches.epoch(np.array([4, 0, 3, 1, 2]))]
    [[8.0, 0.0], [6.0, 2.0], [4.0]]
    """

    def __init__(self, arrays: Sequence[Any], xp, device, batch_size: int, dtypes: Sequence[Any] | None = None):
        self.arrays = [None if a is None else numpy.asarray(a) for a in arrays]
        lengths = {a.shape[0] for a in self.arrays if a is not None}
        if len(lengths) > 1:
            msg = f"DeviceBatches needs arrays of one length, got lengths {sorted(lengths)}"
            raise ValueError(msg)
        self.n = lengths.pop() if lengths else 0
        self.batch_size = int(batch_size)
        dtypes = list(dtypes) if dtypes is not None else [None] * len(self.arrays)
        if len(dtypes) != len(self.arrays):
            msg = f"dtypes must give one dtype (or None) per array: {len(self.arrays)} arrays, {len(dtypes)} dtypes"
            raise ValueError(msg)
        self.dtypes = [None if a is None else numpy.dtype(d if d is not None else a.dtype)
                       for a, d in zip(self.arrays, dtypes)]
        self.copies = host_copies(xp, device)
        self._slots = None  # two sets of host buffers, made on first use
        self._events = [None, None]
        self.sent = 0  # arrays sent to the device so far (one per array and batch)

    def _buffers(self, slot: int) -> list:
        if self._slots is None:
            rows = min(self.batch_size, self.n)
            self._slots = [[None if a is None else self.copies.host_buffer((rows, *a.shape[1:]), d)
                            for a, d in zip(self.arrays, self.dtypes)] for _ in range(2)]
        return self._slots[slot]

    def _stage(self, slot: int, lo: int, hi: int, order) -> tuple[list, Any]:
        """Gather rows ``[lo, hi)`` (of ``order``, or in order) into the slot's host
        buffers and start their copies: ``(device arrays, event)``."""
        self.copies.reusable(self._events[slot])  # the copy that read this slot last is done
        out = []
        idx = None if order is None else order[lo:hi]
        for a, buf in zip(self.arrays, self._buffers(slot)):
            if a is None:
                out.append(None)
                continue
            view = buf[: hi - lo]
            if idx is None:
                view[...] = a[lo:hi]
            elif a.dtype == view.dtype:
                numpy.take(a, idx, axis=0, out=view)
            else:
                view[...] = a[idx]
            out.append(self.copies.send(view))
            self.sent += 1
        event = self._events[slot] = self.copies.mark(out)
        return out, event

    def one(self, order: Any, lo: int, hi: int) -> tuple:
        """Rows ``[lo, hi)`` of ``order`` (or in order) as one batch of device arrays,
        from fresh host buffers, the host waiting for their copy: for a batch needed out
        of turn (a replay after divergence), never in a steady-state epoch."""
        idx = numpy.arange(lo, hi) if order is None else numpy.asarray(order)[lo:hi]
        out = []
        for a, d in zip(self.arrays, self.dtypes):
            if a is None:
                out.append(None)
                continue
            buf = self.copies.host_buffer((hi - lo, *a.shape[1:]), d)
            buf[...] = a[idx]
            out.append(self.copies.send(buf))
            self.sent += 1
        event = self.copies.mark(out)
        self.copies.use(event)
        self.copies.reusable(event)
        return tuple(out)

    def epoch(self, order: Any = None) -> Iterator[tuple]:
        """The epoch's batches as tuples of device arrays, in the order of ``order``
        (host integer indices, e.g. a permutation) or of the rows. Each batch is staged
        while the one before it is in use."""
        order = None if order is None else numpy.asarray(order)
        starts = list(range(0, self.n, self.batch_size))
        if not starts:
            return
        ahead = self._stage(0, 0, min(self.batch_size, self.n), order)
        pending = None  # a batch staged and not yet used
        try:
            for i in range(len(starts)):
                arrays, event = ahead
                pending = None
                if i + 1 < len(starts):
                    nlo = starts[i + 1]
                    ahead = pending = self._stage((i + 1) % 2, nlo, min(nlo + self.batch_size, self.n), order)
                self.copies.use(event)
                yield tuple(arrays)
        finally:
            # an epoch broken off drops the batch staged ahead: the compute stream waits for
            # its copy (a device-side wait) before its memory can go back to that stream's pool
            if pending is not None:
                self.copies.use(pending[1])


class StagedEpochs:
    """The training loop's view of :class:`DeviceBatches`: one epoch at a time, each
    batch asked for by its first row.

    :meth:`begin` starts an epoch in an order; :meth:`batch` ``(start)`` gives the batch
    of rows ``[start, start + batch_size)`` of it. Asked in turn (the steady state), it
    is the batch staged while the previous one computed; a batch skipped by the loop
    (a zero-weight batch) is passed over; one asked for again (the replay after a
    divergence) is gathered and copied anew by :meth:`DeviceBatches.one`.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp._staging import StagedEpochs
    >>> staged = StagedEpochs([np.arange(5.0)[:, None]], np, None, batch_size=2)
    >>> staged.begin(np.array([4, 3, 2, 1, 0]))
    >>> [staged.batch(s)[0][:, 0].tolist() for s in (0, 2, 0, 4)]
    [[4.0, 3.0], [2.0, 1.0], [4.0, 3.0], [0.0]]
    """

    def __init__(self, arrays: Sequence[Any], xp, device, batch_size: int, dtypes: Sequence[Any] | None = None):
        self.batches = DeviceBatches(arrays, xp, device, batch_size, dtypes)
        self.batch_size = self.batches.batch_size
        self._order = None
        self._it: Iterator[tuple] | None = None
        self._next = 0  # the index of the batch the iterator gives next

    def begin(self, order: Any = None) -> None:
        """Start an epoch in ``order`` (host integer indices, or None: the rows in order)."""
        if self._it is not None:
            self._it.close()  # the previous epoch's staged batch, if any, is dropped
        self._order = None if order is None else numpy.asarray(order)
        self._it, self._next = self.batches.epoch(self._order), 0

    def batch(self, start: int) -> tuple:
        """The epoch's batch whose first row is ``start`` (a multiple of the batch size)."""
        k = start // self.batch_size
        if self._it is None or k < self._next:
            return self.batches.one(self._order, start, min(start + self.batch_size, self.batches.n))
        while self._next < k:
            next(self._it)
            self._next += 1
        self._next += 1
        return next(self._it)
