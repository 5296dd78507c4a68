"""The whole cycle in one command: Self-Instruct's experiment (Wang et al. 2023, section 4) from seed tasks to tuned
models, evaluated on held-out tasks against the base and against tuning on the seeds alone, and fed back in.

    datagen e2e --config examples/e2e_tiny.yaml

Held-out tasks: `eval_file` (the shipped loops use Self-Instruct's user-oriented tasks, the paper's section 5.2 set,
examples/user_oriented_dev.jsonl), and then every seed trains; without one, a seeded part of the seeds is held out.
Every training row, seeds included, is decontaminated against the eval items by the export's rules (ROUGE-L > 0.7
with an eval instruction, or a shared word 13-gram with any eval text), so neither a seed that is a sibling of an eval
task nor a generated copy of a reference trains; the report counts what each rule removed.

Each model is tuned and scored in its own format (datagen/evaluate.py PromptFormat): a base with a chat template
trains on `messages` and is scored under the template, end-of-turn included; one without, on Alpaca's prompt with
EOS. The base is scored in that format too.

Round 0 scores the base and trains the seeds-only model; each round r = 1..R then runs, in order:

1. generate: a Self-Instruct (or Alpaca) run from the (decontaminated) seeds, with the base (r = 1) or round r-1's
   first replicate (datagen/runs.py `run_bootstrap`, what `datagen self-instruct` calls);
2. dedup: the run's accepted instructions against the store, Self-Instruct's ROUGE-L > 0.7 rule;
3. export: the accepted rows of rounds 1..r (`datagen export`), then decontaminated with the seeds;
4. train: the base on seeds + generated, `replicates` times with training seeds seed, seed+1, ... (merged);
5. evaluate: every replicate on the eval items;
6. with `curate:` (CurateStage): score every accepted instance of rounds 1..r with the base, the student that will
   learn from them (IFD, pipelines/score.py), curate each run by the rule (pipelines/curate.py), export what the rule
   kept, decontaminate it with the seeds, and train and evaluate a "round r curated" arm beside "round r" (all
   accepted) at the same budget (CurateStage.budget).

Budget rule: every model trains `epochs` passes over its own rows, so the seeds-only model sees each seed exactly as
often as the seeds + generated model does (it takes fewer steps): the comparison asks what adding the generated
rows does, with the seeds' exposure held equal. The older rule, equal steps, gave seeds-only more passes over the
seeds than its rival in one direction and fewer in the other depending on the data size, so its verdicts mixed
"more data" with "less seed exposure". Epochs, steps and trained tokens of every run are in the report.

Every stage is a `loop_stage` row linked to what it made (a run, a training run, a folder); a rerun of the same
config skips the stages whose row is completed and redoes the one it was in, so a loop killed anywhere ends with
the same result and no duplicate rows. report.md and metrics.json are rewritten at the end of every run.

Deviations from the paper, each for a reason: the paper fine-tunes GPT-3 on 52K instructions, evaluates on SuperNI
and all 252 user-oriented tasks with human raters; here a small model is tuned with LoRA on what a CPU or one GPU
makes in minutes, and scored automatically (loss of the reference, ROUGE-L, exact match) on 126 of the 252 tasks
(the shipped half; the other half is left for a user's own checks).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlmodel import Session, select

from datagen import cost, evaluate
from datagen.backends import BackendName
from datagen.errors import BadInput, DatagenError
from datagen.models import DEFAULT_MODEL
from datagen.jsonl import read_config_file
from pipelines.seeds import SeedTask, read_seeds
from storage.store import find_run, touch
from storage.tables import Loop, LoopStage, StageTime, TrainingRun

TRAIN_KEYS_SET_BY_THE_LOOP = ("data", "out", "model", "name", "merge", "overwrite", "resume", "max_steps", "epochs")


class CurateStage(BaseModel):
    """A curated arm beside each round's all-accepted one: the same generated runs, scored by the base model (the
    student) and cut by a rule of `datagen curate` (pipelines/curate.py), trained at the same budget. The loop's
    question becomes: does training on what the rule keeps beat training on everything the pipeline accepted?"""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    keep: str | None = None
    """An expression over the scores, e.g. "ifd < 1 and not degenerate" (datagen curate --keep)."""
    top: float | None = Field(None, gt=0, le=1)
    """Then keep this fraction of what `keep` left, ranked by `by` (datagen curate --top)."""
    by: str | None = None
    lowest: bool = False
    """`top` keeps the lowest scores (Cherry LLM keeps the highest IFD, after dropping IFD >= 1)."""
    budget: Literal["steps", "epochs"] = "steps"
    """steps: each curated replicate trains as many optimizer steps as the all-accepted replicate with the same seed
    (more passes over its fewer rows): the same compute, the question a user paying for training asks. epochs: the
    loop's `epochs` over its own rows like every other model (fewer steps), as AlpaGasus and Cherry LLM train their
    subsets. Either way the report lists each run's steps, epochs and tokens."""

    def rule(self, model: str):
        from pipelines.curate import CurationRule

        return CurationRule(keep=self.keep, top=self.top, by=self.by, lowest=self.lowest, model=model)


class LoopConfig(BaseModel):
    """Every knob of a loop. The pipeline's and the trainer's own options go under `generate` and `train`, with
    their defaults and sources in pipelines/self_instruct.py (or alpaca.py) and train/config.py."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """Loop name in the store; rerunning a config with the same name resumes it."""
    seeds: Path
    """Seed tasks (Self-Instruct or Alpaca records)."""
    out: Path
    """Folder for report.md, metrics.json, the training data, models and evaluations of every round."""
    model: str = DEFAULT_MODEL
    """Base model: generator of round 1, and the model every round fine-tunes."""
    backend: BackendName = BackendName.transformers
    """Backend that generates (transformers, vllm); rounds after the first serve round r-1's merged folder with it."""
    pipeline: Literal["self-instruct", "alpaca"] = "self-instruct"
    rounds: int = Field(1, ge=1)
    """Round r+1 generates with round r's tuned model (its first replicate)."""
    generate: dict[str, Any] = {}
    """Options of the pipeline's config (e.g. num_instructions, max_tokens); `seed` is offset by the round."""
    dedup: bool = True
    """Drop each round's instructions that are near duplicates (ROUGE-L > 0.7) of anything in the store."""
    epochs: float = Field(2.0, gt=0)
    """Passes of every training run over its own rows: seeds-only and seeds + generated see each seed equally
    often (see the budget rule above). Fractions train on part of an epoch (the tiny CI loop)."""
    replicates: int = Field(3, ge=1)
    """Training runs per model, with training seeds train.seed, +1, ...: the comparisons average each item over
    them, and their spread is the noise floor no verdict may fall within."""
    train: dict[str, Any] = {}
    """Options of train/config.py's TrainConfig (method, lora_r, learning_rate, batch_size, seed, ...)."""
    eval_file: Path | None = None
    """Evaluation items (Self-Instruct or Alpaca records with outputs); None: hold out eval_size seed tasks."""
    eval_limit: int | None = Field(None, ge=1)
    """With eval_file: score a seeded sample of this many of its items (None: all of them)."""
    eval_size: int = Field(20, ge=1)
    """Seed tasks held out for evaluation when there is no eval_file."""
    eval_seed: int = 0
    """Seed of the held-out draw, of the eval_limit sample and of the report's sample rows."""
    eval_max_tokens: int = Field(128, ge=1)
    """Tokens of each greedy answer; an answer cut here counts as degenerate."""
    curate: CurateStage | None = None
    """Train and evaluate a curated arm beside every round (see CurateStage); None: no curation."""
    primary_model: str = "last round"
    """The primary comparison's model: "last round", "round N", "seeds-only", and with `curate` "last round
    curated" or "round N curated"."""
    primary_baseline: str = "seeds-only"
    """Its baseline: "seeds-only", "base", or a round ("last round", "round N"; e.g. all accepted against curated)."""
    primary_metric: Literal["loss", "rouge_l", "exact_match"] = "loss"
    """Every other comparison is secondary, Holm-corrected."""
    samples: int = Field(5, ge=0)
    """Rows of the side-by-side sample table in report.md, drawn at random with eval_seed."""

    @model_validator(mode="after")
    def _primary_names_a_model(self) -> LoopConfig:
        rounds = ["last round", *(f"round {r}" for r in range(1, self.rounds + 1))]
        curated = [f"{r} curated" for r in rounds] if self.curate else []
        allowed = {"seeds-only", *rounds, *curated}
        if self.primary_model not in allowed:
            raise ValueError(f"primary_model must be one of {', '.join(sorted(allowed))}, got '{self.primary_model}'")
        baselines = {"seeds-only", "base", *rounds}
        if self.primary_baseline not in baselines:
            raise ValueError(f"primary_baseline must be one of {', '.join(sorted(baselines))}, got '{self.primary_baseline}'")
        model, baseline, _ = self.primary()
        if model == baseline:
            raise ValueError(f"primary_model and primary_baseline are both {model}")
        return self

    def primary(self) -> tuple[str, str, str]:
        def named(name: str) -> str:
            return name.replace("last round", f"round {self.rounds}")

        return named(self.primary_model), named(self.primary_baseline), self.primary_metric


def load_loop_config(path: Path | None, overrides: dict[str, Any]) -> LoopConfig:
    """YAML file < flags (those not None). Pipeline and trainer options are checked too, before anything is written."""
    values = read_config_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    source = f"{path}: " if path else ""
    try:
        config = LoopConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise BadInput(f"{source}{'.'.join(str(p) for p in first['loc']) or 'config'}: {message}") from None
    pipeline_config(config)  # BadInput naming the option
    for key in TRAIN_KEYS_SET_BY_THE_LOOP:
        if key in config.train:
            raise BadInput(f"{source}train.{key} is set by the loop (use the top-level epochs, model, out)")
    train_config(config, Path("data"), Path("out"), "check", 0)
    if config.curate is not None:
        try:
            config.curate.rule(config.model)
        except BadInput as err:
            raise BadInput(f"{source}curate: {err}") from None
    return config


def pipeline_config(config: LoopConfig, round: int = 1):
    from pipelines import alpaca, bootstrap, self_instruct

    cls = self_instruct.SelfInstructConfig if config.pipeline == "self-instruct" else alpaca.AlpacaConfig
    values = {**config.generate}
    values["seed"] = values.get("seed", 0) + round - 1  # a new round draws new examples
    return bootstrap.validate_config(cls, values, "generate")


def train_config(config: LoopConfig, data: Path, out: Path, name: str, replicate: int, max_steps: int | None = None):
    from train.config import TrainConfig

    values = {**config.train, "data": str(data), "out": out, "model": config.model, "name": name, "merge": True,
              "overwrite": True, "epochs": config.epochs, "seed": config.train.get("seed", 42) + replicate}  # fmt: skip
    if max_steps is not None:
        values["max_steps"] = max_steps
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


# ---- training rows and decontamination ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRow:
    source: Literal["seed", "generated"]
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Decontaminated:
    kept: list[TrainRow]
    dropped: dict[str, dict[str, int]]
    """source → rule → rows removed (export's rules: "rougeL" > 0.7 with an eval instruction, "13-gram" shared)."""


def decontaminate_rows(rows: list[TrainRow], eval_path: Path) -> Decontaminated:
    """The export's decontamination (datagen/export.py `decontaminate`), applied to every training row: seeds and
    generated rows meet the same rules."""
    from datagen.export import CONTAMINATION_NGRAM, DECONTAMINATION_THRESHOLD, Example, decontaminate, read_eval_set

    eval_set = read_eval_set(eval_path, CONTAMINATION_NGRAM)
    kept: list[TrainRow] = []
    dropped: dict[str, dict[str, int]] = {}
    for source in ("seed", "generated"):
        mine = [r for r in rows if r.source == source]
        examples = [Example(source, "", k, r.instruction, r.input, r.output, None, None) for k, r in enumerate(mine)]
        clean, counts = decontaminate(examples, eval_set, DECONTAMINATION_THRESHOLD, CONTAMINATION_NGRAM) if mine else ([], {})
        kept += [mine[e.task_id] for e in clean]
        dropped[source] = counts
    return Decontaminated(kept, dropped)


def seed_train_rows(seeds: list[SeedTask]) -> list[TrainRow]:
    return [TrainRow("seed", s.instruction, i.input, i.output) for s in seeds for i in s.instances]


def kept_seeds(seeds: list[SeedTask], kept: list[TrainRow]) -> list[SeedTask]:
    """The seed tasks with only their kept instances (the generator's prompts show no contaminated seed)."""
    keep = {(r.instruction, r.input, r.output) for r in kept if r.source == "seed"}
    out = []
    for s in seeds:
        instances = tuple(i for i in s.instances if (s.instruction, i.input, i.output) in keep)
        if instances or not s.instances:
            out.append(SeedTask(s.id, s.instruction, instances, s.is_classification))
    return out


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


def write_training_data(out: Path, rows: list[TrainRow], fmt: evaluate.PromptFormat, runs: list[str]) -> None:
    """A folder `datagen train` reads (train/data.py open_export): a saved DatasetDict and datagen.json, in the
    base model's own format."""
    import datasets

    datasets.disable_progress_bars()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    records = [evaluate.training_row(r.instruction, r.input, r.output, fmt) for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp))
    format = "messages" if fmt.chat else "prompt-completion"
    (tmp / "datagen.json").write_text(json.dumps({"format": format, "runs": runs}) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def export_rows(folder: Path) -> list[TrainRow]:
    import datasets

    split = datasets.load_from_disk(str(folder))["train"]
    return [TrainRow("generated", row["instruction"], row["input"], row["output"]) for row in split]


def base_format(model: str) -> tuple[evaluate.PromptFormat, Any]:
    from datagen import models

    tokenizer = models.load_tokenizer(model)
    return evaluate.prompt_format(tokenizer), tokenizer


# ---- the loop -----------------------------------------------------------------------------------------------------


Scores = dict[str, list[list[evaluate.ItemScore]]]
"""model name → replicate → item scores in item order."""


def run_loop(config: LoopConfig, engine, db: str | None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run or resume every stage; returns metrics.json's content."""
    seeds = read_seeds(config.seeds)
    if config.eval_file is not None:
        train_seeds = seeds
        items = evaluate.sample_items(evaluate.eval_items(read_seeds(config.eval_file)), config.eval_limit, config.eval_seed)
        if not items:
            raise BadInput(f"{config.eval_file}: no record has an output to score")
    else:
        train_seeds, held_out = evaluate.split_seeds(seeds, config.eval_size, config.eval_seed)
        items = evaluate.eval_items(held_out)
    from pipelines.bootstrap import check_seeds

    check_seeds(train_seeds, str(config.seeds), needs_instances=True)
    out = config.out.resolve()
    seeds_file, eval_file = out / "seeds_train.jsonl", out / "eval.jsonl"
    write_eval_items(eval_file, items)
    seed_clean = decontaminate_rows(seed_train_rows(train_seeds), eval_file)
    if not seed_clean.kept:
        raise BadInput(f"{config.seeds}: decontamination against the eval items removed every seed")
    write_seeds(seeds_file, kept_seeds(train_seeds, seed_clean.kept))
    fmt, _ = base_format(config.model)
    log(f"format: {fmt.name}; {len(items)} eval items; {len(seed_clean.kept)} seed rows train")

    with Session(engine) as session:
        loop = open_loop(session, config)
        data: dict[str, Any] = {"seeds-only": {"seed_rows": len(seed_clean.kept), "generated_rows": 0,
                                               "decontaminated": {"seed": seed_clean.dropped["seed"]}}}  # fmt: skip
        try:
            scores: Scores = {"base": [evaluate_stage(session, loop, 0, "evaluate-base", config.model, items, fmt, config, log)]}
            seeds_models = train_replicates(session, loop, 0, out / "r0", seed_clean.kept, [], fmt, config, db, log)
            scores["seeds-only"] = [evaluate_stage(session, loop, 0, f"evaluate.{k}", m, items, fmt, config, log) for k, m in enumerate(seeds_models)]
            generator, runs = config.model, []
            for r in range(1, config.rounds + 1):
                runs.append(generate_stage(session, loop, r, generator, seeds_file, config, db, log))
                if config.dedup:
                    dedup_stage(session, loop, r, runs[-1], db, log)
                export_dir, exported = export_stage(session, loop, r, runs, out / f"r{r}" / "export", log)
                clean = decontaminate_rows(seed_clean.kept + export_rows(export_dir), eval_file)
                data[f"round {r}"] = {**generation_counts(session, loop, r), "exported_rows": exported["rows"],
                                      "decontaminated": {"seed": seed_clean.dropped["seed"], "generated": clean.dropped["generated"]},
                                      "seed_rows": len(seed_clean.kept),
                                      "generated_rows": sum(row.source == "generated" for row in clean.kept)}  # fmt: skip
                if not data[f"round {r}"]["generated_rows"]:
                    raise DatagenError(f"round {r}: decontamination removed every generated row: nothing to add to the seeds")
                models = train_replicates(session, loop, r, out / f"r{r}", clean.kept, runs, fmt, config, db, log)
                scores[f"round {r}"] = [evaluate_stage(session, loop, r, f"evaluate.{k}", m, items, fmt, config, log) for k, m in enumerate(models)]
                if config.curate is not None:
                    curated_arm(session, loop, r, runs, seed_clean, eval_file, out, fmt, config, db, items, scores, data, log)
                generator = models[0]
        except BaseException as err:
            session.rollback()
            touch(loop, status="failed" if isinstance(err, Exception) else "stopped", error=str(err) or type(err).__name__)
            session.add(loop)
            session.commit()
            raise
        metrics = build_metrics(session, loop, config, items, scores, data, fmt, out)
        from datagen.e2e_report import write_report

        write_report(out, metrics, items, scores, config.samples, config.eval_seed)
        touch(loop, status="completed", error=None)
        session.add(loop)
        session.commit()
    return metrics


def generation_counts(session: Session, loop: Loop, r: int) -> dict[str, int | None]:
    generated = completed(session, loop, r, "generate")
    deduped = completed(session, loop, r, "dedup")
    accepted = generated.result.get("accepted") if generated else None
    return {"accepted_instructions": accepted, "kept_after_dedup": deduped.result.get("accepted_after") if deduped else accepted}


def generate_stage(session, loop: Loop, r: int, generator: str, seeds_file: Path, config: LoopConfig, db, log) -> str:
    name = f"{config.name}-r{r}-generate"
    if completed(session, loop, r, "generate"):
        log(f"round {r}: generate: done ({name})")
        return name
    from datagen import runs
    from datagen.backends import make_backend

    settings = pipeline_config(config, r)
    log(f"round {r}: generate with {generator}")
    # Stopped early (stall guard or request limit) is a result: the loop goes on with what was accepted.
    runs.run_bootstrap(config.pipeline, settings, seeds_file, backend=lambda: make_backend(config.backend, generator), model=generator,
                       store=db, name=name)  # fmt: skip
    run = find_run(session, name)
    session.refresh(run)
    record(session, loop, r, "generate", run_id=run.id, artifact=name, result={"status": run.status, "accepted": run.accepted})
    return name


def dedup_stage(session, loop: Loop, r: int, run_name: str, db, log) -> None:
    if completed(session, loop, r, "dedup"):
        return
    from datagen.dedup import Method, make_index
    from datagen.dedup_store import dedup_run
    from storage.store import open_engine

    log(f"round {r}: dedup {run_name} against the store")
    # Rerun after a kill: rows marked before are no longer candidates and the rest meet the same store, so the
    # decisions are those of one uninterrupted dedup.
    with Session(open_engine(db)) as dedup_session:
        dedup_run(dedup_session, find_run(dedup_session, run_name), make_index(Method.rougeL, 0.7, workers=1), Method.rougeL)
    run = find_run(session, run_name)
    session.refresh(run)
    record(session, loop, r, "dedup", run_id=run.id, artifact=run_name, result={"accepted_after": run.accepted})


def export_stage(session, loop: Loop, r: int, runs: list[str], folder: Path, log, curated: bool = False) -> tuple[Path, dict[str, Any]]:
    """The accepted rows of rounds 1..r (all of them, or what each run's curation kept); decontamination follows,
    with the seeds, in run_loop."""
    stage = "export-curated" if curated else "export"
    done = completed(session, loop, r, stage)
    if done:
        return folder, done.result
    from datagen.export import ExportConfig, Format, export

    if not any(find_run(session, name).accepted for name in runs):
        raise DatagenError(f"round {r}: the generation runs {', '.join(runs)} accepted no instruction, so there is nothing to "
                           "add to the seeds: see `datagen runs show` for the rejection reasons")  # fmt: skip
    log(f"round {r}: export {', '.join(runs)}" + (" as curated" if curated else ""))
    result = export(session, ExportConfig(runs=tuple(runs), format=Format.alpaca, out=folder, test_size=0.0, overwrite=True,
                                          ignore_curation=not curated))  # fmt: skip
    record(session, loop, r, stage, artifact=str(folder), result=result.counts)
    return folder, result.counts


# ---- the curated arm ----------------------------------------------------------------------------------------------


def score_stage(session, loop: Loop, r: int, run_name: str, config: LoopConfig, log) -> dict[str, Any]:
    """IFD of every accepted instance of the round's run under the base (the student). A rerun after a kill scores
    only what is not stored yet (score_run skips scored instances)."""
    done = completed(session, loop, r, "score")
    if done:
        return done.result
    from datagen.backends import load_backend
    from pipelines.score import ScoreConfig, score_run

    log(f"round {r}: score {run_name} with {config.model} (IFD)")
    backend = load_backend(BackendName.transformers, config.model)
    started = time.perf_counter()
    try:
        result = score_run(session, backend, run_name, ScoreConfig(model=config.model))
        session.add(StageTime(loop_id=loop.id, stage="score", device=cost.backend_device(backend), model=config.model,
                              seconds=time.perf_counter() - started))  # fmt: skip
    finally:
        backend.close()
    summary = {"run": run_name, "instances": result.instances, "scored": result.scored + result.skipped,
               "no_score": result.no_score, "degenerate": result.degenerate, "mean_ifd": result.mean_ifd}  # fmt: skip
    record(session, loop, r, "score", artifact=run_name, result=summary)
    return summary


def curate_stage(session, loop: Loop, r: int, run_name: str, config: LoopConfig, log) -> dict[str, Any]:
    done = completed(session, loop, r, "curate")
    if done:
        return done.result
    from pipelines.curate import curate_run

    rule = config.curate.rule(config.model)  # type: ignore[union-attr]
    log(f"round {r}: curate {run_name}: {rule.text}")
    result = curate_run(session, run_name, rule)
    summary = {"run": run_name, "rule": result.rule, "instances": result.instances, "kept": result.kept,
               "dropped": result.dropped, "dropped_by_reason": result.dropped_by_reason}  # fmt: skip
    record(session, loop, r, "curate", artifact=run_name, result=summary)
    return summary


def curated_arm(session, loop: Loop, r: int, runs: list[str], seed_clean: Decontaminated, eval_file: Path, out: Path,
                fmt: evaluate.PromptFormat, config: LoopConfig, db, items, scores: Scores, data: dict[str, Any], log) -> None:  # fmt: skip
    """Round r's curated arm: score and curate the round's run (earlier rounds' runs are curated already), export what
    the rules kept, decontaminate it with the seeds, train at the all-accepted arm's budget, evaluate."""
    score = score_stage(session, loop, r, runs[-1], config, log)
    curation = curate_stage(session, loop, r, runs[-1], config, log)
    export_dir, exported = export_stage(session, loop, r, runs, out / f"r{r}c" / "export", log, curated=True)
    clean = decontaminate_rows(seed_clean.kept + export_rows(export_dir), eval_file)
    generated = sum(row.source == "generated" for row in clean.kept)
    data[f"round {r} curated"] = {**generation_counts(session, loop, r), "exported_rows": exported["rows"],
                                  "decontaminated": {"seed": seed_clean.dropped["seed"], "generated": clean.dropped["generated"]},
                                  "seed_rows": len(seed_clean.kept), "generated_rows": generated,
                                  "scored": score, "curation": curation}  # fmt: skip
    if not generated:
        raise DatagenError(f"round {r}: the curation rule and decontamination left no generated row: nothing to add to the seeds")
    steps = None
    if config.curate.budget == "steps":  # type: ignore[union-attr]
        steps = [completed(session, loop, r, f"train.{k}").result["steps"] for k in range(config.replicates)]  # type: ignore[union-attr]
    models = train_replicates(session, loop, r, out / f"r{r}c", clean.kept, runs, fmt, config, db, log, arm="curated", max_steps=steps)
    scores[f"round {r} curated"] = [evaluate_stage(session, loop, r, f"evaluate-curated.{k}", m, items, fmt, config, log)
                                    for k, m in enumerate(models)]  # fmt: skip


def train_replicates(session, loop: Loop, r: int, folder: Path, rows: list[TrainRow], runs: list[str], fmt: evaluate.PromptFormat,
                     config: LoopConfig, db, log, arm: str = "", max_steps: list[int] | None = None) -> list[str]:  # fmt: skip
    """Trains the base on the rows once per replicate (replicate k for max_steps[k] steps when given, else the loop's
    epochs); returns the merged models' folders. `arm` names a second arm of the round ("curated")."""
    from train.sft import MERGED, SFTRecipe

    data_dir = folder / "train_data"
    stage = f"train-{arm}" if arm else "train"
    models = []
    for k in range(config.replicates):
        model_dir = folder / f"model.{k}"
        models.append(str(model_dir / MERGED))
        if completed(session, loop, r, f"{stage}.{k}"):
            continue
        if not (data_dir / "datagen.json").is_file() or k == 0:
            write_training_data(data_dir, rows, fmt, runs)
        name = f"{config.name}-r{r}-{stage}.{k}"
        steps = max_steps[k] if max_steps else None
        settings = train_config(config, data_dir, model_dir, name, k, steps)
        budget = f"{steps} steps" if steps else f"{config.epochs} epochs"
        log(f"round {r}: train {config.model}{' (' + arm + ')' if arm else ''} on {len(rows)} rows for {budget} (replicate {k}, seed {settings.seed})")
        recipe = SFTRecipe(settings, db_url=db)
        recipe.setup()
        summary = recipe.train()
        del recipe
        training_run = session.exec(select(TrainingRun).where(TrainingRun.name == name)).one()
        seed_rows = sum(row.source == "seed" for row in rows)
        record(session, loop, r, f"{stage}.{k}", training_run_id=training_run.id, artifact=models[-1],
               result={"rows": len(rows), "seed_rows": seed_rows, "generated_rows": len(rows) - seed_rows,
                       "seed": settings.seed, **summary})  # fmt: skip
    return models


def evaluate_stage(session, loop: Loop, r: int, stage: str, model: str, items, fmt: evaluate.PromptFormat, config: LoopConfig,
                   log) -> list[evaluate.ItemScore]:  # fmt: skip
    done = completed(session, loop, r, stage)
    if done:
        return [evaluate.ItemScore(**s) for s in done.result["items"]]
    from datagen.backends import load_backend

    log(f"round {r}: evaluate {model} on {len(items)} items")
    backend = load_backend(BackendName.transformers, model)
    started = time.perf_counter()
    try:
        scores = evaluate.score_model(backend, backend.tokenizer, items, fmt, config.eval_max_tokens)
        # device seconds for cost accounting (datagen/cost.py), committed with the stage
        session.add(StageTime(loop_id=loop.id, stage="eval", device=cost.backend_device(backend), model=model,
                              seconds=time.perf_counter() - started))  # fmt: skip
    finally:
        backend.close()
    record(session, loop, r, stage, artifact=model, result={"model": model, "items": [asdict(s) for s in scores]})
    return scores


# ---- metrics.json -------------------------------------------------------------------------------------------------


def relative(path: str | Path | None, out: Path) -> str | None:
    """A path under `out` as seen from it, so a copied report folder keeps its links; others as they are."""
    if not path:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(out))
    except ValueError:
        return str(path)


def comparisons(config: LoopConfig, scores: Scores, floors: dict[str, dict[str, float]]) -> list[evaluate.Comparison]:
    """The primary comparison first, then every other (model, baseline, metric) as a Holm-corrected secondary."""
    pairs = [("seeds-only", "base")] + [(f"round {r}", b) for r in range(1, config.rounds + 1) for b in ("base", "seeds-only")]
    if config.curate is not None:
        pairs += [(f"round {r} curated", b) for r in range(1, config.rounds + 1) for b in (f"round {r}", "seeds-only", "base")]
    primary_key = config.primary()
    keys = [primary_key] + [(m, b, metric) for m, b in pairs for metric in evaluate.METRICS if (m, b, metric) != primary_key]
    found = {}
    for model, baseline, metric in keys:
        floor = max(floors.get(model, {}).get(metric, 0.0), floors.get(baseline, {}).get(metric, 0.0))
        c = evaluate.compare(model, scores[model], baseline, scores[baseline], metric, floor)
        if c is not None:
            found[(model, baseline, metric)] = c
    if primary_key not in found:
        raise DatagenError(f"the primary comparison {primary_key} has no item with that metric (exact match needs short-label references)")
    return evaluate.with_holm(found.pop(primary_key), list(found.values()))


def build_metrics(session, loop: Loop, config: LoopConfig, items, scores: Scores, data: dict[str, Any], fmt: evaluate.PromptFormat,
                  out: Path) -> dict[str, Any]:  # fmt: skip
    """metrics.json: the primary verdict, every comparison, per-model figures, the noise floor, the data counts,
    the training budgets, and every replicate's per-item scores; paths relative to `out`."""
    spread: dict[str, dict[str, list[dict[str, Any]]]] = {}
    floors: dict[str, dict[str, float]] = {}
    for name, replicates in scores.items():
        if len(replicates) < 2:
            continue
        for metric in evaluate.METRICS:
            pairs = evaluate.replicate_spread(replicates, metric)
            if pairs:
                spread.setdefault(name, {})[metric] = [{"a": a, "b": b, "difference": d} for a, b, d in pairs]
                floors.setdefault(name, {})[metric] = max(abs(d) for _, _, d in pairs)
    found = comparisons(config, scores, floors)
    rows = [{**asdict(c), "better": c.better, "verdict": evaluate.verdict(c)} for c in found]
    stages = session.exec(select(LoopStage).where(LoopStage.loop_id == loop.id).order_by(LoopStage.round, LoopStage.id)).all()
    training: dict[str, list[dict[str, Any]]] = {}
    for s in stages:
        if not s.stage.startswith(("train.", "train-curated.")):
            continue
        res = s.result
        epochs = res.get("epochs")
        name = (f"round {s.round}" if s.round else "seeds-only") + (" curated" if s.stage.startswith("train-curated.") else "")
        training.setdefault(name, []).append({
            "replicate": int(s.stage.split(".")[1]), "seed": res.get("seed"), "rows": res.get("rows"),
            "seed_rows": res.get("seed_rows"), "generated_rows": res.get("generated_rows"), "steps": res.get("steps"),
            "epochs_over_seeds": epochs, "epochs_over_generated": epochs if res.get("generated_rows") else 0.0,
            "train_tokens": res.get("train_tokens"), "final_train_loss": res.get("final_train_loss"),
            "train_seconds": res.get("train_seconds"), "model": relative(s.artifact, out),
            "loss_curve": relative(Path(res["out"]) / "loss_curve.png", out) if res.get("out") else None,
        })  # fmt: skip
    primary = found[0]
    last_round = data.get(f"round {config.rounds}", {})
    loop_cost = cost.loop_cost_dict(cost.loop_usage(session, loop.id), cost.load_prices(), last_round.get("generated_rows", 0),
                                    abs(primary.difference) if primary.better else None)  # fmt: skip
    return {
        "loop": loop.name,
        "rounds": config.rounds,
        "replicates": config.replicates,
        "primary": {"comparison": f"{primary.model} vs {primary.baseline}, {evaluate.METRIC_NAMES[primary.metric]}",
                    "better": primary.better, "verdict": evaluate.verdict(primary)},
        "eval": {"source": str(config.eval_file) if config.eval_file else f"{config.eval_size} held-out seed tasks of {config.seeds} (seed {config.eval_seed})",
                 "items": len(items), "ids": [item.key for item in items], "format": fmt.name,
                 "interval": f"{evaluate.CONFIDENCE:.0%} paired t-interval over items (each averaged over a model's replicates), "
                             "its variance adding each model's training noise (Welch-Satterthwaite degrees of freedom)",
                 "max_tokens": config.eval_max_tokens},
        "budget_rule": budget_rule(config),
        "curation": curation_facts(config, data),
        "models": {name: evaluate.summarize(replicates) for name, replicates in scores.items()},
        "comparisons": rows,
        "noise_floor": spread,
        "data": data,
        "training": training,
        "cost": loop_cost,
        "scores": {name: [[{"id": item.key, **asdict(s)} for item, s in zip(items, replicate)] for replicate in replicates]
                   for name, replicates in scores.items()},
    }  # fmt: skip


def budget_rule(config: LoopConfig) -> str:
    rule = f"every model trains {config.epochs} epochs over its own rows: each seed is seen equally often by every arm"
    if config.curate is None:
        return rule
    if config.curate.budget == "steps":
        return (rule.replace("every model", "every model but the curated arms") + "; each curated replicate trains as many "
                "optimizer steps as the all-accepted replicate of its round with the same seed (the same compute: more passes "
                "over its fewer rows, seeds included)")  # fmt: skip
    return rule + ", the curated arms included (they take fewer steps)"


def curation_facts(config: LoopConfig, data: dict[str, Any]) -> dict[str, Any] | None:
    """The curated arms' rule, scorer, budget and per-round counts, for the report."""
    if config.curate is None:
        return None
    rounds = {name: {"scored": d.get("scored"), "curation": d.get("curation")} for name, d in data.items() if name.endswith(" curated")}
    return {"rule": config.curate.rule(config.model).text, "scored_by": config.model, "budget": config.curate.budget, "rounds": rounds}
