"""Embedding batch sizes chosen from free memory, and the compile option of pp.embed."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import sthisto
from sthisto._errors import InputError
from sthisto.encoders import _batching, cpu_batch_size

from .test_embed import make_adata


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_activation_estimate_is_the_largest_output_times_overhead_plus_input():
    per_patch = _batching.activation_bytes_per_patch(_conv_net(), 32)
    largest = 8 * 32 * 32 * 4  # the conv / ReLU output, float32
    image = 3 * 32 * 32 * 4
    assert per_patch == int(largest * _batching.ACTIVATION_OVERHEAD + image)


def test_batch_size_is_lowered_to_what_fits_and_never_above_the_ceiling():
    net = _conv_net()
    per_patch = _batching.activation_bytes_per_patch(net, 32)
    plenty = cpu_batch_size(net, 32, ceiling=16, available_bytes=10**12)
    assert plenty.batch_size == 16
    tight = cpu_batch_size(net, 32, ceiling=16, available_bytes=int(5 * per_patch / _batching.MEMORY_SHARE))
    assert tight.batch_size == 5
    starved = cpu_batch_size(net, 32, ceiling=16, available_bytes=1)
    assert starved.batch_size == 1
    assert tight.as_record()["activation_bytes_per_patch"] == per_patch


def test_unknown_free_memory_keeps_the_ceiling(monkeypatch):
    monkeypatch.setattr(_batching, "available_memory_bytes", lambda: None)
    plan = cpu_batch_size(_conv_net(), 32, ceiling=12)
    assert (plan.batch_size, plan.available_bytes) == (12, None)


def test_available_memory_is_read_from_the_system():
    available = _batching.available_memory_bytes()
    assert available is None or available > 0


def test_embed_on_cpu_records_the_memory_rule_and_gives_the_same_features(monkeypatch):
    roomy, starved = make_adata(), make_adata()
    sthisto.pp.embed(roomy, encoder="handcrafted", patch_size_um=20.0, device="cpu")
    record = roomy.uns["sthisto"]["embed"]["X_handcrafted"]
    assert record["batch_size"] <= 16 and record["batch_size_ceiling"] == 16
    assert record["activation_bytes_per_patch"] > 0

    monkeypatch.setattr(_batching, "available_memory_bytes", lambda: 1)
    sthisto.pp.embed(starved, encoder="handcrafted", patch_size_um=20.0, device="cpu")
    assert starved.uns["sthisto"]["embed"]["X_handcrafted"]["batch_size"] == 1
    np.testing.assert_allclose(starved.obsm["X_handcrafted"], roomy.obsm["X_handcrafted"], rtol=1e-5, atol=1e-4)


def test_explicit_batch_size_is_kept():
    adata = make_adata()
    sthisto.pp.embed(adata, encoder="handcrafted", patch_size_um=20.0, device="cpu", batch_size=3)
    record = adata.uns["sthisto"]["embed"]["X_handcrafted"]
    assert record["batch_size"] == 3 and "batch_size_ceiling" not in record


def test_compile_wraps_the_network_and_keeps_the_features(monkeypatch):
    from sthisto.encoders import Encoder

    compiled = []
    original = Encoder.compile

    def eager_compile(self, **kwargs):
        # the eager backend goes through torch.compile's tracing without needing a C compiler
        compiled.append(self.name)
        return original(self, backend="eager", **kwargs)

    monkeypatch.setattr(Encoder, "compile", eager_compile)
    plain, wrapped = make_adata(), make_adata()
    net = _conv_net()
    sthisto.pp.embed(
        plain, encoder=Encoder.from_module(net, name="cnn", input_size=32, patch_size_um=20.0), device="cpu"
    )
    sthisto.pp.embed(
        wrapped,
        encoder=Encoder.from_module(net, name="cnn", input_size=32, patch_size_um=20.0),
        device="cpu",
        compile=True,
    )
    assert compiled == ["cnn"]
    assert wrapped.uns["sthisto"]["embed"]["X_cnn"]["compiled"] is True
    np.testing.assert_allclose(wrapped.obsm["X_cnn"], plain.obsm["X_cnn"], rtol=1e-5, atol=1e-6)


def test_compile_must_be_a_boolean():
    with pytest.raises(InputError, match="compile="):
        sthisto.pp.embed(make_adata(), encoder="handcrafted", compile="yes")
