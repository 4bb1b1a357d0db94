"""``veilface embed`` / ``models`` as an operator uses them: labels, output file, mistakes, JSON."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.cli import build_parser, main
from engine.face import commands
from engine.face.errors import NoFaceFound


class FakePipeline:
    """Embeds a photo by its file name; 'noface' photos have no face."""

    embedding_dim = 8

    def __init__(self) -> None:
        self.calls = 0

    def faces(self, path, policy):
        self.calls += 1
        if "noface" in Path(path).name:
            raise NoFaceFound("no face found in the image")
        person = Path(path).parent.name
        v = np.zeros(8, np.float32)
        v[sum(map(ord, person)) % 8] = 1.0
        v[(sum(map(ord, Path(path).name)) + 3) % 8] += 0.2
        return [SimpleNamespace(embedding=v / np.linalg.norm(v))]


@pytest.fixture
def fake(monkeypatch):
    pipe = FakePipeline()
    monkeypatch.setattr(commands, "_make_pipeline", lambda args: pipe)
    return pipe


def _folder(root: Path, people=("amy", "bob", "cy"), each=3) -> Path:
    for p in people:
        (root / p).mkdir(parents=True)
        for k in range(each):
            (root / p / f"{k}.jpg").write_bytes(b"x")
    return root


def test_embed_labels_from_person_folders_and_exact_out_name(tmp_path, fake, capsys):
    faces = _folder(tmp_path / "faces")
    (faces / "bob" / "noface.jpg").write_bytes(b"x")
    out = tmp_path / "emb"                                   # no .npz suffix: written exactly as named
    assert main(["embed", str(faces), "--out", str(out), "--no-progress"]) == 0
    assert out.exists() and not (tmp_path / "emb.npz").exists()
    assert f"written to {out}" in capsys.readouterr().out
    with np.load(out) as z:
        assert sorted(z.files) == ["embeddings", "labels", "paths"]
        assert z["labels"].tolist() == ["amy"] * 3 + ["bob"] * 3 + ["cy"] * 3
        assert z["embeddings"].shape == (9, 8)


def test_embed_folders_of_one_person_each(tmp_path, fake):
    faces = _folder(tmp_path / "faces")
    out = tmp_path / "e.npz"
    assert main(["embed", str(faces / "amy"), str(faces / "cy"), "--out", str(out), "--no-progress"]) == 0
    with np.load(out) as z:
        assert z["labels"].tolist() == ["amy"] * 3 + ["cy"] * 3


def test_embed_json_summary(tmp_path, fake, capsys):
    faces = _folder(tmp_path / "faces")
    (faces / "amy" / "noface.jpg").write_bytes(b"x")
    assert main(["embed", str(faces), "--out", str(tmp_path / "e.npz"), "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["photos"] == 10 and doc["photos_with_faces"] == 9 and doc["embeddings"] == 9 and doc["dim"] == 8
    assert doc["labels"] == {"source": "folders", "subjects": 3} and doc["out"] == str(tmp_path / "e.npz")
    assert doc["skipped"] == [{"path": str(faces / "amy" / "noface.jpg"), "reason": "NO_FACE",
                               "message": "no face found in the image"}]


def test_embed_loose_photos_store_no_labels_and_say_so(tmp_path, fake, capsys):
    faces = _folder(tmp_path / "faces")
    (faces / "loose.jpg").write_bytes(b"x")
    assert main(["embed", str(faces), "--out", str(tmp_path / "e.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "e.npz") as z:
        assert "labels" not in z.files
    err = capsys.readouterr().err
    assert "no labels stored" in err and "--labels FILE" in err


def test_embed_labels_file(tmp_path, fake):
    photos = [tmp_path / f"{k}.jpg" for k in range(4)]
    for p in photos:
        p.write_bytes(b"x")
    (tmp_path / "labels.txt").write_text("".join(f"{p}\t{'ab'[k // 2]}\n" for k, p in enumerate(photos)))
    out = tmp_path / "e.npz"
    assert main(["embed", *map(str, photos), "--labels", str(tmp_path / "labels.txt"), "--out", str(out),
                 "--no-progress"]) == 0
    with np.load(out) as z:
        assert z["labels"].tolist() == ["a", "a", "b", "b"]


@pytest.mark.parametrize("case", ["missing_dir", "out_is_dir", "labels_miss_a_photo", "missing_input"])
def test_embed_mistakes_fail_before_any_photo_is_embedded(tmp_path, fake, capsys, case):
    faces = _folder(tmp_path / "faces")
    args = ["embed", str(faces), "--out", str(tmp_path / "e.npz"), "--no-progress"]
    if case == "missing_dir":
        args[3] = str(tmp_path / "nope" / "e.npz")
    elif case == "out_is_dir":
        args[3] = str(tmp_path)
    elif case == "labels_miss_a_photo":
        (tmp_path / "l.txt").write_text(f"{faces / 'amy' / '0.jpg'}\tamy\n")
        args += ["--labels", str(tmp_path / "l.txt")]
    else:
        args[1] = str(tmp_path / "no-such-photos")
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("veilface: error:"), err
    assert fake.calls == 0


def test_embed_output_feeds_eval(tmp_path, fake, capsys):
    faces = _folder(tmp_path / "faces", people=("amy", "bob", "cy", "dan"), each=3)
    assert main(["embed", str(faces), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    rc = main(["eval", "--data", str(tmp_path / "emb"), "--schemes", "rotation", "--quick", "--no-plots",
               "--no-progress", "--gallery", "50", "--no-protocol-attacks",   # keysvc: tests/test_keysvc_attacks.py
               "--out", str(tmp_path / "rep")])
    assert rc == 0
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["dataset"]["n_subjects"] == 4 and doc["dataset"]["n_embeddings"] == 12
    # without labels: one line saying what to do
    with open(tmp_path / "nolabels.npz", "wb") as fh:
        np.savez(fh, embeddings=np.eye(4, 8))
    capsys.readouterr()
    rc = main(["eval", "--data", str(tmp_path / "nolabels.npz"), "--schemes", "rotation", "--quick",
               "--no-progress", "--out", str(tmp_path / "rep2")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--labels FILE" in err


def _actions(parser):
    for a in parser._actions:
        if a.choices and isinstance(a.choices, dict):   # sub-commands
            for name, sub in a.choices.items():
                yield from ((f"{name} {n}", b) for n, b in _actions(sub))
        else:
            yield "", a


def test_every_flag_of_embed_models_and_eval_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    for cmd in ("embed", "models", "eval"):
        for where, action in _actions(sub.choices[cmd]):
            if action.dest == "help":
                continue
            assert action.help, f"{cmd} {where}{action.option_strings or action.dest} has no help"


def test_embed_and_eval_real_photos(shared_faces, tmp_path):
    """The real 55 photos of ../shared/data/faces: embed (labels from the person folders), then eval."""
    try:
        rc = main(["embed", str(shared_faces), "--out", str(tmp_path / "emb.npz"), "--no-progress"])
    except Exception as exc:  # noqa: BLE001 - model files missing on this machine
        if type(exc).__name__ in ("ModelNotFound", "ModelConversionError"):
            pytest.skip(f"face model not available: {exc}")
        raise
    assert rc == 0
    with np.load(tmp_path / "emb.npz") as z:
        assert len(set(z["labels"].tolist())) == 5 and len(z["labels"]) == len(z["embeddings"])
    from engine.evaluation import evaluate
    rep = evaluate(tmp_path / "emb.npz", ["biohash:bits=256"], progress=False, plots=False, quick=True)
    assert rep.dataset["n_subjects"] == 5 and rep.record("unprotected")["eer"] < 0.05
