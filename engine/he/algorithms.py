"""Homomorphic algorithms of identify mode, on public keys only: trace + expansion of an upload,
ring packing, coefficient extraction and slot purge.

All use the automorphisms ``X -> X^(N/2^j + 1)`` (Galois keys of every level ``j < log2 N``,
:attr:`HEParams.galois_elements`). Applied to a polynomial whose coefficients sit at multiples of
``2^j``, ``c + s(c)`` keeps (doubled) those whose bit ``j`` of the exponent is 0 and ``c - s(c)``
those whose bit is 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as seal

from .errors import HEUnsupported


def galois(ctx, ct, elt: int):
    """``ct`` under the automorphism ``X -> X^elt`` (a new ciphertext)."""
    out = seal.Ciphertext()
    ctx.core.evaluator.apply_galois(ct, int(elt), ctx.galois_keys, out)
    return out


def expand(ctx, ct, residue: int = 0, modulus: int = 1) -> dict:
    """Trace + oblivious expansion: ``ct`` encrypting an upload in the stride layout (component
    ``i`` at coefficient ``i * stride``, prescaled by ``1/N``) -> ``{i: ct_i}`` with ``ct_i``
    encrypting the *constant* ``v_i`` for ``i < dim`` (only ``i % modulus == residue``).

    The first ``log2(stride)`` levels are a trace (``c + s(c)`` only): they zero every coefficient
    off the stride grid, so whatever a hostile device put there never reaches a score. The next
    ``log2(width)`` levels split by the bits of ``i`` (SealPIR-style expansion, ``dim - 1``
    automorphisms). Trace and expansion multiply by ``stride * width = N``, cancelled by the
    ``1/N`` prescale of the layout.
    """
    core, p = ctx.core, ctx.params
    ev, n = core.evaluator, p.poly_degree
    trace = p.ring_levels - p.expand_levels
    c = ct
    for j in range(trace):
        t = galois(ctx, c, n // (1 << j) + 1)
        s = seal.Ciphertext()
        ev.add(c, t, s)
        c = s
    items = {0: c}
    for b in range(p.expand_levels):
        step, lv = 1 << b, trace + b
        elt, mono = n // (1 << lv) + 1, core.monomial(-(1 << lv))
        new = {}
        for r, c in items.items():
            want0 = want1 = True
            if step < modulus:
                bit = (residue >> b) & 1
                want0, want1 = bit == 0, bit == 1
            if want1 and r + step >= p.dim:
                want1 = False  # whole subtree beyond dim
            if not (want0 or want1):
                continue
            t = galois(ctx, c, elt)
            if want0:
                c0 = seal.Ciphertext()
                ev.add(c, t, c0)
                new[r] = c0
            if want1:
                c1 = seal.Ciphertext()
                ev.sub(c, t, c1)
                ev.multiply_plain_inplace(c1, mono)
                new[r + step] = c1
        items = new
    return {i: c for i, c in items.items() if i < p.dim}


def pack(ctx, items: list, level: int):
    """Ring packing (Chen-Dai-Kim-Song 2021, PackLWEs): ``2^level`` ciphertexts (``None`` = zero)
    -> one ciphertext holding ``2^level * (constant coefficient of item k)`` at coefficient
    ``k * N / 2^level`` (other coefficients: junk that the remaining trace levels clear)."""
    if level == 0:
        return items[0]
    ev, n = ctx.core.evaluator, ctx.params.poly_degree
    even = pack(ctx, items[0::2], level - 1)
    odd = pack(ctx, items[1::2], level - 1)
    elt = (1 << level) + 1
    if odd is None:
        if even is None:
            return None
        out = galois(ctx, even, elt)
        ev.add_inplace(out, even)
        return out
    shifted = seal.Ciphertext()
    ev.multiply_plain(odd, ctx.core.monomial(n >> level), shifted)
    if even is None:
        ev.sub_inplace(shifted, galois(ctx, shifted, elt))
        return shifted
    plus, minus = seal.Ciphertext(), seal.Ciphertext()
    ev.add(even, shifted, plus)
    ev.sub(even, shifted, minus)
    ev.add_inplace(plus, galois(ctx, minus, elt))
    return plus


def extract_coefficient(ctx, cts: Sequence, j: int) -> list:
    """``[ct_k]`` -> ``[c_k]`` where ``c_k`` encrypts the *constant* equal to coefficient ``j`` of
    ``ct_k`` (same scale, same level, up to key-switching noise), for ``k < len(cts) <= N``.

    Packs the ``len(cts)`` coefficients into one ciphertext (``len - 1`` automorphisms plus
    ``log2(N / width)`` trace levels) and expands it again (``len - 1`` automorphisms); the factor
    ``N * width`` of trace and expansion is cancelled in advance by the exact integer
    ``(N * width)^-1 mod Q``, so no level is consumed."""
    core, p, ev = ctx.core, ctx.params, ctx.core.evaluator
    count = len(cts)
    level = max(0, (count - 1).bit_length())
    width, n, ring = 1 << level, p.poly_degree, p.ring_levels
    inv, shift = core.inv_pow2(ring + level), core.monomial(-int(j))
    items = []
    for ct in cts:
        a = seal.Ciphertext()
        ev.multiply_plain(ct, shift, a)
        ev.multiply_plain_inplace(a, inv)
        items.append(a)
    items += [None] * (width - count)
    packed = pack(ctx, items, level)
    for k in range(level + 1, ring + 1):  # trace down to the subring of X^(N/width)
        ev.add_inplace(packed, galois(ctx, packed, (1 << k) + 1))
    stride = n >> level
    parts = {0: packed}
    for lv in range(ring - level, ring):  # expansion from stride N/width down to 1
        step = 1 << lv
        elt, mono = n // step + 1, core.monomial(-step)
        new = {}
        for r, c in parts.items():
            t = galois(ctx, c, elt)
            c0 = seal.Ciphertext()
            ev.add(c, t, c0)
            new[r] = c0
            if (r + step) // stride < count:
                c1 = seal.Ciphertext()
                ev.sub(c, t, c1)
                ev.multiply_plain_inplace(c1, mono)
                new[r + step] = c1
        parts = new
    return [parts[k * stride] for k in range(count)]


def purge_slot(ctx, cts: Sequence, slot: int) -> None:
    """Zero coefficient ``slot`` of every ciphertext in ``cts`` in place (homomorphically, with
    public keys only): afterwards that coefficient decrypts to key-switching noise, the others are
    unchanged up to the same noise. This is how a template is deleted from a block."""
    ev, mono = ctx.core.evaluator, ctx.core.monomial(int(slot))
    try:
        consts = extract_coefficient(ctx, cts, slot)
    except (RuntimeError, ValueError) as exc:
        raise HEUnsupported(f"cannot purge a slot with this public context (missing Galois keys of a "
                            f"context made before removal support?): {exc}") from None
    for ct, c in zip(cts, consts):
        ev.multiply_plain_inplace(c, mono)
        ev.sub_inplace(ct, c)


def add_mod(dst: np.ndarray, src: np.ndarray, q: np.ndarray) -> None:
    """``dst = (dst + src) mod q`` in place for reduced ``(..., L, N)`` uint64 residues (``q``
    broadcast as ``(L, 1)``): SEAL's ``add_inplace`` on NTT-form data, bit for bit."""
    np.add(dst, src, out=dst)                       # < 2q < 2^62: no wrap
    np.subtract(dst, q, out=dst, where=dst >= q)


def sub_mod(dst: np.ndarray, src: np.ndarray, q: np.ndarray) -> None:
    """``dst = (dst - src) mod q`` in place (SEAL's ``sub_inplace``), see :func:`add_mod`."""
    borrow = dst < src
    np.subtract(dst, src, out=dst)                  # wraps mod 2^64 where dst < src ...
    np.add(dst, q, out=dst, where=borrow)           # ... and adding q brings it back below q


def purge_slot_arrays(ctx, data: np.ndarray, slot: int) -> None:
    """:func:`purge_slot` on a gallery block held as arrays: ``data`` is ``(d, 2, L, N)`` uint64
    (ciphertext ``k`` in NTT form at the first data level, scale ``params.scale``), modified in
    place. SEAL extracts the coefficient from ciphertexts rebuilt from the arrays; the
    subtraction is done on the arrays (the same residues SEAL's ``sub_inplace`` would give), so
    the block is never held twice as SEAL objects."""
    from . import raw

    core = ctx.core
    ev, mono, pid = core.evaluator, core.monomial(int(slot)), core.first_parms_id
    q = raw.moduli(core.ctx, pid)[:, None]
    cts = [raw.from_array(a, core.ctx, pid, ctx.params.scale) for a in data]
    try:
        consts = extract_coefficient(ctx, cts, slot)
    except (RuntimeError, ValueError) as exc:
        raise HEUnsupported(f"cannot purge a slot with this public context (missing Galois keys of a "
                            f"context made before removal support?): {exc}") from None
    del cts
    tmp = np.empty(data.shape[1:], dtype=np.uint64)
    for k, c in enumerate(consts):
        ev.multiply_plain_inplace(c, mono)
        sub_mod(data[k], raw.to_array(c, tmp), q)


__all__ = ["galois", "expand", "pack", "extract_coefficient", "purge_slot", "purge_slot_arrays",
           "add_mod", "sub_mod"]
