"""The long-context workflow end to end on a tiny Llama built here: `datagen long-data` → `datagen train
--context-length` (each RoPE mode, with and without S²-Attn) → `datagen eval-long`, and vLLM serving the result.

The model has 256 native positions extended 4x to 1024, random weights, and a 400-token byte-level BPE tokenizer
trained here on the passkey text and seed tasks (a 49k vocabulary would make the logits, not the attention, the
cost of every step). Nothing is downloaded. One torch thread, like tests/test_train.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from storage.store import open_engine
from storage.tables import LongContextEval, TrainingRun
from tests.conftest import SEEDS
from train.long_data import (
    LongSample,
    StoredTask,
    instruction_sample,
    mix,
    pack_documents,
    passkey_correct,
    passkey_prompt,
    passkey_sample,
)

runner = CliRunner()
NATIVE, LONG = 256, 1024
TRAIN = ["--context-length", str(LONG), "--method", "lora", "--trainable", "embed,norm", "--max-steps", "4",
         "--batch-size", "2", "--grad-accum", "1", "--lr", "3e-3", "--no-gradient-checkpointing"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def seed_texts() -> list[str]:
    rows = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join([r["instruction"], *(i["input"] + " " + i["output"] for i in r["instances"])]) for r in rows]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (head_dim 32, which vLLM's CPU attention supports) with 256 positions, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [passkey_prompt(12345, 2, 2)[0], *seed_texts()]
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=NATIVE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('long_store') / 'datagen.db'}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in seed_texts()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def long_data(tiny_llama, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long_data") / "data"
    result = runner.invoke(app, ["long-data", "--out", str(out), "--length", str(LONG), "--model", str(tiny_llama),
                                 "--corpus", str(corpus), "--passkeys", "12", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def trained(tiny_llama, long_data, store, tmp_path_factory):
    done: dict[tuple[str, bool], Path] = {}

    def train(rope: str, s2: bool) -> Path:
        if (rope, s2) not in done:
            out = tmp_path_factory.mktemp(f"long_{rope}_{s2}") / "out"
            result = runner.invoke(app, ["train", "--data", str(long_data), "--model", str(tiny_llama), "--out", str(out),
                                         "--rope", rope, "--name", f"long-{rope}-{s2}", "--merge", "--db", store, *TRAIN,
                                         *(["--s2-attn"] if s2 else [])])  # fmt: skip
            assert result.exit_code == 0, result.output
            done[rope, s2] = out
        return done[rope, s2]

    return train


# --- Long data ----------------------------------------------------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def test_passkey_sample_records_where_it_hid_the_key():
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        sample = passkey_sample(words, 600, depth, rng)
        key = sample.completion.strip()
        assert sample.tokens <= 600 and sample.tokens > 560
        assert sample.depth == depth
        prompt_words = sample.prompt.split()
        assert prompt_words[sample.key_position : sample.key_position + 5] == ["The", "pass", "key", "is", f"{key}."]
        assert sample.prompt.endswith("What is the pass key? The pass key is")
    # depth 0: the key follows the task description; depth 1: only the question follows it
    start = passkey_sample(words, 600, 0.0, rng)
    end = passkey_sample(words, 600, 1.0, rng)
    assert start.key_position == words(passkey_prompt(1, 0, 0)[1])
    assert end.prompt.split("Remember it.")[1].split("is the pass key.")[1].strip() == "What is the pass key? The pass key is"


@pytest.mark.parametrize("output,correct", [
    (" 40213. Remember it.", True), ("40213", True), ("The pass key is 40213", True), (" 4021", False),
    (" 402130", False), ("", False), (" 40213 40213", True), (" 1 40213", False),
])  # fmt: skip
def test_passkey_scorer_exact_match_of_the_first_number(output, correct):
    assert passkey_correct(output, " 40213") is correct


def test_pack_documents_cuts_exact_rows_with_eos_between():
    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, eos_id=0)
    assert rows == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_documents([[1]], 4, eos_id=0) == []


def test_instruction_sample_asks_about_one_stored_task():
    tasks = [StoredTask(f"Instruction {i}.", f"input {i}" if i % 2 else "", f"output {i}") for i in range(40)]
    sample = instruction_sample(tasks, words, 120, random.Random(1))
    asked = int(sample.prompt.rsplit("Answer task ", 1)[1].split(".")[0])
    block = sample.prompt.split(f"Task {asked}: ")[1].split("\n")[0]
    assert sample.completion == "output " + block.removeprefix("Instruction ").removesuffix(".")
    assert sample.tokens <= 120 and sample.prompt.count("Task ") >= 5
    assert instruction_sample(tasks[:1], words, 120, random.Random(1)) is None


def test_mix_keeps_every_long_row_and_the_short_share():
    long = [LongSample("", str(i), "passkey", 1) for i in range(9)]
    short = [LongSample("", str(i), "short", 1) for i in range(100)]
    rows = mix(long, short, 0.25, random.Random(0))
    assert sum(r.kind == "passkey" for r in rows) == 9 and sum(r.kind == "short" for r in rows) == 3


def test_long_data_export(long_data, tiny_llama):
    import datasets
    from transformers import AutoTokenizer

    splits = datasets.load_from_disk(str(long_data))
    meta = json.loads((long_data / "datagen.json").read_text())
    assert meta["format"] == "prompt-completion" and meta["counts"]["passkey"] == 12
    rows = [*splits["train"], *splits["test"]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    passkeys = [r for r in rows if r["kind"] == "passkey"]
    assert sorted(r["depth"] for r in passkeys) == pytest.approx([i / 11 for i in range(12)])
    for row in passkeys:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert LONG - 40 < row["tokens"] <= LONG
        assert tokenizer.decode(ids[row["key_position"] :]).lstrip().startswith(f"The pass key is{row['completion']}.")
    documents = [r for r in rows if r["kind"] == "document"]
    assert documents and all(r["tokens"] == LONG and r["prompt"] == "" for r in documents)


def test_long_instructions_from_a_stored_run_mixed_with_short_rows(tiny_llama, tmp_path):
    """--runs: long rows built from the run's accepted tasks; --short: an export's rows mixed in at the share."""
    import datasets

    from tests.example_runs import build_run

    url = f"sqlite:///{tmp_path / 'datagen.db'}"
    with Session(open_engine(url)) as session:
        build_run(session, "si-long", tasks=40)
        session.commit()
    short = tmp_path / "short"
    assert runner.invoke(app, ["export", "--run", "si-long", "--format", "prompt-completion", "--out", str(short), "--db", url]).exit_code == 0
    out = tmp_path / "long"
    result = runner.invoke(app, ["long-data", "--out", str(out), "--length", str(LONG), "--model", str(tiny_llama), "--runs", "si-long",
                                 "--instructions", "6", "--short", str(short), "--short-share", "0.25", "--db", url, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    splits = datasets.load_from_disk(str(out))
    rows = [*splits["train"], *splits["test"]]
    long = [r for r in rows if r["kind"] == "instruction"]
    assert len(long) == 6 and sum(r["kind"] == "short" for r in rows) == 2
    with Session(open_engine(url)) as session:
        from datagen.export import select_examples
        from storage.store import get_run

        outputs = {e.output for e in select_examples(session, get_run(session, "si-long"))[0]}
    for row in long:
        assert row["completion"] in outputs and row["tokens"] <= LONG and row["prompt"].count("Task ") >= 2


def test_long_data_bad_input_exits_2(tmp_path, corpus):
    cases = [
        (["--corpus", str(tmp_path / "missing.jsonl")], "--corpus"),
        ([], "nothing to build"),
        (["--passkeys", "2", "--short-share", "1.5"], "--short-share"),
        (["--instructions", "3"], "--instructions needs --runs"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["long-data", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    result = runner.invoke(app, ["long-data", "--out", str(tmp_path / "out"), "--corpus", str(bad)])
    assert result.exit_code == 2 and f"{bad}:2: field 'text'" in result.output


# --- Training with each RoPE mode, with and without S²-Attn -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("s2", [False, True], ids=["full-attn", "s2-attn"])
@pytest.mark.parametrize("rope", ["linear", "yarn"])
def test_tiny_llama_extends_4x_and_the_loss_falls(rope, s2, trained):
    out = trained(rope, s2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["eval_loss"] < summary["initial_eval_loss"]
    history = json.loads(sorted((out / "checkpoints").glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    losses = [e["loss"] for e in history["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["rope_parameters"]["rope_type"] == rope and merged["rope_parameters"]["factor"] == 4.0
    assert merged["max_position_embeddings"] == (LONG if rope == "yarn" else NATIVE)  # vLLM's reading: LONG for both
    assert "s2_attn" not in json.dumps(merged)  # the saved model attends fully
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "norm"} <= set(adapter["modules_to_save"])


def test_s2_attn_trains_sparse_and_evaluates_full(trained):
    """Same seed, data and weights: the eval loss before training (full attention either way) is the same, the
    first training step's loss is not (S²-Attn's groups were in use)."""
    runs = [json.loads(sorted((trained("linear", s2) / "checkpoints").glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
            for s2 in (False, True)]  # fmt: skip
    first_eval = [next(e["eval_loss"] for e in r["log_history"] if "eval_loss" in e) for r in runs]
    first_loss = [next(e["loss"] for e in r["log_history"] if "loss" in e) for r in runs]
    assert first_eval[0] == pytest.approx(first_eval[1], abs=1e-5)
    assert abs(first_loss[0] - first_loss[1]) > 1e-4


@pytest.mark.slow
def test_eval_long_before_and_after_with_a_store_row(trained, tiny_llama, long_data, store, tmp_path):
    """The shipped held-out text (no --text), keys held out from the training run's data, checked."""
    import datasets

    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval-long", "--model", str(trained("yarn", True) / "merged"), "--baseline", str(tiny_llama),
                                 "--lengths", f"{NATIVE},{LONG}", "--depths", "0,1", "--samples", "3", "--windows", "2",
                                 "--out", str(out), "--training-run", "long-yarn-True", "--db", store, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval_long.json").read_text())
    assert [row["length"] for row in report["table"]] == [NATIVE, LONG]
    for label in ("before", "after"):
        assert set(report["models"][label]["passkey"]) == {str(NATIVE), str(LONG)}
        assert all(report["models"][label]["perplexity"][str(n)] > 1 for n in (NATIVE, LONG))
    # the tuned model has learnt English text and the digits a little: lower perplexity than the random base
    assert report["table"][1]["perplexity after"] < report["table"][1]["perplexity before"]
    assert report["text"][0].endswith("examples/heldout/heart_of_darkness.txt")
    # no eval key is a training key: every key long-data wrote, in both splits, against every key asked
    splits = datasets.load_from_disk(str(long_data))
    training_keys = {int(r["completion"]) for split in splits.values() for r in split if r["kind"] == "passkey"}
    assert len(training_keys) == 12 and report["training_data"]["passkeys_excluded"] == 12
    assert len(report["passkeys"]) == 2 * 2 * 3 and not set(report["passkeys"]) & training_keys
    assert report["training_data"]["text_overlap"] < 0.01
    assert (out / "passkey_heatmap.png").stat().st_size > 0 and (out / "perplexity.png").stat().st_size > 0
    with Session(open_engine(store)) as session:
        row = session.exec(select(LongContextEval)).one()
        run = session.exec(select(TrainingRun).where(TrainingRun.name == "long-yarn-True")).one()
        assert row.training_run_id == run.id and row.results["table"] == report["table"]


def test_eval_passkeys_skip_training_keys_even_when_the_streams_collide():
    """The worst case: the training data holds exactly the keys the eval's stream would draw first."""
    from train.eval_long import eval_passkey_rng
    from train.long_data import PASSKEY_RANGE

    rng = eval_passkey_rng(0)
    first = [rng.randint(*PASSKEY_RANGE) for _ in range(20)]
    training = frozenset(first)
    rng = eval_passkey_rng(0)
    keys = [int(passkey_sample(words, 200, 0.5, rng, exclude=training).completion) for _ in range(20)]
    assert len(set(keys)) == 20 and not set(keys) & training
    # and long-data's stream (random.Random(seed)) is not the eval's: the old default gave 30 of 30 shared keys
    train_rng, eval_rng = random.Random(0), eval_passkey_rng(0)
    assert [train_rng.randint(*PASSKEY_RANGE) for _ in range(5)] != [eval_rng.randint(*PASSKEY_RANGE) for _ in range(5)]


def test_perplexity_plot_with_missing_points_does_not_crash(tmp_path):
    """No --text, or a text shorter than a window: perplexity None. The plot shows it as missing (the log
    y-scale of the old plot raised on an all-missing series)."""
    from train.eval_long import EvalLongConfig, ModelResult, perplexity_spans, plot

    config = EvalLongConfig(model="m", out=tmp_path, lengths=(256, 512), depths=(0.0, 1.0))
    none = ModelResult("m", perplexity={256: None, 512: None}, passkey={256: {0.0: 0.0, 1.0: 1.0}, 512: {0.0: 0.5, 1.0: 0.0}})
    some = ModelResult("b", perplexity={256: 12.5, 512: None}, passkey=none.passkey)
    for results in ([none], [some, none]):
        paths = plot(results, config, tmp_path)
        assert all(p.stat().st_size > 0 for p in paths)
    # every length scores the same span: 2 windows of the longest length that fits
    assert perplexity_spans((256, 512, 2048), 1500, 4) == {256: 1024, 512: 1024, 2048: 0}
    assert perplexity_spans((256, 512), 5000, 2) == {256: 1024, 512: 1024}


def test_eval_long_without_text_has_no_perplexity_and_exits_0(tiny_llama, store, tmp_path):
    out = tmp_path / "e"
    result = runner.invoke(app, ["eval-long", "--model", str(tiny_llama), "--lengths", "64,128", "--depths", "0", "--samples", "1",
                                 "--no-text", "--out", str(out), "--db", store, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval_long.json").read_text())
    assert report["models"]["model"]["perplexity"] == {"64": None, "128": None} and report["training_data"] is None
    assert (out / "perplexity.png").stat().st_size > 0


def test_eval_long_refuses_text_that_overlaps_the_training_data(tiny_llama, long_data, corpus, store, tmp_path):
    result = runner.invoke(app, ["eval-long", "--model", str(tiny_llama), "--out", str(tmp_path / "e"), "--text", str(corpus),
                                 "--train-data", str(long_data), "--db", store])  # fmt: skip
    assert result.exit_code == 2 and "13-grams are in the training data" in result.output, result.output
    assert not (tmp_path / "e").exists()


def test_train_rejects_a_context_no_longer_than_the_model_and_dynamic_rope(tiny_llama, long_data, tmp_path, store):
    result = runner.invoke(app, ["train", "--data", str(long_data), "--model", str(tiny_llama), "--out", str(tmp_path / "o"),
                                 "--context-length", "128", "--db", store])  # fmt: skip
    assert result.exit_code == 2 and "not longer than the model's 256 positions" in result.output
    result = runner.invoke(app, ["train", "--data", str(long_data), "--model", str(tiny_llama), "--out", str(tmp_path / "o"),
                                 "--context-length", str(LONG), "--rope", "dynamic", "--db", store])  # fmt: skip
    assert result.exit_code == 2 and "use --rope yarn or --rope linear" in result.output, result.output
    assert not (tmp_path / "o").exists()


# --- vLLM serves the extended model with the same scaling ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rope,s2", [("linear", False), ("yarn", True)])
def test_vllm_scores_the_extended_model_like_transformers(trained, rope, s2):
    """Every RoPE mode datagen accepts, through the real vLLM engine, beyond the native length."""
    pytest.importorskip("vllm")
    from datagen.backends.transformers_backend import TransformersBackend
    from datagen.backends.vllm_backend import VLLMBackend

    merged = str(trained(rope, s2) / "merged")
    text = " ".join(seed_texts())
    reference = TransformersBackend(merged)
    assert reference.max_model_len == LONG  # the scaled length, as vLLM reads it
    ids = reference.tokenize(text)[: LONG - 24]
    expected = reference.score([ids])[0].logprobs[1:]
    backend = VLLMBackend(merged)
    try:
        assert backend.max_model_len == LONG
        got = backend.score([ids])[0].logprobs[1:]
    finally:
        backend.close()
    assert len(ids) > 3 * NATIVE
    # beyond the native 256 positions too: vLLM applies the same scaling as transformers
    differences = [abs(a - b) for a, b in zip(got, expected)]
    assert max(differences) < 2e-3, (max(differences[:NATIVE]), max(differences[NATIVE:]))
