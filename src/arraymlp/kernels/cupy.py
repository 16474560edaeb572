"""The CuPy set: one CUDA kernel where the reference takes several.

- ``dense_relu_forward``: the product by cuBLAS, then the bias and the ReLU in one
  ``ElementwiseKernel`` (the reference: an add, then a maximum).
- ``relu_backward_inplace``, ``tanh_backward_inplace``, ``sigmoid_backward_inplace``:
  the derivative and the product in one kernel (the reference: two or three).
- ``cross_entropy_labels_mean``: the row maximum, exponentials, row sum, per-sample loss
  and gradient of a label softmax cross-entropy in one kernel (a thread per row), and
  the sum of the losses (one reduction): two launches where the reference takes ~20.
- ``sgd_momentum_update``, ``adam_update``, ``rmsprop_update``: the whole optimiser
  step of a parameter array, moments included, in one kernel.
- ``dense_sgd_update``: the weight gradient accumulated into ``W`` by one cuBLAS gemm
  (``W = beta W + alpha x.T @ dy``, ``alpha = -lr``, ``beta = 1 - lr l2``).
- ``pick_labels``, ``subtract_onehot``: the shared integer-array indexing (``_common``), its row index kept
  per device id (a ``cupy.cuda.Device`` is unhashable, so a cache keyed by it misses).
- A cupyx.scipy.sparse input of the first dense layer is multiplied by cupyx's sparse
  product (``dense_forward``, ``dense_backward``, ``dense_relu_forward``,
  ``dense_sgd_update``; :data:`._common.SPARSE_OVERRIDES`), written as the NumPy set's
  scipy.sparse path and not yet run on a GPU.

Each override checks that it applies (CuPy arrays of float32 or float64 of one dtype,
the layout it needs) and otherwise calls the kernel it replaces. Kernels are compiled
with ``--fmad=false``, so that no multiply-add is contracted: the values are those of
the reference's separate operations (the row sums of the cross-entropy run in another
order). CuPy compiles every kernel, its own included, with ``-ftz=true``: float32
subnormal values are flushed to zero in these kernels as in the reference's CuPy
operations. CuPy is imported when a kernel is first built, never at import: this module
loads without it. tests/test_cupy_nvrtc.py compiles every source here with NVRTC.
"""

from __future__ import annotations

from .._backend import is_sparse, is_writeable
from . import _common as C
from . import reference as R

_OPTIONS = ("--fmad=false",)
_BUILT: dict = {}  # kernel key -> compiled kernel object (CuPy compiles it once per device)
_CE_MAX_CLASSES = 4096  # one thread per row loops over the classes: beyond this, the reference


def _floats(*arrays) -> bool:
    """Whether every argument is a float32/float64 array of one dtype and shape."""
    a0 = arrays[0]
    d = getattr(a0, "dtype", None)
    if d is None or d.char not in "fd":
        return False
    return all(getattr(a, "dtype", None) == d and a.shape == a0.shape for a in arrays[1:])


def _on(a):
    """The context that makes ``a``'s device current (a ``cupy.cuda.Device``)."""
    return a.device


def _launch(kernel, anchor, *args) -> None:
    """``kernel(*args)`` with ``anchor``'s device current (CuPy launches on the current one)."""
    with _on(anchor):
        kernel(*args)


def _elementwise(name: str, in_params: str, out_params: str, body: str):
    """An ``ElementwiseKernel``, built on first use and kept."""
    key = (name, in_params, out_params, body)
    k = _BUILT.get(key)
    if k is None:
        import cupy

        k = _BUILT[key] = cupy.ElementwiseKernel(in_params, out_params, body, f"arraymlp_{name}", options=_OPTIONS)
    return k


# ---------------------------------------------------------------- activations
_BIAS_RELU = "T v = y + b; y = v < (T)0 ? (T)0 : v;"  # NaN stays NaN, as maximum(v, 0)


def dense_relu_forward(x, W, b, xp, *, relu_forward_inplace=R.relu_forward_inplace):
    """``max(x @ W + b, 0)``: cuBLAS's product (cupyx's for a sparse ``x``), then the bias
    and the ReLU in one kernel."""
    y = C.sparse_product(x, W, xp) if is_sparse(x) else x @ W
    if (b is not None and y.ndim == 2 and tuple(b.shape) == (y.shape[1],) and y.dtype == b.dtype
            and y.dtype.char in "fd" and is_writeable(y)):
        _launch(_elementwise("bias_relu", "T b", "T y", _BIAS_RELU), y, b, y)
        return y
    return relu_forward_inplace(y if b is None else R.add_bias(y, b, xp), xp)


def relu_backward_inplace(dy, y, xp):
    """``dy * [y > 0]`` into ``dy`` in one kernel."""
    if _floats(dy, y) and is_writeable(dy):
        _launch(_elementwise("relu_bw", "T y", "T dy", "dy = dy * (T)(y > (T)0);"), dy, y, dy)
        return dy
    return C.relu_backward_inplace(dy, y, xp)


def tanh_backward_inplace(dy, y, xp):
    """``dy * (1 - y^2)`` into ``dy`` in one kernel."""
    if _floats(dy, y) and is_writeable(dy):
        _launch(_elementwise("tanh_bw", "T y", "T dy", "dy = dy * ((T)1 - y * y);"), dy, y, dy)
        return dy
    return C.tanh_backward_inplace(dy, y, xp)


def sigmoid_backward_inplace(dy, y, xp):
    """``dy * (1 - y) y`` into ``dy`` in one kernel."""
    if _floats(dy, y) and is_writeable(dy):
        _launch(_elementwise("sigmoid_bw", "T y", "T dy", "dy = dy * (((T)1 - y) * y);"), dy, y, dy)
        return dy
    return R.sigmoid_backward_inplace(dy, y, xp)


# ------------------------------------------------------- label cross-entropy
_CE_SOURCE = r"""
extern "C" __global__ void arraymlp_ce_labels_{T}(
        const {T}* x, const long long* labels, {T}* g, {T}* loss, const int n, const int k, const {T} inv_n) {
    const int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= n) return;
    const {T}* xi = x + (long long)i * k;
    {T}* gi = g + (long long)i * k;
    {T} m = xi[0];
    for (int j = 1; j < k; ++j) {
        const {T} v = xi[j];
        if (v > m || v != v) m = v;  /* a NaN logit makes the row NaN, as max does */
    }
    {T} s = 0;
    for (int j = 0; j < k; ++j) {
        const {T} e = exp(xi[j] - m);
        gi[j] = e;
        s += e;
    }
    const long long y = labels[i];
    if (y < 0 || y >= k) {  /* a label outside the classes: NaN, never a silent value */
        loss[i] = {NAN};
        for (int j = 0; j < k; ++j) gi[j] = {NAN};
        return;
    }
    loss[i] = log(s) - (xi[y] - m);
    for (int j = 0; j < k; ++j) {
        {T} v = gi[j] / s;
        if (j == y) v = v - ({T})1;
        gi[j] = v * inv_n;
    }
}
"""
_CE_TYPES = {"f": ("float", "__int_as_float(0x7fffffff)"),
             "d": ("double", "__longlong_as_double(0x7fffffffffffffffLL)")}


def _ce_kernel(char: str):
    key = ("ce_labels", char)
    k = _BUILT.get(key)
    if k is None:
        import cupy

        t, nan = _CE_TYPES[char]
        src = _CE_SOURCE.replace("{T}", t).replace("{NAN}", nan)
        k = _BUILT[key] = cupy.RawKernel(src, f"arraymlp_ce_labels_{t}", options=_OPTIONS)
    return k


def cross_entropy_labels_mean(x, labels, xp, *, cross_entropy_labels=R.cross_entropy_labels,
                              batch_sum=R.batch_sum):
    """One kernel (a thread per row) for the per-sample losses and the gradient ``g / n``,
    then one sum, as the reference: rows shifted by their maximum, ``g = exp(z)/s - onehot``
    scaled by ``1/n``. A label outside ``[0, k)`` gives a NaN loss and gradient row."""
    n, k = x.shape if x.ndim == 2 else (0, 0)
    if (n and k and k <= _CE_MAX_CLASSES and x.dtype.char in "fd" and x.flags.c_contiguous
            and labels.ndim == 1 and labels.shape[0] == n and labels.dtype.name == "int64"
            and labels.flags.c_contiguous):
        import cupy

        with _on(x):
            g = cupy.empty_like(x)
            per_sample = cupy.empty((n,), dtype=x.dtype)
            threads = 128
            _ce_kernel(x.dtype.char)(((n + threads - 1) // threads,), (threads,),
                                     (x, labels, g, per_sample, cupy.int32(n), cupy.int32(k),
                                      x.dtype.type(1.0 / n)))
            return per_sample.sum(), g
    return R.cross_entropy_labels_mean(x, labels, xp, cross_entropy_labels=cross_entropy_labels,
                                       batch_sum=batch_sum)


# ----------------------------------------------------------------- SGD with cuBLAS
def _blas_ready(a) -> bool:
    return a.ndim == 2 and (a.flags.c_contiguous or a.flags.f_contiguous)


def dense_sgd_update(x, dy, W, b, lr, l2, xp, *, bias_grad=R.bias_grad, sgd_apply=R.sgd_apply):
    """``W = (1 - lr l2) W - lr x.T @ dy`` by one cuBLAS gemm into ``W`` (float32/float64,
    one dtype, ``W``, ``x`` and ``dy`` each C- or F-contiguous: ``cupy.cublas.gemm`` then
    writes ``W`` in place and copies nothing): no gradient array. A cupyx.scipy.sparse
    ``x`` takes the sparse product instead."""
    if is_sparse(x):
        return C.dense_sgd_update(x, dy, W, b, lr, l2, xp, bias_grad=bias_grad, sgd_apply=sgd_apply)
    if (W.dtype.char in "fd" and x.dtype == dy.dtype == W.dtype and _blas_ready(W) and is_writeable(W)
            and _blas_ready(x) and _blas_ready(dy) and x.shape[0] == dy.shape[0]
            and W.shape == (x.shape[1], dy.shape[1])):
        import cupy.cublas

        with _on(W):
            cupy.cublas.gemm("T", "N", x, dy, out=W, alpha=-lr, beta=1.0 - lr * l2)
        if b is not None:
            b = sgd_apply(b, bias_grad(dy, xp), lr, 0.0, xp)
        return W, b
    return R.dense_sgd_update(x, dy, W, b, lr, l2, xp, bias_grad=bias_grad, sgd_apply=sgd_apply)


# ------------------------------------------------------------- optimiser steps
def sgd_momentum_update(p, g, buf, lr, momentum, dampening, nesterov, wd, first, xp, work=None, *, axpy=R.axpy):
    """The momentum SGD step of one array in one kernel (``p`` and ``buf`` in place)."""
    if _floats(p, g, buf) and is_writeable(p) and is_writeable(buf):
        body = ["T gg = g;"]
        if R.is_on(wd):
            body.append("gg = g + wd * p;")
        body.append("buf = buf + gg;" if first else "buf = buf * mom + omd * gg;")
        body.append("p = p + neglr * (gg + mom * buf);" if nesterov else "p = p + neglr * buf;")
        k = _elementwise("sgd_momentum", "T g, T neglr, T mom, T omd, T wd", "T p, T buf", "\n".join(body))
        _launch(k, p, g, -lr, momentum, 1.0 - dampening, wd, p, buf)
        return p, buf
    return R.sgd_momentum_update(p, g, buf, lr, momentum, dampening, nesterov, wd, first, xp, work, axpy=axpy)


def adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work=None):
    """The Adam / AdamW (/ AMSGrad) step of one array in one kernel (``p`` and the
    moments in place)."""
    arrays = (p, g, m, v) if vmax is None else (p, g, m, v, vmax)
    if _floats(*arrays) and all(is_writeable(a) for a in arrays if a is not g):
        body = ["T gg = g;"]
        if R.is_on(wd):
            body.append("p = p * decay;" if decoupled else "gg = g + wd * p;")
        body += ["m = m * b1 + omb1 * gg;", "v = v * b2 + omb2 * (gg * gg);"]
        if vmax is None:
            body.append("p = p - step * (m / (sqrt(v) / bc2 + eps));")
            outs = "T p, T m, T v"
        else:  # the maximum of numpy/cupy: NaN if either is NaN
            body += ["T top = (v > vmax || v != v) ? v : vmax;", "if (vmax == vmax) vmax = top;",
                     "p = p - step * (m / (sqrt(vmax) / bc2 + eps));"]
            outs = "T p, T m, T v, T vmax"
        k = _elementwise("adam", "T g, T b1, T omb1, T b2, T omb2, T step, T bc2, T eps, T wd, T decay", outs,
                         "\n".join(body))
        scalars = (b1, 1.0 - b1, b2, 1.0 - b2, lr / (1.0 - b1**t), R.hyper_sqrt(1.0 - b2**t, xp), eps, wd,
                   1.0 - lr * wd)
        if vmax is None:
            _launch(k, p, g, *scalars, p, m, v)
        else:
            _launch(k, p, g, *scalars, p, m, v, vmax)
        return p, m, v, vmax
    return R.adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp)


def rmsprop_update(p, g, v, gbar, buf, lr, alpha, eps, momentum, wd, xp, work=None):
    """The RMSprop step of one array (centred, with momentum, or neither) in one kernel."""
    arrays = tuple(a for a in (p, g, v, gbar, buf) if a is not None)
    if _floats(*arrays) and all(is_writeable(a) for a in arrays if a is not g):
        body = ["T gg = g;"]
        if R.is_on(wd):
            body.append("gg = g + wd * p;")
        body.append("v = v * alpha + oma * (gg * gg);")
        outs = ["T p", "T v"]
        if gbar is not None:
            body += ["gbar = gbar * alpha + oma * gg;", "T avg = sqrt(v - gbar * gbar) + eps;"]
            outs.append("T gbar")
        else:
            body.append("T avg = sqrt(v) + eps;")
        if buf is not None:
            body += ["buf = buf * mom + gg / avg;", "p = p - lr * buf;"]
            outs.append("T buf")
        else:
            body.append("p = p - lr * (gg / avg);")
        k = _elementwise("rmsprop", "T g, T lr, T alpha, T oma, T eps, T mom, T wd", ", ".join(outs),
                         "\n".join(body))
        _launch(k, p, g, lr, alpha, 1.0 - alpha, eps, momentum, wd, *(a for a in (p, v, gbar, buf) if a is not None))
        return p, v, gbar, buf
    return R.rmsprop_update(p, g, v, gbar, buf, lr, alpha, eps, momentum, wd, xp)


OVERRIDES = {
    **C.UFUNC_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    # cupyx.scipy.sparse inputs of the first layer (untested without a CUDA device); the
    # set's own dense_relu_forward and dense_sgd_update below take that path themselves
    **C.SPARSE_OVERRIDES,
    "adam_update": adam_update,
    "cross_entropy_labels_mean": cross_entropy_labels_mean,
    "dense_relu_forward": dense_relu_forward,
    "dense_sgd_update": dense_sgd_update,
    "pick_labels": C.pick_labels,
    "relu_backward_inplace": relu_backward_inplace,
    "rmsprop_update": rmsprop_update,
    "sgd_momentum_update": sgd_momentum_update,
    "sigmoid_backward_inplace": sigmoid_backward_inplace,
    "subtract_onehot": C.subtract_onehot,
    "tanh_backward_inplace": tanh_backward_inplace,
}
