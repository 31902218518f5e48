"""Figures for the recipes and the studies: matplotlib, written to files, never shown."""

from __future__ import annotations

import textwrap
from typing import Any


def new_figure(columns: int = 1, width: float = 7.0, height: float = 4.5) -> tuple[Any, list[Any]]:
    """A figure with ``columns`` axes side by side, on matplotlib's file-only backend.

    Example:
        >>> figure, (axis,) = new_figure()
        >>> save_figure(figure, "/tmp/empty_plot.png")
        '/tmp/empty_plot.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)
    return figure, list(axes[0])


def save_figure(figure: Any, path: str, caption: str | None = None) -> str:
    """Caption, lay out, write and close ``figure``; returns ``path``."""
    import matplotlib.pyplot as plt

    if caption:
        # Wrapped to the figure's width: a caption of one long line runs off both edges.
        figure.suptitle(textwrap.fill(caption, width=int(16 * figure.get_figwidth())), fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
