"""report.md and metrics.json of a `datagen e2e` loop (datagen/e2e.py): the metrics per model and round, one verdict
line per comparison, the loss curves of the training runs, a per-round bar plot and a side-by-side sample table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datagen.evaluate import METRICS, EvalItem, ItemScore

BARS_FILE = "rounds.png"


def cell(text: str, width: int = 160) -> str:
    """One table cell: no pipes or line breaks, cut at `width` characters."""
    text = " ".join(text.replace("|", "\\|").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def render_markdown(metrics: dict[str, Any], items: list[EvalItem], scores: dict[str, list[ItemScore]], samples: int,
                    out: Path) -> str:  # fmt: skip
    lines = [f"# Loop {metrics['loop']}", "",
             f"Evaluated on {metrics['eval_items']} items: {metrics['eval_source']}. Loss: mean per-token loss of the "
             "reference output (completion tokens only, lower is better); ROUGE-L of the greedy answer to the reference; "
             "exact match on classification items. Intervals: 95% percentile bootstrap over the items.", "",
             "## Metrics", "", "| model | mean loss | ROUGE-L | exact match | items | classification items |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in metrics["models"].items():
        lines.append(f"| {name} | {number(m['loss'])} | {number(m['rouge_l'])} | {number(m['exact_match'])} | {m['items']} | {m['classification_items']} |")
    lines += ["", "## Verdicts", ""] + [f"- {c['verdict']}" for c in metrics["comparisons"]]
    lines += ["", "## Training", "", "| model | rows | steps | final train loss | seconds | loss curve |", "|---|---|---|---|---|---|"]
    for name, t in metrics["training"].items():
        curve = os.path.relpath(t["loss_curve"], out) if t["loss_curve"] else ""
        lines.append(f"| {name} | {t['rows']} | {t['steps']} | {number(t['final_train_loss'])} | {t['train_seconds']} | [{curve}]({curve}) |")
    lines += ["", f"![metrics per round]({BARS_FILE})", "", "## Samples", ""]
    names = list(scores)
    lines += ["| instruction | reference | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for k, item in enumerate(items[:samples]):
        prompt = item.instruction + (f" Input: {item.input}" if item.input else "")
        lines.append(f"| {cell(prompt)} | {cell(item.output)} | " + " | ".join(cell(scores[n][k].answer) for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot_rounds(metrics: dict[str, Any], path: Path) -> None:
    """One panel per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["models"])
    present = [m for m in METRICS if any(metrics["models"][n][m] is not None for n in names)]
    figure, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], present):
        ax.bar(names, [metrics["models"][n][metric] or 0.0 for n in names], color="tab:blue")
        ax.set_title(f"{metric} ({'lower' if METRICS[metric] else 'higher'} is better)")
        ax.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(out: Path, metrics: dict[str, Any], items: list[EvalItem], scores: dict[str, list[ItemScore]], samples: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_rounds(metrics, out / BARS_FILE)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(metrics, items, scores, samples, out), encoding="utf-8")
