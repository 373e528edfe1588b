"""``sthisto.datasets.synthetic``: H&E sections with spots whose counts follow the image.

Each section is drawn by :func:`~sthisto.datasets.synthetic_he_image` (tissue piece on glass),
overlaid with a legacy-ST or Visium spot grid restricted to the tissue. For every spot the
generator measures morphology in the spot's footprint from the very pixels it drew (nuclei per
area, mean nuclear area, haematoxylin share of the stain, eosin texture, region fractions).
*Dependent* genes have log-means that follow these measurements; *independent* genes follow
hidden spatial fields and noise that leave no trace in the image. Counts are negative
binomial with per-spot library sizes, so both kinds look alike in distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import sthisto_uns, to_uns
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Synthetic, Uns
from .._errors import InputError
from ._synthetic_image import (
    _TILE,
    BACKGROUND,
    REGIONS,
    _fractal,
    _Section,
    _stream,
    lattice_cache,
    map_tiles,
)

if TYPE_CHECKING:
    from anndata import AnnData

MORPHOLOGY_FEATURES: tuple[str, ...] = (
    "nuclear_density",
    "nuclear_size",
    "haematoxylin_ratio",
    "eosin_texture",
    "tumour",
    "immune",
    "adipose",
)
"""Per-spot morphology the dependent genes follow (``var['synthetic_driver']`` values).

``nuclear_density``: nuclei centred in the footprint per 1000 µm²; ``nuclear_size``: their
mean area (µm²); ``haematoxylin_ratio``: haematoxylin / (haematoxylin + eosin) summed over the
footprint; ``eosin_texture``: standard deviation of eosin over the footprint (collagen fibres);
``tumour`` / ``immune`` / ``adipose``: fraction of the footprint in that region.
"""

# Standardisation of the features, fixed so that a section's counts do not depend on which
# other sections are generated with it: pooled mean and standard deviation of 16 default
# sections of each geometry (about 9,600 spots).
_FEATURE_CENTRE = np.array([7.4, 41.0, 0.47, 0.06, 0.34, 0.20, 0.09])
_FEATURE_SCALE = np.array([6.0, 19.0, 0.21, 0.05, 0.42, 0.34, 0.25])


@dataclass(frozen=True)
class _Geometry:
    spacing_um: float
    diameter_um: float
    """Physical spot (the footprint morphology is measured over)."""
    hexagonal: bool
    default_mpp: float
    declared_diameter_um: float
    """What ``spot_diameter_fullres`` is the pixel size of, as the platform's software writes it."""


GEOMETRIES = {
    "legacy": _Geometry(
        spacing_um=200.0, diameter_um=100.0, hexagonal=False, default_mpp=2.0, declared_diameter_um=100.0
    ),
    # Space Ranger writes the pixel diameter of a theoretical 65 µm spot, not of the 55 µm one.
    "visium": _Geometry(spacing_um=100.0, diameter_um=55.0, hexagonal=True, default_mpp=1.0, declared_diameter_um=65.0),
}

_HIRES_MAX_SIDE = 1000
_MAX_PIXELS = 4e8  # per section; above this the image would not fit comfortably in memory
_HIDDEN_FIELDS = 8  # smooth per-section fields behind expression that the image does not show
_HIDDEN_SPACING = 1.75  # their lattice spacing, in spot spacings
_SPOT_NOISE = 0.25  # standard deviation of the spot-level log-mean noise


def synthetic(
    *,
    n_sections: int = 2,
    n_patients: int | None = None,
    n_spots: int = 300,
    n_genes: int = 50,
    fraction_dependent: float = 0.6,
    geometry: str = "legacy",
    microns_per_pixel: float | None = None,
    annotations: bool = True,
    seed: int = 0,
) -> AnnData:
    """Synthetic H&E sections with spatial expression, in the sthisto AnnData convention.

    Each section is a piece of H&E-like tissue (see :func:`synthetic_he_image`: stroma with
    collagen fibres, tumour nests, immune infiltrates, fat) on glass, with spots only over the
    tissue. Per spot, the generator measures morphology in the spot's footprint from the
    pixels it drew (:data:`MORPHOLOGY_FEATURES`). A fraction of the genes (*dependent*) have
    log-means that follow this morphology; the others (*independent*) follow hidden spatial
    fields and noise that leave no trace in the image, so no image model can learn them.

    Count model, per spot *i* and gene *g*::

        log mu_ig = b_g + o_pg + sum_f L_gf z_if + sum_k W_gk h_ik + e_ig,   mu_ig *= s_i
        counts_ig ~ NegativeBinomial(mean mu_ig, size theta_g)

    with baselines ``b_g`` (spanning ~0.3-30 counts per spot), patient offsets ``o_pg``,
    standardised morphology ``z_if`` and loadings ``L_gf`` (zero for independent genes; for a
    dependent gene one strong loading on its driver, signs balanced across genes, plus weak
    loadings on the other features), smooth hidden fields ``h_ik`` drawn per section, spot
    noise ``e_ig``, library-size factors ``s_i`` (spot, section and patient parts) and
    per-gene dispersions ``theta_g``. Dependent and independent genes share the distributions
    of ``b``, ``theta`` and the total variance of ``log mu``, so they cannot be told apart
    from the counts alone. The dependent genes are rescaled together per spot so that a
    spot's expected total count does not depend on its morphology: dividing by library size
    (``normalize_total``, THItoGene-style targets) then leaves the independent genes as
    unrelated to the image as their raw counts are. Library size is thus independent of
    cellularity here, unlike in real tissue; and the dependent genes need company: a lone
    dependent gene would be rescaled to a constant (three or more keep their signal).

    A 300-spot legacy section (about 2,300 × 2,600 pixels) takes roughly half a second of
    CPU; blocks of the image are drawn on up to four threads.

    Parameters
    ----------
    n_sections
        Number of sections (libraries).
    n_patients
        Number of patients the sections are spread over (in consecutive blocks). ``None``:
        one patient per section. Patients differ in stain colours, tissue composition,
        sequencing depth and gene expression offsets, so patient-level splits are meaningful.
    n_spots
        Spots per section (approximate: the tissue is sized so that about this many grid
        positions fall on it).
    n_genes
        Number of genes.
    fraction_dependent
        Fraction of genes whose expression follows the image, in [0, 1].
    geometry
        ``"legacy"``: square grid, 200 µm centre to centre, 100 µm spots (her2st-like).
        ``"visium"``: hexagonal grid, 100 µm centre to centre, 55 µm spots, Visium array
        convention (``array_col`` steps by 2 along a row, odd rows offset by one).
    microns_per_pixel
        Resolution of the full-resolution image. ``None``: 2.0 for ``"legacy"``, 1.0 for
        ``"visium"`` (about 50 pixels per spot diameter either way, which keeps generation
        fast). Nuclei are sized in µm, so any value gives the same tissue.
    annotations
        Add each spot's majority region to ``obs['label']``.
    seed
        Seed of everything: the same seed gives identical data.

    Returns
    -------
    AnnData with

    - ``X``: raw counts, ``scipy.sparse.csr_matrix`` of float32 holding non-negative integers.
    - ``obs``: ``library_id`` (categorical), ``patient`` (categorical), ``array_row``,
      ``array_col`` (int), ``spot_id`` (``"<array_col>x<array_row>"``), and with
      ``annotations=True`` ``label`` (categorical: ``stroma``, ``tumour``, ``immune``,
      ``adipose``). ``obs_names`` are ``"<library_id>_<spot_id>"``.
    - ``obsm['spatial']``: spot centres (x, y) in full-resolution pixels.
    - ``obsm['synthetic_morphology']``: DataFrame of :data:`MORPHOLOGY_FEATURES` per spot.
    - ``var``: gene names ``SYN_DEP_000``... then ``SYN_IND_000``...;
      ``synthetic_dependent`` (bool) and ``synthetic_driver`` (feature name, ``"none"`` for
      independent genes).
    - ``varm['synthetic_loadings']``: (n_genes, 7) loadings ``L`` on the standardised features.
    - ``uns['spatial'][library_id]``: ``images`` with ``fullres`` (uint8 (H, W, 3), in memory)
      and ``hires`` (downscaled); ``scalefactors`` with ``tissue_hires_scalef``,
      ``spot_diameter_fullres`` (as the platform writes it: 100 µm for legacy ST; for Visium,
      like Space Ranger, the pixel diameter of a theoretical 65 µm spot, although spots and
      their morphology footprint are 55 µm), ``microns_per_pixel``, ``spot_spacing_um``; ``metadata``
      with ``has_image=True`` and ``source='sthisto.datasets.synthetic'``.
    - ``uns['sthisto']['synthetic']``: the parameters, the feature standardisation
      (``feature_centre``, ``feature_scale``) and per section the arguments that redraw its
      image with :func:`synthetic_he_image` (``seed``, ``style_seed``, ``tissue_center_um``,
      ``tissue_radius_um``).

    Examples
    --------
    >>> adata = sthisto.datasets.synthetic(n_sections=3, n_patients=2, seed=1)
    >>> adata.var["synthetic_dependent"].mean()
    0.6
    """
    import anndata as ad
    from scipy import sparse

    params = _validate(
        n_sections=n_sections,
        n_patients=n_patients,
        n_spots=n_spots,
        n_genes=n_genes,
        fraction_dependent=fraction_dependent,
        geometry=geometry,
        microns_per_pixel=microns_per_pixel,
        annotations=annotations,
        seed=seed,
    )
    geo = GEOMETRIES[params["geometry"]]
    mpp = params["microns_per_pixel"]
    n_sections, n_patients = params["n_sections"], params["n_patients"]
    patient_of = [i * n_patients // n_sections for i in range(n_sections)]
    width = len(str(max(n_sections, n_patients)))
    library_names = [f"S{i + 1:0{max(2, width)}d}" for i in range(n_sections)]
    patient_names = [f"P{p + 1:0{max(2, width)}d}" for p in range(n_patients)]

    genes = _gene_parameters(params["n_genes"], params["fraction_dependent"], n_patients, seed)

    obs_parts, counts, features, spatial, records = [], [], [], {}, {}
    for index, library in enumerate(library_names):
        patient = patient_of[index]
        section = _draw_section(
            section_seed=_stream("synthetic", seed, "section", index) >> 1,
            style_seed=_stream("synthetic", seed, "patient", patient) >> 1,
            n_spots=params["n_spots"],
            geo=geo,
            mpp=mpp,
        )
        rng = np.random.default_rng(_stream("synthetic", seed, "counts", index))
        counts.append(_sample_counts(section, genes, patient, rng))
        features.append(section["features"])
        obs = pd.DataFrame(
            {
                Obs.LIBRARY_ID: library,
                Obs.PATIENT: patient_names[patient],
                Obs.ARRAY_ROW: section["array_row"],
                Obs.ARRAY_COL: section["array_col"],
            }
        )
        obs[Obs.SPOT_ID] = [f"{c}x{r}" for r, c in zip(section["array_row"], section["array_col"], strict=True)]
        if params["annotations"]:
            obs[Obs.LABEL] = section["label"]
        obs.index = pd.Index((library + "_" + obs[Obs.SPOT_ID]).to_numpy())
        obs_parts.append((obs, section["spatial_px"]))
        image = section["image"]
        hires, scale = _downscale(image)
        spatial[library] = {
            Uns.IMAGES: {Images.FULLRES: image, Images.HIRES: hires},
            Uns.SCALEFACTORS: {
                ScaleFactors.HIRES: scale,
                ScaleFactors.SPOT_DIAMETER: geo.declared_diameter_um / mpp,
                ScaleFactors.MICRONS_PER_PIXEL: mpp,
                ScaleFactors.SPOT_SPACING_UM: geo.spacing_um,
            },
            Uns.METADATA: {Metadata.HAS_IMAGE: True, Metadata.SOURCE: Synthetic.SOURCE},
        }
        records[library] = {
            "seed": section["seed"],
            "style_seed": section["style_seed"],
            "tissue_center_um": section["center_um"],
            "tissue_radius_um": section["radius_um"],
            "patient": patient_names[patient],
            "image_shape": image.shape[:2],
        }

    obs = pd.concat([part for part, _ in obs_parts])
    obs[Obs.LIBRARY_ID] = pd.Categorical(obs[Obs.LIBRARY_ID], categories=library_names)
    obs[Obs.PATIENT] = pd.Categorical(obs[Obs.PATIENT], categories=patient_names)
    if params["annotations"]:
        obs[Obs.LABEL] = pd.Categorical(obs[Obs.LABEL], categories=list(REGIONS))
    var = pd.DataFrame(
        {Synthetic.DEPENDENT: genes["dependent"], Synthetic.DRIVER: genes["driver"]},
        index=pd.Index(genes["names"]),
    )
    adata = ad.AnnData(
        X=sparse.csr_matrix(np.concatenate(counts).astype(np.float32)),
        obs=obs,
        var=var,
    )
    adata.obsm[Obsm.SPATIAL] = np.concatenate([coords for _, coords in obs_parts])
    adata.obsm[Synthetic.MORPHOLOGY] = pd.DataFrame(
        np.concatenate(features), index=adata.obs_names, columns=list(MORPHOLOGY_FEATURES)
    )
    adata.varm[Synthetic.LOADINGS] = genes["loadings"]
    adata.uns[Uns.SPATIAL] = spatial
    sthisto_uns(adata)[Synthetic.RECORD] = to_uns(
        {
            **params,
            "morphology_features": list(MORPHOLOGY_FEATURES),
            "feature_centre": _FEATURE_CENTRE,
            "feature_scale": _FEATURE_SCALE,
            "sections": records,
        }
    )
    return adata


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _integer(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}={value!r} must be a whole number, at least {minimum}.")
    if value < minimum:
        raise InputError(f"{name}={value!r} must be at least {minimum}.")
    return int(value)


def _validate(**kwargs) -> dict:
    n_sections = _integer("n_sections", kwargs["n_sections"], minimum=1)
    n_patients = kwargs["n_patients"]
    if n_patients is None:
        n_patients = n_sections
    else:
        n_patients = _integer("n_patients", n_patients, minimum=1)
        if n_patients > n_sections:
            raise InputError(
                f"n_patients={n_patients} exceeds n_sections={n_sections}: every patient needs at "
                f"least one section. Lower n_patients or raise n_sections."
            )
    n_spots = _integer("n_spots", kwargs["n_spots"], minimum=1)
    n_genes = _integer("n_genes", kwargs["n_genes"], minimum=1)
    fraction = kwargs["fraction_dependent"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise InputError(f"fraction_dependent={fraction!r} must be a number in [0, 1].")
    if not (0.0 <= float(fraction) <= 1.0):
        raise InputError(
            f"fraction_dependent={fraction!r} is outside [0, 1]: it is the share of genes whose "
            f"expression follows the image (0.6 by default)."
        )
    geometry = kwargs["geometry"]
    if not isinstance(geometry, str) or geometry not in GEOMETRIES:
        raise InputError(f"geometry={geometry!r} is not known; use one of {sorted(GEOMETRIES)}.")
    mpp = kwargs["microns_per_pixel"]
    if mpp is None:
        mpp = GEOMETRIES[geometry].default_mpp
    elif isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.integer, np.floating)):
        raise InputError(f"microns_per_pixel={mpp!r} must be a positive number (e.g. 2.0) or None.")
    elif not (math.isfinite(mpp) and mpp > 0):
        raise InputError(
            f"microns_per_pixel={mpp!r} must be positive and finite: it is the physical size of a "
            f"pixel (her2st ~0.69, Visium ~0.5; None picks a fast default)."
        )
    mpp = float(mpp)
    annotations = kwargs["annotations"]
    if not isinstance(annotations, (bool, np.bool_)):
        raise InputError(f"annotations={annotations!r} must be True or False.")
    seed = kwargs["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed={seed!r} must be an integer.")
    geo = GEOMETRIES[geometry]
    cell_area = geo.spacing_um**2 * (math.sqrt(3) / 2 if geo.hexagonal else 1.0)
    pixels = 1.6 * n_spots * cell_area / mpp**2
    if pixels > _MAX_PIXELS:
        raise InputError(
            f"{n_spots} {geometry} spots at {mpp} µm/px need an image of about {pixels / 1e6:.0f} "
            f"megapixels per section. Raise microns_per_pixel or lower n_spots."
        )
    return {
        "n_sections": n_sections,
        "n_patients": n_patients,
        "n_spots": n_spots,
        "n_genes": n_genes,
        "fraction_dependent": float(fraction),
        "geometry": geometry,
        "microns_per_pixel": mpp,
        "annotations": bool(annotations),
        "seed": int(seed),
    }


# ------------------------------------------------------------------------------------------
# one section: spots, image, morphology
# ------------------------------------------------------------------------------------------


def _grid(geo: _Geometry, bound: float, rng: np.random.Generator):
    """Spot grid (rows, cols, y, x) within ``bound`` µm of the origin, with a random phase."""
    row_step = geo.spacing_um * (math.sqrt(3) / 2 if geo.hexagonal else 1.0)
    col_step = geo.spacing_um / 2 if geo.hexagonal else geo.spacing_um
    phase_y, phase_x = rng.uniform(0, row_step), rng.uniform(0, geo.spacing_um)
    n_r, n_c = int(bound / row_step) + 2, int(bound / col_step) + 2
    rows, cols = np.meshgrid(np.arange(-n_r, n_r + 1), np.arange(-n_c, n_c + 1), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if geo.hexagonal:  # Visium: array_col steps by 2 along a row, odd rows shifted by one
        keep = (rows + cols) % 2 == 0
        rows, cols = rows[keep], cols[keep]
    y = rows * row_step + phase_y
    x = cols * col_step + phase_x
    inside = (np.abs(y) <= bound) & (np.abs(x) <= bound)
    return rows[inside], cols[inside], y[inside], x[inside], row_step, col_step


def _fit_tissue(section_seed, style_seed, geo, n_spots, rng):
    """Size the tissue piece so that about ``n_spots`` grid positions fall on it."""
    cell_area = geo.spacing_um**2 * (math.sqrt(3) / 2 if geo.hexagonal else 1.0)
    start = math.sqrt(n_spots * cell_area / math.pi)
    rows, cols, y, x, row_step, col_step = _grid(geo, 3.0 * start + geo.spacing_um, rng)
    # Spots count as on tissue when their centre lies well inside the outline.
    margin = 0.3 * geo.diameter_um / 2

    def on_tissue(radius):
        section = _Section.create(section_seed, style_seed, tissue_center_um=(0.0, 0.0), tissue_radius_um=radius)
        return section.tissue_distance(y, x) < -margin

    # The count grows roughly with the area: step by sqrt(target / count), kept inside a
    # bracket that shrinks like a bisection, until the count is hit or the bracket closes.
    low, high = 0.3 * start, 2.0 * start
    radius, best_radius, best_gap = start, start, None
    for _ in range(40):
        count = int(on_tissue(radius).sum())
        gap = abs(count - n_spots)
        if best_gap is None or gap < best_gap:
            best_radius, best_gap = radius, gap
        if count == n_spots or high - low < 1e-3 * start:
            break
        if count < n_spots:
            low = radius
        else:
            high = radius
        proposal = radius * math.sqrt(n_spots / max(count, 1))
        radius = proposal if low < proposal < high else 0.5 * (low + high)
    selected = on_tissue(best_radius)
    return best_radius, rows[selected], cols[selected], y[selected], x[selected], row_step, col_step


def _draw_section(*, section_seed: int, style_seed: int, n_spots: int, geo: _Geometry, mpp: float) -> dict:
    rng = np.random.default_rng(_stream("grid", section_seed))
    radius, rows, cols, y, x, row_step, col_step = _fit_tissue(section_seed, style_seed, geo, n_spots, rng)

    # Frame: the tissue's extent (sampled every 25 µm, so grown by that much) and the spots,
    # plus a glass margin.
    shape_only = _Section.create(section_seed, style_seed, tissue_center_um=(0.0, 0.0), tissue_radius_um=radius)
    probe = np.arange(-2.2 * radius, 2.2 * radius + 25.0, 25.0)
    tissue = shape_only.tissue_distance(probe, probe, grid=True) < 25.0
    ty, tx = probe[tissue.any(axis=1)], probe[tissue.any(axis=0)]
    half = geo.diameter_um / 2
    glass = max(100.0, 0.5 * geo.spacing_um)
    top = min(ty.min(), y.min() - half) - glass
    left = min(tx.min(), x.min() - half) - glass
    bottom = max(ty.max(), y.max() + half) + glass
    right = max(tx.max(), x.max() + half) + glass
    height, width = math.ceil((bottom - top) / mpp), math.ceil((right - left) / mpp)
    center = (-top, -left)
    section = _Section.create(section_seed, style_seed, tissue_center_um=center, tissue_radius_um=radius)
    spot_y, spot_x = y + center[0], x + center[1]

    # Array coordinates: the grid indexed from the first row/column inside the image.
    first_row = _first_index(rows, spot_y, row_step)
    first_col = _first_index(cols, spot_x, col_step)
    if geo.hexagonal and (first_row + first_col) % 2:
        first_col -= 1
    array_row = (rows - first_row).astype(np.int64)
    array_col = (cols - first_col).astype(np.int64)

    image, stats, nuclei = _render_with_footprints(section, height, width, mpp, spot_y, spot_x, half)
    features, label = _morphology(stats, nuclei, spot_y, spot_x, half)
    return {
        "seed": section_seed,
        "style_seed": style_seed,
        "center_um": center,
        "radius_um": radius,
        "spacing_um": geo.spacing_um,
        "image": image,
        "array_row": array_row,
        "array_col": array_col,
        "spatial_px": np.column_stack([spot_x, spot_y]) / mpp,
        "y_um": spot_y,
        "x_um": spot_x,
        "features": features,
        "label": label,
    }


def _first_index(index: np.ndarray, position_um: np.ndarray, step: float) -> int:
    """Grid index of the first grid line at a non-negative image position."""
    offset = float((position_um - index * step)[0])  # position of grid index 0
    return math.ceil(-offset / step)


def _render_with_footprints(section, height, width, mpp, spot_y, spot_x, radius_um):
    """Draw the image and sum stains and regions over each spot's circular footprint."""
    cy, cx = spot_y / mpp, spot_x / mpp  # continuous pixel coordinates
    r = radius_um / mpp
    reach = int(math.ceil(r)) + 1
    offsets = np.arange(-reach, reach + 1)
    base_y, base_x = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
    rows = base_y[:, None, None] + offsets[None, :, None]
    cols = base_x[:, None, None] + offsets[None, None, :]
    inside = ((rows + 0.5) - cy[:, None, None]) ** 2 + ((cols + 0.5) - cx[:, None, None]) ** 2 <= r * r
    inside &= (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    spot = np.broadcast_to(np.arange(len(cy))[:, None, None], inside.shape)[inside]
    rows, cols = np.broadcast_to(rows, inside.shape)[inside], np.broadcast_to(cols, inside.shape)[inside]
    # Group footprint pixels by drawing block, so each block finds its own with one slice.
    blocks_x = -(-width // _TILE)
    block = (rows // _TILE) * blocks_x + cols // _TILE
    order = np.argsort(block.astype(np.int16 if block.max() < 2**15 else np.int32), kind="stable")  # radix sort
    spot, rows, cols, block = spot[order], rows[order], cols[order], block[order]
    n = len(cy)
    stats = {k: np.zeros(n) for k in ("pixels", "haematoxylin", "eosin", "eosin2")}
    stats["regions"] = np.zeros((n, len(REGIONS) + 1))
    image = np.empty((height, width, 3), dtype=np.uint8)
    cache = lattice_cache(section, 0, 0, height, width, mpp)

    def draw(by, bx, h, w):
        rgb, maps = section.render(by, bx, h, w, mpp, maps=True, cache=cache)
        image[by : by + h, bx : bx + w] = rgb
        index = (by // _TILE) * blocks_x + bx // _TILE
        here = slice(np.searchsorted(block, index, "left"), np.searchsorted(block, index, "right"))
        flat = (rows[here] - by) * w + (cols[here] - bx)
        who = spot[here]
        haem = maps["haematoxylin"].reshape(-1).take(flat)
        eosin = maps["eosin"].reshape(-1).take(flat)
        label = maps["label"].reshape(-1).take(flat).astype(np.int64)
        label[label == BACKGROUND] = len(REGIONS)
        part = {
            "pixels": np.bincount(who, minlength=n),
            "haematoxylin": np.bincount(who, weights=haem, minlength=n),
            "eosin": np.bincount(who, weights=eosin, minlength=n),
            "eosin2": np.bincount(who, weights=eosin.astype(np.float64) ** 2, minlength=n),
            "regions": np.bincount(who * (len(REGIONS) + 1) + label, minlength=n * (len(REGIONS) + 1)).reshape(n, -1),
        }
        return part, maps["nuclei"]

    nuclei_parts = []
    for part, nuclei in map_tiles(draw, height, width):
        for key, value in part.items():
            stats[key] += value
        nuclei_parts.append(nuclei)
    nuclei = {k: np.concatenate([p[k] for p in nuclei_parts]) for k in ("y_um", "x_um", "area_um2")}
    return image, stats, nuclei


def _morphology(stats, nuclei, spot_y, spot_x, radius_um):
    """Per-spot morphology features and majority region."""
    from scipy.spatial import cKDTree

    n = len(spot_y)
    count = np.zeros(n)
    area = np.zeros(n)
    if len(nuclei["y_um"]):
        distance, nearest = cKDTree(np.column_stack([spot_y, spot_x])).query(
            np.column_stack([nuclei["y_um"], nuclei["x_um"]]), distance_upper_bound=radius_um
        )
        hit = np.isfinite(distance)
        count = np.bincount(nearest[hit], minlength=n).astype(float)
        area = np.bincount(nearest[hit], weights=nuclei["area_um2"][hit], minlength=n)
    pixels = np.maximum(stats["pixels"], 1)
    footprint_um2 = math.pi * radius_um**2
    mean_eosin = stats["eosin"] / pixels
    features = np.column_stack(
        [
            count / footprint_um2 * 1000.0,
            np.where(count > 0, area / np.maximum(count, 1), np.nan),
            stats["haematoxylin"] / np.maximum(stats["haematoxylin"] + stats["eosin"], 1e-9),
            np.sqrt(np.maximum(stats["eosin2"] / pixels - mean_eosin**2, 0.0)),
            stats["regions"][:, 1] / pixels,
            stats["regions"][:, 2] / pixels,
            stats["regions"][:, 3] / pixels,
        ]
    )
    majority = np.asarray(REGIONS, dtype=object)[np.argmax(stats["regions"][:, : len(REGIONS)], axis=1)]
    return features, majority


def _standardise(features: np.ndarray) -> np.ndarray:
    z = (features - _FEATURE_CENTRE) / _FEATURE_SCALE
    z = np.where(np.isnan(z), 0.0, z)  # no nucleus in the footprint: size unknown, use the centre
    return np.clip(z, -3.0, 3.0)


def _downscale(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Box-filter downscaling by an integer factor to at most ``_HIRES_MAX_SIDE`` pixels per side."""
    from PIL import Image

    factor = max(1, math.ceil(max(image.shape[:2]) / _HIRES_MAX_SIDE))
    if factor == 1:
        return image.copy(), 1.0
    # Output pixel i averages input pixels [i * factor, (i + 1) * factor): the scale is exact.
    return np.asarray(Image.fromarray(image).reduce(factor)), 1.0 / factor


# ------------------------------------------------------------------------------------------
# genes and counts
# ------------------------------------------------------------------------------------------


def _gene_parameters(n_genes: int, fraction: float, n_patients: int, seed: int) -> dict:
    rng = np.random.default_rng(_stream("synthetic", seed, "genes", n_genes, fraction))
    n_dependent = int(round(fraction * n_genes))
    n_features = len(MORPHOLOGY_FEATURES)
    dependent = np.arange(n_genes) < n_dependent
    digits = max(3, len(str(n_genes - 1)))
    names = [f"SYN_DEP_{i:0{digits}d}" for i in range(n_dependent)] + [
        f"SYN_IND_{i:0{digits}d}" for i in range(n_genes - n_dependent)
    ]
    loadings = np.zeros((n_genes, n_features))
    driver = np.full(n_genes, "none", dtype=object)
    # Drivers in turn (from a random start), signs alternating within each driver, so that
    # the total counts of a spot barely depend on its morphology.
    first = int(rng.integers(n_features))
    for g in range(n_dependent):
        f = (first + g) % n_features
        sign = 1.0 if (g // n_features) % 2 == 0 else -1.0
        loadings[g] = rng.normal(0.0, 0.08, n_features)
        loadings[g, f] = sign * rng.uniform(0.6, 1.0)
        driver[g] = MORPHOLOGY_FEATURES[f]
    # Independent genes get as much log-mean variance from hidden fields (0.64) as dependent
    # genes get from morphology, so the two kinds vary alike.
    hidden = np.where(dependent[:, None], 0.1, 0.28) * rng.normal(0.0, 1.0, (n_genes, _HIDDEN_FIELDS))
    return {
        "names": names,
        "dependent": dependent,
        "driver": driver.astype(str),
        "loadings": loadings,
        "hidden": hidden,
        "baseline": np.clip(rng.normal(math.log(3.0), 1.0, n_genes), math.log(0.05), math.log(300.0)),
        "dispersion": np.exp(rng.normal(math.log(4.0), 0.5, n_genes)),
        "patient_offset": rng.normal(0.0, 0.2, (n_patients, n_genes)),
        "patient_depth": np.exp(rng.normal(0.0, 0.15, n_patients)),
    }


def _sample_counts(section: dict, genes: dict, patient: int, rng: np.random.Generator) -> np.ndarray:
    z = _standardise(section["features"])
    n = len(z)
    hidden = np.column_stack(
        [
            _fractal(
                _stream(section["seed"], "hidden", k),
                ((section["spacing_um"] * _HIDDEN_SPACING, 1.0), (section["spacing_um"] * _HIDDEN_SPACING / 3, 0.5)),
                section["y_um"],
                section["x_um"],
                grid=False,
            )
            for k in range(_HIDDEN_FIELDS)
        ]
    ).astype(np.float64)
    baseline = genes["baseline"] + genes["patient_offset"][patient]
    morphology = z @ genes["loadings"].T
    dependent = genes["dependent"]
    if dependent.any():
        # Rescale the dependent genes per spot so that the expected total count does not
        # depend on morphology; otherwise dividing by library size (normalize_total) would
        # imprint morphology on the independent genes. Weights include each gene's mean
        # lift from its hidden-field and noise terms (log-normal means).
        lift = 0.5 * ((genes["hidden"][dependent] ** 2).sum(axis=1) + _SPOT_NOISE**2)
        weight = np.exp(baseline[dependent] + lift)
        share = np.exp(morphology[:, dependent]) @ weight / weight.sum()
        morphology[:, dependent] -= np.log(share)[:, None]
    log_mean = baseline + morphology + hidden @ genes["hidden"].T + rng.normal(0.0, _SPOT_NOISE, (n, len(baseline)))
    depth = genes["patient_depth"][patient] * math.exp(rng.normal(0.0, 0.15))
    size_factor = depth * np.exp(rng.normal(0.0, 0.3, n))
    mean = size_factor[:, None] * np.exp(log_mean)
    theta = genes["dispersion"][None, :]
    return rng.poisson(rng.gamma(theta, mean / theta))
