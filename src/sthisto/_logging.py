"""The package logger. Writes to AnnData are logged at INFO level by :mod:`sthisto._anndata`."""

from __future__ import annotations

import logging

logger = logging.getLogger("sthisto")
