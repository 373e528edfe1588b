"""``tl.superresolve``: predict expression between measured spots (HisToSGE; see docs/methods.md).

New spots are made by translating every measured spot by fixed offsets, expressed in polar
form relative to the centre distance ``R`` of the grid (derived per library from the data,
never hard-coded in pixels). Their image features are real: the model embeds the patches at
the new positions with its own stored encoder configuration, exactly as it does for measured
spots, then predicts.

Offsets (angle 0° points towards increasing ``array_col`` along a grid row, 90° towards the
previous row — "up" on an image whose rows grow downwards):

================  ==========================================================================
grid, factor      offsets ``(distance, angle)``
================  ==========================================================================
square, 8         the paper's: ``(R/2, 0)``, ``(R/(2√2), π/4)``, ``(R/(2√2), 5π/4)``,
                  ``(R/2, π)``, ``(R/2, π/2)``; on the square legacy-ST grid HisToSGE was shown
                  on. Neighbours share their ``0``/``π`` midpoints, so after de-duplication
                  each measured spot adds 4 new ones (5 before): 5× the measured density with
                  the parents, on a declared grid of step ``R/4``.
hex, 4            the authors' code: midpoints towards the hexagonal neighbours at 0°, 60°,
                  120° — 3 new spots per parent; with the parents they form a hexagonal grid of
                  spacing ``R/2`` (4× density) in the Visium convention.
square, 4         the square-grid analogue of the hexagonal mode: midpoints towards the
                  neighbours at 0°, 90° and the diagonal one at 45° (the cell centre) — 3 new
                  spots per parent; with the parents, a square grid of step ``R/2`` (4×).
hex, 8            refused: the paper's offsets mix half and quarter steps that do not fall on
                  any lattice together with a hexagonal grid's rows (``R·√3/2`` apart), so no
                  finer integer grid can be declared; use ``factor=4`` on Visium data.
================  ==========================================================================
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import check_record_writable, record
from .._constants import Images, Obs, ScaleFactors, Uns, Var
from .._errors import InputError, MissingKeyError, NoImageError
from .._images import has_image, microns_per_pixel
from .._logging import logger
from .._sdata import accepts_spatialdata
from .._validate import checked_input
from ..pp._patches import library_ids, spot_coordinates

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models._protocol import ExpressionModel

FUNCTION = "superresolve"
OFFSETS: dict[tuple[str, int], tuple[tuple[float, float], ...]] = {
    ("square", 8): (
        (0.5, 0.0),
        (1 / (2 * math.sqrt(2)), math.pi / 4),
        (1 / (2 * math.sqrt(2)), 5 * math.pi / 4),
        (0.5, math.pi),
        (0.5, math.pi / 2),
    ),
    ("hex", 4): ((0.5, 0.0), (0.5, math.pi / 3), (0.5, 2 * math.pi / 3)),
    ("square", 4): ((0.5, 0.0), (0.5, math.pi / 2), (1 / math.sqrt(2), math.pi / 4)),
}
"""``(distance / R, angle)`` of the new spots around each measured one, per (grid, factor)."""
FINE_STEPS = {("square", 8): 4, ("hex", 4): 2, ("square", 4): 2}
"""Declared grid: each measured grid unit is divided into this many steps per axis."""
DEFAULT_BATCH = 2000
"""Measured spots whose new spots are embedded and predicted together."""
_SPACING_TOLERANCE = 0.1


@accepts_spatialdata
@checked_input(genes=True)
def superresolve(
    adata: AnnData,
    model: str | PathLike[str] | ExpressionModel,
    *,
    factor: int = 4,
    library_id: str | None = None,
    key_added: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    grid: str = "auto",
    include_original: bool = False,
    as_spatialdata: bool = False,
    overwrite: bool = False,
) -> AnnData | SpatialData:
    """Predict expression at new spots placed between the measured ones.

    Every measured spot is translated by the offsets of ``factor`` (see the table in
    :mod:`sthisto.tl._superresolve` and the HisToSGE section of the methods page), with ``R`` the median
    nearest-neighbour centre distance of the library's spots in full-resolution pixels
    (checked against ``spot_spacing_um`` / µm per pixel; a disagreement above 10% is logged)
    and directions following the grid's own axes (a least-squares fit of pixel on array
    coordinates, so rotated or flipped arrays work). Coinciding new spots are merged, spots
    whose centre falls outside the image are dropped (and counted). The model then embeds
    the patches at the new positions with its stored encoder configuration (feature-based
    methods; HisToSGE's paper descriptor uses the training coordinate frame of the section)
    or reads them (pixel methods), and predicts.

    Position-embedding methods see each new spot at its parent's grid position (their tables
    are indexed in measured grid units; a point between nodes has no entry of its own); graph
    methods build their kNN graph on the new spots' true positions in measured grid units.

    Parameters
    ----------
    adata
        Measured spots with images (AnnData convention); any number of libraries.
    model
        A key of ``uns['sthisto']['models']``, a model object or a saved-model folder.
    factor
        4 or 8 (see above).
    library_id
        Library to super-resolve; default: all.
    key_added
        Name of the predictions (``layers``) and of the record; default
        ``f"{model}_superresolved"``.
    batch_size
        Measured spots processed together (their new spots embedded and predicted at once);
        bounds memory on whole slides. Default 2000. Section-wide methods predict whole
        libraries in spatial neighbourhoods of this many new spots with a halo instead.
    device
        ``"auto"``, ``"cpu"``, ``"cuda[:i]"``.
    grid
        ``"auto"`` (from the spots' geometry: six neighbours at distance ``R`` → ``"hex"``,
        four → ``"square"``), ``"hex"`` or ``"square"``.
    include_original
        Also predict at the measured spots (``offset_index`` 0) and include them.
    as_spatialdata
        Return a :class:`spatialdata.SpatialData` (image, circles, table) via
        :func:`sthisto.io.to_spatialdata`.
    overwrite
        The result carries ``adata``'s ``uns['sthisto']`` records (stored models, embeddings'
        provenance); replace a carried ``superresolve`` record named ``key_added`` (when
        ``adata`` is itself a super-resolved object) instead of refusing.

    Returns
    -------
    A new AnnData (``adata`` is not modified), one row per new spot:

    ``X``, ``layers[key_added]``
        Predictions in the model's target scale; ``var`` = the model's genes with
        ``var[f"{key_added}_predicted"]``.
    ``obs``
        ``library_id``; ``parent_spot`` (``obs_names`` of the measured spot translated);
        ``offset_index`` (1-based index into the offsets, 0 for included measured spots);
        ``array_row`` / ``array_col``: integers on the declared finer grid (from 0);
        ``patch_clipped``: True where the patch the model read for the spot (its pixels, or
        the encoder's field of view for feature methods) crosses the image border and was
        padded with white, so its prediction rests on partly blank input.
    ``obsm['spatial']``
        Centres (x, y) in full-resolution pixels, all inside the image.
    ``uns['spatial'][library_id]``
        The images shared by reference; scalefactors with ``spot_spacing_um`` = the declared
        grid step in µm and ``spot_diameter_fullres`` = the parent diameter scaled like the
        spacing; metadata ``pseudo_spots='superresolve'``.
    ``uns['sthisto']``
        ``adata``'s records, plus ``['superresolve'][key_added]``: factor, grid, offsets, per
        library ``R`` (px and µm), the declared spacing, counts of candidates, merged
        duplicates, spots dropped outside the image and patches clipped at its border
        (``n_patch_clipped``); method and model.

    Examples
    --------
    >>> model = sthisto.tl.train(adata, "histosge", encoder="uni", encoder_weights="uni.bin")
    >>> fine = sthisto.tl.superresolve(adata, model, factor=8)
    >>> sthisto.pl.slide_map(fine, ["ERBB2"])
    """
    from ..pp._tile import full_resolution_shape, pseudo_spot_adata
    from ._train import _resolve_model

    if isinstance(factor, bool) or factor not in (4, 8):
        raise InputError(f"factor={factor!r}; use 4 (the code's hexagonal mode) or 8 (the paper's offsets).")
    if grid not in ("auto", "hex", "square"):
        raise InputError(f"grid={grid!r}; use 'auto', 'hex' or 'square'.")
    if batch_size is None:
        batch_size = DEFAULT_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer.")
    fitted, stored_key = _resolve_model(adata, model)
    key_added = key_added or f"{stored_key or fitted.name}_superresolved"
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added={key_added!r} must be a non-empty string.")
    check_record_writable(adata, FUNCTION, key_added, overwrite=overwrite)
    libraries_of_spot = library_ids(adata)
    coords = spot_coordinates(adata)
    present = list(dict.fromkeys(libraries_of_spot))
    if library_id is not None:
        if str(library_id) not in present:
            raise MissingKeyError(f"library_id={library_id!r} has no spots; the libraries are {present}.")
        chosen = [str(library_id)]
    else:
        chosen = present
    without = [lib for lib in chosen if not has_image(adata, lib)]
    if without:
        raise NoImageError(
            f"libraries {without} have no H&E image: new spots need pixels for their features. Pass "
            f"library_id= one of {[lib for lib in chosen if lib not in without]}."
        )
    from .._spots import grid_positions

    positions = grid_positions(adata)  # (col, row)

    # -- geometry: new spot positions, de-duplicated, inside the image ----------------------------
    parts, summary = [], {}
    for library in chosen:
        rows = np.flatnonzero(libraries_of_spot == library)
        if len(rows) < 2:
            raise InputError(f"library {library!r} has {len(rows)} spot(s); R is a distance between spots (need ≥ 2).")
        mpp = microns_per_pixel(adata, library)
        height, width = full_resolution_shape(adata, library)
        geometry = _library_geometry(adata, library, coords[rows], positions[rows], grid)
        kind = geometry["grid"]
        if (kind, factor) not in OFFSETS:
            raise InputError(
                f"factor=8 uses the paper's offsets, defined for square (legacy ST) grids; library {library!r} is "
                f"on a hexagonal grid, where they fall on no finer lattice. Use factor=4 (midpoints towards the six "
                f"neighbours, a hexagonal grid of half the spacing)."
            )
        new = _new_spots(
            adata.obs_names[rows].to_numpy(),
            coords[rows],
            positions[rows],
            geometry,
            factor=factor,
            include_original=include_original,
            image_shape=(height, width),
        )
        step = FINE_STEPS[(kind, factor)]
        spacing_um = geometry["R_px"] * mpp / step
        entry = adata.uns[Uns.SPATIAL][library]
        parent_diameter = entry.get(Uns.SCALEFACTORS, {}).get(ScaleFactors.SPOT_DIAMETER)
        new["scalefactors"] = {ScaleFactors.SPOT_SPACING_UM: spacing_um}
        if parent_diameter is not None:
            new["scalefactors"][ScaleFactors.SPOT_DIAMETER] = float(parent_diameter) / step
        new["library"] = library
        parts.append(new)
        summary[library] = {
            "grid": kind,
            "R_px": geometry["R_px"],
            "R_um": geometry["R_px"] * mpp,
            "declared_spacing_um": geometry.get("declared_spacing_um"),
            "fine_steps_per_grid_unit": step,
            "new_spacing_um": spacing_um,
            "n_parents": int(len(rows)),
            "n_candidates": new["n_candidates"],
            "n_duplicates_merged": new["n_duplicates"],
            "n_outside_image": new["n_outside"],
            "n_spots": int(len(new["coords"])),
            "off_grid_rounding": new["off_grid"],
        }
        if new["n_outside"]:
            logger.info("library %r: %d new spots fell outside the image and were dropped", library, new["n_outside"])

    # -- features and predictions, batch by batch of parents ----------------------------------------
    def build(part, select, *, model_facing: bool):
        return pseudo_spot_adata(
            adata,
            libraries=np.full(int(select.sum()), part["library"], dtype=object),
            coords=part["coords"][select],
            array_row=(part["parent_position"][select, 1] if model_facing else part["fine"][select, 1]),
            array_col=(part["parent_position"][select, 0] if model_facing else part["fine"][select, 0]),
            obs_names=part["names"][select],
            scalefactors={part["library"]: part["scalefactors"]},
            kind=FUNCTION,
        )

    predictions, clipped = [], []
    restore = _prepare_model(adata, fitted, chosen, coords, libraries_of_spot)
    try:
        for part in parts:
            out = np.zeros((len(part["coords"]), len(fitted.genes)), dtype=np.float32)
            at_border = np.zeros(len(part["coords"]), dtype=bool)
            if fitted.prediction_mode() == "neighbourhoods":
                everything = np.ones(len(part["coords"]), dtype=bool)
                facing = build(part, everything, model_facing=True)
                chunk = fitted.data_params.get("prediction_chunk_spots")
                fitted.data_params["prediction_chunk_spots"] = chunk or int(batch_size)
                try:
                    graph = part["fine"] / float(FINE_STEPS[(part["grid"], factor)])
                    plan = fitted.prediction_plan(facing, graph_positions=graph)
                    out[:] = fitted.predict_plan(facing, plan, device=device)
                finally:
                    fitted.data_params["prediction_chunk_spots"] = chunk
                at_border[:] = _patch_clipped(facing, fitted)
            else:
                parent_batch = part["parent_index"] // int(batch_size)
                for number in np.unique(parent_batch):
                    select = parent_batch == number
                    facing = build(part, select, model_facing=True)
                    out[select] = fitted.predict(facing, device=device)
                    at_border[select] = _patch_clipped(facing, fitted)
            predictions.append(out)
            clipped.append(at_border)
            summary[part["library"]]["n_patch_clipped"] = int(at_border.sum())
    finally:
        restore()

    # -- output ---------------------------------------------------------------------------------
    names = np.concatenate([p["names"] for p in parts])
    result = pseudo_spot_adata(
        adata,
        libraries=np.concatenate([np.full(len(p["coords"]), p["library"], dtype=object) for p in parts]),
        coords=np.concatenate([p["coords"] for p in parts]),
        array_row=np.concatenate([p["fine"][:, 1] for p in parts]),
        array_col=np.concatenate([p["fine"][:, 0] for p in parts]),
        obs_names=names,
        obs_columns={
            Obs.PARENT_SPOT: np.concatenate([p["parent_name"] for p in parts]).astype(str),
            Obs.OFFSET_INDEX: np.concatenate([p["offset_index"] for p in parts]).astype(np.int64),
            Obs.PATCH_CLIPPED: np.concatenate(clipped) if clipped else np.zeros(0, dtype=bool),
        },
        scalefactors={p["library"]: p["scalefactors"] for p in parts},
        kind=FUNCTION,
        library_order=chosen,
    )
    import anndata as ad

    values = np.concatenate(predictions) if predictions else np.zeros((0, len(fitted.genes)), np.float32)
    result = ad.AnnData(
        X=values,
        obs=result.obs,
        var=pd.DataFrame(index=pd.Index(fitted.genes)),
        obsm=dict(result.obsm),
        uns=dict(result.uns),
    )
    result.layers[key_added] = values
    result.var[Var.predicted(key_added)] = True
    result.uns[Uns.STHISTO] = copy.deepcopy(dict(adata.uns.get(Uns.STHISTO, {})))
    record(
        result,
        FUNCTION,
        key_added,
        {
            "factor": int(factor),
            "offsets": [list(o) for o in OFFSETS[(parts[0]["grid"], factor)]] if parts else [],
            "include_original": bool(include_original),
            "batch_size": int(batch_size),
            "method": fitted.name,
            "model_key": stored_key,
            "genes": list(fitted.genes),
            "target": fitted.data_params.get("target"),
            "features": fitted.data_params.get("encoder") or fitted.data_params.get("features_key") or "pixels",
            "libraries": summary,
        },
        overwrite=overwrite,
    )
    logger.info("super-resolved %d libraries: %d new spots", len(parts), result.n_obs)
    if as_spatialdata:
        from ..io._spatialdata import to_spatialdata

        return to_spatialdata(result)
    return result


def _library_geometry(adata, library: str, coords: np.ndarray, positions: np.ndarray, grid: str) -> dict:
    """``R`` (px), grid kind and the affine map of grid (col, row) → pixels (x, y) of one library."""
    from scipy.spatial import cKDTree

    tree = cKDTree(coords)
    distances, _ = tree.query(coords, k=2)
    nearest = distances[:, 1]
    r_px = float(np.median(nearest))
    if not r_px > 0:
        raise InputError(f"library {library!r} has coinciding spots only; no centre distance can be derived.")
    declared = adata.uns[Uns.SPATIAL][library].get(Uns.SCALEFACTORS, {}).get(ScaleFactors.SPOT_SPACING_UM)
    out = {"R_px": r_px, "declared_spacing_um": None if declared is None else float(declared)}
    if declared is not None:
        expected = float(declared) / microns_per_pixel(adata, library)
        if abs(expected - r_px) > _SPACING_TOLERANCE * expected:
            logger.warning(
                "library %r: the median centre distance is %.4g px but spot_spacing_um / microns_per_pixel gives "
                "%.4g px; using the distance measured on the spots (sparse subsets overestimate it).",
                library,
                r_px,
                expected,
            )
    if grid == "auto":
        counts = np.array([len(n) - 1 for n in tree.query_ball_point(coords, r=1.2 * r_px)])
        interior = float(np.percentile(counts, 90))
        if interior >= 5:
            grid = "hex"
        elif interior >= 3:
            grid = "square"
        else:  # a line or a pair of spots: the Visium parity rule decides
            parity = (positions.sum(axis=1) % 2 == 0).all() and (positions[:, 0] % 2 == 1).any()
            grid = "hex" if parity else "square"
    out["grid"] = grid
    design = np.column_stack([positions.astype(float), np.ones(len(positions))])
    linear = None
    if len(positions) >= 3 and np.linalg.matrix_rank(design) == 3:
        coef, *_ = np.linalg.lstsq(design, coords, rcond=None)
        linear = coef[:2].T  # columns: pixels per array_col, pixels per array_row
        if abs(np.linalg.det(linear)) < 1e-9:
            linear = None
    if linear is None:  # a single row or column: the usual axis-aligned convention
        col_unit = r_px / 2 if grid == "hex" else r_px
        row_unit = r_px * math.sqrt(3) / 2 if grid == "hex" else r_px
        linear = np.array([[col_unit, 0.0], [0.0, row_unit]])
    out["linear"] = linear
    return out


def _new_spots(names, coords, positions, geometry, *, factor, include_original, image_shape) -> dict:
    """Candidates from every parent, merged where they coincide, kept inside the image."""
    grid, r_px, linear = geometry["grid"], geometry["R_px"], geometry["linear"]
    along = linear[:, 0] / np.linalg.norm(linear[:, 0])
    up = -linear[:, 1] - np.dot(-linear[:, 1], along) * along
    up = up / np.linalg.norm(up)
    inverse = np.linalg.inv(linear)
    step = FINE_STEPS[(grid, factor)]
    offsets = [(0.0, 0.0)] * include_original + list(OFFSETS[(grid, factor)])
    first_index = 0 if include_original else 1
    n = len(coords)
    candidates_xy, candidates_grid, parent, offset_index = [], [], [], []
    for k, (distance, angle) in enumerate(offsets):
        shift = distance * r_px * (math.cos(angle) * along + math.sin(angle) * up)  # pixels (x, y)
        candidates_xy.append(coords + shift)
        candidates_grid.append(positions + inverse @ shift)  # fractional (col, row)
        parent.append(np.arange(n))
        offset_index.append(np.full(n, k + first_index))
    # parent-major order: all new spots of the first parent, then of the second, ...
    xy = np.stack(candidates_xy, axis=1).reshape(-1, 2)
    fractional = np.stack(candidates_grid, axis=1).reshape(-1, 2)
    parent = np.stack(parent, axis=1).ravel()
    offset_index = np.stack(offset_index, axis=1).ravel()
    scaled = fractional * step
    fine = np.rint(scaled).astype(np.int64)
    off_grid = float(np.abs(scaled - fine).max()) if len(fine) else 0.0
    if off_grid > 0.25:
        logger.warning(
            "new spots lie up to %.2f steps off the declared grid: the array coordinates do not follow a regular "
            "%s grid; their array_row/array_col are rounded (positions in obsm['spatial'] are exact).",
            off_grid,
            grid,
        )
    n_candidates = len(fine)
    _, first, inverse_index = np.unique(fine, axis=0, return_index=True, return_inverse=True)
    inverse_index = inverse_index.ravel()
    keep = np.sort(first)
    # Merged spots sit at the mean of their candidates (identical on a regular grid).
    sums = np.zeros((len(first), 2))
    np.add.at(sums, inverse_index, xy)
    mean_xy = sums / np.bincount(inverse_index)[:, None]
    xy = mean_xy[inverse_index[keep]]
    fine, parent, offset_index = fine[keep], parent[keep], offset_index[keep]
    n_duplicates = n_candidates - len(keep)
    height, width = image_shape
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    n_outside = int((~inside).sum())
    xy, fine, parent, offset_index = xy[inside], fine[inside], parent[inside], offset_index[inside]
    fine = fine - fine.min(axis=0) if len(fine) else fine
    if grid == "hex" and len(fine) and (fine[0].sum() % 2):  # keep the Visium parity rule
        fine[:, 0] += 1
    return {
        "coords": xy,
        "fine": fine,
        "grid": grid,
        "parent_index": parent,
        "parent_name": np.asarray(names)[parent],
        "parent_position": positions[parent],
        "offset_index": offset_index,
        "names": np.array([f"{names[p]}_sr{k}" for p, k in zip(parent, offset_index, strict=True)], dtype=object),
        "n_candidates": int(n_candidates),
        "n_duplicates": int(n_duplicates),
        "n_outside": n_outside,
        "off_grid": off_grid,
    }


def _patch_clipped(facing, fitted) -> np.ndarray:
    """Per spot of ``facing``: True where the patch the model read reaches past the image border.

    Pixel methods read :attr:`~sthisto.models.ExpressionModel.patch_spec`; feature methods
    read what :func:`sthisto.pp.embed` recorded when it embedded these very spots.
    """
    from ..pp._patches import PatchDataset, PatchSpec

    if fitted.input_kind == "features":
        data = fitted.data_params
        key = data.get("features_key") or f"X_{data.get('encoder')}"
        made = facing.uns.get(Uns.STHISTO, {}).get("embed", {}).get(key)
        if made is None:
            raise InputError(
                f"the new spots' features in obsm[{key!r}] carry no sthisto.pp.embed record, so which pixels they "
                f"came from is unknown. Train the model with encoder='<name>' so new spots are embedded here."
            )
        spec = PatchSpec(size_px=int(made["patch_size_px"]), size_um=float(made["patch_size_um"]))
        image_key = None if str(made["image_key"]) == Images.FULLRES else str(made["image_key"])
    else:
        spec, image_key = fitted.patch_spec, fitted.data_params.get("image_key")
    return PatchDataset(facing, spec=spec, image_key=image_key).clipped


def _prepare_model(adata, fitted, libraries, coords, libraries_of_spot):
    """Temporarily give the model what new spots need; returns a function undoing it.

    - HisToSGE-style coordinate frames: libraries the model was not trained on get the frame
      of their *measured* spots, so new spots are scaled like them (not like themselves).
    - Feature-based models: the new spots are embedded by the encoder the training features
      came from, with exactly its weights — the model's recorded feature provenance, else the
      :func:`sthisto.pp.embed` record of its ``obsm`` key. A hub id stays a hub id (pinned to
      the recorded revision), a weights file must still exist with the same SHA-256, a
      random encoder is rebuilt from its seed; anything else is a clear error.
    """
    saved_extra = dict(fitted.extra)
    saved_data = dict(fitted.data_params)
    frames = fitted.extra.get("frames")
    if frames is not None:
        from ..models.histosge import coordinate_frame

        missing = [lib for lib in libraries if lib not in frames]
        if missing:
            rows = np.isin(libraries_of_spot, missing)
            fitted.extra = {
                **fitted.extra,
                "frames": {**frames, **coordinate_frame(coords[rows], libraries_of_spot[rows])},
            }
    if fitted.input_kind == "features":
        key = fitted.data_params.get("features_key")
        features = (fitted.provenance or {}).get("features")
        if not features or features.get("weights", {}).get("source") == "unknown":
            from ..pp._embed import features_provenance

            features = features_provenance(adata, key)
        known = features.get("weights", {}).get("source") != "unknown" and isinstance(features.get("encoder"), str)
        if known:
            from ..models._features import training_encoder

            encoder, weights, encoder_kwargs = training_encoder(features, key)
            fitted.data_params["encoder"] = encoder
            fitted.data_params["encoder_weights"] = weights
            fitted.data_params["encoder_kwargs"] = {
                **(fitted.data_params.get("encoder_kwargs") or {}),
                **encoder_kwargs,
            }
            if features.get("patch_size_um") is not None:
                fitted.data_params["patch_size_um"] = float(features["patch_size_um"])
            image_key = features.get("image_key")
            fitted.data_params["image_key"] = None if image_key in (None, Images.FULLRES) else str(image_key)
        elif not isinstance(fitted.data_params.get("encoder"), str):
            raise MissingKeyError(
                f"the model reads features from obsm[{key!r}] but records no encoder, and adata has no "
                f"sthisto.pp.embed record for that key: the new spots cannot be embedded. Train with encoder='<name>' "
                f"(features are then computed for new spots automatically)."
            )

    def restore() -> None:
        fitted.extra = saved_extra
        fitted.data_params = saved_data

    return restore
