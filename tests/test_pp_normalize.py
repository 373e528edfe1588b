"""sthisto.pp.normalize / normalize_counts: the methods' target transforms and size factors."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError


def make_sections(n_sections=2, n_spots=50, n_genes=30, seed=0, sparse=True):
    """Small ST sections: NB counts (a few empty spots), grid and pixel coordinates, an image each."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(1.5, 3.0, n_genes)
    counts = rng.negative_binomial(3, 3 / (3 + mean), (n_sections * n_spots, n_genes)).astype(np.float32)
    libraries = np.repeat([f"S{s}" for s in range(n_sections)], n_spots)
    col, row = np.tile(np.arange(n_spots) % 10, n_sections), np.tile(np.arange(n_spots) // 10, n_sections)
    obs = pd.DataFrame(
        {"library_id": pd.Categorical(libraries), "array_col": col, "array_row": row},
        index=[f"{lib}_{c}x{r}" for lib, c, r in zip(libraries, col, row)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts) if sparse else counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    )
    adata.obsm["spatial"] = np.stack([col * 100.0 + 60, row * 100.0 + 60], axis=1)
    adata.uns["spatial"] = {
        f"S{s}": {
            "images": {"hires": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 0.04, "microns_per_pixel": 1.0},
        }
        for s in range(n_sections)
    }
    adata.var["sel"] = np.arange(n_genes) < n_genes // 2
    return adata


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _expected(counts, denominator, scale, log):
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(denominator[:, None] > 0, counts / denominator[:, None] * scale, 0.0)
    return log(1 + scaled)


@pytest.mark.parametrize("sparse", [True, False])
def test_log10_1e4_uses_selected_gene_denominator(sparse):
    adata = make_sections(sparse=sparse)
    counts = _dense(adata.X).astype(np.float64)
    sel = adata.var["sel"].to_numpy()
    counts[3, sel] = 0  # a spot with no selected-gene counts (other genes non-zero)
    adata.X = sp.csr_matrix(counts.astype(np.float32)) if sparse else counts.astype(np.float32)
    sthisto.pp.normalize(adata, genes="sel")
    layer = adata.layers["sthisto_target"]
    assert sp.issparse(layer) == sparse and layer.dtype == np.float32
    expected = _expected(counts, counts[:, sel].sum(1), 1e4, np.log10)
    np.testing.assert_allclose(_dense(layer), expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(_dense(layer)).all() and not _dense(layer)[3].any()
    rec = adata.uns["sthisto"]["normalize"]["sthisto_target"]
    assert rec["variant"] == "log10_1e4" and rec["denominator"] == "selected" and rec["log"] == "log10"
    assert list(rec["genes"]) == adata.var_names[sel].tolist() and rec["n_empty_spots"] == 1
    # Size factors: selected-gene library size over its median within the section.
    size = counts[:, sel].sum(1)
    factors = adata.obs["sthisto_target_size_factor"].to_numpy()
    for lib in ("S0", "S1"):
        rows = (adata.obs["library_id"] == lib).to_numpy()
        positive = size[rows] > 0
        np.testing.assert_allclose(factors[rows], size[rows] / np.median(size[rows][positive]), rtol=1e-6)
    assert factors[3] == 0


def test_ln_1e6_and_gene_list():
    adata = make_sections()
    genes = ["g3", "g1", "g7"]
    sthisto.pp.normalize(adata, variant="ln_1e6", genes=genes, key_added="t")
    counts = _dense(adata.X).astype(np.float64)
    denominator = counts[:, [3, 1, 7]].sum(1)
    np.testing.assert_allclose(_dense(adata.layers["t"]), _expected(counts, denominator, 1e6, np.log), rtol=1e-5)
    assert list(adata.uns["sthisto"]["normalize"]["t"]["genes"]) == genes


def test_log1p_total_matches_scanpy_and_the_pure_function():
    adata = make_sections()
    sthisto.pp.normalize(adata, variant="log1p_1e4_total", genes="sel", key_added="histosge")
    expected = adata.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    np.testing.assert_allclose(_dense(adata.layers["histosge"]), _dense(expected.X), rtol=1e-5, atol=1e-6)
    # The engine's transform (counts of the selected genes + total over all genes) is the same.
    sel = adata.var["sel"].to_numpy()
    total = np.asarray(adata.X.sum(1)).ravel()
    pure = sthisto.pp.normalize_counts(adata.X[:, sel], "log1p_1e4_total", library_size=total)
    np.testing.assert_allclose(_dense(pure), _dense(adata.layers["histosge"])[:, sel], rtol=1e-5, atol=1e-6)
    assert adata.uns["sthisto"]["normalize"]["histosge"]["denominator"] == "total"


@pytest.mark.parametrize("variant", ["log10_1e4", "ln_1e6"])
def test_pure_function_equals_the_layer_on_selected_genes(variant):
    adata = make_sections()
    sthisto.pp.normalize(adata, variant=variant, genes="sel")
    sel = adata.var["sel"].to_numpy()
    dense_counts = _dense(adata.X)[:, sel]
    for counts in (dense_counts, sp.csr_matrix(dense_counts)):
        pure = sthisto.pp.normalize_counts(counts, variant)
        assert sp.issparse(pure) == sp.issparse(counts)
        np.testing.assert_array_equal(_dense(pure), _dense(adata.layers["sthisto_target"])[:, sel])


def test_bad_counts_are_named_and_leave_the_object_unchanged():
    adata = make_sections(sparse=False)
    adata.X[5, 2] = np.nan
    adata.X[7, 4] = -1
    before = adata.copy()
    with pytest.raises(InputError, match=r"1 NaN or infinite values in 1 spots.*S0_5x0.*'g2'"):
        sthisto.pp.normalize(adata)
    assert "sthisto_target" not in adata.layers and "sthisto" not in adata.uns
    assert list(adata.obs.columns) == list(before.obs.columns)
    adata.X[5, 2] = 1
    with pytest.raises(InputError, match=r"negative.*S0_7x0"):
        sthisto.pp.normalize(adata)
    with pytest.raises(InputError, match="negative"):
        sthisto.pp.normalize_counts(sp.csr_matrix(adata.X))


def test_non_integer_counts_warn_but_work():
    adata = make_sections()
    adata.X = adata.X * np.float32(0.5)
    with pytest.warns(UserWarning, match="non-integer"):
        sthisto.pp.normalize(adata)
    assert np.isfinite(_dense(adata.layers["sthisto_target"])).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sthisto.pp.normalize_counts(np.array([[1, 2], [0, 0]]))  # integers: no warning


def test_keys_refused_without_overwrite_and_bad_arguments():
    adata = make_sections()
    sthisto.pp.normalize(adata)
    snapshot = adata.layers["sthisto_target"].copy(), adata.obs.copy()
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        sthisto.pp.normalize(adata, variant="ln_1e6")
    for kwargs, error, message in [
        ({"variant": "log2", "key_added": "x"}, InputError, "unknown variant"),
        ({"genes": "nope", "key_added": "x"}, MissingKeyError, "select_genes"),
        ({"genes": ["g1", "zzz"], "key_added": "x"}, MissingKeyError, "zzz"),
        ({"genes": "array_col", "key_added": "x"}, MissingKeyError, "not a column of adata.var"),
        ({"layer": "counts", "key_added": "x"}, MissingKeyError, "layer 'counts'"),
    ]:
        with pytest.raises(error, match=message):
            sthisto.pp.normalize(adata, **kwargs)
    adata.var["not_bool"] = 1
    with pytest.raises(InputError, match="boolean"):
        sthisto.pp.normalize(adata, genes="not_bool", key_added="x")
    assert list(adata.layers) == ["sthisto_target"]
    assert (adata.layers["sthisto_target"] != snapshot[0]).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, snapshot[1])
    new = sthisto.pp.normalize(adata, variant="ln_1e6", overwrite=True, copy=True)
    assert new.uns["sthisto"]["normalize"]["sthisto_target"]["variant"] == "ln_1e6"
    assert adata.uns["sthisto"]["normalize"]["sthisto_target"]["variant"] == "log10_1e4"


def test_record_survives_h5ad_round_trip(tmp_path):
    adata = make_sections()
    sthisto.pp.normalize(adata, genes="sel")
    del adata.uns["spatial"]
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    rec = back.uns["sthisto"]["normalize"]["sthisto_target"]
    assert rec["variant"] == "log10_1e4" and list(rec["genes"]) == adata.var_names[adata.var["sel"]].tolist()


# --------------------------------------------------------------------------- real her2st


@pytest.mark.real_data
def test_real_her2st_counts(her2st_dir):
    """Targets of one real section against a direct computation from the published table."""
    frame = pd.read_csv(her2st_dir / "ST-cnts" / "C1.tsv.gz", sep="\t", index_col=0)
    genes = (her2st_dir / "reference" / "her2st_785_genes.txt").read_text().split()
    try:
        adata = sthisto.io.read_her2st(her2st_dir, sections=["C1"])
    except (AttributeError, ImportError):
        adata = ad.AnnData(sp.csr_matrix(frame.to_numpy(np.float32)), var=pd.DataFrame(index=frame.columns))
        adata.obs_names = [f"C1_{i}" for i in frame.index]
        adata.obs["library_id"] = pd.Categorical(["C1"] * adata.n_obs)
    sthisto.pp.select_genes(adata, genes=genes)
    sthisto.pp.normalize(adata, genes="sthisto_selected")
    selected = frame[genes].to_numpy(np.float64)
    expected = _expected(selected, selected.sum(1), 1e4, np.log10)
    rows = adata.obs_names.get_indexer([f"C1_{i}" for i in frame.index])
    layer = _dense(adata[:, genes].layers["sthisto_target"])[rows]
    np.testing.assert_allclose(layer, expected, rtol=1e-5, atol=1e-6)
    # C1 has spots without any count in the 785 genes: they stay all-zero, not NaN.
    empty = selected.sum(1) == 0
    assert empty.sum() == adata.uns["sthisto"]["normalize"]["sthisto_target"]["n_empty_spots"] > 0
    assert not layer[empty].any() and np.isfinite(layer).all()
    factors = adata.obs["sthisto_target_size_factor"].to_numpy()[rows]
    assert np.median(factors[~empty]) == pytest.approx(1.0) and not factors[empty].any()
    library_size = selected.sum(1)
    np.testing.assert_allclose(factors, library_size / np.median(library_size[~empty]), rtol=1e-6)
