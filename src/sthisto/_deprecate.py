"""Old spellings of public parameters, kept working for one release with a ``FutureWarning``.

One knob has one name across the package (see ``docs/architecture.md``, "Conventions"). When a
name changes, the function's signature shows only the new one; the old keyword is accepted by
the wrapper below, warns with the name to use, and is passed on under the new name. The
structure test reads ``__deprecated_parameters__`` so it can tell a shim from a stray spelling.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from ._errors import InputError


def renamed_parameters(**renames: str) -> Callable:
    """Accept ``old=`` keywords as deprecated spellings of ``new=`` (``renamed_parameters(old="new")``)."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise InputError(
                        f"{function.__name__} got both {old}= and {new}=; {old}= is the deprecated spelling "
                        f"of {new}=, pass {new}= only."
                    )
                warnings.warn(
                    f"{function.__name__}({old}=...) is deprecated and will be removed in the next release; "
                    f"use {new}= instead.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        wrapper.__deprecated_parameters__ = {**getattr(function, "__deprecated_parameters__", {}), **renames}
        return wrapper

    return decorate


def removed_copy(replacement: str, on_copy: Callable[..., Any] | None = None) -> Callable:
    """Accept the ``copy=`` of a function that returns a new object by design, warning with ``replacement``.

    ``on_copy(function, args, kwargs)`` reproduces the old ``copy=True`` behaviour for one
    release; ``copy=False`` (the old default) simply runs the function.
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if "copy" not in kwargs:
                return function(*args, **kwargs)
            copy = kwargs.pop("copy")
            warnings.warn(
                f"{function.__name__}(copy=...) is deprecated and will be removed in the next release: "
                f"{function.__name__} returns a new object by design. {replacement}",
                FutureWarning,
                stacklevel=2,
            )
            if copy and on_copy is not None:
                return on_copy(function, args, kwargs)
            return function(*args, **kwargs)

        wrapper.__deprecated_parameters__ = {**getattr(function, "__deprecated_parameters__", {}), "copy": None}
        return wrapper

    return decorate
