"""fastllava.train.plot.plot_run: one PNG, a panel per series, no pyplot, None without matplotlib."""

import math
import sys

import pytest

from fastllava.train import plot
from fastllava.train.plot import plot_run

STEPS = list(range(1, 41))
SERIES = {
    "loss": [3.0 * math.exp(-s / 10) + 0.3 for s in STEPS],
    "learning rate": [2e-3 * min(1.0, s / 8) for s in STEPS],
    "tokens/s": [12000.0 + 500.0 * math.sin(s) for s in STEPS],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writes_a_png_matplotlib_can_read_back(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = plot_run(tmp_path / "plots" / "run.png", STEPS, SERIES, title="pretrain")
    assert path == tmp_path / "plots" / "run.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    # The figure is sized per panel, so the height says three panels (+ the title's strip) were laid out.
    width, height = plot.PANEL_SIZE_IN
    assert pixels.shape == (round(plot.DPI * (3 * height + 0.4)), round(plot.DPI * width), 4)


def test_one_panel_per_series_with_its_data(tmp_path):
    pytest.importorskip("matplotlib")
    fig = plot._figure(STEPS, SERIES, title="run", log_scale=("loss",))
    assert len(fig.axes) == 3
    for ax, (name, values) in zip(fig.axes, SERIES.items()):
        assert ax.get_title(loc="left") == name and ax.get_ylabel() == name
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == STEPS and list(line.get_ydata()) == values
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "linear"]
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[2])
    # A loss that is not all positive cannot go on a log axis.
    fig = plot._figure([1, 2], {"loss": [0.5, 0.0]}, title="", log_scale=("loss",))
    assert fig.axes[0].get_yscale() == "linear"


def test_every_panel_shows_its_curve(tmp_path):
    """The written pixels, not just the figure object: each panel's horizontal band holds a curve's worth of
    pixels in the line colour (hundreds: the curves span ~650 px of axis), and a series of NaN (no line) none."""
    image = pytest.importorskip("matplotlib.image")
    colors = pytest.importorskip("matplotlib.colors")
    np = pytest.importorskip("numpy")
    series = dict(SERIES)
    series["gaps only"] = [float("nan")] * len(STEPS)
    rgb = image.imread(plot_run(tmp_path / "run.png", STEPS, series))[..., :3]
    is_line = np.abs(rgb - np.array(colors.to_rgb(plot.LINE_COLOR))).max(axis=-1) < 0.02
    per_band = [int(is_line[band].sum()) for band in np.array_split(np.arange(rgb.shape[0]), len(series))]
    assert min(per_band[:3]) > 200 and per_band[3] == 0, per_band


def test_missing_matplotlib_returns_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot_run(tmp_path / "run.png", STEPS, SERIES) is None
    assert not (tmp_path / "run.png").exists()


def test_mismatched_lengths_name_the_series(tmp_path):
    with pytest.raises(ValueError, match=r"series 'tokens/s' has 2 values for 3 steps"):
        plot_run(tmp_path / "run.png", [1, 2, 3], {"loss": [1.0, 0.9, 0.8], "tokens/s": [5.0, 6.0]})


def test_nothing_to_plot_returns_none(tmp_path):
    assert plot_run(tmp_path / "a.png", [], {"loss": []}) is None
    assert plot_run(tmp_path / "b.png", [1, 2], {}) is None
    assert list(tmp_path.iterdir()) == []


def test_single_step_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_run(tmp_path / "one.png", [7], {"loss": [2.5]}).read_bytes()[:8] == PNG_SIGNATURE


def test_global_backend_and_pyplot_untouched(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend(auto_select=False)  # auto_select=False: reading it must not resolve it
    # Hide any pyplot an earlier test imported, so an import by plot_run would show (restored afterwards).
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    plot_run(tmp_path / "run.png", STEPS, SERIES)
    assert "matplotlib.pyplot" not in sys.modules
    assert matplotlib.get_backend(auto_select=False) == before
