# Design
# ------
# fastbp's thread driver, the ONE place an OpenMP parallel region is opened (and so the only home of the
# forked-child rule).  Kernels hand parallel_blocks a `noexcept nogil` block function and a context pointer;
# the range [0, n) is cut into blocks whose boundaries depend only on n and the block size, never on the thread
# count, so a reduction that writes one partial per block and adds the partials in block order (reduce_blocks_d)
# gives the same bits whatever the number of threads.  Elementwise kernels (no reduction) size their blocks with
# even_block: one block per thread, but never smaller than the work that pays for a fork/join.
#
# * Thread count: FASTBP_NUM_THREADS (parsed and validated by fastbp._blas.env_num_threads: a bad value fails
#   the import), else OpenMP's default; 1 in a build without OpenMP and in a forked child (GNU OpenMP cannot start
#   a team there: it hangs).
# * Called from inside a parallel region (a kernel run by another kernel's block), parallel_blocks runs its blocks
#   serially in block order on the calling thread.
# * The C of the OpenBLAS threads callback (the "callback" threading mode of fastbp._blas) is in _threads.h.
from cython.parallel cimport prange
from libc.stdint cimport intptr_t
import os as _os

cdef extern from "_threads.h" nogil:
    int fb_omp_ok
    int FASTBP_OPENMP
    int fb_omp_max_threads() noexcept
    int fb_in_parallel() noexcept
    int fb_thread_num() noexcept
    void *fb_blas_threads_address() noexcept

cdef int _nthreads = 1


cdef int num_threads() noexcept nogil:
    """fastbp's thread count (1 without OpenMP or in a forked child)."""
    return _nthreads if fb_omp_ok and FASTBP_OPENMP else 1


cdef bint threads_usable() noexcept nogil:
    """False in a build without OpenMP and in a forked child: no parallel region may be opened."""
    return fb_omp_ok and FASTBP_OPENMP


cdef void parallel_blocks(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx) noexcept nogil:
    """fn(ctx, lo, hi, j) for the blocks j of [0, n), over fastbp's threads (see parallel_blocks_nt)."""
    parallel_blocks_nt(n, block, fn, ctx, num_threads())


cdef void parallel_blocks_nt(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads) noexcept nogil:
    """Cut [0, n) into ceil(n / block) blocks [j*block, min(n, (j+1)*block)) and call fn(ctx, lo, hi, j) once per
    block, on a team of at most `nthreads` threads (static schedule: with as many blocks as threads, block j runs
    on thread j); serially, in block order, for one block, one thread, a forked child or inside a parallel region."""
    cdef Py_ssize_t nb, j, lo, hi
    if n <= 0:
        return
    if block < 1:
        block = 1
    nb = (n - 1) // block + 1
    if nthreads > nb:
        nthreads = <int>nb
    if nthreads <= 1 or not fb_omp_ok or not FASTBP_OPENMP or fb_in_parallel():
        for j in range(nb):
            lo = j * block
            hi = n if n - lo <= block else lo + block
            fn(ctx, lo, hi, j)
        return
    for j in prange(nb, nogil=True, schedule="static", num_threads=nthreads):
        lo = j * block
        hi = n if n - lo <= block else lo + block
        fn(ctx, lo, hi, j)


cdef Py_ssize_t even_block(Py_ssize_t n, Py_ssize_t min_block) noexcept nogil:
    """Block size for elementwise work: ceil(n / num_threads()), at least min_block (and at least 1)."""
    cdef Py_ssize_t nt = num_threads()
    cdef Py_ssize_t b = (n + nt - 1) // nt if n > 0 else 1
    if b < min_block:
        b = min_block
    return b if b > 0 else 1


cdef void reduce_blocks_d(const double *partials, Py_ssize_t nblocks, Py_ssize_t width,
                          double *out) noexcept nogil:
    """out[i] = sum over j = 0..nblocks-1, in that order, of partials[j*width + i]."""
    cdef Py_ssize_t i, j
    cdef const double *row
    for i in range(width):
        out[i] = 0.0
    for j in range(nblocks):
        row = partials + j * width
        for i in range(width):
            out[i] += row[i]


# ---------------------------------------------------------------------------------------------------------------
# Python level: state, fork hook, introspection
# ---------------------------------------------------------------------------------------------------------------
def _env_num_threads():
    """FASTBP_NUM_THREADS as an int, None when unset (fastbp._blas parses it, and refuses a bad value with a
    ValueError naming the variable and the accepted range, at import)."""
    from fastbp import _blas
    return _blas.env_num_threads()


def _set_num_threads(int n):
    """Set fastbp's thread count for the elementwise kernels and every parallel_blocks call."""
    global _nthreads
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _nthreads = n


def _get_num_threads():
    """fastbp's thread count (1 without OpenMP or in a forked child)."""
    return num_threads()


def _after_fork_in_child():
    """Called in a forked child (os.register_at_fork): no OpenMP parallel region from now on."""
    global fb_omp_ok
    fb_omp_ok = 0


def _blas_threads_callback():
    """Address of the OpenBLAS threads callback that runs BLAS jobs on fastbp's OpenMP team (0 without OpenMP)."""
    return <intptr_t>fb_blas_threads_address() if FASTBP_OPENMP else 0


def build_info():
    """Compile-time facts: OpenMP use, OpenMP's thread count (1 in a forked child), fastbp's thread count."""
    return {"openmp": bool(FASTBP_OPENMP), "openmp_max_threads": fb_omp_max_threads(),
            "num_threads": num_threads(), "forked_child": not fb_omp_ok}


cdef void _record_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef long long *owner = <long long*>ctx
    cdef Py_ssize_t i
    for i in range(lo, hi):
        owner[i] += j + 1


def _block_owners(Py_ssize_t n, Py_ssize_t block, int nthreads=0):
    """For tests: a list o with o[i] = the block that covered element i (each element must be covered once)."""
    import array
    owners = array.array("q", [0]) * n if n > 0 else array.array("q")
    cdef long long[::1] o = owners
    cdef void *p = &o[0] if n > 0 else NULL
    with nogil:
        if nthreads > 0:
            parallel_blocks_nt(n, block, _record_block, p, nthreads)
        else:
            parallel_blocks(n, block, _record_block, p)
    return [v - 1 for v in owners]


cdef void _record_thread(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    (<long long*>ctx)[j] = fb_thread_num()


def _block_threads(Py_ssize_t nblocks):
    """For tests: the OpenMP thread that ran each of nblocks one-element blocks of parallel_blocks."""
    import array
    got = array.array("q", [-1]) * nblocks if nblocks > 0 else array.array("q")
    cdef long long[::1] o = got
    cdef void *p = &o[0] if nblocks > 0 else NULL
    with nogil:
        parallel_blocks(nblocks, 1, _record_thread, p)
    return list(got)


def _reduce_blocks(partials, Py_ssize_t nblocks, Py_ssize_t width):
    """For tests: reduce_blocks_d on a flat sequence of nblocks * width doubles."""
    import array
    src = array.array("d", partials)
    if len(src) != nblocks * width:
        raise ValueError(f"expected {nblocks * width} partials, got {len(src)}")
    out = array.array("d", [0.0]) * width
    cdef double[::1] s = src
    cdef double[::1] d = out
    if width > 0:
        reduce_blocks_d(&s[0] if len(src) else NULL, nblocks, width, &d[0])
    return list(out)


if FASTBP_OPENMP:
    _nthreads = _env_num_threads() or fb_omp_max_threads()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)
