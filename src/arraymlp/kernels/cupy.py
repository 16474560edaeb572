"""The CuPy set: CuPy's ufuncs with ``out=`` and reductions by method, integer-array
indexing for the label cross-entropy, and the optimiser's product into a work buffer.
This is where the GPU's fused kernels (``ElementwiseKernel``, cuBLAS with ``beta``)
belong as they are written."""

from __future__ import annotations

from . import _common as C

OVERRIDES = {
    **C.UFUNC_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    **C.OPTIMIZER_OVERRIDES,
}
