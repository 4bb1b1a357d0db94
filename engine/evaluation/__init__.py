"""Research evaluation of protection schemes: accuracy, privacy, speed, in one call.

>>> from engine.evaluation import evaluate
>>> report = evaluate(schemes=["biohash:bits=256,512", "iom:m=256,q=16", "rotation"],
...                   out="eval-out")                                     # doctest: +SKIP
>>> report.record("biohash:bits=256")["eer"]                              # doctest: +SKIP

``evaluate`` mirrors ``veilface eval``. Module map:

* :mod:`.protocol` -- keys of each side of a comparison, pair sets, scenarios (written into
  every report); :mod:`.scores` -- scores of the pairs under that protocol;
* :mod:`.studies` -- one module per study (accuracy, folds, unlinkability, irreversibility,
  renewability, encrypted), each returning a dataclass; :mod:`.records` -- those dataclasses
  as ``report.json`` records;
* :mod:`.runner` -- one run; :mod:`.sweep` -- scheme lists; :mod:`.report` / :mod:`.plots`
  -- report.md, report.json, PNGs;
* :mod:`.data`, :mod:`.pairsfile`, :mod:`.labels` -- inputs (npz, photo folders, pairs files,
  labels files, synthetic); :mod:`.metrics`, :mod:`.attacks` -- metric definitions and
  inversion attacks. Speed and size: :mod:`engine.benchmark.schemes`.
"""
from __future__ import annotations

from .data import Dataset, load, load_npz, load_photo_folder, synthetic
from .pairsfile import load_pairs
from .protocol import DEFAULT_SCHEMES, KeyPlan
from .runner import evaluate
from .sweep import expand_schemes

__all__ = ["evaluate", "expand_schemes", "DEFAULT_SCHEMES", "KeyPlan", "Dataset", "load", "load_npz",
           "load_pairs", "load_photo_folder", "synthetic", "Report"]


def __getattr__(name: str):
    if name == "Report":
        from .report import Report
        return Report
    raise AttributeError(name)
