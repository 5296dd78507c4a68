"""Best-of-k answers (pipelines/best_of_k.py): seeds, the two rules, both pipelines' storage of every sample with its
verdict on a scripted backend, resume without duplicates, bad options, and a short real run on the embedded model."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.backends import Completion, Result
from datagen.cli import app
from datagen.dedup import rouge_l
from pipelines import alpaca, best_of_k, bootstrap
from pipelines import self_instruct as si
from pipelines.seeds import read_seeds
from storage.store import get_run, open_engine
from storage.tables import Generation, Instance, InstanceSample, Run, Task
from tests.conftest import SEEDS
from tests.test_alpaca import ScriptedAlpaca, continuation
from tests.test_self_instruct import NOVEL, SEED_TASKS, Killed, PromptKeyedBackend, ScriptedBackend, listing, new_run

runner = CliRunner()

ANSWERS = {
    0: "Input: a sunny day\nOutput: The sun is a star at the centre of our solar system.",
    1: "Input: a rainy day\nOutput: Umbrellas keep people dry when it pours outside.",
    2: "Input: a sunny day\nOutput: The sun is a big star at the centre of the solar system.",
}
"""A sample's answer by its sample number (a seed's low bits): 0 and 2 agree, 1 is the odd one out."""


def test_the_k_seeds_of_an_instruction_are_distinct_and_repeatable():
    seeds = [best_of_k.sample_seed(0, 1, 3, j) for j in range(best_of_k.MAX_SAMPLES)]
    assert len(set(seeds)) == best_of_k.MAX_SAMPLES and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [best_of_k.sample_seed(0, 1, 3, j) for j in range(best_of_k.MAX_SAMPLES)]
    others = {best_of_k.sample_seed(s, b, p, 0) for s in (0, 1) for b in (1, 2) for p in range(50)}
    assert len(others) == 200  # other run seeds, batches and positions: other seeds


def test_consistent_keeps_the_answer_the_others_agree_with():
    texts = {n: ANSWERS[n].split("\n") for n in ANSWERS}
    candidates = [best_of_k.Candidate(n, (("Describe the sun.", t[0][7:], t[1][8:]),)) for n, t in texts.items()]
    picked = best_of_k.pick_consistent(candidates)
    joined = {c.sample: f"{c.instances[0][1]}\n{c.instances[0][2]}" for c in candidates}
    for n in ANSWERS:
        others = [rouge_l(joined[m], joined[n]) for m in ANSWERS if m != n]
        assert picked.scores[n] == pytest.approx(sum(others) / 2)
    assert picked.chosen in (0, 2) and picked.scores[picked.chosen] == max(picked.scores.values())
    assert best_of_k.pick_consistent([]).chosen is None
    assert best_of_k.pick_consistent(candidates[1:2]).chosen == 1  # alone: chosen


def test_ifd_keeps_the_lowest_and_counts_a_missing_ifd_as_worst(monkeypatch):
    values = {"a": 0.9, "b": 0.4, "c": 0.2, "d": float("inf")}
    monkeypatch.setattr(best_of_k, "ifd_values", lambda backend, instances: [values[i[2]] for i in instances])
    candidates = [best_of_k.Candidate(0, (("x", "", "a"), ("x", "", "b"))), best_of_k.Candidate(1, (("x", "", "c"), ("x", "", "d"))),
                  best_of_k.Candidate(2, (("x", "", "b"),))]  # fmt: skip
    picked = best_of_k.pick_ifd(candidates, backend=None)
    assert picked.scores == {0: pytest.approx(0.65), 1: float("inf"), 2: 0.4} and picked.chosen == 2


class SampledAnswers(ScriptedBackend):
    """Instance requests with a seed get ANSWERS by the seed's sample number; the rest as ScriptedBackend."""

    def __init__(self, lists):
        super().__init__(lists)
        self.instance_params = []

    def generate(self, requests):
        results = super().generate(requests)
        out = []
        for request, result in zip(requests, results):
            if request.prompt.endswith("Example 1\n"):
                self.instance_params.append(request.params)
                if request.params.seed is not None:
                    text = ANSWERS[request.params.seed % best_of_k.MAX_SAMPLES]
                    result = Result(result.prompt, result.prompt_tokens, (Completion(text, "stop", len(text.split())),), 0.0)
            out.append(result)
        return out


def samples_of(session: Session, run: Run) -> dict[int, list[InstanceSample]]:
    rows = session.exec(select(InstanceSample).join(Task).where(Task.run_id == run.id).order_by(InstanceSample.id)).all()
    found: dict[int, list[InstanceSample]] = {}
    for row in rows:
        found.setdefault(row.task_id, []).append(row)
    return found


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_self_instruct_stores_every_sample_and_keeps_the_chosen_ones_instances(db_url, pipelined):
    config = si.SelfInstructConfig(num_instructions=3, request_batch_size=2, instance_samples=3, pipelined=pipelined)
    backend = SampledAnswers([listing(NOVEL[0], NOVEL[1]), listing(NOVEL[2])])
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, backend, config)
        assert (run.status, run.accepted) == ("completed", 3)
        samples = samples_of(session, run)
        accepted = session.exec(select(Task).where(Task.run_id == run.id, Task.status == "accepted", Task.source == "generated")).all()
        assert {t.id for t in accepted} == set(samples)
        for task in accepted:
            rows = samples[task.id]
            assert [r.sample for r in rows] == [0, 1, 2] and sum(r.chosen for r in rows) == 1
            # each sample is its own request, with its own seed: the one best_of_k derives
            generations = [session.get(Generation, r.generation_id) for r in rows]
            assert len({g.id for g in generations}) == 3 and len({r.seed for r in rows}) == 3
            assert all(g.sampling["seed"] == r.seed and g.sampling["temperature"] == config.temperature for g, r in zip(generations, rows))
            assert len({g.prompt for g in generations}) == 1  # one prompt, k seeds
            chosen = next(r for r in rows if r.chosen)
            assert chosen.sample in (0, 2) and chosen.score == max(r.score for r in rows)  # the odd answer (1) is not kept
            assert all(r.reason == "not_chosen_consistent" for r in rows if not r.chosen)
            instances = session.exec(select(Instance).where(Instance.task_id == task.id)).all()
            assert [(i.generation_id, i.status) for i in instances if i.status == "accepted"] == [(chosen.generation_id, "accepted")]
            assert sorted(i.reason for i in instances if i.status == "rejected") == ["not_chosen_consistent"] * 2
        assert run.instances == 3  # the chosen samples' instances only


def test_one_sample_is_the_references_greedy_request(db_url):
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1)
    backend = SampledAnswers([listing(NOVEL[0])])
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, backend, config)
        assert run.accepted == 1 and not samples_of(session, run)
    assert [(p.temperature, p.seed) for p in backend.instance_params] == [(0, None)]


def test_a_task_whose_every_sample_fails_has_no_valid_instances(db_url):
    class Failing(SampledAnswers):
        def generate(self, requests):
            results = super().generate(requests)
            return [Result(r.prompt, 1, (Completion("Output:", "stop", 1),), 0.0) if q.prompt.endswith("Example 1\n") else r
                    for q, r in zip(requests, results)]  # fmt: skip

    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=1, instance_samples=2, max_stalled_batches=1)
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, Failing([listing(NOVEL[0])]), config)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated")).one()
        assert (task.status, task.reason) == ("rejected", "no_valid_instances")
        assert [(r.chosen, r.score, r.reason) for r in samples_of(session, run)[task.id]] == [(False, None, "no_valid_instances")] * 2


def test_a_killed_and_resumed_run_stores_each_sample_once(tmp_path):
    """A batch's samples are committed with the batch: the batch in flight at the kill is lost whole and redone."""
    pool = [s.instruction for s in read_seeds(SEEDS)[20:40]]
    config = si.SelfInstructConfig(num_instructions=6, request_batch_size=3, instance_samples=2)
    stores = []
    for kill in (None, 1):
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
            si.run(session, run, PromptKeyedBackend(pool), config)
            rows = session.exec(select(InstanceSample.task_id, InstanceSample.sample, InstanceSample.seed, InstanceSample.chosen)
                                .order_by(InstanceSample.id)).all()  # fmt: skip
            stores.append((run.accepted, [tuple(r) for r in rows]))
    assert stores[0] == stores[1]
    accepted, rows = stores[1]
    assert accepted == 6 and len(rows) == 2 * 6 and len({(t, s) for t, s, _, _ in rows}) == len(rows)


def test_alpaca_draws_more_answers_for_accepted_records_only(db_url):
    seeds = read_seeds(SEEDS)
    completion = continuation((NOVEL[0], "", "The Rhine, the Elbe and the Danube."), (NOVEL[1], "same", "same"),
                              (NOVEL[2], "", "Add 273.15 after converting to Celsius."))  # fmt: skip
    answers = [("The Danube, the Rhine and the Elbe.\n###\n", "stop"), ("Rivers.", "stop"),
               ("Convert to Celsius, then add 273.15.", "stop"), ("Kelvin is Celsius plus 273.15 after converting.", "stop")]  # fmt: skip
    config = alpaca.AlpacaConfig(num_instructions=2, request_batch_size=1, instance_samples=3)
    with Session(open_engine(db_url)) as session:
        run = Run(name="a", pipeline="alpaca", config=bootstrap.config_dict(config), model="scripted", backend="scripted")
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, seeds)
        session.commit()
        alpaca.run(session, run, ScriptedAlpaca([(completion, "stop"), *answers]), config)
        assert (run.accepted, run.instances) == (2, 2)
        tasks = session.exec(select(Task).where(Task.source == "generated").order_by(Task.id)).all()
        assert [t.status for t in tasks] == ["accepted", "rejected", "accepted"]  # the k = 1 decisions
        asked = session.exec(select(Generation).where(Generation.purpose == "answers").order_by(Generation.id)).all()
        instruction_prompt = session.exec(select(Generation.prompt).where(Generation.purpose == "instructions")).one()
        assert [g.prompt for g in asked] == [f"{instruction_prompt} {t.instruction}\n4. Input:\n<noinput>\n4. Output:\n"
                                             for t in (tasks[0], tasks[0], tasks[2], tasks[2])]  # fmt: skip
        assert len({g.sampling["seed"] for g in asked}) == 4 and all(g.sampling["max_tokens"] == alpaca.ANSWER_MAX_TOKENS for g in asked)
        samples = samples_of(session, run)
        assert set(samples) == {tasks[0].id, tasks[2].id}
        first = samples[tasks[0].id]
        assert [r.generation_id for r in first] == [tasks[0].generation_id, asked[0].id, asked[1].id]
        assert first[0].seed == session.get(Generation, tasks[0].generation_id).sampling["seed"]  # the record's own
        kept = session.exec(select(Instance).join(Task).where(Task.source == "generated", Instance.status == "accepted")
                            .order_by(Instance.task_id)).all()  # fmt: skip
        assert [i.output for i in kept] == ["The Rhine, the Elbe and the Danube.", "Add 273.15 after converting to Celsius."]
        stored = session.exec(select(Instance.output).where(Instance.task_id == tasks[0].id).order_by(Instance.id)).all()
        assert stored == ["The Rhine, the Elbe and the Danube.", "The Danube, the Rhine and the Elbe.", "Rivers."]


@pytest.mark.parametrize("args, message", [(["--instance-samples", "0"], "--instance-samples must be from 1 to 64"),
                                           (["--instance-pick", "longest"], "'longest' is not one of")])  # fmt: skip
def test_bad_best_of_k_options_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["self-instruct", "--seeds", str(SEEDS), "--db", f"sqlite:///{tmp_path / 'x.db'}", *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_real_best_of_2_on_the_embedded_model(db_url, hf_backend):
    """k = 2 answers per instruction on the embedded model, kept by IFD under the same model: both stored, one chosen,
    the chosen one's instances the only accepted ones."""
    # the token limits of test_self_instruct.py's real run (SMALL): a response cut by max_tokens is dropped whole
    config = si.SelfInstructConfig(num_instructions=1, request_batch_size=4, max_tokens=160, instance_max_tokens=96,
                                   instance_samples=2, instance_pick="ifd", max_stalled_batches=3)  # fmt: skip
    with Session(open_engine(db_url)) as session:
        run = new_run(session, SEED_TASKS, config)
        si.run(session, run, hf_backend, config)
        assert (run.status, run.accepted) == ("completed", 1)
        task = session.exec(select(Task).where(Task.run_id == run.id, Task.status == "accepted", Task.source == "generated")).one()
        rows = samples_of(session, run)[task.id]
        assert [r.sample for r in rows] == [0, 1] and sum(r.chosen for r in rows) == 1 and rows[0].seed != rows[1].seed
        chosen = next(r for r in rows if r.chosen)
        assert chosen.score == min(r.score for r in rows if r.score is not None) and chosen.score > 0
        kept = session.exec(select(Instance).where(Instance.task_id == task.id, Instance.status == "accepted")).all()
        assert kept and all(i.generation_id == chosen.generation_id for i in kept)
        stages = {s.stage for s in session.exec(select(bootstrap.StageTime).where(bootstrap.StageTime.run_id == run.id)).all()}
        assert {"generation", "scoring", "filtering"} <= stages
