"""datagen e2e (datagen/e2e.py): every shipped config loads, bad configs exit 2 before anything is written, and the
tiny loop runs end to end on the real embedded model, killed with SIGKILL between stages and resumed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from storage.store import open_engine
from storage.tables import Loop, LoopStage, Run, TrainingRun
from tests.conftest import REPO

runner = CliRunner()


def load_shipped(path: Path):
    """Each examples/*.yaml through the loader of the command that reads it."""
    if path.name.startswith("e2e_"):
        from datagen.e2e import load_loop_config

        return load_loop_config(path, {})
    if path.name == "self_instruct.yaml":
        from datagen.commands.self_instruct import load_config
        from pipelines.self_instruct import SelfInstructConfig

        return load_config(SelfInstructConfig, path, {})
    if path.name == "alpaca_cpu.yaml":
        from datagen.commands.self_instruct import load_config
        from pipelines.alpaca import AlpacaConfig

        return load_config(AlpacaConfig, path, {})
    if path.name == "train_lora.yaml":
        from train.config import load_config

        return load_config(path)
    if path.name.startswith("toolformer"):
        from datagen.commands.toolformer import load_config

        return load_config(path, {})
    raise AssertionError(f"{path}: no test knows which command reads this config; add it here")


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert load_shipped(path) is not None


def test_loop_configs_flags_win_and_sections_are_checked(tmp_path):
    from datagen.e2e import load_loop_config
    from datagen.errors import BadInput

    tiny = REPO / "examples" / "e2e_tiny.yaml"
    config = load_loop_config(tiny, {"rounds": 3, "out": tmp_path, "steps": None})
    assert config.rounds == 3 and config.out == tmp_path and config.steps == 2
    for text, message in [
        ("rounds: 0", "rounds: Input should be greater than or equal to 1"),
        ("generate: {max_tokenz: 3}", "generate: "),
        ("train: {lora_r: -1}", "train.lora_r: "),
        ("train: {max_steps: 5}", "train.max_steps is set by the loop"),
        ("evals: 3", "evals: Extra inputs are not permitted"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(tiny.read_text() + "\n" + text + "\n")
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_loop_config(bad, {})


def test_bad_config_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples" / "e2e_tiny.yaml").read_text() + "\nsteps: 0\n")
    db = tmp_path / "x.db"
    result = runner.invoke(app, ["e2e", "-c", str(bad), "-o", str(tmp_path / "out"), "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert "steps: Input should be greater than or equal to 1" in result.output
    assert not db.exists() and not (tmp_path / "out").exists()


def stage_rows(db: Path) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:  # never creates the file
            return connection.execute("SELECT round, stage, status FROM loop_stage ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not made yet
        return []


def test_tiny_loop_end_to_end_with_kill_9_between_stages(tmp_path):
    """The CI run of examples/e2e_tiny.yaml: killed once round 0's seeds-only model is trained, then rerun."""
    db, out = tmp_path / "loop.db", tmp_path / "out"
    command = [sys.executable, "-m", "datagen.cli", "e2e", "-c", "examples/e2e_tiny.yaml", "-o", str(out), "--db", f"sqlite:///{db}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900
    while (0, "train", "completed") not in stage_rows(db):
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = stage_rows(db)
    assert before[:2] == [(0, "evaluate-base", "completed"), (0, "train", "completed")]
    assert not (out / "metrics.json").exists()
    with Session(open_engine(f"sqlite:///{db}")) as session:
        kept = {(s.round, s.stage): (s.updated_at, s.result) for s in session.exec(select(LoopStage)).all() if s.status == "completed"}

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr
    assert "round 0: train" not in second.stderr  # skipped: its stored output is complete

    with Session(open_engine(f"sqlite:///{db}")) as session:
        loop = session.exec(select(Loop)).one()
        stages = session.exec(select(LoopStage).order_by(LoopStage.id)).all()
        assert loop.status == "completed"
        assert [(s.round, s.stage) for s in stages] == [
            (0, "evaluate-base"), (0, "train"), (0, "evaluate"),
            (1, "generate"), (1, "dedup"), (1, "export"), (1, "train"), (1, "evaluate"),
        ]  # fmt: skip
        assert all(s.status == "completed" for s in stages)
        for s in stages:  # the stages finished before the kill were not redone
            if (s.round, s.stage) in kept:
                assert (s.updated_at, s.result) == kept[(s.round, s.stage)]
        assert [r.name for r in session.exec(select(Run)).all()] == ["e2e-tiny-r1-generate"]
        trained = session.exec(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert [(t.name, t.status, t.steps) for t in trained] == [("e2e-tiny-r0-train", "completed", 2), ("e2e-tiny-r1-train", "completed", 2)]
        by_stage = {(s.round, s.stage): s for s in stages}
        assert by_stage[(1, "generate")].run_id == session.exec(select(Run)).one().id
        assert by_stage[(1, "train")].training_run_id == trained[1].id

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "seeds-only", "round 1"]
    for m in metrics["models"].values():
        assert m["items"] == metrics["eval_items"] >= 3 and m["loss"] > 0 and 0 <= m["rouge_l"] <= 1
    assert {(c["model"], c["baseline"]) for c in metrics["comparisons"]} == {("seeds-only", "base"), ("round 1", "base"), ("round 1", "seeds-only")}
    assert all(c["low"] <= c["difference"] <= c["high"] for c in metrics["comparisons"])
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "seeds-only vs base, loss (lower is better): " in report and "## Samples" in report
    assert (out / "rounds.png").stat().st_size > 0 and Path(metrics["training"]["round 1"]["loss_curve"]).is_file()
    # held-out items never reached the generator, nor the training data
    held_out = {json.loads(line)["instruction"] for line in (out / "eval.jsonl").read_text().splitlines()}
    shown = {json.loads(line)["instruction"] for line in (out / "seeds_train.jsonl").read_text().splitlines()}
    assert held_out and not held_out & shown

    lineage = runner.invoke(app, ["runs", "show", "e2e-tiny", "--db", f"sqlite:///{db}", "--json"])
    assert lineage.exit_code == 0, lineage.output
    shown_stages = json.loads(lineage.stdout)["stages"]
    assert [s["row"] for s in shown_stages if s["stage"] in ("generate", "train")] == [
        "training_run e2e-tiny-r0-train", "run e2e-tiny-r1-generate", "training_run e2e-tiny-r1-train"]


def test_report_lists_every_model_verdict_and_sample(tmp_path):
    from datagen.e2e_report import render_markdown
    from datagen.evaluate import EvalItem, ItemScore

    items = [EvalItem("t", "Say | hi", "", "Hi\nthere", False)]
    scores = {name: [ItemScore(1.0, 0.5, None, f"{name} says hi")] for name in ("base", "seeds-only")}
    metrics = {"loop": "x", "eval_items": 1, "eval_source": "1 held-out seed tasks (seed 0)",
               "models": {n: {"loss": 1.0, "rouge_l": 0.5, "exact_match": None, "items": 1, "classification_items": 0} for n in scores},
               "comparisons": [{"verdict": "seeds-only vs base, loss (lower is better): not better: difference +0.0000"}],
               "training": {"seeds-only": {"rows": 5, "steps": 2, "final_train_loss": 2.5, "train_seconds": 3.0,
                                           "loss_curve": str(tmp_path / "r0" / "model" / "loss_curve.png")}}}  # fmt: skip
    text = render_markdown(metrics, items, scores, 5, tmp_path)
    assert "| base | 1.0000 | 0.5000 | – | 1 | 0 |" in text
    assert "- seeds-only vs base, loss (lower is better): not better: difference +0.0000" in text
    assert "[r0/model/loss_curve.png](r0/model/loss_curve.png)" in text
    assert "| Say \\| hi | Hi there | base says hi | seeds-only says hi |" in text
