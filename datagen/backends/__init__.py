"""Generation backends: one small interface, three real implementations.

Every pipeline talks to a `Backend`:

    backend = load_backend("transformers", model="smollm2-135m")
    results = backend.generate([Request(prompt="1. Write a poem", params=SamplingParams(max_tokens=64))])
    scored = backend.score(["The capital of France is Paris."])

`generate` returns one `Result` per request, in input order (like vLLM's `LLM.generate`);
`score` returns the model's log-probability of every token of each sequence.
Heavy imports (torch, vllm, httpx) live inside the implementation modules.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from datagen.errors import BadInput, MissingExtra


MAX_COUNT = 2**31 - 1
"""Largest max_tokens a backend can take: a C int in torch, vLLM and the servers behind the openai backend."""
MAX_N = 128
"""Most completions per request: the OpenAI API's limit for `n`, far above the papers' needs."""
LOOP_REPEATS = 4
"""`SamplingParams.loop_ngram`: the occurrence of one n-gram that ends a completion as a loop."""
MAX_SEED = 2**63 - 1
"""Seeds go to torch.manual_seed and vLLM's per-request generators, which take a signed 64-bit integer."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by all backends (names follow vLLM's SamplingParams).

    Every value is checked here, on construction, so a bad option fails before a model loads or a run is stored."""

    temperature: float = 1.0
    """0 means greedy decoding; finite and >= 0."""
    top_p: float = 1.0
    """In (0, 1]."""
    max_tokens: int = 256
    """Most new tokens per completion, 1 to MAX_COUNT."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; the string itself is not returned."""
    n: int = 1
    """Completions per request, 1 to MAX_N."""
    seed: int | None = None
    """Makes sampling repeatable on the same backend and hardware; 0 to MAX_SEED."""
    presence_penalty: float = 0.0
    """In [-2, 2] (OpenAI API and vLLM); every backend applies it (transformers as vLLM defines it: `OutputPenalties`)."""
    frequency_penalty: float = 0.0
    """In [-2, 2] (OpenAI API and vLLM); every backend applies it (transformers as vLLM defines it: `OutputPenalties`)."""
    loop_ngram: int = 0
    """End a completion once the `loop_ngram` tokens just generated occur for the LOOP_REPEATS-th time in it: it is
    looping (degenerate repetition), and the rest would be more of the same. Its finish_reason is then "length" (cut
    before its end). 0: off. transformers only, whose padded batch runs until its longest completion ends, so one
    runaway sequence holds up the whole batch; vllm and openai schedule each sequence on its own and ignore it (ours,
    for Alpaca's 3,072-token requests on the CPU default)."""
    block_eos: bool = False
    """Forbid the model's end-of-sequence token(s), so a completion ends only at a stop string or max_tokens (Stanford
    Alpaca's `logit_bias={"50256": -100}` on GPT-3's <|endoftext|>). transformers suppresses them (logit -inf);
    vllm and openai send `logit_bias` -100 (the API's floor) on each; openai needs a local tokenizer to know their ids
    and without one sends nothing (`OpenAIBackend` says so once through `notify`)."""

    def __post_init__(self) -> None:
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise BadInput(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise BadInput(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_int("max_tokens", self.max_tokens, 1, MAX_COUNT)
        check_int("n", self.n, 1, MAX_N)
        check_int("loop_ngram", self.loop_ngram, 0, MAX_COUNT)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and -2 <= value <= 2):
                raise BadInput(f"{name} must be in [-2, 2], got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, low: int, high: int) -> None:
    """BadInput naming the option unless value is an integer in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadInput(f"{name} must be an integer from {low} to {high:,}, got {value!r}")


Message = dict[str, str]


def ends_in_loop(token_ids: Sequence[int], ngram: int, repeats: int = LOOP_REPEATS) -> bool:
    """Whether the last `ngram` tokens occur `repeats` times or more in token_ids (`SamplingParams.loop_ngram`)."""
    if ngram < 1 or len(token_ids) < ngram:
        return False
    tail, count = list(token_ids[-ngram:]), 0
    for start in range(len(token_ids) - ngram + 1):
        count += list(token_ids[start : start + ngram]) == tail
    return count >= repeats


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids that end a sequence: the tokenizer's EOS and the model's generation config's (SmolLM2-Instruct: 2,
    <|im_end|>; Llama 3 lists several), in ascending order. generation_config: a GenerationConfig, or a model folder
    whose generation_config.json gives it (none there: the tokenizer's alone). The file's eos_token_id is read as JSON,
    the value GenerationConfig.from_pretrained copies from it, without importing transformers' generation module
    (and torch with it: ~2.4 s for a process that only tokenizes, as an openai-backend run)."""
    if isinstance(generation_config, (str, os.PathLike)) and Path(generation_config).is_dir():
        try:
            generation_eos = json.loads((Path(generation_config) / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError):
            generation_eos = None
    elif isinstance(generation_config, (str, os.PathLike)):  # a hub id (DATAGEN_ALLOW_HUB=1)
        from transformers import GenerationConfig

        try:
            generation_eos = GenerationConfig.from_pretrained(generation_config).eos_token_id
        except OSError:
            generation_eos = None
    else:
        generation_eos = getattr(generation_config, "eos_token_id", None)
    ids = set()
    for value in (tokenizer.eos_token_id, generation_eos):
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return sorted(ids)


@dataclass(frozen=True)
class Request:
    """A raw prompt or chat messages (rendered with the model's chat template), plus sampling settings."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadInput("a request needs exactly one of prompt or messages")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    """'length' when max_tokens cut the completion, or the transformers backend cut a loop (`loop_ngram`)."""
    completion_tokens: int
    stop_reason: str | None = None
    """The stop string that ended the completion; None when it ended at the end-of-sequence token or at
    max_tokens, or the server did not say (vLLM's `stop_reason`). Toolformer needs it to tell a call closed by
    </API> from one the model ended (the paper discards those, footnote 2)."""


@dataclass(frozen=True)
class Result:
    """The outcome of one request: its exact prompt text and n completions."""

    prompt: str
    """The text the model saw (chat template applied), kept for provenance."""
    prompt_tokens: int
    completions: tuple[Completion, ...]
    latency_s: float
    """Wall time of the batch call this request was part of."""


@dataclass(frozen=True)
class ScoredSequence:
    """Per-token log-probabilities of a sequence under the model."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    """logprobs[i] = log p(token_i | tokens before i); None for the first token, which has no context."""


PROBE_TOP_K = 20
"""Top log-probabilities per position that vllm and openai read for `next_token_logprobs`: vLLM's default
max_logprobs. At most 19 tokens can have p > 1/20, so every token above Toolformer's tau_s = 0.05 is seen."""


class Backend(Protocol):
    name: str
    model: str

    def generate(self, requests: Sequence[Request]) -> list[Result]: ...

    def score(self, sequences: Sequence[str | Sequence[int]]) -> list[ScoredSequence]:
        """Text is tokenized with the model's tokenizer (with its BOS token if it adds one); token ids are used as given."""
        ...

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]], token_id: int) -> list[tuple[float | None, ...]]:
        """For each token sequence, values[i] = log p(token_id | sequence[:i]): how likely `token_id` was in
        place of token i, for every i at once (one forward pass per sequence; Toolformer's p_i of its <API> token).

        None at i = 0 (no context). The transformers backend is exact everywhere; vllm and openai see only the
        top-K log-probabilities of each position (K = PROBE_TOP_K) and give None where token_id is not among
        them, which means p < 1/K: exact for any decision "p > t" with t >= 1/K."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The model's chat template applied to messages, ready for the assistant's turn."""
        ...

    def close(self) -> None: ...


class BackendName(str, enum.Enum):
    auto = "auto"
    transformers = "transformers"
    vllm = "vllm"
    openai = "openai"


def resolve_backend_name(name: BackendName | str) -> BackendName:
    """`auto` picks vllm when it is installed and a GPU is present, else transformers."""
    name = BackendName(name)
    if name is not BackendName.auto:
        return name
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return BackendName.vllm
    return BackendName.transformers


def load_backend(name: BackendName | str, model: str, **options) -> Backend:
    """Build a backend by name. `model` is a short name of an embedded model, a local folder or a hub id;
    for `openai` it is the model name the server serves and `options` carries `base_urls`."""
    name = resolve_backend_name(name)
    if name is BackendName.transformers:
        from datagen.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, **options)
    if name is BackendName.vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise MissingExtra("vllm", "vllm") from None
        from datagen.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, **options)
    from datagen.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(model, **options)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string; True if one was found."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def mask_url(url: str) -> str:
    """The URL with any password (and a user name that may be a token) replaced by ***: what messages and the
    store show. "http://user:secret@host:8000" -> "http://***:***@host:8000"."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # "user:pw@host:8000" without a scheme, as a user may mistype it
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, host = authority.rpartition("@")
    masked = "***:***" if ":" in userinfo else "***"
    return f"{scheme}{sep}{masked}@{host}{slash}{path}"


@dataclass(frozen=True)
class ServerOptions:
    """How to talk to OpenAI-compatible servers (`--backend openai`): the CLI's --timeout, --concurrency and
    --api-key. None: the backend's default (120 s, 8 requests in flight, $OPENAI_API_KEY). The API key goes to the
    backend only, never to the store."""

    timeout: float | None = None
    """Seconds for one HTTP request (default 120)."""
    concurrency: int | None = None
    """Requests in flight at once, over all servers (default 8)."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as a Bearer token; default $OPENAI_API_KEY."""

    def __post_init__(self) -> None:
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise BadInput(f"--timeout must be a number of seconds > 0, got {self.timeout}")
        if self.concurrency is not None and not 1 <= self.concurrency <= 4096:
            raise BadInput(f"--concurrency must be from 1 to 4096, got {self.concurrency}")

    def backend_options(self) -> dict[str, Any]:
        return {k: v for k in ("timeout", "concurrency", "api_key") if (v := getattr(self, k)) is not None}


def make_backend(name: BackendName | str, model: str, base_urls: Sequence[str] | None = None, server: ServerOptions | None = None,
                 notify: Callable[[str], None] | None = None) -> Backend:  # fmt: skip
    """The backend a command's or a library call's options ask for: the openai backend needs base URLs (and takes
    `server`'s options), the others refuse them. A run's config and errors show base URLs with credentials masked."""
    name = resolve_backend_name(name)
    if name is BackendName.openai:
        if not base_urls:
            raise BadInput("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        options = server.backend_options() if server else {}
        return load_backend(name, model, base_urls=list(base_urls), notify=notify, **options)
    if base_urls:
        raise BadInput("--base-url is only for --backend openai")
    return load_backend(name, model)
