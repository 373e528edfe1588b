"""The synthetic H&E + expression generator: schema, geometry, region drawing, honesty."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.spatial import cKDTree

from sthisto._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Synthetic, Uns
from sthisto._errors import InputError
from sthisto.datasets import synthetic, synthetic_he_image
from sthisto.datasets._synthetic import MORPHOLOGY_FEATURES
from sthisto.datasets._synthetic_image import REGIONS


@pytest.fixture(scope="module")
def legacy():
    """Three default-size legacy sections from two patients (also the learnability data)."""
    return synthetic(n_sections=3, n_patients=2, seed=11)


@pytest.fixture(scope="module")
def visium():
    return synthetic(n_sections=2, n_spots=150, geometry="visium", seed=5)


# ------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------


def test_schema(legacy):
    adata = legacy
    libraries = ["S01", "S02", "S03"]
    assert adata.n_vars == 50
    assert isinstance(adata.X, sparse.csr_matrix) and adata.X.dtype == np.float32
    values = adata.X.data
    assert (values >= 0).all() and np.array_equal(values, np.round(values))
    assert adata.X.nnz > 0

    obs = adata.obs
    assert isinstance(obs[Obs.LIBRARY_ID].dtype, pd.CategoricalDtype)
    assert list(obs[Obs.LIBRARY_ID].cat.categories) == libraries
    assert isinstance(obs[Obs.PATIENT].dtype, pd.CategoricalDtype)
    assert isinstance(obs[Obs.LABEL].dtype, pd.CategoricalDtype)
    assert set(obs[Obs.LABEL].cat.categories) == set(REGIONS)
    for column in (Obs.ARRAY_ROW, Obs.ARRAY_COL):
        assert np.issubdtype(obs[column].dtype, np.integer) and (obs[column] >= 0).all()
    assert obs.index.is_unique
    assert (obs[Obs.SPOT_ID] == obs[Obs.ARRAY_COL].astype(str) + "x" + obs[Obs.ARRAY_ROW].astype(str)).all()

    coords = adata.obsm[Obsm.SPATIAL]
    assert coords.shape == (adata.n_obs, 2) and np.issubdtype(coords.dtype, np.floating)
    morphology = adata.obsm[Synthetic.MORPHOLOGY]
    assert list(morphology.columns) == list(MORPHOLOGY_FEATURES)
    assert (morphology.index == adata.obs_names).all()

    var = adata.var
    assert var[Synthetic.DEPENDENT].dtype == bool
    assert var[Synthetic.DEPENDENT].sum() == 30  # 0.6 * 50
    assert set(var.loc[var[Synthetic.DEPENDENT], Synthetic.DRIVER]) <= set(MORPHOLOGY_FEATURES)
    assert (var.loc[~var[Synthetic.DEPENDENT], Synthetic.DRIVER] == "none").all()
    assert all(name.startswith("SYN_DEP_") for name in var.index[var[Synthetic.DEPENDENT]])
    assert all(name.startswith("SYN_IND_") for name in var.index[~var[Synthetic.DEPENDENT]])
    loadings = adata.varm[Synthetic.LOADINGS]
    assert loadings.shape == (50, len(MORPHOLOGY_FEATURES))
    assert np.all(loadings[~var[Synthetic.DEPENDENT].to_numpy()] == 0)

    for library in libraries:
        entry = adata.uns[Uns.SPATIAL][library]
        full = entry[Uns.IMAGES][Images.FULLRES]
        hires = entry[Uns.IMAGES][Images.HIRES]
        assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
        assert hires.dtype == np.uint8 and hires.shape[2] == 3
        scale = entry[Uns.SCALEFACTORS][ScaleFactors.HIRES]
        assert max(hires.shape[:2]) <= 1000 and hires.shape[0] == int(np.ceil(full.shape[0] * scale))
        factors = entry[Uns.SCALEFACTORS]
        assert factors[ScaleFactors.MICRONS_PER_PIXEL] == 2.0
        assert factors[ScaleFactors.SPOT_SPACING_UM] == 200.0
        assert factors[ScaleFactors.SPOT_DIAMETER] * 2.0 == pytest.approx(100.0)
        assert entry[Uns.METADATA][Metadata.HAS_IMAGE] is True
        assert entry[Uns.METADATA][Metadata.SOURCE] == "sthisto.datasets.synthetic"

    record = adata.uns[Uns.STHISTO][Synthetic.RECORD]
    assert record["n_sections"] == 3 and record["n_patients"] == 2 and record["seed"] == 11
    assert record["geometry"] == "legacy" and record["microns_per_pixel"] == 2.0
    assert set(record["sections"]) == set(libraries)


def test_spot_counts_near_target(legacy):
    sizes = legacy.obs.groupby(Obs.LIBRARY_ID, observed=True).size()
    assert ((sizes > 0.9 * 300) & (sizes < 1.1 * 300)).all(), sizes


def test_without_annotations():
    adata = synthetic(n_sections=1, n_spots=40, n_genes=5, annotations=False, seed=2)
    assert Obs.LABEL not in adata.obs
    assert adata.n_vars == 5


def test_h5ad_round_trip(tmp_path):
    import anndata as ad

    adata = synthetic(n_sections=1, n_spots=30, n_genes=6, seed=4)
    adata.write_h5ad(tmp_path / "synthetic.h5ad")
    back = ad.read_h5ad(tmp_path / "synthetic.h5ad")
    assert (back.X != adata.X).nnz == 0
    assert np.array_equal(
        back.uns[Uns.SPATIAL]["S01"][Uns.IMAGES][Images.FULLRES],
        adata.uns[Uns.SPATIAL]["S01"][Uns.IMAGES][Images.FULLRES],
    )
    assert back.uns[Uns.STHISTO][Synthetic.RECORD]["n_spots"] == 30


# ------------------------------------------------------------------------------------------
# seeds, patients
# ------------------------------------------------------------------------------------------


def test_seeded_repeatability():
    kwargs = {"n_sections": 2, "n_spots": 50, "n_genes": 12}
    first, again, other = synthetic(seed=3, **kwargs), synthetic(seed=3, **kwargs), synthetic(seed=4, **kwargs)
    assert (first.X != again.X).nnz == 0
    assert np.array_equal(first.obsm[Obsm.SPATIAL], again.obsm[Obsm.SPATIAL])
    assert first.obs.equals(again.obs)
    for library in ("S01", "S02"):
        image = first.uns[Uns.SPATIAL][library][Uns.IMAGES][Images.FULLRES]
        assert np.array_equal(image, again.uns[Uns.SPATIAL][library][Uns.IMAGES][Images.FULLRES])
        other_image = other.uns[Uns.SPATIAL][library][Uns.IMAGES][Images.FULLRES]
        assert image.shape != other_image.shape or not np.array_equal(image, other_image)
    # Sections of one call differ from each other too.
    images = [first.uns[Uns.SPATIAL][lib][Uns.IMAGES][Images.FULLRES] for lib in ("S01", "S02")]
    assert images[0].shape != images[1].shape or not np.array_equal(*images)
    assert first.X.shape != other.X.shape or (first.X != other.X).nnz > 0


def test_patients_group_sections():
    adata = synthetic(n_sections=5, n_patients=2, n_spots=20, n_genes=4, seed=1)
    patient_of = adata.obs.groupby(Obs.LIBRARY_ID, observed=True)[Obs.PATIENT].agg(lambda p: set(p.astype(str)))
    assert all(len(p) == 1 for p in patient_of)
    assert [next(iter(p)) for p in patient_of] == ["P01", "P01", "P01", "P02", "P02"]
    sections = adata.uns[Uns.STHISTO][Synthetic.RECORD]["sections"]
    # Sections of one patient share the stain style; patients do not.
    assert sections["S01"]["style_seed"] == sections["S02"]["style_seed"] != sections["S04"]["style_seed"]

    alone = synthetic(n_sections=3, n_spots=20, n_genes=4, seed=1)
    assert list(alone.obs[Obs.PATIENT].cat.categories) == ["P01", "P02", "P03"]
    assert (alone.obs[Obs.PATIENT].cat.codes == alone.obs[Obs.LIBRARY_ID].cat.codes).all()


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------


# spot_diameter_fullres as the platform's software writes it: Space Ranger's is the pixel
# diameter of a theoretical 65 µm spot (the capture spots are 55 µm).
@pytest.mark.parametrize(
    ("name", "spacing", "diameter", "neighbours"), [("legacy", 200.0, 100.0, 4), ("visium", 100.0, 65.0, 6)]
)
def test_grid_geometry(request, name, spacing, diameter, neighbours):
    adata = request.getfixturevalue("legacy" if name == "legacy" else "visium")
    for library in adata.obs[Obs.LIBRARY_ID].cat.categories:
        sub = adata[adata.obs[Obs.LIBRARY_ID] == library]
        factors = adata.uns[Uns.SPATIAL][library][Uns.SCALEFACTORS]
        mpp = factors[ScaleFactors.MICRONS_PER_PIXEL]
        assert factors[ScaleFactors.SPOT_SPACING_UM] == spacing
        assert factors[ScaleFactors.SPOT_DIAMETER] * mpp == pytest.approx(diameter)
        um = sub.obsm[Obsm.SPATIAL] * mpp
        distance, _ = cKDTree(um).query(um, k=2)
        assert distance[:, 1] == pytest.approx(spacing, rel=1e-6)  # every spot has a neighbour at the pitch
        counts = np.array([len(n) - 1 for n in cKDTree(um).query_ball_point(um, spacing * 1.01)])
        assert counts.max() == neighbours  # square: 4 at the pitch; hexagonal: 6
        assert (counts == neighbours).mean() > 0.3
        assert np.bincount(counts).argmax() == neighbours  # interior spots dominate
        row = sub.obs[Obs.ARRAY_ROW].to_numpy()
        col = sub.obs[Obs.ARRAY_COL].to_numpy()
        if name == "legacy":
            expected_x, expected_y = col * spacing, row * spacing
        else:
            assert ((row + col) % 2 == 0).all()  # Visium: array_col steps by 2 along a row
            expected_x, expected_y = col * spacing / 2, row * spacing * np.sqrt(3) / 2
        assert np.ptp(um[:, 0] - expected_x) < 1e-6 and np.ptp(um[:, 1] - expected_y) < 1e-6


def test_spots_inside_image_and_on_tissue(legacy):
    record = legacy.uns[Uns.STHISTO][Synthetic.RECORD]
    for library in legacy.obs[Obs.LIBRARY_ID].cat.categories:
        image = legacy.uns[Uns.SPATIAL][library][Uns.IMAGES][Images.FULLRES]
        xy = legacy[legacy.obs[Obs.LIBRARY_ID] == library].obsm[Obsm.SPATIAL]
        height, width = image.shape[:2]
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] < width).all()
        assert (xy[:, 1] >= 0).all() and (xy[:, 1] < height).all()
        if library != "S02":
            continue
        # The record redraws the section exactly, and its labels say where the tissue is.
        section = record["sections"][library]
        redrawn, labels = synthetic_he_image(
            (height, width),
            microns_per_pixel=record["microns_per_pixel"],
            seed=int(section["seed"]),
            style_seed=int(section["style_seed"]),
            tissue_center_um=tuple(section["tissue_center_um"]),
            tissue_radius_um=float(section["tissue_radius_um"]),
            return_labels=True,
        )
        assert np.array_equal(redrawn, image)
        centre = labels[xy[:, 1].astype(int), xy[:, 0].astype(int)]
        assert (centre != 255).all()
        assert (labels == 255).mean() > 0.1  # there is glass around the tissue
        # Glass is near-white, tissue is not.
        assert image[labels == 255].mean() > 225 and image[labels != 255].mean() < 215


def test_region_labels_match_footprints(legacy):
    morphology = legacy.obsm[Synthetic.MORPHOLOGY]
    label = legacy.obs[Obs.LABEL].astype(str)
    for region in ("tumour", "immune", "adipose"):
        inside = label == region
        assert morphology.loc[inside, region].mean() > 0.5
        assert morphology.loc[~inside, region].mean() < 0.3
    # Tumour and immune footprints are crowded with nuclei, adipose ones are not.
    density = morphology["nuclear_density"].groupby(label).mean()
    assert density["immune"] > density["stroma"] and density["tumour"] > density["stroma"]
    assert density["adipose"] < density["stroma"]


# ------------------------------------------------------------------------------------------
# image drawing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.5, 1.3, 2.0])
def test_region_equals_crop_of_larger_image(mpp):
    kwargs = {
        "seed": 7,
        "style_seed": 2,
        "microns_per_pixel": mpp,
        "tissue_center_um": (520.0, 610.0),
        "tissue_radius_um": 450.0,
        "return_labels": True,
    }
    full, labels = synthetic_he_image((900, 1100), **kwargs)
    assert (labels == 255).any() and (labels != 255).any()  # the frame shows tissue and glass
    # Regions straddling the 512-pixel drawing blocks, at the edges, tiny and odd-sized.
    for y, x, h, w in [
        (123, 457, 200, 300),
        (0, 0, 37, 41),
        (500, 600, 400, 500),
        (511, 511, 3, 3),
        (700, 1000, 200, 100),
    ]:
        region, region_labels = synthetic_he_image((h, w), origin=(y, x), **kwargs)
        assert np.array_equal(region, full[y : y + h, x : x + w])
        assert np.array_equal(region_labels, labels[y : y + h, x : x + w])


def test_blocks_drawn_alone_equal_cached_drawing():
    """Blocks drawn on their own (as a whole-slide writer does, without the lattice cache the
    in-memory drawing uses) give the same pixels."""
    from sthisto.datasets._synthetic_image import _Section, render_region

    section = _Section.create(21, 4, tissue_center_um=(300.0, 300.0), tissue_radius_um=250.0)
    full = render_region(section, 0, 0, 700, 650, 1.0)
    for y, x, h, w in [(0, 0, 700, 650), (250, 130, 300, 333), (600, 500, 100, 150)]:
        assert np.array_equal(section.render(y, x, h, w, 1.0), full[y : y + h, x : x + w])


def test_region_with_negative_origin():
    full = synthetic_he_image((300, 300), origin=(-150, -100), seed=1)
    part = synthetic_he_image((100, 120), origin=(-60, -10), seed=1)
    assert np.array_equal(part, full[90:190, 90:210])


def test_image_looks_like_he():
    image, labels = synthetic_he_image((400, 400), microns_per_pixel=1.0, seed=0, return_labels=True)
    assert image.dtype == np.uint8 and image.shape == (400, 400, 3)
    pixels = image.reshape(-1, 3).astype(float)
    labels = labels.reshape(-1)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    dark = pixels.sum(axis=1) < 330  # nuclei
    assert 0.02 < dark.mean() < 0.6
    # Haematoxylin-stained nuclei are blue-purple (blue above red), eosin stroma is pink
    # (red above green).
    assert (pixels[dark, 2] > pixels[dark, 0]).mean() > 0.9
    stroma = (labels == 0) & ~dark
    if stroma.any():
        assert (pixels[stroma, 0] > pixels[stroma, 1]).mean() > 0.9


def test_physical_size_does_not_depend_on_resolution():
    """The same seed gives the same tissue layout (in µm) at any µm per pixel."""
    _, fine = synthetic_he_image((600, 600), microns_per_pixel=1.0, seed=9, return_labels=True)
    _, coarse = synthetic_he_image((300, 300), microns_per_pixel=2.0, seed=9, return_labels=True)
    assert (fine[1::2, 1::2] == coarse).mean() > 0.95


def test_image_bad_input():
    with pytest.raises(InputError, match="microns_per_pixel"):
        synthetic_he_image((10, 10), microns_per_pixel=0)
    with pytest.raises(InputError, match="height"):
        synthetic_he_image((0, 10))
    with pytest.raises(InputError, match="go together"):
        synthetic_he_image((10, 10), tissue_radius_um=100.0)
    with pytest.raises(InputError, match="shape"):
        synthetic_he_image(10)


# ------------------------------------------------------------------------------------------
# counts
# ------------------------------------------------------------------------------------------


def test_counts_look_alike_for_both_gene_kinds(legacy):
    """Dependent and independent genes cannot be told apart by their count distributions."""
    counts = legacy.X.toarray()
    dependent = legacy.var[Synthetic.DEPENDENT].to_numpy()
    zeros = (counts == 0).mean(axis=0)
    means = counts.mean(axis=0)
    assert (zeros > 0.3).any() and (zeros < 0.05).any()  # sparse low genes and dense high ones
    assert abs(np.median(zeros[dependent]) - np.median(zeros[~dependent])) < 0.15
    assert 0.33 < np.median(means[dependent]) / np.median(means[~dependent]) < 3
    # Overdispersed: variance well above the mean for most genes.
    assert (counts.var(axis=0) > 1.5 * means).mean() > 0.8


# ------------------------------------------------------------------------------------------
# honesty: what an image model can and cannot learn
# ------------------------------------------------------------------------------------------


def _patch_statistics(patches) -> np.ndarray:
    """Simple colour and texture statistics of uint8 (N, 3, H, W) patches."""
    p = patches.numpy().astype(np.float32)
    red, green, blue = p[:, 0], p[:, 1], p[:, 2]
    total = p.sum(axis=1)
    return np.column_stack(
        [
            p.mean(axis=(2, 3)),
            p.std(axis=(2, 3)),
            (total < 330).mean(axis=(1, 2)),  # dark (nuclei)
            (total > 660).mean(axis=(1, 2)),  # white (fat, glass)
            ((blue > red + 10) & (total < 500)).mean(axis=(1, 2)),  # purple
            ((red > blue) & (green < 170)).mean(axis=(1, 2)),  # pink
            np.abs(np.diff(p, axis=2)).mean(axis=(1, 2, 3)),  # texture
            np.abs(np.diff(p, axis=3)).mean(axis=(1, 2, 3)),
        ]
    )


def test_dependent_genes_learnable_independent_not(legacy):
    """A linear model on patch statistics learns the dependent genes of an unseen section
    and nothing of the independent ones: the generator is honest."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from sthisto.pp import PatchDataset, PatchSpec

    adata = legacy
    dataset = PatchDataset(adata, spec=PatchSpec(size_px=32, size_um=100.0))
    patches, clipped = dataset.read_batch(range(adata.n_obs))
    assert not clipped.any()
    features = _patch_statistics(patches)
    counts = adata.X.toarray()
    target = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    library = adata.obs[Obs.LIBRARY_ID].to_numpy()
    dependent = adata.var[Synthetic.DEPENDENT].to_numpy()
    for held_out in adata.obs[Obs.LIBRARY_ID].cat.categories:
        train, test = library != held_out, library == held_out
        scaler = StandardScaler().fit(features[train])
        model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(scaler.transform(features[train]), target[train])
        predicted = model.predict(scaler.transform(features[test]))
        r = np.array([np.corrcoef(predicted[:, g], target[test, g])[0, 1] for g in range(adata.n_vars)])
        assert np.isfinite(r).all()
        assert r[dependent].mean() > 0.3, (held_out, r[dependent].mean())
        assert abs(r[~dependent].mean()) < 0.1, (held_out, r[~dependent].mean())
        # Not trivially perfect either: counting noise and hidden factors remain.
        assert r[dependent].max() < 0.95


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"geometry": "hexagon"}, "geometry"),
        ({"n_spots": 0}, "n_spots"),
        ({"n_spots": -5}, "n_spots"),
        ({"n_spots": 2.5}, "n_spots"),
        ({"fraction_dependent": 1.2}, "fraction_dependent"),
        ({"fraction_dependent": -0.1}, "fraction_dependent"),
        ({"microns_per_pixel": 0}, "microns_per_pixel"),
        ({"microns_per_pixel": -1.0}, "microns_per_pixel"),
        ({"microns_per_pixel": float("nan")}, "microns_per_pixel"),
        ({"n_sections": 0}, "n_sections"),
        ({"n_sections": 2, "n_patients": 3}, "n_patients"),
        ({"n_genes": 0}, "n_genes"),
        ({"n_spots": 100_000, "microns_per_pixel": 0.25}, "megapixels"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(InputError, match=match):
        synthetic(**kwargs)


def test_fraction_extremes():
    none = synthetic(n_sections=1, n_spots=30, n_genes=6, fraction_dependent=0.0, seed=1)
    assert not none.var[Synthetic.DEPENDENT].any()
    every = synthetic(n_sections=1, n_spots=30, n_genes=6, fraction_dependent=1.0, seed=1)
    assert every.var[Synthetic.DEPENDENT].all()
