"""Runs written straight into a real store, with real text from the Self-Instruct seed tasks.

Export and report logic only needs rows shaped like a pipeline's: seeds (source='seed'), generations per batch,
accepted and rejected instructions with reasons, accepted and rejected instances. Seeds 0-99 are the run's seed
tasks; seeds 100 onwards play the generated instructions, with their real instances as outputs.
"""

from __future__ import annotations

import json

from sqlalchemy import func
from sqlmodel import Session, select

from storage.tables import Generation, Instance, Run, Task
from tests.conftest import SEEDS

SEED_RECORDS = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines()]
TASK_REASONS = ("rouge_similarity", "too_short", "blacklist")
SAMPLING = {"temperature": 0.7, "top_p": 0.5, "max_tokens": 1024, "n": 1, "seed": None, "stop": ["\n\n16", "16."], "presence_penalty": 2.0}


def _generation(session: Session, run: Run, purpose: str, batch: int, prompt: str, completion: str) -> Generation:
    generation = Generation(
        run_id=run.id, purpose=purpose, batch=batch, prompt=prompt, completion=completion, finish_reason="stop",
        sampling=SAMPLING if purpose == "instructions" else {**SAMPLING, "temperature": 0.0, "top_p": 1.0, "max_tokens": 300},
        model=run.model, backend=run.backend, prompt_tokens=len(prompt.split()), completion_tokens=len(completion.split()), latency_s=0.5,
    )  # fmt: skip
    session.add(generation)
    session.flush()
    return generation


def build_run(session: Session, name: str = "si-test", tasks: int = 24, first: int = 100, batch_size: int = 6) -> Run:
    """A completed self-instruct run: 100 seeds and `tasks` generated instructions in batches of `batch_size`.

    Instruction i is rejected when i % 4 == 3 (reasons cycling through TASK_REASONS); accepted instruction 2 has
    its only instances rejected (a task without instances); every 5th task gets one extra rejected instance.
    """
    run = Run(
        name=name,
        pipeline="self-instruct",
        config={"seeds": "examples/seed_tasks.jsonl", "num_instructions": tasks, "rouge_threshold": 0.7},
        model="smollm2-135m",
        backend="transformers",
        status="completed",
    )
    session.add(run)
    session.flush()
    for record in SEED_RECORDS[:100]:
        session.add(Task(run_id=run.id, source="seed", seed_id=record["id"], instruction=record["instruction"],
                         is_classification=record["is_classification"]))  # fmt: skip
    records = SEED_RECORDS[first : first + tasks]
    for start in range(0, len(records), batch_size):
        block = records[start : start + batch_size]
        batch = start // batch_size
        listing = "\n".join(f"{k + 9}. {r['instruction']}" for k, r in enumerate(block))
        instructions_call = _generation(session, run, "instructions", batch, "Come up with a series of tasks:\n...", listing)
        for offset, record in enumerate(block):
            i = start + offset
            rejected = i % 4 == 3
            reason = TASK_REASONS[(i // 4) % len(TASK_REASONS)] if rejected else None
            scored = reason in (None, "rouge_similarity")  # the similarity filter runs last, after the cheap ones
            task = Task(
                run_id=run.id, generation_id=instructions_call.id, instruction=record["instruction"],
                is_classification=record["is_classification"], status="rejected" if rejected else "accepted",
                reason=reason, nearest=SEED_RECORDS[i % 100]["instruction"] if scored else None,
                similarity=(0.75 if rejected else round(0.2 + 0.01 * i, 2)) if scored else None,
            )  # fmt: skip
            session.add(task)
            session.flush()
            if rejected:
                continue
            instances_call = _generation(
                session, run, "instances", batch, f"Task: {record['instruction']}\n", json.dumps(record["instances"])
            )
            for instance in record["instances"]:
                status, reason = ("rejected", "input_equals_output") if i == 2 else ("accepted", None)
                session.add(Instance(task_id=task.id, generation_id=instances_call.id, input=instance["input"],
                                     output=instance["output"], status=status, reason=reason))  # fmt: skip
            if i % 5 == 0:
                session.add(Instance(task_id=task.id, generation_id=instances_call.id, input="x", output="",
                                     status="rejected", reason="empty_output"))  # fmt: skip
    run.generated = session.exec(select(func.count()).select_from(Generation).where(Generation.run_id == run.id)).one()
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


# Toolformer texts (written for these tests, in the style of the paper's examples) with the calls a run might keep.
TOOLFORMER_TEXTS = [
    ("Out of 1400 participants, 400 (or 29%) passed the test.", "(or ", "Calculator(400 / 1400)", "0.29"),
    ("The bakery sold 120 loaves on Monday and 95 on Tuesday, a total of 215 loaves in two days.", "a total of ", "Calculator(120 + 95)", "215"),
    ("The school has 12 classes of 25 pupils each, so 300 pupils are enrolled this year.", "so ", "Calculator(12 * 25)", "300"),
    ("The museum reopened last week after two years of repairs.", "The museum reopened ", "Calendar()", "Today is Tuesday, May 17, 2022."),
    ("Of the 2500 runners who started, 2150 finished, so 350 dropped out.", "so ", "Calculator(2500 - 2150)", "350"),
    ("The river is wide and slow where it passes the old mill.", None, None, None),  # no kept call
]


def build_toolformer_run(session: Session, name: str = "tf-test") -> Run:
    """A completed toolformer run: one text per TOOLFORMER_TEXTS entry; each call found is kept and inserted, and each
    text also has one call rejected by the loss filter and one that did not parse."""
    from storage.tables import ApiCall, ToolformerText

    run = Run(name=name, pipeline="toolformer", model="smollm2-135m", backend="transformers", status="completed",
              config={"corpus": "examples/toolformer_corpus.jsonl", "tools": ["calculator", "calendar"], "api_start": "[",
                      "api_end": "]", "result_arrow": "->",
                      "settings": {"calculator": {"tau_s": 0.0, "k": 20, "m": 10, "tau_f": 0.5},
                                   "calendar": {"tau_s": 0.05, "k": 5, "m": 5, "tau_f": 1.0}}})  # fmt: skip
    session.add(run)
    session.flush()
    for line, (text, before, call, result) in enumerate(TOOLFORMER_TEXTS, start=1):
        annotated, position = text, 0
        if call:
            position = text.index(before) + len(before)
            annotated = f"{text[:position]}[{call} -> {result}] {text[position:]}"
        row = ToolformerText(run_id=run.id, line=line, text=text, annotated=annotated, calls_inserted=1 if call else 0,
                             tools=["calculator", "calendar"])  # fmt: skip
        session.add(row)
        session.flush()
        tool = "calendar" if call and call.startswith("Calendar") else "calculator"
        sampling = _generation(session, run, "api_calls", line, f"Your task is to add calls to a {tool} API...\n{text[:position]}[", f"{call or 'Calculator(1 + 1)'}]")
        outcomes = [("rejected", False, "Calculator(1 + 1)", "2"), ("unparsed", False, None, None)]
        if call:
            outcomes.insert(0, ("kept", True, call, result))
        for status, inserted, parsed, value in outcomes:
            session.add(ApiCall(run_id=run.id, text_id=row.id, generation_id=sampling.id, tool=tool, position=position,
                                token_position=3, p_api=0.2, completion=f"{parsed or 'Calculator(1 +'}]", call=parsed, result=value,
                                status=status, kept=status == "kept", inserted=inserted,
                                loss_plus=1.0, loss_minus=2.0 if status == "kept" else 1.1))  # fmt: skip
    session.commit()
    session.refresh(run)
    return run
