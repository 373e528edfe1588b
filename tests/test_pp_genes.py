"""sthisto.pp.select_genes: given lists, the papers' per-section rule, scanpy HVG flavours."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError

SECTIONS = ["A2", "C1", "D1", "E1", "F1", "G2"]


def make_sections(n_sections=3, n_spots=120, n_genes=80, seed=0):
    """A few ST sections: NB counts on a grid, spot pixels, a small RGB image per section.

    Gene ``g_var_<s>`` is highly variable in section ``s`` only (on in half its spots);
    ``g_rare`` is highly variable but non-zero in only 12 spots overall.
    """
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes - n_sections - 1)] + [f"g_var_{s}" for s in range(n_sections)] + ["g_rare"]
    base = rng.gamma(2.0, 2.0, n_genes)
    blocks, obs, coords, spatial = [], [], [], {}
    side = int(np.ceil(np.sqrt(n_spots)))
    for s in range(n_sections):
        mean = np.tile(base, (n_spots, 1)) * rng.gamma(20.0, 1 / 20.0, (n_spots, 1))
        on = rng.random(n_spots) < 0.5
        mean[:, genes.index(f"g_var_{s}")] = np.where(on, 8.0, 0.0)
        mean[:, genes.index("g_rare")] = 0.0
        counts = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)
        if s == 0:
            counts[:12, genes.index("g_rare")] = 12.0
        blocks.append(sp.csr_matrix(counts))
        name = f"S{s}"
        col, row = np.arange(n_spots) % side, np.arange(n_spots) // side
        obs.append(
            pd.DataFrame(
                {"library_id": name, "array_col": col, "array_row": row},
                index=[f"{name}_{c}x{r}" for c, r in zip(col, row)],
            )
        )
        coords.append(np.stack([col * 100.0 + 50, row * 100.0 + 50], axis=1))
        spatial[name] = {
            "images": {"hires": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 0.05, "microns_per_pixel": 1.0, "spot_diameter_fullres": 50.0},
            "metadata": {"has_image": True},
        }
    adata = ad.AnnData(sp.vstack(blocks).tocsr(), obs=pd.concat(obs), var=pd.DataFrame(index=genes))
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"])
    adata.obsm["spatial"] = np.concatenate(coords)
    adata.uns["spatial"] = spatial
    return adata


def _snapshot(adata):
    return (adata.X.copy(), adata.var.copy(), set(adata.uns.get("sthisto", {}).get("select_genes", {})))


def _unchanged(adata, snapshot):
    x, var, records = snapshot
    assert (adata.X != x).nnz == 0
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.uns.get("sthisto", {}).get("select_genes", {})) == records


def test_given_list_keeps_order_and_never_touches_x():
    adata = make_sections()
    x_before = adata.X.copy()
    genes = ["g5", "g_var_1", "g2"]
    sthisto.pp.select_genes(adata, genes=genes)
    assert adata.var["sthisto_selected"].dtype == bool
    assert adata.var_names[adata.var["sthisto_selected"]].tolist() == ["g2", "g5", "g_var_1"]
    rec = adata.uns["sthisto"]["select_genes"]["sthisto_selected"]
    assert list(rec["genes"]) == genes  # the list's order, which a model's output follows
    assert rec["flavor"] == "given" and rec["n_selected"] == 3
    assert (adata.X != x_before).nnz == 0


def test_missing_genes_error_names_them_and_the_fix_then_ignore():
    adata = make_sections()
    snap = _snapshot(adata)
    with pytest.raises(MissingKeyError, match=r"2 of 4 genes.*NOPE1.*missing='ignore'"):
        sthisto.pp.select_genes(adata, genes=["g1", "NOPE1", "g2", "NOPE2"])
    _unchanged(adata, snap)
    sthisto.pp.select_genes(adata, genes=["g1", "NOPE1", "g2", "NOPE2"], missing="ignore")
    rec = adata.uns["sthisto"]["select_genes"]["sthisto_selected"]
    assert list(rec["genes"]) == ["g1", "g2"] and list(rec["absent"]) == ["NOPE1", "NOPE2"]


def test_per_section_union_is_the_union_of_section_hvgs_filtered_by_spots():
    adata = make_sections()
    sthisto.pp.select_genes(adata, flavor="per_section_union", n_top_genes=10, min_spots=20)
    selected = set(adata.var_names[adata.var["sthisto_selected"]])
    # Independent recomputation: scanpy 'seurat' HVG per section, union, non-zero spot filter.
    union = set()
    for lib in adata.obs["library_id"].cat.categories:
        section = adata[adata.obs["library_id"] == lib].copy()
        section = section[:, np.asarray((section.X > 0).sum(0)).ravel() > 0].copy()
        sc.pp.normalize_total(section, target_sum=1e4)
        sc.pp.log1p(section)
        sc.pp.highly_variable_genes(section, n_top_genes=10, flavor="seurat")
        union |= set(section.var_names[section.var["highly_variable"]])
    nonzero = pd.Series(np.asarray((adata.X > 0).sum(0)).ravel(), index=adata.var_names)
    assert selected == {g for g in union if nonzero[g] >= 20}
    # Each section's own variable gene is kept although it varies in one section only ...
    assert {"g_var_0", "g_var_1", "g_var_2"} <= selected
    # ... and the rare gene is variable but dropped by min_spots.
    assert "g_rare" in union and "g_rare" not in selected
    rec = adata.uns["sthisto"]["select_genes"]["sthisto_selected"]
    assert rec["flavor"] == "per_section_union" and rec["min_spots"] == 20 and rec["n_top_genes"] == 10
    assert list(rec["genes"]) == adata.var_names[adata.var["sthisto_selected"]].tolist()


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_scanpy_flavours_match_scanpy(flavor):
    adata = make_sections()
    sthisto.pp.select_genes(adata, flavor=flavor, n_top_genes=15, key_added="hvg")
    expected = adata.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, n_top_genes=15, flavor=flavor)
    np.testing.assert_array_equal(adata.var["hvg"].to_numpy(), expected.var["highly_variable"].to_numpy())
    assert adata.uns["sthisto"]["select_genes"]["hvg"]["min_spots"] == 0


def test_seurat_v3_without_scikit_misc_says_how_to_fix(monkeypatch):
    adata = make_sections()
    monkeypatch.setitem(sys.modules, "skmisc", None)
    monkeypatch.setitem(sys.modules, "skmisc.loess", None)
    snap = _snapshot(adata)
    with pytest.raises(InputError, match="pip install scikit-misc"):
        sthisto.pp.select_genes(adata, flavor="seurat_v3")
    _unchanged(adata, snap)


def test_seurat_v3_matches_scanpy_on_raw_counts():
    pytest.importorskip("skmisc")
    adata = make_sections()
    sthisto.pp.select_genes(adata, flavor="seurat_v3", n_top_genes=15)
    expected = sc.pp.highly_variable_genes(adata.copy(), n_top_genes=15, flavor="seurat_v3", inplace=False)
    np.testing.assert_array_equal(adata.var["sthisto_selected"].to_numpy(), expected["highly_variable"].to_numpy())


def test_overwrite_copy_and_bad_input_leave_the_object_unchanged():
    adata = make_sections()
    sthisto.pp.select_genes(adata, genes=["g1"])
    snap = _snapshot(adata)
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        sthisto.pp.select_genes(adata, genes=["g2"])
    bad_calls = [
        ({"flavor": "magic"}, InputError, "unknown flavor"),
        ({"genes": "g1", "key_added": "x"}, InputError, "single string"),
        ({"genes": ["g1", "g1"], "key_added": "x"}, InputError, "twice"),
        ({"min_spots": -1, "key_added": "x"}, InputError, "min_spots"),
        ({"n_top_genes": 0, "key_added": "x"}, InputError, "n_top_genes"),
        ({"layer": "raw", "key_added": "x"}, MissingKeyError, "layer 'raw'"),
    ]
    for kwargs, error, message in bad_calls:
        with pytest.raises(error, match=message):
            sthisto.pp.select_genes(adata, **kwargs)
        _unchanged(adata, snap)
    negative = adata.copy()
    negative.X.data[0] = -3
    with pytest.raises(InputError, match="negative"):
        sthisto.pp.select_genes(negative, flavor="seurat", key_added="x")
    new = sthisto.pp.select_genes(adata, genes=["g2"], copy=True, overwrite=True)
    _unchanged(adata, snap)
    assert new.var_names[new.var["sthisto_selected"]].tolist() == ["g2"]
    assert sthisto.pp.select_genes(adata, genes=["g3"], overwrite=True) is None
    assert adata.var_names[adata.var["sthisto_selected"]].tolist() == ["g3"]


def test_library_id_required_for_per_section_rule():
    adata = make_sections()
    del adata.obs["library_id"]
    with pytest.raises(MissingKeyError, match="library_id"):
        sthisto.pp.select_genes(adata)


# --------------------------------------------------------------------------- real her2st


def _read_counts_with_pandas(her2st_dir, sections):
    frames = {s: pd.read_csv(her2st_dir / "ST-cnts" / f"{s}.tsv.gz", sep="\t", index_col=0) for s in sections}
    genes = sorted(set().union(*(f.columns for f in frames.values())))
    blocks, obs = [], []
    for name, frame in frames.items():
        blocks.append(sp.csr_matrix(frame.reindex(columns=genes, fill_value=0).to_numpy(np.float32)))
        obs.append(pd.DataFrame({"library_id": name}, index=[f"{name}_{i}" for i in frame.index]))
    adata = ad.AnnData(sp.vstack(blocks).tocsr(), obs=pd.concat(obs), var=pd.DataFrame(index=genes))
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"], categories=sections)
    return adata


def _optional(module, name):
    """A public sthisto function another part of the package provides, or None while it is absent."""
    try:
        return getattr(module, name)
    except (AttributeError, ImportError):
        return None


@pytest.fixture(scope="module")
def her2st_counts(her2st_dir):
    """Six real her2st sections (no images among them), read by sthisto when it can."""
    reader = _optional(sthisto.io, "read_her2st")
    if reader is not None:
        return reader(her2st_dir, sections=SECTIONS)
    return _read_counts_with_pandas(her2st_dir, SECTIONS)


@pytest.fixture(scope="module")
def her2st_785(her2st_dir):
    shipped = _optional(sthisto.datasets, "her2st_785_genes")
    if shipped is not None:
        return list(shipped())
    return (her2st_dir / "reference" / "her2st_785_genes.txt").read_text().split()


@pytest.mark.real_data
def test_real_her2st_785_list_and_papers_rule(her2st_counts, her2st_785):
    adata = her2st_counts
    assert len(her2st_785) == 785
    sthisto.pp.select_genes(adata, genes=her2st_785, key_added="ref785")
    assert adata.var["ref785"].sum() == 785
    assert list(adata.uns["sthisto"]["select_genes"]["ref785"]["genes"]) == her2st_785

    # The papers' rule on these six sections (2,552 spots): 1000 HVGs per section, union, then
    # genes non-zero in fewer than min_spots spots dropped (1000 is for all ~36 sections).
    sthisto.pp.select_genes(adata, flavor="per_section_union", n_top_genes=1000, min_spots=500, key_added="rule")
    selected = adata.var_names[adata.var["rule"]]
    nonzero = np.asarray((adata.X[:, adata.var["rule"].to_numpy()] > 0).sum(0)).ravel()
    assert nonzero.min() >= 500
    # The rule lands on the published list far above chance: the 785 genes are 4% of the genes
    # here but about a fifth of the selection (measured 0.196 on these sections).
    share_in_selection = np.isin(selected, her2st_785).mean()
    share_overall = 785 / adata.n_vars
    assert share_in_selection > 3 * share_overall
