"""sthisto.io.read_hest: HEST-1k samples written here (synthetic and from her2st) read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sthisto
from sthisto._errors import InputError, MissingKeyError
from sthisto.pp import PatchDataset, PatchSpec


def write_hest_sample(root, sid, adata, library, image, mpp, *, meta=None, patches=None, patch_mpp=0.5):
    """Write one library of an AnnData in the HEST-1k layout (st/, wsis/, metadata/, patches/)."""
    import anndata as ad
    import h5py
    import tifffile

    for folder in ("st", "wsis", "metadata", "patches"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    part = adata[adata.obs["library_id"] == library]
    barcodes = [f"bc{i:04d}" for i in range(part.n_obs)]
    st = ad.AnnData(X=part.X.copy(), obs=part.obs[["array_row", "array_col"]].copy(), var=part.var[[]].copy())
    st.obs_names = barcodes
    st.obsm["spatial"] = np.asarray(part.obsm["spatial"], dtype=float)
    st.write_h5ad(root / "st" / f"{sid}.h5ad")
    # A tiled pyramid like HEST's generic TIFFs: level 0 plus one half-size level.
    with tifffile.TiffWriter(root / "wsis" / f"{sid}.tif", bigtiff=False) as tif:
        tif.write(image, tile=(256, 256), subifds=1, photometric="rgb", compression="zlib")
        tif.write(image[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
    info = {
        "pixel_size_um_estimated": mpp,
        "st_technology": "Spatial Transcriptomics",
        "patient": "P7",
        "organ": "Breast",
    }
    info.update(meta or {})
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(info))
    if patches is not None:
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as h5:
            h5.create_dataset("img", data=patches)
            h5["img"].attrs["pixel_size"] = patch_mpp
            h5.create_dataset("barcode", data=np.asarray(barcodes, dtype="S")[:, None])
            h5.create_dataset("coords", data=np.rint(st.obsm["spatial"]).astype(np.int64))
    return barcodes


@pytest.fixture
def synthetic_hest(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=24, n_genes=8, seed=3)
    patches = {}
    for number, library in enumerate(adata.obs["library_id"].cat.categories):
        entry = adata.uns["spatial"][library]
        n = int((adata.obs["library_id"] == library).sum())
        # Each pre-cut patch is a constant grey named after its spot, so a read shows its origin.
        patches[library] = np.broadcast_to(
            np.arange(n, dtype=np.uint8)[:, None, None, None] + 10 * number, (n, 32, 32, 3)
        )
        write_hest_sample(
            tmp_path,
            f"SAMPLE{number}",
            adata,
            library,
            np.asarray(entry["images"]["fullres"]),
            entry["scalefactors"]["microns_per_pixel"],
            meta={"patient": None} if number else None,
            patches=patches[library].copy() if number == 0 else None,
            patch_mpp=3.5,  # 32 px x 3.5 µm/px = 112 µm
        )
    return tmp_path, adata, patches


def test_read_hest_synthetic(synthetic_hest):
    root, source, _ = synthetic_hest
    adata = sthisto.io.read_hest(root)
    assert list(adata.obs["library_id"].cat.categories) == ["SAMPLE0", "SAMPLE1"]
    assert adata.n_obs == source.n_obs
    np.testing.assert_array_equal(adata.X.toarray(), source.X.toarray())
    np.testing.assert_allclose(adata.obsm["spatial"], source.obsm["spatial"])
    assert adata.obs["patient"].astype(str).tolist() == ["P7"] * 24 + ["SAMPLE1"] * 24  # empty patient -> sample id
    assert set(adata.obs["organ"]) == {"Breast"}
    entry = adata.uns["spatial"]["SAMPLE0"]
    mpp = source.uns["spatial"]["S01"]["scalefactors"]["microns_per_pixel"]
    assert entry["scalefactors"]["microns_per_pixel"] == mpp
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100.0 / mpp)
    assert entry["scalefactors"]["spot_spacing_um"] == 200.0
    assert entry["metadata"]["technology"] == "Spatial Transcriptomics"
    assert entry["images"]["hires"].shape == source.uns["spatial"]["S01"]["images"]["fullres"].shape
    # Only SAMPLE0 has a patch file; SAMPLE1's spots carry no patch row.
    assert adata.obs["patch_index"].tolist() == list(range(24)) + [-1] * 24
    assert "patches_path" not in adata.uns["spatial"]["SAMPLE1"]["metadata"]


def test_read_hest_uses_precut_patches_when_field_matches(synthetic_hest):
    root, source, patches = synthetic_hest
    adata = sthisto.io.read_hest(root, sample_ids=["SAMPLE0"])
    batch, _ = PatchDataset(adata, spec=PatchSpec(size_px=32, size_um=112.0)).read_batch([5, 0, 17])
    np.testing.assert_array_equal(batch.numpy(), patches["S01"][[5, 0, 17]].transpose(0, 3, 1, 2))
    # Another field of view is cut from the slide: it matches the source image, not the grey tiles.
    cut, _ = PatchDataset(adata, spec=PatchSpec(size_px=32, size_um=80.0)).read_batch([5])
    expected, _ = PatchDataset(source, spec=PatchSpec(size_px=32, size_um=80.0)).read_batch([5])
    np.testing.assert_array_equal(cut.numpy(), expected.numpy())
    # patches=False ignores the file.
    plain = sthisto.io.read_hest(root, sample_ids=["SAMPLE0"], patches=False)
    assert "patch_index" not in plain.obs
    from_slide, _ = PatchDataset(plain, spec=PatchSpec(size_px=32, size_um=112.0)).read_batch([5])
    reference, _ = PatchDataset(source, spec=PatchSpec(size_px=32, size_um=112.0)).read_batch([5])
    np.testing.assert_array_equal(from_slide.numpy(), reference.numpy())


def test_read_hest_errors(synthetic_hest, tmp_path_factory):
    root, _, _ = synthetic_hest
    with pytest.raises(MissingKeyError, match="SAMPLE9"):
        sthisto.io.read_hest(root, sample_ids=["SAMPLE9"])
    (root / "metadata" / "SAMPLE1.json").write_text(json.dumps({"st_technology": "Visium"}))
    with pytest.raises(InputError, match="pixel_size_um_estimated"):
        sthisto.io.read_hest(root, sample_ids="SAMPLE1")
    with pytest.raises(InputError, match="no <sample_id>.h5ad"):
        empty = tmp_path_factory.mktemp("empty")
        (empty / "st").mkdir()
        sthisto.io.read_hest(empty)


@pytest.mark.real_data
def test_read_hest_from_her2st(her2st_dir, tmp_path):
    """A HEST sample made from her2st C2 (a slide crop, patches cut by sthisto) reads back."""

    her2st = sthisto.io.read_her2st(her2st_dir, sections="C2")
    mpp = her2st.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"]
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st.uns["spatial"]["C2"]["metadata"]["image_path"]) as img:
        # A 1536-px crop around the first spots keeps the test fast; HEST samples are crops too.
        x0, y0 = (np.median(her2st.obsm["spatial"], axis=0) - 768).astype(int)
        crop = np.asarray(img.crop((x0, y0, x0 + 1536, y0 + 1536)).convert("RGB"))
    inside = ((her2st.obsm["spatial"] - (x0, y0) > 120) & (her2st.obsm["spatial"] - (x0, y0) < 1536 - 120)).all(axis=1)
    sub = her2st[inside].copy()
    sub.obsm["spatial"] = sub.obsm["spatial"] - (x0, y0)
    sub.uns["spatial"]["C2"]["images"]["fullres"] = crop
    spec = PatchSpec(size_px=224, size_um=112.0)
    patches = PatchDataset(sub, spec=spec).read_batch(range(sub.n_obs))[0].numpy().transpose(0, 2, 3, 1)
    write_hest_sample(tmp_path, "HER2ST_C2", sub, "C2", crop, mpp, meta={"patient": "C"}, patches=patches)

    adata = sthisto.io.read_hest(tmp_path)
    assert adata.n_obs == sub.n_obs > 10
    np.testing.assert_array_equal(adata.X.toarray(), sub.X.toarray())
    assert list(adata.var_names) == list(sub.var_names)
    assert set(adata.obs["patient"]) == {"C"}
    assert adata.uns["spatial"]["HER2ST_C2"]["scalefactors"]["microns_per_pixel"] == pytest.approx(mpp)
    precut, _ = PatchDataset(adata, spec=spec).read_batch([0, 3])
    np.testing.assert_array_equal(precut.numpy(), patches[[0, 3]].transpose(0, 3, 1, 2))
    recut, _ = PatchDataset(adata, spec=PatchSpec(size_px=224, size_um=111.0)).read_batch([0])
    assert np.abs(recut.numpy().astype(int) - patches[0].transpose(2, 0, 1)).mean() < 20
