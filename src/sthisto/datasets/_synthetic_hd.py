"""Synthetic high-resolution data: Visium-HD-like square bins and Xenium-like transcripts.

Both follow a smooth random expression field over a synthetic H&E image, so
:func:`sthisto.pp.pool` can be tested (and shown) without downloads: pooled counts must equal
the sum of the bins or transcripts inside each footprint.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from anndata import AnnData

from .._anndata import record
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError

SOURCE_BINS = "sthisto.datasets.synthetic_bins"
SOURCE_TRANSCRIPTS = "sthisto.datasets.synthetic_transcripts"


def _check(name: str, value, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}={value!r} must be a positive number.")
    if not (math.isfinite(value) and value > 0) or (integer and int(value) != value):
        raise InputError(f"{name}={value!r} must be a positive {'integer' if integer else 'finite number'}.")
    return float(value)


def _rates(x_um: np.ndarray, y_um: np.ndarray, n_genes: int, extent_um: float, rng) -> np.ndarray:
    """Per-gene expression intensity at points (µm): a few smooth cosine waves per gene."""
    out = np.empty((len(x_um), n_genes))
    for g in range(n_genes):
        kx, ky = rng.uniform(0.5, 3.0, size=2) * 2 * math.pi / extent_um
        phase = rng.uniform(0, 2 * math.pi)
        out[:, g] = np.exp(0.8 * np.cos(kx * x_um + ky * y_um + phase) + rng.normal(0, 0.5))
    return out


def synthetic_bins(
    *,
    extent_um: float = 400.0,
    bin_um: float = 8.0,
    n_genes: int = 20,
    mean_counts: float = 0.5,
    microns_per_pixel: float = 2.0,
    seed: int = 0,
) -> AnnData:
    """A Visium-HD-like section: square bins of counts over a synthetic H&E image.

    Parameters
    ----------
    extent_um
        Side of the square capture area in µm.
    bin_um
        Bin side in µm (Visium HD: 2, 8 or 16).
    n_genes
        Number of genes.
    mean_counts
        Average count per bin and gene, scaled by the bin's area relative to 8 µm bins.
    microns_per_pixel
        Resolution of the synthetic image.
    seed
        Random seed (counts and image).

    Returns
    -------
    AnnData in the layout :func:`sthisto.io.read_visium` gives for a Visium HD bin folder:
    ``X`` integer counts (CSR float32); ``obs`` ``library_id`` (``"HD01"``), ``array_row`` /
    ``array_col`` (bin indices); ``obsm['spatial']`` bin centres in pixels;
    ``uns['spatial']['HD01']`` with ``images['fullres']`` / ``['hires']`` and scale factors
    ``microns_per_pixel``, ``spot_spacing_um`` (= ``bin_um``) and ``spot_diameter_fullres``.

    Examples
    --------
    >>> bins = sthisto.datasets.synthetic_bins(bin_um=8)
    >>> spots = sthisto.pp.pool(bins, size_um=55, grid="hex")
    """
    import anndata as ad
    import scipy.sparse as sp

    from ._synthetic_image import synthetic_he_image

    extent_um, bin_um = _check("extent_um", extent_um), _check("bin_um", bin_um)
    mpp, mean_counts = _check("microns_per_pixel", microns_per_pixel), _check("mean_counts", mean_counts)
    n_genes = int(_check("n_genes", n_genes, integer=True))
    n_side = int(extent_um // bin_um)
    if n_side < 2 or n_side * n_side > 2_000_000:
        raise InputError(f"extent_um / bin_um = {extent_um / bin_um:.0f} bins per side; use 2 to ~1400.")
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x_um, y_um = (cols + 0.5) * bin_um, (rows + 0.5) * bin_um
    rate = _rates(x_um, y_um, n_genes, extent_um, rng)
    rate *= mean_counts * (bin_um / 8.0) ** 2 / rate.mean()
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    side_px = int(math.ceil(n_side * bin_um / mpp))
    image = synthetic_he_image((side_px, side_px), microns_per_pixel=mpp, seed=seed)
    library = "HD01"
    obs = pd.DataFrame(
        {
            Obs.LIBRARY_ID: pd.Categorical([library] * len(rows)),
            Obs.ARRAY_ROW: rows.astype(np.int64),
            Obs.ARRAY_COL: cols.astype(np.int64),
        },
        index=pd.Index([f"s_{bin_um:03.0f}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]),
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index([f"gene{g:03d}" for g in range(n_genes)])))
    adata.obsm[Obsm.SPATIAL] = np.column_stack([x_um, y_um]) / mpp
    adata.uns[Uns.SPATIAL] = {
        library: {
            Uns.IMAGES: {Images.FULLRES: image, Images.HIRES: image},
            Uns.SCALEFACTORS: {
                ScaleFactors.MICRONS_PER_PIXEL: mpp,
                ScaleFactors.SPOT_SPACING_UM: bin_um,
                ScaleFactors.SPOT_DIAMETER: bin_um / mpp,
                ScaleFactors.HIRES: 1.0,
            },
            Uns.METADATA: {Metadata.HAS_IMAGE: True, Metadata.SOURCE: SOURCE_BINS},
        }
    }
    params = {"extent_um": extent_um, "bin_um": bin_um, "n_genes": n_genes, "mean_counts": mean_counts}
    record(adata, "synthetic_bins", library, {**params, "microns_per_pixel": mpp, "seed": seed})
    return adata


def synthetic_transcripts(
    *,
    extent_um: float = 400.0,
    n_genes: int = 20,
    density: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Xenium-like transcripts: one row per detected molecule, in µm.

    Parameters
    ----------
    extent_um
        Side of the square area in µm.
    n_genes
        Number of genes.
    density
        Mean transcripts per µm² (all genes together).
    seed
        Random seed.

    Returns
    -------
    DataFrame with Xenium's columns ``x_location``, ``y_location`` (µm) and ``feature_name``
    (categorical gene name), in random order.

    Examples
    --------
    >>> molecules = sthisto.datasets.synthetic_transcripts()
    >>> spots = sthisto.pp.pool(molecules, size_um=55, grid="hex")
    """
    extent_um, density = _check("extent_um", extent_um), _check("density", density)
    n_genes = int(_check("n_genes", n_genes, integer=True))
    n = int(round(density * extent_um * extent_um))
    if n > 20_000_000:
        raise InputError(f"{n:,} transcripts requested; lower density or extent_um.")
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, extent_um, size=(2, n))
    weights = _rates(x, y, n_genes, extent_um, rng)
    cumulative = np.cumsum(weights, axis=1)
    draw = rng.uniform(0, 1, size=n) * cumulative[:, -1]
    genes = (cumulative < draw[:, None]).sum(axis=1)
    names = [f"gene{g:03d}" for g in range(n_genes)]
    return pd.DataFrame(
        {"x_location": x, "y_location": y, "feature_name": pd.Categorical.from_codes(genes, categories=names)}
    )
