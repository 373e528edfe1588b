"""``sthisto.pp.pool``: high-resolution measurements summed into spot-sized pseudo-spots.

Visium HD bins (2/8/16 µm) and Xenium transcripts are far smaller than the spots the methods
were designed for. Pooling places a lattice (hexagonal in the Visium convention, or square)
over the measurements and adds up everything whose centre falls inside each footprint, so the
result is an ordinary spot AnnData — counts, ``array_row``/``array_col``, spot centres in
image pixels, the section's images — that every method trains on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import record
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._deprecate import renamed_parameters
from .._errors import InputError, MissingKeyError
from .._images import library_spatial
from .._images import microns_per_pixel as library_mpp
from .._logging import logger
from ._tile import GRIDS, lattice, pseudo_spot_adata

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import ArrayLike
    from spatialdata import SpatialData

FUNCTION = "pool"
VISIUM_PITCH_PER_DIAMETER = 100.0 / 55.0
"""Visium's spots are 55 µm across at a 100 µm pitch; hexagonal pools keep that ratio by default."""
UNITS = ("um", "px")


@renamed_parameters(copy="copy_images")
def pool(
    data: AnnData | pd.DataFrame | SpatialData,
    *,
    size_um: float = 55.0,
    spacing_um: float | None = None,
    grid: str = "hex",
    bin_um: float | None = None,
    min_bins: int = 1,
    library_id: str = "transcripts",
    x_key: str = "x_location",
    y_key: str = "y_location",
    gene_key: str = "feature_name",
    units: str = "um",
    microns_per_pixel: float | None = None,
    image: ArrayLike | None = None,
    points_key: str | None = None,
    table_key: str | None = None,
    key_added: str = FUNCTION,
    overwrite: bool = False,
    copy_images: bool = False,
) -> AnnData:
    """Sum bins or transcripts into pseudo-spots on a hexagonal or square lattice.

    Every bin (by its centre) or transcript lies in at most one footprint and adds its counts
    to that pseudo-spot only; measurements between footprints are dropped, as between Visium
    spots.

    Parameters
    ----------
    data
        Either an AnnData of bins (e.g. :func:`sthisto.io.read_visium` on a Visium HD
        ``square_008um`` folder, or :func:`sthisto.datasets.synthetic_bins`), with
        ``obs['library_id']``, ``obsm['spatial']`` in pixels and ``microns_per_pixel``; or a
        DataFrame of transcripts, one row per molecule (Xenium ``transcripts.parquet``), with
        columns ``x_key``, ``y_key``, ``gene_key``; or a SpatialData object (e.g. from
        ``spatialdata_io.xenium``), whose transcripts (``points_key``) or bin table
        (``table_key``) are pooled as above: the points' ``x``, ``y`` (or ``x_key``, ``y_key``)
        as stored in the element, without applying its coordinate transformations.
    size_um
        Footprint: disc diameter (``grid="hex"``) or square side (``grid="square"``), in µm.
        Visium: 55; legacy ST: 100.
    spacing_um
        Lattice pitch in µm; default ``size_um × 100/55`` for ``"hex"`` (Visium's geometry) and
        ``size_um`` for ``"square"`` (contiguous squares). Must be at least ``size_um``, so
        footprints do not overlap.
    grid
        ``"hex"`` (Visium convention: ``array_col`` counts half pitches, ``array_row +
        array_col`` even) or ``"square"``.
    bin_um
        AnnData input: bin side in µm, used for ``area_covered``; default the library's
        ``spot_spacing_um`` (what :func:`sthisto.io.read_visium` records for HD bins).
    min_bins
        Keep pseudo-spots holding at least this many bins (transcripts).
    library_id
        DataFrame input: the section's name.
    x_key, y_key, gene_key
        DataFrame input: column names (Xenium's by default; HEST's aligned transcripts:
        ``"he_x"``, ``"he_y"`` with ``units="px"``).
    units
        DataFrame input: ``"um"`` (Xenium) or ``"px"`` (pixels of ``image``).
    microns_per_pixel
        DataFrame input: µm per pixel of the frame ``obsm['spatial']`` is written in (that of
        ``image``); default 1.0 (pixels are µm) without an image. Required with ``units="px"``.
    image
        DataFrame input: the registered H&E, an ``(height, width, 3)`` array or a file path,
        attached to the result so methods can cut patches.
    points_key
        SpatialData input: the points element holding the transcripts (default: the only one).
    table_key
        SpatialData input: pool this table of bins instead (read with
        :func:`sthisto.io.from_spatialdata`).
    key_added
        Name of the record ``uns['sthisto']['pool'][key_added]``.
    overwrite
        Replace a ``pool`` record named ``key_added`` carried over from the input.
    copy_images
        ``False``: the result shares the input's images by reference; ``True``: it holds its own
        deep copy of ``uns['spatial']``. (Formerly ``copy=``, deprecated: ``pool`` returns a new
        object by design, so it has no ``copy``.)

    Returns
    -------
    A **new** AnnData by design, one observation per pseudo-spot (the input is never
    modified):

    ``X``
        Summed counts (CSR float32); ``var`` as the input's (DataFrame input: one gene per
        category of ``gene_key``, in category order).
    ``obs``
        ``library_id``, ``array_row`` / ``array_col``, ``spot_id`` (``<col>x<row>``),
        ``n_bins`` (bins or transcripts summed) and ``area_covered`` (bins' area inside the
        footprint over the footprint's area; NaN for transcripts); ``patient`` carried over.
    ``obsm['spatial']``
        Pseudo-spot centres (x, y) in pixels of the section's image.
    ``uns['spatial'][library_id]``
        The input's images; scale factors with ``spot_diameter_fullres`` and
        ``spot_spacing_um`` of the pseudo-spots; metadata ``pseudo_spots='pool'``.
    ``uns['sthisto']['pool'][key_added]``
        Parameters and, per library, the numbers of inputs, inputs pooled and pseudo-spots.

    Examples
    --------
    >>> bins = sthisto.io.read_visium("outs", bin_size=8)
    >>> spots = sthisto.pp.pool(bins, size_um=55, grid="hex")
    >>> sthisto.tl.train(spots, "ridge", genes=spots.var_names[:50])
    """
    if grid not in GRIDS:
        raise InputError(f"grid={grid!r} is not known; use 'hex' (Visium) or 'square' (legacy ST).")
    size_um = _positive("size_um", size_um)
    if spacing_um is None:
        spacing_um = size_um * VISIUM_PITCH_PER_DIAMETER if grid == "hex" else size_um
    spacing_um = _positive("spacing_um", spacing_um)
    if spacing_um < size_um * (1 - 1e-9):
        raise InputError(
            f"spacing_um={spacing_um:g} is smaller than size_um={size_um:g}: footprints would overlap and a bin "
            f"would count twice. Use spacing_um >= size_um."
        )
    if isinstance(min_bins, bool) or not isinstance(min_bins, (int, np.integer)) or min_bins < 1:
        raise InputError(f"min_bins={min_bins!r} must be a positive integer.")
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added={key_added!r} must be a non-empty string.")
    if type(data).__name__ == "SpatialData":
        data = _from_spatialdata(data, points_key=points_key, table_key=table_key)
        if isinstance(data, pd.DataFrame):  # SpatialData points name their coordinates x, y
            x_key = x_key if x_key in data.columns else "x"
            y_key = y_key if y_key in data.columns else "y"
    elif points_key is not None or table_key is not None:
        raise InputError(f"points_key / table_key apply to SpatialData input only; pool got {type(data).__name__}.")
    if isinstance(data, pd.DataFrame):
        source, items = _transcripts_source(data, library_id, x_key, y_key, gene_key, units, microns_per_pixel, image)
    elif hasattr(data, "obsm") and hasattr(data, "uns"):
        source, items = data, None
    else:
        raise InputError(
            f"pool takes an AnnData of bins or a pandas DataFrame of transcripts, not {type(data).__name__}."
        )
    existing = source.uns.get(Uns.STHISTO, {}).get(FUNCTION, {})
    if key_added in existing and not overwrite:
        raise InputError(
            f"the input already carries uns['sthisto']['pool'][{key_added!r}]. Pass overwrite=True to replace it "
            f"in the result, or key_added='<new name>'."
        )

    if items is None:
        from ._patches import library_ids, spot_coordinates

        coords = spot_coordinates(source)
        libraries = library_ids(source)
        counts = _csr(source.X)
        genes = source.var.copy()
        column = source.obs[Obs.LIBRARY_ID]
        order = [str(c) for c in column.cat.categories] if hasattr(column, "cat") else list(dict.fromkeys(libraries))
    else:
        coords, gene_codes, genes = items
        libraries = np.full(len(coords), library_id, dtype=object)
        counts = None
        order = [library_id]

    import scipy.sparse as sp

    blocks, centres_all, rows_all, cols_all, names_all, libs_all = [], [], [], [], [], []
    n_inputs, n_pooled, covered_all, patients = [], [], [], []
    per_library, scalefactors = {}, {}
    for library in order:
        members = np.flatnonzero(libraries == library)
        if len(members) == 0:
            continue
        mpp = library_mpp(source, library)
        if items is None:
            bin_side = (
                bin_um
                if bin_um is not None
                else library_spatial(source, library)[Uns.SCALEFACTORS].get(ScaleFactors.SPOT_SPACING_UM)
            )
            if bin_side is None:
                raise MissingKeyError(
                    f"library {library!r} records no bin size (scalefactors['spot_spacing_um']); pass bin_um=."
                )
            bin_side = _positive("bin_um", bin_side)
            if bin_side > size_um / 2:
                raise InputError(
                    f"library {library!r}: bins of {bin_side:g} µm are too coarse to pool into {size_um:g} µm "
                    f"footprints; pool 2 or 8 µm bins, or raise size_um."
                )
        spot, grid_rows, grid_cols, centres = _assign(
            coords[members], size_um / mpp, spacing_um / mpp, grid, _image_shape(source, library)
        )
        inside = spot >= 0
        n_in_spot = np.bincount(spot[inside], minlength=len(centres))
        keep = n_in_spot >= min_bins
        new_index = np.full(len(centres), -1, dtype=np.int64)
        new_index[keep] = np.arange(int(keep.sum()))
        target = new_index[spot[inside]]
        used = target >= 0
        source_rows = members[inside][used]
        if items is None:
            assign = sp.csr_matrix(
                (np.ones(len(source_rows), np.float32), (target[used], source_rows)),
                shape=(int(keep.sum()), counts.shape[0]),
            )
            block = assign @ counts
            area = (math.pi * size_um**2 / 4) if grid == "hex" else size_um**2
            covered = n_in_spot[keep] * bin_side**2 / area
        else:
            block = sp.csr_matrix(
                (np.ones(len(source_rows), np.float32), (target[used], gene_codes[source_rows])),
                shape=(int(keep.sum()), len(genes)),
            )
            covered = np.full(int(keep.sum()), np.nan)
        block.sum_duplicates()
        blocks.append(sp.csr_matrix(block, dtype=np.float32))
        centres_all.append(centres[keep])
        rows_all.append(grid_rows[keep])
        cols_all.append(grid_cols[keep])
        names_all += [f"{library}_{c}x{r}" for r, c in zip(grid_rows[keep], grid_cols[keep], strict=True)]
        libs_all.append(np.full(int(keep.sum()), library, dtype=object))
        n_pooled.append(n_in_spot[keep])
        covered_all.append(covered)
        if items is None and Obs.PATIENT in source.obs:
            patients.append(np.full(int(keep.sum()), str(source.obs[Obs.PATIENT].iloc[members[0]]), dtype=object))
        scalefactors[library] = {ScaleFactors.SPOT_DIAMETER: size_um / mpp, ScaleFactors.SPOT_SPACING_UM: spacing_um}
        per_library[library] = {
            "n_inputs": int(len(members)),
            "n_pooled": int(n_in_spot[keep].sum()),
            "n_spots": int(keep.sum()),
            **({"bin_um": float(bin_side)} if items is None else {}),
        }
        n_inputs.append(len(members))
        logger.info(
            "pooled %d of %d %s of library %r into %d pseudo-spots",
            per_library[library]["n_pooled"],
            len(members),
            "bins" if items is None else "transcripts",
            library,
            int(keep.sum()),
        )
    if not names_all:
        raise InputError("no pseudo-spot holds min_bins measurements; lower min_bins or check the coordinates.")
    n_pooled = np.concatenate(n_pooled)
    obs_columns = {
        Obs.SPOT_ID: np.asarray([n.rsplit("_", 1)[1] for n in names_all], dtype=object),
        Obs.N_BINS: n_pooled.astype(np.int64),
        Obs.AREA_COVERED: np.concatenate(covered_all).astype(np.float64),
    }
    if patients:
        obs_columns[Obs.PATIENT] = pd.Categorical(np.concatenate(patients))
    skeleton = pseudo_spot_adata(
        source,
        libraries=np.concatenate(libs_all),
        coords=np.concatenate(centres_all),
        array_row=np.concatenate(rows_all),
        array_col=np.concatenate(cols_all),
        obs_names=names_all,
        obs_columns=obs_columns,
        scalefactors=scalefactors,
        kind=FUNCTION,
        library_order=[lib for lib in order if lib in per_library],
        copy=copy_images,
    )
    import anndata as ad

    result = ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=skeleton.obs, var=genes)
    result.obsm[Obsm.SPATIAL] = skeleton.obsm[Obsm.SPATIAL]
    result.uns[Uns.SPATIAL] = skeleton.uns[Uns.SPATIAL]
    if Uns.STHISTO in source.uns:
        result.uns[Uns.STHISTO] = {k: v for k, v in source.uns[Uns.STHISTO].items() if k != Uns.MODELS}
    record(
        result,
        FUNCTION,
        key_added,
        {
            "size_um": size_um,
            "spacing_um": spacing_um,
            "grid": grid,
            "min_bins": int(min_bins),
            "input": "bins" if items is None else "transcripts",
            "libraries": per_library,
        },
        overwrite=True,
    )
    return result


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}={value!r} must be a positive number of µm.")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name}={value!r} must be positive and finite (µm).")
    return float(value)


def _csr(matrix):
    import scipy.sparse as sp

    return sp.csr_matrix(matrix, dtype=np.float32)


def _image_shape(source, library: str) -> tuple[int, int] | None:
    """(height, width) of the library's full-resolution image, or None without one."""
    from .._images import has_image
    from ._tile import full_resolution_shape

    if not has_image(source, library):
        return None
    try:
        return full_resolution_shape(source, library)
    except MissingKeyError:
        return None


def _assign(points: np.ndarray, size_px: float, spacing_px: float, grid: str, image_shape):
    """Footprint of each point (-1: none) on a lattice over the points' bounding box.

    With an image, the lattice is kept inside it, so every pseudo-spot can have a patch.
    Returns the index of each point's pseudo-spot, and the lattice's rows, columns and
    centres (x, y) in the points' frame.
    """
    from scipy.spatial import cKDTree

    low = np.floor(points.min(axis=0))
    high = np.ceil(points.max(axis=0))
    if image_shape is not None:
        height, width = image_shape
        low = np.clip(low, 0, None)
        high = np.minimum(high, (width - 1, height - 1))
        if (high < low).any():
            raise InputError(
                "no bin or transcript lies on the section's image: the coordinates are not in the image's "
                "pixel frame. Check microns_per_pixel / units, or the registration."
            )
    width, height = (high - low + 1).astype(int)
    rows, cols, centres = lattice(int(height), int(width), spacing_px, grid)
    centres = centres + low
    # The nearest lattice centre is the only footprint that can hold a point, since footprints
    # do not overlap (spacing >= size); then the point must lie inside that footprint.
    _, nearest = cKDTree(centres).query(points, k=1)
    offset = points - centres[nearest]
    half = size_px / 2
    if grid == "hex":
        inside = (offset**2).sum(axis=1) <= half * half
    else:
        inside = (np.abs(offset) <= half).all(axis=1)
    return np.where(inside, nearest, -1), rows, cols, centres


def _transcripts_source(frame, library_id, x_key, y_key, gene_key, units, mpp, image):
    """An image-only AnnData for the transcripts' section, and their (pixel coords, gene codes, var)."""
    import anndata as ad

    from .._images import check_image_array

    missing = [k for k in (x_key, y_key, gene_key) if k not in frame.columns]
    if missing:
        raise MissingKeyError(
            f"the transcripts table has no column(s) {missing} (it has {list(frame.columns)[:12]}). Pass x_key=, "
            f"y_key=, gene_key= (Xenium: x_location, y_location, feature_name; HEST: he_x, he_y with units='px')."
        )
    if units not in UNITS:
        raise InputError(f"units={units!r}; use 'um' (Xenium µm) or 'px' (pixels of image).")
    if not isinstance(library_id, str) or not library_id:
        raise InputError(f"library_id={library_id!r} must be a non-empty string.")
    if mpp is None:
        if units == "px":
            raise InputError("units='px' needs microns_per_pixel= of the pixel frame (e.g. 0.2125 for Xenium H&E).")
        if image is not None:
            raise InputError("an image needs microns_per_pixel= (its µm per pixel) to place µm coordinates on it.")
        mpp = 1.0
    mpp = _positive("microns_per_pixel", mpp)
    xy = frame[[x_key, y_key]].to_numpy(dtype=np.float64)
    if len(xy) == 0 or not np.isfinite(xy).all():
        raise InputError("the transcripts table is empty or has NaN/infinite coordinates; drop those rows first.")
    if units == "um":
        xy = xy / mpp
    genes = frame[gene_key]
    genes = genes if isinstance(genes.dtype, pd.CategoricalDtype) else genes.astype(str).astype("category")
    codes = genes.cat.codes.to_numpy()
    if (codes < 0).any():
        raise InputError(f"column {gene_key!r} has missing gene names; drop those transcripts first.")
    var = pd.DataFrame(index=pd.Index([str(c) for c in genes.cat.categories]))

    images, metadata = {}, {Metadata.HAS_IMAGE: image is not None, Metadata.SOURCE: "transcripts"}
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        metadata[Metadata.IMAGE_PATH] = str(image)
    elif image is not None:
        check_image_array(image, what="image")
        images[Images.FULLRES] = image
    obs = pd.DataFrame({Obs.LIBRARY_ID: pd.Categorical([], categories=[library_id])}, index=pd.Index([], dtype=str))
    source = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    source.uns[Uns.SPATIAL] = {
        library_id: {
            Uns.IMAGES: images,
            Uns.SCALEFACTORS: {ScaleFactors.MICRONS_PER_PIXEL: mpp},
            Uns.METADATA: metadata,
        }
    }
    return source, (xy, codes, var)


def _from_spatialdata(sdata, *, points_key: str | None, table_key: str | None) -> AnnData | pd.DataFrame:
    """The transcripts (a pandas DataFrame) or the bin table (an AnnData) that ``pool`` reads from ``sdata``."""
    if points_key is not None and table_key is not None:
        raise InputError("give points_key (transcripts) or table_key (bins), not both.")
    if table_key is not None:
        from ..io._spatialdata import from_spatialdata

        return from_spatialdata(sdata, table_key=table_key)
    names = list(sdata.points.keys())
    if points_key is None:
        if len(names) != 1:
            raise InputError(
                f"the SpatialData object has points elements {names}; pass points_key='<name>' for its "
                f"transcripts, or table_key='<name>' to pool a table of bins."
            )
        points_key = names[0]
    if points_key not in sdata.points:
        raise MissingKeyError(f"sdata.points has no {points_key!r}; it has {names}.")
    points = sdata.points[points_key]
    # points are a lazy dask frame; pooling needs every molecule once, in memory
    return points.compute() if hasattr(points, "compute") else pd.DataFrame(points)
