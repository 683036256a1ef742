"""streaming_tail: a streaming session's next prompt sent as the tokens the worker lacks, and
rebuilt by the worker into exactly the prompt the scheduler holds (the engine-level check
that sessions answer as fresh requests is tests/test_sessions.py)."""

import pickle
import random

import pytest

from lminf_vllm.streaming_tail import CHECK, TailMismatch, TokenTail, rebuild, tail_of


def session_turn(rng, prompt_len, sampled, kept, chunk):
    """The worker's state after a turn (its prompt, its sampled tokens) and the scheduler's next
    prompt: the old prompt, the first `kept` sampled tokens, a new chunk."""
    prompt = [rng.randrange(50_000) for _ in range(prompt_len)]
    out = [rng.randrange(50_000) for _ in range(sampled)]
    return prompt, out, prompt + out[:kept] + [rng.randrange(50_000) for _ in range(chunk)]


@pytest.mark.parametrize("seed", range(40))
def test_the_worker_rebuilds_the_schedulers_prompt(seed):
    rng = random.Random(seed)
    sampled = rng.randrange(0, 6)
    kept = rng.randrange(0, sampled + 1)
    prompt, out, full = session_turn(rng, rng.randrange(0, 9), sampled, kept, rng.randrange(0, 7))
    start = len(prompt) + kept
    tail = pickle.loads(pickle.dumps(tail_of(full, start)))  # as the executor's queue carries it
    assert isinstance(tail, TokenTail) and (tail.start, tail.length) == (start, len(full))
    assert list(tail) == full[start:]
    copy = prompt  # the worker's own list: extended in place
    assert rebuild(copy, out, tail, "s") == full and copy is prompt


def test_a_shared_list_already_whole_is_returned_as_it_is():
    # An in-process executor hands the worker the scheduler's own list, which the scheduler
    # extended before sending the tail.
    full = list(range(100))
    assert rebuild(full, [7, 8], tail_of(full, 60), "s") is full
    assert full == list(range(100))


@pytest.mark.parametrize("case", ["worker behind", "worker ahead", "tokens differ"])
def test_a_worker_copy_that_does_not_meet_the_tail_is_an_error_not_a_wrong_prompt(case):
    rng = random.Random(1)
    prompt, out, full = session_turn(rng, 20, 3, 2, 5)
    start = len(prompt) + 2
    if case == "worker behind":
        prompt, out = prompt[:-3], []
    elif case == "worker ahead":
        start -= 8
    else:
        out = [out[0] + 1] + out[1:]
    with pytest.raises(TailMismatch, match="streaming session 'sess'"):
        rebuild(list(prompt), list(out), tail_of(full, start), "sess")


def test_the_tail_carries_the_new_tokens_and_a_few_to_check_not_the_session():
    full = list(range(1_000_000))
    tail = tail_of(full, 999_000)
    assert len(tail) == 1000 and tail.before == full[999_000 - CHECK : 999_000]
    assert len(pickle.dumps(tail)) < 10_000
