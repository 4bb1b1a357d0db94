"""CKKS (TenSEAL/SEAL) matching: correctness vs plaintext, threat-model separation, revocation,
serialisation. Small galleries keep the whole file well under a minute."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

import tenseal.sealapi as seal  # noqa: E402

from engine.errors import NotEnrolled, TemplateFormatError, VeilfaceError  # noqa: E402
from engine.he import (  # noqa: E402
    EncryptedGallery,
    HEContextMismatch,
    HEEpochRevoked,
    HEFormatError,
    HEPrivateContext,
    HEUnsupported,
    KeyHolder,
    PublicContext,
    blob_header,
    encrypt_block_blob,
)
from engine.he.context import core_for, pack_blob, unpack_blob  # noqa: E402
from engine.schemes import make_scheme  # noqa: E402
from engine.template import Template  # noqa: E402

TOL = 1e-3


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(rng, x, noise):
    y = x + noise / np.sqrt(x.shape[-1]) * rng.standard_normal(x.shape)
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def vkh():
    return KeyHolder("verify", 128, tenant="t-verify")


@pytest.fixture(scope="module")
def ikh():
    return KeyHolder("identify", 64, tenant="t-identify")


# ------------------------------------------------------------------------------------------
# 1:1
@pytest.mark.parametrize("dim", [128, 512])
def test_verify_matches_plaintext(dim):
    rng = np.random.default_rng(dim)
    kh = KeyHolder("verify", dim, tenant="acme")
    pub = kh.public_context()
    gallery = EncryptedGallery(PublicContext.from_bytes(pub.to_bytes()))
    x = unit(rng, 6, dim)
    for i, v in enumerate(x):
        gallery.add(f"s{i}", pub.encrypt(v, "template"))
    errs = []
    for i in range(6):
        for probe in (near(rng, x[i], 0.05), near(rng, x[i], 0.5), unit(rng, 1, dim)[0]):
            for j in (i, (i + 1) % 6):
                blob = gallery.verify(f"s{j}", pub.encrypt(probe, "probe"))
                ids, s = kh.decrypt_scores(blob)
                assert ids == [f"s{j}"]
                errs.append(abs(s[0] - probe @ x[j]))
    assert max(errs) < TOL
    # decision with threshold, score rounded
    blob = gallery.verify("s0", pub.encrypt(near(rng, x[0], 0.05), "probe"))
    ok, score = kh.verify_decision(blob, threshold=0.8)
    assert ok and score > 0.9 and round(score, 4) == score
    with pytest.raises(NotEnrolled):
        gallery.verify("nobody", pub.encrypt(x[0], "probe"))


def test_verify_result_reveals_only_the_score(vkh):
    """The other coefficients of the product (probe/template correlations) are masked."""
    rng = np.random.default_rng(3)
    pub = vkh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 1, 128)[0]
    g.add("s", pub.encrypt(x))
    blob = g.verify("s", pub.encrypt(x, "probe"))
    _, cts = pub.load_ciphertexts(blob, "score")
    coeffs = vkh._decrypt_coeffs(cts[0])
    assert abs(coeffs[127] - 1.0) < TOL
    others = np.delete(coeffs, 127)
    assert np.abs(others).mean() > 10  # random mask (|m| < 2^52 / 2^46 = 64), not correlations in [-1, 1]


# ------------------------------------------------------------------------------------------
# 1:N
def test_identify_matches_plaintext_add_block_and_remove(ikh):
    rng = np.random.default_rng(11)
    pub = ikh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 3, 64)
    for i, v in enumerate(x):
        g.add(f"a{i}", pub.device_context().encrypt(v))
    y = unit(rng, 200, 64)
    y[5] = near(rng, x[1], 0.05)  # near duplicate of an enrolled subject
    g.add_block([f"b{i}" for i in range(200)], encrypt_block_blob(pub, y))
    assert len(g) == 203 and "a1" in g and "b199" in g

    ref = {**{f"a{i}": x[i] for i in range(3)}, **{f"b{i}": y[i] for i in range(200)}}
    probe = near(rng, x[1], 0.2)
    blob = g.search(pub.encrypt(probe, "probe"))
    ids, s = ikh.decrypt_scores(blob)
    assert sorted(ids) == sorted(ref)
    truth = np.array([probe @ ref[i] for i in ids])
    assert np.abs(s - truth).max() < TOL
    top = ikh.decide(blob, k=2)
    assert {m.subject_id for m in top} == {"a1", "b5"}
    assert ikh.decide(blob, k=5, threshold=2.0) == []

    assert g.remove("a1") and not g.remove("a1")
    blob = g.search(pub.encrypt(probe, "probe"))
    ids, s = ikh.decrypt_scores(blob)
    assert "a1" not in ids and len(ids) == 202
    truth = np.array([probe @ ref[i] for i in ids])
    assert np.abs(s - truth).max() < TOL  # purged: nothing of a1 is left over
    before = dict(zip(ids, s))
    assert g.remove("b5")  # bulk-loaded subjects are removed one by one as well
    ids, s = ikh.decrypt_scores(g.search(pub.encrypt(probe, "probe")))
    assert "b5" not in ids and len(ids) == 201
    assert max(abs(before[i] - v) for i, v in zip(ids, s)) < TOL  # the others' scores are unchanged
    assert ikh.decide(g.search(pub.encrypt(probe, "probe")), k=1)[0].subject_id != "b5"
    # re-add into the freed slot
    g.add("a1", pub.encrypt(x[1]))
    ids, s = ikh.decrypt_scores(g.search(pub.encrypt(x[1], "probe")))
    assert abs(s[ids.index("a1")] - 1.0) < TOL


def test_removal_deletes_the_data_and_keeps_nothing_per_template(ikh):
    """Withdrawal: the removed template's coefficients are gone from every block ciphertext (not
    just left out of the result table), and no per-template upload is kept to make that possible."""
    rng = np.random.default_rng(12)
    pub = ikh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 6, 64)
    for i, v in enumerate(x):
        g.add(f"a{i}", pub.encrypt(v))
    y = unit(rng, 50, 64)
    g.add_block([f"b{i}" for i in range(50)], encrypt_block_blob(pub, y))
    ct_bytes = 2 * 8192 * 2 * 8
    # memory: exactly the block ciphertexts (2 blocks x 64 dims), nothing per subject
    assert g.memory_bytes() == 2 * 64 * ct_bytes and not g._blobs
    slots = {sid: g._where[sid] for sid in ("a2", "b7")}
    assert g.remove("a2") and g.remove("b7") and g.purged == 2
    assert g.memory_bytes() == 2 * 64 * ct_bytes
    for sid, (b, j) in slots.items():  # the key holder (test only) sees noise where the data was
        coeffs = np.array([ikh._decrypt_coeffs(ct) for ct in g._blocks[b].dims])
        assert np.abs(coeffs[:, j]).max() < 1e-4
        truth = (x if sid.startswith("a") else y)
        live = [k for k, s in enumerate(g._blocks[b].ids) if s is not None][:5]
        for k in live:  # neighbours intact
            src = truth[int(g._blocks[b].ids[k][1:])]
            assert np.abs(coeffs[:, k] - src).max() < 1e-4
    # keep_templates=True still removes by exact subtraction (old behaviour, 256 KB per subject)
    g2 = EncryptedGallery(pub, keep_templates=True)
    g2.add("k", pub.encrypt(x[0]))
    g2.add("l", pub.encrypt(x[1]))
    assert g2.memory_bytes() > 64 * ct_bytes and g2.remove("k") and g2.purged == 0
    assert g2.memory_bytes() < 64 * ct_bytes + 300_000 and "l" in g2
    assert g2.remove("l") and g2.memory_bytes() == 0  # an emptied block is dropped altogether
    _, s = ikh.decrypt_scores(g.search(pub.encrypt(x[0], "probe")))
    assert len(s) == 54


def test_extract_coefficient_and_dimension_parts(ikh):
    from engine.he.gallery import add_partial_scores, extract_coefficient, split_block_blob

    rng = np.random.default_rng(13)
    pub = ikh.public_context()
    vals = rng.standard_normal((3, 8192))
    cts = [pub._encrypt_coeffs(v) for v in vals]
    for j in (0, 4097, 8191):
        got = [ikh._decrypt_coeffs(c) for c in extract_coefficient(pub, cts, j)]
        for v, c in zip(vals, got):  # a constant: coefficient j at 0, nothing elsewhere
            assert abs(c[0] - v[j]) < 1e-4 and np.abs(c[1:]).max() < 1e-4
    # two dimension halves give partial scores that add up to the whole
    y = unit(rng, 40, 64)
    block = encrypt_block_blob(pub, y)
    halves = [EncryptedGallery(pub, part=(r, 2)) for r in (0, 1)]
    halves[0].add_block([f"b{i}" for i in range(40)], split_block_blob(block, (0, 2)))
    halves[1].add_block([f"b{i}" for i in range(40)], block)  # whole blob accepted too
    assert halves[0].dims == list(range(0, 64, 2))
    for h in halves:
        h.remove("b3")
    probe = unit(rng, 1, 64)[0]
    pb = pub.encrypt(probe, "probe")
    ids, s = ikh.decrypt_scores(add_partial_scores(pub, [h.search(pb) for h in halves]))
    assert "b3" not in ids and len(ids) == 39
    assert np.abs(s - y[[int(i[1:]) for i in ids]] @ probe).max() < TOL
    with pytest.raises(VeilfaceError):
        EncryptedGallery(pub, part=(0, 3))


def test_sharded_gallery_same_scores(ikh):
    from engine.he.shards import ShardedEncryptedGallery

    rng = np.random.default_rng(5)
    pub = ikh.public_context()
    y = unit(rng, 300, 64)
    with ShardedEncryptedGallery(pub.to_bytes(), shards=2) as g:
        g.add_block([f"b{i}" for i in range(150)], encrypt_block_blob(pub, y[:150]))
        g.add_block([f"c{i}" for i in range(150)], encrypt_block_blob(pub, y[150:]))
        g.add("x", pub.encrypt(y[7]))
        assert len(g) == 301
        probe = near(rng, y[200], 0.1)
        ids, s = ikh.decrypt_scores(g.search(pub.encrypt(probe, "probe")))
        ref = {**{f"b{i}": y[i] for i in range(150)}, **{f"c{i}": y[150 + i] for i in range(150)}, "x": y[7]}
        assert sorted(ids) == sorted(ref)
        assert np.abs(s - np.array([probe @ ref[i] for i in ids])).max() < TOL
        assert g.split == "dims"
        before = dict(zip(ids, s))
        assert g.remove("x") and "x" not in g
        assert g.remove("c3") and not g.remove("c3")  # block-loaded: purged in both shards
        ids, s = ikh.decrypt_scores(g.search(pub.encrypt(probe, "probe")))
        assert len(ids) == 299 and not {"x", "c3"} & set(ids)
        assert max(abs(before[i] - v) for i, v in zip(ids, s)) < TOL
        with pytest.raises(HEContextMismatch):
            g.search(KeyHolder("identify", 64, "other").encrypt(probe, "probe"))
    with ShardedEncryptedGallery(pub, shards=2, split="blocks") as g:
        g.add_block([f"b{i}" for i in range(150)], encrypt_block_blob(pub, y[:150]))
        g.add_block([f"c{i}" for i in range(150)], encrypt_block_blob(pub, y[150:]))
        assert g.remove("b4") and g.remove("c4")
        ids, s = ikh.decrypt_scores(g.search(pub.encrypt(probe, "probe")))
        assert len(ids) == 298 and not {"b4", "c4"} & set(ids)
        assert np.abs(s - np.array([probe @ ref[i] for i in ids])).max() < TOL


def test_dead_shard_raises_instead_of_hanging(ikh):
    from engine.he.errors import HEError
    from engine.he.shards import ShardedEncryptedGallery

    rng = np.random.default_rng(6)
    pub = ikh.public_context()
    with ShardedEncryptedGallery(pub, shards=2) as g:
        g.add_block([f"b{i}" for i in range(10)], encrypt_block_blob(pub, unit(rng, 10, 64)))
        g._procs[1].kill()
        g._procs[1].join(10)
        with pytest.raises(HEError, match="died|closed"):
            g.search(pub.encrypt(unit(rng, 1, 64)[0], "probe"))


# ------------------------------------------------------------------------------------------
# threat model: the matcher's side is public only
def test_matcher_context_is_public_and_refuses_secrets(vkh, ikh):
    for kh in (vkh, ikh):
        pub = kh.public_context()
        assert kh.is_private() and not pub.is_private()
        secret = kh.to_bytes()
        with pytest.raises(HEPrivateContext):
            PublicContext.from_bytes(secret)
        with pytest.raises(HEPrivateContext):
            EncryptedGallery(kh)
        loaded = PublicContext.from_bytes(pub.to_bytes())
        assert not loaded.is_private() and loaded.fingerprint == kh.fingerprint
        assert not hasattr(loaded, "_sk") and not hasattr(loaded, "decrypt_scores")
        # the public blob does not contain the serialised secret key
        sk_bytes = unpack_blob(secret)[1][1]
        assert sk_bytes[64:128] not in pub.to_bytes()
    # 1:N matcher context has the evaluation keys it needs; a device context has none
    assert ikh.public_context().has_eval_keys and not ikh.public_context(eval_keys=False).has_eval_keys
    with pytest.raises(HEUnsupported):
        EncryptedGallery(ikh.public_context(eval_keys=False))


def test_nothing_the_matcher_stores_decrypts_without_the_key(vkh):
    rng = np.random.default_rng(9)
    pub = vkh.public_context()
    x = unit(rng, 1, 128)[0]
    blob = pub.encrypt(x, "template")
    (ct_bytes,) = unpack_blob(blob)[1]
    assert x.astype(np.float32).tobytes()[:16] not in blob
    core = core_for(pub.params)
    ct = seal.Ciphertext()
    ct = __import__("engine.he.context", fromlist=["seal_load"]).seal_load(seal.Ciphertext, core.ctx, ct_bytes)
    # the right key recovers the template (reversed coefficients in verify mode) ...
    good = vkh._decrypt_coeffs(ct)[:128][::-1]
    assert np.abs(good - x).max() < TOL
    # ... any other key (a stolen matcher database + a guessed key) yields noise
    other = KeyHolder("verify", 128, tenant="t-verify")
    bad = other._decrypt_coeffs(ct)[:128][::-1]
    assert np.abs(bad - x).max() > 100 and abs(float(np.corrcoef(bad, x)[0, 1])) < 0.5


# ------------------------------------------------------------------------------------------
# wrong key, old epoch, crypto-shredding
def test_wrong_key_and_wrong_context_fail_clearly(vkh):
    rng = np.random.default_rng(1)
    x = unit(rng, 1, 128)[0]
    other = KeyHolder("verify", 128, tenant="t-verify")  # same tenant name and epoch, other keys
    g = EncryptedGallery(vkh.public_context())
    with pytest.raises(HEContextMismatch) as e:
        g.add("s", other.encrypt(x))
    assert e.value.reason == "HE_CONTEXT_MISMATCH" and isinstance(e.value, VeilfaceError)
    g.add("s", vkh.encrypt(x))
    with pytest.raises(HEContextMismatch):
        g.verify("s", other.encrypt(x, "probe"))
    blob = g.verify("s", vkh.encrypt(x, "probe"))
    with pytest.raises(HEContextMismatch):
        other.decrypt_scores(blob)
    with pytest.raises(HEFormatError):  # a template is not a probe
        g.verify("s", vkh.encrypt(x, "template"))


def test_rotation_revokes_old_epoch_and_shreds_key():
    rng = np.random.default_rng(2)
    x = unit(rng, 1, 128)[0]
    old = KeyHolder("verify", 128, tenant="acme", epoch=1)
    g_old = EncryptedGallery(old.public_context())
    old_template = old.encrypt(x)
    g_old.add("s", old_template)
    old_score = g_old.verify("s", old.encrypt(x, "probe"))

    new = old.rotate()
    assert new.epoch == 2 and old.shredded and new.fingerprint != old.fingerprint
    with pytest.raises(HEEpochRevoked) as e:
        old.decrypt_scores(old_score)  # the epoch-1 secret key is gone
    assert e.value.reason == "HE_EPOCH_REVOKED"
    with pytest.raises(HEEpochRevoked):
        new.decrypt_scores(old_score)
    g_new = EncryptedGallery(new.public_context())
    with pytest.raises(HEEpochRevoked):
        g_new.add("s", old_template)  # old ciphertexts are useless: re-enrol from a fresh capture
    g_new.add("s", new.encrypt(x))
    _, s = new.decrypt_scores(g_new.verify("s", new.encrypt(x, "probe")))
    assert abs(s[0] - 1.0) < TOL
    with pytest.raises(HEEpochRevoked):
        old.to_bytes()


# ------------------------------------------------------------------------------------------
# gallery snapshots (restart without re-expanding every identify template)
def test_identify_snapshot_restore_round_trip(ikh):
    rng = np.random.default_rng(21)
    pub = ikh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 4, 64)
    for i, v in enumerate(x):
        g.add(f"a{i}", pub.encrypt(v))
    y = unit(rng, 30, 64)
    g.add_block([f"b{i}" for i in range(30)], encrypt_block_blob(pub, y))
    assert g.remove("a2") and g.remove("b3")
    snap = g.snapshot()
    h = blob_header(snap)
    assert h["kind"] == "gallery_snapshot" and h["fp"] == ikh.fingerprint and h["epoch"] == ikh.epoch
    assert h["snapshot_format"] == 1 and len(h["blocks"]) == 2 and h["purged"] == 2
    assert len(snap) < 2 * 64 * 2 * 8192 * 2 * 8 + 200_000      # the block ciphertexts + slot tables

    r = EncryptedGallery.restore(PublicContext.from_bytes(pub.to_bytes()), snap)
    assert sorted(r.subjects()) == sorted(g.subjects()) and len(r) == 32 and r.purged == 2
    assert r._where == g._where and r.memory_bytes() == g.memory_bytes()
    probe = pub.encrypt(near(rng, x[1], 0.2), "probe")
    ids0, s0 = ikh.decrypt_scores(g.search(probe))
    ids1, s1 = ikh.decrypt_scores(r.search(probe))
    assert ids0 == ids1 and np.abs(s0 - s1).max() < TOL
    ref = {**{f"a{i}": x[i] for i in range(4)}, **{f"b{i}": y[i] for i in range(30)}}
    p = near(rng, x[1], 0.2)
    ids, s = ikh.decrypt_scores(r.search(pub.encrypt(p, "probe")))
    assert np.abs(s - np.array([p @ ref[i] for i in ids])).max() < TOL
    # the restored gallery keeps working: add into the freed slot, remove (purge) a restored one
    r.add("a2", pub.encrypt(x[2]))
    assert r._where["a2"] == (0, 2)
    assert r.remove("b5") and "b5" not in r
    ids, s = ikh.decrypt_scores(r.search(pub.encrypt(x[2], "probe")))
    assert "b5" not in ids and abs(s[ids.index("a2")] - 1.0) < TOL
    assert EncryptedGallery.restore(pub, EncryptedGallery(pub).snapshot()).subjects() == []
    # a dimension shard snapshots its part and refuses another part's snapshot
    half = EncryptedGallery(pub, part=(0, 2))
    half.add_block([f"b{i}" for i in range(30)], encrypt_block_blob(pub, y))
    hs = half.snapshot()
    assert len(EncryptedGallery.restore(pub, hs, part=(0, 2))) == 30
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, hs, part=(1, 2))
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, snap, part=(0, 2))
    with pytest.raises(VeilfaceError):          # only into an empty gallery
        r.load_snapshot(snap)


def test_snapshot_of_another_context_or_epoch_is_refused(ikh, vkh):
    rng = np.random.default_rng(22)
    pub = ikh.public_context()
    g = EncryptedGallery(pub)
    g.add("a", pub.encrypt(unit(rng, 1, 64)[0]))
    snap = g.snapshot()
    other = KeyHolder("identify", 64, tenant="t-identify")      # same tenant and epoch, other keys
    with pytest.raises(HEContextMismatch):
        EncryptedGallery.restore(other.public_context(), snap)
    with pytest.raises(HEContextMismatch):
        EncryptedGallery.restore(KeyHolder("identify", 64, tenant="elsewhere").public_context(), snap)
    rotated = other.rotate()                                     # epoch 2 of that tenant
    g1 = EncryptedGallery(rotated.public_context())
    with pytest.raises(HEEpochRevoked):
        g1.load_snapshot(snap)
    # a verify-mode gallery round-trips too; a verify snapshot is not an identify one
    vpub = vkh.public_context()
    vg = EncryptedGallery(vpub)
    x = unit(rng, 2, 128)
    vg.add("v0", vpub.encrypt(x[0]))
    vg.add("v1", vpub.encrypt(x[1]))
    vr = EncryptedGallery.restore(vpub, vg.snapshot())
    _, s = vkh.decrypt_scores(vr.verify("v1", vpub.encrypt(x[1], "probe")))
    assert sorted(vr.subjects()) == ["v0", "v1"] and abs(s[0] - 1.0) < TOL
    with pytest.raises(HEContextMismatch):
        EncryptedGallery.restore(pub, vg.snapshot())
    # corrupt / wrong kind / unknown format version
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, snap[:-100])
    with pytest.raises(HEFormatError):
        EncryptedGallery.restore(pub, pub.encrypt(unit(rng, 1, 64)[0]))
    h, parts = unpack_blob(snap)
    bumped = pack_blob("gallery_snapshot", {k: v for k, v in h.items() if k not in ("kind", "parts")}
                       | {"snapshot_format": 99}, parts)
    with pytest.raises(HEFormatError, match="format"):
        EncryptedGallery.restore(pub, bumped)


def test_sharded_snapshot_restore(ikh):
    from engine.he.shards import ShardedEncryptedGallery

    rng = np.random.default_rng(23)
    pub = ikh.public_context()
    y = unit(rng, 40, 64)
    with ShardedEncryptedGallery(pub, shards=2) as g:
        g.add_block([f"b{i}" for i in range(40)], encrypt_block_blob(pub, y))
        g.add("x", pub.encrypt(y[3]))
        assert g.remove("b7")
        snap = g.snapshot()
        probe = pub.encrypt(near(rng, y[3], 0.1), "probe")
        ids0, s0 = ikh.decrypt_scores(g.search(probe))
    assert blob_header(snap)["kind"] == "sharded_gallery_snapshot"
    with ShardedEncryptedGallery.restore(pub, snap, shards=2) as r:
        assert len(r) == 40 and "x" in r and "b7" not in r
        ids1, s1 = ikh.decrypt_scores(r.search(probe))
        assert ids0 == ids1 and np.abs(s0 - s1).max() < TOL
    with pytest.raises(HEFormatError):
        ShardedEncryptedGallery.restore(pub, snap, shards=1)    # another shard layout: rebuild instead


# ------------------------------------------------------------------------------------------
# serialisation
def test_serialisation_round_trips(vkh):
    rng = np.random.default_rng(4)
    x = unit(rng, 2, 128)
    pub_bytes = vkh.public_context().to_bytes()
    pub = PublicContext.from_bytes(pub_bytes)
    assert pub.to_bytes() == pub_bytes
    kh2 = KeyHolder.from_bytes(vkh.to_bytes())
    assert kh2.fingerprint == vkh.fingerprint and kh2.epoch == vkh.epoch
    g = EncryptedGallery(pub)
    g.add("s", pub.encrypt(x[0]))
    blob = g.verify("s", pub.encrypt(x[1], "probe"))
    _, s = kh2.decrypt_scores(blob)  # a key holder restored from its keystore decrypts
    assert abs(s[0] - x[0] @ x[1]) < TOL
    h = blob_header(blob)
    assert h["kind"] == "score" and h["epoch"] == 1 and h["fp"] == vkh.fingerprint and h["mode"] == "verify"


def test_scheme_registry_and_template_round_trip(vkh):
    rng = np.random.default_rng(6)
    s = make_scheme("he:dim=128,mode=verify")
    assert s.name == "he" and s.encrypted and s.params == {"dim": 128, "mode": "verify"}
    pub = vkh.public_context()
    x = unit(rng, 1, 128)[0]
    t = s.protect(pub.to_bytes(), x)
    assert isinstance(t, Template) and t.key_version == vkh.epoch
    t2 = Template.from_bytes(t.to_bytes())
    assert t2.spec == s.spec and s.describe(t2)["kind"] == "template"
    g = s.make_gallery(pub)
    g.add("s", t2)
    _, sc = vkh.decrypt_scores(g.verify("s", s.protect_probe(pub, x)))
    assert abs(sc[0] - 1.0) < TOL
    with pytest.raises(HEUnsupported):
        s.compare(t, t2)
    with pytest.raises(HEUnsupported):
        make_scheme("he:dim=128,mode=verify").protect(KeyHolder("identify", 128).public_context(), x)
    with pytest.raises(VeilfaceError):
        make_scheme("he:dim=128,mode=bogus")
    with pytest.raises(HEUnsupported):
        g.search(s.protect_probe(pub, x))


def test_corrupt_and_foreign_blobs(vkh):
    rng = np.random.default_rng(8)
    blob = vkh.encrypt(unit(rng, 1, 128)[0])
    g = EncryptedGallery(vkh.public_context())
    for bad in (b"", b"nope", blob[:-10], b"VFHE\x09" + blob[5:], blob[:20] + b"x" + blob[21:]):
        with pytest.raises(TemplateFormatError):  # HEFormatError is a TemplateFormatError
            g.add("s", bad)
    h, parts = unpack_blob(blob)
    forged = pack_blob("template", {k: v for k, v in h.items() if k not in ("kind", "parts")},
                       [parts[0][:-100]])
    with pytest.raises(HEFormatError):
        g.add("s", forged)
