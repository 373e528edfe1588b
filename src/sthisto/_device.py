"""Device resolution: ``device="auto"`` means CUDA when present, else CPU."""

from __future__ import annotations

from ._errors import InputError


def resolve_device(device="auto"):
    """Return a :class:`torch.device` for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device.

    Parameters
    ----------
    device
        ``"auto"`` picks the first CUDA device when one is available, otherwise the CPU.

    Returns
    -------
    The resolved :class:`torch.device`.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device={device!r} is not a device name; use 'auto', 'cpu' or 'cuda[:index]'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} was asked for but CUDA is not available here; use device='auto' or 'cpu'.")
    return resolved


def lightning_accelerator(device="auto") -> tuple[str, list[int] | str | int]:
    """Translate a device argument into Lightning's ``(accelerator, devices)`` pair."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return "gpu", [resolved.index] if resolved.index is not None else 1
    return "cpu", 1
