"""One PNG at the end of a run: a panel per logged series (loss, learning rate, tokens/s) over optimizer steps.

matplotlib is optional. It is imported only here, when a plot is asked for, and drawn through
`matplotlib.figure.Figure` with the Agg canvas, never pyplot: pyplot would pick (and pin) a global backend
and register the figure in the user's session, e.g. a notebook that imports fastllava and trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

PANEL_SIZE_IN = (8.0, 2.4)  # width, height of one panel in inches; 100 dpi -> 800 x 240 px per panel
DPI = 100
LINE_COLOR = "tab:blue"


def plot_run(path: str | Path, steps: Sequence[int], series: Mapping[str, Sequence[float]], *, title: str = "",
             log_scale: Sequence[str] = ("loss",)) -> Path | None:
    """Write a PNG with one panel per series, stacked vertically on a shared step axis.

    Args:
        path: the PNG to write; missing parent folders are created.
        steps: optimizer steps, ints, shape (S,).
        series: name -> values, each shape (S,), one per step ("loss", "learning rate", "tokens/s").
            NaN values are drawn as gaps. Panels appear in the mapping's order.
        title: drawn above the panels.
        log_scale: names of series drawn on a log y-axis when every finite value is > 0.

    Returns the path written, or None when nothing was drawn: no steps or no series, or matplotlib is not
    installed (the caller can suggest `pip install "fastllava[plot]"`).
    Raises ValueError naming the series whose length differs from `steps`.
    """
    steps = list(steps)
    for name, values in series.items():
        if len(values) != len(steps):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(steps)} steps; "
                             f"pass one value per step")
    if not steps or not series:
        return None
    try:
        # `import matplotlib` first: it is what fails when matplotlib is absent (or blocked in sys.modules),
        # even if a submodule below was imported earlier.
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None

    fig = _figure(steps, series, title=title, log_scale=log_scale)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; savefig renders through it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _figure(steps: list[int], series: Mapping[str, Sequence[float]], *, title: str, log_scale: Sequence[str]):
    """The matplotlib Figure that plot_run saves (separate so tests can inspect its panels)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    width, height = PANEL_SIZE_IN
    fig = Figure(figsize=(width, height * len(series) + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    # A single step would otherwise be an invisible zero-length line.
    marker = "o" if len(steps) == 1 else None
    for ax, (name, values) in zip(axes, series.items()):
        values = [float(v) for v in values]
        ax.plot(steps, values, color=LINE_COLOR, linewidth=1.2, marker=marker, markersize=3)
        ax.set_title(name, loc="left", fontsize=10)
        ax.set_ylabel(name)
        finite = [v for v in values if math.isfinite(v)]
        if name in log_scale and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # a 5-step run has no step 2.5
    if title:
        fig.suptitle(title)
    return fig
