"""datagen/shards.py: shard naming and line ranges, and the shard runs an export merges (real SQLite store)."""

from __future__ import annotations

import pytest
from sqlmodel import Session

from datagen.errors import BadInput
from datagen.shards import Shard, plan_shards, runs_named
from pipelines.toolformer import CorpusText
from storage.store import open_engine
from storage.tables import Run


def test_plan_shards_names_and_ranges():
    texts = [CorpusText(line, f"text {line}") for line in range(1, 6)]
    assert plan_shards("tf", texts, 2) == [Shard("tf.shard-0000", "1:2"), Shard("tf.shard-0001", "3:4"), Shard("tf.shard-0002", "5:5")]


def _run(name: str, lines: str | None, digest: str = "d") -> Run:
    return Run(name=name, pipeline="toolformer", config={"lines": lines, "corpus_sha256": digest}, model="m", backend="b")


def test_runs_named_merges_shard_runs_in_order_and_refuses_overlaps_and_other_corpora(db_url):
    with Session(open_engine(db_url)) as session:
        session.add_all([_run("tf.shard-0010", "21:22"), _run("tf.shard-0002", "5:6"), _run("tf.shard-x", "7:8"), _run("solo", None)])
        session.commit()
        assert [r.name for r in runs_named(session, "tf")] == ["tf.shard-0002", "tf.shard-0010"]  # by number, not by name
        assert [r.name for r in runs_named(session, "solo")] == ["solo"]
        session.add(_run("tf.shard-0011", "22:30"))
        session.commit()
        with pytest.raises(BadInput, match=r"runs 'tf.shard-0010' \(21:22\) and 'tf.shard-0011' \(22:30\) overlap"):
            runs_named(session, "tf")
        session.add(_run("other.shard-0000", "1:2"))
        session.add(_run("other.shard-0001", "3:4", digest="e"))
        session.commit()
        with pytest.raises(BadInput, match="annotated different corpora"):
            runs_named(session, "other")
        with pytest.raises(BadInput, match="no run named or numbered 'missing'"):
            runs_named(session, "missing")
