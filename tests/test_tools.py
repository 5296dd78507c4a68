"""The Toolformer tools: calculator parser, calendar, BM25 search, QA on the embedded model, the registry."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from datagen.errors import BadInput
from pipelines.tools import (
    CALCULATOR,
    CALENDAR,
    CallContext,
    Passage,
    SearchIndex,
    ToolError,
    build_tools,
    calculate,
    execute,
    fts5_query,
    parse_query,
    qa_tool,
    read_passages,
    search_index,
    today_is,
    wikisearch_tool,
)

REPO = Path(__file__).resolve().parents[1]
SEARCH_CORPUS = REPO / "examples" / "search_corpus"


# --- Calculator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [
        ("400 / 1400", "0.29"),  # the paper's Figure 1
        ("27 + 4 * 2", "35"),  # the paper's Table 1
        ("18 + 12 * 3", "54"),
        ("2011 - 1994", "17"),
        ("(2 + 3) * 4", "20"),
        ("2 * (3 + 4) - 10 / (1 + 4)", "12"),
        ("10 - 4 - 3", "3"),  # left associative
        ("100 / 10 / 5", "2"),
        ("-3 - -2", "-1"),
        ("+5", "5"),
        ("1 / 3", "0.33"),
        ("2 / 3", "0.67"),
        ("2.675 * 1", "2.68"),  # half up on the exact decimal (float rounding would give 2.67)
        ("0.1 + 0.2", "0.3"),
        (".5 + 1", "1.5"),
        ("10 / 4", "2.5"),
        ("0.001", "0"),
        ("-0.001", "0"),
        ("  ((((7))))  ", "7"),
        ("1234567.891 * 1000", "1234567891"),
    ],
)
def test_calculator_evaluates(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("1 / 0", "division by zero"),
        ("5 / (2 - 2)", "division by zero"),
        ("", "empty"),
        ("   ", "empty"),
        ("2 * (3 + 4", "ends too early"),
        ("2 * 3)", "unexpected ')'"),
        ("1 2", "unexpected '2'"),
        ("2 ** 3", "unexpected '*'"),
        ("1e5", "unexpected"),
        ("1,400 / 2", "unexpected"),
        ("x + 1", "unexpected"),
        ("__import__('os').system('true')", "unexpected"),
        ("2 ^ 3", "unexpected"),
        ("-" * 40 + "1", "nested"),
        ("(" * 40 + "1" + ")" * 40, "nested"),
        ("1 + " * 100 + "1", "longer than"),
        ("9" * 30 + " * " + "9" * 10, "digits"),
    ],
)
def test_calculator_rejects(expression, reason):
    with pytest.raises(ToolError, match=re.escape(reason)):
        calculate(expression)


def test_calculator_tool_parses_and_executes():
    assert CALCULATOR.parse(" 400 / 1400 ") == "400 / 1400"
    with pytest.raises(ToolError):
        CALCULATOR.parse("four hundred")
    executed = execute(CALCULATOR, [("400 / 1400", CallContext()), ("1 / 0", CallContext())])
    outcomes = executed.outcomes
    assert outcomes[0] == "0.29" and executed.requests == executed.results == []
    assert isinstance(outcomes[1], ToolError)


# --- Calendar ---------------------------------------------------------------------------------------------


def test_calendar_says_the_documents_date():
    assert today_is(date(2017, 3, 9)) == "Today is Thursday, March 9, 2017."
    assert today_is(date(2023, 1, 30)) == "Today is Monday, January 30, 2023."  # the paper's Table 1
    assert CALENDAR.parse("") == "" and CALENDAR.parse("  ") == ""
    assert CALENDAR.function("", CallContext(date=date(2020, 11, 20))) == "Today is Friday, November 20, 2020."


def test_calendar_needs_a_date_and_no_argument():
    with pytest.raises(ToolError, match="no argument"):
        CALENDAR.parse("2020")
    with pytest.raises(ToolError, match="no date"):
        CALENDAR.function("", CallContext())


# --- WikiSearch -------------------------------------------------------------------------------------------


def test_parse_query_strips_quotes():
    assert parse_query('"Ghana flag red meaning"') == "Ghana flag red meaning"
    assert parse_query("  'Metformin first-line drug' ") == "Metformin first-line drug"
    assert parse_query("“Who founded Rome?”") == "Who founded Rome?"
    assert parse_query("Eiffel Tower height") == "Eiffel Tower height"
    with pytest.raises(ToolError):
        parse_query('""')


def test_bm25_ranks_the_relevant_passage_first():
    index = SearchIndex(
        [
            Passage("Ghana", "The flag of Ghana has red, gold and green stripes with a black star."),
            Passage("Metformin", "Metformin is the first-line medication for type 2 diabetes."),
            Passage("Paris", "Paris is the capital of France; the Eiffel Tower was completed in 1889."),
        ]
    )
    assert index.search("metformin diabetes drug")[0].title == "Metformin"
    assert index.search("When was the Eiffel Tower completed?")[0].title == "Paris"
    assert index.search("Ghana flag colors")[0].title == "Ghana"
    assert index.search("zebra quantum") == []
    # FTS5 query syntax in user text stays inert
    assert index.search('flag" OR NEAR(* AND -"')[0].title == "Ghana"


def test_search_finds_words_with_non_ascii_letters():
    """json.dumps escaped "ü" as \\u00fc, so FTS5 looked for the letters z, u, 0, 0, f, c: nothing matched."""
    index = SearchIndex(
        [
            Passage("Zürich", "Zürich is the largest city in Switzerland, on Lake Zürich."),
            Passage("Kraków", "Kraków was the capital of Poland until 1596."),
            Passage("東京", "東京 は 日本 の 首都 です"),
            Passage("Ghana", "The flag of Ghana has red, gold and green stripes with a black star."),
        ]
    )
    assert fts5_query('Zürich "largest" city') == '"zürich" OR "largest" OR "city"'
    assert index.search("Zürich")[0].title == "Zürich"
    assert index.search("Which lake is at ZÜRICH?")[0].title == "Zürich"
    assert index.search("When was Kraków the capital?")[0].title == "Kraków"
    assert index.search("首都")[0].title == "東京"


def test_search_corpus_shipped_in_examples():
    passages = read_passages(SEARCH_CORPUS)
    assert len(passages) >= 10
    tool = wikisearch_tool(SearchIndex(passages))
    result = tool.function(tool.parse('"Eiffel Tower completed"'), CallContext())
    assert "completed in 1889" in result
    with pytest.raises(ToolError, match="no passage"):
        tool.function("qwxzv", CallContext())


def test_read_passages_errors(tmp_path):
    with pytest.raises(BadInput, match="folder"):
        read_passages(tmp_path / "missing")
    with pytest.raises(BadInput, match="no passages"):
        read_passages(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"title": "T"}\n')
    with pytest.raises(BadInput, match="a.jsonl:1: missing field 'text'"):
        read_passages(tmp_path)


# --- QA and the registry ----------------------------------------------------------------------------------


def test_qa_answers_from_the_top_passage_on_the_embedded_model(hf_backend):
    index = SearchIndex([Passage("Eiffel Tower", "The Eiffel Tower is in Paris. It was completed in 1889.")])
    tool = qa_tool(index, hf_backend, max_tokens=8)
    executed = execute(tool, [("In which city is the Eiffel Tower?", CallContext()), ("zzzz", CallContext())])
    outcomes = executed.outcomes
    assert isinstance(outcomes[0], str) and outcomes[0].strip()
    assert isinstance(outcomes[1], ToolError)
    # the model call itself comes back for the store: the prompt with its passage and question, the raw answer
    (request,) = executed.requests
    (result,) = executed.results
    assert "Passage: The Eiffel Tower is in Paris." in request.prompt and "Question: In which city" in request.prompt
    assert result.completions[0].text.strip() == outcomes[0] and request.params.max_tokens == 8


def test_build_tools_passes_qa_max_tokens(hf_backend):
    index = search_index(["qa"], SEARCH_CORPUS)
    for max_tokens in (3, 40):
        tool = build_tools(["qa"], index, hf_backend, qa_max_tokens=max_tokens)["qa"]
        (request,) = execute(tool, [("When was the Eiffel Tower completed?", CallContext())]).requests
        assert request.params.max_tokens == max_tokens


def test_build_tools_checks_names_and_needs():
    tools = build_tools(["calculator", "calendar"])
    assert [t.name for t in tools.values()] == ["Calculator", "Calendar"]
    with pytest.raises(BadInput, match="unknown tool 'abacus'"):
        build_tools(["abacus"])
    with pytest.raises(BadInput, match="--search-corpus"):
        build_tools(["wikisearch"])
    with pytest.raises(BadInput, match="--search-corpus"):
        search_index(["calculator", "qa"], None)
    with pytest.raises(BadInput, match="must be a folder"):
        search_index(["wikisearch"], SEARCH_CORPUS / "missing")
    assert search_index(["calculator"], None) is None
    assert build_tools(["wikisearch"], search_index(["wikisearch"], SEARCH_CORPUS))["wikisearch"].name == "WikiSearch"


def test_calculator_parse_accepts_well_formed_calls_that_fail_to_run():
    assert CALCULATOR.parse("1 / 0") == "1 / 0"
    with pytest.raises(ToolError, match="division by zero"):
        CALCULATOR.function("1 / 0", CallContext())
