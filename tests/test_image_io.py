"""Reading images: 16-bit files and arrays keep their grey levels, bad dtypes are one-line errors,
every path is expanded."""

import numpy as np
import pytest
import torch
from PIL import Image

from irs_callbacks.features import extract_features, get_extractor, to_unit_range
from irs_callbacks.image_io import as_image_tensor, fingerprint, iter_image_batches, load_array, load_image


def pixels():
    return get_extractor(lambda x: x.flatten(1), input_size=6, custom_name="pixels", device="cpu")


def test_16_bit_png_keeps_every_grey_level(tmp_path):
    levels = (np.arange(36) * 1800).reshape(6, 6).astype(np.uint16)  # 36 grey levels across 0..63000
    Image.fromarray(levels).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    image = load_image(tmp_path / "wide.png")
    assert image.dtype == torch.uint16 and image.shape == (1, 6, 6)
    assert torch.equal(image[0].to(torch.int32), torch.from_numpy(levels.astype(np.int32)))
    unit = to_unit_range(image[None])
    assert torch.unique(unit).numel() == 36  # never binarised (8-bit conversion left 2 levels)
    torch.testing.assert_close(unit[0, 0].double(), torch.from_numpy(levels / 65535.0), rtol=0, atol=1e-7)
    # through a folder and the extractor: the same features as the float image
    feats = extract_features(pixels(), tmp_path, progress=False)
    expected = pixels()(torch.from_numpy(levels / 65535.0).float()[None, None])
    torch.testing.assert_close(feats, expected)


def test_arrays_dtypes(tmp_path):
    x = (np.arange(2 * 4 * 4) % 200).reshape(2, 4, 4)
    assert as_image_tensor(x.astype(np.int64)).dtype == torch.uint8  # 8-bit values in a wide integer type
    wide = as_image_tensor(x.astype(np.uint16) * 300)
    assert wide.dtype == torch.uint16  # 16-bit data is never reduced to 8 bits
    for array, message in ((x > 3, "bool arrays are not images"), (x.astype(np.complex64), "complex arrays"),
                           (x.astype(np.int32) * 300, "store 16-bit images as uint16"),
                           (x.astype(str), "non-numeric")):
        with pytest.raises(ValueError, match=message) as info:
            as_image_tensor(array)
        assert "\n" not in str(info.value)
    np.save(tmp_path / "flags.npy", x > 3)
    with pytest.raises(ValueError, match="flags.npy"):
        load_array(tmp_path / "flags.npy")
    with pytest.raises(ValueError, match="not an image type"):
        as_image_tensor(torch.zeros(1, 1, 2, 2, dtype=torch.bool))


def test_paths_are_expanded(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(folder / "a.png")
    np.save(tmp_path / "x.npy", np.zeros((2, 6, 6), np.uint8))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IRS_IMAGES", str(folder))
    for spelled in ("~/imgs", "$IRS_IMAGES"):
        batches, total = iter_image_batches(spelled)
        assert total == 1 and next(iter(batches)).shape == (1, 3, 6, 6)
        assert fingerprint(spelled) == fingerprint(folder)
    assert load_array("~/x.npy").shape == (2, 1, 6, 6)
