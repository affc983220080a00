"""Belief pictures like the paper's Fig. 5, the one implementation ``dmn-eval`` and ``dmn-demo`` draw with.

One PNG row, one panel per chosen filter step: the particles' weights summed into x-y cells over all
yaws (a heat map of the yaw-marginal belief), the context viewpoints, the true path up to t with the
true pose and the estimate as arrows, and the walls of a top-down occupancy grid where the caller has one. ROS-free;
matplotlib with the Agg backend, imported only when a picture is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmn_ros.files import atomic_save_figure

__all__ = ["BeliefFrame", "plot_belief_row", "steps_to_draw", "yaw_marginal"]

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class BeliefFrame:
    """The belief after one filter step, metric."""

    t: int
    """1-based step."""
    particles: np.ndarray
    """``(K, 3)`` particle poses (x, y, yaw) in meters / radians."""
    weights: np.ndarray
    """``(K,)`` normalized weights."""
    truth: np.ndarray
    """``(3,)`` true pose."""
    estimate: np.ndarray
    """``(3,)`` the filter's estimate."""
    error: float
    """x-y error of the estimate in meters."""


def steps_to_draw(T: int, wanted: Sequence[int] = (1, 2, 5)) -> list[int]:
    """The 1-based steps of a picture row: ``wanted`` and ``T``, clipped to ``[1, T]``, sorted, unique."""
    return sorted({min(max(int(s), 1), T) for s in (*wanted, T)})


def yaw_marginal(particles: np.ndarray, weights: np.ndarray, bounds: Bounds, cells: int = 40) -> np.ndarray:
    """Weights summed into a ``cells x cells`` x-y grid over all yaws, ``(rows = y ascending, cols = x ascending)``.

    Each particle adds its weight to the cell its (x, y) falls in, whatever its yaw; a particle outside
    ``bounds`` (xmin, xmax, ymin, ymax) is left out (the last cell of each axis includes its upper edge).
    """
    xmin, xmax, ymin, ymax = (float(v) for v in bounds)
    p = np.asarray(particles, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    hist, _, _ = np.histogram2d(p[:, 0], p[:, 1], bins=(cells, cells), range=((xmin, xmax), (ymin, ymax)), weights=w)
    return hist.T


def plot_belief_row(
    path: str | Path,
    frames: Sequence[BeliefFrame],
    *,
    bounds: Bounds,
    contexts: np.ndarray,
    title: str,
    occupancy: np.ndarray | None = None,
    truth_path: np.ndarray | None = None,
    view_positions: np.ndarray | None = None,
    cells: int = 40,
    dpi: int = 90,
) -> Path:
    """Write one PNG row (atomically, :func:`~dmn_ros.files.atomic_save_figure`), one panel per frame.

    Args:
        frames: the steps to draw, in order.
        bounds: (xmin, xmax, ymin, ymax) of the area in meters: the panels' extent and the heat map's grid.
        contexts: ``(Nc, 3)`` metric context poses.
        occupancy: a bool raster of non-free cells (rows = y ascending, cols = x ascending) over ``bounds``,
            e.g. ``World.occupancy()``; None draws no map.
        truth_path: ``(T, 3)`` true poses from step 1 on; each panel draws it up to its step
            (default: the frames' own truths).
        view_positions: ``(N, 2+)`` metric positions of other stored views of the environment (a hint of its
            free space where no occupancy grid exists), drawn as faint dots.
        cells: heat-map cells per side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    if not frames:
        raise ValueError("plot_belief_row: no frames to draw")
    xmin, xmax, ymin, ymax = (float(v) for v in bounds)
    extent = (xmin, xmax, ymin, ymax)
    arrow = 0.045 * (xmax - xmin)
    path_xy = np.array([f.truth for f in frames]) if truth_path is None else np.asarray(truth_path)
    ctx = np.asarray(contexts, dtype=np.float64).reshape(-1, 3)
    n = len(frames)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, f in zip(axes[0], frames, strict=True):
        if view_positions is not None:
            vp = np.asarray(view_positions)
            ax.scatter(vp[:, 0], vp[:, 1], s=1, c="0.75", lw=0, label="stored views")
        heat = yaw_marginal(f.particles, f.weights, bounds, cells)
        ax.imshow(np.ma.masked_where(heat <= 0, heat), origin="lower", extent=extent, cmap="viridis",
                  norm=PowerNorm(0.5, vmin=0.0, vmax=max(float(heat.max()), 1e-12)), interpolation="nearest",
                  alpha=0.9)
        if occupancy is not None:  # walls over the heat map, so both stay readable
            occ = np.asarray(occupancy, dtype=bool)
            ax.imshow(np.ma.masked_where(~occ, occ.astype(float)), origin="lower", extent=extent, cmap="Greys",
                      vmin=0.0, vmax=1.0, alpha=0.55, interpolation="nearest")
        ax.scatter(ctx[:, 0], ctx[:, 1], marker="^", c="tab:blue", edgecolors="white", linewidths=0.4, s=30,
                   label="contexts", zorder=3)
        upto = path_xy[: f.t] if truth_path is not None else path_xy[[g.t <= f.t for g in frames]]
        ax.plot(upto[:, 0], upto[:, 1], "-", c="tab:red", lw=1, zorder=3)
        for pose, col, lab in ((f.truth, "tab:red", "truth"), (f.estimate, "tab:orange", "estimate")):
            ax.arrow(pose[0], pose[1], arrow * math.cos(pose[2]), arrow * math.sin(pose[2]), color=col,
                     width=0.14 * arrow, label=lab, zorder=4)
        ax.set_title(f"t={f.t}  err {f.error:.1f} m", fontsize=9)
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    try:
        atomic_save_figure(fig, out, dpi=dpi)
    finally:
        plt.close(fig)
    return out
