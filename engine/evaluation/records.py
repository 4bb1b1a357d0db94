"""Typed records of ``report.json``: one :class:`SchemeRecord` per scheme and parameter set.

Studies return dataclasses; :func:`to_dict` is the one place where they become JSON-ready
dicts. Field metadata steers it: ``report=False`` keeps a field (score arrays, histograms) out
of the JSON, ``flatten=True`` merges a dict field into its parent (``inversion["0.001"]``),
``omit_none=True`` leaves out an optional field that is None.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the studies import this module; their types are only needed for annotations
    from ..benchmark.schemes import CodeSchemeSpeed, EncryptedSchemeSpeed
    from .metrics import Linkability
    from .studies.accuracy import Accuracy
    from .studies.encrypted import DecryptionError
    from .studies.folds import FoldAccuracy
    from .studies.irreversibility import Inversion
    from .studies.renewability import Renewability
    from .studies.unlinkability import Unlinkability

OMIT_NONE = {"omit_none": True}
NOT_REPORTED = {"report": False}


def to_dict(obj: Any) -> Any:
    """A JSON-ready copy of ``obj``: dataclasses (by their field metadata), dicts, sequences,
    numpy scalars and arrays; non-finite floats become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict = {}
        for f in dataclasses.fields(obj):
            if not f.metadata.get("report", True):
                continue
            value = getattr(obj, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            if f.metadata.get("flatten"):
                out.update(to_dict(value))
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return to_dict(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class NotApplicable:
    """A study that does not apply to a scheme, and why (``status`` ``"n/a"``)."""

    note: str
    status: str = "n/a"


@dataclass
class SchemeRecord:
    """One row of the report. Headline fields (``eer``, ``d_sys``...) are derived in
    :meth:`to_dict` from the study results, never stored twice."""

    scheme: str
    params: dict
    factory: str
    label: str
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    reason: str | None = field(default=None, metadata=OMIT_NONE)
    bytes_per_template: int | None = None
    normal: Accuracy | None = None
    stolen_token: Accuracy | None = None
    unlinkability: Unlinkability | NotApplicable | None = None
    renewability: Renewability | NotApplicable | None = None
    inversion: Inversion | NotApplicable | None = None
    speed: CodeSchemeSpeed | EncryptedSchemeSpeed | None = None
    seconds: float = 0.0
    plaintext_same_pairs: Accuracy | None = field(default=None, metadata=OMIT_NONE)      # encrypted schemes
    decryption_error: DecryptionError | None = field(default=None, metadata=OMIT_NONE)   # encrypted schemes
    folds: dict[str, FoldAccuracy] | None = field(default=None, metadata=OMIT_NONE)     # pairs files with folds

    def to_dict(self) -> dict:
        out = to_dict(self)
        normal, stolen = out.get("normal") or {}, out.get("stolen_token") or {}
        unl, inv = out.get("unlinkability") or {}, out.get("inversion") or {}
        out["eer"] = normal.get("eer")
        out["fnmr_at_fmr"] = normal.get("fnmr_at_fmr")
        out["eer_stolen_token"] = stolen.get("eer")
        out["fnmr_at_fmr_stolen_token"] = stolen.get("fnmr_at_fmr")
        out["d_sys"] = unl.get("d_sys")
        out["d_null"] = unl.get("d_null")
        out["inversion_success"] = (
            {k: {"type1": v["type1"]["rate"], "type2": v["type2"]["rate"]}
             for k, v in inv.items() if isinstance(v, dict) and "type1" in v}
            if inv.get("status") == "ok" else None)
        return out


@dataclass
class SchemeResult:
    """A record and the score arrays behind it (plots, ``scores.npz``)."""

    record: SchemeRecord
    arrays: dict = field(default_factory=dict)
    linkage: Linkability | None = None  # of the unlinkability study (plots)

    def __post_init__(self) -> None:
        self._dict: dict | None = None

    def as_dict(self) -> dict:
        """``record.to_dict()``, computed once."""
        if self._dict is None:
            self._dict = self.record.to_dict()
        return self._dict
