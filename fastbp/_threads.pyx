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
# * Who runs the blocks (issue 11 item 1): by default fastbp's own worker pool (_threads.h): the caller and up to
#   nthreads - 1 workers CLAIM blocks, so the caller never waits for a worker that is asleep or descheduled;
#   workers spin FASTBP_SPIN_US (default _runtime.SPIN_US) after a region, then sleep; parallel_blocks_macs (the
#   GEMM split) wakes a sleeping worker only for products of at least FASTBP_WAKE_MIN_MACS multiply-adds.
#   FASTBP_THREAD_POOL=openmp opens an OpenMP region instead (libgomp's team and its spin setting, _runtime.py).
#   region_counts() counts the regions opened (a training step's trace), pool_info() what the pool did.
# * The C of the OpenBLAS threads callback (the "callback" threading mode of fastbp._blas) is in _threads.h.
from cython.parallel cimport prange
from libc.stdint cimport intptr_t
import operator as _operator
import os as _os

cdef extern from "_threads.h" nogil:
    int fb_omp_ok
    int FASTBP_OPENMP
    int fb_omp_max_threads() noexcept
    int fb_in_parallel() noexcept
    int fb_thread_num() noexcept
    void *fb_blas_threads_address() noexcept
    ctypedef void (*fb_dojob_t)(int thread_num, void *jobdata, int dojob_data) noexcept nogil
    ctypedef struct fb_test_gang_t:
        int *started
        int numjobs
        int *ok
        int index
    void fb_test_gang_job(int thread_num, void *jobdata, int data) noexcept
    int fb_run_jobs_on_pthreads(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) noexcept
    long long fb_create_retry_us
    int fb_test_create_failures
    ctypedef void (*fb_block_fn)(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t block) noexcept nogil
    int FB_POOL
    long long fb_spin_ns
    int fb_spin_yield
    int fb_pool_for_blas
    long long fb_pool_regions
    long long fb_pool_helped
    long long fb_pool_wakes
    long long fb_pool_wake_ns
    void fb_set_pool_stats(int on) noexcept
    int fb_get_pool_stats() noexcept
    long long fb_pool_own_ns
    long long fb_pool_wait_ns
    long long fb_pool_wblock_ns
    long long fb_pool_wstart_ns
    long long fb_pool_wblocks
    long long fb_pool_wstarts
    long long fb_now_ns() noexcept
    void fb_cpu_relax() noexcept
    void fb_team_mark(int *seen, int t, int *distinct) noexcept
    int fb_load_int(int *p) noexcept
    void fb_yield() noexcept
    int fb_pool_in_region() noexcept
    int fb_pool_thread_num() noexcept
    int fb_pool_workers() noexcept
    int fb_pool_run(Py_ssize_t n, Py_ssize_t block, Py_ssize_t nb, fb_block_fn fn, void *ctx,
                    int nthreads, int wake) noexcept

cdef int _nthreads = 1
cdef bint _use_pool = True             # FASTBP_THREAD_POOL: fastbp's own pool (True) or OpenMP regions
cdef double _wake_min_macs = 0         # FASTBP_WAKE_MIN_MACS: smaller products never wake a sleeping worker

# Region trace (issue 11: count the parallel regions a training step opens).  Updated by the calling thread only,
# outside any region (a call made inside a region is not counted), so plain integers suffice.
cdef long long _regions_opened = 0     # OpenMP parallel regions opened by parallel_blocks_nt
cdef long long _regions_serial = 0     # calls with more than one block run on the calling thread instead


cdef int num_threads() noexcept nogil:
    """fastbp's thread count (1 without OpenMP or in a forked child)."""
    return _nthreads if fb_omp_ok and FASTBP_OPENMP else 1


cdef bint in_region() noexcept nogil:
    """True inside a parallel region (an OpenMP region or a block of fastbp's worker pool): a kernel called
    there must not open a team of its own (parallel_blocks then runs serially)."""
    return fb_in_parallel()


cdef bint threads_usable() noexcept nogil:
    """False in a build without OpenMP and in a forked child: no parallel region may be opened."""
    return fb_omp_ok and FASTBP_OPENMP


cdef void parallel_blocks(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx) noexcept nogil:
    """fn(ctx, lo, hi, j) for the blocks j of [0, n), over fastbp's threads (see parallel_blocks_nt)."""
    parallel_blocks_nt(n, block, fn, ctx, num_threads())


cdef void parallel_blocks_nt(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads) noexcept nogil:
    """Cut [0, n) into ceil(n / block) blocks [j*block, min(n, (j+1)*block)) and call fn(ctx, lo, hi, j) once per
    block, on a team of at most `nthreads` threads (the caller and fastbp's pool workers claim blocks; any thread
    may run any block); serially, in block order, for one block, one thread, a forked child or inside a region."""
    _parallel_blocks(n, block, fn, ctx, nthreads, True)


cdef void parallel_blocks_macs(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads,
                               double macs) noexcept nogil:
    """parallel_blocks_nt for a matrix product of `macs` multiply-adds: below _wake_min_macs (FASTBP_WAKE_MIN_MACS)
    no sleeping pool worker is woken (the blocks run on the caller and on workers still spinning)."""
    _parallel_blocks(n, block, fn, ctx, nthreads, macs >= _wake_min_macs)


cdef void _parallel_blocks(Py_ssize_t n, Py_ssize_t block, block_fn fn, void *ctx, int nthreads,
                           bint wake) noexcept nogil:
    global _regions_opened, _regions_serial
    cdef Py_ssize_t nb, j, lo, hi
    if n <= 0:
        return
    if block < 1:
        block = 1
    nb = (n - 1) // block + 1
    if nthreads > nb:
        nthreads = <int>nb
    cdef bint nested = fb_in_parallel()
    if nthreads <= 1 or not fb_omp_ok or not FASTBP_OPENMP or nested:
        if nb > 1 and not nested:
            _regions_serial += 1
        for j in range(nb):
            lo = j * block
            hi = n if n - lo <= block else lo + block
            fn(ctx, lo, hi, j)
        return
    _regions_opened += 1
    if _use_pool and fb_pool_run(n, block, nb, <fb_block_fn>fn, ctx, nthreads, wake) == 0:
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


def region_counts():
    """{'opened': OpenMP parallel regions opened so far, 'serial': multi-block calls run on the calling thread}
    (calls made from inside a region are not counted)."""
    return {"opened": _regions_opened, "serial": _regions_serial}


def regions_opened():
    """OpenMP parallel regions (or pool regions) opened so far: region_counts()['opened'] without the dict."""
    return _regions_opened


def no_region_since(mark):
    """True when no parallel region was opened since `mark` (a regions_opened() reading; -1: never true): all that
    ran in between ran on the calling thread, so the arrays it wrote are in this core's cache.  The one rule behind
    keeping a small elementwise pass on the calling thread (_optim, LOCAL_MAX): fastbp.optimizer's update (no region
    since the optimizer's previous step) and fastbp.nets' weight-decay term (none since the gradient started).
    TypeError for a mark that is not an integer."""
    cdef long long m = _operator.index(mark)
    return m >= 0 and _regions_opened == m


def reset_region_counts():
    """Set both region counters to 0."""
    global _regions_opened, _regions_serial
    _regions_opened = 0
    _regions_serial = 0


def _after_fork_in_child():
    """Called in a forked child (os.register_at_fork): no OpenMP parallel region from now on."""
    global fb_omp_ok
    fb_omp_ok = 0


def _blas_threads_callback():
    """Address of the OpenBLAS threads callback that runs BLAS jobs on fastbp's OpenMP team (0 without OpenMP)."""
    return <intptr_t>fb_blas_threads_address() if FASTBP_OPENMP else 0


def _run_gang_on_pthreads(int numjobs, int fail_creates=0, long long retry_us=10000000):
    """Tests: run `numjobs` (1..64) jobs that wait for each other, as OpenBLAS's do, on the callback's last-resort
    runner (a thread per job), after making the next `fail_creates` thread creations fail, with `retry_us` of
    retrying; returns, per job, whether it ran alongside all the others."""
    if not 1 <= numjobs <= 64:
        raise ValueError(f"numjobs must be in 1..64, got {numjobs}")
    cdef fb_test_gang_t jobs[64]
    cdef int ok[64]
    cdef int started = 0
    cdef int i
    for i in range(numjobs):
        jobs[i].started = &started
        jobs[i].numjobs = numjobs
        jobs[i].ok = ok
        jobs[i].index = i
        ok[i] = 0
    global fb_test_create_failures, fb_create_retry_us
    cdef long long saved = fb_create_retry_us
    fb_test_create_failures = fail_creates
    fb_create_retry_us = retry_us
    try:
        with nogil:
            fb_run_jobs_on_pthreads(fb_test_gang_job, numjobs, sizeof(fb_test_gang_t), jobs, 0)
    finally:
        fb_test_create_failures = 0
        fb_create_retry_us = saved
    return [bool(ok[i]) for i in range(numjobs)]


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


ctypedef struct _team_ctx:
    long long *thread_of_block
    int *seen            # seen[t] = 1 once thread t ran a block
    int want             # distinct threads to wait for
    int distinct
    long long deadline


cdef void _record_thread(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _team_ctx *c = <_team_ctx*>ctx
    cdef int t = fb_pool_thread_num() if fb_pool_in_region() else fb_thread_num()
    c.thread_of_block[j] = t
    if t < c.want:
        fb_team_mark(c.seen, t, &c.distinct)
    # hold the block until every thread of the team has run one (10 s at most; yielding, so that 64 threads on a
    # loaded 2-core machine all get to run), so the answer is the team's size although the caller claims blocks
    # as fast as it can
    while fb_load_int(&c.distinct) < c.want and fb_now_ns() < c.deadline:
        fb_yield()


def _block_threads(Py_ssize_t nblocks):
    """For tests: the thread (0 = the caller) that ran each of nblocks one-element blocks of parallel_blocks; each
    block waits (10 s at most) until every thread of the team has run a block."""
    import array
    got = array.array("q", [-1]) * nblocks if nblocks > 0 else array.array("q")
    cdef int nt = num_threads()
    seen = array.array("i", [0]) * (nt + 1)
    cdef long long[::1] o = got
    cdef int[::1] sv = seen
    cdef _team_ctx c
    c.thread_of_block = &o[0] if nblocks > 0 else NULL
    c.seen = &sv[0]
    c.want = <int>min(nt, nblocks)
    c.distinct = 0
    c.deadline = fb_now_ns() + 10000000000
    with nogil:
        parallel_blocks(nblocks, 1, _record_thread, &c)
    return list(got)


cdef void _record_in_region(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    (<long long*>ctx)[j] = in_region()


def _in_region_seen(Py_ssize_t nblocks):
    """For tests: (in_region() on the caller, [in_region() inside each of nblocks blocks of parallel_blocks])."""
    import array
    got = array.array("q", [-1]) * nblocks if nblocks > 0 else array.array("q")
    cdef long long[::1] o = got
    cdef void *p = &o[0] if nblocks > 0 else NULL
    with nogil:
        parallel_blocks(nblocks, 1, _record_in_region, p)
    return bool(in_region()), [bool(v) for v in got]


def _set_spin_yield(bint on):
    """For measurements: spinning pool workers call sched_yield about every microsecond (True, default) or not."""
    global fb_spin_yield
    fb_spin_yield = on


def _set_pool(bint use_pool, double spin_us=-1, double wake_min_macs=-1):
    """Open regions on fastbp's own worker pool (True) or as OpenMP regions; spin_us >= 0 sets the pool's spin,
    wake_min_macs >= 0 the smallest product that wakes a sleeping worker."""
    global _use_pool, fb_spin_ns, _wake_min_macs, fb_pool_for_blas
    _use_pool = use_pool
    fb_pool_for_blas = use_pool   # OpenBLAS's jobs (threads callback) on the pool too, as one gang region
    if spin_us >= 0:
        fb_spin_ns = <long long>(spin_us * 1000)
    if wake_min_macs >= 0:
        _wake_min_macs = wake_min_macs


def pool_info():
    """How parallel_blocks opens a region: {'pool': 'fastbp' | 'openmp', 'spin_us', 'workers' (created so far),
    'regions' (pool regions run), 'helped' (those where a worker ran a block), 'wakes' (regions that had
    to wake a sleeping worker), 'wake_us' (the caller's time spent waking them), and where the regions' time went
    (totals over the regions run while pool_stats(True) was on, microseconds; 'stats': whether it is on):
    'caller_block_us' (the caller running blocks), 'caller_wait_us' (the
    caller waiting, after its blocks, for blocks workers had claimed), 'worker_blocks', 'worker_block_us' (the
    workers running blocks), 'worker_starts' (jobs a worker took part in), 'worker_start_us' (from a job's
    publication to the start of the worker's first block of it)}.  Per region, a caller wait well above the mean
    start delay means a worker ran its share slower than the caller ran its own: the blocks are a static split."""
    return {"pool": "fastbp" if (_use_pool and FB_POOL) else "openmp", "spin_us": fb_spin_ns / 1000.0,
            "wake_min_macs": _wake_min_macs,
            "workers": fb_pool_workers(), "regions": fb_pool_regions, "helped": fb_pool_helped,
            "wakes": fb_pool_wakes, "wake_us": fb_pool_wake_ns / 1000.0, "stats": bool(fb_get_pool_stats()),
            "caller_block_us": fb_pool_own_ns / 1000.0, "caller_wait_us": fb_pool_wait_ns / 1000.0,
            "worker_blocks": fb_pool_wblocks, "worker_block_us": fb_pool_wblock_ns / 1000.0,
            "worker_starts": fb_pool_wstarts, "worker_start_us": fb_pool_wstart_ns / 1000.0}


def pool_stats(on=None):
    """Whether fastbp's pool times its regions for pool_info (off by default: a few clock reads per region); with
    `on`, switch it and return the previous setting."""
    was = bool(fb_get_pool_stats())
    if on is not None:
        if on is not True and on is not False and not (type(on) is int and on in (0, 1)):
            raise TypeError(f"pool_stats(on): on must be True, False or None, got {on!r}")
        fb_set_pool_stats(1 if on else 0)
    return was


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


def _apply_pool_env():
    from fastbp import _runtime
    _set_pool(_runtime.env_thread_pool() == "fastbp", _runtime.env_spin_us(), _runtime.env_wake_min_macs())
    if _os.environ.get("FASTBP_SPIN_YIELD", "") == "0":  # undocumented, for measurements
        _set_spin_yield(False)


_apply_pool_env()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)
