"""Split a section's spots into short sequences and pad them into masked batches.

HisToSGE attends over sequences of about 50 spots rather than whole sections. Its authors cut
each section in AnnData order into equal runs and stack them, which fails as soon as the
section size is not a multiple of the run length. Here sequences may have any length: they are
padded to the longest one in a batch and a boolean mask marks the real spots (True) so that
attention never reads padding (see :class:`~sthisto.models.layers.transformer.Transformer`).

Two ways of choosing the spots of a sequence:

``"order"``
    Consecutive spots in AnnData order, split into ``ceil(n / chunk_size)`` runs whose lengths
    differ by at most one (the authors' approach, made robust to unequal lengths).
``"spatial"``
    Spatially contiguous tiles by recursive coordinate bisection: the spot set is cut across
    its longer side, with the two halves sized in proportion to the number of sequences each
    will hold, until every part holds at most ``chunk_size`` spots. The tiles are compact
    (close to square) and of nearly equal size, so attention mixes spots that are neighbours
    in the tissue whatever order the spots are stored in.

Sequences never mix sections when ``groups`` (e.g. ``obs['library_id']``) is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from ..._errors import InputError

ChunkMode = Literal["order", "spatial"]


def _bisect(index: np.ndarray, coords: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Recursive coordinate bisection of ``index`` (spots) into ``n_parts`` compact parts."""
    parts: list[np.ndarray] = []
    stack = [(index, n_parts)]
    while stack:
        idx, k = stack.pop()
        if k <= 1 or len(idx) <= 1:
            parts.append(np.sort(idx))
            continue
        points = coords[idx]
        axis = int(np.argmax(np.ptp(points, axis=0)))
        order = np.argsort(points[:, axis], kind="stable")
        k_left = k // 2
        n_left = int(round(len(idx) * k_left / k))
        # Right part first on the stack so that parts come out left/top first.
        stack.append((idx[order[n_left:]], k - k_left))
        stack.append((idx[order[:n_left]], k_left))
    return parts


def chunk_spots(
    n_spots: int,
    *,
    coords: np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    chunk_size: int = 50,
    mode: ChunkMode = "order",
) -> list[np.ndarray]:
    """Split spots ``0 … n_spots-1`` into sequences of at most ``chunk_size`` spots.

    Parameters
    ----------
    n_spots
        Number of spots (rows of the AnnData or of the feature matrix).
    coords
        ``(n_spots, 2)`` spot coordinates (pixels or grid units); required for ``"spatial"``.
    groups
        Section of each spot (e.g. ``adata.obs['library_id']``); sequences never mix groups.
        ``None`` treats all spots as one section.
    chunk_size
        Largest number of spots in one sequence. A section of ``m`` spots gives
        ``ceil(m / chunk_size)`` sequences of nearly equal length.
    mode
        ``"order"`` (consecutive spots in storage order, the authors' choice) or
        ``"spatial"`` (compact tiles by recursive coordinate bisection).

    Returns
    -------
    A list of int64 arrays of spot indices, each sorted ascending; together they hold every
    spot exactly once. Groups appear in order of first occurrence.

    Examples
    --------
    >>> chunks = chunk_spots(120, chunk_size=50)
    >>> [len(c) for c in chunks]
    [40, 40, 40]
    """
    n_spots = int(n_spots)
    if n_spots < 0:
        raise InputError(f"n_spots={n_spots} must be >= 0.")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size!r} must be a positive integer (HisToSGE uses 50).")
    if mode not in ("order", "spatial"):
        raise InputError(f"mode={mode!r}; use 'order' (storage order) or 'spatial' (contiguous tiles).")
    if mode == "spatial":
        if coords is None:
            raise InputError("mode='spatial' needs coords=(n_spots, 2) spot coordinates, e.g. adata.obsm['spatial'].")
        coords = np.asarray(coords, dtype=float)
        if coords.ndim != 2 or coords.shape[0] != n_spots or coords.shape[1] < 2:
            raise InputError(f"coords has shape {coords.shape}; expected ({n_spots}, 2) columns (x, y).")
        if not np.isfinite(coords[:, :2]).all():
            raise InputError("coords contain NaN or infinite values; drop or fix those spots before chunking.")
        coords = coords[:, :2]
    if groups is None:
        members = [np.arange(n_spots, dtype=np.int64)] if n_spots else []
    else:
        groups = np.asarray(groups)
        if groups.shape != (n_spots,):
            raise InputError(f"groups has shape {groups.shape}; expected one section label per spot ({n_spots},).")
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        members = [np.flatnonzero(inverse == g).astype(np.int64) for g in np.argsort(first, kind="stable")]
    chunks: list[np.ndarray] = []
    for index in members:
        n_parts = math.ceil(len(index) / chunk_size)
        if mode == "order":
            chunks.extend(np.array_split(index, n_parts))
        else:
            chunks.extend(_bisect(index, coords, n_parts))
    return chunks


class SpotSequences:
    """Padded layout of spot sequences: ``(B, T)`` spot indices with a mask, and its inverse.

    Parameters
    ----------
    chunks
        Sequences of spot indices (e.g. from :func:`chunk_spots`); no spot may appear twice.
    n_spots
        Number of spots indexed; default ``max index + 1``.

    Attributes
    ----------
    index
        int64 ``(B, T)``: spot index of each token, ``-1`` at padding.
    mask
        bool ``(B, T)``: True for real spots.
    lengths
        int64 ``(B,)``: number of real spots per sequence.

    Examples
    --------
    >>> seqs = SpotSequences.from_spots(len(features), chunk_size=50, mode="spatial", coords=xy)
    >>> padded = seqs.pad(features)  # (B, T, D), padding zero
    >>> out = net(padded, seqs.pad(positions), seqs.mask_tensor())["prediction"]
    >>> per_spot = seqs.unpad(out)  # (n_spots, G) in the original spot order
    """

    def __init__(self, chunks: Sequence[np.ndarray], n_spots: int | None = None) -> None:
        chunks = [np.asarray(c, dtype=np.int64).ravel() for c in chunks]
        if not chunks or any(len(c) == 0 for c in chunks):
            raise InputError("SpotSequences needs at least one sequence and no empty sequence.")
        flat = np.concatenate(chunks)
        if n_spots is None:
            n_spots = int(flat.max()) + 1
        if flat.min() < 0 or flat.max() >= n_spots:
            raise InputError(f"spot indices span [{flat.min()}, {flat.max()}], outside [0, {n_spots - 1}].")
        counts = np.bincount(flat, minlength=n_spots)
        if (counts > 1).any():
            raise InputError(
                f"{int((counts > 1).sum())} spots appear in more than one sequence; each spot must "
                f"belong to exactly one (build the sequences with chunk_spots)."
            )
        self.n_spots = int(n_spots)
        self.lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        width = int(self.lengths.max())
        self.index = np.full((len(chunks), width), -1, dtype=np.int64)
        for row, chunk in enumerate(chunks):
            self.index[row, : len(chunk)] = chunk
        self.mask = self.index >= 0
        self.covers_all = bool((counts == 1).all())
        # Flat (B*T) position of each spot, used by the inverse mapping.
        self._flat_position = np.full(self.n_spots, -1, dtype=np.int64)
        self._flat_position[self.index[self.mask]] = np.flatnonzero(self.mask.ravel())

    @classmethod
    def from_spots(
        cls,
        n_spots: int,
        *,
        coords: np.ndarray | None = None,
        groups: Sequence | np.ndarray | None = None,
        chunk_size: int = 50,
        mode: ChunkMode = "order",
    ) -> SpotSequences:
        """Chunk spots with :func:`chunk_spots` (same parameters) and lay the sequences out."""
        chunks = chunk_spots(n_spots, coords=coords, groups=groups, chunk_size=chunk_size, mode=mode)
        if not chunks:
            raise InputError("no spots to chunk (n_spots=0).")
        return cls(chunks, n_spots)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def chunks(self) -> list[np.ndarray]:
        """The sequences as a list of spot-index arrays."""
        return [row[:length].copy() for row, length in zip(self.index, self.lengths)]

    def _rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        if rows is None:
            return self.index, self.mask
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size == 0 or rows.min() < -len(self) or rows.max() >= len(self):
            raise InputError(f"rows must be non-empty indices into the {len(self)} sequences.")
        width = int(self.lengths[rows].max())
        return self.index[rows, :width], self.mask[rows, :width]

    def mask_tensor(self, *, rows=None, device=None) -> torch.Tensor:
        """The mask of ``rows`` (all sequences by default) as a bool tensor ``(b, T)``."""
        return torch.as_tensor(self._rows(rows)[1], device=device)

    def spot_indices(self, *, rows=None) -> np.ndarray:
        """Spots held by ``rows``, in token order (the order of :meth:`gather`'s output)."""
        index, mask = self._rows(rows)
        return index[mask]

    def pad(self, values, *, rows=None, fill=0):
        """Lay per-spot ``values`` out as padded sequences.

        Parameters
        ----------
        values
            NumPy array or tensor with one row per spot, ``(n_spots, ...)``.
        rows
            Sequences to lay out (default all); the width is the longest of them.
        fill
            Value at padding tokens.

        Returns
        -------
        Same kind as ``values``, shape ``(b, T, ...)``.
        """
        if values.shape[0] != self.n_spots:
            raise InputError(f"values have {values.shape[0]} rows but the sequences index {self.n_spots} spots.")
        index, mask = self._rows(rows)
        safe = np.where(mask, index, 0)
        if isinstance(values, torch.Tensor):
            out = values[torch.as_tensor(safe, device=values.device)]
            pad_mask = torch.as_tensor(~mask, device=values.device).reshape(mask.shape + (1,) * (out.dim() - 2))
            return out.masked_fill(pad_mask, fill)
        out = np.asarray(values)[safe]
        out[~mask] = fill
        return out

    def gather(self, padded, *, rows=None):
        """Real tokens of ``padded`` (``(b, T, ...)`` for ``rows``), in :meth:`spot_indices` order."""
        _, mask = self._rows(rows)
        if tuple(padded.shape[:2]) != mask.shape:
            raise InputError(f"padded has leading shape {tuple(padded.shape[:2])}; expected {mask.shape}.")
        if isinstance(padded, torch.Tensor):
            return padded[torch.as_tensor(mask, device=padded.device)]
        return np.asarray(padded)[mask]

    def unpad(self, padded):
        """Inverse of :meth:`pad` over all sequences: ``(B, T, ...)`` → ``(n_spots, ...)`` in spot order.

        Differentiable for tensors. Needs sequences that cover every spot; otherwise use
        :meth:`gather` with :meth:`spot_indices`.
        """
        if not self.covers_all:
            raise InputError(
                "these sequences do not cover every spot, so there is no full inverse; use "
                "gather(padded) together with spot_indices() instead."
            )
        if tuple(padded.shape[:2]) != self.mask.shape:
            raise InputError(f"padded has leading shape {tuple(padded.shape[:2])}; expected {self.mask.shape}.")
        flat = padded.reshape((-1,) + tuple(padded.shape[2:]))
        if isinstance(padded, torch.Tensor):
            return flat[torch.as_tensor(self._flat_position, device=padded.device)]
        return np.asarray(flat)[self._flat_position]

    def row_batches(self, batch_size: int, *, shuffle: bool = False, seed: int | None = None) -> Iterator[np.ndarray]:
        """Yield arrays of sequence indices, ``batch_size`` sequences at a time.

        Parameters
        ----------
        batch_size
            Sequences per batch.
        shuffle
            Shuffle the sequences first (with ``seed`` for repeatability).
        seed
            Seed of the shuffle.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer.")
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        for start in range(0, len(order), int(batch_size)):
            yield order[start : start + int(batch_size)]
