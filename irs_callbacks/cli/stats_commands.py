"""``irs threshold`` and ``irs estimate``: the statistics of IRS from counts alone (no images)."""

from __future__ import annotations

import argparse
import json

from irs_callbacks.cli import python_names_as_options

#: the Python names of the statistics' arguments -> the options of these commands
_THRESHOLD_OPTIONS = {"n_train": "--n-train", "target_irs": "--target", "n_samples": "--n-samples",
                      "budget": "--n-samples", "alpha_e": "--alpha", "real_irs": "--real-irs",
                      "interim_alpha": "--interim-alpha", "pass_alpha": "--pass-alpha"}
_ESTIMATE_OPTIONS = {"n_train": "--n-train", "n_samples": "--n-samples", "n_learned": "--n-learned",
                     "alpha_e": "--alpha"}
_REAL_ESTIMATE_OPTIONS = {**_ESTIMATE_OPTIONS, "n_samples": "--real-n-samples", "n_learned": "--real-n-learned"}


def register(subparsers) -> None:
    threshold = subparsers.add_parser(
        "threshold",
        help="rejection threshold k_min (Eq. 10) for a sample budget",
        description="Print k_min: a checkpoint is rejected iff N_learned <= k_min (Eq. 10). With --schedule, print "
        "the sequential test's thresholds at every look of that batch schedule instead.",
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
    threshold.add_argument(
        "--schedule",
        metavar="BATCH",
        type=int,
        default=None,
        help="batch size: print the sequential test's reject (and early-pass) thresholds after every batch",
    )
    threshold.add_argument(
        "--interim-alpha",
        type=float,
        default=None,
        help="with --schedule: error spent on early rejections before the budget (default alpha / 5)",
    )
    threshold.add_argument(
        "--pass-alpha",
        type=float,
        default=None,
        help="with --schedule: error of the optional early pass (default: no early pass)",
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

    if args.schedule is not None:
        return _schedule(args)
    if args.interim_alpha is not None or args.pass_alpha is not None:
        raise ValueError("--interim-alpha and --pass-alpha need --schedule BATCH")
    with python_names_as_options(**_THRESHOLD_OPTIONS):
        k_min = rejection_threshold(args.n_train, args.target, args.n_samples, args.alpha, real_irs=args.real_irs)
    if args.json:
        keys = ("n_train", "target", "n_samples", "alpha", "real_irs")
        print(json.dumps({"k_min": k_min, **{key: getattr(args, key) for key in keys}}))
    else:
        print(k_min)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    """Thresholds of :class:`~irs_callbacks.stats.SequentialRejectionTest` after every batch."""
    from irs_callbacks.stats import SequentialRejectionTest
    from irs_callbacks.validation import check_int

    batch = check_int(args.schedule, "--schedule", 1)
    with python_names_as_options(**_THRESHOLD_OPTIONS):
        test = SequentialRejectionTest(
            args.n_train,
            args.target,
            args.n_samples,
            args.alpha,
            real_irs=args.real_irs,
            interim_alpha=args.interim_alpha,
            pass_alpha=args.pass_alpha,
        )
    looks = []
    for m in [*range(batch, test.budget, batch), test.budget]:
        reject = test.reject_threshold(m)
        rule = test.decide(m, reject).rule if reject >= 0 else None  # the rule that rejects at the threshold
        early_pass = test.pass_threshold(m)
        looks.append(
            {
                "n_drawn": m,
                "reject_at_most": reject,
                "min_repeats": m - reject if reject >= 0 else None,
                "rule": rule,
                "pass_at_least": early_pass if early_pass is not None and early_pass <= min(m, test.k_final) else None,
            }
        )
    if args.json:
        config = {key: getattr(args, key) for key in ("n_train", "target", "n_samples", "alpha", "real_irs")}
        print(
            json.dumps(
                {
                    **config,
                    "batch": batch,
                    "s_d": test.s_d,
                    "interim_alpha": test.interim_alpha,
                    "pass_alpha": test.pass_alpha,
                    "k_min": test.k_min,
                    "k_final": test.k_final,
                    "rejection_error": test.rejection_error,
                    "pass_error": test.pass_error,
                    "looks": looks,
                }
            )
        )
        return 0
    print(
        f"s_d = {test.s_d:,.1f} images; k_min (Eq. 10, alpha_e = {test.alpha_e:g}) = {test.k_min:,}; final threshold with "
        f"the error left = {test.k_final:,}"
    )
    print(
        f"P(reject | s_d) <= {test.rejection_error:.4f} for any schedule (interim_alpha = {test.interim_alpha:g})"
        + ("" if test.pass_alpha is None else f"; P(early pass | s_d) <= {test.pass_error:.4f}")
    )
    show_pass = test.pass_alpha is not None
    header = f"{'samples':>9}  {'reject if N_learned <=':>22}  {'(repeats >=)':>12}  {'rule':<13}"
    print((header + ("  early pass if N_learned >=" if show_pass else "")).rstrip())
    for look in looks:
        reject = "-" if look["rule"] is None else f"{look['reject_at_most']:,}"
        repeats = "" if look["rule"] is None else f"({look['min_repeats']:,})"
        line = f"{look['n_drawn']:>9,}  {reject:>22}  {repeats:>12}  {look['rule'] or '-':<13}"
        if show_pass:
            line += f"  {'-' if look['pass_at_least'] is None else format(look['pass_at_least'], ','):>27}"
        print(line.rstrip())
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from irs_callbacks.stats import adjusted_irs, irs_infinity

    if (args.real_n_samples is None) != (args.real_n_learned is None):
        raise ValueError("--real-n-samples and --real-n-learned must be given together")
    with python_names_as_options(**_ESTIMATE_OPTIONS):
        synthetic = irs_infinity(args.n_learned, args.n_samples, args.n_train, args.alpha)
    real = None
    if args.real_n_samples is not None:
        with python_names_as_options(**_REAL_ESTIMATE_OPTIONS):
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
