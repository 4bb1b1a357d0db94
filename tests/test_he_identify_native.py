"""The identify gallery's native storage and search (issue 11): blocks as uint64 arrays, the
kernel + SEAL pipeline bit-equal to the SEAL-only loop, array bulk loads, snapshot files (format 2,
format 1 still read) with every array from disk checked. Small dimension (16) keeps it quick."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine import kernels as K  # noqa: E402
from engine.errors import InvalidParameter  # noqa: E402
from engine.he import (  # noqa: E402
    EncryptedGallery,
    HEFormatError,
    KeyHolder,
    blob_header,
    encrypt_block_blob,
    pack_blob,
    raw,
    unpack_blob,
)
from engine.he.sealio import seal_save  # noqa: E402

from .test_he import TOL, unit  # noqa: E402

DIM = 16


@pytest.fixture(scope="module")
def kh():
    return KeyHolder("identify", DIM, tenant="t-native")


@pytest.fixture(scope="module")
def filled(kh):
    """A gallery with a bulk-loaded block, a block of single adds and one purged slot."""
    rng = np.random.default_rng(41)
    pub = kh.public_context()
    g = EncryptedGallery(pub)
    y = unit(rng, 300, DIM)
    g.add_block([f"b{i}" for i in range(300)], encrypt_block_blob(pub, y))
    for i in range(3):
        g.add(f"a{i}", pub.encrypt(y[i]))
    g.add_block([f"c{i}" for i in range(5)], raw.to_arrays(pub.encrypt_block(y[:5])))
    assert g.remove("b7")
    return g, y


def _seal_parts(g, probe_blob):
    """The SEAL-only search (multiply + add_inplace per dimension) as uncompressed parts."""
    pieces = g.expand_probe(g._load_probe(probe_blob))
    blocks = [g.block_ciphertexts(b) for b in range(len(g._blocks)) if g._blocks[b].data is not None]
    return [raw.ciphertext_bytes(ct) for ct in g.search_cts(pieces, blocks + [pieces])]


def test_search_is_bit_equal_to_the_seal_loop(kh, filled):
    g, y = filled
    pub = kh.public_context()
    probe = unit(np.random.default_rng(42), 1, DIM)[0]
    pb = pub.encrypt(probe, "probe")
    want = _seal_parts(g, pb)
    h, parts = unpack_blob(g.search(pb))
    assert h["norm"] is True and len(parts) == len(want) == 3      # 2 blocks + the norm
    assert parts == want
    # every pipeline shape gives the same bits: blocks per kernel call, kernel threads
    pieces = g.expand_probe(g._load_probe(pb))
    arr = g.probe_array(pieces)
    blocks = g.block_arrays() + [arr]
    for per_call, threads in ((1, 1), (3, 0), (8, 2)):
        g.n_threads = threads
        assert g.search_arrays(arr, blocks, pieces[0].scale, per_call=per_call) == want
    g.n_threads = 0
    ids, s = kh.decrypt_scores(g.search(pb))
    ref = {**{f"b{i}": y[i] for i in range(300)}, **{f"a{i}": y[i] for i in range(3)},
           **{f"c{i}": y[i] for i in range(5)}}
    assert "b7" not in ids and sorted(ids) == sorted(set(ref) - {"b7"})
    assert np.abs(s - np.array([probe @ ref[i] for i in ids])).max() < TOL


def test_blocks_are_owned_aligned_arrays(kh, filled):
    g, _ = filled
    arrays = g.block_arrays()
    assert len(arrays) == 2 and g.block_shape == (DIM, 2, 2, 8192)
    for a in arrays:
        assert a.dtype == np.uint64 and a.shape == g.block_shape and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0 and a.base is not None and K.ckks_max_excess(a, g._q) == 0
    assert len({a.ctypes.data for a in arrays}) == 2
    assert g.memory_bytes() == 2 * DIM * 2 * 2 * 8192 * 8 and g.bytes_per_template == DIM * 32


def test_add_block_from_arrays(kh):
    rng = np.random.default_rng(43)
    pub = kh.public_context()
    y = unit(rng, 40, DIM)
    arr = raw.to_arrays(pub.encrypt_block(y))
    g = EncryptedGallery(pub)
    g.add_block([f"s{i}" for i in range(40)], arr)
    probe = unit(rng, 1, DIM)[0]
    ids, s = kh.decrypt_scores(g.search(pub.encrypt(probe, "probe")))
    assert ids == [f"s{i}" for i in range(40)] and np.abs(s - y @ probe).max() < TOL
    half = EncryptedGallery(pub, part=(1, 2))           # a dimension shard takes its dimensions
    half.add_block([f"s{i}" for i in range(40)], arr)
    np.testing.assert_array_equal(half.block_arrays()[0], arr[1::2])
    bad = arr.copy()
    bad[3, 1, 0, 17] = np.uint64(2**64 - 1)             # unreduced: refused, nothing stored
    for a in (bad, arr.astype(np.int64), arr[:, :1], arr[:5]):
        with pytest.raises(HEFormatError):
            g.add_block(["z"], a)
    assert "z" not in g and len(g) == 40
    with pytest.raises(HEFormatError):                  # more ids than a block holds
        g.add_block([f"z{i}" for i in range(8193)], arr)


def test_snapshot_file_round_trip_and_checks(kh, filled, tmp_path):
    g, _ = filled
    pub = kh.public_context()
    pb = pub.encrypt(unit(np.random.default_rng(44), 1, DIM)[0], "probe")
    want = unpack_blob(g.search(pb))[1]
    snap = g.snapshot()
    path = tmp_path / "g.vfhe"
    assert g.save_snapshot(path) == len(snap) and path.read_bytes() == snap
    h = blob_header(snap)
    assert h["snapshot_format"] == 2 and h["array_shape"] == list(g.block_shape)
    assert len(h["parts"]) == 2 and all(p == DIM * 2 * 2 * 8192 * 8 for p in h["parts"])
    for source in (path, str(path), io.BytesIO(snap), snap):
        r = EncryptedGallery.restore(pub, source)
        assert r._where == g._where and r.purged == g.purged
        assert unpack_blob(r.search(pb))[1] == want
    # a file from disk is not trusted: unreduced coefficients, truncation, trailing bytes
    corrupt = bytearray(snap)
    corrupt[-8:] = b"\xff" * 8
    truncated = snap[:-1000]
    for bad in (bytes(corrupt), truncated, snap + b"x"):
        p = tmp_path / "bad.vfhe"
        p.write_bytes(bad)
        with pytest.raises(HEFormatError):
            EncryptedGallery.restore(pub, p)
        with pytest.raises(HEFormatError):
            EncryptedGallery.restore(pub, bad)
    (tmp_path / "junk.vfhe").write_bytes(b"not a snapshot at all")
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, tmp_path / "junk.vfhe")
    # a header that claims another array shape, or another dimension part, is refused
    h, parts = unpack_blob(snap)
    head = {k: v for k, v in h.items() if k not in ("kind", "parts")}
    for bad in (dict(array_shape=[DIM, 2, 2, 4096]), dict(array_shape="x"), dict(array_shape=None),
                dict(array_dtype=">u8"), dict(snapshot_format=3), dict(blocks=[{"ids": [], "cts": True}]),
                dict(blocks=h["blocks"][:1])):          # the second block's array left over
        with pytest.raises(HEFormatError):
            EncryptedGallery.restore(pub, pack_blob("gallery_snapshot", dict(head, **bad), parts))
    with pytest.raises(HEFormatError):                  # a part of the wrong size
        EncryptedGallery.restore(pub, pack_blob("gallery_snapshot", head, [parts[0], parts[1][:-8]]))
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, snap, part=(0, 2))


def test_format1_snapshot_is_still_read(kh, filled):
    """Snapshots of the SEAL-object gallery (format 1: one SEAL serialisation per ciphertext)
    load into the array gallery unchanged."""
    g, _ = filled
    pub = kh.public_context()
    h, _ = unpack_blob(g.snapshot())
    head = {k: v for k, v in h.items() if k not in ("kind", "parts", "array_shape", "array_dtype")}
    parts = [seal_save(ct) for b in range(len(g._blocks)) for ct in g.block_ciphertexts(b)]
    old = pack_blob("gallery_snapshot", dict(head, snapshot_format=1), parts)
    r = EncryptedGallery.restore(pub, old)
    for a, b in zip(r.block_arrays(), g.block_arrays()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, pack_blob("gallery_snapshot", dict(head, snapshot_format=1), parts[:-1]))


def test_expansion_helper_process(kh, filled):
    """expand_processes=1: a helper process expands half of the probe's dimensions; the result
    is the same bytes, and a dead helper only means expanding in this process again."""
    g0, _ = filled
    pub = kh.public_context()
    g = EncryptedGallery.restore(pub, g0.snapshot(), expand_processes=1)
    try:
        helper = g._helper
        assert helper is not None and helper.alive()
        pb = pub.encrypt(unit(np.random.default_rng(45), 1, DIM)[0], "probe")
        want = unpack_blob(g0.search(pb))[1]
        assert unpack_blob(g.search(pb))[1] == want
        arr, scale = g.expand_probe_array(g._load_probe(pb), pb)
        ref, ref_scale = g0.expand_probe_array(g0._load_probe(pb))
        np.testing.assert_array_equal(arr, ref)
        assert scale == ref_scale and arr.ctypes.data % 64 == 0
        assert helper.try_acquire()                       # busy helper: this thread expands alone
        try:
            assert unpack_blob(g.search(pb))[1] == want
        finally:
            helper._busy.release()
        helper._proc.kill()
        helper._proc.join(10)
        assert unpack_blob(g.search(pb))[1] == want        # dead helper: same result, no hang
        assert g._helper is None
    finally:
        g.close()
    g.close()                                             # idempotent
    with pytest.raises(InvalidParameter):
        EncryptedGallery(pub, expand_processes=2)
