"""The package logger and ``sthisto.settings.verbosity``.

Levels follow ``scanpy.settings.verbosity``: 0 ``error``, 1 ``warning``, 2 ``info``, 3 ``hint``,
4 ``debug``. sthisto's default is ``info`` (scanpy's is ``warning``): users see warnings and,
for each call that writes into an AnnData, one line naming every key it added (logged by
:mod:`sthisto._anndata`). At ``hint`` each key is also logged as it is written.

Messages go to the ``"sthisto"`` logger, which keeps propagating to the root logger, so
``logging`` configuration and pytest's ``caplog`` still see them; the handler sthisto installs
writes to the ``sys.stderr`` of the moment (a notebook's, a test's capture).
"""

from __future__ import annotations

import logging
import sys
from enum import IntEnum

from ._errors import InputError

HINT = 15  # scanpy's level between DEBUG and INFO
logging.addLevelName(HINT, "HINT")

logger = logging.getLogger("sthisto")


class Verbosity(IntEnum):
    """How much sthisto logs (the numbers and names of ``scanpy.settings.verbosity``)."""

    error = 0
    warning = 1
    info = 2
    hint = 3
    debug = 4


_LEVELS = {
    Verbosity.error: logging.ERROR,
    Verbosity.warning: logging.WARNING,
    Verbosity.info: logging.INFO,
    Verbosity.hint: HINT,
    Verbosity.debug: logging.DEBUG,
}


class _StderrHandler(logging.StreamHandler):
    """Write to the current ``sys.stderr``, which notebooks and test captures replace."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # StreamHandler reads it on every emit
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


def _as_verbosity(value) -> Verbosity:
    if isinstance(value, str):
        try:
            return Verbosity[value.lower()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 4:
        return Verbosity(value)
    names = ", ".join(f"{v.value} / {v.name!r}" for v in Verbosity)
    raise InputError(f"verbosity={value!r} is not a verbosity level; use one of {names}.")


class Settings:
    """Package-wide settings, as ``sthisto.settings`` (after ``scanpy.settings``).

    Attributes
    ----------
    verbosity
        How much sthisto logs, a :class:`Verbosity`: set an int 0–4 or its name. ``"error"`` (0)
        errors only; ``"warning"`` (1) also warnings; ``"info"`` (2, the default) also one line
        per call naming every key it wrote and a few progress notes; ``"hint"`` (3) also each
        key as it is written; ``"debug"`` (4) everything.
    """

    def __init__(self) -> None:
        self._handler = _StderrHandler()
        self._handler.setFormatter(_Formatter())
        logger.addHandler(self._handler)
        self.verbosity = Verbosity.info

    @property
    def verbosity(self) -> Verbosity:
        """How much sthisto logs: 0 ``error``, 1 ``warning``, 2 ``info``, 3 ``hint``, 4 ``debug``."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: Verbosity | int | str) -> None:
        self._verbosity = _as_verbosity(value)
        level = _LEVELS[self._verbosity]
        logger.setLevel(level)
        self._handler.setLevel(level)

    def __repr__(self) -> str:
        return f"sthisto.settings(verbosity={self._verbosity.value} / {self._verbosity.name!r})"


settings = Settings()
