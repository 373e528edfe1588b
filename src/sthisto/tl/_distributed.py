"""``tl.predict_distributed``: prediction sharded over GPUs and nodes with Lightning.

The spots are cut into the same units as :func:`sthisto.tl.predict` cuts them (batches of
spots, or spatial neighbourhoods with a halo for section-wide methods; see
:meth:`sthisto.models.ExpressionModel.prediction_plan`). Lightning's ``Trainer.predict``
runs them under the chosen strategy: every rank predicts the units ``rank, rank + world,
…``, reading only those units' patches, and the kept predictions are gathered to every rank
(``torch.distributed.all_gather_object``) and put back in spot order. Each unit is computed by
exactly the code of the single-process path, so results are identical to
:func:`sthisto.tl.predict` (bit for bit on CPU).

With ``strategy="ddp"`` Lightning starts the other ranks by re-running the calling script;
call this from a script (not a notebook), and write outputs from one rank only (e.g.
``if int(os.environ.get("LOCAL_RANK", 0)) == 0`` on one node, or ``trainer.is_global_zero``);
every rank returns the full result.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._compat import ensure_torchvision

ensure_torchvision()  # Lightning imports torchmetrics, which imports torchvision
import lightning.pytorch as pl  # noqa: E402

from .._deprecate import renamed_parameters  # noqa: E402
from .._device import lightning_accelerator  # noqa: E402
from .._errors import InputError  # noqa: E402
from .._validate import checked_input  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence
    from os import PathLike

    from anndata import AnnData

    from ..models._protocol import ExpressionModel


@renamed_parameters(accelerator="device", progress_bar="progress")
@checked_input(genes=True)
def predict_distributed(
    adata: AnnData,
    model: str | PathLike[str] | ExpressionModel,
    *,
    key_added: str | None = None,
    device: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str = "ddp",
    num_nodes: int = 1,
    num_workers: int = 0,
    precision: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Predict expression on many slides or one huge slide with several processes, GPUs or nodes.

    Parameters
    ----------
    adata
        Spots to predict, as for :func:`sthisto.tl.predict` (e.g. pseudo-spots from
        :func:`sthisto.pp.tile`). Every rank must build or read the same object.
    model
        A key of ``uns['sthisto']['models']``, a model object or a saved-model folder.
    key_added
        Output name (default: the stored key, else the method name).
    device
        ``"auto"`` (GPUs when present, else CPU), ``"cpu"``, ``"cuda"`` (``"gpu"`` is accepted
        too) or ``"cuda:i"`` (that GPU only, unless ``devices`` says otherwise); the
        accelerator of :class:`lightning.pytorch.Trainer`. (Formerly ``accelerator=``,
        deprecated.)
    devices, strategy, num_nodes
        Passed to :class:`lightning.pytorch.Trainer`, e.g. ``device="cuda", devices=4,
        strategy="ddp", num_nodes=2`` (8 GPUs), or ``device="cpu", devices=2`` (two CPU
        processes, gloo backend).
    num_workers
        DataLoader processes per rank reading patches while the network runs.
    precision
        Lightning precision; default ``"bf16-mixed"`` on GPU, ``"32-true"`` on CPU.
    progress
        Show Lightning's progress bar. (Formerly ``progress_bar=``, deprecated.)
    overwrite, copy
        As in :func:`sthisto.tl.predict`.

    Returns
    -------
    Exactly what :func:`sthisto.tl.predict` returns (``None`` with ``copy=False``, writing
    ``layers[key_added]``, or ``obsm[key_added]`` for genes ``var`` lacks; with ``copy=True``
    the copy, or a new AnnData of the model's genes for image-only data), on every rank; the
    provenance record
    ``uns['sthisto']['predict'][key_added]`` adds ``world_size`` and ``strategy``.

    Examples
    --------
    In ``predict_slide.py``, run with ``python predict_slide.py``::

        slide = sthisto.io.read_image("slide.ome.tif")
        spots = sthisto.pp.tile(slide, spacing_um=100, diameter_um=55)
        out = sthisto.tl.predict_distributed(spots, "model_dir", device="cuda", devices=4, copy=True)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            out.write_h5ad("predicted.h5ad")
    """
    from ._train import _prediction_request, _resolve_model, _store_predictions

    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise InputError(f"num_workers={num_workers!r} must be an integer >= 0.")
    fitted, stored_key = _resolve_model(adata, model)
    if fitted.members:
        raise InputError(
            f"this {fitted.name} model is an ensemble of {len(fitted.members) + 1} members, and predict_distributed "
            f"runs one network. Use sthisto.tl.predict (which averages the members), or predict_distributed with "
            f"one member: model.members = [] on a copy from sthisto.tl.get_model."
        )
    request = _prediction_request(adata, fitted, stored_key, key_added=key_added, overwrite=overwrite, copy=copy)
    plan = fitted.prediction_plan(adata)
    accelerator, chosen = lightning_accelerator("cuda" if device == "gpu" else device)
    if devices == "auto" and isinstance(chosen, list):  # "cuda:i" names one GPU
        devices = chosen
    if precision is None:
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"

    module = _PredictionModule(fitted, adata, plan)
    collector = _Gather()
    group_was_ours = not _group_open()
    from ..engine._loop import _quiet_lightning

    with _quiet_lightning(False):
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            logger=False,
            callbacks=[collector],
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _UnitDataset(fitted, adata, plan),
            batch_size=None,
            sampler=_ShardSampler(len(plan.units)),
            num_workers=int(num_workers),
        )
        finished = False
        try:
            trainer.predict(module, dataloaders=loader, return_predictions=False)
            finished = True
        finally:
            fitted._feature_cache = None
            if fitted.network is not None:
                fitted.network.to("cpu")
            if group_was_ours:
                _close_process_group(wait_for_ranks=finished)
    predictions = np.zeros((plan.n_spots, len(fitted.genes)), dtype=np.float32)
    done = np.zeros(len(plan.units), dtype=bool)
    for unit_id, values in collector.results:
        predictions[plan.units[unit_id].result_rows] = values
        done[unit_id] = True
    if not done.all():
        raise RuntimeError(f"{int((~done).sum())} prediction units came back from no rank; this is a bug.")
    summary = plan.summary()
    summary.update(world_size=int(trainer.world_size), strategy=str(strategy))
    request.provenance["streaming"] = json.dumps(summary)
    return _store_predictions(adata, fitted, request, predictions, overwrite=overwrite, copy=copy)


def _close_process_group(*, wait_for_ranks: bool) -> None:
    """Tear down the process group Lightning opened for this call.

    Left open, its gloo threads are still running when the interpreter exits, and the process
    aborts ("terminate called without an active exception") after its work is done; a later
    call in the same process would also join the stale group. A group the caller opened
    (e.g. under torchrun) is theirs and stays. After a failure no barrier is waited on: the
    other ranks may never reach it.
    """
    if _group_open():
        if wait_for_ranks:  # no rank leaves while another is still in a collective
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _group_open() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _group_open():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ShardSampler:
    """Units ``rank, rank + world, …`` of this rank (spatially interleaved, so shards balance)."""

    def __init__(self, n_units: int) -> None:
        self.n_units = n_units

    def __iter__(self):
        rank, world = _rank_world()
        return iter(range(rank, self.n_units, world))

    def __len__(self) -> int:
        rank, world = _rank_world()
        return len(range(rank, self.n_units, world))


class _UnitDataset:
    """Item ``i``: the network inputs of unit ``i`` (its patches are read here, in the worker)."""

    def __init__(self, model, adata, plan) -> None:
        self.model = model
        self.adata = adata
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan.units)

    def __getitem__(self, unit_id: int) -> dict:
        section = self.model.unit_section(
            self.adata, self.plan.units[unit_id], graph_positions=self.plan.graph_positions
        )
        return {"unit": torch.tensor(unit_id), "tensors": section.tensors}


class _PredictionModule(pl.LightningModule):
    """Runs :meth:`ExpressionModel.predict_section` on each unit inside Lightning."""

    def __init__(self, model, adata, plan) -> None:
        super().__init__()
        self.network = model.network
        self._model = model
        self._adata = adata
        self._plan = plan

    def predict_step(self, batch, batch_idx):
        from ..models._planning import Section, release_freed_memory

        unit_id = int(batch["unit"])
        unit = self._plan.units[unit_id]
        tensors = batch["tensors"]
        if self.network is None:  # closed-form models (ridge) compute on the host
            tensors = {k: v.cpu() for k, v in tensors.items()}
        section = Section(unit.library_id, unit.obs_index, tensors)
        values = np.asarray(self._model.predict_section(section, device=self.device))[unit.keep]
        release_freed_memory()
        return unit_id, values


class _Gather(pl.Callback):
    """Collect each rank's unit predictions and share them with every rank at the end."""

    def __init__(self) -> None:
        self.results: list[tuple[int, np.ndarray]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.results.append(outputs)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        _, world = _rank_world()
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, self.results)
            self.results = [item for part in gathered for item in part]
