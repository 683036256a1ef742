"""The block policy on its own: hand-worked cases and properties over random inputs."""

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import kept_blocks
from lminf_vllm.block_policy import (
    blocks_needed_for_hit,
    longest_cached_prefix,
    cdiv,
    first_window_block,
    freeable_blocks,
    global_blocks,
    max_blocks_per_sequence,
)


def test_hand_worked_example():
    # G=4, W=64, B=32, n=3000: globals in block 0; the next query needs 2937..3000
    assert global_blocks(4, 32) == 1
    assert first_window_block(3000, 64, 32) == 2937 // 32 == 91
    assert freeable_blocks(3000, 4, 64, 32) == range(1, 91)
    assert kept_blocks(3000, 4, 64, 32, upto=cdiv(3001, 32)) == [0, 91, 92, 93]
    assert max_blocks_per_sequence(4, 64, 32) == 1 + 2 + 1


def test_nothing_is_freed_while_the_window_covers_everything():
    assert list(freeable_blocks(64, 4, 64, 16)) == []
    assert list(freeable_blocks(100, 0, 200, 16)) == []


params = st.tuples(
    st.integers(0, 80),  # G
    st.integers(1, 300),  # W
    st.sampled_from([1, 2, 16, 32, 128]),  # B
)


@settings(max_examples=400, deadline=None)
@given(params, st.integers(0, 5000))
def test_kept_blocks_hold_every_key_the_next_query_reads(p, n):
    G, W, B = p
    kept = set(kept_blocks(n, G, W, B, upto=cdiv(n + 1, B)))
    visible = [j for j in range(n + 1) if j < G or n - j < W]  # query at position n
    assert {j // B for j in visible} <= kept


@settings(max_examples=400, deadline=None)
@given(params, st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_held_blocks_stay_within_the_bound_in_any_chunking(p, chunks):
    """Scheduling chunks of any size then decoding: held <= bound for the chunk in flight."""
    G, W, B = p
    n = 0
    for T in chunks + [1] * 50:
        held = kept_blocks(n, G, W, B, upto=cdiv(n + T, B))  # after allocating the chunk's slots
        assert len(held) <= max_blocks_per_sequence(G, W, B, in_flight_tokens=T)
        n += T


@settings(max_examples=300, deadline=None)
@given(params, st.integers(0, 3000), st.integers(1, 400))
def test_freed_blocks_are_never_needed_again(p, n, later):
    G, W, B = p
    for m in (n, n + later):
        for b in freeable_blocks(n, G, W, B):
            assert b not in {j // B for j in range(m + 1) if j < G or m - j < W}


@settings(max_examples=300, deadline=None)
@given(params, st.integers(1, 200))
def test_a_prefix_hit_needs_exactly_the_blocks_its_next_token_reads(p, num_blocks):
    G, W, B = p
    n = num_blocks * B
    reads = {j // B for j in range(n) if j < G or n - j < W}
    assert set(blocks_needed_for_hit(num_blocks, G, W, B)) == reads


@settings(max_examples=300, deadline=None)
@given(params, st.integers(1, 120), st.data())
def test_a_missing_block_rules_out_every_longer_hit(p, num_blocks, data):
    """The jump the prefix-cache lookup makes: if block m of a hit of num_blocks is
    missing, every hit longer than m needs it as well."""
    G, W, B = p
    needed = blocks_needed_for_hit(num_blocks, G, W, B)
    if not needed:
        return
    m = data.draw(st.sampled_from(needed))
    for longer in range(m + 1, num_blocks + 1):
        assert m in blocks_needed_for_hit(longer, G, W, B)


@settings(max_examples=400, deadline=None)
@given(params, st.integers(0, 150), st.data())
def test_the_one_scan_prefix_lookup_equals_trying_every_length(p, max_blocks, data):
    """longest_cached_prefix against its definition (the longest aligned prefix whose needed blocks
    are all cached), asking about each block at most once."""
    G, W, B = p
    cached = data.draw(st.sets(st.integers(0, max(0, max_blocks - 1))))
    align = data.draw(st.sampled_from([1, 1, 2, 3]))
    asked = []

    def is_cached(i):
        asked.append(i)
        return i in cached

    got = longest_cached_prefix(max_blocks, G, W, B, is_cached, aligned=lambda k: k % align == 0)
    want = next((k for k in range(max_blocks, 0, -1)
                 if k % align == 0 and all(i in cached for i in blocks_needed_for_hit(k, G, W, B))), 0)
    assert got == want
    assert len(asked) == len(set(asked)) <= max_blocks


def test_a_cold_million_token_prompt_is_one_question():
    """Llama 3.1's default window (W = C = 131,072), blocks of 16, a 1M-token prompt nobody sent before."""
    asked = []
    hit = longest_cached_prefix(1_000_000 // 16, 10, 131_072, 16, lambda i: asked.append(i) or False)
    assert hit == 0 and asked == [0]
