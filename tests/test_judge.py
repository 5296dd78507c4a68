"""LLM-as-judge scores (pipelines/judge.py): rubric files, parsing the judge's answer, and a run judged by the real
embedded model (a demo of the mechanics: its ratings carry no information)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, select

from datagen.errors import BadInput
from pipelines.curate import CurationRule, curate_run
from pipelines.judge import JudgeConfig, judge_prompt, judge_run, parse_judgement, read_rubric
from pipelines.score import Pair
from storage.store import open_engine
from storage.tables import CurationVerdict, InstanceScore
from tests.conftest import REPO
from tests.test_score import ITEMS, add_items

ACCURACY = REPO / "examples" / "rubrics" / "accuracy.md"


def test_shipped_rubric_reads_and_fills_in():
    rubric = read_rubric(ACCURACY)
    assert (rubric.name, rubric.low, rubric.high) == ("accuracy", 0.0, 5.0)
    prompt = judge_prompt(rubric, Pair("Add the numbers.", "2, 3", "5"))
    assert "Instruction:\nAdd the numbers.\n\nInput:\n2, 3\n\nResponse:\n5\n\n" in prompt and "{" not in prompt
    assert "Input:\n(none)" in judge_prompt(rubric, Pair("Say hi.", "", "hi"))


@pytest.mark.parametrize(
    "text, expected",
    [("4\nThe answer is right.", (4.0, None)), ("  \n4.5 - accurate", (4.5, None)), ("I rate it.\nScore: 3", (3.0, None)),
     ("**Score:** 2", (2.0, None)), ("Good answer overall.", (None, "unparseable judge output: no score on the first line or after 'Score:'")),
     ("7", (None, "unparseable judge output: score 7 is outside the scale 0-5")), ("", (None, "unparseable judge output: no score on the first line or after 'Score:'"))],
)  # fmt: skip
def test_parse_judgement(text, expected):
    assert parse_judgement(text, 0, 5) == expected


@pytest.mark.parametrize(
    "content, message",
    [("no front matter {instruction} {output}", "YAML front matter"), ("---\nname: Bad Name\nscale: [0, 5]\n---\n{instruction} {output}", "field 'name'"),
     ("---\nname: ok\nscale: [5, 0]\n---\n{instruction} {output}", "field 'scale'"), ("---\nname: ok\nscale: [0, 5]\n---\n{instruction}", r"\{output\} placeholder")],
)  # fmt: skip
def test_bad_rubrics_name_the_file_and_field(tmp_path: Path, content, message):
    path = tmp_path / "r.md"
    path.write_text(content)
    with pytest.raises(BadInput, match=message):
        read_rubric(path)


def test_judge_run_stores_every_answer_parsed_or_not(hf_backend, db_url):
    config = JudgeConfig(model="smollm2-135m", rubric=read_rubric(ACCURACY), max_tokens=8)
    with Session(open_engine(db_url)) as session:
        run = add_items(session, ITEMS)
        result = judge_run(session, hf_backend, run.name, config)
        rows = session.exec(select(InstanceScore)).all()
        assert (result.scored, len(rows), result.method) == (3, 3, "judge:accuracy")
        for row in rows:  # never dropped: a score, or NULL with the reason, and the raw answer either way
            assert row.raw is not None and (row.score is not None) != (row.reason is not None)
            assert row.score is None or 0 <= row.score <= 5
        assert result.no_score == sum(r.score is None for r in rows)
        assert judge_run(session, hf_backend, run.name, config).skipped == 3
        # curation reads judge_<rubric>; an unparsed answer drops its item with the reason
        curate_run(session, run.name, CurationRule(keep="judge_accuracy >= 0"))
        reasons = session.exec(select(CurationVerdict.reason).where(CurationVerdict.kept == False)).all()  # noqa: E712
        assert len(reasons) == result.no_score and all(r.startswith("judge_accuracy is null: unparseable") for r in reasons)


def test_judge_options_are_checked_before_a_model_loads(db_url):
    from typer.testing import CliRunner

    from datagen.cli import app

    runner = CliRunner()
    assert "--judge needs --rubric" in runner.invoke(app, ["score", "--run", "x", "--judge", "--db", db_url]).output
    assert runner.invoke(app, ["score", "--run", "x", "--rubric", str(ACCURACY), "--db", db_url]).exit_code == 2
    assert runner.invoke(app, ["score", "--run", "x", "--judge", "--rubric", "missing.md", "--db", db_url]).exit_code == 2
