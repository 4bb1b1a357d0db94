"""``veilface eval``: accuracy, privacy and speed of protection schemes, with a report.

Registration is cheap: numpy, matplotlib and the evaluation code are imported by the handler.
Operator mistakes (unknown scheme, unwritable ``--out``, missing labels...) are found before
any work and reported in one line on stderr with a non-zero exit (``engine.cli``).
"""
from __future__ import annotations

import argparse
import sys

_DEFAULT_SCHEMES = ["biohash:bits=256,512", "iom:m=256,q=16", "rotation", "he"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate schemes: accuracy, unlinkability, irreversibility, renewability, speed",
        description="Evaluate protection schemes (ISO/IEC 19795-1 accuracy; ISO/IEC 24745/30136 "
                    "unlinkability, irreversibility, renewability; speed and size) and write "
                    "report.json, report.md, scores.npz and PNG plots. Without --data a built-in synthetic "
                    "dataset is used (the report says so).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", metavar="PATH", default=None,
                   help="embeddings .npz ('embeddings' (n,d) + 'labels' (n,); 'veilface embed' output works); "
                        "a folder with one photo sub-folder per person; or an LFW-style pairs.txt (only the "
                        "listed pairs are compared; 10-fold accuracy when it has folds). Default: synthetic data")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="labels for an embeddings .npz: lines 'PHOTO_PATH<TAB>LABEL' (matched through the "
                        "file's 'paths') or one LABEL per line in row order; overrides the file's own labels")
    p.add_argument("--images-root", metavar="DIR", default=None,
                   help="image folder for a pairs.txt (default: the pairs file's folder)")
    p.add_argument("--schemes", nargs="+", metavar="SPEC", default=_DEFAULT_SCHEMES,
                   help="factory strings; 'biohash:bits=256,512' sweeps bits; several multi-valued "
                        "parameters give their cartesian product")
    p.add_argument("--out", metavar="DIR", default="eval-out", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, keys, sampling and attacks")
    p.add_argument("--subjects", type=int, default=200, help="synthetic: number of subjects")
    p.add_argument("--samples", type=int, default=5, help="synthetic: samples per subject")
    p.add_argument("--dim", type=int, default=128, help="synthetic: embedding dimension")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (smoke test)")
    p.add_argument("--max-impostor", type=int, default=None,
                   help="cap on impostor pairs, a random subset (default 1000000)")
    p.add_argument("--attack-templates", type=int, default=None, help="templates attacked per scheme (default 200)")
    p.add_argument("--gallery", type=int, default=None, dest="n_gallery",
                   help="1:N speed test gallery size (default 10000)")
    p.add_argument("--he-probes", type=int, default=None,
                   help="encrypted probes scored for an 'he' scheme's accuracy (default 100)")
    p.add_argument("--attack-subjects", type=int, default=None,
                   help="victims per protocol attack against the running services (default 50; quick 20)")
    p.add_argument("--no-protocol-attacks", action="store_true",
                   help="skip the protocol attacks (key service + matcher on loopback)")
    p.add_argument("--same-key", action="store_true",
                   help="give every subject the same key (a broken deployment, for comparison)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, periodic lines otherwise)")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from .._optional import require_extra
    require_extra("eval", feature="veilface eval")  # before minutes of work, not at the plots
    from .runner import evaluate

    options = {k: getattr(args, k) for k in ("max_impostor", "attack_templates", "n_gallery", "he_probes",
                                             "attack_subjects")
               if getattr(args, k) is not None}
    options["protocol_attacks"] = not args.no_protocol_attacks
    report = evaluate(args.data, args.schemes, out=args.out, seed=args.seed, subjects=args.subjects,
                      samples=args.samples, dim=args.dim, images_root=args.images_root, labels=args.labels,
                      quick=args.quick, progress=False if args.no_progress else None, plots=not args.no_plots,
                      same_key=args.same_key, **options)
    if report.dataset.get("synthetic"):
        print("NOTE: synthetic data (no --data given): compare schemes with each other, not with a real model.")
    print(report.summary_table())
    skipped = [r for r in report.records if r["status"] != "ok"]
    for r in skipped:
        print(f"veilface: note: {r['label']} skipped: {r.get('reason')}", file=sys.stderr)
    print(f"\nwrote {', '.join(report.files)} in {report.seconds:.1f} s", file=sys.stderr)
    return 0
