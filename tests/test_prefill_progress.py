"""A long prefill writes its progress: the tracker's arithmetic, then a real engine's log."""

from types import SimpleNamespace

from vllm import SamplingParams

from engine import engine, lminf_options, random_prompt
from helpers import logged
from lminf_vllm import prefill_progress
from lminf_vllm.prefill_progress import PrefillProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def req(rid, done, total):
    return SimpleNamespace(request_id=rid, num_computed_tokens=done, num_prompt_tokens=total)


def test_one_line_per_interval_while_prefilling_none_after():
    clock = Clock()
    tracker = PrefillProgress(interval_s=10, clock=clock)
    assert tracker.after_step([req("a", 2048, 13830)]) == []  # first seen: nothing yet
    clock.now = 4
    assert tracker.after_step([req("a", 4096, 13830)]) == []  # within the interval
    clock.now = 10
    (line,) = tracker.after_step([req("a", 6144, 13830), req("b", 9, 9)])  # b is decoding: never a line
    assert "request a" in line and "6,144 of 13,830" in line and "410 tokens/s" in line and "about 19 s" in line
    clock.now = 15
    assert tracker.after_step([req("a", 8192, 13830)]) == []
    clock.now = 30
    assert tracker.after_step([req("a", 13830, 13830)]) == []  # done: no line, and forgotten
    assert tracker._seen == {}


def test_a_preempted_prompt_starts_its_rate_again():
    clock = Clock()
    tracker = PrefillProgress(interval_s=10, clock=clock)
    tracker.after_step([req("a", 4096, 8192)])
    clock.now = 5
    tracker.after_step([req("a", 0, 8192)])  # preempted: its computed tokens are gone
    clock.now = 15
    (line,) = tracker.after_step([req("a", 2048, 8192)])
    assert "2,048 of 8,192" in line and "(205 tokens/s" in line  # 2,048 tokens in the 10 s since


def test_a_real_engine_logs_a_long_prompts_progress(tiny_llama, monkeypatch):
    monkeypatch.setattr(prefill_progress, "INTERVAL_S", 0.0)  # every step, so the tiny model's steps show
    prompt = random_prompt(600, seed=3)
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=1024, max_num_batched_tokens=128) as llm:
        with logged() as messages:  # once the engine has set vLLM's logging up
            llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2), use_tqdm=False)
    lines = [m for m in messages if "is prefilling its prompt" in m]
    # Steps of 128 tokens: one line after each step but the last (the prompt is done then).
    assert [line.split(": ", 2)[2].split(" tokens computed")[0] for line in lines] == [
        f"{n} of 600" for n in (128, 256, 384, 512)]
