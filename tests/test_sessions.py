"""Endless sessions with vLLM's streaming input (AsyncLLM.generate over an async
generator of StreamingInput): one request that takes input chunk by chunk and
answers after each, far past the window and the RoPE table, gives the tokens a
fresh request on the whole conversation so far gives. And the runnable example
in docs/sessions.md runs as written."""

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from vllm import SamplingParams

from conftest import TABLE
from engine import engine, lminf_options, random_prompt

ROOT = Path(__file__).resolve().parents[1]
LMINF = {"global_tokens": 4, "local_tokens": 64}
CHUNKS, CHUNK_TOKENS, ANSWER_TOKENS = 6, 150, 5


def session_answers(model, chunks) -> list[list[int]]:
    """Each chunk's answer in one streaming-input session (engine core in its own process)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        args = AsyncEngineArgs(model=str(model), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                               block_size=32, attention_backend="lminf", max_model_len=1 << 30, seed=0,
                               additional_config={"lminf": LMINF})  # fmt: skip
        llm = AsyncLLM.from_engine_args(args)
        answered = asyncio.Event()

        async def inputs():
            for chunk in chunks:
                answered.clear()
                # a copy: vLLM extends the first chunk's list in place with the ones after it
                yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(chunk)))
                await answered.wait()  # the next chunk comes once the model has answered this one

        answers, current = [], []
        try:
            async for out in llm.generate(inputs(), params, request_id="session"):
                current += out.outputs[0].token_ids
                if len(current) == ANSWER_TOKENS:
                    answers.append(current)
                    current = []
                    answered.set()
        finally:
            llm.shutdown()
        return answers

    env = os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # AsyncLLM runs its core in a process
    try:
        return asyncio.run(run())
    finally:
        if env is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env


def test_a_streaming_session_answers_as_fresh_requests_on_the_whole_history(tiny_llama):
    chunks = [random_prompt(CHUNK_TOKENS, seed=10 + c) for c in range(CHUNKS)]
    answers = session_answers(tiny_llama, chunks)
    assert len(answers) == CHUNKS
    history, expected = [], []
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True)
    with engine(tiny_llama, lminf=lminf_options(**LMINF), max_model_len=1 << 30) as llm:
        for chunk, answer in zip(chunks, answers):
            history += chunk
            fresh = list(llm.generate([{"prompt_token_ids": history}], params, use_tqdm=False)[0].outputs[0].token_ids)
            expected.append(fresh)
            history += answer  # the session's own answer is part of what follows
    assert len(history) > 7 * TABLE  # far past the RoPE table and the window
    assert answers == expected


def test_the_session_example_in_the_docs_runs_as_written(tiny_llama, tmp_path):
    text = (ROOT / "docs" / "sessions.md").read_text()
    (code,) = re.findall(r"<!-- example:session -->\n```python\n(.*?)```", text, re.S)
    script = tmp_path / "session.py"
    script.write_text(code)
    env = dict(os.environ, LMINF_MODEL=str(tiny_llama), LMINF_EXAMPLE_CHUNKS="5")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("chunk ")]
    assert len(lines) == 5, run.stdout
