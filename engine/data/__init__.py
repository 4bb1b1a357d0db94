"""Data shipped inside the package: ``eval-report.json`` is a copy of ``docs/eval/report.json``
(the repository's ``veilface eval`` report), so a matcher-only install without the ``[eval]`` extra
can still prefill an impact assessment with measured figures (``veilface demo``, ``pia draft``).
``tests/test_packaging.py`` checks that the two copies are identical."""
from __future__ import annotations

from pathlib import Path

EVAL_REPORT = Path(__file__).resolve().parent / "eval-report.json"

__all__ = ["EVAL_REPORT"]
