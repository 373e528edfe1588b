"""SpatialData with images: chunked multiscale writes, lazy re-reads, patches from the zarr store.

Image writes need spatialdata >= 0.7.3 (0.7.0 fails for any image with dask 2026.x:
"Expected an iterable of integers"); the project pins it, and this test skips on older versions.
"""

from __future__ import annotations

import numpy as np
import pytest

import sthisto
from sthisto.pp import PatchDataset, PatchSpec


@pytest.fixture
def section():
    return sthisto.datasets.synthetic(n_sections=1, n_spots=30, n_genes=6, seed=4)


def test_to_spatialdata_chunks_and_pyramids_the_image(section):
    sdata = sthisto.io.to_spatialdata(section, chunk_size=128)
    from spatialdata import get_pyramid_levels

    image = sdata.images["S01_image"]
    levels = get_pyramid_levels(image, attr="data")
    height, width = section.uns["spatial"]["S01"]["images"]["fullres"].shape[:2]
    assert levels[0].shape == (3, height, width)
    assert max(levels[0].chunks[1]) == 128 and max(levels[0].chunks[2]) == 128
    # Halvings (floor) until the coarsest level's longest side is below 2 chunks.
    shapes = [level.shape[1:] for level in levels]
    assert all(b == (a[0] // 2, a[1] // 2) for a, b in zip(shapes, shapes[1:], strict=False))
    assert len(shapes) >= 3 and max(shapes[-1]) < 256 <= max(shapes[-2])
    single = sthisto.io.to_spatialdata(section, chunk_size=None)
    from xarray import DataArray

    assert isinstance(single.images["S01_image"], DataArray)  # one scale


def test_written_images_read_back_lazily_and_patches_match(section, tmp_path):
    sd = pytest.importorskip("spatialdata", minversion="0.7.3", reason="image writes need spatialdata >= 0.7.3")
    import dask.array as da

    sdata = sthisto.io.to_spatialdata(section, chunk_size=128)
    sdata.write(tmp_path / "section.zarr")
    back_sdata = sd.read_zarr(tmp_path / "section.zarr")
    back = sthisto.io.from_spatialdata(back_sdata)
    full = back.uns["spatial"]["S01"]["images"]["fullres"]
    assert isinstance(full, da.Array)  # nothing decoded yet
    assert max(full.chunks[0]) == 128
    spec = PatchSpec(size_px=32, size_um=60.0)
    ours, _ = PatchDataset(back, spec=spec).read_batch(range(5))
    reference, _ = PatchDataset(section, spec=spec).read_batch(range(5))
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    # A 30-px patch (60 µm at 2 µm/px) touches at most 4 chunks of 128 px.
    y, x = (np.asarray(section.obsm["spatial"][0])[::-1] - 15).astype(int)
    assert np.prod(full[y : y + 30, x : x + 30].numblocks) <= 4
