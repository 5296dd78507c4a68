"""IFD scoring (pipelines/score.py) on the real embedded model, checked against Cherry LLM's own computation written
out here: one AutoModelForCausalLM forward pass per text with the prompt's labels set to -100 (cherry_seletion/
data_analysis.py, get_perplexity_and_embedding_part_text)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from datagen.errors import BadInput
from pipelines.score import Pair, ScoreConfig, ifd_scores, is_cut, score_run
from storage.store import open_engine
from storage.tables import Generation, Instance, InstanceScore, Run, Task
from tests.example_runs import build_toolformer_run

ITEMS = [
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Translate the sentence into French.", "Good morning, my friend.", "Bonjour, mon ami."),
    ("Write a story about a cat.", "", "Confucious"),
]


def add_items(session: Session, items, name: str = "scored", finish_reason: str = "stop") -> Run:
    """A run with one accepted generated task and instance per item, and one rejected instance (never scored)."""
    run = Run(name=name, pipeline="self-instruct", model="smollm2-135m", backend="transformers", status="completed")
    session.add(run)
    session.flush()
    for instruction, input, output in items:
        task = Task(run_id=run.id, instruction=instruction)
        session.add(task)
        session.flush()
        generation = Generation(run_id=run.id, purpose="instances", prompt=instruction, completion=f"Output: {output}\n",
                                finish_reason=finish_reason, model=run.model, backend=run.backend, prompt_tokens=1,
                                completion_tokens=1, latency_s=0.1)  # fmt: skip
        session.add(generation)
        session.flush()
        session.add(Instance(task_id=task.id, generation_id=generation.id, input=input, output=output))
        session.add(Instance(task_id=task.id, input=input, output="rejected", status="rejected", reason="too_long"))
    session.commit()
    return run


def cherry_loss(model, tokenizer, text: str, target: str, max_length: int = 512) -> float:
    """Cherry's get_perplexity_and_embedding_part_text: mean cross-entropy of the tokens after text[:rfind(target)]."""
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start = len(tokenizer.encode(text[: text.rfind(target)]))
    labels = input_ids.clone()
    labels[0, :start] = -100
    with torch.no_grad():
        return model(input_ids, labels=labels).loss.item()


def by_hand(hf_backend, instruction: str, input: str, output: str, max_length: int = 512) -> tuple[float, float]:
    """(s(A|Q), s(A)) with Cherry's prompt (--prompt alpaca) and direct text, written out."""
    if input:
        prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")  # fmt: skip
    else:
        prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                  f"### Instruction:\n{instruction}\n\n### Response:")  # fmt: skip
    model, tokenizer = hf_backend.hf_model, hf_backend.tokenizer
    return cherry_loss(model, tokenizer, prompt + output, output, max_length), cherry_loss(model, tokenizer, "### Response:" + output, output)


def test_stored_ifd_matches_cherry_by_hand(hf_backend, db_url):
    engine = open_engine(db_url)
    with Session(engine) as session:
        run = add_items(session, ITEMS)
        result = score_run(session, hf_backend, run.name, ScoreConfig(model="smollm2-135m", batch_size=2))
        assert (result.instances, result.scored, result.skipped, result.no_score) == (3, 3, 0, 0)
        rows = session.exec(
            select(InstanceScore, Instance).join(Instance, Instance.id == InstanceScore.instance_id).order_by(Instance.id)
        ).all()
    assert len(rows) == 3
    for (instruction, input, output), (score, instance) in zip(ITEMS, rows):
        assert instance.output == output
        conditioned, direct = by_hand(hf_backend, instruction, input, output)
        assert score.conditioned_loss == pytest.approx(conditioned, abs=1e-4)
        assert score.direct_loss == pytest.approx(direct, abs=1e-4)
        assert score.score == pytest.approx(conditioned / direct, abs=1e-4)
        assert score.perplexity == pytest.approx(math.exp(conditioned), rel=1e-4)
        assert score.output_tokens == len(hf_backend.tokenize(output))
        assert (score.model, score.method, score.method_version, score.degenerate, score.reason) == ("smollm2-135m", "ifd", 1, False, None)
    # "Write a story" -> "Confucious": the instruction does not help, IFD > 1; the answer that follows from it is far below
    assert rows[2][0].score > 1 > rows[0][0].score


def test_rerun_stores_nothing_twice_and_models_sit_side_by_side(hf_backend, db_url):
    with Session(open_engine(db_url)) as session:
        run = add_items(session, ITEMS[:2])
        score_run(session, hf_backend, run.name, ScoreConfig(model="smollm2-135m"))
        again = score_run(session, hf_backend, run.name, ScoreConfig(model="smollm2-135m"))
        assert (again.scored, again.skipped) == (0, 2)
        other = score_run(session, hf_backend, run.name, ScoreConfig(model="student-b"))  # same weights, another name
        assert other.scored == 2
        replaced = score_run(session, hf_backend, run.name, ScoreConfig(model="student-b", rescore=True))
        assert (replaced.scored, replaced.skipped) == (2, 0)
        models = session.exec(select(InstanceScore.model)).all()
    assert sorted(models) == ["smollm2-135m"] * 2 + ["student-b"] * 2


def test_edge_cases(hf_backend):
    long = " ".join(f"word{i}" for i in range(60))
    empty, over, full = ifd_scores(hf_backend, [Pair("Say nothing.", "", ""), Pair("List words.", "", long), Pair("List words.", "", "a b")],
                                   max_length=60)  # fmt: skip
    assert (empty.ifd, empty.conditioned_loss, empty.output_tokens, empty.reason) == (None, None, 0, "empty output")
    # longer than the limit: the output tokens that fit after the prompt are scored, both ways, and flagged
    assert over.truncated and over.output_tokens > 60 and over.ifd is not None
    conditioned, _ = by_hand(hf_backend, "List words.", "", long, max_length=60)
    assert over.conditioned_loss == pytest.approx(conditioned, abs=1e-4)
    tiny = ifd_scores(hf_backend, [Pair("List words.", "", "a b")], max_length=10)[0]
    assert (tiny.ifd, tiny.reason, tiny.truncated) == (None, "prompt fills max_length", True)
    assert not full.truncated
    looping = ifd_scores(hf_backend, [Pair("Say hi.", "", "hi there, hi there, hi there, hi there, hi there")])[0]
    assert looping.repeated and looping.degenerate


def test_cut_is_the_last_output_of_a_generation_at_its_limit():
    assert is_cut("two", "length", "Output: one\nOutput: two ")
    assert not is_cut("one", "length", "Output: one\nOutput: two")
    assert not is_cut("two", "stop", "Output: one\nOutput: two")


def test_toolformer_run_is_refused(hf_backend, db_url):
    with Session(open_engine(db_url)) as session:
        build_toolformer_run(session)
        with pytest.raises(BadInput, match="Toolformer run"):
            score_run(session, hf_backend, "tf-test", ScoreConfig(model="smollm2-135m"))


def test_score_command(hf_backend, db_url, monkeypatch):
    with Session(open_engine(db_url)) as session:
        add_items(session, ITEMS[:2], finish_reason="length")
    monkeypatch.setattr(hf_backend, "close", lambda: None)  # the shared model outlives the command
    monkeypatch.setattr("datagen.cli.commands.score.make_backend", lambda backend, model, base_url, server=None: hf_backend)
    runner = CliRunner()
    result = runner.invoke(app, ["score", "--run", "scored", "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["scored"], summary["degenerate"], summary["model"]) == (2, 2, "smollm2-135m")  # both outputs were cut
    assert runner.invoke(app, ["score", "--run", "missing", "--db", db_url]).exit_code == 2
    assert runner.invoke(app, ["score", "--run", "scored", "--db", db_url, "--max-length", "1"]).exit_code == 2
