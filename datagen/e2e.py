"""The whole cycle in one command: Self-Instruct's experiment (Wang et al. 2023, section 4) from seed tasks to a tuned
model, evaluated against the base and against tuning on the seeds alone, and fed back in.

    datagen e2e --config examples/e2e_tiny.yaml

Round 0 holds out a seeded part of the seed tasks for evaluation (never in any prompt: the generator gets only the
rest, and every export is decontaminated against them), trains the base on the remaining seeds alone and scores the
base and that seeds-only model. Each round r = 1..R then runs, in order:

1. generate: a Self-Instruct (or Alpaca) run from the training seeds, with the base (r = 1) or round r-1's merged
   model (datagen/commands/self_instruct.py `execute`, the code of `datagen self-instruct`);
2. dedup: the run's accepted instructions against the store, Self-Instruct's ROUGE-L > 0.7 rule (`datagen dedup
   --run RUN --against store --apply`);
3. export: the accepted rows of rounds 1..r, decontaminated against the eval items (`datagen export`);
4. data: the training seeds plus that export, as one prompt-completion dataset;
5. train: the base on it, the same number of steps as the seeds-only model (`datagen train`), merged;
6. evaluate: the merged model on the eval items.

Every stage is a `loop_stage` row linked to what it made (a run, a training run, a folder); a rerun of the same
config skips the stages whose row is completed and redoes the one it was in, so a loop killed anywhere ends with
the same result and no duplicate rows. report.md and metrics.json are rewritten at the end of every run.

Deviations from the paper, each for a reason: the paper fine-tunes GPT-3 on 52K instructions and evaluates on
SuperNI and 252 user-oriented tasks; here the held-out tasks are a part of the user's own seeds (the user's task is
what matters, and no other data is shipped), and the seeds-only baseline trains for the same number of steps as the
seeds + generated model, so the comparison asks what the data adds, not what more steps add.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, select

from datagen import evaluate
from datagen.backends import BackendName
from datagen.errors import BadInput, DatagenError
from datagen.models import DEFAULT_MODEL
from datagen.options import read_config_file
from pipelines.seeds import SeedTask, read_seeds
from storage.store import find_run, touch
from storage.tables import Loop, LoopStage, TrainingRun

FORMAT = "prompt-completion"
"""Training rows: Stanford Alpaca's prompt and the reference output, the same prompt the evaluation scores under."""
TRAIN_KEYS_SET_BY_THE_LOOP = ("data", "out", "model", "name", "merge", "overwrite", "resume", "max_steps")


class LoopConfig(BaseModel):
    """Every knob of a loop. The pipeline's and the trainer's own options go under `generate` and `train`, with
    their defaults and sources in pipelines/self_instruct.py (or alpaca.py) and train/config.py."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """Loop name in the store; rerunning a config with the same name resumes it."""
    seeds: Path
    """Seed tasks (Self-Instruct or Alpaca records); the held-out part is taken from these."""
    out: Path
    """Folder for report.md, metrics.json, the training data, models and evaluations of every round."""
    model: str = DEFAULT_MODEL
    """Base model: generator of round 1, and the model every round fine-tunes."""
    backend: BackendName = BackendName.transformers
    """Backend that generates (transformers, vllm); rounds after the first serve round r-1's merged folder with it."""
    pipeline: Literal["self-instruct", "alpaca"] = "self-instruct"
    rounds: int = Field(1, ge=1)
    """Round r+1 generates with round r's tuned model."""
    generate: dict[str, Any] = {}
    """Options of the pipeline's config (e.g. num_instructions, max_tokens); `seed` is offset by the round."""
    dedup: bool = True
    """Drop each round's instructions that are near duplicates (ROUGE-L > 0.7) of anything in the store."""
    steps: int = Field(100, ge=1)
    """Optimizer steps of every training run: seeds-only and each round's seeds + generated get the same budget."""
    train: dict[str, Any] = {}
    """Options of train/config.py's TrainConfig (method, lora_r, learning_rate, batch_size, ...)."""
    eval_file: Path | None = None
    """Evaluation items (Self-Instruct or Alpaca records with outputs) instead of held-out seeds."""
    eval_size: int = Field(20, ge=1)
    """Seed tasks held out for evaluation (when there is no eval_file)."""
    eval_seed: int = 0
    """Seed of the held-out draw."""
    eval_max_tokens: int = Field(128, ge=1)
    """Tokens of each greedy answer."""
    bootstrap_resamples: int = Field(evaluate.BOOTSTRAP_RESAMPLES, ge=100)
    samples: int = Field(5, ge=0)
    """Rows of the side-by-side sample table in report.md."""


def load_loop_config(path: Path | None, overrides: dict[str, Any]) -> LoopConfig:
    """YAML file < flags (those not None). Pipeline and trainer options are checked too, before anything is written."""
    values = read_config_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    source = f"{path}: " if path else ""
    try:
        config = LoopConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadInput(f"{source}{'.'.join(str(p) for p in first['loc']) or 'config'}: {first['msg']}") from None
    pipeline_config(config)  # BadInput naming the option
    for key in TRAIN_KEYS_SET_BY_THE_LOOP:
        if key in config.train:
            raise BadInput(f"{source}train.{key} is set by the loop (use the top-level steps, model, out)")
    train_config(config, Path("data"), Path("out"), "check")
    return config


def pipeline_config(config: LoopConfig, round: int = 1):
    from pipelines import alpaca, self_instruct

    cls = self_instruct.SelfInstructConfig if config.pipeline == "self-instruct" else alpaca.AlpacaConfig
    values = {**config.generate}
    values["seed"] = values.get("seed", 0) + round - 1  # a new round draws new examples
    try:
        return cls(**values)
    except TypeError as err:
        raise BadInput(f"generate: {err}") from None


def train_config(config: LoopConfig, data: Path, out: Path, name: str):
    from train.config import TrainConfig

    values = {**config.train, "data": str(data), "out": out, "model": config.model, "name": name, "merge": True,
              "overwrite": True, "max_steps": config.steps}  # fmt: skip
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadInput(f"train.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


# ---- stages in the store ------------------------------------------------------------------------------------------


def completed(session: Session, loop: Loop, round: int, stage: str) -> LoopStage | None:
    """The stage's row if it is completed. Ends the read transaction: the stage that follows writes through other
    sessions (the pipeline's, the trainer's), and a SQLite WAL reader keeps seeing its snapshot until it ends."""
    row = session.exec(select(LoopStage).where(LoopStage.loop_id == loop.id, LoopStage.round == round, LoopStage.stage == stage)).first()
    done = row is not None and row.status == "completed"
    session.commit()
    return row if done else None


def record(session: Session, loop: Loop, round: int, stage: str, **fields) -> LoopStage:
    row = session.exec(select(LoopStage).where(LoopStage.loop_id == loop.id, LoopStage.round == round, LoopStage.stage == stage)).first()
    row = row or LoopStage(loop_id=loop.id, round=round, stage=stage)
    for key, value in fields.items():
        setattr(row, key, value)
    touch(row, status="completed")
    session.add(row)
    session.commit()
    return row


def open_loop(session: Session, config: LoopConfig) -> Loop:
    stored = config.model_dump(mode="json")
    loop = session.exec(select(Loop).where(Loop.name == config.name)).first()
    if loop is None:
        loop = Loop(name=config.name, config=stored, out=str(config.out.resolve()))
    elif loop.config != stored:
        changed = sorted(k for k in stored if stored[k] != loop.config.get(k))
        raise BadInput(f"loop '{config.name}' was started with other settings ({', '.join(changed)}): "
                       "rerun the same config, or give the loop another name")  # fmt: skip
    touch(loop, status="running", error=None)
    session.add(loop)
    session.commit()
    return loop


# ---- files --------------------------------------------------------------------------------------------------------


def write_seeds(path: Path, seeds: list[SeedTask]) -> None:
    records = [{"id": s.id, "instruction": s.instruction, "is_classification": s.is_classification,
                "instances": [{"input": i.input, "output": i.output} for i in s.instances]} for s in seeds]  # fmt: skip
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_eval_items(path: Path, items: list[evaluate.EvalItem]) -> None:
    write_text(path, "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items))


def write_text(path: Path, text: str) -> None:
    """Whole or not at all: a kill leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def seed_rows(seeds: list[SeedTask]) -> list[dict[str, str]]:
    items = evaluate.eval_items(seeds)
    return [{"prompt": evaluate.prompt(item), "completion": item.output} for item in items]


def write_training_data(out: Path, rows: list[dict[str, str]], runs: list[str]) -> None:
    """A folder `datagen train` reads (train/data.py open_export): a saved DatasetDict and datagen.json."""
    import datasets

    datasets.disable_progress_bars()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp))
    (tmp / "datagen.json").write_text(json.dumps({"format": FORMAT, "runs": runs}) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def export_rows(folder: Path) -> list[dict[str, str]]:
    import datasets

    split = datasets.load_from_disk(str(folder))["train"]
    return [{"prompt": row["prompt"], "completion": row["completion"]} for row in split]


# ---- the loop -----------------------------------------------------------------------------------------------------


def run_loop(config: LoopConfig, engine, db: str | None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run or resume every stage; returns metrics.json's content."""
    seeds = read_seeds(config.seeds)
    if config.eval_file is not None:
        train_seeds, items = seeds, evaluate.eval_items(read_seeds(config.eval_file))
        if not items:
            raise BadInput(f"{config.eval_file}: no record has an output to score")
    else:
        train_seeds, held_out = evaluate.split_seeds(seeds, config.eval_size, config.eval_seed)
        items = evaluate.eval_items(held_out)
    from pipelines.bootstrap import check_seeds

    check_seeds(train_seeds, str(config.seeds), needs_instances=True)
    out = config.out.resolve()
    seeds_file, eval_file = out / "seeds_train.jsonl", out / "eval.jsonl"
    write_seeds(seeds_file, train_seeds)
    write_eval_items(eval_file, items)

    with Session(engine) as session:
        loop = open_loop(session, config)
        try:
            scores: dict[str, list[evaluate.ItemScore]] = {}
            train_rows = seed_rows(train_seeds)
            scores["base"] = evaluate_stage(session, loop, 0, "evaluate-base", config.model, items, config, log)
            seeds_model = train_stage(session, loop, 0, out / "r0", train_rows, [], config, db, log)
            scores["seeds-only"] = evaluate_stage(session, loop, 0, "evaluate", seeds_model, items, config, log)
            generator, runs = config.model, []
            for r in range(1, config.rounds + 1):
                runs.append(generate_stage(session, loop, r, generator, seeds_file, config, db, log))
                if config.dedup:
                    dedup_stage(session, loop, r, runs[-1], db, log)
                export_dir = export_stage(session, loop, r, runs, eval_file, out / f"r{r}" / "export", log)
                generator = train_stage(session, loop, r, out / f"r{r}", train_rows + export_rows(export_dir), runs, config, db, log)
                scores[f"round {r}"] = evaluate_stage(session, loop, r, "evaluate", generator, items, config, log)
        except BaseException as err:
            session.rollback()
            touch(loop, status="failed" if isinstance(err, Exception) else "stopped", error=str(err) or type(err).__name__)
            session.add(loop)
            session.commit()
            raise
        metrics = build_metrics(session, loop, config, items, scores)
        from datagen.e2e_report import write_report

        write_report(out, metrics, items, scores, config.samples)
        touch(loop, status="completed", error=None)
        session.add(loop)
        session.commit()
    return metrics


def generate_stage(session, loop: Loop, r: int, generator: str, seeds_file: Path, config: LoopConfig, db, log) -> str:
    name = f"{config.name}-r{r}-generate"
    if completed(session, loop, r, "generate"):
        log(f"round {r}: generate: done ({name})")
        return name
    import typer

    from datagen.commands.self_instruct import execute
    from pipelines import alpaca, bootstrap, self_instruct

    settings = pipeline_config(config, r)
    pipeline, run_pipeline = ("self-instruct", self_instruct.run) if config.pipeline == "self-instruct" else ("alpaca", alpaca.run)
    log(f"round {r}: generate with {generator}")
    try:
        execute(pipeline, type(settings), run_pipeline, seeds_file, bootstrap.config_dict(settings), None, name,
                generator, config.backend, None, db, False)  # fmt: skip
    except typer.Exit:
        pass  # stopped early (stall guard or request limit): the loop goes on with what was accepted
    run = find_run(session, name)
    session.refresh(run)
    record(session, loop, r, "generate", run_id=run.id, artifact=name, result={"status": run.status, "accepted": run.accepted})
    return name


def dedup_stage(session, loop: Loop, r: int, run_name: str, db, log) -> None:
    if completed(session, loop, r, "dedup"):
        return
    from datagen.commands.dedup import dedup
    from datagen.dedup import FuzzyScorer, Method, Tokenizer

    log(f"round {r}: dedup {run_name} against the store")
    # Rerun after a kill: rows marked before are no longer candidates and the rest meet the same store, so the
    # decisions are those of one uninterrupted dedup.
    dedup(file=None, run=run_name, field="instruction", method=Method.rougeL, threshold=0.7, tokenizer=Tokenizer.rouge,
          stemmer=False, fuzzy_scorer=FuzzyScorer.ratio, against=["store"], out=None, pairs=None, apply=True, workers=1,
          db=db, as_json=False)  # fmt: skip
    run = find_run(session, run_name)
    session.refresh(run)
    record(session, loop, r, "dedup", run_id=run.id, artifact=run_name, result={"accepted_after": run.accepted})


def export_stage(session, loop: Loop, r: int, runs: list[str], eval_file: Path, folder: Path, log) -> Path:
    if completed(session, loop, r, "export"):
        return folder
    from datagen.export import ExportConfig, Format, export

    if not any(find_run(session, name).accepted for name in runs):
        raise DatagenError(f"round {r}: the generation runs {', '.join(runs)} accepted no instruction, so there is nothing to "
                           "add to the seeds: see `datagen runs show` for the rejection reasons")  # fmt: skip
    log(f"round {r}: export {', '.join(runs)} decontaminated against {eval_file.name}")
    result = export(session, ExportConfig(runs=tuple(runs), format=Format.prompt_completion, out=folder, test_size=0.0,
                                          decontaminate=eval_file, overwrite=True))  # fmt: skip
    record(session, loop, r, "export", artifact=str(folder), result=result.counts)
    return folder


def train_stage(session, loop: Loop, r: int, folder: Path, rows: list[dict[str, str]], runs: list[str], config: LoopConfig, db, log) -> str:
    """Trains the base on the rows; returns the merged model's folder."""
    from train.sft import MERGED

    model_dir = folder / "model"
    if completed(session, loop, r, "train"):
        return str(model_dir / MERGED)
    data_dir = folder / "train_data"
    write_training_data(data_dir, rows, runs)
    name = f"{config.name}-r{r}-train"
    log(f"round {r}: train {config.model} on {len(rows)} rows for {config.steps} steps")
    from train.sft import SFTRecipe

    recipe = SFTRecipe(train_config(config, data_dir, model_dir, name), db_url=db)
    recipe.setup()
    summary = recipe.train()
    del recipe
    training_run = session.exec(select(TrainingRun).where(TrainingRun.name == name)).one()
    record(session, loop, r, "train", training_run_id=training_run.id, artifact=str(model_dir / MERGED),
           result={"rows": len(rows), **summary})  # fmt: skip
    return str(model_dir / MERGED)


def evaluate_stage(session, loop: Loop, r: int, stage: str, model: str, items, config: LoopConfig, log) -> list[evaluate.ItemScore]:
    done = completed(session, loop, r, stage)
    if done:
        return [evaluate.ItemScore(**s) for s in done.result["items"]]
    from datagen.backends import load_backend

    log(f"round {r}: evaluate {model} on {len(items)} items")
    backend = load_backend(BackendName.transformers, model)
    try:
        scores = evaluate.score_model(backend, items, config.eval_max_tokens)
    finally:
        backend.close()
    record(session, loop, r, stage, artifact=model, result={"model": model, "items": [asdict(s) for s in scores]})
    return scores


def build_metrics(session, loop: Loop, config: LoopConfig, items, scores: dict[str, list[evaluate.ItemScore]]) -> dict[str, Any]:
    """metrics.json: per model the means and item counts; per comparison the difference, its interval and the verdict."""
    models = {}
    for name, item_scores in scores.items():
        models[name] = {metric: evaluate.mean_metric(item_scores, metric) for metric in evaluate.METRICS}
        models[name]["items"] = len(item_scores)
        models[name]["classification_items"] = sum(s.exact_match is not None for s in item_scores)
    comparisons = []
    pairs = [("seeds-only", "base")] + [(f"round {r}", b) for r in range(1, config.rounds + 1) for b in ("base", "seeds-only")]
    for model, baseline in pairs:
        for metric in evaluate.METRICS:
            c = evaluate.compare(model, scores[model], baseline, scores[baseline], metric, config.bootstrap_resamples, config.eval_seed)
            if c is not None:
                comparisons.append({**asdict(c), "better": c.better, "verdict": evaluate.verdict(c)})
    stages = session.exec(select(LoopStage).where(LoopStage.loop_id == loop.id).order_by(LoopStage.round, LoopStage.id)).all()
    training = {f"round {s.round}" if s.round else "seeds-only": {
        "rows": s.result.get("rows"), "steps": s.result.get("steps"), "final_train_loss": s.result.get("final_train_loss"),
        "train_seconds": s.result.get("train_seconds"), "loss_curve": str(Path(s.result.get("out", "")) / "loss_curve.png"),
    } for s in stages if s.stage == "train"}  # fmt: skip
    return {"loop": loop.name, "rounds": config.rounds, "eval_items": len(items),
            "eval_source": str(config.eval_file) if config.eval_file else f"{config.eval_size} held-out seed tasks (seed {config.eval_seed})",
            "models": models, "comparisons": comparisons, "training": training}  # fmt: skip
