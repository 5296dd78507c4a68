"""Toolformer: the backend's per-position token probabilities, the pipeline's pure functions, the loss
checked by hand on the embedded model, the planted calculator text, an end-to-end run, and resume."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from datagen.backends import Completion, Result
from datagen.errors import BadInput
from pipelines import toolformer as tf
from pipelines.tools import CALCULATOR, CALENDAR, Passage, SearchIndex, Tool, ToolError, build_tools, qa_tool

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "toolformer_corpus.jsonl"
CONFIG = tf.ToolformerConfig()
TEXT = "Out of 1400 participants, 400 (or 29%) passed the test."


# --- The backend extension: log p(token | prefix) at every position ------------------------------------------


def test_next_token_logprobs_matches_score_on_transformers(hf_backend):
    ids = hf_backend.tokenize(TEXT)
    probe = hf_backend.tokenizer(" [", add_special_tokens=False)["input_ids"][0]
    values = hf_backend.next_token_logprobs([ids, ids[:6]], probe)
    assert len(values[0]) == len(ids) and values[0][0] is None
    assert values[1] == pytest.approx(values[0][:6], abs=1e-4)  # padding and batching change nothing
    for i in (1, 7, 15):  # the same number from `score` of the sequence with the probe in place of token i
        scored = hf_backend.score([ids[:i] + [probe]])[0]
        assert values[0][i] == pytest.approx(scored.logprobs[-1], abs=1e-4)
    assert all(v < 0 for v in values[0][1:]) and sum(math.exp(v) for v in values[0][1:]) < len(ids)


def _agree_where_seen(exact, top_k):
    """Top-K backends give the exact value where the probe is among the K most likely, else None (p < 1/K)."""
    from datagen.backends import PROBE_TOP_K

    assert len(exact) == len(top_k) and top_k[0] is None
    for e, v in zip(exact[1:], top_k[1:]):
        if v is None:
            assert e < math.log(1 / PROBE_TOP_K)
        else:
            assert v == pytest.approx(e, abs=2e-3)
    assert any(v is not None for v in top_k[1:])


@pytest.mark.vllm
def test_next_token_logprobs_on_vllm_agrees_with_transformers(vllm_llm, hf_backend):
    ids = hf_backend.tokenize("Input: 2 + 2 = 4. Output: 2 + 2 = [Calculator(2 + 2)] 4. Input: " + TEXT)
    probe = hf_backend.tokenizer(" [", add_special_tokens=False)["input_ids"][0]
    (exact,) = hf_backend.next_token_logprobs([ids], probe)
    (top_k,) = vllm_llm.next_token_logprobs([ids], probe)
    _agree_where_seen(exact, top_k)


@pytest.mark.vllm
def test_next_token_logprobs_on_openai_agrees_with_transformers(vllm_server, hf_backend):
    from datagen.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend("smollm2-135m", base_urls=[vllm_server])
    ids = hf_backend.tokenize("Input: 2 + 2 = 4. Output: 2 + 2 = [Calculator(2 + 2)] 4. Input: " + TEXT)
    probe = hf_backend.tokenizer(" [", add_special_tokens=False)["input_ids"][0]
    (exact,) = hf_backend.next_token_logprobs([ids], probe)
    (top_k,) = backend.next_token_logprobs([ids], probe)
    backend.close()
    _agree_where_seen(exact, top_k)


def _positions_agree(backend, hf_backend):
    """The calculator's paper settings (tau_s 0, k 20): every word of TEXT but the first, with the same p_i."""
    api = tf.api_token_id(hf_backend.tokenize, CONFIG)
    (exact,) = tf.sample_positions(hf_backend, "calculator", [tf.CorpusText(1, TEXT)], api, CONFIG)
    (seen,) = tf.sample_positions(backend, "calculator", [tf.CorpusText(1, TEXT)], api, CONFIG)
    assert [w for w, _ in seen] == [w for w, _ in exact] == list(range(1, 10))
    assert [p for _, p in seen] == pytest.approx([p for _, p in exact], rel=1e-2)
    assert min(p for _, p in exact) < 1 / 20  # some of them the top-20 pass alone did not see


@pytest.mark.vllm
def test_positions_on_vllm_are_those_of_transformers(vllm_llm, hf_backend):
    _positions_agree(vllm_llm, hf_backend)


@pytest.mark.vllm
def test_positions_on_openai_are_those_of_transformers(vllm_server, hf_backend):
    from datagen.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend("smollm2-135m", base_urls=[vllm_server])
    try:
        _positions_agree(backend, hf_backend)
    finally:
        backend.close()


# --- Pure functions ------------------------------------------------------------------------------------------

def test_paper_defaults():
    assert CONFIG.settings["calculator"] == tf.ToolSettings(tau_s=0.0, k=20, m=10, tau_f=0.5)
    for name in ("calendar", "wikisearch", "qa"):
        assert CONFIG.settings[name] == tf.ToolSettings(tau_s=0.05, k=5, m=5, tau_f=1.0)
    assert (CONFIG.api_start, CONFIG.api_end, CONFIG.result_arrow) == ("[", "]", "->")
    assert tf.TABLE2_THRESHOLDS == (0.5, 1.0, 2.0)


def test_config_merges_partial_settings_and_rejects_bad_ones():
    config = tf.ToolformerConfig(settings={"calculator": {"k": 3}, "qa": {"tau_f": 2.0}})
    assert config.settings["calculator"] == tf.ToolSettings(tau_s=0.0, k=3, m=10, tau_f=0.5)
    assert config.settings["qa"].tau_f == 2.0 and config.settings["calendar"] == tf.ToolSettings()
    for bad in ({"tools": ["abacus"]}, {"tools": []}, {"tools": ["qa", "qa"]}, {"settings": {"abacus": {}}},
                {"settings": {"qa": {"k": 0}}}, {"settings": {"qa": {"tau_s": 1.5}}}, {"api_end": " "}, {"colour": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            tf.ToolformerConfig.model_validate(bad)


def test_loss_weights_are_the_papers():
    # w~_t = max(0, 1 - 0.2 t), normalized (section 4.1)
    assert tf.loss_weights() == pytest.approx([1 / 3, 0.8 / 3, 0.6 / 3, 0.4 / 3, 0.2 / 3])
    assert tf.loss_weights(0.5) == pytest.approx([1 / 1.5, 0.5 / 1.5])
    assert sum(tf.loss_weights(0.05)) == pytest.approx(1) and len(tf.loss_weights(0.05)) == 20


def test_weighted_loss():
    weights = (0.5, 0.3, 0.2)
    logprobs = (None, -1.0, -2.0, -3.0, -4.0)
    assert tf.weighted_loss(logprobs, 1, weights) == pytest.approx(0.5 * 1 + 0.3 * 2 + 0.2 * 3)
    assert tf.weighted_loss(logprobs, 3, weights) == pytest.approx(0.5 * 3 + 0.3 * 4)  # the text ends: fewer terms
    with pytest.raises(Exception, match="no log-probability"):
        tf.weighted_loss(logprobs, 0, weights)


def test_keep_is_at_least_tau_f():
    assert tf.keep(loss_plus=1.0, loss_minus=2.0, tau_f=1.0)
    assert not tf.keep(loss_plus=1.01, loss_minus=2.0, tau_f=1.0)
    assert not tf.keep(loss_plus=2.0, loss_minus=1.0, tau_f=0.0)


def test_split_words_and_annotate():
    assert tf.split_words("Out of  1400\nmen.") == [(0, "Out"), (3, " of"), (6, "  1400"), (12, "\nmen.")]
    text = "Out of 1400 participants, 400 (or 29%) passed the test."
    offset = text.index(" 29%")
    linearized = tf.linearize("Calculator(400 / 1400)", "0.29", CONFIG)
    assert linearized == "[Calculator(400 / 1400) -> 0.29]"
    assert tf.annotate(text, [(offset, linearized)]) == "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed the test."
    assert tf.annotate("a b c", [(1, "[X]"), (3, "[Y]")]) == "a [X] b [Y] c"


def test_linearize_with_and_without_result_and_other_markers():
    assert tf.linearize("Calculator(400 / 1400)", "", CONFIG) == "[Calculator(400 / 1400) ->]"
    other = tf.ToolformerConfig(api_start="<API>", api_end="</API>", result_arrow="→")
    assert tf.linearize("Calendar()", "Today is Friday.", other) == "<API>Calendar() → Today is Friday.</API>"


def test_build_prompt_is_exact():
    prompt = tf.build_prompt("calendar", "Today is Friday.", CONFIG)
    assert prompt.startswith('Your task is to add calls to a Calendar API to a piece of text. The API calls should help you get '
                             'information required to complete the text. You can call the API by writing "[Calendar()]". ')  # fmt: skip
    assert "Output: Today is the first [Calendar()] Monday of the month.\n" in prompt
    assert prompt.endswith("\nInput: Today is Friday.\nOutput:")
    other = tf.build_prompt("calculator", "x {y} z", tf.ToolformerConfig(api_start="<API>", api_end="</API>"))
    assert "<API>Calculator(14 + 9)</API> 23 animals" in other and other.endswith("Input: x {y} z\nOutput:")
    for tool in ("calculator", "calendar", "wikisearch", "qa"):
        assert "{" not in tf.build_prompt(tool, "t", CONFIG).replace("t\nOutput:", "")


def test_select_positions():
    p = [0.9, 0.2, None, 0.04, 0.3, 0.2, 0.06]
    assert tf.select_positions(p, tau_s=0.05, k=5) == [1, 4, 5, 6]  # word 0 never; None and 0.04 out
    assert tf.select_positions(p, tau_s=0.05, k=2) == [1, 4]  # the two most likely (ties: earlier word)
    assert tf.select_positions(p, tau_s=0.0, k=20) == [1, 3, 4, 5, 6]
    assert tf.select_positions(p, tau_s=0.5, k=5) == []


def closed(text: str) -> Completion:
    """A completion that the stop string </API> ended."""
    return Completion(text, "stop", len(text.split()), stop_reason="]")


def test_parse_call():
    assert tf.parse_call(closed("Calculator(400 / 1400)"), CALCULATOR, CONFIG) == ("Calculator(400 / 1400)", "400 / 1400")
    assert tf.parse_call(closed(" Calculator( 4 * 30 ) "), CALCULATOR, CONFIG) == ("Calculator(4 * 30)", "4 * 30")
    assert tf.parse_call(closed("Calendar()"), CALENDAR, CONFIG) == ("Calendar()", "")
    cases = [(Completion("Calculator(400 / 1400", "length", 8), CALCULATOR, "unclosed", "max_call_tokens"),
             (closed("Calendar()"), CALCULATOR, "unparsed", "calls Calendar, not Calculator"),
             (closed("Calculator(400 / 1400) -> 0.29"), CALCULATOR, "unparsed", "Name(argument)"),
             (closed("Calculator(1\n+ 1)"), CALCULATOR, "unparsed", "Name(argument)"),
             (closed("Calculator(four hundred)"), CALCULATOR, "unparsed", "unexpected"),
             (closed("Calendar(2020)"), CALENDAR, "unparsed", "no argument")]  # fmt: skip
    for completion, tool, status, reason in cases:
        with pytest.raises(tf.Unusable) as caught:
            tf.parse_call(completion, tool, CONFIG)
        assert caught.value.status == status and reason in caught.value.reason, completion


def test_a_call_the_model_ended_without_api_end_is_unclosed():
    """Footnote 2: a completion that ended at end-of-sequence, not at </API>, is discarded even if it parses."""
    for ended in (Completion("Calculator(400 / 1400)", "stop", 6), Completion("Calculator(400 / 1400)", "stop", 6, stop_reason="\n")):
        with pytest.raises(tf.Unusable) as caught:
            tf.parse_call(ended, CALCULATOR, CONFIG)
        assert caught.value.status == "unclosed" and "without </API>" in caught.value.reason
    other = tf.ToolformerConfig(api_start="<API>", api_end="</API>")
    assert tf.parse_call(Completion("Calendar()", "stop", 3, stop_reason="</API>"), CALENDAR, other) == ("Calendar()", "")
    with pytest.raises(tf.Unusable):
        tf.parse_call(closed("Calendar()"), CALENDAR, other)


def test_read_corpus_and_prefilters(tmp_path):
    texts = tf.read_corpus(CORPUS)
    assert len(texts) >= 20 and texts[0].text == TEXT and texts[0].source_id == "participants"
    assert texts[0].date.isoformat() == "2023-02-09"
    calculator = [t for t in texts if tf.passes_prefilter("calculator", t, CONFIG)]
    assert TEXT in [t.text for t in calculator] and len(calculator) < len(texts)
    dated = [t for t in texts if tf.passes_prefilter("calendar", t, CONFIG)]
    assert 0 < len(dated) < len(texts)
    assert all(tf.passes_prefilter("calendar", t, tf.ToolformerConfig(date="2024-01-01")) for t in texts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "a", "date": "yesterday"}\n')
    with pytest.raises(BadInput, match="bad.jsonl:2: field 'date'"):
        tf.read_corpus(bad)
    bad.write_text('{"text": "ok"}\n{"title": "a"}\n')
    with pytest.raises(BadInput, match="bad.jsonl:2: missing field 'text'"):
        tf.read_corpus(bad)


def test_text_tokens_match_the_tokenizer(hf_backend):
    tokens = tf.tokenize_words(hf_backend.tokenize, TEXT)
    assert list(tokens.ids) == hf_backend.tokenize(TEXT)  # byte-level BPE: word by word = whole text
    words = tf.split_words(TEXT)
    for (offset, word), start, own_offset in zip(words, tokens.word_starts, tokens.word_offsets):
        assert own_offset == offset
        assert hf_backend.tokenizer.decode(list(tokens.ids[start:])).startswith(word)
    assert tf.api_token_id(hf_backend.tokenize, CONFIG) == hf_backend.tokenizer(" [", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(BadInput, match="one token"):
        tf.api_token_id(hf_backend.tokenize, tf.ToolformerConfig(api_start="<API>"))


def llama_like_tokenizer():
    """A SentencePiece-style BPE tokenizer built here, normalized as Llama 2's and Mistral's: "▁" prepended to every
    string and spaces written as "▁", so " participants" alone is "▁", "▁participant", "s"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [TEXT, "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed the test.",
              "Today is [Calendar() -> Friday] Friday, and [QA(Who?) -> Bo] Bo [Calculator(2 + 2) -> 4] came."] * 20  # fmt: skip
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    from tokenizers.processors import TemplateProcessing

    sp.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_tokenizer_that_prepends_a_space_marker_to_every_string():
    """Word by word, a Llama-2-style tokenizer gives every word an extra "▁" and " [" two tokens (issue 19, item 9):
    the text is tokenized once, words are mapped to tokens by offsets, and <API> is " [" as it follows a word."""
    tokenizer = llama_like_tokenizer()

    class Backend:
        pass

    backend = Backend()
    backend.tokenizer = tokenizer
    tokenize = lambda text: tokenizer(text)["input_ids"]  # noqa: E731  (BOS added, as a backend's tokenize does)
    whole = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(tf.tokenize_words(tokenize, TEXT).ids) > len(whole)  # the extra "▁" per word, without offsets
    encode = tf.offsets_encoder(backend)
    for lead in ("", " "):  # in the prompt the text follows "Output:" and a space, which "▁Out" already carries
        tokens = tf.tokenize_words(tokenize, TEXT, lead, encode)
        assert list(tokens.ids) == whole
        assert tokens.word_offsets == tuple(offset for offset, _ in tf.split_words(TEXT))
        for (_, word), start in zip(tf.split_words(TEXT), tokens.word_starts):
            assert tokenizer.convert_ids_to_tokens(whole[start]).startswith("▁" + word.strip()[:1])
    api = tf.api_token_id(tokenize, CONFIG)
    assert tokenizer.convert_ids_to_tokens(api) == "▁["
    prompt = tokenizer("passed [", add_special_tokens=False)["input_ids"]
    assert prompt[-1] == api  # the token the call prompts end with


# --- The loss, by hand on the embedded model ------------------------------------------------------------------


def _planted_batch(backend, calls):
    """The paper's Figure 1 text, with calls at " 29%)" already executed: (call, result) pairs."""
    word = next(w for w, (_, piece) in enumerate(tf.split_words(TEXT)) if piece == " 29%)")
    batch = tf.make_batch(backend.tokenize, [tf.CorpusText(1, TEXT)], ["calculator"], None, CONFIG)
    for call, result in calls:
        batch.candidates.append(tf.Candidate(0, "calculator", word, None, call, status="executed", call=call, result=result))
    return batch, word


def test_losses_equal_a_hand_computation_with_the_model(hf_backend):
    import torch

    batch, word = _planted_batch(hf_backend, [("Calculator(400 / 1400)", "0.29")])
    scored_tokens = tf.filter_calls(hf_backend, batch, CONFIG)
    candidate = batch.candidates[0]
    assert scored_tokens > 0

    tokenizer, model = hf_backend.tokenizer, hf_backend.hf_model
    x = tokenizer(TEXT)["input_ids"]
    offsets = tokenizer(TEXT, return_offsets_mapping=True)["offset_mapping"]
    i = next(n for n, (start, _) in enumerate(offsets) if start == TEXT.index(" 29%)"))  # x_i: the " " before 29
    weights = [w / 3.0 for w in (1.0, 0.8, 0.6, 0.4, 0.2)]

    def by_hand(prefix: str | None) -> float:
        z = tokenizer(prefix + "\n")["input_ids"] if prefix is not None else []
        ids = z + x
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        j = len(z) + i
        return -sum(w * logprobs[j + t - 1, ids[j + t]].item() for t, w in enumerate(weights))

    loss_empty = by_hand(None)
    loss_call = by_hand("[Calculator(400 / 1400) ->]")
    loss_plus = by_hand("[Calculator(400 / 1400) -> 0.29]")
    assert candidate.loss_empty == pytest.approx(loss_empty, abs=1e-3)
    assert candidate.loss_call == pytest.approx(loss_call, abs=1e-3)
    assert candidate.loss_plus == pytest.approx(loss_plus, abs=1e-3)
    assert candidate.loss_minus == pytest.approx(min(loss_empty, loss_call), abs=1e-3)
    assert candidate.kept == (min(loss_empty, loss_call) - loss_plus >= 0.5)


def test_planted_calculator_call_helps_only_with_the_right_result(hf_backend):
    """Figure 1 of the paper: 400 / 1400 -> 0.29 should make "29%" easier to predict; a wrong result should not."""
    calls = [("Calculator(400 / 1400)", "0.29"), ("Calculator(400 / 1400)", "0.71"), ("Calculator(1400 - 400)", "1000")]
    batch, _ = _planted_batch(hf_backend, calls)
    tf.filter_calls(hf_backend, batch, CONFIG)
    right, wrong, other = batch.candidates
    for c in batch.candidates:
        print(f"{c.call} -> {c.result}: L(empty)={c.loss_empty:.3f} L(call)={c.loss_call:.3f} L+={c.loss_plus:.3f} "
              f"L- - L+={c.loss_minus - c.loss_plus:.3f} kept={c.kept}")  # fmt: skip
    assert right.loss_minus - right.loss_plus > 0 and right.kept  # measured 1.35 nats (calculator tau_f = 0.5)
    assert wrong.loss_minus - wrong.loss_plus < 0 and not wrong.kept  # measured -0.20
    assert other.loss_minus - other.loss_plus < 0 and not other.kept  # measured -0.26


# --- The run loop, on a scripted backend (logic only) ------------------------------------------------------------


class ScriptedBackend:
    """One token per word (with its leading space); " [" is most likely before a percentage; each position
    samples the scripted completions; a token is easy to predict (-0.1) when a prefix result shares its digits."""

    name = "scripted"
    model = "scripted"
    COMPLETIONS = [
        closed("Calculator(400 / 1400)"),
        closed("Calculator(400 / 1400)"),  # duplicate
        closed("Calculator(1400 - 400)"),  # runs, does not help
        closed("Calculator(1 / 0)"),  # fails
        closed("Calendar()"),  # wrong tool
        Completion("Calculator(400 / 14", "length", 8),  # unclosed
        Completion("Calculator(400 / 1400)", "stop", 6),  # ended by the model, not by </API>: unclosed
    ]

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.generate_calls = 0

    def tokenize(self, text: str) -> list[int]:
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r"\s*\S+", text)]

    def word(self, token: int) -> str:
        return next(w for w, i in self.vocab.items() if i == token)

    def next_token_logprobs(self, sequences, token_id):
        p = lambda w: 0.5 if "%" in w else 0.2 if re.search(r"\d", w) else 0.01  # noqa: E731
        return [(None, *(math.log(p(self.word(t))) for t in s[1:])) for s in sequences]

    def generate(self, requests):
        self.generate_calls += 1
        return [Result(r.prompt, 10, tuple(self.COMPLETIONS[: r.params.n]), 0.0) for r in requests]

    def score(self, sequences):
        from datagen.backends import ScoredSequence

        out = []
        for s in sequences:
            words = [self.word(t) for t in s]
            results = re.findall(r"-> ([\d.]+)", "".join(words))
            helped = lambda w: any(r.split(".")[-1] in w for r in results)  # noqa: E731
            out.append(ScoredSequence(tuple(s), (None, *(-0.1 if helped(w) else -2.0 for w in words[1:]))))
        return out

    def close(self):
        pass


def _store(tmp_path):
    from sqlmodel import Session

    from storage.store import open_engine
    from storage.tables import Run

    session = Session(open_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    run = Run(name="tf", pipeline="toolformer", model="scripted", backend="scripted")
    session.add(run)
    session.commit()
    return session, run


def test_run_stores_every_candidate_with_its_verdict_and_resumes(tmp_path):
    from sqlmodel import select

    from storage.tables import ApiCall, Generation, ToolformerText

    session, run = _store(tmp_path)
    backend = ScriptedBackend()
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"k": 1, "m": 7}}, batch_size=2)
    texts = [tf.CorpusText(1, TEXT), tf.CorpusText(2, "No numbers here at all."), tf.CorpusText(3, "It took 3 men 4 days, 12 in all.")]
    tf.run(session, run, backend, texts[:2], build_tools(["calculator"]), config)

    rows = session.exec(select(ToolformerText).order_by(ToolformerText.line)).all()
    assert [(r.line, r.tools, r.calls_inserted) for r in rows] == [(1, ["calculator"], 1), (2, [], 0)]
    assert rows[0].annotated == "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed the test."
    assert rows[1].annotated == rows[1].text
    calls = session.exec(select(ApiCall).order_by(ApiCall.id)).all()
    assert [c.status for c in calls] == ["kept", "duplicate", "rejected", "failed", "unparsed", "unclosed", "unclosed"]
    kept = calls[0]
    assert (kept.tool, kept.position, kept.call, kept.argument, kept.result) == ("calculator", 33, "Calculator(400 / 1400)", "400 / 1400", "0.29")
    assert kept.p_api == pytest.approx(0.5) and kept.inserted and kept.token_position == 6
    four_tokens = 2.0 * (1 + 0.8 + 0.6 + 0.4) / 3  # " 29%)" " passed" " the" " test." at -2.0 each; the text ends
    assert kept.loss_empty == kept.loss_call == kept.loss_minus == pytest.approx(four_tokens)
    assert kept.loss_plus == pytest.approx(four_tokens - 1.9 / 3)  # " 29%)" (w_0 = 1/3) at -0.1 instead of -2.0
    assert calls[2].reason.startswith("L- - L+ = 0.000 < tau_f = 0.5") and calls[3].reason == "division by zero"
    assert all(c.generation_id is not None and c.text_id == rows[0].id for c in calls)
    generation = session.get(Generation, kept.generation_id)
    assert generation.purpose == "api_calls:calculator" and generation.prompt.endswith("Input: " + TEXT + "\nOutput: Out of 1400 participants, 400 (or [")
    assert (run.accepted, run.rejected, run.instances) == (1, 6, 1)

    # device seconds per stage for cost accounting, committed with the batch (the scripted backend is no local model: cpu)
    from storage.tables import StageTime

    stages = {t.stage for t in session.exec(select(StageTime).where(StageTime.run_id == run.id)).all()}
    assert {"scoring", "generation", "filtering"} <= stages
    (summary,) = tf.summarize(session, run, ["calculator"])
    assert summary == tf.ToolSummary("calculator", texts=1, positions=1, sampled=7, parsed=4, executed=2, kept=1,
                                     examples={0.5: 1, 1.0: 0, 2.0: 0})  # fmt: skip

    generate_calls = backend.generate_calls
    tf.run(session, run, backend, texts, build_tools(["calculator"]), config)  # resume: only text 3 is new
    assert backend.generate_calls == generate_calls + 1
    assert [r.line for r in session.exec(select(ToolformerText).order_by(ToolformerText.line))] == [1, 2, 3]
    tf.run(session, run, backend, texts, build_tools(["calculator"]), config)
    assert backend.generate_calls == generate_calls + 1


def test_each_position_samples_with_its_own_seed(tmp_path, hf_backend):
    """One seed for every call request made every position of every text, tool and batch draw the same random
    numbers (issue 19, item 8): each position's seed is its own, and its m samples differ and repeat under it."""
    assert tf.call_seed(0, 0, "calculator", 0, 3) % 128 == 0  # vLLM seeds sample i with seed + i: blocks never overlap
    seeds = {tf.call_seed(s, b, tool, j, w) for s in (0, 1) for b in (0, 1) for tool in ("calculator", "calendar")
             for j in (0, 1) for w in range(1, 6)}  # fmt: skip
    assert len(seeds) == 2 * 2 * 2 * 2 * 5

    class Recording:
        name, model = "transformers", "smollm2-135m"
        requests: list = []

        def generate(self, requests):
            self.requests = list(requests)
            return hf_backend.generate(requests)

    session, run = _store(tmp_path)
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"m": 4}}, max_call_tokens=6)
    batch = tf.make_batch(hf_backend.tokenize, [tf.CorpusText(1, TEXT)], ["calculator"], None, config)
    backend = Recording()

    def sample(batch_number):
        candidates = tf.sample_calls(session, run, backend, "calculator", CALCULATOR, batch, [0], [[(4, None), (6, None)]],
                                     batch_number, config)  # fmt: skip
        return [r.params.seed for r in backend.requests], [c.completion for c in candidates]

    seeds, texts = sample(0)
    assert seeds == [tf.call_seed(0, 0, "calculator", 0, 4), tf.call_seed(0, 0, "calculator", 0, 6)]
    assert len(set(texts[:4])) > 1  # the m samples at one position are distinct draws
    assert sample(0) == (seeds, texts)  # and repeat under the same seeds
    assert set(sample(1)[0]).isdisjoint(seeds)  # another batch, other seeds


def test_clean_result_removes_markers_and_caps():
    assert tf.clean_result("Paris ]\n-> [1] is\tthe\n\ncapital ", CONFIG) == "Paris 1 is the capital"
    capped = tf.clean_result("word " * 200, CONFIG)
    assert len(capped) <= CONFIG.max_result_chars and capped.endswith("word") and capped.startswith("word word")
    assert tf.clean_result("x" * 500, CONFIG) == "x" * CONFIG.max_result_chars
    with pytest.raises(ToolError, match="empty"):
        tf.clean_result(" ] -> [\n", CONFIG)


def test_parse_annotated_inverts_annotate():
    calls = [(TEXT.index(" 29%)"), "Calculator(400 / 1400)", "0.29"),
             (TEXT.index(" passed"), 'QA("Who (really) passed [the] test?")'.replace("[", "(").replace("]", ")"), "400 of 1400"),
             (TEXT.index(" participants"), "Calendar()", "Today is Monday, May 1, 2023.")]  # fmt: skip
    annotated = tf.annotate(TEXT, [(offset, tf.linearize(call, result, CONFIG)) for offset, call, result in calls])
    assert tf.parse_annotated(annotated, CONFIG) == (TEXT, sorted(calls))
    assert tf.parse_annotated(TEXT, CONFIG) == (TEXT, [])
    other = tf.ToolformerConfig(api_start="<API>", api_end="</API>", result_arrow="→")
    annotated = tf.annotate(TEXT, [(calls[0][0], tf.linearize(calls[0][1], calls[0][2], other))])
    assert tf.parse_annotated(annotated, other) == (TEXT, [calls[0]])


def test_parse_call_rejects_arguments_with_markers():
    for argument in ('QA("what -> why")', 'QA("a [b")'):
        with pytest.raises(tf.Unusable, match="marker"):
            tf.parse_call(closed(argument), qa_tool(SearchIndex([Passage("t", "x")]), None), CONFIG)


def test_a_result_with_markers_is_cleaned_and_the_annotation_parses_back(tmp_path):
    """A result with "]", "->" and a newline broke the inline annotation; the stored text now parses back."""
    from sqlmodel import select

    from storage.tables import ApiCall, ToolformerText

    session, run = _store(tmp_path)
    dirty = Tool("Calculator", CALCULATOR.parse, lambda argument, context: "0.29] (rounded)\n-> [see note]")
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"k": 1, "m": 1}})
    tf.run(session, run, ScriptedBackend(), [tf.CorpusText(1, TEXT)], {"calculator": dirty}, config)
    (row,) = session.exec(select(ToolformerText)).all()
    (call,) = session.exec(select(ApiCall)).all()
    assert call.kept and call.result == "0.29 (rounded) see note"
    assert row.annotated == "Out of 1400 participants, 400 (or [Calculator(400 / 1400) -> 0.29 (rounded) see note] 29%) passed the test."
    assert tf.parse_annotated(row.annotated, config) == (TEXT, [(33, "Calculator(400 / 1400)", "0.29 (rounded) see note")])


class ShortContextBackend(ScriptedBackend):
    """The scripted model with a context of `max_model_len` tokens: like vLLM, it refuses anything longer."""

    def __init__(self, max_model_len: int):
        super().__init__()
        self.max_model_len = max_model_len
        self.longest = 0

    def _fits(self, length: int) -> None:
        self.longest = max(self.longest, length)
        if length > self.max_model_len:
            raise BadInput(f"{length} tokens do not fit in the context of {self.max_model_len}")

    def next_token_logprobs(self, sequences, token_id):
        for s in sequences:
            self._fits(len(s))
        return super().next_token_logprobs(sequences, token_id)

    def generate(self, requests):
        for r in requests:
            self._fits(len(self.tokenize(r.prompt)) + r.params.max_tokens)
        return super().generate(requests)

    def score(self, sequences):
        for s in sequences:
            self._fits(len(s))
        return super().score(sequences)


def test_split_chunks():
    tokens = tf.TextTokens(ids=tuple(range(10)), word_starts=(0, 2, 3, 6, 7, 9), word_offsets=(0, 4, 8, 12, 16, 20))
    assert tf.split_chunks(tokens, None) == [(0, 6)] and tf.split_chunks(tokens, 10) == [(0, 6)]
    assert tf.split_chunks(tokens, 4) == [(0, 2), (2, 4), (4, 6)]  # words of 2, 1 | 3, 1 | 2, 1 tokens
    assert tf.split_chunks(tokens, 2) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]  # word 2 (3 tokens) alone


def test_a_text_longer_than_the_context_is_annotated_in_chunks(tmp_path):
    from sqlmodel import select

    from storage.tables import ApiCall, Generation, ToolformerText

    text = " ".join(f"On day {d} we counted {3 * d} birds." for d in range(1, 9)) + " Of 1400 birds, 400 (or 29%) were gulls."
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"k": 1, "m": 2}})
    backend = ScriptedBackend()
    overhead = len(backend.tokenize(tf.build_prompt("calculator", "", config)))
    context = overhead + config.max_call_tokens + 16 + 2 * 14  # room for 14 words of text a chunk
    backend = ShortContextBackend(context)
    with pytest.raises(BadInput, match="do not fit"):  # the text whole does not fit
        backend.next_token_logprobs([backend.tokenize(tf.build_prompt("calculator", text, config) + " " + text)], 0)
    backend.longest = 0

    session, run = _store(tmp_path)
    tf.run(session, run, backend, [tf.CorpusText(1, text)], build_tools(["calculator"]), config)
    assert backend.longest <= context and run.config["chunk_tokens"] == 14
    (row,) = session.exec(select(ToolformerText)).all()
    calls = session.exec(select(ApiCall)).all()
    inputs = {g.prompt.split("\nInput: ")[-1].split("\nOutput:")[0] for g in session.exec(select(Generation))}
    assert len(inputs) == 5 and " ".join(sorted(inputs, key=text.index)) == text  # 64 words: 4 x 14 + 8
    assert row.text == text and row.calls_inserted == 1
    assert row.annotated == text.replace(" 29%)", " [Calculator(400 / 1400) -> 0.29] 29%)")
    words = dict(tf.split_words(text))
    for call in calls:  # offsets and token positions in the whole text
        assert call.position in words and call.position > 0
        assert call.token_position == tf.tokenize_words(backend.tokenize, text).word_starts[list(words).index(call.position)]
    assert tf.parse_annotated(row.annotated, config)[0] == text


def test_the_qa_tools_own_generations_are_stored(tmp_path):
    from sqlmodel import select

    from storage.tables import ApiCall, Generation

    class QABackend(ScriptedBackend):
        def generate(self, requests):
            self.generate_calls += 1
            return [Result(r.prompt, 10, (Completion(" Lake Zürich", "stop", 3, stop_reason="\n"),), 0.0)
                    if r.prompt.startswith("Answer the question") else
                    Result(r.prompt, 10, (closed('QA("Which lake is at Zürich?")'),) * r.params.n, 0.0) for r in requests]  # fmt: skip

    session, run = _store(tmp_path)
    backend = QABackend()
    index = SearchIndex([Passage("Zürich", "Zürich lies at the north end of Lake Zürich."), Passage("Ghana", "Accra.")])
    config = tf.ToolformerConfig(tools=["qa"], settings={"qa": {"tau_s": 0.0, "k": 1, "m": 2}}, qa_max_tokens=7)
    text = "The city lies on the shore of Lake Zürich in Switzerland."
    tf.run(session, run, backend, [tf.CorpusText(1, text)], build_tools(["qa"], index, backend, config.qa_max_tokens), config)
    (answer,) = session.exec(select(Generation).where(Generation.purpose == "tool:qa")).all()
    assert "Passage: Zürich lies at the north end of Lake Zürich." in answer.prompt
    assert answer.prompt.endswith("Question: Which lake is at Zürich?\nAnswer:") and answer.completion == " Lake Zürich"
    assert answer.sampling["max_tokens"] == 7 and answer.sampling["temperature"] == 0.0
    calls = session.exec(select(ApiCall)).all()
    assert [c.status for c in calls][1] == "duplicate" and calls[0].result == "Lake Zürich"
    assert run.generated == 3  # two sampled calls and one answer


class TopKBackend(ScriptedBackend):
    """The scripted model seen as vllm and openai see it: None where <API> is not among the top PROBE_TOP_K
    (here: p < 1/K); `score` of x_1..x_{i-1} <API> gives the exact value, as a model does."""

    def __init__(self):
        super().__init__()
        self.exact: dict[tuple[int, ...], float] = {}
        self.probes = 0

    def next_token_logprobs(self, sequences, token_id):
        from datagen.backends import PROBE_TOP_K

        values = super().next_token_logprobs(sequences, token_id)
        for s, row in zip(sequences, values):
            self.exact |= {tuple(s[:i]) + (token_id,): v for i, v in enumerate(row) if v is not None}
        return [tuple(None if v is not None and v < math.log(1 / PROBE_TOP_K) else v for v in row) for row in values]

    def score(self, sequences):
        from datagen.backends import ScoredSequence

        probes = [s for s in sequences if tuple(s) in self.exact]
        if not probes:
            return super().score(sequences)
        assert len(probes) == len(sequences)
        self.probes += len(probes)
        return [ScoredSequence(tuple(s), (None,) * (len(s) - 1) + (self.exact[tuple(s)],)) for s in sequences]


def test_a_top_k_backend_selects_the_positions_of_an_exact_one():
    """The calculator's tau_s = 0 (appendix A) with k = 20: the exact backend selects every word but the first;
    a top-K backend saw p_i only where it is >= 1/K, and scores the other words exactly."""
    texts = [tf.CorpusText(1, TEXT), tf.CorpusText(2, "It took 3 men 4 days, 12 in all, said the 2 clerks.")]
    exact, top_k = ScriptedBackend(), TopKBackend()
    api, top_k_api = (tf.api_token_id(b.tokenize, CONFIG) for b in (exact, top_k))
    expected = tf.sample_positions(exact, "calculator", texts, api, CONFIG)
    assert [len(p) for p in expected] == [9, 12] and all(p is not None for ps in expected for _, p in ps)
    assert tf.sample_positions(top_k, "calculator", texts, top_k_api, CONFIG) == expected
    assert top_k.probes == (9 - 3) + (12 - 4)  # the words without digits or "%" (p = 0.01 < 1/20)
    # tau_s >= 1/K: None means p_i < tau_s, nothing to probe; k positions seen above 1/K: neither
    for settings in ({"tau_s": 0.05, "k": 5}, {"tau_s": 0.0, "k": 2}):
        config = tf.ToolformerConfig(settings={"calculator": settings})
        top_k.probes = 0
        seen = tf.sample_positions(top_k, "calculator", texts, top_k_api, config)
        assert seen == tf.sample_positions(exact, "calculator", texts, api, config) and top_k.probes == 0


def test_a_backend_without_next_token_logprobs_is_a_clear_error(tmp_path):
    session, run = _store(tmp_path)
    backend = ScriptedBackend()
    backend.next_token_logprobs = None
    with pytest.raises(Exception, match="next_token_logprobs"):
        tf.run(session, run, backend, [tf.CorpusText(1, TEXT)], build_tools(["calculator"]), CONFIG)


def test_shipped_config_validates():
    from datagen.cli.commands.toolformer import load_config

    config = load_config(REPO / "examples" / "toolformer_cpu.yaml", {"tools": ["calculator", "qa"]})
    assert config.tools == ["calculator", "qa"]
    assert config.settings["calculator"] == tf.ToolSettings(tau_s=0.0, k=3, m=3, tau_f=0.5)
    assert config.settings["qa"].tau_f == 1.0


# --- End to end on the embedded model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end_on_the_embedded_model_and_resume(tmp_path, db_url, embedded_model_path):
    import json

    from sqlmodel import Session, select
    from typer.testing import CliRunner

    from datagen.cli import app
    from storage.store import open_engine
    from storage.tables import ApiCall, Generation, Run, ToolformerText

    config = tmp_path / "small.yaml"
    config.write_text("settings:\n  calculator: {k: 1, m: 2}\n  calendar: {tau_s: 0.0, k: 1, m: 2}\n"
                      "  wikisearch: {tau_s: 0.0, k: 1, m: 2}\n  qa: {tau_s: 0.0, k: 1, m: 2}\nmax_call_tokens: 16\n")  # fmt: skip
    args = ["toolformer", "--corpus", str(CORPUS), "--tools", "calculator,calendar,wikisearch,qa",
            "--search-corpus", str(REPO / "examples" / "search_corpus"), "--config", str(config), "--run", "tf-e2e",
            "--backend", "transformers", "--db", db_url, "--json"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--limit", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["run"] == "tf-e2e" and summary["texts"] == 2
    assert [t["tool"] for t in summary["tools"]] == ["calculator", "calendar", "wikisearch", "qa"]
    assert all(t["texts"] == 2 and t["positions"] == 2 and t["sampled"] == 4 for t in summary["tools"])

    with Session(open_engine(db_url)) as session:
        run = session.exec(select(Run).where(Run.name == "tf-e2e")).one()
        assert run.status == "completed" and run.pipeline == "toolformer" and run.config["corpus_sha256"]
        texts = session.exec(select(ToolformerText).order_by(ToolformerText.line)).all()
        assert [t.line for t in texts] == [1, 2] and texts[0].source_id == "participants" and texts[0].date == "2023-02-09"
        calls = session.exec(select(ApiCall)).all()
        assert len(calls) == 16
        statuses = {c.status for c in calls}
        assert statuses <= {"kept", "rejected", "duplicate", "unclosed", "unparsed", "failed"}
        for c in calls:
            generation = session.get(Generation, c.generation_id)
            assert generation.completion == c.completion and generation.purpose == f"api_calls:{c.tool}"
            if c.status in ("kept", "rejected"):
                assert c.result and c.loss_minus == pytest.approx(min(c.loss_empty, c.loss_call))
                assert c.kept == (c.loss_minus - c.loss_plus >= {"calculator": 0.5}.get(c.tool, 1.0))
        for text in texts:
            inserted = [c for c in calls if c.text_id == text.id and c.inserted]
            assert text.calls_inserted == len(inserted)
            expected = tf.annotate(text.text, [(c.position, tf.linearize(c.call, c.result, CONFIG)) for c in inserted])
            assert text.annotated == expected
        print("statuses:", sorted(statuses), "annotated:", [t.annotated for t in texts])

    result = runner.invoke(app, [*args, "--limit", "3"])  # resume: texts 1 and 2 are done, only text 3 runs
    assert result.exit_code == 0, result.output
    with Session(open_engine(db_url)) as session:
        assert [t.line for t in session.exec(select(ToolformerText).order_by(ToolformerText.line))] == [1, 2, 3]
        assert len(session.exec(select(ApiCall)).all()) > 16
    result = runner.invoke(app, [*args[:-1], "--limit", "3", "--tools", "calculator"])
    assert result.exit_code == 2 and "tools differ" in result.output

    # the kept calls as a fine-tuning dataset: `datagen export --format toolformer` reads toolformertext.annotated
    with Session(open_engine(db_url)) as session:
        annotated = [t.annotated for t in session.exec(select(ToolformerText)) if t.calls_inserted > 0]
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--run", "tf-e2e", "--format", "toolformer", "--out", str(out), "--test-size", "0", "--db", db_url])
    if annotated:
        import datasets

        assert result.exit_code == 0, result.output
        assert sorted(datasets.load_from_disk(str(out))["train"]["text"]) == sorted(annotated)
    else:
        assert result.exit_code == 2, result.output


def test_a_long_text_in_chunks_on_the_embedded_model(hf_backend, tmp_path):
    from sqlmodel import select

    from storage.tables import ApiCall, ToolformerText

    assert hf_backend.max_model_len == 8192  # SmolLM2's max_position_embeddings: chunking's default context
    text = " ".join([t.text for t in tf.read_corpus(CORPUS) if tf.passes_prefilter("calculator", t, CONFIG)][:6])
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"k": 1, "m": 1}}, max_call_tokens=8,
                                 max_context_tokens=440)  # fmt: skip
    session, run = _store(tmp_path)
    tf.run(session, run, hf_backend, [tf.CorpusText(1, text)], build_tools(["calculator"]), config)
    budget = run.config["chunk_tokens"]
    assert len(tf.split_chunks(tf.tokenize_words(hf_backend.tokenize, text), budget)) >= 3
    (row,) = session.exec(select(ToolformerText)).all()
    calls = session.exec(select(ApiCall)).all()
    assert row.text == text and len({c.generation_id for c in calls}) >= 3  # one position a chunk
    assert tf.parse_annotated(row.annotated, config) == (text, sorted((c.position, c.call, c.result) for c in calls if c.inserted))


def _run_one_text(backend, tmp_path):
    from sqlmodel import select

    from storage.tables import ApiCall, ToolformerText

    session, run = _store(tmp_path)
    config = tf.ToolformerConfig(tools=["calculator"], settings={"calculator": {"k": 2, "m": 2}}, max_call_tokens=16)
    tf.run(session, run, backend, [tf.CorpusText(1, TEXT)], build_tools(["calculator"]), config)
    (text,) = session.exec(select(ToolformerText)).all()
    calls = session.exec(select(ApiCall)).all()
    assert len(calls) == 4 and all(c.p_api is None or 0 < c.p_api < 1 for c in calls)
    assert all(c.loss_plus is not None for c in calls if c.status in ("kept", "rejected"))
    return text, calls


@pytest.mark.vllm
def test_pipeline_runs_on_vllm(vllm_llm, tmp_path):
    _run_one_text(vllm_llm, tmp_path)


@pytest.mark.vllm
def test_pipeline_runs_on_openai(vllm_server, tmp_path):
    from datagen.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend("smollm2-135m", base_urls=[vllm_server])
    try:
        _run_one_text(backend, tmp_path)
    finally:
        backend.close()


# --- Bad input and kill -9, through the CLI in a subprocess -------------------------------------------------------


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "datagen.cli", "toolformer", *args]


def test_a_missing_search_corpus_exits_2_with_one_line_and_stores_nothing(tmp_path):
    import subprocess

    db = tmp_path / "store.db"
    done = subprocess.run(_cli("--corpus", str(CORPUS), "--tools", "calculator,wikisearch", "--search-corpus",
                               str(tmp_path / "MISSING"), "--run", "x", "--db", f"sqlite:///{db}"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "MISSING" in line and "folder" in line
    assert not db.exists()  # no run row, no store


@pytest.mark.parametrize("lines, message", [
    ("5", "--lines: '5' is not FIRST:LAST"), ("0:3", "--lines: '0:3' is not FIRST:LAST"), ("4:2", "--lines: '4:2' is not FIRST:LAST"),
    ("a:b", "--lines: 'a:b' is not FIRST:LAST"), ("90:99", "--lines 90:99: the corpus has no text there (its texts are on lines 1 to 32)"),
])  # fmt: skip
def test_bad_lines_exit_2_with_one_line_and_store_nothing(tmp_path, lines, message):
    from typer.testing import CliRunner

    from datagen.cli import app

    db = tmp_path / "store.db"
    result = CliRunner().invoke(app, ["toolformer", "--corpus", str(CORPUS), "--lines", lines, "--run", "x", "--db", f"sqlite:///{db}"])
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and line.startswith(f"error: {message}"), result.output
    assert not db.exists()


def test_select_lines_keeps_the_texts_on_those_lines():
    texts = tf.read_corpus(CORPUS)
    assert [t.line for t in tf.select_lines(texts, "3:5")] == [3, 4, 5]
    assert [t.line for t in tf.select_lines(texts, "31:40")] == [31, 32]
    assert tf.select_lines(texts, None) == texts


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    """kill -9 once a first batch is stored and the next is under way, rerun: the rows from before are kept
    unchanged, every text is stored once, and every generation belongs to a stored call (no half batch)."""
    from sqlmodel import Session, select
    from typer.testing import CliRunner

    from datagen.cli import app
    from storage.store import get_run, open_engine
    from storage.tables import ApiCall, Generation, ToolformerText
    from tests.conftest import kill_9_once

    config = tmp_path / "small.yaml"
    config.write_text("settings:\n  calculator: {k: 1, m: 2}\n  calendar: {tau_s: 0.0, k: 1, m: 2}\nmax_call_tokens: 12\n")
    db_url = f"sqlite:///{tmp_path / 'kill.db'}"
    command = _cli("--corpus", str(CORPUS), "--limit", "4", "--batch-size", "1", "--config", str(config), "--run", "k",
                   "--backend", "transformers", "--db", db_url)  # fmt: skip
    engine = open_engine(db_url)

    def first_text_stored():
        with Session(engine) as session:
            return session.exec(select(ToolformerText)).first() is not None

    kill_9_once(command, first_text_stored, then=1)  # into the next batch

    def snapshot(session):
        texts = session.exec(select(ToolformerText.id, ToolformerText.line, ToolformerText.annotated)).all()
        calls = session.exec(select(ApiCall.id, ApiCall.text_id, ApiCall.generation_id, ApiCall.status, ApiCall.result)).all()
        return set(texts), set(calls)

    with Session(engine) as session:
        texts_before, calls_before = snapshot(session)
        assert 1 <= len(texts_before) < 4 and get_run(session, "k").status == "running"
    done = CliRunner().invoke(app, command[3:])  # the rerun in this process, on the session's model
    assert done.exit_code == 0, done.output[-2000:]
    with Session(engine) as session:
        texts_after, calls_after = snapshot(session)
        assert texts_before <= texts_after and calls_before <= calls_after
        assert sorted(line for _, line, _ in texts_after) == [1, 2, 3, 4]
        sampled = session.exec(select(Generation.id).where(Generation.purpose.startswith("api_calls:"))).all()
        assert sorted(sampled) == sorted(g for _, _, g, _, _ in calls_after)  # one stored call per sampled completion
        run = get_run(session, "k")
        assert run.status == "completed" and run.generated == len(sampled)
        assert run.accepted + run.rejected == len(calls_after)
