"""The one training loop: Lightning drives every method.

Lightning provides device placement, mixed precision on GPU, multi-GPU / multi-node DDP
(``devices``, ``strategy``, ``num_nodes`` are passed through), checkpoints and resume, early
stopping and the progress bar. sthisto adds what makes runs repeatable and resumable to the
same weights: an epoch-seeded sampler that also shards across DDP ranks, and a callback that
reseeds torch at every epoch start (so dropout and augmentations depend only on seed and epoch,
not on how many epochs ran in this process).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._compat import ensure_torchvision

ensure_torchvision()  # Lightning imports torchmetrics, which imports torchvision
import lightning.pytorch as pl  # noqa: E402

from .._device import lightning_accelerator  # noqa: E402
from .._errors import InputError  # noqa: E402
from .._logging import logger  # noqa: E402
from .._spots import library_ids  # noqa: E402
from ._progress import progress_callbacks  # noqa: E402
from ._recipes import MONITORS  # noqa: E402
from ._samplers import EpochShuffleSampler  # noqa: E402

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


class ItemDataset(Dataset):
    """A list of ready items (whole-section batches, or per-spot dicts to collate)."""

    def __init__(self, items: Sequence[dict]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class _ExpressionModule(pl.LightningModule):
    """LightningModule around any :class:`~sthisto.models.ExpressionModel`'s network."""

    def __init__(self, model) -> None:
        super().__init__()
        self.network = model.network
        self._model = model
        self._validation_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch):
        return self.network(**self._model.network_inputs(batch))

    def _step(self, batch, stage: str):
        outputs = self(batch)
        loss = self._model.masked_loss(outputs, batch)
        size = int(batch["loss_mask"].sum()) if "loss_mask" in batch else len(next(iter(batch.values())))
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=max(size, 1), sync_dist=True)
        if stage == "val" and "target" in batch:
            prediction, target = outputs["prediction"].detach().float(), batch["target"].detach().float()
            if "loss_mask" in batch:
                prediction, target = prediction[batch["loss_mask"]], target[batch["loss_mask"]]
            self._validation_pairs.append((prediction.cpu(), target.cpu()))
        return loss

    def training_step(self, batch, batch_idx):
        if getattr(self._model, "_augment", False):
            from ._augment import augment_batch

            batch = augment_batch(batch)
        return self._step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self._validation_pairs = []

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        # The learning curve in the metric the tables report, on held-aside training data: a
        # loss near the gene-mean loss says little about whether the image is being used.
        if self._validation_pairs:
            prediction = torch.cat([p for p, _ in self._validation_pairs]).numpy()
            target = torch.cat([t for _, t in self._validation_pairs]).numpy()
            score = pearson_per_gene_mean(prediction, target)
            # Undefined (no gene varies on the held-aside spots) is scored as the worst value, so
            # that selecting on it never stops training on a NaN.
            self.log("val_pearson_gene", score if np.isfinite(score) else -1.0, on_epoch=True)
        self._validation_pairs = []

    def configure_optimizers(self):
        configured = self._model.configure_optimizers(self.network)
        if getattr(self._model, "_recipe", "paper") == "small_data":
            from ._recipes import small_data_optimizers

            return small_data_optimizers(configured, self.trainer.estimated_stepping_batches)
        return configured


class _EpochReseed(pl.Callback):
    """Reseed torch at each epoch start from (seed, epoch, rank)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        torch.manual_seed(self.seed * 7919 + trainer.current_epoch * 104_729 + trainer.global_rank)


class _History(pl.Callback):
    """Collect per-epoch train/validation loss; keep the weights of the best ``monitor`` epoch."""

    def __init__(self, model, *, keep_best: bool, monitor: str = "val_loss") -> None:
        self.model = model
        self.keep_best = keep_best
        self.monitor = monitor
        self.sign = 1.0 if MONITORS[monitor] == "min" else -1.0
        self.best_loss = float("inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.precision: str | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        history = self.model.history
        epoch = trainer.current_epoch
        history["epoch"].append(int(epoch))
        history["train_loss"].append(float(metrics["train_loss"]) if "train_loss" in metrics else float("nan"))
        val = float(metrics["val_loss"]) if "val_loss" in metrics else float("nan")
        history["val_loss"].append(val)
        if "val_pearson_gene" in metrics:
            history.setdefault("val_pearson_gene", []).append(float(metrics["val_pearson_gene"]))
        watched = val if self.monitor == "val_loss" else float(metrics.get(self.monitor, float("nan")))
        # best_loss holds sign * monitored value: lower is better whichever metric is watched
        if self.keep_best and np.isfinite(watched) and self.sign * watched < self.best_loss:
            self.best_loss = self.sign * watched
            self.best_epoch = int(epoch)
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.network.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.model.history,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming continues the history of the interrupted run.
        self.model.history = {k: list(v) for k, v in state_dict["history"].items()}
        self.best_loss = state_dict["best_loss"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_state = state_dict.get("best_state")


def pearson_per_gene_mean(prediction: np.ndarray, target: np.ndarray) -> float:
    """Mean over genes of the Pearson r between prediction and target across spots.

    Genes constant in the target have no correlation and are left out; a gene the model
    predicts as a constant while its target varies counts as 0 (it learned nothing), so a
    collapsing network cannot look good by having few defined genes.
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if prediction.ndim != 2 or len(prediction) < 2:
        return float("nan")
    p = prediction - prediction.mean(axis=0)
    t = target - target.mean(axis=0)
    p_norm, t_norm = np.sqrt((p**2).sum(axis=0)), np.sqrt((t**2).sum(axis=0))
    varies = t_norm > 1e-12
    if not varies.any():
        return float("nan")
    r = np.where(p_norm > 1e-12, (p * t).sum(axis=0) / np.maximum(p_norm * t_norm, 1e-300), 0.0)
    return float(r[varies].mean())


def split_validation(
    adata, train_index: np.ndarray, validation, *, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split training spots into fitting and validation parts, from training data only.

    Parameters
    ----------
    validation
        ``None``: no validation. A float in (0, 1): that fraction of each training section's
        spots has its expression withheld from the loss and scores validation (their image is
        still seen as context, as at prediction time). A list of library ids: whole training
        sections held out for validation.

    Returns
    -------
    fit_mask, val_mask
        Boolean arrays aligned with ``train_index``.
    val_libraries
        Libraries held out whole (empty for a spot fraction).
    """
    n = len(train_index)
    if validation is None or validation is False:
        return np.ones(n, bool), np.zeros(n, bool), []
    libraries = library_ids(adata)[train_index]
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise InputError(f"validation={validation} must be a fraction in (0, 1), a list of library ids, or None.")
        rng = np.random.default_rng(seed)
        val_mask = np.zeros(n, bool)
        for library in np.unique(libraries):
            rows = np.flatnonzero(libraries == library)
            n_val = int(round(validation * len(rows)))
            if n_val == 0 or n_val == len(rows):
                continue
            val_mask[rng.choice(rows, size=n_val, replace=False)] = True
        return ~val_mask, val_mask, []
    chosen = [str(v) for v in ([validation] if isinstance(validation, str) else validation)]
    unknown = sorted(set(chosen) - set(libraries))
    if unknown:
        raise InputError(
            f"validation libraries {unknown} are not among the training spots' libraries "
            f"{sorted(set(libraries))}. Validation must come from the training data."
        )
    val_mask = np.isin(libraries, chosen)
    if val_mask.all():
        raise InputError("validation holds out every training library; keep at least one for fitting.")
    return ~val_mask, val_mask, chosen


@contextlib.contextmanager
def _quiet_lightning(verbose: bool):
    if verbose:
        yield
        return
    previous = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*validation_step.*but have no `val_dataloader`.*")
        try:
            yield
        finally:
            for name, level in previous.items():
                logging.getLogger(name).setLevel(level)


def _loader(items: list[dict], batch_size: int | None, *, seed: int, shuffle: bool) -> DataLoader:
    dataset = ItemDataset(items)
    sampler = EpochShuffleSampler(len(dataset), seed=seed, shuffle=shuffle)
    # A private generator: creating an iterator draws a base seed from the loader's generator,
    # and Lightning creates iterators at different points relative to the epoch reseed in a
    # fresh and in a resumed run; the global stream (dropout masks) must not see that draw.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, generator=generator)


def run_training(
    model,
    train_items,
    val_items: list[dict],
    *,
    batch_size: int | None,
    seed: int = 0,
    max_epochs: int | None = None,
    device="auto",
    devices=None,
    strategy="auto",
    num_nodes: int = 1,
    precision: str | None = None,
    early_stopping: int | None = None,
    monitor: str = "val_loss",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress_bar: bool | str = True,
    verbose: bool = False,
) -> _History:
    """Run Lightning on ready items for any object with the training protocol.

    ``model`` needs ``network``, ``network_inputs(batch)``, ``masked_loss(outputs, batch)``,
    ``configure_optimizers(network)``, ``training_params`` and a ``history`` dict. The
    :class:`~sthisto.models.ExpressionModel` classes have them; so does HistoSPACE's
    autoencoder stage. ``train_items`` is a list of ready items, or a dataset with a
    ``loader()`` of its own (:class:`~sthisto.engine._subsections.SubsectionDataset`).

    ``monitor`` is what model selection and early stopping watch on the validation items:
    ``"val_loss"`` (lowest wins) or ``"val_pearson_gene"`` (the mean per-gene Pearson r,
    highest wins).

    Returns
    -------
    The history callback (per-epoch losses are also written to ``model.history``). With
    validation items, ``model.network`` ends with the weights of the best validation epoch.
    """
    if monitor not in MONITORS:
        raise InputError(f"monitor={monitor!r} is not known; use one of {sorted(MONITORS)}.")
    if not len(train_items):
        raise InputError("no training items: select at least one training spot (or tile).")
    epochs = int(max_epochs if max_epochs is not None else model.training_params["max_epochs"])
    accelerator, auto_devices = lightning_accelerator(device)
    if precision is None:
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    history = _History(model, keep_best=bool(val_items), monitor=monitor)
    history.precision = precision
    enable_progress_bar, progress = progress_callbacks(progress_bar)
    callbacks: list[pl.Callback] = [_EpochReseed(seed), history, *progress]
    if early_stopping and val_items:
        callbacks.append(
            pl.callbacks.EarlyStopping(monitor=monitor, patience=int(early_stopping), mode=MONITORS[monitor])
        )
    elif early_stopping:
        raise InputError("early_stopping needs a validation split (validation=0.1 or a list of libraries).")
    ckpt_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        callbacks.append(
            # One rolling checkpoint, overwritten after every epoch: what resume needs.
            pl.callbacks.ModelCheckpoint(
                dirpath=checkpoint_dir,
                filename="last",
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
        last = checkpoint_dir / "last.ckpt"
        if resume and last.exists():
            ckpt_path = str(last)
            logger.info("resuming training from %s", last)
    elif resume:
        raise InputError("resume=True needs checkpoint_dir=<folder of an earlier run>.")

    model.history = {"epoch": [], "train_loss": [], "val_loss": []}
    module = _ExpressionModule(model)
    with _quiet_lightning(verbose):
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=devices if devices is not None else auto_devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=checkpoint_dir is not None,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            log_every_n_steps=1,
            default_root_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
        )
        trainer.fit(
            module,
            train_dataloaders=(
                train_items.loader()
                if hasattr(train_items, "loader")
                else _loader(train_items, batch_size, seed=seed, shuffle=True)
            ),
            val_dataloaders=_loader(val_items, batch_size, seed=seed, shuffle=False) if val_items else None,
            ckpt_path=ckpt_path,
        )
    if history.best_state is not None:
        model.network.load_state_dict(history.best_state)
        logger.info(
            "kept the weights of epoch %d (best %s: %.4g)",
            history.best_epoch,
            monitor,
            history.sign * history.best_loss,
        )
    model.network.to("cpu")
    return history


def fit_model(
    model,
    adata,
    train_index: np.ndarray,
    *,
    targets: np.ndarray,
    counts: np.ndarray | None = None,
    size_factors: np.ndarray | None = None,
    validation=None,
    early_stopping: int | None = None,
    monitor: str = "val_loss",
    seed: int = 0,
    max_epochs: int | None = None,
    device="auto",
    devices=None,
    strategy="auto",
    num_nodes: int = 1,
    precision: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress_bar: bool = True,
    verbose: bool = False,
) -> None:
    """Train ``model.network`` on the spots ``train_index`` with Lightning.

    Arrays (``targets``, ``counts``, ``size_factors``) are aligned with ``train_index``.
    See :func:`sthisto.tl.train` for the meaning of each parameter.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    fit_mask, val_mask, val_libraries = split_validation(adata, train_index, validation, seed=seed)

    sections = model.sections(adata, train_index, targets=targets, counts=counts, size_factors=size_factors)
    train_sections, val_sections = [], []
    position = {obs: row for row, obs in enumerate(train_index)}
    for section in sections:
        rows = np.fromiter((position[i] for i in section.obs_index), dtype=int, count=section.n_spots)
        if section.library_id in val_libraries:
            val_sections.append(section)
            continue
        if val_mask[rows].any():
            val_copy = type(section)(section.library_id, section.obs_index, dict(section.tensors))
            val_copy.tensors["loss_mask"] = torch.as_tensor(val_mask[rows])
            val_sections.append(val_copy)
            section.tensors["loss_mask"] = torch.as_tensor(fit_mask[rows])
        train_sections.append(section)

    train_items, batch_size = model.training_items(train_sections)
    val_items, _ = model.training_items(val_sections) if val_sections else ([], None)
    if model.batching == "spots":  # per-spot items: drop spots whose targets the loss must not see
        train_items = [i for i in train_items if bool(i.pop("loss_mask", True))]
        val_items = [i for i in val_items if bool(i.pop("loss_mask", True))]
    from ._subsections import SubsectionDataset, position_table_size, subsection_settings

    subsections = subsection_settings(model, int(fit_mask.sum()))
    if subsections is not None:  # section-wide methods: random spatial crops, validated on whole sections
        shift = position_table_size(model.network) if getattr(model, "_recipe", "paper") == "small_data" else None
        train_items = SubsectionDataset(model, train_items, seed=seed, shift_positions=shift, **subsections)
        subsections = {**subsections, "position_shift": shift is not None}
    history = run_training(
        model,
        train_items,
        val_items,
        batch_size=batch_size,
        seed=seed,
        max_epochs=max_epochs,
        device=device,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        precision=precision,
        early_stopping=early_stopping,
        monitor=monitor,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress_bar=progress_bar,
        verbose=verbose,
    )
    epochs = int(max_epochs if max_epochs is not None else model.training_params["max_epochs"])
    model.trained_on = {
        "libraries": sorted(set(library_ids(adata)[train_index])),
        "n_spots": int(len(train_index)),
        "n_fit_spots": int(fit_mask.sum()),
        "validation": validation if not isinstance(validation, (list, tuple)) else list(validation),
        "validation_libraries": val_libraries,
        "n_validation_spots": int(val_mask.sum()),
        "selected_epoch": history.best_epoch if history.best_state is not None else len(model.history["epoch"]) - 1,
        "selected_on": monitor if history.best_state is not None else "last epoch",
        "seed": int(seed),
        "max_epochs": epochs,
        "precision": str(history.precision),
        "subsections": subsections,
    }
