"""``irs report``: a self-contained HTML page (PNG figures inlined) from a monitor history file.

Figures: IRS_inf over training steps with its confidence band and the target; N_learned against
samples drawn for one evaluation with the ideal curve (Eq. 2) and k_min; and, from a saved
evaluation (per-training-image hit counts, :func:`save_evaluation`), the histogram of hits per
training image against the uniform expectation (the detailed-balance paper's Fig. 3b) and grids of
never-retrieved and most-retrieved training images with their counts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from irs_callbacks.history import read_history
from irs_callbacks.tracking import curve_figure, load_evaluation, save_evaluation  # noqa: F401

__all__ = ["render_report", "retrieval_extremes"]


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
    target = records[-1].get("target_irs")
    if target is not None:
        scale = 1.0 if adjusted or records[-1].get("real_irs") is None else records[-1]["real_irs"]
        ax.axhline(target * scale, color="tab:green", ls="--", label=f"target {target * scale:.2f}")
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


def retrieval_extremes(hits: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``top`` most retrieved training images (hits > 0, most first, lower index on
    ties) and of the first ``top`` never retrieved ones."""
    hits = np.asarray(hits)
    most = np.argsort(-hits, kind="stable")[: min(top, int((hits > 0).sum()))]
    return most, np.flatnonzero(hits == 0)[:top]


def _training_images(train_data, indices: np.ndarray) -> np.ndarray:
    """Images of the training set at ``indices`` as (n, H, W, C) floats in [0, 1]; the order is
    the reference bank's (sorted file paths of a folder, rows of an array)."""
    import torch

    from irs_callbacks.image_io import ImageFolderDataset, load_array

    path = Path(train_data)
    if path.is_dir():
        dataset = ImageFolderDataset(path)
        images = torch.stack([torch.as_tensor(dataset[int(i)]) for i in indices])
    else:
        images = torch.as_tensor(load_array(path))[torch.as_tensor(indices, dtype=torch.long)]
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.ndim == 3:
        images = images[:, None]
    return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()


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


def render_report(history, out="irs_report.html", *, evaluation=None, train_data=None, step=None, top: int = 16) -> Path:
    """Write the HTML report and return its path.

    history: the monitor's JSON-lines history file. evaluation: a file from
    :func:`save_evaluation` (hit counts) for the histogram and grids. train_data: the training
    images (folder or .npy/.npz, in reference-bank order) for the grids. step: which evaluation's
    N_learned curve to draw (default: the evaluation file's, else the last).
    """
    records = read_history(history)
    if not records:
        raise ValueError(f"history {history} holds no evaluations")
    hits = None
    if evaluation is not None:
        chosen, hits = load_evaluation(evaluation)
    else:
        chosen = records[-1] if step is None else next((r for r in records if r["step"] == step), None)
        if chosen is None:
            raise ValueError(f"step {step} is not in {history}; steps: {[r['step'] for r in records]}")

    sections = [
        f"<h1>IRS diversity report</h1><p class='note'>{len(records)} evaluations from "
        f"{html.escape(str(history))}; N_train = {chosen['n_train']}, alpha_e = {chosen.get('alpha_e')}.</p>",
        "<h2>Diversity over training</h2>",
        f"<img alt='IRS over training steps' src='data:image/png;base64,{_png(diversity_over_steps_figure(records))}'>",
        _table(records),
        f"<h2>N_learned against samples drawn (step {chosen['step']})</h2>",
        f"<img alt='N_learned curve' src='data:image/png;base64,{_png(curve_figure(chosen, _figure()))}'>",
    ]
    if hits is not None:
        if len(hits) != chosen["n_train"]:
            raise ValueError(f"evaluation has {len(hits)} hit counts for n_train = {chosen['n_train']}")
        n_valid = int(hits.sum())
        sections += [
            "<h2>Hits per training image</h2>",
            f"<img alt='hits histogram' src='data:image/png;base64,{_png(hits_histogram_figure(hits, n_valid))}'>",
        ]
        if train_data is not None:
            most, never = retrieval_extremes(hits, top)
            for title, idx in (("Most retrieved training images", most), ("Never retrieved training images", never)):
                if len(idx):
                    captions = [f"#{i}: {hits[i]}" for i in idx]
                    fig = image_grid_figure(_training_images(train_data, idx), captions, f"{title} (index: hits)")
                    sections.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{_png(fig)}'>")
        else:
            sections.append("<p class='note'>Pass the training images (--train-data) for image grids.</p>")
    else:
        sections.append("<p class='note'>Pass a saved evaluation (--evaluation) for the hit histogram and grids.</p>")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>IRS report</title><style>{_STYLE}</style></head>"
    out.write_text(page + "<body>" + "\n".join(sections) + "</body></html>")
    return out
