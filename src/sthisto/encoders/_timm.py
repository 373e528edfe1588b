"""Encoders built from timm models: random weights, local checkpoints, or a model hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._compat import import_timm
from .._errors import InputError, MissingKeyError
from .._logging import logger
from ._checkpoint import file_fingerprint, load_weights_strict, read_state_dict
from ._encoder import Encoder
from ._provenance import weights_provenance

HUB_PREFIX = "hf-hub:"
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_timm_model(name: str) -> bool:
    """Whether ``name`` (optionally ``timm:<name>``) is a timm architecture."""
    timm = import_timm()
    name = name.removeprefix("timm:")
    try:
        return bool(timm.is_model(name))
    except Exception:  # pragma: no cover - very old timm
        return name in timm.list_models()


def _create_model(architecture: str, *, seed: int, model_kwargs: dict[str, Any], meta: bool = False) -> nn.Module:
    timm = import_timm()
    kwargs = {"num_classes": 0, **model_kwargs}
    # Random weights must be reproducible: cached features are reused only for the same seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if meta:
                with torch.device("meta"):
                    return timm.create_model(architecture, pretrained=False, **kwargs)
            return timm.create_model(architecture, pretrained=False, **kwargs)
        except TypeError as err:
            raise InputError(f"timm model {architecture!r} does not accept the arguments {kwargs}: {err}") from err


def _create_with_weights(architecture: str, state: dict, *, origin: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """Build ``architecture`` and load ``state`` strictly, skipping the (slow) random initialisation.

    The model is built on the ``meta`` device and the checkpoint tensors are assigned. Models
    holding non-persistent buffers (absent from checkpoints) are built normally instead.
    """
    # Assigned tensors keep their dtype: bring half-precision checkpoints to the fp32 a normal load gives.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = _create_model(architecture, seed=0, model_kwargs=model_kwargs, meta=True)
    probe = _classifier_prefixes(model)
    load_weights_strict(model, state, origin=origin, ignore_prefixes=probe, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = _create_model(architecture, seed=0, model_kwargs=model_kwargs)
        load_weights_strict(model, state, origin=origin, ignore_prefixes=probe)
    return model


def _data_config(model: nn.Module, pretrained_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Input size, mean, std and interpolation timm declares for ``model``."""
    import_timm()
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=pretrained_cfg or None, model=model)
    size = int(config["input_size"][-1])
    # create_model(img_size=...) changes the network but not its pretrained_cfg
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(getattr(model, "patch_embed", None), "dynamic_img_size", False):
        size = int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    return {
        "input_size": size,
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": interpolation,
    }


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if classifier is None:
        return ()
    names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return tuple(f"{name}." for name in names)


def _output_dim(model: nn.Module) -> int | None:
    for attribute in ("head_hidden_size", "num_features"):
        value = getattr(model, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def timm_encoder(
    architecture: str,
    *,
    weights: str | os.PathLike | None = None,
    token: str | None = None,
    seed: int = 0,
    name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """Build an encoder from a timm architecture.

    Parameters
    ----------
    architecture
        A timm model name (``timm.list_models()``), optionally prefixed ``timm:``, or a hub id
        ``hf-hub:<org>/<name>`` whose ``config.json`` names the architecture.
    weights
        ``None``: random initialisation (seeded by ``seed``; logged as random). A local path:
        ``.safetensors`` or a ``torch.save`` file, loaded with strict key matching. A hub id:
        downloaded with ``token`` (see :func:`hub_encoder`).
    token
        Hub access token for gated models.
    seed
        Seed of the random initialisation.
    name
        Encoder name; default the architecture.
    cache_dir
        Hub cache folder (default: huggingface_hub's).
    **model_kwargs
        Passed to ``timm.create_model`` (e.g. ``depth=``, ``img_size=``, ``init_values=``).
        ``num_classes`` defaults to 0 so the model returns features.

    Returns
    -------
    The encoder, on the CPU.
    """
    architecture = str(architecture).removeprefix("timm:")
    if architecture.startswith(HUB_PREFIX):
        return hub_encoder(architecture, token=token, name=name, cache_dir=cache_dir, **model_kwargs)
    if weights is not None and str(weights).startswith(HUB_PREFIX):
        return hub_encoder(str(weights), token=token, name=name, cache_dir=cache_dir, **model_kwargs)
    if not is_timm_model(architecture):
        raise InputError(
            f"{architecture!r} is not a timm model name. See timm.list_models('<pattern>') for names, "
            f"or use a registered encoder (sthisto.encoders.list_encoders())."
        )
    if weights is None:
        model = _create_model(architecture, seed=seed, model_kwargs=model_kwargs)
        description = f"random (seed {seed})"
        fingerprint = f"random:{architecture}:{seed}:{sorted(model_kwargs.items())}"
        provenance = weights_provenance("random", seed=seed, architecture=architecture)
        logger.warning(
            "encoder %r uses RANDOM weights (seed %d): features carry no pretrained knowledge. Pass "
            "weights='<local checkpoint>' or a hub id for pretrained features.",
            architecture,
            seed,
        )
    else:
        path = Path(weights).expanduser()
        model = _create_with_weights(architecture, read_state_dict(path), origin=str(path), model_kwargs=model_kwargs)
        description = str(path)
        fingerprint = file_fingerprint(path)
        provenance = weights_provenance("file", path=path)
        logger.info("encoder %r: loaded weights from %s", architecture, path)
    return _wrap(model, name=name or architecture, weights=description, fingerprint=fingerprint, provenance=provenance)


def _wrap(
    model: nn.Module, *, name: str, weights: str, fingerprint: str, provenance: dict, **overrides: Any
) -> Encoder:
    model.eval()
    config = _data_config(model, overrides.pop("pretrained_cfg", None))
    config.update({k: v for k, v in overrides.items() if v is not None})
    output_dim = _output_dim(model)
    return Encoder.from_module(
        model,
        name=name,
        output_dim=output_dim,
        weights=weights,
        weights_fingerprint=fingerprint,
        provenance=provenance,
        channels_last=True,
        **config,
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(hub_id: str, reason: str) -> InputError:
    return InputError(
        f"could not get {hub_id!r} from the Hugging Face hub: {reason}. Download the weights on a "
        f"machine with access (accepting the model's licence and using your token), then pass the "
        f"local file: get_encoder(<name>, weights='/path/to/pytorch_model.bin') (or .safetensors)."
    )


def hub_encoder(
    hub_id: str,
    *,
    token: str | None = None,
    name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """Build an encoder from a timm model on the Hugging Face hub (``hf-hub:<org>/<name>``).

    Downloads the repository's ``config.json`` (timm format: ``architecture``, ``model_args``,
    ``pretrained_cfg``) and its weights (``model.safetensors`` or ``pytorch_model.bin``), both
    with ``token`` (needed for gated models such as UNI), then loads the weights strictly.
    Files already in the local hub cache are used without network. Offline (``HF_HUB_OFFLINE=1``)
    and not cached, it fails at once, telling the user to pass a local path instead.

    Parameters
    ----------
    hub_id
        ``"hf-hub:<org>/<name>"``.
    token
        Hub access token (default: huggingface_hub's stored login / ``HF_TOKEN``).
    name
        Encoder name; default the repository name.
    cache_dir, revision
        Passed to ``huggingface_hub.hf_hub_download``.
    **model_kwargs
        Extra ``timm.create_model`` arguments (they override the hub config's ``model_args``).

    Returns
    -------
    The encoder, on the CPU.
    """
    if not str(hub_id).startswith(HUB_PREFIX):
        raise InputError(f"hub ids look like 'hf-hub:<org>/<name>'; got {hub_id!r}.")
    repo_id = hub_id[len(HUB_PREFIX) :]
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

    def download(filename: str) -> str:
        return huggingface_hub.hf_hub_download(
            repo_id, filename, token=token, cache_dir=cache_dir, revision=revision, local_files_only=offline
        )

    try:
        config_path = download("config.json")
        with open(config_path) as handle:
            hub_config = json.load(handle)
        weights_path, missing = None, None
        for filename in _HUB_WEIGHT_FILES:
            try:
                weights_path = download(filename)
                break
            except EntryNotFoundError as err:  # includes LocalEntryNotFoundError (not cached)
                missing = err
        if weights_path is None and isinstance(missing, LocalEntryNotFoundError):
            raise missing
    except GatedRepoError as err:
        raise _hub_error(hub_id, "the model is gated and the token (if any) has no access; accept its terms") from err
    except RepositoryNotFoundError as err:
        raise _hub_error(hub_id, "repository not found, or private and no valid token was given") from err
    except LocalEntryNotFoundError as err:
        reason = (
            "the hub is offline (HF_HUB_OFFLINE=1) and the files are not in the local cache"
            if offline
            else ("the hub cannot be reached and the files are not in the local cache")
        )
        raise _hub_error(hub_id, reason) from err
    except (OSError, ValueError) as err:
        raise _hub_error(hub_id, f"{type(err).__name__}: {err}") from err
    if weights_path is None:
        raise _hub_error(hub_id, f"the repository has none of {_HUB_WEIGHT_FILES}")
    architecture = hub_config.get("architecture")
    if not architecture:
        raise _hub_error(hub_id, "its config.json names no timm 'architecture'")
    kwargs = {**hub_config.get("model_args", {}), **model_kwargs}
    model = _create_with_weights(architecture, read_state_dict(weights_path), origin=hub_id, model_kwargs=kwargs)
    snapshot = Path(weights_path).parent.name  # huggingface_hub caches files under snapshots/<commit>/
    logger.info("encoder %r: loaded weights from the hub (%s, revision %s)", architecture, hub_id, snapshot)
    return _wrap(
        model,
        name=name or repo_id.split("/")[-1].lower(),
        weights=hub_id,
        fingerprint=f"hub:{repo_id}@{snapshot}",
        provenance=weights_provenance("hub", hub_id=hub_id, revision=snapshot, path=weights_path),
        pretrained_cfg=hub_config.get("pretrained_cfg"),
    )


def check_local_weights(weights) -> None:
    """Raise early when ``weights`` names a local file that is absent."""
    if weights is None or str(weights).startswith(HUB_PREFIX):
        return
    if not Path(weights).expanduser().is_file():
        raise MissingKeyError(
            f"weights file {str(weights)!r} does not exist. Pass a local checkpoint path, a hub id "
            f"'hf-hub:<org>/<name>' (with token= for gated models), or weights=None for random weights."
        )
