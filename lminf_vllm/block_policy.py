"""Which KV blocks a sequence keeps under LM-Infinite: plain arithmetic, no vLLM.

After a step that computed tokens [0, n), the next query (position n) needs
keys j < G and j >= n - W + 1 (SPEC.md). With block size B the sequence keeps
logical blocks [0, ceil(G/B)) and [first_window_block(n), ...); every block
wholly between is free to go.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def global_blocks(G: int, B: int) -> int:
    """Blocks holding positions [0, G)."""
    return cdiv(G, B)


def first_window_block(n: int, W: int, B: int) -> int:
    """Block holding the oldest position the query at position n still sees locally."""
    return max(0, n - W + 1) // B


def freeable_blocks(n: int, G: int, W: int, B: int) -> range:
    """Logical blocks no query at position >= n will read: wholly between global and window
    (top-k reads its middle blocks from the host store, not from these)."""
    g = global_blocks(G, B)
    return range(g, max(g, first_window_block(n, W, B)))


def max_blocks_per_sequence(G: int, W: int, B: int, in_flight_tokens: int = 1) -> int:
    """SPEC.md's bound: ceil(G/B) + ceil(W/B) + 1 while decoding one token a step;
    a prefill chunk of T tokens in flight adds its own blocks (in_flight_tokens = T).
    The same with topk_blocks > 0 (docs/topk-contract.md)."""
    return global_blocks(G, B) + cdiv(W - 1 + in_flight_tokens, B) + 1


def topk_attended_tokens(G: int, W: int, B: int, k: int) -> int:
    """The most keys one query attends with topk_blocks = k > 0 (docs/topk-contract.md): the
    whole global blocks, the window with up to B - 1 older positions of its first block, and
    k selected blocks of B."""
    return global_blocks(G, B) * B + W + B - 1 + k * B


def longest_cached_prefix(max_blocks: int, G: int, W: int, B: int, is_cached, aligned=lambda k: True) -> int:
    """The most full blocks k <= max_blocks, aligned(k), whose blocks_needed_for_hit are all cached.

    One backward scan: each block is asked about at most once (is_cached(i) -> bool), O(n/B + G/B)
    in all, where stepping back a block at a time and rebuilding the needed set was O(n/B * W/B).
    A missing global block settles it at once: no prefix longer than that block can be reused, so a
    cold prompt with G > 0 costs one question.
    """
    g = min(global_blocks(G, B), max_blocks)
    cached_globals = next((i for i in range(g) if not is_cached(i)), g)
    if cached_globals < g:  # a prefix inside the cached globals needs nothing else
        return next((k for k in range(cached_globals, 0, -1) if aligned(k)), 0)
    k = run = max_blocks  # blocks [run, k) are known to be cached
    while k > 0:
        if not aligned(k):
            k -= 1
            run = min(run, k)
            continue
        lo = max(first_window_block(k * B, W, B), g if k > g else 0)  # the globals are checked
        while run > lo and (run <= g or is_cached(run - 1)):
            run -= 1
        if run <= lo:
            return k
        # Block run - 1 is missing: every prefix longer than it reads it (its window covers it, the
        # windows only move forward with k), so the next candidate is exactly run - 1 blocks.
        k = run = run - 1
    return 0


def blocks_needed_for_hit(num_blocks: int, G: int, W: int, B: int) -> list[int]:
    """Cached blocks a prefix of num_blocks full blocks needs to be reused as computed:
    the global ones and the window of the first token after it."""
    n = num_blocks * B
    glob = range(min(global_blocks(G, B), num_blocks))
    window = range(first_window_block(n, W, B), num_blocks)
    return sorted(set(glob) | set(window))
