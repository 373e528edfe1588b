"""h5ad size of the her2st tutorial's object with models stored the old way and the new way.

Reproduces the preparation of ``tutorials/02_her2st.ipynb`` (the five imaged sections C2–C6,
the 785 published genes, ``pp.normalize``, the 4-NN spot graph, Macenko-normalised ``hires``
images; the decoded full-resolution images the tutorial caches in memory are not part of
the file), then, for each method, writes the object to h5ad with:

- ``train``: one ``tl.train`` model in ``uns`` with its weights (the default, before and
  after), and with ``models_dir=`` (the record references a file; its size printed apart);
- ``cv``: a 5-fold leave-one-section-out ``tl.cross_validate`` record with the old default
  (every fold's weights in ``uns``, ``store_models=True``), the new default (fold records
  without weights) and ``models_dir=`` (one file per fold).

Networks are configured on the data with random weights (sizes do not depend on training):
the records are built by the functions ``tl.train`` / ``tl.cross_validate`` use, with a
training history as long as the paper's epochs and the cross-validation's out-of-fold layer,
so every byte the real calls would store is there. Without the her2st data the tutorial's
synthetic stand-in is used (and said so).

``--real-cv METHOD`` also runs the real ``tl.cross_validate`` (one epoch per fold) with the
old and the new default, as a check that the built records are what the call stores.

Run: ``python benchmarks/stored_model_size.py [--methods thitogene_tiny hggef_tiny thitogene hggef]
[--real-cv thitogene_tiny]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data")) / "her2st"
MB = 1e6


def tutorial_object():
    """The tutorial's AnnData after section 2 (genes, targets, graph, staining)."""
    import sthisto

    if (HER2ST / "ST-cnts").is_dir():
        everything = sthisto.io.read_her2st(HER2ST)
        sections = [
            lib
            for lib in everything.obs["library_id"].cat.categories
            if bool(everything.uns["spatial"][lib]["metadata"]["has_image"])
        ]
        del everything
        adata = sthisto.io.read_her2st(HER2ST, sections=sections)
        sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
        source = f"her2st {sections}"
    else:
        print(f"NOTE: no her2st data at {HER2ST}; using the tutorial's synthetic stand-in")
        adata = sthisto.datasets.synthetic(n_sections=5, n_patients=1, n_spots=180, n_genes=60, seed=2)
        sthisto.pp.select_genes(adata, genes=list(adata.var_names))
        source = "synthetic"
    adata = adata[:, adata.var["sthisto_selected"]].copy()
    sthisto.pp.normalize(adata, genes="sthisto_selected")
    sthisto.pp.spatial_graph(adata, method="knn", n_neighbors=4)
    first = str(adata.obs["library_id"].cat.categories[0])
    sthisto.pp.stain_normalize(adata, method="macenko", reference=first, image_key="hires")
    return adata, source


def configured(adata, method: str, train_index: np.ndarray):
    """A random-initialised model of ``method`` set up on the training spots, as tl.train does."""
    from sthisto.models._registry import resolve_method

    cls, params = resolve_method(method)
    if cls.network_class is None:  # closed form (ridge): fitting is cheap and its arrays need a fit
        import sthisto

        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[train_index] = True
        return sthisto.tl.train(adata, method, train_mask=mask, store=False, progress=False)
    if "backbone_weights" in cls.network_parameter_names():
        params = {**params, "backbone_weights": None}  # no ImageNet file needed for a size
    genes = list(adata.var_names)
    model = cls.configure(adata, genes=genes, train_index=train_index, params=params)
    epochs = int({**cls.all_training_defaults(), **params}.get("max_epochs") or 1)
    model.history = {"train_loss": [float(e) for e in range(epochs)]}
    model.trained_on = {
        "libraries": sorted(set(adata.obs["library_id"].astype(str).to_numpy()[train_index])),
        "recipe": "paper",
        "target_mean": [0.0] * len(genes),
    }
    return model


def h5ad_mb(adata, folder: Path) -> float:
    path = folder / "object.h5ad"
    adata.write_h5ad(path)
    size = path.stat().st_size / MB
    path.unlink()
    return size


def files_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / MB if folder.exists() else 0.0


def measure(adata, method: str, work: Path, base: float) -> dict[str, float]:
    from sthisto._constants import Uns
    from sthisto.tl._stored_models import fold_record, model_record, plan_fold_files, train_weights_file

    libraries = adata.obs["library_id"].astype(str).to_numpy()
    sections = sorted(set(libraries))
    model = configured(adata, method, np.flatnonzero(libraries != sections[0]))
    sizes = {"weights_mb": sum(t.numel() * t.element_size() for t in model.all_state_tensors().values()) / MB}

    def with_uns(models=None, runs=None):
        store = dict(adata.uns.get(Uns.STHISTO, {}))
        if models is not None:
            store[Uns.MODELS] = models
        if runs is not None:
            store["cross_validate"] = runs
        view = adata.copy()
        view.uns[Uns.STHISTO] = store
        if runs is not None:  # the out-of-fold predictions, the same whatever is stored
            view.layers[f"cv_{method}"] = np.zeros(adata.shape, dtype=np.float32)
        return view

    # tl.train: weights in uns (default), or in a file
    sizes["train_uns"] = h5ad_mb(with_uns(models={method: model_record(model)}), work)
    folder = work / "train"
    record = model_record(model, weights_file=train_weights_file(folder, method, overwrite=False))
    sizes["train_file_h5ad"] = h5ad_mb(with_uns(models={method: record}), work)
    sizes["train_file_weights"] = files_mb(folder)
    shutil.rmtree(folder)

    # tl.cross_validate, 5 folds: one record per fold (the same network per fold; sizes do not
    # depend on the values, and one configured model keeps the memory of the full HGGEF low)
    folds = sections[:5]
    key = f"cv_{method}"

    def run(store_weights: bool, models_dir: Path | None):
        files = plan_fold_files(models_dir, key, folds, overwrite=False) if models_dir else {}
        records = {
            fold: fold_record(
                model,
                fold=fold,
                train_sections=[s for s in sections if s != fold],
                test_sections=[fold],
                train_params={"method": method, "layer": None, "seed": number},
                store_weights=store_weights,
                weights_file=files.get(fold),
            )
            for number, fold in enumerate(folds)
        }
        for stored in records.values():  # what the table adds: ~20 metrics per held-out section
            stored["metrics"] = json.dumps({stored["fold"]: {f"metric_{i}": 0.123456789 for i in range(20)}})
        return {key: {"method": method, "split": "section", "models": records}}

    sizes["cv_old_default"] = h5ad_mb(with_uns(runs=run(True, None)), work)
    sizes["cv_new_default"] = h5ad_mb(with_uns(runs=run(False, None)), work)
    folder = work / "cv"
    sizes["cv_files_h5ad"] = h5ad_mb(with_uns(runs=run(True, folder)), work)
    sizes["cv_files_weights"] = files_mb(folder)
    shutil.rmtree(folder)
    sizes["base"] = base
    sizes["n_folds"] = len(folds)
    return sizes


def real_cv(adata, method: str, work: Path) -> None:
    """The real 5-fold cross-validation, one epoch per fold, with fold weights in uns and without."""
    import sthisto

    sizes = {}
    for label, options in (("old (store_weights=True)", {"store_weights": True}), ("new default", {})):
        run = adata.copy()
        sthisto.tl.cross_validate(run, method, split="section", max_epochs=1, progress=False, **options)
        sizes[label] = h5ad_mb(run, work)
        print(f"real tl.cross_validate({method!r}, max_epochs=1), {label}: {sizes[label]:.1f} MB", flush=True)
    old, new = sizes.values()
    print(f"real cross-validation old / new: {old / new:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["thitogene_tiny", "hggef_tiny", "thitogene", "hggef"])
    parser.add_argument("--real-cv", metavar="METHOD", help="also run the real cross-validation of METHOD")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # random weights warn; here they are the point
    adata, source = tutorial_object()
    print(f"object: {source}, {adata.n_obs} spots x {adata.n_vars} genes")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = h5ad_mb(adata, work)
        print(f"h5ad without models: {base:.1f} MB\n")
        header = (
            f"{'method':<15}{'weights':>9}{'train: uns':>12}{'train: file':>20}"
            f"{'cv5: old (uns)':>16}{'cv5: new':>10}{'cv5: files':>20}{'cv old/new':>11}"
        )
        print(header)
        print("-" * len(header))
        for method in args.methods:
            s = measure(adata, method, work, base)
            print(
                f"{method:<15}{s['weights_mb']:>8.1f} {s['train_uns']:>11.1f} "
                f"{s['train_file_h5ad']:>9.1f} + {s['train_file_weights']:>6.1f} "
                f"{s['cv_old_default']:>15.1f} {s['cv_new_default']:>9.1f} "
                f"{s['cv_files_h5ad']:>9.1f} + {s['cv_files_weights']:>6.1f} "
                f"{s['cv_old_default'] / s['cv_new_default']:>9.1f}x",
                flush=True,
            )
    print(
        "\nMB of the h5ad file (+ MB of the weight files beside it). train: one tl.train model "
        "(weights in uns is the default, before and after). cv5: a 5-fold tl.cross_validate; old = every "
        "fold's weights in uns (the old default store_models=True), new = fold records without weights "
        "(the new default), files = models_dir=."
    )
    if args.real_cv:
        with tempfile.TemporaryDirectory() as tmp:
            real_cv(adata, args.real_cv, Path(tmp))


if __name__ == "__main__":
    main()
