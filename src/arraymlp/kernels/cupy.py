"""The CuPy set: CuPy's ufuncs with ``out=`` and reductions by method, integer-array
indexing for the label cross-entropy, and the optimiser's product into a work buffer.
This is where the GPU's fused kernels (``ElementwiseKernel``, cuBLAS with ``beta``)
belong as they are written. A cupyx.scipy.sparse input of the first dense layer is
multiplied by cupyx's sparse product (:data:`._common.SPARSE_OVERRIDES`)."""

from __future__ import annotations

from . import _common as C

OVERRIDES = {
    **C.UFUNC_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    # cupyx.scipy.sparse inputs of the first layer (written as the NumPy set's; untested
    # without a CUDA device)
    **C.SPARSE_OVERRIDES,
}
