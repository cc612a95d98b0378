"""fastbp/_threads: the last-resort runner of OpenBLAS's parallel jobs (the "callback" threading mode), whose jobs
wait for each other and so must all run at once."""

import subprocess
import sys

import pytest

from fastbp import _threads


@pytest.mark.parametrize("numjobs", [1, 2, 3, 16, 64])
def test_every_job_gets_a_thread_of_its_own(numjobs):
    assert _threads._run_gang_on_pthreads(numjobs) == [True] * numjobs


@pytest.mark.parametrize("failures", [1, 3, 8])
def test_a_thread_creation_that_fails_for_a_moment_is_retried_not_run_serially(failures):
    # before: the jobs left without a thread ran on the caller, one after the other -- a hang, since each waits for
    # the others (the test gang gives up after ~5 s and reports False instead of hanging)
    assert _threads._run_gang_on_pthreads(4, fail_creates=failures, retry_us=2_000_000) == [True] * 4


def test_a_thread_that_cannot_be_created_stops_the_process_with_a_message_instead_of_a_hang():
    code = "from fastbp import _threads; _threads._run_gang_on_pthreads(3, fail_creates=10**9, retry_us=2000)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert "fastbp: cannot create a thread for OpenBLAS's parallel job 2 of 3" in r.stderr
    assert "Resource temporarily unavailable" in r.stderr and "FASTBP_NUM_THREADS" in r.stderr


def test_gang_size_is_checked():
    with pytest.raises(ValueError, match="numjobs must be in 1..64, got 65"):
        _threads._run_gang_on_pthreads(65)
