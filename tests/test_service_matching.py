"""The matcher's gallery index and in-process matching backend, without gRPC or a store."""
from __future__ import annotations

import threading

import pytest

from engine.errors import NotEnrolled, UnknownScheme
from engine.keys import KeyDeriver
from engine.schemes import make_scheme
from engine.service.encrypted import HERegistry
from engine.service.matching import Enrolled, GalleryIndex, GalleryKey, LocalMatching, SchemeCache
from engine.template import SchemeSpec
from tests.support.faces import faces

SCHEME = "biohash:bits=256,dim=128"


@pytest.fixture
def scheme():
    return make_scheme(SCHEME)


@pytest.fixture
def key(scheme):
    return GalleryKey("t", "access_control", scheme.spec.key(), 1)


@pytest.fixture
def index(scheme):
    schemes = SchemeCache()
    schemes.remember(scheme.spec.key(), scheme)
    return GalleryIndex(LocalMatching(), HERegistry(), schemes)


def protect(scheme, x, version=1):
    k = KeyDeriver(bytes(range(32)), "t").derive("group.access_control", version, scheme.name)
    return scheme.protect(k, x, key_version=version)


def test_gallery_key_names_its_parts(key):
    assert key.scope == ("t", "access_control", key.scheme) and not key.encrypted
    assert GalleryKey("t", "p", 'he/v1:{"dim":128,"mode":"identify"}', 2).encrypted
    assert key.stored == ("t", "access_control", key.scheme, 1)   # a tuple for the store's calls
    assert key.gallery == "" and GalleryKey(*key.stored, "staff").gallery == "staff"


def test_local_matching_add_verify_search_remove(scheme, key):
    m = LocalMatching()
    x = faces(3)
    m.open(key, scheme)
    m.add(key, ["a", "b"], [protect(scheme, x[0]), protect(scheme, x[1])])
    assert m.size(key) == 2 and sorted(m.subjects(key)) == ["a", "b"]
    assert m.verify(key, "a", protect(scheme, x[0])) == pytest.approx(1.0)
    assert m.search(key, protect(scheme, x[1]), 1, None)[0].subject_id == "b"
    assert m.remove(key, "a") and not m.remove(key, "a")
    with pytest.raises(NotEnrolled):
        m.verify(key, "a", protect(scheme, x[0]))


def test_local_matching_unopened_gallery_is_empty(scheme, key):
    m = LocalMatching()
    assert m.size(key) == 0 and m.search(key, protect(scheme, faces(1)[0]), 5, None) == []
    assert not m.remove(key, "a") and m.subjects(key) == []
    with pytest.raises(NotEnrolled):
        m.verify(key, "a", protect(scheme, faces(1)[0]))


def test_enrol_makes_a_subject_searchable_and_forget_removes_it(index, scheme, key):
    x = faces(2)
    index.enrol(key, "a", protect(scheme, x[0]), template_id=1, expires_at=10.0, versions=(1, 0))
    entries, revoked = index.enrolment("t", "a")
    assert entries == {("access_control", key.scheme): Enrolled(1, 10.0)} and revoked == 0
    assert index.backend.size(key) == 1 and index.persons() == 1 and index.persons_with("t", "b") == 2
    assert index.forget("t", "a", lambda p, s, m: True) == 1
    assert index.enrolment("t", "a") == ({}, 0) and index.backend.size(key) == 0 and index.persons() == 0


def test_forget_only_matching_entries(index, scheme, key):
    x = faces(1)
    other = key._replace(purpose="payment")
    index.enrol(key, "a", protect(scheme, x[0]), template_id=1, expires_at=10.0)
    index.enrol(other, "a", protect(scheme, x[0]), template_id=2, expires_at=20.0)
    assert index.forget("t", "a", lambda p, s, m: m.expires_at <= 10.0) == 1
    assert list(index.enrolment("t", "a")[0]) == [("payment", key.scheme)]
    assert index.backend.size(key) == 0 and index.backend.size(other) == 1


def test_he_gallery_opens_only_for_the_registered_epoch(index):
    he_key = GalleryKey("t", "p", 'he/v1:{"dim":128,"mode":"identify"}', 1)
    assert not index.open(he_key) and not index.backend.is_open(he_key)   # no public context registered


def test_subject_lock_is_per_subject(index):
    assert index.subject_lock("t", "a") is index.subject_lock("t", "a")
    locks = {id(index.subject_lock("t", f"s{i}")) for i in range(2000)}
    assert len(locks) == 256                                              # striped


def test_clear_forgets_everything(index, scheme, key):
    index.enrol(key, "a", protect(scheme, faces(1)[0]), template_id=1, expires_at=10.0, versions=(1, 0))
    index.clear()
    assert index.persons() == 0 and not index.backend.is_open(key) and index.enrolment("t", "a") == ({}, 0)


def test_scheme_cache_builds_once_and_refuses_unknown_schemes(scheme):
    cache = SchemeCache()
    a = cache.of(scheme.spec)
    assert cache.of(scheme.spec) is a and cache.get(scheme.spec.key()) is a
    with pytest.raises(UnknownScheme):
        cache.of(SchemeSpec("nosuch", 1, {}))


def test_concurrent_enrol_and_forget_keep_index_and_gallery_in_step(index, scheme, key):
    """Under the subject lock, the entries and the gallery agree whatever the interleaving."""
    x = faces(1)
    t = protect(scheme, x[0])
    start = threading.Barrier(2)

    def enrol():
        start.wait()
        for _ in range(200):
            with index.subject_lock("t", "a"):
                index.enrol(key, "a", t, template_id=1, expires_at=10.0)

    def forget():
        start.wait()
        for _ in range(200):
            with index.subject_lock("t", "a"):
                index.forget("t", "a", lambda p, s, m: True)

    threads = [threading.Thread(target=enrol), threading.Thread(target=forget)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    enrolled = bool(index.enrolment("t", "a")[0])
    assert enrolled == ("a" in index.backend.subjects(key))
