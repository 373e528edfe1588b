"""``tl.evaluate``: the metrics of the four papers and HEST, per section and overall, with their protocol.

Every number is stored beside the definitions that produced it (what was compared with what,
over which spots and genes, aggregated how), so that a table never implies its protocol.

The metric definitions are in the Notes of :func:`evaluate`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_record_writable, record, sthisto_uns
from .._constants import Obs, Uns, Var
from .._deprecate import removed_copy
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input
from ..encoders._provenance import with_weights_columns
from ._metric_kernels import constant_columns, pearson_columns, spearman_columns

if TYPE_CHECKING:
    from anndata import AnnData

_FUNCTION = "evaluate"
_CROSS_VALIDATE = "cross_validate"
OVERALL = "overall"
"""Value of the ``group`` column on the overall rows."""
UNDETERMINED = "undetermined"
"""Label (case-insensitive) excluded from ARI/NMI, as in the HER2+ annotations."""
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

AGGREGATION = (
    "pearson_gene/spearman_gene/ssim: per gene across the spots of each group, then mean (median) over "
    "genes with a defined value; pearson_spot: per spot across the evaluated genes, then mean (median) "
    "over spots; mse/mae/rmse: over all spot x gene values of the group, rmse = sqrt(mse); ari/nmi: "
    "clusters of the group's predicted expression vs labels; overall = unweighted mean over groups of "
    "each group's value (n_genes: distinct genes; n_spots and n_*_undefined/constant/not_predicted counts: sum over "
    "groups, i.e. gene x group pairs for gene counts)"
)

METRIC_DEFINITIONS = {
    "pearson_gene_mean": "mean over genes of Pearson r across spots (genes constant in observed or predicted excluded)",
    "pearson_gene_median": "median over genes of Pearson r across spots (same genes as pearson_gene_mean)",
    "spearman_gene_mean": "mean over genes of Spearman rho across spots (average ranks for ties)",
    "spearman_gene_median": "median over genes of Spearman rho across spots",
    "pearson_spot_mean": "mean over spots of Pearson r across genes (HistoSPACE)",
    "pearson_spot_median": "median over spots of Pearson r across genes",
    "ssim_mean": (
        "mean over genes of global SSIM of max-scaled gene vectors, C1=0.01^2, C2=0.03^2; undefined (NaN, "
        "counted) with fewer than 2 spots or an observed maximum <= 0; a prediction never positive is scored as "
        "the all-zero map, not left out"
    ),
    "mse": "mean squared error over all spot x gene values",
    "mae": "mean absolute error over all spot x gene values",
    "rmse": "sqrt(mse)",
    "ari_kmeans": "adjusted Rand index, k-means (k = number of labels) on PCA of standardised predictions",
    "nmi_kmeans": "normalised mutual information, same k-means clusters",
    "ari_leiden": "adjusted Rand index, Leiden clusters on a kNN graph of the same PCA",
    "nmi_leiden": "normalised mutual information, same Leiden clusters",
}

GENE_MEANS = {
    "pearson_gene_mean": "pearson",
    "pearson_gene_median": "pearson",
    "spearman_gene_mean": "spearman",
    "spearman_gene_median": "spearman",
    "ssim_mean": "ssim",
}
"""Metrics averaged over the genes whose per-gene value (this ``per_gene`` column) is defined."""
_MAX_NAMES_LISTED = 10
RECIPE_COLUMN = "recipe"
"""Column of the metrics tables: the training recipe of the model(s) behind the predictions."""
GENE_MEAN_COLUMN = "gene_mean"
"""Column of the metrics tables: the row's metric scored by the gene-mean predictor."""
GENE_MEAN_DEFINITION = (
    "the gene-mean predictor: each gene's mean over the training spots of the model that predicted the spot "
    "(its normalised target), at every spot; scored on the same spots, genes and groups as the predictions. "
    "It is constant per gene, so its per-gene correlations are undefined (NaN) and its per-spot Pearson is "
    "the floor a model's per-spot Pearson must be read against"
)

# Overall value of count metrics: summed over groups (the n_genes_* ones count gene x group pairs).
_SUMMED_METRICS = (
    "n_spots",
    "n_genes_constant_observed",
    "n_genes_constant_predicted",
    "n_genes_pearson_undefined",
    "n_genes_ssim_undefined",
    "n_genes_predicted_never_positive",
    "n_spots_pearson_undefined",
    "n_spots_not_predicted",
    "n_genes_not_predicted",
    "n_spots_labelled",
)


# --- metric kernels (plain arrays; tested against scipy / scikit-learn / scikit-image) -------------
def ssim_columns(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Global SSIM of every column after scaling each column by its maximum (see :func:`evaluate`).

    A predicted column that is never positive predicts no expression anywhere: it is scored as
    the all-zero map (a low SSIM), not left out, so a model cannot raise its mean by predicting
    nothing for the genes it gets wrong.

    Returns
    -------
    ``(m,)`` float64 array; NaN where the observed column's maximum is <= 0 (no map to scale)
    and for every column when there are fewer than two rows (one value has no structure: its
    scaled map would be 1 = 1 for any positive prediction).
    """
    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise InputError(f"observed {x.shape} and predicted {y.shape} must be 2-d arrays of the same shape.")
    if x.shape[0] < 2:
        return np.full(x.shape[1], np.nan)
    x_max = x.max(axis=0)
    y_max = y.max(axis=0)
    defined = x_max > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x / np.where(defined, x_max, 1.0)
        ys = np.where(y_max > 0, y / np.where(y_max > 0, y_max, 1.0), 0.0)
    mu_x, mu_y = xs.mean(axis=0), ys.mean(axis=0)
    var_x = ((xs - mu_x) ** 2).mean(axis=0)
    var_y = ((ys - mu_y) ** 2).mean(axis=0)
    cov = ((xs - mu_x) * (ys - mu_y)).mean(axis=0)
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    ssim[~defined] = np.nan
    return ssim


def labelled_spots(labels) -> np.ndarray:
    """Boolean mask of spots with a label that is not ``'undetermined'`` (any case) and not missing."""
    series = pd.Series(np.asarray(labels, dtype=object))
    missing = series.isna().to_numpy()
    text = series.astype(str).str.strip().str.lower().to_numpy()
    return ~missing & (text != UNDETERMINED) & (text != "") & (text != "nan")


def ari_embedding(values: np.ndarray, *, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """Standardise genes, then PCA to ``min(n_pcs, n_spots, n_genes)`` components (the papers' ARI input)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(np.asarray(values, dtype=np.float64))
    n_components = int(min(n_pcs, scaled.shape[0], scaled.shape[1]))
    if n_components < 1:
        raise InputError("no spots or genes to cluster.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-constant input: zero variance ratios
        return PCA(n_components=n_components, svd_solver="full", random_state=seed).fit_transform(scaled)


def kmeans_clusters(embedding: np.ndarray, n_clusters: int, *, n_init: int = 20, seed: int = 0) -> np.ndarray:
    """k-means++ clusters with an explicit number of restarts and seed (scikit-learn)."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=int(n_clusters), init="k-means++", n_init=int(n_init), random_state=int(seed))
    return model.fit_predict(np.asarray(embedding, dtype=np.float64))


def leiden_clusters(
    embedding: np.ndarray,
    *,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    connectivities: str = "umap",
    seed: int = 0,
) -> np.ndarray:
    """Leiden clusters (scanpy on the ``leidenalg`` package) on a kNN graph of ``embedding``.

    ``connectivities`` is scanpy's ``neighbors(method=...)``: ``"umap"`` (scanpy's default, as
    used by the papers; its first call in a process compiles numba code, ~10-30 s) or
    ``"gauss"``. The clustering is ``scanpy.tl.leiden``'s ``flavor="leidenalg"`` with that
    flavour's settings (directed graph, iterations until no improvement): what the papers'
    ``sc.tl.leiden(adata, resolution=...)`` ran when they were written, and the package the
    design names. scanpy's newer igraph flavour (undirected, 2 iterations) is faster but
    clusters differently.
    """
    if connectivities not in ("umap", "gauss"):
        raise InputError(f"connectivities={connectivities!r}; use 'umap' (scanpy's default) or 'gauss'.")
    import anndata as ad
    import scanpy as sc

    embedding = np.asarray(embedding, dtype=np.float32)
    n = embedding.shape[0]
    if n < 3:
        raise InputError(f"Leiden clustering needs at least 3 spots; got {n}.")
    tmp = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    tmp.obsm["X_embedding"] = embedding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's FutureWarnings about flavours and defaults
        sc.pp.neighbors(
            tmp,
            n_neighbors=int(min(n_neighbors, n - 1)),
            use_rep="X_embedding",
            method=connectivities,
            transformer="sklearn",  # exact neighbours: same graph on every machine
            random_state=seed,
        )
        # Spots with identical embeddings (a method predicting a constant profile) give umap's
        # membership 0/0 = NaN; they are as close as two spots can be, i.e. weight 1. leidenalg
        # refuses NaN weights where igraph's flavour silently skipped them.
        graph = tmp.obsp["connectivities"]
        if np.isnan(graph.data).any():
            graph.data = np.nan_to_num(graph.data, nan=1.0)
        sc.tl.leiden(
            tmp,
            resolution=float(resolution),
            random_state=seed,
            flavor="leidenalg",
            n_iterations=-1,
            directed=True,
            key_added="leiden",
        )
    return tmp.obs["leiden"].astype(int).to_numpy()


def cluster_scores(
    predicted: np.ndarray,
    labels,
    *,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    leiden_resolution: float = 1.0,
    leiden_connectivities: str = "umap",
    kmeans_n_init: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """ARI / NMI of k-means and Leiden clusters of ``predicted`` against ``labels`` (see module docs).

    Returns
    -------
    Dict with ``ari_kmeans``, ``nmi_kmeans``, ``ari_leiden``, ``nmi_leiden``, ``n_labels``,
    ``n_spots_labelled``, ``n_leiden_clusters`` (NaN where undefined: fewer than two labels,
    or fewer spots than labels).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    keep = labelled_spots(labels)
    kept_labels = np.asarray(labels, dtype=object)[keep].astype(str)
    n_labels = len(set(kept_labels))
    out = {
        "ari_kmeans": np.nan,
        "nmi_kmeans": np.nan,
        "ari_leiden": np.nan,
        "nmi_leiden": np.nan,
        "n_labels": float(n_labels),
        "n_spots_labelled": float(keep.sum()),
        "n_leiden_clusters": np.nan,
    }
    if n_labels < 2 or keep.sum() <= n_labels:
        return out
    embedding = ari_embedding(np.asarray(predicted)[keep], n_pcs=n_pcs, seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*distinct clusters.*")  # constant predictions
        km = kmeans_clusters(embedding, n_labels, n_init=kmeans_n_init, seed=seed)
    out["ari_kmeans"] = float(adjusted_rand_score(kept_labels, km))
    out["nmi_kmeans"] = float(normalized_mutual_info_score(kept_labels, km))
    if keep.sum() >= 3:
        leiden = leiden_clusters(
            embedding,
            n_neighbors=n_neighbors,
            resolution=leiden_resolution,
            connectivities=leiden_connectivities,
            seed=seed,
        )
        out["ari_leiden"] = float(adjusted_rand_score(kept_labels, leiden))
        out["nmi_leiden"] = float(normalized_mutual_info_score(kept_labels, leiden))
        out["n_leiden_clusters"] = float(len(set(leiden)))
    return out


def group_metrics(
    observed: np.ndarray,
    predicted: np.ndarray,
    *,
    genes: Sequence[str],
    labels=None,
    cluster_params: dict | None = None,
    where: str = "",
) -> tuple[dict[str, float], pd.DataFrame]:
    """All metrics of one group of spots.

    Genes whose predictions are all NaN (not predicted for this group) and spots whose
    predictions are all NaN (no prediction, e.g. training spots of a cross-validation fold) are
    left out and counted. Any other non-finite value is an error.

    Returns
    -------
    metrics
        Metric name → value.
    per_gene
        One row per evaluated gene: ``gene``, ``pearson``, ``spearman``, ``ssim``, ``mse``,
        ``mae``, ``constant_observed``, ``constant_predicted``.
    """
    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    genes = np.asarray(genes, dtype=object)
    missing_pred = np.isnan(y)
    gene_missing = missing_pred.all(axis=0) if len(y) else np.zeros(y.shape[1], dtype=bool)
    spot_missing = missing_pred[:, ~gene_missing].all(axis=1) if (~gene_missing).any() else np.ones(len(y), bool)
    x, y = x[~spot_missing][:, ~gene_missing], y[~spot_missing][:, ~gene_missing]
    genes = genes[~gene_missing]
    for name, values in (("predicted", y), ("observed", x)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise InputError(
                f"the {name} values{where} hold {int(bad.sum())} NaN or infinite entries among spots and genes "
                f"that are otherwise predicted. Fix or drop those spots (whole spots or genes without a "
                f"prediction may be all-NaN; partial NaN cannot be scored)."
            )
    metrics: dict[str, float] = {
        "n_spots": float(x.shape[0]),
        "n_genes": float(x.shape[1]),
        "n_spots_not_predicted": float(spot_missing.sum()),
        "n_genes_not_predicted": float(gene_missing.sum()),
    }
    if x.size == 0:
        nan_metrics = [m for m in METRIC_DEFINITIONS if not m.startswith(("ari", "nmi"))]
        metrics.update(dict.fromkeys(nan_metrics, np.nan))
        metrics.update(
            n_genes_constant_observed=np.nan,
            n_genes_constant_predicted=np.nan,
            n_genes_pearson_undefined=np.nan,
            n_genes_ssim_undefined=np.nan,
            n_genes_predicted_never_positive=np.nan,
            n_spots_pearson_undefined=np.nan,
        )
        per_gene = pd.DataFrame(columns=["gene", "pearson", "spearman", "ssim", "mse", "mae"])
        if labels is not None:
            metrics.update(dict.fromkeys(("ari_kmeans", "nmi_kmeans", "ari_leiden", "nmi_leiden"), np.nan))
        return metrics, per_gene

    constant_x = constant_columns(x)
    constant_y = constant_columns(y)
    pearson = pearson_columns(x, y)
    spearman = spearman_columns(x, y)
    ssim = ssim_columns(x, y)
    never_positive = ~(y.max(axis=0) > 0)
    spot_pearson = pearson_columns(x.T, y.T)
    error = y - x
    metrics.update(
        {
            "pearson_gene_mean": _nan_stat(np.nanmean, pearson),
            "pearson_gene_median": _nan_stat(np.nanmedian, pearson),
            "spearman_gene_mean": _nan_stat(np.nanmean, spearman),
            "spearman_gene_median": _nan_stat(np.nanmedian, spearman),
            "pearson_spot_mean": _nan_stat(np.nanmean, spot_pearson),
            "pearson_spot_median": _nan_stat(np.nanmedian, spot_pearson),
            "ssim_mean": _nan_stat(np.nanmean, ssim),
            "mse": float(np.mean(error**2)),
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error**2))),
            "n_genes_constant_observed": float(constant_x.sum()),
            "n_genes_constant_predicted": float(constant_y.sum()),
            "n_genes_pearson_undefined": float(np.isnan(pearson).sum()),
            "n_genes_ssim_undefined": float(np.isnan(ssim).sum()),
            "n_genes_predicted_never_positive": float(never_positive.sum()),
            "n_spots_pearson_undefined": float(np.isnan(spot_pearson).sum()),
        }
    )
    if labels is not None:
        kept_labels = np.asarray(labels, dtype=object)[~spot_missing]
        metrics.update(cluster_scores(y, kept_labels, **(cluster_params or {})))
    per_gene = pd.DataFrame(
        {
            "gene": genes.astype(str),
            "pearson": pearson,
            "spearman": spearman,
            "ssim": ssim,
            "mse": np.mean(error**2, axis=0),
            "mae": np.mean(np.abs(error), axis=0),
            "constant_observed": constant_x,
            "constant_predicted": constant_y,
            "predicted_never_positive": never_positive,
        }
    )
    return metrics, per_gene


def _nan_stat(function: Callable, values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return float("nan")
    return float(function(values))


def _gene_set(metric: str) -> str | None:
    """Per-gene column whose defined values a metric averages; ``""`` for counts; None: all genes."""
    if metric in GENE_MEANS:
        return GENE_MEANS[metric]
    if metric.startswith("n_"):
        return ""
    return None


def _covered(per_gene: pd.DataFrame, column: str) -> tuple[int, int, list[str]]:
    """(genes in the mean, genes evaluated, genes left out) of one group."""
    defined = np.isfinite(per_gene[column].to_numpy(dtype=np.float64))
    return int(defined.sum()), len(defined), per_gene["gene"].astype(str).to_numpy()[~defined].tolist()


def _coverage_text(covered: int, evaluated: int, left_out: list[str], column: str) -> str:
    if covered == evaluated:
        return f"all {evaluated}"
    names = ", ".join(left_out[:_MAX_NAMES_LISTED])
    more = len(left_out) - _MAX_NAMES_LISTED
    if more > 0:
        names += f", ... (+{more} more: NaN in per_gene[{column!r}])"
    return f"{covered} of {evaluated}; left out: {names}"


def metric_frames(
    groups: Sequence[tuple[str, dict[str, float], pd.DataFrame]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy table (``group``, ``scope``, ``metric``, ``value``, ``genes``) with overall rows, and the per-gene table.

    ``genes`` says which genes a value covers: ``"all <n>"`` (every evaluated gene of the
    group), or for the per-gene means ``"<k> of <n>; left out: ..."`` naming the genes whose
    value is undefined; empty for counts. Overall rows count gene x group pairs.
    """
    rows = []
    per_gene = []
    names: list[str] = []
    for group, metrics, genes in groups:
        for metric, value in metrics.items():
            if metric not in names:
                names.append(metric)
            column = _gene_set(metric)
            if column is None:
                text = f"all {len(genes)}"
            elif column == "":
                text = ""
            else:
                text = _coverage_text(*_covered(genes, column), column)
            rows.append({"group": str(group), "scope": "group", "metric": metric, "value": float(value), "genes": text})
        per_gene.append(genes.assign(group=str(group)))
    table = pd.DataFrame(rows, columns=["group", "scope", "metric", "value", "genes"])
    distinct = len({g for _, _, genes in groups for g in genes["gene"]})
    sizes = [len(genes) for _, _, genes in groups]
    all_text = (
        f"all {distinct}"
        if all(n == distinct for n in sizes)
        else f"each group's evaluated genes ({min(sizes)}-{max(sizes)} of {distinct})"
    )
    overall = []
    for metric in names:
        values = table.loc[table["metric"] == metric, "value"].to_numpy(dtype=np.float64)
        if metric in _SUMMED_METRICS:
            value = float(np.nansum(values)) if np.isfinite(values).any() else np.nan
        elif metric == "n_genes":
            value = float(distinct)
        else:
            value = _nan_stat(np.nanmean, values)
        column = _gene_set(metric)
        text = "" if column == "" else all_text
        if column:
            counts = [_covered(genes, column) for _, _, genes in groups]
            covered, evaluated = sum(c[0] for c in counts), sum(c[1] for c in counts)
            if covered != evaluated:
                text = f"{covered} of {evaluated} gene x group pairs (per group: see its rows)"
        overall.append({"group": OVERALL, "scope": "overall", "metric": metric, "value": value, "genes": text})
    n_groups = len(groups)
    overall.append({"group": OVERALL, "scope": "overall", "metric": "n_groups", "value": float(n_groups), "genes": ""})
    table = pd.concat([table, pd.DataFrame(overall)], ignore_index=True)
    genes_table = (
        pd.concat(per_gene, ignore_index=True)
        if per_gene
        else pd.DataFrame(columns=["group", "gene", "pearson", "spearman", "ssim", "mse", "mae"])
    )
    front = ["group", "gene"]
    genes_table = genes_table[front + [c for c in genes_table.columns if c not in front]]
    return table, genes_table


# --- AnnData plumbing -------------------------------------------------------------------------------
def _matrix(adata, key: str, rows: np.ndarray, columns: np.ndarray, *, what: str) -> np.ndarray:
    if key == "X":
        source = adata.X
    elif key in adata.layers:
        source = adata.layers[key]
    else:
        raise MissingKeyError(
            f"{what}={key!r} is not a layer of adata (layers: {sorted(adata.layers)}). Pass the layer "
            f"written by sthisto.tl.predict / cross_validate (or sthisto.pp.normalize for observed values)."
        )
    block = source[rows][:, columns]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def _provenance(adata, predicted: str) -> tuple[str | None, dict | None]:
    store = adata.uns.get(Uns.STHISTO, {})
    found = [
        (function, store[function][predicted])
        for function in ("predict", _CROSS_VALIDATE)
        if predicted in store.get(function, {}) and "genes" in store[function][predicted]
    ]
    if len(found) > 1:
        raise InputError(
            f"adata.uns['sthisto'] holds both a tl.predict and a tl.cross_validate record for {predicted!r}, so "
            f"which normalised targets the predictions match is ambiguous. Pass observed='<layer>' explicitly."
        )
    return found[0] if found else (None, None)


def _record_value(value, default=None):
    """A value read back from ``uns`` (None may come back as the string 'None' or be absent)."""
    if value is None or (isinstance(value, str) and value in ("None", "")):
        return default
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return [str(v) for v in json.loads(value)]
        except json.JSONDecodeError:
            return [value]
    return [str(v) for v in np.asarray(value).ravel()]


def _observed_from_record(adata, function: str, entry: dict, genes: list[str], rows: np.ndarray) -> np.ndarray:
    """Observed targets, normalised exactly as the model's training targets; NaN where unknown."""
    from ._train import _targets

    position = {g: i for i, g in enumerate(genes)}
    out = np.full((len(rows), len(genes)), np.nan)
    parts = _record_parts(adata, function, entry, rows)
    row_position = {r: i for i, r in enumerate(rows)}
    for fold_rows, model_genes, info in parts:
        if len(fold_rows) == 0:
            continue
        target = _record_value(info.get("target"), "log10_1e4")
        target_layer = _record_value(info.get("target_layer"))
        values, _, _ = _targets(
            adata, np.asarray(fold_rows), model_genes, layer=target_layer, variant=target, need_counts=False
        )
        values = values.toarray() if sp.issparse(values) else np.asarray(values)
        take = [(position[g], j) for j, g in enumerate(model_genes) if g in position]
        if not take:
            continue
        out_cols, in_cols = (np.asarray(t) for t in zip(*take))
        out_rows = np.fromiter((row_position[r] for r in fold_rows), dtype=int, count=len(fold_rows))
        out[np.ix_(out_rows, out_cols)] = values[:, in_cols]
    return out


def _record_parts(adata, function: str, entry: dict, rows: np.ndarray) -> list[tuple[np.ndarray, list[str], dict]]:
    """(spots, model genes, record) of each model behind a prediction layer (one per fold for CV)."""
    if function == "predict":
        return [(rows, _list(entry["genes"]), entry)]
    fold_key = str(entry["fold_key"])
    if fold_key not in adata.obs:
        raise MissingKeyError(
            f"the cross-validation record names fold column obs[{fold_key!r}], which is missing; "
            f"pass observed='<layer>' to evaluate without it."
        )
    fold_of = adata.obs[fold_key].astype(object).to_numpy()[rows]
    return [(rows[fold_of == fold], _list(info["genes"]), info) for fold, info in entry["folds"].items()]


def training_mean_of(info: dict) -> list[float] | None:
    """The training mean a model record carries (``trained_on['target_mean']``), or None."""
    from ._train import TARGET_MEAN_KEY

    trained = _record_value(info.get("trained_on"))
    if isinstance(trained, str):
        try:
            trained = json.loads(trained)
        except json.JSONDecodeError:
            return None
    if not isinstance(trained, dict) or trained.get(TARGET_MEAN_KEY) is None:
        return None
    return [float(v) for v in trained[TARGET_MEAN_KEY]]


def gene_mean_predictions(
    adata, function: str | None, entry: dict | None, genes: list[str], rows: np.ndarray
) -> np.ndarray | None:
    """The gene-mean predictor at ``rows``: each gene's training mean at every spot.

    The mean is that of the model that predicted the spot (one per fold for cross-validation);
    NaN where that model did not predict the gene. None when any model behind the predictions
    has no recorded training mean (models trained before it was recorded).
    """
    if entry is None:
        return None
    position = {g: i for i, g in enumerate(genes)}
    out = np.full((len(rows), len(genes)), np.nan)
    row_position = {r: i for i, r in enumerate(rows)}
    for part_rows, model_genes, info in _record_parts(adata, function, entry, rows):
        if len(part_rows) == 0:
            continue
        mean = training_mean_of(info)
        if mean is None or len(mean) != len(model_genes):
            return None
        take = [(position[g], j) for j, g in enumerate(model_genes) if g in position]
        if not take:
            continue
        out_cols, in_cols = (np.asarray(t) for t in zip(*take))
        out_rows = np.fromiter((row_position[r] for r in part_rows), dtype=int, count=len(part_rows))
        out[np.ix_(out_rows, out_cols)] = np.asarray(mean)[in_cols][None, :]
    return out


def with_gene_mean_column(table: pd.DataFrame, gene_mean_groups) -> pd.DataFrame:
    """Insert ``gene_mean`` after ``value``: the same metric scored by the gene-mean predictor.

    ``gene_mean_groups`` are the ``(group, metrics, per_gene)`` of :func:`group_metrics` run on
    the gene-mean predictions, or None when the training mean is unknown (the column is NaN).
    """
    values = np.full(len(table), np.nan)
    if gene_mean_groups:
        reference, _ = metric_frames(gene_mean_groups)
        lookup = {(g, s, m): v for g, s, m, v in reference[["group", "scope", "metric", "value"]].itertuples(False)}
        keys = table[["group", "scope", "metric"]].itertuples(index=False, name=None)
        values = np.asarray([lookup.get(key, np.nan) for key in keys], dtype=np.float64)
    table.insert(list(table.columns).index("value") + 1, GENE_MEAN_COLUMN, values)
    return table


def _evaluated_genes(adata, predicted: str, genes) -> list[str]:
    var_names = pd.Index(adata.var_names.astype(str))
    flag = Var.predicted(predicted)
    predicted_genes = var_names[adata.var[flag].to_numpy(dtype=bool)] if flag in adata.var else var_names
    if genes is None:
        chosen = list(predicted_genes)
    elif isinstance(genes, str):
        if genes not in adata.var:
            raise MissingKeyError(
                f"genes={genes!r} is not a boolean var column; pass a list of gene names or a var column."
            )
        chosen = list(var_names[adata.var[genes].to_numpy(dtype=bool)])
    else:
        chosen = [str(g) for g in genes]
    if not chosen:
        raise InputError("no genes to evaluate; check genes= or the predicted genes of the layer.")
    if len(set(chosen)) != len(chosen):
        raise InputError("genes lists some names twice; pass unique gene names.")
    unknown = [g for g in chosen if g not in set(var_names)]
    if unknown:
        raise MissingKeyError(f"{len(unknown)} genes are not in adata.var_names (e.g. {unknown[:5]}).")
    not_predicted = [g for g in chosen if g not in set(predicted_genes)]
    if not_predicted:
        raise InputError(
            f"{len(not_predicted)} genes have no prediction in layers[{predicted!r}] (var[{flag!r}] is False, "
            f"e.g. {not_predicted[:5]}). Evaluate only predicted genes (genes=None does that)."
        )
    return chosen


def _evaluate_a_copy(function, args, kwargs):
    """What ``evaluate(copy=True)`` did before it was deprecated: evaluate a copy and return it."""
    adata, *rest = args if args else (kwargs.pop("adata"),)
    adata = adata.copy()
    function(adata, *rest, **kwargs)
    return adata


@removed_copy(
    "It stores its table in adata.uns and returns it; to keep adata unchanged, evaluate a copy: "
    "tl.evaluate(adata.copy(), ...).",
    on_copy=_evaluate_a_copy,
)
@checked_input(genes=True)
def evaluate(
    adata: AnnData,
    *,
    predicted: str,
    observed: str | None = None,
    by: str | None = Obs.LIBRARY_ID,
    labels_key: str | None = None,
    genes: Sequence[str] | str | None = None,
    key_added: str | None = None,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    leiden_resolution: float = 1.0,
    leiden_connectivities: str = "umap",
    kmeans_n_init: int = 20,
    seed: int = 0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score predicted against observed expression per section and overall, recording the protocol.

    Definitions of every metric are in the Notes below and stored with the numbers
    (``uns['sthisto']['evaluate'][key_added]['definitions']``).

    Parameters
    ----------
    adata
        AnnData holding the predictions (a layer) and the observed values (a layer, or raw
        counts in ``X`` to normalise).
    predicted
        Layer of predictions, e.g. written by :func:`sthisto.tl.predict` or
        :func:`sthisto.tl.cross_validate`. All-NaN spots (no prediction, e.g. training spots of
        a fold) and all-NaN genes of a section are left out and counted.
    observed
        Layer of observed values on the predictions' scale (``"X"`` uses ``X`` as is).
        ``None`` (default): recompute the target the model was trained on — the transform
        in its record (``target``, e.g. ``log10_1e4``, with the selected-gene denominator over
        the model's genes, or its ``target_layer``) applied to the raw counts in ``X`` — from
        the ``uns['sthisto']['predict'][predicted]`` or
        ``uns['sthisto']['cross_validate'][predicted]`` record (per fold for
        cross-validation with per-fold gene selection). Without such a record, or with both,
        an error asks for ``observed``.
    by
        ``obs`` column defining the groups (default ``library_id``: per section). ``None``
        treats all spots as one group.
    labels_key
        ``obs`` column of annotations; adds ARI / NMI of k-means and Leiden clusters of the
        predictions (``'undetermined'`` spots excluded).
    genes
        Genes to evaluate: list or boolean ``var`` column. Default: the genes marked in
        ``var[f"{predicted}_predicted"]`` (all genes if that column is absent).
    key_added
        Key of the stored results (default: ``predicted``).
    n_pcs
        Principal components for clustering (the papers: 50).
    n_neighbors
        Neighbours of the kNN graph for Leiden.
    leiden_resolution
        Leiden resolution.
    leiden_connectivities
        Edge weights of the kNN graph, scanpy's ``neighbors(method=...)``: ``"umap"``
        (scanpy's default, which the papers used; its first use in a process compiles numba
        code for 10-30 s) or ``"gauss"``. Neighbours are exact (scikit-learn).
    kmeans_n_init
        k-means restarts (the papers: 20).
    seed
        ``random_state`` of PCA, k-means, the kNN graph and Leiden (the papers: 0).
    overwrite
        Replace existing results under ``key_added``.

    Returns
    -------
    A new table by design (there is no ``copy=``; it also lands in ``adata.uns``, see
    below): the tidy metrics table, one row per group and metric
    plus ``overall`` rows, columns ``predicted``, ``group``, ``scope`` (``"group"`` or
    ``"overall"``), ``metric``, ``value``, ``genes`` (which genes the value covers: ``"all
    <n>"``, or for a per-gene mean whose value is undefined for some genes ``"<k> of <n>;
    left out: <names>"``, so Pearson's and SSIM's means never silently cover different
    genes; empty for counts), and ``weights`` / ``random_weights`` right after
    ``predicted``: where the weights of the model's pretrained components came from
    (``random``, ``file:<sha256[:12]>``, ``cache:<sha256[:12]>``, ``hub:<id>@<revision>``,
    ``none`` when nothing is pretrained, ``unknown`` without a predict / cross-validate
    record; see :func:`sthisto.encoders.weights_label`), so scores of random weights say so.
    Pivot it with
    ``table.pivot(index="group", columns="metric", values="value")``; read it back later with
    :func:`sthisto.tl.get_metrics`.

    Writes ``adata.uns['sthisto']['evaluate'][key_added]``: ``predicted``, ``observed``
    (what the predictions were compared with), ``target``, ``by``, ``labels_key``, ``genes``,
    ``protocol`` (from the cross-validation record, or ``"predictions"`` with the libraries
    the model was trained on and a warning flag when they overlap the evaluated groups),
    ``aggregation``, ``definitions``, ``clustering`` (the ARI preprocessing), ``seed``,
    ``table`` (the tidy table), ``per_gene`` (``group``, ``gene``, ``pearson``,
    ``spearman``, ``ssim``, ``mse``, ``mae``, ``constant_observed``, ``constant_predicted``,
    ``predicted_never_positive``) and ``gene_coverage`` (per group and per-gene value
    ``pearson`` / ``spearman`` / ``ssim``: ``n_covered``, ``n_evaluated``, ``left_out``, the
    full comma-separated list of genes outside its mean, and ``same_as_pearson``).

    Notes
    -----
    One *group* = the spots of one value of ``by``, normally one section.

    ``pearson_gene_*``
        For every gene, Pearson's r between observed and predicted values across the group's
        spots; then the mean / median over genes whose r is defined. A gene that is constant in
        the observed *or* the predicted values of the group (or a group with fewer than two spots)
        has no r: it is counted (``n_genes_constant_observed``, ``n_genes_constant_predicted``,
        ``n_genes_pearson_undefined``) and left out of the mean, as the papers drop it; never
        silently.
    ``spearman_gene_*``
        The same with Spearman's rho (Pearson's r of average ranks).
    ``pearson_spot_*``
        For every spot, Pearson's r across the evaluated genes (HistoSPACE's headline number);
        mean / median over spots whose r is defined (``n_spots_pearson_undefined`` counts spots
        whose observed or predicted profile is constant).
    ``ssim_mean``
        Structural similarity of each gene's map, as in the spatial-transcriptomics benchmarks
        HGGEF follows: observed and predicted values of the gene over the group's spots are each
        divided by their own maximum, then one *global* SSIM is taken over the whole vector (a
        single window covering every spot, population statistics)::

            SSIM = (2 mu_x mu_y + C1) (2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2))

        with ``C1 = 0.01**2`` and ``C2 = 0.03**2`` (K1 = 0.01, K2 = 0.03, data range 1 after the
        scaling); means, variances and the covariance divide by ``n`` (not ``n - 1``). Spot order
        does not matter. It equals scikit-image's ``structural_similarity`` with one window
        spanning the data, ``use_sample_covariance=False`` and ``data_range=1``. A gene whose
        observed maximum is <= 0 has no map to scale and no SSIM; nor has any gene of a group
        with fewer than two spots (a single scaled value is 1 for any positive prediction, so
        it would score 1.0). Both are NaN, counted in ``n_genes_ssim_undefined`` and left out
        of the mean. A prediction that is never positive predicts no expression anywhere and
        is scored as the all-zero map (a low SSIM; counted in
        ``n_genes_predicted_never_positive``), not left out. Averaged over genes; the
        ``genes`` column says which genes each mean covers.
    ``mse``, ``mae``, ``rmse``
        Over all spot x gene values of the group (HisToSGE's MSE / MAE); ``rmse = sqrt(mse)``.
    ``ari_kmeans``, ``nmi_kmeans``, ``ari_leiden``, ``nmi_leiden`` (with ``labels_key``)
        Clusters of the *predicted* expression against the annotations, in the HER2+ papers'
        preprocessing: spots labelled ``undetermined`` (any case) or without a label are dropped;
        genes are standardised (zero mean, unit variance; constant genes become 0); PCA to
        ``min(n_pcs, n_spots, n_genes)`` components; k-means with k = number of labels,
        k-means++ initialisation, ``kmeans_n_init`` restarts and ``random_state=seed``; Leiden
        (scanpy on leidenalg) at ``leiden_resolution`` on a ``n_neighbors`` kNN graph of the
        same PCA. Adjusted Rand index and normalised mutual information (scikit-learn).

    Overall rows are the unweighted mean over groups of each group's value; the papers report the
    mean over sections of the per-section mean over genes. Counts are summed over groups
    (``n_spots``; the ``n_genes_*`` counts then count gene x group pairs), except ``n_genes``
    (distinct genes evaluated) and ``n_labels`` / ``n_leiden_clusters`` (mean per group).

    Examples
    --------
    >>> test = adata[adata.obs["library_id"] == "S03"].copy()  # a section the model never saw
    >>> sthisto.tl.predict(test, model, key_added="pred")
    >>> table = sthisto.tl.evaluate(test, predicted="pred", labels_key="label")
    >>> table.query("scope == 'overall'")
    """
    key_added = key_added or predicted
    if not isinstance(predicted, str) or not predicted:
        raise InputError("predicted must name a layer holding predictions, e.g. predicted='thitogene'.")
    if predicted != "X" and predicted not in adata.layers:
        raise MissingKeyError(
            f"layers[{predicted!r}] is missing (layers: {sorted(adata.layers)}). Write predictions first with "
            f"sthisto.tl.predict(adata, model, key_added={predicted!r}) or sthisto.tl.cross_validate."
        )
    if by is not None and by not in adata.obs:
        raise MissingKeyError(f"by={by!r} is not an obs column (columns: {list(adata.obs.columns)}).")
    if labels_key is not None and labels_key not in adata.obs:
        raise MissingKeyError(
            f"labels_key={labels_key!r} is not an obs column; pass the annotation column (e.g. 'label') or None."
        )
    for name, value in (("n_pcs", n_pcs), ("n_neighbors", n_neighbors), ("kmeans_n_init", kmeans_n_init)):
        if int(value) != value or value < 1:
            raise InputError(f"{name}={value!r} must be a positive integer.")
    if not (np.isfinite(leiden_resolution) and leiden_resolution > 0):
        raise InputError(f"leiden_resolution={leiden_resolution!r} must be a positive number.")
    if leiden_connectivities not in ("umap", "gauss"):
        raise InputError(f"leiden_connectivities={leiden_connectivities!r}; use 'umap' (scanpy's default) or 'gauss'.")
    check_record_writable(adata, _FUNCTION, key_added, overwrite=overwrite)
    chosen = _evaluated_genes(adata, predicted, genes)
    columns = pd.Index(adata.var_names.astype(str)).get_indexer(chosen)
    rows = np.arange(adata.n_obs)

    function, entry = _provenance(adata, predicted)
    if observed is None:
        if entry is None:
            raise MissingKeyError(
                f"observed=None needs the record of how layers[{predicted!r}] was made (uns['sthisto']['predict'] "
                f"or ['cross_validate'][{predicted!r}]) to normalise the counts like the model's targets, and "
                f"there is none. Pass observed='<layer>' holding observed values on the predictions' scale "
                f"(e.g. written by sthisto.pp.normalize with the model's target)."
            )
        observed_values = _observed_from_record(adata, function, entry, chosen, rows)
        observed_text = f"raw counts in X normalised as the model's targets ({function} record of {predicted!r})"
        targets = sorted({_target_text(e) for e in _fold_entries(function, entry)})
    else:
        observed_values = _matrix(adata, observed, rows, columns, what="observed")
        observed_text = "X" if observed == "X" else f"layers[{observed!r}]"
        targets = ["as given"]
    predicted_values = _matrix(adata, predicted, rows, columns, what="predicted")
    from ._uncertainty import SPREAD_DEFINITIONS, group_spread_metrics, spread_inputs

    spread = spread_inputs(adata, predicted, rows, columns, chosen, function, entry, _matrix)
    curves = []

    groups = np.full(adata.n_obs, "all", dtype=object) if by is None else adata.obs[by].astype(object).to_numpy()
    if pd.isna(groups).any():
        raise InputError(f"obs[{by!r}] has {int(pd.isna(groups).sum())} missing values; every spot needs a group.")
    labels = adata.obs[labels_key].astype(object).to_numpy() if labels_key is not None else None
    cluster_params = {
        "n_pcs": int(n_pcs),
        "n_neighbors": int(n_neighbors),
        "leiden_resolution": float(leiden_resolution),
        "leiden_connectivities": str(leiden_connectivities),
        "kmeans_n_init": int(kmeans_n_init),
        "seed": int(seed),
    }
    order = (
        list(adata.obs[by].cat.categories)
        if by is not None and isinstance(adata.obs[by].dtype, pd.CategoricalDtype)
        else sorted(pd.unique(groups), key=str)
    )
    gene_mean_values = gene_mean_predictions(adata, function, entry, chosen, rows)
    if gene_mean_values is not None:
        gene_mean_values[np.isnan(predicted_values)] = np.nan  # the same spots and genes as the model's
    results, gene_mean_results = [], []
    for group in order:
        in_group = groups == group
        if not in_group.any():
            continue
        if gene_mean_values is not None:
            gene_mean_results.append(
                (str(group), *group_metrics(observed_values[in_group], gene_mean_values[in_group], genes=chosen))
            )
        metrics, per_gene = group_metrics(
            observed_values[in_group],
            predicted_values[in_group],
            genes=chosen,
            labels=None if labels is None else labels[in_group],
            cluster_params=cluster_params,
            where=f" of group {group!r}",
        )
        if metrics["n_spots"] == 0:
            logger.info("evaluate: group %r has no predicted spots; it is skipped", group)
            continue
        if spread:  # coverage, width, error-spread correlation, calibration curve
            extra, extra_genes, curve = group_spread_metrics(
                observed_values[in_group], predicted_values[in_group], spread.rows(in_group), chosen
            )
            metrics.update(extra)
            per_gene = per_gene.merge(extra_genes, on="gene", how="left")
            curves.append(curve.assign(group=str(group)))
        results.append((str(group), metrics, per_gene))
    if not results:
        raise InputError(f"layers[{predicted!r}] holds no prediction (all NaN) for any spot; nothing to evaluate.")
    table, per_gene_table = metric_frames(results)
    kept = {g for g, _, _ in results}
    with_gene_mean_column(
        table, [r for r in gene_mean_results if r[0] in kept] if gene_mean_values is not None else None
    )
    table.insert(0, "predicted", predicted)
    weights, random_weights = _weights_of(entry)
    with_weights_columns(table, weights, random=random_weights)
    with_weights_columns(per_gene_table, weights, random=random_weights, after="gene")
    recipe = _recipe_of(function, entry)
    table.insert(list(table.columns).index("random_weights") + 1, RECIPE_COLUMN, recipe)

    protocol = _protocol(function, entry, [g for g, _, _ in results])
    record(
        adata,
        _FUNCTION,
        key_added,
        {
            "predicted": predicted,
            "observed": observed_text,
            "target": targets,
            "by": by if by is not None else "None",
            "labels_key": labels_key if labels_key is not None else "None",
            "genes": chosen,
            "n_genes": len(chosen),
            "protocol": protocol,
            "aggregation": AGGREGATION,
            "definitions": {**METRIC_DEFINITIONS, **(SPREAD_DEFINITIONS if spread else {})},
            "clustering": {
                "excluded_labels": UNDETERMINED + " (case-insensitive) and missing",
                "preprocessing": "standardise genes (StandardScaler), PCA (svd_solver='full')",
                "kmeans": "k = number of labels, init='k-means++'",
                "leiden": "scanpy.tl.leiden(flavor='leidenalg', directed=True, n_iterations=-1) on "
                "sc.pp.neighbors(transformer='sklearn') of the PCA",
                **cluster_params,
            },
            "seed": int(seed),
            "weights": weights,
            "random_weights": random_weights,
            "recipe": recipe,
            "gene_mean": GENE_MEAN_DEFINITION
            if gene_mean_values is not None
            else "not available: the record of the predictions holds no training mean (gene_mean column is NaN)",
        },
        overwrite=overwrite,
    )
    stored = sthisto_uns(adata)[_FUNCTION][key_added]
    stored["table"] = table
    stored["per_gene"] = per_gene_table
    stored["gene_coverage"] = gene_coverage(results)
    if curves:
        curve = pd.concat(curves, ignore_index=True)
        overall = curve.groupby(["level", "expected", "source"], as_index=False)["observed"].mean()
        stored["calibration_curve"] = pd.concat([curve, overall.assign(group=OVERALL)], ignore_index=True)
    return table


def gene_coverage(groups: Sequence[tuple[str, dict[str, float], pd.DataFrame]]) -> pd.DataFrame:
    """Which genes each per-gene mean covers, per group: the full lists behind the table's ``genes``.

    Returns
    -------
    One row per group and per-gene value (``pearson``, ``spearman``, ``ssim``): ``n_covered``,
    ``n_evaluated``, ``left_out`` (comma-separated genes whose value is undefined, so outside
    the mean) and ``same_as_pearson`` (the mean covers exactly Pearson's genes).
    """
    rows = []
    for group, _, genes in groups:
        if len(genes) == 0:
            continue
        pearson_left = set(_covered(genes, "pearson")[2])
        for column in ("pearson", "spearman", "ssim"):
            covered, evaluated, left_out = _covered(genes, column)
            rows.append(
                {
                    "group": str(group),
                    "value": column,
                    "n_covered": covered,
                    "n_evaluated": evaluated,
                    "left_out": ", ".join(left_out),
                    "same_as_pearson": set(left_out) == pearson_left,
                }
            )
    return pd.DataFrame(rows, columns=["group", "value", "n_covered", "n_evaluated", "left_out", "same_as_pearson"])


def _weights_of(entry: dict | None) -> tuple[str, bool]:
    """Weights label and random flag of the model(s) behind the predictions (``unknown`` without a record)."""
    if entry is None or _record_value(entry.get("weights")) is None:
        return "unknown", False
    return str(_record_value(entry["weights"])), bool(_record_value(entry.get("random_weights"), False))


def _recipe_of(function: str | None, entry: dict | None) -> str:
    """Training recipe(s) of the model(s) behind the predictions (``unknown`` without a record)."""
    found = []
    for info in _fold_entries(function, entry):
        trained = _record_value(info.get("trained_on"))
        try:
            trained = json.loads(trained) if isinstance(trained, str) else trained
        except json.JSONDecodeError:
            trained = None
        found.append(str(trained.get("recipe", "unknown")) if isinstance(trained, dict) else "unknown")
    return " | ".join(dict.fromkeys(found)) if found else "unknown"


def _target_text(entry: dict) -> str:
    layer = _record_value(entry.get("target_layer"))
    return f"layers[{layer!r}]" if layer else str(_record_value(entry.get("target"), "log10_1e4"))


def _fold_entries(function: str | None, entry: dict | None) -> list[dict]:
    if entry is None:
        return []
    if function == "predict":
        return [entry]
    return list(entry["folds"].values())


def _protocol(function: str | None, entry: dict | None, groups: list[str]) -> dict[str, Any]:
    if function == _CROSS_VALIDATE:
        return {
            "source": "cross_validate",
            "split": str(entry.get("split")),
            "description": str(entry.get("split_description", "")),
            "gene_selection": str(entry.get("gene_selection", "")),
            "gene_selection_note": str(entry.get("gene_selection_note", "")),
        }
    if function == "predict":
        trained = _record_value(entry.get("trained_on"), "{}")
        try:
            libraries = json.loads(trained).get("libraries", []) if isinstance(trained, str) else []
        except json.JSONDecodeError:
            libraries = []
        overlap = sorted(set(map(str, libraries)) & set(groups))
        if overlap:
            logger.warning(
                "evaluate: the model behind this prediction was trained on evaluated groups %s; these scores are "
                "not held-out performance.",
                overlap,
            )
        return {
            "source": "predict",
            "trained_on_libraries": [str(x) for x in libraries],
            "evaluated_groups_seen_in_training": overlap,
            "description": "held-out prediction" if not overlap else "includes groups the model was trained on",
        }
    return {
        "source": "unknown",
        "description": "predictions of unknown provenance compared with the given observed layer",
    }


@checked_input
def get_metrics(adata: AnnData, key: str, *, per_gene: bool = False, function: str | None = None) -> pd.DataFrame:
    """Read a stored metrics table back as a DataFrame.

    Parameters
    ----------
    adata
        AnnData with results of :func:`evaluate` or :func:`sthisto.tl.cross_validate`.
    key
        Their ``key_added``.
    per_gene
        Return the per-gene table (Pearson, Spearman, SSIM, errors per gene and group)
        instead of the tidy summary table.
    function
        ``"evaluate"`` or ``"cross_validate"``; default: ``cross_validate`` when a
        cross-validation stored ``key`` (its table also holds ``method`` and the training-spot
        reference rows), else ``evaluate``.

    Returns
    -------
    A copy of the stored table.
    """
    store = adata.uns.get(Uns.STHISTO, {})
    candidates = [function] if function is not None else [_CROSS_VALIDATE, _FUNCTION]
    for name in candidates:
        entry = store.get(name, {}).get(key)
        if entry is None:
            continue
        table_key = "per_gene" if per_gene else "table"
        if table_key in entry:
            return pd.DataFrame(entry[table_key]).copy()
    available = {name: sorted(store.get(name, {})) for name in (_FUNCTION, _CROSS_VALIDATE)}
    raise MissingKeyError(
        f"no stored metrics under {key!r} (stored: {available}). Run sthisto.tl.evaluate(adata, predicted=..., "
        f"key_added={key!r}) or sthisto.tl.cross_validate first."
    )
