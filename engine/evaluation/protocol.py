"""The evaluation protocol: which keys protect each side of a comparison, and which pairs are compared.

Every number in a report comes from this protocol; :func:`describe` writes it into every report.

Keys. Two "applications" A and B (two tenants with independent master secrets, derived from
the seed) give every subject ``s`` the keys ``K_A(s, v)`` and ``K_B(s, v)`` for key version
``v`` (:class:`engine.keys.KeyDeriver`, one key per subject, scheme and version).

Comparison pairs. Pair ``(i, j)`` reads "probe ``i`` claims the identity of the subject of
``j``, whose enrolled template is ``j``". The same sample pairs are used by every scheme and
scenario (paired comparison). Two pair sets:

* **all pairs** (embeddings files, photo folders, synthetic data): genuine = every unordered
  pair of two different samples of one subject; impostor = every unordered pair of samples of
  two different subjects (a uniform random subset of ``max_impostor`` when there are more);
* **listed pairs** (an LFW-style ``pairs.txt``): exactly the pairs the file lists, "same"
  lines genuine and "different" lines impostor; with folds (LFW's header ``10 300``), the
  10-fold protocol is reported too (:mod:`.studies.folds`).

Scenarios (:data:`SCENARIOS`):

* **unprotected**: cosine of the raw embeddings (the reference).
* **normal (secret key)**: every sample is protected with its *own* subject's key
  ``K_A(subject, 1)``. An impostor claiming subject B does *not* hold B's token: his probe is
  protected with his own token and compared with B's template under ``K_A(B, 1)``.
* **stolen-token**: the impostor holds B's token: *every* probe is protected with the claimed
  subject's key ``K_A(B, 1)``. The worst case, and the one to set thresholds on.
* **unlinkability** (Gomez-Barrero et al. 2018): templates of application A vs application B;
  mated = the same subject, different samples (ordered pairs); non-mated = the impostor pairs.
* **irreversibility**: full disclosure -- the attacker has the template and its key.
* **renewability**: old templates (version 1) against the re-keyed enrolment (version 2).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameter
from ..keys import KeyDeriver

DEFAULT_SCHEMES = ("biohash:bits=256,512", "iom:m=256,q=16", "rotation", "he")
FMR_TARGETS = (1e-2, 1e-3, 1e-4)
ATTACK_FMRS = (1e-3, 1e-4)
RENEW_FMR = 1e-3

#: which key protects each side of a comparison (copied into report.json)
SCENARIOS = {
    "normal": "genuine: probe and template under the subject's own key K_A(s,1); impostor: probe under "
              "the impostor's own key K_A(a,1), template under the claimed subject's key K_A(b,1)",
    "stolen_token": "every probe under the claimed subject's key K_A(b,1) (the impostor holds b's token); "
                    "templates under K_A(b,1)",
    "unlinkability": "templates of application A (K_A(s,1)) vs application B (K_B(s,1)); mated = same "
                     "subject, different samples; non-mated = different subjects",
    "renewability": "old template K_A(s,1) vs re-keyed enrolment K_A(s,2) of the same subject",
    "inversion": "full disclosure: attacker has the template and its key K_A(s,1)",
}

#: what the pair sets are, by :attr:`Pairs.source`
PAIR_SETS = {
    "all": "genuine: every pair of two samples of one subject; impostor: every pair of samples of two "
           "different subjects (a random subset when capped by max_impostor)",
    "listed": "exactly the pairs listed in the pairs file: 'same' lines genuine, 'different' lines impostor; "
              "mated linkage pairs = the listed genuine pairs in both orientations",
}


@dataclass
class Options:
    """Sizes and switches of one evaluation (see :func:`engine.evaluation.evaluate`)."""

    seed: int = 0
    max_impostor: int = 1_000_000
    attack_templates: int = 200
    attack_steps: int = 150
    null_repeats: int = 20
    bins: int | None = None
    n_gallery: int = 10_000
    speed_repeats: int = 30
    bootstrap: int = 2000
    same_key: bool = False
    he_probes: int = 100
    he_gallery: int = 1000
    progress: bool | None = False
    plots: bool = True
    # keysvc: protocol attacks against the real gRPC services (matcher + key service on loopback);
    # on in `veilface eval`, opt-in from Python (it starts servers)
    protocol_attacks: bool = False
    attack_subjects: int = 50

    def __post_init__(self) -> None:
        for name in ("max_impostor", "n_gallery", "speed_repeats", "bootstrap", "he_probes", "he_gallery",
                     "null_repeats", "attack_steps", "attack_subjects"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InvalidParameter(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.attack_templates, (int, np.integer)) or self.attack_templates < 0:
            raise InvalidParameter(f"attack_templates must be an integer >= 0, got {self.attack_templates!r}")

    QUICK = {"attack_templates": 40, "attack_steps": 60, "null_repeats": 5, "n_gallery": 2000, "he_probes": 20,
             "he_gallery": 256, "speed_repeats": 5, "bootstrap": 500, "max_impostor": 200_000, "attack_subjects": 20}


def study_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator for one study of one scheme: the same numbers whatever else the run contains."""
    digest = hashlib.sha256("/".join(map(str, names)).encode()).digest()
    return np.random.default_rng([int(seed), *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


# -- keys --------------------------------------------------------------------------------
class KeyPlan:
    """Per-subject keys of the evaluation: ``key(subject, scheme, app, version)``.

    ``same_key=True`` gives every subject, application and version one shared key (a
    deliberately broken deployment, fully linkable; used to validate the metrics).
    """

    def __init__(self, seed: int = 0, same_key: bool = False) -> None:
        self.seed = int(seed)
        self.same_key = same_key
        self._derivers = {app: KeyDeriver(hashlib.sha256(f"veilface-eval/{seed}/{app}".encode()).digest(),
                                          tenant=f"eval-{app}") for app in ("A", "B")}

    def key(self, subject: int, scheme: str, app: str = "A", version: int = 1) -> bytes:
        if self.same_key:
            return self._derivers["A"].derive("shared", 1, scheme)
        return self._derivers[app].derive(f"subject-{int(subject)}", int(version), scheme)

    def describe(self) -> str:
        if self.same_key:
            return "one key shared by every subject and application (broken deployment)"
        return ("HKDF per subject: K_app(subject, version) from two independent master secrets "
                "(applications A and B) derived from the seed")


# -- pairs -------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Index pairs into the dataset (probe ``i``, reference ``j``).

    ``gen_fold``/``imp_fold``: fold of each listed pair (``-1`` everywhere when the pairs file
    has no folds, ``None`` for the all-pairs protocol).
    """

    gen_i: np.ndarray
    gen_j: np.ndarray
    imp_i: np.ndarray
    imp_j: np.ndarray
    mated_i: np.ndarray      # ordered genuine pairs (both orientations) for A-vs-B linkage
    mated_j: np.ndarray
    impostor_sampled: bool = False
    source: str = "all"
    gen_fold: np.ndarray | None = None
    imp_fold: np.ndarray | None = None
    n_folds: int = 0

    def describe(self) -> dict:
        out = {"genuine": int(len(self.gen_i)), "impostor": int(len(self.imp_i)),
               "mated_linkage": int(len(self.mated_i)), "impostor_sampled": self.impostor_sampled,
               "source": self.source}
        if self.source == "listed":
            out["folds"] = int(self.n_folds)
        return out


def _both_orientations(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([i, j]).astype(np.int64), np.concatenate([j, i]).astype(np.int64)


def make_pairs(labels: np.ndarray, max_impostor: int, rng: np.random.Generator) -> Pairs:
    """The all-pairs protocol (see the module docstring)."""
    labels = np.asarray(labels)
    n = len(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    gi, gj = [], []
    for rows in np.split(order, bounds):
        if len(rows) > 1:
            a, b = np.triu_indices(len(rows), 1)
            gi.append(rows[a])
            gj.append(rows[b])
    gen_i = np.concatenate(gi) if gi else np.empty(0, np.int64)
    gen_j = np.concatenate(gj) if gj else np.empty(0, np.int64)
    total = n * (n - 1) // 2 - len(gen_i)
    if total <= max_impostor:
        a, b = np.triu_indices(n, 1)
        keep = labels[a] != labels[b]
        imp_i, imp_j, sampled = a[keep], b[keep], False
    else:
        imp_i, imp_j, sampled = *_sample_impostors(labels, max_impostor, rng), True
    return Pairs(gen_i.astype(np.int64), gen_j.astype(np.int64), imp_i.astype(np.int64),
                 imp_j.astype(np.int64), *_both_orientations(gen_i, gen_j), sampled)


def _sample_impostors(labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct unordered different-subject pairs, uniformly (rejection sampling)."""
    n = len(labels)
    got: set[int] = set()
    ii, jj = [], []
    while len(ii) < count:
        k = 2 * (count - len(ii))
        a, b = rng.integers(0, n, k), rng.integers(0, n, k)
        a, b = np.minimum(a, b), np.maximum(a, b)
        diff = labels[a] != labels[b]
        for x, y in zip(a[diff].tolist(), b[diff].tolist()):
            code = x * n + y
            if code not in got:
                got.add(code)
                ii.append(x)
                jj.append(y)
                if len(ii) == count:
                    break
    return np.asarray(ii, np.int64), np.asarray(jj, np.int64)


def listed_pairs(listed) -> Pairs:
    """The listed-pairs protocol from a :class:`~engine.evaluation.data.ListedPairs`."""
    same = np.asarray(listed.same, dtype=bool)
    i, j, fold = (np.asarray(a, dtype=np.int64) for a in (listed.i, listed.j, listed.fold))
    if not same.any() or same.all():
        raise InvalidParameter(f"the pairs file gives {int(same.sum())} genuine and {int((~same).sum())} impostor "
                               "pairs that could be used; evaluation needs at least one of each")
    return Pairs(i[same], j[same], i[~same], j[~same], *_both_orientations(i[same], j[same]), False,
                 "listed", fold[same], fold[~same], int(listed.n_folds))


def describe(keys: KeyPlan, pairs: Pairs) -> dict:
    """The protocol as written into ``report.json`` (``config``)."""
    return {"fmr_targets": list(FMR_TARGETS), "attack_fmrs": list(ATTACK_FMRS), "renew_fmr": RENEW_FMR,
            "keys": keys.describe(), "pairs": pairs.describe(), "pair_set": PAIR_SETS[pairs.source],
            "scenarios": SCENARIOS}

