"""CKKS (TenSEAL/SEAL) contexts: threat-model separation, revocation, serialisation, the ``he``
protector, hostile blobs. 1:1 results are tested in ``test_he_verify.py``, 1:N galleries and
decisions in ``test_he_identify.py`` (both import the helpers and fixtures below)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

import tenseal.sealapi as seal  # noqa: E402

from engine.errors import TemplateFormatError, VeilfaceError  # noqa: E402
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
    pack_blob,
    unpack_blob,
)
from engine.he.encoding import core_for  # noqa: E402
from engine.he.sealio import seal_load, seal_save  # noqa: E402
from engine.schemes import CodeMatching, EncryptedMatching, make_scheme  # noqa: E402
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
    # the matcher context has the evaluation keys it needs (relinearisation; Galois keys for 1:N);
    # a device context has none, and no gallery accepts it
    for kh in (vkh, ikh):
        assert kh.public_context().has_eval_keys and not kh.public_context(eval_keys=False).has_eval_keys
        with pytest.raises(HEUnsupported):
            EncryptedGallery(kh.public_context(eval_keys=False))
    # keysvc: verify mode carries one Galois key too (X -> X^-1, for the probe norm)
    assert vkh.public_context().galois_keys is not None and ikh.public_context().galois_keys is not None


def test_nothing_the_matcher_stores_decrypts_without_the_key(vkh):
    rng = np.random.default_rng(9)
    pub = vkh.public_context()
    x = unit(rng, 1, 128)[0]
    blob = pub.encrypt(x, "template")
    (ct_bytes,) = unpack_blob(blob)[1]
    assert x.astype(np.float32).tobytes()[:16] not in blob
    core = core_for(pub.params)
    ct = seal_load(seal.Ciphertext, core.ctx, ct_bytes)
    # the right key recovers the template (coefficients of sum y_i X^-i in verify mode) ...
    good = core.unlayout(vkh._decrypt_coeffs(ct), "template")
    assert np.abs(good - x).max() < TOL
    # ... any other key (a stolen matcher database + a guessed key) yields noise
    other = KeyHolder("verify", 128, tenant="t-verify")
    bad = core.unlayout(other._decrypt_coeffs(ct), "template")
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
    # capabilities, not methods that raise: no clear comparison of ciphertexts exists at all
    assert isinstance(s, EncryptedMatching) and not isinstance(s, CodeMatching)
    assert not any(hasattr(s, m) for m in ("compare", "codes_of", "check_codes", "similarities",
                                            "topk_raw", "to_similarity", "code_shape", "protect_codes"))
    with pytest.raises(HEUnsupported):
        make_scheme("he:dim=128,mode=verify").protect(KeyHolder("identify", 128).public_context(), x)
    with pytest.raises(VeilfaceError):
        make_scheme("he:dim=128,mode=bogus")
    assert type(g).__name__ == "VerifyGallery" and not hasattr(g, "search")
    ig = make_scheme("he:dim=64,mode=identify").make_gallery(KeyHolder("identify", 64).public_context())
    assert type(ig).__name__ == "IdentifyGallery" and not hasattr(ig, "verify")


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


def test_uploads_must_be_fresh_encryptions_of_the_context(vkh, ikh):
    """A device controls its ciphertext bytes: another scale, level or size is refused before any
    computation (a larger scale would otherwise read a template at a larger scale)."""
    rng = np.random.default_rng(10)
    for kh in (vkh, ikh):
        pub = kh.public_context()
        g = EncryptedGallery(pub)
        x = unit(rng, 1, kh.dim)[0]
        g.add("s", pub.encrypt(x))
        for role, scale in (("probe", pub.params.scale * 16), ("template", pub.params.scale / 2)):
            ct = pub.encrypt_coeffs(pub.core.layout(x, role), scale)
            blob = pack_blob(role, pub.header(), [seal_save(ct)])
            with pytest.raises(HEFormatError, match="fresh"):
                g.add("t", blob) if role == "template" else (
                    g.verify("s", blob) if kh.mode == "verify" else g.search(blob))
        ct = pub.encrypt_coeffs(pub.core.layout(x, "probe"), pub.params.role_scale("probe"))
        three = seal.Ciphertext()
        pub.core.evaluator.multiply(ct, ct, three)        # size 3, scale squared
        with pytest.raises(HEFormatError):
            g.add("t", pack_blob("template", pub.header(), [seal_save(three)]))
    # verify mode: a probe is not a template (different layout and scale)
    vpub, v = vkh.public_context(), unit(rng, 1, 128)[0]
    with pytest.raises(HEFormatError):
        EncryptedGallery(vpub).add("s", pack_blob("template", vpub.header(),
                                                  [unpack_blob(vpub.encrypt(v, "probe"))[1][0]]))


def test_parameters_are_128_bit_and_versioned(vkh, ikh):
    from engine.he.params import ALGORITHM, HEParams

    for kh in (vkh, ikh):
        p = kh.params
        assert sum(p.moduli) <= seal.CoeffModulus.MaxBitCount(p.poly_degree, seal.SEC_LEVEL_TYPE.TC128)
        assert HEParams.from_dict(p.as_dict()) == p and p.algorithm == ALGORITHM
        old = {k: v for k, v in p.as_dict().items() if k not in ("algorithm", "template_scale_bits")}
        with pytest.raises(HEFormatError, match="algorithm"):
            HEParams.from_dict(old)                       # contexts of algorithm 1: re-key, re-enrol
        with pytest.raises(HEFormatError):
            HEParams.from_dict(dict(p.as_dict(), scale_bits=p.scale_bits + 1))
    assert vkh.params.moduli == (43, 43, 23) and vkh.params.scale_bits + vkh.params.template_scale_bits == 84
    for bad in (None, "x", {"mode": "verify"}, dict(vkh.params.as_dict(), dim=0)):
        with pytest.raises(HEFormatError):
            HEParams.from_dict(bad)


def test_public_context_holds_exactly_the_keys_of_its_mode(vkh, ikh):
    vh, vparts = unpack_blob(vkh.public_context().to_bytes())
    ih, iparts = unpack_blob(ikh.public_context().to_bytes())
    assert len(vparts) == 3 and len(iparts) == 3       # pk + relin + Galois (verify: X -> X^-1 only)
    strip = lambda h: {k: v for k, v in h.items() if k not in ("kind", "parts")}  # noqa: E731
    for h, parts in ((vh, vparts[:2]), (vh, vparts + [iparts[2]]), (ih, iparts[:2]), (ih, iparts + [iparts[1]])):
        with pytest.raises(HEFormatError):
            PublicContext.from_bytes(pack_blob("public_context", strip(h), parts))
    device = PublicContext.from_bytes(pack_blob("public_context", strip(vh), vparts[:1]))
    assert not device.has_eval_keys
