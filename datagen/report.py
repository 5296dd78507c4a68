"""`datagen report`: what a run made, in numbers and plots, for a person to check before training on it.

    datagen report --run example --out report/

reads one run from the store and writes report.md with six PNG plots beside it:
counts (accepted and rejected by reason), keep rate per batch, instances per task, instruction and output lengths,
ROUGE-L of each accepted instruction to its most similar seed (the shape of Self-Instruct's Figure 3), and the most
common leading verbs with their objects (the idea of Self-Instruct's Figure 2, as a bar chart). Samples of accepted
and rejected items, with the reasons, close the report.

Collecting is separate from drawing: `collect` turns the store into a `RunReport` of plain numbers, the `plot_*`
functions draw one figure each with matplotlib's headless Agg backend, `render_markdown` writes the page.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from datagen import cost
from datagen.errors import BadInput
from datagen.export import max_rouge_l
from pipelines.self_instruct import has_preamble, has_trailer
from storage.store import get_run
from storage.queries import NOT_JUDGED, RunCounts, hand_rejected_ids, run_counts
from storage.tables import Generation, Instance, Run, Task

SAMPLES = 5
"""Accepted and rejected items shown at the end of the report."""
TOP_VERBS = 15
"""Bars in the verb chart (Self-Instruct's Figure 2 shows the top 20 root verbs and their top 4 objects)."""
OBJECTS_PER_VERB = 4


@dataclass(frozen=True)
class Sample:
    """An instruction, or an instance (with input and output) of one."""

    instruction: str
    input: str | None = None
    output: str | None = None
    reason: str | None = None
    nearest: str | None = None
    similarity: float | None = None


@dataclass(frozen=True)
class BatchKeep:
    batch: int
    accepted: int
    rejected: int

    @property
    def keep_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


@dataclass(frozen=True)
class VerbCount:
    verb: str
    count: int
    objects: list[tuple[str, int]]


@dataclass
class RunReport(RunCounts):
    """Everything `datagen report` shows about one run; its counts are the card's (storage.queries.RunCounts)."""

    completions: int
    """Completions the backend returned (every model call of the run, all purposes)."""
    keep_by_batch: list[BatchKeep]
    instances_per_task: dict[int, int]
    """Number of accepted instances → how many accepted instructions have that many."""
    instruction_words: list[int]
    output_words: list[int]
    seed_instruction_words: list[int]
    seed_similarity: list[float]
    """ROUGE-L F of each accepted instruction to its most similar seed task; empty when the run stored no seeds."""
    rouge_threshold: float | None
    verbs: list[VerbCount]
    without_leading_verb: int
    """Accepted instructions that open with a question word, a pronoun or similar rather than a verb."""
    rouge_rejected_against_dropped: int = 0
    """ROUGE-L rejections whose nearest instruction is a generated one that was itself dropped later (no valid
    instances, target_reached, by hand): both copies lost, the idea is in neither."""
    accepted_samples: list[Sample] = field(default_factory=list)
    rejected_samples: list[Sample] = field(default_factory=list)
    rejected_instance_samples: list[Sample] = field(default_factory=list)
    instances_with_preamble: int | None = None
    """Accepted Self-Instruct instances whose input holds text before its "Input:" marker, and (next) whose output
    goes on past a blank line: kept as the reference keeps them, dropped with instance_trim (pipelines/self_instruct.py)."""
    instances_with_trailer: int | None = None
    cost: dict[str, Any] | None = None
    """Tokens, seconds per stage and their price (datagen/cost.py, cost_dict), priced when the report is made."""

    @property
    def tasks_without_instances(self) -> int:
        return self.instances_per_task.get(0, 0)


# --- Leading verbs and their objects (Self-Instruct, Figure 2) ------------------------------------------------------
# The paper parses instructions with Berkeley's neural parser and keeps the root verb and its direct object.
# No parser model can be downloaded here, so: the first word is the verb unless it is one of the words below;
# the object is the first later word that is not a determiner, pronoun, preposition or common adjective.

NOT_VERBS = frozenset(
    "what how why who whom whose which where when whether is are was were am be been do does did can could would should "
    "will shall may might must if i you we he she it they this that these those there here the a an in on at for to of "
    "from by with as given based using my your our their its his her some any each every all no one two three after "
    "before during while once suppose assuming".split()
)
OBJECT_SKIP = frozenset(
    "a an the this that these those some any each every all both either another other such my your our their its his "
    "her me us him them it you yourself i we one two three four five six seven eight nine ten few several many more "
    "most least much up out down off over back about into onto to of for in on at by with from as and or but so "
    "following given short brief new simple good best better different similar same correct appropriate possible main "
    "original interesting funny creative random specific single whole full complete detailed concise clear own "
    "list-of".split()
)
CLAUSE_WORDS = frozenset("if whether how what why who which where when that".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def leading_verb(instruction: str) -> tuple[str | None, str | None]:
    """(verb, object) of an instruction by the heuristic above; (None, None) when it does not open with a verb."""
    words = [w.lower().strip("'-") for w in _WORD.findall(instruction)]
    if words and words[0] == "please":
        words = words[1:]
    if not words or words[0] in NOT_VERBS or len(words[0]) < 2:
        return None, None
    verb = words[0]
    for word in words[1:7]:
        if word in CLAUSE_WORDS:
            break
        if word in OBJECT_SKIP or len(word) < 2 or word.endswith("ly"):
            continue
        return verb, word
    return verb, None


def count_verbs(instructions: list[str]) -> tuple[list[VerbCount], int]:
    verbs, objects, without = Counter(), {}, 0
    for instruction in instructions:
        verb, obj = leading_verb(instruction)
        if verb is None:
            without += 1
            continue
        verbs[verb] += 1
        if obj:
            objects.setdefault(verb, Counter())[obj] += 1
    top = [
        VerbCount(verb, n, objects.get(verb, Counter()).most_common(OBJECTS_PER_VERB))
        for verb, n in sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_VERBS]
    ]
    return top, without


# --- Collecting from the store ---------------------------------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def collect(session: Session, run_ref: str | int, samples: int = SAMPLES, seed: int = 0, prices: cost.Prices | None = None) -> RunReport:
    """Everything the report shows, read from the store; samples drawn with a seeded RNG so reruns agree; money from
    `prices` (datagen/cost.py)."""
    run: Run = get_run(session, run_ref)
    if run.pipeline == "toolformer":
        raise BadInput(f"run '{run.name}' is a Toolformer run: datagen report covers instruction runs (self-instruct, alpaca)")
    generated = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()
    if not generated:
        raise BadInput(f"run '{run.name}' has no generated instructions to report on")
    by_hand = set(session.exec(hand_rejected_ids()).all())
    accepted = [t for t in generated if t.status == "accepted" and t.id not in by_hand]
    rejected = [t for t in generated if t.status != "accepted" or t.id in by_hand]
    seeds = session.exec(select(Task.instruction).where(Task.run_id == run.id, Task.source == "seed")).all()

    instances = session.exec(
        select(Instance).where(Instance.task_id.in_([t.id for t in generated])).order_by(Instance.id)
    ).all() if accepted else []  # fmt: skip
    accepted_ids = {t.id for t in accepted}
    good = [i for i in instances if i.status == "accepted" and i.task_id in accepted_ids]
    bad = [i for i in instances if i.status == "rejected"]
    per_task = Counter(i.task_id for i in good)

    batch_of = dict(session.exec(select(Generation.id, Generation.batch).where(Generation.run_id == run.id)).all())
    keep: dict[int, list[int]] = {}
    for task in generated:
        if task.reason == NOT_JUDGED:  # neither kept nor rejected: generated after the target was met
            continue
        counts = keep.setdefault(batch_of.get(task.generation_id, 0), [0, 0])
        counts[task.status != "accepted" or task.id in by_hand] += 1

    first_with_text: dict[str, Task] = {}
    for task in generated:
        first_with_text.setdefault(task.instruction, task)
    kept = {t.id for t in accepted}
    both_lost = sum(
        1
        for t in rejected
        if (t.reason or "").startswith("rouge_similarity") and (n := first_with_text.get(t.nearest or "")) is not None and n.id < t.id and n.id not in kept
    )
    verbs, without = count_verbs([t.instruction for t in accepted])
    rng = random.Random(seed)
    task_by_id = {t.id: t for t in generated}
    completions = session.exec(select(func.count()).select_from(Generation).where(Generation.run_id == run.id)).one()
    return RunReport(
        **run_counts(session, run),  # the counts the card shows, from the queries `datagen runs` and the viewer use
        completions=completions,
        keep_by_batch=[BatchKeep(b, a, r) for b, (a, r) in sorted(keep.items())],
        instances_per_task=dict(sorted(Counter(per_task.get(t.id, 0) for t in accepted).items())),
        instruction_words=[words(t.instruction) for t in accepted],
        output_words=[words(i.output) for i in good],
        seed_instruction_words=[words(s) for s in seeds],
        seed_similarity=max_rouge_l([t.instruction for t in accepted], seeds) if seeds and accepted else [],
        rouge_threshold=_threshold(run.config),
        verbs=verbs,
        without_leading_verb=without,
        rouge_rejected_against_dropped=both_lost,
        accepted_samples=[
            Sample(task_by_id[i.task_id].instruction, i.input, i.output, similarity=task_by_id[i.task_id].similarity)
            for i in _sample(rng, good, samples)
        ],
        rejected_samples=[Sample(t.instruction, reason=t.reason, nearest=t.nearest, similarity=t.similarity) for t in _sample(rng, rejected, samples)],
        rejected_instance_samples=[
            Sample(task_by_id[i.task_id].instruction, i.input, i.output, reason=i.reason) for i in _sample(rng, bad, samples)
        ],
        instances_with_preamble=sum(has_preamble(i.input) for i in good) if run.pipeline == "self-instruct" else None,
        instances_with_trailer=sum(has_trailer(i.output) for i in good) if run.pipeline == "self-instruct" else None,
        cost=cost.cost_dict(cost.run_usage(session, run), prices),
    )


def _sample(rng: random.Random, items: list, k: int) -> list:
    return [items[i] for i in sorted(rng.sample(range(len(items)), min(k, len(items))))]


def _threshold(config: dict[str, Any]) -> float | None:
    for key in ("rouge_threshold", "similarity_threshold"):
        if isinstance(config.get(key), (int, float)):
            return float(config[key])
    for value in config.values():
        if isinstance(value, dict):
            found = _threshold(value)
            if found is not None:
                return found
    return None


def summary(report: RunReport) -> dict[str, Any]:
    """The headline numbers, for the terminal table and --json."""
    return {
        "run": report.name,
        "pipeline": report.pipeline,
        "model": report.model,
        "backend": report.backend,
        "status": report.status,
        "completions": report.completions,
        "instructions": report.instructions,
        "accepted": report.accepted,
        "rejected": report.rejected,
        "not_judged": report.not_judged,
        "keep_rate": None if report.keep_rate is None else round(report.keep_rate, 4),
        "rejected_by_reason": report.rejected_by_reason,
        "instances_accepted": report.instances_accepted,
        "instances_rejected_by_reason": report.instances_rejected_by_reason,
        "tasks_without_instances": report.tasks_without_instances,
        "rouge_rejected_against_a_dropped_instruction": report.rouge_rejected_against_dropped,
        "instances_with_preamble": report.instances_with_preamble,
        "instances_with_trailer": report.instances_with_trailer,
        "median_instruction_words": _median(report.instruction_words),
        "median_output_words": _median(report.output_words),
        "median_rouge_l_to_nearest_seed": _median(report.seed_similarity, 3),
        "top_verbs": {v.verb: v.count for v in report.verbs[:5]},
        "cost": report.cost,
    }


def _median(values: list, digits: int = 1) -> float | None:
    return round(float(statistics.median(values)), digits) if values else None


# --- Plots -------------------------------------------------------------------------------------------------------------

ACCEPTED, REJECTED, SEEDS, INK = "#3b7dd8", "#d8643b", "#9a9a9a", "#333333"


def _figure(width: float = 7.0, height: float = 3.8, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10})
    return plt.subplots(figsize=(width, height), **kwargs)


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_counts(report: RunReport, path: Path) -> Path:
    """Accepted vs each rejection reason, for instructions (top) and instances (below): stacked, not side by side, so
    the long reason labels of one panel never run into the other's bars; each panel's height follows its rows."""
    rows = [len(report.rejected_by_reason) + 1, len(report.instances_rejected_by_reason) + 1]
    fig, axes = _figure(7.0, 1.3 + 0.3 * sum(rows) + 0.6, nrows=2, gridspec_kw={"height_ratios": [r + 1.2 for r in rows]})
    panels = [
        ("Instructions", report.accepted, report.rejected_by_reason),
        ("Instances", report.instances_accepted, report.instances_rejected_by_reason),
    ]
    for ax, (title, kept, reasons) in zip(axes, panels):
        labels = ["accepted"] + [f"rejected: {r}" for r in reasons]
        values = [kept, *reasons.values()]
        y = range(len(labels))[::-1]
        bars = ax.barh(list(y), values, color=[ACCEPTED] + [REJECTED] * len(reasons))
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_yticks(list(y), labels)
        ax.set_title(f"{title}: {kept} of {kept + sum(reasons.values())} kept")
        ax.set_xlim(0, max(values + [1]) * 1.18)
        ax.set_xlabel("count")
        _integer_axis(ax.xaxis)
    return _save(fig, path)


def plot_keep_rate(report: RunReport, path: Path) -> Path:
    """Keep rate per batch (top) and accepted/rejected counts per batch (bottom)."""
    batches = [b.batch for b in report.keep_by_batch]
    fig, (top, bottom) = _figure(7.0, 4.6, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    rates = [100 * b.keep_rate for b in report.keep_by_batch]
    accepted_so_far = rejected_so_far = 0
    cumulative = []
    for b in report.keep_by_batch:
        accepted_so_far += b.accepted
        rejected_so_far += b.rejected
        cumulative.append(100 * accepted_so_far / (accepted_so_far + rejected_so_far))
    top.plot(batches, rates, marker="o", color=ACCEPTED, label="this batch")
    top.plot(batches, cumulative, linestyle="--", color=INK, label="whole run so far")
    top.set_ylim(0, 105)
    top.set_ylabel("instructions kept (%)")
    top.set_title("Keep rate per batch (accepted / judged instructions; target_reached left out)")
    top.legend(frameon=False, loc="lower left")
    accepted = [b.accepted for b in report.keep_by_batch]
    bottom.bar(batches, accepted, color=ACCEPTED, label="accepted")
    bottom.bar(batches, [b.rejected for b in report.keep_by_batch], bottom=accepted, color=REJECTED, label="rejected")
    bottom.set_ylabel("instructions")
    bottom.set_xlabel("batch")
    bottom.set_ylim(0, max(b.accepted + b.rejected for b in report.keep_by_batch) * 1.4)
    _integer_axis(bottom.yaxis)
    bottom.legend(frameon=False, ncols=2, loc="upper right", fontsize=8)
    if len(batches) <= 25:
        bottom.set_xticks(batches)
    return _save(fig, path)


def plot_instances_per_task(report: RunReport, path: Path) -> Path:
    fig, ax = _figure(5.5, 3.2)
    counts = report.instances_per_task
    xs = list(range(0, max(counts, default=0) + 1))
    bars = ax.bar(xs, [counts.get(x, 0) for x in xs], color=[REJECTED if x == 0 else ACCEPTED for x in xs])
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_xticks(xs)
    ax.set_xlabel("accepted instances of the instruction (0: not exported)")
    ax.set_ylabel("accepted instructions")
    ax.set_title("Instances per accepted instruction")
    ax.set_ylim(0, max(list(counts.values()) + [1]) * 1.18)
    _integer_axis(ax.yaxis)
    return _save(fig, path)


def plot_lengths(report: RunReport, path: Path) -> Path:
    """Word counts of accepted instructions and outputs; the run's seed instructions as an outline for comparison."""
    import numpy as np

    fig, (left, right) = _figure(8.0, 3.4, ncols=2)
    for ax, values, title in ((left, report.instruction_words, "Instruction length"), (right, report.output_words, "Output length")):
        if not values:
            ax.text(0.5, 0.5, "no accepted items", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            continue
        compare = report.seed_instruction_words if ax is left else []
        top = max(values + compare)
        bins = np.linspace(0, top + 1, min(25, top + 2))
        ax.hist(values, bins=bins, weights=np.full(len(values), 100 / len(values)), color=ACCEPTED, label=f"accepted (n={len(values)})")
        if compare:
            ax.hist(compare, bins=bins, weights=np.full(len(compare), 100 / len(compare)), histtype="step", linewidth=1.5,
                    color=INK, label=f"seed tasks (n={len(compare)})")  # fmt: skip
        ax.axvline(statistics.median(values), color=REJECTED, linestyle=":", label=f"median {statistics.median(values):g}")
        ax.set_title(title)
        ax.set_xlabel("words")
        ax.set_ylabel("share (%)")
        ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_seed_similarity(report: RunReport, path: Path) -> Path:
    """Self-Instruct Figure 3's shape: a histogram of each new instruction's ROUGE-L to its most similar seed."""
    import numpy as np

    fig, ax = _figure(6.0, 3.4)
    values = report.seed_similarity
    if values:
        ax.hist(values, bins=np.linspace(0, 1, 21), color=ACCEPTED, edgecolor="white")
        ax.axvline(statistics.median(values), color=INK, linestyle=":", label=f"median {statistics.median(values):.2f}")
        if report.rouge_threshold is not None:
            ax.axvline(report.rouge_threshold, color=REJECTED, linestyle="--", label=f"filter threshold {report.rouge_threshold:g}")
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "no seed tasks stored with this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROUGE-L F with the most similar seed instruction")
    ax.set_ylabel("accepted instructions")
    _integer_axis(ax.yaxis)
    ax.set_title("How far new instructions move from the seeds (cf. Self-Instruct, Figure 3)")
    return _save(fig, path)


def plot_verbs(report: RunReport, path: Path) -> Path:
    """Most common leading verbs (bars) and each one's most common objects (text at the bar's end)."""
    verbs = report.verbs
    fig, ax = _figure(8.0, max(2.4, 0.8 + 0.32 * len(verbs)))
    if verbs:
        y = list(range(len(verbs)))[::-1]
        ax.barh(y, [v.count for v in verbs], color=ACCEPTED)
        ax.set_yticks(y, [v.verb for v in verbs])
        top = max(v.count for v in verbs)
        for yy, v in zip(y, verbs):
            objects = ", ".join(f"{o} ({n})" for o, n in v.objects) or "—"
            ax.text(v.count + top * 0.02, yy, objects, va="center", fontsize=8, color=INK)
        ax.set_xlim(0, top * 2.2)
    else:
        ax.text(0.5, 0.5, "no accepted instruction opens with a verb", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("accepted instructions")
    _integer_axis(ax.xaxis)
    share = sum(v.count for v in verbs)
    ax.set_title(
        f"Leading verbs of accepted instructions, with their most common objects\n"
        f"top {len(verbs)} verbs cover {share} of {report.accepted}; {report.without_leading_verb} open with no verb (questions etc.)"
    )
    return _save(fig, path)


PLOTS = {
    "counts.png": plot_counts,
    "keep_rate.png": plot_keep_rate,
    "instances_per_task.png": plot_instances_per_task,
    "lengths.png": plot_lengths,
    "seed_similarity.png": plot_seed_similarity,
    "verbs.png": plot_verbs,
}


# --- The page ---------------------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def render_markdown(report: RunReport) -> str:
    s = summary(report)
    keep_rates = [b.keep_rate for b in report.keep_by_batch]
    lines = [
        f"# Report on run `{report.name}`",
        "",
        f"`{report.pipeline}` run of `{report.model}` on the `{report.backend}` backend (status: {report.status}).",
        "",
        "| | |",
        "|---|---:|",
        f"| completions from the model (all calls) | {report.completions} |",
        f"| instructions generated | {report.instructions} |",
        f"| instructions accepted | {report.accepted} (keep rate {_percent(s['keep_rate'])}: accepted / (accepted + rejected)) |",
        f"| instructions rejected (by a filter or by hand) | {report.rejected} |",
        f"| instructions not judged (`target_reached`: generated after the target was met) | {report.not_judged} |",
        f"| instances accepted | {report.instances_accepted} |",
        f"| instances rejected | {sum(report.instances_rejected_by_reason.values())} |",
        f"| accepted instructions without an accepted instance | {report.tasks_without_instances} |",
        f"| ROUGE-L rejections whose nearest instruction was itself dropped later (both copies lost) | {report.rouge_rejected_against_dropped} |",
        f"| median instruction / output length (words) | {s['median_instruction_words']} / {s['median_output_words']} |",
        f"| median ROUGE-L to the nearest seed | {s['median_rouge_l_to_nearest_seed']} |",
        "",
        *_cost_lines(report),
        "## Counts",
        "",
        "![accepted and rejected, by reason](counts.png)",
        "",
        _reasons_line("Instructions rejected", report.rejected_by_reason),
        _reasons_line("Instances rejected", report.instances_rejected_by_reason),
        "",
        "![keep rate per batch](keep_rate.png)",
        "",
        f"Keep rate per batch ranged from {min(keep_rates):.0%} to {max(keep_rates):.0%} over {len(keep_rates)} batches "
        f"(first {keep_rates[0]:.0%}, last {keep_rates[-1]:.0%}).",
        "",
        "![instances per instruction](instances_per_task.png)",
        "",
        "## Distributions",
        "",
        "![instruction and output lengths](lengths.png)",
        "",
        "![ROUGE-L to the nearest seed](seed_similarity.png)",
        "",
        _similarity_line(report),
        "",
        "![leading verbs and objects](verbs.png)",
        "",
        "Verb and object come from a heuristic (first word, then the first content word after it), not a parser.",
        "",
        "## Samples",
        "",
        f"### Accepted (random {len(report.accepted_samples)})",
        "",
    ]
    for sample in report.accepted_samples:
        lines += _sample_lines(sample)
    lines += [f"### Rejected instructions (random {len(report.rejected_samples)})", ""]
    for sample in report.rejected_samples:
        lines += _sample_lines(sample)
    lines += [f"### Rejected instances (random {len(report.rejected_instance_samples)})", ""]
    for sample in report.rejected_instance_samples:
        lines += _sample_lines(sample)
    return "\n".join(lines).rstrip() + "\n"


def _cost_lines(report: RunReport) -> list[str]:
    """Tokens, seconds per stage and the money they cost at the price table's prices when the report was made."""
    if report.cost is None:
        return []
    c = report.cost
    lines = ["## Cost", "", "| | |", "|---|---:|"]
    lines += [f"| prompt / completion tokens of `{model}` | {t['prompt']:,} / {t['completion']:,} |" for model, t in c["tokens"].items()]
    lines += [f"| seconds: {stage} | {seconds:,.1f} |" for stage, seconds in c["seconds"].items()]
    lines += [f"| cost | {c['shown']} |"]
    if c["cost"] is not None and report.accepted:
        lines += [f"| cost per accepted instruction | {cost.money(c['cost'] / report.accepted, c['currency'])} |"]
    lines += ["", "Money is computed from the price table when the report is written (datagen/cost.py): edit the table "
              "and rerun `datagen report` to reprice.", ""]  # fmt: skip
    return lines


def _reasons_line(title: str, reasons: dict[str, int]) -> str:
    if not reasons:
        return f"{title}: none.  "
    return f"{title}: " + ", ".join(f"{reason} {n}" for reason, n in reasons.items()) + ".  "


def _similarity_line(report: RunReport) -> str:
    values = report.seed_similarity
    if not values:
        return "No seed tasks are stored with this run, so the similarity to seeds is not computed."
    above = sum(v > 0.5 for v in values)
    return (
        f"Median ROUGE-L to the nearest seed: {statistics.median(values):.2f}; {above} of {len(values)} accepted instructions "
        "score above 0.5. Self-Instruct reports most of its instructions below 0.5 (its Figure 3)."
    )


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.strip().splitlines()) or "> (empty)"


def _sample_lines(sample: Sample) -> list[str]:
    lines = ["**Instruction:**", "", _quote(sample.instruction), ""]
    if sample.input and sample.input.strip():
        lines += ["**Input:**", "", _quote(sample.input), ""]
    if sample.output is not None:
        lines += ["**Output:**", "", _quote(sample.output), ""]
    if sample.reason:
        nearest = sample.nearest if sample.nearest is None or len(sample.nearest) <= 120 else sample.nearest[:117] + "..."
        detail = f" (ROUGE-L {sample.similarity:.2f} with “{nearest}”)" if nearest and sample.similarity is not None else ""
        lines += [f"**Rejected:** {sample.reason}{detail}", ""]
    lines += ["---", ""]
    return lines


def write_report(report: RunReport, out: Path) -> list[Path]:
    """report.md and the PNGs into `out` (created if needed); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [plot(report, out / name) for name, plot in PLOTS.items()]
    page = out / "report.md"
    page.write_text(render_markdown(report), encoding="utf-8")
    return [page, *files]


def report_json(report: RunReport) -> dict[str, Any]:
    return summary(report) | {"keep_by_batch": [asdict(b) for b in report.keep_by_batch], "instances_per_task": report.instances_per_task}
