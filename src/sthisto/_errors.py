"""Exceptions raised on bad input.

Every message names the problem and the fix. They subclass the built-in exception a user
would expect (``ValueError``, ``KeyError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input data cannot be used as given."""


class MissingKeyError(InputError, KeyError):
    """A key, element, section or gene the call needs is absent."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class KeyExistsError(InputError):
    """Writing would overwrite an existing result; pass ``overwrite=True`` or another key."""


class NoImageError(InputError):
    """A section has no image but the call needs pixels."""
