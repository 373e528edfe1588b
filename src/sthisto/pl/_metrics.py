"""Metric plots: per-gene distributions per method and section, and a methods x sections heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Uns
from .._errors import InputError, MissingKeyError
from ._utils import category_colors, finish, show_or_return

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_PER_GENE_METRICS = ("pearson", "spearman", "ssim", "mse", "mae")


def _expand_keys(adata, keys) -> list[str]:
    """Evaluation keys; a cross-validation comparison prefix expands to its per-method keys."""
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    if not keys:
        raise InputError("keys=[] is empty; pass the key(s) of tl.evaluate or tl.cross_validate results.")
    store = adata.uns.get(Uns.STHISTO, {}).get("cross_validate", {})
    expanded = []
    for key in keys:
        entry = store.get(key, {})
        if "keys" in entry and "genes" not in entry:  # a comparison of several methods
            expanded.extend(str(k) for k in np.asarray(entry["keys"]).ravel())
        else:
            expanded.append(str(key))
    return expanded


def _labels_of(adata, keys: list[str]) -> list[str]:
    """Method names of cross-validation keys when they tell the keys apart, else the keys."""
    store = adata.uns.get(Uns.STHISTO, {}).get("cross_validate", {})
    names = [str(store[k]["method"]) if k in store and "method" in store[k] else k for k in keys]
    return names if len(set(names)) == len(names) else list(keys)


def metric_distribution(
    adata: AnnData,
    keys: str | Sequence[str],
    *,
    metric: str = "pearson",
    kind: str = "box",
    per_group: bool = True,
    labels: Sequence[str] | None = None,
    palette: Sequence[Any] | Mapping[str, Any] | None = None,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Distributions of a per-gene metric (default Pearson r) per method and section.

    Parameters
    ----------
    adata
        AnnData holding results of :func:`sthisto.tl.evaluate` / :func:`sthisto.tl.cross_validate`.
    keys
        Their key(s); a cross-validation comparison key (a list of methods) expands to its
        methods.
    metric
        Per-gene column: ``"pearson"``, ``"spearman"``, ``"ssim"``, ``"mse"``, ``"mae"``.
    kind
        ``"box"`` or ``"violin"``.
    per_group
        One box per method within each section (default); ``False`` pools all sections.
    labels
        Legend labels of the keys (default: method names for cross-validation keys).
    palette
        Colours of the keys: a list or ``{label: colour}``.
    ax
        Axes to draw into (default: a new figure).
    save, dpi
        Save the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns the axes.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise the :class:`matplotlib.axes.Axes`. Genes without a defined value (constant genes) are
    not drawn; their number is in the evaluation table.
    """
    own_figure = ax is None
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..tl._evaluate import get_metrics

    if metric not in _PER_GENE_METRICS:
        raise InputError(f"metric={metric!r}; per-gene metrics are {list(_PER_GENE_METRICS)}.")
    if kind not in ("box", "violin"):
        raise InputError(f"kind={kind!r}; use 'box' or 'violin'.")
    keys = _expand_keys(adata, keys)
    labels = _labels_of(adata, keys) if labels is None else [str(x) for x in labels]
    if len(labels) != len(keys):
        raise InputError(f"labels has {len(labels)} entries for {len(keys)} keys.")
    tables = [get_metrics(adata, key, per_gene=True) for key in keys]
    groups: list[str] = []
    for table in tables:
        for group in table["group"].astype(str):
            if group not in groups:
                groups.append(group)
    if not per_group:
        groups = ["all"]
    colors = category_colors(labels, palette)

    if ax is None:
        width = max(4.0, 0.5 * len(groups) * len(keys) + 1.5)
        _, ax = plt.subplots(figsize=(width, 3.5), layout="constrained")
    n = len(keys)
    box_width = 0.8 / n
    for k, (table, label) in enumerate(zip(tables, labels)):
        for g, group in enumerate(groups):
            rows = table if group == "all" and not per_group else table[table["group"].astype(str) == group]
            values = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            position = g + (k - (n - 1) / 2) * box_width
            if kind == "box":
                parts = ax.boxplot(
                    [values], positions=[position], widths=box_width * 0.9, patch_artist=True, showfliers=False
                )
                for patch in parts["boxes"]:
                    patch.set_facecolor(colors[label])
                    patch.set_alpha(0.85)
                for median in parts["medians"]:
                    median.set_color("black")
            else:
                parts = ax.violinplot([values], positions=[position], widths=box_width * 0.9, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(colors[label])
                    body.set_alpha(0.85)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(f"per-gene {metric}")
    ax.set_xlabel("section" if per_group else "")
    ax.legend(handles=[Patch(facecolor=colors[lab], label=lab) for lab in labels], frameon=False, fontsize="small")
    finish(ax.figure, save, dpi)
    return show_or_return(ax.figure, ax, show=show, return_fig=return_fig, own_figure=own_figure)


def _table_for_heatmap(data, keys) -> pd.DataFrame:
    from ..tl._evaluate import get_metrics

    if isinstance(data, pd.DataFrame):
        table = data.copy()
    else:
        if keys is None:
            raise InputError("pass keys=... (evaluation or cross-validation keys) to take the tables from adata.")
        keys = _expand_keys(data, keys)
        parts = []
        for key, label in zip(keys, _labels_of(data, keys)):
            part = get_metrics(data, key)
            part["method"] = label  # one row per key, even when two keys ran the same method
            parts.append(part)
        table = pd.concat(parts, ignore_index=True)
    required = {"group", "metric", "value"}
    if not required <= set(table.columns):
        raise InputError(f"the metrics table needs columns {sorted(required)}; it has {list(table.columns)}.")
    if "evaluated_on" in table:
        table = table[table["evaluated_on"] == "held_out"]
    if "method" not in table:
        table = table.assign(method=table["predicted"] if "predicted" in table else "predictions")
    return table


def metrics_heatmap(
    data: AnnData | pd.DataFrame,
    keys: str | Sequence[str] | None = None,
    *,
    metric: str = "pearson_gene_mean",
    include_overall: bool = True,
    annotate: bool = True,
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Heat map of one metric across methods (rows) and sections (columns).

    Parameters
    ----------
    data
        An AnnData with stored results (then pass ``keys``) or a tidy table returned by
        :func:`sthisto.tl.evaluate` / :func:`sthisto.tl.cross_validate`.
    keys
        Keys of stored results; a cross-validation comparison key expands to its methods.
    metric
        Metric of the tidy table, e.g. ``"pearson_gene_mean"``, ``"pearson_spot_mean"``,
        ``"ssim_mean"``, ``"ari_kmeans"``.
    include_overall
        Add the ``overall`` column (mean over sections).
    annotate
        Write the values in the cells.
    fmt
        Format of the annotations.
    cmap
        Colour map.
    ax
        Axes to draw into (default: a new figure).
    save, dpi
        Save the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns the axes.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise the :class:`matplotlib.axes.Axes`.
    """
    own_figure = ax is None
    import matplotlib.pyplot as plt

    table = _table_for_heatmap(data, keys)
    table = table[table["metric"] == metric]
    if table.empty:
        raise MissingKeyError(f"no values of metric {metric!r} in the table; check the metric name.")
    if not include_overall:
        table = table[table["group"] != "overall"]
    methods = list(pd.unique(table["method"].astype(str)))
    groups = [g for g in pd.unique(table["group"].astype(str)) if g != "overall"]
    if include_overall and (table["group"] == "overall").any():
        groups.append("overall")
    grid = (
        table.assign(method=table["method"].astype(str), group=table["group"].astype(str))
        .pivot_table(index="method", columns="group", values="value", aggfunc="first", dropna=False)
        .reindex(index=methods, columns=groups)
    )
    values = grid.to_numpy(dtype=float)
    if ax is None:
        _, ax = plt.subplots(
            figsize=(max(3.0, 0.7 * len(groups) + 2.0), max(1.8, 0.45 * len(methods) + 1.2)), layout="constrained"
        )
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods)
    if include_overall and groups and groups[-1] == "overall":
        ax.axvline(len(groups) - 1.5, color="white", linewidth=2)
    if annotate:
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize="small",
                            color="black" if values[i, j] > middle else "white")  # fmt: skip
    ax.figure.colorbar(image, ax=ax, label=metric, shrink=0.9)
    finish(ax.figure, save, dpi)
    return show_or_return(ax.figure, ax, show=show, return_fig=return_fig, own_figure=own_figure)
