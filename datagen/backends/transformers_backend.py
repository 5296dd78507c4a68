"""Local Hugging Face transformers backend: the CPU default.

Batched `generate` with left padding, stop strings and seeds; `score` by one forward pass per
batch of sequences. Presence and frequency penalties, which transformers' sampler lacks, are applied
as vLLM and OpenAI define them (`OutputPenalties`): they are what keep a small model out of loops
under the greedy, penalized decoding of Self-Instruct's instance step.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from datagen import models
from datagen.backends import gqa_attention
from datagen.backends import (
    LOOP_REPEATS,
    Completion,
    Message,
    Request,
    Result,
    SamplingParams,
    ScoredSequence,
    apply_stop,
    ends_in_loop,
    eos_token_ids,
)


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str, *, dtype: str = "float32", batch_size: int = 16, score_token_budget: int = 8192):
        """dtype: float32 is the safe default on CPU (bf16 matmuls are slow on CPUs without AMX/AVX512-BF16).
        batch_size: requests generated together; score_token_budget: padded tokens per scoring forward pass."""
        models.configure_offline()
        self.model = model
        self.path = models.resolve(model)
        self.batch_size = batch_size
        self.score_token_budget = score_token_budget
        self._loaded = load(self.path, dtype)
        self.tokenizer, self.hf_model = self._loaded.tokenizer, self._loaded.model
        self.max_model_len = context_length(self.hf_model.config)
        """The context length, as vLLM's backend names it (Toolformer chunks texts to fit it)."""

    def render_chat(self, messages: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        prompts = [r.prompt if r.prompt is not None else self.render_chat(r.messages) for r in requests]
        results: list[Result | None] = [None] * len(requests)
        # Requests with equal settings share a batch; results go back in input order. Requests that differ only in
        # their seed share one too: a batch samples every row from one generator, seeded by its first request, so
        # rows draw different numbers and the same requests give the same batches and the same samples.
        by_params: dict[SamplingParams, list[int]] = {}
        for index, request in enumerate(requests):
            by_params.setdefault(replace(request.params, seed=None), []).append(index)
        for indices in by_params.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                params = requests[batch[0]].params
                for index, result in zip(batch, self._generate_batch([prompts[i] for i in batch], params)):
                    results[index] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], params: SamplingParams) -> list[Result]:
        started = time.perf_counter()
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p) if params.temperature > 0 else dict(do_sample=False)
        if params.presence_penalty or params.frequency_penalty:
            penalties = OutputPenalties(encoded["input_ids"].shape[1], params.presence_penalty, params.frequency_penalty)
            sampling["logits_processor"] = LogitsProcessorList([penalties])
        if params.loop_ngram:
            sampling["stopping_criteria"] = StoppingCriteriaList([LoopStop(encoded["input_ids"].shape[1], params.loop_ngram)])
        if params.block_eos:
            sampling["suppress_tokens"] = eos_token_ids(self.tokenizer, self.hf_model.generation_config)
        output = self.hf_model.generate(
            **encoded,
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            stop_strings=list(params.stop) or None,
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            top_k=None,
            **sampling,
        )
        latency = time.perf_counter() - started
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        eos = self.hf_model.generation_config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        results = []
        for p, prompt in enumerate(prompts):
            completions = []
            for row in new_tokens[p * params.n : (p + 1) * params.n].tolist():
                completions.append(self._completion(row, params, eos_ids))
            prompt_tokens = int(encoded["attention_mask"][p].sum())
            results.append(Result(prompt=prompt, prompt_tokens=prompt_tokens, completions=tuple(completions), latency_s=latency))
        return results

    def _completion(self, token_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> Completion:
        """Cut a generated row at EOS (which ends padding too) and at the first stop string."""
        ended_by_eos = False
        for position, token in enumerate(token_ids):
            if token in eos_ids or token == self.tokenizer.pad_token_id:
                token_ids, ended_by_eos = token_ids[:position], True
                break
        decoded = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, stopped = apply_stop(decoded, params.stop)
        # A loop cut by LoopStop is padded like a completion that ended: its last n-gram tells it apart.
        looped = not stopped and ends_in_loop(token_ids, params.loop_ngram)
        finish = "stop" if (ended_by_eos or stopped or len(token_ids) < params.max_tokens) and not looped else "length"
        stop_reason = next(s for s in params.stop if decoded[len(text) :].startswith(s)) if stopped else None
        return Completion(text=text, finish_reason=finish, completion_tokens=len(token_ids), stop_reason=stop_reason)

    @torch.inference_mode()
    def score(self, sequences: Sequence[str | Sequence[int]]) -> list[ScoredSequence]:
        ids = [self.tokenize(s) if isinstance(s, str) else list(s) for s in sequences]
        scored: list[ScoredSequence | None] = [None] * len(ids)
        for batch, logits in self._padded_forward(ids):
            for row, i in enumerate(batch):
                sequence = ids[i]
                if len(sequence) < 2:
                    scored[i] = ScoredSequence(tuple(sequence), (None,) * len(sequence))
                    continue
                logprobs = torch.log_softmax(logits[row, : len(sequence) - 1], dim=-1)
                values = logprobs.gather(1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist()
                scored[i] = ScoredSequence(tuple(sequence), (None, *values))
        return scored  # type: ignore[return-value]

    @torch.inference_mode()
    def next_token_logprobs(self, sequences: Sequence[Sequence[int]], token_id: int) -> list[tuple[float | None, ...]]:
        """values[i] = log p(token_id | sequence[:i]) for every i, from one forward pass per sequence."""
        ids = [list(s) for s in sequences]
        values: list[tuple[float | None, ...] | None] = [None] * len(ids)
        for batch, logits in self._padded_forward(ids):
            # log softmax at one vocabulary entry: logit - logsumexp, without materializing the whole distribution
            probe = (logits[:, :, token_id] - torch.logsumexp(logits, dim=-1)).tolist()
            for row, i in enumerate(batch):
                values[i] = (None, *probe[row][: len(ids[i]) - 1]) if ids[i] else ()
        return values  # type: ignore[return-value]

    def _padded_forward(self, ids: list[list[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, float32 logits) for batches of similar-length sequences (less padding), each batch at most
        score_token_budget padded tokens; right padding, so positions of real tokens are unchanged."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batch: list[int] = []
        for index in order + [None]:
            if index is not None and (not batch or (len(batch) + 1) * len(ids[index]) <= self.score_token_budget):
                batch.append(index)
                continue
            if batch:
                width = max(len(ids[i]) for i in batch)
                pad = self.tokenizer.pad_token_id
                input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch])
                attention = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch])
                yield batch, self.hf_model(input_ids=input_ids, attention_mask=attention).logits.float()
            batch = [index] if index is not None else []

    def close(self) -> None:
        del self.hf_model, self._loaded  # the shared model is freed once no backend holds it


class Loaded:
    """A model and its tokenizer (left padding, a pad token) as every TransformersBackend on them uses them."""

    def __init__(self, path: str, dtype: str):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:  # the CPU's grouped-query SDPA (datagen/backends/gqa_attention.py); models without attention functions keep theirs
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=gqa_attention.register())
        except ValueError:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.eval()


_LOADED: weakref.WeakValueDictionary[tuple, Loaded] = weakref.WeakValueDictionary()
_LOADING = threading.Lock()


def load(path: str, dtype: str) -> Loaded:
    """The model at `path` in `dtype` with its tokenizer, loaded once per process while any backend holds them: a
    notebook, the e2e loop or a test session that builds several backends on one model pays one load (~2-4 s on CPU),
    not one each. Weak references only, so a model no backend holds is freed as before. Keyed by the folder's weight,
    config and tokenizer files (name, size, mtime), so a folder rewritten in place (`datagen train --overwrite`) is
    loaded afresh. Backends only run the shared model: nothing may change its weights or wrap it (training loads its
    own, train/sft.py)."""
    key = (str(Path(path).resolve()) if Path(path).exists() else path, dtype, _fingerprint(path))
    with _LOADING:
        loaded = _LOADED.get(key)
        if loaded is None:
            loaded = Loaded(path, dtype)
            _LOADED[key] = loaded
    return loaded


def _fingerprint(path: str) -> tuple:
    folder = Path(path)
    if not folder.is_dir():
        return ()  # a hub id: the hub's cache is immutable per revision
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                        if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt") and f.is_file()))


class OutputPenalties(LogitsProcessor):
    """vLLM's and OpenAI's penalties: logit -= presence_penalty if the token already occurs in this completion, and
    -= frequency_penalty × its count there. Prompt tokens do not count (vLLM: "tokens in the generated text")."""

    def __init__(self, prompt_width: int, presence_penalty: float, frequency_penalty: float):
        self.prompt_width = prompt_width
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence_penalty * (counts > 0).to(scores.dtype) - self.frequency_penalty * counts


def context_length(config) -> int:
    """The positions the model serves, read as vLLM reads them (vllm/config/model.py, _get_and_verify_max_len):
    max_position_embeddings, times the RoPE factor for linear and dynamic scaling, whose configs keep the
    original length there (train/rope.py); a YaRN config already holds the scaled length."""
    parameters = getattr(config, "rope_parameters", None) or {}
    factor = parameters.get("factor") if parameters.get("rope_type") in ("linear", "dynamic") else None
    return int(config.max_position_embeddings * (factor or 1.0))


class LoopStop(StoppingCriteria):
    """Ends each sequence of a batch on its own once its last `ngram` generated tokens have occurred LOOP_REPEATS
    times in its completion (`SamplingParams.loop_ngram`); one count per sequence, one n-gram per step."""

    def __init__(self, prompt_width: int, ngram: int, repeats: int = LOOP_REPEATS):
        self.prompt_width, self.ngram, self.repeats = prompt_width, ngram, repeats
        self.counts: list[dict[tuple[int, ...], int]] = []
        self.looped: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if not self.counts:
            self.counts, self.looped = [{} for _ in range(input_ids.shape[0])], [False] * input_ids.shape[0]
        if input_ids.shape[1] - self.prompt_width >= self.ngram:
            for row, gram in enumerate(map(tuple, input_ids[:, -self.ngram :].tolist())):
                self.counts[row][gram] = count = self.counts[row].get(gram, 0) + 1
                self.looped[row] = self.looped[row] or count >= self.repeats
        return torch.tensor(self.looped, dtype=torch.bool, device=input_ids.device)
