"""Reader for Space Ranger outputs: Visium (Space Ranger 1.x and 2.x+) and Visium HD bins."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import record
from .._constants import Images, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import positive_number
from ._common import (
    check_spots_inside,
    existing_dir,
    image_size,
    pixels_per_unit,
    read_small_image,
    spatial_entry,
)

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData

VISIUM_SPOT_DIAMETER_UM = 55.0
"""Visium capture spots are 55 µm across ..."""
VISIUM_SPOT_SPACING_UM = 100.0
"""... and 100 µm apart centre to centre, on a hexagonal grid."""
SPACERANGER_DIAMETER_UM = 65.0
"""Space Ranger's ``spot_diameter_fullres`` is the pixel diameter of a *theoretical 65 µm* spot
(the 55 µm capture area plus a margin), not of the 55 µm spot itself."""
SCALE_TOLERANCE = 0.05
"""Relative disagreement between the grid's µm/px and the 65 µm definition's that warns."""

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
# Newest layout first: HD bins (parquet), Space Ranger ≥ 2.0 (csv with header), 1.x (no header).
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
SCALEFACTORS_FILE = "scalefactors_json.json"
IMAGE_FILES = {Images.HIRES: "tissue_hires_image.png", Images.LOWRES: "tissue_lowres_image.png"}
BINNED_DIR = "binned_outputs"
_BIN_DIR = re.compile(r"^square_(\d+)um$")


def read_visium(
    path: str | PathLike[str],
    *,
    library_id: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    fullres_image_path: str | PathLike[str] | None = None,
    bin_size: int | None = None,
    load_images: bool = True,
) -> AnnData:
    """Read a Space Ranger output folder (Visium or Visium HD) into the sthisto convention.

    Parameters
    ----------
    path
        Space Ranger's ``outs/`` folder (holding ``spatial/`` and the count matrix), or for
        Visium HD a ``binned_outputs/square_XXXum`` folder, or an ``outs/`` folder holding
        ``binned_outputs/`` together with ``bin_size``.
    library_id
        Name of the library in ``obs['library_id']`` and ``uns['spatial']``. Default: the
        folder's name (its parent's for ``outs``; with ``_square_XXXum`` appended for HD bins).
    counts_file
        Count matrix inside the folder: an ``.h5`` file (read with
        :func:`scanpy.read_10x_h5`) or a matrix folder (``matrix.mtx``, ``features.tsv`` /
        ``genes.tsv``, ``barcodes.tsv``, gzipped or not), e.g. ``"raw_feature_bc_matrix.h5"``.
    fullres_image_path
        The full-resolution H&E image given to Space Ranger (not copied into ``outs/``). Its
        path is stored for lazy patch reads; spot pixel coordinates refer to it.
    bin_size
        Visium HD bin size in µm (2, 8, 16, ...), used when ``path`` holds ``binned_outputs``.
    load_images
        Read ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` into
        ``uns['spatial'][library_id]['images']``.

    Returns
    -------
    AnnData with one row per barcode of the count matrix:

    ``X``
        Counts as stored (float32), genes named by symbol (``var['gene_ids']`` holds the ids).
    ``obs``
        ``library_id`` (categorical), ``in_tissue``, ``array_row``, ``array_col``, ``spot_id``
        (the barcode).
    ``obsm['spatial']``
        Spot / bin centres ``(pxl_col_in_fullres, pxl_row_in_fullres)`` in full-resolution pixels.
    ``uns['spatial'][library_id]``
        ``images`` (``hires``/``lowres`` as uint8 RGB, where present); ``scalefactors``: Space
        Ranger's (``tissue_hires_scalef``, ``spot_diameter_fullres``, ...) plus
        ``microns_per_pixel`` (Space Ranger's where given, as for HD; else measured on the
        spot grid, 100 µm centre to centre, and checked against ``spot_diameter_fullres``,
        which Space Ranger defines as the pixel diameter of a theoretical 65 µm spot — not
        of the 55 µm capture spot; disagreements above 5% are logged) and
        ``spot_spacing_um`` (100 for Visium, the bin size for HD); ``metadata``:
        ``image_path`` (when ``fullres_image_path`` is given), ``has_image``, ``source``.
    ``uns['sthisto']['io']['read_visium']``
        The parameters used and ``microns_per_pixel_source``.

    Examples
    --------
    >>> adata = sthisto.io.read_visium("sample/outs", fullres_image_path="sample_he.tif")
    """
    folder = existing_dir(path, what="Space Ranger output folder")
    folder, bin_um = _resolve_bin_folder(folder, bin_size)
    spatial_dir = existing_dir(folder / "spatial", what="Space Ranger 'spatial' folder")
    positions_file = _positions_file(spatial_dir)
    counts_path = _counts_path(folder, counts_file)
    scalefactors_file = spatial_dir / SCALEFACTORS_FILE
    if not scalefactors_file.is_file():
        raise InputError(
            f"{str(scalefactors_file)!r} is missing: Space Ranger writes the image scale factors "
            f"there. Restore it from the original outs/ folder."
        )
    image_path = None
    if fullres_image_path is not None:
        image_path = Path(fullres_image_path).expanduser()
        if not image_path.is_file():
            raise InputError(f"fullres_image_path {str(image_path)!r} does not exist; pass the H&E image file.")
        image_path = image_path.resolve()
    if library_id is None:
        library_id = _default_library_id(folder, bin_um)
    library_id = str(library_id)

    scalefactors = _read_scalefactors(scalefactors_file)
    positions = _read_positions(positions_file)
    adata = _read_counts(counts_path)
    adata.X = adata.X.astype(np.float32) if adata.X.dtype != np.float32 else adata.X

    missing = ~adata.obs_names.isin(positions.index)
    if missing.all():
        raise InputError(
            f"none of the {adata.n_obs} barcodes of {counts_path.name} has a row in "
            f"{positions_file.name}: the counts and positions come from different runs. Use the "
            f"files of one Space Ranger output."
        )
    if missing.any():
        logger.warning(
            "%d of %d barcodes of %s have no row in %s and are dropped (e.g. %s).",
            int(missing.sum()),
            adata.n_obs,
            counts_path.name,
            positions_file.name,
            adata.obs_names[missing][:3].tolist(),
        )
        adata = adata[~missing].copy()
    all_positions, positions = positions, positions.loc[adata.obs_names]

    bin_um = bin_um or scalefactors.get("bin_size_um")
    if bin_um is not None:
        mpp, mpp_source = scalefactors.get(ScaleFactors.MICRONS_PER_PIXEL), SCALEFACTORS_FILE
        if mpp is None:
            raise InputError(
                f"{str(scalefactors_file)!r} gives no 'microns_per_pixel'; the physical scale of these "
                f"Visium HD bins is unknown. Add 'microns_per_pixel' to the file from Space Ranger's output."
            )
    else:
        mpp, mpp_source = _visium_microns_per_pixel(
            all_positions, scalefactors, library_id=library_id, file=scalefactors_file
        )
    diameter = scalefactors.get(ScaleFactors.SPOT_DIAMETER)
    scalefactors[ScaleFactors.MICRONS_PER_PIXEL] = float(mpp)
    scalefactors[ScaleFactors.SPOT_SPACING_UM] = float(bin_um) if bin_um is not None else VISIUM_SPOT_SPACING_UM
    if diameter is None:  # written as Space Ranger defines it
        scalefactors[ScaleFactors.SPOT_DIAMETER] = (float(bin_um) if bin_um else SPACERANGER_DIAMETER_UM) / mpp

    coords = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    images = _read_images(spatial_dir, scalefactors, coords, library_id) if load_images else {}
    if image_path is not None:
        check_spots_inside(coords, image_size(image_path), library_id=library_id, what=f"image {image_path.name}")

    adata.obs = pd.DataFrame(
        {
            Obs.LIBRARY_ID: pd.Categorical([library_id] * adata.n_obs),
            Obs.IN_TISSUE: positions["in_tissue"].to_numpy(dtype=np.int64),
            Obs.ARRAY_ROW: positions["array_row"].to_numpy(dtype=np.int64),
            Obs.ARRAY_COL: positions["array_col"].to_numpy(dtype=np.int64),
            Obs.SPOT_ID: adata.obs_names.to_numpy(dtype=object),
        },
        index=adata.obs_names,
    )
    adata.obsm[Obsm.SPATIAL] = coords
    has_any_image = image_path is not None or bool(images) or _any_image_file(spatial_dir)
    adata.uns[Uns.SPATIAL] = {
        library_id: spatial_entry(
            images=images,
            scalefactors=scalefactors,
            image_path=image_path,
            has_image=has_any_image,
            source="spaceranger-hd" if bin_um is not None else "spaceranger",
        )
    }
    record(
        adata,
        "io",
        "read_visium",
        {
            "path": str(folder.resolve()),
            "library_id": library_id,
            "counts_file": str(counts_file),
            "fullres_image_path": None if image_path is None else str(image_path),
            "bin_size": bin_um,
            "positions_file": positions_file.name,
            "microns_per_pixel_source": mpp_source,
        },
        overwrite=True,
    )
    return adata


def _visium_microns_per_pixel(
    positions: pd.DataFrame, scalefactors: dict, *, library_id: str, file
) -> tuple[float, str]:
    """µm per full-resolution pixel of a Visium (not HD) slide, and where it came from.

    The spot grid is the ruler: spots sit 100 µm apart centre to centre on a hexagonal grid
    (``array_col`` steps by 2 along a row, so one column unit is 50 µm and one row unit
    50·√3 µm). A least-squares affine fit of the pixel centres on these µm positions gives the
    pixels per µm whatever the rotation or flip of the array on the image (see
    :func:`~sthisto.io._common.pixels_per_unit`). Every row of the positions file counts (spots
    off tissue too), so the fit holds however few spots have counts.

    The result is checked against Space Ranger's ``spot_diameter_fullres``, the pixel diameter
    of a theoretical 65 µm spot; a disagreement above 5% is logged. A ``microns_per_pixel`` in
    the scale factors wins (and is checked the same way). With fewer than three positions or
    positions on one line the grid cannot be fitted and the 65 µm definition is used, with a
    warning.

    Returns
    -------
    microns_per_pixel
        µm per full-resolution pixel.
    source
        ``"scalefactors_json.json"``, ``"spot grid (100 µm centre to centre)"`` or
        ``"spot_diameter_fullres (65 µm spot)"``.
    """
    grid_um = np.column_stack(
        [
            positions["array_col"].to_numpy(dtype=float) * VISIUM_SPOT_SPACING_UM / 2,
            positions["array_row"].to_numpy(dtype=float) * VISIUM_SPOT_SPACING_UM * np.sqrt(3) / 2,
        ]
    )
    pixels = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    px_per_um = pixels_per_unit(grid_um, pixels)
    from_grid = 1.0 / px_per_um if np.isfinite(px_per_um) and px_per_um > 0 else None
    diameter = scalefactors.get(ScaleFactors.SPOT_DIAMETER)
    from_diameter = SPACERANGER_DIAMETER_UM / float(diameter) if diameter and diameter > 0 else None
    given = scalefactors.get(ScaleFactors.MICRONS_PER_PIXEL)
    if given is not None and given > 0:
        mpp, source = float(given), SCALEFACTORS_FILE
    elif from_grid is not None:
        mpp, source = from_grid, "spot grid (100 µm centre to centre)"
    elif from_diameter is not None:
        logger.warning(
            "library %r: its %d spot positions lie on one line or are too few to measure the 100 µm grid; "
            "µm per pixel taken from spot_diameter_fullres (the pixel size of a 65 µm spot): %.4g.",
            library_id,
            len(positions),
            from_diameter,
        )
        return from_diameter, "spot_diameter_fullres (65 µm spot)"
    else:
        raise InputError(
            f"{str(file)!r} gives neither 'microns_per_pixel' nor 'spot_diameter_fullres', and the spot "
            f"positions are too few to measure the 100 µm grid; the physical scale is unknown. Add "
            f"'microns_per_pixel' to the file from the scanner's metadata."
        )
    checks = [("spot_diameter_fullres (65 µm spot)", from_diameter)]
    if source == SCALEFACTORS_FILE:
        checks.insert(0, ("the spot grid (100 µm centre to centre)", from_grid))
    for name, other in checks:
        if other is not None and abs(other - mpp) > SCALE_TOLERANCE * mpp:
            logger.warning(
                "library %r: µm per pixel is %.4g from the %s but %.4g from %s (%+.0f%%); using %.4g. Check that "
                "the positions and scale factors come from one Space Ranger run of one image.",
                library_id,
                mpp,
                source,
                other,
                name,
                100 * (other / mpp - 1),
                mpp,
            )
    return mpp, source


def _resolve_bin_folder(folder: Path, bin_size: int | None) -> tuple[Path, float | None]:
    """Return the folder holding ``spatial/`` and, for Visium HD, its bin size in µm."""
    match = _BIN_DIR.match(folder.name)
    if match:
        size = float(int(match.group(1)))
        if bin_size is not None and float(bin_size) != size:
            raise InputError(f"bin_size={bin_size} disagrees with the folder {folder.name!r}; drop bin_size.")
        return folder, size
    binned = folder / BINNED_DIR
    if not binned.is_dir():
        if bin_size is not None:
            raise InputError(
                f"bin_size={bin_size} given, but {str(folder)!r} has no binned_outputs/ folder (not Visium HD)."
            )
        return folder, None
    bins = {int(m.group(1)): p for p in binned.iterdir() if p.is_dir() and (m := _BIN_DIR.match(p.name))}
    if not bins:
        raise InputError(f"{str(binned)!r} holds no square_XXXum folders; is this a Visium HD output?")
    if bin_size is None:
        if (folder / "spatial").is_dir():
            return folder, None
        if len(bins) > 1:
            raise MissingKeyError(
                f"{str(folder)!r} holds Visium HD bins of {sorted(bins)} µm; choose one with bin_size=."
            )
        bin_size = next(iter(bins))
    if int(bin_size) not in bins:
        raise MissingKeyError(f"no {int(bin_size)} µm bins in {str(binned)!r}; available: {sorted(bins)} µm.")
    return bins[int(bin_size)], float(int(bin_size))


def _default_library_id(folder: Path, bin_um: float | None) -> str:
    if bin_um is not None and _BIN_DIR.match(folder.name):
        sample = folder.parent.parent  # <sample>/binned_outputs/square_XXXum
        sample = sample.parent if sample.name == "outs" else sample
        return f"{sample.name}_{folder.name}"
    return folder.parent.name if folder.name == "outs" else folder.name


def _positions_file(spatial_dir: Path) -> Path:
    for name in POSITION_FILES:
        if (spatial_dir / name).is_file():
            return spatial_dir / name
    raise InputError(
        f"no spot positions file in {str(spatial_dir)!r}: expected one of {list(POSITION_FILES)} "
        f"(Space Ranger HD, ≥ 2.0, 1.x). Restore it from the original outs/spatial folder."
    )


def _counts_path(folder: Path, counts_file: str) -> Path:
    path = folder / counts_file
    if path.exists():
        return path
    candidates = sorted(p.name for p in folder.iterdir() if p.name.endswith(".h5") or p.name.endswith("_bc_matrix"))
    raise InputError(
        f"count matrix {str(path)!r} not found. Pass counts_file= one of {candidates} "
        f"(e.g. counts_file='raw_feature_bc_matrix.h5')."
    )


def _read_scalefactors(file: Path) -> dict:
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"could not read {str(file)!r} as JSON: {err}") from err
    if not isinstance(values, dict):
        raise InputError(f"{str(file)!r} should hold a JSON object of scale factors.")
    for key in _POSITIVE_SCALEFACTORS:
        if values.get(key) is not None:
            # A zero or negative scale passes every later step and turns all physical sizes meaningless.
            positive_number(
                values[key],
                what=f"{key!r} in {str(file)!r}",
                fix="Space Ranger writes positive scale factors; restore the file from the Space Ranger output.",
            )
    return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_POSITIVE_SCALEFACTORS = (
    ScaleFactors.MICRONS_PER_PIXEL,
    ScaleFactors.SPOT_DIAMETER,
    ScaleFactors.HIRES,
    ScaleFactors.LOWRES,
    "bin_size_um",
)


def _read_positions(file: Path) -> pd.DataFrame:
    try:
        if file.suffix == ".parquet":
            table = pd.read_parquet(file)
        elif file.name == "tissue_positions_list.csv":
            table = pd.read_csv(file, header=None)
            if table.shape[1] != len(POSITION_COLUMNS):
                raise InputError(
                    f"{str(file)!r} has {table.shape[1]} columns; Space Ranger 1.x writes "
                    f"{len(POSITION_COLUMNS)}: {list(POSITION_COLUMNS)}."
                )
            table.columns = list(POSITION_COLUMNS)
        else:
            table = pd.read_csv(file)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"could not read the spot positions {str(file)!r}: {err}") from err
    absent = [c for c in POSITION_COLUMNS if c not in table.columns]
    if absent:
        raise InputError(f"{str(file)!r} lacks column(s) {absent}; Space Ranger writes {list(POSITION_COLUMNS)}.")
    table = table.set_index(table["barcode"].astype(str))
    if not table.index.is_unique:
        raise InputError(f"{str(file)!r} lists some barcodes more than once.")
    if not np.isfinite(table[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(dtype=float)).all():
        raise InputError(f"{str(file)!r} has missing pixel coordinates.")
    return table


def _read_counts(path: Path):
    try:
        if path.is_dir():
            return _read_mtx_folder(path)
        import scanpy as sc

        adata = sc.read_10x_h5(path)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"could not read the count matrix {str(path)!r}: {err}") from err
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for suffix in ("", ".gz"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    raise InputError(
        f"{str(folder)!r} lacks {names[0]}(.gz); a 10x matrix folder holds matrix.mtx, features.tsv, barcodes.tsv."
    )


def _read_mtx_folder(folder: Path):
    """Read a 10x matrix folder, gzipped or not (scanpy's reader insists on gzip for v3)."""
    import anndata as ad
    import scipy.io
    import scipy.sparse as sp

    matrix = sp.csr_matrix(scipy.io.mmread(_first_existing(folder, ("matrix.mtx",))).T, dtype=np.float32)
    features = pd.read_csv(_first_existing(folder, ("features.tsv", "genes.tsv")), sep="\t", header=None)
    barcodes = pd.read_csv(_first_existing(folder, ("barcodes.tsv",)), sep="\t", header=None)[0].astype(str)
    if matrix.shape != (len(barcodes), len(features)):
        raise InputError(
            f"{str(folder)!r}: matrix is {matrix.shape[1]} genes × {matrix.shape[0]} barcodes but the "
            f"folder lists {len(features)} features and {len(barcodes)} barcodes."
        )
    var = pd.DataFrame({"gene_ids": features[0].astype(str).to_numpy()})
    if features.shape[1] > 2:
        var["feature_types"] = features[2].astype(str).to_numpy()
    names = features[1] if features.shape[1] > 1 else features[0]
    var.index = pd.Index(names.astype(str).to_numpy(), dtype=object)
    adata = ad.AnnData(X=matrix, obs=pd.DataFrame(index=pd.Index(barcodes.to_numpy(), dtype=object)), var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _read_images(spatial_dir: Path, scalefactors: dict, coords: np.ndarray, library_id: str) -> dict:
    images = {}
    for key, name in IMAGE_FILES.items():
        file = spatial_dir / name
        if not file.is_file():
            continue
        scale = scalefactors.get(ScaleFactors.for_image(key))
        if scale is None:
            logger.warning("%s has no %s in %s; not loaded.", name, ScaleFactors.for_image(key), SCALEFACTORS_FILE)
            continue
        image = read_small_image(file)
        check_spots_inside(coords * scale, image.shape[:2], library_id=library_id, what=f"{name} (at its scale)")
        images[key] = image
    return images


def _any_image_file(spatial_dir: Path) -> bool:
    return any((spatial_dir / name).is_file() for name in IMAGE_FILES.values())
