"""``sthisto.io.read_image``: an H&E slide without spatial transcriptomics, read lazily.

The result is the AnnData convention with no spots: ``uns['spatial'][library_id]`` holds the
image (a lazy dask view of a TIFF's full-resolution level, or the path of a JPEG/PNG), small
plotting images cut from a pyramid level (or a decimated read streamed block by block) and
the physical scale. :func:`sthisto.pp.tissue_mask` and :func:`sthisto.pp.tile` then place
pseudo-spots on it, and :func:`sthisto.tl.predict` predicts expression there.

Never is a whole slide decoded at full resolution: TIFF pixels are reached through
tifffile's zarr store, tile by tile; thumbnails come from the smallest pyramid level large
enough, or from a block-wise box average of level 0 whose memory is bounded by one block.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import record
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError
from .._images import _block_reduce
from .._logging import logger
from ._common import HIRES_MAX_SIDE, TIFF_SUFFIXES, image_size, thumbnail
from ._slides import check_supported, vendor_mpp

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData
    from spatialdata import SpatialData

LOWRES_MAX_SIDE = 600
"""Longest side of ``images['lowres']`` (scanpy's lowres size)."""
PLAUSIBLE_MPP = (0.01, 50.0)
"""µm/px read from file metadata outside this range is ignored: 72/96/300 dpi defaults of
image software (350, 265, 85 µm/px) are not microscope resolutions."""
SOURCE = "sthisto.io.read_image"
_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def read_image(
    path: str | PathLike[str],
    *,
    microns_per_pixel: float | None = None,
    library_id: str | None = None,
    lazy_fullres: bool = True,
    as_spatialdata: bool = False,
) -> AnnData | SpatialData:
    """Read an H&E image (JPEG, PNG, TIFF, pyramidal/OME-TIFF, SVS, NDPI, SCN, BIF) lazily, without spots.

    Parameters
    ----------
    path
        The image file. Vendor slides (Aperio ``.svs``, Hamamatsu ``.ndpi``, Leica ``.scn``,
        Ventana ``.bif``) take their scale from the optional reader tiffslide
        (``pip install 'sthisto[slides]'``; ``.svs`` also works without it); their pixels, like
        any TIFF's, are read lazily through tifffile. MRXS / VMS / VSI are not TIFFs: a clear
        error says how to convert them to OME-TIFF.
    microns_per_pixel
        Physical size of a full-resolution pixel. Default: from the file — the vendor's
        metadata via tiffslide, OME-XML ``PhysicalSizeX``, Aperio's ``MPP``, TIFF resolution
        tags, JPEG/PNG density — when the
        value is a plausible microscope resolution (0.01–50 µm/px; software defaults such as
        72 dpi are ignored). Without either, a clear error asks for it.
    library_id
        Name of the section; default: the file name without suffix.
    lazy_fullres
        TIFF only: also hold ``images['fullres']``, a lazy dask array of level 0. The file path
        is stored either way and suffices for every sthisto function; dask arrays in ``uns``
        are computed by ``write_h5ad``, so pass ``False`` (or delete the entry) before writing
        a whole-slide object to disk.
    as_spatialdata
        Return a :class:`spatialdata.SpatialData` (the image, lazy, and the plotting images,
        in the coordinate system ``library_id``) instead of an AnnData.

    Returns
    -------
    An AnnData with 0 spots and 0 genes (or a SpatialData with ``as_spatialdata=True``):

    ``obs['library_id']``
        Empty categorical with the one category ``library_id``.
    ``obsm['spatial']``
        ``(0, 2)``.
    ``uns['spatial'][library_id]['images']``
        ``fullres`` (TIFF, with ``lazy_fullres``): lazy dask ``(height, width, 3)`` uint8;
        ``hires`` (longest side ≤ 2000 px) and ``lowres`` (≤ 600 px) uint8 thumbnails.
    ``uns['spatial'][library_id]['scalefactors']``
        ``microns_per_pixel``, ``tissue_hires_scalef``, ``tissue_lowres_scalef``.
    ``uns['spatial'][library_id]['metadata']``
        ``image_path`` (absolute), ``has_image`` (True), ``source``, ``pyramid_levels``
        (``[[height, width], ...]``, level 0 first) and ``microns_per_pixel_source``.
    ``uns['sthisto']['read_image'][library_id]``
        The call's parameters and where the scale came from.

    Examples
    --------
    >>> slide = sthisto.io.read_image("slide.ome.tif")
    >>> sthisto.pp.tissue_mask(slide)
    >>> spots = sthisto.pp.tile(slide, spacing_um=100, diameter_um=55)
    >>> predicted = sthisto.tl.predict(spots, "model_folder", copy=True)
    """
    import anndata as ad

    path = Path(path).expanduser()
    if microns_per_pixel is not None:
        microns_per_pixel = _check_mpp(microns_per_pixel)
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"{str(path)!r} is a folder; pass the image file itself.")
    library_id = path.name.split(".")[0] if library_id is None else str(library_id)
    if not library_id:
        raise InputError("library_id must be a non-empty string.")

    check_supported(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        slide = _TiffSlide.open(path)
    else:
        slide = _FlatSlide.open(path)
    mpp, mpp_source = (microns_per_pixel, "argument") if microns_per_pixel is not None else slide.file_mpp()
    if mpp is None:
        raise InputError(
            f"the physical scale of {path.name!r} is unknown: its metadata give no plausible µm per pixel "
            f"({slide.mpp_note}). Pass microns_per_pixel= from the scanner's specification (e.g. 0.25 at 40x, "
            f"0.5 at 20x)."
        )

    hires, hires_scale = slide.thumbnail(HIRES_MAX_SIDE)
    lowres, lowres_scale = _reduce(hires, hires_scale, LOWRES_MAX_SIDE)
    images = {Images.HIRES: hires, Images.LOWRES: lowres}
    if lazy_fullres:
        full = slide.lazy_array()
        if full is not None:
            images[Images.FULLRES] = full
    entry = {
        Uns.IMAGES: images,
        Uns.SCALEFACTORS: {
            ScaleFactors.MICRONS_PER_PIXEL: float(mpp),
            ScaleFactors.HIRES: float(hires_scale),
            ScaleFactors.LOWRES: float(lowres_scale),
        },
        Uns.METADATA: {
            Metadata.IMAGE_PATH: str(path.resolve()),
            Metadata.HAS_IMAGE: True,
            Metadata.SOURCE: SOURCE,
            Metadata.PYRAMID_LEVELS: np.asarray(slide.levels, dtype=np.int64),
            "microns_per_pixel_source": mpp_source,
        },
    }
    obs = pd.DataFrame({Obs.LIBRARY_ID: pd.Categorical([], categories=[library_id])}, index=pd.Index([], dtype=str))
    adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    adata.obsm[Obsm.SPATIAL] = np.zeros((0, 2), dtype=np.float64)
    adata.uns[Uns.SPATIAL] = {library_id: entry}
    height, width = slide.levels[0]
    record(
        adata,
        "read_image",
        library_id,
        {
            "path": str(path.resolve()),
            "format": slide.format,
            "shape": [height, width],
            "n_levels": len(slide.levels),
            "microns_per_pixel": float(mpp),
            "microns_per_pixel_source": mpp_source,
            "lazy_fullres": bool(lazy_fullres),
        },
    )
    logger.info(
        "read %s: %d × %d px at %.4g µm/px (%s), %d pyramid level(s)",
        path.name,
        height,
        width,
        mpp,
        mpp_source,
        len(slide.levels),
    )
    if as_spatialdata:
        return _as_spatialdata(adata, library_id)
    return adata


def _check_mpp(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"microns_per_pixel={value!r} must be a positive number (e.g. 0.5).")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"microns_per_pixel={value!r} must be positive and finite (µm per full-resolution pixel).")
    return float(value)


def _plausible(mpp) -> float | None:
    if mpp is None or not np.isfinite(mpp):
        return None
    low, high = PLAUSIBLE_MPP
    return float(mpp) if low <= mpp <= high else None


def _reduce(image: np.ndarray, scale: float, max_side: int) -> tuple[np.ndarray, float]:
    """Box-reduce by an integer factor so the longest side is at most ``max_side``."""
    from PIL import Image

    factor = max(1, math.ceil(max(image.shape[:2]) / max_side))
    if factor == 1:
        return image.copy(), scale
    return np.asarray(Image.fromarray(image).reduce(factor)), scale / factor


class _FlatSlide:
    """A JPEG/PNG (or other PIL format): no random access, so only header and thumbnail here."""

    format = "pil"

    def __init__(self, path: Path, size: tuple[int, int], dpi) -> None:
        self.path = path
        self.levels = [size]
        self.dpi = dpi
        self.mpp_note = "no usable resolution in the header"

    @classmethod
    def open(cls, path: Path) -> _FlatSlide:
        from PIL import Image

        size = image_size(path)  # raises a clear InputError on unreadable files
        try:
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as img:
                mode, dpi, fmt = img.mode, img.info.get("dpi"), img.format
        except Exception as err:  # pragma: no cover - image_size already opened it
            raise InputError(f"could not read {str(path)!r} as an image: {err}") from err
        if mode not in ("RGB", "RGBA", "P", "YCbCr", "CMYK"):
            raise InputError(
                f"{path.name!r} has PIL mode {mode!r}; sthisto reads RGB H&E images. Convert it, e.g. "
                f"Image.open(path).convert('RGB').save(new_path), and read the new file."
            )
        slide = cls(path, size, dpi)
        slide.format = str(fmt or "pil").lower()
        return slide

    def file_mpp(self) -> tuple[float | None, str | None]:
        if self.dpi:
            try:
                dpi = float(self.dpi[0])
            except (TypeError, ValueError, IndexError):
                dpi = 0.0
            if dpi > 0:
                mpp = _plausible(25400.0 / dpi)
                if mpp is not None:
                    return mpp, "file resolution (dpi)"
                self.mpp_note = f"the header says {dpi:g} dpi, i.e. {25400.0 / dpi:.4g} µm/px, not a microscope scale"
        return None, None

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        return thumbnail(self.path, max_side)

    def lazy_array(self):
        return None  # JPEG/PNG: patches decode the file through metadata['image_path']


class _TiffSlide:
    """A (possibly pyramidal, OME or SVS) TIFF read through tifffile's zarr store."""

    format = "tiff"

    def __init__(self, path: Path, levels, axes: str, mpp_candidates, note: str) -> None:
        self.path = path
        self.levels = levels
        self.axes = axes
        self.mpp_candidates = mpp_candidates
        self.mpp_note = note

    @classmethod
    def open(cls, path: Path) -> _TiffSlide:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes = series.levels[0].axes
                dtype = np.dtype(series.levels[0].dtype)
                levels = [_yx(level.shape, level.axes) for level in series.levels]
                channels = _channels(series.levels[0].shape, axes)
                candidates, note = _tiff_mpp(tif)
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"could not read {str(path)!r} as a TIFF image: {err}. Is the file complete and a TIFF?"
            ) from err
        if channels not in (3, 4):
            raise InputError(
                f"{path.name!r} has {channels} channel(s) (axes {axes!r}); sthisto needs an RGB H&E image. "
                f"Multiplexed or grayscale images are not H&E."
            )
        if dtype != np.uint8:
            raise InputError(
                f"{path.name!r} stores {dtype} pixels; sthisto reads 8-bit RGB H&E. Convert it to uint8 first."
            )
        # Vendor metadata parsed by tiffslide come first: they are the scanner's own statement.
        from_vendor, vendor_note = vendor_mpp(path)
        note = "; ".join(n for n in (vendor_note, note) if n)
        return cls(path, levels, axes, from_vendor + candidates, note)

    def file_mpp(self) -> tuple[float | None, str | None]:
        for value, source in self.mpp_candidates:
            mpp = _plausible(value)
            if mpp is not None:
                return mpp, source
        return None, None

    def _level_zarr(self, level: int):
        import tifffile
        import zarr

        store = tifffile.imread(str(self.path), aszarr=True, level=level)
        array = zarr.open(store, mode="r")
        return array if hasattr(array, "shape") else array["0"]

    def _level_array(self, level: int):
        """Lazy ``(height, width, channels)`` dask array of a pyramid level."""
        import dask.array as da

        array = self._level_zarr(level)
        from dask.base import tokenize

        from .._images import LAZY_TIFF_PREFIX

        stat = self.path.stat()
        data = da.from_zarr(array, name=f"{LAZY_TIFF_PREFIX}{tokenize(str(self.path), stat.st_mtime_ns, level)}")
        axes = self.axes
        order = [axes.index("Y"), axes.index("X"), axes.index("S") if "S" in axes else axes.index("C")]
        squeeze = tuple(i for i, a in enumerate(axes) if i not in order)
        if squeeze:  # e.g. a leading T or Z axis of length 1
            data = data[tuple(0 if i in squeeze else slice(None) for i in range(len(axes)))]
            kept = [a for i, a in enumerate(axes) if i not in squeeze]
            order = [kept.index("Y"), kept.index("X"), kept.index("S") if "S" in kept else kept.index("C")]
        if order != [0, 1, 2]:
            data = data.transpose(order)
        return data if data.shape[-1] == 3 else data[..., :3]

    def lazy_array(self):
        return self._level_array(0)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """Smallest level whose longest side still reaches ``max_side``, box-reduced block by block."""
        full_width = self.levels[0][1]
        chosen = 0
        for index, (height, width) in enumerate(self.levels):
            if max(height, width) >= max_side:
                chosen = index
        # Interleaved RGB levels are read straight from zarr: same pixels, no dask graph per block.
        level = self._level_zarr(chosen) if self.axes == "YXS" else self._level_array(chosen)
        height, width = self.levels[chosen]
        step = max(1, math.ceil(max(height, width) / max_side))
        small = _block_reduce(level, step)
        return small, (width / full_width) / step


def _yx(shape, axes: str) -> tuple[int, int]:
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _channels(shape, axes: str) -> int:
    for axis in ("S", "C"):
        if axis in axes:
            return int(shape[axes.index(axis)])
    return 1


def _tiff_mpp(tif) -> tuple[list[tuple[float, str]], str]:
    """Candidate µm/px values from OME-XML, Aperio description and resolution tags, best first."""
    candidates: list[tuple[float, str]] = []
    notes = []
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r"<Pixels\b[^>]*>", tif.ome_metadata)
        if match:
            tag = match.group(0)
            size = re.search(r'PhysicalSizeX="([^"]+)"', tag)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tag)
            if size:
                factor = _UNIT_TO_UM.get(unit.group(1) if unit else "µm")
                if factor is not None:
                    candidates.append((float(size.group(1)) * factor, "OME-XML PhysicalSizeX"))
        if not candidates:
            notes.append("OME-XML without PhysicalSizeX")
    page = tif.pages[0]
    description = page.description or ""
    aperio = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if aperio:
        candidates.append((float(aperio.group(1)), "Aperio MPP"))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        numerator, denominator = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = numerator / denominator if denominator else 0.0
        per_um = {2: 1 / 25400.0, 3: 1 / 10000.0}.get(unit)
        if per_unit > 0 and per_um is not None:
            value = 1.0 / (per_unit * per_um)
            candidates.append((value, "TIFF resolution tags"))
            if _plausible(value) is None:
                notes.append(f"resolution tags say {value:.4g} µm/px, not a microscope scale")
        else:
            notes.append("resolution tags without a physical unit")
    else:
        notes.append("no resolution tags")
    return candidates, "; ".join(notes) or "no scale in the metadata"


def _as_spatialdata(adata, library_id: str):
    import spatialdata as sd
    from spatialdata.models import TableModel

    from ._spatialdata import _ELEMENT_NAME, _image_elements

    element = _ELEMENT_NAME.sub("_", library_id)
    entry = adata.uns[Uns.SPATIAL][library_id]
    images = _image_elements(entry, element, library_id)
    table = adata.copy()
    table.uns[Uns.SPATIAL] = {
        library_id: {Uns.SCALEFACTORS: dict(entry[Uns.SCALEFACTORS]), Uns.METADATA: dict(entry[Uns.METADATA])}
    }
    return sd.SpatialData(images=images, tables={"table": TableModel.parse(table)})


def _write_pyramidal_tiff(
    path,
    shape: tuple[int, int],
    draw,
    *,
    microns_per_pixel: float,
    n_levels: int = 3,
    tile: int = 256,
    ome: bool = True,
) -> Path:
    """Write a tiled pyramidal RGB TIFF tile row by tile row, never holding a whole level.

    ``draw(origin, shape, microns_per_pixel)`` returns the ``(height, width, 3)`` uint8 pixels
    of the region whose top-left pixel is ``origin`` (row, column) on the level drawn at
    ``microns_per_pixel`` (level ``k`` at ``2**k`` times the base value), e.g. a partial
    :func:`sthisto.datasets.synthetic_he_image`. Level ``k`` is drawn at its own resolution
    rather than downsampled, which is how a scanner-independent synthetic pyramid is made.
    Used by the tests and benchmarks to make whole slides of any size in bounded memory.
    """
    import tifffile

    path = Path(path)
    height, width = int(shape[0]), int(shape[1])

    def tiles(level: int):
        factor = 2**level
        level_h, level_w = -(-height // factor), -(-width // factor)
        mpp = microns_per_pixel * factor
        for y0 in range(0, level_h, tile):
            band_h = min(tile, level_h - y0)
            band = draw((y0, 0), (band_h, level_w), mpp)
            for x0 in range(0, level_w, tile):
                block = np.full((tile, tile, 3), 255, dtype=np.uint8)
                piece = band[:, x0 : x0 + tile]
                block[: piece.shape[0], : piece.shape[1]] = piece
                yield block

    common = {"photometric": "rgb", "tile": (tile, tile), "dtype": np.uint8, "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tif:
        metadata = {"axes": "YXS", "PhysicalSizeX": microns_per_pixel, "PhysicalSizeY": microns_per_pixel}
        tif.write(
            tiles(0),
            shape=(height, width, 3),
            subifds=n_levels - 1,
            resolution=(1e4 / microns_per_pixel, 1e4 / microns_per_pixel),
            metadata=metadata if ome else None,
            **common,
        )
        for level in range(1, n_levels):
            factor = 2**level
            tif.write(
                tiles(level),
                shape=(-(-height // factor), -(-width // factor), 3),
                subfiletype=1,
                resolution=(1e4 / (microns_per_pixel * factor), 1e4 / (microns_per_pixel * factor)),
                **common,
            )
    return path
