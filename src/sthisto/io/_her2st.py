"""Reader for the published her2st layout (legacy Spatial Transcriptomics, Andersson et al. 2021)."""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import record
from .._constants import Images, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from ._common import (
    HIRES_MAX_SIDE,
    existing_dir,
    image_size,
    names_list,
    pixels_per_unit,
    sorted_names,
    spatial_entry,
    thumbnail,
)

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData

SPOT_SPACING_UM = 200.0
"""Legacy ST arrays: spot centres 200 µm apart."""
SPOT_DIAMETER_UM = 100.0
"""Legacy ST arrays: spots are 100 µm across."""

COUNTS_DIR = "ST-cnts"
SPOTS_DIR = "ST-spotfiles"
IMAGES_DIR = "ST-imgs"
LABELS_DIR = Path("ST-pat") / "lbl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
SOURCE = "her2st"

_SPOT_ID = re.compile(r"^(-?\d+)x(-?\d+)$")
_PATIENT = re.compile(r"^([A-Za-z]+)")


def read_her2st(
    path: str | PathLike[str],
    *,
    sections: str | Sequence[str] | None = None,
    image_paths: Mapping[str, str | Path] | None = None,
    hires_max_side: int = HIRES_MAX_SIDE,
) -> AnnData:
    """Read the published her2st data (counts, spot positions, H&E images, labels).

    Parameters
    ----------
    path
        Root of the her2st layout, holding ``ST-cnts/<section>.tsv.gz``,
        ``ST-spotfiles/<section>_selection.tsv``, ``ST-imgs/<patient>/<section>/*.jpg`` and
        optionally ``ST-pat/lbl/<section>_labeled_coordinates.tsv``.
    sections
        Section name(s) to read, e.g. ``["C2", "C3"]``. Default: every section that has a count
        table, in name order.
    image_paths
        Section → image file, overriding (or adding to) the images found under ``ST-imgs``.
        The pixel coordinates of a section's spot file must refer to that image.
    hires_max_side
        Longest side of the downscaled plotting copy stored as ``images['hires']``.

    Returns
    -------
    AnnData with one row per spot of all requested sections:

    ``X``
        Raw UMI counts (CSR, float32, integer-valued); genes are the union over sections,
        a gene absent from a section's table counts 0 there.
    ``obs_names``
        ``<section>_<x>x<y>``.
    ``obs``
        ``library_id`` (categorical section name), ``patient`` (categorical donor letter),
        ``array_col`` / ``array_row`` (her2st ``x`` / ``y``), ``spot_id`` (``<x>x<y>``),
        ``in_tissue`` (the spot file's ``selected``) and ``label`` (pathologist region,
        categorical; missing for unlabelled spots and sections without a label file).
    ``obsm['spatial']``
        The spot file's ``(pixel_x, pixel_y)``: spot centres in pixels of the section's
        image (for patient A the published 0.75×-scale image).
    ``uns['spatial'][section]``
        ``images['hires']`` (uint8 copy, longest side ``hires_max_side``) where the section
        has an image; ``scalefactors`` with ``microns_per_pixel`` (fitted from the spot grid:
        200 µm centre to centre), ``spot_diameter_fullres`` (100 µm in pixels),
        ``spot_spacing_um`` (200) and ``tissue_hires_scalef``; ``metadata`` with
        ``image_path`` (full-resolution image, read lazily for patches), ``has_image`` and
        ``source``.
    ``uns['sthisto']['io']['read_her2st']``
        The path and sections read.

    Sections without an H&E image load as expression-only data (``has_image=False``); a
    single warning names them.

    Examples
    --------
    >>> adata = sthisto.io.read_her2st("data/her2st", sections=["C2", "C3"])
    >>> adata.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"]  # ≈ 0.69
    """
    import anndata as ad

    root = existing_dir(path, what="her2st folder")
    if int(hires_max_side) < 1:
        raise InputError(f"hires_max_side={hires_max_side!r} must be a positive number of pixels.")
    available = _available_sections(root)
    requested = names_list(sections, what="sections")
    if requested is None:
        requested = available
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise MissingKeyError(
            f"section(s) {unknown} have no count table in {str(root / COUNTS_DIR)!r}. Available "
            f"sections: {available}. Pass sections= a subset of those."
        )
    overrides = _check_image_overrides(image_paths, requested)

    parts = [_read_section(root, name, overrides.get(name), int(hires_max_side)) for name in requested]

    genes = _union_genes([p.genes for p in parts])
    matrix = _stack_counts(parts, genes)
    obs = pd.concat([p.obs for p in parts])
    obs[Obs.LIBRARY_ID] = pd.Categorical(obs[Obs.LIBRARY_ID], categories=requested)
    obs[Obs.PATIENT] = pd.Categorical(obs[Obs.PATIENT], categories=sorted(obs[Obs.PATIENT].unique()))
    labels = sorted({lbl for p in parts for lbl in p.obs[Obs.LABEL].dropna().unique()})
    obs[Obs.LABEL] = pd.Categorical(obs[Obs.LABEL], categories=labels)
    adata = ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    adata.obsm[Obsm.SPATIAL] = np.concatenate([p.coords for p in parts])
    adata.uns[Uns.SPATIAL] = {p.name: p.spatial for p in parts}

    without_image = [p.name for p in parts if not p.has_image]
    if without_image:
        logger.warning(
            "her2st sections without an H&E image, loaded as expression-only data (no patches "
            "or image features for them): %s",
            ", ".join(without_image),
        )
    record(
        adata,
        "io",
        "read_her2st",
        {"path": str(root.resolve()), "sections": requested, "hires_max_side": int(hires_max_side)},
        overwrite=True,
    )
    return adata


class _Section:
    """One section's pieces before they are stacked."""

    def __init__(self, name, genes, counts, obs, coords, spatial, has_image):
        self.name = name
        self.genes = genes
        self.counts = counts
        self.obs = obs
        self.coords = coords
        self.spatial = spatial
        self.has_image = has_image


def _available_sections(root: Path) -> list[str]:
    counts_dir = existing_dir(root / COUNTS_DIR, what="her2st count folder (ST-cnts)")
    names = {p.name.removesuffix(".gz").removesuffix(".tsv") for p in counts_dir.glob("*.tsv*")}
    names = {n for n in names if n and not n.startswith(".")}
    if not names:
        raise InputError(
            f"{str(counts_dir)!r} holds no count tables (<section>.tsv.gz). Is {str(root)!r} the her2st root?"
        )
    return sorted_names(list(names))


def _check_image_overrides(image_paths, sections) -> dict[str, Path]:
    if image_paths is None:
        return {}
    if not isinstance(image_paths, Mapping):
        raise InputError("image_paths must map section names to image files, e.g. {'A1': 'A1.jpg'}.")
    out = {}
    for name, file in image_paths.items():
        if name not in sections:
            raise MissingKeyError(
                f"image_paths names section {name!r}, which is not being read (sections: "
                f"{sections}). Remove it or add it to sections=."
            )
        file = Path(file).expanduser()
        if not file.is_file():
            raise InputError(f"image file {str(file)!r} given for section {name!r} does not exist.")
        out[name] = file.resolve()
    return out


def _read_section(root: Path, name: str, image_override: Path | None, hires_max_side: int) -> _Section:
    spot_ids, genes, counts = _read_counts(_counts_file(root, name))
    grid = _parse_spot_ids(spot_ids, name)
    spots = _read_selection(root, name)

    # Join counts to the spot file on the integer array coordinates.
    position = pd.Series(np.arange(len(spots)), index=pd.MultiIndex.from_arrays([spots["x"], spots["y"]]))
    row = position.reindex(pd.MultiIndex.from_arrays([grid[:, 0], grid[:, 1]])).to_numpy()
    missing = np.isnan(row)
    if missing.all():
        raise InputError(
            f"her2st section {name}: none of its count spots has a row in its spot file; the "
            f"two files belong to different sections. Restore the matching {name}_selection.tsv."
        )
    if missing.any():
        logger.warning(
            "her2st section %s: %d count spots have no row in its spot file and are dropped (e.g. %s).",
            name,
            int(missing.sum()),
            list(np.asarray(spot_ids)[missing][:5]),
        )
        keep = ~missing
        spot_ids, grid, counts, row = np.asarray(spot_ids)[keep], grid[keep], counts[keep], row[keep]
    spots = spots.iloc[row.astype(np.int64)].reset_index(drop=True)

    obs = pd.DataFrame(
        {
            Obs.LIBRARY_ID: name,
            Obs.PATIENT: _patient(name),
            Obs.ARRAY_ROW: grid[:, 1],
            Obs.ARRAY_COL: grid[:, 0],
            Obs.SPOT_ID: np.asarray(spot_ids, dtype=object),
            Obs.IN_TISSUE: spots["selected"].to_numpy(dtype=np.int64)
            if "selected" in spots
            else np.ones(len(spots), dtype=np.int64),
            Obs.LABEL: _labels(root, name, spots),
        },
        index=pd.Index([f"{name}_{s}" for s in spot_ids], dtype=object),
    )
    coords = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)

    grid_cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    px_per_unit = pixels_per_unit(spots[grid_cols].to_numpy(), coords)
    if not (np.isfinite(px_per_unit) and px_per_unit > 0):
        raise InputError(
            f"her2st section {name}: cannot derive µm per pixel, its spot file has too few spots "
            f"({len(spots)}) or they lie on one line. Leave it out with sections=."
        )
    mpp = SPOT_SPACING_UM / px_per_unit
    scalefactors = {
        ScaleFactors.MICRONS_PER_PIXEL: mpp,
        ScaleFactors.SPOT_DIAMETER: SPOT_DIAMETER_UM / mpp,
        ScaleFactors.SPOT_SPACING_UM: SPOT_SPACING_UM,
    }

    image_file = image_override or _find_image(root, name)
    images = {}
    if image_file is not None:
        height, width = image_size(image_file)
        _warn_if_outside(coords, (height, width), name, image_file)
        hires, scale = thumbnail(image_file, hires_max_side)
        images[Images.HIRES] = hires
        scalefactors[ScaleFactors.HIRES] = scale
    spatial = spatial_entry(
        images=images,
        scalefactors=scalefactors,
        image_path=None if image_file is None else str(image_file),
        has_image=image_file is not None,
        source=SOURCE,
    )
    return _Section(name, genes, counts, obs, coords, spatial, image_file is not None)


def _counts_file(root: Path, name: str) -> Path:
    for suffix in (".tsv.gz", ".tsv"):
        file = root / COUNTS_DIR / f"{name}{suffix}"
        if file.is_file():
            return file
    raise InputError(f"count table of section {name!r} not found in {str(root / COUNTS_DIR)!r}.")


def _read_counts(file: Path) -> tuple[list[str], list[str], sp.csr_matrix]:
    """Parse a spots × genes count table (first column: spot ids); genes come back sorted."""
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"could not read the count table {str(file)!r}: {err}. Is the file complete?") from err
    header_end = raw.find(b"\n")
    header = raw[: header_end if header_end >= 0 else len(raw)].decode("utf-8", errors="replace").rstrip("\r")
    genes = [g.strip().strip('"') for g in header.split("\t")[1:]]
    if not genes or any(not g for g in genes):
        raise InputError(
            f"count table {str(file)!r} has a malformed header: expected a tab-separated line "
            f"'<empty>\\t<gene>\\t<gene>...', got {header[:80]!r}."
        )
    body = raw[header_end + 1 :] if header_end >= 0 else b""
    spot_ids = [
        line[: line.find(b"\t")].decode("utf-8", errors="replace").strip('"')
        for line in body.split(b"\n")
        if line.strip() and b"\t" in line
    ]
    if not spot_ids:
        raise InputError(f"count table {str(file)!r} has no spots (only a header), or is not tab-separated.")
    # np.loadtxt's C parser reads these 15,000-column tables ~10× faster than pandas, and
    # integers (int32: counts are small) ~6× faster than floats; floats are tried only when integers do not parse.
    skip_id = {0: lambda _: 0}
    try:
        values = np.loadtxt(io.BytesIO(body), delimiter="\t", dtype=np.int32, ndmin=2, converters=skip_id)
    except ValueError:
        values = None
    if values is None:
        try:
            values = np.loadtxt(io.BytesIO(body), delimiter="\t", dtype=np.float64, ndmin=2, converters=skip_id)
        except ValueError as err:
            raise InputError(f"count table {str(file)!r} holds non-numeric or ragged rows: {err}") from err
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise InputError(
                f"count table {str(file)!r} holds non-integer or missing values; read_her2st expects raw UMI counts."
            )
    if values.shape != (len(spot_ids), len(genes) + 1):
        raise InputError(
            f"count table {str(file)!r}: {values.shape[0]} rows of {values.shape[1] - 1} counts, but "
            f"{len(spot_ids)} spot ids and {len(genes)} gene names."
        )
    if (values < 0).any():
        raise InputError(f"count table {str(file)!r} holds negative values; read_her2st expects raw UMI counts.")
    if len(set(spot_ids)) != len(spot_ids):
        raise InputError(f"count table {str(file)!r} lists some spot ids more than once.")
    # Sorted columns let sections merge onto the sorted gene union without re-sorting indices.
    names, codes = np.unique(np.asarray(genes, dtype=object), return_inverse=True)
    if len(names) == len(genes):
        return spot_ids, list(names), _dense_to_csr(np.take(values, np.argsort(codes) + 1, axis=1))
    # A symbol repeated in one table is one gene measured twice: add the columns up.
    combine = sp.csr_matrix((np.ones(len(genes), np.float32), (np.arange(len(genes)), codes)))
    summed = sp.csr_matrix(sp.csr_matrix(values[:, 1:], dtype=np.float32) @ combine)
    summed.sort_indices()
    return spot_ids, list(names), summed


def _dense_to_csr(dense: np.ndarray) -> sp.csr_matrix:
    """CSR float32 copy of a dense table (one pass over it; scipy's constructor makes three)."""
    n_rows, n_cols = dense.shape
    flat = np.flatnonzero(dense)
    indptr = np.searchsorted(flat, np.arange(n_rows + 1, dtype=np.int64) * n_cols)
    return sp.csr_matrix(
        (dense.ravel()[flat].astype(np.float32), (flat % n_cols).astype(np.int32), indptr), shape=(n_rows, n_cols)
    )


def _parse_spot_ids(spot_ids: Sequence[str], name: str) -> np.ndarray:
    grid = np.empty((len(spot_ids), 2), dtype=np.int64)
    for i, spot in enumerate(spot_ids):
        match = _SPOT_ID.match(spot)
        if match is None:
            raise InputError(
                f"her2st section {name}: spot id {spot!r} is not '<x>x<y>' with integer array "
                f"coordinates; is this a her2st count table?"
            )
        grid[i] = int(match.group(1)), int(match.group(2))
    return grid


def _read_selection(root: Path, name: str) -> pd.DataFrame:
    file = root / SPOTS_DIR / f"{name}_selection.tsv"
    if not file.is_file():
        raise InputError(
            f"her2st section {name}: spot file {str(file)!r} is missing; it holds the pixel "
            f"positions of the spots. Restore it or leave the section out with sections=."
        )
    try:
        spots = pd.read_csv(file, sep="\t")
    except Exception as err:
        raise InputError(f"could not read the spot file {str(file)!r}: {err}") from err
    needed = ["x", "y", "pixel_x", "pixel_y"]
    absent = [c for c in needed if c not in spots.columns]
    if absent:
        raise InputError(
            f"spot file {str(file)!r} lacks column(s) {absent}; expected a tab-separated table with "
            f"x, y, new_x, new_y, pixel_x, pixel_y, selected."
        )
    spots = spots.dropna(subset=needed)
    if (spots["x"] != spots["x"].round()).any() or (spots["y"] != spots["y"].round()).any():
        raise InputError(f"spot file {str(file)!r}: columns x and y must be integer array coordinates.")
    spots = spots.astype({"x": np.int64, "y": np.int64})
    if spots.duplicated(["x", "y"]).any():
        raise InputError(f"spot file {str(file)!r} lists some (x, y) array positions more than once.")
    return spots.reset_index(drop=True)


def _labels(root: Path, name: str, spots: pd.DataFrame) -> np.ndarray:
    """Pathologist labels joined on rounded label (x, y) = rounded spot-file (new_x, new_y)."""
    out = np.full(len(spots), np.nan, dtype=object)
    file = root / LABELS_DIR / f"{name}_labeled_coordinates.tsv"
    if not file.is_file():
        return out
    try:
        table = pd.read_csv(file, sep="\t")
    except Exception as err:
        raise InputError(f"could not read the label file {str(file)!r}: {err}") from err
    absent = [c for c in ("x", "y", "label") if c not in table.columns]
    if absent:
        raise InputError(f"label file {str(file)!r} lacks column(s) {absent}; expected x, y, label.")
    unplaced = table[["x", "y"]].isna().any(axis=1)
    table = table[~unplaced & table["label"].notna()]
    key = pd.MultiIndex.from_arrays([table["x"].round().astype(np.int64), table["y"].round().astype(np.int64)])
    labels = pd.Series(table["label"].astype(str).to_numpy(), index=key)
    clashing = labels.groupby(level=[0, 1]).nunique() > 1
    if clashing.any():
        logger.warning(
            "her2st section %s: %d array positions carry conflicting labels; the first is kept.",
            name,
            int(clashing.sum()),
        )
    labels = labels[~labels.index.duplicated(keep="first")]
    grid = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    spot_key = pd.MultiIndex.from_arrays([spots[c].round().astype(np.int64) for c in grid])
    joined = labels.reindex(spot_key).to_numpy(dtype=object)
    if unplaced.any():
        logger.info("her2st section %s: %d label rows without coordinates ignored.", name, int(unplaced.sum()))
    found = pd.notna(joined)
    out[found] = joined[found]
    return out


def _find_image(root: Path, name: str) -> Path | None:
    folder = root / IMAGES_DIR / _patient(name) / name
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) > 1:
        raise InputError(
            f"her2st section {name}: several images in {str(folder)!r} ({[f.name for f in files]}). "
            f"Choose one with image_paths={{{name!r}: '<file>'}}."
        )
    return files[0].resolve() if files else None


def _patient(name: str) -> str:
    match = _PATIENT.match(name)
    return match.group(1) if match else name


def _warn_if_outside(coords: np.ndarray, size: tuple[int, int], name: str, file: Path) -> None:
    height, width = size
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        logger.warning(
            "her2st section %s: %d of %d spot centres lie outside its image %s (%d × %d px); the "
            "image may not be the one the spot file's pixel coordinates refer to.",
            name,
            int(outside.sum()),
            len(coords),
            file.name,
            height,
            width,
        )


def _union_genes(gene_lists: Sequence[Sequence[str]]) -> list[str]:
    return sorted(set().union(*gene_lists))


def _stack_counts(parts: Sequence[_Section], genes: Sequence[str]) -> sp.csr_matrix:
    """Stack per-section CSR tables (columns sorted by gene) onto the sorted union ``genes``."""
    union = pd.Index(genes)
    index_dtype = np.int32 if max(len(genes), sum(p.counts.nnz for p in parts)) < 2**31 else np.int64
    data, indices, indptr = [], [], [np.zeros(1, dtype=np.int64)]
    offset = 0
    for part in parts:
        counts = part.counts
        remap = union.get_indexer(part.genes).astype(index_dtype)
        data.append(counts.data.astype(np.float32, copy=False))
        indices.append(remap[counts.indices])  # monotone map: rows stay sorted
        indptr.append(counts.indptr[1:].astype(np.int64) + offset)
        offset += counts.nnz
    matrix = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr).astype(index_dtype)),
        shape=(sum(p.counts.shape[0] for p in parts), len(genes)),
    )
    matrix.has_sorted_indices = True
    return matrix
