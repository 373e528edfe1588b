"""HisToSGE (Shi et al., 2024): self-attention over short sequences of spot features.

Each spot is described by a precomputed image feature (a pathology foundation model on a
spot-centred crop). Learnable grid-position embeddings are added, one pre-LayerNorm
transformer block lets the spots of a sequence (~50 spots, see
:mod:`sthisto.models.layers.sequences`) exchange information, and an MLP head maps every token
to non-negative expression.

Input width and variants
------------------------
``variant="paper"`` (default)
    The paper's spot descriptor: the 1024-d encoder feature concatenated with the spot's pixel
    coordinates (2) and the mean RGB of its crop (3) — 1029 values, assembled by
    :func:`paper_features` — plus the learnable position embeddings the authors' code adds.
    The paper feeds the 1029-d descriptor straight to multi-head self-attention, so the token
    width is the input width: position tables, transformer and head all run at 1029, with no
    input projection (a projection would add ~1.05 M parameters the paper does not describe).
    The 4 × 64 attention inner width does not depend on the token width.
``variant="reference"``
    The authors' code: the 1024-d encoder feature only (any encoder width works), position
    embeddings added, token width = feature width.

The two variants thus differ in the features they expect (``in_features`` defaults to 1029 or
1024); the layers are the same. At G = 1000 genes: paper **8,384,518** parameters, reference
**8,353,768** (the code's ~8.4 M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._errors import InputError
from .layers.position import GridPositionEmbedding
from .layers.transformer import Transformer

Variant = Literal["paper", "reference"]

ENCODER_WIDTH = 1024
"""Width of the UNI class token the paper builds on."""
EXTRA_PAPER_FEATURES = 5
"""Pixel coordinates (x, y) and RGB mean appended to the encoder feature by the paper."""


class HisToSGENet(nn.Module):
    """HisToSGE network: position embedding + one transformer block + MLP head.

    Parameters
    ----------
    n_genes
        Number of predicted genes G.
    in_features
        Width D of the per-spot input feature, also the token width. Default: 1029 for
        ``variant="paper"`` (1024-d encoder feature + 2 coordinates + 3 RGB means, see
        :func:`paper_features`), 1024 for ``variant="reference"``.
    variant
        ``"paper"`` (default) or ``"reference"``; see the module documentation.
    n_positions
        Size of each position table (x = array column, y = array row); grid coordinates must
        lie in ``[0, n_positions)``.
    depth
        Transformer blocks (the paper: 1).
    heads, dim_head
        Attention heads and their width (4 × 64).
    mlp_dim
        Hidden width of the transformer MLP (1024).
    dropout
        Dropout inside the transformer (0).
    head_hidden
        Hidden width of the prediction head (2048).

    Notes
    -----
    Inputs (:attr:`input_keys`): ``features`` float ``(N, D)`` or ``(B, T, D)``, ``positions``
    int64 ``(N, 2)`` or ``(B, T, 2)`` with columns (x, y) = (array_col, array_row), and an
    optional ``mask`` bool ``(B, T)`` (True = real spot). ``forward`` returns
    ``{"prediction": (..., G)}`` with the input's leading shape, non-negative, and zero at
    padding tokens. Train with MSE on log-normalised expression (:func:`torch.nn.functional.mse_loss`).

    Examples
    --------
    >>> net = HisToSGENet(1000, variant="reference")
    >>> out = net(torch.randn(50, 1024), torch.randint(0, 64, (50, 2)))["prediction"]  # (50, 1000)
    """

    input_keys = ("features", "positions", "mask")

    def __init__(
        self,
        n_genes: int,
        *,
        in_features: int | None = None,
        variant: Variant = "paper",
        n_positions: int = 512,
        depth: int = 1,
        heads: int = 4,
        dim_head: int = 64,
        mlp_dim: int = 1024,
        dropout: float = 0.0,
        head_hidden: int = 2048,
    ) -> None:
        super().__init__()
        if variant not in ("paper", "reference"):
            raise InputError(f"variant={variant!r}; use 'paper' (default) or 'reference' (the authors' code).")
        if in_features is None:
            in_features = ENCODER_WIDTH + (EXTRA_PAPER_FEATURES if variant == "paper" else 0)
        for name, value in (("n_genes", n_genes), ("in_features", in_features), ("n_positions", n_positions)):
            if int(value) != value or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer.")
        self.variant = variant
        self.n_genes = int(n_genes)
        self.in_features = int(in_features)
        self.n_positions = int(n_positions)
        self.position = GridPositionEmbedding(self.n_positions, self.in_features, mode="add")
        self.transformer = Transformer(
            self.in_features, depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout
        )
        self.head = nn.Sequential(
            nn.Linear(self.in_features, head_hidden),
            nn.ReLU(),
            nn.LayerNorm(head_hidden),
            nn.Linear(head_hidden, self.n_genes),
            nn.ReLU(),
        )

    def forward(
        self, features: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Predict expression for one sequence ``(N, D)`` or padded sequences ``(B, T, D)``."""
        unbatched = features.dim() == 2
        if unbatched:
            features, positions = features.unsqueeze(0), positions.unsqueeze(0)
            mask = None if mask is None else mask.reshape(1, -1)
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise InputError(
                f"features have shape {tuple(features.shape)}; expected (N, {self.in_features}) or "
                f"(B, T, {self.in_features}). For variant='paper' build them with paper_features(...)."
            )
        batch, tokens, _ = features.shape
        if tuple(positions.shape) != (batch, tokens, 2):
            raise InputError(
                f"positions have shape {tuple(positions.shape)}; expected {(batch, tokens, 2)[unbatched:]} "
                f"integer grid coordinates (array_col, array_row)."
            )
        if mask is not None:
            mask = mask.to(torch.bool)
            if tuple(mask.shape) != (batch, tokens):
                raise InputError(f"mask has shape {tuple(mask.shape)}; expected {(batch, tokens)[unbatched:]}.")
        positions = positions.long()
        if mask is not None:
            # Padding tokens may carry any coordinate; keep them inside the table.
            positions = positions.masked_fill(~mask.unsqueeze(-1), 0)
        x = features.to(self.head[0].weight.dtype)
        x = x + self.position(positions.reshape(-1, 2)).view(batch, tokens, self.in_features)
        attention_mask = None
        if mask is not None:
            # A sequence made only of padding would attend to nothing (NaN); let it attend to
            # itself instead — its outputs are zeroed below anyway.
            attention_mask = mask | ~mask.any(dim=-1, keepdim=True)
        prediction = self.head(self.transformer(x, attention_mask))
        if mask is not None:
            prediction = prediction.masked_fill(~mask.unsqueeze(-1), 0.0)
        return {"prediction": prediction.squeeze(0) if unbatched else prediction}


def coordinate_frame(coords: np.ndarray, groups: Sequence | np.ndarray | None = None) -> dict[str, list[float]]:
    """Per-section origin and length used to scale pixel coordinates in :func:`paper_features`.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres (x, y) in full-resolution pixels (``obsm['spatial']``).
    groups
        Section of each spot; ``None`` treats all spots as one section (key ``""``).

    Returns
    -------
    ``{section: [x0, y0, extent]}`` with the section's lower-left corner and the longer side of
    its bounding box (1 when all spots coincide). Store it with a model so that spots added
    later (super-resolution) are scaled exactly like the measured ones.
    """
    coords, labels = _check_coords(coords, groups)
    frame = {}
    for label in dict.fromkeys(labels):
        points = coords[labels == label]
        low = points.min(axis=0)
        extent = float(np.ptp(points, axis=0).max())
        frame[str(label)] = [float(low[0]), float(low[1]), extent if extent > 0 else 1.0]
    return frame


def _check_coords(coords, groups) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(f"coords have shape {coords.shape}; expected (N, 2) spot centres (x, y) in pixels.")
    if not np.isfinite(coords[:, :2]).all():
        raise InputError("coords contain NaN or infinite values; drop or fix those spots first.")
    labels = np.full(len(coords), "", dtype=object) if groups is None else np.asarray(groups).astype(str)
    if labels.shape != (len(coords),):
        raise InputError(f"groups has shape {labels.shape}; expected one section label per spot ({len(coords)},).")
    return coords[:, :2], labels


def paper_features(
    embeddings: np.ndarray,
    coords: np.ndarray,
    rgb_mean: np.ndarray,
    *,
    groups: Sequence | np.ndarray | None = None,
    frame: dict[str, Sequence[float]] | None = None,
) -> np.ndarray:
    """Assemble the paper's per-spot descriptor: encoder feature ‖ pixel coordinates ‖ RGB mean.

    Raw pixel coordinates (thousands) would dominate every LayerNorm and the residual stream
    next to encoder features of order one, so they are rescaled per section to
    ``(c - origin) / extent`` — values in [0, 1] across the section, the same for x and y so
    the aspect ratio is kept. RGB means (0–255) are divided by 255.

    Parameters
    ----------
    embeddings
        ``(N, D)`` encoder features (D = 1024 for UNI).
    coords
        ``(N, 2)`` spot centres (x, y) in full-resolution pixels.
    rgb_mean
        ``(N, 3)`` mean R, G, B (0–255) of each spot's crop.
    groups
        Section of each spot (``obs['library_id']``); ``None`` = one section.
    frame
        Scaling from :func:`coordinate_frame`; default computed from ``coords``. Pass the frame
        of the training spots when featurising new spots of the same sections.

    Returns
    -------
    float32 ``(N, D + 5)``.
    """
    coords, labels = _check_coords(coords, groups)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    rgb_mean = np.asarray(rgb_mean, dtype=np.float32)
    n = len(coords)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise InputError(f"embeddings have shape {embeddings.shape}; expected ({n}, D), one row per spot.")
    if rgb_mean.shape != (n, 3):
        raise InputError(f"rgb_mean has shape {rgb_mean.shape}; expected ({n}, 3) mean R, G, B per spot.")
    if frame is None:
        frame = coordinate_frame(coords, labels if groups is not None else None)
    scaled = np.empty((n, 2), dtype=np.float32)
    for label in dict.fromkeys(labels):
        if str(label) not in frame:
            raise InputError(
                f"section {label!r} is missing from frame (it has {sorted(frame)}); compute the frame "
                f"with coordinate_frame(...) on spots that include this section."
            )
        x0, y0, extent = frame[str(label)]
        rows = labels == label
        scaled[rows] = (coords[rows] - np.array([x0, y0])) / extent
    return np.concatenate([embeddings, scaled, rgb_mean / 255.0], axis=1).astype(np.float32)


# -- the paper's descriptor from pp.embed's output ----------------------------------------------
from collections.abc import Mapping  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from .._constants import Obs, Uns  # noqa: E402
from .._errors import MissingKeyError  # noqa: E402
from ..pp._embed import EXTRA_FEATURES, FUNCTION, extra_key  # noqa: E402

if TYPE_CHECKING:
    from anndata import AnnData


def histosge_features(
    adata: AnnData, key: str = "X_uni", *, frame: Mapping[str, Sequence[float]] | None = None
) -> np.ndarray:
    """HisToSGE's paper descriptor: the embedding with the spot's coordinates and RGB mean appended.

    Needs ``pp.embed(..., key_added=key, extra_features=("coords", "rgb_mean"))`` (any order).
    The five values are appended as :func:`sthisto.models.histosge.paper_features` defines
    them: coordinates rescaled per section to [0, 1] (``(c - origin) / extent``, raw pixels
    would swamp features of order one), RGB means divided by 255. A 1024-d UNI embedding
    becomes 1029-d.

    Parameters
    ----------
    adata
        AnnData embedded by :func:`sthisto.pp.embed`.
    key
        ``obsm`` key of the embedding.
    frame
        Per-section coordinate scaling (:func:`sthisto.models.histosge.coordinate_frame`);
        default: computed from these spots. Pass the training spots' frame for new spots.

    Returns
    -------
    float32 ``(n_obs, D + 5)``: ``[features..., x, y, R, G, B]``.
    """
    if key not in adata.obsm:
        raise MissingKeyError(f"adata.obsm[{key!r}] is missing; run sthisto.pp.embed(adata, ..., key_added={key!r}).")
    records = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {})
    columns = [str(c) for c in np.atleast_1d(records.get(key, {}).get("extra_columns", []))]
    if not columns:  # extras computed on their own, beside features made elsewhere (embed_extras)
        columns = [str(c) for c in np.atleast_1d(records.get(extra_key(key), {}).get("extra_columns", []))]
    needed = [*EXTRA_FEATURES["coords"], *EXTRA_FEATURES["rgb_mean"]]
    if extra_key(key) not in adata.obsm or not set(needed) <= set(columns):
        raise MissingKeyError(
            f"obsm[{extra_key(key)!r}] with coordinates and RGB means is missing; re-run "
            f"sthisto.pp.embed(adata, ..., key_added={key!r}, extra_features=('coords', 'rgb_mean'), overwrite=True)."
        )
    extra = np.asarray(adata.obsm[extra_key(key)])
    coords = extra[:, [columns.index(c) for c in EXTRA_FEATURES["coords"]]]
    rgb = extra[:, [columns.index(c) for c in EXTRA_FEATURES["rgb_mean"]]]
    embedded = np.isfinite(coords).all(axis=1)
    if not embedded.all():
        raise InputError(
            f"{int((~embedded).sum())} spots have no embedding (their library was left out of pp.embed); "
            f"subset to the embedded spots first: adata[np.isfinite(adata.obsm[{key!r}]).all(axis=1)]."
        )
    groups = adata.obs[Obs.LIBRARY_ID].astype(str).to_numpy()
    return paper_features(np.asarray(adata.obsm[key]), coords, rgb, groups=groups, frame=frame)


# -- the registered method ---------------------------------------------------------------------
from typing import Any  # noqa: E402

from ._planning import Section  # noqa: E402
from ._protocol import ExpressionModel  # noqa: E402
from ._registry import register_method  # noqa: E402
from .layers.sequences import SpotSequences  # noqa: E402


@register_method
class HisToSGE(ExpressionModel):
    """HisToSGE: one self-attention block over sequences of ~50 spots' image features.

    Faithful to Shi et al. (2024), with the differences of the authors' code behind
    ``variant="reference"`` (see :class:`HisToSGENet`):

    - features: ``encoder="uni"`` by default (ViT-L/16 like UNI; give ``encoder_weights=`` a
      local UNI checkpoint — gated weights cannot be downloaded here, random weights are used
      and said so otherwise), on a 50 px crop at her2st's resolution (≈34.5 µm); the paper
      variant appends the spot's pixel coordinates (rescaled per section, the frame stored
      with the model) and the crop's RGB mean: 1029 values; the reference variant uses the
      1024-d feature only. Precomputed features (``features_key=``) are used as given: only
      the coordinates and RGB means are computed, into ``obsm[f"{features_key}_extra"]``,
      over the field of view of their ``pp.embed`` record (else ``patch_size_um=``, else
      34.5 µm).
    - sequences: spots are split into chunks of ``chunk_size`` (50) in AnnData order
      (``chunk_mode="order"``, the authors') or spatially contiguous chunks
      (``chunk_mode="spatial"``); unequal chunks are padded and masked (the authors' code
      crashes on them).
    - training: MSE on log1p(normalize_total 1e4) (``target="log1p_1e4_total"``), Adam 1e-3,
      1000 full-batch epochs (all chunks of all training sections in one step).
    - evaluation protocol: ``sthisto.tl.cross_validate(..., split="spots")`` holds out 50%
      of a section's spots and scores those only.
    """

    name = "histosge"
    # The tiny variant also swaps the ViT-L encoder for offline handcrafted features, so tests and
    # quick trials never run a 300 M-parameter encoder with random weights.
    variants = {"tiny": {"heads": 2, "dim_head": 16, "mlp_dim": 64, "head_hidden": 64, "encoder": "handcrafted"}}
    input_kind = "features"
    uses_positions = True
    default_loss = "mse"
    reference = "Shi et al., HisToSGE, 2024"
    network_class = HisToSGENet
    batching = "sequences"
    data_defaults = {
        "encoder": "uni",
        "target": "log1p_1e4_total",
        "chunk_size": 50,
        "chunk_mode": "order",
    }
    training_defaults = {"lr": 1e-3, "max_epochs": 1000}

    @classmethod
    def configure(cls, adata, *, genes, train_index, params):
        """Choose the embedding extras by variant, then configure as every method does."""
        variant = params.get("variant", "paper")
        params = {"extra_features": ("coords", "rgb_mean") if variant == "paper" else (), **params}
        model = super().configure(adata, genes=genes, train_index=train_index, params=params)
        model.network_params.setdefault("variant", variant)
        if variant == "paper":
            from ..pp._patches import library_ids, spot_coordinates

            model.extra["frames"] = coordinate_frame(
                spot_coordinates(adata)[train_index], library_ids(adata)[train_index]
            )
        return model

    def build_network(self):
        """The network's input width is the feature width found in the data."""
        params = dict(self.network_params)
        params.setdefault("in_features", self.data_params.get("features_dim"))
        self.network_params = params
        return self.create_network(n_genes=len(self.genes), **params)

    @classmethod
    def feature_matrix(cls, adata, data: Mapping[str, Any], frames: Mapping | None = None) -> np.ndarray:
        """Paper variant: embedding ‖ coordinates ‖ RGB mean; reference: the embedding."""
        if not data.get("extra_features"):
            return np.asarray(adata.obsm[data["features_key"]], dtype=np.float32)
        from ..pp._patches import library_ids, spot_coordinates

        if frames is not None:  # keep the training frame for its sections, new ones get their own
            missing = set(library_ids(adata)) - set(frames)
            if missing:
                rows = np.isin(library_ids(adata), sorted(missing))
                frames = {**frames, **coordinate_frame(spot_coordinates(adata)[rows], library_ids(adata)[rows])}
        return histosge_features(adata, data["features_key"], frame=frames)

    def sequences(self, sections: list[Section]) -> tuple[SpotSequences, dict[str, torch.Tensor]]:
        """Concatenate sections and lay their spots out as padded sequences."""
        tensors = {k: torch.cat([s.tensors[k] for s in sections]) for k in sections[0].tensors if k != "edge_index"}
        groups = np.concatenate([[s.library_id] * s.n_spots for s in sections])
        layout = SpotSequences.from_spots(
            len(groups),
            coords=tensors["positions"].numpy().astype(float),
            groups=groups,
            chunk_size=int(self.data_params["chunk_size"]),
            mode=self.data_params["chunk_mode"],
        )
        return layout, tensors

    def training_items(self, sections: list[Section]):
        """All chunks of all sections in one full batch (the paper's full-batch epochs)."""
        layout, tensors = self.sequences(sections)
        mask = torch.as_tensor(layout.mask)
        item = {k: layout.pad(v) for k, v in tensors.items() if k != "loss_mask"}
        item["mask"] = mask
        loss_mask = tensors.get("loss_mask")
        item["loss_mask"] = mask & layout.pad(loss_mask, fill=False) if loss_mask is not None else mask
        return [item], None

    def predict_section(self, section: Section, *, device) -> np.ndarray:
        """Predict a section's spots chunk by chunk and return them in spot order."""
        layout, tensors = self.sequences([section])
        self.network.eval()
        with torch.inference_mode():
            out = self.network(
                features=layout.pad(tensors["features"]).to(device),
                positions=layout.pad(tensors["positions"]).to(device),
                mask=torch.as_tensor(layout.mask).to(device),
            )["prediction"]
        return layout.unpad(out.float().cpu()).numpy()
