"""Learning curves of THItoGene / HGGEF on her2st under the small-data recipe (issue 14).

One fold of the her2st C2–C6 protocol: test section ``--test`` (default C2) is never touched
while training; the other four train, and the recipe holds the last of them aside for
validation. After every epoch the run records the mean per-gene Pearson r on that held-aside
training section (``model.history['val_pearson_gene']``). Printed per setting, beside ridge on
the same split (fit on the three fitted sections, scored on the held-aside one):

* the curve (per-gene PCC on the held-aside training section, per epoch);
* per-gene PCC of the kept model on its own fitted sections (does it fit the training data at
  all?), on the held-aside section and on the test section;
* wall time and steps.

Settings are ``spots:lr`` pairs (``0`` spots: whole sections)::

    python benchmarks/subsection_curve.py --method thitogene_tiny --settings 64:1e-3 0:1e-3 64:3e-3 --epochs 40

Writes ``--out`` (JSON) with every curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data"))
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def per_gene_pcc(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean per-gene Pearson r (a constant prediction counts 0; constant genes left out)."""
    from sthisto.engine._loop import pearson_per_gene_mean

    return pearson_per_gene_mean(predicted, observed)


def main(argv: list[str] | None = None) -> int:
    """Train each setting on one fold and print its learning curve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="thitogene_tiny")
    parser.add_argument("--settings", nargs="+", default=["64:1e-3", "0:1e-3"], help="spots:lr (0 spots: whole)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--test", default="C2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("subsection_curve.json"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import sthisto

    root = SHARED_DATA / "her2st"
    if not root.exists():
        print(f"no her2st data at {root}; set STHISTO_SHARED_DATA", flush=True)
        return 0
    adata = sthisto.io.read_her2st(root, sections=SECTIONS)
    sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
    adata = adata[:, adata.var["sthisto_selected"]].copy()
    sthisto.pp.normalize(adata)
    observed = np.asarray(adata.layers["sthisto_target"].toarray())
    libraries = adata.obs["library_id"].astype(str).to_numpy()
    train = [s for s in SECTIONS if s != args.test]
    held_aside = sorted(train)[-1]  # what recipe="small_data" holds aside with four training sections
    fitted = [s for s in train if s != held_aside]

    results = {}
    ridge = sthisto.tl.train(adata, "ridge", train_mask=fitted, layer="sthisto_target", store=False)
    rows = np.flatnonzero(libraries == held_aside)
    results["ridge"] = {"held_aside_pcc": per_gene_pcc(ridge.predict(adata, rows), observed[rows])}
    print(f"ridge (fit on {fitted}): per-gene PCC on {held_aside} {results['ridge']['held_aside_pcc']:.3f}")

    for setting in args.settings:
        spots, lr = setting.split(":")
        spots, lr = int(spots), float(lr)
        start = time.perf_counter()
        model = sthisto.tl.train(
            adata,
            args.method,
            train_mask=train,
            layer="sthisto_target",
            recipe="small_data",
            max_epochs=args.epochs,
            lr=lr,
            subsection_spots=spots or False,
            store=False,
            progress_bar=False,
        )
        seconds = time.perf_counter() - start
        scores = {}
        for name, sections in (("fitted", fitted), ("held_aside", [held_aside]), ("test", [args.test])):
            index = np.flatnonzero(np.isin(libraries, sections))
            scores[name] = per_gene_pcc(model.predict(adata, index), observed[index])
        curve = model.history.get("val_pearson_gene", [])
        results[setting] = {
            "curve": curve,
            "train_loss": model.history["train_loss"],
            "val_loss": model.history["val_loss"],
            "selected_epoch": model.trained_on["selected_epoch"],
            "subsections": model.trained_on["subsections"],
            "seconds": round(seconds, 1),
            **{f"{name}_pcc": value for name, value in scores.items()},
        }
        shown = " ".join(f"{v:.3f}" for v in curve)
        print(
            f"{args.method} {setting}: epochs {len(curve)}, kept {model.trained_on['selected_epoch']}, "
            f"per-gene PCC fitted {scores['fitted']:.3f} / held-aside {scores['held_aside']:.3f} / "
            f"test {scores['test']:.3f}, {seconds:.0f} s\n  curve (held-aside {held_aside}): {shown}",
            flush=True,
        )
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
