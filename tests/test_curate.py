"""Curation (pipelines/curate.py): the --keep expression language, rules over stored scores, and export honouring it."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, func, select
from typer.testing import CliRunner

from datagen.cli import app
from datagen.errors import BadInput
from datagen.export import ExportConfig, Format, export
from pipelines.curate import CurationRule, Null, curate_run, parse_keep
from pipelines.score import ScoreConfig, score_run
from storage.store import open_engine
from storage.tables import Curation, CurationVerdict, Instance, InstanceScore
from tests.example_runs import build_run
from tests.test_score import ITEMS, add_items


def test_keep_expressions():
    keep = parse_keep("ifd < 0.9 and not degenerate")
    assert keep.names == {"ifd", "degenerate"}
    assert keep({"ifd": 0.5, "degenerate": False}) and not keep({"ifd": 0.5, "degenerate": True}) and not keep({"ifd": 0.95, "degenerate": False})
    assert parse_keep("0.2 <= ifd <= 1")({"ifd": 1.0}) and not parse_keep("0.2 <= ifd <= 1")({"ifd": 0.1})
    assert parse_keep("conditioned_loss - direct_loss < -0.5 or judge_accuracy >= 4")({"conditioned_loss": 1.0, "direct_loss": 2.0, "judge_accuracy": 1})
    assert parse_keep("truncated == false")({"truncated": False})
    with pytest.raises(Null):
        parse_keep("ifd < 1")({"ifd": None})
    for bad, message in [("__import__('os').system('x')", "Call is not allowed"), ("ifd.real < 1", "Attribute is not allowed"),
                         ("ifd < 'a'", "only numbers"), ("ifd <", "not an expression"), ("score < 1", "unknown score 'score'"),
                         ("[ifd][0] < 1", "Subscript is not allowed"), ("ifd ** 2 < 1", "Pow is not allowed")]:  # fmt: skip
        with pytest.raises(BadInput, match=message):
            parse_keep(bad)


@pytest.mark.parametrize(
    "rule, message",
    [(dict(), "give --keep"), (dict(top=0.1), "--top and --by go together"), (dict(top=1.5, by="ifd"), r"\(0, 1\]"),
     (dict(keep="ifd < 1", lowest=True), "--lowest applies to --top"), (dict(top=0.5, by="nope"), "unknown score")],
)  # fmt: skip
def test_bad_rules(rule, message):
    with pytest.raises(BadInput, match=message):
        CurationRule(**rule)


def store_scores(session: Session, run_id: int, model: str = "smollm2-135m") -> list[int]:
    """IFD rows for every accepted instance of a build_run run: ifd 0.1, 0.2, ... in instance order; the 3rd degenerate,
    the 4th null (empty output)."""
    from pipelines.score import run_pairs
    from storage.tables import Run

    ids = [p.instance_id for p in run_pairs(session, session.get(Run, run_id))]
    for k, instance_id in enumerate(ids):
        session.add(InstanceScore(run_id=run_id, instance_id=instance_id, model=model, method="ifd", method_version=1,
                                  score=None if k == 3 else 0.1 * (k + 1), degenerate=k == 2, repeated=k == 2,
                                  reason="empty output" if k == 3 else None))  # fmt: skip
    session.commit()
    return ids


def test_rules_over_stored_scores(db_url):
    with Session(open_engine(db_url)) as session:
        run = build_run(session)
        ids = store_scores(session, run.id)
        result = curate_run(session, run.name, CurationRule(keep="ifd < 0.75 and not degenerate"))
        verdicts = dict(session.exec(select(CurationVerdict.instance_id, CurationVerdict.reason)).all())
        assert set(verdicts) == set(ids)
        assert [i for i in ids if verdicts[i] is None] == [ids[k] for k in (0, 1, 4, 5, 6)]
        assert verdicts[ids[3]] == "ifd is null: empty output"
        assert verdicts[ids[2]] == "fails ifd < 0.75 and not degenerate (degenerate=True, ifd=0.3)"
        assert (result.kept, result.dropped, result.replaced) == (5, len(ids) - 5, False)
        # a rerun replaces the run's curation: one curation, one verdict per instance
        result = curate_run(session, run.name, CurationRule(keep="not degenerate", top=0.5, by="ifd", lowest=True))
        assert result.replaced and result.rule == "not degenerate; then top 0.5 by lowest ifd"
        assert session.exec(select(func.count()).select_from(Curation)).one() == 1
        assert session.exec(select(func.count()).select_from(CurationVerdict)).one() == len(ids)
        kept = session.exec(select(CurationVerdict.instance_id).where(CurationVerdict.kept)).all()
        survivors = len(ids) - 2  # the degenerate one fails the expression, the null one cannot be ranked
        assert sorted(kept) == sorted(ids[k] for k in [0, 1, 4, 5, 6, 7, 8, 9, 10, 11][: -(-survivors // 2)])
        with pytest.raises(BadInput, match="have no score .*datagen score --run si-test --model other"):
            curate_run(session, run.name, CurationRule(keep="ifd < 1", model="other"))


def test_export_drops_exactly_what_curate_dropped(hf_backend, db_url, tmp_path):
    runner = CliRunner()
    with Session(open_engine(db_url)) as session:
        run = add_items(session, ITEMS)
        score_run(session, hf_backend, run.name, ScoreConfig(model="smollm2-135m"))
    result = runner.invoke(app, ["curate", "--run", "scored", "--keep", "ifd < 1 and not degenerate", "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropped"] == 1  # "Write a story about a cat." -> "Confucious": IFD > 1
    with Session(open_engine(db_url)) as session:
        dropped = session.exec(
            select(Instance.output).join(CurationVerdict, CurationVerdict.instance_id == Instance.id).where(CurationVerdict.kept == False)  # noqa: E712
        ).all()
        assert dropped == ["Confucious"]
        curated = export(session, ExportConfig(runs=("scored",), format=Format.alpaca, out=tmp_path / "curated", test_size=0))
        everything = export(session, ExportConfig(runs=("scored",), format=Format.alpaca, out=tmp_path / "all", test_size=0, ignore_curation=True))
    outputs = {row["output"] for row in curated.dataset["train"]}
    assert outputs == {output for _, _, output in ITEMS} - set(dropped)
    assert {row["output"] for row in everything.dataset["train"]} == {output for _, _, output in ITEMS}
    assert curated.counts["curated_out"] == 1 and everything.counts["curated_out"] == 0
    card = (tmp_path / "curated" / "README.md").read_text()
    assert "rule `ifd < 1 and not degenerate`" in card and "2 kept, 1 dropped; the dropped instances are not in this export" in card
    assert "--ignore-curation" in (tmp_path / "all" / "README.md").read_text()
    assert runner.invoke(app, ["curate", "--run", "scored", "--keep", "open('x')", "--db", db_url]).exit_code == 2
