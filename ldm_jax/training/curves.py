"""Training curves as a PNG, from a run's JSONL logs, with Pillow only (no plotting library needed); and
`plot_series`: several labelled series per panel, for tables of results (bench/f_ablation.py).

    python -m ldm_jax.training.curves --out curve.png \\
        --panel "autoencoder PSNR (dB)=runs/shapes_autoencoder/eval.jsonl:psnr" \\
        --panel "LDM loss=runs/shapes_ldm/metrics.jsonl:loss"

Each panel is "TITLE=FILE:KEY": the KEY of every JSON line of FILE that has it, against that line's "step".
Panels sit side by side, each a line with its first and last value printed; the y axis spans the data.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Collection, Sequence

import numpy as np

PANEL_SIZE = (360, 260)
MARGIN = (52, 34, 16, 34)  # left, top, right, bottom
AXIS_COLOUR = (90, 90, 90)


def read_series(path: str | pathlib.Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) float64 of every line of a JSONL file holding `key` (and "step"), in file order."""
    steps, values = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if key in record and "step" in record:
                steps.append(float(record["step"]))
                values.append(float(record[key]))
    if not steps:
        raise ValueError(f"{path}: no line has both 'step' and {key!r}")
    return np.array(steps), np.array(values)


def nice_ticks(low: float, high: float, *, log: bool = False, count: int = 4) -> np.ndarray:
    """Round tick values inside [low, high]: multiples of 1, 2 or 5 x 10^k about `count` intervals apart, or
    with log (low > 0) the values 1, 2, 5 x 10^k in the range (only the powers of ten when those are 3 or more,
    linear ticks when fewer than 2 fall inside)."""
    if log:
        decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
            ticks = np.array([m * 10.0 ** k for k in decades for m in mantissas if low <= m * 10.0 ** k <= high])
            if len(ticks) >= 3:
                return ticks
        if len(ticks) >= 2:
            return ticks
    if high <= low:
        return np.array([low])
    raw = (high - low) / count
    magnitude = 10.0 ** np.floor(np.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    ticks = np.arange(np.ceil(low / step - 1e-9) * step, high + step * 1e-9, step)
    return np.round(ticks / step) * step + 0.0  # + 0.0: no "-0" label


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
Series = tuple[str, Sequence[float], Sequence[float]]  # (legend label, xs, ys)


def draw_panel(title: str, steps: np.ndarray, values: np.ndarray):
    """One PIL RGB image PANEL_SIZE: the series as a polyline against "step", its first and last value in the
    title."""
    summary = f"{title}: {values[0]:.3g} -> {values[-1]:.3g}"
    return draw_series_panel(summary, [("", steps, values)], x_label="step")


def draw_series_panel(title: str, series: Sequence[Series], *, x_label: str, log_x: bool = False,
                      log_y: bool = False):
    """One PIL RGB image PANEL_SIZE: every (label, xs, ys) series as a polyline with a dot at each point, in
    COLOURS order, on shared axes with round tick values (x logarithmic with log_x, then every x > 0; y with
    log_y, then every y > 0), and the labels that are not empty in their colours in a row above the axes."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    width, height = PANEL_SIZE
    left, top, right, bottom = MARGIN
    font = ImageFont.load_default(size=11)
    image = Image.new("RGB", PANEL_SIZE, "white")
    draw = ImageDraw.Draw(image)
    xs_all = np.concatenate([np.asarray(xs, np.float64) for _, xs, _ in series])
    ys_all = np.concatenate([np.asarray(ys, np.float64) for _, _, ys in series])
    for axis, values, log in (("x", xs_all, log_x), ("y", ys_all, log_y)):
        if log and not (values > 0).all():
            raise ValueError(f"panel {title!r}: a logarithmic {axis} axis needs every {axis} > 0, got {values.min():g}")
    (warp_x, unwarp_x), (warp_y, unwarp_y) = _scale(log_x), _scale(log_y)
    x0, x1 = _padded(warp_x(xs_all.min()), warp_x(xs_all.max()), 0.03)
    y0, y1 = _padded(warp_y(ys_all.min()), warp_y(ys_all.max()), 0.05)

    def to_px(x, y):
        px = left + (warp_x(x) - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (warp_y(y) - y0) / (y1 - y0) * (height - top - bottom)
        return float(px), float(py)

    draw.rectangle([left, top, width - right, height - bottom], outline=AXIS_COLOUR)
    for y in nice_ticks(unwarp_y(y0), unwarp_y(y1), log=log_y):  # inside the padded axis
        _, py = to_px(xs_all.min(), y)
        draw.line([left - 4, py, left, py], fill=AXIS_COLOUR)
        draw.text((left - 6, py), f"{y:g}", fill="black", font=font, anchor="rm")
    for x in nice_ticks(unwarp_x(x0), unwarp_x(x1), log=log_x):
        px, _ = to_px(x, ys_all.min())
        draw.line([px, height - bottom, px, height - bottom + 4], fill=AXIS_COLOUR)
        draw.text((px, height - bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    draw.text((width / 2, height - 4), x_label, fill="black", font=font, anchor="md")
    draw.text((width / 2, 8), title, fill="black", font=ImageFont.load_default(size=12), anchor="mt")
    legend_x = left
    for index, (label, xs, ys) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [to_px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if label:
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            draw.text((legend_x, top - 3), label, fill=colour, font=font, anchor="ld")  # a row above the axes
            legend_x += draw.textlength(label, font=font) + 10
    return image


def _scale(log: bool):
    """(data -> axis units, axis units -> data) of a linear or a base-10 logarithmic axis."""
    return (np.log10, lambda v: 10.0 ** v) if log else (lambda v: v, lambda v: v)


def _padded(low: float, high: float, fraction: float) -> tuple[float, float]:
    """[low, high] widened by `fraction` of its span on each side (by 0.5 when it is a single value)."""
    low, high = float(low), float(high)
    if high == low:
        return low - 0.5, high + 0.5
    pad = fraction * (high - low)
    return low - pad, high + pad


def _sheet(images, out: str | pathlib.Path) -> pathlib.Path:
    from PIL import Image  # noqa: PLC0415

    sheet = Image.new("RGB", (PANEL_SIZE[0] * len(images), PANEL_SIZE[1]), "white")
    for index, image in enumerate(images):
        sheet.paste(image, (index * PANEL_SIZE[0], 0))
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def plot_curves(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], out: str | pathlib.Path) -> pathlib.Path:
    """Writes the (title, steps, values) panels side by side as one PNG; returns its path."""
    return _sheet([draw_panel(*panel) for panel in panels], out)


def plot_series(panels: Sequence[tuple[str, Sequence[Series]]], out: str | pathlib.Path, *, x_label: str,
                log_x: bool = False, log_y: Collection[str] = ()) -> pathlib.Path:
    """Writes (title, [(label, xs, ys), ...]) panels side by side as one PNG (`draw_series_panel`, the same x
    label and x scale on each; a logarithmic y axis on the panels whose titles are in log_y); returns its path."""
    return _sheet([draw_series_panel(title, series, x_label=x_label, log_x=log_x, log_y=title in log_y)
                   for title, series in panels], out)


def parse_panel(spec: str) -> tuple[str, str, str]:
    """ "TITLE=FILE:KEY" -> (title, file, key)."""
    title, sep, rest = spec.partition("=")
    path, sep2, key = rest.rpartition(":")
    if not (sep and sep2 and title and path and key):
        raise ValueError(f"--panel {spec!r}: expected TITLE=FILE:KEY")
    return title, path, key


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module doc); 2 with one line on a bad panel or file."""
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.training.curves", description=__doc__.splitlines()[0])
    parser.add_argument("--panel", action="append", required=True, help="TITLE=FILE:KEY (repeatable)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        panels = []
        for spec in args.panel:
            title, path, key = parse_panel(spec)
            panels.append((title, *read_series(path, key)))
    except (OSError, ValueError) as error:
        print(f"curves: error: {error}")
        return 2
    print(f"wrote {plot_curves(panels, args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
