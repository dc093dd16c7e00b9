"""The monitor's reference: where the training images come from and how their bank is built.

:class:`ReferenceConfig` says what to compare against (training data, held-out real data, the
extractor, the distance, the cache); :func:`prepare_reference` turns it into a
:class:`~irs_callbacks.evaluation.PreparedReference` on the run's device:

- training data may be an image folder, an array, a tensor, a DataLoader (its ``.dataset`` is
  read, in order, without the loader's shuffling) or any map-style dataset (``len`` and ``[i]``:
  torch, Hugging Face ``datasets``, a list), whose items are images, ``(image, label, ...)``
  tuples or dicts with an image under one of ``irs_callbacks.image_io.IMAGE_DICT_KEYS``;
- everything runs under :func:`~irs_callbacks.samplers.seeded_rng`: the trainer's random streams
  are left exactly as they were, and random augmentations inside the dataset read the same way
  in every run, so the bank's cache key is stable (the log says when items are augmented);
- the bank is built once per content (``ReferenceBank.build`` caches it by extractor, distance
  and image contents); with several processes the main process builds and caches it first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from irs_callbacks.evaluation import PreparedReference
from irs_callbacks.files import expand_path
from irs_callbacks.image_io import is_map_style, item_tensor
from irs_callbacks.samplers import preserved_rng, seeded_rng
from irs_callbacks.validation import check_choice, check_value_range

__all__ = ["ReferenceConfig", "prepare_reference", "check_training_data", "guess_value_range"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ReferenceConfig:
    """What the monitor compares samples against.

    Args:
        train_data: training images (see the module docstring); default: what the trainer
            adapter finds (``monitor.attach(accelerator, train_dataloader)``).
        heldout_data: held-out real images for the adjusted score (default: the paper's split of
            the training data, done by ``ReferenceBank.build``).
        value_range: range of float training images, ``(0, 1)`` or ``(-1, 1)``; default: guessed
            from a few items (logged).
        extractor: feature extractor name, module or callable (default ``"random-inception"``);
            extractor_options: e.g. ``{"input_size": 75}`` (much faster on a CPU).
        distance: ``"euclidean"`` (paper default) or ``"cosine"``.
        cache_dir: where built banks are cached (default: ``<log_dir>/reference_cache``).
        bank: a ready :class:`~irs_callbacks.reference.ReferenceBank` or the path of a saved one
            (then no training data is read at all).
        progress: a progress bar while training features are extracted (main process).
    """

    train_data: object = None
    heldout_data: object = None
    value_range: tuple | None = None
    extractor: object = "random-inception"
    extractor_options: dict = field(default_factory=dict)
    distance: str = "euclidean"
    cache_dir: object = None
    bank: object = None
    progress: bool = True

    def __post_init__(self):
        check_choice(self.distance, "distance", ("euclidean", "cosine"))
        if self.value_range is not None:
            object.__setattr__(self, "value_range", check_value_range(self.value_range, "value_range"))
        object.__setattr__(self, "extractor_options", dict(self.extractor_options or {}))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", expand_path(self.cache_dir, "cache_dir"))

    @classmethod
    def of(cls, reference) -> "ReferenceConfig":
        """The monitor's ``reference=`` argument as a config: a ReferenceConfig, a ReferenceBank or
        a saved bank path (``.safetensors``), or else training data."""
        if reference is None:
            return cls()
        if isinstance(reference, cls):
            return reference
        if type(reference).__name__ == "ReferenceBank" or (
                isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".safetensors")):
            return cls(bank=reference)
        return cls(train_data=reference)

    def with_train_data(self, data) -> "ReferenceConfig":
        """This config with training data filled in (when it has none and no bank)."""
        if self.train_data is not None or self.bank is not None or data is None:
            return self
        from dataclasses import replace

        return replace(self, train_data=data)


def _dataset_of(data):
    """A DataLoader's dataset (read in order, not the loader's shuffled batches)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset
    return data


def check_training_data(data) -> str:
    """Read one training item the way the monitor will and describe the data; raises a ValueError
    that says what was found and what is expected when it cannot be read."""
    data = _dataset_of(data)
    if isinstance(data, (str, os.PathLike, np.ndarray, torch.Tensor)):
        return type(data).__name__
    if not is_map_style(data):
        raise ValueError(f"training data of type {type(data).__name__} cannot be indexed: pass a map-style dataset "
                         "(len and [i]), a DataLoader over one, an image folder, an array or a tensor")
    if len(data) == 0:
        raise ValueError("the training data set is empty")
    try:
        with preserved_rng():
            image = item_tensor(data[0])
    except Exception as error:  # noqa: BLE001 - the message is the point
        raise ValueError(f"cannot read an image from the training data's first item ({type(data).__name__}): "
                         f"{error}") from None
    return f"{type(data).__name__} of {len(data)} items, images {tuple(image.shape)} {image.dtype}"


def guess_value_range(data) -> tuple[float, float]:
    """(-1, 1) if float training images go below 0, else (0, 1) (uint8 needs none); logged."""
    data = _dataset_of(data)
    try:
        with preserved_rng():
            if isinstance(data, (torch.Tensor, np.ndarray)):
                items = [torch.as_tensor(np.asarray(data[:64]))]
            elif is_map_style(data):
                items = [item_tensor(data[i]) for i in range(0, len(data), max(1, len(data) // 32))][:32]
            else:
                return (0.0, 1.0)
    except Exception:  # noqa: BLE001 - a guess; the extraction will report real problems
        return (0.0, 1.0)
    if any(not x.is_floating_point() for x in items):
        return (0.0, 1.0)
    value_range = (-1.0, 1.0) if min(float(x.min()) for x in items) < -0.01 else (0.0, 1.0)
    logger.info("IRSMonitor: training images look like value range %s (ReferenceConfig(value_range=...) overrides)",
                value_range)
    return value_range


def _is_augmented(data) -> bool:
    """True when reading the first item twice, under two seeds, gives different images."""
    data = _dataset_of(data)
    if not is_map_style(data) or isinstance(data, (torch.Tensor, np.ndarray)):
        return False
    try:
        with seeded_rng(0):
            first = item_tensor(data[0])
        with seeded_rng(1):
            second = item_tensor(data[0])
    except Exception:  # noqa: BLE001 - check_training_data reports unreadable data
        return False
    return first.shape != second.shape or not torch.equal(first, second)


def _image_lookup(data, value_range):
    """rows -> training images as float NCHW in [0, 1] (for the over-retrieved grid), or None.
    Reads items on the calling thread under preserved_rng (augmenting datasets draw randomness)."""
    from irs_callbacks.features import to_unit_range

    data = _dataset_of(data)
    if isinstance(data, (str, os.PathLike)):
        path = expand_path(data)
        if not path.is_dir():
            return None
        from irs_callbacks.image_io import ImageFolderDataset

        data = ImageFolderDataset(path)
    if not (is_map_style(data) or isinstance(data, (torch.Tensor, np.ndarray))):
        return None

    # one evaluation reads at most 32 rows (the 16 most retrieved, for the grid and the report,
    # and 16 never retrieved ones); the cache lives as long as the run: keep it small
    # (48 RGB 512^2 float images: 150 MB)
    @functools.lru_cache(maxsize=48)
    def one(row: int) -> torch.Tensor:
        return item_tensor(data[row])

    def lookup(rows):
        with preserved_rng():
            images = [one(int(i)) for i in rows]
        sizes = {tuple(x.shape[-2:]) for x in images}
        if len(sizes) > 1:  # a folder of different sizes: bring them to the first one's
            size = images[0].shape[-2:]
            images = [torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear")[0].to(x.dtype)
                      for x in images]
        return to_unit_range(torch.stack(images), value_range).clamp(0, 1)

    return lookup


def prepare_reference(config: ReferenceConfig, *, device, seed: int = 0, batch_size: int = 64,
                      default_cache_dir=None, main_process_first=None, show_progress: bool = True,
                      search_options: dict | None = None) -> PreparedReference:
    """Build (or load) the reference bank of ``config`` and its search structure on ``device``.

    ``main_process_first``: a context manager factory (e.g. Accelerate's
    ``accelerator.main_process_first``) so that one process extracts and caches while the others
    wait and load; ``search_options`` go to ``ReferenceBank.bank`` (e.g. ``sharded=True``).
    """
    from irs_callbacks.features import get_extractor
    from irs_callbacks.reference import ReferenceBank

    device = torch.device(device)
    extractor = get_extractor(config.extractor, device=device, **config.extractor_options)
    training_images, description = None, ""
    bank = config.bank
    if isinstance(bank, (str, os.PathLike)):
        bank = ReferenceBank.load(expand_path(bank, "bank"),
                                  expect={"extractor": extractor.identity, "distance": config.distance})
        description = f"saved bank {bank.n_train} images"
    elif bank is None:
        data = _dataset_of(config.train_data)
        if data is None:
            raise ValueError("IRSMonitor has no training data to compare against: pass it to "
                             "monitor.attach(accelerator, train_dataloader), or reference=ReferenceConfig("
                             "train_data=...) / a saved bank")
        description = check_training_data(data)
        augmented = _is_augmented(data)
        value_range = config.value_range or guess_value_range(data)
        cache = config.cache_dir if config.cache_dir is not None else default_cache_dir
        if augmented:
            logger.info("IRSMonitor: training items are augmented (item 0 reads differently under two seeds): the "
                        "reference bank holds one augmentation of each item, drawn with seed %d, so its cache is "
                        "reused across runs", seed)

        def build():
            with seeded_rng(seed):
                return ReferenceBank.build(
                    data, extractor=extractor, reference=config.heldout_data, distance=config.distance,
                    batch_size=max(batch_size, 64), device=device, cache_dir=cache, seed=seed,
                    value_range=value_range, progress=config.progress and show_progress)

        with (main_process_first() if main_process_first is not None else contextlib.nullcontext()):
            bank = build()
        training_images = _image_lookup(data, value_range)
        description += ", augmented (seeded)" if augmented else ""
    search = bank.bank(device=device, **(search_options or {}))
    return PreparedReference(bank=bank, search=search, extractor=extractor, training_images=training_images,
                             description=description)


def cache_folder(log_dir) -> Path:
    """The default bank cache of a monitor logging to ``log_dir``."""
    return Path(log_dir) / "reference_cache"
