"""Units of the bulk/shard fast paths (no services needed): a template whose frame header was
validated once is checked on its payload alone -- same verdicts as the full validation layer; a
shard stacks payloads under one parsed header -- same gallery as template by template."""
from __future__ import annotations

import numpy as np
import pytest

from engine.schemes import make_scheme
from engine.service.config import ServiceConfig
from engine.service.matching import GalleryKey, SchemeCache
from engine.service.matching.ray_backend import GalleryShard
from engine.service.status import classify
from engine.service.usecases.bulk import SameHeaderReader
from engine.service.usecases.common import TemplateReader
from engine.template import Template

BIO, IOM = make_scheme("biohash:bits=256,dim=128"), make_scheme("iom:m=16,q=8,dim=128")


def _reason(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the typed reason is what is compared
        return classify(exc)[1]
    return "OK"


def _variants() -> list[bytes]:
    good = Template(BIO.spec, np.arange(32, dtype=np.uint8), 3).to_bytes()
    iom_ok = Template(IOM.spec, np.full(16, 7, dtype=np.uint8), 1).to_bytes()
    iom_bad = Template(IOM.spec, np.full(16, 8, dtype=np.uint8), 1).to_bytes()     # index q = out of range
    return [good, good[:-1], good + b"\0", iom_ok, iom_bad, good[:-32] + bytes(range(32)),
            good.replace(b'"key_version":3', b'"key_version":0'), b"", b"VFT", b"\x00junk"]


@pytest.mark.parametrize("i", range(10))
def test_same_header_reader_gives_the_validation_layers_verdicts(i):
    cfg = ServiceConfig().validate()
    full = TemplateReader(cfg, SchemeCache())
    fast = SameHeaderReader(TemplateReader(cfg, SchemeCache()))
    for warm in _variants()[:1] + _variants()[3:4]:   # the headers it will have seen
        fast.read(warm)
    blob = _variants()[i]
    assert _reason(lambda: fast.read(blob)) == _reason(lambda: full.read(blob))
    if _reason(lambda: full.read(blob)) == "OK":
        a, b = fast.read(blob), full.read(blob)
        assert a.spec_key == b.spec_key and a.template.key_version == b.template.key_version
        assert np.array_equal(a.template.data, b.template.data)


def test_shard_stacks_payloads_like_template_by_template():
    codes = np.random.default_rng(0).integers(0, 256, (300, 32), dtype=np.uint8)
    blobs = [Template(BIO.spec, c, 1 + (i % 2)).to_bytes() for i, c in enumerate(codes)]   # two headers
    ids = [f"p{i}" for i in range(300)]
    shard = GalleryShard(0, 1, "")
    for v in (1, 2):
        key = GalleryKey("default", "access_control", BIO.spec.key(), v)
        sel = [i for i in range(300) if 1 + (i % 2) == v]
        assert shard._add_blobs(key, [ids[i] for i in sel], [blobs[i] for i in sel]) == len(sel)
        hit = shard.local.search(key, Template(BIO.spec, codes[sel[7]], v), 1, None)[0]
        assert (hit.subject_id, hit.score) == (ids[sel[7]], 1.0) and shard.local.size(key) == 150
    bad = [blobs[0], blobs[2][:-1]]                                    # one payload cut short
    with pytest.raises(Exception, match="payload"):
        shard._add_blobs(GalleryKey("default", "x", BIO.spec.key(), 1), ["a", "b"], bad)
