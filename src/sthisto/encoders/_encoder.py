"""The :class:`Encoder`: an image → feature-vector callable plus the preprocessing it expects."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._device import resolve_device
from .._errors import InputError
from .._logging import logger
from ._checkpoint import file_fingerprint, load_weights_strict, module_fingerprint, read_state_dict
from ._provenance import provenance_from_text, weights_provenance

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means for inputs scaled to 0–1 (timm's ``IMAGENET_DEFAULT_MEAN``)."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations for inputs scaled to 0–1."""

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
_POOLS = (None, "avg", "flatten")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(eq=False)
class Encoder:
    """An image encoder: a callable ``(B, 3, H, W) float → (B, D)`` and its preprocessing.

    Like timm's pretrained configurations, the encoder carries what its inputs must look like.
    :meth:`encode` takes raw patches (uint8 or float, 0–255, as :class:`sthisto.pp.PatchDataset`
    serves them), resizes them to ``input_size`` if needed, scales them to ``input_range``,
    normalises with ``mean`` / ``std``, and runs the model under ``torch.inference_mode``
    (bf16 autocast on CUDA by default).

    Build one with :func:`sthisto.encoders.get_encoder`, :meth:`from_module`,
    :meth:`from_state_dict`, or directly.

    Parameters
    ----------
    model
        Callable on preprocessed images ``(B, 3, input_size, input_size)`` returning ``(B, D)``
        (or a feature map reduced by ``pool``). Usually a :class:`torch.nn.Module`.
    name
        Short name; :func:`sthisto.pp.embed` writes to ``obsm[f"X_{name}"]`` by default.
    output_dim
        ``D``, the feature width.
    input_size
        Side in pixels of the square images the model takes.
    mean, std
        Per-channel normalisation, in the units of ``input_range``: ``(x - mean) / std``.
    input_range
        ``"0-1"``: pixel values are divided by 255 before normalising (timm / torchvision
        convention); ``"0-255"``: raw values are normalised as they are.
    interpolation
        Resampling used by :meth:`preprocess` when patches are not ``input_size`` already
        (:func:`sthisto.pp.embed` cuts patches at ``input_size`` directly, bilinear with
        antialiasing, so this rarely applies).
    weights
        Where the weights came from, as text: ``"random (seed 0)"``, a local path, a hub id,
        ``"in-memory module"``, ``"none (deterministic features)"``.
    weights_fingerprint
        Identifies the exact weights (file path + size + mtime, parameter hash, seed); used by
        :func:`sthisto.pp.embed` to decide whether cached features are still valid.
    provenance
        Where the weights came from, as a record of
        :func:`sthisto.encoders.weights_provenance` (``source`` ``file`` / ``hub`` / ``cache`` /
        ``random`` / ``none`` / ``module``, with path and SHA-256, hub id and revision, or seed).
        Default: read from ``weights`` and ``weights_fingerprint``.
    pool
        Reduction of a model output with more than two dimensions: ``"avg"`` averages all
        trailing dimensions (global average pooling of a feature map), ``"flatten"`` flattens
        them; ``None`` requires a ``(B, D)`` output.
    patch_size_um
        Field of view this encoder is meant to see, in µm; the default of
        :func:`sthisto.pp.embed`'s ``patch_size_um``. ``None``: the caller must say.
    mixed_precision
        Whether bf16 autocast may be used on CUDA (False for integer-exact feature code).
    channels_last
        Feed the model channels-last tensors and convert its weights (on CUDA and CPU: about
        2× faster convolutions measured on CPU for the HistoSPACE CNN). Off by default because
        a user callable calling ``.view`` on its input would break; timm models and the built-in
        CNN turn it on.
    feature_names
        Optional names of the ``D`` output columns.
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    name: str
    output_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_range: Literal["0-1", "0-255"] = "0-1"
    interpolation: str = "bilinear"
    weights: str = "in-memory module"
    weights_fingerprint: str = ""
    provenance: dict = field(default_factory=dict)
    pool: Literal["avg", "flatten"] | None = None
    patch_size_um: float | None = None
    mixed_precision: bool = True
    channels_last: bool = False
    feature_names: tuple[str, ...] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False)
    _affine: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise InputError(f"Encoder.model must be callable (B, 3, H, W) → (B, D); got {type(self.model).__name__}.")
        if not isinstance(self.name, str) or not self.name:
            raise InputError("Encoder.name must be a non-empty string, e.g. name='my_encoder'.")
        if int(self.input_size) != self.input_size or self.input_size < 1:
            raise InputError(f"input_size={self.input_size!r} must be a positive integer number of pixels.")
        self.input_size = int(self.input_size)
        self.mean = _three(self.mean, "mean")
        self.std = _three(self.std, "std")
        if min(self.std) <= 0:
            raise InputError(f"std={self.std} must be positive in every channel.")
        if self.input_range not in ("0-1", "0-255"):
            raise InputError(f"input_range={self.input_range!r}; use '0-1' (divide by 255) or '0-255' (raw values).")
        if self.interpolation not in _INTERPOLATIONS:
            raise InputError(f"interpolation={self.interpolation!r}; use one of {_INTERPOLATIONS}.")
        if self.pool not in _POOLS:
            raise InputError(f"pool={self.pool!r}; use None, 'avg' or 'flatten'.")
        if int(self.output_dim) != self.output_dim or self.output_dim < 1:
            raise InputError(f"output_dim={self.output_dim!r} must be a positive integer.")
        self.output_dim = int(self.output_dim)
        if self.patch_size_um is not None and not self.patch_size_um > 0:
            raise InputError(f"patch_size_um={self.patch_size_um!r} must be a positive number of µm or None.")
        if self.feature_names is not None:
            self.feature_names = tuple(str(n) for n in self.feature_names)
            if len(self.feature_names) != self.output_dim:
                raise InputError(f"{len(self.feature_names)} feature_names for output_dim={self.output_dim}.")
        if not self.weights_fingerprint:
            self.weights_fingerprint = self.weights
        if not self.provenance:
            self.provenance = provenance_from_text(self.weights, self.weights_fingerprint)
        self.provenance = dict(self.provenance)
        self.device = torch.device(self.device)
        if self.channels_last and isinstance(self.model, nn.Module):
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls,
        module: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_range: Literal["0-1", "0-255"] = "0-1",
        output_dim: int | None = None,
        pool: Literal["avg", "flatten"] | None = None,
        weights: str | None = None,
        **options: Any,
    ) -> Encoder:
        """Wrap a network or any callable with the ``(B, 3, H, W) → (B, D)`` contract.

        Parameters
        ----------
        module
            :class:`torch.nn.Module` (put in eval mode) or plain callable.
        name, input_size, mean, std, input_range, pool
            See :class:`Encoder`.
        output_dim
            ``D``; inferred with a dry run on a blank batch when not given.
        weights
            Description of the weights; default ``"in-memory module"`` (fingerprinted by a
            hash of the parameters) or ``"user callable <name>"``.
        **options
            Other :class:`Encoder` fields (``interpolation``, ``patch_size_um``,
            ``mixed_precision``, ``channels_last``, ``feature_names``, ``weights_fingerprint``).

        Returns
        -------
        The encoder.

        Examples
        --------
        A HistoSPACE-style encoder (inputs scaled to [-1, 1], 128 px tiles):

        >>> enc = Encoder.from_module(
        ...     trained.encoder, name="histospace", input_size=128, mean=(0.5,) * 3, std=(0.5,) * 3, pool="avg"
        ... )
        """
        if not callable(module):
            raise InputError(
                f"an encoder must be a callable (B, 3, H, W) → (B, D), e.g. a torch.nn.Module; got "
                f"{type(module).__name__}."
            )
        if isinstance(module, nn.Module):
            module.eval()
            has_params = any(True for _ in module.state_dict())
            description = weights or "in-memory module"
            fingerprint = options.pop("weights_fingerprint", None) or (
                module_fingerprint(module) if has_params else f"module:{type(module).__qualname__}"
            )
        else:
            qualname = getattr(module, "__qualname__", type(module).__qualname__)
            description = weights or f"user callable {qualname}"
            fingerprint = (
                options.pop("weights_fingerprint", None) or f"callable:{getattr(module, '__module__', '')}.{qualname}"
            )
        if not options.get("provenance") and weights is None:
            options["provenance"] = weights_provenance("module", fingerprint=fingerprint)
        encoder = cls(
            model=module,
            name=name,
            output_dim=1 if output_dim is None else output_dim,
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            input_range=input_range,
            pool=pool,
            weights=description,
            weights_fingerprint=fingerprint,
            **options,
        )
        if output_dim is None:
            encoder.output_dim = encoder.infer_output_dim()
        return encoder

    @classmethod
    def from_state_dict(
        cls,
        module: nn.Module,
        state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
        *,
        name: str,
        input_size: int,
        **options: Any,
    ) -> Encoder:
        """Load weights into ``module`` (strict key and shape matching), then wrap it.

        Parameters
        ----------
        module
            Freshly built network of the right architecture.
        state_dict
            Parameter mapping, or the path of a ``.safetensors`` / ``torch.save`` file (read with
            ``weights_only=True``). Wrapper prefixes such as ``module.`` / ``model.`` are removed.
        name, input_size, **options
            As in :meth:`from_module`.

        Returns
        -------
        The encoder, its ``weights`` naming the file (or ``"state dict"``).
        """
        if isinstance(state_dict, (str, os.PathLike)):
            state = read_state_dict(state_dict)
            origin = str(state_dict)
            options.setdefault("weights_fingerprint", file_fingerprint(state_dict))
            options.setdefault("provenance", weights_provenance("file", path=state_dict))
        elif isinstance(state_dict, Mapping):
            state, origin = dict(state_dict), "state dict"
        else:
            raise InputError(
                f"state_dict must be a mapping of tensors or a file path; got {type(state_dict).__name__}."
            )
        load_weights_strict(module, state, origin=origin)
        options.setdefault("weights", origin)
        return cls.from_module(module, name=name, input_size=input_size, **options)

    def replace(self, **changes: Any) -> Encoder:
        """Return a copy with some fields changed (e.g. ``mean=``, ``std=``, ``name=``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ running
    def to(self, device="auto") -> Encoder:
        """Move the model to ``device`` (``"auto"``: CUDA when present) and return self."""
        resolved = resolve_device(device)
        if isinstance(self.model, nn.Module):
            self.model.to(resolved)
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)
        self.device = resolved
        return self

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """Turn raw patches (uint8 or float, 0–255, ``(B, 3, H, W)``) into model inputs."""
        if patches.ndim != 4 or patches.shape[1] != 3:
            raise InputError(f"patches have shape {tuple(patches.shape)}; expected (B, 3, H, W) RGB.")
        x = patches.to(self.device, non_blocking=True).float()
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            antialias = self.interpolation in ("bilinear", "bicubic")
            x = torch.nn.functional.interpolate(
                x, size=(self.input_size, self.input_size), mode=self.interpolation, antialias=antialias
            )
            x = x.clamp_(0, 255)
        # (x * scale - mean) / std as one multiply-add; the constants stay on the device
        if x.device not in self._affine:
            scale = 1.0 / 255.0 if self.input_range == "0-1" else 1.0
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            self._affine[x.device] = ((-mean / std).to(x.device), (scale / std).to(x.device))
        shift, factor = self._affine[x.device]
        x = torch.addcmul(shift, x, factor)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Run the model on preprocessed images and reduce its output to ``(B, D)``."""
        out = self.model(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise InputError(f"encoder {self.name!r} returned {type(out).__name__}; it must return a tensor (B, D).")
        if out.ndim > 2:
            if self.pool == "avg":
                out = out.flatten(2).mean(dim=2)
            elif self.pool == "flatten":
                out = out.flatten(1)
            else:
                raise InputError(
                    f"encoder {self.name!r} returned shape {tuple(out.shape)}, not (B, D). Pass pool='avg' "
                    f"(global average pooling) or pool='flatten' when wrapping it."
                )
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise InputError(
                f"encoder {self.name!r} returned shape {tuple(out.shape)} for a batch of {images.shape[0]}; "
                f"the contract is (B, 3, H, W) → (B, D)."
            )
        return out

    def encode(self, patches: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
        """Preprocess raw patches and return float32 features ``(B, output_dim)`` on :attr:`device`.

        Parameters
        ----------
        patches
            ``(B, 3, H, W)`` uint8 or float with values 0–255.
        precision
            ``"auto"``: bf16 autocast on CUDA (when :attr:`mixed_precision`), fp32 on CPU;
            ``"bf16"`` or ``"fp32"`` to force.
        """
        use_bf16 = self.resolve_precision(precision) == "bf16"
        with torch.inference_mode():
            x = self.preprocess(patches)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = self(x)
        if out.shape[1] != self.output_dim:
            raise InputError(
                f"encoder {self.name!r} returned {out.shape[1]} features but declares output_dim={self.output_dim}."
            )
        return out.float()

    def resolve_precision(self, precision: str = "auto") -> str:
        """``"bf16"`` or ``"fp32"``: what :meth:`encode` will use for ``precision`` on :attr:`device`."""
        if precision not in PRECISIONS:
            raise InputError(f"precision={precision!r}; use one of {PRECISIONS}.")
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" and self.mixed_precision else "fp32"
        if precision == "bf16" and not self.mixed_precision:
            return "fp32"
        return precision

    def infer_output_dim(self) -> int:
        """Feature width found by running the model on a blank batch of two images."""
        blank = torch.full((2, 3, self.input_size, self.input_size), 255, dtype=torch.uint8)
        device = self.device
        if isinstance(self.model, nn.Module):
            try:
                device = next(self.model.parameters()).device
            except StopIteration:
                pass
        moved = self.device
        self.device = device
        try:
            with torch.inference_mode():
                out = self(self.preprocess(blank))
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"could not run encoder {self.name!r} on a (2, 3, {self.input_size}, {self.input_size}) "
                f"batch to infer its output size: {err}. Check input_size, or pass output_dim=."
            ) from err
        finally:
            self.device = moved
        return int(out.shape[1])

    def compile(self, **kwargs: Any) -> Encoder:
        """Wrap the model with :func:`torch.compile` (worth it for long GPU runs) and return self."""
        if isinstance(self.model, nn.Module):
            self.model = torch.compile(self.model, **kwargs)
        else:
            logger.info("encoder %r is not a torch module; torch.compile skipped", self.name)
        return self

    # ------------------------------------------------------------------ description
    def config(self) -> dict[str, Any]:
        """The encoder's identity and preprocessing, as plain values (recorded by ``pp.embed``)."""
        return {
            "encoder": self.name,
            "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint,
            "weights_provenance": dict(self.provenance),
            "output_dim": self.output_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_range": self.input_range,
            "interpolation": self.interpolation,
            "pool": "none" if self.pool is None else self.pool,
        }

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, output_dim={self.output_dim}, input_size={self.input_size}, "
            f"input_range={self.input_range!r}, mean={self.mean}, std={self.std}, weights={self.weights!r}, "
            f"device={str(self.device)!r})"
        )


def _three(values: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except TypeError:
        out = (float(values),) * 3  # a single number for all channels
    if len(out) == 1:
        out = out * 3
    if len(out) != 3:
        raise InputError(f"{what}={values!r} must have one value per RGB channel (3) or a single value.")
    return out  # type: ignore[return-value]
