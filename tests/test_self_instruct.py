"""Self-Instruct: exact-string tests of prompts and parsers, filter logic, and real runs on the embedded model
checked independently with rouge-score; kill -9 and resume; bad seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rouge_score import rouge_scorer
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from pipelines.self_instruct import (
    SelfInstructConfig,
    instance_verdicts,
    instruction_prompt,
    parse_instances,
    parse_instructions,
    rejection_reason,
)
from storage.store import get_run, open_engine
from storage.tables import Instance, Task
from tests.conftest import SEEDS

runner = CliRunner()


def test_instruction_prompt_is_the_papers_shape():
    assert instruction_prompt(["Write a poem.", "Sort numbers."], False) == (
        "Come up with a series of tasks:\n1. Write a poem.\n2. Sort numbers.\n3."
    )


def test_parse_raw_and_chat_completions():
    raw = " Plan a trip to Rome.\n10. Explain gravity to a child.\n11. Summarize"
    assert parse_instructions(raw, chat=False, truncated=True) == ["Plan a trip to Rome.", "Explain gravity to a child."]
    chat = "Here you go:\n9. Plan a trip.\n10) Explain\n   gravity simply.\n- Name a color."
    assert parse_instructions(chat, chat=True, truncated=False) == ["Plan a trip.", "Explain gravity simply.", "Name a color."]


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Sort these numbers.", "too_short"),
        ("Describe the image below in detail.", "blacklist:image"),
        ("Please Go To the store and buy milk today.", "blacklist:go to"),
        ("Write a program that sorts a list.", "write_a_program"),
        ('"Quote this sentence back to me please."', "starts_with_punctuation"),
        ("Éxplain how a bicycle gear works.", "non_ascii_start"),
        ("Explain how a bicycle gear works.", None),
        ("Explain the mapping between keys and values.", None),  # whole words only: 'mapping' is not 'map'
        (" ".join(["word"] * 151), "too_long"),
    ],
)
def test_filters(instruction, reason):
    assert rejection_reason(instruction, SelfInstructConfig()) == reason


def test_instance_parsing_and_verdicts():
    text = "Input: 2, 1\nOutput: 1, 2\nExample 2\nInput: b a\nOutput: a b\nExample 3\nInput: x:\nOutput: y\nExample 4\nInput: q"
    pairs = parse_instances(text, classification=False, truncated=True)
    assert pairs == [("2, 1", "1, 2"), ("b a", "a b"), ("x:", "y")]
    assert instance_verdicts(pairs, 5) == [None, None, "ends_with_colon"]
    assert instance_verdicts([("a", "1"), ("a", "2")], 5) == ["conflicting_outputs"] * 2
    assert instance_verdicts([("a", "1"), ("a", "1"), ("", ""), ("z", "z")], 5) == [None, "duplicate", "empty_output", "input_equals_output"]
    label_first = " Positive\nInput: I loved it.\nClass label: Negative\nInput: Awful."
    assert parse_instances(label_first, classification=True, truncated=False) == [("I loved it.", "Positive"), ("Awful.", "Negative")]


def check_store_independently(db_url: str, run_name: str, target: int) -> None:
    """Every accepted instruction: ROUGE-L (rouge-score itself) <= 0.7 against seeds and every earlier accepted
    one, and at least one instance; every rejected one has a reason; no duplicates."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    with Session(open_engine(db_url)) as session:
        run = get_run(session, run_name)
        tasks = session.exec(select(Task).where(Task.run_id == run.id).order_by(Task.id)).all()
        seeds = [t.instruction for t in tasks if t.source == "seed"]
        pool = [t for t in tasks if t.source == "generated" and (t.status == "accepted" or t.reason == "no_valid_instances")]
        accepted = [t for t in tasks if t.source == "generated" and t.status == "accepted"]
        assert len(accepted) == run.accepted == target
        assert len({t.instruction for t in accepted}) == len(accepted)
        earlier = list(seeds)
        for task in pool:
            best = max(scorer.score(other, task.instruction)["rougeL"].fmeasure for other in earlier)
            assert best <= 0.7, (task.instruction, best)
            earlier.append(task.instruction)
        for task in accepted:
            instances = session.exec(select(Instance).where(Instance.task_id == task.id, Instance.status == "accepted")).all()
            assert instances, task.instruction
            assert task.generation_id is not None
        assert all(t.reason for t in tasks if t.status == "rejected")


@pytest.mark.slow
def test_real_run_on_the_embedded_model(db_url):
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "-n", "3", "--run", "real", "--db", db_url,
                                 "--backend", "transformers", "--request-batch-size", "4", "--max-tokens", "160", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["accepted"] == 3 and summary["status"] == "completed"
    check_store_independently(db_url, "real", 3)


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'kill.db'}"
    command = [sys.executable, "-m", "datagen.cli", "self-instruct", "--seeds", str(SEEDS), "-n", "6", "--run", "k",
               "--db", db_url, "--backend", "transformers", "--request-batch-size", "4", "--max-tokens", "160"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    engine = open_engine(db_url)
    deadline = time.time() + 600
    accepted_before = 0
    while time.time() < deadline and proc.poll() is None:  # kill once the first batch has landed
        time.sleep(2)
        with Session(engine) as session:
            run = get_run(session, "k") if session.exec(select(Task)).first() else None
            accepted_before = run.accepted if run else 0
        if accepted_before:
            break
    assert proc.poll() is None, "the run finished before it could be killed; raise -n"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with Session(engine) as session:
        before = {t.instruction for t in session.exec(select(Task).where(Task.status == "accepted", Task.source == "generated")).all()}
    assert proc.returncode == -signal.SIGKILL and 0 < len(before) < 6
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    check_store_independently(db_url, "k", 6)
    with Session(engine) as session:
        after = {t.instruction for t in session.exec(select(Task).where(Task.status == "accepted", Task.source == "generated")).all()}
    assert before <= after  # nothing accepted before the kill was lost


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "Sort a list of numbers.", "instances": []}\n{"name": "x"}\n', "seeds.jsonl:2: missing field 'instruction'"),
        ('{"instruction": "   "}\n', "seeds.jsonl:1: field 'instruction' is empty"),
        ('{"instruction": "Sort numbers well.", "is_classification": "no"}\n', "seeds.jsonl:1: field 'is_classification' must be true or false"),
        ("[]", "seeds.jsonl: no seed tasks"),
        ('{"instruction": "ok"\n', "seeds.jsonl:1: invalid JSON"),
    ],
)
def test_bad_seeds_exit_2_and_write_nothing(tmp_path, content, message):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(content)
    result = runner.invoke(app, ["self-instruct", "--seeds", str(seeds), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.db").exists()


def test_num_instructions_below_one_is_exit_2(tmp_path):
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "-n", "0", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2 and "--num-instructions must be at least 1" in result.output
    assert not (tmp_path / "x.db").exists()
