# fastbp's thread driver: the ONE place an OpenMP parallel region is opened (see _threads.pyx).
ctypedef void (*block_fn)(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t block) noexcept nogil

cdef int num_threads() noexcept nogil
cdef bint threads_usable() noexcept nogil
cdef bint in_region() noexcept nogil
cdef void parallel_blocks(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx) noexcept nogil
cdef void parallel_blocks_nt(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads) noexcept nogil
cdef void parallel_blocks_macs(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads,
                               double macs) noexcept nogil
cdef Py_ssize_t even_block(Py_ssize_t n, Py_ssize_t min_block) noexcept nogil
cdef void reduce_blocks_d(const double *partials, Py_ssize_t nblocks, Py_ssize_t width, double *out) noexcept nogil
