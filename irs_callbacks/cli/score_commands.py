"""``irs reference build|info`` and ``irs score``: IRS of image folders/arrays from the command line.

Heavy imports (torch, timm) happen inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

from irs_callbacks.cli import value_range_arg

METRICS = ("irs", "fid", "kid", "prdc", "vendi")


def _add_extraction_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference-set", metavar="REAL", default=None,
                        help="held-out real images (not in TRAIN) for IRS_inf,real; default: the paper's split "
                             "of TRAIN (half of it queried against the other half)")
    parser.add_argument("--extractor", default=None,
                        help="feature extractor name (default: random-inception, or the one of a saved bank); "
                             "see `irs reference list`")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="local weights file (.pth/.pt/.safetensors) instead of downloading")
    parser.add_argument("--input-size", type=int, default=None, metavar="PX",
                        help="resize images to PX x PX for the extractor (default: its own, 299 for Inception)")
    parser.add_argument("--distance", choices=("euclidean", "cosine"), default=None,
                        help="retrieval distance (default: euclidean, or the one of a saved bank)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--value-range", type=value_range_arg, default=(0.0, 1.0), metavar="LOW,HIGH",
                        help="range of float images in .npy/.npz arrays: 0,1 (default), -1,1, 0,255, ... "
                             "(uint8 is always 0..255, uint16 0..65535); values outside it are an error")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split of TRAIN for IRS_inf,real (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    reference = subparsers.add_parser(
        "reference", help="build or inspect a reference bank (training features + real-data IRS)",
        description="Reference banks hold the training-set features and the real-data measurement IRS_inf,real.")
    commands = reference.add_subparsers(dest="reference_command", metavar="ACTION")
    build = commands.add_parser("build", help="extract training features and save a reference bank",
                                description="Extract features of TRAIN (image folder or .npy/.npz), measure "
                                            "IRS_inf,real and save everything to one .safetensors file.")
    build.add_argument("train", metavar="TRAIN", help="training images: a folder (png/jpg/jpeg/webp) or .npy/.npz")
    build.add_argument("--out", required=True, metavar="PATH", help="output file (.safetensors)")
    _add_extraction_args(build)
    build.set_defaults(handler=_build)
    info = commands.add_parser("info", help="print the metadata of a saved reference bank")
    info.add_argument("bank", metavar="PATH")
    info.set_defaults(handler=_info)
    listing = commands.add_parser("list", help="list the built-in feature extractors")
    listing.set_defaults(handler=_list)
    reference.set_defaults(handler=lambda args: _usage(reference))

    score = subparsers.add_parser(
        "score", help="IRS of generated images against the training set",
        description="Print IRS_alpha, IRS_inf with its interval, the adjusted score IRS_inf,a, N_learned, "
                    "the number of samples and of invalid (NaN/Inf) samples, and duplicate training features.")
    score.add_argument("train", metavar="TRAIN",
                       help="training images (folder or .npy/.npz) or a saved reference bank (.safetensors)")
    score.add_argument("samples", metavar="SAMPLES", help="generated images (folder or .npy/.npz)")
    _add_extraction_args(score)
    score.add_argument("--json", metavar="FILE", default=None, help="also write all results as JSON ('-' = stdout)")
    score.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="reuse/keep the reference bank of TRAIN here (keyed by image contents and extractor)")
    score.add_argument("--metrics", default="irs",
                       help=f"comma-separated metrics among {','.join(METRICS)} (default irs; others need "
                            "irs_callbacks.metrics)")
    score.add_argument("--target", type=float, default=None, metavar="T",
                       help="target diversity in (0, 1], relative to real data as everywhere else: print "
                            "'verdict: pass' or 'verdict: reject' by the rejection threshold k_min (Eq. 10) at the "
                            "samples' count; the exit status is 0 either way")
    score.add_argument("--alpha-e", type=float, default=0.05, help="error probability of --target (default 0.05)")
    score.set_defaults(handler=_score)


def _usage(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _list(args) -> int:
    from irs_callbacks.features import ALIASES, BUILTIN_SPECS, DEFAULT_EXTRACTOR, list_extractors

    aliases = {v: k for k, v in ALIASES.items()}
    for name in list_extractors():
        spec = BUILTIN_SPECS.get(name)
        weights = "random init" if spec and spec.random_init else (spec.url if spec and spec.url else "pretrained")
        extra = f"timm {spec.timm_name} ({weights}), {spec.input_size} px" if spec else "registered"
        default = "  (default)" if name == DEFAULT_EXTRACTOR else ""
        print(f"{name:18s} alias {aliases.get(name, '-'):9s} {extra}{default}")
    return 0


def _make_extractor(args, saved: dict | None = None):
    """Extractor from the command line, falling back on a saved bank's identity."""
    from irs_callbacks.features import DEFAULT_EXTRACTOR, WeightsUnavailableError, get_extractor

    saved = saved or {}
    name = args.extractor or saved.get("name") or DEFAULT_EXTRACTOR
    if str(name).startswith("custom:"):
        raise ValueError(f"the bank was built with a custom extractor ({name}); score it from Python with the same "
                         "module (ReferenceBank.score)")
    options = {}
    if args.input_size is not None:
        options["input_size"] = args.input_size
    elif saved.get("input_size") and (args.extractor is None or args.extractor == saved.get("name")):
        options["input_size"] = tuple(saved["input_size"])
    if args.weights is None and str(saved.get("weights", "")).startswith("random-init(") and name != "random-inception":
        options["pretrained"] = False
    if str(saved.get("weights", "")).startswith("file:") and args.weights is None:
        raise ValueError(f"the bank was built with local weights {saved['weights'][5:]!r}; pass --weights PATH")
    try:
        return get_extractor(name, weights=_path(args.weights, "--weights"), device=args.device, **options)
    except WeightsUnavailableError as error:
        raise ValueError(str(error)) from None


def _path(value, option: str):
    """A user path with ~ and $VARS expanded (None stays None)."""
    from irs_callbacks.files import expand_path

    return None if value is None else expand_path(value, option)


@contextmanager
def _value_range_fix_as_option(source=None):
    """A ValueRangeError raised inside becomes a ValueError ending with the fix as an option
    ('; here: --value-range 0,255'), prefixed with ``source`` when given."""
    from irs_callbacks.features import ValueRangeError

    try:
        yield
    except ValueRangeError as error:
        hint = f"; here: --value-range {error.suggested[0]:g},{error.suggested[1]:g}" if error.suggested else ""
        raise ValueError(f"{'' if source is None else f'{source}: '}{error}{hint}") from None


def _extract(extractor, data, args, value_range):
    """extract_features, with the command-line spelling of a value-range fix."""
    from irs_callbacks.features import extract_features

    with _value_range_fix_as_option(data):
        return extract_features(extractor, data, batch_size=args.batch_size, value_range=value_range,
                                progress=not args.no_progress)


def _check_common(args) -> None:
    """Cheap checks before any expensive work: numbers, device, paths."""
    from irs_callbacks.cli import check_device
    from irs_callbacks.validation import check_int

    args.batch_size = check_int(args.batch_size, "--batch-size", 1)
    if args.input_size is not None:
        args.input_size = check_int(args.input_size, "--input-size", 1)
    check_device(args.device)
    args.train = _path(args.train, "TRAIN")
    args.reference_set = _path(args.reference_set, "--reference-set")


def _build(args) -> int:
    from irs_callbacks.cli import check_output_file
    from irs_callbacks.reference import ReferenceBank

    _check_common(args)
    out = check_output_file(args.out, "--out", suffixes=(".safetensors",))
    started = time.perf_counter()
    extractor = _make_extractor(args)
    with _value_range_fix_as_option():
        bank = ReferenceBank.build(args.train, extractor=extractor, reference=args.reference_set,
                                   distance=args.distance or "euclidean", batch_size=args.batch_size,
                                   device=args.device, seed=args.seed, value_range=args.value_range,
                                   progress=not args.no_progress)
    path = bank.save(out)
    print(f"saved {path}: {_bank_line(bank)} ({time.perf_counter() - started:.1f} s)")
    return 0


def _bank_line(bank) -> str:
    meta, real = bank.metadata, bank.real
    how = meta.get("real_measurement") or {}
    real_text = "none" if real is None else f"{real} ({_real_how(how)})"
    return (f"N = {bank.n_train}, d = {bank.dim}, extractor {bank.extractor_identity.get('name')} "
            f"{_size_text(bank.extractor_identity)}, {bank.distance}, duplicate training features "
            f"{bank.duplicate_count}, IRS_inf,real {real_text}")


def _size_text(identity) -> str:
    size = identity.get("input_size")
    return f"@ {size[0]}x{size[1]}" if size else ""


def _real_how(how: dict) -> str:
    if how.get("method") == "split":
        return f"split of TRAIN: {how['n_queries']} queries vs {how['n_bank']}, seed {how['seed']}"
    return f"held-out reference set, {how.get('n_queries')} images"


def _info(args) -> int:
    from irs_callbacks.reference import ReferenceBank

    print(json.dumps(ReferenceBank.read_metadata(_path(args.bank, "PATH")), indent=2))
    return 0


def _parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics takes a comma-separated list of {', '.join(METRICS)}; got {text!r}")
    return list(dict.fromkeys(names))


def _score(args) -> int:
    import torch

    from irs_callbacks.cli import check_output_file
    from irs_callbacks.image_io import iter_image_batches
    from irs_callbacks.reference import ReferenceBank
    from irs_callbacks.validation import check_fraction, check_probability

    _check_common(args)
    args.samples = _path(args.samples, "SAMPLES")
    metrics = _parse_metrics(args.metrics)
    if args.target is not None:
        args.target = check_fraction(args.target, "--target")
    args.alpha_e = check_probability(args.alpha_e, "--alpha-e")
    json_out = check_output_file(args.json, "--json") if args.json not in (None, "-") else None
    # fail early on a missing/empty SAMPLES, before the expensive TRAIN; an array is read once, later
    if args.samples.suffix.lower() in (".npy", ".npz") and not args.samples.is_dir():
        if not args.samples.is_file():
            raise ValueError(f"SAMPLES: array file {str(args.samples)!r} does not exist")
    else:
        iter_image_batches(args.samples)  # lists a folder's images without reading them
    timings, started = {}, time.perf_counter()
    value_range = args.value_range
    if args.train.suffix == ".safetensors" and args.train.is_file():
        if args.reference_set is not None:
            raise ValueError("--reference-set cannot change a saved reference bank; rebuild it with "
                             "`irs reference build TRAIN --reference-set REAL --out PATH`")
        saved = ReferenceBank.read_metadata(args.train)
        extractor = _make_extractor(args, saved.get("extractor"))
        expect = {"extractor": extractor.identity}
        if args.distance is not None:
            expect["distance"] = args.distance
        bank = ReferenceBank.load(args.train, expect=expect)
    else:
        extractor = _make_extractor(args)
        with _value_range_fix_as_option():
            bank = ReferenceBank.build(args.train, extractor=extractor, reference=args.reference_set,
                                       distance=args.distance or "euclidean", batch_size=args.batch_size,
                                       device=args.device, cache_dir=_path(args.cache_dir, "--cache-dir"),
                                       seed=args.seed, value_range=value_range, progress=not args.no_progress)
    timings["reference_s"] = round(time.perf_counter() - started, 3)

    t = time.perf_counter()
    sample_features = _extract(extractor, args.samples, args, value_range)
    timings["samples_s"] = round(time.perf_counter() - t, 3)
    if sample_features.shape[1] != bank.dim:
        raise ValueError(f"sample features have dimension {sample_features.shape[1]}, the bank {bank.dim}")
    result = bank.score(sample_features, device=args.device or extractor.device, alpha_e=args.alpha_e)
    verdict = _verdict(result, args.target, args.alpha_e) if args.target is not None else None

    extra = {}
    others = [m for m in metrics if m != "irs"]
    if others:
        from irs_callbacks.metrics import compute_metrics

        finite = sample_features[torch.isfinite(sample_features).all(dim=1)]
        if len(finite) < 4:
            raise ValueError("fewer than 4 valid (finite) samples: cannot compute " + ", ".join(others))
        extra = compute_metrics(bank.features, finite, metrics=tuple(others), k=5)
    timings["total_s"] = round(time.perf_counter() - started, 3)

    _print_score(result, bank, extra, timings, verdict)
    if args.json:
        payload = {
            **result.as_dict(), "metrics": {k: _plain(v) for k, v in extra.items()}, "extractor": bank.extractor_identity,
            "distance": bank.distance, "train": str(args.train), "samples": str(args.samples),
            "real_measurement": bank.metadata.get("real_measurement"), "timings": timings, "target": verdict,
        }
        text = json.dumps(payload, indent=2)
        if json_out is None:
            print(text)
        else:
            from irs_callbacks.files import write_text_atomic

            write_text_atomic(json_out, text + "\n")
    return 0


def _verdict(result, target: float, alpha_e: float) -> dict:
    """Eq. 10 at the samples' count: reject iff N_learned <= k_min, with the target on the real
    data's scale (s_d = target * IRS_inf,real * N) when the bank has a real measurement, taken at
    the alpha the adjusted score uses."""
    from irs_callbacks.stats import rejection_threshold

    real_irs = result.real.estimate if result.real is not None else None
    k_min = rejection_threshold(result.n_train, target, result.n_samples, alpha_e, real_irs=real_irs)
    return {"verdict": "pass" if result.n_learned > k_min else "reject", "target": target, "k_min": int(k_min),
            "n_samples": result.n_samples, "n_learned": result.n_learned, "alpha_e": alpha_e, "real_irs": real_irs,
            "scale": "relative to real data" if real_irs is not None else "absolute (no real-data measurement)"}


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value if isinstance(value, (str, int, list, dict, type(None))) else str(value)


def _print_score(result, bank, extra: dict, timings: dict, verdict: dict | None = None) -> None:
    ident = bank.extractor_identity
    print(f"IRS of {result.n_samples} samples against N_train = {result.n_train} training images "
          f"(extractor {ident.get('name')} {_size_text(ident)}, {bank.distance} distance)")
    rows = [
        ("n_samples", f"{result.n_samples}  (alpha = n/N = {result.alpha:.4g})"),
        ("invalid samples", f"{result.n_invalid}  (NaN/Inf; counted in n_samples, never learned)"),
        ("N_learned", f"{result.n_learned}"),
        ("IRS_alpha", f"{result.irs_alpha:.2%}"),
        ("IRS_inf", "n/a (nothing learned)" if result.irs_inf is None else
         f"{result.irs_inf}  (ML estimate [lower, upper], one-sided alpha_e = {result.irs_inf.alpha_e:g} each)"),
    ]
    how = bank.metadata.get("real_measurement") or {}
    if result.real is not None:
        rows.append(("IRS_inf,real", f"{result.real}  ({_real_how(how)}; {result.real.n_samples} queries "
                                     f"against {result.real.n_train} images)"))
        if result.alpha_matching == "samples-subsampled":
            rows.append(("IRS_inf at real alpha", f"{result.synthetic_matched}  ({result.synthetic_matched.n_samples} "
                                                  "of the samples, exact mean over subsets)"))
        rows.append(("IRS_inf,a", f"{result.adjusted:.2%}  (= IRS_inf / IRS_inf,real at one alpha; may exceed 100%)"))
        rows.append(("compared at", result.matching_text))
    else:
        rows.append(("IRS_inf,a", "n/a (no real-data measurement in this bank)"))
    rows.append(("duplicate train features", f"{result.duplicate_count}  (exact duplicates; they cap N_learned)"))
    for key, value in extra.items():
        rows.append((key, f"{value:.6g}" if isinstance(value, (int, float)) else str(value)))
    if verdict is not None:
        relation = ">" if verdict["verdict"] == "pass" else "<="
        rows.append(("verdict", f"{verdict['verdict']}  (N_learned {verdict['n_learned']} {relation} k_min "
                                f"{verdict['k_min']}: target {verdict['target']:g} {verdict['scale']}, "
                                f"n = {verdict['n_samples']}, alpha_e = {verdict['alpha_e']:g}, Eq. 10)"))
    rows.append(("time", f"reference {timings['reference_s']:.1f} s, samples {timings['samples_s']:.1f} s, "
                         f"total {timings['total_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
