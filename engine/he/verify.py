"""1:1 (verify-mode) encrypted gallery: one template ciphertext per subject, sanitised results."""
from __future__ import annotations

import tenseal.sealapi as seal

from ..errors import NotEnrolled
from ..validation import check_subject_id
from .errors import HEFormatError
from .gallery import EncryptedGallery, ciphertext_bytes
from .sanitize import Sanitizer
from .sealio import seal_save
from .wire import pack_blob


class VerifyGallery(EncryptedGallery):
    """1:1 encrypted gallery: one template ciphertext per subject; results are sanitised."""

    mode = "verify"

    def __init__(self, context) -> None:
        super().__init__(context)
        self._index: dict[str, object] = {}      # subject -> template Ciphertext
        self._sanitizer: Sanitizer | None = None

    @property
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template."""
        p = self.params
        return float(2 * p.poly_degree * len(p.data_moduli) * 8)

    def memory_bytes(self) -> int:
        """Bytes of ciphertext data this gallery holds right now."""
        with self._lock:
            return sum(ciphertext_bytes(ct) for ct in self._index.values())

    def _store(self, subject_id: str, ct, blob: bytes) -> None:
        self._index[subject_id] = ct

    def remove(self, subject_id: str) -> bool:
        with self._lock:
            return self._index.pop(subject_id, None) is not None

    # -- matching --------------------------------------------------------------------------
    def verify(self, subject_id: str, probe) -> bytes:
        """1:1: encrypted, sanitised score of ``probe`` against ``subject_id`` -> ``score`` blob."""
        probe_ct = self._load_probe(probe)
        with self._lock:
            tpl = self._index.get(subject_id)
            if tpl is None:
                raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
        ct = self.verify_ct(probe_ct, tpl)
        return pack_blob("score", dict(self.ctx.header(), subject=subject_id, pos=0),
                         [seal_save(ct)])

    def product(self, probe_ct, template_ct):
        """The bare ct x ct product (size 3, *not* safe to release: see :mod:`engine.he.sanitize`)."""
        out = seal.Ciphertext()
        self.ctx.core.evaluator.multiply(probe_ct, template_ct, out)
        return out

    def verify_ct(self, probe_ct, template_ct):
        """The hot path of :meth:`verify` on loaded ciphertexts: product, relinearisation, mask and
        flood (size-2 result; coefficient 0 is the score)."""
        if self._sanitizer is None:
            self._sanitizer = Sanitizer(self.ctx, 0)
        ct = self.product(probe_ct, template_ct)
        self._sanitizer.apply(ct)
        return ct

    # -- snapshot ----------------------------------------------------------------------------
    def _snapshot_state(self) -> tuple[dict, list[bytes]]:
        ids = list(self._index)
        return {"subjects": ids}, [seal_save(self._index[s]) for s in ids]

    def _parse_snapshot(self, h: dict, parts: list[bytes]) -> dict:
        ids = [check_subject_id(s) for s in h["subjects"]]
        if len(ids) != len(parts) or len(set(ids)) != len(ids):
            raise HEFormatError("gallery snapshot: subjects do not match its ciphertexts")
        return {s: self._load_ct(p) for s, p in zip(ids, parts)}

    def _install(self, state: dict) -> None:
        self._index = state


__all__ = ["VerifyGallery"]
