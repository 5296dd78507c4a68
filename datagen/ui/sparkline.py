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


@dataclass(frozen=True)
class Histograms:
    """Several runs' distributions of one quantity on one 600 x 230 plot, as step outlines (overlaid bars would hide
    each other). y is the share of each run's own values in a bin, so runs of different sizes compare."""

    curves: list[Curve]
    ticks: list[tuple[float, str]]
    """(x, label) along the bottom axis."""
    top: str
    """The largest share on the plot (the top of the y axis), as a percentage."""
    marker: float | None = None
    """x of a vertical line (the similarity filter's threshold)."""


def overlaid_histograms(samples: Sequence[Sequence[float]], runs: Sequence, edges: Sequence[float], marker: float | None = None) -> Histograms:
    """Each run's values binned on the shared `edges` (a value on the last edge counts in the last bin; values outside
    are clipped into the end bins), drawn as one step line per run."""
    low, high = edges[0], edges[-1]
    span = (high - low) or 1
    x = lambda value: 40 + 550 * (value - low) / span  # noqa: E731
    shares = []
    for values in samples:
        counts = [0] * (len(edges) - 1)
        for value in values:
            counts[_bin(edges, value)] += 1
        shares.append([c / len(values) for c in counts] if values else counts)
    top = max((s for run in shares for s in run), default=0) or 1
    curves = []
    for run, colour, run_shares in zip(runs, COLOURS, shares):
        y = lambda share: 200 - 190 * share / top  # noqa: E731
        points = [f"{x(low):.1f},200.0"]
        for i, share in enumerate(run_shares):
            points += [f"{x(edges[i]):.1f},{y(share):.1f}", f"{x(edges[i + 1]):.1f},{y(share):.1f}"]
        points.append(f"{x(high):.1f},200.0")
        curves.append(Curve(run.name, colour, " ".join(points)))
    step = max(1, (len(edges) - 1) // 5)
    ticks = [(x(edges[i]), f"{edges[i]:g}") for i in range(0, len(edges), step)]
    return Histograms(curves, ticks, f"{top:.0%}", x(marker) if marker is not None else None)


def _bin(edges: Sequence[float], value: float) -> int:
    for i in range(len(edges) - 2, -1, -1):
        if value >= edges[i]:
            return i
    return 0


def similarity_edges(bins: int = 20) -> list[float]:
    """ROUGE-L F from 0 to 1 in `bins` equal bins."""
    return [round(i / bins, 6) for i in range(bins + 1)]


def length_edges(longest: int, bins: int = 30) -> list[int]:
    """Whole-word bins from 0 past the longest instruction, at most `bins` of them."""
    width = max(1, -(-(longest + 1) // bins))
    return list(range(0, longest + width + 1, width))
