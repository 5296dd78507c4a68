"""`datagen train` on the real embedded model, from real `datagen export` folders.

Each method (full, lora, qlora, dora) trains a few steps on a different export format, must lower the held-out
eval loss, and its result (merged/ or the full model) must load and generate through the transformers backend.
Bad input must exit 2 before any model is loaded. Packing must keep examples from attending to each other. A
crashed run resumes from its checkpoint, and two processes on gloo run the distributed path.
Runs use one torch thread while the machine is busy (tests/conftest.py, `one_thread`); CI keeps torch's default.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from storage.store import open_engine
from storage.tables import Run, TrainingRun, TrainingRunSource
from tests.conftest import REPO
from tests.example_runs import build_run, build_toolformer_run

runner = CliRunner()

TINY = ["--batch-size", "2", "--grad-accum", "1", "--max-length", "128", "--no-gradient-checkpointing",
        "--set", "max_eval_samples=6", "--set", "eval_batch_size=6"]  # fmt: skip
"""Small enough for ~3 s steps on one CPU thread (issue 7: 8.9 GB peak at batch 8 x 256)."""

METHOD_RUNS = {
    # method: (export format, extra flags); each format is trained by one method
    "full": ("alpaca", ["--lr", "5e-5"]),
    "lora": ("messages", ["--lr", "1e-3", "--merge", "--set", "merged_dtype=float32"]),
    "qlora": ("prompt-completion", ["--lr", "1e-3", "--merge"]),
    "dora": ("alpaca", ["--lr", "1e-3", "--merge"]),
}
STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store holding one self-instruct run ('si-test') with real seed-task text."""
    url = f"sqlite:///{tmp_path_factory.mktemp('train_store') / 'datagen.db'}"
    with Session(open_engine(url)) as session:
        build_run(session, "si-test", tasks=40)
        session.commit()
    return url


@pytest.fixture(scope="module")
def exports(store, tmp_path_factory) -> dict[str, Path]:
    """`datagen export` of the run in three formats, 20% of the tasks held out as the test split."""
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for format in ("alpaca", "messages", "prompt-completion"):
        folders[format] = root / format
        result = runner.invoke(
            app, ["export", "--run", "si-test", "--format", format, "--out", str(folders[format]), "--test-size", "0.2", "--db", store]
        )
        assert result.exit_code == 0, result.output
    return folders


@pytest.fixture(scope="module")
def trained(exports, store, tmp_path_factory, embedded_model_path):
    """Train a method once per module (through the CLI) and share its output folder."""
    done: dict[str, Path] = {}

    def train(method: str) -> Path:
        if method not in done:
            format, extra = METHOD_RUNS[method]
            out = tmp_path_factory.mktemp(f"train_{method}") / "out"
            result = runner.invoke(
                app,
                ["train", "--data", str(exports[format]), "--out", str(out), "--method", method, "--max-steps", str(STEPS),
                 "--name", f"test-{method}", "--db", store, *TINY, *extra],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            done[method] = out
        return done[method]

    return train


@pytest.fixture
def no_model_load(monkeypatch, embedded_model_path):
    """Any model load fails the test: bad input must be caught before one."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# --- Every method, end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_method_lowers_eval_loss_and_its_result_generates(method, trained, store):
    out = trained(method)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["method"] == method
    assert summary["format"] == METHOD_RUNS[method][0]
    assert summary["loss_on"] == "completion"
    assert summary["eval_loss"] < summary["initial_eval_loss"], summary
    assert summary["train_tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert (out / "tokenizer.json").is_file() and (out / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    saved = (out / "train_config.yaml").read_text()
    assert f"method: {method}" in saved and f"name: test-{method}" in saved and "learning_rate:" in saved

    if method == "full":
        assert summary["trainable_parameters"] == summary["total_parameters"]
        model_dir = out  # the whole model
    else:
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
        assert summary["trainable_parameters"] < 0.1 * summary["total_parameters"]
        model_dir = out / "merged"
    if method == "qlora":
        lora = json.loads((trained("lora") / "train_summary.json").read_text())
        assert summary["model_memory_bytes"] < 0.5 * lora["model_memory_bytes"]  # 4-bit base weights

    from datagen.backends import Request, SamplingParams
    from datagen.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(model_dir))
    try:
        [result] = backend.generate([Request(messages=({"role": "user", "content": "Name three colors."},),
                                             params=SamplingParams(temperature=0, max_tokens=12))])  # fmt: skip
        assert result.completions[0].text.strip()
    finally:
        backend.close()

    assert summary["export_seed"] == 0 and summary["library_versions"]["peft"]
    with Session(open_engine(store)) as session:
        row = session.exec(select(TrainingRun).where(TrainingRun.name == f"test-{method}")).one()
        assert (row.status, row.steps, row.dataset_runs) == ("completed", STEPS, ["si-test"])
        assert row.summary["dataset_fingerprint"] == summary["dataset_fingerprint"] and set(summary["dataset_fingerprint"]) == {"train", "test"}
        assert row.eval_loss == pytest.approx(summary["eval_loss"])
        run = session.exec(select(Run).where(Run.name == "si-test")).one()
        links = session.exec(select(TrainingRunSource).where(TrainingRunSource.training_run_id == row.id)).all()
        assert [link.run_id for link in links] == [run.id]


def test_merged_model_matches_base_plus_adapter(trained, embedded_model_path):
    """merge_and_unload changes nothing the adapter computes (float32 merge), and training changed the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained("lora")
    ids = torch.tensor([[1, 504, 3458, 314, 4722, 314, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (merged - adapted).abs().max() < 1e-3
    assert (merged - before).abs().max() > 1e-2


def test_qlora_merge_is_the_model_that_was_evaluated(trained, exports, embedded_model_path):
    """OUT/merged of a QLoRA run is the dequantized NF4 base plus the adapter (the default merge_base), saved in the
    compute dtype: its eval loss is the trained model's. Merging into the original weights (peft issues #2105,
    #1080) gives a different model. Tolerances from measurement: the gap was 1.3e-5 (float32), 1.4e-3 and more in
    bfloat16; the original merge was 0.28-0.32 away."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.config import Precision, load_config
    from train.data import open_export, training_split
    from train.sft import build_trainer, load_tokenizer, merge_adapter, token_eval_loss

    out = trained("qlora")
    merge = json.loads((out / "train_summary.json").read_text())["merge"]
    assert (merge["into"], merge["dtype"]) == ("dequantized", "float32")
    assert abs(merge["gap"]) < 5e-4, merge

    # the same metric, on TRL's own tokenization of the same eval rows, for the saved folder and the original merge
    config = load_config(None, dict(data="unused", out=str(out), method="full", max_length=128, max_steps=1, gradient_checkpointing=False))
    rows = training_split(open_export(exports["prompt-completion"]), "test", limit=6)
    saved = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    trainer = build_trainer(saved, load_tokenizer(str(out / "merged")), rows, rows, config, Precision.fp32, "prompt-completion",
                            out / "unused", resuming=False)  # fmt: skip
    assert token_eval_loss(saved, trainer.eval_dataset, trainer.data_collator, 6) == pytest.approx(merge["merged_eval_loss"], abs=1e-5)
    original = merge_adapter(str(embedded_model_path), out, "float32")
    assert abs(token_eval_loss(original, trainer.eval_dataset, trainer.data_collator, 6) - merge["adapter_eval_loss"]) > 0.05


def test_generate_command_on_the_merged_model(trained, tmp_path, db_url):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hello."}]}) + "\n")
    merged = trained("lora") / "merged"
    result = runner.invoke(
        app, ["generate", str(prompts), "--model", str(merged), "--backend", "transformers", "--max-tokens", "8",
              "--temperature", "0", "--db", db_url, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["text"].strip()


# --- Bad input: exit 2, one line, before any model is loaded ---------------------------------------------------------


def _train(args: list[str]):
    return runner.invoke(app, ["train", *args])


def test_not_an_export_folder(tmp_path, db_url, no_model_load):
    (tmp_path / "data").mkdir()
    result = _train(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--db", db_url])
    assert result.exit_code == 2, result.output
    assert "is not a datagen export (no datagen.json)" in result.output
    result = _train(["--data", str(tmp_path / "nowhere/data"), "--out", str(tmp_path / "out"), "--db", db_url])
    assert result.exit_code == 2 and "no such folder" in result.output
    assert not (tmp_path / "datagen.db").exists()  # the data was checked before the store was opened


def test_export_missing_a_column(exports, tmp_path, db_url, no_model_load):
    import datasets

    broken = tmp_path / "broken"
    datasets.load_from_disk(str(exports["alpaca"])).remove_columns("output").save_to_disk(str(broken))
    shutil.copy(exports["alpaca"] / "datagen.json", broken / "datagen.json")
    result = _train(["--data", str(broken), "--out", str(tmp_path / "out"), "--db", db_url])
    assert result.exit_code == 2, result.output
    assert "lacks the column(s) output that format 'alpaca' needs" in result.output


def test_unknown_method_and_option(exports, tmp_path, db_url, no_model_load):
    result = _train(["--data", str(exports["alpaca"]), "--out", str(tmp_path / "out"), "--method", "prefix"])
    assert result.exit_code == 2 and "prefix" in result.output
    result = _train(["--data", str(exports["alpaca"]), "--out", str(tmp_path / "out"), "--set", "lora_rank=8"])
    assert result.exit_code == 2 and "unknown option 'lora_rank': did you mean 'lora_r'?" in result.output
    result = _train(["--data", str(exports["alpaca"]), "--out", str(tmp_path / "out"), "--method", "full", "--merge"])
    assert result.exit_code == 2 and "--merge is for adapter methods" in result.output


def test_qlora_without_bitsandbytes(exports, tmp_path, db_url, no_model_load, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    result = _train(["--data", str(exports["alpaca"]), "--out", str(tmp_path / "out"), "--method", "qlora", "--db", db_url])
    assert result.exit_code == 2, result.output
    assert "--method qlora needs bitsandbytes" in result.output and "pip install 'datagen[train]'" in result.output


def test_existing_output_needs_overwrite_or_resume(exports, tmp_path, db_url, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    result = _train(["--data", str(exports["alpaca"]), "--out", str(out), "--db", db_url])
    assert result.exit_code == 2 and "pass --overwrite to replace it or --resume" in result.output
    result = _train(["--data", str(exports["alpaca"]), "--out", str(out), "--resume", "--db", db_url])
    assert result.exit_code == 2 and "no complete checkpoint in" in result.output
    result = _train(["--data", str(exports["alpaca"]), "--out", str(out), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "pass one of them" in result.output
    result = _train(["--data", str(exports["alpaca"]), "--out", str(out), "--overwrite", "--db", db_url])
    assert result.exit_code == 2 and "was not written by `datagen train`" in result.output
    (out / "train_config.yaml").write_text("a: user file of the same name\n")
    result = _train(["--data", "si-test", "--out", str(out), "--overwrite", "--db", db_url])
    assert result.exit_code == 2 and "was not written by `datagen train`" in result.output
    assert (out / "something").read_text() == "x"


def test_reused_name_rewrites_its_row_and_records_provenance(exports, tmp_path, store, no_model_load):
    """A run's row says what that run trained on: nothing stays from an earlier run of the same --name."""
    import datasets
    import trl

    from train.config import load_config
    from train.sft import CONFIG_FILE, SFTRecipe

    out = tmp_path / "out"
    first = SFTRecipe(load_config(None, dict(data=str(exports["alpaca"]), out=str(out), name="test-reuse")), db_url=store)
    row_id = first._record_start()
    out.mkdir()
    (out / CONFIG_FILE).write_text(first.resolved_config().to_yaml())  # what setup() writes first
    with Session(open_engine(store)) as session:
        row = session.get(TrainingRun, row_id)
        row.status, row.steps, row.eval_loss, row.summary = "completed", 4, 1.5, {"eval_loss": 1.5}
        session.add(row)
        session.commit()

    second = SFTRecipe(load_config(None, dict(data=str(exports["messages"]), out=str(out), name="test-reuse", overwrite=True)), db_url=store)
    assert second._record_start() == row_id
    with Session(open_engine(store)) as session:
        row = session.get(TrainingRun, row_id)
        assert (row.dataset, row.dataset_format, row.status, row.steps, row.eval_loss) == (str(exports["messages"]), "messages", "running", 0, None)
        assert row.config["data"] == str(exports["messages"]) and row.config["overwrite"] is True
        saved = datasets.load_from_disk(str(exports["messages"]))
        assert row.summary["dataset_fingerprint"] == {name: split._fingerprint for name, split in saved.items()}
        assert row.summary["dataset_fingerprint"] != first.provenance()["dataset_fingerprint"]
        assert row.summary["export_seed"] == 0 and row.summary["library_versions"]["trl"] == trl.__version__
        assert len(session.exec(select(TrainingRunSource).where(TrainingRunSource.training_run_id == row_id)).all()) == 1

    result = _train(["--data", str(exports["alpaca"]), "--out", str(tmp_path / "elsewhere"), "--name", "test-reuse", "--db", store])
    assert result.exit_code == 2 and "a training run of that name wrote" in result.output


def test_unknown_run_name(tmp_path, db_url, no_model_load):
    result = _train(["--data", "no-such-run", "--out", str(tmp_path / "out"), "--db", db_url])
    assert result.exit_code == 2 and "no run named or numbered 'no-such-run'" in result.output


# --- Config ------------------------------------------------------------------------------------------------------------


def test_shipped_config_loads_and_flags_win(tmp_path):
    from train.config import Method, load_config, parse_set

    config = load_config(REPO / "examples" / "train_lora.yaml")
    assert (config.method, config.lora_r, config.lora_alpha, config.learning_rate) == (Method.lora, 16, 32, 2e-4)
    overridden = load_config(REPO / "examples" / "train_lora.yaml", {**parse_set(["lora_alpha=64"]), "method": "qlora", "lora_r": 32})
    assert (overridden.method, overridden.lora_r, overridden.lora_alpha) == (Method.qlora, 32, 64)
    full = load_config(None, {"data": "d", "out": "o", "method": "full"})
    assert full.learning_rate == 2e-5 and full.lr_scheduler_type == "cosine" and full.warmup_ratio == 0.03


# --- Data ----------------------------------------------------------------------------------------------------------------


def test_records_per_format(exports):
    from train.data import open_export, training_split

    alpaca = open_export(exports["alpaca"])
    assert (alpaca.format, alpaca.runs) == ("alpaca", ["si-test"])
    row = alpaca.splits["train"][0]
    record = training_split(alpaca, "train")[0]
    assert record["completion"] == row["output"]
    assert record["prompt"] + record["completion"] == row["text"]
    assert record["prompt"].startswith("Below is an instruction that describes a task")
    assert f"### Instruction:\n{row['instruction']}\n\n" in record["prompt"] and "### Response:" in record["prompt"]

    messages = open_export(exports["messages"])
    chat = training_split(messages, "train")[0]
    turns = messages.splits["train"][0]["messages"]
    assert chat["prompt"] == turns[:-1] and chat["completion"] == turns[-1:] and turns[-1]["role"] == "assistant"


def test_record_builders_reject_bad_rows():
    from datagen.errors import BadInput
    from train.data import alpaca_record, messages_record, text_record

    with pytest.raises(BadInput, match="x: the last message must be the assistant's"):
        messages_record({"messages": [{"role": "user", "content": "hi"}]}, "x")
    with pytest.raises(BadInput, match="'text' does not end with 'output'"):
        alpaca_record({"text": "prompt answer", "output": "other"}, "x")
    assert text_record({"text": "2 + 2 = [Calculator(2 + 2) → 4] 4"}, "x") == {"text": "2 + 2 = [Calculator(2 + 2) → 4] 4"}


def test_trl_labels_mask_exactly_the_prompt_of_every_format(exports, store, tmp_path, embedded_model_path):
    """The labels TRL builds (its tokenization, then its collator), per export format: -100 on every prompt token
    and on padding; the completion's tokens, and the end-of-sequence token after them, are learned. Toolformer
    texts have no prompt: every token is learned."""
    from accelerate import PartialState

    from train.config import Precision, load_config
    from train.data import open_export, training_split
    from train.sft import build_trainer, load_model, load_tokenizer

    with Session(open_engine(store)) as session:
        if session.exec(select(Run).where(Run.name == "tf-labels")).first() is None:
            build_toolformer_run(session, "tf-labels")
    toolformer = tmp_path / "toolformer"
    assert runner.invoke(app, ["export", "--run", "tf-labels", "--format", "toolformer", "--out", str(toolformer), "--db", store]).exit_code == 0

    config = load_config(None, dict(data="unused", out=str(tmp_path / "o"), max_length=1024, max_steps=1, gradient_checkpointing=False))
    model = load_model(str(embedded_model_path), config, Precision.fp32, PartialState())
    tokenizer = load_tokenizer(str(embedded_model_path))
    for format, folder in {**exports, "toolformer": toolformer}.items():
        records = training_split(open_export(folder), "train")
        trainer = build_trainer(model, tokenizer, records, None, config, Precision.fp32, format, tmp_path / format, resuming=False)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        for i in range(4):
            ids, labels, real = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i].bool()
            learned = labels != -100
            assert (labels[learned] == ids[learned]).all() and not (learned & ~real).any(), format  # padding is never learned
            if format == "toolformer":
                assert learned[real].all()
                assert tokenizer.decode(ids[real]).startswith(records[i]["text"])
                continue
            first = int(learned.nonzero()[0])
            assert learned[first:].tolist() == real[first:].tolist(), format  # one masked prefix, then all learned
            prompt, completion = tokenizer.decode(ids[:first]), tokenizer.decode(ids[real][first:])
            if format == "messages":
                user = records[i]["prompt"][-1]["content"]
                assert prompt.endswith(f"{user}<|im_end|>\n<|im_start|>assistant\n"), prompt[-200:]  # SmolLM2's chat template
                assert completion == records[i]["completion"][0]["content"] + "<|im_end|>" + "\n" * completion.endswith("\n")
            else:
                assert prompt == records[i]["prompt"] and prompt.endswith("### Response:\n")
                assert completion == records[i]["completion"] + tokenizer.eos_token


def test_packing_resets_positions_and_blocks_attention(exports, tmp_path, db_url, embedded_model_path):
    """TRL's bfd packing passes one padding-free row whose position ids restart at 0 for each example; from them
    transformers builds a block-diagonal mask, so each example's logits equal those of the example alone."""
    import torch

    from train.config import load_config
    from train.sft import SFTRecipe

    config = load_config(None, dict(data=str(exports["alpaca"]), out=str(tmp_path / "out"), packing=True, max_length=256,
                                     batch_size=2, max_steps=1, gradient_checkpointing=False))  # fmt: skip
    recipe = SFTRecipe(config, db_url=db_url)
    recipe.setup()
    batch = next(iter(recipe.trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3
    assert starts + [len(positions)] == batch["cu_seq_lens_q"].tolist()
    for start, end in zip(starts, starts[1:] + [len(positions)]):
        assert positions[start:end].tolist() == list(range(end - start))
    assert (batch["labels"][0, starts] == -100).all()  # no example learns its first token from the previous one

    model = recipe.trainer.model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0]
        concatenated = model(input_ids=ids).logits[0]  # plain causal attention over the whole row
        for start, end in zip(starts, starts[1:] + [len(positions)]):
            alone = model(input_ids=ids[:, start:end]).logits[0]
            assert (packed[start:end] - alone).abs().max() < 1e-3
        second = slice(starts[1], starts[2])
        assert (concatenated[second] - model(input_ids=ids[:, second]).logits[0]).abs().max() > 1.0


# --- Checkpoints and --resume ----------------------------------------------------------------------------------------------


def test_crashed_run_resumes_from_its_last_checkpoint(tmp_path, store, embedded_model_path):
    """Also trains from a run name: `--data si-test` exports the run into OUT/data (as messages), once."""
    from transformers import TrainerCallback

    from train.config import load_config
    from train.sft import SFTRecipe

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed")

    out = tmp_path / "out"
    args = ["--data", "si-test", "--out", str(out), "--max-steps", "4", "--batch-size", "1", "--grad-accum", "1",
            "--max-length", "64", "--no-gradient-checkpointing", "--set", "save_steps=2", "--set", "max_eval_samples=2",
            "--set", "eval_at_start=false", "--name", "test-resume", "--db", store]  # fmt: skip
    config = load_config(None, dict(data="si-test", out=str(out), max_steps=4, batch_size=1, gradient_accumulation_steps=1,
                                    max_length=64, gradient_checkpointing=False, save_steps=2, max_eval_samples=2,
                                    eval_at_start=False, name="test-resume"))  # fmt: skip
    recipe = SFTRecipe(config, db_url=store, callbacks=[Crash()])
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "train_summary.json").exists()
    assert json.loads((out / "data" / "datagen.json").read_text())["runs"] == ["si-test"]
    with Session(open_engine(store)) as session:
        assert session.exec(select(TrainingRun).where(TrainingRun.name == "test-resume")).one().status == "failed"

    # A kill -9 during a save: checkpoint-3's weights cut short (its trainer_state.json is whole), checkpoint-5 empty.
    broken = out / "checkpoints" / "checkpoint-3"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (out / "checkpoints" / "checkpoint-5").mkdir()
    # OUT/data without its marker: --resume must refuse, and delete nothing (not OUT, not its checkpoints).
    marker = out / "data" / "datagen.json"
    meta = marker.read_bytes()
    marker.unlink()
    result = runner.invoke(app, ["train", *args, "--resume"])
    assert result.exit_code == 2 and "is not a datagen export" in result.output, result.output
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file() and (out / "data" / "dataset_dict.json").is_file()
    marker.write_bytes(meta)
    exported_at = marker.stat().st_mtime_ns

    result = runner.invoke(app, ["train", *args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "checkpoint-5 is incomplete" in result.output and "checkpoint-3 is incomplete" in result.output
    assert not broken.exists() and not (out / "checkpoints" / "checkpoint-5").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["format"] == "messages"
    assert (out / "data" / "datagen.json").stat().st_mtime_ns == exported_at  # the resumed run reused the export
    history = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]  # steps 1-2 from before the crash
    assert summary["train_tokens"] <= 2 * 64  # this session trained steps 3-4 only
    with Session(open_engine(store)) as session:
        row = session.exec(select(TrainingRun).where(TrainingRun.name == "test-resume")).one()
        assert (row.status, row.steps) == ("completed", 4)


# --- Several processes -----------------------------------------------------------------------------------------------------


def test_two_processes_on_gloo(exports, tmp_path, store):
    """torchrun with two CPU processes: DDP over gloo, each process training on its half of every batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    datagen = Path(sys.executable).parent / "datagen"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(datagen), "train", "--data", str(exports["alpaca"]), "--out", str(out),
        "--max-steps", "2", "--batch-size", "1", "--grad-accum", "1", "--max-length", "128", "--no-gradient-checkpointing",
        "--set", "max_eval_samples=2", "--set", "eval_at_start=false", "--name", "test-ddp", "--db", store, "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # printed once, by the main process
    assert (summary["processes"], summary["steps"]) == (2, 2)
    assert (out / "adapter_model.safetensors").is_file()
    with Session(open_engine(store)) as session:
        assert session.exec(select(TrainingRun).where(TrainingRun.name == "test-ddp")).one().status == "completed"


# --- vLLM ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_vllm_serves_the_merged_model_and_the_adapter(trained, tmp_path, db_url):
    """`datagen generate --backend vllm --model OUT/merged`, and the adapter through LoRARequest on the base, whose
    log-probabilities match the merged model's on the transformers backend."""
    pytest.importorskip("vllm")
    out = trained("lora")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Name three colors."}]}) + "\n")
    result = runner.invoke(
        app, ["generate", str(prompts), "--model", str(out / "merged"), "--backend", "vllm", "--max-tokens", "8",
              "--temperature", "0", "--db", db_url, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["text"].strip()

    import vllm
    from vllm.lora.request import LoRARequest

    from datagen.backends.transformers_backend import TransformersBackend
    from datagen.backends.vllm_backend import VLLMBackend

    text = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\nRed, green and blue.<|im_end|>\n"
    merged = TransformersBackend(str(out / "merged"))
    expected = merged.score([text])[0]
    merged.close()
    engine = VLLMBackend("smollm2-135m", enable_lora=True, max_lora_rank=16, max_loras=1)
    try:
        params = vllm.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompt = vllm.inputs.TokensPrompt(prompt_token_ids=list(expected.token_ids))
        with_adapter, without = (
            engine.llm.generate([prompt], params, lora_request=request, use_tqdm=False)[0].prompt_logprobs
            for request in (LoRARequest("sft", 1, str(out)), None)
        )
    finally:
        engine.close()
    tuned = [with_adapter[k][t].logprob for k, t in enumerate(expected.token_ids) if k > 0]
    base = [without[k][t].logprob for k, t in enumerate(expected.token_ids) if k > 0]
    assert max(abs(a - b) for a, b in zip(tuned, expected.logprobs[1:])) < 1e-3  # measured 2.4e-5
    assert max(abs(a - b) for a, b in zip(base, expected.logprobs[1:])) > 0.1  # measured 0.73
