"""The run page's score columns (`datagen score`) and curation verdicts (`datagen curate`): shown, sorted and filtered
server-side (datagen/ui/queries.py SORT_KEYS and score_conditions)."""

from __future__ import annotations

import re

from sqlmodel import Session, select
from starlette.testclient import TestClient

from datagen.ui.app import create_app
from pipelines.curate import CurationRule, curate_run
from storage.store import open_engine
from storage.tables import Instance, InstanceScore
from tests.example_runs import build_run
from tests.test_curate import store_scores

ROW = re.compile(r'<tr><td><a href="/runs/\d+/items/(\d+)">')


def task_ifds(session: Session) -> dict[int, float | None]:
    """task id → its lowest IFD (None: its only score is null), written out in Python."""
    lowest: dict[int, float | None] = {}
    for task_id, ifd in session.exec(select(Instance.task_id, InstanceScore.score).join(InstanceScore, InstanceScore.instance_id == Instance.id)):
        if ifd is not None:
            lowest[task_id] = min(ifd, lowest.get(task_id) or ifd)
        else:
            lowest.setdefault(task_id, None)
    return lowest


def test_items_sort_and_filter_by_ifd_and_show_curation(db_url):
    engine = open_engine(db_url)
    with Session(engine) as session:
        run = build_run(session)
        store_scores(session, run.id)
        curate_run(session, run.name, CurationRule(keep="ifd < 0.75 and not degenerate"))
        lowest = task_ifds(session)
    web = TestClient(create_app(engine), base_url="http://127.0.0.1:8765")

    page = web.get("/runs/si-test", params={"sort": "ifd", "order": "asc", "status": "accepted"})
    assert page.status_code == 200
    shown = [int(i) for i in ROW.findall(page.text)]
    scored = sorted((ifd, task) for task, ifd in lowest.items() if ifd is not None)
    assert shown[: len(scored)] == [task for _, task in scored]  # ascending IFD; unscored instructions come after
    assert set(shown[len(scored) :]) == set(shown) - set(lowest) | {t for t, ifd in lowest.items() if ifd is None}

    descending = [int(i) for i in ROW.findall(web.get("/runs/si-test", params={"sort": "ifd", "order": "desc", "status": "accepted"}).text)]
    assert descending[: len(scored)] == [task for _, task in reversed(scored)]

    low = web.get("/runs/si-test", params={"max_ifd": "0.45"}).text
    assert {int(i) for i in ROW.findall(low)} == {task for task, ifd in lowest.items() if ifd is not None and ifd <= 0.45}

    dropped = web.get("/runs/si-test", params={"curation": "dropped"}).text
    assert "dropped: fails ifd &lt; 0.75 and not degenerate (degenerate=True, ifd=0.3)" in dropped
    assert "dropped: ifd is null: empty output" in dropped
    assert "curation <code>ifd &lt; 0.75 and not degenerate</code>" in page.text
    assert web.get("/runs/si-test", params={"max_ifd": "low"}).status_code == 400
    assert web.get("/runs/si-test", params={"sort": "ifd; drop table"}).status_code == 400
