"""Synthetic H&E images that can be drawn region by region.

Every pixel is a function of its *absolute* position (in µm) and of the seeds only, never of
the region being drawn: smooth tissue fields are value noise on fixed lattices (node values
come from an integer hash of the node's index), and nuclei come from a hashed point process on
a fixed 16 µm cell grid. Drawing a region alone therefore gives exactly the pixels of the same
region cut out of a larger drawing, which lets whole-slide images be written tile by tile in
bounded memory.

Pipeline for one region (all in :meth:`_Section.render`, block by block):

1. Smooth fields (region scores, density/size/eosin modulation, tissue outline, fibre
   coordinate) are evaluated on an 8 µm lattice anchored at the frame's origin, then
   bilinearly resampled to the pixels. Region labels (stroma, tumour, immune, adipose) are
   thresholds of these fields. Blocks lying wholly on glass skip everything but the colour.
2. Nuclei: each 16 µm cell holds up to six hashed candidates, kept with a probability set by
   the region and density at the candidate (a thinned Poisson process); each kept nucleus is
   an ellipse whose size, shape, darkness and orientation follow its region (stromal nuclei
   lie along the fibres), stamped with soft edges and chromatin grain.
3. Stain concentrations (haematoxylin, eosin) per pixel: region background; collagen bands
   across a warped fibre coordinate; fat cells (Worley cells on a 75 µm lattice whose seed
   lies in adipose tissue: white with thin eosin membranes); nuclei; zero outside the ragged
   tissue outline.
4. Colour by Beer-Lambert absorption with the section's stain vectors, through a dithered
   look-up table over (haematoxylin, eosin).

Only integer arithmetic, +, -, *, / and square roots touch per-pixel values (no
transcendental functions, whose vectorised implementations may round differently at array
boundaries), so equal positions give bit-identical pixels.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .._errors import InputError

REGIONS: tuple[str, ...] = ("stroma", "tumour", "immune", "adipose")
"""Region names; a label map holds the index of the name (255 outside the tissue)."""
STROMA, TUMOUR, IMMUNE, ADIPOSE = range(4)
BACKGROUND = 255
"""Label of pixels outside the tissue."""

_COARSE_UM = 8.0  # spacing of the lattice smooth fields are evaluated on
_CELL_UM = 16.0  # nuclei point-process cell
_CANDIDATES = 6  # nucleus candidates per cell (caps density at 6 / 256 µm²)
_REACH_UM = 10.0  # no nucleus extends farther than this from its centre
_TILE = 512  # pixels per side of the blocks a large region is drawn in
_GRAIN = 256  # side of the per-pixel grain table (a period far above any visible scale)
# Standard deviation of one octave of value noise with U(-1, 1) node values and smoothstep
# weights: Var = (1/3) * (E[(1-s)^2 + s^2])^2 with E[...] = 26/35 for s = 3f^2 - 2f^3.
_NOISE_SD = math.sqrt((26.0 / 35.0) ** 2 / 3.0)

# Per region (stroma, tumour, immune, adipose): stain backgrounds and nuclei.
_BG_HAEM = np.array([0.035, 0.11, 0.07, 0.0], dtype=np.float32)
_BG_EOSIN = np.array([0.14, 0.24, 0.11, 0.0], dtype=np.float32)
_FIBRE = np.array([0.60, 0.04, 0.05, 0.0], dtype=np.float32)
_NUCLEI_PER_UM2 = np.array([1 / 420, 1 / 130, 1 / 50, 1 / 2500], dtype=np.float64)
_SEMI_MAJOR_UM = np.array([5.6, 4.8, 3.3, 4.5], dtype=np.float64)
_SIZE_SPREAD = np.array([0.15, 0.30, 0.12, 0.1], dtype=np.float64)
_ASPECT = np.array([[0.22, 0.40], [0.60, 0.95], [0.80, 1.00], [0.25, 0.40]], dtype=np.float64)
_DARKNESS = np.array([0.95, 0.72, 1.10, 0.85], dtype=np.float64)

# Colour look-up table over quantised (haematoxylin, eosin) concentrations.
_H_LEVELS, _H_MAX = 128, 2.4
_E_LEVELS, _E_MAX = 128, 1.3

_U64 = np.uint64
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53
# Independent draws per nucleus candidate: its hash xor-ed with these before mixing.
_DRAW = tuple(_U64((0x9E3779B97F4A7C15 * (j + 1)) % 2**64) for j in range(7))
_STAMP_RADII = np.array([2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 90, 128, 181, 256])
_GLASS_UM = 3.0  # a block whose outline distance exceeds this everywhere is bare glass
_CACHE_NODES = 2_000_000  # lattice nodes precomputed at once for a region (~13 fields × 4 B)


# --------------------------------------------------------------------------------------------
# hashing and value noise
# --------------------------------------------------------------------------------------------


def _stream(*parts) -> int:
    """A 64-bit stream id for named random quantities, stable across runs and platforms."""
    text = ":".join(str(int(p)) if isinstance(p, (int, np.integer)) else str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (bijective avalanche on uint64)."""
    h = h ^ (h >> _U64(30))
    h = h * _MIX1
    h = h ^ (h >> _U64(27))
    h = h * _MIX2
    return h ^ (h >> _U64(31))


def _as_u64(values) -> np.ndarray:
    return np.atleast_1d(np.ascontiguousarray(values, dtype=np.int64)).view(np.uint64)


def _hash(stream: int, *coords) -> np.ndarray:
    """uint64 hash of broadcastable integer coordinate arrays within a stream."""
    h = _mix(_as_u64(coords[0]) * _GOLDEN ^ _U64(stream))
    for c in coords[1:]:
        h = _mix(h ^ (_as_u64(c) * _GOLDEN))
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes → float64 uniform in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * _TO_UNIT


def _nodes(stream: int, iy, ix) -> np.ndarray:
    """Value-noise node values in [-1, 1) (float32)."""
    return (_unit(_hash(stream, iy, ix)) * 2.0 - 1.0).astype(np.float32)


def _lattice(coord_um, spacing_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer lattice cell and fractional position (float64) of coordinates."""
    t = np.asarray(coord_um, dtype=np.float64) / spacing_um
    cell = np.floor(t)
    return cell.astype(np.int64), t - cell


def _smoothstep(f: np.ndarray) -> np.ndarray:
    return (f * f * (3.0 - 2.0 * f)).astype(np.float32)


def _noise_grid(stream: int, spacing: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One octave of value noise on the grid ``y × x`` (µm, 1-D each) → (len(y), len(x)).

    Separable: interpolate along x for the lattice rows needed, then along y. The operations
    per output value are those of :func:`_noise_points`, in the same order.
    """
    iy, fy = _lattice(y, spacing)
    ix, fx = _lattice(x, spacing)
    sy, sx = _smoothstep(fy), _smoothstep(fx)
    y0, x0 = int(iy.min()), int(ix.min())
    rows = np.arange(y0, int(iy.max()) + 2)[:, None]
    cols = np.arange(x0, int(ix.max()) + 2)[None, :]
    nodes = _nodes(stream, rows, cols)
    jx = ix - x0
    along_x = nodes[:, jx] * (1 - sx) + nodes[:, jx + 1] * sx
    jy = iy - y0
    return along_x[jy] * (1 - sy)[:, None] + along_x[jy + 1] * sy[:, None]


def _noise_points(stream: int, spacing: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One octave of value noise at points (``y``, ``x`` same shape, µm)."""
    iy, fy = _lattice(y, spacing)
    ix, fx = _lattice(x, spacing)
    sy, sx = _smoothstep(fy), _smoothstep(fx)
    top = _nodes(stream, iy, ix) * (1 - sx) + _nodes(stream, iy, ix + 1) * sx
    bottom = _nodes(stream, iy + 1, ix) * (1 - sx) + _nodes(stream, iy + 1, ix + 1) * sx
    return top * (1 - sy) + bottom * sy


def _fractal(stream: int, octaves, y, x, *, grid: bool) -> np.ndarray:
    """Sum of octaves ``[(spacing_um, amplitude), ...]`` scaled to unit standard deviation."""
    evaluate = _noise_grid if grid else _noise_points
    total = None
    for k, (spacing, amplitude) in enumerate(octaves):
        term = evaluate(_stream(stream, k), spacing, y, x) * np.float32(amplitude)
        total = term if total is None else total + term
    norm = _NOISE_SD * math.sqrt(sum(a * a for _, a in octaves))
    return total * np.float32(1.0 / norm)


# Octaves (lattice spacing µm, amplitude) of each smooth field.
_OCTAVES = {
    "tumour": ((550.0, 1.0), (180.0, 0.45)),
    "immune": ((380.0, 1.0), (120.0, 0.45)),
    "adipose": ((700.0, 1.0), (220.0, 0.4)),
    "density": ((300.0, 1.0), (100.0, 0.4)),
    "size": ((300.0, 1.0),),
    "eosin": ((260.0, 1.0),),
    "fibre": ((320.0, 1.0),),
    "warp": ((200.0, 1.0), (70.0, 0.25)),
    "breaks": ((24.0, 1.0),),
    "ragged": ((45.0, 1.0), (14.0, 0.5)),
}
_LOBES = ((0.55, 1.0),)  # in units of the tissue radius
_LOBE_AMPLITUDE = 0.22  # × radius
_RAGGED_UM = 9.0
_WARP_UM = 30.0
_FIBRE_SPACING_UM = 14.0
_ADIPOCYTE_UM = 75.0
_MEMBRANE_UM = 2.2


# --------------------------------------------------------------------------------------------
# section parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """Patient-level look: stain colours and tissue composition."""

    haematoxylin_od: tuple[float, float, float]
    eosin_od: tuple[float, float, float]
    glass_od: tuple[float, float, float]
    tumour_fraction: float
    immune_fraction: float
    adipose_fraction: float

    @classmethod
    def from_seed(cls, style_seed: int) -> _Style:
        rng = np.random.default_rng(_stream("style", style_seed))
        haem = np.array([0.62, 0.66, 0.30]) * rng.uniform(0.88, 1.12) * rng.uniform(0.94, 1.06, 3)
        eosin = np.array([0.18, 0.80, 0.34]) * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, 3)
        glass = np.array([0.016, 0.024, 0.018]) * rng.uniform(0.8, 1.2, 3)
        return cls(
            haematoxylin_od=tuple(float(v) for v in haem),
            eosin_od=tuple(float(v) for v in eosin),
            glass_od=tuple(float(v) for v in glass),
            tumour_fraction=float(np.clip(rng.normal(0.35, 0.08), 0.12, 0.65)),
            immune_fraction=float(np.clip(rng.normal(0.22, 0.06), 0.05, 0.45)),
            adipose_fraction=float(np.clip(rng.normal(0.18, 0.06), 0.03, 0.40)),
        )


@dataclass(frozen=True)
class _Outline:
    """Tissue outline: a lobed, rotated ellipse with a ragged edge (all in µm)."""

    center_y: float
    center_x: float
    radius: float
    aspect: float
    cos_angle: float
    sin_angle: float
    stream: int

    def distance(self, y, x, *, grid: bool) -> np.ndarray:
        """Approximate signed distance to the edge in µm (negative inside), float32.

        Evaluated relative to the centre, so the outline moves with ``center_*`` unchanged.
        """
        if grid:
            dy = (np.asarray(y, dtype=np.float64) - self.center_y)[:, None]
            dx = (np.asarray(x, dtype=np.float64) - self.center_x)[None, :]
            ny, nx = dy[:, 0], dx[0]
        else:
            dy = np.asarray(y, dtype=np.float64) - self.center_y
            dx = np.asarray(x, dtype=np.float64) - self.center_x
            ny, nx = dy, dx
        u = (self.cos_angle * dx + self.sin_angle * dy) / (self.radius * self.aspect)
        v = (self.cos_angle * dy - self.sin_angle * dx) * (self.aspect / self.radius)
        rho = np.sqrt(u * u + v * v).astype(np.float32)
        lobes = _fractal(_stream(self.stream, "lobes"), _LOBES, ny / self.radius, nx / self.radius, grid=grid)
        ragged = _fractal(_stream(self.stream, "ragged"), _OCTAVES["ragged"], ny, nx, grid=grid)
        radius = np.float32(self.radius)
        return (rho - 1) * radius + lobes * (np.float32(_LOBE_AMPLITUDE) * radius) + ragged * np.float32(_RAGGED_UM)


@dataclass(frozen=True)
class _Section:
    """Everything that fixes one section's image."""

    seed: int
    style: _Style
    outline: _Outline | None
    thresholds: tuple[float, float, float]  # tumour, immune, adipose field thresholds
    fibre_cos: float
    fibre_sin: float

    @classmethod
    def create(
        cls,
        seed: int,
        style_seed: int | None = None,
        *,
        tissue_center_um: tuple[float, float] | None = None,
        tissue_radius_um: float | None = None,
    ) -> _Section:
        style = _Style.from_seed(seed if style_seed is None else style_seed)
        rng = np.random.default_rng(_stream("section", seed))
        jitter = rng.normal(0.0, 0.05, 3)
        fractions = (
            np.clip(style.tumour_fraction + jitter[0], 0.05, 0.8),
            np.clip(style.immune_fraction + jitter[1], 0.02, 0.6),
            np.clip(style.adipose_fraction + jitter[2], 0.02, 0.6),
        )
        # Labels are exclusive (tumour, then immune, then adipose): conditional fractions are
        # turned into thresholds of the unit-variance fields by the normal quantile.
        thresholds = tuple(float(NormalDist().inv_cdf(1.0 - f)) for f in fractions)
        angle = rng.uniform(0.0, math.pi)
        outline = None
        outline_angle = rng.uniform(0.0, math.pi)
        aspect = math.exp(rng.uniform(-0.3, 0.3))
        if tissue_radius_um is not None:
            cy, cx = tissue_center_um
            outline = _Outline(
                center_y=float(cy),
                center_x=float(cx),
                radius=float(tissue_radius_um),
                aspect=aspect,
                cos_angle=math.cos(outline_angle),
                sin_angle=math.sin(outline_angle),
                stream=_stream(seed, "outline"),
            )
        return cls(
            seed=int(seed),
            style=style,
            outline=outline,
            thresholds=thresholds,
            fibre_cos=math.cos(angle),
            fibre_sin=math.sin(angle),
        )

    # ---------------------------------------------------------------- smooth fields
    def _field(self, name: str, y, x, *, grid: bool) -> np.ndarray:
        return _fractal(_stream(self.seed, name), _OCTAVES[name], y, x, grid=grid)

    def tissue_distance(self, y, x, *, grid: bool = False) -> np.ndarray:
        """Signed distance to the tissue edge in µm (negative inside), float32.

        Without an outline the whole plane is tissue (a large negative constant).
        """
        if self.outline is None:
            shape = (len(y), len(x)) if grid else np.shape(y)
            return np.full(shape, -1e6, dtype=np.float32)
        return self.outline.distance(y, x, grid=grid)

    def region_scores(self, y, x, *, grid: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tumour, immune and adipose scores; a region is present where its score is > 0."""
        tumour = self._field("tumour", y, x, grid=grid)
        immune = self._field("immune", y, x, grid=grid)
        # Immune cells gather at tumour borders (where the tumour field crosses zero).
        border = np.maximum(np.float32(0.0), 1 - tumour * tumour * np.float32(2.0))
        immune = immune + border * np.float32(0.6)
        adipose = self._field("adipose", y, x, grid=grid)
        t_tumour, t_immune, t_adipose = (np.float32(t) for t in self.thresholds)
        return tumour - t_tumour, immune - t_immune, adipose - t_adipose

    def coarse(self, yc: np.ndarray, xc: np.ndarray, distance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Smooth quantities on the lattice nodes ``yc × xc`` (µm)."""
        tumour, immune, adipose = self.region_scores(yc, xc, grid=True)
        region = np.full(tumour.shape, STROMA, dtype=np.uint8)
        region[adipose > 0] = ADIPOSE
        region[immune > 0] = IMMUNE
        region[tumour > 0] = TUMOUR
        if distance is None:
            distance = self.tissue_distance(yc, xc, grid=True)
        label = region.copy()
        label[distance >= 0] = BACKGROUND
        # Fat cells are drawn per pixel, following their membranes (see _adipocytes); under
        # them, adipose nodes take the stromal background.
        region[region == ADIPOSE] = STROMA

        eosin = np.clip(1 + self._field("eosin", yc, xc, grid=True) * np.float32(0.25), 0.5, 1.6)
        fibre = np.clip(0.55 + self._field("fibre", yc, xc, grid=True) * np.float32(0.35), 0.05, 1.3)
        breaks = np.clip(0.55 + self._field("breaks", yc, xc, grid=True) * np.float32(0.3), 0.0, 1.0)
        warp = self._field("warp", yc, xc, grid=True)
        fibre_coord = (
            np.float32(self.fibre_cos) * xc.astype(np.float32)[None, :]
            + np.float32(self.fibre_sin) * yc.astype(np.float32)[:, None]
            + warp * np.float32(_WARP_UM)
        )
        return {
            "label": label,
            "region": region,
            "distance": distance,
            "haematoxylin": _BG_HAEM[region],
            "eosin": _BG_EOSIN[region] * eosin,
            "fibre": _FIBRE[region] * eosin * fibre * breaks,
            "fibre_coord": fibre_coord,
            "density": np.clip(1 + self._field("density", yc, xc, grid=True) * np.float32(0.35), 0.4, 1.8),
            "size": np.clip(1 + self._field("size", yc, xc, grid=True) * np.float32(0.17), 0.6, 1.5),
        }

    # ---------------------------------------------------------------- colour
    @staticmethod
    def colour_table_for(style: _Style) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Red, green and blue (uint8) of each quantised (haematoxylin, eosin) pair."""
        h = (np.arange(_H_LEVELS) * (_H_MAX / (_H_LEVELS - 1)))[:, None, None]
        e = (np.arange(_E_LEVELS) * (_E_MAX / (_E_LEVELS - 1)))[None, :, None]
        od = np.asarray(style.glass_od) + h * np.asarray(style.haematoxylin_od) + e * np.asarray(style.eosin_od)
        rgb = np.clip(np.rint(255.0 * np.power(10.0, -od)), 0, 255).astype(np.uint8).reshape(-1, 3)
        return tuple(np.ascontiguousarray(rgb[:, c]) for c in range(3))

    # ---------------------------------------------------------------- drawing
    def render(self, y0: int, x0: int, height: int, width: int, mpp: float, *, maps: bool = False, cache=None):
        """Draw pixels ``[y0, y0+height) × [x0, x0+width)`` at ``mpp`` µm per pixel.

        Returns the RGB array, and with ``maps=True`` also a dict with the stain
        concentrations ``haematoxylin`` / ``eosin`` (float32), ``label`` (uint8) and the
        nuclei whose centres lie in the region (``y_um``, ``x_um``, ``area_um2``, ``region``).
        ``cache`` (a :class:`_LatticeCache`) supplies the smooth fields precomputed over a
        larger region; the values are the same either way.
        """
        rows = np.arange(y0, y0 + height, dtype=np.int64)
        cols = np.arange(x0, x0 + width, dtype=np.int64)
        y_um = (rows + 0.5) * mpp
        x_um = (cols + 0.5) * mpp
        grain = self._grain(rows, cols)

        cy0, cy1, cx0, cx1 = _node_range(y0, x0, height, width, mpp)
        if cache is not None and cache.covers(cy0, cy1, cx0, cx1):
            distance, get_coarse = cache.block(cy0, cy1, cx0, cx1)
        else:
            yc, xc = np.arange(cy0, cy1) * _COARSE_UM, np.arange(cx0, cx1) * _COARSE_UM
            distance = self.tissue_distance(yc, xc, grid=True)

            def get_coarse():
                return self.coarse(yc, xc, distance)

        iy, fy = _lattice(y_um, _COARSE_UM)
        ix, fx = _lattice(x_um, _COARSE_UM)
        iy -= cy0
        ix -= cx0
        # A pixel interpolates the lattice rows iy, iy + 1 and columns ix, ix + 1; where all of
        # them are far outside the outline it is bare glass, and drawing it through the glass
        # path below gives the same values as the full path (tissue mask 0).
        maybe = distance < _GLASS_UM
        tissue_rows = np.flatnonzero(maybe.any(axis=1)[iy] | maybe.any(axis=1)[iy + 1])
        tissue_cols = np.flatnonzero(maybe.any(axis=0)[ix] | maybe.any(axis=0)[ix + 1])
        if tissue_rows.size == 0 or tissue_cols.size == 0:
            zero = np.zeros((height, width), dtype=np.float32)
            rgb = self._colour(zero, zero, grain)
            if not maps:
                return rgb
            label = np.full((height, width), BACKGROUND, dtype=np.uint8)
            return rgb, {"haematoxylin": zero, "eosin": zero, "label": label, "nuclei": _no_nuclei()}
        r0, r1 = int(tissue_rows[0]), int(tissue_rows[-1]) + 1
        c0, c1 = int(tissue_cols[0]), int(tissue_cols[-1]) + 1
        if (r1 - r0) * (c1 - c0) < 0.8 * height * width:  # draw only the tissue's bounding box
            zero = np.zeros((height, width), dtype=np.float32)
            rgb = self._colour(zero, zero, grain)
            inner = self.render(y0 + r0, x0 + c0, r1 - r0, c1 - c0, mpp, maps=maps, cache=cache)
            if not maps:
                rgb[r0:r1, c0:c1] = inner
                return rgb
            rgb[r0:r1, c0:c1] = inner[0]
            label = np.full((height, width), BACKGROUND, dtype=np.uint8)
            label[r0:r1, c0:c1] = inner[1]["label"]
            haem, eosin = zero, np.zeros_like(zero)
            haem[r0:r1, c0:c1] = inner[1]["haematoxylin"]
            eosin[r0:r1, c0:c1] = inner[1]["eosin"]
            return rgb, {"haematoxylin": haem, "eosin": eosin, "label": label, "nuclei": inner[1]["nuclei"]}
        coarse = get_coarse()
        near_y, near_x = iy + (fy >= 0.5), ix + (fx >= 0.5)
        weights = (iy, fy.astype(np.float32), ix, fx.astype(np.float32))
        label = coarse["region"].take(near_y, axis=0).take(near_x, axis=1)

        haem = _upsample(coarse["haematoxylin"], *weights)
        eosin = _upsample(coarse["eosin"], *weights)
        eosin += _upsample(coarse["fibre"], *weights) * self._bands(_upsample(coarse["fibre_coord"], *weights))

        nuclei_map, nuclei = self._nuclei(coarse, cy0, cx0, y0, x0, height, width, mpp)
        nuclei_map *= np.float32(0.7) + np.float32(0.6) * grain  # chromatin grain
        haem += nuclei_map

        self._adipocytes(haem, eosin, label, y_um, x_um, cache)  # fat cells push everything else aside

        if float(coarse["distance"].max()) > -_GLASS_UM:
            distance = _upsample(coarse["distance"], *weights)
            edge_grain = self._grain(rows + 101, cols + 37)
            distance += (edge_grain - np.float32(0.5)) * np.float32(4.0)  # ragged at pixel scale
            inside = np.clip(np.float32(0.5) - distance * np.float32(1 / 1.5), 0.0, 1.0)
            haem *= inside
            eosin *= inside
            label[inside < 0.5] = BACKGROUND

        rgb = self._colour(haem, eosin, grain)
        if not maps:
            return rgb
        return rgb, {"haematoxylin": haem, "eosin": eosin, "label": label, "nuclei": nuclei}

    def _bands(self, coord: np.ndarray) -> np.ndarray:
        """Collagen bands across the warped fibre coordinate (µm), values in [0, 1].

        The sum of two triangle waves of incommensurate periods, sharpened, gives bands of
        uneven width and strength without table look-ups.
        """
        band = _triangle(coord, _FIBRE_SPACING_UM, 0.0)
        band += _triangle(coord, _FIBRE_SPACING_UM * 0.618, 0.37)
        band *= np.float32(1.3)
        band -= np.float32(0.9)
        return np.clip(band, 0.0, 1.0, out=band)

    def _grain(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Per-pixel uniform [0, 1) noise, periodic over 256 px (float32)."""
        table = _grain_table(self.seed)
        r0, c0 = int(rows[0] % _GRAIN), int(cols[0] % _GRAIN)
        # Slicing a tiled table beats a 2-D fancy gather by far.
        tiled = np.tile(table, (-(-(len(rows) + r0) // _GRAIN), -(-(len(cols) + c0) // _GRAIN)))
        return tiled[r0 : r0 + len(rows), c0 : c0 + len(cols)]

    def _nuclei(self, coarse, cy0, cx0, y0, x0, height, width, mpp):
        """Stamp the nuclei reaching the region; return their haematoxylin map and table."""
        y_lo, y_hi = y0 * mpp - _REACH_UM, (y0 + height) * mpp + _REACH_UM
        x_lo, x_hi = x0 * mpp - _REACH_UM, (x0 + width) * mpp + _REACH_UM
        gy = np.arange(math.floor(y_lo / _CELL_UM), math.floor(y_hi / _CELL_UM) + 1)
        gx = np.arange(math.floor(x_lo / _CELL_UM), math.floor(x_hi / _CELL_UM) + 1)
        shape = (len(gy), len(gx), _CANDIDATES)
        base = _hash(
            _stream(self.seed, "nuclei"), gy[:, None, None], gx[None, :, None], np.arange(_CANDIDATES)[None, None, :]
        )
        base = base.reshape(-1)
        ny = (np.broadcast_to(gy[:, None, None], shape).reshape(-1) + _unit(_mix(base ^ _DRAW[0]))) * _CELL_UM
        nx = (np.broadcast_to(gx[None, :, None], shape).reshape(-1) + _unit(_mix(base ^ _DRAW[1]))) * _CELL_UM
        # Region, density and size at the candidate's nearest lattice node.
        ky = np.rint(ny / _COARSE_UM).astype(np.int64) - cy0
        kx = np.rint(nx / _COARSE_UM).astype(np.int64) - cx0
        label = coarse["label"][ky, kx]
        region = np.where(label == BACKGROUND, 0, label)
        rate = _NUCLEI_PER_UM2[region] * coarse["density"][ky, kx] * (_CELL_UM**2 / _CANDIDATES)
        keep = (ny > y_lo) & (ny < y_hi) & (nx > x_lo) & (nx < x_hi) & (label != BACKGROUND)
        keep &= _unit(_mix(base ^ _DRAW[2])) < rate
        if not keep.any():
            return np.zeros((height, width), dtype=np.float32), _no_nuclei()
        base, ny, nx, region = base[keep], ny[keep], nx[keep], region[keep]
        size = coarse["size"][ky[keep], kx[keep]].astype(np.float64)
        d_size, d_aspect, d_angle, d_dark = (_unit(_mix(base ^ _DRAW[j])) for j in range(3, 7))
        semi_major = _SEMI_MAJOR_UM[region] * size * (1 + _SIZE_SPREAD[region] * (2 * d_size - 1))
        semi_minor = semi_major * (_ASPECT[region, 0] + (_ASPECT[region, 1] - _ASPECT[region, 0]) * d_aspect)
        dark = _DARKNESS[region] * (0.85 + 0.3 * d_dark)
        # Orientation as a unit vector from a rational parametrisation of the half circle;
        # stromal nuclei lie along the fibres (perpendicular to the fibre coordinate's gradient).
        stromal = region == STROMA
        tan_half = np.where(stromal, 0.15 * (2 * d_angle - 1), 2 * d_angle - 1)
        rc = (1 - tan_half**2) / (1 + tan_half**2)
        rs = 2 * tan_half / (1 + tan_half**2)
        fc, fs = -self.fibre_sin, self.fibre_cos
        ax = np.where(stromal, fc * rc - fs * rs, rc)
        ay = np.where(stromal, fs * rc + fc * rs, rs)
        # Ellipse as a quadratic form in (dx, dy) µm: q = A dx² + B dx dy + C dy², inside q < 1.
        inv_a2, inv_b2 = 1 / semi_major**2, 1 / semi_minor**2
        quad_a = (ax * ax * inv_a2 + ay * ay * inv_b2).astype(np.float32)
        quad_b = (2 * ax * ay * (inv_a2 - inv_b2)).astype(np.float32)
        quad_c = (ay * ay * inv_a2 + ax * ax * inv_b2).astype(np.float32)
        # Edge softness of ~half a pixel (at least 0.3 µm) across the minor axis.
        slope = (dark * semi_minor / (2 * np.maximum(0.6 * mpp, 0.3))).astype(np.float32)
        dark32 = dark.astype(np.float32)

        row = np.floor(ny / mpp).astype(np.int64)  # absolute pixel holding the centre
        col = np.floor(nx / mpp).astype(np.int64)
        # Pixel centres within semi_major of the nucleus centre lie within this many pixels
        # of its pixel; stamps go into a padded canvas so no bounds test is needed.
        radius_px = np.ceil(semi_major / mpp + 0.5).astype(np.int64)
        pad = int(radius_px.max()) + math.ceil(_REACH_UM / mpp) + 1  # centres lie within the reach
        padded_width = width + 2 * pad
        canvas = np.zeros((height + 2 * pad) * padded_width, dtype=np.float32)
        anchor = (row - y0 + pad) * padded_width + (col - x0 + pad)
        size_class = np.searchsorted(_STAMP_RADII, radius_px)
        for cls in np.unique(size_class):
            members = np.flatnonzero(size_class == cls)
            r = int(radius_px[members].max())
            offsets = np.arange(-r, r + 1)
            # Stamp pixels along the first axis and nuclei along the second, so every
            # operation runs over long contiguous rows.
            dy = ((row[members] + offsets[:, None] + 0.5) * mpp - ny[members]).astype(np.float32)
            dx = ((col[members] + offsets[:, None] + 0.5) * mpp - nx[members]).astype(np.float32)
            q = (quad_c[members] * dy * dy)[:, None, :] + (quad_a[members] * dx * dx)[None, :, :]
            q += dy[:, None, :] * (quad_b[members] * dx)[None, :, :]
            q = q.reshape(-1, len(members))
            s = slope[members]
            q *= -s
            q += s  # slope * (1 - q): positive inside the ellipse, ramping up over the soft edge
            np.minimum(q, dark32[members], out=q)
            inside = q > 0
            flat = (offsets[:, None] * padded_width + offsets[None, :]).reshape(-1, 1) + anchor[members]
            np.maximum.at(canvas, flat[inside], q[inside])
        out = canvas.reshape(height + 2 * pad, padded_width)[pad : pad + height, pad : pad + width]

        own = (row >= y0) & (row < y0 + height) & (col >= x0) & (col < x0 + width)
        table = {
            "y_um": ny[own],
            "x_um": nx[own],
            "area_um2": (math.pi * semi_major * semi_minor)[own],
            "region": region[own].astype(np.uint8),
        }
        return out, table

    def adipocyte_seeds(self, y0: int, y1: int, x0: int, x1: int):
        """Fat-cell seeds of the 75 µm lattice cells ``[y0, y1) × [x0, x1)``.

        Returns the seeds' jitter within their cells (cell units, float32) and whether each
        seed lies in adipose tissue.
        """
        grid_y = np.arange(y0, y1)[:, None]
        grid_x = np.arange(x0, x1)[None, :]
        h = _hash(_stream(self.seed, "adipocytes"), grid_y, grid_x)
        jitter_y = 0.15 + 0.7 * _unit(h)
        jitter_x = 0.15 + 0.7 * _unit(_mix(h))
        seed_y, seed_x = (grid_y + jitter_y) * _ADIPOCYTE_UM, (grid_x + jitter_x) * _ADIPOCYTE_UM
        tumour, immune, adipose = self.region_scores(seed_y, seed_x)
        fat = (adipose > 0) & (tumour <= 0) & (immune <= 0)
        if fat.any():
            fat &= self.tissue_distance(seed_y, seed_x) < 0
        return jitter_y.astype(np.float32), jitter_x.astype(np.float32), fat

    def _adipocytes(self, haem, eosin, label, y_um, x_um, cache=None) -> None:
        """Draw fat cells (white, thin eosin membranes) whose seed lies in adipose tissue.

        Worley cells: one jittered seed per 75 µm lattice cell; a pixel belongs to its nearest
        seed (always in its own or a neighbouring lattice cell), and the gap between its
        nearest and second-nearest seed draws the membranes. Only pixels next to a fat seed
        are examined.
        """
        row_cell, row_frac = _lattice(y_um, _ADIPOCYTE_UM)
        col_cell, col_frac = _lattice(x_um, _ADIPOCYTE_UM)
        y0, x0 = int(row_cell[0]) - 1, int(col_cell[0]) - 1
        y1, x1 = int(row_cell[-1]) + 2, int(col_cell[-1]) + 2
        if cache is not None and cache.covers_cells(y0, y1, x0, x1):
            jitter_y, jitter_x, seed_fat = cache.cells(y0, y1, x0, x1)
        else:
            jitter_y, jitter_x, seed_fat = self.adipocyte_seeds(y0, y1, x0, x1)
        if not seed_fat.any():
            return
        # Lattice cells with a fat seed among their 3 × 3 neighbours.
        padded = np.pad(seed_fat, 1)
        near_fat = np.zeros_like(seed_fat)
        for oy in (0, 1, 2):
            for ox in (0, 1, 2):
                near_fat |= padded[oy : oy + seed_fat.shape[0], ox : ox + seed_fat.shape[1]]
        local_row, local_col = row_cell - y0, col_cell - x0
        candidates = near_fat.take(local_row, axis=0).take(local_col, axis=1)
        where = np.flatnonzero(candidates.reshape(-1))
        if where.size == 0:
            return
        width = candidates.shape[1]
        pixel_row, pixel_col = where // width, where % width
        # Offsets within the pixel's own lattice cell (cell units) depend on the pixel only,
        # so every region gets the same values.
        fy = row_frac.astype(np.float32).take(pixel_row)
        fx = col_frac.astype(np.float32).take(pixel_col)
        n_x = x1 - x0
        home = local_row.take(pixel_row) * n_x + local_col.take(pixel_col)
        jitter_y = jitter_y.reshape(-1)
        jitter_x = jitter_x.reshape(-1)
        first = np.full(where.size, np.inf, dtype=np.float32)
        second = np.full(where.size, np.inf, dtype=np.float32)
        nearest = home
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                cell = home + (oy * n_x + ox)
                dy = jitter_y.take(cell)
                dy -= fy
                dy += np.float32(oy)
                dx = jitter_x.take(cell)
                dx -= fx
                dx += np.float32(ox)
                dy *= dy
                dx *= dx
                dy += dx  # squared distance to the seed
                closer = dy < first
                np.minimum(second, np.maximum(first, dy), out=second)
                np.minimum(first, dy, out=first)
                nearest = np.where(closer, cell, nearest)
        fat = seed_fat.reshape(-1).take(nearest)
        if not fat.any():
            return
        # sqrt(second) - sqrt(first) is about twice the distance to the membrane (cell units).
        gap = np.sqrt(second[fat]) - np.sqrt(first[fat])
        membrane = np.clip(1 - gap * np.float32(_ADIPOCYTE_UM / _MEMBRANE_UM), 0.0, 1.0)
        pixels = where[fat]
        eosin.reshape(-1)[pixels] = membrane * np.float32(0.45)
        haem.reshape(-1)[pixels] = membrane * np.float32(0.04)
        label.reshape(-1)[pixels] = ADIPOSE

    def _colour(self, haem: np.ndarray, eosin: np.ndarray, grain: np.ndarray) -> np.ndarray:
        """Beer-Lambert colour through a dithered look-up table → (h, w, 3) uint8."""
        red, green, blue = _colour_table(self)
        # Dithered quantisation (the grain spreads rounding over neighbouring levels); the
        # combined index floor(qh) * E + qe is exact in float32 and converted once.
        qh = haem * np.float32((_H_LEVELS - 1) / _H_MAX)
        qh += grain
        np.minimum(qh, np.float32(_H_LEVELS - 1), out=qh)
        np.floor(qh, out=qh)
        qh *= np.float32(_E_LEVELS)
        qe = eosin * np.float32((_E_LEVELS - 1) / _E_MAX)
        qe += np.float32(1.0) - grain
        np.minimum(qe, np.float32(_E_LEVELS - 1), out=qe)
        qh += qe
        index = qh.astype(np.intp)
        rgb = np.empty(haem.shape + (3,), dtype=np.uint8)
        for channel, table in enumerate((red, green, blue)):
            rgb[..., channel] = table.take(index)
        return rgb


def _node_range(y0: int, x0: int, height: int, width: int, mpp: float) -> tuple[int, int, int, int]:
    """Lattice nodes ``[cy0, cy1) × [cx0, cx1)`` a region needs.

    They cover its pixels plus the reach of nuclei from neighbouring cells.
    """
    margin = _REACH_UM + _CELL_UM + 2 * _COARSE_UM
    cy0 = math.floor(((y0 + 0.5) * mpp - margin) / _COARSE_UM)
    cx0 = math.floor(((x0 + 0.5) * mpp - margin) / _COARSE_UM)
    cy1 = math.floor(((y0 + height - 0.5) * mpp + margin) / _COARSE_UM) + 2
    cx1 = math.floor(((x0 + width - 0.5) * mpp + margin) / _COARSE_UM) + 2
    return cy0, cy1, cx0, cx1


class _LatticeCache:
    """Smooth fields of a section on the lattice nodes of a whole region, for its blocks."""

    def __init__(self, section: _Section, y0: int, x0: int, height: int, width: int, mpp: float) -> None:
        self.cy0, self.cy1, self.cx0, self.cx1 = _node_range(y0, x0, height, width, mpp)
        yc = np.arange(self.cy0, self.cy1) * _COARSE_UM
        xc = np.arange(self.cx0, self.cx1) * _COARSE_UM
        self.distance = section.tissue_distance(yc, xc, grid=True)
        self.fields = section.coarse(yc, xc, self.distance) if (self.distance < _GLASS_UM).any() else None
        # Fat-cell seeds of every lattice cell a block of the region may look at.
        self.gy0 = math.floor((y0 + 0.5) * mpp / _ADIPOCYTE_UM) - 1
        self.gx0 = math.floor((x0 + 0.5) * mpp / _ADIPOCYTE_UM) - 1
        self.gy1 = math.floor((y0 + height - 0.5) * mpp / _ADIPOCYTE_UM) + 2
        self.gx1 = math.floor((x0 + width - 0.5) * mpp / _ADIPOCYTE_UM) + 2
        self.jitter_y, self.jitter_x, self.fat = section.adipocyte_seeds(self.gy0, self.gy1, self.gx0, self.gx1)

    def covers_cells(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        return self.gy0 <= y0 and y1 <= self.gy1 and self.gx0 <= x0 and x1 <= self.gx1

    def cells(self, y0: int, y1: int, x0: int, x1: int):
        rows = slice(y0 - self.gy0, y1 - self.gy0)
        cols = slice(x0 - self.gx0, x1 - self.gx0)
        return self.jitter_y[rows, cols], self.jitter_x[rows, cols], self.fat[rows, cols]

    @staticmethod
    def size(y0: int, x0: int, height: int, width: int, mpp: float) -> int:
        cy0, cy1, cx0, cx1 = _node_range(y0, x0, height, width, mpp)
        return (cy1 - cy0) * (cx1 - cx0)

    def covers(self, cy0: int, cy1: int, cx0: int, cx1: int) -> bool:
        return self.cy0 <= cy0 and cy1 <= self.cy1 and self.cx0 <= cx0 and cx1 <= self.cx1

    def block(self, cy0: int, cy1: int, cx0: int, cx1: int):
        rows = slice(cy0 - self.cy0, cy1 - self.cy0)
        cols = slice(cx0 - self.cx0, cx1 - self.cx0)
        fields = self.fields

        def get_coarse():
            return {name: values[rows, cols] for name, values in fields.items()}

        return self.distance[rows, cols], get_coarse


def _triangle(coord: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Triangle wave in [0, 1] of ``coord / period + phase``, smoothed at its turns."""
    t = coord * np.float32(1.0 / period)
    t += np.float32(phase)
    t -= np.floor(t)
    t *= np.float32(2.0)
    t -= np.float32(1.0)
    np.abs(t, out=t)
    smooth = np.float32(3.0) - np.float32(2.0) * t
    t *= t
    t *= smooth
    return t


def _upsample(values: np.ndarray, iy, fy, ix, fx) -> np.ndarray:
    """Bilinear resampling of lattice values to pixels (rows ``iy + fy``, columns ``ix + fx``)."""
    left = values.take(ix, axis=1)
    right = values.take(ix + 1, axis=1)
    right -= left
    right *= fx
    left += right
    top = left.take(iy, axis=0)
    bottom = left.take(iy + 1, axis=0)
    bottom -= top
    bottom *= fy[:, None]
    top += bottom
    return top


def _no_nuclei() -> dict[str, np.ndarray]:
    empty = np.zeros(0)
    return {"y_um": empty, "x_um": empty, "area_um2": empty, "region": np.zeros(0, np.uint8)}


@functools.lru_cache(maxsize=64)
def _colour_table_of(style: _Style) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _Section.colour_table_for(style)


def _colour_table(section: _Section) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _colour_table_of(section.style)


@functools.lru_cache(maxsize=64)
def _grain_table(seed: int) -> np.ndarray:
    rows = np.arange(_GRAIN)[:, None]
    cols = np.arange(_GRAIN)[None, :]
    return _unit(_hash(_stream(seed, "grain"), rows, cols)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}={value!r} must be an integer.")
    if minimum is not None and value < minimum:
        raise InputError(f"{name}={value!r} must be at least {minimum}.")
    return int(value)


def _check_positive(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} must be a positive number.") from None
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{name}={value!r} must be a positive, finite number (e.g. 1.0).")
    return number


def synthetic_he_image(
    shape: tuple[int, int],
    *,
    origin: tuple[int, int] = (0, 0),
    microns_per_pixel: float = 1.0,
    seed: int = 0,
    style_seed: int | None = None,
    tissue_center_um: tuple[float, float] | None = None,
    tissue_radius_um: float | None = None,
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic H&E-stained tissue image, or any rectangular region of one.

    The image mimics an H&E section: pink eosin stroma with wavy collagen fibres and sparse
    elongated nuclei, tumour nests of large, crowded, pleomorphic nuclei in purple
    cytoplasm, immune infiltrates of small, dark, round, densely packed nuclei, and adipose
    tissue of white fat cells with thin pink membranes; optionally a tissue outline with a
    ragged edge on white glass. Sizes are physical (µm), so the tissue looks the same at any
    ``microns_per_pixel``.

    Every pixel depends only on its absolute position and the seeds: drawing
    ``shape`` at ``origin`` gives exactly the pixels of that region cut from a larger
    drawing. Whole slides can thus be written tile by tile in bounded memory.

    Parameters
    ----------
    shape
        ``(height, width)`` of the region in pixels.
    origin
        ``(row, column)`` of the region's top-left pixel in the whole image's pixel frame.
        Pixel ``(i, j)`` covers µm ``[i, i+1) × [j, j+1)`` times ``microns_per_pixel``.
    microns_per_pixel
        Physical size of a pixel. Nuclei are a few µm across; below ~2 µm/px they are
        resolved, above ~4 µm/px they blur into texture.
    seed
        Tissue layout: regions, nuclei, fibres, outline shape.
    style_seed
        Patient-level look: stain colours and region proportions. ``None`` uses ``seed``.
        Sections of one patient share it.
    tissue_center_um, tissue_radius_um
        Centre ``(y, x)`` in µm (in the whole image's frame) and mean radius in µm of the
        tissue piece; outside it is bare glass. ``None`` (both) fills the whole plane with
        tissue.
    return_labels
        Also return the region label of each pixel.

    Returns
    -------
    image
        ``(height, width, 3)`` uint8 RGB.
    labels
        Only with ``return_labels=True``: ``(height, width)`` uint8, the index into
        :data:`REGIONS` (``("stroma", "tumour", "immune", "adipose")``), 255 on glass.

    Examples
    --------
    >>> full = synthetic_he_image((512, 512), seed=3)
    >>> tile = synthetic_he_image((128, 128), origin=(256, 128), seed=3)
    >>> bool((tile == full[256:384, 128:256]).all())
    True
    """
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise InputError(f"shape={shape!r} must be (height, width) in pixels.")
    height = _check_int("shape[0] (height)", shape[0], minimum=1)
    width = _check_int("shape[1] (width)", shape[1], minimum=1)
    if not isinstance(origin, (tuple, list)) or len(origin) != 2:
        raise InputError(f"origin={origin!r} must be (row, column) of the region's top-left pixel.")
    row0 = _check_int("origin[0]", origin[0])
    col0 = _check_int("origin[1]", origin[1])
    mpp = _check_positive("microns_per_pixel", microns_per_pixel)
    seed = _check_int("seed", seed)
    if style_seed is not None:
        style_seed = _check_int("style_seed", style_seed)
    if (tissue_center_um is None) != (tissue_radius_um is None):
        raise InputError(
            "tissue_center_um and tissue_radius_um go together: give both to draw a tissue piece "
            "on glass, or neither to fill the image with tissue."
        )
    if tissue_radius_um is not None:
        tissue_radius_um = _check_positive("tissue_radius_um", tissue_radius_um)
        if not isinstance(tissue_center_um, (tuple, list)) or len(tissue_center_um) != 2:
            raise InputError(f"tissue_center_um={tissue_center_um!r} must be (y, x) in µm.")
        if not all(math.isfinite(float(v)) for v in tissue_center_um):
            raise InputError(f"tissue_center_um={tissue_center_um!r} must be finite.")
    if height * width > 2**31:
        raise InputError(
            f"shape={shape!r} is {height * width / 1e9:.1f} gigapixels; draw it region by region "
            f"(origin=...) and write each tile, which gives identical pixels."
        )
    section = _Section.create(seed, style_seed, tissue_center_um=tissue_center_um, tissue_radius_um=tissue_radius_um)
    return render_region(section, row0, col0, height, width, mpp, return_labels=return_labels)


def iter_tiles(height: int, width: int, tile: int = _TILE):
    """Blocks ``(row, col, height, width)`` covering a ``height × width`` region."""
    for by in range(0, height, tile):
        for bx in range(0, width, tile):
            yield by, bx, min(tile, height - by), min(tile, width - bx)


def map_tiles(function, height: int, width: int):
    """Apply ``function(row, col, h, w)`` to every block, on a few threads, in block order.

    NumPy releases the GIL inside its loops, so blocks drawn on separate threads overlap.
    """
    blocks = list(iter_tiles(height, width))
    workers = min(len(blocks), _worker_count())
    if workers <= 1:
        yield from (function(*block) for block in blocks)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda block: function(*block), blocks)


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def lattice_cache(section: _Section, row0: int, col0: int, height: int, width: int, mpp: float):
    """Smooth fields for a whole region at once when they fit in a few tens of MB, else None."""
    if _LatticeCache.size(row0, col0, height, width, mpp) > _CACHE_NODES:
        return None
    return _LatticeCache(section, row0, col0, height, width, mpp)


def render_region(section: _Section, row0: int, col0: int, height: int, width: int, mpp: float, *, return_labels=False):
    """Draw a region block by block (bounded temporaries); see :func:`synthetic_he_image`."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    labels = np.empty((height, width), dtype=np.uint8) if return_labels else None
    cache = lattice_cache(section, row0, col0, height, width, mpp)

    def draw(by, bx, h, w):
        if return_labels:
            rgb, maps = section.render(row0 + by, col0 + bx, h, w, mpp, maps=True, cache=cache)
            labels[by : by + h, bx : bx + w] = maps["label"]
        else:
            rgb = section.render(row0 + by, col0 + bx, h, w, mpp, cache=cache)
        image[by : by + h, bx : bx + w] = rgb

    for _ in map_tiles(draw, height, width):
        pass
    return (image, labels) if return_labels else image
