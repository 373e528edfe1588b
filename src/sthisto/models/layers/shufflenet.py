"""ShuffleNet V2 (×0.5) trunk for HGGEF, and loading its ImageNet weights without a download.

HGGEF uses torchvision's ``shufflenet_v2_x0_5`` up to ``conv5`` and skips the max-pool after
``conv1`` (its input, the gradient-enhanced patch, is already at half resolution). ImageNet
weights are read from a file the user names, or from torchvision's download cache when it
holds them; sthisto never downloads. Without weights the trunk keeps its random
initialisation and a warning says how to supply them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..._compat import import_torchvision
from ..._errors import InputError
from ..._logging import logger

#: File-name pattern of torchvision's ImageNet checkpoint in ``$TORCH_HOME/hub/checkpoints``.
CACHE_PATTERN = "shufflenetv2_x0.5-*.pth"
_TRUNK_PARTS = ("conv1", "stage2", "stage3", "stage4", "conv5")


class ShuffleNetTrunk(nn.Module):
    """``conv1 → stage2 → stage3 → stage4 → conv5`` of ShuffleNet V2 ×0.5, without max-pool.

    Module names match torchvision's, so its checkpoints load directly (minus ``fc``).
    :meth:`forward` returns the ``stage4`` (192 channels) and ``conv5`` (1024 channels) maps.
    """

    stage4_channels = 192
    conv5_channels = 1024

    def __init__(self) -> None:
        super().__init__()
        torchvision = import_torchvision()
        reference = torchvision.models.shufflenet_v2_x0_5(weights=None)
        for name in _TRUNK_PARTS:
            setattr(self, name, getattr(reference, name))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(N, 3, H, W)`` to ``(stage4, conv5)`` feature maps."""
        x = self.conv1(x)
        x = self.stage3(self.stage2(x))
        stage4 = self.stage4(x)
        return stage4, self.conv5(stage4)

    @staticmethod
    def output_side(input_side: int) -> int:
        """Side of the ``stage4``/``conv5`` maps for a square input of ``input_side`` pixels."""
        side = input_side
        for _ in range(4):  # conv1, stage2, stage3, stage4: 3 × 3, stride 2, padding 1
            side = (side - 1) // 2 + 1
        return side


def cached_imagenet_weights() -> Path | None:
    """Path of torchvision's cached ``shufflenet_v2_x0_5`` ImageNet checkpoint, if present.

    Looks in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``), where torchvision stores its downloads.
    """
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    if not directory.is_dir():
        return None
    matches = sorted(directory.glob(CACHE_PATTERN))
    return matches[-1] if matches else None


def _trunk_state_dict(raw: Mapping, source: Path) -> dict[str, torch.Tensor]:
    state = raw
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"{source} does not hold a state dict of tensors. Save the weights with "
            f"torch.save(torchvision.models.shufflenet_v2_x0_5(...).state_dict(), path)."
        )
    trunk = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.split(".", 1)[0] in _TRUNK_PARTS:
            trunk[key] = value
    return trunk


def load_trunk_weights(trunk: ShuffleNetTrunk, path: str | os.PathLike) -> Path:
    """Load ImageNet (or any compatible) ``shufflenet_v2_x0_5`` weights into ``trunk``.

    Parameters
    ----------
    trunk
        The trunk to fill.
    path
        A file written by ``torch.save`` holding torchvision's ``shufflenet_v2_x0_5`` state
        dict (optionally under ``"state_dict"``/``"model"``, keys optionally prefixed
        ``module.``). The classifier (``fc``) is ignored. Read with ``weights_only=True``.

    Returns
    -------
    The resolved path that was read.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise InputError(
            f"backbone weights file {source} does not exist. Pass the path of torchvision's "
            f"shufflenet_v2_x0_5 checkpoint (e.g. {Path(torch.hub.get_dir()) / 'checkpoints'}/"
            f"shufflenetv2_x0.5-f707e7126e.pth), or backbone_weights=None for random weights."
        )
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable or unsafe files
        raise InputError(
            f"could not read backbone weights from {source} ({err}). The file must be a torch.save'd "
            f"state dict of tensors."
        ) from err
    state = _trunk_state_dict(raw, source)
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(
            f"{source} lacks {len(missing)} shufflenet_v2_x0_5 weights (first: {missing[:3]}); it is not a "
            f"shufflenet_v2_x0_5 checkpoint. Use torchvision's ImageNet file for that model."
        )
    mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise InputError(
            f"{source} has weights of the wrong shape (e.g. {k}: {tuple(state[k].shape)} instead of "
            f"{tuple(expected[k].shape)}); it is not a shufflenet_v2_x0_5 (×0.5 width) checkpoint."
        )
    trunk.load_state_dict({k: state[k] for k in expected}, strict=True)
    return source


def build_shufflenet_trunk(weights: str | os.PathLike | None = "auto") -> ShuffleNetTrunk:
    """Create the trunk and load its weights.

    Parameters
    ----------
    weights
        ``"auto"``: torchvision's cached ImageNet checkpoint when present (see
        :func:`cached_imagenet_weights`), otherwise random weights and a
        :class:`~sthisto.encoders.RandomWeightsWarning`. A path: load that file (an error if it
        is missing or incompatible). ``None``: random weights, silently (an explicit choice).

    Returns
    -------
    The trunk; its ``weights_source`` attribute names the file loaded, or is ``None``, and its
    ``weights_provenance`` is the record (:func:`sthisto.encoders.weights_provenance`) models
    store in their manifest: ``cache`` / ``file`` with path and SHA-256, or ``random``.
    """
    from ...encoders._provenance import warn_random_weights, weights_provenance

    trunk = ShuffleNetTrunk()
    trunk.weights_source = None
    trunk.weights_provenance = weights_provenance("random", architecture="shufflenet_v2_x0_5")
    if weights is None:
        return trunk
    source = "file"
    if isinstance(weights, str) and weights == "auto":
        cached = cached_imagenet_weights()
        if cached is None:
            warn_random_weights(
                "HGGEF's ShuffleNet V2 x0.5 backbone",
                f"No ImageNet weights for shufflenet_v2_x0_5 were found in {Path(torch.hub.get_dir()) / 'checkpoints'}; "
                "pass backbone_weights='/path/to/shufflenetv2_x0.5-f707e7126e.pth' (torchvision's checkpoint) or "
                "place that file in that folder (sthisto never downloads). backbone_weights=None chooses random "
                "weights explicitly and silences this.",
                stacklevel=4,
            )
            return trunk
        weights, source = cached, "cache"
    trunk.weights_source = str(load_trunk_weights(trunk, weights))
    trunk.weights_provenance = weights_provenance(source, path=trunk.weights_source)
    logger.info("HGGEF backbone: loaded shufflenet_v2_x0_5 weights from %s", trunk.weights_source)
    return trunk
