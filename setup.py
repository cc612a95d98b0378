"""Build of fastbp's Cython extensions (one per fastbp/*.pyx).

Compiler directives live here, not in the .pyx: bounds checks, wraparound and initialized checks are off and
C division is on.  Set FASTBP_DEBUG=1 at build time to turn bounds/wraparound/initialized checks back on and
build without optimisation (-O0 -g).  OpenMP is optional: it is used only when the compiler accepts -fopenmp
(set FASTBP_NO_OPENMP=1 to build without it).
"""
import glob
import os
import sys
import tempfile
import subprocess

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTBP_DEBUG", "0") not in ("", "0")


def _compiler_accepts(flag):
    """True when the C compiler builds and links a trivial OpenMP program with `flag`."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run([cc, flag, src, "-o", os.path.join(d, "t")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return r.returncode == 0


use_openmp = os.environ.get("FASTBP_NO_OPENMP", "0") in ("", "0") and sys.platform.startswith("linux") \
    and _compiler_accepts("-fopenmp")

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
compile_args.append("-fopenmp-simd")   # "omp simd" loop pragmas (vector reductions); no runtime needed
link_args = []
if use_openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

# One extension per fastbp/*.pyx (a module per idea: _threads, _gemm, _kernels, _optim, ...), all built with the
# same flags; every one depends on all the package's headers and .pxd files (cimports), so an edit rebuilds it.
headers = sorted(glob.glob("fastbp/*.h") + glob.glob("fastbp/*.pxd") + glob.glob("fastbp/*.pxi"))
extensions = [
    Extension(
        "fastbp." + os.path.splitext(os.path.basename(src))[0],
        [src],
        depends=headers,
        include_dirs=[np.get_include(), "fastbp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("FASTBP_OPENMP", "1" if use_openmp else "0")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for src in sorted(glob.glob("fastbp/*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
