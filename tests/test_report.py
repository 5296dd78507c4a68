"""`datagen report`: numbers checked against the store, valid PNGs, the verb heuristic, bad input."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

import pytest
from matplotlib import image
from rouge_score import rouge_scorer
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from datagen.report import PLOTS, collect, count_verbs, leading_verb, summary
from storage.store import open_engine
from storage.tables import Generation, Instance, Run, Task
from tests.example_runs import build_run

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(db_url):
    with Session(open_engine(db_url)) as session:
        build_run(session, "si-test", tasks=40)
        session.add(Run(name="empty", pipeline="self-instruct", model="smollm2-135m", backend="transformers"))
        session.commit()
    return db_url


def test_report_writes_markdown_and_valid_pngs(store, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", "--run", "si-test", "--out", str(out), "--db", store])
    assert result.exit_code == 0, result.output
    assert "Report on si-test" in result.output and "keep rate" in result.output
    page = (out / "report.md").read_text()
    for name in PLOTS:
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01  # a real picture, not blank
        assert f"]({name})" in page
    assert "## Samples" in page and "**Rejected:** " in page


def test_report_numbers_match_the_store(store, tmp_path):
    result = runner.invoke(app, ["report", "--run", "si-test", "--out", str(tmp_path / "r"), "--db", store, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with Session(open_engine(store)) as session:
        run = session.exec(select(Run).where(Run.name == "si-test")).one()
        tasks = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated")).all()
        accepted = [t for t in tasks if t.status == "accepted"]
        instances = session.exec(select(Instance).where(Instance.task_id.in_([t.id for t in tasks]))).all()
        batches = {g.id: g.batch for g in session.exec(select(Generation).where(Generation.run_id == run.id))}
        seeds = session.exec(select(Task.instruction).where(Task.run_id == run.id, Task.source == "seed")).all()
    assert summary["instructions"] == len(tasks) == 40
    assert summary["accepted"] == len(accepted) == 30
    assert summary["rejected_by_reason"] == dict(Counter(t.reason for t in tasks if t.status == "rejected"))
    assert summary["instances_accepted"] == sum(i.status == "accepted" for i in instances)
    assert summary["instances_rejected_by_reason"] == dict(Counter(i.reason for i in instances if i.status == "rejected"))
    assert summary["tasks_without_instances"] == 1
    kept = [i for i in instances if i.status == "accepted" and i.task_id in {t.id for t in accepted}]
    assert summary["instances_with_preamble"] == sum(bool(re.search(r"\n\s*Input\s*\d*\s*:", i.input.strip())) for i in kept)
    assert summary["instances_with_trailer"] == sum("\n\n" in i.output.strip() for i in kept)
    assert summary["completions"] == run.generated

    per_batch = {}
    for t in tasks:
        per_batch.setdefault(batches[t.generation_id], Counter())[t.status] += 1
    assert summary["keep_by_batch"] == [
        {"batch": b, "accepted": c["accepted"], "rejected": c["rejected"]} for b, c in sorted(per_batch.items())
    ]
    assert summary["median_instruction_words"] == statistics.median(len(t.instruction.split()) for t in accepted)

    # ROUGE-L to the nearest seed, checked with Google's rouge-score itself.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    nearest = [max(scorer.score(seed, t.instruction)["rougeL"].fmeasure for seed in seeds) for t in accepted]
    report = collect(Session(open_engine(store)), "si-test")
    assert report.seed_similarity == pytest.approx(nearest, abs=1e-12)
    assert summary["median_rouge_l_to_nearest_seed"] == round(statistics.median(nearest), 3)


def test_samples_are_seeded_and_carry_reasons(store):
    with Session(open_engine(store)) as session:
        first, again = collect(session, "si-test", seed=3), collect(session, "si-test", seed=3)
    assert first.accepted_samples == again.accepted_samples and len(first.accepted_samples) == 5
    assert all(s.reason for s in first.rejected_samples + first.rejected_instance_samples)
    assert all(s.output is not None for s in first.accepted_samples)


def test_leading_verb_heuristic():
    assert leading_verb("Write a story about a dragon.") == ("write", "story")
    assert leading_verb("Generate a list of 5 fruits.") == ("generate", "list")
    assert leading_verb("Give me a short summary of the article") == ("give", "summary")
    assert leading_verb("Please translate the following sentence into French.") == ("translate", "sentence")
    assert leading_verb("Come up with a new name for the company") == ("come", "name")
    assert leading_verb("Explain how photosynthesis works.") == ("explain", None)
    assert leading_verb("What is the capital of France?") == (None, None)
    assert leading_verb("Is this sentence grammatical?") == (None, None)
    assert leading_verb("") == (None, None)
    verbs, without = count_verbs(["Write a poem.", "Write a story.", "Write a poem about cats.", "Why?"])
    assert without == 1 and verbs[0].verb == "write" and verbs[0].count == 3 and verbs[0].objects == [("poem", 2), ("story", 1)]


def test_bad_input(store, tmp_path):
    result = runner.invoke(app, ["report", "--run", "nope", "--out", str(tmp_path / "a"), "--db", store])
    assert result.exit_code == 2 and "no run named or numbered 'nope'" in result.output
    result = runner.invoke(app, ["report", "--run", "empty", "--out", str(tmp_path / "b"), "--db", store])
    assert result.exit_code == 2 and "no generated instructions" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_that_kept_nothing_still_gets_a_report(db_url, tmp_path):
    with Session(open_engine(db_url)) as session:
        run = Run(name="nothing", pipeline="self-instruct", model="smollm2-135m", backend="transformers", status="stopped")
        session.add(run)
        session.flush()
        for text, reason in (("Draw a picture of a cat.", "blacklist"), ("Hi.", "too_short")):
            session.add(Task(run_id=run.id, instruction=text, status="rejected", reason=reason))
        session.commit()
    result = runner.invoke(app, ["report", "--run", "nothing", "--out", str(tmp_path / "r"), "--db", db_url])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.md").read_text()
    assert "| instructions accepted | 0 (keep rate 0%: accepted / (accepted + rejected)) |" in page and "blacklist 1" in page
    assert all((tmp_path / "r" / name).read_bytes()[:8] == PNG_MAGIC for name in PLOTS)


def test_keep_rate_is_over_judged_instructions_everywhere(db_url, tmp_path):
    """target_reached instructions were never judged: one keep rate, accepted / (accepted + rejected), in `datagen runs`,
    the report and the card (the CLI summary and the viewer read the same storage.queries.figures)."""
    from datagen.card import _run_section
    from datagen.export import run_facts
    from storage.queries import figures

    with Session(open_engine(db_url)) as session:
        run = Run(name="capped", pipeline="self-instruct", model="m", backend="scripted", status="completed", generated=9)
        session.add(run)
        session.flush()
        rows = [("accepted", None)] * 3 + [("rejected", "rouge_similarity")] + [("rejected", "target_reached")] * 4
        for k, (status, reason) in enumerate(rows):
            session.add(Task(run_id=run.id, instruction=f"Describe the number {k} in words.", status=status, reason=reason))
        run.accepted, run.rejected = 3, 5
        session.commit()
        numbers = figures(session, [run])[run.id]
        report = summary(collect(session, run.id))
        card = "\n".join(_run_section(run_facts(session, run, 0)))
    assert (numbers.completions, numbers.instructions, numbers.accepted, numbers.rejected, numbers.not_judged) == (9, 8, 3, 1, 4)
    assert numbers.keep_rate == 0.75 and report["keep_rate"] == 0.75 and (report["rejected"], report["not_judged"]) == (1, 4)
    assert "8 generated, 3 accepted, 1 rejected (keep rate 75%" in card and "4 not judged" in card
    listed = json.loads(runner.invoke(app, ["runs", "list", "--db", db_url, "--json"]).stdout)[0]
    assert (listed["completions"], listed["instructions"], listed["keep_rate"], listed["not_judged"]) == (9, 8, 0.75, 4)
    assert "generated" not in listed


def test_report_counts_rouge_rejections_against_a_dropped_instruction(db_url):
    """Issue 25: five of the quick start's 16 ROUGE rejections collided with instructions later dropped for
    no_valid_instances, so both copies were lost; the report counts them."""
    with Session(open_engine(db_url)) as session:
        run = Run(name="lost", pipeline="self-instruct", model="m", backend="scripted", status="completed")
        session.add(run)
        session.flush()
        rows = [
            ("Write a haiku about the sea.", "rejected", "no_valid_instances", None),
            ("Write a haiku about the ocean.", "rejected", "rouge_similarity", "Write a haiku about the sea."),
            ("List three prime numbers.", "accepted", None, None),
            ("List three prime numbers below ten.", "rejected", "rouge_similarity", "List three prime numbers."),
        ]
        for instruction, status, reason, nearest in rows:
            session.add(Task(run_id=run.id, instruction=instruction, status=status, reason=reason, nearest=nearest, similarity=0.8 if nearest else None))
        session.commit()
        assert summary(collect(session, run.id))["rouge_rejected_against_a_dropped_instruction"] == 1
