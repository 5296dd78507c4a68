"""Cost accounting (datagen/cost.py): the price table's checks, pricing of tokens and device seconds, and the figures
`datagen runs show` and `datagen report` print from a run's stored tokens and stage seconds."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen import cost
from datagen.cli import app
from datagen.errors import BadInput
from pipelines import self_instruct as si
from storage.store import open_engine
from storage.tables import StageTime
from tests.conftest import REPO
from tests.test_self_instruct import NOVEL, SEED_TASKS, ScriptedBackend, listing, new_run

runner = CliRunner()
PRICES = REPO / "examples" / "prices.yaml"


def test_the_example_table_loads():
    prices = cost.load_prices(PRICES)
    assert prices.devices == {"cuda": 2.5, "cpu": 0.1} and prices.models["gpt-4o-mini"] == cost.TokenPrice(0.15, 0.60)


@pytest.mark.parametrize("text, message", [
    ("devices: {tpu: 1}", "devices.tpu: a device is cuda or cpu"),
    ("devices: {cuda: -1}", "devices.cuda must be a number >= 0"),
    ("models: {m: {input: 1}}", "models.m needs exactly 'input' and 'output'"),
    ("gpus: 1", "unknown field 'gpus'"),
])  # fmt: skip
def test_a_bad_table_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(BadInput, match=f"{path}: {message}"):
        cost.load_prices(path)


def test_pricing_tokens_of_remote_models_and_seconds_of_local_devices():
    usage = cost.Usage({"gpt-4o-mini": (2_000_000, 1_000_000)}, {("generation", "remote"): 50.0, ("filtering", "cpu"): 3600.0,
                       ("training", "cuda"): 1800.0}, {"gpt-4o-mini"})  # fmt: skip
    priced = cost.price(usage, cost.load_prices(PRICES))
    assert priced.parts == {"tokens gpt-4o-mini": pytest.approx(0.9), "filtering on cpu": pytest.approx(0.1),
                            "training on cuda": pytest.approx(1.25)}  # fmt: skip
    assert priced.total == pytest.approx(2.25)
    cheap = cost.Prices("t", devices={"cpu": 0.1})
    missing = cost.price(usage, cheap)
    assert missing.total is None and missing.missing == ["model gpt-4o-mini", "device cuda"]
    assert "n/a (no price in t for model gpt-4o-mini, device cuda)" == missing.describe()
    assert cost.price(usage, None).describe().startswith("n/a (no price table")


def test_loop_cost_per_kept_item_and_per_point():
    usage = cost.Usage({}, {("training", "cuda"): 3600.0})
    prices = cost.Prices("t", devices={"cuda": 2.0})
    better = cost.loop_cost_dict(usage, prices, kept_items=100, improvement=0.04)
    assert (better["per_kept_item"], better["per_point"]) == (pytest.approx(0.02), pytest.approx(0.5))
    worse = cost.loop_cost_dict(usage, prices, kept_items=100, improvement=None)
    assert worse["per_point"] is None and worse["per_point_shown"] == "n/a (the primary verdict is not an improvement)"


def test_a_run_stores_its_stage_seconds_and_runs_show_prices_them(db_url, tmp_path, monkeypatch):
    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=2)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0], NOVEL[1])]), config)
        usage = cost.run_usage(session, run)
        tokens = (run.prompt_tokens, run.completion_tokens)
        # one row per stage per batch, committed with it; the scripted backend is not a local model: cpu
        rows = session.exec(select(StageTime).where(StageTime.run_id == run.id)).all()
        assert {r.stage for r in rows} >= {"generation", "filtering"} and {r.device for r in rows} == {"cpu"}
        session.add(StageTime(run_id=run.id, stage="generation", device="cpu", seconds=7200.0))  # two more hours
        session.commit()
    assert usage.tokens == {"scripted": tokens} and tokens[0] > 0
    shown = runner.invoke(app, ["runs", "show", "t", "--db", db_url, "--json", "--prices", str(PRICES)])
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.stdout)["cost"]
    seconds = sum(figures["seconds"].values())
    assert figures["cost"] == pytest.approx(seconds / 3600 * 0.10, abs=1e-6) and figures["prices"] == str(PRICES)
    # money is computed when shown: another table, another figure, same store
    dearer = tmp_path / "dear.yaml"
    dearer.write_text("devices: {cpu: 1.0}\n")
    monkeypatch.setenv("DATAGEN_PRICES", str(dearer))
    again = json.loads(runner.invoke(app, ["runs", "show", "t", "--db", db_url, "--json"]).stdout)["cost"]
    assert again["cost"] == pytest.approx(10 * figures["cost"], rel=1e-4) and again["seconds"] == figures["seconds"]
    monkeypatch.delenv("DATAGEN_PRICES")
    plain = runner.invoke(app, ["runs", "show", "t", "--db", db_url])
    assert plain.exit_code == 0 and "no price table" in plain.output
    bad = runner.invoke(app, ["runs", "show", "t", "--db", db_url, "--prices", str(tmp_path / "none.yaml")])
    assert bad.exit_code == 2 and "no such config file" in bad.output


def test_the_report_shows_the_cost(db_url, tmp_path):
    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=2)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0], NOVEL[1])]), config)
    result = runner.invoke(app, ["report", "--run", "t", "--out", str(tmp_path / "r"), "--db", db_url, "--prices", str(PRICES), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cost"]["prices"] == str(PRICES)
    page = (tmp_path / "r" / "report.md").read_text()
    assert "## Cost" in page and "cost per accepted instruction" in page and "USD" in page


def test_the_viewers_run_page_shows_the_cost(db_url):
    from fastapi.testclient import TestClient

    from datagen.ui.app import create_app

    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=2)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0], NOVEL[1])]), config)
        session.add(StageTime(run_id=run.id, stage="generation", device="cpu", seconds=36000.0))  # ten hours: 1.00 USD
        session.commit()
        run_id = run.id
    app = create_app(open_engine(db_url))
    web = TestClient(app, base_url="http://127.0.0.1:8765")
    assert "cost: n/a (no price table" in web.get(f"/runs/{run_id}").text
    app.state.prices = cost.load_prices(PRICES)  # as `datagen ui --prices` sets it
    page = web.get(f"/runs/{run_id}").text
    assert f"cost: 1.00 USD (prices: {PRICES})" in page and "seconds: filtering on cpu" in page
