"""Multi-process 1:N: shard processes, each holding part of the encrypted gallery.

TenSEAL/SEAL calls hold the GIL, so threads cannot use a second core; each shard is a separate
process (``spawn`` start method: no fork of a process that may hold locks or secrets) that loads
the *public* context and owns whole blocks of the gallery. A search sends the probe blob to every
shard, each expands it and scores its blocks in parallel, and the parent concatenates the
encrypted ``scores`` blobs (no decryption anywhere on the matcher).
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
from typing import Iterable, Sequence

from ..errors import InvalidParameter
from .context import PublicContext, require_public
from .errors import HEError
from .gallery import _blob_of, _check_subject, merge_scores


def _worker(conn, ctx_bytes: bytes) -> None:  # runs in the shard process
    from .gallery import EncryptedGallery

    try:
        gallery = EncryptedGallery(PublicContext.from_bytes(ctx_bytes))
        conn.send(("ok", None))
    except BaseException as exc:  # noqa: BLE001 -- report start-up failure to the parent
        conn.send(("err", exc))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        cmd, args = msg
        if cmd == "stop":
            conn.send(("ok", None))
            return
        try:
            if cmd == "add":
                res = gallery.add(*args)
            elif cmd == "add_block":
                res = gallery.add_block(*args)
            elif cmd == "remove":
                res = gallery.remove(*args)
            elif cmd == "search":
                res = gallery.search(*args) if len(gallery) else None
            elif cmd == "len":
                res = len(gallery)
            else:
                raise InvalidParameter(f"unknown shard command {cmd!r}")
            conn.send(("ok", res))
        except BaseException as exc:  # noqa: BLE001
            try:
                conn.send(("err", exc))
            except Exception:  # unpicklable exception
                conn.send(("err", HEError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))


class ShardedEncryptedGallery:
    """Same API as :class:`~engine.he.gallery.EncryptedGallery` (identify mode), over ``shards``
    processes. Call :meth:`close` (or use as a context manager) to stop the processes."""

    def __init__(self, context, shards: int = 2, start_method: str = "spawn") -> None:
        self.ctx = require_public(context)
        if self.ctx.params.mode != "identify":
            raise InvalidParameter("sharding is for identify (1:N) mode")
        self.ctx.require_eval_keys()
        if not 1 <= int(shards) <= 64:
            raise InvalidParameter("shards must be in [1, 64]")
        mpc = mp.get_context(start_method)
        blob = self.ctx.to_bytes()
        self._conns, self._procs = [], []
        self._lock = threading.RLock()
        for _ in range(int(shards)):
            parent, child = mpc.Pipe()
            p = mpc.Process(target=_worker, args=(child, blob), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        for c in self._conns:
            self._reply(c)
        self._owner: dict[str, int] = {}
        self._count = [0] * len(self._conns)

    # -- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _reply(conn):
        status, res = conn.recv()
        if status == "err":
            raise res
        return res

    def _call(self, shard: int, cmd: str, *args):
        with self._lock:
            self._conns[shard].send((cmd, args))
            return self._reply(self._conns[shard])

    def close(self) -> None:
        with self._lock:
            for c, p in zip(self._conns, self._procs):
                try:
                    c.send(("stop", ()))
                    c.recv()
                except (OSError, EOFError):
                    pass
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
            self._conns, self._procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- content ----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "identify"

    @property
    def shards(self) -> int:
        return len(self._conns)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._owner

    def subjects(self) -> list[str]:
        return list(self._owner)

    @property
    def bytes_per_template(self) -> float:
        p = self.ctx.params
        return 2 * p.poly_degree * (len(p.moduli) - 1) * 8 * p.dim / p.poly_degree

    def _pick(self) -> int:
        return min(range(len(self._count)), key=self._count.__getitem__)

    def add(self, subject_id: str, template) -> None:
        _check_subject(subject_id)
        blob = _blob_of(template)
        with self._lock:
            shard = self._owner.get(subject_id)
            if shard is None:
                shard = self._pick()
            self._call(shard, "add", subject_id, blob)
            if subject_id not in self._owner:
                self._owner[subject_id] = shard
                self._count[shard] += 1

    def add_many(self, subject_ids: Sequence[str], templates: Iterable) -> None:
        for sid, t in zip(subject_ids, templates, strict=True):
            self.add(sid, t)

    def add_block(self, subject_ids: Sequence[str], block_blob: bytes) -> None:
        ids = [_check_subject(s) for s in subject_ids]
        with self._lock:
            for sid in ids:
                if sid in self._owner:
                    self.remove(sid)
            shard = self._pick()
            self._call(shard, "add_block", ids, bytes(block_blob))
            for sid in ids:
                self._owner[sid] = shard
            self._count[shard] += len(ids)

    def remove(self, subject_id: str) -> bool:
        with self._lock:
            shard = self._owner.get(subject_id)
            if shard is None:
                return False
            ok = self._call(shard, "remove", subject_id)
            del self._owner[subject_id]
            self._count[shard] -= 1
            return bool(ok)

    # -- matching ---------------------------------------------------------------------------
    def search(self, probe) -> bytes:
        """1:N over all shards in parallel -> one ``scores`` blob for the key holder."""
        blob = _blob_of(probe)
        self.ctx.load_ciphertexts(blob, "probe")  # reject foreign/old-epoch probes up front
        with self._lock:
            for c in self._conns:
                c.send(("search", (blob,)))
            results, error = [], None
            for c in self._conns:
                try:
                    results.append(self._reply(c))
                except BaseException as exc:  # noqa: BLE001 -- drain every shard first
                    error = error or exc
            if error is not None:
                raise error
        results = [r for r in results if r is not None]
        if not results:
            from .context import pack_blob
            return pack_blob("scores", dict(self.ctx._header(), blocks=[]), [])
        return merge_scores(results)


__all__ = ["ShardedEncryptedGallery"]
