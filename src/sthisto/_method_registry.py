"""The method registry: names → method classes, timm-style.

Each method module registers its class with :func:`register_method`. A class may declare
named variants (``variants = {"tiny": {...network kwargs...}}``), registered as
``"<name>_<variant>"``, so one parametrised test covers every method cheaply.

The registry lives in the ground layer so that model files (:mod:`sthisto.io`) find a saved
model's class without importing :mod:`sthisto.models`: the method modules register into it,
and the built-in ones are imported by name on first use. :mod:`sthisto.models._registry`
re-exports it beside :func:`~sthisto.models.create`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import InputError

# Modules defining the built-in methods; imported on first use of the registry so that
# ``import sthisto`` stays light.
_BUILTIN_METHOD_MODULES = (
    "sthisto.models.thitogene",
    "sthisto.models.hggef",
    "sthisto.models.histosge",
    "sthisto.models.histospace",
    "sthisto.models.ridge",
    "sthisto.models.ridge_context",
)

_METHODS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}
_builtins_loaded = False


def register_method(cls: type) -> type:
    """Register a method class under ``cls.name``, its ``aliases`` and its ``variants``.

    Parameters
    ----------
    cls
        A subclass of :class:`sthisto.models.ExpressionModel` (or any class following its
        protocol) with a unique ``name``.

    Returns
    -------
    The class, unchanged, so this works as a decorator.
    """
    name = cls.name.lower()
    taken = set(_METHODS) | set(_ALIASES) | set(_VARIANTS)
    new_names = [name, *(a.lower() for a in getattr(cls, "aliases", ()))]
    new_names += [f"{name}_{v}" for v in getattr(cls, "variants", {})]
    clash = [n for n in new_names if n in taken and _resolve_loaded(n)[0] is not cls]
    if clash:
        raise InputError(f"method name(s) {clash} are already registered; choose another name.")
    _METHODS[name] = cls
    for alias in getattr(cls, "aliases", ()):
        _ALIASES[alias.lower()] = name
    for variant, params in getattr(cls, "variants", {}).items():
        _VARIANTS[f"{name}_{variant}"] = (name, dict(params))
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_METHOD_MODULES:
        importlib.import_module(module)


def _resolve_loaded(name: str) -> tuple[type | None, dict[str, Any]]:
    if name in _METHODS:
        return _METHODS[name], {}
    if name in _ALIASES:
        return _METHODS[_ALIASES[name]], {}
    if name in _VARIANTS:
        base, params = _VARIANTS[name]
        return _METHODS[base], dict(params)
    return None, {}


def resolve_method(method) -> tuple[type, dict[str, Any]]:
    """Return ``(method class, variant parameters)`` for a name, alias, variant or class.

    Raises
    ------
    InputError
        For an unknown name; the message lists the valid ones.
    """
    if isinstance(method, type):
        return method, {}
    if not isinstance(method, str):
        return type(method), {}
    _load_builtins()
    cls, params = _resolve_loaded(method.lower())
    if cls is None:
        raise InputError(f"unknown method {method!r}. Valid names: {', '.join(list_models())}.")
    return cls, params


def list_models(*, include_variants: bool = True, include_aliases: bool = False) -> list[str]:
    """Names of the registered methods.

    Parameters
    ----------
    include_variants
        Include registered variants such as ``"thitogene_tiny"``.
    include_aliases
        Include aliases such as ``"hggep"``.

    Returns
    -------
    Sorted list of names accepted by :func:`create` and :func:`sthisto.tl.train`.
    """
    _load_builtins()
    names = set(_METHODS)
    if include_variants:
        names |= set(_VARIANTS)
    if include_aliases:
        names |= set(_ALIASES)
    return sorted(names)
