"""sthisto.io.read_her2st on the published her2st layout (skipped when the data are absent)."""

from __future__ import annotations

import gzip
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, MissingKeyError, NoImageError
from sthisto.pp._patches import PatchDataset, PatchSpec

pytestmark = pytest.mark.real_data

SECTIONS_WITH_IMAGES = ["C2", "C3", "C4", "C5", "C6"]
LABELLED = ["A1", "C1", "D1", "E1", "F1", "G2", "H1"]  # J1 has labels but no counts


@pytest.fixture(scope="module")
def her2st(her2st_dir):
    """All 30 sections, read once for the module."""
    return sthisto.io.read_her2st(her2st_dir)


def _count_table(her2st_dir, section) -> pd.DataFrame:
    return pd.read_csv(her2st_dir / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)


def _sections(adata):
    return list(adata.obs["library_id"].cat.categories)


def test_reads_all_thirty_sections_with_one_row_per_count_spot(her2st, her2st_dir):
    names = sorted(p.name.removesuffix(".tsv.gz") for p in (her2st_dir / "ST-cnts").glob("*.tsv.gz"))
    assert _sections(her2st) == names and len(names) == 30
    assert her2st.obs_names.is_unique
    assert isinstance(her2st.X, sp.csr_matrix) and her2st.X.dtype == np.float32
    assert np.array_equal(her2st.X.data, np.round(her2st.X.data)) and her2st.X.data.min() > 0
    for section in names:
        text = gzip.decompress((her2st_dir / "ST-cnts" / f"{section}.tsv.gz").read_bytes())
        n_rows = len(text.rstrip(b"\n").split(b"\n")) - 1  # minus the header
        assert int((her2st.obs["library_id"] == section).sum()) == n_rows, section
    assert her2st.obs["patient"].astype(str).tolist() == [s[0] for s in her2st.obs["library_id"].astype(str)]
    for column in ("array_row", "array_col", "in_tissue"):
        assert pd.api.types.is_integer_dtype(her2st.obs[column])
    assert isinstance(her2st.obs["library_id"].dtype, pd.CategoricalDtype)


def test_counts_equal_the_published_table_on_the_gene_union(her2st, her2st_dir):
    table = _count_table(her2st_dir, "C1")
    part = her2st[her2st.obs["library_id"] == "C1"]
    assert part.obs_names.tolist() == [f"C1_{s}" for s in table.index]
    expected = table.reindex(columns=part.var_names, fill_value=0).to_numpy()
    np.testing.assert_array_equal(part.X.toarray(), expected)
    absent = part.var_names.difference(table.columns)
    assert len(absent) > 0 and part[:, absent].X.nnz == 0  # union: genes of other sections are 0 here


def test_every_count_spot_is_joined_to_its_selection_row(her2st, her2st_dir):
    for section in _sections(her2st):
        spots = pd.read_csv(her2st_dir / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
        spots.index = [f"{section}_{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
        part = her2st[her2st.obs["library_id"] == section]
        assert part.obs_names.isin(spots.index).all(), section
        expected = spots.loc[part.obs_names, ["pixel_x", "pixel_y"]].to_numpy()
        np.testing.assert_array_equal(part.obsm["spatial"], expected)
        np.testing.assert_array_equal(part.obs["array_col"], spots.loc[part.obs_names, "x"])
        np.testing.assert_array_equal(part.obs["array_row"], spots.loc[part.obs_names, "y"])


def test_labels_are_joined_on_rounded_adjusted_coordinates(her2st, her2st_dir):
    labelled_counts = {}
    for section in _sections(her2st):
        part = her2st.obs[her2st.obs["library_id"] == section]
        labelled_counts[section] = int(part["label"].notna().sum())
        if section not in LABELLED:
            assert labelled_counts[section] == 0, section
            continue
        # Independent join: label file (x, y) rounded against the spot file's (new_x, new_y).
        labels = pd.read_csv(her2st_dir / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv", sep="\t")
        labels = labels.dropna(subset=["x", "y"])
        lookup = {
            (round(x), round(y)): lab for x, y, lab in zip(labels["x"], labels["y"], labels["label"], strict=True)
        }
        spots = pd.read_csv(her2st_dir / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
        by_grid = {
            f"{section}_{x}x{y}": lookup.get((round(nx), round(ny)))
            for x, y, nx, ny in zip(spots["x"], spots["y"], spots["new_x"], spots["new_y"], strict=True)
        }
        expected = [by_grid[name] for name in part.index]
        got = [None if pd.isna(v) else v for v in part["label"]]
        assert got == expected, section
    # Measured on the published files: every count spot of a labelled section gets a label.
    assert {s: labelled_counts[s] for s in LABELLED} == {
        "A1": 346,
        "C1": 176,
        "D1": 306,
        "E1": 587,
        "F1": 691,
        "G2": 467,
        "H1": 613,
    }
    assert "invasive cancer" in her2st.obs["label"].cat.categories


def test_images_scale_factors_and_microns_per_pixel(her2st):
    spatial = her2st.uns["spatial"]
    with_image = [s for s in _sections(her2st) if spatial[s]["metadata"]["has_image"]]
    assert with_image == SECTIONS_WITH_IMAGES
    from PIL import Image

    for section in _sections(her2st):
        entry = spatial[section]
        scalefactors = entry["scalefactors"]
        mpp = scalefactors["microns_per_pixel"]
        assert scalefactors["spot_spacing_um"] == 200
        assert scalefactors["spot_diameter_fullres"] == pytest.approx(100 / mpp)
        if section.startswith("A"):
            # A's pixel coordinates refer to 0.75×-scale images: 0.69 / 0.75 ≈ 0.92 µm/px.
            assert 0.90 < mpp < 0.93, section
        else:
            assert 0.68 < mpp < 0.70, section
        if section not in SECTIONS_WITH_IMAGES:
            assert entry["images"] == {} and "image_path" not in entry["metadata"]
            continue
        hires = entry["images"]["hires"]
        assert hires.dtype == np.uint8 and hires.ndim == 3 and max(hires.shape[:2]) == 2000
        with Image.open(entry["metadata"]["image_path"]) as img:
            width, height = img.size
        scale = scalefactors["tissue_hires_scalef"]
        assert abs(width * scale - hires.shape[1]) < 1 and abs(height * scale - hires.shape[0]) < 1
        # Spots sit on stained tissue in the thumbnail, darker than the slide on average.
        part = her2st[her2st.obs["library_id"] == section]
        xy = np.rint(part.obsm["spatial"] * scale).astype(int)
        assert hires[xy[:, 1], xy[:, 0]].mean() < hires.mean() - 20


def test_patient_a_scale_is_the_small_image_frame(her2st):
    a = np.mean([her2st.uns["spatial"][f"A{i}"]["scalefactors"]["microns_per_pixel"] for i in range(1, 7)])
    c = np.mean([her2st.uns["spatial"][f"C{i}"]["scalefactors"]["microns_per_pixel"] for i in range(1, 7)])
    assert c / a == pytest.approx(0.75, abs=0.01)


def test_reference_genes_are_measured_in_every_section(her2st, her2st_dir):
    genes = sthisto.datasets.her2st_785_genes()
    assert set(genes) <= set(her2st.var_names)
    for section in _sections(her2st):
        with gzip.open(her2st_dir / "ST-cnts" / f"{section}.tsv.gz", "rt") as handle:
            header = set(handle.readline().rstrip("\n").split("\t")[1:])
        assert set(genes) <= header, section


def test_patches_at_spots_land_on_tissue(her2st):
    c2 = her2st[her2st.obs["library_id"] == "C2"]
    mpp = c2.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"]
    dataset = PatchDataset(c2, spec=PatchSpec(size_px=112, size_um=112 * mpp))
    assert dataset._side[0] == 112  # native resolution: the papers' 112 px field of view
    patches, clipped = dataset.read_batch(range(0, c2.n_obs, 9))
    assert not clipped.any()
    values = patches.float()
    per_patch_mean = values.mean(dim=(1, 2, 3))
    assert (per_patch_mean < 230).all()
    assert (values.flatten(1).std(dim=1) > 10).all()  # texture, not a uniform fill
    # The slide's corner (glass) is bright and flat: the patches are not background.
    from sthisto._images import image_source

    corner, _ = image_source(c2, "C2").source.read(0, 0, 112, 112)
    assert corner.mean() > 230 and per_patch_mean.max() < corner.mean() - 20


def test_sections_without_image_are_expression_only(her2st_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = sthisto.io.read_her2st(her2st_dir, sections=["C2", "C1", "A1"])
    assert _sections(adata) == ["C2", "C1", "A1"]  # requested order kept
    notes = [r.getMessage() for r in caplog.records if "without an H&E image" in r.getMessage()]
    assert len(notes) == 1 and "C1" in notes[0] and "A1" in notes[0] and "C2" not in notes[0]
    assert adata.uns["spatial"]["C1"]["metadata"]["has_image"] is False
    with pytest.raises(NoImageError, match="C1"):
        PatchDataset(adata[adata.obs["library_id"] == "C1"], spec=PatchSpec(112))
    PatchDataset(adata[adata.obs["library_id"] == "C2"], spec=PatchSpec(112))  # has an image


def test_result_writes_to_h5ad(her2st_dir, tmp_path):
    import anndata as ad

    adata = sthisto.io.read_her2st(her2st_dir, sections="C2")
    adata.write_h5ad(tmp_path / "c2.h5ad")
    back = ad.read_h5ad(tmp_path / "c2.h5ad")
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert back.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"] == pytest.approx(
        adata.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"]
    )
    assert back.uns["sthisto"]["io"]["read_her2st"]["sections"].tolist() == ["C2"]


def test_unknown_section_lists_available(her2st_dir):
    with pytest.raises(MissingKeyError, match=r"\['Z9'\].*Available sections: \['A1', 'A2'"):
        sthisto.io.read_her2st(her2st_dir, sections=["C2", "Z9"])
    with pytest.raises(InputError, match="more than once"):
        sthisto.io.read_her2st(her2st_dir, sections=["C2", "C2"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        sthisto.io.read_her2st(tmp_path / "nowhere")
    with pytest.raises(InputError, match="ST-cnts"):
        sthisto.io.read_her2st(tmp_path)


def _mini_layout(her2st_dir, tmp_path, section="C1"):
    """A her2st-shaped folder holding one real section, for corrupting files."""
    root = tmp_path / "her2st"
    for folder, name in (("ST-cnts", f"{section}.tsv.gz"), ("ST-spotfiles", f"{section}_selection.tsv")):
        (root / folder).mkdir(parents=True)
        shutil.copy(her2st_dir / folder / name, root / folder / name)
    return root


def test_missing_or_garbled_files_are_clear_errors(her2st_dir, tmp_path):
    root = _mini_layout(her2st_dir, tmp_path)
    assert sthisto.io.read_her2st(root).n_obs == 176

    (root / "ST-spotfiles" / "C1_selection.tsv").unlink()
    with pytest.raises(InputError, match="spot file .* is missing"):
        sthisto.io.read_her2st(root)

    root = _mini_layout(her2st_dir, tmp_path / "b")
    counts = root / "ST-cnts" / "C1.tsv.gz"
    counts.write_bytes(counts.read_bytes()[:5000])  # truncated download
    with pytest.raises(InputError, match="could not read the count table"):
        sthisto.io.read_her2st(root)

    root = _mini_layout(her2st_dir, tmp_path / "c")
    counts = root / "ST-cnts" / "C1.tsv.gz"
    with gzip.open(counts, "wt") as handle:
        handle.write("\tGENE1\tGENE2\n10x11\t1\tNA\n")
    with pytest.raises(InputError, match="non-numeric|non-integer"):
        sthisto.io.read_her2st(root)

    with gzip.open(counts, "wt") as handle:
        handle.write("\tGENE1\tGENE2\nspotA\t1\t2\n")
    with pytest.raises(InputError, match="'<x>x<y>'"):
        sthisto.io.read_her2st(root)

    spots = root / "ST-spotfiles" / "C1_selection.tsv"
    spots.write_text("a\tb\n1\t2\n")
    with gzip.open(counts, "wt") as handle:
        handle.write("\tGENE1\n1x2\t3\n")
    with pytest.raises(InputError, match=r"lacks column\(s\)"):
        sthisto.io.read_her2st(root)


def test_image_paths_override(her2st_dir):
    image = next((her2st_dir / "ST-imgs" / "C" / "C2").glob("*.jpg")).resolve()
    adata = sthisto.io.read_her2st(her2st_dir, sections=["C1"], image_paths={"C1": image})
    entry = adata.uns["spatial"]["C1"]
    assert entry["metadata"]["has_image"] is True and entry["metadata"]["image_path"] == str(image)
    assert max(entry["images"]["hires"].shape[:2]) == 2000
    with pytest.raises(MissingKeyError, match="not being read"):
        sthisto.io.read_her2st(her2st_dir, sections=["C1"], image_paths={"C3": image})
    with pytest.raises(InputError, match="does not exist"):
        sthisto.io.read_her2st(her2st_dir, sections=["C1"], image_paths={"C1": her2st_dir / "none.jpg"})
