"""The runs list's keep-rate sparkline: an inline SVG polyline (no JavaScript, no image request), built here so the
template only places it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT, PAD = 120, 24, 2


@dataclass(frozen=True)
class Sparkline:
    points: str
    """SVG polyline points, "x,y x,y ..."; y grows downwards, 100% keep rate at the top."""
    title: str
    """What a hover shows: the keep rate of the first, lowest, highest and last batch."""


def keep_rate_sparkline(batches: Sequence[tuple[int, int, int]]) -> Sparkline | None:
    """From (batch, accepted, rejected) rows in batch order; None when the run has no generated instructions."""
    rates = [a / (a + r) for _, a, r in batches if a + r]
    if not rates:
        return None
    if len(rates) == 1:
        rates = rates * 2  # a flat line rather than a dot
    step = (WIDTH - 2 * PAD) / (len(rates) - 1)
    points = " ".join(f"{PAD + i * step:.1f},{PAD + (1 - rate) * (HEIGHT - 2 * PAD):.1f}" for i, rate in enumerate(rates))
    title = (
        f"keep rate per batch over {len(batches)} batches: first {rates[0]:.0%}, "
        f"min {min(rates):.0%}, max {max(rates):.0%}, last {rates[-1]:.0%}"
    )
    return Sparkline(points, title)


COLOURS = ("#3b7dd8", "#d8643b", "#2e9e5b", "#8a4fbf")
"""One colour per compared run (at most 4)."""


@dataclass(frozen=True)
class Curve:
    name: str
    colour: str
    points: str
    """SVG polyline points on a 600 x 220 plot: batch on x (0 to the longest run's last batch), keep rate 0-100% on y."""


def keep_rate_curves(batches: dict[int, list[tuple[int, int, int]]], runs: Sequence) -> list[Curve]:
    """Each run's keep rate per batch on one shared axis (the compare page's plot)."""
    last = max((b for rows in batches.values() for b, _, _ in rows), default=0) or 1
    curves = []
    for run, colour in zip(runs, COLOURS):
        rows = [(b, a / (a + r)) for b, a, r in batches.get(run.id, []) if a + r]
        points = " ".join(f"{40 + 550 * b / last:.1f},{10 + 190 * (1 - rate):.1f}" for b, rate in rows)
        curves.append(Curve(run.name, colour, points))
    return curves
