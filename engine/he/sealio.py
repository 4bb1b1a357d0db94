"""SEAL object (de)serialisation through ``tenseal.sealapi``.

The binding saves and loads only through file paths, so bytes go through an anonymous in-memory
file of the calling thread (Linux ``memfd``, reused; nothing on any file system), or else a
private (0700) directory, in RAM when ``/dev/shm`` exists, each file unlinked at once.

:func:`raw_plaintext` / :func:`raw_ciphertext` build SEAL objects from NTT-form residues by
writing an *uncompressed* SEAL serialisation (:func:`sealed`; ciphertexts go through
:func:`engine.he.raw.from_array`, the one array -> SEAL path): the way to express exact integer polynomials (e.g.
``2^-s mod q``, a uniformly random mask, the public key at a lower level) that no CKKS encoding
can produce.
"""
from __future__ import annotations

import os
import struct
import tempfile
import threading

import numpy as np
import tenseal.sealapi as seal

from .errors import HEFormatError, HEUnsupported

_tmp_lock = threading.Lock()
_tmp_dir: str | None = None
_tmp_pid = -1
_header: bytes | None = None
_local = threading.local()


def _tmp_path() -> str:
    global _tmp_dir, _tmp_pid
    with _tmp_lock:
        if _tmp_dir is None or _tmp_pid != os.getpid() or not os.path.isdir(_tmp_dir):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _tmp_dir, _tmp_pid = tempfile.mkdtemp(prefix="veilface-he-", dir=base), os.getpid()
    return os.path.join(_tmp_dir, f"{threading.get_ident()}-{os.urandom(6).hex()}")


def _scratch() -> tuple[int, str] | None:
    """This thread's anonymous in-memory file (Linux ``memfd``, reachable only through this
    process' ``/proc/self/fd``), reused across calls; None where unavailable."""
    entry = getattr(_local, "memfd", None)
    if entry is not None and entry[0] == os.getpid():
        return entry[1], entry[2]
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        fd = os.memfd_create("veilface-he", os.MFD_CLOEXEC)
    except OSError:
        return None
    _local.memfd = (os.getpid(), fd, f"/proc/self/fd/{fd}")
    return fd, _local.memfd[2]


def seal_save(obj) -> bytes:
    """Serialise a SEAL object (ciphertext, key, plaintext) to bytes."""
    scratch = _scratch()
    if scratch is not None:
        fd, path = scratch
        try:
            obj.save(path)
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.ftruncate(fd, 0)   # keep no copy (e.g. of a secret key) in the scratch file
    path = _tmp_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _load(obj, ctx, path: str, cls) -> None:
    try:
        obj.load(ctx, path) if ctx is not None else obj.load(path)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise HEFormatError(f"corrupt or foreign SEAL {cls.__name__}: {exc}") from None


def seal_load(cls, ctx, data: bytes):
    """Load a SEAL object of type ``cls`` (validated against ``ctx``); corrupt bytes raise
    :class:`HEFormatError`."""
    obj = cls()
    scratch = _scratch()
    if scratch is not None:
        fd, path = scratch
        try:
            os.pwrite(fd, data, 0)
            _load(obj, ctx, path, cls)
        finally:
            os.ftruncate(fd, 0)
        return obj
    path = _tmp_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _load(obj, ctx, path, cls)
        return obj
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _seal_header() -> bytes:
    """The 16-byte SEALHeader of this SEAL build (magic, version), compression patched to none."""
    global _header
    if _header is None:
        hdr = seal_save(seal.Plaintext(1))[:16]
        _header = hdr[:5] + b"\0" + hdr[6:8] + hdr[8:16]
    return _header


def seal_header(members_size: int) -> bytes:
    """The 16-byte SEALHeader (this build's magic and version, no compression) of a serialisation
    whose members take ``members_size`` bytes."""
    return _seal_header()[:8] + struct.pack("<Q", 16 + int(members_size))


def sealed(members: bytes) -> bytes:
    """``members`` (a SEAL object's fields, uncompressed) behind this build's SEALHeader with the
    total size: a SEAL serialisation that ``load`` accepts."""
    return seal_header(len(members)) + members


def raw_plaintext(ctx, parms_id, residues: np.ndarray, scale: float):
    """An NTT-form plaintext at ``parms_id`` whose residue modulo data prime ``k`` at NTT position
    ``j`` is ``residues[k, j]`` (``(L, N)`` uint64, each row reduced modulo its prime)."""
    res = np.ascontiguousarray(residues, dtype=np.uint64)
    array = sealed(struct.pack("<Q", res.size) + res.tobytes())
    members = struct.pack("<4Q", *list(parms_id)) + struct.pack("<Qd", res.size, float(scale)) + array
    try:
        pt = seal_load(seal.Plaintext, ctx, sealed(members))
    except HEFormatError as exc:
        raise HEUnsupported(f"this SEAL build does not accept raw plaintexts: {exc}") from None
    if not pt.is_ntt_form():
        raise HEUnsupported("this SEAL build does not accept raw NTT-form plaintexts")
    return pt


def raw_ciphertext(ctx, parms_id, residues: np.ndarray, scale: float, ntt_form: bool = True):
    """A ciphertext at ``parms_id`` with the given residues ``(size, L, N)`` uint64: the same as
    :func:`engine.he.raw.from_array` (the one array -> SEAL path), with a failure reported as
    :class:`HEUnsupported` (this SEAL build does not take raw ciphertexts)."""
    from .raw import from_array

    try:
        return from_array(np.ascontiguousarray(residues, dtype=np.uint64), ctx, parms_id, scale, ntt_form)
    except HEFormatError as exc:
        raise HEUnsupported(f"this SEAL build does not accept raw ciphertexts: {exc}") from None


def residues_of(obj, parts: int, primes: int, n: int) -> np.ndarray:
    """The data of a plaintext/ciphertext as ``(parts, primes, n)`` uint64 (slow: one call per
    coefficient; for one-time precomputation and tests, not for hot paths)."""
    arr = obj.dyn_array()
    flat = np.fromiter((arr.at(i) for i in range(parts * primes * n)), dtype=np.uint64, count=parts * primes * n)
    return flat.reshape(parts, primes, n)


__all__ = ["seal_save", "seal_load", "sealed", "seal_header", "raw_plaintext", "raw_ciphertext", "residues_of"]
