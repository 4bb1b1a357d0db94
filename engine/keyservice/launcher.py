"""Start a ``veilface keyservice`` subprocess on an ephemeral loopback port (demo, tests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..service.config import hash_token, new_token
from .config import ROLES


def write_config(data_dir: str | os.PathLike, kek_file: str | os.PathLike, tokens: dict[str, str] | None = None,
                 **settings) -> tuple[Path, dict]:
    """Write ``<data_dir>.json`` (next to, not inside, the data dir) with hashed role tokens."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokens or {r: new_token(r) for r in ROLES}
    cfg = {"data_dir": str(data_dir), "kek_file": str(kek_file), "port": 0, "host": "127.0.0.1",
           "tokens": [{"role": r, "sha256": hash_token(t), "name": f"{r}-1"} for r, t in tokens.items()], **settings}
    path = data_dir.with_name(data_dir.name + ".json")
    path.write_text(json.dumps(cfg, indent=1))
    return path, tokens


class KeyServiceProcess:
    """``python -m engine.cli keyservice`` in a child process; ``target`` / ``public_key`` once ready."""

    def __init__(self, config_path: str | os.PathLike, timeout: float = 60.0) -> None:
        config_path = Path(config_path)
        self.ready_file = config_path.with_suffix(".ready")
        if self.ready_file.exists():
            self.ready_file.unlink()
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VEILFACE_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "keyservice", "--config", str(config_path),
                                      "--ready-file", str(self.ready_file), "--quiet"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"key service exited with {self.proc.returncode}; log:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"key service not ready after {timeout} s; log:\n{self.log()}")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        self.target, self.port, self.public_key = self.info["target"], self.info["port"], self.info["public_key"]

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


__all__ = ["write_config", "KeyServiceProcess"]
