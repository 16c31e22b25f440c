"""curves.png: a run's learning curves, readable without TensorBoard.

Per epoch (the resumed processes' epochs included, from metrics.json's history): training and
validation loss, training and validation accuracy with the test accuracy of the selected
checkpoint marked, and the learning rate.

Drawn with Pillow, which the data pipeline loads anyway: matplotlib took 0.8 s to import and
0.3 s to draw these three panels, a second of every run's start-up and bookkeeping on a 2-core
CPU; this takes a few hundredths.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 1500, 420
SCALE = 2  # drawn at twice the size, then reduced: smooth lines without an anti-aliasing renderer
BLUE, ORANGE, GREEN, RED = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)
GRID, INK = (225, 225, 225), (0, 0, 0)


def write_curves(path: Path, metrics: dict[str, Any]) -> None:
    """Draw metrics.json's history into path (a PNG), replaced whole."""
    from PIL import Image, ImageDraw

    history = metrics.get("history") or []
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    image = Image.new("RGB", (WIDTH * SCALE, HEIGHT * SCALE), "white")
    canvas = ImageDraw.Draw(image)
    title = (f"{metrics.get('model')} on {metrics.get('data')}: "
             f"{metrics.get('epochs_done')}/{metrics.get('epochs_total')} epochs")  # fmt: skip
    _text(canvas, (WIDTH / 2, 6), title, 15, anchor="ma")

    panels = []
    for key, name in (("loss", "loss"), ("acc", "accuracy (%)")):
        series = [("train", [h.get(f"train_{key}") for h in history], BLUE, "o", False)]
        for part, label, color, marker, dotted in (
            ("valid", "validation", ORANGE, "s", False),
            ("test", "test (by epoch)", GREEN, "^", True),
        ):
            values = [h.get(f"{part}_{key}") for h in history]
            if any(v is not None for v in values):
                series.append((label, values, color, marker, dotted))
        panels.append((name, series))
    lr = [("learning rate", [h.get("lr") for h in history], GREEN, "o", False)]
    panels.append(("learning rate (at the epoch's start)", lr))

    losses = [v for _, values, *_ in panels[0][1] for v in values
              if v is not None and 0 < v < math.inf]  # fmt: skip
    log_loss = bool(losses) and max(losses) / min(losses) > 50  # early spikes flatten the rest
    star = None
    test = metrics.get("test") or {}
    if test.get("acc") is not None and metrics.get("selected_epoch"):
        label = f"test {test['acc']:.2f}% ({metrics.get('selected_checkpoint')})"
        star = (metrics["selected_epoch"], test["acc"], label)

    left, gap, top, bottom = 70, 75, 62, 48
    width = (WIDTH - left - 25 - 2 * gap) / 3
    for i, (name, series) in enumerate(panels):
        box = (left + i * (width + gap), top, left + i * (width + gap) + width, HEIGHT - bottom)
        _panel(
            canvas,
            box,
            name,
            epochs,
            series,
            log=i == 0 and log_loss,
            star=star if i == 1 else None,
            legend={0: "upper", 1: "lower"}.get(i),
        )
    image = image.resize((WIDTH, HEIGHT), Image.LANCZOS)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@functools.lru_cache(maxsize=8)
def _font(size: float):
    from PIL import ImageFont

    return ImageFont.load_default(size=size * SCALE)  # Pillow's own scalable font (10.1 on)


def _text(canvas, xy, text: str, size: float, anchor: str = "la", fill=INK) -> None:
    canvas.text((xy[0] * SCALE, xy[1] * SCALE), text, fill=fill, font=_font(size), anchor=anchor)


def _panel(canvas, box, name, epochs, series, log=False, star=None, legend=None) -> None:
    x0, y0, x1, y1 = box
    # nan or inf (a diverged epoch, an overflowed evaluation) is left out of the panel
    values = [v for _, vs, *_ in series for v in vs if v is not None and math.isfinite(v)]
    if star is not None and math.isfinite(star[1]):
        values.append(star[1])
    else:
        star = None
    if log:
        values = [v for v in values if v > 0]
    ylo, yhi, yticks = _ticks(min(values), max(values), log) if values else (0.0, 1.0, [0.0, 1.0])
    if len(epochs) <= 12:  # one tick per epoch (a one-epoch run has one)
        xlo, xhi, xticks = min(epochs) - 0.5, max(epochs) + 0.5, sorted(set(epochs))
    else:
        xlo, xhi, xticks = _ticks(min(epochs), max(epochs), False, integer=True)

    def at(x, y):
        fy = (
            (math.log10(y) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo))
            if log
            else ((y - ylo) / (yhi - ylo))
        )
        return ((x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)) * SCALE, (y1 - fy * (y1 - y0)) * SCALE)

    for t in yticks:
        _, py = at(xlo, t)
        canvas.line([(x0 * SCALE, py), (x1 * SCALE, py)], fill=GRID, width=SCALE)
        _text(canvas, (x0 - 6, py / SCALE), _label(t), 12, anchor="rm")
    for t in xticks:
        px, _ = at(t, ylo)
        canvas.line([(px, y0 * SCALE), (px, y1 * SCALE)], fill=GRID, width=SCALE)
        _text(canvas, (px / SCALE, y1 + 5), f"{t:g}", 12, anchor="ma")
    canvas.rectangle([x0 * SCALE, y0 * SCALE, x1 * SCALE, y1 * SCALE], outline=INK, width=SCALE)
    _text(canvas, ((x0 + x1) / 2, y0 - 8), name, 14, anchor="md")
    _text(canvas, ((x0 + x1) / 2, y1 + 24), "epoch", 12, anchor="ma")

    for _, vs, color, marker, dotted in series:
        points = [at(x, v) if v is not None and math.isfinite(v) and (v > 0 or not log)
                  else None for x, v in zip(epochs, vs, strict=True)]  # fmt: skip
        for a, b in zip(points, points[1:], strict=False):
            if a is not None and b is not None:
                _segment(canvas, a, b, color, 2 * SCALE, dotted)
        for p in points:
            if p is not None:
                _marker(canvas, p, marker, color, 4.5 * SCALE)
    entries = [(label, color, marker, dotted) for label, _, color, marker, dotted in series]
    if star is not None:
        _marker(canvas, at(star[0], star[1]), "*", RED, 10 * SCALE)
        entries.append((star[2], RED, "*", None))
    if legend is not None and (len(entries) > 1 or star is not None):
        _legend(canvas, box, entries, legend)


def _segment(canvas, a, b, color, width, dotted) -> None:
    if not dotted:
        canvas.line([a, b], fill=color, width=width)
        return
    length = math.dist(a, b)
    dashes = max(1, int(length / (3 * width)))
    for k in range(dashes):
        s, e = k / dashes, (k + 0.5) / dashes
        canvas.line([(a[0] + (b[0] - a[0]) * s, a[1] + (b[1] - a[1]) * s),
                     (a[0] + (b[0] - a[0]) * e, a[1] + (b[1] - a[1]) * e)], fill=color,
                    width=width)  # fmt: skip


def _marker(canvas, p, kind, color, r) -> None:
    x, y = p
    if kind == "o":
        canvas.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif kind == "s":
        canvas.rectangle([x - r * 0.9, y - r * 0.9, x + r * 0.9, y + r * 0.9], fill=color)
    elif kind == "^":
        canvas.polygon([(x, y - r * 1.1), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=color)
    else:  # a five-pointed star
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.4
            angle = math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y - radius * math.sin(angle)))
        canvas.polygon(points, fill=color)


def _legend(canvas, box, entries, where) -> None:
    x0, y0, x1, y1 = box
    row, width = 20, 40 + max(_font(12).getlength(e[0]) / SCALE for e in entries)
    height = row * len(entries) + 8
    lx = x1 - width - 8
    ly = y0 + 8 if where == "upper" else y1 - height - 8
    canvas.rectangle([lx * SCALE, ly * SCALE, (lx + width) * SCALE, (ly + height) * SCALE],
                     fill="white", outline=(200, 200, 200), width=SCALE)  # fmt: skip
    for k, (label, color, marker, dotted) in enumerate(entries):
        cy = ly + 4 + row * k + row / 2
        if dotted is not None:
            a, b = ((lx + 6) * SCALE, cy * SCALE), ((lx + 30) * SCALE, cy * SCALE)
            _segment(canvas, a, b, color, 2 * SCALE, dotted)
        _marker(canvas, ((lx + 18) * SCALE, cy * SCALE), marker, color,
                (7 if marker == "*" else 4.5) * SCALE)  # fmt: skip
        _text(canvas, (lx + 36, cy), label, 12, anchor="lm")


def _ticks(lo: float, hi: float, log: bool, integer: bool = False):
    """An axis range holding [lo, hi] with a margin, and 'nice' ticks in it (1, 2, 2.5, 5 times a
    power of ten; powers of ten on a logarithmic axis)."""
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [10.0**k for k in range(a, b + 1)]
        if len(ticks) <= 3:
            ticks = sorted({m * t for t in ticks for m in (1, 2, 5)})
        ticks = [t for t in ticks if lo / 1.2 <= t <= hi * 1.2] or [lo, hi]
        return lo / 1.2, hi * 1.2, ticks
    if hi == lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    margin = (hi - lo) * 0.06
    lo, hi = lo - margin, hi + margin
    raw = (hi - lo) / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    ticks = [first + k * step for k in range(int((hi - first) / step) + 1)]
    return lo, hi, [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    small_or_large = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)
    return f"{value:.3g}" if small_or_large else f"{value:.6g}"


def draw_if_missing(run_dir: Path, metrics: dict[str, Any]) -> bool:
    """A finished run's curves.png, drawn from its metrics.json where it is missing (a run stopped
    between the two: resume=auto has nothing else to do); returns whether it was drawn."""
    path = Path(run_dir) / "curves.png"
    if path.exists():
        return False
    write_curves(path, metrics)
    return True
