"""``tl.train``, ``tl.predict``, ``tl.list_methods`` and ``tl.get_model``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import check_writable, maybe_copy, record, sthisto_uns, write
from .._constants import Layers, Obs, Uns, Var
from .._deprecate import renamed_parameters
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._sdata import accepts_spatialdata
from .._validate import align_train_mask, check_finite_tensors, check_max_epochs, checked_input
from ..pp._patches import library_ids

TARGET_MEAN_KEY = "target_mean"
"""Key of ``model.trained_on`` holding each gene's training mean (model gene order)."""

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData
    from numpy.typing import ArrayLike

    from ..models._protocol import ExpressionModel

SELECTED_GENES_KEY = "sthisto_selected"
"""Default ``var`` column written by :func:`sthisto.pp.select_genes`; ``train`` uses it when present."""


def list_methods() -> pd.DataFrame:
    """Describe every registered method.

    Returns
    -------
    One row per method: ``name``, ``aliases``, ``variants``, ``input`` (pixels or features),
    ``needs_graph``, ``section_wide_attention``, ``default_loss``, ``reference`` (the paper).

    Examples
    --------
    >>> sthisto.tl.list_methods()[["name", "input", "needs_graph"]]
    """
    from ..models._registry import _METHODS, _load_builtins

    _load_builtins()
    rows = []
    for name, cls in sorted(_METHODS.items()):
        rows.append(
            {
                "name": name,
                "aliases": ", ".join(cls.aliases),
                "variants": ", ".join(f"{name}_{v}" for v in cls.variants),
                "input": cls.input_kind,
                "needs_graph": bool(cls.needs_graph),
                "section_wide_attention": bool(cls.section_wide),
                "default_loss": cls.default_loss,
                "reference": cls.reference,
            }
        )
    return pd.DataFrame(rows)


def _resolve_genes(adata, genes) -> list[str]:
    var_names = adata.var_names.astype(str)
    if genes is None:
        if SELECTED_GENES_KEY in adata.var:
            chosen = var_names[adata.var[SELECTED_GENES_KEY].to_numpy(dtype=bool)].tolist()
            logger.info("training on the %d genes in var[%r]", len(chosen), SELECTED_GENES_KEY)
        else:
            chosen = var_names.tolist()
    elif isinstance(genes, str):
        if genes not in adata.var:
            raise MissingKeyError(
                f"genes={genes!r} is neither a var column nor a list: pass a list of gene names or the "
                f"name of a boolean var column (e.g. written by sthisto.pp.select_genes)."
            )
        chosen = var_names[adata.var[genes].to_numpy(dtype=bool)].tolist()
    else:
        if not isinstance(genes, Iterable):
            raise InputError(
                f"genes={genes!r} is a {type(genes).__name__}; pass a list of gene names, the name of a boolean "
                f"var column, or None for all (or the selected) genes."
            )
        chosen = [str(g) for g in genes]
        missing = [g for g in chosen if g not in set(var_names)]
        if missing:
            raise MissingKeyError(
                f"{len(missing)} requested genes are not in adata.var_names (e.g. {missing[:5]}). "
                f"Restrict the list to measured genes, e.g. [g for g in genes if g in adata.var_names]."
            )
    if not chosen:
        raise InputError("no genes selected for training; check genes= or var['sthisto_selected'].")
    if len(set(chosen)) != len(chosen):
        raise InputError("the gene list has duplicates; pass unique gene names.")
    return chosen


def _resolve_train_index(adata, train_mask) -> np.ndarray:
    if train_mask is None:
        return np.arange(adata.n_obs)
    if isinstance(train_mask, str):
        train_mask = [train_mask]
    values = np.asarray(align_train_mask(adata, train_mask))
    if values.dtype == bool:
        if values.shape != (adata.n_obs,):
            raise InputError(f"train_mask has shape {values.shape}; a boolean mask needs shape ({adata.n_obs},).")
        index = np.flatnonzero(values)
    else:
        libraries = library_ids(adata)
        requested = [str(v) for v in values]
        categories = adata.obs[Obs.LIBRARY_ID].cat.categories if hasattr(adata.obs[Obs.LIBRARY_ID], "cat") else []
        empty = sorted(set(requested) & {str(c) for c in categories} - set(libraries))
        if empty:
            raise InputError(
                f"libraries {empty} have no spots in this object (an empty section). Drop them from "
                f"train_mask, or remove unused categories with adata.obs['library_id'].cat.remove_unused_categories()."
            )
        unknown = sorted(set(requested) - set(libraries))
        if unknown:
            raise MissingKeyError(
                f"train_mask names libraries {unknown} that are not in obs['library_id'] "
                f"({sorted(set(libraries))}). Pass library ids or a boolean mask over spots."
            )
        index = np.flatnonzero(np.isin(libraries, requested))
    if len(index) == 0:
        raise InputError("train_mask selects no spots; select at least one section or spot.")
    return index


def _gene_columns(adata, genes: Sequence[str]) -> np.ndarray:
    position = pd.Index(adata.var_names.astype(str))
    return position.get_indexer(list(genes))


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)


def _targets(adata, index, genes, *, layer, variant, need_counts):
    """Targets (and raw counts / size factors for count losses) of the training spots."""
    from ..pp._normalize import VARIANTS, check_counts, normalize_counts, size_factors

    if layer is None and variant not in VARIANTS:
        raise InputError(f"unknown target={variant!r}; use one of {list(VARIANTS)}.")
    columns = _gene_columns(adata, genes)
    if layer is not None:
        if layer not in adata.layers:
            raise MissingKeyError(
                f"layer={layer!r} is not in adata.layers ({list(adata.layers)}). Create it with "
                f"sthisto.pp.normalize(adata, key_added={layer!r}) or pass layer=None to normalise raw counts."
            )
        targets = _dense(adata.layers[layer][index][:, columns])
        if not np.isfinite(targets).all():
            raise InputError(f"adata.layers[{layer!r}] contains NaN or infinite values among the training spots.")
    counts = None
    if layer is None or need_counts:
        raw = adata.X[index]
        check_counts(raw, spot_names=adata.obs_names[index])
        counts = _dense(raw[:, columns])
    if layer is None:
        totals = np.asarray(raw.sum(axis=1)).ravel() if VARIANTS[variant]["denominator"] == "total" else None
        targets = normalize_counts(counts, variant, library_size=totals, validate=False)
    sizes = size_factors(counts.sum(axis=1), library_ids(adata)[index]) if need_counts else None
    return targets, (counts if need_counts else None), sizes


@renamed_parameters(progress_bar="progress")
@accepts_spatialdata
@checked_input(genes=True)
def train(
    adata: AnnData,
    method: str | type[ExpressionModel] = "thitogene",
    *,
    genes: Sequence[str] | str | None = None,
    layer: str | None = None,
    train_mask: ArrayLike | Sequence[str] | None = None,
    key_added: str | None = None,
    max_epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    validation: float | Sequence[str] | None = None,
    early_stopping: int | None = None,
    monitor: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    devices: int | str | Sequence[int] | None = None,
    strategy: str = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    progress: bool | str = True,
    store: bool = True,
    models_dir: str | Path | None = None,
    overwrite: bool = False,
    recipe: str = "paper",
    n_members: int | None = None,
    bootstrap: bool | None = None,
    **method_params: Any,
) -> ExpressionModel:
    """Train a method on the spots of ``adata`` and store the trained model in ``uns``.

    Parameters
    ----------
    adata
        AnnData in the sthisto convention (raw counts in ``X``, ``obs['library_id']``, spot
        coordinates and images, or image features in ``obsm`` for feature-based methods).
    method
        A registered name (see :func:`list_methods`), alias, variant (``"thitogene_tiny"``), or
        an :class:`~sthisto.models.ExpressionModel` subclass.
    genes
        Genes to predict: a list, the name of a boolean ``var`` column, or ``None`` for
        ``var['sthisto_selected']`` (written by :func:`sthisto.pp.select_genes`) when present,
        else all genes.
    layer
        Use this layer as the (already normalised) target. ``None`` normalises the raw counts in
        ``X`` with the method's transform (``target=`` parameter; e.g. ``"log10_1e4"``).
    train_mask
        Spots to train on: a boolean mask over ``obs``, or library ids. Default: all spots.
    key_added
        Name of the stored model (default: the method name).
    max_epochs
        Epochs (default: the paper's).
    device
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    seed
        Seeds initialisation, data order, validation split, dropout; CPU runs repeat bit for bit.
    validation
        ``None`` (the papers': train all epochs, keep the last), a fraction of the training spots
        held out from the loss, or a list of training library ids held out whole. With
        validation the weights of the epoch with the lowest validation loss are kept. Drawn from
        the training data only, never from spots outside ``train_mask``.
    early_stopping
        Stop after this many epochs without validation improvement (needs ``validation``).
    monitor
        What "best epoch" and early stopping mean on the validation data: ``"val_loss"``
        (lowest loss; the default of ``recipe="paper"``) or ``"val_pearson_gene"`` (highest
        mean per-gene Pearson r, the score the tables report; the default of
        ``recipe="small_data"``). Recorded in ``model.trained_on['selected_on']``.
    checkpoint_dir
        Folder for Lightning checkpoints (``last.ckpt`` after every epoch).
    resume
        Continue from ``checkpoint_dir/last.ckpt`` if it exists.
    devices, strategy, num_nodes, precision
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``devices=4, strategy="ddp"``).
        ``precision`` defaults to ``"bf16-mixed"`` on GPU and ``"32-true"`` on CPU.
    progress
        ``True``: Lightning's progress bar; ``False``: silent; ``"text"``: a plain line after
        the first and last epochs and at most every 10 s in between (epoch, losses, seconds),
        for logs and pipes where a redrawn bar is unreadable. (Formerly ``progress_bar=``,
        deprecated.)
    store
        Store the model record in ``uns['sthisto']['models'][key_added]``.
    models_dir
        Write the stored model's weights to ``<models_dir>/<key_added>.safetensors`` instead of
        into ``uns``; the record then holds the manifest, the file's path and its SHA-256, which
        :func:`get_model` / :func:`predict` check. Keeps an h5ad small; the file must travel
        with it (or be found again with ``get_model(..., models_dir=)``).
    overwrite
        Replace an existing stored model with the same key (and its weights file).
    recipe
        How the network is optimised. ``"paper"`` (default): each paper's settings, unchanged.
        ``"small_data"``: the same architecture and loss, optimised to learn from few sections:
        per-gene target scaling folded back into the output layer, output bias at the training
        mean, standardised input features, weight decay ``1e-4`` (unless ``weight_decay=`` is
        given), the method's ``small_data_lr`` (unless ``lr=`` is given), linear warm-up then
        cosine decay, and, unless ``validation=`` is given, validation on held-aside training
        data (15 % of the training spots, or the last training section when there are four or
        more) with early stopping (patience: a fifth of the epochs, at least 20; or
        ``early_stopping=``) and the best epoch kept, "best" being the highest per-gene
        Pearson r there (see ``monitor``); networks that read image patches see each training
        patch under a random one of its 8 rotations / reflections; THItoGene and HGGEF train on
        random spatial sub-sections of their sections, their grid positions shifted at random
        (``subsection_spots``, ``subsections_per_epoch``; recorded in
        ``model.trained_on['subsections']``); and an ensemble of 4 networks (see
        ``n_members``) whose members hold aside different training sections. Recorded in
        ``model.trained_on['recipe']`` and the ``recipe`` column of metrics tables; what each
        change is for is on the methods page ("Training recipes"). Closed-form methods (ridge)
        are unaffected.
    n_members
        Train a deep ensemble of this many models through the same training path; member
        ``k`` (0-based) uses seed ``seed + 1000 * k``. ``None`` (default): 1, or under
        ``recipe="small_data"`` 4 for networks (an ensemble whose members hold aside different
        training sections; measured on her2st, see the methods page). The returned model is member 0 and
        carries the others in ``model.members``; its predictions are the members' mean and
        ``tl.predict(..., uncertainty="ensemble")`` adds their standard deviation. Stored,
        saved and loaded as one model.
    bootstrap
        With ``n_members > 1``: members 1..K-1 train on the distinct sections of a bootstrap
        draw of the training sections (of the spots, with one training section; seeded by
        ``seed``) instead of all of them. ``None`` (default): bootstrap closed-form methods
        (ridge, whose fit does not depend on a seed) and not networks.
    **method_params
        Network, data and training parameters of the method (e.g. ``lr``, ``patch_size_um``,
        ``depth``); unknown names raise an error listing the valid ones. The graph methods
        (THItoGene, HGGEF, ``ridge_context``) take ``graph_key``: an ``adata.obsp`` spot graph
        the user built (e.g. ``"spatial_connectivities"`` from
        ``squidpy.gr.spatial_neighbors``) to use instead of the paper's own; it is recorded in
        the model, and the sections it predicts need the same key.

    Returns
    -------
    The trained model (an :class:`~sthisto.models.ExpressionModel`). With ``store=True`` it
    also writes ``adata.uns['sthisto']['models'][key_added]``:
    ``{'manifest': <JSON>, 'weights': <safetensors bytes as uint8>}``, or with ``models_dir``
    ``{'manifest', 'weights_stored': 'file', 'weights_file', 'weights_name', 'weights_sha256',
    'weights_bytes'}``. The record survives ``write_h5ad``/``read_h5ad`` and :func:`get_model`
    rebuilds an identical model from it.

    Examples
    --------
    >>> adata = sthisto.datasets.synthetic(n_sections=3)
    >>> model = sthisto.tl.train(adata, "thitogene_tiny", train_mask=["S0", "S1"], max_epochs=5)
    >>> sthisto.tl.predict(adata, "thitogene_tiny")
    """
    from ..models._registry import resolve_method
    from ._uncertainty import check_members

    cls, variant_params = resolve_method(method)
    max_epochs = check_max_epochs(max_epochs)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed={seed!r} must be an integer (it seeds weights, data order and the validation split).")
    from ..engine._recipes import check_recipe, default_members

    n_members, bootstrap = check_members(default_members(n_members, check_recipe(recipe), cls), bootstrap, cls)
    key_added = key_added or (method if isinstance(method, str) else cls.name)
    if store and not overwrite and key_added in adata.uns.get(Uns.STHISTO, {}).get(Uns.MODELS, {}):
        raise InputError(
            f"adata.uns['sthisto']['models'][{key_added!r}] already exists. Pass overwrite=True to "
            f"replace it, or key_added='<new name>' to keep both."
        )
    weights_file = None
    if models_dir is not None:
        if not store:
            raise InputError("models_dir= holds the stored model's weights, but store=False stores none; drop one.")
        from ._stored_models import train_weights_file

        weights_file = train_weights_file(models_dir, key_added, overwrite=overwrite)
    from ..models._protocol import check_spots

    check_spots(adata)
    chosen_genes = _resolve_genes(adata, genes)
    train_index = _resolve_train_index(adata, train_mask)
    params = {**variant_params, **method_params}
    cls.split_params(params)  # unknown parameter names fail here, before any work
    requested_validation, requested_early_stopping = validation, early_stopping  # members decide their own
    from ..engine._recipes import check_monitor, check_recipe, default_patience, default_validation

    recipe = check_recipe(recipe)
    monitor = check_monitor(monitor, recipe)
    if recipe == "small_data" and cls.network_class is not None:
        if validation is None:
            validation = default_validation(sorted(set(library_ids(adata)[train_index])))
        if early_stopping is None:
            epochs = max_epochs if max_epochs is not None else {**cls.all_training_defaults(), **params}["max_epochs"]
            early_stopping = default_patience(int(epochs))
    _check_section_sizes(adata, cls, train_index)
    _check_engine_options(adata, train_index, validation, early_stopping, resume, checkpoint_dir, seed)
    # Targets are validated before the model is configured: configuring may embed images
    # (feature-based methods), and a refused call must leave adata unchanged.
    targets, counts, sizes = _targets(
        adata,
        train_index,
        chosen_genes,
        layer=layer,
        variant={**cls.all_data_defaults(), **params}["target"],
        need_counts=cls.uses_counts,
    )
    _seed_everything(seed)  # before the network is created: initial weights follow the seed
    model = cls.configure(adata, genes=chosen_genes, train_index=train_index, params=params)
    model.check_inputs(adata, train_index)
    model.data_params["target_layer"] = layer
    scale = None
    fit_targets = targets
    if recipe == "small_data":
        from ..engine._recipes import prepare

        fit_targets, scale = prepare(model, adata, train_index, targets, user_params=params)
        model._recipe = recipe
        model._augment = model.input_kind == "pixels"
    try:
        model.fit(
            adata,
            train_index,
            targets=fit_targets,
            counts=counts,
            size_factors=sizes,
            validation=validation,
            early_stopping=early_stopping,
            monitor=monitor,
            seed=seed,
            max_epochs=max_epochs,
            device=device,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress_bar=progress,
        )
    finally:
        model.__dict__.pop("_recipe", None)
        model.__dict__.pop("_augment", None)
    if scale is not None:
        from ..engine._recipes import fold_output_scale

        fold_output_scale(model, scale)
    model.trained_on["recipe"] = recipe
    if recipe == "small_data" and model.network is not None:
        model.trained_on["augmentation"] = "dihedral (8 views)" if model.input_kind == "pixels" else None
    # The gene-mean predictor (each gene's training mean at every spot) is the floor every
    # table is read against; tl.evaluate needs the mean the model saw, so it travels with it.
    model.trained_on[TARGET_MEAN_KEY] = training_mean(targets)
    if n_members > 1:
        _train_members(
            adata,
            model,
            method,
            n_members=n_members,
            bootstrap=bootstrap,
            train_index=train_index,
            genes=chosen_genes,
            layer=layer,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            options={
                "max_epochs": max_epochs,
                "device": device,
                "validation": requested_validation,
                "early_stopping": requested_early_stopping,
                "monitor": monitor,
                "recipe": recipe,
                "n_members": 1,
                "resume": resume,
                "devices": devices,
                "strategy": strategy,
                "num_nodes": num_nodes,
                "precision": precision,
                "progress": progress,
                **method_params,
            },
        )
    if model.network is not None:  # a diverged run must not be stored as a trained model
        check_finite_tensors(model.state_tensors(), where=f"the {model.name} model just trained")
    if store:
        store_model(adata, model, key_added=key_added, overwrite=overwrite, weights_file=weights_file)
    return model


def training_mean(targets) -> list[float]:
    """Each gene's mean over the training spots, as JSON-able floats (the gene-mean predictor)."""
    values = targets.mean(axis=0) if hasattr(targets, "toarray") else np.asarray(targets, dtype=np.float64).mean(0)
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _check_section_sizes(adata, cls, train_index: np.ndarray) -> None:
    """Section-batched networks take statistics across a section's spots: one spot alone cannot train."""
    if cls.network_class is None or cls.batching != "section":
        return
    libraries, counts = np.unique(library_ids(adata)[train_index], return_counts=True)
    alone = libraries[counts < 2].tolist()
    if alone:
        raise InputError(
            f"training sections {alone} have a single spot; {cls.name!r} trains on whole sections (attention "
            f"and batch statistics across their spots), which needs at least 2. Drop those sections from "
            f"train_mask or add their other spots."
        )


def _train_members(
    adata, model, method, *, n_members, bootstrap, train_index, genes, layer, seed, checkpoint_dir, options
):
    """Members 1..K-1 of an ensemble, each trained by :func:`train` itself (one shared path)."""
    from ._uncertainty import describe, member_masks

    masks = member_masks(adata, train_index, n_members, bootstrap=bootstrap, seed=seed)
    members = []
    for number, member_index in enumerate(masks, start=1):
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[member_index] = True
        logger.info("training ensemble member %d of %d", number + 1, n_members)
        member_options = {**options, "validation": _member_validation(adata, member_index, number, options)}
        members.append(
            train(
                adata,
                method,
                genes=genes,
                layer=layer,
                train_mask=mask,
                seed=seed + 1000 * number,
                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"member{number}",
                store=False,
                **member_options,
            )
        )
    model.members = members
    model.trained_on["ensemble"] = describe([model, *members], bootstrap=bootstrap)


def _member_validation(adata, member_index: np.ndarray, number: int, options: dict):
    """Member ``number``'s validation: under ``small_data`` a different held-aside section each.

    Member 0 holds aside the last training section (the recipe's default); member ``k`` the
    ``k``-th from the end, cycling. Averaged, the members have fitted every training section
    and chosen their epochs on different ones, instead of all ignoring the same section.
    """
    from ..engine._recipes import default_validation

    if options.get("recipe") != "small_data" or options.get("validation") is not None:
        return options.get("validation")
    libraries = sorted(set(library_ids(adata)[member_index]))
    if not isinstance(default_validation(libraries), list):
        return None  # a spot fraction: the member's own seed draws a different one
    return [libraries[-(1 + number) % len(libraries)]]


def _check_engine_options(adata, train_index, validation, early_stopping, resume, checkpoint_dir, seed) -> None:
    from ..engine._loop import split_validation

    split_validation(adata, train_index, validation, seed=seed)  # raises on a bad split
    if early_stopping and validation is None:
        raise InputError(
            "early_stopping needs a validation split: pass validation=0.1 or a list of training libraries."
        )
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir=<folder of an earlier run>.")


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def store_model(
    adata, model, *, key_added: str, overwrite: bool = False, weights_file=None, manifest_only: bool = False
) -> None:
    """Write a model's record to ``adata.uns['sthisto']['models'][key_added]``.

    ``weights_file``: ``(path, relative name)`` to write the weights to instead of ``uns``.
    ``manifest_only``: the weights did not change (a calibration); a record whose weights are in
    a file keeps its file and only gets the new manifest.
    """
    from ._stored_models import model_record, with_new_manifest

    models = sthisto_uns(adata).setdefault(Uns.MODELS, {})
    if key_added in models and not overwrite:
        raise InputError(f"adata.uns['sthisto']['models'][{key_added!r}] already exists; pass overwrite=True.")
    updated = with_new_manifest(models[key_added], model) if manifest_only and key_added in models else None
    models[key_added] = updated if updated is not None else model_record(model, weights_file=weights_file)
    logger.info("train: added uns['sthisto']['models'][%r]", key_added)


@checked_input
def get_model(
    adata: AnnData, key: str, *, fold: str | None = None, models_dir: str | Path | None = None
) -> ExpressionModel:
    """Rebuild the model stored under ``adata.uns['sthisto']['models'][key]`` (or a fold's).

    Parameters
    ----------
    adata
        The AnnData a model was trained on (or any object carrying its record).
    key
        The ``key_added`` of :func:`train`; with ``fold``, the key of a
        :func:`~sthisto.tl.cross_validate` run.
    fold
        Rebuild this fold's model of ``uns['sthisto']['cross_validate'][key]``. Possible only
        when the run kept weights (``store_weights=True`` or ``models_dir=``); otherwise the
        error says how to retrain the fold.
    models_dir
        Where the weights file of a record written with ``models_dir=`` is now (the folder was
        moved): the file is looked up by its name relative to the original folder. The
        file's SHA-256 is checked either way.

    Returns
    -------
    The trained model, with weights identical to the stored ones.
    """
    from ..io._model import model_from_record

    if fold is not None:
        from ._stored_models import fold_model

        return fold_model(adata, key, fold, models_dir=models_dir)
    models = adata.uns.get(Uns.STHISTO, {}).get(Uns.MODELS, {})
    if key not in models:
        raise MissingKeyError(
            f"no model stored under uns['sthisto']['models'][{key!r}] (stored: {sorted(models)}). "
            f"Train one with sthisto.tl.train(adata, ..., key_added={key!r}) or pass a model object or path."
        )
    return model_from_record(models[key], models_dir=models_dir)


def _resolve_model(adata, model):
    from ..io._model import load_model
    from ..models._protocol import ExpressionModel

    if isinstance(model, ExpressionModel):
        check_finite_tensors(model.state_tensors(), where=f"the {model.name} model passed")
        return model, None
    if isinstance(model, (str, Path)):
        models = adata.uns.get(Uns.STHISTO, {}).get(Uns.MODELS, {})
        if isinstance(model, str) and model in models:
            return get_model(adata, model), model
        if Path(model).exists():
            return load_model(model), None
        raise MissingKeyError(
            f"model={str(model)!r} is neither a key of uns['sthisto']['models'] ({sorted(models)}) nor an "
            f"existing saved-model folder. Pass a stored key, a model object, or a path written by model.save()."
        )
    raise InputError(f"model must be a stored key, a model object or a saved path; got {type(model).__name__}.")


@accepts_spatialdata
@checked_input(genes=True)
def predict(
    adata: AnnData,
    model: str | PathLike[str] | ExpressionModel,
    *,
    key_added: str | None = None,
    device: str = "auto",
    uncertainty: str | None = None,
    interval: float | None = None,
    n_samples: int = 20,
    seed: int = 0,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Predict expression with a trained model, streaming each section in bounded pieces.

    Sections are never loaded whole: per-spot methods read patches one batch at a time;
    section-wide (attention/graph) methods run on whole sections by default, or on spatial
    neighbourhoods of at most ``prediction_chunk_spots`` spots with a halo of context spots
    (``model.data_params``; see :meth:`~sthisto.models.ExpressionModel.prediction_plan`). On an
    image-only AnnData of pseudo-spots (:func:`sthisto.pp.tile`) this predicts a whole slide.
    For several GPUs or nodes use :func:`sthisto.tl.predict_distributed`.

    Parameters
    ----------
    adata
        Spots to predict (images or features as the model needs; any number of sections).
    model
        A key of ``uns['sthisto']['models']``, a model object, or a folder written by
        ``model.save``.
    key_added
        Output name (default: the stored key, else the method name).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
    uncertainty
        Spread of each prediction, written to ``layers[f"{key_added}_std"]`` (prediction scale):
        ``"ensemble"`` (standard deviation across the members of a model trained with
        ``n_members=K``; the prediction is their mean), ``"dropout"`` (Monte-Carlo dropout:
        ``n_samples`` seeded passes with dropout on; networks with dropout only), or
        ``"distribution"`` (HGGEF's ZINB heads; also writes ``_count_mean``, ``_count_var``
        and ``_dropout_prob`` on the count scale at size factor 1, and the delta-method
        standard deviation on the prediction scale). ``None``: no spread (an ensemble still
        predicts its members' mean).
    interval
        Coverage level of conformal intervals (e.g. ``0.9``), written to
        ``layers[f"{key_added}_lower"]`` / ``[f"{key_added}_upper"]``. Needs a calibration
        (:func:`sthisto.tl.calibrate`); with ``uncertainty`` and a calibration of that spread
        the intervals are locally adaptive, else of constant width per gene.
    n_samples
        Monte-Carlo dropout passes.
    seed
        Seed of the Monte-Carlo dropout passes (pass ``t`` uses ``seed + t``): a seed repeats
        exactly.
    overwrite
        Replace existing outputs with the same key.
    copy
        ``False`` (default): write into ``adata`` and return ``None``. ``True``: leave
        ``adata`` exactly as it was (image features a feature-based model computes go to the
        copy only) and return the result as a new object (see Returns).

    Returns
    -------
    ``None`` with ``copy=False``; with ``copy=True`` a modified copy of ``adata`` holding the
    same keys, except for image-only data (see below). When every model gene is in
    ``adata.var_names`` the call writes

    - ``adata.layers[key_added]``: predictions aligned with ``var`` (model output scale, e.g.
      log10(1 + counts per 10k)); a dense array when the model predicts every gene of
      ``var``, else a sparse CSR matrix holding only the predicted genes' columns;
    - ``adata.var[f"{key_added}_predicted"]``: True for the genes the model predicts;
    - with ``uncertainty`` / ``interval``: ``layers[f"{key_added}_std"]``, ``_lower``,
      ``_upper`` (and ``_count_mean``, ``_count_var``, ``_dropout_prob`` for
      ``"distribution"``), aligned like ``layers[key_added]``; replacing a prediction with
      ``overwrite=True`` removes such layers it does not write again;
    - ``adata.uns['sthisto']['predict'][key_added]``: method, model genes, provenance
      (including ``streaming``: how sections were cut into units; ``weights`` /
      ``random_weights`` / ``weights_provenance``: where the weights of the model's pretrained
      components came from, see :func:`sthisto.encoders.weights_label`; ``point``,
      ``uncertainty`` and, with ``interval``, the calibration used: level, kind, calibration
      sections and the stored quantiles, from which :func:`sthisto.tl.evaluate` draws the
      calibration curve; ``written_to``: ``"layers"``, ``"obsm"`` or ``"new AnnData"``).

    When some model gene is not in ``var`` (image-only pseudo-spots from
    :func:`sthisto.pp.tile`, or other genes measured), ``var`` cannot hold the predictions:

    - ``copy=False`` writes ``adata.obsm[key_added]``, a DataFrame of spots × the model's
      genes (column names), the companions as ``obsm[f"{key_added}_std"]`` etc. in the same
      form, and the ``uns`` record above;
    - ``copy=True`` returns a **new** AnnData with the spots of ``adata`` (``obs``, ``obsm``,
      ``uns['spatial']`` shared), ``var`` = the model's genes, ``X`` and
      ``layers[key_added]`` = predictions, companions as layers, and the same ``uns`` record;
      ``adata`` is left unchanged. For a SpatialData table + shapes pass it to
      :func:`sthisto.io.to_spatialdata`.
    """
    from ._intervals import choose_calibration, decode_quantiles, interval_bounds
    from ._uncertainty import check_mode, check_supported, predictive

    fitted, stored_key = _resolve_model(adata, model)
    check_mode(uncertainty)
    check_supported(fitted, uncertainty, n_samples=n_samples)
    calibration_key, calibration = (None, None)
    if interval is not None:
        calibration_key, calibration = choose_calibration(fitted, uncertainty, interval)
    companions = _companions(uncertainty, interval)
    request = _prediction_request(
        adata, fitted, stored_key, key_added=key_added, overwrite=overwrite, copy=copy, companions=companions
    )
    # With copy=True everything, including features a feature-based model computes, goes to the copy.
    target = maybe_copy(adata, copy)
    fitted.prediction_summary = None
    output = predictive(fitted, target, uncertainty=uncertainty, n_samples=n_samples, seed=seed, device=device)
    request.provenance["streaming"] = json.dumps(getattr(fitted, "prediction_summary", None))
    extra = {name: output[name] for name in companions if name in output}
    request.provenance["point"] = f"mean of {len(fitted.members) + 1} ensemble members" if fitted.members else "model"
    request.provenance["uncertainty"] = uncertainty if uncertainty is not None else "None"
    if uncertainty == "dropout":
        request.provenance.update(n_samples=int(n_samples), seed=int(seed))
    if calibration is not None:
        use_std = output.get("std") if calibration["conformal"] == "normalized" else None
        extra["lower"], extra["upper"] = interval_bounds(calibration, output["mean"], use_std, float(interval))
        request.provenance["interval"] = {
            "level": float(interval),
            "calibration": calibration_key,
            "conformal": calibration["conformal"],
            "calibration_libraries": list(calibration.get("libraries", [])),
            "n_calibration_spots": int(calibration.get("n_spots", 0)),
            "levels": np.asarray(calibration["levels"], dtype=np.float64),
            "quantiles": decode_quantiles(calibration["quantiles"]),
            "beta": np.asarray(calibration.get("beta") or [], dtype=np.float64),
        }
    if copy and request.aligned:
        _store_predictions(target, fitted, request, output["mean"], overwrite=overwrite, copy=False, extra=extra)
        return target
    return _store_predictions(target, fitted, request, output["mean"], overwrite=overwrite, copy=copy, extra=extra)


def _companions(uncertainty, interval) -> list[str]:
    """Uncertainty layers a :func:`predict` call writes (suffixes of ``Layers.companion``)."""
    names = []
    if uncertainty is not None:
        names.append("std")
    if uncertainty == "distribution":
        names += ["count_mean", "count_var", "dropout_prob"]
    if interval is not None:
        names += ["lower", "upper"]
    return names


class _PredictionRequest:
    """What :func:`predict` will write, checked before anything is computed."""

    def __init__(self, key_added: str, measured: np.ndarray, aligned: bool, provenance: dict) -> None:
        self.key_added = key_added
        self.measured = measured
        self.aligned = aligned
        self.provenance = provenance


def weights_fields(fitted) -> dict[str, Any]:
    """The model's weight provenance as record fields: ``weights`` (label), ``random_weights``, full record."""
    from ..encoders._provenance import has_random_weights, weights_label

    provenance = getattr(fitted, "provenance", None)
    return {
        "weights": weights_label(provenance),
        "random_weights": has_random_weights(provenance),
        "weights_provenance": json.dumps(provenance),
    }


def _prediction_request(adata, fitted, stored_key, *, key_added, overwrite, copy, companions=()) -> _PredictionRequest:
    key_added = key_added or stored_key or fitted.name
    var_names = pd.Index(adata.var_names.astype(str))
    measured = var_names.get_indexer(fitted.genes)
    aligned = bool((measured >= 0).all()) and adata.n_vars > 0
    provenance = {
        "method": fitted.name,
        "model_key": stored_key,
        "genes": list(fitted.genes),
        "target": fitted.data_params.get("target"),
        "target_layer": fitted.data_params.get("target_layer"),
        "trained_on": json.dumps(fitted.trained_on),
        "libraries": sorted(set(library_ids(adata))) if Obs.LIBRARY_ID in adata.obs else [],
        **weights_fields(fitted),
    }
    if aligned:
        check_writable(adata, "layers", key_added, overwrite=overwrite)
        check_writable(adata, "var", Var.predicted(key_added), overwrite=overwrite)
        for name in companions:
            check_writable(adata, "layers", Layers.companion(key_added, name), overwrite=overwrite)
    elif not copy:
        check_writable(adata, "obsm", key_added, overwrite=overwrite)
        for name in companions:
            check_writable(adata, "obsm", Layers.companion(key_added, name), overwrite=overwrite)
    return _PredictionRequest(key_added, measured, aligned, provenance)


def _store_predictions(
    adata, fitted, request: _PredictionRequest, predictions, *, overwrite: bool, copy: bool, extra=None
):
    import anndata as ad
    import scipy.sparse as sp

    key_added, measured, provenance = request.key_added, request.measured, request.provenance
    if not request.aligned and (measured >= 0).any():
        logger.info(
            "%d of the model's %d genes are not in adata.var_names: predictions of all its genes go to %s.",
            int((measured < 0).sum()),
            len(fitted.genes),
            "a new AnnData" if copy else f"adata.obsm[{key_added!r}]",
        )
    if not request.aligned and not copy:
        # var cannot grow in place, so genes var lacks go to obsm, one named column per model gene.
        provenance["written_to"] = "obsm"
        names = pd.Index(fitted.genes, name=None)

        def table(values):
            return pd.DataFrame(np.asarray(values, dtype=np.float32), index=adata.obs_names.copy(), columns=names)

        write(adata, "obsm", key_added, table(predictions), overwrite=overwrite)
        for name, values in (extra or {}).items():
            write(adata, "obsm", Layers.companion(key_added, name), table(values), overwrite=overwrite)
        record(adata, "predict", key_added, provenance, overwrite=True)
        return None
    if not request.aligned:
        provenance["written_to"] = "new AnnData"
        result = ad.AnnData(
            X=predictions,
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=pd.Index(fitted.genes, name=None)),
            obsm={k: np.asarray(v).copy() for k, v in adata.obsm.items()},
            uns={k: v for k, v in adata.uns.items() if k == Uns.SPATIAL},
        )
        result.layers[key_added] = predictions
        for name, values in (extra or {}).items():
            result.layers[Layers.companion(key_added, name)] = np.asarray(values, dtype=np.float32)
        result.var[Var.predicted(key_added)] = True
        record(result, "predict", key_added, provenance)
        return result

    provenance["written_to"] = "layers"
    adata = maybe_copy(adata, copy)
    full = len(fitted.genes) == adata.n_vars and (measured == np.arange(adata.n_vars)).all()

    def aligned(values):
        if full:
            return values
        order = np.argsort(measured)  # CSR wants each row's columns sorted
        n_obs, n_genes = values.shape
        return sp.csr_matrix(
            (
                np.asarray(values, dtype=np.float32)[:, order].ravel(),
                np.tile(measured[order], n_obs),
                np.arange(0, n_obs * n_genes + 1, n_genes),
            ),
            shape=(adata.n_obs, adata.n_vars),
            dtype=np.float32,
        )

    flag = np.zeros(adata.n_vars, dtype=bool)
    flag[measured] = True
    write(adata, "layers", key_added, aligned(predictions), overwrite=overwrite)
    for name, values in (extra or {}).items():
        write(adata, "layers", Layers.companion(key_added, name), aligned(values), overwrite=overwrite)
    for name in Layers.COMPANIONS:
        stale = Layers.companion(key_added, name)
        if overwrite and name not in (extra or {}) and stale in adata.layers:
            # Spread or intervals of an earlier prediction would no longer belong to layers[key_added].
            del adata.layers[stale]
            logger.info("removed adata.layers[%r] of the replaced prediction", stale)
    write(adata, "var", Var.predicted(key_added), flag, overwrite=overwrite)
    record(adata, "predict", key_added, provenance, overwrite=True)
    return adata if copy else None
