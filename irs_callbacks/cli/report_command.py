"""``irs report``: render a monitor run (history, saved evaluation, galleries) as a self-contained HTML page."""

from __future__ import annotations

import argparse

from irs_callbacks.cli import value_range_arg


def register(subparsers) -> None:
    report = subparsers.add_parser(
        "report",
        help="HTML diversity report of a monitor run",
        description="Render IRS over training steps, N_learned curves, the hit histogram and the galleries of most "
                    "and never retrieved training images as one HTML file. RUN is the run folder (the history "
                    "irs_history.jsonl and the saved evaluation irs_last_evaluation.safetensors are found there "
                    "or in its logs/ or irs_logs/ subfolder) or the history file itself.",
    )
    report.add_argument("run", metavar="RUN", help="run folder (e.g. runs/digits) or its irs_history.jsonl")
    report.add_argument("--evaluation", default=None,
                        help="a saved evaluation (.safetensors; default: irs_last_evaluation.safetensors beside the history)")
    report.add_argument("--train-data", default=None,
                        help="training images (folder or .npy/.npz, in reference-bank order) to draw the galleries from "
                             "instead of those saved with the evaluation")
    report.add_argument("--value-range", type=value_range_arg, default=(0.0, 1.0), metavar="LOW,HIGH",
                        help="range of float --train-data arrays: 0,1 (default), -1,1, 0,255, ... "
                             "(uint8 is always 0..255, uint16 0..65535)")
    report.add_argument("--step", type=int, default=None, help="evaluation whose N_learned curve is drawn (default: last)")
    report.add_argument("--out", default="irs_report.html", help="output HTML file (default irs_report.html)")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from irs_callbacks.cli import check_output_file
    from irs_callbacks.report import render_report

    out = check_output_file(args.out, "--out", suffixes=(".html", ".htm"))
    path = render_report(args.run, out, evaluation=args.evaluation, train_data=args.train_data, step=args.step,
                         train_value_range=args.value_range)
    print(path)
    return 0
