"""``sthisto.pp.tissue_mask``: where the tissue is on a slide, at low resolution.

H&E tissue is stained (pink to purple, saturated colours) while glass is white or light grey
(unsaturated). The mask thresholds each pixel's saturation (HSV) — or its optical density
with ``method="od"`` — at Otsu's threshold on a thumbnail, never below a floor that glass does
not reach (so a slide without tissue gives an empty mask rather than one made of noise), and
cleans the result with scikit-image morphology: closing, small holes filled, small objects
removed. Sizes are physical (µm²), so the same call suits any thumbnail resolution.

squidpy's ``squidpy.im.segment`` works on an in-memory ``ImageContainer`` of the image it
segments (cells, not tissue); the low-resolution thumbnail here is small anyway, so the
thresholding is done directly with scikit-image.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

from .._anndata import check_record_writable, maybe_copy, record
from .._constants import Images, Metadata, ScaleFactors, Uns
from .._errors import InputError, KeyExistsError, MissingKeyError
from .._images import library_spatial, microns_per_pixel
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData

FUNCTION = "tissue_mask"
METHODS = ("otsu", "od")
MIN_SATURATION = 0.05
"""Saturation floor of tissue: clean glass stays below it (synthetic glass: 0.016)."""
MIN_OPTICAL_DENSITY = 0.15
"""Optical-density floor (sum over RGB) of tissue for ``method="od"``."""
MAX_MASK_SIDE = 2000
"""Longest side of the image the mask is computed on when it is read from the slide."""
MASK_MICRONS_PER_PIXEL = 8.0
"""Masks are computed at about this resolution (or the image's, if coarser)."""
_DARK = 0.15
"""Pixels whose brightest channel is below this (0–1) are pen marks, dust or scanner border."""


@checked_input
def tissue_mask(
    adata: AnnData,
    *,
    library_id: str | None = None,
    level: str | int | None = None,
    method: str = "otsu",
    key_added: str = Images.TISSUE_MASK,
    closing_um: float = 20.0,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 100_000.0,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Detect the tissue of each slide on a low-resolution image.

    Parameters
    ----------
    adata
        AnnData with images in ``uns['spatial']`` (e.g. from :func:`sthisto.io.read_image`,
        a reader or :func:`sthisto.datasets.synthetic`); may have no spots.
    library_id
        Library to process; default: every library with an image.
    level
        Image to threshold: a key of ``uns['spatial'][library_id]['images']`` (``"hires"``,
        ``"lowres"``), an integer pyramid level of the library's TIFF
        (``metadata['pyramid_levels']``), or ``None``: ``hires``, else ``lowres``, else a
        block-averaged read of the full-resolution image (longest side ≤ 2000 px).
    method
        ``"otsu"``: Otsu's threshold on HSV saturation (default; robust to grey dust and
        shadows); ``"od"``: Otsu's threshold on optical density summed over RGB.
    key_added
        Image key of the mask.
    closing_um
        Radius of the morphological closing that joins fragments of one piece of tissue.
    min_object_um2
        Connected pieces smaller than this are dropped (dust, debris).
    min_hole_um2
        Holes smaller than this inside tissue are filled (vessel lumens, fat cells).
    overwrite
        Replace an existing mask under ``key_added``.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None`` (or the copy). Writes, per library:

    ``uns['spatial'][library_id]['images'][key_added]``
        2-D bool mask (True = tissue) in the frame of the thresholded image.
    ``uns['spatial'][library_id]['scalefactors'][f'tissue_{key_added}_scalef']``
        Mask pixels per full-resolution pixel.
    ``uns['sthisto']['tissue_mask'][key_added]``
        Per library: image used, threshold, tissue fraction; and the parameters.

    A library without tissue gets an empty mask and a warning; :func:`sthisto.pp.tile` then
    refuses it with a clear error.

    Examples
    --------
    >>> slide = sthisto.io.read_image("slide.tif")
    >>> sthisto.pp.tissue_mask(slide)
    >>> slide.uns["spatial"]["slide"]["images"]["tissue_mask"].mean()  # share of the thumbnail on tissue
    """
    if method not in METHODS:
        raise InputError(f"method={method!r} is not known; use one of {list(METHODS)}.")
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added={key_added!r} must be a non-empty string.")
    if key_added in (Images.FULLRES, Images.HIRES, Images.LOWRES):
        raise InputError(f"key_added={key_added!r} would replace an image; choose another key (e.g. 'tissue_mask').")
    for name, value in (("closing_um", closing_um), ("min_object_um2", min_object_um2), ("min_hole_um2", min_hole_um2)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value >= 0:
            raise InputError(f"{name}={value!r} must be a number >= 0.")
    libraries = image_libraries(adata, library_id)
    for library in libraries:
        images = library_spatial(adata, library).get(Uns.IMAGES, {})
        if key_added in images and not overwrite:
            raise KeyExistsError(
                f"uns['spatial'][{library!r}]['images'][{key_added!r}] already exists. Pass overwrite=True to "
                f"replace it, or key_added='<new name>' to keep both."
            )
        microns_per_pixel(adata, library)
    check_record_writable(adata, FUNCTION, key_added, overwrite=overwrite)

    results = {}
    for library in libraries:
        image, scale, used = low_resolution_image(adata, library, level)
        mask, threshold, factor = compute_mask(
            image,
            microns_per_pixel=microns_per_pixel(adata, library) / scale,
            method=method,
            closing_um=float(closing_um),
            min_object_um2=float(min_object_um2),
            min_hole_um2=float(min_hole_um2),
        )
        results[library] = (mask, scale / factor, used if factor == 1 else f"{used}/{factor}", threshold)

    target = maybe_copy(adata, copy)
    summary = {}
    for library, (mask, scale, used, threshold) in results.items():
        entry = target.uns[Uns.SPATIAL][library]
        entry.setdefault(Uns.IMAGES, {})[key_added] = mask
        entry.setdefault(Uns.SCALEFACTORS, {})[ScaleFactors.for_image(key_added)] = float(scale)
        fraction = float(mask.mean()) if mask.size else 0.0
        summary[library] = {"image": used, "threshold": threshold, "tissue_fraction": fraction}
        logger.info(
            "added uns['spatial'][%r]['images'][%r]: %.1f%% of the %s image is tissue",
            library,
            key_added,
            100 * fraction,
            used,
        )
        if not mask.any():
            logger.warning(
                "no tissue found on library %r (method=%r, threshold %.3g); check the image, or try "
                "method='od' or another level.",
                library,
                method,
                threshold,
            )
    record(
        target,
        FUNCTION,
        key_added,
        {
            "method": method,
            "level": level if level is not None else "auto",
            "closing_um": float(closing_um),
            "min_object_um2": float(min_object_um2),
            "min_hole_um2": float(min_hole_um2),
            "libraries": summary,
        },
        overwrite=overwrite,
    )
    return target if copy else None


def image_libraries(adata, library_id: str | None) -> list[str]:
    """Libraries with an image: the one asked for, or all of ``uns['spatial']``'s."""
    spatial = adata.uns.get(Uns.SPATIAL)
    if not spatial:
        raise MissingKeyError(
            "adata.uns['spatial'] is missing or empty: no image to work on. Read the slide with "
            "sthisto.io.read_image(path) or a sthisto.io reader."
        )
    if library_id is not None:
        library_id = str(library_id)
        if library_id not in spatial:
            raise MissingKeyError(f"library_id={library_id!r} is not in uns['spatial'] ({sorted(spatial)}).")
        chosen = [library_id]
    else:
        chosen = [str(lib) for lib in spatial]
    with_image = [lib for lib in chosen if spatial[lib].get(Uns.METADATA, {}).get(Metadata.HAS_IMAGE) is not False]
    if not with_image:
        raise InputError(f"libraries {chosen} have no H&E image (expression-only); nothing to detect tissue on.")
    return with_image


def low_resolution_image(adata, library: str, level) -> tuple[np.ndarray, float, str]:
    """``(RGB uint8 image, its pixels per full-resolution pixel, description)`` to threshold."""
    entry = library_spatial(adata, library)
    images = entry.get(Uns.IMAGES, {})
    scalefactors = entry.get(Uns.SCALEFACTORS, {})
    metadata = entry.get(Uns.METADATA, {})
    if isinstance(level, (int, np.integer)) and not isinstance(level, bool):
        return _pyramid_level(metadata, int(level), library)
    if level is not None and not isinstance(level, str):
        raise InputError(f"level={level!r} must be an image key, a pyramid level number, or None.")
    keys = [level] if level is not None else [Images.HIRES, Images.LOWRES]
    for key in keys:
        if key in images and key != Images.FULLRES:
            scale = scalefactors.get(ScaleFactors.for_image(key))
            if scale is None:
                raise MissingKeyError(
                    f"image {key!r} of library {library!r} has no scale factor {ScaleFactors.for_image(key)!r}."
                )
            return _rgb_uint8(images[key], f"images[{key!r}]"), float(scale), key
    if level is not None and level != Images.FULLRES:
        raise MissingKeyError(
            f"library {library!r} has no image {level!r} (it has {sorted(images)}); pass level=None or one of those."
        )
    from .._images import _block_reduce, image_source

    source = image_source(adata, library)
    height, width = source.source.shape
    step = max(1, math.ceil(max(height, width) / MAX_MASK_SIDE))
    return _block_reduce(source.source._array, step), 1.0 / step, f"fullres/{step}"


def _pyramid_level(metadata: dict, level: int, library: str) -> tuple[np.ndarray, float, str]:
    from .._images import _block_reduce
    from ..io._image import _TiffSlide

    path = metadata.get(Metadata.IMAGE_PATH)
    levels = metadata.get(Metadata.PYRAMID_LEVELS)
    if path is None or levels is None:
        raise InputError(
            f"level={level} needs a pyramidal TIFF read by sthisto.io.read_image; library {library!r} has none. "
            f"Pass an image key (e.g. 'hires') or None."
        )
    levels = np.asarray(levels)
    if not 0 <= level < len(levels):
        raise InputError(f"level={level} does not exist: library {library!r} has levels 0 … {len(levels) - 1}.")
    from pathlib import Path

    slide = _TiffSlide.open(Path(path))
    array = slide._level_array(level)
    height, width = int(levels[level][0]), int(levels[level][1])
    step = max(1, math.ceil(max(height, width) / MAX_MASK_SIDE))
    return _block_reduce(array, step), (width / int(levels[0][1])) / step, f"level {level}"


def _rgb_uint8(image, what: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] < 3:
        raise InputError(f"{what} has shape {array.shape}; tissue detection needs an RGB image.")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array


TISSUE_RULES = {
    "saturation": "HSV saturation above Otsu's threshold, at least MIN_SATURATION; dark pixels excluded "
    "(pp.tissue_mask, method='otsu')",
    "od_sum": "optical density -ln(I/255) summed over R, G, B above Otsu's threshold, at least "
    "MIN_OPTICAL_DENSITY; dark pixels excluded (pp.tissue_mask, method='od')",
    "od_every_channel": "-ln(I/255) above the threshold (default 0.15, Macenko's beta) in every channel "
    "(stain normalisation: the pixels stains are fitted on)",
    "od10_any_channel": "-log10(I/255) above the threshold (default 0.15) in at least one channel "
    "(HistoSPACE's autoencoder tiles)",
}
"""Pixel rules of :func:`tissue_pixels`, by name; the description names their users."""
_RULE_OF_METHOD = {"otsu": "saturation", "od": "od_sum"}
_FIXED_DEFAULT = 0.15


def tissue_pixels(rgb: np.ndarray, *, rule: str, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Which pixels of an RGB image carry stain: the one definition behind every tissue mask in sthisto.

    Slide masks (:func:`tissue_mask`, :func:`sthisto.pp.tile`), stain normalisation
    (:func:`sthisto.pp.stain_normalize` fits on the pixels this calls tissue) and HistoSPACE's
    tile sampler all classify pixels here, each with its own rule:

    ``"saturation"``, ``"od_sum"``
        A slide's tissue against its glass: HSV saturation, or optical density ``-ln(I/255)``
        summed over the channels, above Otsu's threshold over the pixels that are not dark
        (brightest channel below 15 %: pen marks, dust, scanner border), never below a floor
        glass does not reach (:data:`MIN_SATURATION`, :data:`MIN_OPTICAL_DENSITY`), so a
        slide without tissue gives an empty mask.
    ``"od_every_channel"``
        Macenko et al. (2009)'s background cut: optical density ``-ln(I/255)`` above β = 0.15
        in every channel (intensities below 1 count as 1), the pixels the stain estimates use.
    ``"od10_any_channel"``
        HistoSPACE's tiles: ``-log10(I/255)`` above 0.15 in at least one channel, i.e. some
        channel darker than ≈ 181 / 255. The HistoSPACE paper states no tissue rule; this is
        sthisto's own, kept as it was when the three definitions were merged.

    Parameters
    ----------
    rgb
        ``(..., 3)`` image, uint8 or float on the 0–255 scale (extra channels are ignored).
    rule
        One of :data:`TISSUE_RULES`.
    threshold
        ``None``: the rule's own (Otsu with its floor; 0.15 for the optical-density cut-offs).
        A number replaces it: the saturation / summed density / per-channel density cut-off.

    Returns
    -------
    mask
        Boolean array of the image's leading shape.
    threshold
        The threshold applied; ``inf`` when an Otsu rule finds nothing above its floor.
    """
    if rule not in TISSUE_RULES:
        raise InputError(f"rule={rule!r} is not a tissue rule; use one of {sorted(TISSUE_RULES)}.")
    array = np.asarray(rgb)
    if array.ndim < 1 or array.shape[-1] < 3:
        raise InputError(f"the image has shape {array.shape}; tissue pixels need (..., 3) RGB values.")
    array = array[..., :3]
    # The fixed cut-offs are compared as given (not as float(...)): a NumPy scalar compares in its
    # own precision, exactly as the separate definitions these replace did.
    cut = _FIXED_DEFAULT if threshold is None else threshold
    if rule == "od_every_channel":
        if array.dtype == np.uint8:
            od = _ln_od_table()[array]
        else:
            od = -np.log(np.maximum(array.astype(np.float32), np.float32(1.0)) * np.float32(1.0 / 255.0))
        return (od[..., 0] > cut) & (od[..., 1] > cut) & (od[..., 2] > cut), float(cut)
    if rule == "od10_any_channel":
        # OD > t  ⇔  I < 255 · 10^(−t): compare intensities, no logarithm per pixel.
        return (array.min(axis=-1).astype(np.float32) < 255.0 * 10.0 ** (-cut)).astype(bool), float(cut)
    rgb = np.asarray(array, dtype=np.float32) / 255.0
    brightest = rgb.max(axis=-1)
    if rule == "saturation":
        values = (brightest - rgb.min(axis=-1)) / np.maximum(brightest, 1e-6)
        floor = MIN_SATURATION
    else:
        values = -np.log(np.clip(rgb, 1.0 / 255.0, 1.0)).sum(axis=-1)
        floor = MIN_OPTICAL_DENSITY
    usable = brightest >= _DARK
    if threshold is not None:
        cut = float(threshold)
    else:
        from skimage.filters import threshold_otsu

        candidates = values[usable]
        if candidates.size == 0 or float(np.ptp(candidates)) < 1e-6:
            cut = float("inf") if candidates.size == 0 or float(candidates.max()) <= floor else floor
        else:
            cut = max(float(threshold_otsu(candidates)), floor)
    return (values > cut) & usable, cut


@functools.cache
def _ln_od_table() -> np.ndarray:
    # -ln(I/255) of every uint8 intensity, as float32 (the values stain normalisation computes with).
    return (-np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)


def compute_mask(
    image: np.ndarray,
    *,
    microns_per_pixel: float,
    method: str = "otsu",
    closing_um: float = 20.0,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 100_000.0,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image whose pixels are ``microns_per_pixel`` wide.

    Images finer than :data:`MASK_MICRONS_PER_PIXEL` are box-averaged down to about that
    resolution first: tissue outlines need no more, and morphology stays cheap.

    Returns
    -------
    mask
        2-D bool.
    threshold
        The threshold applied (saturation or optical density); ``inf`` when the image is flat.
    factor
        Integer reduction applied: mask pixels are ``factor`` image pixels wide.
    """
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    from .._images import _block_reduce

    factor = max(1, int(MASK_MICRONS_PER_PIXEL // microns_per_pixel))
    if factor > 1:
        image = _block_reduce(np.asarray(image)[..., :3], factor)
        microns_per_pixel = microns_per_pixel * factor
    mask, threshold = tissue_pixels(image, rule=_RULE_OF_METHOD[method])
    pixel_area = microns_per_pixel**2
    radius = int(round(closing_um / microns_per_pixel))
    if radius >= 1 and mask.any():
        mask = closing(mask, disk(radius))
    if min_hole_um2 > 0 and mask.any():
        mask = remove_small_holes(mask, max_size=max(1, int(min_hole_um2 / pixel_area)))
    if min_object_um2 > 0 and mask.any():
        mask = remove_small_objects(mask, max_size=max(1, int(min_object_um2 / pixel_area)))
    return np.asarray(mask, dtype=bool), float(threshold), factor
