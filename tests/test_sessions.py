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


def session_answers(model, sessions: dict[str, list]) -> dict[str, list[list[int]]]:
    """Each chunk's answer in streaming-input sessions run at once, one per request id
    (engine core in its own process)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def session(llm, request_id, chunks):
        answered = asyncio.Event()

        async def inputs():
            for chunk in chunks:
                answered.clear()
                # a copy: vLLM extends the first chunk's list in place with the ones after it
                yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(chunk)))
                await answered.wait()  # the next chunk comes once the model has answered this one

        answers, current = [], []
        async for out in llm.generate(inputs(), params, request_id=request_id):
            current += out.outputs[0].token_ids
            if len(current) == ANSWER_TOKENS:
                answers.append(current)
                current = []
                answered.set()
        return answers

    async def run():
        args = AsyncEngineArgs(model=str(model), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                               block_size=32, attention_backend="lminf", max_model_len=1 << 30, seed=0,
                               additional_config={"lminf": LMINF})  # fmt: skip
        llm = AsyncLLM.from_engine_args(args)
        try:
            answers = await asyncio.gather(*(session(llm, rid, chunks) for rid, chunks in sessions.items()))
        finally:
            llm.shutdown()
        return dict(zip(sessions, answers))

    env = os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # AsyncLLM runs its core in a process
    try:
        return asyncio.run(run())
    finally:
        if env is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env


def fresh_answers(model, sessions: dict[str, list], answers: dict[str, list]) -> dict[str, list[list[int]]]:
    """What fresh requests on each chunk's whole history (the session's own answers included) give."""
    expected = {}
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True)
    with engine(model, lminf=lminf_options(**LMINF), max_model_len=1 << 30) as llm:
        for rid, chunks in sessions.items():
            history, expected[rid] = [], []
            for chunk, answer in zip(chunks, answers[rid]):
                history += chunk
                out = llm.generate([{"prompt_token_ids": history}], params, use_tqdm=False)[0]
                expected[rid].append(list(out.outputs[0].token_ids))
                history += answer  # the session's own answer is part of what follows
            assert len(history) > 7 * TABLE  # far past the RoPE table and the window
    return expected


def test_a_streaming_session_answers_as_fresh_requests_on_the_whole_history(tiny_llama, capfd):
    sessions = {"session": [random_prompt(CHUNK_TOKENS, seed=10 + c) for c in range(CHUNKS)]}
    answers = session_answers(tiny_llama, sessions)
    assert len(answers["session"]) == CHUNKS
    # each chunk after the first reached the worker as its new tokens (lminf_vllm/streaming_tail.py)
    # (vLLM adds a suffix to the request id)
    assert re.search(r"session 'session\S*': its next chunks reach the worker as their new tokens only", "".join(capfd.readouterr()))
    assert answers == fresh_answers(tiny_llama, sessions, answers)


def test_sessions_run_at_once_each_answer_as_fresh_requests(tiny_llama):
    # A session waiting for its next chunk leaves the batch while the others run, so its next
    # chunk may land in another row: the worker still rebuilds the prompt from the new tokens,
    # and that row is written whole.
    sessions = {f"s{i}": [random_prompt(CHUNK_TOKENS + 37 * i, seed=100 * i + c) for c in range(CHUNKS)] for i in range(3)}
    answers = session_answers(tiny_llama, sessions)
    assert [len(a) for a in answers.values()] == [CHUNKS] * 3
    assert answers == fresh_answers(tiny_llama, sessions, answers)


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
