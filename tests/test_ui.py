"""`datagen ui`: the filters, verdicts and sparkline (pure, exact); every page over a real store (SQLite and PostgreSQL)
filled by a real Self-Instruct run of the embedded model, checked against the store; errors as 404/400 pages; the Host
check; escaping; keyset paging and the render time of a run page with 100k items."""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel, select
from starlette.testclient import TestClient
from typer.testing import CliRunner

from datagen.cli import app as cli
from datagen.cli.commands.ui import allowed_host_names, browse_url, is_loopback
from datagen.ui.app import create_app
from datagen.ui.filters import BadFilter, ItemFilter, parse_filter
from datagen.ui.queries import Verdict, filter_verdicts
from datagen.ui.sparkline import keep_rate_sparkline
from pipelines import bootstrap
from pipelines import self_instruct as si
from storage.queries import figures
from storage.store import get_run, open_engine
from storage.tables import Generation, Instance, ManualVerdict, Run, RunLock, Task, TrainingRun, TrainingRunSource
from tests.conftest import SEEDS
from tests.example_runs import build_run, build_toolformer_run
from tests.test_self_instruct import SEED_TASKS, SMALL, ScriptedBackend, listing

runner = CliRunner()
LOCAL = "http://127.0.0.1:8765"
XSS = "Explain what <script>window.__pwned = 1</script> does when a browser loads a web page."


# ---- pure parts ----------------------------------------------------------------------------------------------------


def test_parse_filter_reads_the_form():
    f = parse_filter({"status": "rejected", "reason": "rouge_similarity", "min_similarity": "0.5", "max_similarity": "",
                      "classification": "no", "q": " cat ", "after": "120"})  # fmt: skip
    assert f == ItemFilter("rejected", "rouge_similarity", 0.5, None, "no", "cat", 120, None)
    assert f.query(after=140) == {"status": "rejected", "reason": "rouge_similarity", "min_similarity": "0.5",
                                  "classification": "no", "q": "cat", "after": "140"}  # fmt: skip
    assert parse_filter({}) == ItemFilter() and ItemFilter().query() == {}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"status": "maybe"}, "status must be one of all, accepted, rejected, not 'maybe'"),
        ({"classification": "perhaps"}, "classification must be one of all, yes, no, unknown, not 'perhaps'"),
        ({"min_similarity": "high"}, "min_similarity must be a number between 0 and 1, not 'high'"),
        ({"max_similarity": "1.5"}, "max_similarity must be between 0 and 1 (ROUGE-L F), not 1.5"),
        ({"min_similarity": "0.8", "max_similarity": "0.2"}, "min_similarity 0.8 is above max_similarity 0.2"),
        ({"after": "-3"}, "after must be an item id (a whole number up to 2147483647), not '-3'"),
        ({"after": "3", "before": "9"}, "give after or before, not both"),
        ({"colour": "red"}, "unknown filter 'colour'"),
    ],
)
def test_bad_filters_name_the_parameter(params, message):
    with pytest.raises(BadFilter) as err:
        parse_filter(params)
    assert str(err.value) == message


def test_filter_verdicts_follow_the_pipelines_order():
    assert filter_verdicts("self-instruct", "accepted", None) == [
        Verdict(s, "passed") for s in ("parse", "heuristic filters", "ROUGE-L similarity", "target not yet reached", "instances")
    ]
    assert filter_verdicts("self-instruct", "rejected", "blacklist:image") == [
        Verdict("parse", "passed"), Verdict("heuristic filters", "failed", "blacklist:image"), Verdict("ROUGE-L similarity", "not run"),
        Verdict("target not yet reached", "not run"), Verdict("instances", "not run"),
    ]  # fmt: skip
    assert [v.outcome for v in filter_verdicts("alpaca", "rejected", "target_reached")] == ["passed"] * 4 + ["failed"]
    assert [v.outcome for v in filter_verdicts("self-instruct", "rejected", "target_reached")] == ["passed"] * 3 + ["failed", "not run"]
    assert filter_verdicts("alpaca", "rejected", "malformed_record")[0] == Verdict("parse", "failed", "malformed_record")
    assert filter_verdicts("self-instruct", "rejected", "by hand") == [Verdict("other", "failed", "by hand")]


def test_sparkline_points():
    line = keep_rate_sparkline([(0, 3, 1), (1, 0, 4), (2, 4, 0)])
    assert line.points == "2.0,7.0 60.0,22.0 118.0,2.0"
    assert line.title == "keep rate per batch over 3 batches: first 75%, min 0%, max 100%, last 100%"
    assert keep_rate_sparkline([(0, 1, 1)]).points == "2.0,12.0 118.0,12.0"
    assert keep_rate_sparkline([]) is None


# ---- stores --------------------------------------------------------------------------------------------------------


@functools.cache
def real_run_store(root: Path) -> str:
    """A SQLite store with one real Self-Instruct run of the embedded model ("real", 3 instructions), built once per
    test session and shared by the route and browser tests (which copy it, never write to it)."""
    url = f"sqlite:///{root / 'real.db'}"
    args = ["self-instruct", "--seeds", str(SEEDS), "-n", "3", "--run", "real", "--db", url, *SMALL, "--json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return url


def copy_store(source: str, target: str) -> None:
    """Every row of every table from one store into another (empty) one, ids kept."""
    source_engine, target_engine = open_engine(source), open_engine(target)
    with source_engine.connect() as read, target_engine.begin() as write:
        for table in SQLModel.metadata.sorted_tables:
            if table.name == "schema_info":
                continue
            rows = [dict(row._mapping) for row in read.execute(table.select())]
            if rows:
                write.execute(table.insert(), rows)
        if target_engine.dialect.name == "postgresql":  # ids were given, so move each sequence past them
            for table in SQLModel.metadata.sorted_tables:
                if "id" in table.c and table.c.id.autoincrement is not False and table.c.id.primary_key:
                    write.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                       f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))  # fmt: skip


def fresh_postgres_database(server_url: str) -> str:
    """A new empty database on the test server, so these tests share nothing with the other PostgreSQL tests."""
    name = f"ui_{uuid.uuid4().hex[:12]}"
    with open_engine(server_url).execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def add_script_run(url: str) -> Run:
    """A Self-Instruct run on a scripted backend whose one new instruction carries a <script> element."""
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1)
    with Session(open_engine(url)) as session:
        run = Run(name="xss", pipeline="self-instruct", config=bootstrap.config_dict(config), model="scripted", backend="scripted")
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, SEED_TASKS)
        session.commit()
        si.run(session, run, ScriptedBackend([listing(XSS)]), config)
        session.refresh(run)
        return run


def fill_items(url: str, name: str, items: int, status: str = "completed") -> Run:
    """A run with `items` generated instructions written in bulk (for paging): batches of 1,000 from one generation each;
    every third rejected (reasons cycling), similarity (i % 100) / 100, classification alternating yes/no."""
    reasons = ("rouge_similarity", "too_short", "target_reached")
    now = datetime.now(timezone.utc)
    with Session(open_engine(url)) as session:
        run = Run(name=name, pipeline="self-instruct", config={"rouge_threshold": 0.7}, model="scripted", backend="scripted", status=status)
        session.add(run)
        session.flush()
        rows = []
        for batch in range((items + 999) // 1000):
            generation = Generation(run_id=run.id, purpose="instructions", batch=batch, prompt="Come up with a series of tasks:",
                                    completion="...", finish_reason="stop", model="scripted", backend="scripted",
                                    prompt_tokens=5, completion_tokens=1, latency_s=0.0)  # fmt: skip
            session.add(generation)
            session.flush()
            for i in range(batch * 1000, min(items, (batch + 1) * 1000)):
                rejected = i % 3 == 2
                rows.append({"run_id": run.id, "generation_id": generation.id, "source": "generated",
                             "instruction": f"Describe the number {i} in words and say why it is interesting.",
                             "is_classification": i % 2 == 0, "status": "rejected" if rejected else "accepted",
                             "reason": reasons[(i // 3) % 3] if rejected else None, "nearest": "Describe a number.",
                             "similarity": (i % 100) / 100, "created_at": now})  # fmt: skip
        session.execute(insert(Task), rows)
        run.generated = run.requests = items
        run.rejected = sum(r["status"] == "rejected" for r in rows)
        run.accepted = items - run.rejected
        session.add(run)
        session.commit()
        session.refresh(run)
        return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url: str) -> TestClient:
    return TestClient(create_app(open_engine(url)), base_url=LOCAL, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def real_sqlite(tmp_path_factory) -> str:
    shared = real_run_store(tmp_path_factory.getbasetemp())
    url = f"sqlite:///{tmp_path_factory.mktemp('ui_sqlite') / 'datagen.db'}"
    copy_store(shared, url)
    return url


@pytest.fixture(scope="module")
def real_postgres(tmp_path_factory, postgres_url) -> str:
    url = fresh_postgres_database(postgres_url)
    copy_store(real_run_store(tmp_path_factory.getbasetemp()), url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request) -> str:
    return request.getfixturevalue(f"real_{request.param}")


def page_text(html: str) -> str:
    """What a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def item_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td><a href="/runs/\d+/items/(\d+)">', html)]


# ---- pages over a real run -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_list_shows_the_runs_counters(store):
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
    html = client(store).get("/").text
    shown = page_text(html)
    with Session(open_engine(store)) as session:
        f = figures(session, [run])[run.id]
    assert f"{run.id} real self-instruct smollm2-135m (transformers) completed {run.requests} {run.generated} {f.instructions} {f.accepted} " \
           f"{f.rejected} {f.not_judged} {run.instances} {round(100 * f.accepted / (f.accepted + f.rejected))}%" in shown  # fmt: skip
    assert re.search(r'<svg class="spark"[^>]*><title>keep rate per batch over \d+ batch', html)
    assert "data-poll" not in html  # nothing is running: no polling


@pytest.mark.slow
def test_run_page_filters_match_the_store(store):
    web = client(store)
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
        tasks = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()
    html = web.get(f"/runs/{run.id}").text
    assert item_ids(html) == [t.id for t in tasks][:50]
    assert f"{len(tasks)} matching instructions" in page_text(html)
    assert f"accepted instances {run.instances}" in page_text(html)  # the seed tasks' own instances are not counted
    reasons = {t.reason for t in tasks if t.status == "rejected"}
    assert reasons, "the real run rejected nothing"
    for reason in reasons:
        html = web.get(f"/runs/real?status=rejected&reason={reason}").text
        assert item_ids(html) == [t.id for t in tasks if t.reason == reason]
    assert item_ids(web.get(f"/runs/{run.id}?status=accepted").text) == [t.id for t in tasks if t.status == "accepted"]
    scored = [t for t in tasks if t.similarity is not None and 0.2 <= t.similarity <= 0.6]
    assert item_ids(web.get(f"/runs/{run.id}?min_similarity=0.2&max_similarity=0.6").text) == [t.id for t in scored]
    word = tasks[0].instruction.split()[1]
    expected = [t.id for t in tasks if word.lower() in t.instruction.lower()]
    assert item_ids(web.get(f"/runs/{run.id}", params={"q": word.upper()}).text) == expected
    assert item_ids(web.get(f"/runs/{run.id}?classification=unknown").text) == [t.id for t in tasks if t.is_classification is None]


@pytest.mark.slow
def test_item_page_shows_the_lineage(store):
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
        accepted = select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted")
        task = session.exec(accepted.order_by(Task.id)).first()
        generation = session.get(Generation, task.generation_id)
        instances = session.exec(select(Instance).where(Instance.task_id == task.id)).all()
        instance_call = session.get(Generation, instances[0].generation_id)
        siblings = session.exec(select(Task.instruction).where(Task.generation_id == generation.id).order_by(Task.id)).all()
    html = client(store).get(f"/runs/{run.id}/items/{task.id}").text
    assert f'<pre class="prompt">{escape(generation.prompt)}</pre>' in html
    assert f'<pre class="completion">{escape(generation.completion)}</pre>' in html
    assert f'<pre class="completion">{escape(instance_call.completion)}</pre>' in html
    assert f'<pre class="nearest">{escape(task.nearest)}</pre>' in html and f"ROUGE-L F <strong>{task.similarity:.3f}</strong>" in html
    shown = page_text(html)
    assert "(threshold 0.7: above it is rejected)" in shown
    for instance in instances:
        assert escape(instance.output) in html
    assert all(escape(s) in html for s in siblings)
    assert "ROUGE-L similarity passed" in shown and "instances passed" in shown
    assert re.search(r"Classification: (yes|no)", shown)  # the "Is it classification?" call was found
    nearest_link = re.search(r'href="/runs/\d+/items/(\d+)">item \d+</a> \((seed|generated)[,)]', html)
    assert nearest_link, "the nearest instruction should link to its row"
    with Session(open_engine(store)) as session:
        assert session.get(Task, int(nearest_link.group(1))).instruction == task.nearest


def escape(value: str) -> str:
    from markupsafe import escape as markup_escape

    return str(markup_escape(value))


@pytest.mark.slow
def test_report_page_draws_the_reports_plots(store):
    web = client(store)
    html = web.get("/runs/real/report").text
    names = re.findall(r'<img src="(/runs/\d+/plots/[a-z_]+\.png)"', html)
    assert len(names) == 6
    for name in names:
        response = web.get(name)
        assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n" and len(response.content) > 5000


@pytest.mark.slow
def test_bad_requests_are_pages_not_tracebacks(store):
    web = client(store)
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
    cases = [
        ("/runs/nope", 404, "no run named 'nope' in this database"),
        (f"/runs/{run.id}/items/999999", 404, "run 'real' has no item 999999"),
        (f"/runs/{run.id}/items/abc", 400, "bad item_id: Input should be a valid integer"),
        (f"/runs/{run.id}?min_similarity=high", 400, "bad filter: min_similarity must be a number between 0 and 1, not 'high'"),
        (f"/runs/{run.id}?status=maybe", 400, "bad filter: status must be one of all, accepted, rejected, not 'maybe'"),
        (f"/runs/{run.id}/plots/nothing.png", 404, "no plot named 'nothing.png'"),
        ("/training/7", 404, "no training run numbered 7 in this database"),
        ("/no/such/page", 404, "no page at /no/such/page"),
    ]
    for path, status, message in cases:
        response = web.get(path)
        assert response.status_code == status, path
        assert message in unescape(response.text) and "Traceback" not in response.text, path


# ---- pages over scripted stores ------------------------------------------------------------------------------------


def test_host_header_must_be_local(db_url):
    web = client(db_url)
    assert web.get("/").status_code == 200
    assert web.get("/", headers={"host": "localhost:8765"}).status_code == 200
    refused = web.get("/", headers={"host": "attacker.example:8765"})
    assert refused.status_code == 400 and refused.text == "Invalid host header"
    lan = TestClient(create_app(open_engine(db_url), allowed_hosts=("localhost", "datagen.lan")), base_url="http://datagen.lan:8765")
    assert lan.get("/").status_code == 200


@pytest.mark.parametrize("host", ["::1", "0.0.0.0", "::", "192.0.2.7"])
def test_host_check_holds_on_every_address(db_url, host):
    """--host ::1 and 0.0.0.0 used to skip the Host check: a rebinding page (Host: its own domain) could read the
    store and, with --allow-edits, write a verdict with an Origin equal to that Host."""
    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=4)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated")).first()
    app = create_app(open_engine(db_url), allowed_hosts=allowed_host_names(host, []), curator="ana")
    web = TestClient(app, base_url="http://evil.example:8765", raise_server_exceptions=False)
    assert web.get("/").status_code == 400
    forged = web.post(f"/runs/{run.id}/items/{task.id}/verdicts", data={"reason": "x"}, headers={"origin": "http://evil.example:8765"})
    assert forged.status_code == 400
    with Session(open_engine(db_url)) as session:
        assert session.exec(select(ManualVerdict)).all() == []
    for good in ("[::1]:8765", "127.0.0.1:8765", "localhost", "[2001:db8::5]", "192.0.2.7:80"):
        assert web.get("/", headers={"host": good}).status_code == 200, good
    for bad in ("::1", "[::1", "evil.example.", "", "a b"):
        assert web.get("/", headers={"host": bad}).status_code == 400, bad
    if not is_loopback(host):  # serving the network: the machine's own name is fine
        assert web.get("/", headers={"host": f"{socket.gethostname()}:8765"}).status_code == 200


def test_printed_url_is_valid_for_ipv6():
    assert browse_url("::1", 8765) == "http://[::1]:8765/"
    assert browse_url("::", 80) == "http://[::1]:80/"
    assert browse_url("0.0.0.0", 80) == "http://127.0.0.1:80/"
    assert browse_url("127.0.0.1", 8765) == "http://127.0.0.1:8765/"
    assert browse_url("datagen.lan", 8765) == "http://datagen.lan:8765/"
    assert allowed_host_names("127.0.0.1", []) == ("localhost",)
    assert allowed_host_names("::1", ["Viewer.Lab"]) == ("localhost", "viewer.lab")
    assert "datagen.lan" in allowed_host_names("datagen.lan", [])


def test_pages_refuse_to_be_framed(db_url):
    web = client(db_url)
    for path in ("/", "/no/such/page", "/static/style.css"):
        response = web.get(path)
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'", path


def test_run_named_like_an_id_does_not_take_over_links(db_url):
    with Session(open_engine(db_url)) as session:
        first = build_run(session, "first", tasks=4)
        impostor = build_run(session, str(first.id), tasks=4)
        task = session.exec(select(Task).where(Task.run_id == first.id, Task.source == "generated")).first()
    web = client(db_url)
    assert "<h1>first " in web.get(f"/runs/{first.id}").text
    assert web.get(f"/runs/{first.id}/items/{task.id}").status_code == 200
    assert f"<h1>{first.id} " in web.get(f"/runs/{impostor.id}").text
    assert web.get("/runs/first").status_code == 200  # a name typed by hand still works


def test_ids_out_of_range_are_4xx_not_500(store_url):
    db_url = store_url
    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=4)
    web = client(db_url)
    huge = str(2**31)  # PostgreSQL's integer keys end at 2^31-1: a larger number there is an error, not a miss
    cases = [
        (f"/runs/{huge}", 404), (f"/runs/{run.id}/items/{huge}", 404), (f"/training/{huge}", 404),
        (f"/training/{huge}/loss_curve.png", 404), (f"/runs/{run.id}/items/-1", 404),
        (f"/runs/{run.id}?after={huge}", 400), (f"/runs/{run.id}?before={huge}", 400), (f"/runs/{run.id}?after=²", 400),
        (f"/runs/{run.id}?after=１", 400), (f"/runs/{run.id}?before=3.0", 400), (f"/runs/{huge}/progress.json", 404),
        (f"/runs/{2**63}", 404), (f"/runs/{run.id}?sort=similarity&after={huge}", 400), (f"/runs/{run.id}/items/{2**40}", 404),
    ]  # fmt: skip
    for path, status in cases:
        response = web.get(path)
        assert response.status_code == status, (path, response.status_code, response.text[:300])
    assert "after must be an item id (a whole number up to 2147483647), not '²'" in unescape(web.get(f"/runs/{run.id}?after=²").text)


def test_paging_past_either_end_links_back(db_url):
    run = fill_items(db_url, "many", 120)
    web = client(db_url)
    with Session(open_engine(db_url)) as session:
        ids = session.exec(select(Task.id).where(Task.run_id == run.id).order_by(Task.id)).all()
    past_end = web.get(f"/runs/{run.id}?after={ids[-1]}").text
    assert item_ids(past_end) == [] and 'rel="next"' not in past_end
    back = re.search(r'<a rel="prev" href="\?([^"]+)"', past_end)
    assert back and item_ids(web.get(f"/runs/{run.id}?" + unescape(back.group(1))).text) == list(ids[-50:])
    before_start = web.get(f"/runs/{run.id}?before={ids[0]}").text
    assert item_ids(before_start) == [] and 'rel="prev"' not in before_start
    forward = re.search(r'<a rel="next" href="\?([^"]+)"', before_start)
    assert forward and item_ids(web.get(f"/runs/{run.id}?" + unescape(forward.group(1))).text) == list(ids[:50])
    last = web.get(f"/runs/{run.id}?after={ids[69]}").text
    assert item_ids(last) == list(ids[70:]) and 'rel="next"' not in last and 'rel="prev"' in last


def test_breadcrumb_targets_exist(db_url):
    web = client(db_url)
    for path in ("/runs", "/training"):
        response = web.get(path)
        assert response.status_code == 200 and "<h1>Runs</h1>" in response.text, path


def test_model_output_is_escaped(db_url):
    run = add_script_run(db_url)
    web = client(db_url)
    with Session(open_engine(db_url)) as session:
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.instruction == XSS)).one()
    for path in (f"/runs/{run.id}", f"/runs/{run.id}/items/{task.id}", f"/runs/{run.id}?q=<script>"):
        html = web.get(path).text
        assert "<script>window" not in html and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html, path


def test_item_of_another_run_is_404(db_url):
    with Session(open_engine(db_url)) as session:
        build_run(session, "one", tasks=4)
        other = build_run(session, "two", tasks=4)
        task = session.exec(select(Task).where(Task.run_id == other.id, Task.source == "generated")).first()
    assert client(db_url).get(f"/runs/one/items/{task.id}").status_code == 404
    assert client(db_url).get(f"/runs/two/items/{task.id}").status_code == 200


def test_keyset_paging_walks_every_item_once(db_url):
    run = fill_items(db_url, "many", 1234)
    web = client(db_url)
    seen, path = [], f"/runs/{run.id}?status=rejected"
    while path:
        html = web.get(path).text
        seen += item_ids(html)
        found = re.search(r'<a rel="next" href="([^"]+)"', html)
        path = f"/runs/{run.id}" + unescape(found.group(1)) if found else None
    with Session(open_engine(db_url)) as session:
        expected = session.exec(select(Task.id).where(Task.run_id == run.id, Task.status == "rejected").order_by(Task.id)).all()
    assert seen == list(expected) and len(seen) == 411
    back = web.get(f"/runs/{run.id}?status=rejected&before={expected[100]}").text
    assert item_ids(back) == list(expected[50:100]) and 'rel="prev"' in back and 'rel="next"' in back
    first = web.get(f"/runs/{run.id}?status=rejected&before={expected[50]}").text
    assert item_ids(first) == list(expected[:50]) and 'rel="prev"' not in first


@pytest.mark.slow
def test_a_run_page_with_100k_items_renders_fast(db_url, capsys):
    run = fill_items(db_url, "huge", 100_000)
    web = client(db_url)
    with Session(open_engine(db_url)) as session:
        last_ids = session.exec(select(Task.id).where(Task.run_id == run.id).order_by(Task.id.desc()).limit(60)).all()
    timings = {}
    for label, path in [
        ("first page", f"/runs/{run.id}"),
        ("last pages (after=)", f"/runs/{run.id}?after={last_ids[-1]}"),
        ("rejected, one reason", f"/runs/{run.id}?status=rejected&reason=too_short"),
        ("ROUGE-L 0.9-1 and text search", f"/runs/{run.id}?min_similarity=0.9&q=number 9"),
        ("sorted by ROUGE-L, descending, a later page", f"/runs/{run.id}?sort=similarity&order=desc&after={last_ids[-1]}"),
    ]:
        web.get(path)  # warm the connection pool and the page cache
        started = time.perf_counter()
        response = web.get(path)
        timings[label] = time.perf_counter() - started
        assert response.status_code == 200 and item_ids(response.text)
    with capsys.disabled():
        print("\nrun page, 100k items: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert max(timings.values()) < 3.0, timings  # the shared 2-core machine; ~0.1-0.3 s on a quiet one


def test_toolformer_run_shows_calls_and_losses(db_url):
    with Session(open_engine(db_url)) as session:
        run = build_toolformer_run(session)
    html = client(db_url).get(f"/runs/{run.id}").text
    shown = page_text(html)
    assert "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed the test." in shown
    assert "calculator 34 Calculator(400 / 1400) 0.29 0.200 2.000 1.000 1.000 kept inserted" in shown
    assert "calculator 34 Calculator(1 + 1) 2 0.200 1.100 1.000 0.100 rejected" in shown
    assert "Sampled API calls by verdict: rejected 6, unparsed 6, kept 5." in shown


def test_training_run_shows_its_loss_curve_and_sources(db_url, tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    shutil.copy(Path(__file__).parents[1] / "examples" / "report" / "counts.png", out / "loss_curve.png")
    with Session(open_engine(db_url)) as session:
        source = build_run(session, "data", tasks=4)
        row = TrainingRun(name="lora-1", method="lora", model="smollm2-135m", dataset=str(tmp_path / "export"), dataset_format="alpaca",
                          dataset_runs=["data"], out=str(out), status="completed", steps=12, train_loss=1.5, eval_loss=1.7,
                          summary={"steps": 12, "final_train_loss": 1.5})  # fmt: skip
        session.add(row)
        session.flush()
        session.add(TrainingRunSource(training_run_id=row.id, run_id=source.id))
        session.commit()
        row_id, source_id = row.id, source.id
    web = client(db_url)
    assert "lora-1 lora smollm2-135m completed 12 1.500 1.700" in page_text(web.get("/").text)
    html = web.get(f"/training/{row_id}").text
    assert f'<a href="/runs/{source_id}">data</a>' in html and f'<img src="/training/{row_id}/loss_curve.png"' in html
    assert web.get(f"/training/{row_id}/loss_curve.png").content == (out / "loss_curve.png").read_bytes()
    assert f'href="/training/{row_id}">lora-1</a>' in web.get(f"/runs/{source_id}").text
    (out / "loss_curve.png").unlink()
    assert "No loss curve in" in web.get(f"/training/{row_id}").text
    assert web.get(f"/training/{row_id}/loss_curve.png").status_code == 404


def test_running_run_is_polled(db_url):
    run = fill_items(db_url, "live", 10, status="running")
    web = client(db_url)
    html = web.get(f"/runs/{run.id}").text
    assert 'data-poll="live"' in html and '<script src="/static/progress.js"></script>' in html
    for live in ('id="live-state" data-live', 'id="count" data-live', 'id="items" data-live', 'id="reasons" data-live'):
        assert live in html  # the parts the poll swaps in together
    assert f'data-run="{run.id}" data-field="accepted">{run.accepted}<' in html
    with Session(open_engine(db_url)) as session:
        row = session.get(Run, run.id)
        for k in range(5):
            session.add(Task(run_id=run.id, source="generated", instruction=f"Name {k} colours.", status="accepted"))
        row.accepted += 5
        row.updated_at = row.updated_at + timedelta(seconds=1)
        session.add(row)
        session.commit()
    progress = web.get(f"/runs/{run.id}/progress.json").json()
    assert progress[0]["accepted"] == run.accepted + 5 and progress[0]["status"] == "running"
    assert progress[0]["updated_at"].endswith("+00:00")  # times carry their zone
    assert "fresh.getElementById(part.id)" in web.get("/static/progress.js").text
    assert "data-poll" not in web.get(f"/runs/{fill_items(db_url, 'done', 3).id}").text


def test_a_run_whose_writer_is_gone_shows_interrupted(store_url):
    """A writer killed -9 leaves its run "running" and its lock row with a stale heartbeat (storage/run_lock.py): the
    viewer, `runs list` and `runs show` say interrupted, since when, and how to resume; a fresh heartbeat is running."""
    with Session(open_engine(store_url)) as session:
        dead = build_run(session, "dead", tasks=4)
        alive = build_run(session, "alive", tasks=4)
        for run in (dead, alive):
            run.status = "running"
            session.add(run)
        beat = time.time() - 3600
        session.add(RunLock(run_name="dead", holder="pid 4242 on box", host="box", pid=4242, token="a", acquired_at=beat, heartbeat_at=beat))
        session.add(RunLock(run_name="alive", holder="pid 7 on box", host="box", pid=7, token="b", acquired_at=beat, heartbeat_at=time.time()))
        session.commit()
        dead_id, alive_id = dead.id, alive.id
    since = datetime.fromtimestamp(beat, timezone.utc).strftime("%H:%M")
    said = f"interrupted (writer gone since {since} UTC)"
    web = client(store_url)
    listing = page_text(web.get("/").text)
    assert f"{dead_id} dead self-instruct smollm2-135m (transformers) {said}" in listing
    assert f"{alive_id} alive self-instruct smollm2-135m (transformers) running" in listing
    page = page_text(web.get(f"/runs/{dead_id}").text)
    assert said in page and "Resume with datagen self-instruct --run dead --seeds examples/seed_tasks.jsonl" in page
    assert "data-poll" not in web.get(f"/runs/{dead_id}").text and "data-poll" in web.get(f"/runs/{alive_id}").text
    listed = runner.invoke(cli, ["runs", "list", "--db", store_url])
    assert said in " ".join(listed.output.split()) or "interrupted" in listed.output, listed.output
    shown = json.loads(runner.invoke(cli, ["runs", "list", "--db", store_url, "--json"]).stdout)
    by_name = {row["name"]: row for row in shown}
    assert by_name["dead"]["shown_status"] == said and by_name["dead"]["interrupted"]["writer"] == "pid 4242 on box"
    assert by_name["alive"]["shown_status"] == "running" and by_name["alive"]["interrupted"] is None
    show = runner.invoke(cli, ["runs", "show", "dead", "--db", store_url])
    flat = " ".join(show.output.split())
    assert show.exit_code == 0 and "interrupted (writer gone since" in flat and "datagen self-instruct --run dead" in flat


def test_ui_command_refuses_a_bad_port_and_warns_off_loopback(db_url, tmp_path):
    open_engine(db_url).dispose()  # the viewer opens a store, it never makes one
    result = runner.invoke(cli, ["ui", "--db", db_url, "--port", "70000"])
    assert result.exit_code == 2 and "--port must be between 1 and 65535" in result.output
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "datagen.cli", "ui", "--db", db_url, "--host", "0.0.0.0", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "Ctrl+C stops" not in log.read_text() and time.monotonic() < deadline and server.poll() is None:
                time.sleep(0.2)
            base = f"http://127.0.0.1:{port}/"
            while time.monotonic() < deadline:
                try:
                    assert httpx.get(base).status_code == 200
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert httpx.get(base, headers={"host": "rebind.attacker.example"}).status_code == 400
        finally:
            server.terminate()
            server.wait(timeout=30)
    said = " ".join(log.read_text().split())
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine can read the store" in said
    assert f"at http://127.0.0.1:{port}/ (Ctrl+C stops)" in said


def test_runs_show_and_the_run_page_count_rejections_alike(db_url):
    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=12)
    shown = runner.invoke(cli, ["runs", "show", "si", "--db", db_url, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["rejected_by_reason"] == {"blacklist": 1, "rouge_similarity": 1, "too_short": 1}
    assert "Rejected by reason: blacklist 1, rouge_similarity 1, too_short 1" in page_text(client(db_url).get(f"/runs/{run.id}").text)


def test_manual_rejection_needs_allow_edits_and_export_honours_it(db_url):
    from datagen.export import select_examples

    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=8)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted")).first()
        before, _ = select_examples(session, run)
    form = {"reason": "  not a real task  ", "curator": ""}
    path = f"/runs/{run.id}/items/{task.id}/verdicts"
    read_only = client(db_url)
    assert read_only.post(path, data=form, headers={"origin": LOCAL}).status_code == 404  # no write route at all
    assert 'action="' + path not in read_only.get(f"/runs/{run.id}/items/{task.id}").text
    web = TestClient(create_app(open_engine(db_url), curator="ana"), base_url=LOCAL, follow_redirects=False)
    assert web.post(path, data=form).status_code == 403  # no Origin: not from the viewer's own page
    assert web.post(path, data=form, headers={"origin": "http://evil.example"}).status_code == 403
    assert web.post(path, data={"reason": " "}, headers={"origin": LOCAL}).status_code == 400
    with Session(open_engine(db_url)) as session:
        assert session.exec(select(ManualVerdict)).all() == []
    done = web.post(path, data=form, headers={"origin": LOCAL})
    assert done.status_code == 303 and done.headers["location"] == f"/runs/{run.id}/items/{task.id}"
    with Session(open_engine(db_url)) as session:
        verdict = session.exec(select(ManualVerdict)).one()
        assert (verdict.task_id, verdict.verdict, verdict.reason, verdict.curator) == (task.id, "rejected", "not a real task", "ana")
        after, without_instances = select_examples(session, session.get(Run, run.id))
        assert session.get(Task, task.id).status == "accepted"  # the pipeline's verdict stays as it was
    assert [e for e in before if e.task_id != task.id] == after and any(e.task_id == task.id for e in before)
    assert without_instances == 1  # build_run's task 2 has no accepted instance; the hand-rejected one is not counted
    shown = page_text(web.get(f"/runs/{run.id}/items/{task.id}").text)
    assert "by hand who when reason rejected ana " in shown and " not a real task Rejected by hand: datagen export leaves" in shown


def test_curator_needs_allow_edits(db_url):
    result = runner.invoke(cli, ["ui", "--db", db_url, "--curator", "ana"])
    assert result.exit_code == 2 and "--curator names who edits: it needs --allow-edits" in result.output


def test_hand_verdicts_are_the_items_status_and_can_be_undone(db_url):
    """A hand rejection is the item's status (header, list, status=rejected, counters, reasons, export); a second post
    stores no duplicate; undo is a later row that restores the pipeline's verdict."""
    from datagen.export import select_examples

    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=8)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted").order_by(Task.id)).first()
        exported, _ = select_examples(session, run)
        statuses = session.exec(select(Task.status).where(Task.run_id == run.id, Task.source == "generated")).all()
        accepted, rejected = statuses.count("accepted"), statuses.count("rejected")
    assert (accepted, rejected) == (6, 2)  # build_run writes rows, not the run's counters: figures count rows
    web = TestClient(create_app(open_engine(db_url), curator="ana"), base_url=LOCAL, follow_redirects=False)
    path, origin = f"/runs/{run.id}/items/{task.id}/verdicts", {"origin": LOCAL}
    assert 'id="reject"' in web.get(f"/runs/{run.id}/items/{task.id}").text
    assert "by_hand" not in web.get(f"/runs/{run.id}/report").text  # cached now: a verdict must refresh it
    assert web.post(path, data={"verdict": "rejected", "reason": "not a task"}, headers=origin).status_code == 303
    assert f"accepted {accepted - 1}" in page_text(web.get(f"/runs/{run.id}/report").text)
    assert "by_hand 1" in page_text(web.get(f"/runs/{run.id}/report").text)
    again = web.post(path, data={"verdict": "rejected", "reason": "twice"}, headers=origin)
    assert again.status_code == 409 and "already rejected by hand by ana" in unescape(again.text)
    item = web.get(f"/runs/{run.id}/items/{task.id}").text
    assert re.search(r'<h1>Item \d+ <span class="status rejected">rejected</span> <small class="reason" id="hand-rejection">by hand: ana, ', item)
    assert 'id="reject"' not in item and 'id="undo"' in item  # one form: undo, not a second rejection
    rejected_ids = item_ids(web.get(f"/runs/{run.id}?status=rejected").text)
    assert task.id in rejected_ids and task.id not in item_ids(web.get(f"/runs/{run.id}?status=accepted").text)
    assert item_ids(web.get(f"/runs/{run.id}?status=rejected&reason=by_hand").text) == [task.id]
    listing = web.get(f"/runs/{run.id}").text
    assert f'data-field="accepted">{accepted - 1}<' in listing and f'data-field="rejected">{rejected + 1}<' in listing
    assert "by_hand 1" in page_text(listing) and "rejected by hand by ana" in page_text(listing)
    assert f'data-field="accepted">{accepted - 1}<' in web.get("/").text
    with Session(open_engine(db_url)) as session:
        assert len(select_examples(session, session.get(Run, run.id))[0]) < len(exported)
    shown = json.loads(runner.invoke(cli, ["runs", "show", "si", "--db", db_url, "--json"]).stdout)
    assert (shown["accepted"], shown["rejected_by_hand"], shown["rejected_by_reason"]["by_hand"]) == (accepted - 1, 1, 1)
    assert web.post(path, data={"verdict": "restored", "reason": ""}, headers=origin).status_code == 303
    assert web.post(path, data={"verdict": "restored"}, headers=origin).status_code == 409  # nothing left to undo
    item = web.get(f"/runs/{run.id}/items/{task.id}").text
    assert '<h1>Item' in item and 'id="hand-rejection"' not in item and 'id="reject"' in item
    assert task.id in item_ids(web.get(f"/runs/{run.id}?status=accepted").text)
    with Session(open_engine(db_url)) as session:
        assert [v.verdict for v in session.exec(select(ManualVerdict).order_by(ManualVerdict.id)).all()] == ["rejected", "restored"]
        assert select_examples(session, session.get(Run, run.id))[0] == exported


def test_report_figures_are_formatted():
    from datagen.ui.app import shown

    assert shown(0.515534, "keep_rate") == "51.6%" and shown(0.515534, "median_rouge_l_to_nearest_seed") == "0.516"
    assert shown({"rouge_similarity": 16, "too_short": 2}) == "rouge_similarity 16, too_short 2"
    assert shown({}) == "—" and shown(None) == "—" and shown(12) == "12" and shown("write") == "write"



def test_nearest_earlier_instruction_column_and_word_diff(db_url):
    from datagen.ui.queries import word_diff

    assert word_diff("Write a poem about cats.", "Write a short poem about dogs.") == [
        ("same", "Write a"), ("ins", "short"), ("same", "poem about"), ("del", "cats."), ("ins", "dogs."),
    ]  # fmt: skip
    with Session(open_engine(db_url)) as session:
        run = build_run(session, "si", tasks=4)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.nearest.is_not(None)).order_by(Task.id)).first()
        seed = session.exec(select(Task).where(Task.run_id == run.id, Task.instruction == task.nearest).order_by(Task.id)).first()
    web = client(db_url)
    row = re.search(rf'<a href="/runs/{run.id}/items/{task.id}">{task.id}</a>.*?</tr>', web.get(f"/runs/{run.id}").text, re.S).group(0)
    assert f'<td class="nearest"><a href="/runs/{run.id}/items/{seed.id}">{seed.id}</a> <small>seed</small>' in row
    item = web.get(f"/runs/{run.id}/items/{task.id}").text
    diff = re.search(r'<p class="diff" id="diff">(.*?)</p>', item, re.S).group(1)
    assert "<del>" in diff and "<ins>" in diff
    assert " ".join(re.sub(r"<del>.*?</del>|</?ins>", " ", unescape(diff)).split()) == " ".join(task.instruction.split())


def test_runs_side_by_side(db_url):
    with Session(open_engine(db_url)) as session:
        one = build_run(session, "one", tasks=8)
        two = build_run(session, "two", tasks=12, batch_size=4)
        two.config = {**two.config, "rouge_threshold": 0.6}
        session.add(two)
        session.commit()
        one_id, two_id = one.id, two.id
    web = client(db_url)
    assert 'name="run" value="%d"' % one_id in web.get("/").text
    html = web.get(f"/compare?run={one_id}&run={two_id}").text
    shown = page_text(html)
    assert "instructions 8 12" in shown and "rouge_threshold 0.7 0.6" in shown and "num_instructions 8 12" in shown
    assert "rouge_similarity 1 1" in shown and "too_short 1 1" in shown
    assert re.search(r'<svg class="curves".*?</svg>', html, re.S).group(0).count("<polyline points=") == 2
    assert web.get(f"/compare?run={one_id}").status_code == 400 and web.get(f"/compare?run={one_id}&run=999").status_code == 404


def walk_pages(web: TestClient, run_id: int, query: str) -> tuple[list[int], str]:
    """Every item id the next links reach from the first page, and the last page's HTML."""
    seen, path = [], f"/runs/{run_id}?{query}"
    while True:
        response = web.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        seen += item_ids(response.text)
        found = re.search(r'<a rel="next" href="\?([^"]+)"', response.text)
        if not found:
            return seen, response.text
        path = f"/runs/{run_id}?" + unescape(found.group(1))


def test_sort_items_by_similarity_both_ways_keyset_paged(store_url):
    db_url = store_url
    run = fill_items(db_url, "many", 230)
    with Session(open_engine(db_url)) as session:
        for task in session.exec(select(Task).where(Task.run_id == run.id, Task.id % 7 == 0)).all():
            task.similarity, task.nearest = None, None  # rejected before the similarity filter: never compared
            session.add(task)
        session.commit()
        rows = session.exec(select(Task.id, Task.similarity, Task.status).where(Task.run_id == run.id)).all()
    web = client(db_url)
    missing = [i for i, s, _ in sorted(rows) if s is None]
    ascending = [i for i, s, _ in sorted((r for r in rows if r[1] is not None), key=lambda r: (r[1], r[0]))] + missing
    descending = [i for i, s, _ in sorted((r for r in rows if r[1] is not None), key=lambda r: (-r[1], r[0]))] + missing
    seen, last = walk_pages(web, run.id, "sort=similarity")
    assert seen == ascending and len(missing) == 32
    seen, _ = walk_pages(web, run.id, "sort=similarity&order=desc")
    assert seen == descending
    rejected = [i for i in descending if dict((r[0], r[2]) for r in rows)[i] == "rejected"]
    seen, _ = walk_pages(web, run.id, "status=rejected&sort=similarity&order=desc")
    assert seen == rejected  # the sort keeps the filter, the pager keeps both
    # the previous link walks back through the same order
    back = re.search(r'<a rel="prev" href="\?([^"]+)"', last)
    assert back and item_ids(web.get(f"/runs/{run.id}?" + unescape(back.group(1))).text) == ascending[150:200]
    middle = web.get(f"/runs/{run.id}?sort=similarity&order=desc&before={descending[100]}").text
    assert item_ids(middle) == descending[50:100] and 'rel="prev"' in middle and 'rel="next"' in middle
    # the column header sorts, and says which way
    first = web.get(f"/runs/{run.id}?sort=similarity").text
    assert re.search(r'<a class="sort" href="\?sort=similarity&amp;order=desc"[^>]*>ROUGE-L ▲</a>', first)
    assert '<option value="similarity" selected>' in first
    assert web.get(f"/runs/{run.id}?sort=instruction").status_code == 400
    assert "sort must be one of id, similarity, ifd, conditioned_loss, direct_loss, degenerate, not &#39;1; DROP TABLE task&#39;" in web.get(f"/runs/{run.id}?sort=1; DROP TABLE task").text
    assert web.get(f"/runs/{run.id}?sort=similarity&order=up").status_code == 400
    gone = web.get(f"/runs/{run.id}?sort=similarity&after={2**31 - 1}").text  # a cursor no item has: back to the first page
    assert item_ids(gone) == [] and 'rel="first" href="?sort=similarity"' in gone


def test_overlaid_histograms_are_shares_of_each_runs_values():
    from types import SimpleNamespace

    from datagen.ui.sparkline import length_edges, overlaid_histograms, similarity_edges

    runs = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    plot = overlaid_histograms([[0.0, 0.1, 1.0, 1.0], [0.5]], runs, [0, 0.5, 1], marker=0.7)
    # a: 2 of 4 values in [0, 0.5), 2 in [0.5, 1] (1.0 on the last edge counts in the last bin); b: its one value, 100%
    assert plot.curves[0].points == "40.0,200.0 40.0,105.0 315.0,105.0 315.0,105.0 590.0,105.0 590.0,200.0"
    assert plot.curves[1].points == "40.0,200.0 40.0,200.0 315.0,200.0 315.0,10.0 590.0,10.0 590.0,200.0"
    assert (plot.top, plot.marker, plot.ticks) == ("100%", 425.0, [(40.0, "0"), (315.0, "0.5"), (590.0, "1")])
    assert overlaid_histograms([[], []], runs, [0, 1]).top == "100%"  # no values: flat lines, no division by zero
    assert similarity_edges(4) == [0, 0.25, 0.5, 0.75, 1] and length_edges(12) == list(range(14)) and length_edges(100)[-1] == 104


def add_loop(url: str, generation_runs: list[Run]) -> None:
    """A finished e2e loop's stages (datagen/e2e.py's record()) around existing runs as its rounds' generation runs."""
    from storage.tables import Loop, LoopStage

    def scores(loss: float, rouge: float) -> dict:
        return {"items": [{"loss": loss, "rouge_l": rouge, "exact_match": None, "answer": "a", "tokens": 4}] * 3}

    with Session(open_engine(url)) as session:
        loop = Loop(name="loop-a", config={}, out="/tmp/loop-a", status="completed")
        session.add(loop)
        session.flush()
        stages = [(0, "evaluate-base", None, scores(3.0, 0.1)), (0, "train.0", None, {"rows": 20}), (0, "evaluate.0", None, scores(2.5, 0.2))]
        for r, run in enumerate(generation_runs, start=1):
            stages += [(r, "generate", run.id, {"status": "completed"}), (r, "dedup", run.id, {"accepted_after": 4 + r}),
                       (r, "export", None, {"rows": 10 * r}), (r, "train.0", None, {"rows": 20 + 10 * r}),
                       (r, "evaluate.0", None, scores(2.0, 0.3)), (r, "evaluate.1", None, scores(1.0, 0.5))]  # fmt: skip
        for r, stage, run_id, result in stages:
            session.add(LoopStage(loop_id=loop.id, round=r, stage=stage, status="completed", run_id=run_id, result=result))
        session.commit()


def test_compare_overlays_lengths_and_similarities_and_shows_a_loops_rounds(db_url):
    with Session(open_engine(db_url)) as session:
        one = build_run(session, "one", tasks=8)
        two = build_run(session, "two", tasks=12, batch_size=4)
        outside = build_run(session, "outside", tasks=4)
        other = build_run(session, "other", tasks=4).id
        stored = {}
        for run in (one, two):
            rows = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated")).all()
            stored[run.name] = ([len(t.instruction.split()) for t in rows if t.status == "accepted"], [t.similarity for t in rows if t.similarity is not None])
        ids = one.id, two.id, outside.id
        add_loop(db_url, [one, two])
    web = client(db_url)
    html = web.get(f"/compare?run={ids[0]}&run={ids[1]}").text
    for plot in ("lengths", "similarities"):
        svg = re.search(rf'<svg class="histogram" id="{plot}".*?</svg>', html, re.S).group(0)
        assert svg.count("<polyline") == 2, svg
    shown = page_text(html)
    assert f"■ one (n = {len(stored['one'][0])}) · ■ two (n = {len(stored['two'][0])})" in shown
    assert f"■ one (n = {len(stored['one'][1])}) · ■ two (n = {len(stored['two'][1])})" in shown and len(stored["two"][1]) > 0
    assert re.search(r'<line x1="425.0" y1="10" x2="425.0" y2="200" stroke="#555" stroke-dasharray', html)  # threshold 0.7
    table = page_text(re.search(r'<table class="compare loop".*?</table>', html, re.S).group(0))
    with Session(open_engine(db_url)) as session:
        numbers = figures(session, [session.get(Run, ids[0]), session.get(Run, ids[1])])
    first, second = numbers[ids[0]], numbers[ids[1]]
    assert "base model — — — — — — — 3.0000 0.1000 — 0% 1" in table
    assert "seeds only — — — — — — 20 2.5000 0.2000 — 0% 1" in table
    assert (f"round 1 one {first.accepted} {first.rejected} {first.keep_rate:.0%} 5 10 30 1.5000 0.4000 — 0% 2" in table)
    assert f"round 2 two {second.accepted} {second.rejected} {second.keep_rate:.0%} 6 20 40 1.5000 0.4000 — 0% 2" in table
    assert shown.count("e2e loop loop-a") == 1  # both runs are its rounds: the loop once
    assert page_text(web.get(f"/compare?run={ids[2]}&run={ids[1]}").text).count("e2e loop loop-a") == 1
    assert "e2e loop" not in page_text(web.get(f"/compare?run={ids[2]}&run={other}").text)
