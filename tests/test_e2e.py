"""datagen e2e (datagen/e2e.py): every shipped config loads, bad configs exit 2 before anything is written, every
training row (seeds included) is decontaminated against the eval items (a planted leak is caught), and the tiny loop
runs end to end on the real embedded model, killed with SIGKILL between stages and resumed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from storage.store import open_engine
from storage.tables import Loop, LoopStage, Run, TrainingRun
from tests.conftest import REPO, kill_9_once

runner = CliRunner()


def load_shipped(path: Path):
    """Each examples/*.yaml through the loader of the command that reads it."""
    if path.name.startswith("e2e_"):
        from datagen.e2e import load_loop_config

        return load_loop_config(path, {})
    if path.name == "self_instruct.yaml":
        from datagen.cli.commands.self_instruct import load_config
        from pipelines.self_instruct import SelfInstructConfig

        return load_config(SelfInstructConfig, path, {})
    if path.name == "alpaca_cpu.yaml":
        from datagen.cli.commands.self_instruct import load_config
        from pipelines.alpaca import AlpacaConfig

        return load_config(AlpacaConfig, path, {})
    if path.name == "train_lora.yaml":
        from train.config import load_config

        return load_config(path)
    if path.name == "prices.yaml":
        from datagen.cost import load_prices

        return load_prices(path)
    if path.name.startswith("toolformer"):
        from datagen.cli.commands.toolformer import load_config

        return load_config(path, {})
    raise AssertionError(f"{path}: no test knows which command reads this config; add it here")


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert load_shipped(path) is not None


def test_loop_configs_flags_win_and_sections_are_checked(tmp_path):
    from datagen.e2e import load_loop_config
    from datagen.errors import BadInput

    tiny = REPO / "examples" / "e2e_tiny.yaml"
    config = load_loop_config(tiny, {"rounds": 3, "out": tmp_path, "epochs": None})
    assert config.rounds == 3 and config.out == tmp_path and config.epochs == 0.03 and config.replicates == 2
    assert config.primary() == ("round 3", "seeds-only", "loss")
    assert config.eval_file == Path("examples/user_oriented_dev.jsonl")
    for text, message in [
        ("rounds: 0", "rounds: Input should be greater than or equal to 1"),
        ("generate: {max_tokenz: 3}", "generate: "),
        ("train: {lora_r: -1}", "train.lora_r: "),
        ("train: {max_steps: 5}", "train.max_steps is set by the loop"),
        ("train: {epochs: 5}", "train.epochs is set by the loop"),
        ("primary_model: round 2", "config: primary_model must be one of last round, last round curated, round 1, round 1 curated, seeds-only, got 'round 2'"),
        ("replicates: 0", "replicates: Input should be greater than or equal to 1"),
        ("primary_baseline: round 2", "config: primary_baseline must be one of base, last round, round 1, seeds-only, got 'round 2'"),
        ("curate: {top: 0.5}", "curate: --top and --by go together"),
        ("curate: {keep: 'ifd <'}", "curate: --keep 'ifd <': not an expression"),
        ("curate: {top: 0.5, by: ifd, budget: tokens}", "curate.budget: Input should be 'steps' or 'epochs'"),
        ("evals: 3", "evals: Extra inputs are not permitted"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(tiny.read_text() + "\n" + text + "\n")
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_loop_config(bad, {})


def test_bad_config_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples" / "e2e_tiny.yaml").read_text() + "\nepochs: 0\n")
    db = tmp_path / "x.db"
    result = runner.invoke(app, ["e2e", "-c", str(bad), "-o", str(tmp_path / "out"), "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert "epochs: Input should be greater than 0" in result.output
    assert not db.exists() and not (tmp_path / "out").exists()


def stage_rows(db: Path) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:  # never creates the file
            return connection.execute("SELECT round, stage, status FROM loop_stage ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not made yet
        return []


def eval_path(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_planted_leak_is_caught_by_decontamination(tmp_path):
    """Generated rows that copy eval items (the instruction, or the reference under a new instruction) never train,
    and the report's counts say which rule removed them; the seeds meet the same rules."""
    from datagen.e2e import TrainRow, decontaminate_rows, seed_train_rows
    from pipelines.seeds import read_seeds

    evals = [json.loads(line) for line in (REPO / "examples" / "user_oriented_dev.jsonl").read_text().splitlines()][:20]
    items = [{"instruction": e["instruction"], "input": i["input"], "output": i["output"]} for e in evals for i in e["instances"]]
    long = [i for i in items if len(i["output"].split()) >= 13][:5]
    assert len(long) == 5
    planted = [TrainRow("generated", i["instruction"], "", "A different answer.") for i in items[:5]]  # copied instructions
    planted += [TrainRow("generated", f"Write a reply number {k}.", "", i["output"]) for k, i in enumerate(long)]  # copied references
    clean = [TrainRow("generated", "Name three kinds of cloud.", "", "Cumulus, stratus and cirrus.")]
    seeds = seed_train_rows(read_seeds(REPO / "examples" / "seed_tasks.jsonl"))
    result = decontaminate_rows(seeds + planted + clean, eval_path(tmp_path, items))
    assert result.dropped["generated"] == {"rougeL": 5, "13-gram": 5}
    assert [r for r in result.kept if r.source == "generated"] == clean
    assert sum(result.dropped["seed"].values()) == len(seeds) - sum(r.source == "seed" for r in result.kept)


def test_held_out_seeds_take_their_siblings_out_of_training(tmp_path):
    """The issue's case: held-out seed_task_77 and trained seed_task_113 share ROUGE-L 0.75 instructions."""
    from datagen.e2e import decontaminate_rows, seed_train_rows
    from pipelines.seeds import read_seeds

    seeds = read_seeds(REPO / "examples" / "seed_tasks.jsonl")
    held = [s for s in seeds if s.id == "seed_task_77"]
    path = eval_path(tmp_path, [{"instruction": held[0].instruction, "input": i.input, "output": i.output} for i in held[0].instances])
    result = decontaminate_rows(seed_train_rows([s for s in seeds if s.id != "seed_task_77"]), path)
    assert "Use a positive stereotype to complete the sentence." not in {r.instruction for r in result.kept}
    assert result.dropped["seed"]["rougeL"] >= 1


def test_tiny_loop_end_to_end_with_kill_9_between_stages(tmp_path):
    """The CI run of examples/e2e_tiny.yaml: killed once round 0's first seeds-only replicate is trained, then rerun."""
    db, out = tmp_path / "loop.db", tmp_path / "out"
    command = [sys.executable, "-m", "datagen.cli", "e2e", "-c", "examples/e2e_tiny.yaml", "-o", str(out), "--db", f"sqlite:///{db}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kill_9_once(command, lambda: (0, "train.0", "completed") in stage_rows(db), cwd=REPO, env=env)
    before = stage_rows(db)
    assert before[:2] == [(0, "evaluate-base", "completed"), (0, "train.0", "completed")]
    assert not (out / "metrics.json").exists()
    with Session(open_engine(f"sqlite:///{db}")) as session:
        kept = {(s.round, s.stage): (s.updated_at, s.result) for s in session.exec(select(LoopStage)).all() if s.status == "completed"}

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr
    assert "round 0: train" in second.stderr and "(replicate 0," not in second.stderr.split("round 1:")[0]  # skipped: complete

    with Session(open_engine(f"sqlite:///{db}")) as session:
        loop = session.exec(select(Loop)).one()
        stages = session.exec(select(LoopStage).order_by(LoopStage.id)).all()
        assert loop.status == "completed"
        assert [(s.round, s.stage) for s in stages] == [
            (0, "evaluate-base"), (0, "train.0"), (0, "train.1"), (0, "evaluate.0"), (0, "evaluate.1"),
            (1, "generate"), (1, "dedup"), (1, "export"), (1, "train.0"), (1, "train.1"), (1, "evaluate.0"), (1, "evaluate.1"),
            (1, "score"), (1, "curate"), (1, "export-curated"), (1, "train-curated.0"), (1, "train-curated.1"),
            (1, "evaluate-curated.0"), (1, "evaluate-curated.1"),
        ]  # fmt: skip
        assert all(s.status == "completed" for s in stages)
        for s in stages:  # the stages finished before the kill were not redone
            if (s.round, s.stage) in kept:
                assert (s.updated_at, s.result) == kept[(s.round, s.stage)]
        assert [r.name for r in session.exec(select(Run)).all()] == ["e2e-tiny-r1-generate"]
        trained = session.exec(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert [(t.name, t.status) for t in trained] == [(f"e2e-tiny-r{r}-{stage}.{k}", "completed")
                                                         for r, stage in ((0, "train"), (1, "train"), (1, "train-curated")) for k in (0, 1)]  # fmt: skip
        by_stage = {(s.round, s.stage): s for s in stages}
        assert by_stage[(1, "generate")].run_id == session.exec(select(Run)).one().id
        assert by_stage[(1, "train.1")].training_run_id == trained[3].id
        assert [by_stage[(r, f"train.{k}")].result["seed"] for r in (0, 1) for k in (0, 1)] == [42, 43, 42, 43]

    metrics = json.loads((out / "metrics.json").read_text())
    # the model's own format: SmolLM2-135M-Instruct has a chat template, so the rows are messages
    assert metrics["eval"]["format"] == "the model's chat template"
    assert json.loads((out / "r1" / "train_data" / "datagen.json").read_text())["format"] == "messages"
    assert list(metrics["models"]) == ["base", "seeds-only", "round 1", "round 1 curated"]
    assert [m["replicates"] for m in metrics["models"].values()] == [1, 2, 2, 2]
    for m in metrics["models"].values():
        assert m["items"] == metrics["eval"]["items"] == 4 and m["loss_per_item"] > 0 and m["loss_per_token"] > 0
        assert 0 <= m["rouge_l"] <= 1 and 0 <= m["degeneration_rate"] <= 1
    # one primary verdict, named; secondaries Holm-corrected; minimum detectable difference beside "not better"
    first, *rest = metrics["comparisons"]
    assert (first["model"], first["baseline"], first["metric"], first["role"]) == ("round 1", "seeds-only", "loss", "primary")
    assert rest and all(c["role"] == "secondary" and c["p_holm"] is not None for c in rest)
    assert all(c["low"] <= c["difference"] <= c["high"] for c in metrics["comparisons"])
    assert all("minimum detectable difference" in c["verdict"] for c in metrics["comparisons"] if not c["better"])
    assert metrics["primary"]["verdict"] == first["verdict"] and "too few items: 4 < 10" in first["verdict"]
    # per-item scores of every replicate, with the held-out ids
    ids = metrics["eval"]["ids"]
    assert len(ids) == 4 and all(i.startswith("user_oriented_task_") for i in ids)
    assert {n: [[s["id"] for s in rep] for rep in reps] for n, reps in metrics["scores"].items()} == {
        "base": [ids], "seeds-only": [ids, ids], "round 1": [ids, ids], "round 1 curated": [ids, ids]}
    assert set(metrics["noise_floor"]) == {"seeds-only", "round 1", "round 1 curated"}
    # budgets: the same epochs over the seeds for both arms, tokens recorded
    runs = [t for ts in metrics["training"].values() for t in ts]
    seeds_only, round_1 = metrics["training"]["seeds-only"], metrics["training"]["round 1"]
    assert min(t["epochs_over_seeds"] for t in seeds_only) >= max(t["epochs_over_seeds"] for t in round_1) > 0
    assert all(t["epochs_over_generated"] == t["epochs_over_seeds"] for t in round_1)
    assert all(t["train_tokens"] > 0 and t["steps"] == 3 for t in runs)
    assert metrics["training"]["round 1"][0]["generated_rows"] == metrics["data"]["round 1"]["generated_rows"] > 0
    assert set(metrics["data"]["round 1"]["decontaminated"]) == {"seed", "generated"}
    # the curated arm: every accepted instance scored by the base, the rule's top half kept (rounded up), exported
    # without what it dropped, trained for the all-accepted replicate's steps, and compared with it
    curated = metrics["data"]["round 1 curated"]
    instances = curated["curation"]["instances"]
    assert curated["scored"]["scored"] == instances > 0 and curated["curation"]["kept"] == -(-instances // 2)
    assert curated["exported_rows"] == metrics["data"]["round 1"]["exported_rows"] - curated["curation"]["dropped"]
    assert 0 < curated["generated_rows"] <= metrics["data"]["round 1"]["generated_rows"]
    arm = metrics["training"]["round 1 curated"]
    assert [t["steps"] for t in arm] == [t["steps"] for t in round_1] and [t["seed"] for t in arm] == [42, 43]
    assert [t["rows"] for t in arm] == [metrics["data"]["round 1"]["seed_rows"] + curated["generated_rows"]] * 2
    assert metrics["curation"]["rule"] == "top 0.5 by ifd" and metrics["curation"]["budget"] == "steps"
    assert {(c["model"], c["baseline"]) for c in rest} >= {("round 1 curated", "round 1"), ("round 1 curated", "seeds-only")}
    # paths relative to out
    for t in runs:
        assert not Path(t["loss_curve"]).is_absolute() and (out / t["loss_curve"]).is_file()
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Primary verdict.** round 1 vs seeds-only, loss per item (lower is better): not better")
    assert "## Curation" in report and "| round 1 curated | e2e-tiny-r1-generate |" in report
    assert "## Verdicts" in report and "## Noise floor" in report and "## Data" in report and "## Samples (3 items drawn at random, seed 0" in report
    assert (out / "forest.png").stat().st_size > 0 and (out / "scatter.png").stat().st_size > 0
    # the eval items never reached the generator
    held_out = {json.loads(line)["instruction"] for line in (out / "eval.jsonl").read_text().splitlines()}
    shown = {json.loads(line)["instruction"] for line in (out / "seeds_train.jsonl").read_text().splitlines()}
    assert held_out and not held_out & shown

    # cost accounting: every stage's device seconds are stored; the verdict is no improvement, so no cost per point
    assert {"generation on cpu", "filtering on cpu", "training on cpu", "eval on cpu"} <= set(metrics["cost"]["seconds"])
    assert metrics["cost"]["per_point"] is None and "## Cost" in report
    lineage = runner.invoke(app, ["runs", "show", "e2e-tiny", "--db", f"sqlite:///{db}", "--json"])
    assert lineage.exit_code == 0, lineage.output
    shown_stages = json.loads(lineage.stdout)["stages"]
    assert json.loads(lineage.stdout)["cost"]["seconds"] == metrics["cost"]["seconds"]
    assert [s["row"] for s in shown_stages if s["stage"] == "generate" or s["stage"].startswith("train.")] == [
        "training_run e2e-tiny-r0-train.0", "training_run e2e-tiny-r0-train.1", "run e2e-tiny-r1-generate",
        "training_run e2e-tiny-r1-train.0", "training_run e2e-tiny-r1-train.1"]  # fmt: skip
    # export of the curated run leaves out what curate dropped (the loop's own all-accepted export ignored it)
    exported = runner.invoke(app, ["export", "--run", "e2e-tiny-r1-generate", "--db", f"sqlite:///{db}", "--format", "alpaca",
                                   "--out", str(tmp_path / "curated"), "--test-size", "0", "--json"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["counts"]["rows"] == curated["exported_rows"]


def test_report_leads_with_the_primary_verdict_and_lists_every_model_and_sample(tmp_path):
    from datagen.e2e_report import render_markdown
    from datagen.evaluate import EvalItem, ItemScore, compare, summarize, verdict, with_holm

    items = [EvalItem(f"t{k}", "Say | hi", "", "Hi\nthere", False, f"t{k}") for k in range(12)]
    scores = {name: [[ItemScore(1.0 + 0.01 * k * (name == "seeds-only"), 0.5, None, f"{name} says hi", 3) for k in range(12)]]
              for name in ("base", "seeds-only")}  # fmt: skip
    [c] = with_holm(compare("seeds-only", scores["seeds-only"], "base", scores["base"], "loss"), [])
    metrics = {"loop": "x", "replicates": 1, "budget_rule": "2 epochs", "primary": {"verdict": verdict(c)},
               "eval": {"items": 12, "source": "e.jsonl", "format": "Stanford Alpaca's prompt", "interval": "95% t"},
               "models": {n: summarize(s) for n, s in scores.items()},
               "comparisons": [{**c.__dict__, "better": c.better, "verdict": verdict(c)}], "noise_floor": {},
               "data": {"seeds-only": {"seed_rows": 5, "generated_rows": 0, "decontaminated": {"seed": {"rougeL": 1, "13-gram": 0}}}},
               "training": {"seeds-only": [{"replicate": 0, "seed": 42, "rows": 5, "steps": 2, "epochs_over_seeds": 2.0,
                                            "epochs_over_generated": 0.0, "train_tokens": 300, "final_train_loss": 2.5,
                                            "train_seconds": 3.0, "loss_curve": "r0/model.0/loss_curve.png"}]}}  # fmt: skip
    from datagen import cost

    usage = cost.Usage({"smollm2-135m": (1000, 500)}, {("training", "cpu"): 3600.0, ("eval", "cpu"): 1800.0})
    metrics["cost"] = cost.loop_cost_dict(usage, cost.Prices("p.yaml", devices={"cpu": 0.1}), kept_items=50, improvement=None)
    text = render_markdown(metrics, items, scores, 2, seed=0)
    assert "| cost | 0.15 USD (prices: p.yaml) |" in text and "| seconds: training on cpu | 3,600.0 |" in text
    assert "| per kept item (50 generated rows trained) | 0.003 USD |" in text
    assert "| per point of improvement (a point: 0.01 of the primary metric) | n/a (the primary verdict is not an improvement) |" in text
    assert text.splitlines()[2] == f"**Primary verdict.** {verdict(c)}."
    assert "seeds-only vs base, loss per item (lower is better): not better: difference +0.0550" in verdict(c)
    assert "| base | 1.0000 | 1.0000 | 0.5000 | – (0) | 0% | 0% | 0% | 1 |" in text
    assert "| seeds-only | 0 (42) | 5 | 2 | 2.00 | 0.00 | 300 | 2.5000 | 3.0 | [r0/model.0/loss_curve.png](r0/model.0/loss_curve.png) |" in text
    assert "| seeds-only | – | – | – | rougeL: 1, 13-gram: 0 | – | 5 | 0 |" in text
    picked = [line for line in text.splitlines() if line.startswith("| t")]
    assert len(picked) == 2 and picked[0].endswith("| Say \\| hi | Hi there | base says hi | seeds-only says hi |")
    assert picked == [line for line in render_markdown(metrics, items, scores, 2, seed=0).splitlines() if line.startswith("| t")]
    assert picked[0].split()[1] != "t0" or picked[1].split()[1] != "t1"  # drawn at random, not the first rows


def test_metrics_and_report_from_stored_stages(tmp_path):
    """build_metrics and write_report on stored stages and scripted scores (no model): the primary first, Holm on the
    rest, every replicate's per-item scores with the held-out ids, paths relative to out, both plots written."""
    from datagen.e2e import LoopConfig, build_metrics, record
    from datagen.e2e_report import write_report
    from datagen.evaluate import EvalItem, ItemScore, PromptFormat

    out = (tmp_path / "out").resolve()
    config = LoopConfig(name="m", seeds=Path("s.jsonl"), out=out, replicates=2, eval_file=Path("e.jsonl"), samples=3)
    items = [EvalItem(f"t{k}", f"Task {k}", "", "Yes" if k % 2 else "A longer reference answer here", False, f"t{k}") for k in range(12)]
    rng = __import__("random").Random(0)

    def model(shift, answer="fine answer"):
        return [ItemScore(2.0 + shift + rng.gauss(0, 0.05), 0.3, 1.0 if k % 2 else None, answer, 4) for k in range(12)]

    scores = {"base": [model(0.3)], "seeds-only": [model(0.1), model(0.12)], "round 1": [model(0.0), model(0.02)]}
    engine = open_engine(f"sqlite:///{tmp_path / 's.db'}")
    with Session(engine) as session:
        loop = Loop(name="m", config={}, out=str(out))
        session.add(loop)
        session.commit()
        for r in (0, 1):
            for k in (0, 1):
                curve_dir = out / f"r{r}" / f"model.{k}"
                record(session, loop, r, f"train.{k}", artifact=str(curve_dir / "merged"),
                       result={"rows": 10 + 5 * r, "seed_rows": 10, "generated_rows": 5 * r, "seed": 42 + k, "steps": 3,
                               "epochs": 1.0, "train_tokens": 900, "final_train_loss": 2.0, "train_seconds": 1.0, "out": str(curve_dir)})  # fmt: skip
        data = {"seeds-only": {"seed_rows": 10, "generated_rows": 0, "decontaminated": {"seed": {"rougeL": 1, "13-gram": 0}}},
                "round 1": {"accepted_instructions": 4, "kept_after_dedup": 3, "exported_rows": 6, "seed_rows": 10, "generated_rows": 5,
                            "decontaminated": {"seed": {"rougeL": 1, "13-gram": 0}, "generated": {"rougeL": 0, "13-gram": 1}}}}  # fmt: skip
        metrics = build_metrics(session, loop, config, items, scores, data, PromptFormat(True, "<|im_end|>"), out)
    write_report(out, metrics, items, scores, config.samples, config.eval_seed)
    saved = json.loads((out / "metrics.json").read_text())
    first, *rest = saved["comparisons"]
    assert (first["model"], first["baseline"], first["metric"], first["role"]) == ("round 1", "seeds-only", "loss", "primary")
    assert len(rest) == 8 and all(c["role"] == "secondary" for c in rest)  # 3 pairs x 3 metrics, exact match on 6 label items
    assert saved["primary"]["verdict"].startswith("round 1 vs seeds-only, loss per item (lower is better): ")
    assert saved["eval"]["ids"] == [f"t{k}" for k in range(12)]
    assert [len(reps) for reps in saved["scores"].values()] == [1, 2, 2] and saved["scores"]["round 1"][1][3]["id"] == "t3"
    assert saved["training"]["round 1"][1] == {
        "replicate": 1, "seed": 43, "rows": 15, "seed_rows": 10, "generated_rows": 5, "steps": 3, "epochs_over_seeds": 1.0,
        "epochs_over_generated": 1.0, "train_tokens": 900, "final_train_loss": 2.0, "train_seconds": 1.0,
        "model": "r1/model.1/merged", "loss_curve": "r1/model.1/loss_curve.png"}  # fmt: skip
    assert set(saved["noise_floor"]) == {"seeds-only", "round 1"}
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == f"**Primary verdict.** {saved['primary']['verdict']}."
    assert "| round 1 | 4 | 3 | 6 | rougeL: 1, 13-gram: 0 | rougeL: 0, 13-gram: 1 | 10 | 5 |" in report
    assert (out / "forest.png").stat().st_size > 0 and (out / "scatter.png").stat().st_size > 0
