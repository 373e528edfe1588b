"""Every AnnData key sthisto reads or writes, grouped by slot.

Code never spells a key as a literal string: it names it here, so that a reader can see the
whole data contract in one file (see ``docs/architecture.md``).
"""

from __future__ import annotations

from typing import Final


class Obs:
    """Columns of ``adata.obs``."""

    LIBRARY_ID: Final = "library_id"
    """Section / library of each spot (categorical)."""
    PATIENT: Final = "patient"
    """Donor, for patient-level splits (optional)."""
    ARRAY_ROW: Final = "array_row"
    """Integer grid row (her2st: ``y``)."""
    ARRAY_COL: Final = "array_col"
    """Integer grid column (her2st: ``x``)."""
    LABEL: Final = "label"
    """Pathologist annotation, where one exists."""
    IN_TISSUE: Final = "in_tissue"
    """Space Ranger's tissue flag."""
    SPOT_ID: Final = "spot_id"
    """Original spot identifier within its section (her2st ``<x>x<y>``, Visium barcode)."""
    TISSUE_FRACTION: Final = "tissue_fraction"
    """Pseudo-spots of :func:`sthisto.pp.tile`: share of the footprint on tissue."""
    PARENT_SPOT: Final = "parent_spot"
    """Spots of :func:`sthisto.tl.superresolve`: ``obs_names`` of the measured spot translated."""
    OFFSET_INDEX: Final = "offset_index"
    """Spots of :func:`sthisto.tl.superresolve`: which offset made the spot (0 = the parent itself)."""
    PATCH_CLIPPED: Final = "patch_clipped"
    """Spots of :func:`sthisto.tl.superresolve`: the patch read for the spot crosses the image border."""
    ORGAN: Final = "organ"
    """:func:`sthisto.io.read_hest`: organ of the sample, from its metadata."""
    PATCH_INDEX: Final = "patch_index"
    """:func:`sthisto.io.read_hest`: row of the spot's pre-cut patch in its library's patch file (-1: none)."""
    N_BINS: Final = "n_bins"
    """Pseudo-spots of :func:`sthisto.pp.pool`: bins (or transcripts) summed into the spot."""
    AREA_COVERED: Final = "area_covered"
    """Pseudo-spots of :func:`sthisto.pp.pool`: share of the footprint covered by measured bins."""


class Obsm:
    """Keys of ``adata.obsm``."""

    SPATIAL: Final = "spatial"
    """Spot centre in full-resolution pixels of its library's image, columns (x, y)."""


class Obsp:
    """Keys of ``adata.obsp`` (squidpy's names)."""

    CONNECTIVITIES: Final = "spatial_connectivities"
    DISTANCES: Final = "spatial_distances"


class Layers:
    """Default names of layers written by :mod:`sthisto.pp`."""

    NORMALIZED: Final = "sthisto_target"
    """Default layer of :func:`sthisto.pp.normalize`."""
    COMPANIONS: Final = ("std", "lower", "upper", "count_mean", "count_var", "dropout_prob")
    """Suffixes of the uncertainty layers :func:`sthisto.tl.predict` writes beside ``layers[key]``."""

    @staticmethod
    def companion(key_added: str, what: str) -> str:
        """Uncertainty layer beside predictions ``key_added``: ``f"{key_added}_{what}"``.

        ``std`` (spread on the prediction scale), ``lower`` / ``upper`` (conformal interval),
        ``count_mean`` / ``count_var`` / ``dropout_prob`` (a predictive distribution's moments).
        """
        if what not in Layers.COMPANIONS:
            raise ValueError(f"unknown companion layer {what!r}; expected one of {Layers.COMPANIONS}")
        return f"{key_added}_{what}"


class Uns:
    """Keys of ``adata.uns``."""

    SPATIAL: Final = "spatial"
    """scanpy/squidpy per-library image store: ``uns['spatial'][library_id]``."""
    IMAGES: Final = "images"
    SCALEFACTORS: Final = "scalefactors"
    METADATA: Final = "metadata"
    STHISTO: Final = "sthisto"
    """Everything sthisto records: ``uns['sthisto'][<function>][<key_added>]``."""
    MODELS: Final = "models"
    """Trained-model records: ``uns['sthisto']['models'][<key_added>]``."""


class Images:
    """Keys inside ``uns['spatial'][library_id]['images']``."""

    HIRES: Final = "hires"
    LOWRES: Final = "lowres"
    FULLRES: Final = "fullres"
    """Full-resolution image (NumPy or lazy dask array), when held in the object."""
    TISSUE_MASK: Final = "tissue_mask"
    """Default key of :func:`sthisto.pp.tissue_mask`: a low-resolution 2-D bool mask."""


class ScaleFactors:
    """Keys inside ``uns['spatial'][library_id]['scalefactors']``."""

    MICRONS_PER_PIXEL: Final = "microns_per_pixel"
    """Physical size of one full-resolution pixel; sthisto adds it for every library."""
    SPOT_DIAMETER: Final = "spot_diameter_fullres"
    HIRES: Final = "tissue_hires_scalef"
    LOWRES: Final = "tissue_lowres_scalef"
    FULLRES: Final = "tissue_fullres_scalef"
    SPOT_SPACING_UM: Final = "spot_spacing_um"
    """Centre-to-centre distance of neighbouring spots in µm (200 legacy ST, 100 Visium)."""

    @staticmethod
    def for_image(image_key: str) -> str:
        """Scale-factor key of an image key, as scanpy names it."""
        return f"tissue_{image_key}_scalef"


class Metadata:
    """Keys inside ``uns['spatial'][library_id]['metadata']``."""

    IMAGE_PATH: Final = "image_path"
    """Path of the full-resolution image file read lazily when no ``fullres`` array is held."""
    HAS_IMAGE: Final = "has_image"
    """False for expression-only sections (e.g. her2st sections published without H&E)."""
    SOURCE: Final = "source"
    PSEUDO_SPOTS: Final = "pseudo_spots"
    """Set on libraries whose spots sthisto placed (``"tile"``, ``"superresolve"``), not measured."""
    PATCHES_PATH: Final = "patches_path"
    """:func:`sthisto.io.read_hest`: HDF5 file of pre-cut patches (datasets ``img``, ``barcode``, ``coords``)."""
    PATCHES_MICRONS_PER_PIXEL: Final = "patches_microns_per_pixel"
    """µm per pixel of the pre-cut patches in ``patches_path``."""
    PATCHES_SIZE_PX: Final = "patches_size_px"
    """Side in pixels of the pre-cut patches in ``patches_path``."""
    TECHNOLOGY: Final = "technology"
    """Platform of the library (HEST ``st_technology``: ``"Visium"``, ``"Xenium"``, ...)."""
    PYRAMID_LEVELS: Final = "pyramid_levels"
    """:func:`sthisto.io.read_image`: ``(height, width)`` of each level of a pyramidal TIFF."""


class Var:
    """Columns of ``adata.var``."""

    GENE_SYMBOL: Final = "gene_symbol"
    SELECTED: Final = "sthisto_selected"
    """Default boolean column of :func:`sthisto.pp.select_genes`."""

    @staticmethod
    def predicted(key_added: str) -> str:
        """Column marking the genes a model stored under ``key_added`` predicts."""
        return f"{key_added}_predicted"


class Synthetic:
    """Keys written by :func:`sthisto.datasets.synthetic` (the generator's ground truth)."""

    DEPENDENT: Final = "synthetic_dependent"
    """``var`` column: True for genes whose mean follows morphology visible in the image."""
    DRIVER: Final = "synthetic_driver"
    """``var`` column: the morphological quantity a gene mainly follows ("none" if independent)."""
    LOADINGS: Final = "synthetic_loadings"
    """``varm`` key: each gene's log-mean loading on every standardised morphology feature."""
    MORPHOLOGY: Final = "synthetic_morphology"
    """``obsm`` key: per-spot morphology measured in the spot's footprint (DataFrame)."""
    RECORD: Final = "synthetic"
    """``uns['sthisto']`` key of the generator's parameters."""
    SOURCE: Final = "sthisto.datasets.synthetic"
    """``metadata['source']`` of synthetic sections."""


class ModelRecord:
    """Fields of a stored-model record.

    Records live at ``uns['sthisto']['models'][key]`` (:func:`sthisto.tl.train`) and, one per
    fold, at ``uns['sthisto']['cross_validate'][key]['models'][fold]``.
    """

    MANIFEST: Final = "manifest"
    """JSON manifest: method, genes, parameters, history, training data, weight provenance."""
    WEIGHTS: Final = "weights"
    """Weights kept in ``uns``: the safetensors bytes as a uint8 array."""
    WEIGHTS_FILE: Final = "weights_file"
    """Weights written to a folder: absolute path of the safetensors file."""
    WEIGHTS_NAME: Final = "weights_name"
    """Path of that file relative to the ``models_dir`` it was written to (to find it after a move)."""
    WEIGHTS_SHA256: Final = "weights_sha256"
    """SHA-256 of the file, checked on every load."""
    WEIGHTS_BYTES: Final = "weights_bytes"
    """Size of the file in bytes."""
    STORED: Final = "weights_stored"
    """Where the weights are: ``"uns"``, ``"file"`` or ``"none"`` (a cross-validation fold's default)."""
    FOLD: Final = "fold"
    """Fold records: the fold's name."""
    TRAIN_SECTIONS: Final = "train_sections"
    """Fold records: ``library_id`` values the fold's model trained on."""
    TEST_SECTIONS: Final = "test_sections"
    """Fold records: ``library_id`` values of the fold's test spots."""
    TRAIN_PARAMS: Final = "train_params"
    """Fold records: JSON of the :func:`sthisto.tl.train` arguments that trained the fold's model."""
    METRICS: Final = "metrics"
    """Fold records: JSON ``{section: {metric: value}}`` of the fold's held-out sections."""


MANIFEST_FORMAT: Final = "sthisto-model"
"""``format`` of a saved model's manifest (``manifest.json``, ``uns['sthisto']['models']`` records)."""
MANIFEST_VERSION: Final = 1
"""Manifest format version this sthisto writes; it reads this version and older ones."""
