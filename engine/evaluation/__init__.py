"""Research evaluation of protection schemes: accuracy, privacy, speed, in one call.

>>> from engine.evaluation import evaluate
>>> report = evaluate(schemes=["biohash:bits=256,512", "iom:m=256,q=16", "rotation"],
...                   out="eval-out")                                     # doctest: +SKIP
>>> report.record("biohash:bits=256")["eer"]                              # doctest: +SKIP

``evaluate`` mirrors ``veilface eval``; see :mod:`engine.evaluation.runner` for the protocol,
:mod:`.metrics` for the metric definitions, :mod:`.attacks` for the inversion attacks and
:mod:`.data` for the inputs (npz, photo folders, pairs.txt, synthetic).
"""
from __future__ import annotations

from .data import Dataset, load, load_npz, load_pairs, load_photo_folder, synthetic
from .runner import DEFAULT_SCHEMES, KeyPlan, evaluate, expand_schemes

__all__ = ["evaluate", "expand_schemes", "DEFAULT_SCHEMES", "KeyPlan", "Dataset", "load", "load_npz",
           "load_pairs", "load_photo_folder", "synthetic", "Report"]


def __getattr__(name: str):
    if name == "Report":
        from .report import Report
        return Report
    raise AttributeError(name)
