"""HE 1:1 (verify mode): correctness, the sanitised result, and the divide-out attack of issue 9
(it recovers the template from a bare product and is at chance against the sanitised one)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

import tenseal.sealapi as seal  # noqa: E402

from engine.errors import NotEnrolled  # noqa: E402
from engine.evaluation.he_attacks import divide_out_attack  # noqa: E402
from engine.he import EncryptedGallery, HEUnsupported, KeyHolder, PublicContext  # noqa: E402
from engine.he.sanitize import centred_binomial, flood_bound, ternary, uniform_residues  # noqa: E402

from .test_he import TOL, near, unit  # noqa: E402 -- shared helpers


@pytest.fixture(scope="module")
def vkh():
    return KeyHolder("verify", 128, tenant="t-verify")


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
    with pytest.raises(NotEnrolled):
        gallery.verify("nobody", pub.encrypt(x[0], "probe"))


def test_decisions_with_and_without_the_score(vkh):
    rng = np.random.default_rng(2)
    pub = vkh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 2, 128)
    g.add("s0", pub.encrypt(x[0]))
    blob = g.verify("s0", pub.encrypt(near(rng, x[0], 0.05), "probe"))
    ok, score = vkh.verify_decision(blob, threshold=0.8)     # the key holder itself: score too
    assert ok and score > 0.9 and round(score, 4) == score
    d = vkh.decide_verify(blob, threshold=0.8)               # what another decider releases
    assert d.matched and d.subject_id == "s0" and not hasattr(d, "score")
    assert not vkh.decide_verify(g.verify("s0", pub.encrypt(x[1], "probe")), threshold=0.8).matched


def test_result_is_relinearised_and_reveals_only_the_score(vkh):
    """Size 2 (nothing left to divide by); coefficient 0 is the score; every other coefficient is
    uniform modulo q (the correlations of probe and template are gone)."""
    rng = np.random.default_rng(3)
    pub = vkh.public_context()
    g = EncryptedGallery(pub)
    x = unit(rng, 1, 128)[0]
    g.add("s", pub.encrypt(x))
    blob = g.verify("s", pub.encrypt(x, "probe"))
    _, cts = pub.load_ciphertexts(blob, "score")
    assert cts[0].size() == 2
    coeffs = vkh._decrypt_coeffs(cts[0])
    assert abs(coeffs[0] - 1.0) < TOL
    q = float(np.prod([float(p) for p in pub.core.primes]))
    half = q / 2 / (pub.params.scale * pub.params.template_scale)      # mask range / product scale
    others = np.delete(coeffs, 0)
    hist, _ = np.histogram(others, bins=8, range=(-half, half))
    expected = len(others) / 8
    assert np.abs(others).max() <= half * (1 + 1e-9)
    assert np.all(np.abs(hist - expected) < 5 * np.sqrt(expected)), hist      # uniform
    truth = np.correlate(np.r_[x, np.zeros(128)], x, "full")                 # the bare correlations
    assert abs(np.corrcoef(others[:len(truth)], truth)[0, 1]) < 0.15


def test_flood_meets_the_distance_and_error_bounds(vkh):
    pub = vkh.public_context()
    special = pub.core.ctx.key_context_data().parms().coeff_modulus()[-1].value()
    b = flood_bound(pub.params, pub.core.primes, special)
    assert b.statistical_distance <= 2.0 ** -40 and b.max_error < 1e-3
    assert b.log2_flood - b.log2_tail >= 41 and b.log2_sigma_product > b.log2_sigma_keyswitch
    # measured: the decrypted scores carry the flood, uniform in +-B/(Delta_p Delta_t)
    rng = np.random.default_rng(4)
    g = EncryptedGallery(pub)
    y = unit(rng, 1, 128)[0]
    g.add("s", pub.encrypt(y))
    x = unit(rng, 40, 128)
    errs = np.array([vkh.decrypt_scores(g.verify("s", pub.encrypt(v, "probe")))[1][0] - v @ y for v in x])
    flood = float(b.flood) / (pub.params.scale * pub.params.template_scale)
    assert np.abs(errs).max() < b.max_error + 1e-4    # + the probe's own encryption noise (~1e-5)
    assert 0.3 * flood < np.abs(errs).mean() < 0.7 * flood          # uniform: mean |F| = B / 2


def test_unflooded_noise_is_far_below_the_flood(vkh):
    """The noise the flood must hide (product, relinearisation, re-randomisation) is measured
    against the ideal <P, T> of the decrypted probe and template: orders of magnitude below."""
    rng = np.random.default_rng(5)
    pub = vkh.public_context()
    core, g = pub.core, EncryptedGallery(pub)
    x, y = unit(rng, 2, 128).astype(np.float32).astype(np.float64)
    from engine.he.sealio import seal_load
    from engine.he.wire import unpack_blob

    p = seal_load(seal.Ciphertext, core.ctx, unpack_blob(pub.encrypt(x, "probe"))[1][0])
    t = seal_load(seal.Ciphertext, core.ctx, unpack_blob(pub.encrypt(y, "template"))[1][0])
    prod = g.product(p, t)
    core.evaluator.relinearize_inplace(prod, pub.relin_keys)
    ideal = core.unlayout(vkh._decrypt_coeffs(p), "probe") @ core.unlayout(vkh._decrypt_coeffs(t), "template")
    pt = seal.Plaintext()
    vkh._decryptor.decrypt(prod, pt)
    assert abs(core.constant_term(pt) - ideal) < 1e-12


def test_mask_randomness_is_fresh_and_uniform(vkh):
    pub = vkh.public_context()
    g = EncryptedGallery(pub)
    rng = np.random.default_rng(6)
    x = unit(rng, 1, 128)[0]
    g.add("s", pub.encrypt(x))
    probe = pub.encrypt(x, "probe")
    np.random.seed(0)                          # numpy's generators play no part
    a, b = g.verify("s", probe), g.verify("s", probe)
    assert a != b and vkh.decrypt_scores(a)[1][0] != vkh.decrypt_scores(b)[1][0]
    r = uniform_residues(pub.core.primes, 1 << 15)
    for row, q in zip(r, pub.core.primes):
        assert row.max() < q and abs(row.mean() / q - 0.5) < 0.01
    assert sorted(set(ternary(4096).tolist())) == [-1, 0, 1]
    e = centred_binomial(1 << 16)
    assert abs(e.var() - 10.5) < 0.3 and np.abs(e).max() <= 21


def test_sanitising_needs_the_relinearisation_key(vkh):
    with pytest.raises(HEUnsupported):
        EncryptedGallery(vkh.public_context(eval_keys=False))


# -- the divide-out attack (issue 9 item 1) ----------------------------------------------------------
def test_divide_out_attack_recovers_the_template_from_a_bare_product():
    """Positive control: what the matcher returned before sanitisation (the bare product) gives
    the device the enrolled template, from one Verify with an unrelated face."""
    cos = divide_out_attack(subjects=4, dim=128, seed=1, unsanitised=True)
    assert cos.min() > 0.999


def test_divide_out_attack_is_at_chance_against_the_sanitised_result():
    cos = divide_out_attack(subjects=16, dim=128, seed=2)
    # chance: E|cos| ~ sqrt(2 / (pi * 128)) = 0.07 (the attack keeps the better of two strategies)
    assert cos.mean() < 0.13 and cos.max() < 0.4


def test_released_score_is_an_inner_product_oracle_decisions_are_not():
    """Known limit, measured: a device that decrypts its own scores reads one template component
    per Verify with basis probes (sanitisation cannot help: the score is the released value).
    A decider that releases only the decision gives the same probes nothing."""
    from engine.evaluation.he_attacks import score_oracle_attack

    scores = score_oracle_attack(subjects=2, dim=64, seed=3)
    assert scores.min() > 0.99
    partial = score_oracle_attack(subjects=2, dim=64, queries=16, seed=3)
    assert 0.2 < partial.mean() < 0.8                       # ~ sqrt(16 / 64)
    decisions = score_oracle_attack(subjects=4, dim=64, seed=3, decision_only=True)
    assert decisions.mean() < 0.25                          # chance ~ 0.10 at 64-d
