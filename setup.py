"""Build of fastbp's Cython extensions (one per fastbp/*.pyx).

Compiler directives live here, not in the .pyx: bounds checks, wraparound and initialized checks are off and
C division is on.  Set FASTBP_DEBUG=1 at build time to turn bounds/wraparound/initialized checks back on and
build without optimisation (-O0 -g).  OpenMP is optional: it is used only when the compiler accepts -fopenmp
(set FASTBP_NO_OPENMP=1 to build without it).  -fopenmp-simd and the per-ISA kernel variants (GCC/clang target
attributes, x86 only) are likewise used only when a probe compile shows the compiler takes them.
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


def _compiles(flags, source, link=True):
    """True when the C compiler ($CC, else cc) builds `source` with `flags` (and links it when `link`); -Werror
    so a flag or attribute the compiler only warns about (and ignores) counts as refused."""
    cc = os.environ.get("CC", "cc").split()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(d, "t" if link else "t.o")
        try:
            r = subprocess.run([*cc, "-Werror", *flags, *([] if link else ["-c"]), src, "-o", out],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return r.returncode == 0


def _compiler_accepts(flag):
    """True when the C compiler builds and links a trivial OpenMP program with `flag`."""
    return _compiles([flag], "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")


# The per-ISA kernel variants of _simd.h need GCC/clang target attributes and __builtin_cpu_supports (x86 only);
# a compiler that refuses them gets the baseline kernels only.
_TARGET_PROBE = """
__attribute__((target("avx,avx2,fma,bmi,bmi2,avx512f,avx512cd,avx512bw,avx512dq,avx512vl")))
static void f(float *x, int n) { for (int i = 0; i < n; i++) x[i] = x[i] * 2.0f + 1.0f; }
int main(void) {
    float x[4] = {0};
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2")) f(x, 4);
    return (int)x[0];
}
"""

use_openmp = os.environ.get("FASTBP_NO_OPENMP", "0") in ("", "0") and sys.platform.startswith("linux") \
    and _compiler_accepts("-fopenmp")
use_openmp_simd = _compiles(["-fopenmp-simd"], "int f(void){return 0;}\n", link=False)
use_target_attr = _compiles([], _TARGET_PROBE)

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
# Without it GCC does not vectorise the exponential's loops for AVX2 or the baseline (it will not speculate a
# multiply past a compare, see fb_expf in _simd.h); fastbp reads no floating-point exception flags.
if _compiles(["-fno-trapping-math"], "int f(void){return 0;}\n", link=False):
    compile_args.append("-fno-trapping-math")
if use_openmp_simd:
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
                       ("FASTBP_OPENMP", "1" if use_openmp else "0"),
                       ("FASTBP_TARGET_ATTR", "1" if use_target_attr else "0")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for src in sorted(glob.glob("fastbp/*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
