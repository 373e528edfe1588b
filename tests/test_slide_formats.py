"""Vendor slide formats: scale from tiffslide (optional extra), pixels lazily, clear errors.

tifffile can write Aperio-style SVS and pyramidal (OME-)TIFF files, so those are tested on files
written here. NDPI, SCN and BIF cannot be written by tifffile, and tiffslide ships no fixture
files (its own tests download OpenSlide's test data), so for them only the error raised without
the reader is tested.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import sthisto
from sthisto._errors import InputError

APERIO = "Aperio Image Library v12.0.15\r\n512x384 [0,0 512x384] (256x256) RGB|AppMag = 20|MPP = 0.4990"


def _pixels(shape=(384, 512)):
    return sthisto.datasets.synthetic_he_image(shape, microns_per_pixel=0.5, seed=5)


def _write_svs(path, pixels):
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        # Resolution tags disagree on purpose: the vendor's MPP must win.
        tif.write(pixels, tile=(256, 256), photometric="rgb", description=APERIO, resolution=(1e4, 1e4),
                  resolutionunit="CENTIMETER")  # fmt: skip
    return path


def test_svs_scale_comes_from_tiffslide_and_patches_read_lazily(tmp_path):
    pytest.importorskip("tiffslide", reason="optional slide reader tiffslide not installed (sthisto[slides])")
    pixels = _pixels()
    path = _write_svs(tmp_path / "slide.svs", pixels)
    slide = sthisto.io.read_image(path)
    record = slide.uns["sthisto"]["read_image"]["slide"]
    assert record["microns_per_pixel"] == pytest.approx(0.499)
    assert record["microns_per_pixel_source"] == "tiffslide (aperio) mpp-x"
    from sthisto._images import image_source

    region, clipped = image_source(slide, "slide").source.read(100, 200, 64, 64)
    np.testing.assert_array_equal(region, pixels[100:164, 200:264])
    assert not clipped


def test_svs_without_tiffslide_falls_back_to_the_aperio_description(tmp_path, monkeypatch):
    path = _write_svs(tmp_path / "slide.svs", _pixels())
    monkeypatch.setitem(sys.modules, "tiffslide", None)  # import tiffslide -> ImportError
    record = sthisto.io.read_image(path).uns["sthisto"]["read_image"]["slide"]
    assert record["microns_per_pixel"] == pytest.approx(0.499)
    assert record["microns_per_pixel_source"] == "Aperio MPP"


def test_vendor_formats_need_the_optional_reader(tmp_path, monkeypatch):
    import tifffile

    path = tmp_path / "scan.ndpi"
    tifffile.imwrite(path, _pixels((64, 64)), photometric="rgb")
    monkeypatch.setitem(sys.modules, "tiffslide", None)
    with pytest.raises(InputError, match=r"sthisto\[slides\]"):
        sthisto.io.read_image(path)


def test_non_tiff_slide_formats_say_how_to_convert(tmp_path):
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="bfconvert"):
        sthisto.io.read_image(path)


def test_ome_tiff_pyramid_scale_agrees_with_tiffslide(tmp_path):
    tiffslide = pytest.importorskip("tiffslide", reason="optional slide reader tiffslide not installed")
    from sthisto.io._image import _write_pyramidal_tiff

    def draw(origin, shape, mpp):
        return sthisto.datasets.synthetic_he_image(shape, origin=origin, microns_per_pixel=mpp, seed=2)

    path = _write_pyramidal_tiff(tmp_path / "s.ome.tif", (600, 700), draw, microns_per_pixel=0.25, n_levels=3, tile=128)
    slide = sthisto.io.read_image(path)
    with tiffslide.TiffSlide(str(path)) as reference:
        assert float(reference.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        levels = [tuple(reversed(d)) for d in reference.level_dimensions]
    assert slide.uns["sthisto"]["read_image"]["s"]["microns_per_pixel"] == pytest.approx(0.25)
    assert [tuple(level) for level in slide.uns["spatial"]["s"]["metadata"]["pyramid_levels"]] == levels
