"""Networks and encoders built from model cards (:mod:`._cards`).

timm architectures are created from the card's arguments; the two families timm does not have
are built here from their papers' and published configurations' facts: CONCH's CoCa vision
tower (a ViT trunk whose tokens are pooled by one learned query through cross-attention) and
CTransPath (a Swin-T whose patch embedding is a small convolutional stem).

Weights come from a local file (safetensors, or ``torch.load(weights_only=True)``) or from the
hub id of the card, downloaded with ``token=``; no code from a hub is ever run.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._compat import import_timm
from .._errors import InputError
from .._logging import logger
from ._cards import CARDS, EncoderCard
from ._checkpoint import file_fingerprint, load_weights_strict, read_state_dict
from ._encoder import Encoder
from ._provenance import weights_provenance

HUB_PREFIX = "hf-hub:"


# --------------------------------------------------------------------------- CONCH
class AttentionalPooler(nn.Module):
    """Learned queries attending over a token sequence (CoCa's attentional pooler).

    Queries and tokens are layer-normalised separately, projected without bias, attended with
    ``heads`` heads, and projected back to ``dim``. Parameter names follow the published CONCH
    checkpoints so that their weights load.

    Parameters
    ----------
    dim
        Width of the queries and of the output.
    context_dim
        Width of the tokens attended over.
    heads
        Attention heads (``dim`` must divide by it).
    queries
        Number of learned queries (CONCH's contrastive pooler: 1).
    """

    def __init__(self, dim: int, context_dim: int, *, heads: int = 8, queries: int = 1) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"attentional pooler: dim={dim} is not divisible by heads={heads}.")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, context_dim)`` → ``(B, queries, dim)``."""
        batch = tokens.shape[0]
        query = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        key, value = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        return self.to_out(attended.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH's image encoder up to its pooled image latent.

    A timm ViT trunk returns all its tokens (class token included, after the final norm); one
    learned query pools them by cross-attention and a LayerNorm follows. The contrastive
    projection and the captioning pooler of the full CoCa model are not part of the embedding.

    Parameters
    ----------
    trunk
        timm architecture of the trunk.
    trunk_kwargs
        Its ``timm.create_model`` arguments.
    dim
        Width of the pooled latent (CONCH v1: 512, v1.5: 768).
    heads
        Pooler heads.
    """

    def __init__(self, trunk: str, trunk_kwargs: Mapping[str, Any], *, dim: int, heads: int = 8) -> None:
        super().__init__()
        timm = import_timm()
        self.trunk = timm.create_model(trunk, pretrained=False, num_classes=0, global_pool="", **dict(trunk_kwargs))
        self.attn_pool_contrast = AttentionalPooler(dim, self.trunk.num_features, heads=heads, queries=1)
        self.ln_contrast = nn.LayerNorm(dim)
        self.out_features = dim

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All trunk tokens ``(B, N, width)`` the pooler attends over."""
        return self.trunk.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.attn_pool_contrast(self.tokens(images))[:, 0]
        return self.ln_contrast(pooled)


# --------------------------------------------------------------------------- CTransPath
class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3×3 conv–BN–ReLU stages and a 1×1 projection.

    Replaces Swin's 4×4 patchify convolution; the stages have ``embed_dim / 8`` and
    ``embed_dim / 4`` channels. Output is channels-last ``(B, H/4, W/4, embed_dim)`` as timm's
    Swin expects.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer=None,
        **_: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise InputError("CTransPath's convolutional stem needs patch_size=4 and embed_dim divisible by 8.")
        size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size = tuple(size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        channels_in, channels_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [
                nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels_out),
                nn.ReLU(inplace=True),
            ]
            channels_in, channels_out = channels_out, channels_out * 2
        layers.append(nn.Conv2d(channels_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


def _ctranspath(**kwargs: Any) -> nn.Module:
    timm = import_timm()
    arguments = {"embed_layer": ConvStem, "num_classes": 0, **kwargs}
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **arguments)


# --------------------------------------------------------------------------- pooling wrapper
class TokenPooling(nn.Module):
    """A ViT backbone whose token sequence is pooled by a card's rule.

    ``"cls+mean_patch"``: the class token concatenated with the mean of the patch tokens,
    register tokens excluded (Virchow, Virchow2). The backbone's weights are loaded into
    :attr:`backbone` (its own key names).
    """

    def __init__(self, backbone: nn.Module, rule: str) -> None:
        super().__init__()
        if rule != "cls+mean_patch":
            raise InputError(f"TokenPooling supports 'cls+mean_patch'; got {rule!r}.")
        self.backbone = backbone
        self.rule = rule
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        patches = tokens[:, self.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


# --------------------------------------------------------------------------- building
def _resolve(value: Any) -> Any:
    """Dotted class paths in card arguments (``"torch.nn.SiLU"``) → the class."""
    if isinstance(value, str) and value.count(".") >= 2 and value.split(".")[0] in ("timm", "torch"):
        module, _, attribute = value.rpartition(".")
        if module.split(".")[0] == "timm":
            import_timm()
        return getattr(importlib.import_module(module), attribute)
    return value


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def card_kwargs(card: EncoderCard, *, tiny: bool = False, overrides: Mapping[str, Any] | None = None) -> dict:
    """The architecture arguments of ``card`` (scaled down when ``tiny``), plus ``overrides``."""
    kwargs = dict(card.model_kwargs)
    if tiny:
        kwargs = _merge(kwargs, card.tiny_kwargs)
    return _merge(kwargs, overrides or {})


def build_network(
    card: EncoderCard | str, *, tiny: bool = False, seed: int = 0, **overrides: Any
) -> tuple[nn.Module, nn.Module]:
    """Build the network a card describes, with random weights.

    Works under ``with torch.device("meta")`` (no memory is allocated then).

    Parameters
    ----------
    card
        An :class:`EncoderCard` or a card name.
    tiny
        Apply the card's ``tiny_kwargs`` (fewer blocks, same output width) for tests.
    seed
        Seed of the random initialisation.
    **overrides
        Architecture arguments replacing the card's.

    Returns
    -------
    ``(network, weights_module)``: the network computing the pooled embedding, and the module
    a checkpoint's keys refer to (the backbone inside a pooling wrapper, else the network).
    """
    if isinstance(card, str):
        card = CARDS[card]
    kwargs = {key: _resolve(value) for key, value in card_kwargs(card, tiny=tiny, overrides=overrides).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if card.architecture == "sthisto:conch":
            network = ConchVisionTower(
                kwargs.pop("trunk"), kwargs.pop("trunk_kwargs", {}), dim=kwargs.pop("dim"), **kwargs
            )
            return network, network
        if card.architecture == "sthisto:ctranspath":
            network = _ctranspath(**kwargs)
            return network, network
        if card.architecture.startswith("sthisto:"):
            raise InputError(f"card {card.name!r} ({card.architecture}) is built by its own registry factory.")
        timm = import_timm()
        try:
            backbone = timm.create_model(card.architecture, pretrained=False, **{"num_classes": 0, **kwargs})
        except TypeError as err:
            raise InputError(f"timm model {card.architecture!r} does not accept {sorted(kwargs)}: {err}") from err
    if card.pooling == "cls+mean_patch":
        return TokenPooling(backbone, card.pooling), backbone
    return backbone, backbone


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on meta tensors)."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- checkpoints
def _transformers_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``ViTModel`` / ``Dinov2Model`` state dict to timm's ViT names.

    Separate query/key/value projections are stacked into timm's fused ``qkv``; the mask token
    of DINOv2 (a training-only parameter) is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "reg_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    inner = {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    for key, value in state.items():
        key = key.removeprefix("vit.").removeprefix("dinov2.")
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            continue
        if key in simple:
            out[simple[key]] = value
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[:2] != ["encoder", "layer"]:
            out[key] = value  # left as is: reported as unexpected if it does not fit
            continue
        block, rest = int(parts[2]), ".".join(parts[3:])
        if rest.startswith("attention.attention."):
            projection, kind = rest.split(".")[-2:]
            fused.setdefault((block, kind), {})[projection] = value
            continue
        stem, _, kind = rest.rpartition(".")
        target = inner.get(stem) if stem in inner else inner.get(rest)
        if target is None:
            out[key] = value
        elif stem in inner:
            out[f"blocks.{block}.{target}.{kind}"] = value
        else:
            out[f"blocks.{block}.{target}"] = value
    for (block, kind), pieces in fused.items():
        if set(pieces) != {"query", "key", "value"}:
            raise InputError(f"block {block}: the checkpoint lacks some of query/key/value ({sorted(pieces)}).")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([pieces["query"], pieces["key"], pieces["value"]])
    return out


def prepare_state(card: EncoderCard, state: Mapping[str, torch.Tensor], *, origin: str) -> dict[str, torch.Tensor]:
    """Bring a published checkpoint to the key names of the network :func:`build_network` makes.

    Keeps the vision tower's keys (``checkpoint_prefix``), converts transformers layouts, and
    drops the keys the embedding does not use (``checkpoint_ignore``; logged). What remains is
    matched strictly: every missing, unexpected or mis-shaped key is reported.
    """
    state = dict(state)
    if card.checkpoint_prefix and any(key.startswith(card.checkpoint_prefix) for key in state):
        outside = [key for key in state if not key.startswith(card.checkpoint_prefix)]
        if outside:
            logger.info(
                "%s: kept the %r keys of the vision tower, ignored %d other key(s) (e.g. %s)",
                origin,
                card.checkpoint_prefix,
                len(outside),
                outside[:3],
            )
        state = {k[len(card.checkpoint_prefix) :]: v for k, v in state.items() if k.startswith(card.checkpoint_prefix)}
    if card.weights_format == "transformers" and any(k.startswith(("embeddings.", "vit.", "dinov2.")) for k in state):
        state = _transformers_to_timm(state)
        logger.info("%s: converted transformers key names to timm's", origin)
    # Swin's relative-position index and attention masks are buffers rebuilt from the config
    state = {k: v for k, v in state.items() if not k.endswith(("attn_mask", "relative_position_index"))}
    dropped = [k for k in state if any(k.startswith(p) for p in card.checkpoint_ignore)]
    if dropped:
        logger.info("%s: ignored %d key(s) the embedding does not use: %s", origin, len(dropped), dropped[:8])
        state = {k: v for k, v in state.items() if k not in dropped}
    return state


def _fit_position_embeddings(module: nn.Module, state: dict[str, torch.Tensor], *, origin: str) -> None:
    """Resample absolute position embeddings saved for another image grid (in place).

    Checkpoints are often saved at the pre-training grid (e.g. CONCH v1.5's 224 px) while the
    card builds the network at its inference size (448 px); the patch grid is interpolated
    (timm's ``resample_abs_pos_embed``), prefix tokens kept, and a log line says so.
    """
    expected = module.state_dict()
    for key, value in list(state.items()):
        if not key.endswith("pos_embed") or key not in expected:
            continue
        target = expected[key]
        if value.shape == target.shape or value.ndim != 3 or value.shape[-1] != target.shape[-1]:
            continue
        owner = module.get_submodule(key.rpartition(".")[0]) if "." in key else module
        grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
        if grid is None:
            continue
        prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 1))
        side = math.isqrt(value.shape[1] - prefix)
        if side * side != value.shape[1] - prefix or target.shape[1] - prefix != grid[0] * grid[1]:
            continue  # not a square grid of patches: left to the strict report
        import_timm()
        from timm.layers import resample_abs_pos_embed

        state[key] = resample_abs_pos_embed(value, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
        logger.info("%s: resampled %s from a %d×%d to a %d×%d patch grid", origin, key, side, side, *grid)


def load_card_weights(card: EncoderCard, module: nn.Module, path: str | os.PathLike, *, origin: str | None = None):
    """Read a checkpoint file and load it strictly into ``module`` (see :func:`prepare_state`)."""
    origin = origin or str(path)
    state = prepare_state(card, read_state_dict(path), origin=origin)
    _fit_position_embeddings(module, state, origin=origin)
    expected = module.state_dict()
    state = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in state.items()}
    load_weights_strict(module, state, origin=origin)


def download_card_weights(
    card: EncoderCard,
    hub_id: str,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> tuple[Path, str]:
    """Download a card's weight file from the hub (never its code); ``(path, revision)``."""
    from ._timm import _hub_error, _hub_offline

    repo_id = hub_id.removeprefix(HUB_PREFIX)
    # the card's file first; repositories often hold the other of the two common names instead
    filenames = [card.hub_filename] if card.hub_filename else []
    filenames += [name for name in ("model.safetensors", "pytorch_model.bin") if name not in filenames]
    try:
        import huggingface_hub
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with timm
        raise _hub_error(hub_id, "huggingface_hub is not installed") from err
    offline = _hub_offline()
    filename, path, last_error = filenames[0], None, None
    try:
        for filename in filenames:
            try:
                path = huggingface_hub.hf_hub_download(
                    repo_id, filename, token=token, cache_dir=cache_dir, revision=revision, local_files_only=offline
                )
                break
            except EntryNotFoundError as err:  # includes LocalEntryNotFoundError: try the next name
                last_error = err
        if path is None:
            raise last_error
    except GatedRepoError as err:
        raise _hub_error(hub_id, "the model is gated and the token (if any) has no access; accept its terms") from err
    except RepositoryNotFoundError as err:
        raise _hub_error(hub_id, "repository not found, or private and no valid token was given") from err
    except LocalEntryNotFoundError as err:
        where = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
        raise _hub_error(hub_id, f"{where} and none of {filenames} is in the local cache") from err
    except EntryNotFoundError as err:
        raise _hub_error(hub_id, f"the repository has none of {filenames}") from err
    except (OSError, ValueError) as err:
        raise _hub_error(hub_id, f"{type(err).__name__}: {err}") from err
    return Path(path), Path(path).parent.name


# --------------------------------------------------------------------------- encoders
def card_encoder(
    card: EncoderCard | str,
    *,
    weights: str | os.PathLike | None = None,
    token: str | None = None,
    seed: int = 0,
    tiny: bool = False,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """An :class:`Encoder` with a card's network, weights, preprocessing and pooling.

    Parameters
    ----------
    card
        An :class:`EncoderCard` or card name.
    weights
        ``None``: random weights (seeded; logged and warned by ``pp.embed``). A local file
        (``.safetensors`` or a ``torch.save`` file read with ``weights_only=True``). A hub id
        ``"hf-hub:<org>/<name>"`` (``"hub"`` for the card's own), downloaded with ``token``.
    token
        Hub token (gated models).
    seed
        Seed of a random initialisation.
    tiny
        Scaled-down network (tests, demos).
    cache_dir, revision
        Hub download options.
    **model_kwargs
        Architecture arguments replacing the card's.

    Returns
    -------
    The encoder, on the CPU.
    """
    if isinstance(card, str):
        card = CARDS[card]
    if weights == "hub":
        if card.hub_id is None:
            raise InputError(f"{card.name!r} has no hub id (see its card's notes); pass a local weights file.")
        weights = card.hub_id
    network, target = build_network(card, tiny=tiny, seed=seed, **model_kwargs)
    if weights is None:
        description = f"random (seed {seed})"
        fingerprint = f"random:{card.name}:{seed}:{tiny}:{sorted(model_kwargs.items())}"
        provenance = weights_provenance("random", seed=seed, architecture=card.name)
        logger.warning(
            "encoder %r uses RANDOM weights (seed %d): features carry no pretrained knowledge. Pass weights= "
            "(a local file, or %s with token=).",
            card.name,
            seed,
            card.hub_id or "a hub id",
        )
    elif str(weights).startswith(HUB_PREFIX):
        path, snapshot = download_card_weights(card, str(weights), token=token, cache_dir=cache_dir, revision=revision)
        load_card_weights(card, target, path, origin=str(weights))
        description = str(weights)
        fingerprint = f"hub:{str(weights).removeprefix(HUB_PREFIX)}@{snapshot}"
        provenance = weights_provenance("hub", hub_id=str(weights), revision=snapshot, path=path)
        logger.info("encoder %r: loaded weights from the hub (%s, revision %s)", card.name, weights, snapshot)
    else:
        path = Path(weights).expanduser()
        load_card_weights(card, target, path)
        description = str(path)
        fingerprint = file_fingerprint(path)
        provenance = weights_provenance("file", path=path)
        logger.info("encoder %r: loaded weights from %s", card.name, path)
    return wrap_card_network(card, network, weights=description, weights_fingerprint=fingerprint, provenance=provenance)


def wrap_card_network(card: EncoderCard, network: nn.Module, **options: Any) -> Encoder:
    """An :class:`Encoder` running ``network`` with ``card``'s preprocessing (``options``: weights fields)."""
    return Encoder.from_module(
        network,
        name=card.name,
        input_size=card.input_size,
        mean=card.mean,
        std=card.std,
        input_range="0-1",
        output_dim=card.output_dim,
        pool="avg" if card.architecture == "resnet50" else None,
        interpolation=card.interpolation,
        patch_size_um=card.patch_size_um,
        channels_last=True,
        **options,
    )
