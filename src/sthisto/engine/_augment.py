"""Training-time patch augmentation of the small-data recipe (issue 14).

H&E tissue has no preferred orientation: a patch rotated by a multiple of 90° or mirrored is as
likely a patch of the same tissue, with the same expression. Showing each training spot under
a random one of those eight views (the dihedral group of the square) multiplies the distinct
images a from-scratch encoder sees by eight without changing a single pixel value, which is
why the recipe uses these and no colour or scale change (those would move a patch off the
stain and µm/px the model is asked to predict at). Prediction never augments.
"""

from __future__ import annotations

import torch

N_VIEWS = 8


def dihedral_views(patches: torch.Tensor) -> torch.Tensor:
    """Each patch under a random one of the 8 rotations / reflections of the square.

    Parameters
    ----------
    patches
        ``(N, C, H, W)`` with ``H == W`` (any dtype). Draws from torch's global generator,
        which the training loop reseeds at every epoch, so runs and resumed runs repeat.

    Returns
    -------
    A new tensor of the same shape; ``patches`` is left as it was.
    """
    if patches.ndim != 4 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"dihedral views need square (N, C, H, H) patches, got shape {tuple(patches.shape)}.")
    view = torch.randint(0, N_VIEWS, (patches.shape[0],))
    out = torch.empty_like(patches)
    for index in range(N_VIEWS):
        rows = torch.nonzero(view == index, as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        rows = rows.to(patches.device)
        chosen = patches[rows]
        if index >= 4:  # the four reflections: transpose, then rotate
            chosen = chosen.transpose(-1, -2)
        out[rows] = torch.rot90(chosen, index % 4, dims=(-2, -1))
    return out


def augment_batch(batch: dict) -> dict:
    """The batch with its ``patches`` (if square) under random dihedral views; other keys shared."""
    patches = batch.get("patches")
    if not isinstance(patches, torch.Tensor) or patches.ndim != 4 or patches.shape[-1] != patches.shape[-2]:
        return batch
    return {**batch, "patches": dihedral_views(patches)}
