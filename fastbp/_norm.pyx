# Design
# ------
# Kernels of book 1's BatchNormalization and Dropout layers (chapter 6) on C-contiguous float32/float64 buffers.
#
# * Batch normalization works on x flattened to (N, D) like the book: per-feature statistics over the N rows.
#   Each kernel walks the rows in order with the D features innermost (vectorised), accumulating the per-feature
#   sums in double, so float32 data is reduced in double and every sum has one fixed order (row 0, 1, ...):
#   results never depend on how the features are cut into blocks.  Training forward is three passes (mean,
#   centred variance, normalise); backward is two (sum dout and dout * xn, then dx) with the book's gradient
#   written in closed form: dx = gamma / std * (dout - mean(dout) - xn * mean(dout * xn)).
# * Dropout draws its mask from NumPy's own bit generator (the one behind np.random.rand) with the generator's
#   next_double, one number per element in C order -- exactly the numbers `np.random.rand(*x.shape)` would return
#   -- so `np.random.seed(s)` gives the book's mask; mask = u > ratio and out = x * mask in the same pass.  The
#   caller holds the generator's lock.
from libc.math cimport sqrt
from libc.stdint cimport uint8_t
from cpython.pycapsule cimport PyCapsule_GetPointer
from numpy.random cimport bitgen_t
cimport numpy as cnp
from fastbp._validate cimport ftype as _ftype, same_type as _same, shape_of as _s
import numpy as np

cnp.import_array()

from fastbp._typedefs cimport floating


cdef cnp.ndarray _arr(object a, tuple shape, str name, bint out):
    """`a` checked to be C-contiguous of `shape` (and writeable for outputs)."""
    cdef cnp.ndarray A = <cnp.ndarray>a
    if _s(A) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_s(A)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(A):
        raise ValueError(f"{name} must be C-contiguous")
    if out and not cnp.PyArray_ISWRITEABLE(A):
        raise ValueError(f"{name} is read-only")
    return A


cdef _no_overlap(cnp.ndarray out, cnp.ndarray a, str oname, str aname):
    cdef char *o0 = <char*>cnp.PyArray_DATA(out)
    cdef char *a0 = <char*>cnp.PyArray_DATA(a)
    if o0 < a0 + cnp.PyArray_NBYTES(a) and a0 < o0 + cnp.PyArray_NBYTES(out):
        raise ValueError(f"{oname} overlaps {aname} in memory: outputs must not share memory with inputs")


cdef cnp.ndarray _f64(object a, Py_ssize_t d, str name):
    if not cnp.PyArray_Check(a) or cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT64 \
            or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        raise TypeError(f"{name} must be a native float64 array")
    return _arr(a, (d,), name, True)


# ---------------------------------------------------------------------------------------------------------------
# Batch normalization
# ---------------------------------------------------------------------------------------------------------------
cdef void _bn_train(Py_ssize_t n, Py_ssize_t d, double eps,
                    const floating *x,      # IN  (n, d)
                    const floating *gamma,  # IN  (d,)
                    const floating *beta,   # IN  (d,)
                    floating *out,          # OUT (n, d) gamma * xn + beta
                    floating *xn,           # OUT (n, d) (x - mean) / std
                    floating *std,          # OUT (d,)  sqrt(var + eps)
                    double *mean,           # OUT (d,)  batch mean
                    double *var             # OUT (d,)  batch variance (biased, as the book's np.mean)
                    ) noexcept nogil:
    """Batch statistics in double in row order, then xn and out."""
    cdef Py_ssize_t i, j
    cdef double inv_n = 1.0 / n, t
    cdef const floating *r
    for j in range(d):
        mean[j] = 0
        var[j] = 0
    for i in range(n):
        r = x + i * d
        for j in range(d):
            mean[j] += r[j]
    for j in range(d):
        mean[j] *= inv_n
    for i in range(n):
        r = x + i * d
        for j in range(d):
            t = r[j] - mean[j]
            var[j] += t * t
    for j in range(d):
        var[j] *= inv_n
        std[j] = <floating>sqrt(var[j] + eps)
    for i in range(n):
        r = x + i * d
        for j in range(d):
            t = (r[j] - mean[j]) / std[j]
            xn[i * d + j] = <floating>t
            out[i * d + j] = gamma[j] * <floating>t + beta[j]


cdef void _bn_test(Py_ssize_t n, Py_ssize_t d, double eps,
                   const floating *x,       # IN  (n, d)
                   const floating *gamma,   # IN  (d,)
                   const floating *beta,    # IN  (d,)
                   const double *rmean,     # IN  (d,)
                   const double *rvar,      # IN  (d,)
                   floating *out            # OUT (n, d) gamma * (x - rmean) / sqrt(rvar + eps) + beta
                   ) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(d):
            out[i * d + j] = gamma[j] * <floating>((x[i * d + j] - rmean[j]) / sqrt(rvar[j] + eps)) + beta[j]


cdef void _bn_backward(Py_ssize_t n, Py_ssize_t d,
                       const floating *dout,    # IN  (n, d)
                       const floating *xn,      # IN  (n, d)
                       const floating *gamma,   # IN  (d,)
                       const floating *std,     # IN  (d,)
                       floating *dx,            # OUT (n, d) or NULL
                       floating *dgamma,        # OUT (d,) sum(dout * xn)
                       floating *dbeta,         # OUT (d,) sum(dout)
                       double *acc              # scratch (2d,)
                       ) noexcept nogil:
    """dgamma, dbeta in double in row order; dx = gamma / std * (dout - dbeta / n - xn * dgamma / n)."""
    cdef Py_ssize_t i, j
    cdef double *sg = acc
    cdef double *sb = acc + d
    cdef double inv_n = 1.0 / n
    for j in range(d):
        sg[j] = 0
        sb[j] = 0
    for i in range(n):
        for j in range(d):
            sb[j] += dout[i * d + j]
            sg[j] += <double>dout[i * d + j] * xn[i * d + j]
    for j in range(d):
        dgamma[j] = <floating>sg[j]
        dbeta[j] = <floating>sb[j]
        sg[j] *= inv_n
        sb[j] *= inv_n
    if dx == NULL:
        return
    for i in range(n):
        for j in range(d):
            dx[i * d + j] = <floating>(gamma[j] / <double>std[j] * (dout[i * d + j] - sb[j] - xn[i * d + j] * sg[j]))


def bn_forward_train(x, gamma, beta, out, xn, std, mean, var, double eps=1e-6):
    """Training forward on x (N, D): mean/var (float64, batch statistics), std = sqrt(var + eps),
    xn = (x - mean) / std, out = gamma * xn + beta.  Returns out."""
    cdef int t = _ftype(x, "x")
    _same(t, gamma, "gamma"); _same(t, beta, "beta"); _same(t, out, "out"); _same(t, xn, "xn"); _same(t, std, "std")
    cdef cnp.ndarray X = <cnp.ndarray>x
    if cnp.PyArray_NDIM(X) != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {_s(X)}")
    cdef Py_ssize_t n = _s(X)[0], d = _s(X)[1]
    if n < 1:
        raise ValueError("batch normalization in training needs at least one sample, got N = 0")
    _arr(X, (n, d), "x", False)
    cdef cnp.ndarray G = _arr(gamma, (d,), "gamma", False), B = _arr(beta, (d,), "beta", False)
    cdef cnp.ndarray Out = _arr(out, (n, d), "out", True), XN = _arr(xn, (n, d), "xn", True)
    cdef cnp.ndarray S = _arr(std, (d,), "std", True)
    cdef cnp.ndarray M = _f64(mean, d, "mean"), V = _f64(var, d, "var")
    cdef list outs = [Out, XN, S, M, V]
    cdef list ins = [X, G, B]
    cdef int i, k
    for i in range(5):
        for k in range(3):
            _no_overlap(outs[i], ins[k], ("out", "xn", "std", "mean", "var")[i], ("x", "gamma", "beta")[k])
        for k in range(i):
            _no_overlap(outs[i], outs[k], ("out", "xn", "std", "mean", "var")[i], ("out", "xn", "std", "mean")[k])
    cdef void *px = cnp.PyArray_DATA(X)
    cdef void *pg = cnp.PyArray_DATA(G)
    cdef void *pb = cnp.PyArray_DATA(B)
    cdef void *po = cnp.PyArray_DATA(Out)
    cdef void *pn = cnp.PyArray_DATA(XN)
    cdef void *ps = cnp.PyArray_DATA(S)
    cdef double *pm = <double*>cnp.PyArray_DATA(M)
    cdef double *pv = <double*>cnp.PyArray_DATA(V)
    with nogil:
        if t == 0:
            _bn_train[float](n, d, eps, <float*>px, <float*>pg, <float*>pb, <float*>po, <float*>pn, <float*>ps, pm, pv)
        else:
            _bn_train[double](n, d, eps, <double*>px, <double*>pg, <double*>pb, <double*>po, <double*>pn,
                              <double*>ps, pm, pv)
    return out


def bn_forward_test(x, gamma, beta, running_mean, running_var, out, double eps=1e-6):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta on x (N, D); running stats float64."""
    cdef int t = _ftype(x, "x")
    _same(t, gamma, "gamma"); _same(t, beta, "beta"); _same(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x
    if cnp.PyArray_NDIM(X) != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {_s(X)}")
    cdef Py_ssize_t n = _s(X)[0], d = _s(X)[1]
    _arr(X, (n, d), "x", False)
    cdef cnp.ndarray G = _arr(gamma, (d,), "gamma", False), B = _arr(beta, (d,), "beta", False)
    cdef cnp.ndarray Out = _arr(out, (n, d), "out", True)
    if not cnp.PyArray_Check(running_mean) or not cnp.PyArray_Check(running_var) \
            or running_mean.dtype != np.float64 or running_var.dtype != np.float64:
        raise TypeError("running_mean and running_var must be native float64 arrays")
    cdef cnp.ndarray M = _arr(running_mean, (d,), "running_mean", False)
    cdef cnp.ndarray V = _arr(running_var, (d,), "running_var", False)
    for a, nm in ((X, "x"), (G, "gamma"), (B, "beta"), (M, "running_mean"), (V, "running_var")):
        _no_overlap(Out, a, "out", nm)
    cdef void *px = cnp.PyArray_DATA(X)
    cdef void *pg = cnp.PyArray_DATA(G)
    cdef void *pb = cnp.PyArray_DATA(B)
    cdef void *po = cnp.PyArray_DATA(Out)
    cdef double *pm = <double*>cnp.PyArray_DATA(M)
    cdef double *pv = <double*>cnp.PyArray_DATA(V)
    with nogil:
        if t == 0:
            _bn_test[float](n, d, eps, <float*>px, <float*>pg, <float*>pb, pm, pv, <float*>po)
        else:
            _bn_test[double](n, d, eps, <double*>px, <double*>pg, <double*>pb, pm, pv, <double*>po)
    return out


def bn_backward(dout, xn, gamma, std, dx, dgamma, dbeta):
    """dbeta = sum(dout, 0), dgamma = sum(dout * xn, 0) (double accumulation),
    dx = gamma / std * (dout - dbeta / N - xn * dgamma / N) (dx may be None).  Returns dx."""
    cdef int t = _ftype(dout, "dout")
    _same(t, xn, "xn"); _same(t, gamma, "gamma"); _same(t, std, "std")
    _same(t, dgamma, "dgamma"); _same(t, dbeta, "dbeta")
    cdef cnp.ndarray D = <cnp.ndarray>dout
    if cnp.PyArray_NDIM(D) != 2:
        raise ValueError(f"dout must be 2-D (N, D), got shape {_s(D)}")
    cdef Py_ssize_t n = _s(D)[0], d = _s(D)[1]
    if n < 1:
        raise ValueError("batch normalization backward needs at least one sample, got N = 0")
    _arr(D, (n, d), "dout", False)
    cdef cnp.ndarray XN = _arr(xn, (n, d), "xn", False), G = _arr(gamma, (d,), "gamma", False)
    cdef cnp.ndarray S = _arr(std, (d,), "std", False)
    cdef cnp.ndarray DG = _arr(dgamma, (d,), "dgamma", True), DB = _arr(dbeta, (d,), "dbeta", True)
    cdef cnp.ndarray DX = None
    cdef list outs = [DG, DB]
    if dx is not None:
        _same(t, dx, "dx")
        DX = _arr(dx, (n, d), "dx", True)
        outs.append(DX)
    cdef str on
    for Out, on in zip(outs, ("dgamma", "dbeta", "dx")):
        for a, nm in ((D, "dout"), (XN, "xn"), (G, "gamma"), (S, "std")):
            _no_overlap(Out, a, on, nm)
    _no_overlap(DG, DB, "dgamma", "dbeta")
    if DX is not None:
        _no_overlap(DX, DG, "dx", "dgamma")
        _no_overlap(DX, DB, "dx", "dbeta")
    cdef double[::1] acc = np.empty(2 * d if d else 1, np.float64)
    cdef void *pd = cnp.PyArray_DATA(D)
    cdef void *pn = cnp.PyArray_DATA(XN)
    cdef void *pg = cnp.PyArray_DATA(G)
    cdef void *ps = cnp.PyArray_DATA(S)
    cdef void *px = cnp.PyArray_DATA(DX) if DX is not None else NULL
    cdef void *pdg = cnp.PyArray_DATA(DG)
    cdef void *pdb = cnp.PyArray_DATA(DB)
    with nogil:
        if t == 0:
            _bn_backward[float](n, d, <float*>pd, <float*>pn, <float*>pg, <float*>ps, <float*>px, <float*>pdg,
                                <float*>pdb, &acc[0])
        else:
            _bn_backward[double](n, d, <double*>pd, <double*>pn, <double*>pg, <double*>ps, <double*>px,
                                 <double*>pdg, <double*>pdb, &acc[0])
    return dx


def running_update(running, batch, double momentum):
    """running = momentum * running + (1 - momentum) * batch, in place (float64 arrays of one shape)."""
    cdef Py_ssize_t d = batch.shape[0], j
    cdef cnp.ndarray R = _f64(running, d, "running")
    cdef cnp.ndarray B = _f64(batch, d, "batch")
    cdef double *r = <double*>cnp.PyArray_DATA(R)
    cdef double *b = <double*>cnp.PyArray_DATA(B)
    for j in range(d):
        r[j] = momentum * r[j] + (1 - momentum) * b[j]
    return running


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------
cdef void _dropout_fwd(Py_ssize_t n, double ratio, bitgen_t *rng,
                       const floating *x,       # IN  (n,)
                       floating *out,           # OUT (n,) x * mask
                       uint8_t *mask            # OUT (n,) rng's next double > ratio
                       ) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint8_t m
    for i in range(n):
        m = rng.next_double(rng.state) > ratio
        mask[i] = m
        out[i] = x[i] * <floating>m


cdef void _dropout_bwd(Py_ssize_t n, const floating *dout, const uint8_t *mask, floating *dx) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = dout[i] * <floating>mask[i]


cdef cnp.ndarray _mask(object mask, cnp.ndarray ref):
    if not cnp.PyArray_Check(mask) or cnp.PyArray_TYPE(<cnp.ndarray>mask) != cnp.NPY_BOOL:
        raise TypeError(f"mask must be a bool array, got {getattr(mask, 'dtype', type(mask).__name__)}")
    cdef cnp.ndarray M = <cnp.ndarray>mask
    if _s(M) != _s(ref):
        raise ValueError(f"mask must have shape {_s(ref)}, got {_s(M)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(M):
        raise ValueError("mask must be C-contiguous")
    return M


def dropout_forward(x, out, mask, double ratio, bit_generator):
    """mask = (u > ratio) for u the next x.size doubles of `bit_generator` (np.random.rand's numbers, C order),
    out = x * mask.  The caller holds bit_generator.lock.  Returns out."""
    cdef int t = _ftype(x, "x")
    _same(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x
    _arr(X, _s(X), "x", False)
    cdef cnp.ndarray Out = _arr(out, _s(X), "out", True)
    cdef cnp.ndarray M = _mask(mask, X)
    if not cnp.PyArray_ISWRITEABLE(M):
        raise ValueError("mask is read-only")
    _no_overlap(Out, X, "out", "x")
    _no_overlap(M, X, "mask", "x")
    _no_overlap(M, Out, "mask", "out")
    cdef bitgen_t *rng = <bitgen_t*>PyCapsule_GetPointer(bit_generator.capsule, "BitGenerator")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    cdef void *px = cnp.PyArray_DATA(X)
    cdef void *po = cnp.PyArray_DATA(Out)
    cdef uint8_t *pm = <uint8_t*>cnp.PyArray_DATA(M)
    with nogil:
        if t == 0:
            _dropout_fwd[float](n, ratio, rng, <float*>px, <float*>po, pm)
        else:
            _dropout_fwd[double](n, ratio, rng, <double*>px, <double*>po, pm)
    return out


def dropout_backward(dout, mask, dx):
    """dx = dout * mask.  Returns dx."""
    cdef int t = _ftype(dout, "dout")
    _same(t, dx, "dx")
    cdef cnp.ndarray D = <cnp.ndarray>dout
    _arr(D, _s(D), "dout", False)
    cdef cnp.ndarray X = _arr(dx, _s(D), "dx", True)
    cdef cnp.ndarray M = _mask(mask, D)
    _no_overlap(X, D, "dx", "dout")
    _no_overlap(X, M, "dx", "mask")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    cdef void *pd = cnp.PyArray_DATA(D)
    cdef void *px = cnp.PyArray_DATA(X)
    cdef uint8_t *pm = <uint8_t*>cnp.PyArray_DATA(M)
    with nogil:
        if t == 0:
            _dropout_bwd[float](n, <float*>pd, pm, <float*>px)
        else:
            _dropout_bwd[double](n, <double*>pd, pm, <double*>px)
    return dx
