"""Plots for benchmark reports: written with matplotlib's Agg canvas, never a window.

Generic on purpose (series of (x, y) points per name), so that every benchmark draws its
figures the same way. Files are published through ``r2led.atomic``: never half-written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from r2led.atomic import staged_file


def line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    notes: Sequence[str] = (),
    highlight: str | None = None,
) -> Path:
    """One line with markers per series name; ``notes`` are printed under the axes.

    A series with no points still gets a legend entry (marked "not run"), so a model that
    was skipped everywhere is visibly absent rather than silently missing.
    ``highlight`` draws that series thicker (e.g. the method against its baselines).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    fig = Figure(figsize=(7.5, 5.0 + 0.22 * len(notes)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        label = name if points else f"{name} (not run)"
        width = 2.6 if name == highlight else 1.4
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=width, label=label)
    plain = FuncFormatter(lambda v, _: f"{v:,.6g}")  # 1,000 rather than 10^3
    drawn = [p for points in series.values() for p in points]
    if not drawn:  # nothing ran: an empty, labelled figure (log axes need data)
        ax.text(0.5, 0.5, "no measurements", transform=ax.transAxes, ha="center", va="center")
    if logx and drawn:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
    if logy and drawn:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize="small", ncols=2)
    if notes:
        # A figure-level x label takes part in the constrained layout: the notes never overlap.
        fig.supxlabel("\n".join(notes), x=0.01, ha="left", fontsize="x-small")
    save_figure(fig, path, dpi=130)
    return path


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Write a matplotlib figure atomically (``r2led.atomic.staged_file``); format from the suffix."""
    path = Path(path)
    with staged_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
