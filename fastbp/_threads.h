/* C side of fastbp/_threads.pyx (included by that module only: the state below exists once per process).
 *
 * fb_omp_ok: GNU OpenMP cannot start a parallel region in a child forked from a process whose OpenMP threads
 * were running (the child hangs), so after a fork fastbp runs single-threaded in the child: fb_omp_ok = 0
 * (set by the os.register_at_fork hook of _threads.pyx).
 *
 * fb_blas_threads: OpenBLAS's caller-managed threading (openblas_set_threads_callback_function, fastbp's
 * "callback" threading mode): OpenBLAS hands us its `numjobs` parallel jobs and we run them on fastbp's OpenMP
 * team, so the elementwise kernels and the GEMMs share one pool of worker threads instead of two pools spinning
 * against each other on the same cores.  The jobs of a level-3 call wait for each other, so they must all run at
 * once: when an OpenMP team of numjobs threads cannot be had (called inside a parallel region, dynamic teams, a
 * thread limit), the jobs run on freshly created threads instead.
 */
#ifndef FASTBP_THREADS_H
#define FASTBP_THREADS_H
#include <pthread.h>
#include <stddef.h>

static int fb_omp_ok = 1;

#if FASTBP_OPENMP
#include <omp.h>
static int fb_omp_max_threads(void) { return fb_omp_ok ? omp_get_max_threads() : 1; }
static int fb_in_parallel(void) { return omp_in_parallel(); }
static int fb_thread_num(void) { return omp_get_thread_num(); }
#else
static int fb_omp_max_threads(void) { return 1; }
static int fb_in_parallel(void) { return 0; }
static int fb_thread_num(void) { return 0; }
#endif

typedef void (*fb_dojob_t)(int thread_num, void *jobdata, int dojob_data);
typedef struct { fb_dojob_t dojob; void *job; int thread_num; int data; } fb_job_t;

static void *fb_job_main(void *arg) {
    fb_job_t *j = (fb_job_t *)arg;
    j->dojob(j->thread_num, j->job, j->data);
    return NULL;
}

static int fb_run_jobs_on_pthreads(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    pthread_t tids[64];
    fb_job_t jobs[64];
    int i, started = 0;
    if (numjobs > 64) return -1;
    for (i = 1; i < numjobs; i++) {
        jobs[i].dojob = dojob; jobs[i].job = (char *)jobdata + (size_t)i * elsize;
        jobs[i].thread_num = i; jobs[i].data = data;
        if (pthread_create(&tids[i], NULL, fb_job_main, &jobs[i]) != 0) break;
        started = i;
    }
    if (started != numjobs - 1) {            /* could not start them all: run the rest here, in order */
        for (i = started + 1; i < numjobs; i++) dojob(i, (char *)jobdata + (size_t)i * elsize, data);
    }
    dojob(0, jobdata, data);
    for (i = 1; i <= started; i++) pthread_join(tids[i], NULL);
    return 0;
}

static void fb_blas_threads(int sync, fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
    (void)sync;
    if (numjobs <= 1) {
        if (numjobs == 1) dojob(0, jobdata, data);
        return;
    }
#if FASTBP_OPENMP
    if (fb_omp_ok && !omp_in_parallel() && !omp_get_dynamic() && omp_get_thread_limit() >= numjobs
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
