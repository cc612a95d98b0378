"""fastbp's OpenMP spin setting (fastbp/_runtime.py, issue 11 item 1): applied to fastbp's own libgomp only when the
user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT, never left in the environment (children, other runtimes and
NumPy never see it), reported by `fastbp info`, and really read by libgomp (the worker's CPU time after a region)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbp import _kernels, _runtime

ROOT = Path(__file__).resolve().parents[1]
VARS = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "FASTBP_OMP_SPIN",
    "FASTBP_NUM_THREADS",
    "FASTBP_THREAD_POOL",
    "FASTBP_SPIN_US",
    "FASTBP_WAKE_MIN_MACS",
)

# After fastbp's import: the environment, what fastbp reports, and the CPU seconds the process's threads other
# than the main one use during an idle 0.2 s right after a parallel kernel (a spinning OpenMP worker shows).
_PROBE = r"""
import json, os, time, threading, numpy as np
import fastbp
from fastbp import _runtime, _kernels as K
def others():
    me, tot = str(threading.get_native_id()), 0
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                tot += int(f.read().split()[0])
    return tot / 1e9
x = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)
out = np.empty_like(x); mask = np.empty(x.shape, bool)
spins = []
for _ in range(2):
    K.relu_forward(x, out, mask)
    c0 = others(); time.sleep(0.2); spins.append(others() - c0)
from fastbp import _threads
print(json.dumps({"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
                  "info": _runtime.info(), "idle_worker_cpu_s": min(spins), "threads": K.build_info()["num_threads"],
                  "pool": _threads.pool_info()}))
"""


def _run(**env):
    """The probe in a fresh process; libgomp's team opens the regions unless FASTBP_THREAD_POOL is given."""
    e = {k: v for k, v in os.environ.items() if k not in VARS}
    e["FASTBP_THREAD_POOL"] = "openmp"
    e.update(env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


needs_omp = pytest.mark.skipif(
    not _kernels.build_info()["openmp"] or not os.path.isdir("/proc/self/task"),
    reason="no OpenMP in this build, or no /proc",
)


@needs_omp
def test_fastbp_setting_is_applied_to_its_runtime_and_not_left_in_the_environment():
    got = _run(FASTBP_NUM_THREADS="2")
    assert got["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    assert os.environ.get("KMP_BLOCKTIME") is None
    if not _runtime._mapped("libgomp.so"):  # a clang build against LLVM's libomp
        assert got["info"]["setting"].startswith("KMP_BLOCKTIME=")
        return
    if _runtime.SPINCOUNT is None:
        assert got["info"]["setting"] == "libgomp's default"
    else:
        assert got["info"] == {
            "setting": f"GOMP_SPINCOUNT={_runtime.SPINCOUNT}",
            "by": "fastbp, for its own OpenMP runtime only",
        }
        # the worker sleeps within a few ms of the region's end: far less than the 0.2 s idle
        assert got["idle_worker_cpu_s"] < 0.05, got


@needs_omp
@pytest.mark.skipif(not _runtime._mapped("libgomp.so"), reason="GNU OpenMP's variables")
def test_the_users_settings_win_and_are_kept():
    got = _run(FASTBP_NUM_THREADS="2", OMP_WAIT_POLICY="active")
    assert got["env"] == {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}
    assert got["info"] == {"setting": "OMP_WAIT_POLICY=active", "by": "the user"}
    passive = _run(FASTBP_NUM_THREADS="2", FASTBP_OMP_SPIN="0")
    assert passive["info"]["setting"] == "GOMP_SPINCOUNT=0" and passive["env"]["GOMP_SPINCOUNT"] is None
    # the variable reaches libgomp: an ACTIVE worker spins through the idle time, a spin count of 0 does not
    assert passive["idle_worker_cpu_s"] < 0.05
    assert got["idle_worker_cpu_s"] > passive["idle_worker_cpu_s"] + 0.015, (got, passive)


def test_keep_and_bad_values():
    assert _run(FASTBP_OMP_SPIN="keep")["info"] == {"setting": "libgomp's default", "by": "FASTBP_OMP_SPIN=keep"}
    e = {k: v for k, v in os.environ.items() if k not in VARS}
    e.update(FASTBP_OMP_SPIN="lots", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", "import fastbp"],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and "FASTBP_OMP_SPIN must be a spin count" in r.stderr


def test_blas_thread_timeout_reaches_only_fastbps_copy_and_is_validated():
    from fastbp import _blas

    assert _blas.blas_thread_timeout({}) == _blas.BLAS_THREAD_TIMEOUT
    assert _blas.blas_thread_timeout({"FASTBP_BLAS_THREAD_TIMEOUT": " 6 "}) == 6
    for bad in ("3", "31", "x", "-5", "1e1"):
        with pytest.raises(ValueError, match=r"FASTBP_BLAS_THREAD_TIMEOUT must be an integer in 4\.\.30"):
            _blas.blas_thread_timeout({"FASTBP_BLAS_THREAD_TIMEOUT": bad})
    e = {k: v for k, v in os.environ.items() if k not in VARS + ("OPENBLAS_THREAD_TIMEOUT",)}
    e["FASTBP_BLAS"] = "own"  # the timeout is a setting of fastbp's own OpenBLAS copy
    e.update(FASTBP_BLAS_THREAD_TIMEOUT="6", FASTBP_BLAS_THREADING="openblas", PYTHONPATH=str(ROOT))
    code = (
        "import os, json, numpy as np; from fastbp import _blas, _kernels as K; a = np.ones((64, 64)); "
        "c = np.empty((64, 64)); K.gemm(a, a, c); assert (c == 64).all(); "
        "print(json.dumps([_blas.info()['thread_timeout'], os.environ.get('OPENBLAS_THREAD_TIMEOUT')]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [6, None]


# ---------------------------------------------------------------------------------------------------------------
# fastbp's own worker pool (the default way parallel_blocks opens a region)
# ---------------------------------------------------------------------------------------------------------------
@needs_omp
def test_pool_is_the_default_and_its_workers_sleep_after_the_spin():
    got = _run(FASTBP_NUM_THREADS="2", FASTBP_THREAD_POOL="")
    assert got["pool"]["pool"] == "fastbp" and got["pool"]["spin_us"] == _runtime.SPIN_US
    assert got["pool"]["workers"] == 1 and got["pool"]["regions"] >= 2
    assert got["idle_worker_cpu_s"] < 0.05, got  # spins SPIN_US (0.3 ms), then sleeps through the idle 0.2 s


@needs_omp
def test_pool_spin_setting_reaches_the_workers():
    # a 0.5 s spin keeps the worker awake through the idle 0.2 s between the probe's two regions (the second one
    # wakes nobody); with 0 it sleeps at once and the second region must wake it (the worker's CPU time while it
    # spins is not compared: it yields its core about every microsecond, so on a loaded machine it gets little)
    long = _run(FASTBP_NUM_THREADS="2", FASTBP_THREAD_POOL="fastbp", FASTBP_SPIN_US="500000")
    short = _run(FASTBP_NUM_THREADS="2", FASTBP_THREAD_POOL="fastbp", FASTBP_SPIN_US="0")
    assert long["pool"]["spin_us"] == 500000 and short["pool"]["spin_us"] == 0
    assert short["idle_worker_cpu_s"] < 0.05, short
    assert long["pool"]["wakes"] == 0 and short["pool"]["wakes"] >= 1, (long["pool"], short["pool"])


def test_pool_environment_parsing():
    assert _runtime.env_thread_pool({}) == "fastbp"
    assert _runtime.env_thread_pool({"FASTBP_THREAD_POOL": " OpenMP "}) == "openmp"
    assert _runtime.env_spin_us({}) == _runtime.SPIN_US
    assert _runtime.env_spin_us({"FASTBP_SPIN_US": " 12.5 "}) == 12.5
    assert _runtime.env_wake_min_macs({}) == _runtime.WAKE_MIN_MACS
    assert _runtime.env_wake_min_macs({"FASTBP_WAKE_MIN_MACS": "4e6"}) == 4e6
    with pytest.raises(ValueError, match="FASTBP_THREAD_POOL must be one of"):
        _runtime.env_thread_pool({"FASTBP_THREAD_POOL": "gomp"})
    for bad in ("-1", "x", "nan", "inf", "2000000"):
        with pytest.raises(ValueError, match=r"FASTBP_SPIN_US must be a number of microseconds in 0\.\.1000000"):
            _runtime.env_spin_us({"FASTBP_SPIN_US": bad})
    for bad in ("-1", "lots", "nan", "inf"):
        with pytest.raises(ValueError, match="FASTBP_WAKE_MIN_MACS must be a number of multiply-adds"):
            _runtime.env_wake_min_macs({"FASTBP_WAKE_MIN_MACS": bad})
    # a bad value fails the import, naming the variable
    e = {k: v for k, v in os.environ.items() if k not in VARS}
    e.update(FASTBP_SPIN_US="soon", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", "import fastbp.layers"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "FASTBP_SPIN_US must be" in r.stderr, r.stderr[-2000:]
