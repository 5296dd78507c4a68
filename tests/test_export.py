"""`datagen export`: every format round-trips through `datasets` and matches the store; bad input leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import datasets
import pytest
import yaml
from rouge_score import rouge_scorer
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from datagen.export import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt, max_rouge_l, word_ngrams
from storage.store import open_engine
from storage.tables import Generation, Instance, Run, Task
from tests.conftest import REPO
from tests.example_runs import SEED_RECORDS, TOOLFORMER_TEXTS, build_run, build_toolformer_run

runner = CliRunner()

COLUMNS = {
    "alpaca": ["instruction", "input", "output", "text"],
    "messages": ["messages"],
    "prompt-completion": ["prompt", "completion"],
}
PROVENANCE = ["run", "model", "generation_id", "similarity"]


@pytest.fixture
def store(db_url):
    engine = open_engine(db_url)
    with Session(engine) as session:
        build_run(session, "si-test", tasks=40)
        build_run(session, "si-second", tasks=12, first=150)
        empty = Run(name="empty", pipeline="self-instruct", model="smollm2-135m", backend="transformers")
        session.add(empty)
        session.commit()
    return db_url


def export(db_url: str, out: Path, *args: str):
    result = runner.invoke(app, ["export", "--out", str(out), "--db", db_url, *args])
    return result


def expected_rows(db_url: str, run: str) -> list[tuple[str, str, str]]:
    """(instruction, input, output) of accepted instances of accepted generated tasks, straight from the store."""
    with Session(open_engine(db_url)) as session:
        rows = session.exec(
            select(Task.instruction, Instance.input, Instance.output)
            .join(Instance, Instance.task_id == Task.id)
            .join(Run, Run.id == Task.run_id)
            .where(Run.name == run, Task.source == "generated", Task.status == "accepted", Instance.status == "accepted")
        ).all()
    return sorted(tuple(r) for r in rows)


def rows_of(record: dict, format: str) -> tuple[str, str, str]:
    """Back from a record to (instruction, input, output), per format."""
    if format == "alpaca":
        return record["instruction"], record["input"], record["output"]
    if format == "messages":
        user = next(t["content"] for t in record["messages"] if t["role"] == "user")
        instruction, _, input = user.partition("\n\n")
        return instruction, input, record["messages"][-1]["content"]
    prompt = record["prompt"]
    instruction = prompt.split("### Instruction:\n", 1)[1].split("\n\n### ", 1)[0]
    input = prompt.split("### Input:\n", 1)[1].split("\n\n### Response:", 1)[0] if "### Input:" in prompt else ""
    return instruction, input, record["completion"]


@pytest.mark.parametrize("format", ["alpaca", "messages", "prompt-completion"])
def test_every_format_round_trips_through_datasets(store, tmp_path, format):
    out = tmp_path / "export"
    result = export(store, out, "--run", "si-test", "--format", format)
    assert result.exit_code == 0, result.output

    saved = datasets.load_from_disk(str(out))
    parquet = datasets.load_dataset(
        "parquet", data_files={s: str(out / "data" / f"{s}.parquet") for s in ("train", "test")}, cache_dir=str(tmp_path / "cache")
    )
    jsonl = datasets.load_dataset(
        "json", data_files={s: str(out / "data" / f"{s}.jsonl") for s in ("train", "test")}, cache_dir=str(tmp_path / "cache")
    )
    assert set(saved) == {"train", "test"}
    for split in ("train", "test"):
        assert saved[split].column_names == COLUMNS[format]
        assert saved[split].to_list() == parquet[split].to_list() == jsonl[split].to_list()
        assert saved[split].features == parquet[split].features

    # Every exported row is an accepted instance of an accepted generated task, and every such instance is exported.
    exported = sorted(rows_of(r, format) for split in saved.values() for r in split)
    assert exported == expected_rows(store, "si-test")

    # Split by instruction: none on both sides, ceil(5% of instructions) held out.
    train_instructions = {rows_of(r, format)[0] for r in saved["train"]}
    test_instructions = {rows_of(r, format)[0] for r in saved["test"]}
    assert not train_instructions & test_instructions
    tasks = len(train_instructions | test_instructions)
    assert len(test_instructions) == math.ceil(0.05 * tasks)

    meta = json.loads((out / "datagen.json").read_text())
    assert meta["format"] == format and meta["runs"] == ["si-test"] and meta["columns"] == COLUMNS[format]
    assert meta["counts"]["train"] == len(saved["train"]) and meta["counts"]["test"] == len(saved["test"])
    assert meta["counts"]["tasks_without_instances"] == 1  # build_run's task 2
    assert meta["datagen_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]


def test_alpaca_text_is_the_stanford_template(store, tmp_path):
    assert export(store, tmp_path / "out", "--run", "si-test", "--format", "alpaca").exit_code == 0
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"].to_list()
    with_input = next(r for r in rows if r["input"])
    without_input = next(r for r in rows if not r["input"])
    assert with_input["text"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{with_input['instruction']}\n\n### Input:\n{with_input['input']}\n\n### Response:\n{with_input['output']}"
    )
    assert without_input["text"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{without_input['instruction']}\n\n### Response:\n{without_input['output']}"
    )
    assert alpaca_prompt("Do it.", "  ") == ALPACA_PROMPT_NO_INPUT.format(instruction="Do it.")
    assert alpaca_prompt("Do it.", "x") == ALPACA_PROMPT_INPUT.format(instruction="Do it.", input="x")


def test_prompt_completion_concatenates_to_alpaca_text(store, tmp_path):
    assert export(store, tmp_path / "a", "--run", "si-test", "--format", "alpaca").exit_code == 0
    assert export(store, tmp_path / "p", "--run", "si-test", "--format", "prompt-completion").exit_code == 0
    alpaca = datasets.load_from_disk(str(tmp_path / "a"))
    completion = datasets.load_from_disk(str(tmp_path / "p"))
    for split in ("train", "test"):
        assert [r["text"] for r in alpaca[split]] == [r["prompt"] + r["completion"] for r in completion[split]]


def test_messages_with_a_system_turn(store, tmp_path):
    result = export(store, tmp_path / "m", "--run", "si-test", "--format", "messages", "--system", "You are helpful.")
    assert result.exit_code == 0, result.output
    record = datasets.load_from_disk(str(tmp_path / "m"))["train"][0]
    assert [t["role"] for t in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][0]["content"] == "You are helpful."
    assert export(store, tmp_path / "x", "--run", "si-test", "--format", "alpaca", "--system", "hi").exit_code == 2


def test_split_is_deterministic_for_a_seed(store, tmp_path):
    def test_split(name: str, seed: str) -> list:
        assert export(store, tmp_path / name, "--run", "si-test", "--format", "alpaca", "--seed", seed, "--test-size", "0.2").exit_code == 0
        return datasets.load_from_disk(str(tmp_path / name))["test"].to_list()

    assert test_split("a", "1") == test_split("b", "1")
    assert test_split("a2", "1") != test_split("c", "2")


def test_test_size_zero_writes_train_only(store, tmp_path):
    assert export(store, tmp_path / "o", "--run", "si-test", "--format", "alpaca", "--test-size", "0").exit_code == 0
    saved = datasets.load_from_disk(str(tmp_path / "o"))
    assert list(saved) == ["train"] and len(saved["train"]) == len(expected_rows(store, "si-test"))
    card = yaml.safe_load((tmp_path / "o" / "README.md").read_text().split("---")[1])
    assert [f["split"] for f in card["configs"][0]["data_files"]] == ["train"]


def test_provenance_columns_point_back_into_the_store(store, tmp_path):
    result = export(store, tmp_path / "p", "--run", "si-test", "--run", "si-second", "--format", "alpaca", "--with-provenance")
    assert result.exit_code == 0, result.output
    saved = datasets.load_from_disk(str(tmp_path / "p"))
    assert saved["train"].column_names == COLUMNS["alpaca"] + PROVENANCE
    rows = [r for split in saved.values() for r in split]
    assert {r["run"] for r in rows} == {"si-test", "si-second"}
    assert len(rows) == len(expected_rows(store, "si-test")) + len(expected_rows(store, "si-second"))
    with Session(open_engine(store)) as session:
        for row in rows:
            generation = session.get(Generation, row["generation_id"])
            run = session.get(Run, generation.run_id)
            assert run.name == row["run"] and generation.model == row["model"] and generation.purpose == "instances"
            instance = session.exec(select(Instance).where(Instance.generation_id == generation.id, Instance.output == row["output"])).first()
            assert instance is not None and instance.input == row["input"] and instance.status == "accepted"
            task = session.exec(select(Task).where(Task.run_id == run.id, Task.instruction == row["instruction"])).one()
            assert row["similarity"] == task.similarity


def test_card_front_matter_and_prose(store, tmp_path):
    out = tmp_path / "card"
    assert export(store, out, "--run", "si-test", "--format", "messages", "--license", "apache-2.0").exit_code == 0
    text = (out / "README.md").read_text()
    _, front, prose = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and "license_name" not in meta and meta["language"] == ["en"]
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    for data_file in meta["configs"][0]["data_files"]:
        assert fnmatch(f"data/{data_file['split']}.parquet", data_file["path"])  # the local file
        assert fnmatch(f"data/{data_file['split']}-00000-of-00001.parquet", data_file["path"])  # push_to_hub's shard
    # The card's prose says how the data was made, with the store's own numbers.
    for expected in (
        "smollm2-135m", "transformers", "100 seed tasks from `examples/seed_tasks.jsonl`", "exceeds 0.7",
        "| instructions | `{\"temperature\": 0.7, \"top_p\": 0.5", "| rouge_similarity | 4 |", "| empty_output |",
        "40 generated, 30 accepted, 10 rejected", "Not decontaminated", "Known limitations", "@inproceedings{wang-etal-2023-self-instruct",
        "stanford_alpaca", "schick2023toolformer",
    ):  # fmt: skip
        assert expected in prose, expected


def test_decontamination_drops_and_counts(store, tmp_path):
    rows = expected_rows(store, "si-test")
    copied = rows[0]  # an instruction copied into the eval set: ROUGE-L 1.0
    leaked = next(r for r in rows if len(re.findall(r"\w+", r[2])) >= 20 and r[0] != copied[0])  # 15 words of its output
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(
        json.dumps({"instruction": copied[0]}) + "\n"
        + json.dumps({"question": "Unrelated question about the weather today?", "answer": " ".join(re.findall(r"\w+", leaked[2])[2:17])}) + "\n"
        + json.dumps({"text": "A completely different sentence that shares nothing."}) + "\n"
    )  # fmt: skip
    result = export(store, tmp_path / "d", "--run", "si-test", "--format", "alpaca", "--decontaminate", str(eval_set))
    assert result.exit_code == 0, result.output
    saved = datasets.load_from_disk(str(tmp_path / "d"))
    kept = {r["instruction"] for split in saved.values() for r in split}
    assert copied[0] not in kept and leaked[0] not in kept
    dropped_copied = sum(r[0] == copied[0] for r in rows)
    dropped_leaked = sum(r[0] == leaked[0] and r[2] == leaked[2] for r in rows)
    meta = json.loads((tmp_path / "d" / "datagen.json").read_text())
    assert meta["counts"]["decontaminated"] == {"rougeL": dropped_copied, "13-gram": dropped_leaked}
    assert meta["counts"]["rows"] == len(rows) - dropped_copied - dropped_leaked
    card = (tmp_path / "d" / "README.md").read_text()
    assert f"({dropped_copied} rows)" in card and "13-word sequence" in card

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"answer": "no text field"}\n')
    result = export(store, tmp_path / "e", "--run", "si-test", "--format", "alpaca", "--decontaminate", str(bad))
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output and not (tmp_path / "e").exists()


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    instructions = [r["instruction"] for r in SEED_RECORDS]
    queries, references = instructions[100:130], instructions[:100]
    expected = [max(scorer.score(ref, q)["rougeL"].fmeasure for ref in references) for q in queries]
    assert max_rouge_l(queries, references) == pytest.approx(expected, abs=1e-12)
    assert max_rouge_l(["anything"], []) == [0.0] and max_rouge_l(["!!!"], ["a b"]) == [0.0]


def test_word_ngrams():
    assert word_ngrams("One, two THREE four", 3) == {("one", "two", "three"), ("two", "three", "four")}
    assert word_ngrams("too short", 13) == set()


# --- Bad input -----------------------------------------------------------------------------------------------------------


def test_unknown_run_unknown_format_and_empty_run(store, tmp_path):
    out = tmp_path / "out"
    result = export(store, out, "--run", "nope", "--format", "alpaca")
    assert result.exit_code == 2 and "no run named or numbered 'nope'" in result.output
    result = export(store, out, "--run", "si-test", "--format", "sharegpt")
    assert result.exit_code == 2 and "'--format'" in result.output
    result = export(store, out, "--run", "si-test", "--run", "empty", "--format", "alpaca")
    assert result.exit_code == 2 and "run 'empty' has no accepted rows" in result.output
    result = export(store, out, "--run", "si-test", "--format", "alpaca", "--test-size", "1.5")
    assert result.exit_code == 2 and "--test-size" in result.output
    assert not out.exists()


def test_toolformer_format_says_there_are_no_toolformer_runs(store, tmp_path):
    result = export(store, tmp_path / "t", "--run", "si-test", "--format", "toolformer")
    assert result.exit_code == 2 and "no Toolformer runs exist in the store" in result.output
    assert not (tmp_path / "t").exists()


def test_toolformer_texts_with_kept_calls(store, tmp_path):
    with Session(open_engine(store)) as session:
        build_toolformer_run(session, "tf-test")
    out = tmp_path / "tf"
    result = export(store, out, "--run", "tf-test", "--format", "toolformer", "--test-size", "0.2", "--with-provenance")
    assert result.exit_code == 0, result.output
    saved = datasets.load_from_disk(str(out))
    parquet = datasets.load_dataset("parquet", data_files={s: str(out / "data" / f"{s}.parquet") for s in saved}, cache_dir=str(tmp_path / "c"))
    assert saved["train"].column_names == ["text"] + PROVENANCE
    texts = sorted(r["text"] for split in saved.values() for r in split)
    assert texts == sorted(r["text"] for split in parquet.values() for r in split)
    assert "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed the test." in texts
    assert len(texts) == sum(1 for t in TOOLFORMER_TEXTS if t[2]) and len(saved["test"]) == 1  # ceil(0.2 * 5)
    with Session(open_engine(store)) as session:
        for row in (r for split in saved.values() for r in split):
            assert session.get(Generation, row["generation_id"]).purpose == "api_calls" and row["similarity"] is None
    card = (out / "README.md").read_text()
    for expected in ("Toolformer fine-tuning data", "6 texts processed. Exported (at least one kept call): 5; left out (no kept call, as in the paper's C*): 1", "| calculator | 0.0 | 20 | 10 | 0.5 |",
                     "schick2023toolformer", "[Calculator(400 / 1400) -> 0.29]"):  # fmt: skip
        assert expected in card, expected

    result = export(store, tmp_path / "x", "--run", "si-test", "--format", "toolformer")
    assert result.exit_code == 2 and "is a self-instruct run" in result.output
    result = export(store, tmp_path / "x", "--run", "tf-test", "--format", "alpaca")
    assert result.exit_code == 2 and "export it with --format toolformer" in result.output
    assert not (tmp_path / "x").exists()


def test_existing_folder_needs_overwrite_and_only_an_export_is_replaced(store, tmp_path):
    """--overwrite replaces an earlier export, never a folder datagen did not write nor a file dropped into an export."""
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "notes.txt").write_text("mine")
    result = export(store, out, "--run", "si-test", "--format", "alpaca")
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = export(store, out, "--run", "si-test", "--format", "alpaca", "--overwrite")
    assert result.exit_code == 2 and "is not a datagen export" in result.output
    (out / "datagen.json").write_text('{"note": "a file of the same name, not an export marker"}')
    assert export(store, out, "--run", "si-test", "--format", "alpaca", "--overwrite").exit_code == 2
    assert (out / "keep" / "notes.txt").read_text() == "mine"

    exported = tmp_path / "exported"
    assert export(store, exported, "--run", "si-test", "--format", "alpaca").exit_code == 0
    result = export(store, exported, "--run", "si-second", "--format", "alpaca", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((exported / "datagen.json").read_text())["runs"] == ["si-second"]
    (exported / "keep.txt").write_text("mine")
    result = export(store, exported, "--run", "si-test", "--format", "alpaca", "--overwrite")
    assert result.exit_code == 2 and "holds keep.txt, which no export writes" in result.output
    assert (exported / "keep.txt").read_text() == "mine" and json.loads((exported / "datagen.json").read_text())["runs"] == ["si-second"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(store, empty, "--run", "si-test", "--format", "alpaca").exit_code == 0  # an empty folder is fine


KILL_DURING = {
    # where the export is killed: after a split's files are half-written, or between moving the old export aside and
    # renaming the new one into place
    "writing": "datasets.Dataset.to_json = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)",
    "renaming": (
        "rename = pathlib.Path.rename\n"
        "def kill_on_publish(self, target):\n"
        "    if '.partial-' in self.name: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return rename(self, target)\n"
        "pathlib.Path.rename = kill_on_publish"
    ),
}


@pytest.mark.parametrize("moment", list(KILL_DURING))
def test_kill_9_during_an_export_leaves_the_old_one_and_the_next_export_cleans_up(store, tmp_path, moment):
    out = tmp_path / "out"
    assert export(store, out, "--run", "si-test", "--format", "alpaca").exit_code == 0
    script = (
        "import os, pathlib, signal, sys\nimport datasets\n" + KILL_DURING[moment] + "\n"
        "from datagen.cli import app\nsys.argv = ['datagen'] + sys.argv[1:]\napp()"
    )
    command = [sys.executable, "-c", script, "export", "--run", "si-second", "--format", "alpaca", "--out", str(out),
               "--overwrite", "--db", store]  # fmt: skip
    killed = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert leftovers and all(re.fullmatch(r"\.out\.(partial|old)-\d+", name) for name in leftovers)
    if moment == "renaming":
        assert not out.exists()  # the previous export sits in .out.old-PID

    assert export(store, tmp_path / "other", "--run", "si-test", "--format", "alpaca").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == leftovers  # not its business
    result = export(store, out, "--run", "si-second", "--format", "alpaca", "--overwrite")
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((out / "datagen.json").read_text())["runs"] == ["si-second"]


def test_an_export_killed_while_renaming_is_put_back(store, tmp_path):
    """Without --overwrite the next export finds the previous one restored from .NAME.old-PID, and refuses to replace it."""
    out = tmp_path / "out"
    assert export(store, out, "--run", "si-test", "--format", "alpaca").exit_code == 0
    old = tmp_path / f".out.old-{2**22 + 12345}"  # above Linux's default pid_max: no such process
    out.rename(old)
    result = export(store, out, "--run", "si-second", "--format", "alpaca")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert not old.exists() and json.loads((out / "datagen.json").read_text())["runs"] == ["si-test"]


def test_bad_seed_and_out_under_a_file_are_one_line_exit_2(store, tmp_path):
    """Run as a process: CliRunner would hide a traceback."""
    (tmp_path / "afile").write_text("x")
    for args, message in (
        (["--seed", "-1", "--out", str(tmp_path / "o")], "--seed must be 0 or more"),
        (["--out", str(tmp_path / "afile" / "sub")], "afile is a file, not a folder"),
        (["--out", str(tmp_path / "afile")], "exists and is not a folder"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "datagen.cli", "export", "--run", "si-test", "--format", "alpaca", "--db", store, *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists() and (tmp_path / "afile").read_text() == "x"


def test_split_keeps_an_instruction_of_several_runs_on_one_side(store, tmp_path):
    """Two runs that generated the same instructions: each instruction's rows are all in train or all in test."""
    with Session(open_engine(store)) as session:
        build_run(session, "si-overlap", tasks=16, first=100)  # the same instructions as si-test's first 16
        session.commit()
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        result = export(store, out, "--run", "si-test", "--run", "si-overlap", "--format", "alpaca", "--test-size", "0.3",
                        "--seed", str(seed))  # fmt: skip
        assert result.exit_code == 0, result.output
        saved = datasets.load_from_disk(str(out))
        train, test = ({r["instruction"] for r in saved[split]} for split in ("train", "test"))
        assert test and not train & test
        assert json.loads((out / "datagen.json").read_text())["counts"]["tasks"] == len(train | test)


def test_split_key_normalizes_case_and_spacing():
    from datagen.export import split_key

    assert split_key("  Write a\n poem  about   the SEA.") == split_key("write a poem about the sea.") == "write a poem about the sea."
    assert split_key("Write a poem.") != split_key("Write a poem!")


def test_a_failure_while_writing_leaves_nothing_behind(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert export(store, out, "--run", "si-test", "--format", "alpaca").exit_code == 0
    before = sorted(p.name for p in out.rglob("*"))

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_json", broken)
    result = export(store, out, "--run", "si-second", "--format", "alpaca", "--overwrite")
    assert result.exit_code != 0
    assert sorted(p.name for p in out.rglob("*")) == before  # the previous export is untouched
    assert json.loads((out / "datagen.json").read_text())["runs"] == ["si-test"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    result = export(store, tmp_path / "new", "--run", "si-test", "--format", "alpaca")
    assert result.exit_code != 0 and not (tmp_path / "new").exists()


# --- Push to the Hub (no network here: everything up to the upload) --------------------------------------------------------


def test_push_to_hub_hands_the_dataset_and_card_to_the_hub_clients(store, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create"] = {"repo_id": repo_id, **kwargs}

    def fake_push(self, repo_id, **kwargs):
        calls["push"] = {"repo_id": repo_id, "splits": {k: v.to_list() for k, v in self.items()}, "after": list(calls), **kwargs}

    def fake_upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload"] = kwargs | {"files": {p: (folder / p).read_text() for p in kwargs["allow_patterns"]}}

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    out = tmp_path / "hub"
    result = export(store, out, "--run", "si-test", "--format", "alpaca", "--push-to-hub", "someone/si-test", "--private", "--json")
    assert result.exit_code == 0, result.output
    saved = datasets.load_from_disk(str(out))
    assert calls["create"] == {"repo_id": "someone/si-test", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert calls["push"]["repo_id"] == "someone/si-test" and calls["push"]["private"] is True
    assert calls["push"]["after"] == ["create", "upload"]  # the card is in the repository before push_to_hub updates it
    assert calls["push"]["splits"] == {k: v.to_list() for k, v in saved.items()}
    assert calls["upload"]["repo_id"] == "someone/si-test" and calls["upload"]["repo_type"] == "dataset"
    assert calls["upload"]["files"]["README.md"] == (out / "README.md").read_text()
    assert json.loads(calls["upload"]["files"]["datagen.json"])["format"] == "alpaca"
    assert json.loads(result.stdout)["hub"] == "https://huggingface.co/datasets/someone/si-test"


def test_push_to_hub_keeps_the_uploaded_card_and_adds_dataset_info(store, tmp_path):
    """What DatasetDict.push_to_hub does with the card already in the repository, run on the export folder itself
    (datasets' own _get_updated_dataset_card, over a local file system instead of the Hub's)."""
    from datasets.arrow_dataset import _get_updated_dataset_card
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "hub"
    assert export(store, out, "--run", "si-test", "--format", "alpaca").exit_code == 0
    saved = datasets.load_from_disk(str(out))
    card, _ = _get_updated_dataset_card(
        fs=DirFileSystem(fs=LocalFileSystem(), path=str(out)), config_name="default",
        splits_info=[datasets.SplitInfo(name, num_bytes=1000, num_examples=len(split)) for name, split in saved.items()],
        features=saved["train"].features, data_dir="data", set_default=None, uploaded_sizes=[500, 50], deleted_sizes=[0, 0],
        remove_other_splits=False,
    )  # fmt: skip
    ours = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    hub = card.data.to_dict()
    assert {s["name"]: s["num_examples"] for s in hub["dataset_info"]["splits"]} == {k: len(v) for k, v in saved.items()}
    assert [f["name"] for f in hub["dataset_info"]["features"]] == COLUMNS["alpaca"]
    for key in ("license", "license_name", "language", "size_categories", "task_categories", "pretty_name", "tags"):
        assert hub[key] == ours[key], key
    assert str(card).split("\n---\n", 1)[1] == (out / "README.md").read_text().split("\n---\n", 1)[1]  # the prose, whole


def test_card_size_categories_and_license_name(store, tmp_path):
    from datagen.card import size_category

    assert [size_category(n) for n in (999, 1_000, 9_999_999, 10_000_000, 99_999_999, 100_000_000, 10**12)] == [
        "n<1K", "1K<n<10K", "1M<n<10M", "10M<n<100M", "10M<n<100M", "100M<n<1B", "n>1T"]  # fmt: skip
    assert export(store, tmp_path / "o", "--run", "si-test", "--format", "alpaca").exit_code == 0
    front = yaml.safe_load((tmp_path / "o" / "README.md").read_text().split("---")[1])
    assert (front["license"], front["license_name"]) == ("other", "synthetic-seed-and-model-terms")
    assert "## License" in (tmp_path / "o" / "README.md").read_text()
    assert export(store, tmp_path / "n", "--run", "si-test", "--format", "alpaca", "--license-name", "my-terms-1.0").exit_code == 0
    assert yaml.safe_load((tmp_path / "n" / "README.md").read_text().split("---")[1])["license_name"] == "my-terms-1.0"
    result = export(store, tmp_path / "x", "--run", "si-test", "--format", "alpaca", "--license", "mit", "--license-name", "x")
    assert result.exit_code == 2 and "--license-name applies to --license other" in result.output


def test_push_to_hub_failure_keeps_the_local_export(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "hub"
    result = export(store, out, "--run", "si-test", "--format", "alpaca", "--push-to-hub", "someone/si-test")
    assert result.exit_code == 1 and "pushing to the Hub as someone/si-test failed" in result.output
    assert datasets.load_from_disk(str(out))["train"].num_rows > 0
    result = export(store, tmp_path / "x", "--run", "si-test", "--format", "alpaca", "--push-to-hub", "not a repo")
    assert result.exit_code == 2 and "OWNER/NAME" in result.output and not (tmp_path / "x").exists()


@pytest.mark.postgres
def test_export_and_report_on_postgres(postgres_url, tmp_path):
    """The same queries on PostgreSQL (JSON columns, grouped counts, outer joins)."""
    import uuid

    name = f"pg-{uuid.uuid4().hex[:8]}"
    with Session(open_engine(postgres_url)) as session:
        build_run(session, name, tasks=12)
    result = export(postgres_url, tmp_path / "pg", "--run", name, "--format", "alpaca", "--with-provenance")
    assert result.exit_code == 0, result.output
    saved = datasets.load_from_disk(str(tmp_path / "pg"))
    assert sorted(rows_of(r, "alpaca") for split in saved.values() for r in split) == expected_rows(postgres_url, name)
    assert "| instructions | `{\"temperature\": 0.7" in (tmp_path / "pg" / "README.md").read_text()
    result = runner.invoke(app, ["report", "--run", name, "--out", str(tmp_path / "report"), "--db", postgres_url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accepted"] == 9


@pytest.mark.parametrize("format", ["alpaca", "messages", "prompt-completion", "toolformer"])
def test_exports_feed_the_trainer_without_conversion(store, tmp_path, format):
    """`datagen train` opens what `datagen export` writes (train/data.py: open_export, training_split)."""
    from train.data import open_export, training_split

    if format == "toolformer":
        with Session(open_engine(store)) as session:
            build_toolformer_run(session, "tf-test")
    run = "tf-test" if format == "toolformer" else "si-test"
    assert export(store, tmp_path / "e", "--run", run, "--format", format, "--with-provenance").exit_code == 0
    opened = open_export(tmp_path / "e")
    assert opened.format == format and opened.runs == [run]
    train, test = training_split(opened, "train"), training_split(opened, "test")
    assert len(train) == len(opened.splits["train"]) and len(test) == len(opened.splits["test"]) >= 1
    if format == "alpaca":
        first = opened.splits["train"][0]
        assert train[0]["prompt"] == alpaca_prompt(first["instruction"], first["input"]) and train[0]["completion"] == first["output"]


def test_a_real_self_instruct_run_of_the_embedded_model_exports_and_reports(db_url, tmp_path, embedded_model_path):
    """End to end on the real model: `datagen self-instruct` (tiny), then export every instruction format and report."""
    from tests.conftest import SEEDS

    tiny = ["--backend", "transformers", "--request-batch-size", "4", "--max-tokens", "128", "--instance-max-tokens", "64"]
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "-n", "2", "--run", "tiny", "--db", db_url, *tiny, "--json"])
    assert result.exit_code == 0, result.output
    expected = expected_rows(db_url, "tiny")
    assert len({r[0] for r in expected}) == 2  # two accepted instructions, each with its instances

    for format in COLUMNS:
        out = tmp_path / format
        result = export(db_url, out, "--run", "tiny", "--format", format, "--test-size", "0.5", "--with-provenance")
        assert result.exit_code == 0, result.output
        saved = datasets.load_from_disk(str(out))
        assert sorted(rows_of(r, format) for split in saved.values() for r in split) == expected
        assert len({rows_of(r, format)[0] for r in saved["test"]}) == 1
        with Session(open_engine(db_url)) as session:
            for row in (r for split in saved.values() for r in split):
                generation = session.get(Generation, row["generation_id"])
                assert generation.purpose == "instances" and generation.model == row["model"] == "smollm2-135m"
    card = (tmp_path / "alpaca" / "README.md").read_text()
    assert "175 seed tasks from" in card and "exceeds 0.7" in card and "| instructions | `{\"temperature\": 0.7" in card

    result = runner.invoke(app, ["report", "--run", "tiny", "--out", str(tmp_path / "report"), "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accepted"] == 2
    assert (tmp_path / "report" / "seed_similarity.png").read_bytes()[:4] == b"\x89PNG"
