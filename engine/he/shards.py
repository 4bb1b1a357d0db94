"""Processes for the SEAL share of 1:N: the probe-expansion helper, and shard processes.

TenSEAL/SEAL calls hold the GIL, so threads cannot run SEAL on a second core; the native kernel
(:mod:`engine.he.identify`) already uses every core from one process. What is left for a second
process is the probe's oblivious expansion, the fixed per-query cost:

* :class:`ExpansionHelper` (``IdentifyGallery(..., expand_processes=1)``): one spawn process with
  the public context that expands half of every probe's dimensions into shared memory while the
  gallery's own thread expands the other half -- the expansion's wall time roughly halves, nothing
  else changes (the pieces are the same ciphertexts SEAL computes in one process).

:class:`ShardedEncryptedGallery` (the service's ``he_shards > 1``) splits the whole gallery over
processes. Since the hot loop is native and threaded it no longer pays (each shard rescales and
relinearises its own partial products, the parent adds them, both shards' kernels share the same
cores); it is kept for deployments configured with it. Each shard is a separate process
(``spawn`` start method: no fork of a process that may hold locks or secrets) that loads the
*public* context. Two ways to split (``split=``):

* ``"dims"`` (default when ``shards`` is a power of two): shard ``r`` of ``m`` holds dimensions
  ``i % m == r`` of *every* block. A search expands only that share of the probe (the oblivious
  expansion is the fixed per-query cost: ``dim/m`` automorphisms instead of ``dim - 1`` per shard),
  each shard returns partial inner products per block, and the parent adds them ciphertext-wise
  (:func:`~engine.he.blobops.add_partial_scores`). Adds and removals run on all shards in parallel,
  each doing its share (removal purges in about half the time).
* ``"blocks"``: each shard owns whole blocks and expands the whole probe; the parent concatenates.

No decryption anywhere on the matcher.

Over 400 lines: the helper process, the shard processes and their pipe protocol belong together
(each message type has one sender and one receiver in this module).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import traceback
from collections.abc import Iterable, Sequence
from multiprocessing import shared_memory

import numpy as np

from ..errors import InvalidParameter
from ..validation import check_subject_id
from .blobops import add_partial_scores, merge_scores, split_block_blob
from .context import PublicContext, require_public
from .errors import HEError, HEFormatError
from .gallery import SNAPSHOT_FORMAT, SNAPSHOT_FORMATS_READ
from .wire import blob_of, pack_blob, unpack_blob

START_TIMEOUT_S = 120.0  # loading the public context (Galois keys) takes a few seconds
_POLL_S = 0.5
log = logging.getLogger("veilface.he")


# ----------------------------------------------------------------------------------------------
# probe expansion helper
def _expand_worker(conn, ctx_bytes: bytes, part: tuple[int, int], shm_name: str, shape) -> None:
    """Helper process: expand dimensions ``i % m == r`` of each probe into the shared array."""
    from . import raw
    from .algorithms import expand

    try:
        ctx = PublicContext.from_bytes(ctx_bytes)
        shm = shared_memory.SharedMemory(name=shm_name)
        out = np.ndarray(tuple(shape), dtype=np.uint64, buffer=shm.buf)
        conn.send(("ok", None))
    except BaseException as exc:  # noqa: BLE001 -- report start-up failure to the parent
        conn.send(("err", exc))
        return
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except EOFError:
                return
            if cmd == "stop":
                conn.send(("ok", None))
                return
            try:
                _, cts = ctx.load_ciphertexts(arg, "probe")
                pieces = expand(ctx, cts[0], *part)
                for k, i in enumerate(sorted(pieces)):
                    raw.to_array(pieces[i], out[k])
                conn.send(("ok", float(pieces[min(pieces)].scale)))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("err", HEError(f"{type(exc).__name__}: {exc}")))
    finally:
        del out
        shm.close()


class ExpansionHelper:
    """A spawn process that expands dimensions ``i % m == r`` of uploaded probes into shared
    memory (``part=(r, m)``, ``shape = (count, 2, L, N)``), public context only.

    :meth:`start` sends a probe upload and returns at once; :meth:`finish` waits and copies the
    pieces into the caller's rows. One probe at a time (:meth:`try_acquire`); a dead helper raises
    :class:`HEError` and the caller expands locally instead."""

    def __init__(self, context, part: tuple[int, int], shape, start_method: str = "spawn") -> None:
        self.ctx = require_public(context)
        self.part, self.shape = (int(part[0]), int(part[1])), tuple(int(x) for x in shape)
        nbytes = int(np.prod(self.shape)) * 8
        self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self._out = np.ndarray(self.shape, dtype=np.uint64, buffer=self._shm.buf)
        self._busy = threading.Lock()
        mpc = mp.get_context(start_method)
        parent, child = mpc.Pipe()
        self._proc = mpc.Process(target=_expand_worker, name="veilface-he-expand", daemon=True,
                                 args=(child, self.ctx.to_bytes(), self.part, self._shm.name, self.shape))
        self._conn = parent
        self._proc.start()
        child.close()
        try:
            self._reply(START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _reply(self, timeout: float | None = None):
        waited = 0.0
        while not self._conn.poll(_POLL_S):
            waited += _POLL_S
            if not self._proc.is_alive():
                raise HEError(f"HE expansion helper (pid {self._proc.pid}) died with exit code "
                              f"{self._proc.exitcode}")
            if timeout is not None and waited >= timeout:
                raise HEError(f"HE expansion helper did not start within {timeout:.0f} s")
        try:
            status, res = self._conn.recv()
        except EOFError:
            raise HEError("HE expansion helper closed its pipe") from None
        if status == "err":
            raise res
        return res

    def try_acquire(self) -> bool:
        """Reserve the helper for one probe (False when another search holds it or it is gone)."""
        if self._proc is None or not self._busy.acquire(blocking=False):
            return False
        if not self._proc.is_alive():
            self._busy.release()
            return False
        return True

    def start(self, probe_blob: bytes) -> None:
        """Send a probe upload (after :meth:`try_acquire`; on failure the reservation is released)."""
        try:
            self._conn.send(("expand", bytes(probe_blob)))
        except OSError as exc:
            self._busy.release()
            raise HEError(f"HE expansion helper died: {exc}") from None

    def finish(self, out: np.ndarray | None) -> float:
        """Wait for the pieces, copy them into ``out`` (``shape`` rows, e.g. a strided view of the
        probe array; None discards them), release the helper; returns the pieces' scale."""
        try:
            scale = self._reply()
            if out is not None:
                out[...] = self._out
            return scale
        finally:
            self._busy.release()

    def close(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            try:
                self._conn.send(("stop", None))
                if self._conn.poll(10):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            self._conn.close()
        shm = getattr(self, "_shm", None)
        if shm is not None:
            self._shm = None
            self._out = None
            try:
                shm.close()
                shm.unlink()
            except (FileNotFoundError, BufferError):
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# shard processes


def _worker(conn, ctx_bytes: bytes, part: tuple[int, int] = (0, 1)) -> None:  # shard process
    from .identify import IdentifyGallery

    try:
        gallery = IdentifyGallery(PublicContext.from_bytes(ctx_bytes), part=part)
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
            elif cmd == "snapshot":
                res = gallery.snapshot()
            elif cmd == "load_snapshot":
                res = gallery.load_snapshot(*args)
                res = sorted(gallery.subjects())
            elif cmd == "len":
                res = len(gallery)
            elif cmd == "memory":
                res = gallery.memory_bytes()
            else:
                raise InvalidParameter(f"unknown shard command {cmd!r}")
            conn.send(("ok", res))
        except BaseException as exc:  # noqa: BLE001
            try:
                conn.send(("err", exc))
            except Exception:  # unpicklable exception
                conn.send(("err", HEError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))


class ShardedEncryptedGallery:
    """Same API as :class:`~engine.he.identify.IdentifyGallery`, over ``shards``
    processes. Call :meth:`close` (or use as a context manager) to stop the processes.

    ``split="dims"`` (default for 1, 2, 4, ... shards) or ``"blocks"``: see the module docstring."""

    def __init__(self, context, shards: int = 2, start_method: str = "spawn", split: str | None = None) -> None:
        self.ctx = require_public(context)
        if self.ctx.params.mode != "identify":
            raise InvalidParameter("sharding is for identify (1:N) mode")
        self.ctx.require_eval_keys()
        if not 1 <= int(shards) <= 64:
            raise InvalidParameter("shards must be in [1, 64]")
        shards = int(shards)
        pow2 = shards & (shards - 1) == 0 and shards <= self.ctx.params.expand_width
        if split is None:
            split = "dims" if pow2 else "blocks"
        if split not in ("dims", "blocks") or (split == "dims" and not pow2):
            raise InvalidParameter("split must be 'blocks', or 'dims' with a power-of-two number of shards")
        self.split = split
        mpc = mp.get_context(start_method)
        blob = self.ctx.to_bytes()
        self._conns, self._procs = [], []
        self._lock = threading.RLock()
        for k in range(shards):
            part = (k, shards) if split == "dims" else (0, 1)
            parent, child = mpc.Pipe()
            p = mpc.Process(target=_worker, args=(child, blob, part), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        try:
            for k in range(shards):
                self._reply(k, timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self._owner: dict[str, int] = {}
        self._count = [0] * len(self._conns)

    # -- plumbing ---------------------------------------------------------------------------
    def _reply(self, shard: int, timeout: float | None = None):
        """The shard's answer; a dead shard (or a start-up past ``timeout``) raises HEError
        instead of blocking the caller forever."""
        conn, proc = self._conns[shard], self._procs[shard]
        waited = 0.0
        while not conn.poll(_POLL_S):
            waited += _POLL_S
            if not proc.is_alive():
                raise HEError(f"HE shard {shard} (pid {proc.pid}) died with exit code {proc.exitcode}")
            if timeout is not None and waited >= timeout:
                raise HEError(f"HE shard {shard} did not start within {timeout:.0f} s (a spawned process "
                              "re-imports __main__: guard scripts with `if __name__ == '__main__':`)")
        try:
            status, res = conn.recv()
        except EOFError:
            raise HEError(f"HE shard {shard} (pid {proc.pid}) closed its pipe") from None
        if status == "err":
            raise res
        return res

    def _send(self, shard: int, msg) -> None:
        try:
            self._conns[shard].send(msg)
        except OSError as exc:  # BrokenPipeError: the shard is gone
            raise HEError(f"HE shard {shard} (pid {self._procs[shard].pid}) died: {exc}") from None

    def _call(self, shard: int, cmd: str, *args):
        with self._lock:
            self._send(shard, (cmd, args))
            return self._reply(shard)

    def _call_all(self, cmd: str, args_per_shard) -> list:
        """Send to every shard first, then collect every reply (all shards work in parallel)."""
        with self._lock:
            for k, args in enumerate(args_per_shard):
                self._send(k, (cmd, args))
            results, error = [], None
            for k in range(len(self._conns)):
                try:
                    results.append(self._reply(k))
                except BaseException as exc:  # noqa: BLE001 -- drain every shard first
                    error = error or exc
                    results.append(None)
            if error is not None:
                raise error
            return results

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

    @property
    def pids(self) -> list[int]:
        """Process ids of the shard processes (e.g. to measure their resident memory)."""
        return [p.pid for p in self._procs]

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

    def memory_bytes(self) -> int:
        """Ciphertext bytes held by all shards (see :meth:`IdentifyGallery.memory_bytes`)."""
        return int(sum(self._call_all("memory", [()] * self.shards)))

    def _pick(self) -> int:
        return min(range(len(self._count)), key=self._count.__getitem__)

    def add(self, subject_id: str, template) -> None:
        check_subject_id(subject_id)
        blob = blob_of(template)
        with self._lock:
            if self.split == "dims":
                self._call_all("add", [(subject_id, blob)] * self.shards)
                self._owner[subject_id] = -1
                return
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
        ids = [check_subject_id(s) for s in subject_ids]
        block_blob = blob_of(block_blob)
        with self._lock:
            if self.split == "dims":
                m = self.shards
                cut = [split_block_blob(block_blob, (k, m)) for k in range(m)] if m > 1 else [block_blob]
                self._call_all("add_block", [(ids, b) for b in cut])
                for sid in ids:
                    self._owner[sid] = -1
                return
            for sid in ids:
                if sid in self._owner:
                    self.remove(sid)
            shard = self._pick()
            self._call(shard, "add_block", ids, bytes(block_blob))
            for sid in ids:
                self._owner[sid] = shard
            self._count[shard] += len(ids)

    def remove(self, subject_id: str) -> bool:
        """Remove a subject; when this returns its template is purged from every shard."""
        with self._lock:
            shard = self._owner.get(subject_id)
            if shard is None:
                return False
            if self.split == "dims":
                ok = all(self._call_all("remove", [(subject_id,)] * self.shards))
            else:
                ok = self._call(shard, "remove", subject_id)
                self._count[shard] -= 1
            del self._owner[subject_id]
            return bool(ok)

    # -- snapshot / restore -------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """One ``sharded_gallery_snapshot`` blob: the :meth:`IdentifyGallery.snapshot` of every
        shard (taken in parallel) + the split; restore it into the same number of shards and split."""
        with self._lock:
            snaps = self._call_all("snapshot", [()] * self.shards)
            head = dict(self.ctx.header(), snapshot_format=SNAPSHOT_FORMAT, split=self.split,
                        shards=self.shards)
            return pack_blob("sharded_gallery_snapshot", head, snaps)

    @classmethod
    def restore(cls, context, snapshot, shards: int = 2, **kwargs) -> ShardedEncryptedGallery:
        """New shard processes holding the state of :meth:`snapshot` bytes (same ``shards`` and
        split; otherwise :class:`~engine.he.errors.HEFormatError`)."""
        g = cls(context, shards=shards, **kwargs)
        try:
            g.load_snapshot(snapshot)
        except BaseException:
            g.close()
            raise
        return g

    def load_snapshot(self, snapshot) -> None:
        """Load :meth:`snapshot` bytes into these (empty) shards; see :meth:`restore`."""
        h, parts = unpack_blob(blob_of(snapshot), "sharded_gallery_snapshot")
        self.ctx.check_header(h, "gallery snapshot")
        if h.get("snapshot_format") not in SNAPSHOT_FORMATS_READ:
            raise HEFormatError(f"unknown gallery snapshot format {h.get('snapshot_format')!r}")
        if h.get("split") != self.split or int(h.get("shards", -1)) != self.shards or len(parts) != self.shards:
            raise HEFormatError(f"gallery snapshot of {h.get('shards')} shards split by {h.get('split')!r}; "
                                f"this gallery has {self.shards} split by {self.split!r}")
        with self._lock:
            if self._owner:
                raise InvalidParameter("load_snapshot needs an empty gallery")
            subjects = self._call_all("load_snapshot", [(p,) for p in parts])
            if self.split == "dims":
                if any(s != subjects[0] for s in subjects[1:]):
                    raise HEFormatError("gallery snapshot: the dimension shards hold different subjects")
                self._owner = {s: -1 for s in subjects[0]}
            else:
                self._owner = {s: k for k, ss in enumerate(subjects) for s in ss}
                self._count = [len(ss) for ss in subjects]

    # -- matching ---------------------------------------------------------------------------
    def search(self, probe) -> bytes:
        """1:N over all shards in parallel -> one ``scores`` blob for the key holder."""
        blob = blob_of(probe)
        self.ctx.load_ciphertexts(blob, "probe")  # reject foreign/old-epoch probes up front
        results = self._call_all("search", [(blob,)] * self.shards)
        results = [r for r in results if r is not None]
        if not results:
                return pack_blob("scores", dict(self.ctx.header(), blocks=[]), [])
        if self.split == "dims":
            return results[0] if len(results) == 1 else add_partial_scores(self.ctx, results)
        return merge_scores(results)


__all__ = ["ShardedEncryptedGallery", "ExpansionHelper"]
