"""Alpaca: the prompt's record format, parsing, bookkeeping with a scripted backend, a real run on the embedded model
checked independently with rouge-score, kill -9 and resume, and bad input."""

from __future__ import annotations

import sys

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.backends import Completion, Result
from datagen.cli import app
from datagen.errors import BadInput
from datagen.export import run_facts
from pipelines import alpaca
from pipelines import bootstrap
from pipelines import self_instruct as si
from pipelines.seeds import read_seeds
from storage.store import open_engine
from storage.tables import Instance, Run, Task
from tests.conftest import SEEDS
from tests.test_self_instruct import NOVEL, check_store_independently, kill_9_then_resume

runner = CliRunner()


PROMPT_TXT_SHA256 = "ed519a72953a3b65e16990e1e0fe34d24aa380c5852b0eb9edb59b4d25bf9316"
"""sha256 of Stanford Alpaca's prompt.txt (github.com/tatsu-lab/stanford_alpaca at commit 015c226)."""


def test_the_default_prompt_is_alpacas_prompt_txt_verbatim():
    import hashlib

    seeds = read_seeds(SEEDS)[:2]
    assert alpaca.AlpacaConfig().requirements == "reference"
    assert hashlib.sha256(alpaca.REFERENCE_REQUIREMENTS.format(n=20).encode()).hexdigest() == PROMPT_TXT_SHA256
    raw = alpaca.alpaca_prompt(seeds, 20).render(None)
    # encode_prompt (generate_instruction.py): prompt.txt + "\n", then the records
    assert raw.startswith(alpaca.REFERENCE_REQUIREMENTS.format(n=20) + "\n###\n1. Instruction: ")
    assert "The input should provide substantial content to make the instruction challenging" in raw
    assert '"what is the highest peak in the world"' in raw
    concise = alpaca.alpaca_prompt(seeds, 20, "concise").render(None)
    assert "highest peak" not in concise and concise.endswith(raw[raw.index("###") :])
    with pytest.raises(BadInput, match="requirements must be reference or concise"):
        alpaca.AlpacaConfig(requirements="mine")


def test_prompt_is_alpacas_record_format():
    seeds = read_seeds(SEEDS)[:2]
    prompt = alpaca.alpaca_prompt(seeds, 20)
    assert prompt.ask.startswith("You are asked to come up with a set of 20 diverse task instructions.")
    assert prompt.ask.endswith("List of 20 tasks:\n")
    assert prompt.answer == (
        f"###\n1. Instruction: {seeds[0].instruction}\n1. Input:\n<noinput>\n1. Output:\n{seeds[0].instances[0].output}\n"
        f"###\n2. Instruction: {seeds[1].instruction}\n2. Input:\n{seeds[1].instances[0].input}\n2. Output:\n{seeds[1].instances[0].output}\n"
        "###\n3. Instruction:"
    )
    params = alpaca.alpaca_params(alpaca.AlpacaConfig(), seed=1)
    assert (params.temperature, params.top_p, params.max_tokens, params.stop) == (1.0, 1.0, 3072, ("\n20", "20."))


def test_parse_records():
    completion = (
        " Summarize the text in one sentence.\n4. Input:\nThe cat sat on the mat all day.\n4. Output:\nA cat rested.\n"
        "###\n5. Instruction: Name a primary color.\n5. Input:\n<NoInput>\n5. Output:\nRed.\n"
        "###\n7. Instruction: Misnumbered, but a record.\n7. Input:\n<noinput>\n7. Output:\nFine.\n"
        "###\n8. Instruction: No output here.\n8. Input:\nx\n"
        "###\n9. Instruction: No input here.\n9. Output:\ny\n"
        "###\n10. Input:\nz\n10. Instruction: Fields out of order.\n10. Output:\nw\n"
        "###\n11. Instruction: Cut off"
    )
    records = alpaca.parse_records(completion, 4)
    assert [(r.instruction, r.input, r.output, r.reason) for r in records] == [
        ("Summarize the text in one sentence.", "The cat sat on the mat all day.", "A cat rested.", None),
        ("Name a primary color.", "", "Red.", None),
        ("Misnumbered, but a record.", "", "Fine.", None),
        ("8. Instruction: No output here.\n8. Input:\nx", "", "", "malformed_record"),  # its raw text kept
        ("9. Instruction: No input here.\n9. Output:\ny", "", "", "malformed_record"),  # takes no one else's input
        ("10. Input:\nz\n10. Instruction: Fields out of order.\n10. Output:\nw", "", "", "malformed_record"),
        ("11. Instruction: Cut off", "", "", "malformed_record"),
    ]
    assert alpaca.parse_records(completion, 4, cut_by_length=True)[-1].reason == "cut_by_length"


def test_parse_records_splits_at_hashes_anywhere():
    """A "###" that does not stand on its own line still ends a record: record 4 keeps its own fields."""
    completion = " X is a task here.\n4. Input:\na\n4. Output: Y ### 5. Instruction: Another task here.\n5. Input:\nb\n5. Output:\nZ"
    assert [(r.instruction, r.input, r.output) for r in alpaca.parse_records(completion, 4)] == [
        ("X is a task here.", "a", "Y"),
        ("Another task here.", "b", "Z"),
    ]
    # Two records with no "###" between them are one block with every field twice: not a record.
    run_on = " X is a task.\n4. Input:\na\n4. Output:\nY\n5. Instruction: B is a task.\n5. Input:\nb\n5. Output:\nZ"
    assert [r.reason for r in alpaca.parse_records(run_on, 4)] == ["malformed_record"]


def test_lenient_records_split_at_each_instruction_and_may_leave_out_the_input():
    """record_format lenient (ours): a new record at each "N. Instruction:" line, and Instruction then Output is a
    record with no input; the other malformed blocks stay malformed (an Instruction line splits a block only after an
    Output field), and a cut response still loses its last record."""
    run_on = (" X is a task.\n4. Input:\na\n4. Output:\nY\n5. Instruction: B is a task.\n5. Input:\nb\n5. Output:\nZ\n"
              "6. Instruction: No input here.\n6. Output:\ny\n"
              "###\n7. Input:\nz\n7. Instruction: Fields out of order.\n7. Output:\nw\n"
              "8. Instruction: No output here.\n8. Input:\nx\n"
              "9. Instruction: Cut off")  # fmt: skip
    records = alpaca.parse_records(run_on, 4, record_format="lenient")
    assert [(r.instruction, r.input, r.output, r.reason) for r in records] == [
        ("X is a task.", "a", "Y", None),
        ("B is a task.", "b", "Z", None),
        ("No input here.", "", "y", None),
        ("7. Input:\nz\n7. Instruction: Fields out of order.\n7. Output:\nw", "", "", "malformed_record"),
        ("8. Instruction: No output here.\n8. Input:\nx\n9. Instruction: Cut off", "", "", "malformed_record"),  # split only after an Output
    ]
    assert alpaca.parse_records(run_on, 4, cut_by_length=True, record_format="lenient")[-1].reason == "cut_by_length"
    assert [r.reason for r in alpaca.parse_records(run_on, 4)] == ["malformed_record"] * 2  # the reference's rule
    with pytest.raises(BadInput, match="record_format must be reference or lenient"):
        alpaca.AlpacaConfig(record_format="loose")


def test_alpaca_blacklist_is_larger():
    assert si.rejection_reason("Compose a short piece of music for piano.", alpaca.ALPACA_BLACKLIST) == "blacklist:music"
    assert si.rejection_reason("Compose a short piece of music for piano.") is None
    assert alpaca.AlpacaConfig().blacklist == alpaca.ALPACA_BLACKLIST


class ScriptedAlpaca:
    name = model = "scripted"

    def __init__(self, completions):
        self.completions = list(completions)

    def render_chat(self, messages):
        raise RuntimeError("no chat template")

    def generate(self, requests):
        out = []
        for request in requests:
            text, finish = self.completions.pop(0) if self.completions else ("", "stop")
            out.append(Result(request.prompt, 1, (Completion(text, finish, len(text.split())),), 0.0))
        return out

    def close(self):
        pass


def continuation(*records: tuple[str, str, str]) -> str:
    """What a model writes after the prompt's "4. Instruction:"."""
    text = "".join(alpaca.record(number, *rec) for number, rec in enumerate(records, start=4))
    return text[len("###\n4. Instruction:") :]


def test_run_bookkeeping(db_url):
    seeds = read_seeds(SEEDS)
    completion = continuation(
        (NOVEL[0], "", "The Rhine, the Elbe and the Danube."),
        (seeds[7].instruction, "", "copy"),
        ("Compose a short piece of music for piano.", "", "notes"),
        (NOVEL[1], "same", "same"),
        (NOVEL[2], "", "Add 273.15 after converting to Celsius."),
        (NOVEL[4], "", "Blue light scatters away along the long path."),
        (NOVEL[3], "", "Shorter showers."),
    )
    config = alpaca.AlpacaConfig(num_instructions=2, request_batch_size=1)
    with Session(open_engine(db_url)) as session:
        run = Run(name="a", pipeline="alpaca", config=bootstrap.config_dict(config), model="scripted", backend="scripted")
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, seeds)
        session.commit()
        alpaca.run(session, run, ScriptedAlpaca([(completion, "length")]), config)
        assert (run.status, run.accepted, run.instances) == ("completed", 2, 2)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        assert [(t.instruction, t.status, t.reason) for t in tasks] == [
            (NOVEL[0], "accepted", None),
            (seeds[7].instruction, "rejected", "rouge_similarity"),
            ("Compose a short piece of music for piano.", "rejected", "blacklist:music"),
            (NOVEL[1], "rejected", "no_valid_instances"),  # its input equals its output
            (NOVEL[2], "accepted", None),  # admitted in NOVEL[1]'s place: the cap comes after the instance filter
            (NOVEL[4], "rejected", "target_reached"),  # passed every filter after the target was met
            (alpaca.record(10, NOVEL[3], "", "Shorter showers.")[4:].strip(), "rejected", "cut_by_length"),  # raw: max_tokens cut it
        ]
        instances = session.exec(select(Instance).join(Task).where(Task.source == "generated").order_by(Instance.id)).all()
        assert [(i.output, i.status, i.reason) for i in instances] == [
            ("The Rhine, the Elbe and the Danube.", "accepted", None),
            ("same", "rejected", "input_equals_output"),
            ("Add 273.15 after converting to Celsius.", "accepted", None),
            ("Blue light scatters away along the long path.", "rejected", "target_reached"),
        ]
        # The export's counts are the store's: accepted instances belong to accepted instructions only.
        facts = run_facts(session, run, tasks_without_instances=0)
        assert (facts.accepted, facts.instances_accepted) == (run.accepted, run.instances) == (2, 2)


def test_alpaca_drops_the_last_record_of_a_cut_response_or_all_of_it(db_url):
    seeds = read_seeds(SEEDS)
    completion = continuation((NOVEL[0], "", "The Rhine."), (NOVEL[2], "", "Add 273.15."), (NOVEL[3], "", "Shorter"))
    assert alpaca.AlpacaConfig().length_cut == "drop_last"
    for name, length_cut, reasons in (("last", "drop_last", [None, None, "cut_by_length"]), ("all", "drop_response", ["cut_by_length"] * 3)):
        config = alpaca.AlpacaConfig(num_instructions=5, request_batch_size=1, max_stalled_batches=1, length_cut=length_cut)
        with Session(open_engine(db_url)) as session:
            run = Run(name=name, pipeline="alpaca", config=bootstrap.config_dict(config), model="scripted", backend="scripted")
            session.add(run)
            session.flush()
            bootstrap.store_seeds(session, run, seeds)
            session.commit()
            alpaca.run(session, run, ScriptedAlpaca([(completion, "length")]), config)
            tasks = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()
            assert [t.reason for t in tasks] == reasons


SMALL = ["--backend", "transformers", "--request-batch-size", "4", "--max-tokens", "320"]


@pytest.mark.slow
def test_real_alpaca_run_on_the_embedded_model_killed_with_9_and_resumed(tmp_path):
    """The embedded model through the CLI: a run killed with -9 after its first batch, then resumed to its target (one
    real run, not one uninterrupted and one killed: each record accepted costs several long prompts on a 2-core CI
    machine, since the strict record parser stores most of the 135M model's records as malformed_record)."""
    db_url = f"sqlite:///{tmp_path / 'kill.db'}"
    command = [sys.executable, "-m", "datagen.cli", "alpaca", "--seeds", str(SEEDS), "-n", "3", "--run", "k", "--db", db_url,
               *SMALL, "--request-batch-size", "2"]  # fmt: skip
    summary = kill_9_then_resume(command, db_url, "k", 3)
    assert (summary["accepted"], summary["status"]) == (3, "completed")


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"instruction": "Sort a list of numbers.", "output": "x"}\n{"input": "x"}\n', [], "seeds.jsonl:2: missing field 'instruction'"),
        ('{"instruction": "", "output": "x"}\n', [], "seeds.jsonl:1: field 'instruction' is empty"),
        ("[]", [], "seeds.jsonl: no seed tasks"),
        ('{"instruction": "Sort it.", "output": "x"}\n', ["-n", "0"], "--num-instructions must be at least 1"),
        ('{"instruction": "Sort it."}\n', [], "no seed task has instances"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, content, args, message):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(content)
    result = runner.invoke(app, ["alpaca", "--seeds", str(seeds), "--db", f"sqlite:///{tmp_path / 'x.db'}", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.db").exists()


ON_VLLM = ["--request-batch-size", "4", "--max-tokens", "320", "--temperature", "0.5"]
"""The engine tests' settings: the point is the pipeline on vLLM, not the sampling; at the reference's temperature 1.0
the 135M model writes so few well-formed records that a run to 2 took 4 batches of 8 (~4 minutes on the 2-core VM);
at 0.5, 1 accepted record took 2 batches of 4."""


@pytest.mark.vllm
def test_alpaca_through_vllm_serve(vllm_server, db_url):
    result = runner.invoke(app, ["alpaca", "--seeds", str(SEEDS), "-n", "1", "--run", "o", "--db", db_url, "--backend", "openai",
                                 "--base-url", vllm_server, "--model", "smollm2-135m", *ON_VLLM, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    check_store_independently(db_url, "o", 1)


@pytest.mark.vllm
def test_alpaca_on_vllm(vllm_llm, db_url):
    config = alpaca.AlpacaConfig(num_instructions=1, request_batch_size=4, max_tokens=320, temperature=0.5)
    with Session(open_engine(db_url)) as session:
        run = Run(name="v", pipeline="alpaca", config=bootstrap.config_dict(config), model="smollm2-135m", backend="vllm")
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, read_seeds(SEEDS))
        session.commit()
        alpaca.run(session, run, vllm_llm, config)
    check_store_independently(db_url, "v", 1)


def test_alpaca_blocks_eos_and_cuts_loops():
    """The reference forbids end-of-text (logit_bias {"50256": -100}, issue 19 item 3); a looping response ends on
    the transformers backend (item 8a). Backends honour both: tests/backend_checks.py and test_transformers_backend."""
    from datagen.errors import BadInput

    params = alpaca.alpaca_params(alpaca.AlpacaConfig(), seed=1)
    assert (params.block_eos, params.loop_ngram) == (True, 20)
    off = alpaca.alpaca_params(alpaca.AlpacaConfig(block_eos=False, loop_ngram=0), seed=1)
    assert (off.block_eos, off.loop_ngram) == (False, 0)
    with pytest.raises(BadInput, match="loop_ngram must be an integer"):
        alpaca.AlpacaConfig(loop_ngram=-1)
