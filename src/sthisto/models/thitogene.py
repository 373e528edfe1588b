"""THItoGene (Jia et al., Brief Bioinform 2023): dynamic convolution, capsules, transformer, graph attention.

Per section of ``N`` spots (one section = one batch):

1. **Omni-dimensional dynamic convolution** 3 → 16 channels, kernel 4, stride 4, 4 candidate
   kernels, ReLU: ``112 × 112`` → ``16 × 28 × 28`` (:class:`~sthisto.models.layers.odconv.ODConv2d`).
2. **Efficient-CapsNet**: conv stack 16→32 (5×5) → 64 (3×3) → 64 (3×3) → 128 (3×3, stride 2),
   each conv → BatchNorm → ReLU, → ``128 × 9 × 9``; depthwise 9×9 → 16 primary capsules × 8;
   self-attention routing → 20 capsules × 64 (:mod:`~sthisto.models.layers.capsules`).
3. **Tokens**: the 20 capsules plus an x and a y position token (64-d each, learnable tables),
   concatenated: 22 × 64 = 1408 values per spot; token dropout 0.2.
4. **Transformer** over the section's spots: 4 pre-LayerNorm blocks (cSCC: 8), 16 heads × 64,
   MLP 2048, GELU, dropout 0.2 after the attention projection and in the MLP (none on the
   attention weights), no CLS token, no final norm.
5. **Graph attention** on the directed 4-NN graph (no self-loops): 8 heads × 1024, ELU,
   concatenated → 8192; one head 8192 → 512, ELU. LeakyReLU 0.01 in the scores, dropout 0.2
   on inputs and attention, softmax over each spot's neighbours (paper eqs. 13–15); per paper
   eq. 16 each head combines the spot's own projected feature with the neighbour aggregate
   through a weight and a bias (the authors' code, ``variant="reference"``, keeps the
   aggregate alone).
6. **Head**: Linear 512 → 1024 → ReLU → LayerNorm → Linear → G.

Parameters: ``THItoGeneNet(785)`` (paper) 80,896,920 and ``THItoGeneNet(171, depth=8)``
126,446,898; with ``variant="reference"`` 63,586,712 and 109,136,690, the counts of the
authors' modules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .._errors import InputError
from .layers.capsules import EfficientCapsNet
from .layers.graph_attention import GraphAttention
from .layers.odconv import ODConv2d
from .layers.position import GridPositionEmbedding
from .layers.transformer import Dropout, Transformer

Variant = Literal["paper", "reference"]
VARIANTS: tuple[str, ...] = ("paper", "reference")

TINY_CONFIG = {
    "odconv_channels": 4,
    "capsnet_channels": (8, 8, 8, 16),
    "primary_dim": 4,
    "capsules": 4,
    "capsule_dim": 8,
    "depth": 1,
    "heads": 2,
    "dim_head": 8,
    "mlp_dim": 32,
    "gat_heads": 2,
    "gat_dim": 16,
    "gat_out": 16,
    "head_hidden": 32,
}
"""A small network with THItoGene's layout, for tests and quick trials (``thitogene_tiny``)."""

PATCH_SIZE = 112
"""Side of the square patch THItoGene's encoder takes (the conv stack collapses it to 1 × 1)."""


class THItoGeneEncoder(nn.Module):
    """Patch encoder: ODConv (stride = kernel) → ReLU → Efficient-CapsNet → capsules ``(B, caps, dim)``.

    Parameters
    ----------
    odconv_channels
        Output channels of the dynamic convolution (16).
    capsnet_channels
        Channels of the capsule network's conv stack (32, 64, 64, 128).
    primary_dim
        Dims per primary capsule (8; 128 / 8 = 16 primary capsules).
    capsules, capsule_dim
        Output capsules (20 × 64).
    block_size
        Patches per computation block (see :meth:`forward`); a speed setting only.
    """

    def __init__(
        self,
        *,
        odconv_channels: int = 16,
        capsnet_channels: Sequence[int] = (32, 64, 64, 128),
        primary_dim: int = 8,
        capsules: int = 20,
        capsule_dim: int = 64,
        block_size: int = 128,
    ) -> None:
        super().__init__()
        self.block_size = int(block_size)
        self.odconv = ODConv2d(3, odconv_channels, 4, stride=4, kernel_num=4, temperature=1.0)
        self.capsnet = EfficientCapsNet(
            odconv_channels,
            channels=tuple(capsnet_channels),
            primary_dim=primary_dim,
            out_capsules=capsules,
            out_dim=capsule_dim,
            input_relu=True,
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Encode uint8/float patches ``(B, 3, 112, 112)`` (raw 0–255) into capsules.

        The batch runs in blocks of at most :attr:`block_size` patches, layer by layer, with
        BatchNorm statistics over the whole batch: the result does not depend on the block size.
        """
        n_blocks = max(1, math.ceil(patches.shape[0] / self.block_size))
        blocks = list(torch.tensor_split(patches, n_blocks))
        # The ReLU after the dynamic convolution is fused into the capsule network's first conv.
        return torch.cat(self.capsnet.forward_blocks(self.odconv.forward_blocks(blocks)))


@contextlib.contextmanager
def _frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Let BatchNorm layers normalise with batch statistics without updating their running ones.

    Used while activation checkpointing recomputes a chunk in the backward pass, so the
    running statistics are updated once per chunk, as without checkpointing.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = 1·running + 0·batch: exactly unchanged
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


class THItoGeneNet(nn.Module):
    """THItoGene network: patches, grid positions and the spot graph of one section → expression.

    Parameters
    ----------
    n_genes
        Number of predicted genes G.
    n_positions
        Size of each position table; grid coordinates must lie in ``[0, n_positions)`` (64 for
        legacy ST; derive it from the data for Visium).
    depth
        Transformer blocks (HER2+: 4, cSCC: 8).
    heads, dim_head
        Transformer attention heads and their width (16 × 64).
    mlp_dim
        Transformer MLP width (2048).
    dropout
        Dropout in the transformer's attention and MLP (0.2).
    token_dropout
        Dropout on the tokens entering the transformer (0.2).
    capsules, capsule_dim
        Output capsules of the encoder (20 × 64); the position tokens have ``capsule_dim``
        values too, so tokens are ``(capsules + 2) · capsule_dim`` wide.
    odconv_channels, capsnet_channels, primary_dim
        Encoder widths (16; 32, 64, 64, 128; 8). Change them only for small test networks.
    gat_heads, gat_dim
        First graph-attention layer: heads × width per head (8 × 1024), concatenated.
    gat_out
        Width of the single-head second graph-attention layer (512).
    gat_dropout
        Dropout on the graph-attention inputs and coefficients (0.2).
    gat_negative_slope
        LeakyReLU slope of the attention scores (0.01).
    head_hidden
        Hidden width of the prediction head (1024).
    variant
        ``"paper"`` (default) or ``"reference"``; see Notes.
    gat_self_term
        Paper eq. 16 in both graph-attention layers: ``ω_h [W_h x_i ‖ Σ_j α_ij W_h x_j] + β_h``
        per head (:class:`~sthisto.models.layers.graph_attention.GraphAttention`,
        ``self_term=True``). Default: on for ``"paper"``, off for ``"reference"`` (the code
        uses the neighbour aggregate only).
    encoder_chunk_size
        Largest batch of patches the encoder normalises together in training; larger
        sections are encoded in chunks under activation checkpointing (see Memory).
    encoder_block_size
        Patches per computation block inside the encoder (a speed setting; results do not
        depend on it, see :class:`THItoGeneEncoder`).
    checkpoint_above
        In training, sections with more spots than this recompute each transformer block and
        the first graph-attention layer in the backward pass instead of storing their
        activations (``None``: never).

    Notes
    -----
    **Batch contract.** ``forward(patches, positions, edge_index)``: ``patches`` uint8 (or
    float) ``(N, 3, 112, 112)``, raw 0–255, converted to float inside, no normalisation;
    ``positions`` int64 ``(N, 2)``, columns (x, y) = (array_col, array_row); ``edge_index``
    int64 ``(2, E)``, row 0 the neighbour (source), row 1 the target. Returns
    ``{"prediction": (N, G) float}``.

    **Variants.** In the network the authors' code differs from the paper in the graph
    attention: the paper's eq. 16 concatenates the spot's own feature with the neighbour
    aggregate and applies a weight ``ω`` and a bias ``β``; the code returns the neighbour
    aggregate alone. ``variant="reference"`` builds the code's layers (63,586,712 parameters at
    785 genes); the default adds, per head of both layers, ``ω_h`` ``(width, 2 · width)`` and
    ``β_h`` (17,310,208 more at the default widths). Outside the network the code also
    transposes patches to (c, x, y) (``PatchSpec(layout="cwh")``, handled by the patch source)
    and differs in seeds and the absence of validation.

    **Unspecified details, decided here.** Capsule conv order conv → BN → ReLU (as the method
    description says; Efficient-CapsNet's own code uses conv → ReLU → BN). Graph attention
    projections without bias terms and with one ``(2 · width)`` attention vector per head —
    the parameterisation that reproduces the authors' counts. Eq. 16's "own feature" is read
    as the head's projection ``W_h x_i`` of the layer input, with one ``ω_h``, ``β_h`` per head
    (how heads share them is sthisto's choice). A spot without incoming edges (a
    section of ≤ 1 spot, or a graph that leaves a spot out) receives a zero neighbour
    aggregate: with eq. 16 its output still carries its own feature; in the reference its
    prediction depends on its transformer token only through the head's biases. kNN graphs
    give every spot ``k`` neighbours.

    **Memory.** Activation memory grows linearly with the section (never ``N²``), and on
    large sections it is bounded by recomputation. Every technique computes the same function
    (identical up to float rounding), except the BatchNorm note in the first:

    * *Encoder chunking with activation checkpointing.* Patches go through the encoder at most
      ``encoder_chunk_size`` at a time. In evaluation this only bounds memory. In training a
      section larger than one chunk is encoded chunk by chunk under activation checkpointing:
      only each chunk's uint8 patches and its capsules (1280 values per spot) are kept, and
      the backward pass recomputes one chunk at a time, so at most one chunk's conv
      activations are alive. The recomputation costs one extra encoder forward (about 10% of
      a training step); BatchNorm running statistics are updated once per chunk, not again
      during recomputation. BatchNorm in training normalises with the statistics of its
      chunk (ghost batch normalisation); for sections of at most ``encoder_chunk_size`` spots
      — every HER2+ and cSCC section at the default 1024 — that is the whole section, as in
      the paper, and nothing is recomputed.
    * *Lean encoder activations.* Each BatchNorm → ReLU → convolution step keeps only its
      input and recomputes normalisation and ReLU in the backward pass
      (:func:`~sthisto.models.layers.capsules.norm_relu_conv`); the dynamic convolution keeps
      the uint8 patches, not their float copy. About half the conv-stack memory.
    * *Attention.* Self-attention never stores ``N × N`` per head: the attention weights are
      not dropped (as in the paper and the authors' code; dropout follows the output
      projection), so PyTorch's fused kernel serves training and evaluation on CPU and GPU
      (timm's ``Attention``, :mod:`sthisto.models.layers.transformer`).
    * *Recomputing wide layers.* Sections above ``checkpoint_above`` spots (default 2048)
      also recompute each transformer block and the 8192-wide graph-attention layer in the
      backward pass (about a third more time in those layers), so only their inputs are kept.
    * *Sparse graph attention.* torch-geometric's ``GATConv`` works over the edges; nothing
      ``N × N`` is formed (it gathers one message per edge, see
      :mod:`~sthisto.models.layers.graph_attention`).

    **Speed** (CPU). Beyond the above: the encoder computes in blocks of
    ``encoder_block_size`` spots, layer by layer, with BatchNorm statistics gathered over all
    blocks (exact; about a quarter less encoder time on a 700-spot section, mostly fewer page
    faults from huge fresh allocations); the dynamic convolution folds its four attentions
    into one kernel per spot and runs as one batched matrix product over non-overlapping
    tiles; the conv stack runs channels-last; capsule routing is three batched contractions
    without an ``in × in`` agreement matrix; the token dropout's masks are drawn four per
    64-bit random word (``keep_mask``), ~8× faster than ``bernoulli_``. Train with
    ``torch.optim.Adam(..., fused=True)`` (a fifth of the default Adam's time on CPU).
    The step is dominated by dense matrix products and convolutions (136 GFLOP for a
    forward + backward over 180 spots; 118 with the reference's graph attention), which run at 100 GFLOP/s or more on two AVX2 cores;
    ``benchmarks/thitogene_step.py`` prints this arithmetic floor beside the measured step.

    Examples
    --------
    >>> net = THItoGeneNet(785)
    >>> out = net(patches, positions, edge_index)  # patches uint8 (N, 3, 112, 112)
    >>> out["prediction"].shape
    torch.Size([N, 785])
    """

    input_keys: tuple[str, ...] = ("patches", "positions", "edge_index")

    def __init__(
        self,
        n_genes: int,
        *,
        n_positions: int = 64,
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int = 2048,
        dropout: float = 0.2,
        token_dropout: float = 0.2,
        capsules: int = 20,
        capsule_dim: int = 64,
        odconv_channels: int = 16,
        capsnet_channels: Sequence[int] = (32, 64, 64, 128),
        primary_dim: int = 8,
        gat_heads: int = 8,
        gat_dim: int = 1024,
        gat_out: int = 512,
        gat_dropout: float = 0.2,
        gat_negative_slope: float = 0.01,
        head_hidden: int = 1024,
        variant: Variant = "paper",
        gat_self_term: bool | None = None,
        encoder_chunk_size: int = 1024,
        encoder_block_size: int = 128,
        checkpoint_above: int | None = 2048,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"variant={variant!r} is not a THItoGene variant; use one of {VARIANTS}.")
        if int(n_genes) < 1:
            raise InputError(f"n_genes={n_genes!r}; a network needs at least one gene to predict.")
        for name, value in (("encoder_chunk_size", encoder_chunk_size), ("encoder_block_size", encoder_block_size)):
            if int(value) < 1:
                raise InputError(f"{name}={value!r} must be a positive number of spots.")
        self.n_genes = int(n_genes)
        self.variant = variant
        self.encoder_chunk_size = int(encoder_chunk_size)
        self.checkpoint_above = checkpoint_above
        self.token_dim = (capsules + 2) * capsule_dim
        self.gat_self_term = (variant == "paper") if gat_self_term is None else bool(gat_self_term)

        self.encoder = THItoGeneEncoder(
            odconv_channels=odconv_channels,
            capsnet_channels=capsnet_channels,
            primary_dim=primary_dim,
            capsules=capsules,
            capsule_dim=capsule_dim,
            block_size=encoder_block_size,
        )
        self.position = GridPositionEmbedding(n_positions, capsule_dim, mode="concat")
        self.token_dropout = Dropout(token_dropout)
        self.transformer = Transformer(
            self.token_dim, depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout
        )
        self.gat = GraphAttention(
            self.token_dim,
            gat_dim,
            heads=gat_heads,
            concat=True,
            negative_slope=gat_negative_slope,
            dropout=gat_dropout,
            self_term=self.gat_self_term,
        )
        self.gat_out = GraphAttention(
            gat_heads * gat_dim,
            gat_out,
            heads=1,
            concat=False,
            negative_slope=gat_negative_slope,
            dropout=gat_dropout,
            self_term=self.gat_self_term,
        )
        self.head = nn.Sequential(
            nn.Linear(gat_out, head_hidden),
            nn.ReLU(),
            nn.LayerNorm(head_hidden),
            nn.Linear(head_hidden, self.n_genes),
        )

    @classmethod
    def tiny(cls, n_genes: int, **overrides) -> THItoGeneNet:
        """A small network with THItoGene's layout, for tests and quick trials (~17 k parameters at 10 genes).

        Narrow encoder (ODConv 3 → 4, conv stack 8-8-8-16, 4 capsules × 8), one transformer
        block (2 heads × 8, MLP 32), graph attention 2 heads × 16 → 16, head 32. Keyword
        arguments override any of these.
        """
        params = dict(TINY_CONFIG)
        params.update(overrides)
        return cls(n_genes, **params)

    # --- forward -------------------------------------------------------------------------
    def forward(
        self, patches: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Predict expression for the ``N`` spots of one section.

        Parameters
        ----------
        patches
            uint8 or float ``(N, 3, 112, 112)``, raw 0–255.
        positions
            int64 ``(N, 2)`` grid coordinates, columns (x, y).
        edge_index
            int64 ``(2, E)``: row 0 neighbour (source), row 1 target.

        Returns
        -------
        ``{"prediction": (N, n_genes)}``.
        """
        n_spots = self._check_inputs(patches, positions, edge_index)
        position_tokens = self.position(positions)  # validates the coordinates before any work
        tokens = torch.cat((self.encode(patches), position_tokens.to(self.token_dtype)), dim=1)
        x = self.token_dropout(tokens.reshape(n_spots, self.token_dim))
        graph = edge_index.long()
        if self._recompute(n_spots):
            x = x.unsqueeze(0)
            for block in self.transformer.layers:
                x = checkpoint(block, x, None, use_reentrant=False)
            x = checkpoint(self._graph_attention, x.squeeze(0), graph, use_reentrant=False)
        else:
            x = self._graph_attention(self.transformer(x), graph)
        x = F.elu(self.gat_out(x, graph))
        return {"prediction": self.head(x)}

    def _graph_attention(self, x: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        return F.elu(self.gat(x, graph))

    def _recompute(self, n_spots: int) -> bool:
        limit = self.checkpoint_above
        return limit is not None and n_spots > limit and self.training and torch.is_grad_enabled()

    @property
    def token_dtype(self) -> torch.dtype:
        """Floating dtype of the network's parameters."""
        return self.head[0].weight.dtype

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Capsules ``(N, capsules, capsule_dim)`` of ``patches``, at most ``encoder_chunk_size`` at a time.

        In training with gradients, a section larger than one chunk is encoded under
        activation checkpointing (see the class notes).
        """
        n_chunks = math.ceil(patches.shape[0] / self.encoder_chunk_size)
        if n_chunks <= 1:
            return self.encoder(patches)
        chunks = torch.tensor_split(patches, n_chunks)  # balanced sizes: no tiny BatchNorm batch
        if not torch.is_grad_enabled():
            return torch.cat([self.encoder(chunk) for chunk in chunks])
        return torch.cat([self._checkpointed_encoder(chunk) for chunk in chunks])

    def _checkpointed_encoder(self, chunk: torch.Tensor) -> torch.Tensor:
        calls = 0

        def run(x: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self.encoder(x)
            with _frozen_batchnorm_statistics(self.encoder):  # the backward's recomputation
                return self.encoder(x)

        return checkpoint(run, chunk, use_reentrant=False, preserve_rng_state=False)

    def _check_inputs(self, patches: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor) -> int:
        if patches.dim() != 4 or tuple(patches.shape[1:]) != (3, PATCH_SIZE, PATCH_SIZE):
            raise InputError(
                f"THItoGene takes patches of shape (N, 3, {PATCH_SIZE}, {PATCH_SIZE}), got {tuple(patches.shape)}. "
                f"Cut {PATCH_SIZE}-pixel patches (PatchSpec(size_px={PATCH_SIZE}))."
            )
        if patches.dtype != torch.uint8 and not patches.is_floating_point():
            raise InputError(f"patches must be uint8 or float (raw 0–255 values), got {patches.dtype}.")
        n_spots = patches.shape[0]
        if n_spots == 0:
            raise InputError("the section has no spots; drop empty sections before calling the network.")
        if positions.shape != (n_spots, 2) or positions.is_floating_point():
            raise InputError(
                f"positions must be integer (N, 2) grid coordinates (x, y) for the {n_spots} patches, "
                f"got {positions.dtype} {tuple(positions.shape)}."
            )
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.is_floating_point():
            raise InputError(
                f"edge_index must be an integer (2, E) tensor (row 0 source, row 1 target), got "
                f"{edge_index.dtype} {tuple(edge_index.shape)}."
            )
        if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n_spots):
            raise InputError(
                f"edge_index refers to spots outside [0, {n_spots - 1}]; build the graph on this section's "
                f"spots only (indices into its rows)."
            )
        return n_spots


# -- the registered method ---------------------------------------------------------------------
from ._protocol import ExpressionModel  # noqa: E402
from ._registry import register_method  # noqa: E402

HER2ST_PATCH_UM = 77.0
"""The paper's field of view: 112 px at her2st's ≈0.688 µm/px."""


@register_method
class THItoGene(ExpressionModel):
    """THItoGene: dynamic convolution, capsules, transformer and graph attention per section.

    Jia et al. (Brief Bioinform 2023). One whole section per optimisation step (section order
    shuffled each epoch); target ``log10(1 + 1e4 · counts / selected-gene total)`` (the released
    code's; ``target="ln_1e6"`` is the paper text's); MSE; Adam 1e-5 without weight decay or
    scheduler; 300 epochs, last epoch kept (or the best validation epoch with ``validation=``);
    no augmentation. Patches are 112 px over 77 µm (112 px at her2st's resolution, resampled
    for other scanners). The graph is the directed 4-NN on array coordinates without self-loops.
    Position tables have 64 entries or more when the training data's grid needs it.

    Under ``recipe="small_data"`` it trains on random spatial sub-sections of
    ``subsection_spots`` spots (default 64), ``subsections_per_epoch`` per epoch (default: as
    many as cover the fitted spots once), instead of whole sections; see
    :mod:`sthisto.engine._subsections`. ``subsection_spots=<n>`` asks for them under the paper
    recipe too, ``False`` for whole sections.

    ``variant="reference"`` reproduces the authors' code where it differs: graph attention on
    the neighbour aggregate only (the paper's eq. 16 adds the spot's own feature, see
    :class:`THItoGeneNet`), patches transposed to (channels, x, y) and cut at native pixels.
    Reference-code quirks not reproduced: one global seed for all folds (sthisto seeds each
    fold), no validation.

    Memory on large sections: the convolution + capsule encoder runs over chunks of spots and is
    recomputed in the backward pass above ``checkpoint_above`` spots, attention uses fused
    kernels that never hold the N × N score matrix, and graph attention works over the edges.
    """

    name = "thitogene"
    # small_data_lr: measured on her2st for the tiny network (docs/methods.md, "Training recipes");
    # the full network's is 10 x the paper's rate, a transformer of 80M parameters being less forgiving
    variants = {"tiny": {**TINY_CONFIG, "small_data_lr": 3e-3}}
    input_kind = "pixels"
    needs_graph = True
    section_wide = True
    uses_positions = True
    default_loss = "mse"
    reference = "Jia et al., THItoGene, Brief Bioinform 2023"
    network_class = THItoGeneNet
    batching = "section"
    data_defaults = {
        "patch_size_px": PATCH_SIZE,
        "patch_size_um": HER2ST_PATCH_UM,
        "target": "log10_1e4",
        "graph_neighbors": 4,
    }
    training_defaults = {
        "lr": 1e-5,
        "max_epochs": 300,
        "subsection_spots": None,
        "subsections_per_epoch": None,
        "small_data_lr": 1e-4,
    }

    @classmethod
    def configure(cls, adata, *, genes, train_index, params):
        """The reference variant also cuts native-pixel, transposed patches, as the code does."""
        params = dict(params)
        if params.get("variant") == "reference":
            params.setdefault("patch_layout", "cwh")
            params.setdefault("patch_size_um", None)
        return super().configure(adata, genes=genes, train_index=train_index, params=params)
