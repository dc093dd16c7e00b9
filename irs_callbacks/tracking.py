"""Where IRS evaluations go: TensorBoard (scalars, margin chart, histogram, image grids, a figure)
and a JSON-lines history file that can be plotted without TensorBoard.

TensorBoard tags (all under ``irs/``; the step is the training step of the evaluation):

- scalars: ``irs/irs_alpha`` (N_learned / N_train), ``irs/estimate``, ``irs/lower``,
  ``irs/upper`` (IRS_inf and its one-sided bounds, fractions of N_train), ``irs/adjusted``,
  ``irs/adjusted_lower``, ``irs/adjusted_upper`` (divided by IRS_inf of real data),
  ``irs/n_learned``, ``irs/k_min``, ``irs/samples_used``, ``irs/n_invalid``, ``irs/verdict``
  (1 = pass, 0 = reject), ``irs/time_sampling``, ``irs/time_features``, ``irs/time_monitor``
  (seconds; ``time_monitor`` here excludes the logging itself, the history file's
  ``timing.monitor`` includes its part on the training loop's thread);
- ``irs/target`` (the target on the IRS_inf scale: ``target_s / N_train``) and
  ``irs/target_adjusted`` (the target on the adjusted scale, ``target_irs``, when a real-data
  measurement exists), so that the distance to the target can be read off;
- custom scalars (:data:`MARGIN_LAYOUT`): chart "Margin" (``irs/estimate`` with band
  ``irs/lower``..``irs/upper``, and ``irs/target`` as a second series) and "Adjusted margin"
  (``irs/adjusted`` with its band and ``irs/target_adjusted``);
- histogram ``irs/hits``: how many samples retrieved each training image;
- images ``irs/samples`` (a grid of generated samples), ``irs/over_retrieved`` (the most often
  retrieved training images), ``irs/curve`` (N_learned against samples drawn, with the ideal
  curve of Eq. 2, the curve expected at the target diversity, and the rejection threshold).

The scalars and the history line are written in the training loop; the histogram, the images
and the saved evaluation are drawn and encoded on one background thread (:class:`BackgroundWork`)
so that the loop does not wait for them. The history file: :mod:`irs_callbacks.history`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irs_callbacks.files import expand_path, write_atomic
from irs_callbacks.history import json_value

__all__ = ["save_evaluation", "load_evaluation", "LAST_EVALUATION_NAME",
           "TensorBoardLogger", "BackgroundWork", "SCALAR_TAGS", "MARGIN_LAYOUT", "Gallery",
           "SavedEvaluation", "never_retrieved_sample", "most_retrieved", "select_galleries",
           "margin_layout_summary"]

logger = logging.getLogger(__name__)


SCALAR_TAGS = ("irs/irs_alpha", "irs/estimate", "irs/lower", "irs/upper", "irs/adjusted",
               "irs/adjusted_lower", "irs/adjusted_upper", "irs/n_learned", "irs/k_min",
               "irs/samples_used", "irs/n_invalid", "irs/verdict", "irs/time_sampling",
               "irs/time_features", "irs/time_monitor", "irs/target", "irs/target_adjusted")

#: TensorBoard custom-scalars layout: category -> chart title -> ("Margin", [series, ...]), each
#: series [value, lower, upper]; the target is a series whose band has zero width (a line).
MARGIN_LAYOUT = {"IRS": {
    "Margin": ["Margin", [["irs/estimate", "irs/lower", "irs/upper"], ["irs/target"] * 3]],
    "Adjusted margin": ["Margin", [["irs/adjusted", "irs/adjusted_lower", "irs/adjusted_upper"],
                                   ["irs/target_adjusted"] * 3]],
}}


def margin_layout_summary(layout: dict = MARGIN_LAYOUT):
    """The custom-scalars layout ``layout`` as a TensorBoard ``Summary`` protobuf (margin charts
    with several series; ``SummaryWriter.add_custom_scalars`` takes only one per chart)."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    categories = []
    for category, charts in layout.items():
        protos = []
        for title, (kind, series) in charts.items():
            if kind != "Margin":
                raise ValueError(f"chart {title!r}: only 'Margin' charts are supported here, got {kind!r}")
            content = layout_pb2.MarginChartContent(series=[
                layout_pb2.MarginChartContent.Series(value=v, lower=lo, upper=hi) for v, lo, hi in series])
            protos.append(layout_pb2.Chart(title=title, margin=content))
        categories.append(layout_pb2.Category(title=category, chart=protos))
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout_pb2.Layout(category=categories).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=metadata)])


def _write_layout(writer) -> None:
    """Write :data:`MARGIN_LAYOUT` through ``writer``'s event file (torch's and tensorboardX's
    ``SummaryWriter`` expose it as ``file_writer``); other writers get the first series of each
    chart through ``add_custom_scalars``."""
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is not None and hasattr(file_writer, "add_summary"):
        file_writer.add_summary(margin_layout_summary())
        return
    writer.add_custom_scalars({category: {title: [kind, series[0]] for title, (kind, series) in charts.items()}
                               for category, charts in MARGIN_LAYOUT.items()})


#: the latest evaluation (hits per training image + its record), written next to the history file
LAST_EVALUATION_NAME = "irs_last_evaluation.safetensors"


def scalars_of(record: dict) -> dict[str, float]:
    """The scalar values logged for one history record (tags of :data:`SCALAR_TAGS`)."""
    out = {"irs/irs_alpha": record["irs_alpha"], "irs/n_learned": record["n_learned"],
           "irs/k_min": record["k_min"], "irs/samples_used": record["samples_used"],
           "irs/n_invalid": record["n_invalid"], "irs/verdict": 1.0 if record["verdict"] == "pass" else 0.0}
    for key in ("estimate", "lower", "upper", "adjusted", "adjusted_lower", "adjusted_upper"):
        if record.get(key) is not None:
            out[f"irs/{key}"] = record[key]
    for key in ("sampling", "features", "monitor"):
        if key in record.get("timing", {}):
            out[f"irs/time_{key}"] = record["timing"][key]
    if record.get("target_s") is not None and record.get("n_train"):
        out["irs/target"] = record["target_s"] / record["n_train"]  # IRS_inf scale (fraction of N_train)
    if record.get("target_irs") is not None and record.get("real_irs") is not None:
        out["irs/target_adjusted"] = record["target_irs"]  # the adjusted scale
    return {k: float(v) for k, v in out.items()}


class TensorBoardLogger:
    """Writes IRS evaluations to a TensorBoard ``SummaryWriter``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX) -- e.g.
            ``accelerator.get_tracker("tensorboard", unwrap=True)`` or Lightning's
            ``trainer.logger.experiment``.
        scalar_sinks: extra callables ``(values: dict, step: int)`` that receive the scalars too
            (other Accelerate trackers, a Lightning logger's ``log_metrics``).
        write_scalars: also write the scalars to ``writer`` (False when a sink already does, e.g.
            Lightning's TensorBoardLogger.log_metrics).
        images: log sample / over-retrieved grids; figure: log the N_learned curve figure.
    """

    def __init__(self, writer=None, *, scalar_sinks=(), write_scalars: bool = True, images: bool = True,
                 figure: bool = True):
        self.writer = writer
        self.scalar_sinks = list(scalar_sinks)
        self.write_scalars = write_scalars
        self.images, self.figure = images, figure
        self._layout_written = False
        self._warned = set()
        self._curve = None
        if figure and writer is not None:
            try:  # import once, up front (not inside the first evaluation's timing)
                import matplotlib.backends.backend_agg  # noqa: F401
                import matplotlib.figure  # noqa: F401
            except ImportError:
                pass

    @classmethod
    def from_log_dir(cls, log_dir, **kwargs) -> "TensorBoardLogger":
        from torch.utils.tensorboard import SummaryWriter
        return cls(SummaryWriter(log_dir=str(log_dir)), **kwargs)

    def log(self, record: dict, *, hits=None, samples=None, over_retrieved=None) -> None:
        """Log one evaluation: :meth:`log_scalars` then :meth:`log_display`."""
        self.log_scalars(record)
        self.log_display(record, hits=hits, samples=samples, over_retrieved=over_retrieved)

    def log_scalars(self, record: dict) -> None:
        """The scalars of ``record`` (history schema) to the sinks and the writer, and the margin
        layout once. Cheap (well under a millisecond per tag): the monitor calls it in the loop."""
        step = int(record["step"])
        scalars = scalars_of(record)
        for sink in self.scalar_sinks:
            sink(scalars, step)
        w = self.writer
        if w is None:
            return
        if not self._layout_written:
            _write_layout(w)
            self._layout_written = True
        if self.write_scalars:
            for tag, value in scalars.items():
                w.add_scalar(tag, value, step)

    def log_display(self, record: dict, *, hits=None, samples=None, over_retrieved=None) -> None:
        """The histogram of per-training-image ``hits`` (1-D), grids of ``samples`` (a few generated
        images, NCHW in [0, 1]) and ``over_retrieved`` (training images, NCHW in [0, 1]) and the
        curve figure: PNG encoding and drawing, so the monitor runs it on its background thread."""
        w, step = self.writer, int(record["step"])
        if w is None:
            return
        if hits is not None and len(hits) > 0:
            w.add_histogram("irs/hits", np.asarray(hits, dtype=np.float64), step)
        if self.images:
            if samples is not None and len(samples) > 0:
                w.add_image("irs/samples", _grid(samples), step)
            if over_retrieved is not None and len(over_retrieved) > 0:
                w.add_image("irs/over_retrieved", _grid(over_retrieved), step)
        if self.figure:
            image = self._curve_image(record)
            if image is not None:
                w.add_image("irs/curve", image, step, dataformats="HWC")
        # no flush here: the writer flushes on its own (every 2 min by default) and on close()

    def warm_up(self, record: dict) -> None:
        """Draw the static part of the curve figure for (n_train, budget, k_min, target_s) now
        (set-up time), so that evaluations only draw their curve."""
        if self.figure and self.writer is not None:
            self._curve_image({**record, "step": 0, "verdict": "", "rule": None, "samples_used": 0, "curve": []})

    def _curve_image(self, record):
        if self._curve is None:
            try:
                self._curve = CurveRenderer()
            except ImportError:
                if "matplotlib" not in self._warned:
                    warnings.warn("matplotlib is not installed: the irs/curve figure is not logged "
                                  "(pip install 'irs-callbacks[report]')", stacklevel=3)
                    self._warned.add("matplotlib")
                return None
        return self._curve.render(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()


class BackgroundWork:
    """Runs display work (TensorBoard summaries, the saved evaluation) on one worker thread, in the
    order submitted, so that the training loop does not wait for PNG encoding and file writes.

    A failing job is logged as a warning and kept in ``failures``; it never reaches the training
    loop by itself (:meth:`raise_failure` re-raises it where the caller wants it, e.g. a monitor in
    strict mode). :meth:`flush` waits until everything submitted has run; pending jobs also finish
    before the interpreter exits. ``seconds`` is the time the jobs took (worker thread).
    """

    def __init__(self, *, name: str = "irs-logging"):
        self.name = name
        self.seconds = 0.0
        self.failures: list[BaseException] = []
        self._executor = None  # started with the first job (again after close)
        self._pending = []
        self._lock = threading.Lock()

    def submit(self, fn, *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` on the worker thread."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._executor.submit(self._guarded, fn, args, kwargs))

    def flush(self) -> None:
        """Wait for every job submitted so far."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def raise_failure(self) -> None:
        """Re-raise the first failure kept since the last call (and forget them all)."""
        failures, self.failures = self.failures, []
        if failures:
            raise failures[0]

    def close(self) -> None:
        """Finish the pending jobs and stop the worker thread."""
        self.flush()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _guarded(self, fn, args, kwargs):
        t0 = time.perf_counter()
        try:
            fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a display problem must never stop training
            self.failures.append(error)
            logger.warning("IRSMonitor: background logging (%s) failed: %r", getattr(fn, "__name__", fn), error)
        finally:
            self.seconds += time.perf_counter() - t0


def curve_figure(record: dict, fig=None):
    """Matplotlib figure: N_learned against samples drawn (the evaluation's curve), the ideal curve
    N (1 - (1 - 1/N)^n) (Eq. 2), the curve expected at the target diversity s_d, the final
    threshold k_min and the deterministic-rejection boundary k_min - (budget - n)."""
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(4.5, 3.2), dpi=72)
    _static_axes(record, fig)
    line, text = _dynamic_artists(fig.axes[0])
    _update_dynamic(record, line, text)
    return fig


def _static_axes(record, fig):
    """The parts of the curve figure that depend only on (N, budget, k_min, s_d)."""
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot(1, 1, 1)
    n_train, budget, k_min = record["n_train"], record["budget"], record["k_min"]
    n = np.linspace(0, budget, 60)
    ax.plot(n, expected_learned(n, n_train), color="0.5", ls="--", label="ideal (Eq. 2)")
    s_d = record.get("target_s")
    if s_d:
        ax.plot(n, expected_learned(n, s_d), color="tab:green", ls=":", label=f"target s_d={s_d:.0f}")
    ax.axhline(k_min, color="tab:red", lw=1, label=f"k_min={k_min}")
    ax.plot(n, k_min - (budget - n), color="tab:red", ls="--", lw=0.8, label="deterministic reject")
    ax.plot([], [], "o-", ms=3, color="tab:red", label="N_learned (red: reject, green: pass)")  # legend entry of the curve
    ax.set_xlim(0, budget)
    ax.set_ylim(0, max(1.0, min(n_train, budget) * 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("samples drawn")
    ax.set_ylabel("N_learned")
    ax.legend(fontsize=7, loc="upper left")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.92)
    return ax


def _dynamic_artists(ax):
    (line,) = ax.plot([], [], "o-", ms=3, color="tab:blue")
    text = ax.text(0.5, 1.02, "", transform=ax.transAxes, ha="center", va="bottom", fontsize=9)
    return line, text


_VERDICT_COLORS = {"pass": "tab:green", "reject": "tab:red"}


def _update_dynamic(record, line, text=None):
    """The evaluation's curve, coloured by verdict (green pass, red reject), and a title."""
    curve = np.asarray(record.get("curve") or [[0, 0]], dtype=float)
    line.set_data(curve[:, 0], curve[:, 1])
    line.set_color(_VERDICT_COLORS.get(record.get("verdict"), "tab:blue"))
    if text is not None:
        text.set_text(f"step {record['step']}: {record['verdict']} ({record.get('rule')}) after {record['samples_used']}")


class CurveRenderer:
    """Renders :func:`curve_figure` to an RGB array. The static part (axes, reference curves,
    legend) is drawn once per (N, budget, k_min, s_d) and reused; each evaluation only draws its
    curve on top (Agg blitting), coloured by its verdict. No per-evaluation title: TensorBoard
    shows the step, and rendering text was the figure's largest cost (~8 ms a call here)."""

    def __init__(self, figsize=(4.5, 3.2), dpi=72):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (ImportError -> no figure)
        from matplotlib.figure import Figure  # noqa: F401

        self.figsize, self.dpi = figsize, dpi
        self._key = None

    def render(self, record) -> np.ndarray:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        key = (record["n_train"], record["budget"], record["k_min"], record.get("target_s"))
        if key != self._key:
            self.fig = Figure(figsize=self.figsize, dpi=self.dpi)
            self.canvas = FigureCanvasAgg(self.fig)
            self.ax = _static_axes(record, self.fig)
            self.line, text = _dynamic_artists(self.ax)
            text.remove()
            self.line.set_animated(True)
            self.canvas.draw()  # animated artists are skipped: this is the static background
            self.background = self.canvas.copy_from_bbox(self.fig.bbox)
            self._key = key
        self.canvas.restore_region(self.background)
        _update_dynamic(record, self.line)
        self.ax.draw_artist(self.line)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def expected_learned(n, n_train):
    """Expected distinct images after n uniform draws from n_train: N (1 - (1 - 1/N)^n) (Eq. 2)."""
    n = np.asarray(n, dtype=float)
    return -n_train * np.expm1(n * np.log1p(-1.0 / n_train)) if n_train > 1 else np.minimum(n, 1.0)


def _grid(images, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Images NCHW in [0, 1] (1 or 3 channels) -> one CHW float32 grid (grey repeated to RGB);
    images smaller than 32 pixels are enlarged (nearest neighbour). numpy only: cheap."""
    import torch

    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32, copy=False)
    x = x[:, :3] if x.shape[1] >= 3 else np.repeat(x[:, :1], 3, axis=1)
    if x.shape[-1] < 32:
        scale = -(-32 // x.shape[-1])
        x = x.repeat(scale, axis=-1).repeat(scale, axis=-2)
    n, c, h, w = x.shape
    cols = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    cells = np.zeros((rows * cols, c, h + pad, w + pad), np.float32)
    cells[:n, :, pad:, pad:] = x
    grid = cells.reshape(rows, cols, c, h + pad, w + pad).transpose(2, 0, 3, 1, 4).reshape(c, rows * (h + pad), cols * (w + pad))
    return np.pad(grid, ((0, 0), (0, pad), (0, pad)))


# ----------------------------------------------------------------------------- saved evaluation

#: gallery names used by :func:`select_galleries` (and shown by ``irs report``)
MOST_RETRIEVED, NEVER_RETRIEVED = "most_retrieved", "never_retrieved"
_GALLERY_NAME = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Gallery:
    """Training images saved with an evaluation for the report.

    rows: int64 ``[k]``, the training-set rows shown (the reference bank's order); images: uint8
    ``[k, C, H, W]`` (C = 1 or 3), the images of those rows; caption: what the selection is
    (e.g. "16 of the 1,724 never retrieved training images: a seeded random sample").
    """

    rows: np.ndarray
    images: np.ndarray
    caption: str

    def __post_init__(self):
        rows = np.asarray(self.rows)
        images = np.asarray(self.images)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"Gallery rows must be a 1-D integer array, got dtype {rows.dtype} shape {rows.shape}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != rows.shape[0] or \
                images.shape[1] not in (1, 3):
            raise ValueError(f"Gallery images must be uint8 [k, C, H, W] with C in {{1, 3}} and k = {rows.shape[0]} "
                             f"rows, got dtype {images.dtype} shape {images.shape} (Gallery.of converts)")
        if not isinstance(self.caption, str):
            raise ValueError(f"Gallery caption must be a string, got {type(self.caption).__name__}")
        object.__setattr__(self, "rows", rows.astype(np.int64))
        object.__setattr__(self, "images", np.ascontiguousarray(images))

    @classmethod
    def of(cls, rows, images, caption: str) -> "Gallery":
        """A gallery from images as they come: tensors or arrays, NCHW or (k, H, W), uint8 (0..255),
        uint16 (0..65535) or float in [0, 1] (NaN shown black); converted to uint8 NCHW."""
        if hasattr(images, "detach"):  # a torch tensor, without importing torch here
            images = images.detach().cpu()
            images = (images.float() if str(images.dtype) == "torch.bfloat16" else images).numpy()
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[:, None]
        if images.dtype == np.uint16:
            images = np.round(images.astype(np.float64) / 257.0).astype(np.uint8)
        elif images.dtype.kind == "f":
            images = np.round(np.clip(np.nan_to_num(images.astype(np.float64), nan=0.0), 0, 1) * 255).astype(np.uint8)
        elif images.dtype != np.uint8:
            raise ValueError(f"gallery images must be uint8, uint16 or float in [0, 1], got dtype {images.dtype}")
        return cls(np.asarray(rows, dtype=np.int64), images, caption)


@dataclass(frozen=True)
class SavedEvaluation:
    """What :func:`load_evaluation` returns: the history ``record``, ``hits`` int64 ``[N_train]``
    (samples that retrieved each training image) and the ``galleries`` saved with them."""

    record: dict
    hits: np.ndarray
    galleries: dict


def most_retrieved(hits, count: int = 16) -> np.ndarray:
    """Rows of the ``count`` most retrieved training images (hits > 0 only), most hits first,
    lower row first on ties."""
    hits = np.asarray(hits)
    order = np.argsort(-hits, kind="stable")
    return order[: min(int(count), int((hits > 0).sum()))].astype(np.int64)


def never_retrieved_sample(hits, count: int = 16, seed: int = 0) -> tuple[np.ndarray, int]:
    """(rows, total): a uniformly random sample, without replacement, of ``count`` of the
    ``total`` never retrieved training images (hits == 0), drawn by
    ``numpy.random.default_rng(seed)`` and sorted by row. Random, not the first rows: the order
    of a training set (class folders, shards) says nothing about what the model misses, a
    uniform sample is an unbiased picture of it."""
    never = np.flatnonzero(np.asarray(hits) == 0)
    total = int(never.size)
    if total <= count:
        return never.astype(np.int64), total
    chosen = np.random.default_rng(seed).choice(never, size=int(count), replace=False)
    return np.sort(chosen).astype(np.int64), total


def select_galleries(hits, load_images, *, count: int = 16, seed: int = 0) -> dict:
    """The report's two galleries for ``hits``: ``most_retrieved`` and ``never_retrieved``
    (:func:`most_retrieved`, :func:`never_retrieved_sample`), with captions that say what they
    are and how many; ``load_images(rows)`` returns the training images of ``rows`` (anything
    :meth:`Gallery.of` takes). Empty selections are left out."""
    galleries = {}
    hits = np.asarray(hits)
    most = most_retrieved(hits, count)
    if most.size:
        galleries[MOST_RETRIEVED] = Gallery.of(
            most, load_images(most), f"the {most.size} most retrieved training images (row: hits; "
                                     f"{int((hits > 0).sum()):,} of {hits.size:,} retrieved at least once)")
    never, total = never_retrieved_sample(hits, count, seed)
    if never.size:
        how = "all of them" if never.size == total else f"a random sample (seed {seed})"
        galleries[NEVER_RETRIEVED] = Gallery.of(
            never, load_images(never), f"{never.size} of the {total:,} never retrieved training images "
                                       f"({total / hits.size:.1%} of {hits.size:,}): {how}")
    return galleries


def save_evaluation(path, record: dict, hits, *, galleries: dict | None = None) -> Path:
    """Write one evaluation: ``hits`` [N_train] and each gallery's rows and images as safetensors
    tensors (``hits``, ``gallery.<name>.rows``, ``gallery.<name>.images``), ``record`` (history
    schema) and the gallery captions as its JSON metadata. Read back with
    :func:`load_evaluation`; nothing is pickled. Atomic, umask-respecting."""
    from safetensors.numpy import save_file

    tensors = {"hits": np.ascontiguousarray(np.asarray(hits, dtype=np.int64).reshape(-1))}
    captions = {}
    for name, gallery in (galleries or {}).items():
        if not isinstance(name, str) or not _GALLERY_NAME.match(name):
            raise ValueError(f"gallery names must match [a-z0-9_]+, got {name!r}")
        if not isinstance(gallery, Gallery):
            raise TypeError(f"galleries[{name!r}] must be a Gallery, got {type(gallery).__name__}")
        tensors[f"gallery.{name}.rows"] = gallery.rows
        tensors[f"gallery.{name}.images"] = gallery.images
        captions[name] = gallery.caption
    metadata = {"record": json.dumps(json_value(record)), "galleries": json.dumps(captions)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_evaluation(path) -> SavedEvaluation:
    """A file written by :func:`save_evaluation` (files without galleries give ``galleries={}``)."""
    from safetensors import safe_open

    path = expand_path(path, "evaluation")
    if not path.is_file():
        raise ValueError(f"evaluation file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"evaluation {path} is not a saved IRS evaluation (safetensors with 'hits'): {error}") from None
    if "record" not in metadata or "hits" not in tensors:
        raise ValueError(f"evaluation {path} has no 'record' metadata or no 'hits' tensor")
    galleries = {}
    for name, caption in json.loads(metadata.get("galleries") or "{}").items():
        try:
            galleries[name] = Gallery(tensors[f"gallery.{name}.rows"], tensors[f"gallery.{name}.images"], caption)
        except (KeyError, ValueError) as error:
            raise ValueError(f"evaluation {path}: gallery {name!r} is incomplete or malformed ({error})") from None
    return SavedEvaluation(record=json.loads(metadata["record"]), hits=tensors["hits"].astype(np.int64),
                           galleries=galleries)
