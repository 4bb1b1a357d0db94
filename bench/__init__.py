"""Benchmarks (``python -m bench``) and pytest-benchmark suites (``pytest bench/ --benchmark-only``).

Not collected by ``make test`` (pytest's testpaths is ``tests``).
"""
