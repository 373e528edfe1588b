"""SpatialData accepted wherever an AnnData is: one adapter shared by pp.embed, tl.train, tl.predict, tl.superresolve.

A SpatialData object passed as the data argument is converted with
:func:`sthisto.io.from_spatialdata` (``table_key`` / ``image_key`` choose its table and image
element, as squidpy's and sopa's SpatialData functions do; images stay lazy), the function runs
on that AnnData, and what it added is written back into the table: new ``obs`` / ``var`` columns,
``obsm``, ``layers`` and the ``uns['sthisto']`` records. A function that returns a new AnnData
of spots (image-only prediction, super-resolution) gets it stored as a new table with circle
shapes that carry the spot image's own coordinate transformations.
"""

from __future__ import annotations

import copy as copy_module
import functools
import inspect

import numpy as np
import pandas as pd

from ._constants import Uns
from ._errors import InputError

_DOC = """
    table_key
        SpatialData input only: the table holding the spots (default: the only table).
        Results are written into it; a new AnnData result becomes a new table named after
        ``key_added`` (or the function), with circle shapes ``<table>_spots`` in the spot
        image's coordinate systems.
    image_key
        With SpatialData input: the image element the spots lie on (see
        :func:`sthisto.io.from_spatialdata`)."""


def is_spatialdata(data) -> bool:
    """Whether ``data`` is a :class:`spatialdata.SpatialData` (without importing spatialdata)."""
    return any(cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata") for cls in type(data).__mro__)


def accepts_spatialdata(function):
    """Let ``function(adata, ...)`` also take a SpatialData object (see the module documentation)."""
    signature = inspect.signature(function)
    has_image_key = "image_key" in signature.parameters
    has_copy = "copy" in signature.parameters

    first = next(iter(signature.parameters))

    @functools.wraps(function)
    def wrapper(*args, table_key: str | None = None, **kwargs):
        # The data object may come by position or by its parameter name (adata=...).
        data = args[0] if args else kwargs.pop(first, None)
        args = args[1:]
        if not is_spatialdata(data):
            if table_key is not None:
                raise InputError(
                    f"table_key={table_key!r} applies to SpatialData input only; {function.__name__} got "
                    f"{type(data).__name__}."
                )
            return function(data, *args, **kwargs)
        from .io._spatialdata import _choose_table, from_spatialdata

        if has_copy and kwargs.get("copy"):
            raise InputError(
                f"copy=True is not available for SpatialData input: {function.__name__} writes its results into "
                f"sdata.tables[...]. Pass a copy of the object (spatialdata.deepcopy(sdata)) instead."
            )
        image_key = kwargs.pop("image_key", None)
        name = _choose_table(data, table_key)
        adata = from_spatialdata(data, table_key=name, image_key=image_key)
        before = _keys(adata)
        result = function(adata, *args, **kwargs)
        _write_back(data, name, adata, before)
        if _is_anndata(result):
            key = kwargs.get("key_added") or function.__name__
            _add_table(data, str(key), result, adata)
        return result

    parameters = list(signature.parameters.values())
    extra = [inspect.Parameter("table_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")]
    if not has_image_key:
        extra.append(
            inspect.Parameter("image_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
        )
    tail = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = signature.replace(parameters=head + extra + tail)
    wrapper.__doc__ = _document(function.__doc__ or "", has_image_key)
    return wrapper


def _document(doc: str, has_image_key: bool) -> str:
    addition = _DOC if not has_image_key else _DOC.split("\n    image_key")[0]
    marker = "\n\n    Returns\n    -------"
    if marker in doc:
        return doc.replace(marker, addition + marker, 1)
    return doc + addition


def _is_anndata(value) -> bool:
    return type(value).__name__ == "AnnData"


def _keys(adata) -> dict:
    return {
        "obs": set(adata.obs.columns),
        "var": set(adata.var.columns),
        "obsm": set(adata.obsm.keys()),
        "layers": set(adata.layers.keys()),
    }


def _write_back(sdata, name: str, adata, before: dict) -> None:
    """Copy what the call added to the converted AnnData into the SpatialData table."""
    from ._anndata import write

    table = sdata.tables[name]
    rows = table.obs_names.get_indexer(adata.obs_names)
    if (rows < 0).any():
        raise InputError(
            f"the spots converted from table {name!r} do not match its rows; results cannot be written back. "
            f"Convert with sthisto.io.from_spatialdata and work on the AnnData instead."
        )
    full = len(rows) == table.n_obs and (rows == np.arange(table.n_obs)).all()

    def expand(values):
        if full:
            return values
        values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
        out = np.full((table.n_obs,) + values.shape[1:], np.nan, dtype=np.result_type(values.dtype, np.float32))
        out[rows] = values
        return out

    for key in set(adata.obs.columns) - before["obs"]:
        column = pd.Series(pd.NA, index=table.obs_names, dtype=object)
        column.iloc[rows] = adata.obs[key].astype(object).to_numpy()
        write(table, "obs", key, column.astype(adata.obs[key].dtype) if full else column, overwrite=True)
    for key in set(adata.var.columns) - before["var"]:
        write(table, "var", key, adata.var[key].reindex(table.var_names).to_numpy(), overwrite=True)
    for slot in ("obsm", "layers"):
        for key in set(getattr(adata, slot).keys()) - before[slot]:
            value = getattr(adata, slot)[key]
            if isinstance(value, pd.DataFrame):
                value = value.to_numpy()
            write(table, slot, key, expand(value), overwrite=True)
    if Uns.STHISTO in adata.uns:
        table.uns[Uns.STHISTO] = copy_module.deepcopy(adata.uns[Uns.STHISTO])


def _add_table(sdata, key: str, result, converted) -> None:
    """Store a new AnnData of spots as a table with circles in the spot images' coordinate systems."""
    from spatialdata.models import TableModel
    from spatialdata.transformations import get_transformation, set_transformation

    from .io._spatialdata import INSTANCE_KEY, REGION_KEY, to_spatialdata

    if key in sdata.tables:
        raise InputError(f"SpatialData already has a table {key!r}; pass key_added='<new name>'.")
    converted_images = converted.uns.get(Uns.STHISTO, {}).get("io", {}).get("from_spatialdata", {}).get("image_key", {})
    piece = to_spatialdata(result, table_key=key, chunk_size=None)
    table = piece.tables[key]
    regions = {}
    for shapes_name, shapes in piece.shapes.items():
        new_name = f"{key}_{shapes_name}"
        library = shapes_name.removesuffix("_spots")
        image = converted_images.get(library) if isinstance(converted_images, dict) else None
        if image and image in sdata.images:
            set_transformation(shapes, get_transformation(sdata.images[image], get_all=True), set_all=True)
        sdata.shapes[new_name] = shapes
        regions[shapes_name] = new_name
    table.obs[REGION_KEY] = pd.Categorical(table.obs[REGION_KEY].astype(str).map(regions))
    table.uns.pop("spatialdata_attrs", None)
    sdata.tables[key] = TableModel.parse(
        table, region=list(regions.values()), region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
