"""`datagen ui` in a real browser: Playwright driving Debian's chromium against a real `datagen ui` process over a store
holding a real Self-Instruct run of the embedded model, a 10k-item run, a run whose instruction carries <script>, and a
running run. Screenshots go to each test's temp folder (a few are committed under examples/ui/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from storage.queries import figures
from storage.store import get_run, open_engine
from storage.tables import Generation, ManualVerdict, Run, Task
from tests.conftest import SEEDS, scripted_server, slow_self_instruct
from tests.test_self_instruct import SEED_TASKS, listing
from tests.test_ui import XSS, add_script_run, copy_store, fill_items, free_port, real_run_store

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("DATAGEN_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('ui_browser') / 'datagen.db'}"
    copy_store(real_run_store(tmp_path_factory.getbasetemp()), url)
    add_script_run(url)
    fill_items(url, "ten-thousand", 10_000)
    fill_items(url, "live", 30, status="running")
    return url


@contextmanager
def ui_server(store: str, log_path: Path, *options: str) -> Iterator[str]:
    """A real `datagen ui` process on a free loopback port; yields its base URL."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "datagen.cli", "ui", "--db", store, "--port", str(port), *options], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"datagen ui exited with {process.returncode}: {log_path.read_text()}")
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"datagen ui not answering after 120 s; log: {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`datagen ui --allow-edits` over the module's store."""
    with ui_server(store, tmp_path_factory.mktemp("ui_server") / "server.log", "--allow-edits", "--curator", "tester") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed: pip install 'datagen[dev]'")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            raise RuntimeError(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    with sync_playwright() as playwright:
        # Chromium's sandbox refuses to start as root (CI runs as root).
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    yield opened
    context.close()


def test_runs_list(page, server, store, tmp_path):
    page.goto(server + "/")
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
    row = page.locator(f'tr[data-run="{run.id}"]')
    assert row.locator("td").nth(2).inner_text() == "real"
    assert row.locator('[data-field="status"]').inner_text() == "completed"
    with Session(open_engine(store)) as session:
        accepted = figures(session, [run])[run.id].accepted
    assert row.locator('[data-field="accepted"]').inner_text() == str(accepted)
    assert row.locator("svg.spark polyline").count() == 1
    assert page.locator("tbody tr").count() == 4  # real, xss, ten-thousand, live
    page.screenshot(path=tmp_path / "runs.png", full_page=True)


def test_filter_rejections_by_reason(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
        rejected = session.exec(select(Task).where(Task.run_id == run.id, Task.status == "rejected").order_by(Task.id)).all()
    reason = rejected[0].reason
    page.goto(f"{server}/runs/{run.id}")
    page.select_option('select[name="status"]', "rejected")
    page.select_option('select[name="reason"]', reason)
    page.click('button[type="submit"]')
    page.wait_for_url(f"**reason={reason}**")
    expected = [t for t in rejected if t.reason == reason]
    assert page.locator("table.items tbody tr td:nth-child(4)").all_inner_texts() == [reason] * len(expected)
    assert page.locator("table.items tbody tr td:nth-child(1)").all_inner_texts() == [str(t.id) for t in expected]
    assert page.inner_text("#count").startswith(f"{len(expected)} matching instruction")
    page.screenshot(path=tmp_path / "run_rejected.png", full_page=True)


def test_item_shows_raw_completion_and_nearest_neighbour(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.nearest.is_not(None)).order_by(Task.id)).first()
        completion = session.get(Generation, task.generation_id).completion
    page.goto(f"{server}/runs/{run.id}")
    page.click(f'table.items a[href="/runs/{run.id}/items/{task.id}"]')
    page.wait_for_url(f"**/items/{task.id}")
    assert page.locator("pre.completion").first.text_content() == completion
    assert page.locator("pre.nearest").text_content() == task.nearest
    assert f"ROUGE-L F {task.similarity:.3f}" in page.inner_text("#nearest")
    assert page.locator("pre.instruction").text_content() == task.instruction
    page.screenshot(path=tmp_path / "item.png", full_page=True)


def test_report_page_shows_the_plots(page, server, tmp_path):
    page.goto(server + "/runs/real/report")
    images = page.locator("figure img")
    assert images.count() == 6
    page.wait_for_function("[...document.images].every(image => image.complete && image.naturalWidth > 400)")
    page.screenshot(path=tmp_path / "report.png", full_page=True)


def test_page_through_10k_items(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        run = get_run(session, "ten-thousand")
        expected = [str(i) for i in session.exec(select(Task.id).where(Task.run_id == run.id).order_by(Task.id)).all()]
    page.goto(f"{server}/runs/{run.id}")
    seen, pages = [], 0
    started = time.perf_counter()
    while True:
        seen += page.locator("table.items tbody tr td:nth-child(1)").all_inner_texts()
        pages += 1
        if pages == 100:
            page.screenshot(path=tmp_path / "ten_thousand_page_100.png", full_page=False)
        following = page.locator('a[rel="next"]')
        if following.count() == 0:
            break
        following.click()
        page.wait_for_url(f"**after={seen[-1]}")
    print(f"\n{pages} pages of 10,000 items in {time.perf_counter() - started:.1f} s")
    assert seen == expected and pages == 200
    page.click('a[rel="prev"]')
    page.wait_for_url(f"**before={expected[-50]}")
    assert page.locator("table.items tbody tr td:nth-child(1)").all_inner_texts() == expected[-100:-50]


def test_script_in_an_instruction_is_shown_as_text(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        run = get_run(session, "xss")
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.instruction == XSS)).one()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    for path in (f"/runs/{run.id}", f"/runs/{run.id}/items/{task.id}"):
        page.goto(server + path)
        assert XSS in page.inner_text("main")
        assert page.evaluate("window.__pwned") is None and page.locator("main script").count() == 0
    assert page.locator("pre.instruction").text_content() == XSS
    assert not dialogs
    page.screenshot(path=tmp_path / "script_as_text.png", full_page=True)


def test_non_local_host_header_is_refused(server):
    assert httpx.get(server + "/", headers={"Host": "localhost"}).status_code == 200
    refused = httpx.get(server + "/", headers={"Host": "rebind.attacker.example"})
    assert refused.status_code == 400 and refused.text == "Invalid host header"


def write_batch(url: str, run_id: int, accepted: int, rejected: int, reason: str = "rouge_similarity") -> None:
    """What a writer's batch commits: instructions (accepted and rejected) and the run's counters, in one transaction."""
    with Session(open_engine(url)) as session:
        run = session.get(Run, run_id)
        for k in range(accepted + rejected):
            session.add(Task(run_id=run_id, source="generated", instruction=f"Live instruction {run.accepted + run.rejected + k}.",
                             status="accepted" if k < accepted else "rejected", reason=None if k < accepted else reason))  # fmt: skip
        run.accepted += accepted
        run.rejected += rejected
        run.generated += 1
        run.updated_at += timedelta(seconds=1)
        session.add(run)
        session.commit()


def test_live_run_updates_in_place(page, server, store, tmp_path):
    """One run live, others finished (the normal case): the runs list and the run page update in place, with no reload
    and no scroll reset; on the run page the counters, "N matching", the item table and the reasons move together."""
    with Session(open_engine(store)) as session:
        run = get_run(session, "live")
        accepted, rejected, items = run.accepted, run.rejected, run.accepted + run.rejected
    page.set_viewport_size({"width": 900, "height": 200})
    page.goto(server + "/")
    page.evaluate("window.__loaded_once = true; window.scrollTo(0, 120)")
    cell = f'td[data-run="{run.id}"][data-field="accepted"]'
    write_batch(store, run.id, accepted=3, rejected=2, reason="too_long")
    page.wait_for_function(f"document.querySelector('{cell}').textContent === '{accepted + 3}'")
    page.wait_for_function("Number(document.body.dataset.polls) >= 3")  # several polls while another run has finished
    assert page.evaluate("window.__loaded_once === true && window.scrollY === 120")  # no reload, no scroll reset

    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{server}/runs/{run.id}")
    page.evaluate("window.__loaded_once = true")
    assert page.inner_text("#count").startswith(f"{items + 5} matching")
    write_batch(store, run.id, accepted=4, rejected=1, reason="blacklist")
    page.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{items + 10} matching')")
    shown = {
        "accepted": page.inner_text(f'dd[data-run="{run.id}"][data-field="accepted"]'),
        "rows": page.locator("table.items tbody tr").count(),
        "reasons": page.inner_text("#reasons"),
    }
    assert shown == {"accepted": str(accepted + 7), "rows": items + 10, "reasons": shown["reasons"]}
    assert "blacklist 1" in shown["reasons"] and "too_long 2" in shown["reasons"]
    page.screenshot(path=tmp_path / "live_run.png", full_page=True)
    with Session(open_engine(store)) as session:
        row = session.get(Run, run.id)
        row.status = "completed"
        session.add(row)
        session.commit()
    page.wait_for_function("!document.body.dataset.poll")  # the last poll saw it finished and stopped polling
    assert page.locator(f'dd[data-run="{run.id}"][data-field="status"]').inner_text() == "completed"
    assert page.evaluate("window.__loaded_once === true")


def test_reject_an_item_by_hand(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        run = get_run(session, "real")
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted")).first()
    page.goto(f"{server}/runs/{run.id}/items/{task.id}")
    page.fill('form.curate input[name="reason"]', "answers itself: not an instruction")
    page.click('form.curate button[type="submit"]')
    page.wait_for_selector("#by-hand")
    verdict_cell, who, _when, why = page.locator("#by-hand tbody td").all_inner_texts()
    assert (verdict_cell, who, why) == ("rejected", "tester", "answers itself: not an instruction")
    assert page.locator("h1 .status").inner_text() == "rejected" and "by hand: tester" in page.inner_text("#hand-rejection")
    assert page.locator("form#reject").count() == 0 and page.locator("form#undo").count() == 1
    with Session(open_engine(store)) as session:
        verdict = session.exec(select(ManualVerdict).where(ManualVerdict.task_id == task.id)).one()
    assert (verdict.curator, verdict.reason) == ("tester", "answers itself: not an instruction")
    page.screenshot(path=tmp_path / "rejected_by_hand.png", full_page=False)
    page.goto(f"{server}/runs/{run.id}?status=rejected&reason=by_hand")
    assert page.locator("table.items tbody tr td:nth-child(1)").all_inner_texts() == [str(task.id)]
    page.goto(f"{server}/runs/{run.id}/items/{task.id}")
    page.click("form#undo button[type=submit]")
    page.wait_for_selector("form#reject")
    assert page.locator("h1 .status").inner_text() == "accepted"


def test_compare_two_runs(page, server, store, tmp_path):
    with Session(open_engine(store)) as session:
        first, second = get_run(session, "real"), get_run(session, "ten-thousand")
    page.goto(server + "/")
    page.check(f'input[name="run"][value="{first.id}"]')
    page.check(f'input[name="run"][value="{second.id}"]')
    page.click("#compare-form button[type=submit]")
    page.wait_for_url(f"**/compare?run={second.id}&run={first.id}")
    assert page.locator("#figures thead th a").all_inner_texts() == ["ten-thousand", "real"]
    assert page.locator("svg.curves polyline").count() == 2
    page.screenshot(path=tmp_path / "compare.png", full_page=True)


# ---- a real run, generating through a slow scripted model, watched live ---------------------------------------------

LIVE_NOVEL = [
    "Name three rivers that flow through Germany and describe one.",
    "Compose a limerick about a cat who loves cheese.",
    "Convert the temperature from Fahrenheit to Kelvin and explain the steps.",
    "List five ways to save water at home during a drought.",
    "Explain why the sky looks red at sunset to a ten year old.",
    "Suggest a weekend itinerary for a family visiting Lisbon.",
    "Translate a short greeting into Spanish, French and Italian.",
    "Summarize the plot of a famous fairy tale in two sentences.",
]
SECONDS_PER_BATCH = 1.5


@pytest.fixture
def slow_model():
    """The base URL of a scripted server answering like a model running Self-Instruct, slowly: each instruction request
    takes SECONDS_PER_BATCH and lists a new instruction, a copy of a seed (rouge_similarity) and a blacklisted one (the
    pattern of tests/test_jobs.py's, with rejections so that the reasons move too)."""
    answered = iter(range(10**6))

    def instructions() -> str:
        novel = LIVE_NOVEL[next(answered) % len(LIVE_NOVEL)]
        return listing(novel, SEED_TASKS[3].instruction, "Draw a map of your town.")

    with scripted_server(slow_self_instruct(instructions, SECONDS_PER_BATCH)) as url:
        yield url


LIVE_SNAPSHOT = """() => {
  const field = (name) => document.querySelector(`dd[data-field="${name}"]`).textContent.trim();
  const reasons = [...document.querySelector("#reasons").textContent.matchAll(/ (\\d+)/g)].map((m) => Number(m[1]));
  return {
    status: field("status"), instructions: Number(field("instructions")), accepted: Number(field("accepted")),
    rejected: Number(field("rejected")), matching: Number(document.querySelector("#count").textContent.split(" ")[0]),
    rows: document.querySelectorAll("table.items tbody tr").length, by_reason: reasons.reduce((a, b) => a + b, 0),
    first_row: [...document.querySelectorAll("table.items tbody tr")].slice(0, 1).map((row) => [row.cells[0].textContent, row.getBoundingClientRect().top])[0] || null,
  };
}"""


def test_a_real_run_through_a_slow_model_updates_the_open_pages_in_place(page, slow_model, tmp_path):
    """`datagen self-instruct` generating through a scripted OpenAI-compatible server that takes 1.5 s a batch, while the
    runs list and then the run page are open: rows appear and counts change in place, with no reload; the scroll
    position, an opened <details>, text typed in the filter form and the rows already shown stay where they were; the
    counters, "N matching", the item table and the reasons always agree with each other; the last poll shows the
    finished run as the store has it, and polling stops."""
    store = f"sqlite:///{tmp_path / 'live.db'}"
    fill_items(store, "finished", 30)  # another run, finished: the normal case beside a live one
    log_path = tmp_path / "run.log"
    command = [sys.executable, "-m", "datagen.cli", "self-instruct", "--seeds", str(SEEDS), "--num-instructions", "6", "--run", "watched",
               "--backend", "openai", "--base-url", slow_model, "--model", "scripted", "--request-batch-size", "1", "--db", store]  # fmt: skip
    with ExitStack() as stack:
        server = stack.enter_context(ui_server(store, tmp_path / "ui.log"))
        with log_path.open("wb") as log:
            writer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(lambda: (writer.poll() is None and writer.kill(), writer.wait()))
        deadline = time.monotonic() + 120
        while True:  # the run exists once its seeds are stored; the first batch is still at the model
            with Session(open_engine(store)) as session:
                run = session.exec(select(Run).where(Run.name == "watched")).first()
            if run is not None:
                break
            assert writer.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

        page.set_viewport_size({"width": 900, "height": 200})
        page.goto(server + "/")
        page.evaluate("window.__loaded_once = true; window.scrollTo(0, 120)")
        accepted_cell = page.locator(f'td[data-run="{run.id}"][data-field="accepted"]')
        first = accepted_cell.inner_text()
        page.wait_for_function(f"document.querySelector('td[data-run=\"{run.id}\"][data-field=\"accepted\"]').textContent !== '{first}'")
        assert page.evaluate("window.__loaded_once === true && window.scrollY === 120")

        page.set_viewport_size({"width": 1400, "height": 400})
        page.goto(f"{server}/runs/{run.id}")
        page.evaluate("window.__loaded_once = true")
        page.click("details summary")  # the configuration, opened
        page.fill('input[name="q"]', "typed, not sent")
        page.locator("table.items").scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, 40)")
        scrolled = page.evaluate("window.scrollY")
        start = page.evaluate(LIVE_SNAPSHOT)
        snapshots = [start]
        while snapshots[-1]["status"] == "running":  # every swap: the parts agree with each other, the reader's place holds
            page.wait_for_function(f"(({LIVE_SNAPSHOT})()).instructions > {snapshots[-1]['instructions']} || !document.body.dataset.poll", timeout=30_000)
            shown = page.evaluate(LIVE_SNAPSHOT)
            assert shown["instructions"] == shown["matching"] == shown["rows"] and shown["rejected"] == shown["by_reason"], shown
            assert shown["accepted"] >= snapshots[-1]["accepted"] and shown["rows"] >= snapshots[-1]["rows"], (snapshots, shown)
            # the reader's place: the row at the top of the window stays where it was on screen (rows are added below;
            # when a part above it grows, the window scrolls by as much, to the whole pixel), and the page never jumps back
            if start["first_row"] is not None:
                assert shown["first_row"][0] == start["first_row"][0] and abs(shown["first_row"][1] - start["first_row"][1]) < 1, (start, shown)
            assert page.evaluate("window.scrollY") >= scrolled and page.evaluate("window.__loaded_once") is True
            assert page.evaluate("document.querySelector('details').open") and page.input_value('input[name="q"]') == "typed, not sent"
            snapshots.append(shown)
            if not page.evaluate("document.body.dataset.poll"):
                break
        assert writer.wait(timeout=30) == 0, log_path.read_text()
        page.wait_for_function("!document.body.dataset.poll")
        final = page.evaluate(LIVE_SNAPSHOT)
    with Session(open_engine(store)) as session:
        run = session.get(Run, run.id)
        stored = figures(session, [run])[run.id]
    assert (final["status"], final["accepted"], final["rejected"], final["instructions"]) == ("completed", stored.accepted, stored.rejected, stored.instructions)
    assert stored.accepted == 6 and stored.rejected >= 12  # two rejections a batch: rouge_similarity and blacklist
    assert len({s["instructions"] for s in snapshots}) >= 3, snapshots  # seen moving, not just before and after
    page.screenshot(path=tmp_path / "live_real_run.png", full_page=True)
