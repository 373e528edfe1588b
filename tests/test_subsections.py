"""Spatial sub-sections as mini-batches of THItoGene and HGGEF under recipe="small_data" (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import sthisto
from sthisto._errors import InputError
from sthisto.engine._loop import pearson_per_gene_mean
from sthisto.engine._subsections import DEFAULT_SUBSECTION_SPOTS, SubsectionDataset
from sthisto.models._registry import resolve_method
from sthisto.tl._train import _targets

torch.set_num_threads(1)

_COHORT = {"n_sections": 3, "n_patients": 1, "n_spots": 40, "n_genes": 5, "seed": 2}


@pytest.fixture(scope="module")
def adata():
    return sthisto.datasets.synthetic(**_COHORT)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.network.state_dict().items()}


def _sections(adata, method):
    """A configured (untrained) model and its whole training sections, as the engine builds them."""
    cls, variant = resolve_method(method)
    index = np.arange(adata.n_obs)
    genes = list(adata.var_names)
    targets, counts, sizes = _targets(
        adata, index, genes, layer=None, variant=cls.all_data_defaults()["target"], need_counts=cls.uses_counts
    )
    torch.manual_seed(0)
    model = cls.configure(adata, genes=genes, train_index=index, params=variant)
    return model, model.sections(adata, index, targets=targets, counts=counts, size_factors=sizes)


def _loss(model, batch) -> torch.Tensor:
    model.network.train()
    torch.manual_seed(11)  # the same dropout masks and augmentations for both batches
    return model.masked_loss(model.network(**model.network_inputs(batch)), batch)


@pytest.mark.parametrize("method", ["thitogene_tiny", "hggef_tiny"])
def test_a_sub_section_holding_the_whole_section_gives_the_whole_section_loss(adata, method):
    model, sections = _sections(adata, method)
    items = [s.tensors for s in sections]
    draws = SubsectionDataset(model, items, spots=10_000, per_epoch=3, seed=0)
    number, rows = draws.draw(0, 1)
    np.testing.assert_array_equal(rows, np.arange(sections[number].n_spots))
    crop = draws[(0, 1)]
    whole = items[number]
    assert set(crop) == set(whole)
    for key, value in whole.items():  # the graph is rebuilt on the crop and still equals the section's
        assert torch.equal(crop[key], value), key
    assert _loss(model, crop).item() == _loss(model, whole).item()


@pytest.mark.parametrize("method", ["thitogene_tiny", "hggef_tiny"])
def test_a_smaller_sub_section_is_the_unit_prediction_builds_for_those_spots(adata, method):
    model, sections = _sections(adata, method)
    draws = SubsectionDataset(model, [s.tensors for s in sections], spots=12, per_epoch=5, seed=1)
    number, rows = draws.draw(2, 4)
    assert len(rows) == 12 and len(set(rows.tolist())) == 12
    crop = draws[(2, 4)]
    section = sections[number]
    unit = model.section_inputs(adata, section.obs_index[rows])
    for key in ("patches", "positions", "edge_index", "coords"):
        assert torch.equal(crop[key], unit[key]), key
    assert torch.equal(crop["target"], section.tensors["target"][torch.as_tensor(rows)])
    # a spatial neighbourhood: the 12 spots nearest to one of them, none outside is nearer
    coords = section.tensors["coords"].numpy().astype(float)
    outside = np.setdiff1d(np.arange(section.n_spots), rows)
    distance = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    assert any(distance[c, rows].max() <= distance[c, outside].min() for c in rows)
    assert np.isfinite(_loss(model, crop).item())


def test_shifted_crops_keep_their_layout_inside_the_position_tables(adata):
    from sthisto.engine._subsections import position_table_size

    model, sections = _sections(adata, "thitogene_tiny")
    items = [s.tensors for s in sections]
    table = position_table_size(model.network)
    assert table == model.network.position.n_positions
    plain = SubsectionDataset(model, items, spots=12, per_epoch=6, seed=1)
    shifted = SubsectionDataset(model, items, spots=12, per_epoch=6, seed=1, shift_positions=table)
    offsets = set()
    for draw in range(6):
        a, b = plain[(0, draw)], shifted[(0, draw)]
        offset = b["positions"] - a["positions"]
        assert (offset == offset[0]).all()  # one translation per crop: relative layout unchanged
        assert int(b["positions"].min()) >= 0 and int(b["positions"].max()) < table
        assert torch.equal(a["edge_index"], b["edge_index"]) and torch.equal(a["patches"], b["patches"])
        assert torch.equal(b["positions"], shifted[(0, draw)]["positions"])  # seeded by (seed, epoch, draw)
        offsets.add(tuple(offset[0].tolist()))
    assert len(offsets) > 1  # the crops really move


def test_draws_depend_on_seed_epoch_and_draw_only(adata):
    model, sections = _sections(adata, "thitogene_tiny")
    items = [s.tensors for s in sections]
    a = SubsectionDataset(model, items, spots=8, per_epoch=4, seed=5)
    b = SubsectionDataset(model, items, spots=8, per_epoch=4, seed=5)
    other = SubsectionDataset(model, items, spots=8, per_epoch=4, seed=6)
    epoch = [a.draw(0, d) for d in range(4)]
    assert all(np.array_equal(x[1], y[1]) and x[0] == y[0] for x, y in zip(epoch, [b.draw(0, d) for d in range(4)]))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(epoch, [a.draw(1, d) for d in range(4)]))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(epoch, [other.draw(0, d) for d in range(4)]))
    loader = a.loader()
    loader.sampler.set_epoch(3)
    assert [key for key in loader.sampler] == [(3, d) for d in range(4)]
    assert len(loader) == 4


def test_small_data_trains_on_sub_sections_repeatably_and_records_them(adata):
    libraries = list(adata.obs["library_id"].cat.categories)
    kwargs = dict(train_mask=libraries[:2], max_epochs=2, recipe="small_data", n_members=1, progress=False, store=False)
    kwargs["seed"] = 3
    first, second = (sthisto.tl.train(adata, "thitogene_tiny", subsection_spots=16, **kwargs) for _ in range(2))
    fitted = first.trained_on["n_fit_spots"]
    assert first.trained_on["subsections"] == {"spots": 16, "per_epoch": -(-fitted // 16), "position_shift": True}
    for name, value in _weights(first).items():
        np.testing.assert_array_equal(value, _weights(second)[name], err_msg=name)
    curve = first.history["val_pearson_gene"]  # the learning curve on held-aside training spots
    assert len(curve) == 2 and np.isfinite(curve).all() and curve == second.history["val_pearson_gene"]
    other = sthisto.tl.train(adata, "thitogene_tiny", subsection_spots=16, **{**kwargs, "seed": 4})
    assert any(not np.array_equal(v, _weights(other)[k]) for k, v in _weights(first).items())
    default = sthisto.tl.train(adata, "thitogene_tiny", **{**kwargs, "max_epochs": 1})
    assert default.trained_on["subsections"]["spots"] == DEFAULT_SUBSECTION_SPOTS
    assert default.manifest()["trained_on"]["subsections"] == default.trained_on["subsections"]
    paper = sthisto.tl.train(adata, "thitogene_tiny", train_mask=libraries[:2], max_epochs=1, store=False)
    assert paper.trained_on["subsections"] is None  # the paper recipe keeps whole sections
    whole = sthisto.tl.train(adata, "thitogene_tiny", subsection_spots=False, **{**kwargs, "max_epochs": 1})
    assert whole.trained_on["subsections"] is None


def test_validation_pearson_counts_a_gene_predicted_as_a_constant_as_zero():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(30, 3))
    prediction = np.column_stack([target[:, 0] + rng.normal(size=30), np.full(30, 2.0), -target[:, 2]])
    expected = (np.corrcoef(prediction[:, 0], target[:, 0])[0, 1] + 0.0 - 1.0) / 3
    assert pearson_per_gene_mean(prediction, target) == pytest.approx(expected)
    target[:, 1] = 5.0  # a gene constant in the data has no correlation: left out
    assert pearson_per_gene_mean(prediction, target) == pytest.approx((expected * 3 - 0.0) / 2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"subsection_spots": 1}, "subsection_spots=1 must be an integer >= 2"),
        ({"subsection_spots": 8, "subsections_per_epoch": 0}, "subsections_per_epoch=0"),
        ({"subsection_spots": False, "subsections_per_epoch": 3}, "whole sections"),
    ],
)
def test_bad_sub_section_settings_are_refused_with_the_fix(adata, params, message):
    data = adata.copy()
    with pytest.raises(InputError, match=message):
        sthisto.tl.train(
            data, "thitogene_tiny", max_epochs=1, recipe="small_data", n_members=1, progress=False, **params
        )
    assert "models" not in data.uns.get("sthisto", {})


def test_a_killed_sub_section_run_resumes_to_the_same_weights(adata, tmp_path):
    checkpoints = tmp_path / "ckpt"
    options = 'max_epochs=4, seed=2, recipe="small_data", n_members=1, subsection_spots=16, progress=False'
    script = f"""
        import os, signal, sys
        import torch
        torch.set_num_threads(1)
        import sthisto
        from sthisto.engine import _loop
        adata = sthisto.datasets.synthetic(**{_COHORT!r})
        original = _loop._EpochReseed.on_train_epoch_start
        def die_mid_run(self, trainer, module):
            if trainer.current_epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a preempted job
            original(self, trainer, module)
        _loop._EpochReseed.on_train_epoch_start = die_mid_run
        sthisto.tl.train(adata, "thitogene_tiny", {options}, checkpoint_dir=sys.argv[1])
        """
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    killed = subprocess.run(
        [sys.executable, str(path), str(checkpoints)], capture_output=True, text=True, timeout=600, env=env
    )
    assert killed.returncode == -9, killed.stderr
    assert Path(checkpoints / "last.ckpt").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU reductions are bit-identical only at the same thread count
    try:
        kwargs = dict(max_epochs=4, seed=2, recipe="small_data", n_members=1, subsection_spots=16, progress=False)
        kwargs["store"] = False
        resumed = sthisto.tl.train(adata, "thitogene_tiny", checkpoint_dir=checkpoints, resume=True, **kwargs)
        uninterrupted = sthisto.tl.train(adata, "thitogene_tiny", **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert resumed.history["epoch"] == uninterrupted.history["epoch"]
    assert resumed.history["train_loss"] == uninterrupted.history["train_loss"]
    for name, value in _weights(uninterrupted).items():
        np.testing.assert_array_equal(value, _weights(resumed)[name], err_msg=name)
