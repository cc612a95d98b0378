"""Workspaces: the arrays a layer, network or optimizer owns and reuses from call to call.

One mechanism for every buffer cache in fastbp.  A workspace hands out two kinds of arrays:

* results given back to the caller (``result``): a new array at every call, unless ``reuse`` is on, in which case
  the array of the previous call of the same name, shape and dtype is handed out again (the caller must copy what
  it wants to keep);
* private scratch (``scratch``, ``as_dtype``, ``cast``): operands converted for a kernel and other arrays the owner
  never hands out, always reused for the same name, shape and dtype whatever ``reuse`` says.

A workspace, like the layer owning it, is not thread-safe: use one instance per thread.
"""

import numpy as np

__all__ = ["Workspace"]


def _aligned_empty(shape, dtype, order, align):
    """np.empty(shape, dtype, order=order) whose data starts at a multiple of `align` bytes."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + align, np.uint8)
    skip = -raw.ctypes.data % align
    flat = raw[skip : skip + count * dtype.itemsize].view(dtype)
    return flat.reshape(shape, order=order)


class Workspace:
    """Named arrays reused between calls of the same shape and dtype (see the module docstring)."""

    __slots__ = ("_bufs", "reuse")

    def __init__(self, reuse=True):
        self.reuse = bool(reuse)
        self._bufs = {}

    def scratch(self, name, shape, dtype, order="C", align=None):
        """A private buffer: the same array at every call with the same name, shape, dtype and memory order
        ("C" or "F", e.g. an optimizer's gradient converted into its parameter's layout).  `align`: its first
        byte at a multiple of that many bytes (a kernel whose threads each write whole cache lines of it)."""
        key = name if order == "C" else (name, order)
        a = self._bufs.get(key)
        if a is None or a.shape != shape or (a.dtype is not dtype and a.dtype != dtype):
            a = np.empty(shape, dtype, order=order) if not align else _aligned_empty(shape, dtype, order, align)
            self._bufs[key] = a
        return a

    def result(self, name, shape, dtype, src=None):
        """A buffer for a result handed back to the caller: new each call unless `reuse` is on.

        With `reuse`, an input `src` that is (a view of) the buffer this name handed out last time -- the owner's
        previous output fed back in -- gets the other of two buffers, so outputs never overwrite their input."""
        if not self.reuse:
            return np.empty(shape, dtype)
        a = self._bufs.get(name)
        if a is None or a.shape != shape or (a.dtype is not dtype and a.dtype != dtype):
            a = self._bufs[name] = np.empty(shape, dtype)
        if src is not None and (src is a or src.base is a):
            a = self.scratch(name + "'", shape, dtype)
        return a

    get = result  # the name layers used before this module existed

    def as_dtype(self, name, a, dtype):
        """`a` as a C-contiguous array of `dtype` (a native dtype): itself if it is one, else a copy into scratch."""
        if a.dtype == dtype and a.dtype.isnative and a.flags.c_contiguous:
            return a
        out = self.scratch(name, a.shape, dtype)
        np.copyto(out, a, casting="unsafe")
        return out

    def cast(self, name, a, dtype):
        """`a` itself if it has `dtype`, else converted into scratch (any layout kept as C order)."""
        if a.dtype == dtype:
            return a
        out = self.scratch(name, a.shape, dtype)
        np.copyto(out, a, casting="unsafe")
        return out

    def clear(self):
        """Forget every buffer (they are allocated again at the next call)."""
        self._bufs.clear()
