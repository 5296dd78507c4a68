"""Toolformer: the backend's per-position token probabilities, the pipeline's pure functions, the loss
checked by hand on the embedded model, the planted calculator text, an end-to-end run, and resume."""

from __future__ import annotations

import math

import pytest

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
