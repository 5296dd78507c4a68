"""The transformers backend on the real embedded model."""

from __future__ import annotations

import math

import pytest
import torch

from datagen.backends import Request, SamplingParams, apply_stop, ends_in_loop
from datagen.errors import BadInput
from tests.backend_checks import check_block_eos, check_stop_reason

CHAT = ({"role": "user", "content": "Name three fruits."},)


def test_generate_batch_keeps_input_order_and_counts(hf_backend):
    greedy = SamplingParams(temperature=0, max_tokens=12)
    requests = [
        Request(prompt="The capital of France is", params=greedy),
        Request(messages=CHAT, params=greedy),
        Request(prompt="1, 2, 3, 4,", params=SamplingParams(temperature=0, max_tokens=5)),
    ]
    results = hf_backend.generate(requests)
    assert [r.prompt for r in results][0] == "The capital of France is"
    assert results[1].prompt == hf_backend.render_chat(CHAT) and "<|im_start|>assistant" in results[1].prompt
    assert results[0].prompt_tokens == len(hf_backend.tokenize("The capital of France is"))
    assert "Paris" in results[0].completions[0].text
    assert results[2].completions[0].finish_reason == "length"
    assert results[2].completions[0].completion_tokens == 5
    # Batched results equal one-at-a-time results under greedy decoding (left padding is right).
    alone = hf_backend.generate([requests[0]])[0]
    assert alone.completions[0].text == results[0].completions[0].text


def test_sampling_n_seed_and_stop(hf_backend):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, n=3, seed=7, stop=("\n",))
    first = hf_backend.generate([Request(messages=CHAT, params=params)])[0]
    again = hf_backend.generate([Request(messages=CHAT, params=params)])[0]
    assert len(first.completions) == 3
    assert [c.text for c in first.completions] == [c.text for c in again.completions]
    for completion in first.completions:
        assert "\n" not in completion.text
        assert completion.finish_reason in ("stop", "length")


def test_score_equals_a_direct_forward_pass(hf_backend):
    text = "Out of 1400 participants, 400 passed the test."
    (scored,) = hf_backend.score([text])
    ids = hf_backend.tokenize(text)
    assert list(scored.token_ids) == ids and scored.logprobs[0] is None
    with torch.no_grad():
        logits = hf_backend.hf_model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(scored.logprobs[1:], expected))
    # Padding in a batch changes nothing: the same sequence scored beside a longer one.
    batch = hf_backend.score([text, text + " It was a hard test with many questions about history."])
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(batch[0].logprobs[1:], expected))
    # Token ids are used as given.
    assert hf_backend.score([ids])[0].logprobs[1:] == scored.logprobs[1:]


def test_apply_stop_cuts_at_the_earliest_stop():
    assert apply_stop("a. b\n3. c", ("\n3.", " b")) == ("a.", True)
    assert apply_stop("abc", ("x",)) == ("abc", False)


def test_bad_sampling_settings_are_bad_input():
    with pytest.raises(BadInput, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(BadInput, match="exactly one of prompt or messages"):
        Request()


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    from datagen.backends.transformers_backend import OutputPenalties

    input_ids = torch.tensor([[5, 1, 1, 2], [5, 5, 3, 3]])  # prompt width 2: generated tokens are [1, 2] and [3, 3]
    scores = torch.zeros(2, 6)
    out = OutputPenalties(2, presence_penalty=1.5, frequency_penalty=0.25)(input_ids, scores)
    assert out[0].tolist() == [0, -1.75, -1.75, 0, 0, 0]  # token 1 (prompt token too) counted once, from the completion
    assert out[1].tolist() == [0, 0, 0, -2.0, 0, 0]  # token 5 is only in the prompt: no penalty
    assert OutputPenalties(4, 2.0, 0.0)(input_ids, scores).equal(scores)


def test_stop_reason_names_the_stop_string_and_only_it(hf_backend):
    check_stop_reason(hf_backend)


def test_block_eos_never_ends_a_completion(hf_backend):
    check_block_eos(hf_backend)


def test_ends_in_loop_counts_the_last_ngram():
    assert ends_in_loop([1, 2] * 4, 2) and not ends_in_loop([1, 2] * 4, 3)  # (1, 2) 4 times; (2, 1, 2) 3 times
    assert not ends_in_loop([1, 2] * 4 + [3], 2) and not ends_in_loop([7] * 9, 0) and not ends_in_loop([7], 2)


def test_loop_ngram_cuts_a_looping_sequence_and_only_it(hf_backend):
    """A runaway sequence held its whole padded batch until max_tokens (issue 19, item 8a): a loop ends its own
    row, as cut ("length"), while the other row of the batch ends by its stop string."""
    params = SamplingParams(temperature=0, max_tokens=64, loop_ngram=6, stop=("4",))
    looping, stopping = hf_backend.generate([Request(prompt="a b a b a b a b a b", params=params),
                                             Request(prompt="1 2 3", params=params)])  # fmt: skip
    loop = looping.completions[0]
    assert loop.finish_reason == "length" and loop.completion_tokens < 30 and loop.text.strip().startswith("a b a b")
    assert ends_in_loop(hf_backend.tokenizer(loop.text, add_special_tokens=False)["input_ids"], 6)
    assert stopping.completions[0].finish_reason == "stop" and stopping.completions[0].stop_reason == "4"
    (free,) = hf_backend.generate([Request(prompt="a b a b a b a b a b", params=SamplingParams(temperature=0, max_tokens=40))])
    assert free.completions[0].completion_tokens == 40  # without loop_ngram the loop runs to max_tokens


def test_backends_on_one_model_share_one_load_until_its_folder_changes(tmp_path, embedded_model_path):
    """One load per process (transformers_backend.load): backends on the same folder and dtype share the model and its
    tokenizer; another dtype, or the folder rewritten in place, is a new load; a model no backend holds is freed."""
    import gc
    import shutil
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    from datagen.backends.transformers_backend import TransformersBackend

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded_model_path / name).exists():
            shutil.copy(embedded_model_path / name, tmp_path / name)
    tiny = dict(vocab_size=49152, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, **tiny)).save_pretrained(tmp_path)
    first, second = TransformersBackend(str(tmp_path)), TransformersBackend(str(tmp_path))
    assert first.hf_model is second.hf_model and first.tokenizer is second.tokenizer
    assert TransformersBackend(str(tmp_path), dtype="bfloat16").hf_model is not first.hf_model
    LlamaForCausalLM(LlamaConfig(hidden_size=32, **tiny)).save_pretrained(tmp_path)  # `train --overwrite` into the folder
    rewritten = TransformersBackend(str(tmp_path))
    assert rewritten.hf_model is not first.hf_model and rewritten.hf_model.config.hidden_size == 32
    shared = weakref.ref(first.hf_model)
    first.close()
    assert shared() is not None  # `second` still runs it
    second.close()
    gc.collect()
    assert shared() is None


def test_padded_batches_share_the_kv_heads_inside_sdpa_with_identical_results(hf_backend, monkeypatch):
    """datagen/backends/gqa_attention.py: a padded batch (a mask) on the CPU takes SDPA's enable_gqa path instead of
    transformers' repeat_kv copy, with logits identical to transformers' own sdpa attention."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from datagen.backends.gqa_attention import GQA_SDPA

    model, tokenizer = hf_backend._loaded.model, hf_backend._loaded.tokenizer
    assert model.config._attn_implementation == GQA_SDPA
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # the embedded model is GQA
    batch = tokenizer(["Name three primary colors, then explain why they are primary.", "Hi"], return_tensors="pt", padding=True)
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # padded: transformers' sdpa would copy the KV heads here

    def no_copy(*args, **kwargs):
        raise AssertionError("repeat_kv called: the KV heads were copied")

    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(sdpa_module, "repeat_kv", no_copy)
            ours = model(**batch).logits
        try:
            model.set_attn_implementation("sdpa")
            reference = model(**batch).logits
        finally:
            model.set_attn_implementation(GQA_SDPA)
    assert torch.equal(ours[keep], reference[keep])
