"""Uncertainty: what each spread mode costs, and how calibrated the intervals are on her2st.

Two parts, both printed as tables:

1. **Cost** (synthetic, 3 sections): time and extra peak resident memory of
   ``tl.predict(..., uncertainty=mode)`` relative to a plain prediction with one model, in
   the same run. Each prediction runs in a fresh process (one torch thread) that loads the
   saved model and data, predicts once with one member to warm caches, resets its peak
   resident size (``/proc/self/clear_refs``) and reports the peak reached while predicting
   above what it held before. Modes: ``ensemble``
   (K members), ``dropout`` (T passes; THItoGene-tiny), ``distribution`` (HGGEF-tiny's ZINB).
2. **Calibration on her2st C2–C6**, leave one section out: in each fold, a K-member ensemble
   trains on three sections, one more training section (drawn with the fold's seed) is held
   aside for calibration, and the held-out section gets 90 % intervals, plain split conformal
   (``absolute``) and normalised by the ensemble spread (``normalized``). Reported per method:
   empirical coverage, mean width, and Spearman(|error|, std) (per gene across spots, mean over
   genes), averaged over the five folds. Skipped when ``../shared/data/her2st`` is absent.

CPU defaults are modest (the ``*_tiny`` networks, few epochs); numbers depend on them::

    python benchmarks/uncertainty.py                         # both parts
    python benchmarks/uncertainty.py --parts cost --members 5 --samples 20
    python benchmarks/uncertainty.py --parts her2st --methods ridge histosge_tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data"))
HER2ST_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
HER2ST_METHODS = {
    "ridge": {},
    "histosge_tiny": {"max_epochs": 30},
    "histospace_tiny": {"max_epochs": 3},
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model_dir: str, data: str, mode: str, samples: int) -> None:
    """One prediction in this fresh process: print seconds and extra peak resident KiB."""
    import anndata as ad
    import torch

    import sthisto

    torch.set_num_threads(1)
    test = ad.read_h5ad(data)
    model = sthisto.io.load_model(model_dir)
    single = sthisto.io.load_model(model_dir)
    single.members = []
    if mode == "plain":
        model = single
    # A first prediction pays one-off costs (imports, decoding the section's image into the
    # reader's cache); it is not what a mode costs, so every measurement starts warm.
    sthisto.tl.predict(test.copy(), single, key_added="warm")
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current resident size
    start = time.perf_counter()
    sthisto.tl.predict(test, model, key_added="p", uncertainty=None if mode == "plain" else mode, n_samples=samples)
    seconds = time.perf_counter() - start
    print(f"RESULT {seconds} {max(_status_kib('VmHWM') - before, 0)}")


def _measure_in_subprocess(model_dir, data, mode, samples) -> tuple[float, float]:
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(model_dir), str(data), mode, str(samples)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = [row for row in done.stdout.splitlines() if row.startswith("RESULT")][-1]
    _, seconds, extra = line.split()
    return float(seconds), float(extra)


def part_cost(args) -> None:
    import tempfile

    import sthisto

    adata = sthisto.datasets.synthetic(n_sections=3, n_spots=200, n_genes=30, seed=3)
    train_mask = ["S01", "S02"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        test = adata[adata.obs["library_id"] == "S03"].copy()
        test.write_h5ad(folder / "test.h5ad")
        for method, modes in (
            ("thitogene_tiny", ("ensemble", "dropout")),
            ("hggef_tiny", ("ensemble", "distribution")),
        ):
            model = sthisto.tl.train(
                adata, method, train_mask=train_mask, n_members=args.members, max_epochs=2, progress=False
            )
            model.save(folder / method)
            base_time, base_mem = _measure_in_subprocess(folder / method, folder / "test.h5ad", "plain", args.samples)
            for mode in modes:
                seconds, memory = _measure_in_subprocess(folder / method, folder / "test.h5ad", mode, args.samples)
                rows.append((method, mode, seconds / base_time, memory / max(base_mem, 1.0), base_time, seconds))
    print(f"\nCost relative to one plain prediction ({test.n_obs} spots; K={args.members}, T={args.samples}; 1 thread)")
    print("| method | mode | time ratio | extra peak memory ratio | plain s | mode s |")
    print("|---|---|---|---|---|---|")
    for method, mode, t_ratio, m_ratio, base, seconds in rows:
        print(f"| {method} | {mode} | {t_ratio:.2f} | {m_ratio:.2f} | {base:.2f} | {seconds:.2f} |")


def _fold_scores(adata, method, params, test_section, seed, members):
    import sthisto
    from sthisto.tl._calibrate import calibrate_model, interval_bounds
    from sthisto.tl._evaluate import spearman_columns
    from sthisto.tl._train import _targets
    from sthisto.tl._uncertainty import predictive

    libraries = adata.obs["library_id"].astype(str).to_numpy()
    training = [s for s in HER2ST_SECTIONS if s != test_section]
    held = training[int(np.random.default_rng(seed).integers(len(training)))]
    fit = [s for s in training if s != held]
    model = sthisto.tl.train(
        adata, method, train_mask=fit, n_members=members, seed=seed, store=False, progress=False, **params
    )
    cal_index = np.flatnonzero(libraries == held)
    test_index = np.flatnonzero(libraries == test_section)
    calibrate_model(model, adata, cal_index, alpha=0.1, uncertainty="ensemble", levels=[0.9])
    output = predictive(model, adata, test_index, uncertainty="ensemble")
    observed, _, _ = _targets(
        adata, test_index, model.genes, layer=None, variant=model.data_params["target"], need_counts=False
    )
    observed = np.asarray(observed, dtype=np.float64)
    scores = {}
    for kind in ("absolute", "ensemble"):
        entry = model.calibration[kind]
        std = output["std"] if entry["conformal"] == "normalized" else None
        lower, upper = interval_bounds(entry, output["mean"], std, 0.9)
        label = "normalized" if kind == "ensemble" else kind
        scores[f"coverage_{label}"] = float(np.mean((lower <= observed) & (observed <= upper)))
        scores[f"width_{label}"] = float(np.mean(upper - lower))
    rho = spearman_columns(np.abs(output["mean"] - observed), output["std"])
    scores["spearman_error_std"] = float(np.nanmean(rho))
    return scores


def part_her2st(args) -> None:
    import sthisto

    root = SHARED_DATA / "her2st"
    if not root.exists():
        print(f"her2st: no data at {root}; skipped (set STHISTO_SHARED_DATA)")
        return
    adata = sthisto.io.read_her2st(root, sections=HER2ST_SECTIONS)
    sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
    adata = adata[:, adata.var["sthisto_selected"]].copy()
    print(f"\nher2st C2–C6, leave one section out, K={args.members}, 90% intervals ({adata.n_vars} genes)")
    print("| method | coverage (absolute) | width (absolute) | coverage (normalised) | width (normalised) "
          "| Spearman(abs err, std) | minutes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        start = time.perf_counter()
        folds = []
        for number, section in enumerate(HER2ST_SECTIONS):
            folds.append(_fold_scores(adata, method, HER2ST_METHODS.get(method, {}), section, number, args.members))
            print(f"  {method} fold {section}: {folds[-1]}", file=sys.stderr, flush=True)
        mean = {k: float(np.mean([f[k] for f in folds])) for k in folds[0]}
        minutes = (time.perf_counter() - start) / 60
        print(
            f"| {method} | {mean['coverage_absolute']:.3f} | {mean['width_absolute']:.3f} | "
            f"{mean['coverage_normalized']:.3f} | {mean['width_normalized']:.3f} | "
            f"{mean['spearman_error_std']:.3f} | {minutes:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["cost", "her2st"], choices=["cost", "her2st"])
    parser.add_argument("--members", type=int, default=3, help="ensemble members K")
    parser.add_argument("--samples", type=int, default=10, help="Monte-Carlo dropout passes T")
    parser.add_argument("--methods", nargs="+", default=list(HER2ST_METHODS), help="her2st methods")
    parser.add_argument("--measure", nargs=4, metavar=("MODEL", "H5AD", "MODE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        model_dir, data, mode, samples = args.measure
        measure(model_dir, data, mode, int(samples))
        return
    if "cost" in args.parts:
        part_cost(args)
    if "her2st" in args.parts:
        part_her2st(args)


if __name__ == "__main__":
    main()
