"""The viewer's routes: each reads through storage.queries or datagen.ui.queries and renders one template.

Read-only unless started with --allow-edits, which adds one POST route: reject an item by hand (a ManualVerdict
row). Errors are pages, never tracebacks: an unknown run or item is a 404, a bad filter or path a 400 naming the
parameter, anything else a 500 that names only the error's type.
When bound to 127.0.0.1 the app refuses requests whose Host header is not local (a DNS-rebinding page in the
browser could otherwise read the store through it).
"""

from __future__ import annotations

import io
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
from sqlmodel import Session
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from datagen import report
from datagen.errors import BadInput
from datagen.ui import queries
from datagen.ui.filters import BadFilter, parse_filter
from datagen.ui.sparkline import keep_rate_sparkline
from storage import queries as shared
from storage.store import get_run
from storage.tables import Run, TrainingRun

HERE = Path(__file__).parent
LOCAL_HOSTS = ["127.0.0.1", "localhost"]
POLL_SECONDS = 2
"""How often a page showing a running run asks for fresh counters."""

templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))
"""autoescape on every template: instructions and completions are model output and may contain HTML."""


def create_app(engine: Engine, local_only: bool = True, curator: str | None = None) -> FastAPI:
    """The viewer over `engine`. local_only: accept only requests addressed to 127.0.0.1 or localhost. curator: allow
    edits (manual rejections), recorded under this name unless the form gives another; None keeps the viewer read-only."""
    app = FastAPI(title="datagen ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.curator = curator
    if local_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOCAL_HOSTS)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _routes(app)
    if curator is not None:
        _edit_routes(app)
    _error_pages(app)
    return app


def session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as db:
        yield db


Db = Annotated[Session, Depends(session)]


def _run_or_404(db: Session, ref: str) -> Run:
    try:
        return get_run(db, ref)
    except BadInput as err:
        raise HTTPException(404, str(err)) from None


def keep_rate(accepted: int, rejected: int) -> float | None:
    return accepted / (accepted + rejected) if accepted + rejected else None


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"poll_seconds": POLL_SECONDS, **context}, status_code=status_code)


def _routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def runs_list(request: Request, db: Db):
        runs = shared.list_runs(db)
        batches = shared.keep_by_batch(db, [r.id for r in runs])
        rows = [
            {"run": r, "keep_rate": keep_rate(r.accepted, r.rejected), "sparkline": keep_rate_sparkline(batches.get(r.id, []))}
            for r in runs
        ]
        running = any(r.status == "running" for r in runs)
        return _page(request, "runs.html", rows=rows, training=queries.training_runs(db), poll="/runs.json" if running else None)

    @app.get("/runs.json")
    def runs_json(db: Db):
        return [shared.run_summary(r) | {"keep_rate": keep_rate(r.accepted, r.rejected)} for r in shared.list_runs(db)]

    @app.get("/runs/{ref}", response_class=HTMLResponse)
    def run_page(request: Request, ref: str, db: Db):
        run = _run_or_404(db, ref)
        if run.pipeline == "toolformer":
            return _toolformer(request, db, run)
        item_filter = parse_filter(request.query_params)
        page = queries.item_page(db, run, item_filter)
        return _page(
            request, "run.html", run=run, keep_rate=keep_rate(run.accepted, run.rejected),
            reasons=shared.rejected_by_reason(db, run), accepted_instances=shared.accepted_instances(db, run),
            filter=item_filter, page=page, training=queries.training_runs(db, run),
            poll=f"/runs/{run.id}/progress.json" if run.status == "running" else None,
        )  # fmt: skip

    @app.get("/runs/{ref}/progress.json")
    def run_progress(ref: str, db: Db):
        run = _run_or_404(db, ref)
        return [shared.run_summary(run) | {"keep_rate": keep_rate(run.accepted, run.rejected)}]

    @app.get("/runs/{ref}/items/{item_id}", response_class=HTMLResponse)
    def item_page(request: Request, ref: str, item_id: int, db: Db):
        run = _run_or_404(db, ref)
        lineage = queries.item_lineage(db, run, item_id)
        if lineage is None:
            raise HTTPException(404, f"run '{run.name}' has no item {item_id}")
        return _page(request, "item.html", run=run, item=lineage, threshold=report._threshold(run.config), curator=request.app.state.curator)

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
    async def reject_item(request: Request, ref: str, item_id: int, db: Db):
        origin = request.headers.get("origin")
        if origin is None or urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "edits are accepted only from the viewer's own pages (the Origin header must be this server)")
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        reason = " ".join(form.get("reason", [""])[0].split())
        curator = " ".join(form.get("curator", [""])[0].split()) or request.app.state.curator
        if not reason:
            raise HTTPException(400, "a manual rejection needs a reason")
        run = _run_or_404(db, ref)
        lineage = queries.item_lineage(db, run, item_id)
        if lineage is None:
            raise HTTPException(404, f"run '{run.name}' has no item {item_id}")
        queries.reject_by_hand(db, lineage.task, reason, curator)
        return RedirectResponse(f"/runs/{run.id}/items/{item_id}", status_code=303)


def _toolformer(request: Request, db: Session, run: Run) -> HTMLResponse:
    params = {k: v for k, v in request.query_params.items() if k in ("after", "before")}
    if set(request.query_params) - set(params):
        raise BadFilter(f"a Toolformer run's page takes only after and before, not '{sorted(set(request.query_params) - set(params))[0]}'")
    item_filter = parse_filter(params)
    page, calls = queries.toolformer_page(db, run, item_filter.after, item_filter.before)
    return _page(
        request, "toolformer.html", run=run, page=page, calls=calls, call_counts=queries.api_call_counts(db, run),
        poll=f"/runs/{run.id}/progress.json" if run.status == "running" else None,
    )  # fmt: skip


def _training_or_404(db: Session, training_id: int) -> TrainingRun:
    row = db.get(TrainingRun, training_id)
    if row is None:
        raise HTTPException(404, f"no training run numbered {training_id} in this database")
    return row


def _report(db: Session, run: Run) -> report.RunReport:
    return _cached((str(db.get_bind().url), run.id, run.updated_at.isoformat()), lambda: report.collect(db, run.id))


def _plot_png(db: Session, run: Run, name: str) -> bytes:
    def draw() -> bytes:
        buffer = io.BytesIO()
        report.PLOTS[name](_report(db, run), buffer)
        return buffer.getvalue()

    return _cached((str(db.get_bind().url), run.id, run.updated_at.isoformat(), name), draw)


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
