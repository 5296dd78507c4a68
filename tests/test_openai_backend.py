"""The OpenAI-compatible backend against a real `vllm serve` on loopback (`vllm_server`), serving the
embedded model. Retries and round-robin are checked through a small local proxy in front of that
server which fails the first requests on purpose; every answer still comes from the real model."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from datagen.backends import Request, SamplingParams
from datagen.backends.openai_backend import OpenAIBackend
from datagen.errors import BadInput, DatagenError
from tests.backend_checks import check_block_eos, check_stop_reason

pytestmark = pytest.mark.vllm

CHAT = ({"role": "user", "content": "Name three fruits."},)
SENTENCES = [
    "The capital of France is Paris.",
    "Out of 1400 participants, 400 passed the test.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def openai_backend(vllm_server):
    backend = OpenAIBackend("smollm2-135m", base_urls=vllm_server, concurrency=4)
    yield backend
    backend.close()


@contextlib.contextmanager
def proxy(upstream: str, failures: list[int | str] = ()):
    """A loopback HTTP server that answers its first requests from `failures` (an HTTP status, or "hang"
    to answer only after 2 s) and forwards the rest to `upstream`. Yields (url, paths it was asked for)."""
    failures, seen = list(failures), []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen.append(self.path)
                failure = failures.pop(0) if failures else None
            if failure == "hang":
                time.sleep(2)
            if failure is not None:
                self.send_response(503 if failure == "hang" else failure)
                self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(json.dumps({"error": {"message": f"scripted {failure}"}}).encode())
                return
            answer = httpx.post(upstream + self.path, content=body, headers={"content-type": "application/json"}, timeout=60)
            self.send_response(answer.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_completions_and_chat(openai_backend):
    greedy = SamplingParams(temperature=0, max_tokens=12)
    sampled = SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=7, stop=("\n", "."))
    requests = [
        Request(prompt="The capital of France is", params=greedy),
        Request(messages=CHAT, params=sampled),
        Request(prompt="1, 2, 3, 4,", params=SamplingParams(temperature=0, max_tokens=5)),
    ]
    results = openai_backend.generate(requests)
    assert results[0].prompt == "The capital of France is"
    assert results[0].prompt_tokens == len(openai_backend.tokenize("The capital of France is"))
    assert "Paris" in results[0].completions[0].text
    chat = results[1]
    assert chat.prompt == openai_backend.render_chat(CHAT)
    assert chat.prompt_tokens == len(openai_backend.tokenizer(chat.prompt, add_special_tokens=False)["input_ids"])
    assert len(chat.completions) == 2 and chat.completions[0].text != chat.completions[1].text
    assert all("\n" not in c.text and "." not in c.text for c in chat.completions)
    assert (results[2].completions[0].finish_reason, results[2].completions[0].completion_tokens) == ("length", 5)


def test_same_text_as_the_in_process_engine(openai_backend, vllm_llm):
    """Greedy decoding through HTTP and in process: the same engine, the same text."""
    requests = [Request(prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=12)),
                Request(messages=CHAT, params=SamplingParams(temperature=0, max_tokens=12))]  # fmt: skip
    over_http = openai_backend.generate(requests)
    in_process = vllm_llm.generate(requests)
    assert [r.completions for r in over_http] == [r.completions for r in in_process]
    assert [r.prompt for r in over_http] == [r.prompt for r in in_process]


def test_score_agrees_with_transformers(openai_backend, hf_backend):
    scored = openai_backend.score(SENTENCES + [openai_backend.tokenize(SENTENCES[0]), "Hi"])
    for ours, reference in zip(scored, hf_backend.score(SENTENCES)):
        assert ours.token_ids == reference.token_ids and ours.logprobs[0] is None
        differences = [abs(a - b) for a, b in zip(ours.logprobs[1:], reference.logprobs[1:])]
        assert max(differences) < 0.1, differences
    assert scored[3] == scored[0]
    assert scored[4].logprobs == (None,) * len(scored[4].token_ids)


def test_without_a_local_tokenizer_the_server_tokenizes(vllm_server, openai_backend):
    notes = []
    remote = OpenAIBackend("smollm2-remote", base_urls=vllm_server + "/v1/", notify=notes.append)
    try:
        assert remote.tokenizer is None
        blocked = SamplingParams(temperature=0, max_tokens=2, block_eos=True)
        remote.generate([Request(prompt="Hi", params=blocked)] * 2)
        assert len(notes) == 1 and notes[0].startswith("end-of-sequence is not blocked for 'smollm2-remote'")
        assert remote.tokenize(SENTENCES[1]) == openai_backend.tokenize(SENTENCES[1])
        (result,) = remote.generate([Request(messages=CHAT, params=SamplingParams(temperature=0, max_tokens=4))])
        assert json.loads(result.prompt) == list(CHAT)
        scored = remote.score([SENTENCES[0]])[0]
        assert all(math.isfinite(v) for v in scored.logprobs[1:])
        with pytest.raises(DatagenError, match="needs its tokenizer"):
            remote.render_chat(CHAT)
    finally:
        remote.close()


def test_two_base_urls_take_turns(vllm_server):
    with proxy(vllm_server) as (first, seen_first), proxy(vllm_server) as (second, seen_second):
        backend = OpenAIBackend("smollm2-135m", base_urls=[first, second], concurrency=2)
        try:
            params = SamplingParams(temperature=0, max_tokens=3)
            results = backend.generate([Request(prompt=f"{i} + {i} =", params=params) for i in range(4)])
        finally:
            backend.close()
    assert len(results) == 4 and all(r.completions[0].completion_tokens == 3 for r in results)
    assert len(seen_first) == len(seen_second) == 2


def test_retries_429_5xx_and_timeouts_then_succeeds(vllm_server):
    with proxy(vllm_server, failures=[429, 503, "hang", 500]) as (url, seen):
        backend = OpenAIBackend("smollm2-135m", base_urls=url, timeout=1, max_retries=4, retry_backoff=0.01)
        try:
            (result,) = backend.generate([Request(prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=3))])
        finally:
            backend.close()
    assert len(seen) == 5 and result.completions[0].completion_tokens == 3


def test_retries_run_out_with_a_clear_error(vllm_server):
    with proxy(vllm_server, failures=[503, 503]) as (url, seen):
        backend = OpenAIBackend("smollm2-135m", base_urls=url, max_retries=1, retry_backoff=0.01)
        with pytest.raises(DatagenError, match=r"after 2 attempts .*HTTP 503: scripted 503"):
            backend.generate([Request(prompt="x", params=SamplingParams(max_tokens=2))])
        backend.close()
    assert len(seen) == 2


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend("smollm2-135m", base_urls=f"http://127.0.0.1:{port}", max_retries=2, retry_backoff=0.01)
    with pytest.raises(DatagenError, match=rf"after 3 attempts \(last: http://127.0.0.1:{port}/v1/completions: ConnectError") as err:
        backend.generate([Request(prompt="x")])
    assert "check that it runs" in str(err.value)
    backend.close()


def test_bad_requests_fail_at_once(openai_backend):
    with pytest.raises(BadInput, match="max_tokens"):
        openai_backend.generate([Request(prompt="x", params=SamplingParams(max_tokens=100_000))])
    wrong_model = OpenAIBackend("no-such-model", base_urls=openai_backend.base_urls, tokenizer="smollm2-135m")
    with pytest.raises(DatagenError, match="does not exist"):
        wrong_model.generate([Request(prompt="x", params=SamplingParams(max_tokens=2))])
    wrong_model.close()
    with pytest.raises(BadInput, match="http://"):
        OpenAIBackend("m", base_urls="localhost:8000")


@contextlib.contextmanager
def dead_server():
    """A loopback port that accepts connections and closes them at once (a crashed server behind a live
    socket); yields (url, number of connections so far)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    connections = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", lambda: len(connections)
    finally:
        listener.close()


def test_a_dead_server_goes_out_of_rotation(vllm_server):
    """One of two servers is dead: it gets one request (two if both threads pick it before the first fails), is
    out of rotation after that, and every request is answered by the live one without waiting (a retry after a
    backoff would take >= 10 s here)."""
    notes = []
    with dead_server() as (dead, connections):
        backend = OpenAIBackend("smollm2-135m", base_urls=[dead, vllm_server], concurrency=2, max_retries=1,
                                retry_backoff=20, notify=notes.append)  # fmt: skip
        try:
            started = time.perf_counter()
            results = backend.generate([Request(prompt=f"{i} + {i} =", params=SamplingParams(temperature=0, max_tokens=2)) for i in range(12)])
            elapsed = time.perf_counter() - started
        finally:
            backend.close()
        assert 1 <= connections() <= 2
    assert len(results) == 12 and all(r.completions[0].completion_tokens == 2 for r in results)
    (note,) = notes  # the reason is httpx's: a RemoteProtocolError, or a ReadError if the reset comes first
    assert note.startswith(f"{dead} is out of rotation for 30 s (") and note.endswith("); its requests go to the other servers")
    assert elapsed < 10 + 60  # 60: 12 short generations on a loaded CPU


def test_the_progress_line_says_a_server_is_out(vllm_server, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + {i} ="}) + "\n" for i in range(3)))
    with dead_server() as (dead, connections):
        result = subprocess.run(
            [sys.executable, "-m", "datagen.cli", "generate", "prompts.jsonl", "--backend", "openai", "--model", "smollm2-135m",
             "--base-url", dead.replace("http://", "http://user:pw@"), "--base-url", vllm_server, "--concurrency", "1",
             "--max-tokens", "2", "--json"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert connections() == 1
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    port = dead.rpartition(":")[2]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    (note,) = notes
    assert note.startswith(f"note: http://***:***@127.0.0.1:{port} is out of rotation for 30 s (")
    assert note.endswith("); its requests go to the other servers") and "pw" not in result.stderr


def test_stop_reason_names_the_stop_string_and_only_it(openai_backend):
    check_stop_reason(openai_backend)


def test_block_eos_never_ends_a_completion(openai_backend):
    check_block_eos(openai_backend)
