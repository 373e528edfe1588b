"""The ``sthisto`` command: train, predict, super-resolve, cross-validate, evaluate, demo.

Exit codes: 0 success; 2 usage error (bad or missing options); 1 failure, reported in one line
(``--verbose`` adds the traceback and sthisto's log). Inputs are ``.h5ad`` files or SpatialData
``.zarr`` stores (converted with :func:`sthisto.io.from_spatialdata`).

This module imports nothing heavy at import time, so ``sthisto --help`` answers at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROG = "sthisto"


class UsageError(Exception):
    """Options that cannot work together or cannot be parsed (exit code 2)."""


class _Progress:
    """One-line progress messages on stderr (silenced by ``--quiet``)."""

    def __init__(self, command: str, quiet: bool) -> None:
        self.command = command
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{PROG} {self.command} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- input / output ---------------------------------------------------------------------------------
def read_input(path: str | Path):
    """Read an ``.h5ad`` file or a SpatialData ``.zarr`` store into sthisto's AnnData."""
    path = Path(path)
    if path.suffix not in (".h5ad", ".zarr"):
        raise UsageError(f"input {str(path)!r} must be an .h5ad file or a SpatialData .zarr store.")
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist.")
    if path.suffix == ".h5ad":
        import anndata as ad

        return ad.read_h5ad(path)
    try:
        import spatialdata

        from .io import from_spatialdata
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"reading .zarr needs spatialdata and sthisto.io.from_spatialdata, which are unavailable here ({err}); "
            f"convert the data to .h5ad first."
        ) from err
    return from_spatialdata(spatialdata.read_zarr(path))


def check_output(path: str | Path | None, *, overwrite: bool, suffixes: Sequence[str] = (".h5ad", ".zarr")) -> None:
    """Refuse an output path before any work is done.

    Refused: a wrong suffix, a missing parent folder, an existing output without
    ``--overwrite``, and anything that replacing would destroy other than an output of the same
    kind (a folder where a file goes, a folder that is not a zarr store).
    """
    if path is None:
        return
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise UsageError(f"output {str(path)!r} must end in {' or '.join(suffixes)}.")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the folder of output {str(path)!r} does not exist ({str(parent)!r}); create it first "
            f"(mkdir -p {parent}) or choose another path."
        )
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {str(path)!r} exists; pass --overwrite to replace it or choose another path.")
    if path.suffix == ".zarr" and not any((path / name).exists() for name in _ZARR_MARKERS):
        # Replacing a .zarr output removes the folder: only ever one that is a zarr store.
        raise FileExistsError(
            f"output {str(path)!r} exists and is not a zarr store; refusing to replace it so that none of its "
            f"files are lost. Choose another path."
        )
    if path.suffix != ".zarr" and path.is_dir():
        raise FileExistsError(
            f"output {str(path)!r} is a folder; refusing to replace it with a file. Choose another path."
        )


_ZARR_MARKERS = (".zgroup", ".zattrs", "zarr.json")


def check_table(path: str | Path | None, *, overwrite: bool) -> None:
    """Refuse a ``--table`` path before any work is done (see :func:`check_output`)."""
    check_output(path, overwrite=overwrite, suffixes=(".csv",))


def check_model_folder(path: str | Path | None, *, overwrite: bool) -> None:
    """Refuse a ``--save-model`` folder before training: non-empty without ``--overwrite``, or not a saved model."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--save-model {str(path)!r} is a file; give a folder for the saved model.")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--save-model folder {str(path)!r} is not empty; pass --overwrite to replace a saved model there, "
                f"or choose another folder."
            )
        from .io._model import check_replaceable

        check_replaceable(path)


def merge_params(explicit: dict[str, Any], defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments from the command's own options and ``--param`` items, each named once.

    A ``--param`` naming an argument the command also has as an option (``max_epochs``, ``seed``,
    ...) fills it when that option was left at its default; giving both is a usage error.
    """
    merged = dict(explicit)
    for key, value in params.items():
        if key in merged and key in defaults and merged[key] != defaults[key]:
            option = "--" + key.replace("_", "-")
            raise UsageError(f"{key} is given twice (--param {key}=... and {option}); give it once.")
        merged[key] = value
    return merged


def write_output(adata, path: str | Path, *, overwrite: bool) -> Path:
    """Write ``adata`` to ``.h5ad`` (or a SpatialData ``.zarr`` via :func:`sthisto.io.to_spatialdata`).

    The data are written to a hidden sibling first and moved into place only when complete, so
    a failed write leaves neither a half-written output nor a damaged earlier one.
    """
    path = Path(path)
    check_output(path, overwrite=overwrite)
    if path.suffix == ".h5ad":
        _write_atomically(path, adata.write_h5ad)
        return path
    try:
        from .io import to_spatialdata
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"writing .zarr needs sthisto.io.to_spatialdata, unavailable here ({err}).") from err
    _write_atomically(path, lambda partial: to_spatialdata(adata).write(partial))
    return path


def write_table(table, path: str | Path, *, overwrite: bool) -> Path:
    """Write a metrics table as CSV, all or nothing (see :func:`write_output`)."""
    path = Path(path)
    check_table(path, overwrite=overwrite)
    _write_atomically(path, lambda partial: table.to_csv(partial, index=False))
    return path


def _sibling(path: Path, tag: str) -> Path:
    # Same folder (so the final move is a rename, not a copy) and same suffix (writers check it).
    return path.with_name(f".{path.stem}.{tag}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a hidden sibling of ``path``, then move the result to ``path``."""
    partial = _sibling(path, "partial")
    try:
        write(partial)
    except BaseException:
        _remove(partial)
        raise
    # A file is replaced in one rename; a folder (zarr) cannot be renamed onto a non-empty one,
    # so the earlier output steps aside first and comes back if the move fails.
    aside = _sibling(path, "old") if path.is_dir() else None
    if aside is not None:
        os.replace(path, aside)
    try:
        os.replace(partial, path)
    except BaseException:
        if aside is not None:
            os.replace(aside, path)
        _remove(partial)
        raise
    if aside is not None:
        _remove(aside)


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "depth=2", "name=x"]`` → ``{"lr": 1e-4, "depth": 2, "name": "x"}`` (JSON values, else text)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r} is not KEY=VALUE (e.g. --param lr=1e-4).")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError(f"{value!r} lists no names; use comma-separated names, e.g. A1,B1.")
    return names


def _genes(args) -> Any:
    if getattr(args, "genes", None) is None:
        return None
    value = args.genes
    if value.startswith("@"):
        file = Path(value[1:])
        if not file.exists():
            raise FileNotFoundError(f"gene list file {str(file)!r} does not exist.")
        return [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if "," in value:
        return _names(value)
    return value  # a var column, or a rule such as hvg:1000 (cross-validate)


def _validation(value: str | None):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return _names(value)


def _print_table(table, *, file=None) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 30, "display.precision", 4):
        print(table.to_string(), file=file or sys.stdout)


def _summary(table):
    """Overall rows, one line per method (or prediction), headline metrics as columns."""
    headline = [
        "pearson_gene_mean",
        "pearson_gene_median",
        "pearson_spot_mean",
        "spearman_gene_mean",
        "ssim_mean",
        "mse",
        "mae",
        "rmse",
        "ari_kmeans",
        "ari_leiden",
        "n_genes_pearson_undefined",
    ]
    rows = table[table["scope"] == "overall"]
    if "evaluated_on" in rows:
        rows = rows[rows["evaluated_on"] == "held_out"]
    index = "method" if "method" in rows else "predicted"
    wide = rows.pivot_table(index=index, columns="metric", values="value", aggfunc="first")
    return wide[[m for m in headline if m in wide.columns]]


def markdown_table(frame, *, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (index included)."""
    import numpy as np

    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for index, row in frame.iterrows():
        cells = [str(index)]
        counts = str(index).startswith("n_")  # rows of counts print as integers
        for value in row:
            if isinstance(value, (float, np.floating)):
                if np.isnan(value):
                    cells.append("")
                else:
                    cells.append(str(int(value)) if counts and float(value).is_integer() else floatfmt.format(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _progress_bar(quiet: bool) -> bool | str:
    """Lightning's bar on a terminal; plain lines where output goes to a log or a pipe."""
    if quiet:
        return False
    return True if sys.stderr.isatty() else "text"


def _spots_of(adata, libraries: Sequence[str] | None) -> str:
    """``"300 spots of S01, S02"``: the spots of the training sections, not of the whole input."""
    if libraries is None:
        return f"{adata.n_obs} spots"
    import numpy as np

    n = int(np.isin(adata.obs["library_id"].astype(str), list(libraries)).sum())
    return f"{n} spots of {', '.join(libraries)}"


def _trained_summary(model) -> str:
    """What training used, from the model's own record (spots fitted, held out, epochs, loss)."""
    record = model.trained_on
    n_fit = record.get("n_fit_spots", record.get("n_spots"))
    line = f"trained on {n_fit} spots"
    if record.get("n_validation_spots"):
        line += f" ({record['n_validation_spots']} more held out for validation)"
    history = model.history.get("train_loss", [])
    if history:
        line += f"; {len(history)} epochs, final training loss {history[-1]:.4g}"
    return line


# --- commands -----------------------------------------------------------------------------------------
def cmd_train(args, progress: _Progress) -> int:
    """Train a method; keep the model in the output AnnData and/or a folder."""
    from . import tl

    if args.output is None and args.save_model is None:
        raise UsageError(
            "nothing would be kept: pass -o/--out (AnnData with the stored model) and/or --save-model DIR."
        )
    check_output(args.output, overwrite=args.overwrite)
    check_model_folder(args.save_model, overwrite=args.overwrite)
    options = {
        "genes": _genes(args),
        "layer": args.layer,
        "train_mask": _names(args.train_libraries),
        "key_added": args.key_added,
        "max_epochs": args.max_epochs,
        "device": args.device,
        "seed": args.seed,
        "validation": _validation(args.validation),
        "n_members": args.n_members,
        "recipe": args.recipe,
        "models_dir": args.models_dir,
    }
    defaults = {**dict.fromkeys(options), "device": "auto", "seed": 0, "n_members": None, "recipe": "paper"}
    kwargs = merge_params(options, defaults, parse_params(args.param))
    kwargs.setdefault("progress", _progress_bar(args.quiet))
    kwargs["overwrite"] = args.overwrite
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    progress(f"training {args.method} on {_spots_of(adata, kwargs.get('train_mask'))}")
    model = tl.train(adata, args.method, **kwargs)
    progress(_trained_summary(model))
    if args.save_model is not None:
        path = model.save(args.save_model, overwrite=args.overwrite)
        progress(f"saved the model to {path}")
    if args.output is not None:
        progress(f"wrote {write_output(adata, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_predict(args, progress: _Progress) -> int:
    """Predict with a stored or saved model."""
    from . import tl

    check_output(args.output, overwrite=args.overwrite)
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    libraries = _names(args.libraries)
    if libraries is not None:
        import numpy as np

        unknown = sorted(set(libraries) - set(adata.obs["library_id"].astype(str)))
        if unknown:
            raise ValueError(f"--libraries names {unknown}, which are not in obs['library_id'].")
        adata = adata[np.isin(adata.obs["library_id"].astype(str), libraries)].copy()
    model = args.model
    progress(f"predicting with {model} on {adata.n_obs} spots")
    result = tl.predict(
        adata,
        model,
        key_added=args.key_added,
        device=args.device,
        uncertainty=args.uncertainty,
        interval=args.interval,
        n_samples=args.n_samples,
        seed=args.seed,
        overwrite=args.overwrite,
        copy=True,  # image-only input then gives an AnnData of the model's genes to write
    )
    out = result
    progress(f"wrote {write_output(out, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_calibrate(args, progress: _Progress) -> int:
    """Fit conformal intervals on held-aside sections; store them with the model."""
    from pathlib import Path

    from . import tl

    libraries = _names(args.calibration_libraries)
    if not libraries:
        raise UsageError("--calibration-libraries is required: sections not used for training, e.g. S3.")
    folder = Path(args.model).is_dir()
    if not folder and args.output is None:
        raise UsageError("the model is stored in INPUT: pass -o/--out to write the AnnData with the calibrated model.")
    check_output(args.output, overwrite=args.overwrite)
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    progress(f"calibrating {args.model} on {', '.join(libraries)}")
    model = tl.calibrate(
        adata,
        args.model,
        calibration=libraries,
        alpha=args.alpha,
        uncertainty=args.uncertainty,
        n_samples=args.n_samples,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
    )
    entry = model.calibration["absolute"]
    progress(f"calibrated levels {entry['levels']} on {entry['n_spots']} spots")
    if folder:
        progress(f"updated {Path(args.model) / 'manifest.json'}")
    if args.output is not None:
        progress(f"wrote {write_output(adata, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_superresolve(args, progress: _Progress) -> int:
    """Run :func:`sthisto.tl.superresolve` when this version provides it."""
    from . import tl

    try:
        superresolve = tl.superresolve
    except AttributeError:
        raise RuntimeError("superresolve is not available in this version of sthisto.") from None
    params = parse_params(args.param)
    check_output(args.output, overwrite=args.overwrite)
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    progress(f"super-resolving with {args.model}")
    result = superresolve(adata, args.model, **params)
    out = result if result is not None else adata
    progress(f"wrote {write_output(out, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_cross_validate(args, progress: _Progress) -> int:
    """Cross-validate one or more methods and print the overall metrics."""
    from . import tl

    folds: Any = None
    if args.folds is not None:
        if args.split == "spots":
            try:
                folds = float(args.folds)
            except ValueError:
                raise UsageError(
                    f"--split spots takes --folds <fraction held out>, e.g. 0.5; got {args.folds!r}."
                ) from None
        else:
            folds = _names(args.folds)
    check_output(args.output, overwrite=args.overwrite)
    check_table(args.table, overwrite=args.overwrite)
    options = {
        "folds": folds,
        "key_added": args.key_added,
        "seed": args.seed,
        "genes": _genes(args),
        "layer": args.layer,
        "labels_key": args.labels_key,
        "n_jobs": args.n_jobs,
        "devices": _names(args.devices),
    }
    defaults = {**dict.fromkeys(options), "seed": 0, "n_jobs": 1}
    for name, value in (("max_epochs", args.max_epochs), ("validation", args.validation), ("device", args.device)):
        options[name] = _validation(value) if name == "validation" else value
        defaults[name] = None
    kwargs = merge_params(options, defaults, parse_params(args.param))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("max_epochs", "validation", "device") or v is not None}
    kwargs.setdefault("progress", not args.quiet)
    if args.no_store_models and args.store_weights:
        raise UsageError("--no-store-models contradicts --store-weights; pass one (fold weights are off by default).")
    kwargs.setdefault("store_weights", True if args.store_weights else None)
    kwargs.setdefault("models_dir", args.models_dir)
    kwargs["overwrite"] = args.overwrite
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    methods = args.method if len(args.method) > 1 else args.method[0]
    progress(f"cross-validating {', '.join(args.method)} (split={args.split})")
    table = tl.cross_validate(adata, methods, split=args.split, **kwargs)
    _print_table(_summary(table))
    if args.table is not None:
        progress(f"wrote {write_table(table, args.table, overwrite=args.overwrite)}")
    if args.output is not None:
        progress(f"wrote {write_output(adata, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_evaluate(args, progress: _Progress) -> int:
    """Evaluate a layer of predictions and print the overall metrics."""
    from . import tl

    check_output(args.output, overwrite=args.overwrite)
    check_table(args.table, overwrite=args.overwrite)
    progress(f"reading {args.input}")
    adata = read_input(args.input)
    progress(f"evaluating layers[{args.predicted!r}]")
    table = tl.evaluate(
        adata,
        predicted=args.predicted,
        observed=args.observed,
        by=None if args.by == "none" else args.by,
        labels_key=args.labels_key,
        genes=_genes(args),
        key_added=args.key_added,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    _print_table(_summary(table))
    if args.table is not None:
        progress(f"wrote {write_table(table, args.table, overwrite=args.overwrite)}")
    if args.output is not None:
        progress(f"wrote {write_output(adata, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_demo(args, progress: _Progress) -> int:
    """Quickstart on synthetic data: train, predict a held-out section, evaluate, report."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; give a folder for the report.")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; pass --overwrite or choose another folder.")
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"the folder of --out {str(out)!r} does not exist ({str(out.parent)!r}); create it first or choose "
            f"another path."
        )
    if args.n_sections < 2:
        raise UsageError("--n-sections must be at least 2 (train on some, predict a held-out one).")
    options = {"max_epochs": args.max_epochs, "device": args.device, "seed": args.seed}
    kwargs = merge_params(options, {"max_epochs": None, "device": "auto", "seed": 0}, parse_params(args.param))
    for reserved in ("train_mask", "key_added"):
        if reserved in kwargs:
            raise UsageError(f"--param {reserved}=... is set by the demo itself; leave it out.")
    kwargs.setdefault("progress", False)
    # The report is drawn in a hidden sibling folder and its files moved in at the end, so that a
    # failed run leaves no partial report behind.
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        names = _demo_report(args, progress, kwargs, stage)
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    progress(f"wrote the report to {out / 'report.md'}")
    return 0


def _demo_report(args, progress: _Progress, kwargs: dict[str, Any], out: Path) -> list[str]:
    """Run the demo and write its report into ``out``; returns the names of the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import datasets, pl, pp, tl

    progress(f"[1/5] generating {args.n_sections} synthetic sections (~{args.n_spots} spots, {args.n_genes} genes)")
    adata = datasets.synthetic(n_sections=args.n_sections, n_spots=args.n_spots, n_genes=args.n_genes, seed=args.seed)
    libraries = [str(x) for x in adata.obs["library_id"].cat.categories]
    train_libraries, held_out = libraries[:-1], libraries[-1]
    progress(f"[2/5] training {args.method} on {', '.join(train_libraries)}")
    model = tl.train(
        adata,
        args.method,
        train_mask=train_libraries,
        key_added="demo_model",
        **kwargs,
    )
    progress(f"[2/5] {_trained_summary(model)}")
    progress(f"[3/5] predicting held-out section {held_out}")
    test = adata[adata.obs["library_id"].astype(str) == held_out].copy()
    tl.predict(test, model, key_added="predicted", device=args.device)
    target = model.data_params.get("target", "log10_1e4")
    pp.normalize(test, variant=target, genes=list(model.genes), key_added="observed")

    progress("[4/5] evaluating")
    # gauss kNN weights keep the demo quick (scanpy's umap weights compile numba code on first use)
    table = tl.evaluate(test, predicted="predicted", labels_key="label", seed=args.seed, leiden_connectivities="gauss")
    table.insert(0, "method", args.method)
    table.to_csv(out / "metrics.csv", index=False)
    group_rows = table[table["scope"] == "group"].pivot_table(index="group", columns="metric", values="value")
    headline = [c for c in _summary(table).columns if c in group_rows.columns]
    summary = group_rows[headline].T
    summary.index.name = "metric"
    (out / "metrics.md").write_text(markdown_table(summary))

    progress("[5/5] drawing figures")
    dependent = test.var_names[test.var["synthetic_dependent"].to_numpy(dtype=bool)].tolist()
    per_gene = tl.get_metrics(test, "predicted", per_gene=True).set_index("gene")["pearson"]
    ranked = [g for g in per_gene.sort_values(ascending=False).index if g in set(model.genes)]
    shown = (ranked[:2] + [g for g in dependent if g not in ranked[:2]][:1])[:3] or list(model.genes)[:3]
    figures = ["gene_maps.png", "domain_map.png"]
    fig = pl.gene_maps(test, shown, layers=["observed", "predicted"], titles=["observed", "predicted"],
                       save=out / "gene_maps.png", dpi=80, return_fig=True)  # fmt: skip
    plt.close(fig)
    fig = pl.domain_maps(test, predicted="predicted", labels_key="label", seed=args.seed,
                         save=out / "domain_map.png", dpi=80, return_fig=True)  # fmt: skip
    plt.close(fig)
    if len(model.history.get("train_loss", [])):
        fig = pl.training_curves(model, save=out / "training_curves.png", dpi=80, return_fig=True)
        plt.close(fig)
        figures.append("training_curves.png")

    overall = table[table["scope"] == "overall"].set_index("metric")["value"]
    report = [
        "# sthisto demo",
        "",
        f"Synthetic data: {args.n_sections} sections, {adata.n_obs} spots, {adata.n_vars} genes "
        f"({len(dependent)} follow the image), seed {args.seed}.",
        f"Method **{args.method}** trained on {', '.join(train_libraries)}; predictions on the held-out "
        f"section **{held_out}** ({test.n_obs} spots), compared with its measured counts normalised as the "
        f"model's targets (`{target}`).",
        "",
        f"Per-gene Pearson (mean over genes): {overall.get('pearson_gene_mean', np.nan):.3f}; "
        f"per-spot Pearson across genes: {overall.get('pearson_spot_mean', np.nan):.3f}; "
        f"k-means ARI against the annotations: {overall.get('ari_kmeans', np.nan):.3f}.",
        "",
        "## Metrics of the held-out section",
        "",
        markdown_table(summary),
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        "Full table: `metrics.csv` (definitions: `sthisto.tl.evaluate`).",
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    print(f"pearson_gene_mean={overall.get('pearson_gene_mean', np.nan):.4f}")
    return ["metrics.csv", "metrics.md", *figures, "report.md"]


# --- parser --------------------------------------------------------------------------------------
DEVICE_HELP = "auto, cpu, cuda, cuda:1 (default auto)"
OVERWRITE_HELP = "replace existing outputs"

OLD_SPELLINGS = {"--output": "--out", "--output-dir": "--out"}
"""Earlier names of options, still accepted (with a note on stderr) and left out of ``--help``."""


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, showing each option under its current names only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        current = [name for name in action.option_strings if name not in OLD_SPELLINGS]
        if len(current) == len(action.option_strings):
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = current
        return super()._format_action_invocation(shown)


def _add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # On sub-commands the defaults are suppressed, so 'sthisto -v train' keeps the top-level flag.
    default = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log every step and show tracebacks on errors")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress messages")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sthisto`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        description="Predict spatial gene expression from H&E images (THItoGene, HGGEF, HisToSGE, HistoSPACE, "
        "ridge baseline). Inputs: .h5ad or SpatialData .zarr.",
        epilog="Run 'sthisto <command> --help' for the options of a command. Exit codes: 0 ok, 1 failure, 2 usage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=_HelpFormatter)
        _add_common(p)
        return p

    p = command("train", "train a method and store/save the model",
                "Train a method on the sections of INPUT (all, or --train-libraries) and keep the model in the "
                "output AnnData (uns['sthisto']['models'][KEY]) and/or a model folder (--save-model).")  # fmt: skip
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store")
    p.add_argument(
        "-m", "--method", required=True, help="method name, e.g. thitogene, hggef, histosge, histospace, ridge"
    )
    p.add_argument("-o", "--out", "--output", dest="output",
                   help="write the AnnData with the stored model here (.h5ad or .zarr)")  # fmt: skip
    p.add_argument("--save-model", metavar="DIR", help="also save the model to this folder (manifest + safetensors)")
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        help="keep the stored model's weights in DIR/KEY.safetensors instead of in the output AnnData",
    )
    p.add_argument("--genes", help="comma-separated genes, @file with one gene per line, or a boolean var column")
    p.add_argument("--layer", help="train on this layer instead of normalising the raw counts in X")
    p.add_argument("--train-libraries", metavar="IDS", help="comma-separated library ids to train on (default all)")
    p.add_argument("--key-added", help="name of the stored model (default: the method)")
    p.add_argument("--max-epochs", type=int, help="epochs (default: the paper's)")
    p.add_argument("--validation", help="fraction of training spots, or comma-separated training libraries")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and validation split (default 0)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable), e.g. lr=1e-4")
    p.add_argument(
        "--n-members",
        type=int,
        default=None,
        help="train a deep ensemble of this many members (default 1; 4 for networks under --recipe small_data)",
    )
    p.add_argument(
        "--recipe",
        choices=("paper", "small_data"),
        default="paper",
        help="how networks are optimised: the paper's settings (default) or the small-data recipe",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_train)

    p = command("predict", "predict expression with a trained model",
                "Predict expression for the spots of INPUT with a model stored in it (its key) or saved in a "
                "folder, writing layers[KEY] (or a new AnnData for image-only input) to OUTPUT.")  # fmt: skip
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store")
    p.add_argument("--model", required=True, help="key in uns['sthisto']['models'] or a saved-model folder")
    p.add_argument("-o", "--out", "--output", dest="output", required=True, help="output .h5ad or .zarr")
    p.add_argument("--key-added", help="output layer name (default: the model's key or method)")
    p.add_argument("--libraries", metavar="IDS", help="comma-separated library ids to predict (default all)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--uncertainty",
        choices=["ensemble", "dropout", "distribution"],
        help="also write layers[KEY_std]: spread across ensemble members, MC-dropout passes, or ZINB",
    )
    p.add_argument(
        "--interval",
        type=float,
        metavar="LEVEL",
        help="conformal interval of this coverage (e.g. 0.9) to layers[KEY_lower/_upper]; needs calibrate",
    )
    p.add_argument("--n-samples", type=int, default=20, help="Monte-Carlo dropout passes (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout passes (default 0)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_predict)

    p = command(
        "calibrate",
        "fit conformal prediction intervals on held-aside sections",
        "Fit split-conformal intervals per gene on sections the model never trained on and store them "
        "with the model: in the AnnData record (write it with -o) or in the saved-model folder.",
    )
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store with the calibration sections")
    p.add_argument("--model", required=True, help="key in uns['sthisto']['models'] or a saved-model folder (updated)")
    p.add_argument("--calibration-libraries", metavar="IDS", help="comma-separated library ids not used for training")
    p.add_argument("--alpha", type=float, default=0.1, help="miscoverage of the default interval (default 0.1)")
    p.add_argument(
        "--uncertainty",
        choices=["ensemble", "dropout", "distribution"],
        help="also fit intervals normalised by this spread",
    )
    p.add_argument("--n-samples", type=int, default=20, help="Monte-Carlo dropout passes (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout passes (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-o", "--out", "--output", dest="output",
                   help="write the AnnData with the calibrated model record here (.h5ad or .zarr)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration / output")
    p.set_defaults(func=cmd_calibrate)  # fmt: skip

    p = command("superresolve", "predict expression between measured spots",
                "Generate spots between the measured ones and predict their expression with a trained model "
                "(sthisto.tl.superresolve), writing the new spots to OUTPUT.")  # fmt: skip
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store")
    p.add_argument("--model", required=True, help="key in uns['sthisto']['models'] or a saved-model folder")
    p.add_argument("-o", "--out", "--output", dest="output", required=True, help="output .h5ad or .zarr")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="option of tl.superresolve (repeatable)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_superresolve)

    p = command("cross-validate", "out-of-fold predictions and metrics under a named protocol",
                "Train one model per fold (split=section: leave-one-section-out; patient: leave-one-patient-out; "
                "spots: HisToSGE's random hold-out within each section), write out-of-fold predictions and print "
                "the overall metrics.")  # fmt: skip
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store")
    p.add_argument("-m", "--method", required=True, nargs="+", help="one or more methods (compared on the same folds)")
    p.add_argument("--split", choices=["section", "patient", "spots"], default="section",
                   help="protocol: leave one section out (default), leave one patient out, or random spots")  # fmt: skip
    p.add_argument("--folds", help="sections/patients to test (comma-separated), or the held-out fraction for spots")
    p.add_argument("--genes", help="genes (comma-separated, @file, var column) or a per-fold rule such as hvg:1000")
    p.add_argument("--layer", help="train on and score against this layer")
    p.add_argument("--labels-key", help="obs column of annotations for ARI/NMI")
    p.add_argument("--key-added", help="output key (one method) or prefix (several)")
    p.add_argument("--max-epochs", type=int, help="epochs of every fold (default: the paper's)")
    p.add_argument("--validation", help="validation inside each fold's training data: fraction or libraries")
    p.add_argument("--device", help="device of every fold (default auto)")
    p.add_argument("--devices", metavar="DEVS", help="comma-separated devices for parallel folds, e.g. cuda:0,cuda:1")
    p.add_argument("--n-jobs", type=int, default=1, help="folds trained at once (worker processes)")
    p.add_argument("--seed", type=int, default=0, help="seed of every fold (default 0)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument(
        "--store-weights",
        action="store_true",
        help="keep each fold's weights in the output AnnData (default: fold records without weights)",
    )
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        help="write each fold's weights to DIR/KEY/FOLD.safetensors, referenced with its SHA-256 by the record",
    )
    p.add_argument(
        "--no-store-models",
        action="store_true",
        help="deprecated and now the default: fold records are kept without weights",
    )
    p.add_argument("-o", "--out", "--output", dest="output",
                   help="write the AnnData with predictions and records here (.h5ad or .zarr)")  # fmt: skip
    p.add_argument("--table", metavar="CSV", help="write the tidy metrics table here (.csv)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_cross_validate)

    p = command("evaluate", "score predictions against observed expression",
                "Compute per-gene and per-spot Pearson, Spearman, SSIM, MSE/MAE/RMSE (and ARI/NMI with "
                "--labels-key) per section and overall for layers[PREDICTED].")  # fmt: skip
    p.add_argument("input", help=".h5ad file or SpatialData .zarr store")
    p.add_argument("--predicted", required=True, help="layer of predictions")
    p.add_argument("--observed", help="layer of observed values (default: the model's targets from the record)")
    p.add_argument("--by", default="library_id", help="obs column of groups, or 'none' (default library_id)")
    p.add_argument("--labels-key", help="obs column of annotations for ARI/NMI")
    p.add_argument("--genes", help="genes (comma-separated, @file, or a boolean var column)")
    p.add_argument("--key-added", help="key of the stored results (default: PREDICTED)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means and Leiden clusterings (default 0)")
    p.add_argument("--table", metavar="CSV", help="write the tidy metrics table here (.csv)")
    p.add_argument("-o", "--out", "--output", dest="output",
                   help="write the AnnData with the stored results here (.h5ad or .zarr)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = command("demo", "quickstart on synthetic data, with a small report",
                "Generate synthetic H&E sections, train a method on all but one, predict the held-out section, "
                "evaluate, and write metrics (CSV, Markdown) and figures (PNG) with report.md to a folder.")  # fmt: skip
    p.add_argument("-o", "--out", "--output-dir", dest="output_dir", default="sthisto_demo", metavar="DIR",
                   help="report folder (default ./sthisto_demo)")  # fmt: skip
    p.add_argument("-m", "--method", default="ridge", help="method (default ridge: fast, closed form)")
    p.add_argument("--max-epochs", type=int, help="epochs for neural methods (default: the method's)")
    p.add_argument("--n-sections", type=int, default=3, help="synthetic sections; the last is held out (default 3)")
    p.add_argument("--n-spots", type=int, default=150, help="spots per section (approximate)")
    p.add_argument("--n-genes", type=int, default=30, help="genes (default 30)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_demo)
    return parser


# Library keywords whose command-line flag is not the keyword spelled with dashes.
_KEYWORD_FLAGS = {"train_mask": "--train-libraries", "calibration": "--calibration-libraries"}


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Say a library message in the command's terms: ``overwrite=True`` → ``--overwrite``.

    Only keywords that the command has a flag for are translated (``key_added='x'`` →
    ``--key-added x``); any other Python keyword is left as written.
    """
    if parser is None:
        return message
    flags: dict[str, tuple[str, bool]] = {}
    for action in parser._actions:
        long = [name for name in action.option_strings if name.startswith("--") and name not in OLD_SPELLINGS]
        if long:
            flags[action.dest] = (long[0], isinstance(action, argparse._StoreTrueAction))
    for keyword, flag in _KEYWORD_FLAGS.items():
        if any(flag == name for name, _ in flags.values()):
            flags[keyword] = (flag, False)
    for keyword, (flag, switch) in flags.items():
        # keyword=True, keyword='quoted value', keyword=value (a trailing full stop is the sentence's), keyword=
        pattern = re.compile(
            rf"(?<![\w.\-]){re.escape(keyword)}=(?:(True)\b|(['\"])(.*?)\2|([^\s,;:)\]]+?)(?=\.?(?:[\s,;:)\]]|$)))?"
        )

        def spelled(match: re.Match, flag: str = flag, switch: bool = switch) -> str:
            value = match.group(3) if match.group(2) else match.group(4)
            if switch or match.group(1) or value is None:
                return flag
            return f"{flag} {value}"

        message = pattern.sub(spelled, message)
    return message


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sthisto`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for item in argv:
        if item == "--":
            break
        name = item.partition("=")[0]
        if name in OLD_SPELLINGS:
            print(f"{PROG}: {name} is now spelled {OLD_SPELLINGS[name]}; the old name will go.", file=sys.stderr)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) and usage errors (2)
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    verbose = bool(args.verbose)
    quiet = bool(args.quiet) and not verbose
    args.quiet = quiet
    from ._logging import settings

    # The command prints its own progress; the library's per-call summaries only with --verbose.
    previous_verbosity = settings.verbosity
    settings.verbosity = "hint" if verbose else "warning"
    progress = _Progress(args.command, quiet)
    command_parser = _command_parser(parser, args.command)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")  # library deprecation chatter is not for command-line users
            return int(args.func(args, progress) or 0)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure: one line, traceback only on request
        if verbose:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {cli_words(_one_line(error), command_parser)}", file=sys.stderr)
        return 1
    finally:
        settings.verbosity = previous_verbosity


if __name__ == "__main__":
    sys.exit(main())
