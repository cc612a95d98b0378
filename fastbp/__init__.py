__version__ = "0.1.0"

from fastbp import _runtime as _rt

try:
    _rt.apply()  # before any kernel module loads libgomp (see fastbp/_runtime.py)
except ImportError:  # extensions not built: fastbp.reference and the pure-Python parts still import
    pass
except ValueError:  # a bad FASTBP_* setting: raised again by every module that needs it (fastbp._blas at
    pass  # import), so `import fastbp.layers` fails and `python -m fastbp` reports it on one line
