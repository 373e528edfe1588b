"""The benchmark table: every registered method on the same folds, with time and memory.

Two cohorts, one protocol each:

* **her2st C2–C6**, leave-one-section-out (the THItoGene / HGGEF protocol), the 785 published
  genes, targets ``log10(1 + 1e4 · counts / selected-gene total)``; skipped with a note when
  ``../shared/data/her2st`` (or ``$STHISTO_SHARED_DATA/her2st``) is absent;
* **synthetic**, leave-one-patient-out: ``sthisto.datasets.synthetic`` with 3 patients × 2
  sections (its image-dependent genes ``SYN_DEP_*`` are learnable, ``SYN_IND_*`` are not; the
  table reports both groups so a method that "predicts" noise shows up).

Every network runs under each requested training recipe (``--recipes``, default ``paper`` and
``small_data``; see ``tl.train(recipe=...)``) on identical folds; the closed-form baselines
(``ridge``, ``ridge_context``) run once. Each row also gives the gene-mean predictor's per-spot
PCC on the same folds (``gene_mean_pcc_spot``: each gene's training mean at every spot, the
floor per-spot PCC is read against), the genes the method predicts as a constant
(``genes_constant``, gene x fold pairs) and the epochs actually run (mean over folds; early
stopping shortens ``small_data`` runs).

Each (cohort, method, recipe) runs ``sthisto.tl.cross_validate`` in a fresh process, so the peak
resident memory (``ru_maxrss`` of that process) and the wall time belong to that method alone.
Written to ``--out``: ``benchmark_table.csv`` (tidy) and ``benchmark_table.md`` (one row per
cohort × method: weight provenance (``weights``: ``random``, ``file:<sha256[:12]>``,
``hub:<id>@<rev>``, ``none`` when nothing is pretrained; ``random_weights``), per-gene PCC
mean / median, per-spot PCC mean, RMSE, SSIM, train + predict time, peak memory, epochs), and,
for runs that validate (``small_data``), ``learning_curves.json``: per fold, the per-gene PCC on
the held-aside training data after every epoch. THItoGene / HGGEF rows say how they were batched
(``subsections``: spots per sub-section x sub-sections per epoch; ``--subsection-spots``).

Defaults are CPU settings that finish in about half an hour on 2 cores: the ``*_tiny``
variants for the deep methods and few epochs (stated in the table). On a GPU run the full
networks with their papers' epochs::

    python benchmarks/benchmark_table.py                       # CPU defaults
    python benchmarks/benchmark_table.py --full --device cuda  # paper-sized networks & epochs
    python benchmarks/benchmark_table.py --cohorts synthetic --methods ridge histosge_tiny
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

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data"))
HER2ST_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]

# CPU settings: epochs chosen so each method trains in minutes on 2 cores.
CPU_METHODS = {
    "ridge": {},
    "ridge_context": {},
    "histosge_tiny": {"max_epochs": 60},
    "histospace_tiny": {"max_epochs": 20},
    "thitogene_tiny": {"max_epochs": 40, "lr": 1e-3},
    "hggef_tiny": {"max_epochs": 40, "lr": 1e-3},
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
        return adata, "section"
    if name == "synthetic":
        adata = sthisto.datasets.synthetic(n_sections=6, n_patients=3, n_spots=250, n_genes=60, seed=7)
        return adata, "patient"
    raise SystemExit(f"unknown cohort {name!r}; use her2st or synthetic")


def run_one(cohort: str, method: str, params: dict, device: str, threads: int, recipe: str = "paper") -> dict:
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
        method_params={method: dict(params)},
        store_models=False,
        progress=False,
        device=device,
        key_added="bench",
        recipe=recipe,
    )
    seconds = time.perf_counter() - start
    overall = table[table["scope"] == "overall"].set_index("metric")
    row = {metric: float(overall["value"].get(metric, float("nan"))) for metric in HEADLINE}
    row["gene_mean_pcc_spot"] = float(overall["gene_mean"].get("pearson_spot_mean", float("nan")))
    row["genes_constant"] = int(overall["value"].get("n_genes_constant_predicted", 0))
    folds = adata.uns["sthisto"]["cross_validate"]["bench"]["folds"]
    ran = [len(json.loads(info["history"]).get("epoch", [])) for info in folds.values()]
    # learning curves: per-gene PCC on each fold's held-aside training data, per epoch
    curves = {fold: json.loads(info["history"]).get("val_pearson_gene") for fold, info in folds.items()}
    crop = next(iter(json.loads(info["trained_on"]).get("subsections") for info in folds.values()), None)
    if cohort == "synthetic":  # learnable vs unlearnable genes, from the pooled per-gene table
        per_gene = sthisto.tl.get_metrics(adata, "bench", per_gene=True)  # one method: its key is key_added
        for prefix, label in (("SYN_DEP", "pcc_image_genes"), ("SYN_IND", "pcc_noise_genes")):
            row[label] = float(per_gene.loc[per_gene["gene"].str.startswith(prefix), "pearson"].mean())
    cls, variant = sthisto.models._registry.resolve_method(method)
    epochs = params.get("max_epochs", cls.all_training_defaults().get("max_epochs"))
    # where the pretrained components' weights came from, so a random-weight row says so
    row.update(
        cohort=cohort,
        protocol=split,
        method=method,
        recipe="closed form" if method.startswith("ridge") else recipe,
        epochs_run=round(sum(ran) / len(ran), 1) if ran and not method.startswith("ridge") else "",
        subsections=f"{crop['spots']} spots x {crop['per_epoch']}" if crop else "",
        weights=str(table["weights"].iloc[0]),
        random_weights=bool(table["random_weights"].any()),
        n_spots=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        n_folds=int(table.loc[table["scope"] == "group", "group"].nunique()),
        epochs="closed form" if method.startswith("ridge") else int(epochs),
        seconds=round(seconds, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        device=device,
        curves={fold: curve for fold, curve in curves.items() if curve},
    )
    return row


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table with 3 significant decimals."""
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: f"{v:.3f}")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in values) + " |" for values in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the requested cohorts × methods and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", nargs="+", default=["her2st", "synthetic"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method (tiny variants on CPU)")
    parser.add_argument("--full", action="store_true", help="paper-sized networks and epochs (GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override max_epochs of every deep method")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
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
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    context = multiprocessing.get_context("spawn")
    for cohort in args.cohorts:
        runs = [(m, r) for m in methods for r in (["paper"] if m.startswith("ridge") else args.recipes)]
        for method, recipe in runs:
            params = dict(settings.get(method, {}))
            if args.epochs is not None and not method.startswith("ridge"):
                params["max_epochs"] = args.epochs
            if method.startswith(SECTION_WIDE) and args.subsection_spots is not None:
                params["subsection_spots"] = args.subsection_spots or False
            if method.startswith(SECTION_WIDE) and args.subsections_per_epoch is not None:
                params["subsections_per_epoch"] = args.subsections_per_epoch
            print(f"{cohort} / {method} / {recipe} {params} ...", flush=True)
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(run_one, cohort, method, params, args.device, args.threads, recipe).result()
            if row.get("skipped"):
                break
            curves = row.pop("curves", None)
            if curves:
                path = args.out / "learning_curves.json"
                known = json.loads(path.read_text()) if path.exists() else {}
                known[f"{cohort}/{method}/{recipe}/{row['subsections'] or 'whole sections'}"] = curves
                path.write_text(json.dumps(known, indent=1))
            rows.append(row)
            print("   ", {k: row[k] for k in ("pearson_gene_mean", "pearson_spot_mean", "seconds", "peak_rss_gb")})
            frame = pd.DataFrame(rows)
            first = ["cohort", "protocol", "method", "recipe", "subsections", "weights", "random_weights", "epochs"]
            first.append("epochs_run")
            frame = frame[first + [c for c in frame.columns if c not in first]]
            frame.to_csv(args.out / "benchmark_table.csv", index=False)  # written as we go: partial runs count
            (args.out / "benchmark_table.md").write_text(markdown(frame))
    if rows:
        shown = ["cohort", "method", "recipe", "subsections", "weights", "epochs", "epochs_run", *HEADLINE]
        shown.append("gene_mean_pcc_spot")
        shown += ["genes_constant", "seconds", "peak_rss_gb"]
        print(markdown(pd.DataFrame(rows)[shown]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
