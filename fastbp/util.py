"""Book 1's ``common/util.py`` helpers, on fastbp's kernels where there is a hot loop.

* ``im2col(input_data, filter_h, filter_w, stride=1, pad=0)`` -> (N*OH*OW, C*FH*FW) column matrix
* ``col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0)`` -> (N, C, H, W), the adjoint of im2col
* ``conv_output_size(input_size, filter_size, stride=1, pad=0)`` -> ``(input_size + 2*pad - filter_size) / stride + 1``
  (true division, as the book's: a float)

The same signatures and numbers as the book's, with two deliberate differences: the result keeps a float32
input's dtype (the book's allocate float64 whatever comes in; integer inputs give float64 like the book's), and a
filter larger than the padded input, ``stride < 1`` or ``pad < 0`` raise ValueError instead of producing an empty
or misshapen array.  Output sizes that do not divide evenly are floored, as the book's ``//`` does.
"""
import numpy as np

from fastbp import _conv
from fastbp import reference as _ref

__all__ = ["im2col", "col2im", "conv_output_size"]

_KERNEL = (np.dtype(np.float32), np.dtype(np.float64))


def _int(value, name, minimum):
    return _ref._check_int(value, name, "fastbp.util", minimum)


def conv_output_size(input_size, filter_size, stride=1, pad=0):
    """(input_size + 2*pad - filter_size) / stride + 1 (the book's formula, a float when it does not divide)."""
    return (input_size + 2 * pad - filter_size) / stride + 1


def im2col(input_data, filter_h, filter_w, stride=1, pad=0):
    """col[(n, i, j), (c, dy, dx)] = x_padded[n, c, i*stride + dy, j*stride + dx]; x (N, C, H, W)."""
    x = np.asarray(input_data)
    if x.ndim != 4:
        raise ValueError(f"im2col: input_data must be 4-D (N, C, H, W), got shape {x.shape}")
    fh, fw = _int(filter_h, "filter_h", 1), _int(filter_w, "filter_w", 1)
    stride, pad = _int(stride, "stride", 1), _int(pad, "pad", 0)
    n, c, h, w = x.shape
    oh, ow = _conv.output_size(h, w, fh, fw, stride, pad)
    dt = x.dtype if x.dtype in _KERNEL else (np.dtype(np.float64) if x.dtype.kind in "biu" else None)
    if dt is None:
        return _ref.im2col_np(x, fh, fw, stride, pad)
    x = np.ascontiguousarray(x, dtype=dt)
    col = np.empty((n * oh * ow, c * fh * fw), dt)
    return _conv.im2col(x, fh, fw, stride, pad, col)


def col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    """img[n, c, y, x] = sum of the col entries im2col read from (y, x) (padding dropped); returns (N, C, H, W)."""
    col = np.asarray(col)
    if len(input_shape) != 4:
        raise ValueError(f"col2im: input_shape must be (N, C, H, W), got {input_shape!r}")
    n, c, h, w = (_int(v, "input_shape entries", 0) for v in input_shape)
    fh, fw = _int(filter_h, "filter_h", 1), _int(filter_w, "filter_w", 1)
    stride, pad = _int(stride, "stride", 1), _int(pad, "pad", 0)
    oh, ow = _conv.output_size(h, w, fh, fw, stride, pad)
    if col.size != n * oh * ow * c * fh * fw:
        raise ValueError(f"col2im: col of shape {col.shape} does not hold ({n}*{oh}*{ow}, {c}*{fh}*{fw}) entries "
                         f"for input_shape {tuple(input_shape)}")
    dt = col.dtype if col.dtype in _KERNEL else (np.dtype(np.float64) if col.dtype.kind in "biu" else None)
    if dt is None:
        return _ref.col2im_np(col, (n, c, h, w), fh, fw, stride, pad)
    col = np.ascontiguousarray(col.reshape(n * oh * ow, c * fh * fw), dtype=dt)
    img = np.empty((n, c, h, w), dt)
    return _conv.col2im(col, fh, fw, stride, pad, img)
