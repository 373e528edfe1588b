"""The encoder registry: named encoders, timm names, hub ids and user callables → :class:`Encoder`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._errors import InputError
from .._logging import logger
from ._cards import CARDS, EncoderCard
from ._encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder
from ._handcrafted import HANDCRAFTED_FEATURE_NAMES, HandcraftedFeatures
from ._timm import HUB_PREFIX, check_local_weights, hub_encoder, is_timm_model, timm_encoder

if TYPE_CHECKING:
    import pandas as pd

UNI_HUB_ID = "hf-hub:MahmoodLab/UNI"
"""Hub id of UNI (gated: accept its terms on the hub and pass ``token=``)."""

HISTOSGE_PATCH_UM = 34.5
"""HisToSGE's field of view: a 50 × 50 px crop on her2st/cSCC images at ≈0.69 µm/px (50 × 0.69 µm)."""

HEST_PATCH_UM = 112.0
"""HEST-Benchmark's field of view: 224 px at 0.5 µm/px (20×), the ridge baseline's default."""

HISTOSPACE_TILE_PX = 128
"""HistoSPACE's tile side in pixels."""

Factory = Callable[..., Encoder]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    description: str
    builtin: bool
    card: EncoderCard | None = None


_REGISTRY: dict[str, _Entry] = {}

# Encoders that a method defines and registers itself (its module calls ``register_encoders()``
# when imported). The registry imports that module by name on first request, so the encoders
# layer never imports the methods' code (see the import layers in docs/architecture.md).
_PROVIDED_BY: dict[str, str] = {"histospace": "sthisto.models.histospace"}


def _load_provided(name: str | None = None) -> None:
    """Import the module registering ``name`` (every provider for ``None``) unless it is registered."""
    import importlib

    for provided, module in _PROVIDED_BY.items():
        if (name is None or name == provided) and provided not in _REGISTRY:
            importlib.import_module(module).register_encoders()


def register_encoder(name: str, factory: Factory, *, description: str = "", overwrite: bool = False) -> None:
    """Register a named encoder so that ``get_encoder(name)`` and ``pp.embed(encoder=name)`` find it.

    Parameters
    ----------
    name
        Registry name.
    factory
        Called as ``factory(weights=..., token=..., seed=..., **kwargs)`` (it may ignore what it
        does not use, but must accept them) and returns an :class:`Encoder`.
    description
        One line shown by :func:`list_encoders`.
    overwrite
        Replace an existing registration of the same name.

    Examples
    --------
    >>> def my_factory(*, weights=None, token=None, seed=0, **kwargs):
    ...     return Encoder.from_state_dict(MyNet(), weights, name="mynet", input_size=96)
    >>> register_encoder("mynet", my_factory, description="my lab's CNN")
    """
    if not isinstance(name, str) or not name or name.startswith(HUB_PREFIX) or name.startswith("timm:"):
        raise InputError(f"encoder name {name!r} must be a non-empty string not starting with 'hf-hub:' or 'timm:'.")
    if not callable(factory):
        raise InputError(f"factory for {name!r} must be callable and return an Encoder.")
    _load_provided(name)
    if name in _REGISTRY and not overwrite:
        raise InputError(f"encoder {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[name] = _Entry(factory, description, builtin=False)


def _register_builtin(name: str, factory: Factory, description: str | None = None) -> None:
    card = CARDS.get(name)
    _REGISTRY[name] = _Entry(factory, description or (card.description if card else ""), builtin=True, card=card)


CARD_COLUMNS = (
    "family",
    "output_dim",
    "param_count",
    "param_count_source",
    "architecture",
    "hub_id",
    "weights_format",
    "input_size",
    "interpolation",
    "mean",
    "std",
    "target_mpp",
    "fov_um",
    "patch_size_um",
    "pooling",
    "license",
    "gated",
    "commercial_use",
    "citation",
    "notes",
)
"""Model-card columns of :func:`list_encoders`, after ``name``, ``description``, ``builtin``."""


def list_encoders() -> pd.DataFrame:
    """Registered encoders with their model cards.

    Returns
    -------
    :class:`pandas.DataFrame`, one row per registered name: ``name``, ``description``,
    ``builtin``, then the model card (:data:`CARD_COLUMNS`: family, output dimension, parameter
    count and its source, architecture, hub id, checkpoint format, input size, resampling,
    mean/std, training µm/px and field of view, ``pp.embed``'s default ``patch_size_um``,
    pooling rule, licence, gated, commercial use, citation, notes). Encoders registered without
    a card have ``None`` there. Besides these names, :func:`get_encoder` accepts any timm model
    name, ``hf-hub:`` ids and callables.

    Examples
    --------
    >>> table = list_encoders()
    >>> table.loc[table["gated"] == False, ["name", "output_dim", "license"]]  # noqa: E712
    """
    import pandas as pd

    _load_provided()
    rows = []
    for name, entry in _REGISTRY.items():
        row = {"name": name, "description": entry.description, "builtin": entry.builtin}
        card = entry.card
        for column in CARD_COLUMNS:
            row[column] = None if card is None else getattr(card, column)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["name", "description", "builtin", *CARD_COLUMNS])
    return table.astype({"output_dim": "Int64", "param_count": "Int64", "input_size": "Int64"})


def get_encoder(
    spec: str | Encoder | Callable[[torch.Tensor], torch.Tensor] = "handcrafted",
    *,
    weights: str | os.PathLike | None = None,
    token: str | None = None,
    seed: int = 0,
    name: str | None = None,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    input_range: str | None = None,
    output_dim: int | None = None,
    pool: str | None = None,
    patch_size_um: float | None = None,
    **kwargs: Any,
) -> Encoder:
    """Resolve an encoder specification into an :class:`Encoder` (on the CPU).

    Parameters
    ----------
    spec
        * a registered name (:func:`list_encoders`): ``"handcrafted"`` (93 colour/texture
          features, no weights), ``"histospace"`` (a HistoSPACE encoder trained by the
          package; pass ``module=`` or ``weights=``), or a pathology foundation model by its
          model card (``"uni"``, ``"uni2_h"``, ``"conch_v1"``, ``"conch_v1_5"``, ``"virchow"``,
          ``"virchow2"``, ``"hoptimus0"``, ``"hoptimus1"``, ``"h0_mini"``, ``"gigapath"``,
          ``"phikon"``, ``"phikon_v2"``, ``"hibou_b"``, ``"hibou_l"``, ``"ctranspath"``,
          ``"lunit_vits8"``, ``"resnet50_imagenet"``): the card's architecture,
          preprocessing, pooling and field of view;
        * any timm model name (``"resnet50"``, ``"timm:vit_small_patch16_224"``), random or
          with ``weights``;
        * a hub id ``"hf-hub:<org>/<name>"`` (timm format), downloaded with ``token``;
        * an :class:`Encoder` (returned as is, with the overrides below applied);
        * any callable ``(B, 3, H, W) float → (B, D)``; then ``input_size`` is required and
          ``mean``/``std`` default to ImageNet's on a 0–1 scale.
    weights
        ``None``: random weights for timm models and cards (seeded, logged as random). A
        local checkpoint path (``.safetensors``, or a ``torch.save`` file read with
        ``weights_only=True``), matched strictly (missing and unexpected keys are listed). A
        hub id, or ``"hub"`` for a card's own hub id (only the weight file is downloaded;
        no hub code runs).
    token
        Hub access token (gated models such as UNI).
    seed
        Seed of random initialisations.
    name
        Encoder name (default: the registry name, timm architecture or callable name).
    input_size, mean, std, input_range, output_dim, pool, patch_size_um
        Override the preprocessing (see :class:`Encoder`); required for callables as noted.
    **kwargs
        Passed to the factory: ``timm.create_model`` arguments for timm names and cards
        (``depth=``, ``img_size=``, ...), ``tiny=True`` for a card's scaled-down network
        (tests, demos), ``module=`` / ``pooling=`` for ``"histospace"``, ``cache_dir=`` /
        ``revision=`` for hubs.

    Returns
    -------
    The :class:`Encoder`.

    Examples
    --------
    >>> enc = get_encoder("uni", weights="/models/uni/pytorch_model.bin")
    >>> enc = get_encoder("virchow2", weights="hub", token="hf_...")  # class token ⊕ mean patch token
    >>> enc = get_encoder("resnet18")  # random weights, logged as such
    >>> enc = get_encoder(my_net, input_size=112, mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    overrides = {
        "name": name,
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "input_range": input_range,
        "pool": pool,
        "patch_size_um": patch_size_um,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(spec, Encoder):
        if kwargs or weights is not None:
            raise InputError(
                "weights= and model arguments cannot be applied to an Encoder object; build it again instead."
            )
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        _load_provided(spec)
    if not isinstance(spec, str):
        if not callable(spec):
            raise InputError(
                f"encoder={spec!r} is neither a name nor a callable. Use one of {sorted({*_REGISTRY, *_PROVIDED_BY})}, a timm model "
                f"name, 'hf-hub:<org>/<name>', or a callable (B, 3, H, W) → (B, D)."
            )
        if weights is not None or kwargs:
            raise InputError(
                "weights= and model arguments apply to named encoders; load the weights into your module "
                "first, or use Encoder.from_state_dict(module, weights, ...)."
            )
        if input_size is None:
            raise InputError(
                "a callable encoder needs input_size= (the side of the square images it takes), and "
                "mean=/std= unless ImageNet normalisation of 0–1 inputs is right for it."
            )
        default_name = getattr(spec, "__name__", None) or type(spec).__name__
        return Encoder.from_module(
            spec,
            name=overrides.pop("name", default_name.lower()),
            input_size=overrides.pop("input_size"),
            mean=overrides.pop("mean", IMAGENET_MEAN),
            std=overrides.pop("std", IMAGENET_STD),
            output_dim=output_dim,
            **overrides,
        )
    if spec in _REGISTRY:
        encoder = _REGISTRY[spec].factory(weights=weights, token=token, seed=seed, **kwargs)
        if not isinstance(encoder, Encoder):
            raise InputError(f"the factory registered as {spec!r} returned {type(encoder).__name__}, not an Encoder.")
    elif spec.startswith(HUB_PREFIX):
        encoder = hub_encoder(spec, token=token, **kwargs)
    elif is_timm_model(spec):
        check_local_weights(weights)
        encoder = timm_encoder(spec, weights=weights, token=token, seed=seed, **kwargs)
    else:
        raise InputError(
            f"unknown encoder {spec!r}. Registered encoders: {sorted({*_REGISTRY, *_PROVIDED_BY})}; also accepted: any timm model "
            f"name (timm.list_models('<pattern>')), 'hf-hub:<org>/<name>', or a callable (B, 3, H, W) → (B, D)."
        )
    if output_dim is not None and output_dim != encoder.output_dim:
        raise InputError(f"output_dim={output_dim} but encoder {spec!r} produces {encoder.output_dim} features.")
    return encoder.replace(**overrides) if overrides else encoder


# --------------------------------------------------------------------------- built-ins
def _handcrafted(*, weights=None, token=None, seed=0, input_size: int = 112) -> Encoder:
    if weights is not None:
        raise InputError("the 'handcrafted' encoder has no weights; drop weights=.")
    return Encoder(
        model=HandcraftedFeatures(),
        name="handcrafted",
        output_dim=len(HANDCRAFTED_FEATURE_NAMES),
        input_size=input_size,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_range="0-255",
        weights="none (deterministic features)",
        weights_fingerprint="handcrafted:v1",
        patch_size_um=HEST_PATCH_UM,
        mixed_precision=False,
        channels_last=False,
        feature_names=HANDCRAFTED_FEATURE_NAMES,
    )


def _uni(*, weights=None, token=None, seed=0, **model_kwargs) -> Encoder:
    # UNI is a timm ViT-L/16 with LayerScale (init 1e-5), 1024-d class token, ImageNet mean/std.
    # timm's own pretrained_cfg for vit_large_patch16_224 says mean/std 0.5, hence the override.
    # Hub ids keep going through hub_encoder (timm-format config.json), as before the cards.
    card = CARDS["uni"]
    kwargs = {key: value for key, value in card.model_kwargs.items() if key not in ("img_size", "patch_size")}
    kwargs.update(model_kwargs)
    if weights == "hub":
        weights = card.hub_id
    if weights is not None and str(weights).startswith(HUB_PREFIX):
        encoder = hub_encoder(str(weights), token=token, name="uni", **kwargs)
    else:
        check_local_weights(weights)
        encoder = timm_encoder(card.architecture, weights=weights, seed=seed, name="uni", **kwargs)
    return encoder.replace(
        input_size=card.input_size,
        mean=card.mean,
        std=card.std,
        input_range="0-1",
        interpolation=card.interpolation,
        patch_size_um=card.patch_size_um,
    )


def _card_factory(card: EncoderCard) -> Factory:
    def factory(*, weights=None, token=None, seed=0, **kwargs) -> Encoder:
        from ._zoo import card_encoder

        if weights is not None and weights != "hub":
            check_local_weights(weights)
        return card_encoder(card, weights=weights, token=token, seed=seed, **kwargs)

    factory.__name__ = f"{card.name}_factory"
    return factory


_register_builtin("handcrafted", _handcrafted)
_register_builtin("uni", _uni)
for _name, _card in CARDS.items():
    if _name not in _REGISTRY and _name not in _PROVIDED_BY:
        _register_builtin(_name, _card_factory(_card))

logger.debug("encoder registry ready: %s", sorted(_REGISTRY))
