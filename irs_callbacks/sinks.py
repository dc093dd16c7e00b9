"""Where the monitor's evaluations go: one sink per destination.

A sink has ``write(result, record)``, called in the training loop right after an evaluation (it
must be cheap: a history line, a few scalars), optionally ``prepare(result)`` (also in the loop:
whatever must be read on the training thread, e.g. training images from a dataset whose
transforms draw from the global RNG) and ``display(result, record, prepared)``, the slow part (PNG
encoding, figures, files), which the monitor runs on its background thread; and ``close()``.
Sinks run on the main process only.

- :class:`HistorySink`: the JSON-lines history (:mod:`irs_callbacks.history`);
- :class:`TensorBoardSink`: scalars (also to other trackers), margin charts, histogram, image
  grids and the curve figure (:class:`~irs_callbacks.tracking.TensorBoardLogger`);
- :class:`EvaluationFileSink`: ``irs_last_evaluation.safetensors``, the latest evaluation's hits per
  training image, for ``irs report``.
"""

from __future__ import annotations

import logging

from irs_callbacks.history import HistoryFile
from irs_callbacks.tracking import most_retrieved

__all__ = ["HistorySink", "TensorBoardSink", "EvaluationFileSink"]

logger = logging.getLogger(__name__)


class HistorySink:
    """Appends each evaluation to the JSON-lines history file ``path``."""

    def __init__(self, path):
        self.file = HistoryFile(path)

    @property
    def path(self):
        return self.file.path

    def write(self, result, record) -> None:
        self.file.append(record)

    def rewrite(self, records) -> None:
        """Make the file hold exactly ``records`` (after a resume: nothing counted twice)."""
        self.file.rewrite(records)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars in the loop, the rest (histogram, sample and over-retrieved grids, curve figure)
    as display work. ``training_images(rows) -> float NCHW in [0, 1]`` feeds the over-retrieved
    grid (None: no grid)."""

    def __init__(self, tensorboard_logger, *, training_images=None, num_images: int = 36):
        self.logger = tensorboard_logger
        self.training_images = training_images
        self.num_images = num_images

    def write(self, result, record) -> None:
        self.logger.log_scalars(record)

    def prepare(self, result):
        """The most retrieved training images (read here, on the training thread), or None."""
        if self.training_images is None or not self.logger.images or not self.num_images:
            return None
        top = [int(row) for row in most_retrieved(result.hits.numpy(), min(16, self.num_images))
               if result.hits[row] > 1]  # over-retrieved: the same image more than once
        if not top:
            return None
        try:
            return self.training_images(top)
        except Exception as error:  # noqa: BLE001 - a display nicety, never fatal
            logger.warning("IRSMonitor: could not load the over-retrieved training images: %s", error)
            return None

    def display(self, result, record, over_retrieved=None) -> None:
        self.logger.log_display(record, hits=result.hits.numpy(), samples=result.samples,
                                over_retrieved=over_retrieved)

    def warm_up(self, values: dict) -> None:
        self.logger.warm_up(values)

    def close(self) -> None:
        self.logger.close()


class EvaluationFileSink:
    """Writes the latest evaluation (record, hits per training image and the report's galleries:
    the most retrieved training images and a seeded random sample of the never retrieved ones) to
    ``path``, atomically. ``training_images(rows) -> float NCHW in [0, 1]`` (None: no galleries)."""

    def __init__(self, path, *, training_images=None):
        self.path = path
        self.training_images = training_images

    def write(self, result, record) -> None:
        pass

    def prepare(self, result):
        """The galleries (training images read here, on the training thread), or None."""
        if self.training_images is None:
            return None
        from irs_callbacks.tracking import select_galleries

        try:
            return select_galleries(result.hits.numpy(), self.training_images)
        except Exception as error:  # noqa: BLE001 - a display nicety, never fatal
            logger.warning("IRSMonitor: could not load the training images of the report's galleries: %s", error)
            return None

    def display(self, result, record, galleries=None) -> None:
        from irs_callbacks.tracking import save_evaluation

        save_evaluation(self.path, record.as_dict(), result.hits, galleries=galleries)

    def close(self) -> None:
        pass
