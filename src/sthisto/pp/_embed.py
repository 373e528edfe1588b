"""Encoder embeddings of spot-centred patches, streamed batch by batch (:func:`embed`)."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import check_record_writable, check_writable, maybe_copy, record, write
from .._constants import Uns
from .._errors import InputError, KeyExistsError, MissingKeyError, NoImageError
from .._images import has_image
from .._logging import logger
from .._sdata import accepts_spatialdata
from .._validate import checked_input
from ._patches import PatchDataset, PatchSpec, library_ids, spot_coordinates

if TYPE_CHECKING:
    from collections.abc import Callable
    from os import PathLike

    from anndata import AnnData

    from ..encoders._encoder import Encoder

DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 256}
"""Patches per encoder call when ``batch_size=None``. On CPU, 8–16 was fastest for both the
handcrafted features and the HistoSPACE CNN (64 was 2–3× slower: activations leave the cache);
on CUDA large batches keep the GPU busy."""

FUNCTION = "embed"
"""Record name: parameters land in ``uns['sthisto']['embed'][key_added]``."""

EXTRA_FEATURES: dict[str, tuple[str, ...]] = {
    "coords": ("x_px", "y_px"),
    "rgb_mean": ("rgb_mean_r", "rgb_mean_g", "rgb_mean_b"),
}
"""Per-spot values :func:`embed` can compute in the same pass, and their column names."""

# Fields that decide whether cached features are still valid (batch size, device, workers do not).
_IDENTITY = (
    "encoder",
    "weights",
    "weights_fingerprint",
    "output_dim",
    "input_size",
    "mean",
    "std",
    "input_range",
    "interpolation",
    "pool",
    "patch_size_um",
    "patch_size_px",
    "crop_px",
    "microns_per_pixel",
    "image_key",
    "extra_features",
    "precision",
    "libraries",
    "spots_fingerprint",
)


def extra_key(key_added: str) -> str:
    """``obsm`` key of the per-spot extras written beside ``obsm[key_added]``."""
    return f"{key_added}_extra"


@accepts_spatialdata
@checked_input
def embed(
    adata: AnnData,
    *,
    encoder: str | Encoder | Callable[..., Any] = "handcrafted",
    patch_size_um: float | None = None,
    image_key: str | None = None,
    key_added: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 0,
    compile: bool = False,
    extra_features: Sequence[str] = (),
    libraries: Sequence[str] | None = None,
    weights: str | PathLike[str] | None = None,
    token: str | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed every spot's image patch with an encoder.

    Patches of ``patch_size_um`` µm around each spot centre are cut lazily from each library's
    image, resampled to the encoder's input size (so slides of different µm/px see the same
    field of view), and streamed through the encoder ``batch_size`` at a time: memory is
    bounded by one batch (plus the output), never by the number of spots.

    A second call with the same configuration on the same spots finds the features already
    there and returns without running the encoder (it logs that it did). A different
    configuration under the same key needs ``overwrite=True``.

    Parameters
    ----------
    adata
        AnnData in the sthisto convention (``obs['library_id']``, ``obsm['spatial']``,
        ``uns['spatial'][library_id]`` with images and ``microns_per_pixel``).
    encoder
        A registered name (``"handcrafted"``, ``"uni"``, ``"virchow2"``, ``"conch_v1"``, ...:
        the model cards of :func:`sthisto.encoders.list_encoders`, whose preprocessing and
        pooling are used), a timm model name, an ``hf-hub:`` id, an
        :class:`sthisto.encoders.Encoder`, or a callable — anything
        :func:`sthisto.encoders.get_encoder` accepts.
    patch_size_um
        Side of the field of view in µm. Default: the encoder's own (``Encoder.patch_size_um``;
        for a card, its ``fov_um``: the input size at the µm/px it was trained at, cut from
        each image at that image's µm/px): 112 µm for ``"handcrafted"`` (HEST-Benchmark: 224
        px at 0.5 µm/px) and most 224 px cards, 34.5 µm for ``"uni"`` (HisToSGE: a 50 px
        crop at her2st's ≈0.69 µm/px, kept for backwards compatibility).
    image_key
        Image to cut from: ``None`` is the full-resolution image; another key (``"hires"``, or
        the key written by stain normalisation) uses that image.
    key_added
        ``obsm`` key of the features; default ``f"X_{encoder.name}"``.
    batch_size
        Patches per encoder call; ``None``: 256 on CUDA; on CPU 16 (the measured-fastest size,
        :data:`DEFAULT_BATCH_SIZE`), lowered when one batch's estimated activations would not fit
        in half of the memory available now (:func:`sthisto.encoders.cpu_batch_size`).
    device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda[:i]"``.
    precision
        ``"auto"``: bf16 autocast on CUDA, fp32 on CPU; or ``"bf16"`` / ``"fp32"``.
    num_workers
        DataLoader worker processes cutting patches while the encoder runs (0: in-process).
    compile
        Wrap the network with :func:`torch.compile` first. Compilation takes tens of seconds and
        pays off on CUDA for tens of thousands of patches; features are unchanged up to float
        rounding, so it does not enter the cache identity.
    extra_features
        Per-spot values computed in the same patch pass and written to
        ``obsm[f"{key_added}_extra"]``: ``"coords"`` (spot centre x, y in full-resolution
        pixels) and/or ``"rgb_mean"`` (mean R, G, B, 0–255, of the patch the encoder saw).
        HisToSGE's paper descriptor is built from them by :func:`sthisto.models.histosge_features`.
    libraries
        Embed only these libraries' spots; the others get NaN rows. Default: all (every
        library must then have an image).
    weights, token, encoder_kwargs
        Passed to :func:`sthisto.encoders.get_encoder` when ``encoder`` is a name.
    progress
        Show a progress bar; default: only when stderr is a terminal.
    overwrite
        Replace existing features under ``key_added`` computed with another configuration.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes:

    ``obsm[key_added]``
        float32 ``(n_obs, D)`` features (NaN rows for spots outside ``libraries``).
    ``obsm[f"{key_added}_extra"]``
        float32 ``(n_obs, k)`` extras, when ``extra_features`` is not empty; column names in
        the record's ``extra_columns``.
    ``uns['sthisto']['embed'][key_added]``
        The configuration: encoder name, weights source, fingerprint and provenance record
        (``weights_provenance``: ``source`` file / hub / cache / random / none / module with
        path and SHA-256, hub id and revision, or seed), output dim,
        preprocessing (input size, mean, std, range), µm/px and crop side in pixels per
        library, patch size in µm and pixels, image key, precision, batch size, device,
        libraries, number of patches padded at image borders, timing.

    Examples
    --------
    >>> sthisto.pp.embed(adata, encoder="handcrafted")  # obsm['X_handcrafted'], 93 features
    >>> sthisto.pp.embed(
    ...     adata, encoder="uni", weights="/models/uni/pytorch_model.bin", extra_features=("coords", "rgb_mean")
    ... )
    """
    from .._device import resolve_device
    from ..encoders import get_encoder
    from ..encoders._encoder import PRECISIONS

    # --- validate everything before computing or writing anything
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise InputError(f"num_workers={num_workers!r} must be an integer ≥ 0 (0 cuts patches in this process).")
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}; use one of {PRECISIONS}.")
    extras = _check_extras(extra_features)
    if patch_size_um is not None and not (
        isinstance(patch_size_um, (int, float, np.number)) and np.isfinite(patch_size_um) and patch_size_um > 0
    ):
        raise InputError(f"patch_size_um={patch_size_um!r} must be a positive number of µm.")
    torch_device = resolve_device(device)
    if not isinstance(compile, bool):
        raise InputError(f"compile={compile!r} must be True or False.")
    spot_libraries = library_ids(adata)
    coords = spot_coordinates(adata)
    selected = _select_libraries(adata, spot_libraries, libraries)
    encoder_obj = get_encoder(encoder, weights=weights, token=token, **dict(encoder_kwargs or {}))
    if encoder_obj.provenance.get("source") == "random":
        from ..encoders._provenance import warn_random_weights

        warn_random_weights(
            f"pp.embed: encoder {encoder_obj.name!r}",
            "Pass weights='/path/to/checkpoint' (.safetensors / .pth / .bin) or a hub id 'hf-hub:<org>/<name>' "
            "(with token= for gated models such as UNI) for pretrained features.",
        )
    if patch_size_um is None:
        patch_size_um = encoder_obj.patch_size_um
        if patch_size_um is None:
            raise InputError(
                f"encoder {encoder_obj.name!r} declares no default field of view: pass patch_size_um= "
                f"(e.g. 112 for HEST-style 224 px at 0.5 µm/px)."
            )
    key_added = key_added or f"X_{encoder_obj.name}"
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added={key_added!r} must be a non-empty string.")
    indices = np.flatnonzero(np.isin(spot_libraries, selected))
    spec = PatchSpec(size_px=encoder_obj.input_size, size_um=float(patch_size_um))
    dataset = PatchDataset(adata, spec=spec, image_key=image_key, indices=indices)

    config = dict(encoder_obj.config())
    config.update(
        patch_size_um=float(patch_size_um),
        patch_size_px=encoder_obj.input_size,
        crop_px={lib: int(spec.crop_side(img.microns_per_pixel)) for lib, img in dataset._images.items()},
        microns_per_pixel={lib: float(img.microns_per_pixel) for lib, img in dataset._images.items()},
        image_key="fullres" if image_key is None else str(image_key),
        extra_features=list(extras),
        precision=encoder_obj.replace(device=torch_device).resolve_precision(precision),
        libraries=sorted(selected),
        spots_fingerprint=_spots_fingerprint(adata, spot_libraries, coords, indices),
        spots_names_fingerprint=spot_names_fingerprint(adata, spot_libraries),
    )

    if key_added in adata.obsm and not overwrite:
        previous = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key_added)
        differing = _differences(previous, config) if previous is not None else ["(no record of how it was made)"]
        cached = np.asarray(adata.obsm[key_added])
        if not differing and cached.shape == (adata.n_obs, encoder_obj.output_dim):
            if not extras or (
                extra_key(key_added) in adata.obsm
                and np.asarray(adata.obsm[extra_key(key_added)]).shape[1] == _n_extra(extras)
            ):
                logger.info(
                    "obsm[%r] already holds %s features of these spots with the same configuration; "
                    "reusing them (pass overwrite=True to recompute)",
                    key_added,
                    encoder_obj.name,
                )
                return adata.copy() if copy else None
        raise KeyExistsError(
            f"adata.obsm[{key_added!r}] already exists and was made differently (differs in: "
            f"{', '.join(differing) or 'shape'}). Pass overwrite=True to replace it, or key_added='<new name>' "
            f"to keep both."
        )
    check_writable(adata, "obsm", key_added, overwrite=overwrite)
    check_record_writable(adata, FUNCTION, key_added, overwrite=overwrite)
    if extras:
        check_writable(adata, "obsm", extra_key(key_added), overwrite=overwrite)

    # --- compute
    target = maybe_copy(adata, copy)
    encoder_obj.to(torch_device)
    batch_plan = {}
    if batch_size is None and torch_device.type == "cpu":
        from ..encoders._batching import cpu_batch_size

        plan = cpu_batch_size(encoder_obj.model, encoder_obj.input_size, ceiling=DEFAULT_BATCH_SIZE["cpu"])
        batch_size, batch_plan = plan.batch_size, plan.as_record()
    elif batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE.get(torch_device.type, DEFAULT_BATCH_SIZE["cpu"])
    if compile:
        encoder_obj.compile()
    started = time.perf_counter()
    features, extra_values = _run(
        dataset,
        encoder_obj,
        coords=coords,
        extras=extras,
        batch_size=batch_size,
        num_workers=int(num_workers),
        precision=precision,
        progress=progress,
        n_obs=adata.n_obs,
    )
    seconds = time.perf_counter() - started
    n_patches = len(indices)
    logger.info(
        "embedded %d patches with %r in %.1f s (%.1f patches/s, %s, %s)",
        n_patches,
        encoder_obj.name,
        seconds,
        n_patches / max(seconds, 1e-9),
        torch_device,
        config["precision"],
    )
    bad = int((~np.isfinite(features[indices])).any(axis=1).sum())
    if bad:
        logger.warning("%d spots got non-finite features from encoder %r", bad, encoder_obj.name)

    # --- write
    write(target, "obsm", key_added, features, overwrite=overwrite)
    if extras:
        write(target, "obsm", extra_key(key_added), extra_values, overwrite=overwrite)
    params = dict(config)
    params.update(
        batch_size=batch_size,
        **batch_plan,
        compiled=bool(compile),
        num_workers=int(num_workers),
        device=str(torch_device),
        n_patches=n_patches,
        n_clipped=int(dataset.clipped.sum()),
        seconds=round(seconds, 3),
        extra_key=extra_key(key_added) if extras else "",
        extra_columns=[c for name in extras for c in EXTRA_FEATURES[name]],
    )
    if encoder_obj.feature_names is not None:
        params["feature_names"] = list(encoder_obj.feature_names)
    record(target, FUNCTION, key_added, params, overwrite=overwrite)
    return target if copy else None


def _run(dataset, encoder, *, coords, extras, batch_size, num_workers, precision, progress, n_obs):
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    features = np.full((n_obs, encoder.output_dim), np.nan, dtype=np.float32)
    extra_values = np.full((n_obs, _n_extra(extras)), np.nan, dtype=np.float32)
    # Creating a loader's iterator draws a base seed; from a private generator it leaves the
    # global torch stream alone, so a model created after an embedding (tl.train embeds while
    # configuring) gets the same initial weights whether or not the features were cached.
    loader = DataLoader(
        _BatchedPatches(dataset, batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=encoder.device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )
    show = progress if progress is not None else sys.stderr.isatty()
    results = _DeferredCopy(encoder.device)

    def store(done) -> None:
        if done is None:
            return
        rows, (batch_features, rgb_mean) = done
        features[rows] = batch_features
        column = 0
        for name in extras:
            width = len(EXTRA_FEATURES[name])
            extra_values[rows, column : column + width] = coords[rows] if name == "coords" else rgb_mean
            column += width
        bar.update(len(rows))

    with tqdm(total=len(dataset), unit="patch", desc=f"embed ({encoder.name})", disable=not show) as bar:
        for batch_number, patches in enumerate(loader):
            start = batch_number * batch_size
            rows = dataset.indices[start : start + len(patches)]
            patches = patches.to(encoder.device, non_blocking=True)
            batch_features = encoder.encode(patches, precision=precision)
            with torch.inference_mode():
                rgb_mean = patches.float().mean(dim=(2, 3)) if "rgb_mean" in extras else batch_features[:, :0]
            store(results.submit(rows, (batch_features, rgb_mean)))
        store(results.flush())
    return features, extra_values


class _DeferredCopy:
    """Bring batch results to the host one batch late, so the GPU never waits for the copy.

    On CUDA each result is copied into pinned host memory asynchronously and an event marks
    its completion; the host waits for batch ``i - 1`` only after batch ``i`` is queued. On
    the CPU results pass straight through.
    """

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.pending = None

    def submit(self, rows, tensors):
        import torch

        event = None
        if self.cuda:
            tensors = tuple(
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors
            )
            event = torch.cuda.Event()
            event.record()
        previous = self.flush()
        self.pending = (rows, tensors, event)
        return previous

    def flush(self):
        if self.pending is None:
            return None
        rows, tensors, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return rows, tuple(t.cpu().numpy() for t in tensors)


class _BatchedPatches:
    """Map-style dataset whose item ``i`` is the ``i``-th batch of patches (one read per batch)."""

    def __init__(self, dataset: PatchDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, item: int):
        start = item * self.batch_size
        stop = min(start + self.batch_size, len(self.dataset))
        patches, _ = self.dataset.read_batch(range(start, stop))
        return patches


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{name}={value!r} must be a positive integer, or None for the default.")
    return int(value)


def _check_extras(extra_features) -> tuple[str, ...]:
    if isinstance(extra_features, str):
        extra_features = (extra_features,)
    extras = tuple(extra_features or ())
    unknown = [e for e in extras if e not in EXTRA_FEATURES]
    if unknown:
        raise InputError(f"extra_features {unknown} unknown; choose from {sorted(EXTRA_FEATURES)}.")
    if len(set(extras)) != len(extras):
        raise InputError(f"extra_features={extras} lists a feature twice.")
    return extras


def _n_extra(extras: Sequence[str]) -> int:
    return sum(len(EXTRA_FEATURES[e]) for e in extras)


def _select_libraries(adata, spot_libraries: np.ndarray, libraries) -> list[str]:
    present = list(dict.fromkeys(spot_libraries))
    if libraries is None:
        chosen = present
    else:
        chosen = [libraries] if isinstance(libraries, str) else [str(lib) for lib in libraries]
        unknown = [lib for lib in chosen if lib not in present]
        if unknown or not chosen:
            raise MissingKeyError(
                f"libraries={list(chosen)}: {unknown or 'none given'} not among the spots' libraries {present}."
            )
    without = [lib for lib in chosen if not has_image(adata, lib)]
    if without:
        with_images = [lib for lib in chosen if lib not in without]
        raise NoImageError(
            f"libraries {without} have no H&E image, so their spots cannot be embedded. Restrict the call "
            f"to libraries with images: libraries={with_images} (the other spots get NaN rows)."
        )
    return chosen


def _spots_fingerprint(adata, spot_libraries, coords, indices) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(map(str, adata.obs_names)).encode())
    digest.update("\0".join(spot_libraries).encode())
    digest.update(np.ascontiguousarray(coords, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    return digest.hexdigest()


def spot_names_fingerprint(adata, spot_libraries) -> str:
    """Hash of the spots' names and libraries only: tells whether later features checks see the same spots."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(map(str, adata.obs_names)).encode())
    digest.update("\0".join(spot_libraries).encode())
    return digest.hexdigest()


def _differences(previous: Mapping, config: Mapping) -> list[str]:
    return [key for key in _IDENTITY if not _equal(previous.get(key), config.get(key))]


def _equal(a, b) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(map(str, a)) != set(map(str, b)):
            return False
        return all(_equal(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape:
        return False
    if a_arr.dtype.kind in "fc" or b_arr.dtype.kind in "fc":
        try:
            return bool(np.allclose(a_arr.astype(float), b_arr.astype(float), rtol=1e-9, atol=0))
        except (TypeError, ValueError):
            return False
    return bool(np.array_equal(a_arr.astype(str), b_arr.astype(str)))


def embed_extras(
    adata,
    key: str,
    *,
    extra_features: Sequence[str],
    patch_size_um: float,
    patch_size_px: int = 224,
    image_key: str | None = None,
    batch_size: int = 64,
) -> None:
    """Compute only the per-spot extras of ``obsm[key]`` into ``obsm[f"{key}_extra"]``.

    For features computed elsewhere (or by :func:`embed` without extras): ``obsm[key]`` is
    neither read nor touched. ``"rgb_mean"`` is taken over patches of ``patch_size_um`` µm
    resampled to ``patch_size_px`` px, like the patches :func:`embed` feeds an encoder. The
    record goes to ``uns['sthisto']['embed'][f"{key}_extra"]`` (``extra_columns``, geometry).
    """
    import torch

    extras = _check_extras(extra_features)
    target = extra_key(key)
    check_writable(adata, "obsm", target, overwrite=False)
    check_record_writable(adata, FUNCTION, target, overwrite=False)
    spot_libraries = library_ids(adata)
    coords = spot_coordinates(adata)
    selected = _select_libraries(adata, spot_libraries, None)
    indices = np.flatnonzero(np.isin(spot_libraries, selected))
    spec = PatchSpec(size_px=int(patch_size_px), size_um=float(patch_size_um))
    values = np.full((adata.n_obs, _n_extra(extras)), np.nan, dtype=np.float32)
    rgb = np.full((adata.n_obs, 3), np.nan, dtype=np.float32)
    if "rgb_mean" in extras:
        dataset = PatchDataset(adata, spec=spec, image_key=image_key, indices=indices)
        for start in range(0, len(indices), batch_size):
            patches, _ = dataset.read_batch(range(start, min(start + batch_size, len(indices))))
            with torch.inference_mode():
                rgb[indices[start : start + len(patches)]] = patches.float().mean(dim=(2, 3)).numpy()
    column = 0
    for name in extras:
        width = len(EXTRA_FEATURES[name])
        values[indices, column : column + width] = coords[indices] if name == "coords" else rgb[indices]
        column += width
    write(adata, "obsm", target, values, overwrite=False)
    record(
        adata,
        FUNCTION,
        target,
        {
            "features_key": key,
            "extra_features": list(extras),
            "extra_columns": [c for name in extras for c in EXTRA_FEATURES[name]],
            "patch_size_um": float(patch_size_um),
            "patch_size_px": int(patch_size_px),
            "image_key": "fullres" if image_key is None else str(image_key),
            "libraries": sorted(selected),
        },
    )


def features_provenance(adata, key: str) -> dict[str, Any]:
    """How ``obsm[key]`` was made, for a model's manifest: encoder, field of view and weights record.

    Parameters
    ----------
    adata
        AnnData holding the features.
    key
        Their ``obsm`` key.

    Returns
    -------
    ``{"key", "encoder", "patch_size_um", "image_key", "weights": <provenance record>}`` from the
    :func:`embed` record; features without a record (computed outside sthisto) give
    ``{"key": key, "weights": {"source": "unknown"}}``.
    """
    from ..encoders._provenance import provenance_from_text

    made = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key)
    if made is None:
        return {"key": str(key), "weights": {"source": "unknown"}}
    weights = made.get("weights_provenance")
    if not isinstance(weights, Mapping) or not weights:
        weights = provenance_from_text(made.get("weights"), made.get("weights_fingerprint"))
    out = {"key": str(key), "weights": _plain(weights)}
    for field in ("encoder", "patch_size_um", "image_key"):
        if made.get(field) is not None:
            out[field] = _plain(made[field])
    return out


def _plain(value):
    """Values read back from ``uns`` (NumPy scalars after an h5ad round trip) as JSON-able Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value
