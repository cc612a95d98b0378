"""Alias of :mod:`fastbp.optimizer` (the book's module name, ``common/optimizer.py``, is singular).

``import fastbp.optimizers`` gives the very module ``fastbp.optimizer``: same classes, same objects, so code
written against either name works and ``isinstance`` checks agree.
"""

import sys

from fastbp import optimizer as _optimizer

sys.modules[__name__] = _optimizer
