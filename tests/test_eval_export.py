"""Sample export: ADM `.npz` round trip (values, dtype, layout), PNG grids, atomic writes, bad input."""
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from treeq.eval.export import image_grid, save_adm_npz, save_grid_png, to_uint8


def _images(n=5, channels=1, size=8):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_adm_npz_round_trip(tmp_path):
    images = _images()
    path = save_adm_npz(images, tmp_path / "runs" / "samples.npz")
    with np.load(path) as file:
        assert list(file) == ["arr_0"]
        array = file["arr_0"]
    assert array.dtype == np.uint8 and array.shape == (5, 8, 8, 3)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    restored = torch.from_numpy(array[..., 0]).unsqueeze(1).double() / 127.5 - 1
    assert (restored - images.double()).abs().max() <= 0.5 / 127.5 + 1e-6  # rounding to the nearest level
    assert not list(path.parent.glob("*.tmp"))


def test_uint8_levels_cover_the_range_and_clip():
    pixels = to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(5, 1, 1, 1))
    assert pixels[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_rgb_images_keep_their_channels():
    images = _images(channels=3)
    array = to_uint8(images)
    assert array.shape == (5, 8, 8, 3)
    for channel in range(3):
        assert np.array_equal(array[..., channel], to_uint8(images[:, channel:channel + 1])[..., 0])


def test_export_rejects_other_shapes(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        save_adm_npz(torch.zeros(2, 2, 8, 8), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="nrow"):
        image_grid(_images(), nrow=0)


def test_grid_layout():
    grid = image_grid(_images(n=5), nrow=3, padding=2)
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 2:10], to_uint8(_images(n=5))[0])
    assert (grid[12:20, 22:30] == 255).all()  # the sixth cell is empty


def test_grid_png_round_trip(tmp_path):
    path = save_grid_png(_images(n=4), tmp_path / "grid.png", nrow=2)
    image = imread(path)
    assert image.shape[:2] == (22, 22)
    assert np.array_equal(np.rint(image[..., :3] * 255).astype(np.uint8), image_grid(_images(n=4), nrow=2))
