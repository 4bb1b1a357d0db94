"""Run one fuzz target under atheris (coverage-guided, libFuzzer flags) -- see fuzz/README.md."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(name: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["engine", "fuzz"]):
        from fuzz import gen, targets
    target = targets.TARGETS[name]
    if name in ("he_blob", "he_context"):
        gen.he_material()            # key generation outside the timed loop
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
