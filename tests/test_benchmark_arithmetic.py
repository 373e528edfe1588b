"""The step-time floor the benchmarks report rests on a FLOP count; check that count by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def arithmetic():
    spec = importlib.util.spec_from_file_location("_arithmetic", BENCHMARKS / "_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _LinearThenLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(12, 16, bias=False)
        self.lstm = torch.nn.LSTM(16, 8, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.linear(x))[0].sum()


def test_step_flops_count_products_and_lstm_layers_from_their_shapes(arithmetic):
    torch.manual_seed(0)
    network = _LinearThenLSTM()
    batch, steps = 5, 3
    x = torch.randn(batch, steps, 12)

    gflop = arithmetic.step_gflops(network, lambda: network(x).backward())

    rows = batch * steps
    linear_forward = 2 * rows * 12 * 16
    # Backward of a linear layer whose input needs no gradient: the weight gradient only.
    linear_total = linear_forward + linear_forward
    lstm_forward = 2 * rows * (16 + 8) * 4 * 8 + 2 * rows * (8 + 8) * 4 * 8
    assert gflop * 1e9 == pytest.approx(linear_total + 3 * lstm_forward)


def test_floor_line_compares_the_target_with_work_over_rate(arithmetic):
    assert "below the floor" in arithmetic.floor_line(100.0, 100.0, 2.0, target_s=0.5)
    assert "is reachable" in arithmetic.floor_line(100.0, 100.0, 2.0, target_s=1.5)
    assert "floor 1.00 s" in arithmetic.floor_line(100.0, 100.0, 2.0)


def test_matmul_rate_is_a_positive_rate(arithmetic):
    assert arithmetic.matmul_gflops(sizes=(64,), repeats=2) > 0
