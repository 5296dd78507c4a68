"""vLLM's CPU engine layouts on this machine: start-up and generation time of the embedded model in vLLM's default
layout (engine core and model worker each in a process of its own, what datagen's VLLMBackend uses), with the model in
the engine core's process (`distributed_executor_backend="uni"`), and with that process the caller's too
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`; faster, but two engines in one process break each other: CPU_ENGINE_DEFAULTS in
datagen/backends/vllm_backend.py). Each layout runs in a fresh process, one after the other, in this run.

    python bench/vllm_cpu.py            # prints seconds per layout and the ratio default / in-process

Results: bench/results/vllm_cpu.txt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

LAYOUTS = {
    "default (vLLM's: engine core + worker processes)": ({}, {}),
    "uni (worker in the engine core's process)": ({"distributed_executor_backend": "uni"}, {}),
    "in-process (uni, engine core in the caller)": ({"distributed_executor_backend": "uni"}, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
}
TOKENS = 320


def one(kwargs: dict) -> dict:
    import vllm

    from datagen import models

    models.configure_offline()
    started = time.perf_counter()
    llm = vllm.LLM(model=str(models.resolve("smollm2-135m")), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30,
                   enable_chunked_prefill=False, **kwargs)  # fmt: skip
    result = {"start_s": time.perf_counter() - started}
    params = vllm.SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=1.0, seed=1)
    for n in (4, 8):
        started = time.perf_counter()
        llm.generate(["Write a story about a cat."] * n, params, use_tqdm=False)
        result[f"{n}x{TOKENS}_s"] = time.perf_counter() - started
    return result


def main() -> None:
    results = {}
    for name, (kwargs, env) in LAYOUTS.items():
        code = f"import json, os, sys; sys.path.insert(0, {os.getcwd()!r}); from bench.vllm_cpu import one; print('RESULT', json.dumps(one({kwargs!r}))); sys.stdout.flush(); os._exit(0)"
        with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: the engine's processes outlive os._exit
            child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=out, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # fmt: skip
            child.wait(timeout=900)
            try:
                os.killpg(child.pid, signal.SIGKILL)  # the engine's processes with it
            except ProcessLookupError:
                pass
            out.seek(0)
            line = next(line for line in out.read().splitlines() if line.startswith("RESULT"))
        results[name] = json.loads(line.split(" ", 1)[1])
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[name].items()), flush=True)
    base, ours = results[next(iter(LAYOUTS))], results[list(LAYOUTS)[-1]]
    print("ratio default / in-process: " + ", ".join(f"{k} {base[k] / ours[k]:.2f}x" for k in base))


if __name__ == "__main__":
    main()
