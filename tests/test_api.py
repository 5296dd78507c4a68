"""The Python API (datagen/__init__.py, datagen/runs.py): README's example on the embedded model, stopping early as a
typed result, server options reaching the openai backend, the store's listing, and the job definitions' flags."""

from __future__ import annotations

import re

import pytest

import datagen
from datagen import BadInput, SelfInstructConfig, ServerOptions, StoppedEarly, Store, make_backend, read_seeds, run_self_instruct
from tests.conftest import REPO, SEEDS

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_example() -> str:
    section = README[README.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_uses_the_exported_names():
    code = readme_example()
    compile(code, "README.md", "exec")
    imported = re.search(r"from datagen import (.*)", code).group(1).split(", ")
    assert set(imported) <= set(datagen.__all__)
    assert all(getattr(datagen, name) is not None for name in datagen.__all__)


def test_readme_calls_on_the_embedded_model(hf_backend, db_url):
    """README's calls, with the session's embedded model and a budget of one request: the run stops early, which is a
    result (status, reason, figures, rows), and StoppedEarly only when asked for."""
    store = Store(db_url)
    seeds = read_seeds(SEEDS)[:20]
    config = SelfInstructConfig(num_instructions=50, max_tokens=96, instance_max_tokens=64, request_batch_size=1, max_requests=1)
    handle = run_self_instruct(config, seeds, backend=hf_backend, store=store, name="api-demo")
    assert (handle.name, handle.pipeline, handle.status) == ("api-demo", "self-instruct", "stopped")
    assert handle.error == "--max-requests 1 reached"
    figures = handle.figures()
    assert handle.summary["accepted"] == figures.accepted and figures.accepted < 50 and figures.requests >= 1
    records = handle.records()
    dataset = handle.to_dataset()
    assert len(dataset) == len(records) and dataset.column_names == ["instruction", "input", "output", "text"]
    assert [r["instruction"] for r in records] == dataset["instruction"]
    with pytest.raises(StoppedEarly, match="stopped before the target: --max-requests 1 reached") as stopped:
        handle.raise_if_stopped()
    assert stopped.value.exit_code == 3 and stopped.value.run == "api-demo"
    # the store lists it, and the same name resumes it: the options it stops by may change, the others not
    assert [r.name for r in store.runs()] == ["api-demo"] and store.run("api-demo").id == handle.id
    with pytest.raises(BadInput, match=r"started with other options \(temperature 0.7 -> 1.0\)"):
        run_self_instruct(config.model_copy(update={"temperature": 1.0}), seeds, backend=hf_backend, store=store, name="api-demo")
    with pytest.raises(BadInput, match="no run named or numbered 'nope'"):
        store.run("nope")


def test_a_refused_resume_loads_no_model(db_url):
    """A backend given as a function is loaded only once the run is held and its checks pass."""
    store = Store(db_url)
    with store.session() as session:
        from storage.store import add_run
        from storage.tables import Run

        add_run(session, Run(name="t", pipeline="alpaca", config={}, model="smollm2-135m", backend="transformers"))

    def no_model():
        raise AssertionError("the model was loaded")

    with pytest.raises(BadInput, match="is a alpaca run, not self-instruct"):
        run_self_instruct(SelfInstructConfig(), SEEDS, backend=no_model, store=store, name="t")


def test_configs_are_typed_and_checked():
    assert SelfInstructConfig.model_fields["rouge_threshold"].description.startswith("Reject when ROUGE-L F-measure > 0.7")
    with pytest.raises(BadInput, match="--temperature must be a number >= 0, got -1.0"):
        SelfInstructConfig(temperature=-1.0)
    from pipelines.bootstrap import load_config

    with pytest.raises(BadInput, match="options: option 'max_requests' must be an integer, got 2.5"):
        load_config(SelfInstructConfig, None, {"max_requests": 2.5})


def test_server_options_reach_the_openai_backend():
    backend = make_backend("openai", "served", ["http://127.0.0.1:9/v1"], ServerOptions(timeout=7.5, concurrency=3, api_key="k-123"))
    try:
        assert backend.timeout == 7.5 and backend.pool._max_workers == 3
        assert backend.client.headers["Authorization"] == "Bearer k-123"
        assert "k-123" not in repr(ServerOptions(api_key="k-123"))
    finally:
        backend.close()
    with pytest.raises(BadInput, match="--timeout must be a number of seconds > 0, got 0"):
        ServerOptions(timeout=0)
    with pytest.raises(BadInput, match="--base-url is only for --backend openai"):
        make_backend("transformers", "smollm2-135m", ["http://127.0.0.1:9/v1"])


@pytest.mark.parametrize("pipeline", ["self-instruct", "alpaca", "toolformer", "e2e"])
def test_job_definitions_know_every_option_of_the_pipeline_command(pipeline):
    """datagen/jobs/definition.py reads a job's options without the CLI (FLAGS); they must be the command's own."""
    from typer.main import get_command

    from datagen.cli import app
    from datagen.jobs.definition import FLAGS

    command = get_command(app).commands[pipeline]
    options = {(opt, param.name) for param in command.params for opt in [*param.opts, *param.secondary_opts] if opt.startswith("-")}
    options -= {("--help", "help")}
    known = {(opt, name if name not in ("run_name",) else "run_name") for opt, name in FLAGS[pipeline].items()}
    assert known == options
