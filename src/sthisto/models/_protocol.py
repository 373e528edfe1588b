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
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._constants import MANIFEST_FORMAT, MANIFEST_VERSION, Obs, Obsm
from .._errors import InputError
from .._logging import logger
from .._spots import grid_positions, library_ids, pd_unique, spot_coordinates
from .._validate import check_grid_extent
from ..pp._patches import PatchDataset, PatchSpec
from ._features import FeatureEmbedding
from ._planning import PredictionPlanning, Section

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
    # the learning rate of recipe="small_data" (None: lr); each method sets the one measured for it
    "small_data_lr": None,
}


class ExpressionModel(FeatureEmbedding, PredictionPlanning):
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
        # graph_key: an obsp graph the user built replaces the method's own (pp._user_graph).
        return {**_COMMON_DATA_DEFAULTS, **({"graph_key": None} if cls.needs_graph else {}), **cls.data_defaults}

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

    def section_inputs(self, adata, obs_index: np.ndarray, *, graph: bool = True) -> dict[str, Any]:
        """Network inputs of one section's spots (patches/features, positions, graph unless ``graph=False``)."""
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
        if self.needs_graph and graph and self.data_params.get("graph_key") is not None:
            from ..pp._user_graph import section_edge_index

            edges = section_edge_index(adata, self.data_params["graph_key"], obs_index)
            tensors["edge_index"] = torch.as_tensor(edges, dtype=torch.int64)
        elif self.needs_graph and graph:
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
