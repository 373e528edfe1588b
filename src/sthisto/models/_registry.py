"""The method registry (names → method classes, :mod:`sthisto._method_registry`) and ``create``.

Each method module registers its class with :func:`register_method`. A class may declare
named variants (``variants = {"tiny": {...network kwargs...}}``), registered as
``"<name>_<variant>"``, so one parametrised test covers every method cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._method_registry import _METHODS as _METHODS
from .._method_registry import _load_builtins as _load_builtins
from .._method_registry import list_models as list_models
from .._method_registry import register_method as register_method
from .._method_registry import resolve_method

if TYPE_CHECKING:
    import torch


def create(name: str, *, n_genes: int, **params: Any) -> torch.nn.Module:
    """Create the network of a method with the paper's defaults, like ``timm.create_model``.

    Parameters
    ----------
    name
        A registered method name, alias or variant (see :func:`list_models`).
    n_genes
        Number of genes the network predicts.
    **params
        Network keyword arguments overriding the defaults.

    Returns
    -------
    The method's :class:`torch.nn.Module` (untrained). Methods without a network (the ridge
    baseline) raise :class:`InputError`.

    Examples
    --------
    >>> net = sthisto.models.create("thitogene", n_genes=785)
    >>> sum(p.numel() for p in net.parameters())
    63586712
    """
    cls, variant_params = resolve_method(name)
    return cls.create_network(n_genes=n_genes, **{**variant_params, **params})
