"""Spot-centred image patches of a physical size, read lazily and in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from .._constants import Obs
from .._errors import InputError
from .._images import LibraryImage, image_source
from .._spots import library_ids, spot_coordinates  # also imported from here by the layers above


@dataclass(frozen=True)
class PatchSpec:
    """Geometry of the patches a method sees.

    Parameters
    ----------
    size_px
        Side of the patch handed to the network, in pixels.
    size_um
        Physical side of the field of view in µm. The crop covers ``size_um`` at the image's
        own µm/px and is resampled to ``size_px``, so slides scanned at different resolutions
        give the same field of view. ``None`` crops ``size_px`` native pixels without
        resampling (the authors' behaviour, resolution-dependent).
    layout
        ``"chw"`` (channels, rows, columns) is the normal orientation. ``"cwh"`` reproduces the
        THItoGene/HGGEF reference code, which transposes patches to (channels, x, y).
    """

    size_px: int = 112
    size_um: float | None = None
    layout: Literal["chw", "cwh"] = "chw"

    def __post_init__(self) -> None:
        if int(self.size_px) != self.size_px or self.size_px < 1:
            raise InputError(f"PatchSpec.size_px={self.size_px!r} must be a positive integer.")
        if self.size_um is not None and not (np.isfinite(self.size_um) and self.size_um > 0):
            raise InputError(f"PatchSpec.size_um={self.size_um!r} must be a positive number of µm or None.")
        if self.layout not in ("chw", "cwh"):
            raise InputError(f"PatchSpec.layout={self.layout!r}; use 'chw' (default) or 'cwh' (reference).")

    def crop_side(self, image_microns_per_pixel: float) -> int:
        """Side of the crop in image pixels before resampling."""
        if self.size_um is None:
            return int(self.size_px)
        return max(1, int(round(self.size_um / image_microns_per_pixel)))

    def to_dict(self) -> dict:
        """Plain-dict form for manifests."""
        return asdict(self)


class PatchDataset:
    """Spot-centred patches of an AnnData's spots, as a map-style torch ``Dataset``.

    Images are opened lazily per library and patches are cut on request, never all at once:
    memory stays bounded by the batch, whatever the slide size. Patches that reach past the
    image border are padded with white and flagged in :attr:`clipped`, never shifted.

    A library read by :func:`sthisto.io.read_hest` with a patch file serves HEST's pre-cut
    patches (resampled to ``size_px``) instead of cutting the slide, when ``image_key`` is
    ``None``, ``spec.size_um`` equals the pre-cut field of view (within 1 %) and every served
    spot of the library has a pre-cut patch.

    Parameters
    ----------
    adata
        AnnData in the sthisto convention (``obs['library_id']``, ``obsm['spatial']``,
        ``uns['spatial'][library_id]`` with ``microns_per_pixel``).
    spec
        Patch geometry; see :class:`PatchSpec`.
    image_key
        Image to cut from; ``None`` is the full-resolution image (see :func:`image_source`).
    indices
        Positions (into ``adata.obs``) of the spots to serve; default all.

    Examples
    --------
    >>> ds = PatchDataset(adata, spec=PatchSpec(size_px=112, size_um=77.0))
    >>> patches, clipped = ds.read_batch(range(16))  # uint8 tensor (16, 3, 112, 112)
    """

    def __init__(
        self,
        adata,
        *,
        spec: PatchSpec | None = None,
        image_key: str | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.spec = spec or PatchSpec()
        self.image_key = image_key
        coords = spot_coordinates(adata)
        libraries = library_ids(adata)
        self.indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=int)
        self._library = libraries[self.indices]
        self._images: dict[str, LibraryImage] = {}
        # Library -> (patch file, row in it per spot of adata): HEST's pre-cut patches, used when
        # their field of view is the one asked for, so the slide is not cut again.
        self._precut: dict[str, tuple[str, np.ndarray]] = {}
        n = len(self.indices)
        self._origin = np.zeros((n, 2), dtype=np.int64)  # (y0, x0) in the image frame
        self._side = np.zeros(n, dtype=np.int64)
        self.clipped = np.zeros(n, dtype=bool)
        """Per served spot: True if its patch reaches past the image border (padded)."""
        for library in np.unique(self._library):
            image = image_source(adata, library, image_key=image_key)
            self._images[library] = image
            rows = np.flatnonzero(self._library == library)
            side = self.spec.crop_side(image.microns_per_pixel)
            height, width = image.source.shape
            if side > min(height, width):
                raise InputError(
                    f"patch side of {side} px ({self.spec.size_um} µm at "
                    f"{image.microns_per_pixel:.3g} µm/px) is larger than library {library!r}'s "
                    f"image ({height} × {width} px). Use a smaller size_um, or check "
                    f"microns_per_pixel in its scalefactors."
                )
            centre = coords[self.indices[rows]] * image.scale  # (x, y) in image pixels
            outside = (centre[:, 0] < 0) | (centre[:, 1] < 0) | (centre[:, 0] >= width) | (centre[:, 1] >= height)
            if outside.any():
                names = adata.obs_names[self.indices[rows[outside]]][:5].tolist()
                raise InputError(
                    f"{int(outside.sum())} spots of library {library!r} lie outside its "
                    f"{height} × {width} px image (e.g. {names}). obsm['spatial'] must be (x, y) "
                    f"in full-resolution pixels; drop those spots or fix the coordinates or scale factors."
                )
            origin = np.rint(centre - side / 2.0).astype(np.int64)
            self._origin[rows, 0] = origin[:, 1]
            self._origin[rows, 1] = origin[:, 0]
            self._side[rows] = side
            self.clipped[rows] = (
                (origin[:, 0] < 0) | (origin[:, 1] < 0) | (origin[:, 0] + side > width) | (origin[:, 1] + side > height)
            )
            precut = _precut_rows(adata, library, self.indices[rows], self.spec, image_key)
            if precut is not None:
                self._precut[library] = precut

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        patches, _ = self.read_batch([item])
        return patches[0]

    def __getitems__(self, items: Sequence[int]):
        patches, _ = self.read_batch(items)
        return list(patches)

    def read_batch(self, items: Sequence[int]):
        """Cut the patches of positions ``items`` (into this dataset, not into ``adata``).

        Returns
        -------
        patches
            uint8 tensor ``(len(items), 3, size_px, size_px)`` (transposed for ``layout="cwh"``),
            raw 0–255 values.
        clipped
            Boolean array, True where the patch was padded at the image border.
        """
        import torch

        items = np.asarray(list(items), dtype=int)
        size = int(self.spec.size_px)
        out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
        # Spots of one library share a crop side, so each library's crops resample as one batch.
        for library in np.unique(self._library[items]):
            positions = np.flatnonzero(self._library[items] == library)
            if library in self._precut:
                file, patch_rows = self._precut[library]
                crops = _read_precut(file, patch_rows[self.indices[items[positions]]])
                side = crops.shape[1]
            else:
                side = int(self._side[items[positions[0]]])
                crops = _read_crops(self._images[library].source, self._origin[items[positions]], side)
            batch = torch.from_numpy(crops).permute(0, 3, 1, 2)
            if side != size:
                batch = _resample(batch, size)
            out[torch.from_numpy(positions)] = batch
        if self.spec.layout == "cwh":
            out = out.transpose(-1, -2).contiguous()
        return out, self.clipped[items]


PRECUT_TOLERANCE = 0.01
"""Pre-cut patches stand in for cut ones when their field of view is within 1 % of the request."""


def _precut_rows(adata, library: str, spots: np.ndarray, spec: PatchSpec, image_key) -> tuple[str, np.ndarray] | None:
    """The pre-cut patch file of ``library`` and each spot's row in it, when usable for ``spec``."""
    from .._constants import Metadata, Uns

    metadata = adata.uns.get(Uns.SPATIAL, {}).get(library, {}).get(Uns.METADATA, {})
    file = metadata.get(Metadata.PATCHES_PATH)
    if image_key is not None or file is None or spec.size_um is None or Obs.PATCH_INDEX not in adata.obs:
        return None
    field_um = float(metadata[Metadata.PATCHES_MICRONS_PER_PIXEL]) * int(metadata[Metadata.PATCHES_SIZE_PX])
    if abs(field_um - spec.size_um) > PRECUT_TOLERANCE * spec.size_um:
        return None
    rows = adata.obs[Obs.PATCH_INDEX].to_numpy(dtype=np.int64)
    if (rows[spots] < 0).any():
        return None
    return str(file), rows


def _read_precut(file: str, rows: np.ndarray) -> np.ndarray:
    """Patches ``(n, side, side, 3)`` uint8 at ``rows`` of a HEST patch file, in the order given."""
    import h5py

    unique, inverse = np.unique(rows, return_inverse=True)
    with h5py.File(file, "r") as h5:
        # h5py reads increasing indices only; one read per batch, then reorder.
        patches = np.asarray(h5["img"][unique])
    return np.ascontiguousarray(patches[inverse][..., :3]).astype(np.uint8, copy=False)


REGION_READ_OVERHEAD = 4.0
"""Neighbouring crops share one read of their bounding box while it covers at most this many
times their own area: a lazy source pays per read (tiles decoded again, a dask graph built), so
one read per run of neighbours beats one per crop, and memory stays a few batches' worth."""


def _read_crops(source, origins: np.ndarray, side: int) -> np.ndarray:
    """Crops ``(n, side, side, 3)`` at ``origins`` (y0, x0), grouping runs of neighbouring spots."""
    crops = np.empty((len(origins), side, side, 3), dtype=np.uint8)
    start = 0
    while start < len(origins):
        stop = start + 1
        top, left = origins[start]
        bottom, right = top + side, left + side
        while stop < len(origins):
            y, x = origins[stop]
            grown = (min(top, y), min(left, x), max(bottom, y + side), max(right, x + side))
            area = (grown[2] - grown[0]) * (grown[3] - grown[1])
            if area > REGION_READ_OVERHEAD * (stop - start + 1) * side * side:
                break
            top, left, bottom, right = grown
            stop += 1
        region, _ = source.read(int(top), int(left), int(bottom - top), int(right - left))
        for i in range(start, stop):
            y, x = origins[i] - (top, left)
            crops[i] = region[y : y + side, x : x + side]
        start = stop
    return crops


def _resample(batch, size: int):
    """Antialiased bilinear resize of a uint8 ``(n, 3, h, w)`` batch to ``size`` × ``size``."""
    import torch

    interpolate = torch.nn.functional.interpolate
    try:
        # torch's uint8 kernel is ~20x faster on CPU than converting to float (and than a PIL loop).
        return interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    except (RuntimeError, NotImplementedError):  # builds or devices without the uint8 kernel
        resized = interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return resized.round_().clamp_(0, 255).to(torch.uint8)
