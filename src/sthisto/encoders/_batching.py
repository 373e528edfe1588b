"""Batch sizes for embedding that fit the memory the machine has free.

On CPU the fastest batch is small (8–16 patches: larger ones push activations out of the cache),
but a large network on a machine already busy with a big AnnData can still run out of memory at
16. The rule here is: the measured-fastest size, lowered until the estimated activation memory
of one batch fits in half of the memory currently available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .._logging import logger

MEMORY_SHARE = 0.5
"""Share of the currently available memory one batch's activations may take."""

ACTIVATION_OVERHEAD = 3.0
"""Peak live memory per patch as a multiple of the largest single activation: in inference mode
a layer holds its input, its output and (attention, MLP) one intermediate of similar size."""


@dataclass(frozen=True)
class BatchPlan:
    """How :func:`cpu_batch_size` chose a batch size (recorded by ``pp.embed``)."""

    batch_size: int
    ceiling: int
    bytes_per_patch: int
    available_bytes: int | None

    def as_record(self) -> dict[str, int | str]:
        """Plain values for the embed record."""
        return {
            "batch_size_rule": "min(ceiling, memory share / activation bytes per patch)",
            "batch_size_ceiling": self.ceiling,
            "activation_bytes_per_patch": self.bytes_per_patch,
            "available_bytes": -1 if self.available_bytes is None else self.available_bytes,
        }


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes_per_patch(model: nn.Module | object, input_size: int) -> int:
    """Estimate the peak activation memory of one patch in inference mode.

    One patch goes through the model with a forward hook on every module; the largest tensor
    any module returns, times :data:`ACTIVATION_OVERHEAD`, plus the input itself, is the
    estimate. Attention matrices computed inside ``scaled_dot_product_attention`` are not
    module outputs; on CPU they are processed in blocks and stay below the token activations.
    """
    image = torch.zeros(1, 3, input_size, input_size)
    largest = image.numel() * image.element_size()
    if not isinstance(model, nn.Module):
        return int(largest * (1 + ACTIVATION_OVERHEAD))

    def track(_module, _inputs, output) -> None:
        nonlocal largest
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                largest = max(largest, tensor.numel() * tensor.element_size())

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    handles = [module.register_forward_hook(track) for module in model.modules()]
    try:
        with torch.inference_mode():
            model(image.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return int(largest * ACTIVATION_OVERHEAD + image.numel() * image.element_size())


def cpu_batch_size(
    model: nn.Module | object,
    input_size: int,
    *,
    ceiling: int,
    available_bytes: int | None = None,
) -> BatchPlan:
    """Choose the CPU batch size for ``model`` from the memory available now.

    Parameters
    ----------
    model
        The encoder's network (``Encoder.model``), already on the CPU.
    input_size
        Side of the model's input in pixels.
    ceiling
        The measured-fastest batch size; never exceeded.
    available_bytes
        Memory to plan with; default :func:`available_memory_bytes`.

    Returns
    -------
    The chosen size with the numbers behind it; ``ceiling`` when the free memory is unknown.
    """
    per_patch = activation_bytes_per_patch(model, input_size)
    if available_bytes is None:
        available_bytes = available_memory_bytes()
    if available_bytes is None:
        return BatchPlan(ceiling, ceiling, per_patch, None)
    fitting = int(MEMORY_SHARE * available_bytes // max(per_patch, 1))
    size = max(1, min(ceiling, fitting))
    if size < ceiling:
        logger.info(
            "embedding batch size %d instead of %d: %.0f MB available, ≈%.1f MB of activations per patch",
            size,
            ceiling,
            available_bytes / 2**20,
            per_patch / 2**20,
        )
    return BatchPlan(size, ceiling, per_patch, int(available_bytes))
