"""Host batches for a model on another device (:mod:`arraymlp._staging`), on every
backend row: the batches are the rows of the permutation, in the model's dtype and
place, independent of the reused host buffers, and the host data is never written."""

from __future__ import annotations

import numpy as np
import pytest

from arraymlp._backend import _PlainCopies, canonical_device, host_copies, index_dtype
from arraymlp._staging import DeviceBatches


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_the_rows_on_the_models_device(backend, shuffle):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 4))  # float64 on the host, float32 on the device
    y = np.arange(23) % 3
    if backend.readonly:
        x.flags.writeable = y.flags.writeable = False
    x0, y0 = x.copy(), y.copy()
    xp = backend.xp
    device = canonical_device(xp, backend.device)
    order = rng.permutation(23) if shuffle else None
    batches = DeviceBatches([x, y, None], xp, device, batch_size=5, dtypes=["float32", None, None])
    got = list(batches.epoch(order))
    rows = order if shuffle else np.arange(23)
    assert [b[0].shape[0] for b in got] == [5, 5, 5, 5, 3]
    for i, (xb, yb, wb) in enumerate(got):  # read after the whole epoch: no batch shares a reused buffer
        idx = rows[5 * i: 5 * i + 5]
        assert wb is None and backend.same_place(xb) and backend.same_place(yb)
        assert xb.dtype == xp.float32 and yb.dtype == index_dtype(xp)  # int32 on JAX's 32-bit mode
        np.testing.assert_array_equal(backend.to_numpy(xb), x[idx].astype(np.float32))
        np.testing.assert_array_equal(backend.to_numpy(yb), y[idx])
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    again = list(batches.epoch(order))  # the buffers serve the next epoch too
    np.testing.assert_array_equal(backend.to_numpy(again[-1][0]), backend.to_numpy(got[-1][0]))


def test_copies_by_backend():
    assert type(host_copies(np)) is _PlainCopies
    torch = pytest.importorskip("torch")
    from arraymlp._backend import resolve_backend

    assert type(host_copies(resolve_backend("torch"), torch.device("cpu"))) is _PlainCopies


def test_arrays_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        DeviceBatches([np.zeros((3, 2)), np.zeros(4)], np, None, batch_size=2)
    with pytest.raises(ValueError, match="one dtype"):
        DeviceBatches([np.zeros((3, 2)), np.zeros(3)], np, None, batch_size=2, dtypes=["float32"])
    assert list(DeviceBatches([np.zeros((0, 2))], np, None, batch_size=2).epoch()) == []
