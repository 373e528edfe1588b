"""Stain normalisation of H&E images: Macenko, Reinhard, Vahadane, colour cast, luminosity.

Colour-cast removal and luminosity standardisation are HistoSPACE's image preparation steps.

scikit-image offers no stain normalisation, and squidpy gained it only in 1.8.2, as experimental
functions on SpatialData images (``squidpy.experimental.im.fit_stain_reference`` /
``normalize_stains``: Macenko, Vahadane, and Reinhard in Ruderman's lαβ space rather than CIE
L*a*b*); sthisto supports squidpy ≥ 1.6, so the colour algebra is written here.

It is checked against torchstain 1.4 (``tests/test_stain_torchstain.py``), an independent
Macenko / Reinhard implementation. On the same optical densities the Macenko stain vectors agree
to 1e-10 (the same eigen-plane, the same α = 1 angle percentiles) and the concentrations to
float32 rounding; CIE L*a*b* agrees to 5e-4. The outputs differ by conventions, each measured on
a 256² synthetic H&E image (62 % tissue) as the mean change of tissue pixels in 0–255 levels:

* Macenko's 99th-percentile concentrations: over tissue pixels here, over all pixels (glass
  included) in torchstain, which makes the result depend on how much glass an image shows
  (≈ 13 levels);
* optical density ``-ln(max(I, 1) / 255)`` here, ``-ln((I + 1) / Io)`` in torchstain (≈ 1 level;
  torchstain's default Io = 240 also moves the background threshold β);
* rounding to uint8 here, truncation in torchstain (≤ 1 level);
* Reinhard's L*a*b* statistics: over tissue pixels here, over all pixels in torchstain; with
  the same statistics the outputs agree within one level wherever the colour stays in gamut
  (out-of-gamut colours are clipped in XYZ / linear RGB here, as scikit-image does, and in sRGB
  by torchstain).

With those three conventions switched, sthisto's Macenko output equals torchstain's exactly.
sthisto keeps its own code rather than delegating: the conventions above (tissue-only
statistics), Vahadane, glass kept as it is, and lazy block-wise normalisation of whole slides
are not in torchstain, and ``benchmarks/stain_torchstain.py`` measured sthisto 2–12× faster
than torchstain's numpy backend (Macenko and Reinhard, 1–4 Mpx images) and, on the CPU, from
as fast as (Macenko, 1 Mpx) to 3–17× faster than its torch backend.

scikit-learn's dictionary learning was measured too slow for Vahadane at image scale (its
positive sparse coding loops over pixels), so the two-stain non-negative lasso is solved in
closed form and the dictionary by block-coordinate descent, the same updates scikit-learn uses.

Parameters are always estimated from a bounded sample of pixels (the image itself up to
``max_fit_side`` pixels, otherwise a strided thumbnail), and the transform is a per-pixel
function of fitted constants. Full-resolution images are therefore normalised lazily, block by
block, as a dask array, and give the same pixels as an in-memory image would.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._anndata import check_record_writable, maybe_copy, record
from .._constants import Images, Metadata, ScaleFactors, Uns
from .._deprecate import renamed_parameters
from .._errors import InputError, KeyExistsError, MissingKeyError, NoImageError
from .._images import ImageSource, check_image_array, library_spatial, open_image_file
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData

_FUNCTION = "stain_normalize"
METHODS = ("macenko", "reinhard", "vahadane")

OD_THRESHOLD = 0.15
"""Pixels with an optical density below this in any channel are background (Macenko's β)."""
ANGLE_PERCENTILE = 1.0
"""Macenko's α: robust extremes of the stain angles, in percent."""
MAX_CONCENTRATION_PERCENTILE = 99.0
DICTIONARY_PENALTY = 0.1
"""Vahadane: lasso weight on concentrations while learning the stain matrix."""
CONCENTRATION_PENALTY = 0.01
"""Vahadane: lasso weight on concentrations when decomposing pixels."""
COLOUR_CAST_PERCENTILE = 99.0
LUMINOSITY_PERCENTILE = 95.0
_FIT_PIXELS = 100_000
_DICTIONARY_PIXELS = 20_000
_MIN_TISSUE_PIXELS = 50

# sRGB (D65) ↔ CIE XYZ and the D65 white point, as scikit-image uses them.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ_WHITENED = (_RGB_TO_XYZ / _WHITE[:, None]).tolist()
_XYZ_WHITENED_TO_RGB = (np.linalg.inv(_RGB_TO_XYZ) * _WHITE[None, :]).tolist()
_LEVELS = np.arange(256, dtype=np.float64)
_SRGB_TO_LINEAR_LUT = np.where(
    _LEVELS / 255 <= 0.04045, _LEVELS / 255 / 12.92, ((_LEVELS / 255 + 0.055) / 1.055) ** 2.4
).astype(np.float32)
_OD_LUT = (-np.log(np.maximum(_LEVELS, 1.0) / 255.0)).astype(np.float32)
_DELTA = 6.0 / 29.0

# Pixels are processed as three channel planes: per-pixel 3 × 3 algebra written plane by
# plane avoids NumPy's slow tiny-matrix products and reductions over a length-3 axis, and
# Python-float coefficients keep the arithmetic in float32.
Planes = list


def _planes(rgb) -> Planes:
    """Channel planes of ``(..., 3)`` RGB: uint8 views, or float32 on the 0–255 scale."""
    array = np.asarray(rgb)
    if array.dtype == np.uint8:
        return [array[..., c] for c in range(3)]
    return [np.asarray(array[..., c], dtype=np.float32) for c in range(3)]


def _image_planes(image) -> Planes:
    """Channel planes of an image in sthisto's convention (uint8, or float in [0, 1])."""
    array = np.asarray(image)[..., :3]
    if array.dtype == np.uint8:
        return _planes(array)
    return [np.asarray(array[..., c], dtype=np.float32) * np.float32(255.0) for c in range(3)]


def _stack(planes: Planes, dtype=np.float32) -> np.ndarray:
    out = np.empty((*planes[0].shape, len(planes)), dtype=dtype)
    for c, plane in enumerate(planes):
        out[..., c] = plane
    return out


def _mix(planes: Planes, matrix) -> Planes:
    """``matrix @ pixel`` for every pixel, as planes (``matrix`` has 3 columns)."""
    return [m0 * planes[0] + m1 * planes[1] + m2 * planes[2] for m0, m1, m2 in matrix]


def _od_planes(planes: Planes) -> Planes:
    if planes[0].dtype == np.uint8:
        return [_OD_LUT[p] for p in planes]
    return [-np.log(np.maximum(p, np.float32(1.0)) * np.float32(1.0 / 255.0)) for p in planes]


def _lab_planes(planes: Planes) -> Planes:
    if planes[0].dtype == np.uint8:
        linear = [_SRGB_TO_LINEAR_LUT[p] for p in planes]
    else:
        linear = []
        for plane in planes:
            value = plane * np.float32(1.0 / 255.0)
            linear.append(np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4))
    f = [
        np.where(t > _DELTA**3, np.maximum(t, 0.0) ** np.float32(1 / 3), t / (3 * _DELTA**2) + 4.0 / 29.0)
        for t in _mix(linear, _RGB_TO_XYZ_WHITENED)
    ]
    return [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])]


def _rgb_planes_from_lab(lab: Planes) -> Planes:
    fy = (lab[0] + 16.0) / 116.0
    f = (fy + lab[1] / 500.0, fy, fy - lab[2] / 200.0)
    xyz = [np.maximum(np.where(v > _DELTA, v * v * v, 3 * _DELTA**2 * (v - 4.0 / 29.0)), 0.0) for v in f]
    out = []
    for linear in _mix(xyz, _XYZ_WHITENED_TO_RGB):
        linear = np.clip(linear, 0.0, 1.0)
        srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** np.float32(1 / 2.4) - 0.055)
        out.append(np.clip(srgb * 255.0, 0.0, 255.0))
    return out


def _weight_planes(od: Planes, od_threshold: float) -> np.ndarray:
    lowest = np.minimum(np.minimum(od[0], od[1]), od[2])
    half = od_threshold / 2.0
    if half <= 0:
        return np.ones(lowest.shape, dtype=np.float32)
    return np.clip((lowest - half) * (1.0 / half), 0.0, 1.0)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln(I / 255)`` of RGB (uint8, or float on the 0–255 scale); intensities below 1 count as 1."""
    return _stack(_od_planes(_planes(rgb)))


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, float32 clipped to [0, 255]."""
    return np.clip(np.float32(255.0) * np.exp(-np.asarray(od, dtype=np.float32)), 0.0, 255.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of RGB (uint8, or float on the 0–255 scale); agrees with ``skimage.color.rgb2lab``."""
    return _stack(_lab_planes(_planes(rgb)))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, out-of-gamut colours clipped; float32 RGB on the 0–255 scale."""
    return _stack(_rgb_planes_from_lab(_planes(np.asarray(lab, dtype=np.float32))))


def tissue_mask(rgb: np.ndarray, od_threshold: float = OD_THRESHOLD) -> np.ndarray:
    """True for pixels whose optical density exceeds ``od_threshold`` in every channel.

    The ``"od_every_channel"`` rule of :func:`sthisto.pp._tissue.tissue_pixels`, where every
    tissue definition of the package lives.
    """
    from ._tissue import tissue_pixels

    return tissue_pixels(rgb, rule="od_every_channel", threshold=od_threshold)[0]


def tissue_weight(rgb: np.ndarray, od_threshold: float = OD_THRESHOLD) -> np.ndarray:
    """Blend weight of the normalised colour when glass is kept.

    0 for glass (optical density below ``od_threshold / 2`` in some channel), 1 for tissue
    (above ``od_threshold`` in every channel), linear in between; float32 of the pixel shape.
    """
    return _weight_planes(_od_planes(_planes(rgb)), od_threshold)


# --------------------------------------------------------------------------- stain algebra


def _order_stains(stain_matrix: np.ndarray) -> np.ndarray:
    """Unit rows, haematoxylin first: it absorbs red more strongly than eosin does."""
    stain_matrix = np.maximum(np.asarray(stain_matrix, dtype=np.float64), 0.0)
    stain_matrix = stain_matrix / np.linalg.norm(stain_matrix, axis=1, keepdims=True)
    if stain_matrix[0, 0] < stain_matrix[1, 0]:
        stain_matrix = stain_matrix[::-1]
    return np.ascontiguousarray(stain_matrix)


def macenko_stain_matrix(od: np.ndarray, *, angle_percentile: float = ANGLE_PERCENTILE) -> np.ndarray:
    """Macenko et al. (2009): stain vectors at robust extreme angles in the OD plane of largest variance.

    Parameters
    ----------
    od
        ``(n_pixels, 3)`` optical densities of tissue pixels.
    angle_percentile
        Percentile defining the robust extreme angles (α).

    Returns
    -------
    ``(2, 3)`` unit stain vectors, haematoxylin first.
    """
    od = np.asarray(od, dtype=np.float64)
    _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vectors[:, [2, 1]]  # the two largest eigenvalues
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0  # OD vectors are positive
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [angle_percentile, 100 - angle_percentile])
    stains = np.stack([plane @ [np.cos(low), np.sin(low)], plane @ [np.cos(high), np.sin(high)]])
    stains *= np.sign(stains.sum(axis=1, keepdims=True))
    return _order_stains(stains)


def _lasso_planes(od: Planes, stain_matrix, penalty: float) -> Planes:
    stains = np.asarray(stain_matrix, dtype=np.float64)
    gram = stains @ stains.T
    g00, g01, g11 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    determinant = g00 * g11 - g01 * g01
    if determinant <= 1e-12 * g00 * g11:
        raise InputError(f"the two stain vectors {stains.tolist()} are parallel; the stains cannot be separated.")
    b0, b1 = (x - penalty for x in _mix(od, stains.tolist()))
    both0 = (g11 * b0 - g01 * b1) * (1.0 / determinant)
    both1 = (g00 * b1 - g01 * b0) * (1.0 / determinant)
    both = (both0 > 0) & (both1 > 0)
    only0 = np.maximum(b0 * (1.0 / g00), 0.0)
    only1 = np.maximum(b1 * (1.0 / g11), 0.0)
    first = ~both & (only0 > 0) & (b1 <= g01 * only0)
    second = ~both & ~first & (only1 > 0) & (b0 <= g01 * only1)
    return [np.where(both, both0, np.where(first, only0, 0.0)), np.where(both, both1, np.where(second, only1, 0.0))]


def nonnegative_lasso(od: np.ndarray, stain_matrix: np.ndarray, penalty: float) -> np.ndarray:
    """Per pixel, ``argmin_{c ≥ 0} ½‖od − c·S‖² + penalty·Σc`` for two stains, in closed form.

    The problem is strictly convex, so its minimiser is the one active-set candidate (both
    stains, only the first, only the second, none) that satisfies the KKT conditions; each is
    a closed-form expression evaluated for all pixels at once.

    Parameters
    ----------
    od
        ``(..., 3)`` optical densities.
    stain_matrix
        ``(2, 3)`` non-negative, linearly independent stain vectors (rows).
    penalty
        Lasso weight (spams/staintools convention; scikit-learn's ``sparse_encode`` with
        ``algorithm="lasso_cd"`` and ``alpha=penalty`` solves the same problem).

    Returns
    -------
    ``(..., 2)`` non-negative float32 concentrations.
    """
    return _stack(_lasso_planes(_planes(np.asarray(od, dtype=np.float32)), stain_matrix, penalty))


def vahadane_stain_matrix(
    od: np.ndarray,
    *,
    penalty: float = DICTIONARY_PENALTY,
    init: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> np.ndarray:
    """Vahadane et al. (2016): sparse non-negative factorisation ``OD ≈ C·S``.

    Minimises ``½‖OD − C·S‖² + penalty·ΣC`` over ``C ≥ 0`` and ``S ≥ 0`` with ``‖S_k‖ ≤ 1``,
    alternating the exact concentration step (:func:`nonnegative_lasso`) and scikit-learn's
    block-coordinate dictionary update. Started from the Macenko estimate, so deterministic.

    Parameters
    ----------
    od
        ``(n_pixels, 3)`` optical densities of tissue pixels.
    penalty
        Lasso weight on the concentrations while learning.
    init
        Starting stain matrix; default the Macenko estimate.
    max_iter, tol
        Stop after ``max_iter`` rounds or when no stain-matrix entry moves more than ``tol``.

    Returns
    -------
    ``(2, 3)`` unit stain vectors, haematoxylin first.
    """
    od = np.asarray(od, dtype=np.float64)
    stains = macenko_stain_matrix(od) if init is None else _order_stains(init)
    for _ in range(max_iter):
        codes = nonnegative_lasso(od, stains, penalty).astype(np.float64)
        gram = codes.T @ codes
        cross = od.T @ codes  # (3, 2)
        previous = stains.copy()
        for k in range(2):
            if gram[k, k] < 1e-6:
                continue  # a stain absent from the sample: keep its current estimate
            stains[k] += (cross[:, k] - gram[k] @ stains) / gram[k, k]
            np.clip(stains[k], 0.0, None, out=stains[k])
            stains[k] /= max(np.linalg.norm(stains[k]), 1.0)
        if np.abs(stains - previous).max() < tol:
            break
    return _order_stains(stains)


def _concentration_planes(od: Planes, params: Mapping) -> Planes:
    if params["method"] == "vahadane":
        return _lasso_planes(od, params["stain_matrix"], float(params["concentration_penalty"]))
    pseudo_inverse = np.linalg.pinv(np.asarray(params["stain_matrix"], dtype=np.float64))  # (3, 2)
    return _mix(od, pseudo_inverse.T.tolist())


# --------------------------------------------------------------------------- fit and apply


def _preprocess(planes: Planes, params: Mapping) -> Planes:
    """Colour-cast removal and luminosity standardisation; the input itself when neither is on."""
    scale = params.get("colour_cast_scale")
    if scale is not None:
        planes = [np.clip(p * np.float32(s), 0.0, 255.0) for p, s in zip(planes, np.asarray(scale).tolist())]
    lightness = params.get("luminosity_percentile_value")
    if lightness is not None:
        lab = _lab_planes(planes)
        lab[0] = np.clip(lab[0] * np.float32(100.0 / float(lightness)), 0.0, 100.0)
        planes = _rgb_planes_from_lab(lab)
    return planes


def _sample(values: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(values) <= n:
        return values
    return values[np.sort(np.random.default_rng(seed).choice(len(values), n, replace=False))]


def fit_stain_parameters(
    image,
    *,
    method: str,
    remove_colour_cast: bool = False,
    standardize_luminosity: bool = False,
    od_threshold: float = OD_THRESHOLD,
    random_state: int = 0,
    what: str = "image",
) -> dict:
    """Estimate the constants that describe an image's staining.

    Parameters
    ----------
    image
        ``(height, width, 3)`` RGB (uint8, or float in [0, 1]); use a thumbnail for large slides.
    method
        ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
    remove_colour_cast, standardize_luminosity
        Estimate (and apply before the stain fit) the per-channel 99th-percentile scaling and
        the L* 95th-percentile scaling.
    od_threshold
        Background threshold on optical density.
    random_state
        Seed for sub-sampling pixels.
    what
        Name of the image in error messages.

    Returns
    -------
    dict with ``method``, ``od_threshold``, ``colour_cast_scale`` (3,) or None,
    ``luminosity_percentile_value`` or None, and ``stain_matrix`` (2, 3) +
    ``max_concentrations`` (2,) (Macenko, Vahadane; Vahadane adds its two penalties) or
    ``means`` (3,) + ``stds`` (3,) of L*a*b* over tissue (Reinhard).
    """
    if method not in METHODS:
        raise InputError(f"unknown method={method!r}; use one of {list(METHODS)}.")
    planes = _image_planes(np.asarray(image).reshape(-1, np.asarray(image).shape[-1]))
    params: dict = {"method": method, "od_threshold": float(od_threshold)}
    params["colour_cast_scale"] = None
    params["luminosity_percentile_value"] = None
    if remove_colour_cast:
        high = np.array([np.percentile(p, COLOUR_CAST_PERCENTILE) for p in planes], dtype=np.float64)
        if (high < 1.0).any():
            raise InputError(f"{what} is black in some channel (99th percentile {high}); cannot remove a colour cast.")
        params["colour_cast_scale"] = 255.0 / high
        planes = _preprocess(planes, {"colour_cast_scale": params["colour_cast_scale"]})
    if standardize_luminosity:
        lightness = float(np.percentile(_lab_planes(planes)[0], LUMINOSITY_PERCENTILE))
        if lightness <= 1.0:
            raise InputError(
                f"{what} is almost black (L* 95th percentile {lightness:.2f}); cannot standardise luminosity."
            )
        params["luminosity_percentile_value"] = lightness
        planes = _preprocess(planes, {"luminosity_percentile_value": lightness})
    from ._tissue import tissue_pixels

    od = _od_planes(planes)
    tissue, _ = tissue_pixels(_stack(planes, dtype=planes[0].dtype), rule="od_every_channel", threshold=od_threshold)
    if tissue.sum() < _MIN_TISSUE_PIXELS:
        raise InputError(
            f"{what} has only {int(tissue.sum())} tissue pixels (optical density > {od_threshold} in "
            f"every channel); it looks blank. Check the image, or lower od_threshold."
        )
    pixels = _sample(np.flatnonzero(tissue), _FIT_PIXELS, random_state)
    if method == "reinhard":
        lab = np.stack(_lab_planes([p[pixels] for p in planes]), axis=-1).astype(np.float64)
        params["means"] = lab.mean(axis=0)
        params["stds"] = np.maximum(lab.std(axis=0), 1e-6)
        return params
    od = np.stack([p[pixels] for p in od], axis=-1).astype(np.float64)
    stains = macenko_stain_matrix(od)
    if method == "vahadane":
        params["concentration_penalty"] = CONCENTRATION_PENALTY
        params["dictionary_penalty"] = DICTIONARY_PENALTY
        stains = vahadane_stain_matrix(_sample(od, _DICTIONARY_PIXELS, random_state), init=stains)
    params["stain_matrix"] = stains
    concentrations = _concentration_planes(_planes(od.astype(np.float32)), params)
    params["max_concentrations"] = np.maximum(
        [np.percentile(c, MAX_CONCENTRATION_PERCENTILE) for c in concentrations], 1e-6
    ).astype(np.float64)
    return params


def apply_stain_parameters(image, source: Mapping, target: Mapping, *, keep_background: bool = True) -> np.ndarray:
    """Normalise an RGB image (or block) from its fitted ``source`` constants to ``target``.

    A per-pixel function of the constants, so any tiling of an image gives the same pixels.

    Parameters
    ----------
    image
        ``(..., 3)`` RGB, uint8 or float in [0, 1].
    source
        Constants of the image, from :func:`fit_stain_parameters`.
    target
        Reference statistics (``stain_matrix`` + ``max_concentrations``, or ``means`` + ``stds``).
    keep_background
        Leave glass as it is (after colour-cast removal and luminosity standardisation): pixels
        are blended from the original to the normalised colour by :func:`tissue_weight`.

    Returns
    -------
    uint8 array of the image's shape.
    """
    planes = _preprocess(_image_planes(image), source)
    od = _od_planes(planes)
    if source["method"] == "reinhard":
        lab = _lab_planes(planes)
        for c in range(3):
            scale = float(target["stds"][c]) / float(source["stds"][c])
            lab[c] = (lab[c] - float(source["means"][c])) * scale + float(target["means"][c])
        lab[0] = np.clip(lab[0], 0.0, 100.0)
        out = _rgb_planes_from_lab(lab)
    else:
        concentrations = _concentration_planes(od, source)
        ratio = np.asarray(target["max_concentrations"], dtype=np.float64) / np.asarray(source["max_concentrations"])
        scaled = [concentrations[k] * float(ratio[k]) for k in range(2)]
        stains = np.asarray(target["stain_matrix"], dtype=np.float64)
        out = [
            np.exp(-(scaled[0] * float(stains[0, c]) + scaled[1] * float(stains[1, c]))) * np.float32(255.0)
            for c in range(3)
        ]
    if keep_background:
        weight = _weight_planes(od, float(source.get("od_threshold", OD_THRESHOLD)))
        out = [original + weight * (normalised - original) for original, normalised in zip(planes, out)]
    return _stack([np.rint(np.clip(p, 0.0, 255.0)) for p in out], dtype=np.uint8)


_BAND_ROWS = 256
_COLOUR_TABLE_MIN_PIXELS = 1 << 20


def _apply_by_colour(image: np.ndarray, source: Mapping, target: Mapping, *, keep_background: bool) -> np.ndarray:
    """:func:`apply_stain_parameters` for a large uint8 image, computed once per distinct colour.

    The transform is a function of a pixel's RGB value alone, and H&E images hold far fewer
    distinct colours than pixels (≈ 110 k in a 2000 × 2000 her2st image).
    """
    rgb = image[..., :3]
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    present = np.zeros(1 << 24, dtype=bool)
    present[packed.ravel()] = True
    colours = np.flatnonzero(present).astype(np.int32)
    table = np.empty(1 << 24, dtype=np.int32)
    table[colours] = np.arange(len(colours), dtype=np.int32)
    palette = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)
    mapped = apply_stain_parameters(palette, source, target, keep_background=keep_background)
    return mapped[table[packed]]


def _apply_in_memory(image: np.ndarray, source: Mapping, target: Mapping, *, keep_background: bool) -> np.ndarray:
    """:func:`apply_stain_parameters` on an in-memory image, faster, with the same pixels.

    The transform is a function of each pixel's value, so a large uint8 image is mapped once per
    distinct colour; otherwise row bands are processed in threads (NumPy releases the GIL),
    which keeps temporaries small and lets several cores work.
    """
    from concurrent.futures import ThreadPoolExecutor

    if image.dtype == np.uint8 and image.shape[0] * image.shape[1] >= _COLOUR_TABLE_MIN_PIXELS:
        return _apply_by_colour(image, source, target, keep_background=keep_background)
    out = np.empty((*image.shape[:2], 3), dtype=np.uint8)

    def run(start: int) -> None:
        stop = min(start + _BAND_ROWS, image.shape[0])
        out[start:stop] = apply_stain_parameters(image[start:stop], source, target, keep_background=keep_background)

    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(0, image.shape[0], _BAND_ROWS)))
    return out


def _target_from(params: Mapping) -> dict:
    keys = ("means", "stds") if params["method"] == "reinhard" else ("stain_matrix", "max_concentrations")
    return {key: np.asarray(params[key], dtype=np.float64) for key in keys}


def _check_target(target, method: str) -> dict:
    if not isinstance(target, Mapping):
        raise InputError(f"target must be a dict of stain statistics, got {type(target).__name__}.")
    if method == "reinhard":
        expected = {"means": (3,), "stds": (3,)}
        example = "target={'means': [L, a, b], 'stds': [sL, sa, sb]} (CIE L*a*b* over tissue)"
    else:
        expected = {"stain_matrix": (2, 3), "max_concentrations": (2,)}
        example = "target={'stain_matrix': 2×3 OD vectors (H, E), 'max_concentrations': [cH, cE]}"
    out = {}
    for key, shape in expected.items():
        if key not in target:
            raise InputError(f"target lacks {key!r} for method={method!r}; pass {example}.")
        value = np.asarray(target[key], dtype=np.float64)
        if value.shape != shape or not np.isfinite(value).all():
            raise InputError(f"target[{key!r}] has shape {value.shape} (or non-finite values); expected {shape}.")
        out[key] = value
    if method == "reinhard":
        if (out["stds"] <= 0).any():
            raise InputError("target['stds'] must be positive.")
    else:
        if (out["stain_matrix"] < 0).any() or (np.linalg.norm(out["stain_matrix"], axis=1) == 0).any():
            raise InputError("target['stain_matrix'] rows must be non-negative, non-zero OD vectors.")
        if (out["max_concentrations"] <= 0).any():
            raise InputError("target['max_concentrations'] must be positive.")
        out["stain_matrix"] = out["stain_matrix"] / np.linalg.norm(out["stain_matrix"], axis=1, keepdims=True)
    return out


# --------------------------------------------------------------------------- image sources


class _Source:
    """Where a library's image comes from, and how to get a fitting sample and a lazy view."""

    def __init__(self, library: str, key: str, array=None, path: str | None = None, scale: float = 1.0) -> None:
        self.library, self.key, self.array, self.path, self.scale = library, key, array, path, scale

    @property
    def eager(self) -> bool:
        """In-memory NumPy image: normalised in memory (plotting-size images)."""
        return isinstance(self.array, np.ndarray) and self.key != Images.FULLRES

    @property
    def shape(self) -> tuple[int, int]:
        if self.array is not None:
            return int(self.array.shape[0]), int(self.array.shape[1])
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(self.path) as img:
            return img.height, img.width

    def fit_sample(self, max_side: int) -> np.ndarray:
        """The image itself if its longer side is ≤ ``max_side``, else a strided thumbnail."""
        if self.array is not None:
            return ImageSource(self.array).thumbnail(max_side)[0]
        suffix = Path(self.path).suffix.lower()
        if suffix in (".jpg", ".jpeg", ".png", ".bmp"):
            return _file_thumbnail(self.path, max_side)
        return open_image_file(self.path).thumbnail(max_side)[0]

    def lazy(self, chunk_size: int):
        import dask.array as da

        height, width = self.shape
        if self.array is not None:
            array = self.array if isinstance(self.array, da.Array) else da.from_array(self.array, chunks=chunk_size)
            return array[..., :3].rechunk((chunk_size, chunk_size, 3))
        chunks = da.core.normalize_chunks((chunk_size, chunk_size, 3), (height, width, 3))
        return da.map_blocks(
            _read_file_block,
            path=self.path,
            chunks=chunks,
            dtype=np.uint8,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )


def _file_thumbnail(path: str, max_side: int) -> np.ndarray:
    """Thumbnail of a JPEG/PNG; JPEGs are decoded at reduced scale (DCT scaling), never whole."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as img:
        if img.mode != "RGB":
            raise InputError(f"image file {path} has PIL mode {img.mode!r}; sthisto reads 8-bit RGB.")
        step = max(1, int(np.ceil(max(img.size) / max_side)))
        if step > 1:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never larger than needed
            img.draft("RGB", (int(np.ceil(img.width / step)), int(np.ceil(img.height / step))))
        array = np.asarray(img.convert("RGB"))
    step = max(1, int(np.ceil(max(array.shape[:2]) / max_side)))
    return np.ascontiguousarray(array[::step, ::step])


@functools.lru_cache(maxsize=8)
def _tiff_source(path: str) -> ImageSource:
    """TIFF handles are cheap to keep and slow to reopen for every block."""
    return open_image_file(path)


def _read_file_block(path: str, block_info=None) -> np.ndarray:
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    if Path(path).suffix.lower() in (".tif", ".tiff", ".svs", ".btf"):
        source = _tiff_source(path)
    else:
        source = open_image_file(path)  # JPEG/PNG: decoded once, cached by sthisto._images
    return source.read(y0, x0, y1 - y0, x1 - x0)[0]


def _library_sources(adata, image_key: str | None, library_id) -> list[_Source]:
    spatial = adata.uns.get(Uns.SPATIAL)
    if not spatial:
        raise MissingKeyError(
            "adata.uns['spatial'] is missing: stain normalisation works on the images stored there. "
            "Read the data with a sthisto.io reader, or add uns['spatial'][library_id]['images']."
        )
    if library_id is None:
        libraries, explicit = list(spatial), False
    else:
        libraries, explicit = ([library_id] if isinstance(library_id, str) else list(library_id)), True
    key = image_key or Images.FULLRES
    sources, skipped = [], []
    for library in libraries:
        entry = library_spatial(adata, library)
        images = entry.get(Uns.IMAGES, {})
        metadata = entry.get(Uns.METADATA, {})
        if metadata.get(Metadata.HAS_IMAGE) is False:
            if explicit:
                raise NoImageError(f"library {library!r} has no H&E image (expression-only data); leave it out.")
            skipped.append(library)
            continue
        if key in images:
            array = images[key]
            check_image_array(array, what=f"uns['spatial'][{library!r}]['images'][{key!r}]")
            if key == Images.FULLRES:
                scale = 1.0
            else:
                scale = entry.get(Uns.SCALEFACTORS, {}).get(ScaleFactors.for_image(key))
                if scale is None:
                    raise MissingKeyError(
                        f"image {key!r} of library {library!r} has no scale factor "
                        f"{ScaleFactors.for_image(key)!r}; add it (image pixels per full-resolution pixel)."
                    )
            sources.append(_Source(library, key, array=array, scale=float(scale)))
        elif image_key is None and Metadata.IMAGE_PATH in metadata:
            path = str(metadata[Metadata.IMAGE_PATH])
            if not Path(path).exists():
                raise MissingKeyError(
                    f"image file {path!r} of library {library!r} does not exist; update "
                    f"uns['spatial'][{library!r}]['metadata']['image_path']."
                )
            sources.append(_Source(library, key, path=path, scale=1.0))
        elif explicit or image_key is not None:
            raise NoImageError(
                f"library {library!r} has no image under key {key!r} (available: {sorted(images)}). "
                f"Pass image_key= one of those."
            )
        else:
            skipped.append(library)
    if not sources:
        raise NoImageError(
            f"no library has an image under key {key!r}; pass image_key= an existing image key (e.g. 'hires')."
        )
    if skipped:
        logger.info("stain_normalize: libraries without an image under %r skipped: %s", key, skipped)
    return sources


def _reference_image(adata, reference, image_key: str | None, max_side: int) -> tuple[np.ndarray, dict]:
    if isinstance(reference, str):
        (source,) = _library_sources(adata, image_key, reference)
        return source.fit_sample(max_side), {"kind": "library", "library_id": reference, "image_key": source.key}
    if not hasattr(reference, "shape") or not hasattr(reference, "dtype"):
        raise InputError(
            f"reference must be an RGB image array or a library id, got {type(reference).__name__}. "
            f"Pass e.g. a NumPy (height, width, 3) uint8 tile of a well-stained slide."
        )
    check_image_array(reference, what="reference")
    step = max(1, int(np.ceil(max(reference.shape[:2]) / max_side)))
    array = np.asarray(reference[::step, ::step, :3])
    if np.issubdtype(array.dtype, np.floating) and not (np.nanmin(array) >= 0 and np.nanmax(array) <= 1):
        raise InputError(
            "reference is a float image with values outside [0, 1]; pass uint8 (0–255) or float in [0, 1]."
        )
    return array, {"kind": "array", "shape": list(reference.shape)}


# --------------------------------------------------------------------------- public function


@renamed_parameters(random_state="seed")
@checked_input
def stain_normalize(
    adata: AnnData,
    *,
    method: Literal["macenko", "reinhard", "vahadane"] = "macenko",
    reference: np.ndarray | str | None = None,
    target: Mapping | None = None,
    remove_colour_cast: bool = False,
    standardize_luminosity: bool = False,
    image_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    key_added: str | None = None,
    od_threshold: float = OD_THRESHOLD,
    keep_background: bool = True,
    max_fit_side: int = 2000,
    chunk_size: int = 256,
    seed: int = 0,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Normalise the H&E staining of each library's image to a reference, as a new image key.

    Optional colour-cast removal (each RGB channel scaled so that its 99th percentile maps to
    255) and luminosity standardisation (L* scaled so that its 95th percentile maps to 100)
    come first, then one of

    - ``"macenko"`` (Macenko et al. 2009): stain vectors from the robust extreme angles of
      tissue optical densities in their plane of largest variance; concentrations by least
      squares, scaled so their 99th percentiles match the reference's.
    - ``"vahadane"`` (Vahadane et al. 2016; HistoSPACE's choice): stain vectors by sparse
      non-negative matrix factorisation of optical densities (penalty 0.1), concentrations by
      non-negative lasso (penalty 0.01), 99th-percentile matching.
    - ``"reinhard"`` (Reinhard et al. 2001, in CIE L*a*b*): each channel's mean and standard
      deviation over tissue matched to the reference's.

    Each library is fitted on its own pixels and mapped to the one reference. Statistics come
    from tissue pixels only (optical density > ``od_threshold`` in every channel) of a bounded
    sample: the image itself when its longer side is ≤ ``max_fit_side``, otherwise a strided
    thumbnail (JPEG files are decoded at reduced scale). In-memory images under ``image_key``
    (e.g. ``"hires"``) are normalised in memory; the full-resolution image (``image_key=None``:
    a held ``fullres`` array or the file at ``metadata['image_path']``) becomes a lazy dask
    array normalised block by block on read, so whole slides are never loaded:
    :func:`sthisto._images.image_source` and :class:`sthisto.pp.PatchDataset` with
    ``image_key=key_added`` read normalised patches lazily.

    Parameters
    ----------
    adata
        AnnData with images in ``uns['spatial'][library_id]``.
    method
        ``"macenko"``, ``"reinhard"`` or ``"vahadane"``.
    reference
        Reference RGB image (``(height, width, 3)`` uint8 or float in [0, 1]), or the id of a
        library whose image (same ``image_key``) is the reference.
    target
        Instead of ``reference``: the reference's statistics, e.g. the ``target`` recorded by an
        earlier call (to normalise new slides like the training slides).
        Macenko/Vahadane: ``{"stain_matrix": (2, 3), "max_concentrations": (2,)}``;
        Reinhard: ``{"means": (3,), "stds": (3,)}`` in L*a*b*.
    remove_colour_cast, standardize_luminosity
        Apply those steps first (to the reference image too).
    image_key
        Source image: ``None`` is the full-resolution image; or a key of
        ``uns['spatial'][library]['images']`` (``"hires"``, ...).
    library_id
        Library or libraries to normalise; ``None`` is every library with an image.
    key_added
        New image key; default ``f"{image_key or 'fullres'}_{method}"``.
    od_threshold
        Background threshold on optical density (Macenko's β).
    keep_background
        Leave glass (optical density below ``od_threshold / 2`` in some channel) as it is,
        with a linear transition up to ``od_threshold``; ``False`` transforms every pixel as
        the original algorithms do (which tints the glass).
    max_fit_side
        Longer side of the sample the statistics are estimated from.
    chunk_size
        Block side of the lazy output.
    seed
        Seed for sub-sampling pixels. (Formerly ``random_state=``, deprecated.)
    copy
        Return a modified copy instead of writing in place.
    overwrite
        Replace an existing image under ``key_added``.

    Returns
    -------
    ``None``, or the modified copy if ``copy=True``. Writes, per library,

    - ``uns['spatial'][library]['images'][key_added]``: uint8 RGB (a float [0, 1] source gives
      float32 in [0, 1]; a full-resolution source gives a lazy dask array);
    - ``uns['spatial'][library]['scalefactors'][f"tissue_{key_added}_scalef"]``: the source
      image's scale factor;

    and ``uns['sthisto']['stain_normalize'][key_added]``: ``method``, ``source_image_key``,
    ``libraries``, ``reference`` (description), ``target`` (reference statistics, reusable as
    ``target=``), ``fitted`` (per library: its colour-cast scale, luminosity percentile, stain
    matrix and max concentrations or L*a*b* statistics) and the options.

    Examples
    --------
    >>> sthisto.pp.stain_normalize(adata, method="vahadane", reference="C2", image_key="hires")
    >>> PatchDataset(adata, image_key="hires_vahadane")
    """
    if method not in METHODS:
        raise InputError(f"unknown method={method!r}; use one of {list(METHODS)}.")
    if (reference is None) == (target is None):
        raise InputError(
            "pass exactly one of reference= (an RGB image array or a library id) and target= "
            "(reference statistics, e.g. the 'target' recorded by an earlier stain_normalize)."
        )
    if target is not None and (remove_colour_cast or standardize_luminosity):
        logger.info("stain_normalize: target statistics are used as given; pre-steps apply to the sources only")
    for name, value in (("max_fit_side", max_fit_side), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or int(value) != value or value < 16:
            raise InputError(f"{name}={value!r} must be an integer ≥ 16.")
    if not (np.isfinite(od_threshold) and od_threshold >= 0):
        raise InputError(f"od_threshold={od_threshold!r} must be a non-negative number.")
    key_added = key_added or f"{image_key or Images.FULLRES}_{method}"
    if key_added == Images.FULLRES or key_added == (image_key or Images.FULLRES):
        raise InputError(f"key_added={key_added!r} would replace the source image; choose another name.")
    sources = _library_sources(adata, image_key, library_id)
    for source in sources:
        entry = adata.uns[Uns.SPATIAL][source.library]
        scale_key = ScaleFactors.for_image(key_added)
        if not overwrite and (key_added in entry.get(Uns.IMAGES, {}) or scale_key in entry.get(Uns.SCALEFACTORS, {})):
            raise KeyExistsError(
                f"uns['spatial'][{source.library!r}] already has image {key_added!r} (or its scale "
                f"factor). Pass overwrite=True to replace it, or key_added='<new name>'."
            )
    check_record_writable(adata, _FUNCTION, key_added, overwrite=overwrite)

    options = {
        "remove_colour_cast": remove_colour_cast,
        "standardize_luminosity": standardize_luminosity,
        "od_threshold": float(od_threshold),
        "random_state": seed,
    }
    if target is not None:
        target_stats, reference_info = _check_target(target, method), {"kind": "target"}
    else:
        image, reference_info = _reference_image(adata, reference, image_key, int(max_fit_side))
        target_stats = _target_from(fit_stain_parameters(image, method=method, what="reference", **options))

    fitted, outputs = {}, {}
    for source in sources:
        sample = source.fit_sample(int(max_fit_side))
        params = fit_stain_parameters(sample, method=method, what=f"library {source.library!r}'s image", **options)
        fitted[source.library] = params
        if source.eager:
            out = _apply_in_memory(source.array, params, target_stats, keep_background=keep_background)
            if np.issubdtype(source.array.dtype, np.floating):
                out = (out / np.float32(255.0)).astype(np.float32)
        else:
            view = source.lazy(int(chunk_size))
            out = view.map_blocks(
                apply_stain_parameters,
                source=params,
                target=target_stats,
                keep_background=keep_background,
                dtype=np.uint8,
                meta=np.empty((0, 0, 0), dtype=np.uint8),
            )
        outputs[source.library] = (out, source.scale)

    adata = maybe_copy(adata, copy)
    for library, (image, scale) in outputs.items():
        entry = adata.uns[Uns.SPATIAL][library]
        entry.setdefault(Uns.IMAGES, {})[key_added] = image
        entry.setdefault(Uns.SCALEFACTORS, {})[ScaleFactors.for_image(key_added)] = scale
        logger.info("added adata.uns['spatial'][%r]['images'][%r]", library, key_added)
    record(
        adata,
        _FUNCTION,
        key_added,
        {
            "method": method,
            "source_image_key": image_key or Images.FULLRES,
            "libraries": list(outputs),
            "lazy": {library: not isinstance(image, np.ndarray) for library, (image, _) in outputs.items()},
            "reference": reference_info,
            "target": target_stats,
            "fitted": {library: {k: v for k, v in p.items() if v is not None} for library, p in fitted.items()},
            **options,
            "keep_background": keep_background,
            "max_fit_side": int(max_fit_side),
            "chunk_size": int(chunk_size),
        },
        overwrite=overwrite,
    )
    return adata if copy else None
