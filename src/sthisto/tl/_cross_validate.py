"""``tl.cross_validate``: named evaluation protocols producing out-of-fold predictions.

Three protocols, each named in the stored record:

- ``split="section"``: leave-one-section-out (THItoGene / HGGEF). Sections of the same
  patient stay in training, as in the papers.
- ``split="patient"``: leave-one-patient-out (HEST-style); no tissue of the test donor is
  seen in training.
- ``split="spots"``: HisToSGE's random hold-out within each section; one model per section,
  trained on the remaining spots of that section only.

Nothing is chosen on a test fold: gene-selection rules run on each fold's training spots, and
any validation split inside a fold (``validation=`` of :func:`sthisto.tl.train`) is drawn
from that fold's training data.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_record_writable, check_writable, record, sthisto_uns, write
from .._constants import Layers, ModelRecord, Obs, Uns, Var
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input
from ..pp._patches import library_ids

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._protocol import ExpressionModel

_FUNCTION = "cross_validate"
SPLITS = {
    "section": "leave-one-section-out: each test fold is one section; all other sections train",
    "patient": "leave-one-patient-out: each test fold is all sections of one patient; other patients train",
    "spots": "random hold-out within each section: one model per section trained on its remaining spots",
}
DEFAULT_SPOTS_FRACTION = 0.5
"""HisToSGE holds out half of each section's spots."""

# tl.train arguments cross_validate sets itself; passing them through **train_params is an error.
_RESERVED = {"genes": "genes", "layer": "layer", "train_mask": "split/folds", "key_added": "key_added",
             "seed": "seed", "store": "store_weights / models_dir", "models_dir": "models_dir",
             "overwrite": "overwrite"}  # fmt: skip


def _engine_arguments() -> set[str]:
    """tl.train's own keyword arguments (not method parameters), read from its signature."""
    from ._train import train

    parameters = inspect.signature(train).parameters
    return {n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - set(_RESERVED)


_GENE_RULE_FLAVORS = {"hvg": "seurat", "seurat": "seurat", "seurat_v3": "seurat_v3", "cell_ranger": "cell_ranger",
                      "per_section_union": "per_section_union"}  # fmt: skip


@dataclass
class Fold:
    """One train/test split: spots are positions into ``adata.obs``."""

    name: str
    units: list[str]
    train: np.ndarray
    test: np.ndarray
    genes: list[str] = field(default_factory=list)


@dataclass
class _Task:
    method: Any
    method_name: str
    fold: str
    genes: list[str]
    train: np.ndarray
    test: np.ndarray
    reference: np.ndarray | None
    seed: int
    layer: str | None
    device: Any
    train_kwargs: dict
    store_weights: bool
    weights_file: tuple[Path, str] | None = None
    calibration: np.ndarray | None = None
    uncertainty: str | None = None
    interval: float | None = None
    n_samples: int = 20


# --- fold plans -------------------------------------------------------------------------------------
def plan_folds(adata, split: str, folds=None, *, seed: int = 0) -> list[Fold]:
    """Train/test spots of every fold of a named protocol (see :func:`cross_validate`)."""
    if split not in SPLITS:
        raise InputError(f"unknown split={split!r}; use one of {list(SPLITS)}.")
    libraries = library_ids(adata)
    if split == "spots":
        fraction = DEFAULT_SPOTS_FRACTION if folds is None else folds
        if isinstance(fraction, bool) or not isinstance(fraction, (float, int)) or not 0 < float(fraction) < 1:
            raise InputError(
                f"split='spots' takes folds=<fraction of each section's spots held out> in (0, 1) "
                f"(default {DEFAULT_SPOTS_FRACTION}); got {folds!r}. To test only some sections, subset adata."
            )
        plan = []
        for number, library in enumerate(_ordered(adata, Obs.LIBRARY_ID)):
            rows = np.flatnonzero(libraries == library)
            n_test = int(round(float(fraction) * len(rows)))
            if n_test < 1 or n_test >= len(rows):
                raise InputError(
                    f"section {library!r} has {len(rows)} spots: holding out a fraction {fraction} leaves no "
                    f"training or no test spot. Use a fraction that keeps both, or drop tiny sections."
                )
            rng = np.random.default_rng([int(seed), number])
            test = np.sort(rng.choice(rows, size=n_test, replace=False))
            plan.append(Fold(str(library), [str(library)], np.setdiff1d(rows, test), test))
        return plan

    if _is_split_folder(folds):
        return _hest_split_plan(adata, Path(folds), libraries)
    column = Obs.LIBRARY_ID if split == "section" else Obs.PATIENT
    if column not in adata.obs:
        raise MissingKeyError(
            "split='patient' needs obs['patient'] (the donor of each spot), which is missing. Add it "
            "(e.g. adata.obs['patient'] = adata.obs['library_id'].str[0] for her2st), or use split='section'."
        )
    units_of_spot = adata.obs[column].astype(object).to_numpy()
    if pd.isna(units_of_spot).any():
        raise InputError(f"obs[{column!r}] has missing values; every spot needs one for split={split!r}.")
    units_of_spot = units_of_spot.astype(str)
    units = [str(u) for u in _ordered(adata, column)]
    if len(units) < 2:
        raise InputError(
            f"split={split!r} needs at least two distinct values of obs[{column!r}] (found {units}); "
            f"use split='spots' for a single section."
        )
    if folds is None:
        chosen = units
    else:
        if isinstance(folds, (float, int)) and not isinstance(folds, bool):
            raise InputError(f"split={split!r} takes folds=None or a list of {column} values to test; got {folds!r}.")
        chosen = [str(folds)] if isinstance(folds, str) else [str(f) for f in folds]
        unknown = sorted(set(chosen) - set(units))
        if unknown:
            raise MissingKeyError(f"folds names {unknown}, which are not values of obs[{column!r}] ({units}).")
        if len(set(chosen)) != len(chosen):
            raise InputError("folds lists a value twice; pass each test fold once.")
    plan = []
    for unit in chosen:
        test = np.flatnonzero(units_of_spot == unit)
        plan.append(Fold(unit, [unit], np.flatnonzero(units_of_spot != unit), test))
    return plan


def _is_split_folder(folds) -> bool:
    """Whether ``folds`` names a folder of HEST-Benchmark split files (``train_<k>.csv`` / ``test_<k>.csv``)."""
    if isinstance(folds, Path):
        return True
    return isinstance(folds, str) and Path(folds).expanduser().is_dir()


def _hest_split_plan(adata, folder: Path, libraries: np.ndarray) -> list[Fold]:
    """Folds read from HEST-Benchmark's ``splits/`` folder: samples are matched to ``library_id``."""
    import re

    folder = folder.expanduser()
    if not folder.is_dir():
        raise InputError(
            f"folds={str(folder)!r} is not a folder; pass HEST's splits/ folder (train_0.csv, test_0.csv, ...)."
        )
    pattern = re.compile(r"^(train|test)_(\d+)\.csv$")
    found: dict[int, dict[str, Path]] = {}
    for file in folder.iterdir():
        match = pattern.match(file.name)
        if match:
            found.setdefault(int(match.group(2)), {})[match.group(1)] = file
    incomplete = sorted(k for k, pair in found.items() if len(pair) != 2)
    if not found or incomplete:
        raise InputError(
            f"{str(folder)!r} holds no complete HEST split pairs (train_<k>.csv with test_<k>.csv)"
            + (f"; fold(s) {incomplete} lack one file" if incomplete else "")
            + ". Point folds= at a HEST-Benchmark task's splits/ folder."
        )
    present = set(libraries)
    patients = adata.obs[Obs.PATIENT].astype(str).to_numpy() if Obs.PATIENT in adata.obs else None
    plan, tested = [], set()
    for k in sorted(found):
        samples = {}
        for role, file in found[k].items():
            try:
                table = pd.read_csv(file)
            except Exception as err:
                raise InputError(f"could not read HEST split file {str(file)!r}: {err}.") from err
            if "sample_id" not in table.columns:
                raise InputError(
                    f"HEST split file {str(file)!r} has no 'sample_id' column (it has {list(table.columns)})."
                )
            samples[role] = [str(v) for v in table["sample_id"]]
            missing = sorted(set(samples[role]) - present)
            if missing:
                raise MissingKeyError(
                    f"HEST split {file.name} names samples {missing[:10]} that are not values of obs['library_id']. "
                    f"Read them too (sthisto.io.read_hest(root, sample_ids=...)), or subset the split files."
                )
        overlap = sorted(set(samples["train"]) & set(samples["test"]))
        if overlap:
            raise InputError(f"HEST split fold {k} lists samples {overlap} in both train_{k}.csv and test_{k}.csv.")
        repeated = sorted(set(samples["test"]) & tested)
        if repeated:
            raise InputError(f"HEST split fold {k} tests samples {repeated} already tested by an earlier fold.")
        tested |= set(samples["test"])
        train = np.flatnonzero(np.isin(libraries, samples["train"]))
        test = np.flatnonzero(np.isin(libraries, samples["test"]))
        if patients is not None:
            shared = sorted(set(patients[train]) & set(patients[test]))
            if shared:
                logger.warning(
                    "HEST split fold %d: patient(s) %s have samples on both sides; the split is not patient-level "
                    "for these obs['patient'] values.",
                    k,
                    shared[:10],
                )
        plan.append(Fold(f"fold{k}", sorted(set(samples["test"])), train, test))
    return plan


def read_gene_list(path) -> list[str]:
    """Gene names from a HEST gene-list JSON (``{"genes": [...]}``) or a text file, one per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"gene list file {str(path)!r} does not exist.")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            content = json.loads(text)
            genes = content.get("genes") if isinstance(content, dict) else content
        else:
            genes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    except (OSError, ValueError) as err:
        raise InputError(f"could not read gene list {str(path)!r}: {err}.") from err
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise InputError(
            f"gene list {str(path)!r} must be a JSON list or an object with a 'genes' list (HEST's "
            f"var_50genes.json), or a text file with one gene per line."
        )
    return genes


def _ordered(adata, column: str) -> list:
    values = adata.obs[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.astype(object).dropna())
        return [c for c in values.cat.categories if c in present]
    return sorted(pd.unique(values.dropna()), key=str)


# --- gene selection per fold ------------------------------------------------------------------------
def _gene_rule(adata, genes) -> tuple[str, Any]:
    """``("given", [names])`` or ``("per_fold_training_data", rule)``."""
    from ._train import SELECTED_GENES_KEY, _resolve_genes

    if callable(genes):
        return "per_fold_training_data", genes
    if isinstance(genes, Path) or (
        isinstance(genes, str) and genes.lower().endswith((".json", ".txt")) and genes not in adata.var
    ):
        genes = read_gene_list(genes)
    if isinstance(genes, str) and ":" in genes and genes not in adata.var:
        flavor, _, number = genes.partition(":")
        if flavor not in _GENE_RULE_FLAVORS or not number.isdigit() or int(number) < 1:
            raise InputError(
                f"genes={genes!r} is not a gene rule. Use '<flavor>:<n>' with flavor in "
                f"{sorted(_GENE_RULE_FLAVORS)} ('hvg' = scanpy 'seurat'), e.g. 'hvg:1000', a callable, a list "
                f"of names, or a boolean var column."
            )
        return "per_fold_training_data", (_GENE_RULE_FLAVORS[flavor], int(number))
    if genes is None and SELECTED_GENES_KEY in adata.var:
        genes = SELECTED_GENES_KEY
    return "given", _resolve_genes(adata, genes)


def _selection_on_all_spots(adata, genes) -> str | None:
    """Describe a given ``var`` selection that a data-driven rule made on all spots; None if not.

    A boolean ``var`` column written by :func:`sthisto.pp.select_genes` with a rule (not a
    given list), or scanpy's ``highly_variable`` with its ``uns['hvg']`` record, looked at every
    spot, test folds included: the genes a fold predicts then depend on its test spots.
    """
    from ._train import SELECTED_GENES_KEY

    column = SELECTED_GENES_KEY if genes is None else genes
    if not isinstance(column, str) or column not in adata.var:
        return None
    made = adata.uns.get(Uns.STHISTO, {}).get("select_genes", {}).get(column)
    if made is not None:
        flavor = str(np.asarray(made.get("flavor", "given")).item())
        if flavor == "given":
            return None
        n_top = made.get("n_top_genes")
        n_top = int(np.asarray(n_top).item()) if n_top is not None else "<n>"
        return (
            f"var[{column!r}] was selected by sthisto.pp.select_genes(flavor={flavor!r}, n_top_genes={n_top}) on "
            f"all spots, including test folds. Pass genes='{flavor}:{n_top}' to select on each fold's training spots."
        )
    hvg = adata.uns.get("hvg")
    if column == "highly_variable" and isinstance(hvg, dict):
        flavor = str(np.asarray(hvg.get("flavor", "seurat")).item())
        flavor = flavor if flavor in _GENE_RULE_FLAVORS else "seurat_v3"
        return (
            f"var['highly_variable'] was selected by scanpy.pp.highly_variable_genes(flavor={flavor!r}) on all "
            f"spots, including test folds. Pass genes='{flavor}:<n>' to select on each fold's training spots."
        )
    return None


def _training_view(adata, train: np.ndarray):
    """A light AnnData of a fold's training spots (counts, obs, var; no images) for gene rules."""
    import anndata as ad

    return ad.AnnData(X=adata.X[train].copy(), obs=adata.obs.iloc[train].copy(), var=adata.var.copy())


def _fold_genes(adata, rule, fold: Fold) -> list[str]:
    from ..pp._genes import select_genes

    view = _training_view(adata, fold.train)
    if callable(rule):
        chosen = rule(view)
        if isinstance(chosen, str) or chosen is None:
            raise InputError(
                f"the genes callable returned {chosen!r} for fold {fold.name!r}; it must return gene names."
            )
        chosen = [str(g) for g in chosen]
    else:
        flavor, n_top = rule
        select_genes(view, flavor=flavor, n_top_genes=n_top, key_added="selected")
        chosen = view.var_names[view.var["selected"].to_numpy(dtype=bool)].astype(str).tolist()
    unknown = [g for g in chosen if g not in set(adata.var_names.astype(str))]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise InputError(
            f"gene selection for fold {fold.name!r} gave {len(chosen)} genes"
            + (f", {len(unknown)} not in var_names (e.g. {unknown[:5]})" if unknown else "")
            + (" with repeats" if len(set(chosen)) != len(chosen) else "")
            + "; a rule must return unique measured gene names."
        )
    return chosen


# --- fitting one fold (in-process or in a worker) ---------------------------------------------------
def _fit_task(adata, task: _Task) -> dict:
    from ._stored_models import fold_record
    from ._train import train, weights_fields

    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[task.train] = True
    model = train(
        adata,
        task.method,
        genes=task.genes,
        layer=task.layer,
        train_mask=mask,
        store=False,
        seed=task.seed,
        device=task.device,
        **task.train_kwargs,
    )
    spread = {}
    if task.uncertainty is None and task.interval is None and not model.members:
        predictions = model.predict(adata, task.test, device=task.device)
    else:
        spread = _fold_spread(adata, model, task)
        predictions = spread.pop("mean")
    reference = model.predict(adata, task.reference, device=task.device) if task.reference is not None else None
    libraries = library_ids(adata)
    model_record = fold_record(
        model,
        fold=task.fold,
        train_sections=sorted(set(libraries[task.train])),
        test_sections=sorted(set(libraries[task.test])),
        # what tl.train needs, besides genes and train_mask, to train this fold's model again
        train_params={"method": task.method_name, "layer": task.layer, "seed": task.seed, **task.train_kwargs},
        store_weights=task.store_weights,
        weights_file=task.weights_file,
    )
    return {
        "predictions": np.asarray(predictions, dtype=np.float32),
        "reference": None if reference is None else np.asarray(reference, dtype=np.float32),
        "genes": list(model.genes),
        "target": model.data_params.get("target"),
        "target_layer": model.data_params.get("target_layer"),
        "history": json.dumps(model.history),
        "member_histories": json.dumps([member.history for member in model.members]),
        "trained_on": json.dumps(model.trained_on, default=str),
        "record": model_record,
        "device": str(task.device),
        **weights_fields(model),
        "spread": spread,
        "calibration": {
            "n_spots": 0 if task.calibration is None else int(len(task.calibration)),
            "libraries": [] if task.calibration is None else sorted(set(library_ids(adata)[task.calibration])),
        },
    }


def _fold_spread(adata, model, task: _Task) -> dict:
    """Calibrate on the fold's held-aside training spots, then predict the test spots with spread."""
    from ._calibrate import ABSOLUTE, calibrate_model, interval_bounds
    from ._uncertainty import predictive

    if task.calibration is not None:
        calibrate_model(
            model,
            adata,
            task.calibration,
            alpha=round(1 - float(task.interval), 10),
            uncertainty=task.uncertainty,
            levels=[float(task.interval)],
            n_samples=task.n_samples,
            seed=task.seed,
            device=task.device,
        )
    output = predictive(
        model, adata, task.test, uncertainty=task.uncertainty, n_samples=task.n_samples, seed=task.seed,
        device=task.device,
    )  # fmt: skip
    out = {k: output[k] for k in ("mean", "std") if k in output}
    if task.interval is not None:
        entry = model.calibration.get(task.uncertainty) or model.calibration[ABSOLUTE]
        std = output.get("std") if entry["conformal"] == "normalized" else None
        out["lower"], out["upper"] = interval_bounds(entry, output["mean"], std, float(task.interval))
    return out


def _calibration_split(adata, fold: Fold, calibration, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training spots into (training, calibration) spots, from training data only."""
    rng = np.random.default_rng(seed)
    if calibration == "section":
        libraries = library_ids(adata)[fold.train]
        sections = sorted(set(libraries))
        if len(sections) < 2:
            raise InputError(
                f"calibration='section' holds one training section aside, but fold {fold.name!r} trains on "
                f"{len(sections)} section. Pass calibration=0.2 (a fraction of the training spots) instead."
            )
        held = sections[int(rng.integers(len(sections)))]
        return fold.train[libraries != held], fold.train[libraries == held]
    held = np.zeros(len(fold.train), dtype=bool)
    held[rng.choice(len(fold.train), size=max(1, int(round(float(calibration) * len(fold.train)))), replace=False)] = (
        True
    )
    return fold.train[~held], fold.train[held]


def _check_spread_options(uncertainty, interval, calibration) -> None:
    from ._uncertainty import check_mode

    check_mode(uncertainty)
    if interval is not None and (isinstance(interval, bool) or not 0 < float(interval) < 1):
        raise InputError(f"interval={interval!r} must be a coverage level between 0 and 1, e.g. 0.9.")
    if calibration is not None:
        fraction = not isinstance(calibration, (str, bool)) and isinstance(calibration, (int, float))
        if calibration != "section" and not (fraction and 0 < float(calibration) < 1):
            raise InputError(
                f"calibration={calibration!r}; use 'section' (one training section held aside per fold) or a "
                f"fraction of the training spots such as 0.2."
            )
        if interval is None:
            raise InputError("calibration= fits intervals: pass interval=0.9 (the coverage level) as well.")
    elif interval is not None:
        raise InputError(
            "interval= needs calibration inside each fold: pass calibration='section' or a fraction such as 0.2."
        )


_WORKER: dict[str, Any] = {}


def _init_worker(adata, device_queue, n_threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n_threads)))
    _WORKER["adata"] = adata
    _WORKER["device"] = device_queue.get() if device_queue is not None else None


def _worker_fit(task: _Task) -> dict:
    if _WORKER.get("device") is not None:
        task.device = _WORKER["device"]
    return _fit_task(_WORKER["adata"], task)


def _run_tasks(adata, tasks: list[_Task], *, n_jobs: int, devices: list | None, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    from ..encoders._provenance import RandomWeightsWarning

    bar = tqdm(total=len(tasks), desc="cross-validation folds", disable=not progress, unit="fold")
    results: list[dict] = []
    try:
        if n_jobs == 1:
            warned: set[str] = set()
            for task in tasks:
                logger.info("cross_validate: %s, fold %r (%d train / %d test spots)", task.method_name,
                            task.fold, len(task.train), len(task.test))  # fmt: skip
                with warnings.catch_warnings():
                    if task.method_name in warned:  # later folds would repeat the first one's warning
                        warnings.simplefilter("ignore", RandomWeightsWarning)
                    results.append(_fit_task(adata, task))
                warned.add(task.method_name)
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")  # fork is unsafe with torch threads and CUDA
        queue = None
        if devices:
            queue = context.Queue()
            for worker in range(n_jobs):
                queue.put(devices[worker % len(devices)])
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        pool = ProcessPoolExecutor(
            max_workers=n_jobs, mp_context=context, initializer=_init_worker, initargs=(adata, queue, threads)
        )
        try:
            futures = [pool.submit(_worker_fit, task) for task in tasks]
            for future in futures:
                results.append(future.result())
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed fold stops the folds not yet started
            raise
        pool.shutdown(wait=True)
        return results
    finally:
        bar.close()


# --- the public function ----------------------------------------------------------------------------
@checked_input(genes=True)
def cross_validate(
    adata: AnnData,
    method: str | type[ExpressionModel] | Sequence[str | type[ExpressionModel]],
    *,
    split: str = "section",
    folds: Sequence[str] | float | None = None,
    key_added: str | None = None,
    seed: int = 0,
    genes: Sequence[str] | str | Callable | None = None,
    layer: str | None = None,
    labels_key: str | None = None,
    evaluate_params: dict | None = None,
    method_params: dict[str, dict] | None = None,
    store_weights: bool | None = None,
    models_dir: str | Path | None = None,
    store_models: bool | None = None,
    uncertainty: str | None = None,
    interval: float | None = None,
    calibration: str | float | None = None,
    n_samples: int = 20,
    n_jobs: int = 1,
    devices: Sequence | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **train_params: Any,
) -> pd.DataFrame:
    """Train one model per fold of a named protocol and score its out-of-fold predictions.

    Parameters
    ----------
    adata
        AnnData in the sthisto convention with raw counts in ``X``.
    method
        A method (name, variant, or :class:`~sthisto.models.ExpressionModel` subclass) or a
        list of them; a list is compared on identical folds, gene sets and seeds.
    split
        ``"section"`` — leave-one-section-out (THItoGene / HGGEF papers); ``"patient"`` —
        leave-one-patient-out (HEST-style, needs ``obs['patient']``); ``"spots"`` — HisToSGE's
        random hold-out of a fraction of each section's spots, one model per section trained
        on the rest of that section.
    folds
        ``"section"`` / ``"patient"``: ``None`` (every section / patient is a test fold once)
        or the list of sections / patients to test (all others still train every fold).
        ``"spots"``: the fraction of each section's spots held out (default 0.5).
        A folder (``str`` or :class:`~pathlib.Path`) of HEST-Benchmark split files
        (``train_<k>.csv`` / ``test_<k>.csv`` with a ``sample_id`` column, as in
        ``bench_data/<task>/splits/``): fold ``k`` trains on the listed training samples and
        tests on the listed test samples, matched to ``obs['library_id']`` (the sample ids
        :func:`sthisto.io.read_hest` gives).
    key_added
        Output key. One method: default ``f"cv_{method}"``. A list: the prefix (default
        ``"cv"``) of the per-method keys ``f"{key_added}_{method}"``.
    seed
        Fold ``i`` trains with seed ``seed + i`` (the same for every method); the spots split
        draws its hold-out from ``seed``.
    genes
        Genes to predict. Taken as given: a list, a boolean ``var`` column, or ``None``
        (``var['sthisto_selected']`` when present, else all genes); a column that
        :func:`sthisto.pp.select_genes` filled by a rule (or scanpy's ``highly_variable``) saw
        the test folds, which is warned about and recorded. Computed on each fold's
        training spots only: a rule ``"<flavor>:<n>"`` (``hvg`` = scanpy ``seurat``,
        ``seurat_v3``, ``cell_ranger``, ``per_section_union``; see
        :func:`sthisto.pp.select_genes`), or a callable receiving an AnnData of the fold's
        training spots (``X``, ``obs``, ``var``; no images) and returning gene names. A path
        to a gene-list file is read as a given list: HEST's ``var_50genes.json``
        (``{"genes": [...]}``) or a text file with one gene per line.
    layer
        Train on (and score against) this layer instead of normalising ``X`` with the
        method's target transform. It must not depend on test spots (per-spot transforms
        are fine).
    labels_key
        ``obs`` column of annotations for ARI / NMI (see :func:`sthisto.tl.evaluate`).
    evaluate_params
        Further keyword arguments of :func:`sthisto.tl.evaluate` (e.g. ``n_neighbors``, or
        ``seed`` of the clustering, which stays 0 — the papers' ``random_state`` — whatever
        the training ``seed``).
    method_params
        Per-method parameters, ``{method name: {param: value}}``, on top of ``train_params``.
    store_weights
        Keep each fold's weights in its record in ``uns`` (safetensors bytes). Default: no
        weights; each fold's record keeps what was trained (manifest with method, parameters,
        genes, recipe, history and weight provenance; training and test sections; the
        :func:`sthisto.tl.train` arguments; held-out metrics), because a full network is
        hundreds of MB per fold. With ``models_dir`` the weights go to files instead.
    models_dir
        Folder for the folds' weights: one safetensors file per fold,
        ``<models_dir>/<key>/<fold>.safetensors``, referenced by the fold's record with its
        SHA-256 (checked on loading). Existing files are refused unless ``overwrite=True``.
    store_models
        Deprecated: use ``store_weights``.
    uncertainty
        Spread of the out-of-fold predictions (see :func:`sthisto.tl.predict`), written to
        ``layers[f"{k}_std"]``; ``"ensemble"`` needs ``n_members=K`` (a :func:`sthisto.tl.train`
        argument, passed through).
    interval
        Coverage level of conformal intervals on the test spots, written to
        ``layers[f"{k}_lower"]`` / ``[f"{k}_upper"]``; needs ``calibration``.
    calibration
        Calibrate inside each fold on training data only: ``"section"`` holds one training
        section (drawn with the fold's seed) out of training and calibrates on it; a fraction
        such as ``0.2`` holds that share of the training spots aside. The fold's model then
        trains on the rest. With ``uncertainty`` the intervals are normalised by the spread.
    n_samples
        Monte-Carlo dropout passes (``uncertainty="dropout"``).
    n_jobs
        Folds trained at once. ``1``: in this process, one after another. ``> 1``: a pool of
        ``n_jobs`` spawned worker processes, each receiving a copy of ``adata`` and
        ``cpu_count // n_jobs`` torch threads; ``-1``: one per device (or per CPU core).
        Results are identical to ``n_jobs=1`` (each fold is seeded on its own). Methods passed
        as classes must be importable (defined in a module, not in ``__main__`` of a notebook).
    devices
        Devices for the folds, e.g. ``["cuda:0", "cuda:1"]``: worker ``i`` uses
        ``devices[i % len(devices)]`` (with ``n_jobs=1`` the first one). Each fold trains on
        one device. Mutually exclusive with ``device=``.
    progress
        Show a progress bar over folds.
    overwrite
        Replace existing outputs under the same keys.
    **train_params
        Passed to :func:`sthisto.tl.train` for every fold (``max_epochs``, ``validation``,
        ``device``, ``recipe="paper" | "small_data"``, method parameters such as ``lr``).
        Two calls that differ only in ``recipe`` compare the recipes on identical folds; the
        table's ``recipe`` column says which one trained each row's models, and its
        ``gene_mean`` column scores each fold's gene-mean predictor (see
        :func:`sthisto.tl.evaluate`).

    Returns
    -------
    The tidy metrics table: columns ``method``, ``predicted`` (the layer key), ``split``,
    ``evaluated_on`` (``"held_out"``; with ``split="spots"`` also ``"training_reference"``
    rows scoring the models on their own training spots, a reference figure only),
    ``weights`` and ``random_weights`` (where the weights of the folds' pretrained components
    came from: ``random``, ``file:<sha256[:12]>``, ``hub:<id>@<revision>``, ``none`` when
    nothing is pretrained; see :func:`sthisto.encoders.weights_label`), ``group``, ``scope``,
    ``metric``, ``value``, ``genes`` (see :func:`sthisto.tl.evaluate`).

    Writes, for each method key ``k`` (``key_added`` for one method):

    - ``layers[k]``: out-of-fold predictions aligned with ``var`` (model output scale). Dense
      when every gene is predicted, else CSR holding the predicted genes. Spots that were in
      no test fold (training spots of the spots split, sections outside ``folds``) are NaN.
    - ``var[f"{k}_predicted"]``: genes predicted in at least one fold.
    - ``obs[f"{key_added}_fold"]``: the fold in which each spot was held out (NaN if never).
    - ``uns['sthisto']['cross_validate'][k]``: ``method``, ``split``, ``split_description``,
      ``fold_key``, ``gene_selection`` (``"given"``, ``"per_fold_training_data"``, or
      ``"selected_on_all_spots"`` for a given ``var`` selection that a data-driven rule made
      on every spot, test folds included, which also logs a warning), ``gene_selection_note``
      (what was selected how, empty otherwise), ``genes_rule``, ``genes`` (union), ``folds``
      (per fold: ``test`` units, spot counts, ``genes``, ``target``, ``target_layer``,
      ``seed``, ``device``, ``trained_on``, ``history`` as JSON, ``weights``,
      ``random_weights``, ``weights_provenance`` as JSON), ``weights`` / ``random_weights``
      over the folds, ``models`` (per fold: a record with ``manifest``, ``fold``,
      ``train_sections``, ``test_sections``, ``train_params`` and ``metrics`` as JSON,
      ``weights_stored`` = ``"none"`` / ``"uns"`` / ``"file"``, and the weights or the file's
      ``weights_file``, ``weights_name``, ``weights_sha256``, ``weights_bytes``; rebuild a fold's
      model with ``sthisto.tl.get_model(adata, k, fold=<fold>)``),
      ``table`` (this method's rows);
    - ``uns['sthisto']['evaluate'][k]``: the :func:`sthisto.tl.evaluate` result.
    - With a list: ``uns['sthisto']['cross_validate'][key_added]`` holds ``methods``,
      ``keys`` and the combined ``table``.

    Examples
    --------
    >>> table = sthisto.tl.cross_validate(adata, ["ridge", "thitogene"], split="patient", max_epochs=50)
    >>> table.query("scope == 'overall' and metric == 'pearson_gene_mean'")
    """
    from ..models._registry import resolve_method
    from ._evaluate import evaluate, group_metrics, metric_frames
    from ._stored_models import fold_metrics, plan_fold_files, resolve_weights_option

    # ---- validate everything before any work --------------------------------------------------
    keep_weights, models_dir = resolve_weights_option(store_weights, models_dir, store_models)
    methods = list(method) if isinstance(method, (list, tuple)) else [method]
    if not methods:
        raise InputError("method=[] is empty; pass a method name or a list of them.")
    resolved = []
    for item in methods:
        cls, variant_params = resolve_method(item)
        name = item.lower() if isinstance(item, str) else cls.name
        resolved.append((item, name, cls, variant_params))
    names = [name for _, name, _, _ in resolved]
    if len(set(names)) != len(names):
        raise InputError(f"method lists {names}: each method once, please (use key_added per run for repeats).")
    for key in train_params:
        if key in _RESERVED:
            raise InputError(
                f"{key}= is set by cross_validate for every fold; use cross_validate's {_RESERVED[key]}= instead."
            )
    if devices is not None and "device" in train_params:
        raise InputError("pass either devices=[...] (one per worker) or device=..., not both.")
    method_params = dict(method_params or {})
    unknown_methods = sorted(set(method_params) - set(names))
    if unknown_methods:
        raise InputError(f"method_params names {unknown_methods}, which are not among the methods {names}.")
    engine = _engine_arguments()
    for _, name, cls, variant_params in resolved:
        own = {k: v for k, v in {**train_params, **method_params.get(name, {})}.items() if k not in engine}
        cls.split_params({**variant_params, **own})  # raises on unknown parameters, listing valid ones
    if int(n_jobs) != n_jobs or (n_jobs < 1 and n_jobs != -1):
        raise InputError(f"n_jobs={n_jobs!r} must be a positive integer or -1.")
    devices = None if devices is None else ([devices] if isinstance(devices, str) else list(devices))
    if devices is not None and not devices:
        raise InputError("devices=[] is empty; pass device names such as ['cuda:0', 'cuda:1'] or None.")
    if n_jobs == -1:
        n_jobs = len(devices) if devices else (os.cpu_count() or 1)
    if layer is not None and layer not in adata.layers:
        raise MissingKeyError(f"layer={layer!r} is not in adata.layers ({sorted(adata.layers)}).")
    if labels_key is not None and labels_key not in adata.obs:
        raise MissingKeyError(f"labels_key={labels_key!r} is not an obs column.")
    evaluate_params = dict(evaluate_params or {})
    bad_eval = sorted(set(evaluate_params) & {"predicted", "observed", "key_added", "labels_key", "copy", "overwrite"})
    if bad_eval:
        raise InputError(f"evaluate_params may not set {bad_eval}; cross_validate sets them.")
    unknown_eval = sorted(set(evaluate_params) - set(inspect.signature(evaluate).parameters))
    if unknown_eval:
        raise InputError(f"evaluate_params has {unknown_eval}, which sthisto.tl.evaluate does not accept.")

    _check_spread_options(uncertainty, interval, calibration)
    members = train_params.get("n_members")
    if (
        uncertainty == "ensemble"
        and (members if members is not None else 1) < 2
        and train_params.get("recipe", "paper") != "small_data"
    ):
        raise InputError("uncertainty='ensemble' trains ensembles in every fold: pass n_members=K (K >= 2) as well.")
    plan = plan_folds(adata, split, folds, seed=seed)
    gene_selection, rule = _gene_rule(adata, genes)
    leak = _selection_on_all_spots(adata, genes) if gene_selection == "given" else None
    if leak is not None:
        logger.warning("cross_validate: %s The held-out scores are optimistic.", leak)

    single = len(resolved) == 1
    prefix = key_added or ("cv" if not single else f"cv_{names[0]}")
    keys = {name: (prefix if single else f"{prefix}_{name}") for name in names}
    fold_key = f"{prefix}_fold"
    check_writable(adata, "obs", fold_key, overwrite=overwrite)
    for key in keys.values():
        check_writable(adata, "layers", key, overwrite=overwrite)
        check_writable(adata, "var", Var.predicted(key), overwrite=overwrite)
        check_record_writable(adata, _FUNCTION, key, overwrite=overwrite)
        check_record_writable(adata, "evaluate", key, overwrite=overwrite)
        for name in _companion_names(uncertainty, interval):
            check_writable(adata, "layers", Layers.companion(key, name), overwrite=overwrite)
    if not single:
        check_record_writable(adata, _FUNCTION, prefix, overwrite=overwrite)
    weight_files = {}
    if models_dir is not None:
        weight_files = {
            name: plan_fold_files(models_dir, key, [f.name for f in plan], overwrite=overwrite)
            for name, key in keys.items()
        }
    existed = {path for files in weight_files.values() for path, _ in files.values() if path.exists()}

    # ---- gene sets (training spots only when a rule) -----------------------------------------
    for fold in plan:
        fold.genes = list(rule) if gene_selection == "given" else _fold_genes(adata, rule, fold)

    # ---- train every (method, fold) -----------------------------------------------------------
    tasks = []
    for item, name, _, _ in resolved:
        kwargs = {**train_params, **method_params.get(name, {})}
        if "progress_bar" not in kwargs:  # the deprecated spelling still reaches tl.train, which warns
            kwargs.setdefault("progress", False)
        device = kwargs.pop("device", "auto")
        checkpoint_dir = kwargs.pop("checkpoint_dir", None)
        for number, fold in enumerate(plan):
            fold_train, held = fold.train, None
            if calibration is not None:
                fold_train, held = _calibration_split(adata, fold, calibration, int(seed) + number)
            fold_kwargs = dict(kwargs)
            if checkpoint_dir is not None:
                fold_kwargs["checkpoint_dir"] = Path(checkpoint_dir) / name / fold.name
            tasks.append(
                _Task(
                    method=item,
                    method_name=name,
                    fold=fold.name,
                    genes=fold.genes,
                    train=fold_train,
                    test=fold.test,
                    reference=fold.train if split == "spots" else None,
                    seed=int(seed) + number,
                    layer=layer,
                    device=devices[0] if devices else device,
                    train_kwargs=fold_kwargs,
                    store_weights=keep_weights,
                    weights_file=weight_files.get(name, {}).get(fold.name),
                    calibration=held,
                    uncertainty=uncertainty,
                    interval=interval,
                    n_samples=int(n_samples),
                )
            )
    try:
        results = _run_tasks(adata, tasks, n_jobs=int(n_jobs), devices=devices, progress=progress)
    except BaseException:
        # A failed run writes no record, so files of its finished folds would be orphans.
        for files in weight_files.values():
            for path, _ in files.values():
                if path not in existed:
                    path.unlink(missing_ok=True)
        raise

    # ---- write outputs ------------------------------------------------------------------------
    fold_of = np.full(adata.n_obs, None, dtype=object)
    for fold in plan:
        fold_of[fold.test] = fold.name
    write(adata, "obs", fold_key, pd.Categorical(fold_of, categories=[f.name for f in plan]), overwrite=overwrite)

    var_names = pd.Index(adata.var_names.astype(str))
    tables = []
    for _, name, cls, variant_params in resolved:
        key = keys[name]
        method_results = [(task, result) for task, result in zip(tasks, results) if task.method_name == name]
        union = sorted({g for _, r in method_results for g in r["genes"]}, key=var_names.get_loc)
        columns = var_names.get_indexer(union)
        block = np.full((adata.n_obs, len(union)), np.nan, dtype=np.float32)
        position = {g: i for i, g in enumerate(union)}
        for task, result in method_results:
            cols = np.asarray([position[g] for g in result["genes"]])
            block[np.ix_(task.test, cols)] = result["predictions"]
        write(adata, "layers", key, _aligned_layer(block, columns, adata.n_vars), overwrite=overwrite)
        for companion in _companion_names(uncertainty, interval):
            extra = np.full((adata.n_obs, len(union)), np.nan, dtype=np.float32)
            for task, result in method_results:
                cols = np.asarray([position[g] for g in result["genes"]])
                extra[np.ix_(task.test, cols)] = result["spread"][companion]
            layer_key = Layers.companion(key, companion)
            write(adata, "layers", layer_key, _aligned_layer(extra, columns, adata.n_vars), overwrite=overwrite)
        flag = np.zeros(adata.n_vars, dtype=bool)
        flag[columns] = True
        write(adata, "var", Var.predicted(key), flag, overwrite=overwrite)
        fold_info = {}
        for number, (task, result) in enumerate(method_results):
            fold_info[task.fold] = {
                "test": plan[number].units,
                "n_train_spots": int(len(task.train)),
                "n_test_spots": int(len(task.test)),
                "genes": result["genes"],
                "target": result["target"] if result["target"] is not None else "None",
                "target_layer": result["target_layer"] if result["target_layer"] is not None else "None",
                "seed": int(task.seed),
                "device": result["device"],
                "trained_on": result["trained_on"],
                "history": result["history"],
                "member_histories": result["member_histories"],
                "weights": result["weights"],
                "random_weights": bool(result["random_weights"]),
                "weights_provenance": result["weights_provenance"],
                "n_calibration_spots": result["calibration"]["n_spots"],
                "calibration_libraries": result["calibration"]["libraries"],
            }
        record(
            adata,
            _FUNCTION,
            key,
            {
                "method": name,
                "method_class": f"{cls.__module__}.{cls.__qualname__}",
                "params": json.dumps({**variant_params, **train_params, **method_params.get(name, {})}, default=str),
                "split": split,
                "split_description": SPLITS[split],
                "folds_argument": json.dumps(folds, default=str),
                "fold_key": fold_key,
                "gene_selection": "selected_on_all_spots" if leak is not None else gene_selection,
                "gene_selection_note": "" if leak is None else f"selected on all spots, including test folds: {leak}",
                "genes_rule": _describe_rule(genes, gene_selection),
                "genes": union,
                "layer": layer if layer is not None else "None",
                "seed": int(seed),
                "n_jobs": int(n_jobs),
                "uncertainty": uncertainty if uncertainty is not None else "None",
                "interval": float(interval) if interval is not None else "None",
                "calibration": str(calibration),
                "devices": [str(d) for d in devices] if devices else "None",
                "folds": fold_info,
                # folds share a label unless their weights differ (e.g. a file changed between them)
                "weights": " | ".join(dict.fromkeys(r["weights"] for _, r in method_results)),
                "random_weights": any(bool(r["random_weights"]) for _, r in method_results),
            },
            overwrite=overwrite,
        )
        entry = sthisto_uns(adata)[_FUNCTION][key]
        entry["models"] = {task.fold: result["record"] for task, result in method_results}

        table = evaluate(
            adata,
            predicted=key,
            key_added=key,
            labels_key=labels_key,
            overwrite=overwrite,
            **evaluate_params,  # clustering keeps evaluate's seed (0, the papers') unless given here
        )
        table.insert(1, "evaluated_on", "held_out")
        if split == "spots":
            table = pd.concat(
                [table, _reference_table(adata, key, method_results, layer, group_metrics, metric_frames)]
            )
        table.insert(0, "split", split)
        table.insert(0, "method", name)
        table = table.reset_index(drop=True)
        entry["table"] = table
        for stored in entry["models"].values():
            stored[ModelRecord.METRICS] = fold_metrics(table, stored[ModelRecord.TEST_SECTIONS])
        tables.append(table)

    combined = pd.concat(tables, ignore_index=True)
    if not single:
        record(adata, _FUNCTION, prefix, {"methods": names, "keys": [keys[n] for n in names], "split": split},
               overwrite=overwrite)  # fmt: skip
        sthisto_uns(adata)[_FUNCTION][prefix]["table"] = combined
    return combined


def _companion_names(uncertainty, interval) -> list[str]:
    return (["std"] if uncertainty is not None else []) + (["lower", "upper"] if interval is not None else [])


def _aligned_layer(block: np.ndarray, columns: np.ndarray, n_vars: int):
    """Predictions of genes ``columns`` as a layer over all of ``var`` (dense when complete)."""
    if len(columns) == n_vars and (columns == np.arange(n_vars)).all():
        return block
    n_obs, n_genes = block.shape
    order = np.argsort(columns)  # CSR wants each row's columns sorted
    return sp.csr_matrix(
        (block[:, order].ravel(), np.tile(columns[order], n_obs), np.arange(0, n_obs * n_genes + 1, n_genes)),
        shape=(n_obs, n_vars),
        dtype=np.float32,
    )


def _reference_table(adata, key: str, method_results, layer, group_metrics, metric_frames) -> pd.DataFrame:
    """Scores of each spots-split model on its own training spots (a labelled reference figure)."""
    from ..encoders._provenance import with_weights_columns
    from ._evaluate import RECIPE_COLUMN, training_mean_of, with_gene_mean_column
    from ._train import _targets

    groups, gene_mean_groups = [], []
    for task, result in method_results:
        observed, _, _ = _targets(
            adata, task.reference, result["genes"], layer=layer, variant=result["target"], need_counts=False
        )
        observed = observed.toarray() if sp.issparse(observed) else np.asarray(observed)
        metrics, per_gene = group_metrics(
            observed, result["reference"], genes=result["genes"], where=f" (training spots of fold {task.fold!r})"
        )
        groups.append((task.fold, metrics, per_gene))
        mean = training_mean_of(result)
        if gene_mean_groups is not None and mean is not None:
            constant = np.broadcast_to(np.asarray(mean), observed.shape)
            gene_mean_groups.append((task.fold, *group_metrics(observed, constant, genes=result["genes"])))
        else:
            gene_mean_groups = None
    table, _ = metric_frames(groups)
    with_gene_mean_column(table, gene_mean_groups)
    table.insert(0, "predicted", key)
    table.insert(1, "evaluated_on", "training_reference")
    entry = sthisto_uns(adata)[_FUNCTION][key]
    table = with_weights_columns(
        table, str(entry["weights"]), random=bool(entry["random_weights"]), after="evaluated_on"
    )
    recipes = [str(json.loads(result["trained_on"]).get("recipe", "unknown")) for _, result in method_results]
    table.insert(list(table.columns).index("random_weights") + 1, RECIPE_COLUMN, " | ".join(dict.fromkeys(recipes)))
    return table


def _describe_rule(genes, gene_selection: str) -> str:
    if gene_selection == "given":
        return (
            "var['sthisto_selected'] or all genes"
            if genes is None
            else (f"var[{genes!r}]" if isinstance(genes, str) else "list")
        )
    if callable(genes):
        return f"callable {getattr(genes, '__qualname__', repr(genes))} on each fold's training spots"
    return f"{genes} on each fold's training spots (sthisto.pp.select_genes)"
