"""OpenAI-compatible HTTP backend: `vllm serve`, and any other server that speaks /v1/completions
and /v1/chat/completions.

    backend = OpenAIBackend("smollm2-135m", base_urls=["http://10.0.0.1:8000", "http://10.0.0.2:8000"])

Raw prompts go to /v1/completions, chat messages to /v1/chat/completions. Requests run on a thread
pool (`concurrency` in flight, so the server batches them) and take turns across `base_urls`, one
server per data-parallel replica; a request that fails with 429, 5xx, a timeout or a connection
error is retried with exponential backoff and jitter on the next server. A server that fails with a
timeout, a connection error or a 5xx is taken out of rotation for a while (a circuit breaker: 30 s, then
doubling up to 5 min while it keeps failing), and the request goes at once to another server; when the
time is up it is tried again. Credentials in a base URL (http://user:password@host) are sent but
never shown: messages name servers by `mask_url`. `score` asks the completions
endpoint to echo token-id prompts with their log-probabilities, so tokens align exactly with the ids.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import httpx

from datagen import models
from datagen.backends import Completion, Message, Request, Result, SamplingParams, ScoredSequence, eos_token_ids, mask_url
from datagen.errors import BadInput, DatagenError

MAX_BACKOFF_S = 30.0
BREAKER_COOLDOWN_S = 30.0
"""How long a failing server first stays out of rotation; each further failure doubles it, to at most 300 s."""
MAX_COOLDOWN_S = 300.0


class Cancelled(Exception):
    """Another request of the same call failed for good; this one stops retrying."""


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_urls: list[str] | str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120,
        max_retries: int = 5,
        tokenizer: str | None = None,
        retry_backoff: float = 0.5,
        notify: Callable[[str], None] | None = None,
    ):
        """model: the name the server serves (`--served-model-name`).
        base_urls: one or more servers, "http://host:port" or "http://host:port/v1"; requests take turns.
        api_key: sent as a Bearer token; default $OPENAI_API_KEY, else "EMPTY" (vLLM without --api-key accepts any).
        concurrency: requests in flight at once, over all servers.
        timeout: seconds for one HTTP request; a generation of many tokens needs a long one.
        max_retries: extra attempts after a 429, 5xx, timeout or connection error; the waits double from
        retry_backoff seconds (to at most 30 s), with jitter so that many clients do not retry in step,
        and a server's Retry-After header wins.
        tokenizer: a local tokenizer (embedded model name, HF folder or hub id) to render chats and count and
        score tokens; default: the model's own when `model` is an embedded model or a local folder, else the
        server's /tokenize endpoint (vLLM has one) and chats stored as their JSON messages.
        notify: called with one line when a server goes out of rotation or comes back (the CLI prints it)."""
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise BadInput("the openai backend needs at least one base URL, e.g. http://127.0.0.1:8000")
        self.base_urls = [server_root(u) for u in urls]
        if concurrency < 1 or max_retries < 0 or not timeout > 0:
            raise BadInput(f"need concurrency >= 1, max_retries >= 0 and timeout > 0; got {concurrency}, {max_retries}, {timeout}")
        self.servers = [mask_url(u) for u in self.base_urls]
        """The base URLs as messages and the store show them (credentials masked)."""
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = httpx.Client(
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="openai-backend")
        self.notify = notify or (lambda message: None)
        self._turn = 0
        self._breakers = {url: Breaker() for url in self.base_urls}
        self._turns_lock = threading.Lock()
        self.tokenizer = load_tokenizer(tokenizer, model)
        self.eos_ids = eos_token_ids(self.tokenizer, self.tokenizer.name_or_path) if self.tokenizer is not None else []
        """Blocked by `SamplingParams.block_eos` (logit_bias); unknown without a local tokenizer."""
        self._told_eos = False

    # -- text and tokens ---------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Message]) -> str:
        if self.tokenizer is None:
            raise DatagenError(f"rendering a chat for '{self.model}' needs its tokenizer: pass tokenizer=<model folder or hub id>")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]
        body = {"model": self.model, "prompt": text, "add_special_tokens": True}
        return self._post("/tokenize", body, threading.Event())["tokens"]

    # -- generation --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """One HTTP request per Request, `concurrency` at a time; results in input order.
        latency_s is the wall time of that request, retries included."""
        return self._map(self._generate_one, requests)

    def _generate_one(self, request: Request, cancelled: threading.Event) -> Result:
        params = request.params
        body = sampling_body(params) | {"model": self.model}
        if params.block_eos:
            if self.eos_ids:
                body["logit_bias"] = {str(i): -100 for i in self.eos_ids}
            elif not self._told_eos:
                self._told_eos = True
                self.notify(f"end-of-sequence is not blocked for '{self.model}': its token id is unknown without a local "
                            "tokenizer (pass tokenizer=<model folder or hub id>), so the model may end a response early")  # fmt: skip
        if request.prompt is not None:
            path, prompt = "/v1/completions", request.prompt
            body["prompt"] = request.prompt
        else:
            path = "/v1/chat/completions"
            body["messages"] = [dict(m) for m in request.messages]
            # The exact text the model saw, for provenance; without a local tokenizer only the messages are known.
            prompt = self.render_chat(request.messages) if self.tokenizer is not None else json.dumps(body["messages"])
        started = time.perf_counter()
        answer = self._post(path, body, cancelled)
        latency = time.perf_counter() - started
        choices = sorted(self._choices(answer, path), key=lambda c: c.get("index", 0))
        texts = [c["text"] if "text" in c else (c["message"].get("content") or "") for c in choices]
        usage = answer.get("usage") or {}
        completions = tuple(
            Completion(
                text=text,
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                completion_tokens=self._completion_tokens(text, choice, usage, params),
                stop_reason=choice.get("stop_reason") if isinstance(choice.get("stop_reason"), str) else None,
            )
            for text, choice in zip(texts, choices)
        )
        return Result(prompt=prompt, prompt_tokens=usage.get("prompt_tokens", 0), completions=completions, latency_s=latency)

    def _completion_tokens(self, text: str, choice: dict, usage: dict, params: SamplingParams) -> int:
        """The API reports tokens per request, not per choice: exact for n=1 and for choices cut by
        max_tokens; otherwise the text is counted with the local tokenizer, or the total shared out."""
        if params.n == 1 and "completion_tokens" in usage:
            return usage["completion_tokens"]
        if choice.get("finish_reason") == "length":
            return params.max_tokens
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return usage.get("completion_tokens", 0) // params.n

    # -- scoring -----------------------------------------------------------------------------

    def score(self, sequences: Sequence[str | Sequence[int]]) -> list[ScoredSequence]:
        """The completions endpoint with the token ids as prompt, echo=True, logprobs=0, max_tokens=0:
        vLLM answers with the log-probability of each prompt token (None for the first). Servers that
        generate a token anyway (max_tokens=1 semantics) return one more entry, which is dropped."""
        ids = self._map(lambda s, cancelled: self.tokenize(s) if isinstance(s, str) else list(s), sequences)
        return self._map(self._score_one, ids)

    def _score_one(self, token_ids: list[int], cancelled: threading.Event) -> ScoredSequence:
        if len(token_ids) < 2:
            return ScoredSequence(tuple(token_ids), (None,) * len(token_ids))
        body = {"model": self.model, "prompt": token_ids, "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0}
        answer = self._post("/v1/completions", body, cancelled)
        logprobs = (self._choices(answer, "/v1/completions")[0].get("logprobs") or {}).get("token_logprobs") or []
        values = logprobs[1 : len(token_ids)]
        if len(values) != len(token_ids) - 1 or any(v is None for v in values):
            raise DatagenError(
                f"the server at {', '.join(self.servers)} did not return prompt log-probabilities for echo=True "
                f"(got {len(logprobs)} values for {len(token_ids)} tokens); scoring needs a server like vLLM that does"
            )
        return ScoredSequence(tuple(token_ids), (None, *values))

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]], token_id: int) -> list[tuple[float | None, ...]]:
        """echo=True with logprobs=PROBE_TOP_K and vLLM's return_tokens_as_token_ids: the top-K log-probabilities
        of every prompt position, keyed "token_id:N"; None where token_id is not among them (p < 1/K)."""
        return self._map(lambda ids, cancelled: self._probe_one(list(ids), token_id, cancelled), sequences)

    def _probe_one(self, token_ids: list[int], token_id: int, cancelled: threading.Event) -> tuple[float | None, ...]:
        from datagen.backends import PROBE_TOP_K

        if len(token_ids) < 2:
            return (None,) * len(token_ids)
        body = {"model": self.model, "prompt": token_ids, "echo": True, "logprobs": PROBE_TOP_K, "max_tokens": 0,
                "temperature": 0, "return_tokens_as_token_ids": True}  # fmt: skip
        answer = self._post("/v1/completions", body, cancelled)
        tops = ((self._choices(answer, "/v1/completions")[0].get("logprobs") or {}).get("top_logprobs") or [])[1 : len(token_ids)]
        if len(tops) != len(token_ids) - 1 or any(not top or not next(iter(top)).startswith("token_id:") for top in tops):
            raise DatagenError(
                f"the server at {', '.join(self.servers)} did not return top log-probabilities of prompt tokens as token ids "
                "(echo=True, logprobs, return_tokens_as_token_ids); the probability of one token at every position "
                "needs a server like vLLM that does"
            )
        key = f"token_id:{token_id}"
        return (None, *(top.get(key) for top in tops))

    def _choices(self, answer, path: str) -> list[dict]:
        """The answer's choices (each with a "text" or a "message"), or an error naming the server and what came back."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if isinstance(choices, list) and choices and all(isinstance(c, dict) and ("text" in c or isinstance(c.get("message"), dict)) for c in choices):
            return choices
        raise DatagenError(
            f"the server at {', '.join(self.servers)} answered {path} with 200 but without a 'choices' list "
            f"({json.dumps(answer)[:200]}): is --base-url an OpenAI-compatible server, such as `vllm serve`?"
        )

    # -- HTTP --------------------------------------------------------------------------------

    def _map(self, work: Callable, items: Sequence) -> list:
        """Run work(item, cancelled) on the pool; the first failure cancels the rest and is raised."""
        cancelled = threading.Event()
        futures = [self.pool.submit(work, item, cancelled) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()
            return [f.result() for f in futures]
        finally:
            cancelled.set()
            for future in futures:
                future.cancel()

    def _next_server(self) -> tuple[str, bool]:
        """The next server in turn that is in rotation (or whose time out of it is up), and whether another
        server is in rotation too. With every server out, the one that comes back first."""
        with self._turns_lock:
            now = time.monotonic()
            count = len(self.base_urls)
            order = [self.base_urls[(self._turn + i) % count] for i in range(count)]
            usable = [url for url in order if self._breakers[url].usable(now)]
            url = usable[0] if usable else min(order, key=lambda u: self._breakers[u].down_until)
            self._turn = (self.base_urls.index(url) + 1) % count
            return url, len(usable) > 1

    def _server_failed(self, server: str, reason: str) -> None:
        with self._turns_lock:
            cooldown = self._breakers[server].fail(time.monotonic())
        if cooldown is not None and len(self.base_urls) > 1:
            self.notify(f"{mask_url(server)} is out of rotation for {cooldown:g} s ({reason}); its requests go to the other servers")

    def _server_answered(self, server: str) -> None:
        with self._turns_lock:
            was_out = self._breakers[server].succeed()
        if was_out and len(self.base_urls) > 1:
            self.notify(f"{mask_url(server)} answers again: back in rotation")

    def _post(self, path: str, body: dict, cancelled: threading.Event) -> dict:
        failures = []
        for attempt in range(self.max_retries + 1):
            if cancelled.is_set():
                raise Cancelled
            server, others = self._next_server()
            url, shown = server + path, mask_url(server) + path
            retry_after, server_down = None, False
            try:
                response = self.client.post(url, json=body)
            except httpx.TimeoutException:
                failures.append(f"{shown}: no answer within {self.timeout:g} s")
                server_down = True
            except httpx.TransportError as err:
                failures.append(f"{shown}: {type(err).__name__}: {mask_text(str(err), server)}")
                server_down = True
            else:
                if response.status_code == 200:
                    try:
                        answer = response.json()
                    except ValueError:
                        raise DatagenError(f"{shown}: answered 200 with a body that is not JSON: {response.text[:200]!r}") from None
                    self._server_answered(server)
                    return answer
                message = f"{shown}: HTTP {response.status_code}: {error_message(response)}"
                if response.status_code != 429 and response.status_code < 500:
                    raise request_error(response.status_code, message)
                failures.append(message)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                server_down = response.status_code >= 500
            if server_down:
                self._server_failed(server, failures[-1].removeprefix(f"{shown}: "))
            if attempt < self.max_retries:
                # A server that is down is no reason to wait: another one in rotation takes the request now.
                if server_down and others:
                    continue
                delay = self.retry_backoff * 2**attempt
                delay = min(MAX_BACKOFF_S, retry_after if retry_after is not None else delay / 2 + random.uniform(0, delay / 2))
                if cancelled.wait(delay):
                    raise Cancelled
        raise DatagenError(
            f"no usable answer from the OpenAI-compatible server after {len(failures)} attempts "
            f"(last: {failures[-1]}); check that it runs and that --base-url is right"
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class Breaker:
    """One server's circuit breaker: out of rotation until `down_until` after a failure, the wait doubling
    (BREAKER_COOLDOWN_S to MAX_COOLDOWN_S) while it keeps failing; one answer puts it back."""

    def __init__(self) -> None:
        self.down_until = 0.0
        self.cooldown = 0.0

    def usable(self, now: float) -> bool:
        return now >= self.down_until

    def fail(self, now: float) -> float | None:
        """Take the server out; the new cooldown, or None if it was already out (a request sent before)."""
        if now < self.down_until:
            return None
        self.cooldown = min(MAX_COOLDOWN_S, self.cooldown * 2) if self.cooldown else BREAKER_COOLDOWN_S
        self.down_until = now + self.cooldown
        return self.cooldown

    def succeed(self) -> bool:
        """Back in rotation; True if it had been out."""
        was_out = self.cooldown > 0
        self.down_until, self.cooldown = 0.0, 0.0
        return was_out


def server_root(url: str) -> str:
    """"http://host:8000/v1/" and "http://host:8000" both name the server at http://host:8000."""
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise BadInput(f"base URL '{mask_url(url)}' must start with http:// or https://")
    try:
        httpx.URL(root)
    except httpx.InvalidURL as err:
        raise BadInput(f"base URL '{mask_url(url)}' is not a valid URL: {err}") from None
    return root.removesuffix("/v1")


def mask_text(text: str, url: str) -> str:
    """`text` (an error from httpx) with the credentials of `url` masked wherever they appear."""
    _, _, rest = url.partition("://")
    authority = rest.partition("/")[0]
    userinfo = authority.rpartition("@")[0]
    return text.replace(userinfo, "***") if userinfo else text


def sampling_body(params: SamplingParams) -> dict:
    body = dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, n=params.n)
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    return body


def error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI and vLLM put them in {"error": {"message": ...}}."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text[:300] or response.reason_phrase)


def request_error(status: int, message: str) -> DatagenError:
    """A 4xx other than 429 will not get better by retrying."""
    if status in (400, 422):
        return BadInput(message)
    if status in (401, 403):
        return DatagenError(f"{message}; set OPENAI_API_KEY (or api_key) to a key the server accepts")
    return DatagenError(message)


def parse_retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare from inference servers; use our own backoff
        return None


def load_tokenizer(tokenizer: str | None, model: str):
    """The tokenizer named, else the model's own when it is local, else None (the server tokenizes)."""
    name = tokenizer
    if name is None and (model in models.EMBEDDED_MODELS or Path(model).expanduser().is_dir()):
        name = model
    if name is None:
        return None
    return models.load_tokenizer(name)
