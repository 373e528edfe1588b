"""sthisto.io.read_image: pyramidal/OME/plain TIFF, JPEG/PNG, scale metadata, laziness, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import sthisto
from sthisto._errors import InputError
from sthisto.datasets import synthetic_he_image
from sthisto.io._image import _block_reduce, _TiffSlide, _write_pyramidal_tiff
from sthisto.pp._patches import PatchDataset, PatchSpec

da = pytest.importorskip("dask.array")

SHAPE = (700, 900)
MPP = 2.0
TISSUE = {"seed": 7, "tissue_center_um": (700.0, 900.0), "tissue_radius_um": 500.0}


def draw(origin, shape, mpp):
    return synthetic_he_image(shape, origin=origin, microns_per_pixel=mpp, **TISSUE)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    ome = _write_pyramidal_tiff(folder / "slide.ome.tif", SHAPE, draw, microns_per_pixel=MPP, n_levels=3, tile=128)
    plain = _write_pyramidal_tiff(folder / "plain.tif", SHAPE, draw, microns_per_pixel=MPP, n_levels=2, ome=False)
    return {"ome": ome, "plain": plain, "folder": folder, "pixels": draw((0, 0), SHAPE, MPP)}


def test_ome_pyramid_is_read_lazily_with_its_scale(slides):
    adata = sthisto.io.read_image(slides["ome"])
    assert adata.n_obs == 0 and adata.n_vars == 0 and adata.obsm["spatial"].shape == (0, 2)
    assert list(adata.obs["library_id"].cat.categories) == ["slide"]
    entry = adata.uns["spatial"]["slide"]
    full = entry["images"]["fullres"]
    assert isinstance(full, da.Array) and full.shape == (*SHAPE, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(full[150:260, 300:420]), slides["pixels"][150:260, 300:420])
    scalefactors = entry["scalefactors"]
    assert scalefactors["microns_per_pixel"] == pytest.approx(MPP)
    assert entry["metadata"]["microns_per_pixel_source"] == "OME-XML PhysicalSizeX"
    assert entry["metadata"]["image_path"] == str(slides["ome"].resolve())
    np.testing.assert_array_equal(entry["metadata"]["pyramid_levels"], [[700, 900], [350, 450], [175, 225]])
    hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
    assert max(hires.shape[:2]) <= 2000 and max(lowres.shape[:2]) <= 600
    for image, key in ((hires, "tissue_hires_scalef"), (lowres, "tissue_lowres_scalef")):
        assert image.shape[1] == pytest.approx(SHAPE[1] * scalefactors[key], abs=1)
    assert adata.uns["sthisto"]["read_image"]["slide"]["n_levels"] == 3
    # Patches are cut from the lazy image exactly as from the drawn pixels.
    spots = ad.AnnData(obs=pd.DataFrame({"library_id": pd.Categorical(["slide"] * 2)}, index=["a", "b"]))
    spots.obsm["spatial"] = np.array([[400.0, 300.0], [100.0, 600.0]])
    spots.uns["spatial"] = adata.uns["spatial"]
    patches, _ = PatchDataset(spots, spec=PatchSpec(size_px=20, size_um=None)).read_batch([0, 1])
    np.testing.assert_array_equal(patches[0].permute(1, 2, 0).numpy(), slides["pixels"][290:310, 390:410])


def test_plain_tiff_scale_comes_from_resolution_tags(slides):
    adata = sthisto.io.read_image(slides["plain"], library_id="P1")
    entry = adata.uns["spatial"]["P1"]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(MPP)
    assert entry["metadata"]["microns_per_pixel_source"] == "TIFF resolution tags"
    given = sthisto.io.read_image(slides["plain"], microns_per_pixel=0.5, lazy_fullres=False)
    assert given.uns["spatial"]["plain"]["scalefactors"]["microns_per_pixel"] == 0.5
    assert "fullres" not in given.uns["spatial"]["plain"]["images"]


def test_thumbnail_uses_the_smallest_sufficient_level_block_by_block(slides):
    slide = _TiffSlide.open(slides["ome"])
    small, scale = slide.thumbnail(400)  # level 1 (350 × 450) is the smallest reaching 400
    level1 = np.asarray(slide._level_array(1))
    expected = level1[:350, :450].astype(float).reshape(175, 2, 225, 2, 3).mean(axis=(1, 3))
    assert small.shape == (175, 225, 3) and scale == pytest.approx(0.25)
    np.testing.assert_array_equal(small, np.clip(np.rint(expected), 0, 255).astype(np.uint8))

    class Counting:
        def __init__(self, array):
            self.array, self.shape, self.largest = array, array.shape, 0

        def __getitem__(self, key):
            block = self.array[key]
            self.largest = max(self.largest, block.shape[0] * block.shape[1])
            return block

    big = np.broadcast_to(slides["pixels"][:1, :1], (3000, 2600, 3))  # 23 MB if it were materialised
    counting = Counting(big)
    reduced = _block_reduce(counting, 2)
    assert reduced.shape == (1500, 1300, 3) and (reduced == slides["pixels"][0, 0]).all()
    assert counting.largest <= 1024**2 < big.shape[0] * big.shape[1]  # never the whole image at once


def test_png_and_jpeg_are_read_by_path(slides):
    png = slides["folder"] / "small.png"
    Image.fromarray(slides["pixels"]).save(png)
    with pytest.raises(InputError, match="microns_per_pixel="):
        sthisto.io.read_image(png)
    adata = sthisto.io.read_image(png, microns_per_pixel=MPP)
    entry = adata.uns["spatial"]["small"]
    assert "fullres" not in entry["images"] and entry["metadata"]["image_path"].endswith("small.png")
    assert entry["images"]["hires"].shape == (*SHAPE, 3)
    jpeg = slides["folder"] / "scan.jpg"
    Image.fromarray(slides["pixels"]).save(jpeg, dpi=(50800, 50800))  # 0.5 µm/px in the JFIF header
    scan = sthisto.io.read_image(jpeg)
    assert scan.uns["spatial"]["scan"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5, rel=1e-3)
    assert scan.uns["spatial"]["scan"]["metadata"]["microns_per_pixel_source"] == "file resolution (dpi)"


def test_missing_scale_unreadable_and_wrong_files_are_clear_errors(slides, tmp_path):
    software = tmp_path / "screenshot.tif"
    tifffile.imwrite(
        software, slides["pixels"][:64, :64], photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    with pytest.raises(InputError, match=r"352.8 µm/px.*microns_per_pixel="):
        sthisto.io.read_image(software)
    assert sthisto.io.read_image(software, microns_per_pixel=0.25).uns["spatial"]["screenshot"]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(InputError, match="could not read"):
        sthisto.io.read_image(broken, microns_per_pixel=0.5)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="could not read"):
        sthisto.io.read_image(garbage, microns_per_pixel=0.5)
    with pytest.raises(InputError, match="does not exist"):
        sthisto.io.read_image(tmp_path / "absent.tif")
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="channel"):
        sthisto.io.read_image(grey, microns_per_pixel=0.5)
    with pytest.raises(InputError, match="positive"):
        sthisto.io.read_image(slides["ome"], microns_per_pixel=-1.0)


def test_as_spatialdata_keeps_the_image_lazy(slides):
    sdata = sthisto.io.read_image(slides["ome"], library_id="s1", as_spatialdata=True)
    assert "s1_image" in sdata.images
    element = sdata.images["s1_image"]
    assert isinstance(element.data, da.Array) and element.shape == (3, *SHAPE)
    table = sdata.tables["table"]
    assert table.uns["spatial"]["s1"]["scalefactors"]["microns_per_pixel"] == pytest.approx(MPP)
