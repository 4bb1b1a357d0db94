"""``veilface bench``: the same harness as ``python -m bench``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from . import add_arguments  # light: the suites import their heavy modules only when run
    p = sub.add_parser("bench", help="benchmark kernels and schemes against faiss/numpy/TenSEAL",
                       description="Runs the benchmark suites (ours vs baselines, same data, one process), "
                                   "prints a markdown table; --json writes the records.")
    add_arguments(p).set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from . import run_from_args
    return run_from_args(args)
