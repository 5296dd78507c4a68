"""Seed files: both formats, JSONL and JSON arrays, unknown fields ignored, and errors that name file, line and field."""

from __future__ import annotations

import json
import re

import pytest

from datagen.errors import BadInput
from pipelines.seeds import SeedInstance, SeedTask, read_seeds
from tests.conftest import SEEDS


def test_the_shipped_seed_file_is_self_instructs_175_tasks():
    seeds = read_seeds(SEEDS)
    assert len(seeds) == 175
    assert seeds[0].id == "seed_task_0"
    assert seeds[0].instruction.startswith("Is there anything I can eat for a breakfast")
    assert all(s.instances and s.is_classification is not None for s in seeds)
    assert sum(s.is_classification for s in seeds) == 26


def test_self_instruct_jsonl_with_unknown_fields(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        json.dumps({"id": "t1", "name": "sort", "instruction": " Sort the numbers. ", "extra": [1, 2],
                    "instances": [{"input": "3 1 2", "output": "1 2 3", "note": "x"}], "is_classification": False}) + "\n"
        + json.dumps({"instruction": "Is this review positive?", "instances": [{"input": "Great!", "output": "Yes"}]}) + "\n"
    )
    assert read_seeds(path) == [
        SeedTask("t1", "Sort the numbers.", (SeedInstance("3 1 2", "1 2 3"),), False),
        SeedTask("seed_2", "Is this review positive?", (SeedInstance("Great!", "Yes"),), None),  # the pipeline decides
    ]


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
        {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour", "source": "web"},
    ]))
    seeds = read_seeds(path)
    assert [s.instruction for s in seeds] == ["Give three tips for staying healthy.", "Translate to French."]
    assert seeds[1].instances == (SeedInstance("Hello", "Bonjour"),)
    assert all(s.is_classification is None for s in seeds)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "Sort a list of numbers."}\n{"name": "x"}\n', "seeds.jsonl:2: missing field 'instruction'"),
        ('{"instruction": "   "}\n', "seeds.jsonl:1: field 'instruction' is empty"),
        ('{"instruction": 3}\n', "seeds.jsonl:1: field 'instruction' must be a string, got int"),
        ('{"instruction": "Sort it.", "instances": {"input": ""}}\n', "seeds.jsonl:1: field 'instances' must be a list"),
        ('{"instruction": "Sort it.", "instances": [{"input": "", "output": 5}]}\n', "seeds.jsonl:1: field 'output' must be a string"),
        ('{"instruction": "Sort it.", "is_classification": "no"}\n', "seeds.jsonl:1: field 'is_classification' must be true or false"),
        ('{"instruction": "ok"\n', "seeds.jsonl:1: invalid JSON"),
        ('{"instruction": "Sort it.", "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "2 1"}]}\n',
         "seeds.jsonl:1: missing field 'instances[1].output'"),
        ('{"instruction": "Sort it.", "instances": [{"input": "3 1 2", "output": null}]}\n', "seeds.jsonl:1: missing field 'instances[0].output'"),
        ('{"instruction": "Sort it.", "instances": [{"input": "3 1 2", "output": "  "}]}\n', "seeds.jsonl:1: field 'instances[0].output' is empty"),
        ('{"instruction": "Sort it.", "input": "3 1 2", "output": ""}\n', "seeds.jsonl:1: field 'output' is empty"),
        ('{"instruction": "Sort it.", "input": "3 1 2"}\n', "seeds.jsonl:1: missing field 'output'"),
        ("[]", "seeds.jsonl: no seed tasks"),
        ("", "seeds.jsonl: the file is empty"),
    ],
)
def test_bad_seed_files(tmp_path, content, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text(content)
    with pytest.raises(BadInput, match=re.escape(message)):
        read_seeds(path)
