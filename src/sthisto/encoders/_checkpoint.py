"""Load encoder weights from local checkpoint files, strictly and without unpickling objects."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._errors import InputError, MissingKeyError
from .._logging import logger

# Wrappers that training frameworks put around a model: DataParallel/DDP ("module."),
# Lightning / generic wrappers ("model."), torch.compile ("_orig_mod."), SSL frameworks.
COMMON_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.", "trunk.")

# Keys under which checkpoints commonly nest the weights.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "student", "network")

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file.

    ``torch.load`` runs with ``weights_only=True``, so a checkpoint can never execute code.
    Checkpoints nesting the weights under ``state_dict`` / ``model`` / ... are unwrapped.

    Parameters
    ----------
    path
        Local file.

    Returns
    -------
    Mapping of parameter names to tensors (on the CPU).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingKeyError(
            f"weights file {str(path)!r} does not exist. Pass the path of a local checkpoint "
            f"(.safetensors, .pth, .bin, .pt), a hub id 'hf-hub:<org>/<name>', or weights=None for random weights."
        )
    if path.suffix.lower() in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:
            raise InputError(f"could not read {str(path)!r} as a safetensors file: {err}") from err
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): {err}. sthisto never "
            f"unpickles arbitrary objects; re-save the weights as a plain state dict "
            f"(torch.save(model.state_dict(), path)) or as safetensors."
        ) from err
    return _unwrap(loaded, str(path))


def _unwrap(loaded, origin: str) -> dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping) and not _is_flat_tensor_map(loaded):
        nested = [key for key in _NESTED_KEYS if isinstance(loaded.get(key), Mapping)]
        if not nested:
            break
        loaded = loaded[nested[0]]
    if not isinstance(loaded, Mapping) or not _is_flat_tensor_map(loaded):
        raise InputError(
            f"{origin} does not hold a state dict (a mapping of parameter names to tensors, possibly "
            f"nested under one of {_NESTED_KEYS}). Save the weights with torch.save(model.state_dict(), path)."
        )
    return dict(loaded)


def _is_flat_tensor_map(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes shared by every key, as long as doing so improves the match."""
    stripped: list[str] = []
    changed = True
    while changed and not expected.issuperset(state):
        changed = False
        for prefix in COMMON_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                candidate = {key[len(prefix) :]: value for key, value in state.items()}
                if len(expected.intersection(candidate)) >= len(expected.intersection(state)):
                    state, changed = candidate, True
                    stripped.append(prefix)
                    break
    return state, stripped


def load_weights_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    origin: str = "checkpoint",
    ignore_prefixes: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Load ``state`` into ``module``, requiring every key and shape to match.

    Wrapper prefixes (``module.``, ``model.``, ...) shared by every key are removed first.

    Parameters
    ----------
    module
        Network to load into.
    state
        Parameter name → tensor.
    origin
        What the weights are (a path, a hub id), for error messages.
    ignore_prefixes
        Checkpoint keys starting with these are dropped when the module has no such
        parameters (a classification head the feature extractor does not use).
    assign
        Use the checkpoint's tensors as the parameters (``load_state_dict(assign=True)``), as
        needed for a module built on the ``meta`` device.

    Raises
    ------
    InputError
        Listing missing keys, unexpected keys and shape mismatches, when any.
    """
    expected = module.state_dict()
    state, stripped = _strip_prefixes(dict(state), set(expected))
    if stripped:
        logger.info("%s: removed wrapper prefix(es) %s from checkpoint keys", origin, stripped)
    dropped = [k for k in state if k not in expected and any(k.startswith(p) for p in ignore_prefixes)]
    if dropped:
        logger.info("%s: ignored %d classifier-head key(s) the encoder does not use: %s", origin, len(dropped), dropped)
        state = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {label} key(s): {shown}")
        raise InputError(
            f"the weights in {origin} do not fit the encoder architecture — "
            + "; ".join(parts)
            + ". Check that the checkpoint belongs to this model and configuration (name, depth, width, "
            "image size), or build the matching architecture (e.g. pass the model's keyword arguments)."
        )
    module.load_state_dict(state, strict=True, assign=assign)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identify a weights file cheaply: resolved path, size and modification time."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.numpy().tobytes())
    return f"params:{digest.hexdigest()}"
