"""Reader for HEST-1k samples (Jaume et al. 2024): expression, whole-slide image, metadata, patches.

A HEST root holds, per sample id, ``st/<id>.h5ad`` (scanpy AnnData, spot centres in
full-resolution pixels in ``obsm['spatial']``), ``wsis/<id>.tif`` (pyramidal generic TIFF),
``metadata/<id>.json`` (pixel size, technology, patient, organ, ...) and optionally
``patches/<id>.h5`` (224-px patches at 0.5 µm/px matched to spots by barcode),
``tissue_seg/`` and ``cellvit_seg/``. The slide is never decoded at full resolution: its path
is stored and patches are cut lazily, or read from the pre-cut patch file when its field of
view matches (see :class:`sthisto.pp.PatchDataset`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import record

if TYPE_CHECKING:
    from anndata import AnnData
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from ._common import HIRES_MAX_SIDE, existing_dir, image_size, names_list, sorted_names, spatial_entry, thumbnail

SOURCE = "hest"
ST_DIR, WSI_DIR, META_DIR, PATCH_DIR = "st", "wsis", "metadata", "patches"
OPTIONAL_DIRS = ("tissue_seg", "cellvit_seg")
WSI_SUFFIXES = (".tif", ".tiff", ".btf")
HEST_PATCH_MPP = 0.5
"""HEST cuts its patches at 0.5 µm per pixel (224 px = 112 µm)."""
# Spot pitch and diameter (µm) of the platforms HEST holds, when the metadata omit them.
_GEOMETRY = {
    "visium": (100.0, 55.0),
    "spatial transcriptomics": (200.0, 100.0),
}
# HEST's JSON names the pixel size twice; the estimate is the one its pipeline relies on.
_MPP_FIELDS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
_OBS_FIELDS = {Obs.PATIENT: "patient", Obs.ORGAN: "organ"}


def read_hest(
    path: str | PathLike[str],
    *,
    sample_ids: str | Sequence[str] | None = None,
    patches: bool = True,
    hires_max_side: int = HIRES_MAX_SIDE,
) -> AnnData:
    """Read HEST-1k samples into the sthisto AnnData convention.

    Parameters
    ----------
    path
        HEST root folder holding ``st/``, ``wsis/`` and ``metadata/`` (as downloaded from
        HEST-1k, or written by the ``hest`` library).
    sample_ids
        Sample id(s) to read, e.g. ``["TENX95", "NCBI783"]``. Default: every ``st/<id>.h5ad``,
        in name order.
    patches
        Use ``patches/<id>.h5`` when present: each spot's row in that file is stored in
        ``obs['patch_index']`` and :class:`sthisto.pp.PatchDataset` reads those patches instead
        of cutting the slide whenever the requested field of view equals theirs (112 µm for
        HEST's 224 px at 0.5 µm/px). ``False`` ignores the file.
    hires_max_side
        Longest side of the plotting copy stored as ``images['hires']``.

    Returns
    -------
    AnnData with one row per spot of all samples (genes: union, 0 where a sample lacks one):

    ``X``
        The sample h5ad's ``X`` (HEST stores raw counts), CSR float32.
    ``obs_names``
        ``<sample_id>_<barcode>``.
    ``obs``
        ``library_id`` (the sample id), ``patient`` and ``organ`` (from the metadata; the
        sample id / ``"unknown"`` where HEST leaves them empty, with a warning),
        ``array_row`` / ``array_col`` and ``in_tissue`` where the h5ad has them, ``spot_id``
        (barcode) and, with pre-cut patches, ``patch_index`` (-1 for spots without a patch).
    ``obsm['spatial']``
        Spot centres (x, y) in pixels of the full-resolution slide.
    ``uns['spatial'][sample_id]``
        ``images['hires']`` (from the slide's pyramid); ``scalefactors`` with
        ``microns_per_pixel`` (metadata ``pixel_size_um_estimated``, else ``_embedded``),
        ``spot_diameter_fullres`` and ``spot_spacing_um`` (metadata ``spot_diameter`` /
        ``inter_spot_dist``, else the platform's); ``metadata`` with ``image_path``,
        ``technology``, the HEST metadata as JSON (``hest_metadata``), the paths of
        ``tissue_seg`` / ``cellvit_seg`` files when present and, with patches,
        ``patches_path``, ``patches_microns_per_pixel``, ``patches_size_px``.
    ``uns['sthisto']['io']['read_hest']``
        The path, samples and options read.

    Examples
    --------
    >>> adata = sthisto.io.read_hest("hest_data", sample_ids=["TENX95"])
    >>> adata.uns["spatial"]["TENX95"]["scalefactors"]["microns_per_pixel"]
    """
    import anndata as ad

    root = existing_dir(path, what="HEST folder")
    if isinstance(hires_max_side, bool) or int(hires_max_side) < 1:
        raise InputError(f"hires_max_side={hires_max_side!r} must be a positive number of pixels.")
    if not isinstance(patches, bool):
        raise InputError(f"patches={patches!r} must be True or False.")
    st_dir = existing_dir(root / ST_DIR, what="HEST expression folder (st/)")
    available = sorted_names([p.stem for p in st_dir.glob("*.h5ad") if not p.name.startswith(".")])
    if not available:
        raise InputError(f"{str(st_dir)!r} holds no <sample_id>.h5ad files. Is {str(root)!r} a HEST root?")
    requested = names_list(sample_ids, what="sample_ids")
    if requested is None:
        requested = available
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise MissingKeyError(
            f"sample(s) {unknown} have no expression file in {str(st_dir)!r}. Available: "
            f"{available[:20]}{' ...' if len(available) > 20 else ''}. Pass sample_ids= a subset of those "
            f"(download the others from HEST-1k first)."
        )

    parts = [_read_sample(root, sid, patches, int(hires_max_side)) for sid in requested]
    adata = ad.concat([p for p, _ in parts], join="outer", fill_value=0, merge=None, uns_merge=None)
    adata.X = _csr_float32(adata.X)
    adata.obs[Obs.LIBRARY_ID] = pd.Categorical(adata.obs[Obs.LIBRARY_ID].astype(str), categories=requested)
    for column in (Obs.PATIENT, Obs.ORGAN):
        adata.obs[column] = pd.Categorical(adata.obs[column].astype(str))
    if Obs.PATCH_INDEX in adata.obs:
        adata.obs[Obs.PATCH_INDEX] = adata.obs[Obs.PATCH_INDEX].fillna(-1).astype(np.int64)
    adata.uns[Uns.SPATIAL] = {sid: entry for sid, (_, entry) in zip(requested, parts, strict=True)}
    record(
        adata,
        "io",
        "read_hest",
        {"path": str(root.resolve()), "sample_ids": requested, "patches": patches, "hires_max_side": hires_max_side},
        overwrite=True,
    )
    return adata


def _csr_float32(matrix):
    import scipy.sparse as sp

    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sort_indices()
    return matrix


def _read_metadata(root: Path, sid: str) -> dict:
    file = root / META_DIR / f"{sid}.json"
    if not file.is_file():
        raise InputError(
            f"HEST sample {sid!r} has no metadata file {str(file)!r}; its pixel size and technology are "
            f"read from there. Download metadata/{sid}.json with the sample."
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"could not parse the HEST metadata {str(file)!r}: {err}.") from err
    if not isinstance(meta, dict):
        raise InputError(f"HEST metadata {str(file)!r} is not a JSON object.")
    return meta


def _number(meta: dict, name: str) -> float | None:
    value = meta.get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _read_sample(root: Path, sid: str, use_patches: bool, hires_max_side: int):
    import anndata as ad

    meta = _read_metadata(root, sid)
    mpp = next((v for v in (_number(meta, f) for f in _MPP_FIELDS) if v is not None), None)
    if mpp is None:
        raise InputError(
            f"HEST sample {sid!r}: metadata/{sid}.json gives no positive {' or '.join(_MPP_FIELDS)}; "
            f"sthisto needs µm per pixel of the slide. Add the scanner's value to the JSON."
        )
    technology = str(meta.get("st_technology") or "unknown")
    default_spacing, default_diameter = _GEOMETRY.get(technology.lower(), (None, None))
    spacing = _number(meta, "inter_spot_dist") or default_spacing
    diameter = _number(meta, "spot_diameter") or default_diameter

    st_file = root / ST_DIR / f"{sid}.h5ad"
    try:
        sample = ad.read_h5ad(st_file)
    except Exception as err:
        raise InputError(f"could not read HEST expression file {str(st_file)!r}: {err}.") from err
    if Obsm.SPATIAL not in sample.obsm:
        if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(sample.obs.columns):
            coords = sample.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
        else:
            raise MissingKeyError(
                f"HEST sample {sid!r}: {st_file.name} has neither obsm['spatial'] nor obs "
                f"'pxl_col_in_fullres'/'pxl_row_in_fullres'; spot centres in slide pixels are needed."
            )
    else:
        coords = np.asarray(sample.obsm[Obsm.SPATIAL], dtype=np.float64)[:, :2]

    barcodes = sample.obs_names.astype(str).to_numpy()
    obs = pd.DataFrame(index=pd.Index([f"{sid}_{b}" for b in barcodes], dtype=object))
    obs[Obs.LIBRARY_ID] = sid
    for column, field in _OBS_FIELDS.items():
        value = meta.get(field)
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            value = sid if column == Obs.PATIENT else "unknown"
            logger.warning(
                "HEST sample %s: metadata has no %r; obs[%r] set to %r%s.",
                sid,
                field,
                column,
                value,
                " (one patient per sample, as for a patient-level split)" if column == Obs.PATIENT else "",
            )
        obs[column] = str(value)
    for column in (Obs.ARRAY_ROW, Obs.ARRAY_COL, Obs.IN_TISSUE):
        if column in sample.obs:
            obs[column] = sample.obs[column].to_numpy(dtype=np.int64)
    obs[Obs.SPOT_ID] = barcodes.astype(object)

    scalefactors = {ScaleFactors.MICRONS_PER_PIXEL: mpp}
    if diameter is not None:
        scalefactors[ScaleFactors.SPOT_DIAMETER] = diameter / mpp
    if spacing is not None:
        scalefactors[ScaleFactors.SPOT_SPACING_UM] = spacing

    image_file = next(
        (root / WSI_DIR / f"{sid}{s}" for s in WSI_SUFFIXES if (root / WSI_DIR / f"{sid}{s}").is_file()), None
    )
    images = {}
    if image_file is not None:
        height, width = image_size(image_file)
        outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
        if outside.all():
            raise InputError(
                f"HEST sample {sid!r}: no spot centre lies inside its slide ({height} × {width} px); "
                f"obsm['spatial'] of {st_file.name} is not in the frame of {image_file.name}."
            )
        images[Images.HIRES], scalefactors[ScaleFactors.HIRES] = thumbnail(image_file, hires_max_side)
    else:
        logger.warning("HEST sample %s has no slide in wsis/; loaded as expression-only data.", sid)
    entry = spatial_entry(
        images=images,
        scalefactors=scalefactors,
        image_path=None if image_file is None else str(image_file.resolve()),
        has_image=image_file is not None,
        source=SOURCE,
    )
    entry[Uns.METADATA][Metadata.TECHNOLOGY] = technology
    entry[Uns.METADATA]["hest_metadata"] = json.dumps(meta, default=str)
    for folder in OPTIONAL_DIRS:
        found = (
            sorted(str(p.resolve()) for p in (root / folder).glob(f"{sid}[._]*")) if (root / folder).is_dir() else []
        )
        if found:
            entry[Uns.METADATA][folder] = np.asarray(found)

    patch_file = root / PATCH_DIR / f"{sid}.h5"
    if use_patches and patch_file.is_file():
        rows, patch_mpp, side = _match_patches(patch_file, barcodes, sid)
        obs[Obs.PATCH_INDEX] = rows
        entry[Uns.METADATA][Metadata.PATCHES_PATH] = str(patch_file.resolve())
        entry[Uns.METADATA][Metadata.PATCHES_MICRONS_PER_PIXEL] = patch_mpp
        entry[Uns.METADATA][Metadata.PATCHES_SIZE_PX] = side

    part = ad.AnnData(X=_csr_float32(sample.X), obs=obs, var=pd.DataFrame(index=sample.var_names.astype(str)))
    part.obsm[Obsm.SPATIAL] = coords
    return part, entry


def _match_patches(file: Path, barcodes: np.ndarray, sid: str) -> tuple[np.ndarray, float, int]:
    """Row of each spot's patch in a HEST patch file (-1: none), the patches' µm/px and side."""
    import h5py

    try:
        with h5py.File(file, "r") as h5:
            if "img" not in h5 or "barcode" not in h5:
                raise InputError(
                    f"HEST patch file {str(file)!r} lacks the 'img' or 'barcode' dataset; pass patches=False "
                    f"to cut patches from the slide instead."
                )
            shape = h5["img"].shape
            names = np.asarray(h5["barcode"][()]).reshape(-1)
            attrs = dict(h5["img"].attrs)
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"could not read HEST patch file {str(file)!r}: {err}. Pass patches=False to skip it."
        ) from err
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] < 3 or shape[0] != len(names):
        raise InputError(
            f"HEST patch file {str(file)!r}: 'img' has shape {shape} for {len(names)} barcodes; expected "
            f"(n, side, side, 3) with one barcode per patch. Pass patches=False to cut from the slide."
        )
    names = np.asarray([n.decode() if isinstance(n, bytes) else str(n) for n in names], dtype=object)
    lookup = pd.Series(np.arange(len(names)), index=pd.Index(names)).groupby(level=0).first()
    rows = lookup.reindex(barcodes).fillna(-1).to_numpy(dtype=np.int64)
    missing = int((rows < 0).sum())
    if missing:
        logger.warning(
            "HEST sample %s: %d of %d spots have no pre-cut patch; they are cut from the slide.",
            sid,
            missing,
            len(rows),
        )
    patch_mpp = float(attrs.get("pixel_size", HEST_PATCH_MPP))
    return rows, patch_mpp, int(shape[1])
