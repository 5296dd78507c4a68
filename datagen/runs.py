"""The library's runs: open a store, run a pipeline into it, read what a run made.

    from datagen import Store, SelfInstructConfig, run_self_instruct

    store = Store("sqlite:///datagen.db")
    handle = run_self_instruct(SelfInstructConfig(num_instructions=5), "examples/seed_tasks.jsonl", store=store, name="demo")
    handle.status, handle.figures().accepted, handle.to_dataset()

A run's lifecycle is here, once, for every client (the CLI commands, the e2e loop, a notebook): check the options and
the seeds, hold the run (one writer per run, storage/run_lock.py), resume it when the name exists (same pipeline,
model, seeds and options; only where it stops may change), load the model, run the pipeline one transaction a batch,
and store the outcome. A run that stops before its target by its own rule (request budget, stall guard) is a result,
`handle.status == "stopped"`; `handle.raise_if_stopped()` turns it into `StoppedEarly` (exit 3 on the CLI).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, select

from datagen import sigterm
from datagen.backends import Backend
from datagen.errors import BadInput, StoppedEarly
from datagen.models import DEFAULT_MODEL
from pipelines import bootstrap
from pipelines.alpaca import AlpacaConfig
from pipelines.seeds import SeedTask, read_seeds
from pipelines.self_instruct import SelfInstructConfig
from storage import queries
from storage.run_lock import hold_run
from storage.store import add_generations, add_run, database_url, default_run_name, find_run, get_run, open_engine, record_failure, touch
from storage.tables import Run, Task

if TYPE_CHECKING:
    from datasets import Dataset

    from pipelines.toolformer import ToolformerConfig

BackendArg = Backend | Callable[[], Backend] | None
"""A loaded backend (the caller closes it), a function that loads one (called once the run is held and checked, so a
refused resume loads no model; the run closes it), or None: the embedded model on the transformers backend."""

OnBatch = Callable[[Run, Any], None]
Progress = Callable[[Run], AbstractContextManager[OnBatch]]
"""Called once the run is open with its row; the context it returns is held while the pipeline runs and yields the
function called after every committed batch (the CLI's progress bar)."""


class Store:
    """A datagen store: a SQLAlchemy URL (default sqlite:///datagen.db, or $DATAGEN_DB), its schema created or
    checked on open."""

    def __init__(self, url: str | None = None, create: bool = True):
        self.url = database_url(url)
        self.engine = open_engine(url, create=create)

    def session(self) -> Session:
        return Session(self.engine)

    def runs(self) -> list[RunHandle]:
        """Every run, newest first."""
        with self.session() as session:
            return [RunHandle(self, run.id, run.name, run.pipeline) for run in queries.list_runs(session)]

    def run(self, ref: str | int) -> RunHandle:
        """A run by name or id; BadInput naming it when there is none."""
        with self.session() as session:
            run = get_run(session, ref)
            return RunHandle(self, run.id, run.name, run.pipeline)


def as_store(store: Store | str | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


@dataclass
class RunHandle:
    """One stored run. Its status and figures are read from the store on each call; `summary` holds the figures the
    run function printed for this session (None for a handle from `Store.runs`)."""

    store: Store
    id: int
    name: str
    pipeline: str
    summary: dict[str, Any] | None = field(default=None, repr=False)

    def row(self) -> Run:
        with self.store.session() as session:
            return session.get(Run, self.id)

    @property
    def status(self) -> str:
        """running, completed, stopped (a rule or SIGTERM stopped it before its target) or failed."""
        return self.row().status

    @property
    def error(self) -> str | None:
        """Why the run stopped or failed; None when it completed."""
        return self.row().error

    def figures(self) -> queries.Figures:
        """The headline numbers `datagen runs`, the viewer, the report and the card show (storage/queries.py)."""
        with self.store.session() as session:
            run = session.get(Run, self.id)
            return queries.figures(session, [run])[run.id]

    def rejected_by_reason(self) -> dict[str, int]:
        with self.store.session() as session:
            return queries.rejected_by_reason(session, session.get(Run, self.id))

    def records(self, format: str = "alpaca", with_provenance: bool = False) -> list[dict[str, Any]]:
        """The run's exportable rows as `datagen export` writes them (accepted generated tasks with their accepted
        instances; Toolformer: texts with a kept call), in task order, before any split or decontamination."""
        from datagen.export import Format, select_examples, select_toolformer_examples, to_record

        fmt = Format(format)
        with self.store.session() as session:
            run = session.get(Run, self.id)
            examples, _ = select_toolformer_examples(session, run) if run.pipeline == "toolformer" else select_examples(session, run)
        return [to_record(e, fmt, with_provenance=with_provenance) for e in examples]

    def to_dataset(self, format: str = "alpaca", with_provenance: bool = False) -> Dataset:
        """`records()` as a `datasets.Dataset`, with the export's column types."""
        from datasets import Dataset

        from datagen.export import Format, features_for

        fmt = Format(format)
        return Dataset.from_list(self.records(format, with_provenance), features=features_for(fmt, with_provenance))

    def raise_if_stopped(self) -> RunHandle:
        """StoppedEarly when the run stopped before its target by its own rule (request budget, stall guard)."""
        row = self.row()
        if row.status == "stopped":
            raise StoppedEarly(row.name, row.error or "stopped")
        return self


# ---- Self-Instruct and Alpaca --------------------------------------------------------------------------------------

PIPELINES: dict[str, type[bootstrap.BootstrapConfig]] = {"self-instruct": SelfInstructConfig, "alpaca": AlpacaConfig}

RESUMABLE = ("num_instructions", "max_requests", "max_stalled_batches")
"""Options a resumed run may change: where it stops, not how it decides. Any other change would make the resumed
run something the uninterrupted one is not, so it is refused."""


def run_self_instruct(config: SelfInstructConfig, seeds: str | Path | Sequence[SeedTask], *, backend: BackendArg = None,
                      model: str | None = None, store: Store | str | None = None, name: str | None = None,
                      progress: Progress | None = None) -> RunHandle:  # fmt: skip
    """A Self-Instruct run (pipelines/self_instruct.py) into `store` under `name` (resumed if it exists)."""
    return run_bootstrap("self-instruct", config, seeds, backend=backend, model=model, store=store, name=name, progress=progress)


def run_alpaca(config: AlpacaConfig, seeds: str | Path | Sequence[SeedTask], *, backend: BackendArg = None,
               model: str | None = None, store: Store | str | None = None, name: str | None = None,
               progress: Progress | None = None) -> RunHandle:  # fmt: skip
    """A Stanford Alpaca run (pipelines/alpaca.py) into `store` under `name` (resumed if it exists)."""
    return run_bootstrap("alpaca", config, seeds, backend=backend, model=model, store=store, name=name, progress=progress)


def stored_options(run: Run, config_cls: type[bootstrap.BootstrapConfig]) -> dict[str, Any]:
    """A stored run's options, the base a resume's changes apply to. A run stored before `pipelined` existed ran its
    batches one after another."""
    return {"pipelined": False, **run.config} if "pipelined" in config_cls.model_fields else dict(run.config)


def read_checked_seeds(seeds: str | Path | Sequence[SeedTask], config: bootstrap.BootstrapConfig) -> list[SeedTask]:
    """The seed tasks, every line of a file checked, and the pipeline's own check: worked examples need instances."""
    tasks = read_seeds(Path(seeds)) if isinstance(seeds, (str, Path)) else list(seeds)
    needs_instances = getattr(config, "instance_demos", "seeds") == "seeds"  # Alpaca shows seed records: always
    bootstrap.check_seeds(tasks, str(seeds) if isinstance(seeds, (str, Path)) else "seeds", needs_instances)
    return tasks


BACKEND_DEFAULTS = ("max_request_batch_size", "pipelined")
"""Options whose None means "the backend's default" (pipelines/bootstrap.py for_backend); a run stores them filled."""


def with_stored_backend_defaults(config: bootstrap.BootstrapConfig, run: Run) -> bootstrap.BootstrapConfig:
    """A resumed run keeps the backend defaults it was started with where the config leaves them to the backend."""
    stored = stored_options(run, type(config))
    keep = {k: stored[k] for k in BACKEND_DEFAULTS if k in type(config).model_fields and getattr(config, k) is None and k in stored}
    return config.model_copy(update=keep)


def check_resume(session: Session, run: Run, pipeline: str, config: bootstrap.BootstrapConfig, seeds: list[SeedTask],
                 seeds_source: str, model: str) -> None:  # fmt: skip
    """A resume must be the run it resumes: same pipeline, model, seed tasks and options (RESUMABLE aside)."""
    if run.pipeline != pipeline:
        raise BadInput(f"run '{run.name}' is a {run.pipeline} run, not {pipeline}: choose another --run name")
    if run.model != model:
        raise BadInput(f"run '{run.name}' was started with --model {run.model}; resume it with the same model")
    stored = bootstrap.load_seeds(session, run)
    if stored and not same_seeds(stored, seeds):
        raise BadInput(f"run '{run.name}' was started with other seed tasks than {seeds_source}; resume it with the same file")
    base = stored_options(run, type(config))
    changed = [f"{key} {base[key]!r} -> {value!r}" for key, value in bootstrap.config_dict(config).items()
               if key in base and key not in RESUMABLE and base[key] != value]  # fmt: skip
    if changed:
        raise BadInput(f"run '{run.name}' was started with other options ({', '.join(changed)}): resume it with the "
                       f"options it was started with, or start a new --run")  # fmt: skip


def same_seeds(stored: list[SeedTask], given: list[SeedTask]) -> bool:
    """The same tasks with the same instances; whether each is classification only where the file says (the store
    also holds the classification step's labels of seeds the file left open)."""
    if len(stored) != len(given):
        return False
    return all(
        s.instruction == g.instruction and s.instances == g.instances
        and (g.is_classification is None or s.is_classification == g.is_classification)
        for s, g in zip(stored, given)
    )  # fmt: skip


def run_bootstrap(pipeline: str, config: bootstrap.BootstrapConfig, seeds: str | Path | Sequence[SeedTask], *,
                  backend: BackendArg = None, model: str | None = None, store: Store | str | None = None,
                  name: str | None = None, progress: Progress | None = None) -> RunHandle:  # fmt: skip
    """Check the seeds, hold and open (or resume) the run, load the model, run the pipeline, summarize."""
    from pipelines import alpaca, self_instruct

    if not isinstance(config, PIPELINES[pipeline]):
        raise BadInput(f"{pipeline} takes a {PIPELINES[pipeline].__name__}, got {type(config).__name__}")
    run_pipeline = self_instruct.run if pipeline == "self-instruct" else alpaca.run
    tasks = read_checked_seeds(seeds, config)  # every line checked before anything is written
    seeds_source = str(seeds) if isinstance(seeds, (str, Path)) else None
    model = model or getattr(backend, "model", None) or DEFAULT_MODEL
    store = as_store(store)
    # One writer per run, held before the model loads (storage/run_lock.py); SIGTERM stops between batches.
    with sigterm.stop_between_batches(), hold_run(store.engine, name):
        with store.session() as session:
            run = find_run(session, name) if name else None
            if run is not None:
                config = with_stored_backend_defaults(config, run)
                check_resume(session, run, pipeline, config, tasks, seeds_source or "the seeds given", model)
        llm, owned = _backend(backend, model)
        settings = bootstrap.for_backend(config, llm.name)  # stored filled in: a resumed run keeps them
        started = time.perf_counter()
        with store.session() as session:
            run = find_run(session, name) if name else None
            stored = {"seeds": seeds_source, **bootstrap.config_dict(settings)}
            try:
                if run is None:
                    run = add_run(session, Run(name=name or default_run_name(pipeline), pipeline=pipeline, config=stored,
                                               model=model, backend=llm.name))  # fmt: skip
                if not session.exec(select(Task.id).where(Task.run_id == run.id, Task.source == "seed")).first():
                    start_run(session, run, llm, tasks, settings, pipeline)  # committed with the status below
                touch(run, status="running", error=None, config=stored)
                session.add(run)
                session.commit()
                start_accepted = run.accepted
                with progress(run) if progress else _no_progress() as on_batch:
                    totals = run_pipeline(session, run, llm, settings, on_batch)
            except BaseException as err:
                if run is not None and run.id is not None:
                    record_failure(session, run, err)
                else:
                    session.rollback()
                raise
            finally:
                if owned:
                    llm.close()
            summary = summarize(session, run, totals, time.perf_counter() - started, run.accepted - start_accepted)
            return RunHandle(store, run.id, run.name, run.pipeline, summary)


def _backend(backend: BackendArg, model: str) -> tuple[Backend, bool]:
    """The backend to run on, and whether this run loaded it (and so closes it)."""
    if backend is None:
        from datagen.backends import make_backend

        return make_backend("transformers", model), True
    if callable(getattr(backend, "generate", None)):
        return backend, False
    return backend(), True


@contextmanager
def _no_progress() -> Iterator[OnBatch]:
    yield lambda run, stats: None


def start_run(session: Session, run: Run, llm: Backend, seeds: list[SeedTask], settings, pipeline: str) -> None:
    """A new run's seeds go to the store first; seeds that do not say whether they are classification tasks are
    labelled by the classification step (Self-Instruct only: Alpaca has none)."""
    from pipelines import self_instruct

    if pipeline == "self-instruct":
        chat = bootstrap.uses_chat(llm, settings.prompt_style)
        seeds, requests, results = self_instruct.label_seeds(llm, seeds, chat)
        add_generations(session, run, llm, "classification", 0, requests, results)
    bootstrap.store_seeds(session, run, seeds)


def summarize(session: Session, run: Run, totals: bootstrap.BatchStats, seconds: float, new: int) -> dict[str, Any]:
    """The whole run's figures from the store (earlier sessions included), and this session's time: the words
    `datagen runs`, the viewer, the report and the card use (storage/queries.py)."""
    numbers = queries.figures(session, [run])[run.id]
    return {
        "run": run.name, "status": run.status, "message": run.error, "completions": numbers.completions,
        "instructions": numbers.instructions, "accepted": numbers.accepted, "accepted_this_session": new, "rejected": numbers.rejected,
        "not_judged": numbers.not_judged, "keep_rate": None if numbers.keep_rate is None else round(numbers.keep_rate, 3),
        "instances": run.instances, "requests": run.requests,
        "empty_responses_this_session": totals.empty_responses,
        "prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
        "seconds": round(seconds, 1), "generate_seconds": round(totals.generate_seconds, 1),
        "rejected_by_reason": queries.rejected_by_reason(session, run),
    }  # fmt: skip


# ---- Toolformer ----------------------------------------------------------------------------------------------------


def run_toolformer(config: ToolformerConfig, corpus: str | Path, *, lines: str | None = None, limit: int | None = None,
                   backend: BackendArg = None, model: str | None = None, store: Store | str | None = None,
                   name: str | None = None, progress: Callable[[Run, int], AbstractContextManager[Callable]] | None = None,
                   ) -> RunHandle:  # fmt: skip
    """A Toolformer run (pipelines/toolformer.py) over the corpus (its lines FIRST:LAST, its first `limit` texts)."""
    from pipelines import toolformer as tf
    from pipelines.tools import build_tools, search_index

    texts = tf.select_lines(tf.read_corpus(Path(corpus)), lines)[:limit]  # every line checked before anything is written
    index = search_index(config.tools, config.search_corpus)  # so is the search corpus
    stored = {"corpus": str(corpus), "corpus_sha256": tf.corpus_digest(Path(corpus)), "lines": lines, **config.model_dump(mode="json")}
    model = model or getattr(backend, "model", None) or DEFAULT_MODEL
    store = as_store(store)
    with sigterm.stop_between_batches(), hold_run(store.engine, name), store.session() as session:
        run = toolformer_run_to_resume(session, name, stored, model)
        llm, owned = _backend(backend, model)
        if run is None:
            run = add_run(session, Run(name=name or default_run_name("toolformer"), pipeline="toolformer", config=stored,
                                       model=model, backend=llm.name))  # fmt: skip
        elif run.backend != llm.name:
            if owned:
                llm.close()
            raise BadInput(f"run '{run.name}' ran on the {run.backend} backend; resume it with --backend {run.backend}")
        started = time.perf_counter()
        try:
            registry = build_tools(config.tools, index, llm, config.qa_max_tokens)
            todo = len(texts) - len(tf.done_lines(session, run) & {t.line for t in texts})
            with progress(run, todo) if progress else _no_progress() as on_batch:
                tf.run(session, run, llm, texts, registry, config, on_batch)
        except BaseException as err:
            record_failure(session, run, err)
            raise
        finally:
            if owned:
                llm.close()
        touch(run, status="completed", error=None)
        session.add(run)
        session.commit()
        summary = {"run": run.name, "texts": len(texts), "annotated": run.instances, "kept": run.accepted,
                   "seconds": round(time.perf_counter() - started, 1), "tools": tf.summarize(session, run, config.tools)}  # fmt: skip
        return RunHandle(store, run.id, run.name, run.pipeline, summary)


def toolformer_run_to_resume(session: Session, name: str | None, stored: dict[str, Any], model: str) -> Run | None:
    """The named run if it exists and was started with the same corpus, model and options; None for a new run."""
    run = find_run(session, name) if name else None
    if run is None:
        return None
    if run.pipeline != "toolformer":
        raise BadInput(f"run '{run.name}' is a {run.pipeline} run; choose another --run name")
    changed = [key for key in stored if key not in ("corpus", "batch_size") and run.config.get(key) != stored[key]]
    if run.model != model:
        changed.insert(0, "model")
    if changed:
        raise BadInput(
            f"run '{run.name}' was started with other options ({', '.join(changed)} differ); "
            "resume it with the same ones, or start a new --run"
        )
    return run


# ---- after generation: dedup, export, train, evaluate, the whole loop ----------------------------------------------


def dedup_run(run: str | int, *, store: Store | str | None = None, against: Sequence[str] = ("store",), method: str = "rougeL",
              threshold: float = 0.7, tokenizer: str = "rouge", apply: bool = True, workers: int = 1):  # fmt: skip
    """A stored run's accepted instructions that are near duplicates (Self-Instruct's ROUGE-L > 0.7 by default) of its
    seeds, of `against` ('store': every other run; 'run:NAME'; a JSONL file) or of an earlier one of its own; with
    `apply`, marked rejected (reason duplicate_METHOD) in the store. Returns the decisions (datagen/dedup_store.py
    Decided: `.kept()`, `.dropped()`)."""
    from datagen.dedup import Method, make_index
    from datagen.dedup_store import dedup_run as dedup_stored_run

    store = as_store(store)
    index = make_index(method, threshold, tokenizer, workers=workers)
    with store.session() as session:
        return dedup_stored_run(session, get_run(session, run), index, Method(method), list(against), apply)


def export_dataset(config, *, store: Store | str | None = None):
    """Write runs as a Hugging Face dataset folder with a dataset card (datagen/export.py ExportConfig, ExportResult)."""
    from datagen.export import export as export_runs

    store = as_store(store)
    with store.session() as session:
        return export_runs(session, config)


def train_model(config, *, store: Store | str | None = None) -> dict[str, Any]:
    """Fine-tune (LoRA, QLoRA or full; train/config.py TrainConfig) and return the summary `datagen train` prints.
    `config.data` is an export folder, a JSONL file or a run name of `store`."""
    from train.sft import SFTRecipe

    recipe = SFTRecipe(config, db_url=as_store(store).url)
    recipe.setup()
    return recipe.train()


def evaluate_model(backend: Backend, items, *, max_tokens: int = 128, tokenizer=None):
    """Score a model on evaluation items (datagen/evaluate.py EvalItem, e.g. `eval_items(read_seeds(path))`): per item
    the loss of the reference answer, ROUGE-L and exact match of a greedy answer, in the model's prompt format."""
    from datagen import evaluate as ev

    if tokenizer is None:
        from datagen import models

        tokenizer = models.load_tokenizer(backend.model)
    return ev.score_model(backend, tokenizer, items, ev.prompt_format(tokenizer), max_tokens)


def run_loop(config, *, store: Store | str | None = None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The whole cycle (datagen/e2e.py LoopConfig): generate, dedup, export, train, evaluate, for each round; returns
    the metrics written to metrics.json. One writer per loop, as per run."""
    from datagen import e2e

    store = as_store(store)
    with hold_run(store.engine, config.name):
        return e2e.run_loop(config, store.engine, store.url, log=log)
