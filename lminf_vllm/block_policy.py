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


def freeable_blocks(n: int, G: int, W: int, B: int, kept_behind: int = 0) -> range:
    """Logical blocks no query at position >= n will read: wholly between global and window,
    but for the last kept_behind of them (top-k's selection buffer: topk_blocks)."""
    g = global_blocks(G, B)
    return range(g, max(g, first_window_block(n, W, B) - kept_behind))


def max_blocks_per_sequence(G: int, W: int, B: int, in_flight_tokens: int = 1, kept_behind: int = 0) -> int:
    """SPEC.md's bound: ceil(G/B) + ceil(W/B) + 1 while decoding one token a step;
    a prefill chunk of T tokens in flight adds its own blocks (in_flight_tokens = T);
    top-k's selection buffer adds its k blocks (kept_behind = k: docs/topk-contract.md)."""
    return global_blocks(G, B) + cdiv(W - 1 + in_flight_tokens, B) + 1 + kept_behind


def topk_attended_tokens(G: int, W: int, B: int, k: int) -> int:
    """The most keys one query attends with topk_blocks = k > 0 (docs/topk-contract.md): the
    whole global blocks, the window with up to B - 1 older positions of its first block, and
    k selected blocks of B."""
    return global_blocks(G, B) * B + W + B - 1 + k * B


def blocks_needed_for_hit(num_blocks: int, G: int, W: int, B: int) -> list[int]:
    """Cached blocks a prefix of num_blocks full blocks needs to be reused as computed:
    the global ones and the window of the first token after it."""
    n = num_blocks * B
    glob = range(min(global_blocks(G, B), num_blocks))
    window = range(first_window_block(n, W, B), num_blocks)
    return sorted(set(glob) | set(window))
