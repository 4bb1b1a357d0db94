"""Packaging: the extras in pyproject.toml, and a matcher-only install that works without them.

Building a fresh venv with only ``.[server]`` is too slow for the suite (CI does it:
``.ci/wheel-smoke``). Here the optional packages are *blocked* in a subprocess (a
``sys.meta_path`` finder that refuses them) and the matcher must still work: ``veilface --help``,
a whole in-process serve / enrol / verify / identify with BioHash (``veilface demo
--in-process``), while each optional feature fails with one clear line naming its extra.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine._optional import EXTRAS, MissingDependency, installed, require, require_extra
from engine.errors import VeilfaceError

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = sorted(EXTRAS)  # import names of every package that only an extra installs

# Refuses the optional packages as if they were not installed (what a [server]-only venv looks like).
_BLOCKER = textwrap.dedent(f"""
    import sys
    class _Blocker:
        blocked = {BLOCKED!r}
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, _Blocker())
""")


def _run_blocked(code: str, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "VEILFACE_MODEL_DIR": str(tmp_path / "models")}  # never touch the real model cache
    env.pop("VEILFACE_DLIB_MODELS", None)
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cli_blocked(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return _run_blocked(f"from engine.cli import main\nsys.exit(main({args!r}))", tmp_path)


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist(requirement: str) -> str:
    name = requirement.split(";")[0]
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.strip().lower()


# -- pyproject.toml ---------------------------------------------------------------------------
def test_extras_agree_with_the_optional_map():
    project = _pyproject()["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {k: {_dist(r) for r in v} for k, v in project["optional-dependencies"].items()}
    for module, (dist, extra) in EXTRAS.items():
        assert dist in extras[extra], f"{module}: {dist} should be in the [{extra}] extra"
        assert dist not in core, f"{dist} is optional ([{extra}]) but listed in the core dependencies"
    listed = {d for k, deps in extras.items() if k not in ("test", "all") for d in deps}
    assert listed == {d for d, _ in EXTRAS.values()}, "every optional package needs an engine._optional entry"
    assert set(extras) >= {"server", "face", "eval", "he", "faiss", "all", "test"}
    all_extra = project["optional-dependencies"]["all"]
    assert len(all_extra) == 1 and all_extra[0].startswith("veilface[")
    assert set(all_extra[0].split("[")[1].rstrip("]").split(",")) == set(extras) - {"all", "test"}
    assert "tomli>=2; python_version < '3.11'" in project["dependencies"]


# -- engine._optional -------------------------------------------------------------------------
def test_require_returns_an_installed_module():
    import numpy
    assert require("numpy") is numpy
    assert installed("numpy") and not installed("veilface_no_such_module")


def test_require_names_the_extra():
    with pytest.raises(MissingDependency) as info:
        require("veilface_no_such_module", extra="he", feature="encrypted matching")
    err = info.value
    assert isinstance(err, ImportError) and isinstance(err, VeilfaceError)
    assert str(err) == ("encrypted matching needs 'veilface_no_such_module', which is not installed: "
                        "pip install 'veilface[he]'")
    assert err.__suppress_context__  # no chained ModuleNotFoundError traceback


def test_require_does_not_hide_a_broken_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "veilface_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import veilface_missing_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("veilface_broken_pkg", extra="he")
    assert not isinstance(info.value, MissingDependency)
    assert info.value.name == "veilface_missing_inner_dependency"


def test_require_extra_checks_without_importing(monkeypatch):
    monkeypatch.setitem(EXTRAS, "veilface_no_such_module", ("veilface-no-such-dist", "eval"))
    with pytest.raises(MissingDependency, match=r"'veilface-no-such-dist'.*pip install 'veilface\[eval\]'"):
        require_extra("eval")


# -- a matcher-only install -------------------------------------------------------------------
def test_matcher_works_without_the_optional_packages(tmp_path):
    """Import the service and client, run the whole scripted scenario in-process with BioHash."""
    r = _run_blocked("""
        import engine.service, engine.client, engine.gallery, engine.schemes, engine.cli
        from engine.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        rc = main(["demo", "--in-process", "--scheme", "biohash:bits=256,dim=128", "--subjects", "20"])
        assert rc == 0, rc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in _Blocker.blocked)
        assert not loaded, loaded
        print("MATCHER-ONLY OK")
    """, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "MATCHER-ONLY OK" in r.stdout
    assert "demo PASSED" in r.stdout


def test_optional_features_fail_with_the_extra_to_install(tmp_path):
    r = _run_blocked("""
        import numpy as np
        from engine.errors import VeilfaceError
        from engine.gallery import make_gallery
        from engine.schemes import make_scheme

        def expect(extra, fn, *args, **kw):
            try:
                fn(*args, **kw)
            except VeilfaceError as exc:  # MissingDependency, or ModelNotFound for the face models
                assert f"pip install 'veilface[{extra}]'" in str(exc), str(exc)
                print("OK", extra, "|", type(exc).__name__, "|", exc)
            else:
                raise AssertionError(f"{fn} did not raise")

        expect("he", make_scheme, "he:dim=128,mode=identify")
        expect("faiss", make_gallery, make_scheme("biohash:bits=256,dim=128"), backend="faiss")
        from engine.face import embed_image  # importing the face package is cheap; using it is not
        expect("face", embed_image, np.zeros((64, 64, 3), np.uint8))
        expect("face", __import__("engine.face.pipeline", fromlist=["x"]).load_image, "photo.jpg")
        from engine.evaluation.plots import plot_all  # importable; drawing needs [eval]
        expect("eval", plot_all, [], False, ".")
    """, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("OK ") == 5, r.stdout


@pytest.mark.parametrize("args, extra", [
    (["eval", "--quick"], "eval"),
    (["models", "build", "--force"], "face"),
])
def test_cli_says_which_extra_in_one_line(tmp_path, args, extra):
    r = _cli_blocked(args, tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("veilface: error:") and f"pip install 'veilface[{extra}]'" in lines[0], lines


def test_the_shipped_eval_report_is_the_documented_one():
    """engine/data/eval-report.json (in the wheel, for installs without [eval]) is docs/eval/report.json."""
    from pathlib import Path

    from engine.data import EVAL_REPORT
    docs = Path(__file__).resolve().parents[1] / "docs" / "eval" / "report.json"
    assert EVAL_REPORT.read_bytes() == docs.read_bytes()


def test_key_service_serves_cancellable_keys_without_the_he_extra(tmp_path):
    """A [server]-only install runs the key service for cancellable schemes (HE calls name [he])."""
    r = _run_blocked("""
        from engine.keyservice.client import KeyServiceClient
        from engine.keyservice.config import KeyServiceConfig
        from engine.keyservice.server import KeyServiceServer
        from engine.schemes import make_scheme
        cfg = KeyServiceConfig(port=0, data_dir="ks", workers=2)
        cfg.add_token("device", "test-ks-token-device-bound", name="gate", device_id="gate-1")
        srv = KeyServiceServer(cfg.validate(), kek=bytes(range(32))).start()
        try:
            c = KeyServiceClient(srv.target, "test-ks-token-device-bound", pinned_key=srv.public_key_hex)
            spec = make_scheme("biohash:bits=256,dim=128").spec.key()
            key = c.release_key("access_control", spec, "VERIFY", subject="alice", key_version=1).key
            assert len(key) == 32, len(key)
            c.close()
        finally:
            srv.stop(0)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in _Blocker.blocked)
        assert not loaded, loaded
        print("KEY SERVICE OK")
    """, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "KEY SERVICE OK" in r.stdout
