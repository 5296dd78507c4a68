"""The loss curve: train loss per logged step and eval loss where it was measured, from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_points(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs, in step order."""
    train = sorted((int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e)
    evals = sorted((int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e)
    return train, evals


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, evals = loss_points(log_history)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        axes.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
