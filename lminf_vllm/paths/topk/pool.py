"""A top-k decode row read by one attention call over the paged cache (docs/topk-contract.md).

Where C <= W, every key a decode row at i reads past its window (the whole global
blocks, the rows of its first window block fa before the window, the k selected
blocks) is seen at distance C: rotated to position i - C, the row's query at i
scores it as the contract does. So those keys are copied into the pool, rotated
so, and one call reads them with the window, the query as it is:

  * the global blocks' and block fa's own rows: in place. A decode step reads
    them from nowhere else (a later chunk would: SavedKeys keeps them as stored
    first, and puts them back);
  * the selected blocks: into the k middle blocks just behind the window, which
    a top-k sequence keeps as its selection buffer (block_policy.freeable_blocks,
    kept_behind = k); their own keys and values are in the host store.

The keys come from the store's copies at position 0, gathered once while a row's
pieces stay the same (FarKeys) and rotated at every step; the picks' values as
stored, written once per selection; in pieces of one block and KV head (the
store keeps them so: HostStore.block_heads, block * Hkv + head). No vLLM
import; paths/topk runs it with vLLM's decode op and rotary op.
"""

from dataclasses import dataclass, field

import torch

from lminf_vllm.block_policy import global_blocks
from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import NULL_BLOCK, block_head_numbers, head_row_numbers, token_numbers


@dataclass
class PoolRow:
    """The step's plan for one decode row (the same for every layer)."""

    tokens: torch.Tensor  # [n] kv_layout.token_views rows the call reads: global blocks, buffer, block fa .. row i
    src: torch.Tensor  # [(e + g) Hkv] long: the store's block-heads (HostStore.block_heads) turned in place:
    # block fa's (e = 1 where the window starts inside it, else 0), then the global blocks'
    dst: torch.Tensor  # [(g + k) Hkv] long: the pool's block-heads (block * Hkv + head) that the global
    # blocks, then per KV head its k picks (the buffer), are copied to
    edge: int  # block fa's rows before the window (turned in place: only those, the rest is window)
    edge_block: int  # its pool block
    turn: torch.Tensor  # [rotary_dim]: cos then sin of (i - C) * inv_freq, which rotate a key at 0 to i - C


def plan_pool_row(dec, block_row: torch.Tensor, cfg: LminfConfig, B: int, num_kv_heads: int,
                  angles) -> PoolRow | None:  # fmt: skip
    """The one-call way for a DecodeRow `dec` (attention.plan_decode), or None where it does
    not apply: C > W (some keys past the window are seen as stored), or a buffer block is the null one.
    `angles(positions) -> cos, sin [N, rotary_dim / 2]` (attention.angles with the rotary)."""
    W, C = cfg.local_tokens, cfg.distance_cap
    if C > W:
        return None
    g, fa, i = global_blocks(cfg.global_tokens, B), dec.fa, dec.i
    k = min(cfg.topk_blocks, fa - g)  # as many as the selection picks (attention.select_stored)
    buffer = block_row[fa - k : fa].long()
    if bool((buffer == NULL_BLOCK).any()):  # (vLLM's null block is never written; the KV manager keeps the
        return None  # buffer, block_policy.freeable_blocks' kept_behind, tests/test_bounded_memory.py holds it)
    dev = block_row.device
    edge = [fa] if dec.start else []
    # a block's Hkv rows together (.T: block fa's first), but the buffer's per KV head (its k picks)
    src = block_head_numbers(torch.tensor(edge + list(range(g)), device=dev), num_kv_heads).T.flatten()
    dst = torch.cat((block_head_numbers(block_row[:g], num_kv_heads).T.flatten(),
                     block_head_numbers(buffer, num_kv_heads).flatten()))  # fmt: skip
    slots = torch.arange(B, device=dev)
    pos = torch.cat((torch.arange(g * B, device=dev), torch.arange(fa * B, i + 1, device=dev)))
    tokens = torch.cat((token_numbers(block_row[pos[: g * B] // B], pos[: g * B] % B, num_kv_heads, B),
                        token_numbers(buffer[:, None], slots, num_kv_heads, B).flatten(),
                        token_numbers(block_row[pos[g * B :] // B], pos[g * B :] % B, num_kv_heads, B)))  # fmt: skip
    cos, sin = angles(torch.tensor([i - C], device=dev))
    return PoolRow(tokens.to(torch.int32), src, dst, dec.start, int(block_row[fa]), torch.cat((cos, sin), -1)[0])


@dataclass
class PoolCopies:
    """Where a step's decode rows' copies go, the same for every layer (`plan_copies`): the store's
    pieces of row r, gathered in order (its PoolRow.src, then per KV head its picks) and joined,
    fill rows [offsets[r], offsets[r + 1]) of one tensor of block-heads."""

    offsets: list[int]
    positions: torch.Tensor  # [N * B] long: each gathered key's row (its angles in `table`)
    table: torch.Tensor  # [R, rotary_dim] the rows' turns (PoolRow.turn), cos then sin
    keep: torch.Tensor  # [M] long: the gathered block-heads whose keys are written whole ...
    dst_rows: torch.Tensor  # [M * B] long: ... to these key rows (block-head * B + slot) of each row's
    # PoolRow.dst: an indexed write of rows of the cache viewed [rows, 2 D] is faster than one of
    # block-heads' strided key halves
    edge_src: torch.Tensor  # [E] long: gathered key rows (block-head * B + slot) of the rows' block fa, ...
    edge_dst: torch.Tensor  # [E] long: ... written to these pool key rows, its rows before the window


def plan_copies(rows: list[PoolRow], picks: list[int], num_kv_heads: int, B: int) -> PoolCopies:
    """The copies of decode rows `rows` that pick picks[r] blocks per KV head."""
    Hkv = num_kv_heads
    offsets, keep, dst, edge_src, edge_dst = [0], [], [], [], []
    slots = torch.arange(B)
    for row, k in zip(rows, picks):
        a, e = offsets[-1], Hkv if row.edge else 0
        n = len(row.src) + k * Hkv
        keep.append(torch.arange(a + e, a + n))
        dst.append(row.dst)
        if e:  # block fa's keys before the window: rows [0, edge) of each KV head's piece
            heads = torch.arange(Hkv)[:, None]
            edge_src.append(((a + heads) * B + slots[: row.edge]).flatten())
            edge_dst.append(((row.edge_block * Hkv + heads) * B + slots[: row.edge]).flatten())
        offsets.append(a + n)
    sizes = torch.tensor([(b - a) * B for a, b in zip(offsets, offsets[1:])])
    join = lambda parts: torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)  # noqa: E731
    positions = torch.repeat_interleave(torch.arange(len(rows)), sizes)
    table = torch.stack([row.turn for row in rows])
    dst_rows = (join(dst)[:, None] * B + slots).flatten()
    return PoolCopies(offsets, positions, table, join(keep), dst_rows, join(edge_src), join(edge_dst))


@dataclass
class FarKeys:
    """One request's and layer's keys past the window at position 0, as its one-call decode last
    gathered them from the store (its PoolRow.src, then its picks), and the buffer block-heads that
    hold its picks' values. A selection is kept over several decode rows (topk_refresh) and block
    fa moves once in B rows, so most steps gather nothing: they rotate these keys again, to the
    row's new i - C, and leave the values where they are."""

    row_src: torch.Tensor | None = None  # the PoolRow.src and ...
    chosen: torch.Tensor | None = None  # ... the picks [Hkv, k] they were gathered for
    keys: torch.Tensor | None = None  # [n, B, D] their keys at position 0, the cache dtype
    values_in: torch.Tensor | None = None  # [k Hkv] the pool block-heads holding the picks' values

    def holds(self, row_src: torch.Tensor, chosen: torch.Tensor) -> bool:
        if self.keys is None or not torch.equal(self.row_src, row_src):
            return False
        return chosen is self.chosen or torch.equal(chosen, self.chosen)  # (a kept selection: the same tensor)


def copy_far_blocks(kv_cache: torch.Tensor, rows: list[PoolRow], plan: PoolCopies, chosen: list[torch.Tensor],
                    block_heads: list, turn, held: list[FarKeys]) -> None:  # fmt: skip
    """Write decode rows' keys past their windows into the pool, rotated to i - C, in whole blocks:
    the global blocks' and the picks' (chosen[r] [Hkv, k]) keys to PoolRow.dst, block fa's rows
    before the window in place; the picks' values to the buffer, where it does not hold them yet.
    block_heads[r](ids) -> those (block, KV head) pieces of row r's store, keys and values, copies
    (HostStore.block_heads for its request and layer), read only when row r's pieces differ from
    what held[r] (its FarKeys, updated here) keeps. Then for all rows together one rotation, one
    copy of the whole pieces' keys and one of the edge keys. turn(keys [N, D], table, positions [N])
    rotates keys in place, key n by the angles table[positions[n]], in the cache dtype (vLLM's
    rotary op: paths/topk/ops.rotate_rows)."""
    Hkv, B, D = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[-1] // 2
    pieces = kv_cache.view(-1, B, kv_cache.shape[-1])
    parts = []
    for row, c, heads, far in zip(rows, chosen, block_heads, held):
        buffer = row.dst[len(row.dst) - c.numel() :]  # (dst: the global blocks', then the buffer's)
        values = None
        if not far.holds(row.src, c):
            keys, values = heads(torch.cat((row.src, block_head_numbers(c, Hkv).flatten())))  # [n, B, D], [n, B, Dv]
            far.row_src, far.chosen, far.keys, far.values_in = row.src, c, keys, None
        if far.values_in is None or not torch.equal(far.values_in, buffer):
            if values is None:
                values = heads(block_head_numbers(c, Hkv).flatten())[1]
            pieces[buffer, :, D:] = values[len(values) - c.numel() :]
            far.values_in = buffer
        parts.append(far.keys)
    keys = torch.cat(parts)  # [N, B, D]: a copy, turned in place (each row's own stay at position 0)
    turn(keys.view(-1, D), plan.table, plan.positions)
    key_rows = kv_cache.view(-1, kv_cache.shape[-1])[:, :D]
    key_rows.index_copy_(0, plan.dst_rows, keys.index_select(0, plan.keep).view(-1, D))
    if len(plan.edge_dst):
        key_rows.index_copy_(0, plan.edge_dst, keys.view(-1, D)[plan.edge_src])


def turned_positions(i: int, cfg: LminfConfig, B: int, fa: int, start: int) -> torch.Tensor:
    """Positions whose pool keys a decode row at i left rotated: the global blocks, block fa's
    rows before the window (start of them)."""
    g = global_blocks(cfg.global_tokens, B)
    return torch.cat((torch.arange(g * B), fa * B + torch.arange(start)))


@dataclass
class SavedKeys:
    """One layer's pool keys, as stored, that a request's one-call decode turns: the global
    blocks' (saved the first time) and the rows of its first window block fa before the window
    (each saved as the window leaves it). A chunk of the request reads them as stored: `restore`
    puts them back exactly (the store's one copy is at position 0: rotated forward it would be a
    rounding off in bfloat16). At most ceil(G/B) + 1 blocks' keys per request and layer. With them,
    the keys it turns as last gathered at position 0 (FarKeys, at most ceil(G/B) + 1 + k blocks').
    Both go when the request is computed again from its first token."""

    globals: torch.Tensor | None = None  # [g, Hkv, B, D]
    fa: int = -1  # the logical block whose rows `edge` holds
    edge: torch.Tensor | None = None  # [Hkv, B, D]: its first `count` rows as stored
    count: int = 0
    far: FarKeys = field(default_factory=FarKeys)

    def save(self, kv_cache: torch.Tensor, block_row: torch.Tensor, g: int, fa: int, start: int) -> None:
        """Before a decode row turns them: the global blocks, block fa's rows [0, start)."""
        D = kv_cache.shape[-1] // 2
        if self.globals is None:
            self.globals = kv_cache[block_row[:g].long(), ..., :D].clone()
        if fa != self.fa:
            self.fa, self.count = fa, 0
            if self.edge is None:
                self.edge = torch.empty(kv_cache.shape[1], kv_cache.shape[2], D, dtype=kv_cache.dtype)
        if start > self.count:  # rows [count, start) were window rows until now: as stored
            self.edge[:, self.count : start] = kv_cache[int(block_row[fa]), :, self.count : start, :D]
            self.count = start

    def restore(self, kv_cache: torch.Tensor, block_row: torch.Tensor) -> None:
        D = kv_cache.shape[-1] // 2
        if self.globals is not None and len(self.globals):
            kv_cache[block_row[: len(self.globals)].long(), ..., :D] = self.globals
        if self.count:
            kv_cache[int(block_row[self.fa]), :, : self.count, :D] = self.edge[:, : self.count]
