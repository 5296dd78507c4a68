"""The in-process vLLM backend on the real embedded model (one engine for the session: `vllm_llm`)."""

from __future__ import annotations

import math

import pytest

from datagen.backends import Request, SamplingParams
from datagen.errors import BadInput
from tests.backend_checks import check_block_eos, check_stop_reason

pytestmark = pytest.mark.vllm

CHAT = ({"role": "user", "content": "Name three fruits."},)
SENTENCES = [
    "The capital of France is Paris.",
    "Out of 1400 participants, 400 passed the test.",
    "Write a short poem about the sea, and explain why it rhymes.",
    "def add(a, b):\n    return a + b\n",
]


def test_generate_one_batch_in_input_order(vllm_llm):
    greedy = SamplingParams(temperature=0, max_tokens=12)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, n=2, seed=7, stop=("\n", "."))
    requests = [
        Request(prompt="The capital of France is", params=greedy),
        Request(messages=CHAT, params=sampled),
        Request(prompt="1, 2, 3, 4,", params=SamplingParams(temperature=0, max_tokens=5)),
    ]
    results = vllm_llm.generate(requests)
    assert len(results) == 3
    assert results[0].prompt == "The capital of France is"
    assert results[0].prompt_tokens == len(vllm_llm.tokenize("The capital of France is"))
    assert "Paris" in results[0].completions[0].text
    chat = results[1]
    assert chat.prompt == vllm_llm.render_chat(CHAT) and "<|im_start|>assistant" in chat.prompt
    assert len(chat.completions) == 2
    for completion in chat.completions:
        assert "\n" not in completion.text and "." not in completion.text
        assert 1 <= completion.completion_tokens <= 16
    counted = results[2].completions[0]
    assert (counted.finish_reason, counted.completion_tokens) == ("length", 5)
    assert all(r.latency_s > 0 for r in results)
    # A seed makes sampling repeatable, and n completions are distinct draws (vLLM seeds child i with seed + i).
    again = vllm_llm.generate([requests[1]])[0]
    assert [c.text for c in again.completions] == [c.text for c in chat.completions]
    assert chat.completions[0].text != chat.completions[1].text


def test_ignore_eos_generates_exactly_max_tokens(vllm_llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    (result,) = vllm_llm.generate([Request(messages=CHAT, params=params)], ignore_eos=True)
    assert result.completions[0].completion_tokens == 24


def test_score_returns_finite_logprobs(vllm_llm):
    scored = vllm_llm.score([SENTENCES[0], vllm_llm.tokenize(SENTENCES[1]), "Hi", ""])
    assert list(scored[0].token_ids) == vllm_llm.tokenize(SENTENCES[0])
    assert scored[0].logprobs[0] is None and len(scored[0].logprobs) == len(scored[0].token_ids)
    assert all(math.isfinite(v) and v <= 0 for v in scored[0].logprobs[1:])
    assert list(scored[1].token_ids) == vllm_llm.tokenize(SENTENCES[1])
    assert scored[2].logprobs == (None,) * len(scored[2].token_ids)
    assert scored[3].token_ids == () and scored[3].logprobs == ()


def test_score_agrees_with_transformers(vllm_llm, hf_backend):
    for ours, reference in zip(vllm_llm.score(SENTENCES), hf_backend.score(SENTENCES)):
        assert ours.token_ids == reference.token_ids
        differences = [abs(a - b) for a, b in zip(ours.logprobs[1:], reference.logprobs[1:])]
        assert max(differences) < 0.1, differences


def test_prompt_longer_than_the_context_is_bad_input(vllm_llm):
    too_long = list(range(100, 100 + vllm_llm.max_model_len + 1))
    with pytest.raises(BadInput, match="vLLM refused"):
        vllm_llm.score([too_long])


def test_seeded_prompts_longer_than_one_step_budget(vllm_llm):
    """4 seeded 2.7k-token prompts exceed vLLM's default 4,096 tokens per step on CPU; split across steps, the
    CPU engine used to die rewinding their generators (vllm_backend.CPU_ENGINE_DEFAULTS)."""
    text = " ".join(f"word{i}" for i in range(700))
    requests = [Request(prompt=f"{i} {text}", params=SamplingParams(temperature=0.7, max_tokens=4, seed=i)) for i in range(4)]
    first, again = vllm_llm.generate(requests), vllm_llm.generate(requests)
    assert all(r.prompt_tokens > 2500 for r in first)
    assert [r.completions[0].text for r in first] == [r.completions[0].text for r in again]


def test_stop_reason_names_the_stop_string_and_only_it(vllm_llm):
    check_stop_reason(vllm_llm)


def test_block_eos_never_ends_a_completion(vllm_llm):
    check_block_eos(vllm_llm)
