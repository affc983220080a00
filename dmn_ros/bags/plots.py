"""PNG figures of one evaluated bag: the trajectory (estimate, ground truth, contexts) and error over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmn_ros.files import atomic_save_figure

__all__ = ["plot_error", "plot_trajectory"]


def _plt():  # returns matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectory(path: str | Path, *, estimate: np.ndarray, truth: np.ndarray, contexts: np.ndarray,
                    title: str = "") -> None:
    """Top-down x-y plot: ground truth (black), estimate (red, start marked), contexts (blue arrows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    if len(truth):
        ax.plot(truth[:, 0], truth[:, 1], "k.-", lw=1.5, ms=3, label="ground truth")
        ax.plot(truth[0, 0], truth[0, 1], "ko", ms=7, mfc="none")
    if len(estimate):
        ax.plot(estimate[:, 0], estimate[:, 1], "r.-", lw=1.0, ms=3, label="estimate")
        ax.plot(estimate[0, 0], estimate[0, 1], "ro", ms=7, mfc="none")
    if len(contexts):
        ax.quiver(contexts[:, 0], contexts[:, 1], np.cos(contexts[:, 2]), np.sin(contexts[:, 2]), color="tab:blue",
                  angles="xy", scale_units="xy", scale=0.6, width=0.004, label="contexts")
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def plot_error(path: str | Path, *, times: np.ndarray, errors: np.ndarray, threshold_m: float,
               title: str = "") -> None:
    """x-y error (m) against time since the first frame, with the success threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(times, errors, "r.-", label="x-y error")
    ax.axhline(threshold_m, color="g", ls="--", label=f"success < {threshold_m:.2f} m")
    ax.set_xlabel("time since first frame (s)")
    ax.set_ylabel("error (m)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
