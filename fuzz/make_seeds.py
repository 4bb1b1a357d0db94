"""Write the hostile inputs of issue 10 as literal seeds into fuzz/regressions/<target>/ (they are
replayed by tests/test_harden_fuzz.py and seed the atheris corpora). Run from the repository root:
python -m fuzz.make_seeds"""
from __future__ import annotations

import struct
from pathlib import Path

from engine.framing import canonical_json
from engine.schemes import make_scheme

from . import gen

OUT = Path(__file__).resolve().parent / "regressions"
OK = {"dtype": "uint8", "key_version": 1, "params": {"bits": 256, "dim": 128}, "scheme": "biohash", "shape": [32],
      "version": make_scheme("biohash:bits=256,dim=128").spec.version}


def frame(magic: bytes, header: bytes, payload: bytes) -> bytes:
    return magic + struct.pack("<BI", 1, len(header)) + header + payload


def main() -> None:
    hb = canonical_json(OK)
    seeds = {
        "template": {
            "header-infinity": frame(b"VFT", hb.replace(b'"key_version":1', b'"key_version":Infinity'), bytes(32)),
            "header-1e999": frame(b"VFT", hb.replace(b'"dim":128', b'"dim":1e999'), bytes(32)),
            "deep-nesting": frame(b"VFT", hb.replace(b'"dim":128', b'"dim":' + b"[" * 20000 + b"]" * 20000), bytes(32)),
            "shape-2^32": frame(b"VFT", canonical_json({**OK, "shape": [2**32, 2**32]}), bytes(32)),
            "dtype-dict": frame(b"VFT", canonical_json({**OK, "dtype": {"x": 1}}), bytes(32)),
            "key-version-2^63": frame(b"VFT", canonical_json({**OK, "key_version": 2**63}), bytes(32)),
            "wolf": gen.honest_template("rotation:dim=128")[:-512] + struct.pack("<f", 1e30) * 128,
        },
        "he_blob": {},
        "he_context": {},
    }
    m = gen.he_material()
    h, payload = gen.split_frame(gen.split_frame(m["probe"], b"VFT")[1], b"VFHE")
    raw = canonical_json(h)
    seeds["he_blob"]["parts-1e999"] = frame(b"VFHE", raw.replace(f'"parts":[{len(payload)}]'.encode(), b'"parts":[1e999]'),
                                            payload)
    seeds["he_blob"]["two-parts"] = frame(b"VFHE", canonical_json({**h, "parts": [len(payload)] * 2}), payload * 2)
    ch, cpay = gen.split_frame(m["context"], b"VFHE")
    for name, hh in (("no-params", {k: v for k, v in ch.items() if k != "params"}),
                     ("no-tenant", {k: v for k, v in ch.items() if k != "tenant"}),
                     ("no-epoch", {k: v for k, v in ch.items() if k != "epoch"}),
                     ("epoch-x", {**ch, "epoch": "x"})):
        seeds["he_context"][name] = frame(b"VFHE", canonical_json(hh), cpay)
    secret = gen.split_parts(*gen.split_frame(m["secret"], b"VFHE"))[1]
    seeds["he_context"]["secret-appended"] = frame(b"VFHE", canonical_json({**ch, "parts": [len(cpay) + len(secret)]}),
                                                   cpay + secret)
    for target, items in seeds.items():
        (OUT / target).mkdir(parents=True, exist_ok=True)
        for name, data in items.items():
            (OUT / target / name).write_bytes(data)


if __name__ == "__main__":
    main()
