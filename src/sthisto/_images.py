"""Access to each library's H&E image without loading whole slides into memory.

An :class:`ImageSource` reads rectangular regions of one image, in that image's pixel frame,
as ``(height, width, 3)`` uint8 arrays. Regions reaching past the border are padded and the
caller is told. Sources wrap an in-memory NumPy array, a lazy array (dask, zarr, SpatialData
multiscale level) or a file read on demand (TIFF through tifffile's zarr store, region by
region; JPEG/PNG decoded once on first use and cached, since these formats have no random
access).

:func:`image_source` finds the image of a library in the AnnData convention::

    uns["spatial"][library_id]["images"]["fullres"]  # NumPy or dask array, if held
    uns["spatial"][library_id]["metadata"]["image_path"]  # otherwise: a file read lazily
    uns["spatial"][library_id]["images"]["hires"]  # only when asked by image_key
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._constants import Images, Metadata, ScaleFactors, Uns
from ._errors import InputError, MissingKeyError, NoImageError
from ._validate import check_mapping, positive_number

PAD_VALUE = 255
"""Fill value for pixels outside the image: white, like the glass around tissue."""


TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ndpi", ".scn", ".bif")
"""TIFF containers read through tifffile (vendor formats get their scale from tiffslide, see ``io/_slides``)."""

_BLOCK = 64
"""Thumbnail pixels per side produced from one block of the full-resolution level."""


def check_image_array(array, *, what: str = "image") -> None:
    """Raise :class:`InputError` unless ``array`` is an RGB image sthisto can read.

    Accepted: ``(height, width, 3)`` with dtype uint8, or float in [0, 1] (scanpy's convention
    for ``hires``/``lowres`` images).
    """
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise InputError(
            f"{what} is a {type(array).__name__}, not an image array. Store a (height, width, 3) uint8 "
            f"NumPy array, e.g. np.asarray(img, dtype=np.uint8)."
        )
    shape = tuple(array.shape)
    if len(shape) == 2:
        raise InputError(
            f"{what} is grayscale with shape {shape}; sthisto needs RGB H&E. Convert it, e.g. "
            f"np.repeat(img[..., None], 3, axis=-1), if it really is a stained section."
        )
    if len(shape) != 3 or shape[-1] not in (3, 4):
        raise InputError(
            f"{what} has shape {shape}; expected (height, width, 3) RGB. If channels come first "
            f"(3, height, width), transpose it with img.transpose(1, 2, 0)."
        )
    if shape[-1] == 4:
        raise InputError(f"{what} has 4 channels (RGBA). Drop the alpha channel first: img[..., :3].")
    dtype = np.dtype(array.dtype)
    if dtype == np.uint8:
        return
    if np.issubdtype(dtype, np.floating):
        if isinstance(array, np.ndarray):  # lazy arrays are checked region by region as they are read
            check_float_pixels(array, what=what)
        return
    raise InputError(
        f"{what} has dtype {dtype}; sthisto reads 8-bit RGB. Rescale it to uint8, e.g. "
        f"(img / img.max() * 255).astype(np.uint8) for a {dtype} image."
    )


FLOAT_RANGE_TOLERANCE = 1e-3
"""Float pixels may exceed 1 by this much (resampling overshoot) before they count as 0–255 values."""


def check_float_pixels(values: np.ndarray, *, what: str = "image") -> None:
    """Refuse float pixels that are NaN/infinite or outside [0, 1] (e.g. a 0–255 image stored as float)."""
    if values.size == 0:
        return
    # Row blocks keep the temporary masks small on a whole-slide float array.
    step = max(1, (1 << 24) // max(1, values[0].size))
    not_finite, low, high = 0, np.inf, -np.inf
    for start in range(0, len(values), step):
        block = values[start : start + step]
        finite = np.isfinite(block)
        not_finite += int(block.size - np.count_nonzero(finite))
        if finite.any():
            kept = block[finite]
            low, high = min(low, float(kept.min())), max(high, float(kept.max()))
    if not_finite:
        raise InputError(
            f"{what} has {not_finite} NaN or infinite pixel values; features cut from them would be "
            f"garbage. Fill or mask them (e.g. np.nan_to_num(img, nan=1.0) for white) before calling sthisto."
        )
    if high > 1.0 + FLOAT_RANGE_TOLERANCE or low < -FLOAT_RANGE_TOLERANCE:
        raise InputError(
            f"{what} is a float image with values from {low:.4g} to {high:.4g}, outside [0, 1]: float images "
            f"are read as 0–1 (scanpy's convention). Convert a 0–255 image to uint8 first: img.astype(np.uint8), "
            f"or scale it: img / 255."
        )


def _to_uint8(region: np.ndarray) -> np.ndarray:
    if region.dtype == np.uint8:
        return region
    region = np.asarray(region)
    if np.issubdtype(region.dtype, np.floating):
        check_float_pixels(region, what="an image region")
    return np.clip(np.rint(np.asarray(region, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


class ImageSource:
    """Read regions of one RGB image, padding where the region leaves the image.

    Parameters
    ----------
    array
        Any array-like with ``shape == (height, width, 3)`` that supports slicing and
        ``np.asarray``: NumPy, dask, zarr.
    """

    def __init__(self, array) -> None:
        check_image_array(array)
        self._array = array

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self._array.shape[0]), int(self._array.shape[1])

    def read(self, y0: int, x0: int, height: int, width: int) -> tuple[np.ndarray, bool]:
        """Read ``[y0:y0+height, x0:x0+width]``.

        Returns
        -------
        region
            ``(height, width, 3)`` uint8, padded with :data:`PAD_VALUE` outside the image.
        clipped
            True if any part of the region lay outside the image.
        """
        img_h, img_w = self.shape
        ya, yb = max(y0, 0), min(y0 + height, img_h)
        xa, xb = max(x0, 0), min(x0 + width, img_w)
        clipped = (ya, yb, xa, xb) != (y0, y0 + height, x0, x0 + width)
        if not clipped:
            return _to_uint8(np.asarray(self._array[y0 : y0 + height, x0 : x0 + width, :3])), False
        out = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
        if ya < yb and xa < xb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = _to_uint8(np.asarray(self._array[ya:yb, xa:xb, :3]))
        return out, True

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """Return a downscaled copy (longest side ≤ ``max_side``) and its scale factor."""
        height, width = self.shape
        step = max(1, int(np.ceil(max(height, width) / max_side)))
        return _to_uint8(np.asarray(self._array[::step, ::step, :3])), 1.0 / step


@functools.lru_cache(maxsize=2)
def _decode_file(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E slides are legitimately huge
    with Image.open(path) as img:
        if img.mode != "RGB":
            raise InputError(
                f"image file {path} has PIL mode {img.mode!r}; sthisto reads 8-bit RGB. Convert it "
                f"(e.g. Image.open(path).convert('RGB').save(new_path)) and point to the new file."
            )
        return np.asarray(img)


def _open_tiff(path: str):
    """Open a (possibly pyramidal) TIFF's full-resolution level lazily as a zarr array."""
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, level=0)
    array = zarr.open(store, mode="r")
    if hasattr(array, "shape"):
        return array
    return array["0"]  # multiscale group: level 0 is full resolution


LAZY_TIFF_PREFIX = "sthisto-tiff-"
"""Name prefix of the dask views :func:`sthisto.io.read_image` makes of a TIFF's level 0."""


def _direct_tiff_level(array, path):
    """The zarr level 0 behind an untouched ``read_image`` dask view, else ``array`` itself.

    Same pixels; slicing zarr directly costs ~1 ms per patch where a dask slice costs 5–9 ms
    (graph construction). Any dask operation renames the array, so edited views are read as given.
    """
    name = getattr(array, "name", None)
    if not (isinstance(name, str) and name.startswith(LAZY_TIFF_PREFIX) and path and Path(path).exists()):
        return array
    try:
        level = _open_tiff(str(path))
    except Exception:
        return array
    return level if tuple(level.shape) == tuple(array.shape) and level.dtype == array.dtype else array


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding pixels."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].levels[0].shape
                axes = tif.series[0].levels[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # H&E slides are legitimately huge
        with Image.open(path) as img:
            width, height = img.size
        return int(height), int(width)
    except Exception as err:
        raise InputError(f"could not read the image file {str(path)!r}: {err}. Is it a valid JPEG/PNG/TIFF?") from err


def _block_reduce(level, step: int) -> np.ndarray:
    """Box average over ``step × step`` pixels, read one block of at most ``max(64·step, 1024)²`` pixels at a time."""
    height, width = int(level.shape[0]), int(level.shape[1])
    out_h, out_w = -(-height // step), -(-width // step)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    side = max(_BLOCK, -(-1024 // step)) * step
    for y0 in range(0, height, side):
        for x0 in range(0, width, side):
            block = np.asarray(level[y0 : y0 + side, x0 : x0 + side, :3], dtype=np.float32)
            bh, bw = block.shape[:2]
            oh, ow = -(-bh // step), -(-bw // step)
            if (oh * step, ow * step) != (bh, bw):  # image edge: repeat the last row/column
                block = np.pad(block, ((0, oh * step - bh), (0, ow * step - bw), (0, 0)), mode="edge")
            reduced = block.reshape(oh, step, ow, step, 3).mean(axis=(1, 3))
            out[y0 // step : y0 // step + oh, x0 // step : x0 // step + ow] = np.clip(np.rint(reduced), 0, 255)
    return out


def open_image_file(path: str | Path) -> ImageSource:
    """Open an image file for region reads; TIFFs stay lazy, JPEG/PNG decode once and are cached."""
    path = Path(path)
    if not path.exists():
        raise MissingKeyError(
            f"image file {str(path)!r} does not exist. If the data moved, update "
            f"uns['spatial'][library_id]['metadata']['image_path'] to its new location."
        )
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return ImageSource(_open_tiff(str(path)))
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"could not read {str(path)!r} as a TIFF image: {err}") from err
    try:
        return ImageSource(_decode_file(str(path.resolve())))
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"could not read {str(path)!r} as an image: {err}") from err


@dataclass(frozen=True)
class LibraryImage:
    """A library's image together with its geometry.

    Attributes
    ----------
    source
        Region reader in the image's own pixel frame.
    scale
        Image pixels per full-resolution pixel (1 for the full-resolution image; scanpy's
        ``tissue_hires_scalef`` for ``hires``).
    microns_per_pixel
        µm per *image* pixel.
    """

    source: ImageSource
    scale: float
    microns_per_pixel: float


def library_spatial(adata, library_id: str) -> dict:
    """Return ``adata.uns['spatial'][library_id]`` or raise a clear error."""
    spatial = adata.uns.get(Uns.SPATIAL)
    if Uns.SPATIAL in adata.uns:
        check_mapping(
            spatial,
            what="adata.uns['spatial']",
            fix="It must map each library id to a dict with 'images', 'scalefactors' and 'metadata'.",
        )
    if spatial is None:
        raise MissingKeyError(
            "adata.uns['spatial'] is missing: sthisto finds images and scale factors there. "
            "Read the data with a sthisto.io reader, or add uns['spatial'][library_id] with "
            "'images' and 'scalefactors' (including 'microns_per_pixel')."
        )
    if library_id not in spatial:
        raise MissingKeyError(
            f"adata.uns['spatial'] has no entry for library {library_id!r} (it has "
            f"{sorted(spatial)}). Check obs['library_id'] or add the library's images."
        )
    entry = check_mapping(
        spatial[library_id],
        what=f"adata.uns['spatial'][{library_id!r}]",
        fix="It must be a dict with 'images', 'scalefactors' (including 'microns_per_pixel') and 'metadata'.",
    )
    for part in (Uns.IMAGES, Uns.SCALEFACTORS, Uns.METADATA):
        if entry.get(part) is not None:
            check_mapping(
                entry[part],
                what=f"adata.uns['spatial'][{library_id!r}][{part!r}]",
                fix="Store a dict there (e.g. {} when empty), as the sthisto and scanpy readers do.",
            )
    return entry


def _part(entry: dict, part: str) -> dict:
    return entry.get(part) or {}


def microns_per_pixel(adata, library_id: str) -> float:
    """µm per full-resolution pixel of a library, from its scale factors."""
    scalefactors = _part(library_spatial(adata, library_id), Uns.SCALEFACTORS)
    value = scalefactors.get(ScaleFactors.MICRONS_PER_PIXEL)
    fix = (
        f"sthisto readers add it; for your own data set it from the scanner's metadata, e.g. "
        f"adata.uns['spatial'][{library_id!r}]['scalefactors']['microns_per_pixel'] = 0.5."
    )
    if value is None:
        raise MissingKeyError(f"library {library_id!r} has no scalefactors['microns_per_pixel']. {fix}")
    return positive_number(
        value, what=f"scalefactors['microns_per_pixel'] of library {library_id!r}", fix=f"Note: {fix}"
    )


def has_image(adata, library_id: str) -> bool:
    """Whether a library carries (or points to) an image usable for patches."""
    spatial = adata.uns.get(Uns.SPATIAL)
    if Uns.SPATIAL not in adata.uns or (isinstance(spatial, Mapping) and library_id not in spatial):
        return False
    entry = library_spatial(adata, library_id)  # refuses malformed entries with a clear message
    flag = _part(entry, Uns.METADATA).get(Metadata.HAS_IMAGE)
    if flag is not None:
        return bool(flag)
    images = _part(entry, Uns.IMAGES)
    return bool(images) or Metadata.IMAGE_PATH in _part(entry, Uns.METADATA)


def image_source(adata, library_id: str, *, image_key: str | None = None) -> LibraryImage:
    """Find the image of ``library_id``.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial convention.
    library_id
        The library (section).
    image_key
        ``None`` uses the full-resolution image (held ``fullres`` array, else the file at
        ``metadata['image_path']``). Any other key (``"hires"``, or one written by
        :func:`sthisto.pp.stain_normalize`) uses that image with its scale factor.

    Returns
    -------
    The :class:`LibraryImage`.
    """
    entry = library_spatial(adata, library_id)
    mpp = microns_per_pixel(adata, library_id)
    images = _part(entry, Uns.IMAGES)
    metadata = _part(entry, Uns.METADATA)
    scalefactors = _part(entry, Uns.SCALEFACTORS)
    if metadata.get(Metadata.HAS_IMAGE) is False:
        raise NoImageError(
            f"library {library_id!r} has no H&E image (loaded as expression-only data), so no "
            f"patches or image features can be made for it. Restrict the call to libraries with "
            f"images, e.g. adata[adata.obs['library_id'] != {library_id!r}]."
        )
    key = image_key or Images.FULLRES
    if key in images:
        array = images[key]
        check_image_array(array, what=f"uns['spatial'][{library_id!r}]['images'][{key!r}]")
        scale = 1.0 if key == Images.FULLRES else scalefactors.get(ScaleFactors.for_image(key))
        if scale is None:
            raise MissingKeyError(
                f"image {key!r} of library {library_id!r} has no scale factor "
                f"{ScaleFactors.for_image(key)!r} in uns['spatial'][{library_id!r}]['scalefactors']; "
                f"add it (image pixels per full-resolution pixel)."
            )
        scale = positive_number(
            scale,
            what=f"scale factor {ScaleFactors.for_image(key)!r} of library {library_id!r}",
            fix="It is image pixels per full-resolution pixel (e.g. 0.08 for a Visium hires image); fix the scalefactors.",
        )
        if key == Images.FULLRES:
            array = _direct_tiff_level(array, metadata.get(Metadata.IMAGE_PATH))
        return LibraryImage(ImageSource(array), scale, mpp / scale)
    if image_key is None and Metadata.IMAGE_PATH in metadata:
        return LibraryImage(open_image_file(metadata[Metadata.IMAGE_PATH]), 1.0, mpp)
    raise NoImageError(
        f"library {library_id!r} has no image under key {key!r} (available: {sorted(images)}"
        + (", plus the file in metadata['image_path']" if Metadata.IMAGE_PATH in metadata else "")
        + "). Pass image_key= one of those, or attach the full-resolution image."
    )
