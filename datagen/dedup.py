"""Near-duplicate filtering: Self-Instruct's ROUGE-L rule, exactly, thousands of times faster; plus exact, fuzzy and MinHash.

Self-Instruct keeps a new instruction only if its ROUGE-L F-measure against every instruction kept so far, seeds
included, is at most 0.7 (Wang et al. 2022, "Filtering and Postprocessing"; the code, yizhongw/self-instruct:
self_instruct/bootstrap_instructions.py, drops on `max(rouge_scores) > 0.7`). Stanford Alpaca applies the same 0.7 rule
to pre-tokenized instructions with `rouge_scorer._score_lcs` (tatsu-lab/stanford_alpaca: generate_instruction.py).
Both score with Google's pure-Python `rouge-score`, 6k-23k pairs per second on one core here (bench/dedup.py), and a
sequential run over 50k instructions scores 0.6e9-1.25e9 pairs: tens of core-hours.

This module gives the same decisions, bit for bit, in seconds:

- tokens come from rouge-score's own tokenizer, so tokenization cannot drift;
- each distinct token becomes one code point, so a text becomes a short string and the token-level LCS is rapidfuzz's
  bit-parallel `LCSseq` run by `process.cdist` over many pairs at once, on all cores;
- the F-measure is computed from the LCS with rouge-score's float operations in rouge-score's order, so scores are
  identical floats, not merely close ones;
- a pair whose token lengths alone cap the F-measure at or below the threshold is never scored (the length bound
  F <= 2·min(|a|,|b|)/(|a|+|b|), taken from the exact float table, so pruning cannot change a decision);
- candidates are scored in blocks against everything kept before the block, then resolved one by one inside the
  block, so every decision equals the one the sequential reference loop makes.

rouge-score's tokenizer drops every character outside [a-z0-9], so two identical Chinese instructions score 0 and the
filter does nothing for non-English data; `Tokenizer.unicode` keeps words of every script and makes each CJK character
one token.

    index = RougeIndex()                      # threshold 0.7, rouge-score's tokenizer
    index.add(seed_instructions)
    decisions = index.filter(new_instructions)
    kept = [text for text, d in zip(new_instructions, decisions) if d.kept]

Across runs, seed the index from the store, so a new or resumed run never keeps what earlier runs kept:

    index.add(load_store_texts(session, "store", exclude_run_id=run.id))

Command line: `datagen dedup machine.jsonl --against seed_tasks.jsonl --out kept.jsonl --pairs dropped.jsonl`,
`datagen dedup --run NAME --against store [--apply]`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import math
import os
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import regex
from rapidfuzz import fuzz, process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_tokenize
from sqlmodel import Session, select

from datagen.errors import BadInput, DatagenError
from storage.store import get_run
from storage.tables import Run, Task

SELF_INSTRUCT_THRESHOLD = 0.7
"""Self-Instruct drops a new instruction when its ROUGE-L F-measure with any kept instruction is above 0.7."""

BLOCK_SIZE = 1024
"""Candidates scored together against the kept pool; larger blocks mean fewer cdist calls but more in-block pairs."""


class Tokenizer(str, enum.Enum):
    rouge = "rouge"
    """rouge-score's tokenizer: lowercase, [a-z0-9] words only (every other character is a separator)."""
    unicode = "unicode"
    """Words of any script (NFKC, casefolded); each CJK character is one token."""


class Method(str, enum.Enum):
    rougeL = "rougeL"
    """ROUGE-L F-measure over tokens, identical to rouge-score (Self-Instruct and Alpaca's filter)."""
    exact = "exact"
    """Same text after casefolding, removing punctuation and collapsing whitespace."""
    fuzzy = "fuzzy"
    """rapidfuzz character similarity (ratio or token_set_ratio) divided by 100."""
    minhash = "minhash"
    """Estimated Jaccard similarity of character 5-grams, found with MinHash-LSH (datasketch)."""


class FuzzyScorer(str, enum.Enum):
    ratio = "ratio"
    """Indel similarity of the whole strings: 2·LCS/(|a|+|b|) over characters."""
    token_set_ratio = "token_set_ratio"
    """Ignores word order and repeated words."""


class Match(NamedTuple):
    """The closest text in an index: its position (insertion order), the text, and its similarity."""

    index: int
    text: str
    score: float


@dataclass(frozen=True)
class Decision:
    """What the filter decided for one candidate, and why: the most similar text kept before it and the score.

    `nearest_index` counts every text in the index in insertion order (texts added with `add` first, then the
    candidates kept by `filter`); it is None when nothing scored above 0.
    """

    kept: bool
    score: float
    nearest_index: int | None
    nearest_text: str | None


class DedupIndex(Protocol):
    """What every method offers: a growing set of texts, a nearest-text query and a sequential filter."""

    texts: list[str]

    def add(self, texts: Sequence[str]) -> None: ...

    def nearest(self, text: str) -> Match | None: ...

    def filter(
        self, candidates: Sequence[str], threshold: float | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Decision]: ...


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise BadInput(f"threshold must be between 0 and 1, got {threshold}")
    return float(threshold)


# --- Tokenizers ----------------------------------------------------------------------------------------------------


class _CachedStemmer:
    """nltk's Porter stemmer (the one rouge-score builds with use_stemmer=True), memoized per word.

    Stemming is pure and dominates tokenization time; the cache changes speed only. rouge-score's `tokenize` calls
    `.stem()` on words longer than 3 characters, so passing this object keeps its exact tokenization.
    """

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stem = functools.lru_cache(maxsize=1 << 20)(porter.PorterStemmer().stem)


# Scripts written without spaces between words: one token per character, with its combining marks, so that
# identical sentences in them still share tokens. Everything else: maximal runs of letters, marks and digits.
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Bopomofo}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_UNICODE_TOKEN = regex.compile(
    rf"(?V1)[[{_UNSPACED}]--\p{{M}}]\p{{M}}*|[[\p{{L}}\p{{N}}]--[{_UNSPACED}]][[\p{{L}}\p{{M}}\p{{N}}]--[{_UNSPACED}]]*"
)


def tokenize_unicode(text: str) -> list[str]:
    """Words of any script, NFKC-normalized and casefolded (so 'Ｓｔｒａｓｓｅ' and 'straße' match); CJK/Thai characters one each."""
    return _UNICODE_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


@functools.cache
def make_tokenizer(tokenizer: Tokenizer | str = Tokenizer.rouge, use_stemmer: bool = False) -> Callable[[str], list[str]]:
    """The tokenize function for a tokenizer choice (one per choice, so the stem cache is shared).

    `rouge` is rouge_score.tokenize.tokenize itself, which `tokenizers.DefaultTokenizer(use_stemmer)` (what
    `RougeScorer(["rougeL"], use_stemmer=...)` builds) calls; only the stemmer object is memoized.
    """
    tokenizer = Tokenizer(tokenizer)
    if tokenizer is Tokenizer.unicode:
        if use_stemmer:
            raise BadInput("the Porter stemmer is English-only: use it with --tokenizer rouge, not unicode")
        return tokenize_unicode
    stemmer = _CachedStemmer() if use_stemmer else None
    return functools.partial(rouge_tokenize.tokenize, stemmer=stemmer)


# --- ROUGE-L -------------------------------------------------------------------------------------------------------


def rouge_l_fmeasure(lcs, len_target, len_prediction):
    """ROUGE-L F-measure from the LCS length, with rouge-score's float operations in its order (numpy arrays too).

    rouge_score.rouge_scorer._score_lcs: precision = lcs/len(prediction), recall = lcs/len(target);
    scoring.fmeasure: 2*p*r/(p+r), or 0 when p+r is 0; and 0 when either token list is empty. IEEE division and
    multiplication are correctly rounded in Python and numpy alike, so the results are the same floats. The score is
    symmetric ((2*p)*r is exactly 2*(p*r)), so which text is the "target" does not matter.
    """
    if isinstance(lcs, np.ndarray) or isinstance(len_target, np.ndarray) or isinstance(len_prediction, np.ndarray):
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = lcs / len_prediction
            recall = lcs / len_target
            fmeasure = 2 * precision * recall / (precision + recall)
        defined = (np.asarray(len_target) > 0) & (np.asarray(len_prediction) > 0) & (np.asarray(lcs) > 0)
        return np.where(defined, fmeasure, 0.0)
    if not len_target or not len_prediction or not lcs:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: str, prediction: str, tokenizer: Tokenizer | str = Tokenizer.rouge, use_stemmer: bool = False) -> float:
    """One pair's ROUGE-L F-measure: RougeScorer(["rougeL"], use_stemmer).score(target, prediction)["rougeL"].fmeasure."""
    tokenize = make_tokenizer(tokenizer, use_stemmer)
    a, b = tokenize(target), tokenize(prediction)
    return rouge_l_fmeasure(LCSseq.similarity(a, b), len(a), len(b))


class RougeIndex:
    """Texts as token-code strings, grouped by token count, for ROUGE-L nearest-text queries and the sequential filter."""

    def __init__(
        self,
        threshold: float = SELF_INSTRUCT_THRESHOLD,
        tokenizer: Tokenizer | str = Tokenizer.rouge,
        use_stemmer: bool = False,
        workers: int = -1,
    ):
        self.threshold = check_threshold(threshold)
        self.workers = workers
        self.texts: list[str] = []
        self._tokenize = make_tokenizer(tokenizer, use_stemmer)
        self._vocabulary: dict[str, str] = {}
        self._codes: list[str] = []
        self._lengths: list[int] = []
        self._length_array = np.zeros(0, dtype=np.int64)  # _lengths as an array, for nearest()
        self._max_length = 0
        self._by_length: dict[int, tuple[list[str], list[int]]] = {}  # token count -> (codes, ids in insertion order)
        self._ids_by_length: dict[int, np.ndarray] = {}  # _by_length's ids as arrays, rebuilt after adds
        self._tables: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def encode(self, text: str) -> str:
        """One code point per token: rapidfuzz compares strings element by element, so LCS over these is LCS over tokens."""
        vocabulary = self._vocabulary
        codes = []
        for token in self._tokenize(text):
            code = vocabulary.get(token)
            if code is None:
                number = len(vocabulary)
                number += 0x800 if number >= 0xD800 else 0  # skip the surrogate block
                if number > 0x10FFFF:
                    raise DatagenError("more than 1.1 million distinct tokens: use --method minhash for a corpus this large")
                code = vocabulary[token] = chr(number)
            codes.append(code)
        return "".join(codes)

    def add(self, texts: Sequence[str]) -> None:
        """Add texts unconditionally (seeds, earlier runs)."""
        texts = list(texts)
        self._extend(texts, [self.encode(text) for text in texts])

    def _extend(self, texts: list[str], codes: list[str]) -> None:
        for text, code in zip(texts, codes):
            codes_of_length, ids = self._by_length.setdefault(len(code), ([], []))
            codes_of_length.append(code)
            ids.append(len(self.texts))
            self._ids_by_length.pop(len(code), None)
            self.texts.append(text)
            self._codes.append(code)
            self._lengths.append(len(code))
            self._max_length = max(self._max_length, len(code))

    def _table(self, length: int) -> np.ndarray:
        """F-measure of a text of `length` tokens against every (LCS, other length): table[lcs, other_length].

        Looking scores up in this table replaces five float operations per pair and gives the same floats.
        """
        table = self._tables.get(length)
        if table is None or table.shape[1] <= self._max_length:
            width = max(self._max_length + 1, 2 * (table.shape[1] if table is not None else 64))
            lcs, other = np.arange(length + 1)[:, None], np.arange(width)[None, :]
            table = self._tables[length] = rouge_l_fmeasure(lcs, length, other)
        return table

    def _reachable_lengths(self, length: int, threshold: float) -> list[int]:
        """Token counts of kept texts that can score above the threshold with a text of `length` tokens, ascending.

        The highest F-measure a pair can reach is at LCS = the shorter length (the bound 2·min/(|a|+|b|)); it is
        read from the exact float table, so no pair that could exceed the threshold is skipped.
        """
        table = self._table(length)
        return sorted(other for other in self._by_length if table[min(length, other), other] > threshold)

    def _ids(self, length: int) -> np.ndarray:
        ids = self._ids_by_length.get(length)
        if ids is None:
            ids = self._ids_by_length[length] = np.asarray(self._by_length[length][1], dtype=np.int64)
        return ids

    def _best_in_index(self, codes: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """For each candidate: the highest F-measure against the index and the earliest id reaching it (-1: none above 0).

        Candidates are grouped by token count, and each group is scored only against the lengths it can exceed the
        threshold with. Those columns come sorted by length, and for a fixed pair of lengths F grows with the LCS,
        so the best score is found from the highest LCS of each length instead of scoring every pair. rapidfuzz's
        score_cutoff is not used: the nearest text's score is wanted even below the threshold, and it did not speed
        up bit-parallel LCS on instruction-length strings.

        Groups run on a thread each: cdist releases the GIL, and one group of a block is often too small for
        cdist's own workers to split.
        """
        best = np.zeros(len(codes))
        best_at = np.full(len(codes), -1, dtype=np.int64)
        lengths = np.fromiter(map(len, codes), dtype=np.int64, count=len(codes))
        tasks = []
        for length in np.unique(lengths).tolist():
            others = self._reachable_lengths(length, threshold) if length else []  # no tokens: rouge-score gives 0
            if not others:
                continue
            choices = list(itertools.chain.from_iterable(self._by_length[m][0] for m in others))
            ids = [self._ids(m) for m in others]
            rows = np.flatnonzero(lengths == length)
            for chunk in np.array_split(rows, -(-len(rows) // 256)):  # bounds each LCS matrix's memory
                tasks.append((self._table(length), others, choices, ids, chunk))

        def score(task) -> None:
            table, others, choices, ids, chunk = task
            lcs = process.cdist([codes[r] for r in chunk], choices, scorer=LCSseq.similarity, dtype=np.int32, workers=1)
            sizes = np.array([len(i) for i in ids])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            top_lcs = np.maximum.reduceat(lcs, starts, axis=1)  # rows x lengths
            top_scores = table[top_lcs, others]
            row_best = top_scores.max(axis=1)
            best[chunk] = row_best
            for i in np.flatnonzero(row_best > 0).tolist():
                best_at[chunk[i]] = min(
                    int(ids[j][np.argmax(lcs[i, starts[j] : starts[j] + sizes[j]] == top_lcs[i, j])])
                    for j in np.flatnonzero(top_scores[i] == row_best[i]).tolist()
                )

        threads = min(len(tasks), (os.cpu_count() or 1) if self.workers < 1 else self.workers)
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(score, tasks))
        else:
            for task in tasks:
                score(task)
        return best, best_at

    def _scores(self, rows: list[str], columns: list[str]) -> np.ndarray:
        lcs = process.cdist(rows, columns, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)
        row_lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        column_lengths = np.fromiter(map(len, columns), dtype=np.int64, count=len(columns))
        return rouge_l_fmeasure(lcs, row_lengths[:, None], column_lengths[None, :])

    def nearest(self, text: str) -> Match | None:
        """The text with the highest ROUGE-L F-measure (the earliest on ties), over the whole index; None if all score 0."""
        code = self.encode(text)
        if not self._codes or not code:
            return None
        if len(self._length_array) != len(self._lengths):
            self._length_array = np.asarray(self._lengths)
        lcs = process.cdist([code], self._codes, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)[0]
        scores = self._table(len(code))[lcs, self._length_array]
        at = int(scores.argmax())
        return Match(at, self.texts[at], float(scores[at])) if scores[at] > 0 else None

    def filter(
        self, candidates: Sequence[str], threshold: float | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Decision]:
        """Keep each candidate iff its ROUGE-L F-measure with every text kept before it is <= threshold; add the kept ones.

        Decisions equal the sequential loop of Self-Instruct and Alpaca. A dropped candidate's score and nearest text
        are exact; a kept candidate's are the best among texts whose length lets them exceed the threshold (others
        are pruned unscored), None when no such text shares a token.
        """
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        candidates = list(candidates)
        codes = [self.encode(text) for text in candidates]
        return _sequential_filter(
            self, candidates, codes, threshold, lambda block: self._best_in_index(block, threshold), self._scores, progress
        )


def _sequential_filter(
    index,
    candidates: list[str],
    keys: list[str],
    threshold: float,
    best_in_index: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    scores: Callable[[list[str], list[str]], np.ndarray],
    progress: Callable[[int], None] | None,
) -> list[Decision]:
    """The reference loop (keep iff the max score against everything kept so far is <= threshold), in blocks.

    `keys` are what the index compares (token codes, normalized text). Each block is scored at once against the
    index as it stood before the block: the bulk of the pairs, on all cores. Only the candidates that pass that
    check can be kept, so every candidate of the block is then scored against those few, and the block is resolved
    in order: a candidate is also compared with the ones of its block kept before it. On ties the earliest kept
    text is the nearest.
    """
    decisions: list[Decision] = []
    for start in range(0, len(candidates), BLOCK_SIZE):
        block_texts = candidates[start : start + BLOCK_SIZE]
        block_keys = keys[start : start + BLOCK_SIZE]
        best, best_at = best_in_index(block_keys)
        survivors = np.flatnonzero(best <= threshold).tolist()
        within = scores(block_keys, [block_keys[r] for r in survivors]) if survivors else None
        column_of = {row: column for column, row in enumerate(survivors)}
        first_new_id = len(index.texts)
        kept_rows: list[int] = []
        kept_columns: list[int] = []
        block_decisions = []
        for row in range(len(block_keys)):
            score, at = float(best[row]), int(best_at[row])
            if kept_columns:
                row_scores = within[row, kept_columns]
                j = int(row_scores.argmax())
                if row_scores[j] > score:
                    score, at = float(row_scores[j]), first_new_id + j
            kept = score <= threshold
            if kept:
                kept_rows.append(row)
                kept_columns.append(column_of[row])
            block_decisions.append((kept, score, at if at >= 0 else None))
        index._extend([block_texts[r] for r in kept_rows], [block_keys[r] for r in kept_rows])
        decisions.extend(
            Decision(kept, score, at, index.texts[at] if at is not None else None) for kept, score, at in block_decisions
        )
        if progress:
            progress(len(block_keys))
    return decisions


# --- Exact ---------------------------------------------------------------------------------------------------------

_PUNCTUATION = regex.compile(r"\p{P}+")
_WHITESPACE = regex.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, casefold, punctuation removed, whitespace collapsed: 'Write a poem!' and ' write a  POEM' become equal."""
    text = _PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return _WHITESPACE.sub(" ", text).strip()


def exact_key(text: str) -> str:
    """A short stable hash of the normalized text (fit for a database column)."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).hexdigest()


class ExactIndex:
    """Drops a candidate whose normalized text was seen before; the threshold is accepted and ignored."""

    def __init__(self, threshold: float | None = None):
        self.texts: list[str] = []
        self._first: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, texts: Sequence[str]) -> None:
        for text in texts:
            self._first.setdefault(exact_key(text), len(self.texts))
            self.texts.append(text)

    def nearest(self, text: str) -> Match | None:
        at = self._first.get(exact_key(text))
        return Match(at, self.texts[at], 1.0) if at is not None else None

    def filter(
        self, candidates: Sequence[str], threshold: float | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Decision]:
        decisions = []
        for text in candidates:
            match = self.nearest(text)
            if match is None:
                self.add([text])
                decisions.append(Decision(True, 0.0, None, None))
            else:
                decisions.append(Decision(False, 1.0, match.index, match.text))
            if progress:
                progress(1)
        return decisions


# --- Fuzzy ---------------------------------------------------------------------------------------------------------


class FuzzyIndex:
    """rapidfuzz character similarity of normalized texts, scaled to [0, 1]; drops a candidate scoring above the threshold.

    Uses the same block-then-sequential filter as ROUGE-L, so decisions equal the one-by-one loop.
    """

    def __init__(self, threshold: float = 0.9, scorer: FuzzyScorer | str = FuzzyScorer.ratio, workers: int = -1):
        self.threshold = check_threshold(threshold)
        self.workers = workers
        self.texts: list[str] = []
        scorers = {FuzzyScorer.ratio: fuzz.ratio, FuzzyScorer.token_set_ratio: fuzz.token_set_ratio}
        self._scorer = scorers[FuzzyScorer(scorer)]
        self._normalized: list[str] = []

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, texts: Sequence[str]) -> None:
        self._extend(list(texts), [normalize(text) for text in texts])

    def _extend(self, texts: list[str], normalized: list[str]) -> None:
        self.texts.extend(texts)
        self._normalized.extend(normalized)

    def _scores(self, rows: list[str], columns: list[str]) -> np.ndarray:
        return process.cdist(rows, columns, scorer=self._scorer, dtype=np.float64, workers=self.workers) / 100

    def _best_in_index(self, normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self._normalized:
            return np.zeros(len(normalized)), np.full(len(normalized), -1)
        scores = self._scores(normalized, self._normalized)
        at = scores.argmax(axis=1)  # the first maximum: the earliest text
        best = scores[np.arange(len(normalized)), at]
        return best, np.where(best > 0, at, -1)

    def nearest(self, text: str) -> Match | None:
        best, at = self._best_in_index([normalize(text)])
        return Match(int(at[0]), self.texts[at[0]], float(best[0])) if at[0] >= 0 else None

    def filter(
        self, candidates: Sequence[str], threshold: float | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Decision]:
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        candidates = list(candidates)
        normalized = [normalize(text) for text in candidates]
        return _sequential_filter(self, candidates, normalized, threshold, self._best_in_index, self._scores, progress)


# --- MinHash-LSH ---------------------------------------------------------------------------------------------------


def shingles(text: str, size: int = 5) -> set[bytes]:
    """Character n-grams of the normalized text: language-agnostic and tolerant of small edits."""
    text = normalize(text)
    if len(text) <= size:
        return {text.encode("utf-8")}
    return {text[i : i + size].encode("utf-8") for i in range(len(text) - size + 1)}


class MinHashIndex:
    """Near duplicates in large corpora: MinHash signatures, LSH buckets (datasketch), estimated Jaccard of 5-grams.

    The LSH bands are tuned for this index's threshold, so `filter` cannot use another one. A candidate is dropped
    when some text the LSH returns has an estimated Jaccard above the threshold; LSH can miss a pair now and then
    (a false negative keeps a duplicate), which is the price of sublinear lookups.
    """

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, shingle_size: int = 5):
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        self.threshold = check_threshold(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise BadInput(f"minhash needs a threshold strictly between 0 and 1, got {threshold}")
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.texts: list[str] = []
        self._signatures: list = []
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=num_perm)
        self._minhash, self._lean = MinHash, LeanMinHash

    def __len__(self) -> int:
        return len(self.texts)

    def _signature(self, text: str):
        signature = self._minhash(num_perm=self.num_perm, seed=1)
        signature.update_batch(sorted(shingles(text, self.shingle_size)))
        return self._lean(signature)

    def add(self, texts: Sequence[str]) -> None:
        for text in texts:
            self._insert(text, self._signature(text))

    def _insert(self, text: str, signature) -> None:
        self._lsh.insert(len(self.texts), signature)
        self.texts.append(text)
        self._signatures.append(signature)

    def _nearest(self, signature) -> Match | None:
        best: Match | None = None
        for at in sorted(self._lsh.query(signature)):
            score = float(signature.jaccard(self._signatures[at]))
            if best is None or score > best.score:
                best = Match(at, self.texts[at], score)
        return best

    def nearest(self, text: str) -> Match | None:
        """The most similar text among those LSH puts in a bucket with this one (None: no candidate near the threshold)."""
        return self._nearest(self._signature(text))

    def filter(
        self, candidates: Sequence[str], threshold: float | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Decision]:
        if threshold is not None and check_threshold(threshold) != self.threshold:
            raise BadInput(f"this MinHash index was built for threshold {self.threshold}; build another for {threshold}")
        decisions = []
        for text in candidates:
            signature = self._signature(text)
            match = self._nearest(signature)
            kept = match is None or match.score <= self.threshold
            if kept:
                self._insert(text, signature)
            if match is None:
                decisions.append(Decision(kept, 0.0, None, None))
            else:
                decisions.append(Decision(kept, match.score, match.index, match.text))
            if progress:
                progress(1)
        return decisions


def make_index(
    method: Method | str = Method.rougeL,
    threshold: float = SELF_INSTRUCT_THRESHOLD,
    tokenizer: Tokenizer | str = Tokenizer.rouge,
    use_stemmer: bool = False,
    fuzzy_scorer: FuzzyScorer | str = FuzzyScorer.ratio,
    workers: int = -1,
) -> DedupIndex:
    """The index for a method; options that do not apply to it are rejected so a typo cannot pass silently."""
    method = Method(method)
    threshold = check_threshold(threshold)
    if method is not Method.rougeL and (Tokenizer(tokenizer) is not Tokenizer.rouge or use_stemmer):
        raise BadInput(f"--tokenizer and --stemmer apply to --method rougeL, not {method.value}")
    if method is not Method.fuzzy and FuzzyScorer(fuzzy_scorer) is not FuzzyScorer.ratio:
        raise BadInput(f"--fuzzy-scorer applies to --method fuzzy, not {method.value}")
    if method is Method.rougeL:
        return RougeIndex(threshold, tokenizer, use_stemmer, workers)
    if method is Method.exact:
        return ExactIndex(threshold)
    if method is Method.fuzzy:
        return FuzzyIndex(threshold, fuzzy_scorer, workers)
    return MinHashIndex(threshold)


# --- Texts kept in the store ---------------------------------------------------------------------------------------

STORE = "store"
"""`--against store`: every accepted instruction of every run, seeds included. `run:NAME` (or `run:ID`): one run's."""


class StoredInstruction(NamedTuple):
    run: str
    task_id: int
    source: str
    """seed or generated."""
    instruction: str


def stored_instructions(session: Session, against: str = STORE, exclude_run_id: int | None = None) -> list[StoredInstruction]:
    """Accepted instructions (seeds included) of the whole store or of one run, oldest run first, then in insertion order.

    One row per distinct text (its first occurrence): runs that share seed tasks store them once each, and a repeated
    text cannot change a decision. `exclude_run_id` leaves out a run whose own rows are being filtered, so its
    instructions are not compared with themselves. An unknown `run:NAME` is a BadInput (exit 2).
    """
    query = select(Run.name, Task.id, Task.source, Task.instruction).join(Run, Task.run_id == Run.id)
    query = query.where(Task.status == "accepted").order_by(Task.run_id, Task.id)
    if against.startswith("run:"):
        query = query.where(Task.run_id == get_run(session, against.removeprefix("run:")).id)
    elif against != STORE:
        raise BadInput(f"--against {against!r} is neither 'store' nor 'run:NAME' (for a file named {against}, write ./{against})")
    if exclude_run_id is not None:
        query = query.where(Task.run_id != exclude_run_id)
    seen: set[str] = set()
    rows = []
    for row in session.exec(query):
        if row.instruction not in seen:
            seen.add(row.instruction)
            rows.append(StoredInstruction(*row))
    return rows


def load_store_texts(session: Session, against: str = STORE, exclude_run_id: int | None = None) -> list[str]:
    """The texts of `stored_instructions`: what a pipeline adds to its index before filtering new instructions."""
    return [row.instruction for row in stored_instructions(session, against, exclude_run_id)]
