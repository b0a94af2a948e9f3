"""ldm_jax.training.curves: training curves (one series per panel, from JSONL) and labelled series (several per
panel, the f-ablation's plots) drawn with Pillow."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.training import curves


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_plot_curves_from_jsonl(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)) + "\n")
    steps, values = curves.read_series(log, "loss")
    np.testing.assert_array_equal(steps, np.arange(1, 11))
    out = tmp_path / "c.png"
    assert curves.main(["--panel", f"loss={log}:loss", "--panel", f"again={log}:loss", "--out", str(out)]) == 0
    pixels = _pixels(out)
    assert pixels.shape == (curves.PANEL_SIZE[1], 2 * curves.PANEL_SIZE[0], 3)
    assert (pixels == curves.COLOURS[0]).all(-1).sum() > 100  # the line is drawn
    with pytest.raises(ValueError, match="no line has both 'step' and 'psnr'"):
        curves.read_series(log, "psnr")
    assert curves.main(["--panel", "no-separator", "--out", str(out)]) == 2


def test_plot_series_draws_each_series_in_its_colour(tmp_path):
    panels = [("FSD", [("f=1", [1, 2, 4], [30.0, 20.0, 10.0]), ("f=4", [1, 2, 4], [12.0, 8.0, 6.0])]),
              ("throughput", [("f=1", [0.3], [10.0]), ("f=4", [7.0], [6.0]), ("f=8", [20.0], [9.0])])]
    out = curves.plot_series(panels, tmp_path / "s.png", x_label="minutes")
    pixels = _pixels(out)
    assert pixels.shape == (curves.PANEL_SIZE[1], 2 * curves.PANEL_SIZE[0], 3)
    left, right = pixels[:, :curves.PANEL_SIZE[0]], pixels[:, curves.PANEL_SIZE[0]:]
    for index in range(2):
        assert (left == curves.COLOURS[index]).all(-1).sum() > 50
    assert (left == curves.COLOURS[2]).all(-1).sum() == 0
    for index in range(3):  # single points: a dot each, on a log axis too
        assert (right == curves.COLOURS[index]).all(-1).sum() > 10
    curves.plot_series(panels[1:], tmp_path / "log.png", x_label="images / s", log_x=True)


def test_nice_ticks_are_round_values_inside_the_range():
    np.testing.assert_array_equal(curves.nice_ticks(0, 16), [0, 5, 10, 15])
    np.testing.assert_array_equal(curves.nice_ticks(-3, 3), [-2, 0, 2])
    np.testing.assert_allclose(curves.nice_ticks(0.72, 0.97), [0.8, 0.9])
    np.testing.assert_array_equal(curves.nice_ticks(71.6, 1727.5, log=True), [100, 200, 500, 1000])
    np.testing.assert_array_equal(curves.nice_ticks(0.5, 5000, log=True), [1, 10, 100, 1000])  # decades only
    np.testing.assert_array_equal(curves.nice_ticks(98.7, 131.9, log=True), [100, 110, 120, 130])  # linear inside
    assert "-0" not in [f"{t:g}" for t in curves.nice_ticks(-1e-12, 1)]


def test_log_axes_need_positive_values(tmp_path):
    panel = [("FSD", [("f=2", [5, 10, 20], [1700.0, 430.0, 127.0])])]
    curves.plot_series(panel, tmp_path / "ok.png", x_label="minutes", log_x=True, log_y=["FSD"])
    with pytest.raises(ValueError, match="panel 'FSD': a logarithmic y axis needs every y > 0"):
        curves.plot_series([("FSD", [("f=2", [5, 10], [0.0, 1.0])])], tmp_path / "bad.png", x_label="m", log_y=["FSD"])
