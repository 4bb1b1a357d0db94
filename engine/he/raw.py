"""SEAL ciphertexts <-> contiguous ``uint64`` arrays in NTT/RNS form, for the native CKKS kernel
(:func:`engine.kernels.ckks_block_mac`).

Layout: a ciphertext of ``size`` polynomials at a level with ``L`` primes and degree ``N`` is the
C-contiguous array ``(size, L, N)`` -- SEAL's own storage order (polynomial, prime, coefficient),
every coefficient reduced modulo its prime. A block of ``d`` ciphertexts stacks to
``(d, size, L, N)``. The metadata SEAL keeps beside the data (``parms_id``, scale, NTT flag) is not
in the array: :func:`from_array` takes it back as arguments.

* :func:`to_array` / :func:`to_arrays` copy the coefficients out. The binding exposes no buffer
  and its ``save`` always compresses (zstd, ~0.4 ms per 8192x2 ciphertext), so the fast path copies
  straight from the ciphertext's memory (~20x faster) after checking, on every call, that the
  object looks exactly as SEAL 4's ``Ciphertext`` layout says (parms_id, size, degree, primes,
  scale, array length, first and last coefficient all agree with the binding's own accessors).
  If anything disagrees (another SEAL or pybind11 layout) it falls back to reading coefficient by
  coefficient through the binding (correct everywhere, ~5 ms per ciphertext).
* :func:`from_array` writes SEAL's uncompressed serialisation (:func:`serialise`:
  ``Ciphertext::save`` with ``compr_mode_type::none``: SEALHeader, members, the data as a
  ``DynArray``) and loads it, so SEAL itself validates the result against the context (level,
  sizes, coefficients < q); with ``into=`` it refills an existing ciphertext in place (the
  gallery's search loop, once per block). This is the one array -> SEAL path:
  :func:`engine.he.sealio.raw_ciphertext` is a thin alias of it.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as seal

from .. import kernels as _kernels
from .errors import HEFormatError, HEUnsupported
from .sealio import seal_header, seal_load

__all__ = ["to_array", "to_arrays", "from_array", "serialise", "ciphertext_bytes", "shape_of", "moduli"]

_PYOBJECT_HEAD = object.__basicsize__  # pybind11 instance: PyObject head, then the value pointer


def shape_of(ct) -> tuple[int, int, int]:
    """``(size, L, N)`` of a ciphertext."""
    return int(ct.size()), int(ct.coeff_modulus_size()), int(ct.poly_modulus_degree())


def moduli(context, parms_id) -> np.ndarray:
    """The ``L`` primes of the level ``parms_id`` of ``context`` (a ``SEALContext``) as uint64,
    in the order of the arrays' prime axis (the ``moduli`` argument of the native kernel)."""
    data = context.get_context_data(list(parms_id))
    if data is None:
        raise HEUnsupported("parms_id is not a level of this context")
    return np.array([m.value() for m in data.parms().coeff_modulus()], dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# SEAL -> numpy
def _data_address(ct, count: int) -> int | None:
    """Address of the ciphertext's coefficient array, or None unless every field of SEAL 4's
    ``Ciphertext`` layout (parms_id[4], is_ntt_form, size, N, L, scale, correction factor, then the
    DynArray: pool handle[2], capacity, size, pointer) matches what the binding reports."""
    if type(ct) is not seal.Ciphertext or count <= 0:
        return None
    obj = ctypes.c_void_p.from_address(id(ct) + _PYOBJECT_HEAD).value
    if not obj or obj % 8:
        return None
    w = (ctypes.c_uint64 * 15).from_address(obj)
    size, primes, n = shape_of(ct)
    if (list(w[0:4]) != [int(x) for x in ct.parms_id()] or (w[4] & 0xFF) != int(bool(ct.is_ntt_form()))
            or (w[5], w[6], w[7]) != (size, n, primes)
            or struct.unpack("<d", struct.pack("<Q", w[8]))[0] != ct.scale
            or w[13] != count or w[12] < count or not w[14] or w[14] % 8):
        return None
    data = (ctypes.c_uint64 * count).from_address(w[14])
    if data[0] != ct[0] or data[count - 1] != ct[count - 1]:
        return None
    return int(w[14])


def to_array(ct, out: np.ndarray | None = None, *, direct: bool = True) -> np.ndarray:
    """The coefficients of ``ct`` as a ``(size, L, N)`` uint64 array (a copy; into ``out`` when
    given: C-contiguous uint64 of that shape). ``direct=False`` forces the slow, layout-free path."""
    shape = shape_of(ct)
    count = shape[0] * shape[1] * shape[2]
    if out is None:
        out = np.empty(shape, dtype=np.uint64)
    elif out.shape != shape or out.dtype != np.uint64 or not out.flags.c_contiguous or not out.flags.writeable:
        raise HEUnsupported(f"out must be a writeable C-contiguous uint64 array of shape {shape}")
    addr = _data_address(ct, count) if direct else None
    if addr is not None:
        ctypes.memmove(out.ctypes.data, addr, count * 8)
    else:
        out.reshape(-1)[:] = np.fromiter((ct[i] for i in range(count)), dtype=np.uint64, count=count)
    return out


def to_arrays(cts: Sequence, out: np.ndarray | None = None, *, direct: bool = True) -> np.ndarray:
    """Ciphertexts of one shape stacked as ``(len(cts), size, L, N)`` uint64 (e.g. an expanded
    probe or the dimensions of a gallery block); written into ``out`` when given."""
    if not cts:
        raise HEUnsupported("no ciphertexts")
    shape = shape_of(cts[0])
    if out is None:
        out = np.empty((len(cts),) + shape, dtype=np.uint64)
    elif out.shape != (len(cts),) + shape or out.dtype != np.uint64 or not out.flags.c_contiguous:
        raise HEUnsupported(f"out must be a C-contiguous uint64 array of shape {(len(cts),) + shape}")
    for i, ct in enumerate(cts):
        if shape_of(ct) != shape:
            raise HEUnsupported(f"ciphertext {i} has shape {shape_of(ct)}, not {shape}")
        to_array(ct, out[i], direct=direct)
    return out


# ----------------------------------------------------------------------------------------------
# numpy -> SEAL
def _prefix(parms_id: Sequence[int], scale: float, ntt_form: bool, size: int, primes: int, n: int) -> bytes:
    """Everything of a ciphertext's uncompressed SEAL serialisation before its coefficients:
    SEALHeader, members (parms_id, NTT flag, size, N, L, scale, correction factor 1), then the
    data ``DynArray``'s own SEALHeader and element count."""
    count = size * primes * n
    array_head = struct.pack("<Q", count)
    array_size = len(array_head) + 8 * count
    fields = (struct.pack("<4Q", *[int(x) for x in parms_id]) + bytes([1 if ntt_form else 0])
              + struct.pack("<QQQdQ", size, n, primes, float(scale), 1))
    members_size = len(fields) + 16 + array_size
    return seal_header(members_size) + fields + seal_header(array_size) + array_head


def serialise(arr: np.ndarray, parms_id: Sequence[int], scale: float, ntt_form: bool = True) -> bytes:
    """SEAL's uncompressed serialisation (``Ciphertext::save`` with ``compr_mode_type::none``) of a
    ciphertext with the coefficients ``arr`` (``(size, L, N)`` uint64): what :func:`from_array`
    loads and what any SEAL ``Ciphertext.load`` accepts (e.g. a result part for the key holder).
    Nothing is checked here; the loading side validates."""
    a = np.ascontiguousarray(arr)
    if a.dtype != np.uint64 or a.ndim != 3:
        raise HEUnsupported(f"need a (size, L, N) uint64 array, got {a.dtype} {a.shape}")
    return _prefix(parms_id, scale, ntt_form, *a.shape) + a.tobytes()


def from_array(arr: np.ndarray, context, parms_id: Sequence[int], scale: float,
               ntt_form: bool = True, *, into: seal.Ciphertext | None = None,
               reduced: bool = False) -> seal.Ciphertext:
    """A SEAL ciphertext with the coefficients ``arr`` (``(size, L, N)`` uint64, each row reduced
    modulo its prime) at ``parms_id`` of ``context`` (a ``SEALContext``) with the given scale.

    Default path: SEAL loads :func:`serialise` bytes and validates them against the context (a
    wrong level, size or unreduced coefficient raises :class:`HEFormatError`), ~0.4-1.5 ms for
    a size-3 ciphertext. ``into``: an existing ciphertext of the same NTT form is reused instead
    (resized to ``parms_id``/``size``, scale set, coefficients copied straight into its memory
    after the same layout check as :func:`to_array`, ~30 us); the coefficients are then checked
    with :func:`engine.kernels.ckks_max_excess` instead of by SEAL, unless the caller vouches for
    them with ``reduced=True`` (the native kernel's output: reduced by construction, tested
    bit-equal to SEAL). Falls back to the default path whenever the layout check fails."""
    a = np.ascontiguousarray(arr)
    if a.dtype != np.uint64 or a.ndim != 3:
        raise HEUnsupported(f"need a (size, L, N) uint64 array, got {a.dtype} {a.shape}")
    size, primes, n = a.shape
    if into is not None and type(into) is seal.Ciphertext and bool(into.is_ntt_form()) == bool(ntt_form):
        q = moduli(context, parms_id)
        if len(q) != primes or int(context.get_context_data(list(parms_id)).parms().poly_modulus_degree()) != n:
            raise HEFormatError("array shape does not match the level of this context")
        if not reduced and _kernels.ckks_max_excess(a, q):
            raise HEFormatError("array coefficients are not reduced modulo their primes")
        into.resize(context, [int(x) for x in parms_id], size)
        into.scale = float(scale)
        addr = _data_address(into, a.size)
        if addr is not None and shape_of(into) == (size, primes, n):
            ctypes.memmove(addr, a.ctypes.data, a.size * 8)
            return into
    ct = seal_load(seal.Ciphertext, context, serialise(a, parms_id, scale, ntt_form))
    if shape_of(ct) != (size, primes, n):
        raise HEFormatError("SEAL loaded a ciphertext of another shape")
    return ct


def ciphertext_bytes(ct) -> bytes:
    """Uncompressed SEAL serialisation of ``ct`` (like ``seal_save`` without zstd: ~20x faster,
    ~6% larger for uniformly random residues); the coefficients are copied once, straight from the
    ciphertext's memory when its layout checks out (see :func:`to_array`)."""
    size, primes, n = shape_of(ct)
    count = size * primes * n
    head = _prefix(ct.parms_id(), ct.scale, ct.is_ntt_form(), size, primes, n)
    addr = _data_address(ct, count)
    if addr is None:
        return head + to_array(ct, direct=False).tobytes()
    buf = bytearray(len(head) + 8 * count)
    buf[:len(head)] = head
    ctypes.memmove((ctypes.c_char * (8 * count)).from_buffer(buf, len(head)), addr, 8 * count)
    return bytes(buf)
