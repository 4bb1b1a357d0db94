"""``veilface bench``: the same harness as ``python -m bench``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark kernels and schemes against faiss/numpy/TenSEAL",
                       description="Runs the benchmark suites (ours vs baselines, same data, one process) "
                                   "and prints a markdown table; --json writes the records.",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the harness (see --help)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from . import main
    return int(main(args.args) or 0)
