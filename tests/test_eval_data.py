"""Evaluation inputs: synthetic generator, npz, photo folders, pairs.txt."""
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidParameter
from engine.evaluation import data as D


def test_synthetic_matches_targets_and_is_reproducible():
    ds = D.synthetic(150, 5, 128, hard_fraction=0.0, seed=3)
    m = ds.info["measured"]
    assert m["genuine_cosine_mean"] == pytest.approx(0.70, abs=0.02)
    assert m["genuine_cosine_sd"] == pytest.approx(0.08, abs=0.015)
    assert m["impostor_cosine_mean"] == pytest.approx(0.0, abs=0.01)
    assert m["impostor_cosine_sd"] == pytest.approx(0.09, abs=0.01)
    assert ds.synthetic and len(ds) == 750 and ds.n_subjects == 150
    np.testing.assert_allclose(np.linalg.norm(ds.embeddings, axis=1), 1, atol=1e-5)
    again = D.synthetic(150, 5, 128, hard_fraction=0.0, seed=3)
    np.testing.assert_array_equal(ds.embeddings, again.embeddings)
    other = D.synthetic(150, 5, 128, hard_fraction=0.0, seed=4)
    assert not np.array_equal(ds.embeddings, other.embeddings)


def test_synthetic_uncentred_model():
    ds = D.synthetic(100, 4, 128, genuine_mean=0.85, genuine_std=0.04, impostor_mean=0.55,
                     impostor_std=0.06, hard_fraction=0.0, seed=0)
    m = ds.info["measured"]
    assert m["impostor_cosine_mean"] == pytest.approx(0.55, abs=0.02)
    assert m["genuine_cosine_mean"] == pytest.approx(0.85, abs=0.02)
    with pytest.raises(InvalidParameter):
        D.synthetic(10, 2, 16, impostor_mean=0.9, genuine_mean=0.8)
    with pytest.raises(InvalidParameter):
        D.synthetic(1, 2, 16)


def test_npz_roundtrip_with_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16))
    labels = np.array(["bob", "amy", "bob", "amy", "cy", "cy"])
    np.savez(tmp_path / "e.npz", embeddings=x, labels=labels)
    ds = D.load(tmp_path / "e.npz")
    assert ds.names == ["amy", "bob", "cy"] and list(ds.labels) == [1, 0, 1, 0, 2, 2]
    assert not ds.synthetic and ds.dim == 16
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(InvalidParameter, match="embeddings"):
        D.load(tmp_path / "bad.npz")


def test_with_min_samples_drops_singletons():
    x = np.random.default_rng(0).standard_normal((5, 8))
    ds = D.Dataset(x, [0, 0, 1, 2, 2], ["a", "b", "c"], "t")
    kept = ds.with_min_samples(2)
    assert kept.names == ["a", "c"] and list(kept.labels) == [0, 0, 1, 1]
    assert kept.info["dropped_subjects"] == 1


def _fake_photos(root: Path, people: int = 3, each: int = 3) -> None:
    for p in range(people):
        (root / f"Person_{p}").mkdir(parents=True)
        for k in range(each):
            (root / f"Person_{p}" / f"Person_{p}_{k + 1:04d}.jpg").write_bytes(b"not a real jpeg")


def _fake_embed(path: Path) -> np.ndarray:
    person = int(path.parent.name.split("_")[1])
    if path.name.endswith("0003.jpg") and person == 2:
        raise RuntimeError("no face found")
    v = np.zeros(8)
    v[person] = 1.0
    v[7] = 0.01 * int(path.stem[-1])
    return v


def test_photo_folder_with_injected_embedder(tmp_path):
    _fake_photos(tmp_path)
    ds = D.load_photo_folder(tmp_path, embed=_fake_embed)
    assert ds.names == ["Person_0", "Person_1", "Person_2"]
    assert len(ds) == 8 and len(ds.info["failed"]) == 1
    assert ds.info["n_photos"] == 9


def test_pairs_txt(tmp_path):
    _fake_photos(tmp_path / "imgs")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t3\nPerson_0\t1\t2\nPerson_1\t1\t3\nPerson_0\t3\tPerson_1\t2\n")
    parsed = D.parse_pairs_txt(pairs)
    assert parsed[0] == ("Person_0", 1, "Person_0", 2) and parsed[2] == ("Person_0", 3, "Person_1", 2)
    ds = D.load(pairs, images_root=tmp_path / "imgs", embed=_fake_embed)
    assert ds.names == ["Person_0", "Person_1"] and len(ds) == 6   # the 6 images the pairs name
    assert ds.listed.same.tolist() == [True, True, False] and ds.listed.n_folds == 0
    (tmp_path / "bad.txt").write_text("a b c d e\n")
    with pytest.raises(InvalidParameter):
        D.parse_pairs_txt(tmp_path / "bad.txt")


def test_npz_without_labels_says_what_to_do(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 8))
    np.savez(tmp_path / "e.npz", embeddings=x, paths=np.array(["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]))
    with pytest.raises(InvalidParameter, match="no 'labels' array: pass --labels FILE"):
        D.load(tmp_path / "e.npz")
    (tmp_path / "by_path.txt").write_text("# photo\tperson\na/1.jpg\tamy\na/2.jpg\tamy\nb/1.jpg\tbob\nb/2.jpg bob\n")
    ds = D.load(tmp_path / "e.npz", labels=tmp_path / "by_path.txt")
    assert ds.names == ["amy", "bob"] and list(ds.labels) == [0, 0, 1, 1]
    (tmp_path / "rows.txt").write_text("x\nx\ny\ny\n")
    assert list(D.load(tmp_path / "e.npz", labels=tmp_path / "rows.txt").labels) == [0, 0, 1, 1]
    (tmp_path / "short.txt").write_text("x\ny\n")
    with pytest.raises(InvalidParameter, match="2 labels for 4 embeddings"):
        D.load(tmp_path / "e.npz", labels=tmp_path / "short.txt")
    (tmp_path / "missing.txt").write_text("a/1.jpg amy\n")
    with pytest.raises(InvalidParameter, match="no label for 3 photo"):
        D.load(tmp_path / "e.npz", labels=tmp_path / "missing.txt")
    with pytest.raises(InvalidParameter, match="--labels applies to an embeddings file"):
        D.load(None, labels=tmp_path / "rows.txt")


def test_embeddings_file_without_npz_suffix_is_recognised(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 8))
    with open(tmp_path / "emb", "wb") as fh:
        np.savez(fh, embeddings=x, labels=np.array(["a", "a", "b", "b"]))
    assert D.load(tmp_path / "emb").names == ["a", "b"]
    assert D.peek_dim(tmp_path / "emb") == 8


def test_load_dispatch_errors(tmp_path):
    with pytest.raises(InvalidParameter, match="does not exist"):
        D.load(tmp_path / "nope.npz")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(InvalidParameter, match="don't know"):
        D.load(tmp_path / "x.csv")
    assert D.load(None, subjects=5, samples=2, dim=16).synthetic


def test_real_faces_through_the_face_pipeline(shared_faces, tmp_path):
    face = pytest.importorskip("engine.face")
    if not hasattr(face, "FacePipeline"):
        pytest.skip("engine.face has no FacePipeline yet")
    from engine.evaluation import evaluate
    try:
        rep = evaluate(shared_faces, ["biohash:bits=256"], seed=0, plots=False, progress=False,
                       attack_templates=10, null_repeats=3, n_gallery=300, speed_repeats=2, bootstrap=200)
    except Exception as exc:  # noqa: BLE001 - model files missing on this machine
        if type(exc).__name__ in ("ModelNotFound", "ModelConversionError"):
            pytest.skip(f"face model not available: {exc}")
        raise
    assert not rep.dataset["synthetic"] and rep.dataset["n_subjects"] == 5
    unprot = rep.record("unprotected")
    assert unprot["eer"] < 0.05                      # 5 distinct people: clearly separable
    assert rep.record("biohash:bits=256")["status"] == "ok"
