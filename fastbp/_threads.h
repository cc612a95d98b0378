/* C side of fastbp/_threads.pyx (included by that module only: the state below exists once per process).
 *
 * fb_omp_ok: GNU OpenMP cannot start a parallel region in a child forked from a process whose OpenMP threads
 * were running (the child hangs), so after a fork fastbp runs single-threaded in the child: fb_omp_ok = 0
 * (set by the os.register_at_fork hook of _threads.pyx).
 *
 * fb_blas_threads: OpenBLAS's caller-managed threading (openblas_set_threads_callback_function, fastbp's
 * "callback" threading mode): OpenBLAS hands us its `numjobs` parallel jobs and we run them on fastbp's worker
 * pool (a gang region: one job per thread, below) or, with FASTBP_THREAD_POOL=openmp, on fastbp's OpenMP team,
 * so the elementwise kernels and the GEMMs share one pool of worker threads instead of two pools spinning
 * against each other on the same cores.  The jobs of a level-3 call wait for each other, so they must all run at
 * once: when neither can provide numjobs threads (called inside a parallel region, another thread's region,
 * dynamic teams, a thread limit), the jobs run on freshly created threads instead, one each; a thread that cannot
 * be created is retried, and if it still cannot be had the process stops with a message (running the job on the
 * caller after its own would hang: fb_create_job_thread).
 */
#ifndef FASTBP_THREADS_H
#define FASTBP_THREADS_H
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sched.h>
#include <stddef.h>

static int fb_omp_ok = 1;
static __thread int fb_pool_tid = 0;      /* fastbp's worker pool (below): 0 on the caller; 1.. on workers */
static __thread int fb_pool_inside = 0;   /* running a block of a pool region */

#if FASTBP_OPENMP
#include <omp.h>
static int fb_omp_max_threads(void) { return fb_omp_ok ? omp_get_max_threads() : 1; }
/* inside a parallel region: an OpenMP one, or a block of fastbp's pool (no nested team may be opened there) */
static int fb_in_parallel(void) { return fb_pool_inside || omp_in_parallel(); }
static int fb_thread_num(void) { return omp_get_thread_num(); }
#else
static int fb_omp_max_threads(void) { return 1; }
static int fb_in_parallel(void) { return fb_pool_inside; }
static int fb_thread_num(void) { return 0; }
#endif

typedef void (*fb_dojob_t)(int thread_num, void *jobdata, int dojob_data);
typedef struct { fb_dojob_t dojob; void *job; int thread_num; int data; } fb_job_t;

static void *fb_job_main(void *arg) {
    fb_job_t *j = (fb_job_t *)arg;
    j->dojob(j->thread_num, j->job, j->data);
    return NULL;
}

/* Creating a job's thread.  OpenBLAS's jobs wait for each other, so a job without a thread of its own would hang
 * the whole call (the caller cannot run it after its own): a failed pthread_create (EAGAIN: a thread or memory limit,
 * often momentary) is retried with backoff for up to fb_create_retry_us, and then the process stops with a message
 * saying why, rather than hang.  fb_test_create_failures (tests only) makes that many attempts fail first. */
static long long fb_create_retry_us = 10000000;
static int fb_test_create_failures = 0;

static int fb_create_job_thread(pthread_t *tid, fb_job_t *job) {
    long long waited_us = 0, step_us = 50;
    for (;;) {
        int rc;
        if (fb_test_create_failures > 0) {
            fb_test_create_failures--;
            rc = EAGAIN;
        } else {
            rc = pthread_create(tid, NULL, fb_job_main, job);
        }
        if (rc == 0 || waited_us >= fb_create_retry_us) return rc;
        {
            struct timespec ts;
            ts.tv_sec = (time_t)(step_us / 1000000);
            ts.tv_nsec = (long)(step_us % 1000000) * 1000;
            nanosleep(&ts, NULL);
        }
        waited_us += step_us;
        if (step_us < 100000) step_us *= 2;
    }
}

static int fb_run_jobs_on_pthreads(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    pthread_t tids[64];
    fb_job_t jobs[64];
    int i, rc;
    if (numjobs > 64) return -1;
    for (i = 1; i < numjobs; i++) {
        jobs[i].dojob = dojob; jobs[i].job = (char *)jobdata + (size_t)i * elsize;
        jobs[i].thread_num = i; jobs[i].data = data;
        rc = fb_create_job_thread(&tids[i], &jobs[i]);
        if (rc != 0) {
            fprintf(stderr, "fastbp: cannot create a thread for OpenBLAS's parallel job %d of %d (pthread_create: %s, "
                    "retried for %lld ms); the jobs of one call wait for each other, so the call cannot finish. "
                    "Use fewer threads (FASTBP_NUM_THREADS) or FASTBP_BLAS_THREADING=split (the default).\n",
                    i + 1, numjobs, strerror(rc), fb_create_retry_us / 1000);
            fflush(stderr);
            abort();
        }
    }
    dojob(0, jobdata, data);
    for (i = 1; i < numjobs; i++) pthread_join(tids[i], NULL);
    return 0;
}

/* Tests: a gang of jobs that, like OpenBLAS's, each wait until all of them have started (at most ~5 s, so a
 * broken runner fails a test instead of hanging it); job i sets ok[i] = 1 when it saw the whole gang.  The job
 * data is an array of fb_test_gang_t, one per job. */
typedef struct { int *started; int numjobs; int *ok; int index; } fb_test_gang_t;

static void fb_test_gang_job(int thread_num, void *jobdata, int data) {
    fb_test_gang_t *g = (fb_test_gang_t *)jobdata;
    long long deadline;
    struct timespec ts;
    (void)thread_num; (void)data;
    __atomic_add_fetch(g->started, 1, __ATOMIC_SEQ_CST);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    deadline = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec + 5000000000LL;
    while (__atomic_load_n(g->started, __ATOMIC_SEQ_CST) < g->numjobs) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec > deadline) return;
        sched_yield();
    }
    g->ok[g->index] = 1;
}

/* ---------------------------------------------------------------------------------------------------------------
 * fastbp's own worker pool (issue 11 item 1): how parallel_blocks opens a region by default.
 *
 * Why not an OpenMP region: libgomp reads its spin setting once, at load.  Sleeping workers (GOMP_SPINCOUNT=0)
 * cost every region a wake-up the caller then WAITS for at the join (about 13 us on the 2-core EPYC VM, as much
 * as the book-sized GEMM half it parallelises); spinning workers (libgomp's default, ~0.3 M rounds) hold the other
 * core while the book's NumPy code runs between fastbp's calls, and a descheduled one stalls every join.
 *
 * The pool: workers 1..nthreads-1 (pthreads, created on first use, never after a fork: fb_omp_ok), one job at a
 * time, published by a generation counter.
 *  - Blocks are CLAIMED (an atomic ticket = generation << 32 | next block), by the caller too, which starts at
 *    once with block 0 (always its own: see fb_pool_run_mode).  The caller waits only for blocks a worker has claimed and not finished: a worker that is asleep or
 *    descheduled when the region opens costs nothing -- the caller runs its blocks.  Block boundaries are fixed
 *    (see _threads.pyx), so which thread runs a block never changes a result.
 *  - After its last block a worker spins (pause) for fb_spin_ns, then sleeps on a condition variable; the caller
 *    signals it only when some worker sleeps and the region is worth it (`wake`: parallel_blocks_macs' size
 *    rule).  Waking costs the CALLER a system call (measured 10-100 us on the 2-core VM, loaded or not), so a
 *    book-sized product does not wake anyone: it runs on the caller and on whichever workers are still spinning.
 *    Back-to-back regions (a training step's GEMMs) find the worker awake; shortly after fastbp's last call it
 *    leaves the core to NumPy.
 * -------------------------------------------------------------------------------------------------------------*/
#include <stdint.h>
#include <time.h>

typedef void (*fb_block_fn)(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t block);

#if FASTBP_OPENMP && !defined(_WIN32) && UINTPTR_MAX > 0xffffffffu
#define FB_POOL 1
#else
#define FB_POOL 0
#endif

static long long fb_spin_ns = 300000;     /* set from Python (FASTBP_SPIN_US, _runtime.SPIN_US) */
static int fb_spin_yield = 1;             /* spinning workers call sched_yield every ~1 us (a thread waiting for
                                             the core, the caller itself on a loaded machine, gets it) */

static int fb_pool_in_region(void) { return fb_pool_inside; }
static int fb_pool_thread_num(void) { return fb_pool_tid; }

static inline void fb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long long fb_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* For the _block_threads test hook: mark thread t seen (counting distinct threads); read the count. */
static void fb_team_mark(int *seen, int t, int *distinct) {
    if (__atomic_exchange_n(&seen[t], 1, __ATOMIC_ACQ_REL) == 0) __atomic_fetch_add(distinct, 1, __ATOMIC_ACQ_REL);
}
static int fb_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void fb_yield(void) { sched_yield(); }

#if FB_POOL
typedef struct {
    fb_block_fn fn; void *ctx; Py_ssize_t n, block, nb; int nworkers;
    int one_each;                         /* gang region: every thread claims at most one block */
    int stats;                            /* fb_pool_stats when the job was published */
} fb_pool_job_t;

static fb_pool_job_t fb_job;
/* Where a region's time goes (pool_info), counted while fb_pool_stats is on (off by default: four clock reads per
 * region on the caller and two per worker block, ~25 ns each on the 2-core EPYC, are a few per cent of the smallest
 * regions): the caller's own blocks, its wait for the workers' blocks after them, the workers' blocks, and how long
 * after the job's publication each worker started its first block of the job.  A wait well above the start delay
 * means a worker's share ran slower than the caller's (another load on its core, a slower core): the split is
 * static.  fb_pool_stats is read once per job (fb_job.stats), so a region is counted whole or not at all. */
static int fb_pool_stats = 0;             /* relaxed atomic: set from Python, read by any caller */
static void fb_set_pool_stats(int on) { __atomic_store_n(&fb_pool_stats, on ? 1 : 0, __ATOMIC_RELAXED); }
static int fb_get_pool_stats(void) { return __atomic_load_n(&fb_pool_stats, __ATOMIC_RELAXED); }
static long long fb_pub_ns = 0;           /* when the current job was published (written before fb_gen) */
static long long fb_pool_own_ns = 0, fb_pool_wait_ns = 0;                      /* caller only */
static long long fb_pool_wblock_ns = 0, fb_pool_wblocks = 0;   /* workers: atomic adds */
static long long fb_pool_wstart_ns = 0, fb_pool_wstarts = 0;   /* workers' first block of a job: atomic adds */
static uint64_t fb_ticket = 0;            /* generation << 32 | next block to claim */
static unsigned fb_gen = 0;               /* generation of the current job */
static Py_ssize_t fb_pending = 0;         /* blocks of the current job not finished */
static int fb_sleepers = 0;
static int fb_nworkers = 0;               /* workers created */
static pthread_mutex_t fb_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fb_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t fb_region_mu = PTHREAD_MUTEX_INITIALIZER;   /* one region at a time */

/* Claim and run blocks of generation g; returns the number run. */
static Py_ssize_t fb_pool_work(unsigned g) {
    Py_ssize_t done = 0;
    for (;;) {
        uint64_t t = __atomic_load_n(&fb_ticket, __ATOMIC_ACQUIRE);
        if ((unsigned)(t >> 32) != g) break;
        Py_ssize_t j = (Py_ssize_t)(t & 0xffffffffu);
        Py_ssize_t nb = fb_job.nb;        /* stable: job g cannot end while block j is unclaimed */
        if (j >= nb) break;
        if (!__atomic_compare_exchange_n(&fb_ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        Py_ssize_t lo = j * fb_job.block;
        Py_ssize_t hi = fb_job.n - lo <= fb_job.block ? fb_job.n : lo + fb_job.block;
        int one = fb_job.one_each;
        int timed = fb_pool_tid && fb_job.stats;
        long long w0 = timed ? fb_now_ns() : 0;
        fb_pool_inside = 1;
        fb_job.fn(fb_job.ctx, lo, hi, j);
        fb_pool_inside = 0;
        if (timed) {
            long long w1 = fb_now_ns();
            __atomic_fetch_add(&fb_pool_wblock_ns, w1 - w0, __ATOMIC_RELAXED);
            __atomic_fetch_add(&fb_pool_wblocks, 1, __ATOMIC_RELAXED);
            if (done == 0) {   /* this worker's first block of the job: its start delay */
                __atomic_fetch_add(&fb_pool_wstart_ns, w0 - __atomic_load_n(&fb_pub_ns, __ATOMIC_RELAXED),
                                   __ATOMIC_RELAXED);
                __atomic_fetch_add(&fb_pool_wstarts, 1, __ATOMIC_RELAXED);
            }
        }
        __atomic_fetch_sub(&fb_pending, 1, __ATOMIC_ACQ_REL);
        done++;
        if (one) break;
    }
    return done;
}

static void *fb_pool_main(void *arg) {
    /* arg: tid in the low 32 bits, the generation current at creation in the high ones (the job about to be
     * published is then the first this worker takes part in) */
    int tid = (int)((uint64_t)(uintptr_t)arg & 0xffffffffu);
    unsigned seen = (unsigned)((uint64_t)(uintptr_t)arg >> 32);
    fb_pool_tid = tid;
    for (;;) {
        long long until = fb_now_ns() + fb_spin_ns;
        unsigned g;
        int k = 0;
        while ((g = __atomic_load_n(&fb_gen, __ATOMIC_ACQUIRE)) == seen) {
            fb_cpu_relax();
            if (++k == 64) {      /* about every microsecond: out of budget? and let a waiting thread run */
                k = 0;
                if (fb_now_ns() >= until) break;
                if (fb_spin_yield) sched_yield();
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&fb_mu);
            __atomic_fetch_add(&fb_sleepers, 1, __ATOMIC_SEQ_CST);
            while ((g = __atomic_load_n(&fb_gen, __ATOMIC_SEQ_CST)) == seen)
                pthread_cond_wait(&fb_cv, &fb_mu);
            __atomic_fetch_sub(&fb_sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&fb_mu);
        }
        seen = g;
        if (tid <= __atomic_load_n(&fb_job.nworkers, __ATOMIC_ACQUIRE)) fb_pool_work(g);
    }
    return NULL;
}

static long long fb_pool_regions = 0, fb_pool_helped = 0;   /* regions; regions where a worker ran a block */
static long long fb_pool_wakes = 0, fb_pool_wake_ns = 0;    /* regions that woke sleeping workers; time spent */

/* Run the nb blocks on the caller and up to nthreads - 1 workers; 0 when done, -1 if no worker can be had. */
static int fb_pool_run_mode(Py_ssize_t n, Py_ssize_t block, Py_ssize_t nb, fb_block_fn fn, void *ctx,
                            int nthreads, int wake, int one_each) {
    int want = nthreads - 1;
    if (want < 1 || nb > 0xffffffffLL) return -1;
    if (pthread_mutex_trylock(&fb_region_mu) != 0) return -1;   /* another thread's region: run serially */
    while (fb_nworkers < want) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uint64_t arg = ((uint64_t)fb_gen << 32) | (uint64_t)(fb_nworkers + 1);
        int rc = pthread_create(&tid, &attr, fb_pool_main, (void *)(uintptr_t)arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        fb_nworkers++;
    }
    if (want > fb_nworkers) want = fb_nworkers;
    if (want < 1 || (one_each && want + 1 < nb)) { pthread_mutex_unlock(&fb_region_mu); return -1; }
    unsigned g = fb_gen + 1;
    if (g == 0) g = 1;
    fb_job.fn = fn; fb_job.ctx = ctx; fb_job.n = n; fb_job.block = block; fb_job.nb = nb;
    fb_job.one_each = one_each;
    int stats = fb_job.stats = fb_get_pool_stats();
    if (one_each) wake = 1;               /* every block must start: sleeping workers are needed */
    __atomic_store_n(&fb_job.nworkers, want, __ATOMIC_RELEASE);
    __atomic_store_n(&fb_pending, nb, __ATOMIC_RELEASE);
    /* block 0 is the caller's, claimed before the workers can see the job: a region cut into one block per
     * thread (the split GEMM) then runs its first block on the calling thread every time, so the data a training
     * step's products and conversions leave in that core's cache is the data the next region's block 0 reads
     * (a worker racing the caller for block 0 would move it between the cores, region after region) */
    __atomic_store_n(&fb_ticket, ((uint64_t)g << 32) | (uint64_t)(nb > 0), __ATOMIC_RELEASE);
    if (stats) __atomic_store_n(&fb_pub_ns, fb_now_ns(), __ATOMIC_RELAXED);   /* published with fb_gen below */
    __atomic_store_n(&fb_gen, g, __ATOMIC_SEQ_CST);
    if (wake && __atomic_load_n(&fb_sleepers, __ATOMIC_SEQ_CST) > 0) {
        long long t0 = fb_now_ns();
        pthread_mutex_lock(&fb_mu);
        pthread_cond_broadcast(&fb_cv);
        pthread_mutex_unlock(&fb_mu);
        fb_pool_wake_ns += fb_now_ns() - t0;
        fb_pool_wakes++;
    }
    Py_ssize_t mine = 0;
    long long t_own = stats ? fb_now_ns() : 0;
    if (nb > 0) {
        fb_pool_inside = 1;
        fn(ctx, 0, n <= block ? n : block, 0);
        fb_pool_inside = 0;
        __atomic_fetch_sub(&fb_pending, 1, __ATOMIC_ACQ_REL);
        mine = 1;
    }
    if (!one_each) mine += fb_pool_work(g);
    int k = 0;
    long long t_wait = stats ? fb_now_ns() : 0;
    /* (a gang region's caller ran one block; the workers claim the others, one each) */
    while (__atomic_load_n(&fb_pending, __ATOMIC_ACQUIRE) > 0) {   /* blocks a worker claimed: wait for them */
        fb_cpu_relax();
        if (++k == 4096) { k = 0; sched_yield(); }
    }
    fb_pool_regions++;
    if (stats) {
        fb_pool_own_ns += t_wait - t_own;
        fb_pool_wait_ns += fb_now_ns() - t_wait;
    }
    if (mine < nb) fb_pool_helped++;
    pthread_mutex_unlock(&fb_region_mu);
    return 0;
}
static int fb_pool_workers(void) { return fb_nworkers; }

static int fb_pool_run(Py_ssize_t n, Py_ssize_t block, Py_ssize_t nb, fb_block_fn fn, void *ctx, int nthreads,
                       int wake) {
    return fb_pool_run_mode(n, block, nb, fn, ctx, nthreads, wake, 0);
}

/* OpenBLAS's jobs (threads callback) on the pool: they wait for each other, so all must run at once -- a gang
 * region, one job per thread (the job index as OpenBLAS's thread number: unique among the running jobs). */
typedef struct { fb_dojob_t dojob; char *jobdata; size_t elsize; int data; } fb_gang_ctx_t;

static void fb_gang_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) {
    fb_gang_ctx_t *g = (fb_gang_ctx_t *)ctx;
    (void)hi;
    g->dojob((int)j, g->jobdata + (size_t)lo * g->elsize, g->data);
}

static int fb_pool_run_jobs(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    fb_gang_ctx_t g;
    g.dojob = dojob; g.jobdata = (char *)jobdata; g.elsize = elsize; g.data = data;
    return fb_pool_run_mode(numjobs, 1, numjobs, fb_gang_block, &g, numjobs, 1, 1);
}
#else
static long long fb_pool_regions = 0, fb_pool_helped = 0, fb_pool_wakes = 0, fb_pool_wake_ns = 0;
static long long fb_pool_own_ns = 0, fb_pool_wait_ns = 0, fb_pool_wblock_ns = 0, fb_pool_wstart_ns = 0, fb_pool_wblocks = 0;
static long long fb_pool_wstarts = 0;
static int fb_pool_stats = 0;
static void fb_set_pool_stats(int on) { fb_pool_stats = on ? 1 : 0; }
static int fb_get_pool_stats(void) { return fb_pool_stats; }
static int fb_pool_run(Py_ssize_t n, Py_ssize_t block, Py_ssize_t nb, fb_block_fn fn, void *ctx, int nthreads,
                       int wake) {
    (void)n; (void)block; (void)nb; (void)fn; (void)ctx; (void)nthreads; (void)wake;
    return -1;
}
static int fb_pool_workers(void) { return 0; }
static int fb_pool_run_jobs(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    (void)dojob; (void)numjobs; (void)elsize; (void)jobdata; (void)data;
    return -1;
}
#endif

static int fb_pool_for_blas = 1;          /* OpenBLAS's jobs on the pool (0: on an OpenMP team) */

static void fb_blas_threads(int sync, fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    (void)sync;
    if (numjobs <= 1) {
        if (numjobs == 1) dojob(0, jobdata, data);
        return;
    }
    if (fb_omp_ok && fb_pool_for_blas && !fb_in_parallel() && numjobs <= 64
            && fb_pool_run_jobs(dojob, numjobs, elsize, jobdata, data) == 0)
        return;
#if FASTBP_OPENMP
    if (fb_omp_ok && !fb_in_parallel() && !omp_get_dynamic() && omp_get_thread_limit() >= numjobs
            && numjobs <= 64) {
        #pragma omp parallel num_threads(numjobs)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads(), i;
            for (i = t; i < numjobs; i += nt)
                dojob(t, (char *)jobdata + (size_t)i * elsize, data);
        }
        return;
    }
#endif
    if (fb_run_jobs_on_pthreads(dojob, numjobs, elsize, jobdata, data) != 0) {
        int i;       /* more than 64 jobs (never with OpenBLAS's MAX_THREADS here): serial, last resort */
        for (i = 0; i < numjobs; i++) dojob(i, (char *)jobdata + (size_t)i * elsize, data);
    }
}

static void *fb_blas_threads_address(void) { return (void *)fb_blas_threads; }

#endif
