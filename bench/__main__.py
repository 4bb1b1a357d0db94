"""``python -m bench [--quick] [--json PATH] [--only NAME[,NAME]]``: see :mod:`engine.benchmark`."""
from __future__ import annotations

import sys

from engine.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
