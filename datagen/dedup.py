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
- a pair is scored only if it shares enough tokens to exceed the threshold: F <= 2·o/(|a|+|b|) for the token-multiset
  overlap o, and an inverted index of each text's rarest tokens (prefix filtering: All-Pairs, Bayardo et al. 2007;
  PPJoin, Xiao et al. 2008) finds every such pair without looking at the others, so the filter stays
  sub-quadratic (1M instructions: bench/results/dedup.txt); the minimal overlaps come from the exact float table, so
  pruning cannot change a decision (`RougeIndex`, `min_overlaps`);
- candidates are scored in blocks against everything kept before the block, then resolved one by one inside the
  block, so every decision equals the one the sequential reference loop makes.

What differs from scoring every pair: the score and nearest text reported for a *kept* candidate are the best among
the texts that share enough tokens with it to have exceeded the threshold (0.0 and None when there is none, which is
common: a kept instruction's true nearest usually shares fewer tokens). A dropped candidate's are exact. Self-Instruct's own script records the most
similar instructions of every kept one; finding the true nearest of each kept candidate needs every pair, which is
what the index avoids (`RougeIndex.filter`).

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
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import regex
from rapidfuzz import fuzz, process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_tokenize

from datagen.errors import BadInput, DatagenError

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
    """What the filter decided for one candidate, and why: the most similar text kept before it and the score
    (for a candidate that ROUGE-L keeps, the most similar among those sharing enough tokens: `RougeIndex.filter`).

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


UNREACHABLE = 1 << 30
"""`min_overlaps` for two lengths that cannot score above the threshold: more than any text's token count."""

POSTINGS_CHUNK = 1 << 22
"""Index entries visited at once when probing (bounds the memory of one probe)."""

BUCKETS = 64
"""Element counts per hash bucket kept for each text: sum(min) over buckets bounds the multiset overlap from above."""


def min_overlaps(size: int, threshold: float) -> np.ndarray:
    """alpha[n, m]: the smallest LCS with which texts of n and m tokens score above the threshold (UNREACHABLE if none).

    rouge-score's floats decide (rouge_l_fmeasure), not the algebra F = 2·LCS/(n+m): LCS 7 of 8 + 12 tokens is
    2·7/20 = 0.7 exactly, yet rouge-score's float is 0.7000000000000001 > 0.7, so alpha(8, 12) is 7 at 0.7, not 8.
    The algebra only picks which LCS values to try: floor(t·(n+m)/2) - 2 to + 3, around the crossing (a test checks
    every n, m < 120 at 13 thresholds against trying all).
    """
    n = np.arange(size)[:, None]
    m = np.arange(size)[None, :]
    guess = np.floor(threshold * (n + m) / 2).astype(np.int64)
    alpha = np.full((size, size), UNREACHABLE, dtype=np.int32)
    for offset in range(3, -3, -1):  # the smallest last: it is the one kept
        lcs = guess + offset
        above = (lcs >= 1) & (lcs <= np.minimum(n, m)) & (rouge_l_fmeasure(lcs, n, m) > threshold)
        alpha = np.where(above, lcs, alpha)
    return alpha


def prefix_lengths(alpha: np.ndarray) -> np.ndarray:
    """For each token count n, how many of a text's first elements (in the global order) go into the inverted index.

    A pair with multiset overlap o >= alpha[n, m] shares an element among the first n - o + 1 of each text (the
    prefix filtering principle of All-Pairs, Bayardo et al. 2007, and PPJoin, Xiao et al. 2008). The index
    cannot know the length of a later candidate, so it keeps n - min_m alpha[n, m] + 1, the longest any partner
    needs; the minimum lies at m <= n, since alpha grows with the other length beyond n.
    """
    smallest = alpha.min(axis=1)
    return np.where(smallest < UNREACHABLE, np.arange(len(alpha)) - smallest + 1, 0)


def partner_lengths(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lo[n, b], hi[n, b]: the lengths m with alpha[n, m] <= b lie in lo..hi (none: lo > hi).

    A probe of n tokens whose shared element has b elements from it on can only pair with those lengths; the index
    keeps each element's texts sorted by length, so a probe visits just that range.
    """
    size = len(alpha)
    n, m = np.indices((size, size))
    reachable = alpha < size
    lo = np.full((size, size), size, dtype=np.int64)
    hi = np.full((size, size), -1, dtype=np.int64)
    np.minimum.at(lo, (n[reachable], alpha[reachable]), m[reachable])
    np.maximum.at(hi, (n[reachable], alpha[reachable]), m[reachable])
    return np.minimum.accumulate(lo, axis=1), np.maximum.accumulate(hi, axis=1)


class _Postings(NamedTuple):
    """One segment of the inverted index: for each element, the texts whose prefix holds it, by length, and where."""

    keys: np.ndarray
    """element * width + the text's token count, ascending: an element's texts of lengths lo..hi are one slice."""
    width: int
    ids: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    """The element's position in its text's global order."""

    @classmethod
    def build(cls, ids: np.ndarray, elements: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> _Postings:
        width = int(lengths.max(initial=0)) + 1
        keys = elements * width + lengths
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], width, *(column[order].astype(np.int32) for column in (ids, lengths, positions)))

    def merge(self, other: _Postings) -> _Postings:
        return _Postings.build(np.concatenate([self.ids, other.ids]),
                               np.concatenate([self.keys // self.width, other.keys // other.width]),
                               np.concatenate([self.positions, other.positions]),
                               np.concatenate([self.lengths, other.lengths]))  # fmt: skip


class _Prefixes(NamedTuple):
    """Texts' prefix elements, sorted by text: (row, element, position) per entry, and each text's token count."""

    rows: np.ndarray
    elements: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    def select(self, start: int, stop: int) -> _Prefixes:
        """The entries of rows start..stop-1, renumbered from 0."""
        low, high = np.searchsorted(self.rows, [start, stop])
        return _Prefixes(self.rows[low:high] - start, self.elements[low:high], self.positions[low:high],
                         self.lengths[start:stop])  # fmt: skip


class _Texts(NamedTuple):
    """Texts as the filter verifies them: token codes, the same sorted (LCS of two sorted strings is their multiset
    overlap), token counts, and element counts per bucket (a bound on the overlap that costs one vector min)."""

    codes: np.ndarray
    multisets: np.ndarray
    lengths: np.ndarray
    buckets: np.ndarray

    @classmethod
    def of(cls, codes: list[str], elements: np.ndarray) -> _Texts:
        lengths = np.fromiter(map(len, codes), dtype=np.int64, count=len(codes))
        buckets = np.zeros((len(codes), BUCKETS), dtype=np.uint8)  # a text of > 255 tokens is never pruned by them
        starts = np.cumsum(lengths) - lengths
        for low in range(0, len(codes), 1 << 14):  # bincount's memory stays small
            high = min(low + (1 << 14), len(codes))
            chunk = elements[starts[low] : starts[high - 1] + lengths[high - 1]]
            rows = np.repeat(np.arange(high - low), lengths[low:high])
            counts = np.bincount(rows * BUCKETS + chunk % BUCKETS, minlength=(high - low) * BUCKETS)
            buckets[low:high] = np.minimum(counts, 255).reshape(high - low, BUCKETS)
        return cls(_objects(codes), _objects(["".join(sorted(code)) for code in codes]), lengths, buckets)

    def select(self, start: int, stop: int) -> _Texts:
        return _Texts(*(column[start:stop] for column in self))


def _objects(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    """`array` with room for `needed` rows (capacity doubles, so appends cost O(1) each)."""
    if needed <= len(array):
        return array
    bigger = np.empty((max(needed, 2 * len(array), 1024), *array.shape[1:]), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


class RougeIndex:
    """Texts as token-code strings, with an inverted index of their rarest tokens, for the exact sequential filter.

    The filter must find every kept text whose ROUGE-L F-measure with a candidate is above the threshold. F is at
    most 2·o/(n+m) for the token-multiset overlap o (the LCS is a common sub-multiset), so such a text shares at
    least alpha(n, m) tokens, counted with repeats, with the candidate (`min_overlaps`). Prefix filtering on an
    inverted index finds all texts that can (All-Pairs, Bayardo et al. 2007; PPJoin, Xiao et al. 2008): each text
    is a set of elements (token, k-th occurrence), sorted rarest first in one global order; only the first
    elements of each (`prefix_lengths`) are indexed and probed, and a shared element is kept only if both texts
    have at least alpha elements from it on (PPJoin's positional filter). A pair found is then bounded by its
    texts' element counts per hash bucket (sum of minima >= overlap), and the rest verified exactly: multiset
    overlap (rapidfuzz LCS of the two sorted code strings) >= alpha, then the token LCS and rouge-score's float
    F-measure. Pruning uses only upper bounds compared with alpha, read from that float table, so it cannot change a
    decision.

    The global order is by element frequency over the index and the candidates of the `filter` call; it is re-fit,
    and the index rebuilt, whenever the number of texts has doubled since (elements seen in between count as the
    rarest). The index is kept in segments merged like a binary counter, so adding costs O(log n) per entry.
    """

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
        self._stored = _Texts(np.empty(0, dtype=object), np.empty(0, dtype=object), np.zeros(0, dtype=np.int64),
                              np.zeros((0, BUCKETS), dtype=np.uint8))  # with spare capacity: see _indexed  # fmt: skip
        self._max_length = 0
        self._tables: dict[int, np.ndarray] = {}
        self._element_of: dict[int, int] = {}  # token code | occurrence << 21 -> element id
        self._rank = np.zeros(0, dtype=np.int64)  # element id -> place in the global order, rarest first
        self._element_chunks: list[np.ndarray] = []  # the elements of every text, row-major, to rebuild the index
        self._ordered_texts = 0  # texts counted when the global order was last fitted
        self._index_threshold = self.threshold  # the threshold the index's prefixes are long enough for
        self._alpha = min_overlaps(64, self._index_threshold)
        self._prefix_lengths = prefix_lengths(self._alpha)
        self._partner_lo, self._partner_hi = partner_lengths(self._alpha)
        self._segments: list[_Postings] = []

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

    def _elements(self, codes: list[str]) -> np.ndarray:
        """The texts' tokens as elements (token, k-th occurrence in its text), as ids, row-major (in token order).

        Set overlap of elements is multiset overlap of tokens. A new element is ranked before all known ones: it
        is rare so far, and the order of known elements must not change while the index uses it.
        """
        tokens = np.frombuffer("".join(codes).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        lengths = np.fromiter(map(len, codes), dtype=np.int64, count=len(codes))
        rows = np.repeat(np.arange(len(codes)), lengths)
        order = np.lexsort((tokens, rows))
        tokens, rows = tokens[order], rows[order]
        first = np.ones(len(tokens), dtype=bool)
        first[1:] = (tokens[1:] != tokens[:-1]) | (rows[1:] != rows[:-1])
        starts = np.flatnonzero(first)
        occurrence = np.arange(len(tokens)) - np.repeat(starts, np.diff(np.append(starts, len(tokens))))
        keys, inverse = np.unique(tokens | (occurrence << 21), return_inverse=True)
        known = len(self._element_of)
        element_of = self._element_of
        ids = np.fromiter((element_of.setdefault(key, len(element_of)) for key in keys.tolist()), np.int64, len(keys))
        self._rank = np.concatenate([self._rank, -1 - np.arange(known, len(element_of))])
        return ids[inverse.reshape(-1)]

    def _prefixes(self, elements: np.ndarray, lengths: np.ndarray) -> _Prefixes:
        """Each text's first prefix_lengths[n] elements in the global order, with their positions."""
        rows = np.repeat(np.arange(len(lengths)), lengths)
        order = np.lexsort((self._rank[elements], rows))
        positions = np.arange(len(rows)) - (np.cumsum(lengths) - lengths)[rows]
        keep = positions < self._prefix_lengths[lengths][rows]
        return _Prefixes(rows[keep], elements[order][keep], positions[keep], lengths)

    def _limits(self, threshold: float, longest: int) -> bool:
        """Make the overlap table cover `longest` tokens at `threshold`; True if the index must be rebuilt for it."""
        if threshold == self._index_threshold and longest < len(self._alpha):
            return False
        rebuild = threshold != self._index_threshold
        self._index_threshold = threshold
        self._alpha = min_overlaps(max(longest + 1, 64 if rebuild else 2 * len(self._alpha)), threshold)
        self._prefix_lengths = prefix_lengths(self._alpha)  # unchanged for known lengths when only the size grows
        self._partner_lo, self._partner_hi = partner_lengths(self._alpha)
        return rebuild

    def _reindex(self) -> None:
        elements = np.concatenate(self._element_chunks) if self._element_chunks else np.zeros(0, dtype=np.int64)
        self._element_chunks = [elements]
        prefixes = self._prefixes(elements, self._indexed().lengths)
        self._segments = [_Postings.build(prefixes.rows, prefixes.elements, prefixes.positions, prefixes.lengths[prefixes.rows])]

    def _extend(self, texts: list[str], codes: list[str]) -> None:
        start, stop = len(self.texts), len(self.texts) + len(texts)
        elements = self._elements(codes)
        new = _Texts.of(codes, elements)
        lengths = new.lengths
        self._max_length = max(self._max_length, int(lengths.max(initial=0)))
        self.texts.extend(texts)
        self._codes.extend(codes)
        self._stored = _Texts(*(_grown(column, stop) for column in self._stored))
        for column, values in zip(self._stored, new):
            column[start:stop] = values
        self._element_chunks.append(elements)
        if self._limits(self._index_threshold, self._max_length):
            self._reindex()
            return
        prefixes = self._prefixes(elements, lengths)
        self._segments.append(_Postings.build(prefixes.rows + start, prefixes.elements, prefixes.positions, lengths[prefixes.rows]))
        while len(self._segments) > 1 and len(self._segments[-2].ids) <= 2 * len(self._segments[-1].ids):
            last = self._segments.pop()
            self._segments[-1] = self._segments[-1].merge(last)

    def _indexed(self) -> _Texts:
        return self._stored.select(0, len(self.texts))

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

    def _pairs(self, postings: _Postings, probe: _Prefixes, texts: _Texts, target: _Texts, earlier_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """(rows, targets): the texts of `postings` that may score above the threshold with a probed row, once each.

        A pair above the threshold has overlap o >= alpha(n, m), and its first shared element (in the global order)
        lies in both prefixes at positions i, j with n - i >= o and m - j >= o (PPJoin's positional filter); a
        shared element that fails this cannot be the first, so a pair is kept if one of its shared elements passes
        (and its bucket bound reaches alpha). Pairs kept this way may still fall short: `_verify` is exact.
        `earlier_only`: in a block, only targets before the row matter.
        """
        rows, positions = probe.rows, probe.positions
        n = probe.lengths[rows].astype(np.int32)
        base = probe.elements * postings.width
        shortest = self._partner_lo[n, n - positions]
        longest = np.minimum(self._partner_hi[n, n - positions], postings.width - 1)
        starts = np.searchsorted(postings.keys, base + shortest)
        counts = np.maximum(np.searchsorted(postings.keys, base + longest, side="right") - starts, 0)
        chunk = (np.cumsum(counts) - counts) // POSTINGS_CHUNK  # about POSTINGS_CHUNK index entries a chunk
        cuts = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        found = [np.zeros(0, dtype=np.int64)]
        for low, high in itertools.pairwise([0, *cuts.tolist(), len(rows)]):
            chunk_counts = counts[low:high]
            total = int(chunk_counts.sum())
            if not total:
                continue
            entry = np.repeat(starts[low:high] - (np.cumsum(chunk_counts) - chunk_counts), chunk_counts)
            entry += np.arange(total)
            hit_rows = np.repeat(rows[low:high], chunk_counts)
            hit_n = np.repeat(n[low:high], chunk_counts)
            targets, m = postings.ids[entry], postings.lengths[entry]
            alpha = self._alpha.ravel()[hit_n * len(self._alpha) + m]
            keep = (hit_n - np.repeat(positions[low:high], chunk_counts) >= alpha) & (m - postings.positions[entry] >= alpha)
            if earlier_only:
                keep &= targets < hit_rows
            hit_rows, targets, hit_n, m, alpha = hit_rows[keep], targets[keep], hit_n[keep], m[keep], alpha[keep]
            # each element is in one bucket, so a shared element counts in both texts' bucket: sum(min) >= overlap
            shared = np.minimum(texts.buckets[hit_rows], target.buckets[targets]).sum(axis=1, dtype=np.int64)
            keep = (shared >= alpha) | (hit_n > 255) | (m > 255)  # longer texts: bucket counts are capped at 255
            found.append(hit_rows[keep] * len(target.lengths) + targets[keep])
        keys = np.unique(np.concatenate(found))
        return keys // len(target.lengths), keys % len(target.lengths)

    def _verify(self, rows: np.ndarray, targets: np.ndarray, texts: _Texts, target: _Texts):
        """The pairs whose multiset overlap reaches alpha, with their exact F-measure: (rows, targets, scores)."""
        n, m = texts.lengths[rows], target.lengths[targets]
        if len(rows):
            overlap = process.cpdist(texts.multisets[rows], target.multisets[targets], scorer=LCSseq.similarity,
                                     dtype=np.int32, workers=self.workers)  # fmt: skip
            keep = overlap >= self._alpha[n, m]
            rows, targets, n, m = rows[keep], targets[keep], n[keep], m[keep]
        if not len(rows):
            return rows, targets, np.zeros(0)
        lcs = process.cpdist(texts.codes[rows], target.codes[targets], scorer=LCSseq.similarity, dtype=np.int32,
                             workers=self.workers)  # fmt: skip
        return rows, targets, rouge_l_fmeasure(lcs.astype(np.int64), n, m)

    def _best_in_index(self, probe: _Prefixes, texts: _Texts) -> tuple[np.ndarray, np.ndarray]:
        """For each probed row: the highest F-measure among the index texts it shares enough tokens with to exceed the
        threshold, and the earliest id reaching it (0 and -1: none)."""
        indexed = self._indexed()
        found = [self._pairs(postings, probe, texts, indexed, earlier_only=False) for postings in self._segments]
        rows = np.concatenate([np.zeros(0, dtype=np.int64)] + [r for r, _ in found])
        targets = np.concatenate([np.zeros(0, dtype=np.int64)] + [t for _, t in found])
        rows, targets, scores = self._verify(rows, targets, texts, indexed)
        best = np.zeros(len(texts.lengths))
        best_at = np.full(len(texts.lengths), -1, dtype=np.int64)
        order = np.lexsort((targets, -scores, rows))  # per row: highest score, then earliest text
        rows, targets, scores = rows[order], targets[order], scores[order]
        first = np.append(True, rows[1:] != rows[:-1]) if len(rows) else np.zeros(0, dtype=bool)
        best[rows[first]] = scores[first]
        best_at[rows[first]] = targets[first]
        return best, best_at

    def _in_block(self, probe: _Prefixes, texts: _Texts, survivors: list[int]) -> np.ndarray:
        """F-measure of each row with each survivor before it in the block, for pairs sharing enough tokens (else 0)."""
        chosen = np.isin(probe.rows, survivors)
        postings = _Postings.build(probe.rows[chosen], probe.elements[chosen], probe.positions[chosen], probe.lengths[probe.rows[chosen]])
        rows, targets = self._pairs(postings, probe, texts, texts, earlier_only=True)
        rows, targets, scores = self._verify(rows, targets, texts, texts)
        column_of = np.zeros(len(texts.lengths), dtype=np.int64)
        column_of[survivors] = np.arange(len(survivors))
        within = np.zeros((len(texts.lengths), len(survivors)))
        within[rows, column_of[targets]] = scores
        return within

    def nearest(self, text: str) -> Match | None:
        """The text with the highest ROUGE-L F-measure (the earliest on ties), over the whole index; None if all score 0."""
        code = self.encode(text)
        if not self._codes or not code:
            return None
        lcs = process.cdist([code], self._codes, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)[0]
        scores = self._table(len(code))[lcs, self._indexed().lengths]
        at = int(scores.argmax())
        return Match(at, self.texts[at], float(scores[at])) if scores[at] > 0 else None

    def filter(
        self,
        candidates: Sequence[str],
        threshold: float | None = None,
        progress: Callable[[int], None] | None = None,
        exact_nearest: bool = False,
    ) -> list[Decision]:
        """Keep each candidate iff its ROUGE-L F-measure with every text kept before it is <= threshold; add the kept ones.

        Decisions equal the sequential loop of Self-Instruct and Alpaca. A dropped candidate's score and nearest text
        are exact. A kept candidate's are the best among the texts that share enough tokens with it (multiset
        overlap >= alpha, `min_overlaps`) to exceed the threshold had their order allowed it; None when there is
        none. (Before the prefix index, the best among texts whose length alone allowed it: exact nearest texts for
        kept candidates would need every pair again, which is what the index avoids.)

        `exact_nearest=True` scores each kept candidate against every text before it, so its score and nearest text
        are exact too (the earliest on ties): what Self-Instruct's script records for every kept instruction
        (`most_similar_instructions`). One full scan per kept candidate: cheap for a pipeline's batch of a few dozen,
        not for `datagen dedup` over a million texts, which leaves it off.
        """
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        candidates = list(candidates)
        codes = [self.encode(text) for text in candidates]
        elements = self._elements(codes)
        texts = _Texts.of(codes, elements)
        rebuild = self._limits(threshold, max(self._max_length, int(texts.lengths.max(initial=0))))
        if len(self.texts) + len(codes) > 2 * self._ordered_texts:  # re-fit the global order to what is known now
            counts = np.bincount(np.concatenate([*self._element_chunks, elements]), minlength=len(self._element_of))
            self._rank = np.empty(len(counts), dtype=np.int64)
            self._rank[np.argsort(counts, kind="stable")] = np.arange(len(counts))
            self._ordered_texts = len(self.texts) + len(codes)
            rebuild = True
        if rebuild:
            self._reindex()
        probes = self._prefixes(elements, texts.lengths)

        def best_in_index(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            return self._best_in_index(probes.select(start, stop), texts.select(start, stop))

        def in_block(start: int, stop: int, survivors: list[int]) -> np.ndarray:
            return self._in_block(probes.select(start, stop), texts.select(start, stop), survivors)

        first_id = len(self.texts)
        decisions = _sequential_filter(self, candidates, codes, threshold, best_in_index, in_block, progress)
        if exact_nearest:
            decisions = self._with_exact_nearest(decisions, first_id)
        return decisions

    def _with_exact_nearest(self, decisions: list[Decision], first_id: int) -> list[Decision]:
        """Kept decisions rescored against every text added before each (kept texts get ids in order from first_id)."""
        exact = []
        kept_id = first_id
        for decision in decisions:
            if decision.kept:
                code = self._codes[kept_id]
                before = self._codes[:kept_id]
                if code and before:
                    lcs = process.cdist([code], before, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)[0]
                    scores = self._table(len(code))[lcs, self._indexed().lengths[:kept_id]]
                    at = int(scores.argmax())  # the earliest of the best
                    if scores[at] > 0:
                        decision = Decision(True, float(scores[at]), at, self.texts[at])
                kept_id += 1
            exact.append(decision)
        return exact


def _sequential_filter(
    index,
    candidates: list[str],
    keys: list[str],
    threshold: float,
    best_in_index: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    scores: Callable[[int, int, list[int]], np.ndarray],
    progress: Callable[[int], None] | None,
) -> list[Decision]:
    """The reference loop (keep iff the max score against everything kept so far is <= threshold), in blocks.

    `keys` are what the index compares (token codes, normalized text). Each block (candidates start..stop-1) is
    scored at once against the index as it stood before the block: the bulk of the pairs. Only the candidates that
    pass that check can be kept, so every candidate of the block is then scored against those few (`scores`: block
    rows x survivors, 0 where a pair cannot matter), and the block is resolved in order: a candidate is also
    compared with the ones of its block kept before it. On ties the earliest kept text is the nearest.
    """
    decisions: list[Decision] = []
    for start in range(0, len(candidates), BLOCK_SIZE):
        stop = min(start + BLOCK_SIZE, len(candidates))
        block_texts = candidates[start:stop]
        block_keys = keys[start:stop]
        best, best_at = best_in_index(start, stop)
        survivors = np.flatnonzero(best <= threshold).tolist()
        within = scores(start, stop, survivors) if survivors else None
        column_of = {row: column for column, row in enumerate(survivors)}
        first_new_id = len(index.texts)
        kept_rows: list[int] = []
        kept_columns: list[int] = []
        block_decisions = []
        paired = within.any(axis=1) if within is not None else np.zeros(len(block_keys), dtype=bool)
        for row in range(len(block_keys)):
            score, at = float(best[row]), int(best_at[row])
            if kept_columns and paired[row]:
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
        return _sequential_filter(
            self, candidates, normalized, threshold,
            lambda start, stop: self._best_in_index(normalized[start:stop]),
            lambda start, stop, survivors: self._scores(normalized[start:stop], [normalized[start + r] for r in survivors]),
            progress,
        )  # fmt: skip


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
