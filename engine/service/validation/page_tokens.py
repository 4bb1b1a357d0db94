"""Opaque, authenticated page tokens.

A page token is ``base64url(payload) "." base64url(HMAC-SHA256(key, payload)[:16])`` where the
payload is canonical JSON of the listing it continues (``kind``), a digest of the query it was
issued for (tenant, filters: a token of one query cannot page another) and the cursor. A
token the server did not issue, or issued for another query, is ``BAD_PAGE_TOKEN``; so is a
cursor out of range (an audit sequence number outside ``[0, 2^63 - 1]``). The key is per server
(derived from the audit key when there is one, so replicas sharing the key accept each other's
tokens; random per process otherwise).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets

from ...framing import canonical_json
from ..status import BadRequest

MAX_TOKEN_CHARS = 512
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _bad(message: str = "bad page_token") -> BadRequest:
    return BadRequest(message, reason="BAD_PAGE_TOKEN")


class PageTokens:
    """Issues and reads page tokens under one key (``key=None``: a random one for this process)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:16]

    @staticmethod
    def _query(kind: str, query: dict) -> str:
        return hashlib.sha256(canonical_json({"kind": kind, **query})).hexdigest()[:16]

    def issue(self, kind: str, query: dict, cursor) -> str:
        """A token continuing listing ``kind`` of ``query`` (tenant, filters) after ``cursor``."""
        payload = canonical_json({"k": kind, "q": self._query(kind, query), "c": cursor})
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def read(self, token: str, kind: str, query: dict):
        """The cursor of ``token`` ("" -> None: the first page); ``BAD_PAGE_TOKEN`` if it was not issued
        by this server for this listing and query."""
        if not token:
            return None
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise _bad()
        body, mac = token.split(".")
        try:
            payload, tag = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            raise _bad() from None
        if not hmac.compare_digest(tag, self._mac(payload)):
            raise _bad("page_token was not issued by this server")
        try:
            d = json.loads(payload)
        except ValueError:
            raise _bad() from None
        if not isinstance(d, dict) or d.get("k") != kind or d.get("q") != self._query(kind, query):
            raise _bad("page_token belongs to another listing or query")
        return d.get("c")

    # -- the two listings --------------------------------------------------------------------------
    def audit_cursor(self, token: str, query: dict) -> int:
        c = self.read(token, "audit", query)
        if c is None:
            return 0
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 2**63 - 1:
            raise _bad("page_token cursor out of range")
        return c

    def subject_cursor(self, token: str, query: dict) -> str:
        c = self.read(token, "subjects", query)
        if c is None:
            return ""
        if not isinstance(c, str) or not _SUBJECT.fullmatch(c):
            raise _bad("page_token cursor out of range")
        return c
