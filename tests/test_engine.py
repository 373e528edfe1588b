"""The shared training engine: repeatable, resumable, distributed, validated on training data only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import sthisto
from sthisto._errors import InputError
from sthisto.engine._loop import EpochShuffleSampler, split_validation

METHOD = "thitogene_tiny"  # section-wide batches and a graph: the engine's hardest case


@pytest.fixture(scope="module")
def adata():
    return sthisto.datasets.synthetic(n_sections=4, n_spots=50, n_genes=6, seed=5)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.network.state_dict().items()}


def test_cpu_training_repeats_bit_for_bit(adata):
    kwargs = dict(max_epochs=3, progress=False, store=False, seed=3)
    first, second = (sthisto.tl.train(adata, METHOD, **kwargs) for _ in range(2))
    for name, value in _weights(first).items():
        np.testing.assert_array_equal(value, _weights(second)[name], err_msg=name)
    assert first.history["train_loss"] == second.history["train_loss"]
    other = sthisto.tl.train(adata, METHOD, **{**kwargs, "seed": 4})
    assert other.history["train_loss"] != first.history["train_loss"]


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(10, seed=1), EpochShuffleSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == list(range(10))


def test_validation_comes_from_training_spots_only(adata):
    libraries = list(adata.obs["library_id"].cat.categories)
    train_index = np.flatnonzero(adata.obs["library_id"].isin(libraries[:3]).to_numpy())
    fit, val, held_out = split_validation(adata, train_index, 0.25, seed=0)
    assert fit.sum() + val.sum() == len(train_index) and not (fit & val).any()
    assert 0.2 < val.mean() < 0.3 and held_out == []
    _, val, held_out = split_validation(adata, train_index, [libraries[1]], seed=0)
    assert held_out == [libraries[1]] and val.sum() == (adata.obs["library_id"] == libraries[1]).sum()
    with pytest.raises(InputError, match="training data"):
        split_validation(adata, train_index, [libraries[3]], seed=0)  # the test section


def test_validation_keeps_the_best_epoch_and_records_it(adata):
    libraries = list(adata.obs["library_id"].cat.categories)
    model = sthisto.tl.train(
        adata, METHOD, train_mask=libraries[:3], validation=0.3, max_epochs=4, progress=False, store=False
    )
    val = np.asarray(model.history["val_loss"])
    assert len(val) == 4 and np.isfinite(val).all()
    assert model.trained_on["selected_epoch"] == int(np.argmin(val))
    assert model.trained_on["libraries"] == sorted(libraries[:3])


_SCRIPT_PRELUDE = """
import json, os, sys
import torch
torch.set_num_threads(1)
import sthisto
adata = sthisto.datasets.synthetic(n_sections=4, n_spots=50, n_genes=6, seed=5)
"""


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(_SCRIPT_PRELUDE) + textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env
    )


def test_killed_run_resumes_to_the_same_weights(adata, tmp_path):
    checkpoints = tmp_path / "ckpt"
    kill_at_epoch = 3
    killed = _run(
        f"""
        import signal
        from sthisto.engine import _loop
        original = _loop._EpochReseed.on_train_epoch_start
        def die_mid_run(self, trainer, module):
            if trainer.current_epoch == {kill_at_epoch}:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a preempted job
            original(self, trainer, module)
        _loop._EpochReseed.on_train_epoch_start = die_mid_run
        sthisto.tl.train(adata, "{METHOD}", max_epochs=6, seed=2, progress=False, checkpoint_dir=sys.argv[1])
        """,
        tmp_path,
        str(checkpoints),
    )
    assert killed.returncode == -9, killed.stderr
    assert (checkpoints / "last.ckpt").exists()

    # The killed process used one thread; CPU reductions are only bit-identical across runs
    # with the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = sthisto.tl.train(
            adata,
            METHOD,
            max_epochs=6,
            seed=2,
            progress=False,
            checkpoint_dir=checkpoints,
            resume=True,
            store=False,
        )
        uninterrupted = sthisto.tl.train(adata, METHOD, max_epochs=6, seed=2, progress=False, store=False)
    finally:
        torch.set_num_threads(threads)
    assert resumed.history["epoch"] == list(range(6))  # the interrupted run's history continues
    for name, value in _weights(uninterrupted).items():
        np.testing.assert_array_equal(value, _weights(resumed)[name], err_msg=name)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_like_one(tmp_path):
    script = f"""
    devices, strategy, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = sthisto.tl.train(
        adata, "{METHOD}", max_epochs=8, seed=1, lr=1e-3, device="cpu", devices=devices, strategy=strategy,
        progress=False, store=False,
    )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        json.dump({{"loss": model.history["train_loss"], "world": world}}, open(out, "w"))
    """
    single = _run(script, tmp_path, "1", "auto", str(tmp_path / "single.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run(script, tmp_path, "2", "ddp", str(tmp_path / "ddp.json"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert one["world"] == 1 and two["world"] == 2
    loss_one, loss_two = np.array(one["loss"]), np.array(two["loss"])
    assert len(loss_one) == len(loss_two) == 8 and np.isfinite(loss_two).all()
    # Same shape: both fall, in the same order of epochs (two ranks take half the steps each epoch).
    assert loss_one[-1] < loss_one[0] and loss_two[-1] < loss_two[0]
    assert spearmanr(loss_one, loss_two).statistic > 0.8


def test_device_auto_uses_the_cpu_here(adata):
    model = sthisto.tl.train(adata, METHOD, max_epochs=1, progress=False, store=False)
    assert model.trained_on["precision"] == "32-true" or torch.cuda.is_available()
    assert next(model.network.parameters()).device.type == "cpu"  # handed back on the CPU
