"""Helpers the readers share: paths, image headers and thumbnails, scale geometry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .._constants import Metadata, Uns
from .._errors import InputError
from .._images import TIFF_SUFFIXES, image_size  # the readers import both from here

HIRES_MAX_SIDE = 2000
"""Longest side of the plotting image readers store as ``images['hires']`` (scanpy's size)."""


def existing_dir(path, *, what: str) -> Path:
    """Return ``path`` as a :class:`Path` if it is a folder, else raise a clear error."""
    if path is None:
        raise InputError(f"no path given for the {what}; pass the folder's location.")
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist. Check the path (it must be the folder itself).")
    if not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a file, not a folder. Pass the folder that contains it.")
    return path


def names_list(value, *, what: str) -> list[str] | None:
    """Normalise ``None`` / a string / a sequence of strings into a list, refusing duplicates."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise InputError(f"{what} must be a name or a list of names, not {type(value).__name__}.")
    names = [str(v) for v in value]
    if not names:
        raise InputError(f"{what} is empty; pass at least one name, or None for all.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{what} lists {duplicates} more than once; give each name once.")
    return names


def thumbnail(path: Path, max_side: int = HIRES_MAX_SIDE) -> tuple[np.ndarray, float]:
    """Decode a downscaled RGB copy of an image file (longest side ``max_side``).

    JPEGs are decoded at a reduced DCT scale (PIL's ``draft``) so a 9,000-px slide costs a
    fraction of a full decode. TIFFs are read through their pyramid when they have one.

    Returns
    -------
    image
        ``(height, width, 3)`` uint8.
    scale
        Thumbnail pixels per full-resolution pixel.
    """
    height, width = image_size(path)
    scale = min(1.0, max_side / max(height, width))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL order (w, h)
    try:
        from PIL import Image

        if path.suffix.lower() in TIFF_SUFFIXES:
            image = Image.fromarray(_tiff_overview(path, max_side))
        else:
            Image.MAX_IMAGE_PIXELS = None
            image = Image.open(path)
            image.draft("RGB", target)
        with image:
            small = image.convert("RGB").resize(target, Image.Resampling.BILINEAR)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"could not decode the image file {str(path)!r}: {err}. Is the file complete?") from err
    # scanpy keeps one scale factor per image; use the width ratio (rounding differs by < 1 px).
    return np.asarray(small, dtype=np.uint8), target[0] / width


def _tiff_overview(path: Path, max_side: int) -> np.ndarray:
    """Smallest pyramid level of a TIFF that is still at least ``max_side`` long, as RGB uint8."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        chosen = levels[0]
        for level in levels[1:]:
            axes = level.axes
            if max(level.shape[axes.index("Y")], level.shape[axes.index("X")]) >= max_side:
                chosen = level
        array = chosen.asarray()
        axes = chosen.axes
    if "S" not in axes and "C" in axes:
        array = np.moveaxis(array, axes.index("C"), -1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array / max(float(array.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
    return array


def read_small_image(path: Path) -> np.ndarray:
    """Decode a plotting-size image (Space Ranger hires/lowres PNG) as RGB uint8."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I"):
                array = np.asarray(img, dtype=np.float64)
                array = np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
                return np.repeat(array[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:
        raise InputError(f"could not decode the image file {str(path)!r}: {err}. Is the file complete?") from err


def pixels_per_unit(grid: np.ndarray, pixels: np.ndarray) -> float:
    """Pixels per grid unit from a least-squares affine fit of pixel coordinates on grid ones.

    The linear part's determinant is the area scale, so its square root is the length scale
    whatever rotation or slight shear the array has on the image.
    """
    grid = np.asarray(grid, dtype=float)
    pixels = np.asarray(pixels, dtype=float)
    ok = np.isfinite(grid).all(axis=1) & np.isfinite(pixels).all(axis=1)
    grid, pixels = grid[ok], pixels[ok]
    if len(grid) < 3:
        return float("nan")
    design = np.column_stack([grid, np.ones(len(grid))])
    if np.linalg.matrix_rank(design) < 3:
        return float("nan")
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    return float(np.sqrt(abs(np.linalg.det(coef[:2]))))


def median_spacing(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour (NaN with fewer than 2 spots)."""
    coords = np.asarray(coords, dtype=float)
    if len(coords) < 2:
        return float("nan")
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(distances[:, 1]))


def spatial_entry(
    *,
    images: dict | None = None,
    scalefactors: dict,
    image_path: str | None = None,
    has_image: bool,
    source: str,
) -> dict:
    """Build ``uns['spatial'][library_id]`` in the sthisto convention."""
    metadata = {Metadata.HAS_IMAGE: bool(has_image), Metadata.SOURCE: source}
    if image_path is not None:
        metadata[Metadata.IMAGE_PATH] = str(image_path)
    return {
        Uns.IMAGES: dict(images or {}),
        Uns.SCALEFACTORS: {k: _plain(v) for k, v in scalefactors.items()},
        Uns.METADATA: metadata,
    }


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def check_spots_inside(coords: np.ndarray, size: tuple[int, int], *, library_id: str, what: str) -> None:
    """Raise if spot centres (x, y) fall outside an image of ``size`` (height, width)."""
    height, width = size
    coords = np.asarray(coords, dtype=float)
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        raise InputError(
            f"{int(outside.sum())} of {len(coords)} spots of {library_id!r} lie outside {what} "
            f"({height} × {width} px): the image is not in the frame of the spot coordinates (another "
            f"scale or another section). Pass the full-resolution image the coordinates refer to."
        )


def sorted_names(names: Sequence[str]) -> list[str]:
    """Section names in natural order (``A2`` before ``A10``)."""
    import re

    def key(name: str):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return sorted(names, key=key)
