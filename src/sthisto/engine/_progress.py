"""Training progress as plain lines of text, for logs and pipes.

Lightning's progress bar redraws one line with carriage returns: in a log file or under
``nohup`` it becomes a wall of fragments, or nothing when it is switched off. With
``progress_bar="text"`` the training loop prints an ordinary line instead: after the first
epoch, after the last, and in between at most every :data:`TEXT_INTERVAL_S` seconds.
"""

from __future__ import annotations

import math
import sys
import time

import lightning.pytorch as pl

from .._errors import InputError

TEXT_INTERVAL_S = 10.0
"""Least number of seconds between two progress lines (the first and last epochs always print)."""


class TextProgress(pl.Callback):
    """Print ``epoch e/E  train loss x  [val loss y]  t s`` lines to the current ``sys.stderr``."""

    def __init__(self, *, interval_s: float = TEXT_INTERVAL_S) -> None:
        self.interval_s = float(interval_s)
        self.start = 0.0
        self.last_line = -math.inf

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self.last_line = -math.inf

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        # The stopping decision of early stopping is only known after this hook, so an early
        # stop may end without a final line; the caller's summary line covers it.
        if epoch not in (1, total) and now - self.last_line < self.interval_s:
            return
        self.last_line = now
        metrics = trainer.callback_metrics
        parts = [f"epoch {epoch}/{total}"]
        for name in ("train_loss", "val_loss"):
            if name in metrics:
                parts.append(f"{name.replace('_', ' ')} {float(metrics[name]):.4g}")
        parts.append(f"{now - self.start:.1f} s")
        # sys.stderr of the moment, so that notebooks and test captures receive the lines.
        print("  ".join(parts), file=sys.stderr, flush=True)


def progress_callbacks(progress_bar) -> tuple[bool, list[pl.Callback]]:
    """Lightning's ``enable_progress_bar`` and the extra callbacks for a ``progress_bar`` value."""
    if not isinstance(progress_bar, str):
        return bool(progress_bar), []
    if progress_bar == "text":
        return False, [TextProgress()]
    raise InputError(
        f"progress={progress_bar!r} is not one of True (Lightning's bar), False (silent) or 'text' "
        f"(a plain line now and then, for logs); pass one of those."
    )
