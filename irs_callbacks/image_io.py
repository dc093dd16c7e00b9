"""Reading image collections: folders, .npy/.npz arrays, tensors, Datasets and DataLoaders.

Conventions: images come out as torch tensors in NCHW layout. Folder images are decoded to RGB
``uint8`` [0, 255], except 16-bit greyscale files (PNG mode ``I;16``), which keep all their grey
levels as ``uint16`` [0, 65535], one channel. Arrays keep their dtype: ``uint8`` = [0, 255],
``uint16`` = [0, 65535] (16-bit images; never reduced to 8 bits), float = the caller's
``value_range``; other integer arrays must hold values in [0, 255] and become ``uint8``; bool,
complex and non-numeric arrays are refused with a one-line ValueError. The extractor turns every
integer image into [0, 1] by its dtype's full range (/255 or /65535). Arrays may be (N, H, W)
grey, (N, C, H, W) or (N, H, W, C) with C in {1, 3}. Every path goes through
:func:`irs_callbacks.files.expand_path` (``~`` and ``$VARS`` expanded).

Fingerprints (sha256 hex) identify image *contents* for reference-bank caches: for a folder the
sorted relative paths and raw file bytes; for arrays/tensors dtype, shape and bytes of the NCHW
tensor; for Datasets/DataLoaders every image's dtype, shape and bytes in iteration order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from irs_callbacks.files import expand_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "ImageFolderDataset",
    "load_image",
    "load_array",
    "as_image_tensor",
    "item_image",
    "item_tensor",
    "is_map_style",
    "iter_image_batches",
    "update_hash",
    "fingerprint",
    "describe",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ARRAY_KEYS = ("images", "x", "arr_0")
#: Keys under which dict items / batches hold their images, in order of preference: Hugging Face
#: ``datasets`` columns (``image``, ``img``), diffusers' ``train_unconditional.py`` (``input``),
#: the text-to-image and transformers scripts (``pixel_values``), DreamBooth (``instance_images``).
#: The one list the whole library uses.
IMAGE_DICT_KEYS = ("image", "images", "img", "input", "pixel_values", "instance_images")


def list_image_files(folder) -> list[Path]:
    """All images (png/jpg/jpeg/webp, any case) below ``folder``, recursively, sorted by relative path."""
    folder = expand_path(folder, "image folder")
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"image folder {str(folder)!r} contains no images ({'/'.join(IMAGE_EXTENSIONS)})")
    return files


#: Pillow modes of 16-bit (and 32-bit integer) greyscale images, read without losing grey levels
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path) -> torch.Tensor:
    """One image file -> ``uint8`` tensor [3, H, W] (RGB), or ``uint16`` [1, H, W] for a 16-bit
    greyscale file (every grey level kept; never converted through 8 bits)."""
    from PIL import Image, UnidentifiedImageError

    path = expand_path(path, "image file")
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_GREY_MODES:
                array = np.asarray(image)
                if array.dtype != np.uint16:
                    if array.size and (array.min() < 0 or array.max() > 65535):
                        raise ValueError(f"integer grey values in [{array.min()}, {array.max()}] do not fit 16 bits")
                    array = array.astype(np.uint16)
                return torch.from_numpy(array.copy())[None]
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image file {str(path)!r}: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder (recursive, sorted) as ``uint8`` RGB tensors [3, H, W]."""

    def __init__(self, folder):
        self.root = expand_path(folder, "image folder")
        self.files = list_image_files(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index])


def load_array(path) -> torch.Tensor:
    """Images from a .npy or .npz file (key ``images``, ``x`` or the only array) -> NCHW tensor."""
    path = expand_path(path, "array file")
    if not path.is_file():
        raise ValueError(f"array file {str(path)!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read array file {str(path)!r} (pickled objects are refused): {error}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ARRAY_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{str(path)!r} holds arrays {keys}; store the images under the key 'images'")
            loaded = loaded[key]
    return as_image_tensor(loaded, name=str(path))


_DTYPE_RULE = ("uint8 (0..255), uint16 (0..65535) or floating point (in the value range), or other integers "
               "in 0..255")


def _numpy_images(images: np.ndarray, name: str) -> torch.Tensor:
    """An ndarray of images -> tensor, with the dtype rules of the module docstring."""
    kind = images.dtype.kind
    if kind == "b" or kind == "c" or kind not in "uif":
        what = {"b": "bool", "c": "complex"}.get(kind, f"non-numeric ({images.dtype})")
        raise ValueError(f"{name} has dtype {images.dtype}: {what} arrays are not images; expected {_DTYPE_RULE}")
    if kind in "ui" and images.dtype not in (np.uint8, np.uint16):
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"{name} has dtype {images.dtype} with values in [{images.min()}, {images.max()}]: "
                             f"integer images other than uint16 must lie in 0..255; store 16-bit images as uint16")
        images = images.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(images))


def as_image_tensor(images, *, name: str = "images") -> torch.Tensor:
    """A stack of images (array or tensor) -> NCHW tensor with 1 or 3 channels (no copy if NCHW)."""
    x = _numpy_images(images, name) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or ndarray of images, got {type(images).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {{1, 3}}, "
                         f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} contains no images (N = 0)")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} has dtype {x.dtype}, which is not an image type; expected {_DTYPE_RULE}")
    if not x.is_floating_point() and x.dtype not in (torch.uint8, torch.uint16):
        if x.dtype in (torch.uint32, torch.uint64):  # no min/max in torch for these
            return _numpy_images(x.cpu().numpy(), name).to(x.device)
        if x.numel() and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"integer {name} must lie in [0, 255] (16-bit images: uint16), got values in "
                             f"[{int(x.min())}, {int(x.max())}]")
        x = x.to(torch.uint8)
    return x


def item_image(item, what: str = "dataset items"):
    """The image part of a Dataset item or DataLoader batch: the item itself, the first entry of a
    tuple/list (image, label, ...), or a dict's image entry (keys ``IMAGE_DICT_KEYS``)."""
    if isinstance(item, (tuple, list)) and item:
        return item[0]
    if isinstance(item, Mapping):
        key = next((k for k in IMAGE_DICT_KEYS if k in item), None)
        if key is None:
            raise ValueError(f"{what} are dicts without an image key {IMAGE_DICT_KEYS}: keys {list(item)}")
        return item[key]
    return item


def item_tensor(item) -> torch.Tensor:
    """One Dataset item (image, (image, label, ...) or dict) -> image tensor [C, H, W]."""
    item = item_image(item)
    if not isinstance(item, (torch.Tensor, np.ndarray)):
        try:  # PIL image
            item = np.asarray(item.convert("RGB"))
        except AttributeError:
            raise TypeError(f"dataset items must be images (tensor, ndarray or PIL), got {type(item).__name__}") from None
    x = torch.as_tensor(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(2, 0, 1)
    return as_image_tensor(x.unsqueeze(0), name="dataset image")[0]


def _collate(items):
    images = [item_tensor(item) for item in items]
    if len({(x.shape, x.dtype) for x in images}) == 1:
        return torch.stack(images)
    return images


def _batch_images(batch):
    """A DataLoader batch (tensor, (images, labels) or dict) -> NCHW tensor or list of images."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4:
        batch = batch[0]
    elif isinstance(batch, dict):
        batch = item_image(batch, "DataLoader batches")
    if isinstance(batch, torch.Tensor):
        return as_image_tensor(batch, name="DataLoader batch")
    if isinstance(batch, (list, tuple)):
        return [item_tensor(item) for item in batch]
    raise TypeError(f"DataLoader batches must be image tensors, got {type(batch).__name__}")


def is_map_style(data) -> bool:
    """True for a map-style dataset of any library: ``len(data)`` and ``data[i]`` (a torch Dataset,
    a Hugging Face ``datasets.Dataset``, a list of images, ...), but not a path, a string, an
    array or a tensor (those are image stacks)."""
    return (hasattr(data, "__len__") and hasattr(data, "__getitem__")
            and not isinstance(data, (str, bytes, os.PathLike, np.ndarray, torch.Tensor, dict)))


def iter_image_batches(data, *, batch_size: int = 64, num_workers: int = 0):
    """(iterator over batches, number of images or None). A batch is an NCHW tensor, or a list of
    [C, H, W] tensors when the images of that batch differ in size."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (str, os.PathLike)):
        path = expand_path(data, "images")
        data = ImageFolderDataset(path) if path.is_dir() else load_array(path) if path.suffix.lower() in (
            ".npy", ".npz") else _bad_path(path)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        x = as_image_tensor(data)
        return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x)
    if isinstance(data, DataLoader):
        try:
            total = len(data.dataset)
        except TypeError:
            total = None
        return (_batch_images(b) for b in data), total
    if isinstance(data, Dataset) or is_map_style(data):
        try:
            total = len(data)
        except TypeError:
            total = None
        if total == 0:
            raise ValueError("dataset contains no images")
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
        return iter(loader), total
    raise TypeError("images must be an image folder, a .npy/.npz file, a tensor/ndarray, a DataLoader or a map-style "
                    "dataset (len(data) and data[i]: torch, Hugging Face datasets, a list), "
                    f"got {type(data).__name__}")


def _bad_path(path: Path):
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    raise ValueError(f"{str(path)!r} is neither an image folder nor a .npy/.npz array file")


def update_hash(hasher, batch) -> None:
    """Feed each image of a batch (tensor or list) into ``hasher``: dtype, shape, bytes."""
    for image in batch:
        image = image.detach().cpu().contiguous()
        hasher.update(f"{image.dtype}:{tuple(image.shape)};".encode())
        hasher.update(image.reshape(-1).view(torch.uint8).numpy().tobytes() if image.numel() else b"")


def fingerprint(data, *, batch_size: int = 256) -> str:
    """sha256 of the image contents of ``data`` (see the module docstring for what is hashed)."""
    hasher = hashlib.sha256()
    if isinstance(data, (str, os.PathLike)):
        data = expand_path(data, "images")
    if isinstance(data, Path) and data.is_dir():
        root = data
        hasher.update(b"folder;")
        for path in list_image_files(root):
            hasher.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    hasher.update(block)
        return hasher.hexdigest()
    if isinstance(data, ImageFolderDataset):
        return fingerprint(data.root)
    batches, _ = iter_image_batches(data, batch_size=batch_size)
    hasher.update(b"images;")
    for batch in batches:
        update_hash(hasher, batch)
    return hasher.hexdigest()


def describe(data) -> str:
    """Short human-readable description of an image source (for metadata and messages)."""
    if isinstance(data, (str, os.PathLike)):
        return os.path.abspath(expand_path(data, "images"))
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return f"{type(data).__name__}{tuple(data.shape)} {data.dtype}"
    return type(data).__name__
