"""A top-k decode row read by one attention call over the paged cache (docs/topk-contract.md).

Where C <= W, every key a decode row at i reads past its window (the whole global
blocks, the rows of its first window block fa before the window, the k selected
blocks) is seen at distance C: rotated to position i - C, the row's query at i
scores it as the contract does. So those keys are copied into the pool, rotated
so, and one call reads them with the window, the query as it is:

  * the global blocks' and block fa's own rows: in place. A decode step reads
    them from nowhere else (the chunk way would: `Turned` puts them back);
  * the selected blocks: into the k middle blocks just behind the window, which
    a top-k sequence keeps as its selection buffer (block_policy.freeable_blocks,
    kept_behind = k); their own keys and values are in the host store.

The keys come from the store's copies at position 0 (one rotation per row and
step); the values as stored. Rows are numbered per KV head as HostStore.head_rows
numbers its own: (block * Hkv + head) * B + slot, in a cache viewed [rows, 2 D].
No vLLM import; paths/topk runs it with vLLM's decode op.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.block_policy import global_blocks
from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import NULL_BLOCK, head_row_numbers, token_numbers
from lminf_vllm.rope import rotate


@dataclass
class PoolRow:
    """The step's plan for one decode row (the same for every layer)."""

    i: int
    tokens: torch.Tensor  # [n] kv_layout.token_views rows the call reads: global blocks, buffer, block fa .. row i
    dst: torch.Tensor  # [Hkv, F] long: where the keys past the window go, in far_tokens' order (global
    # blocks and block fa's rows before the window, then the k' selected blocks, per KV head)
    own: int  # the first `own` of them are the pool's own rows (their values are there already)
    turn: torch.Tensor  # [rotary_dim]: cos then sin of (i - C) * inv_freq, which rotate a key at 0 to i - C


def plan_pool_row(dec, block_row: torch.Tensor, cfg: LminfConfig, B: int, num_kv_heads: int,
                  angles) -> PoolRow | None:  # fmt: skip
    """The one-call way for a DecodeRow `dec` (topk_attention.plan_decode), or None where it does
    not apply: C > W (some keys past the window are seen as stored), or a buffer block is the null one.
    `angles(positions) -> cos, sin [N, rotary_dim / 2]` (topk_attention.angles with the rotary)."""
    W, C = cfg.local_tokens, cfg.distance_cap
    if C > W:
        return None
    g, fa, i = global_blocks(cfg.global_tokens, B), dec.fa, dec.i
    k = min(cfg.topk_blocks, fa - g)  # as many as select_from_bounds picks
    buffer = block_row[fa - k : fa].long()
    if bool((buffer == NULL_BLOCK).any()):  # (vLLM's null block is never written; the KV manager keeps the
        return None  # buffer, block_policy.freeable_blocks' kept_behind, tests/test_bounded_memory.py holds it)
    dev = block_row.device
    seen = turned_positions(i, cfg, B, fa, dec.start).to(dev)  # the far keys' own rows, turned in place
    own = head_row_numbers(block_row[seen // B], seen % B, num_kv_heads, B)  # [Hkv, g B + start]
    slots = torch.arange(B, device=dev)
    buf = head_row_numbers(buffer.repeat_interleave(B), slots.repeat(k), num_kv_heads, B)  # [Hkv, k B]
    pos = torch.cat((torch.arange(g * B, device=dev), torch.arange(fa * B, i + 1, device=dev)))
    tokens = torch.cat((token_numbers(block_row[pos[: g * B] // B], pos[: g * B] % B, num_kv_heads, B),
                        token_numbers(buffer[:, None], slots, num_kv_heads, B).flatten(),
                        token_numbers(block_row[pos[g * B :] // B], pos[g * B :] % B, num_kv_heads, B)))  # fmt: skip
    cos, sin = angles(torch.tensor([i - C], device=dev))
    return PoolRow(i, tokens.to(torch.int32), torch.cat((own, buf), dim=1), own.shape[1], torch.cat((cos, sin), -1)[0])


def copy_far_keys(kv_cache: torch.Tensor, row: PoolRow, src: torch.Tensor, at_zero_rows: torch.Tensor,
                  value_rows: torch.Tensor, turn) -> None:  # fmt: skip
    """Write a row's keys past its window into the pool (PoolRow.dst), rotated to i - C, and the
    selected blocks' values: src [Hkv, F] the store's rows of them (topk_attention.far_tokens),
    at_zero_rows and value_rows the store's rows (HostStore.head_rows); turn(keys [N, D], row)
    -> the keys rotated by row.turn, in the cache dtype (rotate_rows, or vLLM's rotary op)."""
    D = at_zero_rows.shape[-1]
    keys = turn(at_zero_rows.view(-1, D).index_select(0, src.flatten()), row)
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[:, :D].index_copy_(0, row.dst.flatten(), keys)
    picked = src[:, row.own :].flatten()
    flat[:, D:].index_copy_(0, row.dst[:, row.own :].flatten(), value_rows.view(-1, D).index_select(0, picked))


def rotate_rows(keys: torch.Tensor, row: PoolRow, rotary) -> torch.Tensor:
    """copy_far_keys' turn in PyTorch: keys [N, D] rotated by row.turn (rope.rotate, float32)."""
    cos, sin = row.turn.float().chunk(2)
    return rotate(keys.float(), cos, sin, rotary).to(keys.dtype)


def turned_positions(i: int, cfg: LminfConfig, B: int, fa: int, start: int) -> torch.Tensor:
    """Positions whose pool keys a decode row at i left rotated: the global blocks, block fa's
    rows before the window (start of them)."""
    g = global_blocks(cfg.global_tokens, B)
    return torch.cat((torch.arange(g * B), fa * B + torch.arange(start)))


def restore_keys(kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor, stored_rows: torch.Tensor,
                 num_kv_heads: int) -> None:  # fmt: skip
    """Put the keys as stored (HostStore.head_rows(..., as_stored=True)) back at positions of a
    request whose decode turned them (a chunk of it reads them as stored)."""
    B, D = kv_cache.shape[2], stored_rows.shape[-1]
    logical = head_row_numbers(positions // B, positions % B, num_kv_heads, B)
    physical = head_row_numbers(block_row[positions // B], positions % B, num_kv_heads, B)
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[:, :D].index_copy_(0, physical.flatten(), stored_rows.view(-1, D).index_select(0, logical.flatten()))
