"""The arithmetic floor of a training step: its floating-point work over the machine's matmul rate.

A step-time target only makes sense if the step's arithmetic fits in it. The step scripts
count the floating-point operations of one training step (forward, backward) and measure,
in the same process and with the same threads, how fast this machine multiplies large float32
matrices, the fastest thing a CPU does. Their ratio is a lower bound on the step time of
*any* implementation of the same network in float32 on this machine; the gap between it and
the measured step is what engineering can still win.

PyTorch's :class:`~torch.utils.flop_counter.FlopCounterMode` has no formula for the CPU's
oneDNN LSTM kernels, so LSTM layers are counted from their shapes here (gates: one
``(input + hidden) × 4·hidden`` product per step and layer; backward twice the forward).
Element-wise work (activations, normalisation, dropout, the optimiser) is not counted, which
only makes the bound lower.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def matmul_gflops(*, sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 8) -> float:
    """Best float32 GFLOP/s of square matrix products with the current torch threads.

    The best over ``sizes`` and ``repeats``: the rate the machine reaches, not a typical one, so
    that the floor built on it is a true lower bound.
    """
    import torch

    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def step_gflops(network, step: Callable[[], None]) -> float:
    """Floating-point work of one call of ``step`` (a forward + backward of ``network``), in GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lstm_flops = 0.0

    def count_lstm(module: torch.nn.LSTM, args, output) -> None:
        nonlocal lstm_flops
        x = args[0]
        batch_first = module.batch_first
        steps = x.shape[1 if batch_first else 0] if x.dim() == 3 else x.shape[0]
        batch = x.shape[0 if batch_first else 1] if x.dim() == 3 else 1
        hidden = module.hidden_size
        directions = 2 if module.bidirectional else 1
        width_in = module.input_size
        forward = 0.0
        for _ in range(module.num_layers):
            forward += directions * 2.0 * batch * steps * (width_in + hidden) * 4 * hidden
            width_in = hidden * directions
        lstm_flops += forward * (3 if torch.is_grad_enabled() else 1)  # backward ≈ 2 × forward

    hooks = [m.register_forward_hook(count_lstm) for m in network.modules() if isinstance(m, torch.nn.LSTM)]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return (counter.get_total_flops() + lstm_flops) / 1e9


def floor_line(gflop: float, rate: float, measured_s: float, target_s: float | None = None) -> str:
    """One summary line: work, matmul rate, floor, and how close the measured step is to it."""
    floor = gflop / rate
    line = (
        f"{gflop:.0f} GFLOP per step / {rate:.0f} GFLOP/s (float32 matmul, this machine) = floor {floor:.2f} s; "
        f"measured {measured_s:.2f} s = {floor / measured_s:.0%} of the floor's speed"
    )
    if target_s is not None:
        verdict = "reachable" if floor <= target_s else "below the floor: no float32 implementation can reach it here"
        line += f"; target {target_s:.2f} s is {verdict}"
    return line
