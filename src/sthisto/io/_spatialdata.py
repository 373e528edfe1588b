"""Conversion between SpatialData (image + circle shapes + table) and the AnnData convention.

A SpatialData object keeps each spot as a circle in its own coordinate frame, linked to an
image through coordinate systems; sthisto keeps spot centres in pixels of the library's image
(``obsm['spatial']``) and the image under ``uns['spatial'][library_id]``. The conversion maps
circles into the image's pixel frame with spatialdata's transformations and leaves the image
lazy: only a dask view of its full-resolution level is stored, never a computed slide.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import record
from .._constants import Images, Metadata, Obs, Obsm, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input
from ._common import TIFF_SUFFIXES, image_size, median_spacing, names_list

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

SMALL_IMAGE_SIDE = 4000
"""Other images of a library no longer than this are loaded as plotting images (hires/lowres)."""

REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
_ELEMENT_NAME = re.compile(r"[^A-Za-z0-9_.-]")


# --------------------------------------------------------------------------------------------
# SpatialData -> AnnData


def from_spatialdata(
    sdata: SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    library_id: str | None = None,
    microns_per_pixel: float | Mapping[str, float] | None = None,
    spot_spacing_um: float | None = None,
) -> AnnData:
    """Convert a SpatialData object (image + circle shapes + table) into sthisto's AnnData.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` whose table annotates circle shapes (spots).
    table_key
        The table to use; default: the only table.
    image_key
        The image element of the spots: one name, or ``{shapes_key: image_key}``. Default:
        among the images sharing a coordinate system with the shapes, the largest one (the
        full-resolution image); smaller ones (≤ 4,000 px) become ``hires``/``lowres``
        plotting images. Shapes with no image load as expression-only data.
    shapes_key
        Circle shapes element(s) annotated by the table; default: all it annotates.
        Each becomes one library.
    library_id
        Library name when one shapes element is read. Default: the table's
        ``obs['library_id']`` for those spots where it holds one value, else the shapes name.
    microns_per_pixel
        µm per pixel of the chosen image (one number or ``{library_id: number}``). Default:
        ``microns_per_pixel`` carried in ``table.uns['spatial'][library]['scalefactors']``
        (in the frame of the circles, converted to the image's frame).
    spot_spacing_um
        Centre-to-centre distance of neighbouring spots in µm (100 for Visium, 200 for legacy
        ST). Default: the value carried by the table, else the median nearest-neighbour
        distance of the spots (a warning says so; it overestimates on sparse subsets).

    Returns
    -------
    AnnData with the table's rows of the chosen shapes (table order), ``X``, ``var``,
    ``layers`` and other ``obs`` columns as in the table, and

    ``obs['library_id']``
        Categorical library of each spot.
    ``obsm['spatial']``
        Circle centres in pixels of the library's image (its level 0).
    ``uns['spatial'][library_id]``
        ``images['fullres']``: lazy dask ``(height, width, 3)`` view of the image's level 0
        (never computed here); ``hires``/``lowres`` from small companion images;
        ``scalefactors``: ``microns_per_pixel``, ``spot_diameter_fullres`` (circle diameter
        in image pixels), ``spot_spacing_um`` and ``tissue_<key>_scalef`` of the plotting images; ``metadata``:
        ``has_image``, ``source``.

    Examples
    --------
    >>> sdata = spatialdata_io.visium("sample/outs", dataset_id="s1", fullres_image_file="he.tif")
    >>> adata = sthisto.io.from_spatialdata(sdata)
    """
    import spatialdata as sd
    from spatialdata.models import get_table_keys

    if not isinstance(sdata, sd.SpatialData):
        raise InputError(f"from_spatialdata expects a spatialdata.SpatialData, got {type(sdata).__name__}.")
    table_key = _choose_table(sdata, table_key)
    table = sdata.tables[table_key]
    try:
        regions, region_key, instance_key = get_table_keys(table)
    except ValueError:
        raise InputError(
            f"table {table_key!r} annotates no element (no uns['spatialdata_attrs']). Link it to "
            f"the spots with spatialdata.models.TableModel.parse(table, region='<shapes>', "
            f"region_key='region', instance_key='<spot id column>')."
        ) from None
    regions = [regions] if isinstance(regions, str) else list(regions)
    shapes_keys = _choose_shapes(sdata, table_key, regions, shapes_key)
    if spot_spacing_um is not None and not (np.isfinite(spot_spacing_um) and spot_spacing_um > 0):
        raise InputError(f"spot_spacing_um={spot_spacing_um!r} must be a positive number of µm.")
    if library_id is not None and len(shapes_keys) > 1:
        raise InputError(
            f"library_id={library_id!r} names one library but {len(shapes_keys)} shapes elements are "
            f"read ({shapes_keys}); pass shapes_key= one of them, or leave library_id unset."
        )
    for column in (region_key, instance_key):
        if column not in table.obs.columns:
            raise InputError(f"table {table_key!r} lacks its own annotation column obs[{column!r}]; re-parse it.")

    region_of_row = table.obs[region_key].astype(str).to_numpy()
    libraries = []
    for shapes_name in shapes_keys:
        rows = np.flatnonzero(region_of_row == shapes_name)
        libraries.append(
            _Library.build(
                sdata,
                table,
                table_key,
                shapes_name,
                rows,
                instance_key,
                image=_image_for(sdata, image_key, shapes_name),
                library_id=library_id,
                microns_per_pixel=microns_per_pixel,
                spot_spacing_um=spot_spacing_um,
            )
        )
    names = [lib.name for lib in libraries]
    if len(set(names)) != len(names):
        raise InputError(
            f"shapes {shapes_keys} map to library ids {names}, which repeat; give each shapes element "
            f"its own obs['library_id'] in the table, or read them one at a time with shapes_key=."
        )
    adata = _assemble(table, region_key, instance_key, libraries)
    record(
        adata,
        "io",
        "from_spatialdata",
        {
            "table_key": table_key,
            "shapes_key": shapes_keys,
            "image_key": {lib.name: lib.image or "" for lib in libraries},
            "library_id": [lib.name for lib in libraries],
        },
        overwrite=True,  # a table converted before may carry an older record
    )
    return adata


def _choose_table(sdata, table_key: str | None) -> str:
    tables = list(sdata.tables.keys())
    if table_key is None:
        if len(tables) == 1:
            return tables[0]
        raise MissingKeyError(
            f"SpatialData has {len(tables)} tables {tables}; pass table_key= the one annotating the spots."
            if tables
            else "SpatialData has no table: the spot expression must be a table annotating circle shapes "
            "(spatialdata.models.TableModel.parse(adata, region='<shapes>', ...))."
        )
    if table_key not in tables:
        raise MissingKeyError(f"SpatialData has no table {table_key!r}; its tables are {tables}.")
    return table_key


def _choose_shapes(sdata, table_key: str, regions: list[str], shapes_key) -> list[str]:
    available = list(sdata.shapes.keys())
    requested = names_list(shapes_key, what="shapes_key")
    if requested is None:
        chosen = [r for r in regions if r in available]
        if not chosen:
            raise InputError(
                f"table {table_key!r} annotates {regions}, none of which is a shapes element of this "
                f"SpatialData (shapes: {available}). Re-parse the table with region= the spot circles."
            )
        return chosen
    for name in requested:
        if name not in available:
            raise MissingKeyError(f"SpatialData has no shapes element {name!r}; its shapes are {available}.")
        if name not in regions:
            raise InputError(
                f"table {table_key!r} does not annotate shapes {name!r}; it annotates {regions}. Pass "
                f"shapes_key= one of those, or table_key= the table of {name!r}."
            )
    return requested


def _image_for(sdata, image_key, shapes_name: str) -> str | None:
    available = list(sdata.images.keys())
    if isinstance(image_key, Mapping):
        image_key = image_key.get(shapes_name)
        if image_key is None:
            return _largest_linked_image(sdata, shapes_name)
    if image_key is None:
        return _largest_linked_image(sdata, shapes_name)
    if image_key not in available:
        raise MissingKeyError(f"SpatialData has no image {image_key!r}; its images are {available}.")
    if not _common_systems(sdata[shapes_name], sdata.images[image_key]):
        raise InputError(
            f"image {image_key!r} and shapes {shapes_name!r} share no coordinate system, so spot "
            f"positions cannot be placed on the image. Add transformations to a common coordinate "
            f"system (spatialdata.transformations.set_transformation)."
        )
    return image_key


def _largest_linked_image(sdata, shapes_name: str) -> str | None:
    linked = [k for k in sdata.images.keys() if _common_systems(sdata[shapes_name], sdata.images[k])]
    if not linked:
        return None
    return max(linked, key=lambda k: int(np.prod(_level0(sdata.images[k]).shape[-2:])))


def _transformations(element) -> dict:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, get_all=True)


def _common_systems(a, b) -> list[str]:
    return sorted(set(_transformations(a)) & set(_transformations(b)))


def _affine_xy(transformation) -> np.ndarray:
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _between(source, target) -> np.ndarray:
    """3×3 affine (x, y) mapping ``source``'s intrinsic frame into ``target``'s."""
    system = _common_systems(source, target)[0]
    to_system = _affine_xy(_transformations(source)[system])
    target_to_system = _affine_xy(_transformations(target)[system])
    return np.linalg.inv(target_to_system) @ to_system


def _length_scale(affine: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))


def _level0(image):
    """Full-resolution level of an image element, as a DataArray (c, y, x)."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        return image
    from spatialdata import get_pyramid_levels

    return get_pyramid_levels(image, n=0)


def _yxc_view(image, *, what: str):
    """Lazy (height, width, 3) dask view of an element's level 0, checked for RGB."""
    import dask.array as da

    level = _level0(image)
    dims = tuple(level.dims)
    if set(dims) != {"c", "y", "x"}:
        raise InputError(f"{what} has dimensions {dims}; expected a 2-D image with channels (c, y, x).")
    data = level.data if isinstance(level.data, da.Array) else da.from_array(level.data)
    data = data.transpose([dims.index("y"), dims.index("x"), dims.index("c")])
    channels = data.shape[-1]
    if channels == 4:
        data = data[..., :3]  # alpha carries no stain information
    elif channels != 3:
        raise InputError(f"{what} has {channels} channel(s); sthisto needs an RGB H&E image (3 channels, or RGBA).")
    dtype = np.dtype(data.dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise InputError(f"{what} has dtype {dtype}; sthisto reads 8-bit RGB. Rescale it to uint8 before converting.")
    return data


class _Library:
    """One shapes element turned into one library's pieces."""

    def __init__(self, name, rows, coords, spatial, image):
        self.name = name
        self.rows = rows
        self.coords = coords
        self.spatial = spatial
        self.image = image

    @classmethod
    def build(
        cls,
        sdata,
        table,
        table_key,
        shapes_name,
        rows,
        instance_key,
        *,
        image,
        library_id,
        microns_per_pixel,
        spot_spacing_um,
    ):
        shapes = sdata.shapes[shapes_name]
        if "radius" not in shapes.columns or not (shapes.geometry.geom_type == "Point").all():
            raise InputError(
                f"shapes {shapes_name!r} are not circles (points with a 'radius'); sthisto needs one "
                f"circle per spot. Convert polygons with spatialdata.to_circles(sdata[{shapes_name!r}])."
            )
        if len(rows) == 0:
            raise InputError(f"table {table_key!r} has no rows for shapes {shapes_name!r}.")
        instances = table.obs[instance_key].to_numpy()[rows]
        try:
            position = shapes.index.get_indexer(pd.Index(instances).astype(shapes.index.dtype, copy=False))
        except (TypeError, ValueError):  # e.g. string ids against an integer index
            position = shapes.index.astype(str).get_indexer(pd.Index(instances).astype(str))
        if (position < 0).any():
            raise InputError(
                f"{int((position < 0).sum())} rows of table {table_key!r} point to instances absent "
                f"from shapes {shapes_name!r} (e.g. {list(instances[position < 0][:3])}); the table and "
                f"shapes disagree. Rebuild the table's obs[{instance_key!r}] from the shapes' index."
            )
        centres = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])[position]
        radius = float(np.median(shapes["radius"].to_numpy(dtype=float)[position]))

        name = cls._name(table, rows, shapes_name, library_id)
        carried = table.uns.get(Uns.SPATIAL, {})
        carried = carried.get(name, carried.get(shapes_name, {}))
        carried_scalefactors = dict(carried.get(Uns.SCALEFACTORS, {}))
        metadata = dict(carried.get(Uns.METADATA, {}))

        images, scalefactors = {}, {}
        if image is None:
            if metadata.get(Metadata.HAS_IMAGE) is not False:
                logger.warning(
                    "shapes %r share no coordinate system with any image: library %r loaded without image.",
                    shapes_name,
                    name,
                )
            to_pixels = np.eye(3)
        else:
            element = sdata.images[image]
            to_pixels = _between(shapes, element)
            images[Images.FULLRES] = _yxc_view(element, what=f"image {image!r}")
            for key, small, scale in _small_images(sdata, element, image):
                if key not in images:
                    images[key] = small
                    scalefactors[ScaleFactors.for_image(key)] = scale
        coords = (to_pixels @ np.column_stack([centres, np.ones(len(centres))]).T).T[:, :2]
        scale = _length_scale(to_pixels)  # image pixels per shapes unit

        # Carried lengths are in the shapes' frame; convert them into the image's.
        for key, value in carried_scalefactors.items():
            if key == ScaleFactors.MICRONS_PER_PIXEL:
                scalefactors[key] = float(value) / scale
            elif key.endswith("_fullres"):
                scalefactors[key] = float(value) * scale
            elif key.startswith("tissue_") and key.endswith("_scalef"):
                continue  # belong to plotting images; those found are rescaled above
            else:
                scalefactors[key] = value
        scalefactors[ScaleFactors.SPOT_DIAMETER] = 2.0 * radius * scale
        given = microns_per_pixel.get(name) if isinstance(microns_per_pixel, Mapping) else microns_per_pixel
        if given is not None:
            if not (np.isfinite(given) and given > 0):
                raise InputError(f"microns_per_pixel={given!r} for {name!r} must be a positive number.")
            scalefactors[ScaleFactors.MICRONS_PER_PIXEL] = float(given)
        mpp = scalefactors.get(ScaleFactors.MICRONS_PER_PIXEL)
        if mpp is None:
            diameter = scalefactors[ScaleFactors.SPOT_DIAMETER]
            raise MissingKeyError(
                f"the physical scale of library {name!r} is unknown: pass microns_per_pixel= (µm per "
                f"pixel of {'image ' + repr(image) if image else 'the spot coordinates'}), e.g. for "
                f"Visium circles from Space Ranger ({diameter:.4g} px across, the size Space Ranger gives a "
                f"theoretical 65 µm spot, not the 55 µm capture spot) microns_per_pixel={65.0 / diameter:.4g}."
            )
        if spot_spacing_um is not None:
            scalefactors[ScaleFactors.SPOT_SPACING_UM] = float(spot_spacing_um)
        elif ScaleFactors.SPOT_SPACING_UM not in scalefactors:
            spacing = median_spacing(coords) * mpp
            if np.isfinite(spacing):
                scalefactors[ScaleFactors.SPOT_SPACING_UM] = spacing
                logger.warning(
                    "library %r: spot spacing estimated as %.4g µm from the median nearest-neighbour "
                    "distance; pass spot_spacing_um= if you know it (Visium: 100, legacy ST: 200).",
                    name,
                    spacing,
                )

        metadata[Metadata.HAS_IMAGE] = image is not None
        metadata.setdefault(Metadata.SOURCE, "spatialdata")
        spatial = {Uns.IMAGES: images, Uns.SCALEFACTORS: scalefactors, Uns.METADATA: metadata}
        return cls(name, rows, coords, spatial, image)

    @staticmethod
    def _name(table, rows, shapes_name, library_id) -> str:
        if library_id is not None:
            return str(library_id)
        if Obs.LIBRARY_ID in table.obs.columns:
            values = pd.unique(table.obs[Obs.LIBRARY_ID].astype(str).to_numpy()[rows])
            if len(values) == 1:
                return str(values[0])
        return shapes_name


def _small_images(sdata, fullres_element, fullres_name: str):
    """Companion images (≤ SMALL_IMAGE_SIDE px) of the full-resolution one, loaded as plotting images."""
    from .._images import _to_uint8

    for name, element in sdata.images.items():
        if name == fullres_name or not _common_systems(element, fullres_element):
            continue
        level = _level0(element)
        if max(level.shape[-2:]) > SMALL_IMAGE_SIDE:
            continue
        try:
            view = _yxc_view(element, what=f"image {name!r}")
        except InputError:
            continue
        scale = 1.0 / _length_scale(_between(element, fullres_element))  # small px per fullres px
        key = Images.LOWRES if "lowres" in name.lower() else Images.HIRES
        yield key, _to_uint8(np.asarray(view.compute())), scale


def _assemble(table, region_key: str, instance_key: str, libraries: list[_Library]):
    order = np.sort(np.concatenate([lib.rows for lib in libraries]))
    coords = np.empty((table.n_obs, 2), dtype=np.float64)
    library = np.empty(table.n_obs, dtype=object)
    for lib in libraries:
        coords[lib.rows] = lib.coords
        library[lib.rows] = lib.name
    adata = table[order].copy()
    adata.obs = adata.obs.drop(columns=[region_key, instance_key])
    adata.obs[Obs.LIBRARY_ID] = pd.Categorical(library[order], categories=[lib.name for lib in libraries])
    adata.obsm[Obsm.SPATIAL] = coords[order]
    uns = copy.deepcopy({k: v for k, v in adata.uns.items() if k not in ("spatialdata_attrs", Uns.SPATIAL)})
    uns[Uns.SPATIAL] = {lib.name: lib.spatial for lib in libraries}
    adata.uns = uns
    return adata


# --------------------------------------------------------------------------------------------
# AnnData -> SpatialData


IMAGE_CHUNK = 1024
"""Chunk side (px) of full-resolution images written by :func:`to_spatialdata`."""


@checked_input
def to_spatialdata(
    adata: AnnData,
    *,
    library_ids: str | Sequence[str] | None = None,
    table_key: str = "table",
    region_key: str = REGION_KEY,
    instance_key: str = INSTANCE_KEY,
    chunk_size: int | None = IMAGE_CHUNK,
    scale_factors: Sequence[int] | None = None,
) -> SpatialData:
    """Convert sthisto's AnnData into a SpatialData object (images, circle shapes, one table).

    ``adata`` is not modified. Images stay lazy: a held ``fullres`` array is wrapped as is,
    an image known by ``metadata['image_path']`` is read on demand (TIFF through zarr, other
    formats decoded on first access).

    Parameters
    ----------
    adata
        AnnData in the sthisto convention (``obs['library_id']``, ``obsm['spatial']``,
        ``uns['spatial'][library_id]`` with ``spot_diameter_fullres``).
    library_ids
        Libraries to convert; default all.
    table_key
        Name of the table element.
    region_key, instance_key
        Table columns naming each row's shapes element and its circle.
    chunk_size
        Side of the square chunks of the full-resolution image (default 1024 px), so that
        reading a patch back from a written object decodes a few chunks, not the whole
        slide. ``None`` keeps the image's own chunks (one chunk for a JPEG).
    scale_factors
        Downscaling factors between the levels of the full-resolution image's multiscale
        pyramid (spatialdata's ``scale_factors``). Default: factors of 2 until the coarsest
        level's longest side is below twice ``chunk_size`` (one scale with ``chunk_size=None``);
        ``[]`` writes a single scale.

    Returns
    -------
    :class:`spatialdata.SpatialData` with, per library ``<lib>`` (a coordinate system of that
    name, in full-resolution pixels):

    ``images['<lib>_image']``
        The full-resolution image (where the library has one), chunked and multiscale.
    ``images['<lib>_hires_image']`` / ``['<lib>_lowres_image']``
        The plotting images, scaled into the library's frame.
    ``shapes['<lib>_spots']``
        One circle per spot at ``obsm['spatial']``, radius ``spot_diameter_fullres / 2``.
    ``tables[table_key]``
        The expression table annotating all spot shapes; its ``uns['spatial']`` keeps each
        library's ``scalefactors`` and ``metadata`` (not the images).

    Examples
    --------
    >>> sdata = sthisto.io.to_spatialdata(adata)
    >>> back = sthisto.io.from_spatialdata(sdata)
    """
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import TableModel

    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 16):
        raise InputError(f"chunk_size={chunk_size!r} must be an integer number of pixels >= 16, or None.")
    if scale_factors is not None:
        scale_factors = list(scale_factors)
        if any(isinstance(f, bool) or int(f) != f or f < 2 for f in scale_factors):
            raise InputError(
                f"scale_factors={scale_factors!r} must be integers >= 2 (e.g. [2, 2, 2]), or [] for one scale."
            )
    libraries = _check_convertible(adata, library_ids, region_key, instance_key)
    library_of_row = adata.obs[Obs.LIBRARY_ID].astype(str).to_numpy()
    coords = np.asarray(adata.obsm[Obsm.SPATIAL], dtype=float)[:, :2]

    images, shapes = {}, {}
    rows = np.flatnonzero(np.isin(library_of_row, libraries))
    region = np.empty(adata.n_obs, dtype=object)
    instance = np.zeros(adata.n_obs, dtype=np.int64)
    uns_spatial = {}
    for lib in libraries:
        entry = adata.uns[Uns.SPATIAL][lib]
        element = _ELEMENT_NAME.sub("_", lib)
        mine = np.flatnonzero(library_of_row == lib)
        shapes_name = f"{element}_spots"
        shapes[shapes_name] = _circles(coords[mine], entry, element)
        region[mine] = shapes_name
        instance[mine] = np.arange(len(mine))
        images.update(_image_elements(entry, element, lib, chunk_size=chunk_size, scale_factors=scale_factors))
        uns_spatial[lib] = {
            Uns.SCALEFACTORS: dict(entry.get(Uns.SCALEFACTORS, {})),
            Uns.METADATA: dict(entry.get(Uns.METADATA, {})),
        }

    obs = adata.obs.iloc[rows].copy()
    obs[region_key] = pd.Categorical(
        region[rows], categories=[f"{_ELEMENT_NAME.sub('_', lib)}_spots" for lib in libraries]
    )
    obs[instance_key] = instance[rows]
    uns = copy.deepcopy({k: v for k, v in adata.uns.items() if k != Uns.SPATIAL})
    uns[Uns.SPATIAL] = copy.deepcopy(uns_spatial)
    table = ad.AnnData(
        X=adata.X[rows] if adata.X is not None else None,
        obs=obs,
        var=adata.var.copy(),
        layers={k: v[rows] for k, v in adata.layers.items()},
        obsm={
            k: np.asarray(v)[rows] if not isinstance(v, pd.DataFrame) else v.iloc[rows] for k, v in adata.obsm.items()
        },
        varm=dict(adata.varm),
        uns=uns,
    )
    table = TableModel.parse(table, region=list(shapes), region_key=region_key, instance_key=instance_key)
    return sd.SpatialData(images=images, shapes=shapes, tables={table_key: table})


def _check_convertible(adata, library_ids, region_key: str, instance_key: str) -> list[str]:
    from .._spots import library_ids as spot_libraries
    from .._spots import spot_coordinates

    spot_coordinates(adata)
    present = list(pd.unique(spot_libraries(adata)))
    requested = names_list(library_ids, what="library_ids")
    if requested is None:
        requested = present
    unknown = [lib for lib in requested if lib not in present]
    if unknown:
        raise MissingKeyError(f"library id(s) {unknown} have no spots; adata's libraries are {present}.")
    spatial = adata.uns.get(Uns.SPATIAL, {})
    for lib in requested:
        if lib not in spatial:
            raise MissingKeyError(
                f"adata.uns['spatial'] has no entry for library {lib!r}; read the data with a "
                f"sthisto.io reader or add its scalefactors (spot_diameter_fullres, microns_per_pixel)."
            )
        diameter = spatial[lib].get(Uns.SCALEFACTORS, {}).get(ScaleFactors.SPOT_DIAMETER)
        if diameter is None or not np.isfinite(diameter) or diameter <= 0:
            raise MissingKeyError(
                f"library {lib!r} has no valid scalefactors['spot_diameter_fullres']; the circle radius "
                f"is half of it. Set it (spot diameter in full-resolution pixels)."
            )
    clashing = [c for c in (region_key, instance_key) if c in adata.obs.columns]
    if clashing:
        raise InputError(
            f"adata.obs already has column(s) {clashing}, which the table needs for its annotation; "
            f"pass region_key= / instance_key= other names."
        )
    if region_key == instance_key:
        raise InputError("region_key and instance_key must differ.")
    elements = [_ELEMENT_NAME.sub("_", lib) for lib in requested]
    if len(set(elements)) != len(elements):
        raise InputError(f"library ids {requested} collide once made valid element names ({elements}); rename them.")
    return requested


def _circles(coords: np.ndarray, entry: dict, system: str):
    import geopandas as gpd
    from shapely import points
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    radius = float(entry[Uns.SCALEFACTORS][ScaleFactors.SPOT_DIAMETER]) / 2.0
    frame = gpd.GeoDataFrame(
        {"radius": np.full(len(coords), radius)},
        geometry=points(coords),
        index=pd.RangeIndex(len(coords)),
    )
    return ShapesModel.parse(frame, transformations={system: Identity()})


def _pyramid_factors(shape: tuple[int, int], chunk_size: int) -> list[int]:
    """Factors of 2 until the coarsest level's longest side is below twice the chunk side."""
    side, factors = max(shape), []
    while side / 2 >= chunk_size:
        factors.append(2)
        side /= 2
    return factors


def _image_elements(entry: dict, element: str, lib: str, *, chunk_size=None, scale_factors=None) -> dict:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    out = {}
    images = entry.get(Uns.IMAGES, {})
    metadata = entry.get(Uns.METADATA, {})
    scalefactors = entry.get(Uns.SCALEFACTORS, {})
    full = None
    if metadata.get(Metadata.HAS_IMAGE, True) is not False:
        if Images.FULLRES in images:
            full = images[Images.FULLRES]
        elif Metadata.IMAGE_PATH in metadata:
            full = _lazy_file(Path(metadata[Metadata.IMAGE_PATH]), lib)
    if full is not None:
        data = _cyx(full)
        if chunk_size is not None:
            data = data.rechunk((data.shape[0], int(chunk_size), int(chunk_size)))
        if scale_factors is not None:
            factors = list(scale_factors)
        else:
            factors = [] if chunk_size is None else _pyramid_factors(data.shape[1:], chunk_size)
        out[f"{element}_image"] = Image2DModel.parse(
            data,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={element: Identity()},
            scale_factors=factors or None,
            chunks=None if chunk_size is None else (data.shape[0], int(chunk_size), int(chunk_size)),
        )
    for key in (Images.HIRES, Images.LOWRES):
        scale = scalefactors.get(ScaleFactors.for_image(key))
        if key in images and scale:
            out[f"{element}_{key}_image"] = Image2DModel.parse(
                _cyx(images[key]),
                dims=("c", "y", "x"),
                c_coords=["r", "g", "b"],
                transformations={element: Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))},
            )
    return out


def _cyx(array):
    import dask.array as da

    data = array if isinstance(array, da.Array) else da.from_array(array)
    return data[..., :3].transpose(2, 0, 1)


def _lazy_file(path: Path, lib: str):
    """A dask array of an image file that reads nothing until computed."""
    import dask
    import dask.array as da

    if not path.is_file():
        raise MissingKeyError(
            f"image file {str(path)!r} of library {lib!r} does not exist; update "
            f"uns['spatial'][{lib!r}]['metadata']['image_path'] to its new location."
        )
    if path.suffix.lower() in TIFF_SUFFIXES:
        from .._images import _open_tiff

        return da.from_zarr(_open_tiff(str(path)))
    from .._images import _decode_file

    height, width = image_size(path)
    decoded = dask.delayed(_decode_file, pure=True)(str(path.resolve()))
    return da.from_delayed(decoded, shape=(height, width, 3), dtype=np.uint8)
