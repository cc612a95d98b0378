"""``python -m fastbp.bench [options]`` (same as ``python -m fastbp bench``)."""

import sys

from fastbp.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
