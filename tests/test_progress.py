"""engine.progress: a bar on a terminal, periodic plain lines elsewhere, silence when disabled."""
from __future__ import annotations

import io

from engine.progress import Progress, progress


def test_lines_when_not_a_terminal():
    out = io.StringIO()
    assert list(progress(range(5), "embed", unit="image", interval_s=0.0, stream=out)) == list(range(5))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("veilface: embed 1/5 (20%)")
    assert lines[-1].startswith("veilface: embed 5/5 (100%)") and "done in" in lines[-1]
    assert len(lines) == 6  # one per update at interval 0, plus the closing line


def test_long_interval_prints_only_the_final_line():
    out = io.StringIO()
    with Progress("import", total=None, unit="row", interval_s=3600, stream=out) as bar:
        bar.update(7)
        bar.update(3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("veilface: import 10 ") and "row/s" in lines[0]


def test_disabled_is_silent():
    out = io.StringIO()
    assert sum(progress(range(3), "x", enabled=False, stream=out)) == 3
    assert out.getvalue() == ""
