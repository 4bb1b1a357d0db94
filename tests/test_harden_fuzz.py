"""The fuzz targets of ``fuzz/`` in the test suite: a short hypothesis run of each (the same
structure-aware generators the long atheris runs use), and a replay of every input a fuzzer ever
crashed on (``fuzz/regressions/<target>/``) plus the hostile inputs of issue 10 as seeds."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets

REGRESSIONS = Path(__file__).resolve().parent.parent / "fuzz" / "regressions"
SHORT = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SHORT
@given(st.binary(min_size=1, max_size=512))
def test_template_frames(data):
    targets.template(data)


@SHORT
@given(st.binary(min_size=1, max_size=512))
def test_he_blobs(data):
    pytest.importorskip("tenseal")
    targets.he_blob(data)


@SHORT
@given(st.binary(min_size=1, max_size=512))
def test_he_contexts(data):
    pytest.importorskip("tenseal")
    targets.he_context(data)


@SHORT
@given(st.binary(min_size=1, max_size=700))
def test_page_tokens(data):
    targets.page_token(data)


@SHORT
@given(st.binary(min_size=1, max_size=1024))
def test_requests(data):
    targets.requests(data)


def _corpus():
    if not REGRESSIONS.is_dir():
        return []
    return [pytest.param(d.name, f, id=f"{d.name}/{f.name}") for d in sorted(REGRESSIONS.iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]


@pytest.mark.parametrize("target,path", _corpus())
def test_regression_inputs(target, path):
    if target.startswith("he"):
        pytest.importorskip("tenseal")
    targets.TARGETS[target](path.read_bytes())
