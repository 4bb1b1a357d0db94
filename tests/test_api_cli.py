"""Service CLI: store safety (one server per data dir, offline writes refuse beside a live server
or go through it, honest deletion certificates, read-only tools beside a live server) and
operator mistakes as one line on stderr with a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.cli import build_parser, main
from engine.client import LocationClass, ServiceError
from engine.service.config import load_config
from engine.service.lock import DataDirLock, DataDirLocked, is_locked
from engine.service.server import VeilfaceServer
from engine.service.status import BadRequest
from tests.support import NOTICE, TOKENS, capture, faces, make_config, running_server

ROOT = Path(__file__).resolve().parents[1]
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def cli(*argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m engine.cli ARGV`` in a child process (what an operator runs)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("VEILFACE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one line on stderr; returns it."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, r
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("veilface: error: "), lines[0]
    return lines[0]


@pytest.fixture
def live(tmp_path):
    """A running server with one enrolled subject; the data dir is tmp_path / "data"."""
    with running_server(tmp_path / "data") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        face = faces(1, seed=3)[0]
        c = dev.record_consent("subject-1", NOTICE, 30)
        dev.enroll("subject-1", face, c.consent_id)
        s.face, s.dev, s.data = face, dev, tmp_path / "data"
        yield s


def verifies(s) -> bool:
    return s.dev.verify("subject-1", capture(s.face, np.random.default_rng(1))).matched


# -- one server per data dir ----------------------------------------------------------------------------
def test_a_second_server_on_the_same_data_dir_refuses(live):
    with pytest.raises(DataDirLocked) as ei:
        VeilfaceServer(make_config(live.data))
    assert ei.value.reason == "DATA_DIR_LOCKED"
    assert str(os.getpid()) in str(ei.value) and live.target in str(ei.value)
    assert verifies(live)                                   # the running one is unaffected


def test_a_second_veilface_serve_says_so_in_one_line(live):
    line = one_error_line(cli("serve", "--data-dir", str(live.data), "--port", "0"))
    assert "is in use by veilface serve" in line and live.target in line


def test_the_lock_is_released_when_the_server_stops(tmp_path):
    with running_server(tmp_path / "d"):
        assert is_locked(tmp_path / "d")
    assert not is_locked(tmp_path / "d")
    with running_server(tmp_path / "d"):                    # and a restart takes it again
        assert is_locked(tmp_path / "d")


def test_a_server_that_fails_to_start_releases_the_lock(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(BadRequest, match="already in use"):
            VeilfaceServer(make_config(tmp_path / "d", port=busy.getsockname()[1]))
    finally:
        busy.close()
    assert not is_locked(tmp_path / "d")


def test_lock_holder_record_and_release(tmp_path):
    lock = DataDirLock(tmp_path, what="veilface test").acquire(target="h:1")
    with pytest.raises(DataDirLocked, match=r"veilface test \(pid \d+, h:1\)"):
        DataDirLock(tmp_path).acquire()
    lock.release()
    DataDirLock(tmp_path).acquire().release()


# -- offline writes beside a live server ------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["purge"], ["decommission", "--yes"]])
def test_offline_writes_refuse_while_a_server_runs(live, capsys, argv):
    assert main([*argv, "--data-dir", str(live.data)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "in use by veilface serve" in err
    assert f"--target {live.target}" in err                 # says how to do it through the server
    assert verifies(live)                                   # nothing was deleted
    assert live.store.counts().templates_stored == 1
    assert not list(live.data.glob("deletion-certificate-*.json"))


def test_decommission_through_the_running_server(live, tmp_path, capsys):
    token = tmp_path / "admin.token"
    token.write_text(TOKENS["admin"] + "\n")
    assert main(["decommission", "--yes", "--reason", "end of service", "--target", live.target,
                 "--token-file", str(token)]) == 0
    cert = json.loads(capsys.readouterr().out)
    assert cert["templates_deleted"] == 1 and cert["mode"].startswith("online")
    assert any("in-memory galleries" in m for m in cert["measures"])
    with pytest.raises(ServiceError) as ei:                 # the running server forgot the subject too
        live.dev.verify("subject-1", live.face)
    assert ei.value.code == grpc.StatusCode.NOT_FOUND


def test_purge_through_the_running_server(live, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VEILFACE_TOKEN", TOKENS["operator"])
    assert main(["purge", "--target", live.target]) == 0
    assert "purged 0 expired templates" in capsys.readouterr().out


def test_purge_through_the_server_needs_a_token(live, capsys, monkeypatch):
    monkeypatch.delenv("VEILFACE_TOKEN", raising=False)
    assert main(["purge", "--target", live.target]) == 1
    assert "needs a token" in capsys.readouterr().err


def test_offline_decommission_certificate_says_only_what_was_done(tmp_path, capsys):
    with running_server(tmp_path / "data") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        c = dev.record_consent("subject-1", NOTICE, 30)
        dev.enroll("subject-1", faces(1)[0], c.consent_id)
    assert main(["decommission", "--yes", "--data-dir", str(tmp_path / "data")]) == 0
    cert = json.loads(capsys.readouterr().out)
    assert cert["templates_deleted"] == 1 and cert["mode"].startswith("offline")
    assert not any("in-memory" in m for m in cert["measures"])
    assert not is_locked(tmp_path / "data")


def test_decommission_without_yes_does_nothing(live, capsys):
    assert main(["decommission", "--data-dir", str(live.data)]) == 2
    assert "--yes" in capsys.readouterr().err
    assert verifies(live)


# -- read-only tools beside a live server -------------------------------------------------------------------
def test_read_only_tools_work_beside_a_live_server(live, capsys):
    d = str(live.data)
    assert main(["audit", "verify", "--data-dir", d]) == 0
    assert "audit chain OK" in capsys.readouterr().out
    assert main(["audit", "verify", "--json", "--data-dir", d]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["report", "--json", "--data-dir", d]) == 0
    assert json.loads(capsys.readouterr().out)["persons_stored"] == 1
    assert main(["audit", "show", "--data-dir", d, "--last", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(ISO.search(ln) for ln in lines)
    assert verifies(live)


def test_audit_show_json_and_filters(live, capsys):
    assert main(["audit", "show", "--json", "--action", "Enroll", "--data-dir", str(live.data)]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["action"] for r in rows] == ["Enroll"] and rows[0]["subject"] == "subject-1"
    assert ISO.fullmatch(rows[0]["time"]) and rows[0]["details"]["scheme"] == "biohash"


def test_report_text_has_readable_times(live, capsys):
    assert main(["report", "--data-dir", str(live.data)]) == 0
    out = capsys.readouterr().out
    assert ISO.search(out.splitlines()[0]) and "next expiry" in out


def test_read_only_tool_on_a_missing_store(tmp_path, capsys):
    assert main(["report", "--data-dir", str(tmp_path / "nothing")]) == 1
    assert "no store in" in capsys.readouterr().err


# -- operator mistakes: one line, non-zero exit, what to do next -----------------------------------------------
def test_audit_without_an_action(capsys):
    assert main(["audit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "veilface: error: veilface audit needs an action: verify | show (see veilface audit --help)"


def test_token_json(capsys):
    assert main(["token", "--role", "device", "--device-id", "gate-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token"].startswith("vf_device_") and out["config_entry"]["device_id"] == "gate-1"
    assert len(out["config_entry"]["sha256"]) == 64


def _service_parsers() -> list[argparse.ArgumentParser]:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name in ("serve", "demo", "audit", "report", "purge", "decommission", "token"):
        p = sub.choices[name]
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                out.extend(a.choices.values())
    return out


def test_every_flag_of_the_service_commands_has_help():
    missing = [f"{p.prog} {'/'.join(a.option_strings)}" for p in _service_parsers() for a in p._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []


def test_config_file_not_found(tmp_path):
    with pytest.raises(BadRequest, match=r"config file .*nope.toml not found"):
        load_config(str(tmp_path / "nope.toml"), env={})


def test_toml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "veilface.toml"
    f.write_text('port = 50051\nhost = "127.0.0.1\n')
    with pytest.raises(BadRequest, match=rf"^{re.escape(str(f))}:2: TOML syntax error"):
        load_config(str(f), env={})


def test_json_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "veilface.json"
    f.write_text('{\n "port": 1,\n "host": }\n')
    with pytest.raises(BadRequest, match=rf"^{re.escape(str(f))}:3: JSON syntax error"):
        load_config(str(f), env={})


def test_wrong_type_names_file_line_and_key(tmp_path):
    f = tmp_path / "veilface.toml"
    f.write_text('[veilface]\nhost = "127.0.0.1"\nport = "fifty"\n')
    with pytest.raises(BadRequest, match=rf"^{re.escape(str(f))}:3: port must be an integer, got 'fifty'"):
        load_config(str(f), env={})


def test_unknown_key_names_file_and_line(tmp_path):
    f = tmp_path / "veilface.toml"
    f.write_text('port = 1\nretention = 30\n')
    with pytest.raises(BadRequest, match=rf"^{re.escape(str(f))}:2: unknown config key retention"):
        load_config(str(f), env={})


def test_bad_environment_variable_is_named():
    with pytest.raises(BadRequest, match=r"^\$VEILFACE_PORT: must be an integer, got 'abc'"):
        load_config(env={"VEILFACE_PORT": "abc"})
    with pytest.raises(BadRequest, match=r"^\$VEILFACE_PORT: port must be in \[0, 65535\]"):
        load_config(env={"VEILFACE_PORT": "70000"})


def test_allow_remote_alone_is_refused_not_ignored():
    with pytest.raises(BadRequest, match=r"^--allow-remote: allow_remote has no effect while host is the loopback"):
        load_config(env={}, allow_remote=True)


def test_bad_config_file_fails_serve_in_one_line(tmp_path):
    f = tmp_path / "veilface.toml"
    f.write_text('port = [\n')
    line = one_error_line(cli("serve", "--config", str(f), "--data-dir", str(tmp_path / "d")))
    assert f"{f}:1: TOML syntax error" in line


def test_allow_remote_alone_fails_serve_in_one_line(tmp_path):
    line = one_error_line(cli("serve", "--allow-remote", "--data-dir", str(tmp_path / "d")))
    assert "--allow-remote" in line and "--host" in line


def test_port_in_use_fails_serve_in_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        line = one_error_line(cli("serve", "--port", str(busy.getsockname()[1]), "--data-dir", str(tmp_path / "d")))
    finally:
        busy.close()
    assert "already in use" in line and "--port" in line


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    from tests.test_service_tls import _cert
    d = tmp_path_factory.mktemp("pems")
    _, _, cert, key = _cert("localhost")
    _, _, _, other_key = _cert("other")
    for name, data in {"cert": cert, "key": key, "other_key": other_key, "junk": b"not a pem\n"}.items():
        (d / f"{name}.pem").write_bytes(data)
    return {n: str(d / f"{n}.pem") for n in ("cert", "key", "other_key", "junk")}


@pytest.mark.parametrize("cert,key,expect", [
    ("missing", "key", r"tls_cert .*missing.pem: file not found \(--tls-cert\)"),
    ("cert", "missing", r"tls_key .*missing.pem: file not found \(--tls-key\)"),
    ("junk", "key", r"tls_cert .*junk.pem: not a PEM certificate"),
    ("cert", "junk", r"tls_key .*junk.pem: not a PEM private key"),
    ("cert", "other_key", r"tls_key .*other_key.pem does not belong to the certificate"),
])
def test_tls_file_mistakes_are_named(tmp_path, pems, cert, key, expect):
    path = lambda n: pems.get(n, str(tmp_path / f"{n}.pem"))  # noqa: E731
    with pytest.raises(BadRequest, match=expect) as ei:
        VeilfaceServer(make_config(tmp_path / "d", tls_cert=path(cert), tls_key=path(key)))
    assert ei.value.reason == "BAD_TLS"
    assert not is_locked(tmp_path / "d")


def test_wrong_key_fails_serve_in_one_line(tmp_path, pems):
    line = one_error_line(cli("serve", "--tls-cert", pems["cert"], "--tls-key", pems["other_key"],
                              "--data-dir", str(tmp_path / "d")))
    assert "does not belong to the certificate" in line and "bind" not in line.lower()


def test_metrics_port_in_use_fails_serve_in_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        line = one_error_line(cli("serve", "--port", "0", "--metrics-port", str(busy.getsockname()[1]),
                                  "--data-dir", str(tmp_path / "d")))
    finally:
        busy.close()
    assert "already in use" in line and "--metrics-port" in line
    assert not (tmp_path / "d" / "tokens.json").exists()      # refused before anything was written
