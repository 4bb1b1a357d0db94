"""Pairs files: exactly the listed pairs are compared; LFW's 10-fold protocol when the file has folds."""
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidParameter
from engine.evaluation import evaluate
from engine.evaluation.pairsfile import lfw_image_path, read_pairs_file
from engine.evaluation.studies import folds

FAST = dict(attack_templates=4, attack_steps=20, null_repeats=3, n_gallery=200, speed_repeats=2, bootstrap=100,
            he_probes=4, he_gallery=32, progress=False, plots=False)
PEOPLE, EACH, DIM = 8, 4, 32


def _photos(root: Path) -> None:
    for p in range(PEOPLE):
        (root / f"P{p}").mkdir(parents=True)
        for k in range(EACH):
            (root / f"P{p}" / f"P{p}_{k + 1:04d}.jpg").write_bytes(b"fake")


def _embed(path: Path) -> np.ndarray:
    """Person p: a unit centre plus per-image noise (seeded by the file name)."""
    p, k = int(path.parent.name[1:]), int(path.stem[-4:])
    centre = np.random.default_rng(p).standard_normal(DIM)
    noise = np.random.default_rng(1000 * p + k).standard_normal(DIM)
    v = centre / np.linalg.norm(centre) + 0.6 * noise / np.linalg.norm(noise)
    return v / np.linalg.norm(v)


def _lfw_file(path: Path, n_folds: int, per: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    lines, pairs = [f"{n_folds}\t{per}"], []
    for _ in range(n_folds):
        for _ in range(per):
            p = int(rng.integers(PEOPLE))
            i, j = rng.choice(EACH, 2, replace=False) + 1
            lines.append(f"P{p}\t{i}\t{j}")
            pairs.append((p, i, p, j))
        for _ in range(per):
            a, b = rng.choice(PEOPLE, 2, replace=False)
            i, j = rng.integers(1, EACH + 1, 2)
            lines.append(f"P{a}\t{i}\tP{b}\t{j}")
            pairs.append((a, i, b, j))
    path.write_text("\n".join(lines) + "\n")
    return pairs


def test_a_four_pair_file_is_evaluated_on_exactly_those_pairs(tmp_path):
    _photos(tmp_path)
    (tmp_path / "pairs.txt").write_text("P0 1 2\nP1 1 3\nP0 3 P1 2\nP2 1 P3 4\n")
    rep = evaluate(_dataset(tmp_path / "pairs.txt", tmp_path), ["biohash:bits=64", "he"], seed=0, **FAST)
    assert rep.config["pairs"] == {"genuine": 2, "impostor": 2, "mated_linkage": 4, "impostor_sampled": False,
                                   "source": "listed", "folds": 0}
    for label in ("unprotected", "biohash:bits=64", "he"):
        r = rep.record(label)
        assert r["status"] == "ok", r.get("reason")
        assert (r["normal"]["n_genuine"], r["normal"]["n_impostor"]) == (2, 2), label
        assert "folds" not in r
    assert rep.record("biohash:bits=64")["unlinkability"]["d_null_method"].startswith("i.i.d.")
    assert rep.dataset["listed_pairs"] == {"used": 4, "genuine": 2, "impostor": 2, "folds": 0}


def _dataset(pairs_path: Path, root: Path):
    from engine.evaluation.pairsfile import load_pairs
    return load_pairs(pairs_path, root, embed=_embed)


def test_listed_scores_are_the_cosines_of_the_listed_pairs(tmp_path):
    _photos(tmp_path)
    listed = _lfw_file(tmp_path / "pairs.txt", 1, 6)
    ds = _dataset(tmp_path / "pairs.txt", tmp_path)
    rep = evaluate(ds, ["rotation"], seed=0, **FAST)
    gen = [a for a in listed if a[0] == a[2]]
    want = sorted(float(_embed(tmp_path / f"P{p}/P{p}_{i:04d}.jpg") @ _embed(tmp_path / f"P{q}/P{q}_{j:04d}.jpg"))
                  for p, i, q, j in gen)
    got = sorted(rep.results[0].arrays["genuine"].tolist())
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ten_fold_protocol_on_a_file_with_folds(tmp_path):
    _photos(tmp_path)
    _lfw_file(tmp_path / "pairs.txt", 10, 3)
    ds = _dataset(tmp_path / "pairs.txt", tmp_path)
    rep = evaluate(ds, ["biohash:bits=128", "he"], seed=0, **dict(FAST, he_probes=10_000))
    assert rep.config["pairs"]["folds"] == 10
    for label in ("unprotected", "biohash:bits=128", "he"):
        f = rep.record(label)["folds"]
        for scen in ("normal", "stolen_token"):
            acc = f[scen]["accuracy"]
            assert f[scen]["n_folds"] == 10 and len(acc) == 10 and f[scen]["n_pairs"] == [6] * 10
            assert f[scen]["mean"] == pytest.approx(np.mean(acc))
            assert f[scen]["std"] == pytest.approx(np.std(acc, ddof=1))
    # the reference row, recomputed by hand: threshold from the other nine folds
    res = rep.results[0]
    gen, imp = res.arrays["genuine"], res.arrays["impostor_normal"]
    fold_of = np.repeat(np.arange(10), 3)
    for k in range(10):
        t = folds.best_threshold(gen[fold_of != k], imp[fold_of != k])
        right = np.sum(gen[fold_of == k] >= t) + np.sum(imp[fold_of == k] < t)
        assert rep.record("unprotected")["folds"]["normal"]["accuracy"][k] == pytest.approx(right / 6)
    md = rep.to_markdown()
    assert "10-fold accuracy (LFW)" in md and "exactly the pairs listed in the file, 10 folds" in md


def test_best_threshold_maximises_training_accuracy():
    rng = np.random.default_rng(0)
    g, i = rng.normal(1, 1, 200), rng.normal(-1, 1, 300)
    t = folds.best_threshold(g, i)
    acc = lambda th: (np.sum(g >= th) + np.sum(i < th)) / 500  # noqa: E731
    grid = np.linspace(-4, 4, 4001)
    assert acc(t) >= max(acc(x) for x in grid) - 1e-12
    assert folds.best_threshold(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.5


def test_pairs_file_header_must_match_its_content(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("2\t1\nA 1 2\nA 1 B 1\nC 1 2\n")
    with pytest.raises(InvalidParameter, match="2 folds of 1 genuine"):
        read_pairs_file(p)
    p.write_text("2\t1\nA 1 2\nA 1 B 1\nC 1 D 1\nC 1 2\n")
    with pytest.raises(InvalidParameter, match="fold 2 is not"):
        read_pairs_file(p)
    p.write_text("2\t1\nA 1 2\nA 1 B 1\nC 1 2\nC 1 D 1\n")
    pf = read_pairs_file(p)
    assert pf.n_folds == 2 and pf.fold == [0, 0, 1, 1]
    p.write_text("1100\nA 1 2\nA 1 B 1\n")                # a pair count, not folds
    assert read_pairs_file(p).n_folds == 0
    p.write_text("A 1 x\n")
    with pytest.raises(InvalidParameter, match=":1: not a pairs line"):
        read_pairs_file(p)


def test_person_folders_without_lfw_names_are_read_by_position(tmp_path):
    (tmp_path / "Amy").mkdir()
    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / "Amy" / name).write_bytes(b"x")
    assert lfw_image_path(tmp_path, "Amy", 1).name == "a.jpg"
    assert lfw_image_path(tmp_path, "Amy", 3).name == "c.png"
    assert not lfw_image_path(tmp_path, "Amy", 4).exists()


def test_real_photos_pairs_file_with_folds(shared_faces, tmp_path):
    """The 55 photos of ../shared/data/faces (5 people x 11), through the face pipeline,
    on a pairs file with 2 folds of 10 + 10 pairs (images named by position in each folder)."""
    people = sorted(p.name for p in shared_faces.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    lines = ["2\t10"]
    for _ in range(2):
        for _ in range(10):
            p = people[int(rng.integers(len(people)))]
            i, j = rng.choice(11, 2, replace=False) + 1
            lines.append(f"{p}\t{i}\t{j}")
        for _ in range(10):
            a, b = rng.choice(len(people), 2, replace=False)
            lines.append(f"{people[a]}\t{int(rng.integers(1, 12))}\t{people[b]}\t{int(rng.integers(1, 12))}")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    try:
        rep = evaluate(tmp_path / "pairs.txt", ["biohash:bits=256"], images_root=shared_faces, seed=0, **FAST)
    except Exception as exc:  # noqa: BLE001 - model files missing on this machine
        if type(exc).__name__ in ("ModelNotFound", "ModelConversionError"):
            pytest.skip(f"face model not available: {exc}")
        raise
    assert rep.dataset["image_naming"] == "position in folder" and rep.dataset["n_used_pairs"] == 40
    assert rep.config["pairs"]["genuine"] == 20 and rep.config["pairs"]["impostor"] == 20
    unprot = rep.record("unprotected")
    assert unprot["folds"]["normal"]["n_folds"] == 2
    assert unprot["folds"]["normal"]["mean"] > 0.9          # 5 distinct people: clearly separable
    assert rep.record("biohash:bits=256")["status"] == "ok"
