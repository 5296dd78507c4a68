"""Curating a scored run: keep or drop each accepted instance by a rule over its stored scores (pipelines/score.py,
pipelines/judge.py), and store every verdict with its reason. Export then leaves the dropped instances out.

    datagen curate --run demo --keep "ifd < 0.9 and not degenerate"
    datagen curate --run demo --keep "ifd <= 1" --top 0.1 --by ifd     # Cherry LLM's selection: the top 10% by IFD

A rule is `--keep EXPR`, `--top FRACTION --by SCORE`, or both (the expression first, then the top fraction of what it
kept, as Cherry's data_by_IFD.py drops IFD > 1 and then takes the highest IFDs). EXPR is a small language, parsed here
and never passed to eval(): score names, numbers, true/false, comparisons (< <= > >= == !=, chained), `and`, `or`,
`not`, parentheses, and + - * / between numbers. A score that is null for an instance (IFD of an empty output, an
unparseable judge answer) drops it, with that as the reason.

Score names: ifd, conditioned_loss, direct_loss, perplexity, output_tokens, truncated, repeated, cut, degenerate (from
the IFD scores of `model`), and judge_<rubric> for each judge rubric scored on the run (e.g. judge_accuracy).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

from sqlmodel import Session, delete, select

from datagen.errors import BadInput
from datagen.models import DEFAULT_MODEL
from pipelines.score import IFD_METHOD, IFD_VERSION, run_pairs
from storage.store import get_run
from storage.tables import Curation, CurationVerdict, InstanceScore

IFD_NAMES = {
    "ifd": "score", "conditioned_loss": "conditioned_loss", "direct_loss": "direct_loss", "perplexity": "perplexity",
    "output_tokens": "output_tokens", "truncated": "truncated", "repeated": "repeated", "cut": "cut", "degenerate": "degenerate",
}  # fmt: skip
"""Score name in a rule → InstanceScore column of the IFD row."""
JUDGE_PREFIX = "judge_"


# ---- the expression language ------------------------------------------------------------------------------------------

_COMPARE: dict[type, Callable] = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
                                  ast.Eq: operator.eq, ast.NotEq: operator.ne}  # fmt: skip
_ARITHMETIC: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class Null(Exception):
    """A score the rule reads is null for this instance."""

    def __init__(self, name: str):
        self.name = name


@dataclass(frozen=True)
class Expression:
    """A parsed --keep expression: its text, syntax tree (checked: only the whitelisted nodes) and the names it reads."""

    text: str
    tree: ast.Expression
    names: frozenset[str]

    def __call__(self, values: dict[str, float | bool | None]) -> bool:
        return bool(_evaluate(self.tree.body, values))


def parse_keep(text: str) -> Expression:
    """Parse and check a --keep expression; BadInput naming the offending part."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise BadInput(f"--keep {text!r}: not an expression ({err.msg}, at character {err.offset})") from None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) or node.value is None or isinstance(node.value, complex):
                raise BadInput(f"--keep {text!r}: only numbers and true/false are allowed, got {node.value!r}")
        elif not isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare,
                                   ast.BinOp, ast.Load, *_COMPARE, *_ARITHMETIC)):  # fmt: skip
            raise BadInput(f"--keep {text!r}: {type(node).__name__} is not allowed (scores, numbers, comparisons, and/or/not, + - * /)")
    names -= {"true", "false", "True", "False"}
    for name in sorted(names):
        check_name(name, f"--keep {text!r}")
    return Expression(text.strip(), tree, frozenset(names))


def check_name(name: str, where: str) -> None:
    if name not in IFD_NAMES and not (name.startswith(JUDGE_PREFIX) and len(name) > len(JUDGE_PREFIX)):
        raise BadInput(f"{where}: unknown score '{name}' (one of {', '.join(IFD_NAMES)}, or judge_<rubric>)")


def _evaluate(node: ast.AST, values: dict[str, float | bool | None]):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("true", "True", "false", "False"):
            return node.id in ("true", "True")
        value = values[node.id]
        if value is None:
            raise Null(node.id)
        return value
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_evaluate(v, values) for v in node.values)
        return any(_evaluate(v, values) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, values)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        if isinstance(node.op, ast.Div) and right == 0:
            return math.inf
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise AssertionError(f"unchecked node {type(node).__name__}")  # parse_keep admits no other node


# ---- the rule ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurationRule:
    """Which instances of a run to keep."""

    keep: str | None = None
    """An expression over score names; instances for which it is false are dropped."""
    top: float | None = None
    """Keep this fraction (0, 1] of the instances left after `keep`, ranked by `by` (rounded up: at least one)."""
    by: str | None = None
    """The score `top` ranks by."""
    lowest: bool = False
    """`top` keeps the lowest scores instead of the highest (e.g. the lowest IFD)."""
    model: str = DEFAULT_MODEL
    """Whose IFD scores the rule reads (the student that `datagen score --model` used)."""
    judge_model: str | None = None
    """Whose judge_<rubric> scores the rule reads; None: the one model that judged the run with that rubric."""

    def __post_init__(self) -> None:
        if self.keep is None and self.top is None:
            raise BadInput("give --keep EXPR, or --top FRACTION --by SCORE (or both)")
        if (self.top is None) != (self.by is None):
            raise BadInput("--top and --by go together: --top 0.1 --by ifd keeps the 10% with the highest IFD")
        if self.top is not None and not (isinstance(self.top, (int, float)) and 0 < self.top <= 1):
            raise BadInput(f"--top must be a fraction in (0, 1], got {self.top!r}")
        if self.lowest and self.top is None:
            raise BadInput("--lowest applies to --top")
        if self.by is not None:
            check_name(self.by, "--by")
        if self.keep is not None:
            parse_keep(self.keep)

    @property
    def text(self) -> str:
        """The rule as the card and the viewer show it."""
        parts = [self.keep] if self.keep else []
        if self.top is not None:
            parts.append(f"top {self.top:g} by {'lowest ' if self.lowest else ''}{self.by}")
        return "; then ".join(parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CurationResult:
    run: str
    rule: str
    scores: list[str]
    instances: int
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]
    replaced: bool
    """A previous curation of the run was replaced."""


def score_values(session: Session, run_id: int, names: set[str], rule: CurationRule) -> tuple[dict[int, dict], list[str]]:
    """instance id → {score name: value} for the names the rule reads, and the scores read ("model/method vN")."""
    values: dict[int, dict] = {}
    used = []
    ifd_names = names & set(IFD_NAMES)
    if ifd_names:
        rows = session.exec(
            select(InstanceScore).where(InstanceScore.run_id == run_id, InstanceScore.model == rule.model,
                                        InstanceScore.method == IFD_METHOD, InstanceScore.method_version == IFD_VERSION)  # fmt: skip
        ).all()
        for row in rows:
            values.setdefault(row.instance_id, {}).update({n: getattr(row, IFD_NAMES[n]) for n in ifd_names})
            values[row.instance_id]["_reason_" + IFD_METHOD] = row.reason
        used.append(f"{rule.model}/{IFD_METHOD} v{IFD_VERSION}")
    for name in sorted(names - set(IFD_NAMES)):
        method = "judge:" + name[len(JUDGE_PREFIX) :]
        models = sorted(set(session.exec(select(InstanceScore.model).where(InstanceScore.run_id == run_id, InstanceScore.method == method)).all()))
        model = rule.judge_model
        if model is None:
            if len(models) != 1:
                found = f"judged by {', '.join(models)}: pick one with --judge-model" if models else "no instance has one"
                raise BadInput(f"score '{name}' ({method}): {found}")
            model = models[0]
        rows = session.exec(select(InstanceScore).where(InstanceScore.run_id == run_id, InstanceScore.method == method, InstanceScore.model == model)).all()
        for row in rows:
            values.setdefault(row.instance_id, {})[name] = row.score
            values[row.instance_id]["_reason_" + method] = row.reason
        used.append(f"{model}/{method} v{rows[0].method_version if rows else 1}")
    return values, used


def _null_reason(name: str, values: dict) -> str:
    method = IFD_METHOD if name in IFD_NAMES else "judge:" + name[len(JUDGE_PREFIX) :]
    why = values.get("_reason_" + method)
    return f"{name} is null" + (f": {why}" if why else "")


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def curate_run(session: Session, run_name: str, rule: CurationRule) -> CurationResult:
    """Verdicts for every accepted instance of the run under `rule`, stored as the run's curation in one transaction
    (replacing any earlier one). Every instance the rule reads must be scored: else BadInput naming the command."""
    run = get_run(session, run_name)
    instance_ids = [p.instance_id for p in run_pairs(session, run)]
    if not instance_ids:
        raise BadInput(f"run '{run.name}' has no accepted instances to curate")
    expression = parse_keep(rule.keep) if rule.keep else None
    names = set(expression.names if expression else ()) | ({rule.by} if rule.by else set())
    values, used = score_values(session, run.id, names, rule)
    missing = [i for i in instance_ids if not names <= set(values.get(i, {}))]
    if missing:
        command = f"datagen score --run {run.name} --model {rule.model}"
        raise BadInput(f"{len(missing)} of {len(instance_ids)} accepted instances of '{run.name}' have no score for "
                       f"{', '.join(sorted(names))}: score them first ({command}, or --judge for judge_ scores)")  # fmt: skip
    verdicts: dict[int, str | None] = {}  # instance id → None (kept) or the reason it was dropped
    for instance_id in instance_ids:
        row = values[instance_id]
        try:
            kept = expression(row) if expression else True
            reason = None if kept else f"fails {expression.text} (" + ", ".join(f"{n}={_shown(row[n])}" for n in sorted(expression.names)) + ")"  # type: ignore[union-attr]
        except Null as null:
            reason = _null_reason(null.name, row)
        verdicts[instance_id] = reason
    if rule.top is not None:
        by = rule.by
        for instance_id in instance_ids:
            if verdicts[instance_id] is None and values[instance_id][by] is None:
                verdicts[instance_id] = _null_reason(by, values[instance_id])  # type: ignore[arg-type]
        ranked = [i for i in instance_ids if verdicts[i] is None]
        ranked.sort(key=lambda i: values[i][by], reverse=not rule.lowest)  # stable: ties keep run order
        keep = math.ceil(rule.top * len(ranked))
        if ranked[keep:]:
            cutoff = values[ranked[keep - 1]][by]
            side = "lowest" if rule.lowest else "highest"
            for i in ranked[keep:]:
                verdicts[i] = f"not in the {side} {rule.top:.0%} by {by} ({by}={_shown(values[i][by])}, cut-off {_shown(cutoff)})"
    previous = session.exec(select(Curation).where(Curation.run_id == run.id)).first()
    if previous is not None:
        session.exec(delete(CurationVerdict).where(CurationVerdict.curation_id == previous.id))
        session.delete(previous)
        session.flush()
    kept = sum(reason is None for reason in verdicts.values())
    curation = Curation(run_id=run.id, rule=rule.text, scores=used, kept=kept, dropped=len(verdicts) - kept)
    session.add(curation)
    session.flush()
    session.add_all(CurationVerdict(curation_id=curation.id, instance_id=i, kept=reason is None, reason=reason) for i, reason in verdicts.items())
    session.commit()
    by_reason: dict[str, int] = {}
    for reason in verdicts.values():
        if reason is not None:
            key = reason.split(" (")[0]
            by_reason[key] = by_reason.get(key, 0) + 1
    return CurationResult(run.name, rule.text, used, len(verdicts), kept, len(verdicts) - kept, by_reason, previous is not None)
