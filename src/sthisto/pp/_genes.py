"""Gene selection: a given list, the HER2+/cSCC papers' per-section rule, or scanpy's HVG flavours."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_record_writable, check_writable, maybe_copy, record, write
from .._constants import Obs, Var
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData

_FUNCTION = "select_genes"
_FLAVORS = ("per_section_union", "seurat_v3", "seurat", "cell_ranger")
_DEFAULT_MIN_SPOTS = {"per_section_union": 1000}
"""The papers' rule drops genes non-zero in fewer than 1000 spots; scanpy flavours do not filter."""


@checked_input(genes=True)
def select_genes(
    adata: AnnData,
    *,
    genes: Sequence[str] | None = None,
    flavor: Literal["per_section_union", "seurat_v3", "seurat", "cell_ranger"] = "per_section_union",
    n_top_genes: int = 1000,
    min_spots: int | None = None,
    missing: Literal["raise", "ignore"] = "raise",
    layer: str | None = None,
    hvg_kwargs: Mapping | None = None,
    key_added: str = Var.SELECTED,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Mark the genes a model predicts.

    Three ways:

    - ``genes=[...]``: a given list, e.g. :func:`sthisto.datasets.her2st_785_genes`, the list
      THItoGene and HGGEF use on HER2+ breast cancer. The list's order is kept in the record.
    - ``flavor="per_section_union"`` (the HER2+/cSCC papers' rule): the ``n_top_genes`` most
      variable genes of each section (scanpy's ``"seurat"`` HVG on that section's
      ``log1p(normalize_total(1e4))`` counts), united over sections; then genes non-zero in
      fewer than ``min_spots`` spots (counted over all sections) are dropped. The published
      785-gene list came from 36 sections and a different count release and cannot be
      recomputed exactly; use the shipped list to reproduce the papers.
    - ``flavor="seurat_v3"`` (HisToSGE: 1000 genes, on raw counts), ``"seurat"`` or
      ``"cell_ranger"`` (on ``log1p(normalize_total(1e4))``): scanpy's
      :func:`~scanpy.pp.highly_variable_genes` over the whole object. ``"seurat_v3"`` needs the
      ``scikit-misc`` package.

    ``X`` (or ``layer``) is never modified.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` (or ``layer``) and, for ``"per_section_union"``,
        ``obs['library_id']``.
    genes
        Gene names (``var_names``) to select. When given, ``flavor``, ``n_top_genes`` and
        ``min_spots`` are not used.
    flavor
        Rule used when ``genes`` is None, see above.
    n_top_genes
        Number of highly variable genes (per section for ``"per_section_union"``).
    min_spots
        Drop selected genes with non-zero counts in fewer than this many spots (all sections
        together). Default: 1000 for ``"per_section_union"`` (the papers' value), 0 otherwise.
    missing
        For ``genes``: ``"raise"`` (default) refuses genes absent from ``var_names``;
        ``"ignore"`` drops them and logs how many were dropped.
    layer
        Layer holding raw counts; ``None`` uses ``X``.
    hvg_kwargs
        Extra keyword arguments for :func:`scanpy.pp.highly_variable_genes` in the scanpy
        flavours, e.g. ``{"batch_key": "library_id"}``.
    key_added
        Name of the boolean ``var`` column written.
    copy
        Return a modified copy instead of writing in place.
    overwrite
        Replace an existing ``var[key_added]`` and its record.

    Returns
    -------
    ``None``, or the modified copy if ``copy=True``. Writes

    - ``var[key_added]``: boolean, True for selected genes;
    - ``uns['sthisto']['select_genes'][key_added]``: ``flavor`` (``"given"`` for a list), the
      parameters, ``n_selected`` and ``genes`` (the selected genes, in list order for a given
      list, in ``var`` order otherwise).

    Examples
    --------
    >>> sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
    >>> sthisto.pp.select_genes(adata, flavor="seurat_v3", n_top_genes=1000, key_added="hvg")
    """
    counts = _counts(adata, layer)
    if missing not in ("raise", "ignore"):
        raise InputError(f"missing={missing!r}; use 'raise' (default) or 'ignore'.")
    if not adata.var_names.is_unique:
        duplicated = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"var_names are not unique (e.g. {duplicated}); genes are selected by name. "
            f"Run adata.var_names_make_unique() first."
        )
    hvg_kwargs = dict(hvg_kwargs or {})
    if genes is not None:
        if isinstance(genes, str):
            raise InputError(f"genes={genes!r} is a single string; pass a list of gene names, e.g. [{genes!r}].")
        selected, params = _given(adata, list(genes), missing=missing)
    else:
        if flavor not in _FLAVORS:
            raise InputError(f"unknown flavor={flavor!r}; use one of {list(_FLAVORS)}, or pass genes=[...].")
        if int(n_top_genes) != n_top_genes or n_top_genes < 1:
            raise InputError(f"n_top_genes={n_top_genes!r} must be a positive integer.")
        min_spots = _DEFAULT_MIN_SPOTS.get(flavor, 0) if min_spots is None else min_spots
        if int(min_spots) != min_spots or min_spots < 0:
            raise InputError(f"min_spots={min_spots!r} must be a non-negative integer.")
        if flavor == "per_section_union" and Obs.LIBRARY_ID not in adata.obs:
            raise MissingKeyError(
                "flavor='per_section_union' selects genes per section, but adata.obs['library_id'] "
                "is missing. Add it, or use a scanpy flavor such as flavor='seurat_v3'."
            )
        if flavor == "seurat_v3":
            _require_skmisc()
        _check_counts(counts)
        params = {"n_top_genes": int(n_top_genes), "min_spots": int(min_spots), "layer": layer}
        if flavor == "per_section_union":
            mask = _per_section_union(adata, counts, int(n_top_genes))
        else:
            mask = _scanpy_hvg(adata, counts, flavor, int(n_top_genes), hvg_kwargs)
            params["hvg_kwargs"] = hvg_kwargs
        mask &= _nonzero_spots(counts) >= min_spots
        selected = adata.var_names[mask].tolist()
        if not selected:
            raise InputError(
                f"no gene passed the selection (flavor={flavor!r}, n_top_genes={n_top_genes}, "
                f"min_spots={min_spots}); lower min_spots (the object has {adata.n_obs} spots)."
            )
    check_writable(adata, "var", key_added, overwrite=overwrite)
    check_record_writable(adata, _FUNCTION, key_added, overwrite=overwrite)

    adata = maybe_copy(adata, copy)
    column = np.zeros(adata.n_vars, dtype=bool)
    column[adata.var_names.get_indexer(selected)] = True
    write(adata, "var", key_added, column, overwrite=overwrite)
    record(
        adata,
        _FUNCTION,
        key_added,
        {"flavor": "given" if genes is not None else flavor, **params, "n_selected": len(selected), "genes": selected},
        overwrite=overwrite,
    )
    logger.info("selected %d genes into var[%r]", len(selected), key_added)
    return adata if copy else None


def _counts(adata, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise MissingKeyError("adata.X is empty; pass layer='<name of the raw-count layer>'.")
        return adata.X
    if layer not in adata.layers:
        raise MissingKeyError(f"layer {layer!r} is not in adata.layers (it has {list(adata.layers)}).")
    return adata.layers[layer]


def _given(adata, genes: list[str], *, missing: str) -> tuple[list[str], dict]:
    if not genes:
        raise InputError("genes=[] is empty; pass the gene names to select.")
    counts = pd.Series(genes).value_counts()
    duplicates = counts.index[counts > 1].tolist()
    if duplicates:
        raise InputError(f"genes lists {len(duplicates)} names twice (e.g. {duplicates[:5]}); remove the repeats.")
    present = adata.var_names.get_indexer(genes) >= 0
    absent = [g for g, ok in zip(genes, present) if not ok]
    if absent and missing == "raise":
        raise MissingKeyError(
            f"{len(absent)} of {len(genes)} genes are not in adata.var_names (e.g. {absent[:5]}). "
            f"Check the gene naming (symbols vs. Ensembl ids, e.g. var['gene_symbol']), or pass "
            f"missing='ignore' to select only the {len(genes) - len(absent)} present ones."
        )
    selected = [g for g, ok in zip(genes, present) if ok]
    if not selected:
        raise MissingKeyError(
            f"none of the {len(genes)} genes is in adata.var_names (e.g. {genes[:5]} vs. "
            f"{adata.var_names[:5].tolist()}); check the gene naming."
        )
    if absent:
        logger.warning(
            "select_genes: %d of %d genes are absent from the data and were dropped (e.g. %s)",
            len(absent),
            len(genes),
            absent[:5],
        )
    return selected, {"missing": missing, "n_requested": len(genes), "absent": absent}


def _check_counts(counts) -> None:
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise InputError(
            "the count matrix holds NaN, infinite or negative values; gene selection expects raw "
            "counts. Pass layer='<raw counts layer>' if X holds normalised values."
        )


def _nonzero_spots(counts) -> np.ndarray:
    if sp.issparse(counts):
        return np.asarray((counts != 0).sum(axis=0)).ravel()
    return np.count_nonzero(np.asarray(counts), axis=0)


def _require_skmisc() -> None:
    try:
        import skmisc.loess  # noqa: F401
    except ImportError as err:
        raise InputError(
            "flavor='seurat_v3' fits a LOESS curve with the scikit-misc package, which is not "
            "installed. Install it (pip install scikit-misc) or use flavor='seurat'."
        ) from err


def _log_normalised(counts, var_names) -> object:
    """A throw-away AnnData holding log1p(normalize_total(counts, 1e4)), as scanpy's HVG expects."""
    import anndata as ad
    import scanpy as sc

    matrix = counts.astype(np.float32, copy=True)
    tmp = ad.AnnData(matrix, var=pd.DataFrame(index=var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty spots: scanpy warns, their row stays zero
        sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp


def _per_section_union(adata, counts, n_top_genes: int) -> np.ndarray:
    import scanpy as sc

    libraries = adata.obs[Obs.LIBRARY_ID].astype(str).to_numpy()
    union = np.zeros(adata.n_vars, dtype=bool)
    for library in pd.unique(libraries):
        rows = np.flatnonzero(libraries == library)
        section = counts[rows]
        expressed = _nonzero_spots(section) > 0
        if expressed.sum() == 0:
            logger.warning("select_genes: section %r has no counts; it adds no genes", library)
            continue
        # Genes never seen in the section can't be variable there; leaving them out keeps
        # scanpy's mean bins well-defined on sparse sections.
        tmp = _log_normalised(section[:, expressed], adata.var_names[expressed])
        n_top = min(n_top_genes, int(expressed.sum()))
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, flavor="seurat")
        union[np.flatnonzero(expressed)[tmp.var["highly_variable"].to_numpy()]] = True
    return union


def _scanpy_hvg(adata, counts, flavor: str, n_top_genes: int, hvg_kwargs: dict) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    if n_top_genes > adata.n_vars:
        raise InputError(f"n_top_genes={n_top_genes} exceeds the {adata.n_vars} genes in the data.")
    if flavor == "seurat_v3":
        tmp = ad.AnnData(counts.astype(np.float32, copy=True), var=pd.DataFrame(index=adata.var_names))
    else:
        tmp = _log_normalised(counts, adata.var_names)
    tmp.obs = adata.obs.copy()  # batch_key in hvg_kwargs refers to obs columns
    try:
        result = sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=flavor, inplace=False, **hvg_kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(
            f"scanpy's highly_variable_genes(flavor={flavor!r}) failed: {err}. Check hvg_kwargs, "
            f"or try another flavor (e.g. 'seurat_v3' on raw counts)."
        ) from err
    return np.asarray(result["highly_variable"], dtype=bool)
