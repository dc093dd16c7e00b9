"""The ``irs`` command-line tool.

Each command module registers its sub-commands with ``register(subparsers)`` and must import
nothing heavy at module level (argparse only): ``irs threshold`` has to start in well under a
second, so torch, timm and friends are imported inside the command handlers.

Exit status: 0 when the command did its work, whatever it found (``irs score --target`` prints
``verdict: pass`` or ``verdict: reject`` and exits 0 either way: a rejected model is a result,
not a failure); 2 for bad input or usage (a missing or unreadable file, a wrong dtype or value
range, an unwritable ``--out``, ``--device cuda`` without a GPU, a missing optional package, no
network for pretrained weights), with one line ``irs COMMAND: error: ...`` on stderr and no
traceback; 130 when interrupted; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager
from importlib import import_module

from irs_callbacks import __version__

# Sub-command modules of this package, in the order their commands appear in --help.
_COMMAND_MODULES = ("stats_commands", "score_commands", "report_command")

#: optional packages -> the extra (or package) that provides them, for one-line install hints
_EXTRAS = {"matplotlib": "irs-callbacks[report]", "faiss": "irs-callbacks[faiss-cpu]",
           "lightning": "irs-callbacks[lightning]", "sklearn": "scikit-learn", "tensorboard": "tensorboard"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irs",
        description="Image Retrieval Score (IRS): how much of its training set a generative model can produce.",
        epilog="Exit status: 0 success (also for a 'reject' verdict), 2 bad input or usage, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        import_module(f"{__name__}.{name}").register(subparsers)
    return parser


@contextmanager
def python_names_as_options(**options: str):
    """Re-spell the ValueErrors raised inside for the command line: each Python argument name given
    (``alpha_e="--alpha"``) becomes its option, so ``--alpha 0`` reports "--alpha must be ...", not
    "alpha_e must be ..."."""
    try:
        yield
    except ValueError as error:
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, options)) + r")(?!\w)")
        raise ValueError(pattern.sub(lambda match: options[match.group(1)], str(error))) from None


def value_range_arg(text: str) -> tuple[float, float]:
    """argparse ``type`` of every ``--value-range``: 'LOW,HIGH' (0,1 or -1,1 or 0,255 ...), the rule of
    :func:`irs_callbacks.validation.check_value_range` (finite, LOW < HIGH) spelled for the command line."""
    from irs_callbacks.validation import check_value_range

    try:
        return check_value_range(text.split(","), "--value-range")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with finite LOW < HIGH, such as 0,1 or -1,1 or 0,255; "
                                         f"got {text!r}") from None


def check_output_file(path, option: str, suffixes: tuple[str, ...] = ()):
    """``path`` (expanded) if a file can be written there: not a folder, its folder writable (or
    creatable); else a ValueError naming ``option``. Checked before any expensive work."""
    from irs_callbacks.files import expand_path

    out = expand_path(path, option)
    if out.is_dir():
        raise ValueError(f"{option} {str(out)!r} is a folder; give a file name inside it, e.g. "
                         f"{str(out / ('result' + (suffixes[0] if suffixes else '')))!r}")
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"{option} must end in {' or '.join(suffixes)}, got {str(out)!r}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders that would be created start here
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(out)!r} cannot be written: {str(parent)!r} is not a writable folder")
    return out  # an existing file is replaced through its (writable) folder: files are written atomically


def check_device(device) -> None:
    """A one-line error for a device that does not exist here (``--device cuda`` without a GPU)."""
    if device is None:
        return
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asks for a CUDA GPU, but none is available here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


#: options whose value may start with a minus sign (--value-range -1,1); argparse reads "-1,1" as an option
#: (only plain negative numbers are exempt), so main passes such a value as --value-range=-1,1
_SIGNED_VALUE_OPTIONS = ("--value-range",)
_SIGNED_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_signed_values(argv: list[str]) -> list[str]:
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return out + [arg] + rest
        if arg in _SIGNED_VALUE_OPTIONS and rest and _SIGNED_VALUE.match(rest[0]):
            arg = f"{arg}={rest.pop(0)}"
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_signed_values(sys.argv[1:] if argv is None else argv))
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    name = f"irs {args.command}"
    try:
        return int(args.handler(args) or 0)
    except ValueError as error:  # bad input: a clear message, no traceback
        parser.exit(2, f"{name}: error: {_one_line(error)}\n")
    except ModuleNotFoundError as error:  # an optional package is missing
        package = (error.name or "").split(".")[0]
        hint = _EXTRAS.get(package, package)
        parser.exit(2, f"{name}: error: this needs the optional package {package!r}: pip install '{hint}'\n")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as error:
        target = f" {error.filename!r}" if getattr(error, "filename", None) else ""
        parser.exit(2, f"{name}: error: {error.strerror or error}{target}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{name}: interrupted\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
