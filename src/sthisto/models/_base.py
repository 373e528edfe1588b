"""The thin AnnData-aware class every method shares (scvi-tools' ``_model.py`` pattern).

A method = a plain :class:`torch.nn.Module` (its network, built by :func:`sthisto.models.create`)
plus a subclass of :class:`ExpressionModel` that declares, as class attributes, what the
network needs (pixels or features, a graph, positions), the paper's defaults (patch geometry,
target transform, optimiser, epochs) and, where needed, its loss. Everything else — turning
AnnData sections into batches, the training loop, prediction section by section, storing in
``uns``, save/load — is shared here and in :mod:`sthisto.engine`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._constants import MANIFEST_FORMAT, MANIFEST_VERSION, Obs, Obsm, Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import check_grid_extent
from ..pp._patches import PatchDataset, PatchSpec, library_ids, spot_coordinates

_MEMBER_PREFIX = "member"

# Keys of the data/training parameter groups every method understands; methods extend them.
_COMMON_DATA_DEFAULTS: dict[str, Any] = {
    "target": "log10_1e4",
    "n_positions": None,
    "image_key": None,
    "features_key": None,
    "encoder": None,
    "encoder_weights": None,
    "encoder_kwargs": None,
    "extra_features": None,
    "patch_size_px": None,
    "patch_size_um": None,
    "patch_layout": "chw",
    "graph_neighbors": None,
    "graph_max_distance": None,
    "prediction_chunk_spots": None,
    "prediction_halo": 3.0,
    "prediction_batch_spots": None,
    "prediction_positions": "auto",
}
_COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "max_epochs": 100,
    "batch_size": None,
}


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


class ExpressionModel:
    """Base class of a trained (or trainable) expression-prediction model.

    Subclasses set the class attributes below and usually nothing else; methods with
    special losses or batching override :meth:`loss`, :meth:`training_items` or
    :meth:`predict_section`.

    Parameters
    ----------
    genes
        The genes the model predicts, in output order.
    network_params
        Keyword arguments of the network (defaults: the paper's).
    data_params
        Patch geometry, target transform, graph, positions, feature key.
    training_params
        Optimiser and loop settings.

    Attributes
    ----------
    network
        The :class:`torch.nn.Module`.
    history
        Per-epoch losses (``{"epoch": [...], "train_loss": [...], "val_loss": [...]}``).
    provenance
        Where the weights of the model's pretrained components came from, ``{component:
        record}`` (records of :func:`sthisto.encoders.weights_provenance`): ``"features"`` for
        feature-based methods (with the encoder and field of view), one entry per network
        sub-module that loaded or lacked pretrained weights (HGGEF's ``"trunk"``). Empty when
        nothing is pretrained; ``None`` when not recorded (models saved by older versions).
        Stored in the manifest as ``weights_provenance``.
    """

    # --- registry metadata -------------------------------------------------------------
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    input_kind: ClassVar[str] = "pixels"  # "pixels" | "features"
    needs_graph: ClassVar[bool] = False
    section_wide: ClassVar[bool] = False
    default_loss: ClassVar[str] = "mse"
    reference: ClassVar[str] = ""
    network_class: ClassVar[type | None] = None
    batching: ClassVar[str] = "section"  # "section" | "spots"
    uses_positions: ClassVar[bool] = False
    uses_counts: ClassVar[bool] = False

    # --- paper defaults ----------------------------------------------------------------
    data_defaults: ClassVar[dict[str, Any]] = {}
    training_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        genes: Sequence[str],
        *,
        network_params: Mapping[str, Any] | None = None,
        data_params: Mapping[str, Any] | None = None,
        training_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.genes = [str(g) for g in genes]
        if len(set(self.genes)) != len(self.genes):
            raise InputError("the gene list has duplicates; pass unique gene names.")
        if not self.genes:
            raise InputError("the model needs at least one gene to predict.")
        self.network_params = dict(network_params or {})
        self.data_params = {**self.all_data_defaults(), **dict(data_params or {})}
        self.training_params = {**self.all_training_defaults(), **dict(training_params or {})}
        self.history: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": []}
        self.trained_on: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        """JSON-able state a method keeps beside its weights (e.g. coordinate frames)."""
        self.members: list[ExpressionModel] = []
        """Further ensemble members (``tl.train(..., n_members=K)``); this model is member 0."""
        self.calibration: dict[str, Any] = {}
        """Conformal calibrations by spread mode (:func:`sthisto.tl.calibrate`), JSON-able."""
        self.network = self.build_network()
        self.provenance: dict[str, Any] | None = network_provenance(self.network)

    def build_network(self):
        """Create this model's network; methods without one (ridge) return ``None``."""
        return self.create_network(n_genes=len(self.genes), **self.network_params)

    # --- construction ------------------------------------------------------------------
    @classmethod
    def all_data_defaults(cls) -> dict[str, Any]:
        """Data parameters with this method's defaults."""
        return {**_COMMON_DATA_DEFAULTS, **cls.data_defaults}

    @classmethod
    def all_training_defaults(cls) -> dict[str, Any]:
        """Training parameters with this method's defaults."""
        return {**_COMMON_TRAINING_DEFAULTS, **cls.training_defaults}

    @classmethod
    def network_parameter_names(cls) -> list[str]:
        """Keyword arguments the network constructor accepts (besides ``n_genes``)."""
        if cls.network_class is None:
            return []
        signature = inspect.signature(cls.network_class.__init__)
        return [p for p in signature.parameters if p not in ("self", "n_genes", "args", "kwargs")]

    @classmethod
    def create_network(cls, *, n_genes: int, **params):
        """Build the network with the paper's defaults overridden by ``params``."""
        if cls.network_class is None:
            raise InputError(f"method {cls.name!r} has no neural network (it is not built by create()).")
        return cls.network_class(n_genes, **params)

    @classmethod
    def split_params(cls, params: Mapping[str, Any]) -> tuple[dict, dict, dict]:
        """Route user keyword arguments to the network, data and training groups."""
        network_names = set(cls.network_parameter_names())
        data_names = set(cls.all_data_defaults())
        training_names = set(cls.all_training_defaults())
        network, data, training, unknown = {}, {}, {}, []
        for key, value in params.items():
            if key in data_names:
                data[key] = value
            elif key in training_names:
                training[key] = value
            elif key in network_names:
                network[key] = value
            else:
                unknown.append(key)
        if unknown:
            valid = sorted(network_names | data_names | training_names)
            raise InputError(f"method {cls.name!r} does not accept {sorted(unknown)}. Valid parameters: {valid}.")
        return network, data, training

    @classmethod
    def configure(cls, adata, *, genes: Sequence[str], train_index: np.ndarray, params: Mapping[str, Any]):
        """Create an untrained model whose data-dependent settings follow the training data."""
        network, data, training = cls.split_params(params)
        data = {**cls.all_data_defaults(), **data}
        if cls.uses_positions and data.get("n_positions") is None:
            positions = grid_positions(adata[train_index])
            paper = cls.network_default("n_positions", 64)
            data["n_positions"] = max(int(paper), int(positions.max()) + 1 if len(positions) else 1)
            check_grid_extent(
                data["n_positions"],
                where=f"method {cls.name!r} on grid positions up to {data['n_positions'] - 1:,}",
                fix="obs['array_row'] / obs['array_col'] must be grid indices from 0: shift them with "
                "adata.obs['array_row'] -= adata.obs['array_row'].min() (same for array_col).",
            )
        elif cls.uses_positions:
            check_grid_extent(
                int(data["n_positions"]),
                where=f"method {cls.name!r} with n_positions={data['n_positions']!r}",
                fix="Pass a smaller n_positions (grid positions per axis), or leave it None to fit the data.",
            )
        if cls.uses_positions:
            network.setdefault("n_positions", data["n_positions"])
        if cls.input_kind == "features":
            cached = cls.features_present(adata, data)
            data["features_key"] = cls.ensure_features(adata, data)
            data["features_dim"] = int(cls.feature_matrix(adata, data).shape[1])
        model = cls(genes, network_params=network, data_params=data, training_params=training)
        if cls.input_kind == "features":
            from ..pp._embed import features_provenance

            features = features_provenance(adata, data["features_key"])
            model.provenance = {**(model.provenance or {}), "features": features}
            if cached and features["weights"].get("source") == "random":
                # pp.embed warns when it computes them; cached ones would otherwise pass silently
                from ..encoders._provenance import warn_random_weights

                warn_random_weights(
                    f"method {cls.name!r}: the features in obsm[{data['features_key']!r}] (encoder "
                    f"{features.get('encoder', '?')!r})",
                    "Re-embed with pretrained weights (sthisto.pp.embed(..., weights='/path/to/checkpoint', "
                    "overwrite=True)) or pass encoder_weights= with a new features_key.",
                    stacklevel=4,
                )
        return model

    @classmethod
    def features_key(cls, data: Mapping[str, Any]) -> str | None:
        """``obsm`` key of the features: ``features_key``, else ``f"X_{encoder}"``."""
        encoder = data.get("encoder")
        return data.get("features_key") or (f"X_{encoder}" if isinstance(encoder, str) else None)

    @classmethod
    def features_present(cls, adata, data: Mapping[str, Any]) -> bool:
        """Whether the features (and the extras the method needs) are in ``obsm`` already."""
        key = cls.features_key(data)
        extras = tuple(data.get("extra_features") or ())
        return key is not None and key in adata.obsm and (not extras or f"{key}_extra" in adata.obsm)

    @classmethod
    def ensure_features(cls, adata, data: Mapping[str, Any]) -> str:
        """Return the ``obsm`` key of the features, embedding the spots first if they lack them.

        With ``encoder`` set (a name :func:`sthisto.encoders.get_encoder` accepts), missing
        features are computed with :func:`sthisto.pp.embed` and written to ``obsm`` (a new key;
        reused by later calls). Without it, the features must already be there. Features that
        are present are used as given: when only their extras (``extra_features``) are
        missing, those alone are computed into ``obsm[f"{key}_extra"]`` and ``obsm[key]`` is
        left untouched. ``encoder_kwargs`` (a dict) goes to :func:`sthisto.encoders.get_encoder`
        (e.g. ``revision=`` or ``cache_dir=`` for hub weights).
        """
        encoder = data.get("encoder")
        extras = tuple(data.get("extra_features") or ())
        key = cls.features_key(data)
        if cls.features_present(adata, data):
            check_features_current(adata, key)
            return key
        if key is not None and key in adata.obsm:
            check_features_current(adata, key)
            from ..encoders._registry import HISTOSGE_PATCH_UM
            from ..pp._embed import FUNCTION, embed_extras

            made = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key, {})
            # the extras describe the patch the encoder saw: its record's geometry when known
            patch_um = made.get("patch_size_um") or data.get("patch_size_um") or HISTOSGE_PATCH_UM
            image_key = made.get("image_key", data.get("image_key"))
            logger.info("obsm[%r] is used as given; computing its extras %s into obsm[%r]", key, extras, f"{key}_extra")
            embed_extras(
                adata,
                key,
                extra_features=extras,
                patch_size_um=float(patch_um),
                patch_size_px=int(made.get("patch_size_px") or 224),
                image_key=None if image_key in (None, "fullres") else str(image_key),
            )
            return key
        if not isinstance(encoder, str):
            raise MissingKeyError(
                f"method {cls.name!r} reads image features from adata.obsm[{key!r}], which is missing. "
                f"Compute them with sthisto.pp.embed(adata, encoder=...) and pass features_key='<obsm key>', "
                f"or pass encoder='<name>' to compute them now."
            )
        from ..pp._embed import embed

        logger.info("computing %s features for %d spots into obsm[%r]", encoder, adata.n_obs, key)
        embed(
            adata,
            encoder=encoder,
            weights=data.get("encoder_weights"),
            key_added=key,
            patch_size_um=data.get("patch_size_um"),
            image_key=data.get("image_key"),
            extra_features=extras,
            encoder_kwargs=data.get("encoder_kwargs"),
            progress=False,
            overwrite=key in adata.obsm,
        )
        return key

    def embedding_params(self, adata) -> dict[str, Any]:
        """Data parameters for embedding spots that lack the features: the training features' encoder.

        The encoder and weights the training features were made with (``provenance["features"]``)
        take precedence over ``encoder`` / ``encoder_weights``, which may not describe them (a
        model trained on cached features); see :func:`training_encoder`.
        """
        data = dict(self.data_params)
        features = (self.provenance or {}).get("features")
        key = data.get("features_key")
        known = bool(features) and features.get("weights", {}).get("source") != "unknown"
        if not known or (key is not None and key in adata.obsm) or not isinstance(features.get("encoder"), str):
            return data
        data["encoder"], data["encoder_weights"], pinned = training_encoder(features, key)
        data["encoder_kwargs"] = {**(data.get("encoder_kwargs") or {}), **pinned}
        if features.get("patch_size_um") is not None:
            data["patch_size_um"] = float(features["patch_size_um"])
        image_key = features.get("image_key")
        data["image_key"] = None if image_key in (None, "fullres") else str(image_key)
        return data

    @classmethod
    def feature_matrix(cls, adata, data: Mapping[str, Any], frames: Mapping | None = None) -> np.ndarray:
        """The per-spot feature matrix a feature-based method reads (default: the ``obsm`` key)."""
        return np.asarray(adata.obsm[data["features_key"]], dtype=np.float32)

    @classmethod
    def network_default(cls, name: str, fallback: Any = None) -> Any:
        """Default value of a network constructor argument."""
        if cls.network_class is None:
            return fallback
        parameter = inspect.signature(cls.network_class.__init__).parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            return fallback
        return parameter.default

    # --- data --------------------------------------------------------------------------
    @property
    def patch_spec(self) -> PatchSpec:
        """Patch geometry the network sees."""
        return PatchSpec(
            size_px=int(self.data_params["patch_size_px"]),
            size_um=self.data_params["patch_size_um"],
            layout=self.data_params["patch_layout"],
        )

    def check_inputs(self, adata, index: np.ndarray) -> None:
        """Raise a clear error if ``adata`` lacks what this model reads (before any work)."""
        check_spots(adata)
        if self.uses_positions:
            positions = grid_positions(adata[index])
            high = int(positions.max()) if len(positions) else 0
            if high >= self.data_params["n_positions"]:
                raise InputError(
                    f"grid positions reach {high} but this model's position table holds "
                    f"{self.data_params['n_positions']} entries (set when it was trained). Predict on "
                    f"sections with array coordinates below that, or retrain with n_positions >= {high + 1}."
                )
        if self.input_kind == "features":
            self.ensure_features(adata, self.embedding_params(adata))
            dim = self.feature_matrix(adata, self.data_params, self.extra.get("frames")).shape[1]
            if dim != self.data_params.get("features_dim", dim):
                raise InputError(
                    f"adata.obsm[{self.data_params['features_key']!r}] gives {dim} features but the model was "
                    f"trained on {self.data_params['features_dim']}; embed with the training encoder."
                )
        if self.input_kind == "pixels":
            spot_coordinates(adata)

    def sections(
        self,
        adata,
        index: np.ndarray,
        *,
        targets: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        size_factors: np.ndarray | None = None,
        loss_mask: np.ndarray | None = None,
    ) -> list[Section]:
        """Build one :class:`Section` per library among the spots ``index``.

        Per-spot arrays (``targets``, ``counts``, ...) are aligned with ``index``.
        """
        import torch

        libraries = library_ids(adata)[index]
        out = []
        for library in pd_unique(libraries):
            rows = np.flatnonzero(libraries == library)
            obs_index = index[rows]
            tensors: dict[str, Any] = {}
            tensors.update(self.section_inputs(adata, obs_index))
            if targets is not None:
                tensors["target"] = torch.as_tensor(targets[rows], dtype=torch.float32)
            if counts is not None:
                tensors["counts"] = torch.as_tensor(counts[rows], dtype=torch.float32)
            if size_factors is not None:
                tensors["size_factors"] = torch.as_tensor(size_factors[rows], dtype=torch.float32)
            if loss_mask is not None:
                tensors["loss_mask"] = torch.as_tensor(loss_mask[rows], dtype=torch.bool)
            out.append(Section(str(library), obs_index, tensors))
        return out

    def section_inputs(self, adata, obs_index: np.ndarray) -> dict[str, Any]:
        """Network inputs of one section's spots (patches/features, positions, graph)."""
        import torch

        tensors: dict[str, Any] = {}
        if self.input_kind == "pixels":
            dataset = PatchDataset(
                adata, spec=self.patch_spec, image_key=self.data_params["image_key"], indices=obs_index
            )
            patches, clipped = dataset.read_batch(range(len(dataset)))
            if clipped.any():
                logger.info(
                    "%d of %d patches of library %r reach past the image border and are padded.",
                    int(clipped.sum()),
                    len(clipped),
                    str(adata.obs[Obs.LIBRARY_ID].iloc[obs_index[0]]),
                )
            tensors["patches"] = patches
        else:
            features = self._features_cache(adata)[obs_index]
            tensors["features"] = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
        if self.uses_positions or self.needs_graph:
            positions = grid_positions(adata[obs_index])
            tensors["positions"] = torch.as_tensor(positions, dtype=torch.int64)
        if self.needs_graph:
            from ..pp._graph import knn_edge_index

            edges = knn_edge_index(
                positions.astype(float),
                n_neighbors=int(self.data_params["graph_neighbors"]),
                max_distance=self.data_params["graph_max_distance"],
            )
            tensors["edge_index"] = torch.as_tensor(edges, dtype=torch.int64)
        if Obsm.SPATIAL in adata.obsm:
            tensors["coords"] = torch.as_tensor(spot_coordinates(adata)[obs_index], dtype=torch.float32)
        return tensors

    def _features_cache(self, adata) -> np.ndarray:
        # One feature matrix per AnnData and call, not one per section.
        cached = getattr(self, "_feature_cache", None)
        if cached is None or cached[0] is not adata:
            from ..engine._recipes import standardize_features

            features = self.feature_matrix(adata, self.data_params, self.extra.get("frames"))
            cached = (adata, standardize_features(features, self.data_params))
            self._feature_cache = cached
        return cached[1]

    def network_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Select the keys the network's ``forward`` takes."""
        keys = getattr(self.network, "input_keys", ())
        missing = [k for k in keys if k not in batch]
        if missing:
            raise InputError(f"the batch lacks {missing} needed by the {self.name} network.")
        return {k: batch[k] for k in keys}

    # --- training hooks ----------------------------------------------------------------
    def training_items(self, sections: list[Section]) -> tuple[list[dict], int | None]:
        """Turn sections into the items one optimisation step consumes.

        Returns
        -------
        items
            For ``batching="section"``: one dict per section (a whole section per step). For
            ``"spots"``: one dict per spot, collated into minibatches.
        batch_size
            ``None`` when each item already is a batch, else the minibatch size.
        """
        if self.batching == "section":
            return [s.tensors for s in sections], None
        if self.batching == "spots":
            items = []
            for section in sections:
                per_spot_keys = [k for k, v in section.tensors.items() if k != "edge_index" and hasattr(v, "shape")]
                for row in range(section.n_spots):
                    items.append({k: section.tensors[k][row] for k in per_spot_keys})
            return items, int(self.training_params.get("batch_size") or 32)
        raise InputError(f"unknown batching {self.batching!r} for method {self.name!r}.")

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]):
        """Training loss on the spots selected by the batch's ``loss_mask`` (default: MSE)."""
        from torch.nn import functional as F

        return F.mse_loss(outputs["prediction"], batch["target"])

    def masked_loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]):
        """Apply ``batch['loss_mask']`` (if any) to per-spot tensors, then :meth:`loss`."""
        mask = batch.get("loss_mask")
        if mask is None:
            return self.loss(outputs, batch)
        shape = tuple(mask.shape)

        def select(value):
            if hasattr(value, "shape") and tuple(value.shape[: len(shape)]) == shape:
                return value[mask]
            return value

        return self.loss({k: select(v) for k, v in outputs.items()}, {k: select(v) for k, v in batch.items()})

    def configure_optimizers(self, network):
        """Optimiser (and scheduler) of the paper; default Adam with ``lr`` and ``weight_decay``."""
        import torch

        parameters = [p for p in network.parameters() if p.requires_grad]
        # The fused kernel updates all parameters in one pass: ~5x faster steps on CPU for
        # 100M-parameter networks, same algorithm.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
        return torch.optim.Adam(
            parameters,
            lr=float(self.training_params["lr"]),
            weight_decay=float(self.training_params["weight_decay"]),
            fused=fused or None,
        )

    def fit(self, adata, train_index: np.ndarray, **fit_params) -> ExpressionModel:
        """Train on the spots ``train_index`` (see :func:`sthisto.tl.train` for parameters)."""
        from ..engine._loop import fit_model

        try:
            fit_model(self, adata, train_index, **fit_params)
        finally:
            self._feature_cache = None
        return self

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
        if type(self).predict_section is ExpressionModel.predict_section:
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

        tensors = self.section_inputs(adata, unit.obs_index)
        if unit.position_offset is not None and "positions" in tensors:
            shift = torch.as_tensor(np.asarray(unit.position_offset, dtype=np.int64))
            tensors["positions"] = tensors["positions"] - shift
            high = int(tensors["positions"].max()) if unit.n_spots else 0
            if high >= int(self.data_params["n_positions"]):
                raise InputError(
                    f"a neighbourhood of library {unit.library_id!r} spans {high + 1} grid positions, more than "
                    f"the model's table of {self.data_params['n_positions']}; lower prediction_halo."
                )
        if graph_positions is not None and "edge_index" in tensors:
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
        neighbourhoods with a halo for section-wide methods).

        Returns
        -------
        ``(len(index), n_genes)`` float32 array in the model's target scale.
        """
        try:
            plan = self.prediction_plan(adata, index)
        except BaseException:
            self._feature_cache = None
            raise
        return self.predict_plan(adata, plan, device=device)

    # --- persistence -------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """JSON-serialisable description from which the model is rebuilt (without weights)."""
        from .._about import __version__

        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "sthisto_version": __version__,
            "method": self.name,
            "genes": self.genes,
            "network_params": self.network_params,
            "data_params": self.data_params,
            "training_params": self.training_params,
            "history": self.history,
            "trained_on": self.trained_on,
            "extra": self.extra,
            "weights_provenance": self.provenance,
            "members": [member.manifest() for member in self.members],
            "calibration": self.calibration,
        }

    def state_tensors(self) -> dict[str, Any]:
        """Tensors that, with the manifest, fully define the trained model."""
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}

    def load_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_tensors`; strict about names and shapes."""
        result = self.network.load_state_dict(dict(tensors), strict=True)
        del result

    def all_state_tensors(self) -> dict[str, Any]:
        """:meth:`state_tensors` of this model and, under a ``member<k>/`` prefix, of each ensemble member."""
        tensors = dict(self.state_tensors())
        for number, member in enumerate(self.members, start=1):
            tensors.update({f"{_MEMBER_PREFIX}{number}/{k}": v for k, v in member.state_tensors().items()})
        return tensors

    def load_all_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Inverse of :meth:`all_state_tensors`: split the members' tensors off by their prefix."""
        own = {k: v for k, v in tensors.items() if not k.startswith(_MEMBER_PREFIX)}
        self.load_state_tensors(own)
        for number, member in enumerate(self.members, start=1):
            prefix = f"{_MEMBER_PREFIX}{number}/"
            member.load_state_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ExpressionModel:
        """Rebuild an untrained model with the manifest's settings."""
        model = cls(
            manifest["genes"],
            network_params=manifest.get("network_params"),
            data_params=manifest.get("data_params"),
            training_params=manifest.get("training_params"),
        )
        model.history = {k: list(v) for k, v in manifest.get("history", {}).items()}
        model.trained_on = dict(manifest.get("trained_on", {}))
        model.extra = dict(manifest.get("extra", {}))
        stored = manifest.get("weights_provenance")
        model.provenance = None if stored is None else dict(stored)
        model.members = [cls.from_manifest(member) for member in manifest.get("members") or []]
        model.calibration = dict(manifest.get("calibration") or {})
        return model

    def to_record(self) -> dict[str, Any]:
        """The record stored in ``uns['sthisto']['models'][key]``: JSON manifest + safetensors bytes."""
        from safetensors.torch import save

        weights = save(self.all_state_tensors())
        return {"manifest": json.dumps(self.manifest()), "weights": np.frombuffer(weights, dtype=np.uint8).copy()}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``manifest.json`` + ``weights.safetensors``.

        Parameters
        ----------
        path
            Target folder (created).
        overwrite
            Replace an existing saved model in that folder. A folder holding anything else (files
            other than ``manifest.json`` and ``weights.safetensors``, or a manifest sthisto did not
            write) is refused, never emptied.

        Returns
        -------
        The folder's path. Load it with :func:`sthisto.io.load_model`.
        """
        from ..io._model import save_model

        return save_model(self, path, overwrite=overwrite)

    def __repr__(self) -> str:
        epochs = len(self.history.get("epoch", []))
        return f"{type(self).__name__}(method={self.name!r}, genes={len(self.genes)}, epochs_trained={epochs})"


def training_encoder(features: Mapping[str, Any], key) -> tuple[str, str | None, dict]:
    """``(encoder, encoder_weights, encoder_kwargs)`` rebuilding the training features' encoder exactly.

    ``features`` is a model's ``provenance["features"]`` record. A hub id stays a hub id (pinned
    to its revision), a file must exist with the same SHA-256, a random encoder is rebuilt from
    its seed; anything else raises, so new spots are never embedded by other weights.
    """
    from pathlib import Path

    from ..encoders._provenance import file_sha256, provenance_label
    from ..encoders._registry import _REGISTRY
    from ..encoders._timm import is_timm_model

    record_ = features["weights"]
    source = record_.get("source")
    encoder = str(features.get("encoder"))
    if source == "hub":
        revision = {"revision": str(record_["revision"])} if record_.get("revision") else {}
        if encoder in _REGISTRY or is_timm_model(encoder):
            return encoder, str(record_["hub_id"]), revision
        return str(record_["hub_id"]), None, revision  # the hub id names the architecture itself
    if source in ("file", "cache"):
        path = Path(str(record_.get("path", "")))
        if not path.is_file():
            raise MissingKeyError(
                f"the model was trained on features of encoder {encoder!r} with weights from {str(path)!r} "
                f"(sha256 {str(record_.get('sha256', '?'))[:12]}), and that file no longer exists, so the new spots "
                f"cannot be embedded like the measured ones. Put the file back at that path (or train again with "
                f"encoder_weights='<its new path>'); sthisto never falls back to random weights."
            )
        if record_.get("sha256") and file_sha256(path) != record_["sha256"]:
            raise InputError(
                f"the weights file {str(path)!r} changed since the model's features were computed (sha256 "
                f"{file_sha256(path)[:12]} now, {str(record_['sha256'])[:12]} then); restore the original file."
            )
        return encoder, str(path), {}
    if source == "random":
        return encoder, None, ({"seed": int(record_["seed"])} if "seed" in record_ else {})
    if source == "none":
        return encoder, None, {}
    raise MissingKeyError(
        f"the features in obsm[{key!r}] came from {provenance_label(record_)} (encoder {encoder!r}), which "
        f"sthisto cannot rebuild to embed the new spots. Embed with a registered, timm or hub encoder and "
        f"weights from a file (sthisto.pp.embed) before training."
    )


def network_provenance(network) -> dict[str, Any]:
    """``{sub-module name: record}`` of the sub-modules that carry a ``weights_provenance`` record."""
    if network is None or not hasattr(network, "named_modules"):
        return {}
    return {
        name or "network": dict(module.weights_provenance)
        for name, module in network.named_modules()
        if isinstance(getattr(module, "weights_provenance", None), Mapping)
    }


def check_spots(adata) -> None:
    """Spots every method needs: a ``library_id`` column and unique spot ids."""
    library_ids(adata)
    if not adata.obs_names.is_unique:
        duplicated = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"adata.obs_names has duplicate spot ids (e.g. {duplicated}); predictions could not be told "
            f"apart. Make them unique first: adata.obs_names_make_unique()."
        )


def check_features_current(adata, key: str) -> None:
    """Refuse image features of ``obsm[key]`` cut at spot centres that have since moved.

    :func:`sthisto.pp.embed` records a fingerprint of the spots (names, libraries, centres). On the
    same spots with other centres the features describe the wrong pixels; a subset of the spots
    (a held-out section's copy) keeps valid rows and cannot be compared, so it passes.
    """
    from ..pp._embed import FUNCTION, _spots_fingerprint, spot_names_fingerprint

    entry = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key)
    if not isinstance(entry, Mapping) or "spots_names_fingerprint" not in entry or "spots_fingerprint" not in entry:
        return
    libraries = library_ids(adata)
    if str(entry["spots_names_fingerprint"]) != spot_names_fingerprint(adata, libraries):
        return
    embedded = np.flatnonzero(np.isin(libraries, [str(v) for v in np.atleast_1d(entry.get("libraries", []))]))
    if str(entry["spots_fingerprint"]) != _spots_fingerprint(adata, libraries, spot_coordinates(adata), embedded):
        raise InputError(
            f"adata.obsm[{key!r}] holds image features cut at other spot centres: obsm['spatial'] changed "
            f"after sthisto.pp.embed made them, so they describe the wrong pixels. Recompute them with "
            f"sthisto.pp.embed(adata, encoder=..., key_added={key!r}, overwrite=True)."
        )


def grid_positions(adata) -> np.ndarray:
    """Integer grid coordinates ``(n_obs, 2)``, columns (x, y) = (array_col, array_row)."""
    missing = [k for k in (Obs.ARRAY_COL, Obs.ARRAY_ROW) if k not in adata.obs]
    if missing:
        raise MissingKeyError(
            f"adata.obs lacks {missing}: this method embeds integer grid positions. Readers set "
            f"them; for your own data add obs['array_col'] / obs['array_row'] (integers from 0)."
        )
    values = adata.obs[[Obs.ARRAY_COL, Obs.ARRAY_ROW]].to_numpy()
    if not np.isfinite(values.astype(float)).all():
        raise InputError("obs['array_col'] / obs['array_row'] contain NaN; every spot needs grid coordinates.")
    if (values.astype(float) != np.round(values.astype(float))).any():
        raise InputError("obs['array_col'] / obs['array_row'] must be integers (grid indices), not pixels.")
    values = values.astype(np.int64)
    if len(values) and values.min() < 0:
        raise InputError("obs['array_col'] / obs['array_row'] contain negative values; shift them to start at 0.")
    return values


def pd_unique(values: np.ndarray) -> list:
    """Unique values in order of first appearance."""
    _, first = np.unique(values, return_index=True)
    return [values[i] for i in np.sort(first)]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r} must be a positive integer (or None).")
    return int(value)


def neighbourhoods(
    coords: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    max_core: int | None = None,
    halo: float = 3.0,
    max_span: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut one section's spots into spatial neighbourhoods with a halo of context spots.

    The section is split recursively at the median of its longer side (a k-d tree) until
    each part (the *core*) holds at most ``max_core`` spots and, with its halo, spans fewer
    than ``max_span`` grid positions along each axis. The halo is every spot within ``halo``
    spot spacings of the core's bounding box (spacing: the median nearest-neighbour distance).

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres (pixels).
    positions
        ``(n, 2)`` integer grid positions; needed with ``max_span``.
    max_core
        Largest core; ``None``: no limit.
    halo
        Width of the context ring in spot spacings.
    max_span
        Positions of core + halo must span fewer than this many grid steps per axis.

    Returns
    -------
    ``[(core, context), ...]``: sorted indices into ``coords``; every spot is in exactly one
    core, and ``core ⊆ context``. Parts come out in spatial order (first half first).
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if n == 0:
        return []
    if max_span is not None and positions is None:
        raise InputError("neighbourhoods: max_span needs the grid positions.")
    spacing = 0.0
    if n > 1:
        distances, _ = cKDTree(coords).query(coords, k=2)
        spacing = float(np.median(distances[:, 1]))
    reach = halo * spacing
    tree = cKDTree(coords) if reach > 0 else None

    def context_of(core: np.ndarray) -> np.ndarray:
        if tree is None:
            return core
        low = coords[core].min(axis=0) - reach
        high = coords[core].max(axis=0) + reach
        centre = (low + high) / 2
        candidates = np.asarray(tree.query_ball_point(centre, r=float(np.hypot(*(high - low)) / 2) + 1e-9), dtype=int)
        inside = ((coords[candidates] >= low - 1e-9) & (coords[candidates] <= high + 1e-9)).all(axis=1)
        return np.union1d(core, candidates[inside])

    out: list[tuple[np.ndarray, np.ndarray]] = []
    stack = [np.arange(n)]
    while stack:
        core = stack.pop()
        context = context_of(core)
        too_many = max_core is not None and len(core) > max_core
        too_wide = False
        if max_span is not None:
            extent = positions[context].max(axis=0) - positions[context].min(axis=0)
            too_wide = bool((extent >= max_span).any())
        if not (too_many or too_wide):
            out.append((core, context))
            continue
        if len(core) == 1:
            raise InputError(
                f"one spot with its halo of {halo:g} spot spacings spans more than {max_span} grid positions; "
                f"lower prediction_halo or predict on a coarser grid."
            )
        points = coords[core]
        axis = int(np.argmax(np.ptp(points, axis=0)))
        order = np.argsort(points[:, axis], kind="stable")
        half = len(core) // 2
        stack.append(np.sort(core[order[half:]]))
        stack.append(np.sort(core[order[:half]]))
    return out


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
