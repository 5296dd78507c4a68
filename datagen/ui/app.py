"""The viewer's routes: each reads through storage.queries or datagen.ui.queries and renders one template.

Read-only unless started with --allow-edits, which adds one POST route: reject an item by hand, or undo that (a
ManualVerdict row each; the latest one is in force). Errors are pages, never tracebacks: an unknown run or item is a 404, a bad filter or path a 400 naming the
parameter, anything else a 500 that names only the error's type.
Every request's Host header is checked, whatever address the server listens on: it must be an IP address (IPv4, or
IPv6 in brackets), localhost, or a name the server was told (`allowed_hosts`: the machine's own names when it serves
the network). A DNS-rebinding page in the browser reaches the server under the attacker's own domain name, so it is
refused and cannot read the store, nor write with --allow-edits. No page may be framed by another site.
"""

from __future__ import annotations

import io
import ipaddress
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlalchemy import func
from sqlmodel import Session, select
from starlette.exceptions import HTTPException

from datagen import cost, report
from datagen.errors import BadInput
from datagen.ui import queries
from datagen.ui.filters import MAX_ID, BadFilter, parse_filter
from datagen.ui.sparkline import keep_rate_curves, keep_rate_sparkline, length_edges, overlaid_histograms, similarity_edges
from storage import queries as shared
from storage.store import find_run
from storage.tables import ManualVerdict, Run, Task, TrainingRun

HERE = Path(__file__).parent
LOCAL_NAMES = ("localhost",)
POLL_SECONDS = 2
"""How often a page showing a running run asks for fresh counters."""

templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))
"""autoescape on every template: instructions and completions are model output and may contain HTML."""


def shown(value: Any, key: str = "") -> str:
    """A report figure as a reader wants it: a rate as a percentage, other fractions to 3 significant digits, a mapping
    as "name count, name count" (most first, as the report orders them), nothing as a dash."""
    if value is None or value == {}:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k} {shown(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.1%}" if key.endswith("rate") else f"{value:.3g}"
    return str(value)


templates.env.filters["shown"] = shown


def create_app(engine: Engine, allowed_hosts: tuple[str, ...] = LOCAL_NAMES, curator: str | None = None) -> FastAPI:
    """The viewer over `engine`. allowed_hosts: the host names (beside IP addresses) a request's Host header may
    name. curator: allow edits (manual verdicts), recorded under this name unless the form gives another; None keeps
    the viewer read-only."""
    app = FastAPI(title="datagen ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.curator = curator
    names = {name.lower().rstrip(".") for name in allowed_hosts}

    @app.middleware("http")
    async def host_check_and_no_framing(request: Request, call_next):
        if not host_allowed(request.headers.get("host", ""), names):
            return Response("Invalid host header", status_code=400, media_type="text/plain")
        response = await call_next(request)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _routes(app)
    if curator is not None:
        _edit_routes(app)
    _error_pages(app)
    return app


def host_name(host_header: str) -> str | None:
    """The host part of a Host header ("[::1]:8765" → "::1", "Localhost:80" → "localhost"); None when malformed."""
    found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::\d{1,5})?|([^:\[\]]+)(?::\d{1,5})?", host_header.strip())
    if found is None:
        return None
    return (found.group(1) or found.group(2)).lower().rstrip(".")


def host_allowed(host_header: str, names: set[str]) -> bool:
    """An IP address (no DNS name, so no rebinding) or one of `names`."""
    host = host_name(host_header)
    if host is None or host == "":
        return False
    if host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def session(request: Request) -> Iterator[Session]:
    """One read snapshot per page: a page reads its figures, its item page and its reasons in several queries, and a
    batch committed between two of them would show e.g. 15 instructions beside "12 matching". pysqlite starts no
    transaction for a SELECT, so a GET begins one itself (WAL keeps it a snapshot; writers are not blocked);
    PostgreSQL reads a GET in REPEATABLE READ (READ COMMITTED snapshots each statement). POSTs (hand verdicts) write,
    and keep the default: a deferred SQLite snapshot could not be upgraded to a write after another commit."""
    engine = request.app.state.engine
    with Session(engine) as db:
        if request.method == "GET":
            if engine.dialect.name == "sqlite":
                db.connection().exec_driver_sql("BEGIN")
            else:
                db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield db


Db = Annotated[Session, Depends(session)]


def _run_or_404(db: Session, ref: str) -> Run:
    """A run by id (every link the viewer makes), or by name when `ref` is not a number (a URL typed by hand): a run
    named "1" never takes over run 1's pages."""
    if re.fullmatch(r"[0-9]+", ref):
        run = db.get(Run, int(ref)) if int(ref) <= MAX_ID else None
        if run is None:
            raise HTTPException(404, f"no run numbered {ref} in this database")
        return run
    run = find_run(db, ref)
    if run is None:
        raise HTTPException(404, f"no run named '{ref}' in this database")
    return run


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"poll_seconds": POLL_SECONDS, **context}, status_code=status_code)


def _routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def runs_list(request: Request, db: Db):
        runs = shared.list_runs(db)
        batches = shared.keep_by_batch(db, [r.id for r in runs])
        numbers, interrupted = shared.figures(db, runs), shared.interrupted_runs(db, runs)
        rows = [
            {"run": r, "figures": numbers[r.id], "interrupted": interrupted.get(r.id), "sparkline": keep_rate_sparkline(batches.get(r.id, []))}
            for r in runs
        ]
        live = any(r.status == "running" and r.id not in interrupted for r in runs)
        return _page(request, "runs.html", rows=rows, training=queries.training_runs(db), poll=live)

    @app.get("/runs")
    def runs_alias():
        return RedirectResponse("/", status_code=307)

    @app.get("/training")
    def training_alias():
        return RedirectResponse("/#training", status_code=307)

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request, db: Db):
        refs = request.query_params.getlist("run")
        if not 2 <= len(refs) <= 4 or len(set(refs)) != len(refs):
            raise BadFilter(f"compare takes 2 to 4 different runs (run=ID&run=ID...), not {len(refs)}")
        runs = [_run_or_404(db, ref) for ref in refs]
        numbers = shared.figures(db, runs)
        reasons = {r.id: shared.rejected_by_reason(db, r) for r in runs}
        all_reasons = sorted({k for counts in reasons.values() for k in counts}, key=lambda k: -sum(c.get(k, 0) for c in reasons.values()))
        spread = [queries.distributions(db, r) for r in runs]
        thresholds = {report._threshold(r.config) for r in runs}
        lengths = overlaid_histograms([d.lengths for d in spread], runs, length_edges(max((n for d in spread for n in d.lengths), default=1)))
        similarities = overlaid_histograms([d.similarities for d in spread], runs, similarity_edges(), thresholds.pop() if len(thresholds) == 1 else None)
        loops = queries.loop_rounds(db, runs)
        return _page(
            request, "compare.html", runs=runs, figures=numbers, reasons=reasons, all_reasons=all_reasons,
            config=queries.config_differences([r.config for r in runs]), curves=keep_rate_curves(shared.keep_by_batch(db, [r.id for r in runs]), runs),
            spread=spread, lengths=lengths, similarities=similarities, loops=loops,
            loop_figures=shared.figures(db, [row.run for loop in loops for row in loop.rounds if row.run is not None]),
        )  # fmt: skip

    @app.get("/runs.json")
    def runs_json(db: Db):
        runs = shared.list_runs(db)
        numbers, interrupted = shared.figures(db, runs), shared.interrupted_runs(db, runs)
        return [shared.run_summary(r, numbers[r.id], interrupted.get(r.id)) for r in runs]

    @app.get("/runs/{ref}", response_class=HTMLResponse)
    def run_page(request: Request, ref: str, db: Db):
        run = _run_or_404(db, ref)
        interrupted = shared.interrupted_runs(db, [run]).get(run.id)
        live = run.status == "running" and interrupted is None
        if run.pipeline == "toolformer":
            return _toolformer(request, db, run, live, interrupted)
        item_filter = parse_filter(request.query_params, queries.SORT_KEYS)
        items = queries.item_page(db, run, item_filter)
        return _page(
            request, "run.html", run=run, items=items, page=items.page, by_hand=items.by_hand, figures=shared.figures(db, [run])[run.id], interrupted=interrupted,
            reasons=shared.rejected_by_reason(db, run), accepted_instances=shared.accepted_instances(db, run),
            filter=item_filter, sort_keys=queries.SORT_KEYS, training=queries.training_runs(db, run), poll=live,
            scores=queries.run_scores(db, run, [t.id for t in items.page.rows]),
            cost=cost.cost_dict(cost.run_usage(db, run), getattr(request.app.state, "prices", None)),
        )  # fmt: skip

    @app.get("/runs/{ref}/progress.json")
    def run_progress(ref: str, db: Db):
        run = _run_or_404(db, ref)
        return [shared.run_summary(run, shared.figures(db, [run])[run.id], shared.interrupted_runs(db, [run]).get(run.id))]

    @app.get("/runs/{ref}/items/{item_id}", response_class=HTMLResponse)
    def item_page(request: Request, ref: str, item_id: int, db: Db):
        run = _run_or_404(db, ref)
        lineage = queries.item_lineage(db, run, item_id) if 0 <= item_id <= MAX_ID else None
        if lineage is None:
            raise HTTPException(404, f"run '{run.name}' has no item {item_id}")
        diff = queries.word_diff(lineage.task.nearest, lineage.task.instruction) if lineage.task.nearest is not None else []
        return _page(request, "item.html", run=run, item=lineage, diff=diff, threshold=report._threshold(run.config), curator=request.app.state.curator)

    @app.get("/runs/{ref}/report", response_class=HTMLResponse)
    def report_page(request: Request, ref: str, db: Db):
        run = _run_or_404(db, ref)
        try:
            collected = _report(db, run)
        except BadInput as err:
            return _page(request, "report.html", run=run, summary=None, why=str(err))
        return _page(request, "report.html", run=run, summary=report.summary(collected), plots=list(report.PLOTS), why=None)

    @app.get("/runs/{ref}/plots/{name}")
    def plot(ref: str, name: str, db: Db):
        run = _run_or_404(db, ref)
        if name not in report.PLOTS:
            raise HTTPException(404, f"no plot named '{name}'; plots: {', '.join(report.PLOTS)}")
        try:
            png = _plot_png(db, run, name)
        except BadInput as err:
            raise HTTPException(404, str(err)) from None
        return Response(png, media_type="image/png")

    @app.get("/training/{training_id}", response_class=HTMLResponse)
    def training_page(request: Request, training_id: int, db: Db):
        row = _training_or_404(db, training_id)
        curve = (Path(row.out) / "loss_curve.png").is_file()
        return _page(request, "training.html", row=row, sources=queries.training_sources(db, row), curve=curve)

    @app.get("/training/{training_id}/loss_curve.png")
    def loss_curve(training_id: int, db: Db):
        path = Path(_training_or_404(db, training_id).out) / "loss_curve.png"
        if not path.is_file():
            raise HTTPException(404, f"no loss curve at {path} (the run has not finished, or its folder moved)")
        return FileResponse(path, media_type="image/png")


def _edit_routes(app: FastAPI) -> None:
    """Only with --allow-edits. A form post must come from the viewer's own pages (its Origin is this host): any other
    web page the browser has open could otherwise post here, since the server is on the user's own machine."""

    @app.post("/runs/{ref}/items/{item_id}/verdicts")
    async def give_verdict(request: Request, ref: str, item_id: int, db: Db):
        origin = request.headers.get("origin")
        if origin is None or urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "edits are accepted only from the viewer's own pages (the Origin header must be this server)")
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        verdict = form.get("verdict", ["rejected"])[0]
        reason = " ".join(form.get("reason", [""])[0].split())
        curator = " ".join(form.get("curator", [""])[0].split()) or request.app.state.curator
        if verdict not in ("rejected", "restored"):
            raise HTTPException(400, f"verdict must be rejected or restored, not '{verdict}'")
        if not reason and verdict == "rejected":
            raise HTTPException(400, "a manual rejection needs a reason")
        run = _run_or_404(db, ref)
        lineage = queries.item_lineage(db, run, item_id) if 0 <= item_id <= MAX_ID else None
        if lineage is None:
            raise HTTPException(404, f"run '{run.name}' has no item {item_id}")
        with _VERDICTS:
            try:
                queries.give_verdict(db, lineage.task, verdict, reason or "undo", curator)
            except queries.VerdictConflict as err:
                raise HTTPException(409, str(err)) from None
        return RedirectResponse(f"/runs/{run.id}/items/{item_id}", status_code=303)


_VERDICTS = threading.Lock()
"""One manual verdict at a time in this server (the threadpool runs requests in parallel): check-then-insert is atomic."""


def _toolformer(request: Request, db: Session, run: Run, live: bool, interrupted) -> HTMLResponse:
    params = {k: v for k, v in request.query_params.items() if k in ("after", "before")}
    if set(request.query_params) - set(params):
        raise BadFilter(f"a Toolformer run's page takes only after and before, not '{sorted(set(request.query_params) - set(params))[0]}'")
    item_filter = parse_filter(params)
    page, calls = queries.toolformer_page(db, run, item_filter.after, item_filter.before)
    return _page(
        request, "toolformer.html", run=run, page=page, calls=calls, call_counts=queries.api_call_counts(db, run),
        interrupted=interrupted, poll=live,
    )  # fmt: skip


def _training_or_404(db: Session, training_id: int) -> TrainingRun:
    row = db.get(TrainingRun, training_id) if 0 <= training_id <= MAX_ID else None
    if row is None:
        raise HTTPException(404, f"no training run numbered {training_id} in this database")
    return row


def _report(db: Session, run: Run) -> report.RunReport:
    return _cached((str(db.get_bind().url), run.id, run.updated_at.isoformat(), _last_verdict(db, run)), lambda: report.collect(db, run.id))


def _plot_png(db: Session, run: Run, name: str) -> bytes:
    def draw() -> bytes:
        buffer = io.BytesIO()
        report.PLOTS[name](_report(db, run), buffer)
        return buffer.getvalue()

    return _cached((str(db.get_bind().url), run.id, run.updated_at.isoformat(), _last_verdict(db, run), name), draw)


def _last_verdict(db: Session, run: Run) -> int | None:
    """The newest hand verdict on the run's items: a verdict changes the report without touching the run's row."""
    return db.exec(select(func.max(ManualVerdict.id)).join(Task, Task.id == ManualVerdict.task_id).where(Task.run_id == run.id)).one()


_CACHE: dict[tuple, Any] = {}
"""datagen report's numbers and plots per (database, run, last update, plot): a report page's six plots read the
store once, and a finished run's plots are drawn once."""


def _cached(key: tuple, make):
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def _error_pages(app: FastAPI) -> None:
    def page(request: Request, status: int, message: str) -> Response:
        if request.url.path.endswith((".json", ".png")):
            return JSONResponse({"error": message}, status_code=status)
        return _page(request, "error.html", status_code=status, status=status, message=message)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, err: HTTPException):
        message = err.detail if err.status_code != 404 or err.detail != "Not Found" else f"no page at {request.url.path}"
        return page(request, err.status_code, message)

    @app.exception_handler(BadFilter)
    def bad_filter(request: Request, err: BadFilter):
        return page(request, 400, f"bad filter: {err}")

    @app.exception_handler(RequestValidationError)
    def bad_path(request: Request, err: RequestValidationError):
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
        return page(request, 400, f"bad {where}: {problem.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    def failure(request: Request, err: Exception):
        return page(request, 500, f"the viewer failed on this page ({type(err).__name__}); the server's log has the details")
