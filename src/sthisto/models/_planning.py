"""Prediction planning: cutting the spots to predict into units, and predicting unit by unit.

:class:`PredictionPlanning` is one of the bases of :class:`~sthisto.models._protocol.ExpressionModel`.
Memory is bounded by one unit (a batch of spots, or a spatial neighbourhood with a halo cut by
:func:`sthisto.engine._neighbourhoods.neighbourhoods`). :class:`Section` is the network-ready
inputs of one section or unit, shared with training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._constants import Obsm
from .._errors import InputError, MissingKeyError
from .._spots import grid_positions, library_ids, pd_unique, spot_coordinates
from ..engine._neighbourhoods import neighbourhoods


@dataclass
class Section:
    """Inputs of one section (or part of one), ready for a network.

    Attributes
    ----------
    library_id
        The section.
    obs_index
        Positions into the AnnData of the spots, in tensor row order.
    tensors
        Batch-contract tensors (see ``docs/architecture.md``); CPU tensors.
    """

    library_id: str
    obs_index: np.ndarray
    tensors: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.obs_index)


@dataclass
class PredictionUnit:
    """One piece of a prediction: the spots whose inputs are built together.

    Attributes
    ----------
    library_id
        The section.
    obs_index
        Positions into the AnnData of the unit's spots (core and halo), in tensor row order.
    keep
        Boolean over ``obs_index``: spots whose predictions are kept (False for halo spots,
        present only as context).
    result_rows
        Rows of the result (positions into the predicted ``index``) of the kept spots.
    position_offset
        ``(2,)`` integers subtracted from the unit's grid positions (re-indexing), or None.
    """

    library_id: str
    obs_index: np.ndarray
    keep: np.ndarray
    result_rows: np.ndarray
    position_offset: np.ndarray | None = None

    @property
    def n_spots(self) -> int:
        """Spots whose inputs are built (core and halo)."""
        return len(self.obs_index)


@dataclass
class PredictionPlan:
    """The units of one prediction call, in order; see :meth:`ExpressionModel.prediction_plan`."""

    units: list[PredictionUnit]
    n_spots: int
    mode: str
    chunk_spots: int | None = None
    halo: float = 0.0
    reindexed: list[str] = field(default_factory=list)
    graph_positions: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able description for provenance records."""
        sizes = [u.n_spots for u in self.units] or [0]
        context = sum(u.n_spots for u in self.units)
        return {
            "mode": self.mode,
            "n_units": len(self.units),
            "largest_unit_spots": int(max(sizes)),
            "chunk_spots": self.chunk_spots,
            "halo_spacings": self.halo,
            "context_overhead": round(context / max(self.n_spots, 1), 4),
            "reindexed_libraries": list(self.reindexed),
        }


class PredictionPlanning:
    """Prediction of :class:`~sthisto.models._protocol.ExpressionModel`: plans, units, sections."""

    # --- prediction --------------------------------------------------------------------
    def predict_section(self, section: Section, *, device) -> np.ndarray:
        """Predict one section (or one part of one); returns ``(n_spots, n_genes)`` float32."""
        import torch

        network = self.network
        network.eval()
        if self.batching == "spots" or not self.section_wide:
            batch_size = self.prediction_batch_size()
            outputs = []
            per_spot = {k: v for k, v in section.tensors.items() if k != "edge_index" and hasattr(v, "shape")}
            with torch.inference_mode():
                for start in range(0, section.n_spots, batch_size):
                    batch = {k: v[start : start + batch_size].to(device) for k, v in per_spot.items()}
                    outputs.append(network(**self.network_inputs(batch))["prediction"].float().cpu())
            return torch.cat(outputs).numpy()
        with torch.inference_mode():
            batch = {k: v.to(device) for k, v in section.tensors.items()}
            return network(**self.network_inputs(batch))["prediction"].float().cpu().numpy()

    def prediction_batch_size(self) -> int:
        """Spots per forward pass of per-spot prediction (``prediction_batch_spots``, else 4 × batch size)."""
        given = self.data_params.get("prediction_batch_spots")
        if given is not None:
            return _positive_int(given, "prediction_batch_spots")
        return int(self.training_params.get("batch_size") or 256) * 4

    def prediction_mode(self) -> str:
        """How :meth:`prediction_plan` cuts a section into units.

        ``"neighbourhoods"`` for section-wide attention or graph methods (spatial parts with a
        halo of context spots), ``"spots"`` for per-spot networks using the shared
        :meth:`predict_section` (batches of spots, patches read per batch), ``"sections"`` for
        methods with their own :meth:`predict_section` (a whole section, or neighbourhoods
        when ``prediction_chunk_spots`` is set or positions must be re-indexed).
        """
        if self.section_wide or self.needs_graph:
            return "neighbourhoods"
        if type(self).predict_section is PredictionPlanning.predict_section:
            return "spots"
        return "sections"

    def prediction_plan(self, adata, index: np.ndarray | None = None, *, graph_positions=None) -> PredictionPlan:
        """Check the inputs and cut the spots ``index`` into units predicted one at a time.

        Memory is bounded by one unit: a batch of spots (per-spot methods), or a spatial
        neighbourhood of at most ``prediction_chunk_spots`` spots plus a halo of context spots
        ``prediction_halo`` spot spacings wide whose own predictions are discarded (section-wide
        methods; ``prediction_chunk_spots=None`` keeps whole measured sections, as in the
        papers, while pseudo-spot slides from :func:`sthisto.pp.tile` are cut into
        neighbourhoods as large as the model's mean training section).

        Grid positions beyond the model's position table (pseudo-spot grids over whole
        slides) are handled per ``prediction_positions``: ``"strict"`` raises; ``"reindex"``
        shifts each neighbourhood's positions to start at 0 (the tables encode the layout of
        spots within a section, so a shifted neighbourhood keeps its relative layout), cutting
        neighbourhoods small enough to fit the table; ``"auto"`` (default) re-indexes the
        pseudo-spots placed by :func:`sthisto.pp.tile` / :func:`sthisto.tl.superresolve` and
        is strict on measured sections. Sections within the table are never shifted.

        Parameters
        ----------
        adata
            The spots' AnnData.
        index
            Positions of the spots to predict (default all).
        graph_positions
            Optional ``(n_obs, 2)`` float coordinates, in grid units, on which to build the kNN
            graph instead of the integer positions (used for super-resolved spots, which share
            their parent's position-table entry but lie between grid nodes).

        Returns
        -------
        The :class:`PredictionPlan`.
        """
        index = np.arange(adata.n_obs) if index is None else np.asarray(index, dtype=np.int64)
        policy = self.data_params.get("prediction_positions") or "auto"
        if policy not in ("auto", "strict", "reindex"):
            raise InputError(f"prediction_positions={policy!r}; use 'auto', 'strict' or 'reindex'.")
        chunk = self.data_params.get("prediction_chunk_spots")
        chunk = None if chunk is None else _positive_int(chunk, "prediction_chunk_spots")
        halo = self.data_params.get("prediction_halo")
        halo = 0.0 if halo is None else float(halo)
        if not (np.isfinite(halo) and halo >= 0):
            raise InputError(f"prediction_halo={halo!r} must be a number of spot spacings >= 0.")
        libraries = library_ids(adata)[index]
        order = pd_unique(libraries)
        reindexed: list[str] = []
        positions = None
        if self.uses_positions:
            positions = grid_positions(adata[index])
            table = int(self.data_params["n_positions"])
            for library in order:
                rows = libraries == library
                if rows.any() and positions[rows].max() >= table and self._may_reindex(adata, str(library), policy):
                    reindexed.append(str(library))
        strict = index[~np.isin(libraries, reindexed)]
        self.check_inputs(adata, strict)
        if graph_positions is not None:
            graph_positions = np.asarray(graph_positions, dtype=np.float64)
            if graph_positions.shape != (adata.n_obs, 2) or not np.isfinite(graph_positions).all():
                raise InputError(f"graph_positions must be finite with shape ({adata.n_obs}, 2).")
        mode = self.prediction_mode()
        coords = spot_coordinates(adata)[index] if Obsm.SPATIAL in adata.obsm else None
        units: list[PredictionUnit] = []
        for library in order:
            rows = np.flatnonzero(libraries == library)
            library_chunk = chunk
            if library_chunk is None and mode == "neighbourhoods" and _is_pseudo(adata, str(library)):
                library_chunk = self._pseudo_spot_chunk()  # a whole slide is no section
            cut = library in reindexed or (mode in ("neighbourhoods", "sections") and library_chunk is not None)
            if mode == "spots" and library not in reindexed:
                size = self.prediction_batch_size()
                for start in range(0, len(rows), size):
                    part = rows[start : start + size]
                    units.append(PredictionUnit(str(library), index[part], np.ones(len(part), bool), part))
                continue
            if not cut:
                units.append(PredictionUnit(str(library), index[rows], np.ones(len(rows), bool), rows))
                continue
            if coords is None:
                raise MissingKeyError("adata.obsm['spatial'] is missing: neighbourhoods are cut from spot centres.")
            library_positions = positions[rows] if positions is not None else None
            span = int(self.data_params["n_positions"]) if library in reindexed else None
            for core, context in neighbourhoods(
                coords[rows], positions=library_positions, max_core=library_chunk, halo=halo, max_span=span
            ):
                keep = np.isin(context, core)
                offset = library_positions[context].min(axis=0) if library in reindexed else None
                units.append(PredictionUnit(str(library), index[rows[context]], keep, rows[context[keep]], offset))
        plan = PredictionPlan(
            units=units,
            n_spots=len(index),
            mode=mode,
            chunk_spots=chunk,
            halo=halo,
            reindexed=reindexed,
            graph_positions=graph_positions,
        )
        self.prediction_summary = plan.summary()
        return plan

    def _may_reindex(self, adata, library: str, policy: str) -> bool:
        if policy == "reindex":
            return True
        if policy == "strict":
            return False
        return _is_pseudo(adata, library)

    def _pseudo_spot_chunk(self) -> int:
        """Neighbourhood size on pseudo-spot slides: the mean training section (else 1024)."""
        n_spots = self.trained_on.get("n_spots")
        libraries = self.trained_on.get("libraries") or []
        if not n_spots or not len(libraries):
            return 1024
        return max(64, int(round(int(n_spots) / len(libraries))))

    def unit_section(self, adata, unit: PredictionUnit, *, graph_positions=None) -> Section:
        """Network inputs of one prediction unit (patches read now, for its spots only)."""
        import torch

        # Super-resolved spots are in no obsp graph: their edges come from graph_positions below.
        tensors = self.section_inputs(adata, unit.obs_index, graph=graph_positions is None)
        if unit.position_offset is not None and "positions" in tensors:
            shift = torch.as_tensor(np.asarray(unit.position_offset, dtype=np.int64))
            tensors["positions"] = tensors["positions"] - shift
            high = int(tensors["positions"].max()) if unit.n_spots else 0
            if high >= int(self.data_params["n_positions"]):
                raise InputError(
                    f"a neighbourhood of library {unit.library_id!r} spans {high + 1} grid positions, more than "
                    f"the model's table of {self.data_params['n_positions']}; lower prediction_halo."
                )
        if graph_positions is not None and self.needs_graph:
            from ..pp._graph import knn_edge_index

            edges = knn_edge_index(
                graph_positions[unit.obs_index],
                n_neighbors=int(self.data_params["graph_neighbors"]),
                max_distance=self.data_params["graph_max_distance"],
            )
            tensors["edge_index"] = torch.as_tensor(edges, dtype=torch.int64)
        return Section(unit.library_id, unit.obs_index, tensors)

    def predict_unit(self, adata, unit: PredictionUnit, *, device, graph_positions=None) -> np.ndarray:
        """Predictions ``(unit.keep.sum(), n_genes)`` of the kept spots of one unit."""
        section = self.unit_section(adata, unit, graph_positions=graph_positions)
        return np.asarray(self.predict_section(section, device=device))[unit.keep]

    def predict_plan(self, adata, plan: PredictionPlan, *, device="auto") -> np.ndarray:
        """Run a :class:`PredictionPlan` unit by unit; returns ``(plan.n_spots, n_genes)`` float32."""
        from .._device import resolve_device

        device = resolve_device(device)
        self.network.to(device)
        result = np.zeros((plan.n_spots, len(self.genes)), dtype=np.float32)
        try:
            for unit in plan.units:
                result[unit.result_rows] = self.predict_unit(
                    adata, unit, device=device, graph_positions=plan.graph_positions
                )
                release_freed_memory()
        finally:
            self.network.to("cpu")
            self._feature_cache = None
        return result

    def predict(self, adata, index: np.ndarray | None = None, *, device="auto") -> np.ndarray:
        """Predict the model's genes for spots ``index`` of ``adata`` (default all), unit by unit.

        See :meth:`prediction_plan` for how sections are streamed (batches of spots, or spatial
        neighbourhoods with a halo for section-wide methods). An ensemble
        (``tl.train(..., n_members=K)``) predicts the mean of its members, as
        :func:`sthisto.tl.predict` does.

        Returns
        -------
        ``(len(index), n_genes)`` float32 array in the model's target scale.
        """
        members = getattr(self, "members", [])
        if not members:
            return self.predict_network(adata, index, device=device)
        stack = [model.predict_network(adata, index, device=device) for model in (self, *members)]
        return np.mean(stack, axis=0).astype(np.float32)

    def predict_network(self, adata, index: np.ndarray | None = None, *, device="auto") -> np.ndarray:
        """The prediction of the network of this model alone (:meth:`predict` without its ensemble members)."""
        try:
            plan = self.prediction_plan(adata, index)
        except BaseException:
            self._feature_cache = None
            raise
        return self.predict_plan(adata, plan, device=device)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r} must be a positive integer (or None).")
    return int(value)


def _is_pseudo(adata, library: str) -> bool:
    """Whether sthisto placed the library's spots (pp.tile, tl.superresolve) rather than measured them."""
    from .._constants import Metadata, Uns

    metadata = adata.uns.get(Uns.SPATIAL, {}).get(library, {}).get(Uns.METADATA, {})
    return bool(metadata.get(Metadata.PSEUDO_SPOTS))


def release_freed_memory() -> None:
    """Hand memory freed by the last unit back to the system (glibc ``malloc_trim``; no-op elsewhere).

    Units of varying size leave glibc's heap fragmented: without this, the resident memory of a
    whole-slide prediction crept up by ~25% over 40 neighbourhoods although nothing was kept
    (measured in ``benchmarks/slide_prediction.py``). Trimming costs about a millisecond.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        import sys

        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
