"""One tissue definition: ``pp._tissue.tissue_pixels`` and the callers that go through it."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from sthisto._errors import InputError
from sthisto.datasets import synthetic_he_image
from sthisto.pp import _stain, _tissue
from sthisto.pp._tissue import TISSUE_RULES, compute_mask, tissue_pixels

# Seven pixels whose rules were worked out by hand (255·e^-0.15 = 219.5, 255·10^-0.15 = 180.5):
PIXELS = np.array(
    [
        [255, 255, 255],  # glass: no rule calls it tissue
        [230, 230, 235],  # faint grey: saturation 0.021, ln OD ≤ 0.103
        [220, 200, 220],  # one channel above 219.5, none below 180.5
        [219, 150, 200],  # every channel ≤ 219, one below 180.5
        [180, 100, 160],  # clearly stained
        [250, 170, 250],  # one dark channel only: "any" yes, "every" no
        [30, 30, 30],  # dark (brightest channel < 15 %): excluded by the slide rules
    ],
    dtype=np.uint8,
)[None]


def test_fixed_rules_on_hand_computed_pixels():
    every, cut = tissue_pixels(PIXELS, rule="od_every_channel")
    assert cut == 0.15
    assert every[0].tolist() == [False, False, False, True, True, False, True]
    any_, _ = tissue_pixels(PIXELS, rule="od10_any_channel")
    assert any_[0].tolist() == [False, False, False, True, True, True, True]
    # A float image on the 0–255 scale gives the same answer as its uint8 original.
    assert tissue_pixels(PIXELS.astype(np.float32), rule="od_every_channel")[0].tolist() == every.tolist()


def test_slide_rules_on_hand_computed_pixels():
    # saturation = (max − min) / max: 0, 0.021, 0.091, 0.315, 0.444, 0.32, (dark)
    mask, cut = tissue_pixels(PIXELS, rule="saturation", threshold=0.1)
    assert cut == 0.1 and mask[0].tolist() == [False, False, False, True, True, True, False]
    # summed −ln(I/255): 0, 0.288, 0.538, 0.926, ...; the dark pixel is excluded whatever its density
    mask, _ = tissue_pixels(PIXELS, rule="od_sum", threshold=0.5)
    assert mask[0].tolist() == [False, False, True, True, True, False, False]  # pixel 5 sums to 0.445
    # Glass and faint grey only: Otsu falls between them, below the floor, so nothing is tissue.
    mask, cut = tissue_pixels(PIXELS[:, :2], rule="saturation")
    assert cut == _tissue.MIN_SATURATION and not mask.any()
    mask, cut = tissue_pixels(np.full((4, 4, 3), 255, np.uint8), rule="od_sum")
    assert cut == float("inf") and not mask.any()


def test_rules_match_their_formulas_on_a_synthetic_slide():
    image = synthetic_he_image((96, 128), microns_per_pixel=2.0, seed=3)
    intensity = np.maximum(image[..., :3].astype(np.float64), 1.0) / 255.0
    macenko = (-np.log(intensity) > 0.15).all(axis=-1)
    histospace = (-np.log10(intensity) > 0.15).any(axis=-1)
    assert 0.05 < macenko.mean() < 0.95 and 0.05 < histospace.mean() < 0.95  # both classes present
    np.testing.assert_array_equal(tissue_pixels(image, rule="od_every_channel")[0], macenko)
    np.testing.assert_array_equal(tissue_pixels(image, rule="od10_any_channel")[0], histospace)
    rgb = image[..., :3].astype(np.float32) / 255.0
    usable = rgb.max(axis=-1) >= 0.15
    saturation = (rgb.max(axis=-1) - rgb.min(axis=-1)) / np.maximum(rgb.max(axis=-1), 1e-6)
    otsu = max(float(threshold_otsu(saturation[usable])), _tissue.MIN_SATURATION)
    mask, cut = tissue_pixels(image, rule="saturation")
    assert cut == pytest.approx(otsu)
    np.testing.assert_array_equal(mask, (saturation > otsu) & usable)


def test_every_tissue_definition_goes_through_the_one_function(monkeypatch):
    from sthisto.models import histospace

    calls = []
    original = _tissue.tissue_pixels

    def spy(rgb, *, rule, threshold=None):
        calls.append(rule)
        return original(rgb, rule=rule, threshold=threshold)

    monkeypatch.setattr(_tissue, "tissue_pixels", spy)
    image = synthetic_he_image((64, 64), microns_per_pixel=2.0, seed=1)
    np.testing.assert_array_equal(_stain.tissue_mask(image), original(image, rule="od_every_channel")[0])
    assert calls == ["od_every_channel"]
    _stain.fit_stain_parameters(image, method="macenko")
    assert calls[-1] == "od_every_channel" and len(calls) == 2
    np.testing.assert_array_equal(histospace.tissue_mask(image), original(image, rule="od10_any_channel")[0])
    assert calls[-1] == "od10_any_channel"
    compute_mask(image, microns_per_pixel=8.0, method="otsu")
    compute_mask(image, microns_per_pixel=8.0, method="od")
    assert calls[-2:] == ["saturation", "od_sum"]
    assert set(calls) == set(TISSUE_RULES)


def test_bad_rule_or_image_is_refused():
    with pytest.raises(InputError, match="not a tissue rule"):
        tissue_pixels(PIXELS, rule="otsu")
    with pytest.raises(InputError, match=r"\(\.\.\., 3\) RGB"):
        tissue_pixels(np.zeros((4, 2), np.uint8), rule="saturation")  # two channels
