"""Behaviour every backend must share, checked on each real backend by its own test module."""

from __future__ import annotations

from datagen.backends import Backend, Request, SamplingParams


def check_stop_reason(backend: Backend) -> None:
    """Toolformer keeps a call only if </API> ended it (footnote 2): a stop string is named, EOS and max_tokens are not."""
    greedy = lambda **options: SamplingParams(temperature=0, stop=(" 6", "]"), **options)  # noqa: E731
    by_stop, by_eos, by_length = (r.completions[0] for r in backend.generate([
        Request(prompt="1, 2, 3, 4,", params=greedy(max_tokens=12)),
        Request(messages=({"role": "user", "content": "Is the sky blue? Answer yes or no."},), params=greedy(max_tokens=48)),
        Request(prompt="1, 2, 3, 4,", params=SamplingParams(temperature=0, max_tokens=3, stop=("]",))),
    ]))  # fmt: skip
    assert (by_stop.text, by_stop.finish_reason, by_stop.stop_reason) == (" 5,", "stop", " 6")
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None) and by_eos.text.strip()
    assert (by_length.finish_reason, by_length.stop_reason) == ("length", None)


def check_block_eos(backend: Backend) -> None:
    """Alpaca forbids end-of-sequence (`logit_bias={"50256": -100}` in its generator): a greedy answer that ends with
    EOS runs on to max_tokens when EOS is blocked, and nothing else changes before that point."""
    chat = ({"role": "user", "content": "Is the sky blue? Answer yes or no."},)
    (free,) = backend.generate([Request(messages=chat, params=SamplingParams(temperature=0, max_tokens=48))])
    ended = free.completions[0]
    assert ended.finish_reason == "stop" and ended.completion_tokens < 48  # the model ends this answer itself
    blocked_params = SamplingParams(temperature=0, max_tokens=ended.completion_tokens + 8, block_eos=True)
    (blocked,) = backend.generate([Request(messages=chat, params=blocked_params)])
    kept_going = blocked.completions[0]
    assert (kept_going.finish_reason, kept_going.completion_tokens) == ("length", ended.completion_tokens + 8)
    assert kept_going.text.startswith(ended.text.rstrip())
