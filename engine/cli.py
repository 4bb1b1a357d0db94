"""``veilface`` command line. Each area registers its own sub-commands (lazily imported)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ._optional import MissingDependency

# module -> function(subparsers); each sets ``func(args) -> int`` on its parsers.
# Registration must be cheap: heavy imports happen inside the handlers.
_COMMAND_MODULES = (
    "engine.benchmark.commands",
    "engine.service.commands",
    "engine.keyservice.commands",   # keysvc
    "engine.evaluation.commands",
    "engine.face.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilface", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"veilface {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except MissingDependency:
            continue  # that area needs an extra that is not installed (its error names the extra)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that area is not part of this build
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from . import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import VeilfaceError
    try:
        return int(args.func(args) or 0)
    except VeilfaceError as exc:
        print(f"veilface: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
