"""Benchmark harness: ours vs baselines, same data, same process, interleaved repeats.

``python -m bench [--quick] [--json PATH] [--only NAME[,NAME]]`` and ``veilface bench`` both call
:func:`main`. A *suite* is a function ``run(quick: bool) -> list[dict]`` returning records (see
:func:`record`); suites are registered by module path in :data:`SUITES` so importing this
harness imports nothing heavy (faiss, tenseal, ...). Adding a suite is one line::

    SUITES["he"] = "engine.benchmark.he:run"

or, from another module, ``register_suite("name", func_or_"module:function")``. A listed suite
whose module does not exist (yet) is skipped with a note on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable

SuiteFn = Callable[[bool], list]

#: suite name -> "module:function" (or a callable). Order = run order.
SUITES: dict[str, str | SuiteFn] = {
    "kernels": "engine.benchmark.kernels:run",
    "he": "engine.benchmark.he:run",
    "schemes": "engine.benchmark.schemes:run",
}

#: keys every record has (extra keys are allowed: "max_abs_err", "gb_per_s", "note", ...)
RECORD_KEYS = ("name", "n", "dim_or_bits", "queries", "ours_s", "baseline", "baseline_s", "speedup")


def register_suite(name: str, func: str | SuiteFn) -> None:
    """Register (or replace) a suite: a callable ``f(quick) -> list[dict]`` or ``"module:function"``."""
    SUITES[name] = func


# ------------------------------------------------------------------------------------------
# timing
def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                  budget_s: float | None = None, settle_s: float = 0.0) -> dict[str, float]:
    """Median time of each function, measured with interleaved repeats (A B A B ...), so that
    drift in machine load hits every contender alike. ``budget_s`` caps the repeats for slow
    functions (at least 3 repeats are kept). ``settle_s`` sleeps before every timed call so
    that worker threads left spinning by the previous contender (OpenBLAS, OpenMP) have gone
    idle and do not steal cores from the next one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(max(1, repeats)):
        for name, fn in fns.items():
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def record(name: str, n: int, dim_or_bits, queries: int, ours_s: float, baseline: str,
           baseline_s: float | None, **extra) -> dict:
    """One result row. ``speedup = baseline_s / ours_s`` (None when there is no baseline)."""
    speedup = (baseline_s / ours_s) if (baseline_s and ours_s) else None
    rec = {"name": name, "n": int(n), "dim_or_bits": dim_or_bits, "queries": int(queries),
           "ours_s": float(ours_s), "baseline": baseline,
           "baseline_s": None if baseline_s is None else float(baseline_s), "speedup": speedup}
    rec.update(extra)
    return rec


# ------------------------------------------------------------------------------------------
# running and reporting
def _resolve(spec: str | SuiteFn) -> SuiteFn | None:
    if callable(spec):
        return spec
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            return None  # the suite's own module is not there (yet)
        raise
    return getattr(mod, fn_name or "run")


def run_suites(names: Iterable[str] | None = None, quick: bool = False,
               stderr=sys.stderr) -> tuple[list[dict], list[str]]:
    """Run suites (all registered ones by default). Returns (records, names of failed suites)."""
    records: list[dict] = []
    failed: list[str] = []
    for name in (list(names) if names else list(SUITES)):
        if name not in SUITES:
            print(f"bench: unknown suite {name!r} (known: {', '.join(SUITES)})", file=stderr)
            failed.append(name)
            continue
        try:
            fn = _resolve(SUITES[name])
        except Exception as exc:  # noqa: BLE001 - one broken suite must not hide the others
            print(f"bench: suite {name!r} failed to import: {type(exc).__name__}: {exc}", file=stderr)
            failed.append(name)
            continue
        if fn is None:
            print(f"bench: suite {name!r} skipped: module {SUITES[name]} not found", file=stderr)
            continue
        t0 = time.perf_counter()
        try:
            recs = fn(quick)
        except Exception as exc:  # noqa: BLE001
            import traceback

            from .._optional import MissingDependency
            if not isinstance(exc, MissingDependency):  # a missing extra is one line, not a traceback
                traceback.print_exc(file=stderr)
            print(f"bench: suite {name!r} failed: {type(exc).__name__}: {exc}", file=stderr)
            failed.append(name)
            continue
        for r in recs:
            r.setdefault("suite", name)
        records.extend(recs)
        print(f"bench: suite {name!r}: {len(recs)} rows in {time.perf_counter() - t0:.1f} s", file=stderr)
    return records, failed


def machine_line() -> str:
    """CPU model, cores and the SIMD path of the kernels, for the report header."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    simd = "?"
    try:
        from engine import kernels
        simd = kernels.simd_level()
    except Exception:  # noqa: BLE001
        pass
    return f"{model}, {os.cpu_count()} cores, kernels SIMD path: {simd}, Python {platform.python_version()}"


def _fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def format_table(records: list[dict]) -> str:
    """Markdown table of records."""
    head = "| name | n | dim/bits | queries | ours | baseline | baseline time | speedup | notes |"
    lines = [head, "|" + "---|" * 9]
    for r in records:
        extras = []
        for key in ("gb_per_s", "templates_per_s", "max_abs_err", "numpy_s", "note"):
            if r.get(key) is None:
                continue
            v = r[key]
            if key == "gb_per_s":
                extras.append(f"{v:.1f} GB/s")
            elif key == "templates_per_s":
                extras.append(f"{v:,.0f} templates/s")
            elif key == "max_abs_err":
                extras.append(f"max err {v:.2g}")
            elif key == "numpy_s":
                extras.append(f"numpy {_fmt_time(v)}")
            else:
                extras.append(str(v))
        sp = r.get("speedup")
        lines.append(f"| {r['name']} | {r['n']:,} | {r['dim_or_bits']} | {r['queries']} | "
                     f"{_fmt_time(r['ours_s'])} | {r.get('baseline') or '-'} | {_fmt_time(r.get('baseline_s'))} | "
                     f"{'-' if sp is None else f'{sp:.2f}x'} | {'; '.join(extras)} |")
    return "\n".join(lines)


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The harness options (shared by ``python -m bench`` and ``veilface bench``)."""
    ap.add_argument("--quick", action="store_true", help="small sizes (whole run well under a minute per suite)")
    ap.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    ap.add_argument("--only", metavar="NAME[,NAME]", help=f"suites to run (default all: {', '.join(SUITES)})")
    ap.add_argument("--list", action="store_true", help="list the registered suites and exit")
    return ap


def run_from_args(args: argparse.Namespace) -> int:
    """Run suites as the parsed options say: markdown table on stdout, optional JSON records."""
    if args.list:
        for name, spec in SUITES.items():
            print(f"{name}\t{spec if isinstance(spec, str) else getattr(spec, '__qualname__', spec)}")
        return 0
    names = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    records, failed = run_suites(names, quick=args.quick)
    print(f"Machine: {machine_line()}\n")
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2, default=_json_default)
        print(f"\nwrote {len(records)} records to {args.json}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``python -m bench``."""
    ap = add_arguments(argparse.ArgumentParser(
        prog="python -m bench",
        description="Veilface benchmarks: ours vs baselines (faiss, numpy, TenSEAL) on the same data in one process."))
    return run_from_args(ap.parse_args(argv))


__all__ = ["SUITES", "RECORD_KEYS", "register_suite", "median_time", "compare_times", "record",
           "run_suites", "format_table", "machine_line", "add_arguments", "run_from_args", "main"]
