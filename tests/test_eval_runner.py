"""The evaluation protocol end to end on tiny synthetic sets."""
import json

import numpy as np
import pytest

from engine.errors import InvalidParameter, UnknownScheme
from engine.evaluation import evaluate, expand_schemes
from engine.evaluation.attacks import candidates, inversion_success
from engine.evaluation.data import synthetic
from engine.evaluation.protocol import make_pairs
from engine.evaluation.scores import pair_similarities
from engine.schemes import make_scheme

FAST = dict(subjects=30, samples=3, dim=64, attack_templates=12, attack_steps=40, null_repeats=3,
            n_gallery=500, speed_repeats=2, bootstrap=200, he_probes=5, he_gallery=64, progress=False)

# report.json keys that existed before the evaluation was split into studies (README tables and
# downstream scripts read them): they must all still be there.
RECORD_KEYS = {"bytes_per_template", "d_null", "d_sys", "eer", "eer_stolen_token", "factory", "fnmr_at_fmr",
               "fnmr_at_fmr_stolen_token", "inversion", "inversion_success", "label", "normal", "notes", "params",
               "renewability", "scheme", "seconds", "speed", "status", "stolen_token", "unlinkability"}
ACCURACY_KEYS = {"eer", "eer_threshold", "fmr_resolvable", "fnmr_at_fmr", "n_genuine", "n_impostor", "threshold_at_fmr"}
UNLINKABILITY_KEYS = {"bins", "d_null", "d_null_iid", "d_null_iid_p95", "d_null_method", "d_null_p95", "d_null_repeats",
                      "d_null_sd", "d_null_sizes", "d_sys", "density", "n_mated", "n_nonmated", "n_subjects", "omega"}
RENEW_KEYS = {"d_sys_old_vs_new", "genuine_rate", "impostor_rate_normal", "impostor_rate_stolen_token", "match_rate",
              "match_rate_ci95", "match_rate_same_capture", "match_rate_same_capture_ci95", "n_pairs", "status",
              "threshold", "threshold_fmr"}
INVERSION_KEYS = {"0.0001", "0.001", "candidates", "mean_cosine_type1", "mean_cosine_type2", "method", "n_attacked",
                  "seconds_per_template", "status"}
SPEED_KEYS = {"compare_us", "gallery_backend", "key_expansion_ms", "n_gallery", "protect_us_batched",
              "protect_us_single", "search_1n_ms", "search_1n_ms_per_query_batch16", "search_1n_templates_per_s"}
HE_SPEED_KEYS = {"enrol_ms_per_template_block", "gallery_backend", "n_gallery", "protect_probe_ms", "search_1n_ms",
                 "search_1n_templates_per_s"}
CONFIG_KEYS = {"attack_fmrs", "fmr_targets", "keys", "options", "pairs", "quick", "scenarios", "schemes", "seed",
               "unprotected_thresholds"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rep = evaluate(schemes=["biohash:bits=128", "rotation", "he"], out=out, seed=5, **FAST)
    return rep, out, json.loads((out / "report.json").read_text())


def test_expand_schemes_sweeps_and_products():
    assert expand_schemes(["biohash:bits=256,512", "rotation"]) == [
        "biohash:bits=256", "biohash:bits=512", "rotation"]
    assert expand_schemes("iom:m=128,256,q=8,16") == [
        "iom:m=128,q=8", "iom:m=128,q=16", "iom:m=256,q=8", "iom:m=256,q=16"]
    assert expand_schemes(["iom:m=256,q=16", "iom:m=256,q=16"]) == ["iom:m=256,q=16"]
    with pytest.raises(InvalidParameter):
        expand_schemes(["biohash:256"])


@pytest.mark.parametrize("desc", ["biohash:bits=128,dim=64", "iom:m=32,q=8,dim=64",
                                  "rotation:dim=64", "rotation:quant=int8,dim=64"])
def test_pair_similarities_match_scheme_similarities(desc):
    s = make_scheme(desc)
    x = synthetic(6, 2, 64, seed=1).embeddings
    key = bytes(range(32))
    a, b = s.protect_codes(key, x), s.protect_codes(key, x[::-1].copy())
    np.testing.assert_allclose(pair_similarities(s, a, b), np.diag(s.similarities(a, b)), rtol=1e-5, atol=1e-6)


def test_make_pairs_counts_and_sampling():
    labels = np.repeat(np.arange(10), 3)
    p = make_pairs(labels, 10**6, np.random.default_rng(0))
    assert len(p.gen_i) == 10 * 3 and len(p.imp_i) == 30 * 29 // 2 - 30
    assert np.all(labels[p.gen_i] == labels[p.gen_j]) and np.all(labels[p.imp_i] != labels[p.imp_j])
    assert len(p.mated_i) == 60
    q = make_pairs(labels, 100, np.random.default_rng(0))
    assert q.impostor_sampled and len(q.imp_i) == 100
    assert len(set(zip(q.imp_i.tolist(), q.imp_j.tolist()))) == 100


def test_inversion_success_definitions():
    x = np.eye(4)[:2]
    others = [np.eye(4)[[0, 1]], np.eye(4)[[2]]]
    res = inversion_success(x, x, others, {"0.001": 0.5}, n_boot=100)
    assert res["0.001"]["type1"]["rate"] == 1.0
    assert res["0.001"]["type2"]["rate"] == pytest.approx((0.5 + 0.0) / 2)
    # sign-ambiguous candidates: success if either candidate matches
    res2 = inversion_success(np.stack([-x, x], axis=1), x, others, {"0.001": 0.5}, n_boot=100)
    assert res2["0.001"]["type1"]["rate"] == 1.0


def test_attacks_recover_embeddings_with_the_key():
    x = synthetic(10, 2, 64, seed=2).embeddings[:8]
    key = bytes(range(32))
    for desc, floor in (("rotation:dim=64", 0.999), ("biohash:bits=256,dim=64", 0.8),
                        ("iom:m=128,q=16,dim=64", 0.85), ("iom:variant=urp,m=128,q=8,p=2,dim=64", 0.6)):
        s = make_scheme(desc)
        c = candidates(s, key, s.protect_codes(key, x), steps=60)
        cos = np.einsum("ncd,nd->nc", c, x).max(axis=1)
        assert cos.mean() > floor, (desc, cos.mean())


def test_report_files_are_written(tiny):
    _, out, doc = tiny
    files = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "scores.npz", "det.png", "scores.png", "unlinkability.png"} <= files
    with np.load(out / "scores.npz") as z:
        assert len(z["biohash:bits=128|genuine"]) == 30 * 3 and "unprotected|mated" in z.files
    assert doc["synthetic"] is True
    assert [r["label"] for r in doc["records"]] == ["unprotected", "biohash:bits=128", "rotation", "he"]
    md = (out / "report.md").read_text()
    assert "SYNTHETIC DATA" in md and "| biohash:bits=128 |" in md and "| he |" in md


def test_report_json_keeps_every_existing_key(tiny):
    _, _, doc = tiny
    assert CONFIG_KEYS <= set(doc["config"])
    assert doc["config"]["scenarios"]["stolen_token"].startswith("every probe under the claimed subject's key")
    by = {r["label"]: r for r in doc["records"]}
    for r in doc["records"]:
        assert RECORD_KEYS <= set(r), r["label"]
        assert ACCURACY_KEYS <= set(r["normal"]) and ACCURACY_KEYS <= set(r["stolen_token"])
    for label in ("biohash:bits=128", "rotation"):
        r = by[label]
        assert UNLINKABILITY_KEYS <= set(r["unlinkability"]) and RENEW_KEYS <= set(r["renewability"])
        assert INVERSION_KEYS <= set(r["inversion"]) and SPEED_KEYS <= set(r["speed"])
    assert UNLINKABILITY_KEYS <= set(by["unprotected"]["unlinkability"])
    assert HE_SPEED_KEYS <= set(by["he"]["speed"])
    assert {"plaintext_same_pairs", "decryption_error"} <= set(by["he"])


def test_headline_fields_agree_with_the_studies(tiny):
    rep, _, _ = tiny
    bh = rep.record("biohash:bits=128")
    assert bh["status"] == "ok" and bh["bytes_per_template"] == 16
    assert bh["eer"] == bh["normal"]["eer"] and bh["eer_stolen_token"] == bh["stolen_token"]["eer"]
    assert bh["fnmr_at_fmr"] == bh["normal"]["fnmr_at_fmr"] and set(bh["fnmr_at_fmr"]) == {"0.01", "0.001", "0.0001"}
    assert bh["d_sys"] == bh["unlinkability"]["d_sys"] and bh["d_null"] == bh["unlinkability"]["d_null"]
    assert bh["inversion_success"]["0.001"]["type1"] == bh["inversion"]["0.001"]["type1"]["rate"]


def test_cancellable_studies_on_tiny_set(tiny):
    rep, _, _ = tiny
    bh = rep.record("biohash:bits=128")
    assert bh["unlinkability"]["n_mated"] == 30 * 3 * 2
    assert bh["renewability"]["match_rate"] < 0.05
    assert bh["speed"]["search_1n_ms"] > 0 and bh["speed"]["n_gallery"] == 500
    rot = rep.record("rotation")
    assert rot["inversion_success"]["0.001"]["type1"] == 1.0     # rotation is exactly invertible
    assert rot["eer_stolen_token"] == pytest.approx(rep.record("unprotected")["eer"], abs=1e-6)
    assert rep.record("unprotected")["d_sys"] > 0.9              # raw embeddings are linkable


def test_he_is_evaluated_not_skipped(tiny):
    """Fails when the HE path is skipped for any reason (missing TenSEAL, an engine.he API
    change...): HE is part of the default evaluation and must produce numbers."""
    rep, _, _ = tiny
    he = rep.record("he")
    assert he["status"] == "ok", he.get("reason")
    assert he["decryption_error"]["max_abs"] < 1e-3 and he["decryption_error"]["n_scores"] == 5 * (30 * 3 - 1)
    assert he["normal"]["n_genuine"] == 5 * 2 and he["normal"]["n_impostor"] == 5 * (30 * 3 - 3)
    # decrypted scores give the plaintext accuracy on the same pairs
    assert he["eer"] == pytest.approx(he["plaintext_same_pairs"]["eer"], abs=0.02)
    assert he["speed"]["search_1n_ms"] > 0 and he["speed"]["n_gallery"] == 64
    # privacy is stated, not made up
    assert he["d_sys"] is None and he["inversion_success"] is None and "IND-CPA" in he["unlinkability"]["note"]


def test_he_skipped_only_when_its_dependency_is_missing(monkeypatch):
    import engine.evaluation.runner as runner

    real = runner.build_scheme

    def no_tenseal(desc, dim):
        if desc.startswith("he"):
            raise ImportError("No module named 'tenseal'")
        return real(desc, dim)

    monkeypatch.setattr(runner, "build_scheme", no_tenseal)
    rep = evaluate(schemes=["he"], seed=1, plots=False, **FAST)
    he = rep.record("he")
    assert he["status"] == "skipped" and "tenseal" in he["reason"] and he["eer"] is None


def test_results_of_a_scheme_do_not_depend_on_the_other_schemes():
    alone = evaluate(schemes=["biohash:bits=128"], seed=2, plots=False, **FAST).record("biohash:bits=128")
    both = evaluate(schemes=["rotation", "biohash:bits=128"], seed=2, plots=False, **FAST).record("biohash:bits=128")
    for key in ("eer", "eer_stolen_token", "d_sys", "d_null", "inversion_success"):
        assert alone[key] == both[key], key
    assert alone["renewability"]["match_rate_ci95"] == both["renewability"]["match_rate_ci95"]


def test_per_subject_keys_unlinkable_shared_key_fully_linkable():
    schemes = ["biohash:bits=256", "rotation"]
    opts = dict(FAST, subjects=60, samples=4, attack_templates=4)
    good = evaluate(schemes=schemes, seed=1, plots=False, **opts)
    bad = evaluate(schemes=schemes, seed=1, plots=False, same_key=True, **opts)
    for label in schemes:
        g, b = good.record(label)["unlinkability"], bad.record(label)["unlinkability"]
        assert g["d_sys"] < g["d_null_p95"] + 0.05, (label, g)
        assert b["d_sys"] > 0.9, (label, b)
        # with one key for all, renewal does not work either: the "re-keyed" template still matches
        assert bad.record(label)["renewability"]["match_rate"] > 0.8
        # and the normal scenario degenerates into the stolen-token one
        assert bad.record(label)["eer"] == pytest.approx(bad.record(label)["eer_stolen_token"])


def test_unknown_scheme_or_bad_parameter_raises_before_any_work(monkeypatch, tmp_path):
    import engine.evaluation.runner as runner

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("data loaded before the schemes were checked"))
    with pytest.raises(UnknownScheme, match="available: biohash"):
        evaluate(schemes=["bogus"], out=tmp_path / "o", **FAST)
    with pytest.raises(InvalidParameter, match="bitz"):
        evaluate(schemes=["biohash:bitz=3"], **FAST)
    with pytest.raises(InvalidParameter, match="positive integer"):
        evaluate(schemes=["rotation"], **dict(FAST, n_gallery=0))
    assert not (tmp_path / "o").exists()


def test_cli_eval(tmp_path, capsys):
    from engine.cli import main
    rc = main(["eval", "--subjects", "12", "--samples", "3", "--dim", "32", "--quick", "--no-plots",
               "--no-progress", "--schemes", "biohash:bits=64,128", "--gallery", "200",
               "--no-protocol-attacks",   # keysvc: they run in tests/test_keysvc_attacks.py
               "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "biohash:bits=64" in out and "biohash:bits=128" in out
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["label"] for r in doc["records"]] == ["unprotected", "biohash:bits=64", "biohash:bits=128"]


def test_cli_eval_unknown_scheme_is_one_line_and_nonzero(tmp_path, capsys):
    from engine.cli import main
    rc = main(["eval", "--no-progress", "--schemes", "bogus", "--out", str(tmp_path / "p"), "--quick"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "unknown scheme 'bogus'" in err and "available:" in err
    assert not (tmp_path / "p").exists()


def test_cli_eval_unwritable_out_fails_before_work(tmp_path, capsys, monkeypatch):
    import engine.evaluation.runner as runner
    from engine.cli import main

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        rc = main(["eval", "--no-progress", "--schemes", "rotation", "--out", str(out), "--quick"])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and "--out" in err, err
