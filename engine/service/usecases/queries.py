"""Read-only views: the subjects stored (operator) and the audit log (auditor), paginated."""
from __future__ import annotations

from dataclasses import dataclass

from .. import policy
from ..audit import AuditEvent, AuditRow, ChainReport
from ..scope import Scope
from ..status import BadRequest
from ..store import Store, SubjectSummary
from ..validation import PageTokens


@dataclass(frozen=True)
class SubjectsPage:
    subjects: list[SubjectSummary]
    next_page_token: str               # "" = last page
    total: int


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditRow]
    next_page_token: str


def _page_size(size: int) -> int:
    size = size or 100
    if not 1 <= size <= 1000:
        raise BadRequest("page_size must be in [1, 1000]", reason="BAD_PAGE_SIZE")
    return size


class Queries:
    """ListSubjects, GetAuditLog, VerifyAuditChain."""

    def __init__(self, store: Store, tokens: PageTokens | None = None) -> None:
        self.store = store
        self.tokens = tokens or PageTokens()     # opaque, authenticated page tokens (validation layer)

    def list_subjects(self, scope: Scope, page_size: int = 0, page_token: str = "", purpose: str = "") -> SubjectsPage:
        size = _page_size(page_size)
        purpose = policy.check_purpose(purpose) if purpose else ""
        query = {"tenant": scope.tenant, "purpose": purpose}
        after = self.tokens.subject_cursor(page_token, query)
        rows = self.store.list_subjects(scope.tenant, after, size + 1, purpose)
        total = self.store.count_subjects(scope.tenant, purpose)
        more = len(rows) > size
        rows = rows[:size]
        token = self.tokens.issue("subjects", query, rows[-1].subject) if more and rows else ""
        scope.ev.details = {"returned": len(rows)}
        return SubjectsPage(rows, token, total)

    def audit_log(self, ev: AuditEvent, page_size: int = 0, page_token: str = "", action: str = "",
                  subject: str = "") -> AuditPage:
        size = _page_size(page_size)
        query = {"action": action[:64], "subject": subject[:128]}
        after = self.tokens.audit_cursor(page_token, query)
        rows = self.store.audit_entries(after, size + 1, action, subject)
        more = len(rows) > size
        rows = rows[:size]
        ev.details = {"returned": len(rows)}
        return AuditPage(rows, self.tokens.issue("audit", query, rows[-1].seq) if more else "")

    def verify_chain(self, ev: AuditEvent) -> ChainReport:
        r = self.store.verify_audit()
        ev.details = {"ok": r.ok, "entries": r.entries}
        return r
