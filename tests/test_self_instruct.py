"""Self-Instruct: exact-string tests of prompts and parsers, the filters, the run's bookkeeping with a scripted backend,
then real runs on the embedded model checked independently with rouge-score, kill -9 and resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from rouge_score import rouge_scorer
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.backends import Completion, Result
from datagen.cli import app
from pipelines import bootstrap
from pipelines import self_instruct as si
from pipelines.seeds import SeedInstance, SeedTask, read_seeds
from storage.store import get_run, open_engine
from storage.tables import Generation, Instance, Run, Task
from tests.conftest import REPO, SEEDS, kill_9_once

runner = CliRunner()
CHAT = lambda messages: f"<user>{messages[0]['content']}</user><assistant>"  # noqa: E731


# ---- prompts --------------------------------------------------------------------------------------------------


def test_instruction_prompt_is_the_references_encode_prompt():
    prompt = si.instruction_prompt(["Write a poem.", "Sort  these\nnumbers:"])
    assert prompt.render(None) == "Come up with a series of tasks:\n1. Write a poem.\n2. Sort these numbers\n3."
    assert prompt.render(CHAT) == "<user>Come up with a series of tasks:</user><assistant>1. Write a poem.\n2. Sort these numbers\n3."
    assert si.instruction_prompt(["Label it."], classification=True).ask.startswith("Come up with a series of classification tasks.")


def test_instruction_sampling_is_the_references():
    params = si.instruction_params(si.SelfInstructConfig(), seed=7)
    assert (params.temperature, params.top_p, params.presence_penalty, params.max_tokens) == (0.7, 0.5, 2.0, 1024)
    assert params.stop == ("\n\n", "\n16", "16.", "16 .")  # 8 examples, "9." given: at most 7 new instructions


def test_classification_prompt_ends_with_the_question():
    prompt = si.classification_prompt("Is this email spam?").render(None)
    assert prompt.startswith("Can the following task be regarded as a classification task with finite output labels?\n\nTask: ")
    assert prompt.endswith("Is it classification? No\n\nTask: Is this email spam?\nIs it classification?")
    assert (si.CLASSIFICATION_PARAMS.temperature, si.CLASSIFICATION_PARAMS.max_tokens) == (0, 3)
    answers = (" Yes", "YES\n", " no ", " Yesterday", " yes.", " Nope", "", " Maybe")
    assert [si.parse_yes_no(t) for t in answers] == [True, True, False, None, None, None, None, None]


def test_instance_prompts_input_first_and_label_first():
    sort = SeedTask("s1", "Sort the list.", (SeedInstance("3 1 2", "1 2 3"),), False)
    joke = SeedTask("s2", "Tell a joke.", (SeedInstance("", "Why did the chicken cross the road?"),), False)
    sentiment = SeedTask("s3", "Is the review positive or negative?", (SeedInstance("Great film!", "Positive"),), True)
    assert si.instance_prompt("Reverse the word.", [sort, joke], False).render(None) == (
        si.INPUT_FIRST_HEADER + "\n\n"
        "Task: Sort the list.\nExample 1\nInput: 3 1 2\nOutput: 1 2 3\n\n"
        "Task: Tell a joke.\nExample 1\nOutput: Why did the chicken cross the road?\n\n"
        "Task: Reverse the word.\nExample 1\n"
    )
    assert si.instance_prompt("Is the email spam?", [sentiment], True).render(None) == (
        si.OUTPUT_FIRST_HEADER + "\n\n"
        "Task: Is the review positive or negative?\nClass label: Positive\nInput: Great film!\n\n"
        "Task: Is the email spam?\nClass label:"
    )
    params = [si.instance_params(si.SelfInstructConfig(), kind) for kind in (True, False)]
    assert [(p.stop, p.max_tokens, p.temperature, p.presence_penalty) for p in params] == [
        (("Example 6", "Task:"), 300, 0, 1.5),  # generate_instances.py: 300 where a classification task is
        (("Example 6", "Task:"), 350, 0, 1.5),  # and 350 otherwise
    ]
    assert si.instance_params(si.SelfInstructConfig(instance_max_tokens=96), True).max_tokens == 96


def test_the_builtin_demonstrations_show_several_instances_and_every_label():
    from pipelines.demonstrations import CLASSIFICATION, ORDINARY

    assert 6 <= len(ORDINARY) <= 8 and all(2 <= len(t.instances) <= 4 and t.is_classification is False for t in ORDINARY)
    assert 4 <= len(CLASSIFICATION) <= 6 and all(t.is_classification for t in CLASSIFICATION)
    assert all(len({i.output for i in t.instances}) == len(t.instances) >= 2 for t in CLASSIFICATION)  # one per label
    prompt = si.instance_prompt("Reverse the word.", ORDINARY[:1], False).render(None)
    assert "Example 1\nInput: 25 °C\nOutput: 77 °F\nExample 2\nInput: -10 °C\nOutput: 14 °F\nExample 3\n" in prompt
    prompt = si.instance_prompt("Is the email spam?", CLASSIFICATION[2:3], True).render(None)
    assert prompt.count("Class label: ") == 3 and "Class label: Command\nInput: Close the window, please.\n" in prompt


@pytest.mark.parametrize("instance_demos", ["builtin", "seeds"])
def test_instance_prompts_show_the_chosen_demonstrations(db_url, instance_demos):
    from pipelines.demonstrations import ORDINARY

    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1, instance_demos=instance_demos)
    assert si.SelfInstructConfig().instance_demos == "builtin"
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0])]), config)
        prompt = session.exec(select(Generation.prompt).where(Generation.purpose == "instances")).one()
    shown = [task.instruction for task in (ORDINARY if instance_demos == "builtin" else SEED_TASKS) if f"Task: {task.instruction}\n" in prompt]
    assert len(shown) == config.instance_demonstrations
    assert ("Example 2\n" in prompt) == (instance_demos == "builtin")  # every shipped seed has one instance


# ---- parsing and filters --------------------------------------------------------------------------------------


def test_parse_instructions_continues_the_list():
    completion = " plan a trip to Rome.\n10. Explain gravity\nto a child.\n11 . Summarize the text below.\n\n"
    assert si.parse_instructions(completion) == ["Plan a trip to Rome.", "Explain gravity to a child.", "Summarize the text below."]
    assert si.parse_instructions("") == []
    assert si.parse_instructions(" \n") == []


def test_parse_instructions_splits_only_where_the_reference_does():
    # bootstrap_instructions.py splits at "\n\d+\s?\. " only: a line that begins with a decimal number, "1)" or
    # "11.No space" stays inside its item (issue 19: "3.5, 4.2 and 7.1" became an instruction of its own).
    completion = " Compute the average of the following numbers:\n3.5, 4.2 and 7.1\n10. List the steps:\n1) boil water\n2) add tea\n11.Done."
    assert si.parse_instructions(completion) == [
        "Compute the average of the following numbers: 3.5, 4.2 and 7.1",
        "List the steps: 1) boil water 2) add tea 11.Done.",
    ]


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Sort these numbers.", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the image below in detail.", "blacklist:image"),
        ("Please Go To the store and buy milk today.", "blacklist:go to"),
        ("Plot the data points on a chart.", "blacklist:plot"),
        ("Write a program that sorts a list.", "write_a_program"),
        ("Write A Program that sorts a list.", "write_a_program"),  # the reference compares after str.capitalize()
        ('"Quote this sentence back to me please."', "starts_with_punctuation"),
        ("Éxplain how a bicycle gear works.", "non_ascii_start"),
        ("Explain how a bicycle gear works.", None),
        ("Explain the mapping between keys and values.", None),  # whole words only: 'mapping' is not 'map'
    ],
)
def test_filters(instruction, reason):
    assert si.rejection_reason(instruction) == reason


def test_non_ascii_start_can_be_allowed():
    assert si.rejection_reason("Élabore une liste de courses pour la semaine.", require_ascii_start=False) is None


P = si.ParsedInstance


def test_instance_preamble_and_trailer_are_kept_as_the_reference_keeps_them_or_trimmed():
    """prepare_for_finetuning.py removes "Input:" only at the start of the input and keeps the output whole up to the
    next "Output:" or "Input:"; instance_trim drops both extras."""
    text = "Here you go.\nInput: 3 1 2\nOutput: 1 2 3\n\nHope this helps.\nOutput: 9"
    assert si.parse_instances(text, False) == [P("Here you go.\nInput: 3 1 2", "1 2 3\n\nHope this helps.")]
    assert si.parse_instances(text, False, trim=True) == [P("3 1 2", "1 2 3")]
    labelled = " Positive\nThe review:\nInput: I loved it."
    assert si.parse_instances(labelled, True) == [P("The review:\nInput: I loved it.", "Positive")]
    assert si.parse_instances(labelled, True, trim=True) == [P("I loved it.", "Positive")]
    assert si.has_preamble("Here you go.\nInput: 3 1 2") and not si.has_preamble("3 1 2")
    assert si.has_trailer("1 2 3\n\nHope this helps.") and not si.has_trailer("1 2 3\n")
    assert si.SelfInstructConfig().instance_trim is False


def test_instance_parsing():
    text = "Input: 2, 1\nOutput: 1, 2\nExample 2\nInput: b a\nOutput: a b\nExample 3\nInput: x:\nOutput: y\nExample 4\nInput: q"
    assert si.parse_instances(text, classification=False) == [P("2, 1", "1, 2"), P("b a", "a b"), P("x:", "y"), P("", "Input: q", "missing_marker")]
    assert si.parse_instances("Output: A haiku.\n", classification=False) == [P("", "A haiku.")]
    label_first = " Positive\nInput: I loved it.\nClass label: Negative\nInput: Awful."
    assert si.parse_instances(label_first, classification=True) == [P("I loved it.", "Positive"), P("Awful.", "Negative")]
    assert si.parse_instances(" Spam\nClass label: Not spam", classification=True) == [P("", "Spam"), P("", "Not spam")]


def test_instance_parsing_needs_the_markers():
    """The prompt ends with "Example 1" or "Class label:": a reply without markers of its own is no instance."""
    chatter = "Sure, here you go! This task is about sorting."
    assert si.parse_instances(chatter, classification=False) == [P("", chatter, "missing_marker")]
    assert si.parse_instances(" " + chatter, classification=True) == [P("", chatter, "missing_marker")]
    unmarked = " Positive\nI loved it.\nClass label: Negative\nInput: Awful.\nClass label: Neutral"
    assert si.parse_instances(unmarked, classification=True) == [
        P("", "Positive\nI loved it.", "missing_marker"),  # an input without "Input:"
        P("Awful.", "Negative"),
        P("", "Neutral", "missing_marker"),  # no input where the others have one
    ]
    pairs = si.parse_instances("Input: Input: 2 + 3\nOutput: 5\nExample 2\nInput: Class label: yes\nOutput: yes", False)
    assert si.instance_verdicts(pairs, 5, cut_by_length=False) == ["input_starts_with_marker"] * 2
    pairs = si.parse_instances(" Positive\nInput: Output: I loved it.", classification=True)
    assert si.instance_verdicts(pairs, 5, cut_by_length=False) == ["input_starts_with_marker"]
    assert si.instance_verdicts([P("", chatter, "missing_marker")], 5, cut_by_length=False) == ["missing_marker"]


def test_instance_verdicts_in_the_references_order():
    pairs = [P("2, 1", "1, 2"), P("b a", "a b"), P("x:", "y"), P("q", "")]
    assert si.instance_verdicts(pairs, 5, cut_by_length=True) == [None, None, "ends_with_colon", "cut_by_length"]
    assert si.instance_verdicts([P("a", "1"), P("a", "2"), P("b", "b")], 5, False) == ["conflicting_outputs", "conflicting_outputs", "input_equals_output"]
    # No input: two different outputs are two examples, not a conflict (the reference skips empty inputs).
    assert si.instance_verdicts([P("", "A poem."), P("", "Another poem.")], 5, False) == [None, None]
    assert si.instance_verdicts([P("a", "1"), P("a", "1"), P("", "")], 5, False) == [None, "duplicate", "input_equals_output"]
    assert si.instance_verdicts([P("", "x")], 5, False) == [None]
    assert si.instance_verdicts([P(str(i), "y") for i in range(7)], 5, False)[5:] == ["over_max_instances"] * 2


def test_word_count_follows_the_tokenizer():
    """CJK text has no spaces: one whitespace "word", always too short, unless counted like the unicode tokenizer."""
    chinese = "请把下面的句子翻译成英文。"
    assert si.rejection_reason(chinese, require_ascii_start=False) == "too_short"
    assert si.rejection_reason(chinese, require_ascii_start=False, tokenizer="unicode") is None
    assert si.word_count("Sort these numbers.", "unicode") == si.word_count("Sort these numbers.") == 3


# ---- the run's bookkeeping, with a scripted backend ----------------------------------------------------------


class ScriptedBackend:
    """Answers like a model would, from scripts: instruction lists in turn (text, or (text, finish_reason)), "No" to
    classification, one instance.

    `fail_at`: the generate call (1-based) that raises, like a server going away."""

    name = "scripted"
    model = "scripted"

    def __init__(self, lists: list[str], fail_at: int | None = None):
        self.lists, self.calls, self.fail_at = list(lists), 0, fail_at

    def render_chat(self, messages):
        raise RuntimeError("no chat template")

    def generate(self, requests):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("server went away")
        results = []
        for request in requests:
            prompt = request.prompt
            if prompt.endswith("Is it classification?"):
                text = " No"
            elif prompt.endswith("Example 1\n"):
                text = "Input: some input\nOutput: an answer for " + prompt.rsplit("Task: ", 1)[1].split("\n")[0]
            else:
                text = self.lists.pop(0) if self.lists else " Say nothing new at all today.\n"
            text, finish = text if isinstance(text, tuple) else (text, "stop")
            results.append(Result(prompt, len(prompt.split()), (Completion(text, finish, len(text.split())),), 0.0))
        return results

    def close(self):
        pass


def new_run(session: Session, seeds: list[SeedTask], config) -> Run:
    run = Run(name="t", pipeline="self-instruct", config=bootstrap.config_dict(config), model="scripted", backend="scripted")
    session.add(run)
    session.flush()
    bootstrap.store_seeds(session, run, seeds)
    session.commit()
    return run


SEED_TASKS = read_seeds(SEEDS)[:20]
NOVEL = [
    "Name three rivers that flow through Germany and describe one.",
    "Compose a limerick about a cat who loves cheese.",
    "Convert the temperature from Fahrenheit to Kelvin and explain the steps.",
    "List five ways to save water at home during a drought.",
    "Explain why the sky looks red at sunset to a ten year old.",
    "Suggest a weekend itinerary for a family visiting Lisbon.",
]


def listing(*items: str) -> str:
    return "".join(f"{' ' if i == 0 else f'{9 + i}. '}{text}\n" for i, text in enumerate(items))


def test_run_records_every_decision(db_url):
    lists = [
        listing(NOVEL[0], SEED_TASKS[3].instruction, "Draw a map of your town.", NOVEL[1]),
        listing(NOVEL[0] + " Now.", "Hi there."),  # near-copy of an accepted instruction; too short
        listing(NOVEL[2], NOVEL[3], NOVEL[4]),
    ]
    config = si.SelfInstructConfig(num_instructions=4, request_batch_size=2)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        totals = si.run(session, run, ScriptedBackend(lists), config)
        assert (run.status, run.accepted, totals.accepted) == ("completed", 4, 4)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        verdicts = [(t.instruction, t.status, t.reason) for t in tasks]
        assert verdicts[:4] == [
            (NOVEL[0], "accepted", None),
            (SEED_TASKS[3].instruction, "rejected", "rouge_similarity"),
            ("Draw a map of your town.", "rejected", "blacklist:map"),  # the first blacklisted word in the list's order
            (NOVEL[1], "accepted", None),
        ]
        assert (NOVEL[0] + " Now.", "rejected", "rouge_similarity") in verdicts
        assert ("Hi there.", "rejected", "too_short") in verdicts
        assert (NOVEL[4], "rejected", "target_reached") in verdicts  # passed the filter after the 4th: no calls spent
        copy = tasks[1]
        assert (copy.nearest, copy.similarity) == (SEED_TASKS[3].instruction, 1.0)
        assert all(t.generation_id for t in tasks)
        accepted = [t for t in tasks if t.status == "accepted"]
        assert all(t.is_classification is False for t in accepted)
        for task in accepted:
            instances = session.exec(select(Instance).where(Instance.task_id == task.id)).all()
            assert [(i.input, i.status) for i in instances] == [("some input", "accepted")]
        purposes = [g.purpose for g in session.exec(select(Generation).order_by(Generation.id)).all()]
        assert purposes.count("classification") == purposes.count("instances") == 4
        assert run.instances == 4 and run.rejected == len(tasks) - 4


@pytest.mark.parametrize("length_cut, reasons", [("drop_response", ["cut_by_length"] * 3), ("drop_last", [None, None, "cut_by_length"])])
def test_a_response_cut_by_length(db_url, length_cut, reasons):
    """Self-Instruct's reference drops a whole response that max_tokens cut; drop_last is Alpaca's rule."""
    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=1, max_stalled_batches=1, length_cut=length_cut)
    assert si.SelfInstructConfig().length_cut == "drop_response"
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([(listing(*NOVEL[:3]), "length")]), config)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        assert [t.reason for t in tasks][:3] == reasons


def test_every_request_has_its_own_sampling_seed(db_url):
    """Seeds derived from (run seed, batch, request index): distinct across requests and batches and runs' seeds
    (the old seed * 1000 + batch gave seed 0 batch 1000 the seed of seed 1 batch 0, and one seed to a whole batch)."""
    assert len({bootstrap.request_seed(s, b, i) for s in (0, 1) for b in (0, 1, 1000) for i in range(16)}) == 2 * 3 * 16
    assert bootstrap.request_seed(0, 1000, 0) != bootstrap.request_seed(1, 0, 0)
    config = si.SelfInstructConfig(num_instructions=3, request_batch_size=4)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0]), listing(NOVEL[1]), listing(NOVEL[2])]), config)
        rows = session.exec(select(Generation).where(Generation.purpose == "instructions").order_by(Generation.id)).all()
        seeds = [g.sampling["seed"] for g in rows]
        assert len(rows) == 4 and len(set(seeds)) == 4
        assert seeds == [bootstrap.request_seed(0, g.batch, i) for i, g in enumerate(rows)]


def test_transformers_batches_requests_that_differ_only_in_seed(embedded_model_path, monkeypatch):
    """The transformers backend samples a batch from one generator: requests with their own seeds still share a
    batch, rows draw different numbers, and the same requests give the same samples."""
    from datagen.backends import Request
    from datagen.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend("smollm2-135m")
    calls = []
    original = backend._generate_batch
    monkeypatch.setattr(backend, "_generate_batch", lambda prompts, params: calls.append(len(prompts)) or original(prompts, params))
    config = si.SelfInstructConfig(max_tokens=12)
    requests = [Request(prompt="1. Write a poem about", params=si.instruction_params(config, bootstrap.request_seed(0, 1, i))) for i in range(4)]
    first = [r.completions[0].text for r in backend.generate(requests)]
    assert calls == [4]
    assert len(set(first)) > 1
    assert [r.completions[0].text for r in backend.generate(requests)] == first


def test_backend_failure_marks_nothing_lost_and_rerun_resumes(db_url):
    config = si.SelfInstructConfig(num_instructions=3, request_batch_size=1)
    lists = [listing(NOVEL[0]), listing(NOVEL[1]), listing(NOVEL[2])]
    engine = open_engine(db_url)
    with Session(engine) as session:
        run = new_run(session, SEED_TASKS, config)
        backend = ScriptedBackend(lists, fail_at=4)  # batch 1 is 3 calls; batch 2 fails at its first
        with pytest.raises(ConnectionError):
            si.run(session, run, backend, config)
    with Session(engine) as session:
        run = get_run(session, "t")
        assert run.accepted == 1  # batch 1 committed, batch 2 lost whole
        backend.fail_at = None
        si.run(session, run, backend, config)
        assert (run.status, run.accepted) == ("completed", 3)
        generated = session.exec(select(Task.instruction).where(Task.source == "generated", Task.status == "accepted")).all()
        assert sorted(generated) == sorted(NOVEL[:3])
        batches = session.exec(select(Generation.batch).where(Generation.purpose == "instructions").order_by(Generation.id)).all()
        assert batches == [1, 2, 3]


def test_stall_guard_and_request_budget(db_url):
    config = si.SelfInstructConfig(num_instructions=5, request_batch_size=2, max_stalled_batches=2)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(SEED_TASKS[0].instruction)] * 10), config)
        assert run.status == "stopped" and "2 batches in a row accepted nothing" in run.error
        assert run.requests == 4
    with Session(open_engine(db_url.replace(".db", "2.db"))) as session:
        config = si.SelfInstructConfig(num_instructions=5, request_batch_size=2, max_requests=3)
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([]), config)
        assert run.status == "stopped" and "--max-requests 3" in run.error
        assert session.exec(select(Generation).where(Generation.purpose == "instructions")).all().__len__() == 3


class PromptKeyedBackend(ScriptedBackend):
    """Answers an instruction prompt with a human-written task picked by the prompt's hash, so a run's answers depend
    on its prompts alone, as a seeded model's would, not on how many calls came before."""

    def __init__(self, candidates: list[str]):
        super().__init__([])
        self.candidates = candidates

    def generate(self, requests):
        import hashlib

        self.lists = []
        for request in requests:
            if request.prompt.endswith(("Is it classification?", "Example 1\n")):
                continue
            digest = int(hashlib.sha256(request.prompt.encode()).hexdigest(), 16)
            self.lists.append(listing(self.candidates[digest % len(self.candidates)]))
        return super().generate(requests)


class Killed(Exception):
    pass


def decisions(session: Session, run: Run) -> list[tuple]:
    tasks = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()
    calls = session.exec(select(Generation).where(Generation.run_id == run.id).order_by(Generation.id)).all()
    return [(t.instruction, t.status, t.reason) for t in tasks] + [(g.batch, g.purpose, g.prompt) for g in calls]


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("candidates, kill_after", [(20, 2), (20, 3), (0, 2)], ids=["near-target", "at-target", "stalled"])
def test_a_run_killed_after_batch_k_and_resumed_is_the_uninterrupted_run(tmp_path, candidates, kill_after, pipelined):
    """Near the target a batch asks for fewer requests (the keep rate so far), and the stall guard counts batches in a
    row: both come from the store, so the resumed run stores exactly what the uninterrupted one does, in either loop
    (pipelined: the batch in flight when the process dies is lost and redone)."""
    pool = [s.instruction for s in read_seeds(SEEDS)[20 : 20 + candidates]] or [SEED_TASKS[0].instruction]
    config = si.SelfInstructConfig(num_instructions=8, request_batch_size=4, max_stalled_batches=4, pipelined=pipelined)
    stores = []
    for kill in (None, kill_after):
        engine = open_engine(f"sqlite:///{tmp_path / f'kill-{kill}.db'}")
        with Session(engine) as session:
            run = new_run(session, SEED_TASKS, config)
            batches = []

            def on_batch(run, stats, kill=kill):
                batches.append(stats.requests)
                if len(batches) == kill:
                    raise Killed

            try:
                si.run(session, run, PromptKeyedBackend(pool), config, on_batch)
            except Killed:
                pass
        with Session(engine) as session:
            run = get_run(session, "t")
            si.run(session, run, PromptKeyedBackend(pool), config, lambda run, stats: batches.append(stats.requests))
            stores.append((run.status, run.accepted, decisions(session, run), batches))
    assert stores[0][:3] == stores[1][:3]  # every call (batch, purpose, prompt) and every verdict
    # (the progress callback of a batch stored in the same transaction as the one killed after is not called)
    assert stores[1][3] == stores[0][3][: len(stores[1][3])]
    status, accepted, _, batches = stores[0]
    if candidates:
        assert (status, accepted) == ("completed", 8)
        # the last batch was cut to what the rate needs (pipelined: batch 3 is sized from batch 1 alone, full here,
        # and no batch 4 goes out while batch 3 can reach the target)
        assert batches == ([4, 4, 4] if pipelined else [4, 4, 2])
    else:
        assert status == "stopped" and len(batches) == 4 + pipelined  # pipelined: the guard sees one batch later


class CallLog(PromptKeyedBackend):
    """Also records, per generate call, which phases its requests belong to."""

    def generate(self, requests):
        self.phases = getattr(self, "phases", [])
        self.phases.append({phase_of(r.prompt) for r in requests})
        return super().generate(requests)


def phase_of(prompt: str) -> str:
    return "classification" if prompt.endswith("Is it classification?") else "instances" if prompt.endswith("Example 1\n") else "instructions"


def test_the_pipelined_loop_sends_two_batches_per_call_and_decides_as_the_sequential_one(tmp_path):
    """Batch k's instruction requests share a call with batch k-1's instance requests. Away from the target (here a
    request budget ends both runs) every prompt, verdict and stored row is the sequential loop's."""
    pool = [s.instruction for s in read_seeds(SEEDS)[20:60]]
    stores, calls = [], []
    for pipelined in (False, True):
        config = si.SelfInstructConfig(num_instructions=100, request_batch_size=3, max_requests=12, pipelined=pipelined)
        with Session(open_engine(f"sqlite:///{tmp_path / f'{pipelined}.db'}")) as session:
            run = new_run(session, SEED_TASKS, config)
            backend = CallLog(pool)
            si.run(session, run, backend, config)
            stores.append((run.status, run.accepted, run.instances, decisions(session, run)))
            calls.append(backend.phases)
    assert stores[0] == stores[1] and stores[0][0] == "stopped" and stores[0][1] > 0
    assert {"instructions", "instances"} not in calls[0]
    assert sum(phases == {"instructions", "instances"} for phases in calls[1]) == 3  # batches 2-4 carry 1-3's instances
    assert len(calls[1]) < len(calls[0])


class FailingInstances(ScriptedBackend):
    """The scripted model, whose instance answer for the instructions in `bad` has an empty output."""

    def __init__(self, lists: list[str], bad: set[str]):
        super().__init__(lists)
        self.bad = bad

    def generate(self, requests):
        results = super().generate(requests)
        return [
            Result(r.prompt, r.prompt_tokens, (Completion("Input: some input\nOutput:", "stop", 3),), 0.0)
            if r.prompt.endswith("Example 1\n") and r.prompt.rsplit("Task: ", 1)[1].split("\n")[0] in self.bad else r
            for r in results
        ]  # fmt: skip


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_an_instruction_past_the_target_is_admitted_when_one_before_it_gets_no_instance(db_url, pipelined):
    """Issue 19: the instructions past the target were labelled target_reached before the instances of those before
    them existed; when one of those then failed, the run went on to a new batch. Now the next one is admitted, in
    order, and only what is left past the target is target_reached."""
    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=1, pipelined=pipelined)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        backend = FailingInstances([listing(*NOVEL[:4])], bad={NOVEL[0]})
        si.run(session, run, backend, config)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        assert [(t.instruction, t.reason) for t in tasks] == [
            (NOVEL[0], "no_valid_instances"), (NOVEL[1], None), (NOVEL[2], None), (NOVEL[3], "target_reached")
        ]  # fmt: skip
        assert (run.status, run.accepted) == ("completed", 2)
        calls = session.exec(select(Generation.batch, Generation.purpose).order_by(Generation.id)).all()
        assert {batch for batch, _ in calls} == {1}  # no second batch of instructions
        assert [p for _, p in calls].count("instances") == 3  # NOVEL[3]'s instance was never asked for


def test_runs_show_lists_target_reached_as_not_judged(db_url):
    """Issue 19.10's words: an instruction past the target is not judged, so `datagen runs show` does not list it
    under "rejected" (the e2e loop's summary printed "rejected: target_reached" beside "not judged 1")."""
    config = si.SelfInstructConfig(num_instructions=2, request_batch_size=1)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, FailingInstances([listing(*NOVEL[:4])], bad={NOVEL[0]}), config)
        name = run.name
    shown = runner.invoke(app, ["runs", "show", name, "--db", db_url])
    assert shown.exit_code == 0, shown.output
    assert "not judged: target_reached" in shown.output and "rejected: no_valid_instances" in shown.output
    assert "rejected: target_reached" not in shown.output


def test_instance_tokens_are_the_references_per_kind(db_url):
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, ScriptedBackend([listing(NOVEL[0])]), config)  # the scripted model says "No"
        sampling = session.exec(select(Generation.sampling).where(Generation.purpose == "instances")).one()
    assert sampling["max_tokens"] == 350


def test_generate_classification_compares_with_the_classification_seeds_only(db_url):
    """bootstrap_instructions.py drops the other seeds before both the prompt and the ROUGE-L filter: a copy of an
    ordinary seed is no near-duplicate of any seed the run compares against."""
    seeds = read_seeds(SEEDS)
    ordinary = next(s for s in seeds if s.is_classification is False)
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1, max_requests=1, generate_classification=True)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, seeds, config)
        si.run(session, run, ScriptedBackend([listing(ordinary.instruction)]), config)
        task = session.exec(select(Task).where(Task.source == "generated")).one()
    # passed the filter; the scripted model's answer to the label-first prompt has no marker
    assert (task.reason, task.is_classification, task.similarity < 0.7) == ("no_valid_instances", True, True)


class SevenNew(ScriptedBackend):
    """A model that writes 7 new instructions per request, all distinct (random words, one marker word the seeds
    never use), named like an engine so the run takes its defaults."""

    name = "openai"

    def generate(self, requests):
        import random

        self.lists = []
        for request in requests:
            if not request.prompt.endswith(("Is it classification?", "Example 1\n")):
                rng = random.Random(request.params.seed)
                words = lambda: " ".join(f"w{rng.randrange(10**6)}" for _ in range(6))  # noqa: E731
                self.lists.append(listing(*(f"Describe zork {words()}." for _ in range(7))))
        return super().generate(requests)


def machine_share(session: Session, run: Run) -> tuple[float, list[int], dict[int, dict[str, int]]]:
    """The share of accepted instructions whose prompt showed a machine instruction, the instruction requests per
    batch, and per batch the count of each verdict."""
    rows = session.exec(
        select(Generation.batch, Generation.prompt, Task.status, Task.reason)
        .join(Task, Task.generation_id == Generation.id)
        .where(Generation.run_id == run.id, Task.source == "generated")
    ).all()  # fmt: skip
    accepted = [prompt for _, prompt, status, _ in rows if status == "accepted"]
    per_batch: dict[int, dict[str, int]] = {}
    for batch, _, status, reason in rows:
        verdicts = per_batch.setdefault(batch, {})
        verdicts[reason or status] = verdicts.get(reason or status, 0) + 1
    calls = session.exec(select(Generation.batch).where(Generation.run_id == run.id, Generation.purpose == "instructions")).all()
    sizes = [calls.count(b) for b in sorted(set(calls))]
    return sum("zork" in p.split("\n1. ", 1)[-1] for p in accepted) / len(accepted), sizes, per_batch


def test_the_default_batch_ramps_so_prompts_show_machine_instructions(tmp_path):
    """Issue 19: a fixed batch of 64 (the old default on vllm/openai) prompts a whole -n 100 run before any machine
    instruction exists. The ramp starts at the reference's 5, so prompts show the pool as the reference's would,
    and no batch is generated only to be discarded as target_reached."""
    shares = {}
    for label, size in (("reference", 5), ("ramp", None), ("fixed 64", 64)):
        config = si.SelfInstructConfig(num_instructions=100, request_batch_size=size)
        with Session(open_engine(f"sqlite:///{tmp_path / f'{size}.db'}")) as session:
            run = new_run(session, SEED_TASKS, config)
            si.run(session, run, SevenNew([]), config)
            assert (run.status, run.accepted) == ("completed", 100)
            shares[label], sizes, per_batch = machine_share(session, run)
        if label == "ramp":
            assert sizes[:3] == [5, 5, 5] and max(sizes) <= 64
            assert all(v.get("accepted") for v in per_batch.values())  # every batch had a use
            assert sum(v.get("target_reached", 0) for v in per_batch.values()) < 7 * sizes[-1]  # the last batch's surplus
    assert shares["fixed 64"] == 0
    assert shares["ramp"] >= shares["reference"] - 0.05 and shares["ramp"] > 0.5, shares


def test_the_ramp_grows_with_the_pool_up_to_the_engine_cap():
    assert bootstrap.ramp_size(0, 0, 0, 64) == 5  # nothing known yet: the reference's 5
    assert bootstrap.ramp_size(35, 35, 5, 64) == 5  # 7 per request: 5 requests add more than 10% of a small pool
    assert bootstrap.ramp_size(700, 700, 100, 64) == 10  # 10 requests add 70, 10% of 700
    assert bootstrap.ramp_size(10_000, 700, 100, 64) == 64  # capped where the engine is full
    assert bootstrap.ramp_size(700, 700, 100, 3) == 3


def test_resume_rebuilds_the_pool_from_the_store(db_url):
    """An instruction without valid instances stays in the similarity pool: a near-copy of it is still rejected."""
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1)
    engine = open_engine(db_url)
    with Session(engine) as session:
        run = new_run(session, SEED_TASKS, config)
        backend = ScriptedBackend([listing(NOVEL[0], NOVEL[1])])
        si.run(session, run, backend, config)
        assert [t.reason for t in session.exec(select(Task).where(Task.source == "generated")).all()] == [None, "target_reached"]
    with Session(engine) as session:
        run = get_run(session, "t")
        assert bootstrap.load_pool(session, run) == NOVEL[:2]
        assert [s.instances for s in bootstrap.load_seeds(session, run)] == [s.instances for s in SEED_TASKS]
        config = si.SelfInstructConfig(num_instructions=2, request_batch_size=1)
        si.run(session, run, ScriptedBackend([listing(NOVEL[1] + " Please.", NOVEL[2])]), config)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        assert [(t.instruction, t.reason) for t in tasks][2:] == [(NOVEL[1] + " Please.", "rouge_similarity"), (NOVEL[2], None)]


# ---- real runs on the embedded model -------------------------------------------------------------------------

SMALL = ["--backend", "transformers", "--request-batch-size", "8", "--max-tokens", "160", "--instance-max-tokens", "96"]


def check_store_independently(db_url: str, run_name: str, target: int) -> None:
    """With rouge-score itself: every instruction that passed the filter scores <= 0.7 against the seeds and every
    earlier one; accepted ones are unique and have an accepted instance; every rejected one has a reason."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    with Session(open_engine(db_url)) as session:
        run = get_run(session, run_name)
        tasks = session.exec(select(Task).where(Task.run_id == run.id).order_by(Task.id)).all()
        earlier = [t.instruction for t in tasks if t.source == "seed"]
        passed = [t for t in tasks if t.source == "generated" and (t.status == "accepted" or t.reason in bootstrap.POOL_REASONS)]
        accepted = [t for t in tasks if t.source == "generated" and t.status == "accepted"]
        assert len(accepted) == run.accepted == target
        assert len({t.instruction for t in accepted}) == len(accepted)
        for task in passed:
            best = max(scorer.score(other, task.instruction)["rougeL"].fmeasure for other in earlier)
            assert best <= 0.7, (task.instruction, best)
            earlier.append(task.instruction)
        for task in tasks:
            if task.source == "generated" and task.reason == "rouge_similarity":
                assert task.similarity > 0.7 and task.nearest
        for task in accepted:
            instances = session.exec(select(Instance).where(Instance.task_id == task.id, Instance.status == "accepted")).all()
            assert instances, task.instruction
            assert task.generation_id is not None
        assert all(t.reason for t in tasks if t.status == "rejected")
        assert run.rejected == sum(t.status == "rejected" for t in tasks if t.source == "generated")


def kill_9_then_resume(command: list[str], db_url: str, run_name: str, target: int) -> dict:
    """Start the CLI command, `kill -9` its process group once a first batch is stored and the next is under way, and
    resume it with the same command (in this process, on the session's model: the kill is what needs a process of its
    own): every row from before the kill is kept unchanged, the target is reached, the store checks out. Returns the
    resumed run's --json summary."""
    engine = open_engine(db_url)

    def first_batch_stored():
        with Session(engine) as session:
            return session.exec(select(Task).where(Task.source == "generated")).first() is not None

    kill_9_once(command, first_batch_stored, then=3)  # into the next batch
    with Session(engine) as session:
        before = session.exec(select(Task.id, Task.instruction, Task.status).where(Task.source == "generated")).all()
        assert before and get_run(session, run_name).status == "running"
    assert command[1:3] == ["-m", "datagen.cli"]
    done = runner.invoke(app, [*command[3:], "--json"])
    assert done.exit_code == 0, done.output[-2000:]
    check_store_independently(db_url, run_name, target)
    with Session(engine) as session:
        after = session.exec(select(Task.id, Task.instruction, Task.status).where(Task.source == "generated")).all()
        assert set(before) <= set(after)
        assert get_run(session, run_name).status == "completed"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_real_run_on_the_embedded_model_killed_with_9_and_resumed(tmp_path):
    """The embedded model through the CLI: a run killed with -9 after its first batch, then resumed to its target
    (one real run, not one uninterrupted and one killed); a second rerun finds nothing left to do."""
    db_url = f"sqlite:///{tmp_path / 'kill.db'}"
    command = [sys.executable, "-m", "datagen.cli", "self-instruct", "--seeds", str(SEEDS), "-n", "6", "--run", "k",
               "--db", db_url, *SMALL, "--request-batch-size", "3"]  # fmt: skip
    summary = kill_9_then_resume(command, db_url, "k", 6)
    assert (summary["accepted"], summary["status"]) == (6, "completed")
    assert summary["instances"] >= 6 and summary["instructions"] == summary["accepted"] + summary["rejected"] + summary["not_judged"]
    with Session(open_engine(db_url)) as session:
        run = get_run(session, "k")
        prompts = session.exec(select(Generation.prompt).where(Generation.purpose == "instructions")).all()
        assert all(p.startswith("<|im_start|>system") and p.endswith("\n9.") for p in prompts)  # chat: auto-chosen
        assert run.config["max_tokens"] == 160 and run.config["seeds"] == str(SEEDS)
    again = runner.invoke(app, [*command[3:], "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout.strip().splitlines()[-1])["accepted_this_session"] == 0


# ---- bad input and config files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"instruction": "Sort a list of numbers.", "instances": []}\n{"name": "x"}\n', [], "seeds.jsonl:2: missing field 'instruction'"),
        ('{"instruction": "   "}\n', [], "seeds.jsonl:1: field 'instruction' is empty"),
        ('{"instruction": "Sort numbers well.", "is_classification": "no"}\n', [], "seeds.jsonl:1: field 'is_classification' must be true or false"),
        ("[]", [], "seeds.jsonl: no seed tasks"),
        ('{"instruction": "ok"\n', [], "seeds.jsonl:1: invalid JSON"),
        ('{"instruction": "Sort a list of numbers."}\n', ["--instance-demos", "seeds"], "seeds.jsonl: no seed task has instances"),
        ('{"instruction": "Sort it.", "output": "x"}\n', ["-n", "0"], "--num-instructions must be at least 1"),
        ('{"instruction": "Sort it.", "output": "x"}\n', ["--rouge-threshold", "1.5"], "--rouge-threshold must be in [0, 1]"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, content, args, message):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(content)
    result = runner.invoke(app, ["self-instruct", "--seeds", str(seeds), "--db", f"sqlite:///{tmp_path / 'x.db'}", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.db").exists()


def test_the_example_config_loads(tmp_path):
    from datagen.cli.commands.self_instruct import load_config

    path = REPO / "examples" / "self_instruct.yaml"
    values = yaml.safe_load(path.read_text())
    config = load_config(si.SelfInstructConfig, path, {"num_instructions": 7})
    assert config.num_instructions == 7  # flags win
    assert all(getattr(config, key.replace("-", "_")) == value for key, value in values.items() if key != "num_instructions")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tokens: 64\nmax_tokenz: 3\n")
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "--config", str(bad), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2 and "unknown option 'max_tokenz'" in result.output


def test_resume_refuses_other_seeds_or_pipeline(tmp_path, db_url):
    with Session(open_engine(db_url)) as session:
        new_run(session, SEED_TASKS, si.SelfInstructConfig())
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "Sort the numbers please.", "output": "1 2"}\n')
    result = runner.invoke(app, ["self-instruct", "--seeds", str(other), "--run", "t", "--db", db_url, "--model", "scripted"])
    assert result.exit_code == 2 and "other seed tasks" in result.output
    result = runner.invoke(app, ["alpaca", "--seeds", str(other), "--run", "t", "--db", db_url])
    assert result.exit_code == 2 and "is a self-instruct run" in result.output


def test_resume_refuses_changed_options_or_seed_instances(tmp_path, db_url):
    """A resume must be the run it resumes: changed method options or seed instances are refused with the differences
    named, and nothing is written; where the run stops (-n, --max-requests) may change."""
    from datagen.cli.commands.self_instruct import check_resume

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(SEEDS.read_text().splitlines(keepends=True)[:20]))
    with Session(open_engine(db_url)) as session:
        new_run(session, SEED_TASKS, si.SelfInstructConfig())
    base = ["self-instruct", "--seeds", str(seeds), "--run", "t", "--db", db_url, "--model", "scripted"]
    result = runner.invoke(app, [*base, "--temperature", "1.0", "--top-p", "0.5", "--instance-demos", "seeds"])
    assert result.exit_code == 2
    assert "started with other options (temperature 0.7 -> 1.0, instance_demos 'builtin' -> 'seeds')" in result.output
    changed = [json.loads(line) for line in seeds.read_text().splitlines()]
    changed[3]["instances"][0]["output"] += " (edited)"
    seeds.write_text("".join(json.dumps(record) + "\n" for record in changed))
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "other seed tasks" in result.output
    with Session(open_engine(db_url)) as session:
        run = get_run(session, "t")
        assert run.config == bootstrap.config_dict(si.SelfInstructConfig()) and run.status == "running"
        assert not session.exec(select(Generation)).first()
        flags = {"num_instructions": 500, "max_requests": 9}
        settings = check_resume(session, run, "self-instruct", si.SelfInstructConfig, None, flags, SEED_TASKS, seeds, "scripted")
        assert (settings.num_instructions, settings.max_requests, settings.temperature) == (500, 9, 0.7)


@pytest.mark.parametrize(
    "yaml_text, args, message",
    [
        ("", ["--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
        ("", ["--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
        ("", ["--seed", "-3"], "--seed must be in [0, 2^31), got -3"),
        ("temperature: hot\n", [], "option 'temperature' must be a number, got 'hot'"),
        ("num_instructions: abc\n", [], "option 'num_instructions' must be an integer, got 'abc'"),
        ("length_cut: sometimes\n", [], "length_cut must be drop_response or drop_last, got sometimes"),
        ("max_requests: 2.5\n", [], "option 'max_requests' must be an integer, got 2.5"),
    ],
)
def test_bad_options_exit_2_before_any_store_or_model(tmp_path, yaml_text, args, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    for pipeline in ("self-instruct", "alpaca"):
        result = runner.invoke(app, [pipeline, "--seeds", str(SEEDS), "--config", str(config), "--db", f"sqlite:///{tmp_path / 'x.db'}", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not (tmp_path / "x.db").exists()


def test_a_yaml_type_error_is_one_line_in_a_real_process(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("temperature: hot\n")
    done = subprocess.run([sys.executable, "-m", "datagen.cli", "self-instruct", "--seeds", str(SEEDS), "--config", str(config),
                           "--db", f"sqlite:///{tmp_path / 'x.db'}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{config}: option 'temperature' must be a number, got 'hot'" in done.stderr
    assert not (tmp_path / "x.db").exists()


# ---- other backends ------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_self_instruct_on_vllm(vllm_llm, db_url):
    config = si.SelfInstructConfig(num_instructions=3, request_batch_size=8, max_tokens=160, instance_max_tokens=96)
    with Session(open_engine(db_url)) as session:
        run = Run(name="v", pipeline="self-instruct", config=bootstrap.config_dict(config), model="smollm2-135m", backend="vllm")
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, read_seeds(SEEDS))
        session.commit()
        si.run(session, run, vllm_llm, config)
        assert (run.status, run.accepted) == ("completed", 3)
    check_store_independently(db_url, "v", 3)


@pytest.mark.vllm
def test_vllm_same_prompt_requests_sample_apart_and_repeat(vllm_llm):
    """16 requests with one prompt at temperature 0.7 give 16 different completions, and the same --seed gives the
    same 16 again. One seed shared by the batch (the old scheme) gives 16 copies of one completion."""
    from datagen.backends import Request

    config = si.SelfInstructConfig(max_tokens=48)
    prompt = si.instruction_prompt([s.instruction for s in SEED_TASKS[:8]]).render(vllm_llm.render_chat)
    requests = [Request(prompt=prompt, params=si.instruction_params(config, bootstrap.request_seed(0, 1, i))) for i in range(16)]
    first = [r.completions[0].text for r in vllm_llm.generate(requests)]
    assert len(set(first)) == 16
    assert [r.completions[0].text for r in vllm_llm.generate(requests)] == first
    shared = [Request(prompt=prompt, params=si.instruction_params(config, 1)) for _ in range(16)]
    assert len({r.completions[0].text for r in vllm_llm.generate(shared)}) == 1


@pytest.mark.vllm
def test_self_instruct_through_vllm_serve(vllm_server, db_url):
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "-n", "3", "--run", "o", "--db", db_url,
                                 "--backend", "openai", "--base-url", vllm_server, "--model", "smollm2-135m",
                                 "--request-batch-size", "8", "--max-tokens", "160", "--instance-max-tokens", "96", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    check_store_independently(db_url, "o", 3)
    with Session(open_engine(db_url)) as session:
        generation = session.exec(select(Generation).where(Generation.purpose == "instructions")).first()
        assert generation.backend == "openai" and generation.sampling["presence_penalty"] == 2.0
