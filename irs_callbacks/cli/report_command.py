"""``irs report``: render a monitor history (and a saved evaluation) as a self-contained HTML page."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    report = subparsers.add_parser(
        "report",
        help="HTML diversity report from a monitor history file",
        description="Render IRS over training steps, N_learned curves, hit histograms and image grids as one HTML file.",
    )
    report.add_argument("history", help="the monitor's JSON-lines history file")
    report.add_argument("--evaluation", default=None, help="a saved evaluation (.safetensors with per-image hits)")
    report.add_argument("--train-data", default=None, help="training images (folder or .npy/.npz) for the grids")
    report.add_argument("--step", type=int, default=None, help="evaluation whose N_learned curve is drawn (default: last)")
    report.add_argument("--out", default="irs_report.html", help="output HTML file (default irs_report.html)")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from irs_callbacks.report import render_report

    path = render_report(args.history, args.out, evaluation=args.evaluation, train_data=args.train_data, step=args.step)
    print(path)
    return 0
