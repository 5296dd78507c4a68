"""LLM-as-judge scores of a run's accepted instances under a rubric file, for users who have a strong model.

AlpaGasus (Chen et al., ICLR 2024, arXiv 2307.08701) had ChatGPT rate each Alpaca instance's accuracy and trained on
the best rated 9k of 52k; examples/rubrics/accuracy.md is that rubric in our own words.

    datagen score --run demo --judge --model M --backend openai --base-url URL --rubric examples/rubrics/accuracy.md
    datagen curate --run demo --keep "judge_accuracy >= 4.5"

A rubric file is YAML front matter (name, scale: [low, high]) and a prompt with {instruction}, {input} and {output}
where the item goes. The judge answers greedily; its score is the number on the first non-empty line of its answer
(the rubric asks for it there), or after "Score:". An answer with no number, or one outside the scale, is stored with
score NULL, its raw text and the reason: never dropped. On the embedded 135M model this is a demo of the mechanics
only: its ratings carry no information.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlmodel import Session, select

from datagen.backends import Backend, Request, SamplingParams
from datagen.errors import BadInput
from pipelines.score import Pair, run_pairs
from storage.store import get_run
from storage.tables import InstanceScore

JUDGE_VERSION = 1
PLACEHOLDERS = ("{instruction}", "{input}", "{output}")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_SCORE_LABEL = re.compile(r"score\s*[:=]\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class Rubric:
    name: str
    """Lower-case letters, digits and _: the method is judge:<name> and the curate score judge_<name>."""
    low: float
    high: float
    prompt: str
    """The prompt with {instruction}, {input} and {output} placeholders."""
    path: str
    sha256: str


def read_rubric(path: Path) -> Rubric:
    """A rubric file; BadInput naming the file and the field at fault."""
    if not path.is_file():
        raise BadInput(f"{path}: no such rubric file")
    text = path.read_text(encoding="utf-8")
    parts = text.split("---\n", 2) if text.startswith("---\n") else None
    if not parts or len(parts) < 3:
        raise BadInput(f"{path}: a rubric starts with YAML front matter between '---' lines (name, scale: [low, high])")
    try:
        meta = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError as err:
        raise BadInput(f"{path}: invalid YAML front matter: {err}") from None
    name, scale, prompt = meta.get("name"), meta.get("scale"), parts[2].strip()
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadInput(f"{path}: field 'name' must be lower-case letters, digits and _ (e.g. accuracy), got {name!r}")
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            and scale[0] < scale[1]):  # fmt: skip
        raise BadInput(f"{path}: field 'scale' must be [low, high] with low < high, got {scale!r}")
    for placeholder in ("{instruction}", "{output}"):
        if placeholder not in prompt:
            raise BadInput(f"{path}: the prompt needs a {placeholder} placeholder")
    return Rubric(name, float(scale[0]), float(scale[1]), prompt, str(path), hashlib.sha256(text.encode()).hexdigest())


def judge_prompt(rubric: Rubric, pair: Pair) -> str:
    """The rubric with the item filled in (plain replacement, so braces elsewhere in a rubric are kept as written)."""
    text = rubric.prompt.replace("{instruction}", pair.instruction).replace("{output}", pair.output)
    return text.replace("{input}", pair.input if pair.input.strip() else "(none)")


def parse_judgement(text: str, low: float, high: float) -> tuple[float | None, str | None]:
    """(score, None), or (None, reason) when the answer holds no score in [low, high]."""
    labelled = _SCORE_LABEL.search(text)
    first = next((line for line in text.splitlines() if line.strip()), "")
    found = labelled.group(1) if labelled else (m.group(0) if (m := _NUMBER.search(first)) else None)
    if found is None:
        return None, "unparseable judge output: no score on the first line or after 'Score:'"
    score = float(found)
    if not low <= score <= high:
        return None, f"unparseable judge output: score {found} is outside the scale {low:g}-{high:g}"
    return score, None


@dataclass(frozen=True)
class JudgeConfig:
    model: str
    """The judge model as given; stored with every score."""
    rubric: Rubric
    batch_size: int = 64
    rescore: bool = False
    max_tokens: int = 256
    """Room for the score line and a short explanation."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class JudgeRunResult:
    run: str
    model: str
    method: str
    method_version: int
    instances: int
    scored: int
    skipped: int
    no_score: int
    """Stored with score NULL: the judge's answer did not parse."""
    mean_score: float | None
    seconds: float


def judge_run(session: Session, backend: Backend, run_name: str, config: JudgeConfig, progress: Callable[[int, int], None] | None = None) -> JudgeRunResult:
    """The judge's score of every accepted instance of the run, one batch per transaction; a rerun skips instances this
    judge already scored with this rubric name (or replaces them with config.rescore)."""
    started = time.perf_counter()
    run = get_run(session, run_name)
    pairs = run_pairs(session, run)
    method = f"judge:{config.rubric.name}"
    of_model = (InstanceScore.run_id == run.id, InstanceScore.model == config.model, InstanceScore.method == method,
                InstanceScore.method_version == JUDGE_VERSION)  # fmt: skip
    if config.rescore:
        for row in session.exec(select(InstanceScore).where(*of_model)).all():
            session.delete(row)
        session.commit()
    done = set(session.exec(select(InstanceScore.instance_id).where(*of_model)).all())
    todo = [p for p in pairs if p.instance_id not in done]
    params = SamplingParams(temperature=0.0, max_tokens=config.max_tokens)
    rubric = config.rubric
    settings = {"rubric": rubric.path, "rubric_sha256": rubric.sha256, "scale": [rubric.low, rubric.high], "max_tokens": config.max_tokens,
                "backend": backend.name}  # fmt: skip
    scores: list[float | None] = []
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        requests = [Request(messages=({"role": "user", "content": judge_prompt(rubric, p.pair)},), params=params) for p in batch]
        for stored, result in zip(batch, backend.generate(requests)):
            raw = result.completions[0].text
            score, reason = parse_judgement(raw, rubric.low, rubric.high)
            session.add(InstanceScore(run_id=run.id, instance_id=stored.instance_id, model=config.model, method=method,
                                      method_version=JUDGE_VERSION, score=score, raw=raw, reason=reason, settings=settings))  # fmt: skip
            scores.append(score)
        session.commit()
        if progress is not None:
            progress(start + len(batch), len(todo))
    parsed = [s for s in scores if s is not None]
    return JudgeRunResult(run.name, config.model, method, JUDGE_VERSION, len(pairs), len(scores), len(pairs) - len(todo),
                          len(scores) - len(parsed), sum(parsed) / len(parsed) if parsed else None, time.perf_counter() - started)  # fmt: skip
