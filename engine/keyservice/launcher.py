"""Start a ``veilface keyservice`` subprocess on an ephemeral loopback port (demo, tests)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..service.config import hash_token, new_token
from ..service.launcher import ChildProcess
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


class KeyServiceProcess(ChildProcess):
    """``python -m engine.cli keyservice`` in a child process; ``target`` / ``public_key`` once ready."""

    what = "key service"

    def __init__(self, config_path: str | os.PathLike, timeout: float = 60.0) -> None:
        config_path = Path(config_path)
        super().__init__(["keyservice"], config_path, config_path.with_suffix(".ready"),
                         config_path.with_suffix(".log"), timeout)
        self.public_key = self.info["public_key"]


__all__ = ["write_config", "KeyServiceProcess"]
