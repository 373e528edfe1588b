"""Core seams: the write helper, uns records, image sources and the patch source."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from sthisto._anndata import check_writable, record, write
from sthisto._errors import InputError, KeyExistsError, MissingKeyError, NoImageError
from sthisto._images import ImageSource, check_image_array, image_source, open_image_file
from sthisto._logging import HINT
from sthisto.pp import PatchDataset, PatchSpec


def _he_like_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth pink/purple texture: content that resamples predictably."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack(
        [
            200 + 40 * np.sin(7 * xx + rng.uniform(0, 6)),
            120 + 60 * np.sin(5 * yy + 3 * xx + rng.uniform(0, 6)),
            190 + 30 * np.cos(9 * yy + rng.uniform(0, 6)),
        ],
        axis=-1,
    )
    return np.clip(image, 0, 255).astype(np.uint8)


def _adata_with_image(image: np.ndarray, spots_xy: np.ndarray, *, mpp: float, library: str = "S1") -> ad.AnnData:
    n = len(spots_xy)
    adata = ad.AnnData(
        X=np.ones((n, 3), dtype=np.float32),
        obs=pd.DataFrame(
            {"library_id": pd.Categorical([library] * n), "array_col": np.arange(n), "array_row": np.zeros(n, int)},
            index=[f"spot{i}" for i in range(n)],
        ),
    )
    adata.obsm["spatial"] = np.asarray(spots_xy, dtype=float)
    adata.uns["spatial"] = {
        library: {"images": {"fullres": image}, "scalefactors": {"microns_per_pixel": mpp}, "metadata": {}}
    }
    return adata


def test_write_refuses_to_overwrite_and_logs(caplog):
    adata = ad.AnnData(np.zeros((3, 2)))
    with caplog.at_level(HINT, logger="sthisto"):  # each key written is logged at hint
        write(adata, "layers", "pred", np.ones((3, 2)))
    assert "adata.layers['pred']" in caplog.text
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        write(adata, "layers", "pred", np.zeros((3, 2)))
    np.testing.assert_array_equal(adata.layers["pred"], 1)
    write(adata, "layers", "pred", np.zeros((3, 2)), overwrite=True)
    np.testing.assert_array_equal(adata.layers["pred"], 0)
    adata.obs["x"] = 1
    with pytest.raises(KeyExistsError, match=r"adata.obs\['x'\]"):
        check_writable(adata, "obs", "x", overwrite=False)


def test_records_survive_h5ad(tmp_path):
    adata = ad.AnnData(np.zeros((2, 2)))
    record(adata, "normalize", "target", {"variant": "log10_1e4", "genes": ["A", "B"], "scale": 1e4, "missing": None})
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["sthisto"]["normalize"]["target"]
    assert back["variant"] == "log10_1e4"
    assert list(back["genes"]) == ["A", "B"]
    assert back["missing"] is None
    with pytest.raises(KeyExistsError):
        record(adata, "normalize", "target", {})


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((10, 10), np.uint8), "grayscale"),
        (np.zeros((10, 10, 4), np.uint8), "RGBA"),
        (np.zeros((10, 10, 3), np.uint16), "8-bit"),
        (np.zeros((3, 10, 10), np.uint8), "transpose"),
    ],
)
def test_bad_images_are_named(array, message):
    with pytest.raises(InputError, match=message):
        check_image_array(array)


def test_image_source_pads_and_flags_outside_regions():
    image = _he_like_image(40, 50)
    source = ImageSource(image)
    inside, clipped = source.read(5, 5, 10, 10)
    assert not clipped
    np.testing.assert_array_equal(inside, image[5:15, 5:15])
    corner, clipped = source.read(-3, 45, 10, 10)
    assert clipped
    np.testing.assert_array_equal(corner[3:, :5], image[0:7, 45:50])
    assert (corner[:3] == 255).all() and (corner[:, 5:] == 255).all()


def test_tiff_files_are_read_region_by_region(tmp_path):
    image = _he_like_image(300, 260)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(64, 64))
    source = open_image_file(path)
    assert not isinstance(source._array, np.ndarray)  # a lazy zarr array, not decoded whole
    region, _ = source.read(100, 50, 32, 40)
    np.testing.assert_array_equal(region, image[100:132, 50:90])


def test_patches_follow_physical_size_across_resolutions():
    # The same tissue scanned at 0.5 and 1.0 µm/px must give the same 40 µm field of view.
    fine = _he_like_image(400, 400)
    coarse = fine.reshape(200, 2, 200, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    centre_um = np.array([[100.0, 80.0], [120.0, 120.0]])
    a_fine = _adata_with_image(fine, centre_um / 0.5, mpp=0.5)
    a_coarse = _adata_with_image(coarse, centre_um / 1.0, mpp=1.0)
    spec = PatchSpec(size_px=32, size_um=40.0)
    p_fine, _ = PatchDataset(a_fine, spec=spec).read_batch([0, 1])
    p_coarse, _ = PatchDataset(a_coarse, spec=spec).read_batch([0, 1])
    assert p_fine.shape == p_coarse.shape == (2, 3, 32, 32)
    difference = (p_fine.float() - p_coarse.float()).abs().mean()
    assert difference < 3.0  # same content up to resampling


def test_patch_layout_and_border_flags():
    image = _he_like_image(100, 120)
    adata = _adata_with_image(image, np.array([[60.0, 50.0], [3.0, 50.0]]), mpp=1.0)
    normal = PatchDataset(adata, spec=PatchSpec(size_px=16))
    patches, clipped = normal.read_batch([0, 1])
    assert clipped.tolist() == [False, True]
    np.testing.assert_array_equal(patches[0].permute(1, 2, 0).numpy(), image[42:58, 52:68])
    transposed, _ = PatchDataset(adata, spec=PatchSpec(size_px=16, layout="cwh")).read_batch([0])
    np.testing.assert_array_equal(transposed[0].numpy(), patches[0].transpose(-1, -2).numpy())
    assert len(normal) == 2 and normal[1].shape == (3, 16, 16)


def test_patch_source_errors_leave_the_object_unchanged():
    image = _he_like_image(60, 60)
    adata = _adata_with_image(image, np.array([[30.0, 30.0], [90.0, 30.0]]), mpp=1.0)
    before = adata.copy()
    with pytest.raises(InputError, match="outside"):
        PatchDataset(adata, spec=PatchSpec(size_px=16))
    with pytest.raises(InputError, match="larger than"):
        PatchDataset(adata[:1], spec=PatchSpec(size_px=16, size_um=100.0))
    adata.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        PatchDataset(adata, spec=PatchSpec(size_px=16))
    adata.obsm["spatial"][0, 0] = 30.0
    np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])
    del adata.uns["spatial"]["S1"]["scalefactors"]["microns_per_pixel"]
    with pytest.raises(MissingKeyError, match="microns_per_pixel"):
        image_source(adata, "S1")


def test_expression_only_library_refuses_patches():
    adata = _adata_with_image(_he_like_image(20, 20), np.array([[10.0, 10.0]]), mpp=1.0)
    adata.uns["spatial"]["S1"] = {
        "images": {},
        "scalefactors": {"microns_per_pixel": 1.0},
        "metadata": {"has_image": False},
    }
    with pytest.raises(NoImageError, match="no H&E image"):
        PatchDataset(adata, spec=PatchSpec(size_px=8))
