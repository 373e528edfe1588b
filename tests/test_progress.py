"""Training progress as plain text lines (``progress="text"``) for logs and pipes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sthisto
from sthisto._errors import InputError
from sthisto.engine._progress import TextProgress, progress_callbacks


def test_text_progress_prints_first_last_and_throttled_epochs(capsys):
    callback = TextProgress(interval_s=1e9)  # nothing in between the first and last epoch
    trainer = SimpleNamespace(current_epoch=0, max_epochs=5, callback_metrics={})
    callback.on_train_start(trainer, None)
    for epoch in range(5):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"train_loss": torch.tensor(1.0 / (epoch + 1)), "val_loss": torch.tensor(2.0)}
        callback.on_train_epoch_end(trainer, None)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/5", "epoch 5/5"]
    assert lines[1].split("  ")[1:3] == ["train loss 0.2", "val loss 2"] and lines[1].endswith(" s")

    every = TextProgress(interval_s=0.0)
    every.on_train_start(trainer, None)
    for epoch in range(3):
        trainer.current_epoch = epoch
        every.on_train_epoch_end(trainer, None)
    assert len(capsys.readouterr().err.splitlines()) == 3


def test_progress_bar_values():
    assert progress_callbacks(True) == (True, []) and progress_callbacks(False) == (False, [])
    enabled, callbacks = progress_callbacks("text")
    assert enabled is False and [type(c) for c in callbacks] == [TextProgress]
    with pytest.raises(InputError, match="'text'"):
        progress_callbacks("plain")


def test_train_with_text_progress(capsys):
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=30, n_genes=5, seed=1)
    sthisto.tl.train(adata, "histosge_tiny", max_epochs=2, progress="text", store=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
