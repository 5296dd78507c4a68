"""The CLI as a user meets it: help on every command, generate on the real model, bad input, runs."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from storage.store import open_engine
from storage.tables import Generation, Run

runner = CliRunner()


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, command in click_group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help():
    names = list(_commands(app))
    assert {("generate",), ("models", "list"), ("models", "prepare"), ("runs", "list"), ("runs", "show")} <= set(names)
    for name in names:
        result = runner.invoke(app, [*name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("datagen 0.")


def test_generate_records_every_call(tmp_path, db_url, embedded_model_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The capital of France is"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hello."}]}) + "\n"
    )
    result = runner.invoke(
        app, ["generate", str(prompts), "--backend", "transformers", "--max-tokens", "8", "--temperature", "0",
              "--n", "1", "--run", "smoke", "--db", db_url, "--json"],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["line"] for line in lines] == [1, 2]
    assert "Paris" in lines[0]["text"]
    with Session(open_engine(db_url)) as session:
        run = session.exec(select(Run)).one()
        assert (run.name, run.status, run.requests, run.generated) == ("smoke", "completed", 2, 2)
        generations = session.exec(select(Generation).order_by(Generation.id)).all()
        assert generations[0].prompt == "The capital of France is"
        assert generations[1].prompt.startswith("<|im_start|>")  # the exact chat-templated prompt is kept
        assert generations[0].completion == lines[0]["text"]
        assert generations[0].sampling["max_tokens"] == 8
    listed = runner.invoke(app, ["runs", "list", "--db", db_url, "--json"])
    assert json.loads(listed.stdout)[0]["name"] == "smoke"
    shown = runner.invoke(app, ["runs", "show", "smoke", "--db", db_url, "--json"])
    assert json.loads(shown.stdout)["config"]["sampling"]["temperature"] == 0


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "ok"}\n{"prompt": \n', "prompts.jsonl:2: invalid JSON"),
        (b'{"prompt": "ok"}\n{"text": "x"}\n', "prompts.jsonl:2: missing field 'prompt'"),
        (b'{"prompt": 5}\n', "prompts.jsonl:1: field 'prompt' must be a string, got int"),
        (b'{"messages": "hi"}\n', "prompts.jsonl:1: field 'messages' must be a non-empty list"),
        (b'{"prompt": "a"}\n\n{"prompt": "b"}\n', "prompts.jsonl:2: empty line"),
        (b'["a"]\n', "prompts.jsonl:1: expected a JSON object"),
        (b"", "prompts.jsonl: the file is empty"),
        (b"\x00\x01\x02binary", "prompts.jsonl: this is a binary file"),
    ],
)
def test_bad_prompts_exit_2_and_write_nothing(tmp_path, db_url, content, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    result = runner.invoke(app, ["generate", str(prompts), "--db", db_url])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "datagen.db").exists()


def test_missing_prompts_file(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_openai_backend_needs_a_base_url(tmp_path, db_url):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    result = runner.invoke(app, ["generate", str(prompts), "--backend", "openai", "--db", db_url])
    assert result.exit_code == 2 and "--base-url" in result.output


def test_unknown_run_is_exit_2(db_url):
    open_engine(db_url).dispose()
    result = runner.invoke(app, ["runs", "show", "nope", "--db", db_url])
    assert result.exit_code == 2 and "no run named" in result.output


# Exit codes and tracebacks of bad input, unreachable or locked databases and dead servers are checked with
# `datagen` as a real subprocess in tests/test_hardening.py: CliRunner catches what a user would see as a traceback.


def test_boolean_flags_show_no_value_in_help():
    """Typer's rich help labelled flags `<bool>` (`--overwrite <bool>`, `--version <bool>`) as if they took a value."""
    from typer.testing import CliRunner as _Runner

    from datagen.cli import app as _app

    for args in (["--help"], ["export", "--help"], ["ui", "--help"], ["runs", "list", "--help"]):
        shown = _Runner().invoke(_app, args, env={"COLUMNS": "200"}).output
        assert "<bool>" not in shown and "--help" in shown, args
    assert "<str>" in _Runner().invoke(_app, ["export", "--help"], env={"COLUMNS": "200"}).output  # options with values keep theirs


def test_summary_figures_never_use_exponent_notation():
    """A loop's 5,960 seconds printed as 5.96e+03 (rich summary tables format floats to 3 significant digits)."""
    from datagen.console import shown

    assert [shown(v) for v in (5960.3, 130.55, 0.123456, 12, "x")] == ["5,960", "131", "0.123", "12", "x"]
