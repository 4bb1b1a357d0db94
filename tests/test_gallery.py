import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidParameter, NotEnrolled, SchemeMismatch
from engine.gallery import GALLERY_BACKENDS, Match, make_gallery
from engine.schemes import make_scheme

from .conftest import clustered

SCHEMES = ["biohash:bits=256", "iom:m=64,q=16", "rotation", "rotation:quant=int8"]


def _backends(scheme):
    return GALLERY_BACKENDS if scheme.metric in ("hamming", "ip_f32") else ("native",)


def _enrol(scheme, gallery, deriver, x):
    for s in range(len(x)):
        gallery.add(f"subj-{s}", scheme.protect(deriver.derive(f"subj-{s}", 1, scheme.spec), x[s, 0]))


@pytest.mark.parametrize("desc", SCHEMES)
def test_identify_and_verify_on_clusters(desc, deriver):
    scheme = make_scheme(desc)
    x = clustered(np.random.default_rng(3), subjects=60, samples=2, dim=128, noise=0.5)
    for backend in _backends(scheme):
        g = make_gallery(scheme, backend)
        _enrol(scheme, g, deriver, x)
        assert len(g) == 60 and "subj-3" in g and "nobody" not in g
        hits = 0
        for s in range(60):
            probe = scheme.protect(deriver.derive(f"subj-{s}", 1, scheme.spec), x[s, 1])
            res = g.search(probe, k=5)
            assert len(res) == 5 and all(isinstance(m, Match) for m in res)
            assert [m.score for m in res] == sorted((m.score for m in res), reverse=True)
            hits += res[0].subject_id == f"subj-{s}"
            ref = g._get(f"subj-{s}")
            assert g.verify(f"subj-{s}", probe) == pytest.approx(scheme.similarities(scheme.codes_of(probe), ref)[0, 0])
        assert hits >= 58, (backend, hits)


@pytest.mark.parametrize("desc", ["biohash:bits=256", "rotation"])
def test_native_and_faiss_flat_agree(desc, deriver):
    scheme = make_scheme(desc)
    x = clustered(np.random.default_rng(4), subjects=80, samples=2, dim=128)
    a, b = make_gallery(scheme, "native"), make_gallery(scheme, "faiss")
    for g in (a, b):
        _enrol(scheme, g, deriver, x)
        g.remove("subj-10")
        g.remove("subj-79")
    probes = np.concatenate([scheme.protect_codes(deriver.derive(f"subj-{s}", 1, scheme.spec), x[s, 1])
                             for s in range(80)])
    ra, rb = a.search_codes(probes, k=3), b.search_codes(probes, k=3)
    for qa, qb in zip(ra, rb):
        assert [m.score for m in qa] == pytest.approx([m.score for m in qb], abs=1e-5)
        assert qa[0].subject_id == qb[0].subject_id
        assert all(m.subject_id not in ("subj-10", "subj-79") for m in qa + qb)


def test_threshold_no_match_and_empty(deriver, rng):
    scheme = make_scheme("biohash:bits=256")
    g = make_gallery(scheme)
    probe = scheme.protect(b"p" * 32, rng.standard_normal(128))
    assert g.search(probe) == []
    g.add("a", scheme.protect(b"a" * 32, rng.standard_normal(128)))
    assert g.search(probe, k=10, threshold=0.99) == []   # "no match" is a normal answer
    assert len(g.search(probe, k=10)) == 1               # k is clipped to the gallery size
    with pytest.raises(NotEnrolled):
        g.verify("b", probe)
    with pytest.raises(InvalidParameter):
        g.search(probe, k=0)
    with pytest.raises(InvalidParameter):
        g.search(probe, threshold=float("nan"))
    with pytest.raises(SchemeMismatch):
        g.add("c", make_scheme("biohash:bits=512").protect(b"c" * 32, rng.standard_normal(128)))
    with pytest.raises(InvalidParameter):
        g.add("", scheme.protect(b"a" * 32, rng.standard_normal(128)))
    with pytest.raises(InvalidParameter):
        make_gallery(scheme, "annoy")
    with pytest.raises(InvalidParameter):
        make_gallery(make_scheme("iom"), "faiss")
    assert len(g) == 1


def test_replace_keeps_one_template_per_subject(rng):
    scheme = make_scheme("rotation")
    g = make_gallery(scheme)
    x, y = rng.standard_normal(128), rng.standard_normal(128)
    g.add("a", scheme.protect(b"a" * 32, x))
    g.add("a", scheme.protect(b"a" * 32, y))
    assert len(g) == 1
    assert g.verify("a", scheme.protect(b"a" * 32, y)) == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 15)), max_size=60),
       backend=st.sampled_from(GALLERY_BACKENDS))
def test_add_remove_matches_a_dict_model(ops, backend):
    scheme = make_scheme("biohash:bits=128,dim=16")
    g = make_gallery(scheme, backend, **({"capacity": 2} if backend == "native" else {}))
    model: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for op, i in ops:
        sid = f"s{i}"
        if op == "add":
            code = rng.integers(0, 256, size=(1, 16), dtype=np.uint8)
            g.add_codes([sid], code)
            model[sid] = code[0]
        else:
            assert g.remove(sid) == (sid in model)
            model.pop(sid, None)
    assert sorted(g.subjects()) == sorted(model) and len(g) == len(model)
    for sid, code in model.items():
        # exact self-match: similarity 1 for the stored code, and it is returned first or tied
        assert g.verify(sid, _tmpl(scheme, code)) == 1.0
        res = g.search_codes(code[None], k=len(model))[0]
        assert res[0].score == 1.0 and sid in {m.subject_id for m in res if m.score == 1.0}


def _tmpl(scheme, code):
    from engine.template import Template
    return Template(scheme.spec, code)


def test_concurrent_search_and_mutation(deriver):
    scheme = make_scheme("biohash:bits=256")
    g = make_gallery(scheme)
    x = clustered(np.random.default_rng(5), subjects=200, samples=1, dim=128)
    _enrol(scheme, g, deriver, x)
    probe = scheme.protect(deriver.derive("subj-0", 1, scheme.spec), x[0, 0])
    errors = []

    def searcher():
        try:
            for _ in range(50):
                assert g.search(probe, k=1)[0].subject_id == "subj-0"
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    def mutator():
        for i in range(1, 200):
            g.remove(f"subj-{i}")

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=mutator)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(g) == 1


def test_clear_gallery_refuses_a_protector_without_code_matching():
    pytest.importorskip("tenseal")
    with pytest.raises(InvalidParameter, match="encrypted gallery"):
        make_gallery(make_scheme("he:dim=128,mode=identify"))
