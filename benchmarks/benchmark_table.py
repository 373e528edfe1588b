"""The benchmark table: every registered method on the same folds, with time and memory.

Two cohorts, one protocol each:

* **her2st C2–C6**, leave-one-section-out (the THItoGene / HGGEF protocol), the 785 published
  genes, each method's own target (``log10`` or ``log1p`` of counts per 1e4 over those genes:
  proportional, so the Pearson correlations compare); skipped with a note when
  ``../shared/data/her2st`` (or ``$STHISTO_SHARED_DATA/her2st``) is absent. The decoded images
  are held in memory so that patch methods are not timed decoding JPEG files;
* **synthetic**, leave-one-patient-out: ``sthisto.datasets.synthetic`` with 3 patients × 2
  sections. Its image-dependent genes (``SYN_DEP_*``) are learnable and its independent ones
  (``SYN_IND_*``) are not, so every metric is reported for both groups (``dep_*``, ``ind_*``):
  a method that learns shows ``dep_`` well above ``ind_``, and one that "predicts" noise shows up.

Every network runs under each requested training recipe (``--recipes``, default ``paper`` and
``small_data``; see ``tl.train(recipe=...)``) on identical folds; the closed-form baselines
(``ridge``, ``ridge_context``) run once. Each cohort also gets a ``gene_mean`` row: the
predictor that puts each gene's training mean at every spot, scored on the same folds (its
per-gene PCC is undefined, it is constant per gene; its per-spot PCC is the floor every other
per-spot PCC is read against). Columns: per-gene PCC mean / median and per-spot PCC mean
(means over sections), RMSE, SSIM, ``genes_constant`` (gene × section pairs predicted as a
constant; they are left out of the per-gene means, so read the two together), ``epochs`` (the
cap) and ``epochs_run`` (mean over folds; early stopping shortens ``small_data`` runs), wall
time, peak memory, weight provenance (``weights``: ``random``, ``file:<sha256[:12]>``,
``hub:<id>@<rev>``, ``none`` when nothing is pretrained; ``random_weights``), the recipe, the
method parameters (``settings``) and the test folds run (``folds``).

Each (cohort, method, recipe) runs ``sthisto.tl.cross_validate`` in a fresh process, so the peak
resident memory (``ru_maxrss`` of that process) and the wall time belong to that method alone.
Written to ``--out`` as the rows finish (partial runs count): ``benchmark_table.csv`` (tidy, every
column) and ``benchmark_table.md`` (one table per cohort). ``--append`` keeps the rows already
in ``--out`` and replaces only those measured again, so a table can be built in several runs.
For runs that validate (``small_data``), ``learning_curves.json`` and its picture
``learning_curves.png``: per fold and ensemble member, the per-gene PCC on
the held-aside training data after every epoch. THItoGene / HGGEF rows say how they were batched
(``subsections``: spots per sub-section x sub-sections per epoch; ``--subsection-spots``).

Defaults are CPU settings: the ``*_tiny`` variants for the deep methods and few epochs (stated
in the table). ``--full`` runs the papers' networks with their epochs (a GPU's job; on a CPU
cap them with ``--epochs`` and restrict the folds with ``--folds``). ``--param`` sets one method
parameter, e.g. ``--param histosge.encoder=handcrafted`` (the paper's UNI weights are gated;
random ViT-L features are no image model)::

    python benchmarks/benchmark_table.py                       # CPU defaults
    python benchmarks/benchmark_table.py --full --device cuda  # paper-sized networks & epochs
    python benchmarks/benchmark_table.py --cohorts synthetic --methods ridge histosge_tiny
    python benchmarks/benchmark_table.py --cohorts her2st --full --methods histosge \\
        --param histosge.encoder=handcrafted --folds C2 C4 --append
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data"))
HER2ST_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
CLOSED_FORM = ("ridge", "ridge_context")

# CPU settings: epoch caps chosen so each method trains in minutes per fold on one core. The
# learning rate is each recipe's own (the paper's, or the method's small_data_lr).
CPU_METHODS = {
    "ridge": {},
    "ridge_context": {},
    "histosge_tiny": {"max_epochs": 200},
    "histospace_tiny": {"max_epochs": 50},
    "thitogene_tiny": {"max_epochs": 200},
    "hggef_tiny": {"max_epochs": 100},
}
# The papers' networks and schedules (GPU).
FULL_METHODS = {
    "ridge": {},
    "ridge_context": {},
    "histosge": {},
    "histospace": {},
    "thitogene": {},
    "hggef": {},
}
SECTION_WIDE = ("thitogene", "hggef")  # the methods that train on spatial sub-sections
HEADLINE = ["pearson_gene_mean", "pearson_gene_median", "pearson_spot_mean", "rmse", "ssim_mean"]
# Metrics reported per gene group on the synthetic cohort (image-dependent vs independent genes).
GROUP_METRICS = {"pearson_gene_mean": "pcc_gene_mean", "pearson_gene_median": "pcc_gene_median"}
GROUP_METRICS |= {"pearson_spot_mean": "pcc_spot_mean", "n_genes_constant_predicted": "genes_constant"}
GENE_GROUPS = {"dep": "SYN_DEP", "ind": "SYN_IND"}
# A row is measured again (and replaced under --append) when these match.
ROW_KEY = ["cohort", "method", "recipe", "settings", "folds"]


def load_cohort(name: str):
    """The AnnData and the cross-validation split of one cohort (None when its data are absent)."""
    import sthisto

    if name == "her2st":
        root = SHARED_DATA / "her2st"
        if not root.exists():
            print(f"her2st: no data at {root}; skipped (set STHISTO_SHARED_DATA)", flush=True)
            return None, None
        adata = sthisto.io.read_her2st(root, sections=HER2ST_SECTIONS)
        sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
        adata = adata[:, adata.var["sthisto_selected"]].copy()
        keep_images_decoded(adata)
        return adata, "section"
    if name == "synthetic":
        adata = sthisto.datasets.synthetic(n_sections=6, n_patients=3, n_spots=250, n_genes=60, seed=7)
        return adata, "patient"
    raise SystemExit(f"unknown cohort {name!r}; use her2st or synthetic")


def keep_images_decoded(adata) -> None:
    """Hold each section's decoded H&E image in memory (``images['fullres']``, read first by sthisto).

    JPEG has no random access and sthisto keeps two decoded files at a time, so shuffled
    patch batches drawn from four training sections would decode the files again and again:
    the wall time would measure JPEG decoding, not the method (about 280 MB per her2st section).
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E images are legitimately large
    for entry in adata.uns["spatial"].values():
        path = entry.get("metadata", {}).get("image_path")
        if path and "fullres" not in entry["images"]:
            with Image.open(path) as image:
                entry["images"]["fullres"] = np.asarray(image.convert("RGB"))


def overall_values(table: pd.DataFrame, column: str = "value") -> dict[str, float]:
    """Metric -> value of the ``overall`` rows of a metrics table (``column``: ``value`` or ``gene_mean``)."""
    overall = table[table["scope"] == "overall"].set_index("metric")
    return {metric: float(value) for metric, value in overall[column].items()}


def gene_group_scores(adata, key: str) -> dict[str, float]:
    """Synthetic cohort: the headline metrics on the dependent and on the independent genes alone.

    Each group is scored by ``tl.evaluate`` on its own genes (per-spot PCC across them too), for
    the method and for the gene-mean predictor of the same folds (``gene_mean_*`` columns).
    """
    import sthisto

    scores = {}
    for label, prefix in GENE_GROUPS.items():
        genes = [g for g in adata.var_names if g.startswith(prefix)]
        table = sthisto.tl.evaluate(adata, predicted=key, genes=genes, key_added=f"{key}_{label}")
        method, floor = overall_values(table), overall_values(table, "gene_mean")
        for metric, name in GROUP_METRICS.items():
            scores[f"{label}_{name}"] = method.get(metric, np.nan)
        scores[f"gene_mean_{label}_pcc_spot_mean"] = floor.get("pearson_spot_mean", np.nan)
        scores[f"{label}_n_genes"] = len(genes)
    return scores


def run_one(
    cohort: str, method: str, params: dict, device: str, threads: int, recipe: str = "paper", folds=None
) -> dict:
    """Cross-validate one method on one cohort in this (fresh) process; return its numbers."""
    import torch

    torch.set_num_threads(threads)
    import sthisto

    adata, split = load_cohort(cohort)
    if adata is None:
        return {"skipped": True}
    start = time.perf_counter()
    table = sthisto.tl.cross_validate(
        adata,
        [method],
        split=split,
        folds=folds,
        method_params={method: dict(params)},
        progress=False,
        device=device,
        key_added="bench",
        recipe=recipe,
    )
    seconds = time.perf_counter() - start
    values, floor = overall_values(table), overall_values(table, "gene_mean")
    row = {metric: values.get(metric, np.nan) for metric in HEADLINE}
    row["genes_constant"] = int(values.get("n_genes_constant_predicted", 0))
    row["n_sections_scored"] = int(values.get("n_groups", 0))
    # the gene-mean predictor of the same folds, for the cohort's gene_mean row
    row.update({f"gene_mean_{metric}": floor.get(metric, np.nan) for metric in ("pearson_spot_mean", "rmse")})
    row["gene_mean_pcc_spot"] = row["gene_mean_pearson_spot_mean"]
    if cohort == "synthetic":
        row.update(gene_group_scores(adata, "bench"))
    info = adata.uns["sthisto"]["cross_validate"]["bench"]["folds"]
    ran = [len(json.loads(fold["history"]).get("epoch", [])) for fold in info.values()]
    closed_form = method.startswith(CLOSED_FORM)
    # learning curves: per-gene PCC on each fold's held-aside training data, per epoch, for
    # every ensemble member (member 0 first)
    curves = {fold: member_curves(fold_info) for fold, fold_info in info.items()}
    crop = next(iter(json.loads(fold_info["trained_on"]).get("subsections") for fold_info in info.values()), None)
    cls, _ = sthisto.models._registry.resolve_method(method)
    epochs = params.get("max_epochs", cls.all_training_defaults().get("max_epochs"))
    row.update(
        cohort=cohort,
        protocol=split,
        method=method,
        recipe="closed form" if closed_form else recipe,
        settings=settings_text(params),
        folds=" ".join(folds) if folds else "all",
        subsections=f"{crop['spots']} spots x {crop['per_epoch']}" if crop else "",
        # where the pretrained components' weights came from, so a random-weight row says so
        weights=str(table["weights"].iloc[0]),
        random_weights=bool(table["random_weights"].any()),
        epochs="" if closed_form else int(epochs),
        epochs_run="" if closed_form or not ran else round(sum(ran) / len(ran), 1),
        n_spots=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        n_folds=len(info),
        seconds=round(seconds, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        device=device,
        curves={fold: curve for fold, curve in curves.items() if curve},
    )
    return row


def member_curves(fold_info: dict) -> list[list[float]]:
    """Each ensemble member's held-aside per-gene PCC after every epoch (empty: no validation)."""
    histories = [json.loads(fold_info["history"]), *json.loads(fold_info.get("member_histories", "[]"))]
    return [history["val_pearson_gene"] for history in histories if history.get("val_pearson_gene")]


def plot_learning_curves(path: Path) -> Path | None:
    """Draw ``learning_curves.json`` (one panel per cohort / method / recipe) next to it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(path.read_text())
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False, sharey=True)
    for ax, (name, folds) in zip(axes[0], runs.items(), strict=True):
        for number, (fold, members) in enumerate(folds.items()):
            members = [members] if members and not isinstance(members[0], list) else members
            for index, curve in enumerate(members):
                label = f"test {fold}" if index == 0 else None
                ax.plot(range(1, len(curve) + 1), curve, color=f"C{number}", linewidth=0.8, alpha=0.8, label=label)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(name.replace("/", " / "), fontsize=8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)  # fold colours restart in every panel
    axes[0][0].set_ylabel("per-gene PCC, held-aside training data")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def settings_text(params: dict) -> str:
    """Method parameters as ``key=value`` pairs (the table states what ran)."""
    return " ".join(f"{key}={value}" for key, value in sorted(params.items()))


def gene_mean_row(row: dict) -> dict:
    """The gene-mean predictor's row, from the ``gene_mean_*`` columns of a measured row (same folds)."""
    mean = {
        "cohort": row["cohort"],
        "protocol": row["protocol"],
        "method": "gene_mean",
        "recipe": "closed form",
        "settings": "",
        "folds": row["folds"],
        "subsections": "",
        "weights": "none",
        "random_weights": False,
        "epochs": "",
        "epochs_run": "",
        # each gene is one constant per fold, so it has no per-gene PCC in any section
        "pearson_gene_mean": np.nan,
        "pearson_gene_median": np.nan,
        "pearson_spot_mean": row["gene_mean_pearson_spot_mean"],
        "rmse": row["gene_mean_rmse"],
        "genes_constant": int(row["n_genes"] * row["n_sections_scored"]),
        "n_spots": row["n_spots"],
        "n_genes": row["n_genes"],
        "n_folds": row["n_folds"],
        "n_sections_scored": row["n_sections_scored"],
    }
    for label in GENE_GROUPS:
        if f"gene_mean_{label}_pcc_spot_mean" in row:
            mean[f"{label}_pcc_spot_mean"] = row[f"gene_mean_{label}_pcc_spot_mean"]
            mean[f"{label}_pcc_gene_mean"] = mean[f"{label}_pcc_gene_median"] = np.nan
            mean[f"{label}_genes_constant"] = int(row[f"{label}_n_genes"] * row["n_sections_scored"])
    return mean


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table: scores with 3 decimals, counts as integers, undefined values as ``–``."""
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].dtype.kind != "f":
            continue
        digits = (
            0 if column.endswith("genes_constant") else 1 if column == "seconds" else 2 if column.endswith("_gb") else 3
        )
        shown[column] = shown[column].map(lambda v, d=digits: "–" if pd.isna(v) else f"{v:.{d}f}")
    shown = shown.fillna("")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in values) + " |" for values in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def shown_columns(cohort: str, frame: pd.DataFrame) -> list[str]:
    """The columns of one cohort's Markdown table."""
    first = [
        "method",
        "recipe",
        "settings",
        "folds",
        "subsections",
        "weights",
        "random_weights",
        "epochs",
        "epochs_run",
    ]
    if cohort == "synthetic":
        scores = [f"{label}_{name}" for label in GENE_GROUPS for name in GROUP_METRICS.values()]
    else:
        scores = [*HEADLINE[:3], "genes_constant"]
    return [c for c in [*first, *scores, "seconds", "peak_rss_gb"] if c in frame.columns]


def write_tables(frame: pd.DataFrame, out: Path) -> str:
    """Write the tidy CSV and the per-cohort Markdown tables; return the Markdown."""
    first = ["cohort", "protocol", *ROW_KEY[1:], "weights", "random_weights", "epochs", "epochs_run"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    frame.to_csv(out / "benchmark_table.csv", index=False)
    parts = []
    for cohort, rows in frame.groupby("cohort", sort=False):
        parts.append(
            f"### {cohort} ({rows['protocol'].iloc[0]} held out)\n\n" + markdown(rows[shown_columns(cohort, rows)])
        )
    text = "\n".join(parts)
    (out / "benchmark_table.md").write_text(text)
    return text


def parse_params(items: list[str]) -> dict[str, dict]:
    """``--param method.key=value`` pairs as {method: {key: value}} (values read as JSON when they parse)."""
    parsed: dict[str, dict] = {}
    for item in items:
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        if not (method and key and value):
            raise SystemExit(f"--param {item!r}: write METHOD.KEY=VALUE, e.g. histosge.encoder=handcrafted")
        try:
            parsed.setdefault(method, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed.setdefault(method, {})[key] = value
    return parsed


def previous_rows(out: Path) -> pd.DataFrame | None:
    """The rows already in ``out`` (``--append``)."""
    path = out / "benchmark_table.csv"
    if not path.exists():
        return None
    text_columns = dict.fromkeys(("settings", "folds", "epochs", "epochs_run"), str)
    return pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""]).fillna(
        dict.fromkeys(text_columns, "")
    )


def combined(previous: pd.DataFrame | None, rows: list[dict]) -> pd.DataFrame:
    """Previous rows with the re-measured ones replaced, then the new rows."""
    new = pd.DataFrame(rows)
    for column in ("settings", "folds", "epochs", "epochs_run"):
        new[column] = new[column].astype(str)
    if previous is None:
        return new
    measured = set(map(tuple, new[ROW_KEY].to_numpy()))
    kept = previous[[tuple(key) not in measured for key in previous[ROW_KEY].to_numpy()]]
    return pd.concat([kept, new], ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    """Run the requested cohorts × methods × recipes and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", nargs="+", default=["her2st", "synthetic"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method (tiny variants on CPU)")
    parser.add_argument("--full", action="store_true", help="paper-sized networks and epochs (GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override max_epochs of every deep method")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method parameter")
    parser.add_argument("--folds", nargs="+", default=None, help="test only these sections / patients")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out")
    parser.add_argument(
        "--recipes", nargs="+", default=["paper", "small_data"], help="training recipes of the networks"
    )
    parser.add_argument(
        "--subsection-spots",
        type=int,
        default=None,
        help="spots per training sub-section of THItoGene / HGGEF (default: the recipe's; 0: whole sections)",
    )
    parser.add_argument("--subsections-per-epoch", type=int, default=None, help="sub-sections per epoch")
    args = parser.parse_args(argv)

    settings = FULL_METHODS if args.full else CPU_METHODS
    methods = args.methods or list(settings)
    overrides = parse_params(args.param)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = previous_rows(args.out) if args.append else None
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    for cohort in args.cohorts:
        runs = [(m, r) for m in methods for r in (["paper"] if m.startswith(CLOSED_FORM) else args.recipes)]
        for method, recipe in runs:
            params = {**settings.get(method, {}), **overrides.get(method, {})}
            if args.epochs is not None and not method.startswith(CLOSED_FORM):
                params["max_epochs"] = args.epochs
            if method.startswith(SECTION_WIDE) and args.subsection_spots is not None:
                params["subsection_spots"] = args.subsection_spots or False
            if method.startswith(SECTION_WIDE) and args.subsections_per_epoch is not None:
                params["subsections_per_epoch"] = args.subsections_per_epoch
            print(f"{cohort} / {method} / {recipe} {params} ...", flush=True)
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                job = pool.submit(run_one, cohort, method, params, args.device, args.threads, recipe, args.folds)
                row = job.result()
            if row.get("skipped"):
                break
            if not any(r["cohort"] == cohort and r["method"] == "gene_mean" for r in rows):
                rows.append(gene_mean_row(row))
            curves = row.pop("curves", None)
            if curves:
                path = args.out / "learning_curves.json"
                known = json.loads(path.read_text()) if path.exists() else {}
                known[f"{cohort}/{method}/{recipe}/{row['subsections'] or 'whole sections'}"] = curves
                path.write_text(json.dumps(known, indent=1))
                plot_learning_curves(path)
            rows.append(row)
            print("   ", {k: row[k] for k in ("pearson_gene_mean", "pearson_spot_mean", "seconds", "peak_rss_gb")})
            text = write_tables(combined(previous, rows), args.out)  # written as we go: partial runs count
    if rows:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
