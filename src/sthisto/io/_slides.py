"""Vendor whole-slide formats through tiffslide, an optional, maintained reader.

Aperio SVS, Hamamatsu NDPI, Leica SCN and Ventana BIF are TIFF containers: tifffile reaches
their pixels lazily (the same engine tiffslide is built on), but their physical scale lives in
vendor-specific metadata that tiffslide parses for each format. sthisto therefore asks
tiffslide for the µm per pixel of these files, and reads pixels through tifffile's zarr store
as for any TIFF. 3DHISTECH MRXS is not a TIFF (an index file plus a folder of data files) and
no maintained pure-Python reader handles it; it raises a clear error with the conversion route.
"""

from __future__ import annotations

from pathlib import Path

from .._errors import InputError

VENDOR_SUFFIXES = {".svs": "Aperio SVS", ".ndpi": "Hamamatsu NDPI", ".scn": "Leica SCN", ".bif": "Ventana BIF"}
"""TIFF-based vendor formats whose scale tiffslide reads."""
UNSUPPORTED_SUFFIXES = {".mrxs": "3DHISTECH MRXS", ".vms": "Hamamatsu VMS", ".vsi": "Olympus VSI"}
"""Non-TIFF slide formats: a clear error explains how to convert them."""
INSTALL_HINT = "pip install 'sthisto[slides]' (or: pip install tiffslide)"


def tiffslide_available() -> bool:
    """Whether the optional slide reader can be imported."""
    try:
        import tiffslide  # noqa: F401
    except ImportError:
        return False
    return True


def check_supported(path: Path) -> None:
    """Raise a clear error for slide formats sthisto cannot read."""
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_SUFFIXES:
        raise InputError(
            f"{path.name!r} is a {UNSUPPORTED_SUFFIXES[suffix]} slide, which is not a TIFF container and has no "
            f"maintained pure-Python reader. Convert it to a pyramidal OME-TIFF first, e.g. with Bio-Formats "
            f"(bfconvert -pyramid-resolutions 4 {path.name} slide.ome.tif) or QuPath's export, and read that file."
        )
    if suffix in VENDOR_SUFFIXES and suffix != ".svs" and not tiffslide_available():
        raise InputError(
            f"reading {VENDOR_SUFFIXES[suffix]} slides ({path.name!r}) needs the optional slide reader tiffslide, "
            f"which is not installed: {INSTALL_HINT}."
        )


def vendor_mpp(path: Path) -> tuple[list[tuple[float, str]], str]:
    """µm/px candidates from tiffslide's parsing of a vendor slide's metadata (empty without tiffslide)."""
    if path.suffix.lower() not in VENDOR_SUFFIXES or not tiffslide_available():
        return [], ""
    import tiffslide

    try:
        with tiffslide.TiffSlide(str(path)) as slide:
            properties = dict(slide.properties)
    except Exception as err:
        raise InputError(f"tiffslide could not open {str(path)!r}: {err}. Is the file complete?") from err
    vendor = properties.get("tiffslide.vendor") or "generic"
    value = properties.get("tiffslide.mpp-x")
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        return [], f"tiffslide ({vendor}) found no mpp"
    return [(value, f"tiffslide ({vendor}) mpp-x")], ""
