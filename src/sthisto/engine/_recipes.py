"""Training recipes: how a method's network is optimised, beside what it is (issue 14).

``"paper"`` trains exactly as each paper says (the default; nothing here touches it).
``"small_data"`` keeps every paper's architecture and loss and changes only the optimisation,
so that the networks learn from the few sections a user has:

- per-gene target scaling: each gene's target is divided by its training standard deviation,
  so that no high-variance gene dominates the loss; the scale is folded into the output layer
  after training, so predictions come out on the target scale with no extra step. Targets are
  not centred: HisToSGE's output is a ReLU, which must stay able to reach every value;
- the output layer starts at the gene-mean predictor: bias at each gene's (scaled) training
  mean, weights at zero. No gene begins (and stays) dead behind HisToSGE's output ReLU, and
  the network does not first spend epochs shrinking a random readout (which also starves
  the layers below of gradient);
- input standardisation of precomputed features (mean / standard deviation of the training
  spots, stored with the model and applied at prediction): handcrafted features reach ~1e3;
- weight decay (``1e-4`` unless ``weight_decay=`` is given);
- the method's small-data learning rate (training parameter ``small_data_lr``, unless ``lr=``
  is given): the papers' rates (1e-5 to 1e-4) are set for hundreds of epochs on many
  sections, and with warm-up, decay and early stopping they leave the networks at the gene
  means;
- learning-rate warm-up (first 5 % of the optimiser steps, linear) then cosine decay to 5 %;
- validation-driven early stopping on held-aside *training* data (15 % of the training
  spots, or one whole training section when there are four or more), keeping the best
  epoch; never the test fold. "Best" is the highest mean per-gene Pearson r there: the
  per-gene loss of a network that ranks spots well within a section can sit at the
  gene-mean loss (measured on her2st), so selecting on the loss kept early, flat epochs;
- networks that read image patches see each training patch under a random one of its eight
  rotations / reflections (:mod:`sthisto.engine._augment`);
- an ensemble of four networks (``n_members``; each member holds aside a different training
  section when validation is by section, and draws its own held-aside spots otherwise); its
  prediction is the members' mean. On her2st it is the change that matters most (HisToSGE-tiny
  0.152 → 0.191 per-gene PCC): one network chooses its epoch on one section and never fits
  it, the ensemble fits every section and averages away each member's noise.
- section-wide methods (THItoGene, HGGEF) train on random spatial sub-sections of their
  sections, many optimiser steps per epoch (:mod:`sthisto.engine._subsections`; knobs
  ``subsection_spots``, ``subsections_per_epoch``, recorded in ``trained_on['subsections']``).

Count-likelihood methods (HGGEF: MSE on the log-expression head plus a ZINB likelihood of the
counts) keep their targets unscaled, and only their log-expression head (``prediction_layer``)
starts at the gene means; the count heads start as the paper's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._errors import InputError
from .._logging import logger

RECIPES = {
    "paper": "each paper's optimiser, schedule and epochs, unchanged",
    "small_data": (
        "paper architecture and loss; per-gene target scaling, output bias at the training mean, input "
        "standardisation of features, weight decay, warm-up + cosine decay, early stopping and epoch choice on "
        "the per-gene Pearson r of held-aside training data; dihedral patch augmentation; an ensemble of four "
        "members holding aside different sections; THItoGene and HGGEF train on random spatial sub-sections"
    ),
}
SMALL_DATA_WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.05
VALIDATION_FRACTION = 0.15
MIN_SECTIONS_FOR_SECTION_VALIDATION = 4
MIN_PATIENCE = 20
PATIENCE_FRACTION = 5
SMALL_DATA_MEMBERS = 4
"""Ensemble members of a network trained under ``small_data`` unless ``n_members=`` is given."""


def check_recipe(recipe) -> str:
    """The recipe name, or a clear error listing the valid ones."""
    if recipe not in RECIPES:
        raise InputError(f"recipe={recipe!r} is not known; use one of {sorted(RECIPES)} (default 'paper').")
    return str(recipe)


MONITORS = {"val_loss": "min", "val_pearson_gene": "max"}
"""What model selection and early stopping can watch on held-aside training data, and which way is better."""


SELECTION_MONITOR = {"paper": "val_loss", "small_data": "val_pearson_gene"}
"""What each recipe selects the best epoch (and stops early) on, unless ``monitor=`` is given."""


def check_monitor(monitor, recipe: str) -> str:
    """The monitored validation metric: the given one, or the recipe's; a clear error otherwise."""
    if monitor is None:
        return SELECTION_MONITOR[recipe]
    if monitor not in MONITORS:
        raise InputError(f"monitor={monitor!r} is not known; use one of {sorted(MONITORS)} (or None: the recipe's).")
    return str(monitor)


def default_members(n_members, recipe: str, cls) -> int:
    """``n_members`` as given, else the recipe's: 4 for networks under ``small_data``, otherwise 1."""
    if n_members is not None:
        return n_members
    return SMALL_DATA_MEMBERS if recipe == "small_data" and cls.network_class is not None else 1


def default_validation(libraries: list[str]):
    """Held-aside training data of the small-data recipe: a whole section when there are enough."""
    if len(libraries) >= MIN_SECTIONS_FOR_SECTION_VALIDATION:
        return [sorted(libraries)[-1]]
    return VALIDATION_FRACTION


def default_patience(epochs: int) -> int:
    """Early-stopping patience: a fifth of the epochs, at least twenty.

    The per-gene Pearson r of one held-aside section moves by a few hundredths from epoch to
    epoch; a tenth of the epochs stopped THItoGene- and HGGEF-tiny while it still rose (her2st).
    """
    return max(MIN_PATIENCE, int(epochs) // PATIENCE_FRACTION)


def output_layer(network, n_genes: int):
    """The network's last ``nn.Linear`` when it has one output per gene and a bias, else None.

    Only the very last linear layer qualifies: an earlier one whose width merely equals the
    number of genes (a hidden layer) is not the output.
    """
    from torch import nn

    linear = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not linear or linear[-1].out_features != n_genes or linear[-1].bias is None:
        return None
    return linear[-1]


def target_scale(targets) -> np.ndarray:
    """Per-gene training standard deviation; 1 for genes constant in training (nothing to scale)."""
    values = targets.toarray() if hasattr(targets, "toarray") else np.asarray(targets)
    scale = np.asarray(values, dtype=np.float64).std(axis=0)
    return np.where(scale > 1e-8, scale, 1.0)


def prepare(model, adata, train_index, targets, *, user_params) -> tuple[Any, np.ndarray | None]:
    """Set up a configured model for the small-data recipe; returns (targets to fit, scale or None).

    Raises before any training when the network has no per-gene output layer to set.
    """
    if model.network is None:  # closed-form methods (ridge): nothing to optimise
        return targets, None
    if "weight_decay" not in user_params:
        model.training_params["weight_decay"] = SMALL_DATA_WEIGHT_DECAY
    if "lr" not in user_params and model.training_params.get("small_data_lr") is not None:
        model.training_params["lr"] = float(model.training_params["small_data_lr"])
    if model.input_kind == "features":
        features = np.asarray(model.feature_matrix(adata, model.data_params, model.extra.get("frames")))[train_index]
        mean = features.astype(np.float64).mean(axis=0)
        std = features.astype(np.float64).std(axis=0)
        # a fresh dict: data_params may share defaults with the class
        model.data_params = {**model.data_params}
        model.data_params["input_standardization"] = {
            "mean": [float(v) for v in mean],
            "scale": [float(v) if v > 1e-8 else 1.0 for v in std],
        }
        model._feature_cache = None
    dense = targets.toarray() if hasattr(targets, "toarray") else np.asarray(targets)
    if model.uses_counts:
        # The count heads are fitted to counts; only the log-expression head (MSE on the
        # unscaled target) starts at the gene-mean predictor, as every other network does.
        prediction_layer = getattr(model, "prediction_layer", None)
        if prediction_layer is not None:
            start_at_gene_means(prediction_layer(), np.asarray(dense, dtype=np.float64).mean(axis=0))
        return targets, None
    layer = output_layer(model.network, len(model.genes))
    if layer is None:
        raise InputError(
            f"recipe='small_data' needs the {model.name} network to end in a linear layer with one output per "
            f"gene, and it has none; train it with recipe='paper'."
        )
    scale = target_scale(targets)
    scaled = (np.asarray(dense, dtype=np.float64) / scale).astype(np.float32)
    start_at_gene_means(layer, scaled.mean(axis=0))
    return scaled, scale


def start_at_gene_means(layer, means: np.ndarray) -> None:
    """Zero the layer's weights and set its bias to ``means``: the first prediction is the gene means.

    With random weights the output starts as mean + noise; the optimiser first removes the
    noise by shrinking these weights, which also cuts the gradient to every earlier layer, and
    THItoGene-tiny then sat at the gene-mean loss for up to ~110 epochs before it learned.
    """
    import torch

    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.as_tensor(means, dtype=layer.bias.dtype))


def fold_output_scale(model, scale: np.ndarray | None) -> None:
    """Multiply the output layer by the per-gene scale: predictions return to the target scale.

    Exact for a ReLU after the layer too, because the scale is positive.
    """
    import torch

    if scale is None:
        return
    layer = output_layer(model.network, len(model.genes))
    factor = torch.as_tensor(scale, dtype=layer.weight.dtype)
    with torch.no_grad():
        layer.weight.mul_(factor[:, None])
        layer.bias.mul_(factor)


def standardize_features(features: np.ndarray, data_params) -> np.ndarray:
    """Apply a model's stored input standardisation (small-data recipe) to a feature matrix."""
    spec = data_params.get("input_standardization")
    if not spec:
        return features
    mean = np.asarray(spec["mean"], dtype=np.float32)
    scale = np.asarray(spec["scale"], dtype=np.float32)
    if features.shape[1] != mean.size:
        return features  # check_inputs reports the width mismatch with its own message
    return (features - mean) / scale


def with_schedule(optimizer, total_steps: int):
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of the learning rate."""
    import torch

    total = max(1, int(total_steps))
    warmup = max(1, int(round(WARMUP_FRACTION * total)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def small_data_optimizers(configured, total_steps: int):
    """Add the recipe's schedule to what a method's ``configure_optimizers`` returned."""
    import torch

    if isinstance(configured, torch.optim.Optimizer):
        return with_schedule(configured, total_steps)
    logger.info("recipe='small_data': the method brings its own learning-rate schedule; it is kept.")
    return configured
