"""Toolformer data generation (Schick et al. 2023, "Toolformer: Language Models Can Teach Themselves to Use
Tools", arXiv:2302.04761, section 2 and appendix A): a model annotates plain text with API calls, and only
the calls whose results make the following tokens easier to predict are kept.

    datagen toolformer --corpus examples/toolformer_corpus.jsonl --tools calculator,calendar --run tf-demo

For each tool and each text x = x_1..x_n (section 2):
  1. Positions: p_i = p_M(<API> | P(x), x_1..x_{i-1}) for every i, in one forward pass per text; keep the
     top k positions with p_i > tau_s.
  2. Calls: at each position, sample up to m calls from [P(x), x_1..x_{i-1}, <API>] ending at </API>;
     calls that do not end at </API> (footnote 2) or do not parse are stored with the reason and go no further.
  3. Executing: run each call, giving its result r_i.
  4. Filtering: L_i(z) = sum_{j >= i} w_{j-i} * -log p_M(x_j | z, x_1..x_{j-1}) with z given as a prefix;
     L+ = L_i(e(c, r)), L- = min(L_i(empty), L_i(e(c, empty))); keep the call if L- - L+ >= tau_f.
  5. Output: the text with its kept calls inserted, "400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed".

Choices the paper leaves open, made here:
  - <API>, </API> and the arrow are " [", "]" and "->" (the paper's footnote 1), configurable. A call goes
    before a word: position i is the first token of a whitespace-separated word, the place where " [" (which
    carries the space) continues the text as in the prompts' examples. The first word is never a position:
    L_1(empty) would have no context.
  - The text is tokenized once, and each word is mapped to the token where it starts by the tokenizer's
    character offsets, so tokenizers that prepend "▁" to every string (SentencePiece: Llama 2, Mistral) see the
    text as in the prompts; where a word starts inside a token, or a backend has no local tokenizer (openai
    without `tokenizer`), the words' own tokens are concatenated (the same for byte-level BPE such as SmolLM2's).
  - The prefix z and the text are joined by a newline: tokens(z + "\\n") + tokens(x); L_i(empty) scores x alone.
  - w_t = 0 from t = 5 on, so a scored sequence ends at x_{i+4}; calls of a batch of texts that share a
    prefix z share one sequence, and all sequences of a batch go to the backend in one `score` call.
  - Two kept calls at one position (two tools, or two calls of one tool): the larger L- - L+ is inserted.
  - A call ends at </API> only if the backend says that stop string ended it (`Completion.stop_reason`); one
    the model ended with its end-of-sequence token, or max_call_tokens cut, is "unclosed" (footnote 2).
  - p_i of every word, on every backend: vllm and openai read the top PROBE_TOP_K log-probabilities of each
    position in that pass; where <API> is not among them and a tool's tau_s < 1/PROBE_TOP_K (the calculator's
    0) could still let that position through, its p_i is scored exactly (one sequence P(x) x_1..x_{i-1} <API>
    each), so the positions are those of the transformers backend, which is exact everywhere.
  - Tool results are cleaned before they are inserted: whitespace (newlines) becomes one space, the three
    markers are removed, and the result is cut at a word to max_result_chars; calls containing a marker are
    unparsed. So the annotation is unambiguous: the exported text parses back into the same calls
    (`parse_annotated`).
  - A text whose prompts would not fit the model's context is split at words into chunks that do (the paper
    annotates CCNet documents, section 4.1, with a model of 2048 tokens and does not say how it cuts them);
    each chunk is annotated on its own (its first word is not a position) and the text is stored whole, with
    its calls at their offsets in the whole text. The run's config records the chunk size (`chunk_tokens`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import func
from sqlmodel import Session, select

from datagen import sigterm
from datagen.backends import MAX_N, MAX_SEED, PROBE_TOP_K, Backend, Completion, Request, SamplingParams
from datagen.cost import StageClock
from datagen.errors import BadInput, DatagenError
from datagen.jsonl import read_config_file, read_records, require_str
from pipelines.tools import TOOL_NAMES, CallContext, Executed, Tool, ToolError, execute
from storage.store import add_generations, touch
from storage.tables import ApiCall, Generation, Run, ToolformerText

# --- Configuration -----------------------------------------------------------------------------------------


class ToolSettings(BaseModel):
    """Sampling and filtering thresholds of one tool (appendix A)."""

    model_config = ConfigDict(extra="forbid")
    tau_s: float = Field(0.05, ge=0, lt=1)
    """Sampling threshold: only positions with p_i > tau_s (appendix A: 0.05; calculator 0.0)."""
    k: int = Field(5, ge=1)
    """Most positions per text, the k most likely (appendix A: 5; calculator 20)."""
    m: int = Field(5, ge=1)
    """Calls sampled per position (appendix A: 5; calculator 10)."""
    tau_f: float = 1.0
    """Filtering threshold: keep a call if L- - L+ >= tau_f (appendix A: 1.0; calculator 0.5)."""


PAPER_SETTINGS: dict[str, ToolSettings] = {
    # "we set tau_s = 0.0, k = 20 and m = 10 for these tools ... we additionally set tau_f = 0.5" (appendix A,
    # for the calculator and machine translation, which the heuristic pre-filters leave few texts for)
    "calculator": ToolSettings(tau_s=0.0, k=20, m=10, tau_f=0.5),
    "calendar": ToolSettings(),
    "wikisearch": ToolSettings(),
    "qa": ToolSettings(),
}

TABLE2_THRESHOLDS = (0.5, 1.0, 2.0)
"""The tau_f columns of the paper's Table 2 (examples with API calls per threshold)."""


class ToolformerConfig(BaseModel):
    """Every knob of a run. Defaults are the paper's; `settings` overrides merge into each tool's defaults."""

    model_config = ConfigDict(extra="forbid")
    tools: list[str] = Field(default_factory=lambda: ["calculator", "calendar"])
    """Tools to annotate with, applied in this order: calculator, calendar, wikisearch, qa."""
    settings: dict[str, ToolSettings] = Field(default_factory=lambda: dict(PAPER_SETTINGS))
    """Per-tool tau_s, k, m, tau_f; e.g. {"calculator": {"k": 5}} keeps the calculator's other paper values."""
    api_start: str = "["
    """<API>: the paper uses " [" (footnote 1); the space before it is added here. Must be one token with its space."""
    api_end: str = "]"
    """</API>: sampling a call stops here (footnote 1)."""
    result_arrow: str = "->"
    """The arrow between a call and its result (footnote 1)."""
    weight_decay: float = Field(0.2, gt=0, le=1)
    """w~_t = max(0, 1 - weight_decay * t), normalized to sum 1 (section 4.1): the 5 tokens from i on count."""
    temperature: float = Field(1.0, ge=0)
    """Sampling calls: the paper samples; 1.0 is plain sampling from the model."""
    top_p: float = Field(1.0, gt=0, le=1)
    max_call_tokens: int = Field(32, ge=1)
    """A call not closed within this many tokens is dropped as unclosed (footnote 2)."""
    max_result_chars: int = Field(400, ge=1)
    """Longest result inserted, cut at a word (our choice: the paper shows short results and names no limit;
    a whole passage would make every scored sequence long). The example corpus's passages fit."""
    max_context_tokens: int | None = Field(None, ge=64)
    """The model's context; None: the backend's (`max_model_len`: the transformers model's
    max_position_embeddings, vLLM's max_model_len). Texts are chunked to fit it; give it for the openai backend."""
    min_numbers: int = Field(3, ge=0)
    """Calculator pre-filter: only texts with at least this many numbers (section 4.1, appendix A.1)."""
    date: dt.date | None = None
    """The Calendar's date for texts whose record has no `date` field; None: such texts skip the calendar
    (appendix A.1 keeps only documents whose date can be extracted)."""
    search_corpus: Path | None = None
    """Folder of passages for WikiSearch and QA (.txt split at blank lines, or .jsonl with "text")."""
    qa_max_tokens: int = Field(24, ge=1)
    """Longest QA answer."""
    batch_size: int = Field(8, ge=1)
    """Texts per batch: one pass per text for positions, one generate call per tool, one score call for the
    filter; each batch is committed in one transaction."""
    seed: int | None = 0
    """Run seed of the call sampling: the m calls at each position get their own seed from it and the batch, tool,
    text and word (`call_seed`); None: unseeded."""

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, tools: list[str]) -> list[str]:
        if not tools:
            raise ValueError("choose at least one tool")
        for name in tools:
            if name not in TOOL_NAMES:
                raise ValueError(f"unknown tool {name!r}; choose from {', '.join(TOOL_NAMES)}")
        if len(set(tools)) != len(tools):
            raise ValueError("a tool is named twice")
        return tools

    @model_validator(mode="before")
    @classmethod
    def _merge_settings(cls, data):
        """A partial `settings` entry overrides only the fields it names; the paper's values fill the rest."""
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            merged = {name: s.model_dump() for name, s in PAPER_SETTINGS.items()}
            for name, values in data["settings"].items():
                if name not in PAPER_SETTINGS:
                    raise ValueError(f"settings for unknown tool {name!r}; choose from {', '.join(TOOL_NAMES)}")
                merged[name] |= values.model_dump() if isinstance(values, ToolSettings) else dict(values)
            data = {**data, "settings": merged}
        return data

    @model_validator(mode="after")
    def _markers(self) -> ToolformerConfig:
        for name in ("api_start", "api_end", "result_arrow"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be blank")
        return self


def load_config(path: Path | None, overrides: dict[str, Any]) -> ToolformerConfig:
    """The YAML file's options, then `overrides` (the command's flags); an error names the file and the field."""
    values = read_config_file(path) if path is not None else {}
    try:
        return ToolformerConfig.model_validate(values | overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise BadInput(f"{path or 'options'}: {where}: {first['msg']}") from None


def config_values(params: dict[str, Any]) -> dict[str, Any]:
    """`datagen toolformer`'s flags (or a job's parsed options) as config values: --tools is comma-separated; flags
    not given are left out, so the YAML file's value stands."""
    tools = params.get("tools")
    flags = {"tools": tools.split(",") if tools else None, "search_corpus": params.get("search_corpus"), "date": params.get("date"),
             "batch_size": params.get("batch_size"), "seed": params.get("seed")}  # fmt: skip
    return {k: v for k, v in flags.items() if v is not None}


# --- The corpus ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusText:
    line: int
    text: str
    date: dt.date | None = None
    source_id: str | None = None


def read_corpus(path: Path) -> list[CorpusText]:
    """One {"text": ..., "date": "YYYY-MM-DD" (optional), "id": ... (optional)} per line; all lines checked first."""
    texts = []
    for line, record in read_records(path):
        text = require_str(path, line, record, "text")
        day = None
        if record.get("date") is not None:
            raw = require_str(path, line, record, "date")
            try:
                day = dt.date.fromisoformat(raw[:10])
            except ValueError:
                raise BadInput(f"{path}:{line}: field 'date' must be an ISO date like 2023-03-09, got {raw!r}") from None
        source_id = record.get("id")
        texts.append(CorpusText(line, text, day, None if source_id is None else str(source_id)))
    return texts


def select_lines(texts: Sequence[CorpusText], lines: str | None) -> list[CorpusText]:
    """The texts on corpus lines FIRST:LAST (1-based, both included, as error messages number lines); None: all.
    A shard of a sharded job is one such range (datagen/shards.py)."""
    if lines is None:
        return list(texts)
    first, colon, last = lines.partition(":")
    if not (colon and first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
        raise BadInput(f"--lines: '{lines}' is not FIRST:LAST, corpus line numbers from 1 with FIRST <= LAST (e.g. 1001:2000)")
    chosen = [t for t in texts if int(first) <= t.line <= int(last)]
    if not chosen:
        raise BadInput(f"--lines {lines}: the corpus has no text there (its texts are on lines 1 to {texts[-1].line})")
    return chosen


def corpus_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def passes_prefilter(tool: str, text: CorpusText, config: ToolformerConfig) -> bool:
    """The paper's cheap heuristics (section 4.1, appendix A.1): the calculator only sees texts with at least
    three numbers, the calendar only texts with a known date. (The paper also keeps only 1% of the texts that
    pass the calculator's weakest criterion alone; with small corpora every such text is kept here.)"""
    if tool == "calculator":
        return len(re.findall(r"\d+(?:[.,]\d+)*", text.text)) >= config.min_numbers
    if tool == "calendar":
        return document_date(text, config) is not None
    return True


def document_date(text: CorpusText, config: ToolformerConfig) -> dt.date | None:
    return text.date or config.date


# --- Prompts P(x), in the style of the paper's appendix A.2, with our own examples ---------------------------

PROMPTS = {
    "calculator": """Your task is to add calls to a Calculator API to a piece of text. A call should compute a number that the text is about to state. You can call the API by writing "{start}Calculator(expression){end}" where "expression" uses only numbers, + - * / and parentheses. Here are some examples of API calls:
Input: The farm keeps 14 cows and 9 goats, 23 animals in all.
Output: The farm keeps 14 cows and 9 goats, {start}Calculator(14 + 9){end} 23 animals in all.
Input: Tickets cost 12 dollars each, so the five of us paid 60 dollars.
Output: Tickets cost 12 dollars each, so the five of us paid {start}Calculator(12 * 5){end} 60 dollars.
Input: The team won 18 of its 24 games, a win rate of 75%.
Output: The team won 18 of its 24 games, a win rate of {start}Calculator(18 / 24){end} 75%.
Input: She was born in 1950 and retired in 2015 at the age of 65.
Output: She was born in 1950 and retired in 2015 at the age of {start}Calculator(2015 - 1950){end} 65.
Input: {x}
Output:""",
    "calendar": """Your task is to add calls to a Calendar API to a piece of text. The API calls should help you get information required to complete the text. You can call the API by writing "{start}Calendar(){end}". Here are some examples of API calls:
Input: Today is the first Monday of the month.
Output: Today is the first {start}Calendar(){end} Monday of the month.
Input: It is winter now, and the lake has frozen over.
Output: It is {start}Calendar(){end} winter now, and the lake has frozen over.
Input: We are three days away from the end of the year.
Output: We are {start}Calendar(){end} three days away from the end of the year.
Input: The shop never opens on Sundays, so it is closed today.
Output: The shop never opens on Sundays, so it is {start}Calendar(){end} closed today.
Input: {x}
Output:""",
    "wikisearch": """Your task is to complete a given piece of text. You can use a Wikipedia Search API to look up information. You can do so by writing "{start}WikiSearch(term){end}" where "term" is the search term you want to look up. Here are some examples of API calls:
Input: The Danube flows through ten countries before it reaches the Black Sea.
Output: The Danube flows through {start}WikiSearch("Danube countries"){end} ten countries before it reaches the Black Sea.
Input: Penicillin was discovered by Alexander Fleming in 1928.
Output: Penicillin was discovered by {start}WikiSearch("penicillin discovery"){end} Alexander Fleming in 1928.
Input: The cheetah is the fastest land animal and can run at about 100 kilometres per hour.
Output: The cheetah is the fastest land animal and can run at about {start}WikiSearch("cheetah top speed"){end} 100 kilometres per hour.
Input: {x}
Output:""",
    "qa": """Your task is to add calls to a Question Answering API to a piece of text. The questions should help you get information required to complete the text. You can call the API by writing "{start}QA(question){end}" where "question" is the question you want to ask. Here are some examples of API calls:
Input: The capital of Australia is Canberra, not Sydney.
Output: The capital of Australia is {start}QA("What is the capital of Australia?"){end} Canberra, not Sydney.
Input: The Statue of Liberty was a gift to the United States from France.
Output: The Statue of Liberty was a gift to the United States from {start}QA("Which country gave the Statue of Liberty to the United States?"){end} France.
Input: {x}
Output:""",
}


def build_prompt(tool: str, text: str, config: ToolformerConfig) -> str:
    """P(x): the tool's instructions and examples, then "Input: x" and "Output:" for the model to copy x into."""
    return PROMPTS[tool].format(start=config.api_start, end=config.api_end, x=text)


# --- Tokens and positions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTokens:
    ids: tuple[int, ...]
    """The text's tokens (no BOS)."""
    word_starts: tuple[int, ...]
    """Index in `ids` of each word's first token."""
    word_offsets: tuple[int, ...]
    """Character offset of each word (its leading whitespace included) in the text."""


def split_words(text: str) -> list[tuple[int, str]]:
    """(offset, word with its leading whitespace): "Out of 1400" -> (0, "Out"), (3, " of"), (6, " 1400")."""
    return [(m.start(), m.group()) for m in re.finditer(r"\s*\S+", text)]


Encode = Callable[[str], list[tuple[int, int, int]]]
"""A text's tokens with their characters, (id, start, end), no special tokens: a fast Hugging Face tokenizer's
offset mapping (`offsets_encoder`)."""

ANCHOR = "."
"""Tokenized before a text that continues a line (lead " ") and then dropped with its tokens: tokenizers that prepend
"▁" to every string (SentencePiece: Llama 2, Mistral) would otherwise give the lead its own "▁" token, which the
same text inside the prompt does not have."""


def offsets_encoder(backend: Backend) -> Encode | None:
    """The backend's tokenizer with offsets, or None where it has no fast local one (openai without `tokenizer`)."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return None

    def encode(text: str) -> list[tuple[int, int, int]]:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(i, start, end) for i, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])]

    return encode


def tokenize_words(tokenize: Callable[[str], list[int]], text: str, lead: str = "", encode: Encode | None = None) -> TextTokens:
    """Tokens of `lead + text` (special tokens such as BOS left out), and where each word's tokens start.

    With `encode`, the text is tokenized once and each word starts at the first token that ends after the word's
    offset, so tokenizers that prepend "▁" to every string tokenize it as they would the whole text (Llama 2,
    Mistral); a word that starts inside a token has no start of its own, and then the words are tokenized one by
    one. Without `encode` (or then), tokens are concatenated word by word: the same for byte-level BPE (SmolLM2)."""
    words = split_words(text)
    if encode is not None:
        prefix = ANCHOR + lead if lead else ""
        tokens = [(i, start - len(prefix), end - len(prefix)) for i, start, end in encode(prefix + text)
                  if not prefix or end > len(ANCHOR)]  # fmt: skip
        starts = [0] if words else []
        for offset, _ in words[1:]:
            first = next((t for t, (_, _, end) in enumerate(tokens) if end > offset), None)
            if first is None or first <= starts[-1] or tokens[first][1] < offset:
                break
            starts.append(first)
        else:
            return TextTokens(tuple(i for i, _, _ in tokens), tuple(starts), tuple(offset for offset, _ in words))
    special = tokenize("")
    ids: list[int] = []
    starts, offsets = [], []
    for index, (offset, word) in enumerate(words):
        piece = tokenize(lead + word if index == 0 else word)
        if special and piece[: len(special)] == special:
            piece = piece[len(special) :]
        starts.append(len(ids))
        offsets.append(offset)
        ids += piece
    return TextTokens(tuple(ids), tuple(starts), tuple(offsets))


def api_token_id(tokenize: Callable[[str], list[int]], config: ToolformerConfig) -> int:
    """The single token of " " + api_start whose probability is p_i (" [" in the paper's footnote 1), as it is
    tokenized after a word: after ANCHOR, so a tokenizer that prepends "▁" to every string adds it to the anchor."""
    anchor = tokenize(ANCHOR)
    ids = tokenize(ANCHOR + " " + config.api_start)
    ids = ids[len(anchor) :] if ids[: len(anchor)] == anchor else ids
    if len(ids) != 1:
        raise BadInput(
            f"the API start marker {' ' + config.api_start!r} is {len(ids)} tokens for this model's tokenizer; "
            "p_i needs one token: use '[' (the paper's choice) or a marker that is one token with its leading space"
        )
    return ids[0]


def select_positions(p_by_word: Sequence[float | None], tau_s: float, k: int) -> list[int]:
    """Words whose p_i > tau_s, the k most likely, in text order. Word 0 is never a position; None (a top-K
    backend did not see the token there, so p_i < 1/K) never passes."""
    eligible = [(p, w) for w, p in enumerate(p_by_word) if w > 0 and p is not None and p > tau_s]
    top = sorted(eligible, key=lambda pw: (-pw[0], pw[1]))[:k]
    return sorted(w for _, w in top)


# --- Calls --------------------------------------------------------------------------------------------------


class Unusable(Exception):
    """A sampled call that goes no further: status (unclosed, unparsed) and reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


_CALL = re.compile(r"\s*(\w+)\((.*)\)\s*")


def parse_call(completion: Completion, tool: Tool, config: ToolformerConfig) -> tuple[str, str]:
    """The sampled text after <API> -> (call as written, parsed argument); raises Unusable. Only a completion
    that </API> ended counts: "we discard all examples where M does not generate the </API> token" (footnote 2)."""
    if completion.finish_reason == "length":
        raise Unusable("unclosed", "no </API> before max_call_tokens (the paper discards these, footnote 2)")
    if completion.stop_reason != config.api_end:
        raise Unusable("unclosed", "the model ended the text without </API> (the paper discards these, footnote 2)")
    match = _CALL.fullmatch(completion.text)
    if match is None:
        raise Unusable("unparsed", "not of the form Name(argument) on one line")
    name, inner = match.groups()
    if name != tool.name:
        raise Unusable("unparsed", f"calls {name}, not {tool.name}")
    marker = next((m for m in markers(config) if m in inner), None)
    if marker is not None:
        raise Unusable("unparsed", f"the argument contains {marker!r}, a marker of the annotation format")
    try:
        argument = tool.parse(inner)
    except ToolError as err:
        raise Unusable("unparsed", str(err)) from None
    return f"{name}({inner.strip()})", argument


def markers(config: ToolformerConfig) -> tuple[str, str, str]:
    return config.api_start, config.api_end, config.result_arrow


def clean_result(result: str, config: ToolformerConfig) -> str:
    """A tool's result as it goes into e(c, r): markers removed, whitespace runs (newlines too) one space, at most
    max_result_chars, cut at a word. Raises ToolError if nothing is left."""
    for marker in markers(config):
        result = result.replace(marker, " ")
    result = " ".join(result.split())
    if len(result) > config.max_result_chars:
        cut = result[: config.max_result_chars + 1]
        result = cut[: cut.rindex(" ")] if " " in cut else cut[: config.max_result_chars]
    if not result:
        raise ToolError("the result is empty once cleaned")
    return result


def linearize(call: str, result: str | None, config: ToolformerConfig) -> str:
    """e(c, r) = <API> c -> r </API>; with result "" this is e(c, empty): "[Calculator(400 / 1400) ->]"."""
    if result:
        return f"{config.api_start}{call} {config.result_arrow} {result}{config.api_end}"
    return f"{config.api_start}{call} {config.result_arrow}{config.api_end}"


# --- The loss ------------------------------------------------------------------------------------------------


def loss_weights(decay: float = 0.2) -> tuple[float, ...]:
    """w_t = w~_t / sum_s w~_s with w~_t = max(0, 1 - decay * t) (section 4.1); the nonzero ones.
    decay 0.2: (1, .8, .6, .4, .2) / 3."""
    raw = []
    while (w := 1 - decay * len(raw)) > 1e-9:
        raw.append(w)
    total = sum(raw)
    return tuple(w / total for w in raw)


def weighted_loss(logprobs: Sequence[float | None], start: int, weights: Sequence[float]) -> float:
    """L_i(z) = sum_t w_t * -log p(x_{i+t} | z, x_1..x_{i+t-1}) over the tokens that exist; `start` indexes
    x_i in the scored sequence (so the prefix z is accounted for by the caller)."""
    total = 0.0
    for t, weight in enumerate(weights):
        if start + t >= len(logprobs):
            break
        value = logprobs[start + t]
        if value is None:
            raise DatagenError(f"no log-probability for token {start + t}: a scored token needs a token before it")
        total -= weight * value
    return total


def keep(loss_plus: float, loss_minus: float, tau_f: float) -> bool:
    """The paper's filter: the call and its result lower the loss by at least tau_f."""
    return loss_minus - loss_plus >= tau_f


def annotate(text: str, insertions: Sequence[tuple[int, str]]) -> str:
    """Insert " " + e(c, r) before each word's leading whitespace at the given offsets."""
    for offset, linearized in sorted(insertions, reverse=True):
        text = f"{text[:offset]} {linearized}{text[offset:]}"
    return text


def parse_annotated(annotated: str, config: ToolformerConfig) -> tuple[str, list[tuple[int, str, str]]]:
    """The inverse of `annotate` with e(c, r) of the known tools: (text, [(offset, call, result)]). Unambiguous
    because neither arguments nor results contain a marker: a call runs to the first " -> " after it, its result
    to the first </API>."""
    start, end, arrow = (re.escape(m) for m in markers(config))
    pattern = re.compile(rf" {start}(\w+\((?:(?!{arrow}).)*?\)) {arrow} ((?:(?!{end}).)+?){end}")
    pieces, calls, position = [], [], 0
    for match in pattern.finditer(annotated):
        pieces.append(annotated[position : match.start()])
        calls.append((sum(len(p) for p in pieces), match.group(1), match.group(2)))
        position = match.end()
    pieces.append(annotated[position:])
    return "".join(pieces), calls


# --- Chunks: texts longer than the model's context --------------------------------------------------------------


def chunk_budget(tokenize: Callable[[str], list[int]], tools: Sequence[str], context: int | None, config: ToolformerConfig) -> int | None:
    """Most tokens of text per chunk, or None (no limit known): step 1 reads P(x) + x, which holds x twice, and
    step 2 adds up to max_call_tokens to P(x) + x_1..x_{i-1} + <API>; 16 tokens of slack for tokenizer joins."""
    if context is None:
        return None
    overhead = max(len(tokenize(build_prompt(tool, "", config))) for tool in tools)
    budget = (context - overhead - config.max_call_tokens - 16) // 2
    if budget < 8:  # a word before the call and the 5 tokens the loss reads after it, at least
        raise BadInput(f"a context of {context} tokens leaves no room for text after the {overhead}-token prompts")
    return budget


def split_chunks(tokens: TextTokens, budget: int | None) -> list[tuple[int, int]]:
    """Words [first, end) of each chunk: as many whole words as fit in `budget` tokens (a longer word alone)."""
    starts = [*tokens.word_starts, len(tokens.ids)]
    words = len(tokens.word_starts)
    if budget is None or len(tokens.ids) <= budget:
        return [(0, words)] if words else []
    chunks, first = [], 0
    for word in range(1, words + 1):
        if starts[word] - starts[first] > budget and word - 1 > first:
            chunks.append((first, word - 1))
            first = word - 1
    chunks.append((first, words))
    return chunks


# --- One batch of texts through steps 1-5 ---------------------------------------------------------------------


@dataclass
class Candidate:
    """One sampled call and everything decided about it; becomes an ApiCall row."""

    text: int
    """Index of the piece (a text or a chunk of one) in its batch."""
    tool: str
    word: int
    p_api: float | None
    completion: str
    generation: Generation | None = None
    status: str = "sampled"
    reason: str | None = None
    call: str | None = None
    argument: str | None = None
    result: str | None = None
    loss_empty: float | None = None
    loss_call: float | None = None
    loss_plus: float | None = None
    loss_minus: float | None = None
    kept: bool = False
    inserted: bool = False


@dataclass(frozen=True)
class Piece:
    """Where a piece of a batch comes from: its corpus text (index in Batch.sources), its first character there,
    and its first word's index in that text's words."""

    source: int
    start: int
    first_word: int


@dataclass
class Batch:
    sources: list[CorpusText]
    """The corpus texts of the batch; each becomes one ToolformerText row."""
    source_tokens: list[TextTokens]
    texts: list[CorpusText]
    """The pieces the model sees: each source whole, or its chunks."""
    tokens: list[TextTokens]
    pieces: list[Piece]
    tools: list[list[str]] = field(default_factory=list)
    """Per piece: the tools whose pre-filter it passed."""
    candidates: list[Candidate] = field(default_factory=list)


def make_batch(tokenize: Callable[[str], list[int]], texts: Sequence[CorpusText], tools: Sequence[str], budget: int | None,
               config: ToolformerConfig, encode: Encode | None = None) -> Batch:  # fmt: skip
    """Tokenize, split what does not fit into chunks, and apply the pre-filters (to each piece the model sees)."""
    source_tokens = [tokenize_words(tokenize, t.text, encode=encode) for t in texts]
    pieces, piece_texts = [], []
    for j, (text, tokens) in enumerate(zip(texts, source_tokens)):
        for first, end in split_chunks(tokens, budget):
            offset = tokens.word_offsets[first]
            stop = tokens.word_offsets[end] if end < len(tokens.word_offsets) else len(text.text)
            raw = text.text[offset:stop]
            piece = raw.lstrip()
            pieces.append(Piece(j, offset + len(raw) - len(piece), first))
            piece_texts.append(CorpusText(text.line, piece, text.date, text.source_id))
    batch = Batch(list(texts), source_tokens, piece_texts, [tokenize_words(tokenize, t.text, encode=encode) for t in piece_texts], pieces)
    batch.tools = [[name for name in tools if passes_prefilter(name, t, config)] for t in piece_texts]
    return batch


def sample_positions(backend: Backend, tool: str, texts: Sequence[CorpusText], api_token: int, config: ToolformerConfig) -> list[list[tuple[int, float | None]]]:
    """Step 1: per text, (word, p_i) of the selected positions; one forward pass per text over P(x) + " " + x.

    A top-K backend (vllm, openai) gives None where <API> is not among a position's PROBE_TOP_K most likely
    tokens, so p_i < 1/K there. That decides "p_i > tau_s" when tau_s >= 1/K, and the top k when k positions are
    seen with p_i > 1/K; otherwise each unseen word's p_i is scored exactly, as the log-probability of <API>
    at the end of the sequence P(x) x_1..x_{i-1} <API>, all in one `score` call."""
    settings = config.settings[tool]
    sequences, starts = [], []
    for text in texts:
        prompt_ids = backend.tokenize(build_prompt(tool, text.text, config))
        tokens = tokenize_words(backend.tokenize, text.text, lead=" ", encode=offsets_encoder(backend))
        sequences.append(prompt_ids + list(tokens.ids))
        starts.append([len(prompt_ids) + s for s in tokens.word_starts])
    logprobs = backend.next_token_logprobs(sequences, api_token)
    p_by_word = [[None if values[s] is None else math.exp(values[s]) for s in word_starts] for values, word_starts in zip(logprobs, starts)]
    unseen = [(j, w) for j, p in enumerate(p_by_word) if needs_exact(p, settings)
              for w in range(1, len(p)) if p[w] is None]  # fmt: skip
    if unseen:
        exact = backend.score([sequences[j][: starts[j][w]] + [api_token] for j, w in unseen])
        for (j, w), scored in zip(unseen, exact):
            p_by_word[j][w] = math.exp(scored.logprobs[-1])
    return [[(w, p[w]) for w in select_positions(p, settings.tau_s, settings.k)] for p in p_by_word]


def needs_exact(p_by_word: Sequence[float | None], settings: ToolSettings) -> bool:
    """Whether a word whose p_i a top-K backend did not see (None: p_i < 1/K) could be selected."""
    if settings.tau_s >= 1 / PROBE_TOP_K or all(p is not None for p in p_by_word[1:]):
        return False
    return sum(1 for p in p_by_word[1:] if p is not None and p > 1 / PROBE_TOP_K) < settings.k


def sample_calls(
    session: Session, run: Run, backend: Backend, tool_name: str, tool: Tool, batch: Batch, text_indices: Sequence[int],
    positions: Sequence[Sequence[tuple[int, float | None]]], batch_number: int, config: ToolformerConfig,
) -> list[Candidate]:  # fmt: skip
    """Step 2: m samples at every position, in one generate call; each completion becomes a Candidate,
    parsed or marked unclosed/unparsed, and repeated calls at one position are marked duplicate."""
    settings = config.settings[tool_name]
    requests, where = [], []
    for j, selected in zip(text_indices, positions):
        text = batch.texts[j].text
        for word, p in selected:
            offset = batch.tokens[j].word_offsets[word]
            prefix = build_prompt(tool_name, text, config) + " " + text[:offset] + " " + config.api_start
            seed = None if config.seed is None else call_seed(config.seed, batch_number, tool_name, j, word)
            params = SamplingParams(
                temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_call_tokens,
                stop=(config.api_end,), n=settings.m, seed=seed,
            )  # fmt: skip
            requests.append(Request(prompt=prefix, params=params))
            where.append((j, word, p))
    if not requests:
        return []
    results = backend.generate(requests)
    rows = add_generations(session, run, backend, f"api_calls:{tool_name}", batch_number, requests, results)
    candidates = []
    for (j, word, p), result, generations in zip(where, results, rows):
        seen = set()
        for completion, generation in zip(result.completions, generations):
            candidate = Candidate(j, tool_name, word, p, completion.text, generation)
            try:
                candidate.call, candidate.argument = parse_call(completion, tool, config)
                if candidate.call in seen:
                    candidate.status, candidate.reason = "duplicate", "the same call was sampled at this position already"
                else:
                    candidate.status = "parsed"
                    seen.add(candidate.call)
            except Unusable as err:
                candidate.status, candidate.reason = err.status, err.reason
            candidates.append(candidate)
    return candidates


def call_seed(seed: int, batch: int, tool: str, text: int, word: int) -> int:
    """The sampling seed of the m calls at one position (word `word` of text `text` of batch `batch`, for `tool`): its
    own, as Self-Instruct's `request_seed` gives each request one, so no two positions draw the same random numbers.

    A hash of the five values, a multiple of MAX_N: vLLM seeds the n samples of a request seed + 0 .. seed + n - 1
    (its parallel sampling), so the blocks of two positions never overlap either."""
    digest = hashlib.sha256(f"{seed}/{batch}/{tool}/{text}/{word}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1) // MAX_N * MAX_N


def execute_calls(tool_name: str, tool: Tool, batch: Batch, candidates: Sequence[Candidate], config: ToolformerConfig) -> Executed:
    """Step 3: run every parsed call of one tool once (equal calls on equal dates share the run) and clean each
    result for insertion (`clean_result`). Returns what the tool did, with its own model calls (QA's) to store."""
    todo = [c for c in candidates if c.tool == tool_name and c.status == "parsed"]
    contexts = {c.text: CallContext(date=document_date(batch.texts[c.text], config)) for c in todo}
    unique = list(dict.fromkeys((c.argument, contexts[c.text]) for c in todo))
    executed = execute(tool, unique)
    outcomes = dict(zip(unique, executed.outcomes))
    for candidate in todo:
        outcome = outcomes[(candidate.argument, contexts[candidate.text])]
        try:
            if isinstance(outcome, ToolError):
                raise outcome
            candidate.status, candidate.result = "executed", clean_result(outcome, config)
        except ToolError as err:
            candidate.status, candidate.reason = "failed", str(err)
    return executed


def filter_calls(backend: Backend, batch: Batch, config: ToolformerConfig) -> int:
    """Step 4: L_i(empty), L_i(e(c, empty)) and L_i(e(c, r)) of every executed call of the batch, from one
    `score` call; sets the losses and the verdict. Returns the number of tokens scored."""
    weights = loss_weights(config.weight_decay)
    executed = [c for c in batch.candidates if c.status == "executed"]
    if not executed:
        return 0
    special = backend.tokenize("")
    prefix_ids: dict[str, list[int]] = {}
    ends: dict[tuple[int, str | None], int] = {}  # (text, prefix z; None for no prefix) -> tokens of x needed
    for c in executed:
        end = batch.tokens[c.text].word_starts[c.word] + len(weights)
        for z in (None, linearize(c.call, "", config), linearize(c.call, c.result, config)):
            if z is not None and z not in prefix_ids:
                prefix_ids[z] = backend.tokenize(z + "\n")
            ends[(c.text, z)] = max(ends.get((c.text, z), 0), end)
    keys = list(ends)
    sequences = [
        (special if z is None else prefix_ids[z]) + list(batch.tokens[j].ids[: ends[(j, z)]]) for j, z in keys
    ]
    scored = dict(zip(keys, backend.score(sequences)))

    def loss(j: int, z: str | None, word: int) -> float:
        offset = len(special) if z is None else len(prefix_ids[z])
        return weighted_loss(scored[(j, z)].logprobs, offset + batch.tokens[j].word_starts[word], weights)

    for c in executed:
        c.loss_empty = loss(c.text, None, c.word)
        c.loss_call = loss(c.text, linearize(c.call, "", config), c.word)
        c.loss_plus = loss(c.text, linearize(c.call, c.result, config), c.word)
        c.loss_minus = min(c.loss_empty, c.loss_call)
        c.kept = keep(c.loss_plus, c.loss_minus, config.settings[c.tool].tau_f)
        c.status = "kept" if c.kept else "rejected"
        if not c.kept:
            c.reason = f"L- - L+ = {c.loss_minus - c.loss_plus:.3f} < tau_f = {config.settings[c.tool].tau_f}"
    return sum(len(s) for s in sequences)


def annotated_texts(batch: Batch, config: ToolformerConfig) -> list[str]:
    """Step 5: each corpus text with its kept calls inserted, the best (largest L- - L+) at each position; chunks
    are annotated each and joined with the whitespace between them. Each annotation must parse back into the
    text and its calls (`parse_annotated`)."""
    best: dict[tuple[int, int], Candidate] = {}
    for c in batch.candidates:
        if c.kept:
            current = best.get((c.text, c.word))
            if current is None or c.loss_minus - c.loss_plus > current.loss_minus - current.loss_plus:
                best[(c.text, c.word)] = c
    for c in best.values():
        c.inserted = True
    pieces = [
        annotate(text.text, [(batch.tokens[j].word_offsets[c.word], linearize(c.call, c.result, config))
                             for (t, _), c in best.items() if t == j])
        for j, text in enumerate(batch.texts)
    ]  # fmt: skip
    annotated = []
    for j, source in enumerate(batch.sources):
        out, end = [], 0
        for piece, text, piece_annotated in zip(batch.pieces, batch.texts, pieces):
            if piece.source == j:
                out += [source.text[end : piece.start], piece_annotated]
                end = piece.start + len(text.text)
        annotated.append("".join(out) + source.text[end:])
        calls = sorted((call_offset(batch, c), c.call, c.result) for c in best.values() if batch.pieces[c.text].source == j)
        if parse_annotated(annotated[-1], config) != (source.text, calls):
            raise DatagenError(f"line {source.line}: the annotated text does not parse back into its calls: {annotated[-1]!r}")
    return annotated


def call_offset(batch: Batch, c: Candidate) -> int:
    """The call's character offset in its corpus text (before the whitespace of the word it precedes)."""
    return batch.pieces[c.text].start + batch.tokens[c.text].word_offsets[c.word]


def store_batch(session: Session, run: Run, batch: Batch, annotated: Sequence[str], config: ToolformerConfig) -> None:
    rows = []
    for j, text in enumerate(batch.sources):
        day = document_date(text, config)
        mine = [k for k, piece in enumerate(batch.pieces) if piece.source == j]
        rows.append(
            ToolformerText(
                run_id=run.id, line=text.line, source_id=text.source_id, text=text.text,
                date=day.isoformat() if day else None, tools=list(dict.fromkeys(n for k in mine for n in batch.tools[k])),
                annotated=annotated[j], calls_inserted=sum(1 for c in batch.candidates if c.inserted and c.text in mine),
            )
        )  # fmt: skip
    session.add_all(rows)
    session.flush()
    for c in batch.candidates:
        piece = batch.pieces[c.text]
        session.add(
            ApiCall(
                run_id=run.id, text_id=rows[piece.source].id, generation_id=c.generation.id if c.generation else None,
                tool=c.tool, position=call_offset(batch, c),
                token_position=batch.source_tokens[piece.source].word_starts[piece.first_word + c.word], p_api=c.p_api,
                completion=c.completion, call=c.call, argument=c.argument, result=c.result, status=c.status, reason=c.reason,
                loss_empty=c.loss_empty, loss_call=c.loss_call, loss_plus=c.loss_plus, loss_minus=c.loss_minus,
                kept=c.kept, inserted=c.inserted,
            )
        )  # fmt: skip
    kept = sum(c.kept for c in batch.candidates)
    run.accepted += kept
    run.rejected += len(batch.candidates) - kept
    run.instances += sum(1 for r in rows if r.calls_inserted)
    touch(run)
    session.add(run)


# --- The run -------------------------------------------------------------------------------------------------------


def done_lines(session: Session, run: Run) -> set[int]:
    return set(session.exec(select(ToolformerText.line).where(ToolformerText.run_id == run.id)).all())


def run(
    session: Session,
    run: Run,
    backend: Backend,
    texts: Sequence[CorpusText],
    tools: dict[str, Tool],
    config: ToolformerConfig,
    on_batch: Callable[[Batch], None] | None = None,
) -> None:
    """Annotate every text not yet done in this run, a batch at a time; each batch is one transaction. SIGTERM stops
    the run before its next batch (datagen/sigterm.py)."""
    if not callable(getattr(backend, "next_token_logprobs", None)):
        raise DatagenError(
            f"the {backend.name} backend cannot give the probability of one token at every position "
            "(Backend.next_token_logprobs), which Toolformer's step 1 needs; use --backend transformers or vllm"
        )
    api_token = api_token_id(backend.tokenize, config)
    encode = offsets_encoder(backend)
    context = config.max_context_tokens or getattr(backend, "max_model_len", None)
    budget = chunk_budget(backend.tokenize, list(tools), context, config)
    if run.config.get("chunk_tokens", budget) != budget:
        raise BadInput(f"run '{run.name}' cut texts into chunks of {run.config['chunk_tokens']} tokens; this model's context gives {budget}")
    run.config = {**run.config, "chunk_tokens": budget}  # a new dict: SQLAlchemy sees the change
    done = done_lines(session, run)
    todo = [t for t in texts if t.line not in done]
    for batch_number, start in enumerate(range(0, len(todo), config.batch_size), start=len(done) // config.batch_size):
        sigterm.check(batch_number)
        clock = StageClock()  # device seconds per stage, for cost accounting (datagen/cost.py)
        batch = make_batch(backend.tokenize, todo[start : start + config.batch_size], list(tools), budget, config, encode)
        for name, tool in tools.items():
            indices = [j for j, applied in enumerate(batch.tools) if name in applied]
            if not indices:
                continue
            with clock("scoring"):
                positions = sample_positions(backend, name, [batch.texts[j] for j in indices], api_token, config)  # 1
            with clock("generation"):
                candidates = sample_calls(session, run, backend, name, tool, batch, indices, positions, batch_number, config)  # 2
            with clock("tools"):
                executed = execute_calls(name, tool, batch, candidates, config)  # 3
            if executed.requests:
                add_generations(session, run, backend, f"tool:{name}", batch_number, executed.requests, executed.results)
            batch.candidates += candidates
        with clock("scoring"):
            filter_calls(backend, batch, config)  # 4
        store_batch(session, run, batch, annotated_texts(batch, config), config)  # 5
        session.add_all(clock.rows(run.id, backend))
        session.commit()
        if on_batch is not None:
            on_batch(batch)


# --- The summary: the paper's Table 2, per tool ---------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSummary:
    tool: str
    texts: int
    """Texts that passed the tool's pre-filter."""
    positions: int
    sampled: int
    parsed: int
    """Closed, well-formed calls to this tool (duplicates included)."""
    executed: int
    kept: int
    """Kept at the tool's own tau_f."""
    examples: dict[float, int]
    """Texts with at least one call with L- - L+ >= tau_f, for tau_f in TABLE2_THRESHOLDS (the paper's Table 2)."""


def summarize(session: Session, run: Run, tools: Sequence[str]) -> list[ToolSummary]:
    """Counts over the whole run (resumed parts included), from the store."""
    applied: dict[str, int] = {name: 0 for name in tools}
    for names in session.exec(select(ToolformerText.tools).where(ToolformerText.run_id == run.id)):
        for name in names:
            if name in applied:
                applied[name] += 1
    summaries = []
    for name in tools:
        mine = (ApiCall.run_id == run.id) & (ApiCall.tool == name)

        def count(*conditions, what=None) -> int:
            return session.exec(select(func.count(what if what is not None else ApiCall.id)).where(mine, *conditions)).one()

        positions = session.exec(
            select(func.count()).select_from(select(ApiCall.text_id, ApiCall.position).where(mine).distinct().subquery())
        ).one()
        examples = {
            tau: count(ApiCall.loss_minus - ApiCall.loss_plus >= tau, what=func.distinct(ApiCall.text_id))
            for tau in TABLE2_THRESHOLDS
        }
        summaries.append(
            ToolSummary(
                tool=name, texts=applied[name], positions=positions, sampled=count(),
                parsed=count(ApiCall.call.is_not(None)), executed=count(ApiCall.result.is_not(None)),
                kept=count(ApiCall.kept), examples=examples,
            )
        )  # fmt: skip
    return summaries
