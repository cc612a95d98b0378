# Validation helpers shared by fastbp's def wrappers (cdef inline: no state; the importing module calls
# cnp.import_array()).  Each raises a ValueError/TypeError naming what was expected and what came in.
cimport numpy as cnp


cdef inline object shape_of(object a):
    return (<object>a).shape


cdef inline object dtype_of(object a):
    return (<object>a).dtype


cdef inline int ftype(object a, str name) except -1:
    """0 for native float32, 1 for native float64 arrays; TypeError otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT32 and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        return 0
    if t == cnp.NPY_FLOAT64 and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        return 1
    raise TypeError(f"{name} must be native float32 or float64, got {dtype_of(a)}")


cdef inline same_type(int expected, object a, str name):
    cdef int t = ftype(a, name)
    if t != expected:
        raise TypeError(f"{name} must have dtype {'float64' if expected else 'float32'} like the other "
                        f"operands, got {dtype_of(a)}")


cdef inline check_ndim(cnp.ndarray a, int nd, str name):
    if cnp.PyArray_NDIM(a) != nd:
        raise ValueError(f"{name} must be {nd}-D, got {cnp.PyArray_NDIM(a)}-D array of shape {shape_of(a)}")


cdef inline check_out(cnp.ndarray a, str name):
    """Outputs must be writeable and C-contiguous (fastbp allocates them so)."""
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} is read-only")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous")


cdef inline check_contig(cnp.ndarray a, str name):
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")


cdef inline check_shape2(cnp.ndarray a, Py_ssize_t r, Py_ssize_t c, str name):
    if cnp.PyArray_DIM(a, 0) != r or cnp.PyArray_DIM(a, 1) != c:
        raise ValueError(f"{name} must have shape ({r}, {c}), got {shape_of(a)}")


cdef inline check_same_shape(cnp.ndarray a, cnp.ndarray ref, str name, str refname):
    cdef int nd = cnp.PyArray_NDIM(ref)
    cdef int i
    if cnp.PyArray_NDIM(a) != nd:
        raise ValueError(f"{name} must have the shape of {refname} {shape_of(ref)}, got {shape_of(a)}")
    for i in range(nd):
        if cnp.PyArray_DIM(a, i) != cnp.PyArray_DIM(ref, i):
            raise ValueError(f"{name} must have the shape of {refname} {shape_of(ref)}, got {shape_of(a)}")


cdef inline void extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """Byte range [lo, hi) spanned by `a` (lo == hi when it is empty)."""
    cdef int i, nd = cnp.PyArray_NDIM(a)
    cdef Py_ssize_t d, s
    cdef char *low = <char*>cnp.PyArray_DATA(a)
    cdef char *high = low
    for i in range(nd):
        d = cnp.PyArray_DIM(a, i)
        if d == 0:
            lo[0] = low
            hi[0] = low
            return
        s = cnp.PyArray_STRIDE(a, i) * (d - 1)
        if s > 0:
            high += s
        else:
            low += s
    lo[0] = low
    hi[0] = high + cnp.PyArray_ITEMSIZE(a)


cdef inline check_no_overlap(object out, object inp, str outname, str inname, bint allow_same=False):
    """ValueError when the output's memory range meets an input's (identical arrays allowed for pointwise kernels)."""
    if out is None or inp is None:
        return
    cdef cnp.ndarray o = <cnp.ndarray>out, a = <cnp.ndarray>inp
    cdef char *olo
    cdef char *ohi
    cdef char *alo
    cdef char *ahi
    extent(o, &olo, &ohi)
    extent(a, &alo, &ahi)
    if olo < ahi and alo < ohi:
        if allow_same and cnp.PyArray_DATA(o) == cnp.PyArray_DATA(a) and cnp.PyArray_SIZE(o) == cnp.PyArray_SIZE(a) \
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_IS_C_CONTIGUOUS(o):
            return
        raise ValueError(f"{outname} overlaps {inname} in memory: outputs must not share memory with inputs")


cdef inline window_geometry(str kind, Py_ssize_t H, Py_ssize_t W, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride,
                            Py_ssize_t pad, Py_ssize_t *oh, Py_ssize_t *ow):
    """(OH, OW) = ((H + 2 pad - fh) // stride + 1, (W + 2 pad - fw) // stride + 1) of a sliding window (`kind`:
    "filter" for convolution, "pool window" for pooling), floored as the book's `//`; ValueError for a window
    smaller than 1 or larger than the padded input, stride < 1 or pad < 0."""
    if fh < 1 or fw < 1:
        raise ValueError(f"{kind} size must be >= 1, got ({fh}, {fw})")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if fh > H + 2 * pad or fw > W + 2 * pad:
        raise ValueError(f"{kind} ({fh}, {fw}) is larger than the padded input ({H + 2 * pad}, {W + 2 * pad})")
    oh[0] = (H + 2 * pad - fh) // stride + 1
    ow[0] = (W + 2 * pad - fw) // stride + 1
