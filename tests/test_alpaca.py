"""Alpaca: the prompt's record format, parsing, and a real run on the embedded model checked with rouge-score."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from datagen.cli import app
from pipelines.alpaca import AlpacaConfig, parse_tasks, task_block
from pipelines.self_instruct import rejection_reason
from tests.conftest import SEEDS
from tests.test_self_instruct import check_store_independently

runner = CliRunner()


def test_task_block_and_parse_round_trip():
    text = task_block(4, "Summarize the text in one sentence.", "The cat sat on the mat all day.", "A cat rested.") + \
        task_block(5, "Name a primary color.", "", "Red.") + "###\n6. Instruction: Cut off"
    raw_continuation = text.split("4. Instruction:", 1)[1]
    assert parse_tasks(raw_continuation, chat=False, truncated=True, first_number=4) == [
        ("Summarize the text in one sentence.", "The cat sat on the mat all day.", "A cat rested."),
        ("Name a primary color.", "", "Red."),
    ]


def test_alpaca_blacklist_is_larger():
    assert rejection_reason("Compose a short piece of music for piano.", AlpacaConfig()) == "blacklist:music"
    assert rejection_reason("Draw a flowchart of the login process.", AlpacaConfig()) == "blacklist:draw"


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="not yet seen passing: whether the 135M model follows the 20-task record format "
                   "was not measured before this session ended (closing note of 2026-11-22); remove once it passes")
def test_real_alpaca_run_on_the_embedded_model(db_url):
    result = runner.invoke(app, ["alpaca", "--seeds", str(SEEDS), "-n", "2", "--run", "a", "--db", db_url,
                                 "--backend", "transformers", "--request-batch-size", "4", "--max-tokens", "384", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["accepted"] == 2
    check_store_independently(db_url, "a", 2)
