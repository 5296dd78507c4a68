"""report.md and metrics.json of a `datagen e2e` loop (datagen/e2e.py), laid out as an experiment report: the primary
verdict in one sentence, the verdict table (difference, interval, p, minimum detectable difference, degeneration),
the models' figures, the replicate spread, the data counts, the training budgets, a forest plot of the paired
differences with their intervals, a per-item scatter of seeds-only against the last round, and sample rows drawn at
random with a seed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from datagen.evaluate import METRIC_NAMES, METRICS, EvalItem, ItemScore

FOREST_FILE = "forest.png"
SCATTER_FILE = "scatter.png"


def cell(text: str, width: int = 160) -> str:
    """One table cell: no pipes or line breaks, cut at `width` characters."""
    text = " ".join(text.replace("|", "\\|").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def sample_indices(n: int, samples: int, seed: int) -> list[int]:
    """`samples` item indices drawn at random with the seed, in item order."""
    return sorted(random.Random(seed).sample(range(n), min(samples, n)))


def render_markdown(metrics: dict[str, Any], items: list[EvalItem], scores: dict[str, list[list[ItemScore]]], samples: int,
                    seed: int) -> str:  # fmt: skip
    ev = metrics["eval"]
    lines = [f"# Loop {metrics['loop']}", "", f"**Primary verdict.** {metrics['primary']['verdict']}.", "",
             f"Evaluated on {ev['items']} items ({ev['source']}), each model tuned and scored under {ev['format']}, "
             f"{metrics['replicates']} training replicate(s) per tuned model. Unit: the item; each model's score on an item "
             f"is averaged over its replicates. Interval: {ev['interval']}; the primary comparison is tested at 5%, the "
             "others are secondary and Holm-corrected. \"Better\" also needs at least 10 items and a degeneration rate at "
             "most 5 points above the baseline's. Budget: "
             f"{metrics['budget_rule']}.", "",
             "## Verdicts", "",
             "| comparison | metric | role | difference | 95% CI | p (Holm) | min. detectable | degenerate (model / baseline) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in metrics["comparisons"]:
        p = f"{c['p_value']:.3g}" + (f" ({c['p_holm']:.3g})" if c["p_holm"] is not None else "")
        word = c["verdict"].split("): ", 1)[1].split(": difference ")[0]  # better, not better, not better (why)
        lines.append(f"| {c['model']} vs {c['baseline']} | {METRIC_NAMES[c['metric']]} | {c['role']} | {c['difference']:+.4f} | "
                     f"{c['low']:+.4f}..{c['high']:+.4f} | {p} | {c['mdd']:.4f} | {percent(c['degeneration'][0])} / "
                     f"{percent(c['degeneration'][1])} | {word} |")  # fmt: skip
    lines += ["", f"![paired differences with 95% intervals]({FOREST_FILE})", "",
              "## Models", "",
              "| model | loss per item | loss per token | ROUGE-L | exact match (items) | degenerate | repeats | hit the limit | replicates |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in metrics["models"].items():
        lines.append(f"| {name} | {number(m['loss_per_item'])} | {number(m['loss_per_token'])} | {number(m['rouge_l'])} | "
                     f"{number(m['exact_match'])} ({m['exact_match_items']}) | {percent(m['degeneration_rate'])} | "
                     f"{percent(m['repetition_rate'])} | {percent(m['length_limit_rate'])} | {m['replicates']} |")  # fmt: skip
    lines += ["", "Loss per item: the mean over items of each item's mean per-token loss of the reference and its end token "
              "(the unit of the comparisons); loss per token: all reference tokens pooled. ROUGE-L: greedy answer against the "
              "reference, 0 for an answer cut at the token limit. Exact match: first line, normalised, on short-label "
              "references only. Degenerate: the answer repeats a word 3-gram 4+ times, or hits the token limit.", "",
              "## Noise floor: replicate against replicate", "", "| model | metric | replicate a - b: mean difference |", "|---|---|---|"]  # fmt: skip
    for name, by_metric in metrics["noise_floor"].items():
        for metric, pairs in by_metric.items():
            lines.append(f"| {name} | {METRIC_NAMES[metric]} | " + ", ".join(f"{p['a']}-{p['b']}: {p['difference']:+.4f}" for p in pairs) + " |")
    if not metrics["noise_floor"]:
        lines.append("| – | – | one replicate: no noise floor measured |")
    lines += ["", f"![per-item loss, seeds-only against the last round]({SCATTER_FILE})", "",
              "## Data", "", "| model | accepted instructions | kept after dedup | exported rows | seed rows removed (rule: n) | "
              "generated rows removed (rule: n) | seed rows trained | generated rows trained |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, d in metrics["data"].items():
        removed = {src: ", ".join(f"{rule}: {n}" for rule, n in counts.items()) or "0" for src, counts in d["decontaminated"].items()}
        lines.append(f"| {name} | {d.get('accepted_instructions', '–')} | {d.get('kept_after_dedup', '–')} | {d.get('exported_rows', '–')} | "
                     f"{removed.get('seed', '–')} | {removed.get('generated', '–')} | {d['seed_rows']} | {d['generated_rows']} |")  # fmt: skip
    lines += ["", "## Training budgets", "", "| model | replicate (seed) | rows | steps | epochs over seeds | epochs over generated | "
              "trained tokens | final train loss | seconds | loss curve |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in metrics["training"].items():
        for t in runs:
            curve = f"[{t['loss_curve']}]({t['loss_curve']})" if t["loss_curve"] else ""
            lines.append(f"| {name} | {t['replicate']} ({t['seed']}) | {t['rows']} | {t['steps']} | {number(t['epochs_over_seeds'], 2)} | "
                         f"{number(t['epochs_over_generated'], 2)} | {t['train_tokens']} | {number(t['final_train_loss'])} | "
                         f"{t['train_seconds']} | {curve} |")  # fmt: skip
    lines += curation_lines(metrics.get("curation"))
    lines += cost_lines(metrics.get("cost"))
    names = list(scores)
    picked = sample_indices(len(items), samples, seed)
    lines += ["", f"## Samples ({len(picked)} items drawn at random, seed {seed}; answers of replicate 0)", "",
              "| item | instruction | reference | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]  # fmt: skip
    for k in picked:
        item = items[k]
        prompt = item.instruction + (f" Input: {item.input}" if item.input else "")
        lines.append(f"| {item.key} | {cell(prompt)} | {cell(item.output)} | " + " | ".join(cell(scores[n][0][k].answer) for n in names) + " |")
    return "\n".join(lines) + "\n"


def curation_lines(c: dict[str, Any] | None) -> list[str]:
    """The curated arms: the rule, who scored, the budget, and what each round's curation kept and why it dropped."""
    if not c:
        return []
    lines = ["", "## Curation", "", f"Rule `{c['rule']}` (datagen curate) over IFD scores of {c['scored_by']}, the student "
             f"(datagen score); budget: {c['budget']} (LoopConfig.curate.budget).", "",
             "| arm | run | accepted instances | scored (no score) | mean IFD | kept | dropped (reason: n) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in c["rounds"].items():
        s, cur = r.get("scored") or {}, r.get("curation") or {}
        reasons = ", ".join(f"{cell(reason, 60)}: {n}" for reason, n in (cur.get("dropped_by_reason") or {}).items()) or "–"
        lines.append(f"| {name} | {cur.get('run', '–')} | {cur.get('instances', '–')} | {s.get('scored', '–')} ({s.get('no_score', '–')}) | "
                     f"{number(s.get('mean_ifd'))} | {cur.get('kept', '–')} | {cur.get('dropped', '–')}: {reasons} |")  # fmt: skip
    return lines


def cost_lines(c: dict[str, Any] | None) -> list[str]:
    """Tokens, device seconds per stage, and their price (datagen/cost.py) at the table's prices when the report was
    written; per kept item, and per point of the primary metric's improvement."""
    if c is None:
        return []
    lines = ["", "## Cost", "", "| | |", "|---|---|"]
    lines += [f"| prompt / completion tokens of {model} | {t['prompt']:,} / {t['completion']:,} |" for model, t in c["tokens"].items()]
    lines += [f"| seconds: {stage} | {seconds:,.1f} |" for stage, seconds in c["seconds"].items()]
    lines += [f"| cost | {c['shown']} |", f"| per kept item ({c['kept_items']} generated rows trained) | {c['per_kept_item_shown']} |",
              f"| per point of improvement (a point: {c['point']}) | {c['per_point_shown']} |", "",
              "Money comes from the price table (DATAGEN_PRICES) when the report was written; `datagen runs show LOOP "
              "--prices FILE` reprices the stored figures."]  # fmt: skip
    return lines


def plot_forest(metrics: dict[str, Any], path: Path) -> None:
    """One panel per metric: each comparison's paired mean difference with its interval, and 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in METRICS if any(c["metric"] == m for c in metrics["comparisons"])]
    figure, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 0.6 + 0.5 * len(metrics["comparisons"])), squeeze=False)
    for ax, metric in zip(axes[0], present):
        rows = [c for c in metrics["comparisons"] if c["metric"] == metric]
        for y, c in enumerate(rows):
            finite = [v for v in (c["low"], c["high"]) if abs(v) != float("inf")]
            low, high = (c["low"], c["high"]) if len(finite) == 2 else (c["difference"], c["difference"])
            color = "tab:green" if c["better"] else "tab:red" if c["role"] == "primary" else "tab:blue"
            ax.errorbar(c["difference"], y, xerr=[[c["difference"] - low], [high - c["difference"]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(range(len(rows)), [f"{c['model']} vs {c['baseline']}" + (" *" if c["role"] == "primary" else "") for c in rows])
        ax.set_title(f"{METRIC_NAMES[metric]} ({'lower' if METRICS[metric] else 'higher'} is better)")
        ax.invert_yaxis()
    figure.suptitle("paired differences, 95% intervals (* primary)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_scatter(scores: dict[str, list[list[ItemScore]]], path: Path) -> None:
    """Per-item loss (averaged over replicates): seeds-only on x, the last round on y, and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datagen.evaluate import item_means

    last = [n for n in scores if n.startswith("round ") and not n.endswith(" curated")][-1]
    x, y = item_means(scores["seeds-only"], "loss"), item_means(scores[last], "loss")
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(x, y, s=12)
    bounds = [min(x + y), max(x + y)]
    ax.plot(bounds, bounds, color="grey", linewidth=1)
    ax.set_xlabel("seeds-only: loss per item")
    ax.set_ylabel(f"{last}: loss per item")
    ax.set_title("below the diagonal: the last round is better", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(out: Path, metrics: dict[str, Any], items: list[EvalItem], scores: dict[str, list[list[ItemScore]]], samples: int,
                 seed: int) -> None:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    plot_forest(metrics, out / FOREST_FILE)
    plot_scatter(scores, out / SCATTER_FILE)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(metrics, items, scores, samples, seed), encoding="utf-8")
