"""``sthisto.pp.tile``: pseudo-spots over the tissue of a slide, and the pseudo-spot builder.

A whole slide without spatial transcriptomics gets a regular grid of pseudo-spots — square
(legacy ST) or hexagonal in the Visium convention — restricted to the tissue. The result is a
new image-only AnnData in the usual convention (integer ``array_row``/``array_col``,
``obsm['spatial']`` in full-resolution pixels, ``uns['spatial']`` sharing the slide's images),
so every method — per-spot, graph or position based — predicts on it as on measured spots.

:func:`pseudo_spot_adata` builds such objects; :func:`sthisto.tl.superresolve` uses it too.
"""

from __future__ import annotations

import copy as copy_module
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import check_record_writable, record
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._deprecate import renamed_parameters
from .._errors import InputError, MissingKeyError
from .._images import library_spatial, microns_per_pixel
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

FUNCTION = "tile"
GRIDS = ("square", "hex")
_SAMPLES = 9
"""Footprint samples per side: tissue fractions average the mask at ~60 points of each disc."""
_BAND_SPOTS = 200_000
"""Grid positions processed at once (bounds temporaries on slides with millions of positions)."""


@renamed_parameters(copy="copy_images")
@checked_input
def tile(
    adata: AnnData,
    *,
    spacing_um: float = 100.0,
    diameter_um: float | None = 55.0,
    grid: str = "hex",
    tissue_only: bool = True,
    min_tissue_fraction: float = 0.5,
    mask_key: str = Images.TISSUE_MASK,
    library_id: str | None = None,
    key_added: str = FUNCTION,
    as_spatialdata: bool = False,
    overwrite: bool = False,
    copy_images: bool = False,
) -> AnnData | SpatialData:
    """Place pseudo-spots on a regular grid over each slide's tissue.

    To predict with a trained model, tile with the grid the model was trained on (Visium:
    ``spacing_um=100, diameter_um=55, grid="hex"``; legacy ST / her2st: ``200, 100,
    "square"``): graph and position-based methods read the integer grid coordinates.

    Parameters
    ----------
    adata
        AnnData with images in ``uns['spatial']`` (e.g. :func:`sthisto.io.read_image`); its
        spots, if any, are ignored.
    spacing_um
        Centre-to-centre distance of neighbouring pseudo-spots, in µm.
    diameter_um
        Spot diameter in µm (``spot_diameter_fullres``, and the footprint whose tissue
        fraction is measured); default ``None``: ``0.55 × spacing_um`` (Visium's ratio).
    grid
        ``"hex"``: hexagonal grid in the Visium convention (rows ``spacing·√3/2`` apart,
        ``array_col`` counts half spacings, odd rows shifted: ``array_row + array_col`` even);
        ``"square"``: square grid, one grid unit per spacing.
    tissue_only
        Keep pseudo-spots whose footprint is at least ``min_tissue_fraction`` tissue according
        to ``images[mask_key]`` (computed now with :func:`sthisto.pp.tissue_mask`'s defaults,
        without being stored, if the slide has no mask).
    min_tissue_fraction
        Share of the footprint that must lie on tissue, in [0, 1].
    mask_key
        Image key of the tissue mask.
    library_id
        Slide to tile; default: every library with an image.
    key_added
        Name of the record ``uns['sthisto']['tile'][key_added]`` in the result.
    as_spatialdata
        Return a :class:`spatialdata.SpatialData` (image, circles, table) made by
        :func:`sthisto.io.to_spatialdata` instead of the AnnData.
    overwrite
        The result carries the slide's ``uns['sthisto']`` records (reading, tissue mask, stored
        models); replace a carried ``tile`` record named ``key_added`` (from tiling earlier
        pseudo-spots) instead of refusing.
    copy_images
        ``False`` (default): the result shares the slide's images by reference (no pixel is
        copied; lazy images stay lazy). ``True``: it holds its own deep copy of
        ``uns['spatial']``. (Formerly ``copy=``, deprecated: ``tile`` returns a new object by
        design, so it has no ``copy``.)

    Returns
    -------
    A **new** AnnData by design, with 0 genes and one observation per pseudo-spot; the input
    is never modified (pseudo-spots cannot be added to it in place):

    ``obs``
        ``library_id`` (categorical), ``array_row`` / ``array_col`` (int64, from 0),
        ``spot_id`` (``"<array_col>x<array_row>"``) and ``tissue_fraction`` (float).
        ``obs_names``: ``"<library_id>_<spot_id>"``.
    ``obsm['spatial']``
        Centres (x, y) in full-resolution pixels, all inside the image.
    ``uns['spatial'][library_id]``
        The slide's images; scalefactors with ``spot_diameter_fullres``, ``spot_spacing_um``
        of the new grid (other factors as the slide's); metadata with ``pseudo_spots='tile'``.
    ``uns['sthisto']``
        The slide's records (e.g. ``read_image``, ``tissue_mask``, stored ``models``, so that
        ``tl.predict(spots, "<stored key>")`` finds a model stored with the slide), plus
        ``['tile'][key_added]``: parameters and per library the number of grid positions and
        pseudo-spots.

    Examples
    --------
    >>> slide = sthisto.io.read_image("slide.tif")
    >>> spots = sthisto.pp.tile(slide, spacing_um=100, diameter_um=55, grid="hex")
    >>> predicted = sthisto.tl.predict(spots, "trained_model_folder", copy=True)
    """
    from ._tissue import compute_mask, image_libraries, low_resolution_image

    spacing_um = _positive("spacing_um", spacing_um)
    diameter_um = 0.55 * spacing_um if diameter_um is None else _positive("diameter_um", diameter_um)
    if grid not in GRIDS:
        raise InputError(f"grid={grid!r} is not known; use 'hex' (Visium) or 'square' (legacy ST).")
    if isinstance(min_tissue_fraction, bool) or not (
        isinstance(min_tissue_fraction, (int, float, np.number)) and 0.0 <= min_tissue_fraction <= 1.0
    ):
        raise InputError(f"min_tissue_fraction={min_tissue_fraction!r} must be a number in [0, 1].")
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added={key_added!r} must be a non-empty string.")
    libraries = image_libraries(adata, library_id)
    check_record_writable(adata, FUNCTION, key_added, overwrite=overwrite)

    coords, rows, cols, fractions, names, library_of = [], [], [], [], [], []
    per_library = {}
    for library in libraries:
        mpp = microns_per_pixel(adata, library)
        height, width = full_resolution_shape(adata, library)
        spacing_px = spacing_um / mpp
        mask, mask_scale = None, None
        if tissue_only:
            entry = library_spatial(adata, library)
            if mask_key in entry.get(Uns.IMAGES, {}):
                mask = np.asarray(entry[Uns.IMAGES][mask_key], dtype=bool)
                mask_scale = entry.get(Uns.SCALEFACTORS, {}).get(ScaleFactors.for_image(mask_key))
                if mask.ndim != 2 or mask_scale is None:
                    raise InputError(
                        f"uns['spatial'][{library!r}]['images'][{mask_key!r}] is not a 2-D mask with a scale factor "
                        f"{ScaleFactors.for_image(mask_key)!r}; recompute it with sthisto.pp.tissue_mask."
                    )
            else:
                image, mask_scale, used = low_resolution_image(adata, library, None)
                mask, _, factor = compute_mask(image, microns_per_pixel=mpp / mask_scale)
                mask_scale = mask_scale / factor
                logger.info("library %r has no images[%r]: detected tissue on the %s image", library, mask_key, used)
            if not mask.any():
                raise InputError(
                    f"no tissue found on library {library!r} (images[{mask_key!r}] is empty): nothing to tile. Check "
                    f"that the image shows stained tissue; recompute the mask with sthisto.pp.tissue_mask(adata, "
                    f"method='od', overwrite=True), or pass tissue_only=False to tile the whole image."
                )
        grid_rows, grid_cols, centres = lattice(height, width, spacing_px, grid)
        n_positions = len(centres)
        fraction = np.ones(n_positions, dtype=np.float32)
        if tissue_only:
            radius_px = diameter_um / mpp / 2
            fraction = footprint_fraction(mask, float(mask_scale), centres, radius_px)
            keep = fraction >= min_tissue_fraction
            if not keep.any():
                raise InputError(
                    f"no grid position of library {library!r} has {min_tissue_fraction:.0%} of its footprint on "
                    f"tissue (the tissue is smaller than one {diameter_um:g} µm spot?). Lower min_tissue_fraction "
                    f"or spacing_um."
                )
            grid_rows, grid_cols, centres, fraction = grid_rows[keep], grid_cols[keep], centres[keep], fraction[keep]
        # Grid coordinates from 0 on the kept spots (the Visium parity rule survives even shifts).
        row0 = int(grid_rows.min())
        col0 = int(grid_cols.min())
        if grid == "hex" and (row0 + col0) % 2:
            col0 -= 1
        grid_rows, grid_cols = grid_rows - row0, grid_cols - col0
        coords.append(centres)
        rows.append(grid_rows)
        cols.append(grid_cols)
        fractions.append(fraction)
        names.append([f"{library}_{c}x{r}" for r, c in zip(grid_rows, grid_cols, strict=True)])
        library_of.append(np.full(len(centres), library, dtype=object))
        per_library[library] = {
            "n_grid_positions": int(n_positions),
            "n_spots": int(len(centres)),
            "spacing_px": float(spacing_px),
            "image_shape": [int(height), int(width)],
        }
        logger.info(
            "library %r: %d pseudo-spots (of %d grid positions) every %g µm",
            library,
            len(centres),
            n_positions,
            spacing_um,
        )

    array_row = np.concatenate(rows).astype(np.int64)
    array_col = np.concatenate(cols).astype(np.int64)
    scalefactors = {
        lib: {
            ScaleFactors.SPOT_DIAMETER: diameter_um / microns_per_pixel(adata, lib),
            ScaleFactors.SPOT_SPACING_UM: spacing_um,
        }
        for lib in libraries
    }
    result = pseudo_spot_adata(
        adata,
        libraries=np.concatenate(library_of),
        coords=np.concatenate(coords),
        array_row=array_row,
        array_col=array_col,
        obs_names=[n for part in names for n in part],
        obs_columns={
            Obs.SPOT_ID: [f"{c}x{r}" for r, c in zip(array_row, array_col, strict=True)],
            Obs.TISSUE_FRACTION: np.concatenate(fractions).astype(np.float32),
        },
        scalefactors=scalefactors,
        kind=FUNCTION,
        library_order=libraries,
        copy=copy_images,
    )
    result.uns[Uns.STHISTO] = copy_module.deepcopy(dict(adata.uns.get(Uns.STHISTO, {})))
    record(
        result,
        FUNCTION,
        key_added,
        {
            "spacing_um": spacing_um,
            "diameter_um": diameter_um,
            "grid": grid,
            "tissue_only": bool(tissue_only),
            "min_tissue_fraction": float(min_tissue_fraction),
            "mask_key": mask_key,
            "libraries": per_library,
        },
        overwrite=overwrite,
    )
    if as_spatialdata:
        from ..io._spatialdata import to_spatialdata

        return to_spatialdata(result)
    return result


def _positive(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not (math.isfinite(value) and value > 0)
    ):
        raise InputError(f"{name}={value!r} must be a positive number of µm.")
    return float(value)


def full_resolution_shape(adata, library: str) -> tuple[int, int]:
    """(height, width) of a library's full-resolution image, from an array or the file header."""
    from .._images import image_size

    entry = library_spatial(adata, library)
    images = entry.get(Uns.IMAGES, {})
    metadata = entry.get(Uns.METADATA, {})
    if Images.FULLRES in images:
        shape = images[Images.FULLRES].shape
        return int(shape[0]), int(shape[1])
    if Metadata.PYRAMID_LEVELS in metadata:
        height, width = np.asarray(metadata[Metadata.PYRAMID_LEVELS])[0]
        return int(height), int(width)
    if Metadata.IMAGE_PATH in metadata:
        from pathlib import Path

        path = Path(metadata[Metadata.IMAGE_PATH])
        if not path.exists():
            raise MissingKeyError(
                f"image file {str(path)!r} of library {library!r} does not exist; update "
                f"uns['spatial'][{library!r}]['metadata']['image_path']."
            )
        return image_size(path)
    raise MissingKeyError(
        f"library {library!r} has no full-resolution image (images['fullres'] or metadata['image_path']); "
        f"pseudo-spots are placed in full-resolution pixels."
    )


def lattice(height: int, width: int, spacing_px: float, grid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid rows, columns and centres (x, y) of a lattice covering a ``height × width`` image.

    The lattice is centred on the image; every centre lies inside it. Hexagonal lattices use
    the Visium convention (column unit = half a spacing, ``row + col`` even).
    """
    if grid == "hex":
        row_step, col_step = spacing_px * math.sqrt(3) / 2, spacing_px / 2
    else:
        row_step, col_step = spacing_px, spacing_px
    n_rows = max(1, int(math.floor((height - 1) / row_step)) + 1)
    n_cols = max(1, int(math.floor((width - 1) / col_step)) + 1)
    if n_rows * n_cols > 20_000_000:
        raise InputError(
            f"a {spacing_px:.3g} px grid over a {height} × {width} px image has {n_rows * n_cols:,} positions; "
            f"raise spacing_um."
        )
    y0 = (height - 1 - (n_rows - 1) * row_step) / 2
    x0 = (width - 1 - (n_cols - 1) * col_step) / 2
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if grid == "hex":
        keep = (rows + cols) % 2 == 0
        rows, cols = rows[keep], cols[keep]
    centres = np.column_stack([x0 + cols * col_step, y0 + rows * row_step])
    return rows.astype(np.int64), cols.astype(np.int64), centres


def footprint_fraction(mask: np.ndarray, mask_scale: float, centres: np.ndarray, radius_px: float) -> np.ndarray:
    """Share of each disc (centre in full-resolution px, radius ``radius_px``) on the mask.

    The disc is sampled at points of a regular grid inside it; each sample reads the mask
    pixel it falls in (outside the mask image counts as background).
    """
    offsets = (np.arange(_SAMPLES) + 0.5) / _SAMPLES * 2 - 1
    dx, dy = np.meshgrid(offsets, offsets)
    inside = dx**2 + dy**2 <= 1
    dx, dy = dx[inside] * radius_px, dy[inside] * radius_px
    height, width = mask.shape
    out = np.empty(len(centres), dtype=np.float32)
    for start in range(0, len(centres), _BAND_SPOTS):
        part = centres[start : start + _BAND_SPOTS]
        x = np.floor((part[:, :1] + dx[None, :]) * mask_scale).astype(np.int64)
        y = np.floor((part[:, 1:2] + dy[None, :]) * mask_scale).astype(np.int64)
        valid = (x >= 0) & (y >= 0) & (x < width) & (y < height)
        hits = np.zeros(x.shape, dtype=bool)
        hits[valid] = mask[y[valid], x[valid]]
        out[start : start + len(part)] = hits.mean(axis=1)
    return out


def pseudo_spot_adata(
    source,
    *,
    libraries,
    coords: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    obs_names,
    obs_columns: Mapping[str, object] | None = None,
    scalefactors: Mapping[str, Mapping[str, float]] | None = None,
    kind: str,
    library_order=None,
    copy: bool = False,
):
    """Build an image-only AnnData of spots placed by sthisto on ``source``'s images.

    Parameters
    ----------
    source
        AnnData whose ``uns['spatial']`` holds the libraries' images.
    libraries
        Library of each new spot.
    coords
        ``(n, 2)`` centres (x, y) in full-resolution pixels.
    array_row, array_col
        Integer grid coordinates.
    obs_names
        Unique names.
    obs_columns
        Further ``obs`` columns.
    scalefactors
        Per library, scale factors replacing the source's (e.g. the new grid's spacing).
    kind
        ``metadata['pseudo_spots']`` value (``"tile"``, ``"superresolve"``).
    library_order
        Category order of ``obs['library_id']`` (default: order of appearance).
    copy
        Deep-copy the source's ``uns['spatial']`` entries instead of sharing images by reference.

    Returns
    -------
    AnnData with 0 genes, ``obs`` (``library_id``, ``array_row``, ``array_col``, extras),
    ``obsm['spatial']`` and ``uns['spatial']`` for the libraries present.
    """
    import anndata as ad

    libraries = np.asarray(libraries, dtype=object).astype(str)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    order = list(dict.fromkeys(library_order if library_order is not None else libraries))
    obs = pd.DataFrame(
        {
            Obs.LIBRARY_ID: pd.Categorical(libraries, categories=order),
            Obs.ARRAY_ROW: np.asarray(array_row, dtype=np.int64),
            Obs.ARRAY_COL: np.asarray(array_col, dtype=np.int64),
        },
        index=pd.Index([str(n) for n in obs_names]),
    )
    if not obs.index.is_unique:
        raise InputError("pseudo-spot names are not unique; this is a bug in the caller.")
    for key, values in (obs_columns or {}).items():
        obs[key] = np.asarray(values) if not isinstance(values, pd.Categorical) else values
    spatial = {}
    for library in order:
        entry = library_spatial(source, library)
        new_entry = {
            Uns.IMAGES: dict(entry.get(Uns.IMAGES, {})),
            Uns.SCALEFACTORS: {**dict(entry.get(Uns.SCALEFACTORS, {})), **dict((scalefactors or {}).get(library, {}))},
            Uns.METADATA: {**dict(entry.get(Uns.METADATA, {})), Metadata.PSEUDO_SPOTS: kind},
        }
        spatial[library] = copy_module.deepcopy(new_entry) if copy else new_entry
    result = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    result.obsm[Obsm.SPATIAL] = coords
    result.uns[Uns.SPATIAL] = spatial
    return result
