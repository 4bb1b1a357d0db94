"""ResetLockout: the audited operator / admin action that lifts intrusion-detection lock-outs
before their time (issue 10). The audit entry is committed *before* the lock is lifted."""
from __future__ import annotations

from .. import policy
from ..ratelimit import IntrusionDetector
from ..scope import Scope
from ..status import BadRequest
from ..store import Store
from ..validation import normalise_label


class Lockouts:
    """ResetLockout."""

    def __init__(self, store: Store, intrusion: IntrusionDetector) -> None:
        self.store, self.intrusion = store, intrusion

    def reset(self, scope: Scope, token_name: str = "", reason_code: str = "") -> int:
        """Lift the VERIFY_BURST lock of ``scope.subject`` and / or the caller lock-outs of the
        token named ``token_name`` in ``scope.tenant``; returns how many were active."""
        if not scope.subject and not token_name:
            raise BadRequest("name a subject_id or a token_name", reason="MISSING_LOCKOUT")
        if token_name:
            policy.check_id("token name", token_name)
        try:
            reason = normalise_label(reason_code, 48)
        except BadRequest:
            reason = ""
        if not reason:
            raise BadRequest("reason_code (a short label) is required", reason="MISSING_REASON_CODE")
        scope.ev.details = {"reason_code": reason, "token_name": token_name}
        with self.store.transaction() as tx:       # audited first: no lock is lifted unrecorded
            tx.audit(scope.ev)
        return self.intrusion.reset(f"{scope.tenant}/{scope.subject}" if scope.subject else "",
                                    f"{scope.tenant}/{token_name}#" if token_name else "")
