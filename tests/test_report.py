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
from datagen.report import PLOTS, collect, count_verbs, leading_verb
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
    assert "| instructions accepted | 0 (0%) |" in page and "blacklist 1" in page
    assert all((tmp_path / "r" / name).read_bytes()[:8] == PNG_MAGIC for name in PLOTS)
