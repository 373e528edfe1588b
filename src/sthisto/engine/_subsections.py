"""Spatial sub-sections: random neighbourhoods of the training sections as mini-batches (issue 14).

THItoGene and HGGEF attend across a section's spots, so the papers take one optimiser step per
section and epoch: a few dozen steps in a whole run on the few sections a user has. Under
``recipe="small_data"`` they train on *sub-sections* instead: each item is a spatially
contiguous neighbourhood of one training section, the ``subsection_spots`` spots nearest to a
centre drawn at random among the spots the loss sees. An epoch draws ``subsections_per_epoch``
of them (by default as many as it takes for the epoch to hold as many spot passes as the
fitted spots: the same work per epoch as whole sections, in several times more steps).

What this buys:

- many optimiser steps per epoch instead of one per section;
- memory bounded by the sub-section, whatever the size of the sections;
- a random crop as augmentation: a spot is seen with a different context (neighbours in the
  attention, graph edges at the crop's border) in every epoch;
- under ``recipe="small_data"``, a random translation of the crop's grid positions (within
  the network's position tables): the grid coordinates of a new section have nothing to do
  with those of the training sections, so a position token that identifies a training spot
  (and lets the network recall its expression) is memorisation, not something that carries
  over. Shifted, the tokens still tell the network which spots are neighbours (relative
  layout, the kNN graph and distances are unchanged) but not which training spot it sees.

A sub-section is built as prediction builds one of its units (``ExpressionModel.unit_section``):
the section's per-spot tensors restricted to the crop's rows, in section order, and the kNN
graph rebuilt on the crop's own grid positions with the model's graph settings, so no edge
leads out of the crop. Without the shift, the grid positions stay those of the section (not
re-indexed), as for a measured section at prediction, and a crop holding the whole section is
the whole section.

Every draw comes from a generator seeded by ``(seed, epoch, draw)`` alone: runs repeat with a
seed, a resumed run draws exactly what the uninterrupted one would have, and DDP ranks share
the draws of one epoch between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._errors import InputError
from ._samplers import EpochShuffleSampler

DEFAULT_SUBSECTION_SPOTS = 64
"""Spots per sub-section under ``recipe="small_data"`` (measured on her2st, see docs/methods.md)."""
MIN_SUBSECTION_SPOTS = 2
"""BatchNorm over a crop's patches needs two spots, and a graph needs a neighbour."""

_TRAINING_KEYS = ("subsection_spots", "subsections_per_epoch")


def _count(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(
            f"{name}={value!r} must be an integer >= {minimum}, or None for the recipe's default"
            + (" (False: whole sections)." if name == "subsection_spots" else ".")
        )
    return int(value)


def subsection_settings(model, n_fit_spots: int) -> dict[str, int] | None:
    """Resolved ``{"spots", "per_epoch"}`` of a model's training run, or None for whole sections.

    ``subsection_spots``: ``None`` takes the recipe's choice (sub-sections of
    :data:`DEFAULT_SUBSECTION_SPOTS` spots under ``"small_data"``, whole sections under
    ``"paper"``); ``False`` asks for whole sections; an integer for sub-sections of that many
    spots under either recipe. ``subsections_per_epoch``: ``None`` for
    ``ceil(n_fit_spots / subsection_spots)``.
    """
    if model.batching != "section" or not model.section_wide:
        return None
    params = model.training_params
    spots = params.get("subsection_spots")
    per_epoch = params.get("subsections_per_epoch")
    if spots is None:
        spots = DEFAULT_SUBSECTION_SPOTS if getattr(model, "_recipe", "paper") == "small_data" else False
    if spots is False:
        if per_epoch is not None:
            raise InputError(
                "subsections_per_epoch is set but training runs on whole sections; pass subsection_spots=<spots> "
                "(or recipe='small_data') to train on sub-sections, or drop subsections_per_epoch."
            )
        return None
    spots = _count(spots, "subsection_spots", minimum=MIN_SUBSECTION_SPOTS)
    if per_epoch is None:
        per_epoch = max(1, math.ceil(int(n_fit_spots) / spots))
    per_epoch = _count(per_epoch, "subsections_per_epoch", minimum=1)
    return {"spots": spots, "per_epoch": per_epoch}


def position_table_size(network) -> int | None:
    """Entries per axis of the network's grid-position tables (None when it has none).

    A position table announces itself with a ``grid_table_size`` attribute, so the engine
    needs no import from the model layer above it.
    """
    sizes = [m.grid_table_size for m in network.modules() if hasattr(m, "grid_table_size")]
    return min(sizes) if sizes else None


def crop_graph(model, positions: torch.Tensor) -> torch.Tensor:
    """The kNN edge index a section of these grid positions gets from ``section_inputs``."""
    from ..pp._graph import knn_edge_index

    edges = knn_edge_index(
        positions.numpy().astype(float),
        n_neighbors=int(model.data_params["graph_neighbors"]),
        max_distance=model.data_params["graph_max_distance"],
    )
    return torch.as_tensor(edges, dtype=torch.int64)


def crop_tensors(model, tensors: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """A section's tensors restricted to ``rows`` (sorted), the graph rebuilt on them."""
    n_spots = len(tensors["positions"])
    index = torch.as_tensor(rows, dtype=torch.int64)
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key == "edge_index":
            continue
        if hasattr(value, "shape") and value.dim() > 0 and value.shape[0] == n_spots:
            out[key] = value.index_select(0, index)
        else:
            out[key] = value
    if "edge_index" in tensors:
        out["edge_index"] = crop_graph(model, out["positions"])
    return out


class SubsectionDataset(Dataset):
    """The sub-sections of one training run; item ``(epoch, draw)`` is one random crop.

    Parameters
    ----------
    model
        The model being trained (its graph settings rebuild each crop's graph).
    items
        The training sections' tensors (``training_items`` of whole sections); a ``loss_mask``
        marks the spots the loss sees, the others are context only.
    spots, per_epoch
        Spots per sub-section and sub-sections per epoch.
    seed
        The run's seed.
    shift_positions
        Translate each crop's grid positions by a random offset that keeps them inside
        ``[0, shift_positions)`` (the position-table size); ``None``: positions as they are.
    """

    def __init__(
        self,
        model,
        items: Sequence[dict[str, Any]],
        *,
        spots: int,
        per_epoch: int,
        seed: int,
        shift_positions: int | None = None,
    ) -> None:
        from scipy.spatial import cKDTree

        self.model = model
        self.shift_positions = None if shift_positions is None else int(shift_positions)
        self.items = list(items)
        self.spots = int(spots)
        self.per_epoch = int(per_epoch)
        self.seed = int(seed)
        self._trees = []
        centres = []
        for number, item in enumerate(self.items):
            where = item["coords"] if "coords" in item else item["positions"]
            self._trees.append(cKDTree(np.asarray(where, dtype=np.float64)))
            fitted = item.get("loss_mask")
            rows = np.arange(len(item["positions"])) if fitted is None else np.flatnonzero(np.asarray(fitted))
            centres.append(np.stack((np.full(len(rows), number), rows), axis=1))
        self._centres = np.concatenate(centres) if centres else np.zeros((0, 2), dtype=np.int64)
        if not len(self._centres):
            raise InputError("no training spot is left for the loss; hold fewer spots aside for validation.")

    def __len__(self) -> int:
        return self.per_epoch

    def draw(self, epoch: int, draw: int) -> tuple[int, np.ndarray]:
        """``(section number, sorted rows)`` of sub-section ``draw`` of ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(draw)])
        number, centre = self._centres[int(rng.integers(len(self._centres)))]
        tree = self._trees[number]
        k = min(self.spots, tree.n)
        _, rows = tree.query(tree.data[centre], k=k)
        return int(number), np.sort(np.atleast_1d(rows).astype(np.int64))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, draw = key
        number, rows = self.draw(epoch, draw)
        crop = crop_tensors(self.model, self.items[number], rows)
        if self.shift_positions is not None and "positions" in crop:
            crop["positions"] = self.shifted(crop["positions"], epoch, draw)
        return crop

    def shifted(self, positions: torch.Tensor, epoch: int, draw: int) -> torch.Tensor:
        """``positions`` moved by an offset drawn per (seed, epoch, draw), inside the tables."""
        low = positions.min(dim=0).values.numpy()
        room = self.shift_positions - 1 - positions.max(dim=0).values.numpy()
        rng = np.random.default_rng([self.seed, int(epoch), int(draw), 1])
        offset = [int(rng.integers(-lo, up + 1)) if up >= 0 else 0 for lo, up in zip(low, room, strict=True)]
        return positions + torch.as_tensor(offset, dtype=positions.dtype)

    def loader(self) -> DataLoader:
        """One item per step, drawn for the epoch Lightning sets on the sampler."""
        sampler = EpochDraws(self.per_epoch, seed=self.seed, shuffle=False)
        # As in engine._loop: a private generator keeps iterator creation off the global stream.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self, batch_size=None, sampler=sampler, num_workers=0, generator=generator)


class EpochDraws(EpochShuffleSampler):
    """Yield ``(epoch, draw)`` for the draws of this rank; the epoch is read at the first draw.

    Reading it lazily matters for the reason given in :class:`EpochShuffleSampler`: a resumed
    Lightning run creates its first iterator before it sets the epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for draw in self._order():
            yield (epoch, draw)
