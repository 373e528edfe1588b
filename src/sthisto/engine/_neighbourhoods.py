"""Cutting a section's spots into spatial neighbourhoods with a halo of context spots.

Pure geometry on spot centres (and grid positions), used to plan predictions of section-wide
methods; in the engine layer so that training can cut sections the same way.
"""

from __future__ import annotations

import numpy as np

from .._errors import InputError


def neighbourhoods(
    coords: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    max_core: int | None = None,
    halo: float = 3.0,
    max_span: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut one section's spots into spatial neighbourhoods with a halo of context spots.

    The section is split recursively at the median of its longer side (a k-d tree) until
    each part (the *core*) holds at most ``max_core`` spots and, with its halo, spans fewer
    than ``max_span`` grid positions along each axis. The halo is every spot within ``halo``
    spot spacings of the core's bounding box (spacing: the median nearest-neighbour distance).

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres (pixels).
    positions
        ``(n, 2)`` integer grid positions; needed with ``max_span``.
    max_core
        Largest core; ``None``: no limit.
    halo
        Width of the context ring in spot spacings.
    max_span
        Positions of core + halo must span fewer than this many grid steps per axis.

    Returns
    -------
    ``[(core, context), ...]``: sorted indices into ``coords``; every spot is in exactly one
    core, and ``core ⊆ context``. Parts come out in spatial order (first half first).
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if n == 0:
        return []
    if max_span is not None and positions is None:
        raise InputError("neighbourhoods: max_span needs the grid positions.")
    spacing = 0.0
    if n > 1:
        distances, _ = cKDTree(coords).query(coords, k=2)
        spacing = float(np.median(distances[:, 1]))
    reach = halo * spacing
    tree = cKDTree(coords) if reach > 0 else None

    def context_of(core: np.ndarray) -> np.ndarray:
        if tree is None:
            return core
        low = coords[core].min(axis=0) - reach
        high = coords[core].max(axis=0) + reach
        centre = (low + high) / 2
        candidates = np.asarray(tree.query_ball_point(centre, r=float(np.hypot(*(high - low)) / 2) + 1e-9), dtype=int)
        inside = ((coords[candidates] >= low - 1e-9) & (coords[candidates] <= high + 1e-9)).all(axis=1)
        return np.union1d(core, candidates[inside])

    out: list[tuple[np.ndarray, np.ndarray]] = []
    stack = [np.arange(n)]
    while stack:
        core = stack.pop()
        context = context_of(core)
        too_many = max_core is not None and len(core) > max_core
        too_wide = False
        if max_span is not None:
            extent = positions[context].max(axis=0) - positions[context].min(axis=0)
            too_wide = bool((extent >= max_span).any())
        if not (too_many or too_wide):
            out.append((core, context))
            continue
        if len(core) == 1:
            raise InputError(
                f"one spot with its halo of {halo:g} spot spacings spans more than {max_span} grid positions; "
                f"lower prediction_halo or predict on a coarser grid."
            )
        points = coords[core]
        axis = int(np.argmax(np.ptp(points, axis=0)))
        order = np.argsort(points[:, axis], kind="stable")
        half = len(core) // 2
        stack.append(np.sort(core[order[half:]]))
        stack.append(np.sort(core[order[:half]]))
    return out
