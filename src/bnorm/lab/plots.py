"""Plot helpers shared by the experiments (matplotlib, Agg backend, small PNGs)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on these machines; must precede pyplot's import

import matplotlib.pyplot as plt
import numpy as np


def band_plot(
    path: Path,
    x: Sequence[float],
    curves: Mapping[str, Sequence[Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hline: tuple[float, str] | None = None,
    logx: bool = False,
) -> str:
    """One median line and a min–max band over seeds per curve; returns the file name.

    ``curves[label]`` is a list (one per seed) of y values aligned with ``x``; None is missing.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for label, runs in curves.items():
        y = np.array([[np.nan if v is None else v for v in run] for run in runs], dtype=float)
        xs = np.asarray(x[: y.shape[1]], dtype=float)
        with warnings.catch_warnings():
            # A point where every seed is missing (e.g. all diverged) is a gap, not an error.
            warnings.simplefilter("ignore", RuntimeWarning)
            mid, low, high = (np.nanmedian(y, 0), np.nanmin(y, 0), np.nanmax(y, 0))
        (line,) = ax.plot(xs, mid, label=label)
        ax.fill_between(xs, low, high, alpha=0.2, lw=0, color=line.get_color())
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls="--", lw=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path.name
