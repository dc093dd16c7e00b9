"""``irs report``: a self-contained HTML page (PNG figures inlined) from a monitor run.

Input: a run folder (or its history file). In the folder (or its ``logs/`` or ``irs_logs/``
subfolder, where the README's example and the monitor's default put them) the report finds the
history ``irs_history.jsonl`` and the latest saved evaluation ``irs_last_evaluation.safetensors``
(:func:`irs_callbacks.tracking.save_evaluation`), which carries the per-training-image hit counts
and the training-image galleries the monitor recorded, so no training data is needed.

Figures: IRS_inf (adjusted when a real-data measurement exists) over training steps with its
confidence band and the target; N_learned against samples drawn for one evaluation with the
ideal curve (Eq. 2) and k_min; and, from the saved evaluation, the histogram of hits per
training image against the uniform expectation (the detailed-balance paper's Fig. 3b) and the
galleries: the most retrieved training images and a seeded random sample of the never retrieved
ones (:func:`~irs_callbacks.tracking.never_retrieved_sample`), each captioned with what it is and
how many there are. ``train_data`` (CLI ``--train-data``) re-draws the galleries from the
training images instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from irs_callbacks.files import expand_path, write_text_atomic
from irs_callbacks.history import HISTORY_NAME, read_history
from irs_callbacks.tracking import (LAST_EVALUATION_NAME, MOST_RETRIEVED, NEVER_RETRIEVED, curve_figure,
                                    load_evaluation, select_galleries)

__all__ = ["render_report", "find_run_files", "RUN_SUBFOLDERS"]

RUN_SUBFOLDERS = (".", "logs", "irs_logs")  # where a run keeps them (README example: logs/)


def find_run_files(run) -> tuple[Path, Path | None]:
    """(history file, saved evaluation or None) of a run folder, or of a history file given directly
    (its evaluation is the ``irs_last_evaluation.safetensors`` beside it, when there is one)."""
    path = expand_path(run, "run")
    if path.is_file():
        evaluation = path.with_name(LAST_EVALUATION_NAME)
        return path, evaluation if evaluation.is_file() else None
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist (expected a run folder or a history file {HISTORY_NAME})")
    for sub in RUN_SUBFOLDERS:
        history = path / sub / HISTORY_NAME
        if history.is_file():
            evaluation = history.with_name(LAST_EVALUATION_NAME)
            return history, evaluation if evaluation.is_file() else None
    looked = ", ".join(str(path / sub / HISTORY_NAME) for sub in RUN_SUBFOLDERS)
    raise ValueError(f"no monitor history in {str(path)!r} (looked for {looked}); pass the history file itself")


# ----------------------------------------------------------------------------- figures


def _png(fig) -> str:
    """Figure -> base64 PNG string."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width=6.4, height=3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def diversity_over_steps_figure(records: list[dict]):
    """IRS_inf (adjusted when a real reference exists) per step, its band, the target, verdicts."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    adjusted = all(r.get("adjusted") is not None for r in records)
    key, lo_key, hi_key = ("adjusted", "adjusted_lower", "adjusted_upper") if adjusted else ("estimate", "lower", "upper")
    rows = [r for r in records if r.get(key) is not None]
    if rows:
        steps = np.array([r["step"] for r in rows], dtype=float)
        value = np.array([r[key] for r in rows])
        lower = np.array([r.get(lo_key, r[key]) for r in rows])
        upper = np.array([r.get(hi_key, r[key]) for r in rows])
        ax.fill_between(steps, lower, upper, color="tab:blue", alpha=0.2, label="confidence band")
        ax.plot(steps, value, "o-", color="tab:blue", ms=4, label="IRS_inf,a" if adjusted else "IRS_inf")
        rejected = np.array([r["verdict"] == "reject" for r in rows])
        if rejected.any():
            ax.plot(steps[rejected], value[rejected], "x", color="tab:red", ms=9, mew=2, label="rejected")
    last = records[-1]
    target = last.get("target_irs") if adjusted else (
        last["target_s"] / last["n_train"] if last.get("target_s") is not None else last.get("target_irs"))
    if target is not None:
        ax.axhline(target, color="tab:green", ls="--", label=f"target {target:.2f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("IRS_inf,a (adjusted)" if adjusted else "IRS_inf (fraction of N_train)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def hits_histogram_figure(hits: np.ndarray, n_samples: int):
    """How many training images were retrieved h times, against Binomial(n, 1/N) (uniform model)."""
    from scipy.stats import binom

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    n_train = len(hits)
    counts = np.bincount(hits)
    h = np.arange(len(counts))
    ax.bar(h, counts, width=0.8, color="tab:blue", alpha=0.7, label="training images")
    expected = n_train * binom.pmf(h, n_samples, 1.0 / n_train)
    ax.plot(h, expected, "o--", color="tab:green", ms=3, label="uniform sampler (expected)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("samples retrieving the training image (hits)")
    ax.set_ylabel("training images")
    ax.set_title(f"{int((hits == 0).sum())} of {n_train} training images never retrieved")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def image_grid_figure(images: np.ndarray, captions: list[str], title: str, columns: int = 8):
    """Images (N, H, W, C) in [0, 1] with a caption under each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig = _figure(1.1 * columns, 1.25 * rows + 0.4)
    fig.suptitle(title, fontsize=10)
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    return fig


def _train_data_loader(train_data, value_range=(0, 1)):
    """rows -> float images [k, C, H, W] in [0, 1] of a training folder or .npy/.npz array (the
    reference bank's order: sorted file paths of a folder, rows of an array); images of unequal
    size are resized to the first one's size for the grid."""
    import torch
    import torch.nn.functional as F

    from irs_callbacks.features import to_unit_range
    from irs_callbacks.image_io import ImageFolderDataset, load_array

    path = expand_path(train_data, "train_data")
    if path.is_dir():
        dataset = ImageFolderDataset(path)
        get = lambda row: dataset[int(row)][None]  # noqa: E731
        count = len(dataset)
    else:
        array = load_array(path)  # NCHW tensor
        get = lambda row: array[int(row)][None]  # noqa: E731
        count = len(array)

    def load(rows):
        if len(rows) and int(np.max(rows)) >= count:
            raise ValueError(f"train data {str(path)!r} has {count} images, the evaluation refers to row "
                             f"{int(np.max(rows))}: is it the training set of this run?")
        images = [to_unit_range(get(row), value_range) for row in rows]
        size = images[0].shape[-2:] if images else None
        images = [x if x.shape[-2:] == size else F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True)
                  for x in images]
        channels = max((x.shape[1] for x in images), default=1)
        return torch.cat([x.expand(-1, channels, -1, -1) for x in images]).numpy() if images else np.zeros((0, 1, 1, 1))

    return load


# ----------------------------------------------------------------------------- page


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.reject{color:#b00;font-weight:600}.pass{color:#070}img{max-width:100%}
.note{color:#666;font-size:13px}
"""


def _percent(value) -> str:
    return "&ndash;" if value is None else f"{100 * value:.2f}%"


def _table(records: list[dict]) -> str:
    head = "<tr><th>step</th><th>verdict</th><th>rule</th><th>samples</th><th>N_learned</th><th>k_min</th>"
    head += "<th>IRS_inf [bounds]</th><th>IRS_inf,a</th><th>invalid</th></tr>"
    rows = []
    for r in records:
        interval = f"{_percent(r.get('estimate'))} [{_percent(r.get('lower'))}, {_percent(r.get('upper'))}]"
        rows.append(
            f"<tr><td>{r['step']}</td><td class='{html.escape(r['verdict'])}'>{html.escape(r['verdict'])}</td>"
            f"<td>{html.escape(str(r.get('rule')))}</td><td>{r['samples_used']} / {r.get('budget', '')}</td>"
            f"<td>{r['n_learned']}</td><td>{r['k_min']}</td><td>{interval}</td><td>{_percent(r.get('adjusted'))}</td>"
            f"<td>{r.get('n_invalid', 0)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


_GALLERY_TITLES = {MOST_RETRIEVED: "Most retrieved training images", NEVER_RETRIEVED: "Never retrieved training images"}


def _gallery_section(name: str, gallery, hits: np.ndarray) -> str:
    title = _GALLERY_TITLES.get(name, name.replace("_", " ").capitalize())
    images = gallery.images.transpose(0, 2, 3, 1).astype(np.float64) / 255.0
    captions = [f"#{row}: {hits[row]}" if row < len(hits) else f"#{row}" for row in gallery.rows]
    fig = image_grid_figure(images, captions, f"{title} (row: hits)")
    return (f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(gallery.caption)}</p>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{_png(fig)}'>")


def render_report(history, out="irs_report.html", *, evaluation=None, train_data=None, step=None, top: int = 16,
                  seed: int = 0, train_value_range=(0, 1)) -> Path:
    """Write the HTML report and return its path.

    history: a run folder (the history and the saved evaluation are found there or in its
    ``logs/`` / ``irs_logs/`` subfolder, :func:`find_run_files`) or the monitor's history file.
    evaluation: a saved evaluation (default: the one found beside the history). train_data:
    training images (folder or .npy/.npz, in reference-bank order; float arrays in
    ``train_value_range``) to draw the galleries from instead of those saved with the
    evaluation (``top`` images each, the never-retrieved ones a random sample drawn with
    ``seed``). step: which evaluation's N_learned curve to draw (default: the saved
    evaluation's, else the last). The page is written atomically with the umask's permissions.
    """
    history_path, found_evaluation = find_run_files(history)
    records = read_history(history_path)
    if not records:
        raise ValueError(f"history {history_path} holds no evaluations")
    evaluation = found_evaluation if evaluation is None else expand_path(evaluation, "evaluation")
    saved = load_evaluation(evaluation) if evaluation is not None else None
    if saved is not None and step is None:
        chosen = saved.record
    else:
        wanted = records[-1]["step"] if step is None else step
        chosen = next((r for r in records if r["step"] == wanted), None)
        if chosen is None:
            raise ValueError(f"step {step} is not in {history_path}; steps: {[r['step'] for r in records]}")

    sources = f"history {html.escape(str(history_path))}"
    if evaluation is not None:
        sources += f", saved evaluation {html.escape(str(evaluation))} (step {saved.record.get('step')})"
    sections = [
        f"<h1>IRS diversity report</h1><p class='note'>{len(records)} evaluations from {sources}; "
        f"N_train = {chosen['n_train']}, alpha_e = {chosen.get('alpha_e')}.</p>",
        "<h2>Diversity over training</h2>",
        f"<img alt='IRS over training steps' src='data:image/png;base64,{_png(diversity_over_steps_figure(records))}'>",
        _table(records),
        f"<h2>N_learned against samples drawn (step {chosen['step']})</h2>",
        f"<img alt='N_learned curve' src='data:image/png;base64,{_png(curve_figure(chosen, _figure()))}'>",
    ]
    if saved is not None:
        hits = saved.hits
        if len(hits) != saved.record["n_train"]:
            raise ValueError(f"evaluation has {len(hits)} hit counts for n_train = {saved.record['n_train']}")
        n_valid = int(hits.sum())
        sections += [
            f"<h2>Hits per training image (step {saved.record['step']})</h2>",
            f"<img alt='hits histogram' src='data:image/png;base64,{_png(hits_histogram_figure(hits, n_valid))}'>",
        ]
        galleries = saved.galleries
        if train_data is not None:
            galleries = select_galleries(hits, _train_data_loader(train_data, train_value_range), count=top, seed=seed)
        for name in [MOST_RETRIEVED, NEVER_RETRIEVED] + sorted(set(galleries) - {MOST_RETRIEVED, NEVER_RETRIEVED}):
            if name in galleries:
                sections.append(_gallery_section(name, galleries[name], hits))
        if not galleries:
            sections.append("<p class='note'>This saved evaluation carries no training-image galleries (written "
                            "by an older monitor): pass the training images (--train-data) for them.</p>")
    else:
        sections.append(f"<p class='note'>No saved evaluation ({LAST_EVALUATION_NAME}) beside the history: no hit "
                        "histogram or training-image galleries.</p>")

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>IRS report</title><style>{_STYLE}</style></head>"
    return write_text_atomic(expand_path(out, "out"), page + "<body>" + "\n".join(sections) + "</body></html>")
