"""The tools Toolformer annotates text with (Schick et al. 2023, section 3 and appendix A.1), all offline.

A tool is a name (as written in a call: `[Calculator(400 / 1400)]`), a parser that checks and normalizes
the text between the parentheses, and a function from that argument to a result string. Adding a tool
is adding one `Tool(...)` and its few-shot prompt (pipelines/toolformer.py, `PROMPTS`).

    Calculator   + - * / and parentheses over decimals, rounded to two places (paper, section 3)
    Calendar     "Today is Thursday, March 9, 2017." from the document's date (appendix A.1)
    WikiSearch   the top BM25 passage of a local collection (SQLite FTS5's bm25(); the paper uses BM25 over KILT's Wikipedia)
    QA           the generation backend answers, given the top WikiSearch passage as context (the paper uses Atlas)

A tool signals a call it cannot answer by raising ToolError; the pipeline stores the call with the reason.
A tool that asks the model (QA) returns its requests and results with its outcomes, so that the pipeline
stores them like every other generation.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, DivisionByZero, InvalidOperation, localcontext
from pathlib import Path
from typing import TYPE_CHECKING

from datagen.errors import BadInput

if TYPE_CHECKING:
    from datagen.backends import Backend, Request, Result


class ToolError(Exception):
    """The call cannot be executed (bad argument, division by zero, no document date, nothing found)."""


class CalculationError(ToolError):
    """A well-formed expression without a value (division by zero, too many digits)."""


@dataclass(frozen=True)
class CallContext:
    """What a call may know about the document it sits in."""

    date: date | None = None
    """The document's date (its record's `date` field, else the configured date), for Calendar."""


@dataclass(frozen=True)
class Tool:
    name: str
    """The API name as the model writes it, e.g. "Calculator"."""
    parse: Callable[[str], str]
    """Raw text between the parentheses -> the argument the function takes; raises ToolError."""
    function: Callable[[str, CallContext], str]
    """Argument -> result text; raises ToolError."""
    batch_function: Callable[[Sequence[tuple[str, CallContext]]], Executed] | None = None
    """Optional: many calls at once (QA batches its questions into one generate call)."""


@dataclass(frozen=True)
class Executed:
    outcomes: list[str | ToolError]
    """Per call, the result text or the ToolError that stopped it."""
    requests: list[Request] = field(default_factory=list)
    """The tool's own model requests (QA's prompts with their passages), to be stored with `results`."""
    results: list[Result] = field(default_factory=list)


def execute(tool: Tool, calls: Sequence[tuple[str, CallContext]]) -> Executed:
    """Run parsed calls."""
    if tool.batch_function is not None:
        return tool.batch_function(calls)
    outcomes: list[str | ToolError] = []
    for argument, context in calls:
        try:
            outcomes.append(tool.function(argument, context))
        except ToolError as err:
            outcomes.append(err)
    return Executed(outcomes)


# --- Calculator: a recursive-descent parser, never eval ---------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_NESTING = 32
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|([-+*/()]))")


def calculate(expression: str) -> str:
    """Evaluate + - * / with parentheses and unary signs over decimals, exactly (Decimal), and round the
    result to two places, half up ("Results are always rounded to two decimal places", paper section 3).
    Trailing zeros are dropped: 27 + 4 * 2 -> "35" as in the paper's Table 1; 400 / 1400 -> "0.29"."""
    value = _Parser(expression).parse()
    try:
        rounded = value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    except InvalidOperation:
        raise CalculationError("the result has more than 28 digits") from None
    text = format(rounded, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _Parser:
    """expression := term (("+" | "-") term)*;  term := factor (("*" | "/") factor)*;
    factor := ("+" | "-") factor | number | "(" expression ")"."""

    def __init__(self, expression: str):
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        self.tokens = self._lex(expression)
        self.position = 0
        self.depth = 0

    @staticmethod
    def _lex(expression: str) -> list[str]:
        tokens, index = [], 0
        stripped = expression.rstrip()
        while index < len(stripped):
            match = _TOKEN.match(stripped, index)
            if match is None:
                raise ToolError(f"unexpected {stripped[index:].lstrip()[:10]!r} in {expression!r}")
            tokens.append(match.group(1) or match.group(2))
            index = match.end()
        if not tokens:
            raise ToolError("empty expression")
        return tokens

    def parse(self) -> Decimal:
        with localcontext() as context:
            context.prec = 28
            context.traps[DivisionByZero] = True
            context.traps[InvalidOperation] = True
            value = self._expression()
        if self.position != len(self.tokens):
            raise ToolError(f"unexpected {self.tokens[self.position]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ToolError("expression ends too early")
        self.position += 1
        return token

    def _expression(self) -> Decimal:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Decimal:
        value = self._factor()
        while self._peek() in ("*", "/"):
            if self._take() == "*":
                value *= self._factor()
            else:
                divisor = self._factor()
                if divisor == 0:
                    raise CalculationError("division by zero")
                value /= divisor
        return value

    def _factor(self) -> Decimal:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ToolError(f"more than {MAX_NESTING} nested signs or parentheses")
        try:
            token = self._take()
            if token in ("+", "-"):
                value = self._factor()
                return value if token == "+" else -value
            if token == "(":
                value = self._expression()
                if self._take() != ")":
                    raise ToolError("missing ')'")
                return value
            if token in (")", "*", "/"):
                raise ToolError(f"unexpected {token!r}")
            return Decimal(token)
        finally:
            self.depth -= 1


def _parse_expression(raw: str) -> str:
    """Syntax errors surface here, as unparsable calls; division by zero only when the call runs."""
    expression = raw.strip()
    try:
        calculate(expression)
    except CalculationError:
        pass
    return expression


CALCULATOR = Tool(name="Calculator", parse=_parse_expression, function=lambda argument, _context: calculate(argument))


# --- Calendar -----------------------------------------------------------------------------------------


def today_is(day: date) -> str:
    """The paper's calendar result (appendix D): "Today is Sunday, November 20, 2020." """
    return f"Today is {day:%A}, {day:%B} {day.day}, {day.year}."


def _parse_no_argument(raw: str) -> str:
    if raw.strip():
        raise ToolError(f"Calendar takes no argument, got {raw.strip()!r}")
    return ""


def _calendar(_argument: str, context: CallContext) -> str:
    if context.date is None:
        raise ToolError("the document has no date (add a 'date' field to the record or configure one)")
    return today_is(context.date)


CALENDAR = Tool(name="Calendar", parse=_parse_no_argument, function=_calendar)


# --- WikiSearch: BM25 over a local collection ----------------------------------------------------------


def parse_query(raw: str) -> str:
    """A search term or question, with or without quotes: `"Ghana flag red meaning"` -> Ghana flag red meaning."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    elif len(text) >= 2 and text[0] in "“‘" and text[-1] in "”’":
        text = text[1:-1].strip()
    if not re.search(r"\w", text):
        raise ToolError(f"empty query {raw!r}")
    return text


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


def read_passages(folder: Path) -> list[Passage]:
    """Every passage of a search collection: each `*.txt` file split at blank lines (title: the file name),
    and each line of a `*.jsonl` file ({"text": ..., "title": optional})."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: the search corpus must be a folder of .txt or .jsonl files")
    passages = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".txt":
            title = path.stem.replace("_", " ")
            for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
                if block.strip():
                    passages.append(Passage(title, " ".join(block.split())))
        elif path.suffix == ".jsonl":
            from datagen.jsonl import read_records, require_str

            for line, record in read_records(path):
                title = record.get("title") if isinstance(record.get("title"), str) else path.stem
                passages.append(Passage(title, require_str(path, line, record, "text")))
    if not passages:
        raise BadInput(f"{folder}: no passages found (expected .txt files with blank-line separated passages, or .jsonl)")
    return passages


class SearchIndex:
    """An in-memory SQLite FTS5 index (Porter stemming) ranked by FTS5's built-in bm25() (k1 = 1.2, b = 0.75)."""

    def __init__(self, passages: Sequence[Passage]):
        self.connection = sqlite3.connect(":memory:", check_same_thread=False)
        self.connection.execute("CREATE VIRTUAL TABLE passage USING fts5(title, text, tokenize='porter unicode61')")
        self.connection.executemany("INSERT INTO passage (title, text) VALUES (?, ?)", [(p.title, p.text) for p in passages])
        self.size = len(passages)

    @classmethod
    def from_folder(cls, folder: Path) -> SearchIndex:
        return cls(read_passages(folder))

    def search(self, query: str, k: int = 1) -> list[Passage]:
        """The k best passages for the query's words, any of which may match (OR), best first."""
        match = fts5_query(query)
        if not match:
            return []
        rows = self.connection.execute(
            "SELECT title, text FROM passage WHERE passage MATCH ? ORDER BY bm25(passage) LIMIT ?", (match, k)
        ).fetchall()
        return [Passage(title, text) for title, text in rows]


def fts5_query(query: str) -> str:
    """The query's words as FTS5 strings joined by OR: each word in double quotes (FTS5's string syntax, a quote
    inside doubled), so that operators, columns and punctuation in the query stay plain text. Letters are kept as
    they are ("Zürich"), for the unicode61 tokenizer to fold."""
    words = dict.fromkeys(re.findall(r"\w+", query.lower()))
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


def wikisearch_tool(index: SearchIndex) -> Tool:
    def function(query: str, _context: CallContext) -> str:
        found = index.search(query, k=1)
        if not found:
            raise ToolError(f"no passage matches {query!r}")
        return found[0].text

    return Tool(name="WikiSearch", parse=parse_query, function=function)


# --- QA: the generation backend answers from the top passage -------------------------------------------

QA_PROMPT = "Answer the question in a few words, using the passage.\n\nPassage: {passage}\n\nQuestion: {question}\nAnswer:"


def qa_tool(index: SearchIndex, backend: Backend, max_tokens: int = 24) -> Tool:
    """Greedy answers of at most max_tokens tokens; one generate call for all questions of a batch."""
    from datagen.backends import Request, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=("\n",))

    def batch_function(calls: Sequence[tuple[str, CallContext]]) -> Executed:
        outcomes: list[str | ToolError | None] = [None] * len(calls)
        requests, slots = [], []
        for slot, (question, _context) in enumerate(calls):
            found = index.search(question, k=1)
            if not found:
                outcomes[slot] = ToolError(f"no passage matches {question!r}")
                continue
            requests.append(Request(prompt=QA_PROMPT.format(passage=found[0].text, question=question), params=params))
            slots.append(slot)
        results = backend.generate(requests) if requests else []
        for slot, result in zip(slots, results):
            answer = result.completions[0].text.strip()
            outcomes[slot] = answer if answer else ToolError("the QA model gave an empty answer")
        return Executed(outcomes, requests, results)  # type: ignore[arg-type]

    def function(question: str, context: CallContext) -> str:
        outcome = batch_function([(question, context)]).outcomes[0]
        if isinstance(outcome, ToolError):
            raise outcome
        return outcome

    return Tool(name="QA", parse=parse_query, function=function, batch_function=batch_function)


# --- The registry ----------------------------------------------------------------------------------------

TOOL_NAMES = ("calculator", "calendar", "wikisearch", "qa")
"""CLI names, in the order a run applies them."""


def search_index(names: Sequence[str], search_corpus: Path | None) -> SearchIndex | None:
    """The index WikiSearch and QA search, if one of them is named; read before a run starts, so that a missing or
    empty corpus is bad input with nothing stored."""
    if not {"wikisearch", "qa"} & set(names):
        return None
    if search_corpus is None:
        raise BadInput("the wikisearch and qa tools need --search-corpus DIR (a folder of .txt or .jsonl passages)")
    return SearchIndex.from_folder(search_corpus)


def build_tools(
    names: Sequence[str], index: SearchIndex | None = None, backend: Backend | None = None, qa_max_tokens: int = 24
) -> dict[str, Tool]:
    """The tools named (CLI names), ready to run. WikiSearch and QA need an index; QA a backend."""
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown:
        raise BadInput(f"unknown tool {unknown[0]!r}; choose from {', '.join(TOOL_NAMES)}")
    if {"wikisearch", "qa"} & set(names) and index is None:
        raise BadInput("the wikisearch and qa tools need --search-corpus DIR (a folder of .txt or .jsonl passages)")
    tools: dict[str, Tool] = {}
    for name in names:
        if name == "calculator":
            tools[name] = CALCULATOR
        elif name == "calendar":
            tools[name] = CALENDAR
        elif name == "wikisearch":
            tools[name] = wikisearch_tool(index)
        elif name == "qa":
            if backend is None:
                raise BadInput("the qa tool needs a generation backend")
            tools[name] = qa_tool(index, backend, qa_max_tokens)
    return tools
