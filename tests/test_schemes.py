import hashlib

import numpy as np
import pytest

from engine.errors import InvalidEmbedding, InvalidParameter, SchemeMismatch, TemplateFormatError, UnknownScheme
from engine.schemes import BioHash, IoMHash, Rotation, available_schemes, make_scheme, parse_factory
from engine.template import Template

from .conftest import clustered

CANCELLABLE = [
    "biohash:bits=256,dim=128",
    "biohash:bits=512,dim=128",
    "biohash:bits=1024,dim=128",
    "iom:m=128,q=16,dim=128",
    "iom:variant=urp,m=128,q=8,p=2,dim=128",
    "rotation:dim=128",
    "rotation:quant=int8,dim=128",
]


@pytest.fixture(params=CANCELLABLE)
def scheme(request):
    return make_scheme(request.param)


def test_factory_parses_and_rebuilds_from_spec(scheme):
    again = make_scheme(scheme.spec)
    assert again.spec == scheme.spec and type(again) is type(scheme)


def test_factory_errors():
    with pytest.raises(UnknownScheme):
        make_scheme("nosuch")
    with pytest.raises(InvalidParameter):
        make_scheme("biohash:bits=100")  # not a multiple of 64
    with pytest.raises(InvalidParameter):
        make_scheme("biohash:colour=blue")
    with pytest.raises(InvalidParameter):
        make_scheme("biohash:bits")
    with pytest.raises(InvalidParameter):
        make_scheme("iom:variant=xyz")
    with pytest.raises(InvalidParameter):
        make_scheme("iom:q=300")
    with pytest.raises(InvalidParameter):
        make_scheme("rotation:quant=int4")
    assert parse_factory("iom:m=256, q=16") == ("iom", {"m": 256, "q": 16})
    assert {"biohash", "iom", "rotation", "he"} <= set(available_schemes())


def test_unknown_version_refused():
    spec = BioHash().spec
    from engine.template import SchemeSpec
    with pytest.raises(UnknownScheme):
        make_scheme(SchemeSpec(spec.name, 99, spec.params))


def test_protect_is_deterministic_and_keyed(scheme, rng):
    x = rng.standard_normal(scheme.dim)
    t1 = scheme.protect(b"a" * 32, x)
    t2 = scheme.protect(b"a" * 32, x * 3.0)  # scale-invariant: input is L2-normalised
    t3 = scheme.protect(b"b" * 32, x)
    assert t1.data.dtype == scheme.code_dtype and t1.data.shape == scheme.code_shape
    assert np.array_equal(t1.data, t2.data)
    assert not np.array_equal(t1.data, t3.data)
    assert scheme.compare(t1, t2) == pytest.approx(scheme.compare(t1, t1))


def test_bad_embeddings_are_refused(scheme):
    key = b"k" * 32
    for bad in (np.ones(scheme.dim + 1), np.zeros(scheme.dim), np.full(scheme.dim, np.nan),
                np.full(scheme.dim, np.inf), np.ones((2, 2, scheme.dim)), "abc", np.ones((0, scheme.dim))):
        with pytest.raises(InvalidEmbedding):
            scheme.protect_codes(key, bad)
    with pytest.raises(InvalidParameter):
        scheme.protect(b"short", np.ones(scheme.dim))


def test_genuine_beats_impostor_and_rekeying_unlinks(scheme, deriver):
    rng = np.random.default_rng(7)
    x = clustered(rng, subjects=40, samples=2, dim=scheme.dim, noise=0.6)
    gen, imp, renew = [], [], []
    for s in range(40):
        k1 = deriver.derive(f"s{s}", 1, scheme.spec)
        k2 = deriver.derive(f"s{s}", 2, scheme.spec)
        a = scheme.protect_codes(k1, x[s, 0])
        gen.append(scheme.similarities(a, scheme.protect_codes(k1, x[s, 1]))[0, 0])
        other = deriver.derive(f"s{(s + 1) % 40}", 1, scheme.spec)
        imp.append(scheme.similarities(a, scheme.protect_codes(other, x[(s + 1) % 40, 0]))[0, 0])
        renew.append(scheme.similarities(a, scheme.protect_codes(k2, x[s, 1]))[0, 0])
    gen, imp, renew = map(np.asarray, (gen, imp, renew))
    assert gen.min() > imp.max(), "genuine and impostor scores should separate on clean clusters"
    # an old template against the re-keyed one scores like an impostor, not like a genuine
    assert renew.max() < gen.min()
    assert abs(renew.mean() - imp.mean()) < 0.1


def test_rotation_preserves_inner_products(rng):
    s = Rotation(dim=64)
    x = rng.standard_normal((5, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = s.protect_codes(b"r" * 32, x)
    assert np.allclose(s.similarities(c, c), x @ x.T, atol=1e-5)
    assert np.allclose(s.invert(b"r" * 32, c), x, atol=1e-5)
    q = Rotation(dim=64, quant="int8")
    ci = q.protect_codes(b"r" * 32, x)
    assert np.allclose(q.similarities(ci, ci), x @ x.T, atol=0.03)


def test_biohash_matches_numpy_definition(rng):
    s = BioHash(dim=32, bits=64)
    key = b"q" * 32
    x = rng.standard_normal(32)
    w = s._transform(key)
    # first 32 columns orthonormal (one block), second block independent
    assert np.allclose(w[:, :32].T @ w[:, :32], np.eye(32), atol=1e-5)
    bits = np.unpackbits(s.protect(key, x).data)
    expected = ((x / np.linalg.norm(x)) @ w > 0).astype(np.uint8)
    assert np.array_equal(bits, expected)


def test_iom_matches_numpy_definition(rng):
    x = rng.standard_normal(32)
    xn = x / np.linalg.norm(x)
    grp = IoMHash(dim=32, m=8, q=4)
    w = grp._transform(b"g" * 32)
    expected = np.argmax((xn @ w).reshape(8, 4), axis=1)
    assert np.array_equal(grp.protect(b"g" * 32, x).data, expected)
    urp = IoMHash(dim=32, m=8, q=4, variant="urp", p=3)
    perms = urp._transform(b"u" * 32)
    expected = [np.argmax(np.prod([xn[perms[i, j]] for j in range(3)], axis=0)) for i in range(8)]
    assert np.array_equal(urp.protect(b"u" * 32, x).data, expected)


def test_templates_are_stable_across_releases():
    """Pinned digests: a change here invalidates every enrolled template, so it must come with a
    new scheme version (templates of the old one are then refused, never mis-scored). Last change:
    version 2, transform streams bound to the full spec (issue 9 item 6)."""
    x = np.cos(np.arange(128) * 0.37)
    digests = {d: hashlib.sha256(make_scheme(d).protect(b"\x01" * 32, x).data.tobytes()).hexdigest()[:16]
               for d in PINNED}
    assert digests == PINNED
    assert {make_scheme(d).version for d in PINNED} == {2}


PINNED = {'biohash:bits=256': '22b4fc426486745a', 'iom:m=64,q=16': 'f6f79748073bd8e5',
          'iom:variant=urp,m=64,q=16': '619c89f8659e9401', 'rotation:quant=int8': 'f3e819119a7cd660'}


def test_biohash_256_is_not_a_prefix_of_biohash_512(rng):
    """Issue 9 item 6: under one key (a device that derives keys by name, or a user-held key),
    the 256-bit code used to be the first half of the 512-bit one."""
    key = b"k" * 32
    x = rng.standard_normal((64, 128))
    short = make_scheme("biohash:bits=256").protect_codes(key, x)
    long = make_scheme("biohash:bits=512").protect_codes(key, x)
    agree = np.unpackbits(short, axis=1) == np.unpackbits(long[:, :32], axis=1)
    assert 0.45 < agree.mean() < 0.55                    # chance, not 100%
    w256 = make_scheme("biohash:bits=256")._transform(key)
    w512 = make_scheme("biohash:bits=512")._transform(key)
    assert not np.allclose(w256, w512[:, :256])


def test_rotation_float32_and_int8_do_not_share_a_matrix():
    key = b"r" * 32
    f32, i8 = make_scheme("rotation"), make_scheme("rotation:quant=int8")
    rf, ri = f32._transform(key), i8._transform(key)
    assert rf.shape == ri.shape and np.abs(rf.T @ ri).max() < 0.5          # unrelated orthonormal bases
    other_scale = make_scheme("rotation:quant=int8,scale=100")._transform(key)
    assert not np.allclose(ri, other_scale)


def test_old_scheme_versions_are_refused_not_misscored():
    from engine.template import SchemeSpec
    for name, params in (("biohash", {"dim": 128, "bits": 256}), ("iom", {"dim": 128, "m": 64, "q": 16,
                                                                            "variant": "grp"})):
        with pytest.raises(UnknownScheme):
            make_scheme(SchemeSpec(name, 1, params))


def test_template_round_trip_and_mismatch(scheme, rng):
    t = scheme.protect(b"k" * 32, rng.standard_normal(scheme.dim), key_version=3)
    back = Template.from_bytes(t.to_bytes())
    assert back.spec == t.spec and back.key_version == 3 and np.array_equal(back.data, t.data)
    other = make_scheme("biohash:bits=128,dim=128") if scheme.name != "biohash" or scheme.params["bits"] != 128 \
        else make_scheme("biohash:bits=256,dim=128")
    with pytest.raises(SchemeMismatch):
        other.compare(back, back)


def test_corrupt_templates_are_refused(rng):
    s = BioHash()
    raw = s.protect(b"k" * 32, rng.standard_normal(128)).to_bytes()
    for bad in (b"", b"XYZ" + raw[3:], raw[:3] + b"\x09" + raw[4:], raw[:-1], raw + b"\x00",
                raw[:10], raw[:8] + b"{" * (len(raw) - 8), b"\x00" * (2 << 20)):
        with pytest.raises(TemplateFormatError):
            Template.from_bytes(bad)


def test_codes_of_checks_shape_dtype_and_range():
    s = IoMHash(m=16, q=4)
    with pytest.raises(TemplateFormatError):
        s.check_codes(np.zeros((2, 17), np.uint8))
    with pytest.raises(TemplateFormatError):
        s.check_codes(np.zeros((2, 16), np.int8))
    with pytest.raises(TemplateFormatError):
        s.check_codes(np.full((2, 16), 4, np.uint8))
    with pytest.raises(TemplateFormatError):
        s.codes_of(["not a template"])


def test_capabilities_are_mixins_and_encrypted_is_derived(scheme):
    from engine.schemes import CodeMatching, EncryptedMatching, Protector

    assert isinstance(scheme, Protector) and isinstance(scheme, CodeMatching)
    assert not isinstance(scheme, EncryptedMatching) and scheme.encrypted is False
    assert not hasattr(scheme, "make_gallery") and not hasattr(scheme, "protect_probe")
    assert scheme.stream_label("x").startswith("v2/" + scheme.spec.key())


def test_protector_base_requires_protect():
    from engine.schemes import Protector

    class Half(Protector):
        name, version = "half", 1

    with pytest.raises(TypeError):
        Half()
