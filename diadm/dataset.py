"""Training images paired with their pseudo-labels: the feature vector of each image (IRS paper, Sec. 3.5).

Features are computed once with the feature registry (:func:`irs_callbacks.features.get_extractor`) and stored
as an :class:`irs_callbacks.reference.ReferenceBank` -- the same safetensors file format, metadata and mismatch
rules as IRS reference banks (extractor identity, N, d, sha256 of the image contents, library version; nothing
is unpickled). The bank is therefore also the reference bank for IRS monitoring of the same model.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from torch.utils.data import Dataset

from irs_callbacks.features import DEFAULT_EXTRACTOR, get_extractor
from irs_callbacks.files import expand_path
from irs_callbacks.image_io import fingerprint, item_image
from irs_callbacks.reference import ReferenceBank
from irs_callbacks.validation import check_value_range

from .conditioning import mean_of_features

__all__ = ["PseudoLabelDataset"]


class PseudoLabelDataset(Dataset):
    """Wrap an image dataset; item ``i`` is ``{"image": <image of item i>, "features": float32 [d], "index": i}``.

    Args:
        dataset: any map-style dataset whose items are images, ``(image, ...)`` tuples or dicts with an
            ``image``/``images``/``img``/``pixel_values`` key (the image is passed through untouched, with the
            dataset's own training transform).
        extractor: a registered extractor name, a module/callable, or a ``FeatureExtractor`` (see
            :func:`irs_callbacks.features.get_extractor`; ``extractor_options`` such as ``input_size`` go there).
        feature_source: the images to extract features from, item for item the same images as ``dataset`` but
            without random augmentation (default: ``dataset`` itself; it must then be deterministic).
        value_range: value range of the feature source's float images: (0, 1) (the default) or (-1, 1)
            (diffusers' usual ``Normalize([0.5], [0.5])`` training transforms give (-1, 1): pass it). It is never
            guessed: float images outside it raise a ValueError naming the range seen and the fix (the check of
            :func:`irs_callbacks.features.to_unit_range`); uint8 and uint16 images need none.
        bank: a precomputed :class:`~irs_callbacks.reference.ReferenceBank` (or a path to one).
        bank_path: a ``.safetensors`` file: loaded if it exists -- refused with a ValueError naming every
            differing field if its extractor, N or image fingerprint do not match -- else built and saved there.
        cache_dir: alternatively, a directory for content-keyed cache files (``ReferenceBank.build``).
    """

    def __init__(self, dataset, extractor=DEFAULT_EXTRACTOR, *, feature_source=None, value_range=(0, 1),
                 bank=None, bank_path=None, cache_dir=None, batch_size: int = 64, device=None,
                 progress: bool = True, **extractor_options):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset (__getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        if bank is not None and bank_path is not None:
            raise ValueError("give at most one of bank= and bank_path=")
        value_range = check_value_range(value_range)
        self.dataset = dataset
        source = dataset if feature_source is None else feature_source
        if feature_source is not None and len(feature_source) != len(dataset):
            raise ValueError(f"feature_source has {len(feature_source)} images, dataset has {len(dataset)}")
        if isinstance(bank, (str, Path)):
            bank_path, bank = bank, None
        if bank_path is not None:
            bank_path = expand_path(bank_path, "bank_path")
        if bank is None and bank_path is not None and bank_path.is_file():
            expect = {"n_train": len(dataset), "train_fingerprint": fingerprint(source)}
            expect["extractor"] = get_extractor(extractor, device=device, **extractor_options).identity
            bank = ReferenceBank.load(bank_path, expect=expect)  # ValueError naming every difference
        if bank is None:
            bank = ReferenceBank.build(source, extractor=extractor, batch_size=batch_size, device=device,
                                       cache_dir=cache_dir, value_range=value_range, progress=progress,
                                       **extractor_options)
            if bank_path is not None:
                bank.save(bank_path)
        if not isinstance(bank, ReferenceBank):
            raise TypeError(f"bank must be a ReferenceBank or a path, got {type(bank).__name__}")
        if bank.n_train != len(dataset):
            raise ValueError(f"bank holds {bank.n_train} feature vectors, dataset has {len(dataset)} images")
        self.bank = bank

    features = property(lambda self: self.bank.features, doc="pseudo-labels [N, d], CPU float32")
    feature_dim = property(lambda self: self.bank.dim, doc="d, the extractor's feature dimension")

    @cached_property
    def feature_mean(self) -> torch.Tensor:
        """Mean pseudo-label [d] (float32, summed in float64 by blocks, computed once): the centre of the
        conditions, ``DiADMUNet2DModel(..., feature_mean=ds.feature_mean)``."""
        return mean_of_features(self.bank.features).float()

    extractor_identity = property(lambda self: self.bank.extractor_identity)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image = item_image(self.dataset[index])
        return {"image": image, "features": self.bank.features[index], "index": index}
