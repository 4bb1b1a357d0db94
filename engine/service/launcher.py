"""Start a ``veilface serve`` subprocess on an ephemeral loopback port (demo, tests, bench)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import ROLES, hash_token, new_token


def write_config(data_dir: str | os.PathLike, tokens: dict[str, str] | None = None, **settings) -> tuple[Path, dict]:
    """Write ``<data_dir>/veilface.json`` with hashed role tokens (fresh ones if not given)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokens or {r: new_token(r) for r in ROLES}
    cfg = {"data_dir": str(data_dir), "port": 0, "host": "127.0.0.1",
           "tokens": [{"role": r, "sha256": hash_token(t), "name": f"{r}-1"} for r, t in tokens.items()],
           **settings}
    path = data_dir / "veilface.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path, tokens


class ChildProcess:
    """``python -m engine.cli <command> --config ... --ready-file ... --quiet`` in a child process
    (without the parent's ``VEILFACE_*`` environment), waited for until it writes its ready file
    (``info``: what it wrote); ``log()`` is the tail of its output."""

    what = "process"

    def __init__(self, command: list[str], config_path: Path, ready_file: Path, log_path: Path,
                 timeout: float) -> None:
        self.ready_file, self.log_path = ready_file, log_path
        if self.ready_file.exists():
            self.ready_file.unlink()
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VEILFACE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *command, "--config", str(config_path),
             "--ready-file", str(self.ready_file), "--quiet"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode}; log:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.what} not ready after {timeout} s; log:\n{self.log()}")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        self.target = self.info["target"]
        self.port = self.info["port"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush -- what a crash looks like."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """``python -m engine.cli serve`` in a child process; ``target`` once ready."""

    what = "server"

    def __init__(self, config_path: str | os.PathLike, log_path: str | os.PathLike | None = None,
                 timeout: float = 60.0) -> None:
        config_path = Path(config_path)
        super().__init__(["serve"], config_path, config_path.parent / "server-ready.json",
                         Path(log_path) if log_path else config_path.parent / "server.log", timeout)
