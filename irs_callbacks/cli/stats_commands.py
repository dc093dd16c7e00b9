"""``irs threshold`` and ``irs estimate``: the statistics of IRS from counts alone (no images)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    threshold = subparsers.add_parser(
        "threshold",
        help="rejection threshold k_min (Eq. 10) for a sample budget",
        description="Print k_min: a checkpoint is rejected iff N_learned <= k_min (Eq. 10).",
    )
    threshold.add_argument("--n-train", type=int, required=True, help="training images N")
    threshold.add_argument("--target", "--target-irs", dest="target", type=float, required=True, help="target diversity IRS_d in (0, 1]")
    threshold.add_argument("--n-samples", type=int, required=True, help="sample budget n")
    threshold.add_argument("--alpha", "--alpha-e", dest="alpha", type=float, default=0.05, help="error probability alpha_e (default 0.05)")
    threshold.add_argument(
        "--real-irs",
        type=float,
        default=None,
        help="IRS_inf of held-out real data: puts the target on the adjusted scale (s_d = target * real * N)",
    )
    threshold.add_argument("--json", action="store_true", help="print a JSON object instead of the number")
    threshold.set_defaults(handler=_threshold)

    estimate = subparsers.add_parser(
        "estimate",
        help="IRS_inf with its confidence interval from N_learned (Eqs. 7-9)",
        description="Print IRS_alpha, IRS_inf with its interval, and the adjusted score when the real pair is given.",
    )
    estimate.add_argument("--n-train", type=int, required=True, help="training images N")
    estimate.add_argument("--n-samples", type=int, required=True, help="synthetic samples n")
    estimate.add_argument("--n-learned", type=int, required=True, help="distinct training images retrieved k")
    estimate.add_argument("--alpha", "--alpha-e", dest="alpha", type=float, default=0.05, help="one-sided error of each bound (default 0.05)")
    estimate.add_argument("--real-n-samples", type=int, default=None, help="held-out real images queried")
    estimate.add_argument("--real-n-learned", type=int, default=None, help="distinct training images they retrieved")
    estimate.add_argument("--json", action="store_true", help="print a JSON object")
    estimate.set_defaults(handler=_estimate)


def _threshold(args: argparse.Namespace) -> int:
    from irs_callbacks.stats import rejection_threshold

    k_min = rejection_threshold(args.n_train, args.target, args.n_samples, args.alpha, real_irs=args.real_irs)
    if args.json:
        keys = ("n_train", "target", "n_samples", "alpha", "real_irs")
        print(json.dumps({"k_min": k_min, **{key: getattr(args, key) for key in keys}}))
    else:
        print(k_min)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from irs_callbacks.stats import adjusted_irs, irs_infinity

    if (args.real_n_samples is None) != (args.real_n_learned is None):
        raise ValueError("--real-n-samples and --real-n-learned must be given together")
    synthetic = irs_infinity(args.n_learned, args.n_samples, args.n_train, args.alpha)
    real = None
    if args.real_n_samples is not None:
        real = irs_infinity(args.real_n_learned, args.real_n_samples, args.n_train, args.alpha)
    adjusted = None if real is None else adjusted_irs(synthetic, real)

    if args.json:
        out = {"synthetic": synthetic.as_dict(), "real": real and real.as_dict(), "adjusted": adjusted}
        print(json.dumps(out))
        return 0
    print(
        f"IRS_alpha       {synthetic.irs_alpha:8.2%}   ({synthetic.n_learned} of {synthetic.n_train} training"
        f" images retrieved by {synthetic.n_samples} samples)"
    )
    print(f"IRS_inf         {synthetic}   (bounds one-sided at alpha_e = {synthetic.alpha_e:g})")
    if real is not None:
        print(f"IRS_inf (real)  {real}   ({real.n_learned} retrieved by {real.n_samples} real images)")
        print(f"IRS_inf,a       {adjusted:8.2%}")
    return 0
