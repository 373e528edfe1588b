"""Target normalisation of counts, as the methods define it, plus size factors for count losses.

The transforms live in :func:`normalize_counts`, a pure function on a count matrix, so that the
training engine applies exactly the transform :func:`normalize` writes into AnnData.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_record_writable, check_writable, maybe_copy, record, write
from .._constants import Layers, Obs
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import ArrayLike
    from scipy.sparse import csr_matrix, sparray, spmatrix

_FUNCTION = "normalize"

Variant = Literal["log10_1e4", "ln_1e6", "log1p_1e4_total", "log10_1e4_total"]

VARIANTS: dict[str, dict] = {
    "log10_1e4": {"scale": 1e4, "log": "log10", "denominator": "selected"},
    "ln_1e6": {"scale": 1e6, "log": "ln", "denominator": "selected"},
    "log1p_1e4_total": {"scale": 1e4, "log": "ln", "denominator": "total"},
    "log10_1e4_total": {"scale": 1e4, "log": "log10", "denominator": "total"},
}
"""Each variant's scale, logarithm and which genes its per-spot denominator sums over.

- ``log10_1e4``: THItoGene / HGGEF released code and results (default).
- ``ln_1e6``: the THItoGene paper's text.
- ``log1p_1e4_total``: HisToSGE, scanpy's ``normalize_total(1e4)`` over all genes + ``log1p``.
- ``log10_1e4_total``: the HistoSPACE authors' code (scprep's library-size normalisation to
  1e4 over all genes, then ``log10(1 + x)``).
"""


def size_factor_column(key_added: str) -> str:
    """``obs`` column of the size factors written by :func:`normalize` under ``key_added``."""
    return f"{key_added}_size_factor"


def check_counts(counts, *, spot_names: Sequence[str] | None = None, gene_names: Sequence[str] | None = None) -> None:
    """Validate a count matrix: refuse NaN, infinite and negative values; warn on non-integers.

    Non-integer values are accepted with a :class:`UserWarning` because the transforms are
    defined for any non-negative value (ambient-corrected counts are fractional); count-based
    losses (ZINB) are where integers matter.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` NumPy array or SciPy sparse matrix.
    spot_names, gene_names
        Names used in the error message to say where bad values are.

    Raises
    ------
    InputError
        With the number of bad values and a few of their (spot, gene) positions.
    """
    sparse = sp.issparse(counts)
    if sparse:
        counts = counts.tocsr()
        values = counts.data
    else:
        array = np.asarray(counts)
        if array.ndim != 2:
            raise InputError(f"counts have shape {array.shape}; expected a 2-d (spots, genes) matrix.")
        values = array.ravel()
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise InputError(f"counts have dtype {values.dtype}; expected real numbers.")
    if values.size == 0:
        return
    for problem, bad in (("NaN or infinite", ~np.isfinite(values)), ("negative", values < 0)):
        if problem == "negative":
            bad &= np.isfinite(values)
        n_bad = int(bad.sum())
        if not n_bad:
            continue
        where = np.flatnonzero(bad)[:5]
        if sparse:
            rows = np.searchsorted(counts.indptr, where, side="right") - 1
            positions = [(int(r), int(counts.indices[i])) for r, i in zip(rows, where)]
        else:
            n_genes = np.asarray(counts).shape[1]
            positions = [(int(i // n_genes), int(i % n_genes)) for i in where]
        named = [
            (spot_names[r] if spot_names is not None else r, gene_names[c] if gene_names is not None else c)
            for r, c in positions
        ]
        n_spots = len({r for r, _ in positions}) if n_bad <= 5 else None
        raise InputError(
            f"the counts hold {n_bad} {problem} values"
            + (f" in {n_spots} spots" if n_spots is not None else "")
            + f", e.g. at (spot, gene) {named}. Targets are computed from raw non-negative counts: "
            f"drop or fix those spots/genes, or pass layer='<raw counts layer>' if X is not raw counts."
        )
    if np.issubdtype(values.dtype, np.integer):
        return
    n_frac = int(np.count_nonzero(values != np.round(values)))
    if n_frac:
        warnings.warn(
            f"the counts hold {n_frac} non-integer values; the normalisation is applied anyway. If "
            f"these are not raw counts (e.g. already normalised), pass the raw-count layer instead.",
            UserWarning,
            stacklevel=3,
        )


def normalize_counts(
    counts: ArrayLike | spmatrix | sparray,
    variant: Variant = "log10_1e4",
    *,
    library_size: ArrayLike | None = None,
    validate: bool = True,
) -> np.ndarray | csr_matrix:
    """Apply a method's target transform to a count matrix, without AnnData.

    ``value = log(1 + counts / library_size × scale)``, and 0 for every gene of a spot whose
    ``library_size`` is 0 (no NaN).

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` counts (NumPy array or SciPy sparse matrix).
    variant
        ``"log10_1e4"`` (THItoGene/HGGEF released code, default): scale 1e4, ``log10``.
        ``"ln_1e6"`` (THItoGene paper text): scale 1e6, natural log.
        ``"log1p_1e4_total"`` (HisToSGE, scanpy): scale 1e4, natural log.
        ``"log10_1e4_total"`` (HistoSPACE authors' code): scale 1e4, ``log10``.
    library_size
        Per-spot denominator, shape ``(n_spots,)``. Default: the row sums of ``counts``, which is
        the right denominator for ``log10_1e4``/``ln_1e6`` when ``counts`` holds the selected
        genes. For ``log1p_1e4_total`` and ``log10_1e4_total`` pass the total over *all* genes
        when ``counts`` is a subset.
    validate
        Check for NaN/infinite/negative values (see :func:`check_counts`).

    Returns
    -------
    float32 matrix of the same shape: a NumPy array for dense input, CSR for sparse input
    (zeros stay zeros, so sparsity is preserved).

    Examples
    --------
    >>> target = normalize_counts(counts[:, selected], "log10_1e4")
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant={variant!r}; use one of {list(VARIANTS)}.")
    if validate:
        check_counts(counts)
    spec = VARIANTS[variant]
    sparse = sp.issparse(counts)
    if sparse:
        matrix = sp.csr_matrix(counts)
        if not matrix.has_canonical_format:  # duplicate entries must be summed before the log
            matrix = matrix.copy()
            matrix.sum_duplicates()
    else:
        matrix = np.asarray(counts)
    if matrix.ndim != 2:
        raise InputError(f"counts have shape {matrix.shape}; expected a 2-d (spots, genes) matrix.")
    if library_size is None:
        library_size = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    library_size = np.asarray(library_size, dtype=np.float64).ravel()
    if library_size.shape[0] != matrix.shape[0]:
        raise InputError(f"library_size has {library_size.shape[0]} values for {matrix.shape[0]} spots.")
    if not np.isfinite(library_size).all() or (library_size < 0).any():
        raise InputError("library_size holds NaN, infinite or negative values; it must be per-spot count sums.")
    # Spots with nothing to divide by stay all-zero instead of becoming NaN.
    factor = np.divide(spec["scale"], library_size, out=np.zeros_like(library_size), where=library_size > 0)
    # Sparse and dense inputs go through the same float64 arithmetic, so they agree bit for bit.
    if sparse:
        values = _log_transform(matrix.data.astype(np.float64) * np.repeat(factor, np.diff(matrix.indptr)), spec)
        out = sp.csr_matrix((values, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape)
        if not values.all():
            out.eliminate_zeros()
        return out
    return _log_transform(matrix.astype(np.float64) * factor[:, None], spec)


def _log_transform(scaled: np.ndarray, spec: dict) -> np.ndarray:
    out = np.log1p(scaled)
    if spec["log"] == "log10":
        out /= np.log(10.0)
    return out.astype(np.float32)


def size_factors(library_size: ArrayLike, groups: ArrayLike | None = None) -> np.ndarray:
    """Library size divided by its median within each group (section), for count losses.

    The median is taken over spots with a positive library size, so that a section with many
    empty spots still gets a finite scale; empty spots get a size factor of 0.

    Parameters
    ----------
    library_size
        Per-spot sums of the selected genes' counts.
    groups
        Per-spot section labels; ``None`` treats all spots as one section.

    Returns
    -------
    float32 array of size factors.
    """
    library_size = np.asarray(library_size, dtype=np.float64).ravel()
    groups = np.zeros(library_size.shape[0], dtype=int) if groups is None else np.asarray(groups)
    out = np.zeros_like(library_size)
    for group in pd.unique(groups):
        rows = groups == group
        positive = library_size[rows] > 0
        if positive.any():
            out[rows] = library_size[rows] / np.median(library_size[rows][positive])
    return out.astype(np.float32)


@checked_input(genes=True)
def normalize(
    adata: AnnData,
    *,
    variant: Variant = "log10_1e4",
    genes: str | Sequence[str] | None = None,
    layer: str | None = None,
    key_added: str = Layers.NORMALIZED,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Write a method's target transform of the counts into a new layer, with size factors.

    The layer covers every gene of ``var``; a model trains on the selected genes only. For
    ``"log10_1e4"`` and ``"ln_1e6"`` each spot's denominator is the sum of its *selected*
    genes' counts, and non-selected genes are scaled by the same denominator (so the selected
    genes' values are exactly the methods' target and the other genes are on the same scale).
    For ``"log1p_1e4_total"`` the denominator is the total over all genes (scanpy's
    :func:`~scanpy.pp.normalize_total` with ``target_sum=1e4``, then :func:`~scanpy.pp.log1p`);
    ``"log10_1e4_total"`` uses the same denominator with ``log10``. A spot whose denominator is 0 stays all-zero. Sparse counts give a sparse layer.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` (or ``layer``).
    variant
        ``"log10_1e4"`` (default; THItoGene and HGGEF released code and results): selected-gene
        counts / their sum × 1e4, then ``log10(1 + x)``. ``"ln_1e6"`` (THItoGene paper text):
        × 1e6, natural log. ``"log1p_1e4_total"`` (HisToSGE): ``normalize_total(1e4)`` over all
        genes, then natural ``log1p``. ``"log10_1e4_total"`` (HistoSPACE authors' code): the
        same denominator and scale, then ``log10(1 + x)``.
    genes
        The selected genes: ``None`` (all genes of ``var``), the name of a boolean ``var``
        column (e.g. ``"sthisto_selected"`` written by :func:`select_genes`), or a list of
        names.
    layer
        Layer holding raw counts; ``None`` uses ``X``.
    key_added
        Name of the layer written.
    copy
        Return a modified copy instead of writing in place.
    overwrite
        Replace existing outputs of the same ``key_added``.

    Returns
    -------
    ``None``, or the modified copy if ``copy=True``. Writes

    - ``layers[key_added]``: float32 targets for all genes (sparse if the counts are);
    - ``obs[f"{key_added}_size_factor"]``: selected-gene library size / its median within the
      spot's section (``obs['library_id']``; one section if absent), 0 for empty spots;
    - ``uns['sthisto']['normalize'][key_added]``: ``variant``, ``scale``, ``log``,
      ``denominator`` (``"selected"`` or ``"total"``), ``genes`` (the selected genes, in
      ``var`` order or list order), ``source_layer``, ``n_empty_spots``.

    Examples
    --------
    >>> sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
    >>> sthisto.pp.normalize(adata, genes="sthisto_selected")  # layers['sthisto_target']
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant={variant!r}; use one of {list(VARIANTS)}.")
    counts = _source(adata, layer)
    selected = _selected_genes(adata, genes)
    factor_key = size_factor_column(key_added)
    check_writable(adata, "layers", key_added, overwrite=overwrite)
    check_writable(adata, "obs", factor_key, overwrite=overwrite)
    check_record_writable(adata, _FUNCTION, key_added, overwrite=overwrite)
    check_counts(counts, spot_names=adata.obs_names, gene_names=adata.var_names)

    indicator = np.zeros(adata.n_vars, dtype=np.float64)
    indicator[adata.var_names.get_indexer(selected)] = 1.0
    selected_size = np.asarray(counts @ indicator, dtype=np.float64).ravel()
    spec = VARIANTS[variant]
    if spec["denominator"] == "total" and spec["log"] == "ln":
        target = _scanpy_log1p_total(counts, spec["scale"])
    elif spec["denominator"] == "total":
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        target = normalize_counts(counts, variant, library_size=totals, validate=False)
    else:
        target = normalize_counts(counts, variant, library_size=selected_size, validate=False)
    groups = adata.obs[Obs.LIBRARY_ID].astype(str).to_numpy() if Obs.LIBRARY_ID in adata.obs else None
    if groups is None:
        logger.info("normalize: obs['library_id'] is absent; size factors use one median over all spots")
    factors = size_factors(selected_size, groups)
    n_empty = int((selected_size == 0).sum())
    if n_empty:
        logger.warning(
            "normalize: %d spots have no counts in the %d selected genes; their targets and size factors are 0",
            n_empty,
            len(selected),
        )

    adata = maybe_copy(adata, copy)
    write(adata, "layers", key_added, target, overwrite=overwrite)
    write(adata, "obs", factor_key, factors, overwrite=overwrite)
    record(
        adata,
        _FUNCTION,
        key_added,
        {
            "variant": variant,
            "scale": spec["scale"],
            "log": spec["log"],
            "denominator": spec["denominator"],
            "genes": selected,
            "genes_from": genes if isinstance(genes, str) else ("all" if genes is None else "list"),
            "source_layer": "X" if layer is None else layer,
            "size_factor_key": factor_key,
            "n_empty_spots": n_empty,
        },
        overwrite=overwrite,
    )
    return adata if copy else None


def _source(adata, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise MissingKeyError("adata.X is empty; pass layer='<name of the raw-count layer>'.")
        return adata.X
    if layer not in adata.layers:
        raise MissingKeyError(f"layer {layer!r} is not in adata.layers (it has {list(adata.layers)}).")
    return adata.layers[layer]


def _selected_genes(adata, genes) -> list[str]:
    if genes is None:
        return adata.var_names.tolist()
    if isinstance(genes, str):
        if genes not in adata.var.columns:
            raise MissingKeyError(
                f"genes={genes!r} is not a column of adata.var. Run sthisto.pp.select_genes(adata, "
                f"key_added={genes!r}) first, or pass a list of gene names."
            )
        column = adata.var[genes]
        if column.dtype != bool:
            raise InputError(f"adata.var[{genes!r}] has dtype {column.dtype}; a boolean selection column is needed.")
        selected = adata.var_names[column.to_numpy()].tolist()
        if not selected:
            raise InputError(f"adata.var[{genes!r}] selects no gene; select genes first.")
        return selected
    genes = list(genes)
    if not genes:
        raise InputError("genes=[] is empty; pass None (all genes), a var column, or gene names.")
    absent = [g for g in genes if g not in adata.var_names]
    if absent:
        raise MissingKeyError(
            f"{len(absent)} of {len(genes)} genes are not in adata.var_names (e.g. {absent[:5]}). "
            f"Select them with sthisto.pp.select_genes(adata, genes=..., missing='ignore') and pass "
            f"genes='sthisto_selected'."
        )
    if len(set(genes)) != len(genes):
        raise InputError("genes lists some names twice; remove the repeats.")
    return genes


def _scanpy_log1p_total(counts, target_sum: float):
    import anndata as ad
    import scanpy as sc

    matrix = (
        sp.csr_matrix(counts, dtype=np.float32, copy=True)
        if sp.issparse(counts)
        else np.array(counts, dtype=np.float32)
    )
    tmp = ad.AnnData(matrix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy warns about empty spots; they stay all-zero
        sc.pp.normalize_total(tmp, target_sum=target_sum)
    sc.pp.log1p(tmp)
    return tmp.X
