"""NumPy helpers shared by the plain-NumPy layers of both books (fastbp.reference, fastbp.reference_time) and
fastbp.functions: a module of their own so that neither reference module has to import the other."""

import numpy as np


def stable_sigmoid(x):
    """1 / (1 + exp(-x)) evaluated as exp(-|x|)-based branches (no overflow)."""
    flat = x.reshape(-1)  # 1-D so that every ufunc below returns an array
    e = np.abs(flat)
    np.negative(e, out=e)
    np.exp(e, out=e)  # e = exp(-|x|) in (0, 1]
    d = e + 1
    out = np.divide(e, d)  # x < 0 branch: exp(x) / (1 + exp(x))
    np.divide(1, d, out=out, where=flat >= 0)  # x >= 0 branch: 1 / (1 + exp(-x))
    return out.reshape(x.shape)
