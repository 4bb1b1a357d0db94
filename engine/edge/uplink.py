"""The edge device's side of fleet oversight: turn what happened on the device since the last
bundle into signed bundles (an outbox in the device's store), and deliver them.

A bundle carries the next audit entries of the device's chain (at most ``max_entries``), the
change in the set of subjects it stores since the previous bundle (at most ``max_persons`` ids),
its counts, the assessments in force and its termination state -- never a template
(:mod:`engine.service.oversight`). Bundles are stored before they are sent, so one lost on the
way is sent again with the same bytes (the central service refuses an already accepted one as
``OVERSIGHT_REPLAYED``, which :func:`deliver` takes as delivered).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..service.audit import GENESIS
from ..service.oversight import BUNDLE_TYPE, BUNDLE_VERSION, MAX_ENTRIES, MAX_PERSONS_DELTA, SignedBundle, sign
from ..service.store import OutboxRow, Store


def _assessments(store: Store, tenant: str) -> list[dict]:
    current: dict[str, dict] = {}
    for a in store.assessments(tenant):          # versions in order: the last one per purpose wins
        current[a.purpose] = {"purpose": a.purpose, "sha256": a.sha256, "review_by": a.review_by}
    return [current[p] for p in sorted(current)]


def _termination(store: Store) -> dict | None:
    t = store.termination()
    if t is None:
        return None
    return {"decommissioned_at": t.decommissioned_at, "certificate_sha256": t.certificate_sha256,
            "filing_cancellation_deadline": t.deadline}


def new_bundles(store: Store, tenant: str, device_id: str, key: Ed25519PrivateKey, now: float,
                max_entries: int = MAX_ENTRIES, max_persons: int = MAX_PERSONS_DELTA) -> list[OutboxRow]:
    """Sign and store the bundles that bring the central service up to date (none when nothing
    changed since the last one)."""
    last = store.outbox_last()
    seq, digest, to_seq, head = (last.seq, last.digest, last.to_seq, last.head_hash) if last else (0, GENESIS, 0, GENESIS)
    held = set(last.persons) if last else set()
    current = set(store.stored_subjects(tenant))
    removed, added = sorted(held - current), sorted(current - held)
    head_seq, _ = store.audit_head()
    counts, off = store.counts(), store.off_device_summary()
    out: list[OutboxRow] = []
    while to_seq < head_seq or removed or added:
        n = min(max_entries, head_seq - to_seq)
        while True:
            entries = [dataclasses.asdict(e) for e in store.audit_entries(to_seq, n)] if n else []
            take_r = removed[:max_persons]
            take_a = added[:max(0, max_persons - len(take_r))]
            persons = (held - set(take_r)) | set(take_a)
            body = {
                "type": BUNDLE_TYPE, "version": BUNDLE_VERSION, "tenant": tenant, "device_id": device_id,
                "seq": seq + 1, "prev_bundle": digest, "created_at": now,
                "audit": {"from_seq": to_seq + 1, "to_seq": to_seq + len(entries), "prev_hash": head,
                          "head_hash": entries[-1]["hash"] if entries else head, "entries": entries},
                "persons": {"added": take_a, "removed": take_r, "count": len(persons)},
                "counts": {"templates_stored": counts.templates_stored, "consents_active": counts.consents_active,
                           "off_device_consents_active": off.active},
                "assessments": _assessments(store, tenant), "termination": _termination(store),
            }
            try:
                signed = sign(body, key)
                break
            except ValueError:            # too large: fewer entries per bundle
                if n <= 1:
                    raise
                n //= 2
        row = OutboxRow(seq + 1, now, signed.digest, body["audit"]["to_seq"], body["audit"]["head_hash"],
                        signed.bundle, signed.signature, sorted(persons))
        with store.transaction() as tx:
            tx.insert_outbox(row)
        out.append(row)
        seq, digest, to_seq, head, held = row.seq, row.digest, row.to_seq, row.head_hash, persons
        removed, added = removed[len(take_r):], added[len(take_a):]
    return out


def deliver(pending: list[OutboxRow], submit: Callable[[bytes, bytes], object],
            acknowledge: Callable[[int], None]) -> list:
    """Send ``pending`` bundles in order with ``submit(bundle, signature)`` (e.g.
    ``DeviceClient.submit_oversight``); ``acknowledge(seq)`` each delivered one. An
    ``OVERSIGHT_REPLAYED`` refusal means it was delivered before. Other errors stop (and raise):
    the rest stays in the outbox for the next attempt. Returns the receipts."""
    receipts = []
    for row in pending:
        try:
            receipts.append(submit(row.bundle, row.signature))
        except Exception as exc:
            if getattr(exc, "reason", "") != "OVERSIGHT_REPLAYED":
                raise
        acknowledge(row.seq)
    return receipts


class Uplink:
    """The device's channel to the central service for oversight only: ``SubmitOversight`` with
    this device's role token (it never carries a template: the bundle format has no place for one).
    ``target``, ``token``, channel options: as :class:`engine.client.OperatorClient`."""

    def __init__(self, target, token: str, device_id: str, tenant: str = "", **channel_options) -> None:
        from ..client.base import BaseClient  # noqa: PLC0415 - grpc only when delivering
        self._client = BaseClient(target, token, **channel_options)
        self.device_id, self.tenant = device_id, tenant

    def submit(self, bundle: bytes, signature: bytes):
        """One signed bundle -> ``SubmitOversightResponse`` (raises ``ServiceError``)."""
        from .._proto.veilface.v1 import matcher_pb2 as pb  # noqa: PLC0415
        return self._client._call("SubmitOversight", pb.SubmitOversightRequest(
            device_id=self.device_id, bundle=bundle, signature=signature, tenant=self.tenant))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["SignedBundle", "Uplink", "deliver", "new_bundles"]
